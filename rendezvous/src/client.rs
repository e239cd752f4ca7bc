//! The client side: register one rank and wait for the job's peer table; optionally stay
//! attached for NAT traversal ([`join`] and [`Session`]).

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use fmi_channels::tcp::nat::{
    any_local_for, connect_reusable, Rendezvous, Traversal, TraversalEvent,
};
use fmi_channels::{JobId, Rank};
use futures::future::BoxFuture;
use futures::FutureExt;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::{sleep_until, timeout, timeout_at, Instant};
use tracing::debug;

use crate::framed::{FrameReader, ReadError};
use crate::wire::{
    ClientMsg, DecodeError, Endpoint, RefuseReason, ServerMsg, Token, MAX_ENDPOINTS, MAX_RANKS,
};
use crate::Error;

/// The first pause before reconnecting; it doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(25);
const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// What a rank tells the server about itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Registration {
    /// The job to join.
    pub job: JobId,
    /// This rank, `0..size`.
    pub rank: u32,
    /// The number of ranks in the job (at most [`MAX_RANKS`]).
    pub size: u32,
    /// How the other ranks can reach this one (at most [`MAX_ENDPOINTS`]).
    pub endpoints: Vec<Endpoint>,
    /// The job's secret; every rank of the job must present the same one.
    pub token: Token,
}

/// The endpoints of every rank of a job, indexed by rank.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerTable {
    job: JobId,
    rows: Vec<Vec<Endpoint>>,
}

impl PeerTable {
    /// The job this table belongs to.
    pub fn job(&self) -> &JobId {
        &self.job
    }

    /// The number of ranks in the job.
    pub fn size(&self) -> u32 {
        // Built from a job size, which is a u32.
        self.rows.len() as u32
    }

    /// The endpoints `rank` announced, or `None` if the rank is not in the job.
    pub fn endpoints(&self, rank: u32) -> Option<&[Endpoint]> {
        self.rows.get(rank as usize).map(Vec::as_slice)
    }

    /// Every rank with its endpoints, in rank order.
    pub fn iter(&self) -> impl Iterator<Item = (u32, &[Endpoint])> + '_ {
        (0u32..).zip(self.rows.iter().map(Vec::as_slice))
    }

    /// The rows, index = rank.
    pub fn into_rows(self) -> Vec<Vec<Endpoint>> {
        self.rows
    }
}

/// Registers `req` with the rendezvous server at `server` and waits until every rank of the job
/// has registered, returning the job's peer table.
///
/// The server may start after the client: refused or broken connections are retried with a
/// growing, jittered pause until `deadline`. When the deadline passes while registered, the error
/// is [`Error::Timeout`] listing the ranks the server reported missing shortly before; when the
/// server could not be reached, it is [`Error::Unreachable`].
pub async fn register(
    server: SocketAddr,
    req: Registration,
    deadline: Instant,
) -> Result<PeerTable, Error> {
    register_inner(server, &req, deadline, false)
        .await
        .map(|(table, _)| table)
}

/// What [`join`] returns: the peer table and, if the server does NAT traversal, the attached
/// session.
#[derive(Debug)]
pub struct Joined {
    /// The job's peer table.
    pub table: PeerTable,
    /// The connection that stays attached for hole-punch coordination and relaying; `None` if
    /// the server predates NAT traversal (it refused `Hold`).
    pub session: Option<Session>,
}

/// Like [`register`], but keeps the connection attached after the table arrives (it sends
/// `Hold`), for NAT traversal: see [`Session`]. The connection is made from a socket with
/// `SO_REUSEADDR`/`SO_REUSEPORT`, so that hole punches can be sent from its local port, which the
/// NAT in front of this rank has already mapped. A server that does not know `Hold` is detected
/// (it refuses it as malformed) and joined the old way, without a session.
pub async fn join(
    server: SocketAddr,
    req: Registration,
    deadline: Instant,
) -> Result<Joined, Error> {
    match register_inner(server, &req, deadline, true).await {
        Ok((table, session)) => Ok(Joined { table, session }),
        Err(Error::Refused {
            reason: RefuseReason::Malformed,
            ..
        }) => {
            debug!(%server, "rendezvous server does not do NAT traversal; joining without");
            let table = register(server, req, deadline).await?;
            Ok(Joined {
                table,
                session: None,
            })
        }
        Err(e) => Err(e),
    }
}

