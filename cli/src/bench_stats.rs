//! The methodology `fmi bench` and the MPI baseline (`bench/mpi-baseline`, which includes this
//! file with `#[path]`) share, so that both measure exactly the same thing: the operations and
//! their buffer sizes, the size syntax, the default iteration counts, the statistics over
//! iterations and the line format in which ranks report a result.
//!
//! Only `std` here: the baseline links MPI and nothing else of fmi.

use std::fmt;

/// One benchmarked operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum BenchOp {
    /// Ranks 0 and 1 bounce a message; the time is half the round trip.
    PingPong,
    Bcast,
    Reduce,
    Allreduce,
    Allgather,
    Alltoall,
    Gather,
    Scatter,
    Barrier,
    Scan,
}

impl BenchOp {
    /// Every operation, in the order `--op all` would run them.
    pub(crate) const ALL: [BenchOp; 10] = [
        BenchOp::PingPong,
        BenchOp::Bcast,
        BenchOp::Reduce,
        BenchOp::Allreduce,
        BenchOp::Allgather,
        BenchOp::Alltoall,
        BenchOp::Gather,
        BenchOp::Scatter,
        BenchOp::Barrier,
        BenchOp::Scan,
    ];

    /// The name on the command line and in CSV files.
    pub(crate) fn name(self) -> &'static str {
        match self {
            BenchOp::PingPong => "pingpong",
            BenchOp::Bcast => "bcast",
            BenchOp::Reduce => "reduce",
            BenchOp::Allreduce => "allreduce",
            BenchOp::Allgather => "allgather",
            BenchOp::Alltoall => "alltoall",
            BenchOp::Gather => "gather",
            BenchOp::Scatter => "scatter",
            BenchOp::Barrier => "barrier",
            BenchOp::Scan => "scan",
        }
    }

    /// Parses a name as [`BenchOp::name`] prints it.
    pub(crate) fn parse(s: &str) -> Result<BenchOp, String> {
        let lower = s.to_ascii_lowercase();
        let lower = if lower == "ping-pong" || lower == "p2p" {
            "pingpong".to_owned()
        } else {
            lower
        };
        BenchOp::ALL
            .into_iter()
            .find(|op| op.name() == lower)
            .ok_or_else(|| {
                let names: Vec<&str> = BenchOp::ALL.iter().map(|o| o.name()).collect();
                format!(
                    "unknown operation {s:?}: expected one of {}",
                    names.join(", ")
                )
            })
    }

    /// Reductions work on `f32` elements with a sum, as OSU's benchmarks do (MPI_FLOAT, MPI_SUM).
    pub(crate) fn is_reduction(self) -> bool {
        matches!(self, BenchOp::Reduce | BenchOp::Allreduce | BenchOp::Scan)
    }

    /// The message size actually measured for a requested size: reductions round down to whole
    /// `f32`s (at least one), barrier moves no data (0).
    pub(crate) fn effective_size(self, size: usize) -> usize {
        match self {
            BenchOp::Barrier => 0,
            op if op.is_reduction() => (size / 4).max(1) * 4,
            _ => size,
        }
    }

    /// The sizes to run: `sizes` made effective, duplicates removed (barrier runs once).
    pub(crate) fn effective_sizes(self, sizes: &[usize]) -> Vec<usize> {
        let mut out: Vec<usize> = Vec::with_capacity(sizes.len());
        for &s in sizes {
            let e = self.effective_size(s);
            if !out.contains(&e) {
                out.push(e);
            }
        }
        out
    }

    /// The smallest job the operation can run in.
    pub(crate) fn min_ranks(self) -> u32 {
        match self {
            BenchOp::PingPong => 2,
            _ => 1,
        }
    }
}

impl fmt::Display for BenchOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Parses a size: a number of bytes with an optional binary suffix (`8`, `1K`, `64KiB`, `4M`,
/// `1G`; `B` alone is bytes).
pub(crate) fn parse_size(s: &str) -> Result<usize, String> {
    let t = s.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, suffix) = t.split_at(digits);
    let n: usize = num
        .parse()
        .map_err(|_| format!("size {s:?}: expected a number of bytes such as 8, 1K, 4M"))?;
    let mult: usize = match suffix.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 1,
        "K" | "KB" | "KIB" => 1 << 10,
        "M" | "MB" | "MIB" => 1 << 20,
        "G" | "GB" | "GIB" => 1 << 30,
        _ => {
            return Err(format!(
                "size {s:?}: unknown suffix {suffix:?} (K, M and G are binary: 1K = 1024)"
            ))
        }
    };
    n.checked_mul(mult)
        .filter(|&b| b <= 1 << 31)
        .ok_or_else(|| format!("size {s:?}: at most 2G per message"))
}

/// Parses a comma-separated list of sizes (see [`parse_size`]).
pub(crate) fn parse_sizes(s: &str) -> Result<Vec<usize>, String> {
    let sizes = s
        .split(',')
        .filter(|p| !p.trim().is_empty())
        .map(parse_size)
        .collect::<Result<Vec<_>, _>>()?;
    if sizes.is_empty() {
        return Err("no size given: e.g. --sizes 8,1K,64K".into());
    }
    Ok(sizes)
}

