//! Property tests: determinism, monotonicity in bytes, sane numbers.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use fmi_model::{choose, estimate, Bytes, ChannelKind, ModelConfig, Objective, Op};
use proptest::prelude::*;

fn op() -> impl Strategy<Value = Op> {
    (0..Op::ALL.len()).prop_map(|i| Op::ALL[i])
}

fn channels() -> impl Strategy<Value = Vec<ChannelKind>> {
    // A non-empty subset, in a shuffled order, possibly with a duplicate.
    (1u8..16, any::<bool>())
        .prop_map(|(mask, dup)| {
            let mut v: Vec<ChannelKind> = ChannelKind::ALL
                .into_iter()
                .enumerate()
                .filter(|(i, _)| mask & (1 << i) != 0)
                .map(|(_, c)| c)
                .collect();
            if dup {
                v.push(v[0]);
            }
            v
        })
        .prop_shuffle()
}

fn objective() -> impl Strategy<Value = Objective> {
    prop_oneof![
        Just(Objective::Fast),
        Just(Objective::Cheap),
        (0.0f64..10.0).prop_map(|w| Objective::Weighted { usd_per_second: w }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn same_inputs_same_choice(
        op in op(),
        n in 0u64..(1 << 27),
        p in 1u32..80,
        o in objective(),
        chs in channels(),
    ) {
        let cfg = ModelConfig::default();
        let a = choose(&cfg, op, Bytes(n), p, o, &chs).unwrap();
        let mut rev = chs.clone();
        rev.reverse();
        let b = choose(&cfg.clone(), op, Bytes(n), p, o, &rev).unwrap();
        prop_assert_eq!(a, b);
        prop_assert!(chs.contains(&a.channel));
    }

    #[test]
    fn estimates_are_finite_and_monotone_in_bytes(
        op in op(),
        n in 0u64..(1 << 27),
        extra in 0u64..(1 << 24),
        p in 1u32..80,
    ) {
        let cfg = ModelConfig::default();
        for ch in ChannelKind::ALL {
            for &alg in op.algorithms() {
                let Some(a) = estimate(&cfg, ch, op, alg, Bytes(n), p) else { continue };
                // Only the staged broadcast has a size limit (one S3 object, no multipart).
                let Some(b) = estimate(&cfg, ch, op, alg, Bytes(n + extra), p) else {
                    prop_assert!(alg.signal().is_some(), "{} {} {} stopped applying", ch, op, alg);
                    continue;
                };
                prop_assert!(a.seconds.0.is_finite() && a.seconds.0 >= 0.0);
                prop_assert!(a.dollars.0.is_finite() && a.dollars.0 >= 0.0);
                prop_assert!(b.seconds >= a.seconds, "{} {} {}: {:?} > {:?}", ch, op, alg, a, b);
                prop_assert!(b.dollars >= a.dollars, "{} {} {}: {:?} > {:?}", ch, op, alg, a, b);
                prop_assert!(b.requests.puts >= a.requests.puts);
            }
        }
    }

    #[test]
    fn best_time_and_best_price_grow_with_bytes(
        op in op(),
        n in 0u64..(1 << 27),
        extra in 0u64..(1 << 24),
        p in 1u32..80,
        chs in channels(),
    ) {
        let cfg = ModelConfig::default();
        let f = |n| choose(&cfg, op, Bytes(n), p, Objective::Fast, &chs).unwrap();
        let c = |n| choose(&cfg, op, Bytes(n), p, Objective::Cheap, &chs).unwrap();
        prop_assert!(f(n + extra).seconds >= f(n).seconds);
        prop_assert!(c(n + extra).dollars >= c(n).dollars);
    }

    #[test]
    fn the_choice_is_the_best_under_its_objective(
        op in op(),
        n in 0u64..(1 << 27),
        p in 1u32..80,
        o in objective(),
        chs in channels(),
    ) {
        let cfg = ModelConfig::default();
        let best = choose(&cfg, op, Bytes(n), p, o, &chs).unwrap();
        let score = |s: f64, d: f64| match o {
            Objective::Fast => s,
            Objective::Cheap => d,
            Objective::Weighted { usd_per_second } => d + usd_per_second * s,
        };
        let mine = score(best.seconds.0, best.dollars.0);
        for e in fmi_model::estimates(&cfg, op, Bytes(n), p, &chs).unwrap() {
            prop_assert!(mine <= score(e.seconds.0, e.dollars.0));
        }
        if let Some(r) = best.runner_up {
            prop_assert!(mine <= score(r.seconds.0, r.dollars.0));
        }
    }
}
