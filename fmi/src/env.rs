//! Reading the job description from the environment (`FMI_*` variables).

use std::path::PathBuf;

use fmi_channels::{JobId, Rank};

use crate::{Error, Result};

/// The job description a launcher (`fmi run`, a Lambda handler) puts in the environment.
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct EnvSettings {
    /// `FMI_RANK`.
    pub rank: Rank,
    /// `FMI_SIZE`.
    pub size: u32,
    /// `FMI_JOB`.
    pub job: JobId,
    /// `FMI_CONFIG`, if set.
    pub config: Option<PathBuf>,
    /// `FMI_RENDEZVOUS`, if set.
    pub rendezvous: Option<String>,
    /// `FMI_TOKEN`, if set. Never printed by `Debug` of the communicator or in errors.
    pub token: Option<String>,
    /// `FMI_CHANNEL`, if set: forces every operation onto one named channel.
    pub channel: Option<String>,
    /// `FMI_NAT`: whether the TCP channel traverses NATs (default [`NatMode::Auto`]).
    pub nat: NatMode,
    /// `FMI_PRINT_PATHS` (`1`, `true` or `yes`): print how each peer was reached when the TCP
    /// channel closes (see [`Communicator::paths`](crate::Communicator::paths)).
    pub print_paths: bool,
    /// `FMI_STUN`, if set: comma-separated STUN servers (`host:port`), overriding the
    /// configuration's `[direct] stun`.
    pub stun: Option<Vec<String>>,
    /// `FMI_SPIN_US`, if set: the TCP channel's receive spin window in µs, overriding the
    /// configuration's `[direct] spin_us` (0: never spin).
    pub spin_us: Option<u64>,
    /// `FMI_LONG_WAIT_US`, if set: how long (µs) the TCP channel's `recv_into` of a long message
    /// waits before it sleeps, overriding the configuration's `[direct] long_wait_us`.
    pub long_wait_us: Option<u64>,
    /// `FMI_LOCAL_SOCKET_BUFFER`, if set: the TCP channel's socket buffer in bytes for peers on
    /// the same host, overriding the configuration's `[direct] local_socket_buffer` (0: the
    /// kernel's autotuning).
    pub local_socket_buffer: Option<usize>,
    /// `FMI_DIRECT_TRANSPORT` (`tcp` or `quic`), if set: overrides the configuration's
    /// `[direct] transport`.
    pub transport: Option<crate::config::DirectTransport>,
}

/// `FMI_NAT`: whether and how the TCP channel traverses NATs (docs/nat.md).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum NatMode {
    /// `auto` (default): traversal unless the rendezvous server is on loopback.
    #[default]
    Auto,
    /// `on`: always traverse (punch, then relay).
    On,
    /// `off`: plain dials of the peers' listeners only.
    Off,
    /// `relay`: every pair through the rendezvous server's relay (for testing).
    RelayOnly,
}

impl NatMode {
    /// Parses an `FMI_NAT` value (`None` or empty: `auto`).
    pub fn parse(value: Option<&str>) -> Result<NatMode> {
        match value.map(str::trim) {
            None | Some("") | Some("auto") => Ok(NatMode::Auto),
            Some("on") | Some("1") => Ok(NatMode::On),
            Some("off") | Some("0") => Ok(NatMode::Off),
            Some("relay") => Ok(NatMode::RelayOnly),
            Some(other) => Err(Error::InvalidEnv {
                var: "FMI_NAT",
                value: other.to_owned(),
                expected: "auto, on, off or relay".to_owned(),
            }),
        }
    }

    /// Whether to traverse NATs with a rendezvous server at `server`.
    pub fn enabled(self, server: std::net::SocketAddr) -> bool {
        match self {
            NatMode::Auto => !server.ip().is_loopback(),
            NatMode::On | NatMode::RelayOnly => true,
            NatMode::Off => false,
        }
    }
}

impl std::fmt::Debug for EnvSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The token is a secret: show only whether there is one.
        f.debug_struct("EnvSettings")
            .field("rank", &self.rank)
            .field("size", &self.size)
            .field("job", &self.job)
            .field("config", &self.config)
            .field("rendezvous", &self.rendezvous)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("channel", &self.channel)
            .field("nat", &self.nat)
            .field("print_paths", &self.print_paths)
            .field("spin_us", &self.spin_us)
            .field("long_wait_us", &self.long_wait_us)
            .field("local_socket_buffer", &self.local_socket_buffer)
            .field("stun", &self.stun)
            .field("transport", &self.transport)
            .finish()
    }
}

const HINT_RUN: &str = "start the program with `fmi run -n N -- PROGRAM`, or set it yourself";

