"""``AutoGazeProcessor``: uint8 RGB frames -> the model's float32 ``pixel_values`` (SPEC §2).

Bit-exact with the official ``AutoGazeImageProcessor``: PIL bilinear resize of the uint8
frame (antialiased when shrinking), then rescale with offset and ImageNet normalisation with
the same float64/float32 steps.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Any, Optional

import numpy as np

from .errors import ConfigError, InputError

_PIL_FILTERS = {2: "BILINEAR"}


@dataclass(frozen=True)
class PreprocessorConfig:
    do_resize: bool
    size: dict[str, int]
    resample: int
    do_rescale: bool
    rescale_factor: float
    offset: bool
    do_normalize: bool
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PreprocessorConfig":
        return cls(
            do_resize=bool(d["do_resize"]),
            size={k: int(v) for k, v in d["size"].items() if v is not None},
            resample=int(d["resample"]),
            do_rescale=bool(d["do_rescale"]),
            rescale_factor=float(d["rescale_factor"]),
            offset=bool(d.get("offset", False)),
            do_normalize=bool(d["do_normalize"]),
            image_mean=tuple(float(x) for x in d["image_mean"]),
            image_std=tuple(float(x) for x in d["image_std"]),
        )


def get_resize_output_image_size(height: int, width: int, size: dict[str, int]) -> tuple[int, int]:
    """(H, W) after resizing, as Hugging Face computes it (shortest edge or explicit size)."""
    if "height" in size and "width" in size:
        return size["height"], size["width"]
    short_side = size["shortest_edge"]
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = short_side, int(short_side * long / short)
    return (new_long, new_short) if width <= height else (new_short, new_long)


class AutoGazeProcessor:
    """Turns RGB frames into ``pixel_values`` for :class:`autogaze_wgpu.AutoGaze`.

    >>> proc = AutoGazeProcessor.from_pretrained("path/to/model")
    >>> pixel_values = proc(frames)   # uint8 (T, H, W, 3) or (B, T, H, W, 3)
    """

    def __init__(self, config: PreprocessorConfig):
        if config.do_resize and config.resample not in _PIL_FILTERS:
            raise ConfigError(
                f"preprocessor resample={config.resample} is not supported (only 2 = bilinear)"
            )
        self.config = config

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **overrides: Any) -> "AutoGazeProcessor":
        """Reads ``preprocessor_config.json`` from a model dir (or a repo id, see
        :func:`autogaze_wgpu.hub.resolve_model_dir`). Keyword overrides replace config fields,
        e.g. ``size={"height": 448, "width": 448}``."""
        from . import _native
        from .hub import resolve_model_dir

        d = _native.load_preprocessor_config(str(resolve_model_dir(path)))
        cfg = PreprocessorConfig.from_dict(d)
        if overrides:
            unknown = set(overrides) - set(PreprocessorConfig.__dataclass_fields__)
            if unknown:
                raise ConfigError(f"unknown preprocessor override(s): {sorted(unknown)}")
            cfg = replace(cfg, **overrides)
        return cls(cfg)

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        if not self.config.do_resize:
            return height, width
        return get_resize_output_image_size(height, width, self.config.size)

    def raw(self, frames: Any) -> "RawFrames":
        """The frames unprocessed, for a model call that takes ``pixel_values``: the wgpu
        backend resizes and normalises them on the GPU (bit-exact with this processor; the
        upload is the uint8 bytes), other backends run this processor on the host.
        frames: as for ``__call__``."""
        return RawFrames(as_uint8_video(frames), self)

    def __call__(self, frames: Any, return_tensors: Optional[str] = "np"):
        """uint8 RGB(A) frames (T, H, W, C) or (B, T, H, W, C) -> float32 (B, T, 3, H', W')."""
        video = as_uint8_video(frames)
        B, T, H, W, _ = video.shape
        out_h, out_w = self.output_size(H, W)
        if (out_h, out_w) != (H, W):
            video = self._resize(video, out_h, out_w)
        x = self.normalize(video)
        if return_tensors == "pt":
            import torch

            return torch.from_numpy(x)
        if return_tensors not in (None, "np"):
            raise InputError(f"return_tensors must be 'np' or 'pt', got {return_tensors!r}")
        return x

    def _resize(self, video: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
        from PIL import Image

        B, T = video.shape[:2]
        out = np.empty((B, T, out_h, out_w, 3), dtype=np.uint8)
        resample = getattr(Image.Resampling, _PIL_FILTERS[self.config.resample])
        for b in range(B):
            for t in range(T):
                img = Image.fromarray(video[b, t], mode="RGB")
                out[b, t] = np.asarray(img.resize((out_w, out_h), resample))
        return out

    def normalization_table(self) -> np.ndarray:
        """float32 (3, 256): the value of each uint8 level per channel, from :meth:`normalize`
        itself (so a table lookup is bit-exact with it); computed once per config."""
        cached = getattr(self, "_table", None)
        if cached is None or cached[0] is not self.config:
            levels = np.repeat(np.arange(256, dtype=np.uint8)[:, None], 3, axis=1)
            table = np.ascontiguousarray(self.normalize(levels[None, None, None])[0, 0, :, 0, :])
            table.flags.writeable = False
            cached = self._table = (self.config, table)
        return cached[1]

    def normalize(self, video: np.ndarray) -> np.ndarray:
        """uint8 (B, T, H, W, 3) -> float32 (B, T, 3, H, W) with the official float steps."""
        c = self.config
        x = video.astype(np.float32)
        if c.do_rescale:
            x = (video.astype(np.float64) * c.rescale_factor).astype(np.float32)
            if c.offset:
                x = x - np.float32(1)
        if c.do_normalize:
            x = (x - np.float32(c.image_mean)) / np.float32(c.image_std)
        return np.ascontiguousarray(np.moveaxis(x, -1, -3))


class RawFrames:
    """uint8 frames (B, T, H, W, 3) and the processor that turns them into pixel values.

    Made by :meth:`AutoGazeProcessor.raw`; ``AutoGaze.generate``/``embed``/``score`` and
    ``StreamSession.step`` accept it wherever they take ``pixel_values``. ``shape`` is the
    pixel values' shape (B, T, 3, H', W').
    """

    def __init__(self, frames: np.ndarray, processor: AutoGazeProcessor):
        self.frames = frames
        self.processor = processor
        self._pixel_values: Optional[np.ndarray] = None

    @property
    def shape(self) -> tuple[int, int, int, int, int]:
        B, T, H, W, _ = self.frames.shape
        return (B, T, 3, *self.processor.output_size(H, W))

    def pixel_values(self) -> np.ndarray:
        """The processor's float32 (B, T, 3, H', W') on the host (computed once)."""
        if self._pixel_values is None:
            self._pixel_values = self.processor(self.frames)
        return self._pixel_values


