//! Property tests of reductions: random world sizes, vectors and ops against a sequential fold.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

mod common;

use common::{run, Mat2};
use fmi::{AllreduceAlgorithm, Config, Op, UserOp};
use proptest::prelude::*;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

fn algo(i: u8) -> Config {
    let mut c = Config::default();
    c.collectives.force.allreduce = match i % 4 {
        0 => None,
        1 => Some(AllreduceAlgorithm::RecursiveDoubling),
        2 => Some(AllreduceAlgorithm::Rabenseifner),
        _ => Some(AllreduceAlgorithm::Ring),
    };
    c
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn allreduce_and_scan_match_sequential_fold(
        n in 1u32..=9,
        len in 0usize..300,
        seed in any::<u64>(),
        a in any::<u8>(),
        op_i in 0usize..4,
    ) {
        let op = [Op::Sum, Op::Min, Op::Max, Op::BXor][op_i];
        let data = move |r: u32| -> Vec<i64> {
            (0..len)
                .map(|i| (seed.wrapping_mul(r as u64 + 1).wrapping_add(i as u64 * 7919)) as i64)
                .collect()
        };
        let out = rt().block_on(run(n, algo(a), move |c| async move {
            let mine = data(c.rank().0);
            let all = c.allreduce(&mine, op).await.expect("allreduce");
            let scan = c.scan(&mine, op).await.expect("scan");
            (all, scan)
        }));
        let fold = |upto: u32| {
            let mut acc = data(0);
            for r in 1..upto {
                <i64 as fmi::Numeric>::reduce_slices(op, &data(r), &mut acc, false);
            }
            acc
        };
        for (r, (all, scan)) in out.into_iter().enumerate() {
            prop_assert_eq!(&all, &fold(n));
            prop_assert_eq!(&scan, &fold(r as u32 + 1));
        }
    }

    #[test]
    fn non_commutative_allreduce_keeps_rank_order(
        n in 1u32..=9,
        len in 0usize..40,
        a in any::<u8>(),
    ) {
        let out = rt().block_on(run(n, algo(a), move |c| async move {
            let mine: Vec<Mat2> = (0..len).map(|i| Mat2::for_rank(c.rank().0, i)).collect();
            c.allreduce(&mine, UserOp::non_commutative(|x: &Mat2, y: &Mat2| x.mul(y)))
                .await
                .expect("allreduce")
        }));
        let expect: Vec<Mat2> = (0..len)
            .map(|i| (1..n).fold(Mat2::for_rank(0, i), |acc, r| acc.mul(&Mat2::for_rank(r, i))))
            .collect();
        for got in out {
            prop_assert_eq!(&got, &expect);
        }
    }
}
