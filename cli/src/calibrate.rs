//! `fmi calibrate`: measure α and β (and requests per message) of every configured channel on
//! this deployment, and write a profile the model then uses (`[model] profile = "FILE"`).
//!
//! ```text
//!  fmi calibrate --config job.toml --out profile.toml
//!    ├─ fmi setup (bucket, table), an embedded rendezvous server
//!    ├─ N ranks of `fmi calibrate-rank` (like `fmi run`), each opening one communicator per
//!    │  channel (job ID-<channel>) plus one over TCP for synchronisation
//!    │    push channels (tcp, redis): ping-pong rank 0 ↔ rank 1, one-way = half the round trip,
//!    │      each round started after a barrier (as a collective's rounds start, not as a warm
//!    │      back-to-back stream, whose receiver is already spinning on the socket)
//!    │      alternating with exchanges: after a barrier ranks 0 and 1 send to each other and
//!    │      receive at once (a collective's step); per round the last start to the last end
//!    │      on the host's wall clock (the ranks run on this host)
//!    │    polling channels (s3, dynamodb): rank 0 sends, tells rank 1 over TCP that the message
//!    │      is stored, rank 1 receives; one-way = write time + read time (the model's α + nβ:
//!    │      the poll schedule is the adapter's setting, not a property of the channel)
//!    │    every rank writes its samples and request counters to a file
//!    └─ median per size ─► calibrate::fit (least squares) ─► [model.<channel>] alpha_ms,
//!       bandwidth_mb_per_sec, exchange_extra_ms (push channels: at the smallest size, the
//!       median over the rounds of each round's exchange minus that round's one-way time,
//!       calibrate::exchange_extra), aggregate_mb_per_sec (channels through one shared
//!       server, Redis, and TCP between ranks of one host: both ranks' bytes over the largest
//!       exchange's time less that extra), reduce_mb_per_sec (this host's f32 sum),
//!       with the measurements as comments
//! ```

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Args;
use fmi::{Communicator, EnvSettings, JobId};
use fmi_model::calibrate::{aggregate_from_exchange, exchange_extra, fit, median};
use fmi_model::{Bytes, ChannelKind, ChannelParams, JobConfig, Seconds};

use crate::launcher::{self, Outcome, RunOptions};

/// Arguments of `fmi calibrate`.
#[derive(Args, Debug)]
pub(crate) struct CalibrateArgs {
    /// The job's TOML configuration: the channels its [channels.*] sections set up (tcp is
    /// always measured: the measuring job has a rendezvous server).
    #[arg(long, value_name = "FILE")]
    config: PathBuf,
    /// Where to write the profile (TOML: [model.<channel>] tables).
    #[arg(short = 'o', long, value_name = "FILE")]
    out: PathBuf,
    /// Ranks of the measuring job (ranks 0 and 1 measure; the others only join).
    #[arg(short = 'n', long, value_name = "N", default_value_t = 2, value_parser = clap::value_parser!(u32).range(2..=64))]
    ranks: u32,
    /// Message sizes in bytes (comma-separated, at least two different ones).
    #[arg(long, value_name = "LIST", value_delimiter = ',', default_values_t = [8u64, 65_536, 1_048_576])]
    sizes: Vec<u64>,
    /// Timed messages per size and channel (after one untimed warm-up).
    #[arg(long, value_name = "K", default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=1000))]
    rounds: u32,
    /// Channels to measure (comma-separated: tcp,redis,s3,dynamodb). Default: tcp and every
    /// channel the config sets up.
    #[arg(long, value_name = "LIST", value_delimiter = ',')]
    channels: Option<Vec<String>>,
    /// Stop the measuring job after this many seconds.
    #[arg(long, value_name = "SECS", default_value_t = 300.0)]
    timeout: f64,
    /// Bind each rank of the measuring job to a core of its own, as `fmi run --bind` (measure
    /// the way the job will run).
    #[arg(long, value_enum, default_value_t = crate::launcher::Bind::Core)]
    bind: crate::launcher::Bind,
}

/// Arguments of the hidden `fmi calibrate-rank` (one rank of the measuring job).
#[derive(Args, Debug)]
pub(crate) struct RankArgs {
    /// Folder to write `rank-R.txt` into.
    #[arg(long)]
    results: PathBuf,
    #[arg(long, value_delimiter = ',')]
    sizes: Vec<u64>,
    #[arg(long)]
    rounds: u32,
    #[arg(long, value_delimiter = ',')]
    channels: Vec<String>,
}

