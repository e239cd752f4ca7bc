//! The wire protocol: one message enum per direction, hand-encoded into length-prefixed frames.
//!
//! ```text
//! frame    = len:u32be  version:u8  kind:u8  body          len = 2 + body length, <= MAX_FRAME_LEN
//! str8     = n:u8  n bytes
//! Register = job:str8  rank:u32  size:u32  n:u8  n × endpoint:str8  token:str8      (kind 0x01)
//! Status   = (empty)                                                               (kind 0x02)
//! Leave    = (empty)                                                               (kind 0x03)
//! Hold     = (empty)                                                               (kind 0x04)
//! Connect  = peer:u32                                                              (kind 0x05)
//! Relay    = job:str8  from:u32  to:u32  token:str8                                (kind 0x06)
//! Missing  = n:u16  n × rank:u32                                                   (kind 0x81)
//! Peers    = size:u32  first:u32  n:u16  n × (m:u8  m × endpoint:str8)             (kind 0x82)
//! Refused  = code:u8  n:u16  n bytes of code-specific fields                       (kind 0x83)
//! Punch    = peer:u32  public:addr  m:u8  m × endpoint:str8  start_in_ms:u32        (kind 0x84)
//! RelayOffer = peer:u32                                                            (kind 0x85)
//! Relayed  = peer:u32                                                              (kind 0x86)
//! NoPeer   = peer:u32                                                              (kind 0x87)
//! addr     = 0 (none) | 4 ip:4 bytes port:u16 | 6 ip:16 bytes port:u16
//! ```
//!
//! Client kinds live in `0x01..=0x7f`, server kinds in `0x80..=0xff`, so a frame sent the wrong
//! way is an unknown kind rather than a misread message.
//!
//! ## NAT traversal (kinds 0x04..=0x06, 0x84..=0x87)
//! The NAT-traversal kinds were added to version 1 without changing any earlier layout: a client
//! that never sends them sees exactly the old protocol, and a server that predates them refuses
//! them as `Malformed`, which a client takes as "no traversal here". A rank that wants traversal
//! sends `Hold` right after `Register`: its connection then stays attached after the peer table,
//! the server remembers the address it *observed* the connection coming from (the rank's public
//! endpoint behind a NAT), and the rank may send `Connect{peer}`, upon which the server sends
//! `Punch` to **both** ranks of the pair — each with the other's observed and announced endpoints
//! and a common start delay — so that they open TCP connections towards each other at the same
//! time. `Relay` is the first and only frame of a separate connection: once the other rank of the
//! pair sends the mirror `Relay` (the server asks it to with `RelayOffer`), both get `Relayed` and
//! the server splices the two connections byte for byte.
//!
//! A decoder accepts exactly [`VERSION`]. The layout of `Refused` is the one thing every future
//! version must keep, so that a side can always learn *why* it was turned away, including for
//! [`RefuseReason::UnsupportedVersion`]. Its payload is length-delimited so that an older peer can
//! skip the fields of a reason it does not know and still report its code.
//!
//! Decoding is strict: every count and length is checked against a constant limit before anything
//! is allocated, and the whole frame is bounded by [`MAX_FRAME_LEN`], so garbage costs at most one
//! bounded buffer and yields a [`DecodeError`], never a panic.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;
use std::time::Duration;

use fmi_channels::JobId;

use crate::Error;

/// The protocol version this crate speaks.
pub const VERSION: u8 = 1;
/// The size of the big-endian length prefix in front of every frame.
pub const PREFIX_LEN: usize = 4;
/// The largest frame accepted, counted after the length prefix (version, kind and body).
pub const MAX_FRAME_LEN: usize = 64 * 1024;
/// The most endpoints one rank may announce.
pub const MAX_ENDPOINTS: usize = 8;
/// The longest endpoint text, in bytes.
pub const MAX_ENDPOINT_LEN: usize = 255;
/// The longest job token, in bytes.
pub const MAX_TOKEN_LEN: usize = 128;
/// The largest job size the protocol can describe. Chosen so that a full list of missing ranks
/// (4 bytes each) always fits in one frame.
pub const MAX_RANKS: u32 = 8192;

/// Version and kind bytes.
const HEADER_LEN: usize = 2;

const KIND_REGISTER: u8 = 0x01;
const KIND_STATUS: u8 = 0x02;
const KIND_LEAVE: u8 = 0x03;
const KIND_HOLD: u8 = 0x04;
const KIND_CONNECT: u8 = 0x05;
const KIND_RELAY: u8 = 0x06;
const KIND_MISSING: u8 = 0x81;
const KIND_PEERS: u8 = 0x82;
const KIND_REFUSED: u8 = 0x83;
const KIND_PUNCH: u8 = 0x84;
const KIND_RELAY_OFFER: u8 = 0x85;
const KIND_RELAYED: u8 = 0x86;
const KIND_NO_PEER: u8 = 0x87;

/// A way to reach a rank, as the rank itself reports it (for example `tcp://10.0.0.7:4000`).
///
/// The rendezvous server does not interpret endpoints; it only checks that each is 1 to
/// [`MAX_ENDPOINT_LEN`] printable ASCII characters without spaces, so it is safe to log and to
/// put into a peer table.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Endpoint(String);

impl Endpoint {
    /// Validates and wraps an endpoint.
    pub fn new(text: impl Into<String>) -> Result<Endpoint, Error> {
        let text = text.into();
        if Self::is_valid(text.as_bytes()) {
            Ok(Endpoint(text))
        } else {
            Err(Error::InvalidEndpoint { endpoint: text })
        }
    }

    /// The endpoint as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    fn is_valid(bytes: &[u8]) -> bool {
        !bytes.is_empty()
            && bytes.len() <= MAX_ENDPOINT_LEN
            && bytes.iter().all(u8::is_ascii_graphic)
    }

    fn from_wire(bytes: &[u8]) -> Result<Endpoint, DecodeError> {
        if !Self::is_valid(bytes) {
            return Err(DecodeError::InvalidField { field: "endpoint" });
        }
        // Printable ASCII is valid UTF-8, so this conversion cannot fail.
        String::from_utf8(bytes.to_vec())
            .map(Endpoint)
            .map_err(|_| DecodeError::InvalidField { field: "endpoint" })
    }
}

