//! Communicator configuration, from code or from a TOML file (`FMI_CONFIG`).
//!
//! ```toml
//! deadline_secs = 60          # default deadline of every blocking call
//! abort_on_peer_failure = true  # a peer failure ends the job on every rank (see below)
//!
//! [collectives]               # algorithm selection; every rank must use the same values
//! bcast_large_bytes = 12288   # bcast of at least this size (and >= bcast_large_min_ranks ranks)
//! bcast_large_min_ranks = 8   #   uses scatter + allgather, else a binomial tree
//! allreduce_large_bytes = 2048        # above: large_allreduce, else recursive doubling
//! large_allreduce = "rabenseifner"    # or "ring", "recursive_doubling"
//! allgather_ring_bytes = 524288       # total bytes from which allgather uses the ring
//! force_bcast = "binomial"            # optional: "binomial" | "scatter_allgather"
//! force_allreduce = "ring"            # optional: "recursive_doubling" | "rabenseifner" | "ring"
//! force_allgather = "ring"            # optional: "recursive_doubling" | "ring"
//! ```
//!
//! Storage channels are configured in the same file (see docs/configuration.md):
//!
//! ```toml
//! channel = "redis"           # default channel when FMI_CHANNEL / --channel is not given
//! [channels.redis]
//! url = "redis://127.0.0.1:6379"
//! [channels.s3]               # feature "aws"
//! bucket = "my-bucket"
//! [channels.dynamodb]         # feature "aws"
//! table = "fmi"
//! [storage]                   # how the storage adapter polls and retries
//! poll_initial_ms = 100
//! ```
//!
//! The RDMA channel (feature `rdma`, see docs/rdma.md) reads:
//!
//! ```toml
//! [rdma]
//! provider = "tcp;ofi_rxm"    # libfabric provider; default: the best available
//! domain = "lo"               # libfabric domain (NIC or interface); default: the first
//! eager_max = 16384           # larger messages go by rendezvous + RMA read
//! spin_us = 1000              # a waiting receive polls the queue itself this long
//!                             # (default: 1000 while the host's ranks fit its cores, else 0)
//! ```
//!
//! Unknown keys are errors, so a typo cannot silently fall back to a default.

use std::path::Path;
use std::time::Duration;

use fmi_collectives::{AllgatherAlgorithm, AllreduceAlgorithm, BcastAlgorithm};
use serde::Deserialize;

use crate::{Error, Result};

/// Everything a communicator can be configured with. `Config::default()` is a working setup.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct Config {
    /// The default deadline of every blocking call (60 s).
    pub deadline: Duration,
    /// Whether an operation that fails because of a peer (`PeerLost`, or a collective's
    /// `Timeout`; a point-to-point `Timeout` is left to the caller) aborts the job: the communicator's channels tell the other ranks (`Channel::abort`), whose pending
    /// and later operations then fail with `PeerLost` naming that peer, and this rank's later
    /// operations fail the same way (`abort_on_peer_failure`; default true, as MPI's default
    /// error handler makes every error fatal). Set it to false to go on with the ranks left
    /// after a peer failed: nothing is propagated then, and ranks waiting for a failed rank
    /// only learn of it from their own deadline.
    pub abort_on_peer_failure: bool,
    /// Collective algorithm selection.
    pub collectives: fmi_collectives::Config,
    /// The channel used when `FMI_CHANNEL` does not name one (`channel = "..."`).
    pub channel: Option<String>,
    /// Storage channel settings (`[channels.*]`, `[storage]`).
    pub channels: crate::storage::ChannelsConfig,
    /// The cost model (`[model]`, see docs/model.md). When set and no channel is forced, the
    /// communicator opens every configured channel and sends each collective whose size every
    /// rank knows over the one the model picks for the objective; on that channel (or on a
    /// forced one) the collective runs the algorithm the model picks, unless `[collectives]`
    /// forces one.
    pub model: Option<fmi_model::ModelConfig>,
    /// RDMA channel settings (`[rdma]`; used by builds with the `rdma` feature).
    pub rdma: RdmaSettings,
    /// The direct (TCP) channel's NAT traversal settings (`[direct]`, see docs/nat.md).
    pub direct: DirectConfig,
}

