//! The direct TCP channel over real loopback sockets: conformance, the simultaneous-dial rule,
//! peer loss, back-pressure, handshake refusal and framing errors.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{eventually, in_secs, job, loopback};
use fmi_channels::tcp::{local_world, TcpChannel, TcpConfig};
use fmi_channels::{conformance, Channel, Error, Rank, Tag};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// A hello as documented in the module docs of `fmi_channels::tcp`.
fn hello(job: &str, from: u32, to: u32) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&from.to_le_bytes());
    body.extend_from_slice(&to.to_le_bytes());
    body.push(job.len() as u8);
    body.extend_from_slice(job.as_bytes());
    body.extend_from_slice(&0u16.to_le_bytes());
    let mut out = b"fmiT".to_vec();
    out.extend_from_slice(&1u16.to_le_bytes());
    out.extend_from_slice(&(body.len() as u16).to_le_bytes());
    out.extend_from_slice(&body);
    out
}

fn frame(tag: u64, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![1u8];
    out.extend_from_slice(&tag.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(payload);
    out
}

/// Connects to `addr`, sends `hello` and returns the socket and the reply's status byte.
async fn raw_handshake(addr: SocketAddr, hello: &[u8]) -> (TcpStream, u8) {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(hello).await.expect("write hello");
    let mut reply = [0u8; 7];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut reply))
        .await
        .expect("reply in time")
        .expect("read reply");
    assert_eq!(&reply[..4], b"fmiT", "reply magic");
    assert_eq!(u16::from_le_bytes([reply[4], reply[5]]), 1, "reply version");
    (s, reply[6])
}

/// Whether the peer closes `s` (end of stream or reset) within 5 s, ignoring what it sends
/// first.
async fn closed_by_peer(s: &mut TcpStream) -> bool {
    let mut rest = Vec::new();
    // End of stream and reset both count: the read finished in time.
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest))
        .await
        .is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_channel_passes_conformance() {
    conformance::run_all(|n| async move {
        Ok(local_world(job("conformance"), n, TcpConfig::default())
            .await?
            .into_iter()
            .map(|c| Arc::new(c) as Arc<dyn Channel>)
            .collect())
    })
    .await;
}

