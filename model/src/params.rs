//! The parameters of the model: per channel a latency/bandwidth model and a price list, per job
//! the function's price while it waits; their defaults and sources; the `[model]` TOML section.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::units::{Bytes, Dollars, Seconds, SecondsPerByte};
use crate::ModelError;

/// The channels the model knows, in the fixed order that breaks ties (fastest first).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ChannelKind {
    /// Direct TCP between functions, paired by the rendezvous server.
    Tcp,
    /// The Redis mailbox (push: blocking reads).
    Redis,
    /// The S3 mailbox (polling).
    S3,
    /// The DynamoDB mailbox (polling, atomic counters).
    DynamoDb,
}

impl ChannelKind {
    /// Every channel, in tie-breaking order.
    pub const ALL: [ChannelKind; 4] = [
        ChannelKind::Tcp,
        ChannelKind::Redis,
        ChannelKind::S3,
        ChannelKind::DynamoDb,
    ];

    /// The channel's name as fmi spells it (`FMI_CHANNEL`, `[channels.*]`, counters).
    pub fn name(self) -> &'static str {
        match self {
            ChannelKind::Tcp => "tcp",
            ChannelKind::Redis => "redis",
            ChannelKind::S3 => "s3",
            ChannelKind::DynamoDb => "dynamodb",
        }
    }

    /// Whether it is a storage channel (messages are stored as chunked values).
    pub fn is_storage(self) -> bool {
        self != ChannelKind::Tcp
    }
}

impl fmt::Display for ChannelKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for ChannelKind {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<Self, ModelError> {
        ChannelKind::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| ModelError::UnknownName {
                what: "channel",
                name: s.to_owned(),
                known: "tcp, redis, s3, dynamodb",
            })
    }
}

/// What the model minimises.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Objective {
    /// Least predicted time; ties by dollars.
    Fast,
    /// Least predicted dollars (requests, amortised instances and the functions' GB-seconds);
    /// ties by time.
    Cheap,
    /// Least `dollars + usd_per_second × seconds`: what one second of latency is worth to you.
    /// Large weights behave like `Fast`, 0 like `Cheap`.
    Weighted {
        /// Dollars one second of latency is worth (≥ 0).
        usd_per_second: f64,
    },
}

impl Objective {
    /// The objective's value of a candidate: smaller is better. `(primary, secondary)`.
    pub(crate) fn key(self, seconds: Seconds, dollars: Dollars) -> (f64, f64) {
        match self {
            Objective::Fast => (seconds.0, dollars.0),
            Objective::Cheap => (dollars.0, seconds.0),
            Objective::Weighted { usd_per_second } => {
                (dollars.0 + usd_per_second * seconds.0, seconds.0)
            }
        }
    }

    fn check(self) -> Result<Objective, ModelError> {
        match self {
            Objective::Weighted { usd_per_second } if !(usd_per_second.is_finite() && usd_per_second >= 0.0) => {
                Err(ModelError::Invalid(format!(
                    "objective weight {usd_per_second}: must be a finite number of dollars per second >= 0"
                )))
            }
            o => Ok(o),
        }
    }
}

impl Default for Objective {
    /// `Fast`, as FMI chooses by default.
    fn default() -> Self {
        Objective::Fast
    }
}

impl fmt::Display for Objective {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Objective::Fast => f.write_str("fast"),
            Objective::Cheap => f.write_str("cheap"),
            Objective::Weighted { usd_per_second } => write!(f, "{usd_per_second}"),
        }
    }
}

impl FromStr for Objective {
    type Err = ModelError;
    /// `fast`, `cheap`, or a weight in dollars per second of latency (`0.001`).
    fn from_str(s: &str) -> Result<Self, ModelError> {
        match s {
            "fast" => Ok(Objective::Fast),
            "cheap" => Ok(Objective::Cheap),
            other => match other.parse::<f64>() {
                Ok(w) => Objective::Weighted { usd_per_second: w }.check(),
                Err(_) => Err(ModelError::UnknownName {
                    what: "objective",
                    name: other.to_owned(),
                    known: "fast, cheap, or a weight in dollars per second (e.g. 0.001)",
                }),
            },
        }
    }
}

impl Serialize for Objective {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Objective::Fast => s.serialize_str("fast"),
            Objective::Cheap => s.serialize_str("cheap"),
            Objective::Weighted { usd_per_second } => s.serialize_f64(*usd_per_second),
        }
    }
}

