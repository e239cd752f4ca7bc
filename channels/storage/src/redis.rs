//! The Redis mailbox: lists with server-side blocking reads.
//!
//! ## Requests
//! * `put(k, v)`: `MULTI; DEL k; RPUSH k v; PEXPIRE k ttl; EXEC` (one round trip). The list
//!   holds exactly one element whatever the number of attempts, so a retried put is an
//!   overwrite; the TTL is set atomically with the data, so a crashed job's keys expire.
//! * `take(k)`: `BLMOVE k k LEFT LEFT t` on a dedicated connection, and later `DEL k`.
//!   Moving the list onto itself is a *non-destructive* blocking read: the server wakes the
//!   waiting client the moment the element is pushed (no polling), yet the element stays until
//!   the `DEL`. If the connection breaks after the server answered but before we read the
//!   answer, the retried `BLMOVE` finds the element again; with `BLPOP` that message would be
//!   lost. The `DEL` is **not on the message's path**: the key goes into a short queue of read
//!   keys, and the queue is sent as one `DEL k1 k2 ...` in front of the mailbox's next request
//!   (the `MULTI` of the next put, the next blocking read, the next counter increment: the same
//!   write, no extra round trip). A background task deletes whatever is still queued 2 ms later
//!   (a rank that stops sending), and dropping the mailbox deletes what is left synchronously,
//!   so a program that exits right after its last receive leaves nothing. A `DEL` whose answer
//!   is lost is simply sent again (it is idempotent); the queue is bounded (1024 keys, then it
//!   is flushed inline), and a key that cannot be deleted is never read again and expires with
//!   its TTL.
//! * `get(k)`: `LINDEX k 0`; `get_wait(k)`: the `BLMOVE` rotation without `DEL` (broadcast
//!   readers wait server-side for the root's single write, many clients at once).
//! * `incr(k, by)`: `MULTI; INCRBY k by; PEXPIRE k ttl; EXEC`.
//! * `delete`: `DEL k1 k2 ...` (512 keys per request); `list`: `SCAN MATCH prefix* COUNT 1000`
//!   (never `KEYS`, which blocks the server).
//! * `report_failure(k, reporter, blamed)`: one script, `HSETNX k r<reporter> blamed` and
//!   `PEXPIRE k ttl`; `failures(k)`: `HGETALL k`.
//!
//! ## Connections
//! Blocking commands hold their connection until the server answers, so they must not share
//! the multiplexed connection the other requests use: each `take`/`get_wait` borrows a
//! connection from a small pool (at most `blocking_connections`, opened on demand), built with
//! **no response timeout** (the redis crate's default of 500 ms would abort every longer
//! `BLMOVE`). Instead the client waits at most the block time plus `response_timeout`, which
//! detects a dead connection. Blocks are capped at `max_block`, so a permit is never held for
//! long. When more receivers wait at once than there are blocking connections, the extra ones
//! wait up to 50 ms for a free connection and otherwise look with `LINDEX` and ask again: they
//! degrade to a 50 ms poll instead of queueing behind blocks. The cap on connections matters
//! because every rank of every job holds its own: 16 per rank × hundreds of functions stays
//! under Redis' default `maxclients` of 10000. Connections that fail are dropped and reopened on
//! the next request, so a restarted server is picked up by the adapter's retries.
//!
//! ## Exactly once
//! Message keys are unique per (source, destination, tag, sequence, chunk), every put is an
//! overwrite and every take reads before it deletes, so retries never duplicate or lose a
//! message. One corner remains: a put whose first attempt was applied but unacknowledged, retried
//! *after* the receiver already consumed the key, recreates the key. It is never read (the
//! receiver has moved on to the next sequence number), and it expires with the TTL or goes with
//! `cleanup_job`. Counter increments are not idempotent, so an increment that may have reached
//! the server is reported as not retryable rather than risk counting twice.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use fmi_channels::{Error, Instant, Result};
use futures::future::{BoxFuture, FutureExt};
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, FromRedisValue, RedisError, RetryMethod};
use serde::Deserialize;
use tokio::sync::Semaphore;

use crate::config::{millis, secs};
use crate::{Failures, Mailbox, MailboxError, MailboxLimits, Mark, RequestStats};

/// `incr_marking`: `HINCRBY key n by`, then the new count under field `ARGV[2]` (`r<member>`),
/// then the key's TTL; returns the count. One script, so count and mark cannot part.
const INCR_MARKING: &str = "local n = redis.call('HINCRBY', KEYS[1], 'n', ARGV[1]) \
     redis.call('HSET', KEYS[1], ARGV[2], n) \
     redis.call('PEXPIRE', KEYS[1], ARGV[3]) \
     return n";

