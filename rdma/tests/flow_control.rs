//! Per-peer credits (docs/rdma.md, "Flow control"): floods of messages that nobody answers
//! arrive whole and in order, on `shm` (whose 1.17 provider stranded unexpected messages) and on
//! `tcp;ofi_rxm`; two ranks flooding each other at once do not deadlock; several senders flooding
//! one receiver share its receive buffers; rendezvous messages (RTS and FIN take credits too)
//! mixed into a flood still complete. Every loop is bounded in count, every wait by a deadline.

#![cfg(feature = "libfabric")]
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::sync::Arc;
use std::time::Duration;

use fmi_channels::{Channel, Instant, JobId, Rank, Tag};
use fmi_rdma::RdmaConfig;

fn world(provider: &str, n: u32, spin: Duration, recv_buffers: usize) -> Vec<Arc<dyn Channel>> {
    let mut cfg = RdmaConfig::default();
    cfg.provider = Some(provider.to_owned());
    if provider.starts_with("tcp") {
        cfg.domain = Some("lo".to_owned());
    }
    cfg.spin = spin;
    cfg.recv_buffers = recv_buffers;
    fmi_rdma::local_world(JobId::new("rdma-flow").expect("job id"), n, &cfg)
        .expect("a local world")
        .into_iter()
        .map(|ch| Arc::new(ch) as Arc<dyn Channel>)
        .collect()
}

fn runtime(threads: usize) -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
        .expect("runtime")
}

fn counter(ep: &Arc<dyn Channel>, name: &str) -> u64 {
    ep.counters()
        .iter()
        .find(|(n, _)| *n == name)
        .map_or(0, |(_, v)| *v)
}

fn deadline() -> Instant {
    Instant::now() + Duration::from_secs(30)
}

/// Message `i` from `src`: 0 to 4 KiB (every 13th empty, every 7th over the inject size of
/// `shm`, so some go from send bounce buffers), naming source and index.
fn msg(src: u32, i: u32) -> Vec<u8> {
    if i % 13 == 6 {
        return Vec::new();
    }
    let len = if i % 7 == 3 {
        4096 + (i as usize % 5) * 1000
    } else {
        8 + (i as usize * 37) % 300
    };
    let mut m = vec![(src as u8) ^ (i as u8); len];
    m[..4].copy_from_slice(&src.to_le_bytes());
    m[4..8].copy_from_slice(&i.to_le_bytes());
    m
}

/// Every sender fires `count` messages at `to` with no receive in between (each send returns at
/// once: held messages are copied), then `to` receives them all, per source in order. Returns
/// the credit stalls counted by the senders.
fn flood_into(
    eps: &[Arc<dyn Channel>],
    senders: &[u32],
    to: u32,
    count: u32,
    threads: usize,
) -> u64 {
    let rt = runtime(threads);
    rt.block_on(async {
        let mut tasks = Vec::new();
        for &s in senders {
            let ep = Arc::clone(&eps[s as usize]);
            tasks.push(tokio::spawn(async move {
                for i in 0..count {
                    ep.send(Rank(to), Tag::user(7), &msg(s, i), deadline())
                        .await
                        .unwrap_or_else(|e| panic!("rank {s} send {i}: {e}"));
                }
            }));
        }
        for t in tasks {
            t.await.expect("sender");
        }
        let rx = Arc::clone(&eps[to as usize]);
        for &s in senders {
            for i in 0..count {
                let m = rx
                    .recv(Rank(s), Tag::user(7), deadline())
                    .await
                    .unwrap_or_else(|e| panic!("rank {to}: message {i} from {s}: {e}"));
                assert!(m == msg(s, i), "rank {to}: message {i} from {s} is wrong");
            }
        }
    });
    senders
        .iter()
        .map(|&s| counter(&eps[s as usize], "rdma_credit_stalls"))
        .sum()
}

#[test]
fn a_flood_nobody_answers_arrives_whole_on_shm() {
    let eps = world("shm", 2, Duration::from_micros(50), 64);
    let stalls = flood_into(&eps, &[0], 1, 3000, 2);
    assert!(
        stalls > 0,
        "3000 messages against 62 credits never waited for one"
    );
    assert!(counter(&eps[1], "rdma_credit_returns") > 0);
}

#[test]
fn a_flood_nobody_answers_arrives_whole_on_tcp() {
    let eps = world("tcp;ofi_rxm", 2, Duration::from_micros(50), 64);
    let stalls = flood_into(&eps, &[0], 1, 3000, 2);
    assert!(
        stalls > 0,
        "3000 messages against 62 credits never waited for one"
    );
}

#[test]
fn several_senders_flood_one_receiver_on_shm() {
    // 4 buffers for 4 peers: each gets the minimum (2 credits, 2 reserved), posted 16.
    let eps = world("shm", 5, Duration::ZERO, 4);
    let stalls = flood_into(&eps, &[1, 2, 3, 4], 0, 800, 4);
    assert!(stalls > 0);
}

#[test]
fn several_senders_flood_one_receiver_on_tcp() {
    let eps = world("tcp;ofi_rxm", 4, Duration::from_micros(50), 64);
    let stalls = flood_into(&eps, &[1, 2, 3], 0, 800, 3);
    assert!(stalls > 0);
}

