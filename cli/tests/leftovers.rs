//! Leftovers in storage: after a job whose rank was killed, nothing of the job is left in Redis,
//! S3 or DynamoDB (`fmi run` removes what the job stored when it ends, whatever the outcome);
//! and when `fmi run` itself is killed (SIGKILL: no chance to clean up), `fmi cleanup --job ID`
//! removes what the job left on demand. Every rank first stores a message nobody receives
//! (`examples/peer_death.rs --leave-message`), so the job surely leaves something.
//!
//! Needs the servers of `scripts/services.sh` (FMI_TEST_* variables); S3 and DynamoDB with the
//! `aws` feature.

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const FMI: &str = env!("CARGO_BIN_EXE_fmi");

static SERIAL: Mutex<()> = Mutex::new(());

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

fn service(var: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| {
        panic!("{var} is not set: start the servers with `eval \"$(scripts/services.sh start)\"`")
    })
}

/// Live processes whose environment has `FMI_JOB=job`.
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
        if let Ok(environ) = std::fs::read(entry.path().join("environ")) {
            if environ.split(|&b| b == 0).any(|e| e == needle.as_bytes()) {
                found.push(pid);
            }
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

fn fmi(args: &[&str]) -> Output {
    let mut cmd = Command::new(FMI);
    cmd.args(args).stdin(Stdio::null());
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy().into_owned();
        if k.starts_with("FMI_") && !k.starts_with("FMI_TEST") {
            cmd.env_remove(k);
        }
    }
    cmd.output().expect("run fmi")
}

fn text(out: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `fmi cleanup` and the number of objects it says it removed.
fn cleanup(config: &str, job: &str) -> usize {
    let out = fmi(&["cleanup", "--config", config, "--job", job]);
    assert!(out.status.success(), "{}", text(&out));
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    all.split("removed ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("cleanup did not say what it removed: {}", text(&out)))
}

fn leftovers_on(channel: &str, section: &str) {
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let path = std::env::temp_dir().join(format!("fmi-leftovers-{channel}-{:x}.toml", nanos()));
    std::fs::write(
        &path,
        format!("deadline_secs = 3\n[storage]\npoll_initial_ms = 2\npoll_max_ms = 50\n{section}"),
    )
    .unwrap();
    let config = path.to_str().unwrap().to_owned();
    if channel != "redis" {
        let setup = fmi(&["setup", "--config", &config]);
        assert!(setup.status.success(), "{}", text(&setup));
    }
    let prog = example("peer_death");
    let prog = prog.to_str().unwrap();

    // 1. A rank is killed: fmi run fails and removes what the job stored.
    let job = format!("left-{channel}-{:x}", nanos() & 0xffff_ffff);
    let out = fmi(&[
        "run",
        "-n",
        "3",
        "--job",
        &job,
        "--channel",
        channel,
        "--config",
        &config,
        "--timeout",
        "30",
        "--",
        prog,
        "--op",
        "barrier",
        "--victim",
        "1",
        "--die-after-ms",
        "100",
        "--leave-message",
        "--ignore-term",
    ]);
    assert!(!out.status.success(), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("removed ") && stderr.contains("leftover"),
        "fmi run did not clean up after the failed job:\n{}",
        text(&out)
    );
    assert!(job_processes(&job).is_empty());
    assert_eq!(
        cleanup(&config, &job),
        0,
        "the failed job left objects behind"
    );

    // 2. fmi run itself is killed: the job's objects stay until `fmi cleanup`.
    let job = format!("left9-{channel}-{:x}", nanos() & 0xffff_ffff);
    let mut cmd = Command::new(FMI);
    cmd.args([
        "run",
        "-n",
        "3",
        "--job",
        &job,
        "--channel",
        channel,
        "--config",
        &config,
    ])
    .args([
        "--timeout",
        "60",
        "--",
        prog,
        "--op",
        "barrier",
        "--victim",
        "0",
    ])
    .args(["--die-after-ms", "60000", "--leave-message"])
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::null());
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy().into_owned();
        if k.starts_with("FMI_") && !k.starts_with("FMI_TEST") {
            cmd.env_remove(k);
        }
    }
    let mut child = cmd.spawn().expect("start fmi run");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut looping = 0;
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if line.contains("looping over") {
                looping += 1;
                if looping == 3 {
                    let _ = tx.send(());
                }
            }
        }
    });
    let ready = rx.recv_timeout(Duration::from_secs(30));
    let _ = child.kill();
    let _ = child.wait();
    let until = Instant::now() + Duration::from_secs(5);
    loop {
        let left = job_processes(&job);
        if left.is_empty() || Instant::now() > until {
            // Orphaned ranks (their launcher is gone) are killed here, as a scheduler would.
            left.into_iter().for_each(kill9);
            break;
        }
        left.into_iter().for_each(kill9);
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(ready.is_ok(), "the ranks never started looping");
    let removed = cleanup(&config, &job);
    assert!(
        removed >= 3,
        "fmi cleanup removed only {removed} objects of the killed job"
    );
    assert_eq!(cleanup(&config, &job), 0, "a second cleanup finds nothing");
    println!("leftovers over {channel}: failed job left 0 objects; killed launcher left {removed}, all removed by fmi cleanup");
    let _ = std::fs::remove_file(&path);
}

#[test]
fn redis_jobs_leave_nothing_and_cleanup_removes_a_killed_jobs_keys() {
    let url = service("FMI_TEST_REDIS_URL");
    leftovers_on("redis", &format!("[channels.redis]\nurl = \"{url}\"\n"));
}

#[cfg(feature = "aws")]
#[test]
fn s3_jobs_leave_nothing_and_cleanup_removes_a_killed_jobs_objects() {
    let endpoint = service("FMI_TEST_S3_ENDPOINT");
    leftovers_on(
        "s3",
        &format!(
            "[channels.s3]\nbucket = \"fmi-leftovers\"\nendpoint = \"{endpoint}\"\nregion = \"us-east-1\"\n"
        ),
    );
}

#[cfg(feature = "aws")]
#[test]
fn dynamodb_jobs_leave_nothing_and_cleanup_removes_a_killed_jobs_items() {
    let endpoint = service("FMI_TEST_DYNAMODB_ENDPOINT");
    leftovers_on(
        "dynamodb",
        &format!(
            "[channels.dynamodb]\ntable = \"fmi-leftovers\"\nendpoint = \"{endpoint}\"\nregion = \"us-east-1\"\n"
        ),
    );
}
