//! The GPU device: adapter/device creation, limits, error capture, submit and readback.
//!
//! One [`GpuContext`] owns the wgpu device and queue, the pipeline cache and the
//! device-lost/uncaptured-error state. Every fallible GPU operation of the crate goes through
//! it so that wgpu errors (validation, out of memory, device lost) become [`Error`] values
//! instead of panics: resource creation and command recording run inside error scopes
//! ([`GpuContext::scoped`]), and an uncaptured-error handler plus a device-lost callback
//! record anything that escapes them.

use std::sync::{Arc, Mutex};

use crate::error::{Error, Result};

use super::pipeline::PipelineCache;

/// Adapter facts the engine plans with (all queried, never assumed).
#[derive(Debug, Clone)]
pub struct DeviceInfo {
    pub name: String,
    pub backend: String,
    pub device_type: String,
    pub driver: String,
    /// Smallest subgroup size the adapter reports (8 on lavapipe, 32 on NVIDIA).
    pub subgroup_min_size: u32,
    pub subgroup_max_size: u32,
    /// Whether the device was created with `SHADER_F16` / `SUBGROUP` (not used by the f32
    /// kernels; reported for optional fast paths).
    pub shader_f16: bool,
    pub subgroups: bool,
    pub timestamp_query: bool,
    /// Timestamps between dispatches of one pass (native only; used by the kernel profiler).
    pub timestamp_inside_passes: bool,
}

/// Shared, thread-safe record of errors wgpu reports outside an error scope and of device loss.
#[derive(Default)]
struct Health {
    lost: Option<String>,
    uncaptured: Option<String>,
}

/// The wgpu device plus everything needed to run kernels on it.
pub struct GpuContext {
    pub device: wgpu::Device,
    pub queue: wgpu::Queue,
    pub limits: wgpu::Limits,
    pub info: DeviceInfo,
    pub(crate) pipelines: PipelineCache,
    health: Arc<Mutex<Health>>,
    /// Fault injection for tests: the next allocation reports out of memory.
    fail_next_allocation: std::sync::atomic::AtomicBool,
    /// Bytes of every buffer created on this device so far (never decreases): the tests
    /// compare it with the engine's memory estimates.
    allocated: std::sync::atomic::AtomicU64,
    /// Fault injection for tests: free device memory to report instead of the driver's
    /// (u64::MAX: none).
    simulated_free: std::sync::atomic::AtomicU64,
}

/// How much memory the device can still give, as far as the backend tells.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceMemory {
    /// Size of the largest device-local heap (None: the backend does not say).
    pub heap_size: Option<u64>,
    /// Its budget minus what is in use (VK_EXT_memory_budget: every process's allocations,
    /// this one's included), when the driver reports it.
    pub free: Option<u64>,
    /// Where the numbers come from, or why there are none.
    pub source: String,
}

impl std::fmt::Debug for GpuContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuContext")
            .field("info", &self.info)
            .finish()
    }
}

