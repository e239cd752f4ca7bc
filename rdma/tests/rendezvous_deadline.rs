//! A rendezvous send keeps its deadline whether it is still spinning for the FIN or sleeping
//! (docs/rdma.md, "Rendezvous"): its wait has no timer until it goes to sleep, so the spin itself
//! ends at the deadline, and the timer made when it sleeps wakes it then. The peer is a rank
//! whose channel was dropped: over `shm` its endpoint stays open (parked) but nothing reads the
//! RTS, so no FIN ever comes.

#![cfg(feature = "libfabric")]
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::sync::Arc;
use std::time::Duration;

use fmi_channels::{Channel, Error, Instant, JobId, Rank, Tag};
use fmi_rdma::RdmaConfig;

/// How long each send may wait for its FIN.
const WAIT: Duration = Duration::from_millis(200);
/// How late after its deadline a send may return (a loaded 2-core machine).
const SLACK: Duration = Duration::from_millis(500);

fn world(spin: Duration) -> Vec<Arc<dyn Channel>> {
    let mut cfg = RdmaConfig::default();
    cfg.provider = Some("shm".to_owned());
    cfg.spin = spin;
    fmi_rdma::local_world(JobId::new("rdma-rdv-deadline").expect("job id"), 2, &cfg)
        .expect("a 2-rank world")
        .into_iter()
        .map(|ch| Arc::new(ch) as Arc<dyn Channel>)
        .collect()
}

/// Rank 0 sends 1 MiB to rank 1, whose channel is gone: the send must end with a timeout naming
/// rank 1, no earlier than its deadline and not much later.
fn times_out(spin: Duration) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let mut eps = world(spin);
        drop(eps.pop());
        let a = eps.pop().expect("rank 0");
        let big = vec![5u8; 1 << 20];
        let started = Instant::now();
        let send = a.send(Rank(1), Tag::user(4), &big, started + WAIT);
        // Bounded even if the send never ends (a sleeping wait that nothing wakes).
        let r = tokio::time::timeout(WAIT + Duration::from_secs(5), send)
            .await
            .expect("the send ended within 5 s of its deadline");
        let took = started.elapsed();
        match r {
            Err(Error::Timeout { me, peer, .. }) => {
                assert_eq!(me, Rank(0));
                assert_eq!(peer, Rank(1), "the timeout names the silent peer");
            }
            other => panic!("expected a timeout, got {other:?}"),
        }
        assert!(took >= WAIT, "returned early, after {took:?}");
        assert!(took < WAIT + SLACK, "returned late, after {took:?}");
        // The channel still works: a message to itself.
        a.send(
            Rank(0),
            Tag::user(5),
            b"self",
            started + Duration::from_secs(30),
        )
        .await
        .expect("send to self");
        let m = a
            .recv(Rank(0), Tag::user(5), started + Duration::from_secs(30))
            .await
            .expect("recv from self");
        assert_eq!(m, b"self");
        // Dropping rank 0 waits (up to 10 s, as documented) for sends that cannot leave while
        // the peer's endpoint makes no progress: left to a thread the test does not wait for.
        std::thread::spawn(move || drop(a));
    });
}

#[test]
fn a_spinning_rendezvous_send_ends_at_its_deadline() {
    // A spin window far longer than the deadline: the spin must stop at the deadline.
    times_out(Duration::from_secs(2));
}

#[test]
fn a_sleeping_rendezvous_send_ends_at_its_deadline() {
    // No spin: the wait sleeps at once, and its timer must wake it at the deadline.
    times_out(Duration::ZERO);
}

#[test]
fn a_rendezvous_send_that_spins_then_sleeps_ends_at_its_deadline() {
    // A short spin (plus 1 ns per byte) that runs out well before the deadline, then sleep.
    times_out(Duration::from_millis(20));
}
