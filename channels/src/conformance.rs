//! The conformance suite every channel must pass.
//!
//! A backend's test calls [`run_all`] with a factory that sets up a fresh job of `n` ranks and
//! returns their endpoints (index = rank). Each check panics with a message naming what broke.
//! The suite covers: ordering per (pair, tag), messages from 0 B to 16 MiB, many tags interleaved,
//! deadline expiry with a typed error, receivers that wait before or after the sender, concurrent
//! sends fixed in call order, invalid ranks, and [`Channel::recv_into`]: sizes, a message longer
//! than the buffer, and one call order shared with `recv`.

// A test suite: a broken channel must fail loudly, so panicking on errors is the point.
#![allow(clippy::expect_used, clippy::panic)]

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::{Channel, Error, Rank, Result, Tag, RECV_INTO_TOO_LONG};

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
    recv_into_sizes(setup(2).await).await;
    recv_into_too_long(setup(2).await).await;
    recv_into_and_recv_share_one_order(setup(2).await).await;
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

/// Bytes that mark a receive buffer's untouched part.
const FILL: u8 = 0xA5;

/// `recv_into` receives messages of 0 B to 1 MiB into larger or exactly sized buffers, with the
/// receiver waiting before the message comes and after; it returns the length and leaves the
/// rest of the buffer as it was.
pub async fn recv_into_sizes(eps: Endpoints) {
    let sizes = [0usize, 1, 7, 4096, 65_537, 1 << 20];
    for (i, &len) in sizes.iter().enumerate() {
        for (waiting, spare) in [(true, 3usize), (false, 0)] {
            let tag = Tag::user(100 + 2 * i as u32 + u32::from(waiting));
            let msg = payload(i as u32 + 7, len);
            let send = || async {
                eps[0]
                    .send(Rank(1), tag, &msg, deadline())
                    .await
                    .expect("send")
            };
            // Either order must work; the pauses only make each order likely.
            if !waiting {
                send().await;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let b = Arc::clone(&eps[1]);
            let receiver = tokio::spawn(async move {
                let mut buf = vec![FILL; len + spare];
                let n = b.recv_into(Rank(0), tag, &mut buf, deadline()).await;
                (n, buf)
            });
            if waiting {
                tokio::time::sleep(Duration::from_millis(20)).await;
                send().await;
            }
            let (n, buf) = receiver.await.expect("receiver task");
            let n = n.unwrap_or_else(|e| panic!("recv_into of {len} B: {e}"));
            assert_eq!(n, len, "recv_into of {len} B: length");
            assert!(
                buf[..len] == msg[..],
                "recv_into of {len} B: contents differ"
            );
            assert!(
                buf[len..].iter().all(|&b| b == FILL),
                "recv_into of {len} B: wrote past the message"
            );
        }
    }
}

/// A message longer than the buffer is a `CountMismatch` in bytes naming both ranks; it is
/// consumed, and the next message with the same tag arrives normally.
pub async fn recv_into_too_long(eps: Endpoints) {
    let tag = Tag::user(200);
    for (len, room) in [(100usize, 99usize), (300_000, 1000), (1, 0)] {
        let b = Arc::clone(&eps[1]);
        let receiver = tokio::spawn(async move {
            let mut buf = vec![0u8; room];
            b.recv_into(Rank(0), tag, &mut buf, deadline()).await
        });
        eps[0]
            .send(Rank(1), tag, &payload(3, len), deadline())
            .await
            .expect("send");
        eps[0]
            .send(Rank(1), tag, b"next", deadline())
            .await
            .expect("send");
        match receiver.await.expect("receiver task") {
            Err(Error::CountMismatch {
                me,
                peer,
                what,
                expected,
                got,
            }) => {
                assert_eq!((me, peer), (Rank(1), Rank(0)), "too long: ranks");
                assert_eq!(what, RECV_INTO_TOO_LONG, "too long: what");
                assert_eq!((expected, got), (room, len), "too long: counts");
            }
            other => panic!("{len} B into {room}: expected CountMismatch, got {other:?}"),
        }
        let mut buf = [0u8; 8];
        let n = eps[1]
            .recv_into(Rank(0), tag, &mut buf, deadline())
            .await
            .expect("the message after a too long one");
        assert_eq!(&buf[..n], b"next", "after a too long message");
    }
}

/// `recv_into` and `recv` for one source and tag are matched in call order, whether the
/// messages are already there or come while they wait.
pub async fn recv_into_and_recv_share_one_order(eps: Endpoints) {
    let tag = Tag::user(300);
    let lens = [5usize, 200_000, 0, 70_000, 1 << 20, 33];
    let msgs: Vec<Vec<u8>> = lens
        .iter()
        .enumerate()
        .map(|(i, &len)| payload(50 + i as u32, len))
        .collect();
    for waiting in [true, false] {
        if !waiting {
            for m in &msgs {
                eps[0]
                    .send(Rank(1), tag, m, deadline())
                    .await
                    .expect("send");
            }
        }
        let b = Arc::clone(&eps[1]);
        let receiver = tokio::spawn(async move {
            let mut bufs: Vec<Vec<u8>> = lens.iter().map(|&l| vec![0u8; l + 1]).collect();
            // Even positions receive into a buffer, odd ones with `recv`; all are called (and
            // so registered) in order before any is awaited.
            let mut into = Vec::new();
            let mut plain = Vec::new();
            for (i, buf) in bufs.iter_mut().enumerate() {
                if i % 2 == 0 {
                    into.push(b.recv_into(Rank(0), tag, buf, deadline()));
                } else {
                    plain.push(b.recv(Rank(0), tag, deadline()));
                }
            }
            let (into, plain) = tokio::join!(
                futures::future::join_all(into),
                futures::future::join_all(plain)
            );
            let into: Vec<usize> = into.into_iter().map(|r| r.expect("recv_into")).collect();
            let plain: Vec<Vec<u8>> = plain.into_iter().map(|r| r.expect("recv")).collect();
            (into, plain, bufs)
        });
        if waiting {
            tokio::time::sleep(Duration::from_millis(20)).await;
            for m in &msgs {
                eps[0]
                    .send(Rank(1), tag, m, deadline())
                    .await
                    .expect("send");
            }
        }
        let (into, plain, bufs) = receiver.await.expect("receiver task");
        for (i, m) in msgs.iter().enumerate() {
            let got: &[u8] = if i % 2 == 0 {
                assert_eq!(into[i / 2], m.len(), "mixed order: message {i} length");
                &bufs[i][..m.len()]
            } else {
                &plain[i / 2]
            };
            assert!(
                got == &m[..],
                "mixed order (receivers waiting: {waiting}): message {i} went elsewhere"
            );
        }
    }
}
