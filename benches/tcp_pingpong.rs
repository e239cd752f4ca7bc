//! TCP ping-pong on loopback: fmi's blocking API over the direct TCP channel against a raw
//! blocking `std::net::TcpStream` pair, in the same run.
//!
//! ```sh
//! cargo bench --bench tcp_pingpong
//! ```
//!
//! One criterion group per message size (8 B, 64 KiB, 4 MiB), each with two functions:
//! * `raw`: two `TcpStream`s on 127.0.0.1 with `TCP_NODELAY`; rank 0 writes a length-prefixed
//!   message with one `write_all` and reads the echo with `read_exact`; a thread echoes.
//! * `fmi`: two ranks of the TCP channel, each wrapped in its own
//!   `fmi::blocking::Communicator` (own runtime, as two processes would have); rank 0 calls
//!   `send` + `recv_into`, rank 1 echoes with `recv_into` + `send` in its own thread.
//!
//! One iteration is one round trip. The throughput is set to the bytes moved per round trip
//! (2 × size), so criterion's "thrpt" is `size / half round trip`. At the end a summary prints
//! the half round trip of each function, from the median sample, and the ratio fmi / raw.
//!
//! Every loop is bounded: the echo threads stop on an empty message (fmi) or end of stream
//! (raw), and every fmi call has a 60 s deadline.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::mpsc;
use std::sync::Mutex;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput};
use fmi::blocking::Communicator;
use fmi_channels::tcp::{TcpChannel, TcpConfig};
use fmi_channels::{JobId, Rank};

const SIZES: [(usize, &str); 3] = [(8, "8B"), (64 << 10, "64KiB"), (4 << 20, "4MiB")];
const MAX_SIZE: usize = 4 << 20;
const TAG: u32 = 7;
const DEADLINE: Duration = Duration::from_secs(60);

/// Per (size, function): (iterations, elapsed) of every timed batch criterion asked for.
static SAMPLES: Mutex<Vec<(String, &'static str, u64, Duration)>> = Mutex::new(Vec::new());

fn record(size: &str, func: &'static str, iters: u64, elapsed: Duration) {
    SAMPLES
        .lock()
        .unwrap()
        .push((size.to_owned(), func, iters, elapsed));
}

// ------------------------------------------------------------------------------------ raw TCP

struct Raw {
    stream: TcpStream,
    echo: Option<JoinHandle<()>>,
    /// Length prefix followed by the payload, written with one `write_all`.
    out: Vec<u8>,
    back: Vec<u8>,
}

impl Raw {
    fn new() -> Raw {
        let listener = TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0))).unwrap();
        let addr = listener.local_addr().unwrap();
        let stream = TcpStream::connect(addr).unwrap();
        stream.set_nodelay(true).unwrap();
        let (peer, _) = listener.accept().unwrap();
        peer.set_nodelay(true).unwrap();
        peer.set_read_timeout(Some(DEADLINE)).unwrap();
        let echo = std::thread::spawn(move || raw_echo(peer));
        Raw {
            stream,
            echo: Some(echo),
            out: Vec::with_capacity(8 + MAX_SIZE),
            back: vec![0u8; MAX_SIZE],
        }
    }

    fn prepare(&mut self, size: usize) {
        self.out.clear();
        self.out.extend_from_slice(&(size as u64).to_le_bytes());
        self.out.resize(8 + size, 7);
    }

    fn round_trip(&mut self) {
        self.stream.write_all(&self.out).unwrap();
        let mut len = [0u8; 8];
        self.stream.read_exact(&mut len).unwrap();
        let n = u64::from_le_bytes(len) as usize;
        self.stream.read_exact(&mut self.back[..n]).unwrap();
    }
}

impl Drop for Raw {
    fn drop(&mut self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Write);
        if let Some(h) = self.echo.take() {
            let _ = h.join();
        }
    }
}

/// Echoes length-prefixed messages until the stream ends (or 60 s of silence).
fn raw_echo(mut s: TcpStream) {
    let mut buf = vec![0u8; 8 + MAX_SIZE];
    loop {
        if s.read_exact(&mut buf[..8]).is_err() {
            return;
        }
        let mut len = [0u8; 8];
        len.copy_from_slice(&buf[..8]);
        let n = (u64::from_le_bytes(len) as usize).min(MAX_SIZE);
        if s.read_exact(&mut buf[8..8 + n]).is_err() || s.write_all(&buf[..8 + n]).is_err() {
            return;
        }
    }
}

// ---------------------------------------------------------------------------------------- fmi

struct Fmi {
    comm: Communicator,
    echo: Option<JoinHandle<()>>,
    out: Vec<u8>,
    back: Vec<u8>,
}

