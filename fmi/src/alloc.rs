//! Large allocations without a page fault per page, every time (glibc only).
//!
//! A collective returns its result in a fresh `Vec`, and its steps receive into fresh `Vec`s.
//! glibc serves an allocation of 128 KiB or more (its initial, then dynamically raised, mmap
//! threshold) with a fresh `mmap` and unmaps it on free, and returns freed memory at the top of
//! its heaps to the kernel past a trim threshold: either way the next large allocation touches
//! new pages, and every page faults. Measured on the project's 2-vCPU VM (docs/benchmarks.md,
//! session 10): a 2-rank 1 MiB TCP allreduce through the blocking API took 1.54–1.57 ms, and
//! 0.45–0.59 ms with glibc's mmap threshold raised (the TCP exchange alone: 0.52 ms); an
//! `f32` sum into a freshly allocated 1 MiB vector ran at 1.7 GB/s against 16 GB/s in cache.
//!
//! So when a process joins its first job, fmi raises glibc's mmap threshold to
//! [`MMAP_THRESHOLD`] and its trim threshold to [`TRIM_THRESHOLD`] (as MPI libraries for RDMA
//! networks have long done to keep memory registered): blocks below 32 MiB then come from the
//! heap and stay there for the next message. The price is memory that is not given back to the
//! kernel while the process runs — up to the trim threshold above what it uses at any time.
//! `FMI_TUNE_MALLOC=0` leaves glibc's settings alone (as do other C libraries, where this does
//! nothing).

use std::sync::OnceLock;

/// The environment variable that turns the tuning off (`0`).
pub(crate) const TUNE_ENV: &str = "FMI_TUNE_MALLOC";

/// Allocations below this come from the heap: glibc's largest allowed value on 64-bit (half
/// its 64 MiB arena heaps).
pub(crate) const MMAP_THRESHOLD: usize = 32 << 20;

/// Free memory at the top of a heap is returned to the kernel only beyond this.
pub(crate) const TRIM_THRESHOLD: usize = 128 << 20;

/// Applies the tuning once per process, unless `FMI_TUNE_MALLOC=0`. Returns whether the
/// process's allocator is tuned (`false` where it is not glibc or the variable says no).
pub(crate) fn tune() -> bool {
    static TUNED: OnceLock<bool> = OnceLock::new();
    *TUNED.get_or_init(|| {
        if std::env::var(TUNE_ENV).is_ok_and(|v| v.trim() == "0") {
            return false;
        }
        let tuned = apply();
        if !tuned {
            tracing::debug!("fmi: the allocator's thresholds were not changed");
        }
        tuned
    })
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn apply() -> bool {
    let value = |v: usize| libc::c_int::try_from(v).unwrap_or(libc::c_int::MAX);
    // SAFETY: `mallopt` only sets glibc's malloc parameters; it takes the allocator's lock
    // and is safe to call from any thread at any time.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, value(MMAP_THRESHOLD)) == 1
            && libc::mallopt(libc::M_TRIM_THRESHOLD, value(TRIM_THRESHOLD)) == 1
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn apply() -> bool {
    false
}

#[cfg(all(test, target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
mod tests {
    /// Blocks glibc has served with `mmap` and not yet unmapped.
    fn mapped_blocks() -> usize {
        // SAFETY: `mallinfo2` only reads the allocator's statistics.
        unsafe { libc::mallinfo2() }.hblks
    }

    #[test]
    fn after_tuning_a_megabyte_comes_from_the_heap() {
        if std::env::var(super::TUNE_ENV).is_ok_and(|v| v.trim() == "0") {
            return;
        }
        assert!(super::tune(), "glibc accepts the thresholds");
        assert!(super::tune(), "and says so again");
        let before = mapped_blocks();
        let held: Vec<Vec<u8>> = (0..8).map(|i| vec![i as u8; 1 << 20]).collect();
        let after = mapped_blocks();
        assert!(
            after < before + held.len(),
            "{} of {} 1 MiB blocks were mapped afresh",
            after.saturating_sub(before),
            held.len()
        );
    }
}
