//! Gather and scatter of variable-length blocks along a binomial tree rooted at the root.
//!
//! A message between a parent and a child carries the blocks of the child's whole subtree, in
//! virtual rank order, in the form of [`crate::util::pack`] (payloads, then their lengths).

use fmi_channels::{Error, Rank, Result};

use crate::util::{
    check_root, malformed, me_and_size, pack, pack_contiguous, recv, seal, send, to_real,
    to_virtual, tree, unseal,
};
use crate::Ctx;

const STEP_GATHER: u32 = 0;
const STEP_SCATTER: u32 = 0;

/// Gathers each rank's bytes (any length) at `root`, index = rank; `None` elsewhere.
///
/// Binomial tree: ⌈lg p⌉ rounds; each rank receives its children's subtrees in order and sends
/// its own subtree up once. Uses the channel's native gather when it offers one for this call.
pub async fn gatherv(ctx: &Ctx<'_>, root: Rank, data: &[u8]) -> Result<Option<Vec<Vec<u8>>>> {
    let root_rank = root;
    let root = check_root(ctx, root)?;
    // A channel may gather natively (storage: every rank writes its block once and counts
    // itself on an atomic counter; the root reads the blocks when the count is full).
    if let Some(native) = ctx.channel.native_collectives() {
        if let Some(done) = native.gather(root_rank, ctx.tag, data, ctx.deadline) {
            return done.await;
        }
    }
    let (me, p) = me_and_size(ctx);
    let v = to_virtual(me, root, p);
    // The subtree's blocks in virtual order; the lengths trailer is appended only when sending.
    let mut payload = data.to_vec();
    let mut lens = vec![data.len()];
    for c in tree::children_ascending(v, p) {
        let from = to_real(c, root, p);
        let msg = recv(ctx, from, STEP_GATHER).await?;
        let k = tree::subtree(c, p).len();
        let (len, child_lens) = unseal(&msg, k)
            .ok_or_else(|| malformed(ctx, from, "gatherv: blocks in message", k, 0))?;
        payload.extend_from_slice(&msg[..len]);
        lens.extend(child_lens);
    }
    if v != 0 {
        seal(&mut payload, &lens);
        send(
            ctx,
            to_real(tree::parent(v), root, p),
            STEP_GATHER,
            &payload,
        )
        .await?;
        return Ok(None);
    }
    let mut out = vec![Vec::new(); p];
    let mut off = 0;
    for (u, len) in lens.into_iter().enumerate() {
        out[to_real(u, root, p)] = payload[off..off + len].to_vec();
        off += len;
    }
    Ok(Some(out))
}

/// Scatters `blocks[r]` (given at root only, ignored elsewhere) to rank r.
///
/// Binomial tree: the root sends each child its subtree's blocks, largest subtree first, and
/// every rank passes parts of what it received on to its own children.
pub async fn scatterv(ctx: &Ctx<'_>, root: Rank, blocks: Option<&[&[u8]]>) -> Result<Vec<u8>> {
    let root = check_root(ctx, root)?;
    let (me, p) = me_and_size(ctx);
    let blocks = if me == root {
        let blocks = blocks.ok_or(Error::InvalidArgument {
            what: "scatterv: the root must pass the blocks",
        })?;
        if blocks.len() != p {
            return Err(Error::InvalidArgument {
                what: "scatterv: the root must pass exactly one block per rank",
            });
        }
        Some(blocks)
    } else {
        None
    };
    scatter_at(ctx, root, blocks, STEP_SCATTER).await
}

/// The scatter behind [`scatterv`], on step `step` (so that composite collectives can use it).
/// `blocks` must be `Some` with `size` blocks at `root`.
pub(crate) async fn scatter_at(
    ctx: &Ctx<'_>,
    root: usize,
    blocks: Option<&[&[u8]]>,
    step: u32,
) -> Result<Vec<u8>> {
    let (me, p) = me_and_size(ctx);
    if let Some(blocks) = blocks {
        let in_virtual_order: Vec<&[u8]> = (0..p).map(|u| blocks[to_real(u, root, p)]).collect();
        for c in tree::children(0, p) {
            let msg = pack(&in_virtual_order[tree::subtree(c, p)]);
            send(ctx, to_real(c, root, p), step, &msg).await?;
        }
        return Ok(blocks[me].to_vec());
    }
    let v = to_virtual(me, root, p);
    let from = to_real(tree::parent(v), root, p);
    let mut msg = recv(ctx, from, step).await?;
    let mine = tree::subtree(v, p);
    let (_, lens) = unseal(&msg, mine.len())
        .ok_or_else(|| malformed(ctx, from, "scatterv: blocks in message", mine.len(), 0))?;
    let mut offs = Vec::with_capacity(lens.len() + 1);
    offs.push(0);
    for l in &lens {
        offs.push(offs[offs.len() - 1] + l);
    }
    for c in tree::children(v, p) {
        let sub = tree::subtree(c, p);
        let (a, b) = (sub.start - v, sub.end - v);
        let part = pack_contiguous(&msg[offs[a]..offs[b]], &lens[a..b]);
        send(ctx, to_real(c, root, p), step, &part).await?;
    }
    msg.truncate(lens[0]);
    Ok(msg)
}
