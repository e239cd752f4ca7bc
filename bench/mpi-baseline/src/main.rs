//! The MPI baseline of `fmi bench`: the same operations, sizes and methodology over MPI (rsmpi,
//! built against MPICH here), so that `fmi bench --vs-mpi` can put the two side by side.
//!
//! ```sh
//! cargo build --release -p fmi-mpi-baseline --features mpi-baseline
//! mpirun.mpich -n 8 target/release/fmi-mpi-baseline --op allreduce --sizes 8,64K,4M
//! ```
//! Rank 0 prints one `fmi-bench-result` line per size (size, iterations, then avg, min, max,
//! p50 and p99 latency in seconds, tab-separated); `fmi bench` parses them.
//!
//! Methodology (shared with `fmi bench` through `cli/src/bench_stats.rs`): per size, warm-up
//! iterations, then timed iterations each preceded by a barrier; an iteration's time is the
//! largest any rank measured. Ping-pong runs between ranks 0 and 1 without barriers (the round
//! trip synchronises them) and its time is rank 0's half round trip.

#[path = "../../../cli/src/bench_stats.rs"]
#[allow(dead_code)]
mod bench_stats;

use bench_stats::{default_iters, default_warmup, format_result, max_over_ranks, stats, BenchOp};
use mpi::collective::SystemOperation;
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;

struct Args {
    op: BenchOp,
    sizes: Vec<usize>,
    iters: Option<usize>,
    warmup: Option<usize>,
}

const USAGE: &str = "usage: fmi-mpi-baseline --op OP --sizes 8,1K,64K [--iters K] [--warmup W]";

fn parse_args() -> Result<Args, String> {
    let mut op = None;
    let mut sizes = None;
    let mut iters = None;
    let mut warmup = None;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = |name: &str| it.next().ok_or_else(|| format!("{name} needs a value"));
        match a.as_str() {
            "--op" => op = Some(BenchOp::parse(&value("--op")?)?),
            "--sizes" => sizes = Some(bench_stats::parse_sizes(&value("--sizes")?)?),
            "--iters" => {
                iters = Some(
                    value("--iters")?
                        .parse::<usize>()
                        .ok()
                        .filter(|&n| n > 0)
                        .ok_or("--iters: expected a number > 0")?,
                )
            }
            "--warmup" => {
                warmup = Some(
                    value("--warmup")?
                        .parse::<usize>()
                        .map_err(|_| "--warmup: expected a number")?,
                )
            }
            "-h" | "--help" => return Err(USAGE.into()),
            other => return Err(format!("unexpected argument {other:?}; {USAGE}")),
        }
    }
    Ok(Args {
        op: op.ok_or_else(|| format!("--op is required; {USAGE}"))?,
        sizes: sizes.unwrap_or_else(|| vec![8, 1 << 10, 64 << 10, 1 << 20]),
        iters,
        warmup,
    })
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("fmi-mpi-baseline: {e}");
            std::process::exit(2);
        }
    };
    let Some(universe) = mpi::initialize() else {
        eprintln!("fmi-mpi-baseline: MPI was already initialised");
        std::process::exit(1);
    };
    let world = universe.world();
    if (world.size() as u32) < args.op.min_ranks() {
        if world.rank() == 0 {
            eprintln!(
                "fmi-mpi-baseline: {} needs at least {} ranks (mpirun -n {})",
                args.op,
                args.op.min_ranks(),
                args.op.min_ranks()
            );
        }
        std::process::exit(2);
    }
    for size in args.op.effective_sizes(&args.sizes) {
        let iters = args.iters.unwrap_or_else(|| default_iters(size));
        let warmup = args.warmup.unwrap_or_else(|| default_warmup(iters));
        let mine = run_size(&world, args.op, size, iters, warmup);
        // Every rank's per-iteration times to rank 0, which takes the max over ranks.
        let root = world.process_at_rank(0);
        if world.rank() == 0 {
            let mut all = vec![0.0f64; iters * world.size() as usize];
            root.gather_into_root(&mine[..], &mut all[..]);
            let per_rank: Vec<Vec<f64>> = all.chunks(iters).map(<[f64]>::to_vec).collect();
            let times = if args.op == BenchOp::PingPong {
                per_rank[0].clone()
            } else {
                max_over_ranks(&per_rank)
            };
            println!("{}", format_result(size, iters, &stats(&times)));
        } else {
            root.gather_into(&mine[..]);
        }
    }
    // Every result is out; flush before MPI_Finalize (Universe's drop), which MPICH 4.0.2 over
    // UCX's tcp transport now and then never leaves (rank 0 spinning in ucp_worker_progress,
    // the others in the PMI barrier): `fmi bench` stops such a run once it has every result.
    // (Exiting without MPI_Finalize is no way out: Hydra then kills the job.)
    let _ = std::io::Write::flush(&mut std::io::stdout());
}

