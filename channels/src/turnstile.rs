//! Call-order serialisation of writers.

use std::sync::Mutex;

use tokio::sync::oneshot;

/// Lets async writers take turns in the order they **called** [`Turnstile::join`], not the order
/// in which their futures happen to be polled. A transport uses it so that a message's place on
/// the wire is fixed at `send` time, as the [`crate::Channel`] contract requires.
///
/// Each turn is a link in a chain: it waits for its predecessor's [`Turn`] to be dropped. A turn
/// dropped before its writer ran (a cancelled send) simply passes the baton on.
#[derive(Debug, Default)]
pub struct Turnstile {
    tail: Mutex<Option<oneshot::Receiver<()>>>,
}

/// A place in a [`Turnstile`]'s queue. Await [`Turn::ready`]; drop the turn to let the next
/// writer go.
#[derive(Debug)]
pub struct Turn {
    wait: Option<oneshot::Receiver<()>>,
    _done: oneshot::Sender<()>,
}

impl Turnstile {
    /// An empty turnstile.
    pub fn new() -> Turnstile {
        Turnstile::default()
    }

    /// Takes the next place in line.
    pub fn join(&self) -> Turn {
        let (tx, rx) = oneshot::channel();
        let prev = self
            .tail
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .replace(rx);
        Turn {
            wait: prev,
            _done: tx,
        }
    }
}

impl Turn {
    /// Resolves once every earlier turn has been dropped. Cancel-safe: a `ready` dropped before
    /// it resolved leaves the turn waiting where it was.
    pub async fn ready(&mut self) {
        if let Some(rx) = self.wait.as_mut() {
            // Err means the predecessor was dropped without signalling: its turn is over too.
            let _ = rx.await;
            self.wait = None;
        }
    }

    /// Whether every earlier turn has been dropped already, without waiting (so the common,
    /// uncontended case needs no timer).
    pub(crate) fn try_ready(&mut self) -> bool {
        let done = match self.wait.as_mut() {
            None => true,
            Some(rx) => !matches!(rx.try_recv(), Err(oneshot::error::TryRecvError::Empty)),
        };
        if done {
            self.wait = None;
        }
        done
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
}
