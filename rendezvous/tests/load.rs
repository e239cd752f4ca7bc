//! The rendezvous server under load, and restarted in the middle of a bootstrap.
//!
//! * 1,000 ranks (100 jobs of 10) register concurrently with one server while 100 hostile
//!   clients connect alongside: 50 send garbage, 50 send half a frame and stall (slow loris).
//!   Every job completes with the right table, every hostile client is disconnected, and the
//!   process's resident memory stays bounded (measured from `/proc/self/status`, printed, and
//!   recorded in docs/reliability.md).
//! * A server killed while a job is half registered, and started again on the same address:
//!   the registered rank's client notices, retries, and the job completes on the new server; a
//!   server that never comes back ends the bootstrap with a typed error naming the server by the
//!   deadline.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::SocketAddr;
use std::time::Duration;

use fmi_rendezvous::wire::{ClientMsg, ServerMsg};
use fmi_rendezvous::{
    register, Endpoint, Error, Instant, JobId, Registration, Server, ServerConfig, Token,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const TOKEN: &str = "load-secret-5d1c";
const JOBS: u32 = 100;
const RANKS: u32 = 10;
const GARBAGE: usize = 50;
const SLOW: usize = 50;

fn loopback() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

fn registration(job: &str, rank: u32, size: u32) -> Registration {
    Registration {
        job: JobId::new(job).unwrap(),
        rank,
        size,
        endpoints: vec![Endpoint::new(format!("tcp://{job}.r{rank}:4000")).unwrap()],
        token: Token::new(TOKEN).unwrap(),
    }
}

/// Resident memory of this process, in KiB.
fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// The soft limit on open files; the test needs about two per registered rank.
fn open_files_limit() -> u64 {
    std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(3))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(u64::MAX)
}

