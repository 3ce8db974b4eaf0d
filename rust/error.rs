//! The one error type of the engine.
//!
//! Every fallible function of the crate returns [`Result`]. The Python bindings map each
//! variant to one class of the `autogaze_wgpu.errors` hierarchy in a single place
//! (`rust/python/errors.rs`); see [`Error::python_class`].

use std::fmt;

/// Which kind of file an I/O error happened on, so that it reaches Python as a
/// `ConfigError` or a `WeightsError`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileRole {
    /// `config.json` or `preprocessor_config.json`.
    Config,
    /// `model.safetensors`.
    Weights,
}

impl fmt::Display for FileRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FileRole::Config => "config file",
            FileRole::Weights => "weights file",
        })
    }
}

/// Everything that can go wrong in the engine.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A config file (`config.json`, `preprocessor_config.json`) is malformed, misses a key,
    /// has a value of the wrong type, or describes a model this engine does not support.
    #[error("invalid config {path}: {message}")]
    Config { path: String, message: String },

    /// A weights file is malformed or does not match the config (missing, extra or
    /// mis-shaped tensors, unsupported dtype, non-finite values).
    #[error("invalid weights {path}: {message}")]
    Weights { path: String, message: String },

    /// A file could not be opened or read.
    #[error("cannot read {role} {path}: {source}")]
    Io {
        path: String,
        role: FileRole,
        #[source]
        source: std::io::Error,
    },

    /// A caller passed an invalid argument (shape, dtype, value range).
    #[error("{0}")]
    Input(String),

    /// No usable GPU adapter/device, or the device was lost.
    #[error("{0}")]
    Device(String),

    /// Any other failure of a compute backend.
    #[error("{0}")]
    Backend(String),
}

impl Error {
    pub fn config(path: impl Into<String>, message: impl Into<String>) -> Self {
        Error::Config {
            path: path.into(),
            message: message.into(),
        }
    }

    pub fn weights(path: impl Into<String>, message: impl Into<String>) -> Self {
        Error::Weights {
            path: path.into(),
            message: message.into(),
        }
    }

    pub fn io(path: impl Into<String>, role: FileRole, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            role,
            source,
        }
    }

    /// Name of the class in `autogaze_wgpu.errors` this error is raised as in Python.
    pub fn python_class(&self) -> &'static str {
        match self {
            Error::Config { .. } => "ConfigError",
            Error::Weights { .. } => "WeightsError",
            Error::Io { role, .. } => match role {
                FileRole::Config => "ConfigError",
                FileRole::Weights => "WeightsError",
            },
            Error::Input(_) => "InputError",
            Error::Device(_) => "DeviceError",
            Error::Backend(_) => "BackendError",
        }
    }
}

/// `std::result::Result` with the crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_the_file_and_the_problem() {
        let e = Error::config("/m/config.json", "missing required key `scales`");
        assert_eq!(
            e.to_string(),
            "invalid config /m/config.json: missing required key `scales`"
        );
        assert_eq!(e.python_class(), "ConfigError");

        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "gone");
        let e = Error::io("/m/model.safetensors", FileRole::Weights, io);
        assert_eq!(
            e.to_string(),
            "cannot read weights file /m/model.safetensors: gone"
        );
        assert_eq!(e.python_class(), "WeightsError");
        assert_eq!(Error::Device("x".into()).python_class(), "DeviceError");
        assert_eq!(Error::Backend("x".into()).python_class(), "BackendError");
        assert_eq!(Error::Input("x".into()).python_class(), "InputError");
    }
}
