//! Reduction operations: the built-ins (`fmi.SUM` ... `fmi.BXOR`) and Python callables.
//!
//! For the buffer methods a user op runs inside the reduction: fmi calls it (through
//! `UserOp::from_slice_fn`) with the GIL re-acquired, passing zero-copy numpy views of the two
//! operands to `fmi._ops.apply_user_op`, which stores `function(lhs, rhs)` into the right
//! operand. An exception stops further calls and is raised once the collective returns.

use std::sync::{Arc, Mutex, PoisonError};

use fmi::{Numeric, Reduction, UserOp};
use pyo3::ffi;
use pyo3::prelude::*;

use crate::buffer::Dt;
use crate::errors::to_py;

/// A built-in reduction.
#[derive(Clone, Copy)]
pub(crate) enum Builtin {
    Sum,
    Prod,
    Min,
    Max,
    LAnd,
    LOr,
    LXor,
    BAnd,
    BOr,
    BXor,
}

impl Builtin {
    const fn op(self) -> fmi::Op {
        match self {
            Builtin::Sum => fmi::Op::Sum,
            Builtin::Prod => fmi::Op::Prod,
            Builtin::Min => fmi::Op::Min,
            Builtin::Max => fmi::Op::Max,
            Builtin::LAnd => fmi::Op::LAnd,
            Builtin::LOr => fmi::Op::LOr,
            Builtin::LXor => fmi::Op::LXor,
            Builtin::BAnd => fmi::Op::BAnd,
            Builtin::BOr => fmi::Op::BOr,
            Builtin::BXor => fmi::Op::BXor,
        }
    }
}

/// A reduction operation: one of the built-ins `fmi.SUM`, `PROD`, `MIN`, `MAX`, `LAND`, `LOR`,
/// `LXOR`, `BAND`, `BOR`, `BXOR`, or `Op(function, commute=False)`, where `function(a, b)`
/// returns `a op b` and `a` comes from the lower ranks. Lowercase methods apply `function` to
/// the Python objects; buffer methods to numpy arrays (in chunks: any element-wise function).
#[pyclass(frozen, module = "fmi._fmi", name = "Op")]
pub(crate) struct Op {
    builtin: Option<Builtin>,
    function: Option<Py<PyAny>>,
    commute: bool,
}

impl Op {
    pub(crate) const fn builtin(b: Builtin) -> Op {
        Op {
            builtin: Some(b),
            function: None,
            commute: true,
        }
    }