impl From<SocketAddr> for Endpoint {
    fn from(addr: SocketAddr) -> Self {
        // A socket address prints as digits, dots, colons and brackets: always valid.
        Endpoint(addr.to_string())
    }
}

impl FromStr for Endpoint {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Endpoint::new(s)
    }
}

impl fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Endpoint({})", self.0)
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The per-job secret that every rank of a job presents; the first registration of a job fixes
/// it, and later registrations with a different token are refused.
///
/// A token has no `Display`, its `Debug` is redacted, and equality is checked in constant time,
/// so it cannot leak through logs, error messages or timing. An empty token (the default) means
/// the job is not protected beyond its id.
#[derive(Clone, Default)]
pub struct Token(Vec<u8>);

impl Token {
    /// Wraps a token of at most [`MAX_TOKEN_LEN`] bytes.
    pub fn new(bytes: impl Into<Vec<u8>>) -> Result<Token, Error> {
        let bytes = bytes.into();
        if bytes.len() <= MAX_TOKEN_LEN {
            Ok(Token(bytes))
        } else {
            Err(Error::InvalidToken {
                len: bytes.len(),
                max: MAX_TOKEN_LEN,
            })
        }
    }

    /// The token's length in bytes (the length is not secret: it shows in the frame length).
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether this is the empty token.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Compares two tokens in time that depends only on their lengths, never on where they
    /// first differ, so that a client cannot guess a job's token byte by byte.
    pub fn ct_eq(&self, other: &Token) -> bool {
        if self.0.len() != other.0.len() {
            return false;
        }
        let diff = self
            .0
            .iter()
            .zip(&other.0)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b));
        // Keeps the optimiser from turning the fold into an early-exit comparison.
        std::hint::black_box(diff) == 0
    }
}

impl PartialEq for Token {
    fn eq(&self, other: &Self) -> bool {
        self.ct_eq(other)
    }
}

impl Eq for Token {}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

/// A message from a rank to the rendezvous server.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ClientMsg {
    /// Joins `job` as `rank` of `size`. Answered by [`ServerMsg::Missing`] while the job is
    /// incomplete, by the peer table once it is complete, or by [`ServerMsg::Refused`].
    Register {
        /// The job to join.
        job: JobId,
        /// The rank of the sender, `0..size`.
        rank: u32,
        /// The number of ranks in the job; every rank must say the same.
        size: u32,
        /// How other ranks can reach the sender.
        endpoints: Vec<Endpoint>,
        /// The job's secret.
        token: Token,
    },
    /// Asks which ranks are still missing; answered by [`ServerMsg::Missing`].
    Status,
    /// Withdraws the registration (the rank becomes missing again) or, after the table was
    /// delivered, says goodbye.
    Leave,
    /// Sent right after `Register`: keep this connection attached after the peer table is
    /// delivered, for hole-punch coordination ([`ClientMsg::Connect`]) and relaying.
    Hold,
    /// Asks the server to make this rank and `peer` punch towards each other: both get a
    /// [`ServerMsg::Punch`] (or this rank a [`ServerMsg::NoPeer`]). Only on a held connection of
    /// a complete job.
    Connect {
        /// The rank of the same job to connect to.
        peer: u32,
    },
    /// The first and only frame of a relay connection: splice this connection with the one
    /// rank `to` of the same job opens for the mirror pair. Answered by [`ServerMsg::Relayed`]
    /// (after which the connection carries raw bytes) or [`ServerMsg::Refused`].
    Relay {
        /// The job both ranks belong to.
        job: JobId,
        /// The sender's rank, which must hold an attached registration of the job.
        from: u32,
        /// The rank to relay to.
        to: u32,
        /// The job's secret.
        token: Token,
    },
}

/// A message from the rendezvous server to a rank.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ServerMsg {
    /// The ranks of the job that have not registered yet, ascending.
    Missing {
        /// The missing ranks.
        ranks: Vec<u32>,
    },
    /// One part of the peer table: the endpoints of ranks `first..first + endpoints.len()`.
    /// A table too large for one frame is sent as consecutive parts in rank order.
    Peers {
        /// The job's size (the number of rows in the whole table).
        size: u32,
        /// The rank of the first row in this part.
        first: u32,
        /// One row per rank: that rank's endpoints.
        endpoints: Vec<Vec<Endpoint>>,
    },
    /// The server will not serve this registration; the connection is closed after this frame.
    Refused {
        /// Why.
        reason: RefuseReason,
    },
    /// Open a TCP connection to `peer` now: sent to both ranks of a pair at once, after one of
    /// them asked with [`ClientMsg::Connect`].
    Punch {
        /// The other rank of the pair.
        peer: u32,
        /// The address the server saw `peer`'s rendezvous connection come from (its NAT's
        /// public side), if known.
        public: Option<SocketAddr>,
        /// The endpoints `peer` announced itself (its private addresses).
        private: Vec<Endpoint>,
        /// How long after receiving this message to start, so that both sides start together.
        /// Carried in whole milliseconds.
        start_in: Duration,
    },
    /// `peer` opened a relay connection for the pair and waits for this rank to open the mirror
    /// one ([`ClientMsg::Relay`]).
    RelayOffer {
        /// The rank waiting at the relay.
        peer: u32,
    },
    /// The relay connection is spliced with `peer`'s: from the next byte on it carries raw
    /// bytes to and from `peer`.
    Relayed {
        /// The rank at the other end.
        peer: u32,
    },
    /// `peer` has no attached registration (it left, or does not do NAT traversal): no punch
    /// or relay can be arranged with it.
    NoPeer {
        /// The rank asked for.
        peer: u32,
    },
}

