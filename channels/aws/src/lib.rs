//! # fmi-aws: S3 and DynamoDB mailboxes
//!
//! Two [`fmi_storage::Mailbox`] backends on AWS storage services; `fmi_storage::StorageChannel`
//! turns either into an `fmi_channels::Channel` (chunking, ordering, polling, retries).
//!
//! | | [`S3Mailbox`] | [`DynamoMailbox`] |
//! |---|---|---|
//! | one value | one object `prefix + key` | one item `{k: key, v: bytes, ttl: epoch s}` |
//! | largest value ([`MailboxLimits::max_value`](fmi_storage::MailboxLimits)) | 64 MiB (configurable; S3 allows 5 GB per PUT, multipart above 16 MiB) | 350,000 B (items are limited to 400 KB) |
//! | waiting | polling (`push: false`) | polling (`push: false`) |
//! | atomic counter (`incr`) | none | UpdateItem `ADD` |
//! | expiry of leftovers | lifecycle rule ([`S3Mailbox::expire_after_days`]) | TTL attribute `ttl` (enabled by [`DynamoMailbox::setup`]) |
//!
//! ## Requests and cost per message
//!
//! Prices are us-east-1 list prices. A message of `n` bytes that fits in one value (the adapter
//! cuts larger ones into `⌈n / max_value⌉` chunks, each costing the same again), received after
//! `p` empty polls:
//!
//! **S3**: sender 1 PutObject (a PUT, $0.005 per 1000); receiver `p + 1` GetObject (GET,
//! $0.0004 per 1000; a 404 is billed like any GET) and 1 DeleteObject (free). A message costs
//! about $5.4 per million plus $0.4 per million polls. Values above the multipart threshold
//! take `⌈n / part_size⌉ + 2` PUT-class requests. ListObjectsV2 is PUT-priced, one per 1000
//! keys (cleanup only); DeleteObjects is free.
//!
//! **DynamoDB** (on-demand): sender 1 PutItem, `⌈item / 1 KB⌉` write units ($0.625 per million);
//! receiver `p + 1` strongly consistent GetItem (`⌈item / 4 KB⌉` read units, $0.125 per
//! million; 1 unit per empty poll) and 1 DeleteItem (`⌈item / 1 KB⌉` write units). Read and
//! delete are two requests on purpose: a single DeleteItem with `ReturnValues=ALL_OLD` would
//! lose the message when the delete is applied but its answer lost (see `delete_read`). A 1 KB
//! message costs about $1.4 per million plus $0.125 per million polls; a 350 KB chunk
//! 342 + 86 + 342 units, about $0.44 per thousand. `get` (broadcast readers) is a strongly
//! consistent GetItem, `⌈item / 4 KB⌉` read units ($0.125 per million). `list` is a Scan with a
//! `begins_with` filter: keys are spread over partitions by their hash, so there is no cheaper
//! prefix query, and a Scan reads — and bills — the **whole table** (`⌈table size / 4 KB⌉` read
//! units, 1 MB per page) whatever the filter keeps. Only cleanup lists; keep the mailbox table to
//! itself and let TTL remove leftovers.
//!
//! Every request is counted in [`fmi_storage::RequestStats`] (puts, gets, empty gets, deletes,
//! lists, counters, bytes), and for DynamoDB the consumed capacity units the server reports
//! (`ReturnConsumedCapacity=TOTAL`; AWS and dynalite report them). When a server reports none
//! the units are estimated from the item size: 1 write unit per KB written, 1 read unit per
//! 4 KB read, at least 1; Scan estimates count only the returned keys, a lower bound.
//!
//! ## Errors and retries
//!
//! Every failure is a [`fmi_storage::MailboxError`] naming the backend and the operation, with
//! no SDK type in it and no credentials. Throttling codes, 429, 5xx, timeouts and failures to
//! connect or read an answer are `retryable`; the adapter retries those with backoff until the
//! message deadline. The SDK's own retries are off, so the counters equal the HTTP requests sent.
//!
//! ## Configuration
//!
//! [`S3Config`] and [`DynamoConfig`] deserialize from the `[channels.s3]` and
//! `[channels.dynamodb]` tables of the fmi config file (unknown fields are errors). Region and
//! endpoint fall back to the SDK's standard environment (`AWS_REGION`, `AWS_ENDPOINT_URL_S3`,
//! `AWS_ENDPOINT_URL_DYNAMODB`, `AWS_ENDPOINT_URL`, profiles); credentials always come from the
//! standard AWS chain. `connect` checks that the bucket or table exists, so a wrong name fails
//! at startup; `setup` creates it (idempotently) for tests and `fmi setup`.
//!
//! ## Local servers
//!
//! The tests run against s3s-fs 0.14.1 and dynalite 4.0.0 started by `scripts/services.sh`.
//! What they lack, and how this crate copes:
//! - s3s-fs has no lifecycle configuration: [`S3Mailbox::expire_after_days`] returns
//!   `Ok(false)` there (AWS S3 and MinIO have it). It answers `BucketAlreadyExists` for a bucket
//!   that is ours, so `setup` checks with HeadBucket whether it may use the bucket.
//! - dynalite has DescribeTimeToLive but no UpdateTimeToLive, so [`DynamoMailbox::setup`]
//!   reports `ttl_enabled: false` there.
//! - Both enforce the real limits that matter here: dynalite rejects items over 400 KB and
//!   table names under 3 characters; s3s-fs checks SigV4 signatures.

