//! Every collective against a sequential reference on the in-memory channel: world sizes 1..=9,
//! element counts 0, 1, 7 and 10 000, every algorithm (forced and automatic), several reduction
//! ops including a non-commutative one; plus property tests for the reductions, deadline and
//! peer-loss behaviour, count mismatches, the native-collective hooks and inbox leaks.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use fmi_channels::memory::{world, MemoryChannel};
use fmi_channels::{
    Capabilities, Channel, Error, Instant, JobId, NativeCollectives, Rank, Result, Tag,
};
use fmi_collectives::{
    allgather, allgather_into, allgatherv, allreduce, allreduce_into, alltoallv, barrier, bcast,
    bcast_into, exscan, gatherv, reduce, reduce_scatter_block, scan, scatterv, AllgatherAlgorithm,
    AllreduceAlgorithm, BcastAlgorithm, Config, Ctx, ReduceOp,
};
use futures::future::BoxFuture;
use proptest::prelude::*;

const DEADLINE: Duration = Duration::from_secs(30);
const COUNTS: [usize; 4] = [0, 1, 7, 10_000];
const MAX_P: u32 = 9;

// ---------------------------------------------------------------------------------------------
// Reduction ops at the byte level.
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// u64 wrapping sum.
    U64Sum,
    /// f64 sum of integer-valued floats, exact in any order.
    F64Sum,
    /// i32 max.
    I32Max,
    /// 2×2 u64 matrix product modulo 2^64: associative, not commutative.
    Mat2,
}

const KINDS: [Kind; 4] = [Kind::U64Sum, Kind::F64Sum, Kind::I32Max, Kind::Mat2];

struct Op(Kind);

fn u64_at(b: &[u8], i: usize) -> u64 {
    u64::from_le_bytes(b[i * 8..i * 8 + 8].try_into().unwrap())
}

impl Op {
    /// `out = l op r` for one element.
    fn elem(&self, l: &[u8], r: &[u8], out: &mut [u8]) {
        match self.0 {
            Kind::U64Sum => {
                out.copy_from_slice(&u64_at(l, 0).wrapping_add(u64_at(r, 0)).to_le_bytes())
            }
            Kind::F64Sum => {
                let f = |b: &[u8]| f64::from_le_bytes(b.try_into().unwrap());
                out.copy_from_slice(&(f(l) + f(r)).to_le_bytes())
            }
            Kind::I32Max => {
                let i = |b: &[u8]| i32::from_le_bytes(b.try_into().unwrap());
                out.copy_from_slice(&i(l).max(i(r)).to_le_bytes())
            }
            Kind::Mat2 => {
                let (a, b) = (
                    [0, 1, 2, 3].map(|k| u64_at(l, k)),
                    [0, 1, 2, 3].map(|k| u64_at(r, k)),
                );
                let m = |x: u64, y: u64| x.wrapping_mul(y);
                let c = [
                    m(a[0], b[0]).wrapping_add(m(a[1], b[2])),
                    m(a[0], b[1]).wrapping_add(m(a[1], b[3])),
                    m(a[2], b[0]).wrapping_add(m(a[3], b[2])),
                    m(a[2], b[1]).wrapping_add(m(a[3], b[3])),
                ];
                for (k, v) in c.iter().enumerate() {
                    out[k * 8..k * 8 + 8].copy_from_slice(&v.to_le_bytes());
                }
            }
        }
    }
}

impl ReduceOp for Op {
    fn elem_size(&self) -> usize {
        match self.0 {
            Kind::U64Sum | Kind::F64Sum => 8,
            Kind::I32Max => 4,
            Kind::Mat2 => 32,
        }
    }
    fn commutative(&self) -> bool {
        self.0 != Kind::Mat2
    }
    fn apply_left(&self, lhs: &[u8], inout: &mut [u8]) {
        assert_eq!(lhs.len(), inout.len());
        let es = self.elem_size();
        let mut tmp = [0u8; 32];
        for (l, io) in lhs.chunks_exact(es).zip(inout.chunks_exact_mut(es)) {
            self.elem(l, io, &mut tmp[..es]);
            io.copy_from_slice(&tmp[..es]);
        }
    }
    fn apply_right(&self, inout: &mut [u8], rhs: &[u8]) {
        assert_eq!(rhs.len(), inout.len());
        let es = self.elem_size();
        let mut tmp = [0u8; 32];
        for (io, r) in inout.chunks_exact_mut(es).zip(rhs.chunks_exact(es)) {
            self.elem(io, r, &mut tmp[..es]);
            io.copy_from_slice(&tmp[..es]);
        }
    }
}

fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Rank `rank`'s `count` elements of `kind` for the case salted `salt`.
fn elems(kind: Kind, rank: usize, count: usize, salt: u64) -> Vec<u8> {
    let seed = mix(salt ^ mix(rank as u64 + 1));
    let word = |i: usize| mix(seed ^ i as u64);
    let mut out = Vec::new();
    for i in 0..count {
        match kind {
            Kind::U64Sum => out.extend_from_slice(&word(i).to_le_bytes()),
            Kind::F64Sum => {
                let v = (word(i) % 2001) as f64 - 1000.0;
                out.extend_from_slice(&v.to_le_bytes());
            }
            Kind::I32Max => out.extend_from_slice(&(word(i) as i32).to_le_bytes()),
            Kind::Mat2 => {
                for k in 0..4 {
                    out.extend_from_slice(&word(4 * i + k).to_le_bytes());
                }
            }
        }
    }
    out
}

/// `xs[0] op xs[1] op …` in order.
fn fold_ref(kind: Kind, xs: &[Vec<u8>]) -> Vec<u8> {
    let mut acc = xs[0].clone();
    for x in &xs[1..] {
        Op(kind).apply_right(&mut acc, x);
    }
    acc
}

/// Plain bytes for the non-reduction collectives.
fn bytes(rank: usize, len: usize, salt: u64) -> Vec<u8> {
    let seed = mix(salt.wrapping_mul(31) ^ rank as u64);
    (0..len).map(|i| mix(seed ^ i as u64) as u8).collect()
}

/// A per-rank length that varies (including zero) for the v-collectives; `count` 8-byte elements
/// on average.
fn vlen(rank: usize, count: usize) -> usize {
    count * 8 * (rank % 3) / 2 + (rank % 2) * (count % 5)
}

// ---------------------------------------------------------------------------------------------
// Running cases on a world.
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
enum Case {
    Barrier,
    Bcast {
        root: usize,
        len: usize,
        force: Option<BcastAlgorithm>,
        into: bool,
    },
    Gatherv {
        root: usize,
        count: usize,
    },
    Scatterv {
        root: usize,
        count: usize,
    },
    Allgatherv {
        count: usize,
        force: Option<AllgatherAlgorithm>,
    },
    Allgather {
        count: usize,
        force: Option<AllgatherAlgorithm>,
    },
    Alltoallv {
        count: usize,
    },
    Reduce {
        root: usize,
        count: usize,
        kind: Kind,
    },
    Allreduce {
        count: usize,
        kind: Kind,
        force: Option<AllreduceAlgorithm>,
        large: AllreduceAlgorithm,
    },
    ReduceScatterBlock {
        count: usize,
        kind: Kind,
    },
    Scan {
        count: usize,
        kind: Kind,
    },
    Exscan {
        count: usize,
        kind: Kind,
    },
}

#[derive(Debug, PartialEq)]
enum Out {
    Unit,
    Bytes(Vec<u8>),
    Maybe(Option<Vec<u8>>),
    Blocks(Vec<Vec<u8>>),
    MaybeBlocks(Option<Vec<Vec<u8>>>),
}

fn config_for(case: &Case) -> Config {
    let mut c = Config::default();
    match *case {
        Case::Bcast { force, .. } => c.force.bcast = force,
        Case::Allgatherv { force, .. } | Case::Allgather { force, .. } => c.force.allgather = force,
        Case::Allreduce { force, large, .. } => {
            c.force.allreduce = force;
            c.large_allreduce = large;
        }
        _ => {}
    }
    c
}

fn roots(p: usize) -> Vec<usize> {
    let mut r = vec![0, p / 2, p - 1];
    r.dedup();
    r
}

/// Runs `body` on every rank of a fresh memory world of `p` ranks (each rank a task), returns the
/// results by rank and checks that no message was left unreceived.
async fn on_world<T, F, Fut>(p: u32, body: F) -> Vec<T>
where
    F: Fn(Arc<MemoryChannel>) -> Fut,
    Fut: Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    let chans: Vec<Arc<MemoryChannel>> = world(JobId::new("t").unwrap(), p)
        .into_iter()
        .map(Arc::new)
        .collect();
    let tasks: Vec<_> = chans
        .iter()
        .map(|c| tokio::spawn(body(Arc::clone(c))))
        .collect();
    let mut outs = Vec::new();
    for t in tasks {
        outs.push(t.await.expect("rank task panicked"));
    }
    for c in &chans {
        assert_eq!(
            c.inbox().pending_keys(),
            0,
            "rank {} has messages or receivers left over",
            c.rank()
        );
    }
    outs
}

fn ctx<'a>(ch: &'a MemoryChannel, seq: u64, config: &'a Config) -> Ctx<'a> {
    Ctx {
        channel: ch,
        tag: Tag::collective(seq),
        deadline: Instant::now() + DEADLINE,
        config,
    }
}

