//! # fmi-channels: the seam between fmi's collectives and the wires that carry bytes
//!
//! A [`Channel`] moves opaque byte messages between the ranks of one job, addressed by
//! `(job, source rank, destination rank, tag)`, each wait bounded by a deadline. Collectives and the
//! communicator depend only on this trait; every backend lives in its own module.
//!
//! ```text
//!   fmi::Communicator ── fmi-collectives ──┐
//!                                          ▼
//!                          dyn Channel  (send / recv / capabilities / native hooks)
//!                ┌──────────────┬──────────┴─────┬───────────────┐
//!             memory          tcp            storage …          rdma …
//!        (tests, threads)  (direct)      (redis / s3 / dynamodb)
//! ```
//!
//! ## Ordering contract
//! Messages from one source to one destination with the same tag are received in the order in
//! which `send` was **called** (not polled): a channel fixes a message's place in that order
//! synchronously, inside `send`, before it returns the future. Likewise concurrent `recv`s for the
//! same `(source, tag)` are matched in call order. This lets non-blocking sends be spawned as tasks
//! without reordering.
//!
//! ## Failures
//! A dead peer ends a wait with [`Error::PeerLost`] (the channel saw its connection break) or
//! [`Error::Timeout`] (it fell silent past the deadline), naming it. [`Channel::abort`] tells
//! the rest of the job, so that every rank's error names the rank whose failure broke the job,
//! not a rank that failed because of it; [`AbortOnFailure`] calls it for every operation that
//! fails this way (`fmi::Communicator` does by default).
//!
//! ## Building blocks for backends
//! [`Inbox`] matches incoming messages to waiting receivers (with deadlines, peer loss and a bound
//! on buffered bytes), [`Turnstile`] serialises writers in call order. The [`conformance`] suite
//! is what every backend must pass.
//!
//! ## Backends
//! [`memory`] runs ranks as tasks of one process (tests); [`tcp`] connects ranks directly, one TCP
//! connection per pair, made on first use.

mod abort;
mod error;
mod inbox;
pub mod memory;
pub mod tcp;
mod turnstile;
mod types;

pub mod conformance;

use std::fmt;

pub use abort::{propagate as propagate_failure, AbortOnFailure};
pub use error::{codec::CodecError, Error, Result};
use futures::future::BoxFuture;
pub use inbox::{Inbox, KeyHasher, Reservation};
pub use tcp::nat::PathKind;
pub use tokio::time::Instant;
pub use turnstile::{Turn, Turnstile};
pub use types::{JobId, Rank, Tag};

/// The environment variable through which a launcher that binds each rank to one core tells the
/// ranks how many cores it spread them over (`fmi run` does, see [`host_cores`]).
pub const HOST_CPUS_ENV: &str = "FMI_HOST_CPUS";

/// The cores this host gives the job's ranks: [`HOST_CPUS_ENV`] where the launcher bound each
/// rank to one core (whose own affinity mask then shows one), else the cores this process may
/// use (`available_parallelism`). Channels compare it with the job's ranks on this host to
/// decide whether a waiting rank may poll a while instead of sleeping at once.
pub fn host_cores() -> usize {
    cores_from(std::env::var(HOST_CPUS_ENV).ok().as_deref())
}

/// [`host_cores`] given the value of [`HOST_CPUS_ENV`] (ignored unless a positive number).
fn cores_from(var: Option<&str>) -> usize {
    var.and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// What a channel can do, so that collectives and the model can plan around it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Capabilities {
    /// The largest message one `send` may carry (`None`: no limit beyond memory). Channels that
    /// chunk internally report no limit.
    pub max_message: Option<usize>,
    /// Whether a waiting receiver is woken by the channel (push), rather than polling.
    pub push: bool,
    /// Whether [`Channel::native_collectives`] offers a broadcast.
    pub native_bcast: bool,
    /// Whether [`Channel::native_collectives`] offers a barrier.
    pub native_barrier: bool,
}

