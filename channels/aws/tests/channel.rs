//! S3 and DynamoDB as fmi channels: `fmi_storage::StorageChannel` over each mailbox, against
//! the real local servers, through the channel conformance suite and 5-rank collectives, and their request counters
//! against what the servers were sent.

// Tests: a failure must panic loudly.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

mod common;

use std::sync::{Arc, Mutex};

use common::*;
use fmi_aws::{DynamoMailbox, S3Config, S3Mailbox};
use fmi_channels::{conformance, Channel, JobId, Rank, Tag};
use fmi_collectives::Ctx;
use fmi_storage::testing::CountingProxy;
use fmi_storage::{cleanup_job, job_prefix, Mailbox, StorageChannel, StorageConfig};

fn fresh_job(name: &str) -> JobId {
    JobId::new(unique(name)).expect("valid job id")
}

/// `n` ranks of `job`, each with its own mailbox (own client), like separate functions.
fn world(job: &JobId, mailboxes: Vec<Arc<dyn Mailbox>>) -> Vec<Arc<StorageChannel>> {
    let n = mailboxes.len() as u32;
    mailboxes
        .into_iter()
        .enumerate()
        .map(|(r, mb)| {
            Arc::new(
                StorageChannel::new(mb, job.clone(), Rank(r as u32), n, StorageConfig::fast())
                    .expect("storage channel"),
            )
        })
        .collect()
}

async fn s3_mailboxes(config: &S3Config, n: u32) -> Vec<Arc<dyn Mailbox>> {
    let mut v: Vec<Arc<dyn Mailbox>> = Vec::new();
    for _ in 0..n {
        v.push(Arc::new(
            S3Mailbox::connect(config.clone()).await.expect("s3"),
        ));
    }
    v
}

async fn dynamo_mailboxes(n: u32) -> Vec<Arc<dyn Mailbox>> {
    let mut v: Vec<Arc<dyn Mailbox>> = Vec::new();
    for _ in 0..n {
        v.push(Arc::new(
            DynamoMailbox::connect(dynamo_config())
                .await
                .expect("dynamodb"),
        ));
    }
    v
}

