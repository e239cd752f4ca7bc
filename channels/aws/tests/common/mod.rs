//! Shared helpers of the tests against the real local servers (s3s-fs, dynalite) that
//! `scripts/services.sh start` runs.

// Not every test file uses every helper.
#![allow(dead_code)]

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use fmi_aws::{DynamoConfig, DynamoMailbox, S3Config, S3Mailbox};
use fmi_channels::Instant;
use fmi_storage::Mailbox;

/// Bucket shared by the tests; each test works under its own prefix.
pub(crate) const BUCKET: &str = "fmi-test";
/// Table shared by the tests; each test uses its own key prefix.
pub(crate) const TABLE: &str = "fmi-test";

const HOW: &str = "start the test servers with scripts/services.sh start, or run scripts/test.sh \
                   (eval \"$(scripts/services.sh start)\" exports the variables)";

/// An environment variable the tests cannot run without.
pub(crate) fn required(name: &str) -> String {
    match std::env::var(name) {
        Ok(v) if !v.is_empty() => v,
        _ => panic!("{name} is not set: these tests need the real local servers; {HOW}"),
    }
}

fn region() -> String {
    std::env::var("AWS_REGION").unwrap_or_else(|_| "us-east-1".to_owned())
}

/// Credentials must come from the environment (the test servers' keys): never let the SDK's
/// credential chain go looking elsewhere.
fn check_credentials() {
    required("AWS_ACCESS_KEY_ID");
    required("AWS_SECRET_ACCESS_KEY");
}

pub(crate) fn s3_endpoint() -> String {
    check_credentials();
    required("FMI_TEST_S3_ENDPOINT")
}

pub(crate) fn dynamo_endpoint() -> String {
    check_credentials();
    required("FMI_TEST_DYNAMODB_ENDPOINT")
}

/// A name no other test (or earlier run) uses.
pub(crate) fn unique(name: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "{name}-{}-{nanos:x}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

pub(crate) fn deadline() -> Instant {
    Instant::now() + Duration::from_secs(30)
}

pub(crate) fn payload(seed: u32, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) as u8)
        .collect()
}

/// An S3 config on the test server under a fresh prefix `t/{name}-.../`.
pub(crate) fn s3_config(name: &str) -> S3Config {
    S3Config {
        prefix: format!("t/{}/", unique(name)),
        region: Some(region()),
        endpoint: Some(s3_endpoint()),
        ..S3Config::new(BUCKET)
    }
}

/// Creates the test bucket if needed and connects.
pub(crate) async fn s3_with(config: S3Config) -> S3Mailbox {
    S3Mailbox::setup(&config)
        .await
        .expect("create the test bucket");
    S3Mailbox::connect(config).await.expect("connect to s3")
}

pub(crate) async fn s3(name: &str) -> S3Mailbox {
    s3_with(s3_config(name)).await
}

/// A DynamoDB config on the test server.
pub(crate) fn dynamo_config() -> DynamoConfig {
    DynamoConfig {
        region: Some(region()),
        endpoint: Some(dynamo_endpoint()),
        ..DynamoConfig::new(TABLE)
    }
}

/// Creates the test table if needed and connects.
pub(crate) async fn dynamo_with(config: DynamoConfig) -> DynamoMailbox {
    DynamoMailbox::setup(&config)
        .await
        .expect("create the test table");
    DynamoMailbox::connect(config)
        .await
        .expect("connect to dynamodb")
}

pub(crate) async fn dynamo() -> DynamoMailbox {
    dynamo_with(dynamo_config()).await
}

/// Deletes every key under `prefix` and checks that none is left.
pub(crate) async fn clean(mailbox: &dyn Mailbox, prefix: &str) {
    let keys = mailbox.list(prefix).await.expect("list for cleanup");
    mailbox.delete(&keys).await.expect("delete for cleanup");
    assert_gone(mailbox, prefix).await;
}

/// Checks that nothing is left under `prefix`.
pub(crate) async fn assert_gone(mailbox: &dyn Mailbox, prefix: &str) {
    let left = mailbox.list(prefix).await.expect("list");
    assert!(
        left.is_empty(),
        "{} keys left under '{prefix}': {:?}",
        left.len(),
        &left[..left.len().min(10)]
    );
}

/// `http://host:port` as a socket address on loopback (for a proxy in front of the server).
pub(crate) fn addr_of(endpoint: &str) -> std::net::SocketAddr {
    let hostport = endpoint
        .split_once("://")
        .map_or(endpoint, |(_, r)| r)
        .trim_end_matches('/')
        .replace("localhost", "127.0.0.1");
    hostport.parse().expect("endpoint is http://host:port")
}
