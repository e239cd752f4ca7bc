//! Datatypes and reduction operations.
//!
//! Any `#[repr(C)]` type that is [`bytemuck::Pod`] can be sent, gathered or scattered. Built-in
//! reductions ([`Op`]) apply to the [`Numeric`] types `u8…u64`, `i8…i64`, `f32`, `f64`; a
//! built-in op that makes no sense for a type (bitwise and of `f64`) is an
//! [`Error::UnsupportedOp`](crate::Error::UnsupportedOp). Any `Pod` type can be reduced with a
//! [`UserOp`], commutative or not; non-commutative ops are applied in rank order
//! (`x0 ∘ x1 ∘ … ∘ x(p−1)`) exactly as MPI defines.

use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;

use bytemuck::Pod;
use fmi_collectives::ReduceOp;

use crate::{Error, Result};

/// The built-in reductions of MPI.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Op {
    /// `a + b` (wrapping for integers).
    Sum,
    /// `a * b` (wrapping for integers).
    Prod,
    /// The smaller of `a` and `b`.
    Min,
    /// The larger of `a` and `b`.
    Max,
    /// Logical and (non-zero is true), integers only.
    LAnd,
    /// Logical or, integers only.
    LOr,
    /// Logical exclusive or, integers only.
    LXor,
    /// Bitwise and, integers only.
    BAnd,
    /// Bitwise or, integers only.
    BOr,
    /// Bitwise exclusive or, integers only.
    BXor,
}

impl Op {
    /// Every built-in op.
    pub const ALL: [Op; 10] = [
        Op::Sum,
        Op::Prod,
        Op::Min,
        Op::Max,
        Op::LAnd,
        Op::LOr,
        Op::LXor,
        Op::BAnd,
        Op::BOr,
        Op::BXor,
    ];

    /// The op's lowercase name.
    pub const fn name(self) -> &'static str {
        match self {
            Op::Sum => "sum",
            Op::Prod => "prod",
            Op::Min => "min",
            Op::Max => "max",
            Op::LAnd => "land",
            Op::LOr => "lor",
            Op::LXor => "lxor",
            Op::BAnd => "band",
            Op::BOr => "bor",
            Op::BXor => "bxor",
        }
    }
}

/// A plain numeric type with the built-in reductions.
pub trait Numeric: Pod + PartialOrd + Send + Sync + 'static {
    /// The type's name in errors (`"f64"`).
    const NAME: &'static str;

    /// Whether `op` is defined for this type.
    fn supports(op: Op) -> bool;

    /// `inout[i] = lhs[i] op inout[i]` (or `inout[i] op rhs[i]` with `left = false`). Only
    /// called for supported ops; the built-in ops are all commutative, so `left` only matters for
    /// bit-identical floating point results.
    fn reduce_slices(op: Op, other: &[Self], inout: &mut [Self], other_is_left: bool);
}

#[inline]
fn zip_apply<T: Copy>(other: &[T], inout: &mut [T], left: bool, f: impl Fn(T, T) -> T) {
    if left {
        for (o, x) in inout.iter_mut().zip(other) {
            *o = f(*x, *o);
        }
    } else {
        for (o, x) in inout.iter_mut().zip(other) {
            *o = f(*o, *x);
        }
    }
}

