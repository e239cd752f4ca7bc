//! Matching of incoming messages to waiting receivers, shared by every push channel.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet, VecDeque};
use std::future::Future;
use std::hash::{BuildHasherDefault, Hasher};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, Weak};
use std::task::{Context, Poll};

use tokio::sync::{oneshot, Notify};
use tokio::time::Instant;

use crate::{Error, Rank, Result, Tag};

/// Where a registered receiver's answer goes.
enum Reply {
    Chan(oneshot::Sender<Result<Vec<u8>>>),
    /// A [`Reservation`] that has not waited yet: its answer is kept in [`State::answers`]
    /// until it looks (it always looks before it waits, see [`Inbox::reserve`]).
    Lazy,
}

impl Reply {
    /// Whether the receiver gave up (its receive was dropped). A lazy one removes itself when
    /// dropped, so it is never found given up.
    fn is_closed(&self) -> bool {
        match self {
            Reply::Chan(tx) => tx.is_closed(),
            Reply::Lazy => false,
        }
    }
}

type Answers = HashMap<u64, Result<Vec<u8>>, BuildHasherDefault<KeyHasher>>;

/// Answers `w` with `r` (a failure: nothing is handed back if the receiver gave up).
fn settle(answers: &mut Answers, w: Waiter, r: Result<Vec<u8>>) {
    match w.reply {
        Reply::Chan(tx) => {
            let _ = tx.send(r);
        }
        Reply::Lazy => {
            answers.insert(w.ticket, r);
        }
    }
}

/// A registered receiver.
struct Waiter {
    reply: Reply,
    deadline: Instant,
    started: Instant,
    /// Names this receiver for [`Inbox::is_next`] and [`Inbox::withdraw`] (0: unnamed).
    ticket: u64,
}

#[derive(Default)]
struct Slot {
    msgs: VecDeque<Vec<u8>>,
    waiters: VecDeque<Waiter>,
}

impl Slot {
    fn is_empty(&self) -> bool {
        self.msgs.is_empty() && self.waiters.is_empty()
    }
}

/// A multiplicative hasher for `(Rank, Tag)` keys, for the inbox and other channels' per-message
/// maps: the keys are not chosen by an adversary (a peer can only use tags its own program
/// uses), and SipHash showed up in per-message profiles.
#[derive(Default, Debug, Clone, Copy)]
pub struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }

    fn write_u32(&mut self, n: u32) {
        self.write_u64(u64::from(n));
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(0x517c_c1b7_2722_0a95);
    }
}

/// Emptied slots stay in the map (so a key used again and again does not allocate and free its
/// queues every time) until the map holds this many keys; then empty ones are swept.
const SWEEP_MIN: usize = 64;

struct State {
    slots: HashMap<(Rank, Tag), Slot, BuildHasherDefault<KeyHasher>>,
    /// Answers to lazy receivers ([`Reply::Lazy`]) not collected yet, by ticket.
    answers: Answers,
    /// Sweep empty slots when a new key would make the map this large.
    sweep_at: usize,
    lost: HashSet<Rank>,
    /// Set by [`Inbox::abort`]: the rank whose failure broke the job, and who reported it.
    aborted: Option<(Rank, Option<Rank>)>,
    closed: bool,
    buffered: usize,
    /// When the deadline keeper will next look at this inbox (no later than the earliest
    /// deadline of its waiters); `None` while it has no reason to.
    armed: Option<Instant>,
}

impl Default for State {
    fn default() -> State {
        State {
            slots: HashMap::default(),
            answers: Answers::default(),
            sweep_at: SWEEP_MIN,
            lost: HashSet::new(),
            aborted: None,
            closed: false,
            buffered: 0,
            armed: None,
        }
    }
}

impl State {
    /// The slot of `key`, made if needed (sweeping empty slots first if the map has grown).
    fn slot(&mut self, key: (Rank, Tag)) -> &mut Slot {
        if self.slots.len() >= self.sweep_at && !self.slots.contains_key(&key) {
            self.slots.retain(|_, slot| !slot.is_empty());
            self.sweep_at = SWEEP_MIN.max(2 * self.slots.len());
        }
        self.slots.entry(key).or_default()
    }
}

/// One rank's incoming messages, keyed by `(source, tag)`.
///
/// A delivered message goes straight to the oldest waiting receiver for its key, or is buffered
/// until one comes. Receivers register synchronously in [`Inbox::recv`], so they are matched in
/// call order; a receiver whose deadline passes never swallows a message (the message goes to the
/// next receiver or stays buffered). Transports that read from a socket use
/// [`Inbox::wait_for_space`] to stop reading while too many unexpected bytes are buffered, which
/// back-pressures the sender instead of growing memory without bound.
///
/// Deadlines are kept by one process-wide thread ("fmi-deadlines") rather than a tokio timer per
/// receive. A timer per receive put a timeout on every wait of the thread that drives the
/// runtime, and in a VM arming and cancelling that kernel timer for every message cost a
/// twentieth of a small message's round trip. The thread sleeps until the earliest deadline it
/// was told of and is woken early only when a receive comes with an earlier deadline than every
/// inbox's next look (a loop of receives with the same timeout never wakes it); it then ends the
/// overdue waits with [`Error::Timeout`], under the inbox's lock, so a message and a deadline
/// cannot both claim a receiver.
pub struct Inbox {
    me: Rank,
    channel: &'static str,
    state: Mutex<State>,
    /// `State::buffered`, readable without the lock (written under it).
    buffered: AtomicUsize,
    space: Notify,
    /// The last ticket handed out by [`Inbox::recv_ticketed`].
    tickets: AtomicU64,
}

