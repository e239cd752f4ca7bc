//! # fmi: MPI-style message passing between serverless functions and HPC jobs
//!
//! fmi gives short-lived functions that cannot accept inbound connections `send`/`recv` and
//! every MPI collective, over pluggable channels (direct TCP through a rendezvous server,
//! in-memory for tests, and storage or RDMA backends).
//!
//! ```text
//!  your code ── fmi::blocking::Communicator (owns a runtime thread; C and Python wrap it)
//!       │                 │
//!       └──────── fmi::Communicator (async): ranks, job, deadlines, sequence numbers → tags,
//!                         │                  datatypes (Pod, serde) and reductions (Op, UserOp)
//!                 fmi-collectives: algorithms over point-to-point
//!                         │
//!                 fmi-channels: dyn Channel (memory, tcp, …)
//! ```
//!
//! ## A first program
//! ```
//! use fmi::{local_world, Op};
//!
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! let world = local_world(4)?;                 // 4 ranks in this process
//! let sums = futures::future::try_join_all(world.iter().map(|comm| async move {
//!     let mine = [comm.rank().0 as u64 + 1];
//!     comm.allreduce(&mine, Op::Sum).await      // every rank gets 1+2+3+4
//! }))
//! .await?;
//! assert!(sums.iter().all(|s| s == &[10]));
//! # Ok::<(), fmi::Error>(()) }).unwrap();
//! ```
//! A real job runs one process per rank under `fmi run -n N -- PROGRAM` and calls
//! [`Communicator::from_env`] (or [`blocking::Communicator::from_env`]).
//!
//! ## Rules, as in MPI
//! - Every rank calls the collectives in the same order with matching arguments. Each call takes
//!   the communicator's next operation sequence number and derives its message tags from it, so
//!   collectives never collide with each other or with point-to-point traffic.
//! - Messages from one rank to another with the same tag arrive in the order sent.
//! - Every blocking call has a deadline ([`Config::deadline`], [`Communicator::with_deadline`]);
//!   a dead or silent peer becomes [`Error::Timeout`] or [`Error::PeerLost`] naming its rank.
//! - Input buffers are never modified.

mod alloc;
pub mod blocking;
mod bootstrap;
mod comm;
pub mod config;
mod env;
pub mod ledger;
mod mixed;
pub mod op;
#[cfg(feature = "rdma")]
mod rdma;
pub mod storage;

pub use comm::{
    local_world, local_world_with, Builder, Communicator, NoChannel, Request, WithChannel,
};
pub use config::{Config, DirectTransport};
pub use env::{EnvSettings, NatMode};
pub use fmi_channels::{
    host_cores, Channel, Error, JobId, PathKind, Rank, Result, Tag, HOST_CPUS_ENV,
};
pub use fmi_collectives::{AllgatherAlgorithm, AllreduceAlgorithm, BcastAlgorithm};
pub use op::{Numeric, Op, Reduction, UserOp};

/// The cost model that picks a channel per operation (see [`Communicator::channel_for`]).
pub use fmi_model as model;

/// Re-exported so users can derive `Pod` for their `#[repr(C)]` types.
pub use bytemuck;
