//! The direct TCP channel: one TCP connection per pair of ranks, made on first use.
//!
//! It is fmi's fast path wherever ranks can reach each other's listening sockets (HPC nodes, VMs,
//! containers, or functions after the rendezvous has punched a path). Each rank binds a listener
//! first ([`TcpChannel::bind`]), publishes its address through the rendezvous, and starts the
//! endpoint once every rank's address is known ([`TcpChannel::start`]).
//!
//! ```text
//!   send(dst) ──turnstile(dst)──► link to dst ──writev(header, caller's slice)──► socket
//!                                  (dialed on first use)
//!   socket ──reader task──► wait_for_space(bound) ──► read frame into one Vec ──► Inbox ──► recv
//!      └──── or the waiting recv itself, while it waits (below) ────────────────────┘
//! ```
//!
//! ## NAT traversal
//! Started with [`TcpChannel::start_with_traversal`], the endpoint also reaches peers whose
//! listeners it cannot dial (see [`nat`] and `docs/nat.md`). A dial then races, in one task that
//! owns every attempt:
//! * the direct dial of the peer's announced endpoint ([`PathKind::Direct`]);
//! * hole punches: the rendezvous is asked to tell both ranks to `Punch`, and each then connects
//!   from the port of its rendezvous connection (bound with `SO_REUSEADDR`/`SO_REUSEPORT`; the
//!   port comes from `getsockname`) to the other's public address, a few attempts with a short
//!   timeout each, so that the two SYNs cross in the NATs ([`PathKind::Punched`]);
//! * after [`NatConfig::relay_after`] (default 800 ms) without a connection, or at once when
//!   the peer is already waiting there, a connection through the rendezvous server's relay
//!   ([`PathKind::Relayed`]).
//!
//! The first to complete a handshake becomes the pair's one connection; the task then ends and
//! the remaining attempts are aborted and their sockets closed. A punched or relayed stream was
//! accepted by no listener, so on it the **lower rank plays the dialer** (sends the hello) and
//! the higher rank the acceptor: the connection rule below then holds for every path. A peer
//! told to punch or relay while it does not need the pair itself dials passively for
//! [`NatConfig::passive_window`]. The chosen path is logged (`tcp: connected`, field `path`) and
//! reported by [`TcpChannel::paths`] and the `paths_*` [`Channel::counters`].
//!
//! ## QUIC
//! Started with [`TcpChannel::start_quic`], the direct and punched paths run over QUIC (see
//! [`quic`]): one connection per pair with one bidirectional stream, TLS 1.3 with each peer's
//! certificate pinned by the fingerprint it published at the rendezvous. The stream carries
//! exactly what a TCP connection carries (hello, reply, frames below), and the connection's
//! halves are enums over the TCP and QUIC ones, so the reader, the pump, the connection rule
//! and loss handling are the same code. The relay stays TCP. [`TcpChannel::quic_peers`] and
//! the `paths_quic` counter tell which pairs run over QUIC.
//!
//! ## Wire format (all integers little-endian)
//! ```text
//! hello  (dialer → acceptor)  "fmiT" | version u16 = 1 | body_len u16 | body
//!        body:  from rank u32 | to rank u32 | job_len u8 | job id | token_len u16 | token
//! reply  (acceptor → dialer)  "fmiT" | version u16 = 1 | status u8
//!        status: 0 accepted, 1 duplicate (my dial wins), 2 wrong job, 3 bad rank,
//!                4 bad version, 5 malformed, 6 bad token, 7 gone
//! frame  (both ways, after an accepted handshake)
//!        kind u8 = 1 (message) | tag u64 | len u64 | payload (len bytes)
//!        kind u8 = 2 (abort)   | tag u64 = 0 | len u64 = 8 | victim rank u32 | reporter rank u32
//! ```
//! The token is the job's secret ([`TcpConfig::token`], `FMI_TOKEN`): the acceptor compares it
//! in constant time with its own and refuses a mismatch with `bad token` before anything else
//! about the rank is revealed, so only ranks of the job connect. It travels in clear, as to the
//! rendezvous server; the token itself never appears in an error or a log line.
//! Nothing but frames follows an accepted reply, and no frame is ever sent on a connection that
//! was not accepted, so a refused connection cannot lose or reorder a message.
//!
//! ## Connection rule
//! Connections are made lazily, by the first `send` to a peer; either side may dial. The acceptor
//! decides, in one step under the peer's state lock, before any frame flows:
//! * no connection and not dialing: accept;
//! * dialing the same peer itself (a simultaneous dial): the connection dialed by the **lower
//!   rank** wins. The lower rank refuses the higher rank's hello with `duplicate`; the higher rank
//!   accepts the lower rank's hello and abandons its own dial. A dialer refused with `duplicate`
//!   keeps waiting (and re-dials with backoff) until the winning connection has arrived;
//! * already connected, or the peer is lost: refuse.
//!
//! The hello names the job, the dialer's rank and the rank it means to reach; another job, a rank
//! outside the job, one's own rank, or a wrong version are refused and the socket closed. Dialing
//! a peer that does not answer retries with exponential backoff until the send's deadline
//! ([`Error::Timeout`]).
//!
//! ## Flow control and failure
//! A reader task per connection waits until the [`Inbox`] holds fewer than
//! [`TcpConfig::unexpected_bound`] unexpected bytes before reading the next frame, so a receiver
//! that is not receiving stops reading and TCP flow control stalls the sender instead of memory
//! growing. The bound is per endpoint (all peers together), and one frame may overshoot it. A
//! receiver waiting for a message that is stuck behind a full buffer of messages it will only take
//! later waits until its deadline, so the bound must exceed the largest burst of messages a
//! program leaves unreceived.
//! While a `recv` waits for a message from a connected peer it reads that connection itself,
//! under the same bound (see the `reader` module): the socket then wakes the waiting task
//! directly, instead of waking the reader task, which would have to wake the receiver in turn.
//! The reader task takes over again as soon as the receive ends.
//! Before it sleeps, such a receive **spins** for up to [`TcpConfig::spin`] (50 µs by default):
//! it reads the socket with plain non-blocking reads in a loop, so a message that comes within
//! the window costs no sleeping thread's wake-up (8-byte half round trip on loopback: about 6 µs
//! spinning against about 10 µs sleeping, docs/benchmarks.md). A spin that the window does not
//! answer makes the link's next receives sleep at once: 2, then 4, … up to 256 of them after
//! failures in a row, before one tries again. So a program that waits long, or two ranks that
//! share a core (where one's spin keeps the other from answering), lose a window only now and
//! then. The counters `spins_caught`, `spins_missed` and `spins_skipped` count the receives
//! that spun and caught their message, spun in vain, and slept at once by this back-off: a
//! link's latency depends on which it is in (on a 2-core VM, a 2-rank exchange after a barrier
//! took 5–6 µs spinning and 29–33 µs sleeping, docs/benchmarks.md, session 9). Ranks on one
//! host should each have a core of their own (`fmi run` binds them): loopback wakes a sleeping
//! peer with a "sync" wake-up, which may queue it on the sender's core behind the sender's spin,
//! so the spin misses by its window plus the peer's turn, and a pair of unbound ranks could
//! settle into one of them sleeping on every message (session 10).
//! Long frames (16 KiB and more) are moved **busily** while this host's ranks fit its cores and
//! spinning is on: a send whose socket is full, and a waiting receive in the middle of reading
//! a long payload whose socket is empty, retry with plain non-blocking syscalls and yield to the
//! runtime in between instead of sleeping, for as long as bytes keep moving (at most
//! [`TcpConfig::spin`] without one; then they sleep as before). A 4 MiB message crosses a
//! loopback socket in dozens of socket-buffer-sized steps; sleeping between them cost each side
//! a thread wake-up per step (about 50 per message, docs/benchmarks.md), which a polling peer
//! (MPICH) does not pay. Yielding, not looping, keeps a send and a receive joined in one task
//! (an exchange) both moving. Under the same condition a `recv_into` whose buffer holds a long
//! frame waits up to [`TcpConfig::long_wait`] (2 ms) for it before sleeping, yielding between
//! reads after the usual spin window: its sender is usually still busy with the previous long
//! transfer, and the receive that slept paid a wake-up before its copy-out could start
//! (session 11: about 2 instead of 8 context switches per 4 MiB ping-pong message).
//! A waiting [`Channel::recv_into`] goes one step further: a payload that is its message (its tag,
//! it fits, and no earlier receive of that source and tag waits) is read from the socket straight
//! into the caller's buffer, with no copy on the way; stopped half-way, it hands the frame on
//! intact.
//! When a connection ends (end of stream, reset, a frame over [`TcpConfig::max_message`], an
//! unknown frame kind) the peer is lost for good: receives from it fail with [`Error::PeerLost`]
//! once its buffered messages are taken, sends to it fail with `PeerLost`; other pairs carry on.
//! A send cancelled or timed out after writing part of a frame closes its connection the same
//! way, since the stream can no longer be parsed. Dropping a [`TcpChannel`] aborts its tasks and
//! closes its sockets, which its peers see as the loss of this rank.
//!
//! ## Abort (failure propagation)
//! [`Channel::abort`]`(victim)` revokes the endpoint (every pending and later receive and send
//! fails with [`Error::PeerLost`] naming `victim`; buffered and arriving messages are dropped)
//! and sends an abort frame naming `victim` and this rank to every peer but the victim: over
//! the pair's connection, waiting for one being made, and to peers it has no connection with by
//! connecting to them (one dial attempt each: a listener that refuses belongs to a rank that
//! has exited). It returns once every frame is written, or after 500 ms. A rank that receives
//! an abort frame revokes itself the same way (its errors name `victim`, `via` the reporter)
//! and passes the frame on to its connected peers (not dialing: the rank that saw the failure
//! dialed everyone already); a peer that connects later gets the frame at once. The first abort
//! an endpoint hears of wins. Two races are closed on the way: a writer that finds its
//! connection broken lets the connection's reader read to the end first (up to 100 ms), and a
//! failure this rank sees itself is returned only after every connection has been read once
//! without waiting, so that an abort which already arrived (and made the peer exit) is not
//! overtaken by the consequence it caused. A peer of a build without abort frames drops the
//! connection at the unknown kind, and so sees the aborting rank as lost.

pub mod nat;
pub mod quic;
mod reader;
pub mod stored;
mod token;
mod wire;

pub use token::JobToken;
#[doc(hidden)]
pub use wire::fuzz_decode as fuzz_decode_wire;

use std::fmt;
use std::future::Future;
use std::io::{self, IoSlice};
use std::net::{Ipv4Addr, SocketAddr};
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, TryLockError};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::future::{BoxFuture, FutureExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Handle;
use tokio::sync::watch;
use tokio::task::{AbortHandle, JoinSet};
use tokio::time::Instant;

use crate::{check_rank, Capabilities, Channel, Error, Inbox, JobId, Rank, Result, Tag, Turnstile};

use nat::{NatConfig, PathKind, Rendezvous, Traversal, TraversalEvent};
use quic::{Fingerprint, Quic, QuicBinding, QuicPeer, Stream, WriteHalf};
use reader::{Frame, Got, Reader, Target};
use wire::Status;

const NAME: &str = "tcp";

/// Read buffer per connection: small messages are read many per system call.
const READ_BUFFER: usize = 64 * 1024;

/// Pause after a failed `accept` (e.g. out of file descriptors) so the listener does not spin.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);

/// Default of [`TcpConfig::spin`]: a loopback round trip with the peer's turnaround fits.
pub const DEFAULT_SPIN: Duration = Duration::from_micros(50);

/// Default of [`TcpConfig::long_wait`].
pub const DEFAULT_LONG_WAIT: Duration = Duration::from_millis(2);

/// How long [`TcpChannel::close`] waits for the endpoint's aborted tasks to end.
const CLOSE_TASKS_BOUND: Duration = Duration::from_secs(2);

/// Default of [`TcpConfig::local_socket_buffer`].
pub const DEFAULT_LOCAL_SOCKET_BUFFER: usize = 0;

/// The socket buffer for same-host connections: `configured`, unless the ranks announced on
/// this rank's host (its own address, or loopback) outnumber the cores it may use. Pieces only
/// pipeline when sender and receiver run at once; with more ranks than cores a sender stalled on
/// a small buffer waits for a receiver without a core (8 ranks on 2 cores: a 4 MiB allreduce took
/// 1.3–1.5× longer).
fn same_host_buffer(peers: &[SocketAddr], me: Rank, configured: usize) -> usize {
    if host_fits_cores(peers, me) {
        configured
    } else {
        0
    }
}

/// Whether the ranks announced on this rank's host (its own address, or loopback) fit the cores
/// it may use, so that a rank that polls instead of sleeping takes no core from another.
fn host_fits_cores(peers: &[SocketAddr], me: Rank) -> bool {
    let Some(mine) = peers.get(me.idx()).map(SocketAddr::ip) else {
        return false;
    };
    let here = peers
        .iter()
        .filter(|a| a.ip() == mine || (mine.is_loopback() && a.ip().is_loopback()))
        .count();
    here <= crate::host_cores()
}

/// At most 2^8 = 256 receives sleep without spinning after spins that failed in a row.
const SPIN_BACKOFF_MAX_EXP: u32 = 8;

/// Settings of a [`TcpChannel`]. Build one with struct update syntax over the defaults:
/// `TcpConfig { unexpected_bound: 1 << 20, ..TcpConfig::default() }`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TcpConfig {
    /// Bytes of received messages that may wait for a receiver before this endpoint stops reading
    /// from its connections (back-pressuring the senders). One frame may overshoot it. Must be at
    /// least 1. Default: 64 MiB.
    pub unexpected_bound: usize,
    /// The largest message that may be sent or received. A peer announcing a longer frame is a
    /// protocol error and is dropped. Default: 1 GiB.
    pub max_message: usize,
    /// Pause before the second attempt to dial a peer; doubles after each failed attempt.
    /// Default: 5 ms.
    pub connect_backoff_initial: Duration,
    /// Ceiling of the pause between dial attempts. Default: 500 ms.
    pub connect_backoff_max: Duration,
    /// Most dial attempts one dial makes before giving up (the send's deadline usually comes
    /// first; a later send dials afresh). Must be at least 1. Default: 1000.
    pub connect_attempts: u32,
    /// Time allowed for one attempt's connect and handshake, either side. Default: 10 s.
    pub handshake_timeout: Duration,
    /// How NATs are traversed when the endpoint is started with a [`Traversal`]
    /// ([`TcpChannel::start_with_traversal`]); unused otherwise.
    pub nat: NatConfig,
    /// Print, when the endpoint is dropped, one line to stderr naming how each peer was
    /// reached and how many peer sockets were still open once the endpoint had shut down and
    /// its tasks had ended (anything but 0 is a leak):
    /// `fmi-paths: rank R: P=direct Q=punched; stray sockets N` (for tests and diagnostics; see
    /// [`TcpChannel::paths`]). Default: false.
    pub report_paths: bool,
    /// The job's secret (`FMI_TOKEN`): sent in every hello and required of every inbound one,
    /// so a process without it cannot connect to this rank (refused with `bad token`, and
    /// nothing of the token shows in errors or logs). At most 1024 bytes. Default: none (then
    /// hellos must carry none either).
    pub token: JobToken,
    /// How long a receive waiting for a connected peer spins (reads the socket in a loop) before
    /// it sleeps until the kernel wakes it; zero never spins. Spinning saves a sleeping thread's
    /// wake-up per message (about 3 µs of an 8-byte round trip on loopback) when every rank
    /// has a core. After a spin the window did not answer, the link's next 2, 4, … up to 256
    /// receives sleep at once, so long waits and ranks that share a core rarely spin in vain.
    /// The same window bounds "busy" transfers of long frames (see the module documentation),
    /// which run only while this host's ranks fit its cores; zero turns them off too.
    /// Default: 50 µs (`FMI_SPIN_US`, `[direct] spin_us`).
    pub spin: Duration,
    /// How long a `recv_into` whose buffer holds a long frame (16 KiB or more) waits for it
    /// before it sleeps, while this host's ranks fit its cores (as busy transfers): after the
    /// usual `spin` window it keeps reading the socket, yielding to the runtime between tries,
    /// until this much has passed. Its peer is most likely busy with the previous long
    /// transfer or its share of the work, and a receive that sleeps pays a wake-up (tens of
    /// µs in a VM) before the copy-out starts. Not shorter than `spin`; `spin` zero turns it
    /// off. Default: 2 ms (`FMI_LONG_WAIT_US`, `[direct] long_wait_us`).
    pub long_wait: Duration,
    /// Send and receive buffer (`SO_SNDBUF`, `SO_RCVBUF`) of TCP connections whose peer is on
    /// this host (a loopback address, or this end's own address); 0 leaves the kernel's
    /// autotuning. A small buffer (256 KiB) makes a large message cross in pieces, so the
    /// receiver copies one piece out while the sender copies the next in: a one-way stream
    /// between two ranks gains (4 MiB ping-pong p50 1.3–1.5 ms instead of 2.1–2.2 ms on
    /// loopback), but an exchange, where both directions already keep both cores busy, loses
    /// (a 2-rank 1 MiB allreduce 0.95–1.35 ms instead of 0.5–0.8 ms; docs/benchmarks.md), so
    /// it is off by default. Connections to other hosts keep autotuning, which a network's
    /// bandwidth-delay product needs. Used only while the ranks announced on this host do not
    /// outnumber its cores ([`crate::host_cores`]): the pieces pipeline only when both ends
    /// run at once. Default: 0 (`FMI_LOCAL_SOCKET_BUFFER`, `[direct] local_socket_buffer`).
    pub local_socket_buffer: usize,
}

