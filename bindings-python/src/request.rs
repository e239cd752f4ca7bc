//! Requests of the non-blocking operations.

use fmi::blocking;
use fmi::Rank;
use pyo3::prelude::*;
use pyo3::types::PyBytes;

use crate::buffer::Buf;
use crate::errors::{invalid, OrRaise};

enum Pending {
    Send(blocking::Request<()>),
    /// `irecv_bytes`: completes with `bytes`.
    RecvBytes(blocking::Request<Vec<u8>>),
    /// `Irecv`: completes by copying into the buffer object, with the element count.
    RecvInto {
        request: blocking::Request<Vec<u8>>,
        buf: Py<PyAny>,
        me: Rank,
        src: Rank,
    },
}

/// A pending non-blocking send or receive. `wait()` blocks until it completes (with the GIL
/// released) and returns its result: `None` for a send, the number of elements received for a
/// buffer receive, the bytes for a bytes receive. `test()` returns `(done, result)` without
/// blocking.
#[pyclass(module = "fmi._fmi", name = "Request")]
pub(crate) struct Request {
    pending: Option<Pending>,
}

impl Request {
    pub(crate) fn send(r: blocking::Request<()>) -> Request {
        Request {
            pending: Some(Pending::Send(r)),
        }
    }

    pub(crate) fn recv_bytes(r: blocking::Request<Vec<u8>>) -> Request {
        Request {
            pending: Some(Pending::RecvBytes(r)),
        }
    }

    pub(crate) fn recv_into(
        request: blocking::Request<Vec<u8>>,
        buf: Py<PyAny>,
        me: Rank,
        src: Rank,
    ) -> Request {
        Request {
            pending: Some(Pending::RecvInto {
                request,
                buf,
                me,
                src,
            }),
        }
    }
}

/// Copies a received message into a buffer object: the number of elements.
pub(crate) fn copy_into(
    py: Python<'_>,
    obj: &Bound<'_, PyAny>,
    bytes: &[u8],
    me: Rank,
    src: Rank,
) -> PyResult<usize> {
    let buf = Buf::get(obj, true, "buf")?;
    let size = buf.dt.size();
    if !bytes.len().is_multiple_of(size) {
        return Err(fmi::Error::TypeMismatch {
            me,
            peer: src,
            len: bytes.len(),
            elem_size: size,
        })
        .or_raise(py);
    }
    let n = bytes.len() / size;
    if n > buf.count {
        return Err(fmi::Error::CountMismatch {
            me,
            peer: src,
            what: "Irecv: message longer than the buffer",
            expected: buf.count,
            got: n,
        })
        .or_raise(py);
    }
    // SAFETY: exported writable, no slice of it lives, and `bytes` fits (checked above).
    unsafe { buf.write_bytes(bytes) };
    Ok(n)
}

fn finish(py: Python<'_>, pending: Pending) -> PyResult<Py<PyAny>> {
    match pending {
        Pending::Send(r) => {
            py.detach(|| r.wait()).or_raise(py)?;
            Ok(py.None())
        }
        Pending::RecvBytes(r) => {
            let bytes = py.detach(|| r.wait()).or_raise(py)?;
            Ok(PyBytes::new(py, &bytes).into_any().unbind())
        }
        Pending::RecvInto {
            request,
            buf,
            me,
            src,
        } => {
            let bytes = py.detach(|| request.wait()).or_raise(py)?;
            let n = copy_into(py, buf.bind(py), &bytes, me, src)?;
            Ok(n.into_pyobject(py)?.into_any().unbind())
        }
    }
}

#[pymethods]
impl Request {
    /// Blocks until the operation completes and returns its result.
    fn wait(&mut self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        let pending = self
            .pending
            .take()
            .ok_or_else(|| invalid(py, "the request already completed"))?;
        finish(py, pending)
    }

    /// `(True, result)` if the operation completed (the request is then done), else
    /// `(False, None)`.
    fn test(&mut self, py: Python<'_>) -> PyResult<(bool, Py<PyAny>)> {
        let pending = self
            .pending
            .as_mut()
            .ok_or_else(|| invalid(py, "the request already completed"))?;
        let finished: Option<PyResult<Py<PyAny>>> = match pending {
            Pending::Send(r) => r.test().map(|res| res.or_raise(py).map(|()| py.None())),
            Pending::RecvBytes(r) => r.test().map(|res| {
                res.or_raise(py)
                    .map(|b| PyBytes::new(py, &b).into_any().unbind())
            }),
            Pending::RecvInto {
                request,
                buf,
                me,
                src,
            } => request.test().map(|res| {
                let bytes = res.or_raise(py)?;
                let n = copy_into(py, buf.bind(py), &bytes, *me, *src)?;
                Ok(n.into_pyobject(py)?.into_any().unbind())
            }),
        };
        match finished {
            None => Ok((false, py.None())),
            Some(result) => {
                self.pending = None;
                result.map(|value| (true, value))
            }
        }
    }

    /// Whether `wait()` or a successful `test()` already returned the result.
    #[getter]
    fn done(&self) -> bool {
        self.pending.is_none()
    }
}
