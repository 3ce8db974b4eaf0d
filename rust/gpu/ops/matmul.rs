//! The tiled GEMM family (`shaders/matmul.wgsl`): C = A' W^T with fused loaders
//! (plain, patchify im2col, causal-conv im2col, RMSNorm, token/vision embedding gather)
//! and epilogues (bias/ReLU/row addend, residual add, SwiGLU,
//! RoPE + KV-cache write).

use std::sync::Arc;

use bytemuck::{Pod, Zeroable};

use crate::error::{Error, Result};
use crate::gpu::buffer::{BindGroupBuilder, ParamArena, Recorder};
use crate::gpu::context::{DeviceInfo, GpuContext};
use crate::gpu::pipeline::{Kernel, PipelineKey};

/// How the A operand is produced.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ALoad {
    /// `a[m, k]` row-major.
    Plain,
    /// Conv3d patchify: im2col of `a` [frames, 3, img, img] with kernel = stride = psize.
    Patch,
    /// Causal 3x3x3 conv: im2col of the post-LayerNorm ring window [B, frames_in, g*g, cin],
    /// K ordered (tap, cin).
    Conv3,
    /// RMSNorm(a[m]) * g (row `m`, or the last slot of batch row `m` with `last`).
    Rms,
    /// Decoder input: plan token embedding or vision token, RMSNormed; also stores x.
    Embed,
}

/// What happens to the accumulator.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Epi {
    /// out[m, n] = acc (+ bias) (ReLU) (+ addend[m % add_mod, n]).
    Store,
    /// out[m, n] += acc.
    Residual,
    /// W rows interleave gate/up: out[m, n/2] = silu(acc[n]) * acc[n+1].
    Swiglu,
    /// W rows permuted q|k|v with RoPE pairs adjacent: rotate q, k by the plan's positions,
    /// write q to `out` and k, v of active slots into the KV cache.
    Qkv,
}

/// Workgroup tile shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Tile {
    /// 64 x 64, 256 threads (4 x 4 each): big GEMMs (vision, prefill).
    Large,
    /// 16 x 32, 64 threads (4 x 2 each), k-steps of 64: few-row GEMMs.
    Small,
    /// Small's tiles, or the `gemv` entry for at most [`GEMV_MAX_ROWS`] rows: 16 rows x 2
    /// columns per workgroup, 64 threads splitting K. For decode steps (M = 10 B) and the
    /// heads (M = B), where with one video the tiles leave most of the GPU idle.
    Gemv,
}

/// Rows up to which `Tile::Gemv` launches the `gemv` entry on a GPU. On an H100 (Vulkan,
/// 192-wide decoder) it took 14 us where Small's tiles took 23-33 us at M = 10, but 78-230 us
/// where the tiles took 39-89 us at M = 450 (45 tiles), and 100 vs 58 us for the heads at
/// M = 45. CPU devices never use it: [`gemv_max_rows`].
pub const GEMV_MAX_ROWS: u32 = 16;

/// The `gemv` row limit for this device: [`GEMV_MAX_ROWS`], or 0 on a CPU device (lavapipe),
/// where a workgroup's invocations run in turns between barriers, so the gemv entry's 64
/// threads per two columns cost more than they hide: 4 frames of case a took 29.5 s of kernel
/// time with it and 15.2 s with Small's tiles (2-core lavapipe).
pub fn gemv_max_rows(info: &DeviceInfo) -> u32 {
    if info.device_type == "Cpu" {
        0
    } else {
        GEMV_MAX_ROWS
    }
}

/// The `direct` entry's block per invocation (DM rows x DN columns, DN even) and workgroup
/// size. On 2-core lavapipe every memory access costs about the same, lane by lane, so the
/// loads per FMA set the time: 8 x 4 takes 13 loads per 32 FMAs where `main`'s 4 x 2 micro
/// tile takes about 7 (with the workgroup-memory stores) per 8. Small workgroups leave work
/// for both cores at decode sizes (M = 10, N = 192).
pub const DIRECT_BLOCK: (u32, u32) = (8, 4);
pub const DIRECT_WORKGROUP: u32 = 16;

