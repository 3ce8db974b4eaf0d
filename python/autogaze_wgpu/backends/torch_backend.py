"""``backend="torch"``: the reference's math with a loop built for speed on CUDA.

Same layers and weights as the reference (``reference/modeling.py``); what differs is how the
per-frame loop runs:

* a preallocated (static) KV cache and key mask sized for the whole clip, written at offsets;
* the decode step is shape-static and written with GPU-side state only (selection, no-repeat
  mask, finished rows, budget, stop flag, cache length), so it never synchronises with the
  host and is captured in a CUDA graph (``steps_per_sync`` steps per graph launch);
* steps after a frame is done are no-ops on the state (their writes land past the valid
  length), so the host checks the done flag once per graph launch instead of every step;
* one host synchronisation per frame to learn the frame length.

Parity mode (the default) is float32 with TF32 off; it gives the reference's tokens.
"""

from __future__ import annotations

import math
import threading
from typing import Optional

import numpy as np

from ..errors import BackendError
from .reference import ReferenceBackend, no_tf32, require_torch, torch

if torch is not None:
    import torch.nn.functional as F

    from ..reference.modeling import rope_cos_sin, rotate_half


def _gemv(x, w):
    """x @ w.T as products and a sum: for a handful of rows this beats cuBLAS's fp32 GEMM
    kernels (~45 us each on an H100 for 10x192x192) by an order of magnitude."""
    return (x.unsqueeze(-2) * w).sum(-1)


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
        self.graphs: dict[int, "torch.cuda.CUDAGraph"] = {}  # by decode key length
        self.kv_len = capacity
        self.steps_per_graph = backend.steps_per_sync
        self.reset()

    def reset(self) -> None:
        """Back to an empty sequence (the buffers and any captured graph are kept)."""
        self.length = 0  # host copy of the cache length between frames
        self.key_mask.zero_()
        self.pending: Optional["torch.Tensor"] = None

    # -- the decoder on static buffers ------------------------------------------------------
    def _layers(self, x, position_ids, start, bias, kv_len):
        """Runs x (B, L, C) whose K/V go to cache slots start + [0, L); attends to the first
        ``kv_len`` slots with ``bias`` (B, 1, L, kv_len). ``start`` is a host int or a 0-d
        device tensor. Returns the heads at the last position."""
        dec = self.backend.model.gaze_decoder
        cos, sin = rope_cos_sin(dec.model.inv_freq, position_ids)
        cos, sin = cos[:, None], sin[:, None]
        B, L, _ = x.shape
        slots = start + torch.arange(L, device=x.device)
        small = self.backend.small_ops and B * L <= self.SMALL_ROWS
        lin = _gemv if small else F.linear
        for i, layer in enumerate(dec.model.layers):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            q = lin(h, attn.q_proj.weight).view(B, L, attn.n_head, attn.head_dim).transpose(1, 2)
            k = lin(h, attn.k_proj.weight).view(B, L, attn.n_head, attn.head_dim).transpose(1, 2)
            v = lin(h, attn.v_proj.weight).view(B, L, attn.n_head, attn.head_dim).transpose(1, 2)
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
            self.k_cache[i].index_copy_(2, slots, k)
            self.v_cache[i].index_copy_(2, slots, v)
            keys, values = self.k_cache[i][:, :, :kv_len], self.v_cache[i][:, :, :kv_len]
            if small:  # (B, nh, L, kv): products + sums instead of tiny fp32 batched GEMMs
                att = (q[:, :, :, None, :] * keys[:, :, None]).sum(-1) * attn.scaling + bias
                p = F.softmax(att, dim=-1, dtype=torch.float32)
                y = (p[..., None] * values[:, :, None]).sum(-2)
            else:
                att = torch.matmul(q, keys.transpose(2, 3)) * attn.scaling + bias
                y = torch.matmul(F.softmax(att, dim=-1, dtype=torch.float32), values)
            x = x + lin(y.transpose(1, 2).reshape(B, L, -1), attn.o_proj.weight)
            m = layer.mlp
            hm = layer.post_attention_layernorm(x)
            x = x + lin(F.silu(lin(hm, m.gate_proj.weight)) * lin(hm, m.up_proj.weight), m.down_proj.weight)
        hf = dec.model.norm(x[:, -1])
        K, V = dec.cfg.num_multi_token_pred, dec.cfg.vocab_size
        logits = lin(hf, dec.lm_head.weight).view(B, K, V)
        return logits, lin(hf, dec.task_loss_prediction_head.weight)

    def _bias(self, query_slots, key_ok):
        """Additive mask (B, 1, L, n_keys): causal over cache slots plus the key mask."""
        n = key_ok.shape[1]
        allowed = (self.key_idx[None, :n] <= query_slots[:, None])[None] & key_ok[:, None, :]
        return torch.zeros(allowed.shape, device=allowed.device).masked_fill_(
            ~allowed, torch.finfo(torch.float32).min
        )[:, None]

    # -- one frame --------------------------------------------------------------------------
    def frame(self, vision_embeds, budget: int, requirement: Optional[float]) -> "torch.Tensor":
        dec = self.backend.model.gaze_decoder
        B, pad, K = self.B, self.pad, self.K
        embed = dec.model.embed_tokens
        # 1. Prefill (shapes known on the host): pending last step of the previous frame, then
        #    the vision tokens; positions cumsum(mask) - 1 (masked slots read 1).
        if self.pending is not None:
            x = torch.cat([embed(self.pending), vision_embeds], dim=1)
            new_mask = torch.cat(
                [self.pending != pad, torch.ones(B, vision_embeds.shape[1], dtype=torch.bool, device=x.device)], 1
            )
        else:
            x = vision_embeds
            new_mask = torch.ones(B, x.shape[1], dtype=torch.bool, device=x.device)
        L0, L = self.length, x.shape[1]
        self.key_mask[:, L0 : L0 + L] = new_mask
        mask_so_far = self.key_mask[:, : L0 + L].long()
        positions = (mask_so_far.cumsum(-1) - 1).masked_fill_(mask_so_far == 0, 1)[:, L0:]
        q_slots = L0 + torch.arange(L, device=x.device)
        kv_len = L0 + L
        bias = self._bias(q_slots, self.key_mask[:, :kv_len])
        logits, task_loss = self._layers(x, positions, L0, bias, kv_len)
        self.length = L0 + L

        # 2. Decode steps: device-side state only.
        self.logits.copy_(logits)
        self.task_loss.copy_(task_loss)
        self.decode_pos.copy_(positions[:, -K:])  # quirk: reused by every decode step
        self.chosen.zero_()
        self.finished.zero_()
        self.n_frame.zero_()
        self.done.zero_()
        self.first.fill_(True)
        self.cache_len.fill_(self.length)
        self.budget.fill_(budget)
        self.has_requirement.fill_(requirement is not None)
        self.requirement.fill_(0.0 if requirement is None else requirement)
        max_steps = math.ceil(budget / K) + 1
        need = self.length + (max_steps + 1) * K
        self.kv_len = min(self.cap, -(-need // self.KV_BUCKET) * self.KV_BUCKET)
        for _ in range(0, max_steps, self.steps_per_graph):
            self._run_steps()
            if bool(self.done):  # one sync per graph launch
                break
        else:  # pragma: no cover - the budget bounds the steps
            raise BackendError("decode loop did not finish within the budget")

        # 3. Frame end (one sync): its run steps take their final mask; the last step waits.
        n_t = int(self.n_frame)
        n_run = int(self.cache_len) - self.length
        tokens = self.frame_tokens[:, :n_t].clone()
        self.key_mask[:, self.length : self.length + n_run] = tokens[:, :n_run] != pad
        self.length += n_run
        self.pending = tokens[:, n_run:]
        return tokens

    def _run_steps(self) -> None:
        if self.backend.use_cuda_graphs:
            graph = self.graphs.get(self.kv_len)
            if graph is None:
                graph = self.graphs[self.kv_len] = self._capture()
            graph.replay()
            return
        for _ in range(self.steps_per_graph):
            self._decode_step()

    def _capture(self) -> None:
        """Captures ``steps_per_graph`` decode steps in a CUDA graph (warm-up on a side
        stream first, as torch requires). The state tensors are saved and restored around
        the warm-up so it leaves no trace."""
        saved = [t.clone() for t in self._state_tensors()]
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                self._decode_step()
        torch.cuda.current_stream().wait_stream(s)
        for t, v in zip(self._state_tensors(), saved):
            t.copy_(v)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(self.steps_per_graph):
                self._decode_step()
        for t, v in zip(self._state_tensors(), saved):
            t.copy_(v)
        return graph

    def _state_tensors(self):
        return [
            self.k_cache, self.v_cache, self.key_mask, self.logits, self.task_loss, self.chosen,
            self.finished, self.frame_tokens, self.n_frame, self.cache_len, self.done, self.first,
        ]

    def _decode_step(self) -> None:
        """One decode step as in ``select_step`` + running the tokens, without host syncs.
        When the frame is already done it changes nothing that is read later."""
        B, K, pad = self.B, self.K, self.pad
        neg_inf = float("-inf")
        active = ~self.done
        scores = self.logits.masked_fill(self.chosen[:, None, :], neg_inf)
        scores[..., pad] = neg_inf
        remaining = self.budget - self.n_frame
        alive = active.clone()
        exhausted = torch.zeros((), dtype=torch.bool, device=scores.device)
        picked, valid = [], []
        for k in range(K):
            row = scores[:, k]
            exh = (torch.isneginf(row).all(-1) & ~self.finished).any()
            in_budget = remaining > k
            exhausted = exhausted | (alive & in_budget & exh)
            ok = alive & in_budget & ~exh
            alive = ok
            tok = row.argmax(-1)
            if k + 1 < K:  # scatter, not index_put: no host tensors during graph capture
                later = scores[:, k + 1 :]
                later.scatter_(-1, tok[:, None, None].expand(B, K - k - 1, 1), neg_inf)
            picked.append(torch.where(self.finished, pad, tok))
            valid.append(ok)
        step = torch.stack(picked, dim=1)  # (B, K)
        valid = torch.stack(valid)  # (K,)
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
    """Fast torch path with the reference's tokens. CUDA graphs on CUDA devices."""

    name = "torch"

    def __init__(self, config, weights, device: Optional[str] = None, steps_per_sync: int = 4, cuda_graphs: bool = True, small_ops: Optional[bool] = None):
        require_torch()
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        super().__init__(config, weights, device=device)
        self.steps_per_sync = int(steps_per_sync)
        self.use_cuda_graphs = bool(cuda_graphs) and self.device.type == "cuda"
        # Small-matrix path for few rows (see _gemv); on by default on CUDA only.
        self.small_ops = self.device.type == "cuda" if small_ops is None else bool(small_ops)
        self._states: dict[tuple[int, int], DecodeState] = {}
        # Cached decode states (and their CUDA graphs) are shared: one call at a time.
        self._lock = threading.Lock()

    def capacity(self, num_frames: int, budgets: list[int]) -> int:
        P = self.config.connector.num_tokens
        K = self.config.decoder.num_multi_token_pred
        return sum(P + b + K for b in budgets[:num_frames]) + 2 * K

    def state(self, batch: int, capacity: int) -> DecodeState:
        """A cached DecodeState for (batch, capacity rounded up), reset for a new sequence."""
        capacity = -(-capacity // 256) * 256  # fewer distinct shapes -> more graph reuse
        key = (batch, capacity)
        st = self._states.get(key)
        if st is None:
            st = self._states[key] = DecodeState(self, batch, capacity)
        st.reset()
        return st

    def generate(self, video, budgets: list[int], task_loss_requirement, record_steps=False):
        if record_steps:
            return super().generate(video, budgets, task_loss_requirement, record_steps=True)
        with self._lock, no_tf32():
            emb = self.embed(video)
            B, T = emb.shape[:2]
            st = self.state(B, self.capacity(T, budgets))
            tokens = [st.frame(emb[:, t], budgets[t], task_loss_requirement) for t in range(T)]
            return [t.cpu().numpy() for t in tokens]

    def new_stream(self, batch_size: int) -> "TorchStream":
        return TorchStream(self, batch_size)


class TorchStream:
    """Streaming on the torch backend: a DecodeState whose capacity doubles when needed."""

    def __init__(self, backend: TorchBackend, batch_size: int):
        self.backend = backend
        self.batch_size = batch_size
        self.conv_cache = None
        self.state: Optional[DecodeState] = None

    def _ensure_capacity(self, budget: int) -> DecodeState:
        be = self.backend
        need = be.capacity(1, [budget]) + (self.state.length if self.state else 0)
        if self.state is None or need > self.state.cap:
            new = DecodeState(be, self.batch_size, max(need, 2 * (self.state.cap if self.state else 0)))
            if self.state is not None:  # move the sequence over
                L = self.state.length
                new.k_cache[:, :, :, :L] = self.state.k_cache[:, :, :, :L]
                new.v_cache[:, :, :, :L] = self.state.v_cache[:, :, :, :L]
                new.key_mask[:, :L] = self.state.key_mask[:, :L]
                new.length, new.pending = L, self.state.pending
            self.state = new
        return self.state

    def step(self, frame, budget: int, task_loss_requirement) -> np.ndarray:
        with no_tf32():
            emb, self.conv_cache = self.backend.model.embed(self.backend.as_tensor(frame), self.conv_cache)
            st = self._ensure_capacity(budget)
            return st.frame(emb[:, 0], budget, task_loss_requirement).cpu().numpy()