/// `report_failure`: a reporter's first record stays; the hash gets the keys' TTL.
const REPORT_FAILURE: &str = "redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) \
     redis.call('PEXPIRE', KEYS[1], ARGV[3]) \
     return 1";

const BACKEND: &str = "redis";
/// Keys per `DEL` request.
const DEL_BATCH: usize = 512;
/// How long a blocking read waits for a free blocking connection before looking without
/// blocking instead.
const OVERFLOW_WAIT: Duration = Duration::from_millis(50);
/// Attempts at deleting a key a `take` has read (10 ms doubling: about 0.6 s in all).
const DEL_ATTEMPTS: u32 = 6;
/// How long a read key may wait in the queue for a request to ride on before the background
/// task deletes it on its own.
const FLUSH_DELAY: Duration = Duration::from_millis(2);
/// Most read keys queued for deletion; beyond it the queue is deleted inline.
const PENDING_MAX: usize = 1024;
/// Upper bound on `SCAN` round trips for one `list` (SCAN always terminates; this only bounds
/// a misbehaving server).
const MAX_SCAN_PAGES: usize = 1_000_000;

/// Settings of a [`RedisMailbox`], embeddable as `[channels.redis]` in fmi's TOML configuration:
///
/// ```toml
/// url = "redis://:secret@127.0.0.1:6379/0"   # rediss:// for TLS (feature "tls")
/// ttl_secs = 3600
/// max_value = 524288
/// max_block_ms = 5000
/// connect_timeout_ms = 2000
/// response_timeout_ms = 10000
/// blocking_connections = 16
/// # tls_ca_file = "/etc/fmi/redis-ca.pem"      # rediss:// with a private CA
/// ```
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisConfig {
    /// `redis://[user][:password@]host[:port][/db]`, or `rediss://` for TLS (needs the `tls`
    /// feature). The password is never printed.
    pub url: String,
    /// Lifetime of every key (`ttl_secs`), so that a crashed job leaves nothing behind for long.
    #[serde(rename = "ttl_secs", deserialize_with = "secs")]
    pub ttl: Duration,
    /// Largest value per key; longer messages are chunked by the adapter. Default 512 KiB,
    /// far below Redis's own limit, because moderate values are much faster: the chunks of a
    /// message are written and read `put_concurrency` at a time, on several connections (16 MiB
    /// one way on loopback: 20–28 ms in 512 KiB chunks against 88–93 ms as 8 MiB values;
    /// docs/benchmarks.md).
    pub max_value: usize,
    /// Longest single blocking read (`max_block_ms`); longer waits issue several.
    #[serde(rename = "max_block_ms", deserialize_with = "millis")]
    pub max_block: Duration,
    /// Time allowed to open a connection (`connect_timeout_ms`).
    #[serde(rename = "connect_timeout_ms", deserialize_with = "millis")]
    pub connect_timeout: Duration,
    /// Time allowed for an answer to a non-blocking request, and beyond the block time for a
    /// blocking one (`response_timeout_ms`).
    #[serde(rename = "response_timeout_ms", deserialize_with = "millis")]
    pub response_timeout: Duration,
    /// Most connections blocked in reads at once (per mailbox, that is per rank).
    pub blocking_connections: usize,
    /// For `rediss://`: a PEM file with the certificate authority that signed the server's
    /// certificate (a private CA); by default the system's root certificates are trusted.
    pub tls_ca_file: Option<String>,
}

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig {
            url: "redis://127.0.0.1:6379".into(),
            ttl: Duration::from_secs(3600),
            max_value: 512 << 10,
            max_block: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(2),
            response_timeout: Duration::from_secs(10),
            blocking_connections: 16,
            tls_ca_file: None,
        }
    }
}

impl RedisConfig {
    /// The default settings with this URL.
    pub fn new(url: impl Into<String>) -> RedisConfig {
        RedisConfig {
            url: url.into(),
            ..RedisConfig::default()
        }
    }
}

/// `url` with any password replaced by `***`.
fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let (auth, host) = match rest.rsplit_once('@') {
        Some(x) => x,
        None => return url.to_owned(),
    };
    match auth.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
        None => url.to_owned(),
    }
}

impl std::fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisConfig")
            .field("url", &redact(&self.url))
            .field("ttl", &self.ttl)
            .field("max_value", &self.max_value)
            .field("max_block", &self.max_block)
            .field("connect_timeout", &self.connect_timeout)
            .field("response_timeout", &self.response_timeout)
            .field("blocking_connections", &self.blocking_connections)
            .field("tls_ca_file", &self.tls_ca_file)
            .finish()
    }
}

