//! The operations and algorithms the model prices, mirroring `fmi-collectives`.

use std::fmt;
use std::str::FromStr;

use fmi_collectives::{AllgatherAlgorithm, AllreduceAlgorithm, BcastAlgorithm};

use crate::params::ChannelKind;
use crate::ModelError;

/// An operation of the communicator. `bytes` always means what the collectives' cost table
/// means by n: the message (`send`), the vector (`bcast`, `reduce`, `allreduce`,
/// `reduce_scatter`, `scan`), the whole result (`gather`, `allgather`) or the root's whole
/// buffer (`scatter`), and for `alltoall` the bytes one rank sends in all.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Op {
    /// One point-to-point message (half a ping-pong).
    Send,
    /// Barrier (no data).
    Barrier,
    /// Broadcast from one root.
    Bcast,
    /// Gather to one root.
    Gather,
    /// Scatter from one root.
    Scatter,
    /// Reduction to one root.
    Reduce,
    /// Reduction to every rank.
    Allreduce,
    /// Gather to every rank.
    Allgather,
    /// Every rank sends a block to every rank.
    Alltoall,
    /// Reduction whose result is scattered in blocks.
    ReduceScatter,
    /// Inclusive prefix reduction (also exscan).
    Scan,
}

impl Op {
    /// Every operation, in the order `fmi explain` prints them.
    pub const ALL: [Op; 11] = [
        Op::Send,
        Op::Barrier,
        Op::Bcast,
        Op::Gather,
        Op::Scatter,
        Op::Reduce,
        Op::Allreduce,
        Op::Allgather,
        Op::Alltoall,
        Op::ReduceScatter,
        Op::Scan,
    ];

    /// The operation's name (`send`, `reduce_scatter`, …).
    pub fn name(self) -> &'static str {
        match self {
            Op::Send => "send",
            Op::Barrier => "barrier",
            Op::Bcast => "bcast",
            Op::Gather => "gather",
            Op::Scatter => "scatter",
            Op::Reduce => "reduce",
            Op::Allreduce => "allreduce",
            Op::Allgather => "allgather",
            Op::Alltoall => "alltoall",
            Op::ReduceScatter => "reduce_scatter",
            Op::Scan => "scan",
        }
    }

    /// Whether the operation carries data (all but the barrier).
    pub fn has_data(self) -> bool {
        self != Op::Barrier
    }

    /// The algorithms that implement it, in tie-breaking order (storage-native forms last).
    pub fn algorithms(self) -> &'static [Algorithm] {
        use Algorithm::*;
        match self {
            Op::Send => &[PointToPoint],
            Op::Barrier => &[Dissemination, CounterBarrier],
            Op::Bcast => &[
                Binomial,
                ScatterAllgather,
                NativeBcast,
                StagedBcastTcp,
                StagedBcastRedis,
            ],
            Op::Gather | Op::Scatter | Op::Reduce => &[Binomial],
            Op::Allreduce => &[RecursiveDoubling, Rabenseifner, Ring],
            Op::Allgather => &[RecursiveDoubling, Ring],
            Op::Alltoall => &[Pairwise],
            Op::ReduceScatter => &[Ring, ReduceThenScatter],
            Op::Scan => &[RecursiveDoubling],
        }
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Op {
    type Err = ModelError;
    /// The names of [`Op::name`]; `pingpong` is accepted for `send`, `exscan` for `scan`.
    fn from_str(s: &str) -> Result<Op, ModelError> {
        match s {
            "pingpong" => return Ok(Op::Send),
            "exscan" => return Ok(Op::Scan),
            _ => {}
        }
        Op::ALL
            .into_iter()
            .find(|o| o.name() == s)
            .ok_or_else(|| ModelError::UnknownName {
                what: "operation",
                name: s.to_owned(),
                known: "send, barrier, bcast, gather, scatter, reduce, allreduce, allgather, \
                        alltoall, reduce_scatter, scan",
            })
    }
}

/// An algorithm (see the cost table of `fmi-collectives`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Algorithm {
    /// One message from sender to receiver.
    PointToPoint,
    /// Dissemination barrier: ⌈lg p⌉ rounds of empty messages.
    Dissemination,
    /// Storage-native barrier on an atomic counter and a release flag.
    CounterBarrier,
    /// Binomial tree (bcast, gather, scatter, reduce).
    Binomial,
    /// Binomial scatter then ring allgather (large broadcasts).
    ScatterAllgather,
    /// Storage-native broadcast: the root writes once, the other N−1 ranks read.
    NativeBcast,
    /// Recursive doubling (allreduce, allgather, scan).
    RecursiveDoubling,
    /// Reduce-scatter by recursive halving then allgather by recursive doubling.
    Rabenseifner,
    /// Ring (allreduce, allgather, reduce_scatter).
    Ring,
    /// Pairwise exchange (alltoall).
    Pairwise,
    /// Reduce to rank 0, then binomial scatter (reduce_scatter of non-commutative ops).
    ReduceThenScatter,
    /// Mixed-channel broadcast: the root stores the payload once on the (storage) channel, the
    /// readiness signal and the receivers' acknowledgements go over TCP, so receivers read the
    /// value once and never poll; the root deletes it after the acknowledgements.
    StagedBcastTcp,
    /// The same with the signal over Redis (blocking reads: still no polling).
    StagedBcastRedis,
}

