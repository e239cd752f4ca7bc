//! Units as types: a time is never mistaken for a price or a size.
//!
//! Arithmetic on them uses only IEEE-754 basic operations (`+ − × ÷`, comparisons, `ceil`), which
//! are exactly rounded on every platform, so the model computes bit-identical numbers on every
//! rank (x86-64 or aarch64) from identical inputs.

use std::fmt;
use std::iter::Sum;
use std::ops::{Add, AddAssign, Mul};

use serde::{Deserialize, Serialize};

/// A duration in seconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, PartialOrd, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Seconds(pub f64);

/// A size in bytes.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Bytes(pub u64);

/// A price in US dollars.
#[derive(Clone, Copy, Debug, Default, PartialEq, PartialOrd, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Dollars(pub f64);

/// The time one byte takes (β, the inverse of a bandwidth).
#[derive(Clone, Copy, Debug, Default, PartialEq, PartialOrd, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SecondsPerByte(pub f64);

impl Seconds {
    /// Zero seconds.
    pub const ZERO: Seconds = Seconds(0.0);

    /// `ms` milliseconds.
    pub fn from_millis(ms: f64) -> Seconds {
        Seconds(ms / 1000.0)
    }

    /// In milliseconds.
    pub fn millis(self) -> f64 {
        self.0 * 1000.0
    }
}

impl SecondsPerByte {
    /// β of a link moving `mb_per_sec` megabytes (10^6 bytes) per second; 0 for an infinite
    /// bandwidth.
    pub fn from_mb_per_sec(mb_per_sec: f64) -> SecondsPerByte {
        if mb_per_sec > 0.0 {
            SecondsPerByte(1.0 / (mb_per_sec * 1e6))
        } else {
            SecondsPerByte(0.0)
        }
    }

    /// The bandwidth in MB/s (10^6 bytes per second); 0 for β = 0 (no limit).
    pub fn mb_per_sec(self) -> f64 {
        if self.0 > 0.0 {
            1.0 / (self.0 * 1e6)
        } else {
            0.0
        }
    }

    /// The time `bytes` take.
    pub fn time(self, bytes: f64) -> Seconds {
        Seconds(self.0 * bytes)
    }
}

impl Dollars {
    /// Zero dollars.
    pub const ZERO: Dollars = Dollars(0.0);
}

impl Bytes {
    /// `n` KiB.
    pub const fn kib(n: u64) -> Bytes {
        Bytes(n * 1024)
    }
    /// `n` MiB.
    pub const fn mib(n: u64) -> Bytes {
        Bytes(n * 1024 * 1024)
    }
}

macro_rules! float_ops {
    ($t:ident) => {
        impl Add for $t {
            type Output = $t;
            fn add(self, o: $t) -> $t {
                $t(self.0 + o.0)
            }
        }
        impl AddAssign for $t {
            fn add_assign(&mut self, o: $t) {
                self.0 += o.0;
            }
        }
        impl Mul<f64> for $t {
            type Output = $t;
            fn mul(self, k: f64) -> $t {
                $t(self.0 * k)
            }
        }
        impl Sum for $t {
            fn sum<I: Iterator<Item = $t>>(iter: I) -> $t {
                iter.fold($t(0.0), |a, b| a + b)
            }
        }
    };
}
float_ops!(Seconds);
float_ops!(Dollars);

impl fmt::Display for Seconds {
    /// Three significant digits in the unit that suits: `340 µs`, `5.2 ms`, `1.41 s`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.0;
        if s == 0.0 {
            f.write_str("0 s")
        } else if s < 1e-3 {
            write!(f, "{} µs", sig3(s * 1e6))
        } else if s < 1.0 {
            write!(f, "{} ms", sig3(s * 1e3))
        } else {
            write!(f, "{} s", sig3(s))
        }
    }
}

impl fmt::Display for Dollars {
    /// `$0` or `$1.23e-5`: three significant digits in scientific notation, which keeps prices
    /// of a millionth of a dollar and of a dollar readable in one column.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0 == 0.0 {
            f.write_str("$0")
        } else {
            write!(f, "${:.2e}", self.0)
        }
    }
}

impl fmt::Display for Bytes {
    /// `8 B`, `4 KiB`, `64 MiB` for whole KiB/MiB/GiB, else the exact count: `350000 B`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const K: u64 = 1024;
        let n = self.0;
        if n >= K * K * K && n.is_multiple_of(K * K * K) {
            write!(f, "{} GiB", n / (K * K * K))
        } else if n >= K * K && n.is_multiple_of(K * K) {
            write!(f, "{} MiB", n / (K * K))
        } else if n >= K && n.is_multiple_of(K) {
            write!(f, "{} KiB", n / K)
        } else {
            write!(f, "{n} B")
        }
    }
}

/// Three significant digits without trailing zeros (`5.2`, `140`, `0.34` → callers scale).
fn sig3(x: f64) -> String {
    let decimals = if x >= 100.0 {
        0
    } else if x >= 10.0 {
        1
    } else {
        2
    };
    let s = format!("{x:.decimals$}");
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_owned()
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display() {
        assert_eq!(Seconds(0.00034).to_string(), "340 µs");
        assert_eq!(Seconds(0.0052).to_string(), "5.2 ms");
        assert_eq!(Seconds(0.1404).to_string(), "140 ms");
        assert_eq!(Seconds(1.5).to_string(), "1.5 s");
        assert_eq!(Dollars(0.0000054).to_string(), "$5.40e-6");
        assert_eq!(Dollars(0.0).to_string(), "$0");
        assert_eq!(Bytes(8).to_string(), "8 B");
        assert_eq!(Bytes::kib(4).to_string(), "4 KiB");
        assert_eq!(Bytes::mib(64).to_string(), "64 MiB");
        assert_eq!(Bytes(350_000).to_string(), "350000 B");
    }

    #[test]
    fn bandwidth() {
        let b = SecondsPerByte::from_mb_per_sec(50.0);
        assert!((b.time(50e6).0 - 1.0).abs() < 1e-12);
        assert!((b.mb_per_sec() - 50.0).abs() < 1e-9);
        assert_eq!(SecondsPerByte::from_mb_per_sec(0.0), SecondsPerByte(0.0));
    }
}
