//! The NAT matrix: real multi-process jobs between "functions" behind NAT routers, in Linux
//! network namespaces built by `scripts/netns.sh` (see its header for the topology and
//! docs/nat.md for what each case shows).
//!
//! Each case builds its own testbed under a unique prefix, starts `fmi rendezvous` on the
//! "internet" (203.0.113.1), runs the workspace examples `allreduce` and `collectives_check` as
//! four ranks — ranks 0 and 1 in function namespace `a`, ranks 2 and 3 in `b` — and checks both
//! their results and the path every pair took, which each rank prints when `FMI_PRINT_PATHS=1`:
//!
//! | case | NAT of a / b | pairs across the NATs | pairs on one LAN |
//! |---|---|---|---|
//! | `no_nat` | none / none | direct | direct |
//! | `cone_nat_both_sides_punches_tcp` | cone / cone | punched | direct |
//! | `symmetric_nat_on_one_side_falls_back_to_the_relay` | cone / symmetric | relayed | direct |
//! | `symmetric_nat_on_both_sides_falls_back_to_the_relay` | symmetric / symmetric | relayed | direct |
//! | `no_nat_quic` | none / none | direct, QUIC | direct, QUIC |
//! | `cone_nat_both_sides_punches_quic` | cone / cone | punched, QUIC | direct, QUIC |
//! | `symmetric_nat_on_one_side_falls_back_to_the_relay_quic` | cone / symmetric | relayed (TCP) | direct, QUIC |
//! | `symmetric_nat_on_both_sides_falls_back_to_storage` | symmetric / symmetric | stored (Redis) | direct |
//!
//! The `_quic` cases run the ranks with `FMI_DIRECT_TRANSPORT=quic` and also check, from each
//! rank's `fmi-transport:` line, that every pair not relayed ran over QUIC. The storage case
//! starts a `redis-server` on the server's namespace (203.0.113.1:6390), gives the ranks a
//! configuration with `[direct] fallback = "redis"` (which takes the relay's place), and checks
//! that the job leaves no key behind in that Redis.
//!
//! Every rank also asks coturn (STUN, on the server's two addresses) for its mapping and prints
//! it (`fmi-nat: rank R: mapping M`): endpoint-independent without NAT and behind the cone
//! NAT, endpoint-dependent behind the symmetric one (which then skips punching).
//!
//! Needs root, `ip`, `iptables` and coturn's `turnserver` (`scripts/services.sh start` installs
//! it); without them every case fails with a message saying so.
//! The examples must be built (as for `cli/tests/run.rs`: `cargo test --workspace` builds them,
//! or `cargo build --release --workspace --examples`). A [`Testbed`] removes its namespaces and
//! kills its processes when dropped, so a failing case leaves nothing behind.

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

const FMI: &str = env!("CARGO_BIN_EXE_fmi");
const NETNS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/netns.sh");
const SERVER: &str = "203.0.113.1:7000";
/// coturn listens on both addresses of the server namespace, so each rank can compare the
/// mappings two destinations see.
const STUN: &str = "203.0.113.1:3478,203.0.113.2:3478";
/// Where the storage case's redis-server listens (on the server's namespace).
const STORAGE_IP: &str = "203.0.113.1";
const STORAGE_PORT: &str = "6390";
const STORAGE_PASSWORD: &str = "nat-matrix-storage";
/// Longest one job may take before it is killed and the case fails.
const JOB_LIMIT: Duration = Duration::from_secs(60);

static SERIAL: Mutex<()> = Mutex::new(());

/// One case at a time: four ranks and a server already fill a 2-core machine.
fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

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
         `cargo build --workspace --examples` (add --release for a release test run)",
        path.display()
    );
    path
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Nat {
    None,
    Cone,
    Symmetric,
}

impl Nat {
    fn arg(self) -> &'static str {
        match self {
            Nat::None => "none",
            Nat::Cone => "cone",
            Nat::Symmetric => "symmetric",
        }
    }
}

