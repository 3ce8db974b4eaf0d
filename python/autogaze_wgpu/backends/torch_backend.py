"""``backend="torch"``: the reference's math with a loop built for speed on CUDA.

Same layers and weights as the reference (``reference/modeling.py``); what differs is how the
per-frame loop runs:

* a preallocated (static) KV cache and key mask sized for the whole clip, written at offsets;
* the frame's prefill runs on static buffers (the pending step padded to K masked slots) and
  is captured in a CUDA graph per key bucket;
* the decode step is shape-static and written with GPU-side state only (selection, no-repeat
  mask, finished rows, budget, stop flag, cache length), so it never synchronises with the
  host and is captured in a CUDA graph (``steps_per_sync`` steps per graph launch); on CUDA
  in float32 it is the fused Triton kernels of ``triton_decode.py`` (which run the prefill
  too), else the eager torch step below (``decode_kernels``);
* steps after a frame is done are no-ops on the state (their writes land past the valid
  length, or are masked off), so the host checks the done flag once per graph launch instead
  of every step; the launches run at most the ceil(budget / K) steps a frame can take, the
  last of them choosing only (``DecodeState.frame``);
* the host reads one small status tensor (done flag, frame length, cache length) per graph
  launch when a task-loss stop can end a frame early (``OVERLAP_STATUS_READS``, off by
  default until measured on a GPU: on CUDA one launch behind, from pinned memory, while the
  next launch runs), and nothing at all when none can (the frame's end is then known: the
  clip is queued without waiting); the tokens of a clip come to the host in one copy;
* decode states (buffers + graphs) are cached per shape in a small LRU that streaming
  sessions share, so a new session or a ``reset()`` does not recapture graphs.

Parity mode (the default, ``precision="float32"``) is float32 with TF32 off; it gives the
reference's tokens. The fast modes change only the products' arithmetic: "tf32" lets cuBLAS and
cuDNN use TF32 and on CUDA runs the Triton kernels with single-pass TF32 products (a no-op on
CPU: CPU matmuls stay float32), "bf16" runs the vision convs and
the decoder's GEMMs in bfloat16 under autocast (decoder weights cast once); norms, softmax,
RoPE, the KV cache and the whole selection (argmax, masks, stop rules) stay float32.
"""

from __future__ import annotations

import collections
import contextlib
import os
import sys
import threading
import weakref
from typing import Optional

import numpy as np

from ..errors import BackendError, InputError
from .reference import ReferenceBackend, require_torch, tf32_switch, torch

if torch is not None:
    import torch.nn.functional as F

    from ..reference.modeling import rope_cos_sin, rotate_half


def _gemv(x, w):
    """x @ w.T as products and a sum: for a handful of rows this beats cuBLAS's fp32 GEMM
    kernels (~45 us each on an H100 for 10x192x192) by an order of magnitude."""
    return (x.unsqueeze(-2) * w).sum(-1)


def load_triton_decode():
    """Imports ``triton_decode`` (and so Triton). libtriton carries its own LLVM; imported
    into a process that already holds a shared libLLVM (Mesa's, which Vulkan loads for
    lavapipe when wgpu enumerates adapters) it binds to that one's symbols and crashes the
    interpreter, so Triton's libraries are loaded with RTLD_DEEPBIND (their own symbols
    first) where the platform has it."""
    if "triton" not in sys.modules and hasattr(os, "RTLD_DEEPBIND"):
        flags = sys.getdlopenflags()
        sys.setdlopenflags(flags | os.RTLD_DEEPBIND)
        try:
            import triton  # noqa: F401
        finally:
            sys.setdlopenflags(flags)
    from . import triton_decode

    return triton_decode


class StatusRing:
    """Two pinned host slots for decode launches' statuses (done, frame length, cache
    length) and the events that mark each copy's arrival: ``DecodeState.frame`` reads a
    launch's status through them while the next launch runs. A backend takes one from a
    process-wide pool (``take``) and hands it back when it is collected; rings are never
    freed. Why: when torch frees a pinned block that an async copy used, it records an event
    on that copy's stream, and a free from garbage collection while another graph was being
    captured broke that capture (H100, 2026-12-05: "operation failed due to a previous
    error during capture", with a pinned buffer per decode state)."""

    _pool: "collections.defaultdict[int, list[StatusRing]]" = collections.defaultdict(list)

    def __init__(self, device: "torch.device"):
        self.device = device
        self.host = torch.zeros(2, 3, dtype=torch.int64, pin_memory=True)
        self.events = [torch.cuda.Event(), torch.cuda.Event()]

    @classmethod
    def take(cls, owner, device: "torch.device") -> "StatusRing":
        """A ring for CUDA ``device``, back in the pool when ``owner`` is collected."""
        if device.index is None:  # "cuda": the current device, as torch places its tensors
            device = torch.device("cuda", torch.cuda.current_device())
        pool = cls._pool[device.index]
        try:
            ring = pool.pop()  # (atomic under the GIL, as is the append below)
        except IndexError:
            with torch.cuda.device(device):  # the events' and the pinned block's device
                ring = cls(device)
        weakref.finalize(owner, pool.append, ring)
        return ring

    def put(self, i: int, status: "torch.Tensor") -> None:
        """Queues slot i's copy of the device ``status`` after the work queued so far."""
        stream = torch.cuda.current_stream(self.device)
        self.host[i].copy_(status, non_blocking=True)
        self.events[i].record(stream)

    def get(self, i: int) -> list[int]:
        """Slot i's status once its copy has landed (waits for that copy only)."""
        self.events[i].synchronize()
        return self.host[i].tolist()


