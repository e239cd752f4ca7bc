//! Collective operations. Every rank calls them in the same order with matching counts, datatype
//! and op, as in MPI. Buffers are given as (pointer, count, datatype); "root only" arguments are
//! ignored (and may be NULL) on the other ranks. A send buffer may be the same as the receive
//! buffer (fmi copies it first), which gives the effect of `MPI_IN_PLACE`.

use std::ffi::{c_int, c_void};

use fmi::blocking::Communicator;
use fmi::Rank;

use crate::buf::{copy_exact, input, input_output, output, per_rank, Layout};
use crate::comm::{comm_ref, fmi_comm, rank_arg};
use crate::fmi_status;
use crate::status::{guard, Failure};
use crate::types::{fmi_datatype, fmi_op, op_ref, with_type, Dt};

/// The checked common arguments of a collective.
struct Call<'a> {
    comm: &'a Communicator,
    dt: Dt,
    me: Rank,
    p: usize,
}

/// # Safety
/// A non-NULL `comm` must be live for `'a`.
unsafe fn call<'a>(comm: *const fmi_comm, datatype: fmi_datatype) -> Result<Call<'a>, Failure> {
    // SAFETY: the caller's guarantee.
    let comm = unsafe { comm_ref(comm) }?;
    Ok(Call {
        dt: Dt::from_c(datatype)?,
        me: comm.rank(),
        p: comm.size() as usize,
        comm,
    })
}

impl Call<'_> {
    fn root(&self, root: c_int) -> Result<Rank, Failure> {
        rank_arg(root, self.p as u32, "root")
    }

    /// `count * size`, the length of a buffer holding one block per rank.
    fn times_p(&self, count: usize, what: &str) -> Result<usize, Failure> {
        count
            .checked_mul(self.p)
            .ok_or_else(|| Failure::invalid(format!("{what}: count {count} is too large")))
    }
}

/// Returns once every rank has called `fmi_barrier`.
///
/// # Safety
/// `comm` must be NULL (an error) or live.
#[no_mangle]
pub unsafe extern "C" fn fmi_barrier(comm: *const fmi_comm) -> fmi_status {
    guard("fmi_barrier", || {
        // SAFETY: the caller's guarantee.
        unsafe { comm_ref(comm) }?.barrier()?;
        Ok(())
    })
}

/// Broadcasts `count` elements from root's `buf` into every rank's `buf`.
///
/// # Safety
/// `comm` must be NULL or live; `buf` must have room for `count` elements.
#[no_mangle]
pub unsafe extern "C" fn fmi_bcast(
    comm: *const fmi_comm,
    buf: *mut c_void,
    count: usize,
    datatype: fmi_datatype,
    root: c_int,
) -> fmi_status {
    guard("fmi_bcast", || {
        // SAFETY: the caller's guarantee.
        let c = unsafe { call(comm, datatype) }?;
        let root = c.root(root)?;
        with_type!(c.dt, |T| {
            // SAFETY: the caller guarantees room for `count` elements.
            let buf = unsafe { output::<T>(buf, count, "buf") }?;
            c.comm.bcast_into(root, buf)?;
        });
        Ok(())
    })
}

/// Gathers `count` elements from every rank's `sendbuf` into root's `recvbuf` (root only,
/// `size * count` elements), in rank order.
///
/// # Safety
/// `comm` must be NULL or live; the buffers must hold the elements described.
#[no_mangle]
pub unsafe extern "C" fn fmi_gather(
    comm: *const fmi_comm,
    sendbuf: *const c_void,
    recvbuf: *mut c_void,
    count: usize,
    datatype: fmi_datatype,
    root: c_int,
) -> fmi_status {
    guard("fmi_gather", || {
        // SAFETY: the caller's guarantee.
        let c = unsafe { call(comm, datatype) }?;
        let root = c.root(root)?;
        with_type!(c.dt, |T| {
            if c.me == root {
                let total = c.times_p(count, "recvbuf")?;
                // SAFETY: the caller guarantees both buffers.
                let (data, out) = unsafe {
                    input_output::<T>(sendbuf, count, "sendbuf", recvbuf, total, "recvbuf")
                }?;
                let all = c.comm.gather(root, &data)?.unwrap_or_default();
                copy_exact(c.me, root, "fmi_gather", &all, out)?;
            } else {
                // SAFETY: the caller guarantees `sendbuf`.
                let data = unsafe { input::<T>(sendbuf, count, "sendbuf") }?;
                c.comm.gather(root, data)?;
            }
        });
        Ok(())
    })
}

