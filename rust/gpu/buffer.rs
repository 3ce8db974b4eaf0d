//! Buffers, per-dispatch parameter blocks, bind groups and command recording.
//!
//! * Storage buffers are created through [`GpuContext::storage`] and friends, which check
//!   the adapter's binding limits and round sizes up.
//! * Every kernel's first binding is a small uniform parameter block. All blocks of one call
//!   live in one [`ParamArena`] buffer and are selected with a dynamic offset, so bind groups
//!   do not depend on parameters and can be built once and reused. Identical blocks are
//!   stored once.
//! * [`BindGroupBuilder`] binds buffers by index (`.bind(1, &w).bind(2, &b).build()`) and
//!   checks the set against the bindings the kernel declares.
//! * [`Recorder`] wraps a compute pass and counts dispatches.

use std::collections::HashMap;

use bytemuck::Pod;
use wgpu::util::DeviceExt;

use crate::error::{Error, Result};

use super::context::GpuContext;
use super::pipeline::{BindingKind, Kernel};

/// Size reserved for one parameter block (every params struct is at most this big).
pub const PARAMS_BLOCK: u64 = 256;

/// The size a buffer of `bytes` requested bytes is created with (every creation below and
/// the engine's memory estimates use it).
pub(crate) fn round_size(bytes: u64) -> u64 {
    bytes.max(16).div_ceil(16) * 16
}

impl GpuContext {
    /// Refuses a storage buffer larger than the adapter's largest binding.
    pub(crate) fn check_size(&self, label: &str, bytes: u64) -> Result<()> {
        if bytes > self.max_binding() {
            return Err(Error::Device(format!(
                "buffer `{label}` needs {bytes} bytes, more than this adapter's largest storage \
                 binding ({} bytes, {}); use a smaller batch or fewer frames per call",
                self.max_binding(),
                self.info.name
            )));
        }
        Ok(())
    }

    /// An uninitialised (zeroed) storage buffer of at least `bytes` bytes.
    pub fn storage(&self, label: &str, bytes: u64) -> Result<wgpu::Buffer> {
        let size = round_size(bytes);
        self.check_size(label, size)?;
        self.count_allocation(size);
        self.scoped(&format!("allocating `{label}`"), || {
            Ok(self.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some(label),
                size,
                usage: wgpu::BufferUsages::STORAGE
                    | wgpu::BufferUsages::COPY_DST
                    | wgpu::BufferUsages::COPY_SRC,
                mapped_at_creation: false,
            }))
        })
    }

    /// A storage buffer holding `data` (padded with zeros to a multiple of 16 bytes).
    pub fn storage_init<T: Pod>(&self, label: &str, data: &[T]) -> Result<wgpu::Buffer> {
        let mut bytes = bytemuck::cast_slice::<T, u8>(data).to_vec();
        bytes.resize(round_size(bytes.len() as u64) as usize, 0);
        self.check_size(label, bytes.len() as u64)?;
        self.count_allocation(bytes.len() as u64);
        self.scoped(&format!("uploading `{label}`"), || {
            Ok(self
                .device
                .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                    label: Some(label),
                    contents: &bytes,
                    usage: wgpu::BufferUsages::STORAGE
                        | wgpu::BufferUsages::COPY_DST
                        | wgpu::BufferUsages::COPY_SRC,
                }))
        })
    }

    /// A MAP_READ buffer for readbacks.
    pub fn staging(&self, label: &str, bytes: u64) -> Result<wgpu::Buffer> {
        let size = round_size(bytes);
        self.count_allocation(size);
        self.scoped(&format!("allocating `{label}`"), || {
            Ok(self.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some(label),
                size,
                usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            }))
        })
    }

    /// Copies `bytes` bytes at `offset` of `src` back to the CPU (one submit, one wait).
    pub fn read_buffer(&self, src: &wgpu::Buffer, offset: u64, bytes: u64) -> Result<Vec<u8>> {
        let bytes4 = bytes.div_ceil(4) * 4;
        let staging = self.staging("readback", bytes4)?;
        self.scoped("reading a buffer back", || {
            let mut enc = self
                .device
                .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: None });
            enc.copy_buffer_to_buffer(src, offset, &staging, 0, bytes4);
            self.queue.submit([enc.finish()]);
            Ok(())
        })?;
        let mut v = self.read_staging(&staging, bytes4)?;
        v.truncate(bytes as usize);
        Ok(v)
    }

    /// [`read_buffer`](Self::read_buffer) as f32 values.
    pub fn read_f32(&self, src: &wgpu::Buffer, offset_elems: u64, n: usize) -> Result<Vec<f32>> {
        let b = self.read_buffer(src, offset_elems * 4, n as u64 * 4)?;
        Ok(bytemuck::pod_collect_to_vec(&b))
    }

    /// [`read_buffer`](Self::read_buffer) as u32 values.
    pub fn read_u32(&self, src: &wgpu::Buffer, offset_elems: u64, n: usize) -> Result<Vec<u32>> {
        let b = self.read_buffer(src, offset_elems * 4, n as u64 * 4)?;
        Ok(bytemuck::pod_collect_to_vec(&b))
    }

    /// Writes `data` at element offset `offset_elems` of `dst` (queued before the next submit).
    pub fn write<T: Pod>(&self, dst: &wgpu::Buffer, offset_elems: u64, data: &[T]) {
        if !data.is_empty() {
            let off = offset_elems * std::mem::size_of::<T>() as u64;
            let bytes = bytemuck::cast_slice::<T, u8>(data);
            // write_buffer needs a multiple of 4 bytes; all our element types are 4 bytes.
            self.queue.write_buffer(dst, off, bytes);
        }
    }
}

