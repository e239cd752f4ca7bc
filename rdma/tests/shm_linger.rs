//! Several `shm` endpoints in one process: dropping one while the others keep talking must not
//! crash them (libfabric 1.17's shm reuses a same-process peer's mapping of its region, which
//! closing that peer unmaps). Its own test binary, so the count of parked endpoints is this
//! test's alone.

#![cfg(feature = "libfabric")]
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::sync::Arc;
use std::time::Duration;

use fmi_channels::{Channel, Instant, JobId, Rank, Tag};
use fmi_rdma::fabric::shm_parked;
use fmi_rdma::RdmaConfig;

fn shm_world(n: u32) -> Vec<Arc<dyn Channel>> {
    let mut cfg = RdmaConfig::default();
    cfg.provider = Some("shm".to_owned());
    fmi_rdma::local_world(JobId::new("shm-linger").expect("job id"), n, &cfg)
        .expect("an shm world")
        .into_iter()
        .map(|ch| Arc::new(ch) as Arc<dyn Channel>)
        .collect()
}

#[test]
fn dropping_an_shm_rank_while_the_others_talk_parks_it_until_the_last_goes() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        for round in 0..20 {
            let mut eps = shm_world(3);
            let deadline = Instant::now() + Duration::from_secs(30);
            // Everyone has talked to rank 0, so every peer has its region mapped.
            for r in 1..3u32 {
                eps[r as usize]
                    .send(Rank(0), Tag::user(1), &[r as u8], deadline)
                    .await
                    .expect("send to 0");
                eps[0]
                    .recv(Rank(r), Tag::user(1), deadline)
                    .await
                    .expect("recv at 0");
            }
            drop(eps.remove(0));
            assert_eq!(
                shm_parked(),
                1,
                "round {round}: rank 0 is parked, not closed"
            );
            // Ranks 1 and 2 (now at 0 and 1) go on polling and talking, eager and rendezvous.
            let big = vec![3u8; 256 << 10];
            let (a, b) = (Arc::clone(&eps[0]), Arc::clone(&eps[1]));
            let send = async {
                for i in 0..10 {
                    let m: &[u8] = if i % 2 == 0 { &big } else { &[1, 2, 3] };
                    a.send(Rank(2), Tag::user(2), m, deadline)
                        .await
                        .expect("send");
                }
            };
            let recv = async {
                for i in 0..10 {
                    let m = b.recv(Rank(1), Tag::user(2), deadline).await.expect("recv");
                    assert_eq!(m.len(), if i % 2 == 0 { big.len() } else { 3 });
                }
            };
            tokio::join!(send, recv);
            drop((a, b));
            drop(eps);
            assert_eq!(
                shm_parked(),
                0,
                "round {round}: the last rank closed them all"
            );
        }
    });
}
