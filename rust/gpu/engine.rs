//! The model on the GPU: weights uploaded once, preallocated workspaces, `embed`,
//! GPU-resident `generate`, teacher-forced `score`, streaming sessions; input as float32
//! pixel values or as uint8 frames that the processor's resize + normalisation turn into
//! them on the GPU ([`Frames`]).
//!
//! Data flow of one clip (see ARCHITECTURE.md):
//!
//! 1. vision (per chunk of frames, all batch rows at once): [uint8 frames: PIL-exact
//!    bilinear resize passes + normalisation table] -> [bicubic resize] -> patchify GEMM
//!    -> LayerNorm into the causal-conv ring -> 3x3x3 conv GEMM + ReLU -> 1x1 conv GEMM
//!    + bias + pos_embed = `vis`;
//! 2. per frame: the prefill forward (the previous frame's un-run last step + 196 vision
//!    tokens), the heads at the last slot, one selection step; then `ceil(M/10) - 1` decode
//!    forwards of 10 tokens, each followed by heads and selection. Every kernel of a decode
//!    step returns at once when the frame is already done (`S_DONE` in the `gen` buffer), so
//!    the command stream is fixed on the CPU while the step count stays data-dependent on
//!    the GPU;
//! 3. one readback of the `out` buffer (tokens and frame lengths) per clip, or per frame in a
//!    streaming session.
//!
//! The whole clip is one submit (several only when the frames do not fit the adapter's
//! buffer limits at once, one per chunk of frames).

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use crate::config::AutoGazeConfig;
use crate::error::{Error, Result};
use crate::weights::Weights;

use super::buffer::{KernelTime, ParamArena, Recorder, round_size};
use super::context::{DeviceMemory, GpuContext};
use super::ops::attention::{Attention, AttnParams};
use super::ops::layernorm::{LayerNorm, LnShape};
use super::ops::matmul::{ALoad, Epi, Extra, Matmul, MatmulParams, MatmulSpec, Tile};
use super::ops::pil_resize::{Dst, PilResize, Src, frame_words, plan};
use super::ops::resize::Bicubic;
use super::ops::score::{Score, ScoreParams};
use super::ops::select::{Select, SelectParams, layout};
use super::rope;

/// Keys per attention chunk in a prefill forward.
const CHUNK_PRE: usize = 256;
/// Keys per attention chunk in a decode step (on an H100, 32/64/256 were no faster for a clip
/// or 45 tiles: the merge grows as the chunks shrink).
const CHUNK_DEC: usize = 128;
/// Extra KV-cache slots beyond the frames' tokens (the plan of the frame after the last).
const CAP_SLACK: usize = 224;

/// Where the fixtures live: `$AUTOGAZE_FIXTURES`, else `<crate>/../shared/fixtures/official`.
pub fn fixtures_dir() -> PathBuf {
    match std::env::var_os("AUTOGAZE_FIXTURES") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures/official"),
    }
}

/// Generation settings (SPEC §5).
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateParams {
    /// Gazing ratio of each frame (len T); budget M = max(1, floor(f32(ratio) * 265)).
    pub gazing_ratio_each_frame: Vec<f32>,
    /// Task-loss requirement (None: no task-loss stopping).
    pub task_loss_requirement: Option<f32>,
}

/// Output of [`Engine::generate`] (SPEC §5 "Outputs").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GenerateOutput {
    pub batch: usize,
    /// [B, N]: token + 265 t (padded slots read 265 (t + 1)).
    pub gazing_pos: Vec<i64>,
    /// [B, N].
    pub if_padded_gazing: Vec<bool>,
    /// [T].
    pub num_gazing_each_frame: Vec<usize>,
}

/// Output of one streaming step: the frame's tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepOutput {
    pub batch: usize,
    /// [B, n]: ids within the frame (0..265), pad = 265.
    pub tokens: Vec<i64>,
    /// [B, n].
    pub if_padded: Vec<bool>,
    /// n (shared by the batch).
    pub num_gazing: usize,
}

/// Model sizes the kernels are launched with (from the config).
#[derive(Debug, Clone, Copy)]
struct Dims {
    c: usize,
    p: usize,
    grid: usize,
    img: usize,
    ps: usize,
    k: usize,
    vocab: usize,
    pad: usize,
    /// Gaze targets per frame (265): the most slots a frame can have.
    nv: usize,
    heads: usize,
    hd: usize,
    ffn: usize,
    layers: usize,
    eps_rms: f32,
    eps_ln: f32,
}

impl Dims {
    fn from_config(cfg: &AutoGazeConfig) -> Result<Self> {
        let d = &cfg.decoder;
        let v = &cfg.vision;
        let bad = |m: String| Err(Error::config("config.json", m));
        if v.depth != 1 || v.temporal_patch_size != 1 {
            return bad("the wgpu engine supports vision depth 1 and temporal_patch_size 1".into());
        }
        if v.trunk_temporal_kernel_size != 3 || v.trunk_spatial_kernel_size != 3 {
            return bad("the wgpu engine supports 3x3x3 trunk convolutions only".into());
        }
        if v.hidden_dim != v.out_dim
            || v.out_dim != d.hidden_size
            || cfg.connector.hidden_dim != d.hidden_size
        {
            return bad(
                "vision hidden/out dims, connector and decoder hidden size must be equal".into(),
            );
        }
        if d.num_key_value_heads != d.num_attention_heads
            || !d.head_dim.is_multiple_of(4)
            || d.head_dim * d.num_attention_heads != d.hidden_size
        {
            return bad(
                "the wgpu engine needs heads * head_dim = hidden_size, head_dim % 4 == 0, no GQA"
                    .into(),
            );
        }
        if d.hidden_act != "silu" {
            return bad(format!("unsupported hidden_act {}", d.hidden_act));
        }
        let k = d.num_multi_token_pred;
        let nv = cfg.num_vision_tokens_each_frame;
        if k == 0
            || k > 16
            || nv + 1 != d.vocab_size
            || d.eos_token_id != nv
            || d.vocab_size > 320
            || nv > layout::MAX_FRAME
        {
            return bad("the wgpu engine needs K <= 16, vocab = V + 1 <= 277 and eos = V".into());
        }
        let grid = cfg.patches_per_side();
        if grid * grid != cfg.connector.num_tokens {
            return bad("connector num_tokens must be (input_img_size / kernel_size)^2".into());
        }
        Ok(Self {
            c: d.hidden_size,
            p: cfg.connector.num_tokens,
            grid,
            img: cfg.input_img_size,
            ps: v.kernel_size,
            k,
            vocab: d.vocab_size,
            pad: d.eos_token_id,
            nv,
            heads: d.num_attention_heads,
            hd: d.head_dim,
            ffn: d.intermediate_size,
            layers: d.num_hidden_layers,
            eps_rms: d.rms_norm_eps as f32,
            eps_ln: 1e-5,
        })
    }

    fn nt_pre(&self) -> usize {
        self.k + self.p
    }
    /// Token slots of one teacher-forced score forward: the most whole groups of K that fit
    /// the prefill's activation rows (200 for K = 10 and 196 patches).
    fn score_lead(&self) -> usize {
        (self.nt_pre() / self.k) * self.k
    }
    fn head_rows(&self) -> usize {
        self.k * self.vocab + self.k
    }
    /// Budget M of a frame: max(1, floor(f32(ratio) * V)), at most V (exhaustion).
    fn budget(&self, ratio: f32) -> usize {
        let m = (ratio * self.nv as f32).floor();
        let m = if m.is_finite() && m > 0.0 {
            m as usize
        } else {
            0
        };
        m.clamp(1, self.nv)
    }
}

#[derive(Debug, Clone)]
struct LayerOff {
    in_g: usize,
    qkv: usize,
    o: usize,
    post_g: usize,
    gu: usize,
    down: usize,
}

/// Offsets (in f32 elements) of every tensor in the packed weight buffer.
#[derive(Debug, Clone)]
struct Offsets {
    patch_w: usize,
    patch_b: usize,
    ln_w: usize,
    ln_b: usize,
    conv_w: usize,
    conv_b: usize,
    out_w: usize,
    out_b: usize,
    pos: usize,
    embed: usize,
    layers: Vec<LayerOff>,
    norm: usize,
    head: usize,
}

/// Packs all weights into one f32 array with the layouts the kernels expect:
/// conv3 weight as [out][tap][in]; q/k/v rows permuted so RoPE pairs are adjacent; gate/up
/// rows interleaved; lm_head followed by the task-loss head.
fn pack(cfg: &AutoGazeConfig, d: &Dims, w: &Weights) -> Result<(Vec<f32>, Offsets)> {
    let mut buf: Vec<f32> = Vec::with_capacity(3_400_000);
    let get = |name: &str| -> Result<&[f32]> {
        let full = format!("{}{name}", crate::weights::PREFIX);
        let t = w.get(&full)?;
        Ok(&t.data)
    };
    let check = |name: &str, data: &[f32], n: usize| -> Result<()> {
        if data.len() != n {
            return Err(Error::weights(
                &w.source,
                format!("{name}: {} values, expected {n}", data.len()),
            ));
        }
        Ok(())
    };
    let push = |buf: &mut Vec<f32>, name: &str, n: usize| -> Result<usize> {
        let data = get(name)?;
        check(name, data, n)?;
        let off = buf.len();
        buf.extend_from_slice(data);
        Ok(off)
    };
    let c = d.c;
    let vm = "vision_model.";
    let patch_w = push(
        &mut buf,
        &format!("{vm}temporal_conv.weight"),
        c * 3 * d.ps * d.ps,
    )?;
    let patch_b = push(&mut buf, &format!("{vm}temporal_conv.bias"), c)?;
    let ln_w = push(&mut buf, &format!("{vm}norm.weight"), c)?;
    let ln_b = push(&mut buf, &format!("{vm}norm.bias"), c)?;
    let conv_w = {
        let name = format!("{vm}blocks.0.conv3d.weight");
        let src = get(&name)?;
        check(&name, src, c * c * 27)?;
        let off = buf.len();
        buf.resize(off + c * c * 27, 0.0);
        for o in 0..c {
            for i in 0..c {
                for tap in 0..27 {
                    buf[off + (o * 27 + tap) * c + i] = src[(o * c + i) * 27 + tap];
                }
            }
        }
        off
    };
    let conv_b = push(&mut buf, &format!("{vm}blocks.0.conv3d.bias"), c)?;
    let out_w = push(&mut buf, &format!("{vm}out_proj.weight"), c * c)?;
    let out_b = push(&mut buf, &format!("{vm}out_proj.bias"), c)?;
    let pos = push(&mut buf, "connector.pos_embed", d.p * c)?;
    let gd = "gaze_decoder.model.";
    let embed = push(&mut buf, &format!("{gd}embed_tokens.weight"), d.vocab * c)?;
    let mut layers = Vec::new();
    for l in 0..d.layers {
        let pre = format!("{gd}layers.{l}.");
        let in_g = push(&mut buf, &format!("{pre}input_layernorm.weight"), c)?;
        let qkv = {
            let q = get(&format!("{pre}self_attn.q_proj.weight"))?;
            let k = get(&format!("{pre}self_attn.k_proj.weight"))?;
            let v = get(&format!("{pre}self_attn.v_proj.weight"))?;
            for (n, t) in [("q_proj", q), ("k_proj", k), ("v_proj", v)] {
                check(n, t, c * c)?;
            }
            let off = buf.len();
            for r in 0..3 * c {
                let (sec, wi) = (r / c, r % c);
                let (h, e) = (wi / d.hd, wi % d.hd);
                let orig = h * d.hd + e / 2 + (e % 2) * (d.hd / 2);
                let src = [q, k, v][sec];
                buf.extend_from_slice(&src[orig * c..(orig + 1) * c]);
            }
            off
        };
        let o = push(&mut buf, &format!("{pre}self_attn.o_proj.weight"), c * c)?;
        let post_g = push(
            &mut buf,
            &format!("{pre}post_attention_layernorm.weight"),
            c,
        )?;
        let gu = {
            let g = get(&format!("{pre}mlp.gate_proj.weight"))?;
            let u = get(&format!("{pre}mlp.up_proj.weight"))?;
            check("gate_proj", g, d.ffn * c)?;
            check("up_proj", u, d.ffn * c)?;
            let off = buf.len();
            for j in 0..d.ffn {
                buf.extend_from_slice(&g[j * c..(j + 1) * c]);
                buf.extend_from_slice(&u[j * c..(j + 1) * c]);
            }
            off
        };
        let down = push(&mut buf, &format!("{pre}mlp.down_proj.weight"), c * d.ffn)?;
        layers.push(LayerOff {
            in_g,
            qkv,
            o,
            post_g,
            gu,
            down,
        });
    }
    let norm = push(&mut buf, &format!("{gd}norm.weight"), c)?;
    let head = push(&mut buf, "gaze_decoder.lm_head.weight", d.k * d.vocab * c)?;
    push(
        &mut buf,
        "gaze_decoder.task_loss_prediction_head.weight",
        d.k * c,
    )?;
    let _ = cfg;
    Ok((
        buf,
        Offsets {
            patch_w,
            patch_b,
            ln_w,
            ln_b,
            conv_w,
            conv_b,
            out_w,
            out_b,
            pos,
            embed,
            layers,
            norm,
            head,
        },
    ))
}

