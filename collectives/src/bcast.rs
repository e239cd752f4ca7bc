//! Broadcast: a binomial tree for small messages, binomial scatter + ring allgather (van de
//! Geijn) for large ones.
//!
//! Only the root knows the length in [`bcast`], so only the root can choose the algorithm. It
//! says which one it chose in the first message every other rank receives, which in both
//! algorithms comes from the rank's parent in the same binomial tree with the same tag:
//!
//! ```text
//! binomial:           [payload][0]
//! scatter+allgather:  [this subtree's part of the payload][total length: u64 LE][1]
//! ```

use std::ops::Range;

use fmi_channels::{Error, Rank, Result};

use crate::util::{
    check_root, exchange, malformed, me_and_size, rank, recv, send, to_real, to_virtual, tree,
};
use crate::{BcastAlgorithm, Config, Ctx};

const MARK_TREE: u8 = 0;
const MARK_SCATTER: u8 = 1;
const HEADER: usize = 8 + 1;

const STEP_FIRST: u32 = 0;
const STEP_RING: u32 = 1;

/// Broadcast where only `root` knows the length: `data` is `Some` at root (ignored elsewhere).
/// Returns root's bytes on every rank.
///
/// The root picks scatter + allgather when forced to, or when the message has at least
/// `config.bcast_large_bytes` bytes and the world at least `config.bcast_large_min_ranks` ranks;
/// otherwise a binomial tree. Uses the channel's native broadcast when it offers one.
pub async fn bcast(ctx: &Ctx<'_>, root: Rank, data: Option<&[u8]>) -> Result<Vec<u8>> {
    let root = check_root(ctx, root)?;
    let (me, p) = me_and_size(ctx);
    let data = if me == root {
        Some(data.ok_or(Error::InvalidArgument {
            what: "bcast: the root must pass the data",
        })?)
    } else {
        None
    };
    if let Some(native) = ctx.channel.native_collectives() {
        if let Some(done) = native.bcast(rank(root), ctx.tag, data, ctx.deadline) {
            return done.await;
        }
    }
    if let Some(data) = data {
        if p == 1 {
            return Ok(data.to_vec());
        }
        if scatter_allgather(ctx.config, data.len(), p) {
            root_scatter_allgather(ctx, root, data).await?;
            return Ok(data.to_vec());
        }
        let mut msg = Vec::with_capacity(data.len() + 1);
        msg.extend_from_slice(data);
        msg.push(MARK_TREE);
        forward(ctx, root, 0, &msg).await?;
        msg.pop();
        return Ok(msg);
    }
    let v = to_virtual(me, root, p);
    let (parent, mut first) = receive_first(ctx, root, v).await?;
    match kind(ctx, parent, &first)? {
        Kind::Tree => {
            forward(ctx, root, v, &first).await?;
            first.pop();
            Ok(first)
        }
        Kind::Scatter { piece, total } => {
            // Check before allocating `total` bytes on the word of the message.
            let expected = bytes_of(tree::subtree(v, p), total, p).len();
            if piece != expected {
                return Err(malformed(
                    ctx,
                    parent,
                    "bcast: scatter piece",
                    expected,
                    piece,
                ));
            }
            let mut out = vec![0; total];
            nonroot_scatter_allgather(ctx, root, v, parent, &first[..piece], &mut out).await?;
            Ok(out)
        }
    }
}

/// Broadcast into a buffer of the same length on every rank.
///
/// The root chooses the algorithm from the length exactly as [`bcast`] does and the other ranks
/// follow the marker in their first message, so all take the same path. A non-root whose buffer
/// length differs from the root's fails with [`Error::CountMismatch`] (after passing the message
/// on, in the binomial case, so that ranks below it are not held up).
pub async fn bcast_into(ctx: &Ctx<'_>, root: Rank, buf: &mut [u8]) -> Result<()> {
    let root = check_root(ctx, root)?;
    let (me, p) = me_and_size(ctx);
    if let Some(native) = ctx.channel.native_collectives() {
        let data = (me == root).then_some(&*buf);
        // Finished within this statement, so that the borrow of `buf` ends before it is filled.
        let got = match native.bcast(rank(root), ctx.tag, data, ctx.deadline) {
            Some(done) => Some(done.await),
            None => None,
        };
        if let Some(got) = got {
            let got = got?;
            if me != root {
                fill(ctx, root, buf, &got)?;
            }
            return Ok(());
        }
    }
    if p == 1 {
        return Ok(());
    }
    if me == root {
        if scatter_allgather(ctx.config, buf.len(), p) {
            return root_scatter_allgather(ctx, root, buf).await;
        }
        let mut msg = Vec::with_capacity(buf.len() + 1);
        msg.extend_from_slice(buf);
        msg.push(MARK_TREE);
        return forward(ctx, root, 0, &msg).await;
    }
    let v = to_virtual(me, root, p);
    let (parent, first) = receive_first(ctx, root, v).await?;
    match kind(ctx, parent, &first)? {
        Kind::Tree => {
            forward(ctx, root, v, &first).await?;
            fill(ctx, root, buf, &first[..first.len() - 1])
        }
        Kind::Scatter { piece, total } => {
            if total != buf.len() {
                return Err(malformed(ctx, root, "bcast_into", buf.len(), total));
            }
            nonroot_scatter_allgather(ctx, root, v, parent, &first[..piece], buf).await
        }
    }
}

