//! Endpoints from the SDK's standard environment variables (`AWS_ENDPOINT_URL_S3`,
//! `AWS_ENDPOINT_URL_DYNAMODB`) when the config names none.
//!
//! A test binary of its own with a single test: it sets environment variables, which must not
//! race with other tests reading them.

// Tests: a failure must panic loudly.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

mod common;

use common::*;
use fmi_aws::{DynamoConfig, DynamoMailbox, S3Config, S3Mailbox};
use fmi_storage::Mailbox;

#[test]
fn endpoints_come_from_the_standard_environment() {
    // Set before any runtime or client exists.
    std::env::set_var("AWS_ENDPOINT_URL_S3", s3_endpoint());
    std::env::set_var("AWS_ENDPOINT_URL_DYNAMODB", dynamo_endpoint());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let s3_config = S3Config {
            endpoint: None,
            ..s3_config("env")
        };
        S3Mailbox::setup(&s3_config)
            .await
            .expect("s3 setup via env");
        let s3 = S3Mailbox::connect(s3_config)
            .await
            .expect("s3 via AWS_ENDPOINT_URL_S3 (path style chosen automatically)");
        s3.put("k", b"v").await.expect("put");
        assert_eq!(
            s3.take("k", deadline()).await.expect("take").as_deref(),
            Some(&b"v"[..])
        );
        assert_gone(&s3, "").await;

        let d_config = DynamoConfig {
            endpoint: None,
            ..dynamo_config()
        };
        DynamoMailbox::setup(&d_config)
            .await
            .expect("dynamodb setup via env");
        let d = DynamoMailbox::connect(d_config)
            .await
            .expect("dynamodb via AWS_ENDPOINT_URL_DYNAMODB");
        let key = format!("{}/k", unique("env"));
        d.put(&key, b"v").await.expect("put");
        assert_eq!(
            d.take(&key, deadline()).await.expect("take").as_deref(),
            Some(&b"v"[..])
        );
    });
}
