//! Reading the model out of a whole fmi configuration file.

use crate::params::{ChannelKind, ModelConfig, ModelFile};
use crate::ModelError;

/// What the model takes from an fmi configuration file: the `[model]` section, the storage
/// channels it sets up (`[channels.*]`), the adapter settings that shape the channels
/// (`[storage]` polls, chunk cap, concurrency and native collectives; `max_value`,
/// `multipart_threshold` and `part_size` of `[channels.*]`), and `channel`.
///
/// Adapter settings describe what the channel will really do, so they replace the model's
/// defaults; a key that `[model.<channel>]` sets itself wins over them. Every other section is
/// left to the `fmi` crate, which checks it.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct JobConfig {
    /// The model, adapter settings applied.
    pub model: ModelConfig,
    /// The storage channels the file configures, in channel order.
    pub storage_channels: Vec<ChannelKind>,
    /// The file's `channel = "..."`, if any.
    pub channel: Option<String>,
}

fn int(t: &toml::Table, section: &str, key: &str) -> Result<Option<u64>, ModelError> {
    match t.get(key) {
        None => Ok(None),
        Some(toml::Value::Integer(i)) if *i >= 0 => Ok(Some(*i as u64)),
        Some(v) => Err(ModelError::Invalid(format!(
            "[{section}] {key} = {v}: expected a non-negative integer"
        ))),
    }
}

fn boolean(t: &toml::Table, section: &str, key: &str) -> Result<Option<bool>, ModelError> {
    match t.get(key) {
        None => Ok(None),
        Some(toml::Value::Boolean(b)) => Ok(Some(*b)),
        Some(v) => Err(ModelError::Invalid(format!(
            "[{section}] {key} = {v}: expected true or false"
        ))),
    }
}

fn table<'a>(
    v: Option<&'a toml::Value>,
    name: &str,
) -> Result<Option<&'a toml::Table>, ModelError> {
    match v {
        None => Ok(None),
        Some(toml::Value::Table(t)) => Ok(Some(t)),
        Some(_) => Err(ModelError::Invalid(format!("{name} must be a table"))),
    }
}

impl JobConfig {
    /// Parses the text of an fmi configuration file. A relative `[model] profile` path is
    /// taken relative to the current folder (see [`JobConfig::from_toml_in`]).
    pub fn from_toml(text: &str) -> Result<JobConfig, ModelError> {
        JobConfig::from_toml_in(text, None)
    }

