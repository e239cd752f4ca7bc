//! Point-to-point latency and bandwidth between ranks 0 and 1, 8 B to 16 MiB.
//!
//! ```sh
//! target/release/fmi run -n 2 -- target/release/examples/ping_pong [ITERS]
//! ```
//! Prints, at rank 0, one line per size: half round-trip time and bandwidth.

use std::time::Instant;

use fmi::blocking::Communicator;

fn main() {
    if let Err(e) = run() {
        eprintln!("ping_pong: {e}");
        std::process::exit(1);
    }
}

fn run() -> fmi::Result<()> {
    let comm = Communicator::from_env()?;
    let iters: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(200);
    if comm.size() < 2 {
        eprintln!("ping_pong needs two ranks: fmi run -n 2 -- ping_pong");
        std::process::exit(2);
    }
    let me = comm.rank().0;
    if me == 0 {
        println!("{:>10} {:>14} {:>12}", "bytes", "half-rtt (us)", "MB/s");
    }
    let mut size = 8usize;
    while size <= 16 << 20 {
        let n = if size >= 1 << 20 {
            iters.clamp(2, 20)
        } else {
            iters
        };
        let buf = vec![7u8; size];
        let mut back = vec![0u8; size];
        comm.barrier()?;
        let start = Instant::now();
        for _ in 0..n {
            match me {
                0 => {
                    comm.send(1, 0, &buf)?;
                    comm.recv_into(1, 0, &mut back)?;
                }
                1 => {
                    comm.recv_into(0, 0, &mut back)?;
                    comm.send(0, 0, &back)?;
                }
                _ => {}
            }
        }
        let half = start.elapsed().as_secs_f64() / (2.0 * n as f64);
        if me == 0 {
            println!(
                "{size:>10} {:>14.2} {:>12.1}",
                half * 1e6,
                size as f64 / half / 1e6
            );
        }
        size *= 8;
    }
    comm.barrier()
}
