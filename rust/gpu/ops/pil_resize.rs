//! The processor's uint8 resize on the GPU (`shaders/pil_resize.wgsl`): PIL's 8-bit
//! separable BILINEAR resampling, bit for bit, plus the rescale/normalisation table.

use std::sync::Arc;

use bytemuck::{Pod, Zeroable};

use crate::error::{Error, Result};
use crate::gpu::buffer::{BindGroupBuilder, ParamArena, Recorder};
use crate::gpu::context::GpuContext;
use crate::gpu::pipeline::{Kernel, PipelineKey};

/// Fractional bits of PIL's fixed-point 8-bit coefficients (`PRECISION_BITS`, 32 - 8 - 2).
const PRECISION_BITS: u32 = 22;

/// PIL's `precompute_coeffs` for the BILINEAR filter (support 1) over the whole input
/// (box 0..in_size), then `normalize_coeffs_8bpc`. Returns the taps per output and one row
/// `[xmin, count, k_0 .. k_{taps-1}]` per output index.
pub fn pil_coeffs(in_size: usize, out_size: usize) -> (usize, Vec<i32>) {
    let (scale, filterscale, support, taps) = coeff_shape(in_size, out_size);
    let triangle = |x: f64| {
        let x = x.abs();
        if x < 1.0 { 1.0 - x } else { 0.0 }
    };
    let mut out = vec![0i32; coeff_words(in_size, out_size)];
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        let ss = 1.0 / filterscale;
        // C casts truncate toward zero.
        let xmin = ((center - support + 0.5) as i64).max(0);
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) - xmin;
        let count = xmax.max(0) as usize;
        let mut k = vec![0f64; count];
        let mut ww = 0.0;
        for (x, kx) in k.iter_mut().enumerate() {
            let w = triangle((x as f64 + xmin as f64 - center + 0.5) * ss);
            *kx = w;
            ww += w;
        }
        let row = &mut out[xx * (2 + taps)..(xx + 1) * (2 + taps)];
        row[0] = xmin as i32;
        row[1] = count as i32;
        for (x, kx) in k.iter().enumerate() {
            let v = if ww != 0.0 { kx / ww } else { *kx };
            let f = v * (1u64 << PRECISION_BITS) as f64;
            row[2 + x] = if v < 0.0 {
                (f - 0.5) as i32
            } else {
                (f + 0.5) as i32
            };
        }
    }
    (taps, out)
}

/// (scale, filterscale, support, taps) of a resample from `in_size` to `out_size`.
fn coeff_shape(in_size: usize, out_size: usize) -> (f64, f64, f64, usize) {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = filterscale; // bilinear support 1.0, scaled when shrinking (antialias)
    let taps = support.ceil() as usize * 2 + 1;
    (scale, filterscale, support, taps)
}

/// Length of [`pil_coeffs`]'s rows (one per output index), without computing them.
pub fn coeff_words(in_size: usize, out_size: usize) -> usize {
    out_size.saturating_mul(2 + coeff_shape(in_size, out_size).3)
}

/// Which axis one pass resamples.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Axis {
    X,
    Y,
}

/// Source of a pass: the uploaded packed RGB bytes, or the other pass's one-value-per-word
/// output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Src {
    U8,
    U32,
}

/// Destination of a pass: uint8 values for the other pass, or the model's pixel values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dst {
    U32,
    F32,
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable, Debug, Default)]
struct Params {
    in_h: u32,
    in_w: u32,
    out_h: u32,
    out_w: u32,
    frames: u32,
    taps: u32,
    frame_words: u32,
    _pad: u32,
}

/// One pass of a planned resize: its kind and the (h, w) it reads and writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PassPlan {
    pub axis: Axis,
    pub src: Src,
    pub dst: Dst,
    pub inp: (usize, usize),
    pub out: (usize, usize),
}