/// The decoder kernels of one phase (prefill: large tiles; decode: small tiles, skip when
/// the frame is done).
struct PhaseOps {
    qkv0: Matmul,
    qkv: Matmul,
    attn: Attention,
    oproj: Matmul,
    gateup: Matmul,
    down: Matmul,
    head: Matmul,
}

impl PhaseOps {
    fn new(ctx: &GpuContext, tile: Tile, head_dim: usize, qt: u32, lanes: u32) -> Result<Self> {
        Ok(Self {
            attn: Attention::new(ctx, head_dim, qt, lanes)?,
            qkv0: Matmul::new(ctx, MatmulSpec::new(ALoad::Embed, Epi::Qkv, tile))?,
            qkv: Matmul::new(ctx, MatmulSpec::new(ALoad::Rms, Epi::Qkv, tile))?,
            oproj: Matmul::new(
                ctx,
                MatmulSpec::new(ALoad::Plain, Epi::Residual, tile).dec(),
            )?,
            gateup: Matmul::new(ctx, MatmulSpec::new(ALoad::Rms, Epi::Swiglu, tile).dec())?,
            down: Matmul::new(
                ctx,
                MatmulSpec::new(ALoad::Plain, Epi::Residual, tile).dec(),
            )?,
            head: Matmul::new(
                ctx,
                MatmulSpec::new(ALoad::Rms, Epi::Store, Tile::Gemv)
                    .last()
                    .dec(),
            )?,
        })
    }
}

struct Ops {
    bicubic: Bicubic,
    patch: Matmul,
    ln: LayerNorm,
    conv: Matmul,
    outp: Matmul,
    pre: PhaseOps,
    step: PhaseOps,
    select: Select,
    score: Score,
    /// The heads at strided rows (teacher-forced scoring).
    score_heads: Matmul,
}

/// Capacities a workspace is allocated for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct WsSpec {
    batch: usize,
    /// Frames per vision chunk.
    frames: usize,
    /// Frames in the LayerNorm ring (frames + 2, or 3 for streaming).
    ring: usize,
    /// Input frame size (h, w) (pixel values); (img, img) needs no resize buffer.
    in_hw: (usize, usize),
    /// uint8 source size when the processor's resize runs on the GPU.
    src_hw: Option<(usize, usize)>,
    /// KV-cache capacity per row.
    cap: usize,
    /// Frames the `out` buffer holds.
    out_frames: usize,
    /// Decode steps the debug buffer holds (0: none).
    debug_steps: usize,
    /// Slots per row the teacher-forced score buffers hold (0: none).
    score_slots: usize,
}

impl WsSpec {
    /// A call on `frames`, its vision in chunks of `tc` frames: the input side; the rest at
    /// its least (callers set the cache, output frames, debug rows and score slots they need).
    fn clip(frames: &FrameShape, tc: usize) -> Self {
        Self {
            batch: frames.b,
            frames: tc,
            ring: tc + 2,
            in_hw: (frames.h, frames.w),
            src_hw: frames.src_hw,
            cap: CAP_SLACK,
            out_frames: 1,
            debug_steps: 0,
            score_slots: 0,
        }
    }

    fn fits(&self, need: &WsSpec) -> bool {
        self.batch >= need.batch
            && self.frames >= need.frames
            && self.ring >= need.ring
            && self.in_hw == need.in_hw
            && self.src_hw == need.src_hw
            && self.cap >= need.cap
            && self.out_frames >= need.out_frames
            && self.debug_steps >= need.debug_steps
            && self.score_slots >= need.score_slots
    }
}

struct PhaseBgs {
    qkv: Vec<wgpu::BindGroup>,
    attn: Vec<wgpu::BindGroup>,
    oproj: Vec<wgpu::BindGroup>,
    gateup: Vec<wgpu::BindGroup>,
    down: Vec<wgpu::BindGroup>,
    head: wgpu::BindGroup,
}

/// Every buffer and bind group one call (or one streaming session) needs, plus the
/// parameter arena (kept apart so recording can borrow both).
struct Workspace {
    arena: ParamArena,
    r: Res,
    /// Bytes of its buffers ([`WsSizes`]).
    bytes: u64,
}

/// One pass of the GPU preprocessing (uint8 frames -> pixel values).
struct PrePass {
    op: PilResize,
    bg: wgpu::BindGroup,
    inp: (usize, usize),
    out: (usize, usize),
    taps: usize,
}

/// Buffers of the GPU preprocessing: the packed uint8 frames, the normalisation table and
/// the passes (x then y, an axis of equal size skipped; at least one pass, which also
/// normalises).
struct PreRes {
    raw: wgpu::Buffer,
    lut: wgpu::Buffer,
    passes: Vec<PrePass>,
    _keep: Vec<wgpu::Buffer>,
}

impl PreRes {
    fn new(
        ctx: &GpuContext,
        arena: &ParamArena,
        sz: &PrepSizes,
        src: (usize, usize),
        out: (usize, usize),
        dst: &wgpu::Buffer,
    ) -> Result<Self> {
        let raw = ctx.storage("uint8 frames", sz.raw)?;
        let lut = ctx.storage("normalisation table", sz.lut)?;
        let mut keep = Vec::new();
        let mut passes = Vec::new();
        let tmp = match sz.tmp {
            Some(bytes) => Some(ctx.storage("resized rows", bytes)?),
            None => None,
        };
        for pass in plan(src, out) {
            let (taps, k) = pass.coeffs();
            let coef = ctx.storage_init("resize coefficients", &k)?;
            let between = || {
                tmp.as_ref()
                    .ok_or_else(|| Error::Backend("PIL resize plan without its buffer".into()))
            };
            let from = if pass.src == Src::U8 {
                &raw
            } else {
                between()?
            };
            let to = if pass.dst == Dst::F32 {
                dst
            } else {
                between()?
            };
            let op = PilResize::for_pass(ctx, &pass)?;
            let bg = op.bind(ctx, arena, from, &coef, &lut, to)?;
            keep.push(coef);
            passes.push(PrePass {
                op,
                bg,
                inp: pass.inp,
                out: pass.out,
                taps,
            });
        }
        keep.extend(tmp);
        Ok(Self {
            raw,
            lut,
            passes,
            _keep: keep,
        })
    }
}

struct Res {
    spec: WsSpec,
    /// GPU preprocessing of uint8 frames (None: the call uploads pixel values).
    prep: Option<PreRes>,
    pix: Option<wgpu::Buffer>,
    img: wgpu::Buffer,
    lnw: wgpu::Buffer,
    state: wgpu::Buffer,
    kvmask: wgpu::Buffer,
    out: wgpu::Buffer,
    out_staging: wgpu::Buffer,
    debug: wgpu::Buffer,
    vis: wgpu::Buffer,
    bg_resize: Option<wgpu::BindGroup>,
    bg_patch: wgpu::BindGroup,
    bg_ln: wgpu::BindGroup,
    bg_conv: wgpu::BindGroup,
    bg_outp: wgpu::BindGroup,
    bg_select: wgpu::BindGroup,
    /// Teacher-forced scoring: the given ids [B, score_slots] and the outputs
    /// [2, B, score_slots] (gaze_probs | task_loss_prediction).
    score_tok: wgpu::Buffer,
    score_out: wgpu::Buffer,
    bg_score: wgpu::BindGroup,
    /// The heads at the group ends of a score forward ([B, rows, K*V + K] into `logits`).
    bg_score_heads: wgpu::BindGroup,
    pre: PhaseBgs,
    step: PhaseBgs,
    // Kept alive for the bind groups.
    _keep: Vec<wgpu::Buffer>,
}

fn out_words(spec: &WsSpec, d: &Dims) -> usize {
    spec.out_frames + spec.batch * spec.out_frames * d.nv
}

/// 1536 -> "1.5 KiB".
fn fmt_bytes(n: u64) -> String {
    let mut v = n as f64;
    for unit in ["bytes", "KiB", "MiB", "GiB"] {
        if v < 1024.0 {
            return if unit == "bytes" {
                format!("{n} bytes")
            } else {
                format!("{v:.1} {unit}")
            };
        }
        v /= 1024.0;
    }
    format!("{v:.1} TiB")
}

/// Bytes a buffer of the product of `factors` 4-byte words is created with (rounded as
/// every creation rounds), or a `DeviceError` naming it when that does not fit in u64.
fn buf(label: &str, factors: &[usize]) -> Result<u64> {
    factors
        .iter()
        .try_fold(4u64, |a, &v| a.checked_mul(v as u64))
        .map(round_size)
        .ok_or_else(|| {
            Error::Device(format!(
                "buffer `{label}` of {factors:?} 4-byte words would need more than 2^64 bytes"
            ))
        })
}

/// Buffers of the GPU preprocessing ([`PreRes`]).
struct PrepSizes {
    raw: u64,
    lut: u64,
    /// Between two passes: one-word uint8 values of the first pass's output.
    tmp: Option<u64>,
    /// Each pass's coefficient rows.
    coef: Vec<u64>,
}

/// The bytes of every buffer a workspace of one [`WsSpec`] creates: the one place their
/// sizes are computed, for the allocation ([`Workspace::new`]) and for the memory estimates
/// ([`Engine::estimate_generate`] and friends), so the two cannot drift apart (the tests
/// compare the estimates with [`GpuContext::allocated_bytes`]).
struct WsSizes {
    arena_blocks: usize,
    arena: u64,
    /// The call's pixel values when they need the bicubic resize.
    pix: Option<u64>,
    img: u64,
    /// Each of the patch features, conv features and vision embeds.
    tok: u64,
    lnw: u64,
    x: u64,
    q: u64,
    h: u64,
    part: u64,
    /// Each of the `layers` KV caches.
    kv: u64,
    layers: usize,
    kvmask: u64,
    rope: u64,
    state: u64,
    logits: u64,
    /// Each of `out` and its readback buffer.
    out: u64,
    debug: u64,
    score_tok: u64,
    score_out: u64,
    prep: Option<PrepSizes>,
}

