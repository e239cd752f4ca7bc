//! `fmi run`: start N ranks of a program on this machine, wired together through an embedded
//! rendezvous server, and make sure none outlives a failure.

use std::collections::{BTreeMap, BTreeSet};
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

/// Longest wait for the other ranks to report after one failed, however long their deadline.
const MAX_REPORT_GRACE: Duration = Duration::from_secs(10);

/// How long the other ranks get to end on their own once one rank failed: at least
/// `REPORT_GRACE`, and when the job's config file sets a shorter-than-10 s `deadline_secs`, that
/// deadline plus a second and a half. A rank that never connected to the failed one (the TCP
/// channel connects lazily), or that talks through storage, only learns of the loss when its
/// deadline expires, and over Redis then reads the job's failure record until its answer has
/// stood (up to 0.9 s, `fmi_storage`'s chain of blame); this lets it report that error instead
/// of being stopped silently.
fn report_grace(opts: &RunOptions) -> Duration {
    let configured = opts
        .config
        .as_ref()
        .and_then(|path| fmi::Config::from_file(path).ok())
        .map(|cfg| cfg.deadline + Duration::from_millis(1500));
    match configured {
        Some(d) if d <= MAX_REPORT_GRACE => d.max(REPORT_GRACE),
        _ => REPORT_GRACE,
    }
}

/// Puts SIGINT, SIGTERM and SIGHUP back to their default action, once per process, before the
/// launcher installs its own handlers. Libraries linked into the binary may install handlers when
/// they load: with the `rdma` feature, libfabric's dependencies install a SIGTERM handler that
/// exits with status 1, and tokio's handler would call it after ours, so `fmi run` ended with 1
/// instead of 128 + 15 without stopping its ranks. The launcher itself uses no fabric.
#[allow(unsafe_code)]
fn reset_inherited_handlers() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        for sig in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
            // SAFETY: installs the default action, not a Rust handler; it runs before this
            // process registers any handler of its own for these signals (tokio's registry is
            // first used just after this), and nothing in the launcher relies on the replaced ones.
            let _ = unsafe { nix::sys::signal::signal(sig, nix::sys::signal::SigHandler::SigDfl) };
        }
    });
}

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
    pub(crate) bind: Bind,
    pub(crate) program: Vec<OsString>,
}

/// Whether `fmi run` binds each rank to a core of its own (`--bind`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Bind {
    /// Rank i runs on the i-th core this process may use, while the ranks fit those cores;
    /// with more ranks than cores nothing is bound.
    #[default]
    Core,
    /// Ranks run wherever the kernel puts them.
    None,
}

/// Each rank's core (a mask of one), with the number of cores the job is spread over; `None`
/// if ranks are not bound (`--bind none`, more ranks than the cores this process may use, or
/// the affinity mask cannot be read). Rank i gets the i-th of those cores.
///
/// Why: a rank that waits spins on its socket for a while before it sleeps (the TCP channel's
/// `spin`). Loopback wakes a sleeping peer with a "sync" wake-up, which tells the kernel that
/// the sender is about to sleep, so it may queue the peer on the sender's core, where it waits
/// until the sender's spin ends. That made the spin miss (by the window plus ~10 µs) and back
/// off, the pair fell into one rank sleeping on every message, and latencies depended on
/// history (docs/benchmarks.md, session 10). A rank on a core of its own is woken there.
fn cores_for(bind: Bind, ranks: u32) -> Option<(Vec<nix::sched::CpuSet>, usize)> {
    if bind == Bind::None {
        return None;
    }
    let allowed = nix::sched::sched_getaffinity(Pid::from_raw(0)).ok()?;
    let cpus: Vec<usize> = (0..nix::sched::CpuSet::count())
        .filter(|&c| allowed.is_set(c).unwrap_or(false))
        .collect();
    if ranks as usize > cpus.len() {
        return None;
    }
    let sets = cpus[..ranks as usize]
        .iter()
        .map(|&c| {
            let mut one = nix::sched::CpuSet::new();
            one.set(c).ok().map(|()| one)
        })
        .collect::<Option<Vec<_>>>()?;
    Some((sets, cpus.len()))
}

