//! The generic adapter: any [`Mailbox`] as an [`fmi_channels::Channel`].

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use fmi_channels::{
    check_rank, Capabilities, Channel, Error, Instant, JobId, NativeCollectives, Rank, Result, Tag,
    Turnstile,
};
use futures::future::{BoxFuture, FutureExt};
use futures::StreamExt;

use crate::keys::{self, ObjectKey, Plan, HEADER_LEN};
use crate::{Mailbox, MailboxError, MailboxLimits, StatsSnapshot, StorageConfig};

/// How long a mailbox request may run past the caller's deadline before the adapter gives up on
/// it. Mailboxes bound their own requests (a push `take` returns at the deadline); the grace only
/// avoids cutting a request that was about to answer, which for `take` could drop a message the
/// server had already handed out.
const GRACE: Duration = Duration::from_secs(1);

/// Share of first polls that should find the message waiting (poll backends, see
/// [`StorageChannel::learn_arrival`]): the rest cost one empty poll each.
const HIT_TARGET: f64 = 0.85;
/// How far one observation moves the learned arrival time (relative).
const LEARN_RATE: f64 = 0.2;

/// Bound on the one request that reads or writes the job's failure record (see
/// [`Channel::abort`]).
const FAILURE_RECORD_WAIT: Duration = Duration::from_secs(1);

/// How long a rank whose wait timed out gives the others that timed out at about the same
/// moment (a cascade: their deadlines were set within one operation of each other) to record
/// whom they waited for, before it reads the failure record; also the pause between re-reads.
const BLAME_GRACE: Duration = Duration::from_millis(100);

/// How long the rank named by the failure record must stay the same, over re-reads, before a
/// rank whose wait timed out believes it. A living rank stuck behind the failed one times out
/// a little later than the ranks stuck behind it when it entered its wait later (a slow step,
/// a descheduled process): one read after [`BLAME_GRACE`] named such a rank instead of the
/// failed one in a CI run with 7 ranks on 2 cores.
const BLAME_SETTLE: Duration = Duration::from_millis(300);

/// Bound on re-reading the failure record while the rank it names keeps changing.
const BLAME_READ_MAX: Duration = Duration::from_millis(800);

/// One rank's endpoint of a storage channel: point-to-point messages become keys of a
/// [`Mailbox`] (see the crate docs for the key layout and the waiting strategy).
pub struct StorageChannel {
    mailbox: Arc<dyn Mailbox>,
    job: JobId,
    /// The prefix of every key this channel writes ([`keys::key_space`]).
    space: String,
    rank: Rank,
    size: u32,
    config: StorageConfig,
    limits: MailboxLimits,
    /// Bytes per chunk, header included.
    chunk: usize,
    /// Whether the mailbox has atomic counters (probed once in `new`).
    counters: bool,
    /// Next sequence number per (destination, tag), taken synchronously in `send`.
    send_seq: Mutex<HashMap<(Rank, Tag), u64>>,
    /// Receive state per (source, tag).
    recv: Mutex<HashMap<(Rank, Tag), Arc<RecvQueue>>>,
    /// Poll backends: per source rank, when its messages tend to arrive, counted from the
    /// moment a receiver starts waiting for them (see [`StorageChannel::learn_arrival`]).
    arrival: Mutex<HashMap<Rank, Duration>>,
    /// Set by the first [`Channel::abort`]: the rank whose failure broke the job.
    aborted: OnceLock<Rank>,
}

/// Receivers of one (source, tag), served in call order: only the receiver at the head of the
/// turnstile reads the mailbox, so message `next_seq` goes to the oldest waiting `recv`.
#[derive(Debug, Default)]
struct RecvQueue {
    turnstile: Turnstile,
    state: Mutex<RecvState>,
}

#[derive(Debug, Default)]
struct RecvState {
    /// Sequence number of the next message to deliver.
    next_seq: u64,
    /// Chunks of message `next_seq` already taken by a receiver that then timed out or was
    /// cancelled; the next receiver continues from here instead of waiting for deleted chunks.
    partial: Option<Partial>,
}

#[derive(Debug)]
struct Partial {
    total: u64,
    chunks: u32,
    next: u32,
    buf: Vec<u8>,
}

/// Puts a partially received message back into its queue if the receive ends early.
struct PartialGuard<'q> {
    queue: &'q RecvQueue,
    partial: Option<Partial>,
}

impl Drop for PartialGuard<'_> {
    fn drop(&mut self) {
        if let Some(p) = self.partial.take() {
            lock(&self.queue.state).partial = Some(p);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section is a few field updates that cannot panic halfway.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl std::fmt::Debug for StorageChannel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StorageChannel")
            .field("mailbox", &self.mailbox)
            .field("job", &self.job)
            .field("rank", &self.rank)
            .field("size", &self.size)
            .field("chunk", &self.chunk)
            .field("counters", &self.counters)
            .finish_non_exhaustive()
    }
}

/// Which mailbox read a wait uses.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Read {
    /// `take`: remove what is returned (point-to-point messages).
    Take,
    /// `get` / `get_wait`: leave it for other readers (broadcast, barrier release).
    Peek,
}