/// `8 B`, `64 KiB`, `4 MiB` (exact multiples only, else bytes).
pub(crate) fn human_size(n: usize) -> String {
    if n >= 1 << 30 && n.is_multiple_of(1 << 30) {
        format!("{} GiB", n >> 30)
    } else if n >= 1 << 20 && n.is_multiple_of(1 << 20) {
        format!("{} MiB", n >> 20)
    } else if n >= 1 << 10 && n.is_multiple_of(1 << 10) {
        format!("{} KiB", n >> 10)
    } else {
        format!("{n} B")
    }
}

/// Timed iterations per size unless `--iters` says otherwise: many for small messages, fewer
/// for large ones (as OSU: 1000 / 100 with a 8 KiB switch; fewer here, the machine is small).
pub(crate) fn default_iters(size: usize) -> usize {
    match size {
        0..=8192 => 500,
        8193..=262_144 => 100,
        262_145..=4_194_304 => 30,
        _ => 10,
    }
}

/// Untimed warm-up iterations per size unless `--warmup` says otherwise.
pub(crate) fn default_warmup(iters: usize) -> usize {
    (iters / 10).clamp(2, 50)
}

/// Latency statistics over the timed iterations of one size, in seconds.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Stats {
    pub(crate) avg: f64,
    pub(crate) min: f64,
    pub(crate) max: f64,
    pub(crate) p50: f64,
    pub(crate) p99: f64,
}

/// The per-iteration time of the job: for each iteration, the largest time any rank measured
/// (`per_rank[r][i]`); ranks with fewer entries are ignored beyond their end.
pub(crate) fn max_over_ranks(per_rank: &[Vec<f64>]) -> Vec<f64> {
    let iters = per_rank.iter().map(Vec::len).max().unwrap_or(0);
    (0..iters)
        .map(|i| {
            per_rank
                .iter()
                .filter_map(|r| r.get(i).copied())
                .fold(0.0f64, f64::max)
        })
        .collect()
}

/// Average, extremes and nearest-rank percentiles of `times` (empty: all zero).
pub(crate) fn stats(times: &[f64]) -> Stats {
    if times.is_empty() {
        return Stats {
            avg: 0.0,
            min: 0.0,
            max: 0.0,
            p50: 0.0,
            p99: 0.0,
        };
    }
    let mut sorted = times.to_vec();
    sorted.sort_by(f64::total_cmp);
    let pct = |p: f64| {
        // Nearest rank: the smallest value with at least p % of the values at or below it.
        let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
        sorted[rank.clamp(1, sorted.len()) - 1]
    };
    Stats {
        avg: sorted.iter().sum::<f64>() / sorted.len() as f64,
        min: sorted[0],
        max: sorted[sorted.len() - 1],
        p50: pct(50.0),
        p99: pct(99.0),
    }
}

/// The prefix of a result line (one per size, written by rank 0).
pub(crate) const RESULT_TAG: &str = "fmi-bench-result";

/// A result line: tag, size, iterations, then avg/min/max/p50/p99 in seconds, tab-separated.
pub(crate) fn format_result(size: usize, iters: usize, s: &Stats) -> String {
    format!(
        "{RESULT_TAG}\t{size}\t{iters}\t{:e}\t{:e}\t{:e}\t{:e}\t{:e}",
        s.avg, s.min, s.max, s.p50, s.p99
    )
}

/// Parses a line [`format_result`] wrote; anything else is `None`.
pub(crate) fn parse_result(line: &str) -> Option<(usize, usize, Stats)> {
    let mut f = line.trim_end().split('\t');
    if f.next()? != RESULT_TAG {
        return None;
    }
    let size = f.next()?.parse().ok()?;
    let iters = f.next()?.parse().ok()?;
    let mut v = [0.0f64; 5];
    for x in &mut v {
        *x = f.next()?.parse().ok()?;
    }
    Some((
        size,
        iters,
        Stats {
            avg: v[0],
            min: v[1],
            max: v[2],
            p50: v[3],
            p99: v[4],
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_suffixes() {
        assert_eq!(
            parse_sizes("8,1K,64KiB,1M,16M").unwrap(),
            vec![8, 1024, 65536, 1 << 20, 16 << 20]
        );
        assert!(parse_size("3X").is_err());
        assert!(parse_size("").is_err());
        assert!(parse_size("4G").is_err());
        assert_eq!(human_size(4 << 20), "4 MiB");
        assert_eq!(human_size(1000), "1000 B");
    }

    #[test]
    fn statistics_use_nearest_rank_percentiles() {
        let t: Vec<f64> = (1..=100).map(f64::from).collect();
        let s = stats(&t);
        assert_eq!((s.min, s.max, s.p50, s.p99), (1.0, 100.0, 50.0, 99.0));
        assert!((s.avg - 50.5).abs() < 1e-12);
        let m = max_over_ranks(&[vec![1.0, 5.0], vec![3.0, 2.0]]);
        assert_eq!(m, vec![3.0, 5.0]);
    }

    #[test]
    fn result_lines_round_trip() {
        let s = stats(&[1e-6, 2e-6, 3e-6]);
        let line = format_result(64, 3, &s);
        assert_eq!(parse_result(&line), Some((64, 3, s)));
        assert_eq!(parse_result("[0] hello"), None);
    }

    #[test]
    fn effective_sizes_follow_the_element_type() {
        assert_eq!(BenchOp::Allreduce.effective_sizes(&[1, 8, 9]), vec![4, 8]);
        assert_eq!(BenchOp::Barrier.effective_sizes(&[8, 1024]), vec![0]);
        assert_eq!(BenchOp::parse("P2P").unwrap(), BenchOp::PingPong);
        assert!(BenchOp::parse("nope").is_err());
    }
}
