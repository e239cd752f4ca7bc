//! The async communicator.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytemuck::Pod;
use fmi_channels::{AbortOnFailure, Channel, Instant, JobId, PathKind, Rank, Tag, Turnstile};
use fmi_collectives::Ctx;
use fmi_model::{Bytes, ChannelKind, Model, Op as ModelOp};
use serde::{de::DeserializeOwned, Serialize};
use tokio::task::JoinHandle;

use crate::config::Config;
use crate::env::EnvSettings;
use crate::op::Reduction;
use crate::{Error, Result};

/// A group of ranks that exchange messages: MPI's `MPI_COMM_WORLD` for one job.
///
/// Cheap to clone; clones share the channel and the operation sequence. Every rank must call the
/// collectives in the same order with matching arguments (as in MPI): each call takes the next
/// operation sequence number, from which its message tags derive, so concurrent collectives and
/// user point-to-point traffic never collide.
#[derive(Clone)]
pub struct Communicator {
    inner: Arc<Inner>,
    deadline: Duration,
}

struct Inner {
    channel: Arc<dyn Channel>,
    // The primary channel without the `AbortOnFailure` wrapper, and whether `channel` has it:
    // `send`, `recv` and `recv_into` call this one and pass failures on themselves
    // (`propagate_failure`, what the wrapper would do), which saves the wrapper's boxed future
    // on every message.
    p2p: Arc<dyn Channel>,
    abort: bool,
    // Every channel of the communicator (the primary one included) with the model's name for it;
    // used only when `model` is set.
    routes: Vec<(ChannelKind, Arc<dyn Channel>)>,
    model: Option<Model>,
    // The S3 mailbox for mixed-channel broadcasts (see `crate::mixed`), when S3 is routed to.
    staged: Option<crate::mixed::Staged>,
    config: Config,
    // The collectives' configuration with each algorithm the model may pick forced, for the
    // operations whose algorithm the configuration leaves automatic (see `Communicator::ctx_for`).
    by_algorithm: Vec<(ModelOp, fmi_model::Algorithm, fmi_collectives::Config)>,
    seq: AtomicU64,
    // Spawned isend/irecv tasks take their place in these at call time, so that a plain send or
    // recv called afterwards cannot overtake them.
    send_turns: Turnstile,
    recv_turns: Turnstile,
    // Written to `FMI_LEDGER` when the last handle goes (see `crate::ledger`).
    ledger_file: std::sync::OnceLock<crate::ledger::LedgerFile>,
}

impl std::fmt::Debug for Communicator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Communicator")
            .field("job", self.job())
            .field("rank", &self.rank())
            .field("size", &self.size())
            .field("channel", &self.channel_name())
            .field("deadline", &self.deadline)
            .finish()
    }
}

/// Builder state before a channel is given.
#[derive(Debug)]
pub struct NoChannel;

/// Builder state once a channel is given.
#[derive(Debug)]
pub struct WithChannel(Arc<dyn Channel>);

/// Builds a [`Communicator`]. `build` exists only once a channel has been set, so a
/// half-configured communicator cannot be made.
#[must_use]
pub struct Builder<C> {
    config: Config,
    channel: C,
    routes: Vec<Arc<dyn Channel>>,
    model: Option<Model>,
    staged: Option<crate::mixed::Staged>,
}

impl<C: std::fmt::Debug> std::fmt::Debug for Builder<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Builder")
            .field("channel", &self.channel)
            .field("routes", &self.routes.len())
            .field("model", &self.model.is_some())
            .finish_non_exhaustive()
    }
}

/// The model's name for a channel, from the channel's own name (`memory` counts as direct).
pub(crate) fn channel_kind(name: &str) -> ChannelKind {
    match name {
        "redis" => ChannelKind::Redis,
        "s3" => ChannelKind::S3,
        "dynamodb" => ChannelKind::DynamoDb,
        _ => ChannelKind::Tcp,
    }
}

impl<C> Builder<C> {
    /// Uses `config` (default: `Config::default()`).
    pub fn config(mut self, config: Config) -> Self {
        self.config = config;
        self
    }

    /// Sets the default deadline of every blocking call.
    pub fn deadline(mut self, deadline: Duration) -> Self {
        self.config.deadline = deadline;
        self
    }

    /// Adds another channel the model may route operations to (every rank must add the same
    /// channels in the same order).
    pub fn extra_channel(mut self, channel: Arc<dyn Channel>) -> Self {
        self.routes.push(channel);
        self
    }

    /// Routes each collective whose size every rank knows over the channel `model` chooses for
    /// it (among the primary and extra channels). Without a model everything uses the primary
    /// channel.
    pub fn model(mut self, model: Model) -> Self {
        self.model = Some(model);
        self
    }

    /// The S3 mailbox mixed-channel broadcasts store their payload in.
    pub(crate) fn staged(mut self, staged: Option<crate::mixed::Staged>) -> Self {
        self.staged = staged;
        self
    }
}

impl Builder<NoChannel> {
    /// The channel this communicator sends through; it fixes job, rank and size.
    pub fn channel(self, channel: impl Channel) -> Builder<WithChannel> {
        self.shared_channel(Arc::new(channel))
    }

    /// Like [`Builder::channel`], for a channel already behind an `Arc`.
    pub fn shared_channel(self, channel: Arc<dyn Channel>) -> Builder<WithChannel> {
        Builder {
            config: self.config,
            channel: WithChannel(channel),
            routes: self.routes,
            model: self.model,
            staged: self.staged,
        }
    }
}

