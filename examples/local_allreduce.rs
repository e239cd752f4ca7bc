//! N ranks as threads of this process, over the in-memory channel: no server, no network.
//!
//! ```sh
//! cargo run --release --example local_allreduce -- 4
//! ```
//! Each rank contributes `rank + 1` and a vector; every rank prints the same sum.

use fmi::Op;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let n: u32 = match std::env::args().nth(1) {
        Some(a) => a
            .parse()
            .map_err(|_| format!("usage: local_allreduce [RANKS], got {a:?}"))?,
        None => 4,
    };
    let world = fmi::blocking::local_world(n)?;
    let threads: Vec<_> = world
        .into_iter()
        .map(|comm| {
            std::thread::spawn(move || -> fmi::Result<String> {
                let r = comm.rank().0 as u64;
                let sum = comm.allreduce(&[r + 1], Op::Sum)?;
                let v: Vec<f64> = (0..1000).map(|i| (r * 1000 + i) as f64).collect();
                let vsum = comm.allreduce(&v, Op::Sum)?;
                let checksum: f64 = vsum.iter().sum();
                Ok(format!(
                    "rank {}/{}: allreduce sum = {} (vector checksum {checksum})",
                    comm.rank(),
                    comm.size(),
                    sum[0]
                ))
            })
        })
        .collect();
    for t in threads {
        let line = t.join().map_err(|_| "a rank panicked")??;
        println!("{line}");
    }
    Ok(())
}
