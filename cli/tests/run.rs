//! Multi-process tests of `fmi run`: real processes, the embedded rendezvous server and the TCP
//! channel on loopback.
//!
//! The programs run are the workspace's examples (`examples/collectives_check.rs`,
//! `examples/allreduce.rs`), found next to this test binary in `target/<profile>/examples/`.
//! `cargo test --workspace` builds them; with `cargo test -p fmi-cli` build them first:
//! `cargo build --workspace --examples` (with `--release` for a release test run).
//!
//! Jobs run one at a time (see [`serial`]) so that the time bounds hold on a small, busy machine.
//! After every job the test checks `/proc` for processes whose environment names the job.

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const FMI: &str = env!("CARGO_BIN_EXE_fmi");

/// Longest any job here may take before the test stops it and fails.
const JOB_LIMIT: Duration = Duration::from_secs(60);

static SERIAL: Mutex<()> = Mutex::new(());

/// One job at a time; a failed test does not block the others.
fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// `target/<profile>/examples/NAME`, from this test's `target/<profile>/deps/run-HASH`.
fn example(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("path of the test binary");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("the test binary lives in target/<profile>/deps");
    let path = profile_dir.join("examples").join(name);
    assert!(
        path.is_file(),
        "example binary {} is missing: build the examples first with \
         `cargo build --workspace --examples` (add --release for a release test run), \
         or run `cargo test --workspace`, which builds them",
        path.display()
    );
    path
}

/// A job id no other test (or earlier run) uses.
fn job_id(what: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("t-{what}-{}-{nanos:x}", std::process::id())
}

/// A scratch directory, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(what: &str) -> TempDir {
        let dir = std::env::temp_dir().join(job_id(&format!("fmi-run-{what}")));
        std::fs::create_dir_all(&dir).expect("create a scratch directory");
        TempDir(dir)
    }

    fn file(&self, name: &str, text: &str) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, text).expect("write a scratch file");
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

// ------------------------------------------------------------------ running fmi

type Lines = Arc<Mutex<Vec<(Instant, Vec<u8>)>>>;

/// A running `fmi` whose output is read line by line, with the time each line arrived.
struct Job {
    child: Child,
    started: Instant,
    stdout: Lines,
    stderr: Lines,
    readers: Vec<JoinHandle<()>>,
    what: String,
}

/// How a job ended.
struct Finished {
    status: ExitStatus,
    elapsed: Duration,
    ended: Instant,
    stdout: Vec<(Instant, Vec<u8>)>,
    stderr: Vec<(Instant, Vec<u8>)>,
    what: String,
}

fn read_lines(stream: impl Read + Send + 'static, into: Lines) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stream);
        let mut line = Vec::new();
        loop {
            line.clear();
            match reader.read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let now = Instant::now();
                    if line.last() == Some(&b'\n') {
                        line.pop();
                    }
                    into.lock().unwrap().push((now, line.clone()));
                }
            }
        }
    })
}

/// Starts `fmi ARGS` with a clean FMI_* environment.
fn start<I, S>(args: I) -> Job
where
    I: IntoIterator<Item = S>,
    S: Into<OsString>,
{
    let args: Vec<OsString> = args.into_iter().map(Into::into).collect();
    let what = format!(
        "fmi {}",
        args.iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    );
    let mut cmd = Command::new(FMI);
    cmd.args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for var in [
        "FMI_RANK",
        "FMI_SIZE",
        "FMI_JOB",
        "FMI_CONFIG",
        "FMI_RENDEZVOUS",
        "FMI_TOKEN",
        "FMI_CHANNEL",
    ] {
        cmd.env_remove(var);
    }
    let started = Instant::now();
    let mut child = cmd.spawn().expect("start the fmi binary");
    let stdout: Lines = Arc::default();
    let stderr: Lines = Arc::default();
    let readers = vec![
        read_lines(child.stdout.take().unwrap(), Arc::clone(&stdout)),
        read_lines(child.stderr.take().unwrap(), Arc::clone(&stderr)),
    ];
    Job {
        child,
        started,
        stdout,
        stderr,
        readers,
        what,
    }
}

fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .args(["-s", sig, &pid.to_string()])
        .stderr(Stdio::null())
        .status();
}

impl Job {
    /// Waits (bounded) until a line of stdout satisfies `pred`.
    fn wait_for_stdout(&mut self, count: usize, pred: impl Fn(&str) -> bool) {
        let until = Instant::now() + Duration::from_secs(30);
        loop {
            let seen = self
                .stdout
                .lock()
                .unwrap()
                .iter()
                .filter(|(_, l)| pred(&String::from_utf8_lossy(l)))
                .count();
            if seen >= count {
                return;
            }
            if Instant::now() > until || self.child.try_wait().ok().flatten().is_some() {
                let text = lossy(&self.stdout.lock().unwrap());
                let errs = lossy(&self.stderr.lock().unwrap());
                self.stop();
                panic!(
                    "{}: expected {count} matching lines.\nstdout:\n{text}\nstderr:\n{errs}",
                    self.what
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Stops fmi the way a user would (SIGTERM, which stops its ranks), then for sure.
    fn stop(&mut self) {
        signal(self.child.id(), "TERM");
        let until = Instant::now() + Duration::from_secs(5);
        while Instant::now() < until {
            if self.child.try_wait().ok().flatten().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits for fmi to exit; fails the test if it takes longer than `limit`.
    fn finish(mut self, limit: Duration) -> Finished {
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("wait for fmi") {
                break status;
            }
            if self.started.elapsed() > limit {
                self.stop();
                let out = lossy(&self.stdout.lock().unwrap());
                let err = lossy(&self.stderr.lock().unwrap());
                panic!(
                    "{}: still running after {limit:?}; stopped it.\nstdout:\n{out}\nstderr:\n{err}",
                    self.what
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        let ended = Instant::now();
        for r in self.readers.drain(..) {
            r.join().expect("output reader");
        }
        let take = |l: &Lines| std::mem::take(&mut *l.lock().unwrap());
        Finished {
            status,
            elapsed: ended - self.started,
            ended,
            stdout: take(&self.stdout),
            stderr: take(&self.stderr),
            what: self.what,
        }
    }
}

fn lossy(lines: &[(Instant, Vec<u8>)]) -> String {
    lines
        .iter()
        .map(|(_, l)| format!("  {}\n", String::from_utf8_lossy(l)))
        .collect()
}

impl Finished {
    fn out(&self) -> Vec<String> {
        self.stdout
            .iter()
            .map(|(_, l)| String::from_utf8_lossy(l).into_owned())
            .collect()
    }

    fn err(&self) -> Vec<String> {
        self.stderr
            .iter()
            .map(|(_, l)| String::from_utf8_lossy(l).into_owned())
            .collect()
    }

    /// Everything fmi printed, for assertion messages.
    fn report(&self) -> String {
        format!(
            "{} ended with {} after {:?}\nstdout:\n{}stderr:\n{}",
            self.what,
            self.status,
            self.elapsed,
            lossy(&self.stdout),
            lossy(&self.stderr)
        )
    }

    fn assert_success(&self) {
        assert!(self.status.success(), "{}", self.report());
    }

    fn assert_code(&self, code: i32) {
        assert_eq!(self.status.code(), Some(code), "{}", self.report());
    }
}

/// Runs `fmi ARGS` to the end.
fn fmi<I, S>(args: I) -> Finished
where
    I: IntoIterator<Item = S>,
    S: Into<OsString>,
{
    start(args).finish(JOB_LIMIT)
}

/// The arguments of `fmi run -n N --job JOB [EXTRA...] -- PROGRAM [ARGS...]`.
fn run_args(n: u32, job: &str, extra: &[&str], program: &Path, args: &[&str]) -> Vec<OsString> {
    let mut v: Vec<OsString> = vec!["run".into(), "-n".into(), n.to_string().into()];
    v.extend(["--job".into(), job.into()]);
    v.extend(extra.iter().map(Into::into));
    v.push("--".into());
    v.push(program.into());
    v.extend(args.iter().map(Into::into));
    v
}

// ------------------------------------------------------------------ processes left behind

/// Live processes whose environment has `FMI_JOB=job`: (pid, command line).
fn job_processes(job: &str) -> Vec<(u32, String)> {
    let needle = format!("FMI_JOB={job}");
    let mut found = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return found;
    };
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let path = entry.path();
        // A zombie has ended; only its exit status is left for its parent to collect.
        let zombie = std::fs::read_to_string(path.join("stat"))
            .ok()
            .and_then(|s| {
                s.rsplit_once(')')
                    .map(|(_, rest)| rest.trim_start().starts_with('Z'))
            })
            .unwrap_or(true);
        if zombie {
            continue;
        }
        let Ok(environ) = std::fs::read(path.join("environ")) else {
            continue;
        };
        if environ.split(|&b| b == 0).any(|e| e == needle.as_bytes()) {
            let cmdline = std::fs::read(path.join("cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            found.push((pid, cmdline));
        }
    }
    found
}

/// Kills whatever is left of `job` when dropped, so that a failing test leaves nothing behind
/// either.
struct Cleanup(String);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for (pid, _) in job_processes(&self.0) {
            signal(pid, "KILL");
        }
    }
}

/// Fails (after killing them) if processes of `job` are still alive shortly after fmi exited.
fn assert_no_process_left(job: &str) {
    let until = Instant::now() + Duration::from_secs(2);
    loop {
        let left = job_processes(job);
        if left.is_empty() {
            return;
        }
        if Instant::now() > until {
            for (pid, _) in &left {
                signal(*pid, "KILL");
            }
            panic!("processes of job {job} outlived fmi run: {left:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ------------------------------------------------------------------ collectives

fn collectives_on(n: u32, extra: &[&str]) {
    let job = job_id(&format!("coll{n}"));
    let _cleanup = Cleanup(job.clone());
    let prog = example("collectives_check");
    let done = fmi(run_args(n, &job, extra, &prog, &[]));
    done.assert_success();
    let mut got = done.out();
    got.sort();
    let mut want: Vec<String> = (0..n)
        .map(|r| format!("[{r}] rank {r}/{n}: all collectives ok"))
        .collect();
    want.sort();
    assert_eq!(got, want, "{}", done.report());
    assert_no_process_left(&job);
}

#[test]
fn every_collective_on_1_2_3_5_8_ranks() {
    let _one = serial();
    for n in [1, 2, 3, 5, 8] {
        collectives_on(n, &[]);
    }
}

#[test]
fn every_collective_with_forced_algorithms_from_config() {
    let _one = serial();
    let dir = TempDir::new("forced");
    let config = dir.file(
        "forced.toml",
        "deadline_secs = 30\n[collectives]\nforce_bcast = \"scatter_allgather\"\n\
         force_allreduce = \"ring\"\nforce_allgather = \"ring\"\n",
    );
    let config = config.to_str().expect("utf-8 temp path");
    collectives_on(5, &["--config", config]);
    // Every operation forced onto the TCP channel (the example checks the channel's name).
    collectives_on(1, &["--channel", "tcp"]);
    collectives_on(3, &["--channel", "tcp"]);
}

#[test]
fn allreduce_example_on_4_ranks() {
    let _one = serial();
    let job = job_id("allreduce");
    let _cleanup = Cleanup(job.clone());
    let done = fmi(run_args(4, &job, &[], &example("allreduce"), &[]));
    done.assert_success();
    let out = done.out();
    let mut sums: Vec<&String> = out.iter().filter(|l| l.contains("allreduce sum")).collect();
    sums.sort();
    let want: Vec<String> = (0..4)
        .map(|r| format!("[{r}] rank {r}/4: allreduce sum = 10"))
        .collect();
    assert_eq!(sums, want.iter().collect::<Vec<_>>(), "{}", done.report());
    for r in 0..4 {
        let checksum = format!("[{r}] rank {r}/4: vector checksum = 8590196736");
        assert!(
            out.contains(&checksum),
            "{checksum} missing\n{}",
            done.report()
        );
    }
    assert_eq!(out.len(), 8, "{}", done.report());
    assert_no_process_left(&job);
}

// ------------------------------------------------------------------ failures

#[test]
fn killing_a_rank_mid_allreduce_stops_the_job_and_names_it() {
    let _one = serial();
    let dir = TempDir::new("kill");
    let deadline = Duration::from_secs(5);
    let config = dir.file("deadline.toml", "deadline_secs = 5\n");
    let config = config.to_str().expect("utf-8 temp path");
    for (n, dead) in [(4u32, 2u32), (3, 0)] {
        let job = job_id(&format!("kill{n}"));
        let _cleanup = Cleanup(job.clone());
        let args = ["--die-at", "200", "--die-rank", &dead.to_string()].map(str::to_owned);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let prog = example("collectives_check");
        let done = fmi(run_args(n, &job, &["--config", config], &prog, &args));
        let report = done.report();
        done.assert_code(9);

        let dead_prefix = format!("[{dead}] ");
        let (died_at, _) = done
            .stderr
            .iter()
            .find(|(_, l)| l.starts_with(dead_prefix.as_bytes()) && l.ends_with(b"iteration 200"))
            .unwrap_or_else(|| panic!("rank {dead} did not say it was dying\n{report}"));
        let stopped_after = done.ended - *died_at;
        assert!(
            stopped_after < Duration::from_secs(3) && stopped_after < deadline,
            "fmi run took {stopped_after:?} to end the job after rank {dead} died\n{report}"
        );

        // Every survivor ends with a peer failure; at least one names the dead rank.
        let err = done.err();
        for s in (0..n).filter(|&s| s != dead) {
            let prefix = format!("[{s}] ");
            assert!(
                err.iter().any(|l| l.starts_with(&prefix)
                    && l.contains("allreduce (loop iteration")
                    && (l.contains("lost rank") || l.contains("timed out"))),
                "rank {s} did not report a lost or silent peer\n{report}"
            );
        }
        let names_dead = |l: &&String| {
            l.contains(&format!("lost rank {dead} "))
                || l.contains(&format!("waiting for rank {dead} "))
        };
        assert!(
            err.iter()
                .filter(|l| !l.starts_with(&dead_prefix))
                .any(|l| names_dead(&l)),
            "no survivor named rank {dead}\n{report}"
        );
        assert!(
            err.iter()
                .any(|l| l.starts_with(&format!("fmi run: rank {dead} of job {job} failed"))),
            "{report}"
        );
        assert_no_process_left(&job);
    }
}

#[test]
fn a_failing_rank_stops_its_hanging_siblings() {
    let _one = serial();
    let job = job_id("fail");
    let _cleanup = Cleanup(job.clone());
    let prog = example("collectives_check");
    let args = ["--hang-secs", "120", "--fail-rank", "1", "--code", "3"];
    let done = fmi(run_args(3, &job, &[], &prog, &args));
    let report = done.report();
    done.assert_code(3);
    for r in 0..3 {
        assert!(
            done.out().contains(&format!("[{r}] rank {r}/3: ready")),
            "{report}"
        );
    }
    assert!(
        done.err().iter().any(|l| l.starts_with(&format!(
            "fmi run: rank 1 of job {job} failed (exit code 3)"
        ))),
        "{report}"
    );
    // 1 s for the others to end on their own, then SIGTERM, which ends them at once.
    assert!(done.elapsed < Duration::from_secs(10), "{report}");
    assert_no_process_left(&job);
}

#[test]
fn processes_started_by_a_failed_rank_are_stopped_too() {
    let _one = serial();
    let job = job_id("grandchild");
    let _cleanup = Cleanup(job.clone());
    // Each rank leaves a `sleep` behind and fails; the launcher must stop the sleeps.
    let done = fmi(run_args(
        2,
        &job,
        &[],
        Path::new("sh"),
        &["-c", "sleep 60 >/dev/null 2>&1 & echo started; exit 3"],
    ));
    let report = done.report();
    done.assert_code(3);
    assert!(done.elapsed < Duration::from_secs(10), "{report}");
    assert_no_process_left(&job);
}

#[test]
fn timeout_stops_a_hanging_job_with_124() {
    let _one = serial();
    let job = job_id("timeout");
    let _cleanup = Cleanup(job.clone());
    let prog = example("collectives_check");
    let done = fmi(run_args(
        2,
        &job,
        &["--timeout", "1.5"],
        &prog,
        &["--hang-secs", "120"],
    ));
    let report = done.report();
    done.assert_code(124);
    assert!(
        done.elapsed >= Duration::from_millis(1500) && done.elapsed < Duration::from_secs(10),
        "{report}"
    );
    assert!(
        done.err()
            .iter()
            .any(|l| l.contains(&format!("job {job} did not finish within"))),
        "{report}"
    );
    assert_no_process_left(&job);
}

#[test]
fn sigterm_to_fmi_run_stops_every_rank() {
    let _one = serial();
    let job = job_id("sigterm");
    let _cleanup = Cleanup(job.clone());
    let prog = example("collectives_check");
    let mut running = start(run_args(3, &job, &[], &prog, &["--hang-secs", "120"]));
    running.wait_for_stdout(3, |l| l.contains(": ready"));
    assert_eq!(job_processes(&job).len(), 3, "the ranks should be running");
    signal(running.child.id(), "TERM");
    let done = running.finish(Duration::from_secs(30));
    done.assert_code(128 + 15);
    assert_no_process_left(&job);
}

// ------------------------------------------------------------------ output forwarding

/// Line `i` of `stream` of rank `r` in collectives_check's `--spam` mode.
fn spam_line(r: u32, stream: &str, i: usize) -> Vec<u8> {
    let mut line = format!("spam rank {r} {stream} line {i} ").into_bytes();
    if i == 1 {
        line.extend_from_slice(b"not utf-8: \xff\xfe\xfd");
        return line;
    }
    let len = [10, 1000, 5000, 100_000][i % 4];
    line.extend((0..len).map(|k| b'a' + ((r as usize + i + k) % 26) as u8));
    line
}

#[test]
fn output_is_forwarded_in_whole_prefixed_lines_from_both_streams() {
    let _one = serial();
    let job = job_id("spam");
    let _cleanup = Cleanup(job.clone());
    let (n, lines) = (3u32, 12usize);
    let prog = example("collectives_check");
    // A launcher that stopped draining a pipe would block its rank: --timeout bounds that.
    let done = fmi(run_args(
        n,
        &job,
        &["--timeout", "30"],
        &prog,
        &["--spam", &lines.to_string()],
    ));
    done.assert_success();
    for (stream, got) in [("stdout", &done.stdout), ("stderr", &done.stderr)] {
        let mut per_rank: BTreeMap<u32, Vec<&[u8]>> = BTreeMap::new();
        for (_, line) in got {
            let text = String::from_utf8_lossy(line);
            let rank = text
                .strip_prefix('[')
                .and_then(|t| t.split_once("] "))
                .and_then(|(r, _)| r.parse::<u32>().ok())
                .filter(|r| *r < n)
                .unwrap_or_else(|| panic!("{stream} line without a rank prefix: {:.80}", text));
            let prefix_len = format!("[{rank}] ").len();
            per_rank.entry(rank).or_default().push(&line[prefix_len..]);
        }
        assert_eq!(per_rank.len(), n as usize, "{stream}: ranks missing");
        for (r, got) in per_rank {
            let mut want: Vec<Vec<u8>> = (0..lines).map(|i| spam_line(r, stream, i)).collect();
            want.push(format!("tail rank {r} {stream}").into_bytes());
            assert_eq!(got.len(), want.len(), "{stream} of rank {r}: line count");
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!(
                    *g == w.as_slice(),
                    "{stream} of rank {r}, line {i}: got {:.80}, expected {:.80}",
                    String::from_utf8_lossy(g),
                    String::from_utf8_lossy(w)
                );
            }
        }
    }
    assert_no_process_left(&job);
}

// ------------------------------------------------------------------ arguments and environment

#[test]
fn help_documents_run() {
    let done = fmi(["run", "--help"]);
    done.assert_success();
    let help = done.out().join("\n");
    for needed in [
        "-n",
        "--job",
        "--config",
        "--timeout",
        "--channel",
        "FMI_RANK",
        "FMI_SIZE",
        "FMI_JOB",
        "FMI_RENDEZVOUS",
        "FMI_TOKEN",
        "124",
        "[RANK]",
    ] {
        assert!(
            help.contains(needed),
            "`fmi run --help` lacks {needed}:\n{help}"
        );
    }
    let top = fmi(["--help"]);
    top.assert_success();
    assert!(
        top.out().iter().any(|l| l.trim_start().starts_with("run")),
        "{}",
        top.report()
    );
}

#[test]
fn bad_arguments_are_refused_clearly() {
    let _one = serial();
    let marker = TempDir::new("badargs");
    let touched = marker.0.join("started");
    let touch = format!("touch {}", touched.display());
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec![
                "run", "-n", "2", "--job", "bad/id", "--", "sh", "-c", &touch,
            ],
            "bad/id",
        ),
        (
            vec!["run", "-n", "2", "--job", "", "--", "sh", "-c", &touch],
            "job id",
        ),
        (vec!["run", "-n", "2"], "PROGRAM"),
        (vec!["run", "-n", "0", "--", "sh", "-c", &touch], "--ranks"),
        (vec!["run", "--", "sh", "-c", &touch], "--ranks"),
        (
            vec!["run", "-n", "2", "--timeout", "0", "--", "sh", "-c", &touch],
            "--timeout",
        ),
        (
            vec![
                "run",
                "-n",
                "2",
                "--config",
                "/nonexistent/fmi.toml",
                "--",
                "sh",
                "-c",
                &touch,
            ],
            "/nonexistent/fmi.toml",
        ),
        (
            vec!["run", "-n", "2", "--", "/nonexistent/fmi-test-program"],
            "cannot start /nonexistent/fmi-test-program",
        ),
    ];
    for (args, needle) in cases {
        let done = fmi(args.iter().copied());
        assert!(!done.status.success(), "{}", done.report());
        assert!(
            done.err().iter().any(|l| l.contains(needle)),
            "stderr should mention {needle:?}\n{}",
            done.report()
        );
        assert!(!touched.exists(), "a rank was started\n{}", done.report());
    }
}

#[test]
fn unknown_channel_makes_every_rank_fail_naming_fmi_channel() {
    let _one = serial();
    let job = job_id("bogus");
    let _cleanup = Cleanup(job.clone());
    let prog = example("collectives_check");
    let done = fmi(run_args(2, &job, &["--channel", "bogus"], &prog, &[]));
    let report = done.report();
    assert!(!done.status.success(), "{report}");
    assert!(
        done.err()
            .iter()
            .any(|l| l.starts_with('[') && l.contains("FMI_CHANNEL") && l.contains("bogus")),
        "{report}"
    );
    assert!(done.elapsed < Duration::from_secs(10), "{report}");
    assert_no_process_left(&job);
}

#[test]
fn ranks_get_the_job_environment_and_a_fresh_secret_token() {
    let _one = serial();
    let dir = TempDir::new("env");
    let script = "printf '%s\\n' \"$FMI_RANK\" \"$FMI_SIZE\" \"$FMI_JOB\" \"$FMI_RENDEZVOUS\" \
                  \"$FMI_TOKEN\" > \"$0/$1.$FMI_RANK\"; echo \"rank $FMI_RANK of $FMI_SIZE\"";
    let dir_arg = dir.0.to_str().expect("utf-8 temp path");
    let mut tokens = Vec::new();
    for run in ["a", "b"] {
        let job = job_id(&format!("env{run}"));
        let _cleanup = Cleanup(job.clone());
        let done = fmi(run_args(
            3,
            &job,
            &[],
            Path::new("sh"),
            &["-c", script, dir_arg, run],
        ));
        done.assert_success();
        let mut out = done.out();
        out.sort();
        assert_eq!(
            out,
            ["[0] rank 0 of 3", "[1] rank 1 of 3", "[2] rank 2 of 3"],
            "{}",
            done.report()
        );
        let mut token = None;
        for r in 0..3 {
            let text = std::fs::read_to_string(dir.0.join(format!("{run}.{r}")))
                .expect("each rank wrote its environment");
            let vars: Vec<&str> = text.lines().collect();
            assert_eq!(vars.len(), 5, "{text}");
            assert_eq!(vars[0], r.to_string());
            assert_eq!(vars[1], "3");
            assert_eq!(vars[2], job);
            let addr: std::net::SocketAddr = vars[3].parse().expect("FMI_RENDEZVOUS is host:port");
            assert!(addr.ip().is_loopback(), "rendezvous on {addr}");
            assert!(
                vars[4].len() >= 16,
                "FMI_TOKEN too short: {} chars",
                vars[4].len()
            );
            match &token {
                None => token = Some(vars[4].to_owned()),
                Some(t) => assert_eq!(t, vars[4], "every rank of a job gets the same token"),
            }
        }
        let token = token.expect("three ranks");
        let everything = [done.stdout.as_slice(), done.stderr.as_slice()].concat();
        assert!(
            !everything
                .iter()
                .any(|(_, l)| String::from_utf8_lossy(l).contains(&token)),
            "fmi run printed the token"
        );
        tokens.push(token);
        assert_no_process_left(&job);
    }
    assert_ne!(tokens[0], tokens[1], "two jobs got the same token");
}

// ------------------------------------------------------------------ storage channels

/// The test server of one storage backend, from `scripts/services.sh start`; fails loudly when
/// the server is expected but its variable is absent.
fn service(var: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| {
        panic!(
            "{var} is not set: start the test servers with `eval \"$(scripts/services.sh start)\"`, \
             or run scripts/test.sh"
        )
    })
}

/// Runs every collective and the allreduce example on 5 ranks over storage channel `channel`
/// configured by `section`, and checks the job left nothing behind (fmi run would report and
/// remove leftovers).
/// Bound of one storage job of [`storage_job`] (a hang still fails the test).
const STORAGE_JOB_LIMIT: Duration = Duration::from_secs(180);

fn storage_job(channel: &str, section: &str) {
    let _one = serial();
    let dir = TempDir::new(channel);
    let config = dir.file(
        "storage.toml",
        &format!("deadline_secs = 60\n[storage]\npoll_initial_ms = 2\npoll_max_ms = 50\n{section}"),
    );
    let config = config.to_str().expect("utf-8 temp path");
    let setup = fmi(["setup", "--config", config]);
    setup.assert_success();
    for prog in ["collectives_check", "allreduce"] {
        let job = job_id(&format!("{channel}-{prog}"));
        let _cleanup = Cleanup(job.clone());
        // Polled storage is slow for a program of many small collectives: every-collective over
        // S3 takes ~35 s alone here, and ran past 60 s in CI beside other suites.
        let done = start(run_args(
            5,
            &job,
            &["--channel", channel, "--config", config],
            &example(prog),
            &[],
        ))
        .finish(STORAGE_JOB_LIMIT);
        done.assert_success();
        let oks = done
            .out()
            .iter()
            .filter(|l| l.contains("all collectives ok") || l.contains("allreduce sum = 15"))
            .count();
        assert_eq!(oks, 5, "{}", done.report());
        assert!(
            !done.err().iter().any(|l| l.contains("leftover")),
            "the job left objects behind\n{}",
            done.report()
        );
        let again = fmi(["cleanup", "--config", config, "--job", &job]);
        again.assert_success();
        assert!(
            again.out().iter().any(|l| l.contains("removed 0 objects")),
            "{}",
            again.report()
        );
        assert_no_process_left(&job);
    }
}

#[test]
fn every_collective_over_redis() {
    let url = service("FMI_TEST_REDIS_URL");
    storage_job("redis", &format!("[channels.redis]\nurl = \"{url}\"\n"));
}

#[cfg(feature = "aws")]
#[test]
fn every_collective_over_s3() {
    let endpoint = service("FMI_TEST_S3_ENDPOINT");
    storage_job(
        "s3",
        &format!(
            "[channels.s3]\nbucket = \"fmi-run-test\"\nendpoint = \"{endpoint}\"\nregion = \"us-east-1\"\n"
        ),
    );
}

#[cfg(feature = "aws")]
#[test]
fn every_collective_over_dynamodb() {
    let endpoint = service("FMI_TEST_DYNAMODB_ENDPOINT");
    storage_job(
        "dynamodb",
        &format!(
            "[channels.dynamodb]\ntable = \"fmi-run-test\"\nendpoint = \"{endpoint}\"\nregion = \"us-east-1\"\n"
        ),
    );
}

// ------------------------------------------------------------------ binding ranks to cores

/// The CPUs a process may run on, as `/proc/<pid>/status` lists them (`0-1`, `3`, …).
fn allowed_cpus(status: &str) -> Option<String> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .map(|v| v.trim().to_owned())
}

/// Each rank's `cpus=LIST host=N` line, by rank.
fn binding_lines(n: u32, extra: &[&str]) -> Vec<String> {
    let script = "echo \"cpus=$(grep Cpus_allowed_list /proc/self/status | cut -f2) \
                  host=${FMI_HOST_CPUS:-unset}\"";
    let job = job_id("bind");
    let done = fmi(run_args(
        n,
        &job,
        extra,
        Path::new("/bin/sh"),
        &["-c", script],
    ));
    done.assert_success();
    let text = lossy(&done.stdout);
    (0..n)
        .map(|r| {
            let prefix = format!("[{r}] ");
            text.lines()
                .find_map(|l| l.trim_start().strip_prefix(&prefix))
                .unwrap_or_else(|| panic!("no line from rank {r}: {}", done.report()))
                .to_owned()
        })
        .collect()
}

/// `fmi run` binds rank i to the i-th core it may use while the ranks fit those cores, and
/// tells the ranks how many cores that is (`FMI_HOST_CPUS`, which the channels read instead of
/// their own one-core mask). With `--bind none`, or more ranks than cores, nothing is bound.
#[test]
fn ranks_get_a_core_each_while_they_fit() {
    let _g = serial();
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let all = allowed_cpus(&status).expect("Cpus_allowed_list");
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let n = cores.min(2) as u32;
    let bound = binding_lines(n, &[]);
    let mut seen = std::collections::BTreeSet::new();
    for (r, line) in bound.iter().enumerate() {
        let (cpus, host) = line.split_once(' ').expect("two fields");
        let cpu = cpus.strip_prefix("cpus=").expect("cpus=");
        assert!(
            cpu.parse::<usize>().is_ok(),
            "rank {r} is bound to one CPU: {line} (allowed here: {all})"
        );
        assert!(
            seen.insert(cpu.to_owned()),
            "rank {r} shares its CPU: {bound:?}"
        );
        assert_eq!(host, format!("host={cores}"), "rank {r}: {line}");
    }
    for line in binding_lines(n, &["--bind", "none"]) {
        assert_eq!(line, format!("cpus={all} host=unset"));
    }
    if cores <= 8 {
        for line in binding_lines(cores as u32 + 1, &[]) {
            assert_eq!(
                line,
                format!("cpus={all} host=unset"),
                "more ranks than cores"
            );
        }
    }
}
