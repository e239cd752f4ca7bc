//! Helpers shared by the algorithms: messaging with the call's tag and deadline, rank arithmetic,
//! the wire form of several blocks in one message, block partitions and argument checks.

use std::borrow::Cow;
use std::ops::Range;

use fmi_channels::{Error, Rank, Result};

use crate::{Ctx, ReduceOp};

/// Sends `data` to `dst` with step `step` of the call's tag.
pub(crate) async fn send(ctx: &Ctx<'_>, dst: usize, step: u32, data: &[u8]) -> Result<()> {
    ctx.channel
        .send(rank(dst), ctx.tag.step(step), data, ctx.deadline)
        .await
}

/// Receives the next message from `src` with step `step` of the call's tag.
pub(crate) async fn recv(ctx: &Ctx<'_>, src: usize, step: u32) -> Result<Vec<u8>> {
    ctx.channel
        .recv(rank(src), ctx.tag.step(step), ctx.deadline)
        .await
}

/// Receives the next message from `src` with step `step` of the call's tag into `buf` (see
/// `Channel::recv_into`); returns its length.
pub(crate) async fn recv_into(
    ctx: &Ctx<'_>,
    src: usize,
    step: u32,
    buf: &mut [u8],
) -> Result<usize> {
    ctx.channel
        .recv_into(rank(src), ctx.tag.step(step), buf, ctx.deadline)
        .await
}

/// Sends to `dst` and receives from `src` concurrently. Doing both at once is what keeps
/// symmetric exchanges deadlock-free on channels whose `send` waits for the receiver; the first
/// failure wins so that a lost peer is reported without waiting for the other half.
pub(crate) async fn exchange(
    ctx: &Ctx<'_>,
    dst: usize,
    data: &[u8],
    src: usize,
    step: u32,
) -> Result<Vec<u8>> {
    let ((), got) = futures::try_join!(send(ctx, dst, step, data), recv(ctx, src, step))?;
    Ok(got)
}

/// Like [`exchange`], receiving into `buf` (see `Channel::recv_into`); returns the length
/// received.
pub(crate) async fn exchange_into(
    ctx: &Ctx<'_>,
    dst: usize,
    data: &[u8],
    src: usize,
    step: u32,
    buf: &mut [u8],
) -> Result<usize> {
    let ((), got) = futures::try_join!(send(ctx, dst, step, data), recv_into(ctx, src, step, buf))?;
    Ok(got)
}

/// `acc[send]` as a slice and `acc[recv]` as a mutable one, for two ranges that do not overlap
/// (either may be empty).
pub(crate) fn split_send_recv(
    acc: &mut [u8],
    send: std::ops::Range<usize>,
    recv: std::ops::Range<usize>,
) -> (&[u8], &mut [u8]) {
    if send.end <= recv.start {
        let (left, right) = acc.split_at_mut(recv.start);
        (&left[send], &mut right[..recv.end - recv.start])
    } else {
        debug_assert!(recv.end <= send.start, "ranges overlap");
        let (left, right) = acc.split_at_mut(send.start);
        (&right[..send.end - send.start], &mut left[recv])
    }
}

/// Ranks are `u32` on the wire and `usize` in the arithmetic here (which never exceeds `size`).
pub(crate) fn rank(r: usize) -> Rank {
    Rank(r as u32)
}

/// This rank and the world size as indices.
pub(crate) fn me_and_size(ctx: &Ctx<'_>) -> (usize, usize) {
    (ctx.rank().idx(), ctx.size() as usize)
}

/// The position of `r` in a numbering that starts at `root`.
pub(crate) fn to_virtual(r: usize, root: usize, p: usize) -> usize {
    (r + p - root) % p
}

/// The rank at position `v` of a numbering that starts at `root`.
pub(crate) fn to_real(v: usize, root: usize, p: usize) -> usize {
    (v + root) % p
}

/// A binomial tree over virtual ranks `0..p` rooted at 0: the parent of `v` clears its lowest set
/// bit, and `v` heads the subtree `v..min(v + span(v), p)`.
pub(crate) mod tree {
    /// The parent of `v > 0`.
    pub(crate) fn parent(v: usize) -> usize {
        v & (v - 1)
    }

    /// The size of the (unclipped) subtree headed by `v`.
    pub(crate) fn span(v: usize, p: usize) -> usize {
        if v == 0 {
            p.next_power_of_two()
        } else {
            v & v.wrapping_neg()
        }
    }

    /// The virtual ranks of `v`'s subtree.
    pub(crate) fn subtree(v: usize, p: usize) -> std::ops::Range<usize> {
        v..(v + span(v, p)).min(p)
    }

    /// `v`'s children, the one with the largest subtree first so that the longest chain of
    /// forwarding starts earliest.
    pub(crate) fn children(v: usize, p: usize) -> impl Iterator<Item = usize> {
        let span = span(v, p);
        std::iter::successors(Some(span >> 1), |m| Some(m >> 1))
            .take_while(|&m| m > 0)
            .map(move |m| v + m)
            .filter(move |&c| c < p)
    }

