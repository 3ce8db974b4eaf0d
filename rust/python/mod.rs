//! The private `autogaze_wgpu._native` extension module (PyO3). Users import the public
//! facade `autogaze_wgpu`; this module only exposes what the facade needs.
//!
//! One binding file per concern, each with a `register` function called below; errors are
//! mapped to `autogaze_wgpu.errors` in one place ([`errors`]).

mod engine;
mod errors;
mod loader;

use pyo3::prelude::*;

/// Native core of autogaze_wgpu (private: use the `autogaze_wgpu` package).
#[pymodule(gil_used = false)]
#[pyo3(name = "_native")]
fn native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    loader::register(m)?;
    engine::register(m)?;
    Ok(())
}
