//! The cost ledger: measured requests per channel turned into modelled dollars.

use std::collections::BTreeMap;
use std::fmt;

use crate::params::{ChannelKind, ModelConfig};
use crate::requests::Requests;
use crate::units::{Dollars, Seconds};

/// Requests and bytes per channel, as the channels count them (`fmi::Communicator::counters()`
/// gives `("puts", n)`, `("gets", n)`, …), priced with a [`ModelConfig`].
///
/// ```
/// use fmi_model::{ChannelKind, Ledger, ModelConfig, Seconds, Usage};
/// let mut ledger = Ledger::new();
/// ledger.record(ChannelKind::S3, [("puts", 1000), ("gets", 3000), ("empty_gets", 2000)]);
/// let report = ledger.report(&ModelConfig::default(), Some(Usage { seconds: Seconds(2.0), ranks: 4 }));
/// assert!((report.lines[0].request_dollars.0 - 0.0062).abs() < 1e-12);
/// println!("{report}");
/// ```
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Ledger {
    channels: BTreeMap<ChannelKind, Requests>,
    unknown: BTreeMap<String, u64>,
}

/// How long the job ran and on how many ranks: what the time-based prices need.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Usage {
    /// Wall time of the job (or of the part being accounted).
    pub seconds: Seconds,
    /// Ranks (functions) billed for that time.
    pub ranks: u32,
}

/// One channel's line of a [`LedgerReport`].
#[derive(Clone, Copy, Debug, PartialEq)]
#[non_exhaustive]
pub struct LedgerLine {
    /// The channel.
    pub channel: ChannelKind,
    /// Its requests and bytes.
    pub requests: Requests,
    /// Requests and capacity units at list prices.
    pub request_dollars: Dollars,
    /// The channel's instance amortised over the job's time (0 without [`Usage`]).
    pub instance_dollars: Dollars,
}

/// The ledger priced: one line per channel, the functions' time and the total.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct LedgerReport {
    /// One line per channel that was recorded, in channel order.
    pub lines: Vec<LedgerLine>,
    /// The functions' GB-seconds over the job (0 without [`Usage`]).
    pub function_dollars: Dollars,
    /// Everything.
    pub total: Dollars,
    /// Counter names that were recorded but are not priced, with their sums.
    pub unknown: Vec<(String, u64)>,
    usage: Option<Usage>,
}

impl Ledger {
    /// An empty ledger.
    pub fn new() -> Ledger {
        Ledger::default()
    }

    /// Adds counters of `channel` (for example one rank's final `Communicator::counters()`;
    /// record each rank once, since counters are cumulative). Records the channel even when
    /// `counters` is empty (TCP has none but its rendezvous VM still costs). Names outside
    /// [`Requests::NAMES`] are kept apart and shown in the report.
    pub fn record<'a>(
        &mut self,
        channel: ChannelKind,
        counters: impl IntoIterator<Item = (&'a str, u64)>,
    ) {
        let entry = self.channels.entry(channel).or_default();
        for (name, value) in counters {
            if !entry.add_named(name, value) {
                let u = self.unknown.entry(format!("{channel}.{name}")).or_default();
                *u = u.saturating_add(value);
            }
        }
    }

    /// Adds requests of `channel` (for example an [`crate::Estimate`]'s, to compare).
    pub fn add(&mut self, channel: ChannelKind, requests: &Requests) {
        *self.channels.entry(channel).or_default() += *requests;
    }

    /// The requests recorded for `channel`.
    pub fn requests(&self, channel: ChannelKind) -> Requests {
        self.channels.get(&channel).copied().unwrap_or_default()
    }

