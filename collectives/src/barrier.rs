//! Barrier by dissemination.

use fmi_channels::Result;

use crate::util::{exchange, me_and_size};
use crate::Ctx;

/// Returns once every rank has entered the barrier.
///
/// Dissemination: in round k every rank signals `(r + 2^k) mod p` and waits for
/// `(r − 2^k) mod p`; after ⌈lg p⌉ rounds each rank has heard, directly or through others, from
/// every rank. Uses the channel's native barrier when it offers one for this call.
pub async fn barrier(ctx: &Ctx<'_>) -> Result<()> {
    if let Some(native) = ctx.channel.native_collectives() {
        if let Some(done) = native.barrier(ctx.tag, ctx.deadline) {
            return done.await;
        }
    }
    let (me, p) = me_and_size(ctx);
    let mut dist = 1;
    let mut round = 0;
    while dist < p {
        exchange(ctx, (me + dist) % p, &[], (me + p - dist) % p, round).await?;
        dist <<= 1;
        round += 1;
    }
    Ok(())
}
