"""Memory estimates before allocation (one place for every backend).

A call's big buffers follow from its shape alone, so a call that cannot fit is refused with
the numbers before anything is allocated, instead of being OOM-killed or swapping the machine:

* ``check_input_copy``: the float32 copy ``as_pixel_values`` is about to make (a broadcast or
  strided view of a huge frame would otherwise be materialised first);
* ``check_call``: the backend's buffers for a ``generate`` / ``embed`` / ``score`` call (input
  on the device, the 224x224 model input, vision activations, KV cache, attention scores),
  against host memory, or against free CUDA memory for torch-based backends on CUDA. For
  wgpu the engine itself says, exactly, what the call's workspace and buffers take
  (``WgpuEngine.estimate_*``, from the sizes its allocation uses) and what the device can
  give (``WgpuEngine.memory_available``: on Vulkan the device-local heap and
  VK_EXT_memory_budget's budget); on a CPU adapter host memory bounds it too.

The torch/reference estimates count the largest buffers live at once (a lower bound of the
peak, not an upper one), so a refusal means the call cannot fit; a call that passes can still
run out of memory when the rest of the process or machine needs more. Available host memory
is ``MemAvailable`` from /proc/meminfo (else the free physical pages); where it cannot be read
there is no check. A wgpu adapter whose backend reports no memory size (Metal, DX12, GL
through wgpu) is checked only by the engine's binding limits and out-of-memory scopes.
"""

from __future__ import annotations

import os
import re
from functools import lru_cache
from typing import Any

import numpy as np

from .config import AutoGazeConfig
from .errors import DeviceError

F32 = 4


def fmt_bytes(n: float) -> str:
    """1536 -> "1.5 KiB"."""
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover - the loop returns


