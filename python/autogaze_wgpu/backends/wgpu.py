"""``backend="wgpu"``: the whole model in WGSL compute shaders through the Rust ``wgpu`` crate.

The engine (``rust/gpu/``) keeps the generation loop on the GPU: a submit per frame and one
readback per clip, one per frame when streaming; ``score`` (the teacher-forced pass) runs
there too. Float32 throughout. This file only adapts the
facade's calls to the native ``WgpuEngine`` / ``WgpuSession``.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Optional

import numpy as np

from .. import _native
from ..errors import DeviceError, InputError
from ..outputs import split_frame_tokens
from ..processor import RawFrames


@lru_cache(maxsize=1)
def adapter_available() -> bool:
    """True when wgpu finds a GPU adapter (a CPU Vulkan driver such as lavapipe counts)."""
    try:
        _native.wgpu_adapter_info()
        return True
    except Exception:
        return False


def _ratio_for_budget(budget: int, V: int) -> float:
    """A ratio for which the engine's M = max(1, floor(f32(ratio) * V)) is exactly ``budget``
    (the facade has already turned the user's ratio into a budget; half a token of headroom
    keeps float rounding away from the floor)."""
    return (budget + 0.5) / V


def _host_f32(video) -> np.ndarray:
    if not isinstance(video, np.ndarray):
        video = video.detach().cpu().numpy()
    return np.ascontiguousarray(video, dtype=np.float32)


def _engine_input(video) -> tuple[np.ndarray, Optional[tuple]]:
    """(array, preprocess) for the native calls: float32 pixel values and None, or for
    RawFrames the uint8 frames and (H', W', normalisation table) for the GPU preprocessing."""
    if isinstance(video, RawFrames):
        h, w = video.shape[-2:]
        return video.frames, (h, w, video.processor.normalization_table().ravel().tolist())
    return _host_f32(video), None


class WgpuBackend:
    name = "wgpu"
    takes_raw_frames = True  # the processor's resize + normalisation run on the GPU

    def __init__(self, config, model_dir: str):
        self.config = config
        self.engine = _native.WgpuEngine(model_dir)

    @property
    def adapter_name(self) -> str:
        return self.engine.adapter_name

    def memory_estimate(self, shape, budgets, kind: str, source_size=None) -> dict:
        """``{"total": bytes, "parts": [(buffer, bytes), ...]}``: the GPU buffers the call
        creates (its workspace and readbacks), computed by the engine from the sizes its
        allocation uses; nothing is allocated. budgets: gazes per frame (``generate``) or
        slots per frame (``score``)."""
        shape = [int(v) for v in shape]
        src = None if source_size is None else tuple(int(v) for v in source_size)
        if kind == "embed" or not budgets:
            return self.engine.estimate_embed(shape, source_size=src)
        if kind == "score":
            return self.engine.estimate_score(shape, [int(b) for b in budgets], source_size=src)
        V = self.config.num_vision_tokens_each_frame
        ratios = [_ratio_for_budget(b, V) for b in budgets]
        return self.engine.estimate_generate(shape, ratios, source_size=src)

    def memory_available(self) -> dict:
        """What a call may allocate on the device (``WgpuEngine.memory_available``)."""
        return self.engine.memory_available()

    def embed(self, video) -> np.ndarray:
        x, pre = _engine_input(video)
        return self.engine.embed(x, preprocess=pre)

    def generate(self, video, budgets: list[int], task_loss_requirement, record_steps=False):
        if record_steps:
            raise InputError("record_steps is a reference-backend debugging aid")
        V = self.config.num_vision_tokens_each_frame
        ratios = [_ratio_for_budget(b, V) for b in budgets]
        x, pre = _engine_input(video)
        pos, padded, num = self.engine.generate(x, ratios, task_loss_requirement, preprocess=pre)
        return split_frame_tokens(pos, padded, num, self.config)

    def score(self, video, frame_tokens: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """gaze_probs, task_loss_prediction (B, N) float32: the teacher-forced pass on the GPU."""
        lens = [int(t.shape[1]) for t in frame_tokens]
        tokens = np.ascontiguousarray(np.concatenate(frame_tokens, axis=1), dtype=np.int64)
        x, pre = _engine_input(video)
        return self.engine.score(x, lens, tokens, preprocess=pre)

    def new_stream(self, batch_size: int, max_frames: Optional[int] = None) -> "WgpuStream":
        return WgpuStream(self, batch_size, max_frames)


class WgpuStream:
    """A streaming session. The GPU session is created on the first frame (its size is
    needed) with room for ``max_frames`` frames (the session's horizon), or, unbounded, for
    as many as the adapter's binding limits and memory allow, trying ``MAX_FRAMES_TRIED`` in
    order (the engine refuses a session that does not fit before allocating it).
    ``reset`` reuses its buffers."""

    MAX_FRAMES_TRIED = (1024, 256, 64, 16)

    def __init__(self, backend: WgpuBackend, batch_size: int, max_frames: Optional[int] = None):
        self.backend = backend
        self.batch_size = batch_size
        self.max_frames = max_frames
        self.session = None

    def reset(self) -> None:
        if self.session is not None:
            self.session.reset()

    def _open(self, frame, task_loss_requirement):
        tried = (self.max_frames,) if self.max_frames else self.MAX_FRAMES_TRIED
        h, w = frame.shape[-2:]
        source = frame.frames.shape[2:4] if isinstance(frame, RawFrames) else None
        for i, frames in enumerate(tried):
            try:
                return self.backend.engine.session(
                    self.batch_size, frames, h, w, task_loss_requirement, source_size=source
                )
            except DeviceError as e:
                if "largest storage binding" not in str(e) and "of GPU memory" not in str(e):
                    raise
                if i + 1 == len(tried):
                    raise DeviceError(
                        f"{e}; a session of {frames} frames does not fit this adapter: use a "
                        "shorter horizon or fewer batch rows"
                    ) from e

    def step(self, frame, budget: int, task_loss_requirement) -> np.ndarray:
        x, pre = _engine_input(frame)
        if self.session is None:
            self.session = self._open(frame, task_loss_requirement)
        elif self.session.frames >= self.session.max_frames:
            raise InputError(
                f"this wgpu session holds {self.session.max_frames} frames (the adapter's "
                "binding limits); give AutoGaze.stream a horizon, or start a new session"
            )
        V = self.backend.config.num_vision_tokens_each_frame
        return self.session.step(x, _ratio_for_budget(budget, V), preprocess=pre)
