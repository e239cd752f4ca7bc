//! `fmi run -n 3 --channel rdma` with the collectives example, on libfabric's `shm` and
//! `tcp;ofi_rxm` providers (loopback only). Built only with the `rdma` feature; the examples must
//! be built with it too (`cargo build --release --workspace --examples --features rdma`).

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

/// Runs `fmi run -n 3 --channel rdma -- collectives_check` with `env`, bounded by JOB_LIMIT.
fn collectives_over(env: &[(&str, &str)]) {
    let mut cmd = Command::new(FMI);
    cmd.args(["run", "-n", "3", "--channel", "rdma", "--"])
        .arg(example("collectives_check"))
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
            panic!("fmi run over rdma ({env:?}) did not finish within {JOB_LIMIT:?}");
        }
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "fmi run over rdma ({env:?}) failed: {}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    for r in 0..3 {
        let want = format!("[{r}] rank {r}/3: all collectives ok");
        assert!(
            stdout.lines().any(|l| l == want),
            "missing {want:?} ({env:?})\nstdout:\n{stdout}\nstderr:\n{stderr}"
        );
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
