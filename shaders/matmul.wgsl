// matmul.wgsl: tiled C[M, N] = A'[M, K] * W[N, K]^T with fused loaders and epilogues.
//
// Every linear map of the model is this one kernel (Conv3d patchify, the causal 3x3x3 conv
// as an implicit im2col GEMM, the 1x1 conv, q/k/v/o, gate/up/down, the heads). Defines:
//   TM, TN       workgroup tile (rows x cols);  RM, RN  per-thread micro tile (RN even)
//   A            A-operand loader: plain | patch | conv3 | rms | embed
//   NORM         1: RMSNorm the A rows (rms, embed): rmsnorm(x) W^T = r * (x (g o W)^T) with
//                r = 1/sqrt(mean(x^2) + eps) from the tiles as they stream through
//   TK           depth of one k-step (16 for the large tile, 64 for the small one)
//   LAST         1: A row m is the last slot of batch row m (the heads)
//   STRIDED      1: A rows rows_per per batch row, every row_step slots, the last at slot
//                   row_last (the teacher-forced score's heads at the ends of its groups)
//   EPI          store | residual | swiglu | qkv
//   BIAS, RELU, ADDROW (store only): + bias[n]; max(., 0); + addend[(m % add_mod), n]
//   DEC          1: decoder kernel (binds `gen`; skips when the frame is done and
//                   skip_if_done is set)
// W, biases, norm weights, the addend and the token embedding table all live in the packed
// weight buffer `wts` at the offsets in Params.

struct Params {
    m: u32,
    n: u32,
    k: u32,
    ldc: u32,
    w_off: u32,
    b_off: u32,
    g_off: u32,
    add_off: u32,
    add_mod: u32,
    nt: u32,          // decoder: slots per batch row in this forward
    batch: u32,
    cap: u32,         // KV cache capacity (tokens per row)
    lead: u32,        // decoder: token slots per row (K); slots >= lead are vision tokens
    _nchunk: u32,
    skip_if_done: u32,
    eps: f32,
    grid: u32,        // patch grid side (14)
    img: u32,         // model input side (224)
    psize: u32,       // patch side (16)
    cin: u32,         // conv3 input channels
    frames_in: u32,   // conv3: frames per row in the LayerNorm window
    frames_out: u32,  // conv3: output frames per row (the last ones of the window)
    vis_frames: u32,  // embed: frames per row in the vision buffer
    vis_frame: u32,   // embed: this forward's frame in the vision buffer
    heads: u32,
    head_dim: u32,
    a_off: u32,       // embed: token embedding table offset in `wts`
    pos_stride: u32,  // plan_pos row stride (lead + patches)
    t0: u32,          // conv3: session frame index of output frame 0 (ring window)
    rows_per: u32,    // STRIDED: A rows per batch row
    row_last: u32,    // STRIDED: slot of a batch row's last A row
    row_step: u32,    // STRIDED: slots between its A rows
}

const TM: u32 = {{TM}}u;
const TN: u32 = {{TN}}u;
const TK: u32 = {{TK}}u;
const RM: u32 = {{RM}}u;
const RN: u32 = {{RN}}u;
const TX: u32 = TN / RN;
const TY: u32 = TM / RM;
const NTHREADS: u32 = TX * TY;
// Tiles are exact multiples of the thread count (checked by the Rust launcher).
const A_LOADS: u32 = TM * TK / NTHREADS;
const W_LOADS: u32 = TN * TK / NTHREADS;

@group(0) @binding(0) var<uniform> p: Params;
#if A == patch
@group(0) @binding(1) var<storage, read> a: array<f32>;          // [frames, 3, img, img]
#elif A == conv3
@group(0) @binding(1) var<storage, read> a: array<f32>;          // [B, frames_in, grid*grid, cin]
#elif A == embed
@group(0) @binding(1) var<storage, read> a: array<f32>;          // vision [B, vis_frames, P, K]
#else
@group(0) @binding(1) var<storage, read> a: array<f32>;          // [M, K] (LAST, STRIDED: [B, nt, K])
#endif
@group(0) @binding(2) var<storage, read> wts: array<f32>;        // packed weights; W [N, K] at w_off
#if EPI == qkv
@group(0) @binding(3) var<storage, read_write> out: array<f32>;  // q [M, heads*hd]
#elif EPI == swiglu
@group(0) @binding(3) var<storage, read_write> out: array<f32>;  // [M, N/2]
#else
@group(0) @binding(3) var<storage, read_write> out: array<f32>;  // [M, ldc]
#endif
#if DEC
@group(0) @binding(4) var<storage, read> gen: array<u32>;        // generation state + plan
#endif
#if A == embed
@group(0) @binding(5) var<storage, read_write> xw: array<f32>;   // decoder input x [M, K]
#endif
#if EPI == qkv
@group(0) @binding(6) var<storage, read_write> kv: array<f32>;   // [B, cap, 2, heads*hd]
@group(0) @binding(7) var<storage, read> rope: array<f32>;       // [positions, hd]: cos | sin
#endif

