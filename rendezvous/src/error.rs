//! The one error type of the rendezvous client and of the types it takes.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use fmi_channels::JobId;

use crate::wire::{DecodeError, RefuseReason};

/// Everything that can go wrong when registering with a rendezvous server. Never carries a token.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The deadline passed while other ranks of the job had not registered yet: start them, or
    /// give the job a later deadline.
    #[error(
        "rank {rank} of job {job}: timed out after {waited:?} waiting for ranks {} to register; \
         check that they were started with the same job id, or raise the deadline",
        RankList(.missing)
    )]
    Timeout {
        /// The job.
        job: JobId,
        /// The rank that gave up.
        rank: u32,
        /// The ranks the server last reported as missing, ascending.
        missing: Vec<u32>,
        /// How long the rank waited.
        waited: Duration,
    },

    /// The server (or, for a registration that could never be valid, this client) refused the
    /// registration: fix what the reason names; retrying unchanged will not help.
    #[error("rendezvous of job {job} rank {rank} refused: {reason}")]
    Refused {
        /// The job.
        job: JobId,
        /// The rank that was refused.
        rank: u32,
        /// Why.
        reason: RefuseReason,
    },

    /// The server could not be reached, or stopped answering, until the deadline: check that it
    /// runs at that address and is reachable.
    #[error(
        "could not register with the rendezvous server at {server} within {waited:?} \
         ({attempts} attempts); check that it runs and is reachable"
    )]
    Unreachable {
        /// The server's address.
        server: SocketAddr,
        /// How many connections were tried.
        attempts: u32,
        /// How long the client tried.
        waited: Duration,
        /// The last failure.
        #[source]
        source: io::Error,
    },

    /// The server sent something this client cannot understand: the two sides speak different
    /// protocol versions, or one of them is faulty.
    #[error("the rendezvous server at {server} broke the protocol")]
    Protocol {
        /// The server's address.
        server: SocketAddr,
        /// What was wrong.
        #[source]
        source: DecodeError,
    },

    /// An endpoint is not 1 to 255 printable ASCII characters without spaces.
    #[error("endpoint {endpoint:?} is not 1 to 255 printable ASCII characters without spaces")]
    InvalidEndpoint {
        /// The text given.
        endpoint: String,
    },

    /// A rank announced more endpoints than the protocol carries; announce fewer.
    #[error("{count} endpoints given, more than the limit of {max}")]
    TooManyEndpoints {
        /// How many were given.
        count: usize,
        /// The limit.
        max: usize,
    },

    /// A job token is longer than the protocol allows; use a shorter secret.
    #[error("job token of {len} bytes is longer than the limit of {max} bytes")]
    InvalidToken {
        /// The token's length (never its content).
        len: usize,
        /// The limit.
        max: usize,
    },
}

/// Prints a rank list compactly: the first ranks, then how many more.
struct RankList<'a>(&'a [u32]);

impl fmt::Display for RankList<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const SHOWN: usize = 32;
        if self.0.is_empty() {
            return f.write_str("(none reported)");
        }
        for (i, rank) in self.0.iter().take(SHOWN).enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{rank}")?;
        }
        if self.0.len() > SHOWN {
            write!(f, " and {} more", self.0.len() - SHOWN)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeout_message_lists_missing_ranks_compactly() {
        let err = Error::Timeout {
            job: JobId::new("j").unwrap(),
            rank: 0,
            missing: (1..=40).collect(),
            waited: Duration::from_secs(1),
        };
        let msg = err.to_string();
        assert!(msg.contains("ranks 1, 2, 3"), "{msg}");
        assert!(msg.contains("32 and 8 more"), "{msg}");
    }
}
