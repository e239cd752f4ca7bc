//! A rank's cost ledger on disk: what `fmi run --report` collects.
//!
//! When `FMI_LEDGER` names a folder (as `fmi run --report` sets it), a communicator made by
//! [`Communicator::from_env`](crate::Communicator::from_env) writes `rank-R.txt` there when the
//! last handle on it is dropped: its wall time and every channel's request counters. The
//! launcher sums the ranks' files into a [`fmi_model::Ledger`] and prices it.
//!
//! ```text
//! rank 0
//! seconds 1.25
//! channel s3 puts 12
//! channel s3 gets 30
//! channel tcp
//! ```
//!
//! A process that exits without dropping its communicator (`std::process::exit`, a signal)
//! writes nothing; the report then says which ranks are missing.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::Arc;

use fmi_channels::Channel;

/// The variable naming the folder ranks write their ledgers to.
pub const LEDGER_VAR: &str = "FMI_LEDGER";

/// One rank's ledger as written to `FMI_LEDGER/rank-R.txt`.
#[derive(Clone, Debug, Default, PartialEq)]
#[non_exhaustive]
pub struct RankLedger {
    /// The rank.
    pub rank: u32,
    /// Seconds from joining the job to dropping the communicator.
    pub seconds: f64,
    /// Per channel (by name), its counters.
    pub channels: Vec<(String, Vec<(String, u64)>)>,
}

impl RankLedger {
    /// The file's text.
    pub fn to_text(&self) -> String {
        let mut s = format!("rank {}\nseconds {}\n", self.rank, self.seconds);
        for (ch, counters) in &self.channels {
            if counters.is_empty() {
                let _ = writeln!(s, "channel {ch}");
            }
            for (name, v) in counters {
                let _ = writeln!(s, "channel {ch} {name} {v}");
            }
        }
        s
    }

    /// Parses a file's text.
    pub fn parse(text: &str) -> Result<RankLedger, String> {
        let mut l = RankLedger::default();
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let f: Vec<&str> = line.split_whitespace().collect();
            let bad = || format!("bad ledger line {line:?}");
            match f.as_slice() {
                ["rank", r] => l.rank = r.parse().map_err(|_| bad())?,
                ["seconds", s] => l.seconds = s.parse().map_err(|_| bad())?,
                ["channel", ch] => l.entry(ch),
                ["channel", ch, name, v] => {
                    let v: u64 = v.parse().map_err(|_| bad())?;
                    l.entry(ch);
                    if let Some((_, c)) = l.channels.iter_mut().find(|(n, _)| n == ch) {
                        c.push(((*name).to_owned(), v));
                    }
                }
                _ => return Err(bad()),
            }
        }
        Ok(l)
    }

    fn entry(&mut self, ch: &str) {
        if !self.channels.iter().any(|(n, _)| n == ch) {
            self.channels.push((ch.to_owned(), Vec::new()));
        }
    }

    /// Adds this rank's counters to `ledger`.
    pub fn record_into(&self, ledger: &mut fmi_model::Ledger) {
        for (ch, counters) in &self.channels {
            let kind = crate::comm::channel_kind(ch);
            ledger.record(kind, counters.iter().map(|(n, v)| (n.as_str(), *v)));
        }
    }
}

/// Writes the rank's ledger file when dropped (held by the communicator's shared state).
pub(crate) struct LedgerFile {
    pub(crate) path: PathBuf,
    pub(crate) rank: u32,
    pub(crate) start: std::time::Instant,
    pub(crate) channels: Vec<Arc<dyn Channel>>,
}

impl LedgerFile {
    /// The ledger file for `rank` if `FMI_LEDGER` is set.
    pub(crate) fn from_env(rank: u32, channels: Vec<Arc<dyn Channel>>) -> Option<LedgerFile> {
        let dir = std::env::var_os(LEDGER_VAR).filter(|d| !d.is_empty())?;
        Some(LedgerFile {
            path: PathBuf::from(dir).join(format!("rank-{rank}.txt")),
            rank,
            start: std::time::Instant::now(),
            channels,
        })
    }

    fn snapshot(&self) -> RankLedger {
        RankLedger {
            rank: self.rank,
            seconds: self.start.elapsed().as_secs_f64(),
            channels: self
                .channels
                .iter()
                .map(|c| {
                    let counters = c
                        .counters()
                        .into_iter()
                        .map(|(n, v)| (n.to_owned(), v))
                        .collect();
                    (c.name().to_owned(), counters)
                })
                .collect(),
        }
    }
}

impl Drop for LedgerFile {
    fn drop(&mut self) {
        let text = self.snapshot().to_text();
        // Written whole, then renamed, so the launcher never reads half a file.
        let tmp = self.path.with_extension("tmp");
        let done = std::fs::write(&tmp, text).and_then(|()| std::fs::rename(&tmp, &self.path));
        if let Err(e) = done {
            tracing::warn!(
                "rank {}: cannot write the ledger {}: {e}",
                self.rank,
                self.path.display()
            );
        }
    }
}

impl std::fmt::Debug for LedgerFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LedgerFile")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_round_trip() {
        let l = RankLedger {
            rank: 3,
            seconds: 1.5,
            channels: vec![
                ("tcp".into(), vec![]),
                ("s3".into(), vec![("puts".into(), 2), ("gets".into(), 5)]),
            ],
        };
        let back = RankLedger::parse(&l.to_text()).expect("parse");
        assert_eq!(back, l);
        let mut ledger = fmi_model::Ledger::new();
        back.record_into(&mut ledger);
        assert_eq!(ledger.requests(fmi_model::ChannelKind::S3).gets, 5);
        assert!(RankLedger::parse("rank x").is_err());
    }
}
