//! The Redis mailbox and the storage channel against a **real** redis-server.
//!
//! The server's URL comes from `FMI_TEST_REDIS_URL` (exported by `scripts/services.sh start`);
//! without it every test fails with instructions. Two tests need more control than a shared
//! server allows: one runs its own `redis-server` (stopped and restarted mid-test), one talks to
//! the shared server through a TCP proxy in this file that cuts every connection at intervals.

// Tests: a failure must panic loudly.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fmi_channels::{conformance, Channel, Error, Instant, JobId, NativeCollectives, Rank, Tag};
use fmi_storage::testing::{Faults, FlakyMailbox};
use fmi_storage::{
    cleanup_job, job_prefix, Mailbox, RedisConfig, RedisMailbox, StorageChannel, StorageConfig,
};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

fn redis_url() -> String {
    match std::env::var("FMI_TEST_REDIS_URL") {
        Ok(url) if !url.is_empty() => url,
        _ => panic!(
            "FMI_TEST_REDIS_URL is not set: these tests need a real redis-server. Start the test \
             servers with `eval \"$(scripts/services.sh start)\"`, or run scripts/test.sh"
        ),
    }
}

fn deadline() -> Instant {
    Instant::now() + Duration::from_secs(30)
}

fn payload(seed: u32, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) as u8)
        .collect()
}

