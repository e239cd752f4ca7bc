//! Communicators, point-to-point messages and requests.

use std::ffi::{c_char, c_int, c_void, CStr};
use std::path::PathBuf;
use std::ptr;
use std::time::Duration;

use fmi::blocking::{self, Communicator};
use fmi::{EnvSettings, Rank};

use crate::buf::{input, output};
use crate::fmi_status;
use crate::status::{guard, Failure};
use crate::types::{fmi_datatype, with_type, Dt};

/// A communicator: this process's membership of one job (MPI's `MPI_COMM_WORLD`). Made by
/// `fmi_init`, `fmi_init_from_env` or `fmi_local_world`, freed by `fmi_finalize`.
///
/// One communicator may be used from several threads at once, except with `fmi_finalize` and
/// `fmi_comm_set_deadline`; as in MPI, every rank must call the collectives in the same order.
pub struct fmi_comm {
    comm: Communicator,
}

/// A pending `fmi_isend` or `fmi_irecv`, completed by `fmi_wait` or `fmi_test` (which free it and
/// set the handle to NULL) or dropped by `fmi_request_free`.
pub struct fmi_request {
    pending: Pending,
}

enum Pending {
    Send(blocking::Request<()>),
    Recv {
        request: blocking::Request<Vec<u8>>,
        target: RecvTarget,
    },
}

/// Where a pending receive writes its message.
struct RecvTarget {
    buf: *mut c_void,
    count: usize,
    dt: Dt,
    me: Rank,
    src: Rank,
}

/// Checks a communicator argument and borrows it.
///
/// # Safety
/// A non-NULL `comm` must point to a live communicator for `'a`.
pub(crate) unsafe fn comm_ref<'a>(comm: *const fmi_comm) -> Result<&'a Communicator, Failure> {
    // SAFETY: the caller guarantees a non-NULL comm is live; NULL becomes None.
    unsafe { comm.as_ref() }
        .map(|c| &c.comm)
        .ok_or_else(|| Failure::invalid("comm is NULL"))
}

/// Checks a rank argument against the communicator's size.
pub(crate) fn rank_arg(rank: c_int, size: u32, what: &str) -> Result<Rank, Failure> {
    match u32::try_from(rank) {
        Ok(r) if r < size => Ok(Rank(r)),
        _ => Err(Failure::new(
            fmi_status::FMI_ERR_INVALID_RANK,
            format!("{what} {rank} is not in this job of {size} ranks (valid: 0..{size})"),
        )),
    }
}

fn tag_arg(tag: c_int) -> Result<u32, Failure> {
    u32::try_from(tag)
        .map_err(|_| Failure::invalid(format!("tag {tag} is negative; tags are 0..=INT_MAX")))
}

/// Writes `value` to `out` unless `out` is NULL.
///
/// # Safety
/// A non-NULL `out` must be valid for writing one `T`.
pub(crate) unsafe fn set_opt<T>(out: *mut T, value: T) {
    if !out.is_null() {
        // SAFETY: non-NULL, and the caller guarantees it is writable.
        unsafe { out.write(value) };
    }
}

/// An optional C string argument.
///
/// # Safety
/// A non-NULL `s` must point to a NUL-terminated string.
unsafe fn opt_str(s: *const c_char, what: &str) -> Result<Option<String>, Failure> {
    if s.is_null() {
        return Ok(None);
    }
    // SAFETY: non-NULL and NUL-terminated by the caller's guarantee.
    let s = unsafe { CStr::from_ptr(s) };
    let s = s
        .to_str()
        .map_err(|_| Failure::invalid(format!("{what} is not valid UTF-8")))?;
    Ok((!s.is_empty()).then(|| s.to_owned()))
}

/// Stores a new communicator in `*out`.
///
/// # Safety
/// `out` must be non-NULL and writable (checked by the callers' first step).
unsafe fn publish(out: *mut *mut fmi_comm, comm: Communicator) {
    // SAFETY: the caller's guarantee.
    unsafe { out.write(Box::into_raw(Box::new(fmi_comm { comm }))) };
}

