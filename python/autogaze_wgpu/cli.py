"""The ``autogaze-wgpu`` command line (also ``python -m autogaze_wgpu``)."""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence


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
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    import numpy as np

    import autogaze_wgpu as ag
    from autogaze_wgpu.testing import random_model, synthetic_video

    if args.model:
        model_dir = Path(args.model)
        note = f"model: {model_dir}"
    else:
        model_dir = random_model(Path(tempfile.mkdtemp(prefix="autogaze-demo-")) / "model", seed=0)
        note = (
            "model: RANDOM weights in the released format, generated locally (no real weights are "
            "available offline): the gazes below exercise the full pipeline but have no visual meaning"
        )
    print(note)
    model = ag.AutoGaze.from_pretrained(model_dir, backend=args.backend)
    proc = ag.AutoGazeProcessor.from_pretrained(model_dir)
    frames = synthetic_video(num_frames=args.frames, height=360, width=640, seed=1)
    pixel_values = proc(frames)
    print(f"video: synthetic {args.frames} frames 640x360 -> pixel_values {tuple(pixel_values.shape)}")
    t0 = time.perf_counter()
    out = model.generate(pixel_values, gazing_ratio=args.gazing_ratio, task_loss_requirement=args.task_loss_requirement)
    dt = time.perf_counter() - t0
    real = out.num_real_gazes()[0]
    V = model.config.num_vision_tokens_each_frame
    print(f"backend: {model.backend_name}; generate took {dt:.2f} s")
    print("frame  slots  gazes  token-ratio  per-scale gazes (2x2, 4x4, 7x7, 14x14)")
    for t in range(out.num_frames):
        per_scale = [int(m[0, t].sum()) for m in out.gazing_mask]
        print(f"{t:5d}  {out.num_gazing_each_frame[t]:5d}  {real[t]:5d}  {real[t] / V:11.3f}  {per_scale}")
    print(f"total: {int(real.sum())} gazes of {V * out.num_frames} tokens ({real.sum() / (V * out.num_frames):.1%})")
    return 0 if np.all(real >= 1) else 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="autogaze-wgpu", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="versions and available backends")
    info.set_defaults(func=_cmd_info)
    demo = sub.add_parser("demo", help="run the model on a synthetic clip (offline, no arguments needed)")
    demo.add_argument("--model", help="model dir or repo id (default: a random-weight model made locally)")
    demo.add_argument("--backend", default="reference")
    demo.add_argument("--frames", type=int, default=8)
    demo.add_argument("--gazing-ratio", type=float, default=0.75)
    demo.add_argument("--task-loss-requirement", type=float, default=0.7)
    demo.set_defaults(func=_cmd_demo)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    from autogaze_wgpu.errors import AutoGazeError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except AutoGazeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
