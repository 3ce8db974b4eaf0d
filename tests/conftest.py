"""Shared test setup: the official fixtures (required) and one model per backend."""

from __future__ import annotations

import hashlib
import json
import os
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest

# Off CUDA, the torch backend's Triton decode kernels can only run under Triton's interpreter;
# it must be chosen before triton is first imported (tests/test_torch_fused_decode.py).
if os.environ.get("AUTOGAZE_TEST_DEVICE", "cpu") != "cuda":
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(os.environ.get("AUTOGAZE_FIXTURES", ROOT.parent / "shared" / "fixtures" / "official"))
MODEL_DIR = FIXTURES / "model"


def pytest_sessionstart(session):
    # The parity suite is the point of these tests: without the fixtures it must fail loudly,
    # not skip.
    if not (MODEL_DIR / "model.safetensors").is_file():
        pytest.exit(
            f"official fixtures not found at {FIXTURES} (set AUTOGAZE_FIXTURES)", returncode=1
        )


def test_backends() -> list[str]:
    from autogaze_wgpu import available_backends

    return list(available_backends())


test_backends.__test__ = False  # a helper, not a test


@lru_cache(maxsize=None)
def load_model(backend: str):
    """The fixture model; AUTOGAZE_TEST_DEVICE (e.g. "cuda") moves the torch-based backends."""
    from autogaze_wgpu import AutoGaze

    device = os.environ.get("AUTOGAZE_TEST_DEVICE") if backend in ("reference", "torch") else None
    return AutoGaze.from_pretrained(MODEL_DIR, backend=backend, device=device)


@lru_cache(maxsize=None)
def load_case(name: str) -> tuple[dict, dict[str, np.ndarray]]:
    from safetensors.numpy import load_file

    meta = json.loads((FIXTURES / "cases" / f"{name}.json").read_text())
    return meta, load_file(str(FIXTURES / "cases" / f"{name}.safetensors"))


@lru_cache(maxsize=None)
def case_pixel_values(name: str) -> np.ndarray:
    """The case's model input, made by our processor from the stored raw frames."""
    from autogaze_wgpu import AutoGazeProcessor

    meta, data = load_case(name)
    if "raw_frames" not in data:  # b, c and f reuse case a's video
        return case_pixel_values("a")
    overrides = meta["processor"].get("overrides") or {}
    proc = AutoGazeProcessor.from_pretrained(MODEL_DIR, **overrides)
    return proc(data["raw_frames"])


def chop_into_tiles(pv: np.ndarray, tile: int = 224) -> np.ndarray:
    """AnyRes as in case g1: 'B (nt t) C (nh h) (nw w) -> (B nt nh nw) t C h w' with t = T."""
    B, T, C, H, W = pv.shape
    nh, nw = H // tile, W // tile
    x = pv.reshape(B, T, C, nh, tile, nw, tile).transpose(0, 3, 5, 1, 2, 4, 6)
    return np.ascontiguousarray(x.reshape(B * nh * nw, T, C, tile, tile))


@lru_cache(maxsize=None)
def case_model_input(name: str) -> np.ndarray:
    """The tensor the official model ran on: g1's 4 tiles, g2/g3's resolution-adapted tiles,
    else the processor output."""
    from autogaze_wgpu.config import AutoGazeConfig
    from autogaze_wgpu.resolution import input_res_adapt

    pv = case_pixel_values(name)
    if name == "g1":
        return chop_into_tiles(pv)
    meta, _ = load_case(name)
    if "target_scales" in meta["call"]:
        cfg = AutoGazeConfig.from_pretrained(MODEL_DIR)
        return input_res_adapt(pv, meta["call"]["target_scales"], meta["call"]["target_patch_size"], cfg)[0]
    return pv


def sha256(x: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(x).tobytes()).hexdigest()


def max_abs(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a - b).max()) if a.size else 0.0


def assert_exact(name: str, got, want) -> None:
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, f"{name}: shape {got.shape} != {want.shape}"
    bad = np.argwhere(got != want)
    assert bad.size == 0, (
        f"{name}: {len(bad)} mismatches, first at {tuple(bad[0])}: "
        f"got {got[tuple(bad[0])]}, want {want[tuple(bad[0])]}"
    )


@pytest.fixture(scope="session")
def rand_dir(tmp_path_factory):
    """A random-weight model in the released format (seed 3), shared by the test files."""
    from autogaze_wgpu.testing import random_model

    return random_model(tmp_path_factory.mktemp("rand") / "model", seed=3)


@pytest.fixture(params=None)
def backend(request):
    return request.param


def pytest_generate_tests(metafunc):
    if "backend" in metafunc.fixturenames:
        metafunc.parametrize("backend", test_backends(), indirect=True)