/// A [`Mailbox`] on one Redis server (see the module docs for the request pattern).
pub struct RedisMailbox {
    config: RedisConfig,
    client: redis::Client,
    /// The multiplexed connection for non-blocking requests, with a generation number so that
    /// a request that failed on an old connection does not drop a newer one.
    shared: tokio::sync::Mutex<(u64, Option<MultiplexedConnection>)>,
    /// Idle connections for blocking reads.
    idle: Mutex<Vec<MultiplexedConnection>>,
    /// One permit per blocking connection in use.
    slots: Semaphore,
    /// Keys `take` has read and not deleted yet: sent as one `DEL` in front of the next request
    /// (see the module docs).
    pending: Arc<Mutex<Vec<String>>>,
    /// Wakes the background task that deletes keys left in `pending`.
    flush: Arc<tokio::sync::Notify>,
    /// Whether that task runs.
    flusher: AtomicBool,
    stats: Arc<RequestStats>,
}

impl std::fmt::Debug for RedisMailbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisMailbox")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// A request for the shared connection.
enum Req<'r> {
    Cmd(&'r redis::Cmd),
    Pipe(&'r redis::Pipeline),
}

/// Two byte slices sent as **one** Redis argument (their concatenation), written straight into
/// the command's buffer.
struct Concat<'a>(&'a [u8], &'a [u8]);

impl Concat<'_> {
    fn len(&self) -> usize {
        self.0.len() + self.1.len()
    }
}

impl redis::ToRedisArgs for Concat<'_> {
    fn write_redis_args<W>(&self, out: &mut W)
    where
        W: ?Sized + redis::RedisWrite,
    {
        use std::io::Write;
        out.reserve_space_for_args([self.len()]);
        let mut arg = out.writer_for_next_arg();
        // Writing into the command's in-memory buffer cannot fail.
        let _ = arg.write_all(self.0);
        let _ = arg.write_all(self.1);
    }
}

/// How a failed request may continue.
struct Failure {
    retryable: bool,
    /// The connection is unusable: drop it.
    reconnect: bool,
}

fn classify(e: &RedisError) -> Failure {
    if e.kind() == redis::ErrorKind::AuthenticationFailed {
        // A wrong password does not get better by retrying.
        return Failure {
            retryable: false,
            reconnect: true,
        };
    }
    let reconnect = e.is_io_error() || e.is_connection_dropped() || e.is_unrecoverable_error();
    let retryable = match e.retry_method() {
        RetryMethod::NoRetry => false,
        // Reconnect, RetryImmediately, WaitAndRetry (LOADING after a restart, TRYAGAIN, ...)
        // and the cluster redirections, which a plain server never sends.
        _ => true,
    };
    Failure {
        retryable,
        reconnect,
    }
}

fn lock_keys(m: &Mutex<Vec<String>>) -> std::sync::MutexGuard<'_, Vec<String>> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The background task of one mailbox: woken when a read key is queued, it waits
/// [`FLUSH_DELAY`] (the next request usually carries the `DEL` before that) and deletes what is
/// still queued, on a connection of its own, retrying a few times; keys it cannot delete go
/// back into the queue for the next request. Ends when the mailbox is dropped.
async fn flusher(
    pending: Weak<Mutex<Vec<String>>>,
    notify: Arc<tokio::sync::Notify>,
    client: redis::Client,
    config: RedisConfig,
    stats: Arc<RequestStats>,
) {
    let mut conn: Option<MultiplexedConnection> = None;
    loop {
        notify.notified().await;
        tokio::time::sleep(FLUSH_DELAY).await;
        let keys = match pending.upgrade() {
            Some(p) => std::mem::take(&mut *lock_keys(&p)),
            None => return,
        };
        if keys.is_empty() {
            continue;
        }
        let mut pause = Duration::from_millis(10);
        let mut done = false;
        for attempt in 1..=DEL_ATTEMPTS {
            if conn.is_none() {
                let cfg = AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(config.connect_timeout))
                    .set_response_timeout(Some(config.response_timeout));
                conn = client
                    .get_multiplexed_async_connection_with_config(&cfg)
                    .await
                    .ok();
            }
            if let Some(c) = conn.as_mut() {
                RequestStats::add(&stats.deletes, 1);
                match redis::cmd("DEL").arg(&keys).query_async::<()>(c).await {
                    Ok(()) => {
                        done = true;
                        break;
                    }
                    Err(e) => {
                        if classify(&e).reconnect {
                            conn = None;
                        }
                    }
                }
            }
            if attempt < DEL_ATTEMPTS {
                RequestStats::add(&stats.retries, 1);
                tokio::time::sleep(pause).await;
                pause *= 2;
            }
        }
        if !done {
            match pending.upgrade() {
                Some(p) => lock_keys(&p).extend(keys),
                None => {
                    tracing::warn!(keys = keys.len(), "could not delete message keys after reading them; they expire with their TTL");
                    return;
                }
            }
        }
    }
}