/// One uniform buffer holding every parameter block of a call, addressed by dynamic offsets.
pub struct ParamArena {
    pub buffer: wgpu::Buffer,
    align: u64,
    capacity: u64,
    data: Vec<u8>,
    index: HashMap<Vec<u8>, u32>,
    /// Bytes of `data` already queued for upload (a call may submit in several pieces).
    uploaded: usize,
}

impl ParamArena {
    fn align(ctx: &GpuContext) -> u64 {
        (ctx.limits.min_uniform_buffer_offset_alignment as u64).max(PARAMS_BLOCK)
    }

    /// Bytes of the buffer of an arena for `blocks` blocks (None: more than u64 holds).
    pub fn bytes(ctx: &GpuContext, blocks: usize) -> Option<u64> {
        Self::align(ctx).checked_mul(blocks.max(1) as u64)
    }

    /// An arena for up to `blocks` distinct parameter blocks.
    pub fn new(ctx: &GpuContext, blocks: usize) -> Result<Self> {
        let align = Self::align(ctx);
        let capacity = Self::bytes(ctx, blocks).ok_or_else(|| {
            Error::Device(format!("a parameter arena of {blocks} blocks is too large"))
        })?;
        ctx.count_allocation(capacity);
        let buffer = ctx.scoped("allocating the parameter arena", || {
            Ok(ctx.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("params"),
                size: capacity,
                usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            }))
        })?;
        Ok(Self {
            buffer,
            align,
            capacity,
            data: Vec::new(),
            index: HashMap::new(),
            uploaded: 0,
        })
    }

    /// Forgets all blocks (start of a new call).
    pub fn clear(&mut self) {
        self.data.clear();
        self.index.clear();
        self.uploaded = 0;
    }

    /// Stores a block (or finds an identical one) and returns its dynamic offset.
    pub fn push<P: Pod>(&mut self, params: &P) -> Result<u32> {
        let bytes = bytemuck::bytes_of(params);
        if bytes.len() as u64 > PARAMS_BLOCK {
            return Err(Error::Backend(format!(
                "parameter block of {} bytes exceeds {PARAMS_BLOCK}",
                bytes.len()
            )));
        }
        if let Some(off) = self.index.get(bytes) {
            return Ok(*off);
        }
        let off = self.data.len() as u64;
        if off + self.align > self.capacity {
            return Err(Error::Backend(
                "parameter arena is full (internal sizing error)".into(),
            ));
        }
        self.data.extend_from_slice(bytes);
        self.data.resize((off + self.align) as usize, 0);
        self.index.insert(bytes.to_vec(), off as u32);
        Ok(off as u32)
    }

    /// Queues the blocks added since the last upload (call before submitting the recorded
    /// commands). Earlier blocks stay where they are: submits already queued read them.
    pub fn upload(&mut self, ctx: &GpuContext) {
        if self.data.len() > self.uploaded {
            ctx.queue.write_buffer(
                &self.buffer,
                self.uploaded as u64,
                &self.data[self.uploaded..],
            );
            self.uploaded = self.data.len();
        }
    }
}

