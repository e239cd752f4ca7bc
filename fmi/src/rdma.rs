//! Opening the RDMA channel (feature `rdma`, see docs/rdma.md).
//!
//! ```text
//!  [rdma] provider / FMI_RDMA_PROVIDER ─▶ open fabric … endpoint ─▶ fi_getname
//!     ─▶ register (job, rank, size, "ofi:<hex name>", token) with the rendezvous server
//!     ─▶ peer table ─▶ fi_av_insert every rank's name ─▶ RdmaChannel
//! ```
//!
//! Endpoint names travel through fmi's rendezvous server (the peer table's endpoint field), not
//! through rdmacm, so the same bootstrap works on every provider.

use std::net::SocketAddr;
use std::sync::Arc;

use fmi_channels::{Channel, Instant, Rank};
use fmi_rdma::{RdmaBinding, RdmaChannel, RdmaConfig};
use fmi_rendezvous::{Endpoint, Registration, Token};

use crate::config::Config;
use crate::env::EnvSettings;
use crate::{Error, Result};

/// The environment variable `var` when set and not blank, else `fallback`.
fn env_or(var: &str, fallback: &Option<String>) -> Option<String> {
    match std::env::var(var) {
        Ok(p) if !p.trim().is_empty() => Some(p.trim().to_owned()),
        _ => fallback.clone(),
    }
}

/// `FMI_RDMA_PROVIDER`, else `[rdma] provider`; `FMI_RDMA_DOMAIN`, else `[rdma] domain`;
/// `FMI_SPIN_US` (`spin_us`), else `[rdma] spin_us`. Returns whether the spin was configured
/// (else [`open`] chooses it from the number of ranks on this host).
fn rdma_config(config: &Config, spin_us: Option<u64>) -> Result<(RdmaConfig, bool)> {
    let mut c = RdmaConfig::default();
    c.provider = env_or("FMI_RDMA_PROVIDER", &config.rdma.provider);
    c.domain = env_or("FMI_RDMA_DOMAIN", &config.rdma.domain);
    if let Some(e) = config.rdma.eager_max {
        if e == 0 || e > 1 << 20 {
            return Err(Error::Config {
                path: None,
                detail: format!("[rdma] eager_max = {e}: expected 1 to 1048576 bytes"),
            });
        }
        c.eager_max = e;
    }
    if let Some(us) = spin_us.or(config.rdma.spin_us) {
        if us > 1_000_000 {
            let from = if spin_us.is_some() {
                "FMI_SPIN_US"
            } else {
                "[rdma] spin_us"
            };
            return Err(Error::Config {
                path: None,
                detail: format!("{from} = {us}: expected 0 to 1000000 µs (a wait spins this long)"),
            });
        }
        c.spin = std::time::Duration::from_micros(us);
        return Ok((c, true));
    }
    Ok((c, false))
}

/// The prefix of the peer-table entry naming a rank's host (next to its `ofi:` name).
const HOST_PREFIX: &str = "host:";

/// This host's identity for counting the job's ranks on it: the kernel's boot id (ranks in
/// containers of one machine share it, and its cores), else the host name. `None` if neither
/// can be read.
fn host_id() -> Option<String> {
    let read = |p: &str| {
        std::fs::read_to_string(p)
            .ok()
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty() && s.len() <= 64 && s.bytes().all(|b| b.is_ascii_graphic()))
    };
    read("/proc/sys/kernel/random/boot_id").or_else(|| read("/proc/sys/kernel/hostname"))
}

fn open_error(me: Rank, e: fmi_rdma::FabricError) -> Error {
    Error::Bootstrap {
        me,
        missing: Vec::new(),
        source: Box::new(e),
    }
}

