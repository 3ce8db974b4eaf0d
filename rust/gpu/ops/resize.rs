//! Bicubic resize (`shaders/resize.wgsl`): torch `F.interpolate(mode="bicubic",
//! align_corners=False)` without antialias, on float planes.

use std::sync::Arc;

use bytemuck::{Pod, Zeroable};

use crate::error::Result;
use crate::gpu::buffer::{BindGroupBuilder, ParamArena, Recorder};
use crate::gpu::context::GpuContext;
use crate::gpu::pipeline::{Kernel, PipelineKey};

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable, Debug, Default)]
struct Params {
    h_in: u32,
    w_in: u32,
    h_out: u32,
    w_out: u32,
    planes: u32,
    scale_h: f32,
    scale_w: f32,
    _pad: u32,
}

pub struct Bicubic {
    kernel: Arc<Kernel>,
}

impl Bicubic {
    pub fn new(ctx: &GpuContext) -> Result<Self> {
        Ok(Self {
            kernel: ctx.kernel(&PipelineKey::new("resize", "bicubic"))?,
        })
    }

    /// `src` [planes, h_in, w_in] -> `dst` [planes, h_out, w_out].
    pub fn bind(
        &self,
        ctx: &GpuContext,
        arena: &ParamArena,
        src: &wgpu::Buffer,
        dst: &wgpu::Buffer,
    ) -> Result<wgpu::BindGroup> {
        BindGroupBuilder::new(ctx, &self.kernel, arena)
            .bind(1, src)
            .bind(2, dst)
            .build()
    }

    pub fn record(
        &self,
        rec: &mut Recorder<'_>,
        bg: &wgpu::BindGroup,
        planes: usize,
        (h_in, w_in): (usize, usize),
        (h_out, w_out): (usize, usize),
    ) -> Result<()> {
        let p = Params {
            h_in: h_in as u32,
            w_in: w_in as u32,
            h_out: h_out as u32,
            w_out: w_out as u32,
            planes: planes as u32,
            // torch: area_pixel_compute_scale = in / out in the tensor's float type.
            scale_h: h_in as f32 / h_out as f32,
            scale_w: w_in as f32 / w_out as f32,
            _pad: 0,
        };
        let groups = [
            (w_out as u32).div_ceil(16),
            (h_out as u32).div_ceil(16),
            planes as u32,
        ];
        rec.dispatch(&self.kernel, bg, &p, groups)
    }
}

/// CPU reference of the same interpolation (for tests).
pub fn bicubic_cpu(
    src: &[f32],
    planes: usize,
    hin: usize,
    win: usize,
    hout: usize,
    wout: usize,
) -> Vec<f32> {
    fn coeffs(t: f32) -> [f32; 4] {
        let a = -0.75f32;
        let c1 = |x: f32| ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0;
        let c2 = |x: f32| ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a;
        [c2(t + 1.0), c1(t), c1(1.0 - t), c2(2.0 - t)]
    }
    fn index(scale: f32, i: usize, size: usize) -> (i64, f32) {
        let real = scale * (i as f32 + 0.5) - 0.5;
        let idx = real.floor().min(size as f32 - 1.0);
        ((idx as i64), (real - idx).clamp(0.0, 1.0))
    }
    let sh = hin as f32 / hout as f32;
    let sw = win as f32 / wout as f32;
    let mut out = vec![0.0f32; planes * hout * wout];
    for pl in 0..planes {
        for y in 0..hout {
            let (iy, ty) = index(sh, y, hin);
            let wy = coeffs(ty);
            for x in 0..wout {
                let (ix, tx) = index(sw, x, win);
                let wx = coeffs(tx);
                let mut o = 0.0f32;
                for (j, wyj) in wy.iter().enumerate() {
                    let yy = (iy - 1 + j as i64).clamp(0, hin as i64 - 1) as usize;
                    let mut t = 0.0f32;
                    for (i, wxi) in wx.iter().enumerate() {
                        let xx = (ix - 1 + i as i64).clamp(0, win as i64 - 1) as usize;
                        t += src[(pl * hin + yy) * win + xx] * wxi;
                    }
                    o += t * wyj;
                }
                out[(pl * hout + y) * wout + x] = o;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::ops::testutil::{Rng, assert_close, ctx};

    fn run(planes: usize, hin: usize, win: usize, hout: usize, wout: usize, seed: u64) {
        let ctx = ctx();
        let mut rng = Rng(seed);
        let src = rng.vec(planes * hin * win, 2.0);
        let sb = ctx.storage_init("src", &src).unwrap();
        let db = ctx
            .storage("dst", (planes * hout * wout * 4) as u64)
            .unwrap();
        let op = Bicubic::new(ctx).unwrap();
        let mut arena = ParamArena::new(ctx, 4).unwrap();
        let bg = op.bind(ctx, &arena, &sb, &db).unwrap();
        let mut rec = Recorder::new(ctx, &mut arena);
        op.record(&mut rec, &bg, planes, (hin, win), (hout, wout))
            .unwrap();
        rec.submit(ctx).unwrap();
        let got = ctx.read_f32(&db, 0, planes * hout * wout).unwrap();
        let want = bicubic_cpu(&src, planes, hin, win, hout, wout);
        assert_close(
            &format!("bicubic {planes}x{hin}x{win}->{hout}x{wout}"),
            &got,
            &want,
            1e-5,
            1e-5,
        );
    }

    #[test]
    fn bicubic_matches_cpu_reference() {
        run(3, 37, 53, 21, 29, 1); // downscale, odd sizes
        run(2, 13, 7, 31, 17, 2); // upscale (negative source coordinates at the border)
        run(3, 23, 41, 23, 23, 3); // one axis unchanged (the 224x398 case in small)
    }

    #[test]
    fn bicubic_same_size_is_identity() {
        let ctx = ctx();
        let mut rng = Rng(9);
        let (pl, h, w) = (2, 19, 19);
        let src = rng.vec(pl * h * w, 3.0);
        let sb = ctx.storage_init("src", &src).unwrap();
        let db = ctx.storage("dst", (src.len() * 4) as u64).unwrap();
        let op = Bicubic::new(ctx).unwrap();
        let mut arena = ParamArena::new(ctx, 4).unwrap();
        let bg = op.bind(ctx, &arena, &sb, &db).unwrap();
        let mut rec = Recorder::new(ctx, &mut arena);
        op.record(&mut rec, &bg, pl, (h, w), (h, w)).unwrap();
        rec.submit(ctx).unwrap();
        let got = ctx.read_f32(&db, 0, src.len()).unwrap();
        assert_close("bicubic identity", &got, &src, 0.0, 0.0);
    }
}
