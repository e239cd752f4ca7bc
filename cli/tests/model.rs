//! `fmi calibrate` and `fmi run --report` against real servers on loopback.
//!
//! * The ledger: a job over a Redis server of this test's own (so that no other test's traffic
//!   is counted) prints, with `--report`, request counts equal to what the server counted
//!   (`INFO commandstats`).
//! * Calibration: `fmi calibrate` measures tcp, redis, s3 and dynamodb (the servers of
//!   `scripts/services.sh`, `FMI_TEST_*`) with a small ladder, writes a profile, and the profile
//!   changes `fmi explain`'s predictions.
//!
//! The program run is `examples/allreduce`, found next to this test binary in
//! `target/<profile>/examples/` (`cargo test --workspace` builds it).

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const FMI: &str = env!("CARGO_BIN_EXE_fmi");

fn example(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("path of the test binary");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps");
    let path = dir.join("examples").join(name);
    assert!(
        path.is_file(),
        "example {} is missing: `cargo build --workspace --examples` (with --release for a \
         release run), or run `cargo test --workspace`",
        path.display()
    );
    path
}

fn temp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("fmi-cli-model-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir.join(name)
}

/// Runs `fmi ARGS` with a time bound; returns its output.
fn fmi(args: &[&str], limit: Duration) -> Output {
    let mut child = Command::new(FMI)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start fmi");
    let until = Instant::now() + limit;
    loop {
        if child.try_wait().expect("wait").is_some() {
            return child.wait_with_output().expect("output");
        }
        if Instant::now() > until {
            let _ = child.kill();
            let out = child.wait_with_output().expect("output");
            panic!(
                "fmi {args:?} took more than {limit:?}; stderr:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A redis-server of this test's own on a free loopback port, stopped on drop.
struct OwnRedis {
    child: Child,
    port: u16,
}

impl OwnRedis {
    fn start() -> OwnRedis {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is installed (scripts/services.sh installs it)");
        let until = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < until, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        OwnRedis { child, port }
    }

    /// `INFO commandstats` as command → calls.
    fn calls(&self) -> BTreeMap<String, u64> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(b"INFO commandstats\r\n").unwrap();
        let mut text = Vec::new();
        let mut buf = [0u8; 8192];
        // A bulk string: `$LEN\r\n` then LEN bytes and `\r\n`.
        let until = Instant::now() + Duration::from_secs(5);
        loop {
            let n = s.read(&mut buf).expect("read INFO");
            text.extend_from_slice(&buf[..n]);
            let t = String::from_utf8_lossy(&text);
            if let Some((head, rest)) = t.split_once("\r\n") {
                let len: usize = head.trim_start_matches('$').parse().expect("bulk length");
                if rest.len() >= len {
                    break;
                }
            }
            assert!(n > 0 && Instant::now() < until, "short INFO answer");
        }
        String::from_utf8_lossy(&text)
            .lines()
            .filter_map(|l| {
                let (name, rest) = l.strip_prefix("cmdstat_")?.split_once(':')?;
                let calls = rest.split(',').find_map(|kv| kv.strip_prefix("calls="))?;
                Some((name.to_owned(), calls.parse().ok()?))
            })
            .collect()
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The numbers of the report's line for `channel`: puts, gets, empty, deletes, counters,
/// write_units, read_units, bytes_put, bytes_got.
fn report_line(report: &str, channel: &str) -> Vec<u64> {
    let line = report
        .lines()
        .find(|l| l.split_whitespace().next() == Some(channel))
        .unwrap_or_else(|| panic!("no {channel} line in the report:\n{report}"));
    line.split_whitespace()
        .skip(1)
        .take(9)
        .map(|v| v.parse().expect("a count"))
        .collect()
}

#[test]
fn report_counts_what_the_redis_server_counted() {
    let redis = OwnRedis::start();
    let config = temp("report-redis.toml");
    std::fs::write(
        &config,
        format!(
            "[channels.redis]\nurl = \"redis://127.0.0.1:{}\"\n",
            redis.port
        ),
    )
    .unwrap();
    let before = redis.calls();
    let program = example("allreduce");
    let out = fmi(
        &[
            "run",
            "-n",
            "3",
            "--channel",
            "redis",
            "--config",
            config.to_str().unwrap(),
            "--report",
            "--",
            program.to_str().unwrap(),
        ],
        Duration::from_secs(120),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "job failed:\n{stderr}");
    let after = redis.calls();
    let diff =
        |cmd: &str| after.get(cmd).copied().unwrap_or(0) - before.get(cmd).copied().unwrap_or(0);
    let r = report_line(&stderr, "redis");
    let (puts, gets, deletes, counters) = (r[0], r[1], r[3], r[4]);
    assert!(puts > 0 && gets > 0, "{stderr}");
    // Every put is one MULTI (DEL k, RPUSH k v, PEXPIRE k) EXEC; every read one BLMOVE (LINDEX
    // for broadcast reads; HGETALL when a timed-out barrier asks who arrived); every counted
    // delete one DEL; INCRBY for counters (an EVAL for the barrier's and gather's, whose script
    // also records who arrived).
    assert_eq!(puts, diff("rpush"), "puts vs RPUSH\n{stderr}\n{after:?}");
    assert_eq!(
        puts + counters,
        diff("exec"),
        "puts + counters vs EXEC (put and incr transactions)\n{stderr}"
    );
    assert_eq!(
        gets,
        diff("blmove") + diff("lindex") + diff("hgetall"),
        "gets vs BLMOVE + LINDEX + HGETALL\n{stderr}"
    );
    assert_eq!(
        counters,
        diff("incr") + diff("incrby") + diff("eval"),
        "counters vs INCR + INCRBY + EVAL\n{stderr}"
    );
    // Each put's transaction also clears its key with a DEL of its own; `fmi run` removes
    // leftovers after the job (none are left, so no DEL of its own).
    assert_eq!(deletes + puts, diff("del"), "deletes vs DEL\n{stderr}");
    assert!(stderr.contains("rank 2 redis"), "per-rank lines:\n{stderr}");
    assert!(stderr.contains("total: $"), "{stderr}");
}

fn service(var: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| {
        panic!(
            "{var} is not set: start the test servers with `eval \"$(scripts/services.sh start)\"`, \
             or run scripts/test.sh"
        )
    })
}

#[cfg(feature = "aws")]
#[test]
fn calibrate_writes_a_profile_that_changes_explain() {
    let redis = service("FMI_TEST_REDIS_URL");
    let s3 = service("FMI_TEST_S3_ENDPOINT");
    let dynamo = service("FMI_TEST_DYNAMODB_ENDPOINT");
    let base = format!(
        "[channels.redis]\nurl = \"{redis}\"\n\
         [channels.s3]\nbucket = \"fmi-calibrate-test\"\nendpoint = \"{s3}\"\nregion = \"us-east-1\"\n\
         [channels.dynamodb]\ntable = \"fmi-calibrate-test\"\nendpoint = \"{dynamo}\"\nregion = \"us-east-1\"\n\
         [storage]\npoll_initial_ms = 2\npoll_max_ms = 50\n"
    );
    let plain = temp("calibrate-plain.toml");
    std::fs::write(&plain, format!("{base}[model]\n")).unwrap();
    let profile = temp("calibrate-profile.toml");
    // The configuration may name the profile before it exists: calibrate does not read it.
    let with_profile = temp("calibrate-with.toml");
    std::fs::write(
        &with_profile,
        format!("{base}[model]\nprofile = \"calibrate-profile.toml\"\n"),
    )
    .unwrap();
    let out = fmi(
        &[
            "calibrate",
            "--config",
            with_profile.to_str().unwrap(),
            "--out",
            profile.to_str().unwrap(),
            "--sizes",
            "8,65536",
            "--rounds",
            "2",
            "--timeout",
            "100",
        ],
        Duration::from_secs(120),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "calibrate failed:\n{stderr}");
    let text = std::fs::read_to_string(&profile).expect("the profile was written");
    for ch in ["tcp", "redis", "s3", "dynamodb"] {
        assert!(text.contains(&format!("[model.{ch}]")), "{ch} in\n{text}");
    }
    // This host's reduction speed, measured (the model's default is a guess).
    let reduce = text
        .lines()
        .find_map(|l| l.strip_prefix("reduce_mb_per_sec = "))
        .and_then(|v| v.trim().parse::<f64>().ok());
    assert!(
        reduce.is_some_and(|mb| mb.is_finite() && mb > 0.0),
        "reduce_mb_per_sec in\n{text}"
    );
    // The measured requests per message are in the comments: an S3 message is one PUT, one
    // GET and one DELETE when the reader finds it stored.
    assert!(
        text.contains("deletes 1.00, gets 1.00, puts 1.00"),
        "requests of s3 in\n{text}"
    );
    let explain = |cfg: &Path| {
        let out = fmi(
            &[
                "explain",
                "--config",
                cfg.to_str().unwrap(),
                "--channels",
                "tcp,redis,s3,dynamodb",
                "--ranks",
                "4",
                "--format",
                "csv",
            ],
            Duration::from_secs(30),
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let before = explain(&plain);
    let after = explain(&with_profile);
    assert_ne!(before, after, "the profile changes the predictions");
    // Locally every channel is far faster than the defaults assume (FMI's AWS numbers): the
    // predicted time of an 8 B send over s3 must drop.
    let secs = |csv: &str| -> f64 {
        csv.lines()
            .find(|l| l.starts_with("send,8,"))
            .and_then(|l| l.split(',').nth(4))
            .and_then(|s| s.parse().ok())
            .expect("send,8 row")
    };
    assert!(secs(&after) < secs(&before), "{before}\n{after}");
}
