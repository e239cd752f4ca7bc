//! # fmi-collectives: MPI-style collectives written once over the point-to-point seam
//!
//! Every algorithm here talks to other ranks only through [`fmi_channels::Channel`]'s `send` and
//! `recv`; none knows whether bytes travel through memory, TCP or S3. Data are opaque bytes;
//! reductions see them through [`ReduceOp`], which the typed layer (`fmi`) builds from a datatype
//! and an operation.
//!
//! ```text
//!  fmi::Communicator (typed: &[T], Op)            one call = one sequence number = one base Tag
//!          │  bytes + ReduceOp + Ctx { channel, tag, deadline, config }
//!          ▼
//!  choose algorithm (by bytes, world size, Config; same on every rank)
//!          │
//!          ├─ channel offers a native form (NativeCollectives)?  → use it
//!          ▼
//!  binomial / recursive doubling / Rabenseifner / ring / pairwise / dissemination
//!          │  send/recv with tag.step(k)
//!          ▼
//!  dyn Channel
//! ```
//!
//! Every rank must call collectives in the same order with matching arguments, as in MPI: the
//! caller gives each call a fresh base tag (the communicator's operation sequence number).
//! Each algorithm derives its message tags from that base with [`Tag::step`], one step per
//! phase or round, and relies on the channel's per-(pair, tag) ordering when one step carries
//! several messages between the same two ranks.
//!
//! ## Algorithms and costs
//! For p ranks, n bytes (the whole vector; for gather-like operations the whole result), α the
//! per-message latency, β the time per byte and γ the reduction time per byte. "+ fold" marks the
//! two extra steps (α + nβ each) that recursive doubling and halving need when p is not a power
//! of two, as in MPICH.
//!
//! | operation | algorithm | cost |
//! |---|---|---|
//! | [`barrier`] | dissemination | ⌈lg p⌉ α |
//! | [`bcast`], [`bcast_into`] | binomial tree | ⌈lg p⌉ (α + nβ) |
//! | | binomial scatter + ring allgather | (⌈lg p⌉ + p − 1) α + 2 ((p−1)/p) nβ |
//! | [`gatherv`], [`scatterv`] | binomial tree | ⌈lg p⌉ α + ((p−1)/p) nβ (balanced lengths) |
//! | [`allgatherv`], [`allgather`] | recursive doubling | ⌈lg p⌉ α + ((p−1)/p) nβ + fold |
//! | | ring | (p − 1) α + ((p−1)/p) nβ |
//! | [`alltoallv`] | pairwise exchange | (p − 1) α + nβ (n = bytes one rank sends) |
//! | [`reduce`] | binomial tree | ⌈lg p⌉ (α + nβ + nγ); non-commutative, root ≠ 0: + α + nβ |
//! | [`allreduce`] | recursive doubling | lg p (α + nβ + nγ) + fold |
//! | | Rabenseifner | 2 lg p α + 2 ((p−1)/p) nβ + ((p−1)/p) nγ + fold |
//! | | ring (commutative ops) | 2 (p − 1) α + 2 ((p−1)/p) nβ + ((p−1)/p) nγ |
//! | [`reduce_scatter_block`] | ring (commutative ops) | (p − 1) α + ((p−1)/p) n (β + γ) |
//! | | reduce to 0 + binomial scatter | reduce + ⌈lg p⌉ α + ((p−1)/p) nβ |
//! | [`scan`], [`exscan`] | recursive doubling | ⌈lg p⌉ (α + nβ + 2nγ) |
//!
//! Choices between algorithms depend only on arguments every rank has (length, world size,
//! [`Config`]), except in [`bcast`], where only the root knows the length and tells the others
//! which algorithm it picked inside the first message each receives. A channel that offers a
//! native barrier or broadcast ([`fmi_channels::NativeCollectives`]) is used for it.
//!
//! ## Guarantees
//! - Input slices are never modified; reductions work on owned copies.
//! - Non-commutative reductions combine in rank order, lower ranks on the left.
//! - Every rank of an [`allreduce`] ends with the same bytes, even for floating point.
//! - A received contribution of the wrong length is [`fmi_channels::Error::CountMismatch`]
//!   (or `TypeMismatch` when it is not even a whole number of elements); a silent or dead peer is
//!   `Timeout` or `PeerLost` at the call's deadline, never a hang.
//! - Every message sent by a collective is received by it: nothing is left in the inboxes.

mod allgather;
mod allreduce;
mod alltoall;
mod barrier;
mod bcast;
mod gather;
mod reduce;
mod scan;
mod util;

pub use allgather::{allgather, allgather_into, allgatherv};
pub use allreduce::{allreduce, allreduce_into};
pub use alltoall::alltoallv;
pub use barrier::barrier;
pub use bcast::{bcast, bcast_into};
use fmi_channels::{Channel, Instant, Rank, Tag};
pub use gather::{gatherv, scatterv};
pub use reduce::{reduce, reduce_scatter_block};
pub use scan::{exscan, scan};

/// Thresholds and forced choices for algorithm selection. Every rank must use the same config.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct Config {
    /// Broadcasts of at least this many bytes use scatter + allgather (when the world has at
    /// least `bcast_large_min_ranks` ranks); smaller ones a binomial tree.
    pub bcast_large_bytes: usize,
    /// See `bcast_large_bytes`.
    pub bcast_large_min_ranks: u32,
    /// Allreduces of more than this many bytes use the large-message algorithm
    /// (`large_allreduce`); smaller ones recursive doubling.
    pub allreduce_large_bytes: usize,
    /// The algorithm for large allreduces.
    pub large_allreduce: AllreduceAlgorithm,
    /// Allgathers whose total result is at least this many bytes use the ring; smaller ones
    /// recursive doubling.
    pub allgather_ring_bytes: usize,
    /// Forced choices (for tests and benchmarks); `None` = automatic.
    pub force: Forced,
}

