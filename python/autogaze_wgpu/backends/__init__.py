"""Backend registry: ``AutoGaze.from_pretrained(..., backend=NAME)`` picks one by name.

A backend runs model-level work on float32 pixel values that the facade has already
validated: ``embed``, ``generate`` (per-frame token ids), ``score`` and ``new_stream``. Output
assembly, defaults, resolution adaptation and validation live in the facade, once.
"""

from __future__ import annotations

import inspect
from typing import Callable

from ..errors import BackendError, InputError

# name -> factory(config, model_dir, device, precision) -> backend. Filled lazily so that
# importing the package does not import torch or start a GPU.
_FACTORIES: dict[str, Callable] = {}

# "float32" is parity (TF32 off) and the default everywhere; the others are the torch
# backend's fast modes, whose tokens may differ from the reference's.
PRECISIONS = ("float32", "tf32", "bf16")
_FAST_MODE_BACKENDS = ("torch",)


def _reference(config, model_dir, device, precision):
    from .. import _native
    from .reference import ReferenceBackend

    return ReferenceBackend(config, _native.load_weights(model_dir), device=device)


def _torch(config, model_dir, device, precision, decode_kernels=None, steps_per_sync=None):
    from .. import _native
    from .torch_backend import TorchBackend

    return TorchBackend(
        config, _native.load_weights(model_dir), device=device, precision=precision,
        decode_kernels=decode_kernels, steps_per_sync=steps_per_sync,
    )


def _wgpu(config, model_dir, device, precision):
    from .wgpu import WgpuBackend

    return WgpuBackend(config, model_dir)


_FACTORIES["reference"] = _reference
_FACTORIES["torch"] = _torch
_FACTORIES["wgpu"] = _wgpu


def available_backends() -> tuple[str, ...]:
    return tuple(_FACTORIES)


def create_backend(name: str, config, model_dir: str, device=None, precision: str = "float32", **options):
    """Builds backend ``name`` for the (validated) model in ``model_dir``. ``options`` are
    the backend's own keyword arguments (the torch backend's ``decode_kernels``,
    ``steps_per_sync``)."""
    if not isinstance(precision, str) or precision not in PRECISIONS:
        raise InputError(f"precision must be one of {', '.join(map(repr, PRECISIONS))}, got {precision!r}")
    if name == "auto":
        name = _auto_choice()
    try:
        factory = _FACTORIES[name]
    except KeyError:
        raise BackendError(
            f"unknown backend {name!r}; available: {', '.join(available_backends())} or 'auto'"
        ) from None
    if precision != "float32" and name not in _FAST_MODE_BACKENDS:
        raise BackendError(
            f"precision={precision!r} is a fast mode of backend='torch' only; backend {name!r} "
            "runs float32 (parity)"
        )
    accepted = set(inspect.signature(factory).parameters) - {"config", "model_dir", "device", "precision"}
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise InputError(
            f"backend {name!r} takes no option {', '.join(map(repr, unknown))}"
            + (f"; its options: {', '.join(sorted(accepted))}" if accepted else "")
        )
    return factory(config, model_dir, device, precision, **options)


def _auto_choice() -> str:
    """wgpu when a GPU adapter exists, else torch on CUDA, else the reference."""
    if "wgpu" in _FACTORIES:
        from .wgpu import adapter_available

        if adapter_available():
            return "wgpu"
    try:
        import torch

        return "torch" if torch.cuda.is_available() else "reference"
    except ImportError:
        raise BackendError(
            "no backend is available: no GPU adapter for wgpu and PyTorch is not installed"
        ) from None