/// Opens this rank's RDMA channel, exchanging endpoint names through the rendezvous server
/// (or, for a job of one rank without one, talking only to itself).
pub(crate) async fn open(env: &EnvSettings, config: &Config) -> Result<Arc<dyn Channel>> {
    let me = env.rank;
    let (mut cfg, spin_set) = rdma_config(config, env.spin_us)?;
    let size = env.size;
    let opened = {
        let cfg = cfg.clone();
        tokio::task::spawn_blocking(move || RdmaBinding::open(&cfg, size))
            .await
            .map_err(|e| Error::Bootstrap {
                me,
                missing: Vec::new(),
                source: e.to_string().into(),
            })?
    };
    let binding = opened.map_err(|e| open_error(me, e))?;
    tracing::debug!(rank = me.0, provider = %binding.info().provider, "rdma: endpoint open");
    let shm = binding.info().provider == "shm";
    let (names, here) = match &env.rendezvous {
        None if env.size == 1 => (vec![binding.name().to_vec()], 1),
        None => {
            return Err(Error::MissingEnv {
                var: "FMI_RENDEZVOUS",
                hint: "the rdma channel exchanges endpoint names through the rendezvous \
                       server; give its host:port (`fmi run` sets it)",
            })
        }
        Some(server) => exchange(env, config, server, binding.endpoint_text()).await?,
    };
    if !spin_set {
        // `shm` reaches this host only: every rank of the job is here.
        let here = if shm { env.size } else { here };
        cfg.spin = fmi_rdma::channel::auto_spin(here);
        tracing::debug!(
            rank = me.0,
            ranks_here = here,
            spin_us = cfg.spin.as_micros() as u64,
            "rdma: spin window"
        );
    }
    let ch = RdmaChannel::start(binding, env.job.clone(), me, names, &cfg)?;
    Ok(Arc::new(ch))
}

async fn exchange(
    env: &EnvSettings,
    config: &Config,
    server: &str,
    // The text, not the binding: libfabric objects are not `Sync`, and this future must be `Send`.
    endpoint_text: String,
) -> Result<(Vec<Vec<u8>>, u32)> {
    let me = env.rank;
    let bootstrap =
        |missing: Vec<Rank>, source: Box<dyn std::error::Error + Send + Sync>| Error::Bootstrap {
            me,
            missing,
            source,
        };
    let addr: SocketAddr = tokio::net::lookup_host(server)
        .await
        .ok()
        .and_then(|mut a| a.next())
        .ok_or_else(|| Error::InvalidEnv {
            var: "FMI_RENDEZVOUS",
            value: server.to_owned(),
            expected: "host:port of the rendezvous server".to_owned(),
        })?;
    let endpoint = Endpoint::new(endpoint_text).map_err(|e| bootstrap(Vec::new(), Box::new(e)))?;
    let host = host_id();
    let mut endpoints = vec![endpoint];
    if let Some(h) = &host {
        if let Ok(e) = Endpoint::new(format!("{HOST_PREFIX}{h}")) {
            endpoints.push(e);
        }
    }
    let token = Token::new(env.token.clone().unwrap_or_default().into_bytes())
        .map_err(|e| bootstrap(Vec::new(), Box::new(e)))?;
    let registration = Registration {
        job: env.job.clone(),
        rank: me.0,
        size: env.size,
        endpoints,
        token,
    };
    let deadline = Instant::now() + config.deadline;
    let table = fmi_rendezvous::register(addr, registration, deadline)
        .await
        .map_err(|e| {
            let missing = match &e {
                fmi_rendezvous::Error::Timeout { missing, .. } => {
                    missing.iter().map(|&r| Rank(r)).collect()
                }
                _ => Vec::new(),
            };
            bootstrap(missing, Box::new(e))
        })?;
    let mut names = Vec::with_capacity(env.size as usize);
    let mut here = 0u32;
    for (rank, endpoints) in table.iter() {
        let same_host = |e: &Endpoint| {
            e.as_str()
                .strip_prefix(HOST_PREFIX)
                .is_some_and(|h| host.as_deref() == Some(h))
        };
        if rank == me.0 || endpoints.iter().any(same_host) {
            here += 1;
        }
        let name = endpoints
            .iter()
            .find_map(|e| fmi_rdma::channel::decode_name(e.as_str()))
            .ok_or_else(|| {
                bootstrap(
                    Vec::new(),
                    format!(
                        "rank {rank} registered no libfabric endpoint name (is every rank \
                         started with the rdma channel?)"
                    )
                    .into(),
                )
            })?;
        names.push(name);
    }
    Ok((names, here))
}
