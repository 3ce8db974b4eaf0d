"""The torch backend's own machinery: tensors in without copies, fast modes, the decode-state
cache and streaming reuse. On CPU in CI; AUTOGAZE_TEST_DEVICE=cuda runs them on CUDA (graphs)."""

from __future__ import annotations

import gc
import os

import numpy as np
import pytest
from conftest import MODEL_DIR, case_pixel_values

import autogaze_wgpu as ag

torch = pytest.importorskip("torch")
DEVICE = os.environ.get("AUTOGAZE_TEST_DEVICE", "cpu")


@pytest.fixture(scope="module")
def torch_model():
    return ag.AutoGaze.from_pretrained(MODEL_DIR, backend="torch", device=DEVICE)


def _spy_embed(monkeypatch, model) -> list:
    """Records the data pointer of every video tensor the vision encoder receives."""
    seen = []
    real = model.backend.model.embed

    def spy(video, *a, **k):
        seen.append(video.data_ptr())
        return real(video, *a, **k)

    monkeypatch.setattr(model.backend.model, "embed", spy)
    return seen


def test_host_pixels_are_checked_on_the_models_cuda_device(torch_model, monkeypatch):
    from autogaze_wgpu import inputs
    from autogaze_wgpu.inputs import as_pixel_values

    pv = case_pixel_values("a")[:, :2]
    dev = torch_model._input_device
    if DEVICE == "cuda":  # numpy and CPU tensors go to the GPU first, and are checked there
        for x in (pv, torch.from_numpy(pv)):
            y = as_pixel_values(x, dev)
            assert isinstance(y, torch.Tensor) and y.device.type == "cuda"
            np.testing.assert_array_equal(y.cpu().numpy(), pv)
        # through the pinned staging buffers: several chunks, the last one short
        monkeypatch.setattr(inputs, "_UPLOAD_CHUNK", 4 * 100_003)
        for _ in range(2):  # the second call reuses the buffers
            y = as_pixel_values(pv, dev)
            np.testing.assert_array_equal(y.cpu().numpy(), pv)
    else:
        assert dev is None and isinstance(as_pixel_values(pv, dev), np.ndarray)
    for value in (np.nan, np.inf, -np.inf):
        bad = pv.copy()
        bad[0, 1, 2, 7, 9] = value
        with pytest.raises(ag.InputError, match="NaN or Inf"):
            torch_model.generate(bad, gazing_ratio=0.05)
        with pytest.raises(ag.InputError, match="NaN or Inf"):
            torch_model.stream(1, gazing_ratio=0.05).step(bad[:, 1:2])
    big = pv.astype(np.float64)
    big[0, 0, 0, 0, 0] = 1e300  # finite, but Inf in float32
    with pytest.raises(ag.InputError, match="beyond float32's range"):
        torch_model.embed(big)


def test_tensor_on_the_model_device_is_not_copied(torch_model, monkeypatch):
    seen = _spy_embed(monkeypatch, torch_model)
    pv = case_pixel_values("a")[:, :2]
    x = torch.from_numpy(pv.copy()).to(DEVICE)  # contiguous float32 on the model's device
    out = torch_model.generate(x, gazing_ratio=0.05)
    torch_model.embed(x[0])  # (T, 3, H, W): a view of the same memory
    assert seen == [x.data_ptr(), x.data_ptr()]
    # A numpy array is wrapped, not copied, on CPU (moved once to a GPU); other dtypes are
    # converted once.
    np.testing.assert_array_equal(torch_model.generate(pv, gazing_ratio=0.05).gazing_pos, out.gazing_pos)
    if DEVICE == "cpu":
        assert seen[-1] == pv.__array_interface__["data"][0]
    np.testing.assert_array_equal(torch_model.generate(x.double(), gazing_ratio=0.05).gazing_pos, out.gazing_pos)
    assert len(seen) == 4 and seen[-1] != x.data_ptr()