/// A job id no other test (or earlier run) uses.
fn fresh_job(name: &str) -> JobId {
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    JobId::new(format!(
        "t-{name}-{}-{nanos:x}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ))
    .expect("valid job id")
}

fn mailbox(cfg: &RedisConfig) -> Arc<RedisMailbox> {
    Arc::new(RedisMailbox::new(cfg.clone()).expect("redis mailbox"))
}

/// `n` ranks of a fresh job, each with its own mailbox (own connections), like separate
/// functions.
fn world(
    name: &str,
    n: u32,
    rcfg: &RedisConfig,
    scfg: &StorageConfig,
) -> (JobId, Vec<Arc<StorageChannel>>) {
    let job = fresh_job(name);
    let w = (0..n)
        .map(|r| {
            Arc::new(
                StorageChannel::new(mailbox(rcfg), job.clone(), Rank(r), n, scfg.clone())
                    .expect("channel"),
            )
        })
        .collect();
    (job, w)
}

/// Every key of `job` on the server (SCAN `fmi/{job}/*`).
async fn job_keys(job: &JobId) -> Vec<String> {
    mailbox(&RedisConfig::new(redis_url()))
        .list(&job_prefix(job))
        .await
        .expect("list")
}

/// Checks that nothing of `job` is left. Keys a receiver has read are deleted lazily (in front
/// of its mailbox's next request, or by the mailbox's background task 2 ms later), so this
/// gives them up to 2 s (bounded polling of the server, which has no event to wait for).
async fn assert_clean(job: &JobId) {
    let give_up = Instant::now() + Duration::from_secs(2);
    let mut left = job_keys(job).await;
    while !left.is_empty() && Instant::now() < give_up {
        tokio::time::sleep(Duration::from_millis(10)).await;
        left = job_keys(job).await;
    }
    assert!(
        left.is_empty(),
        "job {job} left {} keys: {left:?}",
        left.len()
    );
}

/// A raw connection for inspecting the server (TTL, ...).
async fn raw() -> redis::aio::MultiplexedConnection {
    redis::Client::open(redis_url())
        .expect("client")
        .get_multiplexed_async_connection()
        .await
        .expect("connect")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_over_redis() {
    let jobs = Arc::new(Mutex::new(Vec::new()));
    let rcfg = RedisConfig::new(redis_url());
    conformance::run_all(|n| {
        let (job, w) = world("conf", n, &rcfg, &StorageConfig::fast());
        jobs.lock().expect("lock").push(job);
        async move { Ok(w.into_iter().map(|c| c as Arc<dyn Channel>).collect()) }
    })
    .await;
    let jobs = jobs.lock().expect("lock").clone();
    for job in &jobs {
        assert_clean(job).await;
    }
}

/// A receive dropped while its blocking read is under way gives back the read keys whose
/// `DEL` rode on that request, so they are still deleted: before, a key read just before such
/// a receive stayed on the server until its TTL (found with the direct channel's storage
/// fallback, whose reader is dropped with its receive pending when the channel closes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receive_dropped_while_blocking_leaves_no_read_key_behind() {
    let rcfg = RedisConfig::new(redis_url());
    let (job, w) = world("dropped", 2, &rcfg, &StorageConfig::fast());
    for round in 0..20u32 {
        let sent = payload(round, 16);
        w[0].send(Rank(1), Tag::user(1), &sent, deadline())
            .await
            .expect("send");
        let got = w[1].recv(Rank(0), Tag::user(1), deadline()).await;
        assert_eq!(got.expect("recv"), sent, "round {round}");
        // The next receive carries the DEL of the key just read; it is dropped after its
        // first poll, while its request waits for an answer.
        let next = w[1].recv(Rank(0), Tag::user(1), deadline());
        assert!(futures::FutureExt::now_or_never(next).is_none());
    }
    assert_clean(&job).await;
}

#[tokio::test]
async fn messages_over_the_chunk_limit_are_chunked_and_reassembled() {
    let rcfg = RedisConfig {
        max_value: 1024,
        ..RedisConfig::new(redis_url())
    };
    let (job, w) = world("chunks", 2, &rcfg, &StorageConfig::fast());
    assert_eq!(w[0].chunk_size(), 1024);
    let sizes = [0usize, 1011, 1012, 5000, 100_000];
    for (i, &len) in sizes.iter().enumerate() {
        w[0].send(Rank(1), Tag::user(6), &payload(i as u32, len), deadline())
            .await
            .expect("send");
    }
    // Before reading: the 100 kB message is stored as 98 keys of at most 1024 bytes.
    let mut con = raw().await;
    let stored = job_keys(&job).await;
    let chunks: u64 = sizes
        .iter()
        .map(|&l| {
            if l <= 1011 {
                1
            } else {
                1 + (l as u64 - 1011).div_ceil(1024)
            }
        })
        .sum();
    assert_eq!(stored.len() as u64, chunks);
    for k in &stored {
        let v: Vec<u8> = redis::cmd("LINDEX")
            .arg(k)
            .arg(0)
            .query_async(&mut con)
            .await
            .expect("LINDEX");
        assert!(v.len() <= 1024, "{k} holds {} bytes", v.len());
    }
    for (i, &len) in sizes.iter().enumerate() {
        let m = w[1]
            .recv(Rank(0), Tag::user(6), deadline())
            .await
            .expect("recv");
        assert!(m == payload(i as u32, len), "message {i} of {len} bytes");
    }
    assert_clean(&job).await;
    let (s, r) = (w[0].stats(), w[1].stats());
    assert_eq!(s.puts, chunks, "one RPUSH transaction per chunk");
    assert_eq!((r.gets, r.empty_gets), (chunks, 0));
    // Every key is deleted (`assert_clean`), by `DEL`s that each carry the keys read since the
    // last one: the chunks a receive reads ahead are released together.
    assert!(
        (1..=chunks).contains(&r.deletes),
        "{} DELs for {chunks} chunks",
        r.deletes
    );
    assert_eq!(s.bytes_put, r.bytes_got);
    assert_eq!(s.retries + r.retries, 0);
}

/// A receive reads a message's later chunks ahead, several at once, without removing them; one
/// that times out half-way keeps what it has read and leaves the rest for the next receive.
/// Here the last chunk is hidden (renamed) while the first receive waits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receive_cut_short_while_reading_ahead_loses_no_chunk() {
    let rcfg = RedisConfig {
        max_value: 1024,
        ..RedisConfig::new(redis_url())
    };
    let (job, w) = world("readahead", 2, &rcfg, &StorageConfig::fast());
    // 1 + ceil((5000 - 1011) / 1024) = 5 chunks.
    let msg = payload(7, 5000);
    w[0].send(Rank(1), Tag::user(9), &msg, deadline())
        .await
        .expect("send");
    let keys = job_keys(&job).await;
    assert_eq!(keys.len(), 5, "{keys:?}");
    let last = keys
        .iter()
        .max_by_key(|k| {
            k.rsplit(|c: char| !c.is_ascii_digit())
                .next()
                .and_then(|d| d.parse::<u32>().ok())
        })
        .expect("a chunk key")
        .clone();
    let hidden = format!("hidden-{job}");
    let mut con = raw().await;
    let rename = |from: String, to: String| {
        let mut con = con.clone();
        async move {
            redis::cmd("RENAME")
                .arg(&from)
                .arg(&to)
                .query_async::<()>(&mut con)
                .await
                .expect("RENAME");
        }
    };
    rename(last.clone(), hidden.clone()).await;
    let early = Instant::now() + Duration::from_millis(300);
    match w[1].recv(Rank(0), Tag::user(9), early).await {
        Err(Error::Timeout { .. }) => {}
        other => panic!("expected a timeout, got {other:?}"),
    }
    rename(hidden.clone(), last).await;
    let got = w[1]
        .recv(Rank(0), Tag::user(9), deadline())
        .await
        .expect("the rest of the message");
    assert!(got == msg, "message reassembled from two receives");
    assert_clean(&job).await;
    let exists: u32 = redis::cmd("EXISTS")
        .arg(&hidden)
        .query_async(&mut con)
        .await
        .expect("EXISTS");
    assert_eq!(exists, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_chunked_sends_and_receives_keep_call_order() {
    let rcfg = RedisConfig {
        max_value: 4096,
        ..RedisConfig::new(redis_url())
    };
    let (job, w) = world("order", 2, &rcfg, &StorageConfig::fast());
    let msgs: Vec<Vec<u8>> = (0..60u32)
        .map(|i| payload(i, (i as usize * 613) % 20_000))
        .collect();
    // Sends and receives are created in order and polled all at once, in reverse.
    let mut sends: Vec<_> = msgs
        .iter()
        .map(|m| w[0].send(Rank(1), Tag::user(9), m, deadline()))
        .collect();
    let mut recvs: Vec<_> = (0..msgs.len())
        .map(|_| w[1].recv(Rank(0), Tag::user(9), deadline()))
        .collect();
    sends.reverse();
    recvs.reverse();
    let (sent, mut got) = tokio::join!(
        futures::future::join_all(sends),
        futures::future::join_all(recvs)
    );
    got.reverse();
    for s in sent {
        s.expect("send");
    }
    for (i, (g, m)) in got.into_iter().zip(&msgs).enumerate() {
        assert!(g.expect("recv") == *m, "message {i} out of order");
    }
    assert_clean(&job).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retried_requests_deliver_exactly_once() {
    // Every put is applied and then reported failed (as when the answer is lost); every take
    // and get fails once before reaching Redis. Each message still arrives exactly once.
    let rcfg = RedisConfig {
        max_value: 2048,
        ..RedisConfig::new(redis_url())
    };
    let job = fresh_job("flaky");
    let faults = Faults {
        put_after: true,
        take_before: true,
        get_before: true,
    };
    let flaky: Vec<_> = (0..2)
        .map(|_| FlakyMailbox::new(mailbox(&rcfg), faults))
        .collect();
    let w: Vec<_> = (0..2u32)
        .map(|r| {
            let mb: Arc<dyn Mailbox> = flaky[r as usize].clone();
            Arc::new(
                StorageChannel::new(mb, job.clone(), Rank(r), 2, StorageConfig::fast())
                    .expect("channel"),
            )
        })
        .collect();
    let size = |i: u32| (i as usize * 331) % 6000;

    // Sequential: all sends (and their retries) complete before the receiver reads.
    for i in 0..15u32 {
        w[0].send(Rank(1), Tag::user(2), &payload(i, size(i)), deadline())
            .await
            .expect("send");
    }
    for i in 0..15u32 {
        let m = w[1]
            .recv(Rank(0), Tag::user(2), deadline())
            .await
            .expect("recv");
        assert!(m == payload(i, size(i)), "message {i}");
    }
    assert_clean(&job).await;

    // Concurrent: the receiver waits in BLMOVE, so it usually consumes chunk 0 between the
    // applied put and its retry, which recreates the key. That key is never delivered (no
    // duplicate), holds the TTL, and cleanup_job removes it: the documented corner.
    let a = Arc::clone(&w[0]);
    let sender = tokio::spawn(async move {
        for i in 0..15u32 {
            a.send(Rank(1), Tag::user(3), &payload(i, size(i)), deadline())
                .await
                .expect("send");
        }
    });
    for i in 0..15u32 {
        let m = w[1]
            .recv(Rank(0), Tag::user(3), deadline())
            .await
            .expect("recv");
        assert!(m == payload(i, size(i)), "message {i}");
    }
    sender.await.expect("sender");
    for tag in [2, 3] {
        let extra = w[1]
            .recv(
                Rank(0),
                Tag::user(tag),
                Instant::now() + Duration::from_millis(200),
            )
            .await;
        assert!(
            matches!(extra, Err(Error::Timeout { .. })),
            "no duplicate: {extra:?}"
        );
    }
    assert!(flaky[0].injected() >= 30 && flaky[1].injected() >= 30);
    assert_eq!(w[0].stats().retries, flaky[0].injected());
    assert_eq!(w[1].stats().retries, flaky[1].injected());
    for c in &w {
        c.flush().await.expect("flush");
    }
    let left = job_keys(&job).await;
    assert!(
        left.iter()
            .all(|k| k.contains("/m/0/1/0000000000000003/") && k.ends_with("/0")),
        "only recreated chunk-0 keys of consumed messages may remain: {left:?}"
    );
    eprintln!("{} recreated keys", left.len());
    assert_eq!(
        cleanup_job(w[0].mailbox().as_ref(), &job)
            .await
            .expect("cleanup"),
        left.len()
    );
    assert_clean(&job).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_receiver_is_woken_without_polling() {
    let rcfg = RedisConfig::new(redis_url());
    let (job, w) = world("push", 2, &rcfg, &StorageConfig::fast());
    let b = Arc::clone(&w[1]);
    let started = Instant::now();
    let waiter = tokio::spawn(async move {
        let m = b.recv(Rank(0), Tag::user(1), deadline()).await;
        (m, Instant::now())
    });
    // Longer than the redis crate's default 500 ms response timeout, which must be off.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let sent_at = Instant::now();
    w[0].send(Rank(1), Tag::user(1), b"wake up", deadline())
        .await
        .expect("send");
    let (m, woke_at) = waiter.await.expect("task");
    assert_eq!(m.expect("recv"), b"wake up");
    assert!(woke_at - started >= Duration::from_millis(800));
    assert!(
        woke_at.saturating_duration_since(sent_at) < Duration::from_secs(1),
        "woken {:?} after the send",
        woke_at.saturating_duration_since(sent_at)
    );
    // The request counters add up: 1 message = 1 put + 1 blocking read + 1 delete (queued, and
    // sent by the background task since nothing follows), no polls.
    assert_clean(&job).await;
    let (s, r) = (w[0].stats(), w[1].stats());
    assert_eq!(
        (s.puts, s.gets, s.deletes, s.lists, s.counters),
        (1, 0, 0, 0, 0)
    );
    assert_eq!((r.puts, r.gets, r.empty_gets, r.deletes), (0, 1, 0, 1));
    assert_eq!(s.bytes_put, 13 + 7, "header + payload");
    assert_eq!(r.bytes_got, s.bytes_put);
    assert_clean(&job).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn native_bcast_and_barrier_with_five_ranks() {
    let rcfg = RedisConfig {
        max_value: 1024,
        ..RedisConfig::new(redis_url())
    };
    let (job, w) = world("native", 5, &rcfg, &StorageConfig::fast());
    let sizes = [0usize, 100, 3000];
    let arrivals = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for ch in w.clone() {
        let arrivals = Arc::clone(&arrivals);
        tasks.push(tokio::spawn(async move {
            let nc = ch
                .native_collectives()
                .expect("redis offers native collectives");
            for (op, &len) in sizes.iter().enumerate() {
                let root = Rank(op as u32 + 1);
                let data = payload(op as u32, len);
                let mine = (ch.rank() == root).then_some(&data[..]);
                let got = nc
                    .bcast(root, Tag::collective(op as u64), mine, deadline())
                    .expect("bcast offered")
                    .await
                    .expect("bcast");
                assert!(got == data, "rank {}: bcast {op}", ch.rank());
            }
            // Ranks reach the barrier 0, 100, ..., 400 ms apart; nobody may leave before the
            // last one arrived.
            tokio::time::sleep(Duration::from_millis(100 * u64::from(ch.rank().0))).await;
            let arrived = Instant::now();
            nc.barrier(Tag::collective(99), deadline())
                .expect("barrier offered")
                .await
                .expect("barrier");
            arrivals
                .lock()
                .expect("lock")
                .push((arrived, Instant::now()));
        }));
    }
    for t in tasks {
        t.await.expect("rank");
    }
    let arrivals = arrivals.lock().expect("lock").clone();
    let last_in = arrivals.iter().map(|a| a.0).max().expect("five ranks");
    for (_, left) in &arrivals {
        assert!(
            *left >= last_in,
            "a rank left the barrier before the last arrived"
        );
    }
    assert_clean(&job).await;
    // Broadcast 2 (3000 B at 1024 B per chunk = 3 chunks) by rank 3: 3 puts, and each of the
    // four readers 3 blocking reads + 1 increment; no polls anywhere.
    let s: Vec<_> = w.iter().map(|c| c.stats()).collect();
    assert_eq!(s[3].puts, 3, "rank 3: the 3 chunks of its broadcast");
    assert_eq!(
        s[4].puts, 1,
        "rank 4, last into the barrier: its release flag"
    );
    for (r, st) in s.iter().enumerate() {
        assert_eq!(st.empty_gets, 0, "rank {r} polled");
    }
    let reads: u64 = s.iter().map(|st| st.gets).sum();
    // Per broadcast: 4 readers × chunks (1, 1, 3) reads; barrier: 4 waiters × 1 read.
    assert_eq!(reads, 4 * (1 + 1 + 3) + 4);
    let incrs: u64 = s.iter().map(|st| st.counters).sum();
    assert_eq!(
        incrs,
        3 * 4 + 5 + 4,
        "bcast: 4 per op; barrier: 5 arrivals + 4 departures"
    );
}

/// Gather over Redis' counters: every other rank writes its block and increments a counter, the
/// root waits server-side for the "all stored" flag and takes the blocks. No listing, no polls,
/// and nothing left behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn native_gather_with_five_ranks() {
    let rcfg = RedisConfig {
        max_value: 1024,
        ..RedisConfig::new(redis_url())
    };
    let (job, w) = world("gather", 5, &rcfg, &StorageConfig::fast());
    let mut tasks = Vec::new();
    for ch in w.clone() {
        tasks.push(tokio::spawn(async move {
            let nc = ch
                .native_collectives()
                .expect("redis offers native collectives");
            // Two gathers to different roots; blocks of 0 to 3600 B (up to 4 chunks).
            for (op, root) in [(0u64, Rank(3)), (1, Rank(0))] {
                let block = payload(op as u32 * 10 + ch.rank().0, 900 * ch.rank().0 as usize);
                let got = nc
                    .gather(root, Tag::collective(op), &block, deadline())
                    .expect("gather offered")
                    .await
                    .expect("gather");
                if ch.rank() == root {
                    let got = got.expect("root gets the blocks");
                    for (r, b) in got.iter().enumerate() {
                        assert!(
                            *b == payload(op as u32 * 10 + r as u32, 900 * r),
                            "gather {op}: block of rank {r}"
                        );
                    }
                } else {
                    assert!(got.is_none());
                }
            }
        }));
    }
    for t in tasks {
        t.await.expect("rank");
    }
    // The deletes of taken blocks are queued; dropping the mailboxes sends them.
    let s: Vec<_> = w.iter().map(|c| c.stats()).collect();
    drop(w);
    assert_clean(&job).await;
    for (r, st) in s.iter().enumerate() {
        assert_eq!(st.empty_gets, 0, "rank {r} polled");
        assert_eq!(st.lists, 0, "rank {r} listed keys");
    }
    let incrs: u64 = s.iter().map(|st| st.counters).sum();
    assert_eq!(
        incrs,
        2 * 4,
        "one increment per contributing rank and gather"
    );
}

#[tokio::test]
async fn keys_carry_a_ttl_and_cleanup_removes_a_crashed_jobs_keys() {
    let rcfg = RedisConfig {
        max_value: 1024,
        ttl: Duration::from_secs(120),
        ..RedisConfig::new(redis_url())
    };
    let (job, w) = world("ttl", 3, &rcfg, &StorageConfig::fast());
    // Messages nobody receives, as when a job crashes.
    w[0].send(Rank(1), Tag::user(1), b"small", deadline())
        .await
        .expect("send");
    w[2].send(Rank(1), Tag::user(7), &payload(1, 3000), deadline())
        .await
        .expect("send");
    let nc = w[1].native_collectives().expect("native");
    let _ = tokio::time::timeout(
        Duration::from_millis(200),
        nc.barrier(Tag::collective(5), deadline()).expect("barrier"),
    )
    .await;
    let keys = job_keys(&job).await;
    assert_eq!(
        keys.len(),
        1 + 3 + 1,
        "1 + 3 message chunks and one barrier counter"
    );
    let mut con = raw().await;
    for k in &keys {
        let ttl: i64 = redis::cmd("PTTL")
            .arg(k)
            .query_async(&mut con)
            .await
            .expect("PTTL");
        assert!(ttl > 0 && ttl <= 120_000, "{k}: PTTL {ttl}");
    }
    let removed = cleanup_job(w[0].mailbox().as_ref(), &job)
        .await
        .expect("cleanup");
    assert_eq!(removed, keys.len());
    assert_clean(&job).await;
    // Cleanup of a job that left nothing is fine.
    assert_eq!(
        cleanup_job(w[0].mailbox().as_ref(), &job)
            .await
            .expect("cleanup"),
        0
    );
}

#[tokio::test]
async fn an_unreachable_server_is_a_typed_error_by_the_deadline() {
    // A port nobody listens on: connection refused, retried with backoff until the deadline.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let rcfg = RedisConfig::new(format!("redis://127.0.0.1:{port}"));
    let (_job, w) = world("down", 2, &rcfg, &StorageConfig::fast());
    let started = Instant::now();
    let r = w[1]
        .recv(Rank(0), Tag::user(1), started + Duration::from_millis(500))
        .await;
    let took = started.elapsed();
    match r {
        Err(Error::Io {
            me,
            peer,
            channel,
            source,
        }) => {
            assert_eq!((me, peer, channel), (Rank(1), Some(Rank(0)), "redis"));
            assert!(source.to_string().contains("redis take failed"), "{source}");
        }
        other => panic!("expected Io, got {other:?}"),
    }
    assert!(took < Duration::from_secs(3), "took {took:?}");
    assert!(w[1].stats().retries > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_waiting_receivers_than_blocking_connections() {
    // Two blocking connections, eight receivers waiting at once on different tags, messages
    // sent in reverse order: the extra waiters fall back to short non-blocking looks instead of
    // queueing behind the blocked ones, so everything arrives promptly.
    let rcfg = RedisConfig {
        blocking_connections: 2,
        ..RedisConfig::new(redis_url())
    };
    let (job, w) = world("overflow", 2, &rcfg, &StorageConfig::fast());
    let recvs: Vec<_> = (0..8u32)
        .map(|t| {
            let b = Arc::clone(&w[1]);
            tokio::spawn(async move { b.recv(Rank(0), Tag::user(t), deadline()).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    for t in (0..8u32).rev() {
        w[0].send(Rank(1), Tag::user(t), &t.to_le_bytes(), deadline())
            .await
            .expect("send");
    }
    for (t, r) in recvs.into_iter().enumerate() {
        assert_eq!(
            r.await.expect("task").expect("recv"),
            (t as u32).to_le_bytes()
        );
    }
    let took = started.elapsed();
    assert!(took < Duration::from_secs(2), "took {took:?}");
    assert!(
        w[1].stats().empty_gets > 0,
        "the extra waiters looked without blocking"
    );
    assert_clean(&job).await;
}

// ---- connection cuts through a proxy ------------------------------------------------------

/// A TCP proxy to the test server that can cut every open connection (as a network failure or
/// a server crash would) and refuse new ones for a while.
struct Proxy {
    addr: SocketAddr,
    down: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<JoinHandle<()>>>>,
    accept: JoinHandle<()>,
}

impl Proxy {
    async fn start(target: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("addr");
        let down = Arc::new(AtomicBool::new(false));
        let conns: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let (d, c) = (Arc::clone(&down), Arc::clone(&conns));
        // Runs until the proxy is dropped (aborted there).
        let accept = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                if d.load(Ordering::SeqCst) {
                    continue; // dropped: the client sees its connection closed
                }
                let h = tokio::spawn(async move {
                    if let Ok(mut server) = TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
                c.lock().expect("lock").push(h);
            }
        });
        Proxy {
            addr,
            down,
            conns,
            accept,
        }
    }

    /// Closes every open connection now.
    fn cut(&self) {
        for h in self.conns.lock().expect("lock").drain(..) {
            h.abort();
        }
    }

    fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
        if down {
            self.cut();
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

/// `url` with its host and port replaced by `addr` (user, password and db kept).
fn via(url: &str, addr: SocketAddr) -> String {
    let (scheme, rest) = url.split_once("://").expect("url has a scheme");
    let (auth, hostpath) = match rest.rsplit_once('@') {
        Some((a, h)) => (format!("{a}@"), h),
        None => (String::new(), rest),
    };
    let path = hostpath.find('/').map_or("", |i| &hostpath[i..]);
    format!("{scheme}://{auth}{addr}{path}")
}

/// The socket address of the test server.
fn server_addr(url: &str) -> SocketAddr {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let hostpath = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
    let hostport = hostpath.split('/').next().unwrap_or(hostpath);
    let hostport = if hostport.contains(':') {
        hostport.to_owned()
    } else {
        format!("{hostport}:6379")
    };
    let hostport = hostport.replace("localhost", "127.0.0.1");
    hostport
        .parse()
        .expect("FMI_TEST_REDIS_URL names host:port")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_cuts_lose_and_duplicate_nothing() {
    let url = redis_url();
    let proxy = Proxy::start(server_addr(&url)).await;
    let rcfg = RedisConfig {
        max_value: 4096,
        max_block: Duration::from_millis(500),
        response_timeout: Duration::from_secs(2),
        ..RedisConfig::new(via(&url, proxy.addr))
    };
    let (job, w) = world("cuts", 2, &rcfg, &StorageConfig::fast());
    let n = 300u32;
    let size = |i: u32| (i as usize * 1_237) % 12_000;
    let a = Arc::clone(&w[0]);
    let sender = tokio::spawn(async move {
        for i in 0..n {
            a.send(Rank(1), Tag::user(i % 3), &payload(i, size(i)), deadline())
                .await
                .expect("send");
            if i % 10 == 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    });
    let b = Arc::clone(&w[1]);
    let receiver = tokio::spawn(async move {
        for i in 0..n {
            let m = b
                .recv(Rank(0), Tag::user(i % 3), deadline())
                .await
                .expect("recv");
            assert!(
                m == payload(i, size(i)),
                "message {i} lost, duplicated or reordered"
            );
        }
    });
    // Chaos: cut every connection every 25 ms, with one 300 ms outage, for at most 3 s.
    let chaos_until = Instant::now() + Duration::from_secs(3);
    let mut cuts = 0;
    while Instant::now() < chaos_until && !(sender.is_finished() && receiver.is_finished()) {
        tokio::time::sleep(Duration::from_millis(25)).await;
        if cuts == 5 {
            proxy.set_down(true);
            tokio::time::sleep(Duration::from_millis(300)).await;
            proxy.set_down(false);
        } else {
            proxy.cut();
        }
        cuts += 1;
    }
    sender.await.expect("sender");
    receiver.await.expect("receiver");
    let extra = w[1]
        .recv(
            Rank(0),
            Tag::user(0),
            Instant::now() + Duration::from_millis(200),
        )
        .await;
    assert!(
        matches!(extra, Err(Error::Timeout { .. })),
        "no extra message: {extra:?}"
    );
    let retries = w[0].stats().retries + w[1].stats().retries;
    assert!(cuts > 0 && retries > 0, "cuts {cuts}, retries {retries}");
    // A put applied but unacknowledged, retried after the receiver consumed the key, recreates
    // that key (documented in fmi_storage::RedisMailbox): it is never delivered, expires with
    // the TTL and goes with cleanup_job. Anything else left would be a bug. (Read keys still
    // queued for deletion are message keys too; the proxy may cut this flush as well.)
    for c in &w {
        let _ = c.flush().await;
    }
    let left = job_keys(&job).await;
    for k in &left {
        assert!(k.contains("/m/0/1/"), "unexpected leftover {k}");
    }
    eprintln!(
        "{cuts} cuts, {retries} retries, {} recreated keys",
        left.len()
    );
    cleanup_job(w[0].mailbox().as_ref(), &job)
        .await
        .expect("cleanup");
    assert_clean(&job).await;
}

// ---- a real restart -----------------------------------------------------------------------

/// A private redis-server on `port` (killed on drop).
struct Server(Child);

impl Server {
    fn start(port: u16) -> Server {
        Server::start_with(port, &[])
    }

    /// A private server with extra arguments (password, TLS); `--port` is `port` unless the
    /// arguments move it.
    fn start_with(port: u16, extra: &[&str]) -> Server {
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
            .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run redis-server ({e}): install it (`apt-get install -y redis-server`, \
                     which scripts/services.sh does)"
                )
            });
        Server(child)
    }

    async fn ready(port: u16) {
        Server::ready_at(&RedisConfig::new(format!("redis://127.0.0.1:{port}"))).await;
    }

    /// Waits until a mailbox with `cfg` gets answers (at most 5 s).
    async fn ready_at(cfg: &RedisConfig) {
        let mb = mailbox(cfg);
        for _ in 0..100 {
            if mb.get("fmi/ready-probe").await.is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("private redis-server at {cfg:?} did not answer within 5 s");
    }

    async fn shutdown(mut self, port: u16) {
        if let Ok(mut c) = redis::Client::open(format!("redis://127.0.0.1:{port}"))
            .expect("client")
            .get_multiplexed_async_connection()
            .await
        {
            // The server closes the connection instead of answering.
            let _ = redis::cmd("SHUTDOWN")
                .arg("NOSAVE")
                .query_async::<()>(&mut c)
                .await;
        }
        for _ in 0..100 {
            if matches!(self.0.try_wait(), Ok(Some(_))) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_server_is_picked_up_within_the_deadline() {
    let _ = redis_url(); // same prerequisites as every Redis test
    let port = free_port();
    let server = Server::start(port);
    Server::ready(port).await;
    let rcfg = RedisConfig {
        max_block: Duration::from_secs(2),
        ..RedisConfig::new(format!("redis://127.0.0.1:{port}"))
    };
    let (job, w) = world("restart", 2, &rcfg, &StorageConfig::fast());
    w[0].send(Rank(1), Tag::user(1), b"before", deadline())
        .await
        .expect("send");
    assert_eq!(
        w[1].recv(Rank(0), Tag::user(1), deadline())
            .await
            .expect("recv"),
        b"before"
    );

    // The receiver waits in BLMOVE while the server stops (losing nothing: no message is
    // stored), stays down 500 ms, and comes back on the same port.
    let b = Arc::clone(&w[1]);
    let waiter = tokio::spawn(async move { b.recv(Rank(0), Tag::user(1), deadline()).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    server.shutdown(port).await;
    let sender = {
        let a = Arc::clone(&w[0]);
        tokio::spawn(async move { a.send(Rank(1), Tag::user(1), b"after", deadline()).await })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let _server = Server::start(port);
    Server::ready(port).await;
    sender
        .await
        .expect("task")
        .expect("send retried until the server was back");
    assert_eq!(waiter.await.expect("task").expect("recv"), b"after");
    let r = w[1]
        .recv(
            Rank(0),
            Tag::user(1),
            Instant::now() + Duration::from_millis(200),
        )
        .await;
    assert!(
        matches!(r, Err(Error::Timeout { .. })),
        "nothing duplicated: {r:?}"
    );
    assert!(w[0].stats().retries > 0 && w[1].stats().retries > 0);
    let left = mailbox(&rcfg).list(&job_prefix(&job)).await.expect("list");
    assert!(left.is_empty(), "{left:?}");
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_password_in_the_url_authenticates_and_a_wrong_one_fails_fast() {
    let _ = redis_url(); // same prerequisites as every Redis test
    let port = free_port();
    let _server = Server::start_with(port, &["--requirepass", "s3cret-pw"]);
    let rcfg = RedisConfig::new(format!("redis://:s3cret-pw@127.0.0.1:{port}"));
    Server::ready_at(&rcfg).await;
    let (job, w) = world("auth", 2, &rcfg, &StorageConfig::fast());
    w[0].send(Rank(1), Tag::user(1), b"authenticated", deadline())
        .await
        .expect("send");
    let m = w[1]
        .recv(Rank(0), Tag::user(1), deadline())
        .await
        .expect("recv");
    assert_eq!(m, b"authenticated");
    w[1].flush().await.expect("flush");
    assert!(mailbox(&rcfg)
        .list(&job_prefix(&job))
        .await
        .expect("list")
        .is_empty());

    // A wrong password is not retried until the deadline, and is never printed.
    let wrong = RedisConfig::new(format!("redis://:wrong-pw@127.0.0.1:{port}"));
    let (_job, w) = world("auth-bad", 2, &wrong, &StorageConfig::fast());
    let started = Instant::now();
    let r = w[0].send(Rank(1), Tag::user(1), b"x", deadline()).await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    match r {
        Err(e @ Error::Io { .. }) => {
            let text = format!("{e} {e:?} {:?}", w[0]);
            assert!(!text.contains("wrong-pw"), "password printed: {text}");
        }
        other => panic!("expected Io, got {other:?}"),
    }
}

/// `rediss://` to a private redis-server with TLS and a CA made by openssl for this test.
/// Runs with `cargo test -p fmi-storage --features tls`.
#[cfg(feature = "tls")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_a_private_ca_and_a_password() {
    let _ = redis_url(); // same prerequisites as every Redis test
    let dir = std::env::temp_dir().join(format!("fmi-redis-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let d = |f: &str| dir.join(f).to_string_lossy().into_owned();
    std::fs::write(d("ext.cnf"), "subjectAltName=IP:127.0.0.1\n").expect("ext");
    let steps: [&[&str]; 3] = [
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=fmi-test-ca",
            "-keyout",
            &d("ca.key"),
            "-out",
            &d("ca.pem"),
        ],
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=127.0.0.1",
            "-keyout",
            &d("server.key"),
            "-out",
            &d("server.csr"),
        ],
        &[
            "x509",
            "-req",
            "-in",
            &d("server.csr"),
            "-CA",
            &d("ca.pem"),
            "-CAkey",
            &d("ca.key"),
            "-CAcreateserial",
            "-days",
            "1",
            "-extfile",
            &d("ext.cnf"),
            "-out",
            &d("server.pem"),
        ],
    ];
    for args in steps {
        let ok = Command::new("openssl")
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("openssl runs")
            .success();
        assert!(ok, "openssl {args:?} failed");
    }
    let port = free_port();
    let (cert, key, ca) = (d("server.pem"), d("server.key"), d("ca.pem"));
    let _server = Server::start_with(
        0,
        &[
            "--tls-port",
            &port.to_string(),
            "--tls-cert-file",
            &cert,
            "--tls-key-file",
            &key,
            "--tls-ca-cert-file",
            &ca,
            "--tls-auth-clients",
            "no",
            "--requirepass",
            "tls-pw",
        ],
    );
    let rcfg = RedisConfig {
        tls_ca_file: Some(ca.clone()),
        ..RedisConfig::new(format!("rediss://:tls-pw@127.0.0.1:{port}"))
    };
    Server::ready_at(&rcfg).await;
    let (job, w) = world("tls", 3, &rcfg, &StorageConfig::fast());
    let b = Arc::clone(&w[1]);
    let waiter = tokio::spawn(async move { b.recv(Rank(0), Tag::user(1), deadline()).await });
    tokio::time::sleep(Duration::from_millis(700)).await;
    w[0].send(Rank(1), Tag::user(1), &payload(1, 100_000), deadline())
        .await
        .expect("send");
    assert!(waiter.await.expect("task").expect("recv") == payload(1, 100_000));
    let mut tasks = Vec::new();
    for ch in w.clone() {
        tasks.push(tokio::spawn(async move {
            let nc = ch.native_collectives().expect("native");
            nc.barrier(Tag::collective(1), deadline())
                .expect("barrier")
                .await
                .expect("barrier");
        }));
    }
    for t in tasks {
        t.await.expect("rank");
    }
    assert!(mailbox(&rcfg)
        .list(&job_prefix(&job))
        .await
        .expect("list")
        .is_empty());
    // Without the CA the server's certificate is not trusted.
    let untrusted = RedisConfig::new(format!("rediss://:tls-pw@127.0.0.1:{port}"));
    let r = mailbox(&untrusted).get("fmi/x").await;
    assert!(r.is_err(), "an unknown CA must be refused");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The answer to the `DEL` after a read is lost (the proxy forwards the `DEL`, the server
/// applies it, the connection is cut before the answer comes back): the message that was read
/// is delivered once, the next one arrives exactly once too, and nothing is left behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_delete_answer_loses_and_duplicates_nothing() {
    use fmi_storage::testing::CutProxy;
    let url = redis_url();
    let proxy = CutProxy::start(server_addr(&url), b"$3\r\nDEL\r\n")
        .await
        .expect("proxy");
    let job = fresh_job("delcut");
    let scfg = StorageConfig::fast();
    let direct = StorageChannel::new(
        mailbox(&RedisConfig::new(url.clone())),
        job.clone(),
        Rank(0),
        2,
        scfg.clone(),
    )
    .expect("rank 0");
    let cut = StorageChannel::new(
        mailbox(&RedisConfig::new(via(&url, proxy.addr()))),
        job.clone(),
        Rank(1),
        2,
        scfg,
    )
    .expect("rank 1");
    let tag = Tag::user(9);
    for round in 0..3u32 {
        let a = payload(round, 100);
        direct
            .send(Rank(1), tag, &a, deadline())
            .await
            .expect("send");
        if round == 1 {
            proxy.arm();
        }
        let got = cut.recv(Rank(0), tag, deadline()).await.expect("recv");
        assert_eq!(got, a, "round {round}");
    }
    assert_eq!(proxy.cuts(), 1, "the DEL answer was dropped once");
    assert!(!proxy.armed());
    // Nothing more arrives: no duplicate.
    let r = cut
        .recv(Rank(0), tag, Instant::now() + Duration::from_millis(300))
        .await;
    assert!(matches!(r, Err(Error::Timeout { .. })), "{r:?}");
    drop(cut);
    // The deletes of read keys may still be on their way (retried in the background).
    let give_up = Instant::now() + Duration::from_secs(5);
    while !job_keys(&job).await.is_empty() && Instant::now() < give_up {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_clean(&job).await;
}

/// With a job secret, keys live in the job's secret key space: a rank given another secret (or
/// none) neither sees the job's messages nor can be seen by it, the secret appears in no key, and
/// `cleanup_job` (by job id) still finds everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_secret_keeps_ranks_without_it_out_of_the_job_keys() {
    let rcfg = RedisConfig::new(redis_url());
    let scfg = StorageConfig::default();
    let job = fresh_job("secret");
    let secret = b"s3cr3t-token-value";
    let ch = |r: u32, s: Option<&[u8]>| {
        let c = StorageChannel::new(mailbox(&rcfg), job.clone(), Rank(r), 2, scfg.clone())
            .expect("channel");
        match s {
            Some(s) => c.with_secret(s),
            None => c,
        }
    };
    let (a, b) = (ch(0, Some(secret)), ch(1, Some(secret)));
    assert!(
        a.key_space().starts_with(&job_prefix(&job)),
        "{}",
        a.key_space()
    );
    assert_ne!(a.key_space(), job_prefix(&job));
    assert_eq!(a.key_space(), b.key_space());
    let outsider = ch(1, Some(b"another-token"));
    let anonymous = ch(1, None);
    assert_ne!(outsider.key_space(), a.key_space());

    // Rank 0 of the job sends; the outsiders do not see it within their deadline.
    a.send(Rank(1), Tag::user(3), b"for the job only", deadline())
        .await
        .expect("send");
    for stranger in [&outsider, &anonymous] {
        let e = stranger
            .recv(
                Rank(0),
                Tag::user(3),
                Instant::now() + Duration::from_millis(300),
            )
            .await
            .expect_err("a rank without the secret must not read the job's message");
        assert!(matches!(e, fmi_channels::Error::Timeout { .. }), "{e:?}");
    }
    let keys = job_keys(&job).await;
    assert!(!keys.is_empty());
    for k in &keys {
        assert!(k.starts_with(a.key_space()), "{k}");
        assert!(!k.contains("s3cr3t"), "the secret leaked into a key: {k}");
    }
    // A stranger's message does not reach the job either.
    outsider
        .send(Rank(0), Tag::user(4), b"forged", deadline())
        .await
        .expect("send");
    let e = a
        .recv(
            Rank(1),
            Tag::user(4),
            Instant::now() + Duration::from_millis(300),
        )
        .await
        .expect_err("the job must not read a stranger's message");
    assert!(matches!(e, fmi_channels::Error::Timeout { .. }), "{e:?}");
    // The job's own rank reads it.
    let m = b
        .recv(Rank(0), Tag::user(3), deadline())
        .await
        .expect("recv");
    assert_eq!(m, b"for the job only");
    // Everything (the job's and the stranger's keys) goes by job id.
    cleanup_job(&*mailbox(&rcfg), &job).await.expect("cleanup");
    assert_clean(&job).await;
}

/// The counter-based barrier and gather record who arrived, so a rank whose wait times out
/// names a rank that never came, not itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn native_barrier_and_gather_timeouts_name_the_missing_rank() {
    let rcfg = RedisConfig::new(redis_url());
    let (job, w) = world("blame", 4, &rcfg, &StorageConfig::default());
    let short = || Instant::now() + Duration::from_millis(400);
    // Rank 2 never enters the barrier.
    let waits = [0usize, 1, 3].map(|r| {
        let ch = Arc::clone(&w[r]);
        tokio::spawn(async move {
            ch.barrier(Tag::collective(1), short())
                .expect("native barrier")
                .await
        })
    });
    for (r, h) in [0u32, 1, 3].into_iter().zip(waits) {
        match h.await.expect("join") {
            Err(Error::Timeout { me, peer, .. }) => {
                assert_eq!((me, peer), (Rank(r), Rank(2)), "barrier at rank {r}");
            }
            other => panic!("barrier at rank {r}: {other:?}"),
        }
    }
    // Ranks 1 and 3 contribute to a gather at root 0; rank 2 does not.
    for r in [1usize, 3] {
        w[r].gather(Rank(0), Tag::collective(2), b"block", deadline())
            .expect("native gather")
            .await
            .expect("contribute");
    }
    match w[0]
        .gather(Rank(0), Tag::collective(2), b"root", short())
        .expect("native gather")
        .await
    {
        Err(Error::Timeout { me, peer, .. }) => assert_eq!((me, peer), (Rank(0), Rank(2))),
        other => panic!("gather root: {other:?}"),
    }
    // Every rank counted, but the one whose increment completed the count died before raising
    // the flag: ranks 1 and 3 contribute to a gather at root 2 for real; "rank 0" only counts
    // itself, last, on the gather's counter (key layout: fmi-storage's keys.rs) and stops there.
    let tag = Tag::collective(3);
    for r in [1usize, 3] {
        w[r].gather(Rank(2), tag, b"block", deadline())
            .expect("native gather")
            .await
            .expect("contribute");
    }
    let count = format!("{}g/2/{:016x}/n", job_prefix(&job), tag.0);
    let n = mailbox(&rcfg)
        .incr_marking(&count, 1, 0, 4)
        .expect("counters")
        .await
        .expect("count rank 0");
    assert_eq!(n, 3, "rank 0's increment completes the count");
    match w[2]
        .gather(Rank(2), tag, b"root", short())
        .expect("native gather")
        .await
    {
        Err(Error::Timeout { me, peer, .. }) => assert_eq!((me, peer), (Rank(2), Rank(0))),
        other => panic!("gather root 2: {other:?}"),
    }
    cleanup_job(&*mailbox(&rcfg), &job).await.expect("cleanup");
}

/// The chain of blame over Redis: rank 0 falls silent; rank 2 waits for rank 1 inside a
/// collective step, rank 1 for rank 0, with deadlines `r2_ms` and `r1_ms` from now. Rank 1
/// must time out naming rank 0 itself, and rank 2 must follow the job's failure record to name
/// rank 0 (reported by rank 1), not rank 1. Returns the job, its endpoints and the config.
async fn chain_of_blame(
    name: &str,
    r2_ms: u64,
    r1_ms: u64,
) -> (JobId, Vec<Arc<fmi_channels::AbortOnFailure>>, RedisConfig) {
    use fmi_channels::AbortOnFailure;
    let rcfg = RedisConfig {
        ttl: Duration::from_secs(120),
        ..RedisConfig::new(redis_url())
    };
    let scfg = StorageConfig {
        record_failures: true,
        ..StorageConfig::fast()
    };
    let (job, w) = world(name, 3, &rcfg, &scfg);
    let w: Vec<Arc<AbortOnFailure>> = w
        .into_iter()
        .map(|ch| Arc::new(AbortOnFailure::new(ch)))
        .collect();
    let soon = |ms| Instant::now() + Duration::from_millis(ms);
    // A step of a collective: a point-to-point `Timeout` would be left to its caller.
    let step = Tag::collective(1).step(0);
    let r2 = {
        let ch = Arc::clone(&w[2]);
        tokio::spawn(async move { ch.recv(Rank(1), step, soon(r2_ms)).await })
    };
    let r1 = {
        let ch = Arc::clone(&w[1]);
        tokio::spawn(async move { ch.recv(Rank(0), step, soon(r1_ms)).await })
    };
    let r1 = r1.await.expect("task");
    assert!(
        matches!(
            r1,
            Err(Error::Timeout {
                me: Rank(1),
                peer: Rank(0),
                ..
            })
        ),
        "rank 1 saw rank 0 fall silent itself: {r1:?}"
    );
    let r2 = r2.await.expect("task");
    assert!(
        matches!(
            r2,
            Err(Error::PeerLost {
                me: Rank(2),
                peer: Rank(0),
                via: Some(Rank(1)),
                channel: "redis",
            })
        ),
        "rank 2 names rank 0, as rank 1 reported: {r2:?}"
    );
    (job, w, rcfg)
}

/// The chain of blame when the rank in the middle reports late: rank 2 times out first; rank 1,
/// alive but stuck behind rank 0, entered its wait 200 ms later (a slow step on a loaded
/// machine), so its report comes 200 ms after rank 2's. Rank 2 keeps re-reading the record
/// until the rank it names has stood still, and names rank 0 (reported by rank 1), not the
/// living rank 1. (One read 100 ms after its own report, as before, named rank 1: the failure
/// a CI run with 7 ranks on 2 cores hit.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rank_that_reports_late_is_followed_not_named() {
    let started = Instant::now();
    let (job, _w, rcfg) = chain_of_blame("blame-late", 300, 500).await;
    // Bounded: rank 2's deadline, the re-reads until the answer stood, and the requests.
    let took = started.elapsed();
    assert!(took < Duration::from_secs(4), "{took:?}");
    cleanup_job(mailbox(&rcfg).as_ref(), &job)
        .await
        .expect("cleanup");
}

/// Failure propagation over Redis (`Channel::abort`): rank 0 falls silent; rank 1, waiting for
/// it inside a collective, times out and records that it failed because of rank 0; rank 2,
/// waiting for rank 1, started waiting first, so its deadline comes first: without the record
/// (and the grace for ranks that time out at about the same moment) it would name rank 1. It
/// follows the job's failure record to name rank 0 (reported by rank 1). The record carries the
/// TTL, and `cleanup_job` removes it with the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timed_out_rank_names_the_rank_at_the_end_of_the_chain_of_blame() {
    let (job, w, rcfg) = chain_of_blame("blame", 400, 420).await;
    // Both are revoked: later operations fail at once, naming rank 0.
    let r = w[1].send(Rank(2), Tag::user(2), b"x", deadline()).await;
    assert!(
        matches!(r, Err(Error::PeerLost { peer: Rank(0), .. })),
        "{r:?}"
    );
    let r = w[2].recv(Rank(1), Tag::user(2), deadline()).await;
    assert!(
        matches!(r, Err(Error::PeerLost { peer: Rank(0), .. })),
        "{r:?}"
    );
    // The record is one key under the job's prefix, with the TTL; cleanup removes it.
    let keys = job_keys(&job).await;
    assert_eq!(keys, vec![format!("{}f", job_prefix(&job))], "{keys:?}");
    let ttl: i64 = redis::cmd("PTTL")
        .arg(&keys[0])
        .query_async(&mut raw().await)
        .await
        .expect("PTTL");
    assert!(ttl > 0 && ttl <= 120_000, "PTTL {ttl}");
    cleanup_job(mailbox(&rcfg).as_ref(), &job)
        .await
        .expect("cleanup");
    assert_clean(&job).await;
}
