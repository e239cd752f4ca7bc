//! `fmi run --report`: the job's cost ledger, summed over the ranks.
//!
//! The launcher gives every rank `FMI_LEDGER=DIR`; each rank's communicator writes
//! `DIR/rank-R.txt` when it is dropped (see `fmi::ledger`). After the job the files are summed
//! into one [`Ledger`], priced with the configuration's model (the defaults without a
//! `[model]` section) for the job's wall time and ranks, and printed; for jobs of up to
//! [`PER_RANK_MAX`] ranks each rank's requests and bytes per channel follow.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use fmi::ledger::RankLedger;
use fmi_model::{JobConfig, Ledger, ModelConfig, Seconds, Usage};

/// Jobs up to this many ranks also get a line per rank and channel.
pub(crate) const PER_RANK_MAX: u32 = 8;

/// A fresh folder for the ranks' ledgers.
pub(crate) fn ledger_dir(job: &str) -> std::io::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("fmi-ledger-{job}-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// The report text of the ledgers in `dir` for a job of `ranks` ranks that ran `seconds`.
pub(crate) fn report(dir: &Path, ranks: u32, seconds: f64, config: Option<&Path>) -> String {
    let model = config
        .and_then(|p| JobConfig::from_file(p).ok())
        .map_or_else(ModelConfig::default, |j| j.model);
    let mut ledger = Ledger::new();
    let mut per_rank = Vec::new();
    let mut missing = Vec::new();
    for rank in 0..ranks {
        let path = dir.join(format!("rank-{rank}.txt"));
        match std::fs::read_to_string(&path)
            .map_err(|e| e.to_string())
            .and_then(|t| RankLedger::parse(&t))
        {
            Ok(l) => {
                l.record_into(&mut ledger);
                per_rank.push(l);
            }
            Err(_) => missing.push(rank),
        }
    }
    let usage = Usage {
        seconds: Seconds(seconds),
        ranks,
    };
    let priced = ledger.report(&model, Some(usage));
    let mut out = format!(
        "cost report: {ranks} ranks, {}, requests summed over the ranks, dollars at the model's \
         prices (docs/model.md)\n{priced}\n",
        Seconds(seconds)
    );
    if ranks <= PER_RANK_MAX {
        for l in &per_rank {
            for (ch, counters) in &l.channels {
                let shown: Vec<String> = counters
                    .iter()
                    .filter(|(_, v)| *v > 0)
                    .map(|(n, v)| format!("{n} {v}"))
                    .collect();
                let shown = if shown.is_empty() {
                    "no billed requests".to_owned()
                } else {
                    shown.join(", ")
                };
                let _ = writeln!(
                    out,
                    "rank {} {ch} ({}): {shown}",
                    l.rank,
                    Seconds(l.seconds)
                );
            }
        }
    }
    if !missing.is_empty() {
        let list: Vec<String> = missing.iter().map(u32::to_string).collect();
        let _ = writeln!(
            out,
            "no ledger from rank(s) {} (a rank writes it when its communicator is dropped; one \
             that exits without dropping it, or uses no communicator, writes none)",
            list.join(", ")
        );
    }
    out
}
