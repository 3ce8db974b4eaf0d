"""Pictures of gazes: all functions take and return uint8 (H, W, 3) RGB images.

* :func:`overlay`: the frame with gazed cells tinted in their scale's colour and outlined.
* :func:`mask_image`: the gazed cells in their scale's colour on black.
* :func:`masked_image`: only the gazed pixels of the frame; the rest black (or dimmed).
* :func:`scale_rows`: one row per scale, one column per frame, each panel showing the frame
  through that scale's gazes.
* :func:`panels`: images side by side (e.g. input | mask | interframe output), with labels.

The maths is exact and documented so that tests can check pixels: a tint is
``out = (1 - alpha) * out + alpha * colour`` in float64, applied scale by scale from coarse to
fine, rounded half up once at the end; outlines are drawn after the tints, in the scale
colour, ``border`` pixels wide, inside each cell rectangle.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..errors import InputError
from .result import FIXATION_DTYPE, FrameGaze

# Coarse to fine: 2x2 blue, 4x4 green, 7x7 amber, 14x14 red (more scales cycle).
SCALE_COLORS: tuple[tuple[int, int, int], ...] = (
    (66, 133, 244),
    (52, 168, 83),
    (251, 188, 5),
    (234, 67, 53),
)

Gaze = FrameGaze | np.ndarray


def _check_image(img: np.ndarray, name: str = "frame") -> np.ndarray:
    img = np.asarray(img)
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[-1] not in (3, 4):
        raise InputError(f"{name} must be uint8 (H, W, 3), got {img.dtype} {img.shape}")
    return img[..., :3]


def _fixations(gaze: Gaze) -> np.ndarray:
    fx = gaze.fixations if isinstance(gaze, FrameGaze) else np.asarray(gaze)
    if fx.dtype != FIXATION_DTYPE:
        raise InputError("expected a FrameGaze or a FIXATION_DTYPE array")
    return fx


def _color(scale: int, colors: Sequence[Sequence[int]]) -> np.ndarray:
    return np.asarray(colors[scale % len(colors)], dtype=np.float64)


def _round(x: np.ndarray) -> np.ndarray:
    return np.clip(np.floor(x + 0.5), 0, 255).astype(np.uint8)


def _scales(fx: np.ndarray) -> list[int]:
    return sorted(int(s) for s in np.unique(fx["scale"]))


def _scale_mask(fx: np.ndarray, scale: int, h: int, w: int) -> np.ndarray:
    m = np.zeros((h, w), dtype=bool)
    for f in fx[fx["scale"] == scale]:
        m[f["y0"] : f["y1"], f["x0"] : f["x1"]] = True
    return m


def overlay(
    frame: np.ndarray,
    gaze: Gaze,
    alpha: float = 0.35,
    border: int = 1,
    colors: Sequence[Sequence[int]] = SCALE_COLORS,
) -> np.ndarray:
    """The frame with every gazed cell tinted (``alpha``) and outlined (``border`` px) in
    its scale's colour; finer scales are drawn over coarser ones."""
    frame = _check_image(frame)
    if not 0.0 <= alpha <= 1.0:
        raise InputError(f"alpha must be in [0, 1], got {alpha}")
    fx = _fixations(gaze)
    h, w = frame.shape[:2]
    out = frame.astype(np.float64)
    for s in _scales(fx):
        m = _scale_mask(fx, s, h, w)
        out[m] = (1.0 - alpha) * out[m] + alpha * _color(s, colors)
    out = _round(out)
    if border > 0:
        for s in _scales(fx):
            c = np.asarray(colors[s % len(colors)], dtype=np.uint8)
            for f in fx[fx["scale"] == s]:
                y0, y1, x0, x1 = int(f["y0"]), int(f["y1"]), int(f["x0"]), int(f["x1"])
                if y1 <= y0 or x1 <= x0:
                    continue
                b = border
                out[y0 : min(y1, y0 + b), x0:x1] = c
                out[max(y0, y1 - b) : y1, x0:x1] = c
                out[y0:y1, x0 : min(x1, x0 + b)] = c
                out[y0:y1, max(x0, x1 - b) : x1] = c
    return out


def mask_image(
    gaze: Gaze,
    height: int | None = None,
    width: int | None = None,
    colors: Sequence[Sequence[int]] = SCALE_COLORS,
) -> np.ndarray:
    """Gazed cells filled with their scale's colour on black (finer scales on top). The size
    comes from the FrameGaze's layout, or ``height``/``width`` for a raw fixation array."""
    fx = _fixations(gaze)
    if isinstance(gaze, FrameGaze):
        height, width = gaze.layout.height, gaze.layout.width
    if height is None or width is None:
        raise InputError("mask_image needs height and width for a raw fixation array")
    out = np.zeros((height, width, 3), dtype=np.uint8)
    for s in _scales(fx):
        out[_scale_mask(fx, s, height, width)] = np.asarray(colors[s % len(colors)], dtype=np.uint8)
    return out


