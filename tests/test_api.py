"""The public API as written in the README: defaults, batching, streaming, errors."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import MODEL_DIR, case_pixel_values, load_model

import autogaze_wgpu as ag
from autogaze_wgpu.testing import synthetic_video


@pytest.fixture(scope="module")
def rand_pixels(rand_dir):
    proc = ag.AutoGazeProcessor.from_pretrained(rand_dir)
    return proc(synthetic_video(num_frames=6, height=180, width=320, seed=5, batch=2))


def test_defaults_follow_the_config(backend):
    model = load_model(backend)
    pv = case_pixel_values("a")[:, :3]
    default = model.generate(pv)
    explicit = model.generate(pv, gazing_ratio=0.75, task_loss_requirement=0.7)
    np.testing.assert_array_equal(default.gazing_pos, explicit.gazing_pos)
    # Only a ratio: no task-loss stopping, every frame uses its whole budget.
    ratio_only = model.generate(pv, gazing_ratio=0.1)
    assert ratio_only.num_gazing_each_frame.tolist() == [26, 26, 26]
    assert not ratio_only.if_padded_gazing.any()
    # Only a requirement: the ratio becomes 1 and stopping still happens.
    req_only = model.generate(pv, task_loss_requirement=0.7)
    assert req_only.if_padded_gazing.any()


def test_per_frame_ratios(backend):
    model = load_model(backend)
    pv = case_pixel_values("a")[:, :3]
    out = model.generate(pv, gazing_ratio=[0.05, 0.1, 0.2])
    assert out.num_gazing_each_frame.tolist() == [13, 26, 53]


def test_torch_and_4d_input(backend):
    torch = pytest.importorskip("torch")
    model = load_model(backend)
    pv = case_pixel_values("a")[0, :2]  # (T, 3, H, W)
    a = model.generate(pv, gazing_ratio=0.1)
    b = model.generate(torch.from_numpy(pv), gazing_ratio=0.1)
    np.testing.assert_array_equal(a.gazing_pos, b.gazing_pos)
    assert a.gazing_pos.shape == (1, 52)


def test_embed_shape(backend):
    emb = load_model(backend).embed(case_pixel_values("a")[:, :2])
    assert emb.shape == (1, 2, 196, 192) and emb.dtype == np.float32


def test_random_model_exercises_both_stopping_rules(rand_dir, rand_pixels, backend):
    model = ag.AutoGaze.from_pretrained(rand_dir, backend=backend)
    out = model.generate(rand_pixels)
    assert out.gazing_pos.shape[0] == 2
    real = out.num_real_gazes()
    assert (real < 198).any(), "no frame stopped early"
    assert out.if_padded_gazing.any()
    assert (out.num_gazing_each_frame <= 198).all()


def test_batched_streaming_equals_whole_clip(rand_dir, rand_pixels, backend):
    """A 2-row stream gives the whole clip's tokens. 4 of the 6 frames: the stream's
    3-frame conv ring wraps at frame 3, and later frames run the same kernels on a longer
    cache (case f streams 16 frames against the official per-frame calls), and on lavapipe
    they were most of this test's time."""
    model = ag.AutoGaze.from_pretrained(rand_dir, backend=backend)
    pixels = rand_pixels[:, :4]
    whole = model.generate(pixels, gazing_ratio=0.3, task_loss_requirement=0.7)
    session = model.stream(batch_size=2, gazing_ratio=0.3, task_loss_requirement=0.7)
    per_frame = [session.step(pixels[:, t : t + 1]) for t in range(pixels.shape[1])]
    np.testing.assert_array_equal(
        np.concatenate([o.gazing_pos + 265 * t for t, o in enumerate(per_frame)], 1), whole.gazing_pos
    )
    assert session.frame_index == pixels.shape[1]


