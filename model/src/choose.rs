//! The choice: the best (channel, algorithm) for one call under an objective.

use std::cmp::Ordering;

use crate::cost::{estimate, Estimate};
use crate::hash::config_hash;
use crate::ops::{Algorithm, Op};
use crate::params::{ChannelKind, ModelConfig, Objective};
use crate::units::{Bytes, Dollars, Seconds};
use crate::ModelError;

/// A (channel, algorithm) with its predicted time and price.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Candidate {
    /// The channel.
    pub channel: ChannelKind,
    /// The algorithm.
    pub algorithm: Algorithm,
    /// Predicted time of the operation.
    pub seconds: Seconds,
    /// Predicted dollars of the operation (all ranks).
    pub dollars: Dollars,
}

impl From<&Estimate> for Candidate {
    fn from(e: &Estimate) -> Candidate {
        Candidate {
            channel: e.channel,
            algorithm: e.algorithm,
            seconds: e.seconds,
            dollars: e.dollars,
        }
    }
}

impl std::fmt::Display for Candidate {
    /// `channel/algorithm`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.channel, self.algorithm)
    }
}

/// The model's decision for one call.
#[derive(Clone, Copy, Debug, PartialEq)]
#[non_exhaustive]
pub struct Choice {
    /// The channel to use.
    pub channel: ChannelKind,
    /// The algorithm to use.
    pub algorithm: Algorithm,
    /// Predicted time.
    pub seconds: Seconds,
    /// Predicted dollars (all ranks).
    pub dollars: Dollars,
    /// The best candidate on another channel (when there is another channel), else the next
    /// best algorithm on the same channel; `None` when there is no other candidate.
    pub runner_up: Option<Candidate>,
}

impl Choice {
    /// The choice as a [`Candidate`].
    pub fn best(&self) -> Candidate {
        Candidate {
            channel: self.channel,
            algorithm: self.algorithm,
            seconds: self.seconds,
            dollars: self.dollars,
        }
    }

    /// Forces the chosen algorithm for `op` in a collectives config where one can be forced
    /// (see [`Algorithm::force`]); false when nothing had to or could be changed.
    pub fn force(&self, op: Op, config: &mut fmi_collectives::Config) -> bool {
        self.algorithm.force(op, config)
    }
}

/// The channels in canonical (tie-breaking) order without duplicates: the model's answer
/// never depends on the order in which a rank lists its channels.
pub fn canonical(channels: &[ChannelKind]) -> Vec<ChannelKind> {
    let mut v = channels.to_vec();
    v.sort_unstable();
    v.dedup();
    v
}

/// Every applicable (channel, algorithm) for the call, in the fixed order: channels as in
/// [`ChannelKind::ALL`], algorithms as in [`Op::algorithms`].
pub fn estimates(
    config: &ModelConfig,
    op: Op,
    bytes: Bytes,
    ranks: u32,
    channels: &[ChannelKind],
) -> Result<Vec<Estimate>, ModelError> {
    if ranks == 0 {
        return Err(ModelError::Invalid("ranks must be at least 1".into()));
    }
    let channels = canonical(channels);
    if channels.is_empty() {
        return Err(ModelError::NoChannels);
    }
    Ok(channels
        .iter()
        .flat_map(|&ch| {
            op.algorithms()
                .iter()
                .filter_map(move |&a| estimate(config, ch, op, a, bytes, ranks))
        })
        // A mixed-channel algorithm needs its signal channel among the job's channels.
        .filter(|e| e.algorithm.signal().is_none_or(|s| channels.contains(&s)))
        .collect())
}

fn order(objective: Objective, a: &Estimate, b: &Estimate) -> Ordering {
    // `+ 0.0` turns a −0.0 into +0.0, which `total_cmp` would otherwise order first.
    let (a1, a2) = objective.key(a.seconds, a.dollars);
    let (b1, b2) = objective.key(b.seconds, b.dollars);
    (a1 + 0.0)
        .total_cmp(&(b1 + 0.0))
        .then((a2 + 0.0).total_cmp(&(b2 + 0.0)))
}

/// [`estimates`] best first under `objective`; equal candidates keep the fixed order.
pub fn ranked(
    config: &ModelConfig,
    op: Op,
    bytes: Bytes,
    ranks: u32,
    objective: Objective,
    channels: &[ChannelKind],
) -> Result<Vec<Estimate>, ModelError> {
    check_objective(objective)?;
    let mut all = estimates(config, op, bytes, ranks, channels)?;
    // A stable sort: ties stay in the fixed channel/algorithm order.
    all.sort_by(|a, b| order(objective, a, b));
    Ok(all)
}

fn check_objective(objective: Objective) -> Result<(), ModelError> {
    match objective {
        Objective::Weighted { usd_per_second }
            if !(usd_per_second.is_finite() && usd_per_second >= 0.0) =>
        {
            Err(ModelError::Invalid(format!(
                "objective weight {usd_per_second}: must be finite and >= 0"
            )))
        }
        _ => Ok(()),
    }
}

/// The best (channel, algorithm) for `op` on `bytes` over `ranks` ranks under `objective`,
/// among `channels` (in any order, duplicates ignored).
///
/// A pure function of its arguments: no clock, no randomness, no hash map, only IEEE basic
/// arithmetic; ties are broken by the fixed order of [`ChannelKind::ALL`] then
/// [`Op::algorithms`]. Every rank that calls it with the same arguments (check with
/// [`crate::config_hash`]) gets the same answer.
pub fn choose(
    config: &ModelConfig,
    op: Op,
    bytes: Bytes,
    ranks: u32,
    objective: Objective,
    channels: &[ChannelKind],
) -> Result<Choice, ModelError> {
    let all = ranked(config, op, bytes, ranks, objective, channels)?;
    let best = all.first().ok_or(ModelError::NoChannels)?;
    let runner_up = all
        .iter()
        .skip(1)
        .find(|e| e.channel != best.channel)
        .or_else(|| all.get(1))
        .map(Candidate::from);
    Ok(Choice {
        channel: best.channel,
        algorithm: best.algorithm,
        seconds: best.seconds,
        dollars: best.dollars,
        runner_up,
    })
}