/// `d` in seconds with millisecond resolution, rounded up and at least 1 ms (0 would block
/// forever).
fn block_arg(d: Duration) -> String {
    let ms = d.as_micros().div_ceil(1000).max(1);
    format!("{}.{:03}", ms / 1000, ms % 1000)
}

/// `prefix` as a SCAN pattern matching exactly the keys that start with it.
fn glob_prefix(prefix: &str) -> String {
    let mut p = String::with_capacity(prefix.len() + 2);
    for c in prefix.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            p.push('\\');
        }
        p.push(c);
    }
    p.push('*');
    p
}

/// The client for `config`: plain, TLS with the system's roots, or TLS with a private CA.
fn open_client(config: &RedisConfig) -> std::result::Result<redis::Client, String> {
    #[cfg(feature = "tls")]
    {
        // rustls needs a process-wide crypto provider; if another crate installed one first,
        // that one is used (the error only says so).
        let _ = rustls::crypto::ring::default_provider().install_default();
        if let Some(path) = &config.tls_ca_file {
            let pem =
                std::fs::read(path).map_err(|e| format!("cannot read tls_ca_file {path}: {e}"))?;
            let certs = redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(pem),
            };
            return redis::Client::build_with_tls(config.url.as_str(), certs)
                .map_err(|e| e.to_string());
        }
    }
    #[cfg(not(feature = "tls"))]
    if config.tls_ca_file.is_some() {
        return Err("tls_ca_file needs fmi-storage built with the \"tls\" feature".into());
    }
    redis::Client::open(config.url.as_str()).map_err(|e| e.to_string())
}

impl RedisMailbox {
    /// A mailbox for `config`. Checks the URL only; connections are opened by the first
    /// requests (and reopened after failures), so a server that restarts is picked up again.
    pub fn new(config: RedisConfig) -> Result<RedisMailbox> {
        let bad = |detail: String| Error::Config { path: None, detail };
        let tls = config.url.starts_with("rediss://");
        let hint = if tls && !cfg!(feature = "tls") {
            " (rediss:// needs fmi-storage built with the \"tls\" feature)"
        } else {
            ""
        };
        let client = open_client(&config)
            .map_err(|e| bad(format!("redis url {}: {e}{hint}", redact(&config.url))))?;
        if config.max_value == 0 || config.blocking_connections == 0 {
            return Err(bad(
                "redis: max_value and blocking_connections must be at least 1".into(),
            ));
        }
        if config.ttl < Duration::from_secs(1) || config.max_block.is_zero() {
            return Err(bad(
                "redis: ttl_secs and max_block_ms must be positive".into()
            ));
        }
        Ok(RedisMailbox {
            slots: Semaphore::new(config.blocking_connections),
            client,
            config,
            shared: tokio::sync::Mutex::new((0, None)),
            idle: Mutex::new(Vec::new()),
            pending: Arc::new(Mutex::new(Vec::new())),
            flush: Arc::new(tokio::sync::Notify::new()),
            flusher: AtomicBool::new(false),
            stats: Arc::new(RequestStats::default()),
        })
    }

    /// The settings in use.
    pub fn config(&self) -> &RedisConfig {
        &self.config
    }

    fn error(op: &'static str, e: &RedisError, retryable: bool) -> MailboxError {
        MailboxError {
            backend: BACKEND,
            op,
            retryable,
            detail: e.to_string(),
        }
    }

    fn ttl_ms(&self) -> u64 {
        u64::try_from(self.config.ttl.as_millis()).unwrap_or(u64::MAX)
    }

