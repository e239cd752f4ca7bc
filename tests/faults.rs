//! Server faults: a fault-injecting TCP proxy between the storage channels and their **real**
//! servers (Redis, s3s-fs, dynalite from `scripts/services.sh`). On about 5 % of the requests it
//! sees (one read from the client = one request) it
//!
//! * **drops** the connection before the request reaches the server,
//! * **cuts** the answer: forwards the request (the server applies it), then forwards only a
//!   random prefix of the answer, possibly nothing, and closes both sides,
//! * **delays** the request by 1–40 ms, or
//! * **answers with an error** itself, for HTTP servers: `503 Slow Down` (S3) or
//!   `500 InternalServerError` (DynamoDB), without forwarding the request.
//!
//! Four ranks in one process send to each other on two tags at once; every message carries its
//! stream and sequence number. Each receiver checks that every message of every
//! (source, tag) arrives exactly once and in order — 0 lost, 0 duplicated, 0 reordered — then
//! that nothing more arrives and that the job left nothing under its prefix.
//!
//! Redis runs 10,000 messages in the suite. S3 and DynamoDB (polled, several requests per
//! message) run 1,000 in the suite; the 10,000-message runs are `#[ignore]`d, run by hand:
//! `cargo test --release -p fmi-suite --features aws --test faults -- --ignored --nocapture`.
//! Results are in docs/reliability.md.

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fmi_channels::{Channel, Instant, JobId, Rank, Tag};
use fmi_storage::{Mailbox, StorageChannel, StorageConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

// ------------------------------------------------------------------ the proxy

/// What the proxy injected, by kind.
#[derive(Default, Debug)]
struct Injected {
    requests: AtomicU64,
    drops: AtomicU64,
    cuts: AtomicU64,
    delays: AtomicU64,
    errors: AtomicU64,
}

impl Injected {
    fn total(&self) -> u64 {
        self.drops.load(Ordering::Relaxed)
            + self.cuts.load(Ordering::Relaxed)
            + self.delays.load(Ordering::Relaxed)
            + self.errors.load(Ordering::Relaxed)
    }

    fn summary(&self) -> String {
        format!(
            "{} requests, {} faults injected ({} dropped connections, {} cut answers, {} delays, \
             {} error answers)",
            self.requests.load(Ordering::Relaxed),
            self.total(),
            self.drops.load(Ordering::Relaxed),
            self.cuts.load(Ordering::Relaxed),
            self.delays.load(Ordering::Relaxed),
            self.errors.load(Ordering::Relaxed),
        )
    }
}

/// Which error answer to inject (none for a binary protocol).
#[derive(Clone, Copy, Debug)]
enum ErrorAnswer {
    None,
    S3,
    Dynamo,
}

impl ErrorAnswer {
    fn bytes(self) -> Option<&'static [u8]> {
        match self {
            ErrorAnswer::None => None,
            ErrorAnswer::S3 => Some(
                b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\nContent-Length: 107\r\nConnection: close\r\n\r\n\
<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>SlowDown</Code><Message>injected</Message></Error>\n",
            ),
            ErrorAnswer::Dynamo => Some(
                b"HTTP/1.1 500 Internal Server Error\r\nContent-Type: application/x-amz-json-1.0\r\nContent-Length: 94\r\nConnection: close\r\n\r\n\
{\"__type\":\"com.amazonaws.dynamodb.v20120810#InternalServerError\",\"message\":\"injected fault\"}",
            ),
        }
    }
}

/// xorshift64*, shared by the proxy's connections.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

struct FaultProxy {
    addr: SocketAddr,
    injected: Arc<Injected>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One fault decision for a request.
enum Decision {
    Pass,
    Drop,
    Cut(usize),
    Delay(Duration),
    Error(&'static [u8]),
}

impl FaultProxy {
    /// A proxy on a fresh loopback port in front of `upstream`, faulting `per_mille` of the
    /// requests.
    async fn start(upstream: SocketAddr, per_mille: u64, errors: ErrorAnswer, seed: u64) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the proxy");
        let addr = listener.local_addr().expect("proxy address");
        let injected = Arc::new(Injected::default());
        let rng = Arc::new(Mutex::new(Rng(seed | 1)));
        let inj = Arc::clone(&injected);
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let (inj, rng) = (Arc::clone(&inj), Arc::clone(&rng));
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    serve(client, server, per_mille, errors, inj, rng).await;
                });
            }
        });
        FaultProxy {
            addr,
            injected,
            task,
        }
    }
}

