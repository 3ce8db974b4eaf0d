"""The torch backend's fused decode step (``backends/triton_decode.py``) against the eager
step and the reference. On CPU (CI) the Triton kernels run under Triton's interpreter
(conftest sets TRITON_INTERPRET=1); AUTOGAZE_TEST_DEVICE=cuda runs them compiled on the GPU,
inside CUDA graphs."""

from __future__ import annotations

import os
import subprocess
import sys
import zlib

import autogaze_wgpu as ag
import numpy as np
import pytest
from conftest import MODEL_DIR, case_pixel_values

torch = pytest.importorskip("torch")
try:  # through the package's loader: a bare `import triton` after lavapipe crashes
    from autogaze_wgpu.backends.torch_backend import load_triton_decode

    load_triton_decode()
except ImportError:  # pragma: no cover - CI installs triton with torch
    pytest.skip("needs triton", allow_module_level=True)
DEVICE = os.environ.get("AUTOGAZE_TEST_DEVICE", "cpu")


def _model(kernels: str):
    return ag.AutoGaze.from_pretrained(MODEL_DIR, backend="torch", device=DEVICE, decode_kernels=kernels)


@pytest.fixture(scope="module")
def fused():
    m = _model("triton")
    assert m.backend.fused is not None
    return m


@pytest.fixture(scope="module")
def eager():
    m = _model("torch")
    assert m.backend.fused is None
    return m


def test_decode_kernels_choice_and_errors():
    if DEVICE == "cpu":  # auto: the eager step off CUDA
        assert _model("auto").backend.fused is None
    else:
        assert _model("auto").backend.fused is not None
        bf16 = ag.AutoGaze.from_pretrained(MODEL_DIR, backend="torch", device=DEVICE, precision="bf16")
        assert bf16.backend.fused is None  # bf16 keeps the eager step (its bf16 GEMMs)
    with pytest.raises(ag.InputError, match="decode_kernels must be one of"):
        _model("cuda")
    with pytest.raises(ag.InputError, match="takes no option 'decode_kernels'"):
        ag.AutoGaze.from_pretrained(MODEL_DIR, backend="reference", decode_kernels="torch")


def test_triton_ieee_makes_every_product_an_fma(fused):
    """decode_kernels="triton-ieee": the same kernels with every tl.dot in IEEE float32;
    the default mixes in 3xTF32 where it was faster, and its settings name only those two.
    The fast mode precision="tf32" (on CUDA by default; here under the interpreter) takes
    the kernels with every product one TF32 pass; "triton-ieee" still means FMAs there."""
    from autogaze_wgpu.backends.triton_decode import FusedDecoder

    names = [n for n in dir(FusedDecoder) if n.endswith("_PRECISION")]
    assert set(names) == {n for n in FusedDecoder.IEEE_SETTINGS if n.endswith("_PRECISION")}
    assert set(names) == set(FusedDecoder.TF32_SETTINGS)
    assert {getattr(fused.backend.fused, n) for n in names} <= {"ieee", "tf32x3"}
    assert fused.backend.fused.products == "auto"
    strict = _model("triton-ieee").backend.fused
    assert strict.products == "ieee" and {getattr(strict, n) for n in names} == {"ieee"}
    fast = lambda kernels: ag.AutoGaze.from_pretrained(  # noqa: E731
        MODEL_DIR, backend="torch", device=DEVICE, precision="tf32", decode_kernels=kernels).backend.fused
    tf32 = fast("triton")
    assert tf32.products == "tf32" and {getattr(tf32, n) for n in names} == {"tf32"}
    assert fast("triton-ieee").products == "ieee"
    if DEVICE != "cpu":
        assert fast("auto").products == "tf32"
    with pytest.raises(ValueError, match="products must be one of"):
        FusedDecoder(fused.backend, products="bf16")


def test_products_are_float32_accurate(fused):
    """Both tl.dot precisions the kernels use are float32-accurate: within a few times
    cuBLAS's float32 error against float64 (3xTF32 drops the low x low product, ~2^-22
    relative), far from TF32's (10-bit operands, the fast mode's) on a GPU."""
    err = fused.backend.fused.product_errors()
    assert 0 < err["torch float32"] < 1e-4
    assert err["ieee"] <= 4 * err["torch float32"]
    assert err["tf32x3"] <= 8 * err["torch float32"]
    if DEVICE != "cpu":
        assert err["torch tf32"] > 50 * err["tf32x3"]
        assert err["tf32"] > 50 * err["tf32x3"]  # the fast mode's kernels: TF32, not float32


def test_triton_on_cpu_without_the_interpreter_is_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ag.BackendError, match="runs on CUDA devices"):
        ag.AutoGaze.from_pretrained(MODEL_DIR, backend="torch", device="cpu", decode_kernels="triton")


