//! fmi errors as Python exceptions.
//!
//! The exception classes are defined in Python (`fmi/_errors.py`), where each can also derive
//! from the matching built-in (`fmi.TimeoutError` is a `builtins.TimeoutError` too); this module
//! picks the class for each [`fmi::Error`] variant and fills in the message and `peer`.

use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;

use fmi::Error;

/// The name of the `fmi` exception class for an error.
fn class_of(e: &Error) -> &'static str {
    match e {
        Error::Timeout { .. } => "TimeoutError",
        Error::PeerLost { .. } => "PeerLostError",
        Error::TooLarge { .. } => "TooLargeError",
        Error::InvalidRank { .. } => "InvalidRankError",
        Error::TypeMismatch { .. } => "TypeMismatchError",
        Error::CountMismatch { .. } => "CountMismatchError",
        Error::UnsupportedOp { .. } => "UnsupportedOpError",
        Error::InvalidArgument { .. } => "InvalidArgumentError",
        Error::InvalidJobId { .. }
        | Error::MissingEnv { .. }
        | Error::InvalidEnv { .. }
        | Error::Config { .. } => "ConfigError",
        Error::Bootstrap { .. } => "BootstrapError",
        Error::NestedRuntime => "NestedRuntimeError",
        Error::Closed { .. } => "ClosedError",
        Error::Io { .. } => "IoError",
        _ => "Error",
    }
}

/// A Python exception of class `fmi.{class}` with `message` and the attribute `peer`.
pub(crate) fn raise(py: Python<'_>, class: &str, message: String, peer: Option<u32>) -> PyErr {
    let exc = py
        .import("fmi._errors")
        .and_then(|m| m.getattr(class))
        .and_then(|c| c.call1((message.clone(),)));
    match exc {
        Ok(exc) => {
            if let Err(e) = exc.setattr("peer", peer) {
                return e;
            }
            PyErr::from_value(exc)
        }
        // Only if the Python half of the package is missing.
        Err(_) => PyRuntimeError::new_err(message),
    }
}

/// The Python exception for an fmi error.
pub(crate) fn to_py(py: Python<'_>, e: Error) -> PyErr {
    raise(py, class_of(&e), e.to_string(), e.peer().map(|r| r.0))
}

/// An `fmi.InvalidArgumentError`.
pub(crate) fn invalid(py: Python<'_>, message: impl Into<String>) -> PyErr {
    raise(py, "InvalidArgumentError", message.into(), None)
}

/// Converts fmi results.
pub(crate) trait OrRaise<T> {
    /// The value, or the error as a Python exception.
    fn or_raise(self, py: Python<'_>) -> PyResult<T>;
}

impl<T> OrRaise<T> for fmi::Result<T> {
    fn or_raise(self, py: Python<'_>) -> PyResult<T> {
        self.map_err(|e| to_py(py, e))
    }
}
