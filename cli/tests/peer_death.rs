//! Peer death, randomized: jobs of 2 to 8 ranks run one operation in a loop through `fmi run`
//! (`examples/peer_death.rs`) and one random rank exits abruptly at a random moment. Every
//! survivor must end its loop with `PeerLost` or `Timeout` within its deadline, naming the
//! victim (not a rank that failed because of it: failures are propagated, see
//! `fmi_channels::Channel::abort`); `fmi run` must exit non-zero within a hard bound and leave
//! no process of the job behind.
//!
//! Trials over the direct TCP channel and over Redis (needs `FMI_TEST_REDIS_URL`, set by
//! `scripts/services.sh`). The trial parameters come from a seeded generator; the seed is printed
//! and every failure names it: rerun one campaign with `FMI_PEER_DEATH_SEED=S`, and change the
//! number of trials with `FMI_PEER_DEATH_TRIALS=N` (per channel).
//!
//! The examples must be built (`cargo test --workspace` does; with `-p fmi-cli` run
//! `cargo build --workspace --examples` first, `--release` for a release run).

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const FMI: &str = env!("CARGO_BIN_EXE_fmi");

/// The longest one trial may take, start to end, before the test kills it and fails (a hang).
const HARD_LIMIT: Duration = Duration::from_secs(30);

/// On top of a survivor's deadline, for a loaded machine (2 cores shared with the builds).
const SLACK: Duration = Duration::from_secs(2);

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

static SERIAL: Mutex<()> = Mutex::new(());

/// xorshift64*: small and deterministic.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn example(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("path of the test binary");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("the test binary lives in target/<profile>/deps");
    let path = dir.join("examples").join(name);
    assert!(
        path.is_file(),
        "example binary {} is missing: build the examples first with \
         `cargo build --workspace --examples` (add --release for a release test run)",
        path.display()
    );
    path
}

fn nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// Live (not zombie) processes whose environment has `FMI_JOB=job`.
fn job_processes(job: &str) -> Vec<u32> {
    let needle = format!("FMI_JOB={job}");
    let mut found = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return found;
    };
    for entry in dir.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse().ok()) else {
            continue;
        };
        let zombie = std::fs::read_to_string(entry.path().join("stat"))
            .ok()
            .and_then(|s| {
                s.rsplit_once(')')
                    .map(|(_, rest)| rest.trim_start().starts_with('Z'))
            })
            .unwrap_or(true);
        if zombie {
            continue;
        }
        let Ok(environ) = std::fs::read(entry.path().join("environ")) else {
            continue;
        };
        if environ.split(|&b| b == 0).any(|e| e == needle.as_bytes()) {
            found.push(pid);
        }
    }
    found
}

fn kill9(pid: u32) {
    let _ = Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .stderr(Stdio::null())
        .status();
}

type Lines = Arc<Mutex<Vec<(Instant, String)>>>;

fn reader(stream: impl Read + Send + 'static, into: Lines) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut r = BufReader::new(stream);
        let mut line = Vec::new();
        while let Ok(n) = r.read_until(b'\n', &mut line) {
            if n == 0 {
                break;
            }
            let text = String::from_utf8_lossy(&line).trim_end().to_owned();
            into.lock().unwrap().push((Instant::now(), text));
            line.clear();
        }
    })
}

/// One trial's parameters.
#[derive(Debug, Clone)]
struct Trial {
    n: u32,
    op: &'static str,
    bytes: usize,
    victim: u32,
    die_after_ms: u64,
}

/// What the survivors said, for the campaign's summary.
#[derive(Default)]
struct Tally {
    trials: u32,
    survivors: u32,
    named_victim: u32,
    /// Survivors that learned of the death from another rank's abort (`reported by rank R`).
    learned: u32,
    peer_lost: u32,
    timeouts: u32,
    max_latency: Duration,
    elapsed: Duration,
}

struct Channel {
    name: &'static str,
    /// Extra `fmi run` arguments and program arguments.
    run_args: Vec<String>,
    prog_args: Vec<String>,
    deadline: Duration,
    sizes: &'static [usize],
}