/// Whether the root uses scatter + allgather for `len` bytes over `p` ranks.
fn scatter_allgather(config: &Config, len: usize, p: usize) -> bool {
    match config.force.bcast {
        Some(BcastAlgorithm::ScatterAllgather) => true,
        Some(BcastAlgorithm::Binomial) => false,
        None => len >= config.bcast_large_bytes && p >= config.bcast_large_min_ranks as usize,
    }
}

fn fill(ctx: &Ctx<'_>, root: usize, buf: &mut [u8], got: &[u8]) -> Result<()> {
    if got.len() != buf.len() {
        return Err(malformed(ctx, root, "bcast_into", buf.len(), got.len()));
    }
    buf.copy_from_slice(got);
    Ok(())
}

enum Kind {
    Tree,
    Scatter { piece: usize, total: usize },
}

async fn receive_first(ctx: &Ctx<'_>, root: usize, v: usize) -> Result<(usize, Vec<u8>)> {
    let p = ctx.size() as usize;
    let parent = to_real(tree::parent(v), root, p);
    Ok((parent, recv(ctx, parent, STEP_FIRST).await?))
}

fn kind(ctx: &Ctx<'_>, parent: usize, first: &[u8]) -> Result<Kind> {
    match first.last() {
        Some(&MARK_TREE) => Ok(Kind::Tree),
        Some(&MARK_SCATTER) if first.len() >= HEADER => {
            let piece = first.len() - HEADER;
            let mut le = [0u8; 8];
            le.copy_from_slice(&first[piece..piece + 8]);
            let total = usize::try_from(u64::from_le_bytes(le))
                .map_err(|_| malformed(ctx, parent, "bcast: total length", usize::MAX, 0))?;
            Ok(Kind::Scatter { piece, total })
        }
        Some(&m) => Err(malformed(
            ctx,
            parent,
            "bcast: message kind",
            1,
            usize::from(m),
        )),
        None => Err(malformed(ctx, parent, "bcast: message length", 1, 0)),
    }
}

/// Passes the binomial message on to `v`'s children.
async fn forward(ctx: &Ctx<'_>, root: usize, v: usize, msg: &[u8]) -> Result<()> {
    let p = ctx.size() as usize;
    for c in tree::children(v, p) {
        send(ctx, to_real(c, root, p), STEP_FIRST, msg).await?;
    }
    Ok(())
}

/// The bytes of the blocks of virtual ranks `vs`: block i is the i-th of p chunks of
/// ⌈total/p⌉ bytes (the last ones shorter or empty).
fn bytes_of(vs: Range<usize>, total: usize, p: usize) -> Range<usize> {
    let chunk = total.div_ceil(p);
    let at = |i: usize| i.saturating_mul(chunk).min(total);
    at(vs.start)..at(vs.end)
}

fn scatter_msg(piece: &[u8], total: usize) -> Vec<u8> {
    let mut msg = Vec::with_capacity(piece.len() + HEADER);
    msg.extend_from_slice(piece);
    msg.extend_from_slice(&(total as u64).to_le_bytes());
    msg.push(MARK_SCATTER);
    msg
}

async fn root_scatter_allgather(ctx: &Ctx<'_>, root: usize, data: &[u8]) -> Result<()> {
    let (p, total) = (ctx.size() as usize, data.len());
    for c in tree::children(0, p) {
        let msg = scatter_msg(&data[bytes_of(tree::subtree(c, p), total, p)], total);
        send(ctx, to_real(c, root, p), STEP_FIRST, &msg).await?;
    }
    // The root already has everything, so the ring is cut just before it: it only feeds virtual
    // rank 1, and the last rank does not send back to it.
    let next = to_real(1, root, p);
    for i in 0..p - 1 {
        let b = (p - i) % p;
        send(ctx, next, STEP_RING, &data[bytes_of(b..b + 1, total, p)]).await?;
    }
    Ok(())
}

async fn nonroot_scatter_allgather(
    ctx: &Ctx<'_>,
    root: usize,
    v: usize,
    parent: usize,
    piece: &[u8],
    out: &mut [u8],
) -> Result<()> {
    let (p, total) = (ctx.size() as usize, out.len());
    let mine = bytes_of(tree::subtree(v, p), total, p);
    if piece.len() != mine.len() {
        return Err(malformed(
            ctx,
            parent,
            "bcast: scatter piece",
            mine.len(),
            piece.len(),
        ));
    }
    out[mine].copy_from_slice(piece);
    for c in tree::children(v, p) {
        let msg = scatter_msg(&out[bytes_of(tree::subtree(c, p), total, p)], total);
        send(ctx, to_real(c, root, p), STEP_FIRST, &msg).await?;
    }
    let prev = to_real(v - 1, root, p);
    let next = (v + 1 < p).then(|| to_real(v + 1, root, p));
    for i in 0..p - 1 {
        let (s, r) = ((v + p - i) % p, (v + p - 1 - i) % p);
        let got = match next {
            Some(next) => {
                exchange(
                    ctx,
                    next,
                    &out[bytes_of(s..s + 1, total, p)],
                    prev,
                    STEP_RING,
                )
                .await?
            }
            None => recv(ctx, prev, STEP_RING).await?,
        };
        let at = bytes_of(r..r + 1, total, p);
        if got.len() != at.len() {
            return Err(malformed(
                ctx,
                prev,
                "bcast: ring block",
                at.len(),
                got.len(),
            ));
        }
        out[at].copy_from_slice(&got);
    }
    Ok(())
}