/// Builds a bind group for a kernel: `.bind(1, &a).bind(2, &b).build()`.
pub struct BindGroupBuilder<'a> {
    ctx: &'a GpuContext,
    kernel: &'a Kernel,
    params: &'a wgpu::Buffer,
    entries: Vec<(u32, wgpu::BufferBinding<'a>)>,
}

impl<'a> BindGroupBuilder<'a> {
    pub fn new(ctx: &'a GpuContext, kernel: &'a Kernel, arena: &'a ParamArena) -> Self {
        Self {
            ctx,
            kernel,
            params: &arena.buffer,
            entries: Vec::new(),
        }
    }

    /// Binds a whole buffer at `binding`.
    pub fn bind(mut self, binding: u32, buffer: &'a wgpu::Buffer) -> Self {
        self.entries.push((
            binding,
            wgpu::BufferBinding {
                buffer,
                offset: 0,
                size: None,
            },
        ));
        self
    }

    pub fn build(self) -> Result<wgpu::BindGroup> {
        let mut entries = Vec::new();
        for (n, kind) in &self.kernel.bindings {
            if *kind == BindingKind::Params {
                entries.push(wgpu::BindGroupEntry {
                    binding: *n,
                    resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                        buffer: self.params,
                        offset: 0,
                        size: std::num::NonZeroU64::new(PARAMS_BLOCK),
                    }),
                });
                continue;
            }
            let b = self.entries.iter().find(|(m, _)| m == n).ok_or_else(|| {
                Error::Backend(format!(
                    "kernel {}::{} binding {n} not bound",
                    self.kernel.key.shader, self.kernel.key.entry
                ))
            })?;
            entries.push(wgpu::BindGroupEntry {
                binding: *n,
                resource: wgpu::BindingResource::Buffer(b.1.clone()),
            });
        }
        if let Some((n, _)) = self
            .entries
            .iter()
            .find(|(n, _)| !self.kernel.bindings.iter().any(|(m, _)| m == n))
        {
            return Err(Error::Backend(format!(
                "kernel {}::{} has no binding {n}",
                self.kernel.key.shader, self.kernel.key.entry
            )));
        }
        let ctx = self.ctx;
        let layout = &self.kernel.layout;
        ctx.scoped("creating a bind group", || {
            Ok(ctx.device.create_bind_group(&wgpu::BindGroupDescriptor {
                label: Some(self.kernel.key.entry),
                layout,
                entries: &entries,
            }))
        })
    }
}

/// GPU time of one kernel (pipeline + defines) over a profiled call.
#[derive(Debug, Clone, PartialEq)]
pub struct KernelTime {
    /// `shader::entry` and its defines.
    pub kernel: String,
    pub dispatches: usize,
    /// Sum of the dispatches' GPU times, microseconds.
    pub total_us: f64,
}

