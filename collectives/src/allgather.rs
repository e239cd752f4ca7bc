//! Allgather of variable-length ([`allgatherv`]) and equal-length ([`allgather`]) blocks, by
//! recursive doubling or by a ring, both written once over a [`Store`] of blocks.

use std::borrow::Cow;
use std::ops::Range;

use fmi_channels::Result;

use crate::util::{exchange, malformed, me_and_size, pack, recv, send, unpack, Fold};
use crate::{AllgatherAlgorithm, Ctx};

const STEP_FOLD: u32 = 0;
const STEP_UNFOLD: u32 = 1;
const STEP_DOUBLING: u32 = 2; // one step per round, at most 64 rounds
const STEP_RING: u32 = 70;

/// Every rank gets every rank's bytes (any lengths), index = rank.
///
/// Recursive doubling unless `config.force.allgather` says otherwise: the lengths differ per rank
/// and are not known in advance, so no rank could pick by total size and be sure the others pick
/// the same.
pub async fn allgatherv(ctx: &Ctx<'_>, data: &[u8]) -> Result<Vec<Vec<u8>>> {
    let (me, p) = me_and_size(ctx);
    let mut store = VarStore {
        blocks: vec![Vec::new(); p],
    };
    store.blocks[me] = data.to_vec();
    let algorithm = ctx
        .config
        .force
        .allgather
        .unwrap_or(AllgatherAlgorithm::RecursiveDoubling);
    run(ctx, algorithm, &mut store).await?;
    Ok(store.blocks)
}

/// Every rank contributes `data` of the same length; returns the concatenation in rank order.
///
/// Ring when the result has at least `config.allgather_ring_bytes` bytes, recursive doubling
/// otherwise (`config.force.allgather` overrides). A contribution of another length is
/// [`fmi_channels::Error::CountMismatch`]. (If the lengths differ so much that ranks pick
/// different algorithms, the ranks wait on different messages and fail with a timeout instead.)
pub async fn allgather(ctx: &Ctx<'_>, data: &[u8]) -> Result<Vec<u8>> {
    let (me, p) = me_and_size(ctx);
    let len = data.len();
    let mut buf = vec![0; len * p];
    buf[me * len..(me + 1) * len].copy_from_slice(data);
    let mut store = EqStore { buf, len };
    let algorithm = ctx.config.force.allgather.unwrap_or(
        if len.saturating_mul(p) >= ctx.config.allgather_ring_bytes {
            AllgatherAlgorithm::Ring
        } else {
            AllgatherAlgorithm::RecursiveDoubling
        },
    );
    run(ctx, algorithm, &mut store).await?;
    Ok(store.buf)
}

async fn run(ctx: &Ctx<'_>, algorithm: AllgatherAlgorithm, store: &mut impl Store) -> Result<()> {
    if ctx.size() == 1 {
        return Ok(());
    }
    match algorithm {
        AllgatherAlgorithm::RecursiveDoubling => recursive_doubling(ctx, store).await,
        AllgatherAlgorithm::Ring => ring(ctx, store).await,
    }
}

/// Where an allgather keeps the blocks it has; blocks are indexed by rank.
trait Store: Send + Sync {
    /// The wire form of blocks `ranks`.
    fn pack(&self, ranks: Range<usize>) -> Cow<'_, [u8]>;
    /// Stores blocks `ranks` from a message received from `from`.
    fn unpack(
        &mut self,
        ctx: &Ctx<'_>,
        from: usize,
        ranks: Range<usize>,
        msg: Vec<u8>,
    ) -> Result<()>;
}

/// Blocks of any length, one vector each.
struct VarStore {
    blocks: Vec<Vec<u8>>,
}

