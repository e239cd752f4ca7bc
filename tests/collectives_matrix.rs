//! The typed collectives matrix: every collective × world sizes 1..=9 × datatypes × element
//! counts 0 / 1 / odd / large × algorithm choices, checked against a sequential reference, on the
//! in-memory channel. (The byte-level matrix of each algorithm lives in `collectives/tests`.)
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

mod common;

use std::fmt::Debug;

use common::run;
use fmi::{AllgatherAlgorithm, AllreduceAlgorithm, BcastAlgorithm, Config, Numeric, Op};

trait Small: Numeric + Debug {
    fn small(v: u8) -> Self;
}

macro_rules! small {
    ($($t:ty),*) => {$(impl Small for $t { fn small(v: u8) -> Self { v as $t } })*};
}
small!(u8, u16, u32, u64, i8, i16, i32, i64, f32, f64);

/// Rank r's contribution: small values so that sums and products stay exact in every type.
fn input<T: Small>(rank: u32, count: usize, salt: usize) -> Vec<T> {
    (0..count)
        .map(|i| T::small(((rank as usize * 5 + i * 3 + salt) % 4) as u8))
        .collect()
}

fn fold<T: Small>(op: Op, parts: &[Vec<T>]) -> Vec<T> {
    let mut acc = parts[0].clone();
    for p in &parts[1..] {
        T::reduce_slices(op, p, &mut acc, false);
    }
    acc
}

#[derive(Debug, PartialEq)]
struct Results<T> {
    bcast: Vec<T>,
    bcast_into: Vec<T>,
    gather: Option<Vec<T>>,
    gatherv: Option<Vec<Vec<T>>>,
    scatter: Vec<T>,
    scatterv: Vec<T>,
    allgather: Vec<T>,
    allgatherv: Vec<Vec<T>>,
    alltoall: Vec<T>,
    alltoallv: Vec<Vec<T>>,
    reduce: Option<Vec<T>>,
    allreduce: Vec<T>,
    reduce_scatter: Vec<T>,
    scan: Vec<T>,
    exscan: Option<Vec<T>>,
}

async fn check<T: Small>(n: u32, config: Config, count: usize, op: Op) {
    let root = n / 2;
    let out = run(n, config, move |c| async move {
        let me = c.rank().0;
        let p = c.size() as usize;
        let mine: Vec<T> = input(me, count, 0);
        c.barrier().await.expect("barrier");
        let bcast = c
            .bcast(root, if me == root { &mine[..] } else { &[] })
            .await
            .expect("bcast");
        let mut bcast_into = if me == root {
            mine.clone()
        } else {
            vec![T::small(0); count]
        };
        c.bcast_into(root, &mut bcast_into)
            .await
            .expect("bcast_into");
        let gather = c.gather(root, &mine).await.expect("gather");
        let varied: Vec<T> = input(me, count + me as usize, 1);
        let gatherv = c.gatherv(root, &varied).await.expect("gatherv");
        let all: Vec<T> = input(root, count * p, 2);
        let scatter = c
            .scatter(root, if me == root { &all[..] } else { &[] })
            .await
            .expect("scatter");
        let counts: Vec<usize> = (0..p).map(|r| (count + r) % 5).collect();
        let vdata: Vec<T> = input(root, counts.iter().sum(), 3);
        let scatterv = c
            .scatterv(root, if me == root { &vdata[..] } else { &[] }, &counts)
            .await
            .expect("scatterv");
        let allgather = c.allgather(&mine).await.expect("allgather");
        let allgatherv = c.allgatherv(&varied).await.expect("allgatherv");
        let a2a: Vec<T> = input(me, count * p, 4);
        let alltoall = c.alltoall(&a2a).await.expect("alltoall");
        let a2av_counts: Vec<usize> = (0..p).map(|d| (me as usize + d + count) % 4).collect();
        let a2av: Vec<T> = input(me, a2av_counts.iter().sum(), 5);
        let alltoallv = c.alltoallv(&a2av, &a2av_counts).await.expect("alltoallv");
        let reduce = c.reduce(root, &mine, op).await.expect("reduce");
        let allreduce = c.allreduce(&mine, op).await.expect("allreduce");
        let rs_in: Vec<T> = input(me, count * p, 6);
        let reduce_scatter = c.reduce_scatter(&rs_in, op).await.expect("reduce_scatter");
        let scan = c.scan(&mine, op).await.expect("scan");
        let exscan = c.exscan(&mine, op).await.expect("exscan");
        assert_eq!(mine, input::<T>(me, count, 0), "input modified");
        Results {
            bcast,
            bcast_into,
            gather,
            gatherv,
            scatter,
            scatterv,
            allgather,
            allgatherv,
            alltoall,
            alltoallv,
            reduce,
            allreduce,
            reduce_scatter,
            scan,
            exscan,
        }
    })
    .await;

    // Sequential reference.
    let p = n as usize;
    let inputs: Vec<Vec<T>> = (0..n).map(|r| input(r, count, 0)).collect();
    let varied: Vec<Vec<T>> = (0..n).map(|r| input(r, count + r as usize, 1)).collect();
    let all: Vec<T> = input(root, count * p, 2);
    let counts: Vec<usize> = (0..p).map(|r| (count + r) % 5).collect();
    let vdata: Vec<T> = input(root, counts.iter().sum(), 3);
    let total = fold(op, &inputs);
    let ctx = format!("n={n} count={count} op={op:?} type={}", T::NAME);
    for (r, got) in out.iter().enumerate() {
        let ru = r as u32;
        assert_eq!(got.bcast, inputs[root as usize], "{ctx} bcast at {r}");
        assert_eq!(
            got.bcast_into, inputs[root as usize],
            "{ctx} bcast_into at {r}"
        );
        let is_root = ru == root;
        assert_eq!(
            got.gather,
            is_root.then(|| inputs.concat()),
            "{ctx} gather at {r}"
        );
        assert_eq!(
            got.gatherv,
            is_root.then(|| varied.clone()),
            "{ctx} gatherv at {r}"
        );
        assert_eq!(
            got.scatter,
            all[r * count..(r + 1) * count],
            "{ctx} scatter at {r}"
        );
        let off: usize = counts[..r].iter().sum();
        assert_eq!(
            got.scatterv,
            vdata[off..off + counts[r]],
            "{ctx} scatterv at {r}"
        );
        assert_eq!(got.allgather, inputs.concat(), "{ctx} allgather at {r}");
        assert_eq!(got.allgatherv, varied, "{ctx} allgatherv at {r}");
        let expect_a2a: Vec<T> = (0..p)
            .flat_map(|s| input::<T>(s as u32, count * p, 4)[r * count..(r + 1) * count].to_vec())
            .collect();
        assert_eq!(got.alltoall, expect_a2a, "{ctx} alltoall at {r}");
        let expect_a2av: Vec<Vec<T>> = (0..p)
            .map(|s| {
                let c: Vec<usize> = (0..p).map(|d| (s + d + count) % 4).collect();
                let data = input::<T>(s as u32, c.iter().sum(), 5);
                let off: usize = c[..r].iter().sum();
                data[off..off + c[r]].to_vec()
            })
            .collect();
        assert_eq!(got.alltoallv, expect_a2av, "{ctx} alltoallv at {r}");
        assert_eq!(
            got.reduce,
            is_root.then(|| total.clone()),
            "{ctx} reduce at {r}"
        );
        assert_eq!(got.allreduce, total, "{ctx} allreduce at {r}");
        let rs: Vec<Vec<T>> = (0..n).map(|s| input(s, count * p, 6)).collect();
        let rs_total = fold(op, &rs);
        assert_eq!(
            got.reduce_scatter,
            rs_total[r * count..(r + 1) * count],
            "{ctx} reduce_scatter at {r}"
        );
        assert_eq!(got.scan, fold(op, &inputs[..=r]), "{ctx} scan at {r}");
        assert_eq!(
            got.exscan,
            (r > 0).then(|| fold(op, &inputs[..r])),
            "{ctx} exscan at {r}"
        );
    }
}

