//! A storage server that goes down and comes back in the middle of a stream of messages: every
//! request during the outage is retried within the message deadline, and every message arrives
//! exactly once, in order.
//!
//! Each test runs a **private** server on a free loopback port with its own data directory (the
//! shared servers of `scripts/services.sh` are never touched), kills it with SIGKILL (a crash,
//! not a clean shutdown) and starts it again on the same port and directory:
//!
//! * s3s-fs 0.14.1 (`s3s-fs` on the PATH or in `~/.cargo/bin`) keeps its objects as files, so
//!   messages stored before the crash are still there afterwards.
//! * dynalite 4.0.0 (the npm install of `scripts/services.sh`) is run with `--path`, its LevelDB
//!   store, so that the table and stored items survive the restart as they do on DynamoDB. (The
//!   shared test server runs in memory; a restart of that one loses everything.)
//!
//! The scenario, the same for both:
//! 1. messages 0..10 flow normally;
//! 2. rank 1 waits for message 10 (empty polls), the server is killed, rank 0 sends messages
//!    10..20 while it is down (every PUT fails and is retried, and so is every poll), and the
//!    server comes back after 700 ms: rank 1 gets 10..20;
//! 3. rank 0 stores messages 20..25 while rank 1 is not receiving, the server is killed and
//!    restarted again, and rank 1 then gets them: what was stored survives a crash;
//! 4. nothing more arrives, nothing is left under the job's prefix.
//!
//! The server is never killed while rank 1 *has* a message to take. The narrow window in which
//! a take's delete has been applied but its answer is lost is tested deterministically in
//! `delete_reply.rs` (a proxy drops exactly that answer): the value read is delivered anyway
//! and only the delete is retried.

// Tests: a failure must panic loudly.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use fmi_aws::{DynamoConfig, DynamoMailbox, S3Config, S3Mailbox};
use fmi_channels::{Channel, Error, Instant, JobId, Rank, Tag};
use fmi_storage::{cleanup_job, job_prefix, Mailbox, StorageChannel, StorageConfig};

/// How long the server stays down.
const OUTAGE: Duration = Duration::from_millis(700);
const TAG: Tag = Tag::user(5);

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

/// A fresh directory under the system's temp dir, removed by [`Server`]'s drop.
fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(unique(&format!("fmi-{name}")));
    std::fs::create_dir_all(&dir).expect("create a temp dir");
    dir
}

/// Which server, and how to run it.
#[derive(Clone, Copy, Debug)]
enum Kind {
    S3sFs,
    Dynalite,
}

fn s3s_fs_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|d| d.join("s3s-fs"))
        .find(|p| p.is_file())
    {
        return p;
    }
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")));
    match cargo_home.map(|c| c.join("bin/s3s-fs")) {
        Some(p) if p.is_file() => p,
        _ => panic!(
            "s3s-fs not found on the PATH or in ~/.cargo/bin: scripts/services.sh start installs \
             it (cargo install s3s-fs@0.14.1 --features binary --locked)"
        ),
    }
}

fn dynalite_cli() -> PathBuf {
    let dir = std::env::var_os("FMI_SERVICES_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/tmp/fmi-services"));
    let cli = dir.join("npm/node_modules/dynalite/cli.js");
    assert!(
        cli.is_file(),
        "{} not found: scripts/services.sh start installs dynalite 4.0.0 there",
        cli.display()
    );
    cli
}

