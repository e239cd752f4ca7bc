//! Datatypes and reduction operations.
//!
//! Datatypes are plain `int` constants rather than a C enum: a value coming *from* C is checked
//! before use, so an out-of-range number is an `FMI_ERR_INVALID_ARGUMENT`, never undefined
//! behaviour. Built-in ops are static `fmi_op` objects (`FMI_SUM` is `&fmi_op_sum`), so built-in
//! and user ops travel through the same `const fmi_op*` argument, as `MPI_Op` handles do.

use std::ffi::{c_int, c_void};

use fmi::{Numeric, Op, Reduction, UserOp};

use crate::fmi_status;
use crate::status::{guard, Failure};

/// A datatype: one of the `FMI_BYTE` ... `FMI_FLOAT64` constants.
pub type fmi_datatype = c_int;

/// Raw bytes. Reductions on bytes: only `FMI_BAND`, `FMI_BOR`, `FMI_BXOR` and user ops.
pub const FMI_BYTE: fmi_datatype = 1;
/// `int8_t`.
pub const FMI_INT8: fmi_datatype = 2;
/// `int16_t`.
pub const FMI_INT16: fmi_datatype = 3;
/// `int32_t`.
pub const FMI_INT32: fmi_datatype = 4;
/// `int64_t`.
pub const FMI_INT64: fmi_datatype = 5;
/// `uint8_t`.
pub const FMI_UINT8: fmi_datatype = 6;
/// `uint16_t`.
pub const FMI_UINT16: fmi_datatype = 7;
/// `uint32_t`.
pub const FMI_UINT32: fmi_datatype = 8;
/// `uint64_t`.
pub const FMI_UINT64: fmi_datatype = 9;
/// `float` (IEEE 754 binary32).
pub const FMI_FLOAT32: fmi_datatype = 10;
/// `double` (IEEE 754 binary64).
pub const FMI_FLOAT64: fmi_datatype = 11;

/// A checked datatype.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Dt {
    Byte,
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
    /// Checks a datatype given by C.
    pub(crate) fn from_c(dt: fmi_datatype) -> Result<Dt, Failure> {
        Ok(match dt {
            FMI_BYTE => Dt::Byte,
            FMI_INT8 => Dt::I8,
            FMI_INT16 => Dt::I16,
            FMI_INT32 => Dt::I32,
            FMI_INT64 => Dt::I64,
            FMI_UINT8 => Dt::U8,
            FMI_UINT16 => Dt::U16,
            FMI_UINT32 => Dt::U32,
            FMI_UINT64 => Dt::U64,
            FMI_FLOAT32 => Dt::F32,
            FMI_FLOAT64 => Dt::F64,
            other => {
                return Err(Failure::invalid(format!(
                    "datatype {other} is not an fmi_datatype (use FMI_BYTE ... FMI_FLOAT64)"
                )))
            }
        })
    }

    /// The C constant.
    pub(crate) const fn to_c(self) -> fmi_datatype {
        match self {
            Dt::Byte => FMI_BYTE,
            Dt::I8 => FMI_INT8,
            Dt::I16 => FMI_INT16,
            Dt::I32 => FMI_INT32,
            Dt::I64 => FMI_INT64,
            Dt::U8 => FMI_UINT8,
            Dt::U16 => FMI_UINT16,
            Dt::U32 => FMI_UINT32,
            Dt::U64 => FMI_UINT64,
            Dt::F32 => FMI_FLOAT32,
            Dt::F64 => FMI_FLOAT64,
        }
    }

    /// The size of one element in bytes.
    pub(crate) const fn size(self) -> usize {
        match self {
            Dt::Byte | Dt::I8 | Dt::U8 => 1,
            Dt::I16 | Dt::U16 => 2,
            Dt::I32 | Dt::U32 | Dt::F32 => 4,
            Dt::I64 | Dt::U64 | Dt::F64 => 8,
        }
    }
}

/// Runs `$body` with `$t` bound to the Rust type of the checked datatype `$dt`.
macro_rules! with_type {
    ($dt:expr, |$t:ident| $body:expr) => {
        match $dt {
            $crate::types::Dt::Byte | $crate::types::Dt::U8 => {
                type $t = u8;
                $body
            }
            $crate::types::Dt::I8 => {
                type $t = i8;
                $body
            }
            $crate::types::Dt::I16 => {
                type $t = i16;
                $body
            }
            $crate::types::Dt::I32 => {
                type $t = i32;
                $body
            }
            $crate::types::Dt::I64 => {
                type $t = i64;
                $body
            }
            $crate::types::Dt::U16 => {
                type $t = u16;
                $body
            }
            $crate::types::Dt::U32 => {
                type $t = u32;
                $body
            }
            $crate::types::Dt::U64 => {
                type $t = u64;
                $body
            }
            $crate::types::Dt::F32 => {
                type $t = f32;
                $body
            }
            $crate::types::Dt::F64 => {
                type $t = f64;
                $body
            }
        }
    };
}
pub(crate) use with_type;

