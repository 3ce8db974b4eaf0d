"""``patch_diff``: a model-free mask source, for comparison and for running without weights.

A cell is "gazed" when the mean absolute change of its pixels since the previous frame
(over R, G and B, in grey levels 0-255) exceeds ``threshold``. The first frame has nothing to
compare with, so every cell is new. ``patch_diff`` works on any frames; :class:`PatchDiff`
plugs the same rule into the video pipeline, where it takes the model's place in every mode
(its cells are the model's finest-scale cells of each tile, or another scale's).
"""

from __future__ import annotations

import numpy as np

from ..errors import InputError
from .modes import RELEASE_GRID, ModelGrid


def cell_mean_abs_diff(
    prev: np.ndarray, cur: np.ndarray, cell_size: int, valid: np.ndarray | None = None
) -> np.ndarray:
    """Mean |cur - prev| over each cell_size x cell_size cell (over the RGB channels).

    prev, cur: uint8 (..., H, W, 3). Cells at the right/bottom edge may be smaller. ``valid``
    (H, W) bool limits the mean to those pixels (cells without one get 0).
    Returns float64 (..., ceil(H/cell), ceil(W/cell)).
    """
    if prev.shape != cur.shape:
        raise InputError(f"frames differ in shape: {prev.shape} vs {cur.shape}")
    H, W = cur.shape[-3], cur.shape[-2]
    rows, cols = -(-H // cell_size), -(-W // cell_size)
    d = (
        np.abs(cur.astype(np.int16) - prev.astype(np.int16)).sum(-1).astype(np.float64)
    )  # (..., H, W)
    w = np.ones((H, W)) if valid is None else valid.astype(np.float64)
    d = d * w
    ph, pw = rows * cell_size - H, cols * cell_size - W
    pad = [(0, 0)] * (d.ndim - 2) + [(0, ph), (0, pw)]
    d = np.pad(d, pad)
    w = np.pad(w, [(0, ph), (0, pw)])
    s = d.reshape(*d.shape[:-2], rows, cell_size, cols, cell_size).sum((-3, -1))
    n = w.reshape(rows, cell_size, cols, cell_size).sum((-3, -1)) * 3.0
    return np.divide(s, n, out=np.zeros_like(s), where=n > 0)


def patch_diff(
    frames: np.ndarray,
    cell_size: int = 16,
    threshold: float = 8.0,
    previous: np.ndarray | None = None,
) -> np.ndarray:
    """Cells whose mean absolute change since the previous frame exceeds ``threshold``.

    frames: uint8 (T, H, W, 3). previous: the frame before ``frames[0]`` (H, W, 3); without
    it the first frame is all True. Returns bool (T, ceil(H/cell_size), ceil(W/cell_size)).
    """
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise InputError(
            f"patch_diff takes uint8 (T, H, W, 3) frames, got {frames.dtype} {frames.shape}"
        )
    if cell_size < 1:
        raise InputError(f"cell_size must be positive, got {cell_size}")
    if not threshold >= 0:
        raise InputError(f"threshold must be >= 0, got {threshold}")
    T, H, W, _ = frames.shape
    rows, cols = -(-H // cell_size), -(-W // cell_size)
    out = np.zeros((T, rows, cols), dtype=bool)
    if previous is None:
        out[0] = True
        prev = frames[:-1]
        cur = frames[1:]
        if T > 1:
            out[1:] = cell_mean_abs_diff(prev, cur, cell_size) > threshold
    else:
        prev = np.concatenate([np.asarray(previous, dtype=np.uint8)[None], frames[:-1]])
        out[:] = cell_mean_abs_diff(prev, frames, cell_size) > threshold
    return out


class PatchDiff:
    """``patch_diff`` as a gaze source for the video pipeline (``run_video(PatchDiff(), ...)``,
    ``autogaze-wgpu run --baseline patch_diff``).

    Per tile and frame, the cells of one scale of the model's tile grid (default the finest,
    16x16 px of the tile) whose mean absolute change since the previous frame exceeds
    ``threshold`` grey levels. With ``gazing_ratio`` set, at most that many tokens per tile
    (max(1, floor(ratio * 265))), the largest changes first; the gaze order is by decreasing
    change. ``task_loss_requirement`` does not apply. There is no confidence (NaN).
    """

    name = "patch_diff"
    confidence_kind = "none"

    def __init__(self, threshold: float = 8.0, scale: int = -1, grid: ModelGrid = RELEASE_GRID):
        if not (isinstance(threshold, (int, float)) and threshold >= 0):
            raise InputError(f"threshold must be a number >= 0, got {threshold!r}")
        if not -grid.num_scales <= scale < grid.num_scales:
            raise InputError(f"scale must index one of the {grid.num_scales} scales, got {scale}")
        self.threshold = float(threshold)
        self.scale = scale % grid.num_scales
        self.grid = grid
        self._prev: dict[int, np.ndarray] = {}

    def __repr__(self) -> str:
        return f"PatchDiff(threshold={self.threshold}, scale={self.scale})"

    @property
    def params(self) -> dict:
        return {"threshold": self.threshold, "scale": self.scale}

    def reset(self) -> None:
        self._prev = {}

    def tile_tokens(
        self,
        tiles: np.ndarray,
        valid: np.ndarray,
        tile_ids: list[int],
        budgets: list[int | None],
    ) -> list[list[np.ndarray]]:
        """uint8 tiles (B, T, S, S, 3), valid (B, S, S) -> per frame, per tile, (n,) ids."""
        g = self.grid.grids[self.scale]
        S = self.grid.input_size
        cell = S // g
        if cell * g != S:
            raise InputError(f"scale {self.scale}: {g} cells do not divide the {S}px tile")
        off = int(self.grid.scale_offsets[self.scale])
        B, T = tiles.shape[:2]
        out: list[list[np.ndarray]] = [[None] * B for _ in range(T)]  # type: ignore[list-item]
        for j, k in enumerate(tile_ids):
            for t in range(T):
                cur = tiles[j, t]
                prev = self._prev.get(k)
                if prev is None:
                    score = np.full((g, g), np.inf)
                else:
                    score = cell_mean_abs_diff(prev, cur, cell, valid[j])
                    # Cells wholly in padding never change and are never picked.
                self._prev[k] = cur
                flat = score.reshape(-1)
                picked = np.flatnonzero(flat > self.threshold)
                if prev is None:
                    vm = valid[j].reshape(g, cell, g, cell).any((1, 3)).reshape(-1)
                    picked = picked[vm[picked]]
                picked = picked[np.argsort(-flat[picked], kind="stable")]
                if budgets[t] is not None:
                    picked = picked[: budgets[t]]
                out[t][j] = (picked + off).astype(np.int64)
        return out