/// Why the server refused a client. Never carries a token.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RefuseReason {
    /// Another live connection already holds this rank of this job.
    #[error(
        "rank {rank} is already registered in this job by a live connection; give every process \
         a distinct rank"
    )]
    DuplicateRank {
        /// The contested rank.
        rank: u32,
    },
    /// The job was registered with another size.
    #[error(
        "the job was registered with size {expected} but this rank says {got}; all ranks must \
         agree on the size"
    )]
    SizeMismatch {
        /// The job's size, fixed by its first registration.
        expected: u32,
        /// The size this registration gave.
        got: u32,
    },
    /// The token differs from the one the job was first registered with.
    #[error("the job token does not match the one the job was registered with")]
    BadToken,
    /// The rank is not in `0..size`.
    #[error("rank {rank} is outside 0..{size}")]
    InvalidRank {
        /// The rank given.
        rank: u32,
        /// The size given.
        size: u32,
    },
    /// The server does not speak the client's protocol version.
    #[error("the server speaks protocol version {supported} only; upgrade the older side")]
    UnsupportedVersion {
        /// The version the server speaks.
        supported: u8,
    },
    /// A frame was longer than the protocol allows.
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// The announced length.
        len: u32,
        /// The limit.
        max: u32,
    },
    /// A frame could not be decoded.
    #[error("the server could not decode the frame")]
    Malformed,
    /// The job is larger than the server is configured to pair.
    #[error("job size {size} exceeds the server's limit of {max} ranks")]
    JobTooLarge {
        /// The size given.
        size: u32,
        /// The server's limit.
        max: u32,
    },
    /// The server holds as many jobs as it is configured for.
    #[error(
        "the server holds as many jobs as it is configured for; retry later or raise its limit"
    )]
    ServerFull,
    /// The job already completed (its table was delivered).
    #[error("the job already completed; use a fresh job id for a new run")]
    JobComplete,
    /// The job did not complete in time and was removed.
    #[error("the job did not complete within the server's time limit and was removed")]
    JobExpired,
    /// The message made no sense at this point of the conversation (for example a second
    /// `Register` on one connection).
    #[error("the message was out of place in the conversation")]
    UnexpectedMessage,
    /// A relay connection named a job this server does not hold (or whose peer table was not
    /// delivered yet).
    #[error("the server holds no complete job of that id; relay only after the peer table came")]
    UnknownJob,
    /// A `Connect` or `Relay` came from a rank without an attached (`Hold`) registration of its
    /// job, or named a rank outside the job.
    #[error(
        "this rank holds no attached registration of the job, or names a rank outside it; \
         register with Hold first"
    )]
    NotAttached,
    /// The other rank did not open its relay connection in time.
    #[error("the peer did not come to the relay in time")]
    RelayTimeout,
    /// A reason this version does not know, from a newer peer.
    #[error("refused for a reason this version does not know (code {code})")]
    Other {
        /// The reason's wire code.
        code: u8,
    },
}

/// A frame that could not be decoded. Never carries a token.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The frame ended before a field it announced.
    #[error("frame truncated")]
    Truncated,
    /// The length prefix exceeds [`MAX_FRAME_LEN`].
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// The announced length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The length prefix disagrees with the bytes given.
    #[error("length prefix announces {declared} bytes but {actual} follow")]
    LengthMismatch {
        /// The announced length.
        declared: usize,
        /// The bytes present.
        actual: usize,
    },
    /// The frame is of another protocol version.
    #[error("protocol version {got} is not supported (this side speaks {supported})")]
    UnsupportedVersion {
        /// The frame's version.
        got: u8,
        /// The version this side speaks.
        supported: u8,
    },
    /// The message kind is not one this side receives.
    #[error("unknown message kind {kind:#04x}")]
    UnknownKind {
        /// The kind byte.
        kind: u8,
    },
    /// Bytes are left after the message.
    #[error("{count} trailing bytes after the message")]
    TrailingBytes {
        /// How many.
        count: usize,
    },
    /// A list is longer than the protocol allows.
    #[error("{field} has {count} entries, more than the limit of {max}")]
    TooMany {
        /// The list.
        field: &'static str,
        /// Its announced length.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// A field's value is not allowed (bad job id or endpoint characters, token too long,
    /// peer-table rows outside the table).
    #[error("field {field} is invalid")]
    InvalidField {
        /// The field.
        field: &'static str,
    },
    /// A well-formed message that contradicts the conversation so far (for example a peer table
    /// for another job size).
    #[error("message contradicts the conversation: {what}")]
    Unexpected {
        /// What was contradicted.
        what: &'static str,
    },
}

/// A message that cannot be put into a frame.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EncodeError {
    /// A list is longer than the protocol allows.
    #[error("{field} has {count} entries, more than the limit of {max}")]
    TooMany {
        /// The list.
        field: &'static str,
        /// Its length.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// A field's value is not allowed (for example peer-table rows outside the table).
    #[error("field {field} is invalid")]
    InvalidField {
        /// The field.
        field: &'static str,
    },
    /// The encoded message exceeds [`MAX_FRAME_LEN`].
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// The encoded length.
        len: usize,
        /// The limit.
        max: usize,
    },
}

/// Checks a frame's length prefix, returning how many bytes follow it.
///
/// Stream readers call this as soon as the four prefix bytes arrive, so an oversized frame is
/// rejected before any of it is buffered.
pub fn frame_len(prefix: [u8; PREFIX_LEN]) -> Result<usize, DecodeError> {
    let len = u32::from_be_bytes(prefix) as usize;
    if len > MAX_FRAME_LEN {
        Err(DecodeError::TooLarge {
            len,
            max: MAX_FRAME_LEN,
        })
    } else if len < HEADER_LEN {
        Err(DecodeError::Truncated)
    } else {
        Ok(len)
    }
}

impl ClientMsg {
    /// Appends this message as one complete frame (length prefix included) to `out`. On error
    /// `out` is left as it was.
    pub fn encode(&self, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        let start = out.len();
        let res = self.encode_frame(out);
        if res.is_err() {
            out.truncate(start);
        }
        res
    }

