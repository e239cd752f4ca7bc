//! The adapter's own logic (chunking, ordering, retries, partial messages, native collectives)
//! over the **in-memory test double** `fmi_storage::testing::InMemoryMailbox`. These tests run
//! without any server and prove nothing about a real backend; `tests/redis.rs` does that.

// Tests: a failure must panic loudly.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::sync::Arc;
use std::time::Duration;

use fmi_channels::{conformance, Channel, Error, Instant, JobId, Rank, Tag};
use fmi_storage::testing::{Faults, FlakyMailbox, InMemoryMailbox};
use fmi_storage::{cleanup_job, job_prefix, Mailbox, MailboxLimits, StorageChannel, StorageConfig};

fn deadline() -> Instant {
    Instant::now() + Duration::from_secs(30)
}

fn payload(seed: u32, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) as u8)
        .collect()
}

fn job(name: &str) -> JobId {
    JobId::new(name).expect("valid job id")
}

/// `n` channels of one job over one shared mailbox.
fn world(
    mb: &Arc<dyn Mailbox>,
    job: &JobId,
    n: u32,
    cfg: &StorageConfig,
) -> Vec<Arc<StorageChannel>> {
    (0..n)
        .map(|r| {
            Arc::new(
                StorageChannel::new(Arc::clone(mb), job.clone(), Rank(r), n, cfg.clone())
                    .expect("channel"),
            )
        })
        .collect()
}

