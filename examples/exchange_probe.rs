//! Diagnostic (session 9): where does a 2-rank TCP collective's time go? Runs, interleaved in
//! one job, several ways of doing "a barrier, then one exchange" — async on one current-thread
//! runtime as `fmi calibrate` does, and through the blocking API with the barrier on the same or
//! on another communicator as `examples/model_grid.rs` does — and prints per variant the
//! quartiles from the last rank's start to the last rank's end (the grid's measure).
//!
//! `fmi run -n 2 -- target/release/examples/exchange_probe` (`PROBE_ROUNDS` per chunk,
//! `PROBE_CHUNKS`, `PROBE_IDLE` extra idle communicators, `PROBE_ONLY=2,3` a subset of the
//! variants). With `FMI_SPIN_US=0` every TCP receive sleeps instead of spinning first.

use std::time::Duration;

use fmi::{EnvSettings, JobId, Op};

fn wall_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

fn env_num(var: &str, default: usize) -> usize {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn settings(base: &EnvSettings, suffix: &str) -> fmi::Result<EnvSettings> {
    let mut s = base.clone();
    s.channel = Some("tcp".to_owned());
    s.job = JobId::new(format!("{}-{suffix}", base.job))?;
    Ok(s)
}

fn main() {
    if let Err(e) = run() {
        eprintln!("exchange_probe: {e}");
        std::process::exit(1);
    }
}

type Stamps = Vec<(u64, u64)>;

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let base = EnvSettings::from_process()?;
    let rounds = env_num("PROBE_ROUNDS", 20);
    let chunks = env_num("PROBE_CHUNKS", 20);
    let idle = env_num("PROBE_IDLE", 3);
    let data = [1u64];
    let peer = 1 - base.rank.0;

    // The async side, as `fmi calibrate` runs it: one current-thread runtime on this thread.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let acomm = rt.block_on(fmi::Communicator::from_settings(settings(&base, "async")?))?;

    let bsync = fmi::blocking::Communicator::from_settings(settings(&base, "bsync")?)?;
    let bcomm = fmi::blocking::Communicator::from_settings(settings(&base, "bcomm")?)?;
    let mut idles = Vec::new();
    for i in 0..idle {
        idles.push(fmi::blocking::Communicator::from_settings(settings(
            &base,
            &format!("idle{i}"),
        )?)?);
    }
    for c in &idles {
        c.barrier()?;
    }
    let names = [
        "A: async 1 comm, barrier; exchange",
        "B: async 1 comm, barrier; allreduce",
        "C: blocking 2 comms, barrier; allreduce (grid)",
        "D: blocking 1 comm, barrier; allreduce",
        "E: blocking 2 comms, barrier; sendrecv",
        "F: blocking 2 comms, barrier; barrier",
        "G: blocking 2 comms, barrier; isend+recv",
    ];
    let only: Option<Vec<usize>> = std::env::var("PROBE_ONLY")
        .ok()
        .map(|v| v.split(',').filter_map(|s| s.trim().parse().ok()).collect());
    let mut all: Vec<Stamps> = vec![Vec::new(); names.len()];
    for chunk in 0..chunks {
        for (v, stamps) in all.iter_mut().enumerate() {
            if only.as_ref().is_some_and(|o| !o.contains(&v)) {
                continue;
            }
            let warm = chunk == 0;
            for _ in 0..rounds + usize::from(warm) {
                let (s, e) = match v {
                    0 | 1 => rt.block_on(async {
                        acomm.barrier().await?;
                        let s = wall_ns();
                        if v == 0 {
                            let ((), got): ((), Vec<u64>) =
                                tokio::try_join!(acomm.send(peer, 7, &data), acomm.recv(peer, 7))?;
                            std::hint::black_box(got);
                        } else {
                            std::hint::black_box(acomm.allreduce(&data, Op::Sum).await?);
                        }
                        Ok::<_, fmi::Error>((s, wall_ns()))
                    })?,
                    2 => {
                        bsync.barrier()?;
                        let s = wall_ns();
                        std::hint::black_box(bcomm.allreduce(&data, Op::Sum)?);
                        (s, wall_ns())
                    }
                    3 => {
                        bcomm.barrier()?;
                        let s = wall_ns();
                        std::hint::black_box(bcomm.allreduce(&data, Op::Sum)?);
                        (s, wall_ns())
                    }
                    4 => {
                        bsync.barrier()?;
                        let s = wall_ns();
                        let got: Vec<u64> = bcomm.sendrecv(peer, 8, &data, peer, 8)?;
                        std::hint::black_box(got);
                        (s, wall_ns())
                    }
                    5 => {
                        bsync.barrier()?;
                        let s = wall_ns();
                        bcomm.barrier()?;
                        (s, wall_ns())
                    }
                    _ => {
                        bsync.barrier()?;
                        let s = wall_ns();
                        let r = bcomm.isend(peer, 9, &data)?;
                        let got: Vec<u64> = bcomm.recv(peer, 9)?;
                        r.wait()?;
                        std::hint::black_box(got);
                        (s, wall_ns())
                    }
                };
                if !warm {
                    stamps.push((s, e));
                }
            }
        }
        std::thread::sleep(Duration::from_micros(100));
    }
    for (v, stamps) in all.iter().enumerate() {
        let flat: Vec<u64> = stamps.iter().flat_map(|&(s, e)| [s, e]).collect();
        let both = bsync.allgather(&flat)?;
        let n = stamps.len();
        if n == 0 {
            continue;
        }
        let mut t: Vec<f64> = (0..n)
            .map(|i| {
                let s = both[2 * i].max(both[2 * n + 2 * i]);
                let e = both[2 * i + 1].max(both[2 * n + 2 * i + 1]);
                e.saturating_sub(s) as f64 * 1e-3
            })
            .collect();
        t.sort_by(f64::total_cmp);
        if base.rank.0 == 0 {
            println!(
                "{:<48} p25 {:6.1} µs  p50 {:6.1} µs  p75 {:6.1} µs  (n {n})",
                names[v],
                t[n / 4],
                t[n / 2],
                t[3 * n / 4]
            );
        }
    }
    drop(idles);
    Ok(())
}
