//! The blocking communicator: the same operations as [`crate::Communicator`], for code that is
//! not async (plain Rust programs, and the C and Python bindings).
//!
//! It owns a current-thread tokio runtime. A thread waiting in a call drives that runtime itself,
//! so a message that arrives wakes the waiting thread directly (one thread wake-up, as with a
//! blocking socket) instead of waking a worker that then wakes the caller. Between calls a
//! progress thread ("fmi-progress") drives it, so the channel keeps making progress (accepting
//! connections, reading incoming messages into buffers) while the program computes: it takes
//! over once no call has run for a while (1 ms after it last drove, backing off to 8 ms while the
//! program keeps calling: see [`PROGRESS_IDLE_MAX`]) and hands the runtime back as soon as a call
//! starts. Calling the blocking API from inside an async runtime would deadlock that runtime's
//! thread, so it refuses with [`Error::NestedRuntime`] instead.

use std::future::Future;
use std::pin::pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::thread::JoinHandle;
use std::time::Duration;

use bytemuck::Pod;
use fmi_channels::{JobId, Rank};
use serde::{de::DeserializeOwned, Serialize};
use tokio::runtime::Runtime;
use tokio::sync::Notify;

use crate::config::Config;
use crate::op::Reduction;
use crate::{Error, Result};

/// How long no call must have started (and none be running) before the progress thread drives
/// the runtime, after it has driven (or at the start).
const PROGRESS_IDLE: Duration = Duration::from_millis(1);
/// The longest the progress thread parks between two looks while the program keeps calling.
/// Each look at a busy program doubles its park from [`PROGRESS_IDLE`] up to this, so a rank
/// in a tight communication loop is disturbed 125 times a second instead of 1000 (each wake-up
/// can take the core from a spinning rank); a program that stops calling is noticed within
/// twice this.
const PROGRESS_IDLE_MAX: Duration = Duration::from_millis(8);

/// A blocking communicator. See [`crate::Communicator`] for what each operation does.
#[derive(Debug)]
pub struct Communicator {
    comm: crate::Communicator,
    rt: Arc<Engine>,
}

/// A pending non-blocking operation of the blocking API.
#[derive(Debug)]
#[must_use = "a request does nothing useful unless waited for"]
pub struct Request<T> {
    req: Option<crate::Request<T>>,
    rt: Arc<Engine>,
}

/// The runtime of blocking communicators and the thread that drives it between calls.
#[derive(Debug)]
struct Engine {
    rt: Arc<Runtime>,
    ctl: Arc<Control>,
    progress: Option<JoinHandle<()>>,
}

/// What callers and the progress thread agree on.
#[derive(Debug)]
struct Control {
    /// Calls in progress (they drive the runtime themselves).
    active: AtomicUsize,
    /// Calls started so far: the progress thread sees from it whether the program was idle.
    started: AtomicU64,
    /// Whether the progress thread is driving the runtime (and must be asked to stop).
    driving: AtomicBool,
    /// Tells the driving progress thread to hand the runtime over (or to stop).
    hand_over: Notify,
    stop: AtomicBool,
}

/// Marks a call in progress for its lifetime.
struct Call<'a>(&'a Control);

impl<'a> Call<'a> {
    /// A call that will drive the runtime: the progress thread hands it over.
    fn enter(ctl: &'a Control) -> Call<'a> {
        let call = Call::quiet(ctl);
        call.claim_runtime();
        call
    }

    /// A call that does not need the runtime (yet): the progress thread neither takes the
    /// runtime over while it runs nor is asked to hand it back.
    fn quiet(ctl: &'a Control) -> Call<'a> {
        ctl.started.fetch_add(1, SeqCst);
        ctl.active.fetch_add(1, SeqCst);
        Call(ctl)
    }

    /// Asks the progress thread, if it drives the runtime, to hand it over.
    fn claim_runtime(&self) {
        if self.0.driving.load(SeqCst) {
            self.0.hand_over.notify_one();
        }
    }
}

impl Drop for Call<'_> {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, SeqCst);
    }
}

