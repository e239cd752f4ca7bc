//! Python buffers (numpy arrays, `bytearray`, `array.array`, `memoryview`, ...) as typed Rust
//! slices, without copies: the datatype comes from the buffer's format, and the checks here
//! (C-contiguous, writable where written, aligned, a supported element type) make the slices
//! sound to form.

use std::borrow::Cow;
use std::mem::{align_of, size_of};

use pyo3::buffer::PyUntypedBuffer;
use pyo3::prelude::*;

use crate::errors::invalid;

/// An element type a buffer can hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Dt {
    Bool,
    I8,
    I16,
    I32,
    I64,
    U8,
    U16,
    U32,
    U64,
    F32,
    F64,
}

impl Dt {
    /// The datatype of a buffer with struct-module `format` and `itemsize`.
    fn from_format(format: &[u8], itemsize: usize) -> Option<Dt> {
        let code = match format {
            [c] | [b'@' | b'=', c] => *c,
            #[cfg(target_endian = "little")]
            [b'<', c] => *c,
            #[cfg(target_endian = "big")]
            [b'>' | b'!', c] => *c,
            _ => return None,
        };
        let dt = match (code, itemsize) {
            (b'?', 1) => Dt::Bool,
            (b'b', 1) => Dt::I8,
            (b'B' | b'c', 1) => Dt::U8,
            (b'h' | b'i' | b'l' | b'q' | b'n', 2) => Dt::I16,
            (b'h' | b'i' | b'l' | b'q' | b'n', 4) => Dt::I32,
            (b'h' | b'i' | b'l' | b'q' | b'n', 8) => Dt::I64,
            (b'H' | b'I' | b'L' | b'Q' | b'N', 2) => Dt::U16,
            (b'H' | b'I' | b'L' | b'Q' | b'N', 4) => Dt::U32,
            (b'H' | b'I' | b'L' | b'Q' | b'N', 8) => Dt::U64,
            (b'f', 4) => Dt::F32,
            (b'd', 8) => Dt::F64,
            _ => return None,
        };
        Some(dt)
    }

    /// The numpy name of the type (also what user ops receive).
    pub(crate) const fn name(self) -> &'static str {
        match self {
            Dt::Bool => "bool",
            Dt::I8 => "int8",
            Dt::I16 => "int16",
            Dt::I32 => "int32",
            Dt::I64 => "int64",
            Dt::U8 => "uint8",
            Dt::U16 => "uint16",
            Dt::U32 => "uint32",
            Dt::U64 => "uint64",
            Dt::F32 => "float32",
            Dt::F64 => "float64",
        }
    }

    /// The size of one element in bytes.
    pub(crate) const fn size(self) -> usize {
        match self {
            Dt::Bool | Dt::I8 | Dt::U8 => 1,
            Dt::I16 | Dt::U16 => 2,
            Dt::I32 | Dt::U32 | Dt::F32 => 4,
            Dt::I64 | Dt::U64 | Dt::F64 => 8,
        }
    }
}

/// Runs `$body` with `$t` bound to the Rust type of `$dt` (`bool` travels as `u8`).
macro_rules! with_type {
    ($dt:expr, |$t:ident| $body:expr) => {
        match $dt {
            $crate::buffer::Dt::Bool | $crate::buffer::Dt::U8 => {
                type $t = u8;
                $body
            }
            $crate::buffer::Dt::I8 => {
                type $t = i8;
                $body
            }
            $crate::buffer::Dt::I16 => {
                type $t = i16;
                $body
            }
            $crate::buffer::Dt::I32 => {
                type $t = i32;
                $body
            }
            $crate::buffer::Dt::I64 => {
                type $t = i64;
                $body
            }
            $crate::buffer::Dt::U16 => {
                type $t = u16;
                $body
            }
            $crate::buffer::Dt::U32 => {
                type $t = u32;
                $body
            }
            $crate::buffer::Dt::U64 => {
                type $t = u64;
                $body
            }
            $crate::buffer::Dt::F32 => {
                type $t = f32;
                $body
            }
            $crate::buffer::Dt::F64 => {
                type $t = f64;
                $body
            }
        }
    };
}
pub(crate) use with_type;

/// A checked, exported buffer. The export keeps the memory alive and in place until dropped.
pub(crate) struct Buf {
    buf: PyUntypedBuffer,
    pub(crate) dt: Dt,
    pub(crate) count: usize,
}

impl Buf {
    /// Exports `obj`'s buffer, checking it can be used as `what` (written if `writable`).
    pub(crate) fn get(obj: &Bound<'_, PyAny>, writable: bool, what: &str) -> PyResult<Buf> {
        let py = obj.py();
        let buf = PyUntypedBuffer::get(obj).map_err(|e| {
            invalid(
                py,
                format!("{what} does not support the buffer protocol ({e}); pass a numpy array, bytearray or memoryview"),
            )
        })?;
        if !buf.is_c_contiguous() {
            return Err(invalid(
                py,
                format!(
                    "{what} is not C-contiguous; pass a contiguous array (numpy.ascontiguousarray)"
                ),
            ));
        }
        if writable && buf.readonly() {
            return Err(invalid(py, format!("{what} is read-only")));
        }
        let format = buf.format().to_bytes();
        let dt = Dt::from_format(format, buf.item_size()).ok_or_else(|| {
            invalid(
                py,
                format!(
                    "{what} has elements of format {:?} ({} bytes), which fmi does not move; use \
                     bool, int8...int64, uint8...uint64, float32 or float64",
                    String::from_utf8_lossy(format),
                    buf.item_size()
                ),
            )
        })?;
        let count = buf.item_count();
        if count > 0 && !(buf.buf_ptr() as usize).is_multiple_of(dt.size()) {
            return Err(invalid(
                py,
                format!("{what} is not aligned for {}", dt.name()),
            ));
        }
        Ok(Buf { buf, dt, count })
    }

