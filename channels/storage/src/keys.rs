//! Key layout and the chunk header.
//!
//! Every key of a job starts with `fmi/{job}/`; job ids are `[A-Za-z0-9._-]`, so the `/` after
//! the id ends it unambiguously (`fmi/a/` is not a prefix of `fmi/ab/`). A channel given the
//! job's secret puts its keys one level deeper, under `fmi/{job}/k{h}/` ([`key_space`]); the
//! layout below is shown without that level. Numbers are fixed-width
//! lowercase hex where they sort (tags, sequence numbers) and decimal where they are short
//! (ranks, chunk indices); every field is followed by `/`, so no two (field tuple)s map to the
//! same key.
//!
//! ```text
//! fmi/{job}/m/{src}/{dst}/{tag:016x}/{seq:016x}/{chunk}   point-to-point message chunk
//! fmi/{job}/b/{root}/{tag:016x}/{chunk}                   broadcast payload chunk
//! fmi/{job}/b/{root}/{tag:016x}/n                         broadcast reader counter
//! fmi/{job}/x/{tag:016x}/n                                barrier arrival counter
//! fmi/{job}/x/{tag:016x}/go                               barrier release flag
//! fmi/{job}/g/{root}/{tag:016x}/{src}/{chunk}             gather: rank src's block
//! fmi/{job}/g/{root}/{tag:016x}/n                         gather arrival counter
//! fmi/{job}/g/{root}/{tag:016x}/go                        gather "all blocks stored" flag
//! fmi/{job}/f                                             failure record (`Channel::abort`)
//! ```
//!
//! A stored message ("object") is one or more chunks. Chunk 0 starts with a 13-byte header
//! (`0xF1`, total length as u64 LE, chunk count as u32 LE) followed by the first bytes of the
//! payload; chunks `1..count` carry the rest, `max_value` bytes each. The sender writes chunks
//! `1..count` first and chunk 0 last, so that chunk 0 doubles as the commit record: once a
//! reader sees it, every other chunk is already stored and a poll backend needs no extra polls.

use fmi_channels::{JobId, Rank, Tag};

/// Bytes of the header at the start of chunk 0.
pub(crate) const HEADER_LEN: usize = 13;
const MAGIC: u8 = 0xF1;

/// The prefix under which every key of `job` lives (`fmi/{job}/`). Listing it finds everything
/// the job stored; [`crate::cleanup_job`] deletes it.
pub fn job_prefix(job: &JobId) -> String {
    format!("fmi/{job}/")
}

/// Where the keys of `job` live: [`job_prefix`], or with a job secret (the token `fmi run`
/// hands its ranks) `fmi/{job}/k{h}/`, `h` being 128 bits of SHA-256 over a domain string, the
/// job id and the secret, in hex. A client without the secret cannot name, and so through fmi
/// cannot read or write, any key of the job; the secret itself never appears in a key.
pub(crate) fn key_space(job: &JobId, secret: Option<&[u8]>) -> String {
    use sha2::{Digest, Sha256};
    let Some(secret) = secret else {
        return job_prefix(job);
    };
    let mut h = Sha256::new();
    h.update(b"fmi storage key space v1\0");
    h.update(job.as_str().as_bytes());
    h.update(b"\0");
    h.update(secret);
    let d = h.finalize();
    let hex: String = d[..16].iter().map(|b| format!("{b:02x}")).collect();
    format!("fmi/{job}/k{hex}/")
}

/// The base of a chunked object's keys; chunk `i` lives at `{base}{i}`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ObjectKey {
    base: String,
}

impl ObjectKey {
    /// Message number `seq` from `src` to `dst` with `tag`.
    pub(crate) fn message(space: &str, src: Rank, dst: Rank, tag: Tag, seq: u64) -> ObjectKey {
        ObjectKey {
            base: format!("{space}m/{src}/{dst}/{:016x}/{seq:016x}/", tag.0),
        }
    }

    /// The payload of the broadcast from `root` with `tag`.
    pub(crate) fn bcast(space: &str, root: Rank, tag: Tag) -> ObjectKey {
        ObjectKey {
            base: format!("{space}b/{root}/{:016x}/", tag.0),
        }
    }

    /// Rank `src`'s block of the gather to `root` with `tag`.
    pub(crate) fn gather(space: &str, root: Rank, tag: Tag, src: Rank) -> ObjectKey {
        ObjectKey {
            base: format!("{space}g/{root}/{:016x}/{src}/", tag.0),
        }
    }

    /// The key of chunk `i`.
    pub(crate) fn chunk(&self, i: u32) -> String {
        format!("{}{i}", self.base)
    }

    /// The counter kept beside the object (broadcast readers).
    pub(crate) fn counter(&self) -> String {
        format!("{}n", self.base)
    }
}