macro_rules! numeric_int {
    ($($t:ty),*) => {$(
        impl Numeric for $t {
            const NAME: &'static str = stringify!($t);
            fn supports(_op: Op) -> bool {
                true
            }
            fn reduce_slices(op: Op, other: &[Self], inout: &mut [Self], l: bool) {
                match op {
                    Op::Sum => zip_apply(other, inout, l, |a, b| a.wrapping_add(b)),
                    Op::Prod => zip_apply(other, inout, l, |a, b| a.wrapping_mul(b)),
                    Op::Min => zip_apply(other, inout, l, |a, b| a.min(b)),
                    Op::Max => zip_apply(other, inout, l, |a, b| a.max(b)),
                    Op::LAnd => zip_apply(other, inout, l, |a, b| ((a != 0) && (b != 0)) as $t),
                    Op::LOr => zip_apply(other, inout, l, |a, b| ((a != 0) || (b != 0)) as $t),
                    Op::LXor => zip_apply(other, inout, l, |a, b| ((a != 0) != (b != 0)) as $t),
                    Op::BAnd => zip_apply(other, inout, l, |a, b| a & b),
                    Op::BOr => zip_apply(other, inout, l, |a, b| a | b),
                    Op::BXor => zip_apply(other, inout, l, |a, b| a ^ b),
                }
            }
        }
    )*};
}

macro_rules! numeric_float {
    ($($t:ty),*) => {$(
        impl Numeric for $t {
            const NAME: &'static str = stringify!($t);
            fn supports(op: Op) -> bool {
                matches!(op, Op::Sum | Op::Prod | Op::Min | Op::Max)
            }
            fn reduce_slices(op: Op, other: &[Self], inout: &mut [Self], l: bool) {
                match op {
                    Op::Sum => zip_apply(other, inout, l, |a, b| a + b),
                    Op::Prod => zip_apply(other, inout, l, |a, b| a * b),
                    Op::Min => zip_apply(other, inout, l, |a, b| if b < a { b } else { a }),
                    Op::Max => zip_apply(other, inout, l, |a, b| if b > a { b } else { a }),
                    _ => {}
                }
            }
        }
    )*};
}

numeric_int!(u8, u16, u32, u64, i8, i16, i32, i64);
numeric_float!(f32, f64);

type ElemFn<T> = Arc<dyn Fn(&T, &T) -> T + Send + Sync>;
type SliceFn<T> = Arc<dyn Fn(&[T], &mut [T]) + Send + Sync>;

enum UserFn<T> {
    /// `f(lhs, rhs)` per element.
    Elem(ElemFn<T>),
    /// MPI's user function: `inout[i] = lhs[i] op inout[i]` over whole slices.
    Slice(SliceFn<T>),
}

impl<T> Clone for UserFn<T> {
    fn clone(&self) -> Self {
        match self {
            UserFn::Elem(f) => UserFn::Elem(Arc::clone(f)),
            UserFn::Slice(f) => UserFn::Slice(Arc::clone(f)),
        }
    }
}

/// A user-defined reduction `f(lhs, rhs)`, where `lhs` comes from the lower rank.
pub struct UserOp<T> {
    f: UserFn<T>,
    commutative: bool,
}

impl<T> Clone for UserOp<T> {
    fn clone(&self) -> Self {
        UserOp {
            f: self.f.clone(),
            commutative: self.commutative,
        }
    }
}

impl<T> fmt::Debug for UserOp<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UserOp")
            .field("commutative", &self.commutative)
            .finish_non_exhaustive()
    }
}

impl<T: Pod> UserOp<T> {
    /// A commutative and associative op: the library may combine in any order.
    pub fn commutative(f: impl Fn(&T, &T) -> T + Send + Sync + 'static) -> UserOp<T> {
        UserOp {
            f: UserFn::Elem(Arc::new(f)),
            commutative: true,
        }
    }

    /// An associative op whose operands must stay in rank order (e.g. matrix product).
    pub fn non_commutative(f: impl Fn(&T, &T) -> T + Send + Sync + 'static) -> UserOp<T> {
        UserOp {
            f: UserFn::Elem(Arc::new(f)),
            commutative: false,
        }
    }

    /// An op given as MPI's user function over whole slices: `f(lhs, inout)` must set
    /// `inout[i] = lhs[i] op inout[i]`, where `lhs` comes from lower ranks. One call per buffer
    /// rather than per element, which is what the C and Python bindings need.
    pub fn from_slice_fn(
        commutative: bool,
        f: impl Fn(&[T], &mut [T]) + Send + Sync + 'static,
    ) -> UserOp<T> {
        UserOp {
            f: UserFn::Slice(Arc::new(f)),
            commutative,
        }
    }