impl<'de> Deserialize<'de> for Objective {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Objective;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("\"fast\", \"cheap\" or a weight in dollars per second")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Objective, E> {
                match v {
                    "fast" => Ok(Objective::Fast),
                    "cheap" => Ok(Objective::Cheap),
                    _ => Err(E::invalid_value(serde::de::Unexpected::Str(v), &self)),
                }
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Objective, E> {
                Objective::Weighted { usd_per_second: v }
                    .check()
                    .map_err(E::custom)
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Objective, E> {
                self.visit_f64(v as f64)
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Objective, E> {
                self.visit_f64(v as f64)
            }
        }
        d.deserialize_any(V)
    }
}

/// A channel's price list. Every field is a list price; zero means free.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct Prices {
    /// Per 1000 writes (S3 PUT-class requests, including multipart create/part/complete).
    pub put_per_1k: Dollars,
    /// Per 1000 reads (S3 GET, a 404 included).
    pub get_per_1k: Dollars,
    /// Per 1000 delete requests.
    pub delete_per_1k: Dollars,
    /// Per 1000 list requests (S3: PUT-priced).
    pub list_per_1k: Dollars,
    /// Per 1000 atomic counter updates.
    pub counter_per_1k: Dollars,
    /// Per million write capacity units (DynamoDB on-demand).
    pub write_unit_per_1m: Dollars,
    /// Bytes per write unit (DynamoDB: 1 KB); every write takes at least one.
    pub write_unit: Bytes,
    /// Per million read capacity units (DynamoDB on-demand, strongly consistent).
    pub read_unit_per_1m: Dollars,
    /// Bytes per read unit (DynamoDB: 4 KB); every read takes at least one.
    pub read_unit: Bytes,
    /// A server the channel needs while the job runs (Redis instance, rendezvous VM), amortised
    /// per second of the job: an operation of t seconds is charged `t × price / 3600`.
    pub instance_per_hour: Dollars,
}

impl Prices {
    fn free() -> Prices {
        Prices {
            put_per_1k: Dollars::ZERO,
            get_per_1k: Dollars::ZERO,
            delete_per_1k: Dollars::ZERO,
            list_per_1k: Dollars::ZERO,
            counter_per_1k: Dollars::ZERO,
            write_unit_per_1m: Dollars::ZERO,
            write_unit: Bytes(1024),
            read_unit_per_1m: Dollars::ZERO,
            read_unit: Bytes(4096),
            instance_per_hour: Dollars::ZERO,
        }
    }
}

/// The latency/bandwidth model and price list of one channel.
///
/// A point-to-point message of n bytes that the receiver is already waiting for takes
/// `α + nβ` on a channel without polling. Storage channels split it: the sender's writes take
/// `request` each plus nβ/2, the receiver's reads `request` each plus nβ/2 (so one chunk costs
/// exactly α + nβ when `request` = α/2), and a polling receiver only notices the message at its
/// next poll (see [`crate`] docs).
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct ChannelParams {
    /// α: latency of a small message, end to end (`alpha_ms`).
    pub alpha: Seconds,
    /// β: time per byte, end to end (`bandwidth_mb_per_sec`).
    pub beta: SecondsPerByte,
    /// Time per byte of the whole server, shared by every message of a step
    /// (`aggregate_mb_per_sec`; Redis); 0 = no shared limit.
    pub aggregate_beta: SecondsPerByte,
    /// Latency of one storage request (`request_ms`); each chunk beyond the first adds one to
    /// the reader, and writes in waves of `put_concurrency` to the writer. Default α/2.
    pub request: Seconds,
    /// Extra time of a step in which every rank sends and receives at once (an exchange:
    /// recursive doubling, Rabenseifner, ring, the message barrier) over a one-way message
    /// (`exchange_extra_ms`; default 0). Where the ranks and the server share CPUs (one host,
    /// a single-threaded Redis), the two directions' requests are served one after the other:
    /// `fmi calibrate` measures it as an exchange's median time minus the one-way time.
    pub exchange_extra: Seconds,
    /// Whether reads block server-side until the value is there (Redis, TCP); else the receiver
    /// polls.
    pub push: bool,
    /// First pause between polls (`poll_initial_ms`, the adapter's `[storage] poll_initial_ms`).
    pub poll_initial: Seconds,
    /// Longest pause between polls; pauses double up to it (`poll_max_ms`).
    pub poll_max: Seconds,
    /// Largest stored value, header included (`max_chunk`); larger messages are chunked, every
    /// chunk being a request of its own. `None`: no chunking (TCP).
    pub max_chunk: Option<Bytes>,
    /// Chunks of one message written at once (`put_concurrency`).
    pub put_concurrency: u32,
    /// Values above this go up as multipart uploads (`multipart_threshold`; S3); `None`: never.
    pub multipart_threshold: Option<Bytes>,
    /// Part size of multipart uploads (`part_size`).
    pub part_size: Bytes,
    /// Bytes a stored value is billed for beyond its payload (`item_overhead`; DynamoDB: key and
    /// attribute names).
    pub item_overhead: Bytes,
    /// Atomic counters exist (`counters`): the storage-native broadcast and barrier are possible.
    pub counters: bool,
    /// The adapter offers the storage-native broadcast (`native_bcast`; needs `counters`).
    pub native_bcast: bool,
    /// The adapter offers the counter barrier (`native_barrier`; needs `counters`).
    pub native_barrier: bool,
    /// The price list.
    pub prices: Prices,
}