/// Nothing of `job` is left: a job that ends normally cleans up after itself.
async fn assert_job_clean(mailbox: &dyn Mailbox, job: &JobId) {
    assert_gone(mailbox, &job_prefix(job)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_over_s3() {
    let config = s3_config("conf");
    let probe = s3_with(config.clone()).await;
    let jobs = Mutex::new(Vec::new());
    conformance::run_all(|n| {
        let job = fresh_job("conf");
        jobs.lock().unwrap().push(job.clone());
        let config = config.clone();
        async move {
            let w = world(&job, s3_mailboxes(&config, n).await);
            Ok(w.into_iter().map(|c| c as Arc<dyn Channel>).collect())
        }
    })
    .await;
    for job in jobs.into_inner().unwrap() {
        assert_job_clean(&probe, &job).await;
    }
    clean(&probe, "").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_over_dynamodb() {
    let probe = dynamo().await;
    let jobs = Mutex::new(Vec::new());
    conformance::run_all(|n| {
        let job = fresh_job("conf");
        jobs.lock().unwrap().push(job.clone());
        async move {
            let w = world(&job, dynamo_mailboxes(n).await);
            Ok(w.into_iter().map(|c| c as Arc<dyn Channel>).collect())
        }
    })
    .await;
    for job in jobs.into_inner().unwrap() {
        assert_job_clean(&probe, &job).await;
    }
}

/// Five ranks: three broadcasts from different roots (empty, small, several chunks), a gather
/// of blocks of different lengths, then a barrier that nobody leaves before the last rank
/// arrived.
async fn bcast_and_barrier(w: Vec<Arc<StorageChannel>>, chunked: usize) {
    let sizes = [0usize, 100, chunked];
    let arrivals = Arc::new(Mutex::new(Vec::new()));
    let config = fmi_collectives::Config::default();
    let mut tasks = Vec::new();
    for ch in w {
        let arrivals = Arc::clone(&arrivals);
        let config = config.clone();
        tasks.push(tokio::spawn(async move {
            for (op, &len) in sizes.iter().enumerate() {
                let root = Rank(op as u32 + 1);
                let data = payload(op as u32, len);
                let ctx = Ctx {
                    channel: &*ch,
                    tag: Tag::collective(op as u64),
                    deadline: deadline(),
                    config: &config,
                };
                let mine = (ch.rank() == root).then_some(&data[..]);
                let got = fmi_collectives::bcast(&ctx, root, mine)
                    .await
                    .expect("bcast");
                assert!(got == data, "rank {}: bcast {op}", ch.rank());
            }
            // Gather of blocks of different lengths (several chunks for the larger ones) at
            // rank 2: natively where the backend has counters (no listing), else by the tree.
            let block = payload(100 + ch.rank().0, 10 + 900 * ch.rank().0 as usize);
            let ctx = Ctx {
                channel: &*ch,
                tag: Tag::collective(50),
                deadline: deadline(),
                config: &config,
            };
            let got = fmi_collectives::gatherv(&ctx, Rank(2), &block)
                .await
                .expect("gather");
            if ch.rank() == Rank(2) {
                let got = got.expect("the root gets the blocks");
                assert_eq!(got.len(), 5);
                for (r, b) in got.iter().enumerate() {
                    assert!(
                        *b == payload(100 + r as u32, 10 + 900 * r),
                        "gather: block of rank {r}"
                    );
                }
            } else {
                assert!(
                    got.is_none(),
                    "rank {}: only the root gets blocks",
                    ch.rank()
                );
            }
            tokio::time::sleep(std::time::Duration::from_millis(
                50 * u64::from(ch.rank().0),
            ))
            .await;
            let arrived = tokio::time::Instant::now();
            let ctx = Ctx {
                channel: &*ch,
                tag: Tag::collective(99),
                deadline: deadline(),
                config: &config,
            };
            fmi_collectives::barrier(&ctx).await.expect("barrier");
            arrivals
                .lock()
                .unwrap()
                .push((arrived, tokio::time::Instant::now()));
        }));
    }
    for t in tasks {
        t.await.expect("rank");
    }
    let arrivals = arrivals.lock().unwrap().clone();
    let last_in = arrivals.iter().map(|a| a.0).max().expect("five ranks");
    for (_, left) in &arrivals {
        assert!(
            *left >= last_in,
            "a rank left the barrier before the last arrived"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_ranks_bcast_and_barrier_over_s3() {
    // Small values so that the third broadcast is several chunks.
    let config = S3Config {
        max_value: 1024,
        ..s3_config("coll")
    };
    let probe = s3_with(config.clone()).await;
    let job = fresh_job("coll");
    let w = world(&job, s3_mailboxes(&config, 5).await);
    assert!(
        w[0].native_collectives().is_none() || !w[0].capabilities().native_bcast,
        "S3 has no counters: point-to-point collectives"
    );
    bcast_and_barrier(w, 3000).await;
    assert_job_clean(&probe, &job).await;
    assert_eq!(cleanup_job(&probe, &job).await.expect("cleanup"), 0);
    clean(&probe, "").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_ranks_bcast_and_barrier_over_dynamodb() {
    let probe = dynamo().await;
    let job = fresh_job("coll");
    let mut mailboxes: Vec<Arc<dyn Mailbox>> = Vec::new();
    for _ in 0..5 {
        mailboxes.push(Arc::new(
            DynamoMailbox::connect(fmi_aws::DynamoConfig {
                max_value: 1024,
                ..dynamo_config()
            })
            .await
            .expect("dynamodb"),
        ));
    }
    let w = world(&job, mailboxes);
    assert!(
        w[0].capabilities().native_bcast && w[0].capabilities().native_barrier,
        "DynamoDB has counters: storage-native broadcast and barrier"
    );
    bcast_and_barrier(w.clone(), 3000).await;
    assert_job_clean(&probe, &job).await;
    // Native broadcast: the root writes each chunk once and every other rank reads it.
    let puts: u64 = w.iter().map(|c| c.stats().puts).sum();
    let counters: u64 = w.iter().map(|c| c.stats().counters).sum();
    assert!(counters > 0, "native collectives use UpdateItem ADD");
    let lists: u64 = w.iter().map(|c| c.stats().lists).sum();
    assert_eq!(lists, 0, "no collective lists keys");
    let gets: u64 = w.iter().map(|c| c.stats().gets).sum();
    let empty: u64 = w.iter().map(|c| c.stats().empty_gets).sum();
    eprintln!("dynamodb: {gets} gets ({empty} empty)");
    eprintln!("dynamodb 5-rank bcast ×3 + barrier: {puts} puts, {counters} counter updates");
}

/// DynamoDB's counters record who arrived (a number set beside the count), so a barrier or
/// gather that times out names the rank that never came.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dynamodb_barrier_and_gather_timeouts_name_the_missing_rank() {
    use fmi_channels::{Error, Instant, NativeCollectives};
    use std::time::Duration;
    let job = fresh_job("dyn-blame");
    let w = world(&job, dynamo_mailboxes(3).await);
    let short = || Instant::now() + Duration::from_millis(600);
    // Rank 1 never enters the barrier.
    let (a, b) = (Arc::clone(&w[0]), Arc::clone(&w[2]));
    let (ra, rb) = tokio::join!(
        async move {
            a.barrier(Tag::collective(1), short())
                .expect("native")
                .await
        },
        async move {
            b.barrier(Tag::collective(1), short())
                .expect("native")
                .await
        },
    );
    for (r, res) in [(0u32, ra), (2, rb)] {
        match res {
            Err(Error::Timeout { me, peer, .. }) => assert_eq!((me, peer), (Rank(r), Rank(1))),
            other => panic!("barrier at rank {r}: {other:?}"),
        }
    }
    // Rank 2 contributes to a gather at root 0; rank 1 does not.
    let far = Instant::now() + Duration::from_secs(30);
    w[2].gather(Rank(0), Tag::collective(2), b"block", far)
        .expect("native gather")
        .await
        .expect("contribute");
    match w[0]
        .gather(Rank(0), Tag::collective(2), b"root", short())
        .expect("native gather")
        .await
    {
        Err(Error::Timeout { me, peer, .. }) => assert_eq!((me, peer), (Rank(0), Rank(1))),
        other => panic!("gather root: {other:?}"),
    }
    let probe = dynamo_mailboxes(1).await.remove(0);
    cleanup_job(&*probe, &job).await.expect("cleanup");
}

/// Sums one request counter over the ranks' mailboxes.
fn total(w: &[Arc<StorageChannel>], counter: fn(&fmi_storage::StatsSnapshot) -> u64) -> u64 {
    w.iter().map(|c| counter(&c.stats())).sum()
}

/// The request counters of S3 mailboxes, which the cost ledger prices (`fmi run --report`),
/// equal the requests s3s-fs was sent, counted by a proxy in front of it: 5 ranks, three
/// broadcasts (one of several chunks), a gather and a barrier, all point to point over S3.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_request_counters_match_what_the_server_saw() {
    let proxy = CountingProxy::start(addr_of(&s3_endpoint()))
        .await
        .expect("proxy");
    let direct = S3Config {
        max_value: 1024,
        ..s3_config("ledger")
    };
    let probe = s3_with(direct.clone()).await;
    let via_proxy = S3Config {
        endpoint: Some(format!("http://{}", proxy.addr())),
        ..direct
    };
    let job = fresh_job("ledger");
    let w = world(&job, s3_mailboxes(&via_proxy, 5).await);
    bcast_and_barrier(w.clone(), 3000).await;
    assert_job_clean(&probe, &job).await;
    let seen = proxy.counts();
    let n = |op: &str| seen.get(op).copied().unwrap_or(0);
    // Connecting is one HeadBucket per rank, counted (and billed) as a GET.
    assert_eq!(n("HeadBucket"), 5, "{seen:?}");
    assert_eq!(total(&w, |s| s.puts), n("PutObject"), "puts: {seen:?}");
    assert_eq!(
        total(&w, |s| s.gets),
        n("GetObject") + n("HeadBucket"),
        "gets (polls that found nothing included): {seen:?}"
    );
    assert_eq!(total(&w, |s| s.deletes), n("DeleteObject"), "{seen:?}");
    assert_eq!(total(&w, |s| s.lists), n("ListObjects"), "{seen:?}");
    let known = n("HeadBucket") + n("PutObject") + n("GetObject") + n("DeleteObject");
    let all: u64 = seen.values().sum();
    assert_eq!(all, known + n("ListObjects"), "no other requests: {seen:?}");
    assert!(
        n("PutObject") > 0 && n("GetObject") >= n("PutObject"),
        "{seen:?}"
    );
}

/// The same for DynamoDB (dynalite), whose broadcast and barrier are storage-native (atomic
/// counters): every PutItem, GetItem, DeleteItem, BatchWriteItem and UpdateItem is counted once; DescribeTable
/// at connect is a free control-plane call and is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dynamodb_request_counters_match_what_the_server_saw() {
    let proxy = CountingProxy::start(addr_of(&dynamo_endpoint()))
        .await
        .expect("proxy");
    let probe = dynamo().await;
    let mut mailboxes: Vec<Arc<dyn Mailbox>> = Vec::new();
    for _ in 0..5 {
        mailboxes.push(Arc::new(
            DynamoMailbox::connect(fmi_aws::DynamoConfig {
                max_value: 1024,
                endpoint: Some(format!("http://{}", proxy.addr())),
                ..dynamo_config()
            })
            .await
            .expect("dynamodb"),
        ));
    }
    let job = fresh_job("ledger");
    let w = world(&job, mailboxes);
    bcast_and_barrier(w.clone(), 3000).await;
    assert_job_clean(&probe, &job).await;
    let seen = proxy.counts();
    let n = |op: &str| seen.get(op).copied().unwrap_or(0);
    assert_eq!(n("DescribeTable"), 5, "one per rank at connect: {seen:?}");
    assert_eq!(total(&w, |s| s.puts), n("PutItem"), "puts: {seen:?}");
    assert_eq!(total(&w, |s| s.gets), n("GetItem"), "gets: {seen:?}");
    // Deletes are DeleteItem (a take) or BatchWriteItem (the gather root removing the blocks,
    // up to 25 keys per request; its write units count per item).
    assert_eq!(
        total(&w, |s| s.deletes),
        n("DeleteItem") + n("BatchWriteItem"),
        "deletes: {seen:?}"
    );
    assert_eq!(
        total(&w, |s| s.counters),
        n("UpdateItem"),
        "counters: {seen:?}"
    );
    assert_eq!(
        total(&w, |s| s.lists),
        n("Query") + n("Scan"),
        "lists: {seen:?}"
    );
    let all: u64 = seen.values().sum();
    let known = [
        "DescribeTable",
        "PutItem",
        "GetItem",
        "DeleteItem",
        "BatchWriteItem",
        "UpdateItem",
        "Query",
        "Scan",
    ]
    .iter()
    .map(|op| n(op))
    .sum::<u64>();
    assert_eq!(all, known, "no other requests: {seen:?}");
    assert!(n("UpdateItem") > 0, "native collectives: {seen:?}");
}
