"""AutoGazeProcessor: sizes, PIL exactness, input forms and errors."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import MODEL_DIR, load_model
from PIL import Image

import autogaze_wgpu as ag
from autogaze_wgpu.processor import get_resize_output_image_size


@pytest.fixture(scope="module")
def proc():
    return ag.AutoGazeProcessor.from_pretrained(MODEL_DIR)


@pytest.mark.parametrize(
    "hw,want",
    [((360, 640), (224, 398)), ((640, 360), (398, 224)), ((224, 224), (224, 224)), ((100, 100), (224, 224)), ((1080, 1920), (224, 398))],
)
def test_shortest_edge_sizes(hw, want):
    assert get_resize_output_image_size(*hw, {"shortest_edge": 224}) == want


def test_resize_is_pil_bilinear_then_official_formula(proc):
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, size=(3, 97, 131, 3), dtype=np.uint8)
    out = proc(frames)
    assert out.shape == (1, 3, 3, 224, 302) and out.dtype == np.float32
    img = np.asarray(Image.fromarray(frames[1]).resize((302, 224), Image.BILINEAR))
    x = (img.astype(np.float64) * (1 / 127.5)).astype(np.float32) - np.float32(1)
    x = (x - np.float32([0.485, 0.456, 0.406])) / np.float32([0.229, 0.224, 0.225])
    np.testing.assert_array_equal(out[0, 1], np.moveaxis(x, -1, 0))


def test_rgba_list_and_torch_inputs(proc):
    rng = np.random.default_rng(1)
    frames = rng.integers(0, 256, size=(2, 224, 224, 4), dtype=np.uint8)
    a = proc(frames)
    b = proc([f[..., :3] for f in frames])
    np.testing.assert_array_equal(a, b)
    torch = pytest.importorskip("torch")
    c = proc(torch.from_numpy(frames), return_tensors="pt")
    assert isinstance(c, torch.Tensor)
    np.testing.assert_array_equal(c.numpy(), a)


def test_size_override(proc):
    p = ag.AutoGazeProcessor.from_pretrained(MODEL_DIR, size={"height": 64, "width": 48})
    assert p(np.zeros((1, 10, 10, 3), np.uint8)).shape == (1, 1, 3, 64, 48)
    with pytest.raises(ag.ConfigError, match="unknown preprocessor override"):
        ag.AutoGazeProcessor.from_pretrained(MODEL_DIR, colour=True)


@pytest.mark.parametrize(
    "bad,words",
    [
        (np.zeros((2, 8, 8, 3), np.float32), "uint8"),
        (np.zeros((8, 8, 3), np.uint8), "shape"),
        (np.zeros((1, 8, 8, 2), np.uint8), "channels"),
        (np.zeros((0, 8, 8, 3), np.uint8), "empty"),
        ("frames.mp4", "numpy array"),
    ],
)
def test_bad_frames(proc, bad, words):
    with pytest.raises(ag.InputError) as e:
        proc(bad)
    assert words in str(e.value)


# --- raw frames: the processor on the backend's device (wgpu: on the GPU) --------------------


@pytest.mark.parametrize(
    "shape",
    [
        (2, 60, 100, 3),  # enlarge both axes
        (3, 300, 500, 3),  # shrink both (antialiased)
        (2, 123, 224, 3),  # the short side kept: only the long side resampled
        (2, 224, 398, 3),  # already the processor's size: no resize, normalisation only
        (1, 5, 7, 3),  # 105 bytes per frame: frames not on word boundaries
    ],
)
def test_raw_frames_embed_exactly_as_processed_ones(proc, backend, shape):
    """The GPU preprocessing is bit-exact with the processor (PIL): same vision embeddings,
    to the bit, as the processor's pixel values."""
    model = load_model(backend)
    frames = np.random.default_rng(sum(shape)).integers(0, 256, size=shape, dtype=np.uint8)
    raw = proc.raw(frames)
    assert raw.shape == proc(frames).shape
    np.testing.assert_array_equal(model.embed(raw), model.embed(proc(frames)))


def test_raw_frames_generate_score_and_stream(proc, backend):
    model = load_model(backend)
    frames = np.random.default_rng(7).integers(0, 256, size=(3, 90, 150, 3), dtype=np.uint8)
    pv = proc(frames)
    out = model.generate(proc.raw(frames))
    want = model.generate(pv)
    np.testing.assert_array_equal(out.gazing_pos, want.gazing_pos)
    np.testing.assert_array_equal(out.if_padded_gazing, want.if_padded_gazing)
    s, s_want = model.score(proc.raw(frames), want), model.score(pv, want)
    np.testing.assert_array_equal(s.gaze_probs, s_want.gaze_probs)
    session = model.stream()
    steps = [session.step(proc.raw(frames[t : t + 1])) for t in range(3)]
    got = np.concatenate([o.gazing_pos + 265 * t for t, o in enumerate(steps)], 1)
    np.testing.assert_array_equal(got, want.gazing_pos)


def test_raw_frames_stream_refuses_a_change_of_input_kind(proc, backend):
    model = load_model(backend)
    frames = np.random.default_rng(8).integers(0, 256, size=(2, 64, 64, 3), dtype=np.uint8)
    session = model.stream()
    session.step(proc.raw(frames[:1]))
    if backend == "wgpu":  # its session was built for uint8 frames of this size
        with pytest.raises(ag.InputError, match="uint8 frames"):
            session.step(proc(frames[1:]))
    else:  # the host path: raw frames are pixel values by the time the backend sees them
        session.step(proc(frames[1:]))
