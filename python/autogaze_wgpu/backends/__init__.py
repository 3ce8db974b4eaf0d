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


_FACTORIES["reference"] = _reference

BACKENDS = ("reference",)


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
    for name in ("wgpu", "torch", "reference"):
        if name in _FACTORIES:
            return name
    raise BackendError("no backend is available")
