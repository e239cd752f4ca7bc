//! Fitting α and β to measured message times: the arithmetic half of `fmi calibrate`.

use crate::params::ChannelKind;
use crate::units::{Bytes, Seconds, SecondsPerByte};
use crate::ModelError;

/// α and β fitted to measurements.
#[derive(Clone, Copy, Debug, PartialEq)]
#[non_exhaustive]
pub struct Fit {
    /// Latency of an empty message.
    pub alpha: Seconds,
    /// Time per byte.
    pub beta: SecondsPerByte,
}

/// Fit of `seconds = α + bytes × β` to `(bytes, seconds)` samples (for example half round
/// trips of a ping-pong ladder where the receiver is already waiting) that minimises the
/// **relative** residuals: least squares weighted by 1/seconds². A plain least-squares line over
/// a ladder from 8 B to 1 MiB is decided by the large sizes (their residuals are microseconds
/// where the small sizes' whole time is), and its α came out 10× below the measured 8-byte time;
/// weighting each sample by its own size of error keeps every size within the same relative
/// error, which is what the model's predictions are judged by. Negative results are clamped to
/// 0 (β then refitted as the weighted mean of (seconds - α)/bytes). Needs at least two distinct
/// sizes and positive times.
pub fn fit(samples: &[(Bytes, Seconds)]) -> Result<Fit, ModelError> {
    let invalid =
        || ModelError::Invalid("calibration needs samples of at least two different sizes".into());
    if samples.len() < 2
        || samples
            .iter()
            .any(|(_, y)| y.0.is_nan() || y.0 <= 0.0 || !y.0.is_finite())
    {
        return Err(invalid());
    }
    // Weighted normal equations with w = 1/y².
    let (mut sw, mut swx, mut swy, mut swxx, mut swxy) = (0.0, 0.0, 0.0, 0.0, 0.0);
    for (x, y) in samples {
        let (x, y) = (x.0 as f64, y.0);
        let w = 1.0 / (y * y);
        sw += w;
        swx += w * x;
        swy += w * y;
        swxx += w * x * x;
        swxy += w * x * y;
    }
    let det = sw * swxx - swx * swx;
    // Relative to the scale of the terms: equal sizes make the determinant vanish.
    if det.is_nan() || det <= 1e-12 * sw * swxx || !det.is_finite() {
        return Err(invalid());
    }
    let mut beta = (sw * swxy - swx * swy) / det;
    let mut alpha = (swy - beta * swx) / sw;
    if alpha < 0.0 {
        alpha = 0.0;
        beta = swxy / swxx;
    }
    if beta < 0.0 {
        beta = 0.0;
        alpha = swy / sw;
    }
    Ok(Fit {
        alpha: Seconds(alpha),
        beta: SecondsPerByte(beta),
    })
}

impl Fit {
    /// The `[model.<channel>]` lines that set these values (β as a bandwidth; a zero β is
    /// left out, since a bandwidth must be positive).
    pub fn to_toml(&self, channel: ChannelKind) -> String {
        let mut s = format!("[model.{channel}]\nalpha_ms = {}\n", self.alpha.millis());
        if self.beta.0 > 0.0 {
            s.push_str(&format!(
                "bandwidth_mb_per_sec = {}\n",
                self.beta.mb_per_sec()
            ));
        }
        s
    }
}

/// The aggregate bandwidth of a shared server (`aggregate_mb_per_sec`, MB/s) that an
/// **exchange** shows: two ranks each send `bytes` through it and receive the other's at once,
/// and the pair took `exchange` from the last start to the last end, `extra` of which is the
/// exchange's fixed extra over a one-way message (`exchange_extra_ms`). The model prices a step
/// at no less than its volume over the aggregate bandwidth, so this is the slowest aggregate
/// that still lets the measured exchange fit: 2 × bytes / (exchange − extra). It is a lower
/// bound of what the server can do (two streams, not more); `None` when the numbers cannot give
/// one (a size under 64 KiB, where fixed costs decide the time, or a non-positive time).
pub fn aggregate_from_exchange(bytes: Bytes, exchange: Seconds, extra: Seconds) -> Option<f64> {
    let t = exchange.0 - extra.0.max(0.0);
    if bytes.0 < 64 << 10 || t.is_nan() || t <= 0.0 || !t.is_finite() {
        return None;
    }
    Some(2.0 * bytes.0 as f64 / t / 1e6)
}

/// The fixed extra of an **exchange** over a one-way message (`exchange_extra_ms`), from rounds
/// that each measured both under the same load: `(one_way, exchange)` per round, the ping-pong's
/// half round trip and the exchange that followed it (both ranks sending and receiving at once,
/// last start to last end). Returns the **median of the per-round differences**, clamped at 0;
/// `None` without a finite pair.
///
/// Before (session 8) the extra was the difference of the two medians, each taken over all
/// rounds: on a shared host the load moves both times by more than the extra itself, and when
/// the exchanges' quiet rounds and the one-way's loaded ones fell differently the exchange's
/// median came out below the one-way's (Redis 8 B: 72.9 µs against 83.7 µs) and the extra was
/// 0, which priced the small Redis allreduces at 0.32–0.49× of what they took. A round's two
/// measurements are taken back to back, so their difference cancels the load they share, and
/// the median over the rounds ignores the rounds where one of them was disturbed.
pub fn exchange_extra(rounds: &[(Seconds, Seconds)]) -> Option<Seconds> {
    let diffs: Vec<f64> = rounds
        .iter()
        .map(|(one_way, exchange)| exchange.0 - one_way.0)
        .filter(|d| d.is_finite())
        .collect();
    if diffs.is_empty() {
        return None;
    }
    Some(Seconds(median(&diffs).max(0.0)))
}

