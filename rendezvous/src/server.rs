//! The tokio driver around [`ServerState`]: accepts connections, turns bytes into state-machine
//! inputs and carries out its actions.
//!
//! ```text
//!   accept ──spawn──▶ connection task (one per client)   ── Inbound{conn, event} ──▶ core loop
//!                       reads frames with timeouts,                                  owns ServerState,
//!                       writes what the core queues    ◀── Outbound (bounded) ────── dispatches actions
//! ```
//!
//! The core never waits on a connection: it hands frames over with `try_send` into a bounded
//! queue, and a connection whose queue is full is dropped as too slow. Connections wait on the
//! core (their events are backpressured), never the other way round, so nothing can deadlock.
//! Every connection task lives in a `JoinSet` owned by the core task, and the core task is owned
//! by the [`ServerHandle`]: stopping or dropping the handle stops everything.
//!
//! A relay is two connections the state machine pairs ([`Action::Splice`]): the task of one
//! hands its socket to the task of the other, which then copies bytes both ways through a
//! buffer of [`ServerConfig::relay_buffer`] bytes per direction until either side ends. So the
//! relay holds a bounded amount per pair and a slow receiver stalls its sender through TCP flow
//! control; relayed pairs count against [`ServerConfig::max_connections`] like any connection.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::{sleep, sleep_until, timeout, Instant};
use tracing::{debug, info, warn};

use crate::framed::{FrameReader, ReadError};
use crate::server_state::{Action, ConnId, Event, ServerState};
use crate::wire::{ClientMsg, DecodeError, RefuseReason, ServerMsg};
use crate::ServerConfig;

/// How many frames may wait for one connection's writer. A peer table for the largest job
/// needs a few hundred parts; a client that lets more pile up is not reading and is dropped.
const OUTBOUND_QUEUE: usize = 512;
/// How many connection events may wait for the core.
const INBOUND_QUEUE: usize = 1024;
/// How long to pause accepting after the listener fails (typically: out of file descriptors).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// A bound rendezvous server, not yet serving.
#[derive(Debug)]
pub struct Server {
    listener: TcpListener,
    local_addr: SocketAddr,
    config: ServerConfig,
}

/// Owns a running server and every task it spawned. [`shutdown`](Self::shutdown) stops it and
/// waits for every task to end; dropping the handle stops it without waiting.
#[derive(Debug)]
pub struct ServerHandle {
    local_addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

/// What a connection task tells the core.
#[derive(Debug)]
enum ConnEvent {
    Message(ClientMsg),
    Invalid(DecodeError),
    Closed,
}

#[derive(Debug)]
struct Inbound {
    conn: ConnId,
    event: ConnEvent,
}

/// What the core tells a connection task.
#[derive(Debug)]
enum Outbound {
    Send(Arc<ServerMsg>),
    Close,
    /// Give the socket to the task splicing it with its mirror, then end.
    HandOver(oneshot::Sender<TcpStream>),
    /// Take the mirror's socket and copy bytes both ways until either ends.
    Splice(oneshot::Receiver<TcpStream>),
}

impl Server {
    /// Binds a listener (port 0 picks a free port; see [`local_addr`](Self::local_addr)).
    pub async fn bind(addr: SocketAddr, config: ServerConfig) -> io::Result<Server> {
        let listener = TcpListener::bind(addr).await?;
        let local_addr = listener.local_addr()?;
        Ok(Server {
            listener,
            local_addr,
            config,
        })
    }

    /// The address the server listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Starts serving on a new task of the current tokio runtime.
    ///
    /// # Panics
    /// Outside a tokio runtime.
    pub fn spawn(self) -> ServerHandle {
        let (stop, stopped) = oneshot::channel();
        let local_addr = self.local_addr;
        let task = tokio::spawn(self.serve_until(async {
            // A dropped sender also means stop.
            let _ = stopped.await;
        }));
        ServerHandle {
            local_addr,
            stop: Some(stop),
            task,
        }
    }

