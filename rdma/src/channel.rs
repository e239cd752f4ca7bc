//! The RDMA channel: a [`Channel`] over one libfabric `FI_EP_RDM` endpoint per rank.
//!
//! ```text
//!  send(dst) ─┬─ dst == me ─────────────────────────────────────────────▶ Inbox
//!             ├─ engine free: caller ─▶ fi_tinject / fi_tsend (eager, ≤ eager_max)
//!             │                     └─▶ fi_tsend(RTS: addr, key, len) … wait for FIN (driving)
//!             └─ engine busy: command queue ─▶ whoever holds the engine next
//!  recv: wait in the Inbox, driving: fi_cq_read ─▶ eager: copy out of the bounce buffer ─▶
//!        reorder ─▶ Inbox ─▶ this recv          └▶ RTS: fi_read ─▶ FIN to the peer ─▶ reorder
//!  small recv_into with nothing before it: registered with the engine, not the Inbox; its
//!        eager message is copied from the bounce buffer straight into the caller's buffer
//!  poller thread: the same progress while no caller drives (background, idle ranks)
//! ```
//!
//! ## The 64-bit libfabric tag
//! ```text
//!  63..62  protocol: 0 eager, 1 RTS (rendezvous request), 2 FIN (rendezvous read done),
//!          3 credit return (no payload)
//!  61..40  source rank (the receiver matches every tag, so this names the sender)
//!  39..0   sequence number of the message on the (source → destination) pair; for a credit
//!          return, the number of credits returned
//! ```
//! The channel's own 64-bit [`Tag`] travels in the first 8 bytes of the payload. The sequence
//! number is assigned in call order of `send` (a send either posts at once, after everything
//! queued before it, or queues behind it); the receiver delivers each source's messages to the
//! [`Inbox`] strictly in sequence order, so an eager message never overtakes an earlier
//! rendezvous message still being read, whatever order the provider completes them in.
//!
//! ## Flow control
//! A receiver keeps a fixed number of wildcard receives posted, and every eager message, RTS and
//! FIN takes one. A message that finds none posted is *unexpected*, and providers keep only so
//! many of those: libfabric 1.17's `shm` silently strands them (see [`credit_plan`]). So a
//! sender holds *credits* per peer, one per message: it posts only while it has one, and holds
//! the message (bytes copied; the send has completed for its caller) until the peer returns
//! credits otherwise. The receiver counts the messages of each peer whose buffer it has posted
//! again and returns them in a zero-byte credit message once half the peer's credits are owed.
//! Credit messages take no credit; the receiver posts two buffers per peer for them beyond its
//! credits, which is as many as can be on the way (each returns at least half). A receiver
//! therefore always has a receive posted for every message that can reach it.
//!
//! ## Progress
//! All libfabric state (endpoint, bounce buffers, reorder buffers, pending rendezvous) is one
//! `Poller` behind one mutex, the *engine*: every libfabric call is made by whoever holds it (the
//! domain is opened with `FI_THREAD_DOMAIN`, under which the application serialises the calls on
//! a domain). Whoever waits drives progress itself, as MPI libraries do: a `send` that finds the
//! engine free posts from the caller's thread (an eager message with `fi_tinject`), and a `recv`
//! (or a rendezvous send waiting for its FIN) polls the completion queue itself, with `try_lock`,
//! in a loop for up to [`RdmaConfig::spin`] — so a message that comes within that window crosses
//! no thread at all. A wait the window does not answer hands over to the poller thread and
//! sleeps until the [`Inbox`] wakes it; the next 2, 4, … 256 waits on that peer then spin no
//! more (the TCP channel's back-off). The dedicated poller thread (`fmi-rdma-R`) stands aside
//! (parked, from [`IDLE_PARK_MAX`] growing to [`CALLER_PARK_MAX`] while callers keep driving)
//! while a caller drives; otherwise it busy-polls while operations are in flight and for a short
//! window after the last activity, then yields, then parks with a growing timeout (up to
//! [`IDLE_PARK_MAX`]).

use std::cell::UnsafeCell;
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::ffi::c_void;
use std::future::Future;
use std::hash::{BuildHasherDefault, Hasher};
use std::marker::PhantomData;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, TryLockError};
use std::task::{Context, Poll, Waker};
use std::thread::{self, JoinHandle, Thread};
use std::time::Duration;

use fmi_channels::{
    check_rank, copy_message, Capabilities, Channel, Error, Inbox, Instant, JobId, KeyHasher, Rank,
    Result, Tag, RECV_INTO_TOO_LONG,
};
use fmi_fabric_sys as sys;
use futures::future::BoxFuture;
use futures::FutureExt;
use tokio::sync::oneshot;

use crate::fabric::{
    AddressVector, Completion, CompletionQueue, Domain, Endpoint, Fabric, FabricError, FiAddr,
    Hints, InfoList, MemoryRegion,
};

const NAME: &str = "rdma";

const PROTO_SHIFT: u32 = 62;
const PROTO_EAGER: u64 = 0;
const PROTO_RTS: u64 = 1;
const PROTO_FIN: u64 = 2;
/// A credit return: its sequence field is the number of credits (see "Flow control" above).
const PROTO_CREDIT: u64 = 3;
/// Receive buffers posted per peer beyond its credits, for its credit messages: with credits
/// returned in batches of at least half of them, at most two can be on the way at once.
const CREDIT_RESERVE: usize = 2;
/// The fewest credits a peer gets, however many ranks share the receive buffers.
const MIN_CREDITS: usize = 2;
/// The most credits a peer gets (far more than a burst needs; keeps counts in 32 bits).
const MAX_CREDITS: usize = 1 << 20;
const RANK_SHIFT: u32 = 40;
const RANK_MASK: u64 = (1 << 22) - 1;
const SEQ_MASK: u64 = (1 << 40) - 1;
/// The largest job the tag layout addresses.
pub const MAX_RANKS: u32 = 1 << 22;

/// Bytes of the eager header (the channel tag).
const EAGER_HDR: usize = 8;
/// Bytes of an RTS payload: channel tag, length, remote address, key.
const RTS_LEN: usize = 32;
/// Sends of at most this many bytes (header included) that the provider injects are gathered
/// on the stack rather than in a send bounce buffer.
const STACK_INJECT: usize = 128;

/// How long the poller keeps spinning after its last activity (or a kick); then it parks. No
/// phase of `yield_now` follows: on a small machine a yielding thread is still a runnable one,
/// and it kept the two ranks' spinning callers off their cores.
const SPIN_WINDOW: Duration = Duration::from_micros(200);
/// How long after its last activity the poller yields between polls (instead of parking) while
/// a wait sleeps on it.
const YIELD_WINDOW: Duration = Duration::from_millis(20);
/// The longest the idle poller parks between two polls.
pub const IDLE_PARK_MAX: Duration = Duration::from_micros(500);
/// The first park of an idle poller (doubling up to [`IDLE_PARK_MAX`]).
const PARK_MIN: Duration = Duration::from_micros(20);
/// While callers keep driving progress themselves (and no wait sleeps on the poller, no parked
/// rendezvous message waits for its grace), the poller stands aside parked: [`IDLE_PARK_MAX`]
/// at first, doubling up to this. Each of its wake-ups takes a core from a spinning caller on a
/// small machine (two per wake-up in `perf stat`'s count); whatever the callers leave undone
/// when they stop, they wake it for (a wait that goes to sleep, queued sends, operations in
/// flight), so the length of this park only bounds how late it notices messages that arrive
/// for a rank that stopped calling into the channel altogether, and how long a parked
/// rendezvous message (`PARK_GRACE`) of such a rank can wait for its read.
pub const CALLER_PARK_MAX: Duration = Duration::from_millis(8);
/// How long dropping the channel waits for queued messages to leave.
const FLUSH_LIMIT: Duration = Duration::from_secs(10);
/// Default of [`RdmaConfig::spin`].
pub const DEFAULT_SPIN: Duration = Duration::from_micros(50);
/// The spin window [`auto_spin`] gives a rank whose host has a core for each of the job's ranks
/// on it: long enough for a `tcp;ofi_rxm` round trip and a 1 MiB rendezvous over `shm` on this
/// kind of VM, so that an exchange in progress never falls back to the poller thread.
pub const FIT_SPIN: Duration = Duration::from_millis(1);

/// The spin window for a rank whose host runs `ranks_here` ranks of the job (itself included),
/// when none is configured: [`FIT_SPIN`] while they do not outnumber the cores this host gives
/// the job ([`fmi_channels::host_cores`]), else zero — with more ranks than cores, a spinning wait takes
/// the core from the rank whose reply it waits for, and progress is left to the poller thread.
pub fn auto_spin(ranks_here: u32) -> Duration {
    if (ranks_here.max(1) as usize) <= fmi_channels::host_cores() {
        FIT_SPIN
    } else {
        Duration::ZERO
    }
}
/// A rendezvous send waiting for its FIN spins this much longer per byte of the message (1 ns per
/// byte, i.e. as long as the peer's read takes at 1 GB/s), on top of [`RdmaConfig::spin`].
const SPIN_NS_PER_BYTE: u64 = 1;
/// At most 2^8 = 256 waits on a peer skip the spin after spins that failed in a row.
const SPIN_BACKOFF_MAX_EXP: u32 = 8;
/// A wait that the back-off keeps from spinning its full window still spins this long (at most
/// its window) before it sleeps: a reply that comes within it (a 64 B round trip over `shm` takes
/// about a microsecond) is caught without the poller thread's hand-off, which costs 25–50 µs on
/// this kind of VM. Spun in vain, it costs this much of a core, not the full window.
const BACKOFF_SPIN: Duration = Duration::from_micros(20);
/// A spin counts as failed (for the back-off) only when its wait then lasted longer than this.
/// A wait answered soon after its window (by the poller thread, 25–50 µs per hand-off here)
/// leaves the back-off as it is: counting it would let two ranks that once fell back to the
/// poller keep each other there (each one's reply comes late because the other slept), a slow
/// state that a quiet-machine ping-pong measured at 25–45 µs per message instead of ~1 µs.
const LONG_WAIT: Duration = Duration::from_millis(1);
/// A spinning wait polls its future and reads the clock after every step that moved something
/// and every this many empty steps (an empty step is one `fi_cq_read`, well under a
/// microsecond, so the future is looked at within about a microsecond).
const LOOK_EVERY: u32 = 16;
/// A caller that posts a send with this many operations in flight also reaps completions, so
/// that the send bounce buffers do not pile up while nobody polls.
const REAP_AT: usize = 32;

/// Receive buffers to keep posted, and credits per peer, for `recv_buffers` configured and a job
/// of `ranks` ranks: each of the other ranks gets an equal share of the buffers, of which two
/// (`CREDIT_RESERVE`) are for its credit messages and the rest are its credits (at least two,
/// `MIN_CREDITS`; the buffers grow to `4 × peers` when the configured number is too small for
/// that).
///
/// Why credits at all: with libfabric 1.17's `shm`, a message that finds no receive posted is
/// queued as unexpected in a receive entry that the provider takes from its free list without
/// setting the entry's tag mask, and a later receive matches it against that stale mask. An
/// entry last used by one of the channel's wildcard receives (mask all ones) matches; one never
/// used before (mask zero) matches only a receive for exactly its tag, which the channel never
/// posts — the message is stranded. A burst beyond the posted receives thus lost everything past
/// twice their number (the posted ones, then as many unexpected ones as had reused their
/// entries). With credits no message is ever unexpected, on any provider.
pub fn credit_plan(recv_buffers: usize, ranks: usize) -> (usize, u32) {
    let peers = ranks.saturating_sub(1);
    if peers == 0 {
        return (recv_buffers, 0);
    }
    let share = (recv_buffers / peers).clamp(MIN_CREDITS + CREDIT_RESERVE, MAX_CREDITS);
    let credits = share - CREDIT_RESERVE;
    (recv_buffers.max(share * peers), credits as u32)
}

/// Providers tried in this order when none is configured (`sockets` never: it is broken in
/// libfabric 1.17; `shm` only when nothing else is offered or `FI_PROVIDER` says so, because it
/// reaches this host only).
pub const PREFERENCE: &[&str] = &["cxi", "efa", "verbs;ofi_rxm", "tcp;ofi_rxm", "shm"];

/// Settings of the RDMA channel (`[rdma]` in the configuration file).
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct RdmaConfig {
    /// The libfabric provider (`"shm"`, `"tcp;ofi_rxm"`, `"verbs;ofi_rxm"`, `"efa"`, `"cxi"`);
    /// `None`: the best available ([`PREFERENCE`]).
    pub provider: Option<String>,
    /// The libfabric domain (`fi_info` prints it: a NIC, or for `tcp;ofi_rxm` an interface such
    /// as `"lo"`); `None`: the provider's first.
    pub domain: Option<String>,
    /// Messages up to this many bytes go eagerly through bounce buffers; larger ones by
    /// rendezvous and RMA read (default 16 KiB).
    pub eager_max: usize,
    /// Receive bounce buffers kept posted (default 64), shared evenly among the other ranks:
    /// each share is two buffers for credit returns plus that peer's credits, at least 4 in
    /// all, and more buffers are posted when the job needs that ([`credit_plan`]).
    pub recv_buffers: usize,
    /// How long a waiting `recv` (or rendezvous send) polls the completion queue itself before
    /// it sleeps and leaves progress to the poller thread; zero never spins (default 50 µs,
    /// [`DEFAULT_SPIN`]; `[rdma] spin_us`, `FMI_SPIN_US`). After a spin the window did not
    /// answer, the next 2, 4, … up to 256 waits on that peer sleep at once.
    pub spin: Duration,
}

impl Default for RdmaConfig {
    fn default() -> Self {
        RdmaConfig {
            provider: None,
            domain: None,
            eager_max: 16 << 10,
            recv_buffers: 64,
            spin: DEFAULT_SPIN,
        }
    }
}