    async fn open(
        &self,
        response_timeout: Option<Duration>,
    ) -> redis::RedisResult<MultiplexedConnection> {
        let cfg = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.config.connect_timeout))
            .set_response_timeout(response_timeout);
        self.client
            .get_multiplexed_async_connection_with_config(&cfg)
            .await
    }

    /// The shared connection (opened if needed) and its generation.
    async fn shared(&self, op: &'static str) -> Result<(u64, MultiplexedConnection), MailboxError> {
        let mut g = self.shared.lock().await;
        if let Some(c) = &g.1 {
            return Ok((g.0, c.clone()));
        }
        // Nothing was sent yet, so any failure here is safe to retry.
        let c = self
            .open(Some(self.config.response_timeout))
            .await
            .map_err(|e| Self::error(op, &e, classify(&e).retryable || e.is_io_error()))?;
        g.0 += 1;
        g.1 = Some(c.clone());
        Ok((g.0, c))
    }

    /// Runs a non-blocking request on the shared connection and drops that connection if the
    /// failure broke it. With `once`, a failure after the request may have reached the server
    /// (a broken connection) is not retryable: for requests that must not be applied twice.
    async fn run<T: FromRedisValue>(
        &self,
        op: &'static str,
        req: Req<'_>,
        once: bool,
    ) -> Result<T, MailboxError> {
        let (gen, mut conn) = self.shared(op).await?;
        let r = match req {
            Req::Cmd(c) => c.query_async(&mut conn).await,
            Req::Pipe(p) => p.query_async(&mut conn).await,
        };
        match r {
            Ok(v) => Ok(v),
            Err(e) => {
                let f = classify(&e);
                if f.reconnect {
                    let mut g = self.shared.lock().await;
                    if g.0 == gen {
                        g.1 = None;
                    }
                }
                let retryable = f.retryable && !(once && e.kind() == redis::ErrorKind::Io);
                Err(Self::error(op, &e, retryable))
            }
        }
    }

    /// A blocking `BLMOVE key key LEFT LEFT` rotation: waits server-side until `deadline`
    /// (capped at `max_block`) and returns the first element without removing it.
    ///
    /// Read keys queued for deletion go in front of the `BLMOVE` in the same write. With
    /// `delete` (`take`), the key read is queued in turn ([`RedisMailbox::queue_delete`]): the
    /// message does not wait for a `DEL` round trip.
    async fn blocking_peek(
        &self,
        op: &'static str,
        key: &str,
        deadline: Instant,
        delete: bool,
    ) -> Result<Option<Vec<u8>>, MailboxError> {
        let _permit = match self.slots.try_acquire() {
            Ok(p) => p,
            Err(_) => {
                // Every blocking connection is in use (more waiting receivers than
                // `blocking_connections`): wait briefly for one, else look without blocking
                // and let the adapter ask again, so that an extra waiter degrades to a
                // 50 ms poll instead of queueing behind blocks of up to `max_block`.
                let until = deadline.min(Instant::now() + OVERFLOW_WAIT);
                match tokio::time::timeout_at(until, self.slots.acquire()).await {
                    Ok(Ok(p)) => p,
                    _ => {
                        let v = self.lindex(op, key).await?;
                        if delete && v.is_some() {
                            self.queue_delete(key).await;
                        }
                        return Ok(v);
                    }
                }
            }
        };
        let pooled = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let mut conn = match pooled {
            Some(c) => c,
            None => self
                .open(None)
                .await
                .map_err(|e| Self::error(op, &e, classify(&e).retryable || e.is_io_error()))?,
        };
        let block = deadline
            .saturating_duration_since(Instant::now())
            .min(self.config.max_block);
        // Keys read earlier ride along in front of the read: the server deletes them before it
        // blocks.
        let mut pipe = redis::pipe();
        let dels = self.ride_pending(&mut pipe);
        pipe.cmd("BLMOVE")
            .arg(key)
            .arg(key)
            .arg("LEFT")
            .arg("LEFT")
            .arg(block_arg(block));
        RequestStats::add(&self.stats.gets, 1);
        let answer = tokio::time::timeout(
            block + self.config.response_timeout,
            pipe.query_async::<(Option<Vec<u8>>,)>(&mut conn),
        )
        .await
        .map(|r| r.map(|(v,)| v));
        if !matches!(answer, Ok(Ok(_))) {
            // The DEL may not have happened: queue the keys again (deleting twice is harmless).
            self.restore_pending(dels);
        }
        match answer {
            Err(_) => Err(MailboxError {
                backend: BACKEND,
                op,
                retryable: true,
                detail: format!(
                    "no answer to BLMOVE within {:?} of its block time; reconnecting",
                    self.config.response_timeout
                ),
            }),
            Ok(Err(e)) => {
                let f = classify(&e);
                if !f.reconnect {
                    self.idle
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(conn);
                }
                Err(Self::error(op, &e, f.retryable))
            }
            Ok(Ok(v)) => {
                match &v {
                    Some(v) => {
                        RequestStats::add(&self.stats.bytes_got, v.len() as u64);
                        if delete {
                            self.queue_delete(key).await;
                        }
                    }
                    None => RequestStats::add(&self.stats.empty_gets, 1),
                }
                self.idle
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(conn);
                Ok(v)
            }
        }
    }

    /// `LINDEX key 0`: the value, without removing or waiting.
    async fn lindex(&self, op: &'static str, key: &str) -> Result<Option<Vec<u8>>, MailboxError> {
        RequestStats::add(&self.stats.gets, 1);
        let mut cmd = redis::cmd("LINDEX");
        cmd.arg(key).arg(0);
        let v: Option<Vec<u8>> = self.run(op, Req::Cmd(&cmd), false).await?;
        match &v {
            Some(v) => RequestStats::add(&self.stats.bytes_got, v.len() as u64),
            None => RequestStats::add(&self.stats.empty_gets, 1),
        }
        Ok(v)
    }

    /// One counter request: the queued `DEL`s, then what `add` appends (given the key TTL in
    /// ms) and whose one answer is the new count, in one atomic pipeline. Increments are not
    /// idempotent: one that may have reached the server before the connection broke is not
    /// retried (counting twice would release a barrier early); server refusals (LOADING,
    /// TRYAGAIN) are.
    async fn count(
        &self,
        add: impl FnOnce(&mut redis::Pipeline, i64),
    ) -> Result<i64, MailboxError> {
        RequestStats::add(&self.stats.counters, 1);
        let mut pipe = redis::pipe();
        pipe.atomic();
        let dels = self.ride_pending(&mut pipe);
        add(&mut pipe, self.ttl_ms() as i64);
        let r = self.run::<(i64,)>("incr", Req::Pipe(&pipe), true).await;
        if r.is_err() {
            self.restore_pending(dels);
        }
        let (n,) = r?;
        Ok(n)
    }

    /// Puts one `DEL` of the read keys waiting to be deleted in front of `pipe`, so that they
    /// ride on its request (see the module docs), and returns them, to be given back
    /// ([`Self::restore_pending`]) if the request fails.
    fn ride_pending(&self, pipe: &mut redis::Pipeline) -> Vec<String> {
        let dels = self.take_pending();
        if !dels.is_empty() {
            RequestStats::add(&self.stats.deletes, 1);
            pipe.del(&dels).ignore();
        }
        dels
    }

    /// The read keys waiting to be deleted (the caller sends them or gives them back).
    fn take_pending(&self) -> Vec<String> {
        std::mem::take(&mut *lock_keys(&self.pending))
    }

    /// Gives back keys whose `DEL` may not have reached the server.
    fn restore_pending(&self, keys: Vec<String>) {
        if !keys.is_empty() {
            lock_keys(&self.pending).extend(keys);
        }
    }

    /// Queues a key `take` has read for deletion (see the module docs): it rides on the next
    /// request, or the background task deletes it [`FLUSH_DELAY`] later. A full queue is
    /// deleted inline (retried a few times; what fails is left to the TTL).
    async fn queue_delete(&self, key: &str) {
        let full = {
            let mut p = lock_keys(&self.pending);
            p.push(key.to_owned());
            p.len() >= PENDING_MAX
        };
        if full {
            let keys = self.take_pending();
            let mut pause = Duration::from_millis(10);
            for attempt in 1..=DEL_ATTEMPTS {
                match self.del("take", &keys).await {
                    Ok(()) => return,
                    Err(e) if e.retryable && attempt < DEL_ATTEMPTS => {
                        RequestStats::add(&self.stats.retries, 1);
                        tokio::time::sleep(pause).await;
                        pause *= 2;
                    }
                    Err(e) => {
                        tracing::warn!(keys = keys.len(), error = %e, "could not delete message keys after reading them; they expire with their TTL");
                        return;
                    }
                }
            }
            return;
        }
        if !self.flusher.swap(true, Ordering::AcqRel) {
            tokio::spawn(flusher(
                Arc::downgrade(&self.pending),
                Arc::clone(&self.flush),
                self.client.clone(),
                self.config.clone(),
                Arc::clone(&self.stats),
            ));
        }
        self.flush.notify_one();
    }

    /// `put`: `MULTI; DEL k; RPUSH k v; PEXPIRE k ttl; EXEC`.
    async fn store(&self, key: &str, value: Concat<'_>) -> Result<(), MailboxError> {
        RequestStats::add(&self.stats.puts, 1);
        let ttl = self.ttl_ms();
        let len = value.len();
        let mut pipe = redis::pipe();
        pipe.atomic();
        let dels = self.ride_pending(&mut pipe);
        pipe.del(key)
            .ignore()
            .rpush(key, value)
            .ignore()
            .pexpire(key, ttl as i64)
            .ignore();
        let r = self.run::<()>("put", Req::Pipe(&pipe), false).await;
        if r.is_err() {
            self.restore_pending(dels);
        }
        r?;
        RequestStats::add(&self.stats.bytes_put, len as u64);
        Ok(())
    }

    async fn del(&self, op: &'static str, keys: &[String]) -> Result<(), MailboxError> {
        for batch in keys.chunks(DEL_BATCH) {
            RequestStats::add(&self.stats.deletes, 1);
            self.run::<()>(op, Req::Cmd(redis::cmd("DEL").arg(batch)), false)
                .await?;
        }
        Ok(())
    }
}