    /// Whether the op was declared commutative.
    pub fn is_commutative(&self) -> bool {
        self.commutative
    }
}

/// A reduction over `T`: a built-in [`Op`] (for [`Numeric`] types) or a [`UserOp`]. Functions
/// taking a reduction accept either: `comm.allreduce(&v, Op::Sum)` or
/// `comm.allreduce(&v, UserOp::commutative(|a, b| …))`.
pub struct Reduction<T> {
    kind: Kind<T>,
}

enum Kind<T> {
    Builtin {
        op: Op,
        supported: bool,
        apply: fn(Op, &[T], &mut [T], bool),
    },
    User(UserOp<T>),
}

impl<T: Numeric> From<Op> for Reduction<T> {
    fn from(op: Op) -> Self {
        Reduction {
            kind: Kind::Builtin {
                op,
                supported: T::supports(op),
                apply: T::reduce_slices,
            },
        }
    }
}

impl<T: Pod> From<UserOp<T>> for Reduction<T> {
    fn from(op: UserOp<T>) -> Self {
        Reduction {
            kind: Kind::User(op),
        }
    }
}

impl<T: Pod + Send + Sync> Reduction<T> {
    /// The byte-level form the collectives use, or `UnsupportedOp`.
    pub(crate) fn to_bytes_op(&self) -> Result<BytesOp<T>> {
        let kind = match &self.kind {
            Kind::Builtin {
                op,
                supported,
                apply,
            } => {
                if !supported {
                    return Err(Error::UnsupportedOp {
                        op: op.name(),
                        datatype: std::any::type_name::<T>(),
                    });
                }
                Kind::Builtin {
                    op: *op,
                    supported: true,
                    apply: *apply,
                }
            }
            Kind::User(u) => Kind::User(u.clone()),
        };
        Ok(BytesOp {
            kind,
            _t: PhantomData,
        })
    }

    /// Applies the reduction to typed slices: `inout = other op inout` when `other_is_left`.
    #[cfg(test)]
    pub(crate) fn apply_typed(&self, other: &[T], inout: &mut [T], other_is_left: bool) {
        apply_kind(&self.kind, other, inout, other_is_left);
    }
}

fn apply_kind<T: Pod>(kind: &Kind<T>, other: &[T], inout: &mut [T], other_is_left: bool) {
    match kind {
        Kind::Builtin { op, apply, .. } => apply(*op, other, inout, other_is_left),
        Kind::User(u) => match &u.f {
            UserFn::Elem(f) => {
                if other_is_left {
                    for (o, x) in inout.iter_mut().zip(other) {
                        *o = f(x, o);
                    }
                } else {
                    for (o, x) in inout.iter_mut().zip(other) {
                        *o = f(o, x);
                    }
                }
            }
            UserFn::Slice(f) => {
                if other_is_left {
                    f(other, inout);
                } else {
                    // MPI's form only combines into the right operand: compute
                    // `other := inout op other` in a scratch copy, then move it back.
                    let mut tmp = other.to_vec();
                    f(inout, &mut tmp);
                    inout.copy_from_slice(&tmp);
                }
            }
        },
    }
}

/// A [`Reduction`] seen by the byte-level collectives.
pub(crate) struct BytesOp<T> {
    kind: Kind<T>,
    _t: PhantomData<fn() -> T>,
}