/// What a provider's info entry says about it, for logs and documentation.
#[derive(Clone, Debug)]
pub struct ProviderInfo {
    /// Provider name.
    pub provider: String,
    /// Domain name.
    pub domain: String,
    /// Memory-registration modes required (`FI_MR_*` bits).
    pub mr_mode: u32,
    /// Inject size.
    pub inject_size: usize,
    /// Remote CQ data bytes.
    pub cq_data_size: usize,
}

/// The providers that offer an RDM tagged endpoint with RMA here (one entry per provider).
pub fn available_providers() -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    if let Ok(list) = InfoList::query(&Hints {
        provider: None,
        rma: true,
    }) {
        for e in list.iter() {
            let p = e.provider();
            if !out.contains(&p) {
                out.push(p);
            }
        }
    }
    out
}

/// An opened endpoint whose name is known but whose peers are not yet: publish
/// [`RdmaBinding::name`] through the rendezvous, then [`RdmaChannel::start`].
pub struct RdmaBinding {
    ep: Endpoint,
    name: Vec<u8>,
    info: ProviderInfo,
}

impl std::fmt::Debug for RdmaBinding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RdmaBinding")
            .field("info", &self.info)
            .finish()
    }
}

impl RdmaBinding {
    /// Opens fabric, domain, completion queue, address vector and endpoint of the configured
    /// provider (or the best available one), for a job of `size` ranks.
    pub fn open(config: &RdmaConfig, size: u32) -> std::result::Result<RdmaBinding, FabricError> {
        let list = InfoList::query(&Hints {
            provider: config.provider.clone(),
            rma: true,
        })?;
        let entries: Vec<_> = list
            .iter()
            .filter(|e| config.domain.as_ref().is_none_or(|d| &e.domain_name() == d))
            .collect();
        let pick = match &config.provider {
            Some(p) => entries.iter().find(|e| &e.provider() == p),
            None => PREFERENCE
                .iter()
                .find_map(|want| entries.iter().find(|e| &e.provider() == want))
                .or_else(|| entries.iter().find(|e| e.provider() != "sockets")),
        };
        let Some(entry) = pick else {
            let offered: Vec<String> = list
                .iter()
                .map(|e| format!("{} on {}", e.provider(), e.domain_name()))
                .collect();
            return Err(FabricError::NoProvider {
                provider: config.provider.clone().unwrap_or_else(|| "any".to_owned()),
                wanted: "FI_EP_RDM with FI_TAGGED and FI_RMA",
                detail: match &config.domain {
                    Some(d) => format!("domain {d} asked; offered: {}", offered.join(", ")),
                    None => format!("offered: {}", offered.join(", ")),
                },
            });
        };
        let domain_name = entry.domain_name();
        let info = entry.to_owned()?;
        drop(list);
        let fabric = Fabric::open(info)?;
        let domain = Domain::open(&fabric)?;
        let (posted, _) = credit_plan(config.recv_buffers.max(4), size as usize);
        let depth = (posted * 2 + 256).max(1024);
        let cq = CompletionQueue::open(&domain, depth)?;
        let av = AddressVector::open(&domain, size as usize)?;
        let ep = Endpoint::open(&domain, cq, av)?;
        let name = ep.name()?;
        let i = ep.info();
        let info = ProviderInfo {
            provider: i.provider().to_owned(),
            domain: domain_name,
            mr_mode: i.mr_mode(),
            inject_size: i.inject_size(),
            cq_data_size: i.cq_data_size(),
        };
        Ok(RdmaBinding { ep, name, info })
    }

    /// This endpoint's libfabric name.
    pub fn name(&self) -> &[u8] {
        &self.name
    }

    /// The name as text for the rendezvous peer table: `ofi:` and lowercase hex.
    pub fn endpoint_text(&self) -> String {
        encode_name(&self.name)
    }

    /// The chosen provider.
    pub fn info(&self) -> &ProviderInfo {
        &self.info
    }
}

/// `ofi:` + hex of an endpoint name.
pub fn encode_name(name: &[u8]) -> String {
    let mut s = String::with_capacity(4 + name.len() * 2);
    s.push_str("ofi:");
    for b in name {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// Parses [`encode_name`]'s text; `None` when it is not an `ofi:` endpoint.
pub fn decode_name(text: &str) -> Option<Vec<u8>> {
    let hex = text.strip_prefix("ofi:")?;
    if hex.len() % 2 != 0 || hex.is_empty() {
        return None;
    }
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
        .collect()
}

enum Cmd {
    Eager {
        dst: Rank,
        tag: Tag,
        data: Vec<u8>,
    },
    Large {
        id: u64,
        dst: Rank,
        tag: Tag,
        ptr: usize,
        len: usize,
        done: oneshot::Sender<Result<()>>,
    },
}

/// What the callers and the poller thread share (see the module documentation, "Progress").
struct Shared {
    /// All libfabric state; every libfabric call is made by the holder of this lock.
    engine: Mutex<Poller>,
    /// Sends that found the engine taken, in call order; whoever holds the engine next posts
    /// them before anything else.
    cmds: Mutex<VecDeque<Cmd>>,
    /// `cmds.len()`, readable without its lock (changed under it).
    queued: AtomicUsize,
    /// `Poller::in_flight` as of the engine's last use: operations that still need progress.
    busy: AtomicUsize,
    /// `Poller::parked.len()` as of the engine's last step: a receive must look at them.
    parked: AtomicUsize,
    /// Per source: whether its last receive was a `recv_into` that can take a rendezvous
    /// message directly (only then may an early RTS from it be parked for the next one).
    into_hint: Arc<Vec<AtomicBool>>,
    /// Futures polling the completion queue themselves right now; the poller thread stands aside
    /// while there are any, and the last to stop wakes it if anything is left to do.
    driving: AtomicUsize,
    /// Futures that stopped spinning and sleep until the inbox (or a FIN) wakes them.
    waiting: AtomicUsize,
    /// Receives from other ranks registered in (or about to register in) the inbox and not yet
    /// over: while there are none, no inbox receiver can stand before a new eager `recv_into`
    /// (see [`RdmaChannel::try_eager_into`]) and the inbox's lock need not be taken to know it.
    inbox_recvs: AtomicUsize,
    /// Spins started so far: while callers keep starting them, the poller thread stands aside
    /// between them too (unless kicked), instead of stepping in each gap between two waits.
    drives: AtomicU64,
    /// Set by [`Shared::wake`]: the poller thread treats it as activity.
    kicked: AtomicBool,
    shutdown: AtomicBool,
    /// The completion queue failed: the inbox is closed and nothing is posted any more.
    broken: AtomicBool,
    poller: OnceLock<Thread>,
    next_id: AtomicU64,
    /// [`RdmaConfig::spin`].
    spin: Duration,
    /// Spin back-off per peer: waits still to sleep without spinning, and the spins in a row that
    /// the window did not answer.
    spin_skip: Vec<AtomicU32>,
    spin_failures: Vec<AtomicU32>,
    /// Waits answered within their spin, waits whose spin ran out, waits that did not spin (back-off
    /// or no window): [`Channel::counters`].
    spin_hits: AtomicU64,
    spin_misses: AtomicU64,
    spin_skipped: AtomicU64,
    /// Waits of the back-off answered within their short spin ([`BACKOFF_SPIN`]).
    spin_short_hits: AtomicU64,
}

impl Shared {
    fn lock_engine(&self) -> MutexGuard<'_, Poller> {
        // Every change to the engine's state is completed before anything that can panic, and a
        // panic inside libfabric would not unwind; a poisoned lock is still consistent.
        self.engine.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn try_engine(&self) -> Option<MutexGuard<'_, Poller>> {
        match self.engine.try_lock() {
            Ok(g) => Some(g),
            Err(TryLockError::Poisoned(e)) => Some(e.into_inner()),
            Err(TryLockError::WouldBlock) => None,
        }
    }

    /// Queues a send for the engine's next holder.
    fn push(&self, cmd: Cmd) {
        {
            let mut q = self.cmds.lock().unwrap_or_else(|e| e.into_inner());
            q.push_back(cmd);
            self.queued.fetch_add(1, Ordering::SeqCst);
        }
        // A driving future posts it in its next step, or (being the last to stop) wakes the
        // poller: it reads `queued` after leaving `driving`, this reads `driving` after `queued`.
        if self.driving.load(Ordering::SeqCst) == 0 {
            self.wake();
        }
    }

    /// Posts a send now if the engine is free (after the queued ones), else queues it.
    fn submit(&self, cmd: Cmd) {
        match self.try_engine() {
            Some(mut p) => {
                self.take_cmds(&mut p);
                p.handle_cmd(cmd);
                self.busy.store(p.in_flight, Ordering::SeqCst);
            }
            None => self.push(cmd),
        }
    }

    /// Posts the queued sends, in order. Returns whether there were any.
    fn take_cmds(&self, p: &mut Poller) -> bool {
        let mut any = false;
        while self.queued.load(Ordering::SeqCst) > 0 {
            let cmd = {
                let mut q = self.cmds.lock().unwrap_or_else(|e| e.into_inner());
                let cmd = q.pop_front();
                if cmd.is_some() {
                    self.queued.fetch_sub(1, Ordering::SeqCst);
                }
                cmd
            };
            let Some(cmd) = cmd else { break };
            p.handle_cmd(cmd);
            any = true;
        }
        any
    }

    /// One step of progress by the engine's holder: queued sends, sends waiting for room, then
    /// the completion queue. Returns whether anything happened.
    fn step(&self, p: &mut Poller) -> bool {
        if self.broken.load(Ordering::Acquire) {
            return false;
        }
        p.closing = self.shutdown.load(Ordering::Acquire);
        if !p.deferred.is_empty() {
            if let Err(e) = p.repost_deferred() {
                tracing::warn!(rank = p.me.0, error = %e, "rdma: posting a receive failed");
            }
        }
        let mut active = self.take_cmds(p);
        if !p.retry.is_empty() {
            if let Err(e) = p.flush_retries() {
                tracing::warn!(rank = p.me.0, error = %e, "rdma: send failed");
            }
        }
        if !p.parked.is_empty() {
            if let Err(e) = p.unpark_expired() {
                tracing::warn!(rank = p.me.0, error = %e, "rdma: read failed");
            }
        }
        let mut polled = p.poll_cq();
        if matches!(polled, Ok(n) if n > 0) && std::mem::take(&mut p.read_posted) {
            // A read was posted: `shm` copies within `fi_read` and completes it at once, so its
            // completion (and with it the FIN the peer waits for) is there now, not a spin
            // round later.
            polled = p.poll_cq().map(|m| m + 1);
        }
        match polled {
            Ok(n) => active |= n > 0,
            Err(e) => {
                tracing::error!(rank = p.me.0, error = %e, "rdma: completion queue failed; closing the channel");
                self.broken.store(true, Ordering::Release);
                p.inbox.close();
                p.fail_eager_into();
            }
        }
        // Stored only when changed (by the engine's holder, so a value read back is the last one
        // stored): a sequentially consistent store is a full fence, and an empty step — most
        // steps of a spinning wait — changes neither.
        if self.busy.load(Ordering::Relaxed) != p.in_flight {
            self.busy.store(p.in_flight, Ordering::SeqCst);
        }
        if self.parked.load(Ordering::Relaxed) != p.parked.len() {
            self.parked.store(p.parked.len(), Ordering::SeqCst);
        }
        active
    }

    /// A step of progress if nobody else holds the engine.
    fn try_step(&self) -> bool {
        self.try_engine().is_some_and(|mut p| self.step(&mut p))
    }

    /// Wakes the poller thread (a no-op system-wise unless it is parked).
    fn wake(&self) {
        self.kicked.store(true, Ordering::Release);
        if let Some(t) = self.poller.get() {
            t.unpark();
        }
    }
}

/// One waiting future's share in progress: while its inner future is pending it polls the
/// completion queue itself, for up to its window, then sleeps and leaves progress to the poller
/// thread (see the module documentation).
struct Drive<'a> {
    shared: &'a Shared,
    /// The peer waited on (for the spin back-off).
    peer: Rank,
    /// How long it spins in all.
    window: Duration,
    /// When it first found its future pending, and whether it then spun its full window (else,
    /// in back-off, only [`BACKOFF_SPIN`] or not at all).
    first: Option<std::time::Instant>,
    spun: bool,
    /// Whether its future became ready within the spin (known without reading the clock again).
    hit: bool,
    /// Until when it spins; `None` once the window is over (or when it does not spin).
    spin_until: Option<std::time::Instant>,
    /// Counted in [`Shared::waiting`].
    asleep: bool,
    /// The spin ends here at the latest (a wait that keeps its own deadline).
    deadline: Option<std::time::Instant>,
}

