//! NAT traversal for the TCP channel: what the channel needs from a rendezvous service, and the
//! socket tricks hole punching rests on.
//!
//! The channel does not know the rendezvous protocol (the `fmi-rendezvous` crate depends on this
//! one, not the other way round). It is handed a [`Traversal`]: the local address of the
//! rendezvous connection (which the NAT has already mapped, so punching from the *same* port
//! reuses that mapping), an object that asks the rendezvous for punches and opens relay
//! connections ([`Rendezvous`]), and a stream of [`TraversalEvent`]s the rendezvous pushes.
//!
//! ```text
//!   TcpChannel ── request_punch(peer) ──▶ Rendezvous ── Connect{peer} ──▶ server
//!   TcpChannel ◀── Punch{peer, public, private, start_in} / RelayOffer{peer} ── events
//!   TcpChannel ── relay(peer) ──▶ a TcpStream spliced with the peer's by the server
//! ```

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::mpsc;

use crate::Rank;

/// How the connection of one pair of ranks was made.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum PathKind {
    /// A plain dial to the peer's announced (listening) endpoint.
    Direct,
    /// A TCP simultaneous open through the NATs, coordinated by the rendezvous server.
    Punched,
    /// Through the rendezvous server acting as a relay.
    Relayed,
    /// Through a storage channel, the pair's fallback when nothing else connects
    /// ([`NatConfig::fallback`]).
    Stored,
}

impl PathKind {
    /// Whether the pair talks directly (dialed or punched), not through a relay.
    pub fn is_direct(self) -> bool {
        matches!(self, PathKind::Direct | PathKind::Punched)
    }

    /// Lowercase name, as printed in logs and path reports.
    pub fn as_str(self) -> &'static str {
        match self {
            PathKind::Direct => "direct",
            PathKind::Punched => "punched",
            PathKind::Relayed => "relayed",
            PathKind::Stored => "stored",
        }
    }
}

impl fmt::Display for PathKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the rendezvous service tells a channel.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum TraversalEvent {
    /// Open a connection to `peer` now (`peer` was told the same about this rank).
    Punch {
        /// The other rank.
        peer: Rank,
        /// Where the rendezvous saw `peer` come from: its NAT's public side.
        public: Option<SocketAddr>,
        /// The endpoints `peer` announced.
        private: Vec<SocketAddr>,
        /// How long after receiving this to start.
        start_in: Duration,
    },
    /// `peer` waits at the relay for this rank's relay connection.
    RelayOffer {
        /// The waiting rank.
        peer: Rank,
    },
    /// `peer` takes no part in traversal (it left, or never held its registration).
    NoPeer {
        /// The rank asked for.
        peer: Rank,
    },
}

/// The requests a channel makes of the rendezvous service.
pub trait Rendezvous: Send + Sync + 'static {
    /// Asks for a punch with `peer`. Best effort and non-blocking: the answer, if any, comes as
    /// a [`TraversalEvent`].
    fn request_punch(&self, peer: Rank);

    /// Opens a relay connection to `peer`: resolves once the relay has spliced it with `peer`'s
    /// mirror connection, so that the bytes written are the ones `peer` reads.
    fn relay(&self, peer: Rank) -> BoxFuture<'static, io::Result<TcpStream>>;
}

/// Everything a [`TcpChannel`](super::TcpChannel) needs for NAT traversal; see the
/// [module docs](self).
pub struct Traversal {
    pub(super) punch_from: SocketAddr,
    pub(super) rendezvous: Arc<dyn Rendezvous>,
    pub(super) events: mpsc::Receiver<TraversalEvent>,
}

impl Traversal {
    /// `punch_from` is the local address (from `getsockname`) of the connection to the
    /// rendezvous server, which must have been made with [`connect_reusable`] so that punches
    /// can be sent from the same port.
    pub fn new(
        punch_from: SocketAddr,
        rendezvous: Arc<dyn Rendezvous>,
        events: mpsc::Receiver<TraversalEvent>,
    ) -> Traversal {
        Traversal {
            punch_from,
            rendezvous,
            events,
        }
    }

    /// The local address punches are sent from.
    pub fn punch_from(&self) -> SocketAddr {
        self.punch_from
    }
}

impl fmt::Debug for Traversal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Traversal")
            .field("punch_from", &self.punch_from)
            .finish_non_exhaustive()
    }
}

/// How the TCP channel traverses NATs. Build with struct update syntax over the defaults.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NatConfig {
    /// Dial the peer's announced endpoints (its listener) directly. Default: true.
    pub direct: bool,
    /// Ask the rendezvous for hole punches. Default: true.
    pub punch: bool,
    /// Fall back to the relay. Default: true.
    pub relay: bool,
    /// How long after a connection is first wanted the relay (or the storage fallback) is
    /// tried if neither a direct dial nor a punch has connected (punching goes on meanwhile;
    /// whichever connects first wins). Default: 800 ms, so that the choice is made within a
    /// second.
    pub relay_after: Duration,
    /// A storage channel to carry the pair's connection when it has none `relay_after` after
    /// it was wanted, on both sides of the pair (see `stored`): for deployments without a
    /// relay, or where storage requests are cheaper than relay hours. Each side starts it
    /// from its own dial (the peer's starts when the rendezvous tells it to punch), so the
    /// active side asks for a punch even with `punch` off. Default: none.
    pub fallback: Option<super::stored::StorageFallback>,
    /// How long one punch attempt (a simultaneous open) may take. Default: 300 ms.
    pub punch_attempt: Duration,
    /// Most punch attempts per `Punch` order. Default: 8.
    pub punch_attempts: u32,
    /// How long a connection wanted only by the peer (a `Punch` or `RelayOffer` arrived while
    /// no send of this rank needs the pair) is pursued. Default: 15 s.
    pub passive_window: Duration,
}

impl Default for NatConfig {
    fn default() -> NatConfig {
        NatConfig {
            direct: true,
            punch: true,
            relay: true,
            relay_after: Duration::from_millis(800),
            fallback: None,
            punch_attempt: Duration::from_millis(300),
            punch_attempts: 8,
            passive_window: Duration::from_secs(15),
        }
    }
}

/// A socket with `SO_REUSEADDR` and `SO_REUSEPORT`, bound to `local` (port 0: any).
fn reusable(local: SocketAddr) -> io::Result<TcpSocket> {
    let socket = match local {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    #[cfg(unix)]
    socket.set_reuseport(true)?;
    socket.set_nodelay(true)?;
    socket.bind(local)?;
    Ok(socket)
}

/// Connects to `remote` from a socket bound to `local` with `SO_REUSEADDR` and `SO_REUSEPORT`,
/// so that further sockets (punches) can later be bound to the same local port. Use it for the
/// connection to the rendezvous server, and take the port to punch from with `local_addr()`
/// (`getsockname`): the NAT has mapped that one.
pub async fn connect_reusable(local: SocketAddr, remote: SocketAddr) -> io::Result<TcpStream> {
    reusable(local)?.connect(remote).await
}

/// The unspecified address of `remote`'s family, port 0: where to bind a socket that reaches
/// `remote`.
pub fn any_local_for(remote: SocketAddr) -> SocketAddr {
    match remote {
        SocketAddr::V4(_) => SocketAddr::from((std::net::Ipv4Addr::UNSPECIFIED, 0)),
        SocketAddr::V6(_) => SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 0)),
    }
}
