//! Settings of the storage adapter, shared by every backend.

use std::time::Duration;

use serde::Deserialize;

/// How a [`crate::StorageChannel`] waits, retries and cuts messages. The defaults are FMI's
/// prototype values for S3 (polls start at 100 ms and back off to 1 s); tests use shorter polls.
///
/// In TOML (for example embedded by the `fmi` crate) durations are integer milliseconds:
///
/// ```toml
/// poll_initial_ms = 100
/// poll_max_ms = 1000
/// retry_initial_ms = 20
/// retry_max_ms = 1000
/// max_chunk = 65536        # optional: cut below the backend's own limit
/// put_concurrency = 4
/// native_bcast = true
/// native_barrier = true
/// native_gather = true
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    /// First pause between two polls of a poll backend (`poll_initial_ms`).
    #[serde(rename = "poll_initial_ms", deserialize_with = "millis")]
    pub poll_initial: Duration,
    /// Longest pause between two polls; pauses double up to it (`poll_max_ms`).
    #[serde(rename = "poll_max_ms", deserialize_with = "millis")]
    pub poll_max: Duration,
    /// First pause before retrying a request that failed with a retryable error
    /// (`retry_initial_ms`).
    #[serde(rename = "retry_initial_ms", deserialize_with = "millis")]
    pub retry_initial: Duration,
    /// Longest pause between retries (`retry_max_ms`).
    #[serde(rename = "retry_max_ms", deserialize_with = "millis")]
    pub retry_max: Duration,
    /// Cut messages into chunks of at most this many bytes (header included), even when the
    /// backend allows more. `None`: the backend's `max_value`.
    pub max_chunk: Option<usize>,
    /// How many chunks of one message are written at once.
    pub put_concurrency: usize,
    /// Offer the storage-native broadcast (one write, many reads) when the backend has atomic
    /// counters.
    pub native_bcast: bool,
    /// Offer the counter-based barrier when the backend has atomic counters.
    pub native_barrier: bool,
    /// Offer the counter-based gather (each rank writes its block once, the root reads them
    /// when a counter says all are there) when the backend has atomic counters.
    pub native_gather: bool,
    /// Whether a receive that times out writes whom it waited for into the job's failure
    /// record and reads the record to name the rank at the end of the chain of blame (see
    /// `Channel::abort`). Not read from TOML: `fmi::Communicator` sets it from
    /// `abort_on_peer_failure`. Default: false (a timeout names the rank waited for, and
    /// writes nothing).
    #[serde(skip)]
    pub record_failures: bool,
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            poll_initial: Duration::from_millis(100),
            poll_max: Duration::from_secs(1),
            retry_initial: Duration::from_millis(20),
            retry_max: Duration::from_secs(1),
            max_chunk: None,
            put_concurrency: 4,
            native_bcast: true,
            native_barrier: true,
            native_gather: true,
            record_failures: false,
        }
    }
}

impl StorageConfig {
    /// Short polls (5 ms doubling to 200 ms) and retries, for tests against local servers.
    pub fn fast() -> StorageConfig {
        StorageConfig {
            poll_initial: Duration::from_millis(5),
            poll_max: Duration::from_millis(200),
            retry_initial: Duration::from_millis(5),
            retry_max: Duration::from_millis(200),
            ..StorageConfig::default()
        }
    }

    /// What is wrong with these settings, if anything.
    pub(crate) fn problem(&self) -> Option<&'static str> {
        if self.poll_initial.is_zero() || self.poll_max < self.poll_initial {
            Some("storage: poll_initial_ms must be > 0 and <= poll_max_ms")
        } else if self.retry_initial.is_zero() || self.retry_max < self.retry_initial {
            Some("storage: retry_initial_ms must be > 0 and <= retry_max_ms")
        } else if self.put_concurrency == 0 {
            Some("storage: put_concurrency must be at least 1")
        } else {
            None
        }
    }
}

/// Reads a duration given as integer milliseconds.
pub(crate) fn millis<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    u64::deserialize(d).map(Duration::from_millis)
}

/// Reads a duration given as integer seconds.
pub(crate) fn secs<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    u64::deserialize(d).map(Duration::from_secs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toml_uses_milliseconds_and_rejects_unknown_fields() {
        let c: StorageConfig =
            toml::from_str("poll_initial_ms = 5\npoll_max_ms = 200\nmax_chunk = 4096")
                .expect("parses");
        assert_eq!(c.poll_initial, Duration::from_millis(5));
        assert_eq!(c.poll_max, Duration::from_millis(200));
        assert_eq!(c.max_chunk, Some(4096));
        assert_eq!(c.retry_max, StorageConfig::default().retry_max);
        assert!(toml::from_str::<StorageConfig>("poll_initial = 5").is_err());
        assert!(StorageConfig::default().problem().is_none());
        let bad = StorageConfig {
            poll_max: Duration::from_millis(1),
            ..StorageConfig::default()
        };
        assert!(bad.problem().is_some());
    }
}
