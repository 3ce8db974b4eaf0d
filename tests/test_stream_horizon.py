"""Streaming sessions' bounded horizon (issue 6): what ``horizon`` means, on every backend.

A session with horizon H forgets its history every H frames, so frame i is gazed exactly as
frame i % H of a clip that starts at frame i - i % H. That is checked against ``generate`` on
the clips, token for token.
"""

from __future__ import annotations

import autogaze_wgpu as ag
import numpy as np
import pytest
from autogaze_wgpu.testing import random_model, released_config, synthetic_video


@pytest.fixture(scope="module")
def pixels(rand_dir):
    proc = ag.AutoGazeProcessor.from_pretrained(rand_dir)
    return proc(synthetic_video(num_frames=5, height=96, width=128, seed=11, batch=2))


def _stream(session, pixels) -> list[np.ndarray]:
    return [session.step(pixels[:, t : t + 1]).gazing_pos for t in range(pixels.shape[1])]


def _clip_tokens(model, pixels, **kw) -> list[np.ndarray]:
    """Per-frame ids within the frame, from one generate call on the clip."""
    return list(model.generate(pixels, **kw).frame_tokens)


def test_horizon_equals_generate_on_clips(rand_dir, pixels, backend):
    model = ag.AutoGaze.from_pretrained(rand_dir, backend=backend)
    kw = {"gazing_ratio": 0.2, "task_loss_requirement": 0.7}
    session = model.stream(batch_size=2, horizon=2, **kw)
    got = _stream(session, pixels)
    want = []
    for start in range(0, pixels.shape[1], 2):
        want += _clip_tokens(model, pixels[:, start : start + 2], **kw)
    assert len(got) == len(want) == 5
    for t, (g, w) in enumerate(zip(got, want)):
        np.testing.assert_array_equal(g, w, err_msg=f"frame {t}")
    assert session.frame_index == 5 and session.frames_in_context == 1
    # The history matters: without the horizon, frame 2 differs from a clip's first frame.
    unbounded = _stream(model.stream(batch_size=2, horizon=None, **kw), pixels)
    np.testing.assert_array_equal(unbounded[1], got[1])
    assert not all(np.array_equal(u, g) for u, g in zip(unbounded[2:], got[2:]))


def test_reset_gives_a_fresh_session(rand_dir, pixels, backend):
    model = ag.AutoGaze.from_pretrained(rand_dir, backend=backend)
    session = model.stream(batch_size=2, gazing_ratio=0.2, horizon=None)
    first = _stream(session, pixels[:, :3])
    session.reset()
    again = _stream(session, pixels[:, :3])
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)
    assert session.frame_index == 6 and session.frames_in_context == 3


def test_default_horizon_is_the_trained_clip_length(rand_dir):
    model = ag.AutoGaze.from_pretrained(rand_dir, backend="reference")
    assert model.stream().horizon == model.config.max_num_frames == 16
    assert model.stream(horizon=None).horizon is None


@pytest.mark.parametrize("horizon", [0, -3, 2.5, True, "16", [4]])
def test_bad_horizon(rand_dir, horizon):
    model = ag.AutoGaze.from_pretrained(rand_dir, backend="reference")
    with pytest.raises(ag.InputError, match="horizon must be a positive integer"):
        model.stream(horizon=horizon)


def test_horizon_beyond_the_position_range_is_refused(rand_dir):
    model = ag.AutoGaze.from_pretrained(rand_dir, backend="reference")
    with pytest.raises(ag.InputError, match="max_position_embeddings"):
        model.stream(horizon=100_000)


def test_unbounded_stream_stops_before_positions_run_out(tmp_path, backend):
    cfg = released_config()
    cfg["gaze_model_config"]["gaze_decoder_config"]["max_position_embeddings"] = 700
    model = ag.AutoGaze.from_pretrained(random_model(tmp_path / "m", config=cfg), backend=backend)
    frame = np.zeros((1, 1, 3, 32, 32), np.float32)
    session = model.stream(gazing_ratio=0.2, horizon=None)  # 196 + 53 positions per frame
    session.step(frame)
    session.step(frame)
    with pytest.raises(ag.InputError, match="give AutoGaze.stream a horizon"):
        session.step(frame)
    assert session.frame_index == 2
    session.reset()  # a reset makes room again
    session.step(frame)


def test_wgpu_unbounded_session_capacity(rand_dir, monkeypatch):
    pytest.importorskip("autogaze_wgpu.backends.wgpu")
    from autogaze_wgpu.backends import wgpu as wgpu_backend

    if not wgpu_backend.adapter_available():
        pytest.skip("no wgpu adapter")
    monkeypatch.setattr(wgpu_backend.WgpuStream, "MAX_FRAMES_TRIED", (2,))
    model = ag.AutoGaze.from_pretrained(rand_dir, backend="wgpu")
    session = model.stream(gazing_ratio=0.1, horizon=None)
    frame = np.zeros((1, 1, 3, 32, 32), np.float32)
    session.step(frame)
    session.step(frame)
    with pytest.raises(ag.InputError, match="horizon"):
        session.step(frame)
    session.reset()
    session.step(frame)  # the same GPU session, reset


def test_step_returns_torch_tensors_on_request(rand_dir, pixels, backend):
    torch = pytest.importorskip("torch")
    model = ag.AutoGaze.from_pretrained(rand_dir, backend=backend)
    a = model.stream(batch_size=2, gazing_ratio=0.1).step(pixels[:, :1])
    b = model.stream(batch_size=2, gazing_ratio=0.1).step(pixels[:, :1], return_tensors="pt")
    assert isinstance(b.gazing_pos, torch.Tensor)
    np.testing.assert_array_equal(b.gazing_pos.cpu().numpy(), a.gazing_pos)
    with pytest.raises(ag.InputError):
        model.stream(batch_size=2).step(pixels[:, :1], return_tensors="tf")