def test_fast_modes_run_and_float32_stays_exact():
    pv = case_pixel_values("a")[:, :3]
    kw = {"gazing_ratio": 0.3, "task_loss_requirement": 0.7}
    ref = ag.AutoGaze.from_pretrained(MODEL_DIR, backend="reference", device=DEVICE).generate(pv, **kw)
    outs = {}
    for prec in ("float32", "tf32", "bf16"):
        model = ag.AutoGaze.from_pretrained(MODEL_DIR, backend="torch", device=DEVICE, precision=prec)
        assert model.precision == prec
        outs[prec] = out = model.generate(pv, **kw)
        T, budget = 3, 79
        assert out.gazing_pos.shape == (1, int(out.num_gazing_each_frame.sum()))
        assert out.num_gazing_each_frame.shape == (T,) and (out.num_gazing_each_frame <= budget).all()
        for tok in out.frame_tokens:  # ids in range, no repeats within a frame
            real = tok[tok != 265]
            assert ((real >= 0) & (real < 265)).all() and len(set(real.tolist())) == real.size
        assert [m.shape for m in out.gazing_mask] == [(1, T, 4), (1, T, 16), (1, T, 49), (1, T, 196)]
        assert out.num_real_gazes().sum() == (~out.if_padded_gazing).sum()
        assert model.embed(pv).dtype == np.float32
        s = model.score(pv, out)
        assert s.gaze_probs.dtype == np.float32 and np.isfinite(s.task_loss_prediction).all()
    np.testing.assert_array_equal(outs["float32"].gazing_pos, ref.gazing_pos)
    np.testing.assert_array_equal(outs["float32"].if_padded_gazing, ref.if_padded_gazing)
    if DEVICE == "cpu":  # TF32 is an NVIDIA tensor-core format: on CPU it is float32
        np.testing.assert_array_equal(outs["tf32"].gazing_pos, ref.gazing_pos)


def test_fast_mode_leaves_global_tf32_flags_alone():
    model = ag.AutoGaze.from_pretrained(MODEL_DIR, backend="torch", device=DEVICE, precision="tf32")
    seen = []
    real = model.backend.model.embed

    def spy(video, *a, **k):
        seen.append(torch.backends.cuda.matmul.allow_tf32)
        return real(video, *a, **k)

    model.backend.model.embed = spy
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    model.generate(case_pixel_values("a")[:, :1], gazing_ratio=0.05)
    assert seen == [True]
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before


def _run(stream, pv, budget, req):
    """Per-frame tokens, and the decode state each frame ran on."""
    tokens, states = [], []
    for t in range(pv.shape[1]):
        tokens.append(stream.step(pv[:, t : t + 1], budget, req))
        states.append(stream.state)
    return tokens, states


