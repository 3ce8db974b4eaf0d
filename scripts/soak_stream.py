"""Soak benchmark for long streams (issue 6; not a CI test).

Streams thousands of frames through ``AutoGaze.stream`` and reports, per window of frames,
the process's resident memory, the GPU memory this process holds (torch's allocator for
reference/torch on CUDA; ``nvidia-smi`` per-process for wgpu when it exists) and per-frame
latency percentiles. A bounded ``horizon`` should give flat memory and steady latency.

    python scripts/soak_stream.py --model DIR --backend wgpu --frames 5000 --horizon 16
    python scripts/soak_stream.py --model DIR --backend torch --device cuda --json out.json

Frames: a 64-frame synthetic 224x224 clip (moving disk on texture), preprocessed once and
cycled, so the numbers measure the session, not frame decoding.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path


def rss_mib() -> float:
    """Resident set size of this process (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def gpu_mib(model) -> float | None:
    """GPU memory held by this process, or None when it cannot be measured."""
    dev = getattr(model.backend, "device", None)
    if dev is not None and getattr(dev, "type", "") == "cuda":
        import torch

        return torch.cuda.memory_reserved(dev) / 2**20
    if model.backend_name == "wgpu" and shutil.which("nvidia-smi"):
        out = subprocess.run(
            ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, check=False,
        ).stdout
        for line in out.splitlines():
            pid, _, mem = line.partition(",")
            if pid.strip() == str(os.getpid()):
                return float(mem)
        return 0.0  # Vulkan-only processes may not be listed
    return None


def main(argv=None) -> int:
    import autogaze_wgpu as ag
    import numpy as np
    from autogaze_wgpu.testing import synthetic_video

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, type=Path)
    p.add_argument("--backend", default="auto")
    p.add_argument("--device", default=None)
    p.add_argument("--frames", type=int, default=5000)
    p.add_argument("--horizon", default="16", help="frames between resets, or 'none' (unbounded)")
    p.add_argument("--window", type=int, default=500, help="frames per reported row")
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args(argv)
    horizon = None if a.horizon.lower() == "none" else int(a.horizon)

    kw = {"device": a.device} if a.device else {}
    model = ag.AutoGaze.from_pretrained(a.model, backend=a.backend, **kw)
    proc = ag.AutoGazeProcessor.from_pretrained(a.model)
    clip = proc(synthetic_video(64, 224, 224, seed=3))  # (1, 64, 3, 224, 224)
    session = model.stream(horizon=horizon)
    print(f"backend {model.backend_name}, horizon {horizon}, {a.frames} frames", file=sys.stderr)

    rows, times, tokens = [], [], 0
    t_start = time.perf_counter()
    for i in range(a.frames):
        t0 = time.perf_counter()
        try:
            out = session.step(clip[:, i % clip.shape[1] : i % clip.shape[1] + 1])
        except ag.AutoGazeError as e:
            print(f"frame {i}: {type(e).__name__}: {e}", file=sys.stderr)
            break
        times.append(time.perf_counter() - t0)
        tokens += int(out.num_real_gazes().sum())
        if (i + 1) % a.window == 0 or i + 1 == a.frames:
            w = np.array(times[-a.window :]) * 1e3
            row = {
                "frames": i + 1,
                "rss_mib": round(rss_mib(), 1),
                "gpu_mib": gpu_mib(model),
                "p50_ms": round(float(np.percentile(w, 50)), 3),
                "p99_ms": round(float(np.percentile(w, 99)), 3),
                "max_ms": round(float(w.max()), 3),
                "real_gazes_per_frame": round(tokens / (i + 1), 1),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    summary = {
        "backend": model.backend_name,
        "device": getattr(model.backend, "adapter_name", None) or str(getattr(model.backend, "device", "")),
        "horizon": horizon,
        "frames": len(times),
        "seconds": round(time.perf_counter() - t_start, 2),
        "median_ms": round(statistics.median(times) * 1e3, 3) if times else None,
        "rows": rows,
    }
    if a.json:
        a.json.write_text(json.dumps(summary, indent=2))
    print(json.dumps({k: v for k, v in summary.items() if k != "rows"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
