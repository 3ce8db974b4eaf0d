"""The torch backend's decode step as 27 fused Triton kernels (float32, same math).

The eager decode step (``DecodeState._decode_step``) is ~300 small torch kernels: on an
H100 a CUDA-graph replay of it is bound by their count, not their arithmetic. Here one step
is:

* ``_pick`` (a program per batch row: the K heads' argmaxes with the no-repeat masks) and
  ``_select`` (one program: the batch-wide budget / exhaustion / task-loss rules, frame
  tokens, done flag, the step's key-mask slots): the greedy choice of ``select_step``;
* per layer: ``_qkv`` (RMSNorm + q/k/v GEMV + RoPE at the frame's quirky decode positions +
  K/V written into the static cache; layer 0 gathers the token embeddings itself),
  ``_attention`` (split-K over the cache, causal + key mask, online softmax per split),
  ``_merge`` (the splits' softmax merge), ``_linear_residual`` for o_proj, ``_gate_up``
  (RMSNorm + gate/up GEMV + SwiGLU), ``_linear_residual`` for down;
* ``_heads``: final RMSNorm of each row's last token, lm_head and the task-loss head, and
  the cache length advanced when the step ran.

The prefill (``FusedDecoder.prefill``) runs the same kernels over a row's K pending slots and
vision tokens, its attention split over the queries (blocks of PREFILL_BLOCK_Q) as well as
the keys; a large batch's (BATCH_PREFILL_ROWS) in larger tiles, its attention as
``_flash_attention`` (a program per query block over every key: its query blocks alone fill
the GPU, so it needs no split of the keys and no merge). With PREFILL_TORCH_GEMM_ROWS
set (``decode_kernels="triton-ieee"``) a large batch's prefill takes cuBLAS's GEMMs instead,
in the eager layers (``DecodeState._layers``), around this attention (``prefill_attention``).
A frame's last possible step only chooses (``step(..., run_tokens=False)``).

Every kernel reads the step's ``run`` flag (written by ``_select``) and writes nothing when the
frame is done, so the no-op steps at the end of a CUDA-graph launch change no state; the GEMM
kernels still compute before their masked stores, so such a step costs about a full step,
which is why the launches cover only the steps a frame can take (``DecodeState.frame``). Lengths (cache length, frame length) are device scalars read by the kernels,
so one graph serves every cache length (no key-length buckets).

Arithmetic: float32 everywhere, never TF32. Products go through ``tl.dot(...,
input_precision=PRECISION)``, per kernel use either "ieee" (float32 FMAs) or "tf32x3" (the
3xTF32 float32 emulation on tensor cores: each operand split into a TF32 high part and a
TF32 remainder, the three products that matter summed in float32; only remainder x
remainder, ~2^-22 relative, is dropped), whichever was faster (``FusedDecoder``'s settings).
Against float64, a q/k/v product on an H200 is off by 4.3e-6 in tf32x3, 6.7e-6 in FMA and in
cuBLAS float32 (the reference's), 3.7e-3 in TF32 (``FusedDecoder.product_errors``). The
summation order differs from cuBLAS's, as the eager few-row path's products + sums already
did: logits agree to float32 noise, and tokens agree wherever the reference's own top-2
logits are further apart than that (docs/benchmarks.md). ``decode_kernels="triton-ieee"``
runs every product as FMAs. The fast mode ``precision="tf32"`` runs the same kernels with every
layer's product one TF32 tensor-core pass ("tf32", ``FusedDecoder.TF32_SETTINGS``): its tokens
may differ from the reference's, as that mode's do anyway.

On CPU the kernels run under Triton's interpreter (``TRITON_INTERPRET=1``) with larger tiles
(``INTERPRETER_TILES``); the tests use it to check this path against the eager step in CI,
which has no GPU.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..errors import BackendError


def _pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


@triton.jit
def _pick(
    logits_ptr, chosen_ptr, done_ptr, picks_ptr, left_ptr,
    K: tl.constexpr, V: tl.constexpr, PAD: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
    GDC: tl.constexpr = False,
):
    """One batch row's part of the step's choice: the K heads' argmaxes (first maximum on
    ties) over the ids not yet chosen in the frame, never EOS, each pick masked for the later
    heads (even if it becomes pad below); and how many ids the row may still pick."""
    _gdc(GDC)
    if tl.load(done_ptr).to(tl.int32) == 0:
        b = tl.program_id(0)
        ids = tl.arange(0, BLOCK_V)
        ks = tl.arange(0, BLOCK_K)
        in_v = ids < V
        chosen = tl.load(chosen_ptr + b * V + ids, mask=in_v, other=1).to(tl.int32) != 0
        taken = chosen | (ids == PAD) | ~in_v
        tl.store(left_ptr + b, tl.sum((~taken).to(tl.int32), 0))
        picks = tl.full([BLOCK_K], PAD, tl.int32)
        for k in tl.static_range(K):
            row = tl.load(logits_ptr + (b * K + k) * V + ids, mask=in_v, other=float("-inf"))
            tok = tl.argmax(tl.where(taken, float("-inf"), row), 0).to(tl.int32)
            taken = taken | (ids == tok)
            picks = tl.where(ks == k, tok, picks)
        tl.store(picks_ptr + b * K + ks, picks, mask=ks < K)


@triton.jit
def _select(
    picks_ptr, left_ptr, task_loss_ptr, chosen_ptr, finished_ptr, frame_tokens_ptr, ft_stride,
    n_frame_ptr, cache_len_ptr, done_ptr, first_ptr, budget_ptr, req_ptr, has_req_ptr,
    key_mask_ptr, km_stride, step_ids_ptr, run_ptr, row_run_ptr, B,
    K: tl.constexpr, V: tl.constexpr, PAD: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr,
    GDC: tl.constexpr = False,
):
    """The batch-wide rest of the step's choice (SPEC §5 step 2, as
    ``DecodeState._decode_step`` decides it) from ``_pick``'s rows: which heads the step
    keeps, the task-loss stop, the frame's tokens, done flag and the step's key-mask slots.
    Besides the step's run flag, a flag per row (row_run) for the step's attention: a row
    whose K tokens are all pad had finished before this step, and nothing computed from its
    tokens is read again (its choices are pad from now on, and these slots' keys are
    masked once the frame ends), so its attention need not read its keys; once most of 45
    tiles have met their task-loss requirement that is most of a step's reads."""
    _gdc(GDC)
    done = tl.load(done_ptr).to(tl.int32)
    rows = tl.arange(0, BLOCK_B)
    rmask = rows < B
    if done != 0:
        tl.store(run_ptr, 0)
        tl.store(row_run_ptr + rows, tl.zeros([BLOCK_B], tl.int32), mask=rmask)
    else:
        ks = tl.arange(0, BLOCK_K)
        kmask = ks < K
        both = rmask[:, None] & kmask[None, :]
        finished = tl.load(finished_ptr + rows, mask=rmask, other=1).to(tl.int32) != 0
        n_frame = tl.load(n_frame_ptr)
        budget = tl.load(budget_ptr)
        # Which heads' slots the step keeps: head k's row is all -inf exactly when an
        # unfinished row has no more than k ids left (heads 0..k-1 each masked one distinct
        # id); the step stops at the first head past the budget or exhausted.
        left = tl.load(left_ptr + rows, mask=rmask, other=0)
        min_left = tl.min(tl.where(finished | ~rmask, V + K, left), 0)
        exh = min_left <= ks
        in_budget = (budget - n_frame) > ks
        ok = in_budget & ~exh & kmask
        n_valid = tl.min(tl.where(ok, BLOCK_K, ks), 0)  # the first head that is not kept
        valid = ks < n_valid
        reached = ks <= n_valid
        exhausted = tl.max((reached & in_budget & exh & kmask).to(tl.int32), 0) != 0
        step = tl.load(picks_ptr + rows[:, None] * K + ks[None, :], mask=both, other=PAD)
        step = tl.where(finished[:, None], PAD, step)
        # Task-loss stop: meeting slots become pad; slot 0 of the frame's first step never meets.
        tl_pred = tl.load(task_loss_ptr + rows[:, None] * K + ks[None, :], mask=both, other=float("inf"))
        has_req = tl.load(has_req_ptr).to(tl.int32) != 0
        first = tl.load(first_ptr).to(tl.int32) != 0
        meet = (tl_pred <= tl.load(req_ptr)) & valid[None, :] & has_req
        meet = meet & ~((ks[None, :] == 0) & first)
        step = tl.where(meet, PAD, step)
        finished = finished | (tl.max(meet.to(tl.int32), 1) != 0)
        tl.store(finished_ptr + rows, finished.to(tl.int1), mask=rmask)
        # Every slot is written (the invalid ones land past the frame length).
        tl.store(frame_tokens_ptr + rows[:, None] * ft_stride + n_frame + ks[None, :],
                 step.to(tl.int64), mask=both)
        tl.store(chosen_ptr + rows[:, None] * V + step, tl.full([BLOCK_B, BLOCK_K], 1, tl.int1),
                 mask=rmask[:, None] & valid[None, :])
        n_frame = n_frame + n_valid
        all_finished = tl.min(tl.where(rmask, finished.to(tl.int32), 1), 0) != 0
        done_now = (n_frame >= budget) | exhausted | all_finished
        run = (~done_now).to(tl.int32)
        tl.store(n_frame_ptr, n_frame)
        tl.store(done_ptr, done_now.to(tl.int1))
        tl.store(first_ptr, 0)
        # The step's tokens are run (mask 1) only if the frame goes on; otherwise the next
        # frame's prefill runs them.
        cache_len = tl.load(cache_len_ptr)
        tl.store(key_mask_ptr + rows[:, None] * km_stride + cache_len + ks[None, :],
                 tl.full([BLOCK_B, BLOCK_K], 1, tl.int1) & (run != 0), mask=both)
        tl.store(step_ids_ptr + rows[:, None] * K + ks[None, :], step, mask=both)
        tl.store(run_ptr, run)
        live = tl.max((step != PAD).to(tl.int32), 1) != 0
        tl.store(row_run_ptr + rows, (live & (run != 0)).to(tl.int32), mask=rmask)


