//! The per-job secret every hello carries, so that only ranks of the job can connect to a rank.

use std::fmt;

/// A job's secret token (the launcher's `FMI_TOKEN`), sent in every TCP hello and required of
/// every inbound one. Its bytes are never shown: `Debug` prints only whether it is set, and no
/// error or log names it. Equality compares in time that depends only on the lengths.
///
/// The empty token (the default) means "no authentication": a hello must then carry none.
#[derive(Clone, Default)]
pub struct JobToken(Vec<u8>);

impl JobToken {
    /// Wraps the token's bytes (at most 1024 are accepted by [`TcpChannel::start`](super::TcpChannel::start)).
    pub fn new(bytes: impl Into<Vec<u8>>) -> JobToken {
        JobToken(bytes.into())
    }

    /// Whether no token is set.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The token's length in bytes (not secret: it shows in the hello's length).
    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub(super) fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// Whether `presented` is this token, in time independent of where they first differ.
    pub(super) fn matches(&self, presented: &[u8]) -> bool {
        ct_eq(&self.0, presented)
    }
}

fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    // Keep the compiler from turning the fold into an early exit.
    std::hint::black_box(diff) == 0
}

impl PartialEq for JobToken {
    fn eq(&self, other: &JobToken) -> bool {
        ct_eq(&self.0, &other.0)
    }
}

impl Eq for JobToken {}

impl fmt::Debug for JobToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_empty() {
            "JobToken(none)"
        } else {
            "JobToken(<redacted>)"
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compares_and_never_shows_its_bytes() {
        let t = JobToken::new(b"s3cret".to_vec());
        assert!(t.matches(b"s3cret"));
        assert!(!t.matches(b"s3cre7"));
        assert!(!t.matches(b"s3cret!"));
        assert!(!t.matches(b""));
        assert!(JobToken::default().matches(b""));
        assert_eq!(t, JobToken::new("s3cret"));
        assert!(!format!("{t:?}").contains("s3cret"));
    }
}
