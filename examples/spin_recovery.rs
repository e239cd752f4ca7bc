//! Diagnostic (session 10): does a TCP link whose receives stopped spinning start again once
//! its peer answers quickly? Two ranks over the direct TCP channel, blocking API. Phase "slow":
//! rank 1 answers each of `RECOVERY_SLOW` (default 12) pings after `RECOVERY_SLOW_US` (2000) µs,
//! so rank 0's spins miss and its link backs off. Phase "fast": `RECOVERY_CHUNKS` (10) chunks
//! of `RECOVERY_ROUNDS` (200) 8-byte ping-pongs; per chunk rank 0 prints the median half round
//! trip and both ranks' `spins_caught` / `spins_missed` / `spins_skipped` deltas.
//!
//! `fmi run -n 2 -- target/release/examples/spin_recovery`. Every loop is bounded by these
//! counts and every call by the configuration's deadline.

use std::time::{Duration, Instant};

use fmi::blocking::Communicator;

fn env_num(var: &str, default: usize) -> usize {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn spins(comm: &Communicator) -> [u64; 3] {
    let c = comm.counters();
    let get = |name: &str| c.iter().find(|(n, _)| *n == name).map_or(0, |&(_, v)| v);
    [
        get("spins_caught"),
        get("spins_missed"),
        get("spins_skipped"),
    ]
}

fn main() {
    if let Err(e) = run() {
        eprintln!("spin_recovery: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let comm = Communicator::from_env()?;
    if comm.size() != 2 {
        return Err("run with exactly 2 ranks".into());
    }
    let me = comm.rank().0;
    let peer = 1 - me;
    let slow = env_num("RECOVERY_SLOW", 12);
    let slow_us = env_num("RECOVERY_SLOW_US", 2000) as u64;
    let chunks = env_num("RECOVERY_CHUNKS", 10);
    let rounds = env_num("RECOVERY_ROUNDS", 200);
    let data = [7u64];
    comm.barrier()?;
    for _ in 0..slow {
        if me == 0 {
            comm.send(peer, 1, &data)?;
            let _: Vec<u64> = comm.recv(peer, 1)?;
        } else {
            let _: Vec<u64> = comm.recv(peer, 1)?;
            std::thread::sleep(Duration::from_micros(slow_us));
            comm.send(peer, 1, &data)?;
        }
    }
    let after_slow = spins(&comm);
    if me == 0 {
        println!("after slow phase: rank 0 spins caught/missed/skipped {after_slow:?}");
    }
    let mut before = after_slow;
    for chunk in 0..chunks {
        let mut times = Vec::with_capacity(rounds);
        for _ in 0..rounds {
            let t = Instant::now();
            if me == 0 {
                comm.send(peer, 2, &data)?;
                let _: Vec<u64> = comm.recv(peer, 2)?;
            } else {
                let _: Vec<u64> = comm.recv(peer, 2)?;
                comm.send(peer, 2, &data)?;
            }
            times.push(t.elapsed());
        }
        times.sort();
        let now = spins(&comm);
        let d: Vec<u64> = (0..3).map(|i| now[i] - before[i]).collect();
        before = now;
        let line = format!(
            "chunk {chunk}: rank {me} p50 half round trip {:.2} µs, spins caught/missed/skipped {d:?}",
            times[times.len() / 2].as_secs_f64() * 1e6 / 2.0
        );
        // Rank 1 reports through rank 0 so that the lines stay in order.
        if me == 1 {
            comm.send(0, 3, line.as_bytes())?;
        } else {
            let other: Vec<u8> = comm.recv(1, 3)?;
            println!("{line}\n{}", String::from_utf8_lossy(&other));
        }
    }
    Ok(())
}
