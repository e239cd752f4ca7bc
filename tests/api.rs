//! The public API of `fmi` over the in-memory channel: point-to-point, non-blocking requests,
//! serde values, the blocking facade, and the typed errors; and the blocking facade's progress
//! thread over real loopback TCP.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

mod common;

use std::time::{Duration, Instant};

use common::{run, Mat2};
use fmi::{Config, Error, Op, Rank, UserOp};

fn cfg() -> Config {
    Config::default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_recv_variable_lengths_and_recv_into() {
    let out = run(2, cfg(), |c| async move {
        if c.rank() == Rank(0) {
            c.send(1, 5, &[1.5f64, 2.5, 3.5]).await?;
            c.send(1, 5, &[] as &[f64]).await?;
            c.send(1, 6, &[7u32; 10]).await?;
            c.send(1, 6, &[8u32; 3]).await?;
            Ok::<_, Error>(vec![])
        } else {
            let a: Vec<f64> = c.recv(0, 5).await?;
            assert_eq!(a, vec![1.5, 2.5, 3.5]);
            let b: Vec<f64> = c.recv(0, 5).await?;
            assert!(b.is_empty());
            // A message longer than the buffer is a CountMismatch…
            let mut small = [0u32; 4];
            let e = c.recv_into(0, 6, &mut small).await.expect_err("too long");
            assert!(
                matches!(
                    e,
                    Error::CountMismatch {
                        got: 10,
                        expected: 4,
                        ..
                    }
                ),
                "{e}"
            );
            // …and a shorter one fills the front.
            let n = c.recv_into(0, 6, &mut small).await?;
            assert_eq!((n, small), (3, [8, 8, 8, 0]));
            Ok(a)
        }
    })
    .await;
    for r in out {
        r.expect("rank ok");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn type_mismatch_is_reported_with_both_ranks() {
    let out = run(2, cfg(), |c| async move {
        if c.rank() == Rank(0) {
            c.send(1, 0, &[1u8, 2, 3]).await.map(|_| ())
        } else {
            match c.recv::<u64>(0, 0).await {
                Err(Error::TypeMismatch {
                    me,
                    peer,
                    len: 3,
                    elem_size: 8,
                }) => {
                    assert_eq!((me, peer), (Rank(1), Rank(0)));
                    Ok(())
                }
                other => panic!("expected TypeMismatch, got {other:?}"),
            }
        }
    })
    .await;
    for r in out {
        r.expect("rank ok");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sendrecv_ring_does_not_deadlock() {
    let out = run(5, cfg(), |c| async move {
        let n = c.size();
        let me = c.rank().0;
        let got: Vec<u32> = c
            .sendrecv((me + 1) % n, 1, &[me], (me + n - 1) % n, 1)
            .await
            .expect("sendrecv");
        got[0]
    })
    .await;
    assert_eq!(out, vec![4, 0, 1, 2, 3]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn isend_irecv_keep_order_with_plain_calls() {
    let out = run(2, cfg(), |c| async move {
        if c.rank() == Rank(0) {
            let reqs: Vec<_> = (0..20u32).map(|i| c.isend(1, 3, &[i])).collect();
            c.send(1, 3, &[20u32]).await.expect("send");
            for r in reqs {
                r.wait().await.expect("isend");
            }
            vec![]
        } else {
            let reqs: Vec<_> = (0..10).map(|_| c.irecv::<u32>(0, 3)).collect();
            let mut got = Vec::new();
            for r in reqs {
                got.extend(r.wait().await.expect("irecv"));
            }
            for _ in 10..21 {
                got.extend(c.recv::<u32>(0, 3).await.expect("recv"));
            }
            got
        }
    })
    .await;
    assert_eq!(out[1], (0..21).collect::<Vec<u32>>());
}

#[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq, Clone)]
struct Task {
    name: String,
    weights: Vec<f32>,
    shard: Option<u16>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serde_values_travel_through_p2p_and_collectives() {
    let out = run(3, cfg(), |c| async move {
        let me = c.rank().0;
        let task = Task {
            name: format!("rank-{me}"),
            weights: vec![me as f32; me as usize],
            shard: (me > 0).then_some(me as u16),
        };
        let root_task = c.bcast_value(0, (me == 0).then_some(&task)).await?;
        assert_eq!(root_task.name, "rank-0");
        let all = c.allgather_value(&task).await?;
        assert_eq!(all[2].weights, vec![2.0, 2.0]);
        let gathered = c.gather_value(1, &me).await?;
        assert_eq!(gathered.is_some(), me == 1);
        if me == 0 {
            c.send_value(2, 9, &task).await?;
        }
        if me == 2 {
            let t: Task = c.recv_value(0, 9).await?;
            assert_eq!(t, root_task);
            // Decoding as the wrong type is a typed error, not a panic.
            c.send_value(2, 10, &"text").await?;
            let e = c.recv_value::<Task>(2, 10).await.expect_err("wrong type");
            assert!(matches!(e, Error::Serialization { .. }), "{e}");
        }
        Ok::<_, Error>(gathered)
    })
    .await;
    let at_root = out[1].as_ref().expect("rank 1").as_ref().expect("root");
    assert_eq!(at_root, &vec![0, 1, 2]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_commutative_ops_are_applied_in_rank_order() {
    for n in 1..=7u32 {
        let out = run(n, cfg(), |c| async move {
            let me = c.rank().0;
            let data: Vec<Mat2> = (0..3).map(|i| Mat2::for_rank(me, i)).collect();
            let before = data.clone();
            let op = || UserOp::non_commutative(|a: &Mat2, b: &Mat2| a.mul(b));
            let red = c.reduce(n - 1, &data, op()).await.expect("reduce");
            let all = c.allreduce(&data, op()).await.expect("allreduce");
            let scan = c.scan(&data, op()).await.expect("scan");
            let ex = c.exscan(&data, op()).await.expect("exscan");
            assert_eq!(data, before, "input buffer modified");
            (red, all, scan, ex)
        })
        .await;
        let prefix = |upto: u32| -> Vec<Mat2> {
            (0..3)
                .map(|i| {
                    (1..upto).fold(Mat2::for_rank(0, i), |acc, r| {
                        acc.mul(&Mat2::for_rank(r, i))
                    })
                })
                .collect()
        };
        let total = prefix(n);
        for (r, (red, all, scan, ex)) in out.into_iter().enumerate() {
            let r = r as u32;
            assert_eq!(all, total, "n={n} allreduce at rank {r}");
            assert_eq!(red.is_some(), r == n - 1, "n={n} reduce root");
            if let Some(red) = red {
                assert_eq!(red, total, "n={n} reduce");
            }
            assert_eq!(scan, prefix(r + 1), "n={n} scan at rank {r}");
            assert_eq!(ex, (r > 0).then(|| prefix(r)), "n={n} exscan at rank {r}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsupported_builtin_op_is_a_clear_error() {
    let out = run(1, cfg(), |c| async move {
        c.allreduce(&[1.0f64], Op::BXor).await
    })
    .await;
    let e = out
        .into_iter()
        .next()
        .expect("one rank")
        .expect_err("bxor of f64");
    assert!(matches!(e, Error::UnsupportedOp { op: "bxor", .. }), "{e}");
    assert!(e.to_string().contains("user-defined op"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_peer_times_out_naming_it() {
    let out = run(3, cfg(), |c| async move {
        let c = c.with_deadline(Duration::from_millis(300));
        let started = Instant::now();
        if c.rank() == Rank(2) {
            // Rank 2 stays silent but alive until the others have given up.
            tokio::time::sleep(Duration::from_secs(2)).await;
            return (None, started.elapsed());
        }
        let e = c.recv::<u8>(2, 0).await.expect_err("nobody sends");
        (Some(e), started.elapsed())
    })
    .await;
    for (e, took) in out.into_iter().take(2) {
        let e = e.expect("error");
        assert!(matches!(e, Error::Timeout { peer: Rank(2), .. }), "{e}");
        assert!(e.to_string().contains("rank 2"), "{e}");
        assert!(took < Duration::from_secs(2), "took {took:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_rank_is_peer_lost_in_collectives() {
    let out = run(4, cfg(), |c| async move {
        if c.rank() == Rank(3) {
            drop(c);
            return None;
        }
        let started = Instant::now();
        let r = c.allreduce(&[1u64; 16], Op::Sum).await;
        Some((r, started.elapsed()))
    })
    .await;
    let mut saw_lost = false;
    for (r, took) in out.into_iter().flatten() {
        assert!(took < Duration::from_secs(30), "took {took:?}");
        if let Err(e) = r {
            assert!(e.is_peer_failure(), "{e}");
            saw_lost |= matches!(e, Error::PeerLost { peer: Rank(3), .. });
        }
    }
    assert!(saw_lost, "someone must notice rank 3 is gone");
}

/// A point-to-point failure is passed on to the job by the communicator itself (its `send`,
/// `recv` and `recv_into` call the channel without the `AbortOnFailure` wrapper): rank 0's
/// receive from the dead rank 2 fails naming it, and rank 1, which waits for rank 0 (not for
/// rank 2), hears of it from rank 0 instead of timing out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_point_to_point_failure_is_passed_on_to_the_job() {
    use fmi_channels::tcp::{local_world, TcpConfig};
    let job = fmi_channels::JobId::new("p2p-abort").expect("job id");
    let mut eps = local_world(job, 3, TcpConfig::default())
        .await
        .expect("tcp world");
    let comms: Vec<fmi::Communicator> = eps
        .drain(..2)
        .map(|ch| {
            fmi::Communicator::builder()
                .channel(ch)
                .deadline(Duration::from_secs(20))
                .build()
        })
        .collect();
    // Rank 2 connects, then goes away.
    let dead = eps.pop().expect("rank 2");
    let c0 = comms[0].clone();
    c0.send(2, 1, &[1u8]).await.expect("first send to rank 2");
    drop(dead);
    let started = Instant::now();
    let (r0, r1) = tokio::join!(comms[0].recv::<u8>(2, 1), async {
        let mut buf = [0u8; 4];
        comms[1].recv_into(0, 1, &mut buf).await
    });
    let e0 = r0.expect_err("rank 2 is gone");
    assert!(matches!(e0, Error::PeerLost { peer: Rank(2), .. }), "{e0}");
    let e1 = r1.expect_err("the job was aborted");
    assert!(
        matches!(
            e1,
            Error::PeerLost {
                me: Rank(1),
                peer: Rank(2),
                via: Some(Rank(0)),
                ..
            }
        ),
        "{e1}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "not by the deadline"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_ranks_and_counts_are_errors() {
    let out = run(3, cfg(), |c| async move {
        let e1 = c.send(7, 0, &[1u8]).await.expect_err("rank 7");
        assert!(
            matches!(
                e1,
                Error::InvalidRank {
                    rank: Rank(7),
                    size: 3
                }
            ),
            "{e1}"
        );
        let e2 = c.bcast(5, &[1u8]).await.expect_err("root 5");
        assert!(matches!(e2, Error::InvalidRank { .. }), "{e2}");
        let e3 = c
            .alltoall(&[1u8, 2])
            .await
            .expect_err("2 not a multiple of 3");
        assert!(matches!(e3, Error::CountMismatch { .. }), "{e3}");
        // Unequal allgather contributions are caught, not mis-assembled.
        let mine = vec![0u16; c.rank().0 as usize + 1];
        // A rank that notices returns (and drops its endpoint), so the others may see that
        // instead: either way nobody hangs or mis-assembles.
        let e4 = c.allgather(&mine).await.expect_err("unequal lengths");
        assert!(
            matches!(e4, Error::CountMismatch { .. }) || e4.is_peer_failure(),
            "{e4}"
        );
        matches!(e4, Error::CountMismatch { .. })
    })
    .await;
    assert!(out.iter().any(|&m| m), "someone reports the CountMismatch");
}

#[test]
fn blocking_api_from_threads() {
    let world = fmi::blocking::local_world(4).expect("world");
    let handles: Vec<_> = world
        .into_iter()
        .map(|c| {
            std::thread::spawn(move || {
                let me = c.rank().0 as u64;
                let sum = c.allreduce(&[me + 1], Op::Sum).expect("allreduce");
                c.barrier().expect("barrier");
                let req = c.isend((me as u32 + 1) % 4, 0, &[me]).expect("isend");
                let mut rreq = c.irecv::<u64>((me as u32 + 3) % 4, 0).expect("irecv");
                let got = loop {
                    if let Some(r) = rreq.test() {
                        break r.expect("irecv result");
                    }
                    std::thread::sleep(Duration::from_millis(1));
                };
                req.wait().expect("isend wait");
                (sum[0], got[0])
            })
        })
        .collect();
    let out: Vec<_> = handles
        .into_iter()
        .map(|h| h.join().expect("thread"))
        .collect();
    assert_eq!(out, vec![(10, 3), (10, 0), (10, 1), (10, 2)]);
}

#[tokio::test]
async fn blocking_api_refuses_to_run_inside_a_runtime() {
    let e = fmi::blocking::local_world(1).expect_err("nested runtime");
    assert!(matches!(e, Error::NestedRuntime), "{e}");
}

#[test]
fn from_env_validates_the_environment() {
    // Variables are read through a lookup function so tests need not mutate the process env.
    let e = fmi::EnvSettings::from_lookup(|k| match k {
        "FMI_RANK" => Some("3".into()),
        "FMI_SIZE" => Some("3".into()),
        "FMI_JOB" => Some("j".into()),
        _ => None,
    })
    .expect_err("rank 3 of 3");
    assert!(e.to_string().contains("FMI_RANK"), "{e}");
}

/// `recv_into` counts in elements; a length that is not a multiple of the element size is a
/// `TypeMismatch`, whether or not it fits the buffer, and the message is consumed either way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recv_into_reports_type_mismatches_in_elements() {
    let out = run(2, cfg(), |c| async move {
        if c.rank() == Rank(0) {
            c.send(1, 7, &[1u8; 6]).await?;
            c.send(1, 7, &[2u8; 10]).await?;
            c.send(1, 7, &[3u32; 2]).await?;
        } else {
            let mut buf = [0u32; 2];
            for len in [6, 10] {
                let e = c
                    .recv_into(0, 7, &mut buf)
                    .await
                    .expect_err("not whole u32s");
                assert!(
                    matches!(e, Error::TypeMismatch { len: l, elem_size: 4, .. } if l == len),
                    "{len} bytes: {e}"
                );
            }
            assert_eq!(c.recv_into(0, 7, &mut buf).await?, 2);
            assert_eq!(buf, [3, 3]);
        }
        Ok::<_, Error>(())
    })
    .await;
    for r in out {
        r.expect("rank ok");
    }
}

/// Between calls the blocking API's progress thread drives the channel: a message far larger
/// than the kernel's socket buffers, sent over real loopback TCP to a rank that makes no call
/// for two seconds, is taken in (into the receiver's inbox) while that rank computes, so the
/// sender's `send` returns long before the receiver's `recv`. This holds after a run of calls,
/// when the progress thread has backed off to its longest park.
#[test]
fn the_progress_thread_takes_messages_in_while_the_program_computes() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{mpsc, Arc};

    use fmi_channels::tcp::{TcpChannel, TcpConfig};
    use fmi_channels::JobId;

    const LEN: usize = 32 << 20;
    let (addr_tx, addr_rx) = mpsc::channel();
    let mut peers_tx = Vec::new();
    let mut ranks = Vec::new();
    let woke = Arc::new(AtomicBool::new(false));
    for r in 0..2u32 {
        let addr_tx = addr_tx.clone();
        let (tx, rx) = mpsc::channel::<Vec<std::net::SocketAddr>>();
        peers_tx.push(tx);
        let woke = Arc::clone(&woke);
        ranks.push(std::thread::spawn(move || {
            let comm = fmi::blocking::Communicator::build(|| async move {
                let b = TcpChannel::bind("127.0.0.1:0".parse().expect("addr")).await?;
                addr_tx.send((r, b.local_addr())).expect("addresses");
                let peers = rx.recv_timeout(Duration::from_secs(30)).expect("peers");
                let ch = TcpChannel::start(
                    b,
                    JobId::new("progress-thread").expect("job"),
                    Rank(r),
                    peers,
                    TcpConfig::default(),
                )?;
                Ok(fmi::Communicator::builder().channel(ch).build())
            })
            .expect("communicator");
            // A run of calls first, so that the progress thread backs off to its longest park.
            for _ in 0..200 {
                comm.barrier().expect("barrier");
            }
            if r == 0 {
                let payload = vec![7u8; LEN];
                let t = Instant::now();
                comm.send(1, 3, &payload).expect("send");
                let took = t.elapsed();
                assert!(
                    !woke.load(Ordering::SeqCst),
                    "send took {took:?}: it waited for the receiver's call"
                );
            } else {
                std::thread::sleep(Duration::from_secs(2));
                woke.store(true, Ordering::SeqCst);
                let got: Vec<u8> = comm.recv(0, 3).expect("recv");
                assert!(got.len() == LEN && got.iter().all(|&b| b == 7), "payload");
            }
            comm.barrier().expect("last barrier");
        }));
    }
    let mut addrs = vec![None; 2];
    for _ in 0..2 {
        let (r, a) = addr_rx
            .recv_timeout(Duration::from_secs(30))
            .expect("address");
        addrs[r as usize] = Some(a);
    }
    let addrs: Vec<_> = addrs.into_iter().map(|a| a.expect("both")).collect();
    for tx in peers_tx {
        tx.send(addrs.clone()).expect("peers");
    }
    for h in ranks {
        h.join().expect("rank");
    }
}