mod dynamo;
mod error;
mod s3;
mod sdk;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use fmi_channels::Instant;
use fmi_storage::{MailboxError, RequestStats};

/// How long `take` waits for the delete of a value it has read before returning the value and
/// leaving further attempts to a background task. Well under the adapter's one-second grace
/// past the deadline, so a slow delete never makes the adapter drop a value already read.
const DELETE_INLINE: Duration = Duration::from_millis(500);
/// Attempts at deleting a value `take` has read (the first inline, the rest in the background,
/// 20 ms doubling: about 2.5 s in all). Deletes are idempotent, so retrying is always safe.
const DELETE_ATTEMPTS: u32 = 8;

/// Deletes a value that `take` has already read, **without ever failing the take**: once read,
/// the value is returned whatever happens to its delete. A take that read and deleted in one
/// request (DynamoDB's DeleteItem returning the item) or that reported a failed delete (and so
/// got retried) loses the message when the delete was applied but its answer lost: the retry
/// finds nothing. Here the read is repeatable (GET / GetItem) and only the delete is retried,
/// which cannot re-deliver (the adapter moves on to the next sequence number) nor lose.
///
/// The first attempt runs inline (bounded by [`DELETE_INLINE`] and the deadline); if it fails
/// with a retryable error or is too slow, a background task retries with backoff. A key that
/// cannot be deleted is never read again; it expires (TTL attribute, lifecycle rule) or goes
/// with `cleanup_job`.
pub(crate) async fn delete_read<F, Fut>(
    backend: &'static str,
    key: &str,
    deadline: Instant,
    stats: Arc<RequestStats>,
    attempt: F,
) where
    F: Fn() -> Fut + Send + 'static,
    Fut: Future<Output = Result<(), MailboxError>> + Send + 'static,
{
    let now = Instant::now();
    let until = (now + DELETE_INLINE).min(deadline.max(now) + DELETE_INLINE / 2);
    match tokio::time::timeout_at(until, attempt()).await {
        Ok(Ok(())) => return,
        Ok(Err(e)) if !e.retryable => {
            tracing::warn!(backend, %key, error = %e, "could not delete a value after reading it; it expires or goes with cleanup");
            return;
        }
        _ => {}
    }
    let key = key.to_owned();
    tokio::spawn(async move {
        let mut pause = Duration::from_millis(20);
        for n in 2..=DELETE_ATTEMPTS {
            RequestStats::add(&stats.retries, 1);
            tokio::time::sleep(pause).await;
            pause *= 2;
            match attempt().await {
                Ok(()) => return,
                Err(e) if !e.retryable || n == DELETE_ATTEMPTS => {
                    tracing::warn!(backend, %key, error = %e, "could not delete a value after reading it; it expires or goes with cleanup");
                    return;
                }
                Err(_) => {}
            }
        }
    });
}

/// Attempts of a mailbox's connect check (HeadBucket, DescribeTable) when it fails in a way
/// worth retrying (a dropped connection, a 5xx, throttling): a server that blips while a
/// function starts does not fail the job. Pauses of 100, 200 and 400 ms between them.
const CONNECT_ATTEMPTS: u32 = 4;

/// Runs `attempt` until it succeeds, fails for good, or [`CONNECT_ATTEMPTS`] have failed.
pub(crate) async fn with_connect_retries<T, F, Fut>(
    stats: &RequestStats,
    mut attempt: F,
) -> Result<T, MailboxError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, MailboxError>>,
{
    let mut pause = Duration::from_millis(100);
    let mut n = 1;
    loop {
        match attempt().await {
            Err(e) if e.retryable && n < CONNECT_ATTEMPTS => {
                tracing::debug!(error = %e, attempt = n, "connect check failed; retrying");
                RequestStats::add(&stats.retries, 1);
                tokio::time::sleep(pause).await;
                pause *= 2;
                n += 1;
            }
            r => return r,
        }
    }
}

pub use dynamo::{
    DynamoConfig, DynamoMailbox, DynamoSetup, COUNTER_ATTR, DEFAULT_MAX_VALUE, ITEM_LIMIT,
    KEY_ATTR, TTL_ATTR, VALUE_ATTR,
};
pub use s3::{S3Config, S3Mailbox, LIFECYCLE_RULE_ID, MIN_PART_SIZE};
