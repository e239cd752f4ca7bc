//! `fmi run`: start N ranks of a program on this machine, wired together through an embedded
//! rendezvous server, and make sure none outlives a failure.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::Command;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{mpsc, Mutex};

/// After a rank failed, how long the others get to end on their own before they are terminated:
/// long enough to notice the loss (`PeerLost` naming the failed rank) and say so.
const REPORT_GRACE: Duration = Duration::from_secs(1);

/// Between SIGTERM and SIGKILL.
const TERM_GRACE: Duration = Duration::from_secs(2);

/// Output lines longer than this are forwarded in pieces of this size, each with its prefix.
const MAX_LINE: usize = 1 << 20;

/// What `fmi run` was asked to do.
#[derive(Debug)]
pub(crate) struct RunOptions {
    pub(crate) ranks: u32,
    pub(crate) job: String,
    pub(crate) config: Option<PathBuf>,
    pub(crate) timeout: Option<Duration>,
    pub(crate) channel: Option<String>,
    pub(crate) program: Vec<OsString>,
}

/// Why a job failed.
#[derive(Debug)]
pub(crate) enum Outcome {
    Success,
    RankFailed {
        rank: u32,
        status: String,
        code: i32,
    },
    TimedOut(Duration),
    /// `fmi run` itself got this signal (SIGINT, SIGTERM or SIGHUP).
    Signalled(i32),
}

/// A fresh random token for a job, from the OS's random source.
fn new_token() -> std::io::Result<String> {
    use std::io::Read;
    let mut buf = [0u8; 16];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut buf)?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