/// The counter and release keys of the barrier with `tag`.
pub(crate) fn barrier_keys(space: &str, tag: Tag) -> (String, String) {
    let base = format!("{space}x/{:016x}/", tag.0);
    (format!("{base}n"), format!("{base}go"))
}

/// The job's failure record: which rank failed because of which (see `Channel::abort`).
pub(crate) fn failure_key(space: &str) -> String {
    format!("{space}f")
}

/// The counter and "all blocks stored" keys of the gather to `root` with `tag`.
pub(crate) fn gather_keys(space: &str, root: Rank, tag: Tag) -> (String, String) {
    let base = format!("{space}g/{root}/{:016x}/", tag.0);
    (format!("{base}n"), format!("{base}go"))
}

/// What chunk 0's header says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Header {
    /// Payload bytes of the whole message.
    pub(crate) total: u64,
    /// Number of chunks, at least 1.
    pub(crate) chunks: u32,
}

/// How a payload of `len` bytes is cut into chunks of at most `max_value` bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Plan {
    /// Payload bytes in chunk 0 (after the header).
    first: usize,
    /// Payload bytes in each later chunk.
    rest: usize,
    /// Total number of chunks.
    pub(crate) chunks: u32,
}

impl Plan {
    /// The plan for `len` payload bytes. `max_value` must exceed [`HEADER_LEN`]; `None` when the
    /// chunk count does not fit in u32 (a message of terabytes at tiny chunk sizes).
    pub(crate) fn new(len: usize, max_value: usize) -> Option<Plan> {
        let first = max_value.checked_sub(HEADER_LEN).filter(|&f| f > 0)?;
        let chunks = if len <= first {
            1
        } else {
            1 + (len - first).div_ceil(max_value)
        };
        Some(Plan {
            first,
            rest: max_value,
            chunks: u32::try_from(chunks).ok()?,
        })
    }

    /// The payload bytes of chunk `i`.
    pub(crate) fn piece<'d>(&self, data: &'d [u8], i: u32) -> &'d [u8] {
        let (start, cap) = if i == 0 {
            (0, self.first)
        } else {
            (self.first + (i as usize - 1) * self.rest, self.rest)
        };
        let start = start.min(data.len());
        let end = start.saturating_add(cap).min(data.len());
        &data[start..end]
    }

    /// The header that starts chunk 0 of a `len`-byte payload; the first piece follows it.
    pub(crate) fn header(&self, len: usize) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[0] = MAGIC;
        h[1..9].copy_from_slice(&(len as u64).to_le_bytes());
        h[9..13].copy_from_slice(&self.chunks.to_le_bytes());
        h
    }

    /// Chunk 0: the header followed by the first piece.
    #[cfg(test)]
    pub(crate) fn first_chunk(&self, data: &[u8]) -> Vec<u8> {
        let mut v = self.header(data.len()).to_vec();
        v.extend_from_slice(self.piece(data, 0));
        v
    }
}

/// Splits chunk 0 into its header and first piece; `Err` says what is wrong.
pub(crate) fn decode_first(chunk: &[u8]) -> Result<(Header, &[u8]), String> {
    if chunk.len() < HEADER_LEN || chunk[0] != MAGIC {
        return Err(format!(
            "chunk 0 of {} bytes has no valid fmi header (another program's key, or a different \
             fmi version?)",
            chunk.len()
        ));
    }
    let mut total = [0u8; 8];
    total.copy_from_slice(&chunk[1..9]);
    let mut chunks = [0u8; 4];
    chunks.copy_from_slice(&chunk[9..13]);
    let h = Header {
        total: u64::from_le_bytes(total),
        chunks: u32::from_le_bytes(chunks),
    };
    let body = &chunk[HEADER_LEN..];
    if h.chunks == 0
        || (body.len() as u64) > h.total
        || (h.chunks == 1 && body.len() as u64 != h.total)
    {
        return Err(format!(
            "inconsistent chunk header: {} bytes in {} chunks, {} bytes in chunk 0",
            h.total,
            h.chunks,
            body.len()
        ));
    }
    Ok((h, body))
}

