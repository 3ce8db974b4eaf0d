//! The wgpu engine: `WgpuEngine` (embed, generate, score) and `WgpuSession` (streaming).
//!
//! Inputs are validated by the Python facade (`autogaze_wgpu.inputs`) and checked again here
//! for shape; all GPU work runs with the GIL released (`py.detach`).

use std::path::PathBuf;
use std::sync::Mutex;

use numpy::{PyArray1, PyArrayMethods, PyReadonlyArrayDyn, PyUntypedArrayMethods};
use pyo3::prelude::*;

use crate::error::Error;
use crate::gpu::{Engine, FrameShape, Frames, GenerateParams, GpuContext, MemoryEstimate, Session};
use crate::weights::load_model;

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<WgpuEngine>()?;
    m.add_class::<WgpuSession>()?;
    m.add_function(wrap_pyfunction!(wgpu_adapter_info, m)?)?;
    m.add_function(wrap_pyfunction!(shader_source, m)?)?;
    Ok(())
}

/// The WGSL the engine compiles for kernel family ``name`` (``shaders/<name>.wgsl`` after
/// ``common.wgsl``) with ``defines`` applied by the engine's own preprocessor, so that other
/// WebGPU runtimes (the tests use wgpu-py) can run exactly the engine's shaders.
#[pyfunction]
#[pyo3(signature = (name, defines=None))]
fn shader_source(name: &str, defines: Option<Vec<(String, String)>>) -> PyResult<String> {
    let body = crate::gpu::pipeline::shader_source(name)
        .ok_or_else(|| Error::Input(format!("unknown shader family `{name}`")))?;
    let mut defs = defines.unwrap_or_default();
    defs.sort();
    Ok(crate::gpu::pipeline::preprocess(
        &format!("{}\n{body}", crate::gpu::pipeline::COMMON),
        &defs,
    )?)
}

/// Describes the adapter wgpu would use, as a dict, or raises ``DeviceError`` when there is
/// none.
#[pyfunction]
fn wgpu_adapter_info(py: Python<'_>) -> PyResult<Bound<'_, pyo3::types::PyDict>> {
    let info = py.detach(|| GpuContext::new().map(|c| c.info.clone()))?;
    let d = pyo3::types::PyDict::new(py);
    d.set_item("name", info.name.clone())?;
    d.set_item("description", format!("{info:?}"))?;
    Ok(d)
}

fn contiguous_f32<'a>(x: &'a PyReadonlyArrayDyn<'_, f32>, what: &str) -> PyResult<&'a [f32]> {
    x.as_slice()
        .map_err(|_| Error::Input(format!("{what} must be a C-contiguous float32 array")).into())
}

/// A call's input: float32 pixel values (B, T, 3, H, W), or uint8 RGB frames
/// (B, T, H, W, 3) with ``preprocess=(out_h, out_w, lut)``: the processor's output size and
/// its float value of each uint8 level per channel (lut float32 (3, 256)), for the processor's
/// resize and normalisation on the GPU.
enum PyInput<'py> {
    Pixels(PyReadonlyArrayDyn<'py, f32>),
    Uint8(PyReadonlyArrayDyn<'py, u8>, (usize, usize), Vec<f32>),
}

type Preprocess = Option<(usize, usize, Vec<f32>)>;

impl<'py> PyInput<'py> {
    fn new(x: &Bound<'py, PyAny>, preprocess: Preprocess) -> PyResult<Self> {
        Ok(match preprocess {
            None => {
                Self::Pixels(x.extract().map_err(|_| {
                    Error::Input("pixel_values must be a float32 numpy array".into())
                })?)
            }
            Some((h, w, lut)) => Self::Uint8(
                x.extract()
                    .map_err(|_| Error::Input("frames must be a uint8 numpy array".into()))?,
                (h, w),
                lut,
            ),
        })
    }

    fn frames(&self) -> PyResult<Frames<'_>> {
        Ok(match self {
            Self::Pixels(a) => Frames::pixels(contiguous_f32(a, "pixel_values")?, a.shape())?,
            Self::Uint8(a, hw, lut) => {
                let bytes = a.as_slice().map_err(|_| {
                    Error::Input("frames must be a C-contiguous uint8 array".into())
                })?;
                Frames::uint8(bytes, a.shape(), *hw, lut)?
            }
        })
    }
}

/// A call's input shape: pixel values (B, T, 3, H, W), from uint8 frames of
/// ``source_size`` when that is given.
fn frame_shape(shape: &[usize], source_size: Option<(usize, usize)>) -> PyResult<FrameShape> {
    match shape {
        [b, t, 3, h, w] => Ok(FrameShape {
            b: *b,
            t: *t,
            h: *h,
            w: *w,
            src_hw: source_size,
        }),
        _ => Err(Error::Input(format!(
            "a memory estimate needs a pixel-value shape (B, T, 3, H, W), got {shape:?}"
        ))
        .into()),
    }
}

/// ``{"total": bytes, "parts": [(buffer, bytes), ...]}``.
fn estimate_dict<'py>(
    py: Python<'py>,
    est: MemoryEstimate,
) -> PyResult<Bound<'py, pyo3::types::PyDict>> {
    let d = pyo3::types::PyDict::new(py);
    d.set_item("total", est.total)?;
    d.set_item("parts", est.parts)?;
    Ok(d)
}

