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
//! relay fallback through the server; see `docs/nat.md`). Two variables steer it (read into
//! [`EnvSettings::nat`] and [`EnvSettings::print_paths`]):
//!
//! | variable | values |
//! |---|---|
//! | `FMI_NAT` | `auto` (default: traversal unless the server is on loopback), `on`, `off`, `relay` (every pair through the relay; for testing) |
//! | `FMI_PRINT_PATHS` | `1`: when the channel closes, print `fmi-paths: rank R: P=direct Q=punched S=relayed; stray sockets N` to stderr (N: sockets left once the channel has shut down: a leak if not 0) |

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

use fmi_channels::tcp::nat::NatConfig;
use fmi_channels::tcp::quic::{Fingerprint, QuicBinding, QuicPeer};
use fmi_channels::tcp::{JobToken, QuicSetup, TcpChannel, TcpConfig};
use fmi_channels::{Channel, Instant, Rank};
use fmi_rendezvous::{Endpoint, Registration, Token};

use crate::config::{Config, DirectTransport};
use crate::env::{EnvSettings, NatMode};
use crate::{Communicator, Error, Result};

/// The channel names `FMI_CHANNEL` / `fmi run --channel` accept in this build.
#[cfg(not(feature = "rdma"))]
pub(crate) const CHANNELS: &[&str] = &["tcp"];
/// The channel names `FMI_CHANNEL` / `fmi run --channel` accept in this build.
#[cfg(feature = "rdma")]
pub(crate) const CHANNELS: &[&str] = &["tcp", "rdma"];

/// Builds the communicator the environment describes.
///
/// The channel is, in order: `FMI_CHANNEL`; the configuration's `channel`; `tcp` when a
/// rendezvous server is given; the single storage channel the configuration sets up; and for a
/// job of one rank with none of these, the in-memory channel.
pub(crate) async fn connect(env: EnvSettings) -> Result<Communicator> {
    let comm = connect_channels(env).await?;
    // `fmi run --report`: the rank's ledger is written when the communicator goes.
    comm.write_ledger_on_drop();
    Ok(comm)
}

