"""``AutoGaze``: the public model object (loading, defaults, validation, outputs).

The backend (``reference``, later ``wgpu`` / ``torch``) does the model-level work; everything
that must be the same for all backends (argument checks, SPEC §5 defaults, resolution
adaptation, output assembly, streaming bookkeeping) lives here.
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Optional, Sequence, Union

import numpy as np

from .backends import create_backend
from .config import AutoGazeConfig
from .errors import InputError
from .hub import resolve_model_dir
from .inputs import as_pixel_values, check_num_frames, gazing_budget, resolve_gazing_params
from .outputs import GazeOutput, ScoreOutput, assemble_output, split_frame_tokens
from .resolution import input_res_adapt, recover_output_from_res_adapt
from .video.pipeline import run_video

Ratio = Union[None, float, Sequence[float]]


def _to_numpy(x) -> np.ndarray:
    if isinstance(x, np.ndarray):
        return x
    return x.detach().cpu().numpy()


class AutoGaze:
    """NVIDIA AutoGaze: picks the few multi-scale patches of each frame a ViT/MLLM needs.

    >>> model = AutoGaze.from_pretrained("path/to/model", backend="reference")
    >>> out = model.generate(pixel_values, gazing_ratio=0.75, task_loss_requirement=0.7)
    >>> out.gazing_pos, out.if_padded_gazing, out.num_gazing_each_frame, out.gazing_mask
    """

    def __init__(self, config: AutoGazeConfig, backend, model_dir: Optional[str] = None):
        self.config = config
        self.backend = backend
        self.model_dir = model_dir

    @classmethod
    def from_pretrained(
        cls,
        path_or_repo_id: Union[str, os.PathLike],
        backend: str = "reference",
        device: Optional[str] = None,
    ) -> "AutoGaze":
        """Loads ``config.json`` + ``model.safetensors`` from a directory or a Hub repo id.

        backend: "wgpu" (WGSL on any Vulkan/Metal/DX12 GPU), "torch" (fast CUDA path),
            "reference" (readable torch; the parity oracle) or "auto" (wgpu when an adapter
            exists, else torch on CUDA, else reference).
        device: for torch-based backends, e.g. "cpu" or "cuda".
        """
        from . import _native

        model_dir = resolve_model_dir(path_or_repo_id)
        config = AutoGazeConfig.from_dict(_native.load_config(str(model_dir)))
        return cls(config, create_backend(backend, config, str(model_dir), device), str(model_dir))

    @property
    def backend_name(self) -> str:
        return self.backend.name

    def __repr__(self) -> str:
        return f"AutoGaze(backend={self.backend_name!r}, model_dir={self.model_dir!r})"

    # ------------------------------------------------------------------------------------------
    def generate(
        self,
        pixel_values: Any,
        gazing_ratio: Ratio = None,
        task_loss_requirement: Optional[float] = None,
        target_scales: Optional[Sequence[int]] = None,
        target_patch_size: Optional[int] = None,
    ) -> GazeOutput:
        """Greedy gaze generation, exactly as the official model (SPEC §5).

        pixel_values: float (B, T, 3, H, W) or (T, 3, H, W), numpy or torch, e.g. from
            :class:`AutoGazeProcessor`. Frames are resized to 224x224 (bicubic) inside.
        gazing_ratio: fraction of the 265 tokens each frame may gaze at (per-frame list
            allowed); task_loss_requirement: stop a frame once the predicted reconstruction
            loss is at most this. Both None: the config's defaults (0.75 and 0.7 in the release).
        target_scales, target_patch_size: the official resolution adaptation for square
            high-resolution input (SPEC §7); masks come back on the target grids.
        """
        video = as_pixel_values(pixel_values)
        B, T = video.shape[:2]
        ratios, req = resolve_gazing_params(self.config, gazing_ratio, task_loss_requirement, T)
        if (target_scales is None) != (target_patch_size is None):
            raise InputError("target_scales and target_patch_size must be given together")
        if target_scales is not None:
            tiles, info = input_res_adapt(_to_numpy(video), target_scales, target_patch_size, self.config)
            tile_out = self._generate_tokens(tiles, ratios, req)
            return recover_output_from_res_adapt(tile_out, info, B)
        return self._generate_tokens(video, ratios, req)

    def _generate_tokens(self, video, ratios: list[float], req: Optional[float]) -> GazeOutput:
        T = video.shape[1]
        V = self.config.num_vision_tokens_each_frame
        budgets = [gazing_budget(r, V) for r in ratios]
        check_num_frames(self.config, T, max(budgets))
        if T > self.config.max_num_frames:
            warnings.warn(
                f"{T} frames is more than the {self.config.max_num_frames} the model was trained "
                "on; the official guidance is to run longer videos as 16-frame clips",
                stacklevel=3,
            )
        tokens = self.backend.generate(video, budgets, req)
        return assemble_output(tokens, self.config)

    def embed(self, pixel_values: Any) -> np.ndarray:
        """Connector output (B, T, 196, C): the vision tokens the decoder sees."""
        return _to_numpy(self.backend.embed(as_pixel_values(pixel_values)))

    def score(self, pixel_values: Any, gazes: GazeOutput) -> ScoreOutput:
        """The official teacher-forced ``forward`` on given gazes (SPEC §5b)."""
        video = as_pixel_values(pixel_values)
        if gazes.tiles is not None:
            raise InputError("score() takes tile-level outputs: pass `out.tiles` and the tiles")
        frame_tokens = _frame_tokens_from_output(gazes, self.config, video.shape[0], video.shape[1])
        gp, tl = self.backend.score(video, frame_tokens)
        return ScoreOutput(gaze_probs=gp, task_loss_prediction=tl)

    def stream(
        self,
        batch_size: int = 1,
        gazing_ratio: Optional[float] = None,
        task_loss_requirement: Optional[float] = None,
    ) -> "StreamSession":
        """A streaming session: feed one frame per ``step``; gives the whole-clip tokens."""
        return StreamSession(self, batch_size, gazing_ratio, task_loss_requirement)

    def __call__(
        self,
        frames: Any,
        mode: str = "resize",
        gazing_ratio: Ratio = None,
        task_loss_requirement: Optional[float] = None,
        **kwargs: Any,
    ):
        """Gazes of a video of any size and length, in source-frame coordinates.

        frames: uint8 RGB(A) frames (T, H, W, C) or one (H, W, C) frame, numpy or torch, a
            list of frames, or an iterable of frames (e.g. ``video.io.read_frames``).
        mode: "resize" (whole frame to the model input), "tiled" (AnyRes: resize to a whole
            grid of 224 tiles) or "tiled_full" (native-resolution tiles, zero-padded edges).
        Other keywords (``long_video="clips"|"stream"``, ``clip_len``, ``stream_horizon``,
        ``tile_grid``, ``tile_stride``, ``max_tile_batch``, ``confidence``, ``fps``): see
        :class:`autogaze_wgpu.video.VideoGazer` and docs/video.md.
        Returns a :class:`autogaze_wgpu.video.VideoResult`.
        """
        return run_video(
            self, frames, mode, gazing_ratio=gazing_ratio, task_loss_requirement=task_loss_requirement, **kwargs
        )


class StreamSession:
    """Carries the KV cache, conv cache and mask between frames (the official streaming call
    with ``past_key_values`` etc. fed back). ``step`` returns that frame's output with ids
    counted from the start of the frame (pad = 265), as the official per-frame call does."""

    def __init__(self, model: AutoGaze, batch_size: int, gazing_ratio, task_loss_requirement):
        if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise InputError(f"batch_size must be a positive integer, got {batch_size!r}")
        ratios, req = resolve_gazing_params(model.config, gazing_ratio, task_loss_requirement, 1)
        self.model = model
        self.batch_size = int(batch_size)
        self.budget = gazing_budget(ratios[0], model.config.num_vision_tokens_each_frame)
        self.task_loss_requirement = req
        self.frame_index = 0
        self._state = model.backend.new_stream(self.batch_size)

    def step(self, frame_pixel_values: Any) -> GazeOutput:
        """frame (B, 1, 3, H, W) (or (B, 3, H, W)) -> this frame's GazeOutput (T = 1)."""
        x = as_pixel_values(frame_pixel_values)
        if x.shape[1] != 1 and x.shape[0] == 1 and self.batch_size == x.shape[1]:
            x = x.reshape(x.shape[1], 1, *x.shape[2:])  # (B, 3, H, W) read as (1, B, ...)
        if x.shape[0] != self.batch_size or x.shape[1] != 1:
            raise InputError(
                f"step() takes one frame per batch row: shape ({self.batch_size}, 1, 3, H, W), "
                f"got {tuple(x.shape)}"
            )
        tokens = self._state.step(x, self.budget, self.task_loss_requirement)
        self.frame_index += 1
        return assemble_output([tokens], self.model.config)


def _frame_tokens_from_output(out: GazeOutput, cfg: AutoGazeConfig, B: int, T: int) -> list[np.ndarray]:
    """gazing_pos/if_padded_gazing -> per-frame ids within the frame (pads -> 265)."""
    num = np.asarray(out.num_gazing_each_frame, dtype=np.int64)
    pos = np.asarray(out.gazing_pos, dtype=np.int64)
    pad_flags = np.asarray(out.if_padded_gazing, dtype=bool)
    if num.shape != (T,) or pos.shape != (B, int(num.sum())) or pad_flags.shape != pos.shape:
        raise InputError(
            f"gazes do not fit the video: num_gazing_each_frame {num.shape}, gazing_pos "
            f"{pos.shape}, if_padded_gazing {pad_flags.shape} for B={B}, T={T}"
        )
    tokens = split_frame_tokens(pos, pad_flags, num, cfg)
    pad = cfg.pad_token_id
    for t, ids in enumerate(tokens):
        if ((ids < 0) | (ids > pad)).any():
            raise InputError(f"gazing_pos of frame {t} holds ids outside frame {t}")
    return tokens