/// Timestamp queries around every dispatch (needs `TIMESTAMP_QUERY_INSIDE_PASSES`). A
/// dispatch's time is the gap between the timestamp written before it and the one after,
/// so it includes the barrier wgpu inserts before it, as the real command stream does.
struct Profiler {
    device: wgpu::Device,
    sets: Vec<wgpu::QuerySet>,
    /// One per timestamp: None at a pass start, else the kernel that just ran.
    labels: Vec<Option<String>>,
}

impl Profiler {
    const PER_SET: u32 = wgpu::QUERY_SET_MAX_QUERIES;

    fn stamp(&mut self, pass: &mut wgpu::ComputePass<'static>, label: Option<String>) {
        let i = self.labels.len() as u32;
        let set = (i / Self::PER_SET) as usize;
        if set == self.sets.len() {
            self.sets
                .push(self.device.create_query_set(&wgpu::QuerySetDescriptor {
                    label: Some("profiler timestamps"),
                    ty: wgpu::QueryType::Timestamp,
                    count: Self::PER_SET,
                }));
        }
        pass.write_timestamp(&self.sets[set], i % Self::PER_SET);
        self.labels.push(label);
    }
}

/// Commands being recorded: compute dispatches (in one pass until a copy or clear splits
/// it), with the parameter arena and a dispatch counter.
pub struct Recorder<'a> {
    // Field order matters: the pass must end (drop) before the encoder.
    pass: Option<wgpu::ComputePass<'static>>,
    encoder: wgpu::CommandEncoder,
    pub arena: &'a mut ParamArena,
    pub dispatches: usize,
    pub passes: usize,
    max_groups: u32,
    profiler: Option<Profiler>,
}

impl<'a> Recorder<'a> {
    pub fn new(ctx: &GpuContext, arena: &'a mut ParamArena) -> Self {
        arena.clear();
        Self::resume(ctx, arena)
    }

