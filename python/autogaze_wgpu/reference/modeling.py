"""The AutoGaze network as plain, readable torch (the parity oracle).

One file, upstream names (``ShallowVideoConvNet``, ``Connector``, the LLaMA ``gaze_decoder``
with its ``lm_head`` and ``task_loss_prediction_head``), shape comments, float32 throughout.
Parameter names equal the released checkpoint's (minus the ``gazing_model.`` prefix), so
``load_state_dict`` checks that the key sets match.

What each part computes is specified in SPEC.md §2-4. Generation (the per-frame loop with its
quirks) lives in ``generation.py``; this file only has the layers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import AutoGazeConfig, GazeDecoderConfig

# ---------------------------------------------------------------------------------------------
# Input resize (SPEC §2.3)
# ---------------------------------------------------------------------------------------------


def resize_to_model_input(video: torch.Tensor, size: int) -> torch.Tensor:
    """(B, T, 3, H, W) -> (B, T, 3, size, size), bicubic, align_corners=False, no antialias.

    The official generate/forward always squash every frame to size x size (A = -0.75,
    border-clamped). A frame already of that size passes unchanged (the bicubic kernel is the
    identity there, so skipping it is exact).
    """
    B, T, C, H, W = video.shape
    if (H, W) == (size, size):
        return video
    x = video.reshape(B * T, C, H, W)
    x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False)
    return x.reshape(B, T, C, size, size)


# ---------------------------------------------------------------------------------------------
# Vision encoder and connector (SPEC §3)
# ---------------------------------------------------------------------------------------------


class ConvBlock(nn.Module):
    """Causal Conv3d (3x3x3, spatial padding 1, no temporal padding) followed by ReLU."""

    def __init__(self, dim: int, temporal_kernel: int, spatial_kernel: int):
        super().__init__()
        self.temporal_kernel = temporal_kernel
        self.conv3d = nn.Conv3d(
            dim,
            dim,
            kernel_size=(temporal_kernel, spatial_kernel, spatial_kernel),
            padding=(0, spatial_kernel // 2, spatial_kernel // 2),
        )

    def forward(self, x: torch.Tensor, cache: Optional[torch.Tensor]) -> torch.Tensor:
        # x: (B, C, T, h, w) post-LayerNorm; cache: (B, C, kt-1, h, w), the frames before x
        # (zeros before frame 0). Returns (B, C, T, h, w).
        x = torch.cat([cache, x], dim=2)
        return F.relu(self.conv3d(x))


class ShallowVideoConvNet(nn.Module):
    """Patchify conv -> LayerNorm -> causal 3x3x3 conv + ReLU -> 1x1 conv (per frame, causal)."""

    def __init__(self, cfg: AutoGazeConfig):
        super().__init__()
        v = cfg.vision
        self.kernel_size = v.kernel_size
        self.temporal_conv = nn.Conv3d(
            3,
            v.hidden_dim,
            kernel_size=(v.temporal_patch_size, v.kernel_size, v.kernel_size),
            stride=(v.temporal_patch_size, v.kernel_size, v.kernel_size),
        )
        self.norm = nn.LayerNorm(v.hidden_dim, eps=1e-5)
        self.blocks = nn.ModuleList(
            [
                ConvBlock(v.hidden_dim, v.trunk_temporal_kernel_size, v.trunk_spatial_kernel_size)
                for _ in range(v.depth)
            ]
        )
        self.out_proj = nn.Conv3d(v.hidden_dim, v.out_dim, kernel_size=1)

    def forward(
        self, video: torch.Tensor, conv_cache: Optional[torch.Tensor] = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """video (B, T, 3, S, S) -> (features (B, T, h*w, C), new conv cache (B, C, kt-1, h, w)).

        ``conv_cache`` holds the last kt-1 post-LayerNorm frames before ``video`` (None: the
        clip starts here, zeros).
        """
        x = video.permute(0, 2, 1, 3, 4)  # (B, 3, T, S, S)
        x = self.temporal_conv(x)  # (B, C, T, h, w)
        x = self.norm(x.permute(0, 2, 3, 4, 1)).permute(0, 4, 1, 2, 3)  # LayerNorm over C
        B, C, T, h, w = x.shape
        kt = self.blocks[0].temporal_kernel
        if conv_cache is None:
            conv_cache = x.new_zeros(B, C, kt - 1, h, w)
        new_cache = torch.cat([conv_cache, x], dim=2)[:, :, -(kt - 1) :]
        for blk in self.blocks:
            x = blk(x, conv_cache)
        x = self.out_proj(x)  # (B, C_out, T, h, w)
        feats = x.permute(0, 2, 3, 4, 1).reshape(B, T, h * w, -1)  # row-major tokens
        return feats, new_cache


class Connector(nn.Module):
    """Adds the learned position embedding to the 196 vision tokens of each frame."""

    def __init__(self, cfg: AutoGazeConfig):
        super().__init__()
        self.pos_embed = nn.Parameter(torch.zeros(cfg.connector.num_tokens, cfg.connector.hidden_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.pos_embed  # (B, T, 196, C)


# ---------------------------------------------------------------------------------------------
# Decoder: LLaMA with multi-token heads (SPEC §4)
# ---------------------------------------------------------------------------------------------


def rope_inv_freq(cfg: GazeDecoderConfig) -> torch.Tensor:
    """inv_freq (head_dim/2,) in float32, with llama3 smoothing, exactly as transformers."""
    dim = cfg.head_dim
    inv_freq = 1.0 / (
        cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float) / dim)
    )
    rs = cfg.rope_scaling
    if rs is None or rs.rope_type == "default":
        return inv_freq
    factor = rs.factor
    old_len = rs.original_max_position_embeddings
    low_freq_wavelen = old_len / rs.low_freq_factor
    high_freq_wavelen = old_len / rs.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    inv_freq_llama = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - rs.low_freq_factor) / (rs.high_freq_factor - rs.low_freq_factor)
    smoothed = (1 - smooth) * inv_freq_llama / factor + smooth * inv_freq_llama
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, inv_freq_llama)


def rope_cos_sin(inv_freq: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """position_ids (B, L) -> cos, sin (B, L, head_dim); angle = float32(position * inv_freq)."""
    freqs = position_ids.to(torch.float32)[:, :, None] * inv_freq[None, None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


class LlamaRMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        var = x.pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(var + self.eps))


@dataclass
class KVCache:
    """Per-layer keys/values of every token run so far, plus their 0/1 key mask.

    ``key_mask`` (B, L) is 1 for vision tokens and real gaze tokens, 0 for padded gaze tokens
    of finished frames (within the frame being generated every token has mask 1, SPEC §5.4).
    """

    keys: list[Optional[torch.Tensor]] = field(default_factory=list)  # (B, nh, L, hs)
    values: list[Optional[torch.Tensor]] = field(default_factory=list)

    @property
    def length(self) -> int:
        return 0 if not self.keys or self.keys[0] is None else self.keys[0].shape[2]


class LlamaAttention(nn.Module):
    def __init__(self, cfg: GazeDecoderConfig):
        super().__init__()
        self.n_head = cfg.num_attention_heads
        self.head_dim = cfg.head_dim
        C = cfg.hidden_size
        self.q_proj = nn.Linear(C, self.n_head * self.head_dim, bias=False)
        self.k_proj = nn.Linear(C, self.n_head * self.head_dim, bias=False)
        self.v_proj = nn.Linear(C, self.n_head * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, C, bias=False)
        self.scaling = self.head_dim**-0.5

    def forward(self, x, cos, sin, bias, cache: KVCache, layer: int):
        # x (B, L, C); cos/sin (B, L, hs); bias (B, 1, L, L_past+L) additive mask
        B, L, _ = x.shape
        q = self.q_proj(x).view(B, L, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, L, hs)
        k = self.k_proj(x).view(B, L, self.n_head, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, L, self.n_head, self.head_dim).transpose(1, 2)
        cos, sin = cos[:, None], sin[:, None]
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if cache.keys[layer] is not None:
            k = torch.cat([cache.keys[layer], k], dim=2)
            v = torch.cat([cache.values[layer], v], dim=2)
        cache.keys[layer], cache.values[layer] = k, v
        att = torch.matmul(q, k.transpose(2, 3)) * self.scaling + bias  # (B, nh, L, L_all)
        att = F.softmax(att, dim=-1, dtype=torch.float32)
        y = torch.matmul(att, v)  # (B, nh, L, hs)
        y = y.transpose(1, 2).reshape(B, L, -1)
        return self.o_proj(y)


class LlamaMLP(nn.Module):
    def __init__(self, cfg: GazeDecoderConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: GazeDecoderConfig):
        super().__init__()
        self.input_layernorm = LlamaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = LlamaAttention(cfg)
        self.post_attention_layernorm = LlamaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = LlamaMLP(cfg)

    def forward(self, x, cos, sin, bias, cache, layer):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, bias, cache, layer)
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x


class LlamaModel(nn.Module):
    def __init__(self, cfg: GazeDecoderConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList([LlamaDecoderLayer(cfg) for _ in range(cfg.num_hidden_layers)])
        self.norm = LlamaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)


class GazeDecoder(nn.Module):
    """LLaMA decoder whose last position predicts K next gaze tokens and K task losses."""

    def __init__(self, cfg: GazeDecoderConfig):
        super().__init__()
        self.cfg = cfg
        self.model = LlamaModel(cfg)
        K, V = cfg.num_multi_token_pred, cfg.vocab_size
        self.lm_head = nn.Linear(cfg.hidden_size, K * V, bias=False)  # head-major: k*V + id
        self.task_loss_prediction_head = nn.Linear(cfg.hidden_size, K, bias=False)

    def new_cache(self) -> KVCache:
        n = self.cfg.num_hidden_layers
        return KVCache(keys=[None] * n, values=[None] * n)

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        position_ids: torch.Tensor,
        key_mask: torch.Tensor,
        cache: KVCache,
    ) -> torch.Tensor:
        """Runs L new tokens after the cached ones; returns the final hidden states (B, L, C).

        inputs_embeds (B, L, C); position_ids (B, L); key_mask (B, L_past + L) 0/1 for every
        key (cached and new). Attention is causal plus the key mask; the new K/V are appended
        to ``cache``.
        """
        B, L, _ = inputs_embeds.shape
        L_past = cache.length
        L_all = L_past + L
        assert key_mask.shape == (B, L_all), (key_mask.shape, B, L_all)
        q_idx = torch.arange(L_past, L_all, device=inputs_embeds.device)
        k_idx = torch.arange(L_all, device=inputs_embeds.device)
        allowed = (k_idx[None, :] <= q_idx[:, None])[None] & key_mask[:, None, :].bool()
        # Additive mask as transformers builds it (dtype min rather than -inf).
        bias = torch.zeros(B, 1, L, L_all, device=inputs_embeds.device, dtype=torch.float32)
        bias.masked_fill_(~allowed[:, None], torch.finfo(torch.float32).min)
        cos, sin = rope_cos_sin(self.model.inv_freq, position_ids)
        x = inputs_embeds
        for i, layer in enumerate(self.model.layers):
            x = layer(x, cos, sin, bias, cache, i)
        return self.model.norm(x)

    def heads(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """h (B, L, C) -> logits (B, L, K, V), task_loss_prediction (B, L, K)."""
        K, V = self.cfg.num_multi_token_pred, self.cfg.vocab_size
        logits = self.lm_head(h).view(*h.shape[:-1], K, V)
        return logits, self.task_loss_prediction_head(h)


class GazingModel(nn.Module):
    """``gazing_model``: vision encoder + connector + gaze decoder."""

    def __init__(self, cfg: AutoGazeConfig):
        super().__init__()
        self.cfg = cfg
        self.vision_model = ShallowVideoConvNet(cfg)
        self.connector = Connector(cfg)
        self.gaze_decoder = GazeDecoder(cfg.decoder)

    def embed(
        self, video: torch.Tensor, conv_cache: Optional[torch.Tensor] = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """video (B, T, 3, H, W) -> (vision embeds (B, T, 196, C), new conv cache)."""
        video = resize_to_model_input(video, self.cfg.input_img_size)
        feats, cache = self.vision_model(video, conv_cache)
        return self.connector(feats), cache

    @classmethod
    def from_weights(cls, cfg: AutoGazeConfig, weights: dict) -> "GazingModel":
        """Builds the model from the loader's ``{name: float32 array}`` (names with prefix)."""
        model = cls(cfg)
        prefix = "gazing_model."
        state = {k[len(prefix) :]: torch.from_numpy(v) for k, v in weights.items() if k.startswith(prefix)}
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            from ..errors import WeightsError

            raise WeightsError(
                f"checkpoint does not match the reference model: missing {missing}, "
                f"unexpected {unexpected}"
            )
        return model.eval()