impl Builder<WithChannel> {
    /// The communicator.
    pub fn build(self) -> Communicator {
        let deadline = self.config.deadline;
        let abort = self.config.abort_on_peer_failure;
        // A peer failure is passed on to the whole job (see `Config::abort_on_peer_failure`).
        let wrap = |ch: Arc<dyn Channel>| -> Arc<dyn Channel> {
            if abort {
                Arc::new(AbortOnFailure::new(ch))
            } else {
                ch
            }
        };
        let p2p = self.channel.0;
        let primary = wrap(Arc::clone(&p2p));
        let mut routes = vec![(channel_kind(primary.name()), Arc::clone(&primary))];
        for ch in self.routes.into_iter().map(wrap) {
            let kind = channel_kind(ch.name());
            if !routes.iter().any(|(k, _)| *k == kind) {
                routes.push((kind, ch));
            }
        }
        let by_algorithm = if self.model.is_some() {
            forced_configs(&self.config.collectives)
        } else {
            Vec::new()
        };
        Communicator {
            inner: Arc::new(Inner {
                channel: primary,
                p2p,
                abort,
                routes,
                model: self.model,
                staged: self.staged,
                config: self.config,
                by_algorithm,
                seq: AtomicU64::new(0),
                send_turns: Turnstile::new(),
                recv_turns: Turnstile::new(),
                ledger_file: std::sync::OnceLock::new(),
            }),
            deadline,
        }
    }
}

/// `base` with each algorithm the model can pick for an operation forced, for the operations
/// whose algorithm `base` does not force already (a forced choice is the user's and wins). The
/// model's allreduce, allgather and broadcast algorithms map onto the collectives' own; the
/// storage-native and mixed forms are not forced this way (the channel offers the native ones
/// for every call, and the communicator runs the mixed one itself).
fn forced_configs(
    base: &fmi_collectives::Config,
) -> Vec<(ModelOp, fmi_model::Algorithm, fmi_collectives::Config)> {
    use fmi_collectives::{AllgatherAlgorithm as G, AllreduceAlgorithm as R, BcastAlgorithm as B};
    use fmi_model::Algorithm as A;
    let mut out = Vec::new();
    let mut with = |op, algorithm, set: &dyn Fn(&mut fmi_collectives::Forced)| {
        let mut config = base.clone();
        set(&mut config.force);
        out.push((op, algorithm, config));
    };
    if base.force.allreduce.is_none() {
        for (a, r) in [
            (A::RecursiveDoubling, R::RecursiveDoubling),
            (A::Rabenseifner, R::Rabenseifner),
            (A::Ring, R::Ring),
        ] {
            with(ModelOp::Allreduce, a, &|f| f.allreduce = Some(r));
        }
    }
    if base.force.allgather.is_none() {
        for (a, g) in [
            (A::RecursiveDoubling, G::RecursiveDoubling),
            (A::Ring, G::Ring),
        ] {
            with(ModelOp::Allgather, a, &|f| f.allgather = Some(g));
        }
    }
    if base.force.bcast.is_none() {
        for (a, b) in [
            (A::Binomial, B::Binomial),
            (A::ScatterAllgather, B::ScatterAllgather),
        ] {
            with(ModelOp::Bcast, a, &|f| f.bcast = Some(b));
        }
    }
    out
}

/// A pending non-blocking operation.
#[derive(Debug)]
#[must_use = "a request does nothing useful unless waited for"]
pub struct Request<T> {
    handle: JoinHandle<Result<T>>,
}

impl<T> Request<T> {
    /// Waits for the operation to finish.
    pub async fn wait(self) -> Result<T> {
        match self.handle.await {
            Ok(r) => r,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(_) => Err(Error::Closed { channel: "request" }),
        }
    }

    /// Whether the operation has finished (then `wait` returns at once).
    pub fn is_complete(&self) -> bool {
        self.handle.is_finished()
    }
}

/// Converts received bytes into `T`s; a length that is not a whole number of `T` is a
/// `TypeMismatch`.
pub(crate) fn bytes_to_vec<T: Pod>(me: Rank, peer: Rank, bytes: Vec<u8>) -> Result<Vec<T>> {
    let n = std::mem::size_of::<T>();
    if n == 0 || !bytes.len().is_multiple_of(n) {
        return Err(Error::TypeMismatch {
            me,
            peer,
            len: bytes.len(),
            elem_size: n,
        });
    }
    // Zero-copy when T's alignment is 1 (u8, i8, byte structs), otherwise one copy into a
    // properly aligned allocation.
    match bytemuck::allocation::try_cast_vec::<u8, T>(bytes) {
        Ok(v) => Ok(v),
        Err((_, bytes)) => Ok(bytemuck::pod_collect_to_vec(&bytes)),
    }
}

fn encode<S: Serialize>(me: Rank, peer: Rank, value: &S) -> Result<Vec<u8>> {
    postcard::to_stdvec(value).map_err(|e| Error::Serialization {
        me,
        peer,
        source: fmi_channels::CodecError(e.to_string()),
    })
}

fn decode<D: DeserializeOwned>(me: Rank, peer: Rank, bytes: &[u8]) -> Result<D> {
    postcard::from_bytes(bytes).map_err(|e| Error::Serialization {
        me,
        peer,
        source: fmi_channels::CodecError(e.to_string()),
    })
}

fn concat<T: Pod>(me: Rank, what: &'static str, parts: Vec<Vec<u8>>) -> Result<Vec<T>> {
    let expected = parts.first().map_or(0, Vec::len);
    if let Some((peer, p)) = parts.iter().enumerate().find(|(_, p)| p.len() != expected) {
        let n = std::mem::size_of::<T>().max(1);
        return Err(Error::CountMismatch {
            me,
            peer: Rank(peer as u32),
            what,
            expected: expected / n,
            got: p.len() / n,
        });
    }
    bytes_to_vec(me, me, parts.concat())
}

impl Communicator {
    /// Starts a builder.
    pub fn builder() -> Builder<NoChannel> {
        Builder {
            config: Config::default(),
            channel: NoChannel,
            routes: Vec::new(),
            model: None,
            staged: None,
        }
    }