impl WsSizes {
    fn new(ctx: &GpuContext, d: &Dims, rope_half: usize, spec: &WsSpec) -> Result<Self> {
        let b = spec.batch;
        let c = d.c;
        let frames_px = b
            .checked_mul(spec.frames)
            .ok_or_else(|| Error::Device(format!("{b} x {} frames is too many", spec.frames)))?;
        // Distinct parameter blocks per frame: a generation frame ~45, a scored frame ~60.
        let per_frame = if spec.score_slots > 0 { 64 } else { 48 };
        let arena_blocks = spec
            .out_frames
            .max(1)
            .saturating_mul(per_frame)
            .saturating_add(64);
        let arena = ParamArena::bytes(ctx, arena_blocks).ok_or_else(|| {
            Error::Device(format!(
                "a parameter arena for {} frames is too large",
                spec.out_frames
            ))
        })?;
        // Teacher-forced scoring (score_slots > 0) also plans forwards of score_lead token
        // slots and takes the heads at up to score_lead / K rows per batch row.
        let (gen_words, head_rows) = if spec.score_slots > 0 {
            let sl = d.score_lead();
            (
                layout::words(b, d.k, d.nt_pre()).max(layout::words(b, sl, sl)),
                sl / d.k,
            )
        } else {
            (layout::words(b, d.k, d.nt_pre()), 1)
        };
        let (ih, iw) = spec.in_hw;
        let pix = if spec.in_hw != (d.img, d.img) {
            Some(buf("pixels", &[frames_px, 3, ih, iw])?)
        } else {
            None
        };
        let ntp = d.nt_pre();
        let part_rows =
            (ntp * spec.cap.div_ceil(CHUNK_PRE)).max(d.k * spec.cap.div_ceil(CHUNK_DEC));
        let prep = match spec.src_hw {
            Some((sh, sw)) => {
                let steps = plan((sh, sw), spec.in_hw);
                let tmp = match steps.iter().find(|p| p.dst == Dst::U32) {
                    Some(p) => Some(buf("resized rows", &[frames_px, p.out.0, p.out.1, 3])?),
                    None => None,
                };
                Some(PrepSizes {
                    raw: buf("uint8 frames", &[frames_px, frame_words(sh, sw)])?,
                    lut: buf("normalisation table", &[768])?,
                    tmp,
                    coef: steps
                        .iter()
                        .map(|p| buf("resize coefficients", &[p.coeff_words()]))
                        .collect::<Result<_>>()?,
                })
            }
            None => None,
        };
        let score_words = (b.saturating_mul(spec.score_slots)).max(1);
        let ow = buf("gazes", &[out_words(spec, d)])?;
        Ok(Self {
            arena_blocks,
            arena,
            pix,
            img: buf("model input", &[frames_px, 3, d.img, d.img])?,
            tok: buf("vision embeds", &[frames_px, d.p, c])?,
            lnw: buf("layernorm ring", &[b, spec.ring, d.p, c])?,
            x: buf("x", &[b, ntp, c])?,
            q: buf("q", &[b, ntp, c])?,
            h: buf("mlp hidden", &[b, ntp, d.ffn])?,
            part: buf("attention partials", &[b, d.heads, part_rows, d.hd + 2])?,
            kv: buf("kv cache", &[b, spec.cap, 2, c])?,
            layers: d.layers,
            kvmask: buf("key mask", &[b, spec.cap])?,
            rope: buf("rope table", &[rope::table_len(rope_half, spec.cap)])?,
            state: buf("generation state", &[gen_words])?,
            logits: buf("logits", &[b, head_rows, d.head_rows()])?,
            out: ow,
            debug: buf("debug logits", &[spec.debug_steps.max(1), b, d.head_rows()])?,
            score_tok: buf("score ids", &[score_words])?,
            score_out: buf("scores", &[2, score_words])?,
            prep,
        })
    }

    /// Refuses, as [`GpuContext::storage`] would, a storage buffer larger than the adapter's
    /// largest binding (checked before the memory check, so that its message comes first).
    fn check_bindings(&self, ctx: &GpuContext) -> Result<()> {
        let mut v = vec![
            ("model input", self.img),
            ("vision embeds", self.tok),
            ("layernorm ring", self.lnw),
            ("x", self.x),
            ("q", self.q),
            ("mlp hidden", self.h),
            ("attention partials", self.part),
            ("kv cache 0", self.kv),
            ("key mask", self.kvmask),
            ("rope table", self.rope),
            ("generation state", self.state),
            ("logits", self.logits),
            ("gazes", self.out),
            ("debug logits", self.debug),
            ("score ids", self.score_tok),
            ("scores", self.score_out),
        ];
        v.extend(self.pix.map(|p| ("pixels", p)));
        if let Some(p) = &self.prep {
            v.push(("uint8 frames", p.raw));
            v.extend(p.tmp.map(|t| ("resized rows", t)));
            v.extend(p.coef.iter().map(|c| ("resize coefficients", *c)));
        }
        v.into_iter().try_for_each(|(k, b)| ctx.check_size(k, b))
    }

    /// (buffer, bytes) of everything the workspace creates, as created.
    fn list(&self) -> Vec<(String, u64)> {
        let mut v: Vec<(String, u64)> = vec![("parameter arena".into(), self.arena)];
        if let Some(p) = &self.prep {
            v.push(("uint8 frames".into(), p.raw));
            v.push(("normalisation table".into(), p.lut));
            v.extend(p.tmp.map(|t| ("resized rows".to_string(), t)));
            v.push(("resize coefficients".into(), p.coef.iter().sum()));
        }
        v.extend(self.pix.map(|p| ("pixels".to_string(), p)));
        v.push(("model input".into(), self.img));
        v.push(("vision activations (3 buffers)".into(), 3 * self.tok));
        v.push(("layernorm ring".into(), self.lnw));
        v.push((
            "decoder activations (x, q, mlp hidden)".into(),
            self.x + self.q + self.h,
        ));
        v.push(("attention partials".into(), self.part));
        v.push((
            format!("KV cache ({} layers)", self.layers),
            self.kv.saturating_mul(self.layers as u64),
        ));
        v.push(("key mask".into(), self.kvmask));
        v.push(("rope table".into(), self.rope));
        v.push((
            "generation state, logits, gazes + readback, debug, score buffers".into(),
            self.state + self.logits + 2 * self.out + self.debug + self.score_tok + self.score_out,
        ));
        v
    }
}

/// GPU memory a call (or a streaming session) would allocate, computed from its shape
/// before anything is allocated ([`Engine::estimate_generate`] and friends).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryEstimate {
    /// (buffer or group of buffers, bytes as created) of the workspace and the call's own
    /// buffers.
    pub parts: Vec<(String, u64)>,
    /// Their sum: the bytes the call creates when no cached workspace fits it.
    pub total: u64,
}

impl MemoryEstimate {
    fn new(ws: Option<&WsSizes>, extra: &[(&str, u64)]) -> Self {
        let mut parts = ws.map(WsSizes::list).unwrap_or_default();
        parts.extend(extra.iter().map(|(k, v)| (k.to_string(), *v)));
        let total = parts.iter().fold(0u64, |a, (_, v)| a.saturating_add(*v));
        Self { parts, total }
    }
}

/// What a call may still allocate on the engine's device ([`Engine::memory_available`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryAvailable {
    /// Bytes a call may allocate (None: the backend does not say): with
    /// VK_EXT_memory_budget, the heap's free budget plus the engine's cached workspace
    /// (reused or freed before a new one is made); otherwise the heap size less the
    /// weights (other processes' use unknown, so an upper bound).
    pub bytes: Option<u64>,
    pub device: DeviceMemory,
    /// The weights buffer and the cached workspace.
    pub weights: u64,
    pub cached: u64,
}

impl Workspace {
    fn new(
        ctx: &GpuContext,
        ops: &Ops,
        wts: &wgpu::Buffer,
        inv_freq: &[f32],
        spec: WsSpec,
        sz: &WsSizes,
    ) -> Result<Self> {
        let arena = ParamArena::new(ctx, sz.arena_blocks)?;
        let pix = match sz.pix {
            Some(bytes) => Some(ctx.storage("pixels", bytes)?),
            None => None,
        };
        let img = ctx.storage("model input", sz.img)?;
        let feat = ctx.storage("patch features", sz.tok)?;
        let lnw = ctx.storage("layernorm ring", sz.lnw)?;
        let conv = ctx.storage("conv features", sz.tok)?;
        let vis = ctx.storage("vision embeds", sz.tok)?;
        let x = ctx.storage("x", sz.x)?;
        let q = ctx.storage("q", sz.q)?;
        let h = ctx.storage("mlp hidden", sz.h)?;
        let part = ctx.storage("attention partials", sz.part)?;
        let mut kv = Vec::new();
        for l in 0..sz.layers {
            kv.push(ctx.storage(&format!("kv cache {l}"), sz.kv)?);
        }
        let kvmask = ctx.storage("key mask", sz.kvmask)?;
        let rope_tab = rope::cos_sin_table(inv_freq, spec.cap);
        let rope_b = ctx.storage_init("rope table", &rope_tab)?;
        let state = ctx.storage("generation state", sz.state)?;
        let logits = ctx.storage("logits", sz.logits)?;
        let out = ctx.storage("gazes", sz.out)?;
        let out_staging = ctx.staging("gazes readback", sz.out)?;
        let debug = ctx.storage("debug logits", sz.debug)?;

        let bg_resize = match &pix {
            Some(p) => Some(ops.bicubic.bind(ctx, &arena, p, &img)?),
            None => None,
        };
        let prep = match (spec.src_hw, &sz.prep) {
            (Some(src), Some(psz)) => Some(PreRes::new(
                ctx,
                &arena,
                psz,
                src,
                spec.in_hw,
                pix.as_ref().unwrap_or(&img),
            )?),
            _ => None,
        };
        let none = Extra::default();
        let bg_patch = ops.patch.bind(ctx, &arena, &img, wts, &feat, none)?;
        let bg_ln = ops.ln.bind(ctx, &arena, &feat, wts, &lnw)?;
        let bg_conv = ops.conv.bind(ctx, &arena, &lnw, wts, &conv, none)?;
        let bg_outp = ops.outp.bind(ctx, &arena, &conv, wts, &vis, none)?;
        let bg_select = ops
            .select
            .bind(ctx, &arena, &state, &logits, &kvmask, &out, &debug)?;
        let score_tok = ctx.storage("score ids", sz.score_tok)?;
        let score_out = ctx.storage("scores", sz.score_out)?;
        let bg_score = ops
            .score
            .bind(ctx, &arena, &state, &logits, &score_tok, &score_out)?;
        let bg_score_heads = ops.score_heads.bind(ctx, &arena, &x, wts, &logits, none)?;
        let phase = |po: &PhaseOps| -> Result<PhaseBgs> {
            let mut pb = PhaseBgs {
                qkv: Vec::new(),
                attn: Vec::new(),
                oproj: Vec::new(),
                gateup: Vec::new(),
                down: Vec::new(),
                head: po.head.bind(
                    ctx,
                    &arena,
                    &x,
                    wts,
                    &logits,
                    Extra {
                        state: Some(&state),
                        ..none
                    },
                )?,
            };
            for (l, kvl) in kv.iter().enumerate() {
                let ex = Extra {
                    state: Some(&state),
                    xw: Some(&x),
                    kv: Some(kvl),
                    rope: Some(&rope_b),
                };
                let (op, a) = if l == 0 {
                    (&po.qkv0, &vis)
                } else {
                    (&po.qkv, &x)
                };
                pb.qkv.push(op.bind(ctx, &arena, a, wts, &q, ex)?);
                pb.attn
                    .push(po.attn.bind(ctx, &arena, &state, &q, kvl, &kvmask, &part)?);
                let exg = Extra {
                    state: Some(&state),
                    ..none
                };
                pb.oproj.push(po.oproj.bind(ctx, &arena, &q, wts, &x, exg)?);
                pb.gateup
                    .push(po.gateup.bind(ctx, &arena, &x, wts, &h, exg)?);
                pb.down.push(po.down.bind(ctx, &arena, &h, wts, &x, exg)?);
            }
            Ok(pb)
        };
        let pre = phase(&ops.pre)?;
        let step = phase(&ops.step)?;
        let mut keep = vec![feat, conv, x, q, h, part, rope_b, logits];
        keep.extend(kv);
        Ok(Self {
            arena,
            bytes: MemoryEstimate::new(Some(sz), &[]).total,
            r: Res {
                spec,
                prep,
                pix,
                img,
                lnw,
                state,
                kvmask,
                out,
                out_staging,
                debug,
                vis,
                bg_resize,
                bg_patch,
                bg_ln,
                bg_conv,
                bg_outp,
                bg_select,
                score_tok,
                score_out,
                bg_score,
                bg_score_heads,
                pre,
                step,
                _keep: keep,
            },
        })
    }
}

struct Inner {
    ctx: GpuContext,
    dims: Dims,
    off: Offsets,
    wts: wgpu::Buffer,
    inv_freq: Vec<f32>,
    ops: Ops,
    /// Bytes of the weights buffer.
    weights_bytes: u64,
    cached: Mutex<Option<Workspace>>,
    /// Bytes of the cached workspace (0: none), readable without its lock.
    cached_bytes: std::sync::atomic::AtomicU64,
    /// Test hook: cap on frames per vision chunk (0: only the adapter's limits).
    max_chunk_frames: std::sync::atomic::AtomicUsize,
}

/// AutoGaze on a wgpu device. Cheap to clone (shared); usable from several threads (calls
/// on one engine are serialised around its cached workspace).
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

/// What one generate call produced (outputs plus the optional debugging/profiling data).
struct Run {
    out: GenerateOutput,
    debug_logits: Option<Vec<f32>>,
    stats: CallStats,
    kernels: Vec<KernelTime>,
}

/// Dispatch and submit counts of the last call (for reports and benchmarks).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CallStats {
    pub dispatches: usize,
    pub submits: usize,
    pub passes: usize,
    /// CPU time spent recording and submitting commands (microseconds).
    pub record_us: u64,
    /// Wall time of the whole call (microseconds).
    pub total_us: u64,
}

