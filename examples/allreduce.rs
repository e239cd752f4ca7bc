//! Every rank contributes `rank + 1` and a vector; prints the sum and the vector's checksum.
//!
//! ```sh
//! cargo build --release --workspace --examples
//! target/release/fmi run -n 4 -- target/release/examples/allreduce
//! ```
//! prints, once per rank, `rank R/N: allreduce sum = S` with S = N(N+1)/2, then
//! `rank R/N: vector checksum = C`.

use fmi::{blocking::Communicator, Op};

/// Length of the vector each rank contributes.
const LEN: usize = 1 << 16;

fn main() {
    if let Err(e) = run() {
        eprintln!("allreduce: {e}");
        std::process::exit(1);
    }
}

fn run() -> fmi::Result<()> {
    let comm = Communicator::from_env()?;
    let (r, n) = (comm.rank().0, comm.size());
    let sum = comm.allreduce(&[u64::from(r) + 1], Op::Sum)?;
    println!("rank {r}/{n}: allreduce sum = {}", sum[0]);
    // Element i of rank r is r + i, so the reduced element i is n·i + n(n−1)/2.
    let mine: Vec<f64> = (0..LEN).map(|i| f64::from(r) + i as f64).collect();
    let total = comm.allreduce(&mine, Op::Sum)?;
    let checksum: f64 = total.iter().sum();
    let n = f64::from(n);
    let expected = n * (LEN as f64 * (LEN as f64 - 1.0) / 2.0) + LEN as f64 * n * (n - 1.0) / 2.0;
    if checksum != expected {
        eprintln!("rank {r}: checksum {checksum} != expected {expected}");
        std::process::exit(2);
    }
    println!("rank {r}/{}: vector checksum = {checksum}", comm.size());
    comm.barrier()
}
