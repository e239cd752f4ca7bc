//! Mixed-channel collectives: one operation over two channels, each doing what it is good at.
//!
//! **Staged broadcast** (`staged_bcast_tcp`, `staged_bcast_redis` in the model): a large
//! broadcast on S3 alone is a binomial tree of S3 messages whose receivers poll; here the root
//! stores the payload **once** in S3 and announces it over a push channel (TCP or Redis), so
//! every receiver reads it with one GET — no empty polls — and acknowledges over the push
//! channel, after which the root deletes it.
//!
//! ```text
//!  root:      PUT fmi/<job>/staged/<seq> ─► token (8 B, binomial over signal) ─► N−1 acks ─► DELETE
//!  receiver:                                token ─► GET (found) ─► ack to root
//! ```
//!
//! The model prices it ([`fmi_model::Algorithm::StagedBcastTcp`]) and the communicator uses it
//! for `bcast_into` when the model chooses it, the same on every rank. The S3 channel's mailbox
//! is shared with the S3 channel, so the requests appear in its counters and the ledger.

use std::sync::Arc;

use fmi_channels::{Channel, Instant, JobId, Rank, Tag};

use crate::{Error, Result};

/// The S3 mailbox a staged broadcast stores its payload in (shared with the S3 channel).
#[derive(Clone, Debug)]
pub(crate) struct Staged {
    #[cfg(feature = "aws")]
    pub(crate) mailbox: Arc<dyn fmi_storage::Mailbox>,
    /// The S3 channel's key space (`fmi/{job}/`, or its secret space with a job token).
    pub(crate) space: String,
}

/// What one staged broadcast needs from the communicator.
pub(crate) struct Call<'a> {
    pub(crate) staged: &'a Staged,
    /// The push channel carrying the token and the acknowledgements.
    pub(crate) signal: &'a Arc<dyn Channel>,
    /// The collective's tag (the object key derives from it: the same on every rank).
    pub(crate) tag: Tag,
    /// A second collective tag for the acknowledgements.
    pub(crate) ack_tag: Tag,
    pub(crate) deadline: Instant,
    pub(crate) config: &'a fmi_collectives::Config,
    // Read only by the S3 path (feature "aws").
    #[cfg_attr(not(feature = "aws"), allow(dead_code))]
    pub(crate) root: Rank,
}

#[cfg(feature = "aws")]
fn storage_error(me: Rank, what: &str, e: impl std::fmt::Display) -> Error {
    Error::Io {
        me,
        peer: None,
        channel: "s3",
        source: std::io::Error::other(format!("staged broadcast: {what}: {e}")),
    }
}

/// `fut`, or a timeout error at the call's deadline.
#[cfg(feature = "aws")]
async fn within<T>(
    call: &Call<'_>,
    me: Rank,
    fut: impl std::future::Future<Output = T>,
) -> Result<T> {
    let started = Instant::now();
    tokio::time::timeout_at(call.deadline, fut)
        .await
        .map_err(|_| Error::Timeout {
            me,
            peer: call.root,
            waited: started.elapsed(),
            channel: "s3",
            tag: call.tag,
        })
}

/// Runs a staged broadcast of `buf` (the root's data; filled on the others).
#[cfg(feature = "aws")]
pub(crate) async fn bcast(call: Call<'_>, buf: &mut [u8]) -> Result<()> {
    let signal = &**call.signal;
    let me = signal.rank();
    let size = signal.size();
    let key = format!("{}staged/{}", call.staged.space, call.tag.0);
    let mailbox = &call.staged.mailbox;
    let ctx = fmi_collectives::Ctx {
        channel: signal,
        tag: call.tag,
        deadline: call.deadline,
        config: call.config,
    };
    let mut token = (buf.len() as u64).to_le_bytes();
    if me == call.root {
        within(&call, me, mailbox.put(&key, buf))
            .await?
            .map_err(|e| storage_error(me, "storing the payload", e))?;
        fmi_collectives::bcast_into(&ctx, call.root, &mut token).await?;
        let mut outcome = Ok(());
        for r in (0..size).map(Rank).filter(|&r| r != me) {
            if let Err(e) = signal.recv(r, call.ack_tag, call.deadline).await {
                outcome = Err(e);
                break;
            }
        }
        // Deleted whatever happened: nothing is left behind.
        let deleted = mailbox
            .delete(std::slice::from_ref(&key))
            .await
            .map_err(|e| storage_error(me, "deleting the payload", e));
        outcome.and(deleted)
    } else {
        fmi_collectives::bcast_into(&ctx, call.root, &mut token).await?;
        let announced = u64::from_le_bytes(token);
        let value = within(&call, me, mailbox.get(&key))
            .await?
            .map_err(|e| storage_error(me, "reading the payload", e))?;
        let value = value
            .ok_or_else(|| storage_error(me, "reading the payload", "announced but not found"))?;
        if value.len() != buf.len() || announced != buf.len() as u64 {
            return Err(Error::CountMismatch {
                me,
                peer: call.root,
                what: "bcast: the root's buffer and this rank's differ in length",
                expected: buf.len(),
                got: value.len(),
            });
        }
        buf.copy_from_slice(&value);
        signal
            .send(call.root, call.ack_tag, &[], call.deadline)
            .await
    }
}

/// Without the `aws` feature there is no S3 and so no staged broadcast.
#[cfg(not(feature = "aws"))]
pub(crate) async fn bcast(call: Call<'_>, _buf: &mut [u8]) -> Result<()> {
    let _ = (
        call.signal,
        call.tag,
        call.ack_tag,
        call.deadline,
        call.config,
        &call.staged.space,
    );
    Err(Error::InvalidArgument {
        what: "staged broadcast needs the aws feature",
    })
}

/// Opens storage channel `name`; for S3 also returns its mailbox for staged broadcasts (shared,
/// so their requests are counted with the channel's).
pub(crate) async fn open_storage(
    cfg: &crate::storage::ChannelsConfig,
    name: &str,
    job: JobId,
    rank: Rank,
    size: u32,
    secret: Option<&str>,
) -> Result<(Arc<dyn Channel>, Option<Staged>)> {
    #[cfg(feature = "aws")]
    if name == "s3" {
        if let Some(c) = cfg.s3.clone() {
            let mb = fmi_aws::S3Mailbox::connect(c)
                .await
                .map_err(|e| Error::Bootstrap {
                    me: rank,
                    missing: Vec::new(),
                    source: Box::new(e),
                })?;
            let mailbox: Arc<dyn fmi_storage::Mailbox> = Arc::new(mb);
            let mut ch = fmi_storage::StorageChannel::new(
                Arc::clone(&mailbox),
                job,
                rank,
                size,
                cfg.storage.clone(),
            )?;
            if let Some(s) = secret {
                ch = ch.with_secret(s.as_bytes());
            }
            let space = ch.key_space().to_owned();
            return Ok((Arc::new(ch), Some(Staged { mailbox, space })));
        }
    }
    let ch = crate::storage::open(cfg, name, job, rank, size, secret).await?;
    Ok((ch, None))
}