    /// Joins the job described by the environment, as set by `fmi run` or a function's launcher:
    ///
    /// | variable | meaning |
    /// |---|---|
    /// | `FMI_RANK` | this process's rank, `0..FMI_SIZE` (required) |
    /// | `FMI_SIZE` | the number of ranks, ≥ 1 (required) |
    /// | `FMI_JOB` | the job id, `[A-Za-z0-9._-]{1,64}` (required) |
    /// | `FMI_CONFIG` | path of a TOML configuration file (optional) |
    /// | `FMI_RENDEZVOUS` | `host:port` of the rendezvous server (required when `FMI_SIZE` > 1) |
    /// | `FMI_TOKEN` | the job's secret token, checked by the rendezvous server (optional) |
    /// | `FMI_CHANNEL` | force every operation onto one channel: `tcp` (optional) |
    ///
    /// Missing or inconsistent values give an error naming the variable.
    pub async fn from_env() -> Result<Communicator> {
        let env = EnvSettings::from_process()?;
        crate::bootstrap::connect(env).await
    }

    /// Joins the job `settings` describe (the same fields as the environment variables of
    /// [`Communicator::from_env`]).
    pub async fn from_settings(settings: EnvSettings) -> Result<Communicator> {
        crate::bootstrap::connect(settings).await
    }

    /// This process's rank.
    pub fn rank(&self) -> Rank {
        self.inner.channel.rank()
    }

    /// The number of ranks.
    pub fn size(&self) -> u32 {
        self.inner.channel.size()
    }

    /// The job id.
    pub fn job(&self) -> &JobId {
        self.inner.channel.job()
    }