/// The median of `v` (the mean of the middle two for an even count); NaN if `v` is empty.
pub fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::JobConfig;

    #[test]
    fn recovers_a_line_and_writes_a_section() {
        let samples: Vec<(Bytes, Seconds)> = [8u64, 4096, 1 << 20, 16 << 20]
            .into_iter()
            .map(|b| (Bytes(b), Seconds(0.005 + b as f64 / 100e6)))
            .collect();
        let f = fit(&samples).unwrap();
        assert!((f.alpha.0 - 0.005).abs() < 1e-9, "{f:?}");
        assert!((f.beta.mb_per_sec() - 100.0).abs() < 1e-6, "{f:?}");
        let text = f.to_toml(ChannelKind::Redis);
        let job = JobConfig::from_toml(&text).unwrap();
        assert!((job.model.redis.alpha.0 - 0.005).abs() < 1e-9);
        assert!(fit(&samples[..1]).is_err());
        assert!(fit(&[(Bytes(8), Seconds(1.0)), (Bytes(8), Seconds(2.0))]).is_err());
    }

    #[test]
    fn an_exchange_gives_the_aggregate_its_volume_fits_in() {
        // 1 MiB each way in 1.92 ms, 0.06 ms of which is the exchange's fixed extra.
        let mb = aggregate_from_exchange(Bytes(1 << 20), Seconds(1.92e-3), Seconds(0.06e-3))
            .expect("an aggregate");
        assert!(
            (mb - 2.0 * 1_048_576.0 / 1.86e-3 / 1e6).abs() < 1e-6,
            "{mb}"
        );
        // The model's step time for that volume is then the measured exchange.
        let priced = 2.0 * 1_048_576.0 * SecondsPerByte::from_mb_per_sec(mb).0 + 0.06e-3;
        assert!((priced - 1.92e-3).abs() < 1e-9, "{priced}");
        assert!(aggregate_from_exchange(Bytes(8), Seconds(1e-4), Seconds(0.0)).is_none());
        assert!(aggregate_from_exchange(Bytes(1 << 20), Seconds(1e-4), Seconds(2e-4)).is_none());
        assert!(aggregate_from_exchange(Bytes(1 << 20), Seconds(f64::NAN), Seconds(0.0)).is_none());
    }

    #[test]
    fn every_size_keeps_its_relative_error() {
        // A ladder whose small sizes sit above the line the large ones draw (fixed costs that a
        // pure α-β line cannot express): a plain fit puts α near 1 µs, far below the 8-byte
        // time; the relative fit stays within 2× at every size.
        let samples = [
            (Bytes(8), Seconds(16.5e-6)),
            (Bytes(512), Seconds(17.0e-6)),
            (Bytes(65536), Seconds(47e-6)),
            (Bytes(1 << 20), Seconds(737e-6)),
        ];
        let f = fit(&samples).unwrap();
        for (b, t) in samples {
            let p = f.alpha.0 + b.0 as f64 * f.beta.0;
            let r = p / t.0;
            assert!(
                (0.5..=2.0).contains(&r),
                "{b:?}: predicted {p}, measured {}: {f:?}",
                t.0
            );
        }
        assert!(fit(&[(Bytes(8), Seconds(0.0)), (Bytes(16), Seconds(1.0))]).is_err());
    }
    #[test]
    fn the_exchange_extra_is_the_median_of_paired_differences() {
        let us = |v: f64| Seconds(v * 1e-6);
        // Load that moves both measurements of a round together: the one-way medians at 150 µs,
        // the exchange median at 90 µs (the difference of medians would clamp to 0), yet every
        // round but one measured its exchange 20 µs above its one-way time.
        let rounds = [
            (us(50.0), us(70.0)),
            (us(60.0), us(80.0)),
            (us(150.0), us(90.0)),
            (us(160.0), us(180.0)),
            (us(170.0), us(190.0)),
        ];
        let e = exchange_extra(&rounds).expect("an extra");
        assert!((e.0 - 20e-6).abs() < 1e-12, "{e:?}");
        // One disturbed round (an exchange that waited for a descheduled rank) moves nothing.
        let mut disturbed = rounds.to_vec();
        disturbed.push((us(55.0), us(5_000.0)));
        disturbed.push((us(58.0), us(78.0)));
        let e = exchange_extra(&disturbed).expect("an extra");
        assert!((e.0 - 20e-6).abs() < 1e-12, "{e:?}");
        // Even count: the mean of the middle two.
        let e = exchange_extra(&[(us(10.0), us(14.0)), (us(10.0), us(20.0))]).expect("an extra");
        assert!((e.0 - 7e-6).abs() < 1e-12, "{e:?}");
        // Exchanges faster than the one-way time: clamped at 0. Nothing finite: none.
        let e = exchange_extra(&[(us(100.0), us(90.0))]).expect("an extra");
        assert_eq!(e, Seconds::ZERO);
        assert!(exchange_extra(&[]).is_none());
        assert!(exchange_extra(&[(Seconds(f64::NAN), us(1.0))]).is_none());
    }
}