async fn forward_lines<R: AsyncRead + Unpin>(
    rank: u32,
    stream: R,
    out: Arc<Mutex<Box<dyn tokio::io::AsyncWrite + Send + Unpin>>>,
) {
    // Bytes, not `String`s: output that is not UTF-8 is forwarded as it is, and must not stop the
    // draining of the pipe (a rank writing into a full pipe would block forever).
    let mut reader = BufReader::new(stream);
    let prefix = format!("[{rank}] ");
    let mut line = prefix.clone().into_bytes();
    loop {
        line.truncate(prefix.len());
        let limit = MAX_LINE as u64;
        match (&mut reader).take(limit).read_until(b'\n', &mut line).await {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        if line.last() != Some(&b'\n') {
            line.push(b'\n');
        }
        // One locked write per line, so lines of different ranks never interleave. A closed
        // terminal is not a reason to stop draining the child's pipe.
        let mut w = out.lock().await;
        let _ = w.write_all(&line).await;
        let _ = w.flush().await;
    }
}

/// Sends `sig` to every rank's process group (each rank leads its own group, so anything it
/// started goes too), including the groups of ranks that have already exited, whose children may
/// still run.
fn signal_groups(groups: &[u32], sig: Signal) {
    for &pgid in groups {
        if let Ok(pgid) = i32::try_from(pgid) {
            let _ = killpg(Pid::from_raw(pgid), sig);
        }
    }
}

type Exits = mpsc::Receiver<(u32, std::io::Result<std::process::ExitStatus>)>;

/// Collects rank exits until none remain or `within` has passed.
async fn reap(exits: &mut Exits, remaining: &mut u32, within: Duration) {
    let until = tokio::time::Instant::now() + within;
    while *remaining > 0 {
        match tokio::time::timeout_at(until, exits.recv()).await {
            Ok(Some(_)) => *remaining -= 1,
            Ok(None) | Err(_) => break,
        }
    }
}

/// Runs the job and reports how it ended. The rendezvous address is `rendezvous`.
pub(crate) async fn run(
    opts: &RunOptions,
    rendezvous: std::net::SocketAddr,
) -> std::io::Result<Outcome> {
    let token = new_token()?;
    let (program, args) = opts
        .program
        .split_first()
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "no program given"))?;
    // Before any rank exists: a signal that ends `fmi run` must end the job too.
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sighup = signal(SignalKind::hangup())?;
    let stdout: Arc<Mutex<Box<dyn tokio::io::AsyncWrite + Send + Unpin>>> =
        Arc::new(Mutex::new(Box::new(tokio::io::stdout())));
    let stderr: Arc<Mutex<Box<dyn tokio::io::AsyncWrite + Send + Unpin>>> =
        Arc::new(Mutex::new(Box::new(tokio::io::stderr())));
    let (exit_tx, mut exit_rx) =
        mpsc::channel::<(u32, std::io::Result<std::process::ExitStatus>)>(opts.ranks as usize);
    // Process group ids, one per started rank (each rank leads its own group).
    let mut groups: Vec<u32> = Vec::new();
    let mut forwarders = Vec::new();
    for rank in 0..opts.ranks {
        let mut cmd = Command::new(program);
        cmd.args(args)
            .env("FMI_RANK", rank.to_string())
            .env("FMI_SIZE", opts.ranks.to_string())
            .env("FMI_JOB", &opts.job)
            .env("FMI_RENDEZVOUS", rendezvous.to_string())
            .env("FMI_TOKEN", &token)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        if let Some(c) = &opts.config {
            cmd.env("FMI_CONFIG", c);
        }
        if let Some(ch) = &opts.channel {
            cmd.env("FMI_CHANNEL", ch);
        }
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                signal_groups(&groups, Signal::SIGKILL);
                drop(exit_tx);
                let mut started = rank;
                reap(&mut exit_rx, &mut started, Duration::from_secs(5)).await;
                return Err(std::io::Error::new(
                    e.kind(),
                    format!("cannot start {}: {e}", program.to_string_lossy()),
                ));
            }
        };
        groups.extend(child.id());
        if let Some(o) = child.stdout.take() {
            forwarders.push(tokio::spawn(forward_lines(rank, o, Arc::clone(&stdout))));
        }
        if let Some(e) = child.stderr.take() {
            forwarders.push(tokio::spawn(forward_lines(rank, e, Arc::clone(&stderr))));
        }
        let tx = exit_tx.clone();
        tokio::spawn(async move {
            let status = child.wait().await;
            let _ = tx.send((rank, status)).await;
        });
    }
    drop(exit_tx);

    let deadline = opts.timeout.map(|t| tokio::time::Instant::now() + t);
    let mut remaining = opts.ranks;
    let mut outcome = Outcome::Success;
    while remaining > 0 {
        let next = async {
            match deadline {
                Some(d) => tokio::time::timeout_at(d, exit_rx.recv()).await.ok(),
                None => Some(exit_rx.recv().await),
            }
        };
        tokio::select! {
            got = next => match got {
                Some(Some((rank, status))) => {
                    remaining -= 1;
                    let failed = match &status {
                        Ok(s) if s.success() => None,
                        Ok(s) => Some((describe(s), s.code().unwrap_or(1))),
                        Err(e) => Some((format!("could not be waited for: {e}"), 1)),
                    };
                    if let Some((status, code)) = failed {
                        outcome = Outcome::RankFailed { rank, status, code };
                        break;
                    }
                }
                Some(None) => break,
                None => {
                    outcome = Outcome::TimedOut(opts.timeout.unwrap_or_default());
                    break;
                }
            },
            _ = sigint.recv() => {
                outcome = Outcome::Signalled(Signal::SIGINT as i32);
                break;
            }
            _ = sigterm.recv() => {
                outcome = Outcome::Signalled(Signal::SIGTERM as i32);
                break;
            }
            _ = sighup.recv() => {
                outcome = Outcome::Signalled(Signal::SIGHUP as i32);
                break;
            }
        }
    }
    if !matches!(outcome, Outcome::Success) {
        if matches!(outcome, Outcome::RankFailed { .. }) {
            // The others usually notice the loss within milliseconds; let them end on their own
            // so that their errors (naming the failed rank) reach the user.
            reap(&mut exit_rx, &mut remaining, REPORT_GRACE).await;
        }
        // Ask politely, then make sure: no rank, nor anything a rank started, outlives the job.
        signal_groups(&groups, Signal::SIGTERM);
        reap(&mut exit_rx, &mut remaining, TERM_GRACE).await;
        signal_groups(&groups, Signal::SIGKILL);
        reap(&mut exit_rx, &mut remaining, Duration::from_secs(5)).await;
    }
    // Drain what the ranks printed before they ended (bounded: a grandchild may hold a pipe).
    let drain_until = tokio::time::Instant::now() + Duration::from_secs(1);
    for f in forwarders {
        let _ = tokio::time::timeout_at(drain_until, f).await;
    }
    Ok(outcome)
}

fn describe(s: &std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (s.code(), s.signal()) {
        (Some(c), _) => format!("exit code {c}"),
        (None, Some(sig)) => format!("signal {sig}"),
        _ => "an unknown status".into(),
    }
}