/// Checks an out-pointer for a handle and clears it, so it is NULL on every failure.
///
/// # Safety
/// A non-NULL `out` must be writable.
unsafe fn clear_out<T>(out: *mut *mut T) -> Result<(), Failure> {
    if out.is_null() {
        return Err(Failure::invalid("out is NULL"));
    }
    // SAFETY: non-NULL and writable by the caller's guarantee.
    unsafe { out.write(ptr::null_mut()) };
    Ok(())
}

/// The version of the fmi library, e.g. `"0.1.0"` (a static string).
#[no_mangle]
pub extern "C" fn fmi_version() -> *const c_char {
    const VERSION: &CStr =
        match CStr::from_bytes_with_nul(concat!(env!("CARGO_PKG_VERSION"), "\0").as_bytes()) {
            Ok(v) => v,
            Err(_) => c"unknown",
        };
    VERSION.as_ptr()
}

/// Joins the job described by the environment (`FMI_RANK`, `FMI_SIZE`, `FMI_JOB`,
/// `FMI_RENDEZVOUS`, `FMI_TOKEN`, `FMI_CONFIG`, `FMI_CHANNEL`), as set by `fmi run`. Blocks until
/// the job's ranks are connected. `*out` is NULL on failure.
///
/// # Safety
/// `out` must be NULL (an error) or writable.
#[no_mangle]
pub unsafe extern "C" fn fmi_init_from_env(out: *mut *mut fmi_comm) -> fmi_status {
    guard("fmi_init_from_env", || {
        // SAFETY: the caller's guarantee.
        unsafe { clear_out(out) }?;
        let comm = Communicator::from_env()?;
        // SAFETY: checked by clear_out.
        unsafe { publish(out, comm) };
        Ok(())
    })
}

/// Joins job `job` as rank `rank` of `size`, with explicit settings instead of environment
/// variables (a Lambda handler gets them in its event). `config_path` (a TOML file),
/// `rendezvous` (`host:port`, needed when `size > 1`) and `token` may be NULL. `*out` is NULL on
/// failure.
///
/// # Safety
/// `job` and the non-NULL optional strings must be NUL-terminated; `out` must be writable.
#[no_mangle]
pub unsafe extern "C" fn fmi_init(
    rank: c_int,
    size: c_int,
    job: *const c_char,
    config_path: *const c_char,
    rendezvous: *const c_char,
    token: *const c_char,
    out: *mut *mut fmi_comm,
) -> fmi_status {
    guard("fmi_init", || {
        // SAFETY: the caller's guarantee.
        unsafe { clear_out(out) }?;
        let size = u32::try_from(size)
            .ok()
            .filter(|s| *s > 0)
            .ok_or_else(|| Failure::invalid(format!("size {size} is not at least 1")))?;
        let rank = rank_arg(rank, size, "rank")?.0;
        // SAFETY: the caller guarantees NUL-terminated strings.
        let job = unsafe { opt_str(job, "job") }?.ok_or_else(|| Failure::invalid("job is NULL"))?;
        // Checked here so that the error names the job id, not an environment variable.
        fmi::JobId::new(job.clone())?;
        let mut settings = EnvSettings::new(rank, size, &job)?;
        // SAFETY: as above.
        settings.config = unsafe { opt_str(config_path, "config_path") }?.map(PathBuf::from);
        // SAFETY: as above.
        settings.rendezvous = unsafe { opt_str(rendezvous, "rendezvous") }?;
        // SAFETY: as above.
        settings.token = unsafe { opt_str(token, "token") }?;
        let comm = Communicator::from_settings(settings)?;
        // SAFETY: checked by clear_out.
        unsafe { publish(out, comm) };
        Ok(())
    })
}

/// Makes the `size` communicators of an in-process job over the memory channel and stores them
/// in `comms[0..size]` (index = rank): for tests and experiments, one thread per rank. Each must
/// be freed with `fmi_finalize`.
///
/// # Safety
/// `comms` must point to `size` writable pointers.
#[no_mangle]
pub unsafe extern "C" fn fmi_local_world(size: c_int, comms: *mut *mut fmi_comm) -> fmi_status {
    guard("fmi_local_world", || {
        let n = usize::try_from(size)
            .ok()
            .filter(|s| *s > 0)
            .ok_or_else(|| Failure::invalid(format!("size {size} is not at least 1")))?;
        if comms.is_null() {
            return Err(Failure::invalid("comms is NULL"));
        }
        let world = blocking::local_world(n as u32)?;
        for (i, comm) in world.into_iter().enumerate() {
            // SAFETY: the caller guarantees `size` writable slots.
            unsafe { publish(comms.add(i), comm) };
        }
        Ok(())
    })
}

