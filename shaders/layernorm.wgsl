// layernorm.wgsl: LayerNorm over the channels of each token (eps, affine), two-pass
// mean/variance in f32, written into the causal-conv window ring (see matmul.wgsl, A=conv3).

struct Params {
    rows: u32,        // tokens to normalise
    c: u32,           // channels
    hw: u32,          // tokens per frame
    in_frames: u32,   // frames per batch row in `src`
    out_frames: u32,  // frames per batch row in `dst` (the conv window ring)
    t0: u32,          // session frame index of input frame 0 (lands in slot (t0 + 2) % out_frames)
    g_off: u32,       // weight offset in `wts`
    b_off: u32,       // bias offset in `wts`
    eps: f32,
    row_groups_x: u32, // rows per grid y-step (grid is 2-D when rows exceed the dim limit)
    _p0: u32,
    _p1: u32,
}

const WG: u32 = 64u;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> src: array<f32>;        // [B, in_frames, hw, c]
@group(0) @binding(2) var<storage, read> wts: array<f32>;        // packed weights
@group(0) @binding(3) var<storage, read_write> dst: array<f32>;  // [B, out_frames, hw, c]

var<workgroup> red: array<f32, WG>;

fn reduce_sum(li: u32, v: f32) -> f32 {
    red[li] = v;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if (li < s) {
            red[li] += red[li + s];
        }
        workgroupBarrier();
    }
    let r = red[0];
    workgroupBarrier();
    return r;
}

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let row = wg.y * p.row_groups_x + wg.x;
    if (row >= p.rows) {
        return;
    }
    let src_off = row * p.c;
    var s = 0.0;
    for (var k = li; k < p.c; k += WG) {
        s += src[src_off + k];
    }
    let mean = reduce_sum(li, s) / f32(p.c);
    var q = 0.0;
    for (var k = li; k < p.c; k += WG) {
        let d = src[src_off + k] - mean;
        q += d * d;
    }
    let var_ = reduce_sum(li, q) / f32(p.c);
    let rstd = 1.0 / sqrt(var_ + p.eps);
    let per_b = p.in_frames * p.hw;
    let b = row / per_b;
    let r = row % per_b;
    let t = r / p.hw;
    let tok = r % p.hw;
    let slot = (p.t0 + t + 2u) % p.out_frames;
    let dst_off = ((b * p.out_frames + slot) * p.hw + tok) * p.c;
    for (var k = li; k < p.c; k += WG) {
        dst[dst_off + k] = (src[src_off + k] - mean) * rstd * wts[p.g_off + k] + wts[p.b_off + k];
    }
}
