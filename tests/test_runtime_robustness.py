"""Robustness at run time (issue 6): closing a model, KeyboardInterrupt during a call,
memory estimates before allocation, several models on one device, tiles larger than the
frame. Each test runs on every available backend (conftest's ``backend`` parametrisation).
"""

from __future__ import annotations

import gc
import os
import signal
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor

import autogaze_wgpu as ag
import numpy as np
import pytest
from autogaze_wgpu import memory
from autogaze_wgpu.testing import synthetic_video
from conftest import MODEL_DIR, load_model

QUICK_S = 5.0  # a refusal computed from shapes, generous for a busy CI machine


def _fresh(backend: str) -> ag.AutoGaze:
    """A model of its own (the cached conftest models must not be closed)."""
    device = os.environ.get("AUTOGAZE_TEST_DEVICE") if backend in ("reference", "torch") else None
    return ag.AutoGaze.from_pretrained(MODEL_DIR, backend=backend, device=device)


def _pixels(seed: int, T: int = 1, B: int = 1, size: int = 32) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((B, T, 3, size, size)).astype(np.float32)


def _same(a, b) -> None:
    np.testing.assert_array_equal(a.gazing_pos, b.gazing_pos)
    np.testing.assert_array_equal(a.if_padded_gazing, b.if_padded_gazing)
    np.testing.assert_array_equal(a.num_gazing_each_frame, b.num_gazing_each_frame)


# ---------------------------------------------------------------------------------------------
# close() and `with`
def _backend_payload(model):
    """A weak reference to what close() must free: the wgpu engine, or the torch weights."""
    be = model.backend
    return weakref.ref(be.model if hasattr(be, "model") else be)


def test_close_frees_the_backend_and_later_calls_say_so(backend):
    model = _fresh(backend)
    pv = _pixels(1)
    want = model.generate(pv, gazing_ratio=0.05)
    session = model.stream(1, gazing_ratio=0.05)
    session.step(pv)
    payload = _backend_payload(model)
    model.close()
    gc.collect()
    assert payload() is None, "the backend's weights/engine are still alive after close()"
    assert model.closed and "closed" in repr(model)
    calls = {
        "generate": lambda: model.generate(pv, gazing_ratio=0.05),
        "embed": lambda: model.embed(pv),
        "score": lambda: model.score(pv, want),
        "stream": lambda: model.stream(1),
        "__call__": lambda: model(np.zeros((1, 8, 8, 3), np.uint8)),
        "open session step": lambda: session.step(pv),
        "open session reset": lambda: session.reset(),
        "with": lambda: model.__enter__(),
    }
    for call in calls.values():
        with pytest.raises(
            ag.ModelClosedError, match="closed; load it again with AutoGaze.from_pretrained"
        ):
            call()
    # invalid input still gets the closed error first: the model is the problem
    with pytest.raises(ag.ModelClosedError):
        model.generate("not pixels")
    assert issubclass(ag.ModelClosedError, ag.BackendError) and issubclass(
        ag.ModelClosedError, ag.AutoGazeError
    )
    model.close()  # twice is fine
    # a new model from the same files gives the same answer
    with _fresh(backend) as again:
        _same(again.generate(pv, gazing_ratio=0.05), want)
    assert again.closed


def test_with_block_closes_even_on_error(backend):
    with pytest.raises(ag.InputError), _fresh(backend) as model:
        model.generate(np.zeros((1, 1, 4, 8, 8), np.float32))
    assert model.closed
    with pytest.raises(ag.ModelClosedError):
        model.embed(_pixels(2))


def test_dropped_sessions_are_not_kept_alive(backend):
    model = _fresh(backend)
    session = model.stream(1, gazing_ratio=0.05)
    ref = weakref.ref(session)
    del session
    gc.collect()
    assert ref() is None and len(model._sessions) == 0
    model.close()