    /// The buffer's memory.
    fn ptr(&self) -> *mut u8 {
        self.buf.buf_ptr().cast()
    }

    /// The elements, read-only.
    ///
    /// # Safety
    /// `T` must be the Rust type of `self.dt` (as `with_type!` gives it), nothing may write the
    /// memory while the slice lives (no `slice_mut` of an overlapping buffer, no other thread).
    pub(crate) unsafe fn slice<T>(&self) -> &[T] {
        debug_assert_eq!(size_of::<T>(), self.dt.size());
        debug_assert_eq!(align_of::<T>(), self.dt.size());
        if self.count == 0 {
            return &[];
        }
        // SAFETY: the export keeps `count` contiguous, aligned (checked in `get`) elements of
        // this type alive at `ptr` for as long as `self`; the caller guarantees no writes.
        unsafe { std::slice::from_raw_parts(self.ptr().cast::<T>(), self.count) }
    }

    /// The elements, writable.
    ///
    /// # Safety
    /// As [`Buf::slice`], and no other slice of the memory may live at the same time; the buffer
    /// was exported with `writable`.
    #[allow(clippy::mut_from_ref)]
    pub(crate) unsafe fn slice_mut<T>(&self) -> &mut [T] {
        debug_assert_eq!(size_of::<T>(), self.dt.size());
        if self.count == 0 {
            return &mut [];
        }
        // SAFETY: as in `slice`; writable was checked in `get`, exclusivity is the caller's
        // guarantee.
        unsafe { std::slice::from_raw_parts_mut(self.ptr().cast::<T>(), self.count) }
    }

    /// The raw bytes, read-only (for point-to-point sends: the wire carries bytes).
    ///
    /// # Safety
    /// Nothing may write the memory while the slice lives.
    pub(crate) unsafe fn bytes(&self) -> &[u8] {
        if self.count == 0 {
            return &[];
        }
        // SAFETY: the export keeps `count * size` contiguous bytes alive at `ptr`.
        unsafe { std::slice::from_raw_parts(self.ptr(), self.count * self.dt.size()) }
    }

    /// Copies `data` (whole elements of this buffer's type) to the start of the buffer.
    ///
    /// # Safety
    /// The buffer was exported `writable`, and no slice of it lives.
    pub(crate) unsafe fn write_bytes(&self, data: &[u8]) {
        debug_assert!(data.len() <= self.count * self.dt.size());
        if !data.is_empty() {
            // SAFETY: the caller guarantees a writable buffer with no live slices, and `data`
            // fits (checked by the callers); `data` is a separate allocation.
            unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr(), data.len()) };
        }
    }

    fn overlaps(&self, other: &Buf) -> bool {
        let (a, b) = (self.ptr() as usize, other.ptr() as usize);
        let (a_len, b_len) = (self.count * self.dt.size(), other.count * other.dt.size());
        a_len > 0 && b_len > 0 && a < b + b_len && b < a + a_len
    }
}

/// The input and output slices of a collective. `send` is `None` for `fmi.IN_PLACE` (the input
/// is the output buffer's contents); overlapping buffers are copied first so that the two slices
/// never alias.
///
/// # Safety
/// `T` is the type of both buffers' datatype; nothing else touches them while the slices live.
// The mutable slice borrows the exported memory, not `Buf` itself (see `Buf::slice_mut`).
#[allow(clippy::mut_from_ref)]
pub(crate) unsafe fn in_out<'a, T: Copy>(
    send: Option<&'a Buf>,
    recv: &'a Buf,
) -> (Cow<'a, [T]>, &'a mut [T]) {
    match send {
        Some(s) if !s.overlaps(recv) => {
            // SAFETY: disjoint memory; the caller's guarantee for the rest.
            let input = unsafe { s.slice::<T>() };
            // SAFETY: as above.
            (Cow::Borrowed(input), unsafe { recv.slice_mut::<T>() })
        }
        _ => {
            let source = send.unwrap_or(recv);
            // SAFETY: the shared slice is dropped (after the copy) before the mutable one is
            // made.
            let copy = unsafe { source.slice::<T>() }.to_vec();
            // SAFETY: no other slice of this memory lives now.
            (Cow::Owned(copy), unsafe { recv.slice_mut::<T>() })
        }
    }
}

/// Checks that two buffers of one collective have the same datatype.
pub(crate) fn same_type(py: Python<'_>, a: &Buf, b: &Buf) -> PyResult<()> {
    if a.dt == b.dt {
        Ok(())
    } else {
        Err(invalid(
            py,
            format!(
                "sendbuf holds {} but recvbuf holds {}; both must have the same element type",
                a.dt.name(),
                b.dt.name()
            ),
        ))
    }
}
