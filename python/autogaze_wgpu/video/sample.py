"""The demo clip, made at run time from a real photograph shipped in the package.

``sample_clip()`` keeps the photograph (``data/coffee.jpg``, CC0) still and slides a smaller
copy of its cup across the table with soft edges: a mostly static scene with one moving
object, so the gazes, the masks and the interframe output have something to show. Sensor
noise (``noise``, grey levels) is off by default, which keeps the demo GIF small.
Deterministic for a given seed.
"""

from __future__ import annotations

from importlib import resources

import numpy as np

from ..inputs import positive_int


def sample_photo() -> np.ndarray:
    """The bundled photograph as uint8 (400, 600, 3) RGB."""
    from PIL import Image

    with resources.files("autogaze_wgpu").joinpath("data/coffee.jpg").open("rb") as f:
        return np.asarray(Image.open(f).convert("RGB"))


def sample_clip(num_frames: int = 24, seed: int = 0, noise: float = 0.0) -> np.ndarray:
    """uint8 (T, 400, 600, 3): the photograph with a small cup sliding across it."""
    from PIL import Image

    num_frames = positive_int("num_frames", num_frames)
    photo = sample_photo()
    H, W = photo.shape[:2]
    # The sprite: the cup and saucer, cut out with a feathered ellipse and scaled down.
    cy, cx, ry, rx = 205, 280, 185, 205
    crop = photo[cy - ry : cy + ry, cx - rx : cx + rx]
    yy, xx = np.mgrid[-ry:ry, -rx:rx].astype(np.float64)
    d = np.sqrt((yy / ry) ** 2 + (xx / rx) ** 2)
    alpha = np.clip((1.0 - d) / 0.08, 0.0, 1.0)
    sh, sw = int(2 * ry * 0.32), int(2 * rx * 0.32)
    sprite = np.asarray(Image.fromarray(crop).resize((sw, sh), Image.Resampling.LANCZOS)).astype(
        np.float64
    )
    a = np.asarray(
        Image.fromarray((alpha * 255).astype(np.uint8)).resize((sw, sh), Image.Resampling.LANCZOS)
    )
    a = (a.astype(np.float64) / 255.0)[..., None]
    rng = np.random.default_rng(seed)
    out = np.empty((num_frames, H, W, 3), dtype=np.uint8)
    base = photo.astype(np.float64)
    for t in range(num_frames):
        u = t / max(1, num_frames - 1)
        x = round(10 + u * (W - sw - 20))
        y = round(H - sh - 20 - 60 * np.sin(np.pi * u))
        img = base.copy()
        region = img[y : y + sh, x : x + sw]
        img[y : y + sh, x : x + sw] = (1 - a) * region + a * sprite
        if noise > 0:
            img += rng.normal(0.0, noise, size=img.shape)
        out[t] = np.clip(np.floor(img + 0.5), 0, 255).astype(np.uint8)
    return out