/// FMI's model constants and the list prices this crate's defaults come from (us-east-1, see
/// docs/model.md for the sources).
pub mod defaults {
    /// Lambda price per GB-second (x86).
    pub const LAMBDA_USD_PER_GB_SECOND: f64 = 0.000_016_666_7;
    /// Function memory the model assumes (GB): an assumption, set `function_memory_gb`.
    pub const FUNCTION_MEMORY_GB: f64 = 1.0;
    /// Element-wise reduction speed (MB/s) on one function core: an estimate.
    pub const REDUCE_MB_PER_SEC: f64 = 1000.0;
    /// S3 Standard PUT, COPY, POST, LIST per 1000 requests.
    pub const S3_PUT_PER_1K: f64 = 0.005;
    /// S3 Standard GET per 1000 requests.
    pub const S3_GET_PER_1K: f64 = 0.0004;
    /// S3 Express One Zone PUT per 1000 requests.
    pub const S3_EXPRESS_PUT_PER_1K: f64 = 0.00113;
    /// S3 Express One Zone GET per 1000 requests.
    pub const S3_EXPRESS_GET_PER_1K: f64 = 0.00003;
    /// DynamoDB on-demand per million write request units (1 KB each).
    pub const DYNAMODB_WRITE_PER_1M: f64 = 0.625;
    /// DynamoDB on-demand per million read request units (4 KB strongly consistent).
    pub const DYNAMODB_READ_PER_1M: f64 = 0.125;
    /// Redis server per hour (ElastiCache cache.t3.micro on demand): an assumption, not from
    /// REFERENCE.md.
    pub const REDIS_USD_PER_HOUR: f64 = 0.017;
    /// Rendezvous VM per hour (EC2 t3.micro on demand): an assumption, not from REFERENCE.md.
    pub const RENDEZVOUS_USD_PER_HOUR: f64 = 0.0104;
}

impl ChannelParams {
    /// The defaults of `kind`:
    ///
    /// | | α | bandwidth | chunk | waiting | prices |
    /// |---|---|---|---|---|---|
    /// | tcp | 0.34 ms (FMI) | 400 MB/s (FMI) | — | push | rendezvous VM $0.0104/h (assumed) |
    /// | redis | 5.2 ms (FMI) | 100 MB/s single, 400 aggregate (FMI) | 512 KiB | push | instance $0.017/h (assumed) |
    /// | s3 | 40.4 ms (FMI) | 50 MB/s (FMI) | 64 MiB, multipart > 16 MiB | polls 100 ms → 1 s | PUT $0.005/1k, GET $0.0004/1k |
    /// | dynamodb | 10 ms (estimate) | 10 MB/s (estimate) | 350,000 B | polls 100 ms → 1 s | $0.625/M write units (1 KB), $0.125/M read units (4 KB) |
    pub fn defaults(kind: ChannelKind) -> ChannelParams {
        use defaults::*;
        let base = ChannelParams {
            alpha: Seconds::ZERO,
            beta: SecondsPerByte(0.0),
            aggregate_beta: SecondsPerByte(0.0),
            request: Seconds::ZERO,
            exchange_extra: Seconds::ZERO,
            push: true,
            poll_initial: Seconds(0.1),
            poll_max: Seconds(1.0),
            max_chunk: None,
            put_concurrency: 4,
            multipart_threshold: None,
            part_size: Bytes::mib(8),
            item_overhead: Bytes(0),
            counters: false,
            native_bcast: false,
            native_barrier: false,
            prices: Prices::free(),
        };
        let with_alpha = |ms: f64, mb: f64, p: ChannelParams| ChannelParams {
            alpha: Seconds::from_millis(ms),
            request: Seconds::from_millis(ms / 2.0),
            beta: SecondsPerByte::from_mb_per_sec(mb),
            ..p
        };
        match kind {
            ChannelKind::Tcp => with_alpha(
                0.34,
                400.0,
                ChannelParams {
                    prices: Prices {
                        instance_per_hour: Dollars(RENDEZVOUS_USD_PER_HOUR),
                        ..Prices::free()
                    },
                    ..base
                },
            ),
            ChannelKind::Redis => with_alpha(
                5.2,
                100.0,
                ChannelParams {
                    aggregate_beta: SecondsPerByte::from_mb_per_sec(400.0),
                    max_chunk: Some(Bytes(512 << 10)),
                    counters: true,
                    native_bcast: true,
                    native_barrier: true,
                    prices: Prices {
                        instance_per_hour: Dollars(REDIS_USD_PER_HOUR),
                        ..Prices::free()
                    },
                    ..base
                },
            ),
            ChannelKind::S3 => with_alpha(
                40.4,
                50.0,
                ChannelParams {
                    push: false,
                    max_chunk: Some(Bytes::mib(64)),
                    multipart_threshold: Some(Bytes::mib(16)),
                    prices: Prices {
                        put_per_1k: Dollars(S3_PUT_PER_1K),
                        get_per_1k: Dollars(S3_GET_PER_1K),
                        list_per_1k: Dollars(S3_PUT_PER_1K),
                        ..Prices::free()
                    },
                    ..base
                },
            ),
            ChannelKind::DynamoDb => with_alpha(
                10.0,
                10.0,
                ChannelParams {
                    push: false,
                    max_chunk: Some(Bytes(350_000)),
                    item_overhead: Bytes(80),
                    counters: true,
                    native_bcast: true,
                    native_barrier: true,
                    prices: Prices {
                        write_unit_per_1m: Dollars(DYNAMODB_WRITE_PER_1M),
                        read_unit_per_1m: Dollars(DYNAMODB_READ_PER_1M),
                        ..Prices::free()
                    },
                    ..base
                },
            ),
        }
    }

