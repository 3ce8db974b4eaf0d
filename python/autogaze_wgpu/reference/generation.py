"""AutoGaze generation and teacher-forced scoring, written out plainly (SPEC §5, §5b).

``GazeGenerator`` is the one per-frame loop. A whole clip is ``step_frame`` over its frames
and a streaming session calls it once per incoming frame, so the two give the same tokens by
construction. Every quirk of the official code that changes tokens is reproduced and named
where it happens:

* decode-step position ids reuse the last K positions of the frame's prefill;
* within the frame being generated every generated token (a finished row's pads too) has
  attention-mask 1; from the next frame on, pads have mask 0;
* the last step's tokens of a frame are only run in the next frame's prefill;
* slot 0 of a frame's first step never meets the task-loss requirement;
* the frame length is shared by the batch; budget and exhaustion are decided batch-wide.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from .modeling import GazingModel


def select_step(
    logits: torch.Tensor,
    task_loss: torch.Tensor,
    chosen: torch.Tensor,
    finished: torch.Tensor,
    n_frame: int,
    budget: int,
    task_loss_requirement: Optional[float],
    first_step: bool,
    pad: int,
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """One decode step's greedy choice over the K heads (SPEC §5 step 2).

    logits (B, K, V) and task_loss (B, K) at the last position; chosen (B, V) ids already in
    this frame; finished (B,) rows done earlier in the frame; n_frame slots so far.
    Returns (step tokens (B, n) with pads, updated finished, exhausted).
    """
    B, K, _ = logits.shape
    scores = logits.masked_fill(chosen[:, None, :], float("-inf"))  # no repeat within a frame
    scores[..., pad] = float("-inf")  # never EOS
    picked: list[torch.Tensor] = []
    exhausted = False
    for k in range(K):
        if n_frame + k >= budget:  # the budget is shared by the batch
            break
        row = scores[:, k]  # (B, V)
        if torch.isneginf(row).all(-1)[~finished].any():
            exhausted = True
            break
        tok = row.argmax(-1)  # first maximum on ties
        # The id picked for slot k is masked for slots k+1.. (even if it becomes pad below).
        scores[torch.arange(B), k + 1 :, tok] = float("-inf")
        picked.append(torch.where(finished, torch.full_like(tok, pad), tok))
    if not picked:
        return torch.zeros(B, 0, dtype=torch.int64, device=logits.device), finished, exhausted
    step = torch.stack(picked, dim=1)  # (B, n)
    if task_loss_requirement is not None:
        meet = task_loss[:, : step.shape[1]] <= task_loss_requirement
        if first_step:
            meet[:, 0] = False  # slot 0 of the frame's first step never meets
        step = step.masked_fill(meet, pad)  # later non-meeting slots keep their token
        finished = finished | meet.any(-1)
    return step, finished, exhausted


@dataclass
class StepRecord:
    """Decoder outputs at the last position of one decode step (a debugging aid)."""

    frame: int
    step: int
    logits: torch.Tensor  # (B, K*V) raw, head-major
    task_loss_prediction: torch.Tensor  # (B, K)


@dataclass
class GazeGenerator:
    """Carries everything generation needs from one frame to the next (the KV cache etc.)."""

    model: GazingModel
    batch_size: int
    record_steps: bool = False
    frame_index: int = 0
    steps: list[StepRecord] = field(default_factory=list)

    def __post_init__(self):
        dec = self.model.gaze_decoder
        self.device = next(self.model.parameters()).device
        self.cache = dec.new_cache()
        # 0/1 attention mask of every token in the cache, (B, L).
        self.key_mask = torch.zeros(self.batch_size, 0, dtype=torch.int64, device=self.device)
        # The previous frame's last decode step: generated but never run yet, (B, n).
        self.pending: Optional[torch.Tensor] = None

    @torch.no_grad()
    def step_frame(
        self,
        vision_embeds: torch.Tensor,
        budget: int,
        task_loss_requirement: Optional[float],
    ) -> torch.Tensor:
        """Generates one frame's gaze tokens.

        vision_embeds (B, 196, C) of this frame; budget M (SPEC §5). Returns the frame's
        tokens (B, n_t), ids within the frame, pad = EOS = 265 (n_t shared by the batch).
        """
        dec = self.model.gaze_decoder
        cfg = dec.cfg
        K, pad = cfg.num_multi_token_pred, cfg.eos_token_id
        B = self.batch_size
        embed = dec.model.embed_tokens
        ones = lambda n: torch.ones(B, n, dtype=torch.int64, device=self.device)  # noqa: E731

        # 1. Prefill: the previous frame's un-run last step (pads now mask 0), then the vision
        #    tokens. Positions are cumsum(mask) - 1 over the whole history, with masked slots
        #    set to 1 as transformers' prepare_inputs_for_generation does (their outputs are
        #    never read, so the value only matters for faithfulness).
        if self.pending is not None:
            inputs = torch.cat([embed(self.pending), vision_embeds], dim=1)
            new_mask = torch.cat([(self.pending != pad).long(), ones(vision_embeds.shape[1])], 1)
        else:
            inputs = vision_embeds
            new_mask = ones(vision_embeds.shape[1])
        self.key_mask = torch.cat([self.key_mask, new_mask], dim=1)
        positions = self.key_mask.cumsum(-1) - 1
        positions.masked_fill_(self.key_mask == 0, 1)
        position_ids = positions[:, -inputs.shape[1] :]
        h = dec(inputs, position_ids, self.key_mask, self.cache)
        logits, task_loss = dec.heads(h[:, -1])  # (B, K, V), (B, K)
        # Quirk: every decode step of this frame reuses the last K prefill positions.
        decode_position_ids = position_ids[:, -K:]

        # 2. Step loop.
        chosen = torch.zeros(B, cfg.vocab_size, dtype=torch.bool, device=self.device)
        finished = torch.zeros(B, dtype=torch.bool, device=self.device)
        steps: list[torch.Tensor] = []
        n_frame = 0
        while True:
            if self.record_steps:
                self.steps.append(
                    StepRecord(self.frame_index, len(steps), logits.reshape(B, -1).clone(), task_loss.clone())
                )
            step, finished, exhausted = select_step(
                logits, task_loss, chosen, finished, n_frame, budget, task_loss_requirement,
                first_step=not steps, pad=pad,
            )
            if step.shape[1] == 0:
                break
            chosen.scatter_(1, step, True)
            steps.append(step)
            n_frame += step.shape[1]
            if n_frame >= budget or exhausted or bool(finished.all()):
                break
            # 3. Run this step's tokens (mask 1, even a finished row's pads) at the quirky
            #    positions; their K/V join the cache with those rotations.
            n = step.shape[1]
            self.key_mask = torch.cat([self.key_mask, ones(n)], dim=1)
            h = dec(embed(step), decode_position_ids[:, -n:], self.key_mask, self.cache)
            logits, task_loss = dec.heads(h[:, -1])

        # 4. The frame is done: its run tokens take their final mask (pads -> 0); the last
        #    step waits for the next frame's prefill.
        tokens = torch.cat(steps, dim=1)
        n_run = tokens.shape[1] - steps[-1].shape[1]
        if n_run:
            self.key_mask[:, -n_run:] = (tokens[:, :n_run] != pad).long()
        self.pending = steps[-1]
        self.frame_index += 1
        return tokens


@torch.no_grad()
def teacher_forced_scores(
    model: GazingModel,
    vision_embeds: torch.Tensor,
    frame_tokens: list[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """The official ``forward`` with given gazes (SPEC §5b).

    vision_embeds (B, T, 196, C); frame_tokens[t] (B, n_t) ids within frame t, pad 265.
    Returns gaze_probs and task_loss_prediction, both (B, N) with N = sum n_t.
    """
    dec = model.gaze_decoder
    cfg = dec.cfg
    K, pad = cfg.num_multi_token_pred, cfg.eos_token_id
    B, T, P, _ = vision_embeds.shape
    device = vision_embeds.device
    embeds, masks, ids, slot_index, slot_in_frame = [], [], [], [], []
    offset = 0
    for t in range(T):
        tok = frame_tokens[t]
        n_t = tok.shape[1]
        embeds += [vision_embeds[:, t], dec.model.embed_tokens(tok)]
        masks += [torch.ones(B, P, dtype=torch.int64, device=device), (tok != pad).long()]
        ids.append(tok)
        slot_index.append(torch.arange(offset + P, offset + P + n_t, device=device))
        slot_in_frame.append(torch.arange(n_t, device=device))
        offset += P + n_t
    x = torch.cat(embeds, dim=1)  # (B, L, C)
    mask = torch.cat(masks, dim=1)  # (B, L)
    position_ids = mask.cumsum(-1) - 1  # true positions: pads repeat the previous one
    h = dec(x, position_ids, mask, dec.new_cache())
    logits, task_loss = dec.heads(h)  # (B, L, K, V), (B, L, K)
    probs = torch.softmax(logits, dim=-1)

    ids = torch.cat(ids, dim=1)  # (B, N)
    n_idx = torch.cat(slot_index)  # (N,) sequence index of each slot
    j = torch.cat(slot_in_frame) % K  # head that predicted the slot
    b_idx = torch.arange(B, device=device)[:, None]
    gaze_probs = probs[b_idx, (n_idx - (j + 1))[None], j[None], ids]
    k = (j + 1) % K  # shifted by one slot against the stopping rule
    task_loss_prediction = task_loss[b_idx, (n_idx - k)[None], k[None]]
    return gaze_probs, task_loss_prediction