    /// Parses the text of an fmi configuration file whose relative paths (`[model] profile`)
    /// are relative to `dir` (the file's folder; `None`: the current folder).
    pub fn from_toml_in(
        text: &str,
        dir: Option<&std::path::Path>,
    ) -> Result<JobConfig, ModelError> {
        let root: toml::Table =
            toml::from_str(text).map_err(|e| ModelError::Invalid(e.to_string()))?;
        let mut file: ModelFile = match root.get("model") {
            None => ModelFile::default(),
            Some(v) => v
                .clone()
                .try_into()
                .map_err(|e: toml::de::Error| ModelError::Invalid(format!("[model]: {e}")))?,
        };
        if let Some(profile) = file.profile.take() {
            let path = match dir {
                Some(d) => d.join(&profile),
                None => std::path::PathBuf::from(&profile),
            };
            file.fill_from(&read_profile(&path)?);
        }
        let channel = match root.get("channel") {
            None => None,
            Some(toml::Value::String(s)) => Some(s.clone()),
            Some(v) => {
                return Err(ModelError::Invalid(format!(
                    "channel = {v}: expected a channel name"
                )))
            }
        };
        let defaults = ModelConfig::default();
        let mut storage_channels = Vec::new();
        let mut max_value = std::collections::BTreeMap::new();
        if let Some(chs) = table(root.get("channels"), "[channels]")? {
            for (name, v) in chs {
                let kind: ChannelKind = name.parse()?;
                if !kind.is_storage() {
                    return Err(ModelError::Invalid(
                        "[channels.tcp] does not exist: TCP is set up by the rendezvous \
                         (FMI_RENDEZVOUS)"
                            .into(),
                    ));
                }
                storage_channels.push(kind);
                let section = format!("channels.{name}");
                let t = table(Some(v), &format!("[{section}]"))?
                    .cloned()
                    .unwrap_or_default();
                if let Some(m) = int(&t, &section, "max_value")? {
                    max_value.insert(kind, m);
                }
                if kind == ChannelKind::S3 {
                    let c = file.channel_mut(kind);
                    if c.multipart_threshold.is_none() {
                        c.multipart_threshold = int(&t, &section, "multipart_threshold")?;
                    }
                    if c.part_size.is_none() {
                        c.part_size = int(&t, &section, "part_size")?;
                    }
                }
            }
        }
        storage_channels.sort_unstable();
        let storage = table(root.get("storage"), "[storage]")?
            .cloned()
            .unwrap_or_default();
        let poll_initial = int(&storage, "storage", "poll_initial_ms")?;
        let poll_max = int(&storage, "storage", "poll_max_ms")?;
        let max_chunk = int(&storage, "storage", "max_chunk")?;
        let concurrency = int(&storage, "storage", "put_concurrency")?;
        let native_bcast = boolean(&storage, "storage", "native_bcast")?;
        let native_barrier = boolean(&storage, "storage", "native_barrier")?;
        for kind in [ChannelKind::Redis, ChannelKind::S3, ChannelKind::DynamoDb] {
            let base = max_value
                .get(&kind)
                .copied()
                .or_else(|| defaults.params(kind).max_chunk.map(|b| b.0));
            let chunk = match (base, max_chunk) {
                (Some(b), Some(m)) => Some(b.min(m)),
                (b, m) => b.or(m),
            };
            let explicit_chunk = max_value.contains_key(&kind) || max_chunk.is_some();
            let c = file.channel_mut(kind);
            if c.max_chunk.is_none() && explicit_chunk {
                c.max_chunk = chunk;
            }
            if kind != ChannelKind::Redis {
                if c.poll_initial_ms.is_none() {
                    c.poll_initial_ms = poll_initial.map(|v| v as f64);
                }
                if c.poll_max_ms.is_none() {
                    c.poll_max_ms = poll_max.map(|v| v as f64);
                }
            }
            if c.put_concurrency.is_none() {
                c.put_concurrency = concurrency.map(|v| u32::try_from(v).unwrap_or(u32::MAX));
            }
            if c.native_bcast.is_none() {
                c.native_bcast = native_bcast;
            }
            if c.native_barrier.is_none() {
                c.native_barrier = native_barrier;
            }
        }
        let model = ModelConfig::try_from(file)?;
        Ok(JobConfig {
            model,
            storage_channels,
            channel,
        })
    }

    /// Reads and parses a configuration file.
    pub fn from_file(path: &std::path::Path) -> Result<JobConfig, ModelError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ModelError::Invalid(format!("cannot read {}: {e}", path.display())))?;
        JobConfig::from_toml_in(&text, path.parent())
            .map_err(|e| ModelError::Invalid(format!("{}: {e}", path.display())))
    }

    /// The channels a job with this file has: the configured storage channels, plus TCP when
    /// a rendezvous is used (`rendezvous`, e.g. `FMI_RENDEZVOUS` is set, as `fmi run` always
    /// does) or the file names `channel = "tcp"`.
    pub fn channels(&self, rendezvous: bool) -> Vec<ChannelKind> {
        let mut v = self.storage_channels.clone();
        if rendezvous || self.channel.as_deref() == Some("tcp") {
            v.insert(0, ChannelKind::Tcp);
        }
        v
    }
}

