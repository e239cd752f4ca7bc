//! Test doubles. **Not backends**: nothing here talks to a real server, so passing tests over
//! these proves only the adapter's own logic (chunking, ordering, retries, collectives). Every
//! backend is tested against its real server as well.
//!
//! * [`InMemoryMailbox`]: a map in memory, either push (take waits on a notification) or poll,
//!   with or without counters, enforcing `max_value`.
//! * [`FlakyMailbox`]: wraps any mailbox and injects retryable failures, to test that retried
//!   requests deliver exactly once.
//! * [`CutProxy`]: a TCP proxy on loopback, put in front of a **real** server, that loses the
//!   answer to one chosen request (it forwards the request, lets the server apply it, then
//!   closes the client's connection instead of forwarding the answer): the fault that turns a
//!   "read and delete in one request" into a lost message.
//! * [`CountingProxy`]: a TCP proxy on loopback in front of a **real** S3 or DynamoDB server
//!   that counts the HTTP requests passing through by operation, so tests can check that a
//!   mailbox's request counters (and so the cost ledger) match what the server was asked.

mod counting;
pub use counting::{s3_operation, CountingProxy};

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use fmi_channels::Instant;
use futures::future::{BoxFuture, FutureExt};
use tokio::sync::Notify;

use crate::{Mailbox, MailboxError, MailboxLimits, RequestStats};

/// An in-memory [`Mailbox`] for fast unit tests of the adapter (test double, not a backend).
#[derive(Debug)]
pub struct InMemoryMailbox {
    limits: MailboxLimits,
    counters: bool,
    map: Mutex<BTreeMap<String, Vec<u8>>>,
    changed: Notify,
    stats: RequestStats,
}

impl InMemoryMailbox {
    /// A mailbox with these limits (`push`: `take` and `get_wait` wait for the key) and atomic
    /// counters when `counters` is set.
    pub fn new(limits: MailboxLimits, counters: bool) -> Arc<InMemoryMailbox> {
        Arc::new(InMemoryMailbox {
            limits,
            counters,
            map: Mutex::new(BTreeMap::new()),
            changed: Notify::new(),
            stats: RequestStats::default(),
        })
    }

    /// Every key stored now.
    pub fn keys(&self) -> Vec<String> {
        self.lock().keys().cloned().collect()
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, Vec<u8>>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn err(op: &'static str, detail: String) -> MailboxError {
        MailboxError {
            backend: "memory",
            op,
            retryable: false,
            detail,
        }
    }

    /// Reads `key` (removing it if `remove`), waiting until `deadline` when `wait`.
    async fn read(
        &self,
        key: &str,
        remove: bool,
        wait: Option<Instant>,
    ) -> Result<Option<Vec<u8>>, MailboxError> {
        RequestStats::add(&self.stats.gets, 1);
        // Bounded by the deadline: each round waits for a change or the deadline.
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let found = {
                let mut map = self.lock();
                if remove {
                    map.remove(key)
                } else {
                    map.get(key).cloned()
                }
            };
            if let Some(v) = found {
                if remove {
                    RequestStats::add(&self.stats.deletes, 1);
                }
                RequestStats::add(&self.stats.bytes_got, v.len() as u64);
                return Ok(Some(v));
            }
            match wait {
                Some(deadline) if Instant::now() < deadline => {
                    tokio::select! {
                        () = notified => {}
                        () = tokio::time::sleep_until(deadline) => {}
                    }
                }
                _ => {
                    RequestStats::add(&self.stats.empty_gets, 1);
                    return Ok(None);
                }
            }
        }
    }
}

