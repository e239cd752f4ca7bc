//! The S3 mailbox against a **real** S3 server (s3s-fs from `scripts/services.sh`).
//!
//! Each test works under its own key prefix of the shared test bucket and checks at the end
//! that the prefix is empty.

// Tests: a failure must panic loudly.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

mod common;

use common::*;
use fmi_aws::{S3Config, S3Mailbox, MIN_PART_SIZE};
use fmi_storage::Mailbox;
use futures::{StreamExt, TryStreamExt};

#[tokio::test]
async fn every_operation_round_trips() {
    let mb = s3("ops").await;
    assert_eq!(mb.name(), "s3");
    let limits = mb.limits();
    assert_eq!(limits.max_value, 64 * 1024 * 1024);
    assert!(!limits.push, "S3 is polled");
    assert!(mb.incr("n", 1).is_none(), "S3 has no atomic counter");

    let before = mb.stats().snapshot();
    mb.put("a/1", b"hello").await.expect("put");
    mb.put("a/2", b"").await.expect("put empty");
    mb.put("b/1", &payload(1, 70_000)).await.expect("put 70 kB");

    assert_eq!(
        mb.get("a/1").await.expect("get").as_deref(),
        Some(&b"hello"[..])
    );
    assert_eq!(mb.get("a/2").await.expect("get").as_deref(), Some(&b""[..]));
    let mut a = mb.list("a/").await.expect("list");
    a.sort();
    assert_eq!(a, ["a/1", "a/2"], "list is prefix-scoped");
    assert_eq!(mb.list("").await.expect("list all").len(), 3);

    assert_eq!(
        mb.take("b/1", deadline()).await.expect("take"),
        Some(payload(1, 70_000))
    );
    assert_eq!(mb.get("b/1").await.expect("get"), None, "take removed it");

    // Overwrite: the same key twice stores the latest value once.
    mb.put("a/1", b"again").await.expect("put again");
    assert_eq!(
        mb.get("a/1").await.expect("get").as_deref(),
        Some(&b"again"[..])
    );

    mb.delete(&["a/1".to_owned(), "a/2".to_owned(), "never/was".to_owned()])
        .await
        .expect("delete, including a missing key");
    assert_gone(&mb, "").await;

    let s = mb.stats().snapshot();
    assert_eq!(s.puts - before.puts, 4);
    // get ×4 (one empty), take's GET, final get of a/1... counted as requests.
    assert_eq!(s.gets - before.gets, 5);
    assert_eq!(s.empty_gets - before.empty_gets, 1);
    assert_eq!(
        s.deletes - before.deletes,
        2,
        "take's DeleteObject + one DeleteObjects"
    );
    assert!(s.lists - before.lists >= 3);
    assert_eq!(s.bytes_put - before.bytes_put, 5 + 70_000 + 5);
    assert_eq!(s.bytes_got - before.bytes_got, 5 + 70_000 + 5);
}

#[tokio::test]
async fn a_missing_key_is_none_and_take_takes_once() {
    let mb = s3("once").await;
    assert_eq!(mb.get("nope").await.expect("get"), None);
    assert_eq!(mb.take("nope", deadline()).await.expect("take"), None);
    assert_eq!(mb.stats().snapshot().empty_gets, 2);

    mb.put("m", b"once").await.expect("put");
    assert_eq!(
        mb.take("m", deadline()).await.expect("take").as_deref(),
        Some(&b"once"[..])
    );
    assert_eq!(mb.take("m", deadline()).await.expect("take again"), None);
    assert_gone(&mb, "").await;
}

#[tokio::test]
async fn oversize_values_are_refused_with_a_clear_error() {
    let mb = s3_with(S3Config {
        max_value: 1 << 20,
        ..s3_config("oversize")
    })
    .await;
    mb.put("fits", &payload(2, 1 << 20))
        .await
        .expect("exactly max_value fits");
    let err = mb
        .put("big", &payload(3, (1 << 20) + 1))
        .await
        .expect_err("one byte over max_value");
    assert_eq!((err.backend, err.op, err.retryable), ("s3", "put", false));
    assert!(err.to_string().contains("exceeds"), "{err}");
    assert!(err.to_string().contains("1048576"), "{err}");
    clean(&mb, "").await;
}

