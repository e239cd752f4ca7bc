//! Runs every operation of fmi with deterministic per-rank inputs and checks each result against
//! a sequential reference computed locally: a multi-process self-test for `fmi run`.
//!
//! ```sh
//! cargo build --release --workspace --examples
//! target/release/fmi run -n 5 -- target/release/examples/collectives_check
//! ```
//! prints `rank R/N: all collectives ok` once per rank; otherwise a rank prints
//! `collectives_check: rank R/N: COLLECTIVE failed: DETAIL` on stderr and exits 1.
//!
//! Other modes, used by the launcher's tests (`cli/tests/run.rs`):
//!
//! | arguments | what each rank does |
//! |---|---|
//! | `--die-at I [--die-rank K]` | allreduce in a loop; rank K (default: the last) exits abruptly with code 9 at iteration I, the others report the error that ends their loop and exit 1 |
//! | `--hang-secs S [--fail-rank K [--code C]]` | after a barrier prints `ready`; rank K exits with code C (default 3); every other rank waits up to S seconds in a receive nobody answers |
//! | `--spam L` | writes L lines of up to 100 kB (one of them not UTF-8) to stdout and to stderr in pieces, then a last line without a newline; needs no communicator |

use std::fmt::Debug;
use std::io::Write;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use fmi::blocking::Communicator;
use fmi::{Op, UserOp};
use serde::{Deserialize, Serialize};

/// Upper bound of the `--die-at` loop, in iterations and in time.
const LOOP_MAX_ITERS: u64 = 1_000_000;
const LOOP_MAX_TIME: Duration = Duration::from_secs(120);

/// Elements of the large allreduce: far above the 2048 B recursive-doubling limit, so the
/// large-message algorithm (Rabenseifner by default) runs.
const LARGE: usize = 100_000;

/// A collective whose result was wrong or that returned an error.
struct Failure {
    what: String,
    detail: String,
}

type Check<T = ()> = Result<T, Failure>;

fn fail(what: &str, detail: impl Into<String>) -> Failure {
    Failure {
        what: what.to_owned(),
        detail: detail.into(),
    }
}

/// The result of an fmi call, or a failure naming `what`.
fn call<T>(what: &str, r: fmi::Result<T>) -> Check<T> {
    r.map_err(|e| fail(what, e.to_string()))
}

/// Compares without printing whole vectors: reports the length or the first differing element.
fn same<T: PartialEq + Debug>(what: &str, got: &[T], want: &[T]) -> Check {
    if got.len() != want.len() {
        return Err(fail(
            what,
            format!("got {} elements, expected {}", got.len(), want.len()),
        ));
    }
    match got.iter().zip(want).position(|(g, w)| g != w) {
        Some(i) => Err(fail(
            what,
            format!("element {i}: got {:?}, expected {:?}", got[i], want[i]),
        )),
        None => Ok(()),
    }
}

fn same_parts<T: PartialEq + Debug>(what: &str, got: &[Vec<T>], want: &[Vec<T>]) -> Check {
    if got.len() != want.len() {
        return Err(fail(
            what,
            format!("got {} parts, expected {}", got.len(), want.len()),
        ));
    }
    for (r, (g, w)) in got.iter().zip(want).enumerate() {
        same(&format!("{what} (part of rank {r})"), g, w)?;
    }
    Ok(())
}

/// `Some` at `root`, `None` elsewhere, as the rooted collectives promise.
fn at_root<T>(what: &str, me: u32, root: u32, got: Option<T>) -> Check<Option<T>> {
    match (me == root, got) {
        (true, Some(v)) => Ok(Some(v)),
        (false, None) => Ok(None),
        (true, None) => Err(fail(what, format!("root {root} got no result"))),
        (false, Some(_)) => Err(fail(
            what,
            format!("rank {me} got a result though the root is {root}"),
        )),
    }
}

// ------------------------------------------------------------------ deterministic inputs

