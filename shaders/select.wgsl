// select.wgsl: one greedy selection step of SPEC §5 step 2 for the whole batch, plus the
// bookkeeping that plans the next forward. One workgroup; GS threads per batch row, NG rows
// at a time.
//
// Per row: mask ids already chosen in this frame and eos, then for slot k < n (n = min(K,
// budget - count), decided for the whole batch) take the argmax of head k (lowest id on
// ties) and mask it for the later slots. Task-loss rule: slot k meets when
// task_loss[k] <= requirement, except slot 0 of the frame's first step; meeting slots become
// pad and finish the row; rows finished earlier get pads. The frame ends when the budget is
// reached or every row is finished.
//
// Then it writes the plan of the next forward into `gen`:
//  * frame goes on: the step's K tokens, at cache index L.., positions P-K+1..P (the quirk),
//    key mask 1;
//  * frame done: the final mask of the frame's run tokens (pads -> 0), and the next frame's
//    prefill: the un-run last step's u tokens right-aligned in the K token slots (earlier
//    slots idle) then the vision tokens, positions cumsum(mask) - 1.

struct Params {
    batch: u32,
    budget: u32,      // M of this frame (<= vocab - 1)
    has_req: u32,
    req: f32,
    phase: u32,       // 0: after the prefill (first step of a frame), 1: after a decode step
    nt: u32,          // slots of the forward that produced these logits
    out_frame: u32,   // frame index in `out`
    debug: u32,       // 1: copy the logits rows into `debug`
    cap: u32,
    lead: u32,        // K
    npatch: u32,      // vision tokens per frame
    vocab: u32,       // V = 266
    pad: u32,         // eos/pad id 265
    out_stride: u32,  // token slots per (row, frame) in `out`
    out_frames: u32,
    debug_rows: u32,  // steps the debug buffer holds
    pos_stride: u32,  // plan_pos row stride
    _p0: u32,
    _p1: u32,
    _p2: u32,
}

const WG: u32 = 256u;
const GS: u32 = 32u;
const NG: u32 = WG / GS;
const UW: u32 = 10u;
const NONE: u32 = 0xffffffffu;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> gen: array<u32>;     // generation state + plan
@group(0) @binding(2) var<storage, read> logits: array<f32>;        // [B, K*V + K]
@group(0) @binding(3) var<storage, read_write> kvmask: array<u32>;  // [B, cap]
@group(0) @binding(4) var<storage, read_write> out: array<u32>;     // [frames] counts, then [B, frames, out_stride]
@group(0) @binding(5) var<storage, read_write> debug: array<f32>;   // [debug_rows, B, K*V + K]

var<workgroup> u_done: u32;
var<workgroup> u_count: u32;
var<workgroup> u_step: u32;
var<workgroup> u_base: u32;
var<workgroup> u_g: u32;
var<workgroup> u_gstep: u32;
var<workgroup> u_fd: u32;
var<workgroup> used_wg: array<u32, NG * UW>;
var<workgroup> picks: array<u32, NG * 16u>;
var<workgroup> sv: array<f32, WG>;
var<workgroup> si: array<u32, WG>;

