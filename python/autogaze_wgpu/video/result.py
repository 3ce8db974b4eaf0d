"""What a video-level call returns, in source-frame coordinates.

``FrameGaze`` is one frame: its fixations (one record per real gaze: tile, gaze order, token
id, scale, cell in the per-scale source grid, cell rectangle in source pixels, confidence),
one boolean grid per scale, the per-tile padding/stop information and the counts.
``VideoResult`` is a run of frames plus the geometry they share. Both convert cheaply to
numpy (``to_numpy`` / ``save_npz``) and to JSON (``to_dict`` / ``to_json``).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import InputError
from .modes import TileLayout

RESULT_FORMAT = "autogaze-wgpu.video-result/1"

FIXATION_DTYPE = np.dtype(
    [
        ("frame", np.int32),  # index of the frame in this run
        ("tile", np.int32),  # tile (batch row) that made the gaze, row-major over the tiles
        ("slot", np.int32),  # slot in that tile's frame output (padding slots included)
        ("order", np.int32),  # rank among the tile's real gazes in this frame (gaze order)
        ("token", np.int32),  # token id within the tile's frame, 0..264
        ("scale", np.int32),  # 0 = coarsest (2x2 per tile) ... 3 = finest (14x14 per tile)
        ("row", np.int32),  # cell row in the scale's source grid
        ("col", np.int32),  # cell column in the scale's source grid
        ("x0", np.int32),  # cell rectangle in source pixels, [x0, x1) x [y0, y1)
        ("y0", np.int32),
        ("x1", np.int32),
        ("y1", np.int32),
        ("confidence", np.float32),  # see VideoResult.confidence_kind; NaN when not computed
    ]
)

CONFIDENCE_KINDS = {
    "teacher_forced": (
        "the probability the model gives the gaze in the official teacher-forced forward "
        "(AutoGaze.score, SPEC §5b): true positions, so not the generation-time probability"
    ),
    "none": "not computed (NaN)",
}


@dataclass
class FrameGaze:
    """One frame's gazes in source coordinates.

    Attributes:
        index: position of the frame in this run (0-based).
        source_index: frame number in the source video (differs from ``index`` with a clip
            window or a frame stride).
        fixations: FIXATION_DTYPE records of the real gazes on source pixels, by tile then
            gaze order.
        grids: per scale, coarse to fine, a bool (rows, cols) grid of gazed cells.
        num_slots: (tiles,) output slots of each tile, padding included.
        num_real: (tiles,) real (non-padded) gazes of each tile.
        first_padded_slot: (tiles,) first padded slot of each tile (-1: none). With a
            task-loss requirement, this is where the tile met it (stopped early).
        num_dropped: (tiles,) real gazes on cells that lie wholly in the zero padding
            (``tiled_full`` edge tiles); they are not in ``fixations``.
        budget: the slots a tile could use in this frame (max(1, floor(ratio * 265))).
    """

    index: int
    source_index: int
    fixations: np.ndarray
    grids: list[np.ndarray]
    num_slots: np.ndarray
    num_real: np.ndarray
    first_padded_slot: np.ndarray
    num_dropped: np.ndarray
    budget: int
    layout: TileLayout = field(repr=False)

    @property
    def num_gazes(self) -> int:
        """Real gazes that land on source pixels."""
        return int(self.fixations.shape[0])

    @property
    def tokens_available(self) -> int:
        return self.layout.tokens_available

    @property
    def token_ratio(self) -> float:
        """num_gazes / tokens_available: the fraction of the model's tokens this frame kept.
        (Not the interframe pixel update ratio, which counts pixels.)"""
        return self.num_gazes / self.layout.tokens_available

    @property
    def stopped_early(self) -> np.ndarray:
        """(tiles,) True where the tile met the task-loss requirement before its budget."""
        return self.first_padded_slot >= 0

    def pixel_mask(self, scale: int | None = None) -> np.ndarray:
        """(H, W) bool: source pixels inside a gazed cell (of one scale, or any scale)."""
        return _rect_mask(self.fixations, self.layout.height, self.layout.width, scale)

    def fixation_dicts(self) -> list[dict[str, Any]]:
        out = []
        for f in self.fixations:
            conf = float(f["confidence"])
            out.append(
                {
                    "tile": int(f["tile"]),
                    "slot": int(f["slot"]),
                    "order": int(f["order"]),
                    "token": int(f["token"]),
                    "scale": int(f["scale"]),
                    "row": int(f["row"]),
                    "col": int(f["col"]),
                    "box": [int(f["x0"]), int(f["y0"]), int(f["x1"]), int(f["y1"])],
                    "confidence": None if math.isnan(conf) else conf,
                }
            )
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "source_index": self.source_index,
            "num_gazes": self.num_gazes,
            "token_ratio": self.token_ratio,
            "budget": self.budget,
            "tiles": [
                {
                    "tile": k,
                    "num_slots": int(self.num_slots[k]),
                    "num_real": int(self.num_real[k]),
                    "first_padded_slot": int(self.first_padded_slot[k]),
                    "stopped_early": bool(self.first_padded_slot[k] >= 0),
                    "num_dropped": int(self.num_dropped[k]),
                }
                for k in range(len(self.num_slots))
            ],
            "fixations": self.fixation_dicts(),
            # Gazed cells per scale as flat row-major indices into the scale's source grid.
            "cells": [np.flatnonzero(g).tolist() for g in self.grids],
        }

    @classmethod
    def from_tile_tokens(
        cls,
        layout: TileLayout,
        index: int,
        source_index: int,
        tile_tokens: Sequence[np.ndarray],
        tile_confidence: Sequence[np.ndarray | None] | None = None,
        budget: int = 0,
    ) -> FrameGaze:
        """Stitches the tiles' outputs of one frame (ids within the frame, pad = 265) into
        source coordinates. ``tile_tokens[k]`` is tile k's (n_k,) slots."""
        if len(tile_tokens) != layout.num_tiles:
            raise InputError(
                f"expected outputs for {layout.num_tiles} tiles, got {len(tile_tokens)}"
            )
        pad = layout.grid.pad_token_id
        recs, n_slots, n_real, first_pad, n_drop = [], [], [], [], []
        grids = [np.zeros(layout.scale_shape(s), dtype=bool) for s in range(layout.grid.num_scales)]
        for k, tok in enumerate(tile_tokens):
            tok = np.asarray(tok, dtype=np.int64).reshape(-1)
            conf = None if tile_confidence is None else tile_confidence[k]
            conf = (
                np.full(tok.shape, np.nan, np.float32)
                if conf is None
                else np.asarray(conf, np.float32).reshape(-1)
            )
            if conf.shape != tok.shape:
                raise InputError(f"tile {k}: {conf.shape[0]} confidences for {tok.shape[0]} slots")
            real = tok != pad
            slots = np.flatnonzero(real)
            pads = np.flatnonzero(~real)
            n_slots.append(tok.size)
            n_real.append(slots.size)
            first_pad.append(int(pads[0]) if pads.size else -1)
            m = layout.map_tokens(k, tok[slots])
            v = m["valid"]
            n_drop.append(int((~v).sum()))
            r = np.zeros(int(v.sum()), dtype=FIXATION_DTYPE)
            r["frame"], r["tile"] = index, k
            r["slot"], r["order"] = slots[v], np.arange(slots.size)[v]
            r["token"] = tok[slots][v]
            for name in ("scale", "row", "col", "x0", "y0", "x1", "y1"):
                r[name] = m[name][v]
            r["confidence"] = conf[slots][v]
            for s in range(layout.grid.num_scales):
                sel = r["scale"] == s
                grids[s][r["row"][sel], r["col"][sel]] = True
            recs.append(r)
        return cls(
            index=int(index),
            source_index=int(source_index),
            fixations=np.concatenate(recs) if recs else np.zeros(0, FIXATION_DTYPE),
            grids=grids,
            num_slots=np.asarray(n_slots, dtype=np.int64),
            num_real=np.asarray(n_real, dtype=np.int64),
            first_padded_slot=np.asarray(first_pad, dtype=np.int64),
            num_dropped=np.asarray(n_drop, dtype=np.int64),
            budget=int(budget),
            layout=layout,
        )


