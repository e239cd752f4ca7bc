//! Storage channels: one-way message latency and requests per message, per backend and size,
//! against the local test servers (`scripts/services.sh`), in one run.
//!
//! ```sh
//! eval "$(scripts/services.sh env)"          # or: eval "$(scripts/services.sh start)"
//! cargo bench --bench storage_latency                    # Redis
//! cargo bench --bench storage_latency --features aws     # Redis, S3 and DynamoDB
//! cargo bench --bench storage_latency --features aws -- s3 dynamodb   # only these backends
//! ```
//!
//! A plain `harness = false` binary that prints Markdown tables (the ones in
//! docs/benchmarks.md). For every backend:
//!
//! * Two ranks of a fresh job, each a [`StorageChannel`] over its **own** mailbox (own
//!   connections or SDK client, as two functions would have) driven by its own tokio runtime
//!   with one worker thread, with [`StorageConfig::fast`] (polls from 5 ms doubling to 200 ms)
//!   and every backend setting at its default.
//! * Ping-pong: rank 0 sends, rank 1 receives and sends the message back, rank 0 receives it.
//!   The one-way latency is half the round trip; the receiver is always already waiting, as in
//!   a real exchange, so poll backends pay their polls.
//! * Requests per message: the difference of both mailboxes' [`StatsSnapshot`]s over the timed
//!   ping-pongs, divided by the number of messages (2 per round trip). `gets` include the
//!   polls that found nothing (`empty`). The minimum is one PUT, one GET and one DELETE per
//!   chunk (3 × chunks), the target is ≤ 1.2 × that.
//! * Redis only, two baselines for the same payload, measured in the same run with the same
//!   client crate, in blocks alternating with the fmi blocks so that load from other processes
//!   hits all alike:
//!   - **two round trips**: `RPUSH k v` followed by `BLPOP k` (the value is there, so it
//!     answers at once) on one plain connection on rank 0's runtime. Target: fmi one-way
//!     ≤ 1.3 × this.
//!   - **raw message**: a raw ping-pong between the two rank runtimes (`RPUSH` to the peer's
//!     list, `BLPOP` on one's own, already waiting): a message to a waiting receiver without
//!     fmi, the floor for any Redis mailbox that blocks server-side.
//!
//! At the end the job's keys are removed with [`cleanup_job`] and the bench fails if anything
//! is left under the job's prefix.
//!
//! Without `--bench` (as `cargo test --benches` runs it) every size runs once, as a smoke test.
//! `STORAGE_LATENCY_SIZES=1048576` (bytes, comma-separated) measures other sizes, for profiling.
//! Every loop is bounded by its iteration count and every call has a 60 s deadline.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use fmi_channels::{Channel, Instant, JobId, Rank, Tag};
use futures::future::{BoxFuture, FutureExt};
use tokio::runtime::Handle;

use fmi_storage::{
    cleanup_job, job_prefix, Mailbox, RedisConfig, RedisMailbox, StatsSnapshot, StorageChannel,
    StorageConfig,
};

const KIB: usize = 1024;
const MIB: usize = 1024 * KIB;
const SIZES: [usize; 4] = [8, 64 * KIB, MIB, 16 * MIB];
/// Bytes of the chunk header (see the fmi-storage crate docs).
const HEADER: usize = 13;
const DEADLINE: Duration = Duration::from_secs(60);
const TAG: u32 = 3;

/// [`SIZES`], or the sizes (in bytes, comma-separated) in `STORAGE_LATENCY_SIZES`, for profiling
/// one size.
fn sizes() -> Vec<usize> {
    match std::env::var("STORAGE_LATENCY_SIZES") {
        Ok(v) if !v.is_empty() => v
            .split(',')
            .map(|s| {
                s.trim()
                    .parse()
                    .expect("STORAGE_LATENCY_SIZES: sizes in bytes")
            })
            .collect(),
        _ => SIZES.to_vec(),
    }
}

