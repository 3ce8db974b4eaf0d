// attention.wgsl: causal attention of this forward's queries over the KV cache, split over
// key chunks (flash-decoding), then a merge of the chunks.
//
// `main`: each workgroup takes QT query slots of one (batch row, head) and one chunk of keys,
// with LANES threads per slot. The chunk is walked in tiles of KT keys that the workgroup
// loads cooperatively into workgroup memory; lane j of a slot takes keys j, j + LANES, ... of
// each tile and keeps its query, an online-softmax state and its output accumulator in
// registers; the lanes' states are combined at the end. Output per (row, head, slot,
// chunk): a partial (max, sum of exp, unnormalised sum of exp * v). Decode steps (10 slots)
// use 4 lanes: 4x the threads loading the cache and a 4x shorter chain per thread.
// `merge`: one thread per (row, slot, head, dim) combines the chunks into the attention
// output [B, nt, heads * HD] (read by o_proj).
//
// Query slot i of batch row b sits at cache index c_i = base + i and sees keys 0..=c_i whose
// 0/1 key mask is set. Scores are (q . k) * scale, as the eager reference computes them.

struct Params {
    batch: u32,
    nt: u32,          // query slots per batch row
    cap: u32,         // KV cache capacity
    nchunk: u32,      // key chunks (grid y)
    chunk: u32,       // keys per chunk (a multiple of KT)
    heads: u32,
    skip_if_done: u32,
    scale: f32,
}

const QT: u32 = {{QT}}u;
const LANES: u32 = {{LANES}}u;
const NT: u32 = QT * LANES;  // threads per workgroup
const KT: u32 = 32u;
const HD: u32 = {{HEAD_DIM}}u;
const HD4: u32 = HD / 4u;
// Constant trip counts for the cooperative tile loads (KT * HD4 is a multiple of NT).
const KV_LOADS: u32 = KT * HD4 / NT;
const MASK_LOADS: u32 = max(KT / NT, 1u);

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> gen: array<u32>;            // generation state
@group(0) @binding(2) var<storage, read_write> q: array<vec4<f32>>;  // [B, nt, heads*HD]: q in, merged output out
@group(0) @binding(3) var<storage, read> kv: array<vec4<f32>>;       // [B, cap, 2, heads*HD]
@group(0) @binding(4) var<storage, read> kvmask: array<u32>;         // [B, cap]
@group(0) @binding(5) var<storage, read_write> part: array<f32>;     // [B, heads, nt, nchunk, HD+2]

var<workgroup> wg_flag: u32;
var<workgroup> wg_base: u32;
var<workgroup> wg_first: u32;
var<workgroup> tk: array<vec4<f32>, KT * HD4>;
var<workgroup> tv: array<vec4<f32>, KT * HD4>;
var<workgroup> tm: array<u32, KT>;
#if LANES == 1
#else
// Lanes 1.. hand their (max, sum) to lane 0 here; their accumulators go through tk/tv, free
// after the key loop ((LANES - 1) * QT <= 2 * KT, checked by the Rust launcher).
var<workgroup> lane_ml: array<vec2<f32>, NT>;
#endif

// The launch's frame state, read by one thread and made uniform for the workgroup: skip (the
// frame is finished and this launch is decode work, which then no-ops), base (query slot 0's
// cache index) and first (the first active slot; earlier slots are idle).
struct FrameState {
    skip: bool,
    base: i32,
    first: u32,
}

fn frame_state(li_: u32) -> FrameState {
    if (li_ == 0u) {
        wg_flag = gen[S_DONE] * p.skip_if_done;
        wg_base = gen[S_BASE];
        wg_first = gen[S_FIRST];
    }
    let skip = workgroupUniformLoad(&wg_flag) != 0u;
    return FrameState(skip, bitcast<i32>(workgroupUniformLoad(&wg_base)), workgroupUniformLoad(&wg_first));
}

// The end (exclusive) of the keys workgroup wg needs: its chunk (wg.y), up to the cache index
// of its last query slot (wg.x's block of QT).
fn key_end(wg: vec3<u32>, base: i32) -> i32 {
    let i_last = min(p.nt, wg.x * QT + QT) - 1u;
    let k_lo = wg.y * p.chunk;
    return i32(min(k_lo + p.chunk, u32(max(base + i32(i_last) + 1, 0))));
}