@dataclass
class VideoResult:
    """Gazes of a video in source-frame coordinates (the return value of ``model(frames)``).

    Attributes:
        frames: one :class:`FrameGaze` per processed frame.
        layout: the mode's geometry (tiles, per-scale source grids).
        source: what made the gazes, e.g. ``"autogaze:reference"`` or ``"patch_diff"``.
        confidence_kind: what ``fixations["confidence"]`` holds (see ``CONFIDENCE_KINDS``).
        params: the call's settings (mode, gazing_ratio, task_loss_requirement, long-video
            strategy, ...), as recorded in the JSON.
        fps: frames per second of the source, when known.
    """

    frames: list[FrameGaze]
    layout: TileLayout
    source: str
    confidence_kind: str = "none"
    params: dict[str, Any] = field(default_factory=dict)
    fps: float | None = None

    # -- shape ---------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.frames)

    def __iter__(self) -> Iterator[FrameGaze]:
        return iter(self.frames)

    def __getitem__(self, t: int) -> FrameGaze:
        return self.frames[t]

    @property
    def num_frames(self) -> int:
        return len(self.frames)

    @property
    def height(self) -> int:
        return self.layout.height

    @property
    def width(self) -> int:
        return self.layout.width

    @property
    def mode(self) -> str:
        return self.layout.mode

    @property
    def num_scales(self) -> int:
        return self.layout.grid.num_scales

    # -- arrays over frames ---------------------------------------------------------------------
    @property
    def fixations(self) -> np.ndarray:
        """All frames' fixations in one FIXATION_DTYPE array (field ``frame`` tells them apart)."""
        if not self.frames:
            return np.zeros(0, FIXATION_DTYPE)
        return np.concatenate([f.fixations for f in self.frames])

    @property
    def grids(self) -> list[np.ndarray]:
        """Per scale, coarse to fine: bool (T, rows, cols) of gazed cells in source coordinates."""
        return [
            np.stack([f.grids[s] for f in self.frames])
            if self.frames
            else np.zeros((0, *self.layout.scale_shape(s)), bool)
            for s in range(self.num_scales)
        ]

    @property
    def source_indices(self) -> np.ndarray:
        return np.asarray([f.source_index for f in self.frames], dtype=np.int64)

    @property
    def num_gazes(self) -> np.ndarray:
        """(T,) real gazes on source pixels per frame."""
        return np.asarray([f.num_gazes for f in self.frames], dtype=np.int64)

    @property
    def tokens_available(self) -> int:
        return self.layout.tokens_available

    @property
    def token_ratio(self) -> np.ndarray:
        """(T,) gazes / tokens available: the model's token ratio (not a pixel ratio)."""
        return self.num_gazes / float(self.layout.tokens_available)

    def _per_tile(self, name: str) -> np.ndarray:
        if not self.frames:
            return np.zeros((0, self.layout.num_tiles), np.int64)
        return np.stack([getattr(f, name) for f in self.frames])

    @property
    def num_slots(self) -> np.ndarray:
        """(T, tiles) output slots per tile, padding included."""
        return self._per_tile("num_slots")

    @property
    def num_real(self) -> np.ndarray:
        return self._per_tile("num_real")

    @property
    def first_padded_slot(self) -> np.ndarray:
        """(T, tiles) first padded slot (-1: the tile used its whole budget or stopped otherwise)."""
        return self._per_tile("first_padded_slot")

    @property
    def num_dropped(self) -> np.ndarray:
        return self._per_tile("num_dropped")

    @property
    def budget(self) -> np.ndarray:
        return np.asarray([f.budget for f in self.frames], dtype=np.int64)

    # -- dense masks (on request) ------------------------------------------------------------------
    def pixel_mask(self, t: int, scale: int | None = None) -> np.ndarray:
        """(H, W) bool for frame t: pixels inside a gazed cell of ``scale`` (None: any)."""
        return self.frames[t].pixel_mask(scale)

    def pixel_masks(self, scale: int | None = None) -> np.ndarray:
        """(T, H, W) bool for every frame. Holds T*H*W bytes: prefer ``pixel_mask(t)`` on long
        videos."""
        return (
            np.stack([f.pixel_mask(scale) for f in self.frames])
            if self.frames
            else np.zeros((0, self.height, self.width), bool)
        )

    # -- conversions ---------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        n = self.num_gazes
        return {
            "num_frames": self.num_frames,
            "total_gazes": int(n.sum()),
            "tokens_available_per_frame": self.tokens_available,
            "mean_token_ratio": float(self.token_ratio.mean()) if self.frames else 0.0,
            "frames_stopped_early": int((self.first_padded_slot >= 0).any(-1).sum())
            if self.frames
            else 0,
        }

    def to_numpy(self) -> dict[str, np.ndarray]:
        """Every array of the result, ready for ``np.savez``. Keys: ``fixations_<field>`` for
        each FIXATION_DTYPE field, ``grid_scale{i}`` (T, rows, cols) bool, per-tile
        ``num_slots``/``num_real``/``first_padded_slot``/``num_dropped`` (T, tiles),
        ``num_gazes``, ``token_ratio``, ``budget``, ``source_index`` (T,), ``tokens_available``,
        ``tile_origins`` and the lattice edges ``y_edges_scale{i}``/``x_edges_scale{i}``."""
        fx = self.fixations
        d: dict[str, np.ndarray] = {
            f"fixations_{k}": np.ascontiguousarray(fx[k]) for k in FIXATION_DTYPE.names
        }
        for s, g in enumerate(self.grids):
            d[f"grid_scale{s}"] = g
            d[f"y_edges_scale{s}"] = self.layout.y_edges[s]
            d[f"x_edges_scale{s}"] = self.layout.x_edges[s]
        for k in ("num_slots", "num_real", "first_padded_slot", "num_dropped"):
            d[k] = self._per_tile(k)
        d["num_gazes"] = self.num_gazes
        d["token_ratio"] = self.token_ratio
        d["budget"] = self.budget
        d["source_index"] = self.source_indices
        d["tokens_available"] = np.asarray(self.tokens_available, dtype=np.int64)
        d["tile_origins"] = self.layout.tile_origins
        d["source_size"] = np.asarray([self.height, self.width], dtype=np.int64)
        return d

    def save_npz(self, path: str | os.PathLike) -> None:
        np.savez_compressed(path, **self.to_numpy())

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": RESULT_FORMAT,
            "source": self.source,
            "confidence_kind": self.confidence_kind,
            "confidence_meaning": CONFIDENCE_KINDS.get(self.confidence_kind, ""),
            "fps": self.fps,
            "params": _jsonable(self.params),
            "layout": self.layout.describe(),
            "scales": [
                {
                    "scale": s,
                    "model_input_px": self.layout.grid.scales[s],
                    "cells_per_tile": self.layout.grid.grids[s],
                    "grid_shape": list(self.layout.scale_shape(s)),
                }
                for s in range(self.num_scales)
            ],
            "summary": self.summary(),
            "frames": [f.to_dict() for f in self.frames],
        }

    def to_json(self, path: str | os.PathLike | None = None, indent: int | None = None) -> str:
        """The result as JSON (NaN confidences become null). Writes it to ``path`` if given."""
        s = json.dumps(self.to_dict(), indent=indent, allow_nan=False)
        if path is not None:
            with open(path, "w") as f:
                f.write(s)
        return s


def _rect_mask(fixations: np.ndarray, height: int, width: int, scale: int | None) -> np.ndarray:
    mask = np.zeros((height, width), dtype=bool)
    fx = fixations if scale is None else fixations[fixations["scale"] == scale]
    for f in fx:
        mask[f["y0"] : f["y1"], f["x0"] : f["x1"]] = True
    return mask


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, float) and not math.isfinite(x):
        return None if math.isnan(x) else ("inf" if x > 0 else "-inf")
    return x


def load_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads a ``save_npz`` file back into a dict of arrays (keys as in ``to_numpy``)."""
    with np.load(path) as z:
        return {k: z[k] for k in z.files}