/// Whether this device runs the `direct` entry instead of the tiles: CPU devices (lavapipe).
pub fn direct_entry(info: &DeviceInfo) -> bool {
    info.device_type == "Cpu"
}

impl Tile {
    /// (TM, TN, RM, RN) of the `main` entry (`gemv` compiles beside it with Small's shape and
    /// uses TM rows).
    pub fn dims(self) -> (u32, u32, u32, u32) {
        match self {
            Tile::Large => (64, 64, 4, 4),
            Tile::Small | Tile::Gemv => (16, 32, 4, 2),
        }
    }

    /// Depth of one k-step (workgroup memory: (TM + TN) * TK floats, at most 12 KiB).
    pub fn depth(self) -> u32 {
        match self {
            Tile::Large => 16,
            Tile::Small | Tile::Gemv => 64,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MatmulSpec {
    pub a: ALoad,
    pub epi: Epi,
    pub tile: Tile,
    pub last: bool,
    /// A rows strided through each batch row (`rows_per`, `row_last`, `row_step`).
    pub strided: bool,
    pub bias: bool,
    pub relu: bool,
    pub addrow: bool,
    /// Decoder kernel: binds the generation state and may skip when the frame is done.
    pub dec: bool,
}

impl MatmulSpec {
    pub fn new(a: ALoad, epi: Epi, tile: Tile) -> Self {
        Self {
            a,
            epi,
            tile,
            last: false,
            strided: false,
            bias: false,
            relu: false,
            addrow: false,
            dec: matches!(a, ALoad::Embed) || matches!(epi, Epi::Qkv),
        }
    }
    pub fn bias(mut self) -> Self {
        self.bias = true;
        self
    }
    pub fn relu(mut self) -> Self {
        self.relu = true;
        self
    }
    pub fn addrow(mut self) -> Self {
        self.addrow = true;
        self
    }
    pub fn last(mut self) -> Self {
        self.last = true;
        self
    }
    pub fn strided(mut self) -> Self {
        self.strided = true;
        self
    }
    pub fn dec(mut self) -> Self {
        self.dec = true;
        self
    }

    fn key(&self) -> PipelineKey {
        let (tm, tn, rm, rn) = self.tile.dims();
        let a = match self.a {
            ALoad::Plain => "plain",
            ALoad::Patch => "patch",
            ALoad::Conv3 => "conv3",
            ALoad::Rms => "rms",
            ALoad::Embed => "embed",
        };
        let epi = match self.epi {
            Epi::Store => "store",
            Epi::Residual => "residual",
            Epi::Swiglu => "swiglu",
            Epi::Qkv => "qkv",
        };
        let b = |v: bool| if v { "1" } else { "0" };
        PipelineKey::new("matmul", "main")
            .define("TM", tm)
            .define("TN", tn)
            .define("RM", rm)
            .define("RN", rn)
            .define("TK", self.tile.depth())
            .define("A", a)
            .define("EPI", epi)
            .define("NORM", b(matches!(self.a, ALoad::Rms | ALoad::Embed)))
            .define("LAST", b(self.last))
            .define("STRIDED", b(self.strided))
            .define("BIAS", b(self.bias))
            .define("RELU", b(self.relu))
            .define("ADDROW", b(self.addrow))
            .define("DEC", b(self.dec))
            .define("DM", DIRECT_BLOCK.0)
            .define("DN", DIRECT_BLOCK.1)
            .define("DWG", DIRECT_WORKGROUP)
    }
}

/// Parameter block of `matmul.wgsl` (field order = the WGSL struct).
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable, Debug, Default, PartialEq)]
pub struct MatmulParams {
    pub m: u32,
    pub n: u32,
    pub k: u32,
    pub ldc: u32,
    pub w_off: u32,
    pub b_off: u32,
    pub g_off: u32,
    pub add_off: u32,
    pub add_mod: u32,
    pub nt: u32,
    pub batch: u32,
    pub cap: u32,
    pub lead: u32,
    pub _nchunk: u32,
    pub skip_if_done: u32,
    pub eps: f32,
    pub grid: u32,
    pub img: u32,
    pub psize: u32,
    pub cin: u32,
    pub frames_in: u32,
    pub frames_out: u32,
    pub vis_frames: u32,
    pub vis_frame: u32,
    pub heads: u32,
    pub head_dim: u32,
    pub a_off: u32,
    pub pos_stride: u32,
    pub t0: u32,
    pub rows_per: u32,
    pub row_last: u32,
    pub row_step: u32,
}

/// Buffers a matmul variant may bind besides A, the weights and the output.
#[derive(Default, Clone, Copy)]
pub struct Extra<'a> {
    /// Generation state (decoder kernels).
    pub state: Option<&'a wgpu::Buffer>,
    /// Decoder input x written by the embed loader.
    pub xw: Option<&'a wgpu::Buffer>,
    /// KV cache of this layer (Qkv).
    pub kv: Option<&'a wgpu::Buffer>,
    /// cos/sin table (Qkv).
    pub rope: Option<&'a wgpu::Buffer>,
}