impl<'a> Drive<'a> {
    fn new(shared: &'a Shared, peer: Rank, window: Duration) -> Drive<'a> {
        Drive {
            shared,
            peer,
            window,
            first: None,
            spun: false,
            hit: false,
            spin_until: None,
            asleep: false,
            deadline: None,
        }
    }

    /// Polls `fut`, driving progress while it is pending (see [`Drive`]). `fut` must not count
    /// against tokio's cooperative budget (wrap it in `tokio::task::unconstrained`), or a spin
    /// could miss that it is ready.
    fn poll<F: Future>(&mut self, cx: &mut Context<'_>, mut fut: Pin<&mut F>) -> Poll<F::Output> {
        if let Poll::Ready(out) = fut.as_mut().poll(cx) {
            return Poll::Ready(out);
        }
        let sh = self.shared;
        if self.first.is_none() {
            let now = std::time::Instant::now();
            self.first = Some(now);
            if !self.window.is_zero() {
                let skip = &sh.spin_skip[self.peer.idx()];
                // Not a read-modify-write race that matters: a lost update only shifts when the
                // next spin happens.
                let until = match skip.load(Ordering::Relaxed) {
                    0 => {
                        self.spun = true;
                        now + self.window
                    }
                    n => {
                        skip.store(n - 1, Ordering::Relaxed);
                        now + self.window.min(BACKOFF_SPIN)
                    }
                };
                self.spin_until = Some(self.deadline.map_or(until, |d| d.min(until)));
            }
        }
        let out = match self.spin_until {
            None => {
                // One look at the queue, then sleep.
                sh.try_step();
                fut.as_mut().poll(cx)
            }
            Some(until) => {
                sh.driving.fetch_add(1, Ordering::SeqCst);
                sh.drives.fetch_add(1, Ordering::Relaxed);
                let mut round: u32 = 0;
                let out = loop {
                    // The future can only have become ready through a step that did something
                    // (this one, or another thread's while this one found the engine taken), or
                    // from outside (a deadline): it and the clock are looked at after such steps
                    // and every LOOK_EVERY rounds, not on every empty poll of the queue.
                    let moved = sh.try_engine().is_none_or(|mut p| sh.step(&mut p));
                    round = round.wrapping_add(1);
                    let look = round.is_multiple_of(LOOK_EVERY);
                    if moved || look {
                        if let Poll::Ready(out) = fut.as_mut().poll(cx) {
                            self.hit = true;
                            break Poll::Ready(out);
                        }
                    }
                    if look && std::time::Instant::now() >= until {
                        self.spin_until = None;
                        break Poll::Pending;
                    }
                    // No `yield_now`: with other processes on the machine a yield hands the core
                    // to them and the spin gains nothing (as in the TCP channel).
                    std::hint::spin_loop();
                };
                let last = sh.driving.fetch_sub(1, Ordering::SeqCst) == 1;
                if last
                    && out.is_ready()
                    && (sh.queued.load(Ordering::SeqCst) > 0
                        || sh.busy.load(Ordering::SeqCst) > 0
                        || sh.waiting.load(Ordering::SeqCst) > 0)
                {
                    // Work is left that nobody drives: background progress goes on.
                    sh.wake();
                }
                out
            }
        };
        if out.is_pending() {
            if !self.asleep {
                self.asleep = true;
                sh.waiting.fetch_add(1, Ordering::SeqCst);
            }
            // The poller thread carries on; the inbox (or the FIN) wakes this task.
            sh.wake();
        }
        out
    }
}

impl Drop for Drive<'_> {
    fn drop(&mut self) {
        let sh = self.shared;
        if self.asleep {
            sh.waiting.fetch_sub(1, Ordering::SeqCst);
        }
        if self.first.is_some() && !self.spun {
            sh.spin_skipped.fetch_add(1, Ordering::Relaxed);
            if self.hit {
                sh.spin_short_hits.fetch_add(1, Ordering::Relaxed);
            }
        }
        if let (Some(first), true) = (self.first, self.spun) {
            let i = self.peer.idx();
            // Answered within the spin: no need to read the clock again.
            let waited = if self.hit {
                Duration::ZERO
            } else {
                first.elapsed()
            };
            if waited <= self.window {
                sh.spin_hits.fetch_add(1, Ordering::Relaxed);
                sh.spin_failures[i].store(0, Ordering::Relaxed);
                return;
            }
            sh.spin_misses.fetch_add(1, Ordering::Relaxed);
            if waited > LONG_WAIT {
                // Spun in vain: the next waits on this peer sleep at once, exponentially more.
                let failures = sh.spin_failures[i]
                    .load(Ordering::Relaxed)
                    .saturating_add(1);
                sh.spin_failures[i].store(failures, Ordering::Relaxed);
                sh.spin_skip[i].store(1 << failures.min(SPIN_BACKOFF_MAX_EXP), Ordering::Relaxed);
            }
        }
    }
}

/// The poller thread: progress while no caller drives it (see the module documentation).
fn poll_loop(shared: &Shared) {
    let mut last_active = std::time::Instant::now();
    let mut park = PARK_MIN;
    let mut flush_started: Option<std::time::Instant> = None;
    let mut seen_drives = 0u64;
    let mut caller_park = IDLE_PARK_MAX;
    loop {
        if shared.broken.load(Ordering::Acquire) {
            break;
        }
        let shutdown = shared.shutdown.load(Ordering::Acquire);
        let drives = shared.drives.load(Ordering::Relaxed);
        let callers_active = drives != seen_drives;
        seen_drives = drives;
        if !shutdown
            && (shared.driving.load(Ordering::SeqCst) > 0
                || (callers_active && !shared.kicked.load(Ordering::Acquire)))
        {
            // A waiting caller polls the queue; a second poller would only contend with it for
            // the engine and for the cores. The last one to stop wakes this thread if needed.
            // Not counted as activity: once the callers are done, it parks again soon unless one
            // of them kicked it (a wait that went to sleep) or work is in flight. While they keep
            // at it and nothing relies on this thread, each park is longer (CALLER_PARK_MAX).
            thread::park_timeout(caller_park);
            caller_park = if shared.waiting.load(Ordering::Relaxed) > 0
                || shared.parked.load(Ordering::Relaxed) > 0
            {
                IDLE_PARK_MAX
            } else {
                (caller_park * 2).min(CALLER_PARK_MAX)
            };
            continue;
        }
        let active = match shared.try_engine() {
            Some(mut p) => shared.step(&mut p),
            None => {
                std::hint::spin_loop();
                continue;
            }
        };
        if shutdown {
            let started = *flush_started.get_or_insert_with(std::time::Instant::now);
            let idle = shared.busy.load(Ordering::SeqCst) == 0
                && shared.queued.load(Ordering::SeqCst) == 0;
            if idle || started.elapsed() > FLUSH_LIMIT {
                break;
            }
            continue;
        }
        if active || shared.kicked.swap(false, Ordering::AcqRel) {
            last_active = std::time::Instant::now();
            park = PARK_MIN;
            continue;
        }
        if shared.busy.load(Ordering::Relaxed) > 0 {
            std::hint::spin_loop();
            continue;
        }
        let idle = last_active.elapsed();
        if idle < SPIN_WINDOW {
            std::hint::spin_loop();
        } else if idle < YIELD_WINDOW && shared.waiting.load(Ordering::Relaxed) > 0 {
            // A wait sleeps on this thread's polling (no caller spins, or this would be parked
            // above): a parked poller would notice its message only at the end of its park.
            // Yielding keeps polling while giving the core to whoever needs it (with more ranks
            // than cores, the rank that is to reply).
            thread::yield_now();
        } else {
            // Parked messages are read once their grace is over; nobody is woken for them (the
            // receive that claims one usually comes first, and waking this thread costs the
            // other rank's core a share on a small machine).
            let nap = if shared.parked.load(Ordering::Relaxed) > 0 {
                park.min(PARK_GRACE)
            } else {
                park
            };
            // The callers have stopped (this thread went through its whole spin without them):
            // the next time they drive, it stands aside for short parks again at first.
            caller_park = IDLE_PARK_MAX;
            thread::park_timeout(nap);
            if shared.kicked.swap(false, Ordering::AcqRel) {
                // Woken by a send or a wait that stopped spinning: poll busily again.
                last_active = std::time::Instant::now();
                park = PARK_MIN;
            } else {
                park = (park * 2).min(IDLE_PARK_MAX);
            }
        }
    }
}

/// One rank's RDMA channel.
pub struct RdmaChannel {
    job: JobId,
    rank: Rank,
    size: u32,
    eager_max: usize,
    inbox: Arc<Inbox>,
    shared: Arc<Shared>,
    provider: String,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for RdmaChannel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RdmaChannel")
            .field("job", &self.job)
            .field("rank", &self.rank)
            .field("size", &self.size)
            .field("provider", &self.provider)
            .finish_non_exhaustive()
    }
}

fn fabric_error(me: Rank, peer: Option<Rank>, e: FabricError) -> Error {
    Error::Io {
        me,
        peer,
        channel: NAME,
        source: std::io::Error::other(e),
    }
}

/// `n` ranks of job `job` in this process, each with an endpoint opened with `config`: the
/// endpoint names are exchanged in memory instead of through the rendezvous server (tests,
/// benchmarks; like `fmi_channels::tcp::local_world`).
pub fn local_world(job: JobId, n: u32, config: &RdmaConfig) -> Result<Vec<RdmaChannel>> {
    let mut bindings = Vec::with_capacity(n as usize);
    for r in 0..n {
        bindings.push(RdmaBinding::open(config, n).map_err(|e| fabric_error(Rank(r), None, e))?);
    }
    let names: Vec<Vec<u8>> = bindings.iter().map(|b| b.name().to_vec()).collect();
    bindings
        .into_iter()
        .zip(0u32..)
        .map(|(b, r)| RdmaChannel::start(b, job.clone(), Rank(r), names.clone(), config))
        .collect()
}

impl RdmaChannel {
    /// Starts the channel of `rank` in a job whose ranks' endpoint names are `peers` (index =
    /// rank; this rank's own entry is its binding's name).
    pub fn start(
        binding: RdmaBinding,
        job: JobId,
        rank: Rank,
        peers: Vec<Vec<u8>>,
        config: &RdmaConfig,
    ) -> Result<RdmaChannel> {
        let size = u32::try_from(peers.len()).unwrap_or(u32::MAX);
        if size == 0 || size > MAX_RANKS {
            return Err(Error::InvalidArgument {
                what: "the rdma channel needs 1 to 2^22 ranks",
            });
        }
        check_rank(rank, size)?;
        let mut addrs = Vec::with_capacity(peers.len());
        for (r, name) in peers.iter().enumerate() {
            let a = binding
                .ep
                .av()
                .insert(name)
                .map_err(|e| fabric_error(rank, Some(Rank(r as u32)), e))?;
            addrs.push(a);
        }
        let provider = binding.info.provider.clone();
        let inbox = Inbox::new(rank, NAME);
        let eager_max = config.eager_max.max(RTS_LEN);
        let mut poller = Poller::new(
            binding.ep,
            addrs,
            rank,
            Arc::clone(&inbox),
            eager_max,
            config.recv_buffers.max(4),
        )
        .map_err(|e| fabric_error(rank, None, e))?;
        let into_hint: Arc<Vec<AtomicBool>> =
            Arc::new((0..size).map(|_| AtomicBool::new(false)).collect());
        poller.into_hint = Arc::clone(&into_hint);
        let shared = Arc::new(Shared {
            into_hint,
            engine: Mutex::new(poller),
            cmds: Mutex::new(VecDeque::new()),
            queued: AtomicUsize::new(0),
            busy: AtomicUsize::new(0),
            parked: AtomicUsize::new(0),
            driving: AtomicUsize::new(0),
            waiting: AtomicUsize::new(0),
            inbox_recvs: AtomicUsize::new(0),
            drives: AtomicU64::new(0),
            kicked: AtomicBool::new(false),
            shutdown: AtomicBool::new(false),
            broken: AtomicBool::new(false),
            poller: OnceLock::new(),
            next_id: AtomicU64::new(1),
            spin: config.spin,
            spin_skip: (0..size).map(|_| AtomicU32::new(0)).collect(),
            spin_failures: (0..size).map(|_| AtomicU32::new(0)).collect(),
            spin_hits: AtomicU64::new(0),
            spin_misses: AtomicU64::new(0),
            spin_skipped: AtomicU64::new(0),
            spin_short_hits: AtomicU64::new(0),
        });
        let thread = {
            let shared = Arc::clone(&shared);
            thread::Builder::new()
                .name(format!("fmi-rdma-{rank}"))
                .spawn(move || poll_loop(&shared))
                .map_err(|e| Error::Io {
                    me: rank,
                    peer: None,
                    channel: NAME,
                    source: e,
                })?
        };
        let _ = shared.poller.set(thread.thread().clone());
        tracing::debug!(rank = rank.0, provider = %provider, "rdma: channel started");
        Ok(RdmaChannel {
            job,
            rank,
            size,
            eager_max,
            inbox,
            shared,
            provider,
            thread: Some(thread),
        })
    }

    /// The libfabric provider in use.
    pub fn provider(&self) -> &str {
        &self.provider
    }