/// Leaves the job and frees the communicator. Pending requests stay valid.
///
/// # Safety
/// `comm` must be NULL (an error) or a live communicator that no other thread is using; it is
/// invalid afterwards.
#[no_mangle]
pub unsafe extern "C" fn fmi_finalize(comm: *mut fmi_comm) -> fmi_status {
    guard("fmi_finalize", || {
        if comm.is_null() {
            return Err(Failure::invalid("comm is NULL"));
        }
        // SAFETY: communicators are only made by Box::into_raw in `publish`; the caller
        // guarantees this one is live and not used elsewhere.
        drop(unsafe { Box::from_raw(comm) });
        Ok(())
    })
}

/// Stores this process's rank in `*rank`.
///
/// # Safety
/// `comm` must be NULL or live; `rank` must be NULL (an error) or writable.
#[no_mangle]
pub unsafe extern "C" fn fmi_comm_rank(comm: *const fmi_comm, rank: *mut c_int) -> fmi_status {
    guard("fmi_comm_rank", || {
        // SAFETY: the caller's guarantee.
        let comm = unsafe { comm_ref(comm) }?;
        if rank.is_null() {
            return Err(Failure::invalid("rank is NULL"));
        }
        // SAFETY: non-NULL and writable by the caller's guarantee; a rank is below the size,
        // which fits an int (checked at init).
        unsafe { rank.write(comm.rank().0 as c_int) };
        Ok(())
    })
}

/// Stores the number of ranks in `*size`.
///
/// # Safety
/// `comm` must be NULL or live; `size` must be NULL (an error) or writable.
#[no_mangle]
pub unsafe extern "C" fn fmi_comm_size(comm: *const fmi_comm, size: *mut c_int) -> fmi_status {
    guard("fmi_comm_size", || {
        // SAFETY: the caller's guarantee.
        let comm = unsafe { comm_ref(comm) }?;
        if size.is_null() {
            return Err(Failure::invalid("size is NULL"));
        }
        let n = c_int::try_from(comm.size())
            .map_err(|_| Failure::invalid("the job has more ranks than an int holds"))?;
        // SAFETY: non-NULL and writable by the caller's guarantee.
        unsafe { size.write(n) };
        Ok(())
    })
}

/// Sets the deadline of every later call on `comm` (default 60 s or the configuration's
/// `deadline_secs`): a peer silent for longer becomes `FMI_ERR_TIMEOUT`.
///
/// # Safety
/// `comm` must be NULL (an error) or live, and not in use by another thread.
#[no_mangle]
pub unsafe extern "C" fn fmi_comm_set_deadline(comm: *mut fmi_comm, millis: u64) -> fmi_status {
    guard("fmi_comm_set_deadline", || {
        // SAFETY: the caller guarantees a non-NULL comm is live and not shared right now.
        let comm = unsafe { comm.as_mut() }.ok_or_else(|| Failure::invalid("comm is NULL"))?;
        if millis == 0 {
            return Err(Failure::invalid("a deadline of 0 ms would fail every call"));
        }
        comm.comm = comm.comm.with_deadline(Duration::from_millis(millis));
        Ok(())
    })
}

/// Sends `count` elements of `datatype` from `buf` to rank `dst` with `tag` (>= 0). Messages to
/// one destination with one tag arrive in the order sent. Returns once the message is handed to
/// the channel.
///
/// # Safety
/// `comm` must be NULL or live; `buf` must hold `count` elements (or be anything if `count` is 0).
#[no_mangle]
pub unsafe extern "C" fn fmi_send(
    comm: *const fmi_comm,
    buf: *const c_void,
    count: usize,
    datatype: fmi_datatype,
    dst: c_int,
    tag: c_int,
) -> fmi_status {
    guard("fmi_send", || {
        // SAFETY: the caller's guarantee.
        let comm = unsafe { comm_ref(comm) }?;
        let dt = Dt::from_c(datatype)?;
        let dst = rank_arg(dst, comm.size(), "dst")?;
        let tag = tag_arg(tag)?;
        with_type!(dt, |T| {
            // SAFETY: the caller guarantees `buf` holds `count` elements.
            let data = unsafe { input::<T>(buf, count, "buf") }?;
            comm.send(dst, tag, data)?;
        });
        Ok(())
    })
}

