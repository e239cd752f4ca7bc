//! `fmi bench` through the real command: jobs over TCP (processes) and the memory channel
//! (threads), the CSV it writes, the PNG plot, bad input, and `--vs-mpi` against MPICH.
//!
//! Tiny sizes and iteration counts: these check that the harness works, not how fast anything
//! is (that is what `fmi bench` itself is for).

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const FMI: &str = env!("CARGO_BIN_EXE_fmi");

const HEADER: &str =
    "implementation,channel,op,ranks,size_bytes,iters,avg_us,min_us,max_us,p50_us,p99_us,mb_per_s";

fn tmp(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("fmi-bench-test-{}-{name}", std::process::id()))
}

fn bench(args: &[&str]) -> Output {
    Command::new(FMI)
        .arg("bench")
        .args(args)
        .args(["--timeout", "120"])
        .env_remove("FMI_RENDEZVOUS")
        .env_remove("FMI_CHANNEL")
        .output()
        .expect("run fmi bench")
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "fmi bench failed ({}):\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

/// The CSV rows as field vectors, after checking the header and the field count.
fn csv_rows(path: &Path) -> Vec<Vec<String>> {
    let text = std::fs::read_to_string(path).unwrap();
    let _ = std::fs::remove_file(path);
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some(HEADER));
    lines
        .map(|l| l.split(',').map(str::to_owned).collect::<Vec<_>>())
        .inspect(|f| assert_eq!(f.len(), 12, "{f:?}"))
        .collect()
}

fn num(s: &str) -> f64 {
    s.parse().unwrap_or_else(|_| panic!("not a number: {s:?}"))
}

/// Latency columns are positive and ordered min <= p50 <= p99 <= max, min <= avg <= max.
fn check_stats(row: &[String]) {
    let (avg, min, max, p50, p99) = (
        num(&row[6]),
        num(&row[7]),
        num(&row[8]),
        num(&row[9]),
        num(&row[10]),
    );
    assert!(min > 0.0, "{row:?}");
    assert!(min <= p50 && p50 <= p99 && p99 <= max, "{row:?}");
    assert!(min <= avg && avg <= max, "{row:?}");
}