var<workgroup> sa: array<f32, TK * TM>;   // [TK][TM]
var<workgroup> sw: array<f32, TK * TN>;   // [TK][TN]
var<workgroup> wg_flag: u32;
#if NORM
var<workgroup> rstat: array<f32, TM>;
#endif

fn a_row(m: u32) -> u32 {
#if LAST
    return m * p.nt + p.nt - 1u;
#elif STRIDED
    let back = p.rows_per - 1u - m % p.rows_per;
    return (m / p.rows_per) * p.nt + p.row_last - back * p.row_step;
#else
    return m;
#endif
}

// Unnormalised A value (m < M, k < K).
fn raw_a(m: u32, k: u32) -> f32 {
#if A == patch
    let gg = p.grid * p.grid;
    let f = m / gg;
    let s = m % gg;
    let py = s / p.grid;
    let px = s % p.grid;
    let pp = p.psize * p.psize;
    let c = k / pp;
    let r = k % pp;
    let ky = r / p.psize;
    let kx = r % p.psize;
    return a[((f * 3u + c) * p.img + py * p.psize + ky) * p.img + px * p.psize + kx];
#elif A == conv3
    let gg = p.grid * p.grid;
    let per_b = p.frames_out * gg;
    let b = m / per_b;
    let r = m % per_b;
    let j = r / gg;
    let s = r % gg;
    let y = i32(s / p.grid);
    let x = i32(s % p.grid);
    let tap = k / p.cin;
    let ci = k % p.cin;
    let dt = tap / 9u;
    let dy = i32((tap / 3u) % 3u) - 1;
    let dx = i32(tap % 3u) - 1;
    let yy = y + dy;
    let xx = x + dx;
    if (yy < 0 || xx < 0 || yy >= i32(p.grid) || xx >= i32(p.grid)) {
        return 0.0;
    }
    // The window is a ring of frames_in post-LayerNorm frames: session frame t lives in slot
    // (t + 2) % frames_in, so output frame t0 + j reads slots (t0 + j + dt) % frames_in.
    let wf = (p.t0 + j + dt) % p.frames_in;
    return a[((b * p.frames_in + wf) * gg + u32(yy) * p.grid + u32(xx)) * p.cin + ci];
#elif A == embed
    let b = m / p.nt;
    let i = m % p.nt;
    if (i < p.lead) {
        let tok = gen[plan_tok_base(p.batch) + b * p.lead + i];
        return wts[p.a_off + tok * p.k + k];
    }
    let np = p.nt - p.lead;
    return a[((b * p.vis_frames + p.vis_frame) * np + (i - p.lead)) * p.k + k];
#else
    return a[a_row(m) * p.k + k];
#endif
}

fn load_a(m: u32, k: u32, store_x: bool) -> f32 {
    if (m >= p.m || k >= p.k) {
        return 0.0;
    }
    let v = raw_a(m, k);
#if A == embed
    if (store_x) {
        xw[m * p.k + k] = v;
    }
#endif
    return v;
}

// RMSNorm's r = 1/sqrt(mean(x^2) + eps) of an A row from its sum of squares ss (NORM).
fn rms_scale(ss: f32) -> f32 {
    return 1.0 / sqrt(ss / f32(p.k) + p.eps);
}

