"""The benchmark script's workloads run and compare tokens across backends (CPU here; the
timings themselves are not tested: docs/benchmarks.md has GPU numbers)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import MODEL_DIR

from autogaze_wgpu import bench

pytest.importorskip("torch")


def test_clip788_runs_on_two_backends_with_the_same_tokens(capsys):
    rows = bench.run(Path(MODEL_DIR), ["reference", "torch"], "cpu", repeat=1, workloads=["clip788"])
    assert [r["backend"] for r in rows] == ["reference", "torch"]
    assert all(r["slots"] == 16 * 49 for r in rows)  # gazing_ratio 0.186 of 265: 49 a frame, no stop
    assert rows[0]["tokens_sha"] == rows[1]["tokens_sha"]
    assert all(r["seconds"] > 0 for r in rows)
    bench.print_table(rows)
    table = capsys.readouterr().out
    assert "clip788" in table and "same as reference" in table


def test_unknown_workload_is_refused():
    with pytest.raises(SystemExit, match="unknown workload"):
        bench.workload(None, "clip999", None, None)


def test_table_without_a_reference_row_prints_no_ratio(capsys):
    rows = [{"backend": "torch", "workload": "clip788", "seconds": 0.03, "slots": 784, "tokens_sha": "abc", "device": "x"}]
    bench.print_table(rows)
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("torch"))
    assert "nan" not in line and line.split()[3] == "-", line


def test_tiles788_is_the_tile_batch_at_clip788s_ratio():
    calls = []

    class Model:
        def generate(self, pixel_values, **kw):
            calls.append((pixel_values, kw))

    bench.workload(Model(), "tiles788", "the clip", "the tiles")()
    bench.workload(Model(), "clip788", "the clip", "the tiles")()
    assert calls == [("the tiles", {"gazing_ratio": 0.186}), ("the clip", {"gazing_ratio": 0.186})]


def test_a_backend_without_a_device_is_skipped_not_fatal(monkeypatch, capsys):
    # (a GPU machine whose Vulkan loader finds no adapter still times the torch backends)
    import autogaze_wgpu as ag

    real = ag.AutoGaze.from_pretrained

    def from_pretrained(path, backend, **kw):
        if backend == "wgpu":
            raise ag.DeviceError("no GPU adapter found")
        return real(path, backend=backend, **kw)

    monkeypatch.setattr(ag.AutoGaze, "from_pretrained", from_pretrained)
    rows = bench.run(Path(MODEL_DIR), ["wgpu", "reference"], "cpu", repeat=1, workloads=["clip788"])
    assert [(r["backend"], r.get("skipped")) for r in rows] == [("wgpu", "no GPU adapter found"), ("reference", None)]
    bench.print_table(rows)
    out = capsys.readouterr().out
    assert "wgpu      skipped: no GPU adapter found" in out and "skipped: wgpu (no GPU adapter found)" in out
    assert "reference  clip788" in out


def _ab_torch():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "scripts" / "ab_torch.py"
    spec = importlib.util.spec_from_file_location("ab_torch", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_ab_script_alternates_variants_and_compares_their_tokens(tmp_path, capsys):
    from autogaze_wgpu.backends.torch_backend import TorchBackend

    ab = _ab_torch()
    default = TorchBackend.STEPS_PER_SYNC
    out = tmp_path / "ab.json"
    ab.main(["--model", str(MODEL_DIR), "--device", "cpu", "--workloads", "clip788", "--rounds", "1",
             "--variant", "base:", "--variant", "one:TorchBackend.STEPS_PER_SYNC=1", "--json", str(out)])
    assert TorchBackend.STEPS_PER_SYNC == default  # restored after each use
    lines = [x.split() for x in capsys.readouterr().out.splitlines() if x.startswith(("base", "one"))]
    assert [x[:2] for x in lines] == [["base", "clip788"], ["one", "clip788"]]
    assert lines[0][3] == "1.000x" and all(x[-1] == "same" for x in lines)
    import json

    rows = json.loads(out.read_text())["rows"]
    assert [len(r["runs_s"]) for r in rows] == [1, 1] and all(r["tokens_same_as_first"] for r in rows)


@pytest.mark.parametrize("bad", ["x:TorchBackend.NO_SUCH=1", "x:Nope.STEPS_PER_SYNC=1", "x:TorchBackend.STEPS_PER_SYNC"])
def test_ab_script_refuses_unknown_settings(bad):
    ab = _ab_torch()
    with pytest.raises(SystemExit):
        name, settings = ab.parse_variant(bad)
        with ab.applied(settings):
            pass


def test_profile_attention_traffic_counts_the_keys_each_step_reads():
    """scripts/profile_torch.py's floor of the steps' attention, on a case small enough to
    count by hand: 1 vision token a frame, K = 2, 8 bytes a key (K and V of one f32 dim)."""
    import importlib.util
    from types import SimpleNamespace

    path = Path(__file__).resolve().parents[1] / "scripts" / "profile_torch.py"
    spec = importlib.util.spec_from_file_location("profile_torch", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    dec = SimpleNamespace(num_multi_token_pred=2, num_attention_heads=1, head_dim=1, num_hidden_layers=1)
    cfg = SimpleNamespace(decoder=dec, num_patches_per_side=1)
    # one row, two frames of 4 slots: 3 real gazes (2 steps), then 1 (1 step)
    out = SimpleNamespace(num_real_gazes=lambda: np.array([[3, 1]]), num_gazing_each_frame=np.array([4, 4]))
    t = mod.attention_traffic(out, cfg)
    # frame 0: steps read 1 + 2 and 1 + 4 keys; frame 1 (after 1 + 4 keys laid out, 1 + 3
    # of them unmasked): 5 + 1 + 2 laid out, 4 + 1 + 2 unmasked
    assert round(t["laid_out_GB"] * 1e9) == (3 + 5 + 8) * 8
    assert round(t["valid_GB"] * 1e9) == (3 + 5 + 7) * 8
    # the vision query of frame 0 sees itself; frame 1's sees the 4 unmasked keys and itself
    assert t["prefill_scores"] == 1 + 5
