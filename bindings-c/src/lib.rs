//! # fmi-c: the C API of fmi
//!
//! `libfmi.so` / `libfmi.a` and `include/fmi.h`, a C ABI over [`fmi::blocking::Communicator`]
//! with MPI's names and arguments:
//!
//! ```text
//!  C program ── #include <fmi.h> ── -lfmi
//!                                     │  every entry point: catch_unwind, argument checks
//!                                     │  (NULL, datatype, rank, alignment, sizes, aliasing),
//!                                     │  fmi::Error → fmi_status + fmi_last_error()
//!                       fmi::blocking::Communicator (owns its runtime thread)
//! ```
//!
//! - Handles are opaque pointers: `fmi_comm*` (a communicator), `fmi_request*` (a pending
//!   `fmi_isend`/`fmi_irecv`), `fmi_op*` (a reduction; the built-ins `FMI_SUM` ... `FMI_BXOR` are
//!   static objects, user ops come from `fmi_op_create`).
//! - Every function returns an [`fmi_status`]; on failure `fmi_last_error()` holds a message
//!   naming the function, the ranks involved and what to do. A panic inside fmi becomes
//!   `FMI_ERR_PANIC`; it never unwinds into C.
//! - Buffers are `(pointer, count, datatype)` as in MPI; a NULL pointer with a count > 0, an
//!   unknown datatype, a misaligned buffer or a rank outside the job is an error code, never a
//!   crash.
//!
//! `include/fmi.h` is generated from this crate by cbindgen (see `build.rs`) and committed; the
//! `header` test fails when it is stale (`FMI_BLESS=1 cargo test -p fmi-c --test header`
//! rewrites it).

// An FFI crate reads and writes through the caller's pointers: every `unsafe` block says why
// that is sound (`clippy::undocumented_unsafe_blocks`).
#![allow(unsafe_code)]
#![deny(unsafe_op_in_unsafe_fn)]
#![warn(clippy::undocumented_unsafe_blocks)]
// C names: `fmi_comm`, `fmi_status::FMI_OK`, `fmi_op_sum`.
#![allow(non_camel_case_types, non_upper_case_globals)]

mod buf;
pub mod coll;
pub mod comm;
pub mod status;
pub mod types;

pub use comm::{fmi_comm, fmi_request};
pub use status::fmi_status;
pub use types::{fmi_datatype, fmi_op, fmi_user_function};
