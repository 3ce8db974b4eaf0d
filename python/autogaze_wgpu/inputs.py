"""Validation of call arguments at the boundary, before any model work (one place for all
backends)."""

from __future__ import annotations

import math
import threading
from typing import Any, Optional, Sequence, Union

import numpy as np

from .config import AutoGazeConfig
from .errors import InputError
from .memory import check_input_copy


def as_pixel_values(pixel_values: Any, device: Any = None) -> Any:
    """Checks model input: float (B, T, 3, H, W) or (T, 3, H, W), finite, non-empty.

    Returns a (B, T, 3, H, W) float32 numpy array, or a float32 torch tensor that stays on its
    device (so CUDA input is not copied to the host). A :class:`~autogaze_wgpu.processor.RawFrames`
    (validated when made) passes through: the facade hands it to a backend that preprocesses
    itself, or turns it into pixel values.

    device: the CUDA torch device the model runs on (None otherwise). Host input (numpy or a
    CPU tensor) is then copied there first, the copy the model needs anyway, and checked for
    NaN/Inf there: on the host that check took 60-80 ms of a 45-tile clip's 433 MB on an H200
    machine, on the GPU well under a millisecond. The result is then a tensor on ``device``.
    """
    from .processor import RawFrames

    if isinstance(pixel_values, RawFrames):
        return pixel_values
    is_torch = hasattr(pixel_values, "detach") and hasattr(pixel_values, "dtype") and not isinstance(
        pixel_values, np.ndarray
    )
    if is_torch:
        x = pixel_values.detach()
        if not x.dtype.is_floating_point:
            raise InputError(
                f"pixel_values must be a float tensor, got {x.dtype}; use AutoGazeProcessor "
                "to turn uint8 frames into pixel_values"
            )
    else:
        if not isinstance(pixel_values, np.ndarray):
            try:
                pixel_values = np.asarray(pixel_values)
            except Exception as e:  # ragged lists etc.
                raise InputError(f"pixel_values could not be read as an array: {e}") from None
        x = pixel_values
        if x.dtype.kind != "f":
            raise InputError(
                f"pixel_values must be floating point, got dtype {x.dtype}; use "
                "AutoGazeProcessor to turn uint8 frames into pixel_values"
            )
    if x.ndim == 4:
        x = x[None]
    if x.ndim != 5:
        raise InputError(
            f"pixel_values must have shape (B, T, 3, H, W) or (T, 3, H, W), got {tuple(x.shape)}"
        )
    B, T, C, H, W = x.shape
    if C != 3:
        raise InputError(f"pixel_values must have 3 channels in dim 2, got shape {tuple(x.shape)}")
    if min(B, T, H, W) == 0:
        raise InputError(f"pixel_values must not be empty, got shape {tuple(x.shape)}")
    # Refuse before copying: a broadcast view of a huge frame costs nothing until copied.
    upload = device is not None and getattr(device, "type", None) == "cuda" and (
        not is_torch or x.device.type == "cpu"
    )
    if is_torch:
        import torch

        check_input_copy(tuple(x.shape), x.dtype != torch.float32 or not x.is_contiguous(), x.device)
        y = x.to(torch.float32).contiguous()
        if upload:
            y = _upload(y, device)
        if not bool(torch.isfinite(y).all()):
            raise InputError(_non_finite_message(bool(torch.isfinite(x).all())))
        return y
    check_input_copy(x.shape, x.dtype != np.float32 or not x.flags.c_contiguous)
    with np.errstate(over="ignore"):  # float64 beyond float32's range becomes inf: reported
        y = np.ascontiguousarray(x, dtype=np.float32)
    if any(s < 0 for s in y.strides):
        # numpy calls a size-1 axis contiguous whatever its stride, so a reversed one (x[..., ::-1]
        # with W = 1) comes back as is; torch.from_numpy refuses negative strides.
        y = y.copy()
    if upload:
        import torch

        g = _upload(torch.from_numpy(y), device)
        if not bool(torch.isfinite(g).all()):
            raise InputError(_non_finite_message(_all_finite(x)))
        return g
    if not _all_finite(y):
        raise InputError(_non_finite_message(_all_finite(x)))
    return y


# Host input of more than one chunk goes to the GPU through two pinned staging buffers of
# _UPLOAD_CHUNK bytes: torch's (multi-threaded) copy into one while the other's DMA runs.
# A plain copy from pageable memory ran at ~8.5 GB/s on an H200 machine (51 ms for 45 tiles).
_UPLOAD_CHUNK = 32 << 20
_staging: dict = {}  # device -> ([2 pinned buffers], [2 events]); one upload at a time
_staging_lock = threading.Lock()


def _upload(y, device):
    """The float32 host tensor y on the CUDA ``device``, refused first if it cannot fit."""
    from .errors import DeviceError

    check_input_copy(tuple(y.shape), True, device)
    try:
        if y.numel() * 4 <= _UPLOAD_CHUNK:
            return y.to(device)
        return _staged_upload(y, device)
    except RuntimeError as e:  # torch.cuda.OutOfMemoryError is one
        raise DeviceError(f"could not copy pixel_values of shape {tuple(y.shape)} to {device}: {e}") from None