/// Receives the next message from rank `src` with `tag` into `buf`, which holds up to `count`
/// elements of `datatype`; stores the number of elements received in `*received` (unless
/// `received` is NULL). A longer message is `FMI_ERR_COUNT_MISMATCH`, one that is not a whole
/// number of elements `FMI_ERR_TYPE_MISMATCH` (either way it is consumed).
///
/// # Safety
/// `comm` must be NULL or live; `buf` must have room for `count` elements; `received` must be
/// NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn fmi_recv(
    comm: *const fmi_comm,
    buf: *mut c_void,
    count: usize,
    datatype: fmi_datatype,
    src: c_int,
    tag: c_int,
    received: *mut usize,
) -> fmi_status {
    guard("fmi_recv", || {
        // SAFETY: the caller's guarantee.
        let comm = unsafe { comm_ref(comm) }?;
        let dt = Dt::from_c(datatype)?;
        let src = rank_arg(src, comm.size(), "src")?;
        let tag = tag_arg(tag)?;
        let n = with_type!(dt, |T| {
            // SAFETY: the caller guarantees room for `count` elements.
            let out = unsafe { output::<T>(buf, count, "buf") }?;
            comm.recv_into(src, tag, out)?
        });
        // SAFETY: the caller's guarantee.
        unsafe { set_opt(received, n) };
        Ok(())
    })
}

/// Sends `sendcount` elements to `dst` and receives up to `recvcount` elements from `src` at the
/// same time, so that exchanges cannot deadlock; `*received` (unless NULL) is the number of
/// elements received.
///
/// # Safety
/// As `fmi_send` for the send buffer and `fmi_recv` for the receive buffer.
#[no_mangle]
pub unsafe extern "C" fn fmi_sendrecv(
    comm: *const fmi_comm,
    sendbuf: *const c_void,
    sendcount: usize,
    sendtype: fmi_datatype,
    dst: c_int,
    sendtag: c_int,
    recvbuf: *mut c_void,
    recvcount: usize,
    recvtype: fmi_datatype,
    src: c_int,
    recvtag: c_int,
    received: *mut usize,
) -> fmi_status {
    guard("fmi_sendrecv", || {
        // SAFETY: the caller's guarantee.
        let comm = unsafe { comm_ref(comm) }?;
        let (st, rt) = (Dt::from_c(sendtype)?, Dt::from_c(recvtype)?);
        let dst = rank_arg(dst, comm.size(), "dst")?;
        let src = rank_arg(src, comm.size(), "src")?;
        let (sendtag, recvtag) = (tag_arg(sendtag)?, tag_arg(recvtag)?);
        // The wire carries bytes: send the elements as bytes, receive typed.
        let bytes = st
            .size()
            .checked_mul(sendcount)
            .ok_or_else(|| Failure::invalid("sendcount is too large"))?;
        let n = with_type!(st, |S| {
            // SAFETY: the caller guarantees `sendbuf` holds `sendcount` elements (this checks
            // NULL, alignment and size).
            unsafe { input::<S>(sendbuf, sendcount, "sendbuf") }?;
            // SAFETY: just checked: `bytes` bytes are readable at `sendbuf` (none if 0).
            let data = unsafe { input::<u8>(sendbuf, bytes, "sendbuf") }?;
            with_type!(rt, |R| {
                // SAFETY: the caller guarantees room for `recvcount` elements.
                let out = unsafe { output::<R>(recvbuf, recvcount, "recvbuf") }?;
                let got: Vec<R> = comm.sendrecv(dst, sendtag, data, src, recvtag)?;
                if got.len() > out.len() {
                    return Err(fmi::Error::CountMismatch {
                        me: comm.rank(),
                        peer: src,
                        what: "fmi_sendrecv: message longer than the receive buffer",
                        expected: out.len(),
                        got: got.len(),
                    }
                    .into());
                }
                out[..got.len()].copy_from_slice(&got);
                got.len()
            })
        });
        // SAFETY: the caller's guarantee.
        unsafe { set_opt(received, n) };
        Ok(())
    })
}

