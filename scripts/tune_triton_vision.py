"""Times the vision trunk (the causal 3x3x3 conv + ReLU, SPEC §3.3) of a tile batch on a GPU:
cuDNN's float32 convolution with TF32 off (the reference's) against the torch backend's
Triton kernel (``backends/triton_vision.py``) at several launch settings, the trunk alone and
the whole embedding (``model_embed``). Each one's trunk output is compared with the same
convolution in float64: ``err`` is the max abs difference (over the first 4 batch rows).

    python scripts/tune_triton_vision.py --model DIR [--batch 45] [--frames 16]
        [--set BLOCK_M=64,128 --set NUM_STAGES=2,3 ...]

``--set NAME=V1,V2`` varies a ``FusedVision`` setting (repeatable; integers or strings); the
grid is the product of every list.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path


def median_us(fn, reps: int) -> float:
    """Median of ``reps`` CUDA-event timings of ``fn`` (after two warm-up calls), in us."""
    import torch

    fn()
    fn()
    times = []
    for _ in range(reps):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        fn()
        e1.record()
        torch.cuda.synchronize()
        times.append(e0.elapsed_time(e1) * 1e3)
    return sorted(times)[len(times) // 2]


def main(argv=None) -> int:
    import autogaze_wgpu as ag
    import torch
    import torch.nn.functional as F
    from autogaze_wgpu.backends.triton_vision import FusedVision

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, type=Path)
    p.add_argument("--batch", type=int, default=45)
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--set", action="append", default=[], metavar="NAME=V1,V2",
                   help="a FusedVision setting to vary (repeatable)")
    p.add_argument("--reps", type=int, default=20)
    a = p.parse_args(argv)
    model = ag.AutoGaze.from_pretrained(a.model, backend="torch", device="cuda")
    be = model.backend
    S = be.config.input_img_size
    g = torch.Generator(device="cuda").manual_seed(0)
    video = torch.randn(a.batch, a.frames, 3, S, S, generator=g, device="cuda")
    seen = []
    with be.mode():  # float32, TF32 off
        be.model.embed(video, None, lambda blk, x, c: seen.append((blk, x, c)) or blk(x, c))
        blk, x, cache = seen[0]
        conv = blk.conv3d
        n = min(4, a.batch)  # the float64 check on the first rows only (it is slow)
        exact = F.relu(F.conv3d(torch.cat([cache[:n], x[:n]], 2).double(), conv.weight.double(),
                                conv.bias.double(), padding=conv.padding))
        err = lambda y: float((y[:n].double() - exact).abs().max())  # noqa: E731
        rows = [("cudnn float32", err(blk(x, cache)), median_us(lambda: blk(x, cache), a.reps),
                 median_us(lambda: be.model.embed(video), a.reps))]
        print(f"{rows[0][0]:60s} err {rows[0][1]:.2e} trunk {rows[0][2]:9.1f} us embed {rows[0][3]:9.1f} us",
              flush=True)
        extra = [(name, [int(v) if v.lstrip("-").isdigit() else v for v in values.split(",")])
                 for name, values in (kv.split("=", 1) for kv in a.set)]
        for values in itertools.product(*(v for _, v in extra)):
            cfg = {name: v for (name, _), v in zip(extra, values, strict=True)}
            fv = type("Tuned", (FusedVision,), cfg)(be)
            try:
                row = (str(cfg), err(fv.block(blk, x, cache)), median_us(lambda: fv.block(blk, x, cache), a.reps),
                       median_us(lambda: be.model.embed(video, None, fv.block), a.reps))
            except Exception as e:  # e.g. out of shared memory for a tile setting
                print(f"{cfg}: {type(e).__name__}: {str(e)[:200]}", flush=True)
                continue
            rows.append(row)
            print(f"{row[0]:60s} err {row[1]:.2e} trunk {row[2]:9.1f} us embed {row[3]:9.1f} us", flush=True)
    print(f"\n{a.batch} x {a.frames} frames, fastest trunk first:")
    for name, e, trunk, emb in sorted(rows, key=lambda r: r[2]):
        print(f"  {trunk:9.1f} us (embed {emb:9.1f} us, err {e:.2e})  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