impl Mailbox for InMemoryMailbox {
    fn name(&self) -> &'static str {
        "memory"
    }

    fn limits(&self) -> MailboxLimits {
        self.limits
    }

    fn put<'a>(&'a self, key: &'a str, value: &'a [u8]) -> BoxFuture<'a, Result<(), MailboxError>> {
        let r = if value.len() > self.limits.max_value {
            Err(Self::err(
                "put",
                format!(
                    "value of {} bytes over max_value {}",
                    value.len(),
                    self.limits.max_value
                ),
            ))
        } else {
            self.lock().insert(key.to_owned(), value.to_vec());
            RequestStats::add(&self.stats.puts, 1);
            RequestStats::add(&self.stats.bytes_put, value.len() as u64);
            self.changed.notify_waiters();
            Ok(())
        };
        futures::future::ready(r).boxed()
    }

    fn take<'a>(
        &'a self,
        key: &'a str,
        deadline: Instant,
    ) -> BoxFuture<'a, Result<Option<Vec<u8>>, MailboxError>> {
        let wait = self.limits.push.then_some(deadline);
        self.read(key, true, wait).boxed()
    }

    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Vec<u8>>, MailboxError>> {
        self.read(key, false, None).boxed()
    }

    fn get_wait<'a>(
        &'a self,
        key: &'a str,
        deadline: Instant,
    ) -> BoxFuture<'a, Result<Option<Vec<u8>>, MailboxError>> {
        let wait = self.limits.push.then_some(deadline);
        self.read(key, false, wait).boxed()
    }

    fn delete<'a>(&'a self, keys: &'a [String]) -> BoxFuture<'a, Result<(), MailboxError>> {
        let mut map = self.lock();
        for k in keys {
            map.remove(k);
        }
        RequestStats::add(&self.stats.deletes, 1);
        futures::future::ready(Ok(())).boxed()
    }

    fn list<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<Vec<String>, MailboxError>> {
        let keys = self
            .lock()
            .range(prefix.to_owned()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, _)| k.clone())
            .collect();
        RequestStats::add(&self.stats.lists, 1);
        futures::future::ready(Ok(keys)).boxed()
    }

    fn incr<'a>(
        &'a self,
        key: &'a str,
        by: i64,
    ) -> Option<BoxFuture<'a, Result<i64, MailboxError>>> {
        if !self.counters {
            return None;
        }
        Some(
            async move {
                let mut map = self.lock();
                let old = match map.get(key) {
                    None => 0,
                    Some(v) => std::str::from_utf8(v)
                        .ok()
                        .and_then(|s| s.parse::<i64>().ok())
                        .ok_or_else(|| Self::err("incr", format!("{key} is not a counter")))?,
                };
                let new = old + by;
                map.insert(key.to_owned(), new.to_string().into_bytes());
                RequestStats::add(&self.stats.counters, 1);
                drop(map);
                self.changed.notify_waiters();
                Ok(new)
            }
            .boxed(),
        )
    }

    fn stats(&self) -> &RequestStats {
        &self.stats
    }
}

/// Which requests a [`FlakyMailbox`] fails.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Faults {
    /// The first `put` of each key is performed, then reported as a retryable failure (as when
    /// the connection breaks before the answer arrives): the adapter must retry it and the
    /// message must still arrive exactly once.
    pub put_after: bool,
    /// The first `take` of each key fails with a retryable error before reaching the backend.
    pub take_before: bool,
    /// The first `get`/`get_wait` of each key fails with a retryable error before reaching the
    /// backend.
    pub get_before: bool,
}

/// Wraps a mailbox (for example the real Redis one) and injects the retryable failures chosen
/// in [`Faults`], each once per key. A test double, for exactly-once tests.
#[derive(Debug)]
pub struct FlakyMailbox {
    inner: Arc<dyn Mailbox>,
    faults: Faults,
    failed: Mutex<HashSet<(&'static str, String)>>,
    injected: AtomicU64,
}

impl FlakyMailbox {
    /// `inner` with `faults` injected.
    pub fn new(inner: Arc<dyn Mailbox>, faults: Faults) -> Arc<FlakyMailbox> {
        Arc::new(FlakyMailbox {
            inner,
            faults,
            failed: Mutex::new(HashSet::new()),
            injected: AtomicU64::new(0),
        })
    }

    /// How many failures were injected so far.
    pub fn injected(&self) -> u64 {
        self.injected.load(Ordering::Relaxed)
    }

    /// Whether this is the first request of kind `op` for `key` (and records it).
    fn first(&self, op: &'static str, key: &str) -> bool {
        let fresh = self
            .failed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert((op, key.to_owned()));
        if fresh {
            self.injected.fetch_add(1, Ordering::Relaxed);
        }
        fresh
    }

    fn fault(&self, op: &'static str) -> MailboxError {
        MailboxError {
            backend: self.inner.name(),
            op,
            retryable: true,
            detail: "injected failure (test)".into(),
        }
    }
}

impl Mailbox for FlakyMailbox {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    fn limits(&self) -> MailboxLimits {
        self.inner.limits()
    }

    fn put<'a>(&'a self, key: &'a str, value: &'a [u8]) -> BoxFuture<'a, Result<(), MailboxError>> {
        async move {
            self.inner.put(key, value).await?;
            if self.faults.put_after && self.first("put", key) {
                return Err(self.fault("put"));
            }
            Ok(())
        }
        .boxed()
    }

    fn take<'a>(
        &'a self,
        key: &'a str,
        deadline: Instant,
    ) -> BoxFuture<'a, Result<Option<Vec<u8>>, MailboxError>> {
        if self.faults.take_before && self.first("take", key) {
            return futures::future::ready(Err(self.fault("take"))).boxed();
        }
        self.inner.take(key, deadline)
    }

    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Vec<u8>>, MailboxError>> {
        if self.faults.get_before && self.first("get", key) {
            return futures::future::ready(Err(self.fault("get"))).boxed();
        }
        self.inner.get(key)
    }

    fn get_wait<'a>(
        &'a self,
        key: &'a str,
        deadline: Instant,
    ) -> BoxFuture<'a, Result<Option<Vec<u8>>, MailboxError>> {
        if self.faults.get_before && self.first("get", key) {
            return futures::future::ready(Err(self.fault("get"))).boxed();
        }
        self.inner.get_wait(key, deadline)
    }

    fn delete<'a>(&'a self, keys: &'a [String]) -> BoxFuture<'a, Result<(), MailboxError>> {
        self.inner.delete(keys)
    }

    fn list<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<Vec<String>, MailboxError>> {
        self.inner.list(prefix)
    }

    fn incr<'a>(
        &'a self,
        key: &'a str,
        by: i64,
    ) -> Option<BoxFuture<'a, Result<i64, MailboxError>>> {
        self.inner.incr(key, by)
    }

    fn stats(&self) -> &RequestStats {
        self.inner.stats()
    }

    fn flush(&self) -> BoxFuture<'_, Result<(), MailboxError>> {
        self.inner.flush()
    }
}