async fn register_inner(
    server: SocketAddr,
    req: &Registration,
    deadline: Instant,
    hold: bool,
) -> Result<(PeerTable, Option<Session>), Error> {
    let started = Instant::now();
    let refused = |reason| Error::Refused {
        job: req.job.clone(),
        rank: req.rank,
        reason,
    };
    // Registrations that no server could accept fail here, without a round trip.
    if req.rank >= req.size {
        return Err(refused(RefuseReason::InvalidRank {
            rank: req.rank,
            size: req.size,
        }));
    }
    if req.size > MAX_RANKS {
        return Err(refused(RefuseReason::JobTooLarge {
            size: req.size,
            max: MAX_RANKS,
        }));
    }
    if req.endpoints.len() > MAX_ENDPOINTS {
        return Err(Error::TooManyEndpoints {
            count: req.endpoints.len(),
            max: MAX_ENDPOINTS,
        });
    }
    let mut frame = Vec::new();
    ClientMsg::Register {
        job: req.job.clone(),
        rank: req.rank,
        size: req.size,
        endpoints: req.endpoints.clone(),
        token: req.token.clone(),
    }
    .encode(&mut frame)
    .map_err(|_| Error::TooManyEndpoints {
        count: req.endpoints.len(),
        max: MAX_ENDPOINTS,
    })?;
    if hold {
        ClientMsg::Hold
            .encode(&mut frame)
            .map_err(|_| Error::TooManyEndpoints {
                count: req.endpoints.len(),
                max: MAX_ENDPOINTS,
            })?;
    }

    // Ask for a fresh list of missing ranks a little before the deadline, so that a timeout
    // names the ranks that were really still missing, without overrunning the deadline.
    let total = deadline.saturating_duration_since(started);
    let margin = (total / 10).clamp(Duration::from_millis(20), Duration::from_secs(1));
    let ask_at = deadline
        .checked_sub(margin)
        .unwrap_or(deadline)
        .max(started);

    let mut attempts = 0u32;
    let mut backoff = FIRST_BACKOFF;
    let mut was_registered = false;
    let mut last_error = io::Error::new(io::ErrorKind::TimedOut, "deadline passed before trying");
    while Instant::now() < deadline {
        attempts += 1;
        let mut session = Attempt {
            server,
            req,
            deadline,
            ask_at,
            hold,
            missing: None,
        };
        match session.run(&frame).await {
            Ok(done) => return Ok(done),
            Err(End::Deadline) => {
                if let Some(missing) = session.missing {
                    return Err(Error::Timeout {
                        job: req.job.clone(),
                        rank: req.rank,
                        missing,
                        waited: started.elapsed(),
                    });
                }
                last_error = io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the deadline passed before the server answered",
                );
                break;
            }
            // Our own earlier connection may not have been noticed as gone yet.
            Err(End::Refused(RefuseReason::DuplicateRank { .. })) if was_registered => {
                last_error = io::Error::other("rank still held by a previous connection");
            }
            Err(End::Refused(reason)) => return Err(refused(reason)),
            Err(End::Protocol(source)) => return Err(Error::Protocol { server, source }),
            Err(End::Retry(error)) => {
                debug!(%server, %error, attempts, "rendezvous attempt failed; retrying");
                last_error = error;
            }
        }
        was_registered |= session.missing.is_some();
        let pause = backoff + jitter(backoff / 2);
        sleep_until((Instant::now() + pause).min(deadline)).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
    Err(Error::Unreachable {
        server,
        attempts,
        waited: started.elapsed(),
        source: last_error,
    })
}

/// How one connection attempt ended, short of a table.
enum End {
    Deadline,
    Refused(RefuseReason),
    Protocol(DecodeError),
    Retry(io::Error),
}

/// One connection to the server.
struct Attempt<'a> {
    server: SocketAddr,
    req: &'a Registration,
    deadline: Instant,
    ask_at: Instant,
    /// Stay attached after the table (NAT traversal).
    hold: bool,
    /// The last missing-rank list the server sent on this connection.
    missing: Option<Vec<u32>>,
}