def test_score_matches_the_reference_on_other_weights(rand_dir, rand_pixels, backend):
    """Scores of the random model's own gazes (pads included) equal the reference's within
    the SPEC tolerances, up to whole frames of 265 slots; later calls on other gazes reuse
    the backend's buffers.

    The gazes are the reference's: scoring is teacher-forced, so any valid gazes test it, and
    generating them with the backend under test only repeated generation work that the
    generate tests check (on lavapipe, 3 wgpu generates were most of this test's ~4 min)."""
    model = ag.AutoGaze.from_pretrained(rand_dir, backend=backend)
    ref = ag.AutoGaze.from_pretrained(rand_dir, backend="reference")
    # ratio 1: 265 slots per frame, more than one wgpu score forward holds (200)
    for ratio, req, T in ((0.2, None, 3), (0.5, 0.7, 3), (1.0, None, 2)):
        out = ref.generate(rand_pixels[:, :T], gazing_ratio=ratio, task_loss_requirement=req)
        s = model.score(rand_pixels[:, :T], out)
        want = ref.score(rand_pixels[:, :T], out)
        assert s.gaze_probs.shape == out.gazing_pos.shape
        assert ((s.gaze_probs >= 0) & (s.gaze_probs <= 1)).all()
        np.testing.assert_allclose(s.gaze_probs, want.gaze_probs, rtol=0, atol=2e-4)
        np.testing.assert_allclose(s.task_loss_prediction, want.task_loss_prediction, rtol=0, atol=5e-5)


@pytest.mark.parametrize(
    "kwargs,words",
    [
        ({"gazing_ratio": 0.0}, "(0, 1]"),
        ({"gazing_ratio": 1.5}, "(0, 1]"),
        ({"gazing_ratio": float("nan")}, "(0, 1]"),
        ({"gazing_ratio": [0.5]}, "1 values but the video has 2 frames"),
        ({"task_loss_requirement": -1.0}, ">= 0"),
        ({"task_loss_requirement": float("nan")}, ">= 0"),
        ({"target_scales": [64, 128, 224, 448]}, "together"),
    ],
)
def test_bad_arguments_raise_input_error(kwargs, words):
    model = load_model("reference")
    with pytest.raises(ag.InputError, match=None) as e:
        model.generate(case_pixel_values("a")[:, :2], **kwargs)
    assert words in str(e.value)


@pytest.mark.parametrize(
    "bad,words",
    [
        (np.zeros((1, 2, 3, 8, 8), np.uint8), "floating point"),
        (np.zeros((2, 3, 8), np.float32), "shape"),
        (np.zeros((1, 2, 4, 8, 8), np.float32), "3 channels"),
        (np.zeros((1, 0, 3, 8, 8), np.float32), "empty"),
        (np.full((1, 1, 3, 8, 8), np.nan, np.float32), "NaN"),
    ],
)
def test_bad_pixel_values_raise_input_error(bad, words):
    with pytest.raises(ag.InputError) as e:
        load_model("reference").generate(bad)
    assert words in str(e.value)


def test_target_scales_need_a_square_input_of_the_largest_scale():
    with pytest.raises(ag.InputError, match="square"):
        load_model("reference").generate(
            np.zeros((1, 1, 3, 224, 300), np.float32), target_scales=[56, 112, 196, 392], target_patch_size=16
        )


def test_unknown_backend_and_missing_model():
    with pytest.raises(ag.BackendError, match="unknown backend"):
        ag.AutoGaze.from_pretrained(MODEL_DIR, backend="nope")
    with pytest.raises(ag.ConfigError, match="does not exist"):
        ag.AutoGaze.from_pretrained("/definitely/not/here")


def test_repo_id_without_hub_says_how_to_get_files(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *a, **k):
        if name.startswith("huggingface_hub"):
            raise ImportError(name)
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ag.ConfigError, match="huggingface_hub is not installed"):
        ag.AutoGaze.from_pretrained("nvidia/AutoGaze")


def test_stream_rejects_wrong_batch():
    session = load_model("reference").stream(batch_size=2)
    with pytest.raises(ag.InputError, match="one frame per batch row"):
        session.step(case_pixel_values("a")[:, :1])


def test_score_rejects_mismatched_gazes():
    model = load_model("reference")
    pv = case_pixel_values("a")[:, :2]
    out = model.generate(pv, gazing_ratio=0.1)
    with pytest.raises(ag.InputError, match="do not fit"):
        model.score(case_pixel_values("a")[:, :3], out)