async fn connect_channels(env: EnvSettings) -> Result<Communicator> {
    let mut config = match &env.config {
        Some(path) => Config::from_file(path)?,
        None => Config::default(),
    };
    // A storage channel records who failed because of whom when failures are propagated.
    config.channels.storage.record_failures = config.abort_on_peer_failure;
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
    // The S3 mailbox, shared with the S3 channel, for mixed-channel broadcasts.
    let mut staged = None;
    let primary: Arc<dyn Channel> = match name.as_deref() {
        Some(storage) if crate::storage::is_storage(storage) => crate::mixed::open_storage(
            &config.channels,
            storage,
            env.job.clone(),
            env.rank,
            env.size,
            env.token.as_deref(),
        )
        .await
        .map(|(ch, s)| {
            staged = s;
            ch
        }),
        #[cfg(feature = "rdma")]
        Some("rdma") => crate::rdma::open(&env, &config).await,
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
    let Some(model_config) = config.model.clone() else {
        return Ok(builder.build());
    };
    let model_error = |e: fmi_model::ModelError| Error::Config {
        path: env.config.as_ref().map(|p| p.display().to_string()),
        detail: format!("[model]: {e}"),
    };
    if env.channel.is_some() {
        // The channel is forced; the model still picks each collective's algorithm on it.
        let kinds = [crate::comm::channel_kind(primary.name())];
        let model = fmi_model::Model::new(model_config, &kinds).map_err(model_error)?;
        let comm = builder.model(model).build();
        check_agreement(&comm).await?;
        return Ok(comm);
    }
    // With a cost model, every configured channel is opened and each collective goes over the
    // one the model picks; every rank opens the same set, in the same order.
    let mut kinds = vec![crate::comm::channel_kind(primary.name())];
    if env.rendezvous.is_some() && primary.name() != "tcp" {
        builder = builder.extra_channel(open_tcp(&env, &config).await?);
        kinds.push(fmi_model::ChannelKind::Tcp);
    }
    for storage in config.channels.configured() {
        if storage != primary.name() {
            let (ch, s) = crate::mixed::open_storage(
                &config.channels,
                storage,
                env.job.clone(),
                env.rank,
                env.size,
                env.token.as_deref(),
            )
            .await?;
            if s.is_some() {
                staged = s;
            }
            kinds.push(crate::comm::channel_kind(storage));
            builder = builder.extra_channel(ch);
        }
    }
    let model = fmi_model::Model::new(model_config, &kinds).map_err(model_error)?;
    let comm = builder.model(model).staged(staged).build();
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
    let nat = env.nat;
    let mut tcp = TcpConfig {
        report_paths: env.print_paths,
        token: JobToken::new(env.token.clone().unwrap_or_default()),
        ..TcpConfig::default()
    };
    if let Some(us) = env.spin_us.or(config.direct.spin_us) {
        tcp.spin = std::time::Duration::from_micros(us);
    }
    if let Some(bytes) = env
        .local_socket_buffer
        .or(config.direct.local_socket_buffer)
    {
        tcp.local_socket_buffer = bytes;
    }
    let stun = env.stun.as_ref().unwrap_or(&config.direct.stun);
    let transport = env.transport.unwrap_or(config.direct.transport);
    // Over QUIC, STUN asks from the very socket QUIC will use, so that the public address it
    // learns is a candidate the peers can punch to.
    let mut quic = match transport {
        DirectTransport::Quic => {
            let (_, bind_ip) = local_ips(server);
            let failed = |e: std::io::Error| Error::Config {
                path: None,
                detail: format!("quic transport: cannot bind a udp socket: {e}"),
            };
            let socket = tokio::net::UdpSocket::bind(SocketAddr::new(bind_ip, 0))
                .await
                .map_err(failed)?;
            Some(QuicSocket {
                socket,
                public: None,
            })
        }
        _ => None,
    };
    if nat.enabled(server) && !stun.is_empty() {
        let from = quic.as_ref().map(|q| &q.socket);
        if let Some((mapping, public)) = stun_mapping(env, stun, from).await {
            if let Some(q) = quic.as_mut() {
                q.public = public;
            }
            if !mapping.punchable() {
                // A punch would leave from a port the peer was never told about: go to the
                // relay as soon as a direct dial has had its chance.
                tcp.nat.punch = false;
                tcp.nat.relay_after = NO_PUNCH_RELAY_AFTER;
            }
        }
    }
    Ok(Arc::new(
        join_tcp(env, server, deadline, tcp, nat, quic).await?,
    ))
}

/// The UDP socket of the QUIC transport and the public address STUN saw it at.
struct QuicSocket {
    socket: tokio::net::UdpSocket,
    public: Option<SocketAddr>,
}

/// Prefix of a rank's QUIC address in its registered endpoints (`quic:203.0.113.11:4433`).
const QUIC_PREFIX: &str = "quic:";
/// Prefix of a rank's certificate fingerprint in its registered endpoints (64 hex digits).
const CERT_PREFIX: &str = "cert-sha256:";

/// The QUIC addresses and the fingerprint a rank registered, if it registered any.
fn quic_peer(endpoints: &[Endpoint]) -> Option<QuicPeer> {
    let mut addrs = Vec::new();
    let mut fingerprint = None;
    for e in endpoints {
        let text = e.as_str();
        if let Some(a) = text.strip_prefix(QUIC_PREFIX) {
            addrs.extend(a.parse::<SocketAddr>().ok());
        } else if let Some(f) = text.strip_prefix(CERT_PREFIX) {
            fingerprint = f.parse::<Fingerprint>().ok();
        }
    }
    match (addrs.is_empty(), fingerprint) {
        (false, Some(fingerprint)) => Some(QuicPeer { addrs, fingerprint }),
        _ => None,
    }
}

/// How long a rank whose NAT cannot be punched waits for a direct dial before the relay.
const NO_PUNCH_RELAY_AFTER: std::time::Duration = std::time::Duration::from_millis(400);
/// Longest a STUN probe may delay the start.
const STUN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

/// Asks the STUN servers for this rank's mapping type (see `fmi_rendezvous::stun`); `None`
/// (and a warning) when none answers, so that the rank then punches as without STUN.
async fn stun_mapping(
    env: &EnvSettings,
    servers: &[String],
    from: Option<&tokio::net::UdpSocket>,
) -> Option<(fmi_rendezvous::stun::Mapping, Option<SocketAddr>)> {
    let me = env.rank;
    let mut addrs = Vec::new();
    for text in servers {
        match tokio::net::lookup_host(text.as_str()).await {
            Ok(mut found) => addrs.extend(found.next()),
            Err(e) => tracing::warn!(%me, server = %text, error = %e, "stun: cannot resolve"),
        }
    }
    let probed = match from {
        Some(socket) => fmi_rendezvous::stun::probe_from(socket, &addrs, STUN_TIMEOUT).await,
        None => fmi_rendezvous::stun::probe(&addrs, STUN_TIMEOUT).await,
    };
    match probed {
        Ok(report) => {
            let public = report
                .public()
                .map_or_else(|| "?".to_owned(), |a| a.to_string());
            tracing::info!(%me, mapping = %report.mapping, %public, "stun: NAT mapping");
            if env.print_paths {
                eprintln!(
                    "fmi-nat: rank {}: mapping {}; public {public}",
                    me.0, report.mapping
                );
            }
            Some((report.mapping, report.public()))
        }
        Err(e) => {
            tracing::warn!(%me, error = %e, "stun: no mapping learnt; punching anyway");
            if env.print_paths {
                eprintln!("fmi-nat: rank {}: mapping unknown; stun failed: {e}", me.0);
            }
            None
        }
    }
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
/// The address to advertise and the one to bind, for a rendezvous server at `server`.
fn local_ips(server: SocketAddr) -> (IpAddr, IpAddr) {
    let ip = advertised_ip(server);
    let bind_ip = if ip.is_loopback() {
        ip
    } else {
        IpAddr::V4(Ipv4Addr::UNSPECIFIED)
    };
    (ip, bind_ip)
}

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

async fn join_tcp(
    env: &EnvSettings,
    server: SocketAddr,
    deadline: Instant,
    mut tcp: TcpConfig,
    nat: NatMode,
    quic: Option<QuicSocket>,
) -> Result<TcpChannel> {
    let me = env.rank;
    let bootstrap =
        |missing: Vec<Rank>, source: Box<dyn std::error::Error + Send + Sync>| Error::Bootstrap {
            me,
            missing,
            source,
        };
    let (ip, bind_ip) = local_ips(server);
    let binding = TcpChannel::bind(SocketAddr::new(bind_ip, 0)).await?;
    let endpoint = SocketAddr::new(ip, binding.local_addr().port());
    let mut endpoints = vec![Endpoint::from(endpoint)];
    let quic = match quic {
        Some(QuicSocket { socket, public }) => {
            let socket = socket.into_std().map_err(|e| Error::Config {
                path: None,
                detail: format!("quic transport: {e}"),
            })?;
            let quic = QuicBinding::from_socket(socket)?;
            // The private address first (dialed directly), then the public one STUN saw.
            let private = SocketAddr::new(ip, quic.local_addr().port());
            let entry = |a| quic_endpoint(a).map_err(|e| bootstrap(Vec::new(), Box::new(e)));
            endpoints.push(entry(private)?);
            if let Some(public) = public.filter(|&p| p != private) {
                endpoints.push(entry(public)?);
            }
            endpoints.push(
                Endpoint::new(format!("{CERT_PREFIX}{}", quic.fingerprint()))
                    .map_err(|e| bootstrap(Vec::new(), Box::new(e)))?,
            );
            Some(quic)
        }
        None => None,
    };
    let token = Token::new(env.token.clone().unwrap_or_default().into_bytes())
        .map_err(|e| bootstrap(Vec::new(), Box::new(e)))?;
    let registration = Registration {
        job: env.job.clone(),
        rank: me.0,
        size: env.size,
        endpoints,
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
    let mut quic_peers = Vec::with_capacity(env.size as usize);
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
        if quic.is_some() {
            quic_peers.push(quic_peer(endpoints).ok_or_else(|| {
                bootstrap(
                    Vec::new(),
                    format!(
                        "rank {rank} registered no QUIC endpoint: every rank of a job must use \
                         the same direct transport (FMI_DIRECT_TRANSPORT / [direct] transport)"
                    )
                    .into(),
                )
            })?);
        }
    }
    let quic = quic.map(|binding| QuicSetup {
        binding,
        peers: quic_peers,
    });
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
            match quic {
                Some(quic) => TcpChannel::start_quic(
                    binding,
                    quic,
                    env.job.clone(),
                    me,
                    peers,
                    tcp,
                    Some(traversal),
                ),
                None => TcpChannel::start_with_traversal(
                    binding,
                    env.job.clone(),
                    me,
                    peers,
                    tcp,
                    traversal,
                ),
            }
        }
        None => match quic {
            Some(quic) => {
                TcpChannel::start_quic(binding, quic, env.job.clone(), me, peers, tcp, None)
            }
            None => TcpChannel::start(binding, env.job.clone(), me, peers, tcp),
        },
    }
}

