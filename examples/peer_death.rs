//! One operation in a loop until a peer dies: the program of the peer-death trials
//! (`cli/tests/peer_death.rs`).
//!
//! ```sh
//! target/release/fmi run -n 5 -- target/release/examples/peer_death \
//!     --op allreduce --bytes 4096 --victim 2 --die-after-ms 50
//! ```
//!
//! Every rank runs `--op` on `--bytes`-byte buffers in a loop (rooted operations move their
//! root every iteration, so that every rank soon waits for every other). `--die-after-ms` after
//! the loop starts, rank `--victim` exits abruptly (code 9) from a timer thread, at whatever
//! point of the operation it is. Each other rank prints, on stdout,
//!
//! ```text
//! peer_death: rank R: KIND peer=P iteration=I: MESSAGE
//! ```
//!
//! for the error that ended its loop (KIND is `PeerLost`, `Timeout` or `Other`; P is the rank the
//! error names, or `-`; I is `start` for the barrier before the loop, which the victim may
//! leave and die while a survivor is still in it) and exits 1. With `--ignore-term` a rank ignores SIGTERM (as a rank
//! busy in a long call would seem to), so that it gets to report a `Timeout` even when
//! `fmi run` starts terminating the job before the deadline; `fmi run` then needs SIGKILL.
//! With `--leave-message` every rank first sends rank `r + 1` a message nobody receives (tag 77),
//! so that a storage channel surely holds something of the job when it is killed.
//! A loop that runs for 30 s without an error exits 2.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use fmi::blocking::Communicator;
use fmi::{Error, Op};

/// The operations a trial may pick.
const OPS: [&str; 10] = [
    "allreduce",
    "allgather",
    "alltoall",
    "barrier",
    "bcast",
    "reduce",
    "gather",
    "scatter",
    "ring",
    "scan",
];

/// Upper bound of the loop.
const LOOP_MAX_TIME: Duration = Duration::from_secs(30);

struct Args {
    op: String,
    bytes: usize,
    victim: u32,
    die_after: Duration,
    ignore_term: bool,
    leave_message: bool,
}

fn parse() -> Result<Args, String> {
    let mut args = Args {
        op: "allreduce".into(),
        bytes: 8,
        victim: 0,
        die_after: Duration::from_millis(50),
        ignore_term: false,
        leave_message: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{a} needs a value"));
        match a.as_str() {
            "--op" => args.op = value()?,
            "--bytes" => args.bytes = value()?.parse().map_err(|e| format!("--bytes: {e}"))?,
            "--victim" => args.victim = value()?.parse().map_err(|e| format!("--victim: {e}"))?,
            "--die-after-ms" => {
                let ms: u64 = value()?
                    .parse()
                    .map_err(|e| format!("--die-after-ms: {e}"))?;
                args.die_after = Duration::from_millis(ms);
            }
            "--ignore-term" => args.ignore_term = true,
            "--leave-message" => args.leave_message = true,
            _ => return Err(format!("unknown argument {a}")),
        }
    }
    if !OPS.contains(&args.op.as_str()) {
        return Err(format!("--op must be one of {OPS:?}"));
    }
    Ok(args)
}

/// Sets SIGTERM's action to "ignore", replacing any handler a library installed.
#[allow(unsafe_code)]
fn ignore_sigterm_outright() {
    use nix::sys::signal::{signal, SigHandler, Signal};
    // SAFETY: installs no Rust handler, only the kernel's "ignore" action; nothing in this
    // program relies on a SIGTERM handler once it ignores the signal.
    let _ = unsafe { signal(Signal::SIGTERM, SigHandler::SigIgn) };
}

/// Ignores SIGTERM from now on (the handler stays installed while the thread runs).
fn ignore_sigterm() -> Result<(), String> {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => {
                let _ = ready_tx.send(Err(e.to_string()));
                return;
            }
        };
        rt.block_on(async move {
            use tokio::signal::unix::{signal, SignalKind};
            match signal(SignalKind::terminate()) {
                Ok(mut term) => {
                    let _ = ready_tx.send(Ok(()));
                    while term.recv().await.is_some() {}
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e.to_string()));
                }
            }
        });
    });
    ready_rx.recv().map_err(|e| e.to_string()).and_then(|r| r)
}