impl Default for TcpConfig {
    fn default() -> TcpConfig {
        TcpConfig {
            unexpected_bound: 64 << 20,
            max_message: 1 << 30,
            connect_backoff_initial: Duration::from_millis(5),
            connect_backoff_max: Duration::from_millis(500),
            connect_attempts: 1000,
            handshake_timeout: Duration::from_secs(10),
            nat: NatConfig::default(),
            report_paths: false,
            token: JobToken::default(),
            spin: DEFAULT_SPIN,
            long_wait: DEFAULT_LONG_WAIT,
            local_socket_buffer: DEFAULT_LOCAL_SOCKET_BUFFER,
        }
    }
}

impl TcpConfig {
    fn validate(&self) -> Result<()> {
        let bad = |detail: &str| Error::Config {
            path: None,
            detail: format!("tcp channel: {detail}"),
        };
        if self.unexpected_bound == 0 {
            return Err(bad("unexpected_bound must be at least 1 byte"));
        }
        if self.connect_attempts == 0 {
            return Err(bad("connect_attempts must be at least 1"));
        }
        if self.handshake_timeout.is_zero() {
            return Err(bad("handshake_timeout must be positive"));
        }
        if self.token.len() > wire::MAX_TOKEN_LEN {
            return Err(bad("the job token is longer than 1024 bytes"));
        }
        Ok(())
    }
}

/// A bound listening socket whose endpoint is not started yet (see [`TcpChannel::bind`]).
/// Connections that arrive before the start wait in the kernel's backlog.
#[derive(Debug)]
pub struct TcpListenerBinding {
    listener: TcpListener,
    addr: SocketAddr,
}

impl TcpListenerBinding {
    /// The address the socket is bound to (with the port chosen by the OS if 0 was asked).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

/// What [`TcpChannel::start_quic`] needs: this rank's QUIC binding and every rank's
/// published QUIC endpoint (index = rank).
#[derive(Debug)]
pub struct QuicSetup {
    /// This rank's socket and certificate.
    pub binding: QuicBinding,
    /// Every rank's addresses and fingerprint.
    pub peers: Vec<QuicPeer>,
}

/// One rank's endpoint of the direct TCP channel. See the [module docs](self).
///
/// ```no_run
/// # async fn demo(
/// #     job: fmi_channels::JobId,
/// #     rank: fmi_channels::Rank,
/// #     exchange: impl std::future::Future<Output = Vec<std::net::SocketAddr>>,
/// # ) -> fmi_channels::Result<()> {
/// use fmi_channels::tcp::{TcpChannel, TcpConfig};
///
/// let binding = TcpChannel::bind("0.0.0.0:0".parse().expect("address")).await?;
/// // Publish `binding.local_addr()` through the rendezvous and learn everyone's (index = rank).
/// let peers = exchange.await;
/// let channel = TcpChannel::start(binding, job, rank, peers, TcpConfig::default())?;
/// # drop(channel);
/// # Ok(())
/// # }
/// ```
pub struct TcpChannel {
    shared: Arc<Shared>,
}

/// Binds `n` endpoints on `127.0.0.1` (ports chosen by the OS) and starts them as ranks `0..n`
/// of `job`. For tests and single-machine runs.
pub async fn local_world(job: JobId, n: u32, config: TcpConfig) -> Result<Vec<TcpChannel>> {
    let mut bindings = Vec::with_capacity(n as usize);
    for _ in 0..n {
        bindings.push(TcpChannel::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0))).await?);
    }
    let addrs: Vec<SocketAddr> = bindings.iter().map(|b| b.local_addr()).collect();
    bindings
        .into_iter()
        .zip(0u32..)
        .map(|(b, r)| TcpChannel::start(b, job.clone(), Rank(r), addrs.clone(), config.clone()))
        .collect()
}

/// Like [`local_world`], with the direct paths over QUIC (each rank a UDP socket on
/// `127.0.0.1` and a fresh certificate).
pub async fn local_world_quic(job: JobId, n: u32, config: TcpConfig) -> Result<Vec<TcpChannel>> {
    let mut bindings = Vec::with_capacity(n as usize);
    let mut quic = Vec::with_capacity(n as usize);
    for _ in 0..n {
        bindings.push(TcpChannel::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0))).await?);
        quic.push(QuicBinding::bind(SocketAddr::from((
            Ipv4Addr::LOCALHOST,
            0,
        )))?);
    }
    let addrs: Vec<SocketAddr> = bindings.iter().map(|b| b.local_addr()).collect();
    let table: Vec<QuicPeer> = quic
        .iter()
        .map(|q| QuicPeer {
            addrs: vec![q.local_addr()],
            fingerprint: q.fingerprint(),
        })
        .collect();
    bindings
        .into_iter()
        .zip(quic)
        .zip(0u32..)
        .map(|((b, q), r)| {
            let setup = QuicSetup {
                binding: q,
                peers: table.clone(),
            };
            TcpChannel::start_quic(
                b,
                setup,
                job.clone(),
                Rank(r),
                addrs.clone(),
                config.clone(),
                None,
            )
        })
        .collect()
}

impl TcpChannel {
    /// Binds the listening socket (port 0 lets the OS choose) before the peer table is known, so
    /// that its address can be published. A failure is reported as [`Error::Config`] since the
    /// rank is not known yet and the usual cause is the address asked for.
    pub async fn bind(addr: SocketAddr) -> Result<TcpListenerBinding> {
        let failed = |e: io::Error| Error::Config {
            path: None,
            detail: format!("tcp channel: cannot listen on {addr}: {e}"),
        };
        let listener = TcpListener::bind(addr).await.map_err(failed)?;
        let addr = listener.local_addr().map_err(failed)?;
        Ok(TcpListenerBinding { listener, addr })
    }

    /// Starts the endpoint of `rank` once every rank's listening address is known
    /// (`peers[r]` is rank `r`'s; this rank's own entry is not used). Must be called inside a
    /// tokio runtime, on which the endpoint's tasks then run.
    pub fn start(
        binding: TcpListenerBinding,
        job: JobId,
        rank: Rank,
        peers: Vec<SocketAddr>,
        config: TcpConfig,
    ) -> Result<TcpChannel> {
        Self::start_inner(binding, job, rank, peers, config, None, None)
    }

    /// Like [`start`](Self::start), with NAT traversal: a pair that cannot dial each other's
    /// listener is connected by hole punching or through the relay (see the
    /// [module docs](self) and [`nat`]). `peers[r]` is rank `r`'s announced (private) endpoint.
    pub fn start_with_traversal(
        binding: TcpListenerBinding,
        job: JobId,
        rank: Rank,
        peers: Vec<SocketAddr>,
        config: TcpConfig,
        traversal: Traversal,
    ) -> Result<TcpChannel> {
        Self::start_inner(binding, job, rank, peers, config, Some(traversal), None)
    }

    /// Like [`start`](Self::start) (or [`start_with_traversal`](Self::start_with_traversal)
    /// with `traversal`), with the direct and punched paths over QUIC (see [`quic`]): `quic`
    /// holds this rank's bound UDP socket and certificate and what every rank published
    /// (`quic.peers[r]` is rank `r`'s; this rank's own entry is not used). The relay stays
    /// TCP, and this endpoint accepts no TCP connection but the relay's: every rank of the
    /// job must use the same transport.
    pub fn start_quic(
        binding: TcpListenerBinding,
        quic: QuicSetup,
        job: JobId,
        rank: Rank,
        peers: Vec<SocketAddr>,
        config: TcpConfig,
        traversal: Option<Traversal>,
    ) -> Result<TcpChannel> {
        Self::start_inner(binding, job, rank, peers, config, traversal, Some(quic))
    }

    fn start_inner(
        binding: TcpListenerBinding,
        job: JobId,
        rank: Rank,
        peers: Vec<SocketAddr>,
        config: TcpConfig,
        traversal: Option<Traversal>,
        quic: Option<QuicSetup>,
    ) -> Result<TcpChannel> {
        let size = u32::try_from(peers.len()).map_err(|_| Error::InvalidArgument {
            what: "tcp channel: more than u32::MAX peers",
        })?;
        check_rank(rank, size)?;
        config.validate()?;
        let runtime = Handle::try_current().map_err(|_| Error::InvalidArgument {
            what: "TcpChannel::start must be called inside a tokio runtime",
        })?;
        let quic = match quic {
            Some(QuicSetup { binding, peers: q }) => {
                if q.len() != peers.len() {
                    return Err(Error::InvalidArgument {
                        what: "tcp channel: the quic peer table and the peer table differ in size",
                    });
                }
                // quinn spawns its driver on the current runtime.
                let _entered = runtime.enter();
                Some(Quic::start(binding, q)?)
            }
            None => None,
        };
        let local_buffer = same_host_buffer(&peers, rank, config.local_socket_buffer);
        let busy = (!config.spin.is_zero() && host_fits_cores(&peers, rank)).then_some(config.spin);
        let shared = Arc::new(Shared {
            me: rank,
            size,
            local_buffer,
            busy,
            token: config.token.clone(),
            inbox: Inbox::new(rank, NAME),
            peers: peers
                .into_iter()
                .map(|addr| Peer {
                    addr,
                    turnstile: Turnstile::new(),
                    state: watch::Sender::new(LinkState::Idle),
                    signals: watch::Sender::new(Signals::default()),
                    path: AtomicU8::new(PATH_NONE),
                    quic: AtomicBool::new(false),
                    told: AtomicBool::new(false),
                    stored: AtomicU8::new(STORED_UNTRIED),
                })
                .collect(),
            tasks: Mutex::new(Tasks {
                set: JoinSet::new(),
                closed: false,
            }),
            pumps: AtomicU64::new(0),
            spins: Default::default(),
            runtime,
            sockets: Arc::new(AtomicUsize::new(0)),
            local_addr: binding.addr,
            job,
            config,
            nat: Mutex::new(None),
            quic,
            linger: Mutex::new(None),
            lingered: AtomicBool::new(false),
            revoked: OnceLock::new(),
            telling: watch::Sender::new(0),
        });
        match &shared.quic {
            Some(q) => {
                // The TCP listener closes: over QUIC no cleartext direct path is offered.
                drop(binding.listener);
                shared.spawn(Arc::clone(&shared).listen_quic(q.endpoint.clone()));
            }
            None => {
                shared.spawn(Arc::clone(&shared).listen(binding.listener));
            }
        }
        if let Some(traversal) = traversal {
            let Traversal {
                punch_from,
                rendezvous,
                events,
            } = traversal;
            *shared.lock_nat() = Some(Nat {
                punch_from,
                rendezvous,
            });
            shared.spawn(Arc::clone(&shared).traversal_events(events));
        }
        Ok(TcpChannel { shared })
    }

    /// How each peer this endpoint has connected to was reached, in rank order (peers never
    /// connected to are left out). A pair keeps its path for its lifetime: the connection rule
    /// makes one connection per pair, so this is also how its traffic flows.
    pub fn paths(&self) -> Vec<(Rank, PathKind)> {
        (0u32..)
            .zip(&self.shared.peers)
            .filter_map(|(r, p)| path_from_u8(p.path.load(Ordering::Relaxed)).map(|k| (Rank(r), k)))
            .collect()
    }

    /// Open peer sockets that are not a pair's established connection: handshakes, dials,
    /// punches and relay attempts still under way. Zero once every wanted pair is connected
    /// (whichever path won, the losers are closed).
    pub fn stray_sockets(&self) -> usize {
        let up = self
            .shared
            .peers
            .iter()
            .filter(|p| matches!(&*p.state.borrow(), LinkState::Up(_)))
            .count();
        self.open_connections().saturating_sub(up)
    }

    /// Shuts the endpoint down, waits (up to [`STRAY_SETTLE`]) until every task has ended, and
    /// returns the sockets still open then: 0 unless something outlives the channel's tasks (a
    /// leak). Counting before the shutdown would also count attempts that are simply being
    /// aborted or a handshake a peer just gave up, which close a moment later. Waits only on a
    /// multi-thread runtime (blocking this thread, not the workers); elsewhere the tasks are
    /// aborted and the count is taken at once. For the `report_paths` diagnostic.
    fn sockets_left_after_shutdown(&self) -> usize {
        let mut tasks = self.shared.shutdown();
        match tokio::runtime::Handle::try_current() {
            Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
                tokio::task::block_in_place(|| {
                    h.block_on(async {
                        let _ = tokio::time::timeout(STRAY_SETTLE, tasks.shutdown()).await;
                    });
                });
            }
            _ => drop(tasks),
        }
        self.open_connections()
    }

    /// Whether this endpoint was started with NAT traversal.
    pub fn traverses_nat(&self) -> bool {
        self.shared.nat().is_some()
    }

    /// The address this endpoint listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.shared.local_addr
    }

    /// This endpoint's inbox (for tests and diagnostics: buffered bytes, leftovers).
    pub fn inbox(&self) -> &Arc<Inbox> {
        &self.shared.inbox
    }

    /// The sockets to or from peers this endpoint holds open, including ones still in their
    /// handshake. In steady state it is the number of peers talked to: one per pair.
    pub fn open_connections(&self) -> usize {
        self.shared.sockets.load(Ordering::Relaxed)
    }

    /// Shuts the endpoint down and waits until all its tasks have ended. Dropping the channel does
    /// the same without waiting.
    pub async fn close(self) {
        self.shared.close().await;
    }

    /// `"quic"` if the direct and punched paths run over QUIC, else `"tcp"`.
    pub fn transport(&self) -> &'static str {
        if self.shared.quic.is_some() {
            "quic"
        } else {
            "tcp"
        }
    }

    /// The peers whose connection runs over QUIC, in rank order (the rest, relayed pairs
    /// among them, run over TCP).
    pub fn quic_peers(&self) -> Vec<Rank> {
        (0u32..)
            .zip(&self.shared.peers)
            .filter(|(_, p)| {
                p.quic.load(Ordering::Relaxed)
                    && path_from_u8(p.path.load(Ordering::Relaxed)).is_some()
            })
            .map(|(r, _)| Rank(r))
            .collect()
    }
}