/// The buffers a `score` call creates besides its workspace.
struct ScoreBufs {
    /// Slots in all frames.
    n_all: usize,
    /// Words of one forward's plan, and of its image (the header words, then the plan).
    plan_words: usize,
    img_words: usize,
    plans: u64,
    scores: u64,
}

/// Refuses an empty [`FrameShape`] (the shape-only estimates; [`Frames`] checks its own).
fn check_shape(s: &FrameShape) -> Result<()> {
    if s.b == 0
        || s.t == 0
        || s.h == 0
        || s.w == 0
        || s.src_hw.is_some_and(|(h, w)| h == 0 || w == 0)
    {
        return Err(Error::Input(format!(
            "a call needs B, T, H, W >= 1 (and a non-empty source size), got {s:?}"
        )));
    }
    Ok(())
}

struct FramePlan {
    /// Budget M of the frame.
    budget: usize,
    /// Upper bound of the cache indices used in the frame (sizes the attention grid).
    l_upper: usize,
}

fn check_pixels(pixel_values: &[f32], shape: &[usize]) -> Result<(usize, usize, usize, usize)> {
    if shape.len() != 5 {
        return Err(Error::Input(format!(
            "pixel_values must have shape [B, T, 3, H, W], got {shape:?}"
        )));
    }
    let (b, t, ch, h, w) = (shape[0], shape[1], shape[2], shape[3], shape[4]);
    if b == 0 || t == 0 || h == 0 || w == 0 || ch != 3 {
        return Err(Error::Input(format!(
            "pixel_values must have shape [B, T, 3, H, W] with B, T, H, W >= 1, got {shape:?}"
        )));
    }
    let n = b
        .checked_mul(t)
        .and_then(|v| v.checked_mul(3 * h))
        .and_then(|v| v.checked_mul(w))
        .ok_or_else(|| Error::Input(format!("pixel_values shape {shape:?} is too large")))?;
    if pixel_values.len() != n {
        return Err(Error::Input(format!(
            "pixel_values has {} values, shape {shape:?} needs {n}",
            pixel_values.len()
        )));
    }
    if let Some(i) = pixel_values.iter().position(|v| !v.is_finite()) {
        return Err(Error::Input(format!("pixel_values[{i}] is not finite")));
    }
    Ok((b, t, h, w))
}

/// The shape of a call's input, all that sizes its buffers (see [`Engine::estimate_generate`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameShape {
    /// Batch rows, frames per row, and the pixel values' (H, W) (after the processor).
    pub b: usize,
    pub t: usize,
    pub h: usize,
    pub w: usize,
    /// The uint8 frames' (H, W) when the processor's resize runs on the GPU.
    pub src_hw: Option<(usize, usize)>,
}

/// The input of a call: the model's float32 pixel values, or uint8 RGB frames that the
/// processor's resize and normalisation (SPEC §2.1-2) turn into them on the GPU.
#[derive(Debug, Clone, Copy)]
pub struct Frames<'a> {
    /// Batch rows, frames per row, and the pixel values' (H, W) (after the processor).
    pub b: usize,
    pub t: usize,
    pub h: usize,
    pub w: usize,
    data: FrameData<'a>,
}

#[derive(Debug, Clone, Copy)]
enum FrameData<'a> {
    /// [B, T, 3, H, W].
    Pixels(&'a [f32]),
    /// [B, T, src_h, src_w, 3] bytes; `lut` [3, 256]: the processor's float value of each
    /// uint8 level per channel (rescale, offset, normalisation).
    Uint8 {
        bytes: &'a [u8],
        src_hw: (usize, usize),
        lut: &'a [f32],
    },
}

impl<'a> Frames<'a> {
    /// Float32 pixel values of `shape` [B, T, 3, H, W] (checked: shape, length, finite).
    pub fn pixels(pixel_values: &'a [f32], shape: &[usize]) -> Result<Self> {
        let (b, t, h, w) = check_pixels(pixel_values, shape)?;
        Ok(Self {
            b,
            t,
            h,
            w,
            data: FrameData::Pixels(pixel_values),
        })
    }

    /// uint8 RGB frames of `shape` [B, T, H, W, 3], resized to `out_hw` with PIL's 8-bit
    /// BILINEAR filter (an axis of equal size is not resampled) and mapped through `lut`
    /// [3, 256] (the processor's float steps for each level) on the GPU.
    pub fn uint8(
        bytes: &'a [u8],
        shape: &[usize],
        out_hw: (usize, usize),
        lut: &'a [f32],
    ) -> Result<Self> {
        if shape.len() != 5 || shape[4] != 3 || shape[..4].contains(&0) {
            return Err(Error::Input(format!(
                "uint8 frames must have shape [B, T, H, W, 3] with B, T, H, W >= 1, got {shape:?}"
            )));
        }
        let n = shape
            .iter()
            .try_fold(1usize, |a, &v| a.checked_mul(v))
            .ok_or_else(|| Error::Input(format!("frames shape {shape:?} is too large")))?;
        if bytes.len() != n {
            return Err(Error::Input(format!(
                "frames have {} bytes, shape {shape:?} needs {n}",
                bytes.len()
            )));
        }
        if out_hw.0 == 0 || out_hw.1 == 0 {
            return Err(Error::Input(format!(
                "the processor's output size {out_hw:?} is empty"
            )));
        }
        if lut.len() != 768 || lut.iter().any(|v| !v.is_finite()) {
            return Err(Error::Input(
                "the normalisation table must hold 3 x 256 finite values".into(),
            ));
        }
        Ok(Self {
            b: shape[0],
            t: shape[1],
            h: out_hw.0,
            w: out_hw.1,
            data: FrameData::Uint8 {
                bytes,
                src_hw: (shape[2], shape[3]),
                lut,
            },
        })
    }

    /// The uint8 source size, when the frames are preprocessed on the GPU.
    fn src_hw(&self) -> Option<(usize, usize)> {
        match self.data {
            FrameData::Pixels(_) => None,
            FrameData::Uint8 { src_hw, .. } => Some(src_hw),
        }
    }

    /// The input's shape.
    pub fn shape(&self) -> FrameShape {
        FrameShape {
            b: self.b,
            t: self.t,
            h: self.h,
            w: self.w,
            src_hw: self.src_hw(),
        }
    }
}

impl Engine {
    /// Uploads the weights and compiles every pipeline on a new device.
    pub fn new(config: &AutoGazeConfig, weights: &Weights) -> Result<Engine> {
        Self::with_context(GpuContext::new()?, config, weights)
    }

    /// Like [`Engine::new`] on a given device.
    pub fn with_context(
        ctx: GpuContext,
        config: &AutoGazeConfig,
        weights: &Weights,
    ) -> Result<Engine> {
        let dims = Dims::from_config(config)?;
        let (packed, off) = pack(config, &dims, weights)?;
        let weights_bytes = round_size(packed.len() as u64 * 4);
        let wts = ctx.storage_init("weights", &packed)?;
        let inv_freq = rope::inv_freq(&config.decoder);
        let ops = Ops {
            bicubic: Bicubic::new(&ctx)?,
            patch: Matmul::new(
                &ctx,
                MatmulSpec::new(ALoad::Patch, Epi::Store, Tile::Large).bias(),
            )?,
            ln: LayerNorm::new(&ctx)?,
            conv: Matmul::new(
                &ctx,
                MatmulSpec::new(ALoad::Conv3, Epi::Store, Tile::Large)
                    .bias()
                    .relu(),
            )?,
            outp: Matmul::new(
                &ctx,
                MatmulSpec::new(ALoad::Plain, Epi::Store, Tile::Large)
                    .bias()
                    .addrow(),
            )?,
            pre: PhaseOps::new(&ctx, Tile::Large, dims.hd, 64, 1)?,
            step: PhaseOps::new(&ctx, Tile::Gemv, dims.hd, 16, 4)?,
            select: Select::new(&ctx)?,
            score: Score::new(&ctx)?,
            score_heads: Matmul::new(
                &ctx,
                MatmulSpec::new(ALoad::Rms, Epi::Store, Tile::Gemv).strided(),
            )?,
        };
        Ok(Engine {
            inner: Arc::new(Inner {
                ctx,
                dims,
                off,
                wts,
                inv_freq,
                ops,
                weights_bytes,
                cached: Mutex::new(None),
                cached_bytes: std::sync::atomic::AtomicU64::new(0),
                max_chunk_frames: std::sync::atomic::AtomicUsize::new(0),
            }),
        })
    }

    /// The device this engine runs on.
    pub fn context(&self) -> &GpuContext {
        &self.inner.ctx
    }

    /// Vision tokens per frame (196 in the release).
    pub fn num_vision_tokens(&self) -> usize {
        self.inner.dims.p
    }

    /// Width of the connector output / decoder hidden size (192 in the release).
    pub fn hidden_size(&self) -> usize {
        self.inner.dims.c
    }

    /// Frames per vision chunk that fit the adapter's binding limits. `strict`: a frame that
    /// fits no chunk is an error (a call); else one frame per chunk is assumed (an estimate:
    /// its memory is still counted, and the call is refused by the bindings).
    fn chunk_frames(&self, f: &FrameShape, strict: bool) -> Result<usize> {
        let d = &self.inner.dims;
        let (b, t, h, w) = (f.b, f.t, f.h, f.w);
        let words = |v: &[usize]| v.iter().fold(4u64, |a, &x| a.saturating_mul(x as u64));
        let mut per_frame = words(&[3, d.img, d.img])
            .max(words(&[3, h, w]))
            .max(words(&[d.p, d.c]));
        if let Some((sh, sw)) = f.src_hw {
            // The packed bytes and the first resize pass's one-word values.
            per_frame = per_frame
                .max(words(&[frame_words(sh, sw)]))
                .max(words(&[sh, w, 3]));
        }
        let fit = self.inner.ctx.max_binding() / per_frame.saturating_mul(b as u64).max(1);
        if fit == 0 && !strict {
            return Ok(1);
        }
        if fit == 0 {
            return Err(Error::Device(format!(
                "a batch of {b} frames of {h}x{w} does not fit this adapter's storage bindings"
            )));
        }
        let cap = self
            .inner
            .max_chunk_frames
            .load(std::sync::atomic::Ordering::Relaxed);
        let fit = if cap > 0 {
            (fit as usize).min(cap)
        } else {
            fit as usize
        };
        Ok(fit.min(t))
    }

    /// What a call may still allocate on this engine's device (see [`MemoryAvailable`]).
    pub fn memory_available(&self) -> MemoryAvailable {
        let cached = self
            .inner
            .cached_bytes
            .load(std::sync::atomic::Ordering::Relaxed);
        self.available_with(cached)
    }

    fn available_with(&self, cached: u64) -> MemoryAvailable {
        let i = &self.inner;
        let device = i.ctx.device_memory();
        let bytes = match (device.free, device.heap_size) {
            (Some(free), _) => Some(free.saturating_add(cached)),
            (None, Some(heap)) => Some(heap.saturating_sub(i.weights_bytes)),
            (None, None) => None,
        };
        MemoryAvailable {
            bytes,
            device,
            weights: i.weights_bytes,
            cached,
        }
    }

    /// Refuses (`DeviceError`, before any allocation) a call or session whose buffers `est`
    /// exceed what the device can give, `cached` bytes of cached workspace counted as free.
    fn check_fits(&self, est: &MemoryEstimate, cached: u64) -> Result<()> {
        let avail = self.available_with(cached);
        match avail.bytes {
            Some(a) if est.total > a => {
                let parts: Vec<String> = est
                    .parts
                    .iter()
                    .filter(|(_, v)| *v > 0)
                    .map(|(k, v)| format!("{k} {}", fmt_bytes(*v)))
                    .collect();
                Err(Error::Device(format!(
                    "this call needs {} bytes ({}) of GPU memory ({}), but only {a} bytes ({}) \
                     are available on {} ({}); use a smaller batch, fewer or smaller frames, \
                     or a shorter stream horizon",
                    est.total,
                    fmt_bytes(est.total),
                    parts.join(", "),
                    fmt_bytes(a),
                    self.inner.ctx.info.name,
                    avail.device.source
                )))
            }
            _ => Ok(()),
        }
    }

