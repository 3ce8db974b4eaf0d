"""Backend registry: ``AutoGaze.from_pretrained(..., backend=NAME)`` picks one by name.

A backend runs model-level work on float32 pixel values that the facade has already
validated: ``embed``, ``generate`` (per-frame token ids), ``score`` and ``new_stream``. Output
assembly, defaults, resolution adaptation and validation live in the facade, once.
"""

from __future__ import annotations

from typing import Callable

from ..errors import BackendError

# name -> factory(config, weights, device) -> backend. Filled lazily so that importing the
# package does not import torch or start a GPU.
_FACTORIES: dict[str, Callable] = {}


def _reference(config, weights, device):
    from .reference import ReferenceBackend

    return ReferenceBackend(config, weights, device=device)


def _torch(config, weights, device):
    from .torch_backend import TorchBackend

    return TorchBackend(config, weights, device=device)


_FACTORIES["reference"] = _reference
_FACTORIES["torch"] = _torch


def available_backends() -> tuple[str, ...]:
    return tuple(_FACTORIES)


def create_backend(name: str, config, weights, device=None):
    if name == "auto":
        name = _auto_choice()
    try:
        factory = _FACTORIES[name]
    except KeyError:
        raise BackendError(
            f"unknown backend {name!r}; available: {', '.join(available_backends())} or 'auto'"
        ) from None
    return factory(config, weights, device)


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
