//! The `fmi` command.
//!
//! ```text
//! fmi run -n N [--job ID] [--config FILE] [--timeout SECS] [--channel NAME] [--report] -- PROGRAM [ARGS...]
//! fmi rendezvous --listen ADDR
//! fmi setup --config FILE
//! fmi cleanup --config FILE --job ID
//! fmi bench --op OP [--sizes LIST] [--ranks N] [--channel NAME] [--iters K] [--warmup W] [--csv FILE] [--plot FILE.png] [--vs-mpi]
//! fmi explain [--config FILE] [--ranks N] [--objective fast|cheap|WEIGHT] [--format table|csv] [--channels LIST]
//! fmi calibrate --config FILE --out PROFILE [-n N] [--sizes LIST] [--rounds K] [--channels LIST] [--timeout SECS]
//! ```

mod bench;
#[cfg(feature = "plot")]
mod bench_plot;
mod bench_stats;
mod calibrate;
mod explain;
mod launcher;
mod report;

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use launcher::{Outcome, RunOptions};

/// MPI-style message passing between serverless functions and HPC jobs.
#[derive(Parser, Debug)]
#[command(name = "fmi", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run N ranks of PROGRAM on this machine as one fmi job.
    ///
    /// Starts an embedded rendezvous server on loopback, then N processes with FMI_RANK,
    /// FMI_SIZE, FMI_JOB, FMI_RENDEZVOUS and FMI_TOKEN (a fresh secret per job, never printed)
    /// set, plus FMI_CONFIG and FMI_CHANNEL when given. Each line a rank writes to stdout or
    /// stderr is forwarded whole to the same stream, prefixed with "[RANK] ".
    ///
    /// If a rank fails, the others get 1 s to end on their own (reporting the lost rank), then
    /// they and every process they started are stopped (SIGTERM, then SIGKILL after 2 s), and
    /// fmi exits with the failed rank's exit code (1 if it was killed by a signal). --timeout
    /// stops the job the same way and exits 124; SIGINT, SIGTERM or SIGHUP to fmi stop it and
    /// exit 128 + the signal number. No process is left behind.
    Run {
        /// Number of ranks.
        #[arg(short = 'n', long = "ranks", value_name = "N", value_parser = clap::value_parser!(u32).range(1..=4096))]
        ranks: u32,
        /// Job id ([A-Za-z0-9._-], 1..64 chars); random by default.
        #[arg(long, value_name = "ID")]
        job: Option<String>,
        /// TOML configuration file passed to every rank as FMI_CONFIG.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Stop the job after this many seconds (fmi then exits with code 124).
        #[arg(long, value_name = "SECS")]
        timeout: Option<f64>,
        /// Force every operation onto one named channel (e.g. "tcp").
        #[arg(long, value_name = "NAME")]
        channel: Option<String>,
        /// At the end, print the job's cost ledger to stderr: requests and bytes per channel
        /// summed over the ranks (and per rank for up to 8 ranks), priced by the model.
        #[arg(long)]
        report: bool,
        /// Bind rank i to the i-th core fmi may use ("core", while the ranks fit those cores;
        /// FMI_HOST_CPUS tells the ranks how many cores that is) or not at all ("none").
        #[arg(long, value_enum, default_value_t = launcher::Bind::Core)]
        bind: launcher::Bind,
        /// The program and its arguments (after `--`).
        #[arg(required = true, last = true, value_name = "PROGRAM [ARGS...]")]
        program: Vec<OsString>,
    },
    /// Run a standalone rendezvous server (for example on a VM with a public address).
    Rendezvous {
        /// Address to listen on, e.g. 0.0.0.0:7447.
        #[arg(long, default_value = "127.0.0.1:7447")]
        listen: SocketAddr,
    },
    /// Create the bucket and table the configuration's storage channels name (idempotent).
    Setup {
        /// The TOML configuration file.
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Remove every object, item and key a job left in the configured storage channels.
    Cleanup {
        /// The TOML configuration file.
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// The job whose leftovers to remove.
        #[arg(long, value_name = "ID")]
        job: String,
    },
    /// Show what the channel model chooses (channel, algorithm, time, dollars, runner-up) for
    /// every operation on sizes from 8 B to 64 MiB.
    Explain(explain::ExplainArgs),
    /// Measure α and β (and requests per message) of every configured channel with a short
    /// job of N local ranks, and write a profile for `[model] profile = "FILE"`.
    Calibrate(calibrate::CalibrateArgs),
    /// One rank of `fmi calibrate`'s measuring job (started by `fmi calibrate`).
    #[command(hide = true)]
    CalibrateRank(calibrate::RankArgs),
    /// Microbenchmark one operation (OSU methodology) on N local ranks, optionally against
    /// MPICH (--vs-mpi); prints avg/min/max/p50/p99 latency per size, writes CSV and PNG plots.
    Bench(bench::BenchArgs),
}