fn epilogue(m: u32, n: u32, v0: f32, v1: f32) {
    if (m >= p.m || n >= p.n) {
        return;
    }
#if EPI == store
    var r0 = v0;
#if BIAS
    r0 += wts[p.b_off + n];
#endif
#if RELU
    r0 = max(r0, 0.0);
#endif
#if ADDROW
    r0 += wts[p.add_off + (m % p.add_mod) * p.n + n];
#endif
    out[m * p.ldc + n] = r0;
    if (n + 1u < p.n) {
        var r1 = v1;
#if BIAS
        r1 += wts[p.b_off + n + 1u];
#endif
#if RELU
        r1 = max(r1, 0.0);
#endif
#if ADDROW
        r1 += wts[p.add_off + (m % p.add_mod) * p.n + n + 1u];
#endif
        out[m * p.ldc + n + 1u] = r1;
    }
#elif EPI == residual
    out[m * p.ldc + n] = out[m * p.ldc + n] + v0;
    if (n + 1u < p.n) {
        out[m * p.ldc + n + 1u] = out[m * p.ldc + n + 1u] + v1;
    }
#elif EPI == swiglu
    // Rows of W interleave gate (even) and up (odd) of output n / 2.
    out[m * p.ldc + n / 2u] = silu(v0) * v1;
#elif EPI == qkv
    // Rows of W are permuted so that (n, n + 1) hold dims (q, q + hd/2) of one head.
    let hd = p.head_dim;
    let hh = hd / 2u;
    let cdim = p.heads * hd;
    let sec = n / cdim;
    let w = n % cdim;
    let h = w / hd;
    let q = (w % hd) / 2u;
    let col_lo = h * hd + q;
    let col_hi = col_lo + hh;
    let b = m / p.nt;
    let i = m % p.nt;
    var r0 = v0;
    var r1 = v1;
    if (sec < 2u) {
        let pos = gen[plan_pos_base(p.batch, p.lead) + b * p.pos_stride + i];
        let cs = rope[pos * hd + q];
        let sn = rope[pos * hd + hh + q];
        r0 = v0 * cs - v1 * sn;
        r1 = v1 * cs + v0 * sn;
    }
    if (sec == 0u) {
        out[m * cdim + col_lo] = r0;
        out[m * cdim + col_hi] = r1;
    } else {
        let first = gen[S_FIRST];
        if (i >= first) {
            let c = u32(bitcast<i32>(gen[S_BASE]) + i32(i));
            let o = ((b * p.cap + c) * 2u + (sec - 1u)) * cdim;
            kv[o + col_lo] = r0;
            kv[o + col_hi] = r1;
        }
    }
#endif
}

#if DEC
// True (for the whole workgroup) when this decode kernel may skip: the frame is done and the
// launch allows skipping. Call from uniform control flow.
fn frame_done(li: u32) -> bool {
    if (li == 0u) {
        wg_flag = gen[S_DONE] * p.skip_if_done;
    }
    return workgroupUniformLoad(&wg_flag) != 0u;
}
#endif

@compute @workgroup_size(NTHREADS)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
#if DEC
    if (frame_done(li)) {
        return;
    }
#endif
    let m0 = wg.y * TM;
    let n0 = wg.x * TN;

    let tx = li % TX;
    let ty = li / TX;
    var acc: array<f32, RM * RN>;
    for (var i = 0u; i < RM * RN; i++) {
        acc[i] = 0.0;
    }
    // Sum of squares of row m0 + li (threads li < TM), for the RMSNorm.
    var ss = 0.0;
    let store_x = wg.x == 0u;
    for (var k0 = 0u; k0 < p.k; k0 += TK) {
        // Constant trip counts, so the driver can unroll and keep all loads in flight.
        for (var r = 0u; r < A_LOADS; r++) {
            let i = li + r * NTHREADS;
            let mm = i / TK;
            let kk = i % TK;
            sa[kk * TM + mm] = load_a(m0 + mm, k0 + kk, store_x);
        }
        for (var r = 0u; r < W_LOADS; r++) {
            let i = li + r * NTHREADS;
            let nn = i / TK;
            let kk = i % TK;
            let n = n0 + nn;
            let k = k0 + kk;
            var v = 0.0;
            if (n < p.n && k < p.k) {
                v = wts[p.w_off + n * p.k + k];
#if NORM
                v *= wts[p.g_off + k];
#endif
            }
            sw[kk * TN + nn] = v;
        }
        workgroupBarrier();
#if NORM
        if (li < TM) {
            for (var kk = 0u; kk < TK; kk++) {
                let v = sa[kk * TM + li];
                ss += v * v;
            }
        }
#endif
        for (var kk = 0u; kk < TK; kk++) {
            var ar: array<f32, RM>;
            var wr: array<f32, RN>;
            for (var i = 0u; i < RM; i++) {
                ar[i] = sa[kk * TM + ty * RM + i];
            }
            for (var j = 0u; j < RN; j++) {
                wr[j] = sw[kk * TN + tx * RN + j];
            }
            for (var i = 0u; i < RM; i++) {
                for (var j = 0u; j < RN; j++) {
                    acc[i * RN + j] += ar[i] * wr[j];
                }
            }
        }
        workgroupBarrier();
    }
#if NORM
    if (li < TM) {
        rstat[li] = rms_scale(ss);
    }
    workgroupBarrier();
