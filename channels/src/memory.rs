//! The in-process channel: N ranks as tasks (or threads) of one process.
//!
//! It exists for fast tests of collectives and of the communicator. It is a real [`Channel`] with
//! the same ordering, deadline and peer-loss semantics as the network channels: dropping an
//! endpoint marks its rank lost for every other endpoint.

use std::sync::Arc;

use futures::future::{BoxFuture, FutureExt};
use tokio::time::Instant;

use crate::{check_rank, Capabilities, Channel, Inbox, JobId, Rank, Result, Tag};

const NAME: &str = "memory";

/// One rank's endpoint of an in-memory job.
#[derive(Debug)]
pub struct MemoryChannel {
    job: JobId,
    rank: Rank,
    inboxes: Arc<Vec<Arc<Inbox>>>,
}

/// Creates the `size` endpoints of an in-memory job, index = rank.
pub fn world(job: JobId, size: u32) -> Vec<MemoryChannel> {
    let inboxes: Arc<Vec<Arc<Inbox>>> = Arc::new(
        (0..size)
            .map(|r| Inbox::new(Rank(r), NAME))
            .collect::<Vec<_>>(),
    );
    (0..size)
        .map(|r| MemoryChannel {
            job: job.clone(),
            rank: Rank(r),
            inboxes: Arc::clone(&inboxes),
        })
        .collect()
}

impl MemoryChannel {
    /// This endpoint's own inbox (for tests that inspect leftovers).
    pub fn inbox(&self) -> &Arc<Inbox> {
        &self.inboxes[self.rank.idx()]
    }
}

impl Channel for MemoryChannel {
    fn name(&self) -> &'static str {
        NAME
    }

    fn job(&self) -> &JobId {
        &self.job
    }

    fn rank(&self) -> Rank {
        self.rank
    }

    fn size(&self) -> u32 {
        self.inboxes.len() as u32
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::push_unlimited()
    }

    fn send<'a>(
        &'a self,
        dst: Rank,
        tag: Tag,
        data: &'a [u8],
        _deadline: Instant,
    ) -> BoxFuture<'a, Result<()>> {
        // Delivery happens here, synchronously, which fixes the message's place in the order.
        let r = check_rank(dst, self.size()).map(|()| {
            self.inboxes[dst.idx()].deliver(self.rank, tag, data.to_vec());
        });
        futures::future::ready(r).boxed()
    }

    fn recv(&self, src: Rank, tag: Tag, deadline: Instant) -> BoxFuture<'_, Result<Vec<u8>>> {
        if let Err(e) = check_rank(src, self.size()) {
            return futures::future::ready(Err(e)).boxed();
        }
        self.inbox().recv(src, tag, deadline).boxed()
    }
}

impl Drop for MemoryChannel {
    fn drop(&mut self) {
        for (r, inbox) in self.inboxes.iter().enumerate() {
            if r != self.rank.idx() {
                inbox.peer_lost(self.rank);
            }
        }
        self.inbox().close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conformance;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn memory_channel_passes_conformance() {
        conformance::run_all(|n| async move {
            let job = JobId::new("conformance").expect("valid job id");
            Ok(world(job, n)
                .into_iter()
                .map(|c| Arc::new(c) as Arc<dyn Channel>)
                .collect())
        })
        .await;
    }
}
