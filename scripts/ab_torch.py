"""A/B timing of the torch backend under alternative settings, in one process, alternating
(issue 5): each variant is a set of class attributes of ``TorchBackend``, ``DecodeState`` or
``FusedDecoder``, applied while its model is built and while it runs; the variants take
turns, round after round, so a slow spell of the machine hits them alike. Prints each
variant's median per workload, its ratio against the first variant, and whether its tokens
equal the first variant's.

    python scripts/ab_torch.py --model DIR --workloads clip,tiles45 \\
        --variant base:FusedDecoder.PDL=False --variant pdl:

(``NAME:`` alone is the code's defaults.) Workloads are the benchmark's
(``autogaze_wgpu.bench``: host pixel values in, numpy out; ``stream`` is a per-frame
median).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path


def parse_variant(text: str) -> tuple[str, dict[tuple[str, str], object]]:
    """"name:Class.ATTR=value,Class.ATTR=value" -> (name, {(Class, ATTR): value})."""
    name, _, rest = text.partition(":")
    settings = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        cls, _, attr = key.partition(".")
        if not attr or not value:
            raise SystemExit(f"bad setting {item!r} (want Class.ATTR=value)")
        settings[(cls, attr)] = ast.literal_eval(value)
    return name, settings


@contextlib.contextmanager
def applied(settings: dict):
    """The variant's class attributes, restored afterwards."""
    from autogaze_wgpu.backends import torch_backend, triton_decode

    classes = {"TorchBackend": torch_backend.TorchBackend, "DecodeState": torch_backend.DecodeState,
               "FusedDecoder": triton_decode.FusedDecoder}
    saved = []
    try:
        for (cls, attr), value in settings.items():
            if cls not in classes or not hasattr(classes[cls], attr):
                raise SystemExit(f"unknown setting {cls}.{attr}")
            saved.append((classes[cls], attr, getattr(classes[cls], attr)))
            setattr(classes[cls], attr, value)
        yield
    finally:
        for c, attr, value in reversed(saved):
            setattr(c, attr, value)


def main(argv=None) -> int:
    import autogaze_wgpu as ag
    from autogaze_wgpu.bench import _digest, bench_inputs, workload

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, type=Path)
    p.add_argument("--device", default="cuda")
    p.add_argument("--workloads", default="clip,tiles45")
    p.add_argument("--variant", action="append", required=True, help="NAME:Class.ATTR=value,...")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--json", type=Path)
    a = p.parse_args(argv)
    variants = [parse_variant(v) for v in a.variant]
    wls = a.workloads.split(",")
    proc = ag.AutoGazeProcessor.from_pretrained(a.model)
    clip, tiles = bench_inputs(proc, tiles=45 if {"tiles45", "tiles788"} & set(wls) else None)
    models = {}
    for name, settings in variants:
        with applied(settings):
            models[name] = ag.AutoGaze.from_pretrained(a.model, backend="torch", device=a.device)
    times = {(v, w): [] for v, _ in variants for w in wls}
    tokens = {}
    for w in wls:
        for name, settings in variants:  # warm-up (graph capture) and the tokens
            with applied(settings):
                out = workload(models[name], w, clip, tiles)()
            if w != "stream":
                tokens[(name, w)] = _digest(out.gazing_pos)
        for _ in range(a.rounds):
            for name, settings in variants:
                with applied(settings):
                    fn = workload(models[name], w, clip, tiles)
                    t0 = time.perf_counter()
                    out = fn()
                    sec = time.perf_counter() - t0
                times[(name, w)].append(out[0] if w == "stream" else sec)
    base = variants[0][0]
    rows = []
    print(f"{'variant':14s} {'workload':9s} {'median':>10s} {'vs ' + base:>12s}  runs (ms)  tokens")
    for w in wls:
        for name, _ in variants:
            med = statistics.median(times[(name, w)])
            ref = statistics.median(times[(base, w)])
            same = "" if w == "stream" else ("same" if tokens[(name, w)] == tokens[(base, w)] else "DIFFERENT")
            runs = " ".join(f"{t * 1e3:.1f}" for t in times[(name, w)])
            print(f"{name:14s} {w:9s} {med * 1e3:8.2f}ms {ref / med:11.3f}x  {runs}  {same}")
            rows.append({"variant": name, "workload": w, "median_s": med, "runs_s": times[(name, w)],
                         "tokens_same_as_first": same != "DIFFERENT"})
    import torch

    print(f"device: {torch.cuda.get_device_name() if a.device.startswith('cuda') else a.device}")
    if a.json:
        a.json.write_text(json.dumps({"variants": [v for v, _ in variants], "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
