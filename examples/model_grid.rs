//! The model's verification grid: op × size × channel in one run, measured and predicted.
//!
//! ```sh
//! eval "$(scripts/services.sh start)"
//! cargo build --release --workspace --bins --examples --features fmi-suite/aws,fmi-cli/aws
//! target/release/fmi calibrate --config grid.toml --out profile.toml   # grid.toml: see docs/benchmarks.md
//! target/release/fmi run -n 2 --config grid.toml -- target/release/examples/model_grid
//! ```
//!
//! Every rank opens one communicator per channel the configuration sets up (plus tcp, from
//! `fmi run`'s rendezvous), each forced onto its channel under a job id of its own, and one more
//! over tcp to synchronise. For each operation (barrier, bcast, allreduce) and size (8 B to
//! 1 MiB) and channel it times a batch of calls after one warm-up (each call starts after a
//! barrier on the tcp communicator, as in OSU's benchmarks), and compares with the model (`[model]` of the same file, with its
//! calibrated `profile`): the predicted time on that channel (its best algorithm) and the
//! channel the model chooses under its objective. Rank 0 prints a Markdown table and two
//! summary lines: in how many (op, size) cells the model's choice was the measured-fastest
//! channel, and how many predicted/measured ratios lie within 2×.
//!
//! **What is measured.** The model predicts how long an operation takes once every rank has
//! called it. A barrier releases the ranks up to a one-way latency apart, and a rank's own
//! clock counts that skew too (the rank released first waits for the last one's messages), so
//! the cell's time is, per call, from the last rank's start to the last rank's end, and of the
//! batch's calls the median (as `fmi calibrate` takes medians: on a shared machine a few calls
//! that wait for a descheduled rank would otherwise decide the cell). The ranks read the
//! host's wall clock, so this needs every rank on one host (as `fmi run -n N` puts them);
//! `GRID_CLOCK=rank` gives the earlier measure, the slowest rank's average own time per call,
//! which includes the skew and the outliers. The summary prints the within-2× count under
//! both.
//!
//! `GRID_SIZES` (bytes, comma-separated) and `GRID_OPS` (`barrier,bcast,allreduce`) narrow the
//! grid; `GRID_BATCH_TCP` / `GRID_BATCH_REDIS` / `GRID_BATCH_STORAGE` (S3, DynamoDB) set the
//! calls per batch (default 50 / 20 / 3). Redis calls take a few hundred microseconds, and the
//! median of 3 swung by 2× between runs on this 2-core host, where the server shares the cores
//! with the ranks.
//! `GRID_SPINS=1` prints, per TCP cell and rank, how the TCP receives of the batch waited (the
//! channel's `spins_caught` / `spins_missed` / `spins_skipped` counters, for the measured and
//! the synchronising communicator): spinning and sleeping receives differ several-fold in
//! latency (docs/benchmarks.md, session 9).
//! Every loop is bounded by those counts and every call by the configuration's deadline.

use std::time::Instant;

use fmi::blocking::Communicator;
use fmi::model::{estimates, ChannelKind, JobConfig, Model, Op as ModelOp};
use fmi::{EnvSettings, JobId, Op};

const SIZES: [usize; 5] = [8, 512, 8 << 10, 64 << 10, 1 << 20];

fn env_list(var: &str) -> Option<Vec<String>> {
    std::env::var(var)
        .ok()
        .filter(|v| !v.is_empty())
        .map(|v| v.split(',').map(|s| s.trim().to_owned()).collect())
}

