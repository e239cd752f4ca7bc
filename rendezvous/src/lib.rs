//! # fmi-rendezvous: how the ranks of a job find each other
//!
//! Serverless functions start without knowing where their peers are. Each rank of a job registers
//! with a rendezvous server — `(job id, rank, size, its endpoints, job token)` — and once all
//! `size` ranks of the job have registered, every rank receives the same peer table: the
//! endpoints of every rank, indexed by rank. Channels then connect to each other directly.
//!
//! ```text
//!  rank 0                      rendezvous server                      rank 1
//!    │── Register{job,0,2,eps,token} ─▶│                                  │
//!    │◀──────── Missing{[1]} ──────────│                                  │
//!    │                                 │◀── Register{job,1,2,eps,token} ──│
//!    │◀─────── Peers{table} ───────────┼───────── Peers{table} ──────────▶│
//!    │── Leave ───────────────────────▶│◀──────────────── Leave ──────────│
//!
//!  near its deadline a waiting rank sends Status and gets Missing{ranks} back;
//!  a rank the server will not serve gets Refused{reason} and is disconnected.
//! ```
//!
//! ## NAT traversal
//! Ranks behind NATs cannot dial each other's listeners. A rank that [`join`]s (instead of
//! [`register`]ing) keeps its rendezvous connection attached, made from a socket with
//! `SO_REUSEADDR`/`SO_REUSEPORT`, and hands it to the TCP channel as a
//! [`Session`] → [`fmi_channels::tcp::nat::Traversal`]. The server remembers the address it saw
//! each connection come from (the NAT's public side), coordinates simultaneous TCP opens, and
//! relays the pairs that cannot punch through (symmetric NATs):
//!
//! ```text
//!  rank 0 ── Connect{1} ─▶ server ── Punch{1, public₁, private₁, start_in} ─▶ rank 0
//!                                 └─ Punch{0, public₀, private₀, start_in} ─▶ rank 1
//!  both connect() from their rendezvous port to the other's public address at once:
//!  the SYNs cross, each NAT has a mapping for the other's, the connection opens both ways.
//!
//!  no connection after ~800 ms:
//!  rank 0' ── Relay{job,0,1,token} ─▶ server ── RelayOffer{0} ─▶ rank 1 (attached connection)
//!  rank 1' ── Relay{job,1,0,token} ─▶ server ── Relayed ─▶ both; then bytes are spliced 0' ⇄ 1'
//! ```
//! The relay is part of the server ([`ServerConfig::relay_buffer`], [`ServerConfig::relay_timeout`]);
//! only an attached rank of a complete job, with the job's token, may relay, and only to a rank
//! of its job. See `docs/nat.md` for the whole picture and the network-namespace test matrix.
//!
//! The crate is layered so that the protocol can grow without rewriting what is here:
//!
//! - [`wire`]: versioned, length-prefixed frames with one message enum per direction, strictly
//!   bounded decoding.
//! - [`server_state`]: the server's rules as a sans-IO state machine (time is an argument), so
//!   that they can be tested with a fake clock and fuzzed.
//! - [`Server`] / [`run`]: the tokio driver — one task per connection, all owned by a
//!   [`ServerHandle`].
//! - [`register`]: the client, with retries until a deadline and a timeout error that names the
//!   missing ranks; [`join`], [`Session`] and [`RelayDialer`] for NAT traversal.
//!
//! Jobs are isolated: a job's first registration fixes its size and token, and registrations
//! that disagree are refused with a typed [`RefuseReason`]. Tokens are compared in constant time
//! and never logged or put into errors.

#![forbid(unsafe_code)]
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

mod client;
mod config;
mod error;
mod framed;
mod server;
pub mod server_state;
pub mod stun;
pub mod wire;

pub use client::{
    join, parse_endpoint, register, Joined, PeerTable, Registration, RelayDialer, Session,
};
pub use config::ServerConfig;
pub use error::Error;
pub use fmi_channels::JobId;
pub use server::{run, Server, ServerHandle};
pub use tokio::time::Instant;
pub use wire::{Endpoint, RefuseReason, Token};