fn as_dyn(w: Vec<Arc<StorageChannel>>) -> Vec<Arc<dyn Channel>> {
    w.into_iter().map(|c| c as Arc<dyn Channel>).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_over_a_poll_mailbox_with_small_chunks() {
    let mem = InMemoryMailbox::new(MailboxLimits::new(64 << 10, false), false);
    let mb: Arc<dyn Mailbox> = mem.clone();
    conformance::run_all(|n| {
        let mb = Arc::clone(&mb);
        async move {
            Ok(as_dyn(world(
                &mb,
                &job("conf-poll"),
                n,
                &StorageConfig::fast(),
            )))
        }
    })
    .await;
    assert!(mem.keys().is_empty(), "leftover keys: {:?}", mem.keys());
    let s = mem.stats().snapshot();
    assert!(s.empty_gets > 0, "a poll mailbox polls");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_over_a_push_mailbox() {
    let mem = InMemoryMailbox::new(MailboxLimits::new(1 << 20, true), true);
    let mb: Arc<dyn Mailbox> = mem.clone();
    conformance::run_all(|n| {
        let mb = Arc::clone(&mb);
        async move {
            Ok(as_dyn(world(
                &mb,
                &job("conf-push"),
                n,
                &StorageConfig::fast(),
            )))
        }
    })
    .await;
    assert!(mem.keys().is_empty(), "leftover keys: {:?}", mem.keys());
}

#[tokio::test]
async fn chunks_respect_the_limit_and_are_reassembled_in_order() {
    // The double rejects values above max_value, so a chunk that is too big fails the send.
    let mem = InMemoryMailbox::new(MailboxLimits::new(100, true), false);
    let mb: Arc<dyn Mailbox> = mem.clone();
    let w = world(&mb, &job("chunks"), 2, &StorageConfig::fast());
    let sizes = [0usize, 1, 86, 87, 88, 100, 187, 188, 1000, 12_345];
    for (i, &len) in sizes.iter().enumerate() {
        w[0].send(Rank(1), Tag::user(1), &payload(i as u32, len), deadline())
            .await
            .expect("send");
    }
    for (i, &len) in sizes.iter().enumerate() {
        let m = w[1]
            .recv(Rank(0), Tag::user(1), deadline())
            .await
            .expect("recv");
        assert!(m == payload(i as u32, len), "message {i} of {len} bytes");
    }
    assert!(mem.keys().is_empty(), "leftover keys: {:?}", mem.keys());
    // 87 payload bytes fit in chunk 0 (100 - 13 header bytes); 88 need a second chunk.
    let chunks: u64 = sizes
        .iter()
        .map(|&l| {
            if l <= 87 {
                1
            } else {
                1 + (l as u64 - 87).div_ceil(100)
            }
        })
        .sum();
    let s = mem.stats().snapshot();
    assert_eq!(s.puts, chunks, "one put per chunk");
    assert_eq!(
        s.gets, chunks,
        "one take per chunk, never empty on a push mailbox"
    );
    assert_eq!(s.empty_gets, 0);
}

#[tokio::test]
async fn a_chunk_size_without_room_for_the_header_is_a_config_error() {
    let mem = InMemoryMailbox::new(MailboxLimits::new(13, false), false);
    let r = StorageChannel::new(mem, job("tiny"), Rank(0), 1, StorageConfig::fast());
    assert!(matches!(r, Err(Error::Config { .. })), "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retried_requests_deliver_exactly_once() {
    let mem = InMemoryMailbox::new(MailboxLimits::new(256, false), false);
    let flaky = FlakyMailbox::new(
        mem.clone(),
        Faults {
            put_after: true,
            take_before: true,
            get_before: true,
        },
    );
    let mb: Arc<dyn Mailbox> = flaky.clone();
    let the_job = job("flaky");
    let w = world(&mb, &the_job, 2, &StorageConfig::fast());
    let size = |i: u32| (i as usize * 97) % 1500;

    // Sequential: every send (each put applied, reported failed and retried) completes before
    // the receiver starts. Nothing is duplicated and nothing is left behind.
    for i in 0..20u32 {
        w[0].send(Rank(1), Tag::user(4), &payload(i, size(i)), deadline())
            .await
            .expect("send");
    }
    for i in 0..20u32 {
        let m = w[1]
            .recv(Rank(0), Tag::user(4), deadline())
            .await
            .expect("recv");
        assert!(m == payload(i, size(i)), "message {i}");
    }
    assert!(mem.keys().is_empty(), "leftover keys: {:?}", mem.keys());

    // Concurrent: the receiver may consume a chunk between a put and its retry, which then
    // recreates a key nobody reads (the documented corner). Delivery is still exactly once.
    let a = Arc::clone(&w[0]);
    let sender = tokio::spawn(async move {
        for i in 0..20u32 {
            a.send(Rank(1), Tag::user(5), &payload(i, size(i)), deadline())
                .await
                .expect("send");
        }
    });
    for i in 0..20u32 {
        let m = w[1]
            .recv(Rank(0), Tag::user(5), deadline())
            .await
            .expect("recv");
        assert!(m == payload(i, size(i)), "message {i}");
    }
    sender.await.expect("sender");
    for tag in [4, 5] {
        let r = w[1]
            .recv(
                Rank(0),
                Tag::user(tag),
                Instant::now() + Duration::from_millis(100),
            )
            .await;
        assert!(
            matches!(r, Err(Error::Timeout { .. })),
            "no extra message: {r:?}"
        );
    }
    let left = mem.keys();
    assert!(
        left.iter()
            .all(|k| k.ends_with("/0") && k.contains("/m/0/1/")),
        "{left:?}"
    );
    let removed = cleanup_job(mem.as_ref(), &the_job).await.expect("cleanup");
    assert_eq!(removed, left.len());
    assert!(mem.keys().is_empty());
    let s = mem.stats().snapshot();
    assert!(
        flaky.injected() > 40,
        "faults injected: {}",
        flaky.injected()
    );
    assert_eq!(
        s.retries,
        flaky.injected(),
        "every injected fault was retried once"
    );
}

#[tokio::test]
async fn corrupt_messages_become_typed_io_errors() {
    // A key in the message layout without a valid header: the receive fails with Error::Io
    // naming both ranks and the channel, and the receiver moves on to the next message.
    let mem = InMemoryMailbox::new(MailboxLimits::new(1000, false), false);
    let w = world(
        &(mem.clone() as Arc<dyn Mailbox>),
        &job("io"),
        2,
        &StorageConfig::fast(),
    );
    mem.put(
        "fmi/io/m/0/1/0000000000000002/0000000000000000/0",
        b"not a header",
    )
    .await
    .expect("put");
    let r = w[1].recv(Rank(0), Tag::user(2), deadline()).await;
    match r {
        Err(Error::Io {
            me, peer, channel, ..
        }) => {
            assert_eq!((me, peer, channel), (Rank(1), Some(Rank(0)), "memory"));
        }
        other => panic!("expected Io, got {other:?}"),
    }
    // The sender's own message 0 lands after the corrupt one was consumed; message 1 is next.
    w[0].send(Rank(1), Tag::user(2), b"zero", deadline())
        .await
        .expect("send");
    w[0].send(Rank(1), Tag::user(2), b"next", deadline())
        .await
        .expect("send");
    let m = w[1]
        .recv(Rank(0), Tag::user(2), deadline())
        .await
        .expect("recv");
    assert_eq!(m, b"next");
}

#[tokio::test]
async fn a_timed_out_receiver_hands_its_chunks_to_the_next() {
    let mem = InMemoryMailbox::new(MailboxLimits::new(100, false), false);
    let mb: Arc<dyn Mailbox> = mem.clone();
    let w = world(&mb, &job("partial"), 2, &StorageConfig::fast());
    // Store a 2-chunk message by hand, chunk 1 missing, as if the sender were slow.
    let data = payload(7, 150);
    let sender = StorageChannel::new(
        InMemoryMailbox::new(MailboxLimits::new(100, false), false),
        job("partial"),
        Rank(0),
        2,
        StorageConfig::fast(),
    )
    .expect("channel");
    sender
        .send(Rank(1), Tag::user(3), &data, deadline())
        .await
        .expect("send");
    let other = sender.mailbox();
    let base = format!(
        "{}m/0/1/{:016x}/{:016x}/",
        job_prefix(&job("partial")),
        3,
        0
    );
    let c0 = other
        .take(&format!("{base}0"), Instant::now())
        .await
        .expect("take")
        .expect("c0");
    let c1 = other
        .take(&format!("{base}1"), Instant::now())
        .await
        .expect("take")
        .expect("c1");
    mem.put(&format!("{base}0"), &c0).await.expect("put");
    let r = w[1]
        .recv(
            Rank(0),
            Tag::user(3),
            Instant::now() + Duration::from_millis(100),
        )
        .await;
    assert!(
        matches!(r, Err(Error::Timeout { peer: Rank(0), .. })),
        "{r:?}"
    );
    assert_eq!(mem.keys(), Vec::<String>::new(), "chunk 0 was consumed");
    mem.put(&format!("{base}1"), &c1).await.expect("put");
    let m = w[1]
        .recv(Rank(0), Tag::user(3), deadline())
        .await
        .expect("recv");
    assert!(m == data, "the next receiver completes the message");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn native_bcast_and_barrier_with_five_ranks() {
    let mem = InMemoryMailbox::new(MailboxLimits::new(64, true), true);
    let mb: Arc<dyn Mailbox> = mem.clone();
    let w = world(&mb, &job("native"), 5, &StorageConfig::fast());
    assert!(w[0].capabilities().native_bcast && w[0].capabilities().native_barrier);
    let mut tasks = Vec::new();
    for ch in w.clone() {
        tasks.push(tokio::spawn(async move {
            let nc = ch.native_collectives().expect("native collectives");
            for (op, len) in [0usize, 10, 51, 52, 500].into_iter().enumerate() {
                let root = Rank(op as u32 % 5);
                let data = payload(op as u32, len);
                let mine = (ch.rank() == root).then_some(&data[..]);
                let tag = Tag::collective(op as u64);
                let got = nc
                    .bcast(root, tag, mine, deadline())
                    .expect("offered")
                    .await;
                assert!(got.expect("bcast") == data, "bcast {op}");
                let tag = Tag::collective(100 + op as u64);
                nc.barrier(tag, deadline())
                    .expect("offered")
                    .await
                    .expect("barrier");
            }
        }));
    }
    for t in tasks {
        t.await.expect("rank");
    }
    assert!(mem.keys().is_empty(), "leftover keys: {:?}", mem.keys());
}

#[tokio::test]
async fn without_counters_collectives_fall_back_to_messages() {
    let mem = InMemoryMailbox::new(MailboxLimits::new(1000, false), false);
    let w = world(
        &(mem as Arc<dyn Mailbox>),
        &job("nocounter"),
        3,
        &StorageConfig::fast(),
    );
    assert!(w[1].native_collectives().is_none());
    let c = w[1].capabilities();
    assert!(!c.native_bcast && !c.native_barrier && !c.push && c.max_message.is_none());
    let off = StorageConfig {
        native_bcast: false,
        ..StorageConfig::fast()
    };
    let mem = InMemoryMailbox::new(MailboxLimits::new(1000, true), true);
    let w = world(&(mem as Arc<dyn Mailbox>), &job("bcastoff"), 3, &off);
    let nc = w[0].native_collectives().expect("barrier still offered");
    assert!(nc
        .bcast(Rank(0), Tag::collective(1), Some(b"x"), deadline())
        .is_none());
}

#[tokio::test]
async fn a_cancelled_receive_does_not_lose_the_message() {
    let mem = InMemoryMailbox::new(MailboxLimits::new(1000, true), false);
    let w = world(
        &(mem as Arc<dyn Mailbox>),
        &job("cancel"),
        2,
        &StorageConfig::fast(),
    );
    let first = w[1].recv(Rank(0), Tag::user(1), deadline());
    let r = tokio::time::timeout(Duration::from_millis(50), first).await;
    assert!(r.is_err(), "nothing sent yet");
    w[0].send(Rank(1), Tag::user(1), b"kept", deadline())
        .await
        .expect("send");
    let m = w[1]
        .recv(Rank(0), Tag::user(1), deadline())
        .await
        .expect("recv");
    assert_eq!(m, b"kept");
}

#[tokio::test]
async fn polls_back_off_up_to_the_maximum() {
    let mem = InMemoryMailbox::new(MailboxLimits::new(1000, false), false);
    let w = world(
        &(mem.clone() as Arc<dyn Mailbox>),
        &job("backoff"),
        2,
        &StorageConfig::fast(),
    );
    let r = w[1]
        .recv(
            Rank(0),
            Tag::user(1),
            Instant::now() + Duration::from_secs(1),
        )
        .await;
    assert!(matches!(r, Err(Error::Timeout { .. })));
    // 5, 10, 20, 40, 80, 160, 200, 200, ... ms: about 10 polls in one second, never hundreds.
    let polls = mem.stats().snapshot().empty_gets;
    assert!((6..=14).contains(&polls), "{polls} polls in 1 s");
}