/// Starts `cmd` with its affinity mask set to `cpus`: the calling thread takes that mask for
/// the moment of the start (a child inherits the mask of the thread that starts it) and gets
/// its own back right after, whatever the start's result. If the mask cannot be set, the rank
/// starts unbound.
fn spawn_on(
    cmd: &mut Command,
    cpus: Option<&nix::sched::CpuSet>,
) -> std::io::Result<tokio::process::Child> {
    let here = Pid::from_raw(0);
    let restore = match cpus {
        Some(set) => match nix::sched::sched_getaffinity(here)
            .and_then(|own| nix::sched::sched_setaffinity(here, set).map(|()| own))
        {
            Ok(own) => Some(own),
            Err(e) => {
                // Not worth failing the job for: the rank runs unbound.
                tracing::warn!(error = %e, "fmi run: cannot bind a rank to its core");
                None
            }
        },
        None => None,
    };
    let child = cmd.spawn();
    if let Some(own) = restore {
        if let Err(e) = nix::sched::sched_setaffinity(here, &own) {
            tracing::warn!(error = %e, "fmi run: cannot restore the launcher's CPU affinity");
        }
    }
    child
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

/// Which ranks each rank's output blamed for its failure: the peers named by fmi's own errors,
/// `lost rank K on the …` ([`fmi::Error::PeerLost`]) and `… waiting for rank K on the …`
/// ([`fmi::Error::Timeout`]).
///
/// When a rank dies, the others notice within milliseconds and fail too, so by the time the
/// launcher runs again several exits can be waiting, collected in no particular order; even
/// the order in which the kernel made them zombies is no guide, since a dying process closes its
/// sockets (which the survivors see) before it becomes a zombie. What the survivors said is the
/// evidence of who failed first.
#[derive(Default)]
struct Blame(std::sync::Mutex<BTreeMap<u32, BTreeSet<u32>>>);

impl Blame {
    fn note(&self, rank: u32, line: &[u8]) {
        let named = blamed_peers(line);
        if !named.is_empty() {
            let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
            map.entry(rank).or_default().extend(named);
        }
    }

    fn of(&self, rank: u32) -> BTreeSet<u32> {
        let map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        map.get(&rank).cloned().unwrap_or_default()
    }
}

/// The ranks a line of output names as lost or silent (see [`Blame`]).
fn blamed_peers(line: &[u8]) -> Vec<u32> {
    const MARKERS: [&[u8]; 2] = [b"lost rank ", b"waiting for rank "];
    const AFTER: &[u8] = b" on the ";
    let mut found = Vec::new();
    for marker in MARKERS {
        let mut rest = line;
        while let Some(at) = rest.windows(marker.len()).position(|w| w == marker) {
            rest = &rest[at + marker.len()..];
            let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
            if digits > 0 && rest[digits..].starts_with(AFTER) {
                let peer = std::str::from_utf8(&rest[..digits])
                    .ok()
                    .and_then(|d| d.parse::<u32>().ok());
                found.extend(peer);
            }
        }
    }
    found
}

/// A rank that failed: its rank, its status described, and its exit code.
type Failure = (u32, String, i32);

/// Of the ranks that failed before the launcher stopped the job (in the order their exits were
/// collected), the one to report: the first that did not blame another failed rank (see
/// [`Blame`]). Survivors name the rank they lost, which may itself have failed because it lost
/// another (a chain), so the rank at the end of the chain is the cause. If every failed rank
/// blames another one, the first collected.
fn culprit(failures: Vec<Failure>, blame: &Blame) -> Option<Failure> {
    let failed: BTreeSet<u32> = failures.iter().map(|f| f.0).collect();
    let first_cause = failures
        .iter()
        .position(|f| blame.of(f.0).is_disjoint(&failed));
    let mut failures = failures;
    match first_cause {
        Some(i) => Some(failures.swap_remove(i)),
        None => failures.into_iter().next(),
    }
}

async fn forward_lines<R: AsyncRead + Unpin>(
    rank: u32,
    stream: R,
    out: Arc<Mutex<Box<dyn tokio::io::AsyncWrite + Send + Unpin>>>,
    blame: Arc<Blame>,
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
        blame.note(rank, &line[prefix.len()..]);
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

/// How a rank's exit counts: `None` for success, else its description and exit code.
fn failure(status: &std::io::Result<std::process::ExitStatus>) -> Option<(String, i32)> {
    match status {
        Ok(s) if s.success() => None,
        Ok(s) => Some((describe(s), s.code().unwrap_or(1))),
        Err(e) => Some((format!("could not be waited for: {e}"), 1)),
    }
}

/// Collects rank exits until none remain or `within` has passed; failures go to `failures`.
async fn reap(
    exits: &mut Exits,
    remaining: &mut u32,
    within: Duration,
    mut failures: Option<&mut Vec<Failure>>,
) {
    let until = tokio::time::Instant::now() + within;
    while *remaining > 0 {
        match tokio::time::timeout_at(until, exits.recv()).await {
            Ok(Some((rank, status))) => {
                *remaining -= 1;
                if let (Some(list), Some((status, code))) = (failures.as_mut(), failure(&status)) {
                    list.push((rank, status, code));
                }
            }
            Ok(None) | Err(_) => break,
        }
    }
}

/// Runs the job and reports how it ended. The rendezvous address is `rendezvous`.
pub(crate) async fn run(
    opts: &RunOptions,
    rendezvous: std::net::SocketAddr,
) -> std::io::Result<Outcome> {
    run_with_env(opts, rendezvous, &[]).await
}

/// [`run`], with `extra_env` set in every rank's environment (e.g. `FMI_LEDGER`).
pub(crate) async fn run_with_env(
    opts: &RunOptions,
    rendezvous: std::net::SocketAddr,
    extra_env: &[(&str, OsString)],
) -> std::io::Result<Outcome> {
    let token = new_token()?;
    let (program, args) = opts
        .program
        .split_first()
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "no program given"))?;
    // Before any rank exists: a signal that ends `fmi run` must end the job too.
    reset_inherited_handlers();
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
    let blame = Arc::new(Blame::default());
    let cores = cores_for(opts.bind, opts.ranks);
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
        for (var, value) in extra_env {
            cmd.env(var, value);
        }
        if let Some((_, spread)) = &cores {
            cmd.env(fmi::HOST_CPUS_ENV, spread.to_string());
        }
        let core = cores.as_ref().and_then(|(sets, _)| sets.get(rank as usize));
        let mut child = match spawn_on(&mut cmd, core) {
            Ok(c) => c,
            Err(e) => {
                signal_groups(&groups, Signal::SIGKILL);
                drop(exit_tx);
                let mut started = rank;
                reap(&mut exit_rx, &mut started, Duration::from_secs(5), None).await;
                return Err(std::io::Error::new(
                    e.kind(),
                    format!("cannot start {}: {e}", program.to_string_lossy()),
                ));
            }
        };
        groups.extend(child.id());
        if let Some(o) = child.stdout.take() {
            forwarders.push(tokio::spawn(forward_lines(
                rank,
                o,
                Arc::clone(&stdout),
                Arc::clone(&blame),
            )));
        }
        if let Some(e) = child.stderr.take() {
            forwarders.push(tokio::spawn(forward_lines(
                rank,
                e,
                Arc::clone(&stderr),
                Arc::clone(&blame),
            )));
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
    // Ranks that failed on their own (before the launcher stopped the others).
    let mut failures: Vec<Failure> = Vec::new();
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
                    if let Some((status, code)) = failure(&status) {
                        failures.push((rank, status.clone(), code));
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
            reap(
                &mut exit_rx,
                &mut remaining,
                report_grace(opts),
                Some(&mut failures),
            )
            .await;
        }
        // Ask politely, then make sure: no rank, nor anything a rank started, outlives the job.
        signal_groups(&groups, Signal::SIGTERM);
        reap(&mut exit_rx, &mut remaining, TERM_GRACE, None).await;
        signal_groups(&groups, Signal::SIGKILL);
        reap(&mut exit_rx, &mut remaining, Duration::from_secs(5), None).await;
    }
    // Drain what the ranks printed before they ended (bounded: a grandchild may hold a pipe).
    let drain_until = tokio::time::Instant::now() + Duration::from_secs(1);
    for f in forwarders {
        let _ = tokio::time::timeout_at(drain_until, f).await;
    }
    // Every failed rank's output has been read now: name the one that failed first.
    if let Outcome::RankFailed { .. } = outcome {
        if let Some((rank, status, code)) = culprit(failures, &blame) {
            outcome = Outcome::RankFailed { rank, status, code };
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use fmi::{Error, Rank, Tag};

    #[test]
    fn fmi_errors_name_the_peer_they_blame() {
        // Tied to the wording of fmi's own errors: if it changes, this must fail.
        let lost = Error::PeerLost {
            me: Rank(1),
            peer: Rank(12),
            channel: "tcp",
            via: None,
        };
        let silent = Error::Timeout {
            me: Rank(3),
            peer: Rank(0),
            waited: Duration::from_secs(5),
            channel: "redis",
            tag: Tag::user(7),
        };
        let line = format!("collectives_check: rank 1/4: allreduce failed: {lost}");
        assert_eq!(blamed_peers(line.as_bytes()), vec![12]);
        assert_eq!(blamed_peers(silent.to_string().as_bytes()), vec![0]);
        assert_eq!(
            blamed_peers(format!("{lost} / {silent}").as_bytes()),
            vec![12, 0]
        );
        assert!(blamed_peers(b"rank 2/4: exiting abruptly in allreduce iteration 200").is_empty());
        assert!(blamed_peers(b"lost rank x on the tcp channel").is_empty());
        // A loss learned from another rank's abort blames the failed rank, not the reporter.
        let learned = Error::PeerLost {
            me: Rank(2),
            peer: Rank(5),
            channel: "tcp",
            via: Some(Rank(3)),
        };
        assert_eq!(blamed_peers(learned.to_string().as_bytes()), vec![5]);
    }

    fn failed(rank: u32, code: i32) -> Failure {
        (rank, format!("exit code {code}"), code)
    }

    #[test]
    fn the_end_of_the_blame_chain_is_reported() {
        let blame = Blame::default();
        // Rank 0 died; 1 lost 0; 2 lost 1 (which had exited by then). Collected as 1, 2, 0.
        blame.note(1, b"rank 1: lost rank 0 on the tcp channel; the peer ...");
        blame.note(2, b"rank 2: lost rank 1 on the tcp channel; the peer ...");
        let got = culprit(vec![failed(1, 1), failed(2, 1), failed(0, 9)], &blame);
        assert_eq!(got.map(|f| (f.0, f.2)), Some((0, 9)));
        // A rank blaming one that did not fail (it finished and left) is itself the cause.
        let blame = Blame::default();
        blame.note(1, b"rank 1: lost rank 0 on the tcp channel");
        let got = culprit(vec![failed(2, 3), failed(1, 1)], &blame);
        assert_eq!(got.map(|f| f.0), Some(2));
        let got = culprit(vec![failed(1, 1)], &blame);
        assert_eq!(got.map(|f| f.0), Some(1));
        // Each blames the other: the first collected.
        let blame = Blame::default();
        blame.note(0, b"rank 0: lost rank 1 on the tcp channel");
        blame.note(1, b"rank 1: lost rank 0 on the tcp channel");
        let got = culprit(vec![failed(1, 1), failed(0, 1)], &blame);
        assert_eq!(got.map(|f| f.0), Some(1));
    }
}