def available_host_bytes() -> int | None:
    """Memory the process can still allocate without swapping, or None when unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def available_cuda_bytes(device: Any) -> int | None:
    """Free memory of a CUDA device (torch's allocator cache counts as used), or None."""
    try:
        import torch

        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    except Exception:  # noqa: BLE001 - no CUDA, no torch: no check
        return None


@lru_cache(maxsize=1)
def _wgpu_adapter_is_cpu() -> bool:
    """Whether wgpu's adapter is a CPU one (lavapipe), whose buffers live in host memory."""
    try:
        from . import _native

        return (
            re.search(r'device_type: "?Cpu\b', _native.wgpu_adapter_info()["description"])
            is not None
        )
    except Exception:  # noqa: BLE001 - no adapter: the engine reports that itself
        return False


# ---------------------------------------------------------------------------------------------
def estimate_call_bytes(
    cfg: AutoGazeConfig,
    shape: tuple[int, ...],
    budgets: list[int] | None = None,
    kind: str = "generate",
) -> dict[str, int]:
    """Bytes of the big buffers of one call on float32 pixel values of ``shape`` (B, T, 3, H, W).

    budgets: gaze tokens per frame (``generate``/``score``); kind: "generate", "embed" or
    "score". Returns ``{part: bytes}``; the parts that exist only on the compute device are
    everything but "input" (the caller's float32 frames, also uploaded to a GPU).
    """
    B, T, C, H, W = (int(v) for v in shape)
    S = cfg.input_img_size
    P = cfg.connector.num_tokens
    D = cfg.decoder.hidden_size
    K = cfg.decoder.num_multi_token_pred
    heads = cfg.decoder.num_attention_heads
    layers = cfg.decoder.num_hidden_layers
    parts = {
        "input": B * T * C * H * W * F32,
        # the bicubic resize to S x S: its output and one temporary of the same size
        "model input": 0 if (H, W) == (S, S) else 2 * B * T * C * S * S * F32,
        # patchify, norm, conv, projection + pos_embed: a few (B, T, P, D) tensors
        "vision activations": 4 * B * T * P * max(D, cfg.vision.hidden_dim) * F32,
    }
    if kind == "embed" or not budgets:
        return parts
    M = max(budgets)
    length = T * (P + M + K) + 2 * K  # tokens in the sequence, as the torch backend sizes it
    parts["KV cache"] = layers * 2 * B * length * D * F32
    if kind == "score":
        # teacher forcing attends over the whole sequence at once: (B, heads, L, L) scores
        # and their softmax, one layer at a time
        parts["attention scores"] = 2 * B * heads * length * length * F32
    else:
        # the largest query block is a frame's prefill: (B, heads, P + K, L)
        parts["attention scores"] = 2 * B * heads * (P + K) * length * F32
    return parts


def _describe(parts: dict[str, int]) -> str:
    return ", ".join(f"{k} {fmt_bytes(v)}" for k, v in parts.items() if v)


def _refuse(
    what: str, need: int, parts: dict[str, int], where: str, available: int, exact: bool = False
) -> DeviceError:
    """exact: the estimate is the buffers' exact size (wgpu): the byte counts are given too."""
    n, a = (f" ({need} bytes)", f" ({available} bytes)") if exact else ("", "")
    return DeviceError(
        f"{what} needs about {fmt_bytes(need)}{n} of {where} ({_describe(parts)}), but only "
        f"{fmt_bytes(available)} is available{a}; use smaller or fewer frames (e.g. the "
        "processor's 224 px resize), a smaller batch, or shorter clips"
    )


def check_input_copy(shape: tuple[int, ...], copy: bool, device: Any = None) -> None:
    """Refuses validating pixel values of ``shape`` when its buffers cannot fit: the float32
    copy (when ``copy``: not float32, or not contiguous, e.g. a broadcast view, or a copy to
    the GPU) and, for tensors, the finiteness check's one byte per value (a numpy array's
    check allocates nothing).

    device: a torch device for tensors (CUDA memory is checked there), None for host memory.
    """
    n = int(np.prod([int(v) for v in shape], dtype=object))
    parts = {"float32 copy": n * F32 if copy else 0, "finiteness check": n if device is not None else 0}
    need = sum(parts.values())
    if device is not None and getattr(device, "type", "cpu") == "cuda":
        where, available = f"memory on {device}", available_cuda_bytes(device)
    else:
        where, available = "host memory", available_host_bytes()
    if available is not None and need > available:
        raise _refuse(
            f"validating pixel_values of shape {tuple(int(v) for v in shape)}",
            need,
            parts,
            where,
            available,
        )


def _check_wgpu_call(backend, what: str, shape, budgets, kind: str, source_size) -> None:
    """The wgpu engine's exact estimate against the device's memory (and host memory on a
    CPU adapter, whose buffers live there)."""
    est = backend.memory_estimate(shape, budgets, kind, source_size)
    avail = backend.memory_available()
    limits = []
    if avail["bytes"] is not None:
        limits.append((int(avail["bytes"]), f"GPU memory ({backend.adapter_name}: {avail['source']})"))
    if _wgpu_adapter_is_cpu():
        host = available_host_bytes()
        if host is not None:
            limits.append((host, "host memory (a CPU adapter)"))
    if not limits:
        return  # no memory size: the engine's binding and out-of-memory checks apply
    available, where = min(limits)
    need = int(est["total"])
    if need > available:
        raise _refuse(what, need, dict(est["parts"]), where, available, exact=True)


def check_call(
    backend, cfg: AutoGazeConfig, shape, budgets=None, kind: str = "generate", source_size=None
) -> None:
    """Refuses a call whose buffers cannot fit where ``backend`` allocates them.

    source_size: (H, W) of the uint8 frames when the input is ``RawFrames`` (the wgpu engine
    preprocesses them on the GPU, which takes buffers of its own)."""
    what = f"{kind} on {tuple(int(v) for v in shape)}" + (
        f" with up to {max(budgets)} gazes per frame" if budgets else ""
    )
    if hasattr(backend, "memory_estimate"):
        _check_wgpu_call(backend, what, shape, budgets, kind, source_size)
        return
    parts = estimate_call_bytes(cfg, shape, budgets, kind)
    device = getattr(backend, "device", None)
    if getattr(device, "type", None) == "cuda":
        # Everything goes to the GPU, the input included (it is copied there from the host).
        need, available = sum(parts.values()), available_cuda_bytes(device)
        if available is not None and need > available:
            raise _refuse(what, need, parts, f"memory on {device}", available)
        return
    # CPU torch: the input already exists, the rest is new host memory.
    new = {k: v for k, v in parts.items() if k != "input"}
    need, available = sum(new.values()), available_host_bytes()
    if available is not None and need > available:
        raise _refuse(what, need, new, "host memory", available)