/// Gathers `sendcount` elements from every rank (counts may differ) into root's `recvbuf`: rank
/// r's block goes to `recvbuf + displs[r]` and must hold exactly `recvcounts[r]` elements.
/// `recvbuf`, `recvcounts` and `displs` are root only; `displs` may be NULL for blocks packed in
/// rank order.
///
/// # Safety
/// `comm` must be NULL or live; at root `recvcounts` (and a non-NULL `displs`) hold one entry per
/// rank and `recvbuf` covers every block; `sendbuf` holds `sendcount` elements.
#[no_mangle]
pub unsafe extern "C" fn fmi_gatherv(
    comm: *const fmi_comm,
    sendbuf: *const c_void,
    sendcount: usize,
    recvbuf: *mut c_void,
    recvcounts: *const usize,
    displs: *const usize,
    datatype: fmi_datatype,
    root: c_int,
) -> fmi_status {
    guard("fmi_gatherv", || {
        // SAFETY: the caller's guarantee.
        let c = unsafe { call(comm, datatype) }?;
        let root = c.root(root)?;
        with_type!(c.dt, |T| {
            if c.me == root {
                // SAFETY: the caller guarantees one entry per rank.
                let counts = unsafe { per_rank(recvcounts, c.p, "recvcounts") }?;
                // SAFETY: as above.
                let layout = unsafe { Layout::new(counts, displs, "displs") }?;
                // SAFETY: the caller guarantees both buffers.
                let (data, out) = unsafe {
                    input_output::<T>(
                        sendbuf,
                        sendcount,
                        "sendbuf",
                        recvbuf,
                        layout.extent,
                        "recvbuf",
                    )
                }?;
                let parts = c.comm.gatherv(root, &data)?.unwrap_or_default();
                layout.place(c.me, "fmi_gatherv", parts, counts, out)?;
            } else {
                // SAFETY: the caller guarantees `sendbuf`.
                let data = unsafe { input::<T>(sendbuf, sendcount, "sendbuf") }?;
                c.comm.gatherv(root, data)?;
            }
        });
        Ok(())
    })
}

/// Root's `sendbuf` (root only, `size * count` elements) is split into `size` blocks of
/// `count`; rank r receives block r into `recvbuf`.
///
/// # Safety
/// `comm` must be NULL or live; the buffers must hold the elements described.
#[no_mangle]
pub unsafe extern "C" fn fmi_scatter(
    comm: *const fmi_comm,
    sendbuf: *const c_void,
    recvbuf: *mut c_void,
    count: usize,
    datatype: fmi_datatype,
    root: c_int,
) -> fmi_status {
    guard("fmi_scatter", || {
        // SAFETY: the caller's guarantee.
        let c = unsafe { call(comm, datatype) }?;
        let root = c.root(root)?;
        with_type!(c.dt, |T| {
            if c.me == root {
                let total = c.times_p(count, "sendbuf")?;
                // SAFETY: the caller guarantees both buffers.
                let (data, out) = unsafe {
                    input_output::<T>(sendbuf, total, "sendbuf", recvbuf, count, "recvbuf")
                }?;
                let mine = c.comm.scatter(root, &data)?;
                copy_exact(c.me, root, "fmi_scatter", &mine, out)?;
            } else {
                // SAFETY: the caller guarantees `recvbuf`.
                let out = unsafe { output::<T>(recvbuf, count, "recvbuf") }?;
                let mine = c.comm.scatter::<T>(root, &[])?;
                copy_exact(c.me, root, "fmi_scatter", &mine, out)?;
            }
        });
        Ok(())
    })
}

