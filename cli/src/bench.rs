//! `fmi bench`: OSU-style microbenchmarks of fmi's point-to-point and collective operations,
//! optionally next to the same benchmarks over MPICH (`--vs-mpi`).
//!
//! ```text
//!   fmi bench ──► embedded rendezvous server + `fmi run`'s launcher
//!       │            └─► N × `fmi bench --worker-report SOCK …` (this binary, one rank each)
//!       │                   rank 0 ──► SOCK: progress and one result line per size
//!       ├─► (--vs-mpi) mpirun.mpich -n N fmi-mpi-baseline …   (network path, then shared memory)
//!       └─► table on stdout, ratios, --csv FILE, --plot FILE.png
//! ```
//!
//! With `--channel memory` the ranks are threads of this process over the in-memory channel.
//! The methodology (sizes, iterations, statistics, result lines) lives in `bench_stats.rs`,
//! which the MPI baseline includes too.

use std::ffi::OsString;
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use tokio::io::AsyncBufReadExt;
use tokio::sync::mpsc;

use crate::bench_stats::{
    default_iters, default_warmup, format_result, human_size, max_over_ranks, parse_result,
    parse_sizes, stats, BenchOp, Stats,
};
use crate::launcher::{self, Outcome, RunOptions};

/// The tag of the ping-pong messages (collectives use their own tag space).
const PING_TAG: u32 = 0x0be7;

/// How often rank 0 reports progress at most.
const PROGRESS_EVERY: Duration = Duration::from_millis(100);

/// Arguments of `fmi bench`.
#[derive(clap::Args, Debug)]
pub(crate) struct BenchArgs {
    /// The operation: pingpong, bcast, reduce, allreduce, allgather, alltoall, gather,
    /// scatter, barrier or scan.
    #[arg(long, value_parser = BenchOp::parse)]
    op: BenchOp,
    /// Message sizes in bytes, comma-separated, with binary suffixes (1K = 1024). Per rank for
    /// gather/allgather, per destination for alltoall/scatter; reductions sum f32 elements.
    #[arg(long, default_value = "8,1K,64K,1M", value_name = "LIST")]
    sizes: String,
    /// Number of ranks.
    #[arg(short = 'n', long = "ranks", value_name = "N", default_value_t = 2,
          value_parser = clap::value_parser!(u32).range(1..=4096))]
    ranks: u32,
    /// The channel: tcp (processes, as `fmi run`), memory (threads of this process), or a
    /// storage channel configured in --config.
    #[arg(long, default_value = "tcp", value_name = "NAME")]
    channel: String,
    /// Timed iterations per size (default: 500 up to 8 KiB, 100 up to 256 KiB, 30 up to 4 MiB,
    /// 10 above).
    #[arg(long, value_name = "K", value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    iters: Option<u64>,
    /// Untimed warm-up iterations per size (default: a tenth of the timed ones, 2 to 50).
    #[arg(long, value_name = "W")]
    warmup: Option<u64>,
    /// Write every result (fmi and MPI) as CSV to FILE.
    #[arg(long, value_name = "FILE")]
    csv: Option<PathBuf>,
    /// Draw latency against size (one line per implementation and channel) into FILE.png.
    #[arg(long, value_name = "FILE.png")]
    plot: Option<PathBuf>,
    /// Run the same benchmark over MPICH too (its network path and its shared-memory path) and
    /// print the ratio fmi / MPI per size.
    #[arg(long)]
    vs_mpi: bool,
    /// TOML configuration passed to every rank (storage channels, deadlines).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Stop each run (fmi or MPI) after this many seconds.
    #[arg(long, value_name = "SECS", default_value_t = 600.0)]
    timeout: f64,
    /// The MPI baseline program (default: `fmi-mpi-baseline` next to this `fmi`, or
    /// $FMI_MPI_BASELINE).
    #[arg(long, value_name = "PATH")]
    mpi_baseline: Option<PathBuf>,
    /// The MPI launcher for --vs-mpi.
    #[arg(long, value_name = "PROGRAM", default_value = "mpirun.mpich")]
    mpirun: String,
    /// Bind each rank to a core of its own ("core", as `fmi run --bind`; the MPI baseline then
    /// runs with `-bind-to core` too) or not ("none", `-bind-to none`).
    #[arg(long, value_enum, default_value_t = crate::launcher::Bind::Core)]
    bind: crate::launcher::Bind,
    /// Internal: run as one rank of the benchmark job and report to this socket.
    #[arg(long, hide = true, value_name = "SOCK")]
    worker_report: Option<PathBuf>,
}

