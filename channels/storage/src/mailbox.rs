//! The narrow interface every storage backend implements.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

use fmi_channels::Instant;
use futures::future::{BoxFuture, FutureExt};

/// A backend failure, kept opaque so that no SDK type leaks: `retryable` says whether the
/// adapter may try the same request again (throttling, connection reset, 5xx).
#[derive(Debug, thiserror::Error)]
#[error("{backend} {op} failed{}: {detail}", if *.retryable { " (retryable)" } else { "" })]
pub struct MailboxError {
    /// The backend (`"redis"`, `"s3"`, `"dynamodb"`).
    pub backend: &'static str,
    /// The request kind (`"put"`, `"take"`, ...).
    pub op: &'static str,
    /// Whether retrying the same request may succeed.
    pub retryable: bool,
    /// What the backend said, without credentials.
    pub detail: String,
}

/// Static properties of a backend that the adapter plans around.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct MailboxLimits {
    /// Largest value one `put` may store (DynamoDB: well under 400 KB; S3: 5 GB).
    pub max_value: usize,
    /// Whether `take` blocks server-side until the key appears (Redis BLPOP). When false the
    /// adapter polls `take` with bounded exponential backoff.
    pub push: bool,
}

impl MailboxLimits {
    /// Limits of a backend storing values up to `max_value` bytes, whose `take` blocks
    /// server-side (`push`) or answers at once (`!push`). (The struct is `#[non_exhaustive]`, so
    /// backends in other crates build it here.)
    pub const fn new(max_value: usize, push: bool) -> MailboxLimits {
        MailboxLimits { max_value, push }
    }
}

/// Request counters by kind, so the cost model can turn them into dollars. All counters are
/// monotonic; read them with [`RequestStats::snapshot`].
#[derive(Debug, Default)]
pub struct RequestStats {
    /// Writes (S3 PUT / UploadPart, DynamoDB PutItem, Redis RPUSH/SET).
    pub puts: AtomicU64,
    /// Reads (S3 GET, DynamoDB GetItem/DeleteItem-returning-value, Redis BLPOP/GET), including
    /// ones that found nothing.
    pub gets: AtomicU64,
    /// Reads that found nothing (polls that came back empty).
    pub empty_gets: AtomicU64,
    /// Deletes (single or batch requests; one per request).
    pub deletes: AtomicU64,
    /// List requests (one per page).
    pub lists: AtomicU64,
    /// Atomic counter updates.
    pub counters: AtomicU64,
    /// DynamoDB write capacity units consumed (1 KB each), or 0 for other backends.
    pub write_units: AtomicU64,
    /// DynamoDB read capacity units consumed (4 KB strongly consistent each).
    pub read_units: AtomicU64,
    /// Payload bytes written.
    pub bytes_put: AtomicU64,
    /// Payload bytes read.
    pub bytes_got: AtomicU64,
    /// Requests retried after a retryable failure.
    pub retries: AtomicU64,
}

/// A point-in-time copy of [`RequestStats`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[allow(missing_docs)]
pub struct StatsSnapshot {
    pub puts: u64,
    pub gets: u64,
    pub empty_gets: u64,
    pub deletes: u64,
    pub lists: u64,
    pub counters: u64,
    pub write_units: u64,
    pub read_units: u64,
    pub bytes_put: u64,
    pub bytes_got: u64,
    pub retries: u64,
}

impl RequestStats {
    /// Adds `n` to a counter.
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// The current values.
    pub fn snapshot(&self) -> StatsSnapshot {
        let l = |c: &AtomicU64| c.load(Ordering::Relaxed);
        StatsSnapshot {
            puts: l(&self.puts),
            gets: l(&self.gets),
            empty_gets: l(&self.empty_gets),
            deletes: l(&self.deletes),
            lists: l(&self.lists),
            counters: l(&self.counters),
            write_units: l(&self.write_units),
            read_units: l(&self.read_units),
            bytes_put: l(&self.bytes_put),
            bytes_got: l(&self.bytes_got),
            retries: l(&self.retries),
        }
    }
}

/// A job's failure record as `(reporter, blamed)` pairs, or `None` where the backend keeps none
/// (see [`Mailbox::failures`]).
pub type Failures = Option<Vec<(u32, u32)>>;

/// One member recorded with a counter by [`Mailbox::incr_marking`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mark {
    /// The rank that counted itself.
    pub member: u32,
    /// The counter's value right after that rank's (last) increment, where the backend records
    /// it (Redis); the rank whose increment completed a count is the one that had to raise the
    /// flag the others wait for.
    pub at: Option<i64>,
}