fn fail(detail: impl std::fmt::Display) -> ExitCode {
    eprintln!("fmi calibrate: {detail}");
    ExitCode::from(2)
}

/// The largest message calibrate accepts (a bound on memory and time).
const MAX_SIZE: u64 = 256 << 20;

pub(crate) async fn run(args: CalibrateArgs) -> ExitCode {
    let text = match std::fs::read_to_string(&args.config) {
        Ok(t) => t,
        Err(e) => return fail(format!("--config {}: {e}", args.config.display())),
    };
    // Without its [model] section: the ranks force one channel per communicator, and a
    // `profile` key may name the very file being made.
    let text = match toml::from_str::<toml::Table>(&text) {
        Ok(mut t) => {
            t.remove("model");
            t.to_string()
        }
        Err(e) => return fail(format!("{}: {e}", args.config.display())),
    };
    let origin = args.config.display().to_string();
    let job_config = match JobConfig::from_toml(&text) {
        Ok(j) => j,
        Err(e) => return fail(format!("{origin}: {e}")),
    };
    let cfg = match fmi::Config::from_toml(&text, Some(&origin)) {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    let channels: Vec<ChannelKind> = match &args.channels {
        Some(list) => match list.iter().map(|s| s.trim().parse()).collect() {
            Ok(v) => v,
            Err(e) => return fail(e),
        },
        None => job_config.channels(true),
    };
    let channels = fmi_model::canonical(&channels);
    for ch in &channels {
        if ch.is_storage() && !cfg.channels.configured().contains(&ch.name()) {
            return fail(format!(
                "channel {ch} is not set up by {} (no [channels.{ch}] section, or this build \
                 lacks it: {})",
                args.config.display(),
                fmi::storage::BACKENDS.join(", ")
            ));
        }
    }
    let mut sizes = args.sizes.clone();
    sizes.sort_unstable();
    sizes.dedup();
    if sizes.len() < 2 || sizes.iter().any(|&s| s == 0 || s > MAX_SIZE) {
        return fail(format!(
            "--sizes: give at least two different sizes between 1 and {MAX_SIZE} bytes"
        ));
    }
    if !(args.timeout.is_finite() && args.timeout > 0.0) {
        return fail("--timeout must be a positive number of seconds");
    }
    if !cfg.channels.configured().is_empty() {
        if let Err(e) = fmi::storage::setup(&cfg).await {
            return fail(format!("creating the bucket or table: {e}"));
        }
    }
    let dir = std::env::temp_dir().join(format!(
        "fmi-calibrate-{}-{}",
        std::process::id(),
        crate::random_job()
    ));
    if let Err(e) = std::fs::create_dir_all(&dir) {
        return fail(format!("cannot create {}: {e}", dir.display()));
    }
    let outcome = measure(&args, &text, &dir, &channels, &sizes, &cfg).await;
    let _ = std::fs::remove_dir_all(&dir);
    let samples = match outcome {
        Ok(s) => s,
        Err(e) => return fail(e),
    };
    let profile = match profile(&args, &channels, &samples) {
        Ok(p) => p,
        Err(e) => return fail(e),
    };
    if let Err(e) = std::fs::write(&args.out, &profile) {
        return fail(format!("cannot write {}: {e}", args.out.display()));
    }
    print!("{profile}");
    eprintln!(
        "fmi calibrate: wrote {}; use it with `[model] profile = \"{}\"` in the job's \
         configuration",
        args.out.display(),
        args.out.display()
    );
    ExitCode::SUCCESS
}

/// What the ranks measured: per channel and size, the one-way times (rank 0) and the request
/// counters summed over the ranks with the number of messages they cover.
#[derive(Default)]
struct Samples {
    times: BTreeMap<(ChannelKind, u64), Vec<f64>>,
    requests: BTreeMap<(ChannelKind, u64), BTreeMap<String, u64>>,
    messages: BTreeMap<(ChannelKind, u64), u64>,
    /// Exchanges (push channels): per (channel, size, round), each rank's (start, end) on the
    /// host's wall clock in nanoseconds.
    exchanges: BTreeMap<(ChannelKind, u64, u32), Vec<(u64, u64)>>,
    /// The one-way time of each round (push channels), to pair with that round's exchange.
    round_times: BTreeMap<(ChannelKind, u64, u32), f64>,
}

impl Samples {
    /// Per size of `ch`, per round, the last start to the last end (s) of the exchange.
    fn exchange_rounds(&self, ch: ChannelKind) -> BTreeMap<u64, BTreeMap<u32, f64>> {
        let mut per_size: BTreeMap<u64, BTreeMap<u32, f64>> = BTreeMap::new();
        for (&(c, bytes, round), stamps) in &self.exchanges {
            if c != ch || stamps.len() < 2 {
                continue;
            }
            let start = stamps.iter().map(|s| s.0).max().unwrap_or(0);
            let end = stamps.iter().map(|s| s.1).max().unwrap_or(0);
            per_size
                .entry(bytes)
                .or_default()
                .insert(round, end.saturating_sub(start) as f64 * 1e-9);
        }
        per_size
    }

    /// Per size of `ch`, the median over the rounds of the last start to the last end (s).
    fn exchange_medians(&self, ch: ChannelKind) -> BTreeMap<u64, f64> {
        self.exchange_rounds(ch)
            .into_iter()
            .map(|(b, v)| (b, median(&v.into_values().collect::<Vec<_>>())))
            .collect()
    }

    /// Per round of size `bytes` on `ch` that measured both: (one-way, exchange) (s).
    fn paired_rounds(&self, ch: ChannelKind, bytes: u64) -> Vec<(Seconds, Seconds)> {
        self.exchange_rounds(ch)
            .remove(&bytes)
            .into_iter()
            .flatten()
            .filter_map(|(round, x)| {
                self.round_times
                    .get(&(ch, bytes, round))
                    .map(|&t| (Seconds(t), Seconds(x)))
            })
            .collect()
    }
}

async fn measure(
    args: &CalibrateArgs,
    text: &str,
    dir: &Path,
    channels: &[ChannelKind],
    sizes: &[u64],
    cfg: &fmi::Config,
) -> Result<Samples, String> {
    let config_path = dir.join("config.toml");
    std::fs::write(&config_path, text).map_err(|e| e.to_string())?;
    let exe = std::env::current_exe().map_err(|e| format!("cannot find the fmi binary: {e}"))?;
    let list = |v: Vec<String>| v.join(",");
    let program = vec![
        exe.into_os_string(),
        "calibrate-rank".into(),
        "--results".into(),
        dir.as_os_str().to_owned(),
        "--sizes".into(),
        list(sizes.iter().map(u64::to_string).collect()).into(),
        "--rounds".into(),
        args.rounds.to_string().into(),
        "--channels".into(),
        list(channels.iter().map(|c| c.name().to_owned()).collect()).into(),
    ];
    let job = crate::random_job();
    let opts = RunOptions {
        ranks: args.ranks,
        job: job.clone(),
        config: Some(config_path),
        timeout: Some(Duration::from_secs_f64(args.timeout)),
        channel: None,
        bind: args.bind,
        program,
    };
    let server = fmi_rendezvous::Server::bind(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        fmi_rendezvous::ServerConfig::default(),
    )
    .await
    .map_err(|e| format!("cannot start the embedded rendezvous server: {e}"))?;
    let addr = server.local_addr();
    let handle = server.spawn();
    let outcome = launcher::run(&opts, addr).await;
    handle.shutdown().await;
    for ch in channels.iter().filter(|c| c.is_storage()) {
        if let Ok(sub) = JobId::new(format!("{job}-{ch}")) {
            if let Ok(n @ 1..) = fmi::storage::cleanup(cfg, &sub).await {
                eprintln!("fmi calibrate: removed {n} leftover objects of job {sub}");
            }
        }
    }
    match outcome {
        Ok(Outcome::Success) => {}
        Ok(Outcome::RankFailed { rank, status, .. }) => {
            return Err(format!(
                "rank {rank} of the measuring job failed ({status})"
            ))
        }
        Ok(Outcome::TimedOut(t)) => {
            return Err(format!(
                "the measuring job did not finish within {t:?} (raise --timeout, or use fewer \
                 --rounds or smaller --sizes)"
            ))
        }
        Ok(Outcome::Signalled(sig)) => return Err(format!("stopped by signal {sig}")),
        Err(e) => return Err(e.to_string()),
    }
    let mut samples = Samples::default();
    for rank in 0..args.ranks {
        let path = dir.join(format!("rank-{rank}.txt"));
        let text = std::fs::read_to_string(&path)
            .map_err(|e| format!("rank {rank} wrote no results ({}: {e})", path.display()))?;
        parse_results(&text, &mut samples).map_err(|e| format!("rank {rank}'s results: {e}"))?;
    }
    Ok(samples)
}

/// Lines: `time CHANNEL BYTES SECONDS [ROUND]`, `messages CHANNEL BYTES N`,
/// `requests CHANNEL BYTES NAME VALUE`, `exchange CHANNEL BYTES ROUND START_NS END_NS`.
fn parse_results(text: &str, samples: &mut Samples) -> Result<(), String> {
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let f: Vec<&str> = line.split_whitespace().collect();
        let bad = || format!("bad line {line:?}");
        let key = |i: usize| -> Result<(ChannelKind, u64), String> {
            let ch: ChannelKind = f.get(i).ok_or_else(bad)?.parse().map_err(|_| bad())?;
            let b: u64 = f.get(i + 1).ok_or_else(bad)?.parse().map_err(|_| bad())?;
            Ok((ch, b))
        };
        match f.first().copied() {
            Some("time") if f.len() == 4 || f.len() == 5 => {
                let s: f64 = f[3].parse().map_err(|_| bad())?;
                let (ch, bytes) = key(1)?;
                samples.times.entry((ch, bytes)).or_default().push(s);
                if let Some(round) = f.get(4) {
                    let round: u32 = round.parse().map_err(|_| bad())?;
                    samples.round_times.insert((ch, bytes, round), s);
                }
            }
            Some("messages") if f.len() == 4 => {
                let n: u64 = f[3].parse().map_err(|_| bad())?;
                *samples.messages.entry(key(1)?).or_default() += n;
            }
            Some("exchange") if f.len() == 6 => {
                let (ch, bytes) = key(1)?;
                let round: u32 = f[3].parse().map_err(|_| bad())?;
                let start: u64 = f[4].parse().map_err(|_| bad())?;
                let end: u64 = f[5].parse().map_err(|_| bad())?;
                samples
                    .exchanges
                    .entry((ch, bytes, round))
                    .or_default()
                    .push((start, end));
            }
            Some("requests") if f.len() == 5 => {
                let v: u64 = f[4].parse().map_err(|_| bad())?;
                *samples
                    .requests
                    .entry(key(1)?)
                    .or_default()
                    .entry(f[3].to_owned())
                    .or_default() += v;
            }
            _ => return Err(bad()),
        }
    }
    Ok(())
}

