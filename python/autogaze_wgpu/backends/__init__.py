"""Backend registry: ``AutoGaze.from_pretrained(..., backend=NAME)`` picks one by name.

A backend runs model-level work on float32 pixel values that the facade has already
validated: ``embed``, ``generate`` (per-frame token ids), ``score`` and ``new_stream``. Output
assembly, defaults, resolution adaptation and validation live in the facade, once.
"""

from __future__ import annotations

from typing import Callable

from ..errors import BackendError

# name -> factory(config, model_dir, device) -> backend. Filled lazily so that importing the
# package does not import torch or start a GPU.
_FACTORIES: dict[str, Callable] = {}


def _reference(config, model_dir, device):
    from .. import _native
    from .reference import ReferenceBackend

    return ReferenceBackend(config, _native.load_weights(model_dir), device=device)


def _torch(config, model_dir, device):
    from .. import _native
    from .torch_backend import TorchBackend

    return TorchBackend(config, _native.load_weights(model_dir), device=device)


def _wgpu(config, model_dir, device):
    from .wgpu import WgpuBackend

    return WgpuBackend(config, model_dir)


_FACTORIES["reference"] = _reference
_FACTORIES["torch"] = _torch
_FACTORIES["wgpu"] = _wgpu


def available_backends() -> tuple[str, ...]:
    return tuple(_FACTORIES)


def create_backend(name: str, config, model_dir: str, device=None):
    """Builds backend ``name`` for the (validated) model in ``model_dir``."""
    if name == "auto":
        name = _auto_choice()
    try:
        factory = _FACTORIES[name]
    except KeyError:
        raise BackendError(
            f"unknown backend {name!r}; available: {', '.join(available_backends())} or 'auto'"
        ) from None
    return factory(config, model_dir, device)


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