fn mix(r: u32, i: usize, salt: u64) -> u64 {
    let mut x = (u64::from(r) + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ (i as u64 + 1).wrapping_mul(0xD1B5_4A32_D192_ED03)
        ^ salt.wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^= x >> 31;
    x = x.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x ^ (x >> 29)
}

/// Signed values in ±2^43: sums over any number of ranks here stay exact.
fn i64s(r: u32, len: usize, salt: u64) -> Vec<i64> {
    (0..len)
        .map(|i| (mix(r, i, salt) >> 20) as i64 - (1 << 43))
        .collect()
}

fn u64s(r: u32, len: usize, salt: u64) -> Vec<u64> {
    (0..len).map(|i| mix(r, i, salt)).collect()
}

fn u32s(r: u32, len: usize, salt: u64) -> Vec<u32> {
    (0..len).map(|i| (mix(r, i, salt) >> 32) as u32).collect()
}

fn i32s(r: u32, len: usize, salt: u64) -> Vec<i32> {
    (0..len).map(|i| (mix(r, i, salt) >> 32) as i32).collect()
}

/// Whole numbers below 2^31 in magnitude, so that f64 sums are exact in any order.
fn f64s(r: u32, len: usize, salt: u64) -> Vec<f64> {
    (0..len)
        .map(|i| ((mix(r, i, salt) >> 33) as i64 - (1 << 30)) as f64)
        .collect()
}

/// An affine map x ↦ a·x + b over u64 (wrapping), `[a, b]` with `a` odd.
type Affine = [u64; 2];

fn affines(r: u32, len: usize, salt: u64) -> Vec<Affine> {
    (0..len)
        .map(|i| [mix(r, i, salt) | 1, mix(r, i, salt ^ 0xFF)])
        .collect()
}

/// Applies `l` then `r`: associative, not commutative.
fn then(l: &Affine, r: &Affine) -> Affine {
    [
        r[0].wrapping_mul(l[0]),
        r[0].wrapping_mul(l[1]).wrapping_add(r[1]),
    ]
}

/// `x(first) op … op x(last-1)` element-wise, in rank order.
fn fold<T: Copy>(
    ranks: std::ops::Range<u32>,
    input: impl Fn(u32) -> Vec<T>,
    op: impl Fn(&T, &T) -> T,
) -> Option<Vec<T>> {
    let mut acc: Option<Vec<T>> = None;
    for s in ranks {
        let x = input(s);
        acc = Some(match acc {
            None => x,
            Some(mut a) => {
                for (a, b) in a.iter_mut().zip(&x) {
                    *a = op(a, b);
                }
                a
            }
        });
    }
    acc
}

/// Like [`fold`] over a non-empty range.
fn fold_all<T: Copy>(
    n: u32,
    input: impl Fn(u32) -> Vec<T>,
    op: impl Fn(&T, &T) -> T,
) -> Check<Vec<T>> {
    fold(0..n, input, op).ok_or_else(|| fail("reference", "a job has at least one rank"))
}

fn block<T: Clone>(v: &[T], r: u32, len: usize) -> Vec<T> {
    v[r as usize * len..(r as usize + 1) * len].to_vec()
}

#[derive(Serialize, Deserialize, PartialEq, Debug, Clone)]
struct Record {
    rank: u32,
    name: String,
    items: Vec<u64>,
    note: Option<String>,
}

fn record(r: u32) -> Record {
    Record {
        rank: r,
        name: format!("rank-{r}-é✓"),
        items: u64s(r, r as usize % 4, 77),
        note: r.is_multiple_of(2).then(|| "even".repeat(r as usize + 1)),
    }
}

// ------------------------------------------------------------------ the checks

fn check_bcast(comm: &Communicator, r: u32, n: u32) -> Check {
    for root in 0..n {
        let data = u32s(root, 5, 1);
        let mine: &[u32] = if r == root { &data } else { &[] };
        let got = call("bcast", comm.bcast(root, mine))?;
        same(&format!("bcast (root {root}, 5 elements)"), &got, &data)?;
    }
    // 16 000 B: scatter + allgather once there are 8 ranks, binomial tree below.
    let root = n - 1;
    let data = u32s(root, 4000, 2);
    let mine: &[u32] = if r == root { &data } else { &[] };
    let got = call("bcast (large)", comm.bcast(root, mine))?;
    same("bcast (root n-1, 4000 elements)", &got, &data)?;

    for (root, len) in [(0, 1000), (n / 2, 4000)] {
        let data = u64s(root, len, 3);
        let mut buf = if r == root {
            data.clone()
        } else {
            vec![0u64; len]
        };
        call("bcast_into", comm.bcast_into(root, &mut buf))?;
        same(
            &format!("bcast_into (root {root}, {len} elements)"),
            &buf,
            &data,
        )?;
    }
    Ok(())
}

fn check_gather_scatter(comm: &Communicator, r: u32, n: u32) -> Check {
    let root = n / 2;
    let got = call("gather", comm.gather(root, &i64s(r, 3, 10)))?;
    if let Some(got) = at_root("gather", r, root, got)? {
        let want: Vec<i64> = (0..n).flat_map(|s| i64s(s, 3, 10)).collect();
        same("gather", &got, &want)?;
    }

    let len = |s: u32| (s as usize * 2) % 5;
    let got = call("gatherv", comm.gatherv(0, &u32s(r, len(r), 11)))?;
    if let Some(got) = at_root("gatherv", r, 0, got)? {
        let want: Vec<Vec<u32>> = (0..n).map(|s| u32s(s, len(s), 11)).collect();
        same_parts("gatherv", &got, &want)?;
    }

    let data: Vec<u32> = (0..n).flat_map(|s| u32s(s, 4, 12)).collect();
    let mine: &[u32] = if r == 0 { &data } else { &[] };
    let got = call("scatter", comm.scatter(0, mine))?;
    same("scatter", &got, &u32s(r, 4, 12))?;

    let root = n - 1;
    let counts: Vec<usize> = (0..n).map(|s| (s as usize * 3 + 1) % 4).collect();
    let data: Vec<i64> = (0..n)
        .flat_map(|s| i64s(s, counts[s as usize], 13))
        .collect();
    let got = if r == root {
        call("scatterv", comm.scatterv(root, &data, &counts))?
    } else {
        call("scatterv", comm.scatterv(root, &[] as &[i64], &[]))?
    };
    same("scatterv", &got, &i64s(r, counts[r as usize], 13))
}

fn check_allgather_alltoall(comm: &Communicator, r: u32, n: u32) -> Check {
    let got = call("allgather", comm.allgather(&u64s(r, 5, 20)))?;
    let want: Vec<u64> = (0..n).flat_map(|s| u64s(s, 5, 20)).collect();
    same("allgather (5 elements)", &got, &want)?;

    // 512 KiB from every rank: at least the ring threshold in total.
    let got = call("allgather (large)", comm.allgather(&u64s(r, 65_536, 21)))?;
    let want: Vec<u64> = (0..n).flat_map(|s| u64s(s, 65_536, 21)).collect();
    same("allgather (65536 elements)", &got, &want)?;

    let len = |s: u32| (s as usize * 3) % 4;
    let got = call("allgatherv", comm.allgatherv(&i32s(r, len(r), 22)))?;
    let want: Vec<Vec<i32>> = (0..n).map(|s| i32s(s, len(s), 22)).collect();
    same_parts("allgatherv", &got, &want)?;

    // Element k of the block from `src` to `dst` encodes all three.
    let code = |src: u32, dst: u32, k: usize| src * 10_000 + dst * 100 + k as u32;
    let data: Vec<u32> = (0..n)
        .flat_map(|d| (0..2).map(move |k| (d, k)))
        .map(|(d, k)| code(r, d, k))
        .collect();
    let got = call("alltoall", comm.alltoall(&data))?;
    let want: Vec<u32> = (0..n)
        .flat_map(|s| (0..2).map(move |k| (s, k)))
        .map(|(s, k)| code(s, r, k))
        .collect();
    same("alltoall", &got, &want)?;

    let count = |src: u32, dst: u32| ((src + dst) % 3) as usize;
    let counts: Vec<usize> = (0..n).map(|d| count(r, d)).collect();
    let data: Vec<u32> = (0..n)
        .flat_map(|d| (0..count(r, d)).map(move |k| (d, k)))
        .map(|(d, k)| code(r, d, k))
        .collect();
    let got = call("alltoallv", comm.alltoallv(&data, &counts))?;
    let want: Vec<Vec<u32>> = (0..n)
        .map(|s| (0..count(s, r)).map(|k| code(s, r, k)).collect())
        .collect();
    same_parts("alltoallv", &got, &want)
}

fn check_reductions(comm: &Communicator, r: u32, n: u32) -> Check {
    let root = n - 1;
    let got = call("reduce (sum)", comm.reduce(root, &i64s(r, 10, 30), Op::Sum))?;
    if let Some(got) = at_root("reduce (sum)", r, root, got)? {
        same(
            "reduce (i64 sum)",
            &got,
            &fold_all(n, |s| i64s(s, 10, 30), |a, b| a + b)?,
        )?;
    }
    let got = call("reduce (max)", comm.reduce(0, &f64s(r, 100, 31), Op::Max))?;
    if let Some(got) = at_root("reduce (max)", r, 0, got)? {
        same(
            "reduce (f64 max)",
            &got,
            &fold_all(n, |s| f64s(s, 100, 31), |a, b| a.max(*b))?,
        )?;
    }

    let got = call(
        "allreduce (1 element)",
        comm.allreduce(&[u64::from(r) + 1], Op::Sum),
    )?;
    let total = u64::from(n) * (u64::from(n) + 1) / 2;
    same("allreduce (1 element, sum)", &got, &[total])?;
    let got = call(
        "allreduce (bxor)",
        comm.allreduce(&u64s(r, 7, 32), Op::BXor),
    )?;
    same(
        "allreduce (7 elements, bxor)",
        &got,
        &fold_all(n, |s| u64s(s, 7, 32), |a, b| a ^ b)?,
    )?;
    let got = call(
        "allreduce (large sum)",
        comm.allreduce(&f64s(r, LARGE, 33), Op::Sum),
    )?;
    let want = fold_all(n, |s| f64s(s, LARGE, 33), |a, b| a + b)?;
    same("allreduce (100000 elements, f64 sum)", &got, &want)?;
    let mut out = vec![0i32; LARGE];
    call(
        "allreduce_into (large min)",
        comm.allreduce_into(&i32s(r, LARGE, 34), &mut out, Op::Min),
    )?;
    same(
        "allreduce_into (100000 elements, i32 min)",
        &out,
        &fold_all(n, |s| i32s(s, LARGE, 34), |a, b| *a.min(b))?,
    )?;

    let p = n as usize;
    let got = call(
        "reduce_scatter",
        comm.reduce_scatter(&i64s(r, p * 3, 35), Op::Sum),
    )?;
    let want = fold_all(n, |s| i64s(s, p * 3, 35), |a, b| a + b)?;
    same("reduce_scatter (sum)", &got, &block(&want, r, 3))?;
    let got = call(
        "reduce_scatter (large)",
        comm.reduce_scatter(&u32s(r, p * 5000, 36), Op::Max),
    )?;
    let want = fold_all(n, |s| u32s(s, p * 5000, 36), |a, b| *a.max(b))?;
    same(
        "reduce_scatter (5000 per rank, max)",
        &got,
        &block(&want, r, 5000),
    )?;

    let got = call("scan", comm.scan(&i64s(r, 4, 37), Op::Sum))?;
    let want = fold(0..r + 1, |s| i64s(s, 4, 37), |a, b| a + b).unwrap_or_default();
    same("scan (sum)", &got, &want)?;
    let got = call("exscan", comm.exscan(&i64s(r, 4, 38), Op::Max))?;
    match (fold(0..r, |s| i64s(s, 4, 38), |a, b| *a.max(b)), got) {
        (None, None) => {}
        (Some(want), Some(got)) => same("exscan (max)", &got, &want)?,
        (want, got) => {
            return Err(fail(
                "exscan (max)",
                format!(
                    "expected a result: {}, got one: {}",
                    want.is_some(),
                    got.is_some()
                ),
            ))
        }
    }

    let add = UserOp::commutative(|a: &u64, b: &u64| a.wrapping_add(*b));
    let got = call(
        "allreduce (commutative user op)",
        comm.allreduce(&u64s(r, 9, 39), add),
    )?;
    same(
        "allreduce (commutative user op)",
        &got,
        &fold_all(n, |s| u64s(s, 9, 39), |a, b| a.wrapping_add(*b))?,
    )
}

/// A non-commutative user op through every reduction: results must be in rank order.
fn check_non_commutative(comm: &Communicator, r: u32, n: u32) -> Check {
    let op = UserOp::non_commutative(then);
    let root = (n - 1) / 2;
    let got = call(
        "reduce (non-commutative)",
        comm.reduce(root, &affines(r, 3, 40), op.clone()),
    )?;
    if let Some(got) = at_root("reduce (non-commutative)", r, root, got)? {
        same(
            "reduce (non-commutative)",
            &got,
            &fold_all(n, |s| affines(s, 3, 40), then)?,
        )?;
    }
    for len in [3, 2000] {
        let got = call(
            "allreduce (non-commutative)",
            comm.allreduce(&affines(r, len, 41), op.clone()),
        )?;
        let want = fold_all(n, |s| affines(s, len, 41), then)?;
        same(
            &format!("allreduce (non-commutative, {len} elements)"),
            &got,
            &want,
        )?;
    }
    let p = n as usize;
    let got = call(
        "reduce_scatter (non-commutative)",
        comm.reduce_scatter(&affines(r, p * 2, 42), op.clone()),
    )?;
    let want = fold_all(n, |s| affines(s, p * 2, 42), then)?;
    same(
        "reduce_scatter (non-commutative)",
        &got,
        &block(&want, r, 2),
    )?;
    let got = call(
        "scan (non-commutative)",
        comm.scan(&affines(r, 3, 43), op.clone()),
    )?;
    let want = fold(0..r + 1, |s| affines(s, 3, 43), then).unwrap_or_default();
    same("scan (non-commutative)", &got, &want)?;
    let got = call(
        "exscan (non-commutative)",
        comm.exscan(&affines(r, 3, 44), op),
    )?;
    match (fold(0..r, |s| affines(s, 3, 44), then), got) {
        (None, None) => Ok(()),
        (Some(want), Some(got)) => same("exscan (non-commutative)", &got, &want),
        (want, got) => Err(fail(
            "exscan (non-commutative)",
            format!(
                "expected a result: {}, got one: {}",
                want.is_some(),
                got.is_some()
            ),
        )),
    }
}

fn check_point_to_point(comm: &Communicator, r: u32, n: u32) -> Check {
    let next = (r + 1) % n;
    let prev = (r + n - 1) % n;

    // Even ranks send first, odd ranks receive first: correct even without buffering.
    let mine = u32s(r, 10 + r as usize, 50);
    let got: Vec<u32> = if r.is_multiple_of(2) {
        call("send", comm.send(next, 7, &mine))?;
        call("recv", comm.recv(prev, 7))?
    } else {
        let got = call("recv", comm.recv(prev, 7))?;
        call("send", comm.send(next, 7, &mine))?;
        got
    };
    same(
        "send/recv (ring)",
        &got,
        &u32s(prev, 10 + prev as usize, 50),
    )?;

    let pattern = |s: u32| -> Vec<u8> {
        (0..1 << 20)
            .map(|i: u32| (i.wrapping_mul(31) ^ s) as u8)
            .collect()
    };
    let got: Vec<u8> = call("sendrecv", comm.sendrecv(next, 8, &pattern(r), prev, 8))?;
    same("sendrecv (1 MiB ring)", &got, &pattern(prev))?;

    call("send (for recv_into)", comm.send(next, 9, &u32s(r, 16, 51)))?;
    let mut buf = [0u32; 32];
    let count = call("recv_into", comm.recv_into(prev, 9, &mut buf))?;
    same("recv_into", &buf[..count], &u32s(prev, 16, 51))?;

    // Receives posted first; sends in the opposite tag order.
    let a = call("irecv", comm.irecv::<u64>(prev, 10))?;
    let b = call("irecv", comm.irecv::<u64>(prev, 11))?;
    let s1 = call("isend", comm.isend(next, 11, &u64s(r, 5, 53)))?;
    let s2 = call("isend", comm.isend(next, 10, &u64s(r, 6, 52)))?;
    call("isend", s1.wait())?;
    call("isend", s2.wait())?;
    same(
        "irecv (tag 10)",
        &call("irecv", a.wait())?,
        &u64s(prev, 6, 52),
    )?;
    same(
        "irecv (tag 11)",
        &call("irecv", b.wait())?,
        &u64s(prev, 5, 53),
    )?;

    call("send to self", comm.send(r, 12, &[r, 42]))?;
    let got: Vec<u32> = call("recv from self", comm.recv(r, 12))?;
    same("send/recv to self", &got, &[r, 42])
}

fn check_values(comm: &Communicator, r: u32, n: u32) -> Check {
    let next = (r + 1) % n;
    let prev = (r + n - 1) % n;
    call("send_value", comm.send_value(next, 13, &record(r)))?;
    let got: Record = call("recv_value", comm.recv_value(prev, 13))?;
    same("send_value/recv_value", &[got], &[record(prev)])?;

    let root = n - 1;
    let mine = record(root);
    let got: Record = call(
        "bcast_value",
        comm.bcast_value(root, (r == root).then_some(&mine)),
    )?;
    same("bcast_value", &[got], &[record(root)])?;

    let got = call("gather_value", comm.gather_value(0, &record(r)))?;
    if let Some(got) = at_root("gather_value", r, 0, got)? {
        same(
            "gather_value",
            &got,
            &(0..n).map(record).collect::<Vec<_>>(),
        )?;
    }
    let got: Vec<Record> = call("allgather_value", comm.allgather_value(&record(r)))?;
    same(
        "allgather_value",
        &got,
        &(0..n).map(record).collect::<Vec<_>>(),
    )
}

fn check_all(comm: &Communicator) -> Check {
    let (r, n) = (comm.rank().0, comm.size());
    if let Ok(forced) = std::env::var("FMI_CHANNEL") {
        if comm.channel_name() != forced {
            return Err(fail(
                "channel",
                format!(
                    "FMI_CHANNEL={forced}, but operations run on the {} channel",
                    comm.channel_name()
                ),
            ));
        }
    }
    call("barrier", comm.barrier())?;
    check_bcast(comm, r, n)?;
    check_gather_scatter(comm, r, n)?;
    check_allgather_alltoall(comm, r, n)?;
    check_reductions(comm, r, n)?;
    check_non_commutative(comm, r, n)?;
    check_point_to_point(comm, r, n)?;
    check_values(comm, r, n)?;
    // Nobody leaves (closing its connections) while a peer still needs it.
    call("barrier (final)", comm.barrier())
}

// ------------------------------------------------------------------ modes for the launcher's tests

/// Allreduce until an error ends the loop; rank `die_rank` exits abruptly at `die_at`.
fn die_loop(comm: &Communicator, die_at: u64, die_rank: u32) -> Check {
    let (r, n) = (comm.rank().0, comm.size());
    let started = Instant::now();
    for i in 0..LOOP_MAX_ITERS {
        if r == die_rank && i == die_at {
            eprintln!("rank {r}/{n}: exiting abruptly in allreduce iteration {i}");
            std::process::exit(9);
        }
        if started.elapsed() > LOOP_MAX_TIME {
            return Err(fail(
                "allreduce loop",
                format!("still running after {LOOP_MAX_TIME:?}"),
            ));
        }
        let what = format!("allreduce (loop iteration {i})");
        let got = call(&what, comm.allreduce(&[u64::from(r) + i], Op::Sum))?;
        let want = u64::from(n) * (u64::from(n) - 1) / 2 + u64::from(n) * i;
        same(&what, &got, &[want])?;
    }
    Ok(())
}

/// Waits in a receive nobody answers, unless this is the failing rank.
fn hang(comm: &Communicator, secs: u64, fail_rank: Option<u32>, code: u8) -> Result<(), Failure> {
    let (r, n) = (comm.rank().0, comm.size());
    call("barrier", comm.barrier())?;
    println!("rank {r}/{n}: ready");
    if fail_rank == Some(r) {
        eprintln!("rank {r}/{n}: failing on purpose with exit code {code}");
        std::process::exit(i32::from(code));
    }
    let waited = comm
        .with_deadline(Duration::from_secs(secs))
        .recv::<u8>(r, 99);
    println!(
        "rank {r}/{n}: stopped waiting: {}",
        waited
            .map(|_| "message".to_owned())
            .unwrap_or_else(|e| e.to_string())
    );
    Ok(())
}

/// The content of line `i` of `stream` of rank `r` in `--spam` mode (the tests rebuild it).
fn spam_line(r: u32, stream: &str, i: usize) -> Vec<u8> {
    let mut line = format!("spam rank {r} {stream} line {i} ").into_bytes();
    if i == 1 {
        line.extend_from_slice(b"not utf-8: \xff\xfe\xfd");
        return line;
    }
    let len = [10, 1000, 5000, 100_000][i % 4];
    line.extend((0..len).map(|k| b'a' + ((r as usize + i + k) % 26) as u8));
    line
}

fn spam(lines: usize) -> Result<(), Failure> {
    let r: u32 = std::env::var("FMI_RANK")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let io = |e: std::io::Error| fail("spam", e.to_string());
    let mut out = std::io::stdout().lock();
    let mut err = std::io::stderr().lock();
    for i in 0..lines {
        for (stream, w) in [("stdout", &mut out as &mut dyn Write), ("stderr", &mut err)] {
            let line = spam_line(r, stream, i);
            // In two pieces with a flush between: the launcher must still forward one line.
            let (a, b) = line.split_at(line.len() / 2);
            w.write_all(a).map_err(io)?;
            w.flush().map_err(io)?;
            w.write_all(b).map_err(io)?;
            w.write_all(b"\n").map_err(io)?;
            w.flush().map_err(io)?;
        }
    }
    write!(out, "tail rank {r} stdout").map_err(io)?;
    out.flush().map_err(io)?;
    write!(err, "tail rank {r} stderr").map_err(io)?;
    err.flush().map_err(io)
}

// ------------------------------------------------------------------ main

enum Mode {
    All,
    Die {
        at: u64,
        rank: Option<u32>,
    },
    Hang {
        secs: u64,
        fail_rank: Option<u32>,
        code: u8,
    },
    Spam(usize),
}

fn parse_args() -> Result<Mode, String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut mode = Mode::All;
    let mut die_rank = None;
    let mut fail_rank = None;
    let mut code = 3;
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let bad = |_| format!("{flag} {value}: not a whole number");
        match flag.as_str() {
            "--die-at" => {
                mode = Mode::Die {
                    at: value.parse().map_err(bad)?,
                    rank: None,
                }
            }
            "--die-rank" => die_rank = Some(value.parse().map_err(bad)?),
            "--hang-secs" => {
                mode = Mode::Hang {
                    secs: value.parse().map_err(bad)?,
                    fail_rank: None,
                    code: 3,
                }
            }
            "--fail-rank" => fail_rank = Some(value.parse().map_err(bad)?),
            "--code" => code = value.parse().map_err(bad)?,
            "--spam" => mode = Mode::Spam(value.parse().map_err(bad)?),
            _ => return Err(format!("unknown argument {flag}")),
        }
    }
    Ok(match mode {
        Mode::Die { at, .. } => Mode::Die { at, rank: die_rank },
        Mode::Hang { secs, .. } => Mode::Hang {
            secs,
            fail_rank,
            code,
        },
        m => m,
    })
}