    /// Prices the ledger. With `usage`, recorded channels with an instance price are charged
    /// for the job's time and every rank for its GB-seconds.
    pub fn report(&self, config: &ModelConfig, usage: Option<Usage>) -> LedgerReport {
        let secs = usage.map_or(0.0, |u| u.seconds.0);
        let lines: Vec<LedgerLine> = self
            .channels
            .iter()
            .map(|(&channel, requests)| {
                let params = config.params(channel);
                LedgerLine {
                    channel,
                    requests: *requests,
                    request_dollars: requests.dollars(&params.prices),
                    instance_dollars: Dollars(secs * params.prices.instance_per_hour.0 / 3600.0),
                }
            })
            .collect();
        let function_dollars = Dollars(usage.map_or(0.0, |u| {
            u.seconds.0 * f64::from(u.ranks) * config.function_usd_per_second()
        }));
        let total = lines
            .iter()
            .map(|l| l.request_dollars + l.instance_dollars)
            .sum::<Dollars>()
            + function_dollars;
        LedgerReport {
            lines,
            function_dollars,
            total,
            unknown: self.unknown.iter().map(|(k, v)| (k.clone(), *v)).collect(),
            usage,
        }
    }
}

impl fmt::Display for LedgerReport {
    /// A table: per channel the requests, bytes, and dollars; then the functions and the total.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{:<9} {:>9} {:>9} {:>9} {:>8} {:>9} {:>11} {:>11} {:>12} {:>12} {:>10}",
            "channel",
            "puts",
            "gets",
            "empty",
            "deletes",
            "counters",
            "write_units",
            "read_units",
            "bytes_put",
            "bytes_got",
            "dollars"
        )?;
        for l in &self.lines {
            let r = &l.requests;
            writeln!(
                f,
                "{:<9} {:>9} {:>9} {:>9} {:>8} {:>9} {:>11} {:>11} {:>12} {:>12} {:>10}",
                l.channel.name(),
                r.puts,
                r.gets,
                r.empty_gets,
                r.deletes,
                r.counters,
                r.write_units,
                r.read_units,
                r.bytes_put,
                r.bytes_got,
                (l.request_dollars + l.instance_dollars).to_string()
            )?;
            if l.instance_dollars.0 > 0.0 {
                writeln!(
                    f,
                    "{:<9}   of which instance time {}",
                    "", l.instance_dollars
                )?;
            }
        }
        if let Some(u) = self.usage {
            writeln!(
                f,
                "functions: {} ranks × {} = {}",
                u.ranks, u.seconds, self.function_dollars
            )?;
        }
        for (name, v) in &self.unknown {
            writeln!(f, "not priced: {name} = {v}")?;
        }
        write!(f, "total: {}", self.total)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prices_counters_like_the_model() {
        let c = ModelConfig::default();
        let mut l = Ledger::new();
        l.record(
            ChannelKind::DynamoDb,
            [
                ("puts", 10),
                ("write_units", 2_000_000),
                ("read_units", 4_000_000),
            ],
        );
        l.record(ChannelKind::DynamoDb, [("retries", 1), ("frobs", 2)]);
        l.record(ChannelKind::Tcp, []);
        let r = l.report(
            &c,
            Some(Usage {
                seconds: Seconds(3600.0),
                ranks: 2,
            }),
        );
        assert_eq!(r.lines.len(), 2);
        assert_eq!(r.lines[0].channel, ChannelKind::Tcp);
        assert!((r.lines[0].instance_dollars.0 - 0.0104).abs() < 1e-12);
        assert!((r.lines[1].request_dollars.0 - (1.25 + 0.5)).abs() < 1e-12);
        assert!((r.function_dollars.0 - 3600.0 * 2.0 * 0.000_016_666_7).abs() < 1e-12);
        assert_eq!(r.unknown, vec![("dynamodb.frobs".to_owned(), 2)]);
        assert_eq!(l.requests(ChannelKind::DynamoDb).retries, 1);
        let text = r.to_string();
        assert!(
            text.contains("dynamodb") && text.contains("total: $"),
            "{text}"
        );
        let none = l.report(&c, None);
        assert_eq!(none.function_dollars, Dollars::ZERO);
    }
}