    /// The name of the channel messages travel on.
    pub fn channel_name(&self) -> &'static str {
        self.inner.channel.name()
    }

    /// The channel itself.
    pub fn channel(&self) -> &Arc<dyn Channel> {
        &self.inner.channel
    }

    /// The channel's request counters (puts, gets, bytes, ... for storage channels; empty for
    /// channels without per-request costs). See [`Channel::counters`].
    pub fn counters(&self) -> Vec<(&'static str, u64)> {
        self.inner.channel.counters()
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    /// The default deadline of every blocking call.
    pub fn deadline(&self) -> Duration {
        self.deadline
    }

    /// A handle on the same communicator whose calls use `deadline` instead.
    pub fn with_deadline(&self, deadline: Duration) -> Communicator {
        Communicator {
            inner: Arc::clone(&self.inner),
            deadline,
        }
    }

    fn deadline_from_now(&self) -> Instant {
        Instant::now() + self.deadline
    }

    /// The channel the model picks for `op` on `bytes` (which every rank must know), or the
    /// primary channel. A pure function of (op, bytes, size, config): the same on every rank.
    fn route(&self, op: ModelOp, bytes: usize) -> &Arc<dyn Channel> {
        self.route_by(self.choice(op, bytes).as_ref()).1
    }

    /// The model's choice for `op` on `bytes`, if there is a model.
    fn choice(&self, op: ModelOp, bytes: usize) -> Option<fmi_model::Choice> {
        let model = self.inner.model.as_ref()?;
        model.choose(op, Bytes(bytes as u64), self.size()).ok()
    }

    /// The channel a call with the model's `choice` runs on, and its kind: the chosen channel
    /// when the communicator has it and more than one channel, else the primary one.
    fn route_by(&self, choice: Option<&fmi_model::Choice>) -> (ChannelKind, &Arc<dyn Channel>) {
        let inner = &*self.inner;
        if let (Some(choice), true) = (choice, inner.routes.len() > 1) {
            if let Some((k, ch)) = inner.routes.iter().find(|(k, _)| *k == choice.channel) {
                return (*k, ch);
            }
        }
        (inner.routes[0].0, &inner.channel)
    }

    /// The signal channel when the model picks a mixed-channel broadcast for `bytes` (and this
    /// communicator has both channels): the same answer on every rank.
    fn staged_signal(&self, bytes: usize) -> Option<&Arc<dyn Channel>> {
        let inner = &*self.inner;
        let model = inner.model.as_ref()?;
        inner.staged.as_ref()?;
        let choice = model
            .choose(ModelOp::Bcast, Bytes(bytes as u64), self.size())
            .ok()?;
        let signal = choice.algorithm.signal()?;
        inner
            .routes
            .iter()
            .find(|(k, _)| *k == signal)
            .map(|(_, c)| c)
    }

    /// The algorithm the model picks for `op` on `bytes` (`None` without a model): with
    /// [`Communicator::channel_for`], what a collective will do (`staged_bcast_tcp` is the
    /// mixed-channel broadcast of `crate::mixed`).
    pub fn algorithm_for(&self, op: ModelOp, bytes: usize) -> Option<fmi_model::Algorithm> {
        let model = self.inner.model.as_ref()?;
        model
            .choose(op, Bytes(bytes as u64), self.size())
            .ok()
            .map(|c| c.algorithm)
    }

    /// The name of the channel a collective `op` of `bytes` goes over (see [`fmi_model::Op`]
    /// for what `bytes` means per operation).
    pub fn channel_for(&self, op: ModelOp, bytes: usize) -> &'static str {
        self.route(op, bytes).name()
    }

    /// Every channel of this communicator, primary first.
    pub fn channels(&self) -> impl Iterator<Item = &Arc<dyn Channel>> {
        self.inner.routes.iter().map(|(_, c)| c)
    }

    /// Closes every channel before the communicator is dropped (see [`Channel::close`]): over
    /// QUIC this waits, bounded, until the peers have read what this rank sent them, which an
    /// abrupt drop would discard. Call it on the last handle, when the program is done
    /// communicating; the blocking communicator does so when dropped.
    pub async fn close(&self) {
        for c in self.channels() {
            c.close().await;
        }
    }

    /// How this rank reaches each peer it has talked to over a channel with per-pair
    /// connections (the TCP channel): [`PathKind::Direct`] (a dial of the peer's listener),
    /// [`PathKind::Punched`] (a direct connection punched through NATs) or
    /// [`PathKind::Relayed`] (through the rendezvous server), with the channel's name, in channel
    /// then rank order. Peers not connected yet are left out; empty for storage and memory
    /// channels. See docs/nat.md.
    pub fn paths(&self) -> Vec<(&'static str, Rank, PathKind)> {
        self.channels()
            .flat_map(|c| {
                let name = c.name();
                c.paths().into_iter().map(move |(r, k)| (name, r, k))
            })
            .collect()
    }

    /// The request counters of every channel (see [`Channel::counters`]), by channel name.
    pub fn counters_by_channel(&self) -> Vec<(&'static str, Vec<(&'static str, u64)>)> {
        self.inner
            .routes
            .iter()
            .map(|(_, c)| (c.name(), c.counters()))
            .collect()
    }

    /// The cost ledger so far: every channel's request counters (see
    /// [`Communicator::counters_by_channel`]) recorded under the model's name for it. Price it
    /// with `ledger.report(&model_config, usage)`; `fmi run --report` sums it over the ranks.
    pub fn ledger(&self) -> fmi_model::Ledger {
        let mut ledger = fmi_model::Ledger::new();
        for (kind, c) in &self.inner.routes {
            ledger.record(*kind, c.counters());
        }
        ledger
    }

    /// Writes this rank's ledger to `FMI_LEDGER` when the last handle is dropped, if the
    /// variable is set (`fmi run --report`).
    pub(crate) fn write_ledger_on_drop(&self) {
        let channels = self
            .inner
            .routes
            .iter()
            .map(|(_, c)| Arc::clone(c))
            .collect();
        if let Some(f) = crate::ledger::LedgerFile::from_env(self.rank().0, channels) {
            let _ = self.inner.ledger_file.set(f);
        }
    }

    /// The model routing this communicator's collectives, if any.
    pub fn model(&self) -> Option<&Model> {
        self.inner.model.as_ref()
    }

    fn ctx(&self) -> Ctx<'_> {
        self.ctx_on(&self.inner.channel)
    }

    /// The context of a collective `op` on `bytes`: on the channel the model picks, running the
    /// algorithm it picks there (when the configuration forces none for `op`), so that what runs
    /// is what `fmi explain` predicts. Without a model: the primary channel and the
    /// configuration's size thresholds.
    fn ctx_for(&self, op: ModelOp, bytes: usize) -> Ctx<'_> {
        let choice = self.choice(op, bytes);
        let (kind, channel) = self.route_by(choice.as_ref());
        let mut ctx = self.ctx_on(channel);
        if let Some(choice) = choice.filter(|c| c.channel == kind) {
            if let Some((_, _, forced)) = self
                .inner
                .by_algorithm
                .iter()
                .find(|(o, a, _)| *o == op && *a == choice.algorithm)
            {
                ctx.config = forced;
            }
        }
        ctx
    }

    fn ctx_on<'a>(&'a self, channel: &'a Arc<dyn Channel>) -> Ctx<'a> {
        let seq = self.inner.seq.fetch_add(1, Ordering::Relaxed);
        Ctx {
            channel: &**channel,
            tag: Tag::collective(seq),
            deadline: self.deadline_from_now(),
            config: &self.inner.config.collectives,
        }
    }

    /// Checks that `len` elements split into `size` equal blocks.
    fn check_blocks(&self, what: &'static str, len: usize) -> Result<()> {
        let p = self.size() as usize;
        if len.is_multiple_of(p) {
            Ok(())
        } else {
            Err(Error::CountMismatch {
                me: self.rank(),
                peer: self.rank(),
                what,
                expected: len / p * p,
                got: len,
            })
        }
    }

    fn check_root(&self, root: Rank) -> Result<()> {
        fmi_channels::check_rank(root, self.size())
    }

    // ---------------------------------------------------------------- point to point

    /// Sends `data` to `dst` with the user `tag`. Messages to one destination with one tag arrive
    /// in the order sent.
    pub async fn send<T: Pod>(&self, dst: impl Into<Rank>, tag: u32, data: &[T]) -> Result<()> {
        let mut turn = self.inner.send_turns.join();
        turn.ready().await;
        let tag = Tag::user(tag);
        let fut = self.inner.p2p.send(
            dst.into(),
            tag,
            bytemuck::cast_slice(data),
            self.deadline_from_now(),
        );
        drop(turn);
        self.passed_on(tag, fut.await).await
    }

    /// A point-to-point result of `p2p`, after the job was aborted if it failed because of a
    /// peer and the communicator does that (see `Inner::p2p`).
    async fn passed_on<T>(&self, tag: Tag, r: Result<T>) -> Result<T> {
        match r {
            Err(e) if self.inner.abort => {
                fmi_channels::propagate_failure(&*self.inner.p2p, tag, Err(e)).await
            }
            r => r,
        }
    }

    /// Receives the next message from `src` with `tag`; its length is the sender's.
    pub async fn recv<T: Pod>(&self, src: impl Into<Rank>, tag: u32) -> Result<Vec<T>> {
        let src = src.into();
        let bytes = self.recv_bytes(src, tag).await?;
        bytes_to_vec(self.rank(), src, bytes)
    }

    async fn recv_bytes(&self, src: Rank, tag: u32) -> Result<Vec<u8>> {
        let mut turn = self.inner.recv_turns.join();
        turn.ready().await;
        let tag = Tag::user(tag);
        let fut = self.inner.p2p.recv(src, tag, self.deadline_from_now());
        drop(turn);
        self.passed_on(tag, fut.await).await
    }

    /// Receives into `buf` and returns the number of elements received; a message longer than
    /// `buf` is a `CountMismatch` (and is consumed), one whose length is not a multiple of the
    /// element size a `TypeMismatch`. After an error the contents of `buf` are unspecified.
    ///
    /// The channel places the message in `buf` itself ([`Channel::recv_into`]): the TCP channel
    /// reads it from the socket straight into `buf` when this call is already waiting for it.
    pub async fn recv_into<T: Pod>(
        &self,
        src: impl Into<Rank>,
        tag: u32,
        buf: &mut [T],
    ) -> Result<usize> {
        let src = src.into();
        let n = std::mem::size_of::<T>();
        if n == 0 {
            // No bytes to receive into; consume the message as before and refuse it.
            let bytes = self.recv_bytes(src, tag).await?;
            return Err(Error::TypeMismatch {
                me: self.rank(),
                peer: src,
                len: bytes.len(),
                elem_size: n,
            });
        }
        let elems = buf.len();
        let bytes = bytemuck::cast_slice_mut::<T, u8>(buf);
        let mut turn = self.inner.recv_turns.join();
        turn.ready().await;
        let tag = Tag::user(tag);
        let fut = self
            .inner
            .p2p
            .recv_into(src, tag, bytes, self.deadline_from_now());
        drop(turn);
        let type_mismatch = |len| Error::TypeMismatch {
            me: self.rank(),
            peer: src,
            len,
            elem_size: n,
        };
        match self.passed_on(tag, fut.await).await {
            Ok(len) if len.is_multiple_of(n) => Ok(len / n),
            Ok(len) => Err(type_mismatch(len)),
            // The channel counts bytes; report elements, as for every other count.
            Err(Error::CountMismatch {
                what: fmi_channels::RECV_INTO_TOO_LONG,
                got,
                ..
            }) => Err(if got.is_multiple_of(n) {
                Error::CountMismatch {
                    me: self.rank(),
                    peer: src,
                    what: fmi_channels::RECV_INTO_TOO_LONG,
                    expected: elems,
                    got: got / n,
                }
            } else {
                type_mismatch(got)
            }),
            Err(e) => Err(e),
        }
    }

    /// Sends to `dst` and receives from `src` at the same time (no deadlock in exchanges).
    pub async fn sendrecv<T: Pod, U: Pod>(
        &self,
        dst: impl Into<Rank>,
        send_tag: u32,
        data: &[T],
        src: impl Into<Rank>,
        recv_tag: u32,
    ) -> Result<Vec<U>> {
        let (s, r) = tokio::join!(
            self.send(dst, send_tag, data),
            self.recv::<U>(src, recv_tag)
        );
        s?;
        r
    }

    /// Starts sending a copy of `data`; the returned request completes when the send does.
    /// Ordered with every other send from this communicator as of this call.
    pub fn isend<T: Pod>(&self, dst: impl Into<Rank>, tag: u32, data: &[T]) -> Request<()> {
        let data: Vec<u8> = bytemuck::cast_slice(data).to_vec();
        let dst = dst.into();
        let mut turn = self.inner.send_turns.join();
        let inner = Arc::clone(&self.inner);
        let deadline = self.deadline_from_now();
        Request {
            handle: tokio::spawn(async move {
                turn.ready().await;
                let fut = inner.channel.send(dst, Tag::user(tag), &data, deadline);
                drop(turn);
                fut.await
            }),
        }
    }

    /// Starts receiving from `src`; matched in call order with other receives.
    pub fn irecv<T: Pod + Send>(&self, src: impl Into<Rank>, tag: u32) -> Request<Vec<T>> {
        let src = src.into();
        let mut turn = self.inner.recv_turns.join();
        let inner = Arc::clone(&self.inner);
        let deadline = self.deadline_from_now();
        Request {
            handle: tokio::spawn(async move {
                turn.ready().await;
                let fut = inner.channel.recv(src, Tag::user(tag), deadline);
                drop(turn);
                let bytes = fut.await?;
                bytes_to_vec(inner.channel.rank(), src, bytes)
            }),
        }
    }

    /// Sends any serde-serializable value.
    pub async fn send_value<S: Serialize>(
        &self,
        dst: impl Into<Rank>,
        tag: u32,
        value: &S,
    ) -> Result<()> {
        let dst = dst.into();
        let bytes = encode(self.rank(), dst, value)?;
        self.send(dst, tag, &bytes).await
    }

    /// Receives a value sent with [`Communicator::send_value`].
    pub async fn recv_value<D: DeserializeOwned>(
        &self,
        src: impl Into<Rank>,
        tag: u32,
    ) -> Result<D> {
        let src = src.into();
        let bytes = self.recv_bytes(src, tag).await?;
        decode(self.rank(), src, &bytes)
    }

    // ---------------------------------------------------------------- collectives

    /// Returns once every rank has called `barrier`.
    pub async fn barrier(&self) -> Result<()> {
        fmi_collectives::barrier(&self.ctx_for(ModelOp::Barrier, 0)).await
    }

    /// Broadcasts root's `data` (other ranks' `data` is ignored; pass `&[]`). Every rank returns
    /// root's data; receivers need not know its length.
    pub async fn bcast<T: Pod>(&self, root: impl Into<Rank>, data: &[T]) -> Result<Vec<T>> {
        let root = root.into();
        self.check_root(root)?;
        let mine = (self.rank() == root).then(|| bytemuck::cast_slice(data));
        let bytes = fmi_collectives::bcast(&self.ctx(), root, mine).await?;
        bytes_to_vec(self.rank(), root, bytes)
    }

    /// Broadcasts root's `buf` into every rank's `buf` (all of the same length, as in MPI).
    pub async fn bcast_into<T: Pod>(&self, root: impl Into<Rank>, buf: &mut [T]) -> Result<()> {
        let root = root.into();
        self.check_root(root)?;
        let bytes = std::mem::size_of_val(buf);
        if let Some(signal) = self.staged_signal(bytes) {
            // Mixed channels: payload once in S3, token and acknowledgements over `signal`.
            let (ctx, ack) = (self.ctx_on(signal), self.ctx_on(signal));
            let staged = self.inner.staged.as_ref().ok_or(Error::InvalidArgument {
                what: "staged broadcast without an S3 mailbox",
            })?;
            let call = crate::mixed::Call {
                staged,
                signal,
                tag: ctx.tag,
                ack_tag: ack.tag,
                deadline: ctx.deadline,
                config: ctx.config,
                root,
            };
            return crate::mixed::bcast(call, bytemuck::cast_slice_mut(buf)).await;
        }
        fmi_collectives::bcast_into(
            &self.ctx_for(ModelOp::Bcast, bytes),
            root,
            bytemuck::cast_slice_mut(buf),
        )
        .await
    }

    /// Broadcasts a serde value; `value` is used at root only.
    pub async fn bcast_value<S: Serialize + DeserializeOwned>(
        &self,
        root: impl Into<Rank>,
        value: Option<&S>,
    ) -> Result<S> {
        let root = root.into();
        self.check_root(root)?;
        let mine = if self.rank() == root {
            let v = value.ok_or(Error::InvalidArgument {
                what: "bcast_value: the root must pass Some(value)",
            })?;
            Some(encode(self.rank(), root, v)?)
        } else {
            None
        };
        let bytes = fmi_collectives::bcast(&self.ctx(), root, mine.as_deref()).await?;
        decode(self.rank(), root, &bytes)
    }

    /// Gathers every rank's `data` (equal lengths) at root, in rank order; `None` elsewhere.
    pub async fn gather<T: Pod>(
        &self,
        root: impl Into<Rank>,
        data: &[T],
    ) -> Result<Option<Vec<T>>> {
        let root = root.into();
        self.check_root(root)?;
        match fmi_collectives::gatherv(&self.ctx(), root, bytemuck::cast_slice(data)).await? {
            Some(parts) => concat(self.rank(), "gather", parts).map(Some),
            None => Ok(None),
        }
    }

    /// Gathers every rank's `data` (any lengths) at root: `parts[r]` is rank r's data.
    pub async fn gatherv<T: Pod>(
        &self,
        root: impl Into<Rank>,
        data: &[T],
    ) -> Result<Option<Vec<Vec<T>>>> {
        let root = root.into();
        self.check_root(root)?;
        match fmi_collectives::gatherv(&self.ctx(), root, bytemuck::cast_slice(data)).await? {
            Some(parts) => parts
                .into_iter()
                .enumerate()
                .map(|(r, p)| bytes_to_vec(self.rank(), Rank(r as u32), p))
                .collect::<Result<Vec<_>>>()
                .map(Some),
            None => Ok(None),
        }
    }

    /// Gathers a serde value from every rank at root.
    pub async fn gather_value<S: Serialize + DeserializeOwned>(
        &self,
        root: impl Into<Rank>,
        value: &S,
    ) -> Result<Option<Vec<S>>> {
        let root = root.into();
        self.check_root(root)?;
        let bytes = encode(self.rank(), root, value)?;
        match fmi_collectives::gatherv(&self.ctx(), root, &bytes).await? {
            Some(parts) => parts
                .iter()
                .enumerate()
                .map(|(r, p)| decode(self.rank(), Rank(r as u32), p))
                .collect::<Result<Vec<_>>>()
                .map(Some),
            None => Ok(None),
        }
    }

    /// Root splits `data` into `size` equal blocks; rank r gets block r. Non-roots pass `&[]`.
    pub async fn scatter<T: Pod>(&self, root: impl Into<Rank>, data: &[T]) -> Result<Vec<T>> {
        let root = root.into();
        self.check_root(root)?;
        let p = self.size() as usize;
        let blocks: Option<Vec<&[u8]>> = if self.rank() == root {
            self.check_blocks(
                "scatter: the root's data must be a multiple of the world size",
                data.len(),
            )?;
            let bytes: &[u8] = bytemuck::cast_slice(data);
            if bytes.is_empty() {
                Some(vec![&[][..]; p])
            } else {
                Some(bytes.chunks_exact(bytes.len() / p).collect::<Vec<_>>())
            }
        } else {
            None
        };
        let bytes = fmi_collectives::scatterv(&self.ctx(), root, blocks.as_deref()).await?;
        bytes_to_vec(self.rank(), root, bytes)
    }

    /// Root sends `counts[r]` consecutive elements of `data` to rank r. Non-roots pass empty
    /// slices.
    pub async fn scatterv<T: Pod>(
        &self,
        root: impl Into<Rank>,
        data: &[T],
        counts: &[usize],
    ) -> Result<Vec<T>> {
        let root = root.into();
        self.check_root(root)?;
        let blocks = if self.rank() == root {
            if counts.len() != self.size() as usize {
                return Err(Error::CountMismatch {
                    me: self.rank(),
                    peer: root,
                    what: "scatterv: counts must have one entry per rank",
                    expected: self.size() as usize,
                    got: counts.len(),
                });
            }
            let total: usize = counts.iter().sum();
            if total != data.len() {
                return Err(Error::CountMismatch {
                    me: self.rank(),
                    peer: root,
                    what: "scatterv: counts must add up to the data length",
                    expected: data.len(),
                    got: total,
                });
            }
            let mut blocks = Vec::with_capacity(counts.len());
            let mut at = 0;
            for &c in counts {
                blocks.push(bytemuck::cast_slice(&data[at..at + c]));
                at += c;
            }
            Some(blocks)
        } else {
            None
        };
        let bytes = fmi_collectives::scatterv(&self.ctx(), root, blocks.as_deref()).await?;
        bytes_to_vec(self.rank(), root, bytes)
    }

    /// Every rank gets every rank's `data` (equal lengths) concatenated in rank order.
    pub async fn allgather<T: Pod>(&self, data: &[T]) -> Result<Vec<T>> {
        let mut out = bytemuck::zeroed_vec(data.len() * self.size() as usize);
        self.allgather_into(data, &mut out).await?;
        Ok(out)
    }

    /// Like [`Communicator::allgather`], writing the result into `out` (`size()` times as long
    /// as `data`); every rank's block is received straight into its place there.
    pub async fn allgather_into<T: Pod>(&self, data: &[T], out: &mut [T]) -> Result<()> {
        let want = data.len() * self.size() as usize;
        if out.len() != want {
            return Err(Error::CountMismatch {
                me: self.rank(),
                peer: self.rank(),
                what: "allgather_into: output length must be the input's times size()",
                expected: want,
                got: out.len(),
            });
        }
        let ctx = self.ctx_for(ModelOp::Allgather, std::mem::size_of_val(out));
        fmi_collectives::allgather_into(
            &ctx,
            bytemuck::cast_slice(data),
            bytemuck::cast_slice_mut(out),
        )
        .await
    }

    /// Every rank gets every rank's `data` (any lengths): `parts[r]` is rank r's.
    pub async fn allgatherv<T: Pod>(&self, data: &[T]) -> Result<Vec<Vec<T>>> {
        let parts = fmi_collectives::allgatherv(&self.ctx(), bytemuck::cast_slice(data)).await?;
        parts
            .into_iter()
            .enumerate()
            .map(|(r, p)| bytes_to_vec(self.rank(), Rank(r as u32), p))
            .collect()
    }

    /// Every rank gets every rank's serde value.
    pub async fn allgather_value<S: Serialize + DeserializeOwned>(
        &self,
        value: &S,
    ) -> Result<Vec<S>> {
        let bytes = encode(self.rank(), self.rank(), value)?;
        let parts = fmi_collectives::allgatherv(&self.ctx(), &bytes).await?;
        parts
            .iter()
            .enumerate()
            .map(|(r, p)| decode(self.rank(), Rank(r as u32), p))
            .collect()
    }

    /// `data` holds `size` equal blocks; block d goes to rank d. Returns the blocks received,
    /// concatenated in source-rank order.
    pub async fn alltoall<T: Pod>(&self, data: &[T]) -> Result<Vec<T>> {
        let p = self.size() as usize;
        self.check_blocks(
            "alltoall: data must be a multiple of the world size",
            data.len(),
        )?;
        let block = data.len() / p;
        let blocks: Vec<&[u8]> = (0..p)
            .map(|d| bytemuck::cast_slice(&data[d * block..(d + 1) * block]))
            .collect();
        let ctx = self.ctx_for(ModelOp::Alltoall, std::mem::size_of_val(data));
        let parts = fmi_collectives::alltoallv(&ctx, &blocks).await?;
        concat(self.rank(), "alltoall", parts)
    }

    /// Sends `counts[d]` consecutive elements of `data` to rank d; returns what each rank sent
    /// here, index = source rank.
    pub async fn alltoallv<T: Pod>(&self, data: &[T], counts: &[usize]) -> Result<Vec<Vec<T>>> {
        let p = self.size() as usize;
        let total: usize = counts.iter().sum();
        if counts.len() != p || total != data.len() {
            return Err(Error::CountMismatch {
                me: self.rank(),
                peer: self.rank(),
                what: "alltoallv: counts must have one entry per rank adding up to the data length",
                expected: data.len(),
                got: total,
            });
        }
        let mut blocks = Vec::with_capacity(p);
        let mut at = 0;
        for &c in counts {
            blocks.push(bytemuck::cast_slice(&data[at..at + c]));
            at += c;
        }
        let parts = fmi_collectives::alltoallv(&self.ctx(), &blocks).await?;
        parts
            .into_iter()
            .enumerate()
            .map(|(r, p)| bytes_to_vec(self.rank(), Rank(r as u32), p))
            .collect()
    }

    /// Reduces every rank's `data` (equal lengths) element-wise at root; `None` elsewhere.
    pub async fn reduce<T: Pod + Send + Sync>(
        &self,
        root: impl Into<Rank>,
        data: &[T],
        op: impl Into<Reduction<T>>,
    ) -> Result<Option<Vec<T>>> {
        let root = root.into();
        self.check_root(root)?;
        let op = op.into().to_bytes_op()?;
        let ctx = self.ctx_for(ModelOp::Reduce, std::mem::size_of_val(data));
        match fmi_collectives::reduce(&ctx, root, bytemuck::cast_slice(data), &op).await? {
            Some(bytes) => bytes_to_vec(self.rank(), root, bytes).map(Some),
            None => Ok(None),
        }
    }

    /// Reduces every rank's `data` element-wise; every rank gets the result.
    pub async fn allreduce<T: Pod + Send + Sync>(
        &self,
        data: &[T],
        op: impl Into<Reduction<T>>,
    ) -> Result<Vec<T>> {
        // Reduced in place in a vector of `T` (aligned for it), so no byte vector is copied
        // into one at the end.
        let mut out = bytemuck::zeroed_vec(data.len());
        self.allreduce_into(data, &mut out, op).await?;
        Ok(out)
    }

    /// Like [`Communicator::allreduce`], writing the result into `out` (same length as `data`).
    pub async fn allreduce_into<T: Pod + Send + Sync>(
        &self,
        data: &[T],
        out: &mut [T],
        op: impl Into<Reduction<T>>,
    ) -> Result<()> {
        if out.len() != data.len() {
            return Err(Error::CountMismatch {
                me: self.rank(),
                peer: self.rank(),
                what: "allreduce_into: output length must equal input length",
                expected: data.len(),
                got: out.len(),
            });
        }
        let op = op.into().to_bytes_op()?;
        let ctx = self.ctx_for(ModelOp::Allreduce, std::mem::size_of_val(data));
        fmi_collectives::allreduce_into(
            &ctx,
            bytemuck::cast_slice(data),
            bytemuck::cast_slice_mut(out),
            &op,
        )
        .await?;
        Ok(())
    }

    /// `data` holds `size` equal blocks; rank r gets block r of the element-wise reduction
    /// (MPI's `Reduce_scatter_block`).
    pub async fn reduce_scatter<T: Pod + Send + Sync>(
        &self,
        data: &[T],
        op: impl Into<Reduction<T>>,
    ) -> Result<Vec<T>> {
        self.check_blocks(
            "reduce_scatter: data must be a multiple of the world size",
            data.len(),
        )?;
        let op = op.into().to_bytes_op()?;
        let bytes = fmi_collectives::reduce_scatter_block(
            &self.ctx_for(ModelOp::ReduceScatter, std::mem::size_of_val(data)),
            bytemuck::cast_slice(data),
            &op,
        )
        .await?;
        bytes_to_vec(self.rank(), self.rank(), bytes)
    }

    /// Inclusive prefix reduction: rank r gets `x0 op … op xr`.
    pub async fn scan<T: Pod + Send + Sync>(
        &self,
        data: &[T],
        op: impl Into<Reduction<T>>,
    ) -> Result<Vec<T>> {
        let op = op.into().to_bytes_op()?;
        let ctx = self.ctx_for(ModelOp::Scan, std::mem::size_of_val(data));
        let bytes = fmi_collectives::scan(&ctx, bytemuck::cast_slice(data), &op).await?;
        bytes_to_vec(self.rank(), self.rank(), bytes)
    }

    /// Exclusive prefix reduction: rank r > 0 gets `x0 op … op x(r−1)`, rank 0 gets `None`.
    pub async fn exscan<T: Pod + Send + Sync>(
        &self,
        data: &[T],
        op: impl Into<Reduction<T>>,
    ) -> Result<Option<Vec<T>>> {
        let op = op.into().to_bytes_op()?;
        let ctx = self.ctx_for(ModelOp::Scan, std::mem::size_of_val(data));
        match fmi_collectives::exscan(&ctx, bytemuck::cast_slice(data), &op).await? {
            Some(bytes) => bytes_to_vec(self.rank(), self.rank(), bytes).map(Some),
            None => Ok(None),
        }
    }
}

