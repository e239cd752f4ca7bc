//! The job token never reaches a log or an error message, end to end: `fmi run` with
//! `FMI_LOG=trace` runs real jobs (TCP and Redis, succeeding and with a killed rank), each rank
//! first records the `FMI_TOKEN` it was given to a file of this test, and everything `fmi run`
//! and its ranks printed is searched for it.

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

const FMI: &str = env!("CARGO_BIN_EXE_fmi");

static SERIAL: Mutex<()> = Mutex::new(());

fn nanos() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

/// `target/<profile>/examples/NAME` (built by `cargo test --workspace`).
fn example(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps");
    let path = dir.join("examples").join(name);
    assert!(
        path.is_file(),
        "example {} is missing: cargo build --workspace --examples",
        path.display()
    );
    path
}

/// Runs `fmi run ARGS -- sh -c 'record token; exec PROG PROG_ARGS'` with trace logging; returns
/// (exit success, everything printed, the tokens the ranks recorded).
fn job(
    run_args: &[&str],
    prog: &Path,
    prog_args: &[&str],
    ranks: u32,
) -> (bool, String, Vec<String>) {
    let dir = std::env::temp_dir().join(format!("fmi-token-logs-{:x}", nanos()));
    std::fs::create_dir_all(&dir).unwrap();
    let n = ranks.to_string();
    let mut cmd = Command::new(FMI);
    cmd.args(["run", "-n", &n, "--timeout", "60"])
        .args(run_args)
        .args([
            "--",
            "sh",
            "-c",
            r#"printf %s "$FMI_TOKEN" > "$FMI_TOKEN_LOGS_DIR/$FMI_RANK"; exec "$0" "$@""#,
        ])
        .arg(prog)
        .args(prog_args)
        .env("FMI_LOG", "trace")
        .env("RUST_BACKTRACE", "1")
        .env("FMI_TOKEN_LOGS_DIR", &dir)
        .stdin(Stdio::null());
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy().into_owned();
        if k.starts_with("FMI_") && !k.starts_with("FMI_TEST") {
            cmd.env_remove(k);
        }
    }
    let out = cmd.output().expect("run fmi");
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let tokens = (0..ranks)
        .map(|r| std::fs::read_to_string(dir.join(r.to_string())).unwrap_or_default())
        .collect();
    let _ = std::fs::remove_dir_all(&dir);
    (out.status.success(), printed, tokens)
}

fn check(what: &str, expect_success: bool, (ok, printed, tokens): (bool, String, Vec<String>)) {
    assert_eq!(ok, expect_success, "{what}: fmi run's outcome\n{printed}");
    let token = &tokens[0];
    assert!(
        token.len() >= 16,
        "{what}: rank 0 was given no real token ({} chars)",
        token.len()
    );
    assert!(
        tokens.iter().all(|t| t == token),
        "{what}: ranks were given different tokens"
    );
    assert!(
        printed.contains("fmi_rendezvous"),
        "{what}: fmi run logged nothing; the test would prove nothing:\n{printed}"
    );
    // The whole token, and any 12-character piece of it (a truncated or split print).
    let chars: Vec<char> = token.chars().collect();
    for piece in chars.windows(12) {
        let piece: String = piece.iter().collect();
        assert!(
            !printed.contains(&piece),
            "{what}: part of the job token appears in what fmi run and its ranks printed"
        );
    }
}

#[test]
fn tokens_never_reach_fmi_runs_logs_or_errors_over_tcp() {
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let ok = job(&[], &example("collectives_check"), &[], 3);
    check("tcp job", true, ok);
    let failed = job(
        &[],
        &example("peer_death"),
        &["--op", "allreduce", "--victim", "1", "--die-after-ms", "50"],
        3,
    );
    check("tcp job with a killed rank", false, failed);
}

#[test]
fn tokens_never_reach_fmi_runs_logs_or_errors_over_redis() {
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let url = std::env::var("FMI_TEST_REDIS_URL").unwrap_or_else(|_| {
        panic!("FMI_TEST_REDIS_URL is not set: start the servers with `eval \"$(scripts/services.sh start)\"`")
    });
    let cfg = std::env::temp_dir().join(format!("fmi-token-logs-{:x}.toml", nanos()));
    std::fs::write(
        &cfg,
        format!("deadline_secs = 2\n[channels.redis]\nurl = \"{url}\"\n"),
    )
    .unwrap();
    let cfg_s = cfg.to_str().unwrap().to_owned();
    let args = ["--channel", "redis", "--config", cfg_s.as_str()];
    let ok = job(&args, &example("collectives_check"), &[], 3);
    check("redis job", true, ok);
    let failed = job(
        &args,
        &example("peer_death"),
        &[
            "--op",
            "barrier",
            "--victim",
            "2",
            "--die-after-ms",
            "50",
            "--leave-message",
        ],
        3,
    );
    check("redis job with a killed rank", false, failed);
    let _ = std::fs::remove_file(&cfg);
}
