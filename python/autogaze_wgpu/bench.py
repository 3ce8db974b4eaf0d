"""Benchmarks: ``python -m autogaze_wgpu.bench`` times every available backend on the same
machine in one run and prints medians and ratios against the reference (eager torch).

Workloads (SPEC sizes, 224x224 frames):
  clip      1 video x 16 frames, gazing_ratio 0.75 + task_loss_requirement 0.7 (defaults)
  no-stop   the same clip, gazing_ratio 0.75 only (16 x 198 tokens)
  clip788   the same clip, gazing_ratio 0.186 only (16 x 49 = 784 tokens): the size of the
            default clip of NVIDIA's own timing (788 slots with its random weights), which
            this fixture model's task-loss head stops far later (2098 slots)
  tiles45   45 tiles x 16 frames (a 1080p frame in AnyRes tiles), defaults
  tiles788  the same tiles, gazing_ratio 0.186 only (16 x 49 slots a tile, as clip788): the
            tile batch of NVIDIA's own timing ran about its clip's decode steps (0.86 s
            against the clip's 0.81 s, where 16 x 198 slots took 2.6 s)
  stream    streaming session, per-frame latency (median over 16 frames)
  score     the teacher-forced scores (``score``) of the clip's default gazes
  video1080 ``model(frames)`` on 16 uint8 1920x1080 frames in "resize" mode, no confidence:
            the product path, processor included (host PIL for reference/torch, the GPU for
            wgpu)

Timings are wall-clock around the public call (input on the host, outputs back as numpy),
after one warm-up call, with the device synchronised by the call's own readback.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np


def _median_time(fn: Callable[[], object], repeat: int) -> tuple[float, object]:
    out = fn()  # warm-up (graph capture, pipeline compilation, allocations)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


# Names the benchmark accepts besides the backends: a backend with options.
BACKEND_VARIANTS = {
    "torch-eager": ("torch", {"decode_kernels": "torch"}),
    "torch-ieee": ("torch", {"decode_kernels": "triton-ieee"}),
}


def device_name(backend: str, model) -> str:
    if backend in ("torch", "reference") or backend in BACKEND_VARIANTS:
        import torch

        dev = model.backend.device
        return torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU ({platform.processor() or platform.machine()})"
    return getattr(model.backend, "adapter_name", backend)


def workload(model, wl: str, clip, tiles, video=None) -> Callable[[], object]:
    """The call a workload times. It returns the GazeOutput ("score": the ScoreOutput,
    "video1080": the VideoResult); "stream" returns (median per-frame latency, the
    per-frame GazeOutputs)."""
    if wl == "score":
        gazes = model.generate(clip, gazing_ratio=0.75, task_loss_requirement=0.7)
        return lambda: model.score(clip, gazes)
    if wl == "video1080":
        return lambda: model(video, mode="resize", gazing_ratio=0.75, task_loss_requirement=0.7, confidence=False)
    if wl == "clip":
        return lambda: model.generate(clip, gazing_ratio=0.75, task_loss_requirement=0.7)
    if wl == "no-stop":
        return lambda: model.generate(clip, gazing_ratio=0.75)
    if wl == "clip788":
        return lambda: model.generate(clip, gazing_ratio=0.186)
    if wl == "tiles45":
        return lambda: model.generate(tiles, gazing_ratio=0.75, task_loss_requirement=0.7)
    if wl == "tiles788":
        return lambda: model.generate(tiles, gazing_ratio=0.186)
    if wl == "stream":
        def fn():
            s = model.stream(batch_size=1, gazing_ratio=0.75, task_loss_requirement=0.7)
            per, outs = [], []
            for t in range(clip.shape[1]):
                t0 = time.perf_counter()
                outs.append(s.step(clip[:, t : t + 1]))
                per.append(time.perf_counter() - t0)
            return statistics.median(per), outs
        return fn
    raise SystemExit(f"unknown workload {wl!r}")


def bench_inputs(proc, frames: int = 16, tiles: int | None = 45) -> tuple[np.ndarray, np.ndarray | None]:
    """The benchmark's pixel values: the clip (1, frames, 3, 224, 224) and the tile batch
    (tiles, frames, ...; None when ``tiles`` is None). Fixed seeds (7, 8), so every script
    (bench, profile, divergence, fast-mode agreement) times the same video."""
    from autogaze_wgpu.testing import synthetic_video

    clip = proc(synthetic_video(frames, 224, 224, seed=7))
    batch = proc(synthetic_video(frames, 224, 224, seed=8, batch=tiles)) if tiles else None
    return clip, batch


def run(model_dir: Path, backends: list[str], device: str | None, repeat: int, workloads: list[str]) -> list[dict]:
    import autogaze_wgpu as ag

    proc = ag.AutoGazeProcessor.from_pretrained(model_dir)
    clip, tiles = bench_inputs(proc, tiles=45 if {"tiles45", "tiles788"} & set(workloads) else None)
    video = None
    if "video1080" in workloads:
        from autogaze_wgpu.testing import synthetic_video

        video = synthetic_video(16, 1080, 1920, seed=9)
    rows = []
    for name in backends:
        backend, kw = BACKEND_VARIANTS.get(name, (name, {}))
        if backend in ("torch", "reference") and device:
            kw = {**kw, "device": device}
        try:
            model = ag.AutoGaze.from_pretrained(model_dir, backend=backend, **kw)
        except ag.DeviceError as e:  # (e.g. no Vulkan adapter) the other backends still run
            print(f"  {name:9s} skipped: {e}", flush=True)
            rows.append({"backend": name, "device": None, "workload": None, "seconds": None, "slots": None,
                         "tokens_sha": None, "skipped": str(e)})
            continue
        dev = device_name(name, model)
        for wl in workloads:
            fn = workload(model, wl, clip, tiles, video)
            sec, out = _median_time(fn, repeat)
            if wl == "stream":
                sec = out[0]  # the median per-frame latency of the last run
                slots = None
            elif wl == "score":  # scores are floats: no digest to compare
                slots, tokens = int(out.gaze_probs.size), None
            elif wl == "video1080":
                slots = int(sum(int(f.num_slots.sum()) for f in out))
                tokens = np.concatenate([f.fixations["token"] for f in out])
            else:
                slots = int(out.num_gazing_each_frame.sum()) * out.batch_size
                tokens = out.gazing_pos
            rows.append({"backend": name, "device": dev, "workload": wl, "seconds": sec, "slots": slots,
                         "tokens_sha": None if wl == "stream" or tokens is None else _digest(tokens)})
            print(f"  {name:9s} {wl:8s} {sec * 1e3:10.2f} ms  slots={slots}", flush=True)
    return rows


def _digest(x: np.ndarray) -> str:
    import hashlib

    return hashlib.sha256(np.ascontiguousarray(x).tobytes()).hexdigest()[:12]


def print_table(rows: list[dict]) -> None:
    base = {r["workload"]: r["seconds"] for r in rows if r["backend"] == "reference"}
    skipped = [r for r in rows if r.get("skipped")]
    rows = [r for r in rows if not r.get("skipped")]
    print(f"\n{'backend':10s} {'workload':9s} {'median':>11s} {'vs reference':>13s} {'slots':>7s} tokens")
    for r in rows:
        # (no reference row for the workload: no ratio)
        ratio = f"{base[r['workload']] / r['seconds']:12.1f}x" if r["workload"] in base else f"{'-':>13s}"
        ref_sha = next((x["tokens_sha"] for x in rows if x["backend"] == "reference" and x["workload"] == r["workload"]), None)
        same = "" if r["tokens_sha"] is None or ref_sha is None else ("same as reference" if r["tokens_sha"] == ref_sha else "DIFFERENT")
        print(f"{r['backend']:10s} {r['workload']:9s} {r['seconds'] * 1e3:9.2f}ms {ratio} {r['slots'] or ''!s:>7s} {same}")
    print(f"devices: {sorted({r['backend'] + ': ' + r['device'] for r in rows})}")
    for r in skipped:
        print(f"skipped: {r['backend']} ({r['skipped']})")


def main(argv=None) -> int:
    import autogaze_wgpu as ag

    p = argparse.ArgumentParser(prog="python -m autogaze_wgpu.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="model dir (default: a random-weight model in the released format)")
    p.add_argument("--backends", default=",".join(ag.available_backends()),
                   help="comma-separated; also 'torch-eager' (the torch backend with its eager decode step) "
                        "and 'torch-ieee' (its Triton step with every product an FMA, no 3xTF32)")
    p.add_argument("--device", help="torch device for the reference/torch backends (default: cuda if available)")
    p.add_argument("--workloads", default="clip,no-stop,clip788,tiles45,stream,score,video1080")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--json", help="write the rows to this file")
    args = p.parse_args(argv)
    if args.model:
        model_dir = Path(args.model)
    else:
        from autogaze_wgpu.testing import random_model

        model_dir = random_model(Path(tempfile.mkdtemp()) / "model", seed=0)
    device = args.device
    if device is None:
        try:
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
        except ImportError:
            device = None
    backends = [b for b in args.backends.split(",") if b]
    if "reference" in backends:  # the baseline goes first
        backends.remove("reference")
        backends.insert(0, "reference")
    print(f"model: {model_dir}; backends: {backends}; device: {device}; repeat: {args.repeat}")
    rows = run(model_dir, backends, device, args.repeat, args.workloads.split(","))
    print_table(rows)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
