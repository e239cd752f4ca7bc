//! The one error type of fmi. Channels, collectives and the communicator all return it, and
//! `fmi::Error` is this type, so a caller matches on one enum whatever layer failed.

use std::time::Duration;

use crate::{Rank, Tag};

/// Shorthand for results carrying [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in fmi. Each variant names the rank(s) and the channel involved
/// and its message says what to do about it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A peer did not send (or accept) a message before the deadline.
    #[error(
        "rank {me}: timed out after {waited:?} waiting for rank {peer} on the {channel} channel \
         ({tag}); check that rank {peer} is alive and calls the same operations in the same order, \
         or raise the deadline"
    )]
    Timeout {
        /// The rank that gave up.
        me: Rank,
        /// The rank it was waiting for.
        peer: Rank,
        /// How long it waited.
        waited: Duration,
        /// The channel it waited on.
        channel: &'static str,
        /// The tag it waited for.
        tag: Tag,
    },

    /// A peer's connection is gone (process died, network cut): nothing more can come from it.
    ///
    /// With `via: Some(r)` this rank did not see the loss itself: rank `r` did, and told the job
    /// (see [`crate::Channel::abort`]); every operation of this endpoint then fails with this
    /// error, naming the rank whose failure broke the job.
    #[error(
        "rank {me}: lost rank {peer} on the {channel} channel{}; the peer process exited or \
         its connection broke, so the job cannot complete: look at why rank {peer} failed, then \
         restart the job",
        via.map(|r| format!(" (reported by rank {r})")).unwrap_or_default()
    )]
    PeerLost {
        /// The rank that noticed.
        me: Rank,
        /// The rank that is gone.
        peer: Rank,
        /// The channel that lost it.
        channel: &'static str,
        /// The rank that saw the loss and reported it to this one, when this rank learned of it
        /// from another (`None`: this rank saw it itself).
        via: Option<Rank>,
    },

    /// A message is larger than the channel can carry.
    #[error(
        "message of {len} bytes exceeds the {channel} channel's limit of {max} bytes; split it or \
         use another channel"
    )]
    TooLarge {
        /// The message length.
        len: usize,
        /// The channel's limit.
        max: usize,
        /// The channel.
        channel: &'static str,
    },

    /// A rank outside `0..size` was named.
    #[error("rank {rank} is not in this job of {size} ranks (valid: 0..{size})")]
    InvalidRank {
        /// The rank named.
        rank: Rank,
        /// The job's size.
        size: u32,
    },

    /// A message's length is not a multiple of the receiving element type's size.
    #[error(
        "rank {me}: received {len} bytes from rank {peer}, not a multiple of the element size \
         {elem_size}; sender and receiver must use the same element type"
    )]
    TypeMismatch {
        /// The receiving rank.
        me: Rank,
        /// The sending rank.
        peer: Rank,
        /// The length received.
        len: usize,
        /// The receiver's element size.
        elem_size: usize,
    },

    /// A received message does not fit the caller's buffer, or ranks passed inconsistent counts to
    /// a collective.
    #[error(
        "rank {me}: {what}: expected {expected} elements, got {got} (from rank {peer}); every rank \
         must pass matching counts"
    )]
    CountMismatch {
        /// The rank that noticed.
        me: Rank,
        /// The rank whose contribution did not match.
        peer: Rank,
        /// The operation.
        what: &'static str,
        /// The count expected.
        expected: usize,
        /// The count received or given.
        got: usize,
    },

    /// A reduction was asked of a datatype it does not apply to (e.g. bitwise and of `f64`).
    #[error("reduction {op} is not defined for {datatype}; use a user-defined op instead")]
    UnsupportedOp {
        /// The operation.
        op: &'static str,
        /// The datatype.
        datatype: &'static str,
    },

    /// An argument is invalid (null buffer, zero size, ...).
    #[error("invalid argument: {what}")]
    InvalidArgument {
        /// What is wrong with it.
        what: &'static str,
    },

    /// A job id is empty, too long or contains characters outside `[A-Za-z0-9._-]`.
    #[error("job id {id:?} is invalid: use 1 to 64 characters of [A-Za-z0-9._-]")]
    InvalidJobId {
        /// The id given.
        id: String,
    },

    /// An environment variable is missing.
    #[error("environment variable {var} is not set; {hint}")]
    MissingEnv {
        /// The variable.
        var: &'static str,
        /// What to set it to.
        hint: &'static str,
    },

    /// An environment variable has a value that cannot be used.
    #[error("environment variable {var}={value:?} is invalid: {expected}")]
    InvalidEnv {
        /// The variable.
        var: &'static str,
        /// Its value.
        value: String,
        /// What it should be.
        expected: String,
    },

    /// The configuration file or value is invalid.
    #[error("invalid configuration{}: {detail}", path.as_ref().map(|p| format!(" in {p}")).unwrap_or_default())]
    Config {
        /// The file, when the configuration came from one.
        path: Option<String>,
        /// What is wrong.
        detail: String,
    },

    /// A serialized value could not be encoded or decoded.
    #[error("rank {me}: could not (de)serialize a value exchanged with rank {peer}: {source}")]
    Serialization {
        /// The rank that failed.
        me: Rank,
        /// The peer involved.
        peer: Rank,
        /// The codec's error.
        source: codec::CodecError,
    },

    /// Joining the job failed: the rendezvous server was unreachable or refused this rank, or
    /// other ranks never registered (`missing`). `source` is the bootstrap layer's own typed error
    /// (for the direct channel, `fmi_rendezvous::Error`), kept for downcasting.
    #[error("rank {me}: could not join the job: {source}")]
    Bootstrap {
        /// The rank that tried to join.
        me: Rank,
        /// Ranks that had not registered when this rank gave up (empty if not applicable).
        missing: Vec<Rank>,
        /// What went wrong.
        source: Box<dyn std::error::Error + Send + Sync + 'static>,
    },

    /// The blocking API was called from inside an async runtime, where it would deadlock.
    #[error(
        "fmi::blocking was called from inside a tokio runtime; use the async fmi::Communicator \
         there, or call the blocking API from a plain thread"
    )]
    NestedRuntime,

    /// The channel or communicator was shut down.
    #[error("the {channel} channel is closed")]
    Closed {
        /// The channel.
        channel: &'static str,
    },

    /// An I/O error on a channel.
    #[error("rank {me}: i/o error on the {channel} channel{}: {source}", peer.map(|p| format!(" with rank {p}")).unwrap_or_default())]
    Io {
        /// The rank that saw it.
        me: Rank,
        /// The peer, if the error concerns one.
        peer: Option<Rank>,
        /// The channel.
        channel: &'static str,
        /// The underlying error.
        source: std::io::Error,
    },
}

/// A codec error kept opaque so that no serialization crate's type leaks through the API.
pub(crate) mod codec {
    use std::fmt;

    /// A (de)serialization failure, described in words.
    #[derive(Debug)]
    pub struct CodecError(pub String);

    impl fmt::Display for CodecError {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(&self.0)
        }
    }

    impl std::error::Error for CodecError {}
}

impl Error {
    /// The peer this error concerns, when it concerns one (for `Timeout`, `PeerLost`, ...).
    pub fn peer(&self) -> Option<Rank> {
        match self {
            Error::Timeout { peer, .. }
            | Error::PeerLost { peer, .. }
            | Error::TypeMismatch { peer, .. }
            | Error::CountMismatch { peer, .. }
            | Error::Serialization { peer, .. } => Some(*peer),
            Error::Io { peer, .. } => *peer,
            _ => None,
        }
    }

    /// Whether the error means a peer is dead or silent (`Timeout` or `PeerLost`).
    pub fn is_peer_failure(&self) -> bool {
        matches!(self, Error::Timeout { .. } | Error::PeerLost { .. })
    }
}
