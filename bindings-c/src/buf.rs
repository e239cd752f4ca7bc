//! Turning the caller's (pointer, count) pairs into slices, with the checks that keep a bad
//! argument from becoming undefined behaviour: NULL with a count > 0, misalignment, sizes that
//! overflow, and input and output buffers that overlap.

use std::borrow::Cow;
use std::ffi::c_void;
use std::mem::{align_of, size_of};

use fmi::Rank;

use crate::status::Failure;

fn check<T>(ptr: *const c_void, count: usize, what: &str) -> Result<(), Failure> {
    if count == 0 {
        return Ok(());
    }
    if ptr.is_null() {
        return Err(Failure::invalid(format!(
            "{what} is NULL but its count is {count}"
        )));
    }
    if !(ptr as usize).is_multiple_of(align_of::<T>()) {
        return Err(Failure::invalid(format!(
            "{what} ({ptr:p}) is not aligned for elements of {} bytes",
            size_of::<T>()
        )));
    }
    match count.checked_mul(size_of::<T>()) {
        Some(bytes) if isize::try_from(bytes).is_ok() => Ok(()),
        _ => Err(Failure::invalid(format!(
            "{what}: count {count} is too large"
        ))),
    }
}

/// The caller's input buffer of `count` elements.
///
/// # Safety
/// When `count > 0` and `ptr` is not NULL, `ptr` must point to `count` initialized elements of
/// `T` that nobody writes during `'a`.
pub(crate) unsafe fn input<'a, T>(
    ptr: *const c_void,
    count: usize,
    what: &str,
) -> Result<&'a [T], Failure> {
    check::<T>(ptr, count, what)?;
    if count == 0 {
        return Ok(&[]);
    }
    // SAFETY: `ptr` is non-NULL, aligned and `count` elements fit in isize (checked above);
    // the caller guarantees the memory is valid and not written during 'a.
    Ok(unsafe { std::slice::from_raw_parts(ptr.cast::<T>(), count) })
}

/// The caller's output buffer of `count` elements.
///
/// # Safety
/// When `count > 0` and `ptr` is not NULL, `ptr` must point to `count` writable elements of `T`
/// that nobody else accesses during `'a`.
pub(crate) unsafe fn output<'a, T>(
    ptr: *mut c_void,
    count: usize,
    what: &str,
) -> Result<&'a mut [T], Failure> {
    check::<T>(ptr, count, what)?;
    if count == 0 {
        return Ok(&mut []);
    }
    // SAFETY: as in `input`, and the caller guarantees exclusive access during 'a.
    Ok(unsafe { std::slice::from_raw_parts_mut(ptr.cast::<T>(), count) })
}

fn overlaps<T>(a: *const c_void, a_count: usize, b: *const c_void, b_count: usize) -> bool {
    let (a, b) = (a as usize, b as usize);
    let (a_len, b_len) = (a_count * size_of::<T>(), b_count * size_of::<T>());
    a_len > 0 && b_len > 0 && a < b.saturating_add(b_len) && b < a.saturating_add(a_len)
}

/// An input and an output buffer of one call. When they overlap (the same buffer passed as
/// both, as `MPI_IN_PLACE` would), the input is copied first, so the two slices never alias.
///
/// # Safety
/// The conditions of [`input`] and [`output`] for the two buffers, except that they may overlap.
pub(crate) unsafe fn input_output<'a, T: Copy>(
    inp: *const c_void,
    in_count: usize,
    in_what: &str,
    out: *mut c_void,
    out_count: usize,
    out_what: &str,
) -> Result<(Cow<'a, [T]>, &'a mut [T]), Failure> {
    check::<T>(inp, in_count, in_what)?;
    check::<T>(out, out_count, out_what)?;
    if overlaps::<T>(inp, in_count, out, out_count) {
        // SAFETY: the shared slice lives only until `to_vec` returns, before the mutable one is
        // made; validity is the caller's guarantee.
        let copy = unsafe { input::<T>(inp, in_count, in_what) }?.to_vec();
        // SAFETY: the caller's guarantee; no other slice of this memory is alive.
        let out = unsafe { output::<T>(out, out_count, out_what) }?;
        Ok((Cow::Owned(copy), out))
    } else {
        // SAFETY: the caller's guarantees, and the two regions are disjoint.
        let inp = unsafe { input::<T>(inp, in_count, in_what) }?;
        // SAFETY: as above.
        let out = unsafe { output::<T>(out, out_count, out_what) }?;
        Ok((Cow::Borrowed(inp), out))
    }
}

/// A counts or displacements array with one entry per rank.
///
/// # Safety
/// A non-NULL `ptr` must point to `n` readable `size_t` values.
pub(crate) unsafe fn per_rank<'a>(
    ptr: *const usize,
    n: usize,
    what: &str,
) -> Result<&'a [usize], Failure> {
    if ptr.is_null() {
        return Err(Failure::invalid(format!(
            "{what} is NULL; it needs one entry per rank"
        )));
    }
    // SAFETY: the caller guarantees `n` readable values; `input` checks NULL and alignment.
    unsafe { input::<usize>(ptr.cast(), n, what) }
}

/// Where each rank's block sits in a v-variant buffer: offsets from `displs` (or packed one after
/// another when it is NULL), and the number of elements the buffer must hold.
pub(crate) struct Layout {
    pub(crate) offsets: Vec<usize>,
    pub(crate) extent: usize,
}