pub struct Matmul {
    pub spec: MatmulSpec,
    /// The entry past gemv's rows: `main` (tiles), or `direct` on CPU devices.
    kernel: Arc<Kernel>,
    /// `Tile::Gemv`: the `gemv` entry of the same source. Its bind group layout has the same
    /// entries, so the bind groups made for `kernel` serve it too (WebGPU group-equivalence).
    gemv: Option<Arc<Kernel>>,
    /// Rows up to which `gemv` runs ([`gemv_max_rows`] of the device).
    gemv_max_rows: u32,
}

impl Matmul {
    pub fn new(ctx: &GpuContext, spec: MatmulSpec) -> Result<Self> {
        let key = spec.key();
        let gemv_max_rows = gemv_max_rows(&ctx.info);
        // The gemv entry only where it runs (not on CPU devices, whose limit is 0).
        let gemv = match spec.tile {
            Tile::Gemv if gemv_max_rows > 0 => Some(ctx.kernel(&PipelineKey {
                entry: "gemv",
                ..key.clone()
            })?),
            _ => None,
        };
        // CPU devices run `direct` for every product, and never compile the tiles.
        let entry = if direct_entry(&ctx.info) {
            "direct"
        } else {
            "main"
        };
        Ok(Self {
            spec,
            kernel: ctx.kernel(&PipelineKey { entry, ..key })?,
            gemv,
            gemv_max_rows,
        })
    }

    /// Runs the `direct` entry or the tiles, whatever the device (tests compare the entries
    /// on one device).
    #[cfg(test)]
    pub fn with_direct(mut self, ctx: &GpuContext, on: bool) -> Self {
        let entry = if on { "direct" } else { "main" };
        self.kernel = ctx
            .kernel(&PipelineKey {
                entry,
                ..self.kernel.key.clone()
            })
            .unwrap();
        self
    }

    /// Overrides the device's `gemv` row limit (tests run the gemv entry on lavapipe too,
    /// compiled here where the device itself never runs it).
    #[cfg(test)]
    pub fn with_gemv_max_rows(mut self, ctx: &GpuContext, rows: u32) -> Self {
        if self.spec.tile == Tile::Gemv && rows > 0 && self.gemv.is_none() {
            let key = PipelineKey {
                entry: "gemv",
                ..self.kernel.key.clone()
            };
            self.gemv = Some(ctx.kernel(&key).unwrap());
        }
        self.gemv_max_rows = rows;
        self
    }

