//! # fmi-rdma: fmi's RDMA channel over libfabric
//!
//! On HPC systems (InfiniBand verbs, AWS EFA, HPE Slingshot CXI) ranks talk over RDMA through
//! libfabric (OFI), as MPI and NCCL do. This crate has two layers:
//!
//! * [`fabric`]: a small safe wrapper over the bindings of `fmi-fabric-sys` (fabric, domain,
//!   endpoint, address vector, completion queue, memory registration), each type owning its
//!   object and closing it in order;
//! * [`channel`]: [`RdmaChannel`], an `fmi_channels::Channel` over one `FI_EP_RDM` endpoint with
//!   `FI_TAGGED` and `FI_RMA`: eager messages from registered bounce buffers, a rendezvous
//!   (RTS carrying address, key and length, then `fi_read` by the receiver, then FIN) for large
//!   ones, and a dedicated poller thread driving progress.
//!
//! Everything is behind the crate feature `libfabric` (the workspace feature `rdma` turns it on),
//! because it needs libfabric's headers and libclang to build. See `docs/rdma.md`.

// FFI: the wrapper and the channel's poller call libfabric and hand it raw buffers and contexts.
// Every unsafe block says why it is sound; nothing unsafe leaks through the public API except the
// documented `unsafe fn`s of `fabric`, whose contracts the channel upholds.
#![cfg_attr(feature = "libfabric", allow(unsafe_code))]

#[cfg(feature = "libfabric")]
pub mod channel;
#[cfg(feature = "libfabric")]
pub mod fabric;

#[cfg(feature = "libfabric")]
pub use channel::{local_world, RdmaBinding, RdmaChannel, RdmaConfig};
#[cfg(feature = "libfabric")]
pub use fabric::FabricError;
