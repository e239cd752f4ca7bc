//! The rendezvous server's logic as a sans-IO state machine.
//!
//! [`ServerState`] owns no socket and reads no clock. Its driver feeds it what happened — a
//! decoded message, an undecodable frame, a closed connection, the passing of time — each with
//! the current [`Instant`], and then drains [`Action`]s: frames to send, connections to close,
//! events to log. That keeps every rule (job isolation, token checks, expiry, memory bounds)
//! testable with a fake clock and no network, and lets the later hole-punch and relay
//! coordination grow here as new inputs and actions without touching the driver's shape.
//!
//! ```text
//!  driver ── handle_message / handle_invalid / handle_closed / handle_timeout(now) ──▶ ServerState
//!  driver ◀────────────── poll_action: Send | Close | Event ────────────────────────── ServerState
//!  driver ◀────────────── poll_timeout: when to call handle_timeout next ───────────── ServerState
//! ```
//!
//! A job lives in two phases: *gathering* (ranks register; each live connection holds one rank,
//! and a rank whose connection goes away becomes missing again) and *complete* (every rank got
//! the table; the job is remembered for [`ServerConfig::finished_linger`] to refuse late
//! duplicates). A job still gathering [`ServerConfig::job_ttl`] after its first registration is
//! abandoned.
//!
//! ## NAT traversal
//! A rank that sent `Hold` stays *attached* after completion, and a complete job with attached
//! ranks is kept (its linger renews) until the last of them goes. For each connection the driver
//! reports the address it saw the connection come from ([`ServerState::handle_accepted`]): for a
//! rank behind a NAT that is its public endpoint.
//!
//! ```text
//!  A ── Connect{B} ──▶ server ── Punch{B, public_B, private_B, start_in} ──▶ A
//!                            └── Punch{A, public_A, private_A, start_in} ──▶ B    (same instant)
//!
//!  A' ── Relay{job,A,B,token} ──▶ server ── RelayOffer{A} ──▶ B (held connection)
//!  B' ── Relay{job,B,A,token} ──▶ server ── Relayed{B} ──▶ A',  Relayed{A} ──▶ B',
//!                                           Splice{A', B'}        (a pending side expires after
//!                                                                  ServerConfig::relay_timeout)
//! ```
//! Only a rank attached to a complete job, presenting the job's token, may relay, and only to a
//! rank of that job; a connection is spliced with exactly the one connection of the mirror pair.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use fmi_channels::JobId;

use crate::wire::{
    peer_table_parts, ClientMsg, DecodeError, Endpoint, RefuseReason, ServerMsg, Token, MAX_RANKS,
    VERSION,
};
use crate::ServerConfig;

/// The driver's name for one client connection. Ids must not be reused while the state machine
/// may still know the connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(pub u64);

impl fmt::Display for ConnId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "conn#{}", self.0)
    }
}

/// Something the driver must do, in the order given.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Action {
    /// Send `msg` on `conn`. Shared, because a peer table goes to every rank of a job.
    Send {
        /// The connection.
        conn: ConnId,
        /// The message.
        msg: Arc<ServerMsg>,
    },
    /// Close `conn` once the frames queued before this action are written.
    Close {
        /// The connection.
        conn: ConnId,
    },
    /// Once the frames queued before this action are written to each, stop treating `a` and
    /// `b` as protocol connections and copy bytes between them both ways (a relay) until either
    /// ends. The state machine forgets both.
    Splice {
        /// One relay connection.
        a: ConnId,
        /// The mirror relay connection.
        b: ConnId,
    },
    /// Something worth logging happened.
    Event(Event),
}

/// What happened, for logs and metrics. Never carries a token.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// A rank registered.
    Registered {
        /// The rank's connection.
        conn: ConnId,
        /// The job.
        job: JobId,
        /// The rank.
        rank: u32,
        /// The job's size.
        size: u32,
    },
    /// A client was refused (and its connection closed).
    Refused {
        /// The connection.
        conn: ConnId,
        /// The job, when the client named one.
        job: Option<JobId>,
        /// The rank, when the client named one.
        rank: Option<u32>,
        /// Why.
        reason: RefuseReason,
    },
    /// A rank of a gathering job left or lost its connection; it is missing again.
    Left {
        /// The connection.
        conn: ConnId,
        /// The job.
        job: JobId,
        /// The rank.
        rank: u32,
    },
    /// Every rank of a job registered and was sent the peer table.
    Completed {
        /// The job.
        job: JobId,
        /// Its size.
        size: u32,
    },
    /// A job was still incomplete when its time ran out and was removed.
    Expired {
        /// The job.
        job: JobId,
        /// How many ranks had registered.
        registered: u32,
        /// Its size.
        size: u32,
    },
    /// A completed job was forgotten after lingering.
    Removed {
        /// The job.
        job: JobId,
    },
    /// Both ranks of a pair were told to punch towards each other.
    Punch {
        /// The job.
        job: JobId,
        /// The rank that asked.
        from: u32,
        /// The other rank.
        to: u32,
    },
    /// A rank opened a relay connection and waits for its peer's.
    RelayWaiting {
        /// The job.
        job: JobId,
        /// The waiting rank.
        from: u32,
        /// The rank it waits for.
        to: u32,
    },
    /// Two relay connections were spliced.
    Relayed {
        /// The job.
        job: JobId,
        /// The lower rank of the pair.
        a: u32,
        /// The higher rank of the pair.
        b: u32,
    },
}

/// What a `Register` asks for, besides the job.
struct Claim {
    rank: u32,
    size: u32,
    endpoints: Vec<Endpoint>,
    token: Token,
}

/// Where a registered connection sits.
#[derive(Clone, Debug)]
struct Seat {
    job: JobId,
    rank: u32,
}

#[derive(Debug)]
struct Member {
    conn: ConnId,
    endpoints: Vec<Endpoint>,
}

/// A relay connection waiting for its mirror.
#[derive(Debug)]
struct PendingRelay {
    conn: ConnId,
    until: Option<Instant>,
}

/// Identifies one direction of a relayed pair: (job, from, to).
type RelayKey = (JobId, u32, u32);

#[derive(Debug)]
enum Phase {
    Gathering {
        members: BTreeMap<u32, Member>,
    },
    Complete {
        /// The connections of ranks still attached, so that they can be closed when the job is
        /// forgotten.
        conns: BTreeMap<u32, ConnId>,
        /// The peer table (index = rank), for `Punch`.
        table: Vec<Vec<Endpoint>>,
        /// When each pair (lower rank, higher rank) was last told to punch.
        punched: HashMap<(u32, u32), Instant>,
    },
}

#[derive(Debug)]
struct Job {
    size: u32,
    token: Token,
    /// Ranks that sent `Hold`: they stay attached after completion.
    held: BTreeSet<u32>,
    /// When the current phase ends (`None`: a duration so long it overflows the clock).
    until: Option<Instant>,
    phase: Phase,
}