    /// The module's built-in op objects, by Python name.
    pub(crate) const BUILTINS: [(&'static str, Builtin); 10] = [
        ("SUM", Builtin::Sum),
        ("PROD", Builtin::Prod),
        ("MIN", Builtin::Min),
        ("MAX", Builtin::Max),
        ("LAND", Builtin::LAnd),
        ("LOR", Builtin::LOr),
        ("LXOR", Builtin::LXor),
        ("BAND", Builtin::BAnd),
        ("BOR", Builtin::BOr),
        ("BXOR", Builtin::BXor),
    ];

    /// The reduction over `T` (the Rust type of `dt`), and the slot where a user function's
    /// exception lands.
    pub(crate) fn reduction<T: Numeric>(
        &self,
        py: Python<'_>,
        dt: Dt,
    ) -> PyResult<(Reduction<T>, ErrorSlot)> {
        let slot = ErrorSlot::default();
        if let Some(b) = self.builtin {
            // Sums of booleans would make values numpy cannot hold in a bool.
            if dt == Dt::Bool && matches!(b, Builtin::Sum) {
                return Err(to_py(
                    py,
                    fmi::Error::UnsupportedOp {
                        op: b.op().name(),
                        datatype: "bool",
                    },
                ));
            }
            return Ok((b.op().into(), slot));
        }
        let function = match &self.function {
            Some(f) => f.clone_ref(py),
            None => return Err(crate::errors::invalid(py, "op has no function")),
        };
        let errors = slot.clone();
        let name = dt.name();
        let op = UserOp::from_slice_fn(self.commute, move |lhs: &[T], inout: &mut [T]| {
            if errors.is_set() {
                return;
            }
            let result = Python::attach(|py| apply(py, &function, bytes_of(lhs), inout, name));
            if let Err(e) = result {
                errors.set(e);
            }
        });
        Ok((op.into(), slot))
    }
}

fn bytes_of<T>(s: &[T]) -> &[u8] {
    // SAFETY: any initialized memory may be read as bytes; the length covers exactly `s`.
    unsafe { std::slice::from_raw_parts(s.as_ptr().cast::<u8>(), std::mem::size_of_val(s)) }
}

/// Calls `fmi._ops.apply_user_op(function, lhs, inout, dtype)` with memoryviews over the two
/// operands; the Python side releases the views before returning, so they cannot outlive the
/// slices.
fn apply<T>(
    py: Python<'_>,
    function: &Py<PyAny>,
    lhs: &[u8],
    inout: &mut [T],
    dtype: &str,
) -> PyResult<()> {
    let inout_len = std::mem::size_of_val(inout);
    // SAFETY: PyMemoryView_FromMemory makes a view of `lhs.len()` bytes at `lhs` (read-only with
    // PyBUF_READ); the slice outlives the view, which apply_user_op releases before returning.
    let lhs_view = unsafe {
        Bound::from_owned_ptr_or_err(
            py,
            ffi::PyMemoryView_FromMemory(
                lhs.as_ptr().cast_mut().cast(),
                lhs.len() as ffi::Py_ssize_t,
                ffi::PyBUF_READ,
            ),
        )
    }?;
    // SAFETY: as above, writable (PyBUF_WRITE) over the exclusive `inout` slice.
    let inout_view = unsafe {
        Bound::from_owned_ptr_or_err(
            py,
            ffi::PyMemoryView_FromMemory(
                inout.as_mut_ptr().cast(),
                inout_len as ffi::Py_ssize_t,
                ffi::PyBUF_WRITE,
            ),
        )
    }?;
    let adapter = py.import("fmi._ops")?.getattr("apply_user_op")?;
    adapter.call1((function, &lhs_view, &inout_view, dtype))?;
    Ok(())
}

/// Where the first exception of a user function is kept until the collective returns.
#[derive(Clone, Default)]
pub(crate) struct ErrorSlot(Arc<Mutex<Option<PyErr>>>);

impl ErrorSlot {
    fn is_set(&self) -> bool {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some()
    }

    fn set(&self, e: PyErr) {
        let mut slot = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        slot.get_or_insert(e);
    }

    /// The user function's exception, if it raised one.
    pub(crate) fn check(self) -> PyResult<()> {
        match self.0.lock().unwrap_or_else(PoisonError::into_inner).take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

#[pymethods]
impl Op {
    #[new]
    #[pyo3(signature = (function, commute = false))]
    fn new(function: Bound<'_, PyAny>, commute: bool) -> PyResult<Op> {
        if !function.is_callable() {
            return Err(crate::errors::invalid(
                function.py(),
                "Op(function): function must be callable as function(a, b)",
            ));
        }
        Ok(Op {
            builtin: None,
            function: Some(function.unbind()),
            commute,
        })
    }

    /// The built-in op's lowercase name (`"sum"`), or `None` for a user op.
    #[getter]
    fn name(&self) -> Option<&'static str> {
        self.builtin.map(|b| b.op().name())
    }

    /// Whether the op may combine operands in any order.
    #[getter]
    fn commute(&self) -> bool {
        self.commute
    }

    /// The user function, or `None` for a built-in op.
    #[getter]
    fn function(&self, py: Python<'_>) -> Option<Py<PyAny>> {
        self.function.as_ref().map(|f| f.clone_ref(py))
    }

    fn __repr__(&self, py: Python<'_>) -> String {
        match (self.builtin, &self.function) {
            (Some(b), _) => format!("fmi.{}", b.op().name().to_uppercase()),
            (None, Some(f)) => format!(
                "fmi.Op({}, commute={})",
                f.bind(py)
                    .repr()
                    .map_or_else(|_| "<function>".to_owned(), |r| r.to_string()),
                if self.commute { "True" } else { "False" }
            ),
            (None, None) => "fmi.Op(<invalid>)".to_owned(),
        }
    }
}