    /// S3 Express One Zone: PUT $0.00113/1k, GET $0.00003/1k (REFERENCE.md); α 10 ms is an
    /// estimate (AWS advertises single-digit-millisecond requests). Per-GB upload and retrieval
    /// charges above 512 KB per request are not modelled. `[model.s3] preset = "express"`.
    pub fn s3_express() -> ChannelParams {
        let s3 = ChannelParams::defaults(ChannelKind::S3);
        ChannelParams {
            alpha: Seconds::from_millis(10.0),
            request: Seconds::from_millis(5.0),
            prices: Prices {
                put_per_1k: Dollars(defaults::S3_EXPRESS_PUT_PER_1K),
                get_per_1k: Dollars(defaults::S3_EXPRESS_GET_PER_1K),
                list_per_1k: Dollars(defaults::S3_EXPRESS_PUT_PER_1K),
                ..s3.prices.clone()
            },
            ..s3
        }
    }

    /// Whether the storage-native broadcast applies.
    pub fn has_native_bcast(&self) -> bool {
        self.counters && self.native_bcast
    }

    /// Whether the counter barrier applies.
    pub fn has_native_barrier(&self) -> bool {
        self.counters && self.native_barrier
    }

    fn check(&self, kind: ChannelKind) -> Result<(), ModelError> {
        let bad = |what: &str| Err(ModelError::Invalid(format!("[model.{kind}] {what}")));
        let nonneg = |x: f64| x.is_finite() && x >= 0.0;
        let p = &self.prices;
        if ![
            self.alpha.0,
            self.beta.0,
            self.aggregate_beta.0,
            self.request.0,
            self.exchange_extra.0,
            p.put_per_1k.0,
            p.get_per_1k.0,
            p.delete_per_1k.0,
            p.list_per_1k.0,
            p.counter_per_1k.0,
            p.write_unit_per_1m.0,
            p.read_unit_per_1m.0,
            p.instance_per_hour.0,
        ]
        .into_iter()
        .all(nonneg)
        {
            return bad("times, bandwidths and prices must be finite and >= 0");
        }
        let polls_ok = self.poll_initial.0 >= 1e-6
            && self.poll_max.0 <= 3600.0
            && self.poll_max.0 >= self.poll_initial.0;
        if !self.push && !polls_ok {
            return bad("poll_initial_ms must be >= 0.001 and <= poll_max_ms <= 3600000");
        }
        if matches!(self.max_chunk, Some(Bytes(c)) if c <= HEADER_BYTES) {
            return bad("max_chunk must exceed the 13-byte chunk header (0: no chunking)");
        }
        if self.put_concurrency == 0 {
            return bad("put_concurrency must be at least 1");
        }
        if self.part_size.0 == 0 || p.write_unit.0 == 0 || p.read_unit.0 == 0 {
            return bad("part_size, write_unit_bytes and read_unit_bytes must be positive");
        }
        Ok(())
    }
}

/// Bytes of the header the storage adapter puts in chunk 0 of every message.
pub const HEADER_BYTES: u64 = 13;