impl EnvSettings {
    /// Settings given explicitly rather than read from the environment (for bindings and
    /// launchers); set the optional fields afterwards. Validated like the variables.
    pub fn new(rank: u32, size: u32, job: &str) -> Result<EnvSettings> {
        let (rank, size) = (rank.to_string(), size.to_string());
        EnvSettings::from_lookup(|k| match k {
            "FMI_RANK" => Some(rank.clone()),
            "FMI_SIZE" => Some(size.clone()),
            "FMI_JOB" => Some(job.to_owned()),
            _ => None,
        })
    }

    /// Reads the process environment.
    pub fn from_process() -> Result<EnvSettings> {
        EnvSettings::from_lookup(|k| std::env::var(k).ok())
    }

    /// Reads the variables through `get` (for tests and embedders).
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<EnvSettings> {
        let required = |var: &'static str| {
            get(var)
                .filter(|v| !v.trim().is_empty())
                .ok_or(Error::MissingEnv {
                    var,
                    hint: HINT_RUN,
                })
        };
        let number = |var: &'static str, expected: &str| -> Result<u32> {
            let v = required(var)?;
            v.trim().parse::<u32>().map_err(|_| Error::InvalidEnv {
                var,
                value: v.clone(),
                expected: expected.to_owned(),
            })
        };
        let size = number("FMI_SIZE", "a whole number of ranks, at least 1")?;
        if size == 0 {
            return Err(Error::InvalidEnv {
                var: "FMI_SIZE",
                value: "0".into(),
                expected: "a whole number of ranks, at least 1".into(),
            });
        }
        let rank = number("FMI_RANK", "a whole number in 0..FMI_SIZE")?;
        if rank >= size {
            return Err(Error::InvalidEnv {
                var: "FMI_RANK",
                value: rank.to_string(),
                expected: format!("a rank in 0..{size} (FMI_SIZE={size})"),
            });
        }
        let job_text = required("FMI_JOB")?;
        let job = JobId::new(job_text.clone()).map_err(|_| Error::InvalidEnv {
            var: "FMI_JOB",
            value: job_text,
            expected: "1 to 64 characters of [A-Za-z0-9._-]".into(),
        })?;
        let optional = |var: &str| get(var).filter(|v| !v.trim().is_empty());
        // An optional whole number; `expected` says what it counts.
        let number = |var: &'static str, expected: &str| -> Result<Option<u64>> {
            optional(var)
                .map(|v| {
                    v.trim().parse::<u64>().map_err(|_| Error::InvalidEnv {
                        var,
                        value: v.clone(),
                        expected: expected.into(),
                    })
                })
                .transpose()
        };
        let spin_us = number(
            "FMI_SPIN_US",
            "a whole number of microseconds (0: never spin)",
        )?;
        let long_wait_us = number("FMI_LONG_WAIT_US", "a whole number of microseconds")?;
        let local_socket_buffer = number(
            "FMI_LOCAL_SOCKET_BUFFER",
            "a whole number of bytes (0: the kernel's autotuning)",
        )?
        .map(|b| usize::try_from(b).unwrap_or(usize::MAX));
        Ok(EnvSettings {
            rank: Rank(rank),
            size,
            job,
            config: optional("FMI_CONFIG").map(PathBuf::from),
            rendezvous: optional("FMI_RENDEZVOUS"),
            token: optional("FMI_TOKEN"),
            channel: optional("FMI_CHANNEL"),
            nat: NatMode::parse(get("FMI_NAT").as_deref())?,
            print_paths: get("FMI_PRINT_PATHS")
                .is_some_and(|v| matches!(v.trim(), "1" | "true" | "yes")),
            stun: optional("FMI_STUN").map(|v| {
                v.split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned)
                    .collect()
            }),
            spin_us,
            long_wait_us,
            local_socket_buffer,
            transport: crate::config::DirectTransport::parse(
                get("FMI_DIRECT_TRANSPORT").as_deref(),
            )?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> Result<EnvSettings> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        EnvSettings::from_lookup(|k| map.get(k).cloned())
    }

    #[test]
    fn reads_a_complete_environment() {
        let e = env(&[
            ("FMI_RANK", "2"),
            ("FMI_SIZE", "4"),
            ("FMI_JOB", "j1"),
            ("FMI_RENDEZVOUS", "127.0.0.1:7000"),
        ])
        .expect("complete");
        assert_eq!(e.rank, Rank(2));
        assert_eq!(e.size, 4);
        assert_eq!(e.rendezvous.as_deref(), Some("127.0.0.1:7000"));
        assert_eq!(e.config, None);
        assert_eq!(e.nat, NatMode::Auto);
        assert!(!e.print_paths);
    }

    #[test]
    fn spin_window_parses_and_refuses_garbage() {
        let base = [("FMI_RANK", "0"), ("FMI_SIZE", "2"), ("FMI_JOB", "j")];
        let with = |extra: (&str, &str)| {
            let mut v = base.to_vec();
            v.push(extra);
            env(&v)
        };
        assert_eq!(
            with(("FMI_SPIN_US", " 0 ")).expect("valid").spin_us,
            Some(0)
        );
        assert_eq!(with(("FMI_SPIN_US", "")).expect("unset").spin_us, None);
        match with(("FMI_SPIN_US", "-5")) {
            Err(Error::InvalidEnv { var, .. }) => assert_eq!(var, "FMI_SPIN_US"),
            other => panic!("expected InvalidEnv, got {other:?}"),
        }
        assert_eq!(
            with(("FMI_LONG_WAIT_US", "500"))
                .expect("valid")
                .long_wait_us,
            Some(500)
        );
        match with(("FMI_LONG_WAIT_US", "2ms")) {
            Err(Error::InvalidEnv { var, .. }) => assert_eq!(var, "FMI_LONG_WAIT_US"),
            other => panic!("expected InvalidEnv, got {other:?}"),
        }
        let buffer = with(("FMI_LOCAL_SOCKET_BUFFER", "65536")).expect("valid");
        assert_eq!(buffer.local_socket_buffer, Some(65536));
        match with(("FMI_LOCAL_SOCKET_BUFFER", "64k")) {
            Err(Error::InvalidEnv { var, .. }) => assert_eq!(var, "FMI_LOCAL_SOCKET_BUFFER"),
            other => panic!("expected InvalidEnv, got {other:?}"),
        }
    }

    #[test]
    fn nat_variables_parse() {
        let base = [("FMI_RANK", "0"), ("FMI_SIZE", "2"), ("FMI_JOB", "j")];
        let with = |extra: &[(&str, &str)]| {
            let mut v = base.to_vec();
            v.extend_from_slice(extra);
            env(&v)
        };
        let e = with(&[
            ("FMI_NAT", "relay"),
            ("FMI_PRINT_PATHS", "1"),
            ("FMI_STUN", "203.0.113.1:3478, 203.0.113.2:3478"),
        ])
        .expect("valid");
        assert_eq!(
            e.stun.as_deref(),
            Some(&["203.0.113.1:3478".to_owned(), "203.0.113.2:3478".to_owned()][..])
        );
        assert_eq!(e.nat, NatMode::RelayOnly);
        assert!(e.print_paths);
        assert_eq!(with(&[("FMI_NAT", "off")]).expect("off").nat, NatMode::Off);
        assert_eq!(e.transport, None);
        assert_eq!(
            with(&[("FMI_DIRECT_TRANSPORT", "quic")])
                .expect("quic")
                .transport,
            Some(crate::config::DirectTransport::Quic)
        );
        let bad = with(&[("FMI_DIRECT_TRANSPORT", "sctp")]).expect_err("bad value");
        assert!(bad.to_string().contains("FMI_DIRECT_TRANSPORT"), "{bad}");
        let bad = with(&[("FMI_NAT", "sometimes")]).expect_err("bad value");
        assert!(bad.to_string().contains("FMI_NAT"), "{bad}");
        let lo: std::net::SocketAddr = "127.0.0.1:9".parse().expect("addr");
        let far: std::net::SocketAddr = "203.0.113.1:9".parse().expect("addr");
        assert!(!NatMode::Auto.enabled(lo) && NatMode::Auto.enabled(far));
        assert!(NatMode::RelayOnly.enabled(lo) && !NatMode::Off.enabled(far));
    }

    #[test]
    fn errors_name_the_variable() {
        let cases: &[(&[(&str, &str)], &str)] = &[
            (&[("FMI_SIZE", "4"), ("FMI_JOB", "j")], "FMI_RANK"),
            (&[("FMI_RANK", "0"), ("FMI_JOB", "j")], "FMI_SIZE"),
            (&[("FMI_RANK", "0"), ("FMI_SIZE", "2")], "FMI_JOB"),
            (
                &[("FMI_RANK", "4"), ("FMI_SIZE", "4"), ("FMI_JOB", "j")],
                "FMI_RANK",
            ),
            (
                &[("FMI_RANK", "0"), ("FMI_SIZE", "0"), ("FMI_JOB", "j")],
                "FMI_SIZE",
            ),
            (
                &[("FMI_RANK", "x"), ("FMI_SIZE", "2"), ("FMI_JOB", "j")],
                "FMI_RANK",
            ),
            (
                &[("FMI_RANK", "0"), ("FMI_SIZE", "2"), ("FMI_JOB", "a/b")],
                "FMI_JOB",
            ),
        ];
        for (vars, name) in cases {
            let msg = env(vars).expect_err("invalid").to_string();
            assert!(msg.contains(name), "{vars:?}: {msg}");
        }
    }
}
