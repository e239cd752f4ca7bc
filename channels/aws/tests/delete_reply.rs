//! A take reads a value, then deletes it. If the delete is applied by the server but its
//! answer is lost (the connection breaks in between), the message must still be delivered
//! exactly once: the read is repeatable and only the delete is retried. (A take that read and
//! deleted in one request, like DynamoDB's DeleteItem returning the item, or that failed when
//! its delete failed, would find nothing on retry: the message would be lost.)
//!
//! Each test puts [`CutProxy`] (a TCP proxy on loopback) in front of the real server for the
//! receiving rank only and arms it to drop the answer to one delete request: DynamoDB's
//! `DeleteItem` or S3's `DELETE /bucket/key`. The server applies the delete; the receiver sees
//! a broken connection. Then the next message must arrive exactly once, nothing more arrives,
//! and nothing of the job is left on the server.

// Tests: a failure must panic loudly.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use fmi_channels::{Channel, Error, Instant, JobId, Rank, Tag};
use fmi_storage::testing::CutProxy;
use fmi_storage::{job_prefix, Mailbox, StorageChannel, StorageConfig};

fn job(name: &str) -> JobId {
    JobId::new(unique(name)).expect("job id")
}

/// Messages 0, 1, 2 from rank 0 (direct) to rank 1 (through the proxy); the answer to the
/// delete that follows the read of message 1 is lost.
async fn scenario(direct: Arc<dyn Mailbox>, cut: Arc<dyn Mailbox>, proxy: &CutProxy, job: JobId) {
    let scfg = StorageConfig::fast();
    let rank0 = StorageChannel::new(Arc::clone(&direct), job.clone(), Rank(0), 2, scfg.clone())
        .expect("rank 0");
    let rank1 = StorageChannel::new(cut, job.clone(), Rank(1), 2, scfg).expect("rank 1");
    let tag = Tag::user(3);
    for round in 0..3u32 {
        let m = payload(round, 1000 + round as usize);
        rank0
            .send(Rank(1), tag, &m, deadline())
            .await
            .expect("send");
        if round == 1 {
            proxy.arm();
        }
        let got = rank1.recv(Rank(0), tag, deadline()).await.expect("recv");
        assert_eq!(got, m, "message {round}");
    }
    assert_eq!(proxy.cuts(), 1, "one delete answer was dropped");
    let r = rank1
        .recv(Rank(0), tag, Instant::now() + Duration::from_millis(400))
        .await;
    assert!(
        matches!(r, Err(Error::Timeout { .. })),
        "a duplicate: {r:?}"
    );
    // A delete retried in the background may still be on its way: wait for it (bounded).
    let prefix = job_prefix(&job);
    let give_up = Instant::now() + Duration::from_secs(5);
    while !direct.list(&prefix).await.expect("list").is_empty() && Instant::now() < give_up {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_gone(&*direct, &prefix).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dynamodb_lost_delete_answer_loses_and_duplicates_nothing() {
    let endpoint = dynamo_endpoint();
    let proxy = CutProxy::start(addr_of(&endpoint), b"DynamoDB_20120810.DeleteItem")
        .await
        .expect("proxy");
    let direct: Arc<dyn Mailbox> = Arc::new(dynamo().await);
    let cut: Arc<dyn Mailbox> = Arc::new(
        dynamo_with(fmi_aws::DynamoConfig {
            endpoint: Some(format!("http://{}", proxy.addr())),
            ..dynamo_config()
        })
        .await,
    );
    scenario(direct, cut, &proxy, job("ddb-delcut")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_lost_delete_answer_loses_and_duplicates_nothing() {
    let endpoint = s3_endpoint();
    let proxy = CutProxy::start(addr_of(&endpoint), b"DELETE /")
        .await
        .expect("proxy");
    let config = s3_config("delcut");
    let direct: Arc<dyn Mailbox> = Arc::new(s3_with(config.clone()).await);
    let cut: Arc<dyn Mailbox> = Arc::new(
        s3_with(fmi_aws::S3Config {
            endpoint: Some(format!("http://{}", proxy.addr())),
            ..config
        })
        .await,
    );
    scenario(direct, cut, &proxy, job("s3-delcut")).await;
}

/// A message of exactly the multipart threshold (16 MiB) is one PutObject: the threshold is
/// compared with the payload, not with payload + the adapter's 13-byte header.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_message_of_the_threshold_size_is_one_put() {
    let config = s3_config("threshold");
    let threshold = config.multipart_threshold;
    let mb: Arc<dyn Mailbox> = Arc::new(s3_with(config).await);
    let job = job("s3-threshold");
    let scfg = StorageConfig::fast();
    let a = StorageChannel::new(Arc::clone(&mb), job.clone(), Rank(0), 2, scfg.clone())
        .expect("rank 0");
    let b = StorageChannel::new(Arc::clone(&mb), job.clone(), Rank(1), 2, scfg).expect("rank 1");
    let m = payload(7, threshold);
    let before = mb.stats().snapshot();
    a.send(Rank(1), Tag::user(1), &m, deadline())
        .await
        .expect("send");
    let after = mb.stats().snapshot();
    assert_eq!(
        after.puts - before.puts,
        1,
        "one PutObject, no multipart upload"
    );
    assert_eq!(
        b.recv(Rank(0), Tag::user(1), deadline())
            .await
            .expect("recv"),
        m
    );
    assert_gone(&*mb, &job_prefix(&job)).await;
}

/// The connect check (S3 HeadBucket, DynamoDB DescribeTable) whose answer is lost to a broken
/// connection is retried inside `connect`, so a server that blips while a function starts does
/// not fail it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_check_whose_answer_is_lost_is_retried() {
    let s3_proxy = CutProxy::start(addr_of(&s3_endpoint()), b"HEAD /")
        .await
        .expect("proxy");
    let config = s3_config("connect-retry");
    s3_with(config.clone()).await;
    s3_proxy.arm();
    let mb = fmi_aws::S3Mailbox::connect(fmi_aws::S3Config {
        endpoint: Some(format!("http://{}", s3_proxy.addr())),
        ..config
    })
    .await
    .expect("s3 connect, retried");
    assert_eq!(s3_proxy.cuts(), 1, "the first HeadBucket lost its answer");
    let s = mb.stats().snapshot();
    assert_eq!((s.gets, s.retries), (2, 1), "two HeadBuckets, one retry");

    let ddb_proxy = CutProxy::start(
        addr_of(&dynamo_endpoint()),
        b"DynamoDB_20120810.DescribeTable",
    )
    .await
    .expect("proxy");
    dynamo().await;
    ddb_proxy.arm();
    let mb = fmi_aws::DynamoMailbox::connect(fmi_aws::DynamoConfig {
        endpoint: Some(format!("http://{}", ddb_proxy.addr())),
        ..dynamo_config()
    })
    .await
    .expect("dynamodb connect, retried");
    assert_eq!(
        ddb_proxy.cuts(),
        1,
        "the first DescribeTable lost its answer"
    );
    assert_eq!(mb.stats().snapshot().retries, 1);
}
