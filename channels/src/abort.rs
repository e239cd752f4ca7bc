//! Failure propagation: an operation that fails because a peer failed tells the whole job.
//!
//! Without it, a rank that dies is named only by the ranks that were waiting for it; the others
//! wait for those ranks, which fail in turn, and name them instead (a cascade), or time out.
//! [`AbortOnFailure`] wraps a channel so that an operation ending in [`Error::PeerLost`] or
//! [`Error::Timeout`] first calls [`Channel::abort`] with the rank it names, before the error
//! is returned (a `Timeout` of a point-to-point operation excepted: its deadline is the
//! caller's, perhaps short on purpose, and the caller decides what it means): the channel revokes this endpoint and passes the news on, and every other rank's
//! pending and later operations fail with `PeerLost` naming that rank, with `via` saying who
//! reported it. This is the policy of MPI's default error handler (`MPI_ERRORS_ARE_FATAL`: an
//! error ends the job) carried out with ULFM's mechanism (`MPIX_Comm_revoke`: the survivors'
//! operations fail instead of hanging), so that every survivor can say which rank broke the job.
//!
//! ```text
//!   op ──► inner channel ──► Err(PeerLost/Timeout naming V) ──► inner.abort(V) ──► Err
//!                                                                 │ (bounded)
//!                                        tcp: abort frame to every peer; redis: failure record
//! ```
//!
//! `fmi::Communicator` wraps its channels this way unless the configuration turns it off
//! (`abort_on_peer_failure = false`), for programs that want to go on with the ranks left.

use std::fmt;
use std::sync::Arc;

use futures::future::{BoxFuture, FutureExt};

use crate::{Capabilities, Channel, Error, Instant, JobId, NativeCollectives, PathKind, Rank};
use crate::{Result, Tag};

/// A channel whose operations abort the job when they fail because of a peer (see the
/// [module docs](self)). Everything else is passed through unchanged.
pub struct AbortOnFailure {
    inner: Arc<dyn Channel>,
}

impl AbortOnFailure {
    /// Wraps `inner`.
    pub fn new(inner: Arc<dyn Channel>) -> AbortOnFailure {
        AbortOnFailure { inner }
    }

    /// The wrapped channel.
    pub fn inner(&self) -> &Arc<dyn Channel> {
        &self.inner
    }
}

impl fmt::Debug for AbortOnFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("AbortOnFailure").field(&self.inner).finish()
    }
}

/// The rank a failed operation's error blames, if it is a peer failure naming another rank.
///
/// A `Timeout` of a point-to-point operation (a user tag) blames nobody: its deadline is the
/// caller's, who may have chosen a short one on purpose (a receive that polls), and it says
/// only that the peer was silent for that long. A lost connection (`PeerLost`) always blames,
/// and so does any failure inside a collective, which cannot complete without the peer.
fn blamed(channel: &dyn Channel, e: &Error, tag: Tag) -> Option<Rank> {
    if !e.is_peer_failure() || (matches!(e, Error::Timeout { .. }) && !tag.is_collective()) {
        return None;
    }
    e.peer().filter(|&p| p != channel.rank())
}

/// Aborts the job on `channel` if `r` (of an operation on `tag`) failed because of a peer, then
/// returns `r`: what [`AbortOnFailure`] does after each operation of the channel it wraps.
/// Public for callers that hold the unwrapped channel for their hot path (the communicator's
/// point-to-point calls), which saves the wrapper's boxed future per operation.
pub async fn propagate<T>(channel: &dyn Channel, tag: Tag, r: Result<T>) -> Result<T> {
    if let Some(victim) = r.as_ref().err().and_then(|e| blamed(channel, e, tag)) {
        channel.abort(victim).await;
    }
    r
}

impl Channel for AbortOnFailure {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    fn job(&self) -> &JobId {
        self.inner.job()
    }

    fn rank(&self) -> Rank {
        self.inner.rank()
    }

    fn size(&self) -> u32 {
        self.inner.size()
    }

    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }

    fn send<'a>(
        &'a self,
        dst: Rank,
        tag: Tag,
        data: &'a [u8],
        deadline: Instant,
    ) -> BoxFuture<'a, Result<()>> {
        // Called here, synchronously, so that the message's place is fixed now.
        let op = self.inner.send(dst, tag, data, deadline);
        async move { propagate(&*self.inner, tag, op.await).await }.boxed()
    }

    fn recv(&self, src: Rank, tag: Tag, deadline: Instant) -> BoxFuture<'_, Result<Vec<u8>>> {
        let op = self.inner.recv(src, tag, deadline);
        async move { propagate(&*self.inner, tag, op.await).await }.boxed()
    }

    fn recv_into<'a>(
        &'a self,
        src: Rank,
        tag: Tag,
        buf: &'a mut [u8],
        deadline: Instant,
    ) -> BoxFuture<'a, Result<usize>> {
        let op = self.inner.recv_into(src, tag, buf, deadline);
        async move { propagate(&*self.inner, tag, op.await).await }.boxed()
    }

    fn native_collectives(&self) -> Option<&dyn NativeCollectives> {
        self.inner
            .native_collectives()
            .map(|_| self as &dyn NativeCollectives)
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        self.inner.counters()
    }

    fn paths(&self) -> Vec<(Rank, PathKind)> {
        self.inner.paths()
    }

    fn close(&self) -> BoxFuture<'_, ()> {
        self.inner.close()
    }

    fn abort(&self, victim: Rank) -> BoxFuture<'_, ()> {
        self.inner.abort(victim)
    }
}

impl NativeCollectives for AbortOnFailure {
    fn bcast<'a>(
        &'a self,
        root: Rank,
        tag: Tag,
        data: Option<&'a [u8]>,
        deadline: Instant,
    ) -> Option<BoxFuture<'a, Result<Vec<u8>>>> {
        let op = self
            .inner
            .native_collectives()?
            .bcast(root, tag, data, deadline)?;
        Some(async move { propagate(&*self.inner, tag, op.await).await }.boxed())
    }

    fn barrier(&self, tag: Tag, deadline: Instant) -> Option<BoxFuture<'_, Result<()>>> {
        let op = self.inner.native_collectives()?.barrier(tag, deadline)?;
        Some(async move { propagate(&*self.inner, tag, op.await).await }.boxed())
    }

    fn gather<'a>(
        &'a self,
        root: Rank,
        tag: Tag,
        data: &'a [u8],
        deadline: Instant,
    ) -> Option<BoxFuture<'a, Result<Option<Vec<Vec<u8>>>>>> {
        let op = self
            .inner
            .native_collectives()?
            .gather(root, tag, data, deadline)?;
        Some(async move { propagate(&*self.inner, tag, op.await).await }.boxed())
    }
}
