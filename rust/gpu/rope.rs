//! Rotary position embedding tables (llama3-scaled `inv_freq`, cos/sin on the CPU).
//!
//! SPEC §4: `inv_freq` is computed in float32 exactly as transformers does, and the angle is
//! the float32 product `f32(position) * inv_freq`, then cos/sin in float32. Positions reach
//! about 6000, where a GPU's native `cos`/`sin` may be far less accurate than libm (Vulkan
//! only bounds their error inside [-pi, pi]); the engine therefore uploads a table computed
//! here and the kernels only look it up. `probe.wgsl` measures the device's own functions
//! (see the test below).

use crate::config::GazeDecoderConfig;

/// `inv_freq` (head_dim / 2 values) in float32, with llama3 smoothing when configured.
///
/// Follows torch's evaluation: `1.0 / base ** (arange(0, d, 2) / d)`, and `s / t` for a
/// Python scalar `s` is `t.reciprocal() * s`.
pub fn inv_freq(cfg: &GazeDecoderConfig) -> Vec<f32> {
    let d = cfg.head_dim;
    let base = cfg.rope_theta as f32;
    let inv: Vec<f32> = (0..d / 2)
        .map(|i| {
            let e = (2 * i) as f32 / d as f32;
            // Correctly rounded f32 power (what libm's powf gives).
            let pw = (base as f64).powf(e as f64) as f32;
            1.0f32 / pw
        })
        .collect();
    let Some(rs) = &cfg.rope_scaling else {
        return inv;
    };
    if rs.rope_type != "llama3" {
        return inv;
    }
    let factor = rs.factor as f32;
    let old = rs.original_max_position_embeddings as f32;
    let low_wavelen = old / rs.low_freq_factor as f32;
    let high_wavelen = old / rs.high_freq_factor as f32;
    let two_pi = (2.0 * std::f64::consts::PI) as f32;
    inv.iter()
        .map(|&f| {
            let wavelen = (1.0f32 / f) * two_pi;
            let llama = if wavelen > low_wavelen { f / factor } else { f };
            let smooth = ((1.0f32 / wavelen) * old - rs.low_freq_factor as f32)
                / (rs.high_freq_factor as f32 - rs.low_freq_factor as f32);
            let smoothed = (1.0 - smooth) * llama / factor + smooth * llama;
            // torch: ~(wavelen < high) * ~(wavelen > low); wavelen is never NaN here.
            let medium = wavelen >= high_wavelen && wavelen <= low_wavelen;
            if medium { smoothed } else { llama }
        })
        .collect()
}

/// Values in [`cos_sin_table`] for `half` frequencies and `positions` positions (saturating).
pub fn table_len(half: usize, positions: usize) -> usize {
    positions.saturating_mul(2 * half)
}

