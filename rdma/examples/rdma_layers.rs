//! Where a small message's time goes: a 64-byte ping-pong between two threads of this process
//! over `shm` (or the provider named by `FMI_RDMA_PROVIDER`), layer by layer:
//!
//! 1. `raw`: the libfabric endpoint alone, as `fi_pingpong` uses it: `fi_tinject`, then spin on
//!    `fi_cq_read` until the reply's receive completes (and repost it);
//! 2. `channel`: `RdmaChannel::send` + `recv` awaited on a current-thread tokio runtime per rank
//!    (spin window: `FMI_SPIN_US`, else `auto_spin(2)`)
//!    (engine lock, bounce buffer, tag and sequence, reorder, inbox, the future's spin);
//!
//! The blocking communicator on top (`examples/rdma_pingpong.rs`, run by `rdma/bench.sh`) adds
//! its own layer. Prints `layer bytes half-rtt-us` per layer.
//!
//! ```sh
//! cargo run --release -p fmi-rdma --features fmi-rdma/libfabric --example rdma_layers [ITERS [raw|channel]]
//! ```

// The raw layer posts a receive buffer by hand, as the channel does.
#![allow(unsafe_code)]
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use fmi_channels::{Channel, JobId, Rank, Tag};
use fmi_fabric_sys as sys;
use fmi_rdma::fabric::{
    AddressVector, Completion, CompletionQueue, Domain, Endpoint, Fabric, Hints, InfoList,
};
use fmi_rdma::{RdmaBinding, RdmaChannel, RdmaConfig};

const SIZE: usize = 64;

fn provider() -> String {
    std::env::var("FMI_RDMA_PROVIDER").unwrap_or_else(|_| "shm".to_owned())
}

fn config() -> RdmaConfig {
    let mut c = RdmaConfig::default();
    c.provider = Some(provider());
    if provider().starts_with("tcp") {
        c.domain = Some("lo".to_owned());
    }
    // The channel's spin window: FMI_SPIN_US if set, else what `fmi run` gives two ranks that
    // fit the host's cores.
    c.spin = match std::env::var("FMI_SPIN_US")
        .ok()
        .and_then(|v| v.trim().parse().ok())
    {
        Some(us) => Duration::from_micros(us),
        None => fmi_rdma::channel::auto_spin(2),
    };
    c
}

fn raw_endpoint() -> Endpoint {
    let list = InfoList::query(&Hints {
        provider: Some(provider()),
        rma: true,
    })
    .expect("fi_getinfo");
    let entry = list
        .iter()
        .find(|e| !provider().starts_with("tcp") || e.domain_name() == "lo")
        .expect("an entry");
    let info = entry.to_owned().expect("info");
    drop(list);
    let fabric = Fabric::open(info).expect("fabric");
    let domain = Domain::open(&fabric).expect("domain");
    let cq = CompletionQueue::open(&domain, 64).expect("cq");
    let av = AddressVector::open(&domain, 2).expect("av");
    Endpoint::open(&domain, cq, av).expect("endpoint")
}

/// One rank of the raw ping-pong; `first` sends first.
fn raw_rank(ep: &Endpoint, peer: u64, first: bool, iters: usize, start: &Barrier) -> Duration {
    let mut buf = vec![0u8; 4096];
    let mut ctx = Box::new(sys::fi_context2::default());
    let ctx_ptr: *mut sys::fi_context2 = &mut *ctx;
    let post = |buf: &mut Vec<u8>| {
        // SAFETY: `buf` and `ctx` stay valid as long as a receive may be posted into them: they
        // are leaked at the end (the last posted receive outlives this function).
        while !unsafe {
            ep.post_recv_any(
                buf.as_mut_ptr(),
                buf.len(),
                std::ptr::null_mut(),
                ctx_ptr.cast(),
            )
        }
        .expect("fi_trecv")
        {}
    };
    post(&mut buf);
    let msg = [7u8; SIZE];
    let mut comps = [Completion::default(); 4];
    let mut wait = |buf: &mut Vec<u8>| loop {
        match ep.cq().read(&mut comps) {
            Ok(0) => std::hint::spin_loop(),
            Ok(_) => {
                post(buf);
                return;
            }
            Err(_) => panic!("completion error"),
        }
    };
    let send = || while !ep.inject(&msg, peer, 1).expect("fi_tinject") {};
    start.wait();
    let t = Instant::now();
    for _ in 0..iters {
        if first {
            send();
            wait(&mut buf);
        } else {
            wait(&mut buf);
            send();
        }
    }
    let took = t.elapsed();
    // A receive is still posted into `buf` with `ctx`: keep both valid past the endpoint.
    std::mem::forget(buf);
    std::mem::forget(ctx);
    took
}

