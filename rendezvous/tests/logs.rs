//! Tokens never reach the logs or error messages, while the events around them do.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fmt::{self, Write as _};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fmi_rendezvous::wire::{ClientMsg, ServerMsg};
use fmi_rendezvous::{
    register, Endpoint, Error, Instant, JobId, RefuseReason, Registration, Server, ServerConfig,
    Token,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tracing::field::{Field, Visit};
use tracing::span;

/// A subscriber that writes every event and span field into one string.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<String>>);

struct Fields<'a>(&'a mut String);

impl Visit for Fields<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        let _ = write!(self.0, "{}={:?} ", field.name(), value);
    }
}

impl Capture {
    fn text(&self) -> String {
        self.0.lock().unwrap().clone()
    }
}

impl tracing::Subscriber for Capture {
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        true
    }

    fn new_span(&self, span: &span::Attributes<'_>) -> span::Id {
        span.record(&mut Fields(&mut self.0.lock().unwrap()));
        span::Id::from_u64(1)
    }

    fn record(&self, _: &span::Id, values: &span::Record<'_>) {
        values.record(&mut Fields(&mut self.0.lock().unwrap()));
    }

    fn record_follows_from(&self, _: &span::Id, _: &span::Id) {}

    fn event(&self, event: &tracing::Event<'_>) {
        let mut text = self.0.lock().unwrap();
        event.record(&mut Fields(&mut text));
        text.push('\n');
    }

    fn enter(&self, _: &span::Id) {}

    fn exit(&self, _: &span::Id) {}
}

fn registration(rank: u32, token: &str) -> Registration {
    Registration {
        job: JobId::new("logged").unwrap(),
        rank,
        size: 2,
        endpoints: vec![Endpoint::new(format!("tcp://rank{rank}:1")).unwrap()],
        token: Token::new(token).unwrap(),
    }
}

#[tokio::test]
async fn tokens_never_reach_logs_or_errors() {
    const GOOD: &str = "correct-horse-battery";
    const BAD: &str = "wrong-guess-zebra";
    let capture = Capture::default();
    let _guard = tracing::subscriber::set_default(capture.clone());

    let server = Server::bind(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        ServerConfig::default(),
    )
    .await
    .unwrap()
    .spawn();
    let addr = server.local_addr();
    let deadline = Instant::now() + Duration::from_secs(10);
    // Rank 0 holds the job over a raw connection, so the bad token meets an existing job.
    let mut holder = TcpStream::connect(addr).await.unwrap();
    let mut frame = Vec::new();
    let first = registration(0, GOOD);
    ClientMsg::Register {
        job: first.job,
        rank: 0,
        size: 2,
        endpoints: first.endpoints,
        token: first.token,
    }
    .encode(&mut frame)
    .unwrap();
    holder.write_all(&frame).await.unwrap();
    let mut ack = [0u8; 12];
    holder.read_exact(&mut ack).await.unwrap();
    assert_eq!(
        ServerMsg::decode(&ack).unwrap(),
        ServerMsg::Missing { ranks: vec![1] }
    );

    let refusal = register(addr, registration(1, BAD), deadline)
        .await
        .unwrap_err();
    assert!(matches!(
        refusal,
        Error::Refused {
            reason: RefuseReason::BadToken,
            ..
        }
    ));
    let table = register(addr, registration(1, GOOD), deadline)
        .await
        .unwrap();
    assert_eq!(table.size(), 2);
    server.shutdown().await;

    let logs = capture.text();
    assert!(logs.contains("registration refused"), "{logs}");
    assert!(logs.contains("job complete"), "{logs}");
    for secret in [GOOD, BAD] {
        assert!(!logs.contains(secret), "token leaked into logs: {logs}");
        assert!(!refusal.to_string().contains(secret));
        assert!(!format!("{refusal:?}").contains(secret));
    }
}
