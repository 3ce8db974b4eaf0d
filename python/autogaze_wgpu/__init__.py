"""autogaze-wgpu: NVIDIA AutoGaze on any GPU (wgpu), with torch backends.

>>> from autogaze_wgpu import AutoGaze, AutoGazeProcessor
>>> model = AutoGaze.from_pretrained("path/to/model", backend="reference")
>>> proc = AutoGazeProcessor.from_pretrained("path/to/model")
>>> out = model.generate(proc(frames), gazing_ratio=0.75, task_loss_requirement=0.7)
"""

from ._native import __version__
from .backends import available_backends
from .config import AutoGazeConfig
from .errors import (
    AutoGazeError,
    BackendError,
    ConfigError,
    DeviceError,
    InputError,
    ModelClosedError,
    WeightsError,
)
from .model import AutoGaze, StreamSession
from .outputs import GazeOutput, ScoreOutput
from .processor import AutoGazeProcessor

__all__ = [
    "__version__",
    "AutoGaze",
    "AutoGazeConfig",
    "AutoGazeProcessor",
    "GazeOutput",
    "ScoreOutput",
    "StreamSession",
    "available_backends",
    "AutoGazeError",
    "BackendError",
    "ConfigError",
    "DeviceError",
    "InputError",
    "ModelClosedError",
    "WeightsError",
]
