//! Allreduce: recursive doubling, Rabenseifner, ring.
//!
//! Every algorithm computes each element of the result at exactly one place (or, in recursive
//! doubling, identically at both partners from the same operands in the same order) and copies
//! it to the others, so all ranks end with the same bytes even for floating point.

use fmi_channels::{Error, Result};

use crate::reduce::ring_reduce_scatter;
use crate::util::{
    check_len, check_local, exchange, exchange_into, me_and_size, recv, recv_into, send,
    split_blocks, split_send_recv, Fold,
};
use crate::{AllreduceAlgorithm, Ctx, ReduceOp};

const WHAT: &str = "allreduce";

const STEP_FOLD: u32 = 0;
const STEP_UNFOLD: u32 = 1;
const STEP_DOUBLING: u32 = 2; // + round, at most 64 rounds
const STEP_HALVING: u32 = 70; // + round
const STEP_GATHER: u32 = 140; // + round
const STEP_RING_SCATTER: u32 = 210;
const STEP_RING_GATHER: u32 = 211;

/// Reduces equal-length buffers; every rank gets the result.
///
/// Up to `config.allreduce_large_bytes` bytes: recursive doubling; above: `config.large_allreduce`;
/// `config.force.allreduce` overrides both. The ring needs a commutative op, so a non-commutative
/// op asked to use it runs recursive doubling instead.
pub async fn allreduce(ctx: &Ctx<'_>, data: &[u8], op: &dyn ReduceOp) -> Result<Vec<u8>> {
    let mut acc = data.to_vec();
    allreduce_in_place(ctx, &mut acc, op).await?;
    Ok(acc)
}

/// Like [`allreduce`], with the result in `out` (as long as `data`): the algorithms work in
/// `out` itself, and the last round's halves are received straight into it, so no result
/// vector is copied out at the end.
pub async fn allreduce_into(
    ctx: &Ctx<'_>,
    data: &[u8],
    out: &mut [u8],
    op: &dyn ReduceOp,
) -> Result<()> {
    if out.len() != data.len() {
        return Err(Error::CountMismatch {
            me: ctx.rank(),
            peer: ctx.rank(),
            what: "allreduce_into: output length must equal input length",
            expected: data.len(),
            got: out.len(),
        });
    }
    out.copy_from_slice(data);
    allreduce_in_place(ctx, out, op).await
}

/// Replaces `acc` (this rank's contribution) with the reduction over all ranks.
async fn allreduce_in_place(ctx: &Ctx<'_>, acc: &mut [u8], op: &dyn ReduceOp) -> Result<()> {
    let elem = check_local(op, acc)?;
    if ctx.size() == 1 {
        return Ok(());
    }
    let config = ctx.config;
    let algorithm =
        config
            .force
            .allreduce
            .unwrap_or(if acc.len() <= config.allreduce_large_bytes {
                AllreduceAlgorithm::RecursiveDoubling
            } else {
                config.large_allreduce
            });
    match algorithm {
        AllreduceAlgorithm::Ring if op.commutative() => ring(ctx, acc, op, elem).await,
        AllreduceAlgorithm::Rabenseifner => rabenseifner(ctx, acc, op, elem).await,
        AllreduceAlgorithm::RecursiveDoubling | AllreduceAlgorithm::Ring => {
            recursive_doubling(ctx, acc, op, elem).await
        }
    }
}

/// The fold of [`Fold`]: even ranks among the first `2 * rem` hand their data to the odd rank
/// above, which combines it into `acc` as the left operand. Returns the new rank, or `None`
/// for a rank that now sits out.
async fn fold_in(
    ctx: &Ctx<'_>,
    fold: &Fold,
    acc: &mut [u8],
    op: &dyn ReduceOp,
    elem: usize,
) -> Result<Option<usize>> {
    let me = ctx.rank().idx();
    let Some(new) = fold.new_rank(me) else {
        send(ctx, me + 1, STEP_FOLD, acc).await?;
        return Ok(None);
    };
    if fold.folded(me) {
        let lower = recv(ctx, me - 1, STEP_FOLD).await?;
        check_len(ctx, me - 1, WHAT, elem, acc.len(), lower.len())?;
        op.apply_left(&lower, acc);
    }
    Ok(Some(new))
}

/// The end of the fold: the odd ranks return the result to the even ranks that sat out.
async fn fold_out(ctx: &Ctx<'_>, fold: &Fold, result: &[u8]) -> Result<()> {
    let me = ctx.rank().idx();
    if fold.folded(me) {
        send(ctx, me - 1, STEP_UNFOLD, result).await?;
    }
    Ok(())
}

/// A rank that sat out receives the result into `acc`.
async fn wait_for_result(ctx: &Ctx<'_>, acc: &mut [u8], elem: usize) -> Result<()> {
    let me = ctx.rank().idx();
    let len = acc.len();
    let got = recv_into(ctx, me + 1, STEP_UNFOLD, acc).await?;
    check_len(ctx, me + 1, WHAT, elem, len, got)
}