/// How long a readback's map callback may lag the poll that completed its work.
const READBACK_GRACE: std::time::Duration = std::time::Duration::from_secs(30);

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding this lock cannot leave `Health` inconsistent: recover the guard.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl GpuContext {
    /// Creates a device on the best adapter (high-performance preference).
    ///
    /// The device is requested with the adapter's own limits (so storage bindings may be as
    /// large as the hardware allows) and with `SHADER_F16`, `SUBGROUP` and `TIMESTAMP_QUERY`
    /// (+ `TIMESTAMP_QUERY_INSIDE_PASSES`, for the profiler) when the adapter has them; no
    /// kernel requires them.
    pub fn new() -> Result<Self> {
        let mut desc = wgpu::InstanceDescriptor::new_without_display_handle_from_env();
        // Our indirect-free command streams need no indirect-call validation; keep the
        // environment's choice otherwise.
        desc.flags
            .remove(wgpu::InstanceFlags::VALIDATION_INDIRECT_CALL);
        let instance = wgpu::Instance::new(desc);
        let adapter = pollster::block_on(instance.request_adapter(&wgpu::RequestAdapterOptions {
            power_preference: wgpu::PowerPreference::HighPerformance,
            force_fallback_adapter: false,
            compatible_surface: None,
            apply_limit_buckets: false,
        }))
        .map_err(|e| {
            Error::Device(format!(
                "no GPU adapter found ({e}); install a Vulkan, Metal or DX12 driver \
                 (on Linux without a GPU: mesa-vulkan-drivers for lavapipe)"
            ))
        })?;
        Self::from_adapter(adapter)
    }

    /// Creates the device on a given adapter.
    pub fn from_adapter(adapter: wgpu::Adapter) -> Result<Self> {
        let ainfo = adapter.get_info();
        let afeat = adapter.features();
        let wanted = wgpu::Features::SHADER_F16
            | wgpu::Features::SUBGROUP
            | wgpu::Features::TIMESTAMP_QUERY
            | wgpu::Features::TIMESTAMP_QUERY_INSIDE_PASSES;
        let features = afeat & wanted;
        let limits = adapter.limits();
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("autogaze"),
            required_features: features,
            required_limits: limits.clone(),
            experimental_features: wgpu::ExperimentalFeatures::disabled(),
            memory_hints: wgpu::MemoryHints::Performance,
            trace: wgpu::Trace::Off,
        }))
        .map_err(|e| Error::Device(format!("cannot create a device on {}: {e}", ainfo.name)))?;

        let health = Arc::new(Mutex::new(Health::default()));
        {
            let h = health.clone();
            device.set_device_lost_callback(move |reason, msg| {
                if reason != wgpu::DeviceLostReason::Destroyed {
                    lock(&h).lost = Some(format!("GPU device lost ({reason:?}): {msg}"));
                }
            });
            let h = health.clone();
            device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
                let mut g = lock(&h);
                if g.uncaptured.is_none() {
                    g.uncaptured = Some(e.to_string());
                }
            }));
        }
        let limits = device.limits();
        let info = DeviceInfo {
            name: ainfo.name.clone(),
            backend: format!("{:?}", ainfo.backend),
            device_type: format!("{:?}", ainfo.device_type),
            driver: format!("{} {}", ainfo.driver, ainfo.driver_info),
            subgroup_min_size: ainfo.subgroup_min_size,
            subgroup_max_size: ainfo.subgroup_max_size,
            shader_f16: features.contains(wgpu::Features::SHADER_F16),
            subgroups: features.contains(wgpu::Features::SUBGROUP),
            timestamp_query: features.contains(wgpu::Features::TIMESTAMP_QUERY),
            timestamp_inside_passes: features.contains(
                wgpu::Features::TIMESTAMP_QUERY | wgpu::Features::TIMESTAMP_QUERY_INSIDE_PASSES,
            ),
        };
        Ok(Self {
            device,
            queue,
            limits,
            info,
            pipelines: PipelineCache::default(),
            health,
            fail_next_allocation: std::sync::atomic::AtomicBool::new(false),
            allocated: std::sync::atomic::AtomicU64::new(0),
            simulated_free: std::sync::atomic::AtomicU64::new(u64::MAX),
        })
    }

    /// Counts a created buffer of `bytes` (see [`GpuContext::allocated_bytes`]).
    pub(crate) fn count_allocation(&self, bytes: u64) {
        self.allocated
            .fetch_add(bytes, std::sync::atomic::Ordering::Relaxed);
    }

    /// Bytes of all buffers created on this device so far (freed ones included).
    pub fn allocated_bytes(&self) -> u64 {
        self.allocated.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The device-local memory the adapter reports. On Vulkan: the largest `DEVICE_LOCAL`
    /// heap and, when the device enabled VK_EXT_memory_budget (wgpu enables it where the
    /// driver has it), that heap's budget minus its usage. Other backends (Metal, DX12, GL)
    /// expose no memory size through wgpu: both are None.
    pub fn device_memory(&self) -> DeviceMemory {
        let sim = self
            .simulated_free
            .load(std::sync::atomic::Ordering::Relaxed);
        if sim != u64::MAX {
            return DeviceMemory {
                heap_size: Some(sim),
                free: Some(sim),
                source: "simulated".into(),
            };
        }
        #[cfg(any(
            windows,
            target_os = "linux",
            target_os = "android",
            target_os = "freebsd"
        ))]
        if let Some(m) = self.vulkan_memory() {
            return m;
        }
        DeviceMemory {
            heap_size: None,
            free: None,
            source: format!(
                "the {} backend reports no memory size through wgpu",
                self.info.backend
            ),
        }
    }

    /// [`GpuContext::device_memory`] through wgpu's hal access to the Vulkan device (None
    /// when the device is not a Vulkan one).
    #[cfg(any(
        windows,
        target_os = "linux",
        target_os = "android",
        target_os = "freebsd"
    ))]
    fn vulkan_memory(&self) -> Option<DeviceMemory> {
        use ash::vk;
        // SAFETY: only read-only queries of the physical device are made through the raw
        // handles; nothing wgpu owns is created, changed or destroyed.
        let hal = unsafe { self.device.as_hal::<wgpu::hal::api::Vulkan>() }?;
        let phd = hal.raw_physical_device();
        let shared = hal.shared_instance();
        let instance = shared.raw_instance();
        // SAFETY: `phd` is the physical device of this live instance.
        let base = unsafe { instance.get_physical_device_memory_properties(phd) };
        let heaps = base.memory_heaps_as_slice();
        let local: Vec<usize> = (0..heaps.len())
            .filter(|&i| heaps[i].flags.contains(vk::MemoryHeapFlags::DEVICE_LOCAL))
            .collect();
        let largest = local.iter().copied().max_by_key(|&i| heaps[i].size)?;
        // vkGetPhysicalDeviceMemoryProperties2 is Vulkan 1.1 (instance and device), and the
        // budget struct may be chained only when the extension is there.
        let api = unsafe { instance.get_physical_device_properties(phd) }.api_version;
        let budget_ok = shared.instance_api_version() >= vk::API_VERSION_1_1
            && api >= vk::API_VERSION_1_1
            && hal
                .enabled_device_extensions()
                .contains(&ash::ext::memory_budget::NAME);
        let mut free = None;
        if budget_ok {
            let mut budget = vk::PhysicalDeviceMemoryBudgetPropertiesEXT::default();
            let mut props = vk::PhysicalDeviceMemoryProperties2::default().push_next(&mut budget);
            // SAFETY: as above; the instance is Vulkan 1.1, so the entry point is loaded.
            unsafe { instance.get_physical_device_memory_properties2(phd, &mut props) };
            // The largest free amount of any device-local heap (a buffer lives in one heap).
            free = local
                .iter()
                .filter_map(|&i| {
                    let (b, u) = (budget.heap_budget.get(i)?, budget.heap_usage.get(i)?);
                    Some(b.saturating_sub(*u))
                })
                .max();
        }
        Some(DeviceMemory {
            heap_size: Some(heaps[largest].size),
            free,
            source: if free.is_some() {
                "Vulkan VK_EXT_memory_budget".into()
            } else {
                "Vulkan device-local heap size (no VK_EXT_memory_budget)".into()
            },
        })
    }

    /// Fails if the device was lost or an error escaped every error scope.
    pub fn check_health(&self) -> Result<()> {
        let g = lock(&self.health);
        if let Some(m) = &g.lost {
            // Everything on the device (weights, caches) is gone with it.
            return Err(Error::Device(format!(
                "{m}; this model can no longer run on it: load it again"
            )));
        }
        if let Some(m) = &g.uncaptured {
            return Err(Error::Backend(format!("GPU error: {m}")));
        }
        Ok(())
    }

    /// Fault injection for tests: marks the device lost, as the device-lost callback does
    /// after a driver reset or a removed GPU, and destroys it.
    #[doc(hidden)]
    pub fn simulate_device_lost(&self) {
        lock(&self.health).lost = Some("GPU device lost (simulated)".into());
        self.device.destroy();
    }

    /// Fault injection for tests: the next buffer allocation fails as out of GPU memory
    /// would (the same error, raised by [`GpuContext::scoped`]).
    #[doc(hidden)]
    pub fn simulate_oom_on_next_allocation(&self) {
        self.fail_next_allocation
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Fault injection for tests: [`GpuContext::device_memory`] reports `free` bytes free
    /// (None: the driver's numbers again).
    #[doc(hidden)]
    pub fn simulate_free_device_memory(&self, free: Option<u64>) {
        self.simulated_free.store(
            free.unwrap_or(u64::MAX),
            std::sync::atomic::Ordering::Relaxed,
        );
    }

    /// Runs `f` inside out-of-memory and validation error scopes and maps what they catch
    /// (`what` names the operation in the message).
    pub fn scoped<T>(&self, what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
        self.check_health()?;
        let oom = self.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let val = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let out = f();
        let verr = pollster::block_on(val.pop());
        let mut merr = pollster::block_on(oom.pop()).map(|e| e.to_string());
        if what.starts_with("allocating")
            && self
                .fail_next_allocation
                .swap(false, std::sync::atomic::Ordering::SeqCst)
        {
            merr = Some("(simulated)".into());
        }
        if let Some(e) = merr {
            return Err(Error::Device(format!(
                "out of GPU memory while {what}: {e}"
            )));
        }
        if let Some(e) = verr {
            return Err(Error::Backend(format!(
                "GPU validation error while {what}: {e}"
            )));
        }
        self.check_health()?;
        out
    }

    /// Waits for all submitted work.
    pub fn wait(&self) -> Result<()> {
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| Error::Device(format!("waiting for the GPU failed: {e}")))?;
        self.check_health()
    }

    /// Maps `staging` (a MAP_READ buffer) after the submitted work is done and copies
    /// `bytes` bytes out.
    pub fn read_staging(&self, staging: &wgpu::Buffer, bytes: u64) -> Result<Vec<u8>> {
        if bytes == 0 {
            return Ok(Vec::new());
        }
        let (tx, rx) = std::sync::mpsc::channel();
        staging.map_async(wgpu::MapMode::Read, 0..bytes, move |r| {
            // The receiver is gone only if this call already returned an error.
            let _ = tx.send(r);
        });
        self.wait()?;
        // Another thread polling the same device (two models on one GPU, parallel tests)
        // may have collected this callback and be about to run it when our poll returns,
        // so it can arrive a little after `wait`: give it time before calling it lost.
        let deadline = std::time::Instant::now() + READBACK_GRACE;
        let res = loop {
            match rx.recv_timeout(std::time::Duration::from_millis(5)) {
                Ok(r) => break Some(r),
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break None,
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                    if std::time::Instant::now() >= deadline {
                        break None;
                    }
                    self.wait()?;
                }
            }
        };
        match res {
            Some(Ok(())) => {}
            Some(Err(e)) => {
                return Err(Error::Device(format!("reading results back failed: {e}")));
            }
            None => {
                return Err(Error::Device(
                    "reading results back did not complete".into(),
                ));
            }
        }
        let out = {
            let view = staging
                .get_mapped_range(0..bytes)
                .map_err(|e| Error::Backend(format!("mapping the readback buffer failed: {e}")))?;
            view.to_vec()
        };
        staging.unmap();
        Ok(out)
    }

    /// Largest size a single storage binding may have on this device.
    pub fn max_binding(&self) -> u64 {
        self.limits
            .max_storage_buffer_binding_size
            .min(self.limits.max_buffer_size)
    }
}
