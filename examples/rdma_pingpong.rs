//! Ping-pong between ranks 0 and 1 at chosen sizes, for comparing fmi's RDMA channel with
//! libfabric's `fi_pingpong` (see `rdma/bench.sh` and docs/benchmarks.md). Works on any channel.
//!
//! ```sh
//! FMI_RDMA_PROVIDER=shm target/release/fmi run -n 2 --channel rdma -- \
//!     target/release/examples/rdma_pingpong 64:20000 1048576:400
//! ```
//! Each argument is `SIZE:ITERS`. Rank 0 prints `bytes half-rtt-us MB/s` per size, the same
//! quantities `fi_pingpong` reports as `usec/xfer` and `MB/sec`. Receives use `recv_into` with
//! one buffer per size, reused for every message (as an MPI program reuses its receive buffer
//! and `fi_pingpong` its registered one): the rdma channel reads a rendezvous message straight
//! into it. The argument `recv` switches to `recv` (a new `Vec` per message) instead. Rank 1
//! answers from a send buffer of its own, as `fi_pingpong` (and OSU's `osu_latency`) do; the
//! argument `echo` makes it send back the buffer it has just received into instead (as
//! `fmi-mpi-baseline --op pingpong` does), which makes each large transfer read memory the peer's
//! core has just written (about 20 µs more per 1 MiB over `shm` on this VM; docs/benchmarks.md,
//! "Session 10 (helper)"). Each rank prints the channel's counters to stderr at the end.

use std::time::Instant;

use fmi::blocking::Communicator;

fn main() {
    if let Err(e) = run() {
        eprintln!("rdma_pingpong: {e}");
        std::process::exit(1);
    }
}

fn run() -> fmi::Result<()> {
    let comm = Communicator::from_env()?;
    if comm.size() < 2 {
        eprintln!("rdma_pingpong needs two ranks: fmi run -n 2 -- rdma_pingpong");
        std::process::exit(2);
    }
    let use_recv = std::env::args().skip(1).any(|a| a == "recv");
    let echo = std::env::args().skip(1).any(|a| a == "echo");
    let mut plan: Vec<(usize, usize)> = std::env::args()
        .skip(1)
        .filter_map(|a| {
            let (s, i) = a.split_once(':')?;
            Some((s.parse().ok()?, i.parse().ok()?))
        })
        .collect();
    if plan.is_empty() {
        plan = vec![(64, 20_000), (1 << 20, 400)];
    }
    let me = comm.rank().0;
    for (size, iters) in plan {
        let buf = vec![7u8; size];
        let mut back = vec![0u8; size];
        // Warm-up: connections, registrations, page faults.
        for _ in 0..iters.min(100) {
            round(&comm, me, &buf, &mut back, use_recv, echo)?;
        }
        comm.barrier()?;
        let start = Instant::now();
        for _ in 0..iters {
            round(&comm, me, &buf, &mut back, use_recv, echo)?;
        }
        let half = start.elapsed().as_secs_f64() / (2.0 * iters as f64);
        if me == 0 {
            println!("{size} {:.3} {:.1}", half * 1e6, size as f64 / half / 1e6);
        }
    }
    comm.barrier()?;
    // The channel's counters (the rdma channel's spin hits and misses) for analysis; stderr, so
    // that rdma/bench.sh's parsing of stdout is unaffected.
    let counters: Vec<String> = comm
        .counters()
        .iter()
        .map(|(name, n)| format!("{name}={n}"))
        .collect();
    eprintln!("rdma_pingpong: rank {me}: {}", counters.join(" "));
    Ok(())
}

/// One round trip: rank 0 sends `buf` and receives the answer, rank 1 receives and answers with
/// as many bytes from `buf` (or, with `echo`, from what it received); `back` is the reused
/// receive buffer (unless `use_recv`).
fn round(
    comm: &Communicator,
    me: u32,
    buf: &[u8],
    back: &mut [u8],
    use_recv: bool,
    echo: bool,
) -> fmi::Result<()> {
    match (me, use_recv) {
        (0, false) => {
            comm.send(1, 0, buf)?;
            let n = comm.recv_into(1, 0, back)?;
            debug_assert_eq!(n, buf.len());
        }
        (0, true) => {
            comm.send(1, 0, buf)?;
            let got: Vec<u8> = comm.recv(1, 0)?;
            debug_assert_eq!(got.len(), buf.len());
        }
        (1, false) => {
            let n = comm.recv_into(0, 0, back)?;
            let answer = if echo { &back[..n] } else { &buf[..n] };
            comm.send(0, 0, answer)?;
        }
        (1, true) => {
            let got: Vec<u8> = comm.recv(0, 0)?;
            let answer = if echo { &got[..] } else { &buf[..got.len()] };
            comm.send(0, 0, answer)?;
        }
        _ => {}
    }
    Ok(())
}
