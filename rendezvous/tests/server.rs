//! The rendezvous server and client over real sockets on 127.0.0.1.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::Duration;

use fmi_rendezvous::wire::{ClientMsg, ServerMsg, MAX_FRAME_LEN};
use fmi_rendezvous::{
    register, Endpoint, Error, Instant, JobId, PeerTable, RefuseReason, Registration, Server,
    ServerConfig, ServerHandle, Token,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

const TOKEN: &str = "job-secret-7f3a";

fn loopback() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

fn config() -> ServerConfig {
    let mut config = ServerConfig::default();
    config.read_timeout = Duration::from_millis(300);
    config.write_timeout = Duration::from_secs(2);
    config
}

async fn start(config: ServerConfig) -> ServerHandle {
    Server::bind(loopback(), config).await.unwrap().spawn()
}

fn endpoint_of(job: &str, rank: u32) -> Endpoint {
    Endpoint::new(format!("tcp://{job}.rank{rank}:4000")).unwrap()
}

fn registration(job: &str, rank: u32, size: u32, token: &str) -> Registration {
    Registration {
        job: JobId::new(job).unwrap(),
        rank,
        size,
        endpoints: vec![endpoint_of(job, rank)],
        token: Token::new(token).unwrap(),
    }
}

fn in_secs(secs: f64) -> Instant {
    Instant::now() + Duration::from_secs_f64(secs)
}

fn spawn_rank(
    addr: SocketAddr,
    req: Registration,
    deadline: Instant,
) -> JoinHandle<Result<PeerTable, Error>> {
    tokio::spawn(register(addr, req, deadline))
}

fn assert_table(table: &PeerTable, job: &str, size: u32) {
    assert_eq!(table.job().as_str(), job);
    assert_eq!(table.size(), size);
    for (rank, endpoints) in table.iter() {
        assert_eq!(endpoints, [endpoint_of(job, rank)]);
    }
}

/// Registers over a raw connection and returns it with the server's first answer, so a test
/// knows the rank is held before it goes on.
async fn hold_rank(addr: SocketAddr, msg: ClientMsg) -> (TcpStream, ServerMsg) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let mut frame = Vec::new();
    msg.encode(&mut frame).unwrap();
    stream.write_all(&frame).await.unwrap();
    let reply = read_frame(&mut stream).await.unwrap();
    (stream, reply)
}

async fn read_frame(stream: &mut TcpStream) -> Option<ServerMsg> {
    let mut prefix = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut prefix))
        .await
        .unwrap()
        .ok()?;
    let mut frame = prefix.to_vec();
    frame.resize(4 + u32::from_be_bytes(prefix) as usize, 0);
    stream.read_exact(&mut frame[4..]).await.ok()?;
    Some(ServerMsg::decode(&frame).unwrap())
}

fn raw_register(job: &str, rank: u32, size: u32, token: &str) -> ClientMsg {
    ClientMsg::Register {
        job: JobId::new(job).unwrap(),
        rank,
        size,
        endpoints: vec![endpoint_of(job, rank)],
        token: Token::new(token).unwrap(),
    }
}

/// Reads until the server closes the connection (bounded), returning what it sent.
async fn read_until_closed(stream: &mut TcpStream) -> Vec<ServerMsg> {
    let mut bytes = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut bytes)).await;
    assert!(read.is_ok(), "the server did not close the connection");
    let mut msgs = Vec::new();
    let mut rest = &bytes[..];
    while rest.len() >= 4 {
        let len = 4 + u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        msgs.push(ServerMsg::decode(&rest[..len]).unwrap());
        rest = &rest[len..];
    }
    msgs
}

#[tokio::test]
async fn ranks_registering_concurrently_get_the_same_table() {
    let server = start(config()).await;
    for size in [1u32, 2, 5] {
        let job = format!("concurrent-{size}");
        let ranks: Vec<_> = (0..size)
            .map(|rank| {
                spawn_rank(
                    server.local_addr(),
                    registration(&job, rank, size, TOKEN),
                    in_secs(10.0),
                )
            })
            .collect();
        let mut tables = Vec::new();
        for rank in ranks {
            tables.push(rank.await.unwrap().unwrap());
        }
        assert_table(&tables[0], &job, size);
        assert!(tables.iter().all(|t| *t == tables[0]));
    }
    server.shutdown().await;
}

#[tokio::test]
async fn two_jobs_with_the_same_ranks_get_only_their_own_tables() {
    let server = start(config()).await;
    let addr = server.local_addr();
    let mut ranks = Vec::new();
    for rank in 0..3 {
        for job in ["left", "right"] {
            let token = format!("{TOKEN}-{job}");
            ranks.push((
                job,
                spawn_rank(addr, registration(job, rank, 3, &token), in_secs(10.0)),
            ));
        }
    }
    for (job, rank) in ranks {
        assert_table(&rank.await.unwrap().unwrap(), job, 3);
    }
    server.shutdown().await;
}

