// resize.wgsl: torch F.interpolate(mode="bicubic", align_corners=False) without antialias.
//
// src_x = scale * (x + 0.5) - 0.5 with scale = in / out; index = min(floor(src_x), in - 1),
// t = clamp(src_x - index, 0, 1); taps index-1..index+2 clamped to the border; A = -0.75.
// Rows are combined as torch's CPU kernel does: sum_j wy_j * (sum_i wx_i * src[y_j][x_i]).

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

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> src: array<f32>;        // [planes, h_in, w_in]
@group(0) @binding(2) var<storage, read_write> dst: array<f32>;  // [planes, h_out, w_out]

fn source_index(scale: f32, i: u32, size: u32) -> vec2<f32> {
    let real = scale * (f32(i) + 0.5) - 0.5;
    let idx = min(floor(real), f32(size) - 1.0);
    let t = clamp(real - idx, 0.0, 1.0);
    return vec2<f32>(idx, t);
}

@compute @workgroup_size(16, 16, 1)
fn bicubic(@builtin(global_invocation_id) gid: vec3<u32>) {
    let x = gid.x;
    let y = gid.y;
    let plane = gid.z;
    if (x >= p.w_out || y >= p.h_out || plane >= p.planes) {
        return;
    }
    let sx = source_index(p.scale_w, x, p.w_in);
    let sy = source_index(p.scale_h, y, p.h_in);
    let wx = cubic_coeffs(sx.y);
    let wy = cubic_coeffs(sy.y);
    let ix = i32(sx.x);
    let iy = i32(sy.x);
    let base = plane * p.h_in * p.w_in;
    var xs: array<u32, 4>;
    for (var i = 0; i < 4; i++) {
        xs[i] = u32(clamp(ix - 1 + i, 0, i32(p.w_in) - 1));
    }
    var out = 0.0;
    for (var j = 0; j < 4; j++) {
        let yy = u32(clamp(iy - 1 + j, 0, i32(p.h_in) - 1));
        let row = base + yy * p.w_in;
        var t = src[row + xs[0]] * wx[0];
        t += src[row + xs[1]] * wx[1];
        t += src[row + xs[2]] * wx[2];
        t += src[row + xs[3]] * wx[3];
        if (j == 0) {
            out = t * wy[0];
        } else {
            out += t * wy[j];
        }
    }
    dst[(plane * p.h_out + y) * p.w_out + x] = out;
}
