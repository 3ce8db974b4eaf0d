"""The video-level call: frames of any size and length in, a :class:`VideoResult` out.

``run_video(source, frames, mode=..., ...)`` is what ``AutoGaze.__call__`` does;
:class:`VideoGazer` is the same thing frame-incremental (``iter_frames`` yields each frame's
gazes as soon as they exist, so a long file or a camera never has to sit in memory).

Long videos. The model was trained on clips of ``config.max_num_frames`` (16) frames:
* ``long_video="clips"`` (default, the official guidance): consecutive clips of ``clip_len``
  frames, each a fresh ``generate`` call (tiles as batch rows). Every clip starts without
  history, so the first frame of each clip gazes broadly again. Output arrives a clip at a
  time.
* ``long_video="stream"``: one streaming session (``AutoGaze.stream``), one frame per step,
  carrying the KV and conv caches. Output arrives every frame (cameras, live video). The
  history is bounded by ``stream_horizon`` frames (the session's ``horizon``: it forgets its
  history after that many frames), which bounds memory and keeps positions in range. With ``stream_horizon == clip_len`` the tokens equal ``clips``' exactly; a longer
  horizon gives more history than the model was trained on.

Tiles are run in bounded batches of ``max_tile_batch`` rows (separate generate calls /
streaming sessions), so memory stays flat however large the frame.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from ..errors import InputError
from ..inputs import check_num_frames, gazing_budget, positive_int, resolve_gazing_params
from ..processor import RawFrames
from .baseline import PatchDiff
from .modes import MODES, ModelGrid, TileLayout, as_uint8_frames, make_layout
from .result import FrameGaze, VideoResult

LONG_VIDEO = ("clips", "stream")
Ratio = None | float | Sequence[float]


class TileClip:
    """The model inputs of one clip for one layout, built lazily per tile batch."""

    def __init__(self, layout: TileLayout, frames: np.ndarray, processor=None):
        self.layout = layout
        self.frames = frames
        self.processor = processor
        self._work: np.ndarray | None = None
        self._resize_pv: RawFrames | None = None

    @property
    def num_frames(self) -> int:
        return int(self.frames.shape[0])

    def work(self) -> np.ndarray:
        if self._work is None:
            self._work = self.layout.work_frames(self.frames)
        return self._work

    def uint8_tiles(self, tiles: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """(B, T, 224, 224, 3) uint8 and the (B, 224, 224) valid-pixel map."""
        return self.layout.cut_tiles(self.work(), tiles)

    def pixel_values(self, tiles: Sequence[int]) -> np.ndarray | RawFrames:
        """(B, T, 3, h, w) model input for the given tiles: float32, or in "resize" mode the
        raw frames with the processor (see ``AutoGazeProcessor.raw``)."""
        if self.processor is None:
            raise InputError("this source has no processor")
        if self.layout.mode == "resize":
            # Exactly the official path: processor (shortest edge 224, PIL bilinear), then
            # the model squashes each frame to 224x224 (bicubic) inside. Raw: the wgpu
            # backend runs the processor on the GPU, others on the host (once per clip).
            if self._resize_pv is None:
                self._resize_pv = self.processor.raw(self.frames[None])
            return self._resize_pv
        u8, valid = self.uint8_tiles(tiles)
        pv = self.processor.normalize(u8)  # (B, T, 3, S, S)
        if not valid.all():
            # The official resolution adaptation pads with 0 in normalised space.
            pv *= valid[:, None, None, :, :]
        return pv


class ModelSource:
    """Runs an :class:`~autogaze_wgpu.AutoGaze` over tile batches, as clips or streamed."""

    confidence_kind = "teacher_forced"

    def __init__(self, model, confidence: bool = True):
        from ..processor import AutoGazeProcessor, PreprocessorConfig

        self.model = model
        self.grid = ModelGrid.from_config(model.config)
        self.name = f"autogaze:{model.backend_name}"
        # Confidence comes from the backend's teacher-forced score().
        self.want_confidence = bool(confidence)
        if model.model_dir is not None:
            self.processor = AutoGazeProcessor.from_pretrained(model.model_dir)
        else:  # a model built in memory: the released preprocessor settings
            from ..testing import PREPROCESSOR_CONFIG

            self.processor = AutoGazeProcessor(PreprocessorConfig.from_dict(PREPROCESSOR_CONFIG))
        self._sessions: dict[tuple[int, ...], Any] = {}

    @property
    def params(self) -> dict:
        return {"model_dir": self.model.model_dir, "backend": self.model.backend_name}

    def reset(self) -> None:
        self._sessions = {}

    def clip_tokens(self, clip: TileClip, tiles: list[int], ratios, req):
        """Per frame: per tile (n,) ids and (n,) confidences (or None)."""
        pv = clip.pixel_values(tiles)
        out = self.model.generate(pv, gazing_ratio=ratios, task_loss_requirement=req)
        conf_all = None
        if self.want_confidence:
            conf_all = self.model.score(pv, out).gaze_probs  # (B, N), slot-aligned
        starts = np.concatenate([[0], np.cumsum(out.num_gazing_each_frame)])
        toks, confs = [], []
        for t, ft in enumerate(out.frame_tokens):
            toks.append([ft[j] for j in range(len(tiles))])
            confs.append(
                None
                if conf_all is None
                else [conf_all[j, starts[t] : starts[t + 1]] for j in range(len(tiles))]
            )
        return toks, confs

    def stream_tokens(self, clip: TileClip, tiles: list[int], ratio, req, horizon: int):
        key = tuple(tiles)
        session = self._sessions.get(key)
        if session is None:
            session = self.model.stream(
                batch_size=len(tiles), gazing_ratio=ratio, task_loss_requirement=req, horizon=horizon
            )
            self._sessions[key] = session
        out = session.step(clip.pixel_values(tiles))
        ft = out.frame_tokens[0]
        return [[ft[j] for j in range(len(tiles))]], [None]


class BaselineSource:
    """Adapts a model-free source (e.g. :class:`PatchDiff`) to the pipeline."""

    def __init__(self, baseline):
        self.baseline = baseline
        self.grid = baseline.grid
        self.name = baseline.name
        self.confidence_kind = baseline.confidence_kind
        self.want_confidence = False

    @property
    def params(self) -> dict:
        return dict(getattr(self.baseline, "params", {}))

    def reset(self) -> None:
        self.baseline.reset()

    def _tokens(self, clip: TileClip, tiles: list[int], ratios):
        u8, valid = clip.uint8_tiles(tiles)
        if ratios is None or _is_number(ratios):
            ratios = [ratios] * clip.num_frames
        budgets = [None if r is None else gazing_budget(r, self.grid.num_tokens) for r in ratios]
        toks = self.baseline.tile_tokens(u8, valid, tiles, budgets)
        return toks, [None] * len(toks)

    def clip_tokens(self, clip: TileClip, tiles: list[int], ratios, req):
        return self._tokens(clip, tiles, ratios)

    def stream_tokens(self, clip: TileClip, tiles: list[int], ratio, req, horizon: int):
        # A baseline's only history is the previous frame: the horizon does not apply.
        return self._tokens(clip, tiles, ratio)


def _as_source(source, confidence: bool):
    if isinstance(source, (ModelSource, BaselineSource)):
        return source
    if isinstance(source, str):
        if source == "patch_diff":
            return BaselineSource(PatchDiff())
        raise InputError(f"unknown gaze source {source!r}; pass an AutoGaze model or 'patch_diff'")
    if hasattr(source, "tile_tokens") and hasattr(source, "grid"):
        return BaselineSource(source)
    if hasattr(source, "generate") and hasattr(source, "stream") and hasattr(source, "config"):
        return ModelSource(source, confidence=confidence)
    raise InputError(
        f"cannot use {type(source).__name__} as a gaze source; pass an AutoGaze model or PatchDiff()"
    )


class VideoGazer:
    """Frame-incremental video inference (see the module docstring for every option).

    >>> gazer = VideoGazer(model, mode="tiled", gazing_ratio=0.75, task_loss_requirement=0.7)
    >>> for frame, gaze in gazer.iter_frames(read_frames("clip.mp4")):
    ...     print(gaze.index, gaze.num_gazes, gaze.token_ratio)
    >>> result = gazer.result()   # everything seen so far as a VideoResult
    """

    def __init__(
        self,
        source,
        mode: str = "resize",
        *,
        gazing_ratio: Ratio = None,
        task_loss_requirement: float | None = None,
        long_video: str = "clips",
        clip_len: int | None = None,
        stream_horizon: int | None = None,
        tile_grid: tuple[int, int] | None = None,
        tile_stride: int | None = None,
        max_tile_batch: int = 16,
        confidence: bool = True,
        fps: float | None = None,
    ):
        # Confidence comes from the teacher-forced pass over a whole clip; a streaming
        # session has no clip to score, so streamed results carry none (NaN, kind "none").
        self.source = _as_source(source, confidence and long_video == "clips")
        if mode not in MODES:
            raise InputError(f"mode must be one of {', '.join(map(repr, MODES))}, got {mode!r}")
        if long_video not in LONG_VIDEO:
            raise InputError(f"long_video must be 'clips' or 'stream', got {long_video!r}")
        max_tile_batch = positive_int("max_tile_batch", max_tile_batch)
        make_layout(224, 224, mode, self.source.grid, tile_grid, tile_stride)  # checks the options
        model = getattr(self.source, "model", None)
        max_frames = model.config.max_num_frames if model is not None else 16
        self.clip_len = _positive_int("clip_len", clip_len, max_frames)
        self.stream_horizon = _positive_int("stream_horizon", stream_horizon, self.clip_len)
        if long_video == "stream" and self.stream_horizon > 0 and model is not None:
            check_num_frames(
                model.config, self.stream_horizon, model.config.num_vision_tokens_each_frame
            )
        if long_video == "stream" and gazing_ratio is not None and not _is_number(gazing_ratio):
            raise InputError(
                "long_video='stream' takes one gazing_ratio for every frame, not a list"
            )
        if gazing_ratio is not None and not _is_number(gazing_ratio):
            try:
                gazing_ratio = [float(r) for r in gazing_ratio]
            except (TypeError, ValueError):
                raise InputError(
                    f"gazing_ratio must be a number or a list of numbers, got {gazing_ratio!r}"
                ) from None
        if model is not None:
            # Validate once, up front, with the model's own rules.
            probe = (
                gazing_ratio
                if gazing_ratio is None or _is_number(gazing_ratio)
                else gazing_ratio[:1] or None
            )
            resolve_gazing_params(model.config, probe, task_loss_requirement, 1)
            if gazing_ratio is not None and not _is_number(gazing_ratio):
                resolve_gazing_params(
                    model.config, gazing_ratio, task_loss_requirement, len(gazing_ratio)
                )
        elif gazing_ratio is not None:
            for r in [gazing_ratio] if _is_number(gazing_ratio) else gazing_ratio:
                if not (math.isfinite(float(r)) and 0.0 < float(r) <= 1.0):
                    raise InputError(f"gazing_ratio must be in (0, 1], got {r}")
        self.mode = mode
        self.gazing_ratio = gazing_ratio
        self.task_loss_requirement = task_loss_requirement
        self.long_video = long_video
        self.tile_grid = tile_grid
        self.tile_stride = tile_stride
        self.max_tile_batch = int(max_tile_batch)
        self.fps = fps
        self.layout: TileLayout | None = None
        self._frames: list[FrameGaze] = []
        self._count = 0
        self.source.reset()

    # -- parameters ----------------------------------------------------------------------------
    @property
    def grid(self) -> ModelGrid:
        return self.source.grid

    def params(self) -> dict[str, Any]:
        eff_ratio, eff_req = self.gazing_ratio, self.task_loss_requirement
        model = getattr(self.source, "model", None)
        if model is not None and (eff_ratio is None or _is_number(eff_ratio)):
            rs, eff_req = resolve_gazing_params(model.config, eff_ratio, eff_req, 1)
            eff_ratio = rs[0]
        return {
            "effective_gazing_ratio": eff_ratio,
            "effective_task_loss_requirement": eff_req,
            "mode": self.mode,
            "gazing_ratio": self.gazing_ratio,
            "task_loss_requirement": self.task_loss_requirement,
            "long_video": self.long_video,
            "clip_len": self.clip_len,
            "stream_horizon": self.stream_horizon if self.long_video == "stream" else None,
            "tile_grid": list(self.tile_grid) if self.tile_grid else None,
            "tile_stride": self.tile_stride,
            "max_tile_batch": self.max_tile_batch,
            "confidence": self.source.want_confidence,
            "source_params": self.source.params,
        }

    def _ratio(self, i: int):
        if self.gazing_ratio is None or _is_number(self.gazing_ratio):
            return self.gazing_ratio
        if i >= len(self.gazing_ratio):
            raise InputError(
                f"gazing_ratio has {len(self.gazing_ratio)} values but frame {i} was reached"
            )
        return self.gazing_ratio[i]

    def _budget(self, ratio) -> int:
        model = getattr(self.source, "model", None)
        V = self.grid.num_tokens
        if model is not None:
            rs, _ = resolve_gazing_params(model.config, ratio, self.task_loss_requirement, 1)
            return gazing_budget(rs[0], V)
        return V if ratio is None else gazing_budget(ratio, V)

    # -- running -------------------------------------------------------------------------------
    def _layout_for(self, frame: np.ndarray) -> TileLayout:
        H, W = frame.shape[:2]
        if self.layout is None:
            self.layout = make_layout(H, W, self.mode, self.grid, self.tile_grid, self.tile_stride)
        elif (H, W) != (self.layout.height, self.layout.width):
            raise InputError(
                f"frame {self._count} is {H}x{W} but the video started at "
                f"{self.layout.height}x{self.layout.width}; all frames must have one size"
            )
        return self.layout

    def _tile_groups(self) -> list[list[int]]:
        n = self.layout.num_tiles
        return [
            list(range(a, min(n, a + self.max_tile_batch)))
            for a in range(0, n, self.max_tile_batch)
        ]

    def process_clip(
        self, frames: Any, source_indices: Sequence[int] | None = None
    ) -> list[FrameGaze]:
        """Runs frames that belong together (at most ``clip_len`` in ``clips`` mode; any
        number in ``stream`` mode, one step each) and returns their FrameGaze."""
        frames = as_uint8_frames(frames)
        layout = self._layout_for(frames[0])
        T = frames.shape[0]
        if source_indices is None:
            source_indices = range(self._count, self._count + T)
        source_indices = list(source_indices)
        if len(source_indices) != T:
            raise InputError(f"{len(source_indices)} source indices for {T} frames")
        if self.long_video == "clips" and T > self.clip_len:
            out = []
            for a in range(0, T, self.clip_len):
                out += self.process_clip(
                    frames[a : a + self.clip_len], source_indices[a : a + self.clip_len]
                )
            return out
        processor = getattr(self.source, "processor", None)
        results: list[FrameGaze] = []
        if self.long_video == "clips":
            first = self._count
            ratios = [self._ratio(first + t) for t in range(T)]
            clip = TileClip(layout, frames, processor)
            per_frame_tokens = [[None] * layout.num_tiles for _ in range(T)]
            per_frame_conf = [[None] * layout.num_tiles for _ in range(T)]
            for group in self._tile_groups():
                call_ratios = ratios if any(r is not None for r in ratios) else None
                if call_ratios is not None and all(r == ratios[0] for r in ratios):
                    call_ratios = ratios[0]
                toks, confs = self.source.clip_tokens(
                    clip, group, call_ratios, self.task_loss_requirement
                )
                for t in range(T):
                    for j, k in enumerate(group):
                        per_frame_tokens[t][k] = toks[t][j]
                        per_frame_conf[t][k] = None if confs[t] is None else confs[t][j]
            for t in range(T):
                results.append(
                    FrameGaze.from_tile_tokens(
                        layout,
                        first + t,
                        source_indices[t],
                        per_frame_tokens[t],
                        per_frame_conf[t],
                        self._budget(ratios[t]),
                    )
                )
                self._count += 1
        else:
            for t in range(T):
                clip = TileClip(layout, frames[t : t + 1], processor)
                tokens = [None] * layout.num_tiles
                for group in self._tile_groups():
                    toks, _ = self.source.stream_tokens(
                        clip, group, self.gazing_ratio, self.task_loss_requirement, self.stream_horizon
                    )
                    for j, k in enumerate(group):
                        tokens[k] = toks[0][j]
                results.append(
                    FrameGaze.from_tile_tokens(
                        layout,
                        self._count,
                        source_indices[t],
                        tokens,
                        None,
                        self._budget(self.gazing_ratio),
                    )
                )
                self._count += 1
        self._frames += results
        return results

    def iter_frames(self, frames: Iterable[Any]) -> Iterator[tuple[np.ndarray, FrameGaze]]:
        """Yields (uint8 frame, FrameGaze) in order. Items may be frames or
        ``(source_index, frame)`` pairs (as :func:`read_frames` gives with ``with_index``)."""
        chunk = self.clip_len if self.long_video == "clips" else 1
        buf: list[np.ndarray] = []
        idx: list[int] = []
        seen = 0
        for item in frames:
            if isinstance(item, tuple) and len(item) == 2:
                i, f = item
            else:
                i, f = self._count + len(buf), item
            f = as_uint8_frames(f)
            if f.shape[0] != 1:
                raise InputError(f"iter_frames takes one frame per item, got {f.shape[0]}")
            buf.append(f[0])
            idx.append(int(i))
            seen += 1
            if len(buf) == chunk:
                for fr, g in zip(buf, self.process_clip(np.stack(buf), idx)):
                    yield fr, g
                buf, idx = [], []
        if buf:
            for fr, g in zip(buf, self.process_clip(np.stack(buf), idx)):
                yield fr, g
        if seen == 0 and self._count == 0:
            raise InputError("the video has no frames")

    def result(self) -> VideoResult:
        if self.layout is None:
            raise InputError("no frames were processed")
        kind = self.source.confidence_kind if self.source.want_confidence else "none"
        return VideoResult(
            frames=list(self._frames),
            layout=self.layout,
            source=self.source.name,
            confidence_kind=kind,
            params=self.params(),
            fps=self.fps,
        )


def run_video(source, frames: Any, mode: str = "resize", **kwargs) -> VideoResult:
    """Gazes of a whole video: ``frames`` uint8 (T, H, W, 3|4) / (H, W, 3|4), numpy or torch,
    a list of frames, or an iterable of frames (e.g. :func:`read_frames`). See
    :class:`VideoGazer` for the keyword arguments."""
    gazer = VideoGazer(source, mode, **kwargs)
    if (
        isinstance(frames, np.ndarray)
        or hasattr(frames, "detach")
        or isinstance(frames, (list, tuple))
    ):
        arr = as_uint8_frames(frames)
        gazer.process_clip(arr)
    else:
        for _ in gazer.iter_frames(frames):
            pass
    return gazer.result()


def _is_number(x) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)


def _positive_int(name: str, value, default: int) -> int:
    return int(default) if value is None else positive_int(name, value)


__all__ = ["LONG_VIDEO", "BaselineSource", "ModelSource", "TileClip", "VideoGazer", "run_video"]