# ---------------------------------------------------------------------------------------------
# KeyboardInterrupt
def _interrupted(call, after_s: float):
    """Runs call() with SIGALRM raising KeyboardInterrupt after ``after_s``. Returns None when
    the interrupt reached the caller, else the call's result (it finished first)."""

    def handler(signum, frame):
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, after_s)
    try:
        return call()
    except KeyboardInterrupt:
        return None
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@pytest.mark.skipif(not hasattr(signal, "setitimer"), reason="needs SIGALRM")
def test_keyboard_interrupt_propagates_and_leaves_no_stale_state(backend):
    """The interrupt reaches the caller, and the next calls give the uninterrupted answers.

    reference: a fresh generator per call; torch: a cached DecodeState is reset when a call
    takes it from the cache (and handed back in a ``finally``), its per-frame state at every
    frame; wgpu: the native call runs with the GIL released, so the interrupt is raised when it
    returns."""
    model = load_model(backend)
    long_pv = _pixels(7, T=2)
    small = _pixels(8)
    want_small = model.generate(small, gazing_ratio=0.05)
    t0 = time.perf_counter()
    want_long = model.generate(long_pv, gazing_ratio=0.3)
    long_s = time.perf_counter() - t0
    if backend != "wgpu":
        import torch

        tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    # an interrupt inside the call: in its first fifth, earlier while this busy machine runs
    # the call faster than it did the first time (each call that wins the race must be right)
    delay = min(0.5, long_s / 5)
    for _ in range(8):
        out = _interrupted(lambda: model.generate(long_pv, gazing_ratio=0.3), delay)
        if out is None:
            break
        _same(out, want_long)
        delay /= 4
    else:
        pytest.fail("the call always finished before the interrupt")
    _same(model.generate(small, gazing_ratio=0.05), want_small)
    _same(model.generate(long_pv, gazing_ratio=0.3), want_long)
    if backend != "wgpu":
        # the process-wide TF32 switch is restored and its lock released
        from autogaze_wgpu.backends.reference import _TF32_LOCK

        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == tf32
        assert _TF32_LOCK.acquire(blocking=False)
        _TF32_LOCK.release()


