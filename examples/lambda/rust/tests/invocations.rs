//! N "invocations" of the handler as N local processes with the same event shape Lambda would
//! deliver, joined through a standalone rendezvous server (`fmi rendezvous`).

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fmi_lambda_example::Response;

const HANDLER: &str = env!("CARGO_BIN_EXE_fmi-lambda-handler");

/// `target/<profile>/fmi`, or `$FMI_BIN`.
fn fmi_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("FMI_BIN") {
        return PathBuf::from(bin);
    }
    let bin = PathBuf::from(HANDLER).with_file_name("fmi");
    assert!(
        bin.is_file(),
        "the fmi launcher is not built at {}: run `cargo build -p fmi-cli` (with --release for \
         release tests) or `cargo test --workspace`, or set FMI_BIN",
        bin.display()
    );
    bin
}

/// A rendezvous server on a free loopback port, stopped on drop.
struct Rendezvous {
    child: Child,
    addr: String,
}

impl Rendezvous {
    fn start() -> Rendezvous {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let addr = format!("127.0.0.1:{port}");
        let child = Command::new(fmi_bin())
            .args(["rendezvous", "--listen", &addr])
            .stdout(Stdio::null())
            .spawn()
            .expect("start fmi rendezvous");
        let started = Instant::now();
        while TcpStream::connect(&addr).is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "fmi rendezvous did not listen on {addr}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Rendezvous { child, addr }
    }
}

impl Drop for Rendezvous {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn four_invocations_allreduce_through_a_rendezvous_server() {
    let server = Rendezvous::start();
    let size = 4u32;
    let job = format!("lambda-test-{}", std::process::id());
    let children: Vec<Child> = (0..size)
        .map(|rank| {
            let event = serde_json::json!({
                "rank": rank,
                "size": size,
                "job": job,
                "rendezvous": server.addr,
                "token": "a-secret-for-this-job",
                "values": [f64::from(rank) + 1.0, 10.0 * f64::from(rank)],
            });
            Command::new(HANDLER)
                .arg(event.to_string())
                .stdout(Stdio::piped())
                .spawn()
                .expect("start an invocation")
        })
        .collect();
    for (rank, child) in children.into_iter().enumerate() {
        let out = child.wait_with_output().expect("invocation output");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "rank {rank}: {text}");
        let response: Response = serde_json::from_str(text.trim()).expect("a JSON response");
        assert_eq!(response.rank, rank as u32);
        assert_eq!(response.size, size);
        assert_eq!(response.job, job);
        assert_eq!(response.sum, vec![10.0, 60.0]);
    }
}

#[test]
fn an_invalid_event_is_refused() {
    let out = Command::new(HANDLER)
        .arg(r#"{"rank": "zero"}"#)
        .output()
        .expect("run the handler");
    assert_eq!(out.status.code(), Some(2));
    let out = Command::new(HANDLER)
        .arg(r#"{"rank": 0, "size": 2, "job": "no rendezvous"}"#)
        .output()
        .expect("run the handler");
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("errorMessage"), "{text}");
}
