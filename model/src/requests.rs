//! Request counts in the vocabulary of the storage channels' counters, and their price.

use std::fmt;
use std::ops::{Add, AddAssign};

use crate::params::{ChannelParams, Prices};
use crate::units::Dollars;

/// Requests and bytes of one channel, named like the counters of `fmi::Communicator::counters()`
/// (`puts`, `gets`, `empty_gets`, …). The model predicts them per operation; the [`crate::Ledger`]
/// collects measured ones. Every count saturates instead of overflowing.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct Requests {
    /// Writes (S3 PUT-class, DynamoDB PutItem, Redis push).
    pub puts: u64,
    /// Reads, including polls that found nothing.
    pub gets: u64,
    /// Reads that found nothing (polls).
    pub empty_gets: u64,
    /// Delete requests (one per batch).
    pub deletes: u64,
    /// List requests (one per page).
    pub lists: u64,
    /// Atomic counter updates.
    pub counters: u64,
    /// DynamoDB write capacity units.
    pub write_units: u64,
    /// DynamoDB read capacity units.
    pub read_units: u64,
    /// Payload bytes written.
    pub bytes_put: u64,
    /// Payload bytes read.
    pub bytes_got: u64,
    /// Requests retried after a failure (measured only; the model predicts none).
    pub retries: u64,
}

impl Requests {
    /// Nothing.
    pub const NONE: Requests = Requests {
        puts: 0,
        gets: 0,
        empty_gets: 0,
        deletes: 0,
        lists: 0,
        counters: 0,
        write_units: 0,
        read_units: 0,
        bytes_put: 0,
        bytes_got: 0,
        retries: 0,
    };

    /// The counter names, in the order `counters()` lists them.
    pub const NAMES: [&'static str; 11] = [
        "puts",
        "gets",
        "empty_gets",
        "deletes",
        "lists",
        "counters",
        "write_units",
        "read_units",
        "bytes_put",
        "bytes_got",
        "retries",
    ];

    fn fields_mut(&mut self) -> [&mut u64; 11] {
        [
            &mut self.puts,
            &mut self.gets,
            &mut self.empty_gets,
            &mut self.deletes,
            &mut self.lists,
            &mut self.counters,
            &mut self.write_units,
            &mut self.read_units,
            &mut self.bytes_put,
            &mut self.bytes_got,
            &mut self.retries,
        ]
    }

    /// The counts as `(name, value)` pairs, in [`Requests::NAMES`] order.
    pub fn pairs(&self) -> [(&'static str, u64); 11] {
        let v = [
            self.puts,
            self.gets,
            self.empty_gets,
            self.deletes,
            self.lists,
            self.counters,
            self.write_units,
            self.read_units,
            self.bytes_put,
            self.bytes_got,
            self.retries,
        ];
        let mut out = [("", 0); 11];
        for (i, name) in Requests::NAMES.into_iter().enumerate() {
            out[i] = (name, v[i]);
        }
        out
    }

    /// Adds `value` to the counter called `name`; returns false (and adds nothing) for a name
    /// that is not one of [`Requests::NAMES`].
    pub fn add_named(&mut self, name: &str, value: u64) -> bool {
        match Requests::NAMES.iter().position(|n| *n == name) {
            Some(i) => {
                let f = &mut self.fields_mut()[i];
                **f = f.saturating_add(value);
                true
            }
            None => false,
        }
    }

    /// These requests `k` times.
    pub fn times(mut self, k: u64) -> Requests {
        for f in self.fields_mut() {
            *f = f.saturating_mul(k);
        }
        self
    }

    /// Dollars of these requests under `prices`: requests × per-request prices plus capacity
    /// units × unit prices (no time-based part).
    pub fn dollars(&self, prices: &Prices) -> Dollars {
        let per_1k = |n: u64, p: Dollars| n as f64 * p.0 / 1000.0;
        let per_1m = |n: u64, p: Dollars| n as f64 * p.0 / 1_000_000.0;
        Dollars(
            per_1k(self.puts, prices.put_per_1k)
                + per_1k(self.gets, prices.get_per_1k)
                + per_1k(self.deletes, prices.delete_per_1k)
                + per_1k(self.lists, prices.list_per_1k)
                + per_1k(self.counters, prices.counter_per_1k)
                + per_1m(self.write_units, prices.write_unit_per_1m)
                + per_1m(self.read_units, prices.read_unit_per_1m),
        )
    }

    /// [`Requests::dollars`] under a channel's prices.
    pub fn dollars_on(&self, params: &ChannelParams) -> Dollars {
        self.dollars(&params.prices)
    }

    /// Whether every count is zero.
    pub fn is_empty(&self) -> bool {
        *self == Requests::NONE
    }
}

impl Add for Requests {
    type Output = Requests;
    fn add(mut self, o: Requests) -> Requests {
        self += o;
        self
    }
}

impl AddAssign for Requests {
    fn add_assign(&mut self, o: Requests) {
        for (i, (_, v)) in o.pairs().into_iter().enumerate() {
            let f = &mut self.fields_mut()[i];
            **f = f.saturating_add(v);
        }
    }
}

impl fmt::Display for Requests {
    /// The non-zero counts: `puts=1 gets=3 empty_gets=2 …`, or `none`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for (name, v) in self.pairs() {
            if v != 0 {
                if !first {
                    f.write_str(" ")?;
                }
                write!(f, "{name}={v}")?;
                first = false;
            }
        }
        if first {
            f.write_str("none")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::params::{ChannelKind, ChannelParams};

    #[test]
    fn named_counters_and_prices() {
        let mut r = Requests::default();
        assert!(r.add_named("puts", 1000));
        assert!(r.add_named("gets", 1000));
        assert!(!r.add_named("nonsense", 1));
        let s3 = ChannelParams::defaults(ChannelKind::S3);
        assert!((r.dollars_on(&s3).0 - 0.0054).abs() < 1e-12);
        let mut d = Requests::default();
        d.add_named("write_units", 1_000_000);
        d.add_named("read_units", 1_000_000);
        let ddb = ChannelParams::defaults(ChannelKind::DynamoDb);
        assert!((d.dollars_on(&ddb).0 - 0.75).abs() < 1e-12);
        assert_eq!((r + d).puts, 1000);
        assert_eq!(r.times(3).gets, 3000);
        assert_eq!(r.to_string(), "puts=1000 gets=1000");
        assert_eq!(Requests::NONE.to_string(), "none");
        assert_eq!(
            Requests {
                puts: u64::MAX,
                ..r
            }
            .times(2)
            .puts,
            u64::MAX
        );
    }
}