async fn run_case(ch: &MemoryChannel, seq: u64, case: &Case, salt: u64) -> Result<Out> {
    let p = ch.size() as usize;
    let me = ch.rank().idx();
    let config = config_for(case);
    let ctx = ctx(ch, seq, &config);
    // The `_into` forms run after the others under sequence numbers of their own, and must
    // give the same result.
    let into_ctx = self::ctx(ch, seq + (1 << 32), &config);
    let rank = |r: usize| Rank(r as u32);
    Ok(match *case {
        Case::Barrier => {
            barrier(&ctx).await?;
            Out::Unit
        }
        Case::Bcast {
            root, len, into, ..
        } => {
            let data = bytes(root, len, salt);
            if into {
                let mut buf = if me == root { data } else { vec![0xee; len] };
                bcast_into(&ctx, rank(root), &mut buf).await?;
                Out::Bytes(buf)
            } else {
                Out::Bytes(bcast(&ctx, rank(root), (me == root).then_some(&data[..])).await?)
            }
        }
        Case::Gatherv { root, count } => {
            let data = bytes(me, vlen(me, count), salt);
            Out::MaybeBlocks(gatherv(&ctx, rank(root), &data).await?)
        }
        Case::Scatterv { root, count } => {
            let blocks: Vec<Vec<u8>> = (0..p).map(|d| bytes(d, vlen(d, count), salt)).collect();
            let refs: Vec<&[u8]> = blocks.iter().map(Vec::as_slice).collect();
            Out::Bytes(scatterv(&ctx, rank(root), (me == root).then_some(&refs[..])).await?)
        }
        Case::Allgatherv { count, .. } => {
            Out::Blocks(allgatherv(&ctx, &bytes(me, vlen(me, count), salt)).await?)
        }
        Case::Allgather { count, .. } => {
            let data = bytes(me, count * 8, salt);
            let whole = allgather(&ctx, &data).await?;
            let mut out = vec![0xa5; whole.len()];
            allgather_into(&into_ctx, &data, &mut out).await?;
            assert_eq!(out, whole, "allgather_into against allgather, rank {me}");
            Out::Bytes(whole)
        }
        Case::Alltoallv { count } => {
            let blocks: Vec<Vec<u8>> = (0..p)
                .map(|d| bytes(me * p + d, vlen(me + d, count), salt))
                .collect();
            let refs: Vec<&[u8]> = blocks.iter().map(Vec::as_slice).collect();
            Out::Blocks(alltoallv(&ctx, &refs).await?)
        }
        Case::Reduce { root, count, kind } => {
            let data = elems(kind, me, count, salt);
            Out::Maybe(reduce(&ctx, rank(root), &data, &Op(kind)).await?)
        }
        Case::Allreduce { count, kind, .. } => {
            let data = elems(kind, me, count, salt);
            let whole = allreduce(&ctx, &data, &Op(kind)).await?;
            let mut out = vec![0xa5; data.len()];
            allreduce_into(&into_ctx, &data, &mut out, &Op(kind)).await?;
            assert_eq!(out, whole, "allreduce_into against allreduce, rank {me}");
            Out::Bytes(whole)
        }
        Case::ReduceScatterBlock { count, kind } => {
            let data = elems(kind, me, count * p, salt);
            Out::Bytes(reduce_scatter_block(&ctx, &data, &Op(kind)).await?)
        }
        Case::Scan { count, kind } => {
            Out::Bytes(scan(&ctx, &elems(kind, me, count, salt), &Op(kind)).await?)
        }
        Case::Exscan { count, kind } => {
            Out::Maybe(exscan(&ctx, &elems(kind, me, count, salt), &Op(kind)).await?)
        }
    })
}

