"""The package's exception hierarchy.

Every failure the package reports is an :class:`AutoGazeError`. The Rust core maps its one
error enum onto these classes in one place (``rust/python/errors.rs``); Python code raises
them directly. The subclasses also derive from the matching built-in exception so that
``except ValueError`` keeps working for callers that do not know this package.
"""


class AutoGazeError(Exception):
    """Base class of every error raised by autogaze_wgpu."""


class ConfigError(AutoGazeError, ValueError):
    """A model or preprocessor config is missing, malformed, inconsistent or unsupported."""


class WeightsError(AutoGazeError, ValueError):
    """model.safetensors is missing, corrupt, or does not match the config."""


class InputError(AutoGazeError, ValueError):
    """A call argument (frames, pixel values, ratios, modes, ...) is invalid."""


class BackendError(AutoGazeError, RuntimeError):
    """A backend is unknown, unavailable, or failed while running."""


class DeviceError(BackendError):
    """No usable GPU adapter/device, the device was lost, or it ran out of memory."""


class ModelClosedError(BackendError):
    """The model was closed (``AutoGaze.close()`` or the end of its ``with`` block)."""


__all__ = [
    "AutoGazeError",
    "ConfigError",
    "WeightsError",
    "InputError",
    "BackendError",
    "DeviceError",
    "ModelClosedError",
]