impl std::fmt::Debug for Inbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inbox")
            .field("me", &self.me)
            .field("channel", &self.channel)
            .finish_non_exhaustive()
    }
}

impl Inbox {
    /// An empty inbox of rank `me` on channel `channel`.
    pub fn new(me: Rank, channel: &'static str) -> Arc<Inbox> {
        Arc::new(Inbox {
            me,
            channel,
            state: Mutex::new(State::default()),
            buffered: AtomicUsize::new(0),
            space: Notify::new(),
            tickets: AtomicU64::new(0),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock cannot leave the maps inconsistent (every update is a
        // single insert or remove), so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Hands a message from `src` with `tag` to its receiver, or buffers it.
    pub fn deliver(&self, src: Rank, tag: Tag, mut msg: Vec<u8>) {
        let mut guard = self.lock();
        let st = &mut *guard;
        if st.closed || st.aborted.is_some() {
            return;
        }
        let slot = st.slot((src, tag));
        while let Some(w) = slot.waiters.pop_front() {
            match w.reply {
                Reply::Chan(tx) => match tx.send(Ok(msg)) {
                    Ok(()) => return,
                    // That receiver gave up (deadline or dropped): try the next one.
                    Err(Ok(m)) => msg = m,
                    Err(Err(_)) => return,
                },
                Reply::Lazy => {
                    st.answers.insert(w.ticket, Ok(msg));
                    return;
                }
            }
        }
        let len = msg.len();
        slot.msgs.push_back(msg);
        st.buffered += len;
        self.buffered.store(st.buffered, Ordering::Relaxed);
    }

    /// Waits for the next message from `src` with `tag`. The receiver is registered before this
    /// returns, so the order of calls is the order of matching. Fails with [`Error::Timeout`]
    /// once `deadline` has passed.
    pub fn recv(
        self: &Arc<Self>,
        src: Rank,
        tag: Tag,
        deadline: Instant,
    ) -> impl Future<Output = Result<Vec<u8>>> + Send + 'static {
        self.recv_as(src, tag, deadline, 0).1
    }

    /// Like [`Inbox::recv`], and also returns a ticket naming the registered receiver, for
    /// transports that can place a message straight into the receiver's own buffer (see
    /// [`Inbox::is_next`]). `None` when the receive finished at once (a buffered message was
    /// taken, or it failed).
    pub fn recv_ticketed(
        self: &Arc<Self>,
        src: Rank,
        tag: Tag,
        deadline: Instant,
    ) -> (
        Option<u64>,
        impl Future<Output = Result<Vec<u8>>> + Send + 'static,
    ) {
        let ticket = self.tickets.fetch_add(1, Ordering::Relaxed) + 1;
        let (waiting, fut) = self.recv_as(src, tag, deadline, ticket);
        (waiting.then_some(ticket), fut)
    }

    /// Registers a receive like [`Inbox::recv_ticketed`], without a channel to answer it
    /// through until it has to wait: for a transport that usually places the message in the
    /// receiver's buffer itself ([`Inbox::claim`]) while the receive runs, so that such a
    /// receive costs no `oneshot` (an allocation, and atomics to make, poll and drop it).
    ///
    /// The caller must poll the [`Reservation`] before its own future returns
    /// `Poll::Pending`: an answer that came meanwhile (a message delivered by another task, the
    /// deadline, a loss) is kept for that poll, which otherwise makes the channel and registers
    /// the waker. When the transport took the receive out itself ([`Inbox::claim`] or
    /// [`Inbox::withdraw`] returned `true`), it says so with [`Reservation::taken`].
    ///
    /// With `lazy` false the channel is made at once, as by [`Inbox::recv_ticketed`]: for a
    /// receive that will surely wait (its transport does not spin), making it later would cost
    /// one more look in the inbox.
    pub fn reserve<'a>(
        self: &'a Arc<Self>,
        src: Rank,
        tag: Tag,
        deadline: Instant,
        lazy: bool,
    ) -> Reservation<'a> {
        let ticket = self.tickets.fetch_add(1, Ordering::Relaxed) + 1;
        let (reply, rx) = if lazy {
            (Reply::Lazy, None)
        } else {
            let (tx, rx) = oneshot::channel();
            (Reply::Chan(tx), Some(rx))
        };
        let state = match (self.register_as(src, tag, deadline, ticket, reply), rx) {
            (Ok(msg), _) => ResState::Answered(Some(Ok(msg))),
            (Err(Err(e)), _) => ResState::Answered(Some(Err(e))),
            (Err(Ok(())), None) => ResState::Lazy,
            (Err(Ok(())), Some(rx)) => ResState::Chan(rx),
        };
        Reservation {
            inbox: self,
            key: (src, tag),
            ticket,
            state,
        }
    }

    /// Whether the next message from `src` with `tag` would go to the receiver `ticket`: it is
    /// the oldest receiver of that key still waiting (receivers that gave up are skipped).
    pub fn is_next(&self, src: Rank, tag: Tag, ticket: u64) -> bool {
        let st = self.lock();
        if st.closed || st.aborted.is_some() {
            return false;
        }
        st.slots.get(&(src, tag)).is_some_and(|slot| {
            slot.msgs.is_empty()
                && slot
                    .waiters
                    .iter()
                    .find(|w| !w.reply.is_closed())
                    .is_some_and(|w| w.ticket == ticket)
        })
    }

    /// [`Inbox::is_next`] and [`Inbox::withdraw`] in one step: if the next message from `src`
    /// with `tag` would go to the receiver `ticket`, removes that receiver and returns `true`.
    /// For a transport that has the whole message at hand and places it in the receiver's own
    /// buffer right away, so that nothing (a deadline, a loss) can answer the receiver between
    /// the two looks, and the inbox is locked once instead of twice.
    pub fn claim(&self, src: Rank, tag: Tag, ticket: u64) -> bool {
        let mut st = self.lock();
        if st.closed || st.aborted.is_some() {
            return false;
        }
        let Some(slot) = st.slots.get_mut(&(src, tag)) else {
            return false;
        };
        if !slot.msgs.is_empty() {
            return false;
        }
        // Receivers that gave up before it are skipped (and dropped: nothing can answer them).
        while let Some(w) = slot.waiters.front() {
            if w.ticket == ticket {
                slot.waiters.pop_front();
                return true;
            }
            if !w.reply.is_closed() {
                return false;
            }
            slot.waiters.pop_front();
        }
        false
    }

    /// Whether a receiver is waiting for the next message from `src` with `tag` (one that has
    /// not given up).
    pub fn has_waiter(&self, src: Rank, tag: Tag) -> bool {
        let st = self.lock();
        st.slots
            .get(&(src, tag))
            .is_some_and(|slot| slot.waiters.iter().any(|w| !w.reply.is_closed()))
    }

    /// Removes the receiver `ticket`, which got its message from the transport directly (the
    /// transport made sure with [`Inbox::is_next`] that no other message could be due to it
    /// first). `false` if it had already been answered (deadline, lost peer, closed inbox).
    pub fn withdraw(&self, src: Rank, tag: Tag, ticket: u64) -> bool {
        let mut st = self.lock();
        let Some(slot) = st.slots.get_mut(&(src, tag)) else {
            return false;
        };
        match slot.waiters.iter().position(|w| w.ticket == ticket) {
            Some(i) => {
                slot.waiters.remove(i);
                true
            }
            None => false,
        }
    }

    fn recv_as(
        self: &Arc<Self>,
        src: Rank,
        tag: Tag,
        deadline: Instant,
        ticket: u64,
    ) -> (bool, impl Future<Output = Result<Vec<u8>>> + Send + 'static) {
        let registered = self.register(src, tag, deadline, ticket);
        let waiting = matches!(registered, Err(Ok(_)));
        let channel = self.channel;
        let fut = async move {
            match registered {
                Ok(msg) => Ok(msg),
                Err(Err(e)) => Err(e),
                // The deadline keeper answers with `Error::Timeout` at the deadline.
                Err(Ok(rx)) => rx.await.unwrap_or(Err(Error::Closed { channel })),
            }
        };
        (waiting, fut)
    }

    fn timeout(&self, peer: Rank, tag: Tag, deadline: Instant, started: Instant) -> Error {
        Error::Timeout {
            me: self.me,
            peer,
            waited: deadline.saturating_duration_since(started),
            channel: self.channel,
            tag,
        }
    }

    /// Takes a buffered message or registers a waiter.
    #[allow(clippy::type_complexity)]
    fn register(
        self: &Arc<Self>,
        src: Rank,
        tag: Tag,
        deadline: Instant,
        ticket: u64,
    ) -> std::result::Result<Vec<u8>, Result<oneshot::Receiver<Result<Vec<u8>>>>> {
        let (tx, rx) = oneshot::channel();
        self.register_as(src, tag, deadline, ticket, Reply::Chan(tx))
            .map_err(|e| e.map(|()| rx))
    }

    /// Takes a buffered message, fails, or registers a waiter answered through `reply`.
    fn register_as(
        self: &Arc<Self>,
        src: Rank,
        tag: Tag,
        deadline: Instant,
        ticket: u64,
        reply: Reply,
    ) -> std::result::Result<Vec<u8>, Result<()>> {
        let mut st = self.lock();
        let key = (src, tag);
        if let Some(slot) = st.slots.get_mut(&key) {
            if let Some(msg) = slot.msgs.pop_front() {
                st.buffered -= msg.len();
                self.buffered.store(st.buffered, Ordering::Relaxed);
                drop(st);
                self.space.notify_waiters();
                return Ok(msg);
            }
        }
        if st.closed {
            return Err(Err(Error::Closed {
                channel: self.channel,
            }));
        }
        if let Some((victim, via)) = st.aborted {
            return Err(Err(self.aborted_error(victim, via)));
        }
        if st.lost.contains(&src) {
            return Err(Err(self.lost_error(src)));
        }
        st.slot(key).waiters.push_back(Waiter {
            reply,
            deadline,
            started: Instant::now(),
            ticket,
        });
        // The keeper must look no later than this deadline.
        let arm = st.armed.is_none_or(|armed| deadline < armed);
        if arm {
            st.armed = Some(deadline);
        }
        drop(st);
        if arm {
            keeper().arm(deadline, Arc::downgrade(self));
        }
        Err(Ok(()))
    }

    /// Ends the waits whose deadline has passed with [`Error::Timeout`], drops waiters whose
    /// receive was cancelled, and returns when to look next (the earliest remaining deadline),
    /// if the keeper's look at `looked` is still this inbox's next one (else `None`: a later
    /// [`Deadlines::arm`] superseded it).
    fn expire(&self, looked: Instant, now: Instant) -> Option<Instant> {
        let mut guard = self.lock();
        let st = &mut *guard;
        if st.armed != Some(looked) {
            return None;
        }
        let mut next: Option<Instant> = None;
        for (&(src, tag), slot) in st.slots.iter_mut() {
            if slot.waiters.is_empty() {
                continue;
            }
            for w in std::mem::take(&mut slot.waiters) {
                if w.reply.is_closed() {
                    continue;
                }
                if w.deadline <= now {
                    let e = self.timeout(src, tag, w.deadline, w.started);
                    settle(&mut st.answers, w, Err(e));
                } else {
                    next = Some(next.map_or(w.deadline, |n| n.min(w.deadline)));
                    slot.waiters.push_back(w);
                }
            }
        }
        st.armed = next;
        next
    }

    fn lost_error(&self, peer: Rank) -> Error {
        self.aborted_error(peer, None)
    }

    fn aborted_error(&self, peer: Rank, via: Option<Rank>) -> Error {
        Error::PeerLost {
            me: self.me,
            peer,
            channel: self.channel,
            via,
        }
    }

    /// Revokes the inbox because rank `victim` failed (reported by rank `via`, or seen by this
    /// rank itself if `None`): every waiting receiver fails with [`Error::PeerLost`] naming
    /// `victim` now, every later one at once, buffered messages are dropped and arriving ones
    /// discarded (after a revoke nothing is delivered, as after ULFM's `MPIX_Comm_revoke`). The
    /// first abort wins; later ones change nothing. Returns whether this call revoked it.
    pub fn abort(&self, victim: Rank, via: Option<Rank>) -> bool {
        let mut guard = self.lock();
        let st = &mut *guard;
        if st.aborted.is_some() || st.closed {
            return false;
        }
        st.aborted = Some((victim, via));
        for (_, slot) in st.slots.drain() {
            for w in slot.waiters {
                settle(&mut st.answers, w, Err(self.aborted_error(victim, via)));
            }
        }
        st.buffered = 0;
        self.buffered.store(0, Ordering::Relaxed);
        drop(guard);
        self.space.notify_waiters();
        true
    }

    /// The rank whose failure revoked this inbox and who reported it (see [`Inbox::abort`]).
    pub fn aborted(&self) -> Option<(Rank, Option<Rank>)> {
        self.lock().aborted
    }

    /// Marks `src` as gone: its waiting receivers fail with [`Error::PeerLost`] now, later ones
    /// once the messages it sent before leaving have been taken.
    pub fn peer_lost(&self, src: Rank) {
        let mut guard = self.lock();
        let st = &mut *guard;
        st.lost.insert(src);
        for ((s, _), slot) in st.slots.iter_mut() {
            if *s == src {
                for w in slot.waiters.drain(..) {
                    settle(&mut st.answers, w, Err(self.lost_error(src)));
                }
            }
        }
        st.slots.retain(|_, slot| !slot.is_empty());
    }

    /// Whether `src` has been marked lost.
    pub fn is_lost(&self, src: Rank) -> bool {
        self.lock().lost.contains(&src)
    }

    /// Closes the inbox: every waiter fails with [`Error::Closed`], buffered messages are dropped.
    pub fn close(&self) {
        let mut guard = self.lock();
        let st = &mut *guard;
        st.closed = true;
        for (_, slot) in st.slots.drain() {
            for w in slot.waiters {
                let closed = Error::Closed {
                    channel: self.channel,
                };
                settle(&mut st.answers, w, Err(closed));
            }
        }
        st.buffered = 0;
        self.buffered.store(0, Ordering::Relaxed);
        drop(guard);
        self.space.notify_waiters();
    }

    /// Bytes of messages buffered without a receiver.
    pub fn buffered_bytes(&self) -> usize {
        self.buffered.load(Ordering::Relaxed)
    }

    /// Number of `(source, tag)` keys with buffered messages or waiters (for leak tests).
    pub fn pending_keys(&self) -> usize {
        self.lock().slots.values().filter(|s| !s.is_empty()).count()
    }

    /// Waits until fewer than `bound` bytes are buffered (or the inbox is closed).
    pub async fn wait_for_space(&self, bound: usize) {
        loop {
            let notified = self.space.notified();
            {
                let st = self.lock();
                if st.buffered < bound || st.closed || st.aborted.is_some() {
                    return;
                }
            }
            notified.await;
        }
    }
}

/// A receive registered by [`Inbox::reserve`]; a future of its message.
pub struct Reservation<'a> {
    inbox: &'a Inbox,
    key: (Rank, Tag),
    ticket: u64,
    state: ResState,
}