def as_uint8_video(frames: Any, batched: bool = True) -> np.ndarray:
    """Validates uint8 RGB(A) frames; returns C-contiguous uint8 with 3 channels.

    batched=True: (T, H, W, C) or (B, T, H, W, C) -> (B, T, H, W, 3) (the processor).
    batched=False: (H, W, C) or (T, H, W, C) -> (T, H, W, 3) (one video, the video tools).
    Accepts numpy, torch (any device) or a list of equally-sized frames; alpha is dropped.
    """
    if hasattr(frames, "detach") and hasattr(frames, "cpu"):  # torch tensor
        frames = frames.detach().cpu().numpy()
    elif isinstance(frames, (list, tuple)):
        if not frames:
            raise InputError("frames must not be empty")
        parts = [np.asarray(f.detach().cpu().numpy() if hasattr(f, "detach") else f) for f in frames]
        shapes = {p.shape for p in parts}
        if len(shapes) != 1:
            raise InputError(f"frames in a list must all have the same shape, got {sorted(shapes)}")
        frames = np.stack(parts)
    if not isinstance(frames, np.ndarray):
        raise InputError(
            f"frames must be a numpy array, a torch tensor or a list of frames, got {type(frames).__name__}"
        )
    if frames.dtype != np.uint8:
        raise InputError(
            f"frames must be uint8 RGB(A) (0-255), got dtype {frames.dtype}; already-normalised "
            "float input goes to AutoGaze.generate as pixel_values"
        )
    want = 5 if batched else 4
    if frames.ndim == want - 1:
        frames = frames[None]
    if frames.ndim != want:
        forms = "(T, H, W, C) or (B, T, H, W, C)" if batched else "(T, H, W, C) or (H, W, C)"
        hint = "" if batched else "; a batch of videos is a list of calls, one per video"
        raise InputError(f"frames must have shape {forms}, got {tuple(frames.shape)}{hint}")
    if frames.shape[-1] not in (3, 4):
        raise InputError(
            f"frames must have 3 (RGB) or 4 (RGBA) channels last, got shape {tuple(frames.shape)}"
        )
    if min(frames.shape[:-1]) == 0:
        raise InputError(f"frames must not be empty, got shape {tuple(frames.shape)}")
    return np.ascontiguousarray(frames[..., :3])