fn raw(iters: usize) -> f64 {
    let eps = [raw_endpoint(), raw_endpoint()];
    let names: Vec<Vec<u8>> = eps.iter().map(|e| e.name().expect("name")).collect();
    let mut addrs = Vec::new();
    for ep in &eps {
        let a: Vec<u64> = names
            .iter()
            .map(|n| ep.av().insert(n).expect("av insert"))
            .collect();
        addrs.push(a);
    }
    let start = Barrier::new(2);
    let [e0, e1] = eps;
    let took = std::thread::scope(|s| {
        let start = &start;
        let (p0, p1) = (addrs[0][1], addrs[1][0]);
        let a = s.spawn(move || raw_rank(&e0, p0, true, iters, start));
        let b = s.spawn(move || raw_rank(&e1, p1, false, iters, start));
        let took = a.join().expect("rank 0");
        b.join().expect("rank 1");
        took
    });
    took.as_secs_f64() / (2.0 * iters as f64)
}

fn channel(iters: usize) -> f64 {
    let cfg = config();
    let bindings: Vec<RdmaBinding> = (0..2)
        .map(|_| RdmaBinding::open(&cfg, 2).expect("open"))
        .collect();
    let names: Vec<Vec<u8>> = bindings.iter().map(|b| b.name().to_vec()).collect();
    let job = JobId::new("rdma-layers").expect("job");
    let chans: Vec<Arc<RdmaChannel>> = bindings
        .into_iter()
        .enumerate()
        .map(|(r, b)| {
            Arc::new(
                RdmaChannel::start(b, job.clone(), Rank(r as u32), names.clone(), &cfg)
                    .expect("start"),
            )
        })
        .collect();
    let start = Arc::new(Barrier::new(2));
    let threads: Vec<_> = (0..2u32)
        .map(|me| {
            let ch = Arc::clone(&chans[me as usize]);
            let start = Arc::clone(&start);
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("runtime");
                rt.block_on(async {
                    let peer = Rank(1 - me);
                    let msg = [7u8; SIZE];
                    let deadline = fmi_channels::Instant::now() + Duration::from_secs(60);
                    let round = || async {
                        if me == 0 {
                            ch.send(peer, Tag::user(0), &msg, deadline)
                                .await
                                .expect("send");
                            ch.recv(peer, Tag::user(0), deadline).await.expect("recv");
                        } else {
                            ch.recv(peer, Tag::user(0), deadline).await.expect("recv");
                            ch.send(peer, Tag::user(0), &msg, deadline)
                                .await
                                .expect("send");
                        }
                    };
                    for _ in 0..iters.min(1000) {
                        round().await;
                    }
                    start.wait();
                    let t = Instant::now();
                    for _ in 0..iters {
                        round().await;
                    }
                    t.elapsed()
                })
            })
        })
        .collect();
    let mut took = Duration::ZERO;
    for t in threads {
        took = took.max(t.join().expect("rank"));
    }
    took.as_secs_f64() / (2.0 * iters as f64)
}

fn main() {
    let iters: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(50_000);
    let only = std::env::args().nth(2);
    if only.as_deref().is_none_or(|l| l == "raw") {
        println!("raw {SIZE} {:.3}", raw(iters) * 1e6);
    }
    if only.as_deref().is_none_or(|l| l == "channel") {
        println!("channel {SIZE} {:.3}", channel(iters) * 1e6);
    }
}
