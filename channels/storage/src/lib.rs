//! # fmi-storage: storage channels
//!
//! Serverless functions that cannot connect to each other exchange messages through storage.
//! Each backend implements the narrow [`Mailbox`] trait (put / take / get / delete / list /
//! incr); one generic adapter, [`StorageChannel`], turns any mailbox into an
//! [`fmi_channels::Channel`] for one rank. This crate has the Redis backend
//! ([`RedisMailbox`]); S3 and DynamoDB live in `fmi-aws`.
//!
//! ```text
//!   rank 0 StorageChannel                                   rank 1 StorageChannel
//!   send(dst 1, tag, data)                                  recv(src 0, tag)
//!     seq = next_seq[(1, tag)]++   (at call time)             turn = queue[(0, tag)].join() (call order)
//!     put chunks 1.., then chunk 0 ──► Mailbox ◄── take chunk 0, then chunks 1..  (seq = next_seq)
//!                                  (Redis, S3, DynamoDB)
//! ```
//!
//! ## Key layout
//! Everything of a job lives under `fmi/{job}/` ([`job_prefix`]), so [`cleanup_job`] can list
//! and delete it:
//!
//! ```text
//! fmi/{job}/m/{src}/{dst}/{tag:016x}/{seq:016x}/{chunk}   point-to-point message chunk
//! fmi/{job}/b/{root}/{tag:016x}/{chunk}                   broadcast payload chunk
//! fmi/{job}/b/{root}/{tag:016x}/n                         broadcast reader counter
//! fmi/{job}/x/{tag:016x}/n                                barrier arrival counter
//! fmi/{job}/x/{tag:016x}/go                               barrier release flag
//! fmi/{job}/g/{root}/{tag:016x}/{src}/{chunk}             gather: rank src's block
//! fmi/{job}/g/{root}/{tag:016x}/n                         gather arrival counter
//! fmi/{job}/g/{root}/{tag:016x}/go                        gather "all blocks stored" flag
//! ```
//!
//! A message is one or more chunks of at most `max_value` bytes (the backend's limit, or
//! [`StorageConfig::max_chunk`]). Chunk 0 carries a 13-byte header (total length, chunk count)
//! and is written **last**, after every other chunk: seeing it means the whole message is there.
//!
//! ## Ordering and exactly once
//! `send` takes the next sequence number of its (destination, tag) synchronously, when called;
//! receivers of one (source, tag) queue in a turnstile in call order and the head reads
//! sequence number `next_seq`. Keys are unique per message and chunk, a put may be repeated
//! (it overwrites), and a take deletes what it read, so retrying a failed request (with backoff,
//! until the deadline) never loses or duplicates a message. A receiver that times out leaves its
//! sequence number to the next receiver, together with any chunks it already took.
//!
//! One corner is inherent to "write at least once, delete on read" without tombstones: a put
//! that was applied but whose answer was lost, retried *after* the receiver already consumed the
//! key, stores that key again. It is never delivered (the receiver has moved on to the next
//! sequence number); it expires with the backend's TTL and [`cleanup_job`] removes it. Only
//! connection failures in the middle of a put can cause it, so a launcher should call
//! [`cleanup_job`] when a job ends.
//!
//! ## Waiting
//! ```text
//!  push mailbox (Redis)                       poll mailbox (S3, DynamoDB)
//!  take(key, deadline) blocks server-side     take(key) answers at once
//!  until the key is pushed or min(deadline,   first poll when this source's messages tend to
//!  max_block): no polling, no empty reads     arrive (learned); None -> sleep, doubling up to
//!                                             poll_max -> take again, until the deadline
//! ```
//! A poll backend learns, per source rank, when messages arrive after a receiver starts
//! waiting, and sends its first poll then rather than at once (a high quantile of the arrival
//! time, so that about 85 % of first polls find the message; see docs/configuration.md for the
//! latency/requests trade-off). Without an estimate yet, it polls at once and backs off from
//! `poll_initial`.
//! When the deadline passes the receive fails with [`fmi_channels::Error::Timeout`] naming the
//! source rank; a backend failure that persists becomes [`fmi_channels::Error::Io`] carrying the
//! [`MailboxError`].
//!
//! ## Storage-native collectives
//! With atomic counters (Redis, DynamoDB) the channel offers a broadcast (one chunked write by
//! the root, one read per other rank; the last reader, counted with `incr`, deletes the object)
//! and a barrier (every rank increments a counter; the last writes a release flag the others wait
//! for; a second round on the counter elects who deletes both) and a gather (every other rank
//! writes its block, then increments a counter; the one that completes the count writes a flag
//! the root waits for, and the root then takes every block at once, without listing, and
//! removes counter and flag). Without counters (S3) the
//! collectives fall back to point-to-point messages. The choice depends on the configuration
//! only, so every rank takes the same one.
//!
//! ## Redis, per message chunk
//! ```text
//!  sender    MULTI; DEL k; RPUSH k v; PEXPIRE k ttl; EXEC       1 round trip  (puts += 1)
//!  receiver  BLMOVE k k LEFT LEFT t   (blocks, non-destructive)   1 round trip  (gets += 1)
//!            DEL k   (queued; sent in front of the mailbox's next  no round trip (deletes += 1)
//!                     request, or by a background task 2 ms later, or when the mailbox drops)
//! ```
//! See [`RedisMailbox`] for why the read is a rotation and not `BLPOP`.
//!
//! Request counters per mailbox ([`RequestStats`]) let the cost model turn a run into dollars.

mod channel;
mod cleanup;
mod config;
mod keys;
mod mailbox;
mod redis;
pub mod testing;

pub use channel::StorageChannel;
pub use cleanup::cleanup_job;
pub use config::StorageConfig;
#[doc(hidden)]
pub use keys::fuzz_decode_chunk;
pub use keys::job_prefix;
pub use mailbox::{
    Failures, Mailbox, MailboxError, MailboxLimits, Mark, RequestStats, StatsSnapshot,
};
pub use redis::{RedisConfig, RedisMailbox};