/// Root sends `sendcounts[r]` elements starting at `sendbuf + displs[r]` to rank r, which
/// receives exactly `recvcount` elements into `recvbuf`. `sendbuf`, `sendcounts` and `displs` are
/// root only; `displs` may be NULL for blocks packed in rank order.
///
/// # Safety
/// `comm` must be NULL or live; at root `sendcounts` (and a non-NULL `displs`) hold one entry per
/// rank and `sendbuf` covers every block; `recvbuf` has room for `recvcount` elements.
#[no_mangle]
pub unsafe extern "C" fn fmi_scatterv(
    comm: *const fmi_comm,
    sendbuf: *const c_void,
    sendcounts: *const usize,
    displs: *const usize,
    recvbuf: *mut c_void,
    recvcount: usize,
    datatype: fmi_datatype,
    root: c_int,
) -> fmi_status {
    guard("fmi_scatterv", || {
        // SAFETY: the caller's guarantee.
        let c = unsafe { call(comm, datatype) }?;
        let root = c.root(root)?;
        with_type!(c.dt, |T| {
            if c.me == root {
                // SAFETY: the caller guarantees one entry per rank.
                let counts = unsafe { per_rank(sendcounts, c.p, "sendcounts") }?;
                // SAFETY: as above.
                let layout = unsafe { Layout::new(counts, displs, "displs") }?;
                // SAFETY: the caller guarantees both buffers.
                let (data, out) = unsafe {
                    input_output::<T>(
                        sendbuf,
                        layout.extent,
                        "sendbuf",
                        recvbuf,
                        recvcount,
                        "recvbuf",
                    )
                }?;
                let packed = layout.pack(&data, counts);
                let mine = c.comm.scatterv(root, &packed, counts)?;
                copy_exact(c.me, root, "fmi_scatterv", &mine, out)?;
            } else {
                // SAFETY: the caller guarantees `recvbuf`.
                let out = unsafe { output::<T>(recvbuf, recvcount, "recvbuf") }?;
                let mine = c.comm.scatterv::<T>(root, &[], &[])?;
                copy_exact(c.me, root, "fmi_scatterv", &mine, out)?;
            }
        });
        Ok(())
    })
}

/// Every rank receives every rank's `count` elements, in rank order, into `recvbuf`
/// (`size * count` elements).
///
/// # Safety
/// `comm` must be NULL or live; the buffers must hold the elements described.
#[no_mangle]
pub unsafe extern "C" fn fmi_allgather(
    comm: *const fmi_comm,
    sendbuf: *const c_void,
    recvbuf: *mut c_void,
    count: usize,
    datatype: fmi_datatype,
) -> fmi_status {
    guard("fmi_allgather", || {
        // SAFETY: the caller's guarantee.
        let c = unsafe { call(comm, datatype) }?;
        let total = c.times_p(count, "recvbuf")?;
        with_type!(c.dt, |T| {
            // SAFETY: the caller guarantees both buffers.
            let (data, out) =
                unsafe { input_output::<T>(sendbuf, count, "sendbuf", recvbuf, total, "recvbuf") }?;
            c.comm.allgather_into(&data, out)?;
        });
        Ok(())
    })
}

/// Every rank receives every rank's block (counts may differ): rank r's block goes to
/// `recvbuf + displs[r]` and must hold exactly `recvcounts[r]` elements; `displs` may be NULL
/// for blocks packed in rank order.
///
/// # Safety
/// `comm` must be NULL or live; `recvcounts` (and a non-NULL `displs`) hold one entry per rank;
/// the buffers must hold the elements described.
#[no_mangle]
pub unsafe extern "C" fn fmi_allgatherv(
    comm: *const fmi_comm,
    sendbuf: *const c_void,
    sendcount: usize,
    recvbuf: *mut c_void,
    recvcounts: *const usize,
    displs: *const usize,
    datatype: fmi_datatype,
) -> fmi_status {
    guard("fmi_allgatherv", || {
        // SAFETY: the caller's guarantee.
        let c = unsafe { call(comm, datatype) }?;
        // SAFETY: the caller guarantees one entry per rank.
        let counts = unsafe { per_rank(recvcounts, c.p, "recvcounts") }?;
        // SAFETY: as above.
        let layout = unsafe { Layout::new(counts, displs, "displs") }?;
        with_type!(c.dt, |T| {
            // SAFETY: the caller guarantees both buffers.
            let (data, out) = unsafe {
                input_output::<T>(
                    sendbuf,
                    sendcount,
                    "sendbuf",
                    recvbuf,
                    layout.extent,
                    "recvbuf",
                )
            }?;
            let parts = c.comm.allgatherv(&data)?;
            layout.place(c.me, "fmi_allgatherv", parts, counts, out)?;
        });
        Ok(())
    })
}

/// `sendbuf` holds `size` blocks of `count` elements; block d goes to rank d. `recvbuf` receives
/// the blocks sent here, in source-rank order (`size * count` elements).
///
/// # Safety
/// `comm` must be NULL or live; the buffers must hold the elements described.
#[no_mangle]
pub unsafe extern "C" fn fmi_alltoall(
    comm: *const fmi_comm,
    sendbuf: *const c_void,
    recvbuf: *mut c_void,
    count: usize,
    datatype: fmi_datatype,
) -> fmi_status {
    guard("fmi_alltoall", || {
        // SAFETY: the caller's guarantee.
        let c = unsafe { call(comm, datatype) }?;
        let total = c.times_p(count, "sendbuf")?;
        with_type!(c.dt, |T| {
            // SAFETY: the caller guarantees both buffers.
            let (data, out) =
                unsafe { input_output::<T>(sendbuf, total, "sendbuf", recvbuf, total, "recvbuf") }?;
            let got = c.comm.alltoall(&data)?;
            copy_exact(c.me, c.me, "fmi_alltoall", &got, out)?;
        });
        Ok(())
    })
}

