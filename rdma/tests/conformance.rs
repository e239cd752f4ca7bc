//! The channel conformance suite over the RDMA channel, on the providers that run without RDMA
//! hardware: `shm` and `tcp;ofi_rxm` (loopback only). Every rank is an endpoint of this process.

#![cfg(feature = "libfabric")]
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::sync::Arc;

use fmi_channels::{Channel, JobId, Rank, Tag};
use fmi_rdma::channel::{available_providers, decode_name, encode_name};
use fmi_rdma::{FabricError, RdmaBinding, RdmaConfig};

fn config(provider: &str) -> RdmaConfig {
    let mut c = RdmaConfig::default();
    c.provider = Some(provider.to_owned());
    // Loopback only: the tcp provider would otherwise take the first interface.
    if provider.starts_with("tcp") {
        c.domain = Some("lo".to_owned());
    }
    c
}

fn world(provider: &str, n: u32) -> fmi_channels::Result<Vec<Arc<dyn Channel>>> {
    let cfg = config(provider);
    Ok(
        fmi_rdma::local_world(JobId::new("rdma-conformance").expect("job id"), n, &cfg)?
            .into_iter()
            .map(|ch| Arc::new(ch) as Arc<dyn Channel>)
            .collect(),
    )
}

fn conformance(provider: &'static str) {
    // Libfabric reads FI_PROVIDER; a value from the environment would hide the provider asked for.
    assert!(
        available_providers().iter().any(|p| p == provider),
        "provider {provider} is not offered here: {:?} (FI_PROVIDER={:?})",
        available_providers(),
        std::env::var("FI_PROVIDER").ok()
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(fmi_channels::conformance::run_all(|n| async move {
        world(provider, n)
    }));
}

#[test]
fn conformance_shm() {
    conformance("shm");
}

#[test]
fn conformance_tcp_rxm() {
    conformance("tcp;ofi_rxm");
}

#[test]
fn an_unknown_provider_is_a_typed_error_naming_it() {
    let e = RdmaBinding::open(&config("no-such-provider"), 2).expect_err("no such provider");
    assert!(matches!(e, FabricError::NoProvider { .. }), "{e:?}");
    assert!(e.to_string().contains("no-such-provider"), "{e}");
}

#[test]
fn endpoint_names_round_trip_as_text() {
    let name = [0u8, 1, 0xab, 0xff];
    let text = encode_name(&name);
    assert_eq!(text, "ofi:0001abff");
    assert_eq!(decode_name(&text).as_deref(), Some(&name[..]));
    assert_eq!(decode_name("127.0.0.1:80"), None);
    assert_eq!(decode_name("ofi:abc"), None);
}

#[test]
fn rendezvous_messages_keep_order_with_eager_ones() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let eps = world("shm", 2).expect("world");
        let deadline = fmi_channels::Instant::now() + std::time::Duration::from_secs(30);
        let big = vec![7u8; 1 << 20];
        let (a, b) = (Arc::clone(&eps[0]), Arc::clone(&eps[1]));
        let send = async {
            for i in 0..20u8 {
                if i % 2 == 0 {
                    a.send(Rank(1), Tag::user(1), &big, deadline)
                        .await
                        .expect("big");
                } else {
                    a.send(Rank(1), Tag::user(1), &[i], deadline)
                        .await
                        .expect("small");
                }
            }
        };
        let recv = async {
            for i in 0..20u8 {
                let m = b.recv(Rank(0), Tag::user(1), deadline).await.expect("recv");
                if i % 2 == 0 {
                    assert_eq!(m.len(), big.len(), "message {i}");
                } else {
                    assert_eq!(m, [i], "message {i}");
                }
            }
        };
        tokio::join!(send, recv);
    });
}

#[test]
fn the_default_spin_follows_the_ranks_on_the_host() {
    use fmi_rdma::channel::{auto_spin, FIT_SPIN};
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as u32;
    // Ranks that fit the cores spin; more ranks than cores leave progress to the poller.
    assert_eq!(auto_spin(1), FIT_SPIN);
    assert_eq!(auto_spin(cores), FIT_SPIN);
    assert_eq!(auto_spin(cores + 1), std::time::Duration::ZERO);
    // A count of 0 (nothing known) is treated as this rank alone.
    assert_eq!(auto_spin(0), FIT_SPIN);
}
