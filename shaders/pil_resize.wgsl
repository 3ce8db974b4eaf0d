// pil_resize.wgsl: the processor's uint8 resize (SPEC §2.1), one axis of PIL's 8-bit
// separable resampling (libImaging/Resample.c), bit for bit; with DST == f32 also the
// rescale + normalisation into the model's float32 pixel values.
//
// PIL resamples horizontally, then vertically, rounding to uint8 in between. For output
// index o along the axis the coefficients row holds [xmin, count, k_0 .. k_{taps-1}]: PIL's
// triangle-filter weights (support scaled when shrinking, i.e. antialiased) normalised to sum
// 1 and converted to fixed point with 22 fractional bits, computed on the CPU in float64
// exactly as PIL does. The sum is PIL's integer one: 2^21 + sum(v * k) >> 22, clamped to
// 0..255. Integer arithmetic, so no rounding differs across GPUs.
//
// Defines: AXIS x | y (the resampled axis); SRC u8 (packed RGB bytes, 4 per word, each frame
// starting on a word) | u32 (one value per word, the other pass's output); DST u32 (one value
// per word, [F, H, W, 3]) | f32 (pixel values [F, 3, H, W] through the 256-entry per-channel
// table of the processor's float steps).

struct Params {
    in_h: u32,
    in_w: u32,
    out_h: u32,
    out_w: u32,
    frames: u32,
    taps: u32,
    frame_words: u32, // SRC u8: words per source frame
    _pad: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> src: array<u32>;     // u8: [F][frame_words]; u32: [F, in_h, in_w, 3]
@group(0) @binding(2) var<storage, read> coef: array<i32>;    // [out size along AXIS, 2 + taps]
#if DST == f32
@group(0) @binding(3) var<storage, read> lut: array<f32>;     // [3, 256]
@group(0) @binding(4) var<storage, read_write> dst: array<f32>;  // [F, 3, out_h, out_w]
#else
@group(0) @binding(4) var<storage, read_write> dst: array<u32>;  // [F, out_h, out_w, 3]
#endif

fn src_at(f: u32, y: u32, x: u32, c: u32) -> i32 {
    let i = (y * p.in_w + x) * 3u + c;
#if SRC == u8
    let word = src[f * p.frame_words + i / 4u];
    return i32((word >> ((i % 4u) * 8u)) & 0xffu);
#else
    return i32(src[f * p.in_h * p.in_w * 3u + i]);
#endif
}

@compute @workgroup_size(16, 16, 1)
fn resample(@builtin(global_invocation_id) gid: vec3<u32>) {
    let x = gid.x;
    let y = gid.y;
    let f = gid.z;
    if (x >= p.out_w || y >= p.out_h || f >= p.frames) {
        return;
    }
#if AXIS == x
    let row = x * (2u + p.taps);
#else
    let row = y * (2u + p.taps);
#endif
    let lo = u32(coef[row]);
    let count = u32(coef[row + 1u]);
    for (var c = 0u; c < 3u; c++) {
        var ss = 1 << 21u;
        for (var j = 0u; j < count; j++) {
#if AXIS == x
            let v = src_at(f, y, lo + j, c);
#else
            let v = src_at(f, lo + j, x, c);
#endif
            ss += v * coef[row + 2u + j];
        }
        let v = u32(clamp(ss >> 22u, 0, 255));
#if DST == f32
        dst[((f * 3u + c) * p.out_h + y) * p.out_w + x] = lut[c * 256u + v];
#else
        dst[((f * p.out_h + y) * p.out_w + x) * 3u + c] = v;
#endif
    }
}
