//! The native communicator `fmi._fmi.Comm`, which `fmi.Communicator` wraps.
//!
//! Two families of methods: `*_bytes` move `bytes` (the Python layer pickles objects into them)
//! and `*_buf` move buffer-protocol objects in place, typed by the buffer's format. Every call
//! that can block releases the GIL (`Python::detach`) while it waits.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use fmi::blocking::{self, Communicator};
use fmi::{EnvSettings, Rank};
use pyo3::prelude::*;
use pyo3::types::PyBytes;

use crate::buffer::{in_out, same_type, with_type, Buf};
use crate::errors::{invalid, raise, to_py, OrRaise};
use crate::op::Op;
use crate::request::{copy_into, Request};

/// A communicator: this process's membership of one job. Use `fmi.Communicator`, which adds
/// the object (pickle) methods and documentation.
#[pyclass(frozen, module = "fmi._fmi", name = "Comm")]
pub(crate) struct Comm {
    comm: Communicator,
    /// The deadline set by `set_deadline` in milliseconds; 0 for the communicator's own.
    deadline_ms: AtomicU64,
}

fn tag_arg(py: Python<'_>, tag: i64) -> PyResult<u32> {
    u32::try_from(tag).map_err(|_| {
        invalid(
            py,
            format!("tag {tag} is out of range; tags are 0..=4294967295"),
        )
    })
}

fn count_mismatch(
    py: Python<'_>,
    me: Rank,
    what: &'static str,
    expected: usize,
    got: usize,
) -> PyErr {
    to_py(
        py,
        fmi::Error::CountMismatch {
            me,
            peer: me,
            what,
            expected,
            got,
        },
    )
}

fn bytes_list<'py>(py: Python<'py>, parts: Vec<Vec<u8>>) -> Vec<Bound<'py, PyBytes>> {
    parts.iter().map(|p| PyBytes::new(py, p)).collect()
}

impl Comm {
    fn wrap(comm: Communicator) -> Comm {
        Comm {
            comm,
            deadline_ms: AtomicU64::new(0),
        }
    }

    /// The communicator with the deadline currently set.
    fn c(&self) -> Communicator {
        let ms = self.deadline_ms.load(Ordering::Relaxed);
        let deadline = if ms == 0 {
            self.comm.deadline()
        } else {
            Duration::from_millis(ms)
        };
        self.comm.with_deadline(deadline)
    }

    fn me(&self) -> Rank {
        self.comm.rank()
    }

    fn p(&self) -> usize {
        self.comm.size() as usize
    }

    fn rank_arg(&self, py: Python<'_>, rank: i64, what: &str) -> PyResult<Rank> {
        let size = self.comm.size();
        match u32::try_from(rank) {
            Ok(r) if r < size => Ok(Rank(r)),
            _ => Err(raise(
                py,
                "InvalidRankError",
                format!("{what} {rank} is not in this job of {size} ranks (valid: 0..{size})"),
                None,
            )),
        }
    }

    /// The receive buffer of a rooted collective at its root.
    fn root_buf(
        py: Python<'_>,
        obj: Option<&Bound<'_, PyAny>>,
        what: &'static str,
    ) -> PyResult<Buf> {
        let obj = obj.ok_or_else(|| invalid(py, format!("{what} is required at the root")))?;
        Buf::get(obj, true, what)
    }
}