/// A user reduction function, MPI's `MPI_User_function`: it must set
/// `inout[i] = in[i] op inout[i]` for `i` in `0..count`, where `in` holds data from lower ranks
/// (this matters for non-commutative ops). `datatype` is the datatype of the reduction call and
/// `user_data` the pointer given to `fmi_op_create`. It may be called several times per
/// reduction and from any thread that calls a reduction with the op; it must not call fmi.
pub type fmi_user_function = Option<
    unsafe extern "C" fn(
        input: *const c_void,
        inout: *mut c_void,
        count: usize,
        datatype: fmi_datatype,
        user_data: *mut c_void,
    ),
>;

type UserFnPtr = unsafe extern "C" fn(*const c_void, *mut c_void, usize, fmi_datatype, *mut c_void);

/// The caller's `user_data`, carried to its function.
#[derive(Clone, Copy)]
struct UserData(*mut c_void);

// SAFETY: fmi never dereferences the pointer; it only hands it back to the caller's function,
// which fmi.h documents as callable from any thread that runs a reduction with the op.
unsafe impl Send for UserData {}
// SAFETY: as above: shared access only copies the pointer value.
unsafe impl Sync for UserData {}

#[derive(Clone, Copy)]
struct UserFn {
    f: UserFnPtr,
    data: UserData,
    commutative: bool,
}

impl UserFn {
    fn call<T>(&self, lhs: &[T], inout: &mut [T], dt: fmi_datatype) {
        let count = lhs.len().min(inout.len());
        // SAFETY: fmi_op_create's caller promised `f` computes over `count` elements of
        // `datatype` at the two pointers; both slices hold at least `count` elements, `lhs` is
        // only read, and `user_data` is passed back unchanged.
        unsafe {
            (self.f)(
                lhs.as_ptr().cast(),
                inout.as_mut_ptr().cast(),
                count,
                dt,
                self.data.0,
            )
        }
    }
}

#[derive(Clone, Copy)]
enum OpKind {
    Builtin(Op),
    User(UserFn),
}

/// A reduction operation: a built-in (`FMI_SUM` ... `FMI_BXOR`) or one made by `fmi_op_create`.
pub struct fmi_op {
    kind: OpKind,
}

impl fmi_op {
    const fn builtin(op: Op) -> fmi_op {
        fmi_op {
            kind: OpKind::Builtin(op),
        }
    }

    /// The reduction over `T` (the Rust type of `dt`).
    pub(crate) fn reduction<T: Numeric>(&self, dt: Dt) -> Result<Reduction<T>, Failure> {
        match self.kind {
            OpKind::Builtin(op) => {
                if dt == Dt::Byte && !matches!(op, Op::BAnd | Op::BOr | Op::BXor) {
                    return Err(fmi::Error::UnsupportedOp {
                        op: op.name(),
                        datatype: "FMI_BYTE (only band, bor and bxor apply to bytes)",
                    }
                    .into());
                }
                Ok(op.into())
            }
            OpKind::User(u) => {
                let dt = dt.to_c();
                // The closure calls a method so it captures `u` whole (with its Send + Sync
                // wrapper), not the raw pointer field.
                let op = UserOp::from_slice_fn(u.commutative, move |lhs: &[T], inout: &mut [T]| {
                    u.call(lhs, inout, dt)
                });
                Ok(op.into())
            }
        }
    }
}

/// Checks an op argument and borrows it.
///
/// # Safety
/// A non-NULL `op` must point to a live `fmi_op` (a built-in or one from `fmi_op_create` not yet
/// freed) for the lifetime `'a`.
pub(crate) unsafe fn op_ref<'a>(op: *const fmi_op) -> Result<&'a fmi_op, Failure> {
    // SAFETY: the caller guarantees a non-NULL op is valid; NULL becomes None.
    unsafe { op.as_ref() }.ok_or_else(|| Failure::invalid("op is NULL"))
}

