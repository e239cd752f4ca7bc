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
use fmi_channels::tcp::stored::StorageFallback;
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
    crate::alloc::tune();
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
    // `[direct] fallback`: the storage channel the direct channel falls back to, opened first
    // so that the direct channel has it from the start (and shared with the routes).
    let fallback = match config.direct.fallback.as_deref() {
        Some(storage) if name.as_deref() != Some(storage) => {
            if !config.channels.configured().contains(&storage) {
                return Err(Error::Config {
                    path: env.config.as_ref().map(|p| p.display().to_string()),
                    detail: format!(
                        "[direct] fallback = {storage:?}, but the configuration sets up no \
                         [channels.{storage}] (configured: {:?})",
                        config.channels.configured()
                    ),
                });
            }
            let (ch, s) = open_storage(&env, &config, storage).await?;
            if s.is_some() {
                staged = s;
            }
            Some((storage.to_owned(), ch))
        }
        _ => None,
    };
    let fallback_channel = fallback.as_ref().map(|(_, ch)| Arc::clone(ch));
    let primary: Arc<dyn Channel> = match name.as_deref() {
        Some(storage) if crate::storage::is_storage(storage) => {
            open_storage(&env, &config, storage).await.map(|(ch, s)| {
                staged = s;
                ch
            })
        }
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
        Some(_tcp) => open_tcp(&env, &config, fallback_channel.clone()).await,
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
        // A fallback to the primary storage channel shares it.
        let fallback = fallback_channel.clone().or_else(|| {
            (config.direct.fallback.as_deref() == Some(primary.name()))
                .then(|| Arc::clone(&primary))
        });
        builder = builder.extra_channel(open_tcp(&env, &config, fallback).await?);
        kinds.push(fmi_model::ChannelKind::Tcp);
    }
    for storage in config.channels.configured() {
        if let Some((_, ch)) = fallback.as_ref().filter(|(name, _)| name == storage) {
            kinds.push(crate::comm::channel_kind(storage));
            builder = builder.extra_channel(Arc::clone(ch));
            continue;
        }
        if storage != primary.name() {
            let (ch, s) = open_storage(&env, &config, storage).await?;
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

/// Opens storage channel `storage` for this rank (see `crate::mixed::open_storage`).
async fn open_storage(
    env: &EnvSettings,
    config: &Config,
    storage: &str,
) -> Result<(Arc<dyn Channel>, Option<crate::mixed::Staged>)> {
    crate::mixed::open_storage(
        &config.channels,
        storage,
        env.job.clone(),
        env.rank,
        env.size,
        env.token.as_deref(),
    )
    .await
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

/// Opens the direct channel; `fallback`: the storage channel of `[direct] fallback`.
async fn open_tcp(
    env: &EnvSettings,
    config: &Config,
    fallback: Option<Arc<dyn Channel>>,
) -> Result<Arc<dyn Channel>> {
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
    tcp.nat.fallback = fallback.map(StorageFallback);
    if let Some(us) = env.spin_us.or(config.direct.spin_us) {
        tcp.spin = std::time::Duration::from_micros(us);
    }
    if let Some(us) = env.long_wait_us.or(config.direct.long_wait_us) {
        tcp.long_wait = std::time::Duration::from_micros(us);
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
                // Every pair through the fallback path: the relay, or the storage fallback.
                tcp.nat = NatConfig {
                    direct: false,
                    punch: false,
                    fallback: tcp.nat.fallback.take(),
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

    /// Runs `body(communicator, rank)` as two ranks of job `job`, started from the
    /// environment (`vars` added to it) against a loopback rendezvous server on a runtime of
    /// two threads; returns what each rank's `body` returned, in rank order.
    fn two_ranks<T, F, Fut>(job: &str, vars: &[(&str, String)], body: F) -> Vec<T>
    where
        T: Send + 'static,
        F: Fn(Communicator, u32) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = T> + Send + 'static,
    {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let body = Arc::new(body);
        rt.block_on(async {
            let server = fmi_rendezvous::Server::bind(
                SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
                fmi_rendezvous::ServerConfig::default(),
            )
            .await
            .expect("rendezvous server")
            .spawn();
            let addr = server.local_addr().to_string();
            let mut ranks = Vec::new();
            for rank in 0..2u32 {
                let env = EnvSettings::from_lookup(|var| match var {
                    "FMI_RANK" => Some(rank.to_string()),
                    "FMI_SIZE" => Some("2".into()),
                    "FMI_JOB" => Some(job.to_owned()),
                    "FMI_RENDEZVOUS" => Some(addr.clone()),
                    "FMI_TOKEN" => Some("two-ranks-secret".into()),
                    _ => vars.iter().find(|(v, _)| *v == var).map(|(_, x)| x.clone()),
                })
                .expect("environment");
                let body = Arc::clone(&body);
                ranks.push(tokio::spawn(async move {
                    let comm = connect(env).await.expect("connect");
                    body(comm, rank).await
                }));
            }
            let mut all = Vec::new();
            for r in ranks {
                all.push(r.await.expect("rank task"));
            }
            server.shutdown().await;
            all
        })
    }

    /// Like `paths_of_a_job`, with `FMI_DIRECT_TRANSPORT` = `transport`; also returns each
    /// rank's `paths_quic` counter.
    fn paths_of_a_job_over(nat: &str, job: &str, transport: Option<&str>) -> Vec<(Paths, u64)> {
        let mut vars = vec![("FMI_NAT", nat.to_owned())];
        if let Some(t) = transport {
            vars.push(("FMI_DIRECT_TRANSPORT", t.to_owned()));
        }
        two_ranks(job, &vars, |comm, rank| finish(comm, rank, "paths_quic"))
    }

    /// The end of a two-rank test job: an allreduce, then this rank's paths and its channels'
    /// counter `name` (0 if none has it), read before a barrier so that both ranks have their
    /// answer before either closes its channels.
    async fn finish(comm: Communicator, rank: u32, name: &str) -> (Paths, u64) {
        let sum = comm
            .allreduce(&[rank + 1], crate::Op::Sum)
            .await
            .expect("sum");
        assert_eq!(sum, [3]);
        let paths = comm.paths();
        let count = comm
            .counters()
            .iter()
            .find(|(n, _)| *n == name)
            .map_or(0, |(_, v)| *v);
        comm.barrier().await.expect("barrier");
        comm.close().await;
        (paths, count)
    }

    fn service(var: &str) -> String {
        std::env::var(var).unwrap_or_else(|_| {
            panic!(
                "{var} is not set: start the servers with `eval \"$(scripts/services.sh start)\"`"
            )
        })
    }

    /// Two ranks with `FMI_NAT=relay` (no direct dial, no punch), the storage sections
    /// `channels` and `[direct] fallback = fallback`: the pair's connection runs over that
    /// storage channel, messages of each of `sizes` arrive in order in both directions, an
    /// allreduce works, and once the job is over nothing of it is left in storage.
    #[cfg(feature = "redis")]
    fn falls_back_to(fallback: &str, channels: &str, sizes: &'static [usize]) {
        use crate::PathKind;
        let tag = format!("{fallback}-{}", std::process::id());
        let dir = std::env::temp_dir().join(format!("fmi-fallback-{tag}"));
        std::fs::create_dir_all(&dir).expect("scratch directory");
        let config = dir.join("fmi.toml");
        std::fs::write(
            &config,
            format!("{channels}\n[direct]\nfallback = \"{fallback}\"\n"),
        )
        .expect("config file");
        let cfg = crate::config::Config::from_file(&config).expect("config");
        let local = || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime")
        };
        local()
            .block_on(crate::storage::setup(&cfg))
            .expect("bucket and table");
        let job = format!("fallback-{tag}");
        let vars = [
            ("FMI_NAT", "relay".to_owned()),
            ("FMI_CONFIG", config.display().to_string()),
        ];
        let all = two_ranks(&job, &vars, move |comm, rank| async move {
            let peer = 1 - rank;
            let message = |i: usize, n: usize, from: u32| -> Vec<u8> {
                (0..n).map(|j| (j + i + from as usize) as u8).collect()
            };
            for (i, &n) in sizes.iter().enumerate() {
                comm.send(peer, 7, &message(i, n, rank))
                    .await
                    .expect("send");
            }
            for (i, &n) in sizes.iter().enumerate() {
                let got: Vec<u8> = comm.recv(peer, 7).await.expect("recv");
                assert!(
                    got == message(i, n, peer),
                    "rank {rank}: message {i} of {n} bytes differs"
                );
            }
            finish(comm, rank, "paths_stored").await
        });
        let job = fmi_channels::JobId::new(job).expect("job id");
        let left = local()
            .block_on(crate::storage::cleanup(&cfg, &job))
            .expect("cleanup");
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(all[0], (vec![("tcp", Rank(1), PathKind::Stored)], 1));
        assert_eq!(all[1], (vec![("tcp", Rank(0), PathKind::Stored)], 1));
        assert_eq!(left, 0, "keys of the job left in {fallback}");
    }

    /// The channel conformance suite (ordering, sizes to 16 MiB, deadlines, concurrent sends,
    /// `recv_into`, …) over direct channels whose every pair is stored in a real
    /// redis-server (`FMI_NAT=relay` with `[direct] fallback = "redis"`).
    #[test]
    #[cfg(feature = "redis")]
    fn stored_pairs_pass_the_channel_conformance_suite() {
        let url = service("FMI_TEST_REDIS_URL");
        let tag = format!("conf-{}", std::process::id());
        let dir = std::env::temp_dir().join(format!("fmi-fallback-{tag}"));
        std::fs::create_dir_all(&dir).expect("scratch directory");
        let config = dir.join("fmi.toml");
        std::fs::write(
            &config,
            format!("[channels.redis]\nurl = {url:?}\n[direct]\nfallback = \"redis\"\n"),
        )
        .expect("config file");
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
            let worlds = std::sync::atomic::AtomicU32::new(0);
            // The communicators stay alive until the suite is over.
            let kept = std::sync::Mutex::new(Vec::new());
            fmi_channels::conformance::run_all(|n| {
                let job = format!(
                    "{tag}-{}",
                    worlds.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                );
                let ranks: Vec<_> = (0..n)
                    .map(|rank| {
                        let env = EnvSettings::from_lookup(|var| match var {
                            "FMI_RANK" => Some(rank.to_string()),
                            "FMI_SIZE" => Some(n.to_string()),
                            "FMI_JOB" => Some(job.clone()),
                            "FMI_RENDEZVOUS" => Some(addr.clone()),
                            "FMI_NAT" => Some("relay".into()),
                            "FMI_CONFIG" => Some(config.display().to_string()),
                            _ => None,
                        })
                        .expect("environment");
                        tokio::spawn(connect(env))
                    })
                    .collect();
                let kept = &kept;
                async move {
                    let mut eps = Vec::new();
                    for r in ranks {
                        let comm = r.await.expect("rank task").expect("connect");
                        eps.push(Arc::clone(comm.channel()));
                        kept.lock().expect("lock").push(comm);
                    }
                    Ok(eps)
                }
            })
            .await;
            let comms = std::mem::take(&mut *kept.lock().expect("lock"));
            assert!(!comms.is_empty());
            for comm in comms {
                assert!(
                    comm.paths()
                        .iter()
                        .all(|(_, _, kind)| *kind == crate::PathKind::Stored),
                    "a pair connected another way: {:?}",
                    comm.paths()
                );
                comm.close().await;
            }
            server.shutdown().await;
        });
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// The storage fallback over a real redis-server (pushed: the stored stream's reader
    /// blocks in the server), messages from empty to 3 MiB.
    #[test]
    #[cfg(feature = "redis")]
    fn a_pair_that_cannot_connect_falls_back_to_redis() {
        let url = service("FMI_TEST_REDIS_URL");
        let channels = format!("[channels.redis]\nurl = {url:?}\n");
        falls_back_to("redis", &channels, &[0, 8, 70_000, 3 << 20]);
    }

    /// The storage fallback over S3 (s3s-fs; polled: the stored stream's reader polls for the
    /// peer's next message), with DynamoDB also configured, as a routed job would have it.
    #[test]
    #[cfg(feature = "aws")]
    fn a_pair_that_cannot_connect_falls_back_to_s3() {
        let s3 = service("FMI_TEST_S3_ENDPOINT");
        let dynamo = service("FMI_TEST_DYNAMODB_ENDPOINT");
        let channels = format!(
            "[channels.s3]\nbucket = \"fmi-fallback\"\nendpoint = {s3:?}\nregion = \"us-east-1\"\n\
             [channels.dynamodb]\ntable = \"fmi-fallback\"\nendpoint = {dynamo:?}\n\
             region = \"us-east-1\"\n[storage]\npoll_initial_ms = 5\npoll_max_ms = 100\n"
        );
        falls_back_to("s3", &channels, &[0, 8, 70_000]);
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
