//! The RDMA channel: a [`Channel`] over one libfabric `FI_EP_RDM` endpoint per rank.
//!
//! ```text
//!  send(dst) ─┬─ dst == me ─────────────────────────────────────────────▶ Inbox
//!             └─ command queue ─▶ poller thread ─▶ fi_tinject / fi_tsend (eager, ≤ eager_max)
//!                                              └─▶ fi_tsend(RTS: addr, key, len) … wait for FIN
//!  poller: fi_cq_read ─▶ eager: copy out of the bounce buffer, repost it ─▶ reorder ─▶ Inbox ─▶ recv
//!                     └▶ RTS: fi_read(peer's buffer) ─▶ on completion FIN to the peer ─▶ reorder
//! ```
//!
//! ## The 64-bit libfabric tag
//! ```text
//!  63..62  protocol: 0 eager, 1 RTS (rendezvous request), 2 FIN (rendezvous read done)
//!  61..40  source rank (the receiver matches every tag, so this names the sender)
//!  39..0   sequence number of the message on the (source → destination) pair
//! ```
//! The channel's own 64-bit [`Tag`] travels in the first 8 bytes of the payload. The sequence
//! number is assigned when `send` is called; the receiver delivers each source's messages to the
//! [`Inbox`] strictly in sequence order, so an eager message never overtakes an earlier
//! rendezvous message still being read, whatever order the provider completes them in.
//!
//! ## Progress
//! Every libfabric call is made by one dedicated poller thread (the domain is opened with
//! `FI_THREAD_DOMAIN`). It busy-polls the completion queue while any operation is in flight and
//! for a short window after the last activity; then it yields, then parks with a growing timeout
//! (up to [`IDLE_PARK_MAX`]). `send` and `recv` unpark it, so an idle channel costs no CPU and
//! wakes at once when used.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::ffi::c_void;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::thread::{self, JoinHandle, Thread};
use std::time::Duration;

use fmi_channels::{
    check_rank, Capabilities, Channel, Error, Inbox, Instant, JobId, Rank, Result, Tag,
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
const RANK_SHIFT: u32 = 40;
const RANK_MASK: u64 = (1 << 22) - 1;
const SEQ_MASK: u64 = (1 << 40) - 1;
/// The largest job the tag layout addresses.
pub const MAX_RANKS: u32 = 1 << 22;

/// Bytes of the eager header (the channel tag).
const EAGER_HDR: usize = 8;
/// Bytes of an RTS payload: channel tag, length, remote address, key.
const RTS_LEN: usize = 32;

/// How long the poller keeps spinning after its last activity.
const SPIN_WINDOW: Duration = Duration::from_millis(1);
/// How long it then yields before it starts to park.
const YIELD_WINDOW: Duration = Duration::from_millis(20);
/// The longest the idle poller parks between two polls.
pub const IDLE_PARK_MAX: Duration = Duration::from_micros(500);
/// How long dropping the channel waits for queued messages to leave.
const FLUSH_LIMIT: Duration = Duration::from_secs(10);

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
    /// Receive bounce buffers kept posted (default 64).
    pub recv_buffers: usize,
}

