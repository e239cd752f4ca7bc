//! The direct channel over QUIC on loopback: conformance, the simultaneous-dial rule, peer loss
//! with delivery of what was sent before, and refusal of a peer whose certificate is not the
//! pinned one or whose token is wrong (a typed error at once, not a hang).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::{eventually, in_secs, job, loopback};
use fmi_channels::tcp::quic::{QuicBinding, QuicPeer};
use fmi_channels::tcp::{local_world_quic, JobToken, QuicSetup, TcpChannel, TcpConfig};
use fmi_channels::{conformance, Channel, Error, PathKind, Rank, Tag};
use tokio::time::Instant;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quic_channel_passes_conformance() {
    conformance::run_all(|n| async move {
        Ok(
            local_world_quic(job("conformance"), n, TcpConfig::default())
                .await?
                .into_iter()
                .map(|c| Arc::new(c) as Arc<dyn Channel>)
                .collect(),
        )
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pairs_run_over_quic_and_simultaneous_first_sends_lose_nothing() {
    for round in 0..5u32 {
        let eps: Vec<Arc<TcpChannel>> = local_world_quic(job("race"), 2, TcpConfig::default())
            .await
            .expect("world")
            .into_iter()
            .map(Arc::new)
            .collect();
        let (a, b) = (Arc::clone(&eps[0]), Arc::clone(&eps[1]));
        let (x, y) = tokio::join!(
            a.send(Rank(1), Tag::user(1), b"from 0", in_secs(10)),
            b.send(Rank(0), Tag::user(1), b"from 1", in_secs(10)),
        );
        x.expect("send 0 -> 1");
        y.expect("send 1 -> 0");
        assert_eq!(
            eps[1]
                .recv(Rank(0), Tag::user(1), in_secs(10))
                .await
                .expect("recv"),
            b"from 0"
        );
        assert_eq!(
            eps[0]
                .recv(Rank(1), Tag::user(1), in_secs(10))
                .await
                .expect("recv"),
            b"from 1"
        );
        for ep in &eps {
            assert_eq!(ep.transport(), "quic");
            assert_eq!(ep.quic_peers().len(), 1, "round {round}");
            assert_eq!(ep.paths().len(), 1, "round {round}");
            assert_eq!(ep.paths()[0].1, PathKind::Direct, "round {round}");
            // The losing dial's connection closes a moment after the race is decided: its
            // acceptor waits (up to 1 s) for the dialer to read the refusal before it lets go.
            let one = eventually(Duration::from_secs(5), || ep.open_connections() == 1).await;
            assert!(
                one,
                "round {round}: one connection per pair, have {}",
                ep.open_connections()
            );
            let counters = ep.counters();
            assert!(counters.contains(&("paths_quic", 1)), "{counters:?}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_was_sent_before_a_drop_arrives_then_the_loss_shows() {
    let mut eps = local_world_quic(job("loss"), 2, TcpConfig::default())
        .await
        .expect("world");
    let big: Vec<u8> = (0..4usize << 20).map(|i| (i % 251) as u8).collect();
    eps[1]
        .send(Rank(0), Tag::user(1), b"hi", in_secs(10))
        .await
        .expect("send");
    eps[1]
        .send(Rank(0), Tag::user(2), &big, in_secs(10))
        .await
        .expect("send big");
    // Dropped right after the send returned: most of `big` is still in QUIC's send buffer.
    let started = Instant::now();
    drop(eps.pop());
    let ep0 = eps.pop().expect("rank 0");
    assert_eq!(
        ep0.recv(Rank(1), Tag::user(1), in_secs(10))
            .await
            .expect("recv"),
        b"hi"
    );
    let got = ep0
        .recv(Rank(1), Tag::user(2), in_secs(10))
        .await
        .expect("the message sent before the drop");
    assert!(got == big, "intact");
    let r = tokio::time::timeout(
        Duration::from_secs(5),
        ep0.recv(Rank(1), Tag::user(3), in_secs(60)),
    )
    .await
    .expect("the loss shows promptly");
    assert!(
        matches!(r, Err(Error::PeerLost { peer: Rank(1), .. })),
        "{r:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
}

/// Starts ranks 0 and 1 over QUIC, with rank 1 told `told_fp` as rank 0's fingerprint (or
/// the true one) and rank 1 holding `token1` while rank 0 holds "right".
async fn pair(told_wrong_fp: bool, token1: &str) -> (TcpChannel, TcpChannel) {
    let tcp = [
        TcpChannel::bind(loopback()).await.expect("bind"),
        TcpChannel::bind(loopback()).await.expect("bind"),
    ];
    let quic = [
        QuicBinding::bind(loopback()).expect("bind udp"),
        QuicBinding::bind(loopback()).expect("bind udp"),
    ];
    let addrs: Vec<SocketAddr> = tcp.iter().map(|b| b.local_addr()).collect();
    let table: Vec<QuicPeer> = quic
        .iter()
        .map(|q| QuicPeer {
            addrs: vec![q.local_addr()],
            fingerprint: q.fingerprint(),
        })
        .collect();
    let mut table1 = table.clone();
    if told_wrong_fp {
        // A stranger's certificate: what rank 1 pins for rank 0 is not what rank 0 presents.
        let stranger = QuicBinding::bind(loopback()).expect("bind udp");
        table1[0].fingerprint = stranger.fingerprint();
    }
    let [t0, t1] = tcp;
    let [q0, q1] = quic;
    let config = |token: &str| TcpConfig {
        token: JobToken::new(token),
        handshake_timeout: Duration::from_secs(3),
        ..TcpConfig::default()
    };
    let a = TcpChannel::start_quic(
        t0,
        QuicSetup {
            binding: q0,
            peers: table,
        },
        job("pin"),
        Rank(0),
        addrs.clone(),
        config("right"),
        None,
    )
    .expect("start 0");
    let b = TcpChannel::start_quic(
        t1,
        QuicSetup {
            binding: q1,
            peers: table1,
        },
        job("pin"),
        Rank(1),
        addrs,
        config(token1),
        None,
    )
    .expect("start 1");
    (a, b)
}

fn refused(r: &fmi_channels::Result<()>) -> bool {
    matches!(r, Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::ConnectionRefused)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_with_another_certificate_is_refused_at_once() {
    let (a, b) = pair(true, "right").await;
    let started = Instant::now();
    // Rank 1 dials rank 0 and rejects its certificate.
    let r = b.send(Rank(0), Tag::user(1), b"x", in_secs(20)).await;
    assert!(refused(&r), "{r:?}");
    // Rank 0 dials rank 1, which pins a stranger for rank 0: rank 1 rejects rank 0's
    // certificate as a client certificate too (mutual TLS).
    let r = a.send(Rank(1), Tag::user(1), b"x", in_secs(20)).await;
    assert!(refused(&r), "{r:?}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "refused at once, not at the deadline: {:?}",
        started.elapsed()
    );
    assert!(a.paths().is_empty() && b.paths().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_with_the_right_certificate_but_a_wrong_token_is_refused() {
    let (a, b) = pair(false, "wrong").await;
    let r = b.send(Rank(0), Tag::user(1), b"x", in_secs(20)).await;
    assert!(refused(&r), "{r:?}");
    let text = format!("{r:?}");
    assert!(!text.contains("right") && !text.contains("wrong"), "{text}");
    let r = a.send(Rank(1), Tag::user(1), b"x", in_secs(20)).await;
    assert!(refused(&r), "{r:?}");
    assert!(a.paths().is_empty() && b.paths().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_right_pair_connects() {
    let (a, b) = pair(false, "right").await;
    a.send(Rank(1), Tag::user(1), b"x", in_secs(10))
        .await
        .expect("send");
    assert_eq!(
        b.recv(Rank(0), Tag::user(1), in_secs(10))
            .await
            .expect("recv"),
        b"x"
    );
    assert_eq!(a.quic_peers(), [Rank(1)]);
}

/// Closing waits until the peer has read what was sent, or is closing too: two ranks closing
/// at once do not wait for each other's linger timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ranks_closing_together_do_not_wait_for_each_other() {
    let mut eps = local_world_quic(job("together"), 2, TcpConfig::default())
        .await
        .expect("world");
    let (b, a) = (eps.pop().expect("rank 1"), eps.pop().expect("rank 0"));
    a.send(Rank(1), Tag::user(1), b"x", in_secs(10))
        .await
        .expect("send");
    b.send(Rank(0), Tag::user(1), b"y", in_secs(10))
        .await
        .expect("send");
    assert_eq!(
        b.recv(Rank(0), Tag::user(1), in_secs(10))
            .await
            .expect("recv"),
        b"x"
    );
    assert_eq!(
        a.recv(Rank(1), Tag::user(1), in_secs(10))
            .await
            .expect("recv"),
        b"y"
    );
    let started = Instant::now();
    tokio::join!(a.close(), b.close());
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "closing took {:?} (the linger bound is 2 s)",
        started.elapsed()
    );
}
