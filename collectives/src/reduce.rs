//! Reduce to one rank (binomial tree) and reduce-scatter with equal blocks.

use std::borrow::Cow;

use fmi_channels::{Error, Rank, Result};

use crate::gather::scatter_at;
use crate::util::{
    check_len, check_local, check_root, exchange, me_and_size, recv, send, to_real, to_virtual,
    tree,
};
use crate::{Ctx, ReduceOp};

const STEP_TREE: u32 = 0;
const STEP_TO_ROOT: u32 = 1;
const STEP_SCATTER: u32 = 2;
const STEP_RING: u32 = 3;

/// Reduces equal-length buffers to `root` in rank order; `None` elsewhere.
///
/// Binomial tree. A commutative op uses a tree rooted at `root`; a non-commutative one reduces
/// towards rank 0, where every subtree is a contiguous range of ranks combined lower-left, and
/// rank 0 then sends the result to `root` (one extra message when `root ≠ 0`).
pub async fn reduce(
    ctx: &Ctx<'_>,
    root: Rank,
    data: &[u8],
    op: &dyn ReduceOp,
) -> Result<Option<Vec<u8>>> {
    let root = check_root(ctx, root)?;
    let elem = check_local(op, data)?;
    if op.commutative() || root == 0 {
        return binomial_reduce(ctx, root, data, op, elem, STEP_TREE, "reduce").await;
    }
    let me = ctx.rank().idx();
    if let Some(result) = binomial_reduce(ctx, 0, data, op, elem, STEP_TREE, "reduce").await? {
        send(ctx, root, STEP_TO_ROOT, &result).await?;
        return Ok(None);
    }
    if me != root {
        return Ok(None);
    }
    let result = recv(ctx, 0, STEP_TO_ROOT).await?;
    check_len(ctx, 0, "reduce", elem, data.len(), result.len())?;
    Ok(Some(result))
}

/// `data` holds `size` equal blocks; rank r gets block r of the reduction.
///
/// A commutative op uses a ring reduce-scatter; a non-commutative one reduces to rank 0 in rank
/// order and scatters the blocks from there. `data.len()` must be a multiple of
/// `size × elem_size` ([`Error::InvalidArgument`] otherwise).
pub async fn reduce_scatter_block(
    ctx: &Ctx<'_>,
    data: &[u8],
    op: &dyn ReduceOp,
) -> Result<Vec<u8>> {
    const WHAT: &str = "reduce_scatter_block";
    let elem = check_local(op, data)?;
    let (me, p) = me_and_size(ctx);
    if !data.len().is_multiple_of(p * elem) {
        return Err(Error::InvalidArgument {
            what: "reduce_scatter_block: data length must be a multiple of size × element size",
        });
    }
    let block = data.len() / p;
    if p == 1 {
        return Ok(data.to_vec());
    }
    if op.commutative() {
        let displs: Vec<usize> = (0..=p).map(|i| i * block).collect();
        let mut acc = data.to_vec();
        ring_reduce_scatter(ctx, &mut acc, &displs, op, elem, STEP_RING, WHAT).await?;
        acc.truncate((me + 1) * block);
        acc.drain(..me * block);
        return Ok(acc);
    }
    let at_zero = binomial_reduce(ctx, 0, data, op, elem, STEP_TREE, WHAT).await?;
    let blocks: Option<Vec<&[u8]>> = at_zero
        .as_deref()
        .map(|r| (0..p).map(|i| &r[i * block..(i + 1) * block]).collect());
    let mine = scatter_at(ctx, 0, blocks.as_deref(), STEP_SCATTER).await?;
    check_len(ctx, 0, WHAT, elem, block, mine.len())?;
    Ok(mine)
}

/// Binomial-tree reduction to `root` on step `step`: each rank combines its children's subtrees
/// in ascending order as right operands, so with `root == 0` the result is in rank order. Leaves
/// send their input without copying it.
pub(crate) async fn binomial_reduce(
    ctx: &Ctx<'_>,
    root: usize,
    data: &[u8],
    op: &dyn ReduceOp,
    elem: usize,
    step: u32,
    what: &'static str,
) -> Result<Option<Vec<u8>>> {
    let (me, p) = me_and_size(ctx);
    let v = to_virtual(me, root, p);
    let mut acc = Cow::Borrowed(data);
    for c in tree::children_ascending(v, p) {
        let from = to_real(c, root, p);
        let theirs = recv(ctx, from, step).await?;
        check_len(ctx, from, what, elem, data.len(), theirs.len())?;
        op.apply_right(acc.to_mut(), &theirs);
    }
    if v == 0 {
        return Ok(Some(acc.into_owned()));
    }
    send(ctx, to_real(tree::parent(v), root, p), step, &acc).await?;
    Ok(None)
}

/// Ring reduce-scatter over the blocks `displs` of `acc` (block i is `displs[i]..displs[i + 1]`):
/// afterwards block `me` of `acc` holds the reduction of every rank's block `me`. In step i each
/// rank passes a partial block to the next rank and folds the one from the previous rank into
/// its own copy, so the operand order follows the ring: commutative ops only.
pub(crate) async fn ring_reduce_scatter(
    ctx: &Ctx<'_>,
    acc: &mut [u8],
    displs: &[usize],
    op: &dyn ReduceOp,
    elem: usize,
    step: u32,
    what: &'static str,
) -> Result<()> {
    let (me, p) = me_and_size(ctx);
    let (next, prev) = ((me + 1) % p, (me + p - 1) % p);
    for i in 0..p - 1 {
        let s = (me + 2 * p - 1 - i) % p;
        let r = (me + 2 * p - 2 - i) % p;
        let theirs = exchange(ctx, next, &acc[displs[s]..displs[s + 1]], prev, step).await?;
        let at = displs[r]..displs[r + 1];
        check_len(ctx, prev, what, elem, at.len(), theirs.len())?;
        op.apply_left(&theirs, &mut acc[at]);
    }
    Ok(())
}