/// Table [positions, head_dim]: for pair i, `cos` at i and `sin` at head_dim/2 + i, of the
/// angle `f32(pos) * inv_freq[i]`.
pub fn cos_sin_table(inv_freq: &[f32], positions: usize) -> Vec<f32> {
    let h = inv_freq.len();
    let mut t = vec![0.0f32; table_len(h, positions)];
    for pos in 0..positions {
        for (i, f) in inv_freq.iter().enumerate() {
            let a = pos as f32 * f;
            t[pos * 2 * h + i] = a.cos();
            t[pos * 2 * h + h + i] = a.sin();
        }
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::buffer::{BindGroupBuilder, ParamArena, Recorder};
    use crate::gpu::ops::testutil::ctx;
    use crate::gpu::pipeline::PipelineKey;

    fn cfg() -> GazeDecoderConfig {
        let dir = crate::gpu::engine::fixtures_dir().join("model");
        crate::config::AutoGazeConfig::load(&dir.join("config.json"))
            .expect("fixture config")
            .decoder
    }

    #[test]
    fn inv_freq_llama3_values() {
        let f = inv_freq(&cfg());
        assert_eq!(f.len(), 16);
        assert_eq!(f[0], 1.0);
        // High frequencies unchanged, low ones divided by 8, one medium (i = 8) smoothed.
        let plain: Vec<f32> = (0..16)
            .map(|i| 1.0 / (500000f64.powf((2 * i) as f64 / 32.0) as f32))
            .collect();
        for i in 0..8 {
            assert_eq!(f[i], plain[i], "i={i}");
        }
        for i in 9..16 {
            assert_eq!(f[i], plain[i] / 8.0, "i={i}");
        }
        assert!(
            f[8] < plain[8] && f[8] > plain[8] / 8.0,
            "medium frequency smoothed"
        );
    }

    /// Measures the device's cos/sin against libm at positions around 6000 (the model does
    /// not depend on it: it uses the CPU table). Reported, not asserted beyond sanity.
    #[test]
    fn device_cos_sin_accuracy_probe() {
        let ctx = ctx();
        let inv = inv_freq(&cfg());
        let (pos0, n_pos) = (5800usize, 400usize);
        let kernel = ctx.kernel(&PipelineKey::new("probe", "cos_sin")).unwrap();
        let ib = ctx.storage_init("inv", &inv).unwrap();
        let ob = ctx.storage("out", (n_pos * 32 * 4) as u64).unwrap();
        let mut arena = ParamArena::new(ctx, 2).unwrap();
        let dummy = ctx.storage("dummy", 16).unwrap();
        let dummy2 = ctx.storage("dummy2", 16).unwrap();
        let bg = BindGroupBuilder::new(ctx, &kernel, &arena)
            .bind(1, &ib)
            .bind(2, &ob)
            .bind(3, &dummy)
            .bind(4, &dummy2)
            .build()
            .unwrap();
        let mut rec = Recorder::new(ctx, &mut arena);
        let p: [u32; 4] = [n_pos as u32, 16, pos0 as u32, 0];
        rec.dispatch(&kernel, &bg, &p, [((n_pos * 16) as u32).div_ceil(64), 1, 1])
            .unwrap();
        rec.submit(ctx).unwrap();
        let got = ctx.read_f32(&ob, 0, n_pos * 32).unwrap();
        let table = cos_sin_table(&inv, pos0 + n_pos);
        let want = &table[pos0 * 32..];
        let worst = got
            .iter()
            .zip(want)
            .map(|(g, w)| (g - w).abs())
            .fold(0.0f32, f32::max);
        eprintln!(
            "device cos/sin vs f32 libm at positions {pos0}..{}: max abs diff {worst:.3e} ({})",
            pos0 + n_pos,
            ctx.info.name
        );
        assert!(got.iter().all(|v| v.is_finite() && v.abs() <= 1.0001));
    }
}

/// Memory probes on the device (profiling aid): `-- --ignored bench_memory --nocapture`.
#[cfg(test)]
mod bench {
    use crate::gpu::buffer::{BindGroupBuilder, ParamArena, Recorder};
    use crate::gpu::ops::testutil::ctx;
    use crate::gpu::pipeline::PipelineKey;

    #[test]
    #[ignore]
    fn bench_memory() {
        let ctx = ctx();
        let n = 32usize << 20; // 128 MiB of u32
        let n = n.min((ctx.max_binding() / 4) as usize / 2);
        // A random-ish cycle for the pointer chase (stride of ~1 MiB + 4 KiB).
        let stride = (1usize << 18) + 1024 + 7;
        let big: Vec<u32> = (0..n).map(|i| ((i + stride) % n) as u32).collect();
        let bb = ctx.storage_init("big", &big).unwrap();
        let sink = ctx.storage("sink", (n * 4) as u64).unwrap();
        let inv = ctx.storage("inv", 16).unwrap();
        let outb = ctx.storage("out", 16).unwrap();
        for (entry, groups, hops) in [
            (
                "stream",
                [
                    ((n / 256) as u32).min(65535),
                    ((n / 256) as u32).div_ceil(65535),
                    1,
                ],
                0u32,
            ),
            ("chase", [1, 1, 1], 20000u32),
        ] {
            let kernel = ctx.kernel(&PipelineKey::new("probe", entry)).unwrap();
            let mut arena = ParamArena::new(ctx, 2).unwrap();
            let bg = BindGroupBuilder::new(ctx, &kernel, &arena)
                .bind(1, &inv)
                .bind(2, &outb)
                .bind(3, &bb)
                .bind(4, &sink)
                .build()
                .unwrap();
            let mut best = f64::MAX;
            for _ in 0..4 {
                let t0 = std::time::Instant::now();
                let mut rec = Recorder::new(ctx, &mut arena);
                let p: [u32; 4] = [hops, 16, 0, 0];
                for _ in 0..5 {
                    rec.dispatch(&kernel, &bg, &p, groups).unwrap();
                }
                rec.submit(ctx).unwrap();
                ctx.wait().unwrap();
                best = best.min(t0.elapsed().as_secs_f64() / 5.0);
            }
            if entry == "stream" {
                eprintln!(
                    "stream: {:.1} GB/s (read + write of {} MiB)",
                    (8 * n) as f64 / best / 1e9,
                    (n * 4) >> 20
                );
            } else {
                eprintln!(
                    "chase: {:.0} ns per dependent load",
                    best * 1e9 / hops as f64
                );
            }
        }
    }
}
