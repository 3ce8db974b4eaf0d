"""The ``autogaze-wgpu`` command line (also ``python -m autogaze_wgpu``).

  autogaze-wgpu info                         versions, backends, optional video packages
  autogaze-wgpu run INPUT --out DIR [...]    gazes of a video file (or camera:N) -> videos,
                                             fixations (JSON + npz), metrics JSON
  autogaze-wgpu demo [--model DIR|REPO]      the same on a bundled sample clip, offline

Without ``--model`` no weights are used (none ship with the package and nothing is
downloaded): ``run`` and ``demo`` then say so and use the model-free ``patch_diff``
baseline, unless cached ``nvidia/AutoGaze`` weights are found in the Hugging Face cache.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

DEFAULT_REPO = "nvidia/AutoGaze"


def _cmd_info(args: argparse.Namespace) -> int:
    import platform

    import autogaze_wgpu as ag

    print(f"autogaze-wgpu {ag.__version__} (Python {platform.python_version()})")
    print(f"backends: {', '.join(ag.available_backends())}")
    try:
        import torch

        cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"
        print(f"torch {torch.__version__}: {cuda}")
    except ImportError:
        print("torch: not installed (the reference and torch backends need it)")
    for mod, what in (("av", "PyAV (video files)"), ("cv2", "OpenCV (camera input)")):
        try:
            m = __import__(mod)
            print(f"{what}: {getattr(m, '__version__', 'installed')}")
        except ImportError:
            print(f"{what}: not installed")
    return 0


# -- shared by run and demo ------------------------------------------------------------------------


def _cached_weights() -> str | None:
    """nvidia/AutoGaze from the local Hugging Face cache, without touching the network."""
    try:
        from huggingface_hub import snapshot_download

        from autogaze_wgpu.hub import MODEL_FILES
    except ImportError:
        return None
    try:
        return snapshot_download(
            repo_id=DEFAULT_REPO, allow_patterns=list(MODEL_FILES), local_files_only=True
        )
    except Exception:  # noqa: BLE001 - any failure means "not cached": fall back
        return None


def _make_source(args: argparse.Namespace):
    """-> (source for VideoGazer, description line)."""
    import autogaze_wgpu as ag
    from autogaze_wgpu.video import PatchDiff

    if args.baseline == "patch_diff":
        return PatchDiff(
            threshold=args.threshold
        ), f"source: patch_diff baseline (threshold {args.threshold})"
    model_path = args.model
    note = ""
    if model_path is None:
        model_path = _cached_weights()
        if model_path is None:
            print(
                "no AutoGaze weights: none ship with the package and nothing is downloaded without "
                "--model. Using the model-free patch_diff baseline (cells whose mean absolute change "
                f"exceeds {args.threshold} grey levels). Pass --model DIR|{DEFAULT_REPO} to use AutoGaze."
            )
            return PatchDiff(
                threshold=args.threshold
            ), "source: patch_diff baseline (no model weights available)"
        note = f" (found {DEFAULT_REPO} in the Hugging Face cache)"
    model = ag.AutoGaze.from_pretrained(model_path, backend=args.backend)
    return model, f"source: AutoGaze from {model.model_dir}{note}, backend {model.backend_name}"


def _tile_grid(s: str | None):
    if s is None:
        return None
    try:
        r, c = s.lower().split("x")
        return int(r), int(c)
    except ValueError:
        from autogaze_wgpu.errors import InputError

        raise InputError(f"--tile-grid must look like ROWSxCOLS (e.g. 5x9), got {s!r}") from None


def _gazer(args: argparse.Namespace, source, fps: float | None):
    from autogaze_wgpu.video import VideoGazer

    return VideoGazer(
        source,
        args.mode,
        gazing_ratio=args.gazing_ratio,
        task_loss_requirement=args.task_loss_requirement,
        long_video=args.long_video,
        clip_len=args.clip_len,
        stream_horizon=args.stream_horizon,
        tile_grid=_tile_grid(args.tile_grid),
        tile_stride=args.tile_stride,
        max_tile_batch=args.max_tile_batch,
        confidence=not args.no_confidence,
        fps=fps,
    )


def _print_report(report, out: Path) -> None:
    m = report.metrics
    r = report.result
    inter = m["interframe"]
    psnr = inter["psnr_db_mean"]
    psnr_s = psnr if isinstance(psnr, str) else f"{psnr:.2f} dB"
    print(
        f"{m['num_frames']} frames {r.width}x{r.height}, mode {r.mode}: "
        f"{m['frames_per_second']:.2f} frames/s"
    )
    print(
        f"token ratio (gazes / {r.tokens_available} tokens): mean {m['token_ratio']['mean']:.3f}; "
        f"interframe pixel update ratio: mean {inter['update_ratio_mean']:.3f}; PSNR of the mean MSE {psnr_s}"
    )
    print(f"outputs in {out}:")
    for k, p in report.files.items():
        print(f"  {k:16s} {p}")


def _cmd_run(args: argparse.Namespace) -> int:
    from autogaze_wgpu.video.export import export_video
    from autogaze_wgpu.video.io import open_frames, probe

    source, desc = _make_source(args)
    print(desc)
    fps, total = args.fps, args.max_frames
    is_camera = args.input.startswith("camera")
    if not is_camera:
        info = probe(args.input)
        fps = fps or ((info.fps or 25.0) / args.stride)
        if info.num_frames:
            start_frames = int(args.start * (info.fps or 0))
            end_frames = int(args.end * info.fps) if (args.end and info.fps) else info.num_frames
            est = max(0, min(info.num_frames, end_frames) - start_frames)
            est = -(-est // args.stride)
            total = min(total, est) if total else est
        print(
            f"input: {args.input} ({info.width}x{info.height}, {info.fps or '?'} fps, {info.codec})"
        )
        frames = open_frames(
            args.input,
            start=args.start,
            end=args.end,
            stride=args.stride,
            max_frames=args.max_frames,
            with_index=True,
        )
    else:
        fps = fps or 25.0
        frames = open_frames(args.input, max_frames=args.max_frames, with_index=True)
    out = Path(args.out)
    report = export_video(
        _gazer(args, source, fps),
        frames,
        out,
        video_format=None if args.format == "none" else args.format,
        fps=fps,
        keyframe_interval=args.keyframe_interval,
        ema_alpha=args.ema_alpha,
        png=args.png,
        panels=args.panels,
        total=total,
        progress=not args.no_progress,
    )
    _print_report(report, out)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from autogaze_wgpu.video.export import export_video
    from autogaze_wgpu.video.sample import sample_clip

    source, desc = _make_source(args)
    print(desc)
    frames = sample_clip(num_frames=args.frames, seed=0)
    print(
        f"input: bundled sample, {args.frames} frames {frames.shape[2]}x{frames.shape[1]} made from a "
        "CC0 photograph (autogaze_wgpu/data/coffee.jpg): a small cup slides across a still table"
    )
    fmt = args.format
    if fmt == "auto":
        try:
            import av  # noqa: F401

            fmt = "mp4"
        except ImportError:
            print(
                "PyAV is not installed: writing GIFs (`pip install 'autogaze-wgpu[video]'` for MP4/WebM)"
            )
            fmt = "gif"
    out = Path(args.out)
    gif = Path(args.gif) if args.gif else out / "demo.gif"
    report = export_video(
        _gazer(args, source, args.fps),
        iter(frames),
        out,
        video_format=None if fmt == "none" else fmt,
        fps=args.fps,
        keyframe_interval=args.keyframe_interval,
        ema_alpha=args.ema_alpha,
        png=args.png,
        panels=True,
        gif_path=gif,
        gif_panel_width=args.gif_panel_width,
        total=len(frames),
        progress=not args.no_progress,
    )
    _print_report(report, out)
    return 0


def _add_common(p: argparse.ArgumentParser, frames_default_fps: float | None) -> None:
    g = p.add_argument_group("gaze source")
    g.add_argument(
        "--model", help=f"model directory or Hub repo id (e.g. {DEFAULT_REPO}); default: patch_diff"
    )
    g.add_argument(
        "--backend", default="reference", help="model backend (see `info`); default reference"
    )
    g.add_argument(
        "--baseline", choices=["patch_diff"], help="use the model-free baseline even with a model"
    )
    g.add_argument(
        "--threshold", type=float, default=8.0, help="patch_diff: mean absolute change, grey levels"
    )
    g.add_argument(
        "--no-confidence",
        action="store_true",
        help="skip the teacher-forced confidence pass (faster)",
    )
    m = p.add_argument_group("inference")
    m.add_argument("--mode", choices=["resize", "tiled", "tiled_full"], default="resize")
    m.add_argument(
        "--gazing-ratio", type=float, default=None, help="default: the model config's (0.75)"
    )
    m.add_argument(
        "--task-loss-requirement",
        type=float,
        default=None,
        help="default: the model config's (0.7)",
    )
    m.add_argument("--long-video", choices=["clips", "stream"], default="clips")
    m.add_argument(
        "--clip-len", type=int, default=None, help="frames per clip (default: the model's 16)"
    )
    m.add_argument(
        "--stream-horizon",
        type=int,
        default=None,
        help="stream: frames before the session restarts",
    )
    m.add_argument(
        "--tile-grid",
        default=None,
        help="tiled: ROWSxCOLS of tiles (default: round(H/224) x round(W/224))",
    )
    m.add_argument(
        "--tile-stride",
        type=int,
        default=None,
        help="tiled_full: pixels between tiles (< 224 overlaps)",
    )
    m.add_argument("--max-tile-batch", type=int, default=16, help="tiles per model call")
    o = p.add_argument_group("outputs")
    o.add_argument("--out", default=None, help="output directory")
    o.add_argument("--format", default=None, help="video format: mp4, webm, gif or none")
    o.add_argument("--fps", type=float, default=frames_default_fps, help="output frame rate")
    o.add_argument(
        "--keyframe-interval",
        type=int,
        default=0,
        help="interframe keyframe every N frames (0: none)",
    )
    o.add_argument("--ema-alpha", type=float, default=0.1, help="EMA weight of the running metrics")
    o.add_argument("--png", action="store_true", help="also write PNG frames")
    o.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="autogaze-wgpu",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="versions, backends and optional video packages")
    info.set_defaults(func=_cmd_info)

    run = sub.add_parser(
        "run", help="gazes of a video file or camera, written as videos + JSON/npz + metrics"
    )
    run.add_argument("input", help="video file, or camera / camera:N")
    _add_common(run, None)
    w = run.add_argument_group("input window")
    w.add_argument("--start", type=float, default=0.0, help="clip window start, seconds")
    w.add_argument("--end", type=float, default=None, help="clip window end, seconds")
    w.add_argument("--stride", type=int, default=1, help="keep every N-th frame")
    w.add_argument("--max-frames", type=int, default=None, help="stop after N frames")
    run.add_argument(
        "--panels", action="store_true", help="also write input | overlay | interframe panels"
    )
    run.set_defaults(func=_cmd_run, out="autogaze-out", format="mp4")

    demo = sub.add_parser(
        "demo", help="run on the bundled sample clip (offline, no arguments needed)"
    )
    _add_common(demo, 12.0)
    demo.add_argument("--frames", type=int, default=24, help="length of the sample clip")
    demo.add_argument(
        "--gif", default=None, help="where to write the demo GIF (default OUT/demo.gif)"
    )
    demo.add_argument("--gif-panel-width", type=int, default=300, help="width of each GIF panel")
    demo.set_defaults(func=_cmd_demo, out="autogaze-demo", format="auto")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from autogaze_wgpu.errors import AutoGazeError

    args = build_parser().parse_args(argv)
    if getattr(args, "format", None) not in (
        None,
        "auto",
        "mp4",
        "webm",
        "gif",
        "none",
        "mkv",
        "mov",
    ):
        print(
            f"error: --format must be mp4, webm, gif or none, got {args.format!r}", file=sys.stderr
        )
        return 2
    try:
        return args.func(args)
    except AutoGazeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
