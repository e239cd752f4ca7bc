//! All-to-all by pairwise exchange.

use fmi_channels::{Error, Result};

use crate::util::{exchange, me_and_size};
use crate::Ctx;

const STEP: u32 = 0;

/// Rank r sends `blocks[d]` to each d and returns what each rank sent it, index = source.
///
/// Pairwise exchange: in step i (1 ≤ i < p) send to `(r + i) mod p` while receiving from
/// `(r − i) mod p`; each ordered pair exchanges exactly one message, so one tag step serves all.
/// The own block is copied locally. p − 1 steps; memory is the result plus one block in flight.
pub async fn alltoallv(ctx: &Ctx<'_>, blocks: &[&[u8]]) -> Result<Vec<Vec<u8>>> {
    let (me, p) = me_and_size(ctx);
    if blocks.len() != p {
        return Err(Error::InvalidArgument {
            what: "alltoallv: pass exactly one block per rank",
        });
    }
    let mut out = vec![Vec::new(); p];
    out[me] = blocks[me].to_vec();
    for i in 1..p {
        let (dst, src) = ((me + i) % p, (me + p - i) % p);
        out[src] = exchange(ctx, dst, blocks[dst], src, STEP).await?;
    }
    Ok(out)
}