    /// [`Channel::recv`] without its box (`src` checked by the caller), so that a small
    /// `recv_into` boxes one future, not two. The receiver is registered in the inbox now.
    fn recv_unboxed(
        &self,
        src: Rank,
        tag: Tag,
        deadline: Instant,
    ) -> impl Future<Output = Result<Vec<u8>>> + Send + '_ {
        // Counted before it registers (see `Shared::inbox_recvs`).
        let counted = (src != self.rank).then(|| InboxRecv::new(&self.shared.inbox_recvs));
        let inner = self.inbox.recv(src, tag, deadline);
        let drive = if src == self.rank {
            // Messages to self are delivered by `send` itself: nothing to drive.
            None
        } else {
            let sh = &*self.shared;
            let hint = &sh.into_hint[src.idx()];
            if hint.load(Ordering::Relaxed) {
                hint.store(false, Ordering::Relaxed);
            }
            if sh.parked.load(Ordering::SeqCst) > 0 {
                // A parked rendezvous message from `src` may be this one, or stand before it.
                let mut p = sh.lock_engine();
                if let Err(e) = p.claim_parked(src, tag) {
                    tracing::warn!(rank = p.me.0, error = %e, "rdma: read failed");
                }
                sh.parked.store(p.parked.len(), Ordering::SeqCst);
                sh.busy.store(p.in_flight, Ordering::SeqCst);
            }
            Some(Drive::new(sh, src, sh.spin))
        };
        async move {
            let _counted = counted;
            let mut inner = pin!(tokio::task::unconstrained(inner));
            match drive {
                None => inner.await,
                Some(mut drive) => std::future::poll_fn(|cx| drive.poll(cx, inner.as_mut())).await,
            }
        }
    }

    /// A small `recv_into` (`buf` no larger than `eager_max`, `src` another rank) that the engine
    /// can answer itself: an eager message for it is copied from the bounce buffer straight into
    /// `buf`, without the inbox (no `Vec`, no `oneshot`, no inbox lock). Only when nothing can
    /// stand before it: no message of `(src, tag)` buffered in the inbox (so none of any key,
    /// since that is what can be known without the inbox's lock, and none of length zero, which
    /// `buffered_bytes` does not see), no receiver of `(src, tag)` waiting in the inbox, no
    /// other such `recv_into` of that key. Receivers that come after it go through the inbox as
    /// before; the engine serves this one first (every message of `src` passes the engine, in
    /// order). Gives `buf` back when the inbox must take the receive.
    fn try_eager_into<'a>(
        &'a self,
        src: Rank,
        tag: Tag,
        buf: &'a mut [u8],
        deadline: Instant,
    ) -> std::result::Result<BoxFuture<'a, Result<usize>>, &'a mut [u8]> {
        let sh = &*self.shared;
        if sh.broken.load(Ordering::Acquire) || self.inbox.buffered_bytes() != 0 {
            return Err(buf);
        }
        let hint = &sh.into_hint[src.idx()];
        if hint.load(Ordering::Relaxed) {
            hint.store(false, Ordering::Relaxed);
        }
        // Blocking: the holder keeps the engine for one step only. Every message from `src`
        // reaches the inbox under this lock, so what is checked here holds until it is released.
        let mut p = sh.lock_engine();
        if sh.parked.load(Ordering::Relaxed) > 0 {
            // A parked rendezvous message from `src` may be this one (too long for `buf`: read
            // into a `Vec` and refused below), or stand before it.
            if let Err(e) = p.claim_parked(src, tag) {
                tracing::warn!(rank = p.me.0, error = %e, "rdma: read failed");
            }
            sh.parked.store(p.parked.len(), Ordering::SeqCst);
            sh.busy.store(p.in_flight, Ordering::SeqCst);
        }
        let key = (src, tag);
        if p.eager_into.contains(src, tag)
            || p.eager_into.len() >= EAGER_INTO_MAX
            || p.zero_len.contains(&key)
            || self.inbox.buffered_bytes() != 0
            || (sh.inbox_recvs.load(Ordering::SeqCst) != 0 && self.inbox.has_waiter(src, tag))
        {
            return Err(buf);
        }
        let mut drive = Drive::new(sh, src, sh.spin);
        let std_deadline = deadline.into_std();
        drive.deadline = Some(std_deadline);
        let fut = Box::pin(EagerInto {
            shared: sh,
            me: self.rank,
            src,
            tag,
            deadline,
            std_deadline,
            drive,
            slot: EagerSlot {
                ptr: buf.as_mut_ptr(),
                cap: buf.len(),
                state: AtomicU8::new(SLOT_WAITING),
                result: UnsafeCell::new(None),
                waker: UnsafeCell::new(None),
            },
            registered: true,
            sleep: None,
            _buf: PhantomData,
        });
        p.eager_into.0.push((src, tag, SlotPtr(&fut.slot)));
        drop(p);
        Ok(fut)
    }
}

/// At most this many small `recv_into`s wait in the engine at once (more go through the inbox):
/// they are kept in a list that each eager message looks through.
const EAGER_INTO_MAX: usize = 16;

/// The small `recv_into`s waiting in the engine, at most one per `(source, tag)` (a short list:
/// cheaper than a hash map for the one or few that wait at a time).
struct EagerWaiters(Vec<(Rank, Tag, SlotPtr)>);

impl EagerWaiters {
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn len(&self) -> usize {
        self.0.len()
    }

    fn contains(&self, src: Rank, tag: Tag) -> bool {
        self.0.iter().any(|&(s, t, _)| s == src && t == tag)
    }

    fn remove(&mut self, src: Rank, tag: Tag) -> Option<SlotPtr> {
        let i = self.0.iter().position(|&(s, t, _)| s == src && t == tag)?;
        Some(self.0.swap_remove(i).2)
    }
}

/// Counts a receive in [`Shared::inbox_recvs`] while it lives.
struct InboxRecv<'a>(&'a AtomicUsize);

impl<'a> InboxRecv<'a> {
    fn new(n: &'a AtomicUsize) -> InboxRecv<'a> {
        n.fetch_add(1, Ordering::SeqCst);
        InboxRecv(n)
    }
}

impl Drop for InboxRecv<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// [`EagerSlot::state`]: waiting for its message.
const SLOT_WAITING: u8 = 0;
/// [`EagerSlot::state`]: answered (`result` is set); the engine no longer holds the slot.
const SLOT_DONE: u8 = 1;

/// Where the engine answers a small `recv_into` ([`RdmaChannel::try_eager_into`]): the caller's
/// buffer and the answer. It lives inside the receive's boxed future, which never moves; the
/// engine reaches it through [`SlotPtr`] while it is in `Poller::eager_into`, only under the
/// engine's lock, and lets go of it by storing `state` last.
struct EagerSlot {
    ptr: *mut u8,
    cap: usize,
    state: AtomicU8,
    /// Written by the engine before `state` becomes [`SLOT_DONE`]; taken by the future after.
    result: UnsafeCell<Option<Result<usize>>>,
    /// The task to wake, set under the engine's lock when the future goes to sleep.
    waker: UnsafeCell<Option<Waker>>,
}

/// The engine's handle on a waiting [`EagerSlot`].
#[derive(Clone, Copy)]
struct SlotPtr(*const EagerSlot);

// SAFETY: the slot is only touched under the engine's lock (or through its atomic state), and
// its future removes it from the engine, under that lock, before it ends.
unsafe impl Send for SlotPtr {}

impl SlotPtr {
    /// Answers the receive with `body` (copied into its buffer if it fits, else the
    /// `recv_into` length error) and lets go of the slot.
    ///
    /// # Safety
    /// The slot was just removed from `Poller::eager_into` by the engine's holder (so its future
    /// is alive and waiting), and is not used again.
    unsafe fn answer(self, me: Rank, src: Rank, body: &[u8]) {
        // SAFETY: per the contract, the future (and with it the slot and the borrow of its
        // buffer) lives until `state` says it is done.
        let slot = unsafe { &*self.0 };
        let r = if body.len() <= slot.cap {
            // SAFETY: the buffer has `cap` bytes and nobody else uses it while the slot waits.
            unsafe { std::ptr::copy_nonoverlapping(body.as_ptr(), slot.ptr, body.len()) };
            Ok(body.len())
        } else {
            Err(Error::CountMismatch {
                me,
                peer: src,
                what: RECV_INTO_TOO_LONG,
                expected: slot.cap,
                got: body.len(),
            })
        };
        // SAFETY: as above.
        unsafe { self.finish(r) };
    }

    /// Stores the answer `r`, wakes the future if it sleeps, and lets go of the slot.
    ///
    /// # Safety
    /// As for [`SlotPtr::answer`].
    unsafe fn finish(self, r: Result<usize>) {
        // SAFETY: see `answer`; the future reads these fields only once `state` is DONE (or
        // under the engine's lock, which the caller holds).
        let slot = unsafe { &*self.0 };
        let waker = unsafe {
            *slot.result.get() = Some(r);
            (*slot.waker.get()).take()
        };
        slot.state.store(SLOT_DONE, Ordering::Release);
        // From here on the future may end and free the slot: it is not touched again.
        if let Some(w) = waker {
            w.wake();
        }
    }
}

/// The future of a small `recv_into` answered by the engine ([`RdmaChannel::try_eager_into`]).
/// Boxed before its slot is registered, and never moved out of its box.
struct EagerInto<'a> {
    shared: &'a Shared,
    me: Rank,
    src: Rank,
    tag: Tag,
    deadline: Instant,
    std_deadline: std::time::Instant,
    drive: Drive<'a>,
    slot: EagerSlot,
    /// The slot is (or was, until the engine answered it) in `Poller::eager_into`.
    registered: bool,
    /// The deadline's timer, made only when the receive goes to sleep.
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
    /// The slot's buffer is borrowed for the future's life.
    _buf: PhantomData<&'a mut [u8]>,
}

// SAFETY: the raw buffer pointer comes from a `&'a mut [u8]` this future holds the borrow of;
// the slot's cells are shared with the engine only under its lock or through `state`.
unsafe impl Send for EagerInto<'_> {}

impl EagerInto<'_> {
    /// The engine's answer (`state` is DONE).
    fn take(&mut self) -> Result<usize> {
        self.registered = false;
        // SAFETY: DONE: the engine has let go of the slot, and wrote `result` before.
        unsafe { (*self.slot.result.get()).take() }.unwrap_or(Err(Error::Closed { channel: NAME }))
    }

    fn done(&self) -> bool {
        self.slot.state.load(Ordering::Acquire) == SLOT_DONE
    }
}

impl Future for EagerInto<'_> {
    type Output = Result<usize>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<usize>> {
        // SAFETY: nothing is moved out of the pinned future; the slot stays where it is.
        let this = unsafe { self.get_unchecked_mut() };
        if !this.registered {
            return Poll::Ready(Err(Error::Closed { channel: NAME }));
        }
        let slot = &this.slot;
        let answered = std::future::poll_fn(|_| {
            if slot.state.load(Ordering::Acquire) == SLOT_DONE {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        });
        if this.drive.poll(cx, pin!(answered)).is_ready() {
            return Poll::Ready(this.take());
        }
        // Not answered within the spin (or the deadline ended the spin).
        let sh = this.shared;
        let mut p = sh.lock_engine();
        if this.done() {
            drop(p);
            return Poll::Ready(this.take());
        }
        if std::time::Instant::now() >= this.std_deadline {
            p.forget_eager_into(this.src, this.tag, &this.slot);
            drop(p);
            this.registered = false;
            let waited = this.drive.first.map_or(Duration::ZERO, |f| f.elapsed());
            return Poll::Ready(Err(Error::Timeout {
                me: this.me,
                peer: this.src,
                waited,
                channel: NAME,
                tag: this.tag,
            }));
        }
        // SAFETY: under the engine's lock, and the slot is still the engine's (not DONE).
        unsafe { *this.slot.waker.get() = Some(cx.waker().clone()) };
        drop(p);
        if this.sleep.is_none() && tokio::runtime::Handle::try_current().is_ok() {
            // A timer for the deadline (outside a runtime, only the next poll looks at it).
            this.sleep = Some(Box::pin(tokio::time::sleep_until(this.deadline)));
        }
        if let Some(sleep) = this.sleep.as_mut() {
            if sleep.as_mut().poll(cx).is_ready() {
                // The deadline passed just now: look again (and time out) in the next poll.
                cx.waker().wake_by_ref();
            }
        }
        Poll::Pending
    }
}

impl Drop for EagerInto<'_> {
    fn drop(&mut self) {
        if !self.registered || self.done() {
            return;
        }
        // Ended before its answer (dropped, a timeout around it): taken out of the engine, under
        // its lock, so that no message is copied into the buffer once its borrow ends.
        let mut p = self.shared.lock_engine();
        if !self.done() {
            p.forget_eager_into(self.src, self.tag, &self.slot);
        }
    }
}

impl Drop for RdmaChannel {
    fn drop(&mut self) {
        // No future of this channel is left (they borrow it), so nobody drives but the poller,
        // which flushes the queued sends and exits. The engine (endpoint, registrations, bounce
        // buffers) closes with the last reference to `shared`, this one, after the join.
        self.shared.shutdown.store(true, Ordering::Release);
        self.shared.wake();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.inbox.close();
    }
}

/// The future of an eager send, which is complete when `send` returns.
struct SentAtOnce;

impl Future for SentAtOnce {
    type Output = Result<()>;

    fn poll(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// How a direct `recv_into` ended.
enum Direct {
    /// A rendezvous read into the caller's buffer: its length.
    Read(Result<usize>),
    /// The inbox's answer: a message to copy, or an error.
    Inbox(Result<Vec<u8>>),
}

/// How long a rendezvous message that nobody waits for yet waits for a `recv_into` to read it
/// into ([`Slot::Parked`]) before it is read into a new `Vec`: the receive of a ping-pong or of
/// a loop is registered within microseconds of the message's RTS.
const PARK_GRACE: Duration = Duration::from_micros(100);

/// How long a `recv_into` future dropped during a read into its buffer drives progress waiting
/// for that read to end (a read completes or fails on its own; this bounds the loop).
const READ_DRAIN_LIMIT: Duration = Duration::from_secs(60);

/// Removes a `recv_into` from the engine when its future ends; if a read into its buffer is
/// running (the future was dropped mid-read), drives progress until the read is over, so that
/// the borrow of the buffer never ends while the provider may still write into it.
struct DirectGuard<'a> {
    shared: &'a Shared,
    src: Rank,
    tag: Tag,
    id: u64,
    armed: bool,
}

impl Drop for DirectGuard<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let sh = self.shared;
        let started = std::time::Instant::now();
        let mut p = sh.lock_engine();
        while !p.forget_direct(self.src, self.tag, self.id) {
            if started.elapsed() > READ_DRAIN_LIMIT {
                // The provider neither completed nor failed the read: returning would hand the
                // caller a buffer that may still be written to.
                tracing::error!(
                    rank = p.me.0,
                    peer = self.src.0,
                    "rdma: a read into a dropped recv_into's buffer did not end in {READ_DRAIN_LIMIT:?}; aborting"
                );
                std::process::abort();
            }
            sh.step(&mut p);
            std::hint::spin_loop();
        }
        sh.busy.store(p.in_flight, Ordering::SeqCst);
    }
}