/// `[direct]`: the direct (TCP) channel: NAT traversal (docs/nat.md) and receive spinning.
///
/// ```toml
/// [direct]
/// stun = ["stun1.example.org:3478", "stun2.example.org:3478"]   # STUN servers (RFC 5389)
/// spin_us = 50                                                   # receive spin window
/// long_wait_us = 2000                                            # a long recv_into's wait before it sleeps
/// local_socket_buffer = 262144                                   # same-host socket buffers (0: off)
/// transport = "quic"                                             # "tcp" (default) or "quic"
/// fallback = "redis"                                             # storage for pairs that cannot connect
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct DirectConfig {
    /// STUN servers (`host:port`) a rank asks for its public mapping before it joins; with two
    /// or more (different addresses or ports) it learns whether its NAT maps
    /// endpoint-independently, and skips hole punching (straight to the relay) when it does not.
    /// `FMI_STUN` (comma-separated) overrides it. Default: none (no STUN).
    #[serde(default)]
    pub stun: Vec<String>,
    /// How long, in µs, a receive waiting for a connected peer spins before it sleeps (see
    /// `TcpConfig::spin`); 0 never spins. `FMI_SPIN_US` overrides it. Default: 50.
    #[serde(default)]
    pub spin_us: Option<u64>,
    /// How long, in µs, a `recv_into` of a long message (16 KiB or more) waits for it before it
    /// sleeps while the job's ranks on this host fit its cores, yielding between reads after the
    /// spin window (see `TcpConfig::long_wait`). `FMI_LONG_WAIT_US` overrides it. Default: 2000.
    #[serde(default)]
    pub long_wait_us: Option<u64>,
    /// Send and receive buffer in bytes of TCP connections to ranks on the same host (see
    /// `TcpConfig::local_socket_buffer`); 0 leaves the kernel's autotuning.
    /// `FMI_LOCAL_SOCKET_BUFFER` overrides it. Default: 0 (off).
    #[serde(default)]
    pub local_socket_buffer: Option<usize>,
    /// What the direct and punched paths run over: `tcp` (default) or `quic` (encrypted, peers
    /// pinned by certificate; docs/nat.md). The relay is TCP either way. Every rank of a job
    /// must use the same. `FMI_DIRECT_TRANSPORT` overrides it.
    #[serde(default)]
    pub transport: DirectTransport,
    /// A storage channel (`redis`, `s3`, `dynamodb`; configured under `[channels.*]`) that
    /// carries the connection of a pair that cannot connect otherwise, instead of the relay
    /// (docs/nat.md, "Storage fallback"). Needs NAT traversal (a rendezvous server that is
    /// not on loopback, or `FMI_NAT=on`). Default: none (the relay).
    #[serde(default)]
    pub fallback: Option<String>,
}

/// `[direct] transport` / `FMI_DIRECT_TRANSPORT`: what the direct channel's pairs run over.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum DirectTransport {
    /// TCP connections (default).
    #[default]
    Tcp,
    /// QUIC (quinn) over one UDP socket per rank, TLS 1.3 with pinned certificates.
    Quic,
}

impl DirectTransport {
    /// Parses a `FMI_DIRECT_TRANSPORT` value (`tcp` or `quic`; `None` or empty: not set).
    pub fn parse(value: Option<&str>) -> Result<Option<DirectTransport>> {
        match value.map(str::trim) {
            None | Some("") => Ok(None),
            Some("tcp") => Ok(Some(DirectTransport::Tcp)),
            Some("quic") => Ok(Some(DirectTransport::Quic)),
            Some(other) => Err(crate::Error::InvalidEnv {
                var: "FMI_DIRECT_TRANSPORT",
                value: other.to_owned(),
                expected: "tcp or quic".to_owned(),
            }),
        }
    }
}

