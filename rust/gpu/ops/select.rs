//! The greedy selection step and next-forward planning (`shaders/select.wgsl`).

use std::sync::Arc;

use bytemuck::{Pod, Zeroable};

use crate::error::Result;
use crate::gpu::buffer::{BindGroupBuilder, ParamArena, Recorder};
use crate::gpu::context::GpuContext;
use crate::gpu::pipeline::{Kernel, PipelineKey};

/// Layout of the `gen` buffer (mirrors `shaders/common.wgsl`).
pub mod layout {
    pub const S_FRAME: usize = 0;
    pub const S_L: usize = 1;
    pub const S_BASE: usize = 2;
    pub const S_FIRST: usize = 3;
    pub const S_COUNT: usize = 4;
    pub const S_STEP: usize = 5;
    pub const S_DONE: usize = 6;
    pub const S_G: usize = 7;
    pub const S_GSTEP: usize = 8;
    pub const S_SC_SLOT: usize = 9;
    pub const S_SC_START: usize = 10;
    pub const S_SC_END: usize = 11;
    pub const S_HDR: usize = 16;
    pub const R_FIN: usize = 0;
    pub const R_P: usize = 1;
    pub const R_USED: usize = 2;
    pub const R_TOK: usize = 12;
    pub const MAX_FRAME: usize = 276;
    pub const ROW_WORDS: usize = 288;

    pub fn row_base(b: usize) -> usize {
        S_HDR + b * ROW_WORDS
    }
    pub fn plan_tok_base(batch: usize) -> usize {
        S_HDR + batch * ROW_WORDS
    }
    pub fn plan_pos_base(batch: usize, lead: usize) -> usize {
        plan_tok_base(batch) + batch * lead
    }
    /// Words of the whole buffer.
    pub fn words(batch: usize, lead: usize, pos_stride: usize) -> usize {
        plan_pos_base(batch, lead) + batch * pos_stride
    }

    /// Initial state of a session: the first forward is frame 0's prefill (no leftover
    /// tokens: the `lead` token slots are idle), vision positions 0..npatch.
    pub fn initial(batch: usize, lead: usize, npatch: usize, pad: u32) -> Vec<u32> {
        let pos_stride = lead + npatch;
        let mut g = vec![0u32; words(batch, lead, pos_stride)];
        g[S_BASE] = (-(lead as i32)) as u32;
        g[S_FIRST] = lead as u32;
        g[S_DONE] = 1;
        for b in 0..batch {
            g[row_base(b) + R_P] = npatch as u32 - 1;
            for i in 0..lead {
                g[plan_tok_base(batch) + b * lead + i] = pad;
            }
            for q in 0..npatch {
                g[plan_pos_base(batch, lead) + b * pos_stride + lead + q] = q as u32;
            }
        }
        g
    }
}

/// Parameter block of `select.wgsl`.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable, Debug, Default, PartialEq)]
pub struct SelectParams {
    pub batch: u32,
    pub budget: u32,
    pub has_req: u32,
    pub req: f32,
    pub phase: u32,
    pub nt: u32,
    pub out_frame: u32,
    pub debug: u32,
    pub cap: u32,
    pub lead: u32,
    pub npatch: u32,
    pub vocab: u32,
    pub pad: u32,
    pub out_stride: u32,
    pub out_frames: u32,
    pub debug_rows: u32,
    pub pos_stride: u32,
    pub _p0: u32,
    pub _p1: u32,
    pub _p2: u32,
}

pub struct Select {
    kernel: Arc<Kernel>,
}

impl Select {
    pub fn new(ctx: &GpuContext) -> Result<Self> {
        Ok(Self {
            kernel: ctx.kernel(&PipelineKey::new("select", "main"))?,
        })
    }