/// Cancels a rendezvous send whose future is dropped before the peer finished reading: its
/// registration is closed (revoking the peer's access) before the borrow ends.
struct CancelGuard<'a> {
    id: u64,
    shared: &'a Shared,
    armed: bool,
}

impl Drop for CancelGuard<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        // Blocking: the holder keeps the engine for one step only, and this thread holds nothing.
        let sh = self.shared;
        let mut p = sh.lock_engine();
        // The send may still be queued: post it first, so the order of the queue stays intact.
        sh.take_cmds(&mut p);
        p.cancel(self.id);
        sh.busy.store(p.in_flight, Ordering::SeqCst);
    }
}

impl Channel for RdmaChannel {
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
        self.size
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::push_unlimited()
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        let sh = &*self.shared;
        let (direct, vec, eager_direct, stalls, returns) = {
            let p = sh.lock_engine();
            (
                p.reads_direct,
                p.reads_vec,
                p.eager_direct,
                p.credit_stalls,
                p.credit_returns,
            )
        };
        vec![
            ("rdma_reads_direct", direct),
            ("rdma_reads_vec", vec),
            ("rdma_eager_direct", eager_direct),
            ("rdma_credit_stalls", stalls),
            ("rdma_credit_returns", returns),
            ("rdma_spin_hits", sh.spin_hits.load(Ordering::Relaxed)),
            ("rdma_spin_misses", sh.spin_misses.load(Ordering::Relaxed)),
            ("rdma_spin_skipped", sh.spin_skipped.load(Ordering::Relaxed)),
            (
                "rdma_spin_short_hits",
                sh.spin_short_hits.load(Ordering::Relaxed),
            ),
        ]
    }

    fn send<'a>(
        &'a self,
        dst: Rank,
        tag: Tag,
        data: &'a [u8],
        deadline: Instant,
    ) -> BoxFuture<'a, Result<()>> {
        if let Err(e) = check_rank(dst, self.size) {
            return futures::future::ready(Err(e)).boxed();
        }
        let sh = &*self.shared;
        if sh.shutdown.load(Ordering::Acquire) || sh.broken.load(Ordering::Acquire) {
            return futures::future::ready(Err(Error::Closed { channel: NAME })).boxed();
        }
        if dst == self.rank {
            self.inbox.deliver(dst, tag, data.to_vec());
            return futures::future::ready(Ok(())).boxed();
        }
        if data.len() <= self.eager_max {
            // Sent (or copied into the queue) now: the caller's buffer is free on return.
            match sh.try_engine() {
                Some(mut p) => {
                    // Sends queued before this one go first: the queue keeps the call order.
                    sh.take_cmds(&mut p);
                    p.send_eager(dst, tag, data);
                    if !p.deferred.is_empty() {
                        // After the send: it is not held up by them.
                        if let Err(e) = p.repost_deferred() {
                            tracing::warn!(rank = p.me.0, error = %e, "rdma: posting a receive failed");
                        }
                    }
                    if p.in_flight >= REAP_AT {
                        sh.step(&mut p);
                    }
                    if sh.busy.load(Ordering::Relaxed) != p.in_flight {
                        sh.busy.store(p.in_flight, Ordering::SeqCst);
                    }
                }
                None => sh.push(Cmd::Eager {
                    dst,
                    tag,
                    data: data.to_vec(),
                }),
            }
            // A zero-sized future: boxing it allocates nothing.
            return Box::pin(SentAtOnce);
        }
        let id = sh.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        sh.submit(Cmd::Large {
            id,
            dst,
            tag,
            ptr: data.as_ptr() as usize,
            len: data.len(),
            done: tx,
        });
        let guard = CancelGuard {
            id,
            shared: sh,
            armed: true,
        };
        // The FIN comes after the peer's read of the whole message: spin that much longer.
        let window = if sh.spin.is_zero() {
            Duration::ZERO
        } else {
            let extra = (data.len() as u64).saturating_mul(SPIN_NS_PER_BYTE);
            sh.spin + Duration::from_nanos(extra)
        };
        let mut drive = Drive::new(sh, dst, window);
        let std_deadline = deadline.into_std();
        // The spin ends at the deadline at the latest; a timer is made only if the wait goes to
        // sleep (registering one for every message cost a tokio timer-wheel entry and an eventfd
        // write of the runtime's driver per rendezvous send).
        drive.deadline = Some(std_deadline);
        let me = self.rank;
        let started = Instant::now();
        async move {
            let mut guard = guard;
            // `data` stays borrowed by this future until the guard has run.
            let _keep = data;
            // Outside tokio's cooperative budget, or a spin could miss that the FIN came.
            let mut rx = pin!(tokio::task::unconstrained(rx));
            let mut sleep: Option<Pin<Box<tokio::time::Sleep>>> = None;
            let fin = std::future::poll_fn(|cx| {
                let fin = std::future::poll_fn(|cx| rx.as_mut().poll(cx));
                if let Poll::Ready(r) = drive.poll(cx, pin!(fin)) {
                    return Poll::Ready(Some(r));
                }
                // Not answered within the spin (or the deadline ended the spin).
                if std::time::Instant::now() >= std_deadline {
                    return Poll::Ready(None);
                }
                if sleep.is_none() && tokio::runtime::Handle::try_current().is_ok() {
                    sleep = Some(Box::pin(tokio::time::sleep_until(deadline)));
                }
                if let Some(s) = sleep.as_mut() {
                    if s.as_mut().poll(cx).is_ready() {
                        return Poll::Ready(None);
                    }
                }
                Poll::Pending
            })
            .await;
            let r = match fin {
                Some(Ok(r)) => {
                    guard.armed = false;
                    r
                }
                Some(Err(_)) => {
                    guard.armed = false;
                    Err(Error::Closed { channel: NAME })
                }
                None => Err(Error::Timeout {
                    me,
                    peer: dst,
                    waited: started.elapsed(),
                    channel: NAME,
                    tag,
                }),
            };
            drop(guard);
            r
        }
        .boxed()
    }

    fn recv(&self, src: Rank, tag: Tag, deadline: Instant) -> BoxFuture<'_, Result<Vec<u8>>> {
        if let Err(e) = check_rank(src, self.size) {
            return futures::future::ready(Err(e)).boxed();
        }
        self.recv_unboxed(src, tag, deadline).boxed()
    }

    fn recv_into<'a>(
        &'a self,
        src: Rank,
        tag: Tag,
        buf: &'a mut [u8],
        deadline: Instant,
    ) -> BoxFuture<'a, Result<usize>> {
        let me = self.rank;
        if let Err(e) = check_rank(src, self.size) {
            return futures::future::ready(Err(e)).boxed();
        }
        let buf = if src != self.rank && buf.len() <= self.eager_max {
            // Small: an eager message is copied into `buf` by the engine straight from the
            // bounce buffer when nothing stands before this receive.
            match self.try_eager_into(src, tag, buf, deadline) {
                Ok(fut) => return fut,
                Err(buf) => buf,
            }
        } else {
            buf
        };
        if src == self.rank || buf.len() <= self.eager_max {
            // Only a rendezvous message can be read into `buf` directly; an eager one is copied
            // out of its bounce buffer either way.
            let msg = self.recv_unboxed(src, tag, deadline);
            return async move { copy_message(me, src, &msg.await?, buf) }.boxed();
        }
        let sh = &*self.shared;
        sh.into_hint[src.idx()].store(true, Ordering::Relaxed);
        let counted = InboxRecv::new(&sh.inbox_recvs);
        let (ticket, inner) = self.inbox.recv_ticketed(src, tag, deadline);
        let Some(ticket) = ticket else {
            // Answered at once: a buffered message, or an error.
            return async move { copy_message(me, src, &inner.await?, buf) }.boxed();
        };
        let id = sh.next_id.fetch_add(1, Ordering::Relaxed);
        let taken = Arc::new(AtomicBool::new(false));
        let (tx, rx) = oneshot::channel();
        {
            // Blocking: the holder keeps the engine for one step only. An RTS handled before
            // this goes the usual way (read into a new `Vec`, copied below).
            let mut p = sh.lock_engine();
            p.direct
                .entry((src, tag))
                .or_default()
                .push_back(DirectRecv {
                    id,
                    ticket,
                    ptr: buf.as_mut_ptr() as usize,
                    cap: buf.len(),
                    taken: Arc::clone(&taken),
                    done: tx,
                });
            // Its message may be parked already (it came first): read it into `buf` now.
            if let Err(e) = p.claim_parked(src, tag) {
                tracing::warn!(rank = p.me.0, error = %e, "rdma: read failed");
            }
            // Or waiting in the completion queue: one step now starts its read into `buf`
            // without a round through the wait below.
            sh.step(&mut p);
            sh.parked.store(p.parked.len(), Ordering::SeqCst);
            sh.busy.store(p.in_flight, Ordering::SeqCst);
        }
        let guard = DirectGuard {
            shared: sh,
            src,
            tag,
            id,
            armed: true,
        };
        let mut drive = Drive::new(sh, src, sh.spin);
        async move {
            let _counted = counted;
            let mut guard = guard;
            let mut inner = pin!(tokio::task::unconstrained(inner));
            let mut rx = rx;
            let mut rx_gone = false;
            let mut answer: Option<Result<Vec<u8>>> = None;
            let mut wait = pin!(std::future::poll_fn(|cx| {
                if !rx_gone {
                    match Pin::new(&mut rx).poll(cx) {
                        Poll::Ready(Ok(r)) => return Poll::Ready(Direct::Read(r)),
                        // The engine let go of it: the inbox's answer counts.
                        Poll::Ready(Err(_)) => rx_gone = true,
                        Poll::Pending => {}
                    }
                }
                if answer.is_none() {
                    if let Poll::Ready(r) = inner.as_mut().poll(cx) {
                        answer = Some(r);
                    }
                }
                // Once the engine has taken this receive, the inbox's answer (its receiver
                // withdrawn) does not count: the read's result comes through `rx`.
                if rx_gone || !taken.load(Ordering::SeqCst) {
                    if let Some(r) = answer.take() {
                        return Poll::Ready(Direct::Inbox(r));
                    }
                }
                Poll::Pending
            }));
            let out = std::future::poll_fn(|cx| drive.poll(cx, wait.as_mut())).await;
            match out {
                Direct::Read(r) => {
                    // The read is over and the engine has forgotten this receive.
                    guard.armed = false;
                    r
                }
                Direct::Inbox(r) => {
                    // The engine never took it; the guard removes it from the engine first.
                    drop(guard);
                    copy_message(me, src, &r?, buf)
                }
            }
        }
        .boxed()
    }
}

// ---------------------------------------------------------------------------------------------
// The poller thread.

/// The context of one posted operation: libfabric may use the `fi_context2` (modes FI_CONTEXT /
/// FI_CONTEXT2), and hands its address back in the completion.
#[repr(C)]
struct OpCtx {
    raw: sys::fi_context2,
    op: Op,
}

enum Op {
    /// A posted receive into bounce buffer `idx`.
    Recv(usize),
    /// A send from send bounce buffer `idx`.
    Send(usize),
    /// An RMA read of a rendezvous message straight into the buffer of a waiting `recv_into`
    /// (its future keeps the buffer borrowed until `id` has left [`Poller::reading_into`]).
    ReadInto {
        src: Rank,
        seq: u64,
        len: usize,
        id: u64,
        done: oneshot::Sender<Result<usize>>,
        _mr: Option<MemoryRegion>,
    },
    /// An RMA read of a rendezvous message into `buf`.
    Read {
        src: Rank,
        seq: u64,
        tag: Tag,
        buf: Vec<u8>,
        len: usize,
        _mr: Option<MemoryRegion>,
    },
}

struct Bounce {
    // Registration before buffer: dropped first.
    mr: Option<MemoryRegion>,
    buf: Vec<u8>,
}

impl Bounce {
    fn desc(&self) -> *mut c_void {
        self.mr
            .as_ref()
            .map_or(std::ptr::null_mut(), MemoryRegion::desc)
    }
}

/// A send waiting to be (re)posted after `FI_EAGAIN`.
enum Retry {
    Send {
        bounce: usize,
        len: usize,
        dst: Rank,
        tag: u64,
    },
    /// A zero-byte message: a FIN, or a credit return.
    Bare { dst: Rank, tag: u64 },
}

struct LargeSend {
    id: u64,
    key: (usize, usize),
    done: oneshot::Sender<Result<()>>,
}

/// A waiting `recv_into` that a rendezvous message may be read into directly.
struct DirectRecv {
    id: u64,
    /// Its receiver in the [`Inbox`] ([`Inbox::recv_ticketed`]).
    ticket: u64,
    /// The caller's buffer (borrowed by the future until [`DirectGuard`] has run).
    ptr: usize,
    cap: usize,
    /// Set before the engine withdraws the receiver from the inbox: from then on the message
    /// comes through `done`, and the inbox's answer (its receiver dropped) is to be ignored.
    taken: Arc<AtomicBool>,
    done: oneshot::Sender<Result<usize>>,
}

/// A registration of caller memory shared by concurrent rendezvous sends of the same buffer
/// (a broadcast root sends one buffer to many children at once): registered once, closed when
/// the last of them finishes.
struct CachedMr {
    mr: MemoryRegion,
    refs: usize,
}

/// One message's place in its source's order.
enum Slot {
    /// Its rendezvous read is in flight.
    Reading,
    /// A rendezvous message nobody waited for yet: its read waits (up to [`PARK_GRACE`]) for a
    /// `recv_into` whose buffer it can go to.
    Parked {
        tag: Tag,
        len: usize,
        raddr: u64,
        rkey: u64,
        since: std::time::Instant,
    },
    /// Received, waiting for earlier messages.
    Ready(Tag, Vec<u8>),
    /// Lost (its read failed): passed over.
    Skipped,
}

#[derive(Default)]
struct Reorder {
    next: u64,
    /// Messages that arrived ahead of `next`, by sequence number.
    ahead: BTreeMap<u64, Slot>,
}

