//! LayerNorm over channels (`shaders/layernorm.wgsl`), writing into the conv window ring.

use std::sync::Arc;

use bytemuck::{Pod, Zeroable};

use crate::error::Result;
use crate::gpu::buffer::{BindGroupBuilder, ParamArena, Recorder};
use crate::gpu::context::GpuContext;
use crate::gpu::pipeline::{Kernel, PipelineKey};

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable, Debug, Default)]
struct Params {
    rows: u32,
    c: u32,
    hw: u32,
    in_frames: u32,
    out_frames: u32,
    t0: u32,
    g_off: u32,
    b_off: u32,
    eps: f32,
    row_groups_x: u32,
    _p0: u32,
    _p1: u32,
}

/// Geometry of one LayerNorm launch.
#[derive(Clone, Copy, Debug)]
pub struct LnShape {
    pub batch: usize,
    /// Frames per batch row in the source.
    pub frames: usize,
    /// Tokens per frame.
    pub hw: usize,
    pub channels: usize,
    /// Frames in the destination ring.
    pub ring: usize,
    /// Session index of source frame 0 (it lands in ring slot (t0 + 2) % ring).
    pub t0: usize,
    pub g_off: usize,
    pub b_off: usize,
    pub eps: f32,
}

pub struct LayerNorm {
    kernel: Arc<Kernel>,
}

impl LayerNorm {
    pub fn new(ctx: &GpuContext) -> Result<Self> {
        Ok(Self {
            kernel: ctx.kernel(&PipelineKey::new("layernorm", "main"))?,
        })
    }

    pub fn bind(
        &self,
        ctx: &GpuContext,
        arena: &ParamArena,
        src: &wgpu::Buffer,
        wts: &wgpu::Buffer,
        dst: &wgpu::Buffer,
    ) -> Result<wgpu::BindGroup> {
        BindGroupBuilder::new(ctx, &self.kernel, arena)
            .bind(1, src)
            .bind(2, wts)
            .bind(3, dst)
            .build()
    }

    pub fn record(&self, rec: &mut Recorder<'_>, bg: &wgpu::BindGroup, s: &LnShape) -> Result<()> {
        let rows = (s.batch * s.frames * s.hw) as u32;
        let gx = rows.min(32768);
        let p = Params {
            rows,
            c: s.channels as u32,
            hw: s.hw as u32,
            in_frames: s.frames as u32,
            out_frames: s.ring as u32,
            t0: s.t0 as u32,
            g_off: s.g_off as u32,
            b_off: s.b_off as u32,
            eps: s.eps,
            row_groups_x: gx,
            _p0: 0,
            _p1: 0,
        };
        rec.dispatch(&self.kernel, bg, &p, [gx, rows.div_ceil(gx), 1])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::ops::testutil::{Rng, assert_close, ctx};

    #[test]
    fn layernorm_into_ring() {
        let ctx = ctx();
        let s = LnShape {
            batch: 2,
            frames: 3,
            hw: 5,
            channels: 45,
            ring: 4,
            t0: 3,
            g_off: 0,
            b_off: 45,
            eps: 1e-5,
        };
        let mut rng = Rng(21);
        let n_rows = s.batch * s.frames * s.hw;
        let x = rng.vec(n_rows * s.channels, 3.0);
        let wts = rng.vec(2 * s.channels, 1.0);
        let xb = ctx.storage_init("x", &x).unwrap();
        let wb = ctx.storage_init("w", &wts).unwrap();
        let n_out = s.batch * s.ring * s.hw * s.channels;
        let ob = ctx.storage("ring", (n_out * 4) as u64).unwrap();
        let op = LayerNorm::new(ctx).unwrap();
        let mut arena = ParamArena::new(ctx, 4).unwrap();
        let bg = op.bind(ctx, &arena, &xb, &wb, &ob).unwrap();
        let mut rec = Recorder::new(ctx, &mut arena);
        op.record(&mut rec, &bg, &s).unwrap();
        rec.submit(ctx).unwrap();
        let got = ctx.read_f32(&ob, 0, n_out).unwrap();
        let mut want = vec![0.0f32; n_out];
        let c = s.channels;
        for b in 0..s.batch {
            for t in 0..s.frames {
                let slot = (s.t0 + t + 2) % s.ring;
                for tok in 0..s.hw {
                    let row = &x[((b * s.frames + t) * s.hw + tok) * c..][..c];
                    let mean = row.iter().map(|v| *v as f64).sum::<f64>() / c as f64;
                    let var =
                        row.iter().map(|v| (*v as f64 - mean).powi(2)).sum::<f64>() / c as f64;
                    let r = 1.0 / (var + 1e-5).sqrt();
                    for k in 0..c {
                        want[((b * s.ring + slot) * s.hw + tok) * c + k] =
                            ((row[k] as f64 - mean) * r) as f32 * wts[k] + wts[c + k];
                    }
                }
            }
        }
        assert_close("layernorm", &got, &want, 1e-5, 1e-5);
    }
}
