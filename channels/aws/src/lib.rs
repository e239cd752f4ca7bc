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
//! receiver `p + 1` DeleteItem with `ReturnValues=ALL_OLD`, which removes and returns the item
//! in one atomic request: `⌈item / 1 KB⌉` write units when found, 1 write unit per empty poll.
//! A 1 KB message costs about $1.25 per million plus $0.625 per million polls; a 350 KB chunk
//! 342 + 342 write units, about $0.43 per thousand. `get` (broadcast readers) is a strongly
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

pub use dynamo::{
    DynamoConfig, DynamoMailbox, DynamoSetup, COUNTER_ATTR, DEFAULT_MAX_VALUE, ITEM_LIMIT,
    KEY_ATTR, TTL_ATTR, VALUE_ATTR,
};
pub use s3::{S3Config, S3Mailbox, LIFECYCLE_RULE_ID, MIN_PART_SIZE};
