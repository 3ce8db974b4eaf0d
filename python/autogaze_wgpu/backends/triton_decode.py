"""The torch backend's decoder as one persistent Triton kernel per launch (float32, same math).

The eager decode step (``DecodeState._decode_step``) is ~300 small torch kernels; even as 27
fused kernels (this module's previous form) one decode step of one video was 27 launches of
2-11 us each on an H200, bound by launch latency and each kernel's chain of memory round
trips. Here a launch is one kernel, ``_decoder``, whose ``G`` programs (no more than the GPU
holds resident at once: ``resident_programs``) walk through the phases below, splitting each phase's tasks among
themselves (task t goes to program t mod G) and meeting at a grid-wide barrier
(``_grid_sync``) wherever a phase reads what another program wrote:

* a decode step (``STEP``; up to ``n_steps`` of them per launch, stopping when the frame is
  done): ``_pick_task`` (a task per batch row: the K heads' argmaxes with the no-repeat masks)
  | ``_select_task`` (program 0: the batch-wide budget / exhaustion / task-loss rules, frame
  tokens, done flag, the step's key-mask slots) | the layers | the heads;
* the prefill (``STEP`` false): the layers and the heads over the frame's K pending slots and
  its vision tokens;
* per layer: ``_qkv_task`` (RMSNorm + q/k/v + RoPE + K/V into the static cache; layer 0
  gathers the token embeddings / vision tokens) | attention (a step: ``_attention_task``,
  split-K over the cache, | ``_merge_task``; the prefill: ``_attention_rows_task``, a block
  of queries against all keys) | ``_linear_task`` o_proj + residual | ``_gate_up_task``
  (RMSNorm + gate/up + SwiGLU) | ``_linear_task`` down + residual;
* ``_heads_task``: final RMSNorm of each row's last token, lm_head and the task-loss head; the
  cache length advanced.

Lengths (cache length, frame length) are device scalars read by the kernel, so one CUDA graph
serves every cache length, and a launch of ``n_steps`` steps ends early when the frame is done
(a done frame's launch reads one flag and returns).

The barrier spins a bounded number of times; a barrier that times out (programs not resident
together, which the grid size is chosen to prevent) sets an error flag that the host turns
into ``BackendError`` instead of hanging.

Arithmetic: float32 everywhere; products through ``tl.dot(..., input_precision="ieee")``
(never TF32). The summation order differs from cuBLAS's: logits agree to float32 noise, and
tokens agree wherever the reference's own top-2 logits are further apart than that
(docs/benchmarks.md).

On CPU the kernel runs under Triton's interpreter (``TRITON_INTERPRET=1``) with one program
(G = 1: every barrier passes at once); the tests use it to check this path against the eager
step in CI, which has no GPU.
"""

from __future__ import annotations

import triton
import triton.language as tl

# Spins of a grid barrier before it gives up (each is an L2 round trip, ~1 us): seconds.
MAX_SPINS = tl.constexpr(1 << 22)


def _pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


@triton.jit
def _grid_sync(bar_ptr, err_ptr, G):
    """Grid-wide barrier of the G programs (sense reversal on bar = [count, generation]):
    every program's earlier global writes are visible to every program after it. The count
    is back at 0 after each barrier, so the buffer needs no reset between launches."""
    tl.debug_barrier()  # the whole program's writes are issued before it arrives
    if G > 1:
        gen = tl.atomic_add(bar_ptr + 1, 0, sem="relaxed", scope="gpu")
        arrived = tl.atomic_add(bar_ptr, 1, sem="acq_rel", scope="gpu")
        if arrived == G - 1:  # the last to arrive opens the barrier
            tl.atomic_xchg(bar_ptr, 0, sem="relaxed", scope="gpu")
            tl.atomic_add(bar_ptr + 1, 1, sem="release", scope="gpu")
        else:
            # (once a barrier has timed out, every later one gives up at once: a launch
            # whose programs are not all resident ends instead of hanging barrier after
            # barrier)
            spins = 0
            while (tl.load(bar_ptr + 1, volatile=True) == gen) & (spins < MAX_SPINS):
                spins += 1
                if tl.load(err_ptr, volatile=True) != 0:
                    spins = MAX_SPINS
            if spins >= MAX_SPINS:
                tl.atomic_xchg(err_ptr, 1, sem="relaxed", scope="gpu")
            tl.atomic_add(bar_ptr + 1, 0, sem="acquire", scope="gpu")
    tl.debug_barrier()