/// MPICH's recursive doubling: after the fold, in round k new rank n swaps its whole partial with
/// `n ^ 2^k` and both compute (lower group) op (higher group). lg pof2 (+2) rounds of n bytes.
async fn recursive_doubling(
    ctx: &Ctx<'_>,
    acc: &mut [u8],
    op: &dyn ReduceOp,
    elem: usize,
) -> Result<()> {
    let fold = Fold::new(ctx.size() as usize);
    let Some(new) = fold_in(ctx, &fold, acc, op, elem).await? else {
        return wait_for_result(ctx, acc, elem).await;
    };
    let mut mask = 1;
    let mut round = 0;
    while mask < fold.pof2 {
        let partner = new ^ mask;
        let peer = fold.real(partner);
        let theirs = exchange(ctx, peer, acc, peer, STEP_DOUBLING + round).await?;
        check_len(ctx, peer, WHAT, elem, acc.len(), theirs.len())?;
        if partner < new {
            op.apply_left(&theirs, acc);
        } else {
            op.apply_right(acc, &theirs);
        }
        mask <<= 1;
        round += 1;
    }
    fold_out(ctx, &fold, acc).await
}

/// Rabenseifner: reduce-scatter by recursive halving, then allgather by recursive doubling.
///
/// The vector is cut at element boundaries into pof2 blocks (empty ones when there are fewer
/// elements). The halving runs with the mask ascending: in round k a new rank keeps the lower or
/// upper half of its current block range depending on bit k and combines the partner's copy of
/// that half. Both partners' groups are then aligned, adjacent and contiguous in rank order, so
/// the lower group stays the left operand and non-commutative ops are correct. The allgather
/// replays the rounds backwards, swapping halves, each received straight into its place.
async fn rabenseifner(ctx: &Ctx<'_>, acc: &mut [u8], op: &dyn ReduceOp, elem: usize) -> Result<()> {
    let fold = Fold::new(ctx.size() as usize);
    let Some(new) = fold_in(ctx, &fold, acc, op, elem).await? else {
        return wait_for_result(ctx, acc, elem).await;
    };
    let displs = split_blocks(acc.len() / elem, fold.pof2, elem);
    let bytes = |(lo, hi): (usize, usize)| displs[lo]..displs[hi];

    // The halves given away, by round, for the allgather to fetch back.
    let mut given = Vec::new();
    let (mut lo, mut hi) = (0, fold.pof2);
    let mut mask = 1;
    let mut round = 0;
    while mask < fold.pof2 {
        let partner = new ^ mask;
        let peer = fold.real(partner);
        let mid = lo + (hi - lo) / 2;
        let (keep, give) = if new & mask == 0 {
            ((lo, mid), (mid, hi))
        } else {
            ((mid, hi), (lo, mid))
        };
        let theirs = exchange(ctx, peer, &acc[bytes(give)], peer, STEP_HALVING + round).await?;
        let at = bytes(keep);
        check_len(ctx, peer, WHAT, elem, at.len(), theirs.len())?;
        if partner < new {
            op.apply_left(&theirs, &mut acc[at]);
        } else {
            op.apply_right(&mut acc[at], &theirs);
        }
        given.push((peer, give));
        (lo, hi) = keep;
        mask <<= 1;
        round += 1;
    }
    while let Some((peer, give)) = given.pop() {
        round -= 1;
        let at = bytes(give);
        let want = at.len();
        let (mine, theirs) = split_send_recv(acc, bytes((lo, hi)), at);
        let got = exchange_into(ctx, peer, mine, peer, STEP_GATHER + round, theirs).await?;
        check_len(ctx, peer, WHAT, elem, want, got)?;
        (lo, hi) = (lo.min(give.0), hi.max(give.1));
    }
    fold_out(ctx, &fold, acc).await
}

/// Ring reduce-scatter (rank r ends with block r complete), then ring allgather of the blocks,
/// each received straight into its place. 2(p − 1) steps of n/p bytes each. Commutative ops
/// only.
async fn ring(ctx: &Ctx<'_>, acc: &mut [u8], op: &dyn ReduceOp, elem: usize) -> Result<()> {
    let (me, p) = me_and_size(ctx);
    let displs = split_blocks(acc.len() / elem, p, elem);
    ring_reduce_scatter(ctx, acc, &displs, op, elem, STEP_RING_SCATTER, WHAT).await?;
    let (next, prev) = ((me + 1) % p, (me + p - 1) % p);
    for i in 0..p - 1 {
        let (s, r) = ((me + p - i) % p, (me + p - 1 - i) % p);
        let at = displs[r]..displs[r + 1];
        let want = at.len();
        let (mine, theirs) = split_send_recv(acc, displs[s]..displs[s + 1], at);
        let got = exchange_into(ctx, next, mine, prev, STEP_RING_GATHER, theirs).await?;
        check_len(ctx, prev, WHAT, elem, want, got)?;
    }
    Ok(())
}
