//! The storage fallback of the direct channel: a pair that cannot connect (no direct dial, no
//! punch and no relay got through) carries its connection over a storage channel instead.
//!
//! A [`StoredStream`] is a byte stream between two ranks made of the storage channel's
//! messages: each write is one message from this rank to the peer under [`STREAM_TAG`], and
//! reads return the peer's messages under that tag in order (the storage channel keeps the
//! order of one sender's messages per tag). The direct channel treats it as one more path: the
//! same hello/reply handshake runs over it (the lower rank says hello, as on punched and relayed
//! streams), then the same framing, reader, `Inbox` and connection rule. So a pair's ordering,
//! deadlines, abort frames and back-pressure are what they are on every other path, and at most
//! one connection per pair is ever installed, whichever path connects first.
//!
//! A frame is written with one vectored write, so a message costs one storage send (the
//! storage channel splits what exceeds one item); the reader waits for the peer's next message
//! with the storage channel's own receive (pushed on Redis, polled on S3 and DynamoDB).

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::{Channel, Error, Instant, Rank, Tag};

/// The tag of a stored stream's messages: outside the user's tags (below 2^32) and the
/// collectives' namespace, so they never meet a user's or a collective's receive.
pub(super) const STREAM_TAG: Tag = Tag::internal(1);

/// How long one receive or send on the storage channel may take. A receive that times out is
/// simply posted again (the stream waits as long as its reader does); a send that times out
/// breaks the stream.
const STORAGE_WAIT: Duration = Duration::from_secs(3600);

/// A storage channel to fall back to, named in [`NatConfig::fallback`](super::nat::NatConfig).
#[derive(Clone)]
pub struct StorageFallback(pub Arc<dyn Channel>);

impl StorageFallback {
    /// The storage channel's name (`redis`, `s3`, `dynamodb`, …).
    pub fn name(&self) -> &'static str {
        self.0.name()
    }
}

impl std::fmt::Debug for StorageFallback {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "StorageFallback({})", self.0.name())
    }
}

impl PartialEq for StorageFallback {
    fn eq(&self, other: &StorageFallback) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for StorageFallback {}

/// A byte stream to `peer` made of storage messages (see the module docs).
pub(super) struct StoredStream {
    read: StoredRead,
    write: StoredWrite,
}

impl StoredStream {
    pub(super) fn new(channel: Arc<dyn Channel>, peer: Rank) -> StoredStream {
        StoredStream {
            read: StoredRead {
                channel: Arc::clone(&channel),
                peer,
                pending: None,
                have: Vec::new(),
                at: 0,
            },
            write: StoredWrite {
                channel,
                peer,
                pending: None,
                broken: false,
            },
        }
    }

    pub(super) fn into_split(self) -> (StoredRead, StoredWrite) {
        (self.read, self.write)
    }
}

impl AsyncRead for StoredStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().read).poll_read(cx, buf)
    }
}

impl AsyncWrite for StoredStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().write).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().write).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().write).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().write).poll_shutdown(cx)
    }
}

/// The receiving half: the peer's messages, read in order.
pub(super) struct StoredRead {
    channel: Arc<dyn Channel>,
    peer: Rank,
    pending: Option<BoxFuture<'static, crate::Result<Vec<u8>>>>,
    /// The last message received, of which `at` bytes have been read.
    have: Vec<u8>,
    at: usize,
}

impl AsyncRead for StoredRead {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        // Bounded: each round either returns or replaces an empty (or timed-out) receive.
        loop {
            if me.at < me.have.len() {
                let n = buf.remaining().min(me.have.len() - me.at);
                buf.put_slice(&me.have[me.at..me.at + n]);
                me.at += n;
                return Poll::Ready(Ok(()));
            }
            let pending = me.pending.get_or_insert_with(|| {
                let (channel, peer) = (Arc::clone(&me.channel), me.peer);
                Box::pin(async move {
                    let deadline = Instant::now() + STORAGE_WAIT;
                    channel.recv(peer, STREAM_TAG, deadline).await
                })
            });
            let got = ready!(pending.as_mut().poll(cx));
            me.pending = None;
            match got {
                Ok(message) => {
                    me.have = message;
                    me.at = 0;
                }
                // Nothing from the peer for an hour: wait on (the reader decides how long).
                Err(Error::Timeout { .. }) => {}
                Err(e) => return Poll::Ready(Err(io::Error::other(e))),
            }
        }
    }
}

/// A storage send under way.
type Sending = BoxFuture<'static, crate::Result<()>>;

/// The sending half: each write is one message to the peer.
pub(super) struct StoredWrite {
    channel: Arc<dyn Channel>,
    peer: Rank,
    /// The send under way and its message. A caller whose write returned `Pending` calls
    /// again with the same bytes (as `AsyncWrite` callers do) and is then told the message's
    /// length. A call with other bytes means the caller gave that write up, and the message
    /// may or may not have been stored: the stream is broken then (an error), since its bytes
    /// can no longer be told apart.
    pending: Option<(Sending, Arc<Vec<u8>>)>,
    broken: bool,
}

impl StoredWrite {
    /// Starts sending `bufs` as one message, or goes on with the send of the same bytes.
    fn poll_send(&mut self, cx: &mut Context<'_>, bufs: &[&[u8]]) -> Poll<io::Result<usize>> {
        if self.broken {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        match &self.pending {
            Some((_, message)) if !same_bytes(message, bufs) => {
                self.broken = true;
                self.pending = None;
                return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
            }
            Some(_) => {}
            None if total == 0 => return Poll::Ready(Ok(0)),
            None => {
                let mut message = Vec::with_capacity(total);
                for b in bufs {
                    message.extend_from_slice(b);
                }
                let message = Arc::new(message);
                let (channel, peer, out) =
                    (Arc::clone(&self.channel), self.peer, Arc::clone(&message));
                let send = Box::pin(async move {
                    let deadline = Instant::now() + STORAGE_WAIT;
                    channel.send(peer, STREAM_TAG, &out, deadline).await
                });
                self.pending = Some((send, message));
            }
        }
        self.poll_pending(cx)
    }

    fn poll_pending(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        let Some((send, message)) = self.pending.as_mut() else {
            return Poll::Ready(Ok(0));
        };
        let sent = ready!(send.as_mut().poll(cx));
        let len = message.len();
        self.pending = None;
        if sent.is_err() {
            self.broken = true;
        }
        Poll::Ready(sent.map(|()| len).map_err(io::Error::other))
    }
}

/// Whether the slices `bufs`, end to end, are `message`.
fn same_bytes(message: &[u8], bufs: &[&[u8]]) -> bool {
    let mut rest = message;
    for b in bufs {
        match rest.strip_prefix(*b) {
            Some(r) => rest = r,
            None => return false,
        }
    }
    rest.is_empty()
}

impl AsyncWrite for StoredWrite {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().poll_send(cx, &[buf])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let slices: Vec<&[u8]> = bufs.iter().map(|b| &**b).collect();
        self.get_mut().poll_send(cx, &slices)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().poll_pending(cx).map_ok(|_| ())
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll_flush(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slices_compare_end_to_end() {
        assert!(same_bytes(b"header+body", &[b"header", b"+", b"body"]));
        assert!(same_bytes(b"", &[]));
        assert!(!same_bytes(b"header+body", &[b"header", b"+bod"]));
        assert!(!same_bytes(b"header", &[b"header", b"+"]));
        assert!(!same_bytes(b"header+body", &[b"HEADER+body"]));
    }
}