impl Attempt<'_> {
    async fn run(&mut self, register: &[u8]) -> Result<(PeerTable, Option<Session>), End> {
        let connect = async {
            if self.hold {
                connect_reusable(any_local_for(self.server), self.server).await
            } else {
                TcpStream::connect(self.server).await
            }
        };
        let stream = match timeout_at(self.deadline, connect).await {
            Err(_) => return Err(End::Deadline),
            Ok(Err(error)) => return Err(End::Retry(error)),
            Ok(Ok(stream)) => stream,
        };
        let _ = stream.set_nodelay(true);
        let local = stream.local_addr().map_err(End::Retry)?;
        let (mut rd, mut wr) = stream.into_split();
        self.write(&mut wr, register).await?;
        let mut reader = FrameReader::new();
        let mut rows: Vec<Vec<Endpoint>> = Vec::new();
        let mut asked = false;
        loop {
            tokio::select! {
                read = reader.next(&mut rd) => {
                    let frame = match read {
                        Ok(Some(frame)) => frame,
                        Ok(None) => {
                            return Err(End::Retry(io::Error::new(
                                io::ErrorKind::UnexpectedEof,
                                "the server closed the connection",
                            )))
                        }
                        Err(ReadError::Io(error)) => return Err(End::Retry(error)),
                        Err(ReadError::Frame(error)) => return Err(End::Protocol(error)),
                    };
                    match ServerMsg::decode(&frame).map_err(End::Protocol)? {
                        ServerMsg::Missing { ranks } => self.missing = Some(ranks),
                        ServerMsg::Refused { reason } => return Err(End::Refused(reason)),
                        ServerMsg::Peers { size, first, endpoints } => {
                            if size != self.req.size {
                                return Err(unexpected("peer table for another job size"));
                            }
                            if first as usize != rows.len() {
                                return Err(unexpected("peer table parts out of order"));
                            }
                            rows.extend(endpoints);
                            if rows.len() == size as usize {
                                let table = self.finish(rows, &wr)?;
                                if !self.hold {
                                    return Ok((table, None));
                                }
                                let stream = rd.reunite(wr).map_err(|_| unexpected("halves"))?;
                                let session = Session {
                                    server: self.server,
                                    job: self.req.job.clone(),
                                    rank: self.req.rank,
                                    token: self.req.token.clone(),
                                    local,
                                    stream,
                                    reader,
                                };
                                return Ok((table, Some(session)));
                            }
                        }
                        other => {
                            debug!(server = %self.server, ?other, "unexpected message while joining");
                        }
                    }
                }
                () = sleep_until(self.ask_at), if !asked => {
                    asked = true;
                    let mut status = Vec::new();
                    ClientMsg::Status.encode(&mut status).map_err(|_| unexpected("status"))?;
                    self.write(&mut wr, &status).await?;
                }
                () = sleep_until(self.deadline) => return Err(End::Deadline),
            }
        }
    }

    fn finish(
        &self,
        rows: Vec<Vec<Endpoint>>,
        wr: &tokio::net::tcp::OwnedWriteHalf,
    ) -> Result<PeerTable, End> {
        if rows.get(self.req.rank as usize) != Some(&self.req.endpoints) {
            return Err(unexpected(
                "peer table does not hold this rank's own endpoints",
            ));
        }
        // Saying goodbye lets the server tell an orderly exit from a crash; it is only a
        // courtesy, so it must not delay the caller. A held connection stays.
        let mut leave = Vec::new();
        if !self.hold && ClientMsg::Leave.encode(&mut leave).is_ok() {
            let _ = wr.try_write(&leave);
        }
        Ok(PeerTable {
            job: self.req.job.clone(),
            rows,
        })
    }

    async fn write(
        &self,
        wr: &mut tokio::net::tcp::OwnedWriteHalf,
        bytes: &[u8],
    ) -> Result<(), End> {
        use tokio::io::AsyncWriteExt;
        match timeout_at(self.deadline, wr.write_all(bytes)).await {
            Err(_) => Err(End::Deadline),
            Ok(Err(error)) => Err(End::Retry(error)),
            Ok(Ok(())) => Ok(()),
        }
    }
}