fn run_trial(ch: &Channel, t: &Trial, seed: u64, index: u32, tally: &mut Tally) {
    let job = format!("pd-{}-{index}-{:x}", ch.name, nanos() & 0xffff_ffff);
    let ctx = format!(
        "{} trial {index} of seed {seed} ({t:?}, job {job}); rerun with FMI_PEER_DEATH_SEED={seed}",
        ch.name
    );
    let mut cmd = Command::new(FMI);
    cmd.args([
        "run",
        "-n",
        &t.n.to_string(),
        "--job",
        &job,
        "--timeout",
        "25",
    ])
    .args(&ch.run_args)
    .arg("--")
    .arg(example("peer_death"))
    .args(["--op", t.op, "--bytes", &t.bytes.to_string()])
    .args(["--victim", &t.victim.to_string()])
    .args(["--die-after-ms", &t.die_after_ms.to_string()])
    .args(&ch.prog_args)
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("FMI_") && !k.to_string_lossy().starts_with("FMI_TEST") {
            cmd.env_remove(k);
        }
    }
    let started = Instant::now();
    let mut child = cmd.spawn().expect("start fmi run");
    let (out, err): (Lines, Lines) = Default::default();
    let readers = [
        reader(child.stdout.take().unwrap(), Arc::clone(&out)),
        reader(child.stderr.take().unwrap(), Arc::clone(&err)),
    ];
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait for fmi run") {
            break Some(s);
        }
        if started.elapsed() > HARD_LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let ended = Instant::now();
    for r in readers {
        let _ = r.join();
    }
    let out = std::mem::take(&mut *out.lock().unwrap());
    let err = std::mem::take(&mut *err.lock().unwrap());
    let report = || {
        let mut s = String::new();
        for (_, l) in &out {
            s += &format!("  out| {l}\n");
        }
        for (_, l) in &err {
            s += &format!("  err| {l}\n");
        }
        s
    };
    // Nothing of the job may outlive fmi run (killed here if so, then the trial fails).
    let until = Instant::now() + Duration::from_secs(2);
    let mut left = job_processes(&job);
    while !left.is_empty() && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(20));
        left = job_processes(&job);
    }
    for &pid in &left {
        kill9(pid);
    }
    let Some(status) = status else {
        panic!(
            "HANG: fmi run still running after {HARD_LIMIT:?}: {ctx}\n{}",
            report()
        );
    };
    assert!(
        left.is_empty(),
        "processes {left:?} outlived fmi run: {ctx}\n{}",
        report()
    );
    assert!(
        !status.success(),
        "fmi run succeeded although rank {} died: {ctx}\n{}",
        t.victim,
        report()
    );

    let victim_prefix = format!("[{}] peer_death: rank {}: dying now", t.victim, t.victim);
    let Some(died) = err
        .iter()
        .find(|(_, l)| l.starts_with(&victim_prefix))
        .map(|(at, _)| *at)
    else {
        panic!("the victim did not die as planned: {ctx}\n{}", report());
    };
    // Each survivor's report: rank -> (when, kind, named peer).
    let mut reports: BTreeMap<u32, (Instant, String, Option<u32>)> = BTreeMap::new();
    for (at, line) in &out {
        let Some(rest) = line.split_once("] peer_death: rank ").map(|(_, r)| r) else {
            continue;
        };
        let Some((rank, rest)) = rest.split_once(": ") else {
            continue;
        };
        let Ok(rank) = rank.parse::<u32>() else {
            continue;
        };
        let mut words = rest.split_whitespace();
        let kind = words.next().unwrap_or("").to_owned();
        if !matches!(kind.as_str(), "PeerLost" | "Timeout" | "Other") {
            continue;
        }
        let peer = words
            .next()
            .and_then(|w| w.strip_prefix("peer="))
            .and_then(|p| p.parse().ok());
        reports.insert(rank, (*at, kind, peer));
    }
    let survivors: BTreeSet<u32> = (0..t.n).filter(|&r| r != t.victim).collect();
    for &s in &survivors {
        let Some((at, kind, peer)) = reports.get(&s) else {
            panic!("survivor {s} reported no error: {ctx}\n{}", report());
        };
        assert!(
            kind == "PeerLost" || kind == "Timeout",
            "survivor {s} ended with {kind}, not PeerLost/Timeout: {ctx}\n{}",
            report()
        );
        let Some(peer) = *peer else {
            panic!("survivor {s}'s error names no rank: {ctx}\n{}", report());
        };
        assert!(
            peer == t.victim,
            "survivor {s} names rank {peer}, not the victim {}: {ctx}\n{}",
            t.victim,
            report()
        );
        let latency = at.saturating_duration_since(died);
        assert!(
            latency <= ch.deadline + SLACK,
            "survivor {s} took {latency:?} after the death to report (deadline {:?}): {ctx}\n{}",
            ch.deadline,
            report()
        );
        tally.survivors += 1;
        tally.max_latency = tally.max_latency.max(latency);
        if kind == "PeerLost" {
            tally.peer_lost += 1;
        } else {
            tally.timeouts += 1;
        }
        if let Some(via) = reported_via(line_of(&out, s)) {
            assert!(
                survivors.contains(&via),
                "survivor {s} learned of the death from rank {via}, not a survivor: {ctx}\n{}",
                report()
            );
            tally.learned += 1;
        }
        tally.named_victim += 1;
    }
    tally.trials += 1;
    tally.elapsed += ended - started;
}