    fn encode_frame(&self, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        match self {
            ClientMsg::Register {
                job,
                rank,
                size,
                endpoints,
                token,
            } => {
                let start = begin(out, KIND_REGISTER);
                put_str8(out, job.as_str().as_bytes());
                out.extend_from_slice(&rank.to_be_bytes());
                out.extend_from_slice(&size.to_be_bytes());
                put_endpoints(out, endpoints)?;
                put_str8(out, &token.0);
                finish(out, start)
            }
            ClientMsg::Status => {
                let start = begin(out, KIND_STATUS);
                finish(out, start)
            }
            ClientMsg::Leave => {
                let start = begin(out, KIND_LEAVE);
                finish(out, start)
            }
            ClientMsg::Hold => {
                let start = begin(out, KIND_HOLD);
                finish(out, start)
            }
            ClientMsg::Connect { peer } => {
                let start = begin(out, KIND_CONNECT);
                out.extend_from_slice(&peer.to_be_bytes());
                finish(out, start)
            }
            ClientMsg::Relay {
                job,
                from,
                to,
                token,
            } => {
                let start = begin(out, KIND_RELAY);
                put_str8(out, job.as_str().as_bytes());
                out.extend_from_slice(&from.to_be_bytes());
                out.extend_from_slice(&to.to_be_bytes());
                put_str8(out, &token.0);
                finish(out, start)
            }
        }
    }

    /// Decodes one complete frame (length prefix included).
    pub fn decode(frame: &[u8]) -> Result<ClientMsg, DecodeError> {
        let (kind, mut r) = open(frame)?;
        let msg = match kind {
            KIND_REGISTER => {
                let job = r.job()?;
                let rank = r.u32()?;
                let size = r.u32()?;
                let endpoints = r.endpoints()?;
                let token = r.token()?;
                ClientMsg::Register {
                    job,
                    rank,
                    size,
                    endpoints,
                    token,
                }
            }
            KIND_STATUS => ClientMsg::Status,
            KIND_LEAVE => ClientMsg::Leave,
            KIND_HOLD => ClientMsg::Hold,
            KIND_CONNECT => ClientMsg::Connect { peer: r.u32()? },
            KIND_RELAY => {
                let job = r.job()?;
                let from = r.u32()?;
                let to = r.u32()?;
                let token = r.token()?;
                ClientMsg::Relay {
                    job,
                    from,
                    to,
                    token,
                }
            }
            kind => return Err(DecodeError::UnknownKind { kind }),
        };
        r.finish()?;
        Ok(msg)
    }
}

impl ServerMsg {
    /// Appends this message as one complete frame (length prefix included) to `out`. On error
    /// `out` is left as it was.
    pub fn encode(&self, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        let start = out.len();
        let res = self.encode_frame(out);
        if res.is_err() {
            out.truncate(start);
        }
        res
    }

    fn encode_frame(&self, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        match self {
            ServerMsg::Missing { ranks } => {
                let start = begin(out, KIND_MISSING);
                put_count16(out, "missing ranks", ranks.len(), MAX_RANKS as usize)?;
                for rank in ranks {
                    out.extend_from_slice(&rank.to_be_bytes());
                }
                finish(out, start)
            }
            ServerMsg::Peers {
                size,
                first,
                endpoints,
            } => {
                if !peers_range_ok(*size, *first, endpoints.len()) {
                    return Err(EncodeError::InvalidField {
                        field: "peer table range",
                    });
                }
                let start = begin(out, KIND_PEERS);
                out.extend_from_slice(&size.to_be_bytes());
                out.extend_from_slice(&first.to_be_bytes());
                put_count16(out, "peer table rows", endpoints.len(), MAX_RANKS as usize)?;
                for row in endpoints {
                    put_endpoints(out, row)?;
                }
                finish(out, start)
            }
            ServerMsg::Refused { reason } => {
                let start = begin(out, KIND_REFUSED);
                reason.encode(out);
                finish(out, start)
            }
            ServerMsg::Punch {
                peer,
                public,
                private,
                start_in,
            } => {
                let start = begin(out, KIND_PUNCH);
                out.extend_from_slice(&peer.to_be_bytes());
                put_addr(out, *public);
                put_endpoints(out, private)?;
                let ms = u32::try_from(start_in.as_millis()).unwrap_or(u32::MAX);
                out.extend_from_slice(&ms.to_be_bytes());
                finish(out, start)
            }
            ServerMsg::RelayOffer { peer } => put_rank_msg(out, KIND_RELAY_OFFER, *peer),
            ServerMsg::Relayed { peer } => put_rank_msg(out, KIND_RELAYED, *peer),
            ServerMsg::NoPeer { peer } => put_rank_msg(out, KIND_NO_PEER, *peer),
        }
    }

    /// Decodes one complete frame (length prefix included).
    pub fn decode(frame: &[u8]) -> Result<ServerMsg, DecodeError> {
        let (kind, mut r) = open(frame)?;
        let msg = match kind {
            KIND_MISSING => {
                let n = r.count16("missing ranks", MAX_RANKS as usize)?;
                let mut ranks = Vec::with_capacity(n);
                for _ in 0..n {
                    ranks.push(r.u32()?);
                }
                ServerMsg::Missing { ranks }
            }
            KIND_PEERS => {
                let size = r.u32()?;
                let first = r.u32()?;
                let n = r.count16("peer table rows", MAX_RANKS as usize)?;
                if !peers_range_ok(size, first, n) {
                    return Err(DecodeError::InvalidField {
                        field: "peer table range",
                    });
                }
                // Each row takes at least one byte, so the frame bounds the allocation too.
                let mut endpoints = Vec::with_capacity(n.min(r.remaining()));
                for _ in 0..n {
                    endpoints.push(r.endpoints()?);
                }
                ServerMsg::Peers {
                    size,
                    first,
                    endpoints,
                }
            }
            KIND_REFUSED => ServerMsg::Refused {
                reason: RefuseReason::decode(&mut r)?,
            },
            KIND_PUNCH => ServerMsg::Punch {
                peer: r.u32()?,
                public: r.addr()?,
                private: r.endpoints()?,
                start_in: Duration::from_millis(u64::from(r.u32()?)),
            },
            KIND_RELAY_OFFER => ServerMsg::RelayOffer { peer: r.u32()? },
            KIND_RELAYED => ServerMsg::Relayed { peer: r.u32()? },
            KIND_NO_PEER => ServerMsg::NoPeer { peer: r.u32()? },
            kind => return Err(DecodeError::UnknownKind { kind }),
        };
        r.finish()?;
        Ok(msg)
    }
}