impl Engine {
    fn new() -> Result<Engine> {
        refuse_nested()?;
        let io = |source| Error::Io {
            me: Rank(0),
            peer: None,
            channel: "runtime",
            source,
        };
        let rt = Arc::new(
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(io)?,
        );
        let ctl = Arc::new(Control {
            active: AtomicUsize::new(0),
            started: AtomicU64::new(0),
            driving: AtomicBool::new(false),
            hand_over: Notify::new(),
            stop: AtomicBool::new(false),
        });
        let progress = {
            let rt = Arc::clone(&rt);
            let ctl = Arc::clone(&ctl);
            std::thread::Builder::new()
                .name("fmi-progress".into())
                .spawn(move || progress(&rt, &ctl))
                .map_err(io)?
        };
        Ok(Engine {
            rt,
            ctl,
            progress: Some(progress),
        })
    }

    /// Runs `f` to completion on this thread, driving the runtime while it waits.
    fn block_on<F: Future>(&self, f: F) -> F::Output {
        let _call = Call::enter(&self.ctl);
        self.rt.block_on(f)
    }

    /// Like [`Engine::block_on`], but first polls `f` once inside the runtime's context (timers
    /// and spawns work) without taking the scheduler: a future ready at once costs no scheduler
    /// round. A wake-up that comes between that poll and `block_on` is not lost, since
    /// `block_on` polls the future first thing.
    fn block_on_quick<F: Future>(&self, f: F) -> F::Output {
        // A call from here on (a large send's first write can take a while): the progress
        // thread must not take the runtime over meanwhile.
        let call = Call::quiet(&self.ctl);
        let mut f = pin!(f);
        {
            let _context = self.rt.enter();
            let mut cx = Context::from_waker(futures::task::noop_waker_ref());
            if let Poll::Ready(out) = f.as_mut().poll(&mut cx) {
                return out;
            }
        }
        call.claim_runtime();
        self.rt.block_on(f)
    }

    fn enter(&self) -> tokio::runtime::EnterGuard<'_> {
        self.rt.enter()
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.ctl.stop.store(true, SeqCst);
        self.ctl.hand_over.notify_one();
        if let Some(t) = self.progress.take() {
            t.thread().unpark();
            let _ = t.join();
        }
    }
}

/// The progress thread: drives the runtime once no call has started for one park (from
/// [`PROGRESS_IDLE`] up to [`PROGRESS_IDLE_MAX`]) and none is running, until a call starts or
/// the engine stops. Calls themselves never read the clock or wake this thread unless it is
/// driving.
fn progress(rt: &Runtime, ctl: &Control) {
    let mut nap = PROGRESS_IDLE;
    loop {
        let seen = ctl.started.load(SeqCst);
        std::thread::park_timeout(nap);
        if ctl.stop.load(SeqCst) {
            return;
        }
        if ctl.active.load(SeqCst) > 0 || ctl.started.load(SeqCst) != seen {
            nap = (nap * 2).min(PROGRESS_IDLE_MAX);
            continue;
        }
        nap = PROGRESS_IDLE;
        ctl.driving.store(true, SeqCst);
        rt.block_on(async {
            loop {
                let notified = ctl.hand_over.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                if ctl.active.load(SeqCst) > 0 || ctl.stop.load(SeqCst) {
                    return;
                }
                notified.await;
            }
        });
        ctl.driving.store(false, SeqCst);
    }
}

fn refuse_nested() -> Result<()> {
    if tokio::runtime::Handle::try_current().is_ok() {
        Err(Error::NestedRuntime)
    } else {
        Ok(())
    }
}

impl<T> Request<T> {
    /// Blocks until the operation finishes.
    pub fn wait(mut self) -> Result<T> {
        refuse_nested()?;
        match self.req.take() {
            Some(r) => self.rt.block_on(r.wait()),
            None => Err(Error::InvalidArgument {
                what: "request already completed",
            }),
        }
    }

