//! Allgather of variable-length ([`allgatherv`]) and equal-length ([`allgather`]) blocks, by
//! recursive doubling or by a ring, both written once over a [`Store`] of blocks.

use std::borrow::Cow;
use std::ops::Range;

use fmi_channels::{Error, Result};

use crate::util::{
    exchange, exchange_into, malformed, me_and_size, pack, recv, recv_into, send, split_send_recv,
    unpack, Fold,
};
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
    let mut buf = vec![0; data.len() * ctx.size() as usize];
    allgather_into(ctx, data, &mut buf).await?;
    Ok(buf)
}

/// Like [`allgather`], with the result in `out` (`size` times as long as `data`): every block
/// is received straight into its place there.
pub async fn allgather_into(ctx: &Ctx<'_>, data: &[u8], out: &mut [u8]) -> Result<()> {
    let (me, p) = me_and_size(ctx);
    let len = data.len();
    if out.len() != len * p {
        return Err(Error::CountMismatch {
            me: ctx.rank(),
            peer: ctx.rank(),
            what: "allgather_into: output length must be the input's times the ranks",
            expected: len * p,
            got: out.len(),
        });
    }
    out[me * len..(me + 1) * len].copy_from_slice(data);
    let mut store = EqStore { buf: out, len };
    let algorithm = ctx.config.force.allgather.unwrap_or(
        if len.saturating_mul(p) >= ctx.config.allgather_ring_bytes {
            AllgatherAlgorithm::Ring
        } else {
            AllgatherAlgorithm::RecursiveDoubling
        },
    );
    run(ctx, algorithm, &mut store).await
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
    /// Blocks `give` in wire form and, where the store keeps blocks `take` (which do not
    /// overlap `give`) as one slice, that slice to receive them in place.
    fn split(
        &mut self,
        give: Range<usize>,
        take: Range<usize>,
    ) -> (Cow<'_, [u8]>, Option<&mut [u8]>);
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

    fn split(
        &mut self,
        give: Range<usize>,
        _take: Range<usize>,
    ) -> (Cow<'_, [u8]>, Option<&mut [u8]>) {
        (self.pack(give), None)
    }
}

/// Blocks of `len` bytes each, back to back in the result buffer, so that a range of blocks is
/// sent as a slice of it and received into one without copying.
struct EqStore<'a> {
    buf: &'a mut [u8],
    len: usize,
}

impl EqStore<'_> {
    fn bytes(&self, ranks: Range<usize>) -> Range<usize> {
        ranks.start * self.len..ranks.end * self.len
    }
}

impl Store for EqStore<'_> {
    fn pack(&self, ranks: Range<usize>) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.buf[self.bytes(ranks)])
    }

    fn unpack(
        &mut self,
        ctx: &Ctx<'_>,
        from: usize,
        ranks: Range<usize>,
        msg: Vec<u8>,
    ) -> Result<()> {
        let at = self.bytes(ranks.clone());
        check_blocks(ctx, from, &ranks, at.len(), msg.len())?;
        self.buf[at].copy_from_slice(&msg);
        Ok(())
    }

    fn split(
        &mut self,
        give: Range<usize>,
        take: Range<usize>,
    ) -> (Cow<'_, [u8]>, Option<&mut [u8]>) {
        let (give, take) = (self.bytes(give), self.bytes(take));
        let (mine, theirs) = split_send_recv(self.buf, give, take);
        (Cow::Borrowed(mine), Some(theirs))
    }
}

/// A message of `got` bytes for blocks `ranks` (`want` bytes) sent by `from`.
fn check_blocks(
    ctx: &Ctx<'_>,
    from: usize,
    ranks: &Range<usize>,
    want: usize,
    got: usize,
) -> Result<()> {
    if got == want {
        return Ok(());
    }
    // Name the rank whose block it is when the message holds a single block.
    let culprit = if ranks.len() == 1 { ranks.start } else { from };
    Err(malformed(ctx, culprit, "allgather", want, got))
}

/// Sends blocks `give` to `dst` while receiving blocks `take` from `src`, in place where the
/// store allows it.
async fn swap(
    ctx: &Ctx<'_>,
    store: &mut impl Store,
    (dst, give): (usize, Range<usize>),
    (src, take): (usize, Range<usize>),
    step: u32,
) -> Result<()> {
    let (mine, slot) = store.split(give, take.clone());
    if let Some(slot) = slot {
        let want = slot.len();
        let got = exchange_into(ctx, dst, &mine, src, step, slot).await?;
        return check_blocks(ctx, src, &take, want, got);
    }
    let msg = exchange(ctx, dst, &mine, src, step).await?;
    drop(mine);
    store.unpack(ctx, src, take, msg)
}

/// Receives blocks `take` from `src`, in place where the store allows it.
async fn take(
    ctx: &Ctx<'_>,
    store: &mut impl Store,
    src: usize,
    take: Range<usize>,
    step: u32,
) -> Result<()> {
    let (_, slot) = store.split(take.start..take.start, take.clone());
    if let Some(slot) = slot {
        let want = slot.len();
        let got = recv_into(ctx, src, step, slot).await?;
        return check_blocks(ctx, src, &take, want, got);
    }
    let msg = recv(ctx, src, step).await?;
    store.unpack(ctx, src, take, msg)
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
        return take(ctx, store, me + 1, 0..p, STEP_UNFOLD).await;
    };
    if fold.folded(me) {
        take(ctx, store, me - 1, me - 1..me, STEP_FOLD).await?;
    }
    let mut mask = 1;
    let mut round = 0;
    while mask < fold.pof2 {
        let partner = new ^ mask;
        let group = |n: usize| fold.real_range(n & !(mask - 1)..(n & !(mask - 1)) + mask);
        let peer = fold.real(partner);
        swap(
            ctx,
            store,
            (peer, group(new)),
            (peer, group(partner)),
            STEP_DOUBLING + round,
        )
        .await?;
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
        swap(ctx, store, (next, s..s + 1), (prev, r..r + 1), STEP_RING).await?;
    }
    Ok(())
}
