"""Interframe output: a persistent frame in which only the gazed cells are refreshed.

Each step copies the current input's pixels inside the gazed cells (any scale; full source
resolution) into the persistent output and keeps every other pixel from before. Every
``keyframe_interval``-th frame (frames 0, N, 2N, ...) is a keyframe: the whole frame is
copied. With ``keyframe_interval=0`` there are no keyframes at all and the output starts
black, so what you see is only what was gazed.

The pixel update ratio (refreshed pixels / all pixels, 1.0 on keyframes) describes this
output; it is not the model's token ratio (gazes / tokens available), which counts tokens
of every scale regardless of how many pixels they cover.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import InputError


@dataclass
class InterframeStep:
    output: np.ndarray  # (H, W, 3) uint8, the persistent output after this frame (a copy)
    updated: np.ndarray  # (H, W) bool, pixels refreshed in this frame
    keyframe: bool
    update_ratio: float  # updated pixels / all pixels


class InterframeOutput:
    """``step(frame, mask)`` -> :class:`InterframeStep` (see the module docstring)."""

    def __init__(self, height: int, width: int, keyframe_interval: int = 0):
        if not isinstance(keyframe_interval, (int, np.integer)) or keyframe_interval < 0:
            raise InputError(
                f"keyframe_interval must be an integer >= 0, got {keyframe_interval!r}"
            )
        self.height, self.width = int(height), int(width)
        self.keyframe_interval = int(keyframe_interval)
        self.frame_index = 0
        self.output = np.zeros((self.height, self.width, 3), dtype=np.uint8)

    def step(self, frame: np.ndarray, mask: np.ndarray) -> InterframeStep:
        frame = np.asarray(frame)
        if (
            frame.dtype != np.uint8
            or frame.shape[:2] != (self.height, self.width)
            or frame.ndim != 3
        ):
            raise InputError(
                f"frame must be uint8 ({self.height}, {self.width}, 3), got {frame.dtype} {frame.shape}"
            )
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != (self.height, self.width):
            raise InputError(f"mask must be ({self.height}, {self.width}), got {mask.shape}")
        frame = frame[..., :3]
        n = self.keyframe_interval
        key = n > 0 and self.frame_index % n == 0
        updated = np.ones_like(mask) if key else mask
        self.output[updated] = frame[updated]
        self.frame_index += 1
        ratio = float(updated.sum()) / updated.size
        return InterframeStep(self.output.copy(), updated.copy(), key, ratio)