def _state_pair(fused_be, eager_be, B, seed, scenario):
    """Two DecodeStates (fused, eager) in the same mid-frame state: a cache of L random
    keys/values, the heads' outputs of the last step, and the frame's bookkeeping."""
    from autogaze_wgpu.reference.modeling import rope_cos_sin

    g = torch.Generator().manual_seed(seed)
    L, cap = 300, 512
    a = fused_be.acquire_state(B, cap)
    b = eager_be.acquire_state(B, cap)
    K, V = a.K, a.V
    dev = a.k_cache.device
    rnd = lambda *s: torch.randn(*s, generator=g).to(dev)
    a.k_cache[:, :, :, :L] = rnd(*a.k_cache[:, :, :, :L].shape)
    a.v_cache[:, :, :, :L] = rnd(*a.v_cache[:, :, :, :L].shape)
    a.key_mask[:, :L] = (torch.rand(B, L, generator=g) > 0.2).to(dev)
    a.key_mask[:, 0] = True
    a.logits.copy_(rnd(B, K, V) * 3)
    # Row 0 meets the requirement at slot 5 (it finishes, later slots keep their tokens);
    # row 1 would meet at slot 0, which never meets in a frame's first step.
    tl_pred = torch.ones(B, K)
    tl_pred[0, 5], tl_pred[1, 0] = 0.5, 0.6
    a.task_loss.copy_(tl_pred)
    a.decode_pos.copy_(torch.arange(L - K, L)[None].expand(B, K))
    a.chosen.zero_()
    a.finished.zero_()
    a.n_frame.fill_(20)
    a.cache_len.fill_(L)
    a.done.fill_(False)
    a.first.fill_(scenario == "first")
    a.budget.fill_(198)
    a.has_requirement.fill_(scenario not in ("no-requirement", "exhausted", "finished-exhausted"))
    a.requirement.fill_(0.7)
    if scenario in ("exhausted", "finished-exhausted"):
        # row 0 has 4 ids left: an unfinished row with k ids left is exhausted at head k
        a.chosen[0] = True
        a.chosen[0, torch.tensor([3, 50, 100, 264])] = False
        if scenario == "finished-exhausted":  # a finished row never exhausts the batch
            a.finished[0] = True
    if scenario == "budget":
        a.n_frame.fill_(198 - 3)
    if scenario == "done":
        a.done.fill_(True)
    cos, sin = rope_cos_sin(fused_be.model.gaze_decoder.model.inv_freq, a.decode_pos)
    a.rope_cos.copy_(cos)
    a.rope_sin.copy_(sin)
    for t_a, t_b in zip(a._state_tensors(), b._state_tensors(), strict=True):
        t_b.copy_(t_a)
    b.decode_pos.copy_(a.decode_pos)
    b.budget.copy_(a.budget)
    b.requirement.copy_(a.requirement)
    b.has_requirement.copy_(a.has_requirement)
    b.kv_len = cap
    return a, b


@pytest.mark.parametrize(
    "scenario", ["plain", "first", "no-requirement", "exhausted", "finished-exhausted", "budget", "done", "batch"]
)
def test_fused_step_equals_the_eager_step(fused, eager, scenario):
    # "batch": 7 rows (70 token rows, past FusedDecoder.FEW_ROWS): on a GPU the batch tiles
    # and attention splits; otherwise as "plain"
    B = 7 if scenario == "batch" else 3
    a, b = _state_pair(fused.backend, eager.backend, B, seed=zlib.crc32(scenario.encode()) % 1000, scenario=scenario)
    with torch.no_grad():
        a._decode_step()
        b._decode_step()
    n, L = int(b.n_frame), int(b.cache_len)
    for name in ("n_frame", "cache_len", "done", "first", "finished"):
        assert torch.equal(getattr(a, name), getattr(b, name)), (scenario, name, getattr(a, name), getattr(b, name))
    assert torch.equal(a.frame_tokens[:, :n], b.frame_tokens[:, :n]), scenario
    assert torch.equal(a.chosen[:, : a.pad], b.chosen[:, : b.pad]), scenario
    assert torch.equal(a.key_mask[:, :L], b.key_mask[:, :L]), scenario
    ran = L > 300
    assert ran == (scenario not in ("exhausted", "budget", "done")), scenario
    if ran:  # the step's tokens went through the decoder: K/V and the heads agree to float32
        # noise over 4 layers on a random cache (SPEC's step-logit tolerance is 1e-3); layer 0
        # (embedding -> RMSNorm -> q/k/v -> RoPE) is one product deep.
        # A row whose step tokens are all pad (finished before the step) skips its attention
        # in the fused step (FusedDecoder.SKIP_PAD_ROWS): what its later layers compute is
        # never read (its slots are masked once the frame ends, its choices are pad).
        live = ~(a.fused_buffers["ids"] == a.pad).all(-1)
        assert bool(live.all()) == (scenario != "finished-exhausted"), scenario
        for x, y in ((a.k_cache, b.k_cache), (a.v_cache, b.v_cache)):
            torch.testing.assert_close(x[0, :, :, :L], y[0, :, :, :L], atol=1e-5, rtol=0)
            torch.testing.assert_close(x[:, live, :, :L], y[:, live, :, :L], atol=1e-3, rtol=0)
            torch.testing.assert_close(x[:, ~live, :, : L - a.K], y[:, ~live, :, : L - a.K], atol=0, rtol=0)
        if not live.all():  # the skip happened: the finished row's deeper keys are not the eager step's
            assert not torch.allclose(a.k_cache[1:, ~live, :, L - a.K : L], b.k_cache[1:, ~live, :, L - a.K : L])
        torch.testing.assert_close(a.logits[live], b.logits[live], atol=1e-3, rtol=0)
        torch.testing.assert_close(a.task_loss[live], b.task_loss[live], atol=5e-5, rtol=0)
    fused.backend.release_state(a)
    eager.backend.release_state(b)