/// Both ranks send `count` messages to each other at once, each from its own task, while a
/// second task per rank receives the other's; every `large_every`-th message is a rendezvous
/// message (its RTS and FIN take credits as well). Nobody acknowledges anything.
fn flood_each_other(provider: &str, spin: Duration, threads: usize, recv_buffers: usize) {
    const COUNT: u32 = 1500;
    const LARGE_EVERY: u32 = 97;
    let eps = world(provider, 2, spin, recv_buffers);
    let big = |s: u32, i: u32| -> Vec<u8> {
        let mut m = vec![(i as u8).wrapping_mul(3) ^ s as u8; 40_000];
        m[..4].copy_from_slice(&i.to_le_bytes());
        m
    };
    let rt = runtime(threads);
    rt.block_on(async {
        let mut tasks = Vec::new();
        for me in 0..2u32 {
            let peer = Rank(1 - me);
            let ep = Arc::clone(&eps[me as usize]);
            tasks.push(tokio::spawn(async move {
                for i in 0..COUNT {
                    let m = if i % LARGE_EVERY == 50 {
                        big(me, i)
                    } else {
                        msg(me, i)
                    };
                    ep.send(peer, Tag::user(9), &m, deadline())
                        .await
                        .unwrap_or_else(|e| panic!("rank {me} send {i}: {e}"));
                }
            }));
            let ep = Arc::clone(&eps[me as usize]);
            tasks.push(tokio::spawn(async move {
                // Let the flood pile up before the first receive.
                tokio::time::sleep(Duration::from_millis(20)).await;
                let s = 1 - me;
                for i in 0..COUNT {
                    let m = ep
                        .recv(peer, Tag::user(9), deadline())
                        .await
                        .unwrap_or_else(|e| panic!("rank {me} recv {i}: {e}"));
                    let want = if i % LARGE_EVERY == 50 {
                        big(s, i)
                    } else {
                        msg(s, i)
                    };
                    assert!(m == want, "rank {me}: message {i} from {s} is wrong");
                }
            }));
        }
        for t in tasks {
            t.await.expect("task");
        }
    });
    let stalls: u64 = eps.iter().map(|ep| counter(ep, "rdma_credit_stalls")).sum();
    assert!(stalls > 0, "the flood never ran out of credits");
}

#[test]
fn two_ranks_flooding_each_other_do_not_deadlock_on_shm() {
    flood_each_other("shm", Duration::from_micros(50), 4, 16);
}

#[test]
fn two_ranks_flooding_each_other_do_not_deadlock_without_spinning() {
    flood_each_other("shm", Duration::ZERO, 4, 16);
}

#[test]
fn two_ranks_flooding_each_other_do_not_deadlock_on_one_thread() {
    flood_each_other("shm", Duration::from_micros(50), 1, 16);
}

#[test]
fn two_ranks_flooding_each_other_do_not_deadlock_on_tcp() {
    flood_each_other("tcp;ofi_rxm", Duration::from_micros(50), 4, 16);
}

/// Rank 0 streams `count` small messages to rank 1 and never receives; rank 1 takes each with a
/// small `recv_into` that waits before its message comes, so the engine answers it straight from
/// the bounce buffer and posts that buffer again only afterwards (by its next step). The
/// credits of those buffers must still come back, or rank 0 runs dry after its first credits
/// and rank 1 waits for the rest until its deadline.
fn one_way_into_small_buffers(provider: &str, spin: Duration) {
    let eps = world(provider, 2, spin, 8);
    let rt = runtime(2);
    rt.block_on(async {
        const COUNT: u32 = 3_000;
        let (a, b) = (Arc::clone(&eps[0]), Arc::clone(&eps[1]));
        let deadline = deadline();
        let sender = tokio::spawn(async move {
            for i in 0..COUNT {
                a.send(Rank(1), Tag::user(3), &i.to_le_bytes(), deadline)
                    .await
                    .expect("send");
                if i % 64 == 0 {
                    // Lets the receiver get ahead, so that its receives wait in the engine.
                    tokio::task::yield_now().await;
                }
            }
        });
        let mut buf = [0u8; 16];
        for i in 0..COUNT {
            let n = b
                .recv_into(Rank(0), Tag::user(3), &mut buf, deadline)
                .await
                .unwrap_or_else(|e| panic!("message {i}: {e}"));
            assert_eq!(&buf[..n], &i.to_le_bytes(), "message {i}");
        }
        sender.await.expect("sender");
        assert!(
            counter(&eps[1], "rdma_eager_direct") > 0,
            "some messages were answered by the engine"
        );
        assert!(
            counter(&eps[1], "rdma_credit_returns") >= 2,
            "rank 1 returned credits"
        );
    });
}

#[test]
fn credits_of_engine_answered_receives_come_back_on_shm() {
    one_way_into_small_buffers("shm", Duration::from_millis(1));
}

#[test]
fn credits_of_engine_answered_receives_come_back_without_spinning() {
    one_way_into_small_buffers("shm", Duration::ZERO);
}

#[test]
fn credits_of_engine_answered_receives_come_back_on_tcp() {
    one_way_into_small_buffers("tcp;ofi_rxm", Duration::from_millis(1));
}