/// The whole AutoGaze model on a wgpu device (weights uploaded once).
#[pyclass(module = "autogaze_wgpu._native", frozen)]
pub struct WgpuEngine {
    engine: Engine,
}

#[pymethods]
impl WgpuEngine {
    /// Loads ``config.json`` + ``model.safetensors`` from ``model_dir`` and uploads the
    /// weights to the best GPU adapter. Raises ``DeviceError`` without an adapter.
    #[new]
    fn new(py: Python<'_>, model_dir: PathBuf) -> PyResult<Self> {
        let engine = py.detach(|| -> crate::Result<Engine> {
            let (config, weights) = load_model(&model_dir)?;
            Engine::new(&config, &weights)
        })?;
        Ok(Self { engine })
    }

    /// Name of the adapter the engine runs on.
    #[getter]
    fn adapter_name(&self) -> String {
        self.engine.context().info.name.clone()
    }

    /// Fault injection for tests: the device is lost as after a driver reset.
    fn _simulate_device_lost(&self) {
        self.engine.context().simulate_device_lost();
    }

    /// Fault injection for tests: the next GPU allocation fails as out of memory.
    fn _simulate_oom_on_next_allocation(&self) {
        self.engine.context().simulate_oom_on_next_allocation();
    }

    /// Fault injection for tests: the device reports ``free`` bytes of free memory
    /// (None: the driver's numbers again).
    #[pyo3(signature = (free=None))]
    fn _simulate_free_device_memory(&self, free: Option<u64>) {
        self.engine.context().simulate_free_device_memory(free);
    }

    /// Bytes of the buffers ever created on this engine's device (freed ones included).
    #[getter]
    fn _allocated_bytes(&self) -> u64 {
        self.engine.context().allocated_bytes()
    }

    /// What a call may allocate on the device: a dict with ``bytes`` (None when the backend
    /// does not say; with VK_EXT_memory_budget the free budget plus the cached workspace,
    /// else the device-local heap less the weights), ``heap_size``, ``free`` (the budget's),
    /// ``source``, ``weights`` and ``cached`` (bytes of the weights and the cached workspace).
    fn memory_available<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, pyo3::types::PyDict>> {
        let a = py.detach(|| self.engine.memory_available());
        let d = pyo3::types::PyDict::new(py);
        d.set_item("bytes", a.bytes)?;
        d.set_item("heap_size", a.device.heap_size)?;
        d.set_item("free", a.device.free)?;
        d.set_item("source", a.device.source)?;
        d.set_item("weights", a.weights)?;
        d.set_item("cached", a.cached)?;
        Ok(d)
    }