/// Starts sending a copy of `count` elements of `buf` to `dst`: `buf` may be reused as soon as
/// this returns. Complete the request with `fmi_wait` or `fmi_test`.
///
/// # Safety
/// As `fmi_send`; `request` must be NULL (an error) or writable.
#[no_mangle]
pub unsafe extern "C" fn fmi_isend(
    comm: *const fmi_comm,
    buf: *const c_void,
    count: usize,
    datatype: fmi_datatype,
    dst: c_int,
    tag: c_int,
    request: *mut *mut fmi_request,
) -> fmi_status {
    guard("fmi_isend", || {
        // SAFETY: the caller's guarantee.
        unsafe { clear_out(request) }?;
        // SAFETY: the caller's guarantee.
        let comm = unsafe { comm_ref(comm) }?;
        let dt = Dt::from_c(datatype)?;
        let dst = rank_arg(dst, comm.size(), "dst")?;
        let tag = tag_arg(tag)?;
        let pending = with_type!(dt, |T| {
            // SAFETY: the caller guarantees `buf` holds `count` elements.
            let data = unsafe { input::<T>(buf, count, "buf") }?;
            comm.isend(dst, tag, data)?
        });
        let boxed = Box::new(fmi_request {
            pending: Pending::Send(pending),
        });
        // SAFETY: checked by clear_out.
        unsafe { request.write(Box::into_raw(boxed)) };
        Ok(())
    })
}

/// Starts receiving a message from `src` with `tag` into `buf` (room for `count` elements). The
/// buffer is written when `fmi_wait` or `fmi_test` completes the request, and must stay valid
/// until then.
///
/// # Safety
/// As `fmi_recv`, with `buf` valid until the request completes or is freed; `request` must be
/// NULL (an error) or writable.
#[no_mangle]
pub unsafe extern "C" fn fmi_irecv(
    comm: *const fmi_comm,
    buf: *mut c_void,
    count: usize,
    datatype: fmi_datatype,
    src: c_int,
    tag: c_int,
    request: *mut *mut fmi_request,
) -> fmi_status {
    guard("fmi_irecv", || {
        // SAFETY: the caller's guarantee.
        unsafe { clear_out(request) }?;
        // SAFETY: the caller's guarantee.
        let comm = unsafe { comm_ref(comm) }?;
        let dt = Dt::from_c(datatype)?;
        let src = rank_arg(src, comm.size(), "src")?;
        let tag = tag_arg(tag)?;
        // Validate the buffer now; it is written at completion.
        with_type!(dt, |T| {
            // SAFETY: the caller guarantees room for `count` elements; nothing is written yet.
            unsafe { output::<T>(buf, count, "buf") }?;
        });
        let pending = Pending::Recv {
            request: comm.irecv::<u8>(src, tag)?,
            target: RecvTarget {
                buf,
                count,
                dt,
                me: comm.rank(),
                src,
            },
        };
        let boxed = Box::new(fmi_request { pending });
        // SAFETY: checked by clear_out.
        unsafe { request.write(Box::into_raw(boxed)) };
        Ok(())
    })
}

impl RecvTarget {
    /// Copies a received message into the buffer: the number of elements.
    fn finish(&self, result: fmi::Result<Vec<u8>>) -> Result<usize, Failure> {
        let bytes = result?;
        let size = self.dt.size();
        if bytes.len() % size != 0 {
            return Err(fmi::Error::TypeMismatch {
                me: self.me,
                peer: self.src,
                len: bytes.len(),
                elem_size: size,
            }
            .into());
        }
        let n = bytes.len() / size;
        if n > self.count {
            return Err(fmi::Error::CountMismatch {
                me: self.me,
                peer: self.src,
                what: "fmi_irecv: message longer than the buffer",
                expected: self.count,
                got: n,
            }
            .into());
        }
        if n > 0 {
            // SAFETY: fmi_irecv checked that `buf` is non-NULL with room for `count` >= n
            // elements, and its caller keeps it valid until completion; `bytes` is a separate
            // allocation.
            unsafe { ptr::copy_nonoverlapping(bytes.as_ptr(), self.buf.cast::<u8>(), bytes.len()) };
        }
        Ok(n)
    }
}