/// Copies both ways, deciding a fault for every read from the client. Ends when either side
/// closes or a fault closes both.
async fn serve(
    client: TcpStream,
    server: TcpStream,
    per_mille: u64,
    errors: ErrorAnswer,
    inj: Arc<Injected>,
    rng: Arc<Mutex<Rng>>,
) {
    let (mut cr, cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    let cw = Arc::new(tokio::sync::Mutex::new(cw));
    // usize::MAX: no cut armed; otherwise forward at most that many more answer bytes, then
    // close.
    let cut = Arc::new(AtomicUsize::new(usize::MAX));
    let (cut2, cw2) = (Arc::clone(&cut), Arc::clone(&cw));
    let mut answers = tokio::spawn(async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match sr.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let mut w = cw2.lock().await;
            let allow = cut2.load(Ordering::Acquire);
            if allow != usize::MAX {
                let _ = w.write_all(&buf[..allow.min(n)]).await;
                break;
            }
            if w.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
        let _ = cw2.lock().await.shutdown().await;
    });
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = tokio::select! {
            r = cr.read(&mut buf) => match r { Ok(0) | Err(_) => break, Ok(n) => n },
            _ = &mut answers => return,
        };
        inj.requests.fetch_add(1, Ordering::Relaxed);
        let decision = {
            let mut rng = rng.lock().unwrap();
            if rng.next() % 1000 < per_mille {
                let r = rng.next();
                match (r % 4, errors.bytes()) {
                    (0, _) => Decision::Drop,
                    (1, _) => Decision::Cut(((r >> 8) % 200) as usize),
                    (3, Some(answer)) => Decision::Error(answer),
                    _ => Decision::Delay(Duration::from_millis(1 + (r >> 8) % 40)),
                }
            } else {
                Decision::Pass
            }
        };
        match decision {
            Decision::Pass => {}
            Decision::Drop => {
                inj.drops.fetch_add(1, Ordering::Relaxed);
                break;
            }
            Decision::Delay(d) => {
                inj.delays.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(d).await;
            }
            Decision::Cut(k) => {
                inj.cuts.fetch_add(1, Ordering::Relaxed);
                cut.store(k, Ordering::Release);
            }
            Decision::Error(answer) => {
                inj.errors.fetch_add(1, Ordering::Relaxed);
                let mut w = cw.lock().await;
                answers.abort();
                let _ = w.write_all(answer).await;
                let _ = w.shutdown().await;
                return;
            }
        }
        if sw.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    answers.abort();
    let _ = cw.lock().await.shutdown().await;
}

// ------------------------------------------------------------------ the workload

const RANKS: u32 = 4;
const TAGS: [Tag; 2] = [Tag::user(3), Tag::user(9)];

fn nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

fn deadline() -> Instant {
    Instant::now() + Duration::from_secs(60)
}

/// Message `seq` of stream (src, dst, tag): a 24-byte header naming it, then filler whose
/// length cycles so that some messages span several chunks of `chunk` bytes.
fn message(src: u32, dst: u32, tag: Tag, seq: u32, chunk: usize) -> Vec<u8> {
    let len =
        [0usize, 100, chunk.saturating_sub(30), chunk * 2 + 17][seq as usize % 4].min(1 << 16);
    let mut m = Vec::with_capacity(24 + len);
    m.extend_from_slice(&src.to_le_bytes());
    m.extend_from_slice(&dst.to_le_bytes());
    m.extend_from_slice(&tag.0.to_le_bytes());
    m.extend_from_slice(&seq.to_le_bytes());
    m.extend(std::iter::repeat_n(0u8, 24 - m.len()));
    m.extend((0..len).map(|i| (i as u32 ^ seq).wrapping_mul(31) as u8));
    m
}