fn main() -> ExitCode {
    let mode = match parse_args() {
        Ok(m) => m,
        Err(e) => {
            eprintln!("collectives_check: {e}");
            eprintln!(
                "usage: collectives_check [--die-at I [--die-rank K] | --hang-secs S \
                 [--fail-rank K [--code C]] | --spam L]"
            );
            return ExitCode::from(2);
        }
    };
    if let Mode::Spam(lines) = mode {
        return match spam(lines) {
            Ok(()) => ExitCode::SUCCESS,
            Err(f) => {
                eprintln!("collectives_check: {}: {}", f.what, f.detail);
                ExitCode::FAILURE
            }
        };
    }
    let comm = match Communicator::from_env() {
        Ok(c) => c,
        Err(e) => {
            let rank = std::env::var("FMI_RANK").unwrap_or_else(|_| "?".into());
            eprintln!("collectives_check: rank {rank}: cannot join the job: {e}");
            return ExitCode::FAILURE;
        }
    };
    let (r, n) = (comm.rank().0, comm.size());
    let all = matches!(mode, Mode::All);
    let result = match mode {
        Mode::All => check_all(&comm),
        Mode::Die { at, rank } => die_loop(&comm, at, rank.unwrap_or(n - 1)),
        Mode::Hang {
            secs,
            fail_rank,
            code,
        } => hang(&comm, secs, fail_rank, code),
        Mode::Spam(_) => Ok(()),
    };
    match result {
        Ok(()) => {
            if all {
                println!("rank {r}/{n}: all collectives ok");
            }
            ExitCode::SUCCESS
        }
        Err(f) => {
            eprintln!(
                "collectives_check: rank {r}/{n}: {} failed: {}",
                f.what, f.detail
            );
            ExitCode::FAILURE
        }
    }
}
