"""Generation outputs with the official names and meanings, and the multi-scale masks.

Every backend returns per-frame token ids; turning them into ``gazing_pos``,
``if_padded_gazing``, ``num_gazing_each_frame`` and ``gazing_mask`` happens here, once, on
the host (numpy). ``return_tensors`` (numpy or torch out) is applied here too, once, by
:func:`convert_output`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from .config import AutoGazeConfig
from .errors import InputError

RETURN_TENSORS = ("np", "pt")


def _is_torch(x) -> bool:
    return type(x).__module__.split(".")[0] == "torch"


def as_numpy(x) -> np.ndarray:
    """A numpy array of ``x`` (a numpy array as is; a torch tensor through the host)."""
    if _is_torch(x):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def as_torch(x, device=None):
    """A torch tensor of ``x`` on ``device`` (default CPU). A numpy array on the CPU is shared,
    not copied; a tensor already on ``device`` is returned as is."""
    import torch

    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    return torch.as_tensor(x, device=device)


@dataclass
class GazeOutput:
    """Gazes of a batch of videos (SPEC §5 "Outputs").

    Attributes:
        gazing_pos: (B, N) int64, token id + V·t (V = 265); a padded slot reads V·(t+1).
        if_padded_gazing: (B, N) bool, True where the slot is padding (task-loss stop, or a
            row that finished while another row of the batch went on).
        num_gazing_each_frame: (T,) int64 slots per frame, shared by the batch.
        gazing_mask: per scale, coarse to fine, a (B, T, cells) float32 0/1 array
            (cells = 4, 16, 49, 196 for the release: 2x2, 4x4, 7x7, 14x14 grids, row-major).
        frame_tokens: per frame, (B, n_t) int64 ids within the frame (pad = V).
        tiles: for ``target_scales`` calls, the tile-level output the recovery started from.
        res_adapt_info: for ``target_scales`` calls, the tiling geometry.
    """

    gazing_pos: np.ndarray
    if_padded_gazing: np.ndarray
    num_gazing_each_frame: np.ndarray
    gazing_mask: list[np.ndarray]
    frame_tokens: list[np.ndarray] = field(default_factory=list, repr=False)
    tiles: Optional["GazeOutput"] = field(default=None, repr=False)
    res_adapt_info: Optional[dict[str, Any]] = None

    @property
    def batch_size(self) -> int:
        return int(self.gazing_pos.shape[0])

    @property
    def num_frames(self) -> int:
        return int(self.num_gazing_each_frame.shape[0])

    def num_real_gazes(self) -> np.ndarray:
        """(B, T) number of non-padded gazes in each frame (a tensor for torch outputs)."""
        if _is_torch(self.gazing_pos):
            import torch

            return torch.stack([m.sum(-1) for m in self.gazing_mask], 0).sum(0).to(torch.int64)
        return np.stack([m.sum(-1) for m in self.gazing_mask], 0).sum(0).astype(np.int64)

    def to_numpy(self) -> GazeOutput:
        """This output with numpy arrays (a copy to the host for device tensors)."""
        return self._map(as_numpy)

    def to_torch(self, device=None) -> GazeOutput:
        """This output with torch tensors on ``device`` (default CPU; same dtypes: int64, bool,
        float32 masks). One host-to-device copy per array for a GPU device."""
        return self._map(lambda a: as_torch(a, device))

    def _map(self, f) -> GazeOutput:
        return dataclasses.replace(
            self,
            gazing_pos=f(self.gazing_pos),
            if_padded_gazing=f(self.if_padded_gazing),
            num_gazing_each_frame=f(self.num_gazing_each_frame),
            gazing_mask=[f(m) for m in self.gazing_mask],
            frame_tokens=[f(t) for t in self.frame_tokens],
            tiles=None if self.tiles is None else self.tiles._map(f),
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain lists, ready for ``json.dumps``."""
        o = self.to_numpy()
        d = {
            "gazing_pos": o.gazing_pos.tolist(),
            "if_padded_gazing": o.if_padded_gazing.tolist(),
            "num_gazing_each_frame": o.num_gazing_each_frame.tolist(),
            "gazing_mask": [m.astype(np.uint8).tolist() for m in o.gazing_mask],
        }
        if o.res_adapt_info is not None:
            d["res_adapt_info"] = o.res_adapt_info
        return d