def test_errors_share_one_root():
    for cls in (ag.ConfigError, ag.WeightsError, ag.InputError, ag.BackendError, ag.DeviceError):
        assert issubclass(cls, ag.AutoGazeError)
    assert issubclass(ag.InputError, ValueError) and issubclass(ag.DeviceError, RuntimeError)


def test_return_tensors_pt_equals_numpy(backend):
    torch = pytest.importorskip("torch")
    model = load_model(backend)
    pv = case_pixel_values("a")[:, :2]
    dev = torch.device(model.tensor_device or "cpu")
    a = model.generate(pv, gazing_ratio=0.1, task_loss_requirement=0.7)
    b = model.generate(torch.from_numpy(pv).to(dev), gazing_ratio=0.1, task_loss_requirement=0.7, return_tensors="pt")
    for name, dtype in [("gazing_pos", torch.int64), ("if_padded_gazing", torch.bool), ("num_gazing_each_frame", torch.int64)]:
        t = getattr(b, name)
        assert isinstance(t, torch.Tensor) and t.dtype == dtype and t.device.type == dev.type, (name, t.dtype, t.device)
        np.testing.assert_array_equal(t.cpu().numpy(), getattr(a, name))
    for m_np, m_pt in zip(a.gazing_mask, b.gazing_mask):
        assert m_pt.dtype == torch.float32 and m_pt.device.type == dev.type
        np.testing.assert_array_equal(m_pt.cpu().numpy(), m_np)
    np.testing.assert_array_equal(b.num_real_gazes().cpu().numpy(), a.num_real_gazes())
    assert b.to_dict() == a.to_dict()
    e = model.embed(pv, return_tensors="pt")
    assert e.dtype == torch.float32 and e.device.type == dev.type
    np.testing.assert_array_equal(e.cpu().numpy(), model.embed(pv))
    s_np = model.score(pv, a)
    s_pt = model.score(pv, b, return_tensors="pt")  # torch gazes in, too
    for name in ("gaze_probs", "task_loss_prediction", "log_action_probs"):
        t = getattr(s_pt, name)
        assert t.dtype == torch.float32 and t.device.type == dev.type
        # torch's and numpy's log differ in the last bit
        tol = 1e-6 if name == "log_action_probs" else 0
        np.testing.assert_allclose(t.cpu().numpy(), getattr(s_np, name), rtol=tol, atol=0)


def test_return_tensors_pt_with_target_scales():
    torch = pytest.importorskip("torch")
    model = load_model("reference")
    pv = np.random.default_rng(0).standard_normal((1, 1, 3, 448, 448)).astype(np.float32)
    kw = {"gazing_ratio": 0.1, "target_scales": [64, 128, 224, 448], "target_patch_size": 16}
    a, b = model.generate(pv, **kw), model.generate(pv, return_tensors="pt", **kw)
    assert isinstance(b.tiles.gazing_pos, torch.Tensor)
    for m_np, m_pt in zip(a.gazing_mask, b.gazing_mask):
        np.testing.assert_array_equal(m_pt.cpu().numpy(), m_np)


@pytest.mark.parametrize("value", ["tf", "PT", None, 1, ["pt"]])
def test_bad_return_tensors_raise_input_error(value):
    model = load_model("reference")
    pv = case_pixel_values("a")[:, :1]
    for call in (
        lambda: model.generate(pv, gazing_ratio=0.05, return_tensors=value),
        lambda: model.embed(pv, return_tensors=value),
    ):
        with pytest.raises(ag.InputError, match="return_tensors must be 'np'"):
            call()


def test_precision_is_checked():
    with pytest.raises(ag.InputError, match="precision must be one of"):
        ag.AutoGaze.from_pretrained(MODEL_DIR, backend="torch", device="cpu", precision="fp16")
    for name in ("reference", "wgpu"):
        with pytest.raises(ag.BackendError, match="fast mode of backend='torch' only"):
            ag.AutoGaze.from_pretrained(MODEL_DIR, backend=name, precision="bf16")
    assert load_model("reference").precision == "float32"
