"""Video modes: tile geometry, stitching, source-pixel placement, official AnyRes/res-adapt
fixtures (g1, g2, g3), long-video strategies and argument errors."""

from __future__ import annotations

import autogaze_wgpu as ag
import numpy as np
import pytest
from autogaze_wgpu.testing import synthetic_video
from autogaze_wgpu.video import FrameGaze, PatchDiff, VideoGazer, make_layout, run_video
from autogaze_wgpu.video.readout import sparse_readout
from conftest import assert_exact, load_case, load_model

PAD = 265


def _stitch(tile_masks: list[np.ndarray], nh: int, nw: int) -> list[np.ndarray]:
    """Fixture tile masks (nh*nw, 1, g*g) -> per scale (nh*g, nw*g) bool, written out plainly."""
    out = []
    for m in tile_masks:
        g = round(np.sqrt(m.shape[-1]))
        grid = np.zeros((nh * g, nw * g), dtype=bool)
        for k in range(nh * nw):
            ty, tx = divmod(k, nw)
            grid[ty * g : (ty + 1) * g, tx * g : (tx + 1) * g] = m[k, 0].reshape(g, g) > 0
        out.append(grid)
    return out


def _tile_tokens(result, k: int) -> np.ndarray:
    fx = result.fixations
    return fx["token"][fx["tile"] == k]


# -- official fixtures ---------------------------------------------------------------------------


def test_tiled_448_equals_tile_batch_and_official_g1(backend):
    model = load_model(backend)
    _, d = load_case("g1")
    raw = d["raw_frames"][0]  # (1, 448, 448, 3)
    res = model(raw, mode="tiled", gazing_ratio=0.75, task_loss_requirement=0.7)
    assert res.layout.tiles_shape == (2, 2) and res.layout.num_tiles == 4
    # The same 4 tiles as one plain batch call.
    proc = ag.AutoGazeProcessor.from_pretrained(model.model_dir, size={"height": 448, "width": 448})
    pv = proc(raw)  # (1, 1, 3, 448, 448), as the fixture's processor
    tiles = (
        pv.reshape(1, 1, 3, 2, 224, 2, 224)
        .transpose(0, 3, 5, 1, 2, 4, 6)
        .reshape(4, 1, 3, 224, 224)
    )
    batch = model.generate(tiles, gazing_ratio=0.75, task_loss_requirement=0.7)
    for k in range(4):
        real = ~d["if_padded_gazing"][k]
        assert_exact(f"tile {k} gaze order vs g1", _tile_tokens(res, k), d["gazing_pos"][k][real])
        assert_exact(
            f"tile {k} vs batch",
            _tile_tokens(res, k),
            batch.gazing_pos[k][~batch.if_padded_gazing[k]],
        )
    stops = [sp["first_padded_position_in_frame"] for sp in load_case("g1")[0]["stop_positions"]]
    assert res.first_padded_slot[0].tolist() == [-1 if s is None else s for s in stops]
    assert res.num_slots[0].tolist() == [198] * 4
    for s, want in enumerate(_stitch([d[f"gazing_mask_scale{i}"] for i in range(4)], 2, 2)):
        assert_exact(f"grid scale {s}", res.grids[s][0], want)
    # Confidence = the official teacher-forced probabilities of the real slots.
    conf = res.fixations["confidence"]
    want = d["tf_gaze_probs"][~d["if_padded_gazing"]]
    assert res.confidence_kind == "teacher_forced"
    np.testing.assert_allclose(conf, want, atol=2e-4)


def test_tile_batches_do_not_change_gazes(backend):
    model = load_model(backend)
    raw = load_case("g1")[1]["raw_frames"][0]
    a = model(raw, mode="tiled", gazing_ratio=0.75, task_loss_requirement=0.7, confidence=False)
    b = model(
        raw,
        mode="tiled",
        gazing_ratio=0.75,
        task_loss_requirement=0.7,
        confidence=False,
        max_tile_batch=3,
    )
    for name in ("tile", "slot", "token", "row", "col"):
        assert_exact(name, b.fixations[name], a.fixations[name])


