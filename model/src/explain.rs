//! What `fmi explain` prints: the choice for every operation on a ladder of sizes.

use std::fmt::Write as _;

use crate::choose::{choose, Choice};
use crate::ops::Op;
use crate::params::{ChannelKind, ModelConfig, Objective};
use crate::units::Bytes;
use crate::ModelError;

/// The sizes `fmi explain` shows: 8 B × 8^k up to 16 MiB, then 64 MiB.
pub const LADDER: [Bytes; 9] = [
    Bytes(8),
    Bytes(64),
    Bytes(512),
    Bytes(4096),
    Bytes(32 * 1024),
    Bytes(256 * 1024),
    Bytes(2 * 1024 * 1024),
    Bytes(16 * 1024 * 1024),
    Bytes(64 * 1024 * 1024),
];

/// One line of the explanation.
#[derive(Clone, Copy, Debug, PartialEq)]
#[non_exhaustive]
pub struct Row {
    /// The operation.
    pub op: Op,
    /// Its size (0 for the barrier).
    pub bytes: Bytes,
    /// The model's choice.
    pub choice: Choice,
}

/// The choice for every operation of `ops` at every size of `sizes` (the barrier once, at 0 B).
pub fn explain(
    config: &ModelConfig,
    ranks: u32,
    objective: Objective,
    channels: &[ChannelKind],
    ops: &[Op],
    sizes: &[Bytes],
) -> Result<Vec<Row>, ModelError> {
    let mut rows = Vec::new();
    for &op in ops {
        let sizes: &[Bytes] = if op.has_data() { sizes } else { &[Bytes(0)] };
        for &bytes in sizes {
            let choice = choose(config, op, bytes, ranks, objective, channels)?;
            rows.push(Row { op, bytes, choice });
        }
    }
    Ok(rows)
}

/// The rows as CSV with the header `op,bytes,channel,algorithm,seconds,dollars,runner_up`;
/// `runner_up` is `channel/algorithm` or empty. Numbers are printed exactly (shortest form that
/// reads back to the same f64).
pub fn csv(rows: &[Row]) -> String {
    let mut out = String::from("op,bytes,channel,algorithm,seconds,dollars,runner_up\n");
    for r in rows {
        let c = &r.choice;
        let _ = writeln!(
            out,
            "{},{},{},{},{},{},{}",
            r.op,
            r.bytes.0,
            c.channel,
            c.algorithm,
            c.seconds.0,
            c.dollars.0,
            c.runner_up.map(|u| u.to_string()).unwrap_or_default()
        );
    }
    out
}

/// The rows as a table for people: sizes in B/KiB/MiB, times in µs/ms/s, dollars in
/// scientific notation, the runner-up with its own time and dollars. A blank line separates
/// operations.
pub fn table(rows: &[Row]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<15} {:>8}  {:<9} {:<20} {:>9} {:>10}  runner-up",
        "op", "bytes", "channel", "algorithm", "time", "dollars"
    );
    let mut last = None;
    for r in rows {
        if last.is_some() && last != Some(r.op) {
            out.push('\n');
        }
        last = Some(r.op);
        let c = &r.choice;
        let runner = match c.runner_up {
            Some(u) => format!("{u} ({}, {})", u.seconds, u.dollars),
            None => "-".to_owned(),
        };
        let _ = writeln!(
            out,
            "{:<15} {:>8}  {:<9} {:<20} {:>9} {:>10}  {}",
            r.op.name(),
            r.bytes.to_string(),
            c.channel.name(),
            c.algorithm.name(),
            c.seconds.to_string(),
            c.dollars.to_string(),
            runner
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_shape() {
        let rows = explain(
            &ModelConfig::default(),
            4,
            Objective::Fast,
            &[ChannelKind::S3, ChannelKind::Redis],
            &Op::ALL,
            &LADDER,
        )
        .unwrap();
        assert_eq!(rows.len(), 10 * LADDER.len() + 1);
        let text = csv(&rows);
        let mut lines = text.lines();
        assert_eq!(
            lines.next(),
            Some("op,bytes,channel,algorithm,seconds,dollars,runner_up")
        );
        for l in lines {
            let f: Vec<&str> = l.split(',').collect();
            assert_eq!(f.len(), 7, "{l}");
            assert!(
                f[4].parse::<f64>().is_ok() && f[5].parse::<f64>().is_ok(),
                "{l}"
            );
        }
        let t = table(&rows);
        assert!(t.contains("barrier") && t.contains("64 MiB"), "{t}");
    }
}