impl Algorithm {
    /// The algorithm's name (`recursive_doubling`, `native_bcast`, …), as the `[collectives]`
    /// section spells the ones it can force.
    pub fn name(self) -> &'static str {
        match self {
            Algorithm::PointToPoint => "p2p",
            Algorithm::Dissemination => "dissemination",
            Algorithm::CounterBarrier => "counter_barrier",
            Algorithm::Binomial => "binomial",
            Algorithm::ScatterAllgather => "scatter_allgather",
            Algorithm::NativeBcast => "native_bcast",
            Algorithm::RecursiveDoubling => "recursive_doubling",
            Algorithm::Rabenseifner => "rabenseifner",
            Algorithm::Ring => "ring",
            Algorithm::Pairwise => "pairwise",
            Algorithm::ReduceThenScatter => "reduce_then_scatter",
            Algorithm::StagedBcastTcp => "staged_bcast_tcp",
            Algorithm::StagedBcastRedis => "staged_bcast_redis",
        }
    }

    /// The channel a mixed-channel algorithm signals over (`None` for single-channel ones).
    pub fn signal(self) -> Option<ChannelKind> {
        match self {
            Algorithm::StagedBcastTcp => Some(ChannelKind::Tcp),
            Algorithm::StagedBcastRedis => Some(ChannelKind::Redis),
            _ => None,
        }
    }

    /// Whether it is a storage-native form that the channel runs itself (the collectives use it
    /// whenever the channel offers it).
    pub fn is_native(self) -> bool {
        matches!(self, Algorithm::NativeBcast | Algorithm::CounterBarrier)
    }

    /// Forces this algorithm for `op` in an `fmi_collectives::Config`, where the collectives can
    /// be forced (bcast, allreduce, allgather). Returns false when the algorithm is not one a
    /// `Config` can force (native forms, the only algorithm of an operation, reduce_scatter's
    /// choice, which follows the op's commutativity): nothing is changed then.
    pub fn force(self, op: Op, config: &mut fmi_collectives::Config) -> bool {
        match (op, self) {
            (Op::Bcast, Algorithm::Binomial) => config.force.bcast = Some(BcastAlgorithm::Binomial),
            (Op::Bcast, Algorithm::ScatterAllgather) => {
                config.force.bcast = Some(BcastAlgorithm::ScatterAllgather)
            }
            (Op::Allreduce, Algorithm::RecursiveDoubling) => {
                config.force.allreduce = Some(AllreduceAlgorithm::RecursiveDoubling)
            }
            (Op::Allreduce, Algorithm::Rabenseifner) => {
                config.force.allreduce = Some(AllreduceAlgorithm::Rabenseifner)
            }
            (Op::Allreduce, Algorithm::Ring) => {
                config.force.allreduce = Some(AllreduceAlgorithm::Ring)
            }
            (Op::Allgather, Algorithm::RecursiveDoubling) => {
                config.force.allgather = Some(AllgatherAlgorithm::RecursiveDoubling)
            }
            (Op::Allgather, Algorithm::Ring) => {
                config.force.allgather = Some(AllgatherAlgorithm::Ring)
            }
            _ => return false,
        }
        true
    }
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Algorithm {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<Algorithm, ModelError> {
        use Algorithm::*;
        [
            PointToPoint,
            Dissemination,
            CounterBarrier,
            Binomial,
            ScatterAllgather,
            NativeBcast,
            RecursiveDoubling,
            Rabenseifner,
            Ring,
            Pairwise,
            ReduceThenScatter,
            StagedBcastTcp,
            StagedBcastRedis,
        ]
        .into_iter()
        .find(|a| a.name() == s)
        .ok_or_else(|| ModelError::UnknownName {
            what: "algorithm",
            name: s.to_owned(),
            known: "p2p, dissemination, counter_barrier, binomial, scatter_allgather, \
                    native_bcast, recursive_doubling, rabenseifner, ring, pairwise, \
                    reduce_then_scatter, staged_bcast_tcp, staged_bcast_redis",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for op in Op::ALL {
            assert_eq!(op.name().parse::<Op>().unwrap(), op);
            for a in op.algorithms() {
                assert_eq!(a.name().parse::<Algorithm>().unwrap(), *a);
            }
        }
        assert_eq!("pingpong".parse::<Op>().unwrap(), Op::Send);
        assert!("allreduse".parse::<Op>().is_err());
    }

    #[test]
    fn forcing() {
        let mut c = fmi_collectives::Config::default();
        assert!(Algorithm::Ring.force(Op::Allreduce, &mut c));
        assert_eq!(c.force.allreduce, Some(AllreduceAlgorithm::Ring));
        assert!(Algorithm::ScatterAllgather.force(Op::Bcast, &mut c));
        assert_eq!(c.force.bcast, Some(BcastAlgorithm::ScatterAllgather));
        assert!(!Algorithm::NativeBcast.force(Op::Bcast, &mut c));
        assert!(!Algorithm::Binomial.force(Op::Reduce, &mut c));
    }
}
