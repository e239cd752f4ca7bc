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

// The body of this crate is being written; see the functions below for the contract.

use fmi_channels::{Channel, Instant, Rank, Result, Tag};

/// Thresholds and forced choices for algorithm selection. Every rank must use the same config.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct Config {
    /// Broadcasts of at least this many bytes use scatter + allgather (when the world has at
    /// least `bcast_scatter_allgather_min_ranks` ranks); smaller ones a binomial tree.
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

/// Returns once every rank has entered the barrier (dissemination algorithm).
pub async fn barrier(ctx: &Ctx<'_>) -> Result<()> {
    let _ = ctx;
    todo!()
}

/// Broadcast where only `root` knows the length: `data` is `Some` at root. Returns root's bytes.
pub async fn bcast(ctx: &Ctx<'_>, root: Rank, data: Option<&[u8]>) -> Result<Vec<u8>> {
    let _ = (ctx, root, data);
    todo!()
}

/// Broadcast into a buffer of the same length on every rank.
pub async fn bcast_into(ctx: &Ctx<'_>, root: Rank, buf: &mut [u8]) -> Result<()> {
    let _ = (ctx, root, buf);
    todo!()
}

/// Gathers each rank's bytes (any length) at `root`, index = rank; `None` elsewhere.
pub async fn gatherv(ctx: &Ctx<'_>, root: Rank, data: &[u8]) -> Result<Option<Vec<Vec<u8>>>> {
    let _ = (ctx, root, data);
    todo!()
}

/// Scatters `blocks[r]` (given at root only) to rank r.
pub async fn scatterv(ctx: &Ctx<'_>, root: Rank, blocks: Option<&[&[u8]]>) -> Result<Vec<u8>> {
    let _ = (ctx, root, blocks);
    todo!()
}

/// Every rank gets every rank's bytes (any lengths), index = rank.
pub async fn allgatherv(ctx: &Ctx<'_>, data: &[u8]) -> Result<Vec<Vec<u8>>> {
    let _ = (ctx, data);
    todo!()
}

/// Rank r sends `blocks[d]` to each d and returns what each rank sent it, index = source.
pub async fn alltoallv(ctx: &Ctx<'_>, blocks: &[&[u8]]) -> Result<Vec<Vec<u8>>> {
    let _ = (ctx, blocks);
    todo!()
}

/// Reduces equal-length buffers to `root` in rank order; `None` elsewhere.
pub async fn reduce(
    ctx: &Ctx<'_>,
    root: Rank,
    data: &[u8],
    op: &dyn ReduceOp,
) -> Result<Option<Vec<u8>>> {
    let _ = (ctx, root, data, op);
    todo!()
}

/// Reduces equal-length buffers; every rank gets the result.
pub async fn allreduce(ctx: &Ctx<'_>, data: &[u8], op: &dyn ReduceOp) -> Result<Vec<u8>> {
    let _ = (ctx, data, op);
    todo!()
}

/// `data` holds `size` equal blocks; rank r gets block r of the reduction.
pub async fn reduce_scatter_block(
    ctx: &Ctx<'_>,
    data: &[u8],
    op: &dyn ReduceOp,
) -> Result<Vec<u8>> {
    let _ = (ctx, data, op);
    todo!()
}

/// Inclusive prefix reduction: rank r gets `x0 op … op xr`.
pub async fn scan(ctx: &Ctx<'_>, data: &[u8], op: &dyn ReduceOp) -> Result<Vec<u8>> {
    let _ = (ctx, data, op);
    todo!()
}

/// Exclusive prefix reduction: rank r > 0 gets `x0 op … op x(r−1)`; rank 0 gets `None`.
pub async fn exscan(ctx: &Ctx<'_>, data: &[u8], op: &dyn ReduceOp) -> Result<Option<Vec<u8>>> {
    let _ = (ctx, data, op);
    todo!()
}
