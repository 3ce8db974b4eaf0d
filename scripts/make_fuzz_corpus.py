"""Writes the seed corpus of the loader fuzzers, ``tests/fuzz_corpus/`` (deterministic).

Run with the package installed: ``.venv/bin/python scripts/make_fuzz_corpus.py``. The files are
committed; both fuzzers read them (``rust/fuzz.rs`` with proptest, ``tests/test_fuzz_inputs.py``
with hypothesis): every file is checked as-is, then used as a seed for mutations.

* ``config/*.json``: whole ``config.json`` files. ``ok_*`` must load, every other file must be
  refused with ``ConfigError``.
* ``weights/config.json``: a tiny valid config (8 channels, 4 tokens per frame, ~12 KB of
  weights) that the weights seeds are checked against; ``weights/*.safetensors``: ``ok_*``
  must load, every other file must be refused with ``WeightsError``.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import numpy as np
from autogaze_wgpu.testing import _save_bf16, _to_bf16_bits, random_weights, released_config

OUT = Path(__file__).resolve().parent.parent / "tests" / "fuzz_corpus"


def tiny_config() -> dict:
    """The smallest config the loaders accept that still has every part of the model."""
    c = released_config(num_hidden_layers=1, max_num_frames=4)
    c["scales"] = "8"
    c["num_vision_tokens_each_frame"] = 4
    g = c["gaze_model_config"]
    g["input_img_size"] = 8
    g["num_vision_tokens_each_frame"] = 4
    g["vision_model_config"].update(hidden_dim=8, out_dim=8, kernel_size=4)
    g["connector_config"] = {"hidden_dim": 8, "num_tokens": 4}
    g["gaze_decoder_config"].update(
        vocab_size=5,
        eos_token_id=4,
        hidden_size=8,
        intermediate_size=16,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=4,
        num_multi_token_pred=2,
    )
    return c


def _set(cfg: dict, path: str, value) -> dict:
    node = cfg
    keys = path.split("/")
    for k in keys[:-1]:
        node = node[k]
    if value is _DELETE:
        del node[keys[-1]]
    else:
        node[keys[-1]] = value
    return cfg


_DELETE = object()
DEC = "gaze_model_config/gaze_decoder_config"


def config_seeds() -> dict[str, bytes]:
    rel = released_config()
    out = {
        "ok_released.json": json.dumps(rel, indent=2).encode(),
        "ok_tiny.json": json.dumps(tiny_config()).encode(),
    }
    # The optional keys absent: the official defaults apply.
    minimal = json.loads(json.dumps(rel))
    for path in (
        "gazing_ratio_config",
        "task_loss_requirement_config",
        f"{DEC}/head_dim",
        f"{DEC}/num_key_value_heads",
        f"{DEC}/rope_scaling",
    ):
        _set(minimal, path, _DELETE)
    out["ok_minimal.json"] = json.dumps(minimal).encode()

    edits = {
        "string_for_int": (f"{DEC}/hidden_size", "192"),
        "float_for_int": (f"{DEC}/num_hidden_layers", 4.5),
        "null_section": ("gaze_model_config", None),
        "absurd_hidden_size": (f"{DEC}/hidden_size", 10**9),
        "absurd_vocab": (f"{DEC}/vocab_size", 2**64 - 1),
        "negative_size": (f"{DEC}/hidden_size", -1),
        "heads_vs_hidden": (f"{DEC}/num_attention_heads", 5),
        "scales_vs_tokens": ("scales", "32+64+112"),
        "scales_garbage": ("scales", "32+sixty"),
        "vocab_vs_tokens": (f"{DEC}/vocab_size", 300),
        "ratio_out_of_range": ("gazing_ratio_config/fixed/gazing_ratio", 1.5),
        "missing_decoder": (f"{DEC}", _DELETE),
        "gqa": (f"{DEC}/num_key_value_heads", 2),
        "rope_yarn": (f"{DEC}/rope_scaling/rope_type", "yarn"),
    }
    for name, (path, value) in edits.items():
        out[f"{name}.json"] = json.dumps(_set(json.loads(json.dumps(rel)), path, value)).encode()
    out["empty.json"] = b""
    out["not_json.json"] = b"{not json"
    out["not_utf8.json"] = b"\xff\xfe{"
    out["array.json"] = b"[1, 2, 3]"
    out["deep_nesting.json"] = b"[" * 10_000  # serde_json's recursion limit
    out["number_overflow.json"] = (
        b'{"scales": "32+64+112+224", "num_vision_tokens_each_frame": 1e400}'
    )
    return out


def _pack(header: dict, data: bytes) -> bytes:
    hb = json.dumps(header).encode()
    hb += b" " * (-len(hb) % 8)
    return struct.pack("<Q", len(hb)) + hb + data


def weights_seeds(cfg: dict) -> dict[str, bytes]:
    from safetensors.numpy import save

    w = random_weights(cfg, seed=0)
    f32 = save(w, metadata={"format": "pt"})
    out = {
        "ok_tiny_f32.safetensors": f32,
        "ok_tiny_f16.safetensors": save({k: v.astype(np.float16) for k, v in w.items()}),
    }
    tmp = OUT / "weights" / ".bf16.tmp"
    _save_bf16({k: _to_bf16_bits(v) for k, v in w.items()}, tmp)
    out["ok_tiny_bf16.safetensors"] = tmp.read_bytes()
    tmp.unlink()

    (n,) = struct.unpack("<Q", f32[:8])
    header, data = json.loads(f32[8 : 8 + n]), f32[8 + n :]
    names = sorted(
        (k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0]
    )
    a, b = names[0], names[1]

    def edited(fn) -> bytes:
        h = json.loads(json.dumps(header))
        fn(h)
        return _pack(h, data)

    out["header_length_huge.safetensors"] = struct.pack("<Q", 2**62) + f32[8:]
    out["header_length_past_end.safetensors"] = struct.pack("<Q", len(f32)) + f32[8:]
    out["header_length_short.safetensors"] = struct.pack("<Q", n // 2) + f32[8:]
    out["header_not_json.safetensors"] = struct.pack("<Q", 16) + b"this is not json" + data
    out["overlapping_offsets.safetensors"] = edited(
        lambda h: h[b].update(data_offsets=h[a]["data_offsets"])
    )
    out["out_of_range_offsets.safetensors"] = edited(
        lambda h: h[a].update(
            data_offsets=[h[a]["data_offsets"][0], h[a]["data_offsets"][1] + 10**12]
        )
    )
    out["int32_dtype.safetensors"] = edited(lambda h: h[a].update(dtype="I32"))
    out["wrong_shape.safetensors"] = edited(lambda h: h[a].update(shape=[1] + h[a]["shape"]))
    out["extra_tensor.safetensors"] = _pack(
        dict(
            header,
            **{
                "gazing_model.extra": {
                    "dtype": "F32",
                    "shape": [1],
                    "data_offsets": [len(data), len(data) + 4],
                }
            },
        ),
        data + b"\0" * 4,
    )
    last = names[-1]
    out["missing_tensor.safetensors"] = _pack(
        {k: v for k, v in header.items() if k != last}, data[: header[last]["data_offsets"][0]]
    )
    for name, value in (("inf", np.inf), ("neg_inf", -np.inf), ("nan", np.nan)):
        bad = bytearray(data)
        start = header[a]["data_offsets"][0]
        bad[start : start + 4] = struct.pack("<f", value)
        out[f"{name}_weight.safetensors"] = _pack(header, bytes(bad))
    out["truncated.safetensors"] = f32[: len(f32) // 2]
    out["truncated_in_header.safetensors"] = f32[:100]
    out["empty.safetensors"] = b""
    out["seven_bytes.safetensors"] = b"\0" * 7
    return out


def input_seeds() -> dict[str, bytes]:
    """Seeds of scripts/fuzz_atheris.py's `inputs` target: atheris reads its choices (which
    check, dtype, rank, sizes, values) out of these bytes, so any bytes are valid; a spread of
    lengths (deterministic SHA-256 streams) starts it on every branch."""
    out = {}
    for i, n in enumerate((4, 16, 16, 64, 64, 256, 256, 1024)):
        stream, block = b"", hashlib.sha256(f"atheris-seed-{i}".encode()).digest()
        while len(stream) < n:
            stream += block
            block = hashlib.sha256(block).digest()
        out[f"seed_{i}_{n}.bin"] = stream[:n]
    out["zeros_64.bin"] = b"\0" * 64
    out["ones_64.bin"] = b"\xff" * 64
    return out


def main() -> None:
    for sub in ("config", "weights", "inputs"):
        d = OUT / sub
        d.mkdir(parents=True, exist_ok=True)
        for old in d.iterdir():
            old.unlink()
    for name, blob in config_seeds().items():
        (OUT / "config" / name).write_bytes(blob)
    cfg = tiny_config()
    (OUT / "weights" / "config.json").write_text(json.dumps(cfg, indent=2))
    for name, blob in weights_seeds(cfg).items():
        (OUT / "weights" / name).write_bytes(blob)
    for name, blob in input_seeds().items():
        (OUT / "inputs" / name).write_bytes(blob)
    total = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    print(f"wrote {sum(1 for _ in OUT.rglob('*.*'))} files, {total} bytes, to {OUT}")


if __name__ == "__main__":
    main()