/// Round trips per size and backend (in `--bench` mode). Chosen so that the whole run stays
/// well under two minutes on two shared cores.
fn iterations(backend: &str, size: usize) -> usize {
    match (backend, size) {
        ("redis", s) if s <= 64 * KIB => 300,
        ("redis", s) if s <= MIB => 60,
        ("redis", _) => 12,
        (_, s) if s <= 64 * KIB => 40,
        (_, s) if s <= MIB => 12,
        ("s3", _) => 6,
        _ => 2,
    }
}

/// Baseline and fmi blocks alternate this many times per size (Redis).
const ROUNDS: usize = 4;

fn required(name: &str) -> String {
    match std::env::var(name) {
        Ok(v) if !v.is_empty() => v,
        _ => {
            eprintln!(
                "storage_latency: {name} is not set. This benchmark needs the local test servers: \
                 run `eval \"$(scripts/services.sh start)\"` (or `scripts/services.sh env` if they \
                 already run) in this shell, then cargo bench again."
            );
            std::process::exit(2);
        }
    }
}

fn deadline() -> Instant {
    Instant::now() + DEADLINE
}

fn payload(len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761) as u8)
        .collect()
}

fn fresh_job(backend: &str) -> JobId {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    JobId::new(format!("bench-{backend}-{}-{nanos:x}", std::process::id())).expect("job id")
}

/// Chunks of a `len`-byte message at `chunk` bytes per value (header in chunk 0), as the
/// adapter cuts it.
fn chunks(len: usize, chunk: usize) -> usize {
    let first = chunk - HEADER;
    if len <= first {
        1
    } else {
        1 + (len - first).div_ceil(chunk)
    }
}

fn fmt_dur(d: Duration) -> String {
    let us = d.as_secs_f64() * 1e6;
    if us < 1000.0 {
        format!("{us:.0} µs")
    } else if us < 1e6 {
        format!("{:.2} ms", us / 1e3)
    } else {
        format!("{:.2} s", us / 1e6)
    }
}

fn fmt_size(s: usize) -> String {
    if s >= MIB {
        format!("{} MiB", s / MIB)
    } else if s >= KIB {
        format!("{} KiB", s / KIB)
    } else {
        format!("{s} B")
    }
}

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    let n = v.len();
    if n == 0 {
        Duration::ZERO
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2
    }
}

fn mean(v: &[Duration]) -> Duration {
    if v.is_empty() {
        return Duration::ZERO;
    }
    v.iter().sum::<Duration>() / v.len() as u32
}

fn add(a: StatsSnapshot, b: StatsSnapshot) -> StatsSnapshot {
    StatsSnapshot {
        puts: a.puts + b.puts,
        gets: a.gets + b.gets,
        empty_gets: a.empty_gets + b.empty_gets,
        deletes: a.deletes + b.deletes,
        lists: a.lists + b.lists,
        counters: a.counters + b.counters,
        write_units: a.write_units + b.write_units,
        read_units: a.read_units + b.read_units,
        bytes_put: a.bytes_put + b.bytes_put,
        bytes_got: a.bytes_got + b.bytes_got,
        retries: a.retries + b.retries,
    }
}

fn sub(a: StatsSnapshot, b: StatsSnapshot) -> StatsSnapshot {
    StatsSnapshot {
        puts: a.puts - b.puts,
        gets: a.gets - b.gets,
        empty_gets: a.empty_gets - b.empty_gets,
        deletes: a.deletes - b.deletes,
        lists: a.lists - b.lists,
        counters: a.counters - b.counters,
        write_units: a.write_units - b.write_units,
        read_units: a.read_units - b.read_units,
        bytes_put: a.bytes_put - b.bytes_put,
        bytes_got: a.bytes_got - b.bytes_got,
        retries: a.retries - b.retries,
    }
}