    pub fn bind(
        &self,
        ctx: &GpuContext,
        arena: &ParamArena,
        a: &wgpu::Buffer,
        wts: &wgpu::Buffer,
        out: &wgpu::Buffer,
        extra: Extra<'_>,
    ) -> Result<wgpu::BindGroup> {
        let mut b = BindGroupBuilder::new(ctx, &self.kernel, arena)
            .bind(1, a)
            .bind(2, wts)
            .bind(3, out);
        let has = |n: u32| self.kernel.bindings.iter().any(|(m, _)| *m == n);
        for (n, buf, name) in [
            (4, extra.state, "state"),
            (5, extra.xw, "xw"),
            (6, extra.kv, "kv"),
            (7, extra.rope, "rope"),
        ] {
            if has(n) {
                let buf = buf.ok_or_else(|| {
                    Error::Backend(format!("matmul {:?} needs buffer `{name}`", self.spec))
                })?;
                b = b.bind(n, buf);
            }
        }
        b.build()
    }

    pub fn record(
        &self,
        rec: &mut Recorder<'_>,
        bg: &wgpu::BindGroup,
        p: &MatmulParams,
    ) -> Result<()> {
        if matches!(self.spec.epi, Epi::Swiglu | Epi::Qkv) && !p.n.is_multiple_of(2) {
            return Err(Error::Backend("paired epilogue needs an even N".into()));
        }
        match &self.gemv {
            Some(g) if p.m <= self.gemv_max_rows => {
                let (rows, _, _, _) = self.spec.tile.dims();
                rec.dispatch(g, bg, p, [p.n.div_ceil(2), p.m.div_ceil(rows), 1])
            }
            _ if self.kernel.key.entry == "direct" => {
                let (dm, dn) = DIRECT_BLOCK;
                let cols = dn * DIRECT_WORKGROUP;
                rec.dispatch(
                    &self.kernel,
                    bg,
                    p,
                    [p.n.div_ceil(cols), p.m.div_ceil(dm), 1],
                )
            }
            _ => {
                let (tm, tn, _, _) = self.spec.tile.dims();
                rec.dispatch(&self.kernel, bg, p, [p.n.div_ceil(tn), p.m.div_ceil(tm), 1])
            }
        }
    }
}

/// CPU reference: out[m, n] = sum_k a[m, k] w[n, k] (f64 accumulation, for tests).
pub fn matmul_cpu(a: &[f32], w: &[f32], m: usize, n: usize, k: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; m * n];
    for i in 0..m {
        for j in 0..n {
            let mut s = 0.0f64;
            for t in 0..k {
                s += a[i * k + t] as f64 * w[j * k + t] as f64;
            }
            out[i * n + j] = s as f32;
        }
    }
    out
}