#[tokio::test]
async fn conflicting_registrations_are_refused_with_a_typed_reason() {
    let server = start(config()).await;
    let addr = server.local_addr();
    let (_holder, ack) = hold_rank(addr, raw_register("shared", 0, 3, TOKEN)).await;
    assert_eq!(ack, ServerMsg::Missing { ranks: vec![1, 2] });

    let cases = [
        (
            registration("shared", 0, 3, TOKEN),
            RefuseReason::DuplicateRank { rank: 0 },
        ),
        (
            registration("shared", 1, 4, TOKEN),
            RefuseReason::SizeMismatch {
                expected: 3,
                got: 4,
            },
        ),
        (
            registration("shared", 1, 3, "not-the-token"),
            RefuseReason::BadToken,
        ),
    ];
    for (req, expected) in cases {
        match register(addr, req, in_secs(5.0)).await {
            Err(Error::Refused { reason, .. }) => assert_eq!(reason, expected),
            other => panic!("expected a refusal ({expected}), got {other:?}"),
        }
    }
    // The refusals did not disturb the job: it still completes.
    let rest: Vec<_> = (1..3)
        .map(|rank| spawn_rank(addr, registration("shared", rank, 3, TOKEN), in_secs(10.0)))
        .collect();
    for rank in rest {
        assert_table(&rank.await.unwrap().unwrap(), "shared", 3);
    }
    server.shutdown().await;
}

#[tokio::test]
async fn a_deadline_names_the_missing_ranks() {
    let server = start(config()).await;
    let addr = server.local_addr();
    let started = std::time::Instant::now();
    let waiting: Vec<_> = [0, 2]
        .into_iter()
        .map(|rank| spawn_rank(addr, registration("partial", rank, 4, TOKEN), in_secs(1.0)))
        .collect();
    for rank in waiting {
        match rank.await.unwrap() {
            Err(Error::Timeout {
                job,
                missing,
                waited,
                ..
            }) => {
                assert_eq!(job.as_str(), "partial");
                assert_eq!(missing, vec![1, 3]);
                assert!(waited >= Duration::from_millis(900), "{waited:?}");
            }
            other => panic!("expected a timeout, got {other:?}"),
        }
    }
    let elapsed = started.elapsed();
    assert!(elapsed < Duration::from_secs(3), "{elapsed:?}");
    server.shutdown().await;
}

#[tokio::test]
async fn misbehaving_clients_are_disconnected_while_a_job_completes() {
    let server = start(config()).await;
    let addr = server.local_addr();
    let early: Vec<_> = (0..2)
        .map(|rank| spawn_rank(addr, registration("steady", rank, 3, TOKEN), in_secs(10.0)))
        .collect();

    // A complete frame whose body is nonsense.
    let mut garbage = TcpStream::connect(addr).await.unwrap();
    garbage
        .write_all(&[0, 0, 0, 5, 1, 0x01, 0xff, 0xff, 0xff])
        .await
        .unwrap();
    // A length prefix far beyond the limit (only the prefix: the server must not wait for more).
    let mut oversized = TcpStream::connect(addr).await.unwrap();
    oversized
        .write_all(&[0x7f, 0xff, 0xff, 0xff])
        .await
        .unwrap();
    // Half a length prefix, then silence.
    let connected = std::time::Instant::now();
    let mut stalled = TcpStream::connect(addr).await.unwrap();
    stalled.write_all(&[0, 0]).await.unwrap();
    // Nothing at all.
    let mut mute = TcpStream::connect(addr).await.unwrap();

    let msgs = read_until_closed(&mut garbage).await;
    assert_eq!(
        msgs,
        vec![ServerMsg::Refused {
            reason: RefuseReason::Malformed
        }]
    );
    let msgs = read_until_closed(&mut oversized).await;
    assert_eq!(
        msgs,
        vec![ServerMsg::Refused {
            reason: RefuseReason::TooLarge {
                len: 0x7fff_ffff,
                max: MAX_FRAME_LEN as u32
            }
        }]
    );
    for silent in [&mut stalled, &mut mute] {
        let msgs = read_until_closed(silent).await;
        assert!(msgs.is_empty());
        let waited = connected.elapsed();
        assert!(
            waited >= Duration::from_millis(250),
            "closed too early: {waited:?}"
        );
    }

    let last = spawn_rank(addr, registration("steady", 2, 3, TOKEN), in_secs(10.0));
    for rank in early.into_iter().chain([last]) {
        assert_table(&rank.await.unwrap().unwrap(), "steady", 3);
    }
    server.shutdown().await;
}

/// A free loopback address with nothing listening on it (until a test binds it again).
fn unused_addr() -> SocketAddr {
    let probe = std::net::TcpListener::bind(loopback()).unwrap();
    probe.local_addr().unwrap()
}