impl Default for RdmaConfig {
    fn default() -> Self {
        RdmaConfig {
            provider: None,
            domain: None,
            eager_max: 16 << 10,
            recv_buffers: 64,
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
        let depth = (config.recv_buffers * 2 + 256).max(1024);
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
    Cancel {
        id: u64,
        ack: mpsc::Sender<()>,
    },
}

struct Shared {
    cmds: Mutex<VecDeque<Cmd>>,
    shutdown: AtomicBool,
    poller: OnceLock<Thread>,
    next_id: std::sync::atomic::AtomicU64,
}

impl Shared {
    fn push(&self, cmd: Cmd) {
        self.cmds
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push_back(cmd);
        self.wake();
    }

    fn wake(&self) {
        if let Some(t) = self.poller.get() {
            t.unpark();
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
        let shared = Arc::new(Shared {
            cmds: Mutex::new(VecDeque::new()),
            shutdown: AtomicBool::new(false),
            poller: OnceLock::new(),
            next_id: std::sync::atomic::AtomicU64::new(1),
        });
        let eager_max = config.eager_max.max(RTS_LEN);
        let mut poller = Poller::new(
            binding.ep,
            addrs,
            rank,
            Arc::clone(&inbox),
            Arc::clone(&shared),
            eager_max,
            config.recv_buffers.max(4),
        )
        .map_err(|e| fabric_error(rank, None, e))?;
        let thread = thread::Builder::new()
            .name(format!("fmi-rdma-{rank}"))
            .spawn(move || poller.run())
            .map_err(|e| Error::Io {
                me: rank,
                peer: None,
                channel: NAME,
                source: e,
            })?;
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
}

impl Drop for RdmaChannel {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, Ordering::Release);
        self.shared.wake();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.inbox.close();
    }
}

/// Cancels a rendezvous send whose future is dropped before the peer finished reading: the
/// poller deregisters the buffer (revoking the peer's access) before the borrow ends.
struct CancelGuard {
    id: u64,
    shared: Arc<Shared>,
    armed: bool,
}

impl Drop for CancelGuard {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let (tx, rx) = mpsc::channel();
        self.shared.push(Cmd::Cancel {
            id: self.id,
            ack: tx,
        });
        // The poller answers within one loop iteration; the bound only guards against a poller
        // that already exited (then nothing can touch the buffer any more).
        let _ = rx.recv_timeout(Duration::from_secs(5));
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
        if self.shared.shutdown.load(Ordering::Acquire) {
            return futures::future::ready(Err(Error::Closed { channel: NAME })).boxed();
        }
        if dst == self.rank {
            self.inbox.deliver(dst, tag, data.to_vec());
            return futures::future::ready(Ok(())).boxed();
        }
        if data.len() <= self.eager_max {
            // Copied now: the caller's buffer is free as soon as this returns.
            self.shared.push(Cmd::Eager {
                dst,
                tag,
                data: data.to_vec(),
            });
            return futures::future::ready(Ok(())).boxed();
        }
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        let guard = CancelGuard {
            id,
            shared: Arc::clone(&self.shared),
            armed: true,
        };
        self.shared.push(Cmd::Large {
            id,
            dst,
            tag,
            ptr: data.as_ptr() as usize,
            len: data.len(),
            done: tx,
        });
        let me = self.rank;
        let started = Instant::now();
        async move {
            let mut guard = guard;
            // `data` stays borrowed by this future until the guard has run.
            let _keep = data;
            let r = match tokio::time::timeout_at(deadline, rx).await {
                Ok(Ok(r)) => {
                    guard.armed = false;
                    r
                }
                Ok(Err(_)) => {
                    guard.armed = false;
                    Err(Error::Closed { channel: NAME })
                }
                Err(_) => Err(Error::Timeout {
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
        // A receive makes the poller busy-poll again (it may be parked after a quiet spell).
        self.shared.wake();
        self.inbox.recv(src, tag, deadline).boxed()
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
    Fin {
        dst: Rank,
        tag: u64,
    },
}

struct LargeSend {
    id: u64,
    key: (usize, usize),
    done: oneshot::Sender<Result<()>>,
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
    shared: Arc<Shared>,
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
    large: HashMap<(Rank, u64), LargeSend>,
    mr_cache: HashMap<(usize, usize), CachedMr>,
    in_flight: usize,
}

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
        shared: Arc<Shared>,
        eager_max: usize,
        recv_buffers: usize,
    ) -> std::result::Result<Poller, FabricError> {
        let info = ep.info();
        let mr_mode = info.mr_mode();
        let n = addrs.len();
        let mut p = Poller {
            inject_size: info.inject_size(),
            mr_local: mr_mode & sys::FI_MR_LOCAL != 0,
            virt_addr: mr_mode & sys::FI_MR_VIRT_ADDR != 0,
            prov_key: mr_mode & sys::FI_MR_PROV_KEY != 0,
            ep,
            addrs,
            me,
            inbox,
            shared,
            eager_max,
            next_key: 1,
            send_seq: vec![0; n],
            reorder: (0..n).map(|_| Reorder::default()).collect(),
            recv_bufs: Vec::new(),
            send_bufs: Vec::new(),
            free_send: Vec::new(),
            live: LiveCtx::default(),
            retry: VecDeque::new(),
            large: HashMap::new(),
            mr_cache: HashMap::new(),
            in_flight: 0,
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
        self.live.0.insert(raw as usize, ());
        raw.cast()
    }

    /// Takes back a context the provider is done with.
    fn take_ctx(&mut self, raw: *mut c_void) -> Option<Op> {
        self.live.0.remove(&(raw as usize))?;
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

    /// Sends `parts` (concatenated) to `dst` with libfabric tag `tag`: injected when small
    /// enough, else from a bounce buffer.
    fn send_bytes(
        &mut self,
        dst: Rank,
        tag: u64,
        parts: &[&[u8]],
    ) -> std::result::Result<(), FabricError> {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        let i = self.send_bounce()?;
        let mut at = 0;
        for p in parts {
            self.send_bufs[i].buf[at..at + p.len()].copy_from_slice(p);
            at += p.len();
        }
        if len <= self.inject_size && self.retry.is_empty() {
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
                Retry::Fin { dst, tag } => match self.ep.inject(&[], self.addrs[dst.idx()], tag) {
                    Ok(true) => self.in_flight -= 1,
                    Ok(false) => {
                        self.retry.push_front(Retry::Fin { dst, tag });
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

    fn handle_cmd(&mut self, cmd: Cmd) {
        match cmd {
            Cmd::Eager { dst, tag, data } => {
                let seq = self.send_seq[dst.idx()];
                self.send_seq[dst.idx()] += 1;
                let t = make_tag(PROTO_EAGER, self.me, seq);
                if let Err(e) = self.send_bytes(dst, t, &[&tag.0.to_le_bytes(), &data]) {
                    tracing::warn!(rank = self.me.0, peer = dst.0, error = %e, "rdma: eager send failed");
                }
            }
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
            Cmd::Cancel { id, ack } => {
                let found = self.large.iter().find(|(_, l)| l.id == id).map(|(k, _)| *k);
                if let Some(k) = found {
                    if let Some(l) = self.large.remove(&k) {
                        self.in_flight -= 1;
                        self.release_mr(l.key);
                    }
                }
                let _ = ack.send(());
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
        let r = &mut self.reorder[src.idx()];
        while let Some((&seq, slot)) = r.ahead.first_key_value() {
            if seq != r.next || matches!(slot, Slot::Reading) {
                break;
            }
            if let Some((_, Slot::Ready(tag, msg))) = r.ahead.pop_first() {
                self.inbox.deliver(src, tag, msg);
            }
            r.next = (r.next + 1) & SEQ_MASK;
        }
    }

    fn on_completion(&mut self, c: &Completion) -> std::result::Result<(), FabricError> {
        let Some(op) = self.take_ctx(c.op_context) else {
            return Ok(()); // an inject's or unknown completion
        };
        match op {
            Op::Send(i) => {
                self.free_send.push(i);
                self.in_flight -= 1;
            }
            Op::Recv(i) => {
                let (proto, src, seq) = split_tag(c.tag);
                let len = c.len.min(self.recv_bufs[i].buf.len());
                let body = &self.recv_bufs[i].buf[..len];
                match proto {
                    PROTO_EAGER if src.idx() < self.addrs.len() => {
                        let tag = Tag(u64_at(body, 0));
                        let msg = body.get(EAGER_HDR..).unwrap_or(&[]).to_vec();
                        self.reorder[src.idx()]
                            .ahead
                            .insert(seq, Slot::Ready(tag, msg));
                        self.post_recv(i)?;
                        self.deliver_in_order(src);
                    }
                    PROTO_RTS if src.idx() < self.addrs.len() => {
                        let tag = Tag(u64_at(body, 0));
                        let mlen = u64_at(body, 8) as usize;
                        let raddr = u64_at(body, 16);
                        let rkey = u64_at(body, 24);
                        self.post_recv(i)?;
                        self.start_read(src, seq, tag, mlen, raddr, rkey)?;
                    }
                    PROTO_FIN => {
                        self.post_recv(i)?;
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
                        self.post_recv(i)?;
                    }
                }
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
                let fin = make_tag(PROTO_FIN, self.me, seq);
                self.retry.push_back(Retry::Fin { dst: src, tag: fin });
                self.in_flight += 1;
                self.flush_retries()?;
                self.reorder[src.idx()]
                    .ahead
                    .insert(seq, Slot::Ready(tag, buf));
                self.deliver_in_order(src);
            }
        }
        Ok(())
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
        loop {
            // SAFETY: the destination is the Vec owned by the context, alive until completion.
            match unsafe {
                self.ep
                    .post_read(ptr, len, desc, self.addrs[src.idx()], raddr, rkey, ctx)
            } {
                Ok(true) => return Ok(()),
                Ok(false) => {
                    let mut c = [Completion::default(); 8];
                    self.poll_cq(&mut c)?;
                }
                Err(e) => {
                    self.drop_ctx(ctx);
                    self.in_flight -= 1;
                    self.skip(src, seq);
                    return Err(e);
                }
            }
        }
    }

    /// Gives up on message `seq` from `src` (its read failed), so later ones still flow.
    fn skip(&mut self, src: Rank, seq: u64) {
        self.reorder[src.idx()].ahead.insert(seq, Slot::Skipped);
        self.deliver_in_order(src);
    }

    fn poll_cq(&mut self, buf: &mut [Completion]) -> std::result::Result<usize, FabricError> {
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
                    Some(Op::Recv(i)) if !self.shared.shutdown.load(Ordering::Acquire) => {
                        self.post_recv(i)?;
                    }
                    Some(Op::Recv(_)) | None => {}
                }
                Ok(1)
            }
            Err(Err(e)) => Err(e),
        }
    }

    fn run(&mut self) {
        let mut comps = [Completion::default(); 16];
        let mut last_active = std::time::Instant::now();
        let mut park = Duration::from_micros(20);
        let mut flush_started: Option<std::time::Instant> = None;
        loop {
            let mut active = false;
            let cmds: Vec<Cmd> = {
                let mut q = self.shared.cmds.lock().unwrap_or_else(|e| e.into_inner());
                q.drain(..).collect()
            };
            if !cmds.is_empty() {
                active = true;
            }
            for cmd in cmds {
                self.handle_cmd(cmd);
            }
            if !self.retry.is_empty() {
                if let Err(e) = self.flush_retries() {
                    tracing::warn!(rank = self.me.0, error = %e, "rdma: send failed");
                }
            }
            match self.poll_cq(&mut comps) {
                Ok(n) => active |= n > 0,
                Err(e) => {
                    tracing::error!(rank = self.me.0, error = %e, "rdma: completion queue failed; closing the channel");
                    self.inbox.close();
                    break;
                }
            }
            if self.shared.shutdown.load(Ordering::Acquire) {
                let started = *flush_started.get_or_insert_with(std::time::Instant::now);
                let queued = !self
                    .shared
                    .cmds
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .is_empty();
                if (self.in_flight == 0 && !queued) || started.elapsed() > FLUSH_LIMIT {
                    break;
                }
                continue;
            }
            if active {
                last_active = std::time::Instant::now();
                park = Duration::from_micros(20);
                continue;
            }
            if self.in_flight > 0 {
                std::hint::spin_loop();
                continue;
            }
            let idle = last_active.elapsed();
            if idle < SPIN_WINDOW {
                std::hint::spin_loop();
            } else if idle < YIELD_WINDOW {
                thread::yield_now();
            } else {
                thread::park_timeout(park);
                park = (park * 2).min(IDLE_PARK_MAX);
                // Woken by send/recv: treat as activity so that the reply is polled for at once.
                last_active = std::time::Instant::now() - SPIN_WINDOW / 2;
            }
        }
    }
}

/// The contexts still posted when the poller ends. Declared after the endpoint in [`Poller`], so
/// it drops after the endpoint has closed (and with it every posted operation).
#[derive(Default)]
struct LiveCtx(HashMap<usize, ()>);

impl Drop for LiveCtx {
    fn drop(&mut self) {
        for (raw, ()) in self.0.drain() {
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
