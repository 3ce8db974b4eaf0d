"""Robustness (issue 6, first part): hostile model files, awkward call arguments, and several
threads on one model.

Every failure must be an ``AutoGazeError`` subclass whose message names the problem, and
refusing a hostile file must be quick (no allocation driven by a lying size field).
"""

from __future__ import annotations

import json
import shutil
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from conftest import MODEL_DIR, load_model

import autogaze_wgpu as ag

# A refusal must not parse/allocate its way through a lying size: generous for a busy CI
# machine, far below what reading or allocating gigabytes would take.
QUICK_S = 5.0

WEIGHTS = "model.safetensors"


# ---------------------------------------------------------------------------------------------
# helpers: the fixture checkpoint split into header + data, and re-packed with edits
def _split_fixture() -> tuple[dict, bytes]:
    raw = (MODEL_DIR / WEIGHTS).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _pack(header: dict, data: bytes) -> bytes:
    hb = json.dumps(header).encode()
    hb += b" " * ((8 - len(hb) % 8) % 8)
    return struct.pack("<Q", len(hb)) + hb + data


def _tensor_names(header: dict) -> list[str]:
    return [k for k in header if k != "__metadata__"]


def _model_dir(tmp_path, weights: bytes | None = None, config: dict | str | None = None):
    d = tmp_path / "model"
    d.mkdir()
    if config is None:
        shutil.copy(MODEL_DIR / "config.json", d / "config.json")
    else:
        text = config if isinstance(config, str) else json.dumps(config)
        (d / "config.json").write_text(text)
    if weights is None:
        shutil.copy(MODEL_DIR / WEIGHTS, d / WEIGHTS)
    else:
        (d / WEIGHTS).write_bytes(weights)
    return d


def _refused(d, cls, words):
    t0 = time.perf_counter()
    with pytest.raises(cls) as ei:
        ag.AutoGaze.from_pretrained(d, backend="reference")
    elapsed = time.perf_counter() - t0
    msg = str(ei.value)
    assert isinstance(ei.value, ag.AutoGazeError)
    for w in words:
        assert w.lower() in msg.lower(), f"{w!r} not in {msg!r}"
    assert elapsed < QUICK_S, f"refusal took {elapsed:.1f} s"
    return msg


def _fixture_config() -> dict:
    return json.loads((MODEL_DIR / "config.json").read_text())