@compute @workgroup_size(NT)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li_: u32) {
    let li = li_ % QT;     // query slot within the workgroup
    let lane = li_ / QT;   // which keys of each tile this thread takes
    let fs = frame_state(li_);
    if (fs.skip) {
        return;
    }
    let base = fs.base;
    let first = fs.first;
    let b = wg.z / p.heads;
    let h = wg.z % p.heads;
    let c4 = p.heads * HD4;
    let i = wg.x * QT + li;
    let valid = i < p.nt && i >= first;
    let ci = base + i32(i);

    let k_lo = i32(wg.y * p.chunk);
    let k_end = key_end(wg, base);

    var qv: array<vec4<f32>, HD4>;
    var acc: array<vec4<f32>, HD4>;
    for (var t = 0u; t < HD4; t++) {
        acc[t] = vec4<f32>(0.0);
        qv[t] = vec4<f32>(0.0);
    }
    if (valid) {
        let qb = (b * p.nt + i) * c4 + h * HD4;
        for (var t = 0u; t < HD4; t++) {
            qv[t] = q[qb + t];
        }
    }
    var m = F32_LOWEST;
    var l = 0.0;
    for (var j0 = k_lo; j0 < k_end; j0 += i32(KT)) {
        // Cooperative tile load: KT keys x HD4 vec4 for K and V, plus the key mask.
        for (var r = 0u; r < KV_LOADS; r++) {
            let e = li_ + r * NT;
            let kk = e / HD4;
            let t = e % HD4;
            let j = j0 + i32(kk);
            var kvk = vec4<f32>(0.0);
            var kvv = vec4<f32>(0.0);
            if (j < k_end) {
                let kb = (b * p.cap + u32(j)) * 2u * c4 + h * HD4 + t;
                kvk = kv[kb];
                kvv = kv[kb + c4];
            }
            tk[e] = kvk;
            tv[e] = kvv;
        }
        for (var r = 0u; r < MASK_LOADS; r++) {
            let kk = li_ + r * NT;
            if (kk < KT) {
                let j = j0 + i32(kk);
                var mk = 0u;
                if (j < k_end) {
                    mk = kvmask[b * p.cap + u32(j)];
                }
                tm[kk] = mk;
            }
        }
        workgroupBarrier();
        if (valid) {
            let n_here = min(i32(KT), min(k_end, ci + 1) - j0);
            for (var kk = i32(lane); kk < n_here; kk += i32(LANES)) {
                if (tm[kk] != 0u) {
                    var s4 = vec4<f32>(0.0);
                    for (var t = 0u; t < HD4; t++) {
                        s4 += qv[t] * tk[u32(kk) * HD4 + t];
                    }
                    let s = (s4.x + s4.y + s4.z + s4.w) * p.scale;
                    if (s > m) {
                        let corr = exp(m - s);
                        l *= corr;
                        for (var t = 0u; t < HD4; t++) {
                            acc[t] *= corr;
                        }
                        m = s;
                    }
                    let e = exp(s - m);
                    l += e;
                    for (var t = 0u; t < HD4; t++) {
                        acc[t] += e * tv[u32(kk) * HD4 + t];
                    }
                }
            }
        }
        workgroupBarrier();
    }
#if LANES == 1
#else
    // Combine the lanes of each slot into lane 0 (online-softmax merge, as `merge` does for
    // chunks; a lane that saw no key has l = 0 and adds nothing).
    if (lane > 0u) {
        lane_ml[li_] = vec2<f32>(m, l);
        let s0 = (li_ - QT) * HD4;
        for (var t = 0u; t < HD4; t++) {
            let e = s0 + t;
            if (e < KT * HD4) {
                tk[e] = acc[t];
            } else {
                tv[e - KT * HD4] = acc[t];
            }
        }
    }
    workgroupBarrier();
    if (lane != 0u) {
        return;
    }
    for (var j = 1u; j < LANES; j++) {
        let src = j * QT + li;
        let ml = lane_ml[src];
        if (ml.y > 0.0) {
            let mx = max(m, ml.x);
            let c_self = exp(m - mx);
            let c_other = exp(ml.x - mx);
            l = l * c_self + ml.y * c_other;
            let s0 = (src - QT) * HD4;
            for (var t = 0u; t < HD4; t++) {
                let e = s0 + t;
                var a = vec4<f32>(0.0);
                if (e < KT * HD4) {
                    a = tk[e];
                } else {
                    a = tv[e - KT * HD4];
                }
                acc[t] = acc[t] * c_self + a * c_other;
            }
            m = mx;
        }
    }
#endif
    if (i < p.nt) {
        let o = (((b * p.heads + h) * p.nt + i) * p.nchunk + wg.y) * (HD + 2u);
        part[o] = m;
        part[o + 1u] = l;
        for (var t = 0u; t < HD4; t++) {
            part[o + 2u + 4u * t] = acc[t].x;
            part[o + 3u + 4u * t] = acc[t].y;
            part[o + 4u + 4u * t] = acc[t].z;
            part[o + 5u + 4u * t] = acc[t].w;
        }
    }
}