impl RefuseReason {
    fn code(&self) -> u8 {
        match self {
            RefuseReason::DuplicateRank { .. } => 1,
            RefuseReason::SizeMismatch { .. } => 2,
            RefuseReason::BadToken => 3,
            RefuseReason::InvalidRank { .. } => 4,
            RefuseReason::UnsupportedVersion { .. } => 5,
            RefuseReason::TooLarge { .. } => 6,
            RefuseReason::Malformed => 7,
            RefuseReason::JobTooLarge { .. } => 8,
            RefuseReason::ServerFull => 9,
            RefuseReason::JobComplete => 10,
            RefuseReason::JobExpired => 11,
            RefuseReason::UnexpectedMessage => 12,
            RefuseReason::UnknownJob => 13,
            RefuseReason::NotAttached => 14,
            RefuseReason::RelayTimeout => 15,
            RefuseReason::Other { code } => *code,
        }
    }

    fn encode(&self, out: &mut Vec<u8>) {
        let mut fields = Vec::new();
        let mut put = |v: u32| fields.extend_from_slice(&v.to_be_bytes());
        match self {
            RefuseReason::DuplicateRank { rank } => put(*rank),
            RefuseReason::SizeMismatch { expected, got } => {
                put(*expected);
                put(*got);
            }
            RefuseReason::InvalidRank { rank, size } => {
                put(*rank);
                put(*size);
            }
            RefuseReason::UnsupportedVersion { supported } => fields.push(*supported),
            RefuseReason::TooLarge { len, max } => {
                put(*len);
                put(*max);
            }
            RefuseReason::JobTooLarge { size, max } => {
                put(*size);
                put(*max);
            }
            RefuseReason::BadToken
            | RefuseReason::Malformed
            | RefuseReason::ServerFull
            | RefuseReason::JobComplete
            | RefuseReason::JobExpired
            | RefuseReason::UnexpectedMessage
            | RefuseReason::UnknownJob
            | RefuseReason::NotAttached
            | RefuseReason::RelayTimeout
            | RefuseReason::Other { .. } => {}
        }
        out.push(self.code());
        // At most 9 bytes of fields, far below u16::MAX.
        out.extend_from_slice(&(fields.len() as u16).to_be_bytes());
        out.extend_from_slice(&fields);
    }

    fn decode(r: &mut Reader<'_>) -> Result<RefuseReason, DecodeError> {
        let code = r.u8()?;
        let len = usize::from(r.u16()?);
        let mut f = Reader { buf: r.take(len)? };
        let reason = match code {
            1 => RefuseReason::DuplicateRank { rank: f.u32()? },
            2 => RefuseReason::SizeMismatch {
                expected: f.u32()?,
                got: f.u32()?,
            },
            3 => RefuseReason::BadToken,
            4 => RefuseReason::InvalidRank {
                rank: f.u32()?,
                size: f.u32()?,
            },
            5 => RefuseReason::UnsupportedVersion { supported: f.u8()? },
            6 => RefuseReason::TooLarge {
                len: f.u32()?,
                max: f.u32()?,
            },
            7 => RefuseReason::Malformed,
            8 => RefuseReason::JobTooLarge {
                size: f.u32()?,
                max: f.u32()?,
            },
            9 => RefuseReason::ServerFull,
            10 => RefuseReason::JobComplete,
            11 => RefuseReason::JobExpired,
            12 => RefuseReason::UnexpectedMessage,
            13 => RefuseReason::UnknownJob,
            14 => RefuseReason::NotAttached,
            15 => RefuseReason::RelayTimeout,
            // A newer peer's reason: its fields are skipped, its code is kept.
            code => return Ok(RefuseReason::Other { code }),
        };
        f.finish()?;
        Ok(reason)
    }
}

/// Splits a complete peer table (row index = rank) into `Peers` messages that each fit in a
/// frame, in rank order.
pub(crate) fn peer_table_parts(table: &[Vec<Endpoint>]) -> Vec<ServerMsg> {
    // Room for the rows once version, kind, size, first and the row count are written.
    const BUDGET: usize = MAX_FRAME_LEN - HEADER_LEN - 4 - 4 - 2;
    let size = u32::try_from(table.len()).unwrap_or(u32::MAX);
    let mut parts = Vec::new();
    let mut rows: Vec<Vec<Endpoint>> = Vec::new();
    let mut first = 0u32;
    let mut used = 0usize;
    for (rank, row) in (0u32..).zip(table) {
        let cost = 1 + row.iter().map(|e| 1 + e.0.len()).sum::<usize>();
        if used + cost > BUDGET && !rows.is_empty() {
            parts.push(ServerMsg::Peers {
                size,
                first,
                endpoints: std::mem::take(&mut rows),
            });
            first = rank;
            used = 0;
        }
        rows.push(row.clone());
        used += cost;
    }
    parts.push(ServerMsg::Peers {
        size,
        first,
        endpoints: rows,
    });
    parts
}

fn peers_range_ok(size: u32, first: u32, rows: usize) -> bool {
    size <= MAX_RANKS && u64::from(first) + rows as u64 <= u64::from(size)
}

/// Starts a frame: a placeholder prefix, then version and kind. Returns where the frame starts.
fn begin(out: &mut Vec<u8>, kind: u8) -> usize {
    let start = out.len();
    out.extend_from_slice(&[0; PREFIX_LEN]);
    out.push(VERSION);
    out.push(kind);
    start
}

/// Fills in the length prefix of the frame that starts at `start`.
fn finish(out: &mut [u8], start: usize) -> Result<(), EncodeError> {
    let len = out.len() - start - PREFIX_LEN;
    if len > MAX_FRAME_LEN {
        return Err(EncodeError::TooLarge {
            len,
            max: MAX_FRAME_LEN,
        });
    }
    out[start..start + PREFIX_LEN].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(())
}

/// Callers pass only values whose length the types already bound to 255 (job ids, endpoints,
/// tokens).
fn put_str8(out: &mut Vec<u8>, bytes: &[u8]) {
    out.push(bytes.len() as u8);
    out.extend_from_slice(bytes);
}

/// A message whose body is one rank.
fn put_rank_msg(out: &mut Vec<u8>, kind: u8, rank: u32) -> Result<(), EncodeError> {
    let start = begin(out, kind);
    out.extend_from_slice(&rank.to_be_bytes());
    finish(out, start)
}

