"""``AutoGaze``: the public model object (loading, defaults, validation, outputs).

The backend (``reference``, later ``wgpu`` / ``torch``) does the model-level work; everything
that must be the same for all backends (argument checks, SPEC §5 defaults, resolution
adaptation, output assembly, streaming bookkeeping) lives here.
"""

from __future__ import annotations

import gc
import os
import warnings
import weakref
from typing import Any, Optional, Self, Sequence, Union

import numpy as np

from .backends import create_backend
from .config import AutoGazeConfig
from .errors import InputError, ModelClosedError
from .hub import resolve_model_dir
from .inputs import (
    as_pixel_values,
    check_num_frames,
    gazing_budget,
    positive_int,
    resolve_gazing_params,
)
from .memory import check_call
from .processor import RawFrames
from .outputs import (
    GazeOutput,
    ScoreOutput,
    as_numpy,
    assemble_output,
    check_return_tensors,
    convert_output,
    split_frame_tokens,
)
from .resolution import input_res_adapt, recover_output_from_res_adapt
from .video.pipeline import run_video

Ratio = Union[None, float, Sequence[float]]


def _source_size(video) -> tuple[int, int] | None:
    """(H, W) of the uint8 frames of ``RawFrames`` input (None for pixel values)."""
    return tuple(video.frames.shape[2:4]) if isinstance(video, RawFrames) else None


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
        # Open streams, so that close() can cut them off from the backend (weak: a session
        # the caller dropped must not be kept alive by the model).
        self._sessions: weakref.WeakSet[StreamSession] = weakref.WeakSet()

    # -- lifetime ---------------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        return isinstance(self.backend, _Closed)

    def close(self) -> None:
        """Frees the backend now: the wgpu engine (its GPU buffers), the torch weights, KV
        caches and CUDA graphs. Afterwards every call, and every step of a stream opened on
        this model, raises :class:`ModelClosedError`. Closing twice is a no-op. A call
        already running in another thread finishes first; its resources go with it."""
        backend = self.backend
        if isinstance(backend, _Closed):
            return
        self.backend = _Closed(backend.name, getattr(backend, "precision", "float32"))
        for session in list(self._sessions):
            session._state = _Closed(backend.name)  # drops its reference to the backend
        self._sessions = weakref.WeakSet()
        close = getattr(backend, "close", None)
        if callable(close):
            close()
        device = getattr(backend, "device", None)
        try:
            alive = weakref.ref(backend)
        except TypeError:  # not weak-referenceable: nothing to check
            alive = lambda: None  # noqa: E731
        del backend, close  # the last references: the engine / weights are freed here
        if alive() is not None:
            gc.collect()  # reference cycles (e.g. the torch backend's cached decode states)
        if getattr(device, "type", None) == "cuda":
            import torch

            torch.cuda.empty_cache()  # hand the cached blocks back to the driver

    def __enter__(self) -> Self:
        self._check_open()
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _check_open(self) -> None:
        if isinstance(self.backend, _Closed):
            raise _closed_error()

    @classmethod
    def from_pretrained(
        cls,
        path_or_repo_id: Union[str, os.PathLike],
        backend: str = "reference",
        device: Optional[str] = None,
        precision: str = "float32",
        **backend_options: Any,
    ) -> "AutoGaze":
        """Loads ``config.json`` + ``model.safetensors`` from a directory or a Hub repo id.

        backend: "wgpu" (WGSL on any Vulkan/Metal/DX12 GPU), "torch" (fast CUDA path),
            "reference" (readable torch; the parity oracle) or "auto" (wgpu when an adapter
            exists, else torch on CUDA, else reference).
        device: for torch-based backends, e.g. "cpu" or "cuda".
        precision: "float32" (default: parity, TF32 off; every backend). The torch backend
            also has fast modes whose tokens may differ from the reference's: "tf32" (TF32
            matmuls/convolutions and Triton products on NVIDIA GPUs, 1.1-1.4x faster than
            float32 on an H100; the same as float32 on CPU) and "bf16" (bfloat16 GEMMs in the
            eager step, slower than float32 there; selection stays float32).
            docs/benchmarks.md has their agreement and speed.
        backend_options: the backend's own settings. The torch backend's ``decode_kernels``:
            "auto" (default: the fused Triton kernels on CUDA in float32 and tf32, else the
            eager torch step), "triton", "triton-ieee" (the Triton kernels with every product a float32
            FMA instead of 3xTF32 where that is faster) or "torch"; its ``steps_per_sync``: decode steps per CUDA graph
            launch at most, each launch one host read when a task-loss requirement can stop
            a frame early (default None: 4).
        """
        from . import _native

        model_dir = resolve_model_dir(path_or_repo_id)
        config = AutoGazeConfig.from_dict(_native.load_config(str(model_dir)))
        return cls(
            config, create_backend(backend, config, str(model_dir), device, precision, **backend_options), str(model_dir)
        )

    @property
    def backend_name(self) -> str:
        return self.backend.name

    @property
    def precision(self) -> str:
        return getattr(self.backend, "precision", "float32")

    @property
    def tensor_device(self):
        """Where ``return_tensors="pt"`` puts tensors: the torch-based backends' device
        (CUDA results stay on the GPU), else the CPU."""
        return getattr(self.backend, "device", None)

    @property
    def _input_device(self):
        """The CUDA device a torch-based backend runs on (None otherwise): host pixel values
        go there before their checks (``as_pixel_values``)."""
        dev = getattr(self.backend, "device", None)
        return dev if getattr(dev, "type", None) == "cuda" else None

    def _backend_input(self, video):
        """RawFrames stay raw for a backend that preprocesses on its device (wgpu); any other
        backend gets the processor's pixel values."""
        if isinstance(video, RawFrames) and not getattr(self.backend, "takes_raw_frames", False):
            return video.pixel_values()
        return video

    def _convert(self, out, return_tensors: str):
        return convert_output(out, return_tensors, self.tensor_device)

    def __repr__(self) -> str:
        p = "" if self.precision == "float32" else f", precision={self.precision!r}"
        c = ", closed" if self.closed else ""
        return f"AutoGaze(backend={self.backend_name!r}{p}, model_dir={self.model_dir!r}{c})"

    # ------------------------------------------------------------------------------------------
    def generate(
        self,
        pixel_values: Any,
        gazing_ratio: Ratio = None,
        task_loss_requirement: Optional[float] = None,
        target_scales: Optional[Sequence[int]] = None,
        target_patch_size: Optional[int] = None,
        return_tensors: str = "np",
    ) -> GazeOutput:
        """Greedy gaze generation, exactly as the official model (SPEC §5).

        pixel_values: float (B, T, 3, H, W) or (T, 3, H, W), numpy or torch, e.g. from
            :class:`AutoGazeProcessor`, or ``processor.raw(frames)`` (uint8 frames that the
            wgpu backend preprocesses on the GPU, bit-exact; other backends on the host).
            Frames are resized to 224x224 (bicubic) inside.
        gazing_ratio: fraction of the 265 tokens each frame may gaze at (per-frame list
            allowed); task_loss_requirement: stop a frame once the predicted reconstruction
            loss is at most this. Both None: the config's defaults (0.75 and 0.7 in the release).
        target_scales, target_patch_size: the official resolution adaptation for square
            high-resolution input (SPEC §7); masks come back on the target grids.
        return_tensors: "np" (numpy arrays) or "pt" (torch tensors on the model's device for
            the torch-based backends, else the CPU). Outputs are assembled on the host, so a
            CUDA model copies the tokens to the host once per call and the outputs back.
        """
        self._check_open()
        check_return_tensors(return_tensors)
        # (tiles are cut on the host: their input stays there)
        video = as_pixel_values(pixel_values, None if target_scales is not None else self._input_device)
        B, T = video.shape[:2]
        ratios, req = resolve_gazing_params(self.config, gazing_ratio, task_loss_requirement, T)
        if (target_scales is None) != (target_patch_size is None):
            raise InputError("target_scales and target_patch_size must be given together")
        if target_scales is not None:
            if isinstance(video, RawFrames):
                video = video.pixel_values()
            tiles, info = input_res_adapt(_to_numpy(video), target_scales, target_patch_size, self.config)
            tile_out = self._generate_tokens(tiles, ratios, req)
            return self._convert(recover_output_from_res_adapt(tile_out, info, B), return_tensors)
        return self._convert(self._generate_tokens(self._backend_input(video), ratios, req), return_tensors)

    def _generate_tokens(self, video, ratios: list[float], req: Optional[float]) -> GazeOutput:
        T = video.shape[1]
        V = self.config.num_vision_tokens_each_frame
        budgets = [gazing_budget(r, V) for r in ratios]
        check_num_frames(self.config, T, max(budgets))
        check_call(self.backend, self.config, video.shape, budgets, "generate", _source_size(video))
        if T > self.config.max_num_frames:
            warnings.warn(
                f"{T} frames is more than the {self.config.max_num_frames} the model was trained "
                "on; the official guidance is to run longer videos as 16-frame clips",
                stacklevel=3,
            )
        tokens = self.backend.generate(video, budgets, req)
        return assemble_output(tokens, self.config)

    def embed(self, pixel_values: Any, return_tensors: str = "np") -> np.ndarray:
        """Connector output (B, T, 196, C) float32: the vision tokens the decoder sees.
        return_tensors "pt": a torch tensor on the model's device (no host copy)."""
        self._check_open()
        check_return_tensors(return_tensors)
        video = as_pixel_values(pixel_values, self._input_device)
        check_call(self.backend, self.config, video.shape, None, "embed", _source_size(video))
        return self._convert(self.backend.embed(self._backend_input(video)), return_tensors)

    def score(self, pixel_values: Any, gazes: GazeOutput, return_tensors: str = "np") -> ScoreOutput:
        """The official teacher-forced ``forward`` on given gazes (SPEC §5b); ``gazes`` may
        hold numpy arrays or torch tensors. return_tensors: as in :meth:`generate`."""
        self._check_open()
        check_return_tensors(return_tensors)
        video = as_pixel_values(pixel_values, self._input_device)
        if gazes.tiles is not None:
            raise InputError("score() takes tile-level outputs: pass `out.tiles` and the tiles")
        frame_tokens = _frame_tokens_from_output(gazes, self.config, video.shape[0], video.shape[1])
        lens = [t.shape[1] for t in frame_tokens]
        check_call(self.backend, self.config, video.shape, lens, "score", _source_size(video))
        gp, tl = self.backend.score(self._backend_input(video), frame_tokens)
        return self._convert(ScoreOutput(gaze_probs=gp, task_loss_prediction=tl), return_tensors)

    def stream(
        self,
        batch_size: int = 1,
        gazing_ratio: Optional[float] = None,
        task_loss_requirement: Optional[float] = None,
        horizon: Union[int, None, str] = "auto",
    ) -> "StreamSession":
        """A streaming session: feed one frame per ``step``; gives the whole-clip tokens.

        horizon: the session forgets its history every ``horizon`` frames, so frame ``i`` is
            gazed exactly as frame ``i % horizon`` of a clip starting at frame
            ``i - i % horizon``. Memory and per-frame cost stay bounded however long the
            stream. "auto" (default): ``config.max_num_frames`` (16, the clip length the model
            was trained on). None: never forget, as the official code (the KV cache grows with
            every frame; refused once positions would pass ``max_position_embeddings``, and on
            wgpu past the session's capacity).
        """
        self._check_open()
        session = StreamSession(self, batch_size, gazing_ratio, task_loss_requirement, horizon)
        self._sessions.add(session)
        return session

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
        self._check_open()
        return run_video(
            self, frames, mode, gazing_ratio=gazing_ratio, task_loss_requirement=task_loss_requirement, **kwargs
        )