    /// Test hook: process at most `frames` frames per vision chunk (0: no cap), to exercise
    /// the multi-submit path that large batches take on small adapters.
    #[doc(hidden)]
    pub fn set_max_chunk_frames(&self, frames: usize) {
        self.inner
            .max_chunk_frames
            .store(frames, std::sync::atomic::Ordering::Relaxed);
    }

    /// The buffer sizes of a workspace of `spec` on this engine.
    fn sizes(&self, spec: &WsSpec) -> Result<WsSizes> {
        let i = &self.inner;
        WsSizes::new(&i.ctx, &i.dims, i.inv_freq.len(), spec)
    }

    /// The cached workspace when it fits `need`, else a new one (the old one freed first),
    /// refused before anything is allocated when it and the call's `extra` buffers do not
    /// fit the device's memory ([`Engine::check_fits`]).
    fn ensure<'a>(
        &self,
        slot: &'a mut Option<Workspace>,
        need: WsSpec,
        extra: &[(&str, u64)],
    ) -> Result<&'a mut Workspace> {
        let ok = slot.as_ref().is_some_and(|ws| ws.r.spec.fits(&need));
        if !ok {
            let i = &self.inner;
            let sz = self.sizes(&need)?;
            let cached = slot.as_ref().map_or(0, |w| w.bytes);
            sz.check_bindings(&i.ctx)?;
            self.check_fits(&MemoryEstimate::new(Some(&sz), extra), cached)?;
            *slot = None;
            i.cached_bytes
                .store(0, std::sync::atomic::Ordering::Relaxed);
            let ws = Workspace::new(&i.ctx, &i.ops, &i.wts, &i.inv_freq, need, &sz)?;
            i.cached_bytes
                .store(ws.bytes, std::sync::atomic::Ordering::Relaxed);
            *slot = Some(ws);
        }
        slot.as_mut()
            .ok_or_else(|| Error::Backend("workspace allocation failed".into()))
    }

    /// Uploads frames [t0, t0 + tc) of every row into the workspace's input buffer.
    fn upload_frames(&self, ws: &Res, f: &Frames, t0: usize, tc: usize) -> Result<()> {
        let ctx = &self.inner.ctx;
        let (b, t) = (f.b, f.t);
        match f.data {
            FrameData::Pixels(px) => {
                let fsz = 3 * f.h * f.w;
                let dst = ws.pix.as_ref().unwrap_or(&ws.img);
                for r in 0..b {
                    let src = &px[(r * t + t0) * fsz..(r * t + t0 + tc) * fsz];
                    ctx.write(dst, (r * tc * fsz) as u64, src);
                }
            }
            FrameData::Uint8 { bytes, src_hw, lut } => {
                let prep = ws.prep.as_ref().ok_or_else(|| {
                    Error::Backend("uint8 frames on a workspace without preprocessing".into())
                })?;
                ctx.write(&prep.lut, 0, lut);
                let fsz = 3 * src_hw.0 * src_hw.1;
                let fw4 = frame_words(src_hw.0, src_hw.1) * 4;
                for r in 0..b {
                    let src = &bytes[(r * t + t0) * fsz..(r * t + t0 + tc) * fsz];
                    if fsz == fw4 {
                        ctx.write(&prep.raw, (r * tc * fw4) as u64, src);
                    } else {
                        // Each frame starts on a word: pad the frames' byte counts to 4.
                        let mut padded = vec![0u8; tc * fw4];
                        for j in 0..tc {
                            padded[j * fw4..j * fw4 + fsz]
                                .copy_from_slice(&src[j * fsz..(j + 1) * fsz]);
                        }
                        ctx.write(&prep.raw, (r * tc * fw4) as u64, &padded);
                    }
                }
            }
        }
        Ok(())
    }

    /// Records the vision encoder + connector for `tc` frames (session frames t0..).
    fn record_vision(
        &self,
        rec: &mut Recorder<'_>,
        ws: &Res,
        b: usize,
        tc: usize,
        t0: usize,
        (h, w): (usize, usize),
    ) -> Result<()> {
        let i = &self.inner;
        let (d, o) = (&i.dims, &i.off);
        if let Some(prep) = &ws.prep {
            for ps in &prep.passes {
                ps.op.record(rec, &ps.bg, b * tc, ps.inp, ps.out, ps.taps)?;
            }
        }
        if let Some(bg) = &ws.bg_resize {
            i.ops
                .bicubic
                .record(rec, bg, b * tc * 3, (h, w), (d.img, d.img))?;
        }
        let m = (b * tc * d.p) as u32;
        let c = d.c as u32;
        let base = MatmulParams {
            m,
            n: c,
            ldc: c,
            grid: d.grid as u32,
            img: d.img as u32,
            psize: d.ps as u32,
            cin: c,
            ..Default::default()
        };
        let pp = MatmulParams {
            k: (3 * d.ps * d.ps) as u32,
            w_off: o.patch_w as u32,
            b_off: o.patch_b as u32,
            ..base
        };
        i.ops.patch.record(rec, &ws.bg_patch, &pp)?;
        let ln = LnShape {
            batch: b,
            frames: tc,
            hw: d.p,
            channels: d.c,
            ring: ws.spec.ring,
            t0,
            g_off: o.ln_w,
            b_off: o.ln_b,
            eps: d.eps_ln,
        };
        i.ops.ln.record(rec, &ws.bg_ln, &ln)?;
        let cp = MatmulParams {
            k: (27 * d.c) as u32,
            w_off: o.conv_w as u32,
            b_off: o.conv_b as u32,
            frames_in: ws.spec.ring as u32,
            frames_out: tc as u32,
            t0: t0 as u32,
            ..base
        };
        i.ops.conv.record(rec, &ws.bg_conv, &cp)?;
        let op = MatmulParams {
            k: c,
            w_off: o.out_w as u32,
            b_off: o.out_b as u32,
            add_off: o.pos as u32,
            add_mod: d.p as u32,
            ..base
        };
        i.ops.outp.record(rec, &ws.bg_outp, &op)
    }

    /// Records one decoder forward (prefill when `prefill`, else a decode step) and the
    /// heads at the last slot.
    #[allow(clippy::too_many_arguments)]
    fn record_forward(
        &self,
        rec: &mut Recorder<'_>,
        ws: &Res,
        b: usize,
        prefill: bool,
        vis_frames: usize,
        vis_frame: usize,
        l_upper: usize,
    ) -> Result<()> {
        self.record_forward_ops(
            rec, ws, b, prefill, vis_frames, vis_frame, l_upper, None, false, None,
        )
    }

    /// [`record_forward`](Self::record_forward), optionally only the `only`-th dispatch of
    /// the forward (for profiling) and with the done-flag skip disabled (`force`).
    /// `tokens`: a teacher-forced score forward of that many token slots instead (prefill
    /// kernels; every slot a token, `lead` = `pos_stride` = `nt` = tokens; no heads).
    #[allow(clippy::too_many_arguments)]
    fn record_forward_ops(
        &self,
        rec: &mut Recorder<'_>,
        ws: &Res,
        b: usize,
        prefill: bool,
        vis_frames: usize,
        vis_frame: usize,
        l_upper: usize,
        only: Option<usize>,
        force: bool,
        tokens: Option<usize>,
    ) -> Result<()> {
        let i = &self.inner;
        let (d, o) = (&i.dims, &i.off);
        let prefill = prefill || tokens.is_some();
        let (ops, bgs) = if prefill {
            (&i.ops.pre, &ws.pre)
        } else {
            (&i.ops.step, &ws.step)
        };
        let (nt, lead, pos_stride) = match tokens {
            Some(n) => (n, n, n),
            None if prefill => (d.nt_pre(), d.k, d.nt_pre()),
            None => (d.k, d.k, d.nt_pre()),
        };
        let chunk = if prefill { CHUNK_PRE } else { CHUNK_DEC };
        let nchunk = l_upper.div_ceil(chunk).max(1);
        let skip = u32::from(!prefill && !force);
        let mut idx = 0usize;
        let mut take = || {
            let t = only.is_none_or(|o| o == idx);
            idx += 1;
            t
        };
        let c = d.c as u32;
        let base = MatmulParams {
            m: (b * nt) as u32,
            k: c,
            nt: nt as u32,
            batch: b as u32,
            cap: ws.spec.cap as u32,
            lead: lead as u32,
            skip_if_done: skip,
            eps: d.eps_rms,
            vis_frames: vis_frames as u32,
            vis_frame: vis_frame as u32,
            heads: d.heads as u32,
            head_dim: d.hd as u32,
            a_off: o.embed as u32,
            pos_stride: pos_stride as u32,
            ..Default::default()
        };
        let ap = AttnParams {
            batch: b as u32,
            nt: nt as u32,
            cap: ws.spec.cap as u32,
            nchunk: nchunk as u32,
            chunk: chunk as u32,
            heads: d.heads as u32,
            skip_if_done: skip,
            scale: 1.0 / (d.hd as f32).sqrt(),
        };
        for (l, lo) in o.layers.iter().enumerate() {
            let qp = MatmulParams {
                n: 3 * c,
                ldc: c,
                w_off: lo.qkv as u32,
                g_off: lo.in_g as u32,
                ..base
            };
            let qop = if l == 0 { &ops.qkv0 } else { &ops.qkv };
            if take() {
                qop.record(rec, &bgs.qkv[l], &qp)?;
            }
            if take() {
                ops.attn.record(rec, &bgs.attn[l], &ap, d.hd as u32)?;
            }
            let opp = MatmulParams {
                n: c,
                ldc: c,
                w_off: lo.o as u32,
                ..base
            };
            if take() {
                ops.oproj.record(rec, &bgs.oproj[l], &opp)?;
            }
            let gp = MatmulParams {
                n: (2 * d.ffn) as u32,
                ldc: d.ffn as u32,
                w_off: lo.gu as u32,
                g_off: lo.post_g as u32,
                ..base
            };
            if take() {
                ops.gateup.record(rec, &bgs.gateup[l], &gp)?;
            }
            let dp = MatmulParams {
                n: c,
                k: d.ffn as u32,
                ldc: c,
                w_off: lo.down as u32,
                ..base
            };
            if take() {
                ops.down.record(rec, &bgs.down[l], &dp)?;
            }
        }
        let hp = MatmulParams {
            m: b as u32,
            n: d.head_rows() as u32,
            ldc: d.head_rows() as u32,
            w_off: o.head as u32,
            g_off: o.norm as u32,
            ..base
        };
        if tokens.is_none() && take() {
            ops.head.record(rec, &bgs.head, &hp)?;
        }
        Ok(())
    }

    /// Records the whole generation loop of one frame.
    #[allow(clippy::too_many_arguments)]
    fn record_frame(
        &self,
        rec: &mut Recorder<'_>,
        ws: &Res,
        b: usize,
        fp: &FramePlan,
        req: Option<f32>,
        vis_frames: usize,
        vis_frame: usize,
        out_frame: usize,
        debug: bool,
    ) -> Result<()> {
        let d = &self.inner.dims;
        let sp = SelectParams {
            batch: b as u32,
            budget: fp.budget as u32,
            has_req: u32::from(req.is_some()),
            req: req.unwrap_or(0.0),
            phase: 0,
            nt: d.nt_pre() as u32,
            out_frame: out_frame as u32,
            debug: u32::from(debug),
            cap: ws.spec.cap as u32,
            lead: d.k as u32,
            npatch: d.p as u32,
            vocab: d.vocab as u32,
            pad: d.pad as u32,
            out_stride: d.nv as u32,
            out_frames: ws.spec.out_frames as u32,
            debug_rows: ws.spec.debug_steps.max(1) as u32,
            pos_stride: d.nt_pre() as u32,
            ..Default::default()
        };
        self.record_forward(rec, ws, b, true, vis_frames, vis_frame, fp.l_upper)?;
        self.inner.ops.select.record(rec, &ws.bg_select, &sp)?;
        let steps = fp.budget.div_ceil(d.k);
        let sd = SelectParams {
            phase: 1,
            nt: d.k as u32,
            ..sp
        };
        for _ in 1..steps {
            self.record_forward(rec, ws, b, false, vis_frames, vis_frame, fp.l_upper)?;
            self.inner.ops.select.record(rec, &ws.bg_select, &sd)?;
        }
        Ok(())
    }

    /// Resets the generation state of a workspace for a new clip/session of `b` rows.
    fn init_generation(&self, ws: &Res, b: usize) {
        let d = &self.inner.dims;
        let ctx = &self.inner.ctx;
        ctx.write(&ws.state, 0, &layout::initial(b, d.k, d.p, d.pad as u32));
        let mut mask = vec![0u32; b * ws.spec.cap];
        for r in 0..b {
            for q in 0..d.p {
                mask[r * ws.spec.cap + q] = 1;
            }
        }
        ctx.write(&ws.kvmask, 0, &mask);
    }

    /// The workspace and the readback buffer of an `embed` call.
    fn embed_call(&self, shape: &FrameShape, strict: bool) -> Result<(WsSpec, u64)> {
        let d = &self.inner.dims;
        let tc = self.chunk_frames(shape, strict)?;
        let staging = buf("embed readback", &[shape.b, tc, d.p, d.c])?;
        Ok((WsSpec::clip(shape, tc), staging))
    }

    /// The workspace and frame plans of a `generate` call.
    fn generate_call(
        &self,
        shape: &FrameShape,
        ratios: &[f32],
        debug: bool,
        strict: bool,
    ) -> Result<(WsSpec, Vec<FramePlan>)> {
        let d = &self.inner.dims;
        if ratios.len() != shape.t {
            return Err(Error::Input(format!(
                "gazing_ratio_each_frame has {} values for {} frames",
                ratios.len(),
                shape.t
            )));
        }
        let plans = self.plans(ratios, 0)?;
        let cap = plans
            .iter()
            .fold(CAP_SLACK, |a, p| a.saturating_add(d.p + p.budget));
        let max_steps = plans
            .iter()
            .fold(0usize, |a, p| a.saturating_add(p.budget.div_ceil(d.k)));
        let tc = self.chunk_frames(shape, strict)?;
        let need = WsSpec {
            cap,
            out_frames: shape.t,
            debug_steps: if debug { max_steps } else { 0 },
            ..WsSpec::clip(shape, tc)
        };
        Ok((need, plans))
    }

    /// The workspace and the call's own buffers of a `score` call on `frame_lens` slots
    /// per frame (checked: one count per frame, each at most 265).
    fn score_call(
        &self,
        shape: &FrameShape,
        frame_lens: &[usize],
        strict: bool,
    ) -> Result<(WsSpec, ScoreBufs)> {
        let d = &self.inner.dims;
        let t = shape.t;
        if frame_lens.len() != t {
            return Err(Error::Input(format!(
                "score needs the slot count of each of the {t} frames, got {}",
                frame_lens.len()
            )));
        }
        if let Some((f, n)) = frame_lens.iter().enumerate().find(|(_, n)| **n > d.nv) {
            return Err(Error::Input(format!(
                "frame {f} has {n} slots; a frame has at most {}",
                d.nv
            )));
        }
        let n_all: usize = frame_lens.iter().sum();
        let seq = t.saturating_mul(d.p).saturating_add(n_all);
        let tc = self.chunk_frames(shape, strict)?;
        let need = WsSpec {
            cap: seq.saturating_add(CAP_SLACK),
            out_frames: t,
            score_slots: n_all,
            ..WsSpec::clip(shape, tc)
        };
        // One plan image per forward of a frame: the header words, then the plan (the vision
        // forward's layout: K token slots + patches; a token forward's: sl slots, sl positions).
        let (b, k, sl) = (shape.b, d.k, d.score_lead());
        let plan_words = b
            .saturating_mul(k + d.nt_pre())
            .max(b.saturating_mul(2 * sl));
        let img_words = layout::S_HDR + plan_words;
        let max_fwd = 1 + d.nv.div_ceil(sl);
        let bufs = ScoreBufs {
            n_all,
            plan_words,
            img_words,
            plans: buf("score plans", &[max_fwd, img_words])?,
            scores: buf("scores readback", &[2, b, n_all])?,
        };
        Ok((need, bufs))
    }

    /// The workspace of a streaming session (checked: sizes >= 1).
    fn session_spec(
        &self,
        batch: usize,
        max_frames: usize,
        in_hw: (usize, usize),
        src_hw: Option<(usize, usize)>,
    ) -> Result<WsSpec> {
        if batch == 0
            || max_frames == 0
            || in_hw.0 == 0
            || in_hw.1 == 0
            || src_hw.is_some_and(|(h, w)| h == 0 || w == 0)
        {
            return Err(Error::Input(
                "a session needs batch, max_frames, height and width >= 1".into(),
            ));
        }
        let d = &self.inner.dims;
        let cap = max_frames
            .checked_mul(d.p + d.nv)
            .and_then(|v| v.checked_add(CAP_SLACK))
            .ok_or_else(|| Error::Input(format!("a session of {max_frames} frames is too long")))?;
        Ok(WsSpec {
            batch,
            frames: 1,
            ring: 3,
            in_hw,
            src_hw,
            cap,
            out_frames: 1,
            debug_steps: 0,
            score_slots: 0,
        })
    }

    /// GPU memory an [`Engine::embed`] of frames of `shape` creates when no cached
    /// workspace fits it (nothing is allocated here).
    pub fn estimate_embed(&self, shape: &FrameShape) -> Result<MemoryEstimate> {
        check_shape(shape)?;
        let (spec, staging) = self.embed_call(shape, false)?;
        Ok(MemoryEstimate::new(
            Some(&self.sizes(&spec)?),
            &[("embed readback", staging)],
        ))
    }

    /// GPU memory an [`Engine::generate`] of frames of `shape` with these per-frame ratios
    /// creates when no cached workspace fits it (nothing is allocated here).
    pub fn estimate_generate(&self, shape: &FrameShape, ratios: &[f32]) -> Result<MemoryEstimate> {
        check_shape(shape)?;
        let (spec, _) = self.generate_call(shape, ratios, false, false)?;
        Ok(MemoryEstimate::new(Some(&self.sizes(&spec)?), &[]))
    }

    /// GPU memory an [`Engine::score`] of frames of `shape` with `frame_lens` slots per
    /// frame creates when no cached workspace fits it (nothing is allocated here).
    pub fn estimate_score(
        &self,
        shape: &FrameShape,
        frame_lens: &[usize],
    ) -> Result<MemoryEstimate> {
        check_shape(shape)?;
        let (spec, sb) = self.score_call(shape, frame_lens, false)?;
        if sb.n_all == 0 {
            return Ok(MemoryEstimate::new(None, &[]));
        }
        Ok(MemoryEstimate::new(
            Some(&self.sizes(&spec)?),
            &[("score plans", sb.plans), ("scores readback", sb.scores)],
        ))
    }

    /// GPU memory [`Engine::session`] creates (nothing is allocated here).
    pub fn estimate_session(
        &self,
        batch: usize,
        max_frames: usize,
        in_hw: (usize, usize),
        src_hw: Option<(usize, usize)>,
    ) -> Result<MemoryEstimate> {
        let spec = self.session_spec(batch, max_frames, in_hw, src_hw)?;
        Ok(MemoryEstimate::new(Some(&self.sizes(&spec)?), &[]))
    }

    fn plans(&self, ratios: &[f32], frame0_upper: usize) -> Result<Vec<FramePlan>> {
        let d = &self.inner.dims;
        let mut acc = frame0_upper;
        let mut out = Vec::new();
        for (t, r) in ratios.iter().enumerate() {
            if !r.is_finite() || *r <= 0.0 {
                return Err(Error::Input(format!(
                    "gazing_ratio_each_frame[{t}] must be a positive number, got {r}"
                )));
            }
            let budget = d.budget(*r);
            out.push(FramePlan {
                budget,
                l_upper: acc.saturating_add(d.p + budget + d.k),
            });
            acc = acc.saturating_add(d.p + budget);
        }
        Ok(out)
    }

    /// Vision embeddings (the connector output) of `pixel_values` [B, T, 3, H, W]:
    /// returns [B, T, 196, 192].
    pub fn embed(&self, pixel_values: &[f32], shape: &[usize]) -> Result<Vec<f32>> {
        self.embed_frames(&Frames::pixels(pixel_values, shape)?)
    }

    /// [`Engine::embed`] of any [`Frames`].
    pub fn embed_frames(&self, frames: &Frames) -> Result<Vec<f32>> {
        let (b, t, h, w) = (frames.b, frames.t, frames.h, frames.w);
        let i = &self.inner;
        let d = &i.dims;
        let (need, staging_bytes) = self.embed_call(&frames.shape(), true)?;
        let tc = need.frames;
        let mut guard = i.cached.lock().unwrap_or_else(|e| e.into_inner());
        let wsp = self.ensure(&mut guard, need, &[("embed readback", staging_bytes)])?;
        let (arena, ws) = (&mut wsp.arena, &wsp.r);
        let per = d.p * d.c;
        let mut out = vec![0.0f32; b * t * per];
        let staging = i.ctx.staging("embed readback", staging_bytes)?;
        let mut t0 = 0;
        while t0 < t {
            let n = tc.min(t - t0);
            self.upload_frames(ws, frames, t0, n)?;
            let mut rec = Recorder::new(&i.ctx, arena);
            if t0 == 0 {
                rec.encoder().clear_buffer(&ws.lnw, 0, None);
            }
            self.record_vision(&mut rec, ws, b, n, t0, (h, w))?;
            rec.encoder()
                .copy_buffer_to_buffer(&ws.vis, 0, &staging, 0, (b * n * per * 4) as u64);
            rec.submit(&i.ctx)?;
            let bytes = i.ctx.read_staging(&staging, (b * n * per * 4) as u64)?;
            let v: Vec<f32> = bytemuck::pod_collect_to_vec(&bytes);
            for r in 0..b {
                out[(r * t + t0) * per..(r * t + t0 + n) * per]
                    .copy_from_slice(&v[r * n * per..(r + 1) * n * per]);
            }
            t0 += n;
        }
        Ok(out)
    }

    /// Gaze generation for a clip (SPEC §5), all on the GPU: one submit per frame (the CPU
    /// records the next frame while the GPU runs this one) and one readback.
    pub fn generate(
        &self,
        pixel_values: &[f32],
        shape: &[usize],
        params: &GenerateParams,
    ) -> Result<GenerateOutput> {
        self.generate_frames(&Frames::pixels(pixel_values, shape)?, params)
    }

    /// [`Engine::generate`] of any [`Frames`].
    pub fn generate_frames(
        &self,
        frames: &Frames,
        params: &GenerateParams,
    ) -> Result<GenerateOutput> {
        self.generate_impl(frames, params, false, false)
            .map(|r| r.out)
    }

    /// [`Engine::generate`] with every dispatch timed by GPU timestamp queries: the output,
    /// each kernel's dispatch count and summed GPU time (slowest first), and the call's
    /// counters. Needs `TIMESTAMP_QUERY_INSIDE_PASSES` (native adapters; not WebGPU).
    pub fn generate_profiled(
        &self,
        pixel_values: &[f32],
        shape: &[usize],
        params: &GenerateParams,
    ) -> Result<(GenerateOutput, Vec<KernelTime>, CallStats)> {
        let r = self.generate_impl(&Frames::pixels(pixel_values, shape)?, params, false, true)?;
        Ok((r.out, r.kernels, r.stats))
    }

    /// [`Engine::generate`] that also returns the raw heads output (10 x 266 logits and 10
    /// task losses per row) at the last position of every selection step that ran, in order:
    /// [steps, B, 2670].
    pub fn generate_debug(
        &self,
        pixel_values: &[f32],
        shape: &[usize],
        params: &GenerateParams,
    ) -> Result<(GenerateOutput, Vec<f32>, CallStats)> {
        let r = self.generate_impl(&Frames::pixels(pixel_values, shape)?, params, true, false)?;
        Ok((r.out, r.debug_logits.unwrap_or_default(), r.stats))
    }

    /// Teacher-forced scores of given gazes (SPEC §5b): the official `forward` over
    /// [vision_0, slots_0, vision_1, slots_1, ...] with the key mask 0 at pads and true
    /// positions cumsum(mask) - 1.
    ///
    /// `frame_lens[t]`: slots of frame t (shared by the batch); `tokens` [B, N] ids within
    /// their frame (pad = 265), frames concatenated (N = sum of `frame_lens`). Returns
    /// (gaze_probs, task_loss_prediction), each [B, N].
    ///
    /// The pass is causal, so it runs in pieces against the KV cache: per frame the vision
    /// forward (heads at its last token), then the frame's slots in forwards of up to
    /// `score_lead` (200) token slots, whole groups of K right-aligned, each followed by the
    /// heads at the ends of its whole groups (strided rows); `score.wgsl` takes the
    /// probabilities and task losses each heads row gives. Everything is known in advance,
    /// so each forward's plan (cache base, positions, ids) is copied into the `gen` buffer
    /// from a per-frame table instead of being planned by `select.wgsl`. One submit per
    /// frame, one readback.
    pub fn score(
        &self,
        pixel_values: &[f32],
        shape: &[usize],
        frame_lens: &[usize],
        tokens: &[u32],
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        self.score_frames(&Frames::pixels(pixel_values, shape)?, frame_lens, tokens)
    }

    /// [`Engine::score`] of any [`Frames`].
    pub fn score_frames(
        &self,
        frames: &Frames,
        frame_lens: &[usize],
        tokens: &[u32],
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        let (b, t, h, w) = (frames.b, frames.t, frames.h, frames.w);
        let i = &self.inner;
        let d = &i.dims;
        let (need, sb) = self.score_call(&frames.shape(), frame_lens, true)?;
        let n_all = sb.n_all;
        if tokens.len() != b * n_all {
            return Err(Error::Input(format!(
                "score needs {b} x {n_all} slot ids, got {}",
                tokens.len()
            )));
        }
        if let Some(j) = tokens.iter().position(|&x| x as usize > d.pad) {
            return Err(Error::Input(format!(
                "slot id {} (row {}, slot {}) is outside 0..={}",
                tokens[j],
                j / n_all,
                j % n_all,
                d.pad
            )));
        }
        if n_all == 0 {
            return Ok((Vec::new(), Vec::new()));
        }
        let (k, p, pad) = (d.k, d.p, d.pad as u32);
        let ntp = d.nt_pre();
        let seq = t * p + n_all;
        let tc = need.frames;
        let mut guard = i.cached.lock().unwrap_or_else(|e| e.into_inner());
        let extra = [("score plans", sb.plans), ("scores readback", sb.scores)];
        let wsp = self.ensure(&mut guard, need, &extra)?;
        let (arena, ws) = (&mut wsp.arena, &wsp.r);
        // Key mask (row stride: the workspace's capacity) and true positions, per row.
        let cap = ws.spec.cap;
        let mut kvmask = vec![0u32; b * cap];
        let mut pos = vec![0u32; b * seq];
        for r in 0..b {
            let (mut c, mut s, mut run) = (0usize, 0usize, 0u32);
            for &n in frame_lens {
                for _ in 0..p {
                    kvmask[r * cap + c] = 1;
                    pos[r * seq + c] = run;
                    run += 1;
                    c += 1;
                }
                for _ in 0..n {
                    let m = u32::from(tokens[r * n_all + s] != pad);
                    kvmask[r * cap + c] = m;
                    run += m;
                    pos[r * seq + c] = run - 1;
                    c += 1;
                    s += 1;
                }
            }
        }
        arena.clear();
        i.ctx.write(&ws.state, 0, &layout::initial(b, k, p, pad));
        i.ctx.write(&ws.kvmask, 0, &kvmask);
        i.ctx.write(&ws.score_tok, 0, tokens);

        let sl = d.score_lead();
        let plan_at = layout::plan_tok_base(b);
        let (plan_words, img_words) = (sb.plan_words, sb.img_words);
        let plans = i.ctx.storage("score plans", sb.plans)?;
        let out_bytes = (2 * b * n_all * 4) as u64;
        let staging = i.ctx.staging("scores readback", sb.scores)?;
        let gather = |rows: usize| ScoreParams {
            batch: b as u32,
            vocab: d.vocab as u32,
            k: k as u32,
            nslots: n_all as u32,
            rows: rows as u32,
            ..Default::default()
        };
        let mut off = 0usize; // cache index of the frame's first vision token
        let mut so = 0usize; // the frame's first slot
        let mut t0 = 0;
        while t0 < t {
            let nc = tc.min(t - t0);
            self.upload_frames(ws, frames, t0, nc)?;
            for j in 0..nc {
                let mut rec = Recorder::resume(&i.ctx, &mut *arena);
                if j == 0 {
                    // The chunk's vision work goes with its first frame.
                    if t0 == 0 {
                        rec.encoder().clear_buffer(&ws.lnw, 0, None);
                    }
                    self.record_vision(&mut rec, ws, b, nc, t0, (h, w))?;
                }
                let n = frame_lens[t0 + j];
                // Forward 0: the vision tokens (token slots idle), heads at the last one;
                // forward c + 1: slots [c sl, c sl + len) right-aligned in the fewest whole
                // groups of K that hold them (at most sl token slots), heads at the ends of
                // its whole groups of K. Sized to its slots, not to sl: every kernel's cost
                // is per token slot, and a frame stopped by the task loss has few slots.
                let chunks = n.div_ceil(sl);
                let mut img = vec![0u32; (1 + chunks) * img_words];
                let mut fwd = Vec::with_capacity(1 + chunks); // (token slots, first, heads rows)
                for f in 0..=chunks {
                    let im = &mut img[f * img_words..(f + 1) * img_words];
                    let (lead, nt, first, base, slot) = if f == 0 {
                        (k, ntp, k, off as i64 - k as i64, so)
                    } else {
                        let s0 = (f - 1) * sl;
                        let len = sl.min(n - s0);
                        let nt = len.next_multiple_of(k); // <= sl, a multiple of K
                        let first = nt - len;
                        let base = (off + p + s0) as i64 - first as i64;
                        (nt, nt, first, base, so + s0 + k)
                    };
                    im[layout::S_BASE] = base as i32 as u32;
                    im[layout::S_FIRST] = first as u32;
                    im[layout::S_DONE] = 0;
                    im[layout::S_SC_SLOT] = slot as u32;
                    im[layout::S_SC_START] = so as u32;
                    im[layout::S_SC_END] = (so + n) as u32;
                    let (ptok, ppos) = im[layout::S_HDR..].split_at_mut(b * lead);
                    for r in 0..b {
                        ptok[r * lead..(r + 1) * lead].fill(pad);
                        for s in first..nt {
                            let c = (base + s as i64) as usize;
                            ppos[r * nt + s] = pos[r * seq + c];
                            if f > 0 {
                                ptok[r * lead + s] =
                                    tokens[r * n_all + so + (f - 1) * sl + s - first];
                            }
                        }
                    }
                    fwd.push((nt, first, if f == 0 { 1 } else { (nt - first) / k }));
                }
                i.ctx.write(&plans, 0, &img);
                let l_upper = off + p + n;
                let hb = (layout::S_HDR * 4) as u64;
                for (f, &(nt, first, rows)) in fwd.iter().enumerate() {
                    let at = (f * img_words * 4) as u64;
                    let enc = rec.encoder();
                    enc.copy_buffer_to_buffer(&plans, at, &ws.state, 0, hb);
                    enc.copy_buffer_to_buffer(
                        &plans,
                        at + hb,
                        &ws.state,
                        (plan_at * 4) as u64,
                        (plan_words * 4) as u64,
                    );
                    if f == 0 {
                        self.record_forward(&mut rec, ws, b, true, nc, j, l_upper)?;
                    } else {
                        self.record_forward_ops(
                            &mut rec,
                            ws,
                            b,
                            true,
                            nc,
                            j,
                            l_upper,
                            None,
                            true,
                            Some(nt),
                        )?;
                        if rows == 0 {
                            continue; // a lone partial group: no row of it is scored
                        }
                        let hp = MatmulParams {
                            m: (b * rows) as u32,
                            n: d.head_rows() as u32,
                            k: d.c as u32,
                            ldc: d.head_rows() as u32,
                            w_off: i.off.head as u32,
                            g_off: i.off.norm as u32,
                            eps: d.eps_rms,
                            nt: nt as u32,
                            rows_per: rows as u32,
                            row_last: (first + rows * k - 1) as u32,
                            row_step: k as u32,
                            ..Default::default()
                        };
                        i.ops
                            .score_heads
                            .record(&mut rec, &ws.bg_score_heads, &hp)?;
                    }
                    i.ops.score.record(&mut rec, &ws.bg_score, &gather(rows))?;
                }
                off += p + n;
                so += n;
                if t0 + j + 1 == t {
                    rec.encoder()
                        .copy_buffer_to_buffer(&ws.score_out, 0, &staging, 0, out_bytes);
                }
                rec.submit(&i.ctx)?;
            }
            t0 += nc;
        }
        let got: Vec<f32> = bytemuck::pod_collect_to_vec(&i.ctx.read_staging(&staging, out_bytes)?);
        let (gp, tl) = got.split_at(b * n_all);
        Ok((gp.to_vec(), tl.to_vec()))
    }

    fn generate_impl(
        &self,
        frames: &Frames,
        params: &GenerateParams,
        debug: bool,
        profile: bool,
    ) -> Result<Run> {
        let (b, t, h, w) = (frames.b, frames.t, frames.h, frames.w);
        let (need, plans) = self.generate_call(
            &frames.shape(),
            &params.gazing_ratio_each_frame,
            debug,
            true,
        )?;
        if let Some(r) = params.task_loss_requirement
            && !r.is_finite()
        {
            return Err(Error::Input(format!(
                "task_loss_requirement must be finite, got {r}"
            )));
        }
        let start = std::time::Instant::now();
        let i = &self.inner;
        let d = &i.dims;
        let tc = need.frames;
        let mut guard = i.cached.lock().unwrap_or_else(|e| e.into_inner());
        let wsp = self.ensure(&mut guard, need, &[])?;
        let (arena, ws) = (&mut wsp.arena, &wsp.r);
        self.init_generation(ws, b);
        let mut stats = CallStats::default();
        let mut kernels: Vec<KernelTime> = Vec::new();
        let ow = out_words(&ws.spec, d) as u64 * 4;
        // Submit frame by frame, so the GPU runs frame f while the CPU records frame f + 1
        // (recording a frame costs ~1 ms of CPU; one submit per clip left it all serial).
        // The parameter arena keeps every block until the call ends.
        arena.clear();
        let mut flush = |rec: Recorder<'_>, rec_start: std::time::Instant| -> Result<()> {
            stats.dispatches += rec.dispatches;
            stats.passes += rec.passes;
            stats.submits += 1;
            if profile {
                // Recording only: the profiled submit also waits for the GPU.
                stats.record_us += rec_start.elapsed().as_micros() as u64;
                for k in rec.submit_profiled(&i.ctx)? {
                    match kernels.iter_mut().find(|x| x.kernel == k.kernel) {
                        Some(x) => {
                            x.dispatches += k.dispatches;
                            x.total_us += k.total_us;
                        }
                        None => kernels.push(k),
                    }
                }
            } else {
                rec.submit(&i.ctx)?;
                stats.record_us += rec_start.elapsed().as_micros() as u64;
            }
            Ok(())
        };
        let mut t0 = 0;
        while t0 < t {
            let n = tc.min(t - t0);
            self.upload_frames(ws, frames, t0, n)?;
            let mut rec_start = std::time::Instant::now();
            let mut rec = next_recorder(&i.ctx, &mut *arena, profile)?;
            if t0 == 0 {
                rec.encoder().clear_buffer(&ws.lnw, 0, None);
            }
            self.record_vision(&mut rec, ws, b, n, t0, (h, w))?;
            for j in 0..n {
                let tt = t0 + j;
                self.record_frame(
                    &mut rec,
                    ws,
                    b,
                    &plans[tt],
                    params.task_loss_requirement,
                    n,
                    j,
                    tt,
                    debug,
                )?;
                if j + 1 < n {
                    flush(rec, rec_start)?;
                    rec_start = std::time::Instant::now();
                    rec = next_recorder(&i.ctx, &mut *arena, profile)?;
                }
            }
            if t0 + n == t {
                rec.encoder()
                    .copy_buffer_to_buffer(&ws.out, 0, &ws.out_staging, 0, ow);
            }
            flush(rec, rec_start)?;
            t0 += n;
        }
        kernels.sort_by(|a, b| b.total_us.total_cmp(&a.total_us));
        let words: Vec<u32> =
            bytemuck::pod_collect_to_vec(&i.ctx.read_staging(&ws.out_staging, ow)?);
        let out = assemble(d, &words, b, t, ws.spec.out_frames)?;
        let dbg = if debug {
            let steps = i.ctx.read_u32(&ws.state, layout::S_GSTEP as u64, 1)?[0] as usize;
            Some(i.ctx.read_f32(
                &ws.debug,
                0,
                steps.min(ws.spec.debug_steps) * b * d.head_rows(),
            )?)
        } else {
            None
        };
        stats.total_us = start.elapsed().as_micros() as u64;
        Ok(Run {
            out,
            debug_logits: dbg,
            stats,
            kernels,
        })
    }

    /// Profiling aid (not a timed test): runs `generate` once, then times each dispatch kind
    /// of a prefill forward and of a decode step (run, and skipped on a done frame) and the
    /// selection kernel, each as `reps` back-to-back dispatches in one submit. Returns
    /// (name, microseconds per dispatch). Wall-clock based; includes barriers between the
    /// repeated dispatches, as in the real command stream.
    #[doc(hidden)]
    pub fn profile_kernels(
        &self,
        pixel_values: &[f32],
        shape: &[usize],
        params: &GenerateParams,
        reps: usize,
    ) -> Result<Vec<(String, f64)>> {
        self.generate(pixel_values, shape, params)?;
        let (b, t, _, _) = check_pixels(pixel_values, shape)?;
        let i = &self.inner;
        let d = &i.dims;
        let plans = self.plans(&params.gazing_ratio_each_frame, 0)?;
        let l_upper = plans[t - 1].l_upper;
        let mut guard = i.cached.lock().unwrap_or_else(|e| e.into_inner());
        let wsp = guard
            .as_mut()
            .ok_or_else(|| Error::Backend("no workspace".into()))?;
        let (arena, ws) = (&mut wsp.arena, &wsp.r);
        let names = ["qkv", "attention+merge", "o_proj", "gate_up", "down"];
        let mut out = Vec::new();
        let per_fwd = 5 * d.layers + 1;
        let mut time =
            |label: String, f: &mut dyn FnMut(&mut Recorder<'_>) -> Result<()>| -> Result<()> {
                let t0 = std::time::Instant::now();
                let mut rec = Recorder::new(&i.ctx, &mut *arena);
                for _ in 0..reps {
                    f(&mut rec)?;
                }
                rec.submit(&i.ctx)?;
                i.ctx.wait()?;
                out.push((label, t0.elapsed().as_secs_f64() * 1e6 / reps as f64));
                Ok(())
            };
        time("empty submit+wait (per rep)".into(), &mut |_| Ok(()))?;
        for (prefill, force, tag) in [
            (true, true, "prefill"),
            (false, true, "decode"),
            (false, false, "decode skipped"),
        ] {
            for op in 0..per_fwd {
                // Layer 0 and 1 (qkv of layer 0 has the embedding loader) and the head.
                if op >= 10 && op != per_fwd - 1 {
                    continue;
                }
                let name = if op == per_fwd - 1 {
                    "head".to_string()
                } else {
                    format!("L{} {}", op / 5, names[op % 5])
                };
                time(format!("{tag} {name}"), &mut |rec| {
                    self.record_forward_ops(
                        rec,
                        ws,
                        b,
                        prefill,
                        1,
                        0,
                        l_upper,
                        Some(op),
                        force,
                        None,
                    )
                })?;
            }
        }
        let sp = SelectParams {
            batch: b as u32,
            budget: d.nv as u32,
            phase: 1,
            nt: d.k as u32,
            cap: ws.spec.cap as u32,
            lead: d.k as u32,
            npatch: d.p as u32,
            vocab: d.vocab as u32,
            pad: d.pad as u32,
            out_stride: d.nv as u32,
            out_frames: ws.spec.out_frames as u32,
            debug_rows: 1,
            pos_stride: d.nt_pre() as u32,
            ..Default::default()
        };
        time("select skipped".into(), &mut |rec| {
            i.ops.select.record(rec, &ws.bg_select, &sp)
        })?;
        let sp0 = SelectParams { phase: 0, ..sp };
        time("select (frame start, 10 slots)".into(), &mut |rec| {
            i.ops.select.record(rec, &ws.bg_select, &sp0)
        })?;
        let (hh, ww) = ws.spec.in_hw;
        time(format!("vision ({} frames)", ws.spec.frames), &mut |rec| {
            self.record_vision(rec, ws, b, ws.spec.frames.min(t), 0, (hh, ww))
        })?;
        Ok(out)
    }

    /// Starts a streaming session of `batch` rows holding up to `max_frames` frames of
    /// pixel-value size `in_hw`, given as uint8 frames of `src_hw` when that is set (the
    /// processor's resize on the GPU), with an optional task-loss requirement.
    pub fn session(
        &self,
        batch: usize,
        max_frames: usize,
        in_hw: (usize, usize),
        src_hw: Option<(usize, usize)>,
        task_loss_requirement: Option<f32>,
    ) -> Result<Session> {
        let spec = self.session_spec(batch, max_frames, in_hw, src_hw)?;
        if let Some(r) = task_loss_requirement
            && !r.is_finite()
        {
            return Err(Error::Input(format!(
                "task_loss_requirement must be finite, got {r}"
            )));
        }
        let i = &self.inner;
        let sz = self.sizes(&spec)?;
        // A session has its own workspace: the engine's cached one stays.
        sz.check_bindings(&i.ctx)?;
        self.check_fits(&MemoryEstimate::new(Some(&sz), &[]), 0)?;
        let ws = Workspace::new(&i.ctx, &i.ops, &i.wts, &i.inv_freq, spec, &sz)?;
        let mut s = Session {
            engine: self.clone(),
            ws,
            frame: 0,
            l_sum: 0,
            max_frames,
            req: task_loss_requirement,
        };
        s.reset();
        Ok(s)
    }
}