#[pymethods]
impl Comm {
    #[new]
    #[pyo3(signature = (rank, size, job, config = None, rendezvous = None, token = None, channel = None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        rank: i64,
        size: i64,
        job: &str,
        config: Option<PathBuf>,
        rendezvous: Option<String>,
        token: Option<String>,
        channel: Option<String>,
    ) -> PyResult<Comm> {
        let size = u32::try_from(size)
            .ok()
            .filter(|s| *s > 0)
            .ok_or_else(|| invalid(py, format!("size {size} is not a number of ranks >= 1")))?;
        let rank = u32::try_from(rank)
            .ok()
            .filter(|r| *r < size)
            .ok_or_else(|| {
                raise(
                    py,
                    "InvalidRankError",
                    format!("rank {rank} is not in this job of {size} ranks (valid: 0..{size})"),
                    None,
                )
            })?;
        // Checked here so that the error names the job id, not an environment variable.
        fmi::JobId::new(job.to_owned()).or_raise(py)?;
        let mut settings = EnvSettings::new(rank, size, job).or_raise(py)?;
        settings.config = config;
        settings.rendezvous = rendezvous.filter(|s| !s.is_empty());
        settings.token = token.filter(|s| !s.is_empty());
        settings.channel = channel.filter(|s| !s.is_empty());
        let comm = py
            .detach(move || Communicator::from_settings(settings))
            .or_raise(py)?;
        Ok(Comm::wrap(comm))
    }

    /// Joins the job described by the `FMI_*` environment variables (as set by `fmi run`).
    #[staticmethod]
    fn from_env(py: Python<'_>) -> PyResult<Comm> {
        let comm = py.detach(Communicator::from_env).or_raise(py)?;
        Ok(Comm::wrap(comm))
    }

    /// The communicators of an in-process job over the memory channel (index = rank).
    #[staticmethod]
    fn local_world(py: Python<'_>, size: i64) -> PyResult<Vec<Comm>> {
        let size = u32::try_from(size)
            .ok()
            .filter(|s| *s > 0)
            .ok_or_else(|| invalid(py, format!("size {size} is not a number of ranks >= 1")))?;
        let world = blocking::local_world(size).or_raise(py)?;
        Ok(world.into_iter().map(Comm::wrap).collect())
    }

    #[getter]
    fn rank(&self) -> u32 {
        self.comm.rank().0
    }

    #[getter]
    fn size(&self) -> u32 {
        self.comm.size()
    }

    #[getter]
    fn job(&self) -> String {
        self.comm.job().to_string()
    }

    #[getter]
    fn channel(&self) -> &'static str {
        self.comm.channel_name()
    }

    /// The deadline of every call, in seconds.
    #[getter]
    fn deadline(&self) -> f64 {
        self.c().deadline().as_secs_f64()
    }

    fn set_deadline(&self, py: Python<'_>, seconds: f64) -> PyResult<()> {
        let ms = seconds * 1000.0;
        if !ms.is_finite() || ms < 1.0 || ms > u64::MAX as f64 {
            return Err(invalid(
                py,
                format!("deadline {seconds} s is not a duration of at least 1 ms"),
            ));
        }
        self.deadline_ms.store(ms as u64, Ordering::Relaxed);
        Ok(())
    }

    // ------------------------------------------------------------------ bytes

    fn send_bytes(&self, py: Python<'_>, data: &[u8], dest: i64, tag: i64) -> PyResult<()> {
        let (dest, tag) = (self.rank_arg(py, dest, "dest")?, tag_arg(py, tag)?);
        let c = self.c();
        py.detach(|| c.send(dest, tag, data)).or_raise(py)
    }

    fn recv_bytes<'py>(
        &self,
        py: Python<'py>,
        source: i64,
        tag: i64,
    ) -> PyResult<Bound<'py, PyBytes>> {
        let (source, tag) = (self.rank_arg(py, source, "source")?, tag_arg(py, tag)?);
        let c = self.c();
        let bytes: Vec<u8> = py.detach(|| c.recv(source, tag)).or_raise(py)?;
        Ok(PyBytes::new(py, &bytes))
    }

    fn sendrecv_bytes<'py>(
        &self,
        py: Python<'py>,
        data: &[u8],
        dest: i64,
        source: i64,
        sendtag: i64,
        recvtag: i64,
    ) -> PyResult<Bound<'py, PyBytes>> {
        let dest = self.rank_arg(py, dest, "dest")?;
        let source = self.rank_arg(py, source, "source")?;
        let (sendtag, recvtag) = (tag_arg(py, sendtag)?, tag_arg(py, recvtag)?);
        let c = self.c();
        let bytes: Vec<u8> = py
            .detach(|| c.sendrecv(dest, sendtag, data, source, recvtag))
            .or_raise(py)?;
        Ok(PyBytes::new(py, &bytes))
    }

    fn isend_bytes(&self, py: Python<'_>, data: &[u8], dest: i64, tag: i64) -> PyResult<Request> {
        let (dest, tag) = (self.rank_arg(py, dest, "dest")?, tag_arg(py, tag)?);
        let request = self.c().isend(dest, tag, data).or_raise(py)?;
        Ok(Request::send(request))
    }

    fn irecv_bytes(&self, py: Python<'_>, source: i64, tag: i64) -> PyResult<Request> {
        let (source, tag) = (self.rank_arg(py, source, "source")?, tag_arg(py, tag)?);
        let request = self.c().irecv::<u8>(source, tag).or_raise(py)?;
        Ok(Request::recv_bytes(request))
    }

    fn barrier(&self, py: Python<'_>) -> PyResult<()> {
        let c = self.c();
        py.detach(|| c.barrier()).or_raise(py)
    }

    #[pyo3(signature = (data, root))]
    fn bcast_bytes<'py>(
        &self,
        py: Python<'py>,
        data: Option<&[u8]>,
        root: i64,
    ) -> PyResult<Bound<'py, PyBytes>> {
        let root = self.rank_arg(py, root, "root")?;
        let data = match data {
            Some(d) => d,
            None if self.me() == root => return Err(invalid(py, "the root must pass data")),
            None => &[],
        };
        let c = self.c();
        let bytes: Vec<u8> = py.detach(|| c.bcast(root, data)).or_raise(py)?;
        Ok(PyBytes::new(py, &bytes))
    }

    fn gather_bytes<'py>(
        &self,
        py: Python<'py>,
        data: &[u8],
        root: i64,
    ) -> PyResult<Option<Vec<Bound<'py, PyBytes>>>> {
        let root = self.rank_arg(py, root, "root")?;
        let c = self.c();
        let parts = py.detach(|| c.gatherv(root, data)).or_raise(py)?;
        Ok(parts.map(|p| bytes_list(py, p)))
    }

    #[pyo3(signature = (parts, root))]
    fn scatter_bytes<'py>(
        &self,
        py: Python<'py>,
        parts: Option<Vec<Vec<u8>>>,
        root: i64,
    ) -> PyResult<Bound<'py, PyBytes>> {
        let root = self.rank_arg(py, root, "root")?;
        let (data, counts) = if self.me() == root {
            let parts = parts.ok_or_else(|| invalid(py, "the root must pass one part per rank"))?;
            if parts.len() != self.p() {
                return Err(count_mismatch(
                    py,
                    self.me(),
                    "scatter: the root needs one object per rank",
                    self.p(),
                    parts.len(),
                ));
            }
            let counts: Vec<usize> = parts.iter().map(Vec::len).collect();
            (parts.concat(), counts)
        } else {
            (Vec::new(), Vec::new())
        };
        let c = self.c();
        let mine: Vec<u8> = py
            .detach(|| c.scatterv(root, &data, &counts))
            .or_raise(py)?;
        Ok(PyBytes::new(py, &mine))
    }

    fn allgather_bytes<'py>(
        &self,
        py: Python<'py>,
        data: &[u8],
    ) -> PyResult<Vec<Bound<'py, PyBytes>>> {
        let c = self.c();
        let parts = py.detach(|| c.allgatherv(data)).or_raise(py)?;
        Ok(bytes_list(py, parts))
    }

    fn alltoall_bytes<'py>(
        &self,
        py: Python<'py>,
        parts: Vec<Vec<u8>>,
    ) -> PyResult<Vec<Bound<'py, PyBytes>>> {
        if parts.len() != self.p() {
            return Err(count_mismatch(
                py,
                self.me(),
                "alltoall: one object per rank is needed",
                self.p(),
                parts.len(),
            ));
        }
        let counts: Vec<usize> = parts.iter().map(Vec::len).collect();
        let data = parts.concat();
        let c = self.c();
        let got = py.detach(|| c.alltoallv(&data, &counts)).or_raise(py)?;
        Ok(bytes_list(py, got))
    }

    // ------------------------------------------------------------------ buffers

    fn send_buf(
        &self,
        py: Python<'_>,
        buf: &Bound<'_, PyAny>,
        dest: i64,
        tag: i64,
    ) -> PyResult<()> {
        let (dest, tag) = (self.rank_arg(py, dest, "dest")?, tag_arg(py, tag)?);
        let b = Buf::get(buf, false, "buf")?;
        let c = self.c();
        // SAFETY: fmi only reads the buffer while the export keeps it alive.
        let data = unsafe { b.bytes() };
        py.detach(|| c.send(dest, tag, data)).or_raise(py)
    }

    fn recv_buf(
        &self,
        py: Python<'_>,
        buf: &Bound<'_, PyAny>,
        source: i64,
        tag: i64,
    ) -> PyResult<usize> {
        let (source, tag) = (self.rank_arg(py, source, "source")?, tag_arg(py, tag)?);
        let b = Buf::get(buf, true, "buf")?;
        let c = self.c();
        with_type!(b.dt, |T| {
            // SAFETY: T is the buffer's type; this is the only slice of it.
            let out = unsafe { b.slice_mut::<T>() };
            py.detach(|| c.recv_into(source, tag, out)).or_raise(py)
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn sendrecv_buf(
        &self,
        py: Python<'_>,
        sendbuf: &Bound<'_, PyAny>,
        dest: i64,
        recvbuf: &Bound<'_, PyAny>,
        source: i64,
        sendtag: i64,
        recvtag: i64,
    ) -> PyResult<usize> {
        let dest = self.rank_arg(py, dest, "dest")?;
        let source = self.rank_arg(py, source, "source")?;
        let (sendtag, recvtag) = (tag_arg(py, sendtag)?, tag_arg(py, recvtag)?);
        let s = Buf::get(sendbuf, false, "sendbuf")?;
        let r = Buf::get(recvbuf, true, "recvbuf")?;
        let c = self.c();
        // SAFETY: only read during the call; the receive buffer is written after it.
        let data = unsafe { s.bytes() };
        let got: Vec<u8> = py
            .detach(|| c.sendrecv(dest, sendtag, data, source, recvtag))
            .or_raise(py)?;
        drop(s);
        drop(r);
        copy_into(py, recvbuf, &got, self.me(), source)
    }

    fn isend_buf(
        &self,
        py: Python<'_>,
        buf: &Bound<'_, PyAny>,
        dest: i64,
        tag: i64,
    ) -> PyResult<Request> {
        let (dest, tag) = (self.rank_arg(py, dest, "dest")?, tag_arg(py, tag)?);
        let b = Buf::get(buf, false, "buf")?;
        // SAFETY: read once, here: isend copies the data.
        let data = unsafe { b.bytes() };
        let request = self.c().isend(dest, tag, data).or_raise(py)?;
        Ok(Request::send(request))
    }

    fn irecv_buf(
        &self,
        py: Python<'_>,
        buf: &Bound<'_, PyAny>,
        source: i64,
        tag: i64,
    ) -> PyResult<Request> {
        let (source, tag) = (self.rank_arg(py, source, "source")?, tag_arg(py, tag)?);
        // Checked now so that a wrong buffer fails here rather than at wait().
        drop(Buf::get(buf, true, "buf")?);
        let request = self.c().irecv::<u8>(source, tag).or_raise(py)?;
        Ok(Request::recv_into(
            request,
            buf.clone().unbind(),
            self.me(),
            source,
        ))
    }

    fn bcast_buf(&self, py: Python<'_>, buf: &Bound<'_, PyAny>, root: i64) -> PyResult<()> {
        let root = self.rank_arg(py, root, "root")?;
        let b = Buf::get(buf, true, "buf")?;
        let c = self.c();
        with_type!(b.dt, |T| {
            // SAFETY: T is the buffer's type; this is the only slice of it.
            let out = unsafe { b.slice_mut::<T>() };
            py.detach(|| c.bcast_into(root, out)).or_raise(py)
        })
    }

    #[pyo3(signature = (sendbuf, recvbuf, root))]
    fn gather_buf(
        &self,
        py: Python<'_>,
        sendbuf: &Bound<'_, PyAny>,
        recvbuf: Option<&Bound<'_, PyAny>>,
        root: i64,
    ) -> PyResult<()> {
        let root = self.rank_arg(py, root, "root")?;
        let s = Buf::get(sendbuf, false, "sendbuf")?;
        let c = self.c();
        if self.me() != root {
            return with_type!(s.dt, |T| {
                // SAFETY: T is the buffer's type; only read.
                let data = unsafe { s.slice::<T>() };
                py.detach(|| c.gather(root, data)).or_raise(py).map(drop)
            });
        }
        let r = Comm::root_buf(py, recvbuf, "recvbuf")?;
        same_type(py, &s, &r)?;
        if r.count != s.count * self.p() {
            return Err(count_mismatch(
                py,
                self.me(),
                "Gather: recvbuf must hold size * len(sendbuf) elements",
                s.count * self.p(),
                r.count,
            ));
        }
        with_type!(s.dt, |T| {
            // SAFETY: T is both buffers' type; in_out copies overlapping input.
            let (data, out) = unsafe { in_out::<T>(Some(&s), &r) };
            let all = py.detach(|| c.gather(root, &data)).or_raise(py)?;
            out.copy_from_slice(&all.unwrap_or_default());
            Ok(())
        })
    }

    #[pyo3(signature = (sendbuf, recvbuf, root))]
    fn scatter_buf(
        &self,
        py: Python<'_>,
        sendbuf: Option<&Bound<'_, PyAny>>,
        recvbuf: &Bound<'_, PyAny>,
        root: i64,
    ) -> PyResult<()> {
        let root = self.rank_arg(py, root, "root")?;
        let r = Buf::get(recvbuf, true, "recvbuf")?;
        let c = self.c();
        let me = self.me();
        if me != root {
            return with_type!(r.dt, |T| {
                let mine: Vec<T> = py.detach(|| c.scatter(root, &[])).or_raise(py)?;
                if mine.len() != r.count {
                    return Err(count_mismatch(
                        py,
                        me,
                        "Scatter: recvbuf must hold one block",
                        mine.len(),
                        r.count,
                    ));
                }
                // SAFETY: T is the buffer's type; this is the only slice of it.
                unsafe { r.slice_mut::<T>() }.copy_from_slice(&mine);
                Ok(())
            });
        }
        let s = Buf::get(
            sendbuf.ok_or_else(|| invalid(py, "sendbuf is required at the root"))?,
            false,
            "sendbuf",
        )?;
        same_type(py, &s, &r)?;
        if s.count != r.count * self.p() {
            return Err(count_mismatch(
                py,
                me,
                "Scatter: sendbuf must hold size * len(recvbuf) elements",
                r.count * self.p(),
                s.count,
            ));
        }
        with_type!(s.dt, |T| {
            // SAFETY: T is both buffers' type; in_out copies overlapping input.
            let (data, out) = unsafe { in_out::<T>(Some(&s), &r) };
            let mine = py.detach(|| c.scatter(root, &data)).or_raise(py)?;
            out.copy_from_slice(&mine);
            Ok(())
        })
    }

    fn allgather_buf(
        &self,
        py: Python<'_>,
        sendbuf: &Bound<'_, PyAny>,
        recvbuf: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        let s = Buf::get(sendbuf, false, "sendbuf")?;
        let r = Buf::get(recvbuf, true, "recvbuf")?;
        same_type(py, &s, &r)?;
        if r.count != s.count * self.p() {
            return Err(count_mismatch(
                py,
                self.me(),
                "Allgather: recvbuf must hold size * len(sendbuf) elements",
                s.count * self.p(),
                r.count,
            ));
        }
        let c = self.c();
        with_type!(s.dt, |T| {
            // SAFETY: T is both buffers' type; in_out copies overlapping input.
            let (data, out) = unsafe { in_out::<T>(Some(&s), &r) };
            let all = py.detach(|| c.allgather(&data)).or_raise(py)?;
            out.copy_from_slice(&all);
            Ok(())
        })
    }

    fn alltoall_buf(
        &self,
        py: Python<'_>,
        sendbuf: &Bound<'_, PyAny>,
        recvbuf: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        let s = Buf::get(sendbuf, false, "sendbuf")?;
        let r = Buf::get(recvbuf, true, "recvbuf")?;
        same_type(py, &s, &r)?;
        if r.count != s.count || s.count % self.p() != 0 {
            return Err(count_mismatch(
                py,
                self.me(),
                "Alltoall: sendbuf and recvbuf must hold the same multiple of size elements",
                s.count,
                r.count,
            ));
        }
        let c = self.c();
        with_type!(s.dt, |T| {
            // SAFETY: T is both buffers' type; in_out copies overlapping input.
            let (data, out) = unsafe { in_out::<T>(Some(&s), &r) };
            let got = py.detach(|| c.alltoall(&data)).or_raise(py)?;
            out.copy_from_slice(&got);
            Ok(())
        })
    }

    /// `sendbuf` None means in place (the input is `recvbuf`'s contents).
    #[pyo3(signature = (sendbuf, recvbuf, op, root))]
    fn reduce_buf(
        &self,
        py: Python<'_>,
        sendbuf: Option<&Bound<'_, PyAny>>,
        recvbuf: Option<&Bound<'_, PyAny>>,
        op: &Bound<'_, Op>,
        root: i64,
    ) -> PyResult<()> {
        let root = self.rank_arg(py, root, "root")?;
        let op = op.get();
        let c = self.c();
        if self.me() != root {
            let s = Buf::get(
                sendbuf.ok_or_else(|| invalid(py, "IN_PLACE is only meaningful at the root"))?,
                false,
                "sendbuf",
            )?;
            return with_type!(s.dt, |T| {
                let (reduction, errors) = op.reduction::<T>(py, s.dt)?;
                // SAFETY: T is the buffer's type; only read.
                let data = unsafe { s.slice::<T>() };
                let result = py.detach(|| c.reduce(root, data, reduction));
                errors.check()?;
                result.or_raise(py).map(drop)
            });
        }
        let r = Comm::root_buf(py, recvbuf, "recvbuf")?;
        let s = sendbuf.map(|b| Buf::get(b, false, "sendbuf")).transpose()?;
        if let Some(s) = &s {
            same_type(py, s, &r)?;
            if s.count != r.count {
                return Err(count_mismatch(
                    py,
                    self.me(),
                    "Reduce: sendbuf and recvbuf must have the same length",
                    s.count,
                    r.count,
                ));
            }
        }
        with_type!(r.dt, |T| {
            let (reduction, errors) = op.reduction::<T>(py, r.dt)?;
            // SAFETY: T is both buffers' type; in_out copies overlapping input.
            let (data, out) = unsafe { in_out::<T>(s.as_ref(), &r) };
            let result = py.detach(|| c.reduce(root, &data, reduction));
            errors.check()?;
            out.copy_from_slice(&result.or_raise(py)?.unwrap_or_default());
            Ok(())
        })
    }

    /// `sendbuf` None means in place.
    #[pyo3(signature = (sendbuf, recvbuf, op))]
    fn allreduce_buf(
        &self,
        py: Python<'_>,
        sendbuf: Option<&Bound<'_, PyAny>>,
        recvbuf: &Bound<'_, PyAny>,
        op: &Bound<'_, Op>,
    ) -> PyResult<()> {
        let op = op.get();
        let r = Buf::get(recvbuf, true, "recvbuf")?;
        let s = sendbuf.map(|b| Buf::get(b, false, "sendbuf")).transpose()?;
        if let Some(s) = &s {
            same_type(py, s, &r)?;
            if s.count != r.count {
                return Err(count_mismatch(
                    py,
                    self.me(),
                    "Allreduce: sendbuf and recvbuf must have the same length",
                    s.count,
                    r.count,
                ));
            }
        }
        let c = self.c();
        with_type!(r.dt, |T| {
            let (reduction, errors) = op.reduction::<T>(py, r.dt)?;
            // SAFETY: T is both buffers' type; in_out copies overlapping input.
            let (data, out) = unsafe { in_out::<T>(s.as_ref(), &r) };
            let result = py.detach(|| c.allreduce_into(&data, out, reduction));
            errors.check()?;
            result.or_raise(py)
        })
    }

    fn reduce_scatter_block_buf(
        &self,
        py: Python<'_>,
        sendbuf: &Bound<'_, PyAny>,
        recvbuf: &Bound<'_, PyAny>,
        op: &Bound<'_, Op>,
    ) -> PyResult<()> {
        let op = op.get();
        let s = Buf::get(sendbuf, false, "sendbuf")?;
        let r = Buf::get(recvbuf, true, "recvbuf")?;
        same_type(py, &s, &r)?;
        if s.count != r.count * self.p() {
            return Err(count_mismatch(
                py,
                self.me(),
                "Reduce_scatter_block: sendbuf must hold size * len(recvbuf) elements",
                r.count * self.p(),
                s.count,
            ));
        }
        let c = self.c();
        with_type!(r.dt, |T| {
            let (reduction, errors) = op.reduction::<T>(py, r.dt)?;
            // SAFETY: T is both buffers' type; in_out copies overlapping input.
            let (data, out) = unsafe { in_out::<T>(Some(&s), &r) };
            let result = py.detach(|| c.reduce_scatter(&data, reduction));
            errors.check()?;
            out.copy_from_slice(&result.or_raise(py)?);
            Ok(())
        })
    }

    /// `sendbuf` None means in place; `exclusive` selects exscan (rank 0's `recvbuf` untouched).
    #[pyo3(signature = (sendbuf, recvbuf, op, exclusive))]
    fn scan_buf(
        &self,
        py: Python<'_>,
        sendbuf: Option<&Bound<'_, PyAny>>,
        recvbuf: &Bound<'_, PyAny>,
        op: &Bound<'_, Op>,
        exclusive: bool,
    ) -> PyResult<()> {
        let op = op.get();
        let r = Buf::get(recvbuf, true, "recvbuf")?;
        let s = sendbuf.map(|b| Buf::get(b, false, "sendbuf")).transpose()?;
        if let Some(s) = &s {
            same_type(py, s, &r)?;
            if s.count != r.count {
                return Err(count_mismatch(
                    py,
                    self.me(),
                    "Scan: sendbuf and recvbuf must have the same length",
                    s.count,
                    r.count,
                ));
            }
        }
        let c = self.c();
        with_type!(r.dt, |T| {
            let (reduction, errors) = op.reduction::<T>(py, r.dt)?;
            // SAFETY: T is both buffers' type; in_out copies overlapping input.
            let (data, out) = unsafe { in_out::<T>(s.as_ref(), &r) };
            let result = py.detach(|| {
                if exclusive {
                    c.exscan(&data, reduction)
                } else {
                    c.scan(&data, reduction).map(Some)
                }
            });
            errors.check()?;
            if let Some(got) = result.or_raise(py)? {
                out.copy_from_slice(&got);
            }
            Ok(())
        })
    }

    fn __repr__(&self) -> String {
        format!(
            "fmi.Communicator(rank={}, size={}, job={:?}, channel={:?})",
            self.comm.rank().0,
            self.comm.size(),
            self.comm.job().to_string(),
            self.comm.channel_name()
        )
    }
}