    /// Serves until the returned future is dropped.
    pub async fn serve(self) {
        self.serve_until(std::future::pending()).await;
    }

    async fn serve_until(self, stop: impl Future<Output = ()>) {
        let Server {
            listener,
            local_addr,
            config,
        } = self;
        info!(%local_addr, "rendezvous server listening");
        let mut core = Core {
            state: ServerState::new(config.clone()),
            conns: HashMap::new(),
        };
        let (events_tx, mut events) = mpsc::channel::<Inbound>(INBOUND_QUEUE);
        let mut tasks = JoinSet::new();
        let mut next_conn = 0u64;
        tokio::pin!(stop);
        loop {
            let wake = core
                .state
                .poll_timeout()
                .map(Instant::from_std)
                .unwrap_or_else(far_future);
            tokio::select! {
                () = &mut stop => break,
                accepted = listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        if tasks.len() >= config.max_connections {
                            warn!(%peer, limit = config.max_connections, "too many connections; dropping a new one");
                            continue;
                        }
                        next_conn += 1;
                        let conn = ConnId(next_conn);
                        let (tx, rx) = mpsc::channel(OUTBOUND_QUEUE);
                        core.conns.insert(conn, tx);
                        core.state.handle_accepted(conn, peer, Instant::now().into_std());
                        tasks.spawn(connection(
                            conn,
                            stream,
                            peer,
                            Limits::from(&config),
                            events_tx.clone(),
                            rx,
                        ));
                    }
                    Err(error) => {
                        warn!(%error, "accept failed; pausing");
                        sleep(ACCEPT_BACKOFF).await;
                    }
                },
                Some(Inbound { conn, event }) = events.recv() => {
                    let now = Instant::now().into_std();
                    match event {
                        ConnEvent::Message(msg) => core.state.handle_message(conn, msg, now),
                        ConnEvent::Invalid(error) => {
                            debug!(%conn, %error, "undecodable frame");
                            core.state.handle_invalid(conn, &error, now);
                        }
                        ConnEvent::Closed => {
                            core.conns.remove(&conn);
                            core.state.handle_closed(conn, now);
                        }
                    }
                }
                () = sleep_until(wake) => core.state.handle_timeout(Instant::now().into_std()),
                Some(joined) = tasks.join_next() => {
                    if let Err(error) = joined {
                        if error.is_panic() {
                            warn!(%error, "connection task panicked");
                        }
                    }
                }
            }
            core.dispatch();
        }
        tasks.shutdown().await;
        info!(%local_addr, "rendezvous server stopped");
    }
}

impl ServerHandle {
    /// The address the server listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stops accepting, closes every connection and waits until every task of the server has
    /// ended.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Err(error) = (&mut self.task).await {
            if error.is_panic() {
                warn!(%error, "rendezvous server task panicked");
            }
        }
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        // Aborting the core task drops its JoinSet, which aborts every connection task.
        self.task.abort();
    }
}

/// Binds `addr` and serves forever: the entry point of `fmi rendezvous --listen ADDR`.
/// Returns only if binding fails (or when the future is dropped).
pub async fn run(addr: SocketAddr, config: ServerConfig) -> io::Result<()> {
    Server::bind(addr, config).await?.serve().await;
    Ok(())
}

/// The state machine and the way to reach each connection's writer.
struct Core {
    state: ServerState,
    conns: HashMap<ConnId, mpsc::Sender<Outbound>>,
}

