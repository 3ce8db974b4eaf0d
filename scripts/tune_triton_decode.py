"""Times the torch backend's fused decoder kernel (``backends/triton_decode.py``) on a GPU for
several launch configurations: the time of one decode step and of one prefill (a CUDA graph of
the state restore + the launch, minus the restore alone).

    python scripts/tune_triton_decode.py --model DIR [--batch 1,45] [--cache-len 3000] [--per-sm 1,2]

It first times the grid barrier alone (a launch of 1000 barriers) for each program count.

The state is mid-frame (nothing chosen yet, no task-loss stop), so the step runs every phase;
the cache holds ``--cache-len`` keys.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path


def barrier_times(programs: list[int], n: int = 1000) -> None:
    """Microseconds per grid barrier (``triton_decode._grid_sync``) of G programs."""
    import torch
    import triton
    from autogaze_wgpu.backends.triton_decode import _grid_sync

    @triton.jit
    def barriers(bar_ptr, err_ptr, n, G):
        for _ in range(n):
            _grid_sync(bar_ptr, err_ptr, G)

    for G in programs:
        bar = torch.zeros(2, device="cuda", dtype=torch.int32)
        err = torch.zeros(1, device="cuda", dtype=torch.int32)
        barriers[(G,)](bar, err, 10, G, num_warps=4)
        torch.cuda.synchronize()
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        barriers[(G,)](bar, err, n, G, num_warps=4)
        e1.record()
        torch.cuda.synchronize()
        print(f"grid barrier, {G} programs: {e0.elapsed_time(e1) / n * 1e3:.2f} us (error={int(err[0])})", flush=True)


def main(argv=None) -> int:
    import autogaze_wgpu as ag
    import torch
    from autogaze_wgpu.backends.triton_decode import FusedDecoder
    from autogaze_wgpu.reference.modeling import rope_cos_sin

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, type=Path)
    p.add_argument("--batch", default="1,45")
    p.add_argument("--cache-len", type=int, default=3000)
    p.add_argument("--capacity", type=int, default=6656)
    p.add_argument("--programs", default="0", help="programs per launch (0: as --per-sm allows)")
    p.add_argument("--per-sm", default="1", help="programs per SM where they fit (with --programs 0)")
    p.add_argument("--block-n", default="16,32")
    p.add_argument("--attn", default="2x64", help="blocks per split x keys per block")
    p.add_argument("--warps", default="4")
    p.add_argument("--stages", default="1")
    p.add_argument("--prefill-keys", type=int, default=64, help="keys per block of the prefill's attention")
    p.add_argument("--reps", type=int, default=200)
    a = p.parse_args(argv)
    barrier_times(sorted({int(x) for x in a.programs.split(",") if int(x)} |
                         {torch.cuda.get_device_properties(0).multi_processor_count * int(x) for x in a.per_sm.split(",")}))
    model = ag.AutoGaze.from_pretrained(a.model, backend="torch", device="cuda", decode_kernels="triton")
    be = model.backend
    g = torch.Generator(device="cuda").manual_seed(0)
    grid = itertools.product(a.programs.split(","), a.per_sm.split(","), a.block_n.split(","), a.attn.split(","),
                             a.warps.split(","), a.stages.split(","))
    configs = list(grid)
    for B in [int(x) for x in a.batch.split(",")]:
        for progs, per_sm, bn, attn, nw, ns in configs:
            blocks, abn = (int(x) for x in attn.split("x"))
            cfg = {"PROGRAMS": int(progs) or None, "PROGRAMS_PER_SM": int(per_sm),
                   "FEW_ROWS_PROGRAMS_PER_SM": int(per_sm), "BLOCK_N": int(bn), "FEW_ROWS_BLOCK_N": int(bn),
                   "ATTN_BLOCKS": blocks, "ATTN_BLOCK_N": abn, "NUM_WARPS": int(nw), "NUM_STAGES": int(ns), "PREFILL_NUM_STAGES": int(ns),
                   "PREFILL_ATTN_BLOCK_N": a.prefill_keys}
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
            pos = torch.arange(L, L + st.prefill_len, device="cuda")[None].expand(B, -1)
            cos, sin = rope_cos_sin(be.model.gaze_decoder.model.inv_freq, pos)
            st.fused_buffers["pf_cos"].copy_(cos.flatten(0, 1))
            st.fused_buffers["pf_sin"].copy_(sin.flatten(0, 1))
            st.vision_buf.normal_(generator=g)
            st.key_mask[:, L : L + st.prefill_len] = True
            st.chosen.zero_(); st.finished.zero_(); st.n_frame.zero_(); st.done.zero_()
            st.first.fill_(False); st.budget.fill_(265); st.has_requirement.fill_(False)
            st.cache_len.fill_(L)
            live = (st.chosen, st.n_frame, st.done, st.cache_len, st.frame_tokens, st.finished, st.first)
            saved = [t.clone() for t in live]

            def restore(live=live, saved=saved):
                for t, v in zip(live, saved):
                    t.copy_(v)

            def step(fused=fused, st=st, restore=restore):
                restore()
                fused.step(st)

            def prefill(fused=fused, st=st, restore=restore):
                restore()
                fused.prefill(st)

            with torch.no_grad():
                for fn in (step, prefill):
                    fn(); fn()  # compile
                torch.cuda.synchronize()
                ran = int(st.cache_len) == L + st.prefill_len
                graphs = {}
                for name, fn in (("restore", restore), ("step", step), ("prefill", prefill)):
                    gr = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(gr):
                        fn()
                    graphs[name] = gr
                times = {}
                for name, gr in graphs.items():
                    gr.replay(); torch.cuda.synchronize()
                    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    e0.record()
                    for _ in range(a.reps):
                        gr.replay()
                    e1.record(); torch.cuda.synchronize()
                    times[name] = e0.elapsed_time(e1) / a.reps * 1e3
                err = int(st.fused_buffers["error"][0])
            progs = sorted(set(fused.programs.values()))
            print(f"B={B:3d} programs={progs} {cfg} step {times['step'] - times['restore']:7.1f} us, "
                  f"prefill {times['prefill'] - times['restore']:7.1f} us (ran={ran}, barrier error={err})", flush=True)
            be.release_state(st)
            be.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
