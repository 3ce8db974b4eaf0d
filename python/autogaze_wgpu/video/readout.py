"""Sparse-token readout: which patches of a downstream ViT to keep, per frame and scale.

The official integration (NVlabs/AutoGaze, its SigLIP adapter) embeds every frame at each
target scale ``s`` (the frame resized to s x s), cuts it into ``target_patch_size`` patches
(``F.unfold``: ``s // p`` patches per side, a remainder is dropped), concatenates the scales
coarse to fine into one sequence per frame and the frames one after another, and gathers
the positions in ``gazing_pos`` (``sequence[b, gazing_pos]``). With ``target_scales`` equal
to the model's scales (32, 64, 112, 224) and patch 16 those positions are the model's own
token ids; the official ``target_scales``/``target_patch_size`` option maps the gazes to
other grids.

:func:`sparse_readout` does that mapping from a :class:`VideoResult`, for any frame size,
mode and target grid: target patch (r, c) of scale i covers a rectangle of the source frame
(the frame is squashed to the target size, as the ViT sees it); it is kept when at least
``min_coverage`` of that rectangle lies in cells the model gazed at scale i. Where the target
grid coincides with the gazed grid (resize mode with the model's scales; ``tiled`` on a
448x448 frame with target_scales [64, 128, 224, 448]; ``tiled_full`` on 392x392 with
[56, 112, 196, 392]), coverage is 0 or 1 and the readout equals the official recovered
output exactly. As in the official recovery, positions come out sorted within each frame
(the gaze order is not kept).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import InputError
from .result import VideoResult

Size = int | tuple[int, int]


@dataclass
class SparseReadout:
    """Patches to keep for a ViT with the given target grids.

    Attributes:
        target_sizes: per scale, the (height, width) the ViT resizes the frame to.
        target_patch_size: the ViT's patch size.
        grid_shapes: per scale, (rows, cols) = (height // patch, width // patch).
        keep: per scale, bool (T, rows, cols).
    """

    target_sizes: list[tuple[int, int]]
    target_patch_size: int
    grid_shapes: list[tuple[int, int]]
    keep: list[np.ndarray]

    @property
    def num_frames(self) -> int:
        return int(self.keep[0].shape[0]) if self.keep else 0

    @property
    def tokens_each_scale(self) -> list[int]:
        return [r * c for r, c in self.grid_shapes]

    @property
    def tokens_per_frame(self) -> int:
        """Length of one frame's concatenated patch sequence (1060 for [64,128,224,448]/16)."""
        return sum(self.tokens_each_scale)

    @property
    def num_kept(self) -> np.ndarray:
        """(T,) patches kept per frame (all scales)."""
        return sum(k.reshape(k.shape[0], -1).sum(-1) for k in self.keep).astype(np.int64)

    @property
    def token_ratio(self) -> np.ndarray:
        return self.num_kept / float(self.tokens_per_frame)

    def indices(self, t: int, scale: int) -> np.ndarray:
        """Flat row-major patch indices kept at ``scale`` in frame t (within that scale)."""
        return np.flatnonzero(self.keep[scale][t])

    def coords(self, t: int, scale: int) -> np.ndarray:
        """(n, 2) (row, col) of the kept patches."""
        r, c = np.nonzero(self.keep[scale][t])
        return np.stack([r, c], -1).astype(np.int64)

    def boxes(self, t: int, scale: int) -> np.ndarray:
        """(n, 4) x0, y0, x1, y1 of the kept patches in the ViT's resized image of that scale."""
        p = self.target_patch_size
        rc = self.coords(t, scale)
        return np.stack([rc[:, 1] * p, rc[:, 0] * p, (rc[:, 1] + 1) * p, (rc[:, 0] + 1) * p], -1)

    def frame_positions(self, t: int) -> np.ndarray:
        """Sorted positions in frame t's concatenated sequence (scales coarse to fine)."""
        off = np.concatenate([[0], np.cumsum(self.tokens_each_scale)])
        return np.concatenate([self.indices(t, s) + off[s] for s in range(len(self.keep))]).astype(
            np.int64
        )

    def to_gazing_info(self) -> dict[str, np.ndarray]:
        """The official ``gazing_info`` for one video (B = 1): ``gazing_pos`` (1, N) =
        position + t * tokens_per_frame, ``if_padded_gazing`` (1, N) all False and
        ``num_gazing_each_frame`` (T,). Gather with ``sequence[0, gazing_pos[0]]``."""
        per = [self.frame_positions(t) + t * self.tokens_per_frame for t in range(self.num_frames)]
        pos = np.concatenate(per)[None] if per else np.zeros((1, 0), np.int64)
        return {
            "gazing_pos": pos.astype(np.int64),
            "if_padded_gazing": np.zeros(pos.shape, dtype=bool),
            "num_gazing_each_frame": np.asarray([len(p) for p in per], dtype=np.int64),
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "target_sizes": [list(s) for s in self.target_sizes],
            "target_patch_size": self.target_patch_size,
            "grid_shapes": [list(s) for s in self.grid_shapes],
            "tokens_per_frame": self.tokens_per_frame,
            "frames": [
                {"positions": self.frame_positions(t).tolist(), "num_kept": int(self.num_kept[t])}
                for t in range(self.num_frames)
            ],
        }


def sparse_readout(
    result: VideoResult,
    target_scales: Sequence[Size],
    target_patch_size: int,
    min_coverage: float = 0.5,
) -> SparseReadout:
    """Maps a result's gazes onto a ViT's multi-scale patch grids (see the module docstring).

    target_scales: one size per model scale, coarse to fine: ``s`` (an s x s resize, as the
        official ``target_scales``) or ``(height, width)``.
    target_patch_size: the ViT's patch size (16 for SigLIP-B/16).
    min_coverage: fraction of a patch's source rectangle that must be gazed (0 < x <= 1).
    """
    n_scales = result.num_scales
    if len(target_scales) != n_scales:
        raise InputError(
            f"target_scales needs one size per model scale ({n_scales}), got {list(target_scales)}"
        )
    p = int(target_patch_size)
    if p < 1:
        raise InputError(f"target_patch_size must be positive, got {target_patch_size}")
    if not (0.0 < float(min_coverage) <= 1.0):
        raise InputError(f"min_coverage must be in (0, 1], got {min_coverage}")
    sizes: list[tuple[int, int]] = []
    for s in target_scales:
        if isinstance(s, (int, np.integer)):
            hw = (int(s), int(s))
        else:
            try:
                hw = tuple(int(v) for v in s)
            except (TypeError, ValueError):
                raise InputError(
                    f"a target scale must be an int or (height, width), got {s!r}"
                ) from None
            if len(hw) != 2:
                raise InputError(f"a target scale must be an int or (height, width), got {s!r}")
        if hw[0] < p or hw[1] < p:
            raise InputError(f"target scale {hw} is smaller than the patch size {p}: no patch fits")
        sizes.append(hw)  # type: ignore[arg-type]
    H, W = result.height, result.width
    shapes = [(h // p, w // p) for h, w in sizes]
    keep = []
    for s, ((h, w), (nr, nc)) in enumerate(zip(sizes, shapes)):
        # Patch k spans [k*p, (k+1)*p) of the resized image = [k*p*H/h, (k+1)*p*H/h) of the source.
        ye = (np.arange(nr + 1) * p * H) // h
        xe = (np.arange(nc + 1) * p * W) // w
        area = np.outer(np.diff(ye), np.diff(xe)).astype(np.float64)
        k = np.zeros((result.num_frames, nr, nc), dtype=bool)
        for t, fr in enumerate(result.frames):
            if not (fr.fixations["scale"] == s).any():
                continue
            ii = np.zeros((H + 1, W + 1), dtype=np.int64)
            ii[1:, 1:] = fr.pixel_mask(s).cumsum(0).cumsum(1)
            covered = (
                ii[np.ix_(ye[1:], xe[1:])]
                - ii[np.ix_(ye[:-1], xe[1:])]
                - ii[np.ix_(ye[1:], xe[:-1])]
                + ii[np.ix_(ye[:-1], xe[:-1])]
            )
            with np.errstate(invalid="ignore", divide="ignore"):
                frac = np.where(area > 0, covered / np.maximum(area, 1), 0.0)
            k[t] = frac >= float(min_coverage) - 1e-12
        keep.append(k)
    return SparseReadout(target_sizes=sizes, target_patch_size=p, grid_shapes=shapes, keep=keep)
