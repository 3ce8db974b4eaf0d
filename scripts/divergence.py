"""Where do two runs' tokens part, and how close was the decision there? (a diagnosis aid)

Runs one of the bench's workloads (``--workload``: ``tiles45``, 45 tiles x 16 frames with the
defaults; ``clip``; ``tiles788`` / ``clip788`` at gazing ratio 0.186 without a task-loss stop) on
several backend/device pairs (a backend may be one of the bench's variants, e.g. ``torch-ieee``), compares every run's tokens with the first one's, and for the first
divergence prints the frame, row and slot, both tokens, and what the reference's logits say
about that decision (recorded with ``record_steps`` on the first run's device): the gap
between the two candidates' logits, or, for a task-loss stop, the gap between the predicted
loss and the requirement. It also prints the smallest top-2 logit gap among all selections
of the run, to show how close greedy decisions get on this workload.

    python scripts/divergence.py --model DIR --runs reference:cuda,reference:cpu,torch:cuda,wgpu
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np


def first_divergence(a: list[np.ndarray], b: list[np.ndarray]):
    """(frame, row, slot) of the first differing slot (in frame order), or None."""
    for t, (x, y) in enumerate(zip(a, b)):
        n = min(x.shape[1], y.shape[1])
        diff = np.argwhere(x[:, :n] != y[:, :n])
        if len(diff):
            s = diff[:, 1].min()
            r = diff[diff[:, 1] == s][0, 0]
            return t, int(r), int(s)
        if x.shape[1] != y.shape[1]:
            return t, 0, n
    return None


# The bench's workloads this script runs (bench.py): gazing ratio, task-loss requirement (None:
# the defaults, 0.75 and 0.7, for both).
WORKLOADS = {"tiles45": (None, None), "clip": (None, None), "tiles788": (0.186, None), "clip788": (0.186, None)}


def main(argv=None) -> int:
    import autogaze_wgpu as ag
    import torch
    from autogaze_wgpu.bench import BACKEND_VARIANTS, bench_inputs
    from autogaze_wgpu.inputs import gazing_budget, resolve_gazing_params

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, type=Path)
    p.add_argument("--runs", default="reference:cuda,reference:cpu,torch:cuda,wgpu")
    p.add_argument("--workload", default="tiles45", choices=list(WORKLOADS))
    a = p.parse_args(argv)

    proc = ag.AutoGazeProcessor.from_pretrained(a.model)
    clip, tiles = bench_inputs(proc, tiles=45 if a.workload.startswith("tiles") else None)
    video = clip if tiles is None else tiles
    ratio, requirement = WORKLOADS[a.workload]
    gen_kw = {"gazing_ratio": ratio, "task_loss_requirement": requirement}
    runs = []
    for spec in a.runs.split(","):
        name, _, dev = spec.partition(":")
        backend, kw = BACKEND_VARIANTS.get(name, (name, {}))
        kw = {**kw, "device": dev} if dev else kw
        model = ag.AutoGaze.from_pretrained(a.model, backend=backend, **kw)
        out = model.generate(video, **gen_kw)
        runs.append((spec, model, list(out.frame_tokens)))
        print(f"{spec:16s} slots {int(out.num_gazing_each_frame.sum()) * out.batch_size}", flush=True)

    spec0, model0, toks0 = runs[0]
    cfg = model0.config
    V, K, pad = cfg.num_vision_tokens_each_frame, cfg.decoder.num_multi_token_pred, cfg.pad_token_id
    ratios, req = resolve_gazing_params(cfg, ratio, requirement, video.shape[1])
    budgets = [gazing_budget(r, V) for r in ratios]

    # The first run's decisions, recorded step by step with the reference's loop on its device.
    dev = spec0.partition(":")[2] or None
    ref = ag.AutoGaze.from_pretrained(a.model, backend="reference", device=dev)
    from autogaze_wgpu.reference.generation import GazeGenerator

    with torch.no_grad():
        emb = ref.backend.embed(video)
        gen = GazeGenerator(ref.backend.model, emb.shape[0], record_steps=True)
        rec_tokens = [gen.step_frame(emb[:, t], budgets[t], req).cpu().numpy() for t in range(emb.shape[1])]
    steps = {(s.frame, s.step): (s.logits.double().cpu().numpy(), s.task_loss_prediction.double().cpu().numpy())
             for s in gen.steps}

    def logits_at(t: int, row: int, slot: int):
        lg, tl = steps[(t, slot // K)]
        k = slot % K
        return lg[row].reshape(K, -1)[k], float(tl[row, k]), k

    # Smallest top-2 gap over every selection of the recorded run (chosen ids masked as in SPEC §5).
    gaps = []
    for t, tok in enumerate(rec_tokens):
        for row in range(tok.shape[0]):
            chosen: set[int] = set()
            for slot in range(tok.shape[1]):
                if (t, slot // K) not in steps:
                    break
                if tok[row, slot] == pad:  # a stop or a finished row: not an argmax
                    continue
                lg, _, _ = logits_at(t, row, slot)
                lg = lg.copy()
                lg[pad] = -np.inf
                if chosen:
                    lg[list(chosen)] = -np.inf
                top2 = np.sort(lg)[-2:]
                gaps.append(top2[1] - top2[0])
                chosen.add(int(tok[row, slot]))
    gaps = np.array(gaps)
    print(f"\n{spec0} (recorded): {len(gaps)} selections; top-2 logit gap min {gaps.min():.3e}, "
          f"1st percentile {np.percentile(gaps, 1):.3e}, selections with gap < 1e-4: {(gaps < 1e-4).sum()}, "
          f"< 1e-5: {(gaps < 1e-5).sum()}")
    same_as_record = all(np.array_equal(x, y) for x, y in zip(rec_tokens, toks0))
    print(f"recording reproduces {spec0}'s tokens: {same_as_record}")

    for spec, _, toks in runs[1:]:
        d = first_divergence(toks0, toks)
        if d is None:
            print(f"{spec:16s} tokens equal {spec0}'s")
            continue
        t, row, slot = d
        a_tok = int(toks0[t][row, slot]) if slot < toks0[t].shape[1] else None
        b_tok = int(toks[t][row, slot]) if slot < toks[t].shape[1] else None
        n_diff = sum(int((x != y).sum()) if x.shape == y.shape else x.size for x, y in zip(toks0, toks))
        msg = f"{spec:16s} differs: frame {t}, row {row}, slot {slot}: {spec0} {a_tok} vs {b_tok}"
        if (t, slot // K) in steps and a_tok is not None and b_tok is not None:
            lg, tl, k = logits_at(t, row, slot)
            if pad in (a_tok, b_tok) and req is not None:
                msg += f"; a task-loss stop: predicted loss {tl:.9g} vs requirement {req} (gap {tl - req:.3e})"
            else:
                msg += f"; head {k}: logit gap {lg[a_tok] - lg[b_tok]:.3e} (|logit| ~ {abs(lg[a_tok]):.3g})"
        print(msg + f"; {n_diff} slots differ in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
