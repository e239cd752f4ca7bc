//! Helpers shared by the workspace-level tests.
#![allow(dead_code, unreachable_pub, missing_docs, clippy::expect_used)]

use std::future::Future;

use fmi::{local_world_with, Communicator, Config};

/// Runs `f` on every rank of an in-process world of `n` ranks (one task each) and returns the
/// results by rank. A panic on any rank fails the test.
pub async fn run<F, Fut, R>(n: u32, config: Config, f: F) -> Vec<R>
where
    F: Fn(Communicator) -> Fut,
    Fut: Future<Output = R> + Send + 'static,
    R: Send + 'static,
{
    let world = local_world_with(n, config).expect("world");
    let handles: Vec<_> = world.into_iter().map(|c| tokio::spawn(f(c))).collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.expect("rank task panicked"));
    }
    out
}

/// A 2×2 matrix of u64 with wrapping arithmetic: an associative, non-commutative op.
#[derive(Clone, Copy, Debug, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
#[repr(C)]
pub struct Mat2(pub [u64; 4]);

impl Mat2 {
    pub fn mul(&self, o: &Mat2) -> Mat2 {
        let [a, b, c, d] = self.0;
        let [e, f, g, h] = o.0;
        Mat2([
            a.wrapping_mul(e).wrapping_add(b.wrapping_mul(g)),
            a.wrapping_mul(f).wrapping_add(b.wrapping_mul(h)),
            c.wrapping_mul(e).wrapping_add(d.wrapping_mul(g)),
            c.wrapping_mul(f).wrapping_add(d.wrapping_mul(h)),
        ])
    }

    /// A distinct, non-commuting matrix for (rank, index).
    pub fn for_rank(rank: u32, i: usize) -> Mat2 {
        let r = rank as u64 + 1;
        let i = i as u64;
        Mat2([r + i, 1, r * 3 + 1, 2 + i])
    }
}
