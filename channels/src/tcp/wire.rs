//! The tcp channel's wire format: the handshake and the frame header.
//!
//! Pure byte codecs with no I/O, so every decoder can be unit-tested (and later fuzzed) on its own.
//! The layout is documented in the parent module's docs; keep the two in step.

use std::fmt;

/// The first bytes of every handshake message, so a stray connection is recognised at once.
pub(super) const MAGIC: [u8; 4] = *b"fmiT";
/// The handshake and framing version. A different version is refused, never guessed at.
pub(super) const VERSION: u16 = 1;
/// Magic, version and the length of the hello body that follows.
pub(super) const HELLO_HEAD_LEN: usize = 8;
/// The longest per-job token a hello may carry (authentication is a later addition; version 1
/// sends an empty token).
pub(super) const MAX_TOKEN_LEN: usize = 1024;
/// The longest hello body: ranks, job id and token with their length prefixes.
pub(super) const MAX_HELLO_BODY: usize = 4 + 4 + 1 + 64 + 2 + MAX_TOKEN_LEN;
/// Magic, version and a status byte.
pub(super) const REPLY_LEN: usize = 7;
/// Kind, tag and payload length.
pub(super) const FRAME_HEADER_LEN: usize = 17;
/// Frame kind: one user message.
pub(super) const KIND_MESSAGE: u8 = 1;
/// Frame kind: an abort. The sender's job cannot complete because a rank failed (see
/// `Channel::abort`); the tag is 0 and the payload [`ABORT_LEN`] bytes: the failed rank (u32)
/// and the rank that saw it fail (u32). Other kinds are reserved: a peer that does not know a
/// kind drops the connection, so a build without aborts sees an aborting peer as lost.
pub(super) const KIND_ABORT: u8 = 2;
/// Payload bytes of an abort frame.
pub(super) const ABORT_LEN: usize = 8;

/// The acceptor's answer to a hello.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Status {
    /// The connection is the pair's connection from now on.
    Accepted = 0,
    /// The acceptor is dialing the other way and its dial wins the tie-break: wait for it.
    Duplicate = 1,
    /// The dialer belongs to another job.
    WrongJob = 2,
    /// The dialer's rank is outside the job, is the acceptor's own, or the dialer meant another
    /// rank.
    BadRank = 3,
    /// The dialer speaks another protocol version.
    BadVersion = 4,
    /// The hello could not be decoded.
    Malformed = 5,
    /// The dialer's token does not match the job's.
    BadToken = 6,
    /// The acceptor has shut down or already lost the dialer; no connection will be made.
    Gone = 7,
}

impl Status {
    fn from_u8(b: u8) -> Option<Status> {
        Some(match b {
            0 => Status::Accepted,
            1 => Status::Duplicate,
            2 => Status::WrongJob,
            3 => Status::BadRank,
            4 => Status::BadVersion,
            5 => Status::Malformed,
            6 => Status::BadToken,
            7 => Status::Gone,
            _ => return None,
        })
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Status::Accepted => "accepted",
            Status::Duplicate => "a connection the other way wins",
            Status::WrongJob => "it belongs to another job (check the peer table)",
            Status::BadRank => "it is not the rank we meant or our rank is not in its job",
            Status::BadVersion => "it speaks another protocol version",
            Status::Malformed => "our hello was malformed",
            Status::BadToken => "our job token does not match",
            Status::Gone => "it has shut down or lost us",
        })
    }
}

/// The dialer's introduction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Hello<'a> {
    /// The dialer's rank.
    pub(super) from: u32,
    /// The rank the dialer means to reach (catches a wrong peer table).
    pub(super) to: u32,
    /// The job id, 1 to 64 bytes.
    pub(super) job: &'a [u8],
    /// The per-job token, empty in version 1.
    pub(super) token: &'a [u8],
}

