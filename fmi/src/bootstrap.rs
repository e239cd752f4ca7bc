//! Turning an [`EnvSettings`] into a connected communicator.
//!
//! ```text
//!  FMI_* variables ─▶ bind a TCP listener (port 0) ─▶ register (job, rank, size, endpoint, token)
//!        with the rendezvous server ─▶ peer table ─▶ TcpChannel::start ─▶ Communicator
//! ```
//!
//! ## NAT traversal
//! When the rendezvous server is not on loopback (ranks on different hosts, possibly behind
//! NATs), the rank *joins* instead of registering: its rendezvous connection stays attached and
//! the TCP channel is started with NAT traversal (hole punching from that connection's port,
//! relay fallback through the server; see `docs/nat.md`). Two variables steer it (read from the
//! process environment):
//!
//! | variable | values |
//! |---|---|
//! | `FMI_NAT` | `auto` (default: traversal unless the server is on loopback), `on`, `off`, `relay` (every pair through the relay; for testing) |
//! | `FMI_PRINT_PATHS` | `1`: when the channel closes, print `fmi-paths: rank R: P=direct Q=punched S=relayed; stray sockets N` to stderr |

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

use fmi_channels::tcp::nat::NatConfig;
use fmi_channels::tcp::{TcpChannel, TcpConfig};
use fmi_channels::{Channel, Instant, Rank};
use fmi_rendezvous::{Endpoint, Registration, Token};

use crate::config::Config;
use crate::env::EnvSettings;
use crate::{Communicator, Error, Result};

/// The channel names `FMI_CHANNEL` / `fmi run --channel` accept in this build.
pub(crate) const CHANNELS: &[&str] = &["tcp"];

/// Builds the communicator the environment describes.
///
/// The channel is, in order: `FMI_CHANNEL`; the configuration's `channel`; `tcp` when a
/// rendezvous server is given; the single storage channel the configuration sets up; and for a
/// job of one rank with none of these, the in-memory channel.
pub(crate) async fn connect(env: EnvSettings) -> Result<Communicator> {
    let config = match &env.config {
        Some(path) => Config::from_file(path)?,
        None => Config::default(),
    };
    let known: Vec<&str> = CHANNELS
        .iter()
        .chain(crate::storage::BACKENDS)
        .copied()
        .collect();
    let forced = env.channel.clone().map(|c| (c, "FMI_CHANNEL"));
    let chosen = forced.or_else(|| config.channel.clone().map(|c| (c, "channel")));
    if let Some((ch, var)) = &chosen {
        if !known.contains(&ch.as_str()) {
            let expected = format!("one of the channels of this build: {}", known.join(", "));
            return Err(if *var == "FMI_CHANNEL" {
                Error::InvalidEnv {
                    var: "FMI_CHANNEL",
                    value: ch.clone(),
                    expected,
                }
            } else {
                Error::Config {
                    path: env.config.as_ref().map(|p| p.display().to_string()),
                    detail: format!("channel = {ch:?}: expected {expected}"),
                }
            });
        }
    }
    let configured = config.channels.configured();
    let name = match chosen {
        Some((c, _)) => Some(c),
        None if env.rendezvous.is_some() => Some("tcp".to_owned()),
        None if configured.len() == 1 => Some(configured[0].to_owned()),
        None => None,
    };
    let primary: Arc<dyn Channel> = match name.as_deref() {
        Some(storage) if crate::storage::is_storage(storage) => {
            crate::storage::open(
                &config.channels,
                storage,
                env.job.clone(),
                env.rank,
                env.size,
            )
            .await
        }
        Some(_tcp) if env.size == 1 && env.rendezvous.is_none() => {
            // A forced channel is used even alone (`tcp`: an endpoint on loopback that only
            // talks to itself), so that what runs is what was asked for.
            let binding = TcpChannel::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0))).await?;
            let me = binding.local_addr();
            let ch = TcpChannel::start(
                binding,
                env.job.clone(),
                Rank(0),
                vec![me],
                TcpConfig::default(),
            )?;
            Ok(Arc::new(ch) as Arc<dyn Channel>)
        }
        Some(_tcp) => open_tcp(&env, &config).await,
        None if env.size == 1 => {
            // A job of one rank needs no wire at all.
            let ch = fmi_channels::memory::world(env.job.clone(), 1)
                .pop()
                .ok_or(Error::InvalidArgument {
                    what: "a world needs at least one rank",
                })?;
            Ok(Arc::new(ch) as Arc<dyn Channel>)
        }
        None => Err(Error::MissingEnv {
            var: "FMI_RENDEZVOUS",
            hint: "a job of more than one rank needs a channel: the rendezvous server's \
                   host:port for tcp (`fmi run` sets it), or FMI_CHANNEL / a storage channel \
                   in FMI_CONFIG",
        }),
    }?;
    let mut builder = Communicator::builder()
        .config(config.clone())
        .shared_channel(Arc::clone(&primary));
    let Some(model_config) = config.model.clone().filter(|_| env.channel.is_none()) else {
        return Ok(builder.build());
    };
    // With a cost model, every configured channel is opened and each collective goes over the
    // one the model picks; every rank opens the same set, in the same order.
    let mut kinds = vec![crate::comm::channel_kind(primary.name())];
    if env.rendezvous.is_some() && primary.name() != "tcp" {
        builder = builder.extra_channel(open_tcp(&env, &config).await?);
        kinds.push(fmi_model::ChannelKind::Tcp);
    }
    for storage in config.channels.configured() {
        if storage != primary.name() {
            let ch = crate::storage::open(
                &config.channels,
                storage,
                env.job.clone(),
                env.rank,
                env.size,
            )
            .await?;
            kinds.push(crate::comm::channel_kind(storage));
            builder = builder.extra_channel(ch);
        }
    }
    let model = fmi_model::Model::new(model_config, &kinds).map_err(|e| Error::Config {
        path: env.config.as_ref().map(|p| p.display().to_string()),
        detail: format!("[model]: {e}"),
    })?;
    let comm = builder.model(model).build();
    check_agreement(&comm).await?;
    Ok(comm)
}