impl Core {
    fn dispatch(&mut self) {
        while let Some(action) = self.state.poll_action() {
            match action {
                Action::Send { conn, msg } => {
                    let Some(tx) = self.conns.get(&conn) else {
                        continue;
                    };
                    if tx.try_send(Outbound::Send(msg)).is_err() {
                        // Full (the client does not read) or already gone: either way it can no
                        // longer take part. Dropping the sender ends its task.
                        debug!(%conn, "connection too slow or gone; dropping it");
                        self.conns.remove(&conn);
                        self.state.handle_closed(conn, Instant::now().into_std());
                    }
                }
                Action::Close { conn } => {
                    if let Some(tx) = self.conns.remove(&conn) {
                        // If the queue is full, dropping `tx` ends the task all the same.
                        let _ = tx.try_send(Outbound::Close);
                    }
                }
                Action::Splice { a, b } => {
                    let (give, take) = oneshot::channel();
                    // Both leave the protocol: their tasks end or splice after this message.
                    let splicer = self.conns.remove(&a);
                    let giver = self.conns.remove(&b);
                    match (splicer, giver) {
                        (Some(splicer), Some(giver)) => {
                            // A full queue drops the message; the dropped oneshot then ends the
                            // other side too.
                            let _ = splicer.try_send(Outbound::Splice(take));
                            let _ = giver.try_send(Outbound::HandOver(give));
                        }
                        // One side is already gone; dropping the other's sender ends it too.
                        _ => debug!(%a, %b, "relay side gone before splicing"),
                    }
                }
                Action::Event(event) => log_event(&event),
            }
        }
    }
}

fn log_event(event: &Event) {
    match event {
        Event::Registered {
            conn,
            job,
            rank,
            size,
        } => debug!(%conn, %job, rank, size, "rank registered"),
        Event::Refused {
            conn,
            job,
            rank,
            reason,
        } => {
            let job = job.as_ref().map(|j| j.as_str());
            match reason {
                RefuseReason::Malformed
                | RefuseReason::TooLarge { .. }
                | RefuseReason::UnsupportedVersion { .. }
                | RefuseReason::UnexpectedMessage => {
                    info!(%conn, ?job, ?rank, %reason, "client refused")
                }
                _ => warn!(%conn, ?job, ?rank, %reason, "registration refused"),
            }
        }
        Event::Left { conn, job, rank } => debug!(%conn, %job, rank, "rank left before completion"),
        Event::Completed { job, size } => info!(%job, size, "job complete; peer table sent"),
        Event::Expired {
            job,
            registered,
            size,
        } => warn!(%job, registered, size, "job abandoned incomplete and removed"),
        Event::Removed { job } => debug!(%job, "completed job forgotten"),
        Event::Punch { job, from, to } => debug!(%job, from, to, "pair told to punch"),
        Event::RelayWaiting { job, from, to } => {
            debug!(%job, from, to, "relay connection waits for its peer")
        }
        Event::Relayed { job, a, b } => info!(%job, a, b, "pair relayed"),
    }
}

#[derive(Clone, Copy, Debug)]
struct Limits {
    read: Duration,
    write: Duration,
    relay_buffer: usize,
}

impl From<&ServerConfig> for Limits {
    fn from(config: &ServerConfig) -> Self {
        Limits {
            read: config.read_timeout,
            write: config.write_timeout,
            relay_buffer: config.relay_buffer.max(1),
        }
    }
}