/// The recorder for the next piece of a call (profiled or not); the arena keeps its blocks.
fn next_recorder<'a>(
    ctx: &GpuContext,
    arena: &'a mut ParamArena,
    profile: bool,
) -> Result<Recorder<'a>> {
    if profile {
        Recorder::profiled(ctx, arena)
    } else {
        Ok(Recorder::resume(ctx, arena))
    }
}

/// Turns the `out` words into the official output layout.
fn assemble(
    d: &Dims,
    words: &[u32],
    b: usize,
    t: usize,
    out_frames: usize,
) -> Result<GenerateOutput> {
    let counts: Vec<usize> = words[..t].iter().map(|v| *v as usize).collect();
    if let Some((f, n)) = counts
        .iter()
        .enumerate()
        .find(|(_, n)| **n == 0 || **n > d.nv)
    {
        return Err(Error::Backend(format!(
            "GPU generation produced {n} slots for frame {f}"
        )));
    }
    let total: usize = counts.iter().sum();
    let mut gazing_pos = Vec::with_capacity(b * total);
    let mut padded = Vec::with_capacity(b * total);
    for r in 0..b {
        for (f, n) in counts.iter().enumerate() {
            let base = out_frames + (r * out_frames + f) * d.nv;
            for s in 0..*n {
                let tok = words[base + s] as usize;
                if tok > d.pad {
                    return Err(Error::Backend(format!(
                        "GPU generation produced token {tok}"
                    )));
                }
                gazing_pos.push((tok + d.nv * f) as i64);
                padded.push(tok == d.pad);
            }
        }
    }
    Ok(GenerateOutput {
        batch: b,
        gazing_pos,
        if_padded_gazing: padded,
        num_gazing_each_frame: counts,
    })
}