impl PassPlan {
    /// The pass's taps and coefficient rows ([`pil_coeffs`] along its axis).
    pub fn coeffs(&self) -> (usize, Vec<i32>) {
        match self.axis {
            Axis::X => pil_coeffs(self.inp.1, self.out.1),
            Axis::Y => pil_coeffs(self.inp.0, self.out.0),
        }
    }

    /// Length of [`PassPlan::coeffs`]'s rows.
    pub fn coeff_words(&self) -> usize {
        match self.axis {
            Axis::X => coeff_words(self.inp.1, self.out.1),
            Axis::Y => coeff_words(self.inp.0, self.out.0),
        }
    }
}

/// The passes that turn packed uint8 frames of `src` (h, w) into pixel values of `out`, in
/// PIL's order: x then y, an axis whose size does not change skipped; when neither changes,
/// the x pass alone (an identity resample) still runs, for the normalisation. The first of
/// two passes writes one-word uint8 values for the second.
pub fn plan(src: (usize, usize), out: (usize, usize)) -> Vec<PassPlan> {
    let (resize_x, resize_y) = (src.1 != out.1, src.0 != out.0);
    let mid = (src.0, out.1);
    let mut passes = Vec::new();
    if resize_x || !resize_y {
        let dst = if resize_y { Dst::U32 } else { Dst::F32 };
        passes.push(PassPlan {
            axis: Axis::X,
            src: Src::U8,
            dst,
            inp: src,
            out: mid,
        });
    }
    if resize_y {
        let (from, inp) = if resize_x {
            (Src::U32, mid)
        } else {
            (Src::U8, src)
        };
        passes.push(PassPlan {
            axis: Axis::Y,
            src: from,
            dst: Dst::F32,
            inp,
            out,
        });
    }
    passes
}

/// Words a packed source frame of `h` x `w` RGB bytes takes (each frame starts on a word).
pub fn frame_words(h: usize, w: usize) -> usize {
    h.saturating_mul(w).saturating_mul(3).div_ceil(4)
}

/// One resampling pass of one (axis, source, destination) kind.
pub struct PilResize {
    kernel: Arc<Kernel>,
    axis: Axis,
    dst: Dst,
}

impl PilResize {
    /// The launcher of a planned pass.
    pub fn for_pass(ctx: &GpuContext, pass: &PassPlan) -> Result<Self> {
        Self::new(ctx, pass.axis, pass.src, pass.dst)
    }

    pub fn new(ctx: &GpuContext, axis: Axis, src: Src, dst: Dst) -> Result<Self> {
        let key = PipelineKey::new("pil_resize", "resample")
            .define("AXIS", if axis == Axis::X { "x" } else { "y" })
            .define("SRC", if src == Src::U8 { "u8" } else { "u32" })
            .define("DST", if dst == Dst::F32 { "f32" } else { "u32" });
        Ok(Self {
            kernel: ctx.kernel(&key)?,
            axis,
            dst,
        })
    }

    /// `src`, the pass's coefficient rows `coef`, `lut` [3, 256] f32 (F32 destinations only;
    /// ignored otherwise) and `dst`.
    pub fn bind(
        &self,
        ctx: &GpuContext,
        arena: &ParamArena,
        src: &wgpu::Buffer,
        coef: &wgpu::Buffer,
        lut: &wgpu::Buffer,
        dst: &wgpu::Buffer,
    ) -> Result<wgpu::BindGroup> {
        let b = BindGroupBuilder::new(ctx, &self.kernel, arena)
            .bind(1, src)
            .bind(2, coef)
            .bind(4, dst);
        if self.dst == Dst::F32 {
            b.bind(3, lut).build()
        } else {
            b.build()
        }
    }