impl<T: Pod> BytesOp<T> {
    fn apply_bytes(&self, other: &[u8], inout: &mut [u8], other_is_left: bool) {
        let n = std::mem::size_of::<T>();
        if n == 0 {
            return;
        }
        match (
            bytemuck::try_cast_slice::<u8, T>(other),
            bytemuck::try_cast_slice_mut::<u8, T>(inout),
        ) {
            (Ok(o), Ok(io)) => apply_kind(&self.kind, o, io, other_is_left),
            // Buffers received from a channel are not always aligned for T: work on aligned
            // copies rather than read through misaligned pointers.
            (_, io) => {
                let o: Vec<T> = bytemuck::pod_collect_to_vec(other);
                match io {
                    Ok(io) => apply_kind(&self.kind, &o, io, other_is_left),
                    Err(_) => {
                        let mut v: Vec<T> = bytemuck::pod_collect_to_vec(inout);
                        apply_kind(&self.kind, &o, &mut v, other_is_left);
                        inout.copy_from_slice(bytemuck::cast_slice(&v));
                    }
                }
            }
        }
    }
}

impl<T: Pod> ReduceOp for BytesOp<T> {
    fn elem_size(&self) -> usize {
        std::mem::size_of::<T>()
    }

    fn commutative(&self) -> bool {
        match &self.kind {
            Kind::Builtin { .. } => true,
            Kind::User(u) => u.commutative,
        }
    }

    fn apply_left(&self, lhs: &[u8], inout: &mut [u8]) {
        self.apply_bytes(lhs, inout, true);
    }

    fn apply_right(&self, inout: &mut [u8], rhs: &[u8]) {
        self.apply_bytes(rhs, inout, false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_ops_on_integers() {
        let r: Reduction<i32> = Op::Max.into();
        let mut io = vec![1, 5, -3];
        r.apply_typed(&[4, 2, -1], &mut io, true);
        assert_eq!(io, vec![4, 5, -1]);
        let r: Reduction<u8> = Op::LXor.into();
        let mut io = vec![0, 3, 0, 7];
        r.apply_typed(&[0, 0, 9, 1], &mut io, false);
        assert_eq!(io, vec![0, 1, 1, 0]);
    }

    #[test]
    fn bitwise_on_floats_is_refused() {
        let r: Reduction<f64> = Op::BAnd.into();
        assert!(matches!(
            r.to_bytes_op(),
            Err(Error::UnsupportedOp { op: "band", .. })
        ));
        let r: Reduction<f32> = Op::Sum.into();
        assert!(r.to_bytes_op().is_ok());
    }

    #[test]
    fn byte_op_handles_misaligned_buffers() {
        let r: Reduction<u64> = Op::Sum.into();
        let op = r.to_bytes_op().expect("sum of u64");
        let a: Vec<u8> = [1u64, 2].iter().flat_map(|x| x.to_le_bytes()).collect();
        let mut storage = [0u8; 17];
        storage[1..].copy_from_slice(&a);
        let mut other = [0u8; 17];
        other[1..].copy_from_slice(&a);
        op.apply_left(&other[1..], &mut storage[1..]);
        let out: Vec<u64> = bytemuck::pod_collect_to_vec(&storage[1..]);
        assert_eq!(out, vec![2, 4]);
    }

    #[test]
    fn slice_user_op_keeps_operand_order_both_ways() {
        let concat = UserOp::from_slice_fn(false, |lhs: &[u32], io: &mut [u32]| {
            for (o, l) in io.iter_mut().zip(lhs) {
                *o += l * 10;
            }
        });
        let r: Reduction<u32> = concat.into();
        let mut io = vec![2];
        r.apply_typed(&[1], &mut io, true);
        assert_eq!(io, vec![12]);
        let mut io = vec![1];
        r.apply_typed(&[2], &mut io, false);
        assert_eq!(io, vec![12]);
    }

    #[test]
    fn user_op_keeps_operand_order() {
        let concat = UserOp::non_commutative(|a: &u32, b: &u32| a * 10 + b);
        let r: Reduction<u32> = concat.into();
        let mut io = vec![2];
        r.apply_typed(&[1], &mut io, true);
        assert_eq!(io, vec![12]);
        let mut io = vec![1];
        r.apply_typed(&[2], &mut io, false);
        assert_eq!(io, vec![12]);
    }
}