/// Algorithms forced regardless of size.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct Forced {
    /// Broadcast algorithm.
    pub bcast: Option<BcastAlgorithm>,
    /// Allreduce algorithm.
    pub allreduce: Option<AllreduceAlgorithm>,
    /// Allgather algorithm.
    pub allgather: Option<AllgatherAlgorithm>,
}

impl Default for Config {
    fn default() -> Self {
        // MPICH's defaults (see docs/architecture.md): allreduce recursive doubling up to 2048 B,
        // bcast binomial below 12288 B or fewer than 8 ranks.
        Config {
            bcast_large_bytes: 12_288,
            bcast_large_min_ranks: 8,
            allreduce_large_bytes: 2048,
            large_allreduce: AllreduceAlgorithm::Rabenseifner,
            allgather_ring_bytes: 512 * 1024,
            force: Forced::default(),
        }
    }
}

/// Broadcast algorithms.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum BcastAlgorithm {
    /// Binomial tree: ⌈lg p⌉ rounds, whole message each round.
    Binomial,
    /// Binomial scatter then ring allgather (van de Geijn): for large messages.
    ScatterAllgather,
}

/// Allreduce algorithms.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum AllreduceAlgorithm {
    /// Recursive doubling: lg p rounds, whole vector each round.
    RecursiveDoubling,
    /// Reduce-scatter by recursive halving, then allgather by recursive doubling.
    Rabenseifner,
    /// Ring reduce-scatter then ring allgather; needs a commutative op (non-commutative ops fall
    /// back to recursive doubling).
    Ring,
}

/// Allgather algorithms.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum AllgatherAlgorithm {
    /// Recursive doubling (with folding for non-powers of two).
    RecursiveDoubling,
    /// Ring: p−1 rounds, one block each.
    Ring,
}

/// A reduction seen at the byte level. `lhs op rhs` where `lhs` comes from lower ranks: for a
/// non-commutative op the result over ranks is `x0 op x1 op … op x(p−1)`, exactly as MPI defines.
pub trait ReduceOp: Send + Sync {
    /// Size of one element in bytes; buffers are whole numbers of elements.
    fn elem_size(&self) -> usize;
    /// Whether `a op b == b op a`.
    fn commutative(&self) -> bool;
    /// `inout = lhs op inout`, element-wise.
    fn apply_left(&self, lhs: &[u8], inout: &mut [u8]);
    /// `inout = inout op rhs`, element-wise.
    fn apply_right(&self, inout: &mut [u8], rhs: &[u8]);
}

/// What one collective call needs: the channel, the call's base tag, its deadline and the
/// algorithm config.
#[derive(Clone, Copy)]
pub struct Ctx<'a> {
    /// The channel carrying the messages.
    pub channel: &'a dyn Channel,
    /// The call's base tag (`Tag::collective(seq)`); algorithms use `tag.step(k)`.
    pub tag: Tag,
    /// When every wait of this call gives up.
    pub deadline: Instant,
    /// Algorithm selection.
    pub config: &'a Config,
}

impl Ctx<'_> {
    /// This rank.
    pub fn rank(&self) -> Rank {
        self.channel.rank()
    }
    /// The world size.
    pub fn size(&self) -> u32 {
        self.channel.size()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Xor;

    impl ReduceOp for Xor {
        fn elem_size(&self) -> usize {
            1
        }
        fn commutative(&self) -> bool {
            true
        }
        fn apply_left(&self, lhs: &[u8], inout: &mut [u8]) {
            inout.iter_mut().zip(lhs).for_each(|(a, b)| *a ^= b);
        }
        fn apply_right(&self, inout: &mut [u8], rhs: &[u8]) {
            inout.iter_mut().zip(rhs).for_each(|(a, b)| *a ^= b);
        }
    }

    fn assert_send<T: Send>(_: &T) {}

    /// The communicator spawns collectives as tasks, so their futures must be `Send`.
    #[test]
    fn collective_futures_are_send() {
        let Ok(job) = fmi_channels::JobId::new("send") else {
            panic!("job id");
        };
        let world = fmi_channels::memory::world(job, 1);
        let config = Config::default();
        let ctx = Ctx {
            channel: &world[0],
            tag: Tag::collective(0),
            deadline: Instant::now(),
            config: &config,
        };
        let data = [0u8; 4];
        let mut buf = [0u8; 4];
        let blocks: [&[u8]; 1] = [&data];
        assert_send(&barrier(&ctx));
        assert_send(&bcast(&ctx, Rank(0), Some(&data)));
        assert_send(&bcast_into(&ctx, Rank(0), &mut buf));
        assert_send(&gatherv(&ctx, Rank(0), &data));
        assert_send(&scatterv(&ctx, Rank(0), Some(&blocks)));
        assert_send(&allgatherv(&ctx, &data));
        assert_send(&allgather(&ctx, &data));
        assert_send(&alltoallv(&ctx, &blocks));
        assert_send(&reduce(&ctx, Rank(0), &data, &Xor));
        assert_send(&allreduce(&ctx, &data, &Xor));
        assert_send(&reduce_scatter_block(&ctx, &data, &Xor));
        assert_send(&scan(&ctx, &data, &Xor));
        assert_send(&exscan(&ctx, &data, &Xor));
    }
}
