//! The one place where the engine's [`Error`] becomes a Python exception.
//!
//! The classes live in Python (`python/autogaze_wgpu/errors.py`) and are looked up by name at
//! raise time: Config -> ConfigError, Weights -> WeightsError, Input -> InputError,
//! Device -> DeviceError, Backend -> BackendError, Io -> ConfigError or WeightsError by the
//! file's role (the `OSError` is attached as `__cause__`).

use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;

use crate::error::Error;

const ERRORS_MODULE: &str = "autogaze_wgpu.errors";

impl From<Error> for PyErr {
    fn from(err: Error) -> PyErr {
        Python::attach(|py| to_pyerr(py, err))
    }
}

fn to_pyerr(py: Python<'_>, err: Error) -> PyErr {
    let class = err.python_class();
    let message = err.to_string();
    let cause = match err {
        Error::Io { source, .. } => Some(PyErr::from(source)),
        _ => None,
    };
    let raised = py
        .import(ERRORS_MODULE)
        .and_then(|m| m.getattr(class))
        .and_then(|c| c.call1((message.as_str(),)));
    match raised {
        Ok(instance) => {
            let pyerr = PyErr::from_value(instance);
            if cause.is_some() {
                pyerr.set_cause(py, cause);
            }
            pyerr
        }
        Err(lookup) => PyRuntimeError::new_err(format!(
            "{message} (could not raise {ERRORS_MODULE}.{class}: {lookup})"
        )),
    }
}