/// CPU reference RMSNorm of rows of length k.
pub fn rmsnorm_cpu(x: &[f32], g: &[f32], k: usize, eps: f32) -> Vec<f32> {
    let mut out = vec![0.0f32; x.len()];
    for (row, o) in x.chunks(k).zip(out.chunks_mut(k)) {
        let ms = row.iter().map(|v| (*v as f64) * (*v as f64)).sum::<f64>() / k as f64;
        let r = 1.0 / (ms + eps as f64).sqrt();
        for t in 0..k {
            o[t] = (row[t] as f64 * r) as f32 * g[t];
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::ops::testutil::{Rng, assert_close, ctx};

    /// Runs one matmul variant (none of these tests' loaders or epilogues reads the
    /// generation state, the KV cache, RoPE or the embed loader's stored x: the decoder's
    /// kernels are tested through `tests/test_shaders_wgpu_py.py` and the decoder tests);
    /// `wts` is the packed weight buffer, returns `out` after. Checks on the way that
    /// `direct` gives `main`'s bits, and returns the GPU choice (the gemv entry up to its rows).
    fn run(
        spec: MatmulSpec,
        a: &[f32],
        wts: &[f32],
        out_init: &[f32],
        p: MatmulParams,
    ) -> Vec<f32> {
        let ctx = ctx();
        let op = |gemv_rows, direct| {
            Matmul::new(ctx, spec)
                .unwrap()
                .with_gemv_max_rows(ctx, gemv_rows)
                .with_direct(ctx, direct)
        };
        let once = |op| run_op(op, a, wts, out_init, p);
        let tiled = once(op(0, false));
        assert!(
            once(op(0, true)) == tiled,
            "direct != main for {spec:?} {p:?}"
        );
        once(op(GEMV_MAX_ROWS, false))
    }

    fn run_op(op: Matmul, a: &[f32], wts: &[f32], out_init: &[f32], p: MatmulParams) -> Vec<f32> {
        let ctx = ctx();
        let ab = ctx.storage_init("a", a).unwrap();
        let wb = ctx.storage_init("w", wts).unwrap();
        let ob = ctx.storage_init("out", out_init).unwrap();
        let mut arena = ParamArena::new(ctx, 4).unwrap();
        let bg = op
            .bind(ctx, &arena, &ab, &wb, &ob, Extra::default())
            .unwrap();
        let mut rec = Recorder::new(ctx, &mut arena);
        op.record(&mut rec, &bg, &p).unwrap();
        rec.submit(ctx).unwrap();
        ctx.read_f32(&ob, 0, out_init.len()).unwrap()
    }

    fn base(m: usize, n: usize, k: usize) -> MatmulParams {
        MatmulParams {
            m: m as u32,
            n: n as u32,
            k: k as u32,
            ldc: n as u32,
            ..Default::default()
        }
    }

    #[test]
    fn matmul_bias_relu_addrow() {
        for (tile, m, n, k) in [
            (Tile::Large, 70, 37, 45),
            (Tile::Small, 13, 33, 29),
            (Tile::Gemv, 13, 33, 131), // the gemv entry
            (Tile::Gemv, 37, 33, 131), // past GEMV_MAX_ROWS: Small's tiles
        ] {
            let mut rng = Rng(11);
            let a = rng.vec(m * k, 1.0);
            let w = rng.vec(n * k, 1.0);
            let bias = rng.vec(n, 1.0);
            let add = rng.vec(5 * n, 1.0);
            let wts: Vec<f32> = [w.clone(), bias.clone(), add.clone()].concat();
            let mut p = base(m, n, k);
            p.b_off = (n * k) as u32;
            p.add_off = (n * k + n) as u32;
            p.add_mod = 5;
            let spec = MatmulSpec::new(ALoad::Plain, Epi::Store, tile)
                .bias()
                .relu();
            let got = run(spec, &a, &wts, &vec![0.0; m * n], p);
            let mut want = matmul_cpu(&a, &w, m, n, k);
            for i in 0..m {
                for j in 0..n {
                    want[i * n + j] = (want[i * n + j] + bias[j]).max(0.0);
                }
            }
            assert_close(
                &format!("matmul bias relu {tile:?}"),
                &got,
                &want,
                1e-5,
                1e-5,
            );

            let spec = MatmulSpec::new(ALoad::Plain, Epi::Store, tile)
                .bias()
                .addrow();
            let got = run(spec, &a, &wts, &vec![0.0; m * n], p);
            let mut want = matmul_cpu(&a, &w, m, n, k);
            for i in 0..m {
                for j in 0..n {
                    want[i * n + j] = want[i * n + j] + bias[j] + add[(i % 5) * n + j];
                }
            }
            assert_close(
                &format!("matmul bias addrow {tile:?}"),
                &got,
                &want,
                1e-5,
                1e-5,
            );
        }
    }

    #[test]
    fn matmul_residual_and_swiglu() {
        for m in [19, 11] {
            residual_and_swiglu(m, 22, 35);
        }
    }

    fn residual_and_swiglu(m: usize, n: usize, k: usize) {
        let mut rng = Rng(12);
        let a = rng.vec(m * k, 1.0);
        let w = rng.vec(n * k, 1.0);
        let x0 = rng.vec(m * n, 1.0);
        let mm = matmul_cpu(&a, &w, m, n, k);
        for tile in [Tile::Small, Tile::Gemv] {
            let spec = MatmulSpec::new(ALoad::Plain, Epi::Residual, tile);
            let got = run(spec, &a, &w, &x0, base(m, n, k));
            let want: Vec<f32> = x0.iter().zip(&mm).map(|(x, y)| x + y).collect();
            assert_close(
                &format!("matmul residual {tile:?}"),
                &got,
                &want,
                1e-5,
                1e-5,
            );
        }

        // SwiGLU: rows interleave gate/up; N/2 outputs per row.
        for tile in [Tile::Large, Tile::Gemv] {
            let spec = MatmulSpec::new(ALoad::Plain, Epi::Swiglu, tile);
            let mut p = base(m, n, k);
            p.ldc = (n / 2) as u32;
            let got = run(spec, &a, &w, &vec![0.0; m * n / 2], p);
            let mut want = vec![0.0f32; m * n / 2];
            for i in 0..m {
                for j in 0..n / 2 {
                    let g = mm[i * n + 2 * j];
                    let u = mm[i * n + 2 * j + 1];
                    want[i * n / 2 + j] = g / (1.0 + (-g).exp()) * u;
                }
            }
            assert_close(&format!("matmul swiglu {tile:?}"), &got, &want, 1e-5, 1e-5);
        }
    }

    #[test]
    fn matmul_rmsnorm_rows_and_last_slot() {
        let (m, n, k) = (21, 26, 37);
        let mut rng = Rng(13);
        let a = rng.vec(m * k, 2.0);
        let w = rng.vec(n * k, 1.0);
        let g = rng.vec(k, 1.0);
        let wts = [w.clone(), g.clone()].concat();
        let mut p = base(m, n, k);
        p.g_off = (n * k) as u32;
        p.eps = 1e-5;
        for (tile, rows) in [
            (Tile::Large, m),
            (Tile::Small, m),
            (Tile::Gemv, m),
            (Tile::Gemv, 9),
        ] {
            let mut p = p;
            p.m = rows as u32;
            let spec = MatmulSpec::new(ALoad::Rms, Epi::Store, tile);
            let got = run(spec, &a, &wts, &vec![0.0; m * n], p);
            let want = matmul_cpu(&rmsnorm_cpu(&a, &g, k, 1e-5), &w, m, n, k);
            let rows_want = &want[..rows * n];
            assert_close(
                &format!("matmul rmsnorm {tile:?} M={rows}"),
                &got[..rows * n],
                rows_want,
                2e-5,
                1e-5,
            );
            assert!(
                got[rows * n..].iter().all(|v| *v == 0.0),
                "rows past M written"
            );
        }
        // Heads: row m of the output is the last of nt = 7 slots of batch row m.
        let nt = 7;
        let b = m / nt;
        let mut p2 = p;
        p2.m = b as u32;
        p2.nt = nt as u32;
        let last: Vec<f32> = (0..b)
            .flat_map(|r| a[(r * nt + nt - 1) * k..(r * nt + nt) * k].to_vec())
            .collect();
        let want = matmul_cpu(&rmsnorm_cpu(&last, &g, k, 1e-5), &w, b, n, k);
        for tile in [Tile::Small, Tile::Gemv] {
            let spec = MatmulSpec::new(ALoad::Rms, Epi::Store, tile).last();
            let got = run(spec, &a, &wts, &vec![0.0; b * n], p2);
            assert_close(
                &format!("matmul rmsnorm last slot {tile:?}"),
                &got,
                &want,
                2e-5,
                1e-5,
            );
        }
        // Strided rows: 2 per batch row of nt = 7 slots, every 3 slots ending at slot 5
        // (slots 2 and 5), as the score's heads at group ends.
        let (per, last_slot, step) = (2usize, 5usize, 3usize);
        let rows: Vec<f32> = (0..b)
            .flat_map(|r| {
                (0..per).flat_map(move |j| {
                    let s = last_slot - (per - 1 - j) * step;
                    (r * nt + s) * k..(r * nt + s + 1) * k
                })
            })
            .map(|i| a[i])
            .collect();
        let want = matmul_cpu(&rmsnorm_cpu(&rows, &g, k, 1e-5), &w, b * per, n, k);
        let mut p3 = p2;
        p3.m = (b * per) as u32;
        p3.rows_per = per as u32;
        p3.row_last = last_slot as u32;
        p3.row_step = step as u32;
        for tile in [Tile::Small, Tile::Gemv] {
            let spec = MatmulSpec::new(ALoad::Rms, Epi::Store, tile).strided();
            let out0 = vec![0.0; b * per * n];
            let got = run(spec, &a, &wts, &out0, p3);
            assert_close(
                &format!("matmul rmsnorm strided rows {tile:?}"),
                &got,
                &want,
                2e-5,
                1e-5,
            );
        }
    }

    #[test]
    fn matmul_patchify() {
        // 3 frames, 3x3 grid of 5x5 patches (img 15), 6 output channels.
        let (frames, grid, ps, n) = (3usize, 3usize, 5usize, 6usize);
        let img = grid * ps;
        let k = 3 * ps * ps;
        let mut rng = Rng(14);
        let x = rng.vec(frames * 3 * img * img, 1.0);
        let w = rng.vec(n * k, 1.0);
        let bias = rng.vec(n, 1.0);
        let wts = [w.clone(), bias.clone()].concat();
        let m = frames * grid * grid;
        let mut p = base(m, n, k);
        p.b_off = (n * k) as u32;
        p.grid = grid as u32;
        p.img = img as u32;
        p.psize = ps as u32;
        let spec = MatmulSpec::new(ALoad::Patch, Epi::Store, Tile::Large).bias();
        let got = run(spec, &x, &wts, &vec![0.0; m * n], p);
        let mut cols = vec![0.0f32; m * k];
        for f in 0..frames {
            for py in 0..grid {
                for px in 0..grid {
                    let row = (f * grid + py) * grid + px;
                    for c in 0..3 {
                        for ky in 0..ps {
                            for kx in 0..ps {
                                cols[row * k + (c * ps + ky) * ps + kx] =
                                    x[((f * 3 + c) * img + py * ps + ky) * img + px * ps + kx];
                            }
                        }
                    }
                }
            }
        }
        let mut want = matmul_cpu(&cols, &w, m, n, k);
        for i in 0..m {
            for j in 0..n {
                want[i * n + j] += bias[j];
            }
        }
        assert_close("matmul patchify", &got, &want, 1e-5, 1e-5);
    }

    /// Causal 3x3x3 conv over a ring window: frames before the stream start are zero slots.
    #[test]
    fn matmul_causal_conv3_ring() {
        let (b, tc, wn, g, cin, n, t0) = (2usize, 3usize, 5usize, 4usize, 7usize, 6usize, 4usize);
        let hw = g * g;
        let k = 27 * cin;
        let mut rng = Rng(15);
        // Session frames t0-2 .. t0+tc-1 (the two before t0 are the cache).
        let nf = tc + 2;
        let frames: Vec<f32> = rng.vec(b * nf * hw * cin, 1.0);
        let fr =
            |bb: usize, f: usize, s: usize, c: usize| frames[((bb * nf + f) * hw + s) * cin + c];
        // Ring layout: session frame t in slot (t + 2) % wn.
        let mut ring = vec![0.0f32; b * wn * hw * cin];
        for bb in 0..b {
            for f in 0..nf {
                let t = t0 + f - 2;
                let slot = (t + 2) % wn;
                for s in 0..hw {
                    for c in 0..cin {
                        ring[((bb * wn + slot) * hw + s) * cin + c] = fr(bb, f, s, c);
                    }
                }
            }
        }
        // Weight in torch layout [n, cin, 3, 3, 3] and reordered to [n, tap, cin].
        let wt = rng.vec(n * cin * 27, 1.0);
        let mut wr = vec![0.0f32; n * k];
        for o in 0..n {
            for c in 0..cin {
                for tap in 0..27 {
                    wr[(o * 27 + tap) * cin + c] = wt[(o * cin + c) * 27 + tap];
                }
            }
        }
        let bias = rng.vec(n, 1.0);
        let wts = [wr, bias.clone()].concat();
        let m = b * tc * hw;
        let mut p = base(m, n, k);
        p.b_off = (n * k) as u32;
        p.grid = g as u32;
        p.cin = cin as u32;
        p.frames_in = wn as u32;
        p.frames_out = tc as u32;
        p.t0 = t0 as u32;
        let spec = MatmulSpec::new(ALoad::Conv3, Epi::Store, Tile::Large)
            .bias()
            .relu();
        let got = run(spec, &ring, &wts, &vec![0.0; m * n], p);
        let mut want = vec![0.0f32; m * n];
        for bb in 0..b {
            for j in 0..tc {
                for y in 0..g as i64 {
                    for x in 0..g as i64 {
                        let row = ((bb * tc + j) * hw) + (y as usize) * g + x as usize;
                        for o in 0..n {
                            let mut s = bias[o] as f64;
                            for dt in 0..3 {
                                for dy in 0..3i64 {
                                    for dx in 0..3i64 {
                                        let (yy, xx) = (y + dy - 1, x + dx - 1);
                                        if yy < 0 || xx < 0 || yy >= g as i64 || xx >= g as i64 {
                                            continue;
                                        }
                                        let sp = (yy as usize) * g + xx as usize;
                                        for c in 0..cin {
                                            let wv = wt[(o * cin + c) * 27
                                                + dt * 9
                                                + (dy * 3 + dx) as usize];
                                            s += wv as f64 * fr(bb, j + dt, sp, c) as f64;
                                        }
                                    }
                                }
                            }
                            want[row * n + o] = (s as f32).max(0.0);
                        }
                    }
                }
            }
        }
        assert_close("matmul causal conv3 (ring)", &got, &want, 2e-5, 1e-5);
    }
}

/// GEMM throughput probe (profiling aid): `-- --ignored bench_matmul --nocapture`.
#[cfg(test)]
mod bench {
    use super::*;
    use crate::gpu::ops::testutil::{Rng, ctx};

    #[test]
    #[ignore]
    fn bench_matmul() {
        let ctx = ctx();
        for (tile, a_mode, m, n, k) in [
            (Tile::Large, ALoad::Plain, 256usize, 256usize, 256usize),
            (Tile::Small, ALoad::Plain, 10, 576, 192),
            (Tile::Small, ALoad::Rms, 10, 576, 192),
            (Tile::Large, ALoad::Rms, 206, 768, 192),
            (Tile::Small, ALoad::Rms, 1, 2660, 192),
        ] {
            for direct in [false, true] {
                let mut rng = Rng(1);
                let a = rng.vec(m * k, 1.0);
                let w = rng.vec(n * k + k, 1.0);
                let ab = ctx.storage_init("a", &a).unwrap();
                let wb = ctx.storage_init("w", &w).unwrap();
                let ob = ctx.storage("o", (m * n * 4) as u64).unwrap();
                let op = Matmul::new(ctx, MatmulSpec::new(a_mode, Epi::Store, tile))
                    .unwrap()
                    .with_direct(ctx, direct);
                let mut arena = ParamArena::new(ctx, 2).unwrap();
                let bg = op
                    .bind(ctx, &arena, &ab, &wb, &ob, Extra::default())
                    .unwrap();
                let p = MatmulParams {
                    m: m as u32,
                    n: n as u32,
                    k: k as u32,
                    ldc: n as u32,
                    g_off: (n * k) as u32,
                    eps: 1e-5,
                    ..Default::default()
                };
                let reps = 20;
                let mut best = f64::MAX;
                for _ in 0..3 {
                    let t0 = std::time::Instant::now();
                    let mut rec = Recorder::new(ctx, &mut arena);
                    for _ in 0..reps {
                        op.record(&mut rec, &bg, &p).unwrap();
                    }
                    rec.submit(ctx).unwrap();
                    ctx.wait().unwrap();
                    best = best.min(t0.elapsed().as_secs_f64() / reps as f64);
                }
                eprintln!(
                    "matmul {} {tile:?} {a_mode:?} {m}x{n}x{k}: {:.1} us, {:.2} GFLOP/s",
                    if direct { "direct" } else { "tiled" },
                    best * 1e6,
                    2.0 * (m * n * k) as f64 / best / 1e9
                );
            }
        }
    }
}
