//! # fmi-fabric-sys: raw libfabric bindings
//!
//! Generated at build time by bindgen from the libfabric headers found by pkg-config (Debian 12
//! ships 1.17; the published `ofi-libfabric-sys` needs 2.x headers). The `static inline` calls of
//! the headers (`fi_tsend`, `fi_cq_read`, `fi_close`, ...) are reached through C wrappers that
//! bindgen's `wrap_static_fns` generates and `cc` compiles, so they are callable under their own
//! names. A few macros bindgen cannot translate (`FI_VERSION`, `FI_ADDR_UNSPEC`, ...) are
//! written out below. Use the safe wrapper `fmi-rdma` instead of this crate.

// FFI bindings are unsafe by nature; this crate is nothing but them.
#![allow(unsafe_code)]
#![allow(
    non_upper_case_globals,
    non_camel_case_types,
    non_snake_case,
    missing_docs,
    unreachable_pub,
    clippy::all,
    clippy::unwrap_used,
    clippy::expect_used
)]

#[cfg(feature = "bind")]
include!(concat!(env!("OUT_DIR"), "/bindings.rs"));

/// `FI_VERSION(major, minor)`: a function-like macro in `fabric.h`.
pub const fn make_version(major: u32, minor: u32) -> u32 {
    (major << 16) | minor
}

#[cfg(feature = "bind")]
/// `FI_ADDR_UNSPEC`: `((uint64_t) -1)`, a cast bindgen skips.
pub const FI_ADDR_UNSPEC: fi_addr_t = u64::MAX;
#[cfg(feature = "bind")]
/// `FI_ADDR_NOTAVAIL`: also `((uint64_t) -1)`.
pub const FI_ADDR_NOTAVAIL: fi_addr_t = u64::MAX;
/// `FI_KEY_NOTAVAIL`: `((uint64_t) -1)`.
pub const FI_KEY_NOTAVAIL: u64 = u64::MAX;

#[cfg(all(test, feature = "bind"))]
mod tests {
    use super::*;

    #[test]
    fn links_and_reports_a_version() {
        // fi_version() is a real symbol; a 1.x or 2.x library is expected.
        let v = unsafe { fi_version() };
        assert!(v >> 16 >= 1, "libfabric version {v:#x}");
        assert!(FI_TAGGED != 0 && FI_RMA != 0);
    }
}
