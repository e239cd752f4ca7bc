//! Caller-driven progress (docs/rdma.md, "Progress"): waiting receives and rendezvous sends poll
//! the completion queue themselves, sends post from the caller's thread when the engine is free
//! and queue behind it when not, and the poller thread takes over when a wait outlasts its spin.
//! These tests run many tasks of two ranks at once on several threads (so callers and the poller
//! contend for the engine) and check that every (source, tag) stream arrives complete and in
//! order, eager and rendezvous messages mixed; then waits that outlast the spin window, and
//! `recv_into`s that the channel reads rendezvous messages into directly (also when such a
//! receive gives up before its message comes).

#![cfg(feature = "libfabric")]
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::sync::Arc;
use std::time::Duration;

use fmi_channels::{Channel, Instant, JobId, Rank, Tag};
use fmi_rdma::RdmaConfig;

/// Concurrent streams per direction, and messages per stream.
const STREAMS: u32 = 4;
const MESSAGES: u32 = 120;
/// Larger than the default `eager_max` (16 KiB): goes by rendezvous.
const LARGE: usize = 40 << 10;

fn world(provider: &str, spin: Duration) -> Vec<Arc<dyn Channel>> {
    let mut cfg = RdmaConfig::default();
    cfg.provider = Some(provider.to_owned());
    if provider.starts_with("tcp") {
        cfg.domain = Some("lo".to_owned());
    }
    cfg.spin = spin;
    fmi_rdma::local_world(JobId::new("rdma-progress").expect("job id"), 2, &cfg)
        .expect("a 2-rank world")
        .into_iter()
        .map(|ch| Arc::new(ch) as Arc<dyn Channel>)
        .collect()
}

/// Message `i` of stream `s`: every fifth goes by rendezvous, the others are small and of
/// varying length; the first bytes name the stream and the index.
fn message(s: u32, i: u32) -> Vec<u8> {
    let len = if i.is_multiple_of(5) {
        LARGE
    } else {
        8 + (i as usize * 37) % 200
    };
    let mut m = vec![(s as u8) ^ (i as u8); len];
    m[..4].copy_from_slice(&s.to_le_bytes());
    m[4..8].copy_from_slice(&i.to_le_bytes());
    m
}

/// Both ranks send `STREAMS` streams to each other at once (one task per stream) while one task
/// per stream receives; each receiver checks that its stream arrives whole and in order.
async fn streams(eps: Vec<Arc<dyn Channel>>) {
    streams_with(eps, false).await;
}

/// [`streams`]; with `into`, every receiver uses `recv_into` with one buffer it reuses.
async fn streams_with(eps: Vec<Arc<dyn Channel>>, into: bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut tasks = Vec::new();
    for me in 0..2u32 {
        let peer = Rank(1 - me);
        for s in 0..STREAMS {
            let ep = Arc::clone(&eps[me as usize]);
            tasks.push(tokio::spawn(async move {
                for i in 0..MESSAGES {
                    ep.send(peer, Tag::user(s), &message(s, i), deadline)
                        .await
                        .unwrap_or_else(|e| panic!("rank {me} stream {s} send {i}: {e}"));
                }
            }));
            let ep = Arc::clone(&eps[me as usize]);
            tasks.push(tokio::spawn(async move {
                let mut buf = vec![0u8; LARGE + 1];
                for i in 0..MESSAGES {
                    let m = if into {
                        let n = ep
                            .recv_into(peer, Tag::user(s), &mut buf, deadline)
                            .await
                            .unwrap_or_else(|e| panic!("rank {me} stream {s} recv_into {i}: {e}"));
                        buf[..n].to_vec()
                    } else {
                        ep.recv(peer, Tag::user(s), deadline)
                            .await
                            .unwrap_or_else(|e| panic!("rank {me} stream {s} recv {i}: {e}"))
                    };
                    assert!(
                        m == message(s, i),
                        "rank {me} stream {s}: message {i} is wrong or out of order \
                         (len {}, header {:?})",
                        m.len(),
                        &m[..m.len().min(8)]
                    );
                }
            }));
        }
    }
    for t in tasks {
        t.await.expect("task");
    }
}

fn on_threads(provider: &str, spin: Duration) {
    on_threads_with(provider, spin, false);
}

fn on_threads_with(provider: &str, spin: Duration, into: bool) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let eps = world(provider, spin);
        streams_with(eps.clone(), into).await;
        if into {
            // Some rendezvous messages found their receiver waiting and were read into its
            // buffer (not all need to: a message that comes first is read into a `Vec`).
            let direct: u64 = eps
                .iter()
                .flat_map(|ep| ep.counters())
                .filter(|(name, _)| *name == "rdma_reads_direct")
                .map(|(_, n)| n)
                .sum();
            assert!(
                direct > 0,
                "no rendezvous message was read into a recv_into's buffer"
            );
        }
    });
}

