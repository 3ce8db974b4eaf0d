"""The wgpu kernel profiler (timestamp queries): every dispatch accounted for. That it leaves
the tokens unchanged is checked in Rust (`profiled_generate_b_is_the_same_generation`)."""

from __future__ import annotations

import autogaze_wgpu as ag
import numpy as np
import pytest
from conftest import MODEL_DIR, case_pixel_values

wgpu_backend = pytest.importorskip("autogaze_wgpu.backends.wgpu")


def test_profile_accounts_for_every_dispatch():
    if not wgpu_backend.adapter_available():
        pytest.skip("no wgpu adapter")
    model = ag.AutoGaze.from_pretrained(MODEL_DIR, backend="wgpu")
    x = np.ascontiguousarray(case_pixel_values("a")[:, :2], dtype=np.float32)
    engine = model.backend.engine
    ratios = [0.1, 0.1]
    try:
        prof = engine.profile(x, ratios, 0.7)
    except ag.DeviceError as e:  # adapters without timestamps inside passes say so
        assert "timestamp" in str(e)
        return
    assert sum(n for _, n, _ in prof["kernels"]) == prof["dispatches"] > 0
    assert prof["submits"] == x.shape[1]  # one per frame: the CPU records ahead of the GPU
    times = [us for _, _, us in prof["kernels"]]
    assert all(t >= 0 for t in times) and times == sorted(times, reverse=True)
    assert prof["gpu_us"] == pytest.approx(sum(times))
    assert any(name.startswith("attention::") for name, _, _ in prof["kernels"])