impl Store for VarStore {
    fn pack(&self, ranks: Range<usize>) -> Cow<'_, [u8]> {
        let refs: Vec<&[u8]> = self.blocks[ranks].iter().map(Vec::as_slice).collect();
        pack(&refs)
    }

    fn unpack(
        &mut self,
        ctx: &Ctx<'_>,
        from: usize,
        ranks: Range<usize>,
        msg: Vec<u8>,
    ) -> Result<()> {
        let k = ranks.len();
        let blocks = unpack(msg, k)
            .ok_or_else(|| malformed(ctx, from, "allgatherv: blocks in message", k, 0))?;
        for (slot, b) in self.blocks[ranks].iter_mut().zip(blocks) {
            *slot = b;
        }
        Ok(())
    }
}

/// Blocks of `len` bytes each, back to back in the result buffer, so that a range of blocks is
/// sent as a slice of it without copying.
struct EqStore {
    buf: Vec<u8>,
    len: usize,
}

impl Store for EqStore {
    fn pack(&self, ranks: Range<usize>) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.buf[ranks.start * self.len..ranks.end * self.len])
    }

    fn unpack(
        &mut self,
        ctx: &Ctx<'_>,
        from: usize,
        ranks: Range<usize>,
        msg: Vec<u8>,
    ) -> Result<()> {
        let at = ranks.start * self.len..ranks.end * self.len;
        if msg.len() != at.len() {
            // Name the rank whose block it is when the message holds a single block.
            let culprit = if ranks.len() == 1 { ranks.start } else { from };
            return Err(malformed(ctx, culprit, "allgather", at.len(), msg.len()));
        }
        if at.len() == self.buf.len() {
            self.buf = msg;
        } else {
            self.buf[at].copy_from_slice(&msg);
        }
        Ok(())
    }
}

/// Recursive doubling over the folded world: in round k each new rank swaps everything it has
/// (the blocks of an aligned group of 2^k new ranks, a contiguous range of real ranks) with the
/// partner group. Ranks sitting out of the fold hand their block in first and get the whole
/// result at the end. ⌈lg p⌉ (+2) rounds.
async fn recursive_doubling(ctx: &Ctx<'_>, store: &mut impl Store) -> Result<()> {
    let (me, p) = me_and_size(ctx);
    let fold = Fold::new(p);
    let Some(new) = fold.new_rank(me) else {
        send(ctx, me + 1, STEP_FOLD, &store.pack(me..me + 1)).await?;
        let msg = recv(ctx, me + 1, STEP_UNFOLD).await?;
        return store.unpack(ctx, me + 1, 0..p, msg);
    };
    if fold.folded(me) {
        let msg = recv(ctx, me - 1, STEP_FOLD).await?;
        store.unpack(ctx, me - 1, me - 1..me, msg)?;
    }
    let mut mask = 1;
    let mut round = 0;
    while mask < fold.pof2 {
        let partner = new ^ mask;
        let group = |n: usize| fold.real_range(n & !(mask - 1)..(n & !(mask - 1)) + mask);
        let peer = fold.real(partner);
        let msg = exchange(
            ctx,
            peer,
            &store.pack(group(new)),
            peer,
            STEP_DOUBLING + round,
        )
        .await?;
        store.unpack(ctx, peer, group(partner), msg)?;
        mask <<= 1;
        round += 1;
    }
    if fold.folded(me) {
        send(ctx, me - 1, STEP_UNFOLD, &store.pack(0..p)).await?;
    }
    Ok(())
}

/// Ring: in round i each rank passes the block it received in round i − 1 (its own first) to the
/// next rank. p − 1 rounds, one block each.
async fn ring(ctx: &Ctx<'_>, store: &mut impl Store) -> Result<()> {
    let (me, p) = me_and_size(ctx);
    let (next, prev) = ((me + 1) % p, (me + p - 1) % p);
    for i in 0..p - 1 {
        let (s, r) = ((me + p - i) % p, (me + p - 1 - i) % p);
        let msg = exchange(ctx, next, &store.pack(s..s + 1), prev, STEP_RING).await?;
        store.unpack(ctx, prev, r..r + 1, msg)?;
    }
    Ok(())
}