// Merges the chunk partials: out[b, i, h*HD + d] = sum_c w_c acc_c[d] / sum_c w_c l_c with
// w_c = exp(m_c - max_c m_c) over the chunks that saw a key; idle slots get zeros. One
// thread per (row, slot, head, 4 dims); the output overwrites q (already consumed).
@compute @workgroup_size(64)
fn merge(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    if (gen[S_DONE] * p.skip_if_done != 0u) {
        return;
    }
    let idx = gid.y * nw.x * 64u + gid.x;
    let c4 = p.heads * HD4;
    if (idx >= p.batch * p.nt * c4) {
        return;
    }
    let row = idx / c4;
    let col = idx % c4;
    let b = row / p.nt;
    let i = row % p.nt;
    let h = col / HD4;
    let d = (col % HD4) * 4u;
    let st = HD + 2u;
    let base = ((b * p.heads + h) * p.nt + i) * p.nchunk;
    var mx = F32_LOWEST;
    for (var c = 0u; c < p.nchunk; c++) {
        let o = (base + c) * st;
        if (part[o + 1u] > 0.0) {
            mx = max(mx, part[o]);
        }
    }
    var num = vec4<f32>(0.0);
    var den = 0.0;
    for (var c = 0u; c < p.nchunk; c++) {
        let o = (base + c) * st;
        let lc = part[o + 1u];
        if (lc > 0.0) {
            let w = exp(part[o] - mx);
            let a = vec4<f32>(part[o + 2u + d], part[o + 3u + d], part[o + 4u + d], part[o + 5u + d]);
            num += w * a;
            den += w * lc;
        }
    }
    var r = vec4<f32>(0.0);
    if (den > 0.0) {
        r = num / den;
    }
    q[idx] = r;
}

// direct: `main`'s partials for CPU devices (lavapipe), where every memory access, workgroup
// memory included, is made lane by lane (see matmul.wgsl's `direct`). An invocation takes one
// lane's keys for SQ query slots at once and reads each key and value once for all of them,
// where `main` reads them from workgroup memory once per slot. Per slot the keys, their order
// and the arithmetic are `main`'s, and lanes 1.. hand their states to lane 0 in the same
// order, so both entries give the same bits. 8 slots an invocation: 2-core lavapipe, case b's
// first 3 frames, decode attention 8.7 ms a launch (main: 13.5), prefill 83 (156); 16 slots
// were slower than `main` (their private arrays stop being registers).
const SQ: u32 = min(QT, 8u);
const SG: u32 = QT / SQ;  // slot groups of a workgroup
#if LANES == 1
#else
var<workgroup> d_ml: array<vec2<f32>, (LANES - 1u) * QT>;
var<workgroup> d_acc: array<vec4<f32>, (LANES - 1u) * QT * HD4>;
#endif