/// The communicators of an in-process job of `size` ranks over the memory channel (index =
/// rank): for tests, examples and single-machine experiments with no external service.
pub fn local_world(size: u32) -> Result<Vec<Communicator>> {
    local_world_with(size, Config::default())
}

/// Like [`local_world`] with a configuration.
pub fn local_world_with(size: u32, config: Config) -> Result<Vec<Communicator>> {
    if size == 0 {
        return Err(Error::InvalidArgument {
            what: "a world needs at least one rank",
        });
    }
    let job = JobId::new("local")?;
    Ok(fmi_channels::memory::world(job, size)
        .into_iter()
        .map(|ch| {
            Communicator::builder()
                .config(config.clone())
                .channel(ch)
                .build()
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use fmi_collectives::{AllreduceAlgorithm, Forced};
    use fmi_model::{Algorithm, ModelConfig};

    fn world(n: u32, config: Config) -> Vec<Communicator> {
        let model = Model::new(ModelConfig::default(), &[ChannelKind::Tcp]).expect("model");
        let job = JobId::new("model-algorithms").expect("job");
        fmi_channels::memory::world(job, n)
            .into_iter()
            .map(|ch| {
                Communicator::builder()
                    .config(config.clone())
                    .model(model.clone())
                    .channel(ch)
                    .build()
            })
            .collect()
    }

    fn forced(a: Algorithm) -> Option<AllreduceAlgorithm> {
        match a {
            Algorithm::RecursiveDoubling => Some(AllreduceAlgorithm::RecursiveDoubling),
            Algorithm::Rabenseifner => Some(AllreduceAlgorithm::Rabenseifner),
            Algorithm::Ring => Some(AllreduceAlgorithm::Ring),
            _ => None,
        }
    }

    const LADDER: [usize; 6] = [8, 4096, 65536, 1 << 20, 16 << 20, 256 << 20];

    /// What runs is what the model picks (`fmi explain` tells the truth), and the results are
    /// right whichever algorithm that is.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn collectives_run_the_algorithm_the_model_picks() {
        // `ctx_for` takes an operation number, so the inspected rank gets a world of its own.
        let inspected = world(4, Config::default());
        let mut seen = Vec::new();
        for bytes in LADDER {
            let want = inspected[0]
                .algorithm_for(ModelOp::Allreduce, bytes)
                .expect("a choice");
            assert!(forced(want).is_some(), "{want:?}");
            assert_eq!(
                inspected[0]
                    .ctx_for(ModelOp::Allreduce, bytes)
                    .config
                    .force
                    .allreduce,
                forced(want),
                "{bytes} B"
            );
            seen.push(want);
        }
        seen.dedup();
        assert!(
            seen.len() >= 2,
            "the ladder should cross algorithms: {seen:?}"
        );
        // Run one allreduce per size of the ladder up to 16 MiB on 4 ranks.
        let comms = world(4, Config::default());
        for bytes in &LADDER[..5] {
            let n = bytes / 4;
            let calls = comms.iter().enumerate().map(|(r, c)| {
                let c = c.clone();
                tokio::spawn(async move {
                    let data = vec![r as f32 + 1.0; n];
                    c.allreduce(&data, crate::Op::Sum).await
                })
            });
            for out in futures::future::join_all(calls).await {
                let out = out.expect("task").expect("allreduce");
                assert!(
                    out.len() == n && out.iter().all(|&v| v == 10.0),
                    "{bytes} B"
                );
            }
        }
    }

    /// An algorithm the configuration forces wins over the model's.
    #[test]
    fn a_forced_algorithm_wins_over_the_model() {
        let mut config = Config::default();
        let mut force = Forced::default();
        force.allreduce = Some(AllreduceAlgorithm::Ring);
        config.collectives.force = force;
        let comms = world(2, config);
        for bytes in LADDER {
            let ctx = comms[0].ctx_for(ModelOp::Allreduce, bytes);
            assert_eq!(ctx.config.force.allreduce, Some(AllreduceAlgorithm::Ring));
        }
    }
}