enum ResState {
    /// Answered at registration (a buffered message, or a failure); `None` once returned.
    Answered(Option<Result<Vec<u8>>>),
    /// Registered as [`Reply::Lazy`].
    Lazy,
    /// Waiting through a channel.
    Chan(oneshot::Receiver<Result<Vec<u8>>>),
    /// Taken out by the transport, or answered and returned.
    Done,
}

impl Reservation<'_> {
    /// The receive's ticket (for [`Inbox::claim`], [`Inbox::is_next`], [`Inbox::withdraw`]);
    /// `None` if it was answered at registration.
    pub fn ticket(&self) -> Option<u64> {
        match self.state {
            ResState::Lazy | ResState::Chan(_) => Some(self.ticket),
            ResState::Answered(_) | ResState::Done => None,
        }
    }

    /// Whether the receive waits through a channel, so that polling it is cheap and needed
    /// for a wake-up (before that, a poll looks in the inbox and makes the channel).
    pub fn is_waiting(&self) -> bool {
        matches!(self.state, ResState::Chan(_))
    }

    /// The transport took the receive out of the inbox and answered it itself
    /// ([`Inbox::claim`] or [`Inbox::withdraw`] returned `true`): nothing is left to clean up.
    pub fn taken(&mut self) {
        self.state = ResState::Done;
    }

    fn closed(&self) -> Error {
        Error::Closed {
            channel: self.inbox.channel,
        }
    }
}

