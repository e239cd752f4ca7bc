//! # fmi-python: the native half of the `fmi` Python module
//!
//! maturin builds this crate into `fmi/_fmi.*.so`; the pure-Python package around it
//! (`python/fmi/`) is what users import:
//!
//! ```text
//!  import fmi ── fmi/__init__.py: Communicator (mpi4py-style lowercase methods pickle objects,
//!                │                uppercase methods pass buffers through), Request, errors
//!                fmi/_fmi (this crate): Comm (*_bytes and *_buf primitives), Op, Request
//!                │  buffers → typed slices without copies; GIL released while waiting;
//!                │  fmi::Error → fmi.TimeoutError, fmi.PeerLostError, ...
//!                fmi::blocking::Communicator (owns its runtime thread)
//! ```

// The buffer protocol hands out raw pointers: every `unsafe` block says why its use is sound.
#![allow(unsafe_code)]
#![deny(unsafe_op_in_unsafe_fn)]
#![warn(clippy::undocumented_unsafe_blocks)]

use pyo3::prelude::*;

mod buffer;
mod comm;
mod errors;
mod op;
mod request;

/// Native part of the fmi module: use `import fmi`.
#[pymodule]
mod _fmi {
    use pyo3::prelude::*;

    #[pymodule_export]
    use crate::comm::Comm;
    #[pymodule_export]
    use crate::op::Op;
    #[pymodule_export]
    use crate::request::Request;

    #[pymodule_init]
    fn init(m: &Bound<'_, PyModule>) -> PyResult<()> {
        for (name, builtin) in Op::BUILTINS {
            m.add(name, Op::builtin(builtin))?;
        }
        m.add("__version__", env!("CARGO_PKG_VERSION"))?;
        Ok(())
    }
}