@compute @workgroup_size(SG * LANES)
fn direct(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li_: u32) {
    let grp = li_ % SG;
    let lane = li_ / SG;
    let fs = frame_state(li_);
    if (fs.skip) {
        return;
    }
    let base = fs.base;
    let first = fs.first;
    let b = wg.z / p.heads;
    let h = wg.z % p.heads;
    let c4 = p.heads * HD4;
    let i0 = wg.x * QT + grp * SQ;
    let k_lo = i32(wg.y * p.chunk);
    let k_end = key_end(wg, base);

    var qv: array<vec4<f32>, SQ * HD4>;
    var acc: array<vec4<f32>, SQ * HD4>;
    var m: array<f32, SQ>;
    var l: array<f32, SQ>;
    for (var s = 0u; s < SQ; s++) {
        m[s] = F32_LOWEST;
        l[s] = 0.0;
        let i = i0 + s;
        let valid = i < p.nt && i >= first;
        let qb = (b * p.nt + i) * c4 + h * HD4;
        for (var t = 0u; t < HD4; t++) {
            acc[s * HD4 + t] = vec4<f32>(0.0);
            var v = vec4<f32>(0.0);
            if (valid) {
                v = q[qb + t];
            }
            qv[s * HD4 + t] = v;
        }
    }
    for (var j = k_lo + i32(lane); j < k_end; j += i32(LANES)) {
        if (kvmask[b * p.cap + u32(j)] == 0u) {
            continue;
        }
        let kb = (b * p.cap + u32(j)) * 2u * c4 + h * HD4;
        var kk: array<vec4<f32>, HD4>;
        var vv: array<vec4<f32>, HD4>;
        for (var t = 0u; t < HD4; t++) {
            kk[t] = kv[kb + t];
            vv[t] = kv[kb + c4 + t];
        }
        for (var s = 0u; s < SQ; s++) {
            let i = i0 + s;
            // Slot i sees the keys up to its own cache index base + i.
            if (i >= p.nt || i < first || j > base + i32(i)) {
                continue;
            }
            var s4 = vec4<f32>(0.0);
            for (var t = 0u; t < HD4; t++) {
                s4 += qv[s * HD4 + t] * kk[t];
            }
            let sc = (s4.x + s4.y + s4.z + s4.w) * p.scale;
            if (sc > m[s]) {
                let corr = exp(m[s] - sc);
                l[s] *= corr;
                for (var t = 0u; t < HD4; t++) {
                    acc[s * HD4 + t] *= corr;
                }
                m[s] = sc;
            }
            let e = exp(sc - m[s]);
            l[s] += e;
            for (var t = 0u; t < HD4; t++) {
                acc[s * HD4 + t] += e * vv[t];
            }
        }
    }
#if LANES == 1
#else
    if (lane > 0u) {
        for (var s = 0u; s < SQ; s++) {
            let o = (lane - 1u) * QT + grp * SQ + s;
            d_ml[o] = vec2<f32>(m[s], l[s]);
            for (var t = 0u; t < HD4; t++) {
                d_acc[o * HD4 + t] = acc[s * HD4 + t];
            }
        }
    }
    workgroupBarrier();
    if (lane != 0u) {
        return;
    }
    for (var s = 0u; s < SQ; s++) {
        for (var jl = 1u; jl < LANES; jl++) {
            let o = (jl - 1u) * QT + grp * SQ + s;
            let ml = d_ml[o];
            if (ml.y > 0.0) {
                let mx = max(m[s], ml.x);
                let c_self = exp(m[s] - mx);
                let c_other = exp(ml.x - mx);
                l[s] = l[s] * c_self + ml.y * c_other;
                for (var t = 0u; t < HD4; t++) {
                    acc[s * HD4 + t] = acc[s * HD4 + t] * c_self + d_acc[o * HD4 + t] * c_other;
                }
                m[s] = mx;
            }
        }
    }
#endif
    for (var s = 0u; s < SQ; s++) {
        let i = i0 + s;
        if (i < p.nt) {
            let o = (((b * p.heads + h) * p.nt + i) * p.nchunk + wg.y) * (HD + 2u);
            part[o] = m[s];
            part[o + 1u] = l[s];
            for (var t = 0u; t < HD4; t++) {
                let a = acc[s * HD4 + t];
                part[o + 2u + 4u * t] = a.x;
                part[o + 3u + 4u * t] = a.y;
                part[o + 4u + 4u * t] = a.z;
                part[o + 5u + 4u * t] = a.w;
            }
        }
    }
}
