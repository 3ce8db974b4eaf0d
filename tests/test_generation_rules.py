"""Unit tests of the generation rules on hand-made logits, the mask decoding and RoPE."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import MODEL_DIR

from autogaze_wgpu.config import AutoGazeConfig
from autogaze_wgpu.inputs import gazing_budget
from autogaze_wgpu.outputs import assemble_output, tokens_to_masks
from autogaze_wgpu.reference.generation import select_step
from autogaze_wgpu.reference.modeling import rope_cos_sin, rope_inv_freq

PAD = 265
K, V = 10, 266


@pytest.fixture(scope="module")
def cfg() -> AutoGazeConfig:
    return AutoGazeConfig.from_pretrained(MODEL_DIR)


def logits_preferring(order_per_head: list[list[int]], B: int = 1) -> torch.Tensor:
    """(B, K, V) logits where head k ranks ids as given (first = best), others low."""
    x = torch.full((B, K, V), -10.0)
    for k, order in enumerate(order_per_head):
        for rank, tok in enumerate(order):
            x[:, k, tok] = 10.0 - rank
    return x


def run(logits, task_loss=None, chosen=None, finished=None, n_frame=0, budget=265, req=None, first=True):
    B = logits.shape[0]
    task_loss = torch.full((B, K), 5.0) if task_loss is None else task_loss
    chosen = torch.zeros(B, V, dtype=torch.bool) if chosen is None else chosen
    finished = torch.zeros(B, dtype=torch.bool) if finished is None else finished
    return select_step(logits, task_loss, chosen, finished, n_frame, budget, req, first, PAD)


def test_greedy_masks_earlier_picks_within_the_step():
    # Every head prefers 7 then 8 then 9...: slot 0 takes 7, slot 1 must take 8, etc.
    logits = logits_preferring([list(range(7, 30))] * K)
    step, finished, exhausted = run(logits)
    assert step[0].tolist() == list(range(7, 17))
    assert not finished.any() and not exhausted


def test_no_repeat_within_frame_and_never_eos():
    logits = logits_preferring([[PAD, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13]] * K)
    chosen = torch.zeros(1, V, dtype=torch.bool)
    chosen[0, 3] = True  # chosen in an earlier step of this frame
    step, _, _ = run(logits, chosen=chosen)
    assert PAD not in step[0].tolist()
    assert 3 not in step[0].tolist()
    assert step[0, 0].item() == 4


def test_ties_take_the_lowest_index():
    logits = torch.zeros(1, K, V)
    step, _, _ = run(logits)
    assert step[0].tolist() == list(range(10))


def test_budget_truncates_the_step():
    logits = logits_preferring([list(range(50))] * K)
    step, _, _ = run(logits, n_frame=190, budget=198)
    assert step.shape == (1, 8)


def test_task_loss_meet_pads_only_meeting_slots_and_finishes():
    logits = logits_preferring([list(range(50))] * K)
    tl = torch.tensor([[0.1, 0.9, 0.5, 0.9, 0.9, 0.6, 0.9, 0.9, 0.9, 0.9]])
    step, finished, _ = run(logits, task_loss=tl, req=0.7, first=True)
    # slot 0 of the frame's first step never meets; slots 2 and 5 meet (<=), the rest keep
    # their tokens, and the masking of padded picks still applied to later slots.
    assert step[0].tolist() == [0, 1, PAD, 3, 4, PAD, 6, 7, 8, 9]
    assert finished.tolist() == [True]
    step, finished, _ = run(logits, task_loss=tl, req=0.7, first=False)
    assert step[0, 0].item() == PAD


def test_meet_is_inclusive():
    logits = logits_preferring([list(range(50))] * K)
    tl = torch.full((1, K), 0.7)
    step, finished, _ = run(logits, task_loss=tl, req=0.7, first=False)
    assert (step == PAD).all() and finished.all()


def test_finished_rows_get_pads_while_others_continue():
    logits = logits_preferring([list(range(50))] * K, B=2)
    finished = torch.tensor([True, False])
    step, fin, _ = run(logits, finished=finished)
    assert (step[0] == PAD).all()
    assert step[1].tolist() == list(range(10))
    assert fin.tolist() == [True, False]


def test_exhaustion_stops_the_step():
    logits = torch.zeros(1, K, V)
    chosen = torch.ones(1, V, dtype=torch.bool)
    chosen[0, :3] = False  # only ids 0..2 left
    step, _, exhausted = run(logits, chosen=chosen)
    assert step[0].tolist() == [0, 1, 2]
    assert exhausted


@pytest.mark.parametrize("ratio,budget", [(0.75, 198), (0.1, 26), (1.0, 265), (0.001, 1), (0.5, 132)])
def test_gazing_budget(ratio, budget):
    assert gazing_budget(ratio, 265) == budget


def test_masks_split_ids_by_scale(cfg):
    frame_tokens = [np.array([[0, 3, 4, 19, 20, 68, 69, 264, PAD]])]
    masks = tokens_to_masks(frame_tokens, cfg)
    assert [m.shape for m in masks] == [(1, 1, 4), (1, 1, 16), (1, 1, 49), (1, 1, 196)]
    assert np.flatnonzero(masks[0][0, 0]).tolist() == [0, 3]
    assert np.flatnonzero(masks[1][0, 0]).tolist() == [0, 15]
    assert np.flatnonzero(masks[2][0, 0]).tolist() == [0, 48]
    assert np.flatnonzero(masks[3][0, 0]).tolist() == [0, 195]
    assert sum(m.sum() for m in masks) == 8  # the pad is dropped


def test_assemble_offsets_frames_and_flags_pads(cfg):
    out = assemble_output([np.array([[5, PAD]]), np.array([[7]])], cfg)
    assert out.gazing_pos.tolist() == [[5, 265, 265 + 7]]  # a pad in frame 0 reads 265·1
    assert out.if_padded_gazing.tolist() == [[False, True, False]]
    assert out.num_gazing_each_frame.tolist() == [2, 1]
    assert out.num_real_gazes().tolist() == [[1, 1]]


def test_rope_inv_freq_llama3(cfg):
    inv = rope_inv_freq(cfg.decoder).numpy()
    d = cfg.decoder
    base = 1.0 / d.rope_theta ** (np.arange(0, d.head_dim, 2) / d.head_dim)
    wavelen = 2 * math.pi / base
    rs = d.rope_scaling
    lo, hi = rs.original_max_position_embeddings / rs.low_freq_factor, rs.original_max_position_embeddings / rs.high_freq_factor
    for i, (b, w) in enumerate(zip(base, wavelen)):
        if w < hi:
            want = b
        elif w > lo:
            want = b / rs.factor
        else:
            s = (rs.original_max_position_embeddings / w - rs.low_freq_factor) / (rs.high_freq_factor - rs.low_freq_factor)
            want = (1 - s) * b / rs.factor + s * b
        assert inv[i] == pytest.approx(want, rel=2e-6), i
    # All three regimes occur for the release's theta and head_dim.
    assert (wavelen < hi).any() and (wavelen > lo).any() and ((wavelen >= hi) & (wavelen <= lo)).any()


def test_rope_angles_are_float32_products(cfg):
    inv = rope_inv_freq(cfg.decoder)
    pos = torch.tensor([[0, 1, 6000]])
    cos, sin = rope_cos_sin(inv, pos)
    ang = (np.float32(6000) * inv.numpy()).astype(np.float32)
    np.testing.assert_allclose(cos[0, 2, :16].numpy(), np.cos(ang.astype(np.float64)), atol=1e-6)
    assert cos.shape == (1, 3, cfg.decoder.head_dim)
    np.testing.assert_allclose(cos[0, 0].numpy(), 1.0)