impl Drop for RedisMailbox {
    /// Deletes the read keys still queued (a program that ends right after its last receive),
    /// synchronously on a short-lived connection of its own, bounded by the connect and
    /// response timeouts (at most 1 s each); what fails expires with its TTL.
    fn drop(&mut self) {
        let keys = self.take_pending();
        // Lets the background task end.
        self.flush.notify_one();
        if keys.is_empty() {
            return;
        }
        let connect = self.config.connect_timeout.min(Duration::from_secs(1));
        let answer = self.config.response_timeout.min(Duration::from_secs(1));
        let r = (|| -> redis::RedisResult<()> {
            let mut c = self.client.get_connection_with_timeout(connect)?;
            c.set_read_timeout(Some(answer))?;
            c.set_write_timeout(Some(answer))?;
            RequestStats::add(&self.stats.deletes, 1);
            redis::cmd("DEL").arg(&keys).query::<()>(&mut c)
        })();
        if let Err(e) = r {
            tracing::warn!(keys = keys.len(), error = %e, "could not delete message keys after reading them; they expire with their TTL");
        }
    }
}

impl Mailbox for RedisMailbox {
    fn name(&self) -> &'static str {
        BACKEND
    }

    fn limits(&self) -> MailboxLimits {
        MailboxLimits::new(self.config.max_value, true)
    }

    fn put<'a>(&'a self, key: &'a str, value: &'a [u8]) -> BoxFuture<'a, Result<(), MailboxError>> {
        self.store(key, Concat(value, &[])).boxed()
    }

    fn put_parts<'a>(
        &'a self,
        key: &'a str,
        head: &'a [u8],
        body: &'a [u8],
    ) -> BoxFuture<'a, Result<(), MailboxError>> {
        // Both parts are written straight into the request as one argument: the channel never
        // builds chunk 0 as a separate buffer. (That copy was not only a copy: freeing a
        // chunk-sized buffer after every put made glibc's malloc hand the memory back to the
        // kernel and fault it in again on the next message, which doubled the latency of a
        // 1 MiB message; docs/benchmarks.md.)
        self.store(key, Concat(head, body)).boxed()
    }

    fn take<'a>(
        &'a self,
        key: &'a str,
        deadline: Instant,
    ) -> BoxFuture<'a, Result<Option<Vec<u8>>, MailboxError>> {
        async move {
            // Only once we hold the value is it removed (queued for a `DEL`, see the module
            // docs). From here on the value is returned whatever happens: a DEL that failed may
            // still have been applied, and a retried take would then wait for a key that is
            // gone.
            self.blocking_peek("take", key, deadline, true).await
        }
        .boxed()
    }

    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Vec<u8>>, MailboxError>> {
        async move { self.lindex("get", key).await }.boxed()
    }

    fn get_wait<'a>(
        &'a self,
        key: &'a str,
        deadline: Instant,
    ) -> BoxFuture<'a, Result<Option<Vec<u8>>, MailboxError>> {
        self.blocking_peek("get", key, deadline, false).boxed()
    }

    fn delete<'a>(&'a self, keys: &'a [String]) -> BoxFuture<'a, Result<(), MailboxError>> {
        self.del("delete", keys).boxed()
    }

    fn release<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<(), MailboxError>> {
        async move {
            self.queue_delete(key).await;
            Ok(())
        }
        .boxed()
    }

    fn list<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<Vec<String>, MailboxError>> {
        async move {
            let pattern = glob_prefix(prefix);
            let mut keys = std::collections::BTreeSet::new();
            let mut cursor: u64 = 0;
            for _ in 0..MAX_SCAN_PAGES {
                RequestStats::add(&self.stats.lists, 1);
                let mut cmd = redis::cmd("SCAN");
                cmd.arg(cursor)
                    .arg("MATCH")
                    .arg(&pattern)
                    .arg("COUNT")
                    .arg(1000);
                let (next, page): (u64, Vec<String>) =
                    self.run("list", Req::Cmd(&cmd), false).await?;
                // SCAN may return a key twice; the set keeps one.
                keys.extend(page);
                cursor = next;
                if cursor == 0 {
                    break;
                }
            }
            Ok(keys.into_iter().collect())
        }
        .boxed()
    }

    fn incr<'a>(
        &'a self,
        key: &'a str,
        by: i64,
    ) -> Option<BoxFuture<'a, Result<i64, MailboxError>>> {
        Some(
            self.count(move |pipe, ttl| {
                pipe.incr(key, by).pexpire(key, ttl).ignore();
            })
            .boxed(),
        )
    }

    /// A hash: field `n` counts, and field `r<member>` holds the count right after that member's
    /// increment (so the member that completed a count is known), set by one server-side script
    /// in the same atomic pipeline as the queued `DEL`s (one round trip, as `incr`).
    fn incr_marking<'a>(
        &'a self,
        key: &'a str,
        by: i64,
        member: u32,
        _of: u32,
    ) -> Option<BoxFuture<'a, Result<i64, MailboxError>>> {
        Some(
            self.count(move |pipe, ttl| {
                pipe.cmd("EVAL")
                    .arg(INCR_MARKING)
                    .arg(1)
                    .arg(key)
                    .arg(by)
                    .arg(format!("r{member}"))
                    .arg(ttl);
            })
            .boxed(),
        )
    }

    fn marked<'a>(
        &'a self,
        key: &'a str,
        _of: u32,
    ) -> BoxFuture<'a, Result<Option<Vec<Mark>>, MailboxError>> {
        async move {
            RequestStats::add(&self.stats.gets, 1);
            let mut cmd = redis::cmd("HGETALL");
            cmd.arg(key);
            let fields: Vec<(String, i64)> = self.run("marked", Req::Cmd(&cmd), false).await?;
            Ok(Some(
                fields
                    .iter()
                    .filter_map(|(f, n)| {
                        Some(Mark {
                            member: f.strip_prefix('r')?.parse().ok()?,
                            at: Some(*n),
                        })
                    })
                    .collect(),
            ))
        }
        .boxed()
    }

    fn report_failure<'a>(
        &'a self,
        key: &'a str,
        reporter: u32,
        blamed: u32,
    ) -> Option<BoxFuture<'a, Result<(), MailboxError>>> {
        Some(
            async move {
                RequestStats::add(&self.stats.puts, 1);
                let mut cmd = redis::cmd("EVAL");
                cmd.arg(REPORT_FAILURE)
                    .arg(1)
                    .arg(key)
                    .arg(format!("r{reporter}"))
                    .arg(blamed)
                    .arg(self.ttl_ms());
                // HSETNX: applying it twice changes nothing, so a retry is safe.
                let _: i64 = self.run("report_failure", Req::Cmd(&cmd), false).await?;
                Ok(())
            }
            .boxed(),
        )
    }

    fn failures<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Failures, MailboxError>> {
        async move {
            RequestStats::add(&self.stats.gets, 1);
            let mut cmd = redis::cmd("HGETALL");
            cmd.arg(key);
            let fields: Vec<(String, u32)> = self.run("failures", Req::Cmd(&cmd), false).await?;
            Ok(Some(
                fields
                    .iter()
                    .filter_map(|(f, blamed)| Some((f.strip_prefix('r')?.parse().ok()?, *blamed)))
                    .collect(),
            ))
        }
        .boxed()
    }

    fn stats(&self) -> &RequestStats {
        &self.stats
    }

    /// Deletes the read keys still queued, now (one `DEL`); on failure they stay queued.
    fn flush(&self) -> BoxFuture<'_, Result<(), MailboxError>> {
        async move {
            let keys = self.take_pending();
            if keys.is_empty() {
                return Ok(());
            }
            let r = self.del("flush", &keys).await;
            if r.is_err() {
                self.restore_pending(keys);
            }
            r
        }
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_times_round_up_and_never_reach_zero() {
        assert_eq!(block_arg(Duration::ZERO), "0.001");
        assert_eq!(block_arg(Duration::from_micros(1)), "0.001");
        assert_eq!(block_arg(Duration::from_micros(1500)), "0.002");
        assert_eq!(block_arg(Duration::from_millis(2500)), "2.500");
        assert_eq!(block_arg(Duration::from_secs(10)), "10.000");
    }

    #[test]
    fn scan_patterns_escape_glob_characters() {
        assert_eq!(glob_prefix("fmi/job-1/"), "fmi/job-1/*");
        assert_eq!(glob_prefix("a*b?[c]"), "a\\*b\\?\\[c\\]*");
    }

    #[test]
    fn passwords_are_never_printed() {
        let c = RedisConfig::new("redis://user:hunter2@127.0.0.1:6379/0");
        let shown = format!("{c:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("user:***@127.0.0.1:6379/0"), "{shown}");
        assert_eq!(redact("redis://127.0.0.1"), "redis://127.0.0.1");
        assert_eq!(redact("redis://:p@h"), "redis://:***@h");
    }

    #[test]
    fn config_reads_toml_with_units_and_rejects_unknown_fields() {
        let c: RedisConfig =
            toml::from_str("url = \"redis://h:1\"\nttl_secs = 60\nmax_block_ms = 250")
                .expect("parses");
        assert_eq!(c.url, "redis://h:1");
        assert_eq!(c.ttl, Duration::from_secs(60));
        assert_eq!(c.max_block, Duration::from_millis(250));
        assert_eq!(c.max_value, RedisConfig::default().max_value);
        assert!(toml::from_str::<RedisConfig>("ttl = 60").is_err());
    }

    #[test]
    fn bad_urls_are_config_errors() {
        let e = RedisMailbox::new(RedisConfig::new("http://nope")).expect_err("bad scheme");
        assert!(matches!(e, Error::Config { .. }), "{e:?}");
    }
}