impl StorageChannel {
    /// The endpoint of rank `rank` in job `job` of `size` ranks over `mailbox`. Each rank of a
    /// job makes its own (usually each with its own mailbox client, as separate functions do).
    ///
    /// Fails with [`Error::InvalidRank`] for a rank outside `0..size` and with [`Error::Config`]
    /// for unusable settings (for example a chunk size no larger than the 13-byte header).
    pub fn new(
        mailbox: Arc<dyn Mailbox>,
        job: JobId,
        rank: Rank,
        size: u32,
        config: StorageConfig,
    ) -> Result<StorageChannel> {
        if size == 0 {
            return Err(Error::InvalidArgument {
                what: "a storage channel needs at least one rank",
            });
        }
        check_rank(rank, size)?;
        if let Some(detail) = config.problem() {
            return Err(Error::Config {
                path: None,
                detail: detail.to_owned(),
            });
        }
        let limits = mailbox.limits();
        let chunk = config
            .max_chunk
            .map_or(limits.max_value, |c| c.min(limits.max_value));
        if chunk <= HEADER_LEN {
            return Err(Error::Config {
                path: None,
                detail: format!(
                    "storage: chunks of {chunk} bytes leave no room after the {HEADER_LEN}-byte \
                     header; raise max_chunk or the {} backend's max_value",
                    mailbox.name()
                ),
            });
        }
        // Futures are lazy: asking for an increment and dropping it unpolled only tells whether
        // the backend has counters (the trait returns `None` when it has none).
        let counters = mailbox
            .incr(&format!("{}probe", keys::job_prefix(&job)), 0)
            .is_some();
        Ok(StorageChannel {
            mailbox,
            space: keys::job_prefix(&job),
            job,
            rank,
            size,
            config,
            limits,
            chunk,
            counters,
            send_seq: Mutex::new(HashMap::new()),
            recv: Mutex::new(HashMap::new()),
            arrival: Mutex::new(HashMap::new()),
            aborted: OnceLock::new(),
        })
    }

    /// The request counters of the underlying mailbox (shared by every channel on it).
    pub fn stats(&self) -> StatsSnapshot {
        self.mailbox.stats().snapshot()
    }

    /// The mailbox this channel stores its messages in.
    pub fn mailbox(&self) -> &Arc<dyn Mailbox> {
        &self.mailbox
    }

    /// Finishes the mailbox's deferred work now (Redis: deletes the message keys it has read
    /// and queued for deletion, which otherwise go with its next request, 2 ms later, or when
    /// the mailbox is dropped). For a caller that wants the job's keyspace empty at a point.
    pub async fn flush(&self) -> Result<()> {
        self.mailbox
            .flush()
            .await
            .map_err(|e| self.io(None, io::Error::other(e)))
    }

    /// Puts this channel's keys in the job's secret key space (`fmi/{job}/k{h}/`, `h` a hash of
    /// job id and `secret`), so that only ranks given the same secret (the job token of
    /// `fmi run`, `FMI_TOKEN`) meet there: a client without it cannot name any key of the job.
    /// Every rank of a job must be given the same secret, or none. [`crate::cleanup_job`] still
    /// finds the keys (they stay under [`crate::job_prefix`]).
    #[must_use]
    pub fn with_secret(mut self, secret: &[u8]) -> StorageChannel {
        self.space = keys::key_space(&self.job, Some(secret));
        self
    }

    /// The prefix of every key this channel writes.
    pub fn key_space(&self) -> &str {
        &self.space
    }

    /// The chunk size in use: the largest value one request stores, header included.
    pub fn chunk_size(&self) -> usize {
        self.chunk
    }

    fn timeout(&self, peer: Option<Rank>, tag: Tag, started: Instant) -> Error {
        Error::Timeout {
            me: self.rank,
            // A barrier cannot tell which rank is missing: it names this rank.
            peer: peer.unwrap_or(self.rank),
            waited: started.elapsed(),
            channel: self.mailbox.name(),
            tag,
        }
    }

    /// The error every operation fails with once [`Channel::abort`] was called.
    fn aborted_error(&self) -> Option<Error> {
        self.aborted.get().map(|&victim| Error::PeerLost {
            me: self.rank,
            peer: victim,
            channel: self.mailbox.name(),
            via: None,
        })
    }

    /// A wait that timed out naming `peer` may have waited for a rank that was itself stuck
    /// behind a failed one. This rank records whom it waited for in the job's failure record
    /// at once (so that ranks stuck behind it can follow), gives the ranks that timed out at
    /// about the same moment [`BLAME_GRACE`] to do the same, then reads the record: following
    /// it from `peer` to a rank that reported nothing gives the rank whose failure broke the
    /// job, named as [`Error::PeerLost`] with `via` the last reporter. The record is re-read
    /// every [`BLAME_GRACE`] until that answer has stood for [`BLAME_SETTLE`] (at most
    /// [`BLAME_READ_MAX`]), so a living rank that reports a little late is followed, not named.
    /// Without a record that leads anywhere, `err` stays. Each request is bounded by a second.
    async fn name_failed(&self, err: Error) -> Error {
        let Error::Timeout { peer, .. } = &err else {
            return err;
        };
        let peer = *peer;
        if peer == self.rank || !self.config.record_failures {
            return err;
        }
        let key = keys::failure_key(&self.space);
        let Some(report) = self.mailbox.report_failure(&key, self.rank.0, peer.0) else {
            return err;
        };
        if !matches!(
            tokio::time::timeout(FAILURE_RECORD_WAIT, report).await,
            Ok(Ok(()))
        ) {
            return err;
        }
        // Re-read until the answer has stood for BLAME_SETTLE: a rank whose own report is
        // still to come would otherwise be named (bounded: BLAME_READ_MAX, then the last answer).
        let first = Instant::now();
        let mut answer = None;
        let mut since = first;
        loop {
            tokio::time::sleep(BLAME_GRACE).await;
            let read = self.mailbox.failures(&key);
            let records = match tokio::time::timeout(FAILURE_RECORD_WAIT, read).await {
                Ok(Ok(Some(records))) => records,
                _ => break,
            };
            let now = Instant::now();
            let next = follow_blame(&records, peer, self.rank);
            if next != answer {
                answer = next;
                since = now;
            }
            if now.duration_since(since) >= BLAME_SETTLE
                || now.duration_since(first) >= BLAME_READ_MAX
            {
                break;
            }
        }
        match answer {
            Some((victim, via)) => Error::PeerLost {
                me: self.rank,
                peer: victim,
                channel: self.mailbox.name(),
                via: Some(via),
            },
            None => err,
        }
    }