/// `FMI_SUM`: `a + b` (wrapping for integers).
#[no_mangle]
pub static fmi_op_sum: fmi_op = fmi_op::builtin(Op::Sum);
/// `FMI_PROD`: `a * b` (wrapping for integers).
#[no_mangle]
pub static fmi_op_prod: fmi_op = fmi_op::builtin(Op::Prod);
/// `FMI_MIN`: the smaller of `a` and `b`.
#[no_mangle]
pub static fmi_op_min: fmi_op = fmi_op::builtin(Op::Min);
/// `FMI_MAX`: the larger of `a` and `b`.
#[no_mangle]
pub static fmi_op_max: fmi_op = fmi_op::builtin(Op::Max);
/// `FMI_LAND`: logical and (non-zero is true); integers only.
#[no_mangle]
pub static fmi_op_land: fmi_op = fmi_op::builtin(Op::LAnd);
/// `FMI_LOR`: logical or; integers only.
#[no_mangle]
pub static fmi_op_lor: fmi_op = fmi_op::builtin(Op::LOr);
/// `FMI_LXOR`: logical exclusive or; integers only.
#[no_mangle]
pub static fmi_op_lxor: fmi_op = fmi_op::builtin(Op::LXor);
/// `FMI_BAND`: bitwise and; integers and bytes only.
#[no_mangle]
pub static fmi_op_band: fmi_op = fmi_op::builtin(Op::BAnd);
/// `FMI_BOR`: bitwise or; integers and bytes only.
#[no_mangle]
pub static fmi_op_bor: fmi_op = fmi_op::builtin(Op::BOr);
/// `FMI_BXOR`: bitwise exclusive or; integers and bytes only.
#[no_mangle]
pub static fmi_op_bxor: fmi_op = fmi_op::builtin(Op::BXor);

/// Creates a user reduction from `function` (see `fmi_user_function`). A non-zero `commutative`
/// lets fmi combine contributions in any order; with 0 they are combined in rank order,
/// `x0 op x1 op ... op x(p-1)`. Free it with `fmi_op_free` after the last reduction using it.
///
/// # Safety
/// `function` must be safe to call as `fmi_user_function` describes, with `user_data`, until
/// the op is freed; `out` must be NULL or point to writable memory for one pointer.
#[no_mangle]
pub unsafe extern "C" fn fmi_op_create(
    function: fmi_user_function,
    user_data: *mut c_void,
    commutative: c_int,
    out: *mut *mut fmi_op,
) -> fmi_status {
    guard("fmi_op_create", || {
        if out.is_null() {
            return Err(Failure::invalid("out is NULL"));
        }
        // SAFETY: `out` is non-NULL and the caller guarantees it is writable.
        unsafe { out.write(std::ptr::null_mut()) };
        let f = function.ok_or_else(|| Failure::invalid("function is NULL"))?;
        let op = Box::new(fmi_op {
            kind: OpKind::User(UserFn {
                f,
                data: UserData(user_data),
                commutative: commutative != 0,
            }),
        });
        // SAFETY: as above.
        unsafe { out.write(Box::into_raw(op)) };
        Ok(())
    })
}

/// Frees an op made by `fmi_op_create` and sets `*op` to NULL. Built-in ops cannot be freed
/// (`FMI_ERR_INVALID_ARGUMENT`).
///
/// # Safety
/// `op` must be NULL (an error) or point to NULL, a built-in op, or an op from `fmi_op_create`
/// that is not freed yet and not in use by a running reduction.
#[no_mangle]
pub unsafe extern "C" fn fmi_op_free(op: *mut *mut fmi_op) -> fmi_status {
    guard("fmi_op_free", || {
        if op.is_null() {
            return Err(Failure::invalid("op is NULL"));
        }
        // SAFETY: non-NULL and readable by the caller's guarantee.
        let handle = unsafe { op.read() };
        // SAFETY: the caller guarantees a non-NULL handle is a live fmi_op.
        let kind = unsafe { op_ref(handle) }
            .map_err(|_| Failure::invalid("*op is NULL (already freed?)"))?
            .kind;
        match kind {
            OpKind::Builtin(b) => Err(Failure::invalid(format!(
                "the built-in op {} cannot be freed",
                b.name()
            ))),
            OpKind::User(_) => {
                // SAFETY: the handle is writable by the caller's guarantee.
                unsafe { op.write(std::ptr::null_mut()) };
                // SAFETY: user ops are only made by fmi_op_create with Box::into_raw, and the
                // caller guarantees this one was not freed yet.
                drop(unsafe { Box::from_raw(handle) });
                Ok(())
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn datatypes_round_trip() {
        for c in FMI_BYTE..=FMI_FLOAT64 {
            let dt = Dt::from_c(c).expect("valid");
            assert_eq!(dt.to_c(), c);
            assert_eq!(with_type!(dt, |T| std::mem::size_of::<T>()), dt.size());
        }
        assert!(Dt::from_c(0).is_err());
        assert!(Dt::from_c(12).is_err());
    }

    #[test]
    fn bytes_allow_only_bitwise_builtins() {
        assert!(fmi_op_bxor.reduction::<u8>(Dt::Byte).is_ok());
        assert!(fmi_op_sum.reduction::<u8>(Dt::Byte).is_err());
        assert!(fmi_op_sum.reduction::<u8>(Dt::U8).is_ok());
    }
}