/// Both ranks of one job, each driven by its own runtime (one worker thread each, like two
/// functions or two `fmi::blocking::Communicator`s): their connections' I/O tasks run there.
struct Pair {
    job: JobId,
    ranks: [Arc<StorageChannel>; 2],
    rt: [Handle; 2],
}

impl Pair {
    fn new(backend: &str, mailboxes: [Arc<dyn Mailbox>; 2], rt: &[Handle; 2]) -> Pair {
        let job = fresh_job(backend);
        let [m0, m1] = mailboxes;
        let ch = |mb, r| {
            Arc::new(
                StorageChannel::new(mb, job.clone(), Rank(r), 2, StorageConfig::fast())
                    .expect("storage channel"),
            )
        };
        let ranks = [ch(m0, 0), ch(m1, 1)];
        Pair {
            job,
            ranks,
            rt: rt.clone(),
        }
    }

    fn stats(&self) -> StatsSnapshot {
        add(self.ranks[0].stats(), self.ranks[1].stats())
    }

    /// `iters` ping-pongs of `data`; returns the one-way latency (half round trip) of each.
    async fn pingpong(&self, data: &Arc<Vec<u8>>, iters: usize) -> Vec<Duration> {
        let tag = Tag::user(TAG);
        let echo = {
            let b = Arc::clone(&self.ranks[1]);
            self.rt[1].spawn(async move {
                for _ in 0..iters {
                    let m = b.recv(Rank(0), tag, deadline()).await.expect("rank 1 recv");
                    b.send(Rank(0), tag, &m, deadline())
                        .await
                        .expect("rank 1 send");
                }
            })
        };
        let a = Arc::clone(&self.ranks[0]);
        let data = Arc::clone(data);
        let times = self.rt[0].spawn(async move {
            let mut times = Vec::with_capacity(iters);
            for _ in 0..iters {
                let t = Instant::now();
                a.send(Rank(1), tag, &data, deadline())
                    .await
                    .expect("rank 0 send");
                let back = a.recv(Rank(1), tag, deadline()).await.expect("rank 0 recv");
                times.push(t.elapsed() / 2);
                assert!(back == *data, "the echo differs from what was sent");
            }
            times
        });
        let times = times.await.expect("rank 0 task");
        echo.await.expect("rank 1 task");
        times
    }

    /// Streaming: rank 0 sends `iters` messages back to back (each `send` awaited), rank 1
    /// receives them; returns the time per message (first send to last receive, divided by
    /// `iters`).
    async fn stream(&self, data: &Arc<Vec<u8>>, iters: usize) -> Duration {
        let tag = Tag::user(TAG + 1);
        let started = Instant::now();
        let sink = {
            let b = Arc::clone(&self.ranks[1]);
            let len = data.len();
            self.rt[1].spawn(async move {
                for _ in 0..iters {
                    let m = b.recv(Rank(0), tag, deadline()).await.expect("rank 1 recv");
                    assert_eq!(m.len(), len, "a streamed message differs");
                }
            })
        };
        let a = Arc::clone(&self.ranks[0]);
        let data = Arc::clone(data);
        self.rt[0]
            .spawn(async move {
                for _ in 0..iters {
                    a.send(Rank(1), tag, &data, deadline())
                        .await
                        .expect("rank 0 send");
                }
            })
            .await
            .expect("rank 0 task");
        sink.await.expect("rank 1 task");
        started.elapsed() / iters.max(1) as u32
    }

    /// Removes the job's keys and checks that nothing is left; returns how many there were.
    async fn cleanup(&self) -> usize {
        let mb = self.ranks[0].mailbox();
        let removed = cleanup_job(mb.as_ref(), &self.job)
            .await
            .expect("cleanup_job");
        let left = mb.list(&job_prefix(&self.job)).await.expect("list");
        assert!(
            left.is_empty(),
            "{} keys of job {} left after cleanup_job: {:?}",
            left.len(),
            self.job,
            &left[..left.len().min(10)]
        );
        removed
    }
}

