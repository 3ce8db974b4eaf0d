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
def no_tf32():
    """No autograd and TF32 off for the duration of a call: with TF32 on, even the official
    model's tokens change on NVIDIA GPUs (SPEC §8). The global settings are restored after."""
    _TF32_LOCK.acquire()
    m, c = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.no_grad():
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = m
        torch.backends.cudnn.allow_tf32 = c
        _TF32_LOCK.release()


class ReferenceBackend:
    name = "reference"

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
        if isinstance(video, np.ndarray):
            video = torch.from_numpy(video)
        return video.to(device=self.device, dtype=torch.float32)

    # -- model-level API -------------------------------------------------------------------
    def embed(self, video) -> "torch.Tensor":
        """(B, T, 3, H, W) -> connector output (B, T, 196, C)."""
        with no_tf32():
            emb, _ = self.model.embed(self.as_tensor(video))
        return emb

    def generate(self, video, budgets: list[int], task_loss_requirement, record_steps=False):
        """Returns per-frame token ids [(B, n_t) int64 numpy] (and the step records)."""
        from ..reference.generation import GazeGenerator

        with no_tf32():
            emb = self.embed(video)
            gen = GazeGenerator(self.model, emb.shape[0], record_steps=record_steps)
            tokens = [
                gen.step_frame(emb[:, t], budgets[t], task_loss_requirement).cpu().numpy()
                for t in range(emb.shape[1])
            ]
        return (tokens, gen.steps) if record_steps else tokens

    def score(self, video, frame_tokens: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        from ..reference.generation import teacher_forced_scores

        with no_tf32():
            emb = self.embed(video)
            toks = [torch.as_tensor(t, device=self.device) for t in frame_tokens]
            gp, tl = teacher_forced_scores(self.model, emb, toks)
        return gp.cpu().numpy(), tl.cpu().numpy()

    def new_stream(self, batch_size: int) -> "ReferenceStream":
        return ReferenceStream(self, batch_size)


class ReferenceStream:
    """One streaming session: the generator state plus the vision conv cache."""

    def __init__(self, backend: ReferenceBackend, batch_size: int):
        from ..reference.generation import GazeGenerator

        self.backend = backend
        self.generator = GazeGenerator(backend.model, batch_size)
        self.conv_cache = None

    def step(self, frame, budget: int, task_loss_requirement) -> np.ndarray:
        """frame (B, 1, 3, H, W) -> this frame's ids (B, n) int64."""
        with no_tf32():
            emb, self.conv_cache = self.backend.model.embed(self.backend.as_tensor(frame), self.conv_cache)
            tokens = self.generator.step_frame(emb[:, 0], budget, task_loss_requirement)
        return tokens.cpu().numpy()