    /// GPU memory ``embed`` on pixel values of ``shape`` (B, T, 3, H, W) creates (from uint8
    /// frames of ``source_size`` when given), computed before anything is allocated:
    /// ``{"total": bytes, "parts": [(buffer, bytes), ...]}``.
    #[pyo3(signature = (shape, source_size=None))]
    fn estimate_embed<'py>(
        &self,
        py: Python<'py>,
        shape: Vec<usize>,
        source_size: Option<(usize, usize)>,
    ) -> PyResult<Bound<'py, pyo3::types::PyDict>> {
        let s = frame_shape(&shape, source_size)?;
        estimate_dict(py, self.engine.estimate_embed(&s)?)
    }

    /// As ``estimate_embed``, for ``generate`` with these per-frame ratios.
    #[pyo3(signature = (shape, gazing_ratio_each_frame, source_size=None))]
    fn estimate_generate<'py>(
        &self,
        py: Python<'py>,
        shape: Vec<usize>,
        gazing_ratio_each_frame: Vec<f32>,
        source_size: Option<(usize, usize)>,
    ) -> PyResult<Bound<'py, pyo3::types::PyDict>> {
        let s = frame_shape(&shape, source_size)?;
        estimate_dict(
            py,
            self.engine
                .estimate_generate(&s, &gazing_ratio_each_frame)?,
        )
    }

    /// As ``estimate_embed``, for ``score`` with ``frame_lens[t]`` slots in frame t.
    #[pyo3(signature = (shape, frame_lens, source_size=None))]
    fn estimate_score<'py>(
        &self,
        py: Python<'py>,
        shape: Vec<usize>,
        frame_lens: Vec<usize>,
        source_size: Option<(usize, usize)>,
    ) -> PyResult<Bound<'py, pyo3::types::PyDict>> {
        let s = frame_shape(&shape, source_size)?;
        estimate_dict(py, self.engine.estimate_score(&s, &frame_lens)?)
    }

    /// As ``estimate_embed``, for ``session`` (same arguments).
    #[pyo3(signature = (batch, max_frames, height, width, source_size=None))]
    fn estimate_session<'py>(
        &self,
        py: Python<'py>,
        batch: usize,
        max_frames: usize,
        height: usize,
        width: usize,
        source_size: Option<(usize, usize)>,
    ) -> PyResult<Bound<'py, pyo3::types::PyDict>> {
        let est = self
            .engine
            .estimate_session(batch, max_frames, (height, width), source_size)?;
        estimate_dict(py, est)
    }

    /// ``pixel_values`` float32 (B, T, 3, H, W) (or uint8 frames with ``preprocess``) ->
    /// connector output (B, T, 196, C).
    #[pyo3(signature = (pixel_values, preprocess=None))]
    fn embed<'py>(
        &self,
        py: Python<'py>,
        pixel_values: &Bound<'py, PyAny>,
        preprocess: Preprocess,
    ) -> PyResult<Bound<'py, PyAny>> {
        let input = PyInput::new(pixel_values, preprocess)?;
        let frames = input.frames()?;
        let out = py.detach(|| self.engine.embed_frames(&frames))?;
        let (p, c) = (self.engine.num_vision_tokens(), self.engine.hidden_size());
        Ok(PyArray1::from_vec(py, out)
            .reshape(vec![frames.b, frames.t, p, c])?
            .into_any())
    }

    /// Greedy generation (input as in ``embed``). Returns ``(gazing_pos (B, N) int64,
    /// if_padded_gazing (B, N) bool, num_gazing_each_frame (T,) int64)``.
    #[pyo3(signature = (pixel_values, gazing_ratio_each_frame, task_loss_requirement=None, preprocess=None))]
    fn generate<'py>(
        &self,
        py: Python<'py>,
        pixel_values: &Bound<'py, PyAny>,
        gazing_ratio_each_frame: Vec<f32>,
        task_loss_requirement: Option<f32>,
        preprocess: Preprocess,
    ) -> PyResult<(Bound<'py, PyAny>, Bound<'py, PyAny>, Bound<'py, PyAny>)> {
        let input = PyInput::new(pixel_values, preprocess)?;
        let frames = input.frames()?;
        let params = GenerateParams {
            gazing_ratio_each_frame,
            task_loss_requirement,
        };
        let out = py.detach(|| self.engine.generate_frames(&frames, &params))?;
        let b = out.batch;
        let n = out.gazing_pos.len().checked_div(b).unwrap_or(0);
        let num: Vec<i64> = out
            .num_gazing_each_frame
            .iter()
            .map(|&v| v as i64)
            .collect();
        Ok((
            PyArray1::from_vec(py, out.gazing_pos)
                .reshape(vec![b, n])?
                .into_any(),
            PyArray1::from_vec(py, out.if_padded_gazing)
                .reshape(vec![b, n])?
                .into_any(),
            PyArray1::from_vec(py, num).into_any(),
        ))
    }

    /// The teacher-forced scores of given gazes (SPEC §5b). ``tokens`` int64 (B, N): ids
    /// within their frame (pad 265), the frames' slots concatenated, ``frame_lens[t]`` of
    /// them for frame t. Input as in ``embed``. Returns ``(gaze_probs,
    /// task_loss_prediction)``, float32 (B, N).
    #[pyo3(signature = (pixel_values, frame_lens, tokens, preprocess=None))]
    fn score<'py>(
        &self,
        py: Python<'py>,
        pixel_values: &Bound<'py, PyAny>,
        frame_lens: Vec<usize>,
        tokens: PyReadonlyArrayDyn<'py, i64>,
        preprocess: Preprocess,
    ) -> PyResult<(Bound<'py, PyAny>, Bound<'py, PyAny>)> {
        let input = PyInput::new(pixel_values, preprocess)?;
        let frames = input.frames()?;
        let tshape = tokens.shape().to_vec();
        if tshape.len() != 2 || tshape[0] != frames.b {
            return Err(Error::Input(format!(
                "tokens must have shape (B, N) with the batch of pixel_values, got {tshape:?}"
            ))
            .into());
        }
        let ids = tokens
            .as_slice()
            .map_err(|_| Error::Input("tokens must be a C-contiguous int64 array".into()))?
            .iter()
            .map(|&v| {
                u32::try_from(v)
                    .map_err(|_| Error::Input(format!("slot id {v} is not a gaze target id")))
            })
            .collect::<Result<Vec<u32>, Error>>()?;
        let (gp, tl) = py.detach(|| self.engine.score_frames(&frames, &frame_lens, &ids))?;
        let dims = vec![tshape[0], tshape[1]];
        Ok((
            PyArray1::from_vec(py, gp).reshape(dims.clone())?.into_any(),
            PyArray1::from_vec(py, tl).reshape(dims)?.into_any(),
        ))
    }

    /// ``generate`` with every dispatch timed by GPU timestamp queries (adapters with
    /// timestamp queries inside passes; ``DeviceError`` otherwise). Returns a dict:
    /// ``kernels`` (list of ``(kernel, dispatches, total_us)``, slowest first),
    /// ``gpu_us`` (their sum), ``dispatches``, ``submits``, ``record_us`` (CPU recording)
    /// and ``total_us`` (wall-clock of the call, profiling overhead included).
    #[pyo3(signature = (pixel_values, gazing_ratio_each_frame, task_loss_requirement=None))]
    fn profile<'py>(
        &self,
        py: Python<'py>,
        pixel_values: PyReadonlyArrayDyn<'py, f32>,
        gazing_ratio_each_frame: Vec<f32>,
        task_loss_requirement: Option<f32>,
    ) -> PyResult<Bound<'py, pyo3::types::PyDict>> {
        let shape = pixel_values.shape().to_vec();
        let data = contiguous_f32(&pixel_values, "pixel_values")?;
        let params = GenerateParams {
            gazing_ratio_each_frame,
            task_loss_requirement,
        };
        let (_, kernels, stats) =
            py.detach(|| self.engine.generate_profiled(data, &shape, &params))?;
        let d = pyo3::types::PyDict::new(py);
        let gpu_us: f64 = kernels.iter().map(|k| k.total_us).sum();
        let rows: Vec<(String, usize, f64)> = kernels
            .into_iter()
            .map(|k| (k.kernel, k.dispatches, k.total_us))
            .collect();
        d.set_item("kernels", rows)?;
        d.set_item("gpu_us", gpu_us)?;
        d.set_item("dispatches", stats.dispatches)?;
        d.set_item("submits", stats.submits)?;
        d.set_item("record_us", stats.record_us)?;
        d.set_item("total_us", stats.total_us)?;
        Ok(d)
    }

    /// Starts a streaming session of ``batch`` rows for up to ``max_frames`` frames of
    /// pixel-value size (height, width); ``source_size=(h, w)``: the frames come as uint8
    /// frames of that size, preprocessed on the GPU (``step(..., preprocess=...)``).
    #[pyo3(signature = (batch, max_frames, height, width, task_loss_requirement=None, source_size=None))]
    #[allow(clippy::too_many_arguments)]
    fn session(
        &self,
        py: Python<'_>,
        batch: usize,
        max_frames: usize,
        height: usize,
        width: usize,
        task_loss_requirement: Option<f32>,
        source_size: Option<(usize, usize)>,
    ) -> PyResult<WgpuSession> {
        let s = py.detach(|| {
            self.engine.session(
                batch,
                max_frames,
                (height, width),
                source_size,
                task_loss_requirement,
            )
        })?;
        Ok(WgpuSession {
            session: Mutex::new(s),
        })
    }
}