#[tokio::test]
async fn values_above_the_threshold_use_multipart_upload() {
    let mb = s3_with(S3Config {
        multipart_threshold: MIN_PART_SIZE,
        part_size: MIN_PART_SIZE,
        ..s3_config("multipart")
    })
    .await;
    // 2 full parts + a 3-byte last part.
    let big = payload(4, 2 * MIN_PART_SIZE + 3);
    let before = mb.stats().snapshot();
    mb.put("big", &big).await.expect("multipart put");
    let s = mb.stats().snapshot();
    assert_eq!(
        s.puts - before.puts,
        1 + 3 + 1,
        "create + 3 parts + complete"
    );
    assert_eq!(mb.get("big").await.expect("get"), Some(big.clone()));

    // At the threshold: one PutObject.
    mb.put("edge", &big[..MIN_PART_SIZE])
        .await
        .expect("single put");
    assert_eq!(mb.stats().snapshot().puts - s.puts, 1);
    assert_eq!(
        mb.take("edge", deadline()).await.expect("take"),
        Some(big[..MIN_PART_SIZE].to_vec())
    );
    clean(&mb, "").await;
}

#[tokio::test]
async fn listing_more_than_1000_keys_paginates_and_delete_batches() {
    let mb = s3("list").await;
    let keys: Vec<String> = (0..1100).map(|i| format!("k/{i:05}")).collect();
    futures::stream::iter(&keys)
        .map(|k| mb.put(k, k.as_bytes()))
        .buffer_unordered(32)
        .try_collect::<Vec<()>>()
        .await
        .expect("put 1100 keys");
    mb.put("other", b"x").await.expect("put");

    let before = mb.stats().snapshot();
    let mut listed = mb.list("k/").await.expect("list");
    let s = mb.stats().snapshot();
    assert_eq!(
        s.lists - before.lists,
        2,
        "1100 keys: two pages of up to 1000"
    );
    listed.sort();
    assert_eq!(listed, keys);

    mb.delete(&listed).await.expect("delete 1100");
    assert_eq!(
        mb.stats().snapshot().deletes - s.deletes,
        2,
        "DeleteObjects batches of 1000"
    );
    assert_gone(&mb, "k/").await;
    assert_eq!(mb.list("").await.expect("list"), ["other"]);
    clean(&mb, "").await;
}

#[tokio::test]
async fn a_missing_bucket_fails_at_connect() {
    let config = S3Config {
        bucket: format!("fmi-missing-{}", std::process::id()),
        ..s3_config("missing")
    };
    let err = S3Mailbox::connect(config)
        .await
        .expect_err("no such bucket");
    assert_eq!(
        (err.backend, err.op, err.retryable),
        ("s3", "connect", false)
    );
    let msg = err.to_string();
    assert!(msg.contains("does not exist"), "{msg}");
    assert!(msg.contains("fmi-missing-"), "{msg}");
    assert!(
        !msg.contains("fmi-test-secret-key"),
        "no credentials in errors: {msg}"
    );
}

#[tokio::test]
async fn invalid_configs_are_refused_before_any_request() {
    let err = S3Mailbox::connect(S3Config {
        part_size: 1 << 20,
        ..s3_config("cfg")
    })
    .await
    .expect_err("part size below 5 MiB");
    assert_eq!((err.op, err.retryable), ("config", false));
    assert!(err.to_string().contains("part_size"), "{err}");
}

#[tokio::test]
async fn setup_is_idempotent_and_lifecycle_is_reported() {
    let config = s3_config("setup");
    // The first call may or may not create the shared bucket (other tests run at once).
    S3Mailbox::setup(&config).await.expect("setup");
    assert!(!S3Mailbox::setup(&config).await.expect("again: exists"));
    let mb = S3Mailbox::connect(config).await.expect("connect");
    // s3s-fs 0.14 has no lifecycle configuration: Ok(false). AWS S3 and MinIO: Ok(true).
    let supported = mb.expire_after_days(1).await.expect("lifecycle");
    eprintln!("lifecycle rules supported by this server: {supported}");
}
