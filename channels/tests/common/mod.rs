//! Helpers shared by the channel test files (each file uses its own subset).
#![allow(dead_code)]

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use fmi_channels::JobId;
use tokio::time::Instant;

pub(crate) fn job(name: &str) -> JobId {
    JobId::new(name).expect("valid job id")
}

pub(crate) fn in_secs(s: u64) -> Instant {
    Instant::now() + Duration::from_secs(s)
}

pub(crate) fn loopback() -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, 0))
}

/// Polls `cond` every 10 ms for at most `limit`: for states that settle a moment after the
/// operation that causes them (a losing connection's socket closes after its refusal is read).
pub(crate) async fn eventually(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + limit;
    while Instant::now() < end {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    cond()
}
