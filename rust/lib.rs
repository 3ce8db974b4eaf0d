//! autogaze-wgpu: NVIDIA AutoGaze inference on wgpu.
//!
//! The engine (config/weight loading, WGSL kernels, generation) is plain Rust; the PyO3
//! bindings live in [`python`] behind the `python` cargo feature, so `cargo test` needs no
//! Python.

pub mod config;
pub mod error;
pub mod gpu;
pub mod weights;

#[cfg(test)]
mod fuzz;

#[cfg(feature = "python")]
mod python;

pub use error::{Error, Result};