@compute @workgroup_size(256)
fn main(@builtin(local_invocation_index) li: u32) {
    if (li == 0u) {
        u_done = gen[S_DONE];
        u_count = gen[S_COUNT];
        u_step = gen[S_STEP];
        u_base = gen[S_BASE];
        u_g = gen[S_G];
        u_gstep = gen[S_GSTEP];
    }
    let done = workgroupUniformLoad(&u_done);
    if (p.phase == 1u && done != 0u) {
        return;
    }
    let prefill = p.phase == 0u;
    let count = select(workgroupUniformLoad(&u_count), 0u, prefill);
    let step = select(workgroupUniformLoad(&u_step), 0u, prefill);
    let base = bitcast<i32>(workgroupUniformLoad(&u_base));
    let l_new = u32(base + i32(p.nt));
    let g = select(workgroupUniformLoad(&u_g), l_new, prefill);
    let gstep = workgroupUniformLoad(&u_gstep);
    let rowlen = p.lead * p.vocab + p.lead;
    let ptok = plan_tok_base(p.batch);
    let ppos = plan_pos_base(p.batch, p.lead);

    if (prefill) {
        for (var b = li; b < p.batch; b += WG) {
            let rb = row_base(b);
            gen[rb + R_FIN] = 0u;
            for (var w = 0u; w < UW; w++) {
                gen[rb + R_USED + w] = 0u;
            }
            gen[rb + R_USED + p.pad / 32u] = 1u << (p.pad % 32u);
        }
    }
    if (p.debug != 0u) {
        let n = p.batch * rowlen;
        let o = (gstep % p.debug_rows) * n;
        for (var i = li; i < n; i += WG) {
            debug[o + i] = logits[i];
        }
    }
    storageBarrier();
    workgroupBarrier();

    let n_s = min(p.lead, p.budget - count);
    let group = li / GS;
    let gl = li % GS;
    for (var rp = 0u; rp * NG < p.batch; rp++) {
        let b = rp * NG + group;
        let row_ok = b < p.batch;
        let rb = row_base(min(b, p.batch - 1u));
        if (row_ok && gl < UW) {
            used_wg[group * UW + gl] = gen[rb + R_USED + gl];
        }
        workgroupBarrier();
        for (var k = 0u; k < n_s; k++) {
            var bv = F32_LOWEST;
            var bi = NONE;
            if (row_ok) {
                let lo = b * rowlen + k * p.vocab;
                for (var id = gl; id < p.vocab; id += GS) {
                    let bit = (used_wg[group * UW + id / 32u] >> (id % 32u)) & 1u;
                    if (bit == 0u) {
                        let v = logits[lo + id];
                        if (bi == NONE || v > bv) {
                            bv = v;
                            bi = id;
                        }
                    }
                }
            }
            sv[li] = bv;
            si[li] = bi;
            workgroupBarrier();
            for (var s = GS / 2u; s > 0u; s >>= 1u) {
                if (gl < s) {
                    let ov = sv[li + s];
                    let oi = si[li + s];
                    let mi = si[li];
                    if (oi != NONE && (mi == NONE || ov > sv[li] || (ov == sv[li] && oi < mi))) {
                        sv[li] = ov;
                        si[li] = oi;
                    }
                }
                workgroupBarrier();
            }
            if (gl == 0u && row_ok) {
                let pick = si[li];
                picks[group * 16u + k] = pick;
                if (pick != NONE) {
                    used_wg[group * UW + pick / 32u] |= 1u << (pick % 32u);
                }
            }
            workgroupBarrier();
        }
        if (gl == 0u && row_ok) {
            let fin = gen[rb + R_FIN] != 0u;
            var meet_any = false;
            for (var k = 0u; k < n_s; k++) {
                var tok = picks[group * 16u + k];
                if (fin || tok == NONE) {
                    tok = p.pad;
                } else if (p.has_req != 0u && !(step == 0u && k == 0u)) {
                    let tl = logits[b * rowlen + p.lead * p.vocab + k];
                    if (tl <= p.req) {
                        tok = p.pad;
                        meet_any = true;
                    }
                }
                gen[rb + R_TOK + count + k] = tok;
                out[p.out_frames + (b * p.out_frames + p.out_frame) * p.out_stride + count + k] = tok;
            }
            if (meet_any) {
                gen[rb + R_FIN] = 1u;
            }
            for (var w = 0u; w < UW; w++) {
                gen[rb + R_USED + w] = used_wg[group * UW + w];
            }
        }
        workgroupBarrier();
    }
    storageBarrier();
    workgroupBarrier();

    let new_count = count + n_s;
    if (li == 0u) {
        var all_fin = true;
        for (var b = 0u; b < p.batch; b++) {
            if (gen[row_base(b) + R_FIN] == 0u) {
                all_fin = false;
            }
        }
        u_fd = select(0u, 1u, new_count >= p.budget || all_fin);
    }
    let frame_done = workgroupUniformLoad(&u_fd) != 0u;

    if (!frame_done) {
        // Decode step: run this step's K tokens at the last K prefill positions.
        for (var b = li; b < p.batch; b += WG) {
            let rb = row_base(b);
            let pl = gen[rb + R_P];
            for (var k = 0u; k < p.lead; k++) {
                gen[ptok + b * p.lead + k] = gen[rb + R_TOK + count + k];
                gen[ppos + b * p.pos_stride + k] = pl + 1u + k - p.lead;
                kvmask[b * p.cap + l_new + k] = 1u;
            }
        }
        if (li == 0u) {
            gen[S_BASE] = l_new;
            gen[S_FIRST] = 0u;
            gen[S_DONE] = 0u;
        }
    } else {
        let u = n_s;
        let n_run = new_count - u;
        for (var b = li; b < p.batch; b += WG) {
            let rb = row_base(b);
            var run = gen[rb + R_P] + 1u;
            for (var i = 0u; i < new_count; i++) {
                let tok = gen[rb + R_TOK + i];
                let mk = select(0u, 1u, tok != p.pad);
                run += mk;
                if (i < n_run) {
                    kvmask[b * p.cap + g + i] = mk;
                } else {
                    let j = i - n_run;
                    let slot = p.lead - u + j;
                    gen[ptok + b * p.lead + slot] = tok;
                    gen[ppos + b * p.pos_stride + slot] = select(1u, run - 1u, mk == 1u);
                    kvmask[b * p.cap + l_new + j] = mk;
                }
            }
            for (var s = 0u; s < p.lead - u; s++) {
                gen[ptok + b * p.lead + s] = p.pad;
                gen[ppos + b * p.pos_stride + s] = 0u;
            }
            for (var q = 0u; q < p.npatch; q++) {
                gen[ppos + b * p.pos_stride + p.lead + q] = run + q;
                kvmask[b * p.cap + l_new + u + q] = 1u;
            }
            gen[rb + R_P] = run + p.npatch - 1u;
        }
        if (li == 0u) {
            gen[S_BASE] = bitcast<u32>(i32(l_new) - i32(p.lead - u));
            gen[S_FIRST] = p.lead - u;
            gen[S_DONE] = 1u;
            gen[S_FRAME] = gen[S_FRAME] + 1u;
            out[p.out_frame] = new_count;
        }
    }
    if (li == 0u) {
        gen[S_L] = l_new;
        gen[S_COUNT] = new_count;
        gen[S_STEP] = step + 1u;
        gen[S_G] = g;
        gen[S_GSTEP] = gstep + 1u;
    }
}
