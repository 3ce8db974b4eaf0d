//! Kernel launchers, one module per kernel family in `shaders/`.
//!
//! Each launcher is a small struct holding its compiled pipeline: `new` (compile/fetch from
//! the cache), `bind` (a [`BindGroupBuilder`](super::buffer::BindGroupBuilder) call naming
//! the buffers) and `record` (shape checks, parameter block, dispatch). The per-kernel tests
//! beside each launcher compare with a small CPU reference on seeded inputs, including sizes
//! not divisible by 4.

pub mod attention;
pub mod layernorm;
pub mod matmul;
pub mod pil_resize;
pub mod resize;
pub mod score;
pub mod select;

#[cfg(test)]
pub(crate) mod testutil {
    use std::sync::OnceLock;

    use crate::gpu::context::GpuContext;

    /// The device shared by all GPU tests (fails, not skips, when there is no adapter).
    pub fn ctx() -> &'static GpuContext {
        static CTX: OnceLock<GpuContext> = OnceLock::new();
        CTX.get_or_init(|| match GpuContext::new() {
            Ok(c) => c,
            Err(e) => panic!("GPU tests need an adapter (lavapipe is enough): {e}"),
        })
    }

    /// SplitMix64: small, seeded, reproducible.
    pub struct Rng(pub u64);

    impl Rng {
        pub fn next_u64(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }
        /// Uniform in [-1, 1).
        pub fn f32(&mut self) -> f32 {
            ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        }
        pub fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
            (0..n).map(|_| self.f32() * scale).collect()
        }
        pub fn below(&mut self, n: u64) -> u64 {
            self.next_u64() % n
        }
    }

    /// Asserts |got - want| <= atol + rtol |want| everywhere, naming the first bad index.
    pub fn assert_close(what: &str, got: &[f32], want: &[f32], atol: f32, rtol: f32) {
        assert_eq!(got.len(), want.len(), "{what}: length");
        let mut worst = 0.0f32;
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            let d = (g - w).abs();
            assert!(
                d <= atol + rtol * w.abs() && g.is_finite() == w.is_finite(),
                "{what}: index {i}: got {g}, want {w} (diff {d})"
            );
            worst = worst.max(d);
        }
        eprintln!("{what}: max abs diff {worst:.3e} over {} values", got.len());
    }
}