/// A private server on `port` that keeps its data in `dir`; killed (and `dir` removed) on drop.
struct Server {
    kind: Kind,
    port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl Server {
    async fn start(kind: Kind, name: &str) -> Server {
        let mut s = Server {
            kind,
            port: free_port(),
            dir: temp_dir(name),
            child: None,
        };
        s.up().await;
        s
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn log(&self) -> PathBuf {
        self.dir.join("server.log")
    }

    fn spawn(&self) -> Child {
        let port = self.port.to_string();
        let mut cmd = match self.kind {
            Kind::S3sFs => {
                let data = self.dir.join("data");
                std::fs::create_dir_all(&data).expect("data dir");
                let mut c = Command::new(s3s_fs_bin());
                c.args(["--host", "127.0.0.1", "--port", &port])
                    .arg("--access-key")
                    .arg(required("AWS_ACCESS_KEY_ID"))
                    .arg("--secret-key")
                    .arg(required("AWS_SECRET_ACCESS_KEY"))
                    .arg(data);
                c
            }
            Kind::Dynalite => {
                let mut c = Command::new("node");
                c.arg(dynalite_cli())
                    .args(["--host", "127.0.0.1", "--port", &port])
                    .arg("--path")
                    .arg(self.dir.join("db"))
                    .args(["--createTableMs", "0", "--deleteTableMs", "0"])
                    .args(["--updateTableMs", "0"]);
                c
            }
        };
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log())
            .expect("server log");
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run the {:?} server: {e}", self.kind))
    }

    /// Starts the server and waits until its port answers (a few attempts, in case the port
    /// is not free again yet right after a kill).
    async fn up(&mut self) {
        for _attempt in 0..5 {
            let mut child = self.spawn();
            // At most 10 s per attempt.
            for _ in 0..200 {
                // Our child must still be running: a port that answers while it has exited is
                // someone else's.
                if tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                    .await
                    .is_ok()
                    && matches!(child.try_wait(), Ok(None))
                {
                    self.child = Some(child);
                    return;
                }
                if matches!(child.try_wait(), Ok(Some(_))) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let _ = child.kill();
            let _ = child.wait();
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        panic!(
            "the private {:?} server on port {} did not start; its log:\n{}",
            self.kind,
            self.port,
            std::fs::read_to_string(self.log()).unwrap_or_default()
        );
    }

    /// SIGKILL: a crash, with no chance to finish or answer anything.
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn deadline() -> Instant {
    Instant::now() + Duration::from_secs(15)
}

/// Message `i`: sizes cycle through empty, small, one full chunk and several chunks.
fn message(i: u32, chunk: usize) -> Vec<u8> {
    let len = [0, 100, chunk - 20, 2 * chunk + 500][i as usize % 4];
    payload(i, len)
}

async fn send_range(a: Arc<StorageChannel>, range: std::ops::Range<u32>, pace: Duration) {
    let chunk = a.chunk_size();
    for i in range {
        a.send(Rank(1), TAG, &message(i, chunk), deadline())
            .await
            .unwrap_or_else(|e| panic!("send {i}: {e}"));
        tokio::time::sleep(pace).await;
    }
}

async fn recv_range(b: Arc<StorageChannel>, range: std::ops::Range<u32>) {
    let chunk = b.chunk_size();
    for i in range {
        let got = b
            .recv(Rank(0), TAG, deadline())
            .await
            .unwrap_or_else(|e| panic!("recv {i}: {e}"));
        assert!(
            got == message(i, chunk),
            "message {i}: got {} bytes that are not message {i} (lost, duplicated or reordered)",
            got.len()
        );
    }
}

/// The scenario of the module docs over `server` and the two ranks' mailboxes.
async fn stream_through_restarts(
    server: &mut Server,
    job: JobId,
    mailboxes: [Arc<dyn Mailbox>; 2],
    probe: &dyn Mailbox,
) {
    let [m0, m1] = mailboxes;
    let ch = |mb, r| {
        Arc::new(
            StorageChannel::new(mb, job.clone(), Rank(r), 2, StorageConfig::fast())
                .expect("channel"),
        )
    };
    let (a, b) = (ch(m0, 0), ch(m1, 1));
    assert!(a.chunk_size() > 100, "chunk size {}", a.chunk_size());

    // 1. Normal operation.
    let r = tokio::spawn(recv_range(Arc::clone(&b), 0..10));
    send_range(Arc::clone(&a), 0..10, Duration::ZERO).await;
    r.await.expect("receiver");
    assert_eq!(a.stats().retries + b.stats().retries, 0, "no retries yet");

    // 2. Down while rank 1 polls and rank 0 sends.
    let r = tokio::spawn(recv_range(Arc::clone(&b), 10..20));
    tokio::time::sleep(Duration::from_millis(100)).await;
    server.kill();
    let s = tokio::spawn(send_range(
        Arc::clone(&a),
        10..20,
        Duration::from_millis(20),
    ));
    tokio::time::sleep(OUTAGE).await;
    assert!(
        !s.is_finished(),
        "no send can succeed while the server is down"
    );
    let back = Instant::now();
    server.up().await;
    s.await.expect("sender");
    r.await.expect("receiver");
    let recovered = back.elapsed();
    assert!(
        recovered < Duration::from_secs(10),
        "took {recovered:?} after the restart"
    );
    assert!(
        a.stats().retries > 0,
        "rank 0's puts were retried: {:?}",
        a.stats()
    );
    assert!(
        b.stats().retries > 0,
        "rank 1's polls were retried: {:?}",
        b.stats()
    );

    // 3. Stored before a crash, received after it.
    send_range(Arc::clone(&a), 20..25, Duration::ZERO).await;
    server.kill();
    server.up().await;
    recv_range(Arc::clone(&b), 20..25).await;

    // 4. Nothing duplicated, nothing left.
    let extra = b
        .recv(Rank(0), TAG, Instant::now() + Duration::from_millis(300))
        .await;
    assert!(
        matches!(extra, Err(Error::Timeout { .. })),
        "nothing more: {extra:?}"
    );
    assert_gone(probe, &job_prefix(&job)).await;
    assert_eq!(cleanup_job(probe, &job).await.expect("cleanup"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3s_fs_restarted_mid_stream_loses_and_duplicates_nothing() {
    let _ = s3_endpoint(); // the same prerequisites as every S3 test (credentials)
    let mut server = Server::start(Kind::S3sFs, "s3-restart").await;
    let config = S3Config {
        endpoint: Some(server.endpoint()),
        // Small values, so that some messages are several chunks.
        max_value: 4096,
        timeout_secs: 5,
        ..s3_config("restart")
    };
    // A server that has just opened its port may still refuse for a moment (CI saw one
    // "connection refused" right after the port answered): retry what is retryable, briefly.
    let mut tries = 0;
    while let Err(e) = S3Mailbox::setup(&config).await {
        tries += 1;
        assert!(
            e.retryable && tries < 20,
            "create the bucket: {e:?}; the server's log:\n{}",
            std::fs::read_to_string(server.log()).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let connect = || async {
        Arc::new(S3Mailbox::connect(config.clone()).await.expect("s3")) as Arc<dyn Mailbox>
    };
    let probe = connect().await;
    let job = JobId::new(unique("restart")).expect("job id");
    stream_through_restarts(
        &mut server,
        job,
        [connect().await, connect().await],
        probe.as_ref(),
    )
    .await;
    clean(probe.as_ref(), "").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dynalite_restarted_mid_stream_loses_and_duplicates_nothing() {
    let _ = dynamo_endpoint(); // the same prerequisites as every DynamoDB test (credentials)
    let mut server = Server::start(Kind::Dynalite, "dynamo-restart").await;
    let config = DynamoConfig {
        endpoint: Some(server.endpoint()),
        max_value: 1024,
        timeout_secs: 5,
        ..dynamo_config()
    };
    DynamoMailbox::setup(&config)
        .await
        .expect("create the table");
    let connect = || async {
        Arc::new(
            DynamoMailbox::connect(config.clone())
                .await
                .expect("dynamodb"),
        ) as Arc<dyn Mailbox>
    };
    let probe = connect().await;
    let job = JobId::new(unique("restart")).expect("job id");
    stream_through_restarts(
        &mut server,
        job,
        [connect().await, connect().await],
        probe.as_ref(),
    )
    .await;
    assert!(Path::new(&server.dir).join("db").is_dir());
}
