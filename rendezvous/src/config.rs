//! Server configuration: limits that bound memory and time, with defaults that suit one server
//! pairing many jobs of up to a few thousand ranks.

use std::time::Duration;

/// How a rendezvous server bounds the work and memory any client can cause.
///
/// Start from [`ServerConfig::default`] and change fields:
///
/// ```
/// # use std::time::Duration;
/// let mut config = fmi_rendezvous::ServerConfig::default();
/// config.read_timeout = Duration::from_secs(2);
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ServerConfig {
    /// The most jobs held at once, gathering or complete. Further jobs are refused with
    /// `ServerFull`. Default 1024.
    pub max_jobs: usize,
    /// The largest job size accepted; sizes above it are refused with `JobTooLarge`. Capped at
    /// [`wire::MAX_RANKS`](crate::wire::MAX_RANKS). Default 4096.
    pub max_ranks_per_job: u32,
    /// The most client connections open at once; connections beyond it are closed as soon as
    /// they are accepted. Since every registration holds a connection, this also bounds the
    /// endpoints stored. Default 8192.
    pub max_connections: usize,
    /// How long a job may stay incomplete after its first registration before it is abandoned:
    /// its waiting ranks are refused with `JobExpired` and it is removed. Default 10 minutes.
    pub job_ttl: Duration,
    /// How long a completed job is remembered, so that a late or restarted rank is refused with
    /// `JobComplete` instead of silently starting a new job under the same id. Connections still
    /// open then are closed. Default 60 seconds.
    pub finished_linger: Duration,
    /// How long a client may take to send its first complete frame, and to finish any frame it
    /// has started. A client silent between frames after registering is not timed out (it is
    /// waiting for its peers). Default 10 seconds.
    pub read_timeout: Duration,
    /// How long writing one frame to a client may take before the client is dropped as stuck.
    /// Default 10 seconds.
    pub write_timeout: Duration,
    /// How long after a `Connect` both ranks of the pair are told to start punching (carried in
    /// the `Punch` message as a delay, so that clocks need not agree). A little lead absorbs the
    /// difference in the two messages' delivery times. Default 10 ms.
    pub punch_lead: Duration,
    /// Requests to punch the same pair again within this interval are ignored (both ranks of a
    /// pair usually ask at once; a client cannot make the server flood its peer). Default 100 ms.
    pub punch_interval: Duration,
    /// How long a relay connection waits for the mirror connection of its pair before it is
    /// refused with `RelayTimeout`. Default 10 seconds.
    pub relay_timeout: Duration,
    /// Bytes buffered per direction of one relayed pair: the relay reads no more from a sender
    /// until the receiver has taken what is buffered, so a slow receiver back-pressures its
    /// sender through TCP flow control. Default 64 KiB.
    pub relay_buffer: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_jobs: 1024,
            max_ranks_per_job: 4096,
            max_connections: 8192,
            job_ttl: Duration::from_secs(600),
            finished_linger: Duration::from_secs(60),
            read_timeout: Duration::from_secs(10),
            write_timeout: Duration::from_secs(10),
            punch_lead: Duration::from_millis(10),
            punch_interval: Duration::from_millis(100),
            relay_timeout: Duration::from_secs(10),
            relay_buffer: 64 * 1024,
        }
    }
}