#[test]
fn concurrent_streams_keep_their_order_on_shm() {
    on_threads("shm", Duration::from_micros(50));
}

#[test]
fn concurrent_streams_keep_their_order_on_tcp() {
    on_threads("tcp;ofi_rxm", Duration::from_micros(50));
}

#[test]
fn concurrent_streams_into_buffers_on_shm() {
    on_threads_with("shm", Duration::from_micros(50), true);
}

#[test]
fn concurrent_streams_into_buffers_on_tcp() {
    on_threads_with("tcp;ofi_rxm", Duration::from_micros(50), true);
}

#[test]
fn concurrent_streams_into_buffers_without_spinning() {
    on_threads_with("shm", Duration::ZERO, true);
}

#[test]
fn a_recv_into_that_gives_up_leaves_its_message_to_the_next() {
    // A `recv_into` registered for direct reads times out (or is dropped) before its message is
    // sent: the message must go to the next receive of that tag, whole, and never into the
    // buffer of the receive that gave up.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let eps = world("shm", Duration::from_micros(50));
        let long = Instant::now() + Duration::from_secs(30);
        let (a, b) = (Arc::clone(&eps[0]), Arc::clone(&eps[1]));
        let tag = Tag::user(11);
        for round in 0..4u8 {
            let mut gave_up = vec![0xEEu8; LARGE];
            // Times out: its deadline is (nearly) now.
            let soon = Instant::now() + Duration::from_millis(5);
            let r = b.recv_into(Rank(0), tag, &mut gave_up, soon).await;
            assert!(r.is_err(), "round {round}: expected a timeout, got {r:?}");
            // Dropped before it is ever polled.
            let mut dropped = vec![0xEEu8; LARGE];
            drop(b.recv_into(Rank(0), tag, &mut dropped, long));
            let msg = vec![round; LARGE];
            let b2 = Arc::clone(&b);
            let receiver = tokio::spawn(async move {
                let mut buf = vec![0u8; LARGE + 5];
                let n = b2
                    .recv_into(Rank(0), tag, &mut buf, long)
                    .await
                    .expect("recv_into");
                (n, buf)
            });
            tokio::time::sleep(Duration::from_millis(5)).await;
            a.send(Rank(1), tag, &msg, long).await.expect("send");
            let (n, buf) = receiver.await.expect("receiver");
            assert_eq!(n, LARGE, "round {round}: length");
            assert!(buf[..n] == msg[..], "round {round}: contents");
            assert!(
                gave_up.iter().chain(dropped.iter()).all(|&x| x == 0xEE),
                "round {round}: a receive that gave up was written to"
            );
        }
    });
}

#[test]
fn concurrent_streams_keep_their_order_without_spinning() {
    // Every wait sleeps at once: progress is the poller thread's alone.
    on_threads("shm", Duration::ZERO);
}

#[test]
fn concurrent_streams_keep_their_order_on_one_thread() {
    // Both ranks' tasks share one thread: a spinning receive holds up the very task that would
    // send what it waits for, so its spins fail, back off, and the poller and the inbox carry
    // the messages instead.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let eps = world("shm", Duration::from_micros(200));
        streams(eps).await;
    });
}

#[test]
fn waits_longer_than_the_spin_window_are_answered() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let eps = world("shm", Duration::from_micros(50));
        let deadline = Instant::now() + Duration::from_secs(30);
        let (a, b) = (Arc::clone(&eps[0]), Arc::clone(&eps[1]));
        let big = vec![3u8; 1 << 20];
        let late_sender = tokio::spawn(async move {
            for i in 0..8u32 {
                tokio::time::sleep(Duration::from_millis(3)).await;
                a.send(Rank(1), Tag::user(9), &message(0, i), deadline)
                    .await
                    .expect("send");
            }
            // A rendezvous send whose receiver comes late: its spin for the FIN runs out and
            // the poller thread delivers the FIN.
            a.send(Rank(1), Tag::user(10), &big, deadline)
                .await
                .expect("large send");
        });
        for i in 0..8u32 {
            let m = b.recv(Rank(0), Tag::user(9), deadline).await.expect("recv");
            assert_eq!(m, message(0, i), "message {i}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        let m = b
            .recv(Rank(0), Tag::user(10), deadline)
            .await
            .expect("large recv");
        assert_eq!(m.len(), 1 << 20);
        assert!(m.iter().all(|&x| x == 3));
        late_sender.await.expect("sender");
    });
}
