//! Call-order serialisation of writers.

use std::collections::BTreeSet;
use std::future::poll_fn;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

/// Lets async writers take turns in the order they **called** [`Turnstile::join`], not the order
/// in which their futures happen to be polled. A transport uses it so that a message's place on
/// the wire is fixed at `send` time, as the [`crate::Channel`] contract requires.
///
/// Each turn is a numbered ticket; a turn is ready once every lower ticket has been dropped. A
/// turn dropped before its writer ran (a cancelled send) simply passes the baton on. Taking,
/// checking and dropping an uncontended turn allocates nothing (it runs for every message).
#[derive(Debug, Default)]
pub struct Turnstile {
    line: Arc<Line>,
}

#[derive(Debug, Default)]
struct Line {
    /// The next ticket to hand out.
    next: AtomicU64,
    /// The ticket whose turn it is: every lower one has been dropped. Changed only under `state`.
    serving: AtomicU64,
    state: Mutex<LineState>,
}

#[derive(Debug, Default)]
struct LineState {
    /// Tickets dropped before their turn came; skipped when it does.
    left: BTreeSet<u64>,
    /// Turns waiting to be told that their turn has come.
    waiting: Vec<(u64, Waker)>,
}

impl Line {
    fn lock(&self) -> MutexGuard<'_, LineState> {
        // Every update is a single insert or remove, so a poisoned lock is still consistent.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A place in a [`Turnstile`]'s queue. Await [`Turn::ready`]; drop the turn to let the next
/// writer go.
#[derive(Debug)]
pub struct Turn {
    line: Arc<Line>,
    ticket: u64,
}

impl Turnstile {
    /// An empty turnstile.
    pub fn new() -> Turnstile {
        Turnstile::default()
    }

    /// Takes the next place in line.
    pub fn join(&self) -> Turn {
        Turn {
            line: Arc::clone(&self.line),
            ticket: self.line.next.fetch_add(1, Ordering::AcqRel),
        }
    }
}

impl Turn {
    /// Resolves once every earlier turn has been dropped. Cancel-safe: a `ready` dropped before
    /// it resolved leaves the turn waiting where it was.
    pub async fn ready(&mut self) {
        poll_fn(|cx| self.poll_ready(cx)).await
    }

    /// Whether every earlier turn has been dropped already, without waiting.
    pub(crate) fn try_ready(&mut self) -> bool {
        self.line.serving.load(Ordering::Acquire) == self.ticket
    }

    fn poll_ready(&self, cx: &mut Context<'_>) -> Poll<()> {
        if self.line.serving.load(Ordering::Acquire) == self.ticket {
            return Poll::Ready(());
        }
        let mut st = self.line.lock();
        // `serving` only moves under the lock, so this second look cannot miss a wake-up.
        if self.line.serving.load(Ordering::Acquire) == self.ticket {
            return Poll::Ready(());
        }
        match st.waiting.iter_mut().find(|(t, _)| *t == self.ticket) {
            Some((_, w)) => w.clone_from(cx.waker()),
            None => st.waiting.push((self.ticket, cx.waker().clone())),
        }
        Poll::Pending
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        let line = &self.line;
        let mut st = line.lock();
        if !st.waiting.is_empty() {
            st.waiting.retain(|(t, _)| *t != self.ticket);
        }
        let mut serving = line.serving.load(Ordering::Acquire);
        if serving != self.ticket {
            // Not our turn yet: whoever reaches our ticket skips it.
            st.left.insert(self.ticket);
            return;
        }
        serving += 1;
        while st.left.remove(&serving) {
            serving += 1;
        }
        line.serving.store(serving, Ordering::Release);
        let next = st.waiting.iter().position(|(t, _)| *t == serving);
        let waker = next.map(|i| st.waiting.swap_remove(i).1);
        drop(st);
        if let Some(w) = waker {
            w.wake();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[tokio::test]
    async fn turns_follow_call_order_not_poll_order() {
        let t = Turnstile::new();
        let log = Arc::new(Mutex::new(Vec::new()));
        let mut handles = Vec::new();
        let mut turns: Vec<Turn> = (0..5).map(|_| t.join()).collect();
        // Spawn in reverse order: the turnstile still runs them 0..5.
        for i in (0..5).rev() {
            let mut turn = turns.pop().expect("five turns");
            let log = Arc::clone(&log);
            handles.push(tokio::spawn(async move {
                turn.ready().await;
                log.lock().expect("lock").push(i);
                tokio::task::yield_now().await;
                drop(turn);
            }));
        }
        for h in handles {
            h.await.expect("task");
        }
        assert_eq!(*log.lock().expect("lock"), vec![0, 1, 2, 3, 4]);
    }

    #[tokio::test]
    async fn a_dropped_turn_passes_the_baton() {
        let t = Turnstile::new();
        let first = t.join();
        let mut second = t.join();
        drop(first);
        tokio::time::timeout(std::time::Duration::from_secs(1), second.ready())
            .await
            .expect("second turn runs");
    }

    #[tokio::test]
    async fn a_turn_left_in_the_middle_is_skipped() {
        let t = Turnstile::new();
        let mut first = t.join();
        let second = t.join();
        let mut third = t.join();
        assert!(first.try_ready());
        assert!(!third.try_ready());
        let waiting = tokio::spawn(async move {
            third.ready().await;
            third
        });
        // The second leaves before its turn, then the first finishes: the third goes next.
        drop(second);
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        first.ready().await;
        drop(first);
        let mut third = tokio::time::timeout(std::time::Duration::from_secs(5), waiting)
            .await
            .expect("third turn runs")
            .expect("task");
        assert!(third.try_ready());
        // And a later turn waits for the third.
        let mut fourth = t.join();
        assert!(!fourth.try_ready());
        drop(third);
        assert!(fourth.try_ready());
    }
}
