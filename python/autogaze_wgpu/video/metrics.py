"""Frame metrics: PSNR, and running means / exponential moving averages.

``psnr`` is over all RGB values of the frame, peak 255, and ``+inf`` for identical frames.
Averages over frames are taken on the mean squared error and converted to dB afterwards
(``psnr_of_mse(mean MSE)``): an identical frame then counts as an error of 0 instead of making
the average infinite. ``InterframeMetrics`` keeps, per frame, the interframe output's pixel
update ratio and its PSNR against the current input; the update ratio counts *pixels* and is
not the model's token ratio (``VideoResult.token_ratio``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import InputError


def mse(a: np.ndarray, b: np.ndarray) -> float:
    """Mean squared error over every value (float64)."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        raise InputError(f"images differ in shape: {a.shape} vs {b.shape}")
    d = a.astype(np.float64) - b.astype(np.float64)
    return float(np.mean(d * d))


def psnr_of_mse(m: float, peak: float = 255.0) -> float:
    """10 log10(peak^2 / mse); +inf for mse == 0."""
    if m < 0 or math.isnan(m):
        raise InputError(f"mse must be >= 0, got {m}")
    return math.inf if m == 0 else 10.0 * math.log10(peak * peak / m)


def psnr(a: np.ndarray, b: np.ndarray, peak: float = 255.0) -> float:
    """PSNR in dB between two images (RGB, peak 255 by default); +inf when identical."""
    return psnr_of_mse(mse(a, b), peak)


@dataclass
class RunningStat:
    """Arithmetic running mean and exponential moving average (``ema = a*x + (1-a)*ema``,
    starting at the first value) of a stream of numbers."""

    alpha: float = 0.1
    count: int = 0
    total: float = 0.0
    ema: float | None = None

    def __post_init__(self):
        if not 0.0 < self.alpha <= 1.0:
            raise InputError(f"EMA alpha must be in (0, 1], got {self.alpha}")

    def update(self, x: float) -> None:
        x = float(x)
        self.count += 1
        self.total += x
        self.ema = x if self.ema is None else self.alpha * x + (1.0 - self.alpha) * self.ema

    @property
    def mean(self) -> float | None:
        return self.total / self.count if self.count else None


@dataclass
class InterframeMetrics:
    """Per-frame and running metrics of an interframe output (see module docstring)."""

    ema_alpha: float = 0.1
    update_ratio: list[float] = field(default_factory=list)
    psnr_db: list[float] = field(default_factory=list)
    mse: list[float] = field(default_factory=list)
    keyframe: list[bool] = field(default_factory=list)

    def __post_init__(self):
        self._ratio = RunningStat(self.ema_alpha)
        self._mse = RunningStat(self.ema_alpha)

    def add(
        self, current: np.ndarray, output: np.ndarray, update_ratio: float, keyframe: bool
    ) -> dict[str, Any]:
        """Records one frame; returns its metrics with the running values."""
        m = mse(current, output)
        self.update_ratio.append(float(update_ratio))
        self.mse.append(m)
        self.psnr_db.append(psnr_of_mse(m))
        self.keyframe.append(bool(keyframe))
        self._ratio.update(update_ratio)
        self._mse.update(m)
        return self.latest()

    def latest(self) -> dict[str, Any]:
        return {
            "update_ratio": self.update_ratio[-1],
            "psnr_db": self.psnr_db[-1],
            "keyframe": self.keyframe[-1],
            "update_ratio_mean": self._ratio.mean,
            "update_ratio_ema": self._ratio.ema,
            "psnr_db_mean": self.psnr_mean,
            "psnr_db_ema": self.psnr_ema,
        }

    @property
    def psnr_mean(self) -> float | None:
        """PSNR of the mean MSE over the frames so far."""
        return None if self._mse.mean is None else psnr_of_mse(self._mse.mean)

    @property
    def psnr_ema(self) -> float | None:
        """PSNR of the exponential moving average of the MSE."""
        return None if self._mse.ema is None else psnr_of_mse(self._mse.ema)

    @property
    def update_ratio_mean(self) -> float | None:
        return self._ratio.mean

    @property
    def update_ratio_ema(self) -> float | None:
        return self._ratio.ema

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (infinite PSNR written as the string "inf")."""
        return {
            "note": (
                "update_ratio = pixels refreshed in the interframe output / all pixels (keyframes "
                "1.0); it is a pixel ratio, not the model's token ratio. PSNR is RGB, peak 255, "
                "against the current input, 'inf' when identical; means and EMAs are taken on "
                "the MSE and converted to dB."
            ),
            "ema_alpha": self.ema_alpha,
            "num_frames": len(self.mse),
            "update_ratio_mean": self.update_ratio_mean,
            "update_ratio_ema": self.update_ratio_ema,
            "psnr_db_mean": _finite(self.psnr_mean),
            "psnr_db_ema": _finite(self.psnr_ema),
            "per_frame": {
                "update_ratio": self.update_ratio,
                "psnr_db": [_finite(p) for p in self.psnr_db],
                "mse": self.mse,
                "keyframe": self.keyframe,
            },
        }


def _finite(x: float | None):
    if x is None or math.isfinite(x):
        return x
    return "inf" if x > 0 else "-inf"