/// The rendezvous server without I/O: see the [module docs](self).
#[derive(Debug)]
pub struct ServerState {
    config: ServerConfig,
    jobs: HashMap<JobId, Job>,
    seats: HashMap<ConnId, Seat>,
    /// The address each live connection came from, as the driver saw it.
    observed: HashMap<ConnId, SocketAddr>,
    relays: HashMap<RelayKey, PendingRelay>,
    relay_conns: HashMap<ConnId, RelayKey>,
    actions: VecDeque<Action>,
}

impl ServerState {
    /// A server with no jobs. `max_ranks_per_job` is capped at [`MAX_RANKS`].
    pub fn new(mut config: ServerConfig) -> ServerState {
        config.max_ranks_per_job = config.max_ranks_per_job.min(MAX_RANKS);
        ServerState {
            config,
            jobs: HashMap::new(),
            seats: HashMap::new(),
            observed: HashMap::new(),
            relays: HashMap::new(),
            relay_conns: HashMap::new(),
            actions: VecDeque::new(),
        }
    }

    /// How many relay connections wait for their mirror.
    pub fn pending_relays(&self) -> usize {
        self.relays.len()
    }

    /// A connection was accepted from `observed` (the peer address of the socket: behind a NAT,
    /// the NAT's public side). Recorded until the connection closes, and handed to the peers of
    /// a rank that registers on it and holds.
    pub fn handle_accepted(&mut self, conn: ConnId, observed: SocketAddr, _now: Instant) {
        self.observed.insert(conn, observed);
    }

    /// The address `conn` was accepted from, if the driver reported it.
    pub fn observed(&self, conn: ConnId) -> Option<SocketAddr> {
        self.observed.get(&conn).copied()
    }

    /// The configuration in force.
    pub fn config(&self) -> &ServerConfig {
        &self.config
    }

    /// How many jobs are held (gathering or complete).
    pub fn job_count(&self) -> usize {
        self.jobs.len()
    }

    /// How many connections hold a registration.
    pub fn registered_count(&self) -> usize {
        self.seats.len()
    }

    /// A message arrived on `conn`.
    pub fn handle_message(&mut self, conn: ConnId, msg: ClientMsg, now: Instant) {
        match msg {
            ClientMsg::Register {
                job,
                rank,
                size,
                endpoints,
                token,
            } => self.register(
                conn,
                job,
                Claim {
                    rank,
                    size,
                    endpoints,
                    token,
                },
                now,
            ),
            ClientMsg::Status => self.status(conn),
            ClientMsg::Leave => {
                self.detach(conn);
                self.actions.push_back(Action::Close { conn });
            }
            ClientMsg::Hold => self.hold(conn),
            ClientMsg::Connect { peer } => self.connect(conn, peer, now),
            ClientMsg::Relay {
                job,
                from,
                to,
                token,
            } => self.relay(conn, job, (from, to), &token, now),
        }
    }

    /// A frame on `conn` could not be decoded (or announced an oversized length). The stream
    /// cannot be trusted past it, so the client is refused and disconnected.
    pub fn handle_invalid(&mut self, conn: ConnId, error: &DecodeError, _now: Instant) {
        let reason = match error {
            DecodeError::UnsupportedVersion { .. } => {
                RefuseReason::UnsupportedVersion { supported: VERSION }
            }
            DecodeError::TooLarge { len, max } => RefuseReason::TooLarge {
                len: u32::try_from(*len).unwrap_or(u32::MAX),
                max: u32::try_from(*max).unwrap_or(u32::MAX),
            },
            _ => RefuseReason::Malformed,
        };
        let seat = self.seats.get(&conn).cloned();
        self.refuse(
            conn,
            seat.as_ref().map(|s| s.job.clone()),
            seat.map(|s| s.rank),
            reason,
        );
    }

    /// `conn` is gone (closed by the client, broken, or timed out by the driver). Its rank
    /// becomes missing again if its job is still gathering. Unknown connections are ignored.
    pub fn handle_closed(&mut self, conn: ConnId, _now: Instant) {
        self.detach(conn);
        self.observed.remove(&conn);
        self.drop_relay(conn);
    }