/// A TCP proxy on loopback in front of a real server that, once armed, loses the answer to the
/// next request containing a byte pattern (for example `DynamoDB_20120810.DeleteItem`, `DELETE /`
/// or Redis' `$3\r\nDEL\r\n`): the request is forwarded, the server applies it and answers, and
/// the proxy drops that answer and closes the client's connection. Everything else is forwarded
/// unchanged. A test double for faults; it only ever connects to the `upstream` it was given.
#[derive(Debug)]
pub struct CutProxy {
    addr: std::net::SocketAddr,
    shared: Arc<CutShared>,
    accept: tokio::task::JoinHandle<()>,
}

#[derive(Debug)]
struct CutShared {
    pattern: Vec<u8>,
    armed: std::sync::atomic::AtomicBool,
    cuts: AtomicU64,
}

impl CutProxy {
    /// Listens on `127.0.0.1:0` and forwards every connection to `upstream`, cutting after
    /// requests that contain `pattern` while armed. Must be called inside a tokio runtime.
    pub async fn start(
        upstream: std::net::SocketAddr,
        pattern: &[u8],
    ) -> std::io::Result<CutProxy> {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(CutShared {
            pattern: pattern.to_vec(),
            armed: std::sync::atomic::AtomicBool::new(false),
            cuts: AtomicU64::new(0),
        });
        let s = Arc::clone(&shared);
        let accept = tokio::spawn(async move {
            // Ends when the proxy is dropped (the task is aborted).
            while let Ok((client, _)) = listener.accept().await {
                let s = Arc::clone(&s);
                tokio::spawn(async move {
                    if let Ok(server) = tokio::net::TcpStream::connect(upstream).await {
                        let _ = client.set_nodelay(true);
                        let _ = server.set_nodelay(true);
                        pump(client, server, &s).await;
                    }
                });
            }
        });
        Ok(CutProxy {
            addr,
            shared,
            accept,
        })
    }

    /// The address clients connect to.
    pub fn addr(&self) -> std::net::SocketAddr {
        self.addr
    }

    /// Cuts after the next request that contains the pattern (once).
    pub fn arm(&self) {
        self.shared.armed.store(true, Ordering::SeqCst);
    }

    /// Whether the proxy is still waiting for a request to cut.
    pub fn armed(&self) -> bool {
        self.shared.armed.load(Ordering::SeqCst)
    }

    /// How many answers the proxy has dropped so far.
    pub fn cuts(&self) -> u64 {
        self.shared.cuts.load(Ordering::SeqCst)
    }
}

impl Drop for CutProxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// Forwards bytes both ways until either side closes, or drops the first answer that follows a
/// request with the pattern and returns (closing both connections).
async fn pump(mut client: tokio::net::TcpStream, mut server: tokio::net::TcpStream, s: &CutShared) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut up = vec![0u8; 64 * 1024];
    let mut down = vec![0u8; 64 * 1024];
    // The end of the previous client read, so that a pattern split across reads is found.
    let mut tail: Vec<u8> = Vec::new();
    let mut cut_next_answer = false;
    // Bounded by the connections' lifetimes: every round moves bytes or ends.
    loop {
        tokio::select! {
            r = client.read(&mut up) => {
                let n = match r { Ok(0) | Err(_) => return, Ok(n) => n };
                let mut window = std::mem::take(&mut tail);
                window.extend_from_slice(&up[..n]);
                if !cut_next_answer
                    && contains(&window, &s.pattern)
                    && s.armed.swap(false, Ordering::SeqCst)
                {
                    cut_next_answer = true;
                }
                let keep = s.pattern.len().saturating_sub(1).min(window.len());
                tail = window[window.len() - keep..].to_vec();
                if server.write_all(&up[..n]).await.is_err() {
                    return;
                }
            }
            r = server.read(&mut down) => {
                let n = match r { Ok(0) | Err(_) => return, Ok(n) => n };
                if cut_next_answer {
                    // The server applied the request and answered: the answer is lost.
                    s.cuts.fetch_add(1, Ordering::SeqCst);
                    return;
                }
                if client.write_all(&down[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}
