//! The wgpu backend: the whole AutoGaze model as WGSL compute shaders.
//!
//! * [`context`]: adapter/device creation, limits, error capture, readback.
//! * [`pipeline`]: shader sources, the define mechanism, cached pipelines.
//! * [`buffer`]: buffers, parameter arena, bind groups, command recording.
//! * [`ops`]: one launcher per kernel family, with per-kernel tests.
//! * [`engine`]: weights on the GPU, workspaces, `embed`, `generate`, `score`, streaming
//!   sessions, GPU preprocessing of uint8 frames.

pub mod buffer;
pub mod context;
pub mod engine;
#[cfg(test)]
mod memory_tests;
pub mod ops;
#[cfg(test)]
mod parity;
pub mod pipeline;
pub mod rope;

pub use buffer::KernelTime;
pub use context::{DeviceInfo, DeviceMemory, GpuContext};
pub use engine::{
    Engine, FrameShape, Frames, GenerateOutput, GenerateParams, MemoryAvailable, MemoryEstimate,
    Session, StepOutput,
};