    /// `v`'s children, smallest subtree (= lowest rank) first: the order in which a reduction
    /// or gather appends them.
    pub(crate) fn children_ascending(v: usize, p: usize) -> Vec<usize> {
        let mut c: Vec<usize> = children(v, p).collect();
        c.reverse();
        c
    }
}

/// MPICH's folding of a world of `p` ranks onto `pof2` (the largest power of two ≤ p) so that
/// recursive doubling and halving can run: among the first `2 * rem` ranks each even rank hands
/// its data to the odd rank above it and sits out; the odd ranks and all ranks from `2 * rem` on
/// take part as "new ranks" `0..pof2`. New rank `i` stands for a contiguous range of real ranks,
/// and a contiguous range of new ranks for a contiguous range of real ranks, which is what keeps
/// non-commutative reductions in rank order.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Fold {
    pub(crate) pof2: usize,
    pub(crate) rem: usize,
}

impl Fold {
    pub(crate) fn new(p: usize) -> Fold {
        let pof2 = if p.is_power_of_two() {
            p
        } else {
            p.next_power_of_two() >> 1
        };
        Fold {
            pof2,
            rem: p - pof2,
        }
    }

    /// Whether `r` is among the ranks that pair up (`r < 2 * rem`).
    pub(crate) fn folded(&self, r: usize) -> bool {
        r < 2 * self.rem
    }

    /// `r`'s new rank, or `None` for an even rank that sits out.
    pub(crate) fn new_rank(&self, r: usize) -> Option<usize> {
        if !self.folded(r) {
            Some(r - self.rem)
        } else if r % 2 == 1 {
            Some(r / 2)
        } else {
            None
        }
    }

    /// The real rank that acts as new rank `n`.
    pub(crate) fn real(&self, n: usize) -> usize {
        if n < self.rem {
            2 * n + 1
        } else {
            n + self.rem
        }
    }

    /// The real ranks that new ranks `news` stand for.
    pub(crate) fn real_range(&self, news: Range<usize>) -> Range<usize> {
        let first = |n: usize| if n < self.rem { 2 * n } else { n + self.rem };
        first(news.start)..first(news.end)
    }
}

/// Byte offsets of `parts` blocks that split `count` elements of `elem` bytes as evenly as
/// possible (the first `count % parts` blocks get one more element; blocks may be empty).
/// `parts + 1` entries; block `i` is `d[i]..d[i + 1]`.
pub(crate) fn split_blocks(count: usize, parts: usize, elem: usize) -> Vec<usize> {
    let (base, extra) = (count / parts, count % parts);
    let mut d = Vec::with_capacity(parts + 1);
    let mut off = 0;
    d.push(0);
    for i in 0..parts {
        off += (base + usize::from(i < extra)) * elem;
        d.push(off);
    }
    d
}

// ---------------------------------------------------------------------------------------------
// Several blocks in one message: payloads back to back, then one u64 LE length per block. The
// lengths trail the payloads so that a sender can grow its buffer in place and append them
// without another copy. A single block travels bare, since its length is the message's.
// ---------------------------------------------------------------------------------------------

const LEN_BYTES: usize = 8;

/// Appends the lengths trailer for `lens` to `buf` (nothing for a single block).
pub(crate) fn seal(buf: &mut Vec<u8>, lens: &[usize]) {
    if lens.len() != 1 {
        for &l in lens {
            buf.extend_from_slice(&(l as u64).to_le_bytes());
        }
    }
}

/// The wire form of `blocks`, borrowing when there is a single block.
pub(crate) fn pack<'b>(blocks: &[&'b [u8]]) -> Cow<'b, [u8]> {
    if let [one] = blocks {
        return Cow::Borrowed(one);
    }
    let total: usize = blocks.iter().map(|b| b.len()).sum();
    let mut buf = Vec::with_capacity(total + LEN_BYTES * blocks.len());
    for b in blocks {
        buf.extend_from_slice(b);
    }
    let lens: Vec<usize> = blocks.iter().map(|b| b.len()).collect();
    seal(&mut buf, &lens);
    Cow::Owned(buf)
}

/// The wire form of blocks lying back to back in `payload` with lengths `lens`.
pub(crate) fn pack_contiguous<'b>(payload: &'b [u8], lens: &[usize]) -> Cow<'b, [u8]> {
    if lens.len() == 1 {
        return Cow::Borrowed(payload);
    }
    let mut buf = Vec::with_capacity(payload.len() + LEN_BYTES * lens.len());
    buf.extend_from_slice(payload);
    seal(&mut buf, lens);
    Cow::Owned(buf)
}

/// Reads a message of `k` blocks: the payload length and each block's length, or `None` if the
/// message is not of that form.
pub(crate) fn unseal(msg: &[u8], k: usize) -> Option<(usize, Vec<usize>)> {
    if k == 1 {
        return Some((msg.len(), vec![msg.len()]));
    }
    let payload = msg.len().checked_sub(k.checked_mul(LEN_BYTES)?)?;
    let mut lens = Vec::with_capacity(k);
    let mut sum = 0usize;
    for chunk in msg[payload..].chunks_exact(LEN_BYTES) {
        let mut le = [0u8; LEN_BYTES];
        le.copy_from_slice(chunk);
        let len = usize::try_from(u64::from_le_bytes(le)).ok()?;
        sum = sum.checked_add(len)?;
        lens.push(len);
    }
    (sum == payload).then_some((payload, lens))
}