/// Fails at start, naming a rank, when the ranks' models or channel sets differ: otherwise they
/// would wait for each other on different channels until the deadline.
async fn check_agreement(comm: &Communicator) -> Result<()> {
    let mine = comm.model().map_or(0, fmi_model::Model::hash);
    let all = comm.allgather(&[mine]).await?;
    match all.iter().position(|&h| h != mine) {
        None => Ok(()),
        Some(other) => Err(Error::Config {
            path: None,
            detail: format!(
                "rank {} and rank {other} have different cost models or channels (model hashes \
                 {mine:016x} and {:016x}); give every rank the same configuration file",
                comm.rank(),
                all[other]
            ),
        }),
    }
}

async fn open_tcp(env: &EnvSettings, config: &Config) -> Result<Arc<dyn Channel>> {
    let Some(rendezvous) = env.rendezvous.clone() else {
        return Err(Error::MissingEnv {
            var: "FMI_RENDEZVOUS",
            hint: "the tcp channel needs the rendezvous server's host:port; `fmi run` sets it",
        });
    };
    let server = resolve(&rendezvous).await?;
    let deadline = Instant::now() + config.deadline;
    let nat = NatMode::from_env()?;
    let tcp = TcpConfig {
        report_paths: print_paths(),
        ..TcpConfig::default()
    };
    Ok(Arc::new(join_tcp(env, server, deadline, tcp, nat).await?))
}

async fn resolve(text: &str) -> Result<SocketAddr> {
    let invalid = |why: &str| Error::InvalidEnv {
        var: "FMI_RENDEZVOUS",
        value: text.to_owned(),
        expected: format!("host:port of the rendezvous server ({why})"),
    };
    let mut addrs = tokio::net::lookup_host(text)
        .await
        .map_err(|e| invalid(&e.to_string()))?;
    addrs
        .next()
        .ok_or_else(|| invalid("the name has no address"))
}

/// The address peers can reach this process at: loopback when the rendezvous server is on
/// loopback (every rank is on this machine), otherwise the local address of the interface that
/// routes to the server (found with an unsent UDP `connect`, which only consults the routing
/// table).
fn advertised_ip(server: SocketAddr) -> IpAddr {
    if server.ip().is_loopback() {
        return server.ip();
    }
    let any: SocketAddr = match server {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    std::net::UdpSocket::bind(any)
        .and_then(|s| s.connect(server).and_then(|()| s.local_addr()))
        .map(|a| a.ip())
        .unwrap_or(any.ip())
}

/// `FMI_NAT`: whether and how the TCP channel traverses NATs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum NatMode {
    Auto,
    On,
    Off,
    RelayOnly,
}

impl NatMode {
    fn from_env() -> Result<NatMode> {
        Self::parse(std::env::var("FMI_NAT").ok().as_deref())
    }