    /// Resamples `frames` frames of `inp` (h, w) to `out` along this pass's axis (the other
    /// side must be equal); `taps` as returned by [`pil_coeffs`].
    pub fn record(
        &self,
        rec: &mut Recorder<'_>,
        bg: &wgpu::BindGroup,
        frames: usize,
        inp: (usize, usize),
        out: (usize, usize),
        taps: usize,
    ) -> Result<()> {
        let same = if self.axis == Axis::X {
            inp.0 == out.0
        } else {
            inp.1 == out.1
        };
        if !same {
            return Err(Error::Backend(format!(
                "PIL resize pass along {:?} from {inp:?} to {out:?} changes the other axis",
                self.axis
            )));
        }
        let p = Params {
            in_h: inp.0 as u32,
            in_w: inp.1 as u32,
            out_h: out.0 as u32,
            out_w: out.1 as u32,
            frames: frames as u32,
            taps: taps as u32,
            frame_words: frame_words(inp.0, inp.1) as u32,
            _pad: 0,
        };
        let groups = [
            (out.1 as u32).div_ceil(16),
            (out.0 as u32).div_ceil(16),
            frames as u32,
        ];
        rec.dispatch(&self.kernel, bg, &p, groups)
    }
}

/// CPU statement of PIL's 8-bit resize of RGB frames [F, h, w, 3] (horizontal pass, then
/// vertical, skipping an axis whose size does not change), for tests.
pub fn pil_resize_cpu(
    src: &[u8],
    frames: usize,
    inp: (usize, usize),
    out: (usize, usize),
) -> Vec<u8> {
    fn pass(
        src: &[u8],
        frames: usize,
        inp: (usize, usize),
        out: (usize, usize),
        axis: Axis,
    ) -> Vec<u8> {
        let (n_in, n_out) = if axis == Axis::X {
            (inp.1, out.1)
        } else {
            (inp.0, out.0)
        };
        let (taps, k) = pil_coeffs(n_in, n_out);
        let mut dst = vec![0u8; frames * out.0 * out.1 * 3];
        for f in 0..frames {
            for y in 0..out.0 {
                for x in 0..out.1 {
                    let o = if axis == Axis::X { x } else { y };
                    let row = &k[o * (2 + taps)..(o + 1) * (2 + taps)];
                    for c in 0..3 {
                        let mut ss: i32 = 1 << (PRECISION_BITS - 1);
                        for j in 0..row[1] as usize {
                            let (yy, xx) = if axis == Axis::X {
                                (y, row[0] as usize + j)
                            } else {
                                (row[0] as usize + j, x)
                            };
                            ss += src[((f * inp.0 + yy) * inp.1 + xx) * 3 + c] as i32 * row[2 + j];
                        }
                        dst[((f * out.0 + y) * out.1 + x) * 3 + c] =
                            (ss >> PRECISION_BITS).clamp(0, 255) as u8;
                    }
                }
            }
        }
        dst
    }
    let mut cur = src.to_vec();
    let mut hw = inp;
    if out.1 != inp.1 {
        cur = pass(&cur, frames, hw, (hw.0, out.1), Axis::X);
        hw = (hw.0, out.1);
    }
    if out.0 != inp.0 {
        cur = pass(&cur, frames, hw, out, Axis::Y);
    }
    cur
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::ops::testutil::{Rng, ctx};

    /// PIL's coefficients for a 2x shrink: 4 taps of weight 1/8, 3/8, 3/8, 1/8 (support 2)
    /// except at the clamped borders; for the identity, weight 1 on the pixel itself.
    #[test]
    fn coefficients_follow_pil() {
        let (taps, k) = pil_coeffs(8, 4);
        assert_eq!(taps, 5);
        let one = 1i32 << PRECISION_BITS;
        assert_eq!(
            &k[7..14],
            &[1, 4, one / 8, 3 * one / 8, 3 * one / 8, one / 8, 0]
        );
        assert_eq!(&k[0..2], &[0, 3]); // the first window is cut at 0
        let (taps, k) = pil_coeffs(5, 5);
        assert_eq!(taps, 3);
        for o in 0..5 {
            let row = &k[o * 5..(o + 1) * 5];
            assert_eq!(row[0] as usize, o);
            assert_eq!(row[2], one, "identity weight at {o}");
            assert!(row[3..].iter().all(|&v| v == 0));
        }
    }

    /// Both passes (u8 -> u32 -> f32 through an identity table), one pass straight to f32
    /// along each axis, and the same-size normalisation pass, against the CPU statement,
    /// exactly; sizes whose frames do not fill whole words included.
    #[test]
    fn pil_resize_matches_cpu_exactly() {
        let ctx = ctx();
        let lut: Vec<f32> = (0..768)
            .map(|i| (i % 256) as f32 + 1000.0 * (i / 256) as f32)
            .collect();
        let lut_b = ctx.storage_init("lut", &lut).unwrap();
        for (seed, frames, inp, out) in [
            (1u64, 2usize, (37usize, 53usize), (21usize, 29usize)), // shrink both axes
            (2, 1, (13, 7), (31, 17)),                              // enlarge both
            (3, 3, (23, 41), (23, 19)),                             // x only
            (4, 2, (41, 23), (19, 23)),                             // y only
            (5, 1, (5, 7), (5, 7)),                                 // no resize, odd bytes
            (6, 2, (135, 240), (224, 398)),                         // the 224-edge case
        ] {
            let mut rng = Rng(seed);
            let bytes = inp.0 * inp.1 * 3;
            let fw = frame_words(inp.0, inp.1);
            let src: Vec<u8> = (0..frames * bytes).map(|_| rng.below(256) as u8).collect();
            let mut packed = vec![0u8; frames * fw * 4];
            for f in 0..frames {
                packed[f * fw * 4..f * fw * 4 + bytes]
                    .copy_from_slice(&src[f * bytes..(f + 1) * bytes]);
            }
            let src_b = ctx.storage_init("src", &packed).unwrap();
            let dst_b = ctx
                .storage("dst", (frames * 3 * out.0 * out.1 * 4) as u64)
                .unwrap();
            let mut arena = ParamArena::new(ctx, 4).unwrap();
            let tmp = ctx
                .storage("tmp", (frames * inp.0 * out.1 * 3 * 4) as u64)
                .unwrap();
            let mut rec_ops = Vec::new();
            for pass in plan(inp, out) {
                let (taps, k) = pass.coeffs();
                let coef = ctx.storage_init("coefficients", &k).unwrap();
                let from = if pass.src == Src::U8 { &src_b } else { &tmp };
                let to = if pass.dst == Dst::F32 { &dst_b } else { &tmp };
                let op = PilResize::for_pass(ctx, &pass).unwrap();
                let bg = op.bind(ctx, &arena, from, &coef, &lut_b, to).unwrap();
                rec_ops.push((op, bg, pass.inp, pass.out, taps));
            }
            let mut rec = Recorder::new(ctx, &mut arena);
            for (op, bg, i, o, taps) in &rec_ops {
                op.record(&mut rec, bg, frames, *i, *o, *taps).unwrap();
            }
            rec.submit(ctx).unwrap();
            let got = ctx.read_f32(&dst_b, 0, frames * 3 * out.0 * out.1).unwrap();
            let want_u8 = pil_resize_cpu(&src, frames, inp, out);
            let mut bad = 0;
            for f in 0..frames {
                for y in 0..out.0 {
                    for x in 0..out.1 {
                        for c in 0..3 {
                            let w = want_u8[((f * out.0 + y) * out.1 + x) * 3 + c] as usize;
                            let g = got[((f * 3 + c) * out.0 + y) * out.1 + x];
                            if g != lut[c * 256 + w] {
                                bad += 1;
                            }
                        }
                    }
                }
            }
            assert_eq!(
                bad, 0,
                "seed {seed} {inp:?} -> {out:?}: {bad} values differ"
            );
        }
    }
}