/// Splits a message of `k` blocks into owned blocks (a bare single block is kept as is).
pub(crate) fn unpack(msg: Vec<u8>, k: usize) -> Option<Vec<Vec<u8>>> {
    if k == 1 {
        return Some(vec![msg]);
    }
    let (_, lens) = unseal(&msg, k)?;
    let mut off = 0;
    Some(
        lens.iter()
            .map(|&l| {
                let b = msg[off..off + l].to_vec();
                off += l;
                b
            })
            .collect(),
    )
}

// ---------------------------------------------------------------------------------------------
// Errors and checks.
// ---------------------------------------------------------------------------------------------

/// A message from `peer` that does not have the form the algorithm expects; every rank runs the
/// same algorithm, so this means the ranks disagree about the call (counts, root, operation).
pub(crate) fn malformed(
    ctx: &Ctx<'_>,
    peer: usize,
    what: &'static str,
    expected: usize,
    got: usize,
) -> Error {
    Error::CountMismatch {
        me: ctx.rank(),
        peer: rank(peer),
        what,
        expected,
        got,
    }
}

/// Checks the byte length of a contribution received from `peer`, reporting element counts.
pub(crate) fn check_len(
    ctx: &Ctx<'_>,
    peer: usize,
    what: &'static str,
    elem: usize,
    expected: usize,
    got: usize,
) -> Result<()> {
    if expected == got {
        Ok(())
    } else if !got.is_multiple_of(elem) {
        Err(Error::TypeMismatch {
            me: ctx.rank(),
            peer: rank(peer),
            len: got,
            elem_size: elem,
        })
    } else {
        Err(malformed(ctx, peer, what, expected / elem, got / elem))
    }
}

/// Checks a reduction's local buffer and returns the element size.
pub(crate) fn check_local(op: &dyn ReduceOp, data: &[u8]) -> Result<usize> {
    let elem = op.elem_size();
    if elem == 0 {
        return Err(Error::InvalidArgument {
            what: "reduction element size is zero",
        });
    }
    if !data.len().is_multiple_of(elem) {
        return Err(Error::InvalidArgument {
            what: "reduction buffer length is not a multiple of the element size",
        });
    }
    Ok(elem)
}

/// Checks that `root` is a rank of the world.
pub(crate) fn check_root(ctx: &Ctx<'_>, root: Rank) -> Result<usize> {
    fmi_channels::check_rank(root, ctx.size())?;
    Ok(root.idx())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tree_covers_every_rank_once() {
        for p in 1..=40 {
            let mut seen = vec![0u32; p];
            seen[0] += 1;
            for v in 0..p {
                for c in tree::children(v, p) {
                    assert_eq!(tree::parent(c), v);
                    seen[c] += 1;
                    let sub = tree::subtree(c, p);
                    assert!(sub.end <= tree::subtree(v, p).end);
                }
            }
            assert!(seen.iter().all(|&s| s == 1), "p = {p}: {seen:?}");
            assert_eq!(tree::subtree(0, p), 0..p);
        }
    }

    #[test]
    fn fold_maps_new_ranks_to_contiguous_real_ranges() {
        for p in 1..=40 {
            let f = Fold::new(p);
            assert!(f.pof2.is_power_of_two() && f.pof2 <= p && 2 * f.pof2 > p);
            let news: Vec<usize> = (0..p).filter_map(|r| f.new_rank(r)).collect();
            assert_eq!(news, (0..f.pof2).collect::<Vec<_>>());
            for n in 0..f.pof2 {
                assert_eq!(f.new_rank(f.real(n)), Some(n));
                let rr = f.real_range(n..n + 1);
                assert!(rr.contains(&f.real(n)));
            }
            assert_eq!(f.real_range(0..f.pof2), 0..p);
        }
    }

    #[test]
    fn blocks_split_at_element_boundaries() {
        assert_eq!(split_blocks(7, 3, 4), vec![0, 12, 20, 28]);
        assert_eq!(split_blocks(2, 4, 8), vec![0, 8, 16, 16, 16]);
        assert_eq!(split_blocks(0, 2, 8), vec![0, 0, 0]);
    }

    #[test]
    fn packed_blocks_round_trip() {
        let blocks: [&[u8]; 4] = [b"ab", b"", b"cde", b"f"];
        let msg = pack(&blocks).into_owned();
        let back = unpack(msg.clone(), 4).unwrap_or_default();
        assert_eq!(back, blocks.iter().map(|b| b.to_vec()).collect::<Vec<_>>());
        assert!(unpack(msg, 3).is_none());
        assert!(matches!(pack(&blocks[..1]), Cow::Borrowed(b"ab")));
        assert_eq!(unpack(b"xyz".to_vec(), 1), Some(vec![b"xyz".to_vec()]));
        assert_eq!(unpack(Vec::new(), 0), Some(Vec::new()));
        assert!(unseal(b"short", 2).is_none());
    }
}