/// Sends `sendcounts[d]` elements from `sendbuf + sdispls[d]` to rank d, and receives exactly
/// `recvcounts[s]` elements from rank s into `recvbuf + rdispls[s]`. Either displacement array
/// may be NULL for blocks packed in rank order.
///
/// # Safety
/// `comm` must be NULL or live; the count arrays (and non-NULL displacement arrays) hold one
/// entry per rank; the buffers cover every block.
#[no_mangle]
pub unsafe extern "C" fn fmi_alltoallv(
    comm: *const fmi_comm,
    sendbuf: *const c_void,
    sendcounts: *const usize,
    sdispls: *const usize,
    recvbuf: *mut c_void,
    recvcounts: *const usize,
    rdispls: *const usize,
    datatype: fmi_datatype,
) -> fmi_status {
    guard("fmi_alltoallv", || {
        // SAFETY: the caller's guarantee.
        let c = unsafe { call(comm, datatype) }?;
        // SAFETY: the caller guarantees one entry per rank in each array.
        let scounts = unsafe { per_rank(sendcounts, c.p, "sendcounts") }?;
        // SAFETY: as above.
        let slayout = unsafe { Layout::new(scounts, sdispls, "sdispls") }?;
        // SAFETY: as above.
        let rcounts = unsafe { per_rank(recvcounts, c.p, "recvcounts") }?;
        // SAFETY: as above.
        let rlayout = unsafe { Layout::new(rcounts, rdispls, "rdispls") }?;
        with_type!(c.dt, |T| {
            // SAFETY: the caller guarantees both buffers.
            let (data, out) = unsafe {
                input_output::<T>(
                    sendbuf,
                    slayout.extent,
                    "sendbuf",
                    recvbuf,
                    rlayout.extent,
                    "recvbuf",
                )
            }?;
            let packed = slayout.pack(&data, scounts);
            let parts = c.comm.alltoallv(&packed, scounts)?;
            rlayout.place(c.me, "fmi_alltoallv", parts, rcounts, out)?;
        });
        Ok(())
    })
}

/// Reduces every rank's `count` elements element-wise with `op` into root's `recvbuf` (root
/// only).
///
/// # Safety
/// `comm` and `op` must be NULL or live; the buffers must hold `count` elements.
#[no_mangle]
pub unsafe extern "C" fn fmi_reduce(
    comm: *const fmi_comm,
    sendbuf: *const c_void,
    recvbuf: *mut c_void,
    count: usize,
    datatype: fmi_datatype,
    op: *const fmi_op,
    root: c_int,
) -> fmi_status {
    guard("fmi_reduce", || {
        // SAFETY: the caller's guarantee.
        let c = unsafe { call(comm, datatype) }?;
        let root = c.root(root)?;
        // SAFETY: the caller's guarantee.
        let op = unsafe { op_ref(op) }?;
        with_type!(c.dt, |T| {
            let reduction = op.reduction::<T>(c.dt)?;
            if c.me == root {
                // SAFETY: the caller guarantees both buffers.
                let (data, out) = unsafe {
                    input_output::<T>(sendbuf, count, "sendbuf", recvbuf, count, "recvbuf")
                }?;
                let got = c.comm.reduce(root, &data, reduction)?.unwrap_or_default();
                copy_exact(c.me, root, "fmi_reduce", &got, out)?;
            } else {
                // SAFETY: the caller guarantees `sendbuf`.
                let data = unsafe { input::<T>(sendbuf, count, "sendbuf") }?;
                c.comm.reduce(root, data, reduction)?;
            }
        });
        Ok(())
    })
}

/// Reduces every rank's `count` elements element-wise with `op`; every rank receives the result
/// in `recvbuf`.
///
/// # Safety
/// `comm` and `op` must be NULL or live; the buffers must hold `count` elements.
#[no_mangle]
pub unsafe extern "C" fn fmi_allreduce(
    comm: *const fmi_comm,
    sendbuf: *const c_void,
    recvbuf: *mut c_void,
    count: usize,
    datatype: fmi_datatype,
    op: *const fmi_op,
) -> fmi_status {
    guard("fmi_allreduce", || {
        // SAFETY: the caller's guarantee.
        let c = unsafe { call(comm, datatype) }?;
        // SAFETY: the caller's guarantee.
        let op = unsafe { op_ref(op) }?;
        with_type!(c.dt, |T| {
            let reduction = op.reduction::<T>(c.dt)?;
            // SAFETY: the caller guarantees both buffers.
            let (data, out) =
                unsafe { input_output::<T>(sendbuf, count, "sendbuf", recvbuf, count, "recvbuf") }?;
            c.comm.allreduce_into(&data, out, reduction)?;
        });
        Ok(())
    })
}

