//! Teacher-forced scores from one forward's heads output (`shaders/score.wgsl`).

use std::sync::Arc;

use bytemuck::{Pod, Zeroable};

use crate::error::{Error, Result};
use crate::gpu::buffer::{BindGroupBuilder, ParamArena, Recorder};
use crate::gpu::context::GpuContext;
use crate::gpu::pipeline::{Kernel, PipelineKey};

/// Parameter block of `score.wgsl`.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable, Debug, Default, PartialEq)]
pub struct ScoreParams {
    pub batch: u32,
    pub vocab: u32,
    pub k: u32,
    pub nslots: u32,
    /// Heads rows per batch row in `logits`.
    pub rows: u32,
    pub _p0: u32,
    pub _p1: u32,
    pub _p2: u32,
}

/// Threads per workgroup in the WGSL (one per head).
const MAX_HEADS: u32 = 16;

pub struct Score {
    kernel: Arc<Kernel>,
}

impl Score {
    pub fn new(ctx: &GpuContext) -> Result<Self> {
        Ok(Self {
            kernel: ctx.kernel(&PipelineKey::new("score", "main"))?,
        })
    }

    /// `gen` state (reads `S_SC_*`), `logits` [B, rows, K*V + K], `tok` [B, nslots] u32,
    /// `out` [2, B, nslots] f32 (gaze_probs then task_loss_prediction).
    pub fn bind(
        &self,
        ctx: &GpuContext,
        arena: &ParamArena,
        state: &wgpu::Buffer,
        logits: &wgpu::Buffer,
        tok: &wgpu::Buffer,
        out: &wgpu::Buffer,
    ) -> Result<wgpu::BindGroup> {
        BindGroupBuilder::new(ctx, &self.kernel, arena)
            .bind(1, state)
            .bind(2, logits)
            .bind(3, tok)
            .bind(4, out)
            .build()
    }

    pub fn record(
        &self,
        rec: &mut Recorder<'_>,
        bg: &wgpu::BindGroup,
        p: &ScoreParams,
    ) -> Result<()> {
        if p.k == 0 || p.k > MAX_HEADS || p.vocab == 0 || p.rows == 0 {
            return Err(Error::Backend(format!(
                "score kernel launched with K = {} (1..={MAX_HEADS}) and V = {}",
                p.k, p.vocab
            )));
        }
        rec.dispatch(&self.kernel, bg, p, [p.batch, p.rows, 1])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::ops::select::layout::{S_SC_END, S_SC_SLOT, S_SC_START, words};
    use crate::gpu::ops::testutil::{Rng, assert_close, ctx};

    /// Random logits and ids; for several (s0, start, end) windows and 1-3 heads rows,
    /// including the first group of a frame (no head-0 task loss), a partial last group and
    /// a window at the end of the row, the outputs equal a CPU softmax and gather; other
    /// slots stay untouched.
    #[test]
    fn score_matches_cpu() {
        let ctx = ctx();
        let op = Score::new(ctx).unwrap();
        let (k, v) = (3usize, 7usize);
        for (seed, b, rows, nslots, s0, start, end) in [
            (1u64, 2usize, 1usize, 11usize, 0usize, 0usize, 5usize),
            (2, 3, 1, 11, 3, 0, 5),
            (3, 1, 2, 13, 6, 6, 13),
            (4, 5, 3, 13, 3, 3, 11),
        ] {
            let mut rng = Rng(seed);
            let rowlen = k * v + k;
            let logits = rng.vec(b * rows * rowlen, 4.0);
            let tok: Vec<u32> = (0..b * nslots)
                .map(|_| rng.below(v as u64) as u32)
                .collect();
            let mut state = vec![0u32; words(b, k, 4)];
            state[S_SC_SLOT] = s0 as u32;
            state[S_SC_START] = start as u32;
            state[S_SC_END] = end as u32;
            let sentinel = -7.0f32;
            let genb = ctx.storage_init("gen", &state).unwrap();
            let lb = ctx.storage_init("logits", &logits).unwrap();
            let tb = ctx.storage_init("tok", &tok).unwrap();
            let ob = ctx
                .storage_init("out", &vec![sentinel; 2 * b * nslots])
                .unwrap();
            let mut arena = ParamArena::new(ctx, 2).unwrap();
            let bg = op.bind(ctx, &arena, &genb, &lb, &tb, &ob).unwrap();
            let p = ScoreParams {
                batch: b as u32,
                vocab: v as u32,
                k: k as u32,
                nslots: nslots as u32,
                rows: rows as u32,
                ..Default::default()
            };
            let mut rec = Recorder::new(ctx, &mut arena);
            op.record(&mut rec, &bg, &p).unwrap();
            rec.submit(ctx).unwrap();
            let got = ctx.read_f32(&ob, 0, 2 * b * nslots).unwrap();

            let mut want = vec![sentinel; 2 * b * nslots];
            for r in 0..b {
                for j in 0..rows {
                    let row = &logits[(r * rows + j) * rowlen..(r * rows + j + 1) * rowlen];
                    let sj = s0 + j * k;
                    for h in 0..k {
                        let s = sj + h;
                        if s < end {
                            let head = &row[h * v..(h + 1) * v];
                            let m = head.iter().fold(f32::MIN, |a, &x| a.max(x));
                            let sum: f32 = head.iter().map(|&x| (x - m).exp()).sum();
                            let id = tok[r * nslots + s] as usize;
                            want[r * nslots + s] = (head[id] - m).exp() / sum;
                        }
                        if s > start && s - 1 < end {
                            want[(b + r) * nslots + s - 1] = row[k * v + h];
                        }
                    }
                }
            }
            assert_close(&format!("score seed {seed}"), &got, &want, 1e-6, 1e-5);
        }
    }
}
