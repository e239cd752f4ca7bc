//! Inclusive and exclusive prefix reductions by recursive doubling.

use fmi_channels::Result;

use crate::util::{check_len, check_local, exchange, me_and_size};
use crate::{Ctx, ReduceOp};

/// Inclusive prefix reduction: rank r gets `x0 op … op xr`.
///
/// MPICH's recursive doubling: in round k rank r swaps its partial (the reduction over its
/// aligned group of 2^k ranks) with `r ^ 2^k`; a partial from below is a left operand of both
/// the partial and the result, one from above a right operand of the partial only. ⌈lg p⌉
/// rounds; correct for non-commutative ops.
pub async fn scan(ctx: &Ctx<'_>, data: &[u8], op: &dyn ReduceOp) -> Result<Vec<u8>> {
    let result = prefix(ctx, data, op, true).await?;
    // The inclusive result always starts as the rank's own data.
    Ok(result.unwrap_or_default())
}

/// Exclusive prefix reduction: rank r > 0 gets `x0 op … op x(r−1)`; rank 0 gets `None`.
///
/// The same recursive doubling as [`scan`], with the result starting empty.
pub async fn exscan(ctx: &Ctx<'_>, data: &[u8], op: &dyn ReduceOp) -> Result<Option<Vec<u8>>> {
    prefix(ctx, data, op, false).await
}

async fn prefix(
    ctx: &Ctx<'_>,
    data: &[u8],
    op: &dyn ReduceOp,
    inclusive: bool,
) -> Result<Option<Vec<u8>>> {
    let what = if inclusive { "scan" } else { "exscan" };
    let elem = check_local(op, data)?;
    let (me, p) = me_and_size(ctx);
    let mut result = inclusive.then(|| data.to_vec());
    let mut partial = data.to_vec();
    let mut mask = 1;
    let mut round = 0;
    while mask < p {
        let partner = me ^ mask;
        if partner < p {
            let theirs = exchange(ctx, partner, &partial, partner, round).await?;
            check_len(ctx, partner, what, elem, data.len(), theirs.len())?;
            if partner < me {
                op.apply_left(&theirs, &mut partial);
                match &mut result {
                    Some(result) => op.apply_left(&theirs, result),
                    None => result = Some(theirs),
                }
            } else {
                op.apply_right(&mut partial, &theirs);
            }
        }
        mask <<= 1;
        round += 1;
    }
    Ok(result)
}