/// Builds rank `rank` of a two-rank TCP job on its own blocking communicator (and so its own
/// runtime), exchanging listening addresses with the other rank through `tx`/`rx`.
fn fmi_rank(
    rank: u32,
    tx: mpsc::Sender<SocketAddr>,
    rx: mpsc::Receiver<SocketAddr>,
) -> Communicator {
    Communicator::build(move || async move {
        let binding = TcpChannel::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0))).await?;
        tx.send(binding.local_addr()).expect("peer alive");
        let other = rx.recv().expect("peer address");
        let mut peers = vec![other; 2];
        peers[rank as usize] = binding.local_addr();
        let job = JobId::new("bench").expect("job id");
        let ch = TcpChannel::start(binding, job, Rank(rank), peers, TcpConfig::default())?;
        Ok(fmi::Communicator::builder()
            .channel(ch)
            .deadline(DEADLINE)
            .build())
    })
    .expect("communicator")
}

impl Fmi {
    fn new() -> Fmi {
        let (tx0, rx1) = mpsc::channel();
        let (tx1, rx0) = mpsc::channel();
        let one = std::thread::spawn(move || fmi_rank(1, tx1, rx1));
        let comm = fmi_rank(0, tx0, rx0);
        let peer = one.join().expect("rank 1");
        let echo = std::thread::spawn(move || fmi_echo(peer));
        Fmi {
            comm,
            echo: Some(echo),
            out: Vec::new(),
            back: vec![0u8; MAX_SIZE],
        }
    }

    fn prepare(&mut self, size: usize) {
        self.out = vec![7u8; size];
    }

    fn round_trip(&mut self) {
        self.comm.send(1, TAG, &self.out).unwrap();
        self.comm.recv_into(1, TAG, &mut self.back).unwrap();
    }
}

impl Drop for Fmi {
    fn drop(&mut self) {
        let _ = self.comm.send::<u8>(1, TAG, &[]);
        if let Some(h) = self.echo.take() {
            let _ = h.join();
        }
    }
}

/// Echoes messages from rank 0 until an empty one (or an error such as a deadline).
fn fmi_echo(comm: Communicator) {
    let mut buf = vec![0u8; MAX_SIZE];
    while let Ok(n) = comm.recv_into(0, TAG, &mut buf) {
        if n == 0 || comm.send(0, TAG, &buf[..n]).is_err() {
            return;
        }
    }
}

// ---------------------------------------------------------------------------------- benchmark

fn bench(c: &mut Criterion) {
    let mut raw = Raw::new();
    let mut fmi = Fmi::new();
    for (size, name) in SIZES {
        let mut g = c.benchmark_group(format!("tcp_pingpong/{name}"));
        g.throughput(Throughput::Bytes(2 * size as u64));
        if size >= 1 << 20 {
            g.sample_size(10)
                .warm_up_time(Duration::from_millis(500))
                .measurement_time(Duration::from_secs(3));
        }
        raw.prepare(size);
        g.bench_function(BenchmarkId::from_parameter("raw"), |b| {
            b.iter_custom(|iters| {
                let start = Instant::now();
                for _ in 0..iters {
                    raw.round_trip();
                }
                let t = start.elapsed();
                record(name, "raw", iters, t);
                t
            })
        });
        fmi.prepare(size);
        g.bench_function(BenchmarkId::from_parameter("fmi"), |b| {
            b.iter_custom(|iters| {
                let start = Instant::now();
                for _ in 0..iters {
                    fmi.round_trip();
                }
                let t = start.elapsed();
                record(name, "fmi", iters, t);
                t
            })
        });
        g.finish();
    }
}

/// Median per-iteration time of the batches recorded for `(size, func)`.
fn median(size: &str, func: &str) -> Option<Duration> {
    let samples = SAMPLES.lock().unwrap();
    let mut per_iter: Vec<f64> = samples
        .iter()
        .filter(|(s, f, iters, _)| s == size && *f == func && *iters > 0)
        .map(|(_, _, iters, t)| t.as_secs_f64() / *iters as f64)
        .collect();
    if per_iter.is_empty() {
        return None;
    }
    per_iter.sort_by(f64::total_cmp);
    Some(Duration::from_secs_f64(per_iter[per_iter.len() / 2]))
}

fn summary() {
    println!();
    println!(
        "{:>7} {:>14} {:>12} {:>14} {:>12} {:>11} {:>11}",
        "size", "raw half-rtt", "raw MB/s", "fmi half-rtt", "fmi MB/s", "rtt ratio", "thrpt ratio"
    );
    for (size, name) in SIZES {
        let (Some(raw), Some(fmi)) = (median(name, "raw"), median(name, "fmi")) else {
            continue;
        };
        let half = |d: Duration| d.as_secs_f64() / 2.0;
        let mbps = |d: Duration| size as f64 / half(d) / 1e6;
        println!(
            "{:>7} {:>11.2} us {:>12.1} {:>11.2} us {:>12.1} {:>10.2}x {:>10.2}x",
            name,
            half(raw) * 1e6,
            mbps(raw),
            half(fmi) * 1e6,
            mbps(fmi),
            fmi.as_secs_f64() / raw.as_secs_f64(),
            mbps(fmi) / mbps(raw),
        );
    }
}

fn main() {
    let mut c = Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .configure_from_args();
    bench(&mut c);
    c.final_summary();
    summary();
}