/// The profile: a comment block per channel with what was measured, then its fitted table.
fn profile(
    args: &CalibrateArgs,
    channels: &[ChannelKind],
    samples: &Samples,
) -> Result<String, String> {
    let when = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# fmi calibrate profile (unix time {when}): {} ranks, {} timed messages per size, \
         config {}.\n# Use it with `[model] profile = \"FILE\"`; keys set in the \
         configuration's [model.<channel>] win.\n# One-way time: push channels half a \
         ping-pong, polling channels write + read of a stored message.",
        args.ranks,
        args.rounds,
        args.config.display()
    );
    let (mb, runs) = reduce_speed();
    let _ = writeln!(
        out,
        "\n# Element-wise reduction on this host: f32 sum of {} KiB into {} KiB, median of {runs} \
         runs (the model's reduce time per byte of every reducing step).\n[model]\n\
         reduce_mb_per_sec = {mb}",
        REDUCE_PROBE_BYTES >> 10,
        REDUCE_PROBE_BYTES >> 10
    );
    for &ch in channels {
        let mut points = Vec::new();
        let _ = writeln!(out, "\n# {ch}: bytes, median one-way, requests per message");
        for (&(c, bytes), times) in samples.times.range((ch, 0)..=(ch, u64::MAX)) {
            debug_assert_eq!(c, ch);
            let m = median(times);
            points.push((Bytes(bytes), Seconds(m)));
            let msgs = samples
                .messages
                .get(&(ch, bytes))
                .copied()
                .unwrap_or(0)
                .max(1);
            let per_message = |spins: bool| -> Vec<String> {
                samples
                    .requests
                    .get(&(ch, bytes))
                    .into_iter()
                    .flatten()
                    .filter(|(name, v)| {
                        **v > 0 && !name.starts_with("bytes") && name.starts_with("spins_") == spins
                    })
                    .map(|(name, v)| format!("{name} {:.2}", *v as f64 / msgs as f64))
                    .collect()
            };
            let reqs = per_message(false);
            let mut reqs = if reqs.is_empty() {
                "-".to_owned()
            } else {
                reqs.join(", ")
            };
            // TCP: how its receives waited (spun and caught the message, spun in vain, slept
            // at once by the spin back-off), which decides its latency (docs/benchmarks.md,
            // session 9).
            let spins = per_message(true);
            if !spins.is_empty() {
                reqs = format!("{reqs} (receives: {})", spins.join(", "));
            }
            let _ = writeln!(out, "#   {bytes:>10} B  {:>10}  {reqs}", Seconds(m));
        }
        let f = fit(&points).map_err(|e| format!("{ch}: {e}"))?;
        let exchanges = samples.exchange_medians(ch);
        if !exchanges.is_empty() {
            let _ = writeln!(
                out,
                "# {ch}: bytes, median exchange (both ranks send and receive at once; last start \
                 to last end)"
            );
            for (bytes, t) in &exchanges {
                let _ = writeln!(out, "#   {bytes:>10} B  {:>10}", Seconds(*t));
            }
        }
        out.push_str(&f.to_toml(ch));
        // The exchange's extra over a one-way message, at the smallest size (latency, not
        // bandwidth: the aggregate bandwidth already prices a step's volume): the median over
        // the rounds of each round's exchange minus its own one-way time.
        let mut extra = Seconds::ZERO;
        if let Some(&bytes) = exchanges.keys().next() {
            if let Some(e) = exchange_extra(&samples.paired_rounds(ch, bytes)) {
                extra = e;
                let _ = writeln!(
                    out,
                    "# {ch}: exchange extra at {bytes} B, median of the rounds' (exchange - \
                     one-way): {e}"
                );
                let _ = writeln!(out, "exchange_extra_ms = {}", extra.millis());
            }
        }
        // A channel through one shared server (Redis): its aggregate bandwidth, from the
        // largest exchange, instead of the default's guess (400 MB/s from the FMI paper, which
        // priced a local server's 1 MiB exchange at 2-3x what it took). TCP too: the measuring
        // job's ranks share this host, whose loopback copies both directions of an exchange
        // (a 1 MiB exchange took 524 µs against 273 µs one way, session 10).
        if ChannelParams::defaults(ch).aggregate_beta.0 > 0.0 || ch == ChannelKind::Tcp {
            if let Some(mb) = exchanges
                .iter()
                .next_back()
                .and_then(|(&bytes, &t)| aggregate_from_exchange(Bytes(bytes), Seconds(t), extra))
            {
                let _ = writeln!(out, "aggregate_mb_per_sec = {mb}");
            }
        }
    }
    Ok(out)
}

