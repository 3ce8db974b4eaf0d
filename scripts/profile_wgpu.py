"""GPU time per kernel of one wgpu ``generate`` call, from timestamp queries (issue 3).

Every dispatch is bracketed by timestamps written inside the compute pass (adapters with
``TIMESTAMP_QUERY_INSIDE_PASSES``: Vulkan, Metal, DX12 natively; not browser WebGPU), so a
dispatch's time includes the barrier before it, as in the real command stream. Prints the
kernels slowest first with dispatch counts and microseconds per dispatch, and the GPU sum
against the call's wall-clock.

    python scripts/profile_wgpu.py --model DIR --workload clip [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv=None) -> int:
    import autogaze_wgpu as ag
    import numpy as np
    from autogaze_wgpu.backends.wgpu import _ratio_for_budget
    from autogaze_wgpu.bench import bench_inputs
    from autogaze_wgpu.inputs import gazing_budget, resolve_gazing_params

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, type=Path)
    p.add_argument("--workload", default="clip", choices=["clip", "no-stop", "tiles45"])
    p.add_argument("--top", type=int, default=20)
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args(argv)

    model = ag.AutoGaze.from_pretrained(a.model, backend="wgpu")
    cfg = model.config
    proc = ag.AutoGazeProcessor.from_pretrained(a.model)
    clip, tiles = bench_inputs(proc, tiles=45 if a.workload == "tiles45" else None)
    video = clip if tiles is None else tiles
    ratio, req = (0.75, None) if a.workload == "no-stop" else (None, None)
    ratios, req = resolve_gazing_params(cfg, ratio, req, video.shape[1])
    V = cfg.num_vision_tokens_each_frame
    ratios = [_ratio_for_budget(gazing_budget(r, V), V) for r in ratios]
    x = np.ascontiguousarray(video, dtype=np.float32)
    engine = model.backend.engine
    engine.generate(x, ratios, req)  # warm-up: pipelines, workspace
    prof = engine.profile(x, ratios, req)

    gpu = prof["gpu_us"]
    print(f"adapter: {engine.adapter_name}; workload {a.workload}; {prof['dispatches']} dispatches, "
          f"{prof['submits']} submit(s)")
    print(f"GPU time (sum of dispatches) {gpu / 1e3:.2f} ms; CPU recording {prof['record_us'] / 1e3:.2f} ms; "
          f"wall-clock of the profiled call {prof['total_us'] / 1e3:.2f} ms")
    print(f"{'kernel':100s} {'n':>6s} {'total ms':>9s} {'us/disp':>8s} {'share':>6s}")
    for name, n, us in prof["kernels"][: a.top]:
        print(f"{name[:100]:100s} {n:6d} {us / 1e3:9.3f} {us / n:8.1f} {100 * us / gpu:5.1f}%")
    if a.json:
        a.json.write_text(json.dumps({"adapter": engine.adapter_name, "workload": a.workload, **prof}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