impl Future for Reservation<'_> {
    type Output = Result<Vec<u8>>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<Vec<u8>>> {
        let this = &mut *self;
        if let ResState::Lazy = this.state {
            let mut st = this.inbox.lock();
            if let Some(r) = st.answers.remove(&this.ticket) {
                drop(st);
                this.state = ResState::Done;
                return Poll::Ready(r);
            }
            let ticket = this.ticket;
            let waiter = st
                .slots
                .get_mut(&this.key)
                .and_then(|slot| slot.waiters.iter_mut().find(|w| w.ticket == ticket));
            match waiter {
                Some(w) => {
                    let (tx, rx) = oneshot::channel();
                    w.reply = Reply::Chan(tx);
                    drop(st);
                    this.state = ResState::Chan(rx);
                }
                None => {
                    // Taken out by the transport without saying so: nothing will answer.
                    drop(st);
                    this.state = ResState::Done;
                    return Poll::Ready(Err(this.closed()));
                }
            }
        }
        match &mut this.state {
            ResState::Chan(rx) => match Pin::new(rx).poll(cx) {
                Poll::Ready(r) => {
                    let r = r.unwrap_or_else(|_| Err(this.closed()));
                    this.state = ResState::Done;
                    Poll::Ready(r)
                }
                Poll::Pending => Poll::Pending,
            },
            ResState::Answered(r) => {
                let r = r.take().unwrap_or_else(|| Err(this.closed()));
                this.state = ResState::Done;
                Poll::Ready(r)
            }
            ResState::Lazy | ResState::Done => Poll::Ready(Err(this.closed())),
        }
    }
}