@dataclass
class ScoreOutput:
    """The official teacher-forced ``forward`` outputs (SPEC §5b), both (B, N) float32.

    These use true (cumsum) positions, so they are NOT the probabilities generation used.
    """

    gaze_probs: np.ndarray
    task_loss_prediction: np.ndarray

    @property
    def log_action_probs(self) -> np.ndarray:
        """``log(gaze_probs + 1e-8)`` as the official QUICK_START call returns it."""
        if _is_torch(self.gaze_probs):
            return (self.gaze_probs + 1e-8).log()
        return np.log(self.gaze_probs + np.float32(1e-8))

    def to_numpy(self) -> ScoreOutput:
        return ScoreOutput(as_numpy(self.gaze_probs), as_numpy(self.task_loss_prediction))

    def to_torch(self, device=None) -> ScoreOutput:
        return ScoreOutput(as_torch(self.gaze_probs, device), as_torch(self.task_loss_prediction, device))


def check_return_tensors(return_tensors: Any) -> str:
    """Validates ``return_tensors`` before any work: "np" (numpy) or "pt" (torch)."""
    if not isinstance(return_tensors, str) or return_tensors not in RETURN_TENSORS:
        raise InputError(
            f"return_tensors must be 'np' (numpy arrays) or 'pt' (torch tensors), got {return_tensors!r}"
        )
    return return_tensors


def convert_output(out: Any, return_tensors: str, device=None) -> Any:
    """The one place outputs become numpy or torch: ``out`` is a GazeOutput, a ScoreOutput or
    one array/tensor (``embed``). "pt" gives tensors on ``device`` (the model's device for the
    torch-based backends, so CUDA results stay on the GPU; CPU for wgpu); "np" gives numpy
    (device tensors are copied to the host)."""
    check_return_tensors(return_tensors)
    if isinstance(out, (GazeOutput, ScoreOutput)):
        return out.to_torch(device) if return_tensors == "pt" else out.to_numpy()
    return as_torch(out, device) if return_tensors == "pt" else as_numpy(out)


def tokens_to_masks(frame_tokens: list[np.ndarray], cfg: AutoGazeConfig) -> list[np.ndarray]:
    """Per-frame ids (B, n_t) -> per-scale (B, T, cells) 0/1 float32 masks (pads dropped).

    Ids split by scale in order: 0-3 -> 2x2, 4-19 -> 4x4, 20-68 -> 7x7, 69-264 -> 14x14
    (SPEC §6), each grid row-major.
    """
    V = cfg.num_vision_tokens_each_frame
    B = frame_tokens[0].shape[0] if frame_tokens else 0
    T = len(frame_tokens)
    full = np.zeros((B, T, V + 1), dtype=np.float32)  # the extra column swallows pads
    for t, tok in enumerate(frame_tokens):
        np.put_along_axis(full[:, t], tok.astype(np.int64), 1.0, axis=-1)
    full = full[..., :V]
    bounds = np.cumsum((0,) + tuple(cfg.num_tokens_each_scale))
    return [np.ascontiguousarray(full[..., a:b]) for a, b in zip(bounds[:-1], bounds[1:])]


def assemble_output(frame_tokens: list[np.ndarray], cfg: AutoGazeConfig, first_frame: int = 0) -> GazeOutput:
    """Builds the official outputs from per-frame ids; ``first_frame`` offsets ``gazing_pos``."""
    V, pad = cfg.num_vision_tokens_each_frame, cfg.pad_token_id
    frame_tokens = [np.asarray(t, dtype=np.int64) for t in frame_tokens]
    gazing_pos = np.concatenate(
        [tok + V * (first_frame + t) for t, tok in enumerate(frame_tokens)], axis=1
    )
    if_padded = np.concatenate([tok == pad for tok in frame_tokens], axis=1)
    num = np.array([tok.shape[1] for tok in frame_tokens], dtype=np.int64)
    return GazeOutput(
        gazing_pos=gazing_pos,
        if_padded_gazing=if_padded,
        num_gazing_each_frame=num,
        gazing_mask=tokens_to_masks(frame_tokens, cfg),
        frame_tokens=frame_tokens,
    )


def split_frame_tokens(
    gazing_pos: np.ndarray, if_padded_gazing: np.ndarray, num_gazing_each_frame, cfg: AutoGazeConfig
) -> list[np.ndarray]:
    """The inverse of :func:`assemble_output`: per-frame ids within the frame (pads -> pad id)."""
    V, pad = cfg.num_vision_tokens_each_frame, cfg.pad_token_id
    tokens, start = [], 0
    for t, n in enumerate(np.asarray(num_gazing_each_frame).tolist()):
        ids = gazing_pos[:, start : start + n] - V * t
        tokens.append(np.where(if_padded_gazing[:, start : start + n], pad, ids))
        start += n
    return tokens