    fn io(&self, peer: Option<Rank>, source: io::Error) -> Error {
        Error::Io {
            me: self.rank,
            peer,
            channel: self.mailbox.name(),
            source,
        }
    }

    fn corrupt(&self, peer: Rank, what: String) -> Error {
        self.io(Some(peer), io::Error::new(io::ErrorKind::InvalidData, what))
    }

    /// Runs one mailbox request, retrying retryable failures with exponential backoff while the
    /// deadline allows. A failure that persists becomes [`Error::Io`] carrying the
    /// [`MailboxError`]; a request still unanswered past the deadline becomes [`Error::Timeout`].
    async fn call<T, F, Fut>(
        &self,
        peer: Option<Rank>,
        tag: Tag,
        started: Instant,
        deadline: Instant,
        mut op: F,
    ) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = std::result::Result<T, MailboxError>>,
    {
        let mut pause = self.config.retry_initial;
        // Bounded by the deadline: every iteration either returns or sleeps `pause` > 0.
        loop {
            match tokio::time::timeout_at(deadline + GRACE, op()).await {
                Err(_) => return Err(self.timeout(peer, tag, started)),
                Ok(Ok(v)) => return Ok(v),
                Ok(Err(e)) if e.retryable && Instant::now() + pause < deadline => {
                    tracing::debug!(rank = %self.rank, error = %e, ?pause, "retrying mailbox request");
                    crate::RequestStats::add(&self.mailbox.stats().retries, 1);
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(self.config.retry_max);
                }
                Ok(Err(e)) => return Err(self.io(peer, io::Error::other(e))),
            }
        }
    }

    /// Waits for `key` to appear and reads it: push mailboxes block server-side, poll mailboxes
    /// are polled with exponential backoff (`poll_initial` doubling to `poll_max`).
    ///
    /// With `learn` (the first chunk of a point-to-point message from that source, on a poll
    /// backend) the first poll is not sent at once but when this source's messages have tended
    /// to arrive, and follow-up polls start at an eighth of that time: see
    /// [`StorageChannel::learn_arrival`].
    #[allow(clippy::too_many_arguments)]
    async fn wait_for(
        &self,
        key: &str,
        read: Read,
        peer: Option<Rank>,
        tag: Tag,
        started: Instant,
        deadline: Instant,
        learn: Option<Rank>,
    ) -> Result<Vec<u8>> {
        let mb = &self.mailbox;
        let learn = learn.filter(|_| !self.limits.push);
        let expected = learn.and_then(|src| lock(&self.arrival).get(&src).copied());
        let begun = Instant::now();
        let mut pause = match expected {
            Some(e) => (e / 8)
                .max(self.config.poll_initial)
                .min(self.config.poll_max),
            None => self.config.poll_initial,
        };
        let mut first_poll = expected
            .filter(|e| !e.is_zero())
            .map(|e| (begun + e).min(deadline));
        let mut polls = 0u32;
        let mut last_empty = Duration::ZERO;
        loop {
            if let Some(at) = first_poll.take() {
                tokio::time::sleep_until(at).await;
            }
            let asked = Instant::now();
            polls += 1;
            let got = match (read, self.limits.push) {
                (Read::Take, _) => {
                    self.call(peer, tag, started, deadline, || mb.take(key, deadline))
                        .await?
                }
                (Read::Peek, true) => {
                    self.call(peer, tag, started, deadline, || mb.get_wait(key, deadline))
                        .await?
                }
                (Read::Peek, false) => {
                    self.call(peer, tag, started, deadline, || mb.get(key))
                        .await?
                }
            };
            if let Some(v) = got {
                if let Some(src) = learn {
                    self.learn_arrival(src, expected, polls, last_empty, asked - begun);
                }
                return Ok(v);
            }
            last_empty = asked - begun;
            let now = Instant::now();
            if now >= deadline {
                return Err(self.timeout(peer, tag, started));
            }
            // A push mailbox already waited (until the deadline or its own cap) and is asked
            // again at once; one that answered "nothing" instantly is not really blocking, so it
            // gets the poll pause instead of a busy loop.
            if !self.limits.push || now - asked < Duration::from_millis(1) {
                tokio::time::sleep_until((now + pause).min(deadline)).await;
                pause = (pause * 2).min(self.config.poll_max);
            }
        }
    }

