"""Renderers, interframe output, metrics, patch_diff and the sparse readout on small
hand-made frames with exact expected pixels and values."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from autogaze_wgpu.errors import InputError
from autogaze_wgpu.video import FIXATION_DTYPE, FrameGaze, make_layout, patch_diff, render
from autogaze_wgpu.video.interframe import InterframeOutput
from autogaze_wgpu.video.metrics import InterframeMetrics, RunningStat, psnr
from autogaze_wgpu.video.readout import sparse_readout
from autogaze_wgpu.video.result import VideoResult

BLUE, GREEN = render.SCALE_COLORS[0], render.SCALE_COLORS[1]


def fixes(*cells):
    """(scale, x0, y0, x1, y1) tuples -> a fixation array."""
    a = np.zeros(len(cells), FIXATION_DTYPE)
    for i, (s, x0, y0, x1, y1) in enumerate(cells):
        a[i]["scale"], a[i]["x0"], a[i]["y0"], a[i]["x1"], a[i]["y1"] = s, x0, y0, x1, y1
    return a


def test_overlay_tint_exact():
    frame = np.full((4, 4, 3), 100, np.uint8)
    out = render.overlay(frame, fixes((0, 0, 0, 2, 2)), alpha=0.5, border=0)
    # floor((100 + c) / 2 + 0.5) per channel: (66, 133, 244) -> 83, 117, 172.
    assert out[:2, :2].reshape(-1, 3).tolist() == [[83, 117, 172]] * 4
    assert (out[2:] == 100).all() and (out[:, 2:] == 100).all()
    # Two scales on one pixel: coarse first, then fine over it.
    out = render.overlay(frame, fixes((1, 1, 1, 2, 2), (0, 0, 0, 2, 2)), alpha=0.5, border=0)
    want = np.floor(0.5 * (0.5 * 100 + 0.5 * np.array(BLUE)) + 0.5 * np.array(GREEN) + 0.5)
    assert out[1, 1].tolist() == want.astype(int).tolist()
    assert out[0, 0].tolist() == [83, 117, 172]


def test_overlay_border_exact():
    frame = np.zeros((5, 5, 3), np.uint8)
    out = render.overlay(frame, fixes((0, 0, 0, 4, 4)), alpha=0.0, border=1)
    ring = np.zeros((5, 5), bool)
    ring[0, :4] = ring[3, :4] = ring[:4, 0] = ring[:4, 3] = True
    assert (out[ring] == BLUE).all() and (out[~ring] == 0).all()
    with pytest.raises(InputError):
        render.overlay(frame.astype(np.float32), fixes())


def test_mask_and_masked_images():
    fx = fixes((0, 0, 0, 2, 4), (1, 1, 0, 2, 1))
    m = render.mask_image(fx, 4, 3)
    assert (m[:, :2][np.arange(4) != 0].reshape(-1, 3) == BLUE).all()
    assert m[0, 1].tolist() == list(GREEN) and m[0, 0].tolist() == list(BLUE)
    assert (m[:, 2] == 0).all()
    frame = np.arange(4 * 3 * 3, dtype=np.uint8).reshape(4, 3, 3) + 100
    mask = np.zeros((4, 3), bool)
    mask[1, 1] = True
    out = render.masked_image(frame, mask)
    assert out[1, 1].tolist() == frame[1, 1].tolist() and out.sum() == frame[1, 1].sum()
    out = render.masked_image(frame, mask, dim=0.5)
    assert out[0, 0].tolist() == [50, 51, 51]  # 100/2, 101/2 -> 50.5 rounds up, 102/2
    assert (
        render.masked_image(frame, fx).tolist()
        == np.where((m > 0).any(-1, keepdims=True), frame, 0).tolist()
    )


def test_panels_and_scale_rows():
    a = np.full((2, 2, 3), 10, np.uint8)
    b = np.full((3, 1, 3), 20, np.uint8)
    p = render.panels([a, b], gap=1, gap_value=255)
    assert p.shape == (3, 4, 3)
    assert (
        (p[:2, :2] == 10).all()
        and (p[2, :2] == 255).all()
        and (p[:, 2] == 255).all()
        and (p[:, 3] == 20).all()
    )
    frame = np.full((2, 2, 3), 200, np.uint8)
    rows = render.scale_rows(
        [frame, frame],
        [fixes((0, 0, 0, 1, 1)), fixes((1, 1, 1, 2, 2))],
        num_scales=2,
        dim=0.0,
        gap=1,
    )
    assert rows.shape == (5, 5, 3)
    assert rows[0, 0].tolist() == [200] * 3 and rows[0, 1].tolist() == [0] * 3  # scale 0, frame 0
    assert (rows[:2, 3:] == 0).all()  # scale 0, frame 1: nothing at scale 0
    assert rows[4, 4].tolist() == [200] * 3 and rows[3, 3].tolist() == [0] * 3  # scale 1, frame 1
    assert (rows[2] == 255).all() and (rows[:, 2] == 255).all()
    labeled = render.panels([np.zeros((20, 60, 3), np.uint8)], labels=["hi"])
    assert labeled.shape == (20, 60, 3) and labeled.max() > 200


def test_interframe_output_exact():
    f0 = np.full((2, 2, 3), 10, np.uint8)
    f1 = np.full((2, 2, 3), 20, np.uint8)
    f2 = np.full((2, 2, 3), 30, np.uint8)
    mask = np.array([[True, False], [False, False]])
    none = np.zeros((2, 2), bool)
    io = InterframeOutput(2, 2, keyframe_interval=2)
    s0 = io.step(f0, none)
    assert s0.keyframe and s0.update_ratio == 1.0 and (s0.output == 10).all()
    s1 = io.step(f1, mask)
    assert not s1.keyframe and s1.update_ratio == 0.25
    assert s1.output[..., 0].tolist() == [[20, 10], [10, 10]]
    s2 = io.step(f2, none)
    assert s2.keyframe and (s2.output == 30).all()
    # No keyframes: starts black, only gazed pixels ever appear.
    io = InterframeOutput(2, 2, keyframe_interval=0)
    s = io.step(f1, mask)
    assert (
        not s.keyframe and s.output[..., 0].tolist() == [[20, 0], [0, 0]] and s.update_ratio == 0.25
    )
    with pytest.raises(InputError):
        InterframeOutput(2, 2, keyframe_interval=-1)
    with pytest.raises(InputError):
        io.step(f1, np.zeros((3, 3), bool))


def test_psnr_and_running_stats():
    a = np.zeros((2, 2, 3), np.uint8)
    assert psnr(a, a) == math.inf
    b = np.ones((2, 2, 3), np.uint8)
    assert psnr(a, b) == pytest.approx(20 * math.log10(255))
    c = a.copy()
    c[0, 0, 0] = 12  # MSE = 144 / 12 = 12
    assert psnr(a, c) == pytest.approx(10 * math.log10(255**2 / 12))
    r = RunningStat(alpha=0.5)
    for x in (1.0, 3.0, 5.0):
        r.update(x)
    assert r.mean == 3.0 and r.ema == 0.5 * 5 + 0.5 * (0.5 * 3 + 0.5 * 1)
    m = InterframeMetrics(ema_alpha=0.5)
    m.add(a, a, 1.0, True)  # identical: PSNR inf, MSE 0
    m.add(a, c, 0.25, False)  # MSE 12
    assert m.psnr_db == [math.inf, pytest.approx(10 * math.log10(255**2 / 12))]
    assert m.update_ratio_mean == 0.625 and m.update_ratio_ema == 0.625
    assert m.psnr_mean == pytest.approx(10 * math.log10(255**2 / 6))  # PSNR of the mean MSE
    d = m.to_dict()
    assert d["per_frame"]["psnr_db"][0] == "inf" and "not the model's token ratio" in d["note"]
    json.dumps(d, allow_nan=False)


def test_patch_diff_exact():
    f = np.zeros((3, 32, 48, 3), np.uint8)
    f[1, :16, 16:32] = 9  # mean abs change 9 > 8
    f[2, :16, 16:32] = 17  # +8 since frame 1: not > 8
    f[2, 16:, 32:] = 8  # bottom-right: exactly 8, not > 8
    g = patch_diff(f, cell_size=16, threshold=8.0)
    assert g.shape == (3, 2, 3) and g[0].all()
    assert g[1].tolist() == [[False, True, False], [False, False, False]]
    assert not g[2].any()
    assert patch_diff(f[1:], previous=f[0])[0].tolist() == g[1].tolist()
    # Partial edge cells average only their own pixels.
    h = np.zeros((2, 20, 20, 3), np.uint8)
    h[1, 16:, 16:] = 10
    assert patch_diff(h, cell_size=16)[1].tolist() == [[False, False], [False, True]]
    with pytest.raises(InputError):
        patch_diff(f.astype(np.float32))


def _result(tokens_per_frame, height=360, width=640, mode="resize"):
    lay = make_layout(height, width, mode)
    frames = [
        FrameGaze.from_tile_tokens(lay, t, t, [np.asarray(tok)])
        for t, tok in enumerate(tokens_per_frame)
    ]
    return VideoResult(frames=frames, layout=lay, source="test")


def test_readout_with_the_model_grids_gives_the_token_ids():
    ids = [np.array([264, 0, 5, 70, 30]), np.array([3, 100])]
    res = _result(ids)
    ro = sparse_readout(res, [32, 64, 112, 224], 16)
    assert ro.tokens_per_frame == 265 and ro.grid_shapes == [(2, 2), (4, 4), (7, 7), (14, 14)]
    assert ro.frame_positions(0).tolist() == sorted(ids[0].tolist())
    info = ro.to_gazing_info()
    assert info["gazing_pos"][0].tolist() == [0, 5, 30, 70, 264, 265 + 3, 265 + 100]
    assert info["num_gazing_each_frame"].tolist() == [5, 2] and not info["if_padded_gazing"].any()
    assert ro.coords(0, 3).tolist() == [[0, 1], [13, 13]]  # ids 70 and 264
    assert ro.boxes(0, 0).tolist() == [[0, 0, 16, 16]]


def test_readout_coverage_threshold():
    # One 2x2 cell (the top-left quarter) of a 100x100 frame; a 3x3 target grid.
    res = _result([np.array([0])], 100, 100)
    ro = sparse_readout(res, [48, 64, 112, 224], 16, min_coverage=0.5)
    # Target patches span [0,33), [33,66), [66,100); the cell covers [0,50):
    # patch (0, 0) fully, (0, 1) and (1, 0) by 17/33 > 0.5, (1, 1) by (17/33)^2 < 0.5.
    assert ro.keep[0][0].tolist() == [
        [True, True, False],
        [True, False, False],
        [False, False, False],
    ]
    ro = sparse_readout(res, [48, 64, 112, 224], 16, min_coverage=0.9)
    assert ro.keep[0][0].sum() == 1
    with pytest.raises(InputError):
        sparse_readout(res, [32, 64], 16)
    with pytest.raises(InputError):
        sparse_readout(res, [8, 64, 112, 224], 16)


def test_result_conversions():
    res = _result([np.array([0, 265, 69]), np.array([265])])
    d = res.to_numpy()
    assert d["grid_scale0"].shape == (2, 2, 2) and d["num_gazes"].tolist() == [2, 0]
    assert d["first_padded_slot"].tolist() == [[1], [0]] and d["num_slots"].tolist() == [[3], [1]]
    j = json.loads(res.to_json())
    assert (
        j["frames"][0]["fixations"][1]["box"] == [0, 0, 45, 25]
        and j["frames"][0]["fixations"][1]["slot"] == 2
    )
    assert j["frames"][0]["fixations"][0]["confidence"] is None
    assert j["frames"][0]["cells"][0] == [0] and j["frames"][1]["tiles"][0]["stopped_early"]
    assert res.token_ratio.tolist() == [2 / 265, 0.0]
    assert res.pixel_masks().shape == (2, 360, 640)
