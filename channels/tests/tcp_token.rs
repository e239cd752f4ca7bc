//! Job-token authentication of the direct TCP channel: a process without the job's token cannot
//! connect to a rank, the token never shows in errors, and the job carries on.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use common::{eventually, in_secs, job};
use fmi_channels::tcp::{local_world, JobToken, TcpChannel, TcpConfig};
use fmi_channels::{conformance, Channel, Error, Rank, Tag};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

const SECRET: &str = "tok-3f9a1c-very-secret";

fn with_token(token: &str) -> TcpConfig {
    TcpConfig {
        token: JobToken::new(token),
        ..TcpConfig::default()
    }
}

/// A hello as documented in `fmi_channels::tcp`, carrying `token`.
fn hello(job: &str, from: u32, to: u32, token: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&from.to_le_bytes());
    body.extend_from_slice(&to.to_le_bytes());
    body.push(job.len() as u8);
    body.extend_from_slice(job.as_bytes());
    body.extend_from_slice(&(token.len() as u16).to_le_bytes());
    body.extend_from_slice(token);
    let mut out = b"fmiT".to_vec();
    out.extend_from_slice(&1u16.to_le_bytes());
    out.extend_from_slice(&(body.len() as u16).to_le_bytes());
    out.extend_from_slice(&body);
    out
}

/// Sends `hello` to `addr`; returns the reply's status byte and whether the socket was then
/// closed by the rank.
async fn raw_handshake(addr: SocketAddr, hello: &[u8]) -> (u8, bool) {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(hello).await.expect("write hello");
    let mut reply = [0u8; 7];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut reply))
        .await
        .expect("reply in time")
        .expect("read reply");
    assert_eq!(&reply[..4], b"fmiT", "reply magic");
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest))
        .await
        .is_ok();
    (reply[6], closed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channel_with_a_token_passes_conformance() {
    conformance::run_all(|n| async move {
        Ok(local_world(job("conf-token"), n, with_token(SECRET))
            .await?
            .into_iter()
            .map(|c| Arc::new(c) as Arc<dyn Channel>)
            .collect())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strangers_without_the_token_are_refused_and_the_job_works() {
    let eps = local_world(job("guarded"), 2, with_token(SECRET))
        .await
        .expect("world");
    let addr = eps[0].local_addr();

    // Raw hellos: no token, a wrong token of the same length, a prefix, the right token for
    // another job (wrong job still says nothing more than "bad token" when the token is wrong).
    let wrong = "tok-3f9a1c-very-secreT";
    for (what, h) in [
        ("no token", hello("guarded", 1, 0, b"")),
        ("wrong token", hello("guarded", 1, 0, wrong.as_bytes())),
        ("a prefix", hello("guarded", 1, 0, &SECRET.as_bytes()[..8])),
        ("wrong token, other job", hello("other", 1, 0, b"x")),
    ] {
        let (status, closed) = raw_handshake(addr, &h).await;
        assert_eq!(status, 6, "{what}: refused with `bad token`");
        assert!(closed, "{what}: refused socket is closed");
    }

    // A whole endpoint of the same job and rank numbers, with a wrong or no token, whose peer
    // table points at rank 0.
    for token in ["", "guess"] {
        let binding = TcpChannel::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
            .await
            .expect("bind");
        let own = binding.local_addr();
        let stranger = TcpChannel::start(
            binding,
            job("guarded"),
            Rank(1),
            vec![addr, own],
            with_token(token),
        )
        .expect("start");
        let r = tokio::time::timeout(
            Duration::from_secs(5),
            stranger.send(Rank(0), Tag::user(0), b"intruder", in_secs(60)),
        )
        .await
        .expect("refusal is prompt");
        match &r {
            Err(
                e @ Error::Io {
                    peer: Some(Rank(0)),
                    channel: "tcp",
                    source,
                    ..
                },
            ) => {
                assert_eq!(source.kind(), std::io::ErrorKind::ConnectionRefused);
                let text = format!("{e} {e:?}");
                assert!(text.contains("token"), "names the cause: {text}");
                assert!(!text.contains(SECRET) && !text.contains("guess"), "{text}");
            }
            other => panic!("stranger's send: {other:?}"),
        }
        assert!(!format!("{stranger:?}").contains("guess"));
    }

    // Nothing from the strangers was delivered, and the real pair connects and talks.
    let r = eps[0]
        .recv(
            Rank(1),
            Tag::user(0),
            Instant::now() + Duration::from_millis(200),
        )
        .await;
    assert!(
        matches!(r, Err(Error::Timeout { .. })),
        "nothing delivered: {r:?}"
    );
    eps[1]
        .send(Rank(0), Tag::user(0), b"real", in_secs(10))
        .await
        .expect("send");
    let m = eps[0]
        .recv(Rank(1), Tag::user(0), in_secs(10))
        .await
        .expect("recv");
    assert_eq!(m, b"real");
    eps[0]
        .send(Rank(1), Tag::user(1), b"back", in_secs(10))
        .await
        .expect("send back");
    assert_eq!(
        eps[1]
            .recv(Rank(0), Tag::user(1), in_secs(10))
            .await
            .expect("recv back"),
        b"back"
    );
    // Refused sockets close a moment after their refusal is written.
    let settled = eventually(Duration::from_secs(5), || eps[0].open_connections() == 1).await;
    assert!(
        settled,
        "only the real pair's connection, have {}",
        eps[0].open_connections()
    );
}

#[test]
fn config_debug_hides_the_token_and_long_tokens_are_refused() {
    let cfg = with_token(SECRET);
    assert!(!format!("{cfg:?}").contains(SECRET));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let binding = TcpChannel::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
            .await
            .expect("bind");
        let addr = binding.local_addr();
        let long = TcpConfig {
            token: JobToken::new(vec![b'x'; 1025]),
            ..TcpConfig::default()
        };
        let r = TcpChannel::start(binding, job("long"), Rank(0), vec![addr], long);
        assert!(matches!(r, Err(Error::Config { .. })), "{r:?}");
    });
}