/// What a connection task does once it leaves its protocol loop.
enum Then {
    End(&'static str),
    HandOver(oneshot::Sender<TcpStream>),
    Splice(oneshot::Receiver<TcpStream>),
}

/// One client connection: reads frames and hands them to the core; writes what the core sends.
async fn connection(
    conn: ConnId,
    stream: TcpStream,
    peer: SocketAddr,
    timeouts: Limits,
    events: mpsc::Sender<Inbound>,
    mut outbound: mpsc::Receiver<Outbound>,
) {
    // Frames are small and answered at once; batching would only add latency.
    let _ = stream.set_nodelay(true);
    let (mut rd, mut wr) = stream.into_split();
    let mut reader = FrameReader::new();
    let accepted = Instant::now();
    let mut seen_frame = false;
    // After an undecodable frame the stream cannot be resynchronised: stop reading and only
    // deliver the refusal.
    let mut reading = true;
    let mut buf = Vec::new();
    let then = loop {
        // The first frame must arrive whole in time; later only a frame that has started must
        // finish in time, because a registered rank may wait silently for its peers.
        let read_deadline = if seen_frame {
            reader.started()
        } else {
            Some(accepted)
        }
        .and_then(|t| t.checked_add(timeouts.read));
        let timer_armed = reading && read_deadline.is_some();
        tokio::select! {
            read = reader.next(&mut rd), if reading => {
                let event = match read {
                    Ok(Some(frame)) => {
                        seen_frame = true;
                        match ClientMsg::decode(&frame) {
                            Ok(msg @ ClientMsg::Relay { .. }) => {
                                // What follows is for the peer once spliced (or nothing): leave
                                // it in the socket.
                                reading = false;
                                ConnEvent::Message(msg)
                            }
                            Ok(msg) => ConnEvent::Message(msg),
                            Err(error) => {
                                reading = false;
                                ConnEvent::Invalid(error)
                            }
                        }
                    }
                    Ok(None) => break Then::End("closed by the client"),
                    Err(ReadError::Io(error)) => {
                        debug!(%conn, %peer, %error, "read failed");
                        break Then::End("read failed");
                    }
                    Err(ReadError::Frame(error)) => {
                        reading = false;
                        ConnEvent::Invalid(error)
                    }
                };
                if events.send(Inbound { conn, event }).await.is_err() {
                    break Then::End("server stopped");
                }
            }
            () = sleep_until(read_deadline.unwrap_or_else(far_future)), if timer_armed => {
                break Then::End("read timed out");
            }
            out = outbound.recv() => match out {
                Some(Outbound::Send(msg)) => {
                    buf.clear();
                    if let Err(error) = msg.encode(&mut buf) {
                        warn!(%conn, %error, "could not encode a frame");
                        break Then::End("encode failed");
                    }
                    match timeout(timeouts.write, wr.write_all(&buf)).await {
                        Ok(Ok(())) => {}
                        Ok(Err(error)) => {
                            debug!(%conn, %peer, %error, "write failed");
                            break Then::End("write failed");
                        }
                        Err(_) => break Then::End("write timed out"),
                    }
                }
                Some(Outbound::Close) | None => {
                    let _ = timeout(timeouts.write, wr.shutdown()).await;
                    break Then::End("closed by the server");
                }
                Some(Outbound::HandOver(give)) => break Then::HandOver(give),
                Some(Outbound::Splice(take)) => break Then::Splice(take),
            },
        }
    };
    let closed = Inbound {
        conn,
        event: ConnEvent::Closed,
    };
    match then {
        Then::End(why) => {
            debug!(%conn, %peer, why, "connection ended");
            let _ = events.send(closed).await;
        }
        Then::HandOver(give) => {
            let _ = events.send(closed).await;
            if let Ok(stream) = rd.reunite(wr) {
                // If the splicing side is gone, the socket is dropped (closed) here.
                let _ = give.send(stream);
            }
        }
        Then::Splice(take) => {
            let _ = events.send(closed).await;
            let Ok(mut mine) = rd.reunite(wr) else {
                return;
            };
            let Ok(Ok(mut theirs)) = timeout(timeouts.write, take).await else {
                debug!(%conn, %peer, "relay mirror never came");
                return;
            };
            let _ = theirs.set_nodelay(true);
            let buf = timeouts.relay_buffer;
            match tokio::io::copy_bidirectional_with_sizes(&mut mine, &mut theirs, buf, buf).await {
                Ok((up, down)) => debug!(%conn, %peer, up, down, "relay ended"),
                Err(error) => debug!(%conn, %peer, %error, "relay ended"),
            }
        }
    }
}

/// A wake-up time that never comes in practice, for timers that are not armed.
fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(86_400 * 365)
}
