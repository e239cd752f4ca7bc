//! The conformance suite every channel must pass.
//!
//! A backend's test calls [`run_all`] with a factory that sets up a fresh job of `n` ranks and
//! returns their endpoints (index = rank). Each check panics with a message naming what broke.
//! The suite covers: ordering per (pair, tag), messages from 0 B to 16 MiB, many tags interleaved,
//! deadline expiry with a typed error, receivers that wait before or after the sender, concurrent
//! sends fixed in call order, and invalid ranks.

// A test suite: a broken channel must fail loudly, so panicking on errors is the point.
#![allow(clippy::expect_used, clippy::panic)]

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::{Channel, Error, Rank, Result, Tag};

type Endpoints = Vec<Arc<dyn Channel>>;

const LONG: Duration = Duration::from_secs(60);

fn deadline() -> Instant {
    Instant::now() + LONG
}

/// Runs every check, each on a fresh job from `make`.
pub async fn run_all<F, Fut>(make: F)
where
    F: Fn(u32) -> Fut,
    Fut: Future<Output = Result<Endpoints>>,
{
    let setup = |n| {
        let f = make(n);
        async move { f.await.expect("conformance: channel setup failed") }
    };
    ordering_per_pair_and_tag(setup(2).await).await;
    sizes_from_zero_to_16_mib(setup(2).await).await;
    many_tags_interleaved(setup(3).await).await;
    deadline_expiry(setup(2).await).await;
    receiver_before_and_after_sender(setup(2).await).await;
    concurrent_sends_keep_call_order(setup(2).await).await;
    invalid_rank(setup(2).await).await;
    all_pairs_exchange(setup(4).await).await;
}

fn payload(seed: u32, len: usize) -> Vec<u8> {
    // Cheap deterministic bytes that differ per message and per position.
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) as u8)
        .collect()
}

/// Messages with one tag arrive in order even when another tag is interleaved and read first.
pub async fn ordering_per_pair_and_tag(eps: Endpoints) {
    let (a, b) = (Arc::clone(&eps[0]), Arc::clone(&eps[1]));
    let sender = tokio::spawn(async move {
        for i in 0..50u32 {
            a.send(Rank(1), Tag::user(1), &i.to_le_bytes(), deadline())
                .await
                .expect("send tag 1");
            a.send(Rank(1), Tag::user(2), &(1000 + i).to_le_bytes(), deadline())
                .await
                .expect("send tag 2");
        }
    });
    for i in 0..50u32 {
        let m = b
            .recv(Rank(0), Tag::user(2), deadline())
            .await
            .expect("recv tag 2");
        assert_eq!(m, (1000 + i).to_le_bytes(), "ordering: tag 2 message {i}");
    }
    for i in 0..50u32 {
        let m = b
            .recv(Rank(0), Tag::user(1), deadline())
            .await
            .expect("recv tag 1");
        assert_eq!(m, i.to_le_bytes(), "ordering: tag 1 message {i}");
    }
    sender.await.expect("sender task");
}

/// Round trips of 0 B, 1 B, odd sizes and up to 16 MiB arrive intact.
pub async fn sizes_from_zero_to_16_mib(eps: Endpoints) {
    let sizes = [0usize, 1, 7, 4096, 65_537, 1 << 20, 16 << 20];
    let (a, b) = (Arc::clone(&eps[0]), Arc::clone(&eps[1]));
    let echo = tokio::spawn(async move {
        for (i, _) in sizes.iter().enumerate() {
            let m = b
                .recv(Rank(0), Tag::user(i as u32), deadline())
                .await
                .expect("echo recv");
            b.send(Rank(0), Tag::user(i as u32), &m, deadline())
                .await
                .expect("echo send");
        }
    });
    for (i, &len) in sizes.iter().enumerate() {
        let msg = payload(i as u32, len);
        a.send(Rank(1), Tag::user(i as u32), &msg, deadline())
            .await
            .expect("send");
        let back = a
            .recv(Rank(1), Tag::user(i as u32), deadline())
            .await
            .expect("recv echo");
        assert_eq!(back.len(), len, "size {len}: length");
        assert!(back == msg, "size {len}: contents differ");
    }
    echo.await.expect("echo task");
}

/// Three ranks send each other messages on 20 tags; receivers read them in another order.
pub async fn many_tags_interleaved(eps: Endpoints) {
    let n = eps.len() as u32;
    let mut tasks = Vec::new();
    for me in 0..n {
        let ep = Arc::clone(&eps[me as usize]);
        tasks.push(tokio::spawn(async move {
            for t in 0..20u32 {
                for dst in (0..n).filter(|&d| d != me) {
                    let msg = payload(me * 1000 + t, (t as usize * 37) % 300);
                    ep.send(Rank(dst), Tag::user(t), &msg, deadline())
                        .await
                        .expect("send");
                }
            }
            for t in (0..20u32).rev() {
                for src in (0..n).filter(|&s| s != me).rev() {
                    let m = ep
                        .recv(Rank(src), Tag::user(t), deadline())
                        .await
                        .expect("recv");
                    assert!(
                        m == payload(src * 1000 + t, (t as usize * 37) % 300),
                        "rank {me}: wrong message from {src} tag {t}"
                    );
                }
            }
        }));
    }
    for t in tasks {
        t.await.expect("rank task");
    }
}