/// Bytes of each vector [`reduce_speed`] reduces: a collective's typical piece, in cache.
const REDUCE_PROBE_BYTES: usize = 1 << 20;

/// This host's element-wise reduction speed in MB/s, and the number of timed runs: the median
/// over runs of fmi's own `f32` sum of one [`REDUCE_PROBE_BYTES`] vector into another (after
/// one untimed run). The model's default (1000 MB/s, a guess) priced a 2-rank 64 KiB TCP
/// allreduce at 62 µs against 29 µs measured (docs/benchmarks.md, session 10).
fn reduce_speed() -> (f64, usize) {
    const RUNS: usize = 21;
    let n = REDUCE_PROBE_BYTES / std::mem::size_of::<f32>();
    let other: Vec<f32> = (0..n).map(|i| (i % 1000) as f32 * 0.5).collect();
    let mut inout: Vec<f32> = vec![1.0; n];
    let mut times = Vec::with_capacity(RUNS);
    for run in 0..=RUNS {
        let start = Instant::now();
        <f32 as fmi::Numeric>::reduce_slices(fmi::Op::Sum, &other, &mut inout, false);
        std::hint::black_box(&mut inout);
        if run > 0 {
            times.push(start.elapsed().as_secs_f64());
        }
    }
    let t = median(&times).max(1e-9);
    (REDUCE_PROBE_BYTES as f64 / t / 1e6, RUNS)
}

