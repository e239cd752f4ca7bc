//! The DynamoDB mailbox against a **real** DynamoDB server (dynalite from
//! `scripts/services.sh`).
//!
//! Each test uses its own key prefix in the shared test table and checks at the end that no
//! item under it is left.

// Tests: a failure must panic loudly.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

mod common;

use std::sync::Arc;

use common::*;
use fmi_aws::{DynamoConfig, DynamoMailbox, DEFAULT_MAX_VALUE};
use fmi_storage::Mailbox;
use futures::{StreamExt, TryStreamExt};

#[tokio::test]
async fn every_operation_round_trips() {
    let mb = dynamo().await;
    let p = format!("{}/", unique("ops"));
    let k = |s: &str| format!("{p}{s}");
    assert_eq!(mb.name(), "dynamodb");
    assert_eq!(mb.limits().max_value, DEFAULT_MAX_VALUE);
    assert!(!mb.limits().push, "DynamoDB is polled");

    let before = mb.stats().snapshot();
    mb.put(&k("a/1"), b"hello").await.expect("put");
    mb.put(&k("a/2"), b"").await.expect("put empty");
    mb.put(&k("b/1"), &payload(1, 3000))
        .await
        .expect("put 3 kB");

    assert_eq!(
        mb.get(&k("a/1")).await.expect("get").as_deref(),
        Some(&b"hello"[..])
    );
    assert_eq!(
        mb.get(&k("a/2")).await.expect("get").as_deref(),
        Some(&b""[..])
    );
    let mut a = mb.list(&k("a/")).await.expect("list");
    a.sort();
    assert_eq!(a, [k("a/1"), k("a/2")], "list is prefix-scoped");
    assert_eq!(mb.list(&p).await.expect("list all").len(), 3);

    assert_eq!(
        mb.take(&k("b/1"), deadline()).await.expect("take"),
        Some(payload(1, 3000))
    );
    assert_eq!(
        mb.get(&k("b/1")).await.expect("get"),
        None,
        "take removed it"
    );

    // Counters: created at the first increment, atomic, negative steps allowed.
    let n = k("n");
    let incr = |by| mb.incr(&n, by).expect("dynamodb has counters");
    assert_eq!(incr(1).await.expect("incr"), 1);
    assert_eq!(incr(5).await.expect("incr"), 6);
    assert_eq!(incr(-2).await.expect("incr"), 4);
    assert_eq!(incr(0).await.expect("incr"), 4);

    mb.delete(&[k("a/1"), k("a/2"), k("n"), k("never/was")])
        .await
        .expect("delete, including a missing key");
    assert_gone(&mb, &p).await;

    let s = mb.stats().snapshot();
    assert_eq!(s.puts - before.puts, 3);
    assert_eq!(s.gets - before.gets, 4, "3 GetItem + the take's GetItem");
    assert_eq!(s.empty_gets - before.empty_gets, 1);
    assert_eq!(s.counters - before.counters, 4);
    assert_eq!(
        s.deletes - before.deletes,
        2,
        "the take's DeleteItem and one BatchWriteItem"
    );
    assert_eq!(s.bytes_put - before.bytes_put, 5 + 3000);
    assert_eq!(s.bytes_got - before.bytes_got, 5 + 3000);
    // Units: reported by the server or estimated from item sizes. The 3 kB item alone is
    // 3 write units to put and 3 more to take.
    assert!(
        s.write_units - before.write_units >= 1 + 1 + 3 + 3 + 4 + 4,
        "{s:?}"
    );
    assert!(s.read_units - before.read_units >= 3, "{s:?}");
}

#[tokio::test]
async fn a_missing_key_is_none_and_take_takes_once() {
    let mb = Arc::new(dynamo().await);
    let p = format!("{}/", unique("once"));
    assert_eq!(mb.get(&format!("{p}nope")).await.expect("get"), None);
    assert_eq!(
        mb.take(&format!("{p}nope"), deadline())
            .await
            .expect("take"),
        None
    );
    assert_eq!(mb.stats().snapshot().empty_gets, 2);

    // Eight concurrent takers of one item (the adapter never has two, but the Mailbox contract
    // lets a value be taken once): they all read it, and the DeleteItem that still finds it
    // (ALL_OLD) tells which one removed it.
    for round in 0..5 {
        let key = format!("{p}m{round}");
        mb.put(&key, b"once").await.expect("put");
        let takers: Vec<_> = (0..8)
            .map(|_| {
                let mb = Arc::clone(&mb);
                let key = key.clone();
                tokio::spawn(async move { mb.take(&key, deadline()).await.expect("take") })
            })
            .collect();
        let mut got = 0;
        for t in takers {
            if let Some(v) = t.await.expect("taker") {
                assert_eq!(v, b"once");
                got += 1;
            }
        }
        assert_eq!(got, 1, "round {round}: exactly one taker gets the item");
    }
    assert_gone(&*mb, &p).await;
}