fn configs() -> Vec<(&'static str, Config)> {
    let mut out = vec![("auto", Config::default())];
    let forced = [
        (
            "rd/binomial/rd",
            AllreduceAlgorithm::RecursiveDoubling,
            BcastAlgorithm::Binomial,
            AllgatherAlgorithm::RecursiveDoubling,
        ),
        (
            "rabenseifner/scatter-allgather/ring",
            AllreduceAlgorithm::Rabenseifner,
            BcastAlgorithm::ScatterAllgather,
            AllgatherAlgorithm::Ring,
        ),
        (
            "ring/scatter-allgather/rd",
            AllreduceAlgorithm::Ring,
            BcastAlgorithm::ScatterAllgather,
            AllgatherAlgorithm::RecursiveDoubling,
        ),
    ];
    for (name, ar, bc, ag) in forced {
        let mut c = Config::default();
        c.collectives.force.allreduce = Some(ar);
        c.collectives.force.bcast = Some(bc);
        c.collectives.force.allgather = Some(ag);
        out.push((name, c));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_collective_every_size_every_algorithm() {
    for n in 1..=9 {
        for (_, config) in configs() {
            for count in [0, 1, 7, 3000] {
                check::<u64>(n, config.clone(), count, Op::Sum).await;
                check::<f64>(n, config.clone(), count, Op::Sum).await;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_datatype_and_builtin_op() {
    for n in [1, 3, 4, 6] {
        for count in [0, 1, 7, 100] {
            for op in Op::ALL {
                check::<u8>(n, Config::default(), count, op).await;
                check::<i16>(n, Config::default(), count, op).await;
                check::<u32>(n, Config::default(), count, op).await;
                check::<i64>(n, Config::default(), count, op).await;
            }
            for op in [Op::Sum, Op::Prod, Op::Min, Op::Max] {
                check::<u16>(n, Config::default(), count, op).await;
                check::<i8>(n, Config::default(), count, op).await;
                check::<i32>(n, Config::default(), count, op).await;
                check::<u64>(n, Config::default(), count, op).await;
                check::<f32>(n, Config::default(), count, op).await;
                check::<f64>(n, Config::default(), count, op).await;
            }
        }
    }
}