impl Drop for Reservation<'_> {
    /// A lazy receive removes its waiter, or the answer kept for it (a message in it is
    /// dropped, as a cancelled receive's message is when it came through a channel).
    fn drop(&mut self) {
        if !matches!(self.state, ResState::Lazy) {
            return;
        }
        let mut st = self.inbox.lock();
        if st.answers.remove(&self.ticket).is_some() {
            return;
        }
        let ticket = self.ticket;
        if let Some(slot) = st.slots.get_mut(&self.key) {
            if let Some(i) = slot.waiters.iter().position(|w| w.ticket == ticket) {
                slot.waiters.remove(i);
            }
        }
    }
}

/// The process-wide deadline keeper (see [`Inbox`]): a heap of (when to look, which inbox),
/// served by one thread that is started on first use.
struct Deadlines {
    due: Mutex<BinaryHeap<Reverse<Due>>>,
    wake: Condvar,
}

/// One inbox to look at, at `at`.
struct Due {
    at: Instant,
    inbox: Weak<Inbox>,
}

impl PartialEq for Due {
    fn eq(&self, other: &Due) -> bool {
        self.at == other.at
    }
}

impl Eq for Due {}

impl PartialOrd for Due {
    fn partial_cmp(&self, other: &Due) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Due {
    fn cmp(&self, other: &Due) -> std::cmp::Ordering {
        self.at.cmp(&other.at)
    }
}

fn keeper() -> &'static Deadlines {
    static KEEPER: OnceLock<Deadlines> = OnceLock::new();
    KEEPER.get_or_init(|| {
        let spawned = std::thread::Builder::new()
            .name("fmi-deadlines".into())
            .spawn(|| keeper().run());
        if let Err(e) = spawned {
            // Without the thread no receive could time out; there is no sensible way on.
            panic!("fmi: cannot start the deadline thread: {e}");
        }
        Deadlines {
            due: Mutex::new(BinaryHeap::new()),
            wake: Condvar::new(),
        }
    })
}

