//! Storage channels (Redis, S3, DynamoDB) as the communicator sees them: their configuration
//! sections, opening them for one rank, and removing what a job left behind.
//!
//! Which backends exist depends on the crate's features: `redis` (default) and `aws` (S3 and
//! DynamoDB, which pull the AWS SDK). A configuration naming a backend this build lacks is an
//! error that says which feature to enable.

#[cfg(feature = "redis")]
use std::sync::Arc;

#[cfg(feature = "redis")]
use fmi_channels::{Channel, JobId, Rank};

#[cfg(feature = "redis")]
use crate::Error;
use crate::Result;

/// The storage backends this build of fmi can use.
pub const BACKENDS: &[&str] = &[
    #[cfg(feature = "redis")]
    "redis",
    #[cfg(feature = "aws")]
    "s3",
    #[cfg(feature = "aws")]
    "dynamodb",
];

/// The `[channels.*]` and `[storage]` sections of a configuration.
#[derive(Clone, Debug, Default)]
#[non_exhaustive]
pub struct ChannelsConfig {
    /// `[channels.redis]`.
    #[cfg(feature = "redis")]
    pub redis: Option<fmi_storage::RedisConfig>,
    /// `[channels.s3]`.
    #[cfg(feature = "aws")]
    pub s3: Option<fmi_aws::S3Config>,
    /// `[channels.dynamodb]`.
    #[cfg(feature = "aws")]
    pub dynamodb: Option<fmi_aws::DynamoConfig>,
    /// `[storage]`: polling and retry settings of the storage adapter.
    #[cfg(feature = "redis")]
    pub storage: fmi_storage::StorageConfig,
}

fn missing_feature(name: &str) -> String {
    let feature = if name == "redis" { "redis" } else { "aws" };
    format!(
        "channel {name:?} is not in this build of fmi: enable the `{feature}` feature \
         (this build has: {})",
        if BACKENDS.is_empty() {
            "no storage channel".to_owned()
        } else {
            BACKENDS.join(", ")
        }
    )
}

impl ChannelsConfig {
    /// Parses the sections (their absence gives the defaults).
    pub(crate) fn parse(
        channels: Option<toml::Table>,
        storage: Option<toml::Value>,
    ) -> std::result::Result<ChannelsConfig, String> {
        #[allow(unused_mut)]
        let mut cfg = ChannelsConfig::default();
        for (name, value) in channels.unwrap_or_default() {
            let _ = &value;
            match name.as_str() {
                #[cfg(feature = "redis")]
                "redis" => {
                    cfg.redis = Some(
                        value
                            .try_into()
                            .map_err(|e| format!("[channels.redis]: {e}"))?,
                    )
                }
                #[cfg(feature = "aws")]
                "s3" => {
                    cfg.s3 = Some(
                        value
                            .try_into()
                            .map_err(|e| format!("[channels.s3]: {e}"))?,
                    )
                }
                #[cfg(feature = "aws")]
                "dynamodb" => {
                    cfg.dynamodb = Some(
                        value
                            .try_into()
                            .map_err(|e| format!("[channels.dynamodb]: {e}"))?,
                    )
                }
                n if is_storage(n) => return Err(missing_feature(n)),
                other => {
                    return Err(format!(
                        "unknown channel [channels.{other}]: known storage channels are redis, \
                         s3 and dynamodb"
                    ))
                }
            }
        }
        if let Some(storage) = storage {
            let _ = &storage;
            #[cfg(feature = "redis")]
            {
                cfg.storage = storage.try_into().map_err(|e| format!("[storage]: {e}"))?;
            }
            #[cfg(not(feature = "redis"))]
            return Err(missing_feature("redis"));
        }
        Ok(cfg)
    }

    /// The storage backends this configuration sets up, in the order redis, s3, dynamodb.
    pub fn configured(&self) -> Vec<&'static str> {
        #[allow(unused_mut)]
        let mut out = Vec::new();
        #[cfg(feature = "redis")]
        if self.redis.is_some() {
            out.push("redis");
        }
        #[cfg(feature = "aws")]
        {
            if self.s3.is_some() {
                out.push("s3");
            }
            if self.dynamodb.is_some() {
                out.push("dynamodb");
            }
        }
        out
    }
}

#[cfg(feature = "aws")]
fn backend_error(me: Rank, e: impl std::error::Error + Send + Sync + 'static) -> Error {
    Error::Bootstrap {
        me,
        missing: Vec::new(),
        source: Box::new(e),
    }
}

#[cfg(feature = "redis")]
fn not_configured(name: &str) -> Error {
    Error::Config {
        path: None,
        detail: format!(
            "channel {name:?} was chosen but the configuration has no [channels.{name}] section"
        ),
    }
}