    fn parse(value: Option<&str>) -> Result<NatMode> {
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
    fn enabled(self, server: SocketAddr) -> bool {
        match self {
            NatMode::Auto => !server.ip().is_loopback(),
            NatMode::On | NatMode::RelayOnly => true,
            NatMode::Off => false,
        }
    }
}

/// `FMI_PRINT_PATHS=1`.
fn print_paths() -> bool {
    std::env::var("FMI_PRINT_PATHS").is_ok_and(|v| matches!(v.trim(), "1" | "true" | "yes"))
}

async fn join_tcp(
    env: &EnvSettings,
    server: SocketAddr,
    deadline: Instant,
    mut tcp: TcpConfig,
    nat: NatMode,
) -> Result<TcpChannel> {
    let me = env.rank;
    let bootstrap =
        |missing: Vec<Rank>, source: Box<dyn std::error::Error + Send + Sync>| Error::Bootstrap {
            me,
            missing,
            source,
        };
    let ip = advertised_ip(server);
    let bind_ip = if ip.is_loopback() {
        ip
    } else {
        IpAddr::V4(Ipv4Addr::UNSPECIFIED)
    };
    let binding = TcpChannel::bind(SocketAddr::new(bind_ip, 0)).await?;
    let endpoint = SocketAddr::new(ip, binding.local_addr().port());
    let token = Token::new(env.token.clone().unwrap_or_default().into_bytes())
        .map_err(|e| bootstrap(Vec::new(), Box::new(e)))?;
    let registration = Registration {
        job: env.job.clone(),
        rank: me.0,
        size: env.size,
        endpoints: vec![Endpoint::from(endpoint)],
        token,
    };
    let joined = if nat.enabled(server) {
        fmi_rendezvous::join(server, registration, deadline).await
    } else {
        fmi_rendezvous::register(server, registration, deadline)
            .await
            .map(|table| fmi_rendezvous::Joined {
                table,
                session: None,
            })
    };
    let fmi_rendezvous::Joined { table, session } = joined.map_err(|e| {
        let missing = match &e {
            fmi_rendezvous::Error::Timeout { missing, .. } => {
                missing.iter().map(|&r| Rank(r)).collect()
            }
            _ => Vec::new(),
        };
        bootstrap(missing, Box::new(e))
    })?;
    let mut peers = Vec::with_capacity(env.size as usize);
    for (rank, endpoints) in table.iter() {
        let addr = endpoints
            .iter()
            .find_map(|e| e.as_str().parse::<SocketAddr>().ok())
            .ok_or_else(|| {
                bootstrap(
                    Vec::new(),
                    format!("rank {rank} registered no usable TCP endpoint").into(),
                )
            })?;
        peers.push(addr);
    }
    match session {
        Some(session) => {
            if nat == NatMode::RelayOnly {
                tcp.nat = NatConfig {
                    direct: false,
                    punch: false,
                    ..NatConfig::default()
                };
            }
            let traversal = session.into_traversal();
            TcpChannel::start_with_traversal(binding, env.job.clone(), me, peers, tcp, traversal)
        }
        None => TcpChannel::start(binding, env.job.clone(), me, peers, tcp),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alone(channel: Option<&str>) -> EnvSettings {
        EnvSettings::from_lookup(|var| {
            match var {
                "FMI_RANK" => Some("0"),
                "FMI_SIZE" => Some("1"),
                "FMI_JOB" => Some("alone"),
                "FMI_CHANNEL" => channel,
                _ => None,
            }
            .map(str::to_owned)
        })
        .expect("a valid environment")
    }

    #[test]
    fn a_single_rank_uses_the_forced_channel() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let comm = connect(alone(None)).await.expect("memory");
            assert_eq!(comm.channel_name(), "memory");
            let comm = connect(alone(Some("tcp"))).await.expect("tcp");
            assert_eq!(comm.channel_name(), "tcp");
            let sum = comm
                .allreduce(&[5u32], crate::Op::Sum)
                .await
                .expect("alone");
            assert_eq!(sum, [5]);
            let msg = connect(alone(Some("bogus"))).await.expect_err("unknown");
            assert!(msg.to_string().contains("FMI_CHANNEL"), "{msg}");
        });
    }

    #[test]
    fn nat_modes_parse_and_default_to_auto() {
        let lo: SocketAddr = "127.0.0.1:9".parse().expect("addr");
        let far: SocketAddr = "203.0.113.1:9".parse().expect("addr");
        let auto = NatMode::parse(None).expect("default");
        assert!(!auto.enabled(lo) && auto.enabled(far));
        assert!(NatMode::parse(Some("relay")).expect("relay").enabled(lo));
        assert!(!NatMode::parse(Some("off")).expect("off").enabled(far));
        let bad = NatMode::parse(Some("sometimes")).expect_err("bad value");
        assert!(bad.to_string().contains("FMI_NAT"), "{bad}");
    }
}
