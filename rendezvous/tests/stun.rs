//! STUN discovery against a real coturn on loopback (`FMI_TEST_STUN`, exported by
//! `scripts/services.sh start`: two addresses of one coturn, 127.0.0.1 and 127.0.0.2). Without a
//! NAT every server sees the socket's own address, so the mapping is endpoint-independent; the
//! NAT cases (cone, `--random-fully`) are in the network-namespace matrix, `cli/tests/nat.rs`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::SocketAddr;
use std::time::Duration;

use fmi_rendezvous::stun::{probe, probe_from, Mapping, StunError};
use tokio::net::UdpSocket;

fn servers() -> Vec<SocketAddr> {
    let list = std::env::var("FMI_TEST_STUN").unwrap_or_else(|_| {
        panic!(
            "FMI_TEST_STUN is not set: these tests need a real STUN server (coturn). Start the \
             test servers with `eval \"$(scripts/services.sh start)\"`"
        )
    });
    list.split(',')
        .map(|s| s.trim().parse().expect("FMI_TEST_STUN: host:port list"))
        .collect()
}

#[tokio::test]
async fn loopback_mapping_is_endpoint_independent_and_is_the_socket_itself() {
    let servers = servers();
    assert!(
        servers.len() >= 2,
        "FMI_TEST_STUN should list two addresses"
    );
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let report = probe_from(&socket, &servers, Duration::from_secs(5))
        .await
        .expect("coturn answers");
    assert_eq!(report.observed.len(), servers.len(), "{report:?}");
    assert_eq!(report.mapping, Mapping::EndpointIndependent, "{report:?}");
    assert_eq!(report.public(), Some(socket.local_addr().unwrap()));
    assert_eq!(report.local, socket.local_addr().unwrap());

    // One server alone cannot tell the mapping type.
    let one = probe(&servers[..1], Duration::from_secs(5)).await.unwrap();
    assert_eq!(one.mapping, Mapping::Unknown);
    assert!(one.mapping.punchable());
}

#[tokio::test]
async fn a_silent_server_is_an_error_within_the_timeout_and_others_still_count() {
    // A bound UDP socket that never answers: the probe retransmits a few times and gives up.
    let silent = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let silent_addr = silent.local_addr().unwrap();
    let started = std::time::Instant::now();
    let err = probe(&[silent_addr], Duration::from_millis(400))
        .await
        .expect_err("nobody answers");
    assert!(matches!(err, StunError::NoAnswer { .. }), "{err}");
    assert!(err.to_string().contains(&silent_addr.to_string()), "{err}");
    assert!(started.elapsed() < Duration::from_secs(3), "bounded wait");
    // The silent socket received only a bounded number of requests.
    let mut buf = [0u8; 64];
    let mut got = 0;
    while let Ok(Ok(_)) =
        tokio::time::timeout(Duration::from_millis(50), silent.recv_from(&mut buf)).await
    {
        got += 1;
        assert!(got <= 6, "more than 6 retransmissions");
    }
    assert!(got >= 2, "the request was retransmitted ({got})");

    // A real server next to the silent one still gives its answer.
    let mut mixed = servers()[..1].to_vec();
    mixed.push(silent_addr);
    let report = probe(&mixed, Duration::from_millis(800)).await.unwrap();
    assert_eq!(report.observed.len(), 1);
    assert_eq!(report.mapping, Mapping::Unknown);
    assert!(matches!(
        probe(&[], Duration::from_secs(1)).await,
        Err(StunError::NoServers)
    ));
}