struct Poller {
    ep: Endpoint,
    addrs: Vec<FiAddr>,
    me: Rank,
    inbox: Arc<Inbox>,
    /// The channel is shutting down: failed receives are not reposted.
    closing: bool,
    /// Room for the completions one poll reads.
    comps: CompBuf,
    eager_max: usize,
    inject_size: usize,
    mr_local: bool,
    virt_addr: bool,
    prov_key: bool,
    next_key: u64,
    send_seq: Vec<u64>,
    reorder: Vec<Reorder>,
    recv_bufs: Vec<Bounce>,
    send_bufs: Vec<Bounce>,
    free_send: Vec<usize>,
    /// Raw contexts currently posted (freed after the endpoint closes, if never completed).
    live: LiveCtx,
    retry: VecDeque<Retry>,
    large: HashMap<(Rank, u64), LargeSend, BuildHasherDefault<KeyHasher>>,
    /// `recv_into`s waiting with a buffer of their own, by (source, tag), oldest first: a
    /// rendezvous message due to one of them is read straight into its buffer.
    direct: HashMap<(Rank, Tag), VecDeque<DirectRecv>, BuildHasherDefault<KeyHasher>>,
    /// The `recv_into`s whose buffer a read is writing right now.
    reading_into: HashSet<u64, BuildHasherDefault<KeyHasher>>,
    /// Sources whose next message is a parked rendezvous message ([`Slot::Parked`]).
    parked: Vec<Rank>,
    /// [`Shared::into_hint`].
    into_hint: Arc<Vec<AtomicBool>>,
    /// Rendezvous messages read straight into a `recv_into`'s buffer, and into a new `Vec`.
    reads_direct: u64,
    reads_vec: u64,
    /// A read was posted since the last poll of the completion queue ([`Shared::step`]).
    read_posted: bool,
    /// Receive bounce buffers (index, live context, sender) whose eager message went straight
    /// into a waiting `recv_into`, not yet posted again: the next step or send posts them (and
    /// only then owes their credits), so that the receive's answer does not wait for it.
    deferred: Vec<(usize, usize, Rank)>,
    mr_cache: HashMap<(usize, usize), CachedMr, BuildHasherDefault<KeyHasher>>,
    in_flight: usize,
    /// Small `recv_into`s answered by the engine itself ([`RdmaChannel::try_eager_into`]), at
    /// most one per key: the next message of that key is theirs.
    eager_into: EagerWaiters,
    /// Keys that had a zero-length message handed to the inbox: it may still be buffered there
    /// unseen by `Inbox::buffered_bytes`, so their `recv_into`s go through the inbox.
    zero_len: HashSet<(Rank, Tag), BuildHasherDefault<KeyHasher>>,
    /// Eager messages copied straight into a waiting `recv_into`'s buffer.
    eager_direct: u64,
    /// Per peer: messages it may still be sent before it returns credits ("Flow control").
    credits: Vec<u32>,
    /// Per peer: messages to it that wait for credits (libfabric tag, bytes), in call order.
    /// Non-empty only while its credits are zero.
    held: Vec<VecDeque<(u64, Vec<u8>)>>,
    /// Per peer: its messages whose receive buffer was posted again, not yet returned as credits.
    owed: Vec<u32>,
    /// Credits are returned once this many are owed (half a peer's credits, rounded up).
    credit_batch: u32,
    /// Messages that had to wait for credits, and credit messages sent: [`Channel::counters`].
    credit_stalls: u64,
    credit_returns: u64,
}

/// Room for completions read from the queue.
struct CompBuf(Vec<Completion>);

// SAFETY: completions are plain values; their context pointers are only compared and turned back
// into the boxes they came from by the engine's holder.
unsafe impl Send for CompBuf {}

fn make_tag(proto: u64, rank: Rank, seq: u64) -> u64 {
    (proto << PROTO_SHIFT) | ((u64::from(rank.0) & RANK_MASK) << RANK_SHIFT) | (seq & SEQ_MASK)
}

fn split_tag(tag: u64) -> (u64, Rank, u64) {
    (
        tag >> PROTO_SHIFT,
        Rank(((tag >> RANK_SHIFT) & RANK_MASK) as u32),
        tag & SEQ_MASK,
    )
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    if let Some(s) = b.get(at..at + 8) {
        x.copy_from_slice(s);
    }
    u64::from_le_bytes(x)
}

impl Poller {
    fn new(
        ep: Endpoint,
        addrs: Vec<FiAddr>,
        me: Rank,
        inbox: Arc<Inbox>,
        eager_max: usize,
        recv_buffers: usize,
    ) -> std::result::Result<Poller, FabricError> {
        let info = ep.info();
        let mr_mode = info.mr_mode();
        let n = addrs.len();
        let (recv_buffers, credits) = credit_plan(recv_buffers, n);
        let mut p = Poller {
            inject_size: info.inject_size(),
            mr_local: mr_mode & sys::FI_MR_LOCAL != 0,
            virt_addr: mr_mode & sys::FI_MR_VIRT_ADDR != 0,
            prov_key: mr_mode & sys::FI_MR_PROV_KEY != 0,
            ep,
            addrs,
            me,
            inbox,
            closing: false,
            comps: CompBuf(vec![Completion::default(); 16]),
            eager_max,
            next_key: 1,
            send_seq: vec![0; n],
            reorder: (0..n).map(|_| Reorder::default()).collect(),
            recv_bufs: Vec::new(),
            send_bufs: Vec::new(),
            free_send: Vec::new(),
            live: LiveCtx::default(),
            retry: VecDeque::new(),
            large: HashMap::default(),
            direct: HashMap::default(),
            reading_into: HashSet::default(),
            parked: Vec::new(),
            into_hint: Arc::new(Vec::new()),
            reads_direct: 0,
            reads_vec: 0,
            read_posted: false,
            deferred: Vec::new(),
            mr_cache: HashMap::default(),
            in_flight: 0,
            eager_into: EagerWaiters(Vec::new()),
            zero_len: HashSet::default(),
            eager_direct: 0,
            credits: vec![credits; n],
            held: (0..n).map(|_| VecDeque::new()).collect(),
            owed: vec![0; n],
            credit_batch: credits.div_ceil(2).max(1),
            credit_stalls: 0,
            credit_returns: 0,
        };
        let cap = eager_max + EAGER_HDR;
        for _ in 0..recv_buffers {
            let b = p.bounce(cap, u64::from(sys::FI_RECV))?;
            p.recv_bufs.push(b);
        }
        for i in 0..p.recv_bufs.len() {
            p.post_recv(i)?;
        }
        Ok(p)
    }

    /// A bounce buffer of `cap` bytes, registered once (for its whole life) when the provider
    /// requires registered local buffers.
    fn bounce(&mut self, cap: usize, access: u64) -> std::result::Result<Bounce, FabricError> {
        let buf = vec![0u8; cap];
        let mr = if self.mr_local {
            let key = self.key();
            // SAFETY: the buffer lives in the Bounce next to its registration, which is dropped
            // first (field order) and never resized.
            Some(unsafe { self.ep.register(buf.as_ptr(), buf.len(), access, key)? })
        } else {
            None
        };
        Ok(Bounce { buf, mr })
    }

    fn key(&mut self) -> u64 {
        if self.prov_key {
            0
        } else {
            self.next_key += 1;
            self.next_key
        }
    }

    fn ctx(&mut self, op: Op) -> *mut c_void {
        let raw = Box::into_raw(Box::new(OpCtx {
            raw: sys::fi_context2::default(),
            op,
        }));
        self.live.0.insert(raw as usize);
        raw.cast()
    }

    /// Takes back a context the provider is done with.
    fn take_ctx(&mut self, raw: *mut c_void) -> Option<Op> {
        if !self.live.0.remove(&(raw as usize)) {
            return None;
        }
        // SAFETY: raw came from Box::into_raw in `ctx` and is taken back exactly once (it was in
        // `live`).
        let b = unsafe { Box::from_raw(raw.cast::<OpCtx>()) };
        Some(b.op)
    }

    fn drop_ctx(&mut self, raw: *mut c_void) {
        let _ = self.take_ctx(raw);
    }

    fn post_recv(&mut self, idx: usize) -> std::result::Result<(), FabricError> {
        let ctx = self.ctx(Op::Recv(idx));
        self.repost_recv(idx, ctx)
    }

    /// Posts receive bounce buffer `idx` with `ctx`, a live context of `Op::Recv(idx)` (a
    /// completed receive's context is reused as it is).
    fn repost_recv(
        &mut self,
        idx: usize,
        ctx: *mut c_void,
    ) -> std::result::Result<(), FabricError> {
        let b = &mut self.recv_bufs[idx];
        let desc = b.desc();
        loop {
            // SAFETY: the bounce buffer lives (unmoved) as long as the poller, which closes the
            // endpoint before freeing it; ctx is a live OpCtx.
            match unsafe {
                self.ep
                    .post_recv_any(b.buf.as_mut_ptr(), b.buf.len(), desc, ctx)
            } {
                Ok(true) => return Ok(()),
                Ok(false) => {
                    // Receive queue full: make progress and retry.
                    let mut c = [Completion::default(); 1];
                    let _ = self.ep.cq().read(&mut c[..0]);
                    std::hint::spin_loop();
                }
                Err(e) => {
                    self.drop_ctx(ctx);
                    return Err(e);
                }
            }
        }
    }

    fn send_bounce(&mut self) -> std::result::Result<usize, FabricError> {
        if let Some(i) = self.free_send.pop() {
            return Ok(i);
        }
        let b = self.bounce(self.eager_max + EAGER_HDR, u64::from(sys::FI_SEND))?;
        self.send_bufs.push(b);
        Ok(self.send_bufs.len() - 1)
    }

    /// Keeps a message to `dst` until credits come (counted in flight: it needs progress).
    #[cold]
    fn hold(&mut self, dst: Rank, tag: u64, bytes: Vec<u8>) {
        self.held[dst.idx()].push_back((tag, bytes));
        self.in_flight += 1;
        self.credit_stalls += 1;
    }

    /// Sends the FIN of message `seq` from `src` (its read is over), with a credit or held.
    fn send_fin(&mut self, src: Rank, seq: u64) {
        let tag = make_tag(PROTO_FIN, self.me, seq);
        let c = &mut self.credits[src.idx()];
        if *c > 0 {
            *c -= 1;
            self.retry.push_back(Retry::Bare { dst: src, tag });
            self.in_flight += 1;
        } else {
            self.hold(src, tag, Vec::new());
        }
    }

    /// Peer `src` returned `n` credits: its held messages go, in order, while they last.
    fn on_credit(&mut self, src: Rank, n: u64) {
        let i = src.idx();
        let n = u32::try_from(n).unwrap_or(u32::MAX);
        self.credits[i] = self.credits[i].saturating_add(n);
        while self.credits[i] > 0 {
            let Some((tag, bytes)) = self.held[i].pop_front() else {
                break;
            };
            self.in_flight -= 1;
            // Takes one of the credits just counted.
            if let Err(e) = self.send_bytes(src, tag, &[&bytes]) {
                tracing::warn!(rank = self.me.0, peer = src.0, error = %e, "rdma: held send failed");
            }
        }
    }

    /// A message from `src` has had its receive buffer posted again: that is a credit owed to
    /// it, returned in a batch.
    #[inline]
    fn owe(&mut self, src: Rank) {
        if let Some(o) = self.owed.get_mut(src.idx()) {
            *o += 1;
            if *o >= self.credit_batch {
                self.return_credits(src);
            }
        }
    }