/// What each rank must return for `case` on `p` ranks.
fn expected(case: &Case, p: usize, salt: u64) -> Vec<Out> {
    let all = |f: &dyn Fn(usize) -> Out| (0..p).map(f).collect::<Vec<_>>();
    match *case {
        Case::Barrier => all(&|_| Out::Unit),
        Case::Bcast { root, len, .. } => all(&|_| Out::Bytes(bytes(root, len, salt))),
        Case::Gatherv { root, count } => {
            let gathered: Vec<Vec<u8>> = (0..p).map(|r| bytes(r, vlen(r, count), salt)).collect();
            all(&|r| Out::MaybeBlocks((r == root).then(|| gathered.clone())))
        }
        Case::Scatterv { count, .. } => all(&|r| Out::Bytes(bytes(r, vlen(r, count), salt))),
        Case::Allgatherv { count, .. } => {
            all(&|_| Out::Blocks((0..p).map(|r| bytes(r, vlen(r, count), salt)).collect()))
        }
        Case::Allgather { count, .. } => {
            all(&|_| Out::Bytes((0..p).flat_map(|r| bytes(r, count * 8, salt)).collect()))
        }
        Case::Alltoallv { count } => all(&|me| {
            Out::Blocks(
                (0..p)
                    .map(|src| bytes(src * p + me, vlen(src + me, count), salt))
                    .collect(),
            )
        }),
        Case::Reduce { root, count, kind } => {
            let xs: Vec<_> = (0..p).map(|r| elems(kind, r, count, salt)).collect();
            let result = fold_ref(kind, &xs);
            all(&|r| Out::Maybe((r == root).then(|| result.clone())))
        }
        Case::Allreduce { count, kind, .. } => {
            let xs: Vec<_> = (0..p).map(|r| elems(kind, r, count, salt)).collect();
            let result = fold_ref(kind, &xs);
            all(&|_| Out::Bytes(result.clone()))
        }
        Case::ReduceScatterBlock { count, kind } => {
            let xs: Vec<_> = (0..p).map(|r| elems(kind, r, count * p, salt)).collect();
            let result = fold_ref(kind, &xs);
            let block = result.len() / p;
            all(&|r| Out::Bytes(result[r * block..(r + 1) * block].to_vec()))
        }
        Case::Scan { count, kind } | Case::Exscan { count, kind } => {
            let xs: Vec<_> = (0..p).map(|r| elems(kind, r, count, salt)).collect();
            let mut prefixes: Vec<Vec<u8>> = Vec::with_capacity(p);
            for x in &xs {
                let mut next = x.clone();
                if let Some(prev) = prefixes.last() {
                    Op(kind).apply_left(prev, &mut next);
                }
                prefixes.push(next);
            }
            if matches!(case, Case::Scan { .. }) {
                all(&|r| Out::Bytes(prefixes[r].clone()))
            } else {
                all(&|r| Out::Maybe(r.checked_sub(1).map(|q| prefixes[q].clone())))
            }
        }
    }
}

/// Describes how `got` differs from `exp` without printing megabytes: the first differing
/// position of their debug forms, with some context.
fn diff(got: &Out, exp: &Out) -> Option<String> {
    if got == exp {
        return None;
    }
    let (g, e) = (format!("{got:?}"), format!("{exp:?}"));
    let at = g.bytes().zip(e.bytes()).take_while(|(a, b)| a == b).count();
    // Debug forms of byte vectors are ASCII, so any position is a char boundary.
    let window = |s: &str| {
        let (from, to) = (at.saturating_sub(40), (at + 80).min(s.len()));
        s.get(from..to).unwrap_or(s).to_string()
    };
    Some(format!(
        "differs at char {at} of {} (expected {}):\n  got …{}…\n  exp …{}…",
        g.len(),
        e.len(),
        window(&g),
        window(&e)
    ))
}

/// Runs `cases` in order on one world of `p` ranks (so that tags of consecutive calls could mix
/// if an algorithm misused them) and compares every rank's result with the reference.
async fn check_cases(p: u32, cases: Vec<Case>, salt: u64) {
    let cases = Arc::new(cases);
    let outs = on_world(p, |ch| {
        let cases = Arc::clone(&cases);
        async move {
            let mut outs = Vec::new();
            for (i, case) in cases.iter().enumerate() {
                let out = run_case(&ch, i as u64, case, salt ^ i as u64).await;
                let failed = out.is_err();
                outs.push(out);
                if failed {
                    break;
                }
            }
            outs
        }
    })
    .await;
    for (i, case) in cases.iter().enumerate() {
        let exp = expected(case, p as usize, salt ^ i as u64);
        for (r, (outs, exp)) in outs.iter().zip(exp).enumerate() {
            match outs.get(i) {
                Some(Ok(got)) => {
                    if let Some(d) = diff(got, &exp) {
                        panic!("p = {p}, case {i} {case:?}, rank {r}: {d}");
                    }
                }
                Some(Err(e)) => panic!("p = {p}, case {i} {case:?}, rank {r}: error {e}"),
                None => panic!("p = {p}, case {i} {case:?}, rank {r}: not run"),
            }
        }
    }
}

