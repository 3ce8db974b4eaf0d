// probe.wgsl: measures the device's own cos/sin at RoPE angles (f32(pos) * inv_freq), to
// compare with f32 libm on the CPU. The model never uses these: it uploads a cos/sin table
// computed on the CPU (see rust/gpu/rope.rs).

struct Params {
    n_pos: u32,
    n_freq: u32,
    pos0: u32,
    _p: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> inv_freq: array<f32>;     // [n_freq]
@group(0) @binding(2) var<storage, read_write> out: array<f32>;    // [n_pos, 2 * n_freq]: cos | sin

@compute @workgroup_size(64)
fn cos_sin(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.x;
    if (i >= p.n_pos * p.n_freq) {
        return;
    }
    let pos = i / p.n_freq;
    let f = i % p.n_freq;
    let angle = f32(p.pos0 + pos) * inv_freq[f];
    out[pos * 2u * p.n_freq + f] = cos(angle);
    out[pos * 2u * p.n_freq + p.n_freq + f] = sin(angle);
}

// Memory probes (profiling only): streaming bandwidth and dependent-load latency.
@group(0) @binding(3) var<storage, read> big: array<u32>;          // [n]
@group(0) @binding(4) var<storage, read_write> sink: array<u32>;   // [n]

@compute @workgroup_size(256)
fn stream(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let i = gid.y * nw.x * 256u + gid.x;
    if (i < arrayLength(&big)) {
        sink[i] = big[i] + 1u;
    }
}

@compute @workgroup_size(1)
fn chase() {
    var j = 0u;
    for (var h = 0u; h < p.n_pos; h++) {
        j = big[j];
    }
    sink[0] = j;
}