/// A communicator's model: the configuration, the channels the job has and the default
/// objective, with their [`config_hash`] computed once.
///
/// [`Model::choose`] remembers its answers (up to [`CHOICE_CACHE`] of them, then it starts
/// over): ranking every channel and algorithm takes about 3 µs with four channels, a quarter
/// of an 8-byte allreduce over TCP, and a program calls the same few (op, size) pairs again and
/// again. A remembered answer is the one [`choose`] gives, so every rank still agrees.
#[derive(Debug)]
pub struct Model {
    config: ModelConfig,
    channels: Vec<ChannelKind>,
    objective: Objective,
    hash: u64,
    /// Answers of [`Model::choose`] (the default objective) by (op, bytes, ranks).
    cache: std::sync::Mutex<std::collections::HashMap<(Op, u64, u32), Choice>>,
}

/// At most this many answers are remembered by a [`Model`].
pub const CHOICE_CACHE: usize = 1024;

impl Clone for Model {
    fn clone(&self) -> Model {
        Model {
            config: self.config.clone(),
            channels: self.channels.clone(),
            objective: self.objective,
            hash: self.hash,
            cache: Default::default(),
        }
    }
}

impl PartialEq for Model {
    /// Models are equal when they choose alike: the remembered answers do not count.
    fn eq(&self, other: &Model) -> bool {
        self.config == other.config
            && self.channels == other.channels
            && self.objective == other.objective
            && self.hash == other.hash
    }
}

impl Model {
    /// A model over `channels` with the configuration's objective.
    pub fn new(config: ModelConfig, channels: &[ChannelKind]) -> Result<Model, ModelError> {
        config.validate()?;
        let channels = canonical(channels);
        if channels.is_empty() {
            return Err(ModelError::NoChannels);
        }
        let objective = config.objective;
        let hash = config_hash(&config, &channels, objective);
        Ok(Model {
            config,
            channels,
            objective,
            hash,
            cache: Default::default(),
        })
    }

    /// The same model with another default objective.
    pub fn with_objective(mut self, objective: Objective) -> Result<Model, ModelError> {
        check_objective(objective)?;
        self.objective = objective;
        self.hash = config_hash(&self.config, &self.channels, objective);
        self.cache = Default::default();
        Ok(self)
    }

    /// The configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The channels, in canonical order.
    pub fn channels(&self) -> &[ChannelKind] {
        &self.channels
    }

    /// The default objective.
    pub fn objective(&self) -> Objective {
        self.objective
    }

    /// [`config_hash`] of (configuration, channels, default objective): ranks compare it at
    /// bootstrap to make sure they will all choose alike.
    pub fn hash(&self) -> u64 {
        self.hash
    }

    /// [`choose`] with the default objective (remembered, see [`Model`]).
    pub fn choose(&self, op: Op, bytes: Bytes, ranks: u32) -> Result<Choice, ModelError> {
        let key = (op, bytes.0, ranks);
        // A poisoned lock only means another thread panicked while holding it; the map is
        // still consistent (one lookup, insert or clear at a time).
        let lock = || {
            self.cache
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
        };
        if let Some(choice) = lock().get(&key) {
            return Ok(*choice);
        }
        let choice = self.choose_with(op, bytes, ranks, self.objective)?;
        let mut map = lock();
        if map.len() >= CHOICE_CACHE {
            map.clear();
        }
        map.insert(key, choice);
        Ok(choice)
    }

    /// [`choose`] with an objective for this call only.
    pub fn choose_with(
        &self,
        op: Op,
        bytes: Bytes,
        ranks: u32,
        objective: Objective,
    ) -> Result<Choice, ModelError> {
        choose(&self.config, op, bytes, ranks, objective, &self.channels)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A remembered answer is the computed one, for every op and a ladder of sizes, and the
    /// memory stays bounded.
    #[test]
    fn remembered_choices_equal_computed_ones() {
        let channels = [
            ChannelKind::Tcp,
            ChannelKind::Redis,
            ChannelKind::S3,
            ChannelKind::DynamoDb,
        ];
        let model = Model::new(ModelConfig::default(), &channels).expect("model");
        for round in 0..2 {
            for op in [
                Op::Barrier,
                Op::Bcast,
                Op::Allreduce,
                Op::Alltoall,
                Op::Gather,
            ] {
                for shift in 0..28 {
                    let bytes = Bytes(1 << shift);
                    let fresh = choose(
                        model.config(),
                        op,
                        bytes,
                        8,
                        model.objective(),
                        model.channels(),
                    )
                    .expect("choose");
                    let kept = model.choose(op, bytes, 8).expect("model.choose");
                    assert_eq!(kept, fresh, "round {round}: {op:?} {bytes:?}");
                }
            }
        }
        for n in 0..(CHOICE_CACHE as u64 + 10) {
            model.choose(Op::Bcast, Bytes(n), 4).expect("choose");
        }
        assert!(model.cache.lock().expect("lock").len() <= CHOICE_CACHE);
        // A clone chooses alike and starts with nothing remembered.
        let copy = model.clone();
        assert_eq!(copy, model);
        assert!(copy.cache.lock().expect("lock").is_empty());
    }
}