    /// Updates the learned arrival time of `src`'s messages after a receive that found chunk 0
    /// at its `polls`-th poll, sent `found` after the wait began (the previous, empty poll at
    /// `last_empty`), when `expected` was the estimate it started from.
    ///
    /// The estimate tracks a high quantile ([`HIT_TARGET`]) of the arrival time with
    /// multiplicative steps: a first poll that finds the message lowers it by
    /// `LEARN_RATE * (1 - HIT_TARGET)` (3 %), a miss raises it by `LEARN_RATE * HIT_TARGET`
    /// (17 %), and at least to the middle of the interval the message arrived in. In a steady
    /// exchange this settles where about 85 % of first polls hit, so a message costs about
    /// 0.15-0.4 empty polls instead of the several an exponential backoff from zero costs; the
    /// price is that the first poll lands on average some per cent after the message (the
    /// trade-off is documented in docs/configuration.md). A message that is already there when
    /// the receive starts (streaming) is found by the first poll and pulls the estimate down
    /// by 3 % per message (to zero below `poll_initial`: then the first poll goes out at once).
    /// A late message at most doubles the estimate (a first one: twice `poll_initial`), and it
    /// never exceeds twice `poll_max`.
    fn learn_arrival(
        &self,
        src: Rank,
        expected: Option<Duration>,
        polls: u32,
        last_empty: Duration,
        found: Duration,
    ) {
        let next = if polls <= 1 {
            expected.map_or(Duration::ZERO, |e| {
                e.mul_f64(1.0 - LEARN_RATE * (1.0 - HIT_TARGET))
            })
        } else {
            let middle = last_empty + found.saturating_sub(last_empty) / 2;
            let raised = expected
                .unwrap_or(Duration::ZERO)
                .mul_f64(1.0 + LEARN_RATE * HIT_TARGET);
            // One late message (a large one among small ones: the receiver cannot tell them
            // apart before the first chunk is there; or a server's hiccup) at most doubles an
            // estimate, or sets a first one to twice `poll_initial`, so that it does not make
            // the next many receives sleep as long as it took (a hit lowers the estimate by
            // only 3 %). Messages that keep coming late double it per receive.
            let base = expected
                .filter(|e| !e.is_zero())
                .unwrap_or(self.config.poll_initial);
            let ceiling = base * 2;
            raised.max(middle.min(ceiling))
        };
        // The estimate may reach twice `poll_max`, so that a message that keeps arriving later
        // than `poll_max` (a 16 MiB S3 object under `StorageConfig::fast()`) is learned, but
        // no further: a receive whose message is already there sleeps until its first poll,
        // and an estimate that grew without bound (doubling per late receive, as it once did)
        // made a run of late arrivals in one collective cost every later receive from that
        // rank many seconds (a 5-rank S3 job ran past 60 s).
        let cap = self.config.poll_max * 2;
        let next = if next < self.config.poll_initial / 4 {
            Duration::ZERO
        } else {
            next.min(cap)
        };
        lock(&self.arrival).insert(src, next);
    }

    /// Stores `data` as the chunked object `key`: chunks `1..` (a few at a time), then chunk 0,
    /// the commit record.
    async fn put_object(
        &self,
        key: &ObjectKey,
        data: &[u8],
        peer: Option<Rank>,
        tag: Tag,
        started: Instant,
        deadline: Instant,
    ) -> Result<u32> {
        let plan = Plan::new(data.len(), self.chunk).ok_or(Error::TooLarge {
            len: data.len(),
            max: (u32::MAX as usize).saturating_mul(self.chunk),
            channel: self.mailbox.name(),
        })?;
        let mb = &self.mailbox;
        if plan.chunks > 1 {
            let mut rest = futures::stream::iter(1..plan.chunks)
                .map(|i| {
                    let k = key.chunk(i);
                    let piece = plan.piece(data, i);
                    async move {
                        self.call(peer, tag, started, deadline, || mb.put(&k, piece))
                            .await
                    }
                })
                .buffer_unordered(self.config.put_concurrency);
            while let Some(r) = rest.next().await {
                r?;
            }
        }
        // Header and first piece go to the mailbox as two slices: no chunk-sized copy here.
        let head = plan.header(data.len());
        let piece = plan.piece(data, 0);
        let k = key.chunk(0);
        self.call(peer, tag, started, deadline, || {
            mb.put_parts(&k, &head, piece)
        })
        .await?;
        Ok(plan.chunks)
    }

    /// Reads the remaining chunks of the message in `guard` on a push backend, up to
    /// `put_concurrency` at once (they are all stored before chunk 0, so their round trips
    /// overlap instead of adding up; a 1 MiB message over Redis: 1.5–1.6 ms instead of 1.6–2.0).
    /// Reads do not remove: a chunk is released (its delete queued) once it is part of the
    /// buffer, so a receive cut short leaves every chunk it has not used for the next one.
    async fn read_ahead(
        &self,
        key: &ObjectKey,
        guard: &mut PartialGuard<'_>,
        peer: Option<Rank>,
        tag: Tag,
        started: Instant,
        deadline: Instant,
    ) -> Result<()> {
        let Some((next, chunks)) = guard.partial.as_ref().map(|p| (p.next, p.chunks)) else {
            return Ok(());
        };
        let names: Vec<String> = (next..chunks).map(|i| key.chunk(i)).collect();
        // Boxed one by one: a stream of `async fn` futures built by a closure over borrowed names
        // is not provably `Send` for every lifetime, which the boxed receive needs.
        let mut pending: Vec<BoxFuture<'_, Result<Vec<u8>>>> = Vec::with_capacity(names.len());
        for name in &names {
            pending.push(
                self.wait_for(name, Read::Peek, peer, tag, started, deadline, None)
                    .boxed(),
            );
        }
        let mut reads = futures::stream::iter(pending).buffered(self.config.put_concurrency.max(1));
        let mut names = names.iter();
        while let Some(v) = reads.next().await {
            let v = v?;
            let (Some(p), Some(name)) = (guard.partial.as_mut(), names.next()) else {
                break;
            };
            p.buf.extend_from_slice(&v);
            p.next += 1;
            let over = p.buf.len() as u64 > p.total;
            self.call(peer, tag, started, deadline, || self.mailbox.release(name))
                .await?;
            if over {
                break;
            }
        }
        Ok(())
    }

    fn queue(&self, src: Rank, tag: Tag) -> Arc<RecvQueue> {
        Arc::clone(lock(&self.recv).entry((src, tag)).or_default())
    }