    /// Sends `src` the credits owed to it.
    #[cold]
    fn return_credits(&mut self, src: Rank) {
        let i = src.idx();
        let n = std::mem::take(&mut self.owed[i]);
        let tag = make_tag(PROTO_CREDIT, self.me, u64::from(n));
        self.credit_returns += 1;
        if self.retry.is_empty() {
            match self.ep.inject(&[], self.addrs[i], tag) {
                Ok(true) => return,
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(rank = self.me.0, peer = src.0, error = %e, "rdma: credit return failed; retried");
                }
            }
        }
        self.retry.push_back(Retry::Bare { dst: src, tag });
        self.in_flight += 1;
    }

    /// Sends `parts` (concatenated) to `dst` with libfabric tag `tag`, taking a credit for
    /// `dst` (injected when small enough, else from a bounce buffer), or holds a copy until the
    /// peer returns credits when none is left.
    fn send_bytes(
        &mut self,
        dst: Rank,
        tag: u64,
        parts: &[&[u8]],
    ) -> std::result::Result<(), FabricError> {
        match self.credits.get_mut(dst.idx()) {
            Some(c) if *c > 0 => *c -= 1,
            _ => {
                self.hold(dst, tag, parts.concat());
                return Ok(());
            }
        }
        let len: usize = parts.iter().map(|p| p.len()).sum();
        if len <= STACK_INJECT && len <= self.inject_size && self.retry.is_empty() {
            // Small enough to gather on the stack: injected without taking a bounce buffer
            // (`fi_inject` needs no registration, and the buffer is free on return).
            let mut tmp = [0u8; STACK_INJECT];
            let mut at = 0;
            for p in parts {
                tmp[at..at + p.len()].copy_from_slice(p);
                at += p.len();
            }
            if self.ep.inject(&tmp[..len], self.addrs[dst.idx()], tag)? {
                return Ok(());
            }
            // FI_EAGAIN: queued from a bounce buffer below.
        }
        let i = self.send_bounce()?;
        let mut at = 0;
        for p in parts {
            self.send_bufs[i].buf[at..at + p.len()].copy_from_slice(p);
            at += p.len();
        }
        if len > STACK_INJECT && len <= self.inject_size && self.retry.is_empty() {
            let dest = self.addrs[dst.idx()];
            match self.ep.inject(&self.send_bufs[i].buf[..len], dest, tag) {
                Ok(true) => {
                    self.free_send.push(i);
                    return Ok(());
                }
                Ok(false) => {}
                Err(e) => {
                    self.free_send.push(i);
                    return Err(e);
                }
            }
        }
        self.retry.push_back(Retry::Send {
            bounce: i,
            len,
            dst,
            tag,
        });
        self.in_flight += 1;
        self.flush_retries()
    }

    /// Posts queued sends in order until the provider says `FI_EAGAIN`.
    fn flush_retries(&mut self) -> std::result::Result<(), FabricError> {
        while let Some(r) = self.retry.pop_front() {
            match r {
                Retry::Send {
                    bounce,
                    len,
                    dst,
                    tag,
                } => {
                    let ctx = self.ctx(Op::Send(bounce));
                    let b = &self.send_bufs[bounce];
                    let dest = self.addrs[dst.idx()];
                    // SAFETY: the bounce buffer stays reserved (not in free_send) until the
                    // completion for ctx; ctx is live.
                    match unsafe {
                        self.ep
                            .post_send(b.buf.as_ptr(), len, b.desc(), dest, tag, ctx)
                    } {
                        Ok(true) => {}
                        Ok(false) => {
                            self.drop_ctx(ctx);
                            self.retry.push_front(Retry::Send {
                                bounce,
                                len,
                                dst,
                                tag,
                            });
                            return Ok(());
                        }
                        Err(e) => {
                            self.drop_ctx(ctx);
                            self.free_send.push(bounce);
                            self.in_flight -= 1;
                            return Err(e);
                        }
                    }
                }
                Retry::Bare { dst, tag } => match self.ep.inject(&[], self.addrs[dst.idx()], tag) {
                    Ok(true) => self.in_flight -= 1,
                    Ok(false) => {
                        self.retry.push_front(Retry::Bare { dst, tag });
                        return Ok(());
                    }
                    Err(e) => {
                        self.in_flight -= 1;
                        return Err(e);
                    }
                },
            }
        }
        Ok(())
    }

    /// Sends an eager message: its sequence number is the next on the pair.
    fn send_eager(&mut self, dst: Rank, tag: Tag, data: &[u8]) {
        let seq = self.send_seq[dst.idx()];
        self.send_seq[dst.idx()] += 1;
        let t = make_tag(PROTO_EAGER, self.me, seq);
        if let Err(e) = self.send_bytes(dst, t, &[&tag.0.to_le_bytes(), data]) {
            tracing::warn!(rank = self.me.0, peer = dst.0, error = %e, "rdma: eager send failed");
        }
    }

    fn handle_cmd(&mut self, cmd: Cmd) {
        match cmd {
            Cmd::Eager { dst, tag, data } => self.send_eager(dst, tag, &data),
            Cmd::Large {
                id,
                dst,
                tag,
                ptr,
                len,
                done,
            } => {
                let seq = self.send_seq[dst.idx()];
                self.send_seq[dst.idx()] += 1;
                let key = (ptr, len);
                let (rkey, raddr) = match self.acquire_mr(key) {
                    Ok(k) => k,
                    Err(e) => {
                        let _ = done.send(Err(fabric_error(self.me, Some(dst), e)));
                        return;
                    }
                };
                let mut rts = [0u8; RTS_LEN];
                rts[0..8].copy_from_slice(&tag.0.to_le_bytes());
                rts[8..16].copy_from_slice(&(len as u64).to_le_bytes());
                rts[16..24].copy_from_slice(&raddr.to_le_bytes());
                rts[24..32].copy_from_slice(&rkey.to_le_bytes());
                let t = make_tag(PROTO_RTS, self.me, seq);
                if let Err(e) = self.send_bytes(dst, t, &[&rts]) {
                    self.release_mr(key);
                    let _ = done.send(Err(fabric_error(self.me, Some(dst), e)));
                    return;
                }
                self.in_flight += 1;
                self.large
                    .insert((dst, seq & SEQ_MASK), LargeSend { id, key, done });
            }
        }
    }

    /// Forgets the rendezvous send `id` (its future was dropped): its registration is closed,
    /// so the peer can no longer read the buffer.
    fn cancel(&mut self, id: u64) {
        let found = self.large.iter().find(|(_, l)| l.id == id).map(|(k, _)| *k);
        if let Some(k) = found {
            if let Some(l) = self.large.remove(&k) {
                self.in_flight -= 1;
                self.release_mr(l.key);
            }
        }
    }

    /// Registers (or reuses the registration of) caller memory for remote reads; returns the
    /// key and the address the peer must use.
    fn acquire_mr(&mut self, key: (usize, usize)) -> std::result::Result<(u64, u64), FabricError> {
        let raddr = if self.virt_addr { key.0 as u64 } else { 0 };
        if let Some(c) = self.mr_cache.get_mut(&key) {
            c.refs += 1;
            return Ok((c.mr.key(), raddr));
        }
        let rk = self.key();
        let access = u64::from(sys::FI_REMOTE_READ) | u64::from(sys::FI_SEND);
        // SAFETY: the caller's future keeps the buffer borrowed until this registration is
        // released (FIN, or the cancel guard's acknowledged Cancel).
        let mr = unsafe { self.ep.register(key.0 as *const u8, key.1, access, rk)? };
        let k = mr.key();
        self.mr_cache.insert(key, CachedMr { mr, refs: 1 });
        Ok((k, raddr))
    }

    fn release_mr(&mut self, key: (usize, usize)) {
        if let Some(c) = self.mr_cache.get_mut(&key) {
            c.refs -= 1;
            if c.refs == 0 {
                self.mr_cache.remove(&key);
            }
        }
    }

    fn deliver_in_order(&mut self, src: Rank) {
        loop {
            let r = &mut self.reorder[src.idx()];
            let Some((&seq, slot)) = r.ahead.first_key_value() else {
                break;
            };
            if seq != r.next || matches!(slot, Slot::Reading | Slot::Parked { .. }) {
                break;
            }
            r.next = (r.next + 1) & SEQ_MASK;
            if let Some((_, Slot::Ready(tag, msg))) = r.ahead.pop_first() {
                self.hand_over(src, tag, msg);
            }
        }
    }

    /// Hands message `seq` from `src` to its receiver in its source's order.
    fn ready(&mut self, src: Rank, seq: u64, tag: Tag, msg: Vec<u8>) {
        let r = &mut self.reorder[src.idx()];
        if seq == r.next && r.ahead.is_empty() {
            // The usual case: the next one, with nothing waiting ahead of it.
            r.next = (r.next + 1) & SEQ_MASK;
            self.hand_over(src, tag, msg);
        } else {
            r.ahead.insert(seq, Slot::Ready(tag, msg));
            self.deliver_in_order(src);
        }
    }

    /// The next message of `(src, tag)`, in order: to the small `recv_into` waiting for it in
    /// the engine, else to the inbox.
    fn hand_over(&mut self, src: Rank, tag: Tag, msg: Vec<u8>) {
        if let Some(s) = self.take_eager_into(src, tag) {
            // SAFETY: just removed from `eager_into` under the engine's lock.
            unsafe { s.answer(self.me, src, &msg) };
            return;
        }
        if msg.is_empty() && !self.zero_len.contains(&(src, tag)) {
            self.zero_len.insert((src, tag));
        }
        self.inbox.deliver(src, tag, msg);
    }

    /// Removes the small `recv_into` waiting for `(src, tag)` from the engine, to answer it.
    fn take_eager_into(&mut self, src: Rank, tag: Tag) -> Option<SlotPtr> {
        if self.eager_into.is_empty() {
            return None;
        }
        let s = self.eager_into.remove(src, tag)?;
        self.eager_direct += 1;
        Some(s)
    }

    /// Removes the small `recv_into` whose slot is `slot` (its future is ending unanswered).
    fn forget_eager_into(&mut self, src: Rank, tag: Tag, slot: *const EagerSlot) {
        let list = &mut self.eager_into.0;
        if let Some(i) = list
            .iter()
            .position(|&(s, t, p)| s == src && t == tag && std::ptr::eq(p.0, slot))
        {
            list.swap_remove(i);
        }
    }

    /// Fails every small `recv_into` waiting in the engine (the completion queue broke).
    fn fail_eager_into(&mut self) {
        for (_, _, s) in self.eager_into.0.drain(..) {
            // SAFETY: removed from `eager_into` under the engine's lock.
            unsafe { s.finish(Err(Error::Closed { channel: NAME })) };
        }
    }

    /// A completed receive into bounce buffer `i` (posted with the live context `ctx`); once
    /// the buffer is posted again, a message other than a credit return is a credit owed.
    fn on_recv(
        &mut self,
        i: usize,
        ctx: *mut c_void,
        c: &Completion,
    ) -> std::result::Result<(), FabricError> {
        let reposted = self.take_message(i, ctx, c)?;
        let (proto, src, _) = split_tag(c.tag);
        if reposted && proto != PROTO_CREDIT {
            self.owe(src);
        }
        Ok(())
    }

    /// Posts the bounce buffers of messages answered straight into a waiting `recv_into`
    /// ([`Poller::deferred`]) again, each a credit owed to its sender.
    fn repost_deferred(&mut self) -> std::result::Result<(), FabricError> {
        while let Some((i, ctx, src)) = self.deferred.pop() {
            self.repost_recv(i, ctx as *mut c_void)?;
            self.owe(src);
        }
        Ok(())
    }

    /// What [`Poller::on_recv`] does with the message. Returns whether the bounce buffer was
    /// posted again (else it is in [`Poller::deferred`]).
    fn take_message(
        &mut self,
        i: usize,
        ctx: *mut c_void,
        c: &Completion,
    ) -> std::result::Result<bool, FabricError> {
        let (proto, src, seq) = split_tag(c.tag);
        let len = c.len.min(self.recv_bufs[i].buf.len());
        let body = &self.recv_bufs[i].buf[..len];
        match proto {
            PROTO_EAGER if src.idx() < self.addrs.len() => {
                let tag = Tag(u64_at(body, 0));
                let payload = body.get(EAGER_HDR..).unwrap_or(&[]);
                let r = &self.reorder[src.idx()];
                if !self.eager_into.is_empty() && seq == r.next && r.ahead.is_empty() {
                    if let Some(s) = self.eager_into.remove(src, tag) {
                        // A small `recv_into` waits for it, and it is next in its source's
                        // order: straight from the bounce buffer into the caller's buffer.
                        // SAFETY: just removed from `eager_into` under the engine's lock.
                        unsafe { s.answer(self.me, src, payload) };
                        self.eager_direct += 1;
                        self.reorder[src.idx()].next = (seq + 1) & SEQ_MASK;
                        // Posted again after the receive has its answer, by the next send or
                        // step: `fi_trecv` is not on the path of a ping-pong's reply.
                        self.deferred.push((i, ctx as usize, src));
                        return Ok(false);
                    }
                }
                let msg = payload.to_vec();
                self.repost_recv(i, ctx)?;
                self.ready(src, seq, tag, msg);
            }
            PROTO_RTS if src.idx() < self.addrs.len() => {
                let tag = Tag(u64_at(body, 0));
                let mlen = u64_at(body, 8) as usize;
                let raddr = u64_at(body, 16);
                let rkey = u64_at(body, 24);
                self.repost_recv(i, ctx)?;
                match self.take_direct(src, seq, tag, mlen) {
                    Some(d) => self.start_read_into(src, seq, d, mlen, raddr, rkey)?,
                    None if self.may_park(src, seq, tag) => {
                        self.reorder[src.idx()].ahead.insert(
                            seq,
                            Slot::Parked {
                                tag,
                                len: mlen,
                                raddr,
                                rkey,
                                since: std::time::Instant::now(),
                            },
                        );
                        self.parked.push(src);
                    }
                    None => self.start_read(src, seq, tag, mlen, raddr, rkey)?,
                }
            }
            PROTO_CREDIT if src.idx() < self.addrs.len() => {
                self.repost_recv(i, ctx)?;
                self.on_credit(src, seq);
            }
            PROTO_FIN => {
                self.repost_recv(i, ctx)?;
                if let Some(l) = self.large.remove(&(src, seq)) {
                    self.in_flight -= 1;
                    self.release_mr(l.key);
                    let _ = l.done.send(Ok(()));
                }
            }
            _ => {
                tracing::warn!(
                    rank = self.me.0,
                    tag = c.tag,
                    "rdma: dropped a message with an unknown tag"
                );
                self.repost_recv(i, ctx)?;
            }
        }
        Ok(true)
    }

    fn on_completion(&mut self, c: &Completion) -> std::result::Result<(), FabricError> {
        if self.live.0.contains(&(c.op_context as usize)) {
            // SAFETY: a live context is an OpCtx from `ctx`, which the provider no longer uses
            // (its operation completed); only its `op` is read.
            if let Op::Recv(i) = unsafe { &(*c.op_context.cast::<OpCtx>()).op } {
                // A receive's context stays live and is posted again with its buffer.
                let i = *i;
                return self.on_recv(i, c.op_context, c);
            }
        }
        let Some(op) = self.take_ctx(c.op_context) else {
            return Ok(()); // an inject's or unknown completion
        };
        match op {
            Op::Send(i) => {
                self.free_send.push(i);
                self.in_flight -= 1;
            }
            // Caught above (its context stays live); not reached.
            Op::Recv(i) => self.post_recv(i)?,
            Op::ReadInto {
                src,
                seq,
                len,
                id,
                done,
                _mr,
            } => {
                drop(_mr);
                self.in_flight -= 1;
                // The FIN first: the peer's send (and, in a ping-pong, its next receive) waits
                // for it. Its error is returned only once the read's own state is settled.
                self.send_fin(src, seq);
                let fin = self.flush_retries();
                // The buffer is the caller's again once `id` is out of `reading_into`.
                self.reading_into.remove(&id);
                let _ = done.send(Ok(len));
                // Consumed: later messages from `src` may go on.
                self.skip(src, seq);
                fin?;
            }
            Op::Read {
                src,
                seq,
                tag,
                mut buf,
                len,
                _mr,
            } => {
                drop(_mr);
                // SAFETY: the read wrote all `len` bytes of the reserved capacity.
                unsafe { buf.set_len(len) };
                self.in_flight -= 1;
                self.send_fin(src, seq);
                self.flush_retries()?;
                self.ready(src, seq, tag, buf);
            }
        }
        Ok(())
    }

    /// The waiting `recv_into` that message `seq` from `src` (a rendezvous message of `len`
    /// bytes with `tag`) is due to, withdrawn from the inbox, if its buffer can take it: the
    /// message is the next in its source's order (no earlier one can still claim that receiver),
    /// and that receiver is the oldest one waiting for `(src, tag)`.
    fn take_direct(&mut self, src: Rank, seq: u64, tag: Tag, len: usize) -> Option<DirectRecv> {
        if self.reorder[src.idx()].next != seq || self.eager_into.contains(src, tag) {
            // Not next, or a small `recv_into` came first (the message is too long for it).
            return None;
        }
        let queue = self.direct.get_mut(&(src, tag))?;
        // Receivers whose future has gone (its guard removes it too) are passed over.
        while queue.front().is_some_and(|d| d.done.is_closed()) {
            queue.pop_front();
        }
        let d = queue.front()?;
        if d.cap < len || !self.inbox.is_next(src, tag, d.ticket) {
            return None;
        }
        let d = queue.pop_front()?;
        if queue.is_empty() {
            self.direct.remove(&(src, tag));
        }
        d.taken.store(true, Ordering::SeqCst);
        // Under the engine's lock no message of (src, tag) can reach the inbox meanwhile; a
        // deadline can, and then the receiver has its answer (Timeout): `d` is dropped, which
        // tells its future to take the inbox's answer after all.
        self.inbox.withdraw(src, tag, d.ticket).then_some(d)
    }

    /// Whether rendezvous message `seq` from `src` may wait for a `recv_into` to come: the last
    /// receive from `src` was such a `recv_into` (a program that receives with `recv` would only
    /// wait longer for its read), the message is the next in its source's order, nobody waits
    /// for `(src, tag)` yet, and this rank has no rendezvous send of its own waiting (two ranks
    /// exchanging large messages each wait for the other's read: those are read at once).
    fn may_park(&self, src: Rank, seq: u64, tag: Tag) -> bool {
        self.into_hint
            .get(src.idx())
            .is_some_and(|h| h.load(Ordering::Relaxed))
            && self.reorder[src.idx()].next == seq
            && self.large.is_empty()
            && !self.eager_into.contains(src, tag)
            && !self.inbox.has_waiter(src, tag)
    }

    /// Starts the read of `src`'s parked message into a new `Vec` (nobody claimed it for a
    /// buffer in time, or a receive from `src` waits behind it).
    fn unpark(&mut self, src: Rank) -> std::result::Result<(), FabricError> {
        self.parked.retain(|&r| r != src);
        let r = &mut self.reorder[src.idx()];
        let seq = r.next;
        if let Some(Slot::Parked {
            tag,
            len,
            raddr,
            rkey,
            ..
        }) = r.ahead.remove(&seq)
        {
            self.start_read(src, seq, tag, len, raddr, rkey)?;
        }
        Ok(())
    }

    /// Parked messages from `src`, for a receive from it that was just registered: read into
    /// that receive's buffer when it is a `recv_into` the message is due to, else into a `Vec`.
    fn claim_parked(&mut self, src: Rank, tag: Tag) -> std::result::Result<(), FabricError> {
        if !self.parked.contains(&src) {
            return Ok(());
        }
        let seq = self.reorder[src.idx()].next;
        let head = match self.reorder[src.idx()].ahead.get(&seq) {
            Some(&Slot::Parked {
                tag: t,
                len,
                raddr,
                rkey,
                ..
            }) if t == tag => Some((len, raddr, rkey)),
            _ => None,
        };
        if let Some((len, raddr, rkey)) = head {
            if let Some(d) = self.take_direct(src, seq, tag, len) {
                self.parked.retain(|&r| r != src);
                self.reorder[src.idx()].ahead.remove(&seq);
                return self.start_read_into(src, seq, d, len, raddr, rkey);
            }
        }
        self.unpark(src)
    }

    /// Reads the parked messages that waited longer than [`PARK_GRACE`].
    fn unpark_expired(&mut self) -> std::result::Result<(), FabricError> {
        let now = std::time::Instant::now();
        let expired: Vec<Rank> = self
            .parked
            .iter()
            .copied()
            .filter(|src| {
                let r = &self.reorder[src.idx()];
                match r.ahead.get(&r.next) {
                    Some(Slot::Parked { since, .. }) => now.duration_since(*since) >= PARK_GRACE,
                    _ => true,
                }
            })
            .collect();
        for src in expired {
            self.unpark(src)?;
        }
        Ok(())
    }

    /// Reads rendezvous message `seq` from `src` straight into the buffer of `d`.
    fn start_read_into(
        &mut self,
        src: Rank,
        seq: u64,
        d: DirectRecv,
        len: usize,
        raddr: u64,
        rkey: u64,
    ) -> std::result::Result<(), FabricError> {
        let ptr = d.ptr as *mut u8;
        let mr = if self.mr_local {
            let k = self.key();
            // SAFETY: the caller's buffer stays borrowed by its future until this read has
            // completed (the future's guard waits for `reading_into` to lose its id); the
            // registration is dropped in the completion.
            match unsafe { self.ep.register(ptr, len, u64::from(sys::FI_READ), k) } {
                Ok(mr) => Some(mr),
                Err(e) => {
                    let _ = d.done.send(Err(fabric_error(self.me, Some(src), e)));
                    self.skip(src, seq);
                    return Ok(());
                }
            }
        } else {
            None
        };
        let desc = mr.as_ref().map_or(std::ptr::null_mut(), MemoryRegion::desc);
        self.reorder[src.idx()].ahead.insert(seq, Slot::Reading);
        self.reading_into.insert(d.id);
        self.reads_direct += 1;
        let id = d.id;
        let ctx = self.ctx(Op::ReadInto {
            src,
            seq,
            len,
            id,
            done: d.done,
            _mr: mr,
        });
        self.in_flight += 1;
        // SAFETY: see above; the destination stays valid until the completion.
        if let Err(e) = unsafe { self.post_read_retrying(ptr, len, desc, src, raddr, rkey, ctx) }? {
            self.in_flight -= 1;
            self.reading_into.remove(&id);
            if let Some(Op::ReadInto { done, .. }) = self.take_ctx(ctx) {
                let _ = done.send(Err(fabric_error(self.me, Some(src), e)));
            }
            self.skip(src, seq);
        }
        Ok(())
    }

    /// Forgets the `recv_into` `id` (its future is ending): true once no read writes into its
    /// buffer any more.
    fn forget_direct(&mut self, src: Rank, tag: Tag, id: u64) -> bool {
        if let Some(queue) = self.direct.get_mut(&(src, tag)) {
            queue.retain(|d| d.id != id);
            if queue.is_empty() {
                self.direct.remove(&(src, tag));
            }
        }
        !self.reading_into.contains(&id)
    }

    fn start_read(
        &mut self,
        src: Rank,
        seq: u64,
        tag: Tag,
        len: usize,
        raddr: u64,
        rkey: u64,
    ) -> std::result::Result<(), FabricError> {
        let buf: Vec<u8> = Vec::with_capacity(len);
        self.reads_vec += 1;
        let mr = if self.mr_local {
            let k = self.key();
            // SAFETY: the Vec's heap block does not move while the Op owns it; the registration
            // is dropped (in the completion) before the Vec is handed out.
            Some(unsafe {
                self.ep
                    .register(buf.as_ptr(), len, u64::from(sys::FI_READ), k)?
            })
        } else {
            None
        };
        let desc = mr.as_ref().map_or(std::ptr::null_mut(), MemoryRegion::desc);
        let ptr = buf.as_ptr() as *mut u8;
        self.reorder[src.idx()].ahead.insert(seq, Slot::Reading);
        let ctx = self.ctx(Op::Read {
            src,
            seq,
            tag,
            buf,
            len,
            _mr: mr,
        });
        self.in_flight += 1;
        // SAFETY: the destination is the Vec owned by the context, alive until completion.
        if let Err(e) = unsafe { self.post_read_retrying(ptr, len, desc, src, raddr, rkey, ctx) }? {
            self.drop_ctx(ctx);
            self.in_flight -= 1;
            self.skip(src, seq);
            return Err(e);
        }
        Ok(())
    }

    /// Posts an RMA read of `len` bytes from `src`'s `(raddr, rkey)` into `ptr`, driving
    /// completions while the provider answers `FI_EAGAIN`. The outer error is a failed progress
    /// step, which the caller returns as it is; the inner one a refused post, which each caller
    /// undoes its own way.
    ///
    /// # Safety
    /// As for `Endpoint::post_read`: `ptr..ptr + len` stays valid until the read completes.
    #[allow(clippy::too_many_arguments)]
    unsafe fn post_read_retrying(
        &mut self,
        ptr: *mut u8,
        len: usize,
        desc: *mut c_void,
        src: Rank,
        raddr: u64,
        rkey: u64,
        ctx: *mut c_void,
    ) -> std::result::Result<std::result::Result<(), FabricError>, FabricError> {
        loop {
            // SAFETY: per this function's contract.
            match unsafe {
                self.ep
                    .post_read(ptr, len, desc, self.addrs[src.idx()], raddr, rkey, ctx)
            } {
                Ok(true) => {
                    self.read_posted = true;
                    return Ok(Ok(()));
                }
                Ok(false) => {
                    let mut c = [Completion::default(); 8];
                    self.poll_into(&mut c)?;
                }
                Err(e) => return Ok(Err(e)),
            }
        }
    }

    /// Gives up on message `seq` from `src` (its read failed), so later ones still flow.
    fn skip(&mut self, src: Rank, seq: u64) {
        self.reorder[src.idx()].ahead.insert(seq, Slot::Skipped);
        self.deliver_in_order(src);
    }

    /// Reads and handles the completions the queue has (driving the provider's progress).
    fn poll_cq(&mut self) -> std::result::Result<usize, FabricError> {
        let mut comps = std::mem::take(&mut self.comps.0);
        let r = self.poll_into(&mut comps);
        self.comps.0 = comps;
        r
    }

    fn poll_into(&mut self, buf: &mut [Completion]) -> std::result::Result<usize, FabricError> {
        match self.ep.cq().read(buf) {
            Ok(n) => {
                for c in buf.iter().take(n) {
                    let c = *c;
                    self.on_completion(&c)?;
                }
                Ok(n)
            }
            Err(Ok(err)) => {
                let op = self.take_ctx(err.context);
                tracing::warn!(rank = self.me.0, error = err.err, detail = %err.message, "rdma: operation failed");
                match op {
                    Some(Op::Send(i)) => {
                        self.free_send.push(i);
                        self.in_flight -= 1;
                    }
                    Some(Op::Read { src, seq, .. }) => {
                        self.in_flight -= 1;
                        self.skip(src, seq);
                    }
                    Some(Op::ReadInto {
                        src, seq, id, done, ..
                    }) => {
                        self.in_flight -= 1;
                        self.reading_into.remove(&id);
                        let _ = done.send(Err(fabric_error(
                            self.me,
                            Some(src),
                            FabricError::Call {
                                provider: self.ep.info().provider().to_owned(),
                                call: "fi_read",
                                code: err.err,
                                message: err.message.clone(),
                            },
                        )));
                        self.skip(src, seq);
                    }
                    Some(Op::Recv(i)) if !self.closing => {
                        self.post_recv(i)?;
                        // A failed receive still took a buffer from the sender's credits.
                        let (proto, src, _) = split_tag(err.tag);
                        if err.err != sys::FI_ECANCELED as i32 && proto != PROTO_CREDIT {
                            self.owe(src);
                        }
                    }
                    Some(Op::Recv(_)) | None => {}
                }
                Ok(1)
            }
            Err(Err(e)) => Err(e),
        }
    }
}