    /// `gen` state (rw), `logits` [B, K*V + K], `kvmask` [B, cap] (rw), `out` (rw),
    /// `debug` (rw; any small buffer when unused).
    #[allow(clippy::too_many_arguments)]
    pub fn bind(
        &self,
        ctx: &GpuContext,
        arena: &ParamArena,
        state: &wgpu::Buffer,
        logits: &wgpu::Buffer,
        kvmask: &wgpu::Buffer,
        out: &wgpu::Buffer,
        debug: &wgpu::Buffer,
    ) -> Result<wgpu::BindGroup> {
        BindGroupBuilder::new(ctx, &self.kernel, arena)
            .bind(1, state)
            .bind(2, logits)
            .bind(3, kvmask)
            .bind(4, out)
            .bind(5, debug)
            .build()
    }

    pub fn record(
        &self,
        rec: &mut Recorder<'_>,
        bg: &wgpu::BindGroup,
        p: &SelectParams,
    ) -> Result<()> {
        rec.dispatch(&self.kernel, bg, p, [1, 1, 1])
    }
}

#[cfg(test)]
mod tests {
    use super::layout::*;
    use super::*;
    use crate::gpu::ops::testutil::{Rng, ctx};

    /// CPU statement of one selection step (as python/autogaze_wgpu/reference/generation.py
    /// `select_step`) plus the planning the kernel does.
    struct CpuGen {
        b: usize,
        k: usize,
        v: usize,
        pad: usize,
        npatch: usize,
        cap: usize,
        budget: usize,
        req: Option<f32>,
        l: usize,
        base: i32,
        first: usize,
        count: usize,
        step: usize,
        g: usize,
        done: bool,
        fin: Vec<bool>,
        p: Vec<usize>,
        used: Vec<Vec<bool>>,
        toks: Vec<Vec<usize>>,
        plan_tok: Vec<usize>,
        plan_pos: Vec<usize>,
        kvmask: Vec<u32>,
    }

    impl CpuGen {
        fn step(&mut self, logits: &[f32], phase: u32, nt: usize) {
            if phase == 1 && self.done {
                return;
            }
            let (k, v, pad) = (self.k, self.v, self.pad);
            let rowlen = k * v + k;
            if phase == 0 {
                self.count = 0;
                self.step = 0;
                for r in 0..self.b {
                    self.fin[r] = false;
                    self.used[r] = vec![false; v];
                    self.used[r][pad] = true;
                    self.toks[r].clear();
                }
            }
            let l_new = (self.base + nt as i32) as usize;
            if phase == 0 {
                self.g = l_new;
            }
            let n = k.min(self.budget - self.count);
            for r in 0..self.b {
                let mut picks = Vec::new();
                for kk in 0..n {
                    let row = &logits[r * rowlen + kk * v..][..v];
                    let mut best: Option<(f32, usize)> = None;
                    for (id, &val) in row.iter().enumerate() {
                        if !self.used[r][id] && best.is_none_or(|(bv, _)| val > bv) {
                            best = Some((val, id));
                        }
                    }
                    let pick = best.map(|x| x.1).unwrap_or(pad);
                    self.used[r][pick] = true;
                    picks.push(pick);
                }
                let mut meet_any = false;
                for (kk, pick) in picks.into_iter().enumerate() {
                    let mut tok = pick;
                    if self.fin[r] {
                        tok = pad;
                    } else if let Some(req) = self.req
                        && !(self.step == 0 && kk == 0)
                        && logits[r * rowlen + k * v + kk] <= req
                    {
                        tok = pad;
                        meet_any = true;
                    }
                    self.toks[r].push(tok);
                }
                if meet_any {
                    self.fin[r] = true;
                }
            }
            let new_count = self.count + n;
            let frame_done = new_count >= self.budget || self.fin.iter().all(|f| *f);
            let ps = k + self.npatch;
            if !frame_done {
                for r in 0..self.b {
                    for kk in 0..k {
                        self.plan_tok[r * k + kk] = self.toks[r][self.count + kk];
                        self.plan_pos[r * ps + kk] = self.p[r] + 1 + kk - k;
                        self.kvmask[r * self.cap + l_new + kk] = 1;
                    }
                }
                self.base = l_new as i32;
                self.first = 0;
                self.done = false;
            } else {
                let u = n;
                let n_run = new_count - u;
                for r in 0..self.b {
                    let mut run = self.p[r] + 1;
                    for i in 0..new_count {
                        let tok = self.toks[r][i];
                        let mk = (tok != pad) as usize;
                        run += mk;
                        if i < n_run {
                            self.kvmask[r * self.cap + self.g + i] = mk as u32;
                        } else {
                            let j = i - n_run;
                            let slot = k - u + j;
                            self.plan_tok[r * k + slot] = tok;
                            self.plan_pos[r * ps + slot] = if mk == 1 { run - 1 } else { 1 };
                            self.kvmask[r * self.cap + l_new + j] = mk as u32;
                        }
                    }
                    for s in 0..k - u {
                        self.plan_tok[r * k + s] = pad;
                        self.plan_pos[r * ps + s] = 0;
                    }
                    for q in 0..self.npatch {
                        self.plan_pos[r * ps + k + q] = run + q;
                        self.kvmask[r * self.cap + l_new + u + q] = 1;
                    }
                    self.p[r] = run + self.npatch - 1;
                }
                self.base = l_new as i32 - (k - u) as i32;
                self.first = k - u;
                self.done = true;
            }
            self.l = l_new;
            self.count = new_count;
            self.step += 1;
        }
    }