    /// Receives message `next_seq` of `queue` (the caller holds the queue's turn).
    async fn receive(
        &self,
        src: Rank,
        tag: Tag,
        queue: &RecvQueue,
        started: Instant,
        deadline: Instant,
    ) -> Result<Vec<u8>> {
        let (seq, partial) = {
            let mut st = lock(&queue.state);
            (st.next_seq, st.partial.take())
        };
        let key = ObjectKey::message(&self.space, src, self.rank, tag, seq);
        let mut guard = PartialGuard { queue, partial };
        let peer = Some(src);
        if guard.partial.is_none() {
            let first = self
                .wait_for(
                    &key.chunk(0),
                    Read::Take,
                    peer,
                    tag,
                    started,
                    deadline,
                    Some(src),
                )
                .await?;
            let h = match keys::decode_first(&first) {
                Ok((h, _)) => h,
                Err(what) => {
                    // Skip the broken message rather than waiting for it forever.
                    lock(&queue.state).next_seq = seq + 1;
                    return Err(self.corrupt(src, what));
                }
            };
            // Chunk 0 becomes the message buffer: the header is removed in place instead of
            // copying the body into a new buffer, which for a large message cost a second copy
            // into fresh memory (a page fault per 4 KiB) and made a 1 MiB message over Redis
            // 1.5-1.9x slower than two plain round trips (docs/benchmarks.md).
            let mut buf = first;
            buf.drain(..HEADER_LEN);
            // Bounded preallocation: a lying header must not reserve terabytes.
            let want = usize::try_from(h.total).unwrap_or(0).min(64 << 20);
            buf.reserve_exact(want.saturating_sub(buf.len()));
            guard.partial = Some(Partial {
                total: h.total,
                chunks: h.chunks,
                next: 1,
                buf,
            });
        }
        if self.limits.push {
            self.read_ahead(&key, &mut guard, peer, tag, started, deadline)
                .await?;
        }
        // Bounded by the chunk count from the header.
        loop {
            let next = match &guard.partial {
                Some(p) if p.next < p.chunks => p.next,
                _ => break,
            };
            let v = self
                .wait_for(
                    &key.chunk(next),
                    Read::Take,
                    peer,
                    tag,
                    started,
                    deadline,
                    None,
                )
                .await?;
            if let Some(p) = guard.partial.as_mut() {
                p.buf.extend_from_slice(&v);
                p.next += 1;
                if p.buf.len() as u64 > p.total {
                    break;
                }
            }
        }
        let p = guard.partial.take();
        lock(&queue.state).next_seq = seq + 1;
        match p {
            Some(p) if p.buf.len() as u64 == p.total => Ok(p.buf),
            Some(p) => Err(self.corrupt(
                src,
                format!(
                    "message {seq} with tag {tag}: header says {} bytes, chunks hold {}",
                    p.total,
                    p.buf.len()
                ),
            )),
            None => Err(self.corrupt(src, format!("message {seq} with tag {tag}: lost state"))),
        }
    }

    /// Reads the chunked object `key` without removing it (broadcast readers).
    async fn peek_object(
        &self,
        key: &ObjectKey,
        peer: Rank,
        tag: Tag,
        started: Instant,
        deadline: Instant,
    ) -> Result<(Vec<u8>, u32)> {
        self.read_object(key, Read::Peek, peer, tag, started, deadline)
            .await
    }

    /// Reads the chunked object `key`, removing it with [`Read::Take`] (gather blocks) or not.
    async fn read_object(
        &self,
        key: &ObjectKey,
        read: Read,
        peer: Rank,
        tag: Tag,
        started: Instant,
        deadline: Instant,
    ) -> Result<(Vec<u8>, u32)> {
        let first = self
            .wait_for(
                &key.chunk(0),
                read,
                Some(peer),
                tag,
                started,
                deadline,
                None,
            )
            .await?;
        let (h, body) = keys::decode_first(&first).map_err(|w| self.corrupt(peer, w))?;
        let mut buf = Vec::with_capacity(usize::try_from(h.total).unwrap_or(0).min(64 << 20));
        buf.extend_from_slice(body);
        for i in 1..h.chunks {
            let v = self
                .wait_for(
                    &key.chunk(i),
                    read,
                    Some(peer),
                    tag,
                    started,
                    deadline,
                    None,
                )
                .await?;
            buf.extend_from_slice(&v);
            if buf.len() as u64 > h.total {
                break;
            }
        }
        if buf.len() as u64 != h.total {
            return Err(self.corrupt(
                peer,
                format!(
                    "object {tag}: header says {} bytes, chunks hold {}",
                    h.total,
                    buf.len()
                ),
            ));
        }
        Ok((buf, h.chunks))
    }

    /// Adds 1 to the counter `key`; with `mark`, through [`Mailbox::incr_marking`], recording
    /// this rank (the barrier's and gather's counters, always marked or never).
    async fn incr(
        &self,
        key: &str,
        mark: bool,
        peer: Option<Rank>,
        tag: Tag,
        started: Instant,
        deadline: Instant,
    ) -> Result<i64> {
        let mb = &self.mailbox;
        let (me, size) = (self.rank.0, self.size);
        self.call(peer, tag, started, deadline, || {
            let f = if mark {
                mb.incr_marking(key, 1, me, size)
            } else {
                mb.incr(key, 1)
            };
            f.unwrap_or_else(|| {
                futures::future::ready(Err(MailboxError {
                    backend: mb.name(),
                    op: "incr",
                    retryable: false,
                    detail: "the backend stopped offering atomic counters".into(),
                }))
                .boxed()
            })
        })
        .await
    }

    /// A barrier's or gather's wait under the counter `key` failed: a timeout that names this
    /// rank (it could not tell who was missing) is made to name the lowest rank the counter
    /// never recorded, when the backend records them (one more request, bounded by a second).
    /// If every rank was counted, the flag was never raised: the rank whose increment reached
    /// `complete_at` (recorded by Redis) had to raise it, and is named.
    async fn blame(&self, err: Error, key: &str, complete_at: i64) -> Error {
        let Error::Timeout {
            me,
            peer,
            waited,
            channel,
            tag,
        } = err
        else {
            return err;
        };
        let mut named = peer;
        if peer == self.rank {
            let ask = self.mailbox.marked(key, self.size);
            if let Ok(Ok(Some(marks))) = tokio::time::timeout(Duration::from_secs(1), ask).await {
                let missing = (0..self.size)
                    .find(|r| *r != self.rank.0 && !marks.iter().any(|m| m.member == *r));
                let completer = marks
                    .iter()
                    .find(|m| m.at == Some(complete_at) && m.member != self.rank.0)
                    .map(|m| m.member);
                if let Some(r) = missing.or(completer) {
                    named = Rank(r);
                }
            }
        }
        Error::Timeout {
            me,
            peer: named,
            waited,
            channel,
            tag,
        }
    }

