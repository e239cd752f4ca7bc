//! `fmi run`: start N ranks of a program on this machine, wired together through an embedded
//! rendezvous server, and make sure none outlives a failure.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWriteExt, BufReader};
use tokio::process::Command;
use tokio::sync::{mpsc, Mutex};

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
    Interrupted,
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
    let mut lines = BufReader::new(stream).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let mut w = out.lock().await;
        // A closed terminal is not a reason to stop draining the child's pipe.
        let _ = w.write_all(format!("[{rank}] {line}\n").as_bytes()).await;
        let _ = w.flush().await;
    }
}

/// Sends `sig` to every rank's process group (each rank leads its own group, so anything it
/// started goes too).
fn signal_all(pids: &[Option<u32>], sig: Signal) {
    for pid in pids.iter().flatten() {
        let _ = killpg(Pid::from_raw(*pid as i32), sig);
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
    let stdout: Arc<Mutex<Box<dyn tokio::io::AsyncWrite + Send + Unpin>>> =
        Arc::new(Mutex::new(Box::new(tokio::io::stdout())));
    let stderr: Arc<Mutex<Box<dyn tokio::io::AsyncWrite + Send + Unpin>>> =
        Arc::new(Mutex::new(Box::new(tokio::io::stderr())));
    let (exit_tx, mut exit_rx) =
        mpsc::channel::<(u32, std::io::Result<std::process::ExitStatus>)>(opts.ranks as usize);
    let mut pids: Vec<Option<u32>> = Vec::new();
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
                signal_all(&pids, Signal::SIGKILL);
                return Err(std::io::Error::new(
                    e.kind(),
                    format!("cannot start {}: {e}", program.to_string_lossy()),
                ));
            }
        };
        pids.push(child.id());
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
                    pids[rank as usize] = None;
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
            _ = tokio::signal::ctrl_c() => {
                outcome = Outcome::Interrupted;
                break;
            }
        }
    }
    if remaining > 0 {
        // Ask politely, then make sure: no rank may outlive the job.
        signal_all(&pids, Signal::SIGTERM);
        let grace = tokio::time::sleep(Duration::from_secs(2));
        tokio::pin!(grace);
        while remaining > 0 {
            tokio::select! {
                got = exit_rx.recv() => match got {
                    Some((rank, _)) => { remaining -= 1; pids[rank as usize] = None; }
                    None => break,
                },
                _ = &mut grace => break,
            }
        }
        signal_all(&pids, Signal::SIGKILL);
        while remaining > 0 {
            match tokio::time::timeout(Duration::from_secs(5), exit_rx.recv()).await {
                Ok(Some(_)) => remaining -= 1,
                _ => break,
            }
        }
    }
    // Drain what the ranks printed before they ended (bounded: a grandchild may hold a pipe).
    for f in forwarders {
        let _ = tokio::time::timeout(Duration::from_secs(1), f).await;
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