fn one(comm: &Communicator, op: &str, i: u64, buf: &[u64]) -> fmi::Result<()> {
    let (r, n) = (comm.rank().0, comm.size());
    let root = (i % u64::from(n)) as u32;
    match op {
        "allreduce" => comm.allreduce(buf, Op::Sum).map(drop),
        "allgather" => comm.allgather(buf).map(drop),
        "alltoall" => {
            let per = buf.len().div_ceil(n as usize).max(1);
            comm.alltoall(&vec![u64::from(r); per * n as usize])
                .map(drop)
        }
        "barrier" => comm.barrier(),
        "bcast" => comm.bcast(root, buf).map(drop),
        "reduce" => comm.reduce(root, buf, Op::Max).map(drop),
        "gather" => comm.gather(root, buf).map(drop),
        "scatter" => {
            let per = buf.len().div_ceil(n as usize).max(1);
            comm.scatter(root, &vec![i; per * n as usize]).map(drop)
        }
        "ring" => {
            let (next, prev) = ((r + 1) % n, (r + n - 1) % n);
            comm.sendrecv::<u64, u64>(next, 5, buf, prev, 5).map(drop)
        }
        _ => comm.scan(buf, Op::Sum).map(drop),
    }
}

fn main() -> ExitCode {
    let args = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("peer_death: {e}");
            return ExitCode::from(2);
        }
    };
    if args.ignore_term {
        if let Err(e) = ignore_sigterm() {
            eprintln!("peer_death: cannot handle SIGTERM: {e}");
            return ExitCode::from(2);
        }
    }
    let comm = match Communicator::from_env() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("peer_death: {e}");
            return ExitCode::from(2);
        }
    };
    if args.ignore_term {
        // With the `rdma` feature, libfabric's providers install a SIGTERM handler that exits
        // with status 1 when the channels start, and it runs before ours: ignore the signal
        // outright from here on.
        ignore_sigterm_outright();
    }
    let (r, n) = (comm.rank().0, comm.size());
    if let Err(e) = comm.barrier() {
        // The victim may die as soon as its own barrier returned, while a survivor is still
        // in it: that survivor's error is reported like one that ends the loop.
        report(r, &e, "start");
    }
    if args.leave_message {
        // A message nobody receives: the job surely has something stored when it is killed.
        if let Err(e) = comm.send((r + 1) % n, 77, &[u64::from(r); 64]) {
            eprintln!("peer_death: rank {r}: send failed: {e}");
            return ExitCode::from(2);
        }
    }
    println!("peer_death: rank {r}/{n}: looping over {}", args.op);
    if r == args.victim {
        let after = args.die_after;
        std::thread::spawn(move || {
            std::thread::sleep(after);
            eprintln!("peer_death: rank {r}: dying now");
            std::process::exit(9);
        });
    }
    let buf: Vec<u64> = (0..args.bytes.div_ceil(8).max(1) as u64).collect();
    let started = Instant::now();
    let mut i = 0u64;
    while started.elapsed() < LOOP_MAX_TIME {
        if let Err(e) = one(&comm, &args.op, i, &buf) {
            report(r, &e, &i.to_string());
        }
        i += 1;
    }
    println!("peer_death: rank {r}: no error after {i} iterations");
    ExitCode::from(2)
}

/// Prints the error that ended this rank's run in the trials' format and leaves at once, as a
/// failed rank would, without saying goodbye to anyone.
fn report(r: u32, e: &Error, iteration: &str) -> ! {
    let kind = match e {
        Error::PeerLost { .. } => "PeerLost",
        Error::Timeout { .. } => "Timeout",
        _ => "Other",
    };
    let peer = e.peer().map_or("-".to_owned(), |p| p.0.to_string());
    println!("peer_death: rank {r}: {kind} peer={peer} iteration={iteration}: {e}");
    std::process::exit(1);
}