/// A testbed's namespaces and the processes running in them; dropping it kills the processes
/// and removes the namespaces.
struct Testbed {
    prefix: String,
    dir: PathBuf,
    server: Option<Child>,
    stun: Option<Child>,
    /// `FMI_DIRECT_TRANSPORT` of the ranks (`None`: the default, TCP).
    transport: Option<&'static str>,
    /// A redis-server on the server's namespace, for the storage fallback.
    redis: Option<Child>,
    /// `FMI_CONFIG` of the ranks.
    config: Option<PathBuf>,
}

impl Testbed {
    fn up(case: &str, a: Nat, b: Nat) -> Testbed {
        let check = Command::new("bash").arg(NETNS).arg("check").output();
        match check {
            Ok(out) if out.status.success() => {}
            Ok(out) => panic!(
                "the NAT matrix needs network namespaces and iptables NAT (run as root with \
                 iproute2 and iptables installed): {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ),
            Err(e) => panic!("cannot run {NETNS}: {e}"),
        }
        // Short and unique per process and case (namespace names carry it).
        let prefix = format!("fn{}{case}", std::process::id() % 100_000);
        let dir = std::env::temp_dir().join(format!("fmi-nat-{prefix}"));
        std::fs::create_dir_all(&dir).expect("scratch directory");
        let mut bed = Testbed {
            prefix,
            dir,
            server: None,
            stun: None,
            transport: None,
            redis: None,
            config: None,
        };
        // Whatever an earlier, killed run of this process id left.
        bed.down();
        let out = Command::new("bash")
            .arg(NETNS)
            .args(["up", &bed.prefix, a.arg(), b.arg()])
            .output()
            .expect("run netns.sh up");
        assert!(
            out.status.success(),
            "building the testbed failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let log = File::create(bed.dir.join("server.log")).expect("server log");
        let server = bed
            .command("srv", FMI)
            .args(["rendezvous", "--listen", SERVER])
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start the rendezvous server");
        bed.server = Some(server);
        let log = File::create(bed.dir.join("stun.log")).expect("stun log");
        let stun = bed
            .command("srv", "turnserver")
            .args([
                "-n",
                "--listening-ip=203.0.113.1",
                "--listening-ip=203.0.113.2",
                "--listening-port=3478",
                "--stun-only",
                "--no-cli",
                "--no-tls",
                "--no-dtls",
                "--log-file=stdout",
            ])
            .arg(format!("--userdb={}", bed.dir.join("turndb").display()))
            .arg(format!("--pidfile={}", bed.dir.join("turn.pid").display()))
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start coturn (install it: apt-get install -y coturn)");
        bed.stun = Some(stun);
        bed.wait_for_stun();
        bed
    }

    /// Waits (at most 10 s) until coturn listens on the server's second address.
    fn wait_for_stun(&mut self) {
        for _ in 0..200 {
            if let Some(status) = self.stun.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!(
                    "coturn exited with {status} (is `turnserver` installed? `apt-get install -y \
                     coturn`): {}",
                    std::fs::read_to_string(self.dir.join("stun.log")).unwrap_or_default()
                );
            }
            let out = self.command("srv", "ss").arg("-uln").output();
            if out.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("203.0.113.2:3478")) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("coturn did not listen on 203.0.113.2:3478 within 10 s");
    }

    /// Starts redis-server on the server's namespace and makes the ranks fall back to it
    /// (`[direct] fallback = "redis"`); waits (at most 10 s) until it answers.
    fn with_storage_fallback(&mut self) {
        let log = File::create(self.dir.join("redis.log")).expect("redis log");
        let redis = self
            .command("srv", "redis-server")
            .args([
                "--bind",
                STORAGE_IP,
                "--port",
                STORAGE_PORT,
                "--save",
                "",
                "--appendonly",
                "no",
                // Off loopback a server without a password refuses clients (protected mode).
                "--requirepass",
                STORAGE_PASSWORD,
            ])
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start redis-server (install it: apt-get install -y redis-server)");
        self.redis = Some(redis);
        let config = self.dir.join("fmi.toml");
        std::fs::write(
            &config,
            format!(
                "[channels.redis]\nurl = \"redis://:{STORAGE_PASSWORD}@{STORAGE_IP}:{STORAGE_PORT}\"\n\n\
                 [direct]\nfallback = \"redis\"\n"
            ),
        )
        .expect("config file");
        self.config = Some(config);
        for _ in 0..200 {
            if self.redis_keys().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "redis-server did not answer on {STORAGE_IP}:{STORAGE_PORT} within 10 s: {}",
            std::fs::read_to_string(self.dir.join("redis.log")).unwrap_or_default()
        );
    }

    /// Every key in the testbed's Redis (`None` if it does not answer).
    fn redis_keys(&self) -> Option<Vec<String>> {
        let out = self
            .command("srv", "redis-cli")
            .args([
                "-h",
                STORAGE_IP,
                "-p",
                STORAGE_PORT,
                "--no-auth-warning",
                "--scan",
            ])
            .args(["-a", STORAGE_PASSWORD])
            .output()
            .ok()?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let refused = ["Could not connect", "ERR", "DENIED", "NOAUTH"];
        (out.status.success() && !refused.iter().any(|r| text.contains(r)))
            .then(|| text.lines().map(str::to_owned).collect())
    }

    /// `program` run in `node`'s namespace.
    fn command(&self, node: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("bash");
        cmd.arg(NETNS)
            .args(["exec", &self.prefix, node])
            .arg(program);
        cmd.stdin(Stdio::null());
        for var in [
            "FMI_CHANNEL",
            "FMI_CONFIG",
            "FMI_NAT",
            "FMI_PRINT_PATHS",
            "FMI_STUN",
            "FMI_DIRECT_TRANSPORT",
        ] {
            cmd.env_remove(var);
        }
        cmd
    }

    /// Runs `program args` as ranks 0, 1 (in `a`) and 2, 3 (in `b`); returns each rank's
    /// stdout and stderr.
    fn run_job(&self, name: &str, program: &Path, args: &[&str]) -> Vec<(String, String)> {
        let job = format!("{}-{name}", self.prefix);
        let mut ranks = Vec::new();
        for rank in 0..4u32 {
            let node = if rank < 2 { "a" } else { "b" };
            let out = self.dir.join(format!("{name}-{rank}.out"));
            let err = self.dir.join(format!("{name}-{rank}.err"));
            let mut cmd = self.command(node, program);
            if let Some(t) = self.transport {
                cmd.env("FMI_DIRECT_TRANSPORT", t);
            }
            if let Some(config) = &self.config {
                cmd.env("FMI_CONFIG", config);
            }
            let child = cmd
                .args(args)
                .env("FMI_RANK", rank.to_string())
                .env("FMI_SIZE", "4")
                .env("FMI_JOB", &job)
                .env("FMI_RENDEZVOUS", SERVER)
                .env("FMI_TOKEN", "nat-matrix-token")
                .env("FMI_PRINT_PATHS", "1")
                .env("FMI_STUN", STUN)
                .stdout(File::create(&out).expect("stdout file"))
                .stderr(File::create(&err).expect("stderr file"))
                .spawn()
                .expect("start a rank");
            ranks.push(Rank { child, out, err });
        }
        let end = Instant::now() + JOB_LIMIT;
        let mut results = Vec::new();
        let mut failures = Vec::new();
        for (r, rank) in ranks.iter_mut().enumerate() {
            let status = loop {
                if let Some(status) = rank.child.try_wait().expect("wait for a rank") {
                    break Some(status);
                }
                if Instant::now() >= end {
                    break None;
                }
                std::thread::sleep(Duration::from_millis(20));
            };
            let out = std::fs::read_to_string(&rank.out).unwrap_or_default();
            let err = std::fs::read_to_string(&rank.err).unwrap_or_default();
            match status {
                Some(s) if s.success() => {}
                Some(s) => failures.push(format!("rank {r} exited with {s}: {err}")),
                None => failures.push(format!("rank {r} still running after {JOB_LIMIT:?}: {err}")),
            }
            results.push((out, err));
        }
        assert!(
            failures.is_empty(),
            "{name} failed in testbed {}:\n{}\nserver log:\n{}",
            self.prefix,
            failures.join("\n"),
            std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
        );
        results
    }

    fn down(&self) {
        let _ = Command::new("bash")
            .arg(NETNS)
            .args(["down", &self.prefix])
            .status();
    }
}

/// A running rank; killed if still running when dropped.
struct Rank {
    child: Child,
    out: PathBuf,
    err: PathBuf,
}

impl Drop for Rank {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        let children = [self.server.take(), self.stun.take(), self.redis.take()];
        for child in children.into_iter().flatten() {
            let mut child = child;
            let _ = child.kill();
            let _ = child.wait();
        }
        self.down();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The paths rank `r` reported (peer → kind) and its stray sockets at the end, from
/// `fmi-paths: rank R: P=kind Q=kind; stray sockets N`.
fn paths(rank: u32, stderr: &str) -> (BTreeMap<u32, String>, usize) {
    let line = stderr
        .lines()
        .find(|l| l.starts_with(&format!("fmi-paths: rank {rank}:")))
        .unwrap_or_else(|| panic!("rank {rank} reported no paths; stderr:\n{stderr}"));
    let rest = line.splitn(3, ':').nth(2).unwrap_or("");
    let (pairs, sockets) = rest.split_once("; stray sockets ").expect("a socket count");
    let pairs = pairs
        .split_whitespace()
        .map(|pair| {
            let (peer, kind) = pair.split_once('=').expect("peer=kind");
            (peer.parse().expect("peer rank"), kind.to_owned())
        })
        .collect();
    (pairs, sockets.trim().parse().expect("socket count"))
}

/// Checks every rank's reported paths: pairs on one LAN direct, pairs across the NATs `across`;
/// at least one pair across per rank when `all_pairs` (the job talks to everyone).
fn check_paths(results: &[(String, String)], across: &str, all_pairs: bool) {
    for (rank, (_, err)) in (0u32..).zip(results) {
        let (seen, stray) = paths(rank, err);
        // Known, not yet explained: now and then (2 of 3 CI runs on 27 Nov, 3 of 12 local runs
        // under a busy-loop load) one rank still holds one socket after its channel has shut
        // down and every task has ended; it goes when the channel is dropped. One is tolerated
        // and printed; more would be attempts left open per pair (docs/nat.md).
        if stray == 1 {
            eprintln!("note: rank {rank} held 1 socket after shutdown (known, see docs/nat.md)");
        }
        assert!(
            stray <= 1,
            "rank {rank} ended with {stray} sockets besides its connections: attempts were left open"
        );
        for (&peer, kind) in &seen {
            let same_lan = (rank < 2) == (peer < 2);
            let want = if same_lan { "direct" } else { across };
            assert_eq!(
                kind, want,
                "rank {rank} reached rank {peer} {kind}, expected {want}"
            );
        }
        if all_pairs {
            assert_eq!(
                seen.len(),
                3,
                "rank {rank} did not reach every peer: {seen:?}"
            );
        }
        assert!(
            seen.keys().any(|&p| (rank < 2) != (p < 2)),
            "rank {rank} never talked across the NATs: {seen:?}"
        );
    }
}

/// The mapping type rank `rank` learnt from STUN, from `fmi-nat: rank R: mapping M; ...`.
fn mapping(rank: u32, stderr: &str) -> String {
    let prefix = format!("fmi-nat: rank {rank}: mapping ");
    let line = stderr
        .lines()
        .find(|l| l.starts_with(&prefix))
        .unwrap_or_else(|| panic!("rank {rank} reported no STUN mapping; stderr:\n{stderr}"));
    line[prefix.len()..]
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_owned()
}

/// Checks each rank's STUN mapping: ranks 0 and 1 sit behind `a`, 2 and 3 behind `b`.
fn check_mappings(results: &[(String, String)], a: Nat, b: Nat) {
    for (rank, (_, err)) in (0u32..).zip(results) {
        let nat = if rank < 2 { a } else { b };
        let want = match nat {
            Nat::None | Nat::Cone => "endpoint-independent",
            Nat::Symmetric => "endpoint-dependent",
        };
        let seen = mapping(rank, err);
        let line = err
            .lines()
            .find(|l| l.starts_with("fmi-nat:"))
            .unwrap_or("");
        assert_eq!(seen, want, "rank {rank} behind a {nat:?} NAT: {line}");
    }
}

/// The peers rank `rank` reached over QUIC, from
/// `fmi-transport: rank R: TRANSPORT; quic peers P,Q`, and its configured transport.
fn quic_peers(rank: u32, stderr: &str) -> (String, Vec<u32>) {
    let prefix = format!("fmi-transport: rank {rank}: ");
    let line = stderr
        .lines()
        .find(|l| l.starts_with(&prefix))
        .unwrap_or_else(|| panic!("rank {rank} reported no transport; stderr:\n{stderr}"));
    let (transport, peers) = line[prefix.len()..]
        .split_once("; quic peers")
        .expect("quic peers");
    let peers = peers
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| p.parse().expect("peer rank"))
        .collect();
    (transport.trim().to_owned(), peers)
}

/// Checks that every pair that is not relayed ran over QUIC, and relayed pairs over TCP.
fn check_quic(results: &[(String, String)]) {
    for (rank, (_, err)) in (0u32..).zip(results) {
        let (seen, _) = paths(rank, err);
        let (transport, quic) = quic_peers(rank, err);
        assert_eq!(transport, "quic", "rank {rank}");
        for (peer, kind) in &seen {
            assert_eq!(
                quic.contains(peer),
                kind != "relayed",
                "rank {rank}: peer {peer} reached {kind}, quic peers {quic:?}"
            );
        }
    }
}

fn matrix_case(case: &str, a: Nat, b: Nat, across: &str) {
    matrix_case_over(case, a, b, across, None);
}

fn matrix_case_over(case: &str, a: Nat, b: Nat, across: &str, transport: Option<&'static str>) {
    let _serial = serial();
    let allreduce = example("allreduce");
    let check = example("collectives_check");
    let mut bed = Testbed::up(case, a, b);
    bed.transport = transport;
    if across == "stored" {
        bed.with_storage_fallback();
    }
    let quic = transport == Some("quic");

    let results = bed.run_job("allreduce", &allreduce, &[]);
    for (rank, (out, _)) in results.iter().enumerate() {
        assert!(
            out.contains(&format!("rank {rank}/4: allreduce sum = 10"))
                && out.contains("vector checksum"),
            "rank {rank} printed:\n{out}"
        );
    }
    check_paths(&results, across, false);
    check_mappings(&results, a, b);
    if quic {
        check_quic(&results);
    }

    let results = bed.run_job("check", &check, &[]);
    for (rank, (out, _)) in results.iter().enumerate() {
        assert!(
            out.contains(&format!("rank {rank}/4: all collectives ok")),
            "rank {rank} printed:\n{out}"
        );
    }
    check_paths(&results, across, true);
    if quic {
        check_quic(&results);
    }
    if bed.redis.is_some() {
        let left = bed.redis_keys().expect("the testbed's redis answers");
        assert!(
            left.is_empty(),
            "keys left in the testbed's redis: {left:?}"
        );
    }
}

#[test]
fn no_nat() {
    matrix_case("n", Nat::None, Nat::None, "direct");
}

#[test]
fn cone_nat_both_sides_punches_tcp() {
    matrix_case("c", Nat::Cone, Nat::Cone, "punched");
}

#[test]
fn symmetric_nat_on_one_side_falls_back_to_the_relay() {
    matrix_case("s1", Nat::Cone, Nat::Symmetric, "relayed");
}

#[test]
fn symmetric_nat_on_both_sides_falls_back_to_the_relay() {
    matrix_case("s2", Nat::Symmetric, Nat::Symmetric, "relayed");
}

#[test]
fn no_nat_quic() {
    matrix_case_over("nq", Nat::None, Nat::None, "direct", Some("quic"));
}

#[test]
fn cone_nat_both_sides_punches_quic() {
    matrix_case_over("cq", Nat::Cone, Nat::Cone, "punched", Some("quic"));
}

#[test]
fn symmetric_nat_on_one_side_falls_back_to_the_relay_quic() {
    matrix_case_over("s1q", Nat::Cone, Nat::Symmetric, "relayed", Some("quic"));
}

#[test]
fn symmetric_nat_on_both_sides_falls_back_to_storage() {
    matrix_case("s2r", Nat::Symmetric, Nat::Symmetric, "stored");
}
