"""Where a torch-backend ``generate`` spends its GPU time (issue 5): torch.profiler (CUPTI)
over one call after a warm-up, kernels grouped by name, slowest first, with launch counts.

Kernels replayed from CUDA graphs are traced too, so the count per decode step (the bound of
a graph-replayed loop of tiny kernels) is visible: the table's total kernel count divided by
the call's decode steps.

    python scripts/profile_torch.py --model DIR --workload clip [--json out.json]

``--sweep-steps 4,8,32`` first times the call at those decode steps per graph launch (the
backend's ``steps_per_sync``: fewer host reads against more no-op steps per frame).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path


def phase_times(model, video, kw) -> dict[str, float]:
    """One call's time split into the vision embedding, the frames' prefill graph launches and
    their decode-step graph launches (CUDA events around each), the rest being host time the
    GPU waits (syncs, Python, small copies): wall-clock minus the three."""
    import torch

    from autogaze_wgpu.backends.torch_backend import DecodeState

    spans: dict[str, list] = defaultdict(list)
    run, embed = DecodeState._run, type(model.backend).embed

    def timed(what, fn):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        r = fn()
        e1.record()
        spans[what].append((e0, e1))
        return r

    DecodeState._run = lambda st, key: timed(key[0], lambda: run(st, key))
    type(model.backend).embed = lambda be, v: timed("embed", lambda: embed(be, v))
    try:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        model.generate(video, **kw)
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) * 1e3
    finally:
        DecodeState._run, type(model.backend).embed = run, embed
    out = {k: sum(a.elapsed_time(b) for a, b in v) for k, v in spans.items()}
    out = {"wall": wall, **out, "launches": {k: len(v) for k, v in spans.items()}}
    out["host_gaps"] = wall - sum(v for k, v in out.items() if k not in ("wall", "launches"))
    return out


def attention_traffic(out, cfg) -> dict[str, float]:
    """What the decode steps' attention has to read, from one call's output (the floor of
    issue 5's 45-tile figure, docs/benchmarks.md): every step that makes at least one real
    token of a row (ceil(real gazes / K) steps a frame) reads the row's float32 keys and
    values for every layer. ``laid_out_GB``: the keys of the sequence as the cache holds it
    (each frame's vision tokens and all its ``num_gazing_each_frame`` slots, pads masked but
    read); ``valid_GB``: only the keys that are not masked (what any float32 implementation
    has to read, its cache compacted). ``prefill_scores``: the prefill's query-key products
    over valid keys (vision tokens x the keys each sees), every head and layer."""
    import numpy as np

    dec = cfg.decoder
    k = dec.num_multi_token_pred
    vis = cfg.num_patches_per_side**2
    per_key = 2 * dec.num_attention_heads * dec.head_dim * 4 * dec.num_hidden_layers  # K and V, f32
    real = np.asarray(out.num_real_gazes())  # (B, T)
    slots = np.asarray(out.num_gazing_each_frame)  # (T,)
    laid_out = valid = scores = 0
    for row in real:
        before_laid = before_valid = 0  # keys of the earlier frames
        for n, n_slots in zip(row.tolist(), slots.tolist()):
            steps = -(-n // k)
            # step s reads the frame's vision tokens and its tokens up to the step's own K
            within = steps * vis + k * steps * (steps + 1) // 2
            laid_out += steps * before_laid + within
            valid += steps * before_valid + within
            scores += vis * before_valid + vis * (vis + 1) // 2
            before_laid += vis + n_slots
            before_valid += vis + n
    heads_layers = dec.num_attention_heads * dec.num_hidden_layers
    return {"laid_out_GB": laid_out * per_key / 1e9, "valid_GB": valid * per_key / 1e9,
            "prefill_scores": float(scores * heads_layers)}


def host_input_times(model, host_video, kw, repeat: int = 3) -> dict[str, float]:
    """What a call with host (numpy) pixel values adds to one with the same values already
    on the GPU (ms, medians): the checks on the host (``as_pixel_values`` without a device),
    a plain copy to the GPU from pageable memory, what the model does (``as_pixel_values``
    with its device: the staged copy, then the checks on the GPU), and the two calls' walls."""
    import statistics

    import torch

    from autogaze_wgpu.inputs import as_pixel_values

    dev = model.backend.device

    def timed(fn):
        times = []
        for _ in range(repeat):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            r = fn()
            torch.cuda.synchronize()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times), r

    check, checked = timed(lambda: as_pixel_values(host_video))
    copy, on_gpu = timed(lambda: torch.from_numpy(checked).to(dev))
    staged, staged_gpu = timed(lambda: as_pixel_values(host_video, dev))
    assert torch.equal(staged_gpu, on_gpu)
    wall_host, _ = timed(lambda: model.generate(host_video, **kw))
    wall_gpu, _ = timed(lambda: model.generate(on_gpu, **kw))
    return {"host_checks": check, "pageable_copy": copy, "staged_copy_and_gpu_checks": staged,
            "wall_host_input": wall_host, "wall_gpu_input": wall_gpu, "MB": host_video.nbytes / 1e6}