/// Opens the mailbox of backend `name` (checking that its bucket or table exists).
#[cfg(feature = "redis")]
async fn open_mailbox(
    cfg: &ChannelsConfig,
    name: &str,
    me: Rank,
) -> Result<Arc<dyn fmi_storage::Mailbox>> {
    let _ = me;
    match name {
        "redis" => {
            let c = cfg.redis.clone().ok_or_else(|| not_configured(name))?;
            let mb = fmi_storage::RedisMailbox::new(c)?;
            Ok(Arc::new(mb))
        }
        #[cfg(feature = "aws")]
        "s3" => {
            let c = cfg.s3.clone().ok_or_else(|| not_configured(name))?;
            let mb = fmi_aws::S3Mailbox::connect(c)
                .await
                .map_err(|e| backend_error(me, e))?;
            Ok(Arc::new(mb))
        }
        #[cfg(feature = "aws")]
        "dynamodb" => {
            let c = cfg.dynamodb.clone().ok_or_else(|| not_configured(name))?;
            let mb = fmi_aws::DynamoMailbox::connect(c)
                .await
                .map_err(|e| backend_error(me, e))?;
            Ok(Arc::new(mb))
        }
        other => Err(Error::Config {
            path: None,
            detail: missing_feature(other),
        }),
    }
}

/// Whether `name` is a storage backend (built or not).
pub(crate) fn is_storage(name: &str) -> bool {
    matches!(name, "redis" | "s3" | "dynamodb")
}

/// Opens storage channel `name` for one rank of `job`.
#[cfg(feature = "redis")]
pub(crate) async fn open(
    cfg: &ChannelsConfig,
    name: &str,
    job: JobId,
    rank: Rank,
    size: u32,
    secret: Option<&str>,
) -> Result<Arc<dyn Channel>> {
    let mailbox = open_mailbox(cfg, name, rank).await?;
    let mut ch = fmi_storage::StorageChannel::new(mailbox, job, rank, size, cfg.storage.clone())?;
    // With a job token, the keys live in the job's secret key space (see docs/reliability.md).
    if let Some(s) = secret {
        ch = ch.with_secret(s.as_bytes());
    }
    Ok(Arc::new(ch))
}

/// Opens storage channel `name` for one rank of `job`.
#[cfg(not(feature = "redis"))]
pub(crate) async fn open(
    _cfg: &ChannelsConfig,
    name: &str,
    _job: fmi_channels::JobId,
    _rank: fmi_channels::Rank,
    _size: u32,
    _secret: Option<&str>,
) -> Result<std::sync::Arc<dyn fmi_channels::Channel>> {
    Err(crate::Error::Config {
        path: None,
        detail: missing_feature(name),
    })
}

/// Removes everything `job` left in every storage backend the configuration names; returns the
/// number of objects removed. What `fmi cleanup` and `fmi run` (after a storage job) call.
pub async fn cleanup(cfg: &crate::Config, job: &fmi_channels::JobId) -> Result<usize> {
    #[allow(unused_mut)]
    let mut removed = 0;
    let _ = job;
    #[cfg(feature = "redis")]
    for name in cfg.channels.configured() {
        let mb = open_mailbox(&cfg.channels, name, Rank(0)).await?;
        removed += fmi_storage::cleanup_job(&*mb, job).await?;
    }
    #[cfg(not(feature = "redis"))]
    let _ = cfg;
    Ok(removed)
}

/// Creates the bucket and table the configuration names (idempotent); returns what it did, one
/// line per backend. What `fmi setup` calls.
pub async fn setup(cfg: &crate::Config) -> Result<Vec<String>> {
    #[allow(unused_mut)]
    let mut done = Vec::new();
    #[cfg(feature = "aws")]
    {
        if let Some(c) = &cfg.channels.s3 {
            let created = fmi_aws::S3Mailbox::setup(c)
                .await
                .map_err(|e| backend_error(Rank(0), e))?;
            done.push(format!(
                "s3: bucket {} {}",
                c.bucket,
                if created { "created" } else { "already exists" }
            ));
        }
        if let Some(c) = &cfg.channels.dynamodb {
            let s = fmi_aws::DynamoMailbox::setup(c)
                .await
                .map_err(|e| backend_error(Rank(0), e))?;
            done.push(format!("dynamodb: table {}: {s:?}", c.table));
        }
    }
    #[cfg(feature = "redis")]
    if cfg.channels.redis.is_some() {
        done.push("redis: nothing to create".to_owned());
    }
    let _ = cfg;
    Ok(done)
}