impl Layout {
    /// # Safety
    /// A non-NULL `displs` must point to `counts.len()` readable `size_t` values.
    pub(crate) unsafe fn new(
        counts: &[usize],
        displs: *const usize,
        what: &str,
    ) -> Result<Layout, Failure> {
        let too_large = || Failure::invalid(format!("{what}: counts and displacements overflow"));
        let offsets = if displs.is_null() {
            let mut at = 0usize;
            let mut offsets = Vec::with_capacity(counts.len());
            for c in counts {
                offsets.push(at);
                at = at.checked_add(*c).ok_or_else(too_large)?;
            }
            offsets
        } else {
            // SAFETY: the caller's guarantee.
            unsafe { per_rank(displs, counts.len(), what) }?.to_vec()
        };
        let mut extent = 0usize;
        for (o, c) in offsets.iter().zip(counts) {
            extent = extent.max(o.checked_add(*c).ok_or_else(too_large)?);
        }
        Ok(Layout { offsets, extent })
    }

    /// Whether the blocks are packed one after another from offset 0.
    fn is_packed(&self, counts: &[usize]) -> bool {
        let mut at = 0;
        self.offsets.iter().zip(counts).all(|(o, c)| {
            let ok = *o == at;
            at += c;
            ok
        })
    }

    /// The blocks of `data` one after another (borrowed when they already are).
    pub(crate) fn pack<'a, T: Copy>(&self, data: &'a [T], counts: &[usize]) -> Cow<'a, [T]> {
        if self.is_packed(counts) {
            Cow::Borrowed(&data[..self.extent])
        } else {
            let mut packed = Vec::with_capacity(counts.iter().sum());
            for (o, c) in self.offsets.iter().zip(counts) {
                packed.extend_from_slice(&data[*o..o + c]);
            }
            Cow::Owned(packed)
        }
    }

    /// Copies `parts[r]` to its place in `out`; each must hold exactly `counts[r]` elements.
    pub(crate) fn place<T: Copy>(
        &self,
        me: Rank,
        what: &'static str,
        parts: Vec<Vec<T>>,
        counts: &[usize],
        out: &mut [T],
    ) -> Result<(), Failure> {
        for (r, part) in parts.into_iter().enumerate() {
            if part.len() != counts[r] {
                return Err(fmi::Error::CountMismatch {
                    me,
                    peer: Rank(r as u32),
                    what,
                    expected: counts[r],
                    got: part.len(),
                }
                .into());
            }
            let at = self.offsets[r];
            out[at..at + part.len()].copy_from_slice(&part);
        }
        Ok(())
    }
}

/// Copies a received vector into the caller's buffer, which must hold exactly `out.len()`.
pub(crate) fn copy_exact<T: Copy>(
    me: Rank,
    peer: Rank,
    what: &'static str,
    got: &[T],
    out: &mut [T],
) -> Result<(), Failure> {
    if got.len() != out.len() {
        return Err(fmi::Error::CountMismatch {
            me,
            peer,
            what,
            expected: out.len(),
            got: got.len(),
        }
        .into());
    }
    out.copy_from_slice(got);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn null_with_count_is_refused_and_empty_is_fine() {
        // SAFETY: NULL with count 0 is never dereferenced.
        assert!(unsafe { input::<u32>(std::ptr::null(), 0, "buf") }.is_ok());
        // SAFETY: the NULL check fails before any dereference.
        let e = unsafe { input::<u32>(std::ptr::null(), 3, "buf") }.expect_err("null");
        assert!(e.to_string().contains("buf is NULL"), "{e}");
    }

    #[test]
    fn misaligned_and_overflowing_buffers_are_refused() {
        let v = [0u64; 2];
        let p = v.as_ptr().cast::<u8>().wrapping_add(1).cast::<c_void>();
        // SAFETY: the alignment check fails before any dereference.
        assert!(unsafe { input::<u64>(p, 1, "buf") }.is_err());
        // SAFETY: the size check fails before any dereference.
        assert!(unsafe { input::<u64>(v.as_ptr().cast(), usize::MAX / 4, "buf") }.is_err());
    }

    #[test]
    fn overlapping_buffers_are_copied() {
        let mut v = [1i32, 2, 3];
        let p = v.as_mut_ptr().cast::<c_void>();
        // SAFETY: `v` holds 3 elements and is not otherwise used while the slices live.
        let (i, o) = unsafe { input_output::<i32>(p, 3, "in", p, 3, "out") }.expect("valid");
        assert!(matches!(i, Cow::Owned(_)));
        o[0] = 9;
        assert_eq!(i[0], 1);
    }

    #[test]
    fn layouts_pack_and_place() {
        let counts = [1, 2, 0];
        let displs = [4usize, 0, 9];
        // SAFETY: `displs` holds one entry per rank.
        let l = unsafe { Layout::new(&counts, displs.as_ptr(), "displs") }.expect("valid");
        assert_eq!(l.extent, 9);
        let data = [10, 11, 12, 13, 14, 15, 16, 17, 18];
        assert_eq!(&*l.pack(&data, &counts), &[14, 10, 11]);
        let mut out = [0; 9];
        l.place(
            Rank(0),
            "t",
            vec![vec![1], vec![2, 3], vec![]],
            &counts,
            &mut out,
        )
        .expect("fits");
        assert_eq!(out, [2, 3, 0, 0, 1, 0, 0, 0, 0]);
        // SAFETY: NULL displacements are never read.
        let packed = unsafe { Layout::new(&counts, std::ptr::null(), "displs") }.expect("valid");
        assert_eq!((packed.offsets.clone(), packed.extent), (vec![0, 1, 3], 3));
        assert!(matches!(packed.pack(&data, &counts), Cow::Borrowed(_)));
    }
}