def test_fused_generate_equals_the_reference(fused):
    # batch 2 of frames (0, 10) and (8, 14) of case a: each row's task-loss stop comes at
    # another slot
    a = case_pixel_values("a")
    pv = np.concatenate([a[:, [0, 10]], a[:, [8, 14]]], 0)
    ref = ag.AutoGaze.from_pretrained(MODEL_DIR, backend="reference", device=DEVICE)
    # Few slots per frame: the interpreter takes ~1 s per decode step on CI's CPU. The step
    # test above covers the rules this clip does not reach (exhaustion, budget, no requirement).
    kw = {"gazing_ratio": 0.1, "task_loss_requirement": 0.7}
    got, want = fused.generate(pv, **kw), ref.generate(pv, **kw)
    assert want.if_padded_gazing.any()  # the task-loss stop happened
    np.testing.assert_array_equal(got.num_gazing_each_frame, want.num_gazing_each_frame)
    np.testing.assert_array_equal(got.gazing_pos, want.gazing_pos)
    np.testing.assert_array_equal(got.if_padded_gazing, want.if_padded_gazing)


def test_fused_stream_equals_the_clip(fused):
    pv = case_pixel_values("a")[:, :2]
    kw = {"gazing_ratio": 0.05, "task_loss_requirement": 0.7}
    clip = fused.generate(pv, **kw)
    s = fused.stream(batch_size=1, **kw)
    tokens = [s.step(pv[:, t : t + 1]).frame_tokens[0] for t in range(2)]
    for got, want in zip(tokens, clip.frame_tokens, strict=True):
        np.testing.assert_array_equal(got, want)


def test_triton_loads_after_lavapipe_in_one_process():
    """libtriton's LLVM next to Mesa's (loaded with lavapipe when wgpu enumerates adapters):
    a bare import crashed the interpreter (CI's full suite did); the package's loader must
    not."""
    code = (  # (a machine without Vulkan adapters loads no driver: nothing to clash with)
        "import autogaze_wgpu._native as n\ntry: n.wgpu_adapter_info()\nexcept Exception: pass\n"
        "from autogaze_wgpu.backends.torch_backend import load_triton_decode; load_triton_decode(); print('ok')"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), (r.returncode, r.stderr[-2000:])


_DECODE_STATE = ("decode_pos", "rope_cos", "rope_sin", "key_mask", "chosen", "n_frame", "done")
_baseline: dict = {}  # run 0 of _prefill_twice (the default settings), computed once


def _prefill_run(be, emb) -> dict:
    """2 frames of ``emb`` (2 rows, 26 slots a frame) on a fresh state under the settings in
    force: its tokens, and copies of its cache, heads and decode state."""
    be.close()  # no cached state (and its graphs) from an earlier run
    st = be.acquire_state(2, be.capacity(2, [26, 26]))
    with torch.no_grad():
        tokens = [st.frame(emb[:, t], 26, 0.7) for t in range(2)]
    L = int(st.cache_len)
    out = {"tokens": tokens, "L": L, "k": st.k_cache[:, :, :, :L].clone(), "v": st.v_cache[:, :, :, :L].clone(),
           "logits": st.logits.clone(), "task_loss": st.task_loss.clone()}
    out.update({name: getattr(st, name).clone() for name in _DECODE_STATE})
    be.release_state(st)
    be.close()
    return out


