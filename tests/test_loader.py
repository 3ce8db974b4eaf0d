"""The Rust loader seen from Python: good files, f16/bf16 upcast, each kind of bad file."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import MODEL_DIR
from safetensors.numpy import load_file, save_file

import autogaze_wgpu as ag
from autogaze_wgpu import _native
from autogaze_wgpu.testing import random_model, random_weights, released_config


def test_fixture_model_loads_exactly():
    w = _native.load_weights(str(MODEL_DIR))
    ref = load_file(str(MODEL_DIR / "model.safetensors"))
    assert sorted(w) == sorted(ref) and len(w) == 49
    for k in ref:
        assert w[k].dtype == np.float32
        np.testing.assert_array_equal(w[k], ref[k])
    cfg = ag.AutoGazeConfig.from_pretrained(MODEL_DIR)
    assert cfg.num_tokens_each_scale == (4, 16, 49, 196) and cfg.grid_each_scale == (2, 4, 7, 14)
    assert (cfg.default_gazing_ratio, cfg.default_task_loss_requirement) == (0.75, 0.7)
    assert cfg.decoder.rope_scaling.rope_type == "llama3"


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_files_upcast(tmp_path, dtype):
    d = random_model(tmp_path / dtype, seed=1, dtype=dtype)
    w = _native.load_weights(str(d))
    f32 = random_weights(released_config(), seed=1)
    for k, v in f32.items():
        assert w[k].dtype == np.float32
        # half precision keeps ~3 (bf16) or ~4 (f16) significant digits
        np.testing.assert_allclose(w[k], v, rtol=1e-2 if dtype == "bfloat16" else 1e-3, atol=1e-3)
    if dtype == "float16":
        np.testing.assert_array_equal(w[k], v.astype(np.float16).astype(np.float32))


def copy_model(tmp_path):
    d = tmp_path / "m"
    shutil.copytree(MODEL_DIR, d)
    return d


def test_bad_config_files(tmp_path):
    d = copy_model(tmp_path)
    (d / "config.json").write_text("{not json")
    with pytest.raises(ag.ConfigError, match="config"):
        ag.AutoGaze.from_pretrained(d)
    cfg = json.loads((MODEL_DIR / "config.json").read_text())
    cfg["gaze_model_config"]["gaze_decoder_config"]["vocab_size"] = 300
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ag.ConfigError, match="vocab_size"):
        ag.AutoGaze.from_pretrained(d)
    del cfg["gaze_model_config"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ag.ConfigError, match="gaze_model_config"):
        ag.AutoGaze.from_pretrained(d)
    (d / "config.json").unlink()
    with pytest.raises(ag.ConfigError, match="config.json"):
        ag.AutoGaze.from_pretrained(d)


def test_bad_weight_files(tmp_path):
    d = copy_model(tmp_path)
    st = d / "model.safetensors"
    st.write_bytes((MODEL_DIR / "model.safetensors").read_bytes()[:100_000])
    with pytest.raises(ag.WeightsError, match="model.safetensors"):
        ag.AutoGaze.from_pretrained(d)
    w = load_file(str(MODEL_DIR / "model.safetensors"))
    bad = dict(w)
    del bad["gazing_model.connector.pos_embed"]
    save_file(bad, str(st))
    with pytest.raises(ag.WeightsError, match="pos_embed"):
        ag.AutoGaze.from_pretrained(d)
    bad = dict(w)
    bad["gazing_model.gaze_decoder.lm_head.weight"] = w["gazing_model.gaze_decoder.lm_head.weight"][:100]
    save_file(bad, str(st))
    with pytest.raises(ag.WeightsError, match="lm_head"):
        ag.AutoGaze.from_pretrained(d)
    bad = dict(w)
    x = bad["gazing_model.connector.pos_embed"].copy()
    x[3, 4] = np.nan
    bad["gazing_model.connector.pos_embed"] = x
    save_file(bad, str(st))
    with pytest.raises(ag.WeightsError, match="NaN"):
        ag.AutoGaze.from_pretrained(d)
    st.unlink()
    with pytest.raises(ag.WeightsError, match="model.safetensors"):
        ag.AutoGaze.from_pretrained(d)