/// The whole model configuration: the `[model]` section of the fmi config file.
///
/// ```toml
/// [model]
/// objective = "cheap"              # "fast" (default) | "cheap" | dollars per second of latency
/// function_memory_gb = 2.0         # memory of each function (GB-seconds billed while it waits)
/// function_usd_per_gb_second = 0.0000166667
/// reduce_mb_per_sec = 1000         # γ: element-wise reduction speed
///
/// [model.s3]                       # any key of any channel; the rest keep their defaults
/// preset = "express"               # S3 Express One Zone prices (s3 only)
/// alpha_ms = 12.0
/// bandwidth_mb_per_sec = 80
/// ```
///
/// Unknown keys are errors. Every value is checked (finite, non-negative, polls ordered).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "ModelFile", into = "ModelFile")]
#[non_exhaustive]
pub struct ModelConfig {
    /// The default objective of a communicator (each call may override it).
    pub objective: Objective,
    /// Memory of every function in GB: each rank pays `seconds × memory × price` while an
    /// operation runs. 0 for ranks that are not billed per second (an HPC job).
    pub function_memory_gb: f64,
    /// Price of one GB-second of function time (Lambda x86: $0.0000166667).
    pub function_usd_per_gb_second: Dollars,
    /// γ: time per byte of an element-wise reduction.
    pub gamma: SecondsPerByte,
    /// Direct TCP.
    pub tcp: ChannelParams,
    /// Redis.
    pub redis: ChannelParams,
    /// S3.
    pub s3: ChannelParams,
    /// DynamoDB.
    pub dynamodb: ChannelParams,
}

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig {
            objective: Objective::Fast,
            function_memory_gb: defaults::FUNCTION_MEMORY_GB,
            function_usd_per_gb_second: Dollars(defaults::LAMBDA_USD_PER_GB_SECOND),
            gamma: SecondsPerByte::from_mb_per_sec(defaults::REDUCE_MB_PER_SEC),
            tcp: ChannelParams::defaults(ChannelKind::Tcp),
            redis: ChannelParams::defaults(ChannelKind::Redis),
            s3: ChannelParams::defaults(ChannelKind::S3),
            dynamodb: ChannelParams::defaults(ChannelKind::DynamoDb),
        }
    }
}

impl ModelConfig {
    /// The parameters of one channel.
    pub fn params(&self, kind: ChannelKind) -> &ChannelParams {
        match kind {
            ChannelKind::Tcp => &self.tcp,
            ChannelKind::Redis => &self.redis,
            ChannelKind::S3 => &self.s3,
            ChannelKind::DynamoDb => &self.dynamodb,
        }
    }

    /// The parameters of one channel, to change them in code.
    pub fn params_mut(&mut self, kind: ChannelKind) -> &mut ChannelParams {
        match kind {
            ChannelKind::Tcp => &mut self.tcp,
            ChannelKind::Redis => &mut self.redis,
            ChannelKind::S3 => &mut self.s3,
            ChannelKind::DynamoDb => &mut self.dynamodb,
        }
    }

    /// Dollars per second each rank costs while it waits (memory × GB-second price).
    pub fn function_usd_per_second(&self) -> f64 {
        self.function_memory_gb * self.function_usd_per_gb_second.0
    }

    /// Checks every value (the TOML parser does; call it after changing fields in code).
    pub fn validate(&self) -> Result<(), ModelError> {
        self.objective.check()?;
        let nonneg = |x: f64| x.is_finite() && x >= 0.0;
        if !(nonneg(self.function_memory_gb)
            && nonneg(self.function_usd_per_gb_second.0)
            && nonneg(self.gamma.0))
        {
            return Err(ModelError::Invalid(
                "[model] function_memory_gb, function_usd_per_gb_second and reduce_mb_per_sec \
                 must be finite and >= 0"
                    .into(),
            ));
        }
        for k in ChannelKind::ALL {
            self.params(k).check(k)?;
        }
        Ok(())
    }

    /// Parses a `[model]` table given as TOML text (the *contents* of the section, not the
    /// whole file; for a whole fmi config file see [`crate::JobConfig`]).
    pub fn from_toml(text: &str) -> Result<ModelConfig, ModelError> {
        toml::from_str(text).map_err(|e| ModelError::Invalid(e.to_string()))
    }

    /// The configuration as the TOML text of a `[model]` section (every value spelled out).
    pub fn to_toml(&self) -> String {
        let file = ModelFile::from(self.clone());
        // Every value is a plain number, bool or string: serialization cannot fail.
        toml::to_string(&file).unwrap_or_default()
    }
}

/// The `[model]` section as written: every key optional, unknown keys rejected.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelFile {
    /// A calibration profile (`fmi calibrate`'s output): its `[model.<channel>]` values fill
    /// the keys this section does not set. Resolved by [`crate::JobConfig`], relative to the
    /// configuration file's folder.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) profile: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    objective: Option<Objective>,
    #[serde(skip_serializing_if = "Option::is_none")]
    function_memory_gb: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    function_usd_per_gb_second: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reduce_mb_per_sec: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) tcp: Option<ChannelFile>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) redis: Option<ChannelFile>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) s3: Option<ChannelFile>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) dynamodb: Option<ChannelFile>,
}

impl ModelFile {
    /// The channel tables of `f` alone.
    pub(crate) fn only_channels(f: &ModelFile) -> ModelFile {
        ModelFile {
            reduce_mb_per_sec: f.reduce_mb_per_sec,
            tcp: f.tcp.clone(),
            redis: f.redis.clone(),
            s3: f.s3.clone(),
            dynamodb: f.dynamodb.clone(),
            ..ModelFile::default()
        }
    }