impl fmt::Debug for TcpChannel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TcpChannel")
            .field("job", &self.shared.job)
            .field("rank", &self.shared.me)
            .field("size", &self.shared.size)
            .field("local_addr", &self.shared.local_addr)
            .finish_non_exhaustive()
    }
}

impl Drop for TcpChannel {
    fn drop(&mut self) {
        if self.shared.config.report_paths {
            let paths: Vec<String> = self
                .paths()
                .into_iter()
                .map(|(r, k)| format!("{}={k}", r.0))
                .collect();
            eprintln!(
                "fmi-paths: rank {}: {}; stray sockets {}",
                self.shared.me.0,
                paths.join(" "),
                self.sockets_left_after_shutdown()
            );
            let quic: Vec<String> = self.quic_peers().iter().map(|r| r.0.to_string()).collect();
            eprintln!(
                "fmi-transport: rank {}: {}; quic peers {}",
                self.shared.me.0,
                self.transport(),
                quic.join(",")
            );
        }
        // Dropping the returned set aborts every task; their `Arc<Shared>`s go with them.
        drop(self.shared.shutdown());
        // Over QUIC, what was written is delivered only while the endpoint lives: on a
        // multi-thread runtime wait (bounded by `quic::LINGER`) for the peers' acknowledgements,
        // elsewhere let the linger task run on by itself.
        if let Some(linger) = self.shared.take_linger() {
            if let Ok(h) = Handle::try_current() {
                if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread {
                    tokio::task::block_in_place(|| {
                        let _ = h.block_on(linger);
                    });
                }
            }
        }
    }
}

impl Channel for TcpChannel {
    fn name(&self) -> &'static str {
        NAME
    }

    fn job(&self) -> &JobId {
        &self.shared.job
    }

    fn rank(&self) -> Rank {
        self.shared.me
    }

    fn size(&self) -> u32 {
        self.shared.size
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            max_message: Some(self.shared.config.max_message),
            ..Capabilities::push_unlimited()
        }
    }

    /// `paths_direct`, `paths_punched`, `paths_relayed`, `paths_stored`: how many peers were reached each way
    /// (see [`TcpChannel::paths`]).
    fn counters(&self) -> Vec<(&'static str, u64)> {
        let mut counts = [0u64; 4];
        for (_, kind) in self.paths() {
            counts[match kind {
                PathKind::Direct => 0,
                PathKind::Punched => 1,
                PathKind::Relayed => 2,
                PathKind::Stored => 3,
            }] += 1;
        }
        vec![
            ("paths_direct", counts[0]),
            ("paths_punched", counts[1]),
            ("paths_relayed", counts[2]),
            ("paths_stored", counts[3]),
            ("paths_quic", self.quic_peers().len() as u64),
            ("spins_caught", self.shared.spins[0].load(Ordering::Relaxed)),
            ("spins_missed", self.shared.spins[1].load(Ordering::Relaxed)),
            (
                "spins_skipped",
                self.shared.spins[2].load(Ordering::Relaxed),
            ),
        ]
    }

    fn paths(&self) -> Vec<(Rank, PathKind)> {
        TcpChannel::paths(self)
    }

    /// Over QUIC: shuts the endpoint down and waits (at most [`quic::LINGER`]) until the
    /// peers have read what was sent to them (see [`quic`]). Over TCP nothing: the kernel
    /// delivers what was written after the sockets close. With a storage fallback
    /// ([`NatConfig::fallback`]): shuts the endpoint down and closes the storage channel.
    fn close(&self) -> BoxFuture<'_, ()> {
        async move {
            let fallback = self.shared.config.nat.fallback.as_ref();
            if self.shared.quic.is_none() && fallback.is_none() {
                return;
            }
            self.shared.close().await;
            // With the storage fallback: the tasks that read stored streams have ended, so
            // the storage channel can finish its deferred work (Redis deletes the keys read).
            if let Some(fallback) = fallback {
                fallback.0.close().await;
            }
        }
        .boxed()
    }

    /// Revokes the endpoint and sends an abort frame to every peer (see the module docs):
    /// returns once every frame is written, or after [`ABORT_SPREAD`] (500 ms).
    fn abort(&self, victim: Rank) -> BoxFuture<'_, ()> {
        let sh = &self.shared;
        if victim.0 < sh.size {
            sh.revoke(victim, sh.me, true);
        }
        let mut telling = sh.telling.subscribe();
        async move {
            let bound = ABORT_SPREAD + Duration::from_millis(100);
            let _ = tokio::time::timeout(bound, telling.wait_for(|n| *n == 0)).await;
        }
        .boxed()
    }

    fn send<'a>(
        &'a self,
        dst: Rank,
        tag: Tag,
        data: &'a [u8],
        deadline: Instant,
    ) -> BoxFuture<'a, Result<()>> {
        let sh = &self.shared;
        if let Err(e) = check_rank(dst, sh.size) {
            return futures::future::ready(Err(e)).boxed();
        }
        if data.len() > sh.config.max_message {
            return futures::future::ready(Err(Error::TooLarge {
                len: data.len(),
                max: sh.config.max_message,
                channel: NAME,
            }))
            .boxed();
        }
        if let Some(e) = sh.revoked_error() {
            return futures::future::ready(Err(e)).boxed();
        }
        if dst == sh.me {
            sh.inbox.deliver(sh.me, tag, data.to_vec());
            return futures::future::ready(Ok(())).boxed();
        }
        // Taking the turn here, synchronously, fixes the message's place on the wire.
        let turn = sh.peers[dst.idx()].turnstile.join();
        async move {
            let mut turn = turn;
            // The common case (no earlier send to `dst` pending, connection up) needs neither a
            // timer nor the clock; `started` is read only when this send has to wait.
            if !turn.try_ready() {
                let started = Instant::now();
                tokio::time::timeout_at(deadline, turn.ready())
                    .await
                    .map_err(|_| sh.timeout(dst, tag, started, deadline))?;
            }
            let link = match sh.up_link(dst) {
                Some(link) => link,
                None => sh
                    .link_to(dst, tag, Instant::now(), deadline)
                    .await
                    .map_err(|e| sh.second_look(e))?,
            };
            sh.write_frame(dst, &link, tag, data, deadline)
                .await
                .map_err(|e| sh.second_look(e))
            // `turn` drops here, letting the next send to `dst` write.
        }
        .boxed()
    }

    fn recv(&self, src: Rank, tag: Tag, deadline: Instant) -> BoxFuture<'_, Result<Vec<u8>>> {
        let sh = &self.shared;
        if let Err(e) = check_rank(src, sh.size) {
            return futures::future::ready(Err(e)).boxed();
        }
        // Registered here, synchronously, so receives match in call order.
        let inbox = sh.inbox.recv(src, tag, deadline);
        let link = match sh.up_link(src) {
            Some(link) if src != sh.me => link,
            _ => return async move { inbox.await.map_err(|e| sh.second_look(e)) }.boxed(),
        };
        async move {
            let mut inbox = pin!(inbox);
            let mut pump = Pump {
                shared: sh,
                peer: src,
                link,
                id: sh.pumps.fetch_add(1, Ordering::Relaxed),
                tag,
                pumped: false,
                first_pump: None,
                spun: false,
                spin_until: None,
                tight_until: None,
                window: Duration::ZERO,
                direct: None,
            };
            let got = std::future::poll_fn(|cx| {
                if let Poll::Ready(r) = inbox.as_mut().poll(cx) {
                    return Poll::Ready(r);
                }
                if pump.pump(cx) {
                    // What was read may be the message this receive waits for.
                    return inbox.as_mut().poll(cx);
                }
                Poll::Pending
            })
            .await;
            drop(pump);
            got.map_err(|e| sh.second_look(e))
        }
        .boxed()
    }

    /// Like `recv`, and while it waits for a connected peer it reads the payload of its message
    /// straight from the socket into `buf` (see the `reader` module), so that a large message is
    /// not copied once more. A message that was already buffered, or that arrives while another
    /// task reads the connection, is copied from its vector.
    fn recv_into<'a>(
        &'a self,
        src: Rank,
        tag: Tag,
        buf: &'a mut [u8],
        deadline: Instant,
    ) -> BoxFuture<'a, Result<usize>> {
        let sh = &self.shared;
        if let Err(e) = check_rank(src, sh.size) {
            return futures::future::ready(Err(e)).boxed();
        }
        let me = sh.me;
        // Registered here, synchronously, so receives match in call order; without a channel
        // to answer it until it has to wait if it is going to spin (see `Inbox::reserve`).
        let link = sh.up_link(src);
        let lazy = link
            .as_ref()
            .is_some_and(|l| !sh.config.spin.is_zero() && l.spin_skip.load(Ordering::Relaxed) == 0);
        let mut inbox = sh.inbox.reserve(src, tag, deadline, lazy);
        let (link, ticket) = match (link, inbox.ticket()) {
            (Some(link), Some(ticket)) if src != me => (link, ticket),
            _ => {
                return async move {
                    let msg = inbox.await.map_err(|e| sh.second_look(e))?;
                    crate::copy_message(me, src, &msg, buf)
                }
                .boxed()
            }
        };
        async move {
            let mut pump = Pump {
                shared: sh,
                peer: src,
                link,
                id: sh.pumps.fetch_add(1, Ordering::Relaxed),
                tag,
                pumped: false,
                first_pump: None,
                spun: false,
                spin_until: None,
                tight_until: None,
                window: Duration::ZERO,
                direct: Some(DirectRecv {
                    tag,
                    ticket,
                    buf,
                    done: None,
                    taken: false,
                }),
            };
            let got = std::future::poll_fn(|cx| {
                // Until it waits through a channel, the reservation is polled only after the
                // pump (a poll would make the channel), and always before `Pending`.
                let waiting = inbox.is_waiting();
                if waiting {
                    if let Poll::Ready(r) = Pin::new(&mut inbox).poll(cx) {
                        return Poll::Ready(r);
                    }
                }
                let read = pump.pump(cx);
                if read && pump.direct_done() {
                    // `Vec::new` does not allocate; the length is in the pump.
                    return Poll::Ready(Ok(Vec::new()));
                }
                if read || !waiting {
                    return Pin::new(&mut inbox).poll(cx);
                }
                Poll::Pending
            })
            .await;
            let direct = pump.finish();
            if direct.as_ref().is_some_and(|d| d.taken) {
                inbox.taken();
            }
            match direct {
                Some(DirectRecv {
                    done: Some(len), ..
                }) => Ok(len),
                Some(DirectRecv { buf, .. }) => {
                    let msg = got.map_err(|e| sh.second_look(e))?;
                    crate::copy_message(me, src, &msg, buf)
                }
                None => Err(Error::Closed { channel: NAME }),
            }
        }
        .boxed()
    }
}

/// State shared by the endpoint and its tasks.
struct Shared {
    job: JobId,
    me: Rank,
    size: u32,
    config: TcpConfig,
    /// The per-job token sent in and required of every hello (empty: none).
    token: JobToken,
    inbox: Arc<Inbox>,
    /// Index = rank; this rank's own entry is unused.
    peers: Vec<Peer>,
    tasks: Mutex<Tasks>,
    /// Numbers the receives that read connections themselves (see [`Pump`]).
    pumps: AtomicU64,
    /// Receives that spun and were answered within the window, spun in vain, and slept at once
    /// because of the back-off (the `spins_caught`, `spins_missed`, `spins_skipped` counters).
    spins: [AtomicU64; 3],
    runtime: Handle,
    /// Open peer sockets (see [`TcpChannel::open_connections`]); separate from `Shared` so that
    /// socket guards do not keep the endpoint alive.
    sockets: Arc<AtomicUsize>,
    local_addr: SocketAddr,
    /// [`TcpConfig::local_socket_buffer`], or 0 where this host's ranks outnumber its cores.
    local_buffer: usize,
    /// How long a long frame being written or read by a waiting call may go without progress
    /// before that call sleeps until the kernel wakes it ("busy" transfers, see the module
    /// documentation): [`TcpConfig::spin`], or `None` where spinning is off or this host's
    /// ranks outnumber its cores.
    busy: Option<Duration>,
    /// NAT traversal, if started with it; taken on shutdown (which ends the rendezvous session).
    nat: Mutex<Option<Nat>>,
    /// The QUIC endpoint, if the direct paths run over QUIC (the relay stays TCP).
    quic: Option<Quic>,
    /// After shutdown, the task that waits (bounded) until peers have acknowledged the data
    /// written to them over QUIC, then closes the endpoint.
    linger: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// Whether the QUIC linger task was started (at most once).
    lingered: AtomicBool,
    /// Set once, by the first abort this endpoint hears of (its own or a peer's): the rank that
    /// failed and the rank that saw it fail (see [`Channel::abort`]).
    revoked: OnceLock<(Rank, Rank)>,
    /// Tasks passing the abort on to peers that have not finished yet (each bounded by
    /// [`ABORT_SPREAD`]); [`Channel::abort`] waits until there are none.
    telling: watch::Sender<usize>,
}

/// The endpoint's means of NAT traversal.
#[derive(Clone)]
struct Nat {
    punch_from: SocketAddr,
    rendezvous: Arc<dyn Rendezvous>,
}

/// `Peer::path` values.
const PATH_NONE: u8 = 0;

fn path_to_u8(kind: PathKind) -> u8 {
    match kind {
        PathKind::Direct => 1,
        PathKind::Punched => 2,
        PathKind::Relayed => 3,
        PathKind::Stored => 4,
    }
}

fn path_from_u8(v: u8) -> Option<PathKind> {
    match v {
        1 => Some(PathKind::Direct),
        2 => Some(PathKind::Punched),
        3 => Some(PathKind::Relayed),
        4 => Some(PathKind::Stored),
        _ => None,
    }
}

/// What the rendezvous last said about a peer; the dial task acts on each new order once.
#[derive(Clone, Debug, Default)]
struct Signals {
    /// Counts `Punch` orders; `punch` is the latest.
    punch_seq: u64,
    punch: Option<PunchOrder>,
    /// Counts `RelayOffer`s.
    relay_seq: u64,
}

#[derive(Clone, Debug)]
struct PunchOrder {
    public: Option<SocketAddr>,
    start_at: Instant,
}

/// Every task of an endpoint: listener, handshakes, dials and readers.
struct Tasks {
    set: JoinSet<()>,
    closed: bool,
}

struct Peer {
    addr: SocketAddr,
    /// Sends to this peer write in call order.
    turnstile: Turnstile,
    /// The connection state; the watch wakes sends waiting for a connection.
    state: watch::Sender<LinkState>,
    /// Orders from the rendezvous about this peer (NAT traversal).
    signals: watch::Sender<Signals>,
    /// How the pair's connection was made (`PATH_NONE` until it is).
    path: AtomicU8,
    /// Whether the pair's connection runs over QUIC (set with `path`).
    quic: AtomicBool,
    /// Whether this peer knows of the abort: we sent it an abort frame, or it sent us one.
    told: AtomicBool,
    /// The storage fallback's handshake with this peer (`STORED_*`).
    stored: AtomicU8,
}

