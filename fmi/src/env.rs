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
        Ok(EnvSettings {
            rank: Rank(rank),
            size,
            job,
            config: optional("FMI_CONFIG").map(PathBuf::from),
            rendezvous: optional("FMI_RENDEZVOUS"),
            token: optional("FMI_TOKEN"),
            channel: optional("FMI_CHANNEL"),
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
