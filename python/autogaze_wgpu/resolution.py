"""The official resolution adaptation (``target_scales`` / ``target_patch_size``, SPEC §7).

``input_res_adapt`` pads a square video to a whole number of model-size tiles (padding value
0 in normalised space, i.e. the mean colour) and turns tiles into batch rows;
``recover_output_from_res_adapt`` stitches each scale's tile grids back together, crops the
padding cells and re-derives ``gazing_pos`` from the stitched masks, exactly as the official
code does (gaze order is lost, positions come out sorted and padded with -1).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from .config import AutoGazeConfig
from .errors import InputError
from .outputs import GazeOutput


def input_res_adapt(
    video: np.ndarray, target_scales: Sequence[int], target_patch_size: int, cfg: AutoGazeConfig
) -> tuple[np.ndarray, dict[str, Any]]:
    """(B, T, 3, S, S) with S = max(target_scales) -> tiles (B*nh*nw, T, 3, tile, tile), info."""
    scales = [int(s) for s in target_scales]
    n_scales = len(cfg.scales)
    if len(scales) != n_scales or any(s <= 0 for s in scales):
        raise InputError(
            f"target_scales must be {n_scales} positive sizes (one per model scale "
            f"{list(cfg.scales)}), got {list(target_scales)}"
        )
    if int(target_patch_size) <= 0:
        raise InputError(f"target_patch_size must be positive, got {target_patch_size}")
    B, T, C, H, W = video.shape
    side = max(scales)
    if H != side or W != side:
        raise InputError(
            f"target_scales needs a square input whose side is the largest target scale "
            f"({side}); got {H}x{W}. Resize the frames to {side}x{side} first."
        )
    tile = cfg.input_img_size
    nh, nw = -(-H // tile), -(-W // tile)
    pad_h, pad_w = nh * tile - H, nw * tile - W
    tile_grid = list(cfg.grid_each_scale)
    orig = [s // int(target_patch_size) for s in scales]
    for i, (g, o) in enumerate(zip(tile_grid, orig)):
        if o < 1 or o > g * min(nh, nw):
            raise InputError(
                f"target scale {scales[i]} with patch size {target_patch_size} gives a "
                f"{o}x{o} grid, which the {nh}x{nw} tiles ({g * nh}x{g * nw} cells at this "
                f"scale) cannot cover"
            )
    padded = np.zeros((B, T, C, nh * tile, nw * tile), dtype=np.float32)
    padded[..., :H, :W] = video
    # 'B T C (nh h) (nw w) -> (B nh nw) T C h w'
    tiles = padded.reshape(B, T, C, nh, tile, nw, tile).transpose(0, 3, 5, 1, 2, 4, 6)
    tiles = np.ascontiguousarray(tiles.reshape(B * nh * nw, T, C, tile, tile))
    info = {
        "tile_feature_map_size_each_scale": tile_grid,
        "original_feature_map_height_each_scale": orig,
        "original_feature_map_width_each_scale": orig,
        "num_tiles_height": nh,
        "num_tiles_width": nw,
        "pad_H": pad_h,
        "pad_W": pad_w,
    }
    return tiles, info


def stitch_tile_masks(tile_masks: list[np.ndarray], info: dict[str, Any], batch_size: int) -> list[np.ndarray]:
    """Per-scale tile masks (B*nh*nw, T, g*g) -> per-scale (B, T, h*w) on the cropped grid."""
    nh, nw = info["num_tiles_height"], info["num_tiles_width"]
    out = []
    for m, g, oh, ow in zip(
        tile_masks,
        info["tile_feature_map_size_each_scale"],
        info["original_feature_map_height_each_scale"],
        info["original_feature_map_width_each_scale"],
    ):
        T = m.shape[1]
        grid = m.reshape(batch_size, nh, nw, T, g, g).transpose(0, 3, 1, 4, 2, 5)
        grid = grid.reshape(batch_size, T, nh * g, nw * g)[:, :, :oh, :ow]
        out.append(np.ascontiguousarray(grid.reshape(batch_size, T, oh * ow)))
    return out


def recover_output_from_res_adapt(tiles: GazeOutput, info: dict[str, Any], batch_size: int) -> GazeOutput:
    """Tile-level output -> the official recovered output on the target grids."""
    masks = stitch_tile_masks(tiles.gazing_mask, info, batch_size)
    full = np.concatenate(masks, axis=-1)  # (B, T, tokens per frame)
    B, T, per_frame = full.shape
    counts = (full > 0).sum(-1)  # (B, T)
    num = counts.max(0) if B else np.zeros(T, dtype=np.int64)
    blocks = []
    for t in range(T):
        block = np.full((B, int(num[t])), -1, dtype=np.int64)
        for b in range(B):
            idx = np.flatnonzero(full[b, t] > 0)
            block[b, : idx.size] = idx + t * per_frame
        blocks.append(block)
    gazing_pos = np.concatenate(blocks, axis=1) if blocks else np.zeros((B, 0), np.int64)
    return GazeOutput(
        gazing_pos=gazing_pos,
        if_padded_gazing=gazing_pos == -1,
        num_gazing_each_frame=num.astype(np.int64),
        gazing_mask=masks,
        tiles=tiles,
        res_adapt_info=info,
    )