# The kernels below issue every load that does not wait for another first and mask their
# stores with the run flag rather than branching on it, so the flag costs no round trip of
# its own: at these sizes a kernel's time is its chain of dependent memory round trips, not
# its arithmetic. The flag is loaded as a vector (one address, ``_run_flag``): Triton's
# interpreter cannot mask a store with a scalar.


@triton.jit
def _run_flag(run_ptr, like):
    """The step's run flag broadcast to the shape of ``like`` (a 1-D index vector)."""
    return tl.load(run_ptr + like * 0) != 0


@triton.jit
def _gdc(GDC: tl.constexpr):
    """Programmatic dependent launch (Hopper+, ``FusedDecoder.PDL``): each kernel is
    launched while the previous one still runs, waits here until that one has finished and
    its writes are visible, then lets the next one launch. So a kernel's launch and start
    overlap the previous kernel's tail instead of following it; a step is 27 dependent
    launches."""
    if GDC:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def _rms_scale(src, rmask, C: tl.constexpr, BLOCK_C: tl.constexpr, eps):
    """1 / sqrt(mean(x^2) + eps) of the rows at ``src`` (row pointers), LlamaRMSNorm's
    float32 statistics."""
    cols = tl.arange(0, BLOCK_C)
    x = tl.load(src[:, None] + cols[None, :], mask=rmask[:, None] & (cols[None, :] < C), other=0.0)
    return 1.0 / tl.sqrt(tl.sum(x * x, 1) / C + eps)


@triton.jit
def _a_chunk(src, rmask, scale, norm_ptr, kk, KD: tl.constexpr, NORM: tl.constexpr):
    """Columns kk of the rows at ``src`` (row pointers, KD columns), RMSNorm'ed when NORM
    (x * scale[row] * norm[col])."""
    km = kk < KD
    a = tl.load(src[:, None] + kk[None, :], mask=rmask[:, None] & km[None, :], other=0.0)
    if NORM:
        a = a * scale[:, None] * tl.load(norm_ptr + kk, mask=km, other=0.0)[None, :]
    return a


@triton.jit
def _w_chunk(w_ptr, out_rows, out_ok, kk, KD: tl.constexpr):
    """W[out_rows, kk]^T as a (len(kk), len(out_rows)) tile of the row-major (., KD) W."""
    return tl.load(w_ptr + out_rows[None, :] * KD + kk[:, None], mask=out_ok[None, :] & (kk[:, None] < KD), other=0.0)