#[tokio::test]
async fn a_repeated_put_succeeds_and_keeps_the_first_value() {
    let mb = dynamo().await;
    let key = format!("{}/m", unique("dup"));
    mb.put(&key, b"first").await.expect("put");
    // A retry after a lost answer: the condition fails, which counts as success.
    mb.put(&key, b"first").await.expect("repeated put");
    assert_eq!(mb.stats().snapshot().puts, 2);
    assert_eq!(
        mb.take(&key, deadline()).await.expect("take").as_deref(),
        Some(&b"first"[..])
    );
    assert_eq!(
        mb.take(&key, deadline()).await.expect("take"),
        None,
        "stored once"
    );
}

#[tokio::test]
async fn item_limits_are_respected_and_oversize_puts_fail_clearly() {
    let mb = dynamo().await;
    let p = format!("{}/", unique("limit"));
    // The default limit leaves room for key and attribute names under DynamoDB's 400 KB.
    let max = payload(7, DEFAULT_MAX_VALUE);
    mb.put(&format!("{p}max"), &max)
        .await
        .expect("max_value fits");
    assert_eq!(
        mb.take(&format!("{p}max"), deadline()).await.expect("take"),
        Some(max)
    );
    let err = mb
        .put(&format!("{p}over"), &payload(8, DEFAULT_MAX_VALUE + 1))
        .await
        .expect_err("one byte over max_value");
    assert_eq!(
        (err.backend, err.op, err.retryable),
        ("dynamodb", "put", false)
    );
    assert!(err.to_string().contains("exceeds"), "{err}");

    // The largest configurable limit (390,000 B) still fits under the server's 400 KB check.
    let wide = dynamo_with(DynamoConfig {
        max_value: 390_000,
        ..dynamo_config()
    })
    .await;
    let v = payload(9, 390_000);
    wide.put(&format!("{p}wide"), &v)
        .await
        .expect("390,000 B item");
    assert_eq!(wide.get(&format!("{p}wide")).await.expect("get"), Some(v));

    // Limits at or above DynamoDB's own are refused at connect.
    let err = DynamoMailbox::connect(DynamoConfig {
        max_value: 400_000,
        ..dynamo_config()
    })
    .await
    .expect_err("400,000 B values cannot fit an item");
    assert_eq!((err.op, err.retryable), ("config", false));
    clean(&wide, &p).await;
}

#[tokio::test]
async fn scan_paginates_and_delete_batches() {
    let mb = dynamo().await;
    let p = format!("{}/", unique("scan"));
    // 12 items of 100 kB: more than one 1 MB Scan page.
    let keys: Vec<String> = (0..12).map(|i| format!("{p}big/{i:02}")).collect();
    let value = payload(10, 100_000);
    futures::stream::iter(&keys)
        .map(|k| mb.put(k, &value))
        .buffer_unordered(4)
        .try_collect::<Vec<()>>()
        .await
        .expect("put 12 × 100 kB");
    // And 60 small ones: three BatchWriteItem requests of up to 25.
    let small: Vec<String> = (0..60).map(|i| format!("{p}small/{i:02}")).collect();
    futures::stream::iter(&small)
        .map(|k| mb.put(k, b"s"))
        .buffer_unordered(8)
        .try_collect::<Vec<()>>()
        .await
        .expect("put 60 small");

    let before = mb.stats().snapshot();
    let mut listed = mb.list(&format!("{p}big/")).await.expect("scan");
    let s = mb.stats().snapshot();
    assert!(
        s.lists - before.lists >= 2,
        "1.2 MB of items: at least two Scan pages, got {}",
        s.lists - before.lists
    );
    listed.sort();
    assert_eq!(listed, keys);

    let mut listed_small = mb.list(&format!("{p}small/")).await.expect("scan");
    listed_small.sort();
    assert_eq!(listed_small, small);
    let s = mb.stats().snapshot();
    mb.delete(&listed_small).await.expect("delete 60");
    assert_eq!(
        mb.stats().snapshot().deletes - s.deletes,
        3,
        "batches of 25"
    );
    assert_gone(&mb, &format!("{p}small/")).await;
    clean(&mb, &p).await;
}

#[tokio::test]
async fn a_missing_table_fails_at_connect() {
    let err = DynamoMailbox::connect(DynamoConfig {
        table: format!("fmi-missing-{}", std::process::id()),
        ..dynamo_config()
    })
    .await
    .expect_err("no such table");
    assert_eq!(
        (err.backend, err.op, err.retryable),
        ("dynamodb", "connect", false)
    );
    let msg = err.to_string();
    assert!(msg.contains("does not exist"), "{msg}");
    assert!(msg.contains("fmi-missing-"), "{msg}");
    assert!(
        !msg.contains("fmi-test-secret-key"),
        "no credentials in errors: {msg}"
    );

    let err = DynamoMailbox::connect(DynamoConfig {
        table: "x".into(),
        ..dynamo_config()
    })
    .await
    .expect_err("invalid table name");
    assert_eq!(err.op, "config");
}

#[tokio::test]
async fn setup_is_idempotent_and_enables_ttl() {
    let config = dynamo_config();
    DynamoMailbox::setup(&config).await.expect("setup");
    let again = DynamoMailbox::setup(&config).await.expect("setup again");
    assert!(!again.created, "the table existed");
    eprintln!("TTL enabled on this server: {}", again.ttl_enabled);
}