def main(argv=None) -> int:
    import torch
    from torch.profiler import ProfilerActivity, profile

    import autogaze_wgpu as ag
    from autogaze_wgpu.bench import bench_inputs

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, type=Path)
    p.add_argument("--workload", default="clip", choices=["clip", "no-stop", "clip788", "tiles45", "tiles788"])
    p.add_argument("--device", default="cuda")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--sweep-steps", default="", help="comma-separated steps_per_sync values to time first")
    a = p.parse_args(argv)

    model = ag.AutoGaze.from_pretrained(a.model, backend="torch", device=a.device)
    proc = ag.AutoGazeProcessor.from_pretrained(a.model)
    clip, tiles = bench_inputs(proc, tiles=45 if a.workload.startswith("tiles") else None)
    video = torch.from_numpy(clip if tiles is None else tiles).to(a.device)
    kw = {"no-stop": {"gazing_ratio": 0.75}, "clip788": {"gazing_ratio": 0.186},
          "tiles788": {"gazing_ratio": 0.186}}.get(a.workload, {})
    default_sps = model.backend.steps_per_sync
    for sps in [int(v) for v in a.sweep_steps.split(",") if v]:
        m = ag.AutoGaze.from_pretrained(a.model, backend="torch", device=a.device)
        m.backend.steps_per_sync = sps
        m.generate(video, **kw)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(3):
            m.generate(video, **kw)
        torch.cuda.synchronize()
        print(f"steps_per_sync={sps}: {(time.perf_counter() - t0) / 3 * 1e3:.1f} ms per call", flush=True)
        m.close()
    print(f"profiling at the default steps_per_sync={default_sps}")
    out = model.generate(video, **kw)  # warm-up: graph capture, allocations
    torch.cuda.synchronize()
    phases = phase_times(model, video, kw)
    print("phases (ms; GPU time between CUDA events, host_gaps = wall - the rest): "
          + ", ".join(f"{k} {v:.2f}" for k, v in phases.items() if k != "launches")
          + f"; graph launches {phases['launches']}")
    host = host_input_times(model, clip if tiles is None else tiles, kw)
    print("host input (ms, median of 3): " + ", ".join(f"{k} {v:.1f}" for k, v in host.items()))
    acts = [ProfilerActivity.CPU, ProfilerActivity.CUDA]
    with profile(activities=acts) as prof:
        out = model.generate(video, **kw)
        torch.cuda.synchronize()
    kernels: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            k = kernels[e.name]
            k[0] += 1
            k[1] += e.device_time
    rows = sorted(((n, c, us) for n, (c, us) in kernels.items()), key=lambda r: -r[2])
    total_us = sum(r[2] for r in rows)
    count = sum(r[1] for r in rows)
    steps = sum(-(-int(n) // model.config.decoder.num_multi_token_pred) for n in out.num_gazing_each_frame)
    print(f"device {torch.cuda.get_device_name()}; workload {a.workload}; {out.batch_size} rows, "
          f"{int(out.num_gazing_each_frame.sum())} slots per row, ~{steps} selection steps")
    print(f"GPU kernel time {total_us / 1e3:.2f} ms over {count} kernel launches "
          f"(~{count / max(steps, 1):.0f} per step)")
    print(f"{'kernel':90s} {'n':>7s} {'total ms':>9s} {'us/launch':>9s} {'share':>6s}")
    for name, n, us in rows[: a.top]:
        print(f"{name[:90]:90s} {n:7d} {us / 1e3:9.3f} {us / n:9.2f} {100 * us / total_us:5.1f}%")
    traffic = attention_traffic(out.to_numpy(), model.config)
    attn_ms = sum(us for name, _, us in rows if name == "_attention") / 1e3
    flash_ms = sum(us for name, _, us in rows if name == "_flash_attention") / 1e3
    print(f"the steps' attention reads >= {traffic['laid_out_GB']:.1f} GB as the cache lays it out "
          f"({traffic['valid_GB']:.1f} GB of unmasked keys)"
          + (f"; `_attention` {attn_ms:.1f} ms: {traffic['laid_out_GB'] / attn_ms:.2f} TB/s" if attn_ms else ""))
    print(f"the prefill's attention: {traffic['prefill_scores'] / 1e9:.2f} G query-key scores over unmasked keys"
          + (f"; `_flash_attention` {flash_ms:.1f} ms: {traffic['prefill_scores'] / flash_ms / 1e9:.2f} T scores/s"
             if flash_ms else ""))
    if a.json:
        a.json.write_text(json.dumps({"workload": a.workload, "kernel_us": total_us, "launches": count,
                                      "steps": steps, "phases_ms": phases, "host_input_ms": host, "kernels": rows,
                                      "attention_traffic": traffic}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
