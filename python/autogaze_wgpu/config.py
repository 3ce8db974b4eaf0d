"""Typed views of the validated configs that the Rust loader returns.

Parsing and validation live in Rust (``rust/config.rs``): the wgpu engine needs them too, and
one parser means one set of error messages. These dataclasses only give Python code named,
typed access to the validated values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional


@dataclass(frozen=True)
class VisionModelConfig:
    hidden_dim: int
    out_dim: int
    depth: int
    kernel_size: int
    temporal_patch_size: int
    trunk_temporal_kernel_size: int
    trunk_spatial_kernel_size: int


@dataclass(frozen=True)
class ConnectorConfig:
    hidden_dim: int
    num_tokens: int


@dataclass(frozen=True)
class RopeScaling:
    rope_type: str
    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass(frozen=True)
class GazeDecoderConfig:
    vocab_size: int
    eos_token_id: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: Optional[RopeScaling]
    hidden_act: str
    num_multi_token_pred: int
    max_position_embeddings: int


@dataclass(frozen=True)
class AutoGazeConfig:
    scales: tuple[int, ...]
    num_vision_tokens_each_frame: int
    max_num_frames: int
    has_task_loss_requirement_during_inference: bool
    default_gazing_ratio: Optional[float]
    default_task_loss_requirement: Optional[float]
    input_img_size: int
    vision: VisionModelConfig
    connector: ConnectorConfig
    decoder: GazeDecoderConfig
    num_tokens_each_scale: tuple[int, ...]
    grid_each_scale: tuple[int, ...]

    @property
    def pad_token_id(self) -> int:
        """EOS doubles as the padding id (265 in the release)."""
        return self.decoder.eos_token_id

    @property
    def num_patches_per_side(self) -> int:
        return self.input_img_size // self.vision.kernel_size

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "AutoGazeConfig":
        dec = dict(d["decoder"])
        rs = dec.get("rope_scaling")
        dec["rope_scaling"] = _pick(RopeScaling, rs) if rs else None
        return cls(
            scales=tuple(d["scales"]),
            num_vision_tokens_each_frame=d["num_vision_tokens_each_frame"],
            max_num_frames=d["max_num_frames"],
            has_task_loss_requirement_during_inference=d[
                "has_task_loss_requirement_during_inference"
            ],
            default_gazing_ratio=d.get("default_gazing_ratio"),
            default_task_loss_requirement=d.get("default_task_loss_requirement"),
            input_img_size=d["input_img_size"],
            vision=_pick(VisionModelConfig, d["vision"]),
            connector=_pick(ConnectorConfig, d["connector"]),
            decoder=_pick(GazeDecoderConfig, dec),
            num_tokens_each_scale=tuple(d["num_tokens_each_scale"]),
            grid_each_scale=tuple(d["grid_each_scale"]),
        )

    @classmethod
    def from_pretrained(cls, path: str) -> "AutoGazeConfig":
        from . import _native

        return cls.from_dict(_native.load_config(str(path)))


def _pick(klass, d: dict[str, Any]):
    """Builds a dataclass from the keys it declares (the dict may carry more)."""
    names = klass.__dataclass_fields__.keys()
    return klass(**{k: d[k] for k in names})
