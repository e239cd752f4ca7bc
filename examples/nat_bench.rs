//! Connection setup, latency and throughput between ranks 0 and 1 over whatever path the TCP
//! channel chose (direct, punched or relayed): the numbers behind the "NAT traversal" section of
//! docs/benchmarks.md. Not a test; run it in the NAT testbed (docs/nat.md):
//!
//! ```sh
//! scripts/netns.sh up nb cone cone
//! scripts/netns.sh exec nb srv target/release/fmi rendezvous --listen 203.0.113.1:7000 &
//! for r in 0 1; do node=a; [ $r = 1 ] && node=b
//!   FMI_RANK=$r FMI_SIZE=2 FMI_JOB=bench FMI_RENDEZVOUS=203.0.113.1:7000 \
//!     scripts/netns.sh exec nb $node target/release/examples/nat_bench & done; wait
//! scripts/netns.sh down nb
//! ```
//! Add `FMI_DIRECT_TRANSPORT=quic` to the ranks' environment to measure the QUIC transport
//! (and `FMI_STUN=203.0.113.1:3478,203.0.113.2:3478` with coturn on the server namespace, as the
//! NAT matrix does, so that each rank learns its QUIC socket's public mapping).
//! Rank 0 prints one line: `setup_ms=… rtt_us=… mib_per_s=…` (setup: the first 1-byte round
//! trip, which makes the connection; rtt: the median of 200 1-byte round trips; throughput: 64
//! messages of 1 MiB one way, then a 1-byte acknowledgement).

use std::time::Instant;

use fmi::blocking::Communicator;

const ROUND_TRIPS: usize = 200;
const MESSAGES: usize = 64;
const MESSAGE: usize = 1 << 20;

fn main() {
    if let Err(e) = run() {
        eprintln!("nat_bench: {e}");
        std::process::exit(1);
    }
}

fn run() -> fmi::Result<()> {
    let comm = Communicator::from_env()?;
    let me = comm.rank().0;
    if me > 1 {
        return Ok(());
    }
    let other = 1 - me;
    let ping = |tag: u32| -> fmi::Result<()> {
        if me == 0 {
            comm.send(other, tag, &[1u8])?;
            comm.recv::<u8>(other, tag)?;
        } else {
            comm.recv::<u8>(other, tag)?;
            comm.send(other, tag, &[1u8])?;
        }
        Ok(())
    };
    let started = Instant::now();
    ping(0)?;
    let setup = started.elapsed();
    let mut rtts = Vec::with_capacity(ROUND_TRIPS);
    for i in 0..ROUND_TRIPS {
        let t = Instant::now();
        ping(1 + i as u32)?;
        rtts.push(t.elapsed());
    }
    rtts.sort();
    let data = vec![7u8; MESSAGE];
    let tag = 10_000;
    let t = Instant::now();
    if me == 0 {
        for _ in 0..MESSAGES {
            comm.send(other, tag, &data)?;
        }
        comm.recv::<u8>(other, tag + 1)?;
    } else {
        for _ in 0..MESSAGES {
            comm.recv::<u8>(other, tag)?;
        }
        comm.send(other, tag + 1, &[1u8])?;
    }
    let secs = t.elapsed().as_secs_f64();
    if me == 0 {
        println!(
            "setup_ms={:.1} rtt_us={:.0} mib_per_s={:.0}",
            setup.as_secs_f64() * 1e3,
            rtts[ROUND_TRIPS / 2].as_secs_f64() * 1e6,
            (MESSAGES * MESSAGE) as f64 / (1 << 20) as f64 / secs
        );
    }
    Ok(())
}