/// The receive spin (`TcpConfig::spin`) changes only how a receive waits: the suite passes with
/// no spinning at all, and with a window long enough that receives read whole messages, and
/// frames of other tags, while spinning.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_channel_passes_conformance_with_and_without_spinning() {
    for spin in [Duration::ZERO, Duration::from_millis(2)] {
        conformance::run_all(|n| async move {
            let config = TcpConfig {
                spin,
                ..TcpConfig::default()
            };
            Ok(local_world(job("conformance-spin"), n, config)
                .await?
                .into_iter()
                .map(|c| Arc::new(c) as Arc<dyn Channel>)
                .collect())
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simultaneous_first_sends_leave_one_connection_and_lose_nothing() {
    const MSGS: u32 = 30;
    for world in 0..20 {
        let eps: Vec<Arc<TcpChannel>> = local_world(job("race"), 2, TcpConfig::default())
            .await
            .expect("world")
            .into_iter()
            .map(Arc::new)
            .collect();
        let start = Arc::new(tokio::sync::Barrier::new(2));
        let tasks: Vec<_> = (0..2u32)
            .map(|me| {
                let ep = Arc::clone(&eps[me as usize]);
                let start = Arc::clone(&start);
                tokio::spawn(async move {
                    let other = Rank(1 - me);
                    start.wait().await;
                    // Both ranks dial at once: the first send of each opens a connection.
                    let sends = async {
                        for i in 0..MSGS {
                            let msg = (me * 1000 + i).to_le_bytes();
                            ep.send(other, Tag::user(1), &msg, in_secs(30))
                                .await
                                .expect("send");
                        }
                    };
                    let recvs = async {
                        for i in 0..MSGS {
                            let m = ep
                                .recv(other, Tag::user(1), in_secs(30))
                                .await
                                .expect("recv");
                            assert_eq!(
                                m,
                                ((1 - me) * 1000 + i).to_le_bytes(),
                                "world {world}: rank {me} message {i} lost or reordered"
                            );
                        }
                    };
                    tokio::join!(sends, recvs);
                })
            })
            .collect();
        for t in tasks {
            t.await.expect("rank task");
        }
        let one_each = eventually(Duration::from_secs(5), || {
            eps.iter().all(|e| e.open_connections() == 1)
        })
        .await;
        assert!(
            one_each,
            "world {world}: open connections {:?}, want one per endpoint",
            eps.iter().map(|e| e.open_connections()).collect::<Vec<_>>()
        );
        // The surviving connection still works both ways.
        eps[0]
            .send(Rank(1), Tag::user(2), b"after", in_secs(10))
            .await
            .expect("send after race");
        eps[1]
            .send(Rank(0), Tag::user(2), b"after", in_secs(10))
            .await
            .expect("send after race");
        for (me, from) in [(0usize, 1u32), (1, 0)] {
            let m = eps[me]
                .recv(Rank(from), Tag::user(2), in_secs(10))
                .await
                .expect("recv after race");
            assert_eq!(m, b"after");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_endpoint_is_lost_promptly_while_others_carry_on() {
    let mut eps = local_world(job("loss"), 3, TcpConfig::default())
        .await
        .expect("world");
    // Connect every pair.
    for a in 0..3u32 {
        for b in 0..3u32 {
            if a != b {
                eps[a as usize]
                    .send(Rank(b), Tag::user(0), b"hi", in_secs(10))
                    .await
                    .expect("warm-up send");
            }
        }
    }
    for a in 0..3u32 {
        for b in (0..3u32).filter(|&b| b != a) {
            eps[a as usize]
                .recv(Rank(b), Tag::user(0), in_secs(10))
                .await
                .expect("warm-up recv");
        }
    }
    // Rank 2 leaves a message behind, then goes away while rank 0 is waiting for another.
    eps[2]
        .send(Rank(0), Tag::user(5), b"last words", in_secs(10))
        .await
        .expect("send before leaving");
    let ep0 = Arc::new(eps.remove(0));
    let waiting = {
        let ep0 = Arc::clone(&ep0);
        tokio::spawn(async move { ep0.recv(Rank(2), Tag::user(6), in_secs(60)).await })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    let started = Instant::now();
    drop(eps.pop()); // rank 2
    let ep1 = eps.pop().expect("rank 1");

    let r = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("pending recv fails promptly")
        .expect("task");
    assert!(
        matches!(
            r,
            Err(Error::PeerLost {
                peer: Rank(2),
                me: Rank(0),
                channel: "tcp",
                via: None,
            })
        ),
        "pending recv: {r:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    // What rank 2 sent before leaving is still delivered, then the loss shows.
    let m = ep0
        .recv(Rank(2), Tag::user(5), in_secs(10))
        .await
        .expect("buffered message survives the loss");
    assert_eq!(m, b"last words");
    let r = ep0.recv(Rank(2), Tag::user(5), in_secs(60)).await;
    assert!(
        matches!(r, Err(Error::PeerLost { .. })),
        "later recv: {r:?}"
    );
    let r = tokio::time::timeout(
        Duration::from_secs(5),
        ep1.recv(Rank(2), Tag::user(7), in_secs(60)),
    )
    .await
    .expect("rank 1 notices too");
    assert!(
        matches!(r, Err(Error::PeerLost { peer: Rank(2), .. })),
        "{r:?}"
    );
    let r = ep0.send(Rank(2), Tag::user(1), b"x", in_secs(10)).await;
    assert!(
        matches!(r, Err(Error::PeerLost { peer: Rank(2), .. })),
        "send: {r:?}"
    );

    // Ranks 0 and 1 still talk.
    for i in 0..10u32 {
        ep0.send(Rank(1), Tag::user(3), &i.to_le_bytes(), in_secs(10))
            .await
            .expect("0 -> 1");
        ep1.send(Rank(0), Tag::user(3), &i.to_le_bytes(), in_secs(10))
            .await
            .expect("1 -> 0");
    }
    for i in 0..10u32 {
        let a = ep1
            .recv(Rank(0), Tag::user(3), in_secs(10))
            .await
            .expect("recv");
        let b = ep0
            .recv(Rank(1), Tag::user(3), in_secs(10))
            .await
            .expect("recv");
        assert_eq!((a, b), (i.to_le_bytes().to_vec(), i.to_le_bytes().to_vec()));
    }
}

/// CPU time this process has used so far (user + system), from `/proc/self/stat`, in clock ticks.
fn cpu_ticks() -> u64 {
    let stat = std::fs::read_to_string("/proc/self/stat").expect("/proc/self/stat");
    // Fields after the command name (which is in parentheses and may hold spaces): state is
    // field 3, utime 14 and stime 15.
    let rest = &stat[stat.rfind(')').expect("stat format") + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime")
}

/// Long frames are written and read "busily" (non-blocking syscalls, yielding while the socket
/// is full or empty) when the host's ranks fit its cores. Both directions at once, as in an
/// exchange, where each side's send and receive share one task: nothing stalls, and every
/// byte arrives in order, into `recv` and into `recv_into` buffers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_frames_cross_both_ways_at_once() {
    const LEN: usize = 4 << 20;
    let eps: Vec<Arc<TcpChannel>> = local_world(job("busy-both-ways"), 2, TcpConfig::default())
        .await
        .expect("world")
        .into_iter()
        .map(Arc::new)
        .collect();
    let side = |me: u32| {
        let ep = Arc::clone(&eps[me as usize]);
        tokio::spawn(async move {
            let peer = Rank(1 - me);
            let mut into = vec![0u8; LEN];
            for round in 0..6u8 {
                let mine: Vec<u8> = (0..LEN)
                    .map(|i| (i as u8).wrapping_mul(31) ^ round ^ me as u8)
                    .collect();
                let want: Vec<u8> = (0..LEN)
                    .map(|i| (i as u8).wrapping_mul(31) ^ round ^ peer.0 as u8)
                    .collect();
                let tag = Tag::user(u32::from(round));
                let send = ep.send(peer, tag, &mine, in_secs(60));
                if round % 2 == 0 {
                    let (s, r) = tokio::join!(send, ep.recv(peer, tag, in_secs(60)));
                    s.expect("send");
                    assert!(r.expect("recv") == want, "round {round}: payload differs");
                } else {
                    let (s, r) =
                        tokio::join!(send, ep.recv_into(peer, tag, &mut into, in_secs(60)));
                    s.expect("send");
                    assert_eq!(r.expect("recv_into"), LEN);
                    assert!(into == want, "round {round}: recv_into payload differs");
                }
            }
        })
    };
    let (a, b) = (side(0), side(1));
    tokio::time::timeout(Duration::from_secs(120), async {
        a.await.expect("rank 0");
        b.await.expect("rank 1");
    })
    .await
    .expect("exchanges finish");
}

/// A busy send stops polling once its peer stops taking bytes: a long message to a rank that
/// receives only after 600 ms costs the sender about no CPU meanwhile (it sleeps in the
/// reactor after [`TcpConfig::spin`] without progress), and arrives intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_sender_sleeps_while_its_peer_does_not_read() {
    const LEN: usize = 32 << 20; // more than the kernel's socket buffers on both ends take
    const BOUND: usize = 1 << 20;
    let config = TcpConfig {
        unexpected_bound: BOUND,
        ..TcpConfig::default()
    };
    let eps: Vec<Arc<TcpChannel>> = local_world(job("busy-sleeps"), 2, config)
        .await
        .expect("world")
        .into_iter()
        .map(Arc::new)
        .collect();
    // Connect first, so that the window below holds only the stalled send.
    eps[0]
        .send(Rank(1), Tag::user(0), b"hi", in_secs(30))
        .await
        .expect("first send");
    eps[1]
        .recv(Rank(0), Tag::user(0), in_secs(30))
        .await
        .expect("first recv");
    // A message nobody receives yet fills the receiver's bound, so its reader task stops
    // reading and the long send below stalls once the socket buffers are full.
    eps[0]
        .send(Rank(1), Tag::user(2), &vec![7u8; BOUND], in_secs(30))
        .await
        .expect("filler");
    assert!(
        eventually(Duration::from_secs(10), || eps[1].inbox().buffered_bytes()
            >= BOUND)
        .await,
        "the filler reaches the receiver's inbox"
    );
    let sender = {
        let ep = Arc::clone(&eps[0]);
        tokio::spawn(async move {
            let msg: Vec<u8> = (0..LEN).map(|i| (i % 251) as u8).collect();
            ep.send(Rank(1), Tag::user(1), &msg, in_secs(60))
                .await
                .expect("send");
        })
    };
    // Let the sender fill the socket buffers and give up polling.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let before = cpu_ticks();
    tokio::time::sleep(Duration::from_millis(600)).await;
    let used = cpu_ticks() - before;
    assert!(
        !sender.is_finished(),
        "the send cannot finish before anyone reads"
    );
    // A sender polling through the window would use about 60 ticks (100 per second); the
    // reader task, idle, and the test's own threads use next to none.
    assert!(
        used < 20,
        "{used} clock ticks of CPU in 600 ms while the send was stalled"
    );
    let filler = eps[1]
        .recv(Rank(0), Tag::user(2), in_secs(60))
        .await
        .expect("filler recv");
    assert_eq!(filler.len(), BOUND);
    let got = eps[1]
        .recv(Rank(0), Tag::user(1), in_secs(60))
        .await
        .expect("recv");
    assert_eq!(got.len(), LEN);
    assert!(got.iter().enumerate().all(|(i, &b)| b == (i % 251) as u8));
    sender.await.expect("sender");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn back_pressure_stalls_the_sender_instead_of_buffering() {
    const BOUND: usize = 1 << 20;
    const MSG: usize = 1 << 20;
    const COUNT: u32 = 64; // 64 MiB: far more than the bound plus the kernel's socket buffers
    let config = TcpConfig {
        unexpected_bound: BOUND,
        ..TcpConfig::default()
    };
    let eps: Vec<Arc<TcpChannel>> = local_world(job("pressure"), 2, config)
        .await
        .expect("world")
        .into_iter()
        .map(Arc::new)
        .collect();
    let sent = Arc::new(AtomicUsize::new(0));
    let sender = {
        let ep = Arc::clone(&eps[0]);
        let sent = Arc::clone(&sent);
        tokio::spawn(async move {
            let mut msg = vec![0xa5u8; MSG];
            for i in 0..COUNT {
                msg[..4].copy_from_slice(&i.to_le_bytes());
                ep.send(Rank(1), Tag::user(1), &msg, in_secs(120))
                    .await
                    .expect("send");
                sent.fetch_add(1, Ordering::SeqCst);
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(700)).await;
    let done = sent.load(Ordering::SeqCst);
    let buffered = eps[1].inbox().buffered_bytes();
    assert!(
        done < COUNT as usize,
        "all {COUNT} sends completed although nobody received"
    );
    assert!(!sender.is_finished(), "sender should be stalled");
    assert!(
        buffered <= BOUND + MSG,
        "receiver buffered {buffered} bytes, bound is {BOUND} (+ one frame)"
    );
    assert!(buffered > 0, "some messages should have arrived");
    for i in 0..COUNT {
        let m = eps[1]
            .recv(Rank(0), Tag::user(1), in_secs(60))
            .await
            .expect("recv");
        assert_eq!(m.len(), MSG);
        assert_eq!(m[..4], i.to_le_bytes(), "message {i} out of order");
        assert!(m[4..].iter().all(|&b| b == 0xa5), "message {i} corrupted");
        assert!(eps[1].inbox().buffered_bytes() <= BOUND + MSG);
    }
    tokio::time::timeout(Duration::from_secs(30), sender)
        .await
        .expect("sender finishes once the receiver drains")
        .expect("sender task");
}

/// A receive and the connection's reader task take turns at the socket while a stream of long
/// messages is held back by the bound. A receive that found the reader busy once used to wait
/// for a wake-up the socket had already given to it (the task stood aside for it), until its
/// deadline; it now comes back at once. The race is rare (a few in a hundred runs of ten
/// messages through the relay), so this test offers it many times with short deadlines.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receives_taking_turns_with_the_reader_task_never_stall() {
    const BOUND: usize = 256 << 10;
    const MSG: usize = 256 << 10;
    const COUNT: u32 = 400;
    let config = TcpConfig {
        unexpected_bound: BOUND,
        ..TcpConfig::default()
    };
    let eps: Vec<Arc<TcpChannel>> = local_world(job("turns"), 2, config)
        .await
        .expect("world")
        .into_iter()
        .map(Arc::new)
        .collect();
    let sender = {
        let ep = Arc::clone(&eps[0]);
        tokio::spawn(async move {
            let msg = vec![0x5au8; MSG];
            for i in 0..COUNT {
                ep.send(Rank(1), Tag::user(i), &msg, in_secs(60))
                    .await
                    .expect("send");
                if i % 16 == 0 {
                    // Let the receiver fall behind now and then, so the bound stops the reader.
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
        })
    };
    for i in 0..COUNT {
        if i % 32 == 0 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let m = eps[1]
            .recv(Rank(0), Tag::user(i), in_secs(5))
            .await
            .unwrap_or_else(|e| panic!("message {i}: {e}"));
        assert_eq!(m.len(), MSG, "message {i}");
    }
    tokio::time::timeout(Duration::from_secs(30), sender)
        .await
        .expect("sender finishes")
        .expect("sender task");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_from_another_job_or_bogus_rank_is_refused() {
    let eps = local_world(job("right"), 2, TcpConfig::default())
        .await
        .expect("world");
    let addr = eps[0].local_addr();
    // Wrong job id.
    let (mut s, status) = raw_handshake(addr, &hello("wrong", 1, 0)).await;
    assert_eq!(status, 2, "wrong job is refused");
    assert!(closed_by_peer(&mut s).await, "refused socket is closed");
    // A rank outside the job, the acceptor's own rank, a hello meant for another rank.
    for (from, to) in [(7, 0), (0, 0), (1, 1)] {
        let (mut s, status) = raw_handshake(addr, &hello("right", from, to)).await;
        assert_eq!(status, 3, "hello from {from} to {to} is refused");
        assert!(closed_by_peer(&mut s).await);
    }
    // Garbage instead of a hello: closed (the unread rest may turn the close into a reset).
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(b"GET / HTTP/1.1\r\n\r\n").await.expect("write");
    assert!(closed_by_peer(&mut s).await, "garbage is closed");

    // An endpoint of another job whose peer table points at rank 0 is refused as well.
    let binding = TcpChannel::bind(loopback()).await.expect("bind");
    let own = binding.local_addr();
    let stranger = TcpChannel::start(
        binding,
        job("wrong"),
        Rank(1),
        vec![addr, own],
        TcpConfig::default(),
    )
    .expect("start");
    let r = tokio::time::timeout(
        Duration::from_secs(5),
        stranger.send(Rank(0), Tag::user(0), b"x", in_secs(60)),
    )
    .await
    .expect("refusal is prompt");
    assert!(
        matches!(&r, Err(Error::Io { peer: Some(Rank(0)), channel: "tcp", source, .. })
            if source.kind() == std::io::ErrorKind::ConnectionRefused),
        "stranger's send: {r:?}"
    );
    let r = eps[0]
        .recv(
            Rank(1),
            Tag::user(0),
            Instant::now() + Duration::from_millis(300),
        )
        .await;
    assert!(
        matches!(r, Err(Error::Timeout { .. })),
        "nothing delivered: {r:?}"
    );

    // The refusals did not disturb the real pair.
    eps[1]
        .send(Rank(0), Tag::user(0), b"real", in_secs(10))
        .await
        .expect("send");
    let m = eps[0]
        .recv(Rank(1), Tag::user(0), in_secs(10))
        .await
        .expect("recv");
    assert_eq!(m, b"real");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_frames_follow_the_documented_layout_and_oversize_frames_lose_the_peer() {
    let config = TcpConfig {
        max_message: 1000,
        ..TcpConfig::default()
    };
    let eps = local_world(job("frames"), 3, config).await.expect("world");
    let addr = eps[0].local_addr();
    // Impersonate rank 2 (its endpoint is idle): a valid frame arrives as a message.
    let (mut s, status) = raw_handshake(addr, &hello("frames", 2, 0)).await;
    assert_eq!(status, 0, "accepted");
    s.write_all(&frame(Tag::user(5).0, b"hello"))
        .await
        .expect("write");
    let m = eps[0]
        .recv(Rank(2), Tag::user(5), in_secs(10))
        .await
        .expect("raw frame delivered");
    assert_eq!(m, b"hello");
    // A second connection for the same pair is refused as a duplicate.
    let (_dup, status) = raw_handshake(addr, &hello("frames", 2, 0)).await;
    assert_eq!(status, 1, "duplicate refused");
    // A frame announcing more than max_message is a protocol error: the peer is lost.
    let mut big = frame(Tag::user(5).0, b"");
    big[9..17].copy_from_slice(&1001u64.to_le_bytes());
    s.write_all(&big).await.expect("write");
    let r = eps[0].recv(Rank(2), Tag::user(5), in_secs(60)).await;
    assert!(
        matches!(r, Err(Error::PeerLost { peer: Rank(2), .. })),
        "{r:?}"
    );
    assert!(
        closed_by_peer(&mut s).await,
        "offending connection is closed"
    );
    // Sending too much is refused locally.
    let r = eps[1]
        .send(Rank(0), Tag::user(0), &[0u8; 1001], in_secs(10))
        .await;
    assert!(
        matches!(
            r,
            Err(Error::TooLarge {
                len: 1001,
                max: 1000,
                channel: "tcp"
            })
        ),
        "{r:?}"
    );
    assert_eq!(eps[1].capabilities().max_message, Some(1000));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_abandoned_mid_frame_poisons_only_its_connection() {
    let config = TcpConfig {
        unexpected_bound: 1,
        ..TcpConfig::default()
    };
    let eps = local_world(job("poison"), 3, config).await.expect("world");
    // Fill the receiver's buffer and the socket so that a large send stalls part-way.
    eps[0]
        .send(Rank(1), Tag::user(0), b"first", in_secs(10))
        .await
        .expect("first");
    assert!(
        eventually(Duration::from_secs(5), || eps[1].inbox().buffered_bytes()
            > 0)
        .await
    );
    let big = vec![7u8; 64 << 20];
    let r = eps[0]
        .send(
            Rank(1),
            Tag::user(0),
            &big,
            Instant::now() + Duration::from_millis(300),
        )
        .await;
    assert!(
        matches!(r, Err(Error::Timeout { peer: Rank(1), .. })),
        "{r:?}"
    );
    // The half-written frame closed the connection instead of corrupting the stream.
    let r = eps[0]
        .send(Rank(1), Tag::user(0), b"after", in_secs(10))
        .await;
    assert!(
        matches!(r, Err(Error::PeerLost { peer: Rank(1), .. })),
        "{r:?}"
    );
    let m = eps[1]
        .recv(Rank(0), Tag::user(0), in_secs(10))
        .await
        .expect("the complete message is kept");
    assert_eq!(m, b"first");
    let r = eps[1].recv(Rank(0), Tag::user(0), in_secs(60)).await;
    assert!(
        matches!(r, Err(Error::PeerLost { peer: Rank(0), .. })),
        "{r:?}"
    );
    // Other pairs are unaffected.
    eps[0]
        .send(Rank(2), Tag::user(0), b"ok", in_secs(10))
        .await
        .expect("0 -> 2");
    let m = eps[2]
        .recv(Rank(0), Tag::user(0), in_secs(10))
        .await
        .expect("recv");
    assert_eq!(m, b"ok");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dialing_a_silent_address_times_out_at_the_deadline() {
    // A port that was just free: nothing listens there.
    let dead = {
        let l = std::net::TcpListener::bind(loopback()).expect("bind");
        l.local_addr().expect("addr")
    };
    let binding = TcpChannel::bind(loopback()).await.expect("bind");
    let own = binding.local_addr();
    let ep = TcpChannel::start(
        binding,
        job("silent"),
        Rank(0),
        vec![own, dead],
        TcpConfig::default(),
    )
    .expect("start");
    let wait = Duration::from_millis(400);
    let started = Instant::now();
    let r = ep.send(Rank(1), Tag::user(0), b"x", started + wait).await;
    let took = started.elapsed();
    assert!(
        matches!(
            r,
            Err(Error::Timeout {
                peer: Rank(1),
                me: Rank(0),
                ..
            })
        ),
        "{r:?}"
    );
    assert!(took >= wait, "gave up early after {took:?}");
    assert!(
        took < wait + Duration::from_secs(2),
        "gave up late after {took:?}"
    );
    assert_eq!(ep.open_connections(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn self_sends_and_start_checks() {
    let eps = local_world(job("self"), 1, TcpConfig::default())
        .await
        .expect("world");
    eps[0]
        .send(Rank(0), Tag::user(1), b"me", in_secs(1))
        .await
        .expect("self send");
    let m = eps[0]
        .recv(Rank(0), Tag::user(1), in_secs(1))
        .await
        .expect("self recv");
    assert_eq!(m, b"me");
    assert_eq!(eps[0].name(), "tcp");
    assert_eq!(eps[0].size(), 1);

    let binding = TcpChannel::bind(loopback()).await.expect("bind");
    let addr = binding.local_addr();
    let r = TcpChannel::start(binding, job("x"), Rank(1), vec![addr], TcpConfig::default());
    assert!(
        matches!(
            r,
            Err(Error::InvalidRank {
                rank: Rank(1),
                size: 1
            })
        ),
        "{r:?}"
    );
    let binding = TcpChannel::bind(loopback()).await.expect("bind");
    let bad = TcpConfig {
        unexpected_bound: 0,
        ..TcpConfig::default()
    };
    let r = TcpChannel::start(binding, job("x"), Rank(0), vec![addr], bad);
    assert!(matches!(r, Err(Error::Config { .. })), "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_stops_listening_and_peers_see_the_loss() {
    let mut eps = local_world(job("close"), 2, TcpConfig::default())
        .await
        .expect("world");
    eps[1]
        .send(Rank(0), Tag::user(0), b"x", in_secs(10))
        .await
        .expect("connect");
    let _ = eps[0]
        .recv(Rank(1), Tag::user(0), in_secs(10))
        .await
        .expect("recv");
    let ep1 = eps.pop().expect("rank 1");
    let ep0 = eps.pop().expect("rank 0");
    let addr0 = ep0.local_addr();
    tokio::time::timeout(Duration::from_secs(5), ep0.close())
        .await
        .expect("close finishes");
    // The listener is gone: connecting is refused.
    assert!(TcpStream::connect(addr0).await.is_err(), "listener closed");
    let r = tokio::time::timeout(
        Duration::from_secs(5),
        ep1.recv(Rank(0), Tag::user(0), in_secs(60)),
    )
    .await
    .expect("loss noticed promptly");
    assert!(
        matches!(r, Err(Error::PeerLost { peer: Rank(0), .. })),
        "{r:?}"
    );
    assert!(
        eventually(Duration::from_secs(5), || ep1.open_connections() == 0).await,
        "rank 1 closed its side"
    );
}

/// The two ends of a spinning pair (a window long enough that a waiting receive catches every
/// message of a ping-pong with its plain reads), on separate runtimes' worth of tasks.
/// A `recv_into` of a long message waits `long_wait`, not just `spin`, before it sleeps, and
/// yields to the runtime while it waits: a send joined with it in one task still goes out, so
/// an exchange whose peer answers only once it has ours is caught within the window. A short
/// receive keeps the usual window. (Long waits, like busy transfers, need a core per rank.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_recv_into_waits_longer_and_lets_a_joined_send_run() {
    if fmi_channels::host_cores() < 2 {
        eprintln!("skipped: long waits need a core per rank");
        return;
    }
    const LONG: usize = 64 << 10;
    let config = TcpConfig {
        spin: Duration::from_micros(50),
        long_wait: Duration::from_secs(2),
        ..TcpConfig::default()
    };
    let eps: Vec<Arc<TcpChannel>> = local_world(job("long-wait"), 2, config)
        .await
        .expect("world")
        .into_iter()
        .map(Arc::new)
        .collect();
    let tag = Tag::user(4);
    eps[0]
        .send(Rank(1), tag, &[0], in_secs(30))
        .await
        .expect("hello");
    eps[1].recv(Rank(0), tag, in_secs(30)).await.expect("hello");
    let late = |delay_ms: u64, len: usize| {
        let ep = Arc::clone(&eps[1]);
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(delay_ms)).await;
            ep.send(Rank(0), tag, &vec![7u8; len], in_secs(30))
                .await
                .expect("late");
        })
    };
    let mut buf = vec![0u8; LONG];

    // 100 ms late: far past the 50 µs spin, well inside the 2 s wait.
    let before = spins(&eps[0]);
    let sender = late(100, LONG);
    let n = eps[0]
        .recv_into(Rank(1), tag, &mut buf, in_secs(30))
        .await
        .expect("late long message");
    sender.await.expect("sender");
    assert_eq!(n, LONG);
    assert!(buf.iter().all(|&b| b == 7));
    let after = spins(&eps[0]);
    assert_eq!(after[0], before[0] + 1, "caught: {before:?} -> {after:?}");
    assert_eq!(after[1], before[1], "not missed: {before:?} -> {after:?}");

    // An exchange in one task; the peer answers only once it has our message. Were the wait a
    // tight loop, our send would wait for its end, and the answer would miss the window.
    let echo = {
        let ep = Arc::clone(&eps[1]);
        tokio::spawn(async move {
            let got = ep.recv(Rank(0), tag, in_secs(30)).await.expect("echo recv");
            ep.send(Rank(0), tag, &got, in_secs(30))
                .await
                .expect("echo send");
        })
    };
    let out = vec![9u8; LONG];
    let before = spins(&eps[0]);
    let (got, sent) = tokio::join!(
        eps[0].recv_into(Rank(1), tag, &mut buf, in_secs(30)),
        eps[0].send(Rank(1), tag, &out, in_secs(30)),
    );
    sent.expect("send joined with the wait");
    assert_eq!(got.expect("answer"), LONG);
    assert!(buf.iter().all(|&b| b == 9));
    echo.await.expect("echo side");
    let after = spins(&eps[0]);
    assert_eq!(after[0], before[0] + 1, "caught: {before:?} -> {after:?}");
    assert_eq!(after[1], before[1], "not missed: {before:?} -> {after:?}");

    // A short receive keeps the 50 µs window: 100 ms late is a missed spin.
    let before = spins(&eps[0]);
    let sender = late(100, 8);
    let mut small = [0u8; 8];
    eps[0]
        .recv_into(Rank(1), tag, &mut small, in_secs(30))
        .await
        .expect("late short message");
    sender.await.expect("sender");
    let after = spins(&eps[0]);
    assert_eq!(after[1], before[1] + 1, "missed: {before:?} -> {after:?}");
}

async fn spinning_pair(name: &str) -> Vec<Arc<TcpChannel>> {
    let config = TcpConfig {
        spin: Duration::from_millis(20),
        ..TcpConfig::default()
    };
    local_world(job(name), 2, config)
        .await
        .expect("world")
        .into_iter()
        .map(Arc::new)
        .collect()
}

/// Small frames that a waiting `recv_into` catches while it spins go straight into its buffer
/// (a message exactly the buffer's size, one shorter), and the receive stops reading the moment
/// its message is in: the connection's reader task must then still be the one the socket wakes,
/// so a message sent while nobody receives is read into the inbox without any receive's help.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_frames_caught_by_a_spin_land_in_waiting_buffers() {
    const ROUNDS: u32 = 300;
    let eps = spinning_pair("spin-direct").await;
    let tag = Tag::user(8);
    let echo = {
        let ep = Arc::clone(&eps[1]);
        tokio::spawn(async move {
            let mut buf = [0u8; 8];
            for round in 0..ROUNDS {
                let n = ep
                    .recv_into(Rank(0), tag, &mut buf, in_secs(30))
                    .await
                    .expect("recv_into");
                let want = if round % 2 == 0 { 8 } else { 7 };
                assert_eq!(n, want, "round {round}: length");
                assert_eq!(&buf[..4], &round.to_le_bytes(), "round {round}: payload");
                ep.send(Rank(0), tag, &buf[..n], in_secs(30))
                    .await
                    .expect("echo");
            }
        })
    };
    let ep = &eps[0];
    let mut back = [0u8; 8];
    for round in 0..ROUNDS {
        let mut msg = [0xa5u8; 8];
        msg[..4].copy_from_slice(&round.to_le_bytes());
        let len = if round % 2 == 0 { 8 } else { 7 };
        ep.send(Rank(1), tag, &msg[..len], in_secs(30))
            .await
            .expect("send");
        let n = ep
            .recv_into(Rank(1), tag, &mut back, in_secs(30))
            .await
            .expect("recv_into back");
        assert_eq!(&back[..n], &msg[..len], "round {round}: echo");
    }
    tokio::time::timeout(Duration::from_secs(60), echo)
        .await
        .expect("echo side finishes")
        .expect("echo side");
    // Nobody receives now: the reader task alone must take this message in.
    eps[1]
        .send(Rank(0), Tag::user(9), &[1, 2, 3], in_secs(30))
        .await
        .expect("unexpected send");
    assert!(
        eventually(Duration::from_secs(10), || ep.inbox().buffered_bytes() == 3).await,
        "the reader task read the message nobody waited for"
    );
    let got = ep
        .recv(Rank(1), Tag::user(9), in_secs(5))
        .await
        .expect("buffered message");
    assert_eq!(got, vec![1, 2, 3]);
}

/// A waiting `recv_into` whose buffer is too short for a small frame gets the typed error
/// (counts in bytes, naming both ranks); the message is consumed and the next one is intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_frame_longer_than_the_waiting_buffer_is_a_count_mismatch() {
    let eps = spinning_pair("spin-too-long").await;
    let tag = Tag::user(3);
    for round in 0..20u8 {
        let recv = {
            let ep = Arc::clone(&eps[1]);
            tokio::spawn(async move {
                let mut short = [0u8; 4];
                let r = ep.recv_into(Rank(0), tag, &mut short, in_secs(30)).await;
                let mut fits = [0u8; 16];
                let n = ep
                    .recv_into(Rank(0), tag, &mut fits, in_secs(30))
                    .await
                    .expect("the next message");
                (r, fits[..n].to_vec())
            })
        };
        // Give the receive time to start spinning before the message comes (it is correct
        // either way; this way the spin is the path under test).
        tokio::time::sleep(Duration::from_millis(2)).await;
        eps[0]
            .send(Rank(1), tag, &[round; 9], in_secs(30))
            .await
            .expect("long send");
        eps[0]
            .send(Rank(1), tag, &[round, 1], in_secs(30))
            .await
            .expect("short send");
        let (r, next) = tokio::time::timeout(Duration::from_secs(30), recv)
            .await
            .expect("receives finish")
            .expect("receiver task");
        match r {
            Err(Error::CountMismatch {
                me,
                peer,
                what,
                expected,
                got,
            }) => {
                assert_eq!((me, peer), (Rank(1), Rank(0)));
                assert_eq!(what, fmi_channels::RECV_INTO_TOO_LONG);
                assert_eq!((expected, got), (4, 9));
            }
            other => panic!("round {round}: expected a count mismatch, got {other:?}"),
        }
        assert_eq!(next, vec![round, 1], "round {round}: the next message");
    }
}

/// `recv` and `recv_into` of one source and tag, mixed and overlapping, take the messages in
/// the order they were sent whether a spin catches them or they were buffered first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_recv_and_recv_into_keep_message_order() {
    const MSGS: u32 = 400;
    let eps = spinning_pair("spin-order").await;
    let tag = Tag::user(5);
    let sender = {
        let ep = Arc::clone(&eps[0]);
        tokio::spawn(async move {
            for i in 0..MSGS {
                ep.send(Rank(1), tag, &i.to_le_bytes(), in_secs(30))
                    .await
                    .expect("send");
                if i % 7 == 0 {
                    // Now and then a pause, so that some receives wait (and spin) for their
                    // message while others find theirs buffered.
                    tokio::time::sleep(Duration::from_micros(300)).await;
                }
            }
        })
    };
    let ep = &eps[1];
    let mut next = 0u32;
    while next < MSGS {
        match next % 3 {
            0 => {
                let got = ep.recv(Rank(0), tag, in_secs(30)).await.expect("recv");
                assert_eq!(got, next.to_le_bytes(), "recv of message {next}");
                next += 1;
            }
            1 => {
                let mut buf = [0u8; 4];
                let n = ep
                    .recv_into(Rank(0), tag, &mut buf, in_secs(30))
                    .await
                    .expect("recv_into");
                assert_eq!((n, buf), (4, next.to_le_bytes()), "recv_into of {next}");
                next += 1;
            }
            _ if next + 1 < MSGS => {
                // Two receives registered in call order, polled together.
                let mut buf = [0u8; 4];
                let (a, b) = tokio::join!(
                    ep.recv_into(Rank(0), tag, &mut buf, in_secs(30)),
                    ep.recv(Rank(0), tag, in_secs(30))
                );
                assert_eq!(a.expect("first"), 4);
                assert_eq!(buf, next.to_le_bytes(), "first of a pair, {next}");
                assert_eq!(
                    b.expect("second"),
                    (next + 1).to_le_bytes(),
                    "second of a pair"
                );
                next += 2;
            }
            _ => {
                let got = ep.recv(Rank(0), tag, in_secs(30)).await.expect("last");
                assert_eq!(got, next.to_le_bytes());
                next += 1;
            }
        }
    }
    tokio::time::timeout(Duration::from_secs(30), sender)
        .await
        .expect("sender finishes")
        .expect("sender");
}

/// The channel's `spins_*` counters of rank `ep`: caught, missed, skipped.
fn spins(ep: &TcpChannel) -> [u64; 3] {
    let c = ep.counters();
    let get = |name: &str| c.iter().find(|(n, _)| *n == name).map_or(0, |(_, v)| *v);
    [
        get("spins_caught"),
        get("spins_missed"),
        get("spins_skipped"),
    ]
}

/// The counters tell how receives waited: a message that comes long after the spin window is
/// a missed spin, the next two receives sleep at once (skipped, the back-off), and a receive
/// answered at once by an echoing peer is caught by its spin.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spin_counters_tell_how_receives_waited() {
    let eps = spinning_pair("spin-counters").await;
    let tag = Tag::user(3);
    // Connected first (the spin needs a connection to read).
    eps[0]
        .send(Rank(1), tag, &[0], in_secs(30))
        .await
        .expect("hello");
    eps[1].recv(Rank(0), tag, in_secs(30)).await.expect("hello");
    let late = |delay_ms: u64| {
        let ep = Arc::clone(&eps[1]);
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(delay_ms)).await;
            ep.send(Rank(0), tag, &[1], in_secs(30))
                .await
                .expect("late");
        })
    };
    let before = spins(&eps[0]);
    // 300 ms against a 20 ms window: spun in vain.
    let sender = late(300);
    eps[0]
        .recv(Rank(1), tag, in_secs(30))
        .await
        .expect("late 1");
    sender.await.expect("sender");
    let missed = spins(&eps[0]);
    assert_eq!(missed[1], before[1] + 1, "{before:?} -> {missed:?}");
    assert_eq!(missed[2], before[2], "{before:?} -> {missed:?}");
    // The back-off: the next two receives sleep at once.
    for i in 0..2 {
        let sender = late(50);
        eps[0]
            .recv(Rank(1), tag, in_secs(30))
            .await
            .expect("late 2");
        sender.await.expect("sender");
        let now = spins(&eps[0]);
        assert_eq!(now[2], before[2] + i + 1, "{before:?} -> {now:?}");
        assert_eq!(now[1], missed[1], "{before:?} -> {now:?}");
    }
    // A peer that echoes at once: some ping-pong's receive is caught by its spin.
    let echo = {
        let ep = Arc::clone(&eps[1]);
        tokio::spawn(async move {
            for _ in 0..20 {
                let got = ep.recv(Rank(0), tag, in_secs(30)).await.expect("echo recv");
                ep.send(Rank(0), tag, &got, in_secs(30))
                    .await
                    .expect("echo");
            }
        })
    };
    for _ in 0..20 {
        eps[0]
            .send(Rank(1), tag, &[2], in_secs(30))
            .await
            .expect("ping");
        eps[0].recv(Rank(1), tag, in_secs(30)).await.expect("pong");
    }
    echo.await.expect("echo side");
    let after = spins(&eps[0]);
    assert!(after[0] > missed[0], "{before:?} -> {after:?}");
}