fn unexpected(what: &'static str) -> End {
    End::Protocol(DecodeError::Unexpected { what })
}

/// A random pause in `0..max`, so that many ranks started together do not reconnect in lockstep.
fn jitter(max: Duration) -> Duration {
    // Each RandomState is freshly keyed, which is randomness enough for spreading retries.
    let random = RandomState::new().build_hasher().finish();
    let max_nanos = u64::try_from(max.as_nanos()).unwrap_or(u64::MAX).max(1);
    Duration::from_nanos(random % max_nanos)
}

/// A rank's connection to the rendezvous server kept attached after the peer table, for NAT
/// traversal (see [`join`]). Turn it into what the TCP channel takes with
/// [`into_traversal`](Self::into_traversal).
pub struct Session {
    server: SocketAddr,
    job: JobId,
    rank: u32,
    token: Token,
    local: SocketAddr,
    stream: TcpStream,
    reader: FrameReader,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("server", &self.server)
            .field("job", &self.job)
            .field("rank", &self.rank)
            .field("local", &self.local)
            .finish_non_exhaustive()
    }
}

/// Punch requests that may wait for the session's writer; more are dropped (a channel asks
/// again on its own schedule).
const REQUEST_QUEUE: usize = 64;
/// Events that may wait for the channel.
const EVENT_QUEUE: usize = 256;
/// How long writing one request to the server may take.
const SESSION_WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long opening a relay connection may take, mirror included (a little more than the
/// server's default relay timeout, so that the server's answer comes first).
const RELAY_TIMEOUT: Duration = Duration::from_secs(12);

impl Session {
    /// The local address of the attached connection (from `getsockname`): the port the NAT in
    /// front of this rank has mapped, from which punches are sent.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// The server's address.
    pub fn server(&self) -> SocketAddr {
        self.server
    }

    /// Starts the session's driver task (on the current tokio runtime) and returns what
    /// [`TcpChannel::start_with_traversal`](fmi_channels::tcp::TcpChannel::start_with_traversal)
    /// takes. The task lives as long as the returned [`Traversal`]'s rendezvous handle: dropping
    /// the channel stops it and closes the connection.
    ///
    /// # Panics
    /// Outside a tokio runtime.
    pub fn into_traversal(self) -> Traversal {
        let (requests_tx, requests) = mpsc::channel(REQUEST_QUEUE);
        let (events_tx, events) = mpsc::channel(EVENT_QUEUE);
        let local = self.local;
        let relay = RelayDialer {
            server: self.server,
            job: self.job.clone(),
            rank: self.rank,
            token: self.token.clone(),
        };
        let task = tokio::spawn(drive(self, requests, events_tx));
        let handle = SessionHandle {
            requests: requests_tx,
            relay,
            task,
        };
        Traversal::new(local, Arc::new(handle), events)
    }
}

/// The channel's side of a running session.
struct SessionHandle {
    requests: mpsc::Sender<u32>,
    relay: RelayDialer,
    task: JoinHandle<()>,
}

impl Drop for SessionHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Rendezvous for SessionHandle {
    fn request_punch(&self, peer: Rank) {
        if self.requests.try_send(peer.0).is_err() {
            debug!(%peer, "punch request dropped: session busy or ended");
        }
    }

    fn relay(&self, peer: Rank) -> BoxFuture<'static, io::Result<TcpStream>> {
        let relay = self.relay.clone();
        async move { relay.open(peer.0).await }.boxed()
    }
}