    /// Fills every channel key this file leaves unset from `profile`'s, and the reduction
    /// speed.
    pub(crate) fn fill_from(&mut self, profile: &ModelFile) {
        if self.reduce_mb_per_sec.is_none() {
            self.reduce_mb_per_sec = profile.reduce_mb_per_sec;
        }
        for kind in ChannelKind::ALL {
            let theirs = match kind {
                ChannelKind::Tcp => &profile.tcp,
                ChannelKind::Redis => &profile.redis,
                ChannelKind::S3 => &profile.s3,
                ChannelKind::DynamoDb => &profile.dynamodb,
            };
            if let Some(theirs) = theirs {
                self.channel_mut(kind).fill_from(theirs);
            }
        }
    }

    pub(crate) fn channel_mut(&mut self, kind: ChannelKind) -> &mut ChannelFile {
        let slot = match kind {
            ChannelKind::Tcp => &mut self.tcp,
            ChannelKind::Redis => &mut self.redis,
            ChannelKind::S3 => &mut self.s3,
            ChannelKind::DynamoDb => &mut self.dynamodb,
        };
        slot.get_or_insert_with(ChannelFile::default)
    }
}

/// One `[model.<channel>]` table as written.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ChannelFile {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) preset: Option<Preset>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) alpha_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) bandwidth_mb_per_sec: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) aggregate_mb_per_sec: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) request_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) exchange_extra_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) push: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) poll_initial_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) poll_max_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) max_chunk: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) put_concurrency: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) multipart_threshold: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) part_size: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) item_overhead: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) counters: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) native_bcast: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) native_barrier: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) put_usd_per_1k: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) get_usd_per_1k: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) delete_usd_per_1k: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) list_usd_per_1k: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) counter_usd_per_1k: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) write_unit_usd_per_1m: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) write_unit_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) read_unit_usd_per_1m: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) read_unit_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) instance_usd_per_hour: Option<f64>,
}

/// Named starting points for a channel's parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Preset {
    /// The channel's defaults.
    Standard,
    /// S3 Express One Zone (s3 only).
    Express,
}

fn opt_bytes(b: Option<u64>) -> Option<Bytes> {
    b.filter(|&b| b > 0).map(Bytes)
}

macro_rules! fill_fields {
    ($dst:ident, $src:ident; $($f:ident),*) => {
        $( if $dst.$f.is_none() { $dst.$f = $src.$f.clone(); } )*
    };
}

impl ChannelFile {
    /// Fills the keys this table leaves unset from `other`. A table that sets `alpha_ms` but
    /// not `request_ms` keeps `request_ms` unset (α/2 of its own α).
    fn fill_from(&mut self, other: &ChannelFile) {
        let own_alpha = self.alpha_ms.is_some();
        let request = self.request_ms;
        let me = self;
        fill_fields!(me, other; preset, alpha_ms, bandwidth_mb_per_sec, aggregate_mb_per_sec,
            request_ms, exchange_extra_ms, push, poll_initial_ms, poll_max_ms, max_chunk, put_concurrency,
            multipart_threshold, part_size, item_overhead, counters, native_bcast, native_barrier,
            put_usd_per_1k, get_usd_per_1k, delete_usd_per_1k, list_usd_per_1k, counter_usd_per_1k,
            write_unit_usd_per_1m, write_unit_bytes, read_unit_usd_per_1m, read_unit_bytes,
            instance_usd_per_hour);
        if own_alpha {
            me.request_ms = request;
        }
    }