def test_tiled_g2_and_readout_equal_official_recovery(backend):
    model = load_model(backend)
    _, d = load_case("g2")
    res = model(
        d["raw_frames"][0],
        mode="tiled",
        gazing_ratio=0.75,
        task_loss_requirement=0.7,
        confidence=False,
    )
    for k in range(4):
        assert_exact(
            f"tile {k}", _tile_tokens(res, k), d["gazing_pos"][k][~d["if_padded_gazing"][k]]
        )
    for s, n in enumerate((4, 8, 14, 28)):
        assert_exact(
            f"grid {s}",
            res.grids[s][0],
            d[f"recovered_gazing_mask_scale{s}"][0, 0].reshape(n, n) > 0,
        )
    ro = sparse_readout(res, [64, 128, 224, 448], 16)
    assert ro.tokens_per_frame == 1060
    info = ro.to_gazing_info()
    assert_exact("recovered_gazing_pos", info["gazing_pos"], d["recovered_gazing_pos"])
    assert info["num_gazing_each_frame"].tolist() == [300]


def test_tiled_full_392_drops_padding_and_matches_g3(backend):
    model = load_model(backend)
    _, d = load_case("g3")
    res = model(
        d["raw_frames"][0],
        mode="tiled_full",
        gazing_ratio=0.75,
        task_loss_requirement=0.7,
        confidence=False,
    )
    lay = res.layout
    assert lay.tiles_shape == (2, 2) and lay.scale_shapes == [(4, 4), (7, 7), (13, 13), (25, 25)]
    # Every real tile gaze is either a fixation or dropped because its cell is all padding.
    for k in range(4):
        want = d["gazing_pos"][k][~d["if_padded_gazing"][k]]
        m = lay.map_tokens(k, want)
        assert_exact(f"tile {k} kept", _tile_tokens(res, k), want[m["valid"]])
        assert res.num_dropped[0, k] == int((~m["valid"]).sum())
    assert res.num_dropped[0].tolist()[0] == 0 and res.num_dropped[0, 3] > 0
    # Our lattice keeps partial edge cells; where it coincides with the official crop, equal.
    for s, n in enumerate((3, 7, 12, 24)):
        want = d[f"recovered_gazing_mask_scale{s}"][0, 0].reshape(n, n) > 0
        assert_exact(f"grid {s}", res.grids[s][0][:n, :n], want)
    info = sparse_readout(res, [56, 112, 196, 392], 16).to_gazing_info()
    assert_exact("recovered_gazing_pos", info["gazing_pos"], d["recovered_gazing_pos"])
    assert int(info["num_gazing_each_frame"][0]) == 346
    fx = res.fixations
    assert (fx["x1"] <= 392).all() and (fx["y1"] <= 392).all() and (fx["x0"] < fx["x1"]).all()


# -- geometry, by hand ---------------------------------------------------------------------------


def test_layouts():
    lay = make_layout(1080, 1920, "tiled")
    assert lay.tiles_shape == (5, 9) and (lay.work_height, lay.work_width) == (1120, 2016)
    assert lay.scale_shapes == [(10, 18), (20, 36), (35, 63), (70, 126)]
    assert lay.tokens_available == 45 * 265
    assert make_layout(1080, 1920, "resize").tokens_available == 265
    assert make_layout(100, 700, "tiled").tiles_shape == (1, 3)
    assert make_layout(300, 500, "tiled", tile_grid=(2, 3)).tiles_shape == (2, 3)
    full = make_layout(300, 500, "tiled_full")
    assert full.tiles_shape == (2, 3) and full.tile_origins.tolist() == [
        [0, 0],
        [0, 224],
        [0, 448],
        [224, 0],
        [224, 224],
        [224, 448],
    ]
    assert full.scale_shapes == [(3, 5), (6, 9), (10, 16), (19, 32)]
    # 2 full tiles, the right column (52 px wide), the bottom row (76 px high), the corner.
    assert full.tokens_available == 2 * 265 + 76 + 2 * 101 + 29
    over = make_layout(300, 500, "tiled_full", tile_stride=160)
    assert over.tile_origins[:, 1].tolist()[:3] == [0, 160, 320] and over.overlapping