/// `sendbuf` holds `size` blocks of `recvcount` elements; rank r receives block r of the
/// element-wise reduction in `recvbuf` (MPI's `MPI_Reduce_scatter_block`).
///
/// # Safety
/// `comm` and `op` must be NULL or live; the buffers must hold the elements described.
#[no_mangle]
pub unsafe extern "C" fn fmi_reduce_scatter_block(
    comm: *const fmi_comm,
    sendbuf: *const c_void,
    recvbuf: *mut c_void,
    recvcount: usize,
    datatype: fmi_datatype,
    op: *const fmi_op,
) -> fmi_status {
    guard("fmi_reduce_scatter_block", || {
        // SAFETY: the caller's guarantee.
        let c = unsafe { call(comm, datatype) }?;
        // SAFETY: the caller's guarantee.
        let op = unsafe { op_ref(op) }?;
        let total = c.times_p(recvcount, "sendbuf")?;
        with_type!(c.dt, |T| {
            let reduction = op.reduction::<T>(c.dt)?;
            // SAFETY: the caller guarantees both buffers.
            let (data, out) = unsafe {
                input_output::<T>(sendbuf, total, "sendbuf", recvbuf, recvcount, "recvbuf")
            }?;
            let mine = c.comm.reduce_scatter(&data, reduction)?;
            copy_exact(c.me, c.me, "fmi_reduce_scatter_block", &mine, out)?;
        });
        Ok(())
    })
}

/// Inclusive prefix reduction: rank r receives `x0 op x1 op ... op xr` in `recvbuf`.
///
/// # Safety
/// `comm` and `op` must be NULL or live; the buffers must hold `count` elements.
#[no_mangle]
pub unsafe extern "C" fn fmi_scan(
    comm: *const fmi_comm,
    sendbuf: *const c_void,
    recvbuf: *mut c_void,
    count: usize,
    datatype: fmi_datatype,
    op: *const fmi_op,
) -> fmi_status {
    guard("fmi_scan", || {
        // SAFETY: the caller's guarantee.
        let c = unsafe { call(comm, datatype) }?;
        // SAFETY: the caller's guarantee.
        let op = unsafe { op_ref(op) }?;
        with_type!(c.dt, |T| {
            let reduction = op.reduction::<T>(c.dt)?;
            // SAFETY: the caller guarantees both buffers.
            let (data, out) =
                unsafe { input_output::<T>(sendbuf, count, "sendbuf", recvbuf, count, "recvbuf") }?;
            let got = c.comm.scan(&data, reduction)?;
            copy_exact(c.me, c.me, "fmi_scan", &got, out)?;
        });
        Ok(())
    })
}

/// Exclusive prefix reduction: rank r > 0 receives `x0 op ... op x(r-1)` in `recvbuf`; rank 0's
/// `recvbuf` is not touched (and may be NULL).
///
/// # Safety
/// `comm` and `op` must be NULL or live; the buffers must hold `count` elements.
#[no_mangle]
pub unsafe extern "C" fn fmi_exscan(
    comm: *const fmi_comm,
    sendbuf: *const c_void,
    recvbuf: *mut c_void,
    count: usize,
    datatype: fmi_datatype,
    op: *const fmi_op,
) -> fmi_status {
    guard("fmi_exscan", || {
        // SAFETY: the caller's guarantee.
        let c = unsafe { call(comm, datatype) }?;
        // SAFETY: the caller's guarantee.
        let op = unsafe { op_ref(op) }?;
        with_type!(c.dt, |T| {
            let reduction = op.reduction::<T>(c.dt)?;
            if c.me == Rank(0) {
                // SAFETY: the caller guarantees `sendbuf`.
                let data = unsafe { input::<T>(sendbuf, count, "sendbuf") }?;
                c.comm.exscan(data, reduction)?;
            } else {
                // SAFETY: the caller guarantees both buffers.
                let (data, out) = unsafe {
                    input_output::<T>(sendbuf, count, "sendbuf", recvbuf, count, "recvbuf")
                }?;
                let got = c.comm.exscan(&data, reduction)?.unwrap_or_default();
                copy_exact(c.me, c.me, "fmi_exscan", &got, out)?;
            }
        });
        Ok(())
    })
}
