"""Model directories for tests, demos and benchmarks, written in the released format.

``random_model(dir, seed)`` writes ``config.json``, ``model.safetensors`` (random float32
weights with the released names and shapes) and ``preprocessor_config.json``. The weights are
random but arranged so that both stopping rules happen: the residual stream carries a
constant channel that the task-loss head reads as an offset near the 0.7 requirement, so some
frames stop early and others use their whole budget. Gazes have no visual meaning.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

import numpy as np


def released_config(
    num_hidden_layers: int = 4,
    max_num_frames: int = 16,
) -> dict[str, Any]:
    """The released ``nvidia/AutoGaze`` config.json (without the HF boilerplate keys)."""
    decoder = {
        "model_type": "llama",
        "vocab_size": 266,
        "eos_token_id": 265,
        "bos_token_id": 1,
        "hidden_size": 192,
        "intermediate_size": 384,
        "num_hidden_layers": num_hidden_layers,
        "num_attention_heads": 6,
        "num_key_value_heads": 6,
        "head_dim": 32,
        "rms_norm_eps": 1e-05,
        "rope_theta": 500000.0,
        "rope_scaling": {
            "factor": 8.0,
            "high_freq_factor": 4.0,
            "low_freq_factor": 1.0,
            "original_max_position_embeddings": 8192,
            "rope_type": "llama3",
        },
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "max_position_embeddings": 131072,
        "num_multi_token_pred": 10,
        "tie_word_embeddings": False,
        "use_cache": True,
    }
    return {
        "architectures": ["AutoGaze"],
        "model_type": "autogaze",
        "attn_mode": "sdpa",
        "use_flash_attn": False,
        "scales": "32+64+112+224",
        "num_vision_tokens_each_frame": 265,
        "max_num_frames": max_num_frames,
        "max_batch_size": None,
        "has_task_loss_requirement_during_inference": True,
        "has_task_loss_requirement_during_training": False,
        "gazing_ratio_config": {
            "sample_strategy_during_inference": "fixed",
            "sample_strategy_during_training": "fixed",
            "fixed": {"gazing_ratio": 0.75},
            "uniform": {"gazing_ratio_max": 1, "gazing_ratio_min": 0},
            "exponential": {"gazing_ratio_max": 1, "gazing_ratio_min": 0, "lambda": 10},
        },
        "gazing_ratio_each_frame_config": {
            "sample_strategy_during_inference": "uniform",
            "sample_strategy_during_training": "uniform",
            "dirichlet": {"alpha": 0.5},
            "self": {},
            "uniform": {},
        },
        "task_loss_requirement_config": {
            "sample_strategy_during_inference": "fixed",
            "sample_strategy_during_training": "fixed",
            "fixed": {"task_loss_requirement": 0.7},
            "uniform": {"task_loss_requirement_max": 0.9, "task_loss_requirement_min": 0.6},
        },
        "gaze_model_config": {
            "input_img_size": 224,
            "num_vision_tokens_each_frame": 265,
            "vision_model_config": {
                "hidden_dim": 192,
                "out_dim": 192,
                "depth": 1,
                "kernel_size": 16,
                "temporal_patch_size": 1,
                "trunk_temporal_kernel_size": 3,
                "trunk_spatial_kernel_size": 3,
            },
            "connector_config": {"hidden_dim": 192, "num_tokens": 196},
            "gaze_decoder_config": decoder,
        },
        "torch_dtype": "float32",
        "transformers_version": "4.51.3",
    }


PREPROCESSOR_CONFIG = {
    "crop_size": {"height": 224, "width": 224},
    "do_center_crop": False,
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": [0.485, 0.456, 0.406],
    "image_processor_type": "AutoGazeImageProcessor",
    "image_std": [0.229, 0.224, 0.225],
    "offset": True,
    "resample": 2,
    "rescale_factor": 0.00784313725490196,
    "size": {"shortest_edge": 224},
}


def random_weights(config: dict[str, Any], seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 tensors with the released names and shapes for ``config``."""
    rng = np.random.default_rng(seed)
    g = config["gaze_model_config"]
    v, d = g["vision_model_config"], g["gaze_decoder_config"]
    C, k, I = v["hidden_dim"], v["kernel_size"], d["intermediate_size"]
    H, Vv, K = d["hidden_size"], d["vocab_size"], d["num_multi_token_pred"]
    kt, ks = v["trunk_temporal_kernel_size"], v["trunk_spatial_kernel_size"]

    def normal(shape, std):
        return (rng.standard_normal(shape) * std).astype(np.float32)

    p = "gazing_model."
    w = {
        p + "vision_model.temporal_conv.weight": normal((C, 3, 1, k, k), (3 * k * k) ** -0.5),
        p + "vision_model.temporal_conv.bias": normal((C,), 0.02),
        p + "vision_model.norm.weight": (1 + normal((C,), 0.1)),
        p + "vision_model.norm.bias": normal((C,), 0.02),
        p + "vision_model.blocks.0.conv3d.weight": normal((C, C, kt, ks, ks), (C * kt * ks * ks) ** -0.5),
        p + "vision_model.blocks.0.conv3d.bias": normal((C,), 0.02),
        p + "vision_model.out_proj.weight": normal((v["out_dim"], C, 1, 1, 1), 0.3 * C**-0.5),
        p + "vision_model.out_proj.bias": normal((v["out_dim"],), 0.02),
        p + "connector.pos_embed": normal((g["connector_config"]["num_tokens"], H), 0.3),
        p + "gaze_decoder.model.embed_tokens.weight": normal((Vv, H), 0.3),
        p + "gaze_decoder.model.norm.weight": np.ones(H, np.float32),
        p + "gaze_decoder.lm_head.weight": normal((K * Vv, H), 0.15),
    }
    # The arranged channel: channel 0 of every input is a large constant, so after the final
    # RMSNorm it is ~constant and column 0 of the task-loss head acts as a bias near 0.7.
    w[p + "connector.pos_embed"][:, 0] = 4.0
    w[p + "gaze_decoder.model.embed_tokens.weight"][:, 0] = 4.0
    tl = normal((K, H), 0.016)
    tl[:, 0] = 0.30
    w[p + "gaze_decoder.task_loss_prediction_head.weight"] = tl
    for i in range(d["num_hidden_layers"]):
        q = f"{p}gaze_decoder.model.layers.{i}."
        w[q + "input_layernorm.weight"] = np.ones(H, np.float32)
        w[q + "post_attention_layernorm.weight"] = np.ones(H, np.float32)
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            w[q + f"self_attn.{name}.weight"] = normal((H, H), H**-0.5)
        w[q + "mlp.gate_proj.weight"] = normal((I, H), H**-0.5)
        w[q + "mlp.up_proj.weight"] = normal((I, H), H**-0.5)
        w[q + "mlp.down_proj.weight"] = normal((H, I), 0.5 * I**-0.5)
    return w