impl Capabilities {
    /// A push channel without size limit or native collectives.
    pub const fn push_unlimited() -> Capabilities {
        Capabilities {
            max_message: None,
            push: true,
            native_bcast: false,
            native_barrier: false,
        }
    }
}

/// One rank's endpoint of a channel: moves byte messages to and from the other ranks of its job.
///
/// Object safe, so a communicator can hold `Arc<dyn Channel>` chosen at run time.
pub trait Channel: Send + Sync + fmt::Debug + 'static {
    /// Short lowercase name used in errors and logs (`"memory"`, `"tcp"`, ...).
    fn name(&self) -> &'static str;

    /// The job this endpoint belongs to.
    fn job(&self) -> &JobId;

    /// This endpoint's rank.
    fn rank(&self) -> Rank;

    /// The number of ranks in the job.
    fn size(&self) -> u32;

    /// What this channel can do.
    fn capabilities(&self) -> Capabilities;

    /// Sends `data` to `dst` with `tag`. The message's place in the `(self, dst, tag)` order is
    /// fixed when this method is called. Completes once the channel no longer needs `data`; fails
    /// with [`Error::Timeout`] if that has not happened by `deadline`.
    fn send<'a>(
        &'a self,
        dst: Rank,
        tag: Tag,
        data: &'a [u8],
        deadline: Instant,
    ) -> BoxFuture<'a, Result<()>>;

    /// Receives the next message from `src` with `tag`. Registered in call order. Fails with
    /// [`Error::Timeout`] after `deadline`, or [`Error::PeerLost`] when `src` is gone.
    fn recv(&self, src: Rank, tag: Tag, deadline: Instant) -> BoxFuture<'_, Result<Vec<u8>>>;

    /// Receives the next message from `src` with `tag` into `buf` and returns its length.
    /// Matched in call order together with [`Channel::recv`] (one order for both). A message
    /// longer than `buf` is consumed and fails with [`Error::CountMismatch`] (`what` is
    /// [`RECV_INTO_TOO_LONG`], counts in bytes); the bytes of `buf` past the returned length are
    /// left as they were, and after an error `buf`'s contents are unspecified.
    ///
    /// The default receives with [`Channel::recv`] and copies; channels that can read a message
    /// straight into the caller's memory (the TCP channel, when the receive is already waiting)
    /// override it.
    fn recv_into<'a>(
        &'a self,
        src: Rank,
        tag: Tag,
        buf: &'a mut [u8],
        deadline: Instant,
    ) -> BoxFuture<'a, Result<usize>> {
        // Called here, synchronously, so that the receive is registered in call order.
        let msg = self.recv(src, tag, deadline);
        Box::pin(async move { copy_message(self.rank(), src, &msg.await?, buf) })
    }

    /// Collectives this channel can do better than point-to-point messages (for example one PUT
    /// read by many on a storage channel). `None` by default.
    fn native_collectives(&self) -> Option<&dyn NativeCollectives> {
        None
    }

    /// The channel's request counters by name (for storage channels: `puts`, `gets`,
    /// `empty_gets`, `deletes`, `lists`, `counters`, `write_units`, `read_units`, `bytes_put`,
    /// `bytes_got`, `retries`), so that a cost model can turn a run into dollars. Empty for
    /// channels without per-request costs.
    fn counters(&self) -> Vec<(&'static str, u64)> {
        Vec::new()
    }

    /// How this endpoint reaches each peer it has connected to, in rank order: a direct
    /// connection (dialed, or punched through NATs) or one through a relay. Empty for channels
    /// without per-pair connections (memory, storage) and before any pair is connected.
    fn paths(&self) -> Vec<(Rank, PathKind)> {
        Vec::new()
    }

    /// Called once by the owner that is about to drop the channel: lets a channel whose
    /// transport would lose unread data on an abrupt close (QUIC) hand it over first, waiting
    /// a bounded time. The channel is unusable afterwards. Default: nothing to do (dropping is
    /// enough).
    fn close(&self) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }

    /// Tells the job that it cannot complete because rank `victim` failed (its connection broke
    /// or it fell silent past a deadline), the way ULFM's `MPIX_Comm_revoke` revokes a
    /// communicator: this endpoint's pending and later operations fail with
    /// [`Error::PeerLost`] naming `victim`, and the channel passes the news on as far as it can
    /// (the TCP channel sends an abort frame to every peer, the Redis channel writes a failure
    /// record beside the job's keys), so that the other ranks' errors name `victim` too (with
    /// `via` naming this rank) instead of a rank that failed because of it. Idempotent: the
    /// first victim an endpoint hears of, from its own operations or from a peer, is the one it
    /// keeps. Bounded in time (it waits for nobody's answer). Default: nothing, for channels
    /// that cannot tell anyone (memory, RDMA).
    fn abort(&self, victim: Rank) -> BoxFuture<'_, ()> {
        let _ = victim;
        Box::pin(async {})
    }
}