    /// A recorder for the next piece of the same call: the arena keeps the blocks the
    /// earlier pieces' commands use.
    pub fn resume(ctx: &GpuContext, arena: &'a mut ParamArena) -> Self {
        let encoder = ctx
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: None });
        Self {
            encoder,
            pass: None,
            arena,
            dispatches: 0,
            passes: 0,
            max_groups: ctx.limits.max_compute_workgroups_per_dimension,
            profiler: None,
        }
    }

    /// [`resume`](Self::resume) with every dispatch timed by timestamp queries (see
    /// [`Profiler`]); read the times with [`Recorder::submit_profiled`].
    pub fn profiled(ctx: &GpuContext, arena: &'a mut ParamArena) -> Result<Self> {
        if !ctx.info.timestamp_inside_passes {
            return Err(Error::Device(format!(
                "{} has no timestamp queries inside passes: kernel profiling needs them",
                ctx.info.name
            )));
        }
        let mut r = Self::resume(ctx, arena);
        r.profiler = Some(Profiler {
            device: ctx.device.clone(),
            sets: Vec::new(),
            labels: Vec::new(),
        });
        Ok(r)
    }

    fn pass(&mut self) -> &mut wgpu::ComputePass<'static> {
        let encoder = &mut self.encoder;
        let passes = &mut self.passes;
        let profiler = &mut self.profiler;
        self.pass.get_or_insert_with(|| {
            *passes += 1;
            let mut pass = encoder
                .begin_compute_pass(&wgpu::ComputePassDescriptor {
                    label: Some("autogaze"),
                    timestamp_writes: None,
                })
                .forget_lifetime();
            if let Some(p) = profiler {
                p.stamp(&mut pass, None);
            }
            pass
        })
    }

    /// Records one dispatch of `kernel` with its bind group and parameter block.
    pub fn dispatch<P: Pod>(
        &mut self,
        kernel: &Kernel,
        bind_group: &wgpu::BindGroup,
        params: &P,
        groups: [u32; 3],
    ) -> Result<()> {
        if groups.contains(&0) {
            return Ok(());
        }
        if groups.iter().any(|g| *g > self.max_groups) {
            return Err(Error::Device(format!(
                "{}::{} needs {:?} workgroups, more than this adapter allows per dimension ({})",
                kernel.key.shader, kernel.key.entry, groups, self.max_groups
            )));
        }
        let off = self.arena.push(params)?;
        let pass = self.pass();
        pass.set_pipeline(&kernel.pipeline);
        pass.set_bind_group(0, bind_group, &[off]);
        pass.dispatch_workgroups(groups[0], groups[1], groups[2]);
        self.dispatches += 1;
        if let (Some(p), Some(pass)) = (self.profiler.as_mut(), self.pass.as_mut()) {
            let k = &kernel.key;
            let defs: Vec<String> = k.defines.iter().map(|(n, v)| format!("{n}={v}")).collect();
            p.stamp(
                pass,
                Some(format!("{}::{} {}", k.shader, k.entry, defs.join(","))),
            );
        }
        Ok(())
    }

    /// The encoder, for copies and clears (ends the current compute pass).
    pub fn encoder(&mut self) -> &mut wgpu::CommandEncoder {
        self.pass = None;
        &mut self.encoder
    }

    /// Ends recording: uploads the parameter blocks and submits (inside error scopes).
    pub fn submit(mut self, ctx: &GpuContext) -> Result<()> {
        self.pass = None;
        let Recorder { encoder, arena, .. } = self;
        ctx.scoped("submitting GPU commands", || {
            arena.upload(ctx);
            ctx.queue.submit([encoder.finish()]);
            Ok(())
        })
    }

    /// [`submit`](Self::submit) for a [`profiled`](Self::profiled) recorder: waits for the
    /// GPU and returns each kernel's dispatch count and summed GPU time, slowest first.
    pub fn submit_profiled(mut self, ctx: &GpuContext) -> Result<Vec<KernelTime>> {
        self.pass = None;
        let Some(p) = self.profiler.take() else {
            self.submit(ctx)?;
            return Ok(Vec::new());
        };
        let n = p.labels.len() as u64;
        let bytes = (n * 8).max(8);
        ctx.count_allocation(bytes);
        let resolve = ctx.scoped("allocating profiler buffers", || {
            Ok(ctx.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("profiler resolve"),
                size: bytes,
                usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
                mapped_at_creation: false,
            }))
        })?;
        let staging = ctx.staging("profiler readback", bytes)?;
        for (s, set) in p.sets.iter().enumerate() {
            let first = s as u64 * Profiler::PER_SET as u64;
            let count = (n - first).min(Profiler::PER_SET as u64) as u32;
            self.encoder
                .resolve_query_set(set, 0..count, &resolve, first * 8);
        }
        self.encoder
            .copy_buffer_to_buffer(&resolve, 0, &staging, 0, bytes);
        self.submit(ctx)?;
        let ticks: Vec<u64> = bytemuck::pod_collect_to_vec(&ctx.read_staging(&staging, bytes)?);
        let ns_per_tick = ctx.queue.get_timestamp_period() as f64;
        let mut by_kernel: Vec<KernelTime> = Vec::new();
        for (i, label) in p.labels.iter().enumerate() {
            // The previous stamp is in the same pass (each pass starts with an unlabelled one).
            let (Some(label), Some(t0), Some(t1)) = (
                label,
                i.checked_sub(1).and_then(|j| ticks.get(j)),
                ticks.get(i),
            ) else {
                continue;
            };
            let dt = t1.saturating_sub(*t0) as f64 * ns_per_tick / 1e3;
            match by_kernel.iter_mut().find(|k| &k.kernel == label) {
                Some(k) => {
                    k.dispatches += 1;
                    k.total_us += dt;
                }
                None => by_kernel.push(KernelTime {
                    kernel: label.clone(),
                    dispatches: 1,
                    total_us: dt,
                }),
            }
        }
        by_kernel.sort_by(|a, b| b.total_us.total_cmp(&a.total_us));
        Ok(by_kernel)
    }
}