const ADDR_NONE: u8 = 0;
const ADDR_V4: u8 = 4;
const ADDR_V6: u8 = 6;

fn put_addr(out: &mut Vec<u8>, addr: Option<SocketAddr>) {
    match addr {
        None => out.push(ADDR_NONE),
        Some(SocketAddr::V4(a)) => {
            out.push(ADDR_V4);
            out.extend_from_slice(&a.ip().octets());
            out.extend_from_slice(&a.port().to_be_bytes());
        }
        Some(SocketAddr::V6(a)) => {
            out.push(ADDR_V6);
            out.extend_from_slice(&a.ip().octets());
            out.extend_from_slice(&a.port().to_be_bytes());
        }
    }
}

fn put_count16(
    out: &mut Vec<u8>,
    field: &'static str,
    count: usize,
    max: usize,
) -> Result<(), EncodeError> {
    if count > max {
        return Err(EncodeError::TooMany { field, count, max });
    }
    out.extend_from_slice(&(count as u16).to_be_bytes());
    Ok(())
}

fn put_endpoints(out: &mut Vec<u8>, endpoints: &[Endpoint]) -> Result<(), EncodeError> {
    if endpoints.len() > MAX_ENDPOINTS {
        return Err(EncodeError::TooMany {
            field: "endpoints",
            count: endpoints.len(),
            max: MAX_ENDPOINTS,
        });
    }
    out.push(endpoints.len() as u8);
    for e in endpoints {
        put_str8(out, e.0.as_bytes());
    }
    Ok(())
}

/// Checks prefix, version and length of a complete frame; returns its kind and a reader over
/// its body.
fn open(frame: &[u8]) -> Result<(u8, Reader<'_>), DecodeError> {
    let mut r = Reader { buf: frame };
    let &[a, b, c, d] = r.take(PREFIX_LEN)? else {
        return Err(DecodeError::Truncated);
    };
    let declared = frame_len([a, b, c, d])?;
    if declared != r.remaining() {
        return Err(DecodeError::LengthMismatch {
            declared,
            actual: r.remaining(),
        });
    }
    let version = r.u8()?;
    if version != VERSION {
        return Err(DecodeError::UnsupportedVersion {
            got: version,
            supported: VERSION,
        });
    }
    let kind = r.u8()?;
    Ok((kind, r))
}