def _staged_upload(y, device):
    import torch

    n = _UPLOAD_CHUNK // 4
    out = torch.empty(y.shape, dtype=torch.float32, device=device)
    src, dst = y.view(-1), out.view(-1)
    with _staging_lock:
        key = (str(device), n)
        if key not in _staging:
            _staging.clear()  # the buffers of another device or chunk size
            _staging[key] = ([torch.empty(n, dtype=torch.float32).pin_memory() for _ in range(2)],
                             [torch.cuda.Event() for _ in range(2)])
        bufs, done = _staging[key]
        with torch.cuda.device(out.device):
            for i, at in enumerate(range(0, src.numel(), n)):
                m = min(n, src.numel() - at)
                buf, ev = bufs[i % 2], done[i % 2]
                ev.synchronize()  # this buffer's previous DMA is over (a fresh event is done)
                buf[:m].copy_(src[at : at + m])
                dst[at : at + m].copy_(buf[:m], non_blocking=True)
                ev.record()
    return out


def _all_finite(x: np.ndarray) -> bool:
    """No NaN or Inf in x: its min and max are finite (both propagate NaN, and an Inf is one
    of them). Two reductions without the temporary bool array of ``isfinite(x).all()``, a
    third of its time on a 45-tile clip's 433 MB."""
    return bool(np.isfinite(x.min()) and np.isfinite(x.max()))


def _non_finite_message(finite_before_cast: bool) -> str:
    if finite_before_cast:
        return "pixel_values hold values beyond float32's range (|x| > 3.4e38), which would be Inf"
    return "pixel_values contain NaN or Inf"


def gazing_budget(gazing_ratio: float, num_vision_tokens: int) -> int:
    """M = max(1, floor(float32(ratio) * V)): 0.75 -> 198, 0.1 -> 26, 1.0 -> 265."""
    return max(1, int(np.float32(gazing_ratio) * np.float32(num_vision_tokens)))


def resolve_gazing_params(
    cfg: AutoGazeConfig,
    gazing_ratio: Union[None, float, Sequence[float]],
    task_loss_requirement: Optional[float],
    num_frames: int,
) -> tuple[list[float], Optional[float]]:
    """Applies SPEC §5's defaults and checks the values.

    Both None: the config's fixed inference values. Only a requirement: ratio 1. Only a ratio:
    no task-loss stopping. Returns per-frame ratios and the requirement (or None).
    """
    if gazing_ratio is None and task_loss_requirement is None:
        if cfg.default_gazing_ratio is None:
            raise InputError(
                "the config's gazing_ratio strategy is not 'fixed', so there is no default: "
                "pass gazing_ratio (and task_loss_requirement) explicitly"
            )
        gazing_ratio = cfg.default_gazing_ratio
        task_loss_requirement = cfg.default_task_loss_requirement
    elif gazing_ratio is None:
        gazing_ratio = 1.0
    if isinstance(gazing_ratio, (int, float, np.floating, np.integer)) and not isinstance(gazing_ratio, bool):
        ratios = [float(gazing_ratio)] * num_frames
    else:
        # A str is iterable ("1" would read as [1.0]) and float(True) is 1.0: refuse both
        # rather than guess.
        if isinstance(gazing_ratio, (str, bytes, bool, np.bool_)):
            raise InputError(
                f"gazing_ratio must be a number or a list of numbers (one per frame), got {gazing_ratio!r}"
            )
        try:
            items = list(gazing_ratio)  # once: it may be a one-shot iterator
            ratios = [float(r) for r in items]
        except (TypeError, ValueError):
            raise InputError(
                f"gazing_ratio must be a number or a list of numbers (one per frame), got {gazing_ratio!r}"
            ) from None
        if any(isinstance(r, (str, bytes, bool, np.bool_)) for r in items):
            raise InputError(f"gazing_ratio must hold numbers, not bools or strings: {gazing_ratio!r}")
        if len(ratios) != num_frames:
            raise InputError(
                f"gazing_ratio has {len(ratios)} values but the video has {num_frames} frames"
            )
    for r in ratios:
        if not (math.isfinite(r) and 0.0 < r <= 1.0):
            raise InputError(f"gazing_ratio must be in (0, 1], got {r}")
    if task_loss_requirement is not None:
        if isinstance(task_loss_requirement, (str, bytes, bool, np.bool_)):
            raise InputError(
                f"task_loss_requirement must be a number or None, got {task_loss_requirement!r}"
            )
        try:
            req = float(task_loss_requirement)
        except (TypeError, ValueError):
            raise InputError(
                f"task_loss_requirement must be a number or None, got {task_loss_requirement!r}"
            ) from None
        if not (math.isfinite(req) and req >= 0.0):
            raise InputError(f"task_loss_requirement must be a finite number >= 0, got {req}")
        task_loss_requirement = req
    return ratios, task_loss_requirement


def positive_int(name: str, value: Any, expected: str = "a positive integer") -> int:
    """``value`` as an int if it is a positive integer (bools refused), else InputError."""
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
        raise InputError(f"{name} must be {expected}, got {value!r}")
    return int(value)


def check_num_frames(
    cfg: AutoGazeConfig, num_frames: int, tokens_per_frame: int, advice: Optional[str] = None
) -> None:
    """Refuses clips (or stream histories) whose positions would pass the decoder's position
    range; ``advice`` ends the message (default: split the video into clips)."""
    worst = num_frames * (cfg.connector.num_tokens + tokens_per_frame)
    if worst >= cfg.decoder.max_position_embeddings:
        advice = advice or f"split the video into clips of {cfg.max_num_frames} frames"
        raise InputError(
            f"{num_frames} frames can reach position {worst}, past the decoder's "
            f"max_position_embeddings ({cfg.decoder.max_position_embeddings}); {advice}"
        )