    /// Time has passed: abandons jobs gathering past their TTL and forgets completed jobs whose
    /// linger is over.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.expire_relays(now);
        let due: Vec<JobId> = self
            .jobs
            .iter()
            .filter(|(_, job)| job.until.is_some_and(|t| t <= now))
            .map(|(id, _)| id.clone())
            .collect();
        for id in due {
            let Some(mut job) = self.jobs.remove(&id) else {
                continue;
            };
            if let Phase::Complete { conns, .. } = &mut job.phase {
                // Attached ranks keep the job alive: only the others are let go.
                if conns.keys().any(|r| job.held.contains(r)) {
                    let held = &job.held;
                    let (keep, close): (BTreeMap<u32, ConnId>, BTreeMap<u32, ConnId>) =
                        std::mem::take(conns)
                            .into_iter()
                            .partition(|(r, _)| held.contains(r));
                    *conns = keep;
                    for conn in close.into_values() {
                        self.seats.remove(&conn);
                        self.actions.push_back(Action::Close { conn });
                    }
                    job.until = now.checked_add(self.config.finished_linger);
                    self.jobs.insert(id, job);
                    continue;
                }
            }
            match job.phase {
                Phase::Gathering { members } => {
                    let expired = Arc::new(ServerMsg::Refused {
                        reason: RefuseReason::JobExpired,
                    });
                    for member in members.values() {
                        self.seats.remove(&member.conn);
                        self.actions.push_back(Action::Send {
                            conn: member.conn,
                            msg: Arc::clone(&expired),
                        });
                        self.actions.push_back(Action::Close { conn: member.conn });
                    }
                    self.event(Event::Expired {
                        job: id,
                        registered: u32::try_from(members.len()).unwrap_or(u32::MAX),
                        size: job.size,
                    });
                }
                Phase::Complete { conns, .. } => {
                    for conn in conns.into_values() {
                        self.seats.remove(&conn);
                        self.actions.push_back(Action::Close { conn });
                    }
                    self.event(Event::Removed { job: id });
                }
            }
        }
    }

    /// When [`handle_timeout`](Self::handle_timeout) next has work to do, if ever.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let jobs = self.jobs.values().filter_map(|job| job.until);
        let relays = self.relays.values().filter_map(|r| r.until);
        jobs.chain(relays).min()
    }

    /// The next thing the driver must do.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    fn register(&mut self, conn: ConnId, id: JobId, claim: Claim, now: Instant) {
        let (rank, size) = (claim.rank, claim.size);
        if self.seats.contains_key(&conn) {
            return self.refuse(conn, Some(id), Some(rank), RefuseReason::UnexpectedMessage);
        }
        match self.admit(conn, &id, claim, now) {
            Err(reason) => self.refuse(conn, Some(id), Some(rank), reason),
            Ok(complete) => {
                self.seats.insert(
                    conn,
                    Seat {
                        job: id.clone(),
                        rank,
                    },
                );
                self.event(Event::Registered {
                    conn,
                    job: id.clone(),
                    rank,
                    size,
                });
                if complete {
                    self.complete(&id, now);
                } else {
                    self.send_missing(conn, &id);
                }
            }
        }
    }

    /// Adds the rank to its job if every rule allows; returns whether the job is now complete.
    fn admit(
        &mut self,
        conn: ConnId,
        id: &JobId,
        claim: Claim,
        now: Instant,
    ) -> Result<bool, RefuseReason> {
        let Claim {
            rank,
            size,
            endpoints,
            token,
        } = claim;
        if rank >= size {
            return Err(RefuseReason::InvalidRank { rank, size });
        }
        if size > self.config.max_ranks_per_job {
            return Err(RefuseReason::JobTooLarge {
                size,
                max: self.config.max_ranks_per_job,
            });
        }
        let member = Member { conn, endpoints };
        let Some(job) = self.jobs.get_mut(id) else {
            if self.jobs.len() >= self.config.max_jobs {
                return Err(RefuseReason::ServerFull);
            }
            self.jobs.insert(
                id.clone(),
                Job {
                    size,
                    token,
                    held: BTreeSet::new(),
                    until: now.checked_add(self.config.job_ttl),
                    phase: Phase::Gathering {
                        members: BTreeMap::from([(rank, member)]),
                    },
                },
            );
            return Ok(size == 1);
        };
        // The token is checked first so that a client without it learns nothing about the job,
        // not even its size or which ranks are taken.
        if !job.token.ct_eq(&token) {
            return Err(RefuseReason::BadToken);
        }
        let Phase::Gathering { members } = &mut job.phase else {
            return Err(RefuseReason::JobComplete);
        };
        if size != job.size {
            return Err(RefuseReason::SizeMismatch {
                expected: job.size,
                got: size,
            });
        }
        if members.contains_key(&rank) {
            return Err(RefuseReason::DuplicateRank { rank });
        }
        members.insert(rank, member);
        Ok(members.len() == job.size as usize)
    }

    /// Sends every rank the table and moves the job to its complete phase.
    fn complete(&mut self, id: &JobId, now: Instant) {
        let Some(job) = self.jobs.get_mut(id) else {
            return;
        };
        let Phase::Gathering { members } = &mut job.phase else {
            return;
        };
        let members = std::mem::take(members);
        let mut conns = BTreeMap::new();
        let mut table = Vec::with_capacity(members.len());
        for (rank, member) in members {
            conns.insert(rank, member.conn);
            table.push(member.endpoints);
        }
        let parts: Vec<Arc<ServerMsg>> =
            peer_table_parts(&table).into_iter().map(Arc::new).collect();
        for &conn in conns.values() {
            for part in &parts {
                self.actions.push_back(Action::Send {
                    conn,
                    msg: Arc::clone(part),
                });
            }
        }
        job.phase = Phase::Complete {
            conns,
            table,
            punched: HashMap::new(),
        };
        job.until = now.checked_add(self.config.finished_linger);
        let size = job.size;
        self.event(Event::Completed {
            job: id.clone(),
            size,
        });
    }

    fn status(&mut self, conn: ConnId) {
        let Some(seat) = self.seats.get(&conn) else {
            return self.refuse(conn, None, None, RefuseReason::UnexpectedMessage);
        };
        let id = seat.job.clone();
        // A complete job's ranks already have (or are being sent) the table: nothing to report.
        self.send_missing(conn, &id);
    }

    fn send_missing(&mut self, conn: ConnId, id: &JobId) {
        let Some(Job {
            size,
            phase: Phase::Gathering { members },
            ..
        }) = self.jobs.get(id)
        else {
            return;
        };
        let ranks = (0..*size).filter(|r| !members.contains_key(r)).collect();
        self.actions.push_back(Action::Send {
            conn,
            msg: Arc::new(ServerMsg::Missing { ranks }),
        });
    }

    /// Sends the refusal, then closes the connection and drops any registration it held.
    fn refuse(
        &mut self,
        conn: ConnId,
        job: Option<JobId>,
        rank: Option<u32>,
        reason: RefuseReason,
    ) {
        self.detach(conn);
        self.actions.push_back(Action::Send {
            conn,
            msg: Arc::new(ServerMsg::Refused {
                reason: reason.clone(),
            }),
        });
        self.actions.push_back(Action::Close { conn });
        self.event(Event::Refused {
            conn,
            job,
            rank,
            reason,
        });
    }

    /// Forgets `conn`'s registration, if any.
    fn detach(&mut self, conn: ConnId) {
        let Some(Seat { job: id, rank }) = self.seats.remove(&conn) else {
            return;
        };
        let Some(job) = self.jobs.get_mut(&id) else {
            return;
        };
        job.held.remove(&rank);
        match &mut job.phase {
            Phase::Gathering { members } => {
                members.remove(&rank);
                // An empty gathering job holds nothing worth keeping, and removing it frees its
                // slot and lets a corrected first registration (say, another size) start afresh.
                if members.is_empty() {
                    self.jobs.remove(&id);
                }
                self.event(Event::Left {
                    conn,
                    job: id,
                    rank,
                });
            }
            Phase::Complete { conns, .. } => {
                conns.remove(&rank);
            }
        }
    }

    /// `Hold`: the connection's rank stays attached after completion.
    fn hold(&mut self, conn: ConnId) {
        let Some(seat) = self.seats.get(&conn) else {
            return self.refuse(conn, None, None, RefuseReason::UnexpectedMessage);
        };
        if let Some(job) = self.jobs.get_mut(&seat.job) {
            job.held.insert(seat.rank);
        }
    }

    /// The attached (held, still connected) rank `rank` of a complete job: its connection.
    fn attached(job: &Job, rank: u32) -> Option<ConnId> {
        match &job.phase {
            Phase::Complete { conns, .. } if job.held.contains(&rank) => conns.get(&rank).copied(),
            _ => None,
        }
    }

    /// `Connect{peer}`: tells both ranks to punch, or the asker that the peer is not there.
    fn connect(&mut self, conn: ConnId, peer: u32, now: Instant) {
        let Some(Seat { job: id, rank: me }) = self.seats.get(&conn).cloned() else {
            return self.refuse(conn, None, None, RefuseReason::UnexpectedMessage);
        };
        let Some(job) = self.jobs.get_mut(&id) else {
            return self.refuse(conn, Some(id), Some(me), RefuseReason::NotAttached);
        };
        if Self::attached(job, me) != Some(conn) || peer >= job.size || peer == me {
            return self.refuse(conn, Some(id), Some(me), RefuseReason::NotAttached);
        }
        let Some(peer_conn) = Self::attached(job, peer) else {
            self.actions.push_back(Action::Send {
                conn,
                msg: Arc::new(ServerMsg::NoPeer { peer }),
            });
            return;
        };
        let Phase::Complete { table, punched, .. } = &mut job.phase else {
            return;
        };
        let pair = (me.min(peer), me.max(peer));
        // Both sides were told moments ago (each side may ask for the same pair at once):
        // repeating it would only restart their attempts.
        if let Some(&last) = punched.get(&pair) {
            if now.saturating_duration_since(last) < self.config.punch_interval {
                return;
            }
        }
        punched.insert(pair, now);
        let row = |r: u32| table.get(r as usize).cloned().unwrap_or_default();
        let start_in = self.config.punch_lead;
        let to_me = ServerMsg::Punch {
            peer,
            public: self.observed.get(&peer_conn).copied(),
            private: row(peer),
            start_in,
        };
        let to_peer = ServerMsg::Punch {
            peer: me,
            public: self.observed.get(&conn).copied(),
            private: row(me),
            start_in,
        };
        self.actions.push_back(Action::Send {
            conn,
            msg: Arc::new(to_me),
        });
        self.actions.push_back(Action::Send {
            conn: peer_conn,
            msg: Arc::new(to_peer),
        });
        self.event(Event::Punch {
            job: id,
            from: me,
            to: peer,
        });
    }

    /// `Relay{job, from, to, token}` on a fresh connection: pairs it with its mirror or waits.
    fn relay(
        &mut self,
        conn: ConnId,
        id: JobId,
        (from, to): (u32, u32),
        token: &Token,
        now: Instant,
    ) {
        let refuse =
            |state: &mut Self, reason| state.refuse(conn, Some(id.clone()), Some(from), reason);
        if self.seats.contains_key(&conn) || self.relay_conns.contains_key(&conn) {
            return refuse(self, RefuseReason::UnexpectedMessage);
        }
        let Some(job) = self.jobs.get(&id) else {
            return refuse(self, RefuseReason::UnknownJob);
        };
        // As for registrations, nothing about the job is revealed without its token.
        if !job.token.ct_eq(token) {
            return refuse(self, RefuseReason::BadToken);
        }
        if !matches!(job.phase, Phase::Complete { .. }) {
            return refuse(self, RefuseReason::UnknownJob);
        }
        if from == to || Self::attached(job, from).is_none() {
            return refuse(self, RefuseReason::NotAttached);
        }
        let Some(peer_conn) = Self::attached(job, to) else {
            return refuse(self, RefuseReason::NotAttached);
        };
        if let Some(mirror) = self.relays.remove(&(id.clone(), to, from)) {
            self.relay_conns.remove(&mirror.conn);
            self.actions.push_back(Action::Send {
                conn: mirror.conn,
                msg: Arc::new(ServerMsg::Relayed { peer: from }),
            });
            self.actions.push_back(Action::Send {
                conn,
                msg: Arc::new(ServerMsg::Relayed { peer: to }),
            });
            self.actions.push_back(Action::Splice {
                a: mirror.conn,
                b: conn,
            });
            self.event(Event::Relayed {
                job: id,
                a: from.min(to),
                b: from.max(to),
            });
            return;
        }
        let key = (id.clone(), from, to);
        let pending = PendingRelay {
            conn,
            until: now.checked_add(self.config.relay_timeout),
        };
        // A rank that retries replaces its earlier, abandoned attempt.
        if let Some(old) = self.relays.insert(key.clone(), pending) {
            self.relay_conns.remove(&old.conn);
            self.actions.push_back(Action::Close { conn: old.conn });
        }
        self.relay_conns.insert(conn, key);
        self.actions.push_back(Action::Send {
            conn: peer_conn,
            msg: Arc::new(ServerMsg::RelayOffer { peer: from }),
        });
        self.event(Event::RelayWaiting { job: id, from, to });
    }

    /// Forgets a pending relay connection that went away.
    fn drop_relay(&mut self, conn: ConnId) {
        if let Some(key) = self.relay_conns.remove(&conn) {
            if self.relays.get(&key).is_some_and(|p| p.conn == conn) {
                self.relays.remove(&key);
            }
        }
    }

    fn expire_relays(&mut self, now: Instant) {
        let due: Vec<RelayKey> = self
            .relays
            .iter()
            .filter(|(_, p)| p.until.is_some_and(|t| t <= now))
            .map(|(k, _)| k.clone())
            .collect();
        for key in due {
            let Some(pending) = self.relays.remove(&key) else {
                continue;
            };
            self.relay_conns.remove(&pending.conn);
            let (job, from, _) = key;
            self.refuse(
                pending.conn,
                Some(job),
                Some(from),
                RefuseReason::RelayTimeout,
            );
        }
    }

    fn event(&mut self, event: Event) {
        self.actions.push_back(Action::Event(event));
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// A deterministic harness: a fake clock and helpers that register and collect actions.
    struct Harness {
        state: ServerState,
        t0: Instant,
        now: Instant,
    }

    const TOKEN: &str = "tok-of-job";

    fn job(s: &str) -> JobId {
        JobId::new(s).unwrap()
    }

    fn ep(s: &str) -> Endpoint {
        Endpoint::new(s).unwrap()
    }

    fn reg(j: &str, rank: u32, size: u32, token: &str) -> ClientMsg {
        ClientMsg::Register {
            job: job(j),
            rank,
            size,
            endpoints: vec![ep(&format!("{j}/r{rank}"))],
            token: Token::new(token).unwrap(),
        }
    }

    impl Harness {
        fn new() -> Harness {
            Self::with(ServerConfig::default())
        }

        fn with(config: ServerConfig) -> Harness {
            let t0 = Instant::now();
            Harness {
                state: ServerState::new(config),
                t0,
                now: t0,
            }
        }

        fn advance(&mut self, d: Duration) {
            self.now += d;
            self.state.handle_timeout(self.now);
        }

        fn send(&mut self, conn: u64, msg: ClientMsg) -> Vec<Action> {
            self.state.handle_message(ConnId(conn), msg, self.now);
            self.drain()
        }

        fn drain(&mut self) -> Vec<Action> {
            std::iter::from_fn(|| self.state.poll_action()).collect()
        }
    }

    /// The messages sent to `conn`, in order.
    fn sent_to(actions: &[Action], conn: u64) -> Vec<ServerMsg> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Send { conn: c, msg } if *c == ConnId(conn) => Some((**msg).clone()),
                _ => None,
            })
            .collect()
    }

    fn closed(actions: &[Action], conn: u64) -> bool {
        actions
            .iter()
            .any(|a| matches!(a, Action::Close { conn: c } if *c == ConnId(conn)))
    }

    fn refusal(actions: &[Action], conn: u64) -> Option<RefuseReason> {
        sent_to(actions, conn).into_iter().find_map(|m| match m {
            ServerMsg::Refused { reason } => Some(reason),
            _ => None,
        })
    }

    fn table_of(actions: &[Action], conn: u64) -> Option<Vec<Vec<Endpoint>>> {
        let mut rows = Vec::new();
        for msg in sent_to(actions, conn) {
            if let ServerMsg::Peers {
                first, endpoints, ..
            } = msg
            {
                assert_eq!(first as usize, rows.len());
                rows.extend(endpoints);
            }
        }
        (!rows.is_empty()).then_some(rows)
    }

    #[test]
    fn all_ranks_get_the_same_table_once_the_last_registers() {
        for size in [1u32, 2, 5] {
            let mut h = Harness::new();
            let mut actions = Vec::new();
            // Register in reverse order: the table must still be indexed by rank.
            for rank in (0..size).rev() {
                let got = h.send(u64::from(rank), reg("j", rank, size, TOKEN));
                if rank > 0 {
                    assert_eq!(
                        sent_to(&got, u64::from(rank)),
                        vec![ServerMsg::Missing {
                            ranks: (0..rank).collect()
                        }]
                    );
                }
                actions.extend(got);
            }
            let expected: Vec<Vec<Endpoint>> =
                (0..size).map(|r| vec![ep(&format!("j/r{r}"))]).collect();
            for rank in 0..size {
                assert_eq!(table_of(&actions, u64::from(rank)), Some(expected.clone()));
            }
            assert!(actions.contains(&Action::Event(Event::Completed {
                job: job("j"),
                size
            })));
        }
    }

    #[test]
    fn jobs_with_the_same_ranks_stay_apart() {
        let mut h = Harness::new();
        let mut actions = Vec::new();
        actions.extend(h.send(1, reg("a", 0, 2, TOKEN)));
        actions.extend(h.send(2, reg("b", 0, 2, "other")));
        actions.extend(h.send(3, reg("b", 1, 2, "other")));
        actions.extend(h.send(4, reg("a", 1, 2, TOKEN)));
        for (conn, j) in [(1, "a"), (2, "b"), (3, "b"), (4, "a")] {
            let table = table_of(&actions, conn).unwrap();
            assert_eq!(
                table,
                vec![vec![ep(&format!("{j}/r0"))], vec![ep(&format!("{j}/r1"))]]
            );
        }
    }

    #[test]
    fn duplicate_rank_is_refused_while_the_first_is_live() {
        let mut h = Harness::new();
        h.send(1, reg("j", 0, 3, TOKEN));
        let got = h.send(2, reg("j", 0, 3, TOKEN));
        assert_eq!(
            refusal(&got, 2),
            Some(RefuseReason::DuplicateRank { rank: 0 })
        );
        assert!(closed(&got, 2));
        assert!(!closed(&got, 1), "the first holder keeps its rank");
        // Once the first holder is gone the rank may be taken again.
        h.send(3, reg("j", 1, 3, TOKEN));
        h.state.handle_closed(ConnId(1), h.now);
        h.drain();
        let got = h.send(4, reg("j", 0, 3, TOKEN));
        assert_eq!(
            sent_to(&got, 4),
            vec![ServerMsg::Missing { ranks: vec![2] }]
        );
    }

    #[test]
    fn size_mismatch_and_bad_ranks_are_refused() {
        let mut h = Harness::new();
        h.send(1, reg("j", 0, 3, TOKEN));
        let got = h.send(2, reg("j", 1, 4, TOKEN));
        assert_eq!(
            refusal(&got, 2),
            Some(RefuseReason::SizeMismatch {
                expected: 3,
                got: 4
            })
        );
        let got = h.send(3, reg("j", 3, 3, TOKEN));
        assert_eq!(
            refusal(&got, 3),
            Some(RefuseReason::InvalidRank { rank: 3, size: 3 })
        );
        let got = h.send(4, reg("k", 0, 0, TOKEN));
        assert_eq!(
            refusal(&got, 4),
            Some(RefuseReason::InvalidRank { rank: 0, size: 0 })
        );
        let got = h.send(5, reg("k", 0, 5000, TOKEN));
        assert_eq!(
            refusal(&got, 5),
            Some(RefuseReason::JobTooLarge {
                size: 5000,
                max: 4096
            })
        );
        assert_eq!(h.state.job_count(), 1);
    }

    #[test]
    fn wrong_token_is_refused_before_anything_about_the_job_is_revealed() {
        let mut h = Harness::new();
        h.send(1, reg("j", 0, 3, TOKEN));
        // Wrong size *and* a taken rank: the client still learns only that its token is wrong.
        let got = h.send(2, reg("j", 0, 7, "guess"));
        assert_eq!(refusal(&got, 2), Some(RefuseReason::BadToken));
        let logged = format!("{got:?}{:?}", h.state);
        assert!(!logged.contains("guess") && !logged.contains(TOKEN));
    }

    #[test]
    fn leaving_or_closing_makes_the_rank_missing_again() {
        let mut h = Harness::new();
        h.send(1, reg("j", 0, 3, TOKEN));
        h.send(2, reg("j", 1, 3, TOKEN));
        let got = h.send(2, ClientMsg::Leave);
        assert!(closed(&got, 2));
        let got = h.send(1, ClientMsg::Status);
        assert_eq!(
            sent_to(&got, 1),
            vec![ServerMsg::Missing { ranks: vec![1, 2] }]
        );
        // When the last member goes, the job goes with it, and the id may start afresh.
        h.state.handle_closed(ConnId(1), h.now);
        assert_eq!(h.state.job_count(), 0);
        let got = h.send(3, reg("j", 0, 2, "new-token"));
        assert_eq!(
            sent_to(&got, 3),
            vec![ServerMsg::Missing { ranks: vec![1] }]
        );
    }

    #[test]
    fn abandoned_jobs_expire_after_the_ttl() {
        let mut h = Harness::new();
        h.send(1, reg("j", 0, 3, TOKEN));
        h.advance(Duration::from_secs(5));
        h.send(2, reg("j", 2, 3, TOKEN));
        assert_eq!(
            h.state.poll_timeout(),
            Some(h.t0 + Duration::from_secs(600))
        );
        h.advance(Duration::from_secs(594));
        assert!(h.drain().is_empty(), "nothing expires before the ttl");
        assert_eq!(h.state.job_count(), 1);
        h.advance(Duration::from_secs(1));
        let got = h.drain();
        for conn in [1, 2] {
            assert_eq!(refusal(&got, conn), Some(RefuseReason::JobExpired));
            assert!(closed(&got, conn));
        }
        assert!(got.contains(&Action::Event(Event::Expired {
            job: job("j"),
            registered: 2,
            size: 3
        })));
        assert_eq!(h.state.job_count(), 0);
        assert_eq!(h.state.registered_count(), 0);
        assert_eq!(h.state.poll_timeout(), None);
        // The late rank now starts a fresh job rather than completing a dead one.
        let got = h.send(3, reg("j", 1, 3, TOKEN));
        assert_eq!(
            sent_to(&got, 3),
            vec![ServerMsg::Missing { ranks: vec![0, 2] }]
        );
    }

    #[test]
    fn completed_jobs_refuse_late_ranks_then_are_forgotten() {
        let mut h = Harness::with(ServerConfig {
            finished_linger: Duration::from_secs(30),
            ..ServerConfig::default()
        });
        h.send(1, reg("j", 0, 2, TOKEN));
        h.send(2, reg("j", 1, 2, TOKEN));
        h.send(1, ClientMsg::Leave);
        // A restarted rank 1 (its old connection still open) and a rerun rank 0.
        let got = h.send(3, reg("j", 1, 2, TOKEN));
        assert_eq!(refusal(&got, 3), Some(RefuseReason::JobComplete));
        let got = h.send(4, reg("j", 0, 2, TOKEN));
        assert_eq!(refusal(&got, 4), Some(RefuseReason::JobComplete));
        h.advance(Duration::from_secs(30));
        let got = h.drain();
        assert!(closed(&got, 2), "connections still open are closed");
        assert!(got.contains(&Action::Event(Event::Removed { job: job("j") })));
        assert_eq!(h.state.job_count(), 0);
        assert_eq!(h.state.registered_count(), 0);
    }

    #[test]
    fn the_number_of_jobs_is_bounded() {
        let mut h = Harness::with(ServerConfig {
            max_jobs: 2,
            ..ServerConfig::default()
        });
        h.send(1, reg("a", 0, 2, TOKEN));
        h.send(2, reg("b", 0, 2, TOKEN));
        let got = h.send(3, reg("c", 0, 2, TOKEN));
        assert_eq!(refusal(&got, 3), Some(RefuseReason::ServerFull));
        // Joining an existing job is still fine.
        let got = h.send(4, reg("a", 1, 2, TOKEN));
        assert!(table_of(&got, 4).is_some());
    }

    #[test]
    fn out_of_place_and_undecodable_messages_are_refused() {
        let mut h = Harness::new();
        let got = h.send(1, ClientMsg::Status);
        assert_eq!(refusal(&got, 1), Some(RefuseReason::UnexpectedMessage));
        h.send(2, reg("j", 0, 2, TOKEN));
        let got = h.send(2, reg("j", 1, 2, TOKEN));
        assert_eq!(refusal(&got, 2), Some(RefuseReason::UnexpectedMessage));
        assert_eq!(
            h.state.job_count(),
            0,
            "the refused client's rank is released"
        );

        let cases = [
            (DecodeError::Truncated, RefuseReason::Malformed),
            (
                DecodeError::TooLarge {
                    len: 1 << 20,
                    max: 65536,
                },
                RefuseReason::TooLarge {
                    len: 1 << 20,
                    max: 65536,
                },
            ),
            (
                DecodeError::UnsupportedVersion {
                    got: 9,
                    supported: VERSION,
                },
                RefuseReason::UnsupportedVersion { supported: VERSION },
            ),
        ];
        for (conn, (error, reason)) in (10..).zip(cases) {
            h.state.handle_invalid(ConnId(conn), &error, h.now);
            let got = h.drain();
            assert_eq!(refusal(&got, conn), Some(reason));
            assert!(closed(&got, conn));
        }
    }

    #[test]
    fn refusal_is_sent_before_the_close() {
        let mut h = Harness::new();
        let got = h.send(1, reg("j", 5, 2, TOKEN));
        let send = got
            .iter()
            .position(|a| matches!(a, Action::Send { .. }))
            .unwrap();
        let close = got
            .iter()
            .position(|a| matches!(a, Action::Close { .. }))
            .unwrap();
        assert!(send < close);
    }

    // ---- NAT traversal ----

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([203, 0, 113, 9], port))
    }

    /// Registers and holds ranks `0..size` of `j` on connections `base + rank`, each observed
    /// from port `base + rank`; returns the actions of the last registration.
    fn attach_all(h: &mut Harness, j: &str, size: u32, base: u64, token: &str) -> Vec<Action> {
        let mut last = Vec::new();
        for rank in 0..size {
            let conn = base + u64::from(rank);
            h.state
                .handle_accepted(ConnId(conn), addr(conn as u16), h.now);
            h.send(conn, reg(j, rank, size, token));
            last = h.send(conn, ClientMsg::Hold);
        }
        last
    }

    fn relay(j: &str, from: u32, to: u32, token: &str) -> ClientMsg {
        ClientMsg::Relay {
            job: job(j),
            from,
            to,
            token: Token::new(token).unwrap(),
        }
    }

    fn splices(actions: &[Action]) -> Vec<(u64, u64)> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Splice { a, b } => Some((a.0, b.0)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn connect_sends_both_ranks_the_others_observed_and_announced_endpoints() {
        let mut h = Harness::new();
        attach_all(&mut h, "j", 3, 10, TOKEN);
        let got = h.send(10, ClientMsg::Connect { peer: 2 });
        let punch = |peer: u32, port: u16| ServerMsg::Punch {
            peer,
            public: Some(addr(port)),
            private: vec![ep(&format!("j/r{peer}"))],
            start_in: ServerConfig::default().punch_lead,
        };
        assert_eq!(sent_to(&got, 10), vec![punch(2, 12)]);
        assert_eq!(sent_to(&got, 12), vec![punch(0, 10)]);
        assert!(sent_to(&got, 11).is_empty());
        // The other side asking at the same moment does not restart the punch ...
        assert!(h.send(12, ClientMsg::Connect { peer: 0 }).is_empty());
        // ... but asking again later does.
        h.advance(ServerConfig::default().punch_interval);
        let again = h.send(12, ClientMsg::Connect { peer: 0 });
        assert_eq!(sent_to(&again, 12), vec![punch(0, 10)]);
        assert_eq!(sent_to(&again, 10), vec![punch(2, 12)]);
    }

    #[test]
    fn connect_is_only_for_attached_ranks_and_ranks_of_the_job() {
        let mut h = Harness::new();
        // Rank 1 registers without Hold.
        h.state.handle_accepted(ConnId(1), addr(1), h.now);
        h.send(1, reg("j", 0, 2, TOKEN));
        h.send(1, ClientMsg::Hold);
        h.send(2, reg("j", 1, 2, TOKEN));
        let got = h.send(1, ClientMsg::Connect { peer: 1 });
        assert_eq!(sent_to(&got, 1), vec![ServerMsg::NoPeer { peer: 1 }]);
        let got = h.send(2, ClientMsg::Connect { peer: 0 });
        assert_eq!(refusal(&got, 2), Some(RefuseReason::NotAttached));
        let got = h.send(1, ClientMsg::Connect { peer: 7 });
        assert_eq!(refusal(&got, 1), Some(RefuseReason::NotAttached));
        let got = h.send(3, ClientMsg::Connect { peer: 0 });
        assert_eq!(refusal(&got, 3), Some(RefuseReason::UnexpectedMessage));
        let got = h.send(4, ClientMsg::Hold);
        assert_eq!(refusal(&got, 4), Some(RefuseReason::UnexpectedMessage));
    }

    #[test]
    fn held_ranks_keep_a_complete_job_alive_and_the_rest_are_let_go() {
        let mut h = Harness::with(ServerConfig {
            finished_linger: Duration::from_secs(30),
            ..ServerConfig::default()
        });
        h.send(1, reg("j", 0, 2, TOKEN));
        h.send(1, ClientMsg::Hold);
        h.send(2, reg("j", 1, 2, TOKEN));
        h.advance(Duration::from_secs(30));
        let got = h.drain();
        assert!(closed(&got, 2), "the rank that did not hold is let go");
        assert!(!closed(&got, 1), "the held rank stays");
        assert_eq!(h.state.job_count(), 1);
        h.advance(Duration::from_secs(3600));
        assert_eq!(h.state.job_count(), 1, "still held");
        h.state.handle_closed(ConnId(1), h.now);
        h.advance(Duration::from_secs(30));
        assert_eq!(
            h.state.job_count(),
            0,
            "forgotten a linger after the last one left"
        );
    }

    #[test]
    fn relay_connections_of_a_pair_are_spliced_and_the_peer_is_invited() {
        let mut h = Harness::new();
        attach_all(&mut h, "j", 2, 10, TOKEN);
        let got = h.send(20, relay("j", 0, 1, TOKEN));
        assert_eq!(sent_to(&got, 11), vec![ServerMsg::RelayOffer { peer: 0 }]);
        assert!(sent_to(&got, 20).is_empty(), "the first side waits");
        assert_eq!(h.state.pending_relays(), 1);
        let got = h.send(21, relay("j", 1, 0, TOKEN));
        assert_eq!(sent_to(&got, 20), vec![ServerMsg::Relayed { peer: 1 }]);
        assert_eq!(sent_to(&got, 21), vec![ServerMsg::Relayed { peer: 0 }]);
        assert_eq!(splices(&got), vec![(20, 21)]);
        let relayed = got
            .iter()
            .position(|a| matches!(a, Action::Send { conn, .. } if *conn == ConnId(21)))
            .unwrap();
        let splice = got
            .iter()
            .position(|a| matches!(a, Action::Splice { .. }))
            .unwrap();
        assert!(relayed < splice, "Relayed is written before the bytes flow");
        assert_eq!(h.state.pending_relays(), 0);
    }

    #[test]
    fn relays_are_refused_to_strangers_and_across_jobs() {
        let mut h = Harness::new();
        attach_all(&mut h, "a", 2, 10, TOKEN);
        attach_all(&mut h, "b", 2, 30, "b-token");
        h.send(50, reg("c", 0, 2, TOKEN)); // gathering
        let cases = [
            (relay("a", 0, 1, "wrong"), RefuseReason::BadToken),
            (relay("a", 0, 1, "b-token"), RefuseReason::BadToken),
            (relay("zz", 0, 1, TOKEN), RefuseReason::UnknownJob),
            (relay("c", 0, 1, TOKEN), RefuseReason::UnknownJob),
            (relay("a", 0, 0, TOKEN), RefuseReason::NotAttached),
            (relay("a", 0, 2, TOKEN), RefuseReason::NotAttached),
            (relay("a", 9, 1, TOKEN), RefuseReason::NotAttached),
        ];
        for (conn, (msg, reason)) in (60..).zip(cases) {
            let got = h.send(conn, msg);
            assert_eq!(refusal(&got, conn), Some(reason.clone()), "{reason:?}");
            assert!(closed(&got, conn));
            assert!(splices(&got).is_empty());
        }
        // Job b's pair (0 -> 1) does not meet job a's mirror (1 -> 0).
        h.send(70, relay("b", 0, 1, "b-token"));
        let got = h.send(71, relay("a", 1, 0, TOKEN));
        assert!(splices(&got).is_empty());
        assert_eq!(h.state.pending_relays(), 2);
        // A registered connection cannot turn itself into a relay (and loses its seat).
        let got = h.send(10, relay("a", 0, 1, TOKEN));
        assert_eq!(refusal(&got, 10), Some(RefuseReason::UnexpectedMessage));
    }

    #[test]
    fn a_relay_side_whose_peer_never_comes_times_out_and_retries_replace_old_attempts() {
        let mut h = Harness::new();
        attach_all(&mut h, "j", 2, 10, TOKEN);
        h.send(20, relay("j", 0, 1, TOKEN));
        // The same side again: the older attempt is closed, the new one waits.
        let got = h.send(21, relay("j", 0, 1, TOKEN));
        assert!(closed(&got, 20));
        assert_eq!(h.state.pending_relays(), 1);
        let timeout = ServerConfig::default().relay_timeout;
        assert_eq!(h.state.poll_timeout(), Some(h.now + timeout));
        h.advance(timeout);
        let got = h.drain();
        assert_eq!(refusal(&got, 21), Some(RefuseReason::RelayTimeout));
        assert!(closed(&got, 21));
        assert_eq!(h.state.pending_relays(), 0);
        // A waiting side that goes away is forgotten at once.
        h.send(22, relay("j", 1, 0, TOKEN));
        h.state.handle_closed(ConnId(22), h.now);
        assert_eq!(h.state.pending_relays(), 0);
        let got = h.send(23, relay("j", 0, 1, TOKEN));
        assert!(splices(&got).is_empty());
    }

    /// What a connection of the NAT proptest claimed: job index, relay direction (`None` for
    /// a registration) and whether its token was right.
    type Claimed = (usize, Option<(u32, u32)>, bool);

    #[derive(Clone, Debug)]
    enum NatOp {
        Attach {
            job: usize,
            rank: u32,
            good_token: bool,
        },
        Connect(proptest::sample::Index, u32),
        Relay {
            job: usize,
            from: u32,
            to: u32,
            good_token: bool,
        },
        Close(proptest::sample::Index),
        Advance(u64),
    }

    fn arb_nat_op() -> impl proptest::strategy::Strategy<Value = NatOp> {
        use proptest::prelude::*;
        prop_oneof![
            3 => (0usize..2, 0u32..3, proptest::bool::weighted(0.9))
                .prop_map(|(job, rank, good_token)| NatOp::Attach { job, rank, good_token }),
            2 => (any::<proptest::sample::Index>(), 0u32..4).prop_map(|(i, p)| NatOp::Connect(i, p)),
            3 => (0usize..2, 0u32..4, 0u32..4, proptest::bool::weighted(0.9))
                .prop_map(|(job, from, to, good_token)| NatOp::Relay { job, from, to, good_token }),
            1 => any::<proptest::sample::Index>().prop_map(NatOp::Close),
            1 => (0u64..20).prop_map(NatOp::Advance),
        ]
    }

    proptest::proptest! {
        /// Whatever clients do, a relay splices only two connections that claimed the mirror
        /// directions of one pair of one job with its token, and punches only ever name peers
        /// of the receiver's own job.
        #[test]
        fn relays_and_punches_never_cross_jobs(
            ops in proptest::collection::vec(arb_nat_op(), 1..120)
        ) {
            const JOBS: [&str; 2] = ["a", "b"];
            const SIZE: u32 = 3;
            let mut h = Harness::new();
            // What each connection claimed: (job, rank or relay (from, to), good token).
            let mut claims: Vec<Claimed> = Vec::new();
            for op in ops {
                let actions = match op {
                    NatOp::Attach { job, rank, good_token } => {
                        let conn = claims.len() as u64;
                        claims.push((job, None, good_token));
                        h.state.handle_accepted(ConnId(conn), addr(conn as u16), h.now);
                        let token = if good_token { JOBS[job] } else { "bad" };
                        let mut got = h.send(conn, reg(JOBS[job], rank, SIZE, token));
                        got.extend(h.send(conn, ClientMsg::Hold));
                        got
                    }
                    NatOp::Connect(i, peer) if !claims.is_empty() => {
                        h.send(i.index(claims.len()) as u64, ClientMsg::Connect { peer })
                    }
                    NatOp::Relay { job, from, to, good_token } => {
                        let conn = claims.len() as u64;
                        claims.push((job, Some((from, to)), good_token));
                        let token = if good_token { JOBS[job] } else { "bad" };
                        h.send(conn, relay(JOBS[job], from, to, token))
                    }
                    NatOp::Close(i) if !claims.is_empty() => {
                        h.state.handle_closed(ConnId(i.index(claims.len()) as u64), h.now);
                        h.drain()
                    }
                    NatOp::Advance(secs) => {
                        h.advance(Duration::from_secs(secs));
                        h.drain()
                    }
                    _ => Vec::new(),
                };
                for action in &actions {
                    match action {
                        Action::Splice { a, b } => {
                            let (ja, ra, ta) = claims[a.0 as usize];
                            let (jb, rb, tb) = claims[b.0 as usize];
                            proptest::prop_assert_eq!(ja, jb);
                            proptest::prop_assert!(ta && tb);
                            let ((fa, toa), (fb, tob)) = (ra.unwrap(), rb.unwrap());
                            proptest::prop_assert_eq!((fa, toa), (tob, fb));
                        }
                        Action::Send { conn, msg } => {
                            if let ServerMsg::Punch { public: Some(p), .. } = &**msg {
                                let peer_conn = usize::from(p.port());
                                proptest::prop_assert_eq!(
                                    claims[peer_conn].0,
                                    claims[conn.0 as usize].0
                                );
                            }
                        }
                        _ => {}
                    }
                }
                proptest::prop_assert!(h.state.pending_relays() <= claims.len());
            }
        }
    }

    #[test]
    fn huge_durations_never_expire_and_never_panic() {
        let mut h = Harness::with(ServerConfig {
            job_ttl: Duration::MAX,
            ..ServerConfig::default()
        });
        h.send(1, reg("j", 0, 2, TOKEN));
        assert_eq!(h.state.poll_timeout(), None);
        h.advance(Duration::from_secs(1 << 40));
        assert_eq!(h.state.job_count(), 1);
    }

    #[derive(Clone, Debug)]
    enum Op {
        Register {
            job: usize,
            rank: u32,
            size: u32,
            good_token: bool,
        },
        Close(proptest::sample::Index),
        Status(proptest::sample::Index),
        Advance(u64),
    }

    fn arb_op() -> impl proptest::strategy::Strategy<Value = Op> {
        use proptest::prelude::*;
        prop_oneof![
            4 => (0usize..3, 0u32..4, 1u32..4, proptest::bool::weighted(0.9)).prop_map(
                |(job, rank, size, good_token)| Op::Register { job, rank, size, good_token }
            ),
            1 => any::<proptest::sample::Index>().prop_map(Op::Close),
            1 => any::<proptest::sample::Index>().prop_map(Op::Status),
            1 => (0u64..400).prop_map(Op::Advance),
        ]
    }

    proptest::proptest! {
        /// Whatever clients do, a connection only ever receives rows of its own job, each row
        /// at its rank's index, and the number of jobs stays within its bound.
        #[test]
        fn random_clients_never_see_another_jobs_endpoints(
            ops in proptest::collection::vec(arb_op(), 1..80)
        ) {
            const JOBS: [&str; 3] = ["a", "b", "c"];
            let mut h = Harness::with(ServerConfig {
                max_jobs: 2,
                ..ServerConfig::default()
            });
            let mut job_of: Vec<&str> = Vec::new();
            for op in ops {
                let actions = match op {
                    Op::Register { job, rank, size, good_token } => {
                        let conn = job_of.len() as u64;
                        job_of.push(JOBS[job]);
                        let token = if good_token { TOKEN } else { "bad" };
                        h.send(conn, reg(JOBS[job], rank, size, token))
                    }
                    Op::Close(i) if !job_of.is_empty() => {
                        h.state.handle_closed(ConnId(i.index(job_of.len()) as u64), h.now);
                        h.drain()
                    }
                    Op::Status(i) if !job_of.is_empty() => {
                        h.send(i.index(job_of.len()) as u64, ClientMsg::Status)
                    }
                    Op::Advance(secs) => {
                        h.advance(Duration::from_secs(secs));
                        h.drain()
                    }
                    _ => Vec::new(),
                };
                for action in &actions {
                    if let Action::Send { conn, msg } = action {
                        if let ServerMsg::Peers { first, endpoints, .. } = &**msg {
                            let job = job_of[conn.0 as usize];
                            for (rank, row) in (*first..).zip(endpoints) {
                                proptest::prop_assert_eq!(row, &vec![ep(&format!("{job}/r{rank}"))]);
                            }
                        }
                    }
                }
                proptest::prop_assert!(h.state.job_count() <= 2);
                proptest::prop_assert!(h.state.registered_count() <= job_of.len());
            }
        }
    }
}