def random_model(
    directory: str | os.PathLike,
    seed: int = 0,
    config: Optional[dict[str, Any]] = None,
    dtype: str = "float32",
) -> Path:
    """Writes a model directory in the released format with random weights; returns its path.

    dtype: "float32", "float16" or "bfloat16" for the safetensors file (the loader upcasts).
    """
    from safetensors.numpy import save_file

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    config = config or released_config()
    weights = random_weights(config, seed)
    if dtype == "float16":
        weights = {k: v.astype(np.float16) for k, v in weights.items()}
    elif dtype == "bfloat16":
        weights = {k: _to_bf16_bits(v) for k, v in weights.items()}
    elif dtype != "float32":
        raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype!r}")
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR_CONFIG, indent=2))
    if dtype == "bfloat16":
        _save_bf16(weights, out / "model.safetensors")
    else:
        save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def _to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), round to nearest even."""
    b = x.astype(np.float32).view(np.uint32)
    b = b + 0x7FFF + ((b >> 16) & 1)
    return (b >> 16).astype(np.uint16)


def _save_bf16(weights: dict[str, np.ndarray], path: Path) -> None:
    """safetensors with BF16 entries (numpy has no bfloat16 dtype), written by hand."""
    header, offset, blobs = {}, 0, []
    for name in sorted(weights):
        data = np.ascontiguousarray(weights[name]).tobytes()
        header[name] = {"dtype": "BF16", "shape": list(weights[name].shape), "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
        blobs.append(data)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(len(h).to_bytes(8, "little"))
        f.write(h)
        for blob in blobs:
            f.write(blob)


def synthetic_video(num_frames: int = 16, height: int = 224, width: int = 224, seed: int = 0, batch: Optional[int] = None) -> np.ndarray:
    """A uint8 RGB clip with moving shapes and texture: (T, H, W, 3), or (B, T, H, W, 3)."""
    rng = np.random.default_rng(seed)
    B = batch or 1
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    out = np.empty((B, num_frames, height, width, 3), dtype=np.uint8)
    for b in range(B):
        base = rng.uniform(40, 200, size=3)
        freq = rng.uniform(0.02, 0.08, size=2)
        cx, cy = rng.uniform(0.2, 0.8) * width, rng.uniform(0.2, 0.8) * height
        vx, vy = rng.uniform(-4, 4, size=2)
        r = rng.uniform(0.1, 0.25) * min(height, width)
        color = rng.uniform(0, 255, size=3)
        for t in range(num_frames):
            img = base + 40 * np.sin(freq[0] * xx + 0.3 * t)[..., None] * np.cos(freq[1] * yy)[..., None]
            disk = (xx - cx - vx * t) ** 2 + (yy - cy - vy * t) ** 2 < r * r
            img[disk] = color
            img += rng.normal(0, 6, size=img.shape)
            out[b, t] = np.clip(img, 0, 255).astype(np.uint8)
    return out if batch else out[0]