class StreamSession:
    """Carries the KV cache, conv cache and mask between frames (the official streaming call
    with ``past_key_values`` etc. fed back). ``step`` returns that frame's output with ids
    counted from the start of the frame (pad = 265), as the official per-frame call does.
    Every ``horizon`` frames the backend's stream is reset (its buffers are kept)."""

    def __init__(self, model: AutoGaze, batch_size: int, gazing_ratio, task_loss_requirement, horizon="auto"):
        self.batch_size = positive_int("batch_size", batch_size)
        cfg = model.config
        ratios, req = resolve_gazing_params(cfg, gazing_ratio, task_loss_requirement, 1)
        if isinstance(horizon, str) and horizon == "auto":
            horizon = cfg.max_num_frames
        elif horizon is not None:
            horizon = positive_int("horizon", horizon, "a positive integer, 'auto' or None")
        self.model = model
        self.budget = gazing_budget(ratios[0], cfg.num_vision_tokens_each_frame)
        self.task_loss_requirement = req
        self.horizon = horizon
        if self.horizon is not None:
            check_num_frames(cfg, self.horizon, self.budget)  # a window must fit the positions
        self.frame_index = 0  # frames stepped in this session
        self.frames_in_context = 0  # frames since the last reset
        self._state = model.backend.new_stream(self.batch_size, max_frames=self.horizon)

    def step(self, frame_pixel_values: Any, return_tensors: str = "np") -> GazeOutput:
        """frame (B, 1, 3, H, W) (or (B, 3, H, W)) -> this frame's GazeOutput (T = 1);
        ``return_tensors`` as in :meth:`AutoGaze.generate`."""
        check_return_tensors(return_tensors)
        x = as_pixel_values(frame_pixel_values, self.model._input_device)
        raw = isinstance(x, RawFrames)
        if not raw and x.shape[1] != 1 and x.shape[0] == 1 and self.batch_size == x.shape[1]:
            x = x.reshape(x.shape[1], 1, *x.shape[2:])  # (B, 3, H, W) read as (1, B, ...)
        if x.shape[0] != self.batch_size or x.shape[1] != 1:
            raise InputError(
                f"step() takes one frame per batch row: shape ({self.batch_size}, 1, 3, H, W), "
                f"got {tuple(x.shape)}"
            )
        if self.horizon is not None and self.frames_in_context >= self.horizon:
            self.reset()
        elif self.horizon is None:
            # Unbounded, as the official code: refuse before positions leave the RoPE range.
            check_num_frames(
                self.model.config,
                self.frames_in_context + 1,
                self.budget,
                advice="this stream has no horizon (horizon=None): give AutoGaze.stream a horizon",
            )
        tokens = self._state.step(self.model._backend_input(x), self.budget, self.task_loss_requirement)
        self.frame_index += 1
        self.frames_in_context += 1
        return self.model._convert(assemble_output([tokens], self.model.config), return_tensors)

    def reset(self) -> None:
        """Forgets the history now: the next frame is gazed as the first frame of a clip."""
        self._state.reset()
        self.frames_in_context = 0


def _frame_tokens_from_output(out: GazeOutput, cfg: AutoGazeConfig, B: int, T: int) -> list[np.ndarray]:
    """gazing_pos/if_padded_gazing -> per-frame ids within the frame (pads -> 265)."""
    num = as_numpy(out.num_gazing_each_frame).astype(np.int64, copy=False)
    pos = as_numpy(out.gazing_pos).astype(np.int64, copy=False)
    pad_flags = as_numpy(out.if_padded_gazing).astype(bool, copy=False)
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


def _closed_error() -> ModelClosedError:
    return ModelClosedError("this model was closed; load it again with AutoGaze.from_pretrained")


class _Closed:
    """Stands in for a closed model's backend (and its streams' states): any use raises
    ModelClosedError. ``name`` and ``precision`` stay readable for repr."""

    def __init__(self, name: str, precision: str = "float32"):
        self.name = name
        self.precision = precision

    def __getattr__(self, attr: str):
        raise _closed_error()
