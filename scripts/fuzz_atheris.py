#!/usr/bin/env python3
"""Coverage-guided fuzzing (atheris, i.e. libFuzzer) of the public input validation (issue 6).

Targets (``--target``), each in a process of its own (libFuzzer runs one target per process):

* ``inputs``: ``as_pixel_values`` on arrays, views, lists and torch tensors built from the
  bytes (9 dtypes, rank 0-6, NaN/Inf/huge values, reversed/transposed/broadcast views);
  ``resolve_gazing_params`` and ``positive_int`` on Python values built from the bytes (numbers,
  NaN/Inf, bools, strings, bytes, lists, numpy scalars, one-shot iterators); the processor's
  frame checks (``as_uint8_video``, ``AutoGazeProcessor.__call__`` and ``raw``) on small frames
  of any dtype, rank and channel count.
* ``config``: the bytes as ``config.json`` through ``_native.load_config`` (and, when that
  loads, ``AutoGazeConfig.from_dict`` and ``_native.load_weights`` of the tiny corpus model).
* ``weights``: the bytes as ``model.safetensors`` through ``_native.load_weights``, next to the
  tiny corpus model's ``config.json``.

Only the documented ``AutoGazeError`` subclasses may escape (InputError for the inputs,
ConfigError / WeightsError for the files); what is accepted must also be what the contract
says (float32 C-contiguous finite pixel values, ratios in (0, 1], finite float32 weights). A
``PanicException``, any other exception, or a broken contract is re-raised: libFuzzer reports
it and writes the input to ``crash-<sha1>`` (replay: ``python scripts/fuzz_atheris.py --target
T crash-...``).

Seeds: ``tests/fuzz_corpus/config``, ``tests/fuzz_corpus/weights`` (shared with the proptest
and hypothesis properties) and ``tests/fuzz_corpus/inputs``. New inputs libFuzzer finds go to a
temporary directory (``--work DIR`` keeps them), never into the committed corpus.

Coverage: atheris instruments the package's Python modules (``autogaze_wgpu.*``), so the
inputs target is fully coverage-guided; the Rust loaders are not instrumented (that needs a
sanitizer-coverage build of the extension), so for ``config``/``weights`` the guidance is the
Python side only and the mutations come from libFuzzer's corpus mutators.

    python scripts/fuzz_atheris.py --target inputs -runs=20000
    python scripts/fuzz_atheris.py --target all -max_total_time=60    # each target 60 s
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import atheris

with atheris.instrument_imports(include=["autogaze_wgpu"]):
    import autogaze_wgpu as ag
    import numpy as np
    from autogaze_wgpu import _native
    from autogaze_wgpu.inputs import as_pixel_values, positive_int, resolve_gazing_params
    from autogaze_wgpu.processor import AutoGazeProcessor, PreprocessorConfig, as_uint8_video

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "tests" / "fuzz_corpus"
SEEDS = {
    "inputs": CORPUS / "inputs",
    "config": CORPUS / "config",
    "weights": CORPUS / "weights",
}
TARGETS = tuple(SEEDS)


class Finding(AssertionError):
    """An input the contract does not allow (the message says which rule)."""


def _expect(ok: bool, what: str) -> None:
    if not ok:
        raise Finding(what)


# ---------------------------------------------------------------------------------------------
# inputs
DTYPES = [np.float16, np.float32, np.float64, np.int8, np.uint8, np.int64, np.bool_, np.complex64, object]
SPECIALS = [math.nan, math.inf, -math.inf, 1e300, -1e300, 3.5e38, 0.0, -0.0, 1e-45]
_CFG = None
_PROC = None


def _cfg() -> ag.AutoGazeConfig:
    global _CFG
    if _CFG is None:
        _CFG = ag.AutoGazeConfig.from_dict(_native.load_config(str(CORPUS / "config" / "ok_released.json")))
    return _CFG


def _proc() -> AutoGazeProcessor:
    global _PROC
    if _PROC is None:
        # the release's preprocessor config, small output so a case stays fast
        _PROC = AutoGazeProcessor(
            PreprocessorConfig.from_dict(
                {
                    "do_resize": True,
                    "size": {"shortest_edge": 16},
                    "resample": 2,
                    "do_rescale": True,
                    "rescale_factor": 1 / 127.5,
                    "offset": True,
                    "do_normalize": True,
                    "image_mean": [0.485, 0.456, 0.406],
                    "image_std": [0.229, 0.224, 0.225],
                    "do_center_crop": False,
                    "crop_size": None,
                }
            )
        )
    return _PROC


def _array(fdp: atheris.FuzzedDataProvider, max_dim: int, dtypes=DTYPES) -> np.ndarray:
    dtype = dtypes[fdp.ConsumeIntInRange(0, len(dtypes) - 1)]
    rank = fdp.ConsumeIntInRange(0, 6)
    shape = tuple(fdp.ConsumeIntInRange(0, max_dim) for _ in range(rank))
    n = int(np.prod(shape, dtype=np.int64))
    if dtype is object:
        a = np.array([fdp.ConsumeFloat() for _ in range(min(n, 64))] + [0.0] * max(0, n - 64), dtype=object)
    elif dtype is np.bool_:
        a = np.frombuffer(fdp.ConsumeBytes(n).ljust(n, b"\0"), np.uint8).astype(bool)
    else:
        size = np.dtype(dtype).itemsize
        a = np.frombuffer(fdp.ConsumeBytes(n * size).ljust(n * size, b"\0"), dtype).copy()
        if a.dtype.kind == "f" and n and fdp.ConsumeBool():
            for _ in range(fdp.ConsumeIntInRange(1, 4)):
                with np.errstate(over="ignore"):
                    a[fdp.ConsumeIntInRange(0, n - 1)] = SPECIALS[fdp.ConsumeIntInRange(0, len(SPECIALS) - 1)]
    a = a.reshape(shape)
    layout = fdp.ConsumeIntInRange(0, 4)
    if layout == 1 and a.ndim:
        a = a[::-1]
    elif layout == 2 and a.ndim >= 2:
        a = a.swapaxes(0, -1)
    elif layout == 3 and a.ndim and a.shape[0]:
        a = np.broadcast_to(a[:1], (fdp.ConsumeIntInRange(1, 3), *a.shape[1:]))
    return a


def _value(fdp: atheris.FuzzedDataProvider, depth: int = 0):
    """A Python value of the kinds callers pass for ratios and requirements."""
    kind = fdp.ConsumeIntInRange(0, 11 if depth == 0 else 8)
    if kind == 0:
        return None
    if kind == 1:
        return fdp.ConsumeFloat()
    if kind == 2:
        return fdp.ConsumeProbability()
    if kind == 3:
        return fdp.ConsumeIntInRange(-3, 3)
    if kind == 4:
        return fdp.ConsumeBool()
    if kind == 5:
        return fdp.ConsumeUnicodeNoSurrogates(6)
    if kind == 6:
        return fdp.ConsumeBytes(4)
    if kind == 7:
        return np.float32(fdp.ConsumeFloat())
    if kind == 8:
        return SPECIALS[fdp.ConsumeIntInRange(0, len(SPECIALS) - 1)]
    items = [_value(fdp, depth + 1) for _ in range(fdp.ConsumeIntInRange(0, 5))]
    if kind == 9:
        return items
    if kind == 10:
        return iter(items)
    return np.array([fdp.ConsumeFloat() for _ in items], dtype=np.float64)


def _inputs(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    which = fdp.ConsumeIntInRange(0, 3)
    try:
        if which == 0:
            a = _array(fdp, 5)
            x = a.tolist() if fdp.ConsumeBool() and a.dtype != object else a
            if fdp.ConsumeIntInRange(0, 7) == 0 and isinstance(x, np.ndarray) and x.dtype.kind in "fiub":
                import torch

                x = torch.from_numpy(np.array(x, copy=True, order="C"))
            v = as_pixel_values(x)
            if isinstance(v, np.ndarray):
                _expect(v.ndim == 5 and v.shape[2] == 3 and min(v.shape) > 0, f"accepted shape {v.shape}")
                _expect(v.dtype == np.float32 and v.flags.c_contiguous, f"accepted {v.dtype}")
                _expect(bool(np.isfinite(v).all()), "accepted non-finite pixel values")
        elif which == 1:
            T = fdp.ConsumeIntInRange(1, 20)
            ratio, req = _value(fdp), _value(fdp)
            ratios, r = resolve_gazing_params(_cfg(), ratio, req, T)
            _expect(len(ratios) == T, f"{len(ratios)} ratios for {T} frames")
            _expect(all(isinstance(v, float) and 0.0 < v <= 1.0 for v in ratios), f"ratios {ratios}")
            _expect(r is None or (isinstance(r, float) and math.isfinite(r) and r >= 0.0), f"requirement {r!r}")
        elif which == 2:
            v = _value(fdp)
            n = positive_int("n", v)
            _expect(isinstance(n, int) and not isinstance(n, bool) and n >= 1, f"positive_int gave {n!r}")
        else:
            dtypes = [np.uint8] * 6 + DTYPES
            a = _array(fdp, 9, dtypes)
            frames = list(a) if fdp.ConsumeBool() and a.ndim else a
            mode = fdp.ConsumeIntInRange(0, 2)
            if mode == 0:
                v = as_uint8_video(frames, batched=fdp.ConsumeBool())
                _expect(v.dtype == np.uint8 and v.shape[-1] == 3 and v.flags.c_contiguous, f"{v.shape}")
            elif mode == 1:
                out = _proc()(frames)
                _expect(out.dtype == np.float32 and out.ndim == 5 and out.shape[2] == 3, f"{out.shape}")
                _expect(bool(np.isfinite(out).all()), "non-finite processor output")
            else:
                raw = _proc().raw(frames)
                _expect(raw.frames.dtype == np.uint8 and len(raw.shape) == 5, f"{raw.shape}")
    except ag.InputError:
        pass


# ---------------------------------------------------------------------------------------------
# model files: the scratch model directory is made by the parent process (main), which also
# removes it (libFuzzer ends the fuzzing process with exit(), past Python's cleanup)
def _dir() -> Path:
    return Path(os.environ["AUTOGAZE_ATHERIS_SCRATCH"])


def _check_weights(w) -> None:
    _expect(isinstance(w, dict) and len(w) > 0, "no tensors")
    for k, v in w.items():
        _expect(v.dtype == np.float32 and v.flags.c_contiguous, f"{k}: {v.dtype}")
        _expect(bool(np.isfinite(v).all()), f"{k}: non-finite weights loaded")


def _config(data: bytes) -> None:
    d = _dir()
    (d / "config.json").write_bytes(data)
    try:
        cfg = _native.load_config(str(d))
    except ag.ConfigError:
        return
    ag.AutoGazeConfig.from_dict(cfg)  # what loads must also build the Python view
    try:
        _check_weights(_native.load_weights(str(d)))
    except (ag.ConfigError, ag.WeightsError):
        pass


def _weights(data: bytes) -> None:
    d = _dir()
    (d / "model.safetensors").write_bytes(data)
    try:
        w = _native.load_weights(str(d))
    except ag.WeightsError:
        return
    _check_weights(w)


ONE_INPUT = {"inputs": _inputs, "config": _config, "weights": _weights}


# ---------------------------------------------------------------------------------------------
def _fuzz(target: str, flags: list[str], files: list[str]) -> None:
    """The fuzzing process: libFuzzer over ``target`` (or a replay of ``files``)."""
    if not any(f.startswith("-timeout=") for f in flags):
        flags.append("-timeout=30")  # a case taking 30 s is a hang: a finding
    if target != "inputs" and not any(f.startswith("-keep_seed=") for f in flags):
        # The Rust loaders give libFuzzer no coverage, so without this it would drop every
        # seed but one or two (no new features) and mutate only those.
        flags.append("-keep_seed=1")
    corpus = [] if files else [os.environ["AUTOGAZE_ATHERIS_WORK"], str(SEEDS[target])]
    atheris.Setup([sys.argv[0], *flags, *(files or corpus)], ONE_INPUT[target])
    atheris.Fuzz()


def _run(target: str, rest: list[str], work: str | None) -> int:
    """Runs one target in a child process with its scratch and work directories."""
    base = "/dev/shm" if os.path.isdir("/dev/shm") else None
    scratch = Path(tempfile.mkdtemp(prefix="autogaze-atheris-", dir=base))
    shutil.copy(CORPUS / "weights" / "config.json", scratch / "config.json")
    shutil.copy(CORPUS / "weights" / "ok_tiny_f32.safetensors", scratch / "model.safetensors")
    tmp_work = None if work else tempfile.mkdtemp(prefix=f"atheris-{target}-")
    wdir = Path(work or tmp_work)
    wdir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, AUTOGAZE_ATHERIS_SCRATCH=str(scratch), AUTOGAZE_ATHERIS_WORK=str(wdir))
    try:
        return subprocess.call([sys.executable, __file__, "--child", "--target", target, *rest], env=env)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        if tmp_work:
            shutil.rmtree(tmp_work, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(
        description="atheris fuzzing of the input validation; other arguments go to libFuzzer "
        "(-runs=N, -max_total_time=S, ...; files: replay them)"
    )
    ap.add_argument("--target", choices=(*TARGETS, "all"), required=True)
    ap.add_argument("--work", help="keep the inputs libFuzzer adds in this directory")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args, rest = ap.parse_known_args()
    if args.child:
        _fuzz(args.target, [a for a in rest if a.startswith("-")], [a for a in rest if not a.startswith("-")])
        return 0
    rc = 0
    for t in TARGETS if args.target == "all" else (args.target,):
        if args.target == "all":
            print(f"== {t}", flush=True)
        rc = _run(t, rest, args.work and str(Path(args.work) / t)) or rc
    return rc


if __name__ == "__main__":
    sys.exit(main())