/// Runs `total` messages (spread evenly over every ordered pair and both tags) through one
/// channel per rank, all at once, and checks exactly-once in-order delivery.
async fn exactly_once_under_faults(
    what: &str,
    mailboxes: Vec<Arc<dyn Mailbox>>,
    probe: Arc<dyn Mailbox>,
    proxy: &FaultProxy,
    total: u32,
) {
    let job = JobId::new(format!("faults-{what}-{:x}", nanos() & 0xffff_ffff)).unwrap();
    let streams = RANKS * (RANKS - 1) * TAGS.len() as u32;
    let per_stream = total.div_ceil(streams);
    let chans: Vec<Arc<StorageChannel>> = mailboxes
        .into_iter()
        .enumerate()
        .map(|(r, mb)| {
            Arc::new(
                StorageChannel::new(
                    mb,
                    job.clone(),
                    Rank(r as u32),
                    RANKS,
                    StorageConfig::fast(),
                )
                .expect("a storage channel"),
            )
        })
        .collect();
    let chunk = chans[0].chunk_size();
    let started = std::time::Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for src in 0..RANKS {
        for dst in (0..RANKS).filter(|&d| d != src) {
            for tag in TAGS {
                let tx = Arc::clone(&chans[src as usize]);
                tasks.spawn(async move {
                    for seq in 0..per_stream {
                        let m = message(src, dst, tag, seq, chunk);
                        tx.send(Rank(dst), tag, &m, deadline())
                            .await
                            .unwrap_or_else(|e| panic!("send {src}->{dst} {tag:?} #{seq}: {e}"));
                    }
                    0u32
                });
                let rx = Arc::clone(&chans[dst as usize]);
                tasks.spawn(async move {
                    for seq in 0..per_stream {
                        let got = rx
                            .recv(Rank(src), tag, deadline())
                            .await
                            .unwrap_or_else(|e| {
                                panic!("LOST: recv {src}->{dst} {tag:?} #{seq}: {e}")
                            });
                        let want = message(src, dst, tag, seq, chunk);
                        if got != want {
                            let head = |m: &[u8]| {
                                m.get(..20).map(|h| {
                                    h.chunks(4)
                                        .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
                                        .collect::<Vec<_>>()
                                })
                            };
                            panic!(
                                "{src}->{dst} {tag:?}: expected message #{seq}, got {:?} \
                                 [src, dst, tag lo, tag hi, seq] of {} bytes (lost, duplicated, reordered \
                                 or corrupted)",
                                head(&got),
                                got.len()
                            );
                        }
                    }
                    per_stream
                });
            }
        }
    }
    let mut delivered = 0u32;
    while let Some(r) = tasks.join_next().await {
        delivered += r.unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
    }
    let elapsed = started.elapsed();
    // Nothing more on any stream: no duplicate was left waiting.
    for (dst, rx) in chans.iter().enumerate() {
        for src in (0..RANKS).filter(|&s| s as usize != dst) {
            for tag in TAGS {
                let extra = rx
                    .recv(Rank(src), tag, Instant::now() + Duration::from_millis(50))
                    .await;
                // Only a message is a duplicate; an injected fault may also end the short wait.
                if let Ok(m) = &extra {
                    panic!(
                        "DUPLICATE: an extra message {src}->{dst} {tag:?} of {} bytes",
                        m.len()
                    );
                }
            }
        }
    }
    drop(chans);
    let prefix = fmi_storage::job_prefix(&job);
    let left = probe.list(&prefix).await.expect("list the job's keys");
    // A read whose delete was cut may leave its key to the TTL; none may be a message.
    println!(
        "faults over {what}: {delivered} messages in {elapsed:.1?} ({:.2} ms/message), 0 lost, \
         0 duplicated, 0 reordered; {}; {} keys left under {prefix}",
        elapsed.as_secs_f64() * 1000.0 / f64::from(delivered.max(1)),
        proxy.injected.summary(),
        left.len()
    );
    assert_eq!(delivered, per_stream * streams);
    assert!(
        proxy.injected.total() > 0,
        "the proxy injected no fault: {}",
        proxy.injected.summary()
    );
    let n = fmi_storage::cleanup_job(probe.as_ref(), &job)
        .await
        .expect("cleanup");
    assert_eq!(n, left.len(), "cleanup removed what was left");
}

fn addr_of(url: &str) -> SocketAddr {
    let hostport = url
        .split_once("://")
        .map_or(url, |(_, rest)| rest)
        .split('/')
        .next()
        .unwrap();
    let hostport = hostport.rsplit_once('@').map_or(hostport, |(_, h)| h);
    hostport.parse().unwrap_or_else(|e| panic!("{url}: {e}"))
}