/// Reads until the server closes the connection (bounded by `limit`); true if it did.
async fn closed_by_server(stream: &mut TcpStream, limit: Duration) -> bool {
    let mut sink = Vec::new();
    matches!(
        tokio::time::timeout(limit, stream.read_to_end(&mut sink)).await,
        Ok(Ok(_)) | Ok(Err(_))
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_ranks_and_a_hundred_hostile_clients() {
    let need = u64::from(JOBS * RANKS) * 2 + 512;
    assert!(
        open_files_limit() >= need,
        "this test needs {need} open files (ulimit -n); the limit is {}",
        open_files_limit()
    );
    let mut config = ServerConfig::default();
    config.read_timeout = Duration::from_secs(2);
    let server = Server::bind(loopback(), config).await.unwrap().spawn();
    let addr = server.local_addr();
    let rss_before = rss_kib();
    let started = std::time::Instant::now();

    // The hostile clients first, so that they are there the whole time.
    let mut hostile = Vec::new();
    for i in 0..GARBAGE + SLOW {
        hostile.push(tokio::spawn(async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            if i < GARBAGE {
                // A length prefix within limits, then bytes that are no message.
                let _ = s.write_all(&[0, 0, 0, 40]).await;
                let _ = s.write_all(&[0xEE; 40]).await;
            } else {
                // Half a Register frame, then silence.
                let mut frame = Vec::new();
                ClientMsg::Register {
                    job: JobId::new("slow").unwrap(),
                    rank: 0,
                    size: 2,
                    endpoints: vec![],
                    token: Token::new(TOKEN).unwrap(),
                }
                .encode(&mut frame)
                .unwrap();
                let _ = s.write_all(&frame[..frame.len() / 2]).await;
            }
            closed_by_server(&mut s, Duration::from_secs(10)).await
        }));
    }

    let deadline = Instant::now() + Duration::from_secs(60);
    let mut ranks = Vec::new();
    for j in 0..JOBS {
        for r in 0..RANKS {
            let job = format!("load-{j}");
            ranks.push(tokio::spawn(register(
                addr,
                registration(&job, r, RANKS),
                deadline,
            )));
        }
    }
    let mut peak = rss_kib();
    for (i, rank) in ranks.into_iter().enumerate() {
        let table = rank
            .await
            .unwrap()
            .unwrap_or_else(|e| panic!("rank {i}: {e}"));
        assert_eq!(table.size(), RANKS);
        assert_eq!(table.job().as_str(), format!("load-{}", i as u32 / RANKS));
        peak = peak.max(rss_kib());
    }
    let registered_in = started.elapsed();
    for (i, h) in hostile.into_iter().enumerate() {
        assert!(h.await.unwrap(), "hostile client {i} was not disconnected");
    }
    let rss_after = rss_kib();
    println!(
        "rendezvous load: {} ranks in {JOBS} jobs registered in {registered_in:.2?} next to {} \
         garbage and {} slow clients (all disconnected); RSS {} KiB before, peak {} KiB, {} KiB \
         after (client and server in one process)",
        JOBS * RANKS,
        GARBAGE,
        SLOW,
        rss_before,
        peak,
        rss_after
    );
    // 1,000 registrations of ~100 bytes each plus 1,100 connections' buffers: far below 64 MiB.
    assert!(
        peak.saturating_sub(rss_before) < 64 * 1024,
        "memory grew by {} KiB",
        peak - rss_before
    );
    server.shutdown().await;
}

/// Registers rank `rank` of `job` (of `size`) on a raw connection and returns the ranks the
/// server says are missing; the registration ends when the connection is dropped here.
async fn missing_seen_by(addr: SocketAddr, job: &str, rank: u32, size: u32) -> Option<Vec<u32>> {
    let mut s = TcpStream::connect(addr).await.ok()?;
    let mut frame = Vec::new();
    ClientMsg::Register {
        job: JobId::new(job).unwrap(),
        rank,
        size,
        endpoints: vec![],
        token: Token::new(TOKEN).unwrap(),
    }
    .encode(&mut frame)
    .unwrap();
    s.write_all(&frame).await.ok()?;
    let mut prefix = [0u8; 4];
    s.read_exact(&mut prefix).await.ok()?;
    let mut body = prefix.to_vec();
    body.resize(4 + u32::from_be_bytes(prefix) as usize, 0);
    s.read_exact(&mut body[4..]).await.ok()?;
    match ServerMsg::decode(&body).ok()? {
        ServerMsg::Missing { ranks } => Some(ranks),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_restarted_mid_bootstrap_still_completes_the_job() {
    let first = Server::bind(loopback(), ServerConfig::default())
        .await
        .unwrap()
        .spawn();
    let addr = first.local_addr();
    let deadline = Instant::now() + Duration::from_secs(20);
    let rank0 = tokio::spawn(register(addr, registration("restart", 0, 3), deadline));
    // Rank 2 looks (and leaves again) until the server reports rank 0 registered.
    let mut held = false;
    for _ in 0..500 {
        if let Some(missing) = missing_seen_by(addr, "restart", 2, 3).await {
            if !missing.contains(&0) {
                held = true;
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(held, "rank 0 never registered with the first server");
    // The server goes away with rank 0 registered; a new one takes its address.
    first.shutdown().await;
    let second = Server::bind(addr, ServerConfig::default())
        .await
        .unwrap()
        .spawn();
    let others =
        [1, 2].map(|r| tokio::spawn(register(addr, registration("restart", r, 3), deadline)));
    let table0 = rank0
        .await
        .unwrap()
        .expect("rank 0 retried on the new server");
    for r in others {
        assert_eq!(
            r.await.unwrap().expect("ranks 1 and 2 on the new server"),
            table0
        );
    }
    assert_eq!(table0.size(), 3);
    second.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_dies_mid_bootstrap_and_stays_down_is_a_typed_error() {
    let server = Server::bind(loopback(), ServerConfig::default())
        .await
        .unwrap()
        .spawn();
    let addr = server.local_addr();
    let deadline = Instant::now() + Duration::from_secs(2);
    let rank0 = tokio::spawn(register(addr, registration("gone", 0, 3), deadline));
    let mut held = false;
    for _ in 0..500 {
        if let Some(missing) = missing_seen_by(addr, "gone", 2, 3).await {
            if !missing.contains(&0) {
                held = true;
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(held, "rank 0 never registered");
    server.shutdown().await;
    let started = std::time::Instant::now();
    let err = rank0.await.unwrap().expect_err("no server, no table");
    let text = err.to_string();
    assert!(
        matches!(err, Error::Unreachable { .. } | Error::Timeout { .. }),
        "{err:?}"
    );
    assert!(
        text.contains(&addr.to_string()) || text.contains("rendezvous"),
        "{text}"
    );
    assert!(!text.contains(TOKEN), "the token leaked into {text}");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
}