/// Reads a calibration profile: a TOML file of `[model.<channel>]` tables and the measured
/// `[model] reduce_mb_per_sec` only (what `fmi calibrate` writes; comments say what was
/// measured).
pub(crate) fn read_profile(path: &std::path::Path) -> Result<ModelFile, ModelError> {
    let bad =
        |why: String| ModelError::Invalid(format!("[model] profile = {:?}: {why}", path.display()));
    let text = std::fs::read_to_string(path).map_err(|e| bad(format!("cannot read it: {e}")))?;
    let root: toml::Table = toml::from_str(&text).map_err(|e| bad(e.to_string()))?;
    if let Some(k) = root.keys().find(|k| *k != "model") {
        return Err(bad(format!(
            "unexpected key {k:?}: a profile holds [model.<channel>] tables and \
             reduce_mb_per_sec only"
        )));
    }
    let file: ModelFile = match root.get("model") {
        None => ModelFile::default(),
        Some(v) => v
            .clone()
            .try_into()
            .map_err(|e: toml::de::Error| bad(e.to_string()))?,
    };
    if file != ModelFile::only_channels(&file) {
        return Err(bad(
            "a profile holds [model.<channel>] tables and reduce_mb_per_sec only (objective \
             and the function's prices belong in the configuration's [model])"
                .into(),
        ));
    }
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::units::{Bytes, Seconds};

    #[test]
    fn reads_channels_adapter_settings_and_model() {
        let j = JobConfig::from_toml(
            r#"
            deadline_secs = 5
            channel = "s3"
            [collectives]
            allreduce_large_bytes = 1
            [channels.dynamodb]
            table = "fmi"
            max_value = 200000
            [channels.s3]
            bucket = "b"
            multipart_threshold = 33554432
            [storage]
            poll_initial_ms = 20
            poll_max_ms = 500
            native_bcast = false
            [model]
            objective = "cheap"
            [model.s3]
            poll_initial_ms = 50
            "#,
        )
        .unwrap();
        assert_eq!(
            j.storage_channels,
            vec![ChannelKind::S3, ChannelKind::DynamoDb]
        );
        assert_eq!(j.channel.as_deref(), Some("s3"));
        let m = &j.model;
        assert_eq!(m.dynamodb.max_chunk, Some(Bytes(200_000)));
        assert_eq!(m.s3.max_chunk, Some(Bytes::mib(64)));
        assert_eq!(m.s3.multipart_threshold, Some(Bytes::mib(32)));
        assert_eq!(m.dynamodb.poll_initial, Seconds(0.02));
        assert_eq!(m.s3.poll_initial, Seconds(0.05), "[model.s3] wins");
        assert_eq!(m.s3.poll_max, Seconds(0.5));
        assert!(!m.dynamodb.native_bcast && !m.redis.native_bcast);
        assert!(m.dynamodb.native_barrier);
        assert_eq!(
            j.channels(false),
            vec![ChannelKind::S3, ChannelKind::DynamoDb]
        );
        assert_eq!(j.channels(true)[0], ChannelKind::Tcp);
    }

    #[test]
    fn a_profile_fills_what_the_model_section_leaves_unset() {
        let dir = std::env::temp_dir().join(format!("fmi-model-profile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("p.toml"),
            "# measured\n[model]\nreduce_mb_per_sec = 8000\n\
             [model.s3]\nalpha_ms = 4.0\nbandwidth_mb_per_sec = 200\n\
             [model.redis]\nalpha_ms = 0.1\n",
        )
        .unwrap();
        let text = "[channels.s3]\nbucket = \"b\"\n[model]\nprofile = \"p.toml\"\n\
                    [model.redis]\nalpha_ms = 1.0\n";
        let j = JobConfig::from_toml_in(text, Some(&dir)).unwrap();
        assert_eq!(j.model.s3.alpha, Seconds::from_millis(4.0));
        assert_eq!(j.model.s3.request, Seconds::from_millis(2.0));
        assert!((j.model.s3.beta.mb_per_sec() - 200.0).abs() < 1e-9);
        assert_eq!(
            j.model.redis.alpha,
            Seconds::from_millis(1.0),
            "the config wins"
        );
        assert_eq!(j.model.redis.request, Seconds::from_millis(0.5));
        assert!(
            (j.model.gamma.mb_per_sec() - 8000.0).abs() < 1e-6,
            "measured reduction"
        );
        let own = format!("{text}\n");
        let own = own.replace("[model]\n", "[model]\nreduce_mb_per_sec = 500\n");
        let mine = JobConfig::from_toml_in(&own, Some(&dir)).unwrap();
        assert!(
            (mine.model.gamma.mb_per_sec() - 500.0).abs() < 1e-6,
            "the config wins"
        );
        let path = dir.join("job.toml");
        std::fs::write(&path, text).unwrap();
        assert_eq!(JobConfig::from_file(&path).unwrap().model, j.model);
        std::fs::write(dir.join("bad.toml"), "[model]\nobjective = \"cheap\"\n").unwrap();
        let e = JobConfig::from_toml_in("[model]\nprofile = \"bad.toml\"", Some(&dir)).unwrap_err();
        assert!(e.to_string().contains("reduce_mb_per_sec only"), "{e}");
        let e =
            JobConfig::from_toml_in("[model]\nprofile = \"nope.toml\"", Some(&dir)).unwrap_err();
        assert!(e.to_string().contains("nope.toml"), "{e}");
        assert!(ModelConfig::from_toml("profile = \"p.toml\"").is_err());
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn errors() {
        assert!(JobConfig::from_toml("[channels.pigeon]\nx = 1").is_err());
        assert!(JobConfig::from_toml("[channels.tcp]").is_err());
        assert!(JobConfig::from_toml("[model]\nalpha_ms = 1").is_err());
        assert!(JobConfig::from_toml("[storage]\npoll_initial_ms = \"x\"").is_err());
        let empty = JobConfig::from_toml("").unwrap();
        assert_eq!(empty.model, ModelConfig::default());
        assert!(empty.channels(false).is_empty());
    }
}
