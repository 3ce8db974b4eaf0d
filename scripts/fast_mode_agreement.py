"""Token agreement and speed of the torch backend's fast modes against its float32 mode.

Runs the benchmark workloads of ``python -m autogaze_wgpu.bench`` (clip, no-stop, tiles45,
stream) on one device with ``backend="torch"`` at ``precision="float32"`` (parity: the
reference's tokens, checked by the fixture suite and the benchmark) and at each fast mode, and
prints for every workload:

  median      wall-clock of the public call after one warm-up (stream: per-frame latency)
  speed-up    float32's median / this mode's
  rows exact  batch rows whose whole token sequence (every frame, pads included) equals float32's
  tokens      % of equal tokens, slot by slot within each frame (a slot only one side has counts
              as unequal)
  gaze IoU    mean over rows and frames of |A & B| / |A | B| of the real (non-pad) gazes

    python scripts/fast_mode_agreement.py --device cuda --json agreement.json

On CPU "tf32" is the same arithmetic as float32 (TF32 is an NVIDIA tensor-core format).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np
from autogaze_wgpu.bench import _median_time, bench_inputs, workload


def frame_tokens(out) -> list[np.ndarray]:
    """Per-frame ids (B, n_t) of a GazeOutput, or of a stream's per-frame outputs."""
    if isinstance(out, list):
        return [np.asarray(o.frame_tokens[0]) for o in out]
    return [np.asarray(t) for t in out.frame_tokens]


def agreement(base: list[np.ndarray], fast: list[np.ndarray], pad: int) -> dict:
    B = base[0].shape[0]
    rows_exact = np.ones(B, dtype=bool)
    equal = total = 0
    ious = []
    for a, c in zip(base, fast):
        m, n = min(a.shape[1], c.shape[1]), max(a.shape[1], c.shape[1])
        eq = a[:, :m] == c[:, :m]
        equal += int(eq.sum())
        total += B * n
        rows_exact &= eq.all(1) & (a.shape[1] == c.shape[1])
        for b in range(B):
            sa, sc = set(a[b][a[b] != pad].tolist()), set(c[b][c[b] != pad].tolist())
            ious.append(len(sa & sc) / len(sa | sc) if sa | sc else 1.0)
    return {
        "rows_exact": int(rows_exact.sum()),
        "rows": B,
        "tokens_equal": equal / total if total else 1.0,
        "gaze_iou": float(np.mean(ious)),
    }


def main(argv=None) -> int:
    import autogaze_wgpu as ag

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="model dir (default: a random-weight model in the released format)")
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--precisions", default="tf32,bf16", help="fast modes to compare with float32")
    p.add_argument("--workloads", default="clip,no-stop,tiles45,stream")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--frames", type=int, default=16, help="clip length (the benchmark's: 16)")
    p.add_argument("--tiles", type=int, default=45, help="batch of the tiles45 workload")
    p.add_argument("--small-ops", choices=("auto", "on", "off"), default="auto",
                   help="the torch backend's products+sums path for few rows (auto: on for "
                        "float32 on CUDA only)")
    p.add_argument("--json", help="write the rows to this file")
    args = p.parse_args(argv)

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.model:
        model_dir = Path(args.model)
    else:
        from autogaze_wgpu.testing import random_model

        model_dir = random_model(Path(tempfile.mkdtemp()) / "model", seed=0)
    workloads = [w for w in args.workloads.split(",") if w]
    precisions = ["float32"] + [x for x in args.precisions.split(",") if x and x != "float32"]
    proc = ag.AutoGazeProcessor.from_pretrained(model_dir)
    clip, tiles = bench_inputs(proc, args.frames, args.tiles if "tiles45" in workloads else None)
    dev_name = torch.cuda.get_device_name(device) if device.startswith("cuda") else f"CPU ({platform.machine()})"
    print(f"model: {model_dir}; device: {device} ({dev_name}); torch {torch.__version__}; "
          f"repeat: {args.repeat}; frames: {args.frames}; tiles: {args.tiles}", flush=True)

    rows = []
    for wl in workloads:
        base_sec = base_tokens = None
        for prec in precisions:
            model = ag.AutoGaze.from_pretrained(model_dir, backend="torch", device=device, precision=prec)
            if args.small_ops != "auto":
                model.backend.small_ops = args.small_ops == "on"
            sec, out = _median_time(workload(model, wl, clip, tiles), args.repeat)
            if wl == "stream":
                sec, out = out  # median per-frame latency of the last run, its outputs
            tokens = frame_tokens(out)
            if prec == "float32":
                base_sec, base_tokens = sec, tokens
            row = {"workload": wl, "precision": prec, "device": dev_name, "seconds": sec,
                   "speedup": base_sec / sec, "small_ops": model.backend.small_ops,
                   **agreement(base_tokens, tokens, model.config.pad_token_id)}
            rows.append(row)
            print(f"  {wl:8s} {prec:8s} {sec * 1e3:10.2f} ms", flush=True)
            del model

    print(f"\n{'workload':9s} {'precision':9s} {'median':>11s} {'speed-up':>9s} {'rows exact':>11s} "
          f"{'tokens':>8s} {'gaze IoU':>9s}")
    for r in rows:
        print(f"{r['workload']:9s} {r['precision']:9s} {r['seconds'] * 1e3:9.2f}ms {r['speedup']:8.2f}x "
              f"{r['rows_exact']:>5d}/{r['rows']:<5d} {100 * r['tokens_equal']:7.2f}% {r['gaze_iou']:9.4f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