/// A reference measurement run alternately with the ping-pong blocks: `(data, n)` → the
/// duration of each of `n` iterations.
type Baseline = Box<dyn FnMut(Arc<Vec<u8>>, usize) -> BoxFuture<'static, Vec<Duration>>>;

/// One line of a backend's table.
struct Row {
    size: usize,
    iters: usize,
    p50: Duration,
    mean: Duration,
    chunks: usize,
    /// Requests of every message of the timed ping-pongs.
    stats: StatsSnapshot,
    messages: u64,
    /// Median of each baseline (Redis).
    baselines: Vec<Duration>,
    /// Poll backends: streaming (sender never waits for the receiver): time per message, the
    /// requests of the streamed messages, and how many there were.
    stream: Option<(Duration, StatsSnapshot, u64)>,
}

impl Row {
    fn per_msg(&self, n: u64) -> f64 {
        n as f64 / self.messages as f64
    }

    fn requests(&self) -> f64 {
        self.per_msg(self.stats.puts + self.stats.gets + self.stats.deletes)
    }

    fn minimum(&self) -> usize {
        3 * self.chunks
    }
}

fn print_table(backend: &str, rows: &[Row], baselines: &[&str], note: &str) {
    println!("\n### {backend}\n");
    if !note.is_empty() {
        println!("{note}\n");
    }
    print!(
        "| size | round trips | one-way p50 | one-way mean | chunks | puts | gets (empty) | deletes \
         | requests/msg | minimum | ratio | ratio w/o empty polls |"
    );
    for b in baselines {
        print!(" {b} p50 | fmi / {b} |");
    }
    println!();
    let streaming = rows.iter().any(|r| r.stream.is_some());
    if streaming {
        print!(" streaming: time/msg | requests/msg (empty) | ratio |");
    }
    println!();
    print!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for _ in baselines {
        print!("---:|---:|");
    }
    if streaming {
        print!("---:|---:|---:|");
    }
    println!();
    for r in rows {
        let s = &r.stats;
        let req = r.requests();
        let without = req - r.per_msg(s.empty_gets);
        let min = r.minimum() as f64;
        print!(
            "| {} | {} | {} | {} | {} | {:.2} | {:.2} ({:.2}) | {:.2} | {:.2} | {} | {:.2} | {:.2} |",
            fmt_size(r.size),
            r.iters,
            fmt_dur(r.p50),
            fmt_dur(r.mean),
            r.chunks,
            r.per_msg(s.puts),
            r.per_msg(s.gets),
            r.per_msg(s.empty_gets),
            r.per_msg(s.deletes),
            req,
            r.minimum(),
            req / min,
            without / min,
        );
        for b in &r.baselines {
            print!(
                " {} | {:.2} |",
                fmt_dur(*b),
                r.p50.as_secs_f64() / b.as_secs_f64()
            );
        }
        if let Some((t, st, n)) = &r.stream {
            let per = |x: u64| x as f64 / *n as f64;
            let req = per(st.puts + st.gets + st.deletes);
            print!(
                " {} | {:.2} ({:.2}) | {:.2} |",
                fmt_dur(*t),
                req,
                per(st.empty_gets),
                req / min
            );
        }
        println!();
        if s.retries > 0 {
            println!("<!-- {} retried requests in this row -->", s.retries);
        }
    }
}