@triton.jit
def _matmul_t(
    src, rmask, scale, norm_ptr, w_ptr, out_rows, out_ok,
    KD: tl.constexpr, NORM: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):
    """(BLOCK_R, BLOCK_N) = a @ W[out_rows]^T, a = ``_a_chunk``'s rows; chunks of BLOCK_K
    through ``tl.dot`` at ``PRECISION`` ("ieee" or "tf32x3"; "tf32" only in the fast mode
    ``precision="tf32"``: see the module's docstring)."""
    acc = tl.zeros([BLOCK_R, BLOCK_N], tl.float32)
    for k0 in tl.static_range(0, KD, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        a = _a_chunk(src, rmask, scale, norm_ptr, kk, KD, NORM)
        acc = tl.dot(a, _w_chunk(w_ptr, out_rows, out_ok, kk, KD), acc, input_precision=PRECISION)
    return acc


@triton.jit
def _matmul_t2(
    src, rmask, scale, norm_ptr, w_ptr, rows_1, rows_2, out_ok,
    KD: tl.constexpr, NORM: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):
    """``_matmul_t`` for two sets of W rows sharing each chunk of a (q/k/v halves, gate/up):
    a is loaded once for both products."""
    acc_1 = tl.zeros([BLOCK_R, BLOCK_N], tl.float32)
    acc_2 = tl.zeros([BLOCK_R, BLOCK_N], tl.float32)
    for k0 in tl.static_range(0, KD, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        a = _a_chunk(src, rmask, scale, norm_ptr, kk, KD, NORM)
        acc_1 = tl.dot(a, _w_chunk(w_ptr, rows_1, out_ok, kk, KD), acc_1, input_precision=PRECISION)
        acc_2 = tl.dot(a, _w_chunk(w_ptr, rows_2, out_ok, kk, KD), acc_2, input_precision=PRECISION)
    return acc_1, acc_2


@triton.jit
def _qkv(
    x_ptr, ids_ptr, embed_ptr, vis_ptr, norm_ptr, w_ptr, cos_ptr, sin_ptr, q_ptr, kc_ptr, vc_ptr,
    cache_len_ptr, run_ptr, R, cap, eps,
    GATHER: tl.constexpr, T: tl.constexpr, NG: tl.constexpr,
    C: tl.constexpr, H: tl.constexpr, HD: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
    GDC: tl.constexpr = False,
):
    """RMSNorm(x) @ [Wq; Wk; Wv]^T for one head of q, k or v (program axis 1), RoPE on q and
    k, q to ``q_ptr`` (B, H, T, HD) and k/v into the cache at slots cache_len + [0, T), for
    the T tokens of each batch row (R = B * T rows; cos/sin are (R, HD) at their positions).
    Layer 0 (GATHER) starts the residual stream x: a row's first NG tokens through
    embed_tokens (ids (B, NG)), the rest from the vision tokens (B, T - NG, C): a decode step
    has T = NG = K, the prefill the K pending slots then the vision tokens."""
    _gdc(GDC)
    HALF: tl.constexpr = HD // 2
    which = tl.program_id(1) // H  # 0 q, 1 k, 2 v
    head = tl.program_id(1) % H
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    n = tl.arange(0, HALF)
    rmask = rows < R
    run = _run_flag(run_ptr, rows)[:, None]
    cs = rows[:, None] * HD + n[None, :]
    c_lo = tl.load(cos_ptr + cs, mask=rmask[:, None], other=0.0)
    s_lo = tl.load(sin_ptr + cs, mask=rmask[:, None], other=0.0)
    c_hi = tl.load(cos_ptr + cs + HALF, mask=rmask[:, None], other=0.0)
    s_hi = tl.load(sin_ptr + cs + HALF, mask=rmask[:, None], other=0.0)
    b = rows // T
    t = rows % T
    slot = tl.load(cache_len_ptr).to(tl.int32) + t
    if GATHER:
        gathered = t < NG
        ids = tl.load(ids_ptr + b * NG + t, mask=rmask & gathered, other=0).to(tl.int64)
        src = embed_ptr + ids * C
        if T > NG:
            vis = vis_ptr + (b * (T - NG) + tl.maximum(t - NG, 0)).to(tl.int64) * C
            src = tl.where(gathered, src, vis)
        if tl.program_id(1) == 0:
            cols = tl.arange(0, BLOCK_C)
            m2 = rmask[:, None] & (cols[None, :] < C)
            emb = tl.load(src[:, None] + cols[None, :], mask=m2, other=0.0)
            tl.store(x_ptr + rows[:, None] * C + cols[None, :], emb, mask=m2 & run)
    else:
        src = x_ptr + rows.to(tl.int64) * C
    inv = _rms_scale(src, rmask, C, BLOCK_C, eps)
    base = which * C + head * HD
    ok = n < HALF
    lo, hi = _matmul_t2(src, rmask, inv, norm_ptr, w_ptr, base + n, base + HALF + n, ok, C, True,
                        BLOCK_R, HALF, BLOCK_K, PRECISION)
    if which < 2:  # RoPE, rotate-half convention: (lo, hi) -> (lo c - hi s, hi c + lo s)
        lo, hi = lo * c_lo + (-hi) * s_lo, hi * c_hi + lo * s_hi
    ms = rmask[:, None] & run
    if which == 0:
        q_at = (((b * H + head) * T + t).to(tl.int64) * HD)[:, None] + n[None, :]
        tl.store(q_ptr + q_at, lo, mask=ms)
        tl.store(q_ptr + q_at + HALF, hi, mask=ms)
    else:
        kv_at = (((b * H + head) * cap + slot).to(tl.int64) * HD)[:, None] + n[None, :]
        if which == 1:
            tl.store(kc_ptr + kv_at, lo, mask=ms)
            tl.store(kc_ptr + kv_at + HALF, hi, mask=ms)
        else:
            tl.store(vc_ptr + kv_at, lo, mask=ms)
            tl.store(vc_ptr + kv_at + HALF, hi, mask=ms)


@triton.jit
def _attend_block(
    q, qs, kn, kv_base, kc_ptr, vc_ptr, km_base, cache_len, end, scale, m_i, l_i, acc,
    HD: tl.constexpr, PRECISION: tl.constexpr, SEEN_BY_ALL: tl.constexpr, LOG2: tl.constexpr,
):
    """Online-softmax update of the queries q (tokens qs, at slots cache_len + qs) with the
    keys at slots kn: causal (slot <= the query's), the key mask, slots < end.
    ``SEEN_BY_ALL``: the caller knows every slot kn is < end and at or before every query's
    slot, so only the key mask applies (no bounds on the loads, no causal test per score).
    ``LOG2``: q was scaled by scale * log2(e), so the scores are in log2 units and the
    softmax is exp2's (m_i too); otherwise scores are scaled here and exponentiated by exp."""
    d = tl.arange(0, HD)
    if SEEN_BY_ALL:
        keys = tl.load(kc_ptr + kv_base + kn[:, None] * HD + d[None, :])
        vals = tl.load(vc_ptr + kv_base + kn[:, None] * HD + d[None, :])
        allowed = (tl.load(km_base + kn).to(tl.int32) != 0)[None, :]
    else:
        inn = kn < end
        keys = tl.load(kc_ptr + kv_base + kn[:, None] * HD + d[None, :], mask=inn[:, None], other=0.0)
        vals = tl.load(vc_ptr + kv_base + kn[:, None] * HD + d[None, :], mask=inn[:, None], other=0.0)
        key_ok = tl.load(km_base + kn, mask=inn, other=0).to(tl.int32) != 0
        allowed = (kn[None, :] <= cache_len + qs[:, None]) & key_ok[None, :] & inn[None, :]
    s = tl.dot(q, tl.trans(keys), input_precision=PRECISION)
    if not LOG2:
        s = s * scale
    s = tl.where(allowed, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    if LOG2:
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
    else:
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(p, vals, acc * alpha[:, None], input_precision=PRECISION)
    return m_new, l_i, acc


@triton.jit
def _store_output(y_ptr, acc, total, b, head, qs, store, T: tl.constexpr, H: tl.constexpr, HD: tl.constexpr):
    """The softmax-weighted values acc / total of queries qs of head ``head`` of batch row b
    into y (B, T, H*HD) where ``store``; a query that saw no key at all (total 0: a pad slot
    of the first frame's prefill, never attended and never read out) gets 0 rather than 0/0."""
    d = tl.arange(0, HD)
    y = tl.where((total > 0)[:, None], acc / tl.where(total > 0, total, 1.0)[:, None], 0.0)
    at = ((b * T + qs).to(tl.int64) * (H * HD))[:, None] + head * HD + d[None, :]
    tl.store(y_ptr + at, y, mask=store[:, None])


@triton.jit
def _attention(
    q_ptr, kc_ptr, vc_ptr, key_mask_ptr, km_stride, cache_len_ptr, run_ptr,
    pm_ptr, pl_ptr, pacc_ptr, cap, S, scale,
    T: tl.constexpr, H: tl.constexpr, HD: tl.constexpr,
    BLOCKS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_Q: tl.constexpr, PRECISION: tl.constexpr,
    RUN_STRIDE: tl.constexpr,
    GDC: tl.constexpr = False,
):
    """BLOCK_Q of the T queries of one (row, head) (program axis 2; a decode step has T = K,
    one block) against one split of the cache (axis 1: BLOCKS x BLOCK_N keys): causal (query
    t sees slots <= cache_len + t) and the key mask, softmax statistics per split (max, sum,
    weighted values) into the partials for ``_merge``. Splits past the block's last query do
    nothing (``_merge`` does not read them). The split's blocks loop (unrolled, the step's
    were as fast for one video and slower for 45 tiles, the prefill's much slower).
    The run flag is row b's at run_ptr + b * RUN_STRIDE (0: one flag for the launch; a step
    has a flag per row, ``_select``'s ``row_run``)."""
    _gdc(GDC)
    bh = tl.program_id(0)
    sp = tl.program_id(1)
    qb = tl.program_id(2)
    b = bh // H
    qs = qb * BLOCK_Q + tl.arange(0, BLOCK_Q)
    d = tl.arange(0, HD)
    qm = qs < T
    q = tl.load(q_ptr + ((bh * T + qs).to(tl.int64) * HD)[:, None] + d[None, :], mask=qm[:, None], other=0.0)
    cache_len = tl.load(cache_len_ptr).to(tl.int32)
    run = tl.load(run_ptr + b * RUN_STRIDE) != 0
    end = cache_len + tl.minimum(T, (qb + 1) * BLOCK_Q)  # past the block's last query
    if run & (sp * BLOCKS * BLOCK_N < end):
        m_i = tl.full([BLOCK_Q], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_Q], tl.float32)
        acc = tl.zeros([BLOCK_Q, HD], tl.float32)
        kv = (bh * cap * HD).to(tl.int64)
        for j in range(BLOCKS):
            kn = (sp * BLOCKS + j) * BLOCK_N + tl.arange(0, BLOCK_N)
            m_i, l_i, acc = _attend_block(q, qs, kn, kv, kc_ptr, vc_ptr, key_mask_ptr + b * km_stride,
                                          cache_len, end, scale, m_i, l_i, acc, HD, PRECISION, False, False)
        o = ((bh * S + sp) * T + qs).to(tl.int64)
        tl.store(pm_ptr + o, m_i, mask=qm)
        tl.store(pl_ptr + o, l_i, mask=qm)
        tl.store(pacc_ptr + o[:, None] * HD + d[None, :], acc, mask=qm[:, None])


@triton.jit
def _flash_attention(
    q_ptr, kc_ptr, vc_ptr, key_mask_ptr, km_stride, cache_len_ptr, run_ptr, y_ptr, cap, scale,
    T: tl.constexpr, H: tl.constexpr, HD: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_Q: tl.constexpr, PRECISION: tl.constexpr,
    GDC: tl.constexpr = False,
):
    """BLOCK_Q of the T queries of one (row, head) (program axis 0; axis 1 is the (row,
    head), so a row's query blocks run side by side and share its keys in L2) against every
    key they see, in one program: the online softmax of ``_attend_block`` over blocks of
    BLOCK_N keys, then y (B, T, H*HD) directly. A large batch's prefill has enough query
    blocks to fill the GPU without splitting the keys, so this needs no partials and no
    ``_merge`` (a split-K prefill wrote and re-read ~34 floats a query per split); y through
    ``_store_output``, as ``_merge``'s."""
    _gdc(GDC)
    qb = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    head = bh % H
    qs = qb * BLOCK_Q + tl.arange(0, BLOCK_Q)
    d = tl.arange(0, HD)
    qm = qs < T
    q = tl.load(q_ptr + ((bh * T + qs).to(tl.int64) * HD)[:, None] + d[None, :], mask=qm[:, None], other=0.0)
    # scores in log2 units: one multiply per query here, exp2 per score in the softmax
    q = q * (scale * 1.4426950408889634)
    cache_len = tl.load(cache_len_ptr).to(tl.int32)
    run = _run_flag(run_ptr, qs)
    end = cache_len + tl.minimum(T, (qb + 1) * BLOCK_Q)  # past the block's last query
    # The blocks before the block's first query's slot are seen by all its queries: no
    # causal or bounds test there, only in the last few blocks.
    seen_by_all = (cache_len + qb * BLOCK_Q + 1) // BLOCK_N * BLOCK_N
    m_i = tl.full([BLOCK_Q], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_Q], tl.float32)
    acc = tl.zeros([BLOCK_Q, HD], tl.float32)
    kv = (bh * cap * HD).to(tl.int64)
    km = key_mask_ptr + b * km_stride
    for start in range(0, seen_by_all, BLOCK_N):
        kn = start + tl.arange(0, BLOCK_N)
        m_i, l_i, acc = _attend_block(q, qs, kn, kv, kc_ptr, vc_ptr, km, cache_len, end, scale,
                                      m_i, l_i, acc, HD, PRECISION, True, True)
    for start in range(seen_by_all, end, BLOCK_N):
        kn = start + tl.arange(0, BLOCK_N)
        m_i, l_i, acc = _attend_block(q, qs, kn, kv, kc_ptr, vc_ptr, km, cache_len, end, scale,
                                      m_i, l_i, acc, HD, PRECISION, False, True)
    _store_output(y_ptr, acc, l_i, b, head, qs, qm & run, T, H, HD)


@triton.jit
def _merge(
    pm_ptr, pl_ptr, pacc_ptr, y_ptr, cache_len_ptr, run_ptr, S,
    T: tl.constexpr, H: tl.constexpr, HD: tl.constexpr, SPLIT: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_Q: tl.constexpr, RUN_STRIDE: tl.constexpr,
    GDC: tl.constexpr = False,
):
    """softmax(scores) @ values for BLOCK_Q of the T queries of one (row, head) (program axis
    1, the blocks of ``_attention``) from the splits that hold keys they see (online over
    chunks of BLOCK_S splits) into y (``_store_output``); the run flag as ``_attention``'s."""
    _gdc(GDC)
    bh = tl.program_id(0)
    qb = tl.program_id(1)
    b = bh // H
    head = bh % H
    qs = qb * BLOCK_Q + tl.arange(0, BLOCK_Q)
    d = tl.arange(0, HD)
    qm = qs < T
    used = tl.cdiv(tl.load(cache_len_ptr).to(tl.int32) + tl.minimum(T, (qb + 1) * BLOCK_Q), SPLIT)
    run = _run_flag(run_ptr + b * RUN_STRIDE, qs)
    m = tl.full([BLOCK_Q], float("-inf"), tl.float32)
    total = tl.zeros([BLOCK_Q], tl.float32)
    acc = tl.zeros([BLOCK_Q, HD], tl.float32)
    for s0 in range(0, used, BLOCK_S):
        ss = s0 + tl.arange(0, BLOCK_S)
        o = ((bh * S + ss)[:, None] * T + qs[None, :]).to(tl.int64)  # (BLOCK_S, BLOCK_Q)
        msk = (ss[:, None] < used) & qm[None, :]
        pm = tl.load(pm_ptr + o, mask=msk, other=float("-inf"))
        pl = tl.load(pl_ptr + o, mask=msk, other=0.0)
        part = tl.load(pacc_ptr + o[:, :, None] * HD + d[None, None, :], mask=msk[:, :, None], other=0.0)
        m_new = tl.maximum(m, tl.max(pm, 0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - m_safe)
        w = tl.exp(pm - m_safe[None, :])
        total = total * alpha + tl.sum(w * pl, 0)
        acc = acc * alpha[:, None] + tl.sum(w[:, :, None] * part, 0)
        m = m_new
    _store_output(y_ptr, acc, total, b, head, qs, qm & run, T, H, HD)


@triton.jit
def _linear_residual(
    a_ptr, w_ptr, x_ptr, run_ptr, R,
    N: tl.constexpr, KD: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
    GDC: tl.constexpr = False,
):
    """x (R, N) += a (R, KD) @ W^T, W (N, KD): o_proj and down_proj with their residual."""
    _gdc(GDC)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m2 = (rows[:, None] < R) & (cols[None, :] < N)
    xo = x_ptr + rows[:, None] * N + cols[None, :]
    x = tl.load(xo, mask=m2, other=0.0)
    run = _run_flag(run_ptr, rows)[:, None]
    # (no RMSNorm: the scale and norm arguments are unused, x_ptr stands in for both)
    y = _matmul_t(a_ptr + rows * KD, rows < R, x_ptr, x_ptr, w_ptr, cols, cols < N, KD, False,
                  BLOCK_R, BLOCK_N, BLOCK_K, PRECISION)
    tl.store(xo, x + y, mask=m2 & run)


@triton.jit
def _gate_up(
    x_ptr, norm_ptr, w_ptr, act_ptr, run_ptr, R, eps,
    C: tl.constexpr, I: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
    GDC: tl.constexpr = False,
):
    """act = silu(h Wg^T) * (h Wu^T), h = RMSNorm(x); W = [Wg; Wu] (2I, C)."""
    _gdc(GDC)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < R
    run = _run_flag(run_ptr, rows)[:, None]
    src = x_ptr + rows * C
    inv = _rms_scale(src, rmask, C, BLOCK_C, eps)
    g, u = _matmul_t2(src, rmask, inv, norm_ptr, w_ptr, cols, I + cols, cols < I, C, True, BLOCK_R, BLOCK_N, BLOCK_K,
                      PRECISION)
    act = g / (1.0 + tl.exp(-g)) * u
    tl.store(act_ptr + rows[:, None] * I + cols[None, :], act, mask=rmask[:, None] & (cols[None, :] < I) & run)


@triton.jit
def _heads(
    x_ptr, norm_ptr, w_ptr, logits_ptr, task_loss_ptr, cache_len_ptr, run_ptr, B, eps,
    C: tl.constexpr, K: tl.constexpr, T: tl.constexpr, NL: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GDC: tl.constexpr = False,
):
    """Final RMSNorm of each row's last token (of T), then [lm_head; task-loss head] (NL + K
    outputs): logits (B, NL) and task losses (B, K). Program (0, 0) then advances the cache
    length past the T tokens."""
    _gdc(GDC)
    bs = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    bmask = bs < B
    cache_len = tl.load(cache_len_ptr)
    run = _run_flag(run_ptr, bs)[:, None]
    src = x_ptr + (bs * T + (T - 1)).to(tl.int64) * C
    inv = _rms_scale(src, bmask, C, BLOCK_C, eps)
    out = _matmul_t(src, bmask, inv, norm_ptr, w_ptr, cols, cols < NL + K, C, True, BLOCK_R, BLOCK_N, BLOCK_K,
                    "ieee")
    tl.store(logits_ptr + bs[:, None] * NL + cols[None, :], out, mask=bmask[:, None] & (cols[None, :] < NL) & run)
    tm = bmask[:, None] & (cols[None, :] >= NL) & (cols[None, :] < NL + K) & run
    tl.store(task_loss_ptr + bs[:, None] * K + (cols[None, :] - NL), out, mask=tm)
    if (tl.program_id(0) == 0) & (tl.program_id(1) == 0):
        tl.store(cache_len_ptr, tl.where(tl.load(run_ptr) != 0, cache_len + T, cache_len))


def supported(cfg) -> bool:
    """Whether the kernels fit this decoder's shapes: heads tile the hidden size, a head's
    halves are whole ``tl.dot`` tiles (power of two, >= 32) and K fits one 16-row tile."""
    hd = cfg.head_dim
    return (
        cfg.num_attention_heads * hd == cfg.hidden_size
        and hd >= 32 and hd & (hd - 1) == 0
        and cfg.num_multi_token_pred <= 16
    )


def _pdl_supported(device) -> bool:
    """Whether kernels on ``device`` can take programmatic dependent launch: a CUDA GPU of
    compute capability 9 or later (not the interpreter) and a Triton with ``gdc_wait``."""
    import torch

    return (
        not _interpreted(device)
        and torch.cuda.get_device_capability(device)[0] >= 9
        and hasattr(tl.extra.cuda, "gdc_wait")
        and hasattr(tl.extra.cuda, "gdc_launch_dependents")
    )


def _interpreted(device) -> bool:
    """Whether launches on ``device`` run under Triton's interpreter (CPU tensors)."""
    import os

    return device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


class FusedDecoder:
    """The decoder's weights packed for the kernels (once per backend), and the launch of one
    decode step on a ``DecodeState``'s buffers."""

    # Rows per GEMM tile (tl.dot needs >= 16), output columns per program and reduction
    # chunk; a split of a step's attention is ATTN_BLOCKS blocks of ATTN_BLOCK_N keys (a
    # loop), ATTN_NUM_WARPS warps a program; _merge takes MERGE_BLOCK_S splits at a time;
    # warps per GEMM program. (scripts/tune_triton_decode.py times alternatives on a GPU;
    # the numbers below are an H200's with a 3000-key cache, docs/benchmarks.md.)
    # Products (tl.dot) are "ieee" (FMA) or "tf32x3" (three TF32 tensor-core products,
    # CUTLASS's float32 emulation, see the module docstring), whichever was faster; the
    # heads (logits, task loss) always FMA. decode_kernels="triton-ieee" (IEEE_SETTINGS)
    # makes every product an FMA, with the tiles that were fastest for FMA.
    # A step: tf32x3 GEMMs took 34.5 -> 18.4 us (q/k/v), 34.8 -> 15.2 (gate/up), 14.7 -> 9.7
    # (o_proj, down) for 45 tiles, one video's step 299 -> 175 us. 45 tiles' step with
    # tf32x3 attention: 862 us in splits of 2 x 128 keys with 2 warps (FMA's best), 767
    # with 4, 740 in 4 x 64 with 2, 727 in 2 x 64 with 4; their o_proj / gate-up / down stay
    # in 32-row tiles (BATCH_MLP_BLOCK_R; 64: 867-924 us a step), q/k/v in 16 (32: 886).
    # One video (10 rows): 32 columns a GEMM program, 165 us a step against 180 for 16.
    # The step's merge (its K queries a program, no tl.dot padding): 45 tiles' in 2 warps
    # 6.7 us a launch against 10.0 in 4 and 22.7 in 8 (16 or 64 splits at a time: 7.8-63).
    BLOCK_R, BLOCK_N, BLOCK_K, HEADS_BLOCK_N = 16, 32, 64, 64
    FEW_ROWS, FEW_ROWS_BLOCK_N, FEW_ROWS_ATTN_BLOCKS, FEW_ROWS_ATTN_BLOCK_N = 64, 32, 2, 64
    ATTN_BLOCKS, ATTN_BLOCK_N = 2, 64
    ATTN_NUM_WARPS, FEW_ROWS_ATTN_NUM_WARPS = 4, 4
    # A step's attention (and merge) skips the rows whose K tokens are all pad: rows that
    # had finished their frame before the step (``_select``'s row_run). False: every row
    # reads its keys.
    SKIP_PAD_ROWS = True
    BATCH_MLP_BLOCK_R = 32  # a batch step's o_proj, gate/up and down
    MERGE_BLOCK_S, MERGE_NUM_WARPS = 32, 2
    NUM_WARPS = 4
    ATTN_PRECISION, GEMM_PRECISION = "tf32x3", "tf32x3"
    # The prefill (~200 tokens a row): rows per GEMM tile, queries per attention program; a
    # split of its attention is PREFILL_ATTN_BLOCKS blocks of PREFILL_ATTN_BLOCK_N keys (a
    # loop), merged PREFILL_MERGE_BLOCK_S splits x PREFILL_MERGE_BLOCK_Q queries a program
    # (at most the attention's queries). One video's prefill attention (FMA) took 143 us a
    # launch as one program per query block over every key, 67 / 80 / 101 us in splits of
    # 4 / 8 / 16 x 64 keys, 48.5 in 2 x 128 (59 in 4 x 128), 90 in tf32x3; its GEMMs in
    # tf32x3 547 -> 448 us a frame. Unrolled splits were much slower (8 blocks: 680 us).
    PREFILL_BLOCK_R, PREFILL_BLOCK_Q = 32, 32
    PREFILL_ATTN_BLOCKS, PREFILL_MERGE_BLOCK_S, PREFILL_ATTN_BLOCK_N = 2, 16, 128
    PREFILL_MERGE_BLOCK_Q, PREFILL_MERGE_NUM_WARPS = 32, 8
    # The prefill's GEMM tiles: output columns per program, warps per program.
    PREFILL_BLOCK_N, PREFILL_NUM_WARPS = 32, 4
    PREFILL_ATTN_PRECISION, PREFILL_GEMM_PRECISION = "ieee", "tf32x3"
    # A large batch's prefill (from BATCH_PREFILL_ROWS token rows, batch x prefill tokens):
    # 45 tiles' attention in tf32x3 with 64-query blocks took 956 us a launch against 1718
    # for FMA's best (32 queries; 64 spill in FMA: 9.5 ms); its GEMMs in tf32x3 64 x 64
    # tiles 5.33 ms a frame against 5.82 through cuBLAS (FMA) and 5.66-6.16 in smaller tiles.
    BATCH_PREFILL_ROWS = 2048
    BATCH_PREFILL_ATTN_PRECISION, BATCH_PREFILL_BLOCK_Q = "tf32x3", 64
    # ... its attention as ``_flash_attention`` (one program a query block of
    # BATCH_PREFILL_FLASH_BLOCK_Q over every key, blocks of BATCH_PREFILL_FLASH_BLOCK_N keys
    # software-pipelined BATCH_PREFILL_FLASH_STAGES deep) rather than split-K + ``_merge``
    # (None: split-K, with the PREFILL_* splits and BATCH_PREFILL_BLOCK_Q): 776 us a layer for
    # 45 tiles at 3000 keys (H200) against 955 + 91 for split-K + merge; 128-key blocks 812,
    # 8 warps 1619. With exp2 and no causal test before the block's first query (H100): 692
    # us in 64-query blocks, 633 in 128 (a frame's prefill 3903 -> 3649 us), 1551 for 128 x
    # 128-key blocks (docs/benchmarks.md, 2026-12-05).
    BATCH_PREFILL_FLASH_BLOCK_Q, BATCH_PREFILL_FLASH_BLOCK_N = 128, 64
    BATCH_PREFILL_FLASH_NUM_WARPS, BATCH_PREFILL_FLASH_STAGES = 4, 3
    BATCH_PREFILL_BLOCK_R, BATCH_PREFILL_BLOCK_N = 64, 64
    # Token rows from which the prefill's GEMMs go through cuBLAS (float32, TF32 off:
    # DecodeState._layers with this attention) instead of these kernels; None: never. FMA
    # kernels took 12.8 ms a frame for 45 tiles against cuBLAS's 8.9, so triton-ieee does.
    PREFILL_TORCH_GEMM_ROWS = None
    IEEE_SETTINGS = {
        "ATTN_PRECISION": "ieee", "GEMM_PRECISION": "ieee", "PREFILL_ATTN_PRECISION": "ieee",
        "PREFILL_GEMM_PRECISION": "ieee", "BATCH_PREFILL_ATTN_PRECISION": "ieee", "BATCH_PREFILL_BLOCK_Q": 32,
        "ATTN_BLOCK_N": 128, "ATTN_NUM_WARPS": 2, "FEW_ROWS_BLOCK_N": 16, "PREFILL_TORCH_GEMM_ROWS": 2048,
        "BATCH_PREFILL_FLASH_BLOCK_N": None,  # (not timed with FMAs: the split-K prefill was)
    }
    # The fast mode precision="tf32": every layer's product one TF32 pass (10 mantissa bits
    # an operand, ~1e-3 relative), the tiles the float32 defaults' (not tuned for TF32).
    TF32_SETTINGS = {
        "ATTN_PRECISION": "tf32", "GEMM_PRECISION": "tf32", "PREFILL_ATTN_PRECISION": "tf32",
        "PREFILL_GEMM_PRECISION": "tf32", "BATCH_PREFILL_ATTN_PRECISION": "tf32",
    }
    PRODUCTS = ("auto", "ieee", "tf32")
    # Under the interpreter (CPU tests) every Triton op costs ~0.1 ms of Python whatever its
    # size, so the tiles are as large as the shapes allow: the same kernels with far fewer
    # programs and ops. Only the summation order within a product (BLOCK_K chunks) and the
    # attention splits differ from the GPU tiles.
    INTERPRETER_TILES = {
        "BLOCK_R": 32, "BATCH_MLP_BLOCK_R": 32, "BLOCK_N": 128, "BLOCK_K": 256, "HEADS_BLOCK_N": 512, "FEW_ROWS_BLOCK_N": 128,
        "ATTN_BLOCKS": 1, "FEW_ROWS_ATTN_BLOCKS": 1, "ATTN_BLOCK_N": 512, "FEW_ROWS_ATTN_BLOCK_N": 512, "MERGE_BLOCK_S": 16,
        "PREFILL_BLOCK_R": 256, "PREFILL_BLOCK_Q": 256, "PREFILL_ATTN_BLOCKS": 8,
        "PREFILL_BLOCK_N": 128, "PREFILL_ATTN_BLOCK_N": 512, "BATCH_PREFILL_BLOCK_Q": 256,
        "PREFILL_MERGE_BLOCK_Q": 256, "BATCH_PREFILL_BLOCK_R": 256, "BATCH_PREFILL_BLOCK_N": 128,
        "BATCH_PREFILL_FLASH_BLOCK_N": 512, "BATCH_PREFILL_FLASH_BLOCK_Q": 256,
    }

    # Programmatic dependent launch (``_gdc``): each kernel launches while the previous one
    # runs and waits for it inside. True: on where the GPU (compute capability >= 9, Hopper)
    # and Triton have it. Off: on an H100 (2026-12-06, scripts/ab_torch.py) it won 3% on one
    # video and a stream but lost 2-5% on 45-tile batches (docs/benchmarks.md).
    PDL = False

    def __init__(self, backend, products: str = "auto"):
        """``products``: "auto" (float32: FMA or 3xTF32 per kernel, whichever was faster),
        "ieee" (float32 FMAs only, ``IEEE_SETTINGS``) or "tf32" (the fast mode's single TF32
        passes, ``TF32_SETTINGS``)."""
        import torch

        if products not in self.PRODUCTS:
            raise ValueError(f"products must be one of {self.PRODUCTS}, got {products!r}")

        dec = backend.model.gaze_decoder
        cfg = dec.cfg
        self.C, self.H, self.HD = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim
        self.I, self.K, self.V = cfg.intermediate_size, cfg.num_multi_token_pred, cfg.vocab_size
        self.pad, self.eps = cfg.eos_token_id, float(cfg.rms_norm_eps)
        self.scale = float(dec.model.layers[0].self_attn.scaling)
        c = lambda t: t.detach().float().contiguous()
        self.embed = c(dec.model.embed_tokens.weight)
        # [Wq; Wk; Wv] and [Wg; Wu]: the backend's own concatenations (the same tensors in
        # float32, where .float() copies nothing)
        self.layers = []
        for layer, (w_qkv, w_gu) in zip(dec.model.layers, backend.fused_weights, strict=True):
            self.layers.append((
                c(layer.input_layernorm.weight),
                c(w_qkv),
                c(layer.self_attn.o_proj.weight),
                c(layer.post_attention_layernorm.weight),
                c(w_gu),
                c(layer.mlp.down_proj.weight),
            ))
        self.final_norm = c(dec.model.norm.weight)
        self.w_heads = c(torch.cat([dec.lm_head.weight, dec.task_loss_prediction_head.weight]))
        self.products = products
        for name, value in {"auto": {}, "ieee": self.IEEE_SETTINGS, "tf32": self.TF32_SETTINGS}[products].items():
            setattr(self, name, value)
        if _interpreted(backend.device):
            for name, value in self.INTERPRETER_TILES.items():
                setattr(self, name, value)
        self._pdl_ok = _pdl_supported(backend.device)

    @property
    def launch(self) -> dict:
        """What every kernel launch adds: the PDL flag and launch option (``PDL``), or nothing."""
        return {"GDC": True, "launch_pdl": True} if self.PDL and self._pdl_ok else {}

    def product_errors(self, rows: int = 450, seed: int = 0) -> dict[str, float]:
        """How exact each way of multiplying is, at the decoder's sizes: the max abs error
        against float64 of x @ [Wq; Wk; Wv]^T for layer 0's weights and x ~ N(0, 1) (rows x
        hidden, 450 rows: a step of 45 tiles) through this decoder's GEMM kernel at each
        ``tl.dot`` precision ("ieee", "tf32x3", the fast mode's "tf32"), and through torch on the same device
        ("torch float32": cuBLAS with TF32 off, the reference's arithmetic; on CUDA also
        "torch tf32", the fast mode's)."""
        import torch

        from .reference import tf32_switch

        w = self.layers[0][1]
        N, KD = w.shape
        x = torch.randn(rows, KD, generator=torch.Generator().manual_seed(seed)).to(w.device)
        exact = x.double() @ w.double().T
        run = torch.ones(1, device=w.device, dtype=torch.int32)
        err = lambda y: float((y.double() - exact).abs().max())  # noqa: E731
        out = {}
        for precision in ("ieee", "tf32x3", "tf32"):
            y = torch.zeros(rows, N, device=w.device)
            _linear_residual[(triton.cdiv(rows, self.BLOCK_R), triton.cdiv(N, self.BLOCK_N))](
                x, w, y, run, rows, N=N, KD=KD, BLOCK_R=self.BLOCK_R, BLOCK_N=self.BLOCK_N, BLOCK_K=self.BLOCK_K,
                PRECISION=precision, num_warps=self.NUM_WARPS,
            )
            out[precision] = err(y)
        for name, allow in (("torch float32", False), ("torch tf32", True))[: 2 if w.is_cuda else 1]:
            with tf32_switch(allow):
                out[name] = err(x @ w.T)
        return out

    def _batch_prefill(self, B: int, T: int) -> bool:
        """Whether a prefill of T tokens in each of B rows takes the BATCH_PREFILL_* settings."""
        return B * T >= self.BATCH_PREFILL_ROWS

    def _flash_prefill(self, B: int, T: int) -> bool:
        """Whether a prefill of T tokens in each of B rows attends through ``_flash_attention``."""
        return self._batch_prefill(B, T) and bool(self.BATCH_PREFILL_FLASH_BLOCK_N)

    def _step_attn(self, B: int) -> tuple[int, int, int]:
        """Key blocks per split, keys per block and warps per program of a step's attention
        for B batch rows."""
        if B * self.K <= self.FEW_ROWS:
            return self.FEW_ROWS_ATTN_BLOCKS, self.FEW_ROWS_ATTN_BLOCK_N, self.FEW_ROWS_ATTN_NUM_WARPS
        return self.ATTN_BLOCKS, self.ATTN_BLOCK_N, self.ATTN_NUM_WARPS

    def buffers(self, st) -> dict:
        """The step's and the prefill's scratch buffers for a state of (batch, capacity);
        the prefill's RoPE tables (``pf_cos``/``pf_sin``) are filled by the caller."""
        import torch

        B, K, C, H, HD = st.B, self.K, self.C, self.H, self.HD
        T = st.prefill_len
        dev, f32 = st.k_cache.device, torch.float32
        blocks, block_n, _ = self._step_attn(B)
        S = triton.cdiv(st.cap, blocks * block_n)
        pS = triton.cdiv(st.cap, self.PREFILL_ATTN_BLOCKS * self.PREFILL_ATTN_BLOCK_N)
        if self._flash_prefill(B, T):
            pS = 0  # _flash_attention keeps no partials
        z = lambda *shape, dtype=f32: torch.zeros(*shape, device=dev, dtype=dtype)
        return {
            "S": S, "pf_S": pS,
            "x": z(B * K, C), "q": z(B, H, K, HD), "y": z(B * K, C), "act": z(B * K, self.I),
            "pm": z(B * H * S * K), "pl": z(B * H * S * K), "pacc": z(B * H * S * K, HD),
            "pf_pm": z(B * H * pS * T), "pf_pl": z(B * H * pS * T), "pf_pacc": z(B * H * pS * T, HD),
            "ids": z(B, K, dtype=torch.int32), "picks": z(B, K, dtype=torch.int32),
            "left": z(B, dtype=torch.int32), "run": z(1, dtype=torch.int32), "row_run": z(B, dtype=torch.int32),
            "pf_x": z(B * T, C), "pf_q": z(B, H, T, HD), "pf_y": z(B * T, C), "pf_act": z(B * T, self.I),
            "pf_cos": z(B * T, HD), "pf_sin": z(B * T, HD), "pf_run": torch.ones(1, device=dev, dtype=torch.int32),
        }

    def step(self, st, run_tokens: bool = True) -> None:
        """One decode step on ``st`` (a DecodeState with ``fused_buffers`` and the frame's
        ``rope_cos`` / ``rope_sin``): choose, then (``run_tokens``) run the chosen tokens."""
        b = st.fused_buffers
        B, K, V = st.B, self.K, self.V
        _pick[(B,)](
            st.logits, st.chosen, st.done, b["picks"], b["left"],
            K=K, V=V, PAD=self.pad, BLOCK_V=_pow2(V), BLOCK_K=_pow2(K), **self.launch,
        )
        _select[(1,)](
            b["picks"], b["left"], st.task_loss, st.chosen, st.finished, st.frame_tokens, st.frame_tokens.stride(0),
            st.n_frame, st.cache_len, st.done, st.first, st.budget, st.requirement, st.has_requirement,
            st.key_mask, st.key_mask.stride(0), b["ids"], b["run"], b["row_run"], B,
            K=K, V=V, PAD=self.pad, BLOCK_B=_pow2(B), BLOCK_K=_pow2(K), **self.launch,
        )
        if not run_tokens:
            return
        few = B * K <= self.FEW_ROWS
        bn = self.FEW_ROWS_BLOCK_N if few else self.BLOCK_N
        mlp_br = self.BLOCK_R if few else self.BATCH_MLP_BLOCK_R
        self._forward(st, K, b["ids"], b["ids"], st.rope_cos, st.rope_sin, b["run"],
                      b["x"], b["q"], b["y"], b["act"], self.BLOCK_R, bn, self.NUM_WARPS, self.GEMM_PRECISION,
                      mlp_br)

    def prefill(self, st) -> None:
        """The frame's prefill on ``st``: its ``prefill_len`` tokens per row (the K pending
        slots ``pending_buf``, then ``vision_buf``) at the positions of ``pf_cos``/``pf_sin``,
        with their key mask already in ``st.key_mask``; K/V into the cache, the heads of the
        last token into ``st.logits``/``st.task_loss``, the cache length advanced."""
        b = st.fused_buffers
        T = st.prefill_len
        if self._batch_prefill(st.B, T):
            BR, BN = self.BATCH_PREFILL_BLOCK_R, self.BATCH_PREFILL_BLOCK_N
        else:
            BR, BN = self.PREFILL_BLOCK_R, self.PREFILL_BLOCK_N
        self._forward(st, T, st.pending_buf, st.vision_buf, b["pf_cos"], b["pf_sin"], b["pf_run"],
                      b["pf_x"], b["pf_q"], b["pf_y"], b["pf_act"], BR, BN,
                      self.PREFILL_NUM_WARPS, self.PREFILL_GEMM_PRECISION)

    def prefill_attention(self, st, i: int, q):
        """Layer i's prefill attention for ``DecodeState._layers`` (the large-batch prefill,
        whose GEMMs are cuBLAS's): q (B, H, T, HD) contiguous, the cache and key mask already
        written; returns y (B, T, H * HD)."""
        b = st.fused_buffers
        T = st.prefill_len
        self._attend(st, i, T, q, b["pf_y"], b["pf_run"], self.PREFILL_NUM_WARPS)
        return b["pf_y"].view(st.B, T, self.C)

    def _attend(self, st, i: int, T: int, q, y, run, nw) -> None:
        """Layer i's attention of T queries per row (a step: T = K, the prefill's tokens) into
        y (B * T, C): split-K over the cache (``_attention``), then the splits' merge; a large
        batch's prefill in one pass (``_flash_attention``)."""
        b = st.fused_buffers
        B, K, H, HD = st.B, self.K, self.H, self.HD
        run_stride = 0  # one run flag for every row
        if T == K:  # a step: its K queries in one block
            blocks, abn, anw = self._step_attn(B)
            S, BQ, BS, part = b["S"], _pow2(max(K, 16)), self.MERGE_BLOCK_S, "p"
            # (the merge has no tl.dot: its block is the K queries, not the dot's 16 rows)
            precision, MQ, mnw = self.ATTN_PRECISION, _pow2(K), self.MERGE_NUM_WARPS
            if self.SKIP_PAD_ROWS:  # each row's own run flag (_select's row_run)
                run, run_stride = b["row_run"], 1
        else:
            S, blocks, abn, BQ, BS, part = (b["pf_S"], self.PREFILL_ATTN_BLOCKS, self.PREFILL_ATTN_BLOCK_N,
                                            self.PREFILL_BLOCK_Q, self.PREFILL_MERGE_BLOCK_S, "pf_p")
            anw, precision = nw, self.PREFILL_ATTN_PRECISION
            if self._batch_prefill(B, T):
                BQ, precision = self.BATCH_PREFILL_BLOCK_Q, self.BATCH_PREFILL_ATTN_PRECISION
                if self._flash_prefill(B, T):  # every key in one program: no partials
                    BQ = self.BATCH_PREFILL_FLASH_BLOCK_Q
                    _flash_attention[(triton.cdiv(T, BQ), B * H)](
                        q, st.k_cache[i], st.v_cache[i], st.key_mask, st.key_mask.stride(0), st.cache_len,
                        run, y, st.cap, self.scale,
                        T=T, H=H, HD=HD, BLOCK_N=self.BATCH_PREFILL_FLASH_BLOCK_N, BLOCK_Q=BQ, PRECISION=precision,
                        num_warps=self.BATCH_PREFILL_FLASH_NUM_WARPS, num_stages=self.BATCH_PREFILL_FLASH_STAGES,
                        **self.launch,
                    )
                    return
            # the merge's query blocks nest in the attention's (powers of two), so each reads
            # only splits its queries' attention block wrote
            MQ, mnw = min(BQ, self.PREFILL_MERGE_BLOCK_Q), self.PREFILL_MERGE_NUM_WARPS
        pm, pl, pacc = b[part + "m"], b[part + "l"], b[part + "acc"]
        if pm.numel() < B * H * S * T:  # a state made under other settings (tests, tuning)
            raise BackendError("internal error: the attention's partials were sized for other kernel settings")
        q_blocks = triton.cdiv(T, BQ)
        _attention[(B * H, S, q_blocks)](
            q, st.k_cache[i], st.v_cache[i], st.key_mask, st.key_mask.stride(0), st.cache_len,
            run, pm, pl, pacc, st.cap, S, self.scale,
            T=T, H=H, HD=HD, BLOCKS=blocks, BLOCK_N=abn, BLOCK_Q=BQ, PRECISION=precision,
            RUN_STRIDE=run_stride, num_warps=anw, **self.launch,
        )
        _merge[(B * H, triton.cdiv(T, MQ))](
            pm, pl, pacc, y, st.cache_len, run, S,
            T=T, H=H, HD=HD, SPLIT=blocks * abn, BLOCK_S=BS, BLOCK_Q=MQ, RUN_STRIDE=run_stride, num_warps=mnw,
            **self.launch,
        )

    def _forward(self, st, T, ids, vision, cos, sin, run, x, q, y, act, BR, BN, nw, precision, MLP_BR=None) -> None:
        """The decoder over T tokens per row (a step: T = K; the prefill: the frame's tokens),
        split-K attention over the cache then ``_merge``, then the heads. GEMM tiles of BR
        rows (MLP_BR, default BR, for o_proj, gate/up and down) x BN columns; the layers'
        GEMMs at ``precision`` (the heads' always "ieee")."""
        B, K, V, C, H, HD, I = st.B, self.K, self.V, self.C, self.H, self.HD, self.I
        R = B * T
        BK = self.BLOCK_K
        BC = _pow2(C)
        rows = triton.cdiv(R, BR)
        MLP_BR = MLP_BR or BR
        mlp_rows = triton.cdiv(R, MLP_BR)
        for i, (n_in, w_qkv, w_o, n_post, w_gu, w_down) in enumerate(self.layers):
            _qkv[(rows, 3 * H)](
                x, ids, self.embed, vision, n_in, w_qkv, cos, sin, q,
                st.k_cache[i], st.v_cache[i], st.cache_len, run, R, st.cap, self.eps,
                GATHER=i == 0, T=T, NG=K, C=C, H=H, HD=HD, BLOCK_R=BR, BLOCK_C=BC, BLOCK_K=BK,
                PRECISION=precision, num_warps=nw, **self.launch,
            )
            self._attend(st, i, T, q, y, run, nw)
            _linear_residual[(mlp_rows, triton.cdiv(C, BN))](
                y, w_o, x, run, R, N=C, KD=C, BLOCK_R=MLP_BR, BLOCK_N=BN, BLOCK_K=BK,
                PRECISION=precision, num_warps=nw, **self.launch,
            )
            _gate_up[(mlp_rows, triton.cdiv(I, BN))](
                x, n_post, w_gu, act, run, R, self.eps,
                C=C, I=I, BLOCK_R=MLP_BR, BLOCK_C=BC, BLOCK_N=BN, BLOCK_K=BK, PRECISION=precision, num_warps=nw,
                **self.launch,
            )
            _linear_residual[(mlp_rows, triton.cdiv(C, BN))](
                act, w_down, x, run, R, N=C, KD=I, BLOCK_R=MLP_BR, BLOCK_N=BN, BLOCK_K=BK,
                PRECISION=precision, num_warps=nw, **self.launch,
            )
        NL = K * V
        _heads[(triton.cdiv(B, self.BLOCK_R), triton.cdiv(NL + K, self.HEADS_BLOCK_N))](
            x, self.final_norm, self.w_heads, st.logits, st.task_loss, st.cache_len, run, B, self.eps,
            C=C, K=K, T=T, NL=NL, BLOCK_R=self.BLOCK_R, BLOCK_C=BC, BLOCK_N=self.HEADS_BLOCK_N, BLOCK_K=BK,
            num_warps=nw, **self.launch,
        )