@pytest.mark.parametrize("max_frames", [None, 3])
def test_stream_reset_equals_fresh_session_and_reuses_states(torch_model, monkeypatch, max_frames):
    from autogaze_wgpu.backends.torch_backend import DecodeState

    be = torch_model.backend
    pv = np.concatenate([case_pixel_values("a")[:, :3]] * 2, 0)  # batch 2
    ratio, req = 0.151, 0.7
    budget = ag.inputs.gazing_budget(ratio, 265)  # 40
    built = []
    real_init = DecodeState.__init__

    def counting_init(self, *a, **k):
        built.append(self)
        real_init(self, *a, **k)

    monkeypatch.setattr(DecodeState, "__init__", counting_init)
    s = be.new_stream(2, max_frames=max_frames)
    first, st_first = _run(s, pv, budget, req)  # an unbounded stream grows on frame 3
    n_built = len(built)
    s.reset()
    again, st_again = _run(s, pv, budget, req)
    fresh_stream = be.new_stream(2, max_frames=max_frames)
    s.reset()  # hands its state back for the new session to take
    fresh, st_fresh = _run(fresh_stream, pv, budget, req)
    assert len(built) == n_built, "reset or a new session built new decode states"
    assert all(a is b is c for a, b, c in zip(st_first, st_again, st_fresh))
    assert (len({id(x) for x in st_first}) == 1) == (max_frames is not None)
    for a, b, c in zip(first, again, fresh):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)
    whole = torch_model.generate(pv, gazing_ratio=ratio, task_loss_requirement=req)
    for t, tok in enumerate(first):
        np.testing.assert_array_equal(tok, whole.frame_tokens[t])
    if max_frames is not None:  # the window's state has a clip's capacity: no growth
        assert fresh_stream.state.cap == -(-be.capacity(3, [budget] * 3) // 256) * 256


def test_state_cache_is_bounded(torch_model, monkeypatch):
    be = torch_model.backend
    be._states.clear()
    for cap in range(256, 256 * (be.MAX_CACHED_STATES + 4), 256):
        be.release_state(be.acquire_state(1, cap))
    assert len(be._states) == be.MAX_CACHED_STATES
    assert (1, 256) not in be._states  # the least recently used went first
    st = be.acquire_state(1, 256 * (be.MAX_CACHED_STATES + 3))  # a hit: taken out while in use
    assert len(be._states) == be.MAX_CACHED_STATES - 1
    be.release_state(st)
    monkeypatch.setattr(type(be), "MAX_CACHED_BYTES", 1)  # too small for any: the newest stays
    be.release_state(be.acquire_state(2, 256))
    assert list(be._states) == [(2, 256)]


def test_dropped_stream_hands_its_state_back(torch_model):
    be = torch_model.backend
    s = be.new_stream(1)
    s.step(case_pixel_values("a")[:, :1], 13, None)
    st = s.state
    del s
    gc.collect()
    assert be.acquire_state(*st.key) is st


@pytest.mark.parametrize("small_ops", [False, True])
def test_decode_loop_matches_the_reference_to_exhaustion(rand_dir, small_ops):
    """The shape-static decode step (all heads' budget/exhaustion decided at once, products +
    sums for few rows) gives the reference's tokens: whole frames of 265 slots that end by
    exhaustion, and task-loss stops with finished rows, over a batch of 2 on other weights."""
    pv = np.random.default_rng(5).normal(size=(2, 3, 3, 224, 224)).astype(np.float32)
    ref = ag.AutoGaze.from_pretrained(rand_dir, backend="reference", device=DEVICE)
    model = ag.AutoGaze.from_pretrained(rand_dir, backend="torch", device=DEVICE)
    model.backend.small_ops = small_ops  # the CUDA default for few rows; eager GEMMs otherwise
    lens = []
    for kw in ({"gazing_ratio": 1.0}, {"gazing_ratio": 0.6, "task_loss_requirement": 0.8}):
        want, got = ref.generate(pv, **kw), model.generate(pv, **kw)
        np.testing.assert_array_equal(got.num_gazing_each_frame, want.num_gazing_each_frame)
        np.testing.assert_array_equal(got.gazing_pos, want.gazing_pos)
        np.testing.assert_array_equal(got.if_padded_gazing, want.if_padded_gazing)
        lens.append(want)
    assert (lens[0].num_gazing_each_frame == 265).all()  # every id taken: exhaustion ends them
    assert lens[1].if_padded_gazing.any()  # task-loss stops (pads) happened


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "4"])
def test_steps_per_sync_must_be_a_positive_int(bad):
    with pytest.raises(ag.InputError, match="steps_per_sync must be a positive int"):
        ag.AutoGaze.from_pretrained(MODEL_DIR, backend="torch", device="cpu", steps_per_sync=bad)


def test_steps_per_sync_keeps_the_tokens():
    # 1 step per graph launch (a host read every step) and 7 give the same tokens as the default
    pv = case_pixel_values("a")[:, :3]
    kw = {"gazing_ratio": 0.2, "task_loss_requirement": 0.7}
    outs = [
        ag.AutoGaze.from_pretrained(MODEL_DIR, backend="torch", device=DEVICE, steps_per_sync=n).generate(pv, **kw)
        for n in (None, 1, 7)
    ]
    for out in outs[1:]:
        np.testing.assert_array_equal(out.gazing_pos, outs[0].gazing_pos)


def _spy_launches(monkeypatch) -> list:
    """Records the key of every graph launch (or eager run) of the decode states."""
    from autogaze_wgpu.backends import torch_backend

    keys, real = [], torch_backend.DecodeState._run

    def spy(self, key):
        keys.append(key)
        return real(self, key)

    monkeypatch.setattr(torch_backend.DecodeState, "_run", spy)
    return keys