impl<'a> Hello<'a> {
    /// Head and body, ready to write. The job id and token must respect their limits (the
    /// channel only encodes validated `JobId`s and its own token).
    pub(super) fn encode(&self) -> Vec<u8> {
        let job_len = self.job.len().min(u8::MAX as usize);
        let token_len = self.token.len().min(MAX_TOKEN_LEN);
        let body_len = 4 + 4 + 1 + job_len + 2 + token_len;
        let mut out = Vec::with_capacity(HELLO_HEAD_LEN + body_len);
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&(body_len as u16).to_le_bytes());
        out.extend_from_slice(&self.from.to_le_bytes());
        out.extend_from_slice(&self.to.to_le_bytes());
        out.push(job_len as u8);
        out.extend_from_slice(&self.job[..job_len]);
        out.extend_from_slice(&(token_len as u16).to_le_bytes());
        out.extend_from_slice(&self.token[..token_len]);
        out
    }

    /// Decodes a hello body (everything after the head). The body must be exactly one hello.
    pub(super) fn decode(body: &'a [u8]) -> Result<Hello<'a>, Status> {
        let mut r = Reader(body);
        let from = u32::from_le_bytes(r.array()?);
        let to = u32::from_le_bytes(r.array()?);
        let [job_len] = r.array()?;
        let job = r.take(job_len as usize)?;
        let token_len = u16::from_le_bytes(r.array()?) as usize;
        if job.is_empty() || token_len > MAX_TOKEN_LEN {
            return Err(Status::Malformed);
        }
        let token = r.take(token_len)?;
        if !r.0.is_empty() {
            return Err(Status::Malformed);
        }
        Ok(Hello {
            from,
            to,
            job,
            token,
        })
    }
}

/// Checks a hello head and returns the length of the body that follows.
pub(super) fn parse_hello_head(head: &[u8; HELLO_HEAD_LEN]) -> Result<usize, Status> {
    if head[..4] != MAGIC {
        return Err(Status::Malformed);
    }
    if u16::from_le_bytes([head[4], head[5]]) != VERSION {
        return Err(Status::BadVersion);
    }
    let len = u16::from_le_bytes([head[6], head[7]]) as usize;
    if len > MAX_HELLO_BODY {
        return Err(Status::Malformed);
    }
    Ok(len)
}

/// The acceptor's reply.
pub(super) fn encode_reply(status: Status) -> [u8; REPLY_LEN] {
    let v = VERSION.to_le_bytes();
    [
        MAGIC[0],
        MAGIC[1],
        MAGIC[2],
        MAGIC[3],
        v[0],
        v[1],
        status as u8,
    ]
}

/// Decodes the acceptor's reply; `None` if it is not one.
pub(super) fn decode_reply(reply: &[u8; REPLY_LEN]) -> Option<Status> {
    if reply[..4] != MAGIC || u16::from_le_bytes([reply[4], reply[5]]) != VERSION {
        return None;
    }
    Status::from_u8(reply[6])
}

/// The header written in front of a message's payload.
pub(super) fn encode_frame_header(tag: u64, len: u64) -> [u8; FRAME_HEADER_LEN] {
    header(KIND_MESSAGE, tag, len)
}

fn header(kind: u8, tag: u64, len: u64) -> [u8; FRAME_HEADER_LEN] {
    let mut h = [0u8; FRAME_HEADER_LEN];
    h[0] = kind;
    h[1..9].copy_from_slice(&tag.to_le_bytes());
    h[9..17].copy_from_slice(&len.to_le_bytes());
    h
}

/// A whole abort frame: rank `victim` failed, as rank `reporter` saw.
pub(super) fn encode_abort(victim: u32, reporter: u32) -> [u8; FRAME_HEADER_LEN + ABORT_LEN] {
    let mut f = [0u8; FRAME_HEADER_LEN + ABORT_LEN];
    f[..FRAME_HEADER_LEN].copy_from_slice(&header(KIND_ABORT, 0, ABORT_LEN as u64));
    f[FRAME_HEADER_LEN..FRAME_HEADER_LEN + 4].copy_from_slice(&victim.to_le_bytes());
    f[FRAME_HEADER_LEN + 4..].copy_from_slice(&reporter.to_le_bytes());
    f
}