def _prefill_twice(be, setup):
    """Two runs of 2 frames x 2 rows (case a and its reverse, 26 slots a frame) on fresh
    states, ``setup(run)`` (run 0, then 1) before each, so each captures its own graphs; the
    second frame's prefill runs the first's pending step. Checks that both runs give the same
    tokens, the same cache and heads to float32 noise and the same decode state. Run 0 is
    the default settings for every caller (a 2-row prefill is below every large-batch
    threshold), so it runs once per module: the interpreter takes minutes per run."""
    pv = case_pixel_values("a")[:, :2]
    emb = be.embed(np.concatenate([pv, pv[:, ::-1]]))
    setup(0)
    key = id(be)
    if key not in _baseline:
        _baseline.clear()
        _baseline[key] = _prefill_run(be, emb)
    a = _baseline[key]
    setup(1)
    b = _prefill_run(be, emb)
    for x, y in zip(a["tokens"], b["tokens"], strict=True):
        assert torch.equal(x, y)
    assert a["L"] == b["L"] and a["L"] > 400
    torch.testing.assert_close(a["k"], b["k"], atol=1e-3, rtol=0)
    torch.testing.assert_close(a["v"], b["v"], atol=1e-3, rtol=0)
    torch.testing.assert_close(a["logits"], b["logits"], atol=1e-3, rtol=0)
    torch.testing.assert_close(a["task_loss"], b["task_loss"], atol=5e-5, rtol=0)
    for name in _DECODE_STATE:
        assert torch.equal(a[name], b[name]), name


def test_prefill_with_cublas_gemms_equals_the_triton_prefill(fused, monkeypatch):
    """A large batch's prefill (PREFILL_TORCH_GEMM_ROWS) runs the layers' GEMMs through torch
    (cuBLAS on a GPU) around the Triton attention: the same cache, heads and decode state as
    the all-Triton prefill, to float32 noise; and a clip through it gives the reference's
    tokens."""
    be = fused.backend
    calls, real = [], type(be.fused).prefill_attention
    monkeypatch.setattr(type(be.fused), "prefill_attention", lambda *a: calls.append(1) or real(*a))
    # all Triton, then torch GEMMs from any size
    _prefill_twice(be, lambda run: monkeypatch.setattr(type(be.fused), "PREFILL_TORCH_GEMM_ROWS", (1 << 30, 0)[run]))
    assert len(calls) == 2 * 4  # the second run's two prefills, one call a layer
    pv = case_pixel_values("a")[:, :2]
    ref = ag.AutoGaze.from_pretrained(MODEL_DIR, backend="reference", device=DEVICE)
    kw = {"gazing_ratio": 0.1, "task_loss_requirement": 0.7}
    got, want = fused.generate(pv, **kw), ref.generate(pv, **kw)
    np.testing.assert_array_equal(got.gazing_pos, want.gazing_pos)
    np.testing.assert_array_equal(got.if_padded_gazing, want.if_padded_gazing)


@pytest.mark.parametrize("attention", ["flash", "split"])
def test_batch_prefill_tiles_equal_the_small_prefill(fused, monkeypatch, attention):
    """A large batch's prefill (BATCH_PREFILL_ROWS) takes other tiles: GEMMs in 64 x 64
    tiles and 3xTF32 attention in 64-query blocks on a GPU, either every key in one program
    (``_flash_attention``, the default) or split-K with merges whose query blocks nest in the
    attention's (here 1/8 of them, also under the interpreter). Forced on for 2 rows, it
    gives the same cache, heads and tokens as the small batch's settings, to float32 noise."""
    from autogaze_wgpu.backends import triton_decode

    be = fused.backend
    launches = []
    real = triton_decode._flash_attention

    class Counted:  # counts _flash_attention's launches
        def __getitem__(self, grid):
            return lambda *a, **k: launches.append(grid) or real[grid](*a, **k)

    monkeypatch.setattr(triton_decode, "_flash_attention", Counted())

    def setup(run):  # the small batch's settings, then the large batch's for any size
        monkeypatch.setattr(be.fused, "BATCH_PREFILL_ROWS", (1 << 30, 0)[run])
        if run and attention == "flash":  # more key blocks: both of its loops run
            monkeypatch.setattr(be.fused, "BATCH_PREFILL_FLASH_BLOCK_N", 64)
        if run and attention == "split":
            monkeypatch.setattr(be.fused, "BATCH_PREFILL_FLASH_BLOCK_N", None)
            monkeypatch.setattr(be.fused, "PREFILL_MERGE_BLOCK_Q", be.fused.BATCH_PREFILL_BLOCK_Q // 8)

    _prefill_twice(be, setup)
    # the second run's two prefills, one launch a layer
    assert len(launches) == (2 * 4 if attention == "flash" else 0)