/// Measures one backend over every size; the `baselines` run alternately with the ping-pong
/// blocks, so that load from other processes hits all alike.
async fn measure(
    backend: &str,
    pair: &Pair,
    quick: bool,
    mut baselines: Vec<Baseline>,
) -> Vec<Row> {
    let chunk = pair.ranks[0].chunk_size();
    let mut rows = Vec::new();
    for size in sizes() {
        let data = Arc::new(payload(size));
        let iters = if quick { 1 } else { iterations(backend, size) };
        eprintln!(
            "storage_latency: {backend} {} × {iters} round trips",
            fmt_size(size)
        );
        // Warm-up: connections, buffers, the first polls (poll backends: a few round trips, so
        // that the receivers' learned arrival times settle for this size).
        let push = pair.ranks[0].capabilities().push;
        pair.pingpong(&data, if push || quick { 1 } else { 4 })
            .await;
        for b in baselines.iter_mut() {
            b(Arc::clone(&data), 1).await;
        }
        let rounds = if quick { 1 } else { ROUNDS.min(iters) };
        let mut times = Vec::with_capacity(iters);
        let mut base = vec![Vec::new(); baselines.len()];
        let mut stats = StatsSnapshot::default();
        for round in 0..rounds {
            let n = iters / rounds + usize::from(round < iters % rounds);
            for (b, t) in baselines.iter_mut().zip(base.iter_mut()) {
                t.extend(b(Arc::clone(&data), n).await);
            }
            let before = pair.stats();
            times.extend(pair.pingpong(&data, n).await);
            stats = add(stats, sub(pair.stats(), before));
        }
        let stream = if push {
            None
        } else {
            let before = pair.stats();
            let t = pair.stream(&data, iters).await;
            Some((t, sub(pair.stats(), before), iters as u64))
        };
        rows.push(Row {
            size,
            iters,
            mean: mean(&times),
            p50: median(&mut times),
            chunks: chunks(size, chunk),
            stats,
            messages: 2 * iters as u64,
            baselines: base.iter_mut().map(|t| median(t)).collect(),
            stream,
        });
    }
    rows
}

async fn redis_conn(url: &str) -> redis::aio::MultiplexedConnection {
    // No response timeout: the crate's default of 500 ms could cut a 16 MiB answer or a long
    // BLPOP on a busy machine.
    let cfg = redis::AsyncConnectionConfig::new().set_response_timeout(None);
    redis::Client::open(url)
        .expect("redis url")
        .get_multiplexed_async_connection_with_config(&cfg)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to Redis at {url}: {e}"))
}

async fn rpush(conn: &mut redis::aio::MultiplexedConnection, key: &str, data: &[u8]) {
    let _: i64 = redis::cmd("RPUSH")
        .arg(key)
        .arg(data)
        .query_async(conn)
        .await
        .expect("RPUSH");
}

async fn blpop(conn: &mut redis::aio::MultiplexedConnection, key: &str) -> Vec<u8> {
    let got: Option<(String, Vec<u8>)> = redis::cmd("BLPOP")
        .arg(key)
        .arg(30)
        .query_async(conn)
        .await
        .expect("BLPOP");
    got.expect("BLPOP timed out").1
}

/// Two round trips: `RPUSH k v`, then `BLPOP k` (the value is there, so it answers at once).
async fn two_round_trips(
    mut conn: redis::aio::MultiplexedConnection,
    key: String,
    data: Arc<Vec<u8>>,
    iters: usize,
) -> Vec<Duration> {
    let mut times = Vec::with_capacity(iters);
    for _ in 0..iters {
        let t = Instant::now();
        rpush(&mut conn, &key, &data).await;
        let v = blpop(&mut conn, &key).await;
        times.push(t.elapsed());
        assert_eq!(v.len(), data.len());
    }
    times
}

/// Raw Redis ping-pong between the two rank runtimes, each on its own connection: `RPUSH` to
/// the peer's list, then `BLPOP` on its own (already waiting when the peer pushes). Half a
/// round trip is a message to a waiting receiver with no fmi at all: the floor for any Redis
/// mailbox that blocks server-side.
async fn raw_pingpong(
    rt: [Handle; 2],
    conns: [redis::aio::MultiplexedConnection; 2],
    keys: [String; 2],
    data: Arc<Vec<u8>>,
    iters: usize,
) -> Vec<Duration> {
    let [mut c0, mut c1] = conns;
    let [k01, k10] = keys;
    let echo = {
        let (k01, k10) = (k01.clone(), k10.clone());
        rt[1].spawn(async move {
            for _ in 0..iters {
                let m = blpop(&mut c1, &k01).await;
                rpush(&mut c1, &k10, &m).await;
            }
        })
    };
    let times = rt[0].spawn(async move {
        let mut times = Vec::with_capacity(iters);
        for _ in 0..iters {
            let t = Instant::now();
            rpush(&mut c0, &k01, &data).await;
            let back = blpop(&mut c0, &k10).await;
            times.push(t.elapsed() / 2);
            assert_eq!(back.len(), data.len());
        }
        times
    });
    let times = times.await.expect("raw rank 0 task");
    echo.await.expect("raw rank 1 task");
    times
}