#[test]
fn allreduce_over_tcp_writes_csv_and_png() {
    let csv = tmp("allreduce.csv");
    let png = tmp("allreduce.png");
    let out = bench(&[
        "--op",
        "allreduce",
        "--sizes",
        "8,1K",
        "--ranks",
        "3",
        "--channel",
        "tcp",
        "--iters",
        "5",
        "--warmup",
        "1",
        "--csv",
        csv.to_str().unwrap(),
        "--plot",
        png.to_str().unwrap(),
    ]);
    let stdout = ok(&out);
    assert!(
        stdout.contains("# fmi allreduce on 3 ranks, channel tcp"),
        "{stdout}"
    );
    assert!(stdout.contains("1 KiB"), "{stdout}");
    let rows = csv_rows(&csv);
    assert_eq!(rows.len(), 2, "{rows:?}");
    for (row, size) in rows.iter().zip(["8", "1024"]) {
        assert_eq!(&row[..6], ["fmi", "tcp", "allreduce", "3", size, "5"]);
        check_stats(row);
        assert_eq!(row[11], "", "bandwidth is for ping-pong only");
    }
    let image = std::fs::read(&png).unwrap();
    let _ = std::fs::remove_file(&png);
    assert!(image.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG");
    assert!(
        image.len() > 2000,
        "suspiciously small plot: {} B",
        image.len()
    );
}

#[test]
fn pingpong_over_tcp_reports_bandwidth() {
    let csv = tmp("pingpong.csv");
    let out = bench(&[
        "--op",
        "pingpong",
        "--sizes",
        "8,64K",
        "--ranks",
        "2",
        "--iters",
        "10",
        "--csv",
        csv.to_str().unwrap(),
    ]);
    let stdout = ok(&out);
    assert!(stdout.contains("MB/s"), "{stdout}");
    let rows = csv_rows(&csv);
    assert_eq!(rows.len(), 2);
    for row in &rows {
        check_stats(row);
        // size / average half round trip.
        let want = num(&row[4]) / num(&row[6]);
        let got = num(&row[11]);
        assert!((got - want).abs() <= want * 0.01 + 0.01, "{row:?}");
    }
}

#[test]
fn every_operation_runs_over_the_memory_channel() {
    for op in [
        "pingpong",
        "bcast",
        "reduce",
        "allreduce",
        "allgather",
        "alltoall",
        "gather",
        "scatter",
        "barrier",
        "scan",
    ] {
        let csv = tmp(&format!("mem-{op}.csv"));
        let out = bench(&[
            "--op",
            op,
            "--sizes",
            "4,1K",
            "--ranks",
            "4",
            "--channel",
            "memory",
            "--iters",
            "3",
            "--warmup",
            "1",
            "--csv",
            csv.to_str().unwrap(),
        ]);
        ok(&out);
        let rows = csv_rows(&csv);
        // Barrier moves no data: one row of size 0.
        let sizes: Vec<&str> = rows.iter().map(|r| r[4].as_str()).collect();
        if op == "barrier" {
            assert_eq!(sizes, ["0"], "{op}");
        } else {
            assert_eq!(sizes, ["4", "1024"], "{op}");
        }
        for row in &rows {
            assert_eq!(&row[..4], ["fmi", "memory", op, "4"]);
            check_stats(row);
        }
    }
}

#[test]
fn bad_input_is_refused_with_a_reason() {
    let out = bench(&["--op", "nope"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown operation"));

    let out = bench(&["--op", "pingpong", "--ranks", "1"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("at least 2 ranks"));

    let out = bench(&["--op", "bcast", "--sizes", "8,3X"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("3X"));

    // A storage channel without a configuration: the ranks fail and say why; nothing hangs.
    let out = bench(&["--op", "barrier", "--ranks", "2", "--channel", "nosuch"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("nosuch"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let out = bench(&[
        "--op",
        "bcast",
        "--vs-mpi",
        "--mpi-baseline",
        "/nonexistent/fmi-mpi-baseline",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("mpi-baseline"));
}

/// The MPI baseline built next to `fmi` (by `--features fmi-mpi-baseline/mpi-baseline`) and
/// MPICH's launcher, if both are here. scripts/test.sh installs MPICH, builds the baseline and
/// sets FMI_REQUIRE_MPI=1, so there a missing piece fails instead of skipping.
fn mpi_available() -> bool {
    let baseline = Path::new(FMI).with_file_name("fmi-mpi-baseline");
    let mpirun = Command::new("mpirun.mpich")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    let here = baseline.is_file() && mpirun;
    if !here {
        assert!(
            std::env::var_os("FMI_REQUIRE_MPI").is_none(),
            "FMI_REQUIRE_MPI is set but the MPI baseline ({}: {}) or mpirun.mpich ({mpirun}) \
             is missing",
            baseline.display(),
            baseline.is_file()
        );
        eprintln!("skipped: no MPICH or no MPI baseline next to {FMI}");
    }
    here
}

#[test]
fn vs_mpi_runs_both_and_prints_ratios() {
    if !mpi_available() {
        return;
    }
    let csv = tmp("vs-mpi.csv");
    let out = bench(&[
        "--op",
        "pingpong",
        "--sizes",
        "8,1K",
        "--ranks",
        "2",
        "--iters",
        "5",
        "--vs-mpi",
        "--csv",
        csv.to_str().unwrap(),
    ]);
    let stdout = ok(&out);
    assert!(stdout.contains("# ratio fmi / MPI"), "{stdout}");
    let rows = csv_rows(&csv);
    let series: Vec<(&str, &str)> = rows
        .iter()
        .map(|r| (r[0].as_str(), r[1].as_str()))
        .collect();
    assert_eq!(
        series,
        [
            ("fmi", "tcp"),
            ("fmi", "tcp"),
            ("mpich", "ucx-tcp"),
            ("mpich", "ucx-tcp"),
            ("mpich", "shm"),
            ("mpich", "shm")
        ]
    );
    for row in &rows {
        check_stats(row);
    }
}
