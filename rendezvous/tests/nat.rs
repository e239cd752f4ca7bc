//! NAT traversal over real sockets on 127.0.0.1: the relay carries a whole TCP channel (the
//! channel conformance suite runs over it), the channel falls back to it on its own within a
//! second, peer loss and back-pressure go through it, and the server keeps jobs apart and
//! survives floods of half-open connections and garbage.
//!
//! Loopback cannot show hole punching reliably (a SYN to a port nobody connects from is answered
//! with a reset at once, so two simultaneous opens meet only by luck); that is what the
//! network-namespace matrix in `cli/tests/nat.rs` is for.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use fmi_channels::tcp::nat::{NatConfig, PathKind};
use fmi_channels::tcp::{TcpChannel, TcpConfig};
use fmi_channels::{conformance, Channel, Error as ChannelError, Rank, Tag};
use fmi_rendezvous::wire::{ClientMsg, RefuseReason, ServerMsg};
use fmi_rendezvous::{
    join, Endpoint, Instant, JobId, Registration, Server, ServerConfig, ServerHandle, Session,
    Token,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const TOKEN: &str = "nat-secret";

fn loopback() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

fn in_secs(s: u64) -> Instant {
    Instant::now() + Duration::from_secs(s)
}

async fn start_server() -> ServerHandle {
    let mut config = ServerConfig::default();
    config.read_timeout = Duration::from_millis(500);
    config.relay_timeout = Duration::from_secs(3);
    Server::bind(loopback(), config).await.unwrap().spawn()
}

fn unique_job(what: &str) -> JobId {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    JobId::new(format!("{what}-{}", NEXT.fetch_add(1, Ordering::Relaxed))).unwrap()
}

/// How the ranks of a test world announce themselves.
#[derive(Clone, Copy)]
enum Announce {
    /// Their real listeners: direct dials work.
    Listeners,
    /// A closed port: direct dials are refused, so pairs must punch or relay.
    Nowhere,
}

/// `n` ranks that join `server` (attached sessions) and start TCP channels with traversal.
async fn world(
    server: SocketAddr,
    job: JobId,
    n: u32,
    announce: Announce,
    tcp: TcpConfig,
) -> Vec<TcpChannel> {
    // A port nothing listens on: bind, note, close.
    let closed = {
        let l = std::net::TcpListener::bind(loopback()).unwrap();
        l.local_addr().unwrap()
    };
    let mut joins = Vec::new();
    for rank in 0..n {
        let binding = TcpChannel::bind(loopback()).await.unwrap();
        let announced = match announce {
            Announce::Listeners => binding.local_addr(),
            Announce::Nowhere => closed,
        };
        let req = Registration {
            job: job.clone(),
            rank,
            size: n,
            endpoints: vec![Endpoint::from(announced)],
            token: Token::new(TOKEN).unwrap(),
        };
        joins.push(tokio::spawn(async move {
            let joined = join(server, req, in_secs(10)).await.unwrap();
            (binding, joined)
        }));
    }
    let mut channels = Vec::new();
    for (rank, j) in (0u32..).zip(joins) {
        let (binding, joined) = j.await.unwrap();
        let session: Session = joined.session.expect("the server does NAT traversal");
        let peers: Vec<SocketAddr> = joined
            .table
            .iter()
            .map(|(_, eps)| fmi_rendezvous::parse_endpoint(eps[0].as_str()).unwrap())
            .collect();
        let ch = TcpChannel::start_with_traversal(
            binding,
            job.clone(),
            Rank(rank),
            peers,
            tcp.clone(),
            session.into_traversal(),
        )
        .unwrap();
        channels.push(ch);
    }
    channels
}

fn relay_only() -> TcpConfig {
    TcpConfig {
        nat: NatConfig {
            direct: false,
            punch: false,
            ..NatConfig::default()
        },
        ..TcpConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_conformance_suite_passes_over_the_relay() {
    let server = start_server().await;
    let addr = server.local_addr();
    conformance::run_all(|n| async move {
        let chans = world(addr, unique_job("conf"), n, Announce::Nowhere, relay_only()).await;
        Ok(chans
            .into_iter()
            .map(|c| Arc::new(c) as Arc<dyn Channel>)
            .collect())
    })
    .await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_pairs_fall_back_to_the_relay_within_a_second_and_reachable_ones_do_not() {
    let server = start_server().await;
    let addr = server.local_addr();

    // Nobody's listener is reachable and punching is off (on loopback two simultaneous opens
    // started together do sometimes meet): the relay must be chosen.
    let no_punch = TcpConfig {
        nat: NatConfig {
            punch: false,
            ..NatConfig::default()
        },
        ..TcpConfig::default()
    };
    let chans = world(addr, unique_job("fallback"), 3, Announce::Nowhere, no_punch).await;
    let started = std::time::Instant::now();
    chans[0]
        .send(Rank(2), Tag::user(1), b"via relay", in_secs(10))
        .await
        .unwrap();
    let took = started.elapsed();
    assert_eq!(
        chans[2]
            .recv(Rank(0), Tag::user(1), in_secs(10))
            .await
            .unwrap(),
        b"via relay"
    );
    let decide = NatConfig::default().relay_after;
    assert!(
        took >= decide,
        "relayed before the direct paths had their chance: {took:?}"
    );
    assert!(
        took < decide + Duration::from_millis(700),
        "the relay took too long to take over: {took:?}"
    );
    assert_eq!(chans[0].paths(), vec![(Rank(2), PathKind::Relayed)]);
    assert_eq!(chans[2].paths(), vec![(Rank(0), PathKind::Relayed)]);
    let counters = chans[0].counters();
    assert!(counters.contains(&("paths_relayed", 1)), "{counters:?}");
    // One socket per pair once settled: no punch or dial attempt is left behind.
    let settled = wait_for(Duration::from_secs(5), || {
        chans[0].open_connections() == 1 && chans[2].open_connections() == 1
    })
    .await;
    assert!(
        settled,
        "sockets left: {} and {}",
        chans[0].open_connections(),
        chans[2].open_connections()
    );
    for c in chans {
        c.close().await;
    }

    // Reachable listeners: the direct dial wins at once, the relay is never used.
    let chans = world(
        addr,
        unique_job("direct"),
        2,
        Announce::Listeners,
        TcpConfig::default(),
    )
    .await;
    let started = std::time::Instant::now();
    chans[1]
        .send(Rank(0), Tag::user(1), b"direct", in_secs(10))
        .await
        .unwrap();
    assert!(started.elapsed() < Duration::from_millis(500));
    assert_eq!(chans[1].paths(), vec![(Rank(0), PathKind::Direct)]);
    assert_eq!(
        chans[0]
            .recv(Rank(1), Tag::user(1), in_secs(10))
            .await
            .unwrap(),
        b"direct"
    );
    for c in chans {
        c.close().await;
    }
    server.shutdown().await;
}

/// Polls `cond` every 10 ms for at most `limit`.
async fn wait_for(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + limit;
    while Instant::now() < end {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    cond()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_lost_behind_the_relay_is_reported_as_lost() {
    let server = start_server().await;
    let mut chans = world(
        server.local_addr(),
        unique_job("loss"),
        2,
        Announce::Nowhere,
        relay_only(),
    )
    .await;
    chans[0]
        .send(Rank(1), Tag::user(1), b"hi", in_secs(10))
        .await
        .unwrap();
    assert_eq!(
        chans[1]
            .recv(Rank(0), Tag::user(1), in_secs(10))
            .await
            .unwrap(),
        b"hi"
    );
    let gone = chans.pop().unwrap();
    drop(gone);
    let r = chans[0].recv(Rank(1), Tag::user(2), in_secs(10)).await;
    assert!(
        matches!(r, Err(ChannelError::PeerLost { peer: Rank(1), .. })),
        "{r:?}"
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_that_does_not_receive_back_pressures_the_sender_through_the_relay() {
    let server = start_server().await;
    let tcp = TcpConfig {
        unexpected_bound: 1 << 20,
        ..relay_only()
    };
    let chans = world(
        server.local_addr(),
        unique_job("bp"),
        2,
        Announce::Nowhere,
        tcp,
    )
    .await;
    let msg = vec![7u8; 1 << 20];
    let mut sent = 0u32;
    let mut stalled = false;
    // At most 256 MiB are offered; kernel buffers, the relay's buffers and the receiver's bound
    // together hold far less, so a send must stall well before.
    for i in 0..256u32 {
        let r = chans[0]
            .send(
                Rank(1),
                Tag::user(i),
                &msg,
                Instant::now() + Duration::from_millis(500),
            )
            .await;
        match r {
            Ok(()) => sent += 1,
            Err(ChannelError::Timeout { .. }) => {
                stalled = true;
                break;
            }
            Err(e) => panic!("unexpected error: {e}"),
        }
    }
    assert!(
        stalled,
        "all {sent} MiB were taken without anyone receiving"
    );
    assert!(
        sent < 200,
        "{sent} MiB buffered somewhere between sender and receiver"
    );
    // What was sent in full arrives in order once the receiver takes it.
    for i in 0..sent {
        let m = chans[1]
            .recv(Rank(0), Tag::user(i), in_secs(10))
            .await
            .unwrap();
        assert_eq!(m.len(), msg.len(), "message {i}");
    }
    server.shutdown().await;
}

// ---- raw protocol: isolation and bad input ----

async fn write_msg(stream: &mut TcpStream, msg: &ClientMsg) {
    let mut frame = Vec::new();
    msg.encode(&mut frame).unwrap();
    stream.write_all(&frame).await.unwrap();
}

async fn read_msg(stream: &mut TcpStream) -> Option<ServerMsg> {
    let mut prefix = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut prefix))
        .await
        .expect("the server answers in time")
        .ok()?;
    let mut frame = prefix.to_vec();
    frame.resize(4 + u32::from_be_bytes(prefix) as usize, 0);
    stream.read_exact(&mut frame[4..]).await.ok()?;
    Some(ServerMsg::decode(&frame).unwrap())
}

/// Registers and holds `rank` of `job` over a raw connection; returns it after the table.
async fn attach(server: SocketAddr, job: &str, rank: u32, size: u32, token: &str) -> TcpStream {
    let mut s = TcpStream::connect(server).await.unwrap();
    write_msg(
        &mut s,
        &ClientMsg::Register {
            job: JobId::new(job).unwrap(),
            rank,
            size,
            endpoints: vec![Endpoint::new(format!("{job}.{rank}:1")).unwrap()],
            token: Token::new(token).unwrap(),
        },
    )
    .await;
    write_msg(&mut s, &ClientMsg::Hold).await;
    s
}

async fn read_table(s: &mut TcpStream) {
    loop {
        match read_msg(s).await {
            Some(ServerMsg::Peers { .. }) => return,
            Some(ServerMsg::Missing { .. }) => continue,
            other => panic!("expected the peer table, got {other:?}"),
        }
    }
}

fn relay_msg(job: &str, from: u32, to: u32, token: &str) -> ClientMsg {
    ClientMsg::Relay {
        job: JobId::new(job).unwrap(),
        from,
        to,
        token: Token::new(token).unwrap(),
    }
}

async fn refusal(server: SocketAddr, msg: ClientMsg) -> Option<RefuseReason> {
    let mut s = TcpStream::connect(server).await.unwrap();
    write_msg(&mut s, &msg).await;
    match read_msg(&mut s).await {
        Some(ServerMsg::Refused { reason }) => Some(reason),
        _ => None,
    }
}

#[tokio::test]
async fn the_relay_serves_only_attached_ranks_of_the_job_with_its_token() {
    let server = start_server().await;
    let addr = server.local_addr();
    let mut a0 = attach(addr, "iso-a", 0, 2, TOKEN).await;
    let mut a1 = attach(addr, "iso-a", 1, 2, TOKEN).await;
    read_table(&mut a0).await;
    read_table(&mut a1).await;
    let mut b0 = attach(addr, "iso-b", 0, 2, "b-secret").await;
    let mut b1 = attach(addr, "iso-b", 1, 2, "b-secret").await;
    read_table(&mut b0).await;
    read_table(&mut b1).await;
    // Gathering but incomplete: not yet relayable.
    let _c0 = attach(addr, "iso-c", 0, 2, TOKEN).await;

    // Wrong token, another job's token, unknown job, incomplete job, bad ranks.
    assert_eq!(
        refusal(addr, relay_msg("iso-a", 0, 1, "guess")).await,
        Some(RefuseReason::BadToken)
    );
    assert_eq!(
        refusal(addr, relay_msg("iso-a", 0, 1, "b-secret")).await,
        Some(RefuseReason::BadToken)
    );
    assert_eq!(
        refusal(addr, relay_msg("iso-nope", 0, 1, TOKEN)).await,
        Some(RefuseReason::UnknownJob)
    );
    assert_eq!(
        refusal(addr, relay_msg("iso-c", 0, 1, TOKEN)).await,
        Some(RefuseReason::UnknownJob)
    );
    for (from, to) in [(0, 0), (0, 2), (5, 1)] {
        assert_eq!(
            refusal(addr, relay_msg("iso-a", from, to, TOKEN)).await,
            Some(RefuseReason::NotAttached),
            "{from} -> {to}"
        );
    }
    // A Connect naming a rank outside the job, or sent unregistered, is refused too.
    let mut stray = TcpStream::connect(addr).await.unwrap();
    write_msg(&mut stray, &ClientMsg::Connect { peer: 1 }).await;
    assert!(matches!(
        read_msg(&mut stray).await,
        Some(ServerMsg::Refused {
            reason: RefuseReason::UnexpectedMessage
        })
    ));

    // Job b's ranks relay between themselves; job a's rank 0 meanwhile waits for rank 1 of
    // its own job and is never spliced with job b's connections.
    let mut a0_relay = TcpStream::connect(addr).await.unwrap();
    write_msg(&mut a0_relay, &relay_msg("iso-a", 0, 1, TOKEN)).await;
    assert_eq!(
        read_msg(&mut a1).await,
        Some(ServerMsg::RelayOffer { peer: 0 })
    );
    let mut b0_relay = TcpStream::connect(addr).await.unwrap();
    write_msg(&mut b0_relay, &relay_msg("iso-b", 0, 1, "b-secret")).await;
    let mut b1_relay = TcpStream::connect(addr).await.unwrap();
    write_msg(&mut b1_relay, &relay_msg("iso-b", 1, 0, "b-secret")).await;
    assert_eq!(
        read_msg(&mut b0_relay).await,
        Some(ServerMsg::Relayed { peer: 1 })
    );
    assert_eq!(
        read_msg(&mut b1_relay).await,
        Some(ServerMsg::Relayed { peer: 0 })
    );
    b0_relay.write_all(b"only for b1").await.unwrap();
    let mut got = [0u8; 11];
    b1_relay.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"only for b1");
    // Job a's waiting connection saw nothing of it.
    let mut peek = [0u8; 1];
    let r = tokio::time::timeout(Duration::from_millis(200), a0_relay.read(&mut peek)).await;
    assert!(r.is_err(), "job a's relay connection received {r:?}");
    // And it is refused once its peer has not come in time.
    assert_eq!(
        read_msg(&mut a0_relay)
            .await
            .or(read_msg(&mut a0_relay).await),
        Some(ServerMsg::Refused {
            reason: RefuseReason::RelayTimeout
        })
    );
    server.shutdown().await;
}

#[tokio::test]
async fn connect_tells_both_ranks_to_punch_with_what_the_server_observed() {
    let server = start_server().await;
    let addr = server.local_addr();
    let mut r0 = attach(addr, "punch", 0, 3, TOKEN).await;
    let mut r1 = attach(addr, "punch", 1, 3, TOKEN).await;
    // Rank 2 registers without holding: it takes no part in traversal.
    let mut r2 = TcpStream::connect(addr).await.unwrap();
    write_msg(
        &mut r2,
        &ClientMsg::Register {
            job: JobId::new("punch").unwrap(),
            rank: 2,
            size: 3,
            endpoints: vec![Endpoint::new("punch.2:1").unwrap()],
            token: Token::new(TOKEN).unwrap(),
        },
    )
    .await;
    for s in [&mut r0, &mut r1, &mut r2] {
        read_table(s).await;
    }
    write_msg(&mut r0, &ClientMsg::Connect { peer: 1 }).await;
    let to0 = read_msg(&mut r0).await.unwrap();
    let to1 = read_msg(&mut r1).await.unwrap();
    match (to0, to1) {
        (
            ServerMsg::Punch {
                peer: 1,
                public: Some(p1),
                private: e1,
                ..
            },
            ServerMsg::Punch {
                peer: 0,
                public: Some(p0),
                private: e0,
                ..
            },
        ) => {
            assert_eq!(p1, r1.local_addr().unwrap(), "rank 1 as observed");
            assert_eq!(p0, r0.local_addr().unwrap(), "rank 0 as observed");
            assert_eq!(e1, vec![Endpoint::new("punch.1:1").unwrap()]);
            assert_eq!(e0, vec![Endpoint::new("punch.0:1").unwrap()]);
        }
        other => panic!("expected two punches, got {other:?}"),
    }
    write_msg(&mut r0, &ClientMsg::Connect { peer: 2 }).await;
    assert_eq!(read_msg(&mut r0).await, Some(ServerMsg::NoPeer { peer: 2 }));
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn floods_of_half_open_connections_and_garbage_do_not_stop_other_jobs() {
    let mut config = ServerConfig::default();
    config.read_timeout = Duration::from_millis(500);
    config.max_connections = 256;
    let server = Server::bind(loopback(), config).await.unwrap().spawn();
    let addr = server.local_addr();

    // 150 connections that never send a byte, 40 that send half a frame, 40 that send garbage.
    let mut silent = Vec::new();
    for _ in 0..150 {
        silent.push(TcpStream::connect(addr).await.unwrap());
    }
    let mut half = Vec::new();
    for _ in 0..40 {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(&[0, 0, 0, 40, 1, 1, 3]).await.unwrap();
        half.push(s);
    }
    let mut garbage = Vec::new();
    for i in 0..40u8 {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let junk: Vec<u8> = (0..64).map(|j| j ^ i.wrapping_mul(31)).collect();
        let _ = s.write_all(&junk).await;
        garbage.push(s);
    }

    // A job still completes, relays, and carries messages meanwhile (its ranks retry while the
    // server is at its connection limit, until the flood times out).
    let started = std::time::Instant::now();
    let chans = world(
        addr,
        unique_job("flood"),
        2,
        Announce::Nowhere,
        relay_only(),
    )
    .await;
    chans[0]
        .send(Rank(1), Tag::user(1), b"through", in_secs(10))
        .await
        .unwrap();
    assert_eq!(
        chans[1]
            .recv(Rank(0), Tag::user(1), in_secs(10))
            .await
            .unwrap(),
        b"through"
    );
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "took {:?}",
        started.elapsed()
    );

    // Every flooding connection is closed by the server within its read timeout.
    for s in silent.iter_mut().chain(&mut half).chain(&mut garbage) {
        let mut buf = [0u8; 256];
        let closed = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await;
        assert!(closed.is_ok(), "a flooding connection was left open");
    }
    for c in chans {
        c.close().await;
    }
    server.shutdown().await;
}