/// Decodes an abort frame's payload: `(victim, reporter)`; `None` unless exactly
/// [`ABORT_LEN`] bytes.
pub(super) fn decode_abort(payload: &[u8]) -> Option<(u32, u32)> {
    let p: &[u8; ABORT_LEN] = payload.try_into().ok()?;
    let victim = u32::from_le_bytes([p[0], p[1], p[2], p[3]]);
    let reporter = u32::from_le_bytes([p[4], p[5], p[6], p[7]]);
    Some((victim, reporter))
}

/// What a frame carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum FrameKind {
    /// A user message.
    Message,
    /// An abort ([`KIND_ABORT`]).
    Abort,
}

/// A decoded frame header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct FrameHeader {
    /// What the frame carries.
    pub(super) kind: FrameKind,
    /// The message's tag (0 for an abort).
    pub(super) tag: u64,
    /// The payload length in bytes.
    pub(super) len: u64,
}

/// Decodes a frame header; `Err(kind)` for a frame kind this version does not know, or an
/// abort header with another tag or length than an abort has.
pub(super) fn decode_frame_header(h: &[u8; FRAME_HEADER_LEN]) -> Result<FrameHeader, u8> {
    let mut tag = [0u8; 8];
    let mut len = [0u8; 8];
    tag.copy_from_slice(&h[1..9]);
    len.copy_from_slice(&h[9..17]);
    let (tag, len) = (u64::from_le_bytes(tag), u64::from_le_bytes(len));
    let kind = match h[0] {
        KIND_MESSAGE => FrameKind::Message,
        KIND_ABORT if tag == 0 && len == ABORT_LEN as u64 => FrameKind::Abort,
        other => return Err(other),
    };
    Ok(FrameHeader { kind, tag, len })
}

/// A cursor over a byte slice whose reads fail with `Malformed` instead of panicking.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], Status> {
        if self.0.len() < n {
            return Err(Status::Malformed);
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], Status> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
}

