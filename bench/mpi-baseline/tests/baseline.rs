//! The baseline under MPICH's launcher: it runs and reports one well-formed result line per
//! size. (Building this test also builds the binary that `fmi bench --vs-mpi` looks for next
//! to `fmi`.)

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::process::Command;

const BASELINE: &str = env!("CARGO_BIN_EXE_fmi-mpi-baseline");

fn run(n: u32, args: &[&str]) -> Vec<Vec<String>> {
    let out = Command::new("mpirun.mpich")
        .args(["-n", &n.to_string(), BASELINE])
        .args(args)
        .output()
        .expect("mpirun.mpich (apt-get install -y mpich)");
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter(|l| l.starts_with("fmi-bench-result\t"))
        .map(|l| l.split('\t').map(str::to_owned).collect())
        .collect()
}

#[test]
fn reports_one_line_per_size() {
    for (op, n) in [
        ("pingpong", 2),
        ("allreduce", 2),
        ("alltoall", 2),
        ("barrier", 2),
    ] {
        let rows = run(
            n,
            &[
                "--op", op, "--sizes", "8,1K", "--iters", "3", "--warmup", "1",
            ],
        );
        let sizes: Vec<&str> = rows.iter().map(|r| r[1].as_str()).collect();
        let want: &[&str] = if op == "barrier" {
            &["0"]
        } else {
            &["8", "1024"]
        };
        assert_eq!(sizes, want, "{op}");
        for r in &rows {
            assert_eq!(r.len(), 8, "{r:?}");
            assert_eq!(r[2], "3");
            let t: Vec<f64> = r[3..].iter().map(|x| x.parse().unwrap()).collect();
            // avg, min, max, p50, p99 in seconds.
            assert!(t[1] > 0.0 && t[1] <= t[0] && t[0] <= t[2], "{r:?}");
        }
    }
}

#[test]
fn bad_arguments_exit_2() {
    let out = Command::new(BASELINE)
        .args(["--op", "nope"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown operation"));
}