# ---------------------------------------------------------------------------------------------
# hostile model.safetensors
def _weights_cases() -> dict[str, tuple[bytes, list[str]]]:
    header, data = _split_fixture()
    raw = (MODEL_DIR / WEIGHTS).read_bytes()
    names = _tensor_names(header)
    a, b = names[0], names[1]
    cases: dict[str, tuple[bytes, list[str]]] = {}

    # header length field claims ~4.6e18 bytes
    cases["lying_header_length_huge"] = (struct.pack("<Q", 2**62) + raw[8:], ["header too large"])
    # header length past the end of the file
    cases["header_length_past_end"] = (struct.pack("<Q", len(raw)) + raw[8:], ["header length"])
    cases["header_not_json"] = (struct.pack("<Q", 16) + b"this is not json" + data, ["JSON"])

    h = json.loads(json.dumps(header))
    h[b]["data_offsets"] = list(h[a]["data_offsets"])  # b reuses a's bytes
    cases["overlapping_offsets"] = (_pack(h, data), ["offset"])

    h = json.loads(json.dumps(header))
    start, end = h[a]["data_offsets"]
    h[a]["data_offsets"] = [start, end + 10**12]  # far past the end of the file
    cases["out_of_range_offsets"] = (_pack(h, data), ["offset"])

    h = json.loads(json.dumps(header))
    h["gazing_model.extra.weight"] = {"dtype": "F32", "shape": [1], "data_offsets": [len(data), len(data) + 4]}
    cases["extra_tensor"] = (_pack(h, data + b"\0" * 4), ["unexpected tensors", "gazing_model.extra.weight"])

    h = json.loads(json.dumps(header))
    h[a]["dtype"] = "I32"  # same byte size, so only the dtype check can catch it
    cases["int32_dtype"] = (_pack(h, data), ["unsupported dtype", a])

    h = json.loads(json.dumps(header))
    start = h[a]["data_offsets"][0]
    bad = bytearray(data)
    bad[start : start + 4] = struct.pack("<f", float("inf"))
    cases["inf_weight"] = (_pack(h, bytes(bad)), ["non-finite", a, "1 of"])

    bad = bytearray(data)
    bad[start + 4 : start + 8] = struct.pack("<f", float("nan"))
    cases["nan_weight"] = (_pack(h, bytes(bad)), ["non-finite", a])

    h = json.loads(json.dumps(header))
    last = max(names, key=lambda k: h[k]["data_offsets"][1])  # drop it and its bytes
    cut = h.pop(last)["data_offsets"][0]
    cases["missing_tensor"] = (_pack(h, data[:cut]), ["missing tensors", last])

    h = json.loads(json.dumps(header))
    shape = h[a]["shape"]
    h[a]["shape"] = [shape[1], shape[0]] + shape[2:]  # same numel, wrong layout
    if h[a]["shape"] == shape:
        h[a]["shape"] = [1] + shape
    cases["wrong_shape"] = (_pack(h, data), ["wrong tensor shapes", a])

    cases["truncated"] = (raw[: len(raw) // 2], ["truncated"])
    cases["truncated_in_header"] = (raw[:100], ["truncated"])
    cases["zero_bytes"] = (b"", ["0 bytes", "truncated"])
    return cases


_WEIGHT_CASES = _weights_cases()


@pytest.mark.parametrize("name", sorted(_WEIGHT_CASES))
def test_hostile_weights_are_refused_quickly(tmp_path, name):
    blob, words = _WEIGHT_CASES[name]
    d = _model_dir(tmp_path, weights=blob)
    msg = _refused(d, ag.WeightsError, words)
    assert WEIGHTS in msg  # names the file


def test_weights_is_a_directory(tmp_path):
    d = _model_dir(tmp_path)
    (d / WEIGHTS).unlink()
    (d / WEIGHTS).mkdir()
    _refused(d, ag.WeightsError, ["directory"])


def test_missing_files(tmp_path):
    d = _model_dir(tmp_path)
    (d / WEIGHTS).unlink()
    _refused(d, ag.WeightsError, [WEIGHTS])
    (d / "config.json").unlink()
    _refused(d, ag.ConfigError, ["config.json"])


# ---------------------------------------------------------------------------------------------
# hostile config.json
DEC = ("gaze_model_config", "gaze_decoder_config")


def _set(cfg: dict, path: tuple[str, ...], value) -> dict:
    node = cfg
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = value
    return cfg


CONFIG_CASES = {
    "string_for_int": (DEC + ("hidden_size",), "192", ["hidden_size", "integer", '"192"']),
    "float_for_int": (DEC + ("num_hidden_layers",), 4.5, ["num_hidden_layers", "integer"]),
    "list_for_bool": (("has_task_loss_requirement_during_inference",), [1], ["has_task_loss", "boolean"]),
    "null_section": (("gaze_model_config",), None, ["gaze_model_config", "null"]),
    "list_section": (("gaze_model_config",), [1, 2], ["gaze_model_config", "object"]),
    "absurd_hidden_size": (DEC + ("hidden_size",), 10**9, ["hidden_size", "too large"]),
    "absurd_intermediate": (DEC + ("intermediate_size",), 10**12, ["intermediate_size", "too large"]),
    "absurd_layers": (DEC + ("num_hidden_layers",), 2**40, ["num_hidden_layers", "too large"]),
    "absurd_vocab": (DEC + ("vocab_size",), 2**64 - 1, ["vocab_size", "too large"]),
    "absurd_vision_tokens": (("num_vision_tokens_each_frame",), 10**9, ["num_vision_tokens_each_frame", "too large"]),
    "absurd_frames": (("max_num_frames",), 10**10, ["max_num_frames", "too large"]),
    "negative_size": (DEC + ("hidden_size",), -1, ["hidden_size"]),
    "heads_vs_hidden": (DEC + ("num_attention_heads",), 5, ["num_attention_heads", "hidden_size"]),
    "head_dim_vs_hidden": (DEC + ("head_dim",), 16, ["head_dim", "hidden_size"]),
    "scales_vs_tokens": (("scales",), "32+64+112", ["scales", "add up"]),
    "scales_garbage": (("scales",), "32+sixty", ["scales"]),
    "vocab_vs_tokens": (DEC + ("vocab_size",), 300, ["vocab_size", "266"]),
    "ratio_out_of_range": (("gazing_ratio_config", "fixed", "gazing_ratio"), 1.5, ["gazing_ratio", "(0, 1]"]),
}


@pytest.mark.parametrize("name", sorted(CONFIG_CASES))
def test_hostile_config_is_refused_quickly(tmp_path, name):
    path, value, words = CONFIG_CASES[name]
    d = _model_dir(tmp_path, config=_set(_fixture_config(), path, value))
    msg = _refused(d, ag.ConfigError, words)
    assert "config.json" in msg


@pytest.mark.parametrize(
    "text, words",
    [("", ["JSON"]), ("{not json", ["JSON"]), ("[1, 2, 3]", ["object"]), ("{}", ["missing"]), ('"x"', [])],
)
def test_config_that_is_not_a_config(tmp_path, text, words):
    _refused(_model_dir(tmp_path, config=text), ag.ConfigError, words)


def test_oversized_config_is_refused_before_reading(tmp_path):
    d = _model_dir(tmp_path)
    with open(d / "config.json", "wb") as f:  # sparse: 64 MiB of nothing, cheap to make
        f.truncate(64 << 20)
    _refused(d, ag.ConfigError, ["bytes", "refused"])


# ---------------------------------------------------------------------------------------------
# call arguments (reference backend)
@pytest.fixture(scope="module")
def ref():
    return load_model("reference")


def _pixels(seed: int, T: int = 2, B: int = 1, size: int = 224, dtype=np.float32) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((B, T, 3, size, size)).astype(dtype)


def _same(a, b):
    np.testing.assert_array_equal(a.gazing_pos, b.gazing_pos)
    np.testing.assert_array_equal(a.if_padded_gazing, b.if_padded_gazing)
    assert list(a.num_gazing_each_frame) == list(b.num_gazing_each_frame)


def test_non_contiguous_and_negative_stride_input(ref):
    base = np.random.default_rng(3).standard_normal((1, 1, 3, 224, 448)).astype(np.float32)
    strided = base[..., ::2]  # non-contiguous view
    assert not strided.flags.c_contiguous
    flipped = base[..., ::-1][..., ::2]  # negative strides
    assert flipped.strides[-1] < 0
    channels_last = np.moveaxis(np.ascontiguousarray(np.moveaxis(strided, 2, -1)), -1, 2)
    assert not channels_last.flags.c_contiguous
    for view in (strided, flipped, channels_last):
        got = ref.generate(view, gazing_ratio=0.05)
        want = ref.generate(np.ascontiguousarray(view), gazing_ratio=0.05)
        _same(got, want)


@pytest.mark.parametrize("dtype", [np.float64, np.float16])
def test_float64_and_float16_input(ref, dtype):
    x = _pixels(4, T=1).astype(dtype)
    out = ref.generate(x, gazing_ratio=0.05)
    _same(out, ref.generate(x.astype(np.float32), gazing_ratio=0.05))


@pytest.mark.parametrize("size", [1, 8, 15])
def test_frames_smaller_than_a_patch(ref, size):
    out = ref.generate(_pixels(5, T=1, size=size), gazing_ratio=0.1)
    assert out.gazing_pos.shape == (1, 26)  # floor(0.1 * 265) tokens, like any frame


@pytest.mark.parametrize("value", [np.inf, -np.inf, np.nan])
def test_non_finite_pixels_are_rejected(ref, value):
    pv = _pixels(6)
    pv[0, 1, 2, 100, 100] = value
    with pytest.raises(ag.InputError, match="NaN or Inf"):
        ref.generate(pv, gazing_ratio=0.1)
    with pytest.raises(ag.InputError, match="NaN or Inf"):
        ref.embed(pv)


def test_float64_beyond_float32_range_is_named(ref):
    pv = _pixels(6, T=1).astype(np.float64)
    pv[0, 0, 0, 0, 0] = 1e300  # finite in float64, Inf once cast to the model's float32
    with pytest.raises(ag.InputError, match="beyond float32's range"):
        ref.generate(pv, gazing_ratio=0.05)


@pytest.mark.parametrize(
    "ratio, words",
    [
        ([0.1], ["1 values", "2 frames"]),
        ([0.1, 0.2, 0.3], ["3 values", "2 frames"]),
        ([], ["0 values"]),
        (True, ["number"]),
        (False, ["number"]),
        ([0.1, True], ["bool"]),  # would silently read as ratio 1.0
        ([0.1, np.bool_(True)], ["bool"]),
        (["0.1", "0.2"], ["string"]),
        ("0.5", ["number"]),
        ("1", ["number"]),  # a 1-character string would read as the list [1.0]
        (0.0, ["(0, 1]"]),
        (1.5, ["(0, 1]"]),
        (float("nan"), ["(0, 1]"]),
        ([0.1, float("inf")], ["(0, 1]"]),
        (object(), ["number"]),
    ],
)
def test_gazing_ratio_arguments(ref, ratio, words):
    pv = _pixels(7)
    if isinstance(ratio, str):
        pv = pv[:, :1]
    with pytest.raises(ag.InputError) as ei:
        ref.generate(pv, gazing_ratio=ratio)
    for w in words:
        assert w in str(ei.value)


@pytest.mark.parametrize("req", [-0.1, float("nan"), float("inf"), "x", "0.5", True, [0.5]])
def test_bad_task_loss_requirement(ref, req):
    with pytest.raises(ag.InputError, match="task_loss_requirement"):
        ref.generate(_pixels(8, T=1), gazing_ratio=0.05, task_loss_requirement=req)


def test_unknown_mode_is_an_input_error(ref):
    frames = np.zeros((2, 32, 32, 3), np.uint8)
    with pytest.raises(ag.InputError, match="mode"):
        ref(frames, mode="nope")


def test_streaming_step_with_a_wrong_batch(ref):
    s = ref.stream(batch_size=2, gazing_ratio=0.1)
    for bad in (_pixels(9, T=1, B=1), _pixels(9, T=1, B=3), _pixels(9, T=2, B=2)):
        with pytest.raises(ag.InputError, match="one frame per batch row"):
            s.step(bad)
    # the session is still usable after the refusals
    out = s.step(_pixels(9, T=1, B=2))
    assert out.gazing_pos.shape[0] == 2 and s.frame_index == 1
    for bs in (0, -1, 1.5, "2"):
        with pytest.raises(ag.InputError, match="batch_size"):
            ref.stream(batch_size=bs, gazing_ratio=0.1)


def test_model_stays_usable_after_errors(ref):
    pv = _pixels(10, T=1)
    want = ref.generate(pv, gazing_ratio=0.05)
    for bad in (np.zeros((1, 2, 4, 8, 8), np.float32), np.zeros((0, 3, 8, 8), np.float32), "x"):
        with pytest.raises(ag.InputError):
            ref.generate(bad, gazing_ratio=0.05)
    _same(ref.generate(pv, gazing_ratio=0.05), want)


# ---------------------------------------------------------------------------------------------
# concurrency: threads sharing one model give the serial answers, without deadlock
def _threads_match_serial(model, inputs, ratio, timeout_s):
    serial = [model.generate(x, gazing_ratio=ratio) for x in inputs]
    barrier = threading.Barrier(len(inputs))

    def call(x):
        barrier.wait(timeout=timeout_s)
        return model.generate(x, gazing_ratio=ratio)

    with ThreadPoolExecutor(max_workers=len(inputs)) as pool:
        futures = [pool.submit(call, x) for x in inputs]
        results = [f.result(timeout=timeout_s) for f in futures]
    for got, want in zip(results, serial):
        _same(got, want)
    # the inputs differ, so equal results cannot come from one thread's answer reused
    assert len({r.gazing_pos.tobytes() for r in results}) > 1


def test_threads_on_one_reference_model(ref):
    inputs = [_pixels(100 + i, T=2) for i in range(4)]
    _threads_match_serial(ref, inputs, 0.1, timeout_s=120)


def _wgpu_usable() -> bool:
    if "wgpu" not in ag.available_backends():
        return False
    from autogaze_wgpu.backends.wgpu import adapter_available

    return adapter_available()


@pytest.mark.skipif(not _wgpu_usable(), reason="no wgpu adapter")
def test_threads_on_one_wgpu_model():
    model = load_model("wgpu")
    inputs = [_pixels(200 + i, T=1) for i in range(4)]
    _threads_match_serial(model, inputs, 0.05, timeout_s=300)


def test_threads_on_one_torch_model():
    model = ag.AutoGaze.from_pretrained(MODEL_DIR, backend="torch", device="cpu")
    inputs = [_pixels(300 + i, T=2) for i in range(4)]
    for _ in range(2):  # the race does not show on every run
        _threads_match_serial(model, inputs, 0.1, timeout_s=120)


@pytest.mark.parametrize("value", [True, 0, -3, 2.0, "4"])
@pytest.mark.parametrize("name", ["stride", "max_frames", "num_frames", "max_tile_batch"])
def test_video_tool_counts_are_positive_integers(name, value):
    """Counts of the video tools refuse bools (True is not 1 frame), zero, negatives, floats
    and strings with an InputError naming the argument."""
    from autogaze_wgpu.video import VideoGazer
    from autogaze_wgpu.video.io import read_frames
    from autogaze_wgpu.video.sample import sample_clip

    calls = {
        "stride": lambda: next(iter(read_frames("no-such-file.mp4", stride=value))),
        "max_frames": lambda: next(iter(read_frames("no-such-file.mp4", max_frames=value))),
        "num_frames": lambda: sample_clip(num_frames=value),
        "max_tile_batch": lambda: VideoGazer("patch_diff", max_tile_batch=value),
    }
    with pytest.raises(ag.InputError, match=name):
        calls[name]()