fn service(var: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| {
        panic!("{var} is not set: start the servers with `eval \"$(scripts/services.sh start)\"`")
    })
}

async fn redis_case(total: u32) {
    let url = service("FMI_TEST_REDIS_URL");
    let proxy = FaultProxy::start(addr_of(&url), 50, ErrorAnswer::None, nanos()).await;
    let via = format!("redis://{}", proxy.addr);
    let connect = |u: &str| -> Arc<dyn Mailbox> {
        Arc::new(fmi_storage::RedisMailbox::new(fmi_storage::RedisConfig::new(u)).expect("redis"))
    };
    let mailboxes = (0..RANKS).map(|_| connect(&via)).collect();
    exactly_once_under_faults("redis", mailboxes, connect(&url), &proxy, total).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_behind_a_faulty_proxy_delivers_10000_messages_exactly_once_in_order() {
    redis_case(10_000).await;
}

#[cfg(feature = "aws")]
mod aws {
    use super::*;
    use fmi_aws::{DynamoConfig, DynamoMailbox, S3Config, S3Mailbox};

    async fn s3_case(total: u32) {
        let endpoint = service("FMI_TEST_S3_ENDPOINT");
        let proxy = FaultProxy::start(addr_of(&endpoint), 50, ErrorAnswer::S3, nanos()).await;
        let config = |endpoint: String| S3Config {
            prefix: format!("faults-{:x}/", nanos() & 0xffff_ffff),
            region: Some("us-east-1".into()),
            endpoint: Some(endpoint),
            max_value: 4096,
            timeout_secs: 5,
            ..S3Config::new("fmi-faults")
        };
        let direct = config(endpoint.clone());
        S3Mailbox::setup(&direct).await.expect("create the bucket");
        let via = S3Config {
            endpoint: Some(format!("http://{}", proxy.addr)),
            ..direct.clone()
        };
        let mut mailboxes: Vec<Arc<dyn Mailbox>> = Vec::new();
        for _ in 0..RANKS {
            // The bucket check at connect goes through the proxy too; `connect` retries it.
            let mb = S3Mailbox::connect(via.clone()).await.expect("s3 connect");
            mailboxes.push(Arc::new(mb));
        }
        let probe = Arc::new(S3Mailbox::connect(direct).await.expect("s3"));
        exactly_once_under_faults("s3", mailboxes, probe, &proxy, total).await;
    }

    async fn dynamo_case(total: u32) {
        let endpoint = service("FMI_TEST_DYNAMODB_ENDPOINT");
        let proxy = FaultProxy::start(addr_of(&endpoint), 50, ErrorAnswer::Dynamo, nanos()).await;
        let direct = DynamoConfig {
            region: Some("us-east-1".into()),
            endpoint: Some(endpoint.clone()),
            max_value: 1024,
            timeout_secs: 5,
            ..DynamoConfig::new("fmi-faults")
        };
        DynamoMailbox::setup(&direct)
            .await
            .expect("create the table");
        let via = DynamoConfig {
            endpoint: Some(format!("http://{}", proxy.addr)),
            ..direct.clone()
        };
        let mut mailboxes: Vec<Arc<dyn Mailbox>> = Vec::new();
        for _ in 0..RANKS {
            let mb = DynamoMailbox::connect(via.clone())
                .await
                .expect("dynamodb connect");
            mailboxes.push(Arc::new(mb));
        }
        let probe = Arc::new(DynamoMailbox::connect(direct).await.expect("dynamodb"));
        exactly_once_under_faults("dynamodb", mailboxes, probe, &proxy, total).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn s3_behind_a_faulty_proxy_delivers_1000_messages_exactly_once_in_order() {
        s3_case(1_000).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "10,000 messages over s3s-fs take minutes: run by hand (docs/reliability.md)"]
    async fn s3_behind_a_faulty_proxy_delivers_10000_messages_exactly_once_in_order() {
        s3_case(10_000).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn dynamodb_behind_a_faulty_proxy_delivers_1000_messages_exactly_once_in_order() {
        dynamo_case(1_000).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "10,000 messages over dynalite take minutes: run by hand (docs/reliability.md)"]
    async fn dynamodb_behind_a_faulty_proxy_delivers_10000_messages_exactly_once_in_order() {
        dynamo_case(10_000).await;
    }
}