def masked_image(frame: np.ndarray, mask: np.ndarray | Gaze, dim: float = 0.0) -> np.ndarray:
    """Only the gazed pixels of the frame; the others multiplied by ``dim`` (0: black),
    rounded half up. ``mask`` is a (H, W) bool pixel mask or a FrameGaze / fixation array."""
    frame = _check_image(frame)
    if (
        not isinstance(mask, np.ndarray)
        or mask.dtype == FIXATION_DTYPE
        or isinstance(mask, FrameGaze)
    ):
        fx = _fixations(mask)  # type: ignore[arg-type]
        m = np.zeros(frame.shape[:2], dtype=bool)
        for f in fx:
            m[f["y0"] : f["y1"], f["x0"] : f["x1"]] = True
    else:
        m = mask.astype(bool)
    if m.shape != frame.shape[:2]:
        raise InputError(f"mask {m.shape} does not match the frame {frame.shape[:2]}")
    if not 0.0 <= dim <= 1.0:
        raise InputError(f"dim must be in [0, 1], got {dim}")
    if dim == 0.0:
        return np.where(m[..., None], frame, np.uint8(0))
    return np.where(m[..., None], frame, _round(frame.astype(np.float64) * dim))


def scale_rows(
    frames: Sequence[np.ndarray],
    gazes: Sequence[Gaze],
    num_scales: int = 4,
    dim: float = 0.25,
    gap: int = 2,
    gap_value: int = 255,
) -> np.ndarray:
    """A grid with one row per scale (coarse on top) and one column per frame; each panel is
    the frame seen through that scale's gazes only (other pixels dimmed by ``dim``)."""
    if len(frames) != len(gazes) or not frames:
        raise InputError(
            f"scale_rows needs as many gazes as frames (got {len(frames)} and {len(gazes)})"
        )
    rows = []
    for s in range(num_scales):
        row = []
        for fr, gz in zip(frames, gazes):
            fr = _check_image(fr)
            fx = _fixations(gz)
            m = _scale_mask(fx, s, fr.shape[0], fr.shape[1])
            row.append(masked_image(fr, m, dim))
        rows.append(_hstack(row, gap, gap_value))
    return _vstack(rows, gap, gap_value)


def panels(
    images: Sequence[np.ndarray],
    labels: Sequence[str] | None = None,
    gap: int = 4,
    gap_value: int = 255,
) -> np.ndarray:
    """Images side by side, ``gap`` pixels of ``gap_value`` between them (shorter images are
    padded at the bottom with ``gap_value``); optional labels drawn in each panel's corner."""
    if not images:
        raise InputError("panels needs at least one image")
    imgs = [_check_image(im, "panel") for im in images]
    if labels is not None:
        if len(labels) != len(imgs):
            raise InputError(f"{len(labels)} labels for {len(imgs)} panels")
        imgs = [label(im, text) for im, text in zip(imgs, labels)]
    return _hstack(imgs, gap, gap_value)


def label(image: np.ndarray, text: str, scale: int = 1) -> np.ndarray:
    """The image with ``text`` in white on a dark box in its top-left corner."""
    from PIL import Image, ImageDraw, ImageFont

    img = Image.fromarray(np.ascontiguousarray(_check_image(image)))
    draw = ImageDraw.Draw(img)
    try:
        font = ImageFont.load_default(size=11 * scale)
    except TypeError:  # Pillow < 10.1
        font = ImageFont.load_default()
    _x0, _y0, x1, y1 = draw.textbbox((3, 2), text, font=font)
    draw.rectangle((0, 0, x1 + 3, y1 + 3), fill=(0, 0, 0))
    draw.text((3, 2), text, fill=(255, 255, 255), font=font)
    return np.asarray(img)


def resize_image(image: np.ndarray, width: int) -> np.ndarray:
    """Resizes to ``width`` pixels wide (aspect kept) with Pillow's area-averaging filter."""
    from PIL import Image

    image = _check_image(image)
    h, w = image.shape[:2]
    if w == width:
        return image
    height = max(1, round(h * width / w))
    return np.asarray(
        Image.fromarray(np.ascontiguousarray(image)).resize((width, height), Image.Resampling.BOX)
    )


def _hstack(imgs: Sequence[np.ndarray], gap: int, value: int) -> np.ndarray:
    H = max(im.shape[0] for im in imgs)
    parts = []
    for i, im in enumerate(imgs):
        if im.shape[0] < H:
            im = np.concatenate([im, np.full((H - im.shape[0], im.shape[1], 3), value, np.uint8)])
        if i and gap:
            parts.append(np.full((H, gap, 3), value, np.uint8))
        parts.append(im)
    return np.concatenate(parts, axis=1)


def _vstack(imgs: Sequence[np.ndarray], gap: int, value: int) -> np.ndarray:
    W = max(im.shape[1] for im in imgs)
    parts = []
    for i, im in enumerate(imgs):
        if im.shape[1] < W:
            im = np.concatenate(
                [im, np.full((im.shape[0], W - im.shape[1], 3), value, np.uint8)], axis=1
            )
        if i and gap:
            parts.append(np.full((gap, W, 3), value, np.uint8))
        parts.append(im)
    return np.concatenate(parts, axis=0)
