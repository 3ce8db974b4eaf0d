//! Config and weight loading: `load_config`, `load_preprocessor_config`, `load_weights`.

use std::path::PathBuf;

use numpy::{PyArray1, PyArrayMethods};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyString};
use serde_json::Value;

use crate::config::{AutoGazeConfig, PreprocessorConfig};
use crate::weights::load_model;

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(load_config, m)?)?;
    m.add_function(wrap_pyfunction!(load_preprocessor_config, m)?)?;
    m.add_function(wrap_pyfunction!(load_weights, m)?)?;
    Ok(())
}

/// Reads and validates ``config.json``.
///
/// ``path`` is a model directory or the ``config.json`` file itself. Returns a nested dict:
/// ``scales``, ``num_vision_tokens_each_frame``, ``max_num_frames``,
/// ``has_task_loss_requirement_during_inference``, ``default_gazing_ratio``,
/// ``default_task_loss_requirement``, ``input_img_size``, ``vision``, ``connector``,
/// ``decoder`` (with ``rope_scaling`` a dict or None), and the derived
/// ``num_tokens_each_scale``, ``grid_each_scale`` and ``patches_per_side``.
///
/// Raises ``ConfigError`` when the file is missing, malformed, inconsistent or unsupported.
#[pyfunction]
fn load_config(py: Python<'_>, path: PathBuf) -> PyResult<Bound<'_, PyAny>> {
    let config = py.detach(|| AutoGazeConfig::load(&path))?;
    json_to_py(py, &config.to_json())
}

/// Reads and validates ``preprocessor_config.json``.
///
/// ``path`` is a model directory or the file itself. Returns a dict with ``do_resize``,
/// ``size`` (``{"shortest_edge": n}`` or ``{"height": h, "width": w}``), ``resample``,
/// ``do_rescale``, ``rescale_factor``, ``offset``, ``do_normalize``, ``image_mean``,
/// ``image_std``, ``do_center_crop`` and ``crop_size`` (dict or None).
///
/// Raises ``ConfigError``.
#[pyfunction]
fn load_preprocessor_config(py: Python<'_>, path: PathBuf) -> PyResult<Bound<'_, PyAny>> {
    let config = py.detach(|| PreprocessorConfig::load(&path))?;
    json_to_py(py, &config.to_json())
}

/// Loads ``model.safetensors`` of a model directory, checked against its ``config.json``.
///
/// ``model_dir`` may also be the ``.safetensors`` file (the config is read next to it).
/// Returns ``{name: numpy.ndarray}`` with float32 C-contiguous arrays of the tensor shapes,
/// keyed by the full checkpoint names (``gazing_model.…``); F16/BF16 files are upcast.
///
/// Raises ``ConfigError`` for config problems and ``WeightsError`` for missing, extra or
/// mis-shaped tensors, unsupported dtypes, NaN/Inf values, or a corrupt file.
#[pyfunction]
fn load_weights(py: Python<'_>, model_dir: PathBuf) -> PyResult<Bound<'_, PyDict>> {
    let (_, weights) = py.detach(|| load_model(&model_dir))?;
    let out = PyDict::new(py);
    for (name, tensor) in weights.tensors {
        // The array takes ownership of the Vec (no copy); reshape gives a view of it.
        let array = PyArray1::from_vec(py, tensor.data).reshape(tensor.shape)?;
        out.set_item(name, array)?;
    }
    Ok(out)
}

/// JSON value -> the equivalent Python object (dict/list/str/int/float/bool/None).
fn json_to_py<'py>(py: Python<'py>, value: &Value) -> PyResult<Bound<'py, PyAny>> {
    Ok(match value {
        Value::Null => py.None().into_bound(py),
        Value::Bool(b) => b.into_pyobject(py)?.to_owned().into_any(),
        Value::Number(n) => {
            if let Some(u) = n.as_u64() {
                u.into_pyobject(py)?.into_any()
            } else if let Some(i) = n.as_i64() {
                i.into_pyobject(py)?.into_any()
            } else {
                n.as_f64().unwrap_or(f64::NAN).into_pyobject(py)?.into_any()
            }
        }
        Value::String(s) => PyString::new(py, s).into_any(),
        Value::Array(items) => {
            let list = PyList::empty(py);
            for item in items {
                list.append(json_to_py(py, item)?)?;
            }
            list.into_any()
        }
        Value::Object(map) => {
            let dict = PyDict::new(py);
            for (k, v) in map {
                dict.set_item(k, json_to_py(py, v)?)?;
            }
            dict.into_any()
        }
    })
}