#endif
    for (var i = 0u; i < RM; i++) {
#if NORM
        let rs = rstat[ty * RM + i];
#else
        let rs = 1.0;
#endif
        for (var j = 0u; j < RN; j += 2u) {
            epilogue(m0 + ty * RM + i, n0 + tx * RN + j, acc[i * RN + j] * rs, acc[i * RN + j + 1u] * rs);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// gemv: the same C = A' W^T for few rows (decode steps: M = 10 B), latency first. A workgroup
// owns TM rows x 2 columns (the epilogue's pair) and its GV threads split K; partial sums meet
// in workgroup memory. The tiled `main` gives 6 workgroups to a 10 x 192 x 192 product; this
// gives 96, each with a short dependent chain. Same loaders, epilogues and skip rule as `main`.
const GV: u32 = 64u;
var<workgroup> gv_red: array<f32, GV * TM * 3u>;  // [TM * 3][GV]: acc col 0 | acc col 1 | sum x^2

@compute @workgroup_size(GV)
fn gemv(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
#if DEC
    if (frame_done(li)) {
        return;
    }
#endif
    let m0 = wg.y * TM;
    let n0 = wg.x * 2u;
    var acc0: array<f32, TM>;
    var acc1: array<f32, TM>;
    var ssq: array<f32, TM>;
    for (var i = 0u; i < TM; i++) {
        acc0[i] = 0.0;
        acc1[i] = 0.0;
        ssq[i] = 0.0;
    }
    let store_x = wg.x == 0u;
    for (var k = li; k < p.k; k += GV) {
        var w0 = 0.0;
        var w1 = 0.0;
        if (n0 < p.n) {
            w0 = wts[p.w_off + n0 * p.k + k];
        }
        if (n0 + 1u < p.n) {
            w1 = wts[p.w_off + (n0 + 1u) * p.k + k];
        }
#if NORM
        let g = wts[p.g_off + k];
        w0 *= g;
        w1 *= g;
#endif
        for (var i = 0u; i < TM; i++) {
            let v = load_a(m0 + i, k, store_x);
            acc0[i] += v * w0;
            acc1[i] += v * w1;
            ssq[i] += v * v;
        }
    }
    for (var i = 0u; i < TM; i++) {
        gv_red[(i * 3u) * GV + li] = acc0[i];
        gv_red[(i * 3u + 1u) * GV + li] = acc1[i];
        gv_red[(i * 3u + 2u) * GV + li] = ssq[i];
    }
    workgroupBarrier();
    for (var s = GV / 2u; s > 0u; s >>= 1u) {
        if (li < s) {
            for (var j = 0u; j < TM * 3u; j++) {
                gv_red[j * GV + li] += gv_red[j * GV + li + s];
            }
        }
        workgroupBarrier();
    }
    if (li < TM) {
#if NORM
        let rs = rms_scale(gv_red[(li * 3u + 2u) * GV]);
#else
        let rs = 1.0;
#endif
        epilogue(m0 + li, n0, gv_red[(li * 3u) * GV] * rs, gv_red[(li * 3u + 1u) * GV] * rs);
    }
}

// ---------------------------------------------------------------------------------------------
// direct: the same C = A' W^T for CPU devices (lavapipe). There a workgroup's invocations run
// in turns on one core and every memory access, workgroup memory included, is made lane by
// lane: the loads per FMA set the time, not the FMAs. Each invocation owns a DM x DN block and
// reads its A rows and W columns straight from memory: DM + DN + 1 loads per DM * DN FMAs, no
// workgroup memory, no barrier past the skip check. Every sum runs over k in order with the
// same operands as `main`'s, so both entries give the same bits.
const DM: u32 = {{DM}}u;
const DN: u32 = {{DN}}u;   // even: the epilogue takes column pairs
const DWG: u32 = {{DWG}}u;

@compute @workgroup_size(DWG)
fn direct(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
#if DEC
    if (frame_done(li)) {
        return;
    }
#endif
    let m0 = wg.y * DM;
    let n0 = (wg.x * DWG + li) * DN;
    // The invocation of column block 0 stores the embed loader's x for its rows.
    let store_x = n0 == 0u;
    if (n0 >= p.n) {
        return;
    }
    var acc: array<f32, DM * DN>;
    var ss: array<f32, DM>;
    for (var i = 0u; i < DM * DN; i++) {
        acc[i] = 0.0;
    }
    for (var i = 0u; i < DM; i++) {
        ss[i] = 0.0;
    }
    for (var k = 0u; k < p.k; k++) {
#if NORM
        let g = wts[p.g_off + k];
#endif
        var wr: array<f32, DN>;
        for (var j = 0u; j < DN; j++) {
            var v = 0.0;
            if (n0 + j < p.n) {
                v = wts[p.w_off + (n0 + j) * p.k + k];
#if NORM
                v *= g;
#endif
            }
            wr[j] = v;
        }
        for (var i = 0u; i < DM; i++) {
            let v = load_a(m0 + i, k, store_x);
            ss[i] += v * v;
            for (var j = 0u; j < DN; j++) {
                acc[i * DN + j] += v * wr[j];
            }
        }
    }
    for (var i = 0u; i < DM; i++) {
#if NORM
        let rs = rms_scale(ss[i]);
#else
        let rs = 1.0;
#endif
        for (var j = 0u; j < DN; j += 2u) {
            epilogue(m0 + i, n0 + j, acc[i * DN + j] * rs, acc[i * DN + j + 1u] * rs);
        }
    }
}