@pytest.mark.parametrize("n", [3, 4])
def test_decode_launches_cover_the_budget_exactly(monkeypatch, n):
    """49 slots at K = 10 a step: 5 steps a frame at most, the 5th choosing only (it always ends
    the frame); the launches run exactly those, no masked no-op steps. With a task-loss stop,
    see below."""
    model = ag.AutoGaze.from_pretrained(MODEL_DIR, backend="torch", device=DEVICE, steps_per_sync=n)
    keys = _spy_launches(monkeypatch)
    pv = case_pixel_values("a")[:, :2]
    out = model.generate(pv, gazing_ratio=0.186)
    assert (out.num_gazing_each_frame == 49).all()
    steps = [k[2:] for k in keys if k[0] == "steps"]
    assert [k[0] for k in keys] == ["prefill", "steps", "steps"] * 2 if n == 3 else ["prefill", "steps"] * 2
    assert steps == ([(3, False), (1, True)] if n == 3 else [(4, True)]) * 2
    # A task-loss stop ends a frame early: a host read after each launch, and no launch
    # after the one where it happened (frame t took ceil(n_t / K) steps). With a status
    # ring (CUDA graphs) the host reads one launch behind, so exactly one launch runs past
    # the frame's end unless the frame reached its last possible step (20: 19 full steps +
    # the choosing one). The ring's protocol on the host (``_HostRing``) runs that loop on
    # any device, and it must not change the tokens.
    outs = []
    for ring in (model.backend._status_ring, _HostRing(), None):
        model.backend._status_ring = ring
        keys.clear()
        stop = model.generate(pv, gazing_ratio=0.75, task_loss_requirement=0.7)
        assert stop.if_padded_gazing.any() and (stop.num_gazing_each_frame < 198).all()
        frames = " ".join("P" if k[0] == "prefill" else f"{k[2] + k[3]}" for k in keys).split("P")[1:]
        for launched, n_t in zip(frames, stop.num_gazing_each_frame, strict=True):
            runs = [int(x) for x in launched.split()]
            need = -(-int(n_t) // 10)
            if ring is not None and len(runs) > 1 and sum(runs[:-1]) >= need:
                runs = runs[:-1]  # the launch past the frame's end
            else:  # none past it only when the frame ended in its last possible launch
                assert ring is None or sum(runs) == 20, (runs, n_t)
            assert sum(runs) - n < need <= sum(runs), (runs, n_t)
        outs.append(stop)
    for out in outs[1:]:
        np.testing.assert_array_equal(out.gazing_pos, outs[0].gazing_pos)
        np.testing.assert_array_equal(out.num_gazing_each_frame, outs[0].num_gazing_each_frame)


class _HostRing:
    """``StatusRing``'s protocol without pinned memory or events (any device): ``put`` reads
    the status at once, ``get`` returns it; ``DecodeState.frame`` still reads one launch
    behind through it."""

    def __init__(self):
        self.slots = [None, None]

    def put(self, i, status):
        self.slots[i] = status.tolist()

    def get(self, i):
        return self.slots[i]


def test_known_frame_end_is_checked(torch_model):
    """A frame without task-loss stop ends where the host worked it out (no status read);
    ``verify`` compares that with the device afterwards and a mismatch is an error."""
    from autogaze_wgpu.backends.torch_backend import DecodeState

    be = torch_model.backend
    st = be.acquire_state(1, be.capacity(2, [26, 26]))
    try:
        emb = be.embed(case_pixel_values("a")[:, :1])
        with torch.no_grad():
            tokens = st.frame(emb[:, 0], 26, None)
            st.frame(emb[:, 0], 26, None)
        # frame 0: its prefill (10 pending pads + 196 vision tokens), then 2 of its 3 steps run
        assert tokens.shape == (1, 26) and [want for _, want in st.unchecked] == [[1, 26, 226], [1, 26, st.length]]
        assert st.status.tolist() == st.unchecked[-1][1]
        st.verify()  # agrees
        assert st.unchecked == []
        st.unchecked = [(st.status.clone(), [1, 25, st.length])]
        with pytest.raises(ag.BackendError, match="internal error: decode status .* after frame 0 of 1"):
            st.verify()
    finally:
        be.release_state(st)
    assert isinstance(st, DecodeState)
