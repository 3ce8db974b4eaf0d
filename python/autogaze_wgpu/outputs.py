"""Generation outputs with the official names and meanings, and the multi-scale masks.

Every backend returns per-frame token ids; turning them into ``gazing_pos``,
``if_padded_gazing``, ``num_gazing_each_frame`` and ``gazing_mask`` happens here, once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from .config import AutoGazeConfig


@dataclass
class GazeOutput:
    """Gazes of a batch of videos (SPEC §5 "Outputs").

    Attributes:
        gazing_pos: (B, N) int64, token id + V·t (V = 265); a padded slot reads V·(t+1).
        if_padded_gazing: (B, N) bool, True where the slot is padding (task-loss stop, or a
            row that finished while another row of the batch went on).
        num_gazing_each_frame: (T,) int64 slots per frame, shared by the batch.
        gazing_mask: per scale, coarse to fine, a (B, T, cells) float32 0/1 array
            (cells = 4, 16, 49, 196 for the release: 2x2, 4x4, 7x7, 14x14 grids, row-major).
        frame_tokens: per frame, (B, n_t) int64 ids within the frame (pad = V).
        tiles: for ``target_scales`` calls, the tile-level output the recovery started from.
        res_adapt_info: for ``target_scales`` calls, the tiling geometry.
    """

    gazing_pos: np.ndarray
    if_padded_gazing: np.ndarray
    num_gazing_each_frame: np.ndarray
    gazing_mask: list[np.ndarray]
    frame_tokens: list[np.ndarray] = field(default_factory=list, repr=False)
    tiles: Optional["GazeOutput"] = field(default=None, repr=False)
    res_adapt_info: Optional[dict[str, Any]] = None

    @property
    def batch_size(self) -> int:
        return int(self.gazing_pos.shape[0])

    @property
    def num_frames(self) -> int:
        return int(self.num_gazing_each_frame.shape[0])

    def num_real_gazes(self) -> np.ndarray:
        """(B, T) number of non-padded gazes in each frame."""
        return np.stack([m.sum(-1) for m in self.gazing_mask], 0).sum(0).astype(np.int64)

    def to_dict(self) -> dict[str, Any]:
        """Plain lists, ready for ``json.dumps``."""
        d = {
            "gazing_pos": self.gazing_pos.tolist(),
            "if_padded_gazing": self.if_padded_gazing.tolist(),
            "num_gazing_each_frame": self.num_gazing_each_frame.tolist(),
            "gazing_mask": [m.astype(np.uint8).tolist() for m in self.gazing_mask],
        }
        if self.res_adapt_info is not None:
            d["res_adapt_info"] = self.res_adapt_info
        return d


@dataclass
class ScoreOutput:
    """The official teacher-forced ``forward`` outputs (SPEC §5b), both (B, N) float32.

    These use true (cumsum) positions, so they are NOT the probabilities generation used.
    """

    gaze_probs: np.ndarray
    task_loss_prediction: np.ndarray

    @property
    def log_action_probs(self) -> np.ndarray:
        """``log(gaze_probs + 1e-8)`` as the official QUICK_START call returns it."""
        return np.log(self.gaze_probs + np.float32(1e-8))


def tokens_to_masks(frame_tokens: list[np.ndarray], cfg: AutoGazeConfig) -> list[np.ndarray]:
    """Per-frame ids (B, n_t) -> per-scale (B, T, cells) 0/1 float32 masks (pads dropped).

    Ids split by scale in order: 0-3 -> 2x2, 4-19 -> 4x4, 20-68 -> 7x7, 69-264 -> 14x14
    (SPEC §6), each grid row-major.
    """
    V = cfg.num_vision_tokens_each_frame
    B = frame_tokens[0].shape[0] if frame_tokens else 0
    T = len(frame_tokens)
    full = np.zeros((B, T, V + 1), dtype=np.float32)  # the extra column swallows pads
    for t, tok in enumerate(frame_tokens):
        np.put_along_axis(full[:, t], tok.astype(np.int64), 1.0, axis=-1)
    full = full[..., :V]
    bounds = np.cumsum((0,) + tuple(cfg.num_tokens_each_scale))
    return [np.ascontiguousarray(full[..., a:b]) for a, b in zip(bounds[:-1], bounds[1:])]


def assemble_output(frame_tokens: list[np.ndarray], cfg: AutoGazeConfig, first_frame: int = 0) -> GazeOutput:
    """Builds the official outputs from per-frame ids; ``first_frame`` offsets ``gazing_pos``."""
    V, pad = cfg.num_vision_tokens_each_frame, cfg.pad_token_id
    frame_tokens = [np.asarray(t, dtype=np.int64) for t in frame_tokens]
    gazing_pos = np.concatenate(
        [tok + V * (first_frame + t) for t, tok in enumerate(frame_tokens)], axis=1
    )
    if_padded = np.concatenate([tok == pad for tok in frame_tokens], axis=1)
    num = np.array([tok.shape[1] for tok in frame_tokens], dtype=np.int64)
    return GazeOutput(
        gazing_pos=gazing_pos,
        if_padded_gazing=if_padded,
        num_gazing_each_frame=num,
        gazing_mask=tokens_to_masks(frame_tokens, cfg),
        frame_tokens=frame_tokens,
    )


def split_frame_tokens(
    gazing_pos: np.ndarray, if_padded_gazing: np.ndarray, num_gazing_each_frame, cfg: AutoGazeConfig
) -> list[np.ndarray]:
    """The inverse of :func:`assemble_output`: per-frame ids within the frame (pads -> pad id)."""
    V, pad = cfg.num_vision_tokens_each_frame, cfg.pad_token_id
    tokens, start = [], 0
    for t, n in enumerate(np.asarray(num_gazing_each_frame).tolist()):
        ids = gazing_pos[:, start : start + n] - V * t
        tokens.append(np.where(if_padded_gazing[:, start : start + n], pad, ids))
        start += n
    return tokens