@triton.jit
def _pick_task(
    b, logits_ptr, chosen_ptr, picks_ptr, left_ptr,
    K: tl.constexpr, V: tl.constexpr, PAD: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Batch row b's part of the step's choice: the K heads' argmaxes (first maximum on ties)
    over the ids not yet chosen in the frame, never EOS, each pick masked for the later heads
    (even if it becomes pad below); and how many ids the row may still pick."""
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
def _select_task(
    picks_ptr, left_ptr, task_loss_ptr, chosen_ptr, finished_ptr, frame_tokens_ptr, ft_stride,
    n_frame_ptr, cache_len_ptr, done_ptr, first_ptr, budget_ptr, req_ptr, has_req_ptr,
    key_mask_ptr, km_stride, step_ids_ptr, run_ptr, B,
    K: tl.constexpr, V: tl.constexpr, PAD: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """The batch-wide rest of the step's choice (SPEC §5 step 2, as
    ``DecodeState._decode_step`` decides it) from the picks of every row: which heads the
    step keeps, the task-loss stop, the frame's tokens, done flag and the step's key-mask
    slots; ``run`` says whether the step's tokens run (the frame goes on)."""
    rows = tl.arange(0, BLOCK_B)
    ks = tl.arange(0, BLOCK_K)
    rmask = rows < B
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
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """(BLOCK_R, BLOCK_N) = a @ W[out_rows]^T, a = ``_a_chunk``'s rows; chunks of BLOCK_K
    through ``tl.dot`` in IEEE float32 (never TF32)."""
    acc = tl.zeros([BLOCK_R, BLOCK_N], tl.float32)
    for k0 in tl.static_range(0, KD, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        a = _a_chunk(src, rmask, scale, norm_ptr, kk, KD, NORM)
        acc = tl.dot(a, _w_chunk(w_ptr, out_rows, out_ok, kk, KD), acc, input_precision="ieee")
    return acc


@triton.jit
def _matmul_t2(
    src, rmask, scale, norm_ptr, w_ptr, rows_1, rows_2, out_ok,
    KD: tl.constexpr, NORM: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """``_matmul_t`` for two sets of W rows sharing each chunk of a (q/k/v halves, gate/up):
    a is loaded once for both products."""
    acc_1 = tl.zeros([BLOCK_R, BLOCK_N], tl.float32)
    acc_2 = tl.zeros([BLOCK_R, BLOCK_N], tl.float32)
    for k0 in tl.static_range(0, KD, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        a = _a_chunk(src, rmask, scale, norm_ptr, kk, KD, NORM)
        acc_1 = tl.dot(a, _w_chunk(w_ptr, rows_1, out_ok, kk, KD), acc_1, input_precision="ieee")
        acc_2 = tl.dot(a, _w_chunk(w_ptr, rows_2, out_ok, kk, KD), acc_2, input_precision="ieee")
    return acc_1, acc_2


@triton.jit
def _qkv_task(
    rb, j, gather, x_ptr, ids_ptr, embed_ptr, vis_ptr, norm_ptr, w_ptr, cos_ptr, sin_ptr, q_ptr, kc_ptr, vc_ptr,
    cache_len, R, cap, eps,
    T: tl.constexpr, NG: tl.constexpr, C: tl.constexpr, H: tl.constexpr, HD: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """RMSNorm(x) @ [Wq; Wk; Wv]^T for rows block rb and one head j of q, k or v (j in [0,
    3H)), RoPE on q and k, q to ``q_ptr`` (B, H, T, HD) and k/v into the cache at slots
    cache_len + [0, T), for the T tokens of each batch row (R = B * T rows; cos/sin are
    (R, HD) at their positions). Layer 0 (``gather``) starts the residual stream x: a row's
    first NG tokens through embed_tokens (ids (B, NG)), the rest from the vision tokens (B,
    T - NG, C): a decode step has T = NG = K, the prefill the K pending slots, then vision."""
    HALF: tl.constexpr = HD // 2
    which = j // H  # 0 q, 1 k, 2 v
    head = j % H
    rows = rb * BLOCK_R + tl.arange(0, BLOCK_R)
    n = tl.arange(0, HALF)
    rmask = rows < R
    cs = rows[:, None] * HD + n[None, :]
    c_lo = tl.load(cos_ptr + cs, mask=rmask[:, None], other=0.0)
    s_lo = tl.load(sin_ptr + cs, mask=rmask[:, None], other=0.0)
    c_hi = tl.load(cos_ptr + cs + HALF, mask=rmask[:, None], other=0.0)
    s_hi = tl.load(sin_ptr + cs + HALF, mask=rmask[:, None], other=0.0)
    b = rows // T
    t = rows % T
    slot = cache_len + t
    src = x_ptr + rows.to(tl.int64) * C
    if gather:
        gathered = t < NG
        ids = tl.load(ids_ptr + b * NG + t, mask=rmask & gathered, other=0).to(tl.int64)
        src = embed_ptr + ids * C
        if T > NG:
            vis = vis_ptr + (b * (T - NG) + tl.maximum(t - NG, 0)).to(tl.int64) * C
            src = tl.where(gathered, src, vis)
        if j == 0:
            cols = tl.arange(0, BLOCK_C)
            m2 = rmask[:, None] & (cols[None, :] < C)
            emb = tl.load(src[:, None] + cols[None, :], mask=m2, other=0.0)
            tl.store(x_ptr + rows[:, None].to(tl.int64) * C + cols[None, :], emb, mask=m2)
    inv = _rms_scale(src, rmask, C, BLOCK_C, eps)
    base = which * C + head * HD
    ok = n < HALF
    lo, hi = _matmul_t2(src, rmask, inv, norm_ptr, w_ptr, base + n, base + HALF + n, ok, C, True,
                        BLOCK_R, HALF, BLOCK_K)
    if which < 2:  # RoPE, rotate-half convention: (lo, hi) -> (lo c - hi s, hi c + lo s)
        lo, hi = lo * c_lo + (-hi) * s_lo, hi * c_hi + lo * s_hi
    ms = rmask[:, None]
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
    HD: tl.constexpr,
):
    """Online-softmax update of the queries q (tokens qs, at slots cache_len + qs) with the
    keys at slots kn: causal (slot <= the query's), the key mask, slots < end."""
    d = tl.arange(0, HD)
    inn = kn < end
    keys = tl.load(kc_ptr + kv_base + kn[:, None] * HD + d[None, :], mask=inn[:, None], other=0.0)
    vals = tl.load(vc_ptr + kv_base + kn[:, None] * HD + d[None, :], mask=inn[:, None], other=0.0)
    key_ok = tl.load(km_base + kn, mask=inn, other=0).to(tl.int32) != 0
    s = tl.dot(q, tl.trans(keys), input_precision="ieee") * scale
    allowed = (kn[None, :] <= cache_len + qs[:, None]) & key_ok[None, :] & inn[None, :]
    s = tl.where(allowed, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m_i - m_safe)
    p = tl.exp(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(p, vals, acc * alpha[:, None], input_precision="ieee")
    return m_new, l_i, acc


@triton.jit
def _attention_task(
    bh, sp, q_ptr, kc_ptr, vc_ptr, key_mask_ptr, km_stride, cache_len,
    pm_ptr, pl_ptr, pacc_ptr, cap, S, scale,
    H: tl.constexpr, HD: tl.constexpr, K: tl.constexpr,
    BLOCKS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_Q: tl.constexpr,
):
    """The K step queries of one (row, head) bh against split sp of the cache (BLOCKS x
    BLOCK_N keys): causal (query k sees slots <= cache_len + k) and the key mask, softmax
    statistics of the split (max, sum, weighted values) into the partials for ``_merge_task``."""
    b = bh // H
    qs = tl.arange(0, BLOCK_Q)
    d = tl.arange(0, HD)
    qm = qs < K
    q = tl.load(q_ptr + (bh * K + qs)[:, None] * HD + d[None, :], mask=qm[:, None], other=0.0)
    end = cache_len + K
    m_i = tl.full([BLOCK_Q], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_Q], tl.float32)
    acc = tl.zeros([BLOCK_Q, HD], tl.float32)
    kv = (bh * cap * HD).to(tl.int64)
    for j in tl.static_range(BLOCKS):
        kn = (sp * BLOCKS + j) * BLOCK_N + tl.arange(0, BLOCK_N)
        m_i, l_i, acc = _attend_block(q, qs, kn, kv, kc_ptr, vc_ptr, key_mask_ptr + b * km_stride,
                                      cache_len, end, scale, m_i, l_i, acc, HD)
    o = (bh * S + sp) * K + qs
    tl.store(pm_ptr + o, m_i, mask=qm)
    tl.store(pl_ptr + o, l_i, mask=qm)
    tl.store(pacc_ptr + o[:, None] * HD + d[None, :], acc, mask=qm[:, None])


@triton.jit
def _merge_task(
    bh, pm_ptr, pl_ptr, pacc_ptr, y_ptr, used, S,
    H: tl.constexpr, HD: tl.constexpr, K: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_Q: tl.constexpr,
):
    """softmax(scores) @ values of one (row, head) bh from its ``used`` splits (online over
    chunks of BLOCK_S splits); y is (B, K, H*HD)."""
    b = bh // H
    head = bh % H
    qs = tl.arange(0, BLOCK_Q)
    d = tl.arange(0, HD)
    qm = qs < K
    m = tl.full([BLOCK_Q], float("-inf"), tl.float32)
    total = tl.zeros([BLOCK_Q], tl.float32)
    acc = tl.zeros([BLOCK_Q, HD], tl.float32)
    for s0 in range(0, used, BLOCK_S):
        ss = s0 + tl.arange(0, BLOCK_S)
        o = (bh * S + ss)[:, None] * K + qs[None, :]  # (BLOCK_S, BLOCK_Q)
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
    y = acc / tl.where(qm, total, 1.0)[:, None]
    tl.store(y_ptr + (b * K + qs)[:, None] * (H * HD) + head * HD + d[None, :], y, mask=qm[:, None])


@triton.jit
def _attention_rows_task(
    bh, qb, q_ptr, kc_ptr, vc_ptr, key_mask_ptr, km_stride, cache_len, y_ptr, cap, scale,
    T: tl.constexpr, H: tl.constexpr, HD: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """The prefill's attention: block qb of BLOCK_Q of a row's T tokens for one (row, head)
    bh against every cache slot they may see, softmax over all of them; y is (B, T, H*HD).
    A token that sees no key at all (a pad slot of the first frame, never attended and never
    read out) gets 0 rather than 0/0."""
    b = bh // H
    head = bh % H
    qs = qb * BLOCK_Q + tl.arange(0, BLOCK_Q)
    d = tl.arange(0, HD)
    qm = qs < T
    q = tl.load(q_ptr + ((bh * T + qs).to(tl.int64) * HD)[:, None] + d[None, :], mask=qm[:, None], other=0.0)
    end = cache_len + tl.minimum(T, (qb + 1) * BLOCK_Q)  # past the block's last query
    m_i = tl.full([BLOCK_Q], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_Q], tl.float32)
    acc = tl.zeros([BLOCK_Q, HD], tl.float32)
    kv = (bh * cap * HD).to(tl.int64)
    for k0 in range(0, end, BLOCK_N):
        m_i, l_i, acc = _attend_block(q, qs, k0 + tl.arange(0, BLOCK_N), kv, kc_ptr, vc_ptr,
                                      key_mask_ptr + b * km_stride, cache_len, end, scale, m_i, l_i, acc, HD)
    y = tl.where((l_i > 0)[:, None], acc / tl.where(l_i > 0, l_i, 1.0)[:, None], 0.0)
    tl.store(y_ptr + ((b * T + qs).to(tl.int64) * (H * HD))[:, None] + head * HD + d[None, :], y, mask=qm[:, None])


@triton.jit
def _linear_task(
    rb, cb, a_ptr, w_ptr, x_ptr, R,
    N: tl.constexpr, KD: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """x (R, N) += a (R, KD) @ W^T, W (N, KD), for rows block rb and columns block cb:
    o_proj and down_proj with their residual."""
    rows = rb * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = cb * BLOCK_N + tl.arange(0, BLOCK_N)
    m2 = (rows[:, None] < R) & (cols[None, :] < N)
    xo = x_ptr + rows[:, None].to(tl.int64) * N + cols[None, :]
    x = tl.load(xo, mask=m2, other=0.0)
    # (no RMSNorm: the scale and norm arguments are unused, x_ptr stands in for both)
    y = _matmul_t(a_ptr + rows.to(tl.int64) * KD, rows < R, x_ptr, x_ptr, w_ptr, cols, cols < N, KD, False,
                  BLOCK_R, BLOCK_N, BLOCK_K)
    tl.store(xo, x + y, mask=m2)


@triton.jit
def _gate_up_task(
    rb, cb, x_ptr, norm_ptr, w_ptr, act_ptr, R, eps,
    C: tl.constexpr, I: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """act = silu(h Wg^T) * (h Wu^T), h = RMSNorm(x); W = [Wg; Wu] (2I, C)."""
    rows = rb * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = cb * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < R
    src = x_ptr + rows.to(tl.int64) * C
    inv = _rms_scale(src, rmask, C, BLOCK_C, eps)
    g, u = _matmul_t2(src, rmask, inv, norm_ptr, w_ptr, cols, I + cols, cols < I, C, True, BLOCK_R, BLOCK_N, BLOCK_K)
    act = g / (1.0 + tl.exp(-g)) * u
    tl.store(act_ptr + rows[:, None].to(tl.int64) * I + cols[None, :], act, mask=rmask[:, None] & (cols[None, :] < I))


@triton.jit
def _heads_task(
    rb, cb, x_ptr, norm_ptr, w_ptr, logits_ptr, task_loss_ptr, B, eps,
    C: tl.constexpr, K: tl.constexpr, T: tl.constexpr, NL: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Final RMSNorm of each row's last token (of T), then [lm_head; task-loss head] (NL + K
    outputs) for columns block cb: logits (B, NL) and task losses (B, K)."""
    bs = rb * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = cb * BLOCK_N + tl.arange(0, BLOCK_N)
    bmask = bs < B
    src = x_ptr + (bs * T + (T - 1)).to(tl.int64) * C
    inv = _rms_scale(src, bmask, C, BLOCK_C, eps)
    out = _matmul_t(src, bmask, inv, norm_ptr, w_ptr, cols, cols < NL + K, C, True, BLOCK_R, BLOCK_N, BLOCK_K)
    tl.store(logits_ptr + bs[:, None] * NL + cols[None, :], out, mask=bmask[:, None] & (cols[None, :] < NL))
    tm = bmask[:, None] & (cols[None, :] >= NL) & (cols[None, :] < NL + K)
    tl.store(task_loss_ptr + bs[:, None] * K + (cols[None, :] - NL), out, mask=tm)


@triton.jit(do_not_specialize=["n_steps", "G"])
def _decoder(
    # the decode state (DecodeState's tensors)
    logits_ptr, task_loss_ptr, chosen_ptr, finished_ptr, frame_tokens_ptr, ft_stride,
    n_frame_ptr, cache_len_ptr, done_ptr, first_ptr, budget_ptr, req_ptr, has_req_ptr,
    key_mask_ptr, km_stride, kc_ptr, vc_ptr, kv_layer_stride,
    # the weights, stacked over layers
    embed_ptr, n_in_ptr, w_qkv_ptr, w_o_ptr, n_post_ptr, w_gu_ptr, w_down_ptr, final_norm_ptr, w_heads_ptr,
    # this launch's inputs and the scratch
    ids_ptr, vis_ptr, cos_ptr, sin_ptr, x_ptr, q_ptr, y_ptr, act_ptr, pm_ptr, pl_ptr, pacc_ptr,
    picks_ptr, left_ptr, step_ids_ptr, run_ptr, split_count_ptr, bar_ptr, err_ptr,
    B, cap, S, n_steps, eps, scale, G,
    STEP: tl.constexpr, T: tl.constexpr, NLAYERS: tl.constexpr,
    C: tl.constexpr, H: tl.constexpr, HD: tl.constexpr, I: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    PAD: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    HEADS_BLOCK_R: tl.constexpr, HEADS_BLOCK_N: tl.constexpr,
    ATTN_BLOCKS: tl.constexpr, ATTN_BLOCK_N: tl.constexpr, MERGE_BLOCK_S: tl.constexpr,
    PREFILL_BLOCK_Q: tl.constexpr, PICKS_ALONE: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_KP: tl.constexpr,
    STEP_BLOCK_Q: tl.constexpr,
):
    """Up to ``n_steps`` decode steps (STEP), stopping when the frame is done, or the prefill
    (T tokens a row, one pass); program ``pid`` of G takes every G-th task of each phase."""
    pid = tl.program_id(0)
    R = B * T
    row_blocks = tl.cdiv(R, BLOCK_R)
    SPLIT: tl.constexpr = ATTN_BLOCKS * ATTN_BLOCK_N
    NL: tl.constexpr = K * V
    # done is written only after the first barrier of a step, so every program reads the
    # same value here; the prefill always runs.
    run = (tl.load(done_ptr).to(tl.int32) == 0).to(tl.int32)
    if not STEP:
        run = run * 0 + 1
    s = 0
    while (run != 0) & (s < n_steps):
        if STEP:
            # A few rows' picks are quicker in one program than a barrier away.
            if B <= PICKS_ALONE:
                if pid == 0:
                    for b in range(0, B):
                        _pick_task(b, logits_ptr, chosen_ptr, picks_ptr, left_ptr, K, V, PAD, BLOCK_V, BLOCK_KP)
                    tl.debug_barrier()
            else:
                for b in range(pid, B, G):
                    _pick_task(b, logits_ptr, chosen_ptr, picks_ptr, left_ptr, K, V, PAD, BLOCK_V, BLOCK_KP)
                _grid_sync(bar_ptr, err_ptr, G)
            if pid == 0:
                _select_task(
                    picks_ptr, left_ptr, task_loss_ptr, chosen_ptr, finished_ptr, frame_tokens_ptr, ft_stride,
                    n_frame_ptr, cache_len_ptr, done_ptr, first_ptr, budget_ptr, req_ptr, has_req_ptr,
                    key_mask_ptr, km_stride, step_ids_ptr, run_ptr, B,
                    K, V, PAD, BLOCK_B, BLOCK_KP,
                )
            _grid_sync(bar_ptr, err_ptr, G)
            run = tl.load(run_ptr, volatile=True)
        if run != 0:
            cache_len = tl.load(cache_len_ptr, volatile=True).to(tl.int32)
            for layer in range(NLAYERS):
                kc = kc_ptr + layer * kv_layer_stride
                vc = vc_ptr + layer * kv_layer_stride
                n_tasks = row_blocks * 3 * H
                for t in range(pid, n_tasks, G):
                    _qkv_task(
                        t // (3 * H), t % (3 * H), layer == 0, x_ptr, ids_ptr, embed_ptr, vis_ptr,
                        n_in_ptr + layer * C, w_qkv_ptr + layer * (3 * C * C), cos_ptr, sin_ptr, q_ptr, kc, vc,
                        cache_len, R, cap, eps, T, K, C, H, HD, BLOCK_R, BLOCK_C, BLOCK_K,
                    )
                _grid_sync(bar_ptr, err_ptr, G)
                if STEP:
                    used = tl.cdiv(cache_len + K, SPLIT)  # splits holding the step's keys
                    for t in range(pid, B * H * used, G):
                        bh = t % (B * H)
                        _attention_task(
                            bh, t // (B * H), q_ptr, kc, vc, key_mask_ptr, km_stride, cache_len,
                            pm_ptr, pl_ptr, pacc_ptr, cap, S, scale,
                            H, HD, K, ATTN_BLOCKS, ATTN_BLOCK_N, STEP_BLOCK_Q,
                        )
                        # The program that finishes a (row, head)'s last split merges them (no
                        # grid barrier between the splits and the merge); the count is reset.
                        tl.debug_barrier()
                        finished_splits = tl.atomic_add(split_count_ptr + bh, 1, sem="acq_rel", scope="gpu")
                        if finished_splits == used - 1:
                            tl.atomic_xchg(split_count_ptr + bh, 0, sem="relaxed", scope="gpu")
                            tl.debug_barrier()
                            _merge_task(bh, pm_ptr, pl_ptr, pacc_ptr, y_ptr, used, S, H, HD, K, MERGE_BLOCK_S, BLOCK_KP)
                else:
                    q_blocks = tl.cdiv(T, PREFILL_BLOCK_Q)
                    for t in range(pid, B * H * q_blocks, G):
                        _attention_rows_task(
                            t // q_blocks, t % q_blocks, q_ptr, kc, vc, key_mask_ptr, km_stride, cache_len, y_ptr,
                            cap, scale, T, H, HD, PREFILL_BLOCK_Q, ATTN_BLOCK_N,
                        )
                _grid_sync(bar_ptr, err_ptr, G)
                c_blocks = tl.cdiv(C, BLOCK_N)
                for t in range(pid, row_blocks * c_blocks, G):
                    _linear_task(t // c_blocks, t % c_blocks, y_ptr, w_o_ptr + layer * (C * C), x_ptr, R,
                                 C, C, BLOCK_R, BLOCK_N, BLOCK_K)
                _grid_sync(bar_ptr, err_ptr, G)
                i_blocks = tl.cdiv(I, BLOCK_N)
                for t in range(pid, row_blocks * i_blocks, G):
                    _gate_up_task(t // i_blocks, t % i_blocks, x_ptr, n_post_ptr + layer * C,
                                  w_gu_ptr + layer * (2 * I * C), act_ptr, R, eps,
                                  C, I, BLOCK_R, BLOCK_C, BLOCK_N, BLOCK_K)
                _grid_sync(bar_ptr, err_ptr, G)
                for t in range(pid, row_blocks * c_blocks, G):
                    _linear_task(t // c_blocks, t % c_blocks, act_ptr, w_down_ptr + layer * (C * I), x_ptr, R,
                                 C, I, BLOCK_R, BLOCK_N, BLOCK_K)
                _grid_sync(bar_ptr, err_ptr, G)
            h_blocks = tl.cdiv(NL + K, HEADS_BLOCK_N)
            for t in range(pid, tl.cdiv(B, HEADS_BLOCK_R) * h_blocks, G):
                _heads_task(t // h_blocks, t % h_blocks, x_ptr, final_norm_ptr, w_heads_ptr, logits_ptr, task_loss_ptr,
                            B, eps, C, K, T, NL, HEADS_BLOCK_R, BLOCK_C, HEADS_BLOCK_N, BLOCK_K)
            if pid == 0:  # nothing in this launch reads the cache length after the last barrier
                tl.store(cache_len_ptr, (cache_len + T).to(tl.int64))
            if STEP:
                _grid_sync(bar_ptr, err_ptr, G)  # the next step's picks read these logits
        s += 1


def supported(cfg) -> bool:
    """Whether the kernel fits this decoder's shapes: heads tile the hidden size, a head's
    halves are whole ``tl.dot`` tiles (power of two, >= 32) and K fits one 16-row tile."""
    hd = cfg.head_dim
    return (
        cfg.num_attention_heads * hd == cfg.hidden_size
        and hd >= 32 and hd & (hd - 1) == 0
        and cfg.num_multi_token_pred <= 16
    )


def _interpreted(device) -> bool:
    """Whether launches on ``device`` run under Triton's interpreter (CPU tensors)."""
    import os

    return device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def resident_programs(kernel, device, per_sm: int) -> int:
    """Programs of a persistent launch of the compiled ``kernel`` on ``device``: up to
    ``per_sm`` on each SM, as many as its registers, shared memory and thread slots let be
    resident at once (which the grid barrier needs)."""
    import torch

    props = torch.cuda.get_device_properties(device)
    kernel._init_handles()  # loads the binary: its register count
    threads = 32 * kernel.metadata.num_warps
    regs = -(-kernel.n_regs * 32 // 256) * 256 * (threads // 32)  # allocated per warp, 256 at a time
    by_regs = props.regs_per_multiprocessor // max(regs, 1)
    by_shared = props.shared_memory_per_multiprocessor // (kernel.metadata.shared + 1024)  # +1 KiB reserved
    by_threads = props.max_threads_per_multi_processor // threads
    per_sm = min(per_sm, by_regs, by_shared, by_threads)
    if per_sm < 1:
        from ..errors import BackendError

        raise BackendError(f"the fused decode kernel does not fit one SM of {props.name}; "
                           "decode_kernels='torch' avoids it")
    return props.multi_processor_count * per_sm


class FusedDecoder:
    """The decoder's weights stacked for the kernel (once per backend), and the launches of
    decode steps and of the prefill on a ``DecodeState``'s buffers."""

    # Rows per GEMM tile (tl.dot needs >= 16) and output columns per task (few rows, one
    # video's 10, take narrower blocks for more tasks); reduction chunk; heads columns per
    # task; a split of the step's attention is ATTN_BLOCKS blocks of ATTN_BLOCK_N keys;
    # _merge_task takes MERGE_BLOCK_S splits at a time; warps per program.
    # (scripts/tune_triton_decode.py times alternatives on a GPU.)
    BLOCK_R, BLOCK_N, BLOCK_K, HEADS_BLOCK_N = 16, 32, 64, 64
    FEW_ROWS, FEW_ROWS_BLOCK_N = 64, 16
    ATTN_BLOCKS, ATTN_BLOCK_N = 2, 64
    MERGE_BLOCK_S = 16
    # Batches of up to PICKS_ALONE rows have all their picks made by program 0 (no barrier).
    PICKS_ALONE = 4
    # Warps per program; software-pipelining stages of the step's kernel (1: none; 3,
    # Triton's default, took the shared memory to 218 KiB, past many GPUs' limit).
    NUM_WARPS, NUM_STAGES = 4, 1
    # The prefill (~275 tokens a row; its own compilation): rows per GEMM tile, columns per
    # task, queries and keys per attention block, pipelining stages.
    PREFILL_BLOCK_R, PREFILL_BLOCK_N, PREFILL_BLOCK_Q, PREFILL_ATTN_BLOCK_N = 32, 32, 32, 64
    PREFILL_NUM_STAGES = 1
    # Programs per launch: PROGRAMS if set, else PROGRAMS_PER_SM on each SM where the
    # compiled kernel's registers and shared memory let that many be resident (2 at most on
    # an H200). One video's rows (<= FEW_ROWS) have too few tasks per phase to use a second
    # program per SM (its step: 293 us with 1, 299 with 2); 45 tiles' step took 2427 us with
    # 1 and 1842 with 2 (scripts/tune_triton_decode.py, 3000 keys).
    PROGRAMS, PROGRAMS_PER_SM, FEW_ROWS_PROGRAMS_PER_SM = None, 2, 1
    # Under the interpreter (CPU tests) every Triton op costs ~0.1 ms of Python whatever its
    # size, so the tiles are as large as the shapes allow (one program runs every task): the
    # same kernel with far fewer tasks and ops. Only the summation order within a product
    # (BLOCK_K chunks) and the attention splits differ from the GPU tiles.
    INTERPRETER_TILES = {
        "BLOCK_R": 32, "BLOCK_N": 128, "BLOCK_K": 256, "HEADS_BLOCK_N": 512, "FEW_ROWS_BLOCK_N": 128,
        "ATTN_BLOCKS": 1, "ATTN_BLOCK_N": 512, "PREFILL_BLOCK_R": 256, "PREFILL_BLOCK_N": 128,
        "PREFILL_BLOCK_Q": 256, "PREFILL_ATTN_BLOCK_N": 512,
    }

    def __init__(self, backend):
        import torch

        dec = backend.model.gaze_decoder
        cfg = dec.cfg
        self.C, self.H, self.HD = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim
        self.I, self.K, self.V = cfg.intermediate_size, cfg.num_multi_token_pred, cfg.vocab_size
        self.NLAYERS = cfg.num_hidden_layers
        self.pad, self.eps = cfg.eos_token_id, float(cfg.rms_norm_eps)
        self.scale = float(dec.model.layers[0].self_attn.scaling)
        c = lambda t: t.detach().float().contiguous()
        stack = lambda ts: torch.stack([c(t) for t in ts]).contiguous()
        layers = dec.model.layers
        self.embed = c(dec.model.embed_tokens.weight)
        # [Wq; Wk; Wv] and [Wg; Wu] are the backend's concatenations, stacked over layers.
        w_qkv, w_gu = zip(*backend.fused_weights, strict=True)
        self.n_in = stack([layer.input_layernorm.weight for layer in layers])
        self.w_qkv = stack(w_qkv)
        self.w_o = stack([layer.self_attn.o_proj.weight for layer in layers])
        self.n_post = stack([layer.post_attention_layernorm.weight for layer in layers])
        self.w_gu = stack(w_gu)
        self.w_down = stack([layer.mlp.down_proj.weight for layer in layers])
        self.final_norm = c(dec.model.norm.weight)
        self.w_heads = c(torch.cat([dec.lm_head.weight, dec.task_loss_prediction_head.weight]))
        self.device = backend.device
        self.interpreted = _interpreted(backend.device)
        if self.interpreted:
            for name, value in self.INTERPRETER_TILES.items():
                setattr(self, name, value)
        self.programs: dict[tuple, int] = {}  # by the launch's compile-time arguments

    def buffers(self, st) -> dict:
        """The steps' and the prefill's scratch buffers for a state of (batch, capacity);
        the prefill's RoPE tables (``pf_cos``/``pf_sin``) are filled by the caller."""
        import torch

        B, K, C, H, HD = st.B, self.K, self.C, self.H, self.HD
        T = st.prefill_len
        dev, f32 = st.k_cache.device, torch.float32
        S = triton.cdiv(st.cap, self.ATTN_BLOCKS * self.ATTN_BLOCK_N)
        z = lambda *shape, dtype=f32: torch.zeros(*shape, device=dev, dtype=dtype)
        return {
            "S": S,
            "x": z(B * K, C), "q": z(B, H, K, HD), "y": z(B * K, C), "act": z(B * K, self.I),
            "pm": z(B * H * S * K), "pl": z(B * H * S * K), "pacc": z(B * H * S * K, HD),
            "ids": z(B, K, dtype=torch.int32), "picks": z(B, K, dtype=torch.int32),
            "left": z(B, dtype=torch.int32), "run": z(1, dtype=torch.int32),
            "split_count": z(B * H, dtype=torch.int32),  # splits of each (row, head) done
            "pf_x": z(B * T, C), "pf_q": z(B, H, T, HD), "pf_y": z(B * T, C), "pf_act": z(B * T, self.I),
            "pf_cos": z(B * T, HD), "pf_sin": z(B * T, HD),
            # the grid barrier's [count, generation] and the timeout flag the host checks
            "barrier": z(2, dtype=torch.int32), "error": z(1, dtype=torch.int32),
        }

    def steps(self, st, n_steps: int = 1) -> None:
        """Up to ``n_steps`` decode steps on ``st`` (a DecodeState with ``fused_buffers`` and
        the frame's ``rope_cos`` / ``rope_sin``), in one launch that ends when the frame is
        done: each step chooses, then runs the chosen tokens."""
        b = st.fused_buffers
        bn = self.FEW_ROWS_BLOCK_N if st.B * self.K <= self.FEW_ROWS else self.BLOCK_N
        tiles = {"BLOCK_R": self.BLOCK_R, "BLOCK_N": bn, "ATTN_BLOCK_N": self.ATTN_BLOCK_N,
                 "num_stages": self.NUM_STAGES}
        self._launch(st, True, self.K, n_steps, b["ids"], b["ids"], st.rope_cos, st.rope_sin,
                     b["x"], b["q"], b["y"], b["act"], tiles)

    step = steps  # one step

    def prefill(self, st) -> None:
        """The frame's prefill on ``st``: its ``prefill_len`` tokens per row (the K pending
        slots ``pending_buf``, then ``vision_buf``) at the positions of ``pf_cos``/``pf_sin``,
        with their key mask already in ``st.key_mask``; K/V into the cache, the heads of the
        last token into ``st.logits``/``st.task_loss``, the cache length advanced."""
        b = st.fused_buffers
        tiles = {"BLOCK_R": self.PREFILL_BLOCK_R, "BLOCK_N": self.PREFILL_BLOCK_N,
                 "ATTN_BLOCK_N": self.PREFILL_ATTN_BLOCK_N, "num_stages": self.PREFILL_NUM_STAGES}
        self._launch(st, False, st.prefill_len, 1, st.pending_buf, st.vision_buf, b["pf_cos"], b["pf_sin"],
                     b["pf_x"], b["pf_q"], b["pf_y"], b["pf_act"], tiles)

    def _launch(self, st, step, T, n_steps, ids, vision, cos, sin, x, q, y, act, tiles) -> None:
        b = st.fused_buffers
        args = [
            st.logits, st.task_loss, st.chosen, st.finished, st.frame_tokens, st.frame_tokens.stride(0),
            st.n_frame, st.cache_len, st.done, st.first, st.budget, st.requirement, st.has_requirement,
            st.key_mask, st.key_mask.stride(0), st.k_cache, st.v_cache, st.k_cache.stride(0),
            self.embed, self.n_in, self.w_qkv, self.w_o, self.n_post, self.w_gu, self.w_down,
            self.final_norm, self.w_heads,
            ids, vision, cos, sin, x, q, y, act, b["pm"], b["pl"], b["pacc"],
            b["picks"], b["left"], b["ids"], b["run"], b["split_count"], b["barrier"], b["error"],
            st.B, st.cap, b["S"], n_steps, self.eps, self.scale,
        ]
        consts = dict(
            STEP=step, T=T, NLAYERS=self.NLAYERS, C=self.C, H=self.H, HD=self.HD, I=self.I, K=self.K,
            V=self.V, PAD=self.pad, BLOCK_K=self.BLOCK_K, HEADS_BLOCK_R=16, HEADS_BLOCK_N=self.HEADS_BLOCK_N,
            ATTN_BLOCKS=self.ATTN_BLOCKS, MERGE_BLOCK_S=self.MERGE_BLOCK_S, PREFILL_BLOCK_Q=self.PREFILL_BLOCK_Q,
            PICKS_ALONE=self.PICKS_ALONE, BLOCK_C=_pow2(self.C), BLOCK_V=_pow2(self.V), BLOCK_B=_pow2(st.B), BLOCK_KP=_pow2(self.K),
            STEP_BLOCK_Q=_pow2(max(self.K, 16)), num_warps=self.NUM_WARPS, **tiles,
        )
        # (Triton specialises on an int being 1; the rows decide the programs per SM)
        key = tuple(sorted(consts.items())) + (st.B == 1, st.B * self.K <= self.FEW_ROWS)
        G = self.programs.get(key)
        if G is None:  # first launch of this kernel: compile it, then size the grid
            if self.interpreted:
                G = 1  # the interpreter runs programs one after another: one takes every task
            elif self.PROGRAMS:
                G = self.PROGRAMS
            else:
                kernel = _decoder.warmup(*args, 1, grid=(1,), **consts)
                few = st.B * self.K <= self.FEW_ROWS
                per_sm = self.FEW_ROWS_PROGRAMS_PER_SM if few else self.PROGRAMS_PER_SM
                G = resident_programs(kernel, self.device, per_sm)
            self.programs[key] = G
        _decoder[(G,)](*args, G, **consts)