/// A streaming session: the KV cache, key mask, conv ring and generation state stay on the
/// GPU between frames; each [`Session::step`] runs one frame and reads back once.
pub struct Session {
    engine: Engine,
    ws: Workspace,
    frame: usize,
    l_sum: usize,
    max_frames: usize,
    req: Option<f32>,
}

impl Session {
    /// Frames run so far.
    pub fn frames(&self) -> usize {
        self.frame
    }

    /// Frames this session holds before it must be reset.
    pub fn max_frames(&self) -> usize {
        self.max_frames
    }

    /// Forgets the history (KV cache, key mask, conv ring, pending step): the next frame is
    /// run as a fresh session's first frame, in the same buffers.
    pub fn reset(&mut self) {
        let e = &self.engine;
        let d = &e.inner.dims;
        let b = self.ws.r.spec.batch;
        e.init_generation(&self.ws.r, b);
        // The causal conv reads the two previous frames from the ring: zeros before frame 0.
        e.inner
            .ctx
            .write(&self.ws.r.lnw, 0, &vec![0.0f32; b * 3 * d.p * d.c]);
        self.frame = 0;
        self.l_sum = 0;
    }

    /// Runs one frame: `pixel_values` [B, 3, H, W] (or [B, 1, 3, H, W]) at `gazing_ratio`.
    pub fn step(
        &mut self,
        pixel_values: &[f32],
        shape: &[usize],
        gazing_ratio: f32,
    ) -> Result<StepOutput> {
        let shape5: Vec<usize> = match shape.len() {
            4 => vec![shape[0], 1, shape[1], shape[2], shape[3]],
            5 => shape.to_vec(),
            _ => {
                return Err(Error::Input(format!(
                    "a streaming frame must have shape [B, 3, H, W], got {shape:?}"
                )));
            }
        };
        self.step_frames(&Frames::pixels(pixel_values, &shape5)?, gazing_ratio)
    }