impl Deadlines {
    fn lock(&self) -> MutexGuard<'_, BinaryHeap<Reverse<Due>>> {
        self.due.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Looks at `inbox` at `at`; wakes the thread if that is earlier than anything it waits for.
    fn arm(&self, at: Instant, inbox: Weak<Inbox>) {
        let mut due = self.lock();
        let earliest = due.peek().is_none_or(|Reverse(d)| at < d.at);
        due.push(Reverse(Due { at, inbox }));
        drop(due);
        if earliest {
            self.wake.notify_one();
        }
    }

    fn run(&self) {
        let mut due = self.lock();
        loop {
            let now = Instant::now();
            let mut overdue = Vec::new();
            while due.peek().is_some_and(|Reverse(d)| d.at <= now) {
                if let Some(Reverse(d)) = due.pop() {
                    overdue.push(d);
                }
            }
            if !overdue.is_empty() {
                // Inboxes are looked at without the heap's lock (they take it to arm).
                drop(due);
                let again: Vec<Due> = overdue
                    .into_iter()
                    .filter_map(|d| {
                        let inbox = d.inbox.upgrade()?;
                        let next = inbox.expire(d.at, now)?;
                        Some(Due {
                            at: next,
                            inbox: d.inbox,
                        })
                    })
                    .collect();
                due = self.lock();
                due.extend(again.into_iter().map(Reverse));
                continue;
            }
            due = match due.peek() {
                Some(Reverse(d)) => {
                    let wait = d.at.saturating_duration_since(now);
                    self.wake
                        .wait_timeout(due, wait)
                        .unwrap_or_else(|e| e.into_inner())
                        .0
                }
                None => self.wake.wait(due).unwrap_or_else(|e| e.into_inner()),
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn soon(ms: u64) -> Instant {
        Instant::now() + Duration::from_millis(ms)
    }

    #[tokio::test]
    async fn timed_out_receiver_does_not_swallow_a_message() {
        let inbox = Inbox::new(Rank(0), "test");
        let r = inbox.recv(Rank(1), Tag::user(1), soon(10)).await;
        assert!(matches!(r, Err(Error::Timeout { peer: Rank(1), .. })));
        inbox.deliver(Rank(1), Tag::user(1), vec![7]);
        let m = inbox.recv(Rank(1), Tag::user(1), soon(10)).await;
        assert_eq!(m.ok(), Some(vec![7]));
        assert_eq!(inbox.pending_keys(), 0);
        assert_eq!(inbox.buffered_bytes(), 0);
    }

    #[tokio::test]
    async fn receivers_match_in_call_order() {
        let inbox = Inbox::new(Rank(0), "test");
        let a = inbox.recv(Rank(1), Tag::user(0), soon(1000));
        let b = inbox.recv(Rank(1), Tag::user(0), soon(1000));
        inbox.deliver(Rank(1), Tag::user(0), vec![1]);
        inbox.deliver(Rank(1), Tag::user(0), vec![2]);
        let (b, a) = tokio::join!(b, a);
        assert_eq!(a.ok(), Some(vec![1]));
        assert_eq!(b.ok(), Some(vec![2]));
    }

    #[tokio::test]
    async fn lost_peer_fails_waiters_but_keeps_buffered_messages() {
        let inbox = Inbox::new(Rank(0), "test");
        let waiting = inbox.recv(Rank(2), Tag::user(0), soon(5000));
        inbox.deliver(Rank(1), Tag::user(0), vec![1]);
        inbox.peer_lost(Rank(2));
        inbox.peer_lost(Rank(1));
        assert!(matches!(
            waiting.await,
            Err(Error::PeerLost { peer: Rank(2), .. })
        ));
        assert_eq!(
            inbox.recv(Rank(1), Tag::user(0), soon(10)).await.ok(),
            Some(vec![1])
        );
        assert!(matches!(
            inbox.recv(Rank(1), Tag::user(0), soon(10)).await,
            Err(Error::PeerLost { peer: Rank(1), .. })
        ));
    }

    #[tokio::test]
    async fn an_abort_fails_every_receive_and_names_the_victim() {
        let inbox = Inbox::new(Rank(0), "test");
        let waiting = inbox.recv(Rank(2), Tag::user(0), soon(5000));
        inbox.deliver(Rank(1), Tag::user(0), vec![1]);
        assert!(inbox.abort(Rank(3), Some(Rank(2))));
        // The first abort wins.
        assert!(!inbox.abort(Rank(1), None));
        assert_eq!(inbox.aborted(), Some((Rank(3), Some(Rank(2)))));
        let named = |r: Result<Vec<u8>>| {
            matches!(
                r,
                Err(Error::PeerLost {
                    me: Rank(0),
                    peer: Rank(3),
                    via: Some(Rank(2)),
                    ..
                })
            )
        };
        assert!(named(waiting.await));
        // Buffered messages are dropped, later ones discarded, later receives fail at once.
        assert!(named(inbox.recv(Rank(1), Tag::user(0), soon(5000)).await));
        inbox.deliver(Rank(1), Tag::user(0), vec![2]);
        assert!(named(inbox.recv(Rank(1), Tag::user(0), soon(5000)).await));
        assert_eq!(inbox.buffered_bytes(), 0);
        assert_eq!(inbox.pending_keys(), 0);
    }

    #[tokio::test]
    async fn a_claim_takes_only_the_next_receiver() {
        let inbox = Inbox::new(Rank(0), "test");
        let key = (Rank(1), Tag::user(4));
        let (first, a) = inbox.recv_ticketed(key.0, key.1, soon(5000));
        let (second, b) = inbox.recv_ticketed(key.0, key.1, soon(5000));
        let (first, second) = (first.expect("waiting"), second.expect("waiting"));
        // Not the second while the first waits.
        assert!(!inbox.claim(key.0, key.1, second));
        // A receiver that gave up is skipped.
        drop(a);
        assert!(inbox.claim(key.0, key.1, second));
        assert!(!inbox.claim(key.0, key.1, first));
        // Claimed: a message now is buffered, not handed to it.
        inbox.deliver(key.0, key.1, vec![1]);
        assert!(matches!(b.await, Err(Error::Closed { .. })));
        assert_eq!(inbox.buffered_bytes(), 1);
        // A receive that finds a buffered message takes it at once (nothing to claim).
        let (third, c) = inbox.recv_ticketed(key.0, key.1, soon(5000));
        assert_eq!(third, None);
        assert_eq!(c.await.ok(), Some(vec![1]));
        // A receiver already answered cannot be claimed.
        let (fourth, d) = inbox.recv_ticketed(key.0, key.1, soon(5000));
        inbox.deliver(key.0, key.1, vec![2]);
        assert!(!inbox.claim(key.0, key.1, fourth.expect("waiting")));
        assert_eq!(d.await.ok(), Some(vec![2]));
        assert_eq!(inbox.pending_keys(), 0);
    }

    /// Polls `r` once with a waker that does nothing.
    fn poll_once(r: &mut Reservation<'_>) -> Poll<Result<Vec<u8>>> {
        let mut cx = Context::from_waker(futures::task::noop_waker_ref());
        Pin::new(r).poll(&mut cx)
    }

    fn answers(inbox: &Inbox) -> usize {
        inbox.lock().answers.len()
    }

    #[tokio::test]
    async fn a_reservation_is_answered_before_and_after_it_waits() {
        let inbox = Inbox::new(Rank(0), "test");
        let key = (Rank(1), Tag::user(5));
        // A message delivered before the reservation's first poll is kept for that poll.
        let mut a = inbox.reserve(key.0, key.1, soon(5000), true);
        let mut b = inbox.reserve(key.0, key.1, soon(5000), true);
        assert!(a.ticket().is_some() && !a.is_waiting());
        inbox.deliver(key.0, key.1, vec![1]);
        assert_eq!(answers(&inbox), 1);
        // Order holds across lazy receivers: the second gets the second message.
        assert!(poll_once(&mut b).is_pending());
        assert!(b.is_waiting());
        assert!(matches!(poll_once(&mut a), Poll::Ready(Ok(ref m)) if m == &vec![1]));
        assert_eq!(a.ticket(), None);
        inbox.deliver(key.0, key.1, vec![2]);
        assert_eq!(b.await.ok(), Some(vec![2]));
        // A buffered message answers at registration: no ticket.
        inbox.deliver(key.0, key.1, vec![3]);
        let c = inbox.reserve(key.0, key.1, soon(5000), true);
        assert_eq!(c.ticket(), None);
        assert_eq!(c.await.ok(), Some(vec![3]));
        assert_eq!(answers(&inbox), 0);
        assert_eq!(inbox.pending_keys(), 0);
    }

    #[tokio::test]
    async fn a_claimed_reservation_leaves_nothing_and_the_next_message_goes_on() {
        let inbox = Inbox::new(Rank(0), "test");
        let key = (Rank(1), Tag::user(6));
        let mut a = inbox.reserve(key.0, key.1, soon(5000), true);
        let b = inbox.reserve(key.0, key.1, soon(5000), false);
        let ta = a.ticket().expect("waiting");
        assert!(!inbox.claim(key.0, key.1, b.ticket().expect("waiting")));
        assert!(inbox.claim(key.0, key.1, ta));
        a.taken();
        drop(a);
        inbox.deliver(key.0, key.1, vec![9]);
        assert_eq!(b.await.ok(), Some(vec![9]));
        assert_eq!(answers(&inbox), 0);
        assert_eq!(inbox.pending_keys(), 0);
    }

    #[tokio::test]
    async fn a_dropped_reservation_removes_its_waiter_and_its_answer() {
        let inbox = Inbox::new(Rank(0), "test");
        let key = (Rank(1), Tag::user(7));
        // Dropped while lazy and unanswered: the next message is buffered for the next receive.
        let a = inbox.reserve(key.0, key.1, soon(5000), true);
        drop(a);
        assert_eq!(inbox.pending_keys(), 0);
        inbox.deliver(key.0, key.1, vec![1]);
        assert_eq!(inbox.buffered_bytes(), 1);
        assert_eq!(
            inbox.recv(key.0, key.1, soon(100)).await.ok(),
            Some(vec![1])
        );
        // Dropped after it was answered (a loss): the kept answer goes with it.
        let b = inbox.reserve(key.0, key.1, soon(5000), true);
        inbox.peer_lost(Rank(1));
        assert_eq!(answers(&inbox), 1);
        drop(b);
        assert_eq!(answers(&inbox), 0);
        assert_eq!(inbox.pending_keys(), 0);
    }

    #[tokio::test]
    async fn lazy_reservations_get_their_deadline_abort_and_close() {
        // The deadline keeper answers a lazy receive; its poll returns the timeout.
        let inbox = Inbox::new(Rank(0), "test");
        let mut a = inbox.reserve(Rank(1), Tag::user(8), soon(20), true);
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(matches!(
            poll_once(&mut a),
            Poll::Ready(Err(Error::Timeout { peer: Rank(1), .. }))
        ));
        // An abort and a close reach lazy receives too.
        let b = inbox.reserve(Rank(2), Tag::user(8), soon(5000), true);
        inbox.abort(Rank(3), Some(Rank(2)));
        assert!(matches!(
            b.await,
            Err(Error::PeerLost {
                peer: Rank(3),
                via: Some(Rank(2)),
                ..
            })
        ));
        let inbox = Inbox::new(Rank(0), "test");
        let c = inbox.reserve(Rank(1), Tag::user(8), soon(5000), true);
        inbox.close();
        assert!(matches!(c.await, Err(Error::Closed { .. })));
        assert_eq!(answers(&inbox), 0);
    }

    #[tokio::test]
    async fn space_is_signalled_when_buffer_drains() {
        let inbox = Inbox::new(Rank(0), "test");
        inbox.deliver(Rank(1), Tag::user(0), vec![0; 100]);
        assert_eq!(inbox.buffered_bytes(), 100);
        let waiter = {
            let inbox = Arc::clone(&inbox);
            tokio::spawn(async move { inbox.wait_for_space(50).await })
        };
        tokio::time::sleep(Duration::from_millis(5)).await;
        assert!(!waiter.is_finished());
        let _ = inbox.recv(Rank(1), Tag::user(0), soon(10)).await;
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("space signalled")
            .expect("task ok");
    }

    #[tokio::test]
    async fn an_earlier_deadline_is_kept_after_later_ones() {
        let inbox = Inbox::new(Rank(0), "test");
        let long = inbox.recv(Rank(1), Tag::user(1), soon(60_000));
        let started = Instant::now();
        let r = inbox.recv(Rank(1), Tag::user(2), soon(20)).await;
        assert!(
            matches!(r, Err(Error::Timeout { peer: Rank(1), .. })),
            "{r:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(5));
        // The long wait is still registered and still gets its message.
        inbox.deliver(Rank(1), Tag::user(1), vec![1]);
        assert_eq!(long.await.ok(), Some(vec![1]));
    }

    #[tokio::test]
    async fn many_waits_with_one_timeout_all_time_out() {
        let inbox = Inbox::new(Rank(0), "test");
        let waits: Vec<_> = (0..50)
            .map(|i| inbox.recv(Rank(1), Tag::user(i % 7), soon(30 + u64::from(i))))
            .collect();
        for r in futures::future::join_all(waits).await {
            assert!(matches!(r, Err(Error::Timeout { .. })), "{r:?}");
        }
        assert_eq!(inbox.pending_keys(), 0);
    }

    #[tokio::test]
    async fn cancelled_receivers_are_dropped_by_their_deadline() {
        let inbox = Inbox::new(Rank(0), "test");
        drop(inbox.recv(Rank(1), Tag::user(1), soon(10)));
        assert_eq!(inbox.pending_keys(), 1);
        for _ in 0..500 {
            if inbox.pending_keys() == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(inbox.pending_keys(), 0);
        // A message for that key is buffered, not handed to the cancelled receiver.
        inbox.deliver(Rank(1), Tag::user(1), vec![2]);
        assert_eq!(inbox.buffered_bytes(), 1);
    }
}