/// A cursor over a byte slice whose every read is bounds-checked.
struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> usize {
        self.buf.len()
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if n > self.buf.len() {
            return Err(DecodeError::Truncated);
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        let &[a] = self.take(1)? else {
            return Err(DecodeError::Truncated);
        };
        Ok(a)
    }

    fn u16(&mut self) -> Result<u16, DecodeError> {
        let &[a, b] = self.take(2)? else {
            return Err(DecodeError::Truncated);
        };
        Ok(u16::from_be_bytes([a, b]))
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        let &[a, b, c, d] = self.take(4)? else {
            return Err(DecodeError::Truncated);
        };
        Ok(u32::from_be_bytes([a, b, c, d]))
    }

    fn str8(&mut self) -> Result<&'a [u8], DecodeError> {
        let n = usize::from(self.u8()?);
        self.take(n)
    }

    fn count16(&mut self, field: &'static str, max: usize) -> Result<usize, DecodeError> {
        let count = usize::from(self.u16()?);
        if count > max {
            return Err(DecodeError::TooMany { field, count, max });
        }
        Ok(count)
    }

    fn job(&mut self) -> Result<JobId, DecodeError> {
        std::str::from_utf8(self.str8()?)
            .ok()
            .and_then(|s| JobId::new(s).ok())
            .ok_or(DecodeError::InvalidField { field: "job" })
    }

    fn token(&mut self) -> Result<Token, DecodeError> {
        let token = self.str8()?;
        if token.len() > MAX_TOKEN_LEN {
            return Err(DecodeError::InvalidField { field: "token" });
        }
        Ok(Token(token.to_vec()))
    }

    fn addr(&mut self) -> Result<Option<SocketAddr>, DecodeError> {
        let ip = match self.u8()? {
            ADDR_NONE => return Ok(None),
            ADDR_V4 => {
                let &[a, b, c, d] = self.take(4)? else {
                    return Err(DecodeError::Truncated);
                };
                IpAddr::V4(Ipv4Addr::new(a, b, c, d))
            }
            ADDR_V6 => {
                let mut octets = [0u8; 16];
                octets.copy_from_slice(self.take(16)?);
                IpAddr::V6(Ipv6Addr::from(octets))
            }
            _ => return Err(DecodeError::InvalidField { field: "address" }),
        };
        Ok(Some(SocketAddr::new(ip, self.u16()?)))
    }

    fn endpoints(&mut self) -> Result<Vec<Endpoint>, DecodeError> {
        let n = usize::from(self.u8()?);
        if n > MAX_ENDPOINTS {
            return Err(DecodeError::TooMany {
                field: "endpoints",
                count: n,
                max: MAX_ENDPOINTS,
            });
        }
        let mut endpoints = Vec::with_capacity(n);
        for _ in 0..n {
            endpoints.push(Endpoint::from_wire(self.str8()?)?);
        }
        Ok(endpoints)
    }

    fn finish(self) -> Result<(), DecodeError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::TrailingBytes {
                count: self.buf.len(),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn job(s: &str) -> JobId {
        JobId::new(s).unwrap()
    }

    fn ep(s: &str) -> Endpoint {
        Endpoint::new(s).unwrap()
    }

    fn register() -> ClientMsg {
        ClientMsg::Register {
            job: job("job-1"),
            rank: 3,
            size: 5,
            endpoints: vec![ep("tcp://127.0.0.1:4000"), ep("[::1]:9")],
            token: Token::new("s3cret").unwrap(),
        }
    }

    fn client_bytes(msg: &ClientMsg) -> Vec<u8> {
        let mut out = Vec::new();
        msg.encode(&mut out).unwrap();
        out
    }

    #[test]
    fn register_layout_is_as_documented() {
        let bytes = client_bytes(&register());
        let len = u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) as usize;
        assert_eq!(len, bytes.len() - PREFIX_LEN);
        assert_eq!(bytes[4], VERSION);
        assert_eq!(bytes[5], KIND_REGISTER);
        assert_eq!(bytes[6], 5);
        assert_eq!(&bytes[7..12], b"job-1");
        assert_eq!(&bytes[12..16], &3u32.to_be_bytes());
        assert_eq!(&bytes[16..20], &5u32.to_be_bytes());
        assert_eq!(bytes[20], 2);
        assert_eq!(&bytes[bytes.len() - 7..], b"\x06s3cret");
    }

    #[test]
    fn unit_messages_round_trip() {
        for msg in [
            ClientMsg::Status,
            ClientMsg::Leave,
            ClientMsg::Hold,
            ClientMsg::Connect { peer: 7 },
            register(),
        ] {
            assert_eq!(ClientMsg::decode(&client_bytes(&msg)).unwrap(), msg);
        }
    }

    #[test]
    fn frames_are_rejected_precisely() {
        let good = client_bytes(&ClientMsg::Status);
        let mut v2 = good.clone();
        v2[4] = 2;
        assert_eq!(
            ClientMsg::decode(&v2),
            Err(DecodeError::UnsupportedVersion {
                got: 2,
                supported: VERSION
            })
        );
        let mut server_kind = good.clone();
        server_kind[5] = KIND_MISSING;
        assert_eq!(
            ClientMsg::decode(&server_kind),
            Err(DecodeError::UnknownKind { kind: KIND_MISSING })
        );
        assert_eq!(
            ClientMsg::decode(&good[..5]),
            Err(DecodeError::LengthMismatch {
                declared: 2,
                actual: 1
            })
        );
        assert_eq!(ClientMsg::decode(&good[..3]), Err(DecodeError::Truncated));
        let mut trailing = good.clone();
        trailing[3] = 3;
        trailing.push(0);
        assert_eq!(
            ClientMsg::decode(&trailing),
            Err(DecodeError::TrailingBytes { count: 1 })
        );
        assert_eq!(
            frame_len([0xff, 0xff, 0xff, 0xff]),
            Err(DecodeError::TooLarge {
                len: u32::MAX as usize,
                max: MAX_FRAME_LEN
            })
        );
        assert_eq!(frame_len([0, 0, 0, 1]), Err(DecodeError::Truncated));
    }

    #[test]
    fn bad_field_values_are_rejected() {
        let bytes = client_bytes(&register());
        let mut bad_job = bytes.clone();
        bad_job[7] = b'/';
        assert_eq!(
            ClientMsg::decode(&bad_job),
            Err(DecodeError::InvalidField { field: "job" })
        );
        let mut bad_endpoint = bytes.clone();
        bad_endpoint[22] = b' ';
        assert_eq!(
            ClientMsg::decode(&bad_endpoint),
            Err(DecodeError::InvalidField { field: "endpoint" })
        );
        let mut many = bytes;
        many[20] = 9;
        assert_eq!(
            ClientMsg::decode(&many),
            Err(DecodeError::TooMany {
                field: "endpoints",
                count: 9,
                max: MAX_ENDPOINTS
            })
        );
    }

    #[test]
    fn encoding_refuses_what_decoding_would_refuse() {
        let mut out = vec![7];
        let too_many = ClientMsg::Register {
            job: job("j"),
            rank: 0,
            size: 1,
            endpoints: vec![ep("x"); MAX_ENDPOINTS + 1],
            token: Token::default(),
        };
        assert!(matches!(
            too_many.encode(&mut out),
            Err(EncodeError::TooMany { .. })
        ));
        let out_of_table = ServerMsg::Peers {
            size: 2,
            first: 1,
            endpoints: vec![vec![], vec![]],
        };
        assert!(out_of_table.encode(&mut out).is_err());
        assert_eq!(out, vec![7], "a failed encode leaves the buffer as it was");
    }

    #[test]
    fn unknown_refusal_codes_keep_their_code() {
        // A newer server's reason 200 with three bytes of fields this version cannot read.
        let frame = [0, 0, 0, 8, VERSION, KIND_REFUSED, 200, 0, 3, 1, 2, 3];
        assert_eq!(
            ServerMsg::decode(&frame),
            Ok(ServerMsg::Refused {
                reason: RefuseReason::Other { code: 200 }
            })
        );
    }

    #[test]
    fn tokens_compare_by_content_and_never_print() {
        let a = Token::new("hunter2").unwrap();
        assert!(a.ct_eq(&Token::new("hunter2").unwrap()));
        assert!(!a.ct_eq(&Token::new("hunter3").unwrap()));
        assert!(!a.ct_eq(&Token::new("hunter").unwrap()));
        assert!(!format!("{:?}", register()).contains("s3cret"));
        assert!(Token::new(vec![0; MAX_TOKEN_LEN + 1]).is_err());
    }

    #[test]
    fn endpoints_are_validated() {
        assert!(Endpoint::new("tcp://1.2.3.4:5").is_ok());
        assert!(Endpoint::new("").is_err());
        assert!(Endpoint::new("a b").is_err());
        assert!(Endpoint::new("é").is_err());
        assert!(Endpoint::new("x".repeat(MAX_ENDPOINT_LEN + 1)).is_err());
        let addr: SocketAddr = "[::1]:80".parse().unwrap();
        assert_eq!(Endpoint::from(addr).as_str(), "[::1]:80");
    }

    #[test]
    fn large_tables_split_into_frames_that_reassemble() {
        let long = ep(&"e".repeat(MAX_ENDPOINT_LEN));
        let table: Vec<Vec<Endpoint>> = (0..300).map(|_| vec![long.clone(); 2]).collect();
        let parts = peer_table_parts(&table);
        assert!(parts.len() > 1, "300 rows of 512 bytes need several frames");
        let mut rebuilt = Vec::new();
        for part in &parts {
            let mut out = Vec::new();
            part.encode(&mut out).unwrap();
            let ServerMsg::Peers {
                size,
                first,
                endpoints,
            } = ServerMsg::decode(&out).unwrap()
            else {
                panic!("not a peers part")
            };
            assert_eq!(size, 300);
            assert_eq!(first as usize, rebuilt.len());
            rebuilt.extend(endpoints);
        }
        assert_eq!(rebuilt, table);
    }

    fn arb_job() -> impl Strategy<Value = JobId> {
        "[A-Za-z0-9._-]{1,64}".prop_map(|s| JobId::new(s).unwrap())
    }

    fn arb_endpoint() -> impl Strategy<Value = Endpoint> {
        "[!-~]{1,255}".prop_map(Endpoint)
    }

    fn arb_endpoints() -> impl Strategy<Value = Vec<Endpoint>> {
        proptest::collection::vec(arb_endpoint(), 0..=MAX_ENDPOINTS)
    }

    fn arb_client() -> impl Strategy<Value = ClientMsg> {
        prop_oneof![
            Just(ClientMsg::Status),
            Just(ClientMsg::Leave),
            Just(ClientMsg::Hold),
            any::<u32>().prop_map(|peer| ClientMsg::Connect { peer }),
            (
                arb_job(),
                any::<u32>(),
                any::<u32>(),
                proptest::collection::vec(any::<u8>(), 0..=MAX_TOKEN_LEN),
            )
                .prop_map(|(job, from, to, token)| ClientMsg::Relay {
                    job,
                    from,
                    to,
                    token: Token(token),
                }),
            (
                arb_job(),
                any::<u32>(),
                any::<u32>(),
                arb_endpoints(),
                proptest::collection::vec(any::<u8>(), 0..=MAX_TOKEN_LEN),
            )
                .prop_map(|(job, rank, size, endpoints, token)| ClientMsg::Register {
                    job,
                    rank,
                    size,
                    endpoints,
                    token: Token(token),
                }),
        ]
    }

    fn arb_reason() -> impl Strategy<Value = RefuseReason> {
        prop_oneof![
            any::<u32>().prop_map(|rank| RefuseReason::DuplicateRank { rank }),
            (any::<u32>(), any::<u32>())
                .prop_map(|(expected, got)| RefuseReason::SizeMismatch { expected, got }),
            Just(RefuseReason::BadToken),
            (any::<u32>(), any::<u32>())
                .prop_map(|(rank, size)| RefuseReason::InvalidRank { rank, size }),
            any::<u8>().prop_map(|supported| RefuseReason::UnsupportedVersion { supported }),
            (any::<u32>(), any::<u32>()).prop_map(|(len, max)| RefuseReason::TooLarge { len, max }),
            Just(RefuseReason::Malformed),
            (any::<u32>(), any::<u32>())
                .prop_map(|(size, max)| RefuseReason::JobTooLarge { size, max }),
            Just(RefuseReason::ServerFull),
            Just(RefuseReason::JobComplete),
            Just(RefuseReason::JobExpired),
            Just(RefuseReason::UnexpectedMessage),
            Just(RefuseReason::UnknownJob),
            Just(RefuseReason::NotAttached),
            Just(RefuseReason::RelayTimeout),
            (16u8..=255).prop_map(|code| RefuseReason::Other { code }),
        ]
    }

    fn arb_server() -> impl Strategy<Value = ServerMsg> {
        prop_oneof![
            proptest::collection::vec(any::<u32>(), 0..64)
                .prop_map(|ranks| ServerMsg::Missing { ranks }),
            (
                proptest::collection::vec(arb_endpoints(), 0..12),
                0u32..4,
                0u32..4
            )
                .prop_map(|(endpoints, first, extra)| ServerMsg::Peers {
                    size: first + endpoints.len() as u32 + extra,
                    first,
                    endpoints,
                }),
            arb_reason().prop_map(|reason| ServerMsg::Refused { reason }),
            (
                any::<u32>(),
                proptest::option::of(prop_oneof![
                    (any::<[u8; 4]>(), any::<u16>())
                        .prop_map(|(ip, port)| SocketAddr::from((ip, port))),
                    (any::<[u8; 16]>(), any::<u16>())
                        .prop_map(|(ip, port)| SocketAddr::from((ip, port))),
                ]),
                arb_endpoints(),
                any::<u32>(),
            )
                .prop_map(|(peer, public, private, ms)| ServerMsg::Punch {
                    peer,
                    public,
                    private,
                    start_in: Duration::from_millis(u64::from(ms)),
                }),
            any::<u32>().prop_map(|peer| ServerMsg::RelayOffer { peer }),
            any::<u32>().prop_map(|peer| ServerMsg::Relayed { peer }),
            any::<u32>().prop_map(|peer| ServerMsg::NoPeer { peer }),
        ]
    }

    proptest! {
        #[test]
        fn client_messages_round_trip(msg in arb_client()) {
            let bytes = client_bytes(&msg);
            prop_assert!(bytes.len() <= PREFIX_LEN + MAX_FRAME_LEN);
            prop_assert_eq!(ClientMsg::decode(&bytes), Ok(msg));
        }

        #[test]
        fn server_messages_round_trip(msg in arb_server()) {
            let mut bytes = Vec::new();
            msg.encode(&mut bytes).unwrap();
            prop_assert_eq!(ServerMsg::decode(&bytes), Ok(msg));
        }

        #[test]
        fn every_strict_prefix_of_a_frame_is_rejected(msg in arb_client(), cut in any::<prop::sample::Index>()) {
            let bytes = client_bytes(&msg);
            let cut = cut.index(bytes.len());
            prop_assert!(ClientMsg::decode(&bytes[..cut]).is_err());
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = ClientMsg::decode(&bytes);
            let _ = ServerMsg::decode(&bytes);
        }

        #[test]
        fn mutated_frames_never_panic(
            msg in arb_server(),
            flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        ) {
            let mut bytes = Vec::new();
            msg.encode(&mut bytes).unwrap();
            for (at, value) in flips {
                let i = at.index(bytes.len());
                bytes[i] = value;
            }
            // Keep the prefix consistent so that decoding reaches the body.
            let len = (bytes.len() - PREFIX_LEN) as u32;
            bytes[..PREFIX_LEN].copy_from_slice(&len.to_be_bytes());
            let _ = ServerMsg::decode(&bytes);
            let _ = ClientMsg::decode(&bytes);
        }
    }
}