    /// [`Session::step`] of one frame per row as [`Frames`] (T = 1); uint8 frames when the
    /// session was started with their size.
    pub fn step_frames(&mut self, frames: &Frames, gazing_ratio: f32) -> Result<StepOutput> {
        let (b, t, h, w) = (frames.b, frames.t, frames.h, frames.w);
        let spec = self.ws.r.spec;
        if t != 1 || b != spec.batch || (h, w) != spec.in_hw || frames.src_hw() != spec.src_hw {
            let want = match spec.src_hw {
                Some((sh, sw)) => format!(
                    "uint8 frames [{}, 1, {sh}, {sw}, 3] processed to {}x{}",
                    spec.batch, spec.in_hw.0, spec.in_hw.1
                ),
                None => format!(
                    "pixel values [{}, 1, 3, {}, {}]",
                    spec.batch, spec.in_hw.0, spec.in_hw.1
                ),
            };
            let got = match frames.src_hw() {
                Some((sh, sw)) => {
                    format!("uint8 frames [{b}, {t}, {sh}, {sw}, 3] processed to {h}x{w}")
                }
                None => format!("pixel values [{b}, {t}, 3, {h}, {w}]"),
            };
            return Err(Error::Input(format!(
                "this session takes {want}, got {got}"
            )));
        }
        if self.frame >= self.max_frames {
            return Err(Error::Input(format!(
                "this session was created for {} frames; reset it or start a new session",
                self.max_frames
            )));
        }
        let e = &self.engine;
        let i = &e.inner;
        let d = &i.dims;
        let plan = e.plans(&[gazing_ratio], self.l_sum)?.remove(0);
        let (arena, ws) = (&mut self.ws.arena, &self.ws.r);
        e.upload_frames(ws, frames, 0, 1)?;
        let ow = out_words(&ws.spec, d) as u64 * 4;
        let mut rec = Recorder::new(&i.ctx, arena);
        e.record_vision(&mut rec, ws, b, 1, self.frame, (h, w))?;
        e.record_frame(&mut rec, ws, b, &plan, self.req, 1, 0, 0, false)?;
        rec.encoder()
            .copy_buffer_to_buffer(&ws.out, 0, &ws.out_staging, 0, ow);
        rec.submit(&i.ctx)?;
        let words: Vec<u32> =
            bytemuck::pod_collect_to_vec(&i.ctx.read_staging(&ws.out_staging, ow)?);
        let o = assemble(d, &words, b, 1, 1)?;
        self.frame += 1;
        self.l_sum += d.p + plan.budget;
        let n = o.num_gazing_each_frame[0];
        Ok(StepOutput {
            batch: b,
            tokens: o.gazing_pos,
            if_padded: o.if_padded_gazing,
            num_gazing: n,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send_sync<T: Send + Sync>() {}
    fn assert_send<T: Send>() {}

    #[test]
    fn engine_is_shareable_across_threads() {
        assert_send_sync::<Engine>();
        assert_send::<Session>();
    }

    #[test]
    fn pixel_shapes_are_checked() {
        assert!(matches!(
            check_pixels(&[0.0; 10], &[1, 1, 3, 2, 2]),
            Err(Error::Input(_))
        ));
        assert!(matches!(
            check_pixels(&[0.0; 12], &[1, 1, 4, 1, 3]),
            Err(Error::Input(_))
        ));
        assert!(matches!(
            check_pixels(&[f32::NAN; 12], &[1, 1, 3, 2, 2]),
            Err(Error::Input(_))
        ));
        assert!(check_pixels(&[0.0; 12], &[1, 1, 3, 2, 2]).is_ok());
    }
}