async fn check_all_sizes(cases: impl Fn(usize) -> Vec<Case>) {
    for p in 1..=MAX_P {
        check_cases(p, cases(p as usize), u64::from(p)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// The matrix.
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn barrier_and_bcast_match_reference() {
    check_all_sizes(|p| {
        let mut cases = vec![Case::Barrier];
        for root in roots(p) {
            for count in COUNTS {
                for force in [
                    None,
                    Some(BcastAlgorithm::Binomial),
                    Some(BcastAlgorithm::ScatterAllgather),
                ] {
                    for into in [false, true] {
                        cases.push(Case::Bcast {
                            root,
                            len: count * 8,
                            force,
                            into,
                        });
                    }
                }
            }
            cases.push(Case::Barrier);
        }
        cases
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gatherv_and_scatterv_match_reference() {
    check_all_sizes(|p| {
        let mut cases = Vec::new();
        for root in roots(p) {
            for count in COUNTS {
                cases.push(Case::Gatherv { root, count });
                cases.push(Case::Scatterv { root, count });
            }
        }
        cases
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allgather_and_alltoall_match_reference() {
    check_all_sizes(|_| {
        let mut cases = Vec::new();
        for count in COUNTS {
            for force in [
                None,
                Some(AllgatherAlgorithm::RecursiveDoubling),
                Some(AllgatherAlgorithm::Ring),
            ] {
                cases.push(Case::Allgatherv { count, force });
                cases.push(Case::Allgather { count, force });
            }
            cases.push(Case::Alltoallv { count });
        }
        cases
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reduce_matches_reference() {
    check_all_sizes(|p| {
        let mut cases = Vec::new();
        for root in roots(p) {
            for count in COUNTS {
                for kind in KINDS {
                    cases.push(Case::Reduce { root, count, kind });
                }
            }
        }
        cases
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allreduce_matches_reference() {
    use AllreduceAlgorithm::{Rabenseifner, RecursiveDoubling, Ring};
    check_all_sizes(|_| {
        let mut cases = Vec::new();
        for count in COUNTS {
            for kind in KINDS {
                for (force, large) in [
                    (Some(RecursiveDoubling), Rabenseifner),
                    (Some(Rabenseifner), Rabenseifner),
                    (Some(Ring), Rabenseifner),
                    (None, Rabenseifner),
                    (None, Ring),
                ] {
                    cases.push(Case::Allreduce {
                        count,
                        kind,
                        force,
                        large,
                    });
                }
            }
        }
        cases
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reduce_scatter_and_scans_match_reference() {
    check_all_sizes(|p| {
        let mut cases = Vec::new();
        for count in COUNTS {
            for kind in KINDS {
                // Keep the reduce-scatter's total (count × p elements) near the other cases'.
                let per_block = if count > 100 { count / p } else { count };
                cases.push(Case::ReduceScatterBlock {
                    count: per_block,
                    kind,
                });
                cases.push(Case::Scan { count, kind });
                cases.push(Case::Exscan { count, kind });
            }
        }
        cases
    })
    .await;
}

/// Many different collectives back to back on one world, interleaved, with seq numbers that
/// differ only in high bits of the tag; nothing may be left in any inbox afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_sequence_leaves_inboxes_empty() {
    for p in [3u32, 6, 8] {
        let cases: Vec<Case> = (0..3)
            .flat_map(|k| {
                let count = [1, 7, 300][k];
                let root = k % p as usize;
                vec![
                    Case::Bcast {
                        root,
                        len: count,
                        force: Some(BcastAlgorithm::ScatterAllgather),
                        into: k == 1,
                    },
                    Case::Allreduce {
                        count,
                        kind: Kind::Mat2,
                        force: Some(AllreduceAlgorithm::Rabenseifner),
                        large: AllreduceAlgorithm::Ring,
                    },
                    Case::Barrier,
                    Case::Gatherv { root, count },
                    Case::Allgatherv {
                        count,
                        force: Some(AllgatherAlgorithm::Ring),
                    },
                    Case::Scan {
                        count,
                        kind: Kind::U64Sum,
                    },
                    Case::Reduce {
                        root,
                        count,
                        kind: Kind::Mat2,
                    },
                    Case::Alltoallv { count },
                    Case::ReduceScatterBlock {
                        count,
                        kind: Kind::Mat2,
                    },
                    Case::Exscan {
                        count,
                        kind: Kind::Mat2,
                    },
                ]
            })
            .collect();
        // check_cases asserts that every inbox is empty at the end.
        check_cases(p, cases, 99).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Property tests of the reductions.
// ---------------------------------------------------------------------------------------------

fn reduction_cases(count: usize, kind: Kind, algo: usize, root: usize) -> Vec<Case> {
    let (force, large) = match algo {
        0 => (
            Some(AllreduceAlgorithm::RecursiveDoubling),
            AllreduceAlgorithm::Ring,
        ),
        1 => (
            Some(AllreduceAlgorithm::Rabenseifner),
            AllreduceAlgorithm::Ring,
        ),
        2 => (Some(AllreduceAlgorithm::Ring), AllreduceAlgorithm::Ring),
        _ => (None, AllreduceAlgorithm::Ring),
    };
    vec![
        Case::Allreduce {
            count,
            kind,
            force,
            large,
        },
        Case::Reduce { root, count, kind },
        Case::ReduceScatterBlock { count, kind },
        Case::Scan { count, kind },
        Case::Exscan { count, kind },
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn reductions_match_sequential_reference(
        p in 1u32..=MAX_P,
        count in 0usize..300,
        kind in proptest::sample::select(KINDS.to_vec()),
        algo in 0usize..4,
        root in 0usize..9,
        salt in any::<u64>(),
    ) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let cases = reduction_cases(count, kind, algo, root % p as usize);
        rt.block_on(check_cases(p, cases, salt));
    }
}

// ---------------------------------------------------------------------------------------------
// Failures: silent and dead peers, mismatched counts, bad arguments.
// ---------------------------------------------------------------------------------------------

/// Rank 2 is alive but never calls the collective: the others give up at the deadline with a
/// typed error instead of hanging. Ranks that wait on rank 2 directly name it; a rank that waits
/// on one of those names that one (there is no abort message to pass the culprit on).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_rank_makes_the_others_time_out() {
    let chans: Vec<Arc<MemoryChannel>> = world(JobId::new("t").unwrap(), 3)
        .into_iter()
        .map(Arc::new)
        .collect();
    let config = Config::default();
    let wait = Duration::from_millis(300);
    let started = Instant::now();
    let deadline = started + wait;
    let run = |r: usize| {
        let ch = Arc::clone(&chans[r]);
        let config = config.clone();
        tokio::spawn(async move {
            let ctx = Ctx {
                channel: &*ch,
                tag: Tag::collective(1),
                deadline,
                config: &config,
            };
            allreduce(&ctx, &[1, 0, 0, 0, 0, 0, 0, 0], &Op(Kind::U64Sum))
                .await
                .map(drop)
        })
    };
    let (a, b) = (run(0), run(1));
    let (a, b) = (a.await.unwrap(), b.await.unwrap());
    assert!(
        started.elapsed() < wait + Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    assert!(
        matches!(
            b,
            Err(Error::Timeout {
                me: Rank(1),
                peer: Rank(2),
                ..
            })
        ),
        "rank 1: {b:?}"
    );
    assert!(
        a.as_ref().is_err_and(Error::is_peer_failure),
        "rank 0: {a:?}"
    );

    let chans: Vec<Arc<MemoryChannel>> = world(JobId::new("t").unwrap(), 3)
        .into_iter()
        .map(Arc::new)
        .collect();
    let started = Instant::now();
    let deadline = started + wait;
    let run = |r: usize| {
        let ch = Arc::clone(&chans[r]);
        let config = config.clone();
        tokio::spawn(async move {
            let ctx = Ctx {
                channel: &*ch,
                tag: Tag::collective(1),
                deadline,
                config: &config,
            };
            barrier(&ctx).await
        })
    };
    let (a, b) = (run(0), run(1));
    for (r, res) in [(0, a.await.unwrap()), (1, b.await.unwrap())] {
        assert!(
            matches!(res, Err(Error::Timeout { peer: Rank(2), .. })),
            "barrier, rank {r}: {res:?}"
        );
    }
    assert!(started.elapsed() < wait + Duration::from_secs(5));
}

/// A rank that is gone (its endpoint dropped) is reported as lost long before the deadline, and
/// the failure spreads as each failing rank drops its own endpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_rank_is_reported_without_waiting_for_the_deadline() {
    for algo in [
        AllreduceAlgorithm::RecursiveDoubling,
        AllreduceAlgorithm::Rabenseifner,
        AllreduceAlgorithm::Ring,
    ] {
        let mut chans = world(JobId::new("t").unwrap(), 3);
        drop(chans.pop());
        let started = Instant::now();
        let tasks: Vec<_> = chans
            .into_iter()
            .map(|ch| {
                let mut config = Config::default();
                config.force.allreduce = Some(algo);
                tokio::spawn(async move {
                    let ctx = Ctx {
                        channel: &ch,
                        tag: Tag::collective(5),
                        deadline: Instant::now() + DEADLINE,
                        config: &config,
                    };
                    allreduce(&ctx, &[0; 64], &Op(Kind::U64Sum)).await.map(drop)
                    // `ch` drops here, which tells the others this rank is gone.
                })
            })
            .collect();
        let mut named_two = false;
        for t in tasks {
            let res = t.await.unwrap();
            assert!(
                res.as_ref().is_err_and(Error::is_peer_failure),
                "{algo:?}: {res:?}"
            );
            named_two |= matches!(res, Err(Error::PeerLost { peer: Rank(2), .. }));
        }
        assert!(named_two, "{algo:?}: nobody named rank 2");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{algo:?}: waited for the deadline"
        );
    }
}

/// Runs one closure per rank with a short deadline and returns the results by rank.
async fn each_rank<T, F, Fut>(p: u32, body: F) -> Vec<T>
where
    F: Fn(Arc<MemoryChannel>, Instant) -> Fut,
    Fut: Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    let deadline = Instant::now() + Duration::from_millis(500);
    let chans: Vec<Arc<MemoryChannel>> = world(JobId::new("t").unwrap(), p)
        .into_iter()
        .map(Arc::new)
        .collect();
    let tasks: Vec<_> = chans
        .iter()
        .map(|c| tokio::spawn(body(Arc::clone(c), deadline)))
        .collect();
    let mut outs = Vec::new();
    for t in tasks {
        outs.push(t.await.unwrap());
    }
    outs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_into_buffer_of_another_length_is_refused_before_sending() {
    let outs = each_rank(2, |ch, deadline| async move {
        let config = Config::default();
        let ctx = Ctx {
            channel: &*ch,
            tag: Tag::collective(0),
            deadline,
            config: &config,
        };
        let mut out = vec![0u8; 16];
        let reduced = allreduce_into(&ctx, &[1u8; 8], &mut out, &Op(Kind::U64Sum)).await;
        let gathered = allgather_into(&ctx, &[1u8; 8], &mut out[..15]).await;
        (reduced, gathered)
    })
    .await;
    for (r, (reduced, gathered)) in outs.iter().enumerate() {
        assert!(
            matches!(
                reduced,
                Err(Error::CountMismatch { me, expected: 8, got: 16, .. }) if me.idx() == r
            ),
            "rank {r}: {reduced:?}"
        );
        assert!(
            matches!(
                gathered,
                Err(Error::CountMismatch { me, expected: 16, got: 15, .. }) if me.idx() == r
            ),
            "rank {r}: {gathered:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mismatched_reduction_lengths_are_count_mismatches() {
    use AllreduceAlgorithm::{Rabenseifner, RecursiveDoubling, Ring};
    for algo in [RecursiveDoubling, Rabenseifner, Ring] {
        let outs = each_rank(2, |ch, deadline| async move {
            let mut config = Config::default();
            config.force.allreduce = Some(algo);
            let ctx = Ctx {
                channel: &*ch,
                tag: Tag::collective(0),
                deadline,
                config: &config,
            };
            let data = vec![1u8; 8 * (1 + 2 * ch.rank().idx())];
            allreduce(&ctx, &data, &Op(Kind::U64Sum)).await
        })
        .await;
        assert!(
            matches!(
                outs[0],
                Err(Error::CountMismatch {
                    me: Rank(0),
                    peer: Rank(1),
                    ..
                })
            ),
            "{algo:?}: {:?}",
            outs[0]
        );
        assert!(
            matches!(
                outs[1],
                Err(Error::CountMismatch {
                    me: Rank(1),
                    peer: Rank(0),
                    ..
                })
            ),
            "{algo:?}: {:?}",
            outs[1]
        );
    }
    // Scan: rank 1 sees rank 0's shorter vector.
    let outs = each_rank(2, |ch, deadline| async move {
        let config = Config::default();
        let ctx = Ctx {
            channel: &*ch,
            tag: Tag::collective(0),
            deadline,
            config: &config,
        };
        let data = vec![1u8; 8 * (1 + ch.rank().idx())];
        scan(&ctx, &data, &Op(Kind::U64Sum)).await
    })
    .await;
    assert!(
        matches!(
            outs[1],
            Err(Error::CountMismatch {
                me: Rank(1),
                peer: Rank(0),
                expected: 2,
                got: 1,
                ..
            })
        ),
        "{:?}",
        outs[1]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bcast_into_a_buffer_of_another_length_is_a_count_mismatch() {
    for force in [BcastAlgorithm::Binomial, BcastAlgorithm::ScatterAllgather] {
        let outs = each_rank(3, |ch, deadline| async move {
            let mut config = Config::default();
            config.force.bcast = Some(force);
            let ctx = Ctx {
                channel: &*ch,
                tag: Tag::collective(0),
                deadline,
                config: &config,
            };
            let mut buf = vec![7u8; if ch.rank() == Rank(2) { 9 } else { 10 }];
            bcast_into(&ctx, Rank(0), &mut buf).await
        })
        .await;
        assert!(
            matches!(
                outs[2],
                Err(Error::CountMismatch {
                    me: Rank(2),
                    peer: Rank(0),
                    expected: 9,
                    got: 10,
                    ..
                })
            ),
            "{force:?}: {:?}",
            outs[2]
        );
        if force == BcastAlgorithm::Binomial {
            assert!(outs[0].is_ok() && outs[1].is_ok(), "{outs:?}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unequal_allgather_contributions_are_count_mismatches() {
    let outs = each_rank(3, |ch, deadline| async move {
        let mut config = Config::default();
        config.force.allgather = Some(AllgatherAlgorithm::Ring);
        let ctx = Ctx {
            channel: &*ch,
            tag: Tag::collective(0),
            deadline,
            config: &config,
        };
        let data = vec![1u8; if ch.rank() == Rank(1) { 5 } else { 4 }];
        allgather(&ctx, &data).await
    })
    .await;
    assert!(
        matches!(
            outs[2],
            Err(Error::CountMismatch {
                me: Rank(2),
                peer: Rank(1),
                expected: 4,
                got: 5,
                ..
            })
        ),
        "{:?}",
        outs[2]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_arguments_are_rejected() {
    let outs = each_rank(2, |ch, deadline| async move {
        let config = Config::default();
        let ctx = Ctx {
            channel: &*ch,
            tag: Tag::collective(0),
            deadline,
            config: &config,
        };
        let op = Op(Kind::U64Sum);
        vec![
            reduce_scatter_block(&ctx, &[0; 8], &op).await.map(drop),
            allreduce(&ctx, &[0; 7], &op).await.map(drop),
            bcast(&ctx, Rank(2), Some(&[1])).await.map(drop),
            bcast(&ctx, ch.rank(), None).await.map(drop),
            alltoallv(&ctx, &[&[1]]).await.map(drop),
            scatterv(&ctx, ch.rank(), Some(&[&[1]])).await.map(drop),
            reduce(&ctx, Rank(9), &[0; 8], &op).await.map(drop),
        ]
    })
    .await;
    for (r, results) in outs.iter().enumerate() {
        for (i, res) in results.iter().enumerate() {
            assert!(
                matches!(
                    res,
                    Err(Error::InvalidArgument { .. }) | Err(Error::InvalidRank { .. })
                ),
                "rank {r}, check {i}: {res:?}"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Native collectives.
// ---------------------------------------------------------------------------------------------

/// A memory channel that claims a native barrier and broadcast, to check that the collectives
/// use them when offered and fall back when declined.
#[derive(Debug)]
struct Native {
    inner: MemoryChannel,
    accept: bool,
    calls: AtomicUsize,
}

impl Channel for Native {
    fn name(&self) -> &'static str {
        "native-test"
    }
    fn job(&self) -> &JobId {
        self.inner.job()
    }
    fn rank(&self) -> Rank {
        self.inner.rank()
    }
    fn size(&self) -> u32 {
        self.inner.size()
    }
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
    fn send<'a>(
        &'a self,
        dst: Rank,
        tag: Tag,
        data: &'a [u8],
        deadline: Instant,
    ) -> BoxFuture<'a, Result<()>> {
        self.inner.send(dst, tag, data, deadline)
    }
    fn recv(&self, src: Rank, tag: Tag, deadline: Instant) -> BoxFuture<'_, Result<Vec<u8>>> {
        self.inner.recv(src, tag, deadline)
    }
    fn native_collectives(&self) -> Option<&dyn NativeCollectives> {
        Some(self)
    }
}

impl NativeCollectives for Native {
    fn bcast<'a>(
        &'a self,
        _root: Rank,
        _tag: Tag,
        _data: Option<&'a [u8]>,
        _deadline: Instant,
    ) -> Option<BoxFuture<'a, Result<Vec<u8>>>> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.accept
            .then(|| Box::pin(async { Ok(b"native".to_vec()) }) as BoxFuture<'a, _>)
    }
    fn barrier(&self, _tag: Tag, _deadline: Instant) -> Option<BoxFuture<'_, Result<()>>> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.accept
            .then(|| Box::pin(async { Ok(()) }) as BoxFuture<'_, _>)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn native_collectives_are_used_when_offered() {
    for accept in [true, false] {
        let chans: Vec<Arc<Native>> = world(JobId::new("t").unwrap(), 3)
            .into_iter()
            .map(|inner| {
                Arc::new(Native {
                    inner,
                    accept,
                    calls: AtomicUsize::new(0),
                })
            })
            .collect();
        let tasks: Vec<_> = chans
            .iter()
            .map(|ch| {
                let ch = Arc::clone(ch);
                tokio::spawn(async move {
                    let config = Config::default();
                    let ctx = |seq| Ctx {
                        channel: &*ch,
                        tag: Tag::collective(seq),
                        deadline: Instant::now() + DEADLINE,
                        config: &config,
                    };
                    let me = ch.rank();
                    barrier(&ctx(0)).await?;
                    let a = bcast(&ctx(1), Rank(1), (me == Rank(1)).then_some(b"root!!")).await?;
                    let mut b = *b"......";
                    if me == Rank(1) {
                        b = *b"root!!";
                    }
                    bcast_into(&ctx(2), Rank(1), &mut b).await?;
                    Ok::<_, Error>((a, b.to_vec()))
                })
            })
            .collect();
        for t in tasks {
            let (a, b) = t.await.unwrap().unwrap();
            let want: &[u8] = if accept { b"native" } else { b"root!!" };
            assert_eq!(a, want);
            // At the root, bcast_into leaves the buffer alone.
            assert!(b == want || b == b"root!!", "{b:?}");
        }
        for ch in &chans {
            assert_eq!(ch.calls.load(Ordering::SeqCst), 3);
            assert_eq!(ch.inner.inbox().pending_keys(), 0);
        }
    }
}