    /// Deletes leftovers of a finished collective. The operation itself succeeded, so a failure
    /// here is only logged: the keys expire (Redis TTL) or go with `cleanup_job`.
    async fn tidy(&self, keys: Vec<String>, tag: Tag, started: Instant, deadline: Instant) {
        let mb = &self.mailbox;
        let r = self
            .call(
                None,
                tag,
                started,
                deadline.max(Instant::now() + GRACE),
                || mb.delete(&keys),
            )
            .await;
        if let Err(e) = r {
            tracing::warn!(rank = %self.rank, error = %e, "could not delete a collective's keys");
        }
    }

    async fn bcast_impl(
        &self,
        root: Rank,
        tag: Tag,
        data: Option<&[u8]>,
        deadline: Instant,
    ) -> Result<Vec<u8>> {
        check_rank(root, self.size)?;
        let started = Instant::now();
        let key = ObjectKey::bcast(&self.space, root, tag);
        if self.rank == root {
            let data = data.ok_or(Error::InvalidArgument {
                what: "bcast: the root must pass the data to broadcast",
            })?;
            if self.size > 1 {
                self.put_object(&key, data, None, tag, started, deadline)
                    .await?;
            }
            return Ok(data.to_vec());
        }
        let (msg, chunks) = self.peek_object(&key, root, tag, started, deadline).await?;
        // The last of the size-1 readers removes the object and the counter.
        let n = self
            .incr(&key.counter(), false, Some(root), tag, started, deadline)
            .await?;
        if n >= i64::from(self.size - 1) {
            let mut keys: Vec<String> = (0..chunks).map(|i| key.chunk(i)).collect();
            keys.push(key.counter());
            self.tidy(keys, tag, started, deadline).await;
        }
        Ok(msg)
    }

    /// Every rank but the root stores its block, then increments the gather's counter; the rank
    /// whose increment completes the count (size - 1) writes the flag the root waits for. The
    /// root then takes each block (all stored, so no polls), and deletes counter and flag: no
    /// listing, and one round of latency instead of the tree's ⌈lg p⌉.
    async fn gather_impl(
        &self,
        root: Rank,
        tag: Tag,
        data: &[u8],
        deadline: Instant,
    ) -> Result<Option<Vec<Vec<u8>>>> {
        check_rank(root, self.size)?;
        if self.size == 1 {
            return Ok(Some(vec![data.to_vec()]));
        }
        let started = Instant::now();
        let (count, go) = keys::gather_keys(&self.space, root, tag);
        let mb = &self.mailbox;
        if self.rank != root {
            let key = ObjectKey::gather(&self.space, root, tag, self.rank);
            self.put_object(&key, data, Some(root), tag, started, deadline)
                .await?;
            let n = self
                .incr(&count, true, Some(root), tag, started, deadline)
                .await?;
            if n >= i64::from(self.size - 1) {
                self.call(Some(root), tag, started, deadline, || mb.put(&go, b""))
                    .await?;
            }
            return Ok(None);
        }
        if let Err(e) = self
            .wait_for(&go, Read::Peek, None, tag, started, deadline, None)
            .await
        {
            return Err(self.blame(e, &count, i64::from(self.size - 1)).await);
        }
        let mut out = Vec::with_capacity(self.size as usize);
        for r in 0..self.size {
            if Rank(r) == root {
                out.push(data.to_vec());
                continue;
            }
            let key = ObjectKey::gather(&self.space, root, tag, Rank(r));
            let (block, _) = self
                .read_object(&key, Read::Take, Rank(r), tag, started, deadline)
                .await?;
            out.push(block);
        }
        self.tidy(vec![count, go], tag, started, deadline).await;
        Ok(Some(out))
    }

    /// Whether this channel gathers natively (configuration only, the same on every rank).
    fn native_gather(&self) -> bool {
        self.counters && self.config.native_gather
    }

    async fn barrier_impl(&self, tag: Tag, deadline: Instant) -> Result<()> {
        if self.size == 1 {
            return Ok(());
        }
        let started = Instant::now();
        let size = i64::from(self.size);
        let (count, go) = keys::barrier_keys(&self.space, tag);
        let arrived = self
            .incr(&count, true, None, tag, started, deadline)
            .await?;
        if arrived >= size {
            // Last to arrive: release the others. They remove the flag and counter.
            let mb = &self.mailbox;
            return self
                .call(None, tag, started, deadline, || mb.put(&go, b""))
                .await;
        }
        if let Err(e) = self
            .wait_for(&go, Read::Peek, None, tag, started, deadline, None)
            .await
        {
            return Err(self.blame(e, &count, size).await);
        }
        // Second round on the same counter: the last of the size-1 waiters to see the flag
        // (count = size + size-1) removes both keys, so nothing is left behind.
        let left = self
            .incr(&count, true, None, tag, started, deadline)
            .await?;
        if left >= 2 * size - 1 {
            self.tidy(vec![go, count], tag, started, deadline).await;
        }
        Ok(())
    }
}