class DecodeState:
    """Static buffers of one (batch, capacity) decode problem, reusable across calls."""

    # Rows (batch x tokens) up to which the decode step uses products + sums.
    SMALL_ROWS = 64
    # Decode steps attend to a bucket of the cache covering the frame (one graph per bucket).
    KV_BUCKET = 512

    def __init__(self, backend: "TorchBackend", batch: int, capacity: int):
        dec = backend.model.gaze_decoder
        cfg = dec.cfg
        dev = backend.device
        self.backend = backend
        self.B, self.cap = batch, capacity
        self.K, self.V, self.pad = cfg.num_multi_token_pred, cfg.vocab_size, cfg.eos_token_id
        nl, nh, hs = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.head_dim
        f32, i64 = torch.float32, torch.int64
        self.k_cache = torch.zeros(nl, batch, nh, capacity, hs, device=dev, dtype=f32)
        self.v_cache = torch.zeros_like(self.k_cache)
        self.key_mask = torch.zeros(batch, capacity, device=dev, dtype=torch.bool)
        # Per-frame decode state, all on the device.
        self.logits = torch.zeros(batch, self.K, self.V, device=dev, dtype=f32)
        self.task_loss = torch.zeros(batch, self.K, device=dev, dtype=f32)
        self.decode_pos = torch.zeros(batch, self.K, device=dev, dtype=i64)
        self.chosen = torch.zeros(batch, self.V, device=dev, dtype=torch.bool)
        self.finished = torch.zeros(batch, device=dev, dtype=torch.bool)
        self.frame_tokens = torch.full((batch, self.V + self.K), self.pad, device=dev, dtype=i64)
        self.n_frame = torch.zeros((), device=dev, dtype=i64)
        self.cache_len = torch.zeros((), device=dev, dtype=i64)
        self.done = torch.zeros((), device=dev, dtype=torch.bool)
        self.first = torch.ones((), device=dev, dtype=torch.bool)
        self.budget = torch.zeros((), device=dev, dtype=i64)
        self.requirement = torch.zeros((), device=dev, dtype=f32)
        self.has_requirement = torch.zeros((), device=dev, dtype=torch.bool)
        self.arange_k = torch.arange(self.K, device=dev)
        self.key_idx = torch.arange(capacity, device=dev)
        # The prefill's static inputs: the pending step padded to K slots, the vision tokens.
        P, C = backend.config.connector.num_tokens, cfg.hidden_size
        self.pending_buf = torch.full((batch, self.K), self.pad, device=dev, dtype=i64)
        self.vision_buf = torch.zeros(batch, P, C, device=dev, dtype=f32)
        self.vision_ok = torch.ones(batch, P, device=dev, dtype=torch.bool)
        self.prefill_idx = torch.arange(self.K + P, device=dev)
        self.prefill_len = self.K + P
        self.graphs: dict[tuple[str, int], "torch.cuda.CUDAGraph"] = {}  # by (what, key length)
        # What the host reads after each graph launch, in one copy: done, n_frame, cache_len.
        self.status = torch.zeros(3, device=dev, dtype=i64)
        self.kv_len = capacity  # keys the decode step attends to (set per graph launch)
        self.steps_per_graph = backend.steps_per_sync
        self.key = (batch, capacity)
        self.nbytes = 2 * self.k_cache.nbytes  # the KV cache (graph pools not counted)
        # The fused (Triton) decode step's scratch and the frame's RoPE table at the decode
        # positions; its kernels read the lengths from the device, so one graph serves all.
        # (The prefill attention's partials are the largest scratch, ~11% of the KV cache.)
        self.fused = backend.fused
        if self.fused is not None:
            self.fused_buffers = self.fused.buffers(self)
            self.rope_cos = torch.zeros(batch, self.K, hs, device=dev, dtype=f32)
            self.rope_sin = torch.zeros_like(self.rope_cos)
            self.nbytes += sum(t.nbytes for t in self.fused_buffers.values() if isinstance(t, torch.Tensor))
        self.reset()

    def reset(self) -> None:
        """Back to an empty sequence (the buffers and any captured graph are kept)."""
        self.length = 0  # host copy of the cache length between frames
        self.unchecked: list[tuple["torch.Tensor", list[int]]] = []  # see verify()
        self.key_mask.zero_()
        self.pending: Optional["torch.Tensor"] = None

    # -- the decoder on static buffers ------------------------------------------------------
    def _layers(self, x, position_ids, start, bias, kv_len, attend=None):
        """Runs x (B, L, C) whose K/V go to cache slots start + [0, L); attends to the first
        ``kv_len`` slots with ``bias`` (B, 1, L, kv_len), or through ``attend(layer, q)``
        (q (B, nh, L, hd) -> (B, L, C), the cache already written). ``start`` is a host int
        or a 0-d device tensor. Returns the heads at the last position."""
        dec = self.backend.model.gaze_decoder
        cos, sin = rope_cos_sin(dec.model.inv_freq, position_ids)
        cos, sin = cos[:, None], sin[:, None]
        B, L, _ = x.shape
        slots = start + torch.arange(L, device=x.device)
        small = self.backend.small_ops and B * L <= self.SMALL_ROWS
        lin = _gemv if small else F.linear
        w = self.backend.gemm_weights  # the parameters themselves, or bf16 copies in bf16 mode
        for i, layer in enumerate(dec.model.layers):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            if small:
                w_qkv, w_gu = self.backend.fused_weights[i]
                qkv = _gemv(h, w_qkv).view(B, L, 3, attn.n_head, attn.head_dim)
                c, s = cos[:, 0, :, None, None], sin[:, 0, :, None, None]  # (B, L, 1, 1, hd)
                qk = qkv[:, :, :2] * c + rotate_half(qkv[:, :, :2]) * s
                q, k = qk[:, :, 0].transpose(1, 2), qk[:, :, 1].transpose(1, 2)
                v = qkv[:, :, 2].transpose(1, 2)
            else:
                q = lin(h, w[attn.q_proj]).view(B, L, attn.n_head, attn.head_dim).transpose(1, 2)
                k = lin(h, w[attn.k_proj]).view(B, L, attn.n_head, attn.head_dim).transpose(1, 2)
                v = lin(h, w[attn.v_proj]).view(B, L, attn.n_head, attn.head_dim).transpose(1, 2)
                q = q * cos + rotate_half(q) * sin
                k = k * cos + rotate_half(k) * sin
            # The cache stays float32 in every mode (.to is a no-op in float32).
            self.k_cache[i].index_copy_(2, slots, k.to(self.k_cache.dtype))
            self.v_cache[i].index_copy_(2, slots, v.to(self.v_cache.dtype))
            if attend is not None:
                y = attend(i, q.contiguous())
            else:
                keys, values = self.k_cache[i][:, :, :kv_len], self.v_cache[i][:, :, :kv_len]
                if small:  # (B, nh, L, kv): products + sums instead of tiny fp32 batched GEMMs
                    att = (q[:, :, :, None, :] * keys[:, :, None]).sum(-1) * attn.scaling + bias
                    p = F.softmax(att, dim=-1, dtype=torch.float32)
                    y = (p[..., None] * values[:, :, None]).sum(-2)
                else:
                    att = torch.matmul(q, keys.transpose(2, 3)) * attn.scaling + bias
                    y = torch.matmul(F.softmax(att, dim=-1, dtype=torch.float32), values)
                y = y.transpose(1, 2).reshape(B, L, -1)
            x = x + lin(y, w[attn.o_proj])
            m = layer.mlp
            hm = layer.post_attention_layernorm(x)
            if small:
                gate, up = _gemv(hm, w_gu).chunk(2, dim=-1)
                x = x + lin(F.silu(gate) * up, w[m.down_proj])
            else:
                x = x + lin(F.silu(lin(hm, w[m.gate_proj])) * lin(hm, w[m.up_proj]), w[m.down_proj])
        hf = dec.model.norm(x[:, -1])
        K, V = dec.cfg.num_multi_token_pred, dec.cfg.vocab_size
        logits = lin(hf, w[dec.lm_head]).view(B, K, V)
        return logits, lin(hf, w[dec.task_loss_prediction_head])

    def _bias(self, query_slots, key_ok):
        """Additive mask (B, 1, L, n_keys): causal over cache slots plus the key mask."""
        n = key_ok.shape[1]
        allowed = (self.key_idx[None, :n] <= query_slots[:, None])[None] & key_ok[:, None, :]
        return torch.zeros(allowed.shape, device=allowed.device).masked_fill_(
            ~allowed, torch.finfo(torch.float32).min
        )[:, None]

    # -- one frame --------------------------------------------------------------------------
    def frame(
        self, vision_embeds, budget: int, requirement: Optional[float], ring: Optional["StatusRing"] = None
    ) -> "torch.Tensor":
        """One frame (prefill, then decode steps until it is done); its tokens on the device.
        With a ``ring`` (CUDA) the host reads each launch's status one launch behind through
        it; without, before the next launch (a stream's frame: the launch past the frame's
        end would add to its latency)."""
        pad, K = self.pad, self.K
        # 1. Prefill, a static shape: the previous frame's pending last step padded to K
        #    slots, then the vision tokens (see _prefill). Its inputs go into static buffers;
        #    the host-valued settings are written here, outside any graph.
        n_pending = 0 if self.pending is None else self.pending.shape[1]
        self.pending_buf.fill_(pad)
        if n_pending:
            self.pending_buf[:, :n_pending].copy_(self.pending)
        self.vision_buf.copy_(vision_embeds)
        self.cache_len.fill_(self.length)
        self.budget.fill_(budget)
        self.has_requirement.fill_(requirement is not None)
        self.requirement.fill_(0.0 if requirement is None else requirement)
        L = K + vision_embeds.shape[1]
        # (the Triton kernels bound the keys themselves: one graph for every cache length)
        self._run(("prefill", self.cap if self.fused is not None else self._bucket(self.length + L)))
        self.length += L

        # 2. Decode steps: device-side state only. Every step that does not end the frame
        #    adds K slots (the reference's loop stops at the budget or on exhaustion), so a
        #    frame takes at most ceil(budget / K) steps and the last of them always ends it:
        #    it only chooses (its tokens wait for the next prefill). The graph launches cover
        #    exactly that: up to steps_per_graph full steps each, the last launch ending with
        #    the choosing-only step. With no task-loss stop and a budget the ids cover (no
        #    exhaustion) the frame takes every one of those steps, so its end is known here
        #    and the host reads nothing (``verify`` checks it later, in one read).
        bound = max(1, -(-budget // K))
        full = bound - 1
        known = requirement is None and budget < self.V
        if self.fused is not None:
            kv_len = self.cap  # the kernels bound the keys themselves: one graph
        else:
            kv_len = self._bucket(self.length + (bound + 1) * K)
        launch = 0
        while True:
            n = min(self.steps_per_graph, full)
            full -= n
            self._run(("steps", kv_len, n, full == 0))
            if known:
                if full == 0:
                    n_t, cache_len = budget, self.length + (bound - 1) * K
                    # the device's status, copied without a sync, for verify()
                    self.unchecked.append((self.status.clone(), [1, n_t, cache_len]))
                    break
                continue
            if ring is None:
                # The one host sync per graph launch: done flag, frame length and cache length.
                done, n_t, cache_len = self.status.tolist()
            else:
                # Through a ring the host reads the status one launch behind: this launch's
                # goes to pinned memory, and the previous launch's is read while this one
                # runs, so the GPU does not idle through each read. When the previous launch
                # had ended the frame, this one ran no-op steps, which leave the status as it
                # was (the price: one launch of them a frame, each about a step's time: the
                # kernels mask their stores rather than branch). The last launch's own status
                # is read. The first version (H100, 2026-12-05): 45 tiles 284 -> 243 ms; a
                # stream's frame 4.8 -> 6.1 ms, so streams read in step.
                i = launch % 2
                ring.put(i, self.status)
                launch += 1
                if full == 0:
                    done, n_t, cache_len = ring.get(i)
                elif launch > 1:
                    done, n_t, cache_len = ring.get(1 - i)
                else:
                    continue
            if done:
                break
            if full == 0:  # pragma: no cover - the budget bounds the steps
                raise BackendError("decode loop did not finish within the budget")

        # 3. Frame end (no further sync): its run steps take their final mask; the last step
        #    waits for the next prefill.
        n_run = cache_len - self.length
        tokens = self.frame_tokens[:, :n_t].clone()
        self.key_mask[:, self.length : self.length + n_run] = tokens[:, :n_run] != pad
        self.length += n_run
        self.pending = tokens[:, n_run:]
        return tokens

    def verify(self) -> None:
        """Checks the device's status after each frame whose end ``frame`` worked out on the
        host without reading it (see step 2 there), in one read; a mismatch is a bug in this
        backend, not bad input."""
        checks, self.unchecked = self.unchecked, []
        if checks:
            got = torch.stack([t for t, _ in checks]).tolist()
            for i, (g, (_, want)) in enumerate(zip(got, checks)):
                if g != want:
                    raise BackendError(
                        f"internal error: decode status {g} (done, frame slots, cache length) "
                        f"after frame {i} of {len(checks)} without task-loss stop, expected {want}"
                    )

    def _bucket(self, n: int) -> int:
        """Keys attended to by a launch: n rounded up to KV_BUCKET (one graph per bucket)."""
        return min(self.cap, -(-n // self.KV_BUCKET) * self.KV_BUCKET)

    def _prefill(self, kv_len: int) -> None:
        """The frame's prefill on static buffers from the device-side cache length: K pending
        slots (the previous frame's last step, padded with pad tokens) + the vision tokens.
        Pad slots get key mask 0, so no later query attends to them and they do not count in
        the positions cumsum(mask) - 1 (masked slots read 1): the same attention as running
        only the real pending tokens. Then the heads at the last slot and the frame's fresh
        decode state."""
        dec = self.backend.model.gaze_decoder
        K = self.K
        ok = torch.cat([self.pending_buf != self.pad, self.vision_ok], dim=1)
        slots = self.cache_len + self.prefill_idx
        self.key_mask.index_copy_(1, slots, ok)
        positions = (self.key_mask.long().cumsum(-1).index_select(1, slots) - 1).masked_fill_(~ok, 1)
        self.decode_pos.copy_(positions[:, -K:])  # quirk: reused by every decode step
        if self.fused is not None:  # the frame's RoPE at the decode positions, for the steps
            cos, sin = rope_cos_sin(dec.model.inv_freq, positions[:, -K:])
            self.rope_cos.copy_(cos)
            self.rope_sin.copy_(sin)
        cublas_rows = None if self.fused is None else self.fused.PREFILL_TORCH_GEMM_ROWS
        if cublas_rows is not None and self.B * self.prefill_len >= cublas_rows:
            # a large batch: the layers' GEMMs through cuBLAS (float32), the attention Triton's
            x = torch.cat([dec.model.embed_tokens(self.pending_buf), self.vision_buf], dim=1)
            attend = lambda i, q: self.fused.prefill_attention(self, i, q)  # noqa: E731
            logits, task_loss = self._layers(x, positions, self.cache_len, None, kv_len, attend)
            self.logits.copy_(logits)
            self.task_loss.copy_(task_loss)
            self.cache_len += slots.shape[0]
        elif self.fused is not None:  # the Triton kernels (they advance the cache length)
            cos, sin = rope_cos_sin(dec.model.inv_freq, positions)
            fb = self.fused_buffers
            fb["pf_cos"].copy_(cos.flatten(0, 1))
            fb["pf_sin"].copy_(sin.flatten(0, 1))
            self.fused.prefill(self)
        else:
            x = torch.cat([dec.model.embed_tokens(self.pending_buf), self.vision_buf], dim=1)
            bias = self._bias(slots, self.key_mask[:, :kv_len])
            logits, task_loss = self._layers(x, positions, self.cache_len, bias, kv_len)
            self.logits.copy_(logits)
            self.task_loss.copy_(task_loss)
            self.cache_len += slots.shape[0]
        self.chosen.zero_()
        self.finished.zero_()
        self.n_frame.zero_()
        self.done.zero_()
        self.first.fill_(True)

    def _run(self, key: tuple) -> None:
        """Runs ``("prefill", kv_len)`` or ``("steps", kv_len, n_full, choose_last)``: its
        CUDA graph (captured on first use) on CUDA, else eagerly."""
        what, kv_len, *steps = key
        fn = (lambda: self._prefill(kv_len)) if what == "prefill" else (lambda: self._steps(kv_len, *steps))
        if not self.backend.use_cuda_graphs:
            fn()
            return
        graph = self.graphs.get(key)
        if graph is None:
            graph = self.graphs[key] = self._capture(fn)
        graph.replay()

    def _steps(self, kv_len: int, n_full: int, choose_last: bool) -> None:
        """What one graph launch runs: ``n_full`` decode steps, then (``choose_last``) the
        frame's last possible step, which only chooses; then the status."""
        self.kv_len = kv_len
        for _ in range(n_full):
            self._decode_step()
        if choose_last:
            self._decode_step(run_tokens=False)
        torch.stack([self.done.long(), self.n_frame, self.cache_len], out=self.status)

    def _capture(self, fn) -> "torch.cuda.CUDAGraph":
        """Captures ``fn`` in a CUDA graph (after a warm-up run on a side stream, as torch
        requires). The state tensors are saved and restored around the warm-up and the
        capture so they leave no trace."""
        saved = [t.clone() for t in self._state_tensors()]
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            fn()
        torch.cuda.current_stream().wait_stream(s)
        for t, v in zip(self._state_tensors(), saved):
            t.copy_(v)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        for t, v in zip(self._state_tensors(), saved):
            t.copy_(v)
        return graph

    def _state_tensors(self):
        return [
            self.k_cache, self.v_cache, self.key_mask, self.logits, self.task_loss, self.chosen,
            self.finished, self.frame_tokens, self.n_frame, self.cache_len, self.done, self.first,
            self.decode_pos,
        ]

    def _decode_step(self, run_tokens: bool = True) -> None:
        """One decode step as in ``select_step`` + running the tokens, without host syncs.
        When the frame is already done it changes nothing that is read later. With the
        fused kernels (``triton_decode``) the same step is 27 Triton launches.
        ``run_tokens=False`` for a step that is known to end the frame (see ``frame``): the
        choice alone, which is all such a step does."""
        if self.fused is not None:
            self.fused.step(self, run_tokens)
            return
        B, K, pad = self.B, self.K, self.pad
        neg_inf = float("-inf")
        active = ~self.done
        scores = self.logits.masked_fill(self.chosen[:, None, :], neg_inf)
        scores[..., pad] = neg_inf
        # Which heads' slots the step keeps, all at once (select_step decides them head by
        # head): head k's row is all -inf exactly when a row has no more than k ids left,
        # because heads 0..k-1 each masked one distinct id (the logits are finite). The step
        # stops at the first head past the budget or exhausted for an unfinished row.
        left = (~self.chosen).sum(-1) - (~self.chosen[:, pad]).long()  # ids a row may still pick
        exh = ((left[:, None] <= self.arange_k[None]) & ~self.finished[:, None]).any(0)  # (K,)
        in_budget = (self.budget - self.n_frame) > self.arange_k  # (K,)
        valid = active & torch.cumprod(in_budget & ~exh, 0).bool()  # (K,)
        reached = torch.cat([active[None], valid[:-1]])  # head k's turn came
        exhausted = (reached & in_budget & exh).any()
        picked = []
        for k in range(K):
            tok = scores[:, k].argmax(-1)
            if k + 1 < K:  # scatter, not index_put: no host tensors during graph capture
                later = scores[:, k + 1 :]
                later.scatter_(-1, tok[:, None, None].expand(B, K - k - 1, 1), neg_inf)
            picked.append(tok)
        step = torch.where(self.finished[:, None], pad, torch.stack(picked, dim=1))  # (B, K)
        meet = (self.task_loss <= self.requirement) & valid[None] & self.has_requirement
        meet[:, 0] &= ~self.first
        step = torch.where(meet, pad, step)
        self.finished |= meet.any(-1)
        n = valid.sum()
        idx = (self.n_frame + self.arange_k)[None].expand(B, K)
        self.frame_tokens.scatter_(1, idx, step)  # invalid slots land past the frame length
        self.chosen.scatter_(1, torch.where(valid[None], step, pad), True)
        self.n_frame += n
        done = self.done | (self.n_frame >= self.budget) | exhausted | self.finished.all()
        run_now = active & ~done
        self.first &= ~active
        self.done.copy_(done)
        if not run_tokens:
            return

        # Run the step's tokens at the quirky positions. Their slots get mask 1 only if the
        # step really runs; otherwise the writes sit past the valid cache length.
        dec = self.backend.model.gaze_decoder
        slots = self.cache_len + self.arange_k
        self.key_mask.index_copy_(1, slots, run_now.expand(B, K).contiguous())
        logits, task_loss = self._layers(
            dec.model.embed_tokens(step), self.decode_pos, self.cache_len,
            self._bias(slots, self.key_mask[:, : self.kv_len]), self.kv_len,
        )
        self.logits.copy_(logits)
        self.task_loss.copy_(task_loss)
        self.cache_len += K * run_now.long()


class TorchBackend(ReferenceBackend):
    """Fast torch path with the reference's tokens (``precision="float32"``). CUDA graphs on
    CUDA devices."""

    name = "torch"
    # Decode states kept for reuse, least recently used first out. A stream with a horizon
    # takes one (a clip's size); an unbounded 16-frame stream walks five capacities (512 ..
    # 8192 slots); so 8 keeps that and a few clip shapes. The byte bound (KV caches and the
    # fused kernels' scratch; a 45-tile clip's KV cache is ~1.8 GB) keeps big batches from
    # piling up; the most recently released state is always kept.
    MAX_CACHED_STATES = 8
    MAX_CACHED_BYTES = 4 << 30
    # Default decode steps per graph launch: 1-4 measured within noise on an H200
    # (docs/benchmarks.md, 2026-12-04). With the status read one launch behind, the launch
    # past a frame's end costs its steps: the first version (H100, 2026-12-05) timed the
    # clip 46.3 / 49.6 / 53.3 ms at 2 / 4 / 8, 45 tiles 231 / 229 / 230 ms.
    STEPS_PER_SYNC = 4
    # On CUDA, generate() reads each launch's status while the next launch runs (through a
    # StatusRing, DecodeState.frame); False: before the next launch (the GPU idles through
    # each read). Off: measured on an H100 (2026-12-06, scripts/ab_torch.py, with
    # STEPS_PER_SYNC=2) it changed nothing (0.98-1.00x on every workload, same tokens), the
    # host gaps it hid being down to 9 ms of 45 tiles' 231 (docs/benchmarks.md).
    OVERLAP_STATUS_READS = False

    def __init__(
        self,
        config,
        weights,
        device: Optional[str] = None,
        precision: str = "float32",
        steps_per_sync: Optional[int] = None,
        cuda_graphs: bool = True,
        small_ops: Optional[bool] = None,
        decode_kernels: Optional[str] = None,
    ):
        from . import PRECISIONS

        require_torch()
        if precision not in PRECISIONS:
            raise InputError(f"precision must be one of {', '.join(map(repr, PRECISIONS))}, got {precision!r}")
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        super().__init__(config, weights, device=device)
        self.precision = precision
        # Decode steps per graph launch at most (None: STEPS_PER_SYNC). With a task-loss
        # requirement each launch is one host read and the steps after the frame's stop cost
        # a step each, so more trades host reads for no-op steps (DecodeState.frame).
        if steps_per_sync is None:
            steps_per_sync = self.STEPS_PER_SYNC
        if isinstance(steps_per_sync, bool) or not isinstance(steps_per_sync, int) or steps_per_sync < 1:
            raise InputError(f"steps_per_sync must be a positive int or None, got {steps_per_sync!r}")
        self.steps_per_sync = steps_per_sync
        self.use_cuda_graphs = bool(cuda_graphs) and self.device.type == "cuda"
        # Small-matrix path for few rows (see _gemv): it replaces cuBLAS's slow fp32 kernels,
        # so it is on by default on CUDA in float32 only (the fast modes want tensor cores).
        if small_ops is None:
            small_ops = self.device.type == "cuda" and precision == "float32"
        self.small_ops = bool(small_ops)
        # The decoder GEMMs' weights by module: the float32 parameters themselves, or bf16
        # copies made once (so autocast casts no weights inside the CUDA graphs).
        gemm_dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        dec = self.model.gaze_decoder
        mods = [dec.lm_head, dec.task_loss_prediction_head]
        for layer in dec.model.layers:
            a, m = layer.self_attn, layer.mlp
            mods += [a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate_proj, m.up_proj, m.down_proj]
        self.gemm_weights = {mod: mod.weight.detach().to(gemm_dtype) for mod in mods}
        # The few-row path computes q/k/v and gate/up as one product each (the same sum per
        # output; 3 + 2 products become 2 per layer, and RoPE runs once on q and k together).
        w = self.gemm_weights
        self.fused_weights = [
            (
                torch.cat([w[layer.self_attn.q_proj], w[layer.self_attn.k_proj], w[layer.self_attn.v_proj]]),
                torch.cat([w[layer.mlp.gate_proj], w[layer.mlp.up_proj]]),
            )
            for layer in dec.model.layers
        ]
        self.fused = self._fused_decoder(decode_kernels)
        self._states: collections.OrderedDict[tuple[int, int], DecodeState] = collections.OrderedDict()
        self._pool_lock = threading.Lock()
        # States of dropped streams: appended without a lock (it may happen inside garbage
        # collection), moved into the cache by the next acquire/release.
        self._returned: collections.deque[DecodeState] = collections.deque()
        # generate() runs one call at a time per model (its state and graphs are in use).
        self._lock = threading.Lock()
        # On CUDA generate() reads each decode launch's status one launch behind (through
        # this ring; None: before the next launch). Streams read in step.
        self._status_ring = (
            StatusRing.take(self, self.device) if self.use_cuda_graphs and self.OVERLAP_STATUS_READS else None
        )

    DECODE_KERNELS = ("auto", "triton", "triton-ieee", "torch")

    def _fused_decoder(self, choice: Optional[str]):
        """The decode step's kernels: "triton" (``triton_decode``, fused float32 kernels, their
        products as FMA or 3xTF32, whichever is faster), "triton-ieee" (the same kernels,
        every product an FMA), "torch" (the eager step above, captured in graphs on CUDA)
        or "auto" (the default; also ``AUTOGAZE_TORCH_DECODE``): "triton" on CUDA in float32
        and in the "tf32" fast mode (whose kernels then multiply in single TF32 passes) when
        Triton is installed and fits the model, else torch. "bf16" keeps the torch step: its
        point is bfloat16 GEMMs, and the kernels are float32."""
        if choice is None:
            choice = os.environ.get("AUTOGAZE_TORCH_DECODE", "auto")
        if choice not in self.DECODE_KERNELS:
            raise InputError(
                f"decode_kernels must be one of {', '.join(map(repr, self.DECODE_KERNELS))}, got {choice!r}"
            )
        if choice == "torch" or (
            choice == "auto" and (self.device.type != "cuda" or self.precision == "bf16")
        ):
            return None
        if self.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise BackendError(
                f"decode_kernels={choice!r} runs on CUDA devices, not {self.device.type!r} "
                "(on the CPU only under Triton's interpreter, TRITON_INTERPRET=1, for testing)"
            )
        try:
            triton_decode = load_triton_decode()
        except ImportError as e:
            if choice != "auto":
                raise BackendError(f"decode_kernels={choice!r} needs Triton (`pip install triton`): {e}") from None
            return None
        if not triton_decode.supported(self.config.decoder):
            if choice == "auto":
                return None
            raise BackendError(f"decode_kernels={choice!r} does not support this decoder's shapes")
        products = "ieee" if choice == "triton-ieee" else "tf32" if self.precision == "tf32" else "auto"
        return triton_decode.FusedDecoder(self, products=products)

    @contextlib.contextmanager
    def mode(self):
        """The call's arithmetic: TF32 flags per ``precision`` (process-wide, so serialised
        and restored after, see ``tf32_switch``) and, in bf16 mode, autocast. Its cache is off,
        as torch requires for CUDA graph capture; the decoder weights are cast once anyway."""
        with tf32_switch(self.precision == "tf32"):
            if self.precision == "bf16":
                with torch.autocast(self.device.type, dtype=torch.bfloat16, cache_enabled=False):
                    yield
            else:
                yield

    # -- decode states ---------------------------------------------------------------------
    def capacity(self, num_frames: int, budgets: list[int]) -> int:
        P = self.config.connector.num_tokens
        K = self.config.decoder.num_multi_token_pred
        return sum(P + b + K for b in budgets[:num_frames]) + 2 * K

    def acquire_state(self, batch: int, capacity: int) -> DecodeState:
        """A DecodeState for (batch, capacity rounded up), reset for a new sequence: the cached
        one of that shape (with its CUDA graphs) if any, else a new one. The caller owns it
        until :meth:`release_state`."""
        capacity = -(-capacity // 256) * 256  # fewer distinct shapes -> more graph reuse
        with self._pool_lock:
            self._take_returned()
            st = self._states.pop((batch, capacity), None)
        if st is None:
            st = DecodeState(self, batch, capacity)
        st.reset()
        return st

    def release_state(self, st: DecodeState) -> None:
        """Hands a state back to the cache (it replaces a cached one of the same shape)."""
        with self._pool_lock:
            self._take_returned()
            self._cache(st)

    def close(self) -> None:
        """Drops the cached decode states (buffers and CUDA graphs); ``AutoGaze.close`` calls
        it. States in use by a running call or a stream go when their user drops them."""
        with self._pool_lock:
            self._returned.clear()
            self._states.clear()

    def _take_returned(self) -> None:
        while self._returned:
            self._cache(self._returned.popleft())

    def _cache(self, st: DecodeState) -> None:
        self._states.pop(st.key, None)
        self._states[st.key] = st  # the young end
        while len(self._states) > 1 and (
            len(self._states) > self.MAX_CACHED_STATES
            or sum(s.nbytes for s in self._states.values()) > self.MAX_CACHED_BYTES
        ):
            self._states.popitem(last=False)

    # -- model-level API (embed and score: the reference's, under this mode) -----------------
    def generate(self, video, budgets: list[int], task_loss_requirement, record_steps=False):
        if record_steps:
            return super().generate(video, budgets, task_loss_requirement, record_steps=True)
        with self._lock, self.mode():
            emb = self.embed(video)
            B, T = emb.shape[:2]
            st = self.acquire_state(B, self.capacity(T, budgets))
            try:
                ring = self._status_ring  # (None: reads in step)
                tokens = [st.frame(emb[:, t], budgets[t], task_loss_requirement, ring) for t in range(T)]
                st.verify()
            finally:
                self.release_state(st)
        # One device-to-host copy for the clip (the outputs are assembled on the host); the
        # frame lengths are already known there.
        flat = torch.cat(tokens, dim=1).cpu().numpy()
        return np.split(flat, np.cumsum([t.shape[1] for t in tokens])[:-1], axis=1)

    def new_stream(self, batch_size: int, max_frames: Optional[int] = None) -> "TorchStream":
        """max_frames: frames between resets (None: unbounded)."""
        return TorchStream(self, batch_size, max_frames)


class TorchStream:
    """Streaming on the torch backend. Its DecodeState comes from the backend's cache (so a
    new session, or this one after ``reset()``, reuses buffers and CUDA graphs) and goes back
    there on ``reset()`` and when the stream is dropped. With ``max_frames`` (the session's
    horizon) the first frame takes a state with room for the whole window (the size a clip
    of that length uses); without, the state is swapped for one of at least twice the
    capacity whenever it is full."""

    def __init__(self, backend: TorchBackend, batch_size: int, max_frames: Optional[int] = None):
        self.backend = backend
        self.batch_size = batch_size
        self.max_frames = max_frames
        self.conv_cache = None
        self.state: Optional[DecodeState] = None

    def _ensure_capacity(self, budget: int) -> DecodeState:
        be, old = self.backend, self.state
        need = be.capacity(1, [budget]) + (old.length if old else 0)
        if old is None or need > old.cap:
            window = be.capacity(self.max_frames, [budget] * self.max_frames) if self.max_frames else 0
            new = be.acquire_state(self.batch_size, max(need, window, 2 * old.cap if old else 0))
            if old is not None:  # move the sequence over, then hand the old state back
                L = old.length
                new.k_cache[:, :, :, :L] = old.k_cache[:, :, :, :L]
                new.v_cache[:, :, :, :L] = old.v_cache[:, :, :, :L]
                new.key_mask[:, :L] = old.key_mask[:, :L]
                new.length, new.pending = L, old.pending
                be.release_state(old)
            self.state = new
        return self.state

    def step(self, frame, budget: int, task_loss_requirement) -> np.ndarray:
        be = self.backend
        with be.mode():
            emb, self.conv_cache = be.model.embed(be.as_tensor(frame), self.conv_cache)
            st = self._ensure_capacity(budget)
            tokens = st.frame(emb[:, 0].float(), budget, task_loss_requirement).cpu().numpy()
            st.verify()
            return tokens

    def reset(self) -> None:
        """Forgets the history (KV cache, conv cache, pending last step): the next ``step``
        is a fresh session's first frame. The state goes back to the backend's cache, so that
        step takes the same state a new session would (buffers and CUDA graphs kept)."""
        self.conv_cache = None
        st, self.state = self.state, None
        if st is not None:
            self.backend.release_state(st)

    def __del__(self):
        # May run inside garbage collection: no locks, the backend takes the state back later.
        st = getattr(self, "state", None)
        if st is not None:
            self.state = None
            self.backend._returned.append(st)