/// Runs the chunk-0 decoder on `data` and, when it decodes, checks the header against the
/// plan a writer would make for that length: `Err` describes an inconsistency. Then cuts a
/// payload by a plan built from the first bytes and checks the pieces cover it exactly. For the
/// fuzz targets in `fuzz/` and their corpus test; not part of the API.
#[doc(hidden)]
pub fn fuzz_decode_chunk(data: &[u8]) -> Result<(), String> {
    if let Ok((h, body)) = decode_first(data) {
        if body.len() as u64 > h.total || (h.chunks == 1 && body.len() as u64 != h.total) {
            return Err(format!("accepted an inconsistent header {h:?}"));
        }
    }
    // A plan for a small payload at a small chunk size: the pieces must tile the payload.
    if let [a, b, rest @ ..] = data {
        let max_value = HEADER_LEN + 1 + usize::from(*a % 64);
        let len = usize::from(*b) * 4 + rest.len().min(200);
        let payload: Vec<u8> = (0..len).map(|i| i as u8).collect();
        let Some(plan) = Plan::new(len, max_value) else {
            return Err(format!("no plan for {len} bytes at {max_value}"));
        };
        let mut joined = Vec::with_capacity(len);
        for i in 0..plan.chunks {
            let piece = plan.piece(&payload, i);
            let cap = if i == 0 {
                max_value - HEADER_LEN
            } else {
                max_value
            };
            if piece.len() > cap || (i + 1 < plan.chunks && piece.len() != cap) {
                return Err(format!("chunk {i} of {plan:?} has {} bytes", piece.len()));
            }
            joined.extend_from_slice(piece);
        }
        if joined != payload {
            return Err(format!("the pieces of {plan:?} do not rebuild {len} bytes"));
        }
        let mut first = plan.header(len).to_vec();
        first.extend_from_slice(plan.piece(&payload, 0));
        match decode_first(&first) {
            Ok((h, body)) if h.total == len as u64 && h.chunks == plan.chunks => {
                if body != plan.piece(&payload, 0) {
                    return Err("chunk 0 does not decode to its piece".to_owned());
                }
            }
            other => return Err(format!("chunk 0 of {plan:?} decodes to {other:?}")),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job() -> JobId {
        JobId::new("job-1").expect("valid job id")
    }

    #[test]
    fn keys_follow_the_documented_layout() {
        let k = ObjectKey::message(&job_prefix(&job()), Rank(3), Rank(12), Tag(0xab), 7);
        assert_eq!(
            k.chunk(0),
            "fmi/job-1/m/3/12/00000000000000ab/0000000000000007/0"
        );
        assert_eq!(
            k.chunk(15),
            "fmi/job-1/m/3/12/00000000000000ab/0000000000000007/15"
        );
        let b = ObjectKey::bcast(&job_prefix(&job()), Rank(0), Tag::collective(5));
        assert_eq!(b.chunk(1), "fmi/job-1/b/0/8000000000500000/1");
        assert_eq!(b.counter(), "fmi/job-1/b/0/8000000000500000/n");
        let (n, go) = barrier_keys(&job_prefix(&job()), Tag(1));
        assert_eq!(n, "fmi/job-1/x/0000000000000001/n");
        assert_eq!(go, "fmi/job-1/x/0000000000000001/go");
        assert_eq!(job_prefix(&job()), "fmi/job-1/");
        assert!(k.chunk(0).starts_with(&job_prefix(&job())));
    }

    #[test]
    fn distinct_fields_give_distinct_keys() {
        // Rank 1 → 23 and rank 12 → 3 must not collide, nor seq/chunk boundaries.
        let a = ObjectKey::message(&job_prefix(&job()), Rank(1), Rank(23), Tag(0), 0).chunk(0);
        let b = ObjectKey::message(&job_prefix(&job()), Rank(12), Rank(3), Tag(0), 0).chunk(0);
        assert_ne!(a, b);
        let c = ObjectKey::message(&job_prefix(&job()), Rank(1), Rank(2), Tag(0), 1).chunk(11);
        let d = ObjectKey::message(&job_prefix(&job()), Rank(1), Rank(2), Tag(0), 11).chunk(1);
        assert_ne!(c, d);
    }

    #[test]
    fn plans_cover_every_byte_once() {
        for max in [HEADER_LEN + 1, 20, 100] {
            for len in 0..400usize {
                let data: Vec<u8> = (0..len).map(|i| i as u8).collect();
                let plan = Plan::new(len, max).expect("plan");
                let first = plan.first_chunk(&data);
                assert!(first.len() <= max, "chunk 0 over the limit");
                let (h, body) = decode_first(&first).expect("header");
                assert_eq!(h.total, len as u64);
                assert_eq!(h.chunks, plan.chunks);
                let mut all = body.to_vec();
                for i in 1..plan.chunks {
                    let p = plan.piece(&data, i);
                    assert!(
                        !p.is_empty() && p.len() <= max,
                        "chunk {i} of {len} at {max}"
                    );
                    all.extend_from_slice(p);
                }
                assert_eq!(all, data, "len {len} max {max}");
            }
        }
    }

    #[test]
    fn tiny_limits_and_bad_headers_are_rejected() {
        assert!(Plan::new(10, HEADER_LEN).is_none());
        assert!(decode_first(b"").is_err());
        assert!(decode_first(&[0u8; 13]).is_err());
        let mut bad = Plan::new(5, 100).expect("plan").first_chunk(b"hello");
        bad.push(0); // one byte more than the header claims
        assert!(decode_first(&bad).is_err());
    }
}