fn env_num(var: &str, default: usize) -> usize {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn open(base: &EnvSettings, channel: &str) -> fmi::Result<Communicator> {
    open_as(base, channel, channel)
}

/// A communicator forced onto `channel`, in job `<job>-<suffix>`.
fn open_as(base: &EnvSettings, channel: &str, suffix: &str) -> fmi::Result<Communicator> {
    let mut s = base.clone();
    s.channel = Some(channel.to_owned());
    s.job = JobId::new(format!("{}-{suffix}", base.job))?;
    Communicator::from_settings(s)
}

fn main() {
    if let Err(e) = run() {
        eprintln!("model_grid: {e}");
        std::process::exit(1);
    }
}

/// Nanoseconds of the host's wall clock (the same clock in every rank on this host).
fn wall_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// `batch` calls of `op`, each started after a barrier on `sync` (as OSU's collective
/// benchmarks do, so that calls do not overlap: a message-based broadcast would otherwise
/// pipeline and be timed below its latency). Returns, per call, this rank's start and end on
/// the wall clock (ns), and this rank's average own time per call (s).
fn batch(
    comm: &Communicator,
    sync: &Communicator,
    op: ModelOp,
    bytes: usize,
    batch: usize,
) -> fmi::Result<(Vec<u64>, f64)> {
    let words = (bytes / 8).max(1);
    let data: Vec<u64> = (0..words as u64).collect();
    let mut buf = vec![0u8; bytes];
    let mut total = 0.0;
    let mut stamps = Vec::with_capacity(2 * batch);
    for _ in 0..batch {
        sync.barrier()?;
        stamps.push(wall_ns());
        let t0 = Instant::now();
        match op {
            ModelOp::Barrier => comm.barrier()?,
            ModelOp::Bcast => comm.bcast_into(0, &mut buf)?,
            _ => {
                let sum = comm.allreduce(&data, Op::Sum)?;
                std::hint::black_box(sum);
            }
        }
        total += t0.elapsed().as_secs_f64();
        stamps.push(wall_ns());
    }
    Ok((stamps, total / batch as f64))
}

/// The TCP channel's spin counters: caught, missed, skipped (0 on other channels).
fn spins(comm: &Communicator) -> [u64; 3] {
    let c = comm.counters();
    let get = |name: &str| c.iter().find(|(n, _)| *n == name).map_or(0, |(_, v)| *v);
    [
        get("spins_caught"),
        get("spins_missed"),
        get("spins_skipped"),
    ]
}

/// Per call, the last rank's end minus the last rank's start; the median over the calls (s),
/// as `fmi calibrate` takes medians. `all` is every rank's `batch` stamps, one rank after
/// another.
fn ready_to_done(all: &[u64], ranks: usize, calls: usize) -> f64 {
    let mut times: Vec<f64> = (0..calls)
        .map(|call| {
            let at = |rank: usize, end: usize| all[rank * 2 * calls + 2 * call + end];
            let start = (0..ranks).map(|r| at(r, 0)).max().unwrap_or(0);
            let end = (0..ranks).map(|r| at(r, 1)).max().unwrap_or(0);
            end.saturating_sub(start) as f64 * 1e-9
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times.get(times.len() / 2).copied().unwrap_or(0.0)
}

fn ms(s: f64) -> String {
    if s < 1e-3 {
        format!("{:.0} µs", s * 1e6)
    } else {
        format!("{:.2} ms", s * 1e3)
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let base = EnvSettings::from_process()?;
    let path = base
        .config
        .clone()
        .ok_or("FMI_CONFIG is not set: run under `fmi run --config FILE`")?;
    let job = JobConfig::from_file(&path)?;
    let channels = job.channels(true);
    let ranks = base.size;
    let model = Model::new(job.model.clone(), &channels)?;
    let sync = open_as(&base, "tcp", "sync")?;
    let mut comms = Vec::new();
    for &ch in &channels {
        let comm = if ch == ChannelKind::Tcp {
            open(&base, "tcp")?
        } else {
            open(&base, ch.name())?
        };
        comms.push((ch, comm));
    }
    let sizes: Vec<usize> = env_list("GRID_SIZES")
        .map(|v| v.iter().filter_map(|s| s.parse().ok()).collect())
        .unwrap_or_else(|| SIZES.to_vec());
    let ops: Vec<ModelOp> = env_list("GRID_OPS")
        .map(|v| v.iter().filter_map(|s| s.parse().ok()).collect())
        .unwrap_or_else(|| vec![ModelOp::Barrier, ModelOp::Bcast, ModelOp::Allreduce]);
    let batch_tcp = env_num("GRID_BATCH_TCP", 50).max(1);
    let batch_storage = env_num("GRID_BATCH_STORAGE", 3).max(1);
    let batch_redis = env_num("GRID_BATCH_REDIS", 20).max(1);
    let rank_clock = std::env::var("GRID_CLOCK").is_ok_and(|v| v == "rank");
    let show_spins = std::env::var("GRID_SPINS").is_ok_and(|v| v == "1");
    let me = sync.rank().0;
    if me == 0 {
        println!(
            "{ranks} ranks, objective {}, channels {}, model hash {:016x}\n",
            model.objective(),
            channels
                .iter()
                .map(|c| c.name())
                .collect::<Vec<_>>()
                .join(","),
            model.hash()
        );
        let head: Vec<String> = channels
            .iter()
            .map(|c| format!("{c} measured (predicted)"))
            .collect();
        println!(
            "| op | bytes | model's choice | measured fastest | {} |",
            head.join(" | ")
        );
        println!("|---|---:|---|---|{}", "---:|".repeat(channels.len()));
    }
    let (mut cells, mut agree, mut ratios) = (0usize, 0usize, Vec::new());
    // The other measure's ratios, for the summary.
    let mut other_ratios = Vec::new();
    for &op in &ops {
        let op_sizes: Vec<usize> = if op == ModelOp::Barrier {
            vec![0]
        } else {
            sizes.clone()
        };
        for &bytes in &op_sizes {
            let mut row = Vec::new();
            for (ch, comm) in &comms {
                let n = match ch {
                    ChannelKind::Redis => batch_redis,
                    c if c.is_storage() => batch_storage,
                    _ => batch_tcp,
                };
                batch(comm, &sync, op, bytes, 1)?;
                let spins_before = (spins(comm), spins(&sync));
                let (stamps, mine) = batch(comm, &sync, op, bytes, n)?;
                if show_spins && *ch == ChannelKind::Tcp {
                    let (c, s) = (spins(comm), spins(&sync));
                    let d = |a: [u64; 3], b: [u64; 3]| [a[0] - b[0], a[1] - b[1], a[2] - b[2]];
                    eprintln!(
                        "rank {me} {} {bytes}: spins caught/missed/skipped: tcp {:?}, sync {:?}",
                        op.name(),
                        d(c, spins_before.0),
                        d(s, spins_before.1)
                    );
                }
                let slowest_own = sync.allreduce(&[mine], Op::Max)?[0];
                let all = sync.allgather(&stamps)?;
                let shared = ready_to_done(&all, ranks as usize, n);
                let (slowest, other) = if rank_clock {
                    (slowest_own, shared)
                } else {
                    (shared, slowest_own)
                };
                let predicted = estimates(
                    model.config(),
                    op,
                    fmi::model::Bytes(bytes as u64),
                    ranks,
                    &[*ch],
                )?
                .iter()
                .map(|e| e.seconds.0)
                .fold(f64::INFINITY, f64::min);
                other_ratios.push(predicted / other);
                row.push((*ch, slowest, predicted));
            }
            let choice = model.choose(op, fmi::model::Bytes(bytes as u64), ranks)?;
            let fastest = row
                .iter()
                .min_by(|a, b| a.1.total_cmp(&b.1))
                .map(|r| r.0)
                .ok_or("no channel")?;
            cells += 1;
            agree += usize::from(fastest == choice.channel);
            let shown: Vec<String> = row
                .iter()
                .map(|(_, m, p)| {
                    ratios.push(p / m);
                    format!("{} ({}, {:.2}×)", ms(*m), ms(*p), p / m)
                })
                .collect();
            if me == 0 {
                println!(
                    "| {} | {bytes} | {} | {fastest} | {} |",
                    op.name(),
                    choice.channel,
                    shown.join(" | ")
                );
            }
        }
    }
    for (_, comm) in &comms {
        comm.barrier()?;
    }
    sync.barrier()?;
    if me == 0 {
        let within = ratios.iter().filter(|r| (0.5..=2.0).contains(*r)).count();
        let lo = ratios.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = ratios.iter().copied().fold(0.0, f64::max);
        println!(
            "\nmodel's choice = measured fastest in {agree} of {cells} cells ({:.0}%)",
            100.0 * agree as f64 / cells.max(1) as f64
        );
        println!(
            "predicted/measured within 2x in {within} of {} (op, size, channel) entries; range {lo:.2}..{hi:.2} ({})",
            ratios.len(),
            if rank_clock {
                "slowest rank's own time"
            } else {
                "last start to last end"
            }
        );
        let other = other_ratios
            .iter()
            .filter(|r| (0.5..=2.0).contains(*r))
            .count();
        println!(
            "  with the other measure ({}): within 2x in {other} of {}",
            if rank_clock {
                "last start to last end"
            } else {
                "slowest rank's own time"
            },
            other_ratios.len()
        );
    }
    Ok(())
}