/// What rank 0 tells the driver.
#[derive(Debug)]
enum Event {
    /// Iterations (warm-up and timed, over all sizes so far) done.
    Progress(u64),
    /// One size finished.
    Result(Row),
}

/// One line of the results.
#[derive(Clone, Debug)]
pub(crate) struct Row {
    pub(crate) size: usize,
    pub(crate) iters: usize,
    pub(crate) stats: Stats,
}

/// The results of one implementation over one path.
#[derive(Debug)]
pub(crate) struct Series {
    /// `fmi`, `mpich`.
    pub(crate) implementation: &'static str,
    /// `tcp`, `memory`, `ucx-tcp`, `shm`.
    pub(crate) channel: String,
    pub(crate) rows: Vec<Row>,
}

impl Series {
    /// The legend of the series in plots.
    #[cfg_attr(not(feature = "plot"), allow(dead_code))]
    pub(crate) fn label(&self) -> String {
        format!("{} ({})", self.implementation, self.channel)
    }
}

/// What every rank needs to know.
#[derive(Clone, Debug)]
struct Spec {
    op: BenchOp,
    sizes: Vec<usize>,
    iters: Option<usize>,
    warmup: Option<usize>,
}

impl Spec {
    fn iters_of(&self, size: usize) -> (usize, usize) {
        let iters = self.iters.unwrap_or_else(|| default_iters(size));
        (iters, self.warmup.unwrap_or_else(|| default_warmup(iters)))
    }

    fn total_iterations(&self) -> u64 {
        self.sizes
            .iter()
            .map(|&s| {
                let (i, w) = self.iters_of(s);
                (i + w) as u64
            })
            .sum()
    }
}

fn usage(msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("fmi bench: {msg}");
    ExitCode::from(2)
}