/// Follows a failure record (`(reporter, blamed)` pairs) from `from`: while the rank reached
/// has reported, go on to the rank it blamed. The rank reached last and the one that blamed it,
/// or `None` if `from` reported nothing. Never goes to `me` (this rank is alive and waiting)
/// and stops after as many steps as there are records, so a cycle ends.
fn follow_blame(records: &[(u32, u32)], from: Rank, me: Rank) -> Option<(Rank, Rank)> {
    let mut at = from;
    let mut via = None;
    for _ in 0..records.len() {
        match records.iter().find(|(reporter, _)| *reporter == at.0) {
            Some(&(reporter, blamed)) if blamed != at.0 && blamed != me.0 => {
                via = Some(Rank(reporter));
                at = Rank(blamed);
            }
            _ => break,
        }
    }
    via.map(|via| (at, via))
}

impl Channel for StorageChannel {
    fn name(&self) -> &'static str {
        self.mailbox.name()
    }

    /// Finishes the mailbox's deferred work ([`StorageChannel::flush`]; Redis deletes the
    /// keys it has read), so that a job that closes its channels leaves nothing behind even
    /// while the channel is still shared. A failure is logged: the keys expire with their TTL.
    fn close(&self) -> BoxFuture<'_, ()> {
        async move {
            if let Err(e) = self.flush().await {
                tracing::debug!(rank = %self.rank, error = %e, "storage: flush on close failed");
            }
        }
        .boxed()
    }

    /// Revokes this endpoint (its later operations fail with [`Error::PeerLost`] naming
    /// `victim`) and records in the job's failure record that this rank failed because of
    /// `victim` (one request, bounded by a second), where the backend keeps one (Redis). A
    /// storage channel cannot interrupt the other ranks' waits: they read the record when their
    /// own wait times out, and name the rank at the end of the chain of blame.
    fn abort(&self, victim: Rank) -> BoxFuture<'_, ()> {
        async move {
            if self.aborted.set(victim).is_err() || victim == self.rank {
                return;
            }
            let key = keys::failure_key(&self.space);
            let Some(report) = self.mailbox.report_failure(&key, self.rank.0, victim.0) else {
                return;
            };
            match tokio::time::timeout(FAILURE_RECORD_WAIT, report).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::debug!(rank = %self.rank, error = %e, "could not record the failure")
                }
                Err(_) => tracing::debug!(rank = %self.rank, "recording the failure timed out"),
            }
        }
        .boxed()
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        let s = self.stats();
        vec![
            ("puts", s.puts),
            ("gets", s.gets),
            ("empty_gets", s.empty_gets),
            ("deletes", s.deletes),
            ("lists", s.lists),
            ("counters", s.counters),
            ("write_units", s.write_units),
            ("read_units", s.read_units),
            ("bytes_put", s.bytes_put),
            ("bytes_got", s.bytes_got),
            ("retries", s.retries),
        ]
    }

    fn job(&self) -> &JobId {
        &self.job
    }

    fn rank(&self) -> Rank {
        self.rank
    }

    fn size(&self) -> u32 {
        self.size
    }

    fn capabilities(&self) -> Capabilities {
        let mut c = Capabilities::push_unlimited();
        c.push = self.limits.push;
        c.native_bcast = self.counters && self.config.native_bcast;
        c.native_barrier = self.counters && self.config.native_barrier;
        c
    }

    fn send<'a>(
        &'a self,
        dst: Rank,
        tag: Tag,
        data: &'a [u8],
        deadline: Instant,
    ) -> BoxFuture<'a, Result<()>> {
        if let Err(e) = check_rank(dst, self.size) {
            return futures::future::ready(Err(e)).boxed();
        }
        if let Some(e) = self.aborted_error() {
            return futures::future::ready(Err(e)).boxed();
        }
        // The sequence number is taken here, synchronously: this fixes the message's place in
        // the (self, dst, tag) order when `send` is called, whatever order futures are polled in.
        let seq = {
            let mut seqs = lock(&self.send_seq);
            let next = seqs.entry((dst, tag)).or_insert(0);
            let seq = *next;
            *next += 1;
            seq
        };
        let key = ObjectKey::message(&self.space, self.rank, dst, tag, seq);
        async move {
            let started = Instant::now();
            self.put_object(&key, data, Some(dst), tag, started, deadline)
                .await
                .map(|_| ())
        }
        .boxed()
    }

    fn recv(&self, src: Rank, tag: Tag, deadline: Instant) -> BoxFuture<'_, Result<Vec<u8>>> {
        if let Err(e) = check_rank(src, self.size) {
            return futures::future::ready(Err(e)).boxed();
        }
        if let Some(e) = self.aborted_error() {
            return futures::future::ready(Err(e)).boxed();
        }
        // Joining the turnstile here, synchronously, registers this receiver in call order.
        let queue = self.queue(src, tag);
        let mut turn = queue.turnstile.join();
        async move {
            let started = Instant::now();
            if tokio::time::timeout_at(deadline, turn.ready())
                .await
                .is_err()
            {
                return Err(self.timeout(Some(src), tag, started));
            }
            let r = self.receive(src, tag, &queue, started, deadline).await;
            drop(turn);
            match r {
                Err(e @ Error::Timeout { .. }) => Err(self.name_failed(e).await),
                r => r,
            }
        }
        .boxed()
    }

    fn native_collectives(&self) -> Option<&dyn NativeCollectives> {
        let c = self.capabilities();
        (c.native_bcast || c.native_barrier || self.native_gather())
            .then_some(self as &dyn NativeCollectives)
    }
}