    /// Several frames of selection steps on random logits with ties and task-loss stops,
    /// compared word for word with the CPU statement.
    #[test]
    fn select_steps_match_cpu() {
        let ctx = ctx();
        let (k, v, npatch) = (4usize, 12usize, 6usize);
        let pad = v - 1;
        let cap = 200usize;
        let rowlen = k * v + k;
        let ps = k + npatch;
        let out_frames = 4usize;
        let out_stride = 16usize;
        let op = Select::new(ctx).unwrap();
        for (seed, budget, req, b) in [
            (41u64, 10usize, Some(0.3f32), 3usize),
            (42, 7, None, 2),
            (43, 11, Some(0.6), 11), // two passes of 8 rows
        ] {
            let mut rng = Rng(seed);
            let init = initial(b, k, npatch, pad as u32);
            let genb = ctx.storage_init("state", &init).unwrap();
            let mut kvm = vec![0u32; b * cap];
            for r in 0..b {
                for q in 0..npatch {
                    kvm[r * cap + q] = 1;
                }
            }
            let maskb = ctx.storage_init("kvmask", &kvm).unwrap();
            let outb = ctx
                .storage(
                    "out",
                    ((out_frames + b * out_frames * out_stride) * 4) as u64,
                )
                .unwrap();
            let dbg = ctx.storage("debug", 16).unwrap();
            let logb = ctx.storage("logits", (b * rowlen * 4) as u64).unwrap();
            let mut arena = ParamArena::new(ctx, 4).unwrap();
            let bg = op
                .bind(ctx, &arena, &genb, &logb, &maskb, &outb, &dbg)
                .unwrap();
            let mut cpu = CpuGen {
                b,
                k,
                v,
                pad,
                npatch,
                cap,
                budget,
                req,
                l: 0,
                base: -(k as i32),
                first: k,
                count: 0,
                step: 0,
                g: 0,
                done: true,
                fin: vec![false; b],
                p: vec![npatch - 1; b],
                used: vec![vec![false; v]; b],
                toks: vec![Vec::new(); b],
                plan_tok: vec![pad; b * k],
                plan_pos: vec![0; b * ps],
                kvmask: kvm.clone(),
            };
            for r in 0..b {
                for q in 0..npatch {
                    cpu.plan_pos[r * ps + k + q] = q;
                }
            }
            for frame in 0..out_frames {
                let steps = budget.div_ceil(k);
                for s in 0..steps {
                    // Logits quantised to quarters (ties), task losses in [0, 1).
                    let mut logits = vec![0.0f32; b * rowlen];
                    for r in 0..b {
                        for i in 0..k * v {
                            logits[r * rowlen + i] = (rng.below(9) as f32) * 0.25;
                        }
                        for i in 0..k {
                            logits[r * rowlen + k * v + i] = (rng.below(1000) as f32) / 1000.0;
                        }
                    }
                    ctx.write(&logb, 0, &logits);
                    let phase = if s == 0 { 0 } else { 1 };
                    let nt = if s == 0 { k + npatch } else { k };
                    let p = SelectParams {
                        batch: b as u32,
                        budget: budget as u32,
                        has_req: req.is_some() as u32,
                        req: req.unwrap_or(0.0),
                        phase,
                        nt: nt as u32,
                        out_frame: frame as u32,
                        cap: cap as u32,
                        lead: k as u32,
                        npatch: npatch as u32,
                        vocab: v as u32,
                        pad: pad as u32,
                        out_stride: out_stride as u32,
                        out_frames: out_frames as u32,
                        debug_rows: 1,
                        pos_stride: ps as u32,
                        ..Default::default()
                    };
                    let mut rec = Recorder::new(ctx, &mut arena);
                    op.record(&mut rec, &bg, &p).unwrap();
                    rec.submit(ctx).unwrap();
                    cpu.step(&logits, phase, nt);

                    let g = ctx.read_u32(&genb, 0, init.len()).unwrap();
                    let ctxs = format!("seed {seed} frame {frame} step {s}");
                    assert_eq!(g[S_DONE] != 0, cpu.done, "{ctxs}: done");
                    assert_eq!(g[S_L] as usize, cpu.l, "{ctxs}: L");
                    assert_eq!(g[S_BASE] as i32, cpu.base, "{ctxs}: base");
                    assert_eq!(g[S_FIRST] as usize, cpu.first, "{ctxs}: first");
                    assert_eq!(g[S_COUNT] as usize, cpu.count, "{ctxs}: count");
                    assert_eq!(g[S_G] as usize, cpu.g, "{ctxs}: G");
                    for r in 0..b {
                        let rb = row_base(r);
                        assert_eq!(g[rb + R_FIN] != 0, cpu.fin[r], "{ctxs}: row {r} finished");
                        assert_eq!(g[rb + R_P] as usize, cpu.p[r], "{ctxs}: row {r} P");
                        for (i, t) in cpu.toks[r].iter().enumerate() {
                            assert_eq!(g[rb + R_TOK + i] as usize, *t, "{ctxs}: row {r} token {i}");
                        }
                    }
                    let pt = plan_tok_base(b);
                    let pp = plan_pos_base(b, k);
                    for i in 0..b * k {
                        assert_eq!(
                            g[pt + i] as usize,
                            cpu.plan_tok[i],
                            "{ctxs}: plan token {i}"
                        );
                    }
                    for i in 0..b * ps {
                        assert_eq!(
                            g[pp + i] as usize,
                            cpu.plan_pos[i],
                            "{ctxs}: plan position {i}"
                        );
                    }
                    let m = ctx.read_u32(&maskb, 0, b * cap).unwrap();
                    for (i, (g, w)) in m.iter().zip(&cpu.kvmask).enumerate() {
                        assert_eq!(g, w, "{ctxs}: key mask {i}");
                    }
                    if cpu.done {
                        break;
                    }
                }
                let out = ctx
                    .read_u32(&outb, 0, out_frames + b * out_frames * out_stride)
                    .unwrap();
                assert_eq!(
                    out[frame] as usize, cpu.count,
                    "seed {seed} frame {frame}: n_t"
                );
                for r in 0..b {
                    for i in 0..cpu.count {
                        let got =
                            out[out_frames + (r * out_frames + frame) * out_stride + i] as usize;
                        assert_eq!(
                            got, cpu.toks[r][i],
                            "seed {seed} frame {frame}: out row {r} slot {i}"
                        );
                    }
                }
            }
        }
    }
}