/// Median of `n` PINGs: one bare round trip, for context.
async fn redis_ping(mut conn: redis::aio::MultiplexedConnection, n: usize) -> Duration {
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let _: String = redis::cmd("PING")
            .query_async(&mut conn)
            .await
            .expect("PING");
        v.push(t.elapsed());
    }
    median(&mut v)
}

async fn bench_redis(url: String, quick: bool, rt: &[Handle; 2]) {
    let cfg = RedisConfig::new(url.clone());
    let mb = |_| -> Arc<dyn Mailbox> { Arc::new(RedisMailbox::new(cfg.clone()).expect("mailbox")) };
    let pair = Pair::new("redis", [mb(0), mb(1)], rt);
    // Each connection is opened on (so driven by) the runtime of the rank that uses it.
    let open = |i: usize| {
        let url = url.clone();
        rt[i].spawn(async move { redis_conn(&url).await })
    };
    let c0 = open(0).await.expect("connect task");
    let raw = [
        open(0).await.expect("connect task"),
        open(1).await.expect("connect task"),
    ];
    // Under the job's prefix, so the final check covers them too.
    let prefix = job_prefix(&pair.job);
    let ping = rt[0]
        .spawn(redis_ping(c0.clone(), if quick { 3 } else { 500 }))
        .await
        .expect("ping task");
    let two_rt: Baseline = {
        let (h, key) = (rt[0].clone(), format!("{prefix}baseline"));
        Box::new(move |data, n| {
            let h = h.spawn(two_round_trips(c0.clone(), key.clone(), data, n));
            async move { h.await.expect("baseline task") }.boxed()
        })
    };
    let raw_msg: Baseline = {
        let (rt, keys) = (
            rt.clone(),
            [format!("{prefix}raw01"), format!("{prefix}raw10")],
        );
        Box::new(move |data, n| {
            raw_pingpong(rt.clone(), raw.clone(), keys.clone(), data, n).boxed()
        })
    };
    let rows = measure("redis", &pair, quick, vec![two_rt, raw_msg]).await;
    let removed = pair.cleanup().await;
    print_table(
        "Redis",
        &rows,
        &["2 round trips", "raw message"],
        &format!(
            "`max_value` {} KiB per value (chunks), `StorageConfig::fast()`; one bare round trip \
             (PING) p50: {}; keys left for cleanup_job: {removed}",
            cfg.max_value >> 10,
            fmt_dur(ping)
        ),
    );
}

#[cfg(feature = "aws")]
mod aws {
    use super::*;
    use fmi_aws::{DynamoConfig, DynamoMailbox, S3Config, S3Mailbox};

    fn region() -> String {
        std::env::var("AWS_REGION").unwrap_or_else(|_| "us-east-1".to_owned())
    }

    fn credentials() {
        required("AWS_ACCESS_KEY_ID");
        required("AWS_SECRET_ACCESS_KEY");
    }