/// `fmi bench`.
pub(crate) async fn run(args: BenchArgs) -> ExitCode {
    let sizes = match parse_sizes(&args.sizes) {
        Ok(s) => s,
        Err(e) => return usage(format!("--sizes: {e}")),
    };
    let spec = Spec {
        op: args.op,
        sizes: args.op.effective_sizes(&sizes),
        iters: args.iters.map(|i| i as usize),
        warmup: args.warmup.map(|w| w as usize),
    };
    if let Some(sock) = &args.worker_report {
        return worker(spec, sock.clone()).await;
    }
    if args.ranks < args.op.min_ranks() {
        return usage(format!(
            "{} needs at least {} ranks (--ranks {})",
            args.op,
            args.op.min_ranks(),
            args.op.min_ranks()
        ));
    }
    if !(args.timeout.is_finite() && args.timeout > 0.0) {
        return usage(format!(
            "--timeout {}: must be a positive number of seconds",
            args.timeout
        ));
    }
    if args.plot.is_some() && !cfg!(feature = "plot") {
        return usage("--plot: this fmi was built without the `plot` feature");
    }
    if let Some(path) = &args.config {
        if let Err(e) = fmi::Config::from_file(path) {
            return usage(format!("--config: {e}"));
        }
    }
    let baseline = if args.vs_mpi {
        match find_baseline(args.mpi_baseline.as_deref()) {
            Ok(b) => Some(b),
            Err(e) => return usage(format!("--vs-mpi: {e}")),
        }
    } else {
        None
    };
    raise_fd_limit(args.ranks);

    let mut all: Vec<Series> = Vec::new();
    let fmi_rows = match run_fmi(&args, &spec).await {
        Ok(rows) => rows,
        Err(e) => {
            eprintln!("fmi bench: {e}");
            return ExitCode::FAILURE;
        }
    };
    all.push(Series {
        implementation: "fmi",
        channel: args.channel.clone(),
        rows: fmi_rows,
    });
    let mut mpi_failed = false;
    if let Some(baseline) = &baseline {
        for (path, env) in [
            (
                "ucx-tcp",
                &[("MPIR_CVAR_NOLOCAL", "1"), ("UCX_TLS", "tcp,self")][..],
            ),
            ("shm", &[][..]),
        ] {
            match run_mpi(&args, &spec, baseline, env).await {
                Ok(rows) => all.push(Series {
                    implementation: "mpich",
                    channel: path.into(),
                    rows,
                }),
                Err(e) => {
                    // fmi's results are still worth printing; the exit code says it failed.
                    eprintln!("fmi bench: MPI baseline ({path}): {e}");
                    mpi_failed = true;
                }
            }
        }
    }

    let mut out = String::new();
    for s in &all {
        out.push_str(&table(args.op, args.ranks, s));
        out.push('\n');
    }
    if all.len() > 1 {
        out.push_str(&ratios(args.op, &all));
    }
    print!("{out}");
    let _ = std::io::stdout().flush();

    if let Some(path) = &args.csv {
        if let Err(e) = std::fs::write(path, csv(args.op, args.ranks, &all)) {
            eprintln!("fmi bench: --csv {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
    }
    if let Some(path) = &args.plot {
        if let Err(e) = plot(path, args.op, args.ranks, &all) {
            eprintln!("fmi bench: --plot {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
    }
    if mpi_failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

#[cfg(feature = "plot")]
fn plot(path: &Path, op: BenchOp, ranks: u32, all: &[Series]) -> Result<(), String> {
    let title = format!("{op}, {ranks} ranks: average latency");
    crate::bench_plot::draw(path, &title, all)
}

#[cfg(not(feature = "plot"))]
fn plot(_path: &Path, _op: BenchOp, _ranks: u32, _all: &[Series]) -> Result<(), String> {
    Err("this fmi was built without the `plot` feature".into())
}

/// A job of hundreds of ranks needs more descriptors than the usual soft limit of 1024: the
/// launcher holds two pipes per rank and every rank a connection per peer. Raises the soft
/// limit to the hard one (the ranks inherit it) when that may be needed.
fn raise_fd_limit(ranks: u32) {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let want = 64 + 8 * u64::from(ranks);
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < want && soft < hard {
            let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
        }
        if hard < want {
            eprintln!(
                "fmi bench: warning: {ranks} ranks may need {want} file descriptors, the limit \
                 is {hard} (raise it with `ulimit -n`)"
            );
        }
    }
}

fn progress_bar(total: u64, what: &str) -> indicatif::ProgressBar {
    use std::io::IsTerminal;
    if !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let pb = indicatif::ProgressBar::with_draw_target(
        Some(total),
        indicatif::ProgressDrawTarget::stderr(),
    );
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{prefix} [{elapsed_precise}] {wide_bar} {pos}/{len} iterations {msg}",
    ) {
        pb.set_style(style);
    }
    pb.set_prefix(what.to_owned());
    pb
}

/// Runs the fmi job and returns rank 0's results.
async fn run_fmi(args: &BenchArgs, spec: &Spec) -> Result<Vec<Row>, String> {
    let pb = progress_bar(
        spec.total_iterations(),
        &format!("fmi {} x{} ({})", spec.op, args.ranks, args.channel),
    );
    let (tx, mut rx) = mpsc::unbounded_channel::<Event>();
    // Moves the progress bar and collects the results until every sender is gone.
    let consumer = tokio::spawn(async move {
        let mut rows = Vec::new();
        while let Some(ev) = rx.recv().await {
            match ev {
                Event::Progress(n) => pb.set_position(n),
                Event::Result(r) => rows.push(r),
            }
        }
        pb.finish_and_clear();
        rows
    });
    let job = if args.channel == "memory" {
        let spec = spec.clone();
        let ranks = args.ranks;
        let handle = std::thread::spawn(move || run_threads(ranks, &spec, &tx));
        tokio::task::spawn_blocking(move || handle.join())
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r.map_err(|_| "a benchmark thread panicked".to_owned()))
            .and_then(|r| r)
    } else {
        run_processes(args, spec, tx).await
    };
    let rows = consumer.await.map_err(|e| e.to_string())?;
    job?;
    if rows.len() != spec.sizes.len() {
        return Err(format!(
            "rank 0 reported {} of {} sizes",
            rows.len(),
            spec.sizes.len()
        ));
    }
    Ok(rows)
}

/// The in-process job: one thread per rank over the memory channel.
fn run_threads(ranks: u32, spec: &Spec, tx: &mpsc::UnboundedSender<Event>) -> Result<(), String> {
    let world = fmi::blocking::local_world(ranks).map_err(|e| e.to_string())?;
    std::thread::scope(|s| {
        let handles: Vec<_> = world
            .into_iter()
            .map(|comm| {
                let tx = tx.clone();
                s.spawn(move || {
                    let mut sink = |ev: Event| {
                        let _ = tx.send(ev);
                    };
                    run_rank(&comm, spec, &mut sink)
                })
            })
            .collect();
        let mut first_err = None;
        for (rank, h) in handles.into_iter().enumerate() {
            let r = h
                .join()
                .unwrap_or_else(|_| Err("the thread panicked".into()));
            if let (Err(e), None) = (r, &first_err) {
                first_err = Some(format!("rank {rank}: {e}"));
            }
        }
        first_err.map_or(Ok(()), Err)
    })
}

/// The multi-process job, through `fmi run`'s launcher.
async fn run_processes(
    args: &BenchArgs,
    spec: &Spec,
    tx: mpsc::UnboundedSender<Event>,
) -> Result<(), String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find the fmi binary: {e}"))?;
    let job = crate::random_job();
    let sock = std::env::temp_dir().join(format!("fmi-bench-{job}.sock"));
    let _ = std::fs::remove_file(&sock);
    let listener = tokio::net::UnixListener::bind(&sock)
        .map_err(|e| format!("cannot listen on {}: {e}", sock.display()))?;
    let _remove = RemoveOnDrop(sock.clone());

    // Collector: rank 0 connects once and writes lines until it exits.
    let mut collector = tokio::spawn(async move {
        let Ok((stream, _)) = listener.accept().await else {
            return;
        };
        let mut lines = tokio::io::BufReader::new(stream).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            if let Some(n) = line.strip_prefix("progress ") {
                if let Ok(n) = n.trim().parse() {
                    let _ = tx.send(Event::Progress(n));
                }
            } else if let Some((size, iters, stats)) = parse_result(&line) {
                let _ = tx.send(Event::Result(Row { size, iters, stats }));
            }
        }
    });

    let mut program: Vec<OsString> = vec![
        exe.into_os_string(),
        "bench".into(),
        "--op".into(),
        spec.op.name().into(),
        "--sizes".into(),
        join_sizes(&spec.sizes).into(),
    ];
    if let Some(i) = spec.iters {
        program.extend(["--iters".into(), i.to_string().into()]);
    }
    if let Some(w) = spec.warmup {
        program.extend(["--warmup".into(), w.to_string().into()]);
    }
    program.extend(["--worker-report".into(), sock.clone().into_os_string()]);

    let server = fmi_rendezvous::Server::bind(
        std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
        fmi_rendezvous::ServerConfig::default(),
    )
    .await
    .map_err(|e| format!("cannot start the embedded rendezvous server: {e}"))?;
    let addr = server.local_addr();
    let handle = server.spawn();
    let opts = RunOptions {
        ranks: args.ranks,
        job,
        config: args.config.clone(),
        timeout: Some(Duration::from_secs_f64(args.timeout)),
        channel: Some(args.channel.clone()),
        bind: args.bind,
        program,
    };
    let outcome = launcher::run(&opts, addr).await;
    handle.shutdown().await;
    let outcome = outcome.map_err(|e| e.to_string())?;
    match outcome {
        Outcome::Success => {
            // Rank 0 has exited, so its end of the socket is closed: the collector ends (unless
            // a process rank 0 started still holds the socket).
            let _ = tokio::time::timeout(Duration::from_secs(5), &mut collector).await;
            collector.abort();
            Ok(())
        }
        other => {
            collector.abort();
            Err(match other {
                Outcome::RankFailed { rank, status, .. } => {
                    format!("rank {rank} of the benchmark job failed ({status})")
                }
                Outcome::TimedOut(t) => {
                    format!("the benchmark job did not finish within {t:?} (--timeout)")
                }
                Outcome::Signalled(sig) => format!("stopped by signal {sig}"),
                Outcome::Success => unreachable!("handled above"),
            })
        }
    }
}

struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn join_sizes(sizes: &[usize]) -> String {
    sizes
        .iter()
        .map(usize::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// One rank of a process job (`--worker-report`).
async fn worker(spec: Spec, sock: PathBuf) -> ExitCode {
    // The blocking communicator refuses to run on a runtime thread: use a plain one.
    let thread = std::thread::spawn(move || -> Result<(), String> {
        let comm = fmi::blocking::Communicator::from_env().map_err(|e| e.to_string())?;
        let mut report = if comm.rank().0 == 0 {
            Some(
                std::os::unix::net::UnixStream::connect(&sock)
                    .map_err(|e| format!("cannot report to {}: {e}", sock.display()))?,
            )
        } else {
            None
        };
        let mut sink = |ev: Event| {
            if let Some(s) = report.as_mut() {
                let line = match ev {
                    Event::Progress(n) => format!("progress {n}\n"),
                    Event::Result(r) => format!("{}\n", format_result(r.size, r.iters, &r.stats)),
                };
                // The driver reads until this rank exits; a driver that is gone ends the job
                // anyway.
                let _ = s.write_all(line.as_bytes());
            }
        };
        run_rank(&comm, &spec, &mut sink)
    });
    match tokio::task::spawn_blocking(move || thread.join()).await {
        Ok(Ok(Ok(()))) => ExitCode::SUCCESS,
        Ok(Ok(Err(e))) => {
            eprintln!("fmi bench worker: {e}");
            ExitCode::FAILURE
        }
        _ => {
            eprintln!("fmi bench worker: the benchmark thread panicked");
            ExitCode::FAILURE
        }
    }
}

/// Runs every size of the benchmark on one rank; rank 0 reports through `sink`.
fn run_rank(
    comm: &fmi::blocking::Communicator,
    spec: &Spec,
    sink: &mut dyn FnMut(Event),
) -> Result<(), String> {
    let me = comm.rank().0;
    let n = comm.size();
    if n < spec.op.min_ranks() {
        return Err(format!(
            "{} needs at least {} ranks",
            spec.op,
            spec.op.min_ranks()
        ));
    }
    let mut done = 0u64;
    let mut last_report = Instant::now();
    for &size in &spec.sizes {
        let (iters, warmup) = spec.iters_of(size);
        let mut progress = |k: u64, force: bool| {
            if me == 0 && (force || last_report.elapsed() >= PROGRESS_EVERY) {
                last_report = Instant::now();
                sink(Event::Progress(done + k));
            }
        };
        let times = run_size(comm, spec.op, size, iters, warmup, &mut progress)
            .map_err(|e| format!("{} of {}: {e}", spec.op, human_size(size)))?;
        done += (iters + warmup) as u64;
        // Every rank's per-iteration times to rank 0, which keeps the max over ranks.
        let gathered = comm.gather(0, &times).map_err(|e| e.to_string())?;
        if let Some(all) = gathered {
            let per_rank: Vec<Vec<f64>> = all.chunks(iters).map(<[f64]>::to_vec).collect();
            let job_times = if spec.op == BenchOp::PingPong {
                per_rank.first().cloned().unwrap_or_default()
            } else {
                max_over_ranks(&per_rank)
            };
            sink(Event::Progress(done));
            sink(Event::Result(Row {
                size,
                iters,
                stats: stats(&job_times),
            }));
        }
    }
    comm.barrier().map_err(|e| e.to_string())
}

/// `warmup` + `iters` iterations of `op` on `size` bytes; this rank's time of each timed
/// iteration, in seconds. Collectives start each iteration with a barrier; ping-pong does not
/// (the round trip synchronises the pair) and times half of rank 0's round trip.
fn run_size(
    comm: &fmi::blocking::Communicator,
    op: BenchOp,
    size: usize,
    iters: usize,
    warmup: usize,
    progress: &mut dyn FnMut(u64, bool),
) -> fmi::Result<Vec<f64>> {
    use fmi::Op;
    let n = comm.size() as usize;
    let me = comm.rank().0;
    let elems = size / 4;
    let bytes = vec![1u8; size];
    let mut bytes_out = vec![0u8; size];
    let all_in = vec![2u8; size * n];
    let mut all_out = vec![0u8; size * n];
    let floats = vec![me as f32 + 1.0; elems];
    let mut floats_out = vec![0.0f32; elems];
    let mut times = vec![0.0f64; iters];
    comm.barrier()?;
    for i in 0..warmup + iters {
        if op != BenchOp::PingPong {
            comm.barrier()?;
        }
        let t0 = Instant::now();
        match op {
            BenchOp::PingPong => match me {
                0 => {
                    comm.send(1, PING_TAG, &bytes)?;
                    comm.recv_into(1, PING_TAG, &mut bytes_out)?;
                }
                1 => {
                    comm.recv_into(0, PING_TAG, &mut bytes_out)?;
                    comm.send(0, PING_TAG, &bytes_out)?;
                }
                _ => {}
            },
            BenchOp::Bcast => comm.bcast_into(0, &mut bytes_out)?,
            BenchOp::Reduce => drop(comm.reduce(0, &floats, Op::Sum)?),
            BenchOp::Allreduce => comm.allreduce_into(&floats, &mut floats_out, Op::Sum)?,
            BenchOp::Scan => drop(comm.scan(&floats, Op::Sum)?),
            BenchOp::Allgather => comm.allgather_into(&bytes, &mut all_out)?,
            BenchOp::Alltoall => drop(comm.alltoall(&all_in)?),
            BenchOp::Gather => drop(comm.gather(0, &bytes)?),
            BenchOp::Scatter => {
                let data: &[u8] = if me == 0 { &all_in } else { &[] };
                drop(comm.scatter(0, data)?);
            }
            BenchOp::Barrier => comm.barrier()?,
        }
        let mut t = t0.elapsed().as_secs_f64();
        if op == BenchOp::PingPong {
            t /= 2.0;
        }
        if i >= warmup {
            times[i - warmup] = t;
        }
        progress(i as u64 + 1, false);
    }
    if op == BenchOp::Allgather && warmup + iters > 0 && all_out.iter().any(|&b| b != 1) {
        return Err(fmi::Error::InvalidArgument {
            what: "allgather returned a wrong block",
        });
    }
    if op == BenchOp::Allreduce {
        // A benchmark of wrong results is worthless: rank r adds r + 1, so the sum is n(n+1)/2.
        let want = (n * (n + 1) / 2) as f32;
        if floats_out.first().is_some_and(|&v| v != want) {
            return Err(fmi::Error::InvalidArgument {
                what: "allreduce returned a wrong sum",
            });
        }
    }
    Ok(times)
}

/// Where the MPI baseline program is.
fn find_baseline(given: Option<&Path>) -> Result<PathBuf, String> {
    let candidate = given
        .map(Path::to_path_buf)
        .or_else(|| std::env::var_os("FMI_MPI_BASELINE").map(PathBuf::from))
        .or_else(|| {
            std::env::current_exe()
                .ok()
                .and_then(|e| e.parent().map(|d| d.join("fmi-mpi-baseline")))
        })
        .ok_or("cannot locate the MPI baseline; pass --mpi-baseline PATH")?;
    if candidate.is_file() {
        Ok(candidate)
    } else {
        Err(format!(
            "no MPI baseline at {}: build it with `cargo build --release --workspace --features \
             mpi-baseline` (needs `apt-get install -y mpich libmpich-dev libclang-dev`) or pass \
             --mpi-baseline PATH",
            candidate.display()
        ))
    }
}

/// Runs the MPI baseline under mpirun with `env` set, returning rank 0's results.
async fn run_mpi(
    args: &BenchArgs,
    spec: &Spec,
    baseline: &Path,
    env: &[(&str, &str)],
) -> Result<Vec<Row>, String> {
    let label = if env.is_empty() { "shm" } else { "ucx-tcp" };
    let pb = progress_bar(
        spec.sizes.len() as u64,
        &format!("mpich {} x{} ({label})", spec.op, args.ranks),
    );
    let mut cmd = tokio::process::Command::new(&args.mpirun);
    let bind = match args.bind {
        crate::launcher::Bind::Core => "core",
        crate::launcher::Bind::None => "none",
    };
    cmd.arg("-n")
        .arg(args.ranks.to_string())
        .args(["-bind-to", bind])
        .arg(baseline)
        .args(["--op", spec.op.name(), "--sizes", &join_sizes(&spec.sizes)]);
    if let Some(i) = spec.iters {
        cmd.args(["--iters", &i.to_string()]);
    }
    if let Some(w) = spec.warmup {
        cmd.args(["--warmup", &w.to_string()]);
    }
    // The shared-memory run must not inherit a network-path setting from the caller.
    cmd.env_remove("MPIR_CVAR_NOLOCAL").env_remove("UCX_TLS");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .process_group(0)
        .kill_on_drop(true);
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot start {}: {e} (is MPICH installed?)", args.mpirun))?;
    let stdout = child.stdout.take().ok_or("no stdout from mpirun")?;
    let group = child.id();
    let mut rows = Vec::new();
    let work = async {
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            if let Some((size, iters, stats)) = parse_result(&line) {
                rows.push(Row { size, iters, stats });
                pb.set_position(rows.len() as u64);
                if rows.len() == spec.sizes.len() {
                    break;
                }
            } else {
                println!("[mpi] {line}");
            }
        }
        if rows.len() == spec.sizes.len() {
            // Every result is in. MPICH 4.0.2 over UCX tcp sometimes never leaves
            // MPI_Finalize; a job that has not ended after a grace period is stopped.
            if let Ok(status) = tokio::time::timeout(MPI_FINALIZE_GRACE, child.wait()).await {
                return status;
            }
            eprintln!(
                "fmi bench: {} had not ended {MPI_FINALIZE_GRACE:?} after its last result \
                 (MPICH over UCX tcp can hang in MPI_Finalize); stopped it",
                args.mpirun
            );
            stop_group(group).await;
            let _ = child.wait().await;
            return Ok(std::process::ExitStatus::default());
        }
        child.wait().await
    };
    let status = tokio::time::timeout(Duration::from_secs_f64(args.timeout), work).await;
    pb.finish_and_clear();
    if status.is_err() {
        stop_group(group).await;
    }
    match status {
        Err(_) => Err(format!(
            "{} did not finish within {} s (--timeout)",
            args.mpirun, args.timeout
        )),
        Ok(Err(e)) => Err(format!("waiting for {}: {e}", args.mpirun)),
        Ok(Ok(s)) if !s.success() => Err(format!("{} failed ({s})", args.mpirun)),
        Ok(Ok(_)) if rows.len() != spec.sizes.len() => Err(format!(
            "the baseline reported {} of {} sizes",
            rows.len(),
            spec.sizes.len()
        )),
        Ok(Ok(_)) => Ok(rows),
    }
}

/// How long an MPI job may take to end once it has reported every result.
const MPI_FINALIZE_GRACE: Duration = Duration::from_secs(5);

/// Stops mpirun and everything it started (its own process group): SIGTERM, which Hydra
/// forwards to its proxies and ranks, then SIGKILL.
async fn stop_group(pgid: Option<u32>) {
    use nix::sys::signal::{killpg, Signal};
    let Some(pgid) = pgid.and_then(|p| i32::try_from(p).ok()) else {
        return;
    };
    let pgid = nix::unistd::Pid::from_raw(pgid);
    let _ = killpg(pgid, Signal::SIGTERM);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let _ = killpg(pgid, Signal::SIGKILL);
}

fn us(s: f64) -> f64 {
    s * 1e6
}

/// Bandwidth of a ping-pong row in MB/s (10^6 bytes per second).
fn mb_per_s(r: &Row) -> f64 {
    if r.stats.avg > 0.0 {
        r.size as f64 / r.stats.avg / 1e6
    } else {
        0.0
    }
}

/// The OSU-style table of one series.
fn table(op: BenchOp, ranks: u32, s: &Series) -> String {
    let mut t = String::new();
    let _ = writeln!(
        t,
        "# {} {op} on {ranks} ranks, channel {}",
        s.implementation, s.channel
    );
    let _ = write!(
        t,
        "{:>10} {:>7} {:>11} {:>11} {:>11} {:>11} {:>11}",
        "size", "iters", "avg(us)", "min(us)", "max(us)", "p50(us)", "p99(us)"
    );
    if op == BenchOp::PingPong {
        let _ = write!(t, " {:>10}", "MB/s");
    }
    t.push('\n');
    for r in &s.rows {
        let _ = write!(
            t,
            "{:>10} {:>7} {:>11.2} {:>11.2} {:>11.2} {:>11.2} {:>11.2}",
            human_size(r.size),
            r.iters,
            us(r.stats.avg),
            us(r.stats.min),
            us(r.stats.max),
            us(r.stats.p50),
            us(r.stats.p99)
        );
        if op == BenchOp::PingPong {
            let _ = write!(t, " {:>10.1}", mb_per_s(r));
        }
        t.push('\n');
    }
    t
}

/// fmi / MPI per size: ratios of the average and of the median latency against each MPI path
/// (> 1: fmi is slower; the median is the steadier of the two on a shared machine), and for
/// ping-pong the bandwidth ratio fmi / MPI (< 1: fmi is slower).
fn ratios(op: BenchOp, all: &[Series]) -> String {
    let mut t = String::new();
    let Some((fmi, others)) = all.split_first() else {
        return t;
    };
    let _ = writeln!(
        t,
        "# ratio fmi / MPI per size (latency: > 1 means fmi is slower; bandwidth: < 1)"
    );
    let _ = write!(t, "{:>10} {:>11} {:>11}", "size", "fmi avg", "fmi p50");
    for o in others {
        let _ = write!(
            t,
            " {:>13} {:>13} {:>9} {:>9}",
            format!("{} avg", o.channel),
            format!("{} p50", o.channel),
            "avg/avg",
            "p50/p50"
        );
        if op == BenchOp::PingPong {
            let _ = write!(t, " {:>8}", "bw");
        }
    }
    t.push('\n');
    for r in &fmi.rows {
        let _ = write!(
            t,
            "{:>10} {:>11.2} {:>11.2}",
            human_size(r.size),
            us(r.stats.avg),
            us(r.stats.p50)
        );
        for o in others {
            match o.rows.iter().find(|x| x.size == r.size) {
                Some(m) if m.stats.avg > 0.0 && m.stats.p50 > 0.0 => {
                    let _ = write!(
                        t,
                        " {:>13.2} {:>13.2} {:>8.2}x {:>8.2}x",
                        us(m.stats.avg),
                        us(m.stats.p50),
                        r.stats.avg / m.stats.avg,
                        r.stats.p50 / m.stats.p50
                    );
                    if op == BenchOp::PingPong {
                        let _ = write!(t, " {:>7.2}x", m.stats.avg / r.stats.avg.max(1e-12));
                    }
                }
                _ => {
                    let _ = write!(t, " {:>13} {:>13} {:>9} {:>9}", "-", "-", "-", "-");
                    if op == BenchOp::PingPong {
                        let _ = write!(t, " {:>8}", "-");
                    }
                }
            }
        }
        t.push('\n');
    }
    t
}

/// The CSV header `--csv` writes.
pub(crate) const CSV_HEADER: &str =
    "implementation,channel,op,ranks,size_bytes,iters,avg_us,min_us,max_us,p50_us,p99_us,mb_per_s";

fn csv(op: BenchOp, ranks: u32, all: &[Series]) -> String {
    let mut t = String::from(CSV_HEADER);
    t.push('\n');
    for s in all {
        for r in &s.rows {
            let bw = if op == BenchOp::PingPong {
                format!("{:.3}", mb_per_s(r))
            } else {
                String::new()
            };
            let _ = writeln!(
                t,
                "{},{},{op},{ranks},{},{},{:.3},{:.3},{:.3},{:.3},{:.3},{bw}",
                s.implementation,
                s.channel,
                r.size,
                r.iters,
                us(r.stats.avg),
                us(r.stats.min),
                us(r.stats.max),
                us(r.stats.p50),
                us(r.stats.p99),
            );
        }
    }
    t
}