impl Pending {
    /// Blocks until the operation completes: the number of elements received (0 for sends).
    fn wait(self) -> Result<usize, Failure> {
        match self {
            Pending::Send(r) => r.wait().map(|()| 0).map_err(Failure::from),
            Pending::Recv { request, target } => target.finish(request.wait()),
        }
    }

    /// Like `wait` if the operation has completed, `None` if not.
    fn test(&mut self) -> Option<Result<usize, Failure>> {
        match self {
            Pending::Send(r) => r.test().map(|res| res.map(|()| 0).map_err(Failure::from)),
            Pending::Recv { request, target } => request.test().map(|res| target.finish(res)),
        }
    }
}

/// Takes the request out of a handle, setting the handle to NULL.
///
/// # Safety
/// A non-NULL `request` must be readable and writable, and a non-NULL `*request` a live request.
unsafe fn take(request: *mut *mut fmi_request) -> Result<Box<fmi_request>, Failure> {
    if request.is_null() {
        return Err(Failure::invalid("request is NULL"));
    }
    // SAFETY: non-NULL, readable and writable by the caller's guarantee.
    let r = unsafe { request.replace(ptr::null_mut()) };
    if r.is_null() {
        return Err(Failure::invalid(
            "*request is NULL (already completed or freed?)",
        ));
    }
    // SAFETY: requests are only made by Box::into_raw in fmi_isend/fmi_irecv, and the caller
    // guarantees this one is live.
    Ok(unsafe { Box::from_raw(r) })
}

/// Blocks until the request completes, frees it and sets `*request` to NULL. For a receive,
/// `*received` (unless NULL) is the number of elements written to its buffer; 0 for a send.
///
/// # Safety
/// `request` must be NULL (an error) or point to a handle from `fmi_isend`/`fmi_irecv` (or
/// NULL); `received` must be NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn fmi_wait(
    request: *mut *mut fmi_request,
    received: *mut usize,
) -> fmi_status {
    guard("fmi_wait", || {
        // SAFETY: the caller's guarantee.
        let req = unsafe { take(request) }?;
        let n = req.pending.wait()?;
        // SAFETY: the caller's guarantee.
        unsafe { set_opt(received, n) };
        Ok(())
    })
}

/// Checks whether the request has completed without blocking. If it has, `*flag` is 1, the
/// request is freed, `*request` set to NULL and the result returned as by `fmi_wait`; if not,
/// `*flag` is 0 and `FMI_OK` is returned.
///
/// # Safety
/// As `fmi_wait`; `flag` must be NULL (an error) or writable.
#[no_mangle]
pub unsafe extern "C" fn fmi_test(
    request: *mut *mut fmi_request,
    flag: *mut c_int,
    received: *mut usize,
) -> fmi_status {
    guard("fmi_test", || {
        if flag.is_null() {
            return Err(Failure::invalid("flag is NULL"));
        }
        // SAFETY: non-NULL and writable by the caller's guarantee.
        unsafe { flag.write(0) };
        if request.is_null() {
            return Err(Failure::invalid("request is NULL"));
        }
        // SAFETY: non-NULL and readable by the caller's guarantee; a non-NULL handle is a live
        // request that nothing else uses during this call.
        let req = unsafe { (*request).as_mut() }
            .ok_or_else(|| Failure::invalid("*request is NULL (already completed or freed?)"))?;
        let Some(result) = req.pending.test() else {
            return Ok(());
        };
        // SAFETY: as above; this frees the request and clears the handle.
        drop(unsafe { take(request) }?);
        // SAFETY: as above.
        unsafe { flag.write(1) };
        let n = result?;
        // SAFETY: the caller's guarantee.
        unsafe { set_opt(received, n) };
        Ok(())
    })
}

/// Frees a request without completing it: a send still goes out, a received message is
/// discarded. Sets `*request` to NULL.
///
/// # Safety
/// As `fmi_wait`.
#[no_mangle]
pub unsafe extern "C" fn fmi_request_free(request: *mut *mut fmi_request) -> fmi_status {
    guard("fmi_request_free", || {
        // SAFETY: the caller's guarantee.
        drop(unsafe { take(request) }?);
        Ok(())
    })
}
