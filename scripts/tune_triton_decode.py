"""Times the torch backend's fused decoder kernels (``backends/triton_decode.py``) on a GPU
for several launch configurations: the time of one decode step and of one frame's prefill
(``DecodeState._prefill``: a CUDA graph of the state restore + the launches, minus the
restore alone) and each kernel's time (torch.profiler).

    python scripts/tune_triton_decode.py --model DIR [--batch 1,45] [--cache-len 3000]
        [--prefill-attn 4,8,16] [--prefill-q 32,64] [--set PREFILL_BLOCK_R=32,64 ...]

``--set NAME=V1,V2`` varies any other ``FusedDecoder`` setting (repeatable; integers, or
strings such as ``PREFILL_ATTN_PRECISION=ieee,tf32x3``); the grid is the product of every list.

Each configuration's step and prefill outputs are also compared with the eager torch path's
on the same state (cuBLAS float32, TF32 off: the reference's arithmetic): ``dlogits`` /
``dtl`` / ``dk`` are the max abs differences of the logits, the task losses and the last
layer's keys written.

The state is mid-frame (nothing chosen yet, no task-loss stop), so every step runs all its
kernels; the cache holds ``--cache-len`` keys.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from collections import defaultdict
from pathlib import Path


def against_eager(st, fn, restore, L: int) -> str:
    """Max abs differences between what ``fn`` (a fused step or prefill from the restored
    state) writes and what the eager torch path writes from the same state."""
    import torch

    def outputs():
        T = int(st.cache_len) - L
        return st.logits.clone(), st.task_loss.clone(), st.k_cache[-1][:, :, L : L + T].clone()

    restore()
    fn()
    fused_out = outputs()
    fused, st.fused, st.kv_len = st.fused, None, st.cap
    try:
        restore()
        fn()
        eager_out = outputs()
    finally:
        st.fused = fused
    torch.cuda.synchronize()
    if fused_out[2].shape != eager_out[2].shape:
        return f"(eager wrote {eager_out[2].shape[2]} slots, fused {fused_out[2].shape[2]})"
    d = [float((a - b).abs().max()) if a.numel() else 0.0 for a, b in zip(fused_out, eager_out)]
    return f"dlogits {d[0]:.2e} dtl {d[1]:.2e} dk {d[2]:.2e} (|logits| {float(eager_out[0].abs().max()):.1f})"


def main(argv=None) -> int:
    import autogaze_wgpu as ag
    import torch
    from autogaze_wgpu.backends.triton_decode import FusedDecoder
    from autogaze_wgpu.reference.modeling import rope_cos_sin
    from torch.profiler import ProfilerActivity, profile

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, type=Path)
    p.add_argument("--batch", default="1,45")
    p.add_argument("--cache-len", type=int, default=3000)
    p.add_argument("--capacity", type=int, default=6656)
    p.add_argument("--block-n", default="16,32")
    p.add_argument("--attn", default="2x64,1x128,4x64", help="blocks per split x keys per block")
    p.add_argument("--warps", default="2,4")
    p.add_argument("--prefill-attn", default="8", help="blocks of keys per split of the prefill's attention")
    p.add_argument("--prefill-q", default="32",
                   help="queries per block of the prefill's attention (split-K or, for a large batch, flash)")
    p.add_argument("--set", action="append", default=[], metavar="NAME=V1,V2",
                   help="another FusedDecoder setting to vary (repeatable)")
    p.add_argument("--reps", type=int, default=200)
    a = p.parse_args(argv)
    model = ag.AutoGaze.from_pretrained(a.model, backend="torch", device="cuda", decode_kernels="triton")
    be = model.backend
    errs = be.fused.product_errors()
    print("products' max abs error against float64 (x @ Wqkv^T, 450 rows): "
          + ", ".join(f"{k} {v:.2e}" for k, v in errs.items()), flush=True)
    g = torch.Generator(device="cuda").manual_seed(0)
    for B in [int(x) for x in a.batch.split(",")]:
        extra = [(name, [int(v) if v.lstrip("-").isdigit() else v for v in values.split(",")])
                 for name, values in (kv.split("=", 1) for kv in a.set)]
        grid = itertools.product(a.block_n.split(","), a.attn.split(","), a.warps.split(","),
                                 a.prefill_attn.split(","), a.prefill_q.split(","),
                                 itertools.product(*(values for _, values in extra)))
        for bn, attn, nw, pattn, pq, more in grid:
            blocks, abn = (int(x) for x in attn.split("x"))
            cfg = {"BLOCK_N": int(bn), "FEW_ROWS_BLOCK_N": int(bn), "ATTN_BLOCKS": blocks, "FEW_ROWS_ATTN_BLOCKS": blocks, "ATTN_BLOCK_N": abn,
                   "FEW_ROWS_ATTN_BLOCK_N": abn,
                   "NUM_WARPS": int(nw), "PREFILL_ATTN_BLOCKS": int(pattn), "PREFILL_BLOCK_Q": int(pq),
                   "BATCH_PREFILL_BLOCK_Q": int(pq), "BATCH_PREFILL_FLASH_BLOCK_Q": int(pq)}
            cfg.update({name: v for (name, _), v in zip(extra, more, strict=True)})
            fused = type("Tuned", (FusedDecoder,), cfg)(be)
            be.fused = fused
            st = be.acquire_state(B, a.capacity)
            L = a.cache_len
            st.k_cache.normal_(generator=g)
            st.v_cache.normal_(generator=g)
            st.key_mask[:, :L] = True
            st.logits.normal_(generator=g)
            st.task_loss.fill_(1.0)
            st.decode_pos.copy_(torch.arange(L - st.K, L, device="cuda")[None].expand(B, st.K))
            cos, sin = rope_cos_sin(be.model.gaze_decoder.model.inv_freq, st.decode_pos)
            st.rope_cos.copy_(cos)
            st.rope_sin.copy_(sin)
            for t in (st.chosen, st.finished, st.n_frame, st.done):
                t.zero_()
            st.first.fill_(False)
            st.budget.fill_(265)
            st.has_requirement.fill_(False)
            st.cache_len.fill_(L)
            # the prefill's tokens at slots L.. (positions, vision tokens, key mask)
            pos = torch.arange(L, L + st.prefill_len, device="cuda")[None].expand(B, -1)
            cos, sin = rope_cos_sin(be.model.gaze_decoder.model.inv_freq, pos)
            st.fused_buffers["pf_cos"].copy_(cos.flatten(0, 1))
            st.fused_buffers["pf_sin"].copy_(sin.flatten(0, 1))
            st.vision_buf.normal_(generator=g)
            st.key_mask[:, L : L + st.prefill_len] = True
            live = (st.chosen, st.n_frame, st.done, st.cache_len, st.frame_tokens, st.logits, st.task_loss,
                    st.finished, st.first, st.key_mask)
            saved = [t.clone() for t in live]

            def restore(live=live, saved=saved):
                for t, v in zip(live, saved):
                    t.copy_(v)

            def one(st=st, restore=restore):  # a step (the fused kernels unless st.fused is None)
                restore()
                st._decode_step()

            def prefill(st=st, restore=restore):  # the whole prefill (torch GEMMs for large batches)
                restore()
                st._prefill(st.cap)

            with torch.no_grad():
                for fn in (one, prefill):
                    fn()  # compile
                    fn()
                torch.cuda.synchronize()
                ran_prefill = int(st.cache_len) == L + st.prefill_len
                graphs = {}
                for name, fn in (("restore", restore), ("step", one), ("prefill", prefill)):
                    gr = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(gr):
                        fn()
                    graphs[name] = gr
                times = {}
                for name, gr in graphs.items():
                    gr.replay()
                    torch.cuda.synchronize()
                    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    reps = a.reps if name != "prefill" else max(a.reps // 4, 10)  # a prefill is ~10 steps
                    e0.record()
                    for _ in range(reps):
                        gr.replay()
                    e1.record()
                    torch.cuda.synchronize()
                    times[name] = e0.elapsed_time(e1) / reps * 1e3
                graphs["step"].replay()
                torch.cuda.synchronize()
                ran = int(st.cache_len) == L + st.K
                kernels = {}
                for name in ("step", "prefill"):
                    with profile(activities=[ProfilerActivity.CUDA]) as prof:
                        for _ in range(20):
                            graphs[name].replay()
                        torch.cuda.synchronize()
                    per = defaultdict(lambda: [0, 0.0])
                    for e in prof.events():
                        if e.device_type == torch.autograd.DeviceType.CUDA and e.name.startswith("_"):
                            per[e.name][0] += 1
                            per[e.name][1] += e.device_time
                    kernels[name] = " ".join(f"{n}={us / c:.1f}" for n, (c, us) in sorted(per.items()))
                err = {name: against_eager(st, fn, restore, L) for name, fn in (("step", one), ("prefill", prefill))}
            print(f"B={B:3d} {cfg} step {times['step'] - times['restore']:7.1f} us (ran={ran}) {err['step']} | {kernels['step']}\n"
                  f"      prefill {times['prefill'] - times['restore']:7.1f} us (ran={ran_prefill}) {err['prefill']} | {kernels['prefill']}",
                  flush=True)
            be.release_state(st)
            be.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