/// Runs `warmup` + `iters` iterations of `op` on `size` bytes; returns this rank's time of each
/// timed iteration (seconds).
fn run_size(
    world: &SimpleCommunicator,
    op: BenchOp,
    size: usize,
    iters: usize,
    warmup: usize,
) -> Vec<f64> {
    let n = world.size() as usize;
    let me = world.rank();
    let root = world.process_at_rank(0);
    let elems = size / 4;
    let bytes = vec![1u8; size];
    let mut bytes_out = vec![0u8; size];
    let mut bytes_all = vec![0u8; size * n];
    let all_in = vec![2u8; size * n];
    let floats = vec![me as f32 + 1.0; elems];
    let mut floats_out = vec![0.0f32; elems];
    let mut times = vec![0.0f64; iters];
    world.barrier();
    for i in 0..warmup + iters {
        if op != BenchOp::PingPong {
            world.barrier();
        }
        let t0 = mpi::time();
        match op {
            BenchOp::PingPong => {
                if me == 0 {
                    world.process_at_rank(1).send(&bytes[..]);
                    world.process_at_rank(1).receive_into(&mut bytes_out[..]);
                } else if me == 1 {
                    world.process_at_rank(0).receive_into(&mut bytes_out[..]);
                    world.process_at_rank(0).send(&bytes_out[..]);
                }
            }
            // The root broadcasts whatever its buffer holds; every rank uses one buffer.
            BenchOp::Bcast => root.broadcast_into(&mut bytes_out[..]),
            BenchOp::Reduce => {
                if me == 0 {
                    root.reduce_into_root(&floats[..], &mut floats_out[..], SystemOperation::sum());
                } else {
                    root.reduce_into(&floats[..], SystemOperation::sum());
                }
            }
            BenchOp::Allreduce => {
                world.all_reduce_into(&floats[..], &mut floats_out[..], SystemOperation::sum())
            }
            BenchOp::Scan => {
                world.scan_into(&floats[..], &mut floats_out[..], SystemOperation::sum())
            }
            BenchOp::Allgather => world.all_gather_into(&bytes[..], &mut bytes_all[..]),
            BenchOp::Alltoall => world.all_to_all_into(&all_in[..], &mut bytes_all[..]),
            BenchOp::Gather => {
                if me == 0 {
                    root.gather_into_root(&bytes[..], &mut bytes_all[..]);
                } else {
                    root.gather_into(&bytes[..]);
                }
            }
            BenchOp::Scatter => {
                if me == 0 {
                    root.scatter_into_root(&all_in[..], &mut bytes_out[..]);
                } else {
                    root.scatter_into(&mut bytes_out[..]);
                }
            }
            BenchOp::Barrier => world.barrier(),
        }
        let mut t = mpi::time() - t0;
        if op == BenchOp::PingPong {
            t /= 2.0;
        }
        if i >= warmup {
            times[i - warmup] = t;
        }
    }
    times
}
