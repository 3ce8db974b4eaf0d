"""Video input and output.

Reading: :func:`read_frames` decodes any file FFmpeg reads (through PyAV) into uint8 RGB
frames, with a clip window (``start``/``end`` in seconds), a frame ``stride`` and
``max_frames``; :func:`read_camera` reads a camera through OpenCV; :func:`open_frames` picks
one from a string (``"camera:0"`` or a path).

Writing: :class:`VideoWriter` writes MP4 (H.264), WebM (VP9) or other containers through
PyAV, and GIF through Pillow; :class:`PngWriter` writes numbered PNG frames; :func:`write_json`
writes strict JSON.

PyAV and OpenCV are optional (``pip install autogaze-wgpu[video]`` installs PyAV) and are
imported only here, when a reader or writer that needs them is used.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Self

import numpy as np

from ..errors import BackendError, InputError
from ..inputs import positive_int

PathLike = str | os.PathLike


def _require_av():
    try:
        import av
    except ImportError:
        raise BackendError(
            "reading or writing video files needs PyAV: `pip install 'autogaze-wgpu[video]'` "
            "(or `pip install av`). GIF and PNG output work without it."
        ) from None
    return av


def _require_cv2():
    try:
        import cv2
    except ImportError:
        raise BackendError(
            "camera input needs OpenCV: `pip install opencv-python-headless` (or opencv-python)"
        ) from None
    return cv2


@dataclass
class VideoInfo:
    """What a file says about its first video stream (``num_frames`` may be an estimate or
    None: many containers do not store it)."""

    path: str
    width: int
    height: int
    fps: float | None
    num_frames: int | None
    duration: float | None
    codec: str


def probe(path: PathLike) -> VideoInfo:
    av = _require_av()
    container = _open_input(av, path)
    try:
        s = container.streams.video[0]
        fps = (
            float(s.average_rate)
            if s.average_rate
            else (float(s.base_rate) if s.base_rate else None)
        )
        duration = (
            float(s.duration * s.time_base) if s.duration is not None and s.time_base else None
        )
        if duration is None and container.duration is not None:
            duration = container.duration / 1_000_000
        n = int(s.frames) if s.frames else (round(duration * fps) if duration and fps else None)
        return VideoInfo(
            str(path),
            s.codec_context.width,
            s.codec_context.height,
            fps,
            n,
            duration,
            s.codec_context.name,
        )
    finally:
        container.close()


def _open_input(av, path: PathLike):
    p = Path(path)
    if not p.is_file():
        raise InputError(f"video file {str(path)!r} does not exist")
    try:
        container = av.open(str(p))
    except av.error.FFmpegError as e:
        raise InputError(f"could not open {str(path)!r} as a video: {e}") from None
    if not container.streams.video:
        container.close()
        raise InputError(f"{str(path)!r} has no video stream")
    return container


def read_frames(
    path: PathLike,
    start: float = 0.0,
    end: float | None = None,
    stride: int = 1,
    max_frames: int | None = None,
    with_index: bool = False,
) -> Iterator[Any]:
    """Decodes a video file into uint8 (H, W, 3) RGB frames.

    start, end: the clip window in seconds (frames with ``start <= time < end``).
    stride: keep every ``stride``-th frame of the window. max_frames: stop after that many.
    with_index: yield ``(frame_number, frame)``, frame_number counted from the start of the
        stream (the pair form that :meth:`VideoGazer.iter_frames` understands).
    """
    stride = positive_int("stride", stride)
    if max_frames is not None:
        max_frames = positive_int("max_frames", max_frames, "a positive integer or None")
    if start < 0 or (end is not None and end <= start):
        raise InputError(
            f"the clip window must have 0 <= start < end, got start={start}, end={end}"
        )
    av = _require_av()
    container = _open_input(av, path)
    try:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        fps = float(stream.average_rate) if stream.average_rate else None
        t0 = float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0
        if start > 0:
            container.seek(
                int((start + t0) / stream.time_base), stream=stream, backward=True, any_frame=False
            )
        kept = seen = 0
        decoded = 0
        try:
            for frame in container.decode(stream):
                t = (float(frame.pts * stream.time_base) - t0) if frame.pts is not None else None
                if start > 0 and t is not None and fps:
                    number = round(t * fps)
                else:
                    number = decoded
                decoded += 1
                if t is not None and t < start - 1e-6:
                    continue
                if end is not None and t is not None and t >= end - 1e-6:
                    break
                if seen % stride == 0:
                    rgb = frame.to_ndarray(format="rgb24")
                    yield (number, rgb) if with_index else rgb
                    kept += 1
                    if max_frames is not None and kept >= max_frames:
                        break
                seen += 1
        except av.error.FFmpegError as e:
            raise InputError(f"could not decode {str(path)!r}: {e}") from None
    finally:
        container.close()


def read_camera(
    index: int = 0,
    max_frames: int | None = None,
    width: int | None = None,
    height: int | None = None,
    with_index: bool = False,
) -> Iterator[Any]:
    """Frames from a camera through OpenCV (BGR converted to RGB). Runs until ``max_frames``
    or until the camera stops delivering."""
    cv2 = _require_cv2()
    cap = cv2.VideoCapture(int(index))
    if not cap.isOpened():
        raise InputError(f"camera {index} could not be opened")
    try:
        if width:
            cap.set(cv2.CAP_PROP_FRAME_WIDTH, int(width))
        if height:
            cap.set(cv2.CAP_PROP_FRAME_HEIGHT, int(height))
        n = 0
        while max_frames is None or n < max_frames:
            ok, bgr = cap.read()
            if not ok:
                break
            rgb = np.ascontiguousarray(bgr[..., ::-1])
            yield (n, rgb) if with_index else rgb
            n += 1
    finally:
        cap.release()


def open_frames(spec: str | int | os.PathLike, **kwargs: Any) -> Iterator[Any]:
    """``"camera"``, ``"camera:N"`` or an int -> :func:`read_camera`; anything else is a file
    path for :func:`read_frames`. Keyword arguments go to the reader."""
    if isinstance(spec, int) or (
        isinstance(spec, str) and (spec == "camera" or spec.startswith("camera:"))
    ):
        idx = spec if isinstance(spec, int) else int(spec.partition(":")[2] or 0)
        cam_kw = {
            k: v for k, v in kwargs.items() if k in ("max_frames", "width", "height", "with_index")
        }
        return read_camera(idx, **cam_kw)
    return read_frames(spec, **kwargs)


# -- writers ---------------------------------------------------------------------------------------

_CODECS = {
    ".mp4": ("libx264", "h264", "mpeg4"),
    ".m4v": ("libx264", "h264", "mpeg4"),
    ".mov": ("libx264", "h264", "mpeg4"),
    ".mkv": ("libx264", "h264", "mpeg4"),
    ".webm": ("libvpx-vp9", "libvpx"),
    ".avi": ("mpeg4",),
}
VIDEO_FORMATS = ("mp4", "webm", "gif", "mkv", "mov", "avi")


class VideoWriter:
    """Writes uint8 RGB frames to a video file; the format follows the extension.

    MP4/MOV/MKV: H.264 (yuv420p, ``crf``); WebM: VP9; GIF: Pillow (all frames are kept in
    memory until ``close``: meant for short clips). yuv420p needs even sizes, so an odd
    width or height is padded by repeating the last column/row. Use as a context manager.
    """

    def __init__(self, path: PathLike, fps: float = 25.0, crf: int = 20, codec: str | None = None):
        self.path = Path(path)
        self.ext = self.path.suffix.lower()
        if not (isinstance(fps, (int, float)) and math.isfinite(fps) and fps > 0):
            raise InputError(f"fps must be a positive number, got {fps!r}")
        self.fps = float(fps)
        self.crf = int(crf)
        self.codec = codec
        self.size: tuple[int, int] | None = None
        self.frames_written = 0
        self._gif: list[Any] = []
        self._container = None
        self._stream = None
        if self.ext != ".gif" and self.ext not in _CODECS:
            raise InputError(
                f"unsupported video extension {self.ext!r}; use one of "
                f"{', '.join('.' + f for f in VIDEO_FORMATS)}"
            )
        if self.ext != ".gif":
            _require_av()  # fail before any work is done
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _open(self, h: int, w: int) -> None:
        av = _require_av()
        rate = Fraction(self.fps).limit_denominator(1001)
        self._container = av.open(str(self.path), mode="w")
        names = (self.codec,) if self.codec else _CODECS[self.ext]
        last = None
        for name in names:
            try:
                self._stream = self._container.add_stream(name, rate=rate)
                break
            except (av.error.FFmpegError, ValueError, av.codec.codec.UnknownCodecError) as e:  # type: ignore[attr-defined]
                last = e
        if self._stream is None:
            self._container.close()
            raise BackendError(
                f"no encoder for {self.ext} in this FFmpeg build (tried {names}): {last}"
            )
        self._stream.width, self._stream.height = w + (w % 2), h + (h % 2)
        self._stream.pix_fmt = "yuv420p"
        if self._stream.codec_context.name in ("libx264", "libvpx-vp9", "libvpx"):
            opts = {"crf": str(self.crf)}
            if self._stream.codec_context.name != "libx264":
                opts["b"] = "0"
            self._stream.options = opts

    def write(self, frame: np.ndarray) -> None:
        frame = np.asarray(frame)
        if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[-1] != 3:
            raise InputError(
                f"frames to write must be uint8 (H, W, 3), got {frame.dtype} {frame.shape}"
            )
        h, w = frame.shape[:2]
        if self.size is None:
            self.size = (h, w)
        elif self.size != (h, w):
            raise InputError(
                f"frame {self.frames_written} is {h}x{w}, the video is {self.size[0]}x{self.size[1]}"
            )
        if self.ext == ".gif":
            from PIL import Image

            self._gif.append(Image.fromarray(np.ascontiguousarray(frame)))
        else:
            av = _require_av()
            if self._container is None:
                self._open(h, w)
            if h % 2 or w % 2:
                frame = np.pad(frame, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")
            vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
            for packet in self._stream.encode(vf):
                self._container.mux(packet)
        self.frames_written += 1

    def close(self) -> None:
        if self.ext == ".gif":
            if self._gif:
                from PIL import Image

                # One palette for the whole clip (from the first frame), no dithering: pixels
                # that do not change keep their index, so frame differencing stays small.
                palette = self._gif[0].quantize(colors=255, method=Image.Quantize.MEDIANCUT)
                frames = [
                    im.quantize(palette=palette, dither=Image.Dither.NONE) for im in self._gif
                ]
                duration = max(20, round(1000.0 / self.fps))
                frames[0].save(
                    self.path,
                    save_all=True,
                    append_images=frames[1:],
                    duration=duration,
                    loop=0,
                    optimize=False,
                )
                self._gif = []
            return
        if self._container is not None:
            for packet in self._stream.encode():
                self._container.mux(packet)
            self._container.close()
            self._container = None


class PngWriter:
    """Numbered PNG frames in a directory (``frame_000000.png``, ...)."""

    def __init__(self, directory: PathLike, pattern: str = "frame_{:06d}.png"):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.pattern = pattern
        self.frames_written = 0

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def write(self, frame: np.ndarray, index: int | None = None) -> Path:
        from PIL import Image

        frame = np.asarray(frame)
        if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[-1] != 3:
            raise InputError(
                f"frames to write must be uint8 (H, W, 3), got {frame.dtype} {frame.shape}"
            )
        p = self.directory / self.pattern.format(self.frames_written if index is None else index)
        Image.fromarray(np.ascontiguousarray(frame)).save(p)
        self.frames_written += 1
        return p

    def close(self) -> None:
        pass


def write_json(path: PathLike, obj: Any, indent: int | None = 1) -> None:
    """Strict JSON (no NaN/Infinity: they must be converted before)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=indent, allow_nan=False)
        f.write("\n")