/// A key-value store used as a mailbox. Keys are printable ASCII built by the adapter
/// (`fmi/{job}/{src}/{dst}/{tag}/{seq}/{chunk}`-like, see the adapter); values are bytes of at
/// most [`MailboxLimits::max_value`].
///
/// Every method must be safe to retry: `put` of the same key and value twice stores it once
/// (overwrite or conditional write), `take` removes what it returns, `delete` of a missing key
/// succeeds.
pub trait Mailbox: Send + Sync + fmt::Debug + 'static {
    /// Short lowercase backend name, used as the channel name (`"redis"`, `"s3"`, `"dynamodb"`).
    fn name(&self) -> &'static str;

    /// The backend's limits.
    fn limits(&self) -> MailboxLimits;

    /// Stores `value` under `key` (with the backend's TTL / expiry attribute where it has one).
    fn put<'a>(&'a self, key: &'a str, value: &'a [u8]) -> BoxFuture<'a, Result<(), MailboxError>>;

    /// Stores `head` followed by `body` as one value under `key`: the same as [`Mailbox::put`]
    /// of their concatenation. The adapter writes the first chunk of every message this way
    /// (its 13-byte header, then payload), so that a backend which copies the value into its
    /// request anyway (Redis) skips building the concatenation, a copy and an allocation as
    /// large as the chunk. The default concatenates and calls [`Mailbox::put`].
    fn put_parts<'a>(
        &'a self,
        key: &'a str,
        head: &'a [u8],
        body: &'a [u8],
    ) -> BoxFuture<'a, Result<(), MailboxError>> {
        async move {
            let mut value = Vec::with_capacity(head.len() + body.len());
            value.extend_from_slice(head);
            value.extend_from_slice(body);
            self.put(key, &value).await
        }
        .boxed()
    }

    /// Removes and returns the value under `key`. Push backends wait server-side until `deadline`
    /// for it to appear; poll backends answer at once. `Ok(None)`: not there (yet).
    fn take<'a>(
        &'a self,
        key: &'a str,
        deadline: Instant,
    ) -> BoxFuture<'a, Result<Option<Vec<u8>>, MailboxError>>;

    /// Reads the value under `key` without removing it (for broadcast: one PUT, many GETs).
    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Vec<u8>>, MailboxError>>;

    /// Like [`Mailbox::get`], but a push backend waits server-side until `deadline` for the key to
    /// appear (Redis: a non-destructive blocking list rotation), so that the readers of a
    /// broadcast do not poll. The default answers at once (one `get`), which is right for poll
    /// backends: the adapter then polls with backoff.
    fn get_wait<'a>(
        &'a self,
        key: &'a str,
        deadline: Instant,
    ) -> BoxFuture<'a, Result<Option<Vec<u8>>, MailboxError>> {
        let _ = deadline;
        self.get(key)
    }

    /// Deletes these keys (missing keys are fine).
    fn delete<'a>(&'a self, keys: &'a [String]) -> BoxFuture<'a, Result<(), MailboxError>>;

    /// Removes `key`, which [`Mailbox::get_wait`] has read for a reader that consumes it (the
    /// later chunks of a message on a push backend, read ahead without removing them so that a
    /// receive cut short loses nothing). The default deletes at once; Redis queues the `DEL` to
    /// ride on the next request, as after a `take`.
    fn release<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<(), MailboxError>> {
        async move { self.delete(&[key.to_owned()]).await }.boxed()
    }

    /// Every key starting with `prefix` (all pages).
    fn list<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<Vec<String>, MailboxError>>;

    /// Atomically adds `by` to the counter under `key` and returns the new value, or `None` if
    /// the backend has no atomic counter (S3). The answer must not depend on the arguments and
    /// nothing may happen before the future is polled: the adapter learns whether counters exist
    /// by calling this once and dropping the future. An increment that may have been applied
    /// must not be reported `retryable` (counting twice would release a barrier early).
    fn incr<'a>(
        &'a self,
        key: &'a str,
        by: i64,
    ) -> Option<BoxFuture<'a, Result<i64, MailboxError>>>;

    /// Like [`Mailbox::incr`], and also records `member` (a rank) with the counter, in the same
    /// request, where the backend can do so at no extra request or billed unit; `of` is the job's
    /// size. The barrier and the gather count this way, so that a rank whose wait times out can
    /// name a rank that never arrived ([`Mailbox::marked`]). A counter is either always
    /// incremented this way or never. The default only increments.
    fn incr_marking<'a>(
        &'a self,
        key: &'a str,
        by: i64,
        member: u32,
        of: u32,
    ) -> Option<BoxFuture<'a, Result<i64, MailboxError>>> {
        let _ = (member, of);
        self.incr(key, by)
    }

    /// The members recorded with the counter under `key` by [`Mailbox::incr_marking`];
    /// `Ok(None)` if this backend records none (or did not for this job's size).
    fn marked<'a>(
        &'a self,
        key: &'a str,
        of: u32,
    ) -> BoxFuture<'a, Result<Option<Vec<Mark>>, MailboxError>> {
        let _ = (key, of);
        futures::future::ready(Ok(None)).boxed()
    }

    /// Records in the job's failure record under `key` that rank `reporter` failed because of
    /// rank `blamed` (a reporter's first record stays; with the backend's TTL), for
    /// `Channel::abort`: ranks whose wait then times out read the record
    /// ([`Mailbox::failures`]) to name the rank at the end of the chain of blame. `None` if this
    /// backend keeps no failure record (the default): the abort then tells nobody.
    fn report_failure<'a>(
        &'a self,
        key: &'a str,
        reporter: u32,
        blamed: u32,
    ) -> Option<BoxFuture<'a, Result<(), MailboxError>>> {
        let _ = (key, reporter, blamed);
        None
    }

    /// The failure record under `key` as `(reporter, blamed)` pairs ([`Mailbox::report_failure`]);
    /// `Ok(None)` if this backend keeps none (the default).
    fn failures<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Failures, MailboxError>> {
        let _ = key;
        futures::future::ready(Ok(None)).boxed()
    }

    /// The backend's request counters.
    fn stats(&self) -> &RequestStats;

    /// Finishes deferred work now: a backend that deletes the values `take` has read lazily
    /// (Redis queues the `DEL`s to send them with its next request) deletes them. The default
    /// has nothing to do.
    fn flush(&self) -> BoxFuture<'_, Result<(), MailboxError>> {
        futures::future::ready(Ok(())).boxed()
    }
}