def test_tokens_land_in_the_right_source_pixels():
    # resize, 640x360: the 2x2 cells are quarters, the 14x14 cells are 1/14 of each side.
    lay = make_layout(360, 640, "resize")
    fg = FrameGaze.from_tile_tokens(lay, 0, 0, [np.array([0, 3, 69, 264, PAD, PAD])], budget=6)
    boxes = [tuple(int(f[k]) for k in ("x0", "y0", "x1", "y1")) for f in fg.fixations]
    assert boxes == [(0, 0, 320, 180), (320, 180, 640, 360), (0, 0, 45, 25), (594, 334, 640, 360)]
    assert fg.fixations["scale"].tolist() == [0, 0, 3, 3]
    assert fg.fixations["order"].tolist() == [0, 1, 2, 3] and fg.first_padded_slot.tolist() == [4]
    assert fg.grids[0].tolist() == [[True, False], [False, True]]
    m = fg.pixel_mask(scale=0)
    assert (
        m[:180, :320].all()
        and m[180:, 320:].all()
        and not m[:180, 320:].any()
        and not m[180:, :320].any()
    )
    assert fg.num_gazes == 4 and fg.token_ratio == 4 / 265

    # tiled, 1920x1080: tile 11 = tile row 1, column 2; 14x14 cell (3, 4) of that tile.
    lay = make_layout(1080, 1920, "tiled")
    toks = [np.zeros(0, np.int64)] * 45
    toks[11] = np.array([PAD, 69 + 3 * 14 + 4])
    fg = FrameGaze.from_tile_tokens(lay, 0, 0, toks)
    f = fg.fixations[0]
    assert (f["tile"], f["slot"], f["order"], f["row"], f["col"]) == (11, 1, 0, 17, 32)
    assert (f["x0"], f["y0"], f["x1"], f["y1"]) == (487, 262, 502, 277)
    assert fg.grids[3][17, 32] and fg.grids[3].sum() == 1

    # tiled_full, 300x500: the corner tile (origin 224, 448) is cut by both edges.
    lay = make_layout(300, 500, "tiled_full")
    toks = [np.zeros(0, np.int64)] * 6
    toks[5] = np.array(
        [69 + 4 * 14 + 3, 69 + 5 * 14, 0]
    )  # (4, 3) partial; (5, 0) padding; 2x2 (0, 0)
    fg = FrameGaze.from_tile_tokens(lay, 0, 0, toks)
    assert fg.num_dropped.tolist() == [0, 0, 0, 0, 0, 1] and fg.num_real[5] == 3
    a, b = fg.fixations
    assert (a["row"], a["col"], a["x0"], a["y0"], a["x1"], a["y1"]) == (18, 31, 496, 288, 500, 300)
    assert (b["scale"], b["row"], b["col"], b["x0"], b["y0"], b["x1"], b["y1"]) == (
        0,
        2,
        4,
        448,
        224,
        500,
        300,
    )
    m = fg.pixel_mask()
    assert m.sum() == 52 * 76 and m[224:, 448:].all()


class _FixedGaze:
    """A gaze source that always looks at the given ids of every tile (for placement tests)."""

    name = "fixed"
    confidence_kind = "none"
    grid = make_layout(224, 224).grid

    def __init__(self, ids):
        self.ids = np.asarray(ids, np.int64)

    def reset(self):
        pass

    def tile_tokens(self, tiles, valid, tile_ids, budgets):
        return [[self.ids.copy() for _ in tile_ids] for _ in range(tiles.shape[1])]


def test_fixed_source_places_masks_through_the_public_call():
    frames = np.zeros((2, 90, 160, 3), np.uint8)
    res = run_video(_FixedGaze([3]), frames, mode="resize")  # bottom-right 2x2 cell
    m = res.pixel_mask(1)
    assert m[45:, 80:].all() and m.sum() == 45 * 80
    res = run_video(
        _FixedGaze([0]), np.zeros((1, 200, 460, 3), np.uint8), mode="tiled"
    )  # 1x2 tiles
    assert res.layout.tiles_shape == (1, 2)
    m = res.pixel_mask(0)
    assert m[:100, :115].all() and m[:100, 230:345].all() and m.sum() == 2 * 100 * 115


# -- long videos -----------------------------------------------------------------------------------


