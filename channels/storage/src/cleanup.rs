//! Removing everything a job stored.

use std::io;
use std::time::Duration;

use fmi_channels::{Error, JobId, Rank, Result};

use crate::{keys, Mailbox, MailboxError};

/// Keys per delete request (S3 DeleteObjects takes up to 1000; DynamoDB batches are cut further
/// by its mailbox).
const DELETE_BATCH: usize = 1000;
/// Attempts per request when the backend reports a retryable failure.
const ATTEMPTS: u32 = 5;

/// Removes every key of `job` (everything under `fmi/{job}/`) and returns how many there were.
/// Used by `fmi cleanup` after a crashed job and by tests; a job that ends normally leaves
/// nothing behind. Retryable failures are retried a few times with backoff. Errors are
/// [`Error::Io`] naming rank 0, since cleanup runs outside any rank.
pub async fn cleanup_job(mailbox: &dyn Mailbox, job: &JobId) -> Result<usize> {
    let prefix = keys::job_prefix(job);
    let keys = retrying(mailbox, || mailbox.list(&prefix)).await?;
    for batch in keys.chunks(DELETE_BATCH) {
        retrying(mailbox, || mailbox.delete(batch)).await?;
    }
    Ok(keys.len())
}

async fn retrying<'a, T, F>(mailbox: &dyn Mailbox, mut op: F) -> Result<T>
where
    F: FnMut() -> futures::future::BoxFuture<'a, std::result::Result<T, MailboxError>>,
{
    let mut pause = Duration::from_millis(50);
    let mut attempt = 1;
    loop {
        match op().await {
            Ok(v) => return Ok(v),
            Err(e) if e.retryable && attempt < ATTEMPTS => {
                crate::RequestStats::add(&mailbox.stats().retries, 1);
                tokio::time::sleep(pause).await;
                pause *= 2;
                attempt += 1;
            }
            Err(e) => {
                return Err(Error::Io {
                    me: Rank(0),
                    peer: None,
                    channel: mailbox.name(),
                    source: io::Error::other(e),
                })
            }
        }
    }
}
