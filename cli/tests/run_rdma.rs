//! `fmi run -n 3 --channel rdma` with the collectives example, on libfabric's `shm` and
//! `tcp;ofi_rxm` providers (loopback only), and `fmi bench --channel rdma` on `shm`. Built only
//! with the `rdma` feature; the examples must be built with it too (`cargo build --release
//! --workspace --examples --features rdma`).

#![cfg(feature = "rdma")]
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

const FMI: &str = env!("CARGO_BIN_EXE_fmi");
const JOB_LIMIT: Duration = Duration::from_secs(90);

fn example(name: &str) -> PathBuf {
    // `FMI_RDMA_EXAMPLES`: a folder holding examples built with the rdma feature, for a target
    // folder shared with builds that lack it.
    if let Some(dir) = std::env::var_os("FMI_RDMA_EXAMPLES") {
        return PathBuf::from(dir).join(name);
    }
    let exe = std::env::current_exe().expect("path of the test binary");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("the test binary lives in target/<profile>/deps");
    let path = dir.join("examples").join(name);
    assert!(
        path.is_file(),
        "example {} is missing: cargo build --workspace --examples --features rdma",
        path.display()
    );
    path
}

/// Runs `fmi ARGS` with `env` (and none of the caller's channel settings), bounded by
/// JOB_LIMIT, and returns its stdout; panics with both streams if it fails.
fn fmi_with(args: &[std::ffi::OsString], env: &[(&str, &str)]) -> String {
    let mut cmd = Command::new(FMI);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for var in [
        "FMI_CONFIG",
        "FMI_CHANNEL",
        "FI_PROVIDER",
        "FMI_RDMA_PROVIDER",
    ] {
        cmd.env_remove(var);
    }
    cmd.envs(env.iter().copied());
    let child = cmd.spawn().expect("start fmi");
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let out = match rx.recv_timeout(JOB_LIMIT) {
        Ok(out) => out.expect("fmi output"),
        Err(_) => {
            let _ = Command::new("kill")
                .args(["-s", "TERM", &pid.to_string()])
                .status();
            panic!("fmi {args:?} over rdma ({env:?}) did not finish within {JOB_LIMIT:?}");
        }
    };
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "fmi {args:?} over rdma ({env:?}) failed: {}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    stdout
}

/// Runs `fmi run -n 3 --channel rdma -- collectives_check` with `env`.
fn collectives_over(env: &[(&str, &str)]) {
    let args = ["run", "-n", "3", "--channel", "rdma", "--"]
        .into_iter()
        .map(Into::into)
        .chain([example("collectives_check").into_os_string()])
        .collect::<Vec<_>>();
    let stdout = fmi_with(&args, env);
    for r in 0..3 {
        let want = format!("[{r}] rank {r}/3: all collectives ok");
        assert!(
            stdout.lines().any(|l| l == want),
            "missing {want:?} ({env:?})\nstdout:\n{stdout}"
        );
    }
}

/// `fmi bench --channel rdma` measures over the rdma channel (its ranks are the `fmi` binary
/// itself, built with the feature): one row per size, with a bandwidth.
#[test]
fn bench_runs_over_rdma_shm() {
    let args = [
        "bench",
        "--op",
        "pingpong",
        "--sizes",
        "64,1M",
        "--ranks",
        "2",
        "--iters",
        "50",
        "--warmup",
        "5",
        "--channel",
        "rdma",
    ]
    .map(Into::into);
    let stdout = fmi_with(&args, &[("FMI_RDMA_PROVIDER", "shm")]);
    for size in ["64 B", "1 MiB"] {
        let row = stdout
            .lines()
            .find(|l| l.trim_start().starts_with(size))
            .unwrap_or_else(|| panic!("no {size} row:\n{stdout}"));
        let mb: f64 = row
            .split_whitespace()
            .last()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no bandwidth in {row:?}"));
        assert!(mb > 0.0, "{row}");
    }
}

#[test]
fn collectives_over_rdma_shm() {
    collectives_over(&[("FI_PROVIDER", "shm")]);
}

#[test]
fn collectives_over_rdma_tcp_rxm() {
    collectives_over(&[
        ("FMI_RDMA_PROVIDER", "tcp;ofi_rxm"),
        ("FMI_RDMA_DOMAIN", "lo"),
    ]);
}

#[test]
fn an_unknown_provider_fails_naming_it() {
    let out = Command::new(FMI)
        .args(["run", "-n", "2", "--channel", "rdma", "--"])
        .arg(example("collectives_check"))
        .env("FMI_RDMA_PROVIDER", "no-such-provider")
        .env_remove("FI_PROVIDER")
        .stdin(Stdio::null())
        .output()
        .expect("run fmi");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("no-such-provider") && stderr.contains("fi_getinfo"),
        "{stderr}"
    );
}
