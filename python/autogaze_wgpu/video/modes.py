"""Inference modes on frames of any size: where the model's tiles come from, and where their
cells land in the source frame (SPEC §6, §7).

Three modes, all built from the same 224x224 model input (a "tile"):

* ``"resize"``: the whole frame is one tile (the official processor's shortest-edge resize,
  then the model's own bicubic squash to 224x224). The realtime default.
* ``"tiled"`` (AnyRes): the frame is resized to a whole grid of tiles, ``round(H/224)`` by
  ``round(W/224)`` (1920x1080 -> 2016x1120 = 9x5 tiles), and every tile is a batch row. This
  is the official AnyRes recipe, for any aspect ratio; on a square frame whose side is a
  multiple of 224 the tiles are exactly those of the official ``target_scales`` path.
* ``"tiled_full"``: tiles are cut from the source at native resolution; edge tiles are
  zero-padded in normalised space (the mean colour, as the official resolution adaptation
  pads), and an optional ``tile_stride`` < 224 makes tiles overlap.

A :class:`TileLayout` holds the geometry of one mode for one frame size. For every scale it
defines the *source lattice*: the grid of cells that scale's tile cells form once stitched
together, with the cell edges in source pixels. A gaze on tile ``k``, token ``id`` maps to a
scale, a lattice cell (row, col) and a rectangle of source pixels (:meth:`TileLayout.map_tokens`).

Cell edges are integers: in ``resize``/``tiled`` lattice row ``R`` of a scale with ``n`` rows
spans source rows ``[R*H//n, (R+1)*H//n)`` (the same fraction of the frame as the cell covers
of the model input); in ``tiled_full`` cells are squares of ``224/g`` source pixels starting
at the tile origin, and the last row/column of cells may be cut by the frame edge (kept,
clipped). Cells that lie wholly in the zero padding are dropped, as the official recovery does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np

from ..errors import ConfigError, InputError

MODES = ("resize", "tiled", "tiled_full")


@dataclass(frozen=True)
class ModelGrid:
    """The model's multi-scale token layout (SPEC §6): 265 ids split over 2x2, 4x4, 7x7, 14x14
    grids of the 224x224 input, coarse to fine, each row-major."""

    input_size: int = 224
    scales: tuple[int, ...] = (32, 64, 112, 224)
    grids: tuple[int, ...] = (2, 4, 7, 14)
    pad_token_id: int = 265

    @classmethod
    def from_config(cls, cfg) -> ModelGrid:
        grids = tuple(int(g) for g in cfg.grid_each_scale)
        tokens = tuple(int(n) for n in cfg.num_tokens_each_scale)
        if tokens != tuple(g * g for g in grids):
            raise ConfigError(
                f"num_tokens_each_scale {tokens} are not the squares of the grids {grids}; "
                "the video tools need square per-scale grids"
            )
        return cls(
            int(cfg.input_img_size), tuple(int(s) for s in cfg.scales), grids, int(cfg.pad_token_id)
        )

    @property
    def num_scales(self) -> int:
        return len(self.grids)

    @property
    def tokens_each_scale(self) -> tuple[int, ...]:
        return tuple(g * g for g in self.grids)

    @property
    def num_tokens(self) -> int:
        return sum(self.tokens_each_scale)

    @property
    def scale_offsets(self) -> np.ndarray:
        """First id of every scale, plus the total: (0, 4, 20, 69, 265) for the release."""
        return np.concatenate([[0], np.cumsum(self.tokens_each_scale)]).astype(np.int64)

    def split_ids(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Token ids within a frame (no pads) -> (scale, row, col) in the tile's grids."""
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= self.num_tokens):
            raise InputError(
                f"token ids must be in [0, {self.num_tokens}), got {ids.min()}..{ids.max()}"
            )
        off = self.scale_offsets
        scale = np.searchsorted(off, ids, side="right") - 1
        local = ids - off[scale]
        g = np.asarray(self.grids, dtype=np.int64)[scale]
        return scale, local // g, local % g


RELEASE_GRID = ModelGrid()


