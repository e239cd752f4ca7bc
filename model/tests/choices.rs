//! The model's choices: storage crossovers, size and objective dependence, determinism.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use fmi_model::explain::{explain, LADDER};
use fmi_model::{
    choose, config_hash, estimate, Algorithm, Bytes, ChannelKind, Dollars, JobConfig, Ledger,
    Model, ModelConfig, Objective, Op,
};

use ChannelKind::{DynamoDb, Redis, Tcp, S3};

fn pick(
    cfg: &ModelConfig,
    op: Op,
    n: u64,
    p: u32,
    o: Objective,
    chs: &[ChannelKind],
) -> ChannelKind {
    choose(cfg, op, Bytes(n), p, o, chs).unwrap().channel
}

/// The smallest message size at which `cheap` prefers S3 to DynamoDB (bisection; the test
/// below checks there is exactly one switch).
fn crossover(cfg: &ModelConfig, op: Op, p: u32) -> u64 {
    let (mut lo, mut hi) = (0u64, 1u64 << 26);
    if pick(cfg, op, lo, p, Objective::Cheap, &[S3, DynamoDb]) == S3 {
        return 0;
    }
    assert_eq!(pick(cfg, op, hi, p, Objective::Cheap, &[S3, DynamoDb]), S3);
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if pick(cfg, op, mid, p, Objective::Cheap, &[S3, DynamoDb]) == S3 {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    hi
}

/// REQUIREMENT: with only S3 and DynamoDB and `cheap`, small messages go to DynamoDB and large
/// ones to S3, as list prices imply. A DynamoDB message of k KB costs 2k write units (PutItem,
/// and the DeleteItem that reads it) at $0.625/M, an S3 message one PUT ($5/M) and one GET
/// ($0.4/M) plus polls: they meet near 4 KB (4004 B with the defaults; 8 KB if only the PUT
/// side is counted).
#[test]
fn cheap_small_to_dynamodb_large_to_s3() {
    let cfg = ModelConfig::default();
    let chs = [S3, DynamoDb];
    for n in [0, 8, 64, 512, 1024, 2048] {
        assert_eq!(
            pick(&cfg, Op::Send, n, 2, Objective::Cheap, &chs),
            DynamoDb,
            "{n} B"
        );
    }
    for n in [16 << 10, 64 << 10, 1 << 20, 16 << 20, 64 << 20] {
        assert_eq!(
            pick(&cfg, Op::Send, n, 2, Objective::Cheap, &chs),
            S3,
            "{n} B"
        );
    }
    let x = crossover(&cfg, Op::Send, 2);
    assert!((2 << 10..=16 << 10).contains(&x), "crossover at {x} B");
    eprintln!("cheap crossover, send between 2 ranks: {x} B");
    // Exactly one switch on a fine sweep.
    let mut switches = 0;
    let mut last = DynamoDb;
    for k in 0..2000u64 {
        let c = pick(&cfg, Op::Send, k * 64, 2, Objective::Cheap, &chs);
        if c != last {
            switches += 1;
            last = c;
        }
    }
    assert_eq!(switches, 1);
    // The same holds for every collective at 8 ranks on the explain ladder.
    let rows = explain(&cfg, 8, Objective::Cheap, &chs, &Op::ALL, &LADDER).unwrap();
    for r in rows {
        if r.bytes <= Bytes(512) {
            assert_eq!(r.choice.channel, DynamoDb, "{} {}", r.op, r.bytes);
        }
        if r.bytes >= Bytes(256 << 10) {
            assert_eq!(r.choice.channel, S3, "{} {}", r.op, r.bytes);
        }
    }
}

/// Cheaper S3 requests move the crossover down; dearer DynamoDB writes too, as the model says.
#[test]
fn crossover_follows_prices() {
    let base = crossover(&ModelConfig::default(), Op::Send, 2);
    let express = ModelConfig::from_toml("[s3]\npreset = \"express\"").unwrap();
    // S3 Express requests are so cheap that it wins from the first byte.
    let e = crossover(&express, Op::Send, 2);
    assert!(e < base, "express {e} vs standard {base}");
    let dear = ModelConfig::from_toml("[dynamodb]\nwrite_unit_usd_per_1m = 1.25").unwrap();
    assert!(crossover(&dear, Op::Send, 2) < base);
}

#[test]
fn choices_change_with_size() {
    let cfg = ModelConfig::default();
    let fast = |op, n| {
        choose(&cfg, op, Bytes(n), 8, Objective::Fast, &[Tcp])
            .unwrap()
            .algorithm
    };
    assert_eq!(fast(Op::Allreduce, 8), Algorithm::RecursiveDoubling);
    assert!(matches!(
        fast(Op::Allreduce, 64 << 20),
        Algorithm::Ring | Algorithm::Rabenseifner
    ));
    assert_eq!(fast(Op::Bcast, 8), Algorithm::Binomial);
    assert_eq!(fast(Op::Bcast, 64 << 20), Algorithm::ScatterAllgather);
    assert_eq!(fast(Op::Allgather, 8), Algorithm::RecursiveDoubling);
    // With every channel, TCP is fastest at every size, and Redis beats the polling channels.
    for n in [8, 1 << 20, 64 << 20] {
        assert_eq!(
            pick(
                &cfg,
                Op::Allreduce,
                n,
                8,
                Objective::Fast,
                &ChannelKind::ALL
            ),
            Tcp
        );
        assert_eq!(
            pick(
                &cfg,
                Op::Allreduce,
                n,
                8,
                Objective::Fast,
                &[Redis, S3, DynamoDb]
            ),
            Redis
        );
    }
    // DynamoDB's 350 KB items make it slow for large messages: fast picks it small, S3 large.
    assert_eq!(
        pick(&cfg, Op::Send, 8, 2, Objective::Fast, &[S3, DynamoDb]),
        DynamoDb
    );
    assert_eq!(
        pick(
            &cfg,
            Op::Send,
            64 << 20,
            2,
            Objective::Fast,
            &[S3, DynamoDb]
        ),
        S3
    );
}

#[test]
fn choices_change_with_objective() {
    // A Redis server at $20/h: fastest, but its amortised hour costs more than a few DynamoDB
    // write units for a small message.
    let cfg = ModelConfig::from_toml("[redis]\ninstance_usd_per_hour = 20").unwrap();
    let chs = [Redis, DynamoDb];
    assert_eq!(pick(&cfg, Op::Send, 8, 2, Objective::Fast, &chs), Redis);
    assert_eq!(pick(&cfg, Op::Send, 8, 2, Objective::Cheap, &chs), DynamoDb);
    let w = |usd_per_second| Objective::Weighted { usd_per_second };
    assert_eq!(pick(&cfg, Op::Send, 8, 2, w(0.0), &chs), DynamoDb);
    assert_eq!(pick(&cfg, Op::Send, 8, 2, w(1.0), &chs), Redis);
    // Raising the weight switches once, from cheap to fast.
    let mut switches = 0;
    let mut last = DynamoDb;
    for k in 0..200 {
        let c = pick(&cfg, Op::Send, 8, 2, w(k as f64 * 1e-4), &chs);
        if c != last {
            switches += 1;
            last = c;
        }
    }
    assert_eq!((switches, last), (1, Redis));
    // A communicator's default objective, overridden per call.
    let m = Model::new(
        ModelConfig::from_toml("objective = \"cheap\"\n[redis]\ninstance_usd_per_hour = 20")
            .unwrap(),
        &chs,
    )
    .unwrap();
    assert_eq!(m.choose(Op::Send, Bytes(8), 2).unwrap().channel, DynamoDb);
    assert_eq!(
        m.choose_with(Op::Send, Bytes(8), 2, Objective::Fast)
            .unwrap()
            .channel,
        Redis
    );
}

#[test]
fn identical_inputs_identical_choices() {
    let text = "objective = 0.0001\n[s3]\npoll_initial_ms = 50\n";
    let a = ModelConfig::from_toml(text).unwrap();
    let b = ModelConfig::from_toml(text).unwrap();
    assert_eq!(a, b);
    for op in Op::ALL {
        for n in [0u64, 8, 4096, 1 << 20, 64 << 20] {
            for p in [1u32, 2, 3, 8, 33] {
                let x = choose(
                    &a,
                    op,
                    Bytes(n),
                    p,
                    a.objective,
                    &[S3, DynamoDb, Redis, Tcp],
                )
                .unwrap();
                let y = choose(
                    &b,
                    op,
                    Bytes(n),
                    p,
                    b.objective,
                    &[Tcp, Redis, DynamoDb, S3, S3],
                )
                .unwrap();
                assert_eq!(x, y);
                assert_eq!(x.seconds.0.to_bits(), y.seconds.0.to_bits());
            }
        }
    }
    assert_eq!(
        config_hash(&a, &ChannelKind::ALL, a.objective),
        config_hash(&b, &[S3, Tcp, DynamoDb, Redis], b.objective)
    );
}

/// Ties are broken by the fixed order: one rank, where everything costs nothing.
#[test]
fn ties_break_by_fixed_order() {
    let cfg = ModelConfig::default();
    let c = choose(
        &cfg,
        Op::Allreduce,
        Bytes(8),
        1,
        Objective::Fast,
        &[DynamoDb, S3],
    )
    .unwrap();
    assert_eq!((c.channel, c.algorithm), (S3, Algorithm::RecursiveDoubling));
    assert_eq!(c.dollars, Dollars::ZERO);
    let r = c.runner_up.unwrap();
    assert_eq!(
        (r.channel, r.algorithm),
        (DynamoDb, Algorithm::RecursiveDoubling)
    );
}

/// The hash is a fixed function of the values: this constant must hold in every process and
/// on every platform. (Change it only together with the encoding version in hash.rs.)
#[test]
fn hash_is_stable_across_processes() {
    let h = config_hash(&ModelConfig::default(), &ChannelKind::ALL, Objective::Fast);
    assert_eq!(h, GOLDEN, "got {h:#018x}");
}

// Changed with the Redis default chunk (8 MiB → 512 KiB), an input of the hash.
const GOLDEN: u64 = 0x89e1_6efd_6a32_89cf;

#[test]
fn errors() {
    let cfg = ModelConfig::default();
    assert!(choose(&cfg, Op::Send, Bytes(8), 2, Objective::Fast, &[]).is_err());
    assert!(choose(&cfg, Op::Send, Bytes(8), 0, Objective::Fast, &[Tcp]).is_err());
    let bad = Objective::Weighted {
        usd_per_second: f64::NAN,
    };
    assert!(choose(&cfg, Op::Send, Bytes(8), 2, bad, &[Tcp]).is_err());
    assert!(Model::new(cfg, &[]).is_err());
}

/// A measured run priced by the ledger costs what the model predicted when the counters match.
#[test]
fn ledger_prices_like_the_prediction() {
    let cfg = ModelConfig::default();
    for (ch, n) in [(S3, 100u64), (DynamoDb, 1_000_000), (S3, 64 << 20)] {
        let e = estimate(&cfg, ch, Op::Send, Algorithm::PointToPoint, Bytes(n), 2).unwrap();
        let mut l = Ledger::new();
        l.record(ch, e.requests.pairs());
        let r = l.report(&cfg, None);
        assert_eq!(r.lines[0].request_dollars, e.request_dollars);
        assert_eq!(r.total, e.request_dollars);
    }
}

#[test]
fn job_file_drives_the_channels() {
    let j = JobConfig::from_toml(
        "[channels.s3]\nbucket = \"b\"\n[channels.dynamodb]\ntable = \"t\"\n[model]\nobjective = \"cheap\"",
    )
    .unwrap();
    let chs = j.channels(false);
    assert_eq!(chs, vec![S3, DynamoDb]);
    assert_eq!(
        pick(&j.model, Op::Send, 8, 2, j.model.objective, &chs),
        DynamoDb
    );
    assert_eq!(
        pick(&j.model, Op::Send, 1 << 20, 2, j.model.objective, &chs),
        S3
    );
}