    pub(super) async fn bench_s3(quick: bool, rt: &[Handle; 2]) {
        credentials();
        let config = S3Config {
            prefix: "bench/".into(),
            region: Some(region()),
            endpoint: Some(required("FMI_TEST_S3_ENDPOINT")),
            ..S3Config::new("fmi-bench")
        };
        S3Mailbox::setup(&config)
            .await
            .expect("create the bench bucket");
        // Each client connects on the runtime of the rank that uses it.
        let connect = |i: usize| -> BoxFuture<'static, Arc<dyn Mailbox>> {
            let h = rt[i].spawn(S3Mailbox::connect(config.clone()));
            async move { Arc::new(h.await.expect("task").expect("s3")) as Arc<dyn Mailbox> }.boxed()
        };
        let pair = Pair::new("s3", [connect(0).await, connect(1).await], rt);
        let rows = measure("s3", &pair, quick, Vec::new()).await;
        let removed = pair.cleanup().await;
        print_table(
            "S3 (s3s-fs)",
            &rows,
            &[],
            &format!(
                "S3Config defaults (`max_value` 64 MiB, multipart above 16 MiB in 8 MiB parts), \
                 `StorageConfig::fast()`; keys left for cleanup_job: {removed}"
            ),
        );
    }

    pub(super) async fn bench_dynamo(quick: bool, rt: &[Handle; 2]) {
        credentials();
        let config = DynamoConfig {
            region: Some(region()),
            endpoint: Some(required("FMI_TEST_DYNAMODB_ENDPOINT")),
            ..DynamoConfig::new("fmi-bench")
        };
        DynamoMailbox::setup(&config)
            .await
            .expect("create the bench table");
        let connect = |i: usize| -> BoxFuture<'static, Arc<dyn Mailbox>> {
            let h = rt[i].spawn(DynamoMailbox::connect(config.clone()));
            async move { Arc::new(h.await.expect("task").expect("dynamodb")) as Arc<dyn Mailbox> }
                .boxed()
        };
        let pair = Pair::new("dynamodb", [connect(0).await, connect(1).await], rt);
        let rows = measure("dynamodb", &pair, quick, Vec::new()).await;
        let removed = pair.cleanup().await;
        print_table(
            "DynamoDB (dynalite)",
            &rows,
            &[],
            &format!(
                "DynamoConfig defaults (`max_value` 350,000 B per item), `StorageConfig::fast()`; \
                 a take is a strongly consistent GetItem then a DeleteItem; keys left for \
                 cleanup_job: {removed}"
            ),
        );
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let quick = !args.iter().any(|a| a == "--bench");
    let only: Vec<&str> = args
        .iter()
        .filter(|a| !a.starts_with('-'))
        .map(String::as_str)
        .collect();
    let wanted = |b: &str| only.is_empty() || only.contains(&b);
    for b in &only {
        if !["redis", "s3", "dynamodb"].contains(b) {
            eprintln!("storage_latency: unknown backend {b:?} (redis, s3, dynamodb)");
            std::process::exit(2);
        }
    }
    let redis_url = wanted("redis").then(|| required("FMI_TEST_REDIS_URL"));
    if !cfg!(feature = "aws") && (only.contains(&"s3") || only.contains(&"dynamodb")) {
        eprintln!("storage_latency: S3 and DynamoDB need `--features aws`");
        std::process::exit(2);
    }
    // One runtime per rank with one worker thread each (as two functions, or two
    // `fmi::blocking::Communicator`s, would have); this thread only coordinates.
    let rank_rt = |r: u32| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name(format!("rank-{r}"))
            .enable_all()
            .build()
            .expect("tokio runtime")
    };
    let rts = [rank_rt(0), rank_rt(1)];
    let rt = [rts[0].handle().clone(), rts[1].handle().clone()];
    let main_rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let started = Instant::now();
    main_rt.block_on(async {
        if let Some(url) = redis_url {
            bench_redis(url, quick, &rt).await;
        }
        #[cfg(feature = "aws")]
        {
            if wanted("s3") {
                aws::bench_s3(quick, &rt).await;
            }
            if wanted("dynamodb") {
                aws::bench_dynamo(quick, &rt).await;
            }
        }
    });
    eprintln!(
        "storage_latency: done in {:.1} s",
        started.elapsed().as_secs_f64()
    );
}