/// A receive with nobody sending fails with `Timeout` naming the peer, near its deadline; a
/// message sent afterwards is not lost.
pub async fn deadline_expiry(eps: Endpoints) {
    let wait = Duration::from_millis(200);
    let started = Instant::now();
    let r = eps[1].recv(Rank(0), Tag::user(9), started + wait).await;
    let took = started.elapsed();
    match r {
        Err(Error::Timeout { peer, me, .. }) => {
            assert_eq!(peer, Rank(0), "timeout names the silent peer");
            assert_eq!(me, Rank(1), "timeout names the waiting rank");
        }
        other => panic!("deadline: expected Timeout, got {other:?}"),
    }
    assert!(took >= wait, "deadline: returned early after {took:?}");
    assert!(
        took < wait + Duration::from_secs(5),
        "deadline: returned late after {took:?}"
    );
    eps[0]
        .send(Rank(1), Tag::user(9), b"late", deadline())
        .await
        .expect("send after timeout");
    let m = eps[1]
        .recv(Rank(0), Tag::user(9), deadline())
        .await
        .expect("late message still arrives");
    assert_eq!(m, b"late");
}

/// The receiver may start waiting before the sender sends, or after.
pub async fn receiver_before_and_after_sender(eps: Endpoints) {
    let b = Arc::clone(&eps[1]);
    let early = tokio::spawn(async move { b.recv(Rank(0), Tag::user(3), deadline()).await });
    tokio::time::sleep(Duration::from_millis(50)).await;
    eps[0]
        .send(Rank(1), Tag::user(3), b"early", deadline())
        .await
        .expect("send");
    assert_eq!(
        early.await.expect("task").expect("early receiver"),
        b"early"
    );

    eps[0]
        .send(Rank(1), Tag::user(4), b"late", deadline())
        .await
        .expect("send");
    tokio::time::sleep(Duration::from_millis(50)).await;
    let m = eps[1]
        .recv(Rank(0), Tag::user(4), deadline())
        .await
        .expect("late receiver");
    assert_eq!(m, b"late");
}

/// Sends called one after another but awaited together keep call order.
pub async fn concurrent_sends_keep_call_order(eps: Endpoints) {
    let msgs: Vec<Vec<u8>> = (0..16u32)
        .map(|i| payload(i, 1 + (i as usize % 3) * 50_000))
        .collect();
    let a = &eps[0];
    let futs: Vec<_> = msgs
        .iter()
        .map(|m| a.send(Rank(1), Tag::user(5), m, deadline()))
        .collect();
    // Poll them in reverse order of creation.
    let mut futs = futs;
    futs.reverse();
    let recv_all = async {
        let mut got = Vec::new();
        for _ in 0..msgs.len() {
            got.push(
                eps[1]
                    .recv(Rank(0), Tag::user(5), deadline())
                    .await
                    .expect("recv"),
            );
        }
        got
    };
    let (sent, got) = tokio::join!(futures::future::join_all(futs), recv_all);
    for s in sent {
        s.expect("send");
    }
    for (i, (g, m)) in got.iter().zip(&msgs).enumerate() {
        assert!(g == m, "concurrent sends: message {i} out of order");
    }
}

/// Naming a rank outside the job is a typed error, not a hang.
pub async fn invalid_rank(eps: Endpoints) {
    let r = eps[0].send(Rank(99), Tag::user(0), b"x", deadline()).await;
    assert!(
        matches!(r, Err(Error::InvalidRank { rank: Rank(99), .. })),
        "send to rank 99: {r:?}"
    );
    let r = eps[0].recv(Rank(99), Tag::user(0), deadline()).await;
    assert!(
        matches!(r, Err(Error::InvalidRank { rank: Rank(99), .. })),
        "recv from rank 99: {r:?}"
    );
}

/// Every rank sends to every rank (itself included) at once.
pub async fn all_pairs_exchange(eps: Endpoints) {
    let n = eps.len() as u32;
    let mut tasks = Vec::new();
    for me in 0..n {
        let ep = Arc::clone(&eps[me as usize]);
        tasks.push(tokio::spawn(async move {
            let sends = (0..n).map(|d| {
                let msg = payload(me * 31 + d, 10_000 + d as usize);
                let ep = Arc::clone(&ep);
                async move {
                    ep.send(Rank(d), Tag::user(77), &msg, deadline())
                        .await
                        .expect("send")
                }
            });
            let recvs = (0..n).map(|s| {
                let ep = Arc::clone(&ep);
                async move {
                    let m = ep
                        .recv(Rank(s), Tag::user(77), deadline())
                        .await
                        .expect("recv");
                    assert!(
                        m == payload(s * 31 + me, 10_000 + me as usize),
                        "all pairs: rank {me} got a wrong message from {s}"
                    );
                }
            });
            tokio::join!(
                futures::future::join_all(sends),
                futures::future::join_all(recvs)
            );
        }));
    }
    for t in tasks {
        t.await.expect("rank task");
    }
}
