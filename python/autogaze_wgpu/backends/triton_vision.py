"""The torch backend's vision trunk (SPEC §3.3: the causal 3x3x3 Conv3d, then ReLU) as one
Triton implicit-GEMM kernel whose products are 3xTF32, float32 accuracy on tensor cores
(``triton_decode``'s module docstring says what that is and how exact it measures).

cuDNN runs float32 convolutions with TF32 off on FMAs. The trunk is the bulk of the vision
encoder's work (0.39 GFLOP a frame: 196 positions x 192 outputs x 27 taps x 192 inputs x 2;
281 GFLOP for 45 tiles x 16 frames), and cuDNN's convolutions took ~13 of such a clip's 15
ms of embedding on an H200 (docs/benchmarks.md). Here the
convolution is a GEMM over the frame's positions (rows) and output channels (columns) whose
reduction runs over the 27 taps x input channels, each tap's rows gathered from the
channel-last input shifted by (dt, di, dj): zeros outside the frame in space (padding 1),
and no padding in time (the caller puts the conv cache, the 2 frames before, in front).

The same convolution as the reference's ``nn.Conv3d`` up to summation order: within float32
noise of it (``tests/test_torch_fused_decode.py`` compares the embeddings). The patchify conv
and ``out_proj`` (GEMMs of 1/7 and 1/27 of the trunk's size) stay torch's.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _conv3d_relu(
    x_ptr, w_ptr, bias_ptr, y_ptr, M, T_OUT, T_IN,
    HS: tl.constexpr, WS: tl.constexpr, C: tl.constexpr, N: tl.constexpr,
    KT: tl.constexpr, KS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):
    """y (M, N) = relu(bias + sum over taps (dt, di, dj) of x[b, t + dt, i + di - KS//2,
    j + dj - KS//2] @ W[tap]) for the M = B * T_OUT * HS * WS output positions (b, t, i, j)
    in row-major order; x (B, T_IN, HS, WS, C) channel-last with T_IN = T_OUT + KT - 1,
    W (KT * KS * KS * C, N) (``conv_weight``)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    kk = tl.arange(0, BLOCK_K)
    rmask = rows < M
    cmask = cols < N
    j = rows % WS
    i = (rows // WS) % HS
    bt = rows // (HS * WS)
    frame = (bt // T_OUT) * T_IN + bt % T_OUT  # the first input frame the output sees
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for tap in range(KT * KS * KS):
        ii = i + (tap // KS) % KS - KS // 2
        jj = j + tap % KS - KS // 2
        ok = rmask & (ii >= 0) & (ii < HS) & (jj >= 0) & (jj < WS)
        src = (((frame + tap // (KS * KS)) * HS + ii) * WS + jj).to(tl.int64) * C
        for k0 in tl.static_range(0, C, BLOCK_K):
            km = (k0 + kk) < C
            a = tl.load(x_ptr + src[:, None] + (k0 + kk)[None, :], mask=ok[:, None] & km[None, :], other=0.0)
            w = tl.load(w_ptr + ((tap * C + k0 + kk).to(tl.int64) * N)[:, None] + cols[None, :],
                        mask=km[:, None] & cmask[None, :], other=0.0)
            acc = tl.dot(a, w, acc, input_precision=PRECISION)
    acc += tl.load(bias_ptr + cols, mask=cmask, other=0.0)[None, :]
    acc = tl.maximum(acc, 0.0)
    tl.store(y_ptr + rows.to(tl.int64)[:, None] * N + cols[None, :], acc, mask=rmask[:, None] & cmask[None, :])


class FusedVision:
    """The vision trunk's conv weights packed for ``_conv3d_relu`` (once per backend) and its
    launch: ``block`` stands in for ``ConvBlock.forward`` in ``ShallowVideoConvNet``."""

    # Output positions x output channels per program, input channels per reduction chunk,
    # warps, pipeline depth (scripts/tune_triton_decode.py --vision times alternatives).
    BLOCK_M, BLOCK_N, BLOCK_K, NUM_WARPS, NUM_STAGES = 64, 64, 64, 4, 3
    PRECISION = "tf32x3"
    # Under Triton's interpreter (CPU tests) each op costs ~0.1 ms whatever its size.
    INTERPRETER_TILES = {"BLOCK_M": 1024, "BLOCK_N": 256, "BLOCK_K": 256}

    def __init__(self, backend):
        from .triton_decode import _interpreted

        self.weights = {}
        for blk in backend.model.vision_model.blocks:
            conv = blk.conv3d
            n, c, kt, kh, kw = conv.weight.shape
            # (N, C, KT, KS, KS) -> (KT, KS, KS, C, N): a tap's rows are its input channels
            w = conv.weight.detach().float().permute(2, 3, 4, 1, 0).reshape(kt * kh * kw * c, n).contiguous()
            self.weights[blk] = (w, conv.bias.detach().float().contiguous(), (kt, kh, kw, c, n))
        if _interpreted(backend.device):
            for name, value in self.INTERPRETER_TILES.items():
                setattr(self, name, value)

    @classmethod
    def supported(cls, cfg) -> bool:
        """Whether the kernel fits the trunk: a cubic-in-space kernel with 'same' padding."""
        v = cfg.vision
        return v.trunk_spatial_kernel_size % 2 == 1

    def block(self, blk, x, cache):
        """``blk`` (a ConvBlock) on x (B, C, T, h, w) with ``cache`` (B, C, kt - 1, h, w), the
        frames before x: relu(conv3d(cat(cache, x))) as (B, C, T, h, w), a view of a
        channel-last tensor."""
        import torch

        w, bias, (kt, ks, _, c, n) = self.weights[blk]
        # channel-last (B, T_in, h, w, C): the LayerNorm's output already is (x is a view)
        xin = torch.cat([cache.permute(0, 2, 3, 4, 1), x.permute(0, 2, 3, 4, 1)], dim=1).float()
        B, T_in, h, wd, _ = xin.shape
        T = T_in - (kt - 1)
        M = B * T * h * wd
        y = torch.empty(B, T, h, wd, n, device=xin.device, dtype=torch.float32)
        _conv3d_relu[(triton.cdiv(M, self.BLOCK_M), triton.cdiv(n, self.BLOCK_N))](
            xin, w, bias, y, M, T, T_in,
            HS=h, WS=wd, C=c, N=n, KT=kt, KS=ks,
            BLOCK_M=self.BLOCK_M, BLOCK_N=self.BLOCK_N, BLOCK_K=self.BLOCK_K, PRECISION=self.PRECISION,
            num_warps=self.NUM_WARPS, num_stages=self.NUM_STAGES,
        )
        return y.permute(0, 4, 1, 2, 3)