    /// Returns the result if the operation has finished, `None` if it is still running.
    pub fn test(&mut self) -> Option<Result<T>> {
        if let Err(e) = refuse_nested() {
            return Some(Err(e));
        }
        match &self.req {
            Some(r) => {
                if !r.is_complete() {
                    // Drive the runtime a little, as MPI_Test does: run the tasks that are ready
                    // and take in the I/O events that have arrived.
                    self.rt.block_on(async {
                        tokio::task::yield_now().await;
                        tokio::task::yield_now().await;
                    });
                }
                if r.is_complete() {
                    self.req.take().map(|r| self.rt.block_on(r.wait()))
                } else {
                    None
                }
            }
            None => Some(Err(Error::InvalidArgument {
                what: "request already completed",
            })),
        }
    }
}

impl Drop for Communicator {
    fn drop(&mut self) {
        // Before the runtime goes: a channel that would lose unread data on an abrupt close
        // (the QUIC transport) hands it over first, bounded in time (`Channel::close`).
        self.rt.block_on(self.comm.close());
    }
}

impl Communicator {
    /// Joins the job described by the environment (see [`crate::Communicator::from_env`]).
    pub fn from_env() -> Result<Communicator> {
        let rt = Arc::new(Engine::new()?);
        let comm = rt.block_on(crate::Communicator::from_env())?;
        Ok(Communicator { comm, rt })
    }

    /// Joins the job `settings` describe (see [`crate::Communicator::from_settings`]).
    pub fn from_settings(settings: crate::EnvSettings) -> Result<Communicator> {
        let rt = Arc::new(Engine::new()?);
        let comm = rt.block_on(crate::Communicator::from_settings(settings))?;
        Ok(Communicator { comm, rt })
    }

    /// Wraps an async communicator built by `make` on this communicator's own runtime (so its
    /// background tasks live there).
    pub fn build<F, Fut>(make: F) -> Result<Communicator>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<crate::Communicator>>,
    {
        let rt = Arc::new(Engine::new()?);
        let comm = rt.block_on(make())?;
        Ok(Communicator { comm, rt })
    }

    fn block<T>(&self, f: impl Future<Output = Result<T>>) -> Result<T> {
        refuse_nested()?;
        self.rt.block_on(f)
    }

    /// Like [`Communicator::block`] for operations that usually finish at once (a send whose
    /// bytes the socket takes, a receive whose message comes while its first poll spins): polls
    /// once on this thread first, and enters the runtime's scheduler only if the operation has
    /// to wait.
    fn block_quick<T>(&self, f: impl Future<Output = Result<T>>) -> Result<T> {
        refuse_nested()?;
        self.rt.block_on_quick(f)
    }

    /// The async communicator underneath.
    pub fn as_async(&self) -> &crate::Communicator {
        &self.comm
    }

    /// This process's rank.
    pub fn rank(&self) -> Rank {
        self.comm.rank()
    }

    /// The number of ranks.
    pub fn size(&self) -> u32 {
        self.comm.size()
    }

    /// The job id.
    pub fn job(&self) -> &JobId {
        self.comm.job()
    }