// ---------------------------------------------------------------------------------------------
// One rank of the measuring job.

/// A tag per (channel, size) step so that steps never mix.
fn tag(step: usize) -> u32 {
    1000 + step as u32
}

/// Measures on a thread of its own with a single-threaded runtime, the way the blocking API
/// (`fmi::blocking`, C, Python) runs a rank, so that the profile predicts what those programs
/// see. On the command's multi-threaded runtime every message also paid a wake-up across
/// threads: an 8-byte TCP one-way time came out at 26–89 µs against 12–46 µs measured by the
/// model grid through the blocking API.
pub(crate) async fn rank_main(args: RankArgs) -> ExitCode {
    let measured = std::thread::Builder::new()
        .name("fmi-calibrate".into())
        .spawn(move || -> Result<(), String> {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| format!("runtime: {e}"))?
                .block_on(rank_run(&args))
                .map_err(|e| e.to_string())
        })
        .map_err(|e| format!("thread: {e}"))
        .and_then(|t| {
            t.join()
                .map_err(|_| "the measuring thread panicked".to_owned())?
        });
    match measured {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fmi calibrate-rank: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn open(base: &EnvSettings, channel: &str) -> fmi::Result<Communicator> {
    let mut s = base.clone();
    s.channel = Some(channel.to_owned());
    s.job = JobId::new(format!("{}-{channel}", base.job))?;
    Communicator::from_settings(s).await
}

async fn rank_run(args: &RankArgs) -> Result<(), Box<dyn std::error::Error>> {
    let base = EnvSettings::from_process()?;
    let me = base.rank.0;
    // TCP carries the synchronisation of the polling channels' measurements.
    let sync = open(&base, "tcp").await?;
    let mut lines = String::new();
    let mut step = 0usize;
    for name in &args.channels {
        let kind: ChannelKind = name.parse()?;
        let comm = if kind == ChannelKind::Tcp {
            sync.clone()
        } else {
            open(&base, name).await?
        };
        let push = comm.channel().capabilities().push;
        for &bytes in &args.sizes {
            step += 1;
            let t = tag(step);
            let buf = vec![0x5au8; bytes as usize];
            // Exchanges (push channels): ranks 0 and 1 send to each other and receive at once,
            // as a collective's step does. Their rounds alternate with the ping-pong's, so that
            // both see the same load on a shared machine.
            let xt = t + 100_000;
            let exchanging = push && me < 2;
            // One untimed message (connections, caches), then the counters' starting point.
            one(&comm, &sync, push, me, t, &buf).await?;
            sync.barrier().await?;
            if exchanging {
                exchange(&comm, 1 - me, xt, &buf).await?;
            }
            sync.barrier().await?;
            let before = comm.counters();
            for round in 0..args.rounds {
                if push {
                    sync.barrier().await?;
                }
                if let Some(secs) = one(&comm, &sync, push, me, t, &buf).await? {
                    let _ = writeln!(lines, "time {kind} {bytes} {secs} {round}");
                }
                if push {
                    sync.barrier().await?;
                }
                if exchanging {
                    let start = wall_ns();
                    exchange(&comm, 1 - me, xt, &buf).await?;
                    let end = wall_ns();
                    let _ = writeln!(lines, "exchange {kind} {bytes} {round} {start} {end}");
                }
            }
            sync.barrier().await?;
            let after = comm.counters();
            for (name, v) in &after {
                let b = before
                    .iter()
                    .find(|(n, _)| n == name)
                    .map_or(0, |(_, v)| *v);
                let _ = writeln!(lines, "requests {kind} {bytes} {name} {}", v - b);
            }
            if me == 0 {
                // Push channels: two messages per ping-pong and two per exchange.
                let msgs = u64::from(args.rounds) * if push { 4 } else { 1 };
                let _ = writeln!(lines, "messages {kind} {bytes} {msgs}");
            }
        }
        comm.barrier().await?;
    }
    sync.barrier().await?;
    std::fs::write(args.results.join(format!("rank-{me}.txt")), lines)?;
    Ok(())
}

/// One timed message between ranks 0 and 1; rank 0 returns its one-way time.
async fn one(
    comm: &Communicator,
    sync: &Communicator,
    push: bool,
    me: u32,
    tag: u32,
    buf: &[u8],
) -> fmi::Result<Option<f64>> {
    match (me, push) {
        (0, true) => {
            let t0 = Instant::now();
            comm.send(1, tag, buf).await?;
            let back: Vec<u8> = comm.recv(1, tag).await?;
            let rtt = t0.elapsed().as_secs_f64();
            check(&back, buf)?;
            Ok(Some(rtt / 2.0))
        }
        (1, true) => {
            let got: Vec<u8> = comm.recv(0, tag).await?;
            comm.send(0, tag, &got).await?;
            Ok(None)
        }
        (0, false) => {
            let t0 = Instant::now();
            comm.send(1, tag, buf).await?;
            let write = t0.elapsed().as_secs_f64();
            sync.send(1, tag, &[write]).await?;
            let read: Vec<f64> = sync.recv(1, tag).await?;
            Ok(Some(write + read.first().copied().unwrap_or(0.0)))
        }
        (1, false) => {
            let _stored: Vec<f64> = sync.recv(0, tag).await?;
            let t0 = Instant::now();
            let got: Vec<u8> = comm.recv(0, tag).await?;
            let read = t0.elapsed().as_secs_f64();
            check(&got, buf)?;
            sync.send(0, tag, &[read]).await?;
            Ok(None)
        }
        _ => Ok(None),
    }
}

/// Sends `buf` to `peer` and receives its message at once, as a collective's step does.
async fn exchange(comm: &Communicator, peer: u32, tag: u32, buf: &[u8]) -> fmi::Result<()> {
    let ((), got): ((), Vec<u8>) =
        tokio::try_join!(comm.send(peer, tag, buf), comm.recv(peer, tag))?;
    check(&got, buf)
}

/// Nanoseconds of the host's wall clock (the same clock in every rank on this host).
fn wall_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

fn check(got: &[u8], sent: &[u8]) -> fmi::Result<()> {
    if got == sent {
        Ok(())
    } else {
        Err(fmi::Error::InvalidArgument {
            what: "calibration message came back altered",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exchanges_pair_the_ranks_by_round() {
        let mut samples = Samples::default();
        // Round 0: rank 1 starts last (at 200) and ends last (at 500): 300 ns. Round 1: 100 ns.
        // Round 2: only one rank's stamps, skipped.
        let rank0 = "exchange redis 8 0 100 450\nexchange redis 8 1 1000 1100\n\
                     exchange redis 8 2 5 9\ntime redis 8 0.00004\n";
        let rank1 = "exchange redis 8 0 200 500\nexchange redis 8 1 1000 1090\n";
        parse_results(rank0, &mut samples).unwrap();
        parse_results(rank1, &mut samples).unwrap();
        let m = samples.exchange_medians(ChannelKind::Redis);
        assert_eq!(m.len(), 1);
        assert!((m[&8] - 200e-9).abs() < 1e-15, "{m:?}");
        assert!(samples.exchange_medians(ChannelKind::Tcp).is_empty());
        assert!(parse_results("exchange redis 8 0 1\n", &mut samples).is_err());
    }

    #[test]
    fn rounds_pair_their_one_way_time_with_their_exchange() {
        let mut samples = Samples::default();
        // Round 0: one-way 100 ns, exchange 300 ns; round 1: 90 and 110; round 2 has no
        // exchange of both ranks and round 3 no one-way time (an old line without a round).
        let rank0 = "time redis 8 1e-7 0\ntime redis 8 9e-8 1\ntime redis 8 5e-8 2\n\
                     time redis 8 7e-8\nexchange redis 8 0 100 450\nexchange redis 8 1 1000 1100\n\
                     exchange redis 8 2 5 9\nexchange redis 8 3 0 10\n";
        let rank1 = "exchange redis 8 0 200 500\nexchange redis 8 1 1000 1090\n\
                     exchange redis 8 3 0 10\n";
        parse_results(rank0, &mut samples).unwrap();
        parse_results(rank1, &mut samples).unwrap();
        assert_eq!(samples.times[&(ChannelKind::Redis, 8)].len(), 4);
        let pairs = samples.paired_rounds(ChannelKind::Redis, 8);
        assert_eq!(pairs.len(), 2, "{pairs:?}");
        assert!((pairs[0].0 .0 - 1e-7).abs() < 1e-15 && (pairs[0].1 .0 - 3e-7).abs() < 1e-15);
        assert!((pairs[1].0 .0 - 9e-8).abs() < 1e-15 && (pairs[1].1 .0 - 1e-7).abs() < 1e-15);
        assert!(samples.paired_rounds(ChannelKind::Tcp, 8).is_empty());
        assert!(parse_results("time redis 8 1e-7 x\n", &mut samples).is_err());
    }
}
