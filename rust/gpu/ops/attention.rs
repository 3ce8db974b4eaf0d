//! Causal attention over the KV cache with a key-padding mask, split over key chunks, and
//! the merge of the chunks (`shaders/attention.wgsl`).

use std::sync::Arc;

use bytemuck::{Pod, Zeroable};

use crate::error::{Error, Result};
use crate::gpu::buffer::{BindGroupBuilder, ParamArena, Recorder};
use crate::gpu::context::GpuContext;
use crate::gpu::ops::matmul::direct_entry;
use crate::gpu::pipeline::{Kernel, PipelineKey};

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable, Debug, Default, PartialEq)]
pub struct AttnParams {
    pub batch: u32,
    pub nt: u32,
    pub cap: u32,
    pub nchunk: u32,
    pub chunk: u32,
    pub heads: u32,
    pub skip_if_done: u32,
    pub scale: f32,
}

/// Keys per tile of the attention kernel (`KT` in the shader); chunks are multiples of it.
pub const KT: u32 = 32;

pub struct Attention {
    kernel: Arc<Kernel>,
    merge: Arc<Kernel>,
    /// Query slots per workgroup.
    qt: u32,
}

impl Attention {
    /// `qt` query slots per workgroup with `lanes` threads each: 64 x 1 for prefill
    /// forwards, 16 x 4 for decode steps (few queries, long key chunks).
    pub fn new(ctx: &GpuContext, head_dim: usize, qt: u32, lanes: u32) -> Result<Self> {
        let threads = qt * lanes;
        let hd4 = head_dim as u32 / 4;
        // The shader's constant trip counts and its lane hand-over through the K/V tiles.
        if lanes == 0
            || !(KT * hd4).is_multiple_of(threads)
            || (lanes - 1) * qt > 2 * KT
            || threads > ctx.limits.max_compute_invocations_per_workgroup
        {
            return Err(Error::Backend(format!(
                "attention: {qt} slots x {lanes} lanes does not fit head_dim {head_dim}"
            )));
        }
        let key = |e| {
            PipelineKey::new("attention", e)
                .define("HEAD_DIM", head_dim)
                .define("QT", qt)
                .define("LANES", lanes)
        };
        // CPU devices run the `direct` entry: same partials, each key read once per lane.
        let entry = if direct_entry(&ctx.info) {
            "direct"
        } else {
            "main"
        };
        Ok(Self {
            kernel: ctx.kernel(&key(entry))?,
            merge: ctx.kernel(&key("merge"))?,
            qt,
        })
    }

    /// Runs the `direct` entry or `main`, whatever the device (tests compare them).
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

    /// `gen` state, `q` [B, nt, C], `kv` [B, cap, 2, C], `kvmask` [B, cap] u32, `part` out.
    #[allow(clippy::too_many_arguments)]
    pub fn bind(
        &self,
        ctx: &GpuContext,
        arena: &ParamArena,
        state: &wgpu::Buffer,
        q: &wgpu::Buffer,
        kv: &wgpu::Buffer,
        kvmask: &wgpu::Buffer,
        part: &wgpu::Buffer,
    ) -> Result<wgpu::BindGroup> {
        BindGroupBuilder::new(ctx, &self.kernel, arena)
            .bind(1, state)
            .bind(2, q)
            .bind(3, kv)
            .bind(4, kvmask)
            .bind(5, part)
            .build()
    }