impl NativeCollectives for StorageChannel {
    /// One write by the root, one read per other rank, then the last reader (counted with an
    /// atomic increment) deletes the object. Offered for every call when the backend has
    /// counters and `native_bcast` is set: the decision depends on configuration only, never on
    /// the data (which only the root has), so every rank takes the same one.
    fn bcast<'a>(
        &'a self,
        root: Rank,
        tag: Tag,
        data: Option<&'a [u8]>,
        deadline: Instant,
    ) -> Option<BoxFuture<'a, Result<Vec<u8>>>> {
        if !self.capabilities().native_bcast {
            return None;
        }
        Some(
            async move {
                if let Some(e) = self.aborted_error() {
                    return Err(e);
                }
                match self.bcast_impl(root, tag, data, deadline).await {
                    Err(e @ Error::Timeout { .. }) => Err(self.name_failed(e).await),
                    r => r,
                }
            }
            .boxed(),
        )
    }

    /// Every rank increments one counter; the last to arrive writes a release flag the others
    /// wait for (server-side on push backends), and a second round on the counter elects the
    /// rank that removes both keys.
    fn barrier(&self, tag: Tag, deadline: Instant) -> Option<BoxFuture<'_, Result<()>>> {
        if !self.capabilities().native_barrier {
            return None;
        }
        Some(
            async move {
                if let Some(e) = self.aborted_error() {
                    return Err(e);
                }
                match self.barrier_impl(tag, deadline).await {
                    Err(e @ Error::Timeout { .. }) => Err(self.name_failed(e).await),
                    r => r,
                }
            }
            .boxed(),
        )
    }

    /// Every other rank writes its block once and counts itself on an atomic counter; the root
    /// waits for the "all stored" flag and takes the blocks (see `gather_impl`). Offered when
    /// the backend has counters and `native_gather` is set.
    fn gather<'a>(
        &'a self,
        root: Rank,
        tag: Tag,
        data: &'a [u8],
        deadline: Instant,
    ) -> Option<BoxFuture<'a, Result<Option<Vec<Vec<u8>>>>>> {
        if !self.native_gather() {
            return None;
        }
        Some(
            async move {
                if let Some(e) = self.aborted_error() {
                    return Err(e);
                }
                match self.gather_impl(root, tag, data, deadline).await {
                    Err(e @ Error::Timeout { .. }) => Err(self.name_failed(e).await),
                    r => r,
                }
            }
            .boxed(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::InMemoryMailbox;

    /// One late message at most doubles a learned estimate (or sets a first one to twice
    /// `poll_initial`); messages that keep coming late still raise it, doubling each time, to
    /// where they arrive.
    #[test]
    fn one_late_message_at_most_doubles_the_learned_first_poll() {
        let mb = InMemoryMailbox::new(MailboxLimits::new(1 << 20, false), false);
        let job = JobId::new("learn-late").expect("job id");
        let ch = StorageChannel::new(mb, job, Rank(0), 2, StorageConfig::fast()).expect("ch");
        let src = Rank(1);
        let small = Duration::from_millis(6);
        lock(&ch.arrival).insert(src, small);
        // Missed at the first poll (6 ms), found at the second, 60 ms in.
        ch.learn_arrival(src, Some(small), 2, small, Duration::from_millis(60));
        assert_eq!(lock(&ch.arrival)[&src], small * 2);
        for _ in 0..4 {
            let e = lock(&ch.arrival)[&src];
            ch.learn_arrival(src, Some(e), 2, e, Duration::from_millis(60));
        }
        // 24, 42, 51, 59.7 ms: close to where these messages arrive.
        let learned = lock(&ch.arrival)[&src];
        assert!(
            (Duration::from_millis(50)..=Duration::from_millis(60)).contains(&learned),
            "{learned:?}"
        );
        // Without an estimate a first late message sets it to twice poll_initial (5 ms).
        let other = Rank(0);
        ch.learn_arrival(other, None, 2, Duration::ZERO, Duration::from_millis(60));
        assert_eq!(lock(&ch.arrival)[&other], Duration::from_millis(10));
    }

    /// However late a rank's messages have been, the learned first poll of the next receive
    /// from it stays within twice `poll_max` (it once doubled per late message without bound).
    #[test]
    fn blame_is_followed_to_the_rank_that_reported_nothing() {
        // 3 blamed 2, 2 blamed 0: whoever waited for 3 or 2 names 0, reported by 2.
        let records = [(3, 2), (2, 0)];
        assert_eq!(
            follow_blame(&records, Rank(3), Rank(1)),
            Some((Rank(0), Rank(2)))
        );
        assert_eq!(
            follow_blame(&records, Rank(2), Rank(1)),
            Some((Rank(0), Rank(2)))
        );
        // A rank that reported nothing is the end: no better name than the one waited for.
        assert_eq!(follow_blame(&records, Rank(0), Rank(1)), None);
        // Never to this (living) rank, and cycles end.
        assert_eq!(follow_blame(&[(2, 1)], Rank(2), Rank(1)), None);
        assert!(follow_blame(&[(2, 3), (3, 2)], Rank(2), Rank(1)).is_some());
        assert_eq!(follow_blame(&[(2, 2)], Rank(2), Rank(1)), None);
    }

    #[test]
    fn the_learned_first_poll_is_capped_at_twice_poll_max() {
        let mb = InMemoryMailbox::new(MailboxLimits::new(1 << 20, false), false);
        let job = JobId::new("learn").expect("job id");
        let config = StorageConfig::fast();
        let poll_max = config.poll_max;
        let ch = StorageChannel::new(mb, job, Rank(0), 2, config).expect("channel");
        let src = Rank(1);
        // Twenty receives in a row whose message came a minute after the first empty poll.
        for _ in 0..20 {
            let expected = lock(&ch.arrival).get(&src).copied();
            let empty = expected.unwrap_or(Duration::ZERO);
            ch.learn_arrival(src, expected, 3, empty, empty + Duration::from_secs(60));
        }
        let learned = lock(&ch.arrival).get(&src).copied().expect("an estimate");
        assert_eq!(learned, poll_max * 2);
        // Found at the first poll: the estimate comes down again.
        ch.learn_arrival(src, Some(learned), 1, Duration::ZERO, learned);
        assert!(lock(&ch.arrival)[&src] < learned);
    }
}