    fn resolve(&self, kind: ChannelKind) -> Result<ChannelParams, ModelError> {
        let mut p = match self.preset {
            None | Some(Preset::Standard) => ChannelParams::defaults(kind),
            Some(Preset::Express) if kind == ChannelKind::S3 => ChannelParams::s3_express(),
            Some(Preset::Express) => {
                return Err(ModelError::Invalid(format!(
                    "[model.{kind}] preset = \"express\" exists for s3 only"
                )))
            }
        };
        if let Some(ms) = self.alpha_ms {
            p.alpha = Seconds::from_millis(ms);
            // A request is half a message unless said otherwise.
            p.request = Seconds::from_millis(ms / 2.0);
        }
        if let Some(mb) = self.bandwidth_mb_per_sec {
            if !(mb.is_finite() && mb > 0.0) {
                return Err(ModelError::Invalid(format!(
                    "[model.{kind}] bandwidth_mb_per_sec must be > 0"
                )));
            }
            p.beta = SecondsPerByte::from_mb_per_sec(mb);
        }
        if let Some(mb) = self.aggregate_mb_per_sec {
            p.aggregate_beta = SecondsPerByte::from_mb_per_sec(mb);
        }
        if let Some(ms) = self.request_ms {
            p.request = Seconds::from_millis(ms);
        }
        if let Some(ms) = self.exchange_extra_ms {
            p.exchange_extra = Seconds::from_millis(ms);
        }
        if let Some(v) = self.push {
            p.push = v;
        }
        if let Some(ms) = self.poll_initial_ms {
            p.poll_initial = Seconds::from_millis(ms);
        }
        if let Some(ms) = self.poll_max_ms {
            p.poll_max = Seconds::from_millis(ms);
        }
        if let Some(v) = self.max_chunk {
            p.max_chunk = opt_bytes(Some(v));
        }
        if let Some(v) = self.put_concurrency {
            p.put_concurrency = v;
        }
        if let Some(v) = self.multipart_threshold {
            p.multipart_threshold = opt_bytes(Some(v));
        }
        if let Some(v) = self.part_size {
            p.part_size = Bytes(v);
        }
        if let Some(v) = self.item_overhead {
            p.item_overhead = Bytes(v);
        }
        if let Some(v) = self.counters {
            p.counters = v;
        }
        if let Some(v) = self.native_bcast {
            p.native_bcast = v;
        }
        if let Some(v) = self.native_barrier {
            p.native_barrier = v;
        }
        let pr = &mut p.prices;
        let set = |slot: &mut Dollars, v: Option<f64>| {
            if let Some(v) = v {
                *slot = Dollars(v);
            }
        };
        set(&mut pr.put_per_1k, self.put_usd_per_1k);
        set(&mut pr.get_per_1k, self.get_usd_per_1k);
        set(&mut pr.delete_per_1k, self.delete_usd_per_1k);
        set(&mut pr.list_per_1k, self.list_usd_per_1k);
        set(&mut pr.counter_per_1k, self.counter_usd_per_1k);
        set(&mut pr.write_unit_per_1m, self.write_unit_usd_per_1m);
        set(&mut pr.read_unit_per_1m, self.read_unit_usd_per_1m);
        set(&mut pr.instance_per_hour, self.instance_usd_per_hour);
        if let Some(v) = self.write_unit_bytes {
            pr.write_unit = Bytes(v);
        }
        if let Some(v) = self.read_unit_bytes {
            pr.read_unit = Bytes(v);
        }
        Ok(p)
    }

    fn from_params(p: &ChannelParams) -> ChannelFile {
        let pr = &p.prices;
        ChannelFile {
            preset: None,
            alpha_ms: Some(p.alpha.millis()),
            bandwidth_mb_per_sec: Some(p.beta.mb_per_sec()),
            aggregate_mb_per_sec: Some(p.aggregate_beta.mb_per_sec()),
            request_ms: Some(p.request.millis()),
            exchange_extra_ms: Some(p.exchange_extra.millis()),
            push: Some(p.push),
            poll_initial_ms: Some(p.poll_initial.millis()),
            poll_max_ms: Some(p.poll_max.millis()),
            max_chunk: Some(p.max_chunk.map_or(0, |b| b.0)),
            put_concurrency: Some(p.put_concurrency),
            multipart_threshold: Some(p.multipart_threshold.map_or(0, |b| b.0)),
            part_size: Some(p.part_size.0),
            item_overhead: Some(p.item_overhead.0),
            counters: Some(p.counters),
            native_bcast: Some(p.native_bcast),
            native_barrier: Some(p.native_barrier),
            put_usd_per_1k: Some(pr.put_per_1k.0),
            get_usd_per_1k: Some(pr.get_per_1k.0),
            delete_usd_per_1k: Some(pr.delete_per_1k.0),
            list_usd_per_1k: Some(pr.list_per_1k.0),
            counter_usd_per_1k: Some(pr.counter_per_1k.0),
            write_unit_usd_per_1m: Some(pr.write_unit_per_1m.0),
            write_unit_bytes: Some(pr.write_unit.0),
            read_unit_usd_per_1m: Some(pr.read_unit_per_1m.0),
            read_unit_bytes: Some(pr.read_unit.0),
            instance_usd_per_hour: Some(pr.instance_per_hour.0),
        }
    }
}