    /// Records the chunked attention and the merge (two dispatches).
    pub fn record(
        &self,
        rec: &mut Recorder<'_>,
        bg: &wgpu::BindGroup,
        p: &AttnParams,
        head_dim: u32,
    ) -> Result<()> {
        debug_assert!(p.chunk.is_multiple_of(KT));
        rec.dispatch(
            &self.kernel,
            bg,
            p,
            [p.nt.div_ceil(self.qt), p.nchunk, p.batch * p.heads],
        )?;
        let threads = p.batch * p.nt * p.heads * (head_dim / 4);
        let groups = threads.div_ceil(64);
        let gx = groups.min(32768);
        rec.dispatch(&self.merge, bg, p, [gx, groups.div_ceil(gx), 1])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::ops::matmul::{
        ALoad, Epi, Extra, Matmul, MatmulParams, MatmulSpec, Tile, matmul_cpu, rmsnorm_cpu,
    };
    use crate::gpu::ops::testutil::{Rng, assert_close, ctx};

    const S_HDR: usize = 16;
    const ROW_WORDS: usize = 288;

    /// Embedding gather + RMSNorm + q/k/v + RoPE + cache write, then attention over the
    /// cache with a padding mask and per-slot positions, then the chunk merge; against a CPU
    /// reference of the same math.
    #[test]
    fn embed_qkv_rope_attention_merge() {
        let ctx = ctx();
        let (b, heads, hd, lead, npatch) = (2usize, 2usize, 8usize, 3usize, 4usize);
        let c = heads * hd;
        let nt = lead + npatch;
        let (cap, base, first) = (80usize, 45i32, 1usize);
        let vocab = 5usize;
        let chunk = KT as usize;
        let nchunk = (base as usize + nt).div_ceil(chunk);
        let mut rng = Rng(31);

        // Packed weights: embed table, qkv (torch layout, then permuted), norm g.
        let embed = rng.vec(vocab * c, 1.0);
        let wq = rng.vec(3 * c * c, 0.5);
        let g = rng.vec(c, 1.0);
        let mut wperm = vec![0.0f32; 3 * c * c];
        for r in 0..3 * c {
            let (sec, w) = (r / c, r % c);
            let (h, e) = (w / hd, w % hd);
            let orig = sec * c + h * hd + e / 2 + (e % 2) * (hd / 2);
            wperm[r * c..(r + 1) * c].copy_from_slice(&wq[orig * c..(orig + 1) * c]);
        }
        let w_off = vocab * c;
        let g_off = w_off + 3 * c * c;
        let wts = [embed.clone(), wperm, g.clone()].concat();

        // Generation state: base/first in the header, plan tokens and positions.
        let vis_frames = 2usize;
        let vis_frame = 1usize;
        let vis = rng.vec(b * vis_frames * npatch * c, 1.0);
        let mut state = vec![0u32; S_HDR + b * ROW_WORDS + b * lead + b * nt];
        state[2] = base as u32;
        state[3] = first as u32;
        let ptok = S_HDR + b * ROW_WORDS;
        let ppos = ptok + b * lead;
        let npos = 20usize;
        let mut toks = vec![0usize; b * lead];
        let mut poss = vec![0usize; b * nt];
        for r in 0..b {
            for i in 0..lead {
                toks[r * lead + i] = rng.below(vocab as u64) as usize;
                state[ptok + r * lead + i] = toks[r * lead + i] as u32;
            }
            for i in 0..nt {
                poss[r * nt + i] = rng.below(npos as u64) as usize;
                state[ppos + r * nt + i] = poss[r * nt + i] as u32;
            }
        }
        // cos/sin table [npos, hd]: cos | sin of pos * f.
        let inv: Vec<f32> = (0..hd / 2).map(|i| 1.0 / (3.0f32).powi(i as i32)).collect();
        let mut rope = vec![0.0f32; npos * hd];
        for pos in 0..npos {
            for i in 0..hd / 2 {
                let a = pos as f32 * inv[i];
                rope[pos * hd + i] = a.cos();
                rope[pos * hd + hd / 2 + i] = a.sin();
            }
        }
        // KV cache: random entries before this forward; key mask random with some zeros.
        let mut kv = rng.vec(b * cap * 2 * c, 1.0);
        let mut kvmask = vec![0u32; b * cap];
        for r in 0..b {
            for j in 0..cap {
                kvmask[r * cap + j] = u32::from(rng.below(4) != 0 || j == 0);
            }
        }

        // CPU reference.
        let mut x = vec![0.0f32; b * nt * c];
        for r in 0..b {
            for i in 0..nt {
                let src = if i < lead {
                    &embed[toks[r * lead + i] * c..][..c]
                } else {
                    &vis[((r * vis_frames + vis_frame) * npatch + i - lead) * c..][..c]
                };
                x[(r * nt + i) * c..][..c].copy_from_slice(src);
            }
        }
        let qkv = matmul_cpu(&rmsnorm_cpu(&x, &g, c, 1e-5), &wq, b * nt, 3 * c, c);
        let rot = |v: &[f32], pos: usize| -> Vec<f32> {
            let mut o = vec![0.0f32; c];
            for h in 0..heads {
                for d in 0..hd {
                    let i = d % (hd / 2);
                    let (cs, sn) = (rope[pos * hd + i], rope[pos * hd + hd / 2 + i]);
                    let rh = if d < hd / 2 {
                        -v[h * hd + d + hd / 2]
                    } else {
                        v[h * hd + d - hd / 2]
                    };
                    o[h * hd + d] = v[h * hd + d] * cs + rh * sn;
                }
            }
            o
        };
        let mut q_ref = vec![0.0f32; b * nt * c];
        let mut kv_ref = kv.clone();
        for r in 0..b {
            for i in 0..nt {
                let row = &qkv[(r * nt + i) * 3 * c..][..3 * c];
                let pos = poss[r * nt + i];
                q_ref[(r * nt + i) * c..][..c].copy_from_slice(&rot(&row[..c], pos));
                if i >= first {
                    let ci = (base + i as i32) as usize;
                    kv_ref[((r * cap + ci) * 2) * c..][..c]
                        .copy_from_slice(&rot(&row[c..2 * c], pos));
                    kv_ref[((r * cap + ci) * 2 + 1) * c..][..c].copy_from_slice(&row[2 * c..]);
                }
            }
        }
        kv.copy_from_slice(&kv_ref); // positions of untouched entries stay the same
        let scale = 1.0 / (hd as f32).sqrt();
        let mut o_ref = vec![0.0f32; b * nt * c];
        for r in 0..b {
            for i in first..nt {
                let ci = (base + i as i32) as usize;
                for h in 0..heads {
                    let qv = &q_ref[(r * nt + i) * c + h * hd..][..hd];
                    let mut scores = Vec::new();
                    for j in 0..=ci {
                        if kvmask[r * cap + j] != 0 {
                            let kk = &kv_ref[((r * cap + j) * 2) * c + h * hd..][..hd];
                            let s: f64 =
                                qv.iter().zip(kk).map(|(a, b)| *a as f64 * *b as f64).sum();
                            scores.push((j, s * scale as f64));
                        }
                    }
                    let mx = scores.iter().map(|s| s.1).fold(f64::MIN, f64::max);
                    let den: f64 = scores.iter().map(|s| (s.1 - mx).exp()).sum();
                    for d in 0..hd {
                        let mut num = 0.0f64;
                        for (j, s) in &scores {
                            num += (s - mx).exp()
                                * kv_ref[((r * cap + j) * 2 + 1) * c + h * hd + d] as f64;
                        }
                        o_ref[(r * nt + i) * c + h * hd + d] = (num / den) as f32;
                    }
                }
            }
        }

        // GPU: embed+qkv, then attention + merge (for several query-tile shapes).
        let wb = ctx.storage_init("wts", &wts).unwrap();
        let visb = ctx.storage_init("vis", &vis).unwrap();
        let genb = ctx.storage_init("state", &state).unwrap();
        let ropeb = ctx.storage_init("rope", &rope).unwrap();
        // Fresh cache values for the active slots come from the kernel: start from garbage there.
        let kv_init: Vec<f32> = kv_ref
            .iter()
            .enumerate()
            .map(|(i, v)| {
                let ci = (i / (2 * c)) % cap;
                if ci as i32 >= base + first as i32 && ci < base as usize + nt {
                    99.0
                } else {
                    *v
                }
            })
            .collect();
        let p1 = MatmulParams {
            m: (b * nt) as u32,
            k: c as u32,
            nt: nt as u32,
            batch: b as u32,
            cap: cap as u32,
            lead: lead as u32,
            eps: 1e-5,
            heads: heads as u32,
            head_dim: hd as u32,
            pos_stride: nt as u32,
            n: (3 * c) as u32,
            ldc: c as u32,
            w_off: w_off as u32,
            g_off: g_off as u32,
            a_off: 0,
            vis_frames: vis_frames as u32,
            vis_frame: vis_frame as u32,
            ..Default::default()
        };
        // One embed + qkv launch on fresh x, q and cache buffers: [x, q, KV cache] after.
        let run_qkv = |op: Matmul| {
            let kvb = ctx.storage_init("kv", &kv_init).unwrap();
            let xb = ctx.storage("x", (b * nt * c * 4) as u64).unwrap();
            let qb = ctx.storage("q", (b * nt * c * 4) as u64).unwrap();
            let mut arena = ParamArena::new(ctx, 2).unwrap();
            let ex = Extra {
                state: Some(&genb),
                xw: Some(&xb),
                kv: Some(&kvb),
                rope: Some(&ropeb),
            };
            let bg = op.bind(ctx, &arena, &visb, &wb, &qb, ex).unwrap();
            let mut rec = Recorder::new(ctx, &mut arena);
            op.record(&mut rec, &bg, &p1).unwrap();
            rec.submit(ctx).unwrap();
            [
                ctx.read_f32(&xb, 0, b * nt * c).unwrap(),
                ctx.read_f32(&qb, 0, b * nt * c).unwrap(),
                ctx.read_f32(&kvb, 0, b * cap * 2 * c).unwrap(),
            ]
        };
        let qkv_spec = MatmulSpec::new(ALoad::Embed, Epi::Qkv, Tile::Gemv);
        // The device's own entry (gemv on GPUs, direct on CPU devices).
        let [xg, qg, kvg] = run_qkv(Matmul::new(ctx, qkv_spec).unwrap());
        assert_close("embedding gather (x)", &xg, &x, 0.0, 0.0);
        assert_close("q with rope", &qg, &q_ref, 2e-5, 1e-5);
        assert_close("kv cache write", &kvg, &kv_ref, 2e-5, 1e-5);
        // matmul's `direct` entry (CPU devices) gives `main`'s bits (GPUs, rows past gemv's).
        let entry = |direct: bool| {
            run_qkv(
                Matmul::new(ctx, qkv_spec)
                    .unwrap()
                    .with_gemv_max_rows(ctx, 0)
                    .with_direct(ctx, direct),
            )
        };
        assert!(entry(true) == entry(false), "embed + qkv: direct != main");

        let kvb = ctx.storage_init("kv", &kvg).unwrap();
        let maskb = ctx.storage_init("kvmask", &kvmask).unwrap();
        let qb = ctx.storage("q", (b * nt * c * 4) as u64).unwrap();
        let partb = ctx
            .storage("part", (b * heads * nt * nchunk * (hd + 2) * 4) as u64)
            .unwrap();
        let mut arena = ParamArena::new(ctx, 8).unwrap();
        let pa = AttnParams {
            batch: b as u32,
            nt: nt as u32,
            cap: cap as u32,
            nchunk: nchunk as u32,
            chunk: chunk as u32,
            heads: heads as u32,
            skip_if_done: 1,
            scale,
        };
        for (qt, lanes) in [(4u32, 1u32), (4, 4), (16, 1), (16, 4), (64, 1)] {
            let mut outs = Vec::new();
            for direct in [false, true] {
                ctx.write(&qb, 0, &qg);
                let attn = Attention::new(ctx, hd, qt, lanes)
                    .unwrap()
                    .with_direct(ctx, direct);
                let bg2 = attn
                    .bind(ctx, &arena, &genb, &qb, &kvb, &maskb, &partb)
                    .unwrap();
                let mut rec = Recorder::new(ctx, &mut arena);
                attn.record(&mut rec, &bg2, &pa, hd as u32).unwrap();
                rec.submit(ctx).unwrap();
                let og = ctx.read_f32(&qb, 0, b * nt * c).unwrap();
                // Idle slots (< first) merge to zeros.
                assert_close(
                    &format!("attention + merge (QT {qt}, {nchunk} chunks, direct {direct})"),
                    &og,
                    &o_ref,
                    2e-5,
                    1e-5,
                );
                let parts = b * heads * nt * nchunk * (hd + 2);
                outs.push((og, ctx.read_f32(&partb, 0, parts).unwrap()));
            }
            // The `direct` entry (CPU devices) gives `main`'s bits, partials included.
            assert!(
                outs[0] == outs[1],
                "attention QT {qt} x {lanes}: direct != main"
            );
        }
    }
}
