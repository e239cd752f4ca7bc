//! `fmi explain`: the model's table and CSV through the real command.

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::path::PathBuf;
use std::process::{Command, Output};

const FMI: &str = env!("CARGO_BIN_EXE_fmi");

fn explain(args: &[&str]) -> Output {
    Command::new(FMI)
        .arg("explain")
        .args(args)
        .env_remove("FMI_RENDEZVOUS")
        .output()
        .expect("run fmi explain")
}

fn config(name: &str, text: &str) -> PathBuf {
    let path = std::env::temp_dir().join(format!("fmi-explain-{}-{name}.toml", std::process::id()));
    std::fs::write(&path, text).unwrap();
    path
}

/// Rows of the CSV as (op, bytes, channel, algorithm, runner_up).
fn rows(out: &Output) -> Vec<Vec<String>> {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout.clone()).unwrap();
    let mut lines = text.lines();
    assert_eq!(
        lines.next(),
        Some("op,bytes,channel,algorithm,seconds,dollars,runner_up")
    );
    lines
        .map(|l| l.split(',').map(str::to_owned).collect::<Vec<_>>())
        .inspect(|f| assert_eq!(f.len(), 7, "{f:?}"))
        .collect()
}

#[test]
fn s3_and_dynamodb_cheap_crossover_from_the_config() {
    let path = config(
        "storage",
        "[channels.s3]\nbucket = \"b\"\n[channels.dynamodb]\ntable = \"t\"\n[model]\nobjective = \"cheap\"\n",
    );
    let out = explain(&[
        "--config",
        path.to_str().unwrap(),
        "--ranks",
        "2",
        "--format",
        "csv",
    ]);
    let all = rows(&out);
    let send: Vec<_> = all.iter().filter(|r| r[0] == "send").collect();
    assert_eq!(send.len(), 9);
    for r in &send {
        let bytes: u64 = r[1].parse().unwrap();
        let want = if bytes <= 512 { "dynamodb" } else { "s3" };
        if bytes <= 512 || bytes >= 32 << 10 {
            assert_eq!(r[2], want, "{r:?}");
        }
        assert!(r[2] == "s3" || r[2] == "dynamodb");
    }
    // Same inputs, same output.
    let again = explain(&[
        "--config",
        path.to_str().unwrap(),
        "--ranks",
        "2",
        "--format",
        "csv",
    ]);
    assert_eq!(out.stdout, again.stdout);
    // Fast over every channel: tcp.
    let fast = explain(&["--channels", "tcp,redis,s3,dynamodb", "--format", "csv"]);
    assert!(rows(&fast).iter().all(|r| r[2] == "tcp"));
    std::fs::remove_file(path).ok();
}

#[test]
fn table_and_errors() {
    let out = explain(&["--channels", "redis,s3", "--objective", "0.001"]);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("objective 0.001") && text.contains("allreduce"),
        "{text}"
    );
    let bad = explain(&["--channels", "pigeon"]);
    assert_eq!(bad.status.code(), Some(2));
    let bad = explain(&["--objective", "slow"]);
    assert_eq!(bad.status.code(), Some(2));
    let empty = config("empty", "deadline_secs = 5\n");
    let none = explain(&["--config", empty.to_str().unwrap()]);
    assert_eq!(none.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&none.stderr).contains("--channels"));
    std::fs::remove_file(empty).ok();
}
