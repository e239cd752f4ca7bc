//! # fmi-model: which channel, which algorithm, and what it costs
//!
//! A job may reach its peers over several channels (direct TCP, Redis, S3, DynamoDB). They
//! differ by orders of magnitude in latency and in price, and the best one depends on the
//! operation, the message size, the number of ranks and on whether you pay for time or for
//! requests. This crate predicts, for every operation of the communicator, the time and the
//! dollars of every algorithm on every channel from a few parameters per channel, and picks the
//! best under an objective. It knows nothing of sockets or SDKs: it is arithmetic on a
//! [`ModelConfig`].
//!
//! ```text
//!  [model] in the config file ─► ModelConfig ──────────────┐   (defaults: FMI constants,
//!     (per-channel tables)       α, β, request, polls,     │    us-east-1 list prices)
//!                                chunk limits, prices       │
//!                                                           ▼
//!  op, bytes, ranks ─────────────────────────────► estimate(channel, algorithm)
//!                                                   steps of messages ─► seconds, Requests
//!                                                   Requests × prices + waiting GB-s ─► $
//!                                                           │   (every applicable pair)
//!  objective (fast | cheap | $ per s) ──────────────────────▼
//!  channels the job has ───────────────────────────► choose ─► Choice { channel, algorithm,
//!                                                                seconds, dollars, runner_up }
//!  Communicator::counters() ─► Ledger ─► LedgerReport (measured requests at model prices)
//! ```
//!
//! ## The message model
//! On TCP a message of n bytes takes `α + nβ` (FMI's model). A storage channel stores the
//! message as chunks of at most `max_chunk` bytes (13-byte header in chunk 0, written last):
//!
//! ```text
//!  writer: ⌈(k−1)/put_concurrency⌉ + 1 waves of `request` + nβ/2   ──► value stored at `ready`
//!  reader: push (Redis): reads at `ready`
//!          poll (S3, DynamoDB): polls at 0, then after pauses of poll_initial, ×2 … poll_max,
//!          each empty poll taking `request` and being billed ──► first poll at/after `ready`
//!          then k reads of `request` + nβ/2
//! ```
//!
//! With the default `request = α/2` one chunk to a waiting push reader costs exactly `α + nβ`.
//! A receiver that posted its receive before the sender started (tree algorithms: it waits from
//! the start of the operation) has backed off further and notices later — and pays for every
//! empty poll meanwhile.
//!
//! An algorithm is a list of steps (rounds); a step lasts as long as its slowest message (or, on
//! a channel with an aggregate bandwidth such as one Redis server, as long as all its bytes take
//! through the server), plus γ per reduced byte. The step lists reproduce the α-β table of
//! `fmi-collectives` exactly on a channel without polling or chunking (tested). The
//! storage-native broadcast (1 PUT + N−1 GETs) and counter barrier are priced separately and
//! apply only to channels with atomic counters (Redis, DynamoDB).
//!
//! ## The price model
//! `dollars = requests × per-request prices + capacity units × unit prices
//!           + seconds × (ranks waiting × memory GB × GB-second price + instance $/h ÷ 3600)`.
//! Requests are predicted in the vocabulary of the storage counters ([`Requests`]), so a
//! prediction and a measured run ([`Ledger`]) are priced by the same function.
//!
//! ## Determinism
//! [`choose`] is a pure function of its arguments; it uses only IEEE basic arithmetic (exactly
//! rounded on every platform), breaks ties by a fixed order ([`ChannelKind::ALL`], then
//! [`Op::algorithms`]) and ignores the order of the channel list. [`config_hash`] (FNV-1a over a
//! fixed encoding) lets ranks check at bootstrap that they hold the same inputs.
//!
//! See docs/model.md for the parameters, their sources and `fmi explain`.

pub mod calibrate;
mod choose;
mod cost;
pub mod explain;
mod hash;
mod jobfile;
mod ledger;
mod ops;
mod params;
mod requests;
mod units;

pub use choose::{canonical, choose, estimates, ranked, Candidate, Choice, Model, CHOICE_CACHE};
pub use cost::{applicable, estimate, Estimate};
pub use hash::config_hash;
pub use jobfile::JobConfig;
pub use ledger::{Ledger, LedgerLine, LedgerReport, Usage};
pub use ops::{Algorithm, Op};
pub use params::{
    defaults, ChannelKind, ChannelParams, ModelConfig, ModelFile, Objective, Prices, HEADER_BYTES,
};
pub use requests::Requests;
pub use units::{Bytes, Dollars, Seconds, SecondsPerByte};

use std::fmt;

/// What can go wrong: a bad configuration or name, no channel to choose from.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ModelError {
    /// A value or section is invalid; the text says which and why.
    Invalid(String),
    /// A name that is not one of the known ones.
    UnknownName {
        /// What kind of name (`channel`, `operation`, `objective`, `algorithm`).
        what: &'static str,
        /// The name given.
        name: String,
        /// The names that exist.
        known: &'static str,
    },
    /// The list of channels to choose from is empty.
    NoChannels,
}

impl fmt::Display for ModelError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ModelError::Invalid(s) => write!(f, "model: {s}"),
            ModelError::UnknownName { what, name, known } => {
                write!(f, "model: unknown {what} {name:?} (known: {known})")
            }
            ModelError::NoChannels => f.write_str(
                "model: no channel to choose from (configure [channels.*], use a rendezvous, \
                 or name the channels)",
            ),
        }
    }
}

impl std::error::Error for ModelError {}