fn load_config(cmd: &str, path: &std::path::Path) -> Result<fmi::Config, ExitCode> {
    fmi::Config::from_file(path).map_err(|e| {
        eprintln!("fmi {cmd}: {e}");
        ExitCode::from(2)
    })
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("FMI_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

fn random_job() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("job-{}-{nanos:08x}", std::process::id())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> ExitCode {
    init_logging();
    let cli = Cli::parse();
    match cli.command {
        Command::Run {
            ranks,
            job,
            config,
            timeout,
            channel,
            report,
            bind,
            program,
        } => {
            let job = job.unwrap_or_else(random_job);
            if let Err(e) = fmi::JobId::new(job.clone()) {
                eprintln!("fmi run: {e}");
                return ExitCode::from(2);
            }
            if let Some(path) = &config {
                // Every rank would fail the same way; say it once, before starting any.
                if let Err(e) = fmi::Config::from_file(path) {
                    eprintln!("fmi run: --config: {e}");
                    return ExitCode::from(2);
                }
            }
            let timeout = match timeout {
                Some(t) if t.is_finite() && t > 0.0 => Some(Duration::from_secs_f64(t)),
                Some(t) => {
                    eprintln!("fmi run: --timeout {t}: must be a positive number of seconds");
                    return ExitCode::from(2);
                }
                None => None,
            };
            let opts = RunOptions {
                ranks,
                job,
                config,
                timeout,
                channel,
                bind,
                program,
            };
            run(opts, report).await
        }
        Command::Setup { config } => {
            let cfg = match load_config("setup", &config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            match fmi::storage::setup(&cfg).await {
                Ok(done) if done.is_empty() => {
                    eprintln!("fmi setup: the configuration names no storage channel");
                    ExitCode::SUCCESS
                }
                Ok(done) => {
                    for line in done {
                        println!("{line}");
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("fmi setup: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Cleanup { config, job } => {
            let cfg = match load_config("cleanup", &config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            let job = match fmi::JobId::new(job) {
                Ok(j) => j,
                Err(e) => {
                    eprintln!("fmi cleanup: {e}");
                    return ExitCode::from(2);
                }
            };
            match fmi::storage::cleanup(&cfg, &job).await {
                Ok(n) => {
                    println!("removed {n} objects of job {job}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("fmi cleanup: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Explain(args) => explain::run(args),
        Command::Calibrate(args) => calibrate::run(args).await,
        Command::CalibrateRank(args) => calibrate::rank_main(args).await,
        Command::Bench(args) => bench::run(args).await,
        Command::Rendezvous { listen } => {
            match fmi_rendezvous::run(listen, fmi_rendezvous::ServerConfig::default()).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("fmi rendezvous: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// After a job that may have used storage channels, removes whatever it left (a rank killed
/// mid-message leaves objects nobody will read). Failures are reported, not fatal.
async fn cleanup_storage(opts: &RunOptions) {
    let Some(path) = &opts.config else { return };
    let Ok(cfg) = fmi::Config::from_file(path) else {
        return;
    };
    if cfg.channels.configured().is_empty() {
        return;
    }
    let Ok(job) = fmi::JobId::new(opts.job.clone()) else {
        return;
    };
    match fmi::storage::cleanup(&cfg, &job).await {
        Ok(0) => {}
        Ok(n) => eprintln!("fmi run: removed {n} leftover objects of job {job}"),
        Err(e) => eprintln!(
            "fmi run: could not clean up job {job}: {e}; run `fmi cleanup --config {} --job {job}`",
            path.display()
        ),
    }
}

async fn run(opts: RunOptions, report: bool) -> ExitCode {
    let ledgers = match report.then(|| report::ledger_dir(&opts.job)).transpose() {
        Ok(d) => d,
        Err(e) => {
            eprintln!("fmi run: --report: cannot create a folder for the ledgers: {e}");
            return ExitCode::FAILURE;
        }
    };
    let started = std::time::Instant::now();
    let server = match fmi_rendezvous::Server::bind(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        fmi_rendezvous::ServerConfig::default(),
    )
    .await
    {
        Ok(s) => s,
        Err(e) => {
            eprintln!("fmi run: cannot start the embedded rendezvous server: {e}");
            return ExitCode::FAILURE;
        }
    };
    let addr = server.local_addr();
    let handle = server.spawn();
    let env: Vec<(&str, OsString)> = ledgers
        .iter()
        .map(|d| (fmi::ledger::LEDGER_VAR, d.clone().into_os_string()))
        .collect();
    let outcome = launcher::run_with_env(&opts, addr, &env).await;
    handle.shutdown().await;
    if let Some(dir) = &ledgers {
        let secs = started.elapsed().as_secs_f64();
        eprint!(
            "{}",
            report::report(dir, opts.ranks, secs, opts.config.as_deref())
        );
        let _ = std::fs::remove_dir_all(dir);
    }
    cleanup_storage(&opts).await;
    match outcome {
        Ok(Outcome::Success) => ExitCode::SUCCESS,
        Ok(Outcome::RankFailed { rank, status, code }) => {
            eprintln!(
                "fmi run: rank {rank} of job {} failed ({status}); stopped the other ranks",
                opts.job
            );
            ExitCode::from(u8::try_from(code).ok().filter(|c| *c != 0).unwrap_or(1))
        }
        Ok(Outcome::TimedOut(t)) => {
            eprintln!(
                "fmi run: job {} did not finish within {t:?}; stopped every rank",
                opts.job
            );
            ExitCode::from(124)
        }
        Ok(Outcome::Signalled(sig)) => {
            eprintln!(
                "fmi run: got signal {sig}; stopped every rank of job {}",
                opts.job
            );
            ExitCode::from(u8::try_from(128 + sig).unwrap_or(1))
        }
        Err(e) => {
            eprintln!("fmi run: {e}");
            ExitCode::FAILURE
        }
    }
}