def test_keyboard_interrupt_inside_the_torch_decode_loop():
    """Deterministic: the interrupt is raised in the middle of a frame's decode steps, where
    the cached DecodeState holds a half-finished frame."""
    from autogaze_wgpu.backends import torch_backend

    model = ag.AutoGaze.from_pretrained(MODEL_DIR, backend="torch", device="cpu")
    pv = _pixels(9, T=2)
    want = model.generate(pv, gazing_ratio=0.3)
    real = torch_backend.DecodeState._decode_step
    calls = []

    def flaky(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    torch_backend.DecodeState._decode_step = flaky
    try:
        with pytest.raises(KeyboardInterrupt):
            model.generate(pv, gazing_ratio=0.3)
    finally:
        torch_backend.DecodeState._decode_step = real
    assert len(calls) == 5
    _same(model.generate(pv, gazing_ratio=0.3), want)


# ---------------------------------------------------------------------------------------------
# memory estimates
def _huge_view(shape) -> np.ndarray:
    """A (B, T, 3, H, W) float32 view that allocates nothing (every element is one zero)."""
    return np.broadcast_to(np.zeros((1, 1, 3, 1, 1), np.float32), shape)


def _refused_quickly(call, words):
    t0 = time.perf_counter()
    with pytest.raises(ag.DeviceError) as ei:
        call()
    assert time.perf_counter() - t0 < QUICK_S
    msg = str(ei.value)
    for w in words:
        assert w in msg, f"{w!r} not in {msg!r}"
    return msg


def test_huge_frames_are_refused_before_copying(backend):
    model = load_model(backend)
    x = _huge_view((1, 4, 3, 100_000, 100_000))  # 447 GiB as float32
    words = ["(1, 4, 3, 100000, 100000)", "447.0 GiB", "available", "needs about"]
    _refused_quickly(lambda: model.generate(x, gazing_ratio=0.1), words)
    _refused_quickly(lambda: model.embed(x), words)
    _refused_quickly(
        lambda: model.stream(4, gazing_ratio=0.1).step(x[0][:, None]), ["(4, 1, 3, 100000, 100000)"]
    )
    import torch

    t = torch.zeros(1, 1, 3, 1, 1).expand(1, 4, 3, 100_000, 100_000)  # a torch view, no storage
    _refused_quickly(lambda: model.generate(t, gazing_ratio=0.1), words)
    # the model is still fine
    _same(
        model.generate(_pixels(3), gazing_ratio=0.05), model.generate(_pixels(3), gazing_ratio=0.05)
    )


def _host_checked(backend: str) -> bool:
    """Whether this backend's own buffers are checked against host memory here (wgpu: on a
    CPU adapter, host memory is one of its limits)."""
    if backend == "wgpu":
        return memory._wgpu_adapter_is_cpu()
    return os.environ.get("AUTOGAZE_TEST_DEVICE", "cpu") == "cpu"


def _memory_checked(backend: str) -> bool:
    """Whether this backend's calls are checked against a known memory size here."""
    if backend == "wgpu":
        return _host_checked(backend) or load_model("wgpu").backend.memory_available()["bytes"] is not None
    return _host_checked(backend)


def test_calls_that_cannot_fit_are_refused_with_the_numbers(backend):
    if not _memory_checked(backend):
        pytest.skip("this adapter's memory size is not known (the engine's own checks apply)")
    model = load_model(backend)
    # tiny frames, but 4096 rows x 300 frames: the KV cache alone is ~1.6 TiB
    x = _huge_view((4096, 300, 3, 1, 1))
    msg = _refused_quickly(
        lambda: model.generate(x, gazing_ratio=0.1),
        [
            "generate on (4096, 300, 3, 1, 1) with up to 26 gazes per frame",
            "KV cache",
            "TiB",
            "available",
        ],
    )
    # wgpu: the smaller of the device's memory and (CPU adapter) host memory
    assert ("GPU memory" in msg or "host memory" in msg) if backend == "wgpu" else "host memory" in msg
    _refused_quickly(
        lambda: model.embed(_huge_view((100_000, 16, 3, 1, 1))),
        ["embed on", "model input", "available"],
    )


def test_wgpu_memory_estimates_equal_what_the_engine_allocates():
    """The wgpu engine's estimate of each call (generate, embed, score, raw uint8 frames, a
    stream's session) equals the bytes of the buffers it then creates (the engine counts
    them); each call has a new frame size, so each needs a new workspace."""
    model = _fresh("wgpu")
    eng, be = model.backend.engine, model.backend

    def created(call):
        before = eng._allocated_bytes
        call()
        return eng._allocated_bytes - before

    V = model.config.num_vision_tokens_each_frame
    x = _pixels(1, T=2, size=36)
    est = be.memory_estimate(x.shape, [13, 13], "generate")
    assert created(lambda: model.generate(x, gazing_ratio=13 / V)) == est["total"], est
    assert created(lambda: model.generate(x, gazing_ratio=13 / V)) == 0  # the cached workspace
    x = _pixels(2, T=3, B=2, size=44)
    est = be.memory_estimate(x.shape, None, "embed")
    assert created(lambda: model.embed(x)) == est["total"], est
    x = _pixels(3, T=2, size=52)
    out = model.generate(x, gazing_ratio=0.05)
    lens = [int(n) for n in out.num_gazing_each_frame]
    est = be.memory_estimate(x.shape, lens, "score")
    # generate above already made a workspace of this frame size, but a smaller cache: score
    # needs a new one
    assert created(lambda: model.score(x, out)) == est["total"], est
    proc = ag.AutoGazeProcessor.from_pretrained(MODEL_DIR)
    frames = np.random.default_rng(0).integers(0, 256, (1, 2, 60, 90, 3), dtype=np.uint8)
    raw = proc.raw(frames)
    est = be.memory_estimate(raw.shape, [13, 13], "generate", frames.shape[2:4])
    assert created(lambda: model.generate(raw, gazing_ratio=13 / V)) == est["total"], est
    est = eng.estimate_session(1, 16, 30, 30)
    s = model.stream(gazing_ratio=0.05)
    assert created(lambda: s.step(_pixels(4, size=30))) == est["total"], est


def test_wgpu_calls_beyond_the_device_memory_are_refused_before_allocating():
    """An absurd call is refused with DeviceError naming the engine's estimate and the
    available bytes, before the engine creates a buffer; with the device's free memory
    simulated at 64 MiB, a clip of 8 x 8 frames (~190 MiB of KV cache) is refused the same
    way, an unbounded stream shrinks its session to fit (1024 frames -> 256 -> 64 -> 16), and
    a small call still runs. The model works afterwards."""
    model = _fresh("wgpu")
    eng, be = model.backend.engine, model.backend
    before = eng._allocated_bytes
    x = _huge_view((4096, 300, 3, 1, 1))
    est = be.memory_estimate(x.shape, [26] * 300, "generate")
    avail = be.memory_available()
    msg = _refused_quickly(
        lambda: model.generate(x, gazing_ratio=0.1),
        ["generate on (4096, 300, 3, 1, 1)", f"({est['total']} bytes)", "KV cache (4 layers)"],
    )
    shown = int(msg.split("is available (")[1].split(" bytes)")[0])
    assert 0 < shown <= (avail["bytes"] or shown) and shown < est["total"], msg
    eng._simulate_free_device_memory(64 << 20)
    try:
        clip = _pixels(5, T=8, B=8, size=8)
        need = be.memory_estimate(clip.shape, [265] * 8, "generate")["total"]
        assert need > 64 << 20
        _refused_quickly(
            lambda: model.generate(clip, gazing_ratio=1.0),
            [f"({need} bytes)", "is available (67108864 bytes)", "GPU memory", ": simulated)"],
        )
        assert eng._allocated_bytes == before, "nothing was allocated"
        stream = model.stream(gazing_ratio=0.05, horizon=None)
        stream.step(_pixels(6, size=24))
        assert stream._state.session.max_frames == 16  # 1024 and 256: bindings; 64: memory
        small = _pixels(7, size=20)
        model.generate(small, gazing_ratio=0.05)
    finally:
        eng._simulate_free_device_memory(None)
    _same(model.generate(small, gazing_ratio=0.05), _fresh("wgpu").generate(small, gazing_ratio=0.05))


def test_refusal_names_the_available_amount(backend, monkeypatch):
    if not _host_checked(backend):
        pytest.skip("this adapter's memory size is not known (the engine's own checks apply)")
    model = load_model(backend)
    pv = _pixels(4)
    want = model.generate(pv, gazing_ratio=0.05)
    monkeypatch.setattr(memory, "available_host_bytes", lambda: 1 << 20)  # 1 MiB left
    _refused_quickly(
        lambda: model.generate(pv, gazing_ratio=0.05),
        ["needs about", "but only 1.0 MiB is available", "KV cache"],
    )
    monkeypatch.undo()
    _same(model.generate(pv, gazing_ratio=0.05), want)


def test_estimate_parts():
    cfg = ag.AutoGazeConfig.from_pretrained(MODEL_DIR)
    p = memory.estimate_call_bytes(cfg, (1, 16, 3, 224, 224), [198] * 16)
    assert p["input"] == 16 * 3 * 224 * 224 * 4 and p["model input"] == 0
    # 4 layers x K and V x 16 frames of (196 + 198 + 10) tokens (+ 20) x 192 channels x 4 bytes
    assert p["KV cache"] == 4 * 2 * (16 * 404 + 20) * 192 * 4
    assert sum(p.values()) < 200 << 20  # the default clip needs ~120 MiB, not gigabytes
    assert set(memory.estimate_call_bytes(cfg, (1, 1, 3, 8, 8), kind="embed")) == {
        "input",
        "model input",
        "vision activations",
    }
    assert memory.fmt_bytes(1536) == "1.5 KiB" and memory.fmt_bytes(3) == "3 bytes"


# ---------------------------------------------------------------------------------------------
# several models on one device
def test_two_models_on_one_device_alternately_and_from_threads(backend):
    a, b = _fresh(backend), _fresh(backend)
    inputs = [_pixels(400 + i) for i in range(4)]
    serial = [a.generate(x, gazing_ratio=0.05) for x in inputs]
    for i, x in enumerate(inputs):  # alternately
        _same((a if i % 2 else b).generate(x, gazing_ratio=0.05), serial[i])
    barrier = threading.Barrier(len(inputs))

    def call(i):
        barrier.wait(timeout=120)
        return (a, b)[i % 2].generate(inputs[i], gazing_ratio=0.05)

    with ThreadPoolExecutor(max_workers=len(inputs)) as pool:
        results = [
            f.result(timeout=300) for f in [pool.submit(call, i) for i in range(len(inputs))]
        ]
    for got, want in zip(results, serial):
        _same(got, want)
    # closing one leaves the other working
    a.close()
    _same(b.generate(inputs[0], gazing_ratio=0.05), serial[0])
    b.close()


# ---------------------------------------------------------------------------------------------
# tiles larger than the frame
@pytest.mark.parametrize(
    "mode, kw, tiles",
    [
        ("tiled_full", {}, (1, 1)),  # one 224 tile, zero-padded around a 100x60 frame
        ("tiled_full", {"tile_stride": 100}, (1, 1)),
        ("tiled", {}, (1, 1)),  # round(100/224) = 0 -> at least one tile, upscaled
        ("tiled", {"tile_grid": (2, 3)}, (2, 3)),  # 6 tiles cut from a 448x672 upscale
        ("resize", {}, (1, 1)),
    ],
)
def test_tiles_larger_than_the_frame(backend, mode, kw, tiles):
    model = load_model(backend)
    H, W = 100, 60
    frames = synthetic_video(num_frames=1, height=H, width=W, seed=5)
    res = model(frames, mode=mode, gazing_ratio=0.05, confidence=False, **kw)
    assert res.layout.tiles_shape == tiles
    fx = res.fixations
    assert len(fx) > 0
    # every gaze lies in the frame and covers at least one source pixel
    assert ((fx["x0"] >= 0) & (fx["y0"] >= 0) & (fx["x1"] <= W) & (fx["y1"] <= H)).all()
    assert ((fx["x0"] < fx["x1"]) & (fx["y0"] < fx["y1"])).all()
    assert res.num_gazes[0] == len(fx)
    if mode == "tiled_full":
        # cells wholly in the zero padding are not counted and their gazes are dropped
        assert res.layout.tokens_available < 265
        assert res.num_gazes[0] + res.num_dropped.sum() == res.num_real.sum()


@pytest.mark.parametrize("mode", ["resize", "tiled"])
@pytest.mark.parametrize("H, W", [(5, 7), (1, 1), (13, 200)])
def test_frames_smaller_than_the_grid_give_whole_pixel_boxes(mode, H, W):
    """Cells under a pixel wide (a 5x7 frame has 14 cells a side) map to the pixel holding
    them: no empty boxes (the mapping is the same for every backend)."""
    frames = synthetic_video(num_frames=1, height=H, width=W, seed=6)
    res = load_model("reference")(frames, mode=mode, gazing_ratio=0.5, confidence=False)
    fx = res.fixations
    assert len(fx) > 0
    assert ((fx["x0"] >= 0) & (fx["y0"] >= 0) & (fx["x1"] <= W) & (fx["y1"] <= H)).all()
    assert ((fx["x0"] < fx["x1"]) & (fx["y0"] < fx["y1"])).all()
    assert res.pixel_mask(0).any()


def test_wgpu_device_lost_says_reload_and_a_reload_works():
    """Device loss (driver reset, GPU removed), injected: every later call on that model is a
    DeviceError saying to load it again, streams too; a freshly loaded model works."""
    model = _fresh("wgpu")
    x = _pixels(3)
    before = model.generate(x, gazing_ratio=0.05)
    session = model.stream(gazing_ratio=0.05)
    model.backend.engine._simulate_device_lost()
    for call in (
        lambda: model.generate(x, gazing_ratio=0.05),
        lambda: model.embed(x),
        lambda: session.step(x[:, :1]),
        lambda: model.stream(gazing_ratio=0.05).step(x[:, :1]),
    ):
        with pytest.raises(ag.DeviceError, match="load it again"):
            call()
    _same(_fresh("wgpu").generate(x, gazing_ratio=0.05), before)


def test_wgpu_out_of_memory_fails_the_call_and_the_model_stays_usable():
    """GPU out of memory while a call allocates (injected): that call is a DeviceError naming
    what was being allocated; the same model then gives the undisturbed results."""
    model = _fresh("wgpu")
    small, big = _pixels(4), _pixels(5, T=2, B=2, size=40)
    want_small = model.generate(small, gazing_ratio=0.05)
    model.backend.engine._simulate_oom_on_next_allocation()
    with pytest.raises(ag.DeviceError, match="out of GPU memory while allocating"):
        model.generate(big, gazing_ratio=0.05)  # a new shape: a new workspace is allocated
    _same(model.generate(big, gazing_ratio=0.05), _fresh("wgpu").generate(big, gazing_ratio=0.05))
    _same(model.generate(small, gazing_ratio=0.05), want_small)
