//! TCP ping-pong on loopback: fmi's blocking API over the direct TCP channel against a raw
//! blocking `std::net::TcpStream` pair, in the same run.
//!
//! ```sh
//! cargo bench --bench tcp_pingpong
//! ```
//!
//! One criterion group per message size (8 B, 64 KiB, 4 MiB), each with these functions:
//! * `raw`: two `TcpStream`s on 127.0.0.1 with `TCP_NODELAY`; rank 0 writes a length-prefixed
//!   message with one `write_all` and reads the echo with `read_exact`; a thread echoes.
//! * `fmi`: two ranks of the TCP channel, each wrapped in its own
//!   `fmi::blocking::Communicator` (own runtime, as two processes would have); rank 0 calls
//!   `send` + `recv_into`, rank 1 echoes with `recv_into` + `send` in its own thread.
//! * `fmi_vec`: the same with `recv` (the payload read into a new `Vec`) on both ranks. `fmi`'s
//!   `recv_into` reads a payload straight from the socket into the caller's buffer when it is
//!   already waiting (`Channel::recv_into`), so neither variant copies a message once more.
//!
//! One iteration is one round trip. The throughput is set to the bytes moved per round trip
//! (2 × size), so criterion's "thrpt" is `size / half round trip`. After criterion, a second,
//! interleaved measurement (see [`interleaved`]) prints the half round trips and the ratios
//! fmi / raw that docs/benchmarks.md quotes.
//!
//! Every loop is bounded: the echo threads stop on an empty message (fmi) or end of stream
//! (raw), and every fmi call has a 60 s deadline.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::mpsc;
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
    /// Receive with `recv` (into a new `Vec`) instead of `recv_into`.
    vec: bool,
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
    fn new(vec: bool) -> Fmi {
        let (tx0, rx1) = mpsc::channel();
        let (tx1, rx0) = mpsc::channel();
        let one = std::thread::spawn(move || fmi_rank(1, tx1, rx1));
        let comm = fmi_rank(0, tx0, rx0);
        let peer = one.join().expect("rank 1");
        let echo = std::thread::spawn(move || fmi_echo(peer, vec));
        Fmi {
            comm,
            echo: Some(echo),
            vec,
            out: Vec::new(),
            back: vec![0u8; MAX_SIZE],
        }
    }

    fn prepare(&mut self, size: usize) {
        self.out = vec![7u8; size];
    }

    fn round_trip(&mut self) {
        self.comm.send(1, TAG, &self.out).unwrap();
        if self.vec {
            let back: Vec<u8> = self.comm.recv(1, TAG).unwrap();
            assert_eq!(back.len(), self.out.len());
        } else {
            let n = self.comm.recv_into(1, TAG, &mut self.back).unwrap();
            assert_eq!(n, self.out.len());
        }
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
fn fmi_echo(comm: Communicator, vec: bool) {
    if vec {
        while let Ok(msg) = comm.recv::<u8>(0, TAG) {
            if msg.is_empty() || comm.send(0, TAG, &msg).is_err() {
                return;
            }
        }
        return;
    }
    let mut buf = vec![0u8; MAX_SIZE];
    while let Ok(n) = comm.recv_into(0, TAG, &mut buf) {
        if n == 0 || comm.send(0, TAG, &buf[..n]).is_err() {
            return;
        }
    }
}

// ---------------------------------------------------------------------------------- benchmark

/// The three ping-pong pairs, set up once for the whole run.
struct Pairs {
    raw: Raw,
    fmi: Fmi,
    fmi_vec: Fmi,
}

impl Pairs {
    fn new() -> Pairs {
        Pairs {
            raw: Raw::new(),
            fmi: Fmi::new(false),
            fmi_vec: Fmi::new(true),
        }
    }

    fn prepare(&mut self, size: usize) {
        self.raw.prepare(size);
        self.fmi.prepare(size);
        self.fmi_vec.prepare(size);
    }

    /// `n` round trips of function `func` (0 raw, 1 fmi, 2 fmi_vec); their duration.
    fn run(&mut self, func: usize, n: u64) -> Duration {
        let start = Instant::now();
        for _ in 0..n {
            match func {
                0 => self.raw.round_trip(),
                1 => self.fmi.round_trip(),
                _ => self.fmi_vec.round_trip(),
            }
        }
        start.elapsed()
    }
}

const FUNCS: [&str; 3] = ["raw", "fmi", "fmi_vec"];

fn bench(c: &mut Criterion, pairs: &mut Pairs) {
    for (size, name) in SIZES {
        let mut g = c.benchmark_group(format!("tcp_pingpong/{name}"));
        g.throughput(Throughput::Bytes(2 * size as u64));
        if size >= 1 << 20 {
            g.sample_size(10)
                .warm_up_time(Duration::from_millis(500))
                .measurement_time(Duration::from_secs(3));
        }
        pairs.prepare(size);
        for (func, label) in FUNCS.iter().enumerate() {
            g.bench_function(BenchmarkId::from_parameter(label), |b| {
                b.iter_custom(|iters| pairs.run(func, iters))
            });
        }
        g.finish();
    }
}

/// The ratios, measured apart from criterion with the functions interleaved: each round runs a
/// batch of every function back to back, so that load from other processes, which comes and
/// goes on a shared 2-core machine, hits all of them alike. Reports the median batch of each
/// function and the median over rounds of the per-round ratio fmi / raw.
fn interleaved(pairs: &mut Pairs) {
    const ROUNDS: usize = 9;
    const BATCH: Duration = Duration::from_millis(60);
    println!();
    println!(
        "interleaved: {ROUNDS} rounds of ~{} ms batches; half round trip (median batch), \
         size / half round trip, and median per-round ratio of times fmi / raw",
        BATCH.as_millis()
    );
    println!(
        "{:>6} {:>10} {:>9} | {:>10} {:>9} {:>6} | {:>10} {:>9} {:>6}",
        "size", "raw", "MB/s", "fmi", "MB/s", "ratio", "fmi_vec", "MB/s", "ratio"
    );
    for (size, name) in SIZES {
        pairs.prepare(size);
        // Batch length from a short calibration with raw (which is also a warm-up of sorts).
        let probe = pairs.run(0, 4).max(Duration::from_micros(1)) / 4;
        let n = ((BATCH.as_secs_f64() / probe.as_secs_f64()) as u64).clamp(4, 20_000);
        for func in 1..FUNCS.len() {
            pairs.run(func, n / 4 + 1);
        }
        let mut per_iter = vec![Vec::new(); FUNCS.len()];
        for _ in 0..ROUNDS {
            for (func, times) in per_iter.iter_mut().enumerate() {
                times.push(pairs.run(func, n).as_secs_f64() / n as f64);
            }
        }
        let median = |v: &[f64]| {
            let mut v = v.to_vec();
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let raw = median(&per_iter[0]);
        let mut line = format!(
            "{name:>6} {:>7.2} us {:>9.1}",
            raw / 2.0 * 1e6,
            size as f64 / (raw / 2.0) / 1e6
        );
        for times in &per_iter[1..] {
            let t = median(times);
            let ratios: Vec<f64> = times.iter().zip(&per_iter[0]).map(|(f, r)| f / r).collect();
            line += &format!(
                " | {:>7.2} us {:>9.1} {:>5.2}x",
                t / 2.0 * 1e6,
                size as f64 / (t / 2.0) / 1e6,
                median(&ratios)
            );
        }
        println!("{line}");
    }
}

fn main() {
    let mut c = Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .configure_from_args();
    let mut pairs = Pairs::new();
    bench(&mut c, &mut pairs);
    c.final_summary();
    // Under `cargo test` criterion runs each function once as a smoke test; skip the rest.
    if std::env::args().any(|a| a == "--bench") {
        interleaved(&mut pairs);
    }
}