impl TryFrom<ModelFile> for ModelConfig {
    type Error = ModelError;
    fn try_from(f: ModelFile) -> Result<ModelConfig, ModelError> {
        let d = ModelConfig::default();
        let channel = |file: &Option<ChannelFile>, kind| match file {
            Some(c) => c.resolve(kind),
            None => Ok(ChannelParams::defaults(kind)),
        };
        if f.profile.is_some() {
            return Err(ModelError::Invalid(
                "[model] profile is read from a whole configuration file (JobConfig, fmi \
                 Config::from_file), not from a bare [model] section"
                    .into(),
            ));
        }
        if matches!(f.reduce_mb_per_sec, Some(mb) if !(mb.is_finite() && mb > 0.0)) {
            return Err(ModelError::Invalid(
                "[model] reduce_mb_per_sec must be > 0".into(),
            ));
        }
        let cfg = ModelConfig {
            objective: f.objective.unwrap_or(d.objective),
            function_memory_gb: f.function_memory_gb.unwrap_or(d.function_memory_gb),
            function_usd_per_gb_second: f
                .function_usd_per_gb_second
                .map_or(d.function_usd_per_gb_second, Dollars),
            gamma: f
                .reduce_mb_per_sec
                .map_or(d.gamma, SecondsPerByte::from_mb_per_sec),
            tcp: channel(&f.tcp, ChannelKind::Tcp)?,
            redis: channel(&f.redis, ChannelKind::Redis)?,
            s3: channel(&f.s3, ChannelKind::S3)?,
            dynamodb: channel(&f.dynamodb, ChannelKind::DynamoDb)?,
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

impl From<ModelConfig> for ModelFile {
    fn from(c: ModelConfig) -> ModelFile {
        ModelFile {
            profile: None,
            objective: Some(c.objective),
            function_memory_gb: Some(c.function_memory_gb),
            function_usd_per_gb_second: Some(c.function_usd_per_gb_second.0),
            reduce_mb_per_sec: Some(c.gamma.mb_per_sec()),
            tcp: Some(ChannelFile::from_params(&c.tcp)),
            redis: Some(ChannelFile::from_params(&c.redis)),
            s3: Some(ChannelFile::from_params(&c.s3)),
            dynamodb: Some(ChannelFile::from_params(&c.dynamodb)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_match_the_reference() {
        let c = ModelConfig::default();
        c.validate().unwrap();
        assert_eq!(c.tcp.alpha, Seconds(0.00034));
        assert_eq!(c.redis.alpha, Seconds::from_millis(5.2));
        assert_eq!(c.s3.alpha, Seconds::from_millis(40.4));
        assert!((c.s3.beta.mb_per_sec() - 50.0).abs() < 1e-9);
        assert_eq!(c.dynamodb.max_chunk, Some(Bytes(350_000)));
        assert_eq!(c.s3.prices.put_per_1k, Dollars(0.005));
        assert_eq!(c.dynamodb.prices.write_unit_per_1m, Dollars(0.625));
        assert_eq!(c.s3.poll_initial, Seconds(0.1));
    }

    #[test]
    fn overrides_and_errors() {
        let c = ModelConfig::from_toml(
            "objective = \"cheap\"\nfunction_memory_gb = 2\n[s3]\npreset = \"express\"\n\
             alpha_ms = 12\n[dynamodb]\nmax_chunk = 100000\n",
        )
        .unwrap();
        assert_eq!(c.objective, Objective::Cheap);
        assert_eq!(c.function_memory_gb, 2.0);
        assert_eq!(c.s3.alpha, Seconds::from_millis(12.0));
        assert_eq!(c.s3.request, Seconds::from_millis(6.0));
        assert_eq!(c.s3.prices.put_per_1k, Dollars(0.00113));
        assert_eq!(c.dynamodb.max_chunk, Some(Bytes(100_000)));
        let w = ModelConfig::from_toml("objective = 0.5").unwrap();
        assert_eq!(
            w.objective,
            Objective::Weighted {
                usd_per_second: 0.5
            }
        );
        let w = ModelConfig::from_toml("objective = 2").unwrap();
        assert_eq!(
            w.objective,
            Objective::Weighted {
                usd_per_second: 2.0
            }
        );
        for bad in [
            "objektive = \"fast\"",
            "[s3]\nalpha = 3",
            "[sqs]\nalpha_ms = 3",
            "objective = \"slow\"",
            "objective = -1",
            "[s3]\nalpha_ms = -1",
            "[s3]\npoll_initial_ms = 2000",
            "[redis]\npreset = \"express\"",
            "[dynamodb]\nmax_chunk = 5",
        ] {
            assert!(ModelConfig::from_toml(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn toml_round_trip() {
        let c = ModelConfig::from_toml("objective = 0.25\n[s3]\npreset = \"express\"").unwrap();
        let text = c.to_toml();
        let back = ModelConfig::from_toml(&text).unwrap();
        assert_eq!(back.objective, c.objective);
        assert_eq!(back.s3.prices, c.s3.prices);
        assert_eq!(back.dynamodb.max_chunk, c.dynamodb.max_chunk);
        assert!((back.s3.alpha.0 - c.s3.alpha.0).abs() < 1e-15);
    }

    #[test]
    fn objective_parsing() {
        assert_eq!("fast".parse::<Objective>().unwrap(), Objective::Fast);
        assert_eq!("cheap".parse::<Objective>().unwrap(), Objective::Cheap);
        assert_eq!(
            "0.001".parse::<Objective>().unwrap(),
            Objective::Weighted {
                usd_per_second: 0.001
            }
        );
        assert!("-3".parse::<Objective>().is_err());
        assert!("NaN".parse::<Objective>().is_err());
        assert!("speedy".parse::<Objective>().is_err());
    }
}
