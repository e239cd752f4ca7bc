//! Failure propagation over the direct TCP channel, on real loopback sockets: a rank that fails
//! because a peer died tells the others with an abort frame (`Channel::abort`, called for every
//! failed operation by `AbortOnFailure`), so that every survivor's error names the dead rank.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{in_secs, job};
use fmi_channels::tcp::{local_world, TcpConfig};
use fmi_channels::{AbortOnFailure, Channel, Error, Rank, Tag};

/// `n` ranks over loopback, each behind `AbortOnFailure` (as `fmi::Communicator` uses them).
async fn world(name: &str, n: u32) -> Vec<Arc<AbortOnFailure>> {
    local_world(job(name), n, TcpConfig::default())
        .await
        .expect("world")
        .into_iter()
        .map(|ch| Arc::new(AbortOnFailure::new(Arc::new(ch))))
        .collect()
}

/// Sends one message `from` → `to` and receives it, which connects the pair.
async fn connect(eps: &[Arc<AbortOnFailure>], from: usize, to: usize) {
    eps[from]
        .send(Rank(to as u32), Tag::user(9), b"hi", in_secs(10))
        .await
        .expect("warm-up send");
    eps[to]
        .recv(Rank(from as u32), Tag::user(9), in_secs(10))
        .await
        .expect("warm-up recv");
}

/// Waits for `r`, failing the test if that takes 5 s (the receives' deadlines are 60 s, so
/// only propagation can end them in time).
async fn promptly<T: Send + 'static>(r: tokio::task::JoinHandle<T>) -> T {
    tokio::time::timeout(Duration::from_secs(5), r)
        .await
        .expect("the error comes promptly, not at the deadline")
        .expect("task")
}

fn names(r: &Result<Vec<u8>, Error>, me: u32, peer: u32, via: Option<u32>) -> bool {
    matches!(r, Err(Error::PeerLost { me: m, peer: p, via: v, .. })
        if m.0 == me && p.0 == peer && *v == via.map(Rank))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_of_waits_names_the_dead_rank_at_its_far_end() {
    // 0 - 1 - 2: rank 2 is connected to rank 1 only, and waits for it; rank 1 waits for 0.
    let mut eps = world("abort-chain", 3).await;
    connect(&eps, 0, 1).await;
    connect(&eps, 1, 2).await;
    let waits_for_0 = {
        let ep = Arc::clone(&eps[1]);
        tokio::spawn(async move { ep.recv(Rank(0), Tag::user(1), in_secs(60)).await })
    };
    let waits_for_1 = {
        let ep = Arc::clone(&eps[2]);
        tokio::spawn(async move { ep.recv(Rank(1), Tag::user(1), in_secs(60)).await })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    drop(eps.remove(0)); // rank 0 dies
    let r1 = promptly(waits_for_0).await;
    assert!(names(&r1, 1, 0, None), "rank 1 saw it itself: {r1:?}");
    let r2 = promptly(waits_for_1).await;
    assert!(
        names(&r2, 2, 0, Some(1)),
        "rank 2 names rank 0, as rank 1 reported, not rank 1: {r2:?}"
    );
    let text = r2.unwrap_err().to_string();
    assert!(
        text.contains("lost rank 0 on the tcp channel (reported by rank 1)"),
        "{text}"
    );
    // The job is revoked: later operations fail at once, naming rank 0, whoever they concern.
    let (ep1, ep2) = (&eps[0], &eps[1]);
    let r = ep2.recv(Rank(1), Tag::user(2), in_secs(60)).await;
    assert!(names(&r, 2, 0, Some(1)), "{r:?}");
    let r = ep1.recv(Rank(2), Tag::user(2), in_secs(60)).await;
    assert!(names(&r, 1, 0, None), "{r:?}");
    let s = ep2.send(Rank(1), Tag::user(2), b"x", in_secs(60)).await;
    assert!(
        matches!(
            s,
            Err(Error::PeerLost {
                peer: Rank(0),
                via: Some(Rank(1)),
                ..
            })
        ),
        "{s:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rank_that_sees_a_death_tells_peers_it_never_talked_to() {
    // Rank 2 has no connection at all; it waits for a message from rank 1.
    let mut eps = world("abort-dial", 3).await;
    connect(&eps, 0, 1).await;
    let waits_for_0 = {
        let ep = Arc::clone(&eps[1]);
        tokio::spawn(async move { ep.recv(Rank(0), Tag::user(1), in_secs(60)).await })
    };
    let waits_for_1 = {
        let ep = Arc::clone(&eps[2]);
        tokio::spawn(async move { ep.recv(Rank(1), Tag::user(1), in_secs(60)).await })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    drop(eps.remove(0));
    let r1 = promptly(waits_for_0).await;
    assert!(names(&r1, 1, 0, None), "{r1:?}");
    let r2 = promptly(waits_for_1).await;
    assert!(names(&r2, 2, 0, Some(1)), "{r2:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_wrapper_a_loss_stays_between_the_pair() {
    // The channel itself only propagates when asked (`Channel::abort`): a raw endpoint that
    // loses a peer carries on with the others.
    let mut eps = local_world(job("abort-raw"), 3, TcpConfig::default())
        .await
        .expect("world");
    for (a, b) in [(0u32, 1u32), (1, 2)] {
        eps[a as usize]
            .send(Rank(b), Tag::user(9), b"hi", in_secs(10))
            .await
            .expect("send");
        eps[b as usize]
            .recv(Rank(a), Tag::user(9), in_secs(10))
            .await
            .expect("recv");
    }
    drop(eps.remove(0));
    let r = eps[0].recv(Rank(0), Tag::user(1), in_secs(60)).await;
    assert!(
        matches!(
            r,
            Err(Error::PeerLost {
                peer: Rank(0),
                via: None,
                ..
            })
        ),
        "{r:?}"
    );
    eps[1]
        .send(Rank(1), Tag::user(3), b"still here", in_secs(10))
        .await
        .expect("2 -> 1 after the loss");
    let m = eps[0]
        .recv(Rank(2), Tag::user(3), in_secs(10))
        .await
        .expect("1 <- 2 after the loss");
    assert_eq!(m, b"still here");
}