def test_clips_and_stream(backend):
    """Clips and a stream with a horizon give the per-clip generates' tokens. 3 frames: a
    whole clip, a partial last clip and a horizon reset (test_stream_horizon checks longer
    streams against clips at the backend level; 5 frames took ~2 min on lavapipe)."""
    model = load_model(backend)
    proc = ag.AutoGazeProcessor.from_pretrained(model.model_dir)
    frames = synthetic_video(num_frames=3, height=120, width=200, seed=4)
    kw = {"gazing_ratio": 0.3, "task_loss_requirement": 0.7, "confidence": False}
    clips = model(frames, clip_len=2, **kw)
    want = []
    for a in (0, 2):
        out = model.generate(proc(frames[a : a + 2]), gazing_ratio=0.3, task_loss_requirement=0.7)
        want += [ft[0][ft[0] != PAD] for ft in out.frame_tokens]
    for t in range(3):
        assert_exact(f"clip frame {t}", clips[t].fixations["token"], want[t])
    stream = model(frames, long_video="stream", stream_horizon=2, **kw)
    for t in range(3):
        assert_exact(f"stream frame {t}", stream[t].fixations["token"], want[t])
    assert stream.params["long_video"] == "stream" and stream.confidence_kind == "none"
    one = model(frames[:1], long_video="stream", gazing_ratio=0.3)  # confidence is not computed
    assert one.confidence_kind == "none" and np.isnan(one.fixations["confidence"]).all()
    assert clips.source_indices.tolist() == [0, 1, 2]


def test_non_divisible_sizes_run_end_to_end(backend):
    model = load_model(backend)
    frames = synthetic_video(num_frames=1, height=250, width=300, seed=2)
    for mode, tiles in (("resize", (1, 1)), ("tiled", (1, 1)), ("tiled_full", (2, 2))):
        res = model(frames, mode=mode, gazing_ratio=0.2, confidence=False)
        assert res.layout.tiles_shape == tiles
        fx = res.fixations
        assert (
            (fx["x1"] <= 300) & (fx["y1"] <= 250) & (fx["x0"] < fx["x1"]) & (fx["y0"] < fx["y1"])
        ).all()
        assert res.num_gazes[0] == len(fx) == int(sum(g.sum() for g in res.grids))
        assert res.num_gazes[0] + res.num_dropped.sum() == res.num_real.sum()
        assert (res.num_real <= 53).all()


def test_patch_diff_source_in_every_mode():
    frames = np.zeros((3, 250, 300, 3), np.uint8)
    frames[1:, 0:16, 0:16] = 200  # one 16 px cell of the first tile changes at frame 1
    res = run_video(PatchDiff(), frames, mode="tiled_full")
    # Frame 0: every finest cell that covers source pixels (196 + 14x5 + 2x14 + 2x5).
    assert res.num_gazes.tolist() == [304, 1, 0]
    f = res[1].fixations[0]
    assert (f["scale"], f["x0"], f["y0"], f["x1"], f["y1"]) == (3, 0, 0, 16, 16)
    assert res.source == "patch_diff" and np.isnan(res.fixations["confidence"]).all()
    res = run_video(PatchDiff(), frames, mode="resize", gazing_ratio=0.01)
    assert res.num_gazes[0] == 2  # max(1, floor(0.01 * 265)) = 2
    res = run_video(PatchDiff(), frames, mode="tiled")
    assert res.layout.tiles_shape == (1, 1) and res.num_gazes[2] == 0


def test_errors():
    model = load_model("reference")
    frames = np.zeros((2, 64, 64, 3), np.uint8)
    with pytest.raises(ag.InputError, match="mode"):
        model(frames, mode="crop")
    with pytest.raises(ag.InputError, match="uint8"):
        model(frames.astype(np.float32))
    gazer = VideoGazer(PatchDiff())
    gazer.process_clip(frames)
    with pytest.raises(ag.InputError, match="one size"):
        gazer.process_clip(np.zeros((1, 32, 32, 3), np.uint8))
    with pytest.raises(ag.InputError, match="same shape"):
        run_video(PatchDiff(), [frames[0], np.zeros((32, 32, 3), np.uint8)])
    with pytest.raises(ag.InputError, match="tile_grid"):
        model(frames, mode="resize", tile_grid=(1, 1))
    with pytest.raises(ag.InputError, match="tile_stride"):
        model(frames, mode="tiled_full", tile_stride=300)
    with pytest.raises(ag.InputError, match="stream"):
        model(frames, long_video="stream", gazing_ratio=[0.5, 0.5])
    with pytest.raises(ag.InputError, match="gazing_ratio"):
        model(frames, gazing_ratio=1.5)
    with pytest.raises(ag.InputError, match="long_video"):
        model(frames, long_video="sliding")
    with pytest.raises(ag.InputError, match="shape"):
        model(np.zeros((1, 2, 8, 8, 3), np.uint8))