/// The report line of rank `rank`.
fn line_of(out: &[(Instant, String)], rank: u32) -> &str {
    let needle = format!("] peer_death: rank {rank}: ");
    out.iter()
        .map(|(_, l)| l.as_str())
        .rfind(|l| l.contains(&needle))
        .unwrap_or("")
}

/// The rank a `PeerLost` learned from another rank's abort names as its reporter.
fn reported_via(line: &str) -> Option<u32> {
    let rest = line.split_once("(reported by rank ")?.1;
    rest.split(')').next()?.parse().ok()
}

fn campaign(ch: &Channel, default_trials: u32) {
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let seed = std::env::var("FMI_PEER_DEATH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| nanos() | 1);
    let trials = std::env::var("FMI_PEER_DEATH_TRIALS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default_trials);
    println!("peer death over {}: {trials} trials, seed {seed}", ch.name);
    let mut rng = Rng(seed ^ ch.name.len() as u64);
    let mut tally = Tally::default();
    for i in 0..trials {
        let n = 2 + rng.below(7) as u32;
        let t = Trial {
            n,
            op: OPS[rng.below(OPS.len() as u64) as usize],
            bytes: ch.sizes[rng.below(ch.sizes.len() as u64) as usize],
            victim: rng.below(u64::from(n)) as u32,
            die_after_ms: rng.below(150),
        };
        run_trial(ch, &t, seed, i, &mut tally);
    }
    println!(
        "peer death over {}: {} trials passed in {:.1?} (seed {seed}); {} survivors reported \
         ({} PeerLost, {} Timeout), {} named the victim ({} of them learned it from another \
         rank's abort); slowest report {:?} after the death (deadline {:?}); 0 hangs, 0 \
         processes left",
        ch.name,
        tally.trials,
        tally.elapsed,
        tally.survivors,
        tally.peer_lost,
        tally.timeouts,
        tally.named_victim,
        tally.learned,
        tally.max_latency,
        ch.deadline
    );
}

struct TempFile(PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn config_file(what: &str, text: &str) -> TempFile {
    let path = std::env::temp_dir().join(format!(
        "fmi-pd-{what}-{}-{:x}.toml",
        std::process::id(),
        nanos()
    ));
    std::fs::write(&path, text).expect("write a config file");
    TempFile(path)
}

#[test]
fn peers_dying_at_random_moments_over_tcp() {
    let deadline = Duration::from_secs(2);
    let cfg = config_file(
        "tcp",
        &format!("deadline_secs = {}\n", deadline.as_secs_f64()),
    );
    let ch = Channel {
        name: "tcp",
        run_args: vec!["--config".into(), cfg.0.display().to_string()],
        prog_args: vec![],
        deadline,
        sizes: &[8, 1000, 65536, 1 << 20],
    };
    campaign(&ch, 100);
}

/// The Redis trials' channel: `--ignore-term` and a 2 s deadline (see the test below).
fn redis_channel() -> (Channel, TempFile) {
    let url = std::env::var("FMI_TEST_REDIS_URL").unwrap_or_else(|_| {
        panic!("FMI_TEST_REDIS_URL is not set: start the servers with `eval \"$(scripts/services.sh start)\"`")
    });
    // Storage channels cannot see a peer die, only fall silent: survivors end by Timeout, and
    // ignore SIGTERM so that fmi run's report grace (1 s) does not cut them short.
    let deadline = Duration::from_millis(2000);
    let cfg = config_file(
        "redis",
        &format!(
            "deadline_secs = {}\n[channels.redis]\nurl = \"{url}\"\n",
            deadline.as_secs_f64()
        ),
    );
    let ch = Channel {
        name: "redis",
        run_args: vec![
            "--channel".into(),
            "redis".into(),
            "--config".into(),
            cfg.0.display().to_string(),
        ],
        prog_args: vec!["--ignore-term".into()],
        deadline,
        sizes: &[8, 1000, 16384],
    };
    (ch, cfg)
}

#[test]
fn peers_dying_at_random_moments_over_redis() {
    let (ch, _cfg) = redis_channel();
    campaign(&ch, 100);
}

/// The storage channels' native gather: when a contributor dies, the root's `Timeout` names
/// the missing rank (the counter records who arrived), not the root itself.
#[test]
fn redis_gather_root_names_the_dead_rank() {
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (ch, _cfg) = redis_channel();
    let t = Trial {
        n: 3,
        op: "gather",
        bytes: 8,
        victim: 1,
        die_after_ms: 20,
    };
    run_trial(&ch, &t, 0, 0, &mut Tally::default());
}