/// Runs every decoder of this module on `data` — a hello (head and body), a reply and a frame
/// header, each read from the start of `data` — and checks that whatever decodes encodes back to
/// the same bytes. `Err` describes a mismatch. For the fuzz targets in `fuzz/` and their corpus
/// test; not part of the API.
#[doc(hidden)]
pub fn fuzz_decode(data: &[u8]) -> Result<(), String> {
    if let Some(Ok(head)) = data
        .get(..HELLO_HEAD_LEN)
        .map(<[u8; HELLO_HEAD_LEN]>::try_from)
    {
        if let Ok(len) = parse_hello_head(&head) {
            if let Some(body) = data.get(HELLO_HEAD_LEN..HELLO_HEAD_LEN + len) {
                if let Ok(hello) = Hello::decode(body) {
                    if hello.encode() != data[..HELLO_HEAD_LEN + len] {
                        return Err(format!("hello {hello:?} does not encode to its input"));
                    }
                }
            }
        }
    }
    if let Some(Ok(reply)) = data.get(..REPLY_LEN).map(<[u8; REPLY_LEN]>::try_from) {
        if let Some(status) = decode_reply(&reply) {
            if encode_reply(status) != reply {
                return Err(format!("reply {status:?} does not encode to its input"));
            }
        }
    }
    if let Some(Ok(h)) = data
        .get(..FRAME_HEADER_LEN)
        .map(<[u8; FRAME_HEADER_LEN]>::try_from)
    {
        match decode_frame_header(&h) {
            Ok(
                fh @ FrameHeader {
                    kind: FrameKind::Message,
                    ..
                },
            ) => {
                if encode_frame_header(fh.tag, fh.len) != h {
                    return Err(format!("frame header {fh:?} does not encode to its input"));
                }
            }
            Ok(FrameHeader {
                kind: FrameKind::Abort,
                ..
            }) => {
                let end = FRAME_HEADER_LEN + ABORT_LEN;
                if let Some((victim, reporter)) =
                    data.get(FRAME_HEADER_LEN..end).and_then(decode_abort)
                {
                    if encode_abort(victim, reporter)[..] != data[..end] {
                        return Err(format!(
                            "abort frame ({victim}, {reporter}) does not encode to its input"
                        ));
                    }
                }
            }
            Err(_) => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(encoded: &[u8]) -> ([u8; HELLO_HEAD_LEN], &[u8]) {
        let mut head = [0u8; HELLO_HEAD_LEN];
        head.copy_from_slice(&encoded[..HELLO_HEAD_LEN]);
        (head, &encoded[HELLO_HEAD_LEN..])
    }

    #[test]
    fn hello_round_trips() {
        let hello = Hello {
            from: 3,
            to: 7,
            job: b"job-1",
            token: b"secret",
        };
        let bytes = hello.encode();
        let (head, body) = split(&bytes);
        assert_eq!(parse_hello_head(&head), Ok(body.len()));
        assert_eq!(Hello::decode(body), Ok(hello));
    }

    #[test]
    fn hello_rejects_garbage() {
        let bytes = Hello {
            from: 1,
            to: 0,
            job: b"j",
            token: b"",
        }
        .encode();
        let (mut head, body) = split(&bytes);
        // Truncated and overlong bodies.
        assert_eq!(
            Hello::decode(&body[..body.len() - 1]),
            Err(Status::Malformed)
        );
        let mut longer = body.to_vec();
        longer.push(0);
        assert_eq!(Hello::decode(&longer), Err(Status::Malformed));
        // Empty job id.
        let empty_job = [0u8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        assert_eq!(Hello::decode(&empty_job), Err(Status::Malformed));
        // Wrong version, wrong magic, absurd body length.
        head[4] = 9;
        assert_eq!(parse_hello_head(&head), Err(Status::BadVersion));
        head[0] = b'x';
        assert_eq!(parse_hello_head(&head), Err(Status::Malformed));
        let huge = [b'f', b'm', b'i', b'T', 1, 0, 0xff, 0xff];
        assert_eq!(parse_hello_head(&huge), Err(Status::Malformed));
    }

    #[test]
    fn replies_round_trip() {
        for b in 0..=7u8 {
            let s = Status::from_u8(b);
            assert!(s.is_some(), "status {b} is known");
            assert_eq!(s.and_then(|s| decode_reply(&encode_reply(s))), s);
        }
        let mut r = encode_reply(Status::Accepted);
        r[6] = 200;
        assert_eq!(decode_reply(&r), None);
        r[6] = 0;
        r[1] = b'!';
        assert_eq!(decode_reply(&r), None);
    }

    #[test]
    fn frame_headers_round_trip() {
        let h = encode_frame_header(u64::MAX - 1, 1 << 40);
        assert_eq!(
            decode_frame_header(&h),
            Ok(FrameHeader {
                kind: FrameKind::Message,
                tag: u64::MAX - 1,
                len: 1 << 40
            })
        );
        let mut bad = h;
        bad[0] = 3;
        assert_eq!(decode_frame_header(&bad), Err(3));
    }

    #[test]
    fn abort_frames_round_trip_and_reject_other_shapes() {
        let f = encode_abort(7, u32::MAX);
        let mut h = [0u8; FRAME_HEADER_LEN];
        h.copy_from_slice(&f[..FRAME_HEADER_LEN]);
        assert_eq!(
            decode_frame_header(&h),
            Ok(FrameHeader {
                kind: FrameKind::Abort,
                tag: 0,
                len: ABORT_LEN as u64
            })
        );
        assert_eq!(decode_abort(&f[FRAME_HEADER_LEN..]), Some((7, u32::MAX)));
        assert_eq!(decode_abort(&f[FRAME_HEADER_LEN + 1..]), None);
        assert_eq!(fuzz_decode(&f), Ok(()));
        // An abort with a tag, or with another length, is not an abort.
        let mut tagged = h;
        tagged[1] = 1;
        assert_eq!(decode_frame_header(&tagged), Err(KIND_ABORT));
        let mut longer = h;
        longer[9] = 9;
        assert_eq!(decode_frame_header(&longer), Err(KIND_ABORT));
        // Old frames decode as before.
        let m = encode_frame_header(5, 3);
        assert_eq!(
            decode_frame_header(&m).map(|fh| fh.kind),
            Ok(FrameKind::Message)
        );
    }
}