    /// The channel's name.
    pub fn channel_name(&self) -> &'static str {
        self.comm.channel_name()
    }

    /// See [`crate::Communicator::counters`].
    pub fn counters(&self) -> Vec<(&'static str, u64)> {
        self.comm.counters()
    }

    /// See [`crate::Communicator::paths`].
    pub fn paths(&self) -> Vec<(&'static str, crate::Rank, crate::PathKind)> {
        self.comm.paths()
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        self.comm.config()
    }

    /// The default deadline.
    pub fn deadline(&self) -> Duration {
        self.comm.deadline()
    }

    /// A handle on the same communicator whose calls use `deadline`.
    pub fn with_deadline(&self, deadline: Duration) -> Communicator {
        Communicator {
            comm: self.comm.with_deadline(deadline),
            rt: Arc::clone(&self.rt),
        }
    }

    /// See [`crate::Communicator::send`].
    pub fn send<T: Pod>(&self, dst: impl Into<Rank>, tag: u32, data: &[T]) -> Result<()> {
        self.block_quick(self.comm.send(dst, tag, data))
    }

    /// See [`crate::Communicator::recv`].
    pub fn recv<T: Pod>(&self, src: impl Into<Rank>, tag: u32) -> Result<Vec<T>> {
        // Polled once before the scheduler is entered: channels that spin for a message do so
        // inside that poll (the rdma channel, the TCP channel's direct path), and a message that
        // comes within the spin then costs no scheduler round.
        self.block_quick(self.comm.recv(src, tag))
    }

    /// See [`crate::Communicator::recv_into`].
    pub fn recv_into<T: Pod>(
        &self,
        src: impl Into<Rank>,
        tag: u32,
        buf: &mut [T],
    ) -> Result<usize> {
        // As `recv`: polled once first.
        self.block_quick(self.comm.recv_into(src, tag, buf))
    }

    /// See [`crate::Communicator::sendrecv`].
    pub fn sendrecv<T: Pod, U: Pod>(
        &self,
        dst: impl Into<Rank>,
        send_tag: u32,
        data: &[T],
        src: impl Into<Rank>,
        recv_tag: u32,
    ) -> Result<Vec<U>> {
        self.block(self.comm.sendrecv(dst, send_tag, data, src, recv_tag))
    }

    /// Starts sending a copy of `data`.
    pub fn isend<T: Pod>(&self, dst: impl Into<Rank>, tag: u32, data: &[T]) -> Result<Request<()>> {
        refuse_nested()?;
        let _guard = self.rt.enter();
        Ok(Request {
            req: Some(self.comm.isend(dst, tag, data)),
            rt: Arc::clone(&self.rt),
        })
    }

    /// Starts receiving.
    pub fn irecv<T: Pod + Send>(&self, src: impl Into<Rank>, tag: u32) -> Result<Request<Vec<T>>> {
        refuse_nested()?;
        let _guard = self.rt.enter();
        Ok(Request {
            req: Some(self.comm.irecv(src, tag)),
            rt: Arc::clone(&self.rt),
        })
    }

    /// See [`crate::Communicator::send_value`].
    pub fn send_value<S: Serialize>(
        &self,
        dst: impl Into<Rank>,
        tag: u32,
        value: &S,
    ) -> Result<()> {
        self.block_quick(self.comm.send_value(dst, tag, value))
    }

    /// See [`crate::Communicator::recv_value`].
    pub fn recv_value<D: DeserializeOwned>(&self, src: impl Into<Rank>, tag: u32) -> Result<D> {
        self.block(self.comm.recv_value(src, tag))
    }

    /// See [`crate::Communicator::barrier`].
    pub fn barrier(&self) -> Result<()> {
        self.block(self.comm.barrier())
    }

    /// See [`crate::Communicator::bcast`].
    pub fn bcast<T: Pod>(&self, root: impl Into<Rank>, data: &[T]) -> Result<Vec<T>> {
        self.block(self.comm.bcast(root, data))
    }

    /// See [`crate::Communicator::bcast_into`].
    pub fn bcast_into<T: Pod>(&self, root: impl Into<Rank>, buf: &mut [T]) -> Result<()> {
        self.block(self.comm.bcast_into(root, buf))
    }

    /// See [`crate::Communicator::bcast_value`].
    pub fn bcast_value<S: Serialize + DeserializeOwned>(
        &self,
        root: impl Into<Rank>,
        value: Option<&S>,
    ) -> Result<S> {
        self.block(self.comm.bcast_value(root, value))
    }

    /// See [`crate::Communicator::gather`].
    pub fn gather<T: Pod>(&self, root: impl Into<Rank>, data: &[T]) -> Result<Option<Vec<T>>> {
        self.block(self.comm.gather(root, data))
    }

    /// See [`crate::Communicator::gatherv`].
    pub fn gatherv<T: Pod>(
        &self,
        root: impl Into<Rank>,
        data: &[T],
    ) -> Result<Option<Vec<Vec<T>>>> {
        self.block(self.comm.gatherv(root, data))
    }

    /// See [`crate::Communicator::gather_value`].
    pub fn gather_value<S: Serialize + DeserializeOwned>(
        &self,
        root: impl Into<Rank>,
        value: &S,
    ) -> Result<Option<Vec<S>>> {
        self.block(self.comm.gather_value(root, value))
    }

    /// See [`crate::Communicator::scatter`].
    pub fn scatter<T: Pod>(&self, root: impl Into<Rank>, data: &[T]) -> Result<Vec<T>> {
        self.block(self.comm.scatter(root, data))
    }

    /// See [`crate::Communicator::scatterv`].
    pub fn scatterv<T: Pod>(
        &self,
        root: impl Into<Rank>,
        data: &[T],
        counts: &[usize],
    ) -> Result<Vec<T>> {
        self.block(self.comm.scatterv(root, data, counts))
    }

    /// See [`crate::Communicator::allgather`].
    pub fn allgather<T: Pod>(&self, data: &[T]) -> Result<Vec<T>> {
        self.block(self.comm.allgather(data))
    }

    /// See [`crate::Communicator::allgather_into`].
    pub fn allgather_into<T: Pod>(&self, data: &[T], out: &mut [T]) -> Result<()> {
        self.block(self.comm.allgather_into(data, out))
    }

    /// See [`crate::Communicator::allgatherv`].
    pub fn allgatherv<T: Pod>(&self, data: &[T]) -> Result<Vec<Vec<T>>> {
        self.block(self.comm.allgatherv(data))
    }

    /// See [`crate::Communicator::allgather_value`].
    pub fn allgather_value<S: Serialize + DeserializeOwned>(&self, value: &S) -> Result<Vec<S>> {
        self.block(self.comm.allgather_value(value))
    }

    /// See [`crate::Communicator::alltoall`].
    pub fn alltoall<T: Pod>(&self, data: &[T]) -> Result<Vec<T>> {
        self.block(self.comm.alltoall(data))
    }

    /// See [`crate::Communicator::alltoallv`].
    pub fn alltoallv<T: Pod>(&self, data: &[T], counts: &[usize]) -> Result<Vec<Vec<T>>> {
        self.block(self.comm.alltoallv(data, counts))
    }

    /// See [`crate::Communicator::reduce`].
    pub fn reduce<T: Pod + Send + Sync>(
        &self,
        root: impl Into<Rank>,
        data: &[T],
        op: impl Into<Reduction<T>>,
    ) -> Result<Option<Vec<T>>> {
        self.block(self.comm.reduce(root, data, op))
    }

    /// See [`crate::Communicator::allreduce`].
    pub fn allreduce<T: Pod + Send + Sync>(
        &self,
        data: &[T],
        op: impl Into<Reduction<T>>,
    ) -> Result<Vec<T>> {
        self.block(self.comm.allreduce(data, op))
    }

    /// See [`crate::Communicator::allreduce_into`].
    pub fn allreduce_into<T: Pod + Send + Sync>(
        &self,
        data: &[T],
        out: &mut [T],
        op: impl Into<Reduction<T>>,
    ) -> Result<()> {
        self.block(self.comm.allreduce_into(data, out, op))
    }

    /// See [`crate::Communicator::reduce_scatter`].
    pub fn reduce_scatter<T: Pod + Send + Sync>(
        &self,
        data: &[T],
        op: impl Into<Reduction<T>>,
    ) -> Result<Vec<T>> {
        self.block(self.comm.reduce_scatter(data, op))
    }

    /// See [`crate::Communicator::scan`].
    pub fn scan<T: Pod + Send + Sync>(
        &self,
        data: &[T],
        op: impl Into<Reduction<T>>,
    ) -> Result<Vec<T>> {
        self.block(self.comm.scan(data, op))
    }

    /// See [`crate::Communicator::exscan`].
    pub fn exscan<T: Pod + Send + Sync>(
        &self,
        data: &[T],
        op: impl Into<Reduction<T>>,
    ) -> Result<Option<Vec<T>>> {
        self.block(self.comm.exscan(data, op))
    }
}

/// The blocking communicators of an in-process job over the memory channel (index = rank); use
/// one thread per rank.
pub fn local_world(size: u32) -> Result<Vec<Communicator>> {
    local_world_with(size, Config::default())
}

/// Like [`local_world`] with a configuration.
pub fn local_world_with(size: u32, config: Config) -> Result<Vec<Communicator>> {
    let rt = Arc::new(Engine::new()?);
    Ok(crate::comm::local_world_with(size, config)?
        .into_iter()
        .map(|comm| Communicator {
            comm,
            rt: Arc::clone(&rt),
        })
        .collect())
}