/// `[rdma]`: settings of the libfabric channel (see docs/rdma.md). Parsed in every build so
/// that one configuration file is valid everywhere.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct RdmaSettings {
    /// The libfabric provider (`"shm"`, `"tcp;ofi_rxm"`, `"verbs;ofi_rxm"`, `"efa"`, `"cxi"`);
    /// `None`: the best available. `FMI_RDMA_PROVIDER` overrides it.
    pub provider: Option<String>,
    /// The libfabric domain: a NIC, or for `tcp;ofi_rxm` a network interface (`"lo"`);
    /// `None`: the provider's first. `FMI_RDMA_DOMAIN` overrides it.
    pub domain: Option<String>,
    /// Messages up to this many bytes are sent eagerly (default 16 KiB).
    pub eager_max: Option<usize>,
    /// How long, in µs, a waiting receive polls the completion queue itself before it sleeps
    /// (`RdmaConfig::spin`); 0 never spins. `FMI_SPIN_US` overrides it. Default: 1000 while the
    /// job's ranks on this host do not outnumber its cores, else 0 (`fmi_rdma::channel::auto_spin`).
    pub spin_us: Option<u64>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            deadline: Duration::from_secs(60),
            abort_on_peer_failure: true,
            collectives: fmi_collectives::Config::default(),
            channel: None,
            channels: crate::storage::ChannelsConfig::default(),
            model: None,
            rdma: RdmaSettings::default(),
            direct: DirectConfig::default(),
        }
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct File {
    deadline_secs: Option<f64>,
    abort_on_peer_failure: Option<bool>,
    #[serde(default)]
    collectives: CollectivesFile,
    channel: Option<String>,
    channels: Option<toml::Table>,
    storage: Option<toml::Value>,
    model: Option<toml::Value>,
    rdma: Option<RdmaSettings>,
    direct: Option<DirectConfig>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct CollectivesFile {
    bcast_large_bytes: Option<usize>,
    bcast_large_min_ranks: Option<u32>,
    allreduce_large_bytes: Option<usize>,
    large_allreduce: Option<AllreduceName>,
    allgather_ring_bytes: Option<usize>,
    force_bcast: Option<BcastName>,
    force_allreduce: Option<AllreduceName>,
    force_allgather: Option<AllgatherName>,
}

#[derive(Deserialize, Clone, Copy)]
#[serde(rename_all = "snake_case")]
enum BcastName {
    Binomial,
    ScatterAllgather,
}

#[derive(Deserialize, Clone, Copy)]
#[serde(rename_all = "snake_case")]
enum AllreduceName {
    RecursiveDoubling,
    Rabenseifner,
    Ring,
}

#[derive(Deserialize, Clone, Copy)]
#[serde(rename_all = "snake_case")]
enum AllgatherName {
    RecursiveDoubling,
    Ring,
}

impl From<BcastName> for BcastAlgorithm {
    fn from(n: BcastName) -> Self {
        match n {
            BcastName::Binomial => BcastAlgorithm::Binomial,
            BcastName::ScatterAllgather => BcastAlgorithm::ScatterAllgather,
        }
    }
}

impl From<AllreduceName> for AllreduceAlgorithm {
    fn from(n: AllreduceName) -> Self {
        match n {
            AllreduceName::RecursiveDoubling => AllreduceAlgorithm::RecursiveDoubling,
            AllreduceName::Rabenseifner => AllreduceAlgorithm::Rabenseifner,
            AllreduceName::Ring => AllreduceAlgorithm::Ring,
        }
    }
}

impl From<AllgatherName> for AllgatherAlgorithm {
    fn from(n: AllgatherName) -> Self {
        match n {
            AllgatherName::RecursiveDoubling => AllgatherAlgorithm::RecursiveDoubling,
            AllgatherName::Ring => AllgatherAlgorithm::Ring,
        }
    }
}

impl Config {
    /// Parses a configuration from TOML text. `origin` names the source in errors.
    pub fn from_toml(text: &str, origin: Option<&str>) -> Result<Config> {
        let err = |detail: String| Error::Config {
            path: origin.map(str::to_owned),
            detail,
        };
        let file: File = toml::from_str(text).map_err(|e| err(e.to_string()))?;
        let mut cfg = Config::default();
        if let Some(s) = file.deadline_secs {
            if !(s.is_finite() && s > 0.0 && s < 1e9) {
                return Err(err(format!(
                    "deadline_secs = {s}: must be a positive number of seconds"
                )));
            }
            cfg.deadline = Duration::from_secs_f64(s);
        }
        if let Some(v) = file.abort_on_peer_failure {
            cfg.abort_on_peer_failure = v;
        }
        let c = file.collectives;
        let col = &mut cfg.collectives;
        if let Some(v) = c.bcast_large_bytes {
            col.bcast_large_bytes = v;
        }
        if let Some(v) = c.bcast_large_min_ranks {
            col.bcast_large_min_ranks = v;
        }
        if let Some(v) = c.allreduce_large_bytes {
            col.allreduce_large_bytes = v;
        }
        if let Some(v) = c.large_allreduce {
            col.large_allreduce = v.into();
        }
        if let Some(v) = c.allgather_ring_bytes {
            col.allgather_ring_bytes = v;
        }
        col.force.bcast = c.force_bcast.map(Into::into);
        col.force.allreduce = c.force_allreduce.map(Into::into);
        col.force.allgather = c.force_allgather.map(Into::into);
        cfg.channel = file.channel;
        cfg.rdma = file.rdma.unwrap_or_default();
        cfg.direct = file.direct.unwrap_or_default();
        if file.model.is_some() {
            // The model also reads the adapter settings ([storage], [channels.*]) so that its
            // predictions use the chunk sizes and polls the channels will really use.
            // A relative `[model] profile` is relative to the configuration file's folder.
            let dir = origin.and_then(|o| Path::new(o).parent());
            let job =
                fmi_model::JobConfig::from_toml_in(text, dir).map_err(|e| err(e.to_string()))?;
            cfg.model = Some(job.model);
        }
        cfg.channels =
            crate::storage::ChannelsConfig::parse(file.channels, file.storage).map_err(err)?;
        Ok(cfg)
    }

    /// Reads a configuration file.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Config> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| Error::Config {
            path: Some(path.display().to_string()),
            detail: format!("cannot read the file: {e}"),
        })?;
        Config::from_toml(&text, Some(&path.display().to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_key() {
        let cfg = Config::from_toml(
            r#"
            deadline_secs = 2.5
            abort_on_peer_failure = false
            [collectives]
            bcast_large_bytes = 1
            bcast_large_min_ranks = 2
            allreduce_large_bytes = 3
            large_allreduce = "ring"
            allgather_ring_bytes = 4
            force_bcast = "scatter_allgather"
            force_allreduce = "rabenseifner"
            force_allgather = "ring"
            "#,
            None,
        )
        .expect("valid config");
        assert_eq!(cfg.deadline, Duration::from_millis(2500));
        assert!(!cfg.abort_on_peer_failure);
        assert!(Config::default().abort_on_peer_failure);
        assert_eq!(cfg.collectives.large_allreduce, AllreduceAlgorithm::Ring);
        assert_eq!(
            cfg.collectives.force.bcast,
            Some(BcastAlgorithm::ScatterAllgather)
        );
        assert_eq!(cfg.collectives.allgather_ring_bytes, 4);
    }

    #[test]
    fn unknown_keys_and_bad_values_are_errors() {
        let e = Config::from_toml("deadline = 3", Some("x.toml")).expect_err("unknown key");
        let msg = e.to_string();
        assert!(msg.contains("x.toml") && msg.contains("deadline"), "{msg}");
        assert!(Config::from_toml("deadline_secs = -1", None).is_err());
        assert!(Config::from_toml("[collectives]\nforce_bcast = \"magic\"", None).is_err());
        let direct =
            Config::from_toml("[direct]\nstun = [\"127.0.0.1:3478\"]", None).expect("[direct]");
        assert_eq!(direct.direct.stun, ["127.0.0.1:3478"]);
        assert!(Config::from_toml("[direct]\nstunn = []", None).is_err());
        let spin = Config::from_toml("[direct]\nspin_us = 0", None).expect("spin_us");
        assert_eq!(spin.direct.spin_us, Some(0));
        assert_eq!(direct.direct.spin_us, None);
        assert!(Config::from_toml("[direct]\nspin_us = -1", None).is_err());
        let buffer = Config::from_toml("[direct]\nlocal_socket_buffer = 0", None).expect("buffer");
        assert_eq!(buffer.direct.local_socket_buffer, Some(0));
        let long = Config::from_toml("[direct]\nlong_wait_us = 500", None).expect("long wait");
        assert_eq!(long.direct.long_wait_us, Some(500));
        assert_eq!(direct.direct.local_socket_buffer, None);
        assert_eq!(direct.direct.transport, DirectTransport::Tcp);
        let quic = Config::from_toml("[direct]\ntransport = \"quic\"", None).expect("quic");
        assert_eq!(quic.direct.transport, DirectTransport::Quic);
        assert!(Config::from_toml("[direct]\ntransport = \"udp\"", None).is_err());
        let empty = Config::from_toml("", None).expect("empty is default");
        assert_eq!(empty.deadline, Config::default().deadline);
        assert_eq!(empty.collectives, Config::default().collectives);
        let e = Config::from_toml("[channels.carrier_pigeon]\nspeed = 1", None)
            .expect_err("unknown channel");
        assert!(e.to_string().contains("carrier_pigeon"), "{e}");
    }
}