/// A streaming session: KV cache, conv cache and state stay on the GPU between frames.
#[pyclass(module = "autogaze_wgpu._native", frozen)]
pub struct WgpuSession {
    session: Mutex<Session>,
}

#[pymethods]
impl WgpuSession {
    /// Runs one frame (B, 1, 3, H, W) (or uint8 (B, 1, H, W, 3) with ``preprocess``, as in
    /// ``WgpuEngine.embed``); returns its ids within the frame (B, n) int64 (pad = 265).
    #[pyo3(signature = (pixel_values, gazing_ratio, preprocess=None))]
    fn step<'py>(
        &self,
        py: Python<'py>,
        pixel_values: &Bound<'py, PyAny>,
        gazing_ratio: f32,
        preprocess: Preprocess,
    ) -> PyResult<Bound<'py, PyAny>> {
        let input = PyInput::new(pixel_values, preprocess)?;
        let frames = input.frames()?;
        let out = py.detach(|| {
            let mut s = self.session.lock().map_err(|_| {
                Error::Backend("a previous step panicked; start a new session".into())
            })?;
            s.step_frames(&frames, gazing_ratio)
        })?;
        let b = out.batch;
        Ok(PyArray1::from_vec(py, out.tokens)
            .reshape(vec![b, out.num_gazing])?
            .into_any())
    }

    /// Forgets the history: the next step runs as a fresh session's first frame.
    fn reset(&self, py: Python<'_>) -> PyResult<()> {
        py.detach(|| {
            let mut s = self.session.lock().map_err(|_| {
                Error::Backend("a previous step panicked; start a new session".into())
            })?;
            s.reset();
            Ok::<(), Error>(())
        })?;
        Ok(())
    }

    /// Frames the session holds before it must be reset.
    #[getter]
    fn max_frames(&self) -> PyResult<usize> {
        let s = self
            .session
            .lock()
            .map_err(|_| Error::Backend("session poisoned".into()))?;
        Ok(s.max_frames())
    }

    /// Frames run so far.
    #[getter]
    fn frames(&self) -> PyResult<usize> {
        let s = self
            .session
            .lock()
            .map_err(|_| Error::Backend("session poisoned".into()))?;
        Ok(s.frames())
    }
}