/// `Peer::stored`: no handshake over the storage fallback yet.
const STORED_UNTRIED: u8 = 0;
/// One is under way.
const STORED_RUNNING: u8 = 1;
/// The last one ran to its end (installed, or the pair had connected another way): the
/// stream holds nothing unread, so another may run.
const STORED_CLEAN: u8 = 2;
/// One was cut off: bytes of it may wait unread in storage and would be taken for the next
/// handshake's, so the pair does not fall back to storage again.
const STORED_BROKEN: u8 = 3;

enum LinkState {
    /// No connection and nobody is making one.
    Idle,
    /// A dial task is trying to connect, for sends whose latest deadline is `until`.
    Dialing { until: Instant },
    /// An inbound hello was accepted and the reply is being written.
    Accepting,
    /// The pair's one connection.
    Up(Arc<Link>),
    /// The connection broke; nothing more will be sent or received.
    Lost,
    /// The peer refused our hello for a reason that retrying will not fix.
    Refused(Status),
    /// This endpoint has shut down.
    Closed,
}

/// One established connection.
struct Link {
    /// Taken (closing our direction of the stream) when a partial frame poisons it. The lock is
    /// never contended: the peer's turnstile already lets one send at a time through.
    writer: tokio::sync::Mutex<Option<WriteHalf>>,
    /// The receiving half, read by the reader task or by a waiting receive; `None` once closed.
    /// Held only while parsing what the socket has, never across an await.
    reader: Mutex<Option<Reader>>,
    reader_task: OnceLock<AbortHandle>,
    /// Counts the socket as open until both halves are dropped (see [`Link::close`]).
    socket: Mutex<Option<SocketGuard>>,
    /// Spin back-off ([`TcpConfig::spin`]): receives from this peer still to sleep without
    /// spinning, and the spins in a row that the window did not answer.
    spin_skip: AtomicU32,
    spin_failures: AtomicU32,
}

impl Link {
    fn lock_reader(&self) -> MutexGuard<'_, Option<Reader>> {
        // The parser state is only changed by complete steps; a panic cannot leave it half-set.
        self.reader.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Stops reading and closes our sending direction, so the peer sees the end of the stream.
    fn close(&self) {
        if let Some(h) = self.reader_task.get() {
            h.abort();
        }
        self.lock_reader().take();
        // A write in progress keeps its half (and the socket) until the link goes.
        if let Ok(mut w) = self.writer.try_lock() {
            w.take();
            // Both halves are gone, so the socket is closed, even if a task that has not run
            // since its abort still holds the link.
            self.socket.lock().unwrap_or_else(|e| e.into_inner()).take();
        }
    }
}

/// A receive that reads its peer's connection itself while it waits (see the `reader` module).
/// Dropped (message received, deadline, cancellation), it hands the connection back to the
/// reader task if it was the one the socket would wake.
struct Pump<'a> {
    shared: &'a Arc<Shared>,
    peer: Rank,
    link: Arc<Link>,
    id: u64,
    /// The tag the receive waits for: a frame with it ends the spin.
    tag: Tag,
    pumped: bool,
    /// When this receive first read the socket, and whether it then started to spin.
    first_pump: Option<std::time::Instant>,
    spun: bool,
    /// Until when it spins; `None` once the window is over or a frame of its tag has come.
    spin_until: Option<std::time::Instant>,
    /// From when a long wait (see [`TcpConfig::long_wait`]) yields between reads instead of
    /// looping.
    tight_until: Option<std::time::Instant>,
    /// The spin window this receive got: `spin`, or `long_wait` for a long `recv_into`.
    window: std::time::Duration,
    /// The buffer of a `recv_into`, into which the message may be read directly.
    direct: Option<DirectRecv<'a>>,
}

/// A `recv_into`'s buffer, lent to its [`Pump`].
struct DirectRecv<'a> {
    tag: Tag,
    /// The receive's ticket in the inbox.
    ticket: u64,
    buf: &'a mut [u8],
    /// The length of the message once it has been read into `buf`.
    done: Option<usize>,
    /// Whether the receive was taken out of the inbox for it ([`Inbox::claim`] or
    /// [`Inbox::withdraw`]).
    taken: bool,
}

impl<'a> Pump<'a> {
    /// Whether the message of this `recv_into` has been read into its buffer.
    fn direct_done(&self) -> bool {
        self.direct.as_ref().is_some_and(|d| d.done.is_some())
    }

    /// Ends the use of the `recv_into` buffer (a payload half-read into it is copied out, see
    /// [`Reader::detach`]) and gives it back.
    fn finish(&mut self) -> Option<DirectRecv<'a>> {
        if let Some(d) = self.direct.as_ref() {
            if self.pumped && d.done.is_none() {
                if let Some(reader) = self.link.lock_reader().as_mut() {
                    reader.detach(self.id, d.buf);
                }
            }
        }
        self.direct.take()
    }

    /// After this receive's message has come: whether it may stop reading at once, without
    /// reading on until the socket is empty. It may when the reader's buffer holds nothing
    /// unparsed and the receive never registered with the socket (it read only with the spin's
    /// plain reads, which leave tokio's registration as it was): whoever the socket wakes now
    /// (the reader task, or another receive) is the one it woke before, and bytes arriving
    /// later wake it as they would have. This skips a registration with the socket and the hand
    /// back of it when the receive ends, on every message a spin catches.
    fn may_stop(&self, reader: &mut Reader) -> bool {
        if reader.owner == Some(self.id) || reader.holds_bytes() {
            return false;
        }
        reader.spin_until(None);
        reader.busy(None);
        true
    }

    /// Reads and delivers the frames the socket has; afterwards this receive is woken by the
    /// socket. Returns whether it read (so the caller looks in the inbox again). Does nothing if
    /// another task is reading the connection right now (but asks to be polled again at once:
    /// the socket may be this receive's to read), or too many bytes wait for receivers
    /// (the reader task then waits for space, as it always does). A `recv_into` reads its own
    /// message into its buffer if it can (see the `reader` module).
    fn pump(&mut self, cx: &mut Context<'_>) -> bool {
        let sh = self.shared;
        let mut guard = match self.link.reader.try_lock() {
            Ok(g) => g,
            Err(TryLockError::Poisoned(e)) => e.into_inner(),
            Err(TryLockError::WouldBlock) => {
                // Another task is reading the connection right now: the reader task, or a
                // receive handing the socket back. This receive may be the one the socket
                // would wake (`owner`), and the other task then stands aside for it, so it
                // must come back rather than wait for a wake-up nobody will send. The lock is
                // held only while parsing, never across an await, so the retry is short.
                cx.waker().wake_by_ref();
                return false;
            }
        };
        let Some(reader) = guard.as_mut() else {
            return false;
        };
        if reader.direct_owner().is_some_and(|owner| owner != self.id) {
            // Another receive is reading a payload into its own buffer; the socket wakes it, and
            // it delivers what follows.
            return false;
        }
        self.pumped = true;
        if self.first_pump.is_none() {
            let now = std::time::Instant::now();
            self.first_pump = Some(now);
            let spin = sh.config.spin;
            // A `recv_into` of a long message, while this host's ranks fit its cores: its
            // sender is likely still busy with the previous long transfer or its share of the
            // work, so it waits longer before sleeping, yielding after the usual window.
            let long = self
                .direct
                .as_ref()
                .is_some_and(|d| d.buf.len() >= reader::BUSY_MIN)
                && sh.busy.is_some();
            self.window = if long {
                spin.max(sh.config.long_wait)
            } else {
                spin
            };
            if !spin.is_zero() && reader.can_spin() {
                let skip = &self.link.spin_skip;
                // Not a read-modify-write race that matters: receives from one peer rarely
                // overlap, and a lost update only shifts when the next spin happens.
                match skip.load(Ordering::Relaxed) {
                    0 => {
                        self.spun = true;
                        self.spin_until = Some(now + self.window);
                        self.tight_until = (self.window > spin).then(|| now + spin);
                    }
                    n => {
                        skip.store(n - 1, Ordering::Relaxed);
                        sh.spins[2].fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
        if self
            .spin_until
            .is_some_and(|until| std::time::Instant::now() >= until)
        {
            self.spin_until = None;
        }
        reader.spin_until(self.spin_until);
        reader.spin_tight_until(self.tight_until);
        reader.busy(sh.busy);
        let peer = self.peer;
        let ended = loop {
            // A payload this receive has started to read into its own buffer adds nothing to
            // the buffered bytes, so the bound does not stop it.
            let reading_direct = reader.direct_owner() == Some(self.id);
            if !reading_direct && sh.inbox.buffered_bytes() >= sh.config.unexpected_bound {
                reader.spin_until(None);
                reader.busy(None);
                if reader.owner == Some(self.id) {
                    reader.owner = None;
                    let task = reader.background.clone();
                    drop(guard);
                    if let Some(task) = task {
                        task.wake();
                    }
                }
                return true;
            }
            // Whether the receive was taken out of the inbox when its header came (its whole
            // payload was at hand, see `Inbox::claim`).
            let mut claimed = false;
            let polled = match self.direct.as_mut() {
                Some(d) if d.done.is_none() => {
                    let (tag, ticket) = (d.tag, d.ticket);
                    let mut target = Target {
                        owner: self.id,
                        tag: tag.0,
                        buf: &mut *d.buf,
                        accept: |whole| {
                            if whole {
                                claimed = sh.inbox.claim(peer, tag, ticket);
                                claimed
                            } else {
                                sh.inbox.is_next(peer, tag, ticket)
                            }
                        },
                    };
                    reader.poll_frame_into(cx, &mut target)
                }
                _ => reader.poll_frame(cx).map_ok(Got::Frame),
            };
            match polled {
                Poll::Ready(Ok(Got::Frame(frame))) => {
                    let ours = matches!(&frame, Frame::Message { tag, .. } if *tag == self.tag.0);
                    if ours {
                        // Likely this receive's message: read on only what has already come.
                        self.spin_until = None;
                        reader.spin_until(None);
                    }
                    sh.on_frame(peer, frame);
                    if ours && self.may_stop(reader) {
                        return true;
                    }
                }
                Poll::Ready(Ok(Got::Direct(len))) => {
                    self.spin_until = None;
                    reader.spin_until(None);
                    if let Some(d) = self.direct.as_mut() {
                        d.done = Some(len);
                        // `withdraw` is `false` if the deadline (or a loss) answered the
                        // receive meanwhile; the message is in its buffer all the same, so it
                        // is returned.
                        d.taken = claimed || sh.inbox.withdraw(peer, d.tag, d.ticket);
                    }
                    if self.may_stop(reader) {
                        return true;
                    }
                    // Go on until the socket has nothing more, like a `recv`: then this
                    // receive is the one it wakes, and it hands that back when it ends.
                }
                Poll::Ready(Err(e)) => break e,
                Poll::Pending => {
                    // The spin (if any) is over: the socket wakes this receive from now on
                    // (or, reading a long payload busily or in a long wait, the receive polls
                    // again at once).
                    if !reader.spinning() {
                        self.spin_until = None;
                    }
                    reader.spin_until(None);
                    reader.busy(None);
                    reader.owner = Some(self.id);
                    return true;
                }
            }
        };
        guard.take();
        drop(guard);
        tracing::debug!(me = %sh.me, peer = %self.peer, error = %ended, "tcp: connection ended");
        sh.lose(self.peer, &self.link);
        true
    }
}

impl Drop for Pump<'_> {
    fn drop(&mut self) {
        if !self.pumped {
            return;
        }
        if let (Some(first), true) = (self.first_pump, self.spun) {
            let link = &self.link;
            if first.elapsed() <= self.window {
                link.spin_failures.store(0, Ordering::Relaxed);
                self.shared.spins[0].fetch_add(1, Ordering::Relaxed);
            } else {
                self.shared.spins[1].fetch_add(1, Ordering::Relaxed);
                // Spun in vain: the next receives sleep at once, exponentially more of them.
                let failures = link.spin_failures.load(Ordering::Relaxed).saturating_add(1);
                link.spin_failures.store(failures, Ordering::Relaxed);
                let skip = 1u32 << failures.min(SPIN_BACKOFF_MAX_EXP);
                link.spin_skip.store(skip, Ordering::Relaxed);
            }
        }
        // A `recv_into` cancelled while reading into its buffer leaves the frame to others.
        self.finish();
        let mut guard = self.link.lock_reader();
        let Some(reader) = guard.as_mut() else {
            return;
        };
        if reader.owner != Some(self.id) {
            return;
        }
        // The socket would wake this receive, which is going away: hand it back to the reader
        // task by polling it with the task's waker, as the task would (without a task switch).
        reader.owner = None;
        let Some(task) = reader.background.clone() else {
            // The task has not run yet; it polls the socket when it does.
            return;
        };
        let sh = self.shared;
        let mut cx = Context::from_waker(&task);
        let ended = loop {
            if sh.inbox.buffered_bytes() >= sh.config.unexpected_bound {
                drop(guard);
                task.wake();
                return;
            }
            match reader.poll_frame(&mut cx) {
                Poll::Ready(Ok(frame)) => sh.on_frame(self.peer, frame),
                Poll::Ready(Err(e)) => break e,
                Poll::Pending => return,
            }
        };
        guard.take();
        drop(guard);
        tracing::debug!(me = %sh.me, peer = %self.peer, error = %ended, "tcp: connection ended");
        sh.lose(self.peer, &self.link);
    }
}

/// Counts down [`Shared::telling`] when a task passing the abort on ends.
struct TellingDone(watch::Sender<usize>);

impl Drop for TellingDone {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n = n.saturating_sub(1));
    }
}

/// Counts one open peer socket while alive.
struct SocketGuard(Arc<AtomicUsize>);

impl SocketGuard {
    fn new(count: &Arc<AtomicUsize>) -> SocketGuard {
        count.fetch_add(1, Ordering::Relaxed);
        SocketGuard(Arc::clone(count))
    }
}

impl Drop for SocketGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Which state an established connection replaces.
#[derive(Clone, Copy)]
enum Side {
    Dialer,
    Acceptor,
}

/// Pause between the first QUIC punch datagrams and the lower rank's first connection.
const QUIC_PUNCH_REPEAT: Duration = Duration::from_millis(20);
/// Interval of QUIC punch rounds (datagrams, and on the lower rank fresh connections).
const QUIC_PUNCH_ROUND: Duration = Duration::from_millis(100);

/// How long an abort is passed on (connecting to peers included) before
/// [`Channel::abort`] returns anyway.
const ABORT_SPREAD: Duration = Duration::from_millis(500);

/// How long a writer that found its connection broken waits for the reader to finish reading
/// it (see [`Shared::settle`]).
const SETTLE: Duration = Duration::from_millis(100);

/// Most frames [`Shared::drain`] reads from one connection.
const DRAIN_FRAMES: usize = 1024;

/// How long the path report waits for the channel's tasks to end after its shutdown.
const STRAY_SETTLE: Duration = Duration::from_millis(500);

/// Which kind of attempt ended (the dial task re-arms the relay when it fails).
enum Attempt {
    Direct,
    Punch,
    Relay,
}

/// Marks the storage fallback's handshake with a peer broken unless it ran to its end.
struct StoredTurn<'a> {
    flag: &'a AtomicU8,
    clean: bool,
}

