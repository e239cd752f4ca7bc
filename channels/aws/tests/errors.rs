//! How SDK failures become `MailboxError`s: which are retryable, what they say. Uses small
//! scripted HTTP servers on loopback (answers a real S3 or DynamoDB would give under
//! throttling or with bad input), a port nobody listens on, and a server that never answers.

// Tests: a failure must panic loudly.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

mod common;

use std::sync::Arc;

use common::*;
use fmi_aws::{DynamoConfig, DynamoMailbox, S3Config, S3Mailbox};
use fmi_storage::{Mailbox, MailboxError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// One scripted answer: status line, extra headers, body.
type Answer = (&'static str, Vec<(&'static str, &'static str)>, String);

/// Serves every request on loopback with `answer(request head)`, one request per connection.
async fn scripted(answer: impl Fn(&str) -> Answer + Send + Sync + 'static) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let answer = Arc::new(answer);
    tokio::spawn(async move {
        // Ends with the test's runtime.
        while let Ok((sock, _)) = listener.accept().await {
            let answer = Arc::clone(&answer);
            tokio::spawn(async move { serve(sock, &*answer).await });
        }
    });
    url
}

async fn serve(mut sock: TcpStream, answer: &(dyn Fn(&str) -> Answer + Send + Sync)) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    // Read the head, then as many body bytes as Content-Length says (bounded by 1 MB).
    let head_end = loop {
        let n = sock.read(&mut chunk).await.unwrap_or(0);
        if n == 0 || buf.len() > 1 << 20 {
            return;
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let len: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0);
    while buf.len() < head_end + len.min(1 << 20) {
        let n = sock.read(&mut chunk).await.unwrap_or(0);
        if n == 0 {
            return;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let (status, headers, body) = answer(&head);
    let mut out = format!(
        "HTTP/1.1 {status}\r\ncontent-length: {}\r\nconnection: close\r\n",
        body.len()
    );
    for (k, v) in headers {
        out.push_str(&format!("{k}: {v}\r\n"));
    }
    out.push_str("\r\n");
    out.push_str(&body);
    let _ = sock.write_all(out.as_bytes()).await;
    let _ = sock.shutdown().await;
}

fn ok_empty() -> Answer {
    ("200 OK", vec![], String::new())
}

fn s3_error(status: &'static str, code: &str) -> Answer {
    (
        status,
        vec![("content-type", "application/xml")],
        format!("<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>{code}</Code><Message>scripted {code}</Message></Error>"),
    )
}

/// An S3 server whose bucket exists (HEAD answers 200) and every other request fails.
async fn failing_s3(status: &'static str, code: &'static str) -> S3Mailbox {
    let url = scripted(move |head| {
        if head.starts_with("HEAD ") {
            ok_empty()
        } else {
            s3_error(status, code)
        }
    })
    .await;
    S3Mailbox::connect(S3Config {
        endpoint: Some(url),
        ..s3_config("scripted")
    })
    .await
    .expect("connect to the scripted server")
}

fn check(err: &MailboxError, backend: &str, op: &str, retryable: bool, says: &str) {
    assert_eq!(
        (err.backend, err.op, err.retryable),
        (backend, op, retryable),
        "{err}"
    );
    assert!(
        err.to_string().contains(says),
        "{err} should mention {says}"
    );
    assert!(
        !err.to_string().contains("fmi-test-secret-key"),
        "no credentials in errors: {err}"
    );
}

#[tokio::test]
async fn s3_throttling_and_5xx_are_retryable_and_4xx_are_not() {
    s3_endpoint(); // the credentials must come from the environment
    let mb = failing_s3("503 Service Unavailable", "SlowDown").await;
    let err = mb.put("k", b"v").await.expect_err("throttled");
    check(&err, "s3", "put", true, "SlowDown");
    let err = mb.get("k").await.expect_err("throttled");
    check(&err, "s3", "get", true, "503");

    let mb = failing_s3("500 Internal Server Error", "InternalError").await;
    let err = mb.take("k", deadline()).await.expect_err("5xx");
    check(&err, "s3", "take", true, "InternalError");

    let mb = failing_s3("403 Forbidden", "AccessDenied").await;
    let err = mb.list("").await.expect_err("denied");
    check(&err, "s3", "list", false, "AccessDenied");
}

#[tokio::test]
async fn s3_delete_falls_back_to_single_deletes_without_delete_objects() {
    s3_endpoint();
    let url = scripted(|head| {
        if head.starts_with("HEAD ") || head.starts_with("DELETE ") {
            ("204 No Content", vec![], String::new())
        } else if head.starts_with("POST ") && head.contains("delete") {
            s3_error("501 Not Implemented", "NotImplemented")
        } else {
            s3_error("400 Bad Request", "InvalidRequest")
        }
    })
    .await;
    let mb = S3Mailbox::connect(S3Config {
        endpoint: Some(url),
        ..s3_config("fallback")
    })
    .await
    .expect("connect");
    let keys: Vec<String> = (0..3).map(|i| format!("k{i}")).collect();
    mb.delete(&keys).await.expect("per-key deletes");
    // 1 refused DeleteObjects + 3 DeleteObject; the next delete goes straight to single ones.
    assert_eq!(mb.stats().snapshot().deletes, 4);
    mb.delete(&keys[..1]).await.expect("single delete");
    assert_eq!(mb.stats().snapshot().deletes, 5);
}

fn dynamo_error(status: &'static str, code: &str) -> Answer {
    (
        status,
        vec![("content-type", "application/x-amz-json-1.0")],
        format!(
            "{{\"__type\":\"com.amazonaws.dynamodb.v20120810#{code}\",\"message\":\"scripted {code}\"}}"
        ),
    )
}

/// A DynamoDB server whose table exists and every other request fails.
async fn failing_dynamo(status: &'static str, code: &'static str) -> DynamoMailbox {
    let url = scripted(move |head| {
        if head.contains("DynamoDB_20120810.DescribeTable") {
            (
                "200 OK",
                vec![("content-type", "application/x-amz-json-1.0")],
                "{\"Table\":{\"TableName\":\"fmi-test\",\"TableStatus\":\"ACTIVE\"}}".into(),
            )
        } else {
            dynamo_error(status, code)
        }
    })
    .await;
    DynamoMailbox::connect(DynamoConfig {
        endpoint: Some(url),
        ..dynamo_config()
    })
    .await
    .expect("connect to the scripted server")
}

#[tokio::test]
async fn dynamodb_throttling_and_5xx_are_retryable_and_validation_is_not() {
    dynamo_endpoint();
    let mb = failing_dynamo("400 Bad Request", "ProvisionedThroughputExceededException").await;
    let err = mb.put("k", b"v").await.expect_err("throttled");
    check(
        &err,
        "dynamodb",
        "put",
        true,
        "ProvisionedThroughputExceeded",
    );
    let err = mb
        .incr("k", 1)
        .expect("counters")
        .await
        .expect_err("throttled");
    check(
        &err,
        "dynamodb",
        "incr",
        true,
        "ProvisionedThroughputExceeded",
    );

    let mb = failing_dynamo("500 Internal Server Error", "InternalServerError").await;
    let err = mb.take("k", deadline()).await.expect_err("5xx");
    check(&err, "dynamodb", "take", true, "InternalServerError");

    let mb = failing_dynamo("400 Bad Request", "ValidationException").await;
    let err = mb.get("k").await.expect_err("invalid");
    check(&err, "dynamodb", "get", false, "ValidationException");
}

#[tokio::test]
async fn unreachable_and_silent_servers_are_retryable() {
    s3_endpoint();
    // A port nobody listens on: bound, then released.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let err = S3Mailbox::connect(S3Config {
        endpoint: Some(format!("http://127.0.0.1:{port}")),
        ..s3_config("refused")
    })
    .await
    .expect_err("connection refused");
    check(&err, "s3", "connect", true, "cannot reach");

    // A server that accepts and never answers: the per-attempt timeout ends the request.
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let held = tokio::spawn(async move {
        let mut socks = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            socks.push(s);
        }
    });
    let started = std::time::Instant::now();
    let err = DynamoMailbox::connect(DynamoConfig {
        endpoint: Some(url),
        timeout_secs: 1,
        ..dynamo_config()
    })
    .await
    .expect_err("no answer");
    check(&err, "dynamodb", "connect", true, "timed out");
    assert!(started.elapsed() < std::time::Duration::from_secs(10));
    held.abort();
}