/// The registration entry of a QUIC address (`quic:203.0.113.11:4433`).
fn quic_endpoint(addr: SocketAddr) -> std::result::Result<Endpoint, fmi_rendezvous::Error> {
    Endpoint::new(format!("{QUIC_PREFIX}{addr}"))
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

    /// Two ranks started from the environment against a loopback rendezvous server, with
    /// `FMI_NAT` = `nat`; returns each rank's `Communicator::paths()` after an allreduce.
    fn paths_of_a_job(nat: &str, job: &str) -> Vec<Vec<(&'static str, Rank, crate::PathKind)>> {
        paths_of_a_job_over(nat, job, None)
            .into_iter()
            .map(|(p, _)| p)
            .collect()
    }

    type Paths = Vec<(&'static str, Rank, crate::PathKind)>;

    /// Like `paths_of_a_job`, with `FMI_DIRECT_TRANSPORT` = `transport`; also returns each
    /// rank's `paths_quic` counter.
    fn paths_of_a_job_over(nat: &str, job: &str, transport: Option<&str>) -> Vec<(Paths, u64)> {
        let transport = transport.map(str::to_owned);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let server = fmi_rendezvous::Server::bind(
                SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
                fmi_rendezvous::ServerConfig::default(),
            )
            .await
            .expect("rendezvous server")
            .spawn();
            let addr = server.local_addr().to_string();
            let ranks = (0..2u32).map(|rank| {
                let (addr, nat, job) = (addr.clone(), nat.to_owned(), job.to_owned());
                let transport = transport.clone();
                tokio::spawn(async move {
                    let env = EnvSettings::from_lookup(|var| match var {
                        "FMI_RANK" => Some(rank.to_string()),
                        "FMI_SIZE" => Some("2".into()),
                        "FMI_JOB" => Some(job.clone()),
                        "FMI_RENDEZVOUS" => Some(addr.clone()),
                        "FMI_TOKEN" => Some("paths-secret".into()),
                        "FMI_NAT" => Some(nat.clone()),
                        "FMI_DIRECT_TRANSPORT" => transport.clone(),
                        _ => None,
                    })
                    .expect("environment");
                    let comm = connect(env).await.expect("connect");
                    let sum = comm
                        .allreduce(&[rank + 1], crate::Op::Sum)
                        .await
                        .expect("sum");
                    assert_eq!(sum, [3]);
                    let paths = comm.paths();
                    let quic = comm
                        .counters()
                        .iter()
                        .find(|(name, _)| *name == "paths_quic")
                        .map_or(0, |(_, v)| *v);
                    // Both ranks have their answer before either closes its channel.
                    comm.barrier().await.expect("barrier");
                    comm.close().await;
                    (paths, quic)
                })
            });
            let mut all = Vec::new();
            for r in ranks.collect::<Vec<_>>() {
                all.push(r.await.expect("rank task"));
            }
            server.shutdown().await;
            all
        })
    }

    #[test]
    fn communicator_reports_the_path_of_each_pair() {
        use crate::PathKind;
        let direct = paths_of_a_job("off", "paths-direct");
        assert_eq!(direct[0], [("tcp", Rank(1), PathKind::Direct)]);
        assert_eq!(direct[1], [("tcp", Rank(0), PathKind::Direct)]);
        let relayed = paths_of_a_job("relay", "paths-relay");
        assert_eq!(relayed[0], [("tcp", Rank(1), PathKind::Relayed)]);
        assert_eq!(relayed[1], [("tcp", Rank(0), PathKind::Relayed)]);
        assert!(!relayed[0][0].2.is_direct());
    }

    /// With `FMI_DIRECT_TRANSPORT=quic` the pair connects over QUIC through a real rendezvous
    /// server (certificates pinned through it), with and without traversal; the relay stays
    /// TCP.
    #[test]
    fn quic_transport_through_the_rendezvous() {
        use crate::PathKind;
        for nat in ["off", "on"] {
            let job = format!("quic-{nat}");
            let got = paths_of_a_job_over(nat, &job, Some("quic"));
            assert_eq!(
                got[0],
                (vec![("tcp", Rank(1), PathKind::Direct)], 1),
                "{nat}"
            );
            assert_eq!(
                got[1],
                (vec![("tcp", Rank(0), PathKind::Direct)], 1),
                "{nat}"
            );
        }
        let relayed = paths_of_a_job_over("relay", "quic-relay", Some("quic"));
        assert_eq!(relayed[0], (vec![("tcp", Rank(1), PathKind::Relayed)], 0));
        assert_eq!(relayed[1], (vec![("tcp", Rank(0), PathKind::Relayed)], 0));
    }

    #[test]
    fn quic_endpoints_round_trip_through_registration_entries() {
        let fp = Fingerprint::of(b"some certificate");
        let private: SocketAddr = "192.0.2.10:4433".parse().expect("addr");
        let public: SocketAddr = "203.0.113.11:4433".parse().expect("addr");
        let endpoints = vec![
            Endpoint::from("192.0.2.10:7000".parse::<SocketAddr>().expect("addr")),
            quic_endpoint(private).expect("endpoint"),
            quic_endpoint(public).expect("endpoint"),
            Endpoint::new(format!("{CERT_PREFIX}{fp}")).expect("endpoint"),
        ];
        assert_eq!(
            quic_peer(&endpoints),
            Some(QuicPeer {
                addrs: vec![private, public],
                fingerprint: fp
            })
        );
        // A TCP-only rank, or one without a fingerprint, has no QUIC endpoint.
        assert_eq!(quic_peer(&endpoints[..1]), None);
        assert_eq!(quic_peer(&endpoints[..3]), None);
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
}
