"""``backend="reference"``: the readable torch implementation, the parity oracle."""

from __future__ import annotations

import contextlib
import threading
from typing import Optional

import numpy as np

from ..errors import BackendError, DeviceError

try:
    import torch
except ImportError:  # pragma: no cover - exercised only without torch
    torch = None


def require_torch():
    if torch is None:
        raise BackendError(
            "this backend needs PyTorch: `pip install autogaze-wgpu[torch]` (or `pip install torch`)"
        )
    return torch


# The TF32 flags are process-wide: calls that switch them are serialised (re-entrant, since
# generate() enters the context again through embed()).
_TF32_LOCK = threading.RLock()


@contextlib.contextmanager
def tf32_switch(allow: bool):
    """No autograd and the TF32 flags set to ``allow`` for the duration of a call; the global
    settings are restored after. Only the torch backend's fast mode passes True."""
    _TF32_LOCK.acquire()
    m, c = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = allow
    torch.backends.cudnn.allow_tf32 = allow
    try:
        with torch.no_grad():
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = m
        torch.backends.cudnn.allow_tf32 = c
        _TF32_LOCK.release()


def no_tf32():
    """TF32 off (and no autograd) for the duration of a call: with TF32 on, even the official
    model's tokens change on NVIDIA GPUs (SPEC §8)."""
    return tf32_switch(False)


class ReferenceBackend:
    name = "reference"
    precision = "float32"  # the only one: this is the parity oracle

    def __init__(self, config, weights, device: Optional[str] = None):
        require_torch()
        from ..reference.modeling import GazingModel

        self.config = config
        try:
            self.device = torch.device(device or "cpu")
            self.model = GazingModel.from_weights(config, weights).to(self.device)
        except (RuntimeError, AssertionError) as e:
            raise DeviceError(f"could not put the reference model on device {device!r}: {e}") from e

    # -- helpers ---------------------------------------------------------------------------
    def as_tensor(self, video) -> "torch.Tensor":
        """float32 on the model's device: a tensor already there is used as is (no copy), a
        host array or tensor is copied over once (a numpy array is wrapped, not copied, on CPU)."""
        if isinstance(video, np.ndarray):
            video = torch.from_numpy(video)
        return video.to(device=self.device, dtype=torch.float32)

    def mode(self):
        """The arithmetic of a call (the torch backend's fast modes override it): float32 with
        TF32 off, no autograd."""
        return no_tf32()

    # -- model-level API -------------------------------------------------------------------
    def embed(self, video) -> "torch.Tensor":
        """(B, T, 3, H, W) -> connector output (B, T, 196, C) float32."""
        with self.mode():
            emb, _ = self.model.embed(self.as_tensor(video))
        return emb.float()  # a no-op but under the torch backend's bf16 autocast

    def generate(self, video, budgets: list[int], task_loss_requirement, record_steps=False):
        """Returns per-frame token ids [(B, n_t) int64 numpy] (and the step records)."""
        from ..reference.generation import GazeGenerator

        with self.mode():
            emb = self.embed(video)
            gen = GazeGenerator(self.model, emb.shape[0], record_steps=record_steps)
            tokens = [
                gen.step_frame(emb[:, t], budgets[t], task_loss_requirement).cpu().numpy()
                for t in range(emb.shape[1])
            ]
        return (tokens, gen.steps) if record_steps else tokens

    def score(self, video, frame_tokens: list[np.ndarray]) -> tuple["torch.Tensor", "torch.Tensor"]:
        """gaze_probs, task_loss_prediction (B, N) float32 on the model's device."""
        from ..reference.generation import teacher_forced_scores

        with self.mode():
            emb = self.embed(video)
            toks = [torch.as_tensor(t, device=self.device) for t in frame_tokens]
            gp, tl = teacher_forced_scores(self.model, emb, toks)
        return gp.float(), tl.float()  # no-ops but under the torch backend's bf16 autocast

    def new_stream(self, batch_size: int, max_frames: Optional[int] = None) -> "ReferenceStream":
        """max_frames: frames between resets (None: unbounded); the reference grows as needed."""
        return ReferenceStream(self, batch_size)


class ReferenceStream:
    """One streaming session: the generator state plus the vision conv cache."""

    def __init__(self, backend: ReferenceBackend, batch_size: int):
        self.backend = backend
        self.batch_size = batch_size
        self.reset()

    def reset(self) -> None:
        """Forgets the history: the next step is a fresh session's first frame."""
        from ..reference.generation import GazeGenerator

        self.generator = GazeGenerator(self.backend.model, self.batch_size)
        self.conv_cache = None

    def step(self, frame, budget: int, task_loss_requirement) -> np.ndarray:
        """frame (B, 1, 3, H, W) -> this frame's ids (B, n) int64."""
        with no_tf32():
            emb, self.conv_cache = self.backend.model.embed(self.backend.as_tensor(frame), self.conv_cache)
            tokens = self.generator.step_frame(emb[:, 0], budget, task_loss_requirement)
        return tokens.cpu().numpy()
