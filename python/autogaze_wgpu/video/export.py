"""Run a video through a :class:`VideoGazer` and write every output the CLI promises.

Files written to ``out_dir``:

* ``overlay.<ext>``: the input with gazed cells tinted and outlined per scale;
* ``mask.<ext>``: the gazed cells in their scale's colour on black;
* ``interframe.<ext>``: the persistent output refreshed only in gazed cells;
* ``panels.<ext>`` (``panels=True``): input | overlay | interframe side by side;
* ``fixations.json`` and ``fixations.npz``: the :class:`VideoResult`;
* ``metrics.json``: token ratios, interframe update ratio and PSNR (per frame, means, EMAs),
  timing;
* ``frames/<kind>/frame_NNNNNN.png`` with ``png=True``;
* ``demo.gif`` (or ``gif_path``) when asked: a small looping panel animation.

``<ext>`` is ``mp4`` (H.264), ``webm`` (VP9) or ``gif``; ``video_format=None`` writes no video.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError
from . import render
from .interframe import InterframeOutput
from .io import PngWriter, VideoWriter, write_json
from .metrics import InterframeMetrics
from .pipeline import VideoGazer
from .result import VideoResult

KINDS = ("overlay", "mask", "interframe")


@dataclass
class ExportReport:
    result: VideoResult
    metrics: dict[str, Any]
    files: dict[str, Path] = field(default_factory=dict)


def render_frame_set(
    frame: np.ndarray, gaze, interframe_output: np.ndarray
) -> dict[str, np.ndarray]:
    """The images written for one frame, by kind."""
    return {
        "overlay": render.overlay(frame, gaze),
        "mask": render.mask_image(gaze),
        "interframe": interframe_output,
    }


def export_video(
    gazer: VideoGazer,
    frames: Iterable[Any],
    out_dir: str | Path,
    *,
    video_format: str | None = "mp4",
    fps: float = 25.0,
    keyframe_interval: int = 0,
    ema_alpha: float = 0.1,
    png: bool = False,
    panels: bool = False,
    gif_path: str | Path | None = None,
    gif_panel_width: int = 300,
    gif_fps: float | None = None,
    total: int | None = None,
    progress: bool = True,
    extra_metrics: dict[str, Any] | None = None,
) -> ExportReport:
    """Processes ``frames`` (an iterable of uint8 frames or (index, frame) pairs) and writes
    the outputs listed in the module docstring. Returns the result and the metrics."""
    if video_format not in (None, "mp4", "webm", "gif", "mkv", "mov"):
        raise InputError(
            f"video_format must be mp4, webm, gif, mkv, mov or None, got {video_format!r}"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    writers: dict[str, Any] = {}
    kinds = list(KINDS) + (["panels"] if panels else [])
    if video_format is not None:
        for k in kinds:
            files[k] = out / f"{k}.{video_format}"
            writers[k] = VideoWriter(files[k], fps=fps)
    pngs = {k: PngWriter(out / "frames" / k) for k in kinds} if png else {}
    gif = VideoWriter(gif_path, fps=gif_fps or fps) if gif_path else None
    metrics = InterframeMetrics(ema_alpha=ema_alpha)
    inter: InterframeOutput | None = None
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(
            total=total, unit="frame", desc=f"{gazer.source.name} {gazer.mode}", dynamic_ncols=True
        )
    t0 = time.perf_counter()
    n, elapsed = 0, 0.0
    try:
        for frame, gaze in gazer.iter_frames(frames):
            if inter is None:
                inter = InterframeOutput(frame.shape[0], frame.shape[1], keyframe_interval)
            step = inter.step(frame, gaze.pixel_mask())
            metrics.add(frame, step.output, step.update_ratio, step.keyframe)
            images = render_frame_set(frame, gaze, step.output)
            labels = [
                "input",
                f"gazes: {gaze.token_ratio:.0%} of tokens",
                f"interframe: {step.update_ratio:.0%} of pixels",
            ]
            trio = [frame, images["overlay"], images["interframe"]]
            if panels:
                images["panels"] = render.panels(trio, labels=labels)
            if gif is not None:
                gif.write(
                    render.panels(
                        [render.resize_image(im, gif_panel_width) for im in trio], labels=labels
                    )
                )
            for k, w in writers.items():
                w.write(images[k])
            for k, w in pngs.items():
                w.write(images[k], gaze.source_index)
            n += 1
            elapsed = time.perf_counter() - t0
            if bar is not None:
                bar.update(1)
                bar.set_postfix(
                    tokens=f"{gaze.token_ratio:.2f}",
                    pixels=f"{step.update_ratio:.2f}",
                    refresh=False,
                )
    finally:
        if bar is not None:
            bar.close()
        for w in writers.values():
            w.close()
        if gif is not None:
            gif.close()
    if n == 0:
        raise InputError("the video has no frames")
    result = gazer.result()
    result.fps = fps
    files["fixations_json"] = out / "fixations.json"
    files["fixations_npz"] = out / "fixations.npz"
    files["metrics"] = out / "metrics.json"
    result.to_json(files["fixations_json"])
    result.save_npz(files["fixations_npz"])
    m = {
        "source": result.source,
        "mode": result.mode,
        "num_frames": n,
        "frame_size": [result.height, result.width],
        "seconds": elapsed,
        "frames_per_second": n / elapsed if elapsed > 0 else None,
        "tokens_available_per_frame": result.tokens_available,
        "token_ratio": {
            "note": "real gazes / tokens available per frame (the model's tokens, all scales)",
            "mean": float(result.token_ratio.mean()),
            "per_frame": result.token_ratio.tolist(),
        },
        "keyframe_interval": keyframe_interval,
        "interframe": metrics.to_dict(),
    }
    if extra_metrics:
        m.update(extra_metrics)
    write_json(files["metrics"], m)
    if gif is not None:
        files["gif"] = Path(gif_path)  # type: ignore[arg-type]
    for k, w in pngs.items():
        files[f"png_{k}"] = w.directory
    return ExportReport(result=result, metrics=m, files=files)