#[tokio::test]
async fn clients_wait_for_a_server_that_starts_late() {
    let addr = unused_addr();
    let ranks: Vec<_> = (0..2)
        .map(|rank| spawn_rank(addr, registration("late", rank, 2, TOKEN), in_secs(10.0)))
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let server = Server::bind(addr, config()).await.unwrap().spawn();
    for rank in ranks {
        assert_table(&rank.await.unwrap().unwrap(), "late", 2);
    }
    server.shutdown().await;
}

#[tokio::test]
async fn an_absent_server_is_reported_by_the_deadline() {
    let addr = unused_addr();
    let started = std::time::Instant::now();
    match register(addr, registration("nobody", 0, 2, TOKEN), in_secs(0.5)).await {
        Err(Error::Unreachable {
            server, attempts, ..
        }) => {
            assert_eq!(server, addr);
            assert!(attempts >= 2, "retried only {attempts} times");
        }
        other => panic!("expected unreachable, got {other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(2));
}

fn alive_tasks() -> usize {
    tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks()
}

/// Waits (bounded) until the runtime has `expected` live tasks, returning the last count seen.
async fn settle_tasks(expected: usize) -> usize {
    for _ in 0..100 {
        if alive_tasks() == expected {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    alive_tasks()
}

/// Opens connections in several states: registered and waiting, mid-frame, and idle.
async fn busy_connections(addr: SocketAddr) -> Vec<TcpStream> {
    let (held, _) = hold_rank(addr, raw_register("busy", 0, 2, TOKEN)).await;
    let mut partial = TcpStream::connect(addr).await.unwrap();
    partial.write_all(&[0, 0, 0]).await.unwrap();
    let idle = TcpStream::connect(addr).await.unwrap();
    vec![held, partial, idle]
}

#[tokio::test]
async fn shutdown_leaves_no_task_running() {
    let before = alive_tasks();
    let mut config = config();
    config.read_timeout = Duration::from_secs(60);
    let server = start(config).await;
    let addr = server.local_addr();
    let mut conns = busy_connections(addr).await;
    assert!(
        settle_tasks(before + 4).await >= before + 4,
        "server and 3 connection tasks"
    );
    server.shutdown().await;
    assert_eq!(settle_tasks(before).await, before);
    for conn in &mut conns {
        let msgs = read_until_closed(conn).await;
        assert!(msgs.is_empty());
    }
    assert!(TcpStream::connect(addr).await.is_err());
}

#[tokio::test]
async fn dropping_the_handle_stops_every_task() {
    let before = alive_tasks();
    let mut config = config();
    config.read_timeout = Duration::from_secs(60);
    let server = start(config).await;
    let addr = server.local_addr();
    let mut conns = busy_connections(addr).await;
    assert!(settle_tasks(before + 4).await >= before + 4);
    drop(server);
    assert_eq!(settle_tasks(before).await, before);
    for conn in &mut conns {
        read_until_closed(conn).await;
    }
}

/// The QUIC transport publishes each rank's QUIC addresses and certificate fingerprint as
/// extra endpoint entries (`quic:…`, `cert-sha256:…`, see docs/nat.md): the server passes them
/// through unchanged, in order, to the ranks of the same job only; a registration with the
/// right job but a wrong token learns none of them.
#[tokio::test]
async fn quic_entries_reach_only_the_ranks_of_their_job() {
    let server = start(config()).await;
    let addr = server.local_addr();
    let quic_entries = |job: &str, rank: u32| {
        vec![
            endpoint_of(job, rank),
            Endpoint::new(format!("quic:192.0.2.{}:4433", 10 + rank)).unwrap(),
            Endpoint::new(format!("quic:203.0.113.11:{}", 40000 + rank)).unwrap(),
            Endpoint::new(format!("cert-sha256:{}", format!("{rank:02x}").repeat(32))).unwrap(),
        ]
    };
    let mut ranks = Vec::new();
    for rank in 0..2 {
        let mut quic = registration("quicjob", rank, 2, TOKEN);
        quic.endpoints = quic_entries("quicjob", rank);
        ranks.push(spawn_rank(addr, quic, in_secs(10.0)));
    }
    let mut others = Vec::new();
    for rank in 0..2 {
        others.push(spawn_rank(
            addr,
            registration("otherjob", rank, 2, TOKEN),
            in_secs(10.0),
        ));
    }
    for rank in ranks {
        let table = rank.await.unwrap().unwrap();
        for (r, endpoints) in table.iter() {
            assert_eq!(endpoints, quic_entries("quicjob", r));
        }
    }
    for rank in others {
        let table = rank.await.unwrap().unwrap();
        for (_, endpoints) in table.iter() {
            assert!(
                endpoints
                    .iter()
                    .all(|e| !e.as_str().starts_with("quic:")
                        && !e.as_str().starts_with("cert-sha256:")),
                "{endpoints:?}"
            );
        }
    }
    // Same job, wrong token: refused, no table.
    let intruder = register(
        addr,
        registration("quicjob", 0, 2, "not-the-token"),
        in_secs(2.0),
    )
    .await;
    assert!(intruder.is_err(), "{intruder:?}");
    server.shutdown().await;
}