/// Optional collective operations a channel implements natively. Each method returns `None` when
/// the channel declines this particular call (for example, a message too small to benefit), in
/// which case the point-to-point algorithm runs instead. Every rank must make the same decision
/// from the same arguments.
pub trait NativeCollectives: Send + Sync {
    /// Broadcast: `data` is `Some` at `root` and `None` elsewhere; every rank returns the root's
    /// bytes.
    fn bcast<'a>(
        &'a self,
        root: Rank,
        tag: Tag,
        data: Option<&'a [u8]>,
        deadline: Instant,
    ) -> Option<BoxFuture<'a, Result<Vec<u8>>>>;

    /// Barrier: returns once every rank has entered it.
    fn barrier(&self, tag: Tag, deadline: Instant) -> Option<BoxFuture<'_, Result<()>>>;

    /// Gather: every rank contributes `data` (any length); `root` returns `Some(blocks)` with
    /// `blocks[r]` from rank r, the others `None`. `None` (the default): not offered, the
    /// point-to-point algorithm runs.
    #[allow(clippy::type_complexity)]
    fn gather<'a>(
        &'a self,
        root: Rank,
        tag: Tag,
        data: &'a [u8],
        deadline: Instant,
    ) -> Option<BoxFuture<'a, Result<Option<Vec<Vec<u8>>>>>> {
        let _ = (root, tag, data, deadline);
        None
    }
}

/// The `what` of the [`Error::CountMismatch`] with which [`Channel::recv_into`] reports a message
/// longer than the buffer (`expected`: the buffer's length, `got`: the message's, in bytes).
pub const RECV_INTO_TOO_LONG: &str = "recv_into: message longer than the buffer";

/// Copies a received message into a receive buffer, as [`Channel::recv_into`] does: its length,
/// or [`Error::CountMismatch`] (with [`RECV_INTO_TOO_LONG`]) if it does not fit. `me` is the
/// receiving rank and `src` the sender.
pub fn copy_message(me: Rank, src: Rank, msg: &[u8], buf: &mut [u8]) -> Result<usize> {
    match buf.get_mut(..msg.len()) {
        Some(dst) => {
            dst.copy_from_slice(msg);
            Ok(msg.len())
        }
        None => Err(Error::CountMismatch {
            me,
            peer: src,
            what: RECV_INTO_TOO_LONG,
            expected: buf.len(),
            got: msg.len(),
        }),
    }
}

/// Checks that `rank` is a valid rank of a job of `size` ranks.
pub fn check_rank(rank: Rank, size: u32) -> Result<()> {
    if rank.0 < size {
        Ok(())
    } else {
        Err(Error::InvalidRank { rank, size })
    }
}

#[cfg(test)]
mod tests {
    use super::cores_from;

    #[test]
    fn a_launchers_core_count_overrides_this_process_mask() {
        let own = std::thread::available_parallelism().map_or(1, |n| n.get());
        assert_eq!(cores_from(Some("48")), 48);
        assert_eq!(cores_from(Some(" 3\n")), 3);
        for bad in [None, Some(""), Some("0"), Some("-2"), Some("many")] {
            assert_eq!(cores_from(bad), own, "{bad:?}");
        }
    }
}
