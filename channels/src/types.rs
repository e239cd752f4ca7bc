//! Newtypes shared by every layer: ranks, tags and job ids.

use std::fmt;

use crate::Error;

/// The index of a process in a job, `0..size`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Rank(pub u32);

impl Rank {
    /// The rank as an index into per-rank tables.
    pub const fn idx(self) -> usize {
        self.0 as usize
    }
}

impl From<u32> for Rank {
    fn from(r: u32) -> Self {
        Rank(r)
    }
}

impl fmt::Display for Rank {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A message tag as seen by a channel.
///
/// The 64 bits are split so that user point-to-point traffic and the library's own collective
/// traffic can never collide:
///
/// ```text
///  63   62 ........................ 20  19 ......... 0
/// [kind][ operation sequence number   ][ step in op   ]
///  0 = user tag (low 32 bits carry the user's tag), or with bit 62 set a channel's own
///      internal traffic (e.g. the direct channel's storage fallback streams)
///  1 = collective (sequence from the communicator, step chosen by the algorithm)
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Tag(pub u64);

const KIND_COLLECTIVE: u64 = 1 << 63;
const KIND_INTERNAL: u64 = 1 << 62;
const STEP_BITS: u32 = 20;
const STEP_MASK: u64 = (1 << STEP_BITS) - 1;
const SEQ_MASK: u64 = (1 << (63 - STEP_BITS)) - 1;

impl Tag {
    /// A tag in the user's namespace (point-to-point `send`/`recv`).
    pub const fn user(tag: u32) -> Tag {
        Tag(tag as u64)
    }

    /// The base tag of the collective operation with sequence number `seq`.
    pub const fn collective(seq: u64) -> Tag {
        Tag(KIND_COLLECTIVE | ((seq & SEQ_MASK) << STEP_BITS))
    }

    /// The tag of step `step` inside a collective; steps wrap at 2^20, far beyond any algorithm's
    /// step count.
    pub const fn step(self, step: u32) -> Tag {
        Tag((self.0 & !STEP_MASK) | (step as u64 & STEP_MASK))
    }

    /// Whether this tag belongs to the library's collective namespace.
    pub const fn is_collective(self) -> bool {
        self.0 & KIND_COLLECTIVE != 0
    }

    /// A tag of a channel's own traffic: never a user's tag (those stay below 2^32) nor a
    /// collective's.
    pub const fn internal(n: u32) -> Tag {
        Tag(KIND_INTERNAL | n as u64)
    }

    /// Whether this tag is a channel's own (see [`Tag::internal`]).
    pub const fn is_internal(self) -> bool {
        self.0 & (KIND_COLLECTIVE | KIND_INTERNAL) == KIND_INTERNAL
    }
}

impl fmt::Debug for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_collective() {
            write!(
                f,
                "Tag(op {} step {})",
                (self.0 >> STEP_BITS) & SEQ_MASK,
                self.0 & STEP_MASK
            )
        } else if self.is_internal() {
            write!(f, "Tag(internal {})", self.0 & !KIND_INTERNAL)
        } else {
            write!(f, "Tag(user {})", self.0)
        }
    }
}

impl fmt::Display for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// The identity of one job: all ranks of a job share it, and nothing of one job is ever visible to
/// another. Restricted to `[A-Za-z0-9._-]`, 1 to 64 characters, so that it can be used as a key
/// part in every backend without escaping.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct JobId(String);

impl JobId {
    /// The longest job id accepted.
    pub const MAX_LEN: usize = 64;

    /// Validates and wraps a job id.
    pub fn new(id: impl Into<String>) -> Result<JobId, Error> {
        let id = id.into();
        let ok = !id.is_empty()
            && id.len() <= Self::MAX_LEN
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if ok {
            Ok(JobId(id))
        } else {
            Err(Error::InvalidJobId { id })
        }
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "JobId({})", self.0)
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_and_collective_tags_never_collide() {
        let user = Tag::user(u32::MAX);
        let coll = Tag::collective(0);
        assert_ne!(user, coll);
        assert!(!user.is_collective());
        assert!(coll.is_collective());
        assert_ne!(Tag::collective(1).step(0), Tag::collective(2).step(0));
        assert_ne!(Tag::collective(1).step(1), Tag::collective(1).step(2));
        assert_eq!(
            Tag::collective(7).step(3).step(5),
            Tag::collective(7).step(5)
        );
    }

    #[test]
    fn job_ids_are_validated() {
        assert!(JobId::new("job-1.a_b").is_ok());
        assert!(JobId::new("").is_err());
        assert!(JobId::new("a/b").is_err());
        assert!(JobId::new("x".repeat(65)).is_err());
    }
}
