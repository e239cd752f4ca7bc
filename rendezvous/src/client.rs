//! The client side: register one rank and wait for the job's peer table.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use fmi_channels::JobId;
use tokio::net::TcpStream;
use tokio::time::{sleep_until, timeout_at, Instant};
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
        let mut session = Session {
            server,
            req: &req,
            deadline,
            ask_at,
            missing: None,
        };
        match session.run(&frame).await {
            Ok(table) => return Ok(table),
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
struct Session<'a> {
    server: SocketAddr,
    req: &'a Registration,
    deadline: Instant,
    ask_at: Instant,
    /// The last missing-rank list the server sent on this connection.
    missing: Option<Vec<u32>>,
}

impl Session<'_> {
    async fn run(&mut self, register: &[u8]) -> Result<PeerTable, End> {
        let stream = match timeout_at(self.deadline, TcpStream::connect(self.server)).await {
            Err(_) => return Err(End::Deadline),
            Ok(Err(error)) => return Err(End::Retry(error)),
            Ok(Ok(stream)) => stream,
        };
        let _ = stream.set_nodelay(true);
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
                                return self.finish(rows, &wr);
                            }
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
        // courtesy, so it must not delay the caller.
        let mut leave = Vec::new();
        if ClientMsg::Leave.encode(&mut leave).is_ok() {
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