@dataclass(frozen=True)
class TileLayout:
    """The tiles of one mode for one frame size, and the per-scale source lattice.

    Attributes:
        mode: "resize", "tiled" or "tiled_full".
        height, width: the source frame size.
        work_height, work_width: the image the tiles are cut from: the resized frame in
            ``tiled`` (a whole number of tiles), the source in ``tiled_full`` and, nominally,
            one tile in ``resize``.
        tile_origins: (num_tiles, 2) int (y, x) of each tile in the work image, row-major.
        tiles_shape: (tile rows, tile columns).
        y_edges, x_edges: per scale, the lattice's cell edges in source pixels (rows+1 / cols+1).
    """

    mode: str
    height: int
    width: int
    work_height: int
    work_width: int
    tile_origins: np.ndarray
    tiles_shape: tuple[int, int]
    grid: ModelGrid
    tile_stride: int
    y_edges: tuple[np.ndarray, ...] = field(repr=False)
    x_edges: tuple[np.ndarray, ...] = field(repr=False)

    # -- sizes ----------------------------------------------------------------------------------
    @property
    def tile_size(self) -> int:
        return self.grid.input_size

    @property
    def num_tiles(self) -> int:
        return int(self.tile_origins.shape[0])

    @property
    def overlapping(self) -> bool:
        return self.mode == "tiled_full" and self.tile_stride < self.tile_size

    def scale_shape(self, scale: int) -> tuple[int, int]:
        """(rows, cols) of a scale's source lattice."""
        return len(self.y_edges[scale]) - 1, len(self.x_edges[scale]) - 1

    @property
    def scale_shapes(self) -> list[tuple[int, int]]:
        return [self.scale_shape(i) for i in range(self.grid.num_scales)]

    @cached_property
    def tokens_available(self) -> int:
        """Tile cells that cover source pixels (over all tiles and scales): what a frame's
        gaze count is divided by for the token ratio. 265 in ``resize``; 265 x tiles in
        ``tiled``; fewer in ``tiled_full`` when cells lie wholly in the padding."""
        if self.mode != "tiled_full":
            return self.num_tiles * self.grid.num_tokens
        n = 0
        for k in range(self.num_tiles):
            for s, g in enumerate(self.grid.grids):
                ids = self.grid.scale_offsets[s] + np.arange(g * g)
                n += int(self.map_tokens(k, ids)["valid"].sum())
        return n

    def describe(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "source_size": [self.height, self.width],
            "work_size": [self.work_height, self.work_width],
            "tile_size": self.tile_size,
            "tiles_shape": list(self.tiles_shape),
            "tile_stride": self.tile_stride,
            "num_tiles": self.num_tiles,
            "scale_grid_shapes": [list(s) for s in self.scale_shapes],
            "tokens_available": self.tokens_available,
        }

    # -- token -> source ------------------------------------------------------------------------
    def map_tokens(self, tile: int, ids: np.ndarray) -> dict[str, np.ndarray]:
        """Real (non-pad) token ids of one tile -> per id: scale, row/col in the source
        lattice, the cell rectangle in source pixels (x0, y0, x1, y1; clipped to the frame),
        and ``valid`` (False where the cell lies wholly in the padding)."""
        scale, r, c = self.grid.split_ids(ids)
        T = self.tile_size
        g = np.asarray(self.grid.grids, dtype=np.int64)[scale]
        oy, ox = (int(v) for v in self.tile_origins[tile])
        if self.mode == "tiled_full":
            top, bottom = oy + (r * T) // g, oy + ((r + 1) * T) // g
            left, right = ox + (c * T) // g, ox + ((c + 1) * T) // g
            valid = (top < self.height) & (left < self.width)
            # Lattice cell: the tile cell's top-left corner in cell units, rounded (exact when
            # tiles do not overlap; the nearest lattice cell when tile_stride is not a multiple
            # of the cell size).
            row = np.floor((oy * g + r * T) / T + 0.5).astype(np.int64)
            col = np.floor((ox * g + c * T) / T + 0.5).astype(np.int64)
            y0, y1 = np.minimum(top, self.height), np.minimum(bottom, self.height)
            x0, x1 = np.minimum(left, self.width), np.minimum(right, self.width)
            rows = np.array([self.scale_shape(s)[0] for s in range(self.grid.num_scales)])[scale]
            cols = np.array([self.scale_shape(s)[1] for s in range(self.grid.num_scales)])[scale]
            row, col = np.minimum(row, rows - 1), np.minimum(col, cols - 1)
        else:
            ty, tx = oy // T, ox // T
            row, col = ty * g + r, tx * g + c
            y0, y1, x0, x1 = (np.zeros(scale.shape, dtype=np.int64) for _ in range(4))
            for s in np.unique(scale):
                m = scale == s
                ye, xe = self.y_edges[s], self.x_edges[s]
                y0[m], y1[m] = ye[row[m]], ye[row[m] + 1]
                x0[m], x1[m] = xe[col[m]], xe[col[m] + 1]
            # A frame smaller than the grid (e.g. 5x7 px, 14 cells a side) has cells under a
            # pixel wide: their box is the source pixel that contains them, never empty.
            y0, x0 = np.minimum(y0, self.height - 1), np.minimum(x0, self.width - 1)
            y1, x1 = np.maximum(y1, y0 + 1), np.maximum(x1, x0 + 1)
            valid = np.ones(scale.shape, dtype=bool)
        return {
            "scale": scale,
            "row": row,
            "col": col,
            "x0": x0,
            "y0": y0,
            "x1": x1,
            "y1": y1,
            "valid": valid,
        }

    # -- model inputs -----------------------------------------------------------------------------
    def work_frames(self, frames: np.ndarray) -> np.ndarray:
        """uint8 (T, H, W, 3) source frames -> the work image the tiles are cut from."""
        if self.mode == "tiled_full" or (self.work_height, self.work_width) == (
            self.height,
            self.width,
        ):
            return frames
        return resize_uint8(frames, self.work_height, self.work_width)

    def cut_tiles(self, work: np.ndarray, tiles: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """Work frames (T, h, w, 3) -> uint8 tiles (len(tiles), T, 224, 224, 3) and a
        (len(tiles), 224, 224) bool map of the pixels that come from the frame (False =
        zero padding, only in ``tiled_full``)."""
        T = self.tile_size
        n = len(tiles)
        out = np.zeros((n, work.shape[0], T, T, 3), dtype=np.uint8)
        valid = np.zeros((n, T, T), dtype=bool)
        for j, k in enumerate(tiles):
            oy, ox = (int(v) for v in self.tile_origins[k])
            h = max(0, min(T, work.shape[1] - oy))
            w = max(0, min(T, work.shape[2] - ox))
            out[j, :, :h, :w] = work[:, oy : oy + h, ox : ox + w]
            valid[j, :h, :w] = True
        return out, valid


def make_layout(
    height: int,
    width: int,
    mode: str = "resize",
    grid: ModelGrid = RELEASE_GRID,
    tile_grid: tuple[int, int] | None = None,
    tile_stride: int | None = None,
) -> TileLayout:
    """The layout of ``mode`` for ``height`` x ``width`` frames.

    tile_grid: ``tiled`` only, (rows, cols) of tiles; default ``round(H/224), round(W/224)``
        (at least 1 each).
    tile_stride: ``tiled_full`` only, pixels between tile origins (default 224: no overlap).
    """
    if mode not in MODES:
        raise InputError(f"mode must be one of {', '.join(map(repr, MODES))}, got {mode!r}")
    H, W, T = int(height), int(width), grid.input_size
    if H < 1 or W < 1:
        raise InputError(f"frames must be at least 1x1 pixels, got {H}x{W}")
    if tile_grid is not None and mode != "tiled":
        raise InputError(f"tile_grid applies to mode='tiled' only, not {mode!r}")
    if tile_stride is not None and mode != "tiled_full":
        raise InputError(f"tile_stride applies to mode='tiled_full' only, not {mode!r}")
    stride = T
    if mode == "resize":
        nh = nw = 1
        work = (T, T)
        origins = [(0, 0)]
    elif mode == "tiled":
        if tile_grid is None:
            nh, nw = max(1, int(np.floor(H / T + 0.5))), max(1, int(np.floor(W / T + 0.5)))
        else:
            try:
                nh, nw = (int(v) for v in tile_grid)
            except (TypeError, ValueError):
                raise InputError(f"tile_grid must be (rows, cols), got {tile_grid!r}") from None
            if nh < 1 or nw < 1:
                raise InputError(f"tile_grid must be positive, got {tile_grid!r}")
        work = (nh * T, nw * T)
        origins = [(i * T, j * T) for i in range(nh) for j in range(nw)]
    else:
        if tile_stride is not None:
            stride = int(tile_stride)
            if not (0 < stride <= T):
                raise InputError(f"tile_stride must be in [1, {T}], got {tile_stride!r}")
        ys = _tile_starts(H, T, stride)
        xs = _tile_starts(W, T, stride)
        nh, nw = len(ys), len(xs)
        work = (H, W)
        origins = [(y, x) for y in ys for x in xs]
    y_edges, x_edges = [], []
    for g in grid.grids:
        if mode == "tiled_full":
            rows, cols = -(-H * g // T), -(-W * g // T)
            y_edges.append(np.minimum((np.arange(rows + 1) * T) // g, H).astype(np.int64))
            x_edges.append(np.minimum((np.arange(cols + 1) * T) // g, W).astype(np.int64))
        else:
            y_edges.append((np.arange(nh * g + 1) * H) // (nh * g))
            x_edges.append((np.arange(nw * g + 1) * W) // (nw * g))
    return TileLayout(
        mode=mode,
        height=H,
        width=W,
        work_height=work[0],
        work_width=work[1],
        tile_origins=np.asarray(origins, dtype=np.int64).reshape(-1, 2),
        tiles_shape=(nh, nw),
        grid=grid,
        tile_stride=stride,
        y_edges=tuple(y_edges),
        x_edges=tuple(x_edges),
    )


def _tile_starts(size: int, tile: int, stride: int) -> list[int]:
    """Tile origins along one axis: 0, stride, ... until a tile reaches the end."""
    starts = [0]
    while starts[-1] + tile < size:
        starts.append(starts[-1] + stride)
    return starts


def resize_uint8(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 (T, H, W, 3) -> (T, height, width, 3) with PIL's bilinear filter (the official
    processor's resize: antialiased when shrinking)."""
    from PIL import Image

    out = np.empty((frames.shape[0], height, width, 3), dtype=np.uint8)
    for t in range(frames.shape[0]):
        img = Image.fromarray(np.ascontiguousarray(frames[t]), mode="RGB")
        out[t] = np.asarray(img.resize((width, height), Image.Resampling.BILINEAR))
    return out


def as_uint8_frames(frames: Any) -> np.ndarray:
    """Frames of one video for the video tools -> C-contiguous uint8 (T, H, W, 3); see
    :func:`autogaze_wgpu.processor.as_uint8_video` for what is accepted."""
    from ..processor import as_uint8_video

    return as_uint8_video(frames, batched=False)
