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

/// Least-squares fit of `seconds = α + bytes × β` to `(bytes, seconds)` samples (for example
/// half round trips of a ping-pong ladder where the receiver is already waiting). Negative
/// results are clamped to 0. Needs at least two distinct sizes.
pub fn fit(samples: &[(Bytes, Seconds)]) -> Result<Fit, ModelError> {
    let n = samples.len() as f64;
    let (sx, sy) = samples
        .iter()
        .fold((0.0, 0.0), |(a, b), (x, y)| (a + x.0 as f64, b + y.0));
    let (mx, my) = (sx / n, sy / n);
    let (sxx, sxy) = samples.iter().fold((0.0, 0.0), |(a, b), (x, y)| {
        let dx = x.0 as f64 - mx;
        (a + dx * dx, b + dx * (y.0 - my))
    });
    if samples.len() < 2 || sxx <= 0.0 || !sxy.is_finite() {
        return Err(ModelError::Invalid(
            "calibration needs samples of at least two different sizes".into(),
        ));
    }
    let beta = (sxy / sxx).max(0.0);
    let alpha = (my - beta * mx).max(0.0);
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
}