impl Drop for StoredTurn<'_> {
    fn drop(&mut self) {
        let end = if self.clean {
            STORED_CLEAN
        } else {
            STORED_BROKEN
        };
        self.flag.store(end, Ordering::Release);
    }
}

/// The outcome of one dial attempt that reached the peer.
enum Dialed {
    Accepted(Stream, SocketGuard),
    Refused(Status),
}

impl Shared {
    fn lock_tasks(&self) -> MutexGuard<'_, Tasks> {
        // The task set stays consistent even if a panic poisoned the lock.
        self.tasks.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Spawns an owned task; `None` once the endpoint has shut down.
    fn spawn<F>(&self, fut: F) -> Option<AbortHandle>
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        let mut tasks = self.lock_tasks();
        if tasks.closed {
            return None;
        }
        // Reap finished tasks so that short-lived handshakes do not accumulate.
        while tasks.set.try_join_next().is_some() {}
        Some(tasks.set.spawn_on(fut, &self.runtime))
    }

    /// Marks the endpoint closed, closes every connection and the inbox, and hands back the tasks
    /// (dropping the set aborts them; `shutdown().await` on it waits for them too).
    fn shutdown(&self) -> JoinSet<()> {
        let set = {
            let mut tasks = self.lock_tasks();
            tasks.closed = true;
            std::mem::take(&mut tasks.set)
        };
        let mut finished = Vec::new();
        for p in &self.peers {
            if let LinkState::Up(link) = p.state.send_replace(LinkState::Closed) {
                // A QUIC stream is finished, not dropped: its data must still be delivered
                // (see `quic`); a TCP socket's kernel does that by itself.
                if let Ok(mut w) = link.writer.try_lock() {
                    if let Some(WriteHalf::Quic(mut send, conn)) = w.take() {
                        let _ = send.finish();
                        let recv = link.lock_reader().take().and_then(Reader::into_quic);
                        finished.push(quic::Closing { send, recv, conn });
                    }
                }
                link.close();
            }
        }
        if let Some(q) = &self.quic {
            let mut linger = self.linger.lock().unwrap_or_else(|e| e.into_inner());
            // Once per endpoint: a second shutdown (the drop after `close`) has nothing left to
            // deliver, and waiting for a second linger there made `close` take seconds.
            if linger.is_none() && !self.lingered.swap(true, Ordering::AcqRel) {
                let endpoint = q.endpoint.clone();
                *linger = Some(self.runtime.spawn(Quic::linger(endpoint, finished)));
            }
        }
        self.inbox.close();
        // Ends the rendezvous session (its handle aborts its task when dropped).
        self.lock_nat().take();
        set
    }

    /// Shuts down, waits for the tasks to end and for the QUIC linger. Bounded: the wait for the
    /// aborted tasks by [`CLOSE_TASKS_BOUND`], after which the set is dropped, and the linger by
    /// its own timeouts (and this bound on top). A QUIC close once waited forever in CI (both
    /// runtime workers idle, no timer pending); it was the drop after `close` starting and
    /// waiting for a second linger, now started at most once (`Shared::lingered`); how that
    /// wait could hang is not understood, hence the bounds.
    async fn close(&self) {
        let mut tasks = self.shutdown();
        if tokio::time::timeout(CLOSE_TASKS_BOUND, tasks.shutdown())
            .await
            .is_err()
        {
            tracing::warn!(me = %self.me, left = tasks.len(), "tcp: tasks did not end on close");
        }
        if let Some(linger) = self.take_linger() {
            // Its own timeouts end it within `quic::LINGER` + 200 ms; this bounds the wait
            // even if the task were never polled.
            let _ = tokio::time::timeout(CLOSE_TASKS_BOUND + quic::LINGER, linger).await;
        }
    }

    fn take_linger(&self) -> Option<tokio::task::JoinHandle<()>> {
        self.linger.lock().unwrap_or_else(|e| e.into_inner()).take()
    }

    fn lock_nat(&self) -> MutexGuard<'_, Option<Nat>> {
        self.nat.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn nat(&self) -> Option<Nat> {
        self.lock_nat().clone()
    }

    fn timeout(&self, peer: Rank, tag: Tag, started: Instant, deadline: Instant) -> Error {
        Error::Timeout {
            me: self.me,
            peer,
            waited: deadline.saturating_duration_since(started),
            channel: NAME,
            tag,
        }
    }

    fn lost(&self, peer: Rank) -> Error {
        Error::PeerLost {
            me: self.me,
            peer,
            channel: NAME,
            via: None,
        }
    }

    /// Connects to `peer` to tell it of the abort: one dial attempt, since a peer whose listener
    /// refuses has exited and is not worth the retries a send makes (with NAT traversal, or
    /// when a connection is already being made, the usual way, until `until`).
    async fn dial_to_tell(self: &Arc<Self>, peer: Rank, until: Instant) -> Option<Arc<Link>> {
        let p = &self.peers[peer.idx()];
        let mut claimed = false;
        if self.nat().is_none() {
            p.state.send_if_modified(|s| {
                claimed = matches!(s, LinkState::Idle);
                if claimed {
                    *s = LinkState::Dialing { until };
                }
                claimed
            });
        }
        if !claimed {
            return self.link_to(peer, Tag(0), Instant::now(), until).await.ok();
        }
        if let Ok(Ok(Dialed::Accepted(stream, guard))) =
            tokio::time::timeout_at(until, self.dial_once(peer)).await
        {
            self.install(peer, stream, guard, Side::Dialer, PathKind::Direct);
        }
        // Not connected (or connected the other way meanwhile): let a later send dial afresh.
        p.state.send_if_modified(|s| {
            let dialing = matches!(s, LinkState::Dialing { .. });
            if dialing {
                *s = LinkState::Idle;
            }
            dialing
        });
        self.up_link(peer)
    }

    /// The error every operation fails with once the endpoint is revoked (see [`Channel::abort`]).
    fn revoked_error(&self) -> Option<Error> {
        self.revoked
            .get()
            .map(|&(victim, reporter)| Error::PeerLost {
                me: self.me,
                peer: victim,
                channel: NAME,
                via: (reporter != self.me).then_some(reporter),
            })
    }

    /// A failure this rank saw itself (a peer lost, a wait timed out) may be the consequence of
    /// an abort that has already arrived on another connection but is not read yet (the peer
    /// exited because of it, and this rank's runtime got to that first): before such an error
    /// is returned, every connection is read once, without waiting, and if an abort was there
    /// the error becomes the abort's, naming the rank whose failure broke the job.
    fn second_look(self: &Arc<Self>, e: Error) -> Error {
        let first_hand = matches!(e, Error::PeerLost { via: None, .. } | Error::Timeout { .. });
        if !first_hand {
            return e;
        }
        if self.revoked.get().is_none() {
            for peer in (0..self.size).map(Rank) {
                if let Some(link) = self.up_link(peer) {
                    self.drain(peer, &link);
                }
            }
        }
        self.revoked_error().unwrap_or(e)
    }

    /// Reads and handles the frames `link`'s socket already holds (at most [`DRAIN_FRAMES`]),
    /// without waiting for more (see [`Shared::second_look`]). Leaves the connection alone while
    /// a receive is reading it (that receive handles what comes), and afterwards the socket
    /// wakes the reader task as before.
    fn drain(self: &Arc<Self>, peer: Rank, link: &Link) {
        let mut guard = match link.reader.try_lock() {
            Ok(g) => g,
            Err(_) => return,
        };
        let Some(reader) = guard.as_mut() else {
            return;
        };
        if reader.owner.is_some() || reader.direct_owner().is_some() {
            return;
        }
        // Polled with the reader task's waker, so that the task is still the one woken.
        let Some(task) = reader.background.clone() else {
            return;
        };
        let mut cx = Context::from_waker(&task);
        let spin = reader.can_spin();
        for _ in 0..DRAIN_FRAMES {
            if spin {
                // One direct read of the socket: tokio's own read would not look before its
                // reactor has seen the socket readable.
                reader.spin_until(Some(std::time::Instant::now()));
            }
            match reader.poll_frame(&mut cx) {
                Poll::Ready(Ok(frame)) => self.on_frame(peer, frame),
                // The reader task meets the end of the stream too, and marks the peer lost.
                Poll::Ready(Err(_)) | Poll::Pending => break,
            }
        }
        reader.spin_until(None);
        drop(guard);
        task.wake();
    }

    /// Hands a message to the inbox, or acts on an abort.
    fn on_frame(self: &Arc<Self>, peer: Rank, frame: Frame) {
        match frame {
            Frame::Message { tag, payload } => self.inbox.deliver(peer, Tag(tag), payload),
            Frame::Abort { victim, reporter } => {
                self.peers[peer.idx()].told.store(true, Ordering::Relaxed);
                if victim >= self.size || reporter >= self.size {
                    tracing::debug!(me = %self.me, %peer, victim, reporter, "tcp: ignoring an abort naming ranks outside the job");
                    return;
                }
                tracing::debug!(me = %self.me, %peer, victim, reporter, "tcp: abort received");
                self.revoke(Rank(victim), Rank(reporter), false);
            }
        }
    }

    /// Revokes the endpoint because `victim` failed, as `reporter` saw: the inbox fails every
    /// receive naming `victim`, sends fail likewise, and a task passes the abort on to every
    /// connected peer that does not know yet; with `dial` (this rank saw the failure itself)
    /// also to the peers it is not connected to, by connecting to them. The first abort wins.
    fn revoke(self: &Arc<Self>, victim: Rank, reporter: Rank, dial: bool) {
        if self.revoked.set((victim, reporter)).is_err() {
            return;
        }
        tracing::debug!(me = %self.me, %victim, %reporter, "tcp: job aborted");
        self.inbox
            .abort(victim, (reporter != self.me).then_some(reporter));
        self.spawn_telling(Arc::clone(self).spread_abort(dial));
    }

    /// Tells every peer but the victim of the abort (see [`Shared::revoke`]), all at once, for
    /// at most [`ABORT_SPREAD`].
    async fn spread_abort(self: Arc<Self>, dial: bool) {
        if let Some(&(victim, _)) = self.revoked.get() {
            let until = Instant::now() + ABORT_SPREAD;
            let tells = (0..self.size)
                .map(Rank)
                .filter(|&p| p != self.me && p != victim)
                .map(|p| self.tell(p, dial, until));
            let _ = tokio::time::timeout_at(until, futures::future::join_all(tells)).await;
        }
    }

    /// Spawns a task that passes the abort on, counted in `telling` until it ends (or cannot
    /// start: the endpoint has shut down).
    fn spawn_telling(&self, task: impl Future<Output = ()> + Send + 'static) {
        self.telling.send_modify(|n| *n += 1);
        // Counted down however the task ends: done, aborted by the shutdown, or dropped
        // unspawned because the endpoint has shut down already.
        let done = TellingDone(self.telling.clone());
        let counted = async move {
            let _done = done;
            task.await;
        };
        let _ = self.spawn(counted);
    }

    /// Sends `peer` the abort frame, unless it knows already: over its connection, or (with
    /// `dial`) over a new one. Gives up at `until`.
    async fn tell(self: &Arc<Self>, peer: Rank, dial: bool, until: Instant) {
        let Some(&(victim, reporter)) = self.revoked.get() else {
            return;
        };
        let p = &self.peers[peer.idx()];
        if p.told.load(Ordering::Relaxed) {
            return;
        }
        // A connection being made (a send's dial, an inbound handshake) is waited for: the peer
        // would otherwise see it end without a word when this rank exits after its abort.
        let connecting = matches!(
            &*p.state.borrow(),
            LinkState::Dialing { .. } | LinkState::Accepting
        );
        let link = match self.up_link(peer) {
            Some(link) => link,
            None if dial || connecting => match self.dial_to_tell(peer, until).await {
                Some(link) => link,
                None => {
                    tracing::debug!(me = %self.me, %peer, "tcp: could not reach a peer to tell it of the abort");
                    return;
                }
            },
            None => return,
        };
        if p.told.swap(true, Ordering::Relaxed) {
            return;
        }
        let frame = wire::encode_abort(victim.0, reporter.0);
        let Ok(mut writer) = tokio::time::timeout_at(until, link.writer.lock()).await else {
            return;
        };
        let Some(w) = writer.as_mut() else {
            return;
        };
        match tokio::time::timeout_at(until, w.write_all(&frame)).await {
            Ok(Ok(())) => {
                tracing::debug!(me = %self.me, %peer, %victim, "tcp: told a peer of the abort")
            }
            _ => {
                // The frame may be half written: the stream cannot be parsed any more.
                tracing::debug!(me = %self.me, %peer, "tcp: could not write the abort frame");
                writer.take();
                drop(writer);
                self.lose(peer, &link);
            }
        }
    }

    /// Marks `peer` lost if `link` is still its connection, and closes that connection.
    fn lose(&self, peer: Rank, link: &Arc<Link>) {
        let mut old = None;
        let changed = self.peers[peer.idx()].state.send_if_modified(|s| {
            if matches!(s, LinkState::Up(l) if Arc::ptr_eq(l, link)) {
                old = Some(std::mem::replace(s, LinkState::Lost));
                true
            } else {
                false
            }
        });
        if changed {
            tracing::debug!(me = %self.me, %peer, "tcp: peer lost");
            self.inbox.peer_lost(peer);
        }
        link.close();
        drop(old);
    }

    /// The connection to `peer` if it is up.
    fn up_link(&self, peer: Rank) -> Option<Arc<Link>> {
        match &*self.peers[peer.idx()].state.borrow() {
            LinkState::Up(link) => Some(Arc::clone(link)),
            _ => None,
        }
    }

    /// The connection to `peer`, dialing it if nobody is connecting yet; waits until `deadline`.
    async fn link_to(
        self: &Arc<Self>,
        peer: Rank,
        tag: Tag,
        started: Instant,
        deadline: Instant,
    ) -> Result<Arc<Link>> {
        let p = &self.peers[peer.idx()];
        let mut changes = p.state.subscribe();
        // Each round waits for a state change, so the loop ends by the deadline.
        loop {
            changes.mark_unchanged();
            let mut outcome = None;
            let mut dial = false;
            p.state.send_if_modified(|s| match s {
                LinkState::Up(link) => {
                    outcome = Some(Ok(Arc::clone(link)));
                    false
                }
                LinkState::Lost => {
                    outcome = Some(Err(self.lost(peer)));
                    false
                }
                LinkState::Refused(status) => {
                    outcome = Some(Err(self.refused(peer, *status)));
                    false
                }
                LinkState::Closed => {
                    outcome = Some(Err(Error::Closed { channel: NAME }));
                    false
                }
                LinkState::Idle => {
                    *s = LinkState::Dialing { until: deadline };
                    dial = true;
                    true
                }
                LinkState::Dialing { until } => {
                    // The dial keeps trying for as long as some send still wants it.
                    *until = (*until).max(deadline);
                    false
                }
                LinkState::Accepting => false,
            });
            if let Some(outcome) = outcome {
                return outcome;
            }
            if dial && self.spawn(Arc::clone(self).dial(peer, true)).is_none() {
                return Err(Error::Closed { channel: NAME });
            }
            match tokio::time::timeout_at(deadline, changes.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return Err(Error::Closed { channel: NAME }),
                Err(_) => return Err(self.timeout(peer, tag, started, deadline)),
            }
        }
    }

    fn refused(&self, peer: Rank, status: Status) -> Error {
        Error::Io {
            me: self.me,
            peer: Some(peer),
            channel: NAME,
            source: io::Error::new(
                io::ErrorKind::ConnectionRefused,
                format!(
                    "rank {peer} at {} refused our handshake: {status}",
                    self.peers[peer.idx()].addr
                ),
            ),
        }
    }

    /// Writes one frame from the caller's slice. A frame left half-written (error, deadline or
    /// cancellation) poisons the connection.
    async fn write_frame(
        self: &Arc<Self>,
        peer: Rank,
        link: &Arc<Link>,
        tag: Tag,
        data: &[u8],
        deadline: Instant,
    ) -> Result<()> {
        let header = wire::encode_frame_header(tag.0, data.len() as u64);
        // Without a timer while nothing has to wait (the writer is free and the socket takes the
        // whole frame at once).
        let mut writer = match link.writer.try_lock() {
            Ok(writer) => writer,
            Err(_) => {
                let started = Instant::now();
                tokio::time::timeout_at(deadline, link.writer.lock())
                    .await
                    .map_err(|_| self.timeout(peer, tag, started, deadline))?
            }
        };
        let mut frame = InFlight {
            shared: self,
            peer,
            link,
            writer: &mut writer,
            written: 0,
            done: false,
        };
        let written = match frame.write(&header, data).now_or_never() {
            Some(r) => r,
            None => {
                let started = Instant::now();
                match tokio::time::timeout_at(deadline, frame.write(&header, data)).await {
                    Ok(r) => r,
                    Err(_) => return Err(self.timeout(peer, tag, started, deadline)),
                }
            }
        };
        let Err(e) = written else {
            return Ok(());
        };
        tracing::debug!(me = %self.me, %peer, error = %e, "tcp: write failed");
        // Nothing more can be written; the reader still gets to read what the peer sent before
        // the connection broke, which may say why (an abort frame), so that the error names the
        // rank whose failure broke the job.
        frame.done = true;
        frame.writer.take();
        drop(frame);
        drop(writer);
        self.settle(peer, link).await;
        self.lose(peer, link);
        Err(self.revoked_error().unwrap_or_else(|| self.lost(peer)))
    }

    /// Waits (at most [`SETTLE`]) until the reader of `link` (its task, or a receive reading it)
    /// has reached the end of what the peer sent and marked the connection lost, for a writer
    /// that found the connection broken: an abort frame the peer sent just before it went is
    /// then acted on, instead of being thrown away with the connection.
    async fn settle(&self, peer: Rank, link: &Arc<Link>) {
        let mut changes = self.peers[peer.idx()].state.subscribe();
        let ended = changes.wait_for(|s| !matches!(s, LinkState::Up(l) if Arc::ptr_eq(l, link)));
        let _ = tokio::time::timeout(SETTLE, ended).await;
    }

    /// Accepts connections for as long as the endpoint lives.
    async fn listen(self: Arc<Self>, listener: TcpListener) {
        loop {
            match listener.accept().await {
                Ok((stream, from)) => {
                    tracing::trace!(me = %self.me, %from, "tcp: inbound connection");
                    self.spawn(Arc::clone(&self).accept_one(Stream::Tcp(stream), from));
                }
                Err(e) => {
                    tracing::warn!(me = %self.me, error = %e, "tcp: accept failed");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                }
            }
        }
    }

    /// Accepts QUIC connections for as long as the endpoint lives: each one's first stream
    /// goes through the same handshake as an accepted TCP connection.
    async fn listen_quic(self: Arc<Self>, endpoint: quinn::Endpoint) {
        while let Some(incoming) = endpoint.accept().await {
            let from = incoming.remote_address();
            tracing::trace!(me = %self.me, %from, "tcp: inbound quic connection");
            let me = Arc::clone(&self);
            self.spawn(async move {
                let timeout = me.config.handshake_timeout;
                let stream = tokio::time::timeout(timeout, async {
                    let conn = incoming.await?;
                    let (send, recv) = conn.accept_bi().await?;
                    io::Result::Ok(Stream::Quic { send, recv, conn })
                })
                .await;
                match stream {
                    Ok(Ok(stream)) => me.accept_one(stream, from).await,
                    Ok(Err(e)) => {
                        tracing::debug!(me = %me.me, %from, error = %e, "tcp: inbound quic handshake failed")
                    }
                    Err(_) => {
                        tracing::debug!(me = %me.me, %from, "tcp: inbound quic handshake timed out")
                    }
                }
            });
        }
    }

    /// How an accepted connection from `from` reached us: a QUIC connection that does not come
    /// from the peer's announced address came through a NAT, so it was punched.
    fn accepted_path(&self, peer: Rank, stream: &Stream, from: SocketAddr) -> PathKind {
        match &self.quic {
            Some(q) if stream.is_quic() && q.peers[peer.idx()].addrs.first() != Some(&from) => {
                PathKind::Punched
            }
            _ => PathKind::Direct,
        }
    }

    /// Runs the acceptor's side of a handshake and installs the connection if accepted.
    async fn accept_one(self: Arc<Self>, mut stream: Stream, from: SocketAddr) {
        let guard = SocketGuard::new(&self.sockets);
        let handshake = tokio::time::timeout(
            self.config.handshake_timeout,
            self.handshake_in(&mut stream),
        )
        .await;
        match handshake {
            Ok(Ok(Some(reservation))) => {
                let kind = self.accepted_path(reservation.peer, &stream, from);
                self.install(reservation.peer, stream, guard, Side::Acceptor, kind);
                drop(reservation);
            }
            Ok(Ok(None)) => {}
            Ok(Err(e)) => {
                tracing::debug!(me = %self.me, error = %e, "tcp: inbound handshake failed")
            }
            Err(_) => tracing::debug!(me = %self.me, "tcp: inbound handshake timed out"),
        }
    }

    /// Reads a hello, judges it and replies. `Some` if accepted (the peer is then reserved as
    /// `Accepting` until the connection is installed or the reservation dropped).
    async fn handshake_in(&self, stream: &mut Stream) -> io::Result<Option<Reservation<'_>>> {
        stream.tune(self.local_buffer)?;
        let presented = stream.is_quic().then(|| stream.peer_fingerprint());
        let mut head = [0u8; wire::HELLO_HEAD_LEN];
        stream.read_exact(&mut head).await?;
        let verdict = match wire::parse_hello_head(&head) {
            Ok(len) => {
                let mut body = vec![0u8; len];
                stream.read_exact(&mut body).await?;
                self.judge(&body, presented)
            }
            Err(status) => Err(status),
        };
        match verdict {
            Ok(reservation) => {
                stream
                    .write_all(&wire::encode_reply(Status::Accepted))
                    .await?;
                Ok(Some(reservation))
            }
            Err(status) => {
                tracing::debug!(me = %self.me, %status, "tcp: refusing a connection");
                // Best effort: the dialer learns why; the socket is closed either way.
                let _ = stream.write_all(&wire::encode_reply(status)).await;
                stream.finish().await;
                Ok(None)
            }
        }
    }

    /// Applies the connection rule to a hello body.
    /// `presented`: for a QUIC stream, the fingerprint of the certificate the peer presented
    /// (`None` for TCP streams: over QUIC only the relay's, which the relay checked).
    fn judge(
        &self,
        body: &[u8],
        presented: Option<Option<Fingerprint>>,
    ) -> std::result::Result<Reservation<'_>, Status> {
        let hello = wire::Hello::decode(body)?;
        // The token first: a process without it learns nothing about this rank's job.
        if !self.token.matches(hello.token) {
            return Err(Status::BadToken);
        }
        // Over QUIC, the certificate must be the one the claimed rank published: TLS only
        // checked that it is some rank's of this job.
        if let (Some(q), Some(presented)) = (&self.quic, presented) {
            let published = q.peers.get(hello.from as usize).map(|p| p.fingerprint);
            if presented.is_none() || presented != published {
                return Err(Status::BadToken);
            }
        }
        if hello.job != self.job.as_str().as_bytes() {
            return Err(Status::WrongJob);
        }
        if hello.to != self.me.0 || hello.from >= self.size || hello.from == self.me.0 {
            return Err(Status::BadRank);
        }
        let peer = Rank(hello.from);
        let mut verdict = Err(Status::Duplicate);
        self.peers[peer.idx()].state.send_if_modified(|s| match s {
            LinkState::Idle => {
                *s = LinkState::Accepting;
                verdict = Ok(());
                true
            }
            // A simultaneous dial: the lower rank's connection wins. Our own dial task sees the
            // state change and gives up; the peer refuses our hello as a duplicate.
            LinkState::Dialing { .. } if peer < self.me => {
                *s = LinkState::Accepting;
                verdict = Ok(());
                true
            }
            LinkState::Dialing { .. } | LinkState::Accepting | LinkState::Up(_) => false,
            LinkState::Lost | LinkState::Refused(_) | LinkState::Closed => {
                verdict = Err(Status::Gone);
                false
            }
        });
        verdict.map(|()| Reservation { shared: self, peer })
    }

    /// Connects to `peer` until connected, refused for good, or nobody wants the connection any
    /// more. `active`: a send of this rank wants it (rather than the peer, through a `Punch`
    /// or `RelayOffer`).
    ///
    /// Every way of connecting runs as an attempt in a set owned by this task: the direct dial
    /// of the peer's listener, punch loops (one at a time, restarted by each new `Punch`), and
    /// the relay (after [`NatConfig::relay_after`], or at once on a `RelayOffer`). Attempts
    /// install what they connect themselves, under the connection rule; as soon as the pair is
    /// up (or lost, refused, closed) this task aborts whatever is still trying, waits until it
    /// has ended (its sockets closed), and returns.
    async fn dial(self: Arc<Self>, peer: Rank, active: bool) {
        let p = &self.peers[peer.idx()];
        let nat = self.nat();
        let cfg = self.config.nat.clone();
        let started = Instant::now();
        let mut attempts: JoinSet<Attempt> = JoinSet::new();
        let mut changes = p.state.subscribe();
        let mut signals = p.signals.subscribe();
        let direct = nat.is_none() || cfg.direct;
        if direct {
            attempts.spawn(Arc::clone(&self).dial_direct(peer));
        }
        // The storage fallback takes the relay's place; it needs traversal, whose punch order
        // is what starts the peer's side.
        let fallback = cfg.fallback.clone().filter(|_| nat.is_some());
        if let Some(nat) = &nat {
            if active && (cfg.punch || fallback.is_some()) {
                nat.rendezvous.request_punch(peer);
            }
        }
        let relay_possible = nat.is_some() && cfg.relay && fallback.is_none();
        let mut stored_at = fallback.as_ref().map(|_| {
            started
                + if cfg.direct || cfg.punch {
                    cfg.relay_after
                } else {
                    Duration::ZERO
                }
        });
        let mut relay_at = (relay_possible && active).then(|| {
            started
                + if cfg.direct || cfg.punch {
                    cfg.relay_after
                } else {
                    Duration::ZERO
                }
        });
        let mut relay_running = false;
        // Orders seen before this task started are acted upon too (a passive dial is started
        // by one).
        let mut punch_seen = 0u64;
        let mut relay_seen = 0u64;
        let mut punching: Option<AbortHandle> = None;
        loop {
            let until = match &*changes.borrow_and_update() {
                LinkState::Dialing { until } => Some(*until),
                // An inbound handshake is under way; it installs or gives the state back.
                LinkState::Accepting => None,
                _ => return,
            };
            let now = Instant::now();
            if until.is_some_and(|u| now >= u) {
                break;
            }
            let sig = signals.borrow_and_update().clone();
            if let Some(nat) = nat.as_ref().filter(|_| cfg.punch) {
                if sig.punch_seq != punch_seen {
                    punch_seen = sig.punch_seq;
                    if let Some(PunchOrder {
                        public: Some(to),
                        start_at,
                    }) = sig.punch
                    {
                        if let Some(old) = punching.take() {
                            old.abort();
                        }
                        let from = nat.punch_from;
                        let attempt = if self.quic.is_some() {
                            Arc::clone(&self).punch_quic(peer, to, start_at).boxed()
                        } else {
                            Arc::clone(&self).punch(peer, from, to, start_at).boxed()
                        };
                        punching = Some(attempts.spawn(attempt));
                    }
                }
            }
            if relay_possible && sig.relay_seq != relay_seen {
                relay_seen = sig.relay_seq;
                if !relay_running {
                    relay_at = Some(now);
                }
            }
            if let (Some(fallback), Some(at)) = (&fallback, stored_at) {
                if now >= at {
                    stored_at = None;
                    Arc::clone(&self).start_stored(peer, fallback);
                }
            }
            if let (Some(nat), Some(at)) = (&nat, relay_at) {
                if !relay_running && now >= at {
                    relay_running = true;
                    relay_at = None;
                    let rendezvous = Arc::clone(&nat.rendezvous);
                    attempts.spawn(Arc::clone(&self).relay(peer, rendezvous));
                }
            }
            if nat.is_none() && attempts.is_empty() && until.is_some() {
                // Without traversal there is nothing more to try.
                break;
            }
            let far = now + Duration::from_secs(3600);
            tokio::select! {
                changed = changes.changed() => {
                    if changed.is_err() {
                        return;
                    }
                }
                changed = signals.changed() => {
                    if changed.is_err() {
                        return;
                    }
                }
                () = tokio::time::sleep_until(relay_at.unwrap_or(far)), if relay_at.is_some() => {}
                () = tokio::time::sleep_until(stored_at.unwrap_or(far)), if stored_at.is_some() => {}
                () = tokio::time::sleep_until(until.unwrap_or(far)), if until.is_some() => {}
                Some(joined) = attempts.join_next() => {
                    match joined {
                        Ok(Attempt::Relay) => {
                            // The relay failed: try it again a little later, if still wanted.
                            relay_running = false;
                            if relay_possible {
                                relay_at = Some(Instant::now() + cfg.relay_after);
                            }
                        }
                        Ok(Attempt::Direct | Attempt::Punch) => {}
                        Err(e) if e.is_panic() => {
                            tracing::warn!(me = %self.me, %peer, error = %e, "tcp: connect attempt panicked");
                        }
                        Err(_) => {}
                    }
                }
            }
        }
        // Nobody waits any more (or nothing can connect): a later send starts afresh.
        p.state.send_if_modified(|s| {
            let dialing = matches!(s, LinkState::Dialing { .. });
            if dialing {
                *s = LinkState::Idle;
            }
            dialing
        });
        // Abort what still tries and wait until those attempts (and their sockets) are gone:
        // merely dropping the set lets them linger until the runtime next polls them, and a
        // channel counting its sockets then saw one too many (seen once in CI under load).
        attempts.shutdown().await;
    }

    /// Whether this endpoint is still trying to connect to `peer`.
    fn still_dialing(&self, peer: Rank) -> bool {
        matches!(
            &*self.peers[peer.idx()].state.borrow(),
            LinkState::Dialing { .. } | LinkState::Accepting
        )
    }

    /// Dials `peer`'s listener until connected, refused for good, or no longer dialing.
    async fn dial_direct(self: Arc<Self>, peer: Rank) -> Attempt {
        let p = &self.peers[peer.idx()];
        let mut backoff = self.config.connect_backoff_initial;
        for attempt in 1..=self.config.connect_attempts {
            let until = match &*p.state.borrow() {
                LinkState::Dialing { until } => *until,
                // Connected the other way, lost or closed meanwhile.
                _ => return Attempt::Direct,
            };
            if attempt > 1 && Instant::now() >= until {
                break;
            }
            match self.dial_once(peer).await {
                Ok(Dialed::Accepted(stream, guard)) => {
                    self.install(peer, stream, guard, Side::Dialer, PathKind::Direct);
                    return Attempt::Direct;
                }
                Ok(Dialed::Refused(Status::Duplicate)) => {
                    // The peer's dial wins; its connection arrives shortly and ends this loop.
                    tracing::trace!(me = %self.me, %peer, "tcp: simultaneous dial, waiting for the peer's");
                }
                Ok(Dialed::Refused(status)) => {
                    self.refused_for_good(peer, status);
                    return Attempt::Direct;
                }
                Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                    // A QUIC peer whose certificate is not the one pinned (or which refused
                    // ours): as final as a wrong token.
                    tracing::debug!(me = %self.me, %peer, error = %e, "tcp: dial refused");
                    self.refused_for_good(peer, Status::BadToken);
                    return Attempt::Direct;
                }
                Err(e) => {
                    tracing::debug!(me = %self.me, %peer, attempt, error = %e, "tcp: dial failed");
                }
            }
            let now = Instant::now();
            if now >= until {
                break;
            }
            tokio::time::sleep_until((now + backoff).min(until)).await;
            backoff = (backoff * 2).min(self.config.connect_backoff_max);
        }
        Attempt::Direct
    }

    /// The peer refused our hello for a reason retrying will not fix.
    fn refused_for_good(&self, peer: Rank, status: Status) {
        tracing::warn!(me = %self.me, %peer, %status, "tcp: handshake refused");
        self.peers[peer.idx()].state.send_if_modified(|s| {
            let dialing = matches!(s, LinkState::Dialing { .. });
            if dialing {
                *s = LinkState::Refused(status);
            }
            dialing
        });
    }

    /// One connect and handshake, bounded by the handshake timeout.
    async fn dial_once(&self, peer: Rank) -> io::Result<Dialed> {
        let addr = self.peers[peer.idx()].addr;
        let attempt = async {
            let mut stream = match &self.quic {
                Some(q) => {
                    let to = q.peers[peer.idx()].addrs.first().copied().ok_or_else(|| {
                        io::Error::new(io::ErrorKind::AddrNotAvailable, "no quic address")
                    })?;
                    q.connect(peer.idx(), to).await?
                }
                None => Stream::Tcp(TcpStream::connect(addr).await?),
            };
            let guard = SocketGuard::new(&self.sockets);
            stream.tune(self.local_buffer)?;
            let status = match self.hello_out(&mut stream, peer).await {
                Ok(status) => status,
                // Our certificate was rejected once the TLS handshake had finished for us.
                Err(e) if stream.rejected() => {
                    return Err(io::Error::new(io::ErrorKind::PermissionDenied, e));
                }
                Err(e) => return Err(e),
            };
            Ok(match status {
                Status::Accepted => Dialed::Accepted(stream, guard),
                status => Dialed::Refused(status),
            })
        };
        tokio::time::timeout(self.config.handshake_timeout, attempt)
            .await
            .unwrap_or_else(|_| Err(io::ErrorKind::TimedOut.into()))
    }

    /// The dialer's half of the handshake: sends our hello, returns the peer's verdict.
    async fn hello_out(&self, stream: &mut Stream, peer: Rank) -> io::Result<Status> {
        let hello = wire::Hello {
            from: self.me.0,
            to: peer.0,
            job: self.job.as_str().as_bytes(),
            token: self.token.as_bytes(),
        };
        stream.write_all(&hello.encode()).await?;
        let mut reply = [0u8; wire::REPLY_LEN];
        stream.read_exact(&mut reply).await?;
        wire::decode_reply(&reply).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                "peer sent something that is not an fmi tcp handshake reply",
            )
        })
    }

    /// Simultaneous opens from `from` (the rendezvous connection's local address, so the NAT
    /// reuses its mapping) to the peer's public address, starting at `start_at`: each attempt
    /// waits [`NatConfig::punch_attempt`] for the peer's SYN to cross ours, with a short pause
    /// after a refusal (no NAT on the way: the peer's port answered with a reset).
    async fn punch(
        self: Arc<Self>,
        peer: Rank,
        from: SocketAddr,
        to: SocketAddr,
        start_at: Instant,
    ) -> Attempt {
        tokio::time::sleep_until(start_at).await;
        let cfg = &self.config.nat;
        let mut pause = Duration::from_millis(10);
        for attempt in 1..=cfg.punch_attempts {
            if !self.still_dialing(peer) {
                break;
            }
            let connect = async { nat::connect_reusable(from, to).await };
            match tokio::time::timeout(cfg.punch_attempt, connect).await {
                Ok(Ok(stream)) => {
                    tracing::debug!(me = %self.me, %peer, %to, attempt, "tcp: punched through");
                    let guard = SocketGuard::new(&self.sockets);
                    self.handshake_by_rank(peer, Stream::Tcp(stream), guard, PathKind::Punched)
                        .await;
                    return Attempt::Punch;
                }
                Ok(Err(e)) => {
                    tracing::trace!(me = %self.me, %peer, %to, attempt, error = %e, "tcp: punch failed");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(cfg.punch_attempt);
                }
                // The SYN went unanswered (dropped by a NAT); the socket closes and the next
                // attempt sends a fresh one.
                Err(_) => {
                    tracing::trace!(me = %self.me, %peer, %to, attempt, "tcp: punch timed out")
                }
            }
        }
        tracing::debug!(me = %self.me, %peer, %to, "tcp: punching gave up");
        Attempt::Punch
    }

    /// The QUIC punch (see [`quic`]): at `start_at` both ranks send punch datagrams to the
    /// peer's candidates — the addresses it published (its private one and its STUN-learnt
    /// public one) and its UDP port at the address the rendezvous saw it come from (`public`,
    /// right for NATs that keep ports) — so that each NAT lets the other's packets in; then
    /// the lower rank connects to every candidate but the private one (which the direct
    /// attempt dials) and the first connection up runs the handshake, while the higher rank
    /// keeps its mapping fresh and leaves the connection to its accept loop.
    async fn punch_quic(
        self: Arc<Self>,
        peer: Rank,
        public: SocketAddr,
        start_at: Instant,
    ) -> Attempt {
        let Some(q) = &self.quic else {
            return Attempt::Punch;
        };
        let mut to = q.peers[peer.idx()].addrs.clone();
        if let Some(port) = to.first().map(SocketAddr::port) {
            let guess = SocketAddr::new(public.ip(), port);
            if !to.contains(&guess) {
                to.push(guess);
            }
        }
        tokio::time::sleep_until(start_at).await;
        let cfg = &self.config.nat;
        q.punch(&to);
        if self.me > peer {
            for _ in 1..cfg.punch_attempts {
                tokio::time::sleep(QUIC_PUNCH_ROUND).await;
                if !self.still_dialing(peer) {
                    break;
                }
                q.punch(&to);
            }
            return Attempt::Punch;
        }
        let public: Vec<SocketAddr> = to.iter().skip(1).copied().collect();
        if public.is_empty() {
            return Attempt::Punch;
        }
        // Let the peer's first datagram open its NAT before our Initial arrives there. Then a
        // round of connections every `QUIC_PUNCH_ROUND` (with fresh datagrams), rather than
        // waiting for quinn's retransmission of a dropped Initial (300 ms, then 600 ms), which
        // could outlast `relay_after` when the first Initial came too early.
        tokio::time::sleep(QUIC_PUNCH_REPEAT).await;
        let end = Instant::now() + cfg.punch_attempt * cfg.punch_attempts;
        let mut pending = futures::stream::FuturesUnordered::new();
        let mut rounds = 0u32;
        let mut next_round = Instant::now();
        let stream = loop {
            if rounds >= cfg.punch_attempts && pending.is_empty() {
                break None;
            }
            tokio::select! {
                () = tokio::time::sleep_until(next_round), if rounds < cfg.punch_attempts => {
                    if !self.still_dialing(peer) {
                        break None;
                    }
                    rounds += 1;
                    next_round += QUIC_PUNCH_ROUND;
                    q.punch(&to);
                    for &addr in &public {
                        pending.push(q.connect(peer.idx(), addr));
                    }
                }
                Some(done) = futures::StreamExt::next(&mut pending) => match done {
                    Ok(stream) => break Some(stream),
                    Err(e) => tracing::trace!(me = %self.me, %peer, error = %e, "tcp: quic punch attempt failed"),
                },
                () = tokio::time::sleep_until(end) => break None,
            }
        };
        // Attempts still under way are dropped here, closing their connections.
        drop(pending);
        match stream {
            Some(stream) => {
                tracing::debug!(me = %self.me, %peer, rounds, "tcp: punched through over quic");
                let guard = SocketGuard::new(&self.sockets);
                self.handshake_by_rank(peer, stream, guard, PathKind::Punched)
                    .await;
            }
            None => tracing::debug!(me = %self.me, %peer, "tcp: quic punching gave up"),
        }
        Attempt::Punch
    }

    /// Opens a relay connection to `peer` and runs the handshake over it.
    async fn relay(self: Arc<Self>, peer: Rank, rendezvous: Arc<dyn Rendezvous>) -> Attempt {
        tracing::debug!(me = %self.me, %peer, "tcp: trying the relay");
        match rendezvous.relay(peer).await {
            Ok(stream) => {
                let guard = SocketGuard::new(&self.sockets);
                self.handshake_by_rank(peer, Stream::Tcp(stream), guard, PathKind::Relayed)
                    .await;
            }
            Err(e) => tracing::debug!(me = %self.me, %peer, error = %e, "tcp: relay failed"),
        }
        Attempt::Relay
    }

    /// The handshake on a stream neither side accepted from a listener (a punched or relayed
    /// one): the lower rank plays the dialer, the higher the acceptor, so the connection rule
    /// (the lower rank's connection wins a tie) holds for these too.
    /// Returns whether the handshake ran to its end (a verdict was given and read).
    async fn handshake_by_rank(
        self: &Arc<Self>,
        peer: Rank,
        mut stream: Stream,
        guard: SocketGuard,
        kind: PathKind,
    ) -> bool {
        let _ = stream.tune(self.local_buffer);
        if self.me < peer {
            let verdict = tokio::time::timeout(
                self.config.handshake_timeout,
                self.hello_out(&mut stream, peer),
            )
            .await;
            match verdict {
                Ok(Ok(Status::Accepted)) => {
                    self.install(peer, stream, guard, Side::Dialer, kind);
                    true
                }
                Ok(Ok(Status::Duplicate)) => {
                    tracing::trace!(me = %self.me, %peer, %kind, "tcp: the pair connects another way");
                    true
                }
                Ok(Ok(status)) => {
                    self.refused_for_good(peer, status);
                    true
                }
                Ok(Err(e)) => {
                    tracing::debug!(me = %self.me, %peer, %kind, error = %e, "tcp: handshake failed");
                    false
                }
                Err(_) => {
                    tracing::debug!(me = %self.me, %peer, %kind, "tcp: handshake timed out");
                    false
                }
            }
        } else {
            let verdict = tokio::time::timeout(
                self.config.handshake_timeout,
                self.handshake_in(&mut stream),
            )
            .await;
            match verdict {
                Ok(Ok(Some(reservation))) if reservation.peer == peer => {
                    self.install(peer, stream, guard, Side::Acceptor, kind);
                    drop(reservation);
                    true
                }
                Ok(Ok(_)) => {
                    tracing::debug!(me = %self.me, %peer, %kind, "tcp: no connection made on this stream");
                    true
                }
                Ok(Err(e)) => {
                    tracing::debug!(me = %self.me, %peer, %kind, error = %e, "tcp: handshake failed");
                    false
                }
                Err(_) => {
                    tracing::debug!(me = %self.me, %peer, %kind, "tcp: handshake timed out");
                    false
                }
            }
        }
    }

    /// Starts the handshake with `peer` over the storage fallback (see `stored`) unless one
    /// is under way or an earlier one was cut off. It runs as the endpoint's task, not as one
    /// of the dial's attempts, so that a pair connecting another way meanwhile does not cut it
    /// off: it ends with the peer's verdict (or the handshake timeout), leaving nothing unread.
    fn start_stored(self: Arc<Self>, peer: Rank, fallback: &stored::StorageFallback) {
        let flag = &self.peers[peer.idx()].stored;
        let free = |from| {
            flag.compare_exchange(from, STORED_RUNNING, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        };
        if !(free(STORED_UNTRIED) || free(STORED_CLEAN)) {
            return;
        }
        let channel = Arc::clone(&fallback.0);
        let me = Arc::clone(&self);
        let started = self.spawn(async move {
            let mut turn = StoredTurn {
                flag: &me.peers[peer.idx()].stored,
                clean: false,
            };
            tracing::debug!(me = %me.me, %peer, via = channel.name(), "tcp: trying the storage fallback");
            let stream = Stream::Stored(stored::StoredStream::new(channel, peer));
            let guard = SocketGuard::new(&me.sockets);
            turn.clean = me
                .handshake_by_rank(peer, stream, guard, PathKind::Stored)
                .await;
        });
        if started.is_none() {
            flag.store(STORED_CLEAN, Ordering::Release);
        }
    }

    /// Acts on what the rendezvous pushes: an order about a peer this endpoint is not yet
    /// connected to starts (or extends) a passive dial.
    async fn traversal_events(
        self: Arc<Self>,
        mut events: tokio::sync::mpsc::Receiver<TraversalEvent>,
    ) {
        while let Some(event) = events.recv().await {
            let (peer, punch) = match event {
                TraversalEvent::Punch {
                    peer,
                    public,
                    start_in,
                    ..
                } => (
                    peer,
                    Some(PunchOrder {
                        public,
                        start_at: Instant::now() + start_in,
                    }),
                ),
                TraversalEvent::RelayOffer { peer } => (peer, None),
                TraversalEvent::NoPeer { peer } => {
                    tracing::debug!(me = %self.me, %peer, "tcp: peer takes no part in NAT traversal");
                    continue;
                }
            };
            if peer.0 >= self.size || peer == self.me {
                continue;
            }
            let p = &self.peers[peer.idx()];
            p.signals.send_modify(|s| match punch {
                Some(order) => {
                    s.punch_seq += 1;
                    s.punch = Some(order);
                }
                None => s.relay_seq += 1,
            });
            let until = Instant::now() + self.config.nat.passive_window;
            let mut start = false;
            p.state.send_if_modified(|s| match s {
                LinkState::Idle => {
                    *s = LinkState::Dialing { until };
                    start = true;
                    true
                }
                LinkState::Dialing { until: u } => {
                    *u = (*u).max(until);
                    false
                }
                _ => false,
            });
            if start && self.spawn(Arc::clone(&self).dial(peer, false)).is_none() {
                return;
            }
        }
        tracing::debug!(me = %self.me, "tcp: rendezvous session ended; no more punches or relays");
    }

    /// Makes an accepted connection the pair's link and starts its reader.
    fn install(
        self: &Arc<Self>,
        peer: Rank,
        stream: Stream,
        guard: SocketGuard,
        side: Side,
        kind: PathKind,
    ) -> bool {
        let quic = stream.is_quic();
        let (read, write) = stream.into_split();
        let link = Arc::new(Link {
            writer: tokio::sync::Mutex::new(Some(write)),
            reader: Mutex::new(Some(Reader::new(
                read,
                READ_BUFFER,
                self.config.max_message,
            ))),
            reader_task: OnceLock::new(),
            socket: Mutex::new(Some(guard)),
            spin_skip: AtomicU32::new(0),
            spin_failures: AtomicU32::new(0),
        });
        let installed = self.peers[peer.idx()].state.send_if_modified(|s| {
            let expected = match side {
                Side::Dialer => matches!(s, LinkState::Dialing { .. }),
                Side::Acceptor => matches!(s, LinkState::Accepting),
            };
            if expected {
                // Recorded before the link shows, so that whoever sees the pair up sees how.
                self.peers[peer.idx()]
                    .path
                    .store(path_to_u8(kind), Ordering::Relaxed);
                self.peers[peer.idx()].quic.store(quic, Ordering::Relaxed);
                *s = LinkState::Up(Arc::clone(&link));
            }
            expected
        });
        if !installed {
            // On shutdown, or a dialer whose pair got connected another way meanwhile: the
            // connection rule never lets the peer accept two connections for a pair.
            link.close();
            return false;
        }
        let transport = if quic { "quic" } else { "tcp" };
        if self.nat().is_some() {
            tracing::info!(me = %self.me, %peer, path = %kind, transport, "tcp: connected");
        } else {
            tracing::debug!(me = %self.me, %peer, path = %kind, transport, "tcp: connected");
        }
        let reader = Arc::clone(self).read_frames(peer, Arc::clone(&link));
        if let Some(handle) = self.spawn(reader) {
            let _ = link.reader_task.set(handle);
        }
        // A peer that connects after the abort learns of it at once. (`revoke` sets the abort
        // before it looks at the links, and this looks after the link is up: one of the two
        // sees the other.)
        if self.revoked.get().is_some() {
            let until = Instant::now() + ABORT_SPREAD;
            let me = Arc::clone(self);
            self.spawn_telling(async move { me.tell(peer, false, until).await });
        }
        true
    }

    /// Reads frames from `peer` into the inbox until the connection ends, then marks it lost.
    /// Stands aside while a waiting receive reads the connection itself.
    async fn read_frames(self: Arc<Self>, peer: Rank, link: Arc<Link>) {
        let ended = loop {
            // Back-pressure: leave frames in the socket while too much waits for receivers.
            self.inbox
                .wait_for_space(self.config.unexpected_bound)
                .await;
            if let Err(e) = std::future::poll_fn(|cx| self.poll_frame(peer, &link, cx)).await {
                break e;
            }
        };
        tracing::debug!(me = %self.me, %peer, error = %ended, "tcp: connection ended");
        self.lose(peer, &link);
    }

    /// The reader task's step: reads and delivers one frame, unless a receive is reading the
    /// connection (it hands the socket back to this task when it stops).
    fn poll_frame(
        self: &Arc<Self>,
        peer: Rank,
        link: &Link,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<()>> {
        let mut guard = link.lock_reader();
        let Some(reader) = guard.as_mut() else {
            return Poll::Ready(Err(io::ErrorKind::NotConnected.into()));
        };
        if !matches!(&reader.background, Some(w) if w.will_wake(cx.waker())) {
            reader.background = Some(cx.waker().clone());
        }
        if reader.owner.is_some() {
            return Poll::Pending;
        }
        match reader.poll_frame(cx) {
            Poll::Ready(Ok(frame)) => {
                self.on_frame(peer, frame);
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => {
                guard.take();
                Poll::Ready(Err(e))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

/// An accepted hello's claim on its peer's state, released if the handshake does not finish.
struct Reservation<'a> {
    shared: &'a Shared,
    peer: Rank,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        // Installed connections have moved the state on; anything else failed half-way, so let
        // a later send dial afresh.
        self.shared.peers[self.peer.idx()]
            .state
            .send_if_modified(|s| {
                let stuck = matches!(s, LinkState::Accepting);
                if stuck {
                    *s = LinkState::Idle;
                }
                stuck
            });
    }
}

/// A frame being written. Dropped before it is complete (deadline, cancellation) after some of
/// its bytes went out, it poisons the connection: the peer would otherwise parse the next frame
/// from the middle of this one.
struct InFlight<'a> {
    shared: &'a Shared,
    peer: Rank,
    link: &'a Arc<Link>,
    writer: &'a mut Option<WriteHalf>,
    written: usize,
    done: bool,
}

impl InFlight<'_> {
    /// Writes header and payload with vectored writes, straight from the caller's slice.
    /// Resumable: a `write` dropped part-way leaves `written` counting what went out, and the
    /// next `write` of the same frame continues from there.
    async fn write(&mut self, header: &[u8], data: &[u8]) -> io::Result<()> {
        let Some(w) = self.writer.as_mut() else {
            // Poisoned by an earlier send.
            return Err(io::ErrorKind::NotConnected.into());
        };
        let total = header.len() + data.len();
        // A long frame to a peer that is reading it now is written busily (see `Shared::busy`).
        let busy = self.shared.busy.filter(|_| data.len() >= reader::BUSY_MIN);
        let mut progress: Option<std::time::Instant> = None;
        // Each round writes at least one byte or waits, so the loop is bounded by the frame's
        // length and, while nothing is written, by the busy window.
        while self.written < total {
            if let (Some(window), WriteHalf::Tcp(tcp)) = (busy, &*w) {
                // Plain non-blocking writes of the socket: tokio's own write would not try
                // again before its reactor has seen the socket writable. A full socket yields
                // to the runtime (a receive joined with this send reads meanwhile) until
                // `window` passes without a byte taken, then sleeps as usual.
                let socket = socket2::SockRef::from(tcp.as_ref());
                let wrote = if self.written < header.len() {
                    let slices = [IoSlice::new(&header[self.written..]), IoSlice::new(data)];
                    io::Write::write_vectored(&mut &*socket, &slices)
                } else {
                    io::Write::write(&mut &*socket, &data[self.written - header.len()..])
                };
                match wrote {
                    Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                    Ok(n) => {
                        self.written += n;
                        progress = Some(std::time::Instant::now());
                        continue;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        let since = *progress.get_or_insert_with(std::time::Instant::now);
                        if since.elapsed() < window {
                            tokio::task::yield_now().await;
                            continue;
                        }
                    }
                    Err(e) => return Err(e),
                }
            }
            let n = if self.written < header.len() {
                let slices = [IoSlice::new(&header[self.written..]), IoSlice::new(data)];
                w.write_vectored(&slices).await?
            } else {
                w.write(&data[self.written - header.len()..]).await?
            };
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            self.written += n;
            if busy.is_some() {
                progress = Some(std::time::Instant::now());
            }
        }
        self.done = true;
        Ok(())
    }

    fn poison(&mut self) {
        self.done = true;
        self.writer.take();
        self.shared.lose(self.peer, self.link);
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if !self.done && self.written > 0 {
            tracing::debug!(me = %self.shared.me, peer = %self.peer, "tcp: send abandoned mid-frame");
            self.poison();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Same-host buffers only while this host's ranks fit its cores.
    #[test]
    fn same_host_buffers_need_a_core_per_local_rank() {
        let cores = crate::host_cores();
        let at = |ip: [u8; 4], port| SocketAddr::from((ip, port));
        let local = |n: usize| {
            (0..n)
                .map(|i| at([127, 0, 0, 1], 1000 + i as u16))
                .collect()
        };
        let fits: Vec<SocketAddr> = local(cores);
        assert_eq!(same_host_buffer(&fits, Rank(0), 4096), 4096);
        let crowded: Vec<SocketAddr> = local(cores + 1);
        assert_eq!(same_host_buffer(&crowded, Rank(0), 4096), 0);
        // Ranks on other hosts do not count against this host's cores.
        let mut spread = vec![at([192, 0, 2, 1], 1)];
        spread.extend((0..2 * cores).map(|i| at([192, 0, 2, 2], i as u16)));
        assert_eq!(same_host_buffer(&spread, Rank(0), 4096), 4096);
        assert_eq!(same_host_buffer(&spread, Rank(1), 4096), 0);
    }

    fn soon() -> Instant {
        Instant::now() + Duration::from_secs(10)
    }

    /// Polls `cond` every 5 ms for at most 5 s.
    async fn eventually(mut cond: impl FnMut() -> bool) -> bool {
        for _ in 0..1000 {
            if cond() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        cond()
    }

    /// A receive reads its peer's connection itself while it waits; whenever it stops
    /// (message received, deadline, cancellation) the reader task must get the connection back
    /// and keep taking in messages that nobody waits for yet.
    async fn receives_hand_the_connection_back() {
        let job = JobId::new("pump").expect("job id");
        let eps: Vec<Arc<TcpChannel>> = local_world(job, 2, TcpConfig::default())
            .await
            .expect("world")
            .into_iter()
            .map(Arc::new)
            .collect();
        let (a, b) = (&eps[0], &eps[1]);
        let inbox = b.inbox();

        // Connected, and received by a pumping receive.
        let waiting = b.recv(Rank(0), Tag::user(1), soon());
        a.send(Rank(1), Tag::user(1), b"one", soon())
            .await
            .expect("send");
        assert_eq!(waiting.await.expect("recv"), b"one");
        a.send(Rank(1), Tag::user(2), b"two", soon())
            .await
            .expect("send");
        assert!(
            eventually(|| inbox.buffered_bytes() == 3).await,
            "after a completed receive"
        );
        assert_eq!(
            b.recv(Rank(0), Tag::user(2), soon()).await.expect("recv"),
            b"two"
        );

        // A receive that times out while pumping.
        let r = b
            .recv(
                Rank(0),
                Tag::user(3),
                Instant::now() + Duration::from_millis(30),
            )
            .await;
        assert!(matches!(r, Err(Error::Timeout { .. })), "{r:?}");
        a.send(Rank(1), Tag::user(4), b"four", soon())
            .await
            .expect("send");
        assert!(
            eventually(|| inbox.buffered_bytes() == 4).await,
            "after a timeout"
        );

        // A receive dropped while pumping.
        {
            let mut dropped = b.recv(Rank(0), Tag::user(5), soon());
            assert!(futures::poll!(&mut dropped).is_pending());
        }
        a.send(Rank(1), Tag::user(6), b"six!!!", soon())
            .await
            .expect("send");
        assert!(
            eventually(|| inbox.buffered_bytes() == 10).await,
            "after a cancellation"
        );
        assert_eq!(
            b.recv(Rank(0), Tag::user(4), soon()).await.expect("recv"),
            b"four"
        );
        assert_eq!(
            b.recv(Rank(0), Tag::user(6), soon()).await.expect("recv"),
            b"six!!!"
        );

        // Two receives pumping at once, finishing in the other order.
        let b2 = Arc::clone(b);
        let both = tokio::spawn(async move {
            let first = b2.recv(Rank(0), Tag::user(7), soon());
            let second = b2.recv(Rank(0), Tag::user(8), soon());
            let (x, y) = tokio::join!(second, first);
            (x.expect("second"), y.expect("first"))
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        a.send(Rank(1), Tag::user(8), b"8", soon())
            .await
            .expect("send");
        a.send(Rank(1), Tag::user(7), b"7", soon())
            .await
            .expect("send");
        let (x, y) = tokio::time::timeout(Duration::from_secs(10), both)
            .await
            .expect("both receives finish")
            .expect("task");
        assert_eq!((x.as_slice(), y.as_slice()), (&b"8"[..], &b"7"[..]));
        a.send(Rank(1), Tag::user(9), b"9", soon())
            .await
            .expect("send");
        assert!(
            eventually(|| inbox.buffered_bytes() == 1).await,
            "after two receives"
        );
    }

    #[tokio::test]
    async fn receives_hand_the_connection_back_current_thread() {
        receives_hand_the_connection_back().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn receives_hand_the_connection_back_multi_thread() {
        receives_hand_the_connection_back().await;
    }

    /// A `recv_into` reads its message straight into its buffer; stopped half-way (cancelled, or
    /// its deadline passed) it leaves the frame to the next receiver, complete and intact. On one
    /// thread, so that the sender runs only while the test waits.
    #[tokio::test(flavor = "current_thread")]
    async fn a_receive_into_a_buffer_stopped_mid_message_loses_nothing() {
        let job = JobId::new("direct").expect("job id");
        // Small socket buffers (where the host has a core per rank), so that each poll below
        // finds at most a few hundred KiB of the 16 MiB: with autotuned buffers a poll could
        // drain several MiB, and three of them the whole message (seen once in CI).
        let config = TcpConfig {
            local_socket_buffer: 256 << 10,
            ..TcpConfig::default()
        };
        let eps: Vec<Arc<TcpChannel>> = local_world(job, 2, config)
            .await
            .expect("world")
            .into_iter()
            .map(Arc::new)
            .collect();
        let (a, b) = (&eps[0], &eps[1]);
        // Connect the pair: receives read only connections that are up.
        a.send(Rank(1), Tag::user(0), b"hi", soon())
            .await
            .expect("send");
        assert_eq!(
            b.recv(Rank(0), Tag::user(0), soon()).await.expect("recv"),
            b"hi"
        );
        // Larger than what the socket buffers hold, so the sender stalls mid-frame.
        let big: Arc<Vec<u8>> = Arc::new(
            (0..16usize << 20)
                .map(|i| (i * 7 + i / 4093) as u8)
                .collect(),
        );
        for (round, cancel) in [(1u32, true), (2, false)] {
            let tag = Tag::user(round);
            let sender = {
                let (a, big) = (Arc::clone(a), Arc::clone(&big));
                tokio::spawn(async move { a.send(Rank(1), tag, &big, soon()).await })
            };
            let mut buf = vec![0u8; big.len()];
            {
                let deadline = if cancel {
                    soon()
                } else {
                    // Long enough that the polls below finish before it even on a loaded
                    // machine (a shorter one made this test flaky in CI).
                    Instant::now() + Duration::from_secs(2)
                };
                let mut r = b.recv_into(Rank(0), tag, &mut buf, deadline);
                // Waiting (so the reader task stands aside) before the sender fills the socket;
                // then the receive reads what is there.
                assert!(futures::poll!(&mut r).is_pending(), "round {round}");
                tokio::time::sleep(Duration::from_millis(20)).await;
                assert!(futures::poll!(&mut r).is_pending(), "round {round}");
                tokio::time::sleep(Duration::from_millis(20)).await;
                assert!(futures::poll!(&mut r).is_pending(), "round {round}");
                if !cancel {
                    // Past the deadline, without reading meanwhile.
                    tokio::time::sleep_until(deadline + Duration::from_millis(100)).await;
                    let r = r.await;
                    assert!(matches!(r, Err(Error::Timeout { .. })), "{r:?}");
                }
            }
            // Part of the payload went straight into the buffer...
            assert!(buf[..4096] == big[..4096], "round {round}: read directly");
            // ...and the whole message goes to the next receive.
            let got = b.recv(Rank(0), tag, soon()).await.expect("recv");
            assert!(got == *big, "round {round}: message intact");
            sender.await.expect("sender").expect("send");
        }
        // A receive reading into its buffer while another receive from the same peer waits.
        let mut buf = vec![0u8; big.len() + 1];
        let x = b.recv_into(Rank(0), Tag::user(20), &mut buf, soon());
        let y = b.recv(Rank(0), Tag::user(21), soon());
        let sender = {
            let (a, big) = (Arc::clone(a), Arc::clone(&big));
            tokio::spawn(async move {
                a.send(Rank(1), Tag::user(20), &big, soon()).await?;
                a.send(Rank(1), Tag::user(21), b"y", soon()).await
            })
        };
        let (got_y, got_x) = tokio::join!(y, x);
        assert_eq!(got_y.expect("recv"), b"y");
        assert_eq!(got_x.expect("recv_into"), big.len());
        assert!(buf[..big.len()] == big[..]);
        sender.await.expect("sender").expect("send");
        assert_eq!(b.inbox().buffered_bytes(), 0);
        assert_eq!(b.inbox().pending_keys(), 0);
    }
}