/// The session's driver: writes punch requests, turns the server's frames into events.
async fn drive(
    session: Session,
    mut requests: mpsc::Receiver<u32>,
    events: mpsc::Sender<TraversalEvent>,
) {
    let Session {
        server,
        stream,
        mut reader,
        rank,
        ..
    } = session;
    let (mut rd, mut wr) = stream.into_split();
    let mut buf = Vec::new();
    let why = loop {
        tokio::select! {
            request = requests.recv() => {
                let Some(peer) = request else { break "channel gone" };
                buf.clear();
                if (ClientMsg::Connect { peer }).encode(&mut buf).is_err() {
                    continue;
                }
                match timeout(SESSION_WRITE_TIMEOUT, wr.write_all(&buf)).await {
                    Ok(Ok(())) => {}
                    _ => break "write failed",
                }
            }
            read = reader.next(&mut rd) => {
                let frame = match read {
                    Ok(Some(frame)) => frame,
                    Ok(None) => break "closed by the server",
                    Err(_) => break "read failed",
                };
                let event = match ServerMsg::decode(&frame) {
                    Ok(ServerMsg::Punch { peer, public, private, start_in }) => {
                        TraversalEvent::Punch {
                            peer: Rank(peer),
                            public,
                            private: private
                                .iter()
                                .filter_map(|e| parse_endpoint(e.as_str()))
                                .collect(),
                            start_in,
                        }
                    }
                    Ok(ServerMsg::RelayOffer { peer }) => TraversalEvent::RelayOffer { peer: Rank(peer) },
                    Ok(ServerMsg::NoPeer { peer }) => TraversalEvent::NoPeer { peer: Rank(peer) },
                    Ok(ServerMsg::Refused { reason }) => {
                        debug!(%server, rank, %reason, "rendezvous session refused");
                        break "refused";
                    }
                    Ok(other) => {
                        debug!(%server, rank, ?other, "unexpected message on the session");
                        continue;
                    }
                    Err(_) => break "undecodable frame",
                };
                if events.send(event).await.is_err() {
                    break "channel gone";
                }
            }
        }
    };
    debug!(%server, rank, why, "rendezvous session ended");
}

/// An announced endpoint as a socket address: `ip:port` or `tcp://ip:port`.
pub fn parse_endpoint(text: &str) -> Option<SocketAddr> {
    text.strip_prefix("tcp://").unwrap_or(text).parse().ok()
}

/// Opens relay connections for one rank of a job.
#[derive(Clone)]
pub struct RelayDialer {
    server: SocketAddr,
    job: JobId,
    rank: u32,
    token: Token,
}

impl std::fmt::Debug for RelayDialer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RelayDialer")
            .field("server", &self.server)
            .field("job", &self.job)
            .field("rank", &self.rank)
            .finish_non_exhaustive()
    }
}

impl RelayDialer {
    /// A dialer for rank `rank` of `job` through the relay at `server`. The rank must be
    /// attached to the server (see [`join`]) for the relay to accept it.
    pub fn new(server: SocketAddr, job: JobId, rank: u32, token: Token) -> RelayDialer {
        RelayDialer {
            server,
            job,
            rank,
            token,
        }
    }

    /// Opens a relay connection to rank `to` and waits until the server has spliced it with
    /// `to`'s mirror connection. From then on the stream carries raw bytes to and from `to`.
    pub async fn open(&self, to: u32) -> io::Result<TcpStream> {
        timeout(RELAY_TIMEOUT, self.open_inner(to))
            .await
            .unwrap_or_else(|_| Err(io::ErrorKind::TimedOut.into()))
    }

    async fn open_inner(&self, to: u32) -> io::Result<TcpStream> {
        let mut stream = TcpStream::connect(self.server).await?;
        stream.set_nodelay(true)?;
        let mut frame = Vec::new();
        ClientMsg::Relay {
            job: self.job.clone(),
            from: self.rank,
            to,
            token: self.token.clone(),
        }
        .encode(&mut frame)
        .map_err(io::Error::other)?;
        stream.write_all(&frame).await?;
        // The reader stops at the end of the frame, so no relayed byte is consumed here.
        let reply = match FrameReader::new().next(&mut stream).await {
            Ok(Some(reply)) => reply,
            Ok(None) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Err(ReadError::Io(e)) => return Err(e),
            Err(ReadError::Frame(e)) => return Err(io::Error::new(io::ErrorKind::InvalidData, e)),
        };
        match ServerMsg::decode(&reply) {
            Ok(ServerMsg::Relayed { peer }) if peer == to => Ok(stream),
            Ok(ServerMsg::Refused { reason }) => Err(io::Error::new(
                io::ErrorKind::ConnectionRefused,
                format!("the relay refused rank {} -> {to}: {reason}", self.rank),
            )),
            Ok(_) => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "the relay answered with something else than Relayed",
            )),
            Err(e) => Err(io::Error::new(io::ErrorKind::InvalidData, e)),
        }
    }
}