/// The contexts still posted when the poller ends. Declared after the endpoint in [`Poller`], so
/// it drops after the endpoint has closed (and with it every posted operation).
#[derive(Default)]
struct LiveCtx(HashSet<usize, BuildHasherDefault<AddrHasher>>);

/// A cheap hasher for context addresses (looked up once or twice per message; SipHash showed in
/// profiles): a multiplicative mix with the high bits folded down, since the low bits of heap
/// addresses are always zero.
#[derive(Default)]
struct AddrHasher(u64);

impl Hasher for AddrHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b) ^ self.0.rotate_left(8));
        }
    }

    fn write_u64(&mut self, n: u64) {
        let h = n.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        self.0 = h ^ (h >> 29);
    }

    fn write_usize(&mut self, n: usize) {
        self.write_u64(n as u64);
    }
}

impl Drop for LiveCtx {
    fn drop(&mut self) {
        for raw in self.0.drain() {
            // SAFETY: each entry came from Box::into_raw in `Poller::ctx` and was not taken back;
            // the endpoint that could complete it is closed.
            drop(unsafe { Box::from_raw(raw as *mut OpCtx) });
        }
    }
}

impl Drop for Poller {
    fn drop(&mut self) {
        // Pending rendezvous sends can no longer finish. The endpoint then closes first (field
        // order), before the bounce buffers, registrations and posted contexts it may reference.
        for (_, l) in self.large.drain() {
            let _ = l.done.send(Err(Error::Closed { channel: NAME }));
        }
    }
}
