//! Allreduce latency of the Rust API, the baseline of `benches/bindings/run.sh` (which runs the
//! same measurement through the C and Python bindings).
//!
//! ```sh
//! cargo build --release --example allreduce_bench -p fmi-suite
//! target/release/fmi run -n 4 -- target/release/examples/allreduce_bench 50
//! ```
//! For 8 B (1 `f64`) and 4 MiB (524288 `f64`): warm-up calls, a barrier, then ITERS timed
//! `allreduce_into(sum)` calls into a preallocated buffer; rank 0 prints `size_bytes mean_us`.

use std::time::Instant;

use fmi::{blocking::Communicator, Op};

const COUNTS: [usize; 2] = [1, 1 << 19];
const WARMUP: usize = 5;

fn main() {
    if let Err(e) = run() {
        eprintln!("allreduce_bench: {e}");
        std::process::exit(1);
    }
}

fn run() -> fmi::Result<()> {
    let iters: usize = match std::env::args().nth(1).map(|s| s.parse()) {
        None => 50,
        Some(Ok(n)) if n > 0 => n,
        Some(_) => {
            eprintln!("usage: allreduce_bench [ITERS > 0]");
            std::process::exit(2);
        }
    };
    let comm = Communicator::from_env()?;
    let r = comm.rank().0;
    for count in COUNTS {
        let send: Vec<f64> = (0..count).map(|i| f64::from(r) + i as f64).collect();
        let mut recv = vec![0.0f64; count];
        for _ in 0..WARMUP {
            comm.allreduce_into(&send, &mut recv, Op::Sum)?;
        }
        comm.barrier()?;
        let start = Instant::now();
        for _ in 0..iters {
            comm.allreduce_into(&send, &mut recv, Op::Sum)?;
        }
        let mean_us = start.elapsed().as_secs_f64() * 1e6 / iters as f64;
        // Element i of rank r is r + i: the sum over n ranks is n·i + n(n−1)/2.
        let n = f64::from(comm.size());
        let last = count - 1;
        if recv[last] != n * last as f64 + n * (n - 1.0) / 2.0 {
            eprintln!("rank {r}: wrong result {} at {last}", recv[last]);
            std::process::exit(3);
        }
        if r == 0 {
            println!("{} {mean_us:.1}", count * 8);
        }
    }
    comm.barrier()
}
