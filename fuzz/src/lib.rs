//! The bodies of fmi's fuzz targets, shared by the cargo-fuzz binaries in `fuzz_targets/` and by
//! the workspace test `tests/fuzz_corpus.rs`, which runs every seed of `fuzz/corpus/` through
//! them on the stable toolchain.
//!
//! Every function takes arbitrary bytes and panics only when it finds a bug: a decoder that
//! panics, a decoded message that does not survive re-encoding, or a broken invariant of the
//! rendezvous state machine (a send to a closed connection, a token in an event, state left
//! behind after every connection closed and every timer ran out).

#![allow(unreachable_pub, missing_docs, clippy::panic)]

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use fmi_channels::JobId;
use fmi_rendezvous::server_state::{Action, ConnId, ServerState};
use fmi_rendezvous::wire::{frame_len, ClientMsg, DecodeError, ServerMsg, PREFIX_LEN};
use fmi_rendezvous::{Endpoint, ServerConfig, Token};

/// A token no event, refusal or frame sent by the server may contain.
const SECRET: &[u8] = b"SECRET-fuzz-token-7f3a";
/// A second job token, so that wrong-token paths run.
const OTHER: &[u8] = b"other-token-0000";

/// The frame's length prefix says how long it is; a stream reader asks `frame_len` first.
fn check_prefix(data: &[u8]) {
    if let Some(Ok(prefix)) = data.get(..PREFIX_LEN).map(<[u8; PREFIX_LEN]>::try_from) {
        if let Ok(len) = frame_len(prefix) {
            assert!(len <= fmi_rendezvous::wire::MAX_FRAME_LEN);
        }
    }
}

/// A frame a rank sends to the rendezvous server (including `Relay`, the first frame of a relay
/// connection): decode, and whatever decodes must encode and decode to the same message.
pub fn rendezvous_client_frame(data: &[u8]) {
    check_prefix(data);
    if let Ok(msg) = ClientMsg::decode(data) {
        let mut out = Vec::new();
        msg.encode(&mut out)
            .unwrap_or_else(|e| panic!("decoded {msg:?} does not encode: {e}"));
        let again = ClientMsg::decode(&out)
            .unwrap_or_else(|e| panic!("re-encoded {msg:?} does not decode: {e}"));
        assert_eq!(again, msg);
        assert!(out.len() <= fmi_rendezvous::wire::MAX_FRAME_LEN + PREFIX_LEN);
    }
}

/// A frame the server sends to a rank (peer tables, punch and relay instructions).
pub fn rendezvous_server_frame(data: &[u8]) {
    check_prefix(data);
    if let Ok(msg) = ServerMsg::decode(data) {
        let mut out = Vec::new();
        msg.encode(&mut out)
            .unwrap_or_else(|e| panic!("decoded {msg:?} does not encode: {e}"));
        let again = ServerMsg::decode(&out)
            .unwrap_or_else(|e| panic!("re-encoded {msg:?} does not decode: {e}"));
        assert_eq!(again, msg);
    }
}

/// The direct TCP channel's hello, reply and frame header (also what a relayed stream carries).
pub fn tcp_wire(data: &[u8]) {
    if let Err(e) = fmi_channels::tcp::fuzz_decode_wire(data) {
        panic!("{e}");
    }
}

/// The storage channels' chunk-0 header and chunking plan, and job ids (the first path segment
/// of every storage key).
pub fn storage_chunk(data: &[u8]) {
    if let Err(e) = fmi_storage::fuzz_decode_chunk(data) {
        panic!("{e}");
    }
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(job) = JobId::new(text) {
            let prefix = fmi_storage::job_prefix(&job);
            assert_eq!(prefix, format!("fmi/{text}/"));
            assert_eq!(
                prefix.matches('/').count(),
                2,
                "job id {text:?} adds a path segment"
            );
        }
    }
}

/// Reads the fuzzer's bytes as a script of driver events.
struct Script<'a>(&'a [u8]);

impl Script<'_> {
    fn byte(&mut self) -> Option<u8> {
        let (&b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(b)
    }

    fn take(&mut self, n: usize) -> &[u8] {
        let n = n.min(self.0.len());
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        head
    }
}

/// The rendezvous server's sans-IO state machine driven by a random script of accepts,
/// messages (structured and raw frames), undecodable frames, closes and clock jumps, the way
/// the server's driver does: actions are applied (closed and spliced connections are forgotten
/// and reported closed), and invariants are checked after every step.
pub fn server_state(data: &[u8]) {
    let config = ServerConfig::default();
    let ttl = config.job_ttl + config.finished_linger + config.relay_timeout;
    let mut state = ServerState::new(config);
    let mut script = Script(data);
    let mut now = Instant::now();
    let mut next_conn = 0u64;
    let mut live: Vec<ConnId> = Vec::new();
    let jobs = ["job-a", "job-b", "j"];
    let mut steps = 0;
    while let Some(op) = script.byte() {
        steps += 1;
        if steps > 400 {
            break;
        }
        let pick =
            |b: u8, live: &[ConnId]| (!live.is_empty()).then(|| live[b as usize % live.len()]);
        match op % 8 {
            0 => {
                let conn = ConnId(next_conn);
                next_conn += 1;
                let port = 1000 + u16::from(script.byte().unwrap_or(0));
                state.handle_accepted(conn, SocketAddr::from((Ipv4Addr::LOCALHOST, port)), now);
                live.push(conn);
            }
            1 | 2 => {
                let (Some(c), Some(kind), Some(a), Some(b)) =
                    (script.byte(), script.byte(), script.byte(), script.byte())
                else {
                    break;
                };
                let Some(conn) = pick(c, &live) else { continue };
                let job =
                    JobId::new(jobs[a as usize % jobs.len()]).unwrap_or_else(|e| panic!("{e}"));
                let token = Token::new(if b & 0x80 == 0 { SECRET } else { OTHER })
                    .unwrap_or_else(|e| panic!("{e}"));
                let msg = match kind % 6 {
                    0 => ClientMsg::Register {
                        job,
                        rank: u32::from(a % 5),
                        size: u32::from(b % 4) + 1,
                        endpoints: vec![Endpoint::from(SocketAddr::from((
                            Ipv4Addr::LOCALHOST,
                            2000 + u16::from(a),
                        )))],
                        token,
                    },
                    1 => ClientMsg::Status,
                    2 => ClientMsg::Leave,
                    3 => ClientMsg::Hold,
                    4 => ClientMsg::Connect {
                        peer: u32::from(a % 5),
                    },
                    _ => ClientMsg::Relay {
                        job,
                        from: u32::from(a % 4),
                        to: u32::from(b % 4),
                        token,
                    },
                };
                state.handle_message(conn, msg, now);
            }
            3 => {
                // A raw frame: whatever decodes is handled, the rest is refused.
                let (Some(c), Some(len)) = (script.byte(), script.byte()) else {
                    break;
                };
                let frame = script.take(usize::from(len)).to_vec();
                let Some(conn) = pick(c, &live) else { continue };
                match ClientMsg::decode(&frame) {
                    Ok(msg) => state.handle_message(conn, msg, now),
                    Err(e) => state.handle_invalid(conn, &e, now),
                }
            }
            4 => {
                let Some(c) = script.byte() else { break };
                let Some(conn) = pick(c, &live) else { continue };
                let e = [
                    DecodeError::Truncated,
                    DecodeError::TooLarge {
                        len: 1 << 20,
                        max: 1 << 16,
                    },
                    DecodeError::UnknownKind { kind: c },
                ];
                state.handle_invalid(conn, &e[usize::from(c) % e.len()], now);
            }
            5 => {
                let Some(c) = script.byte() else { break };
                let Some(conn) = pick(c, &live) else { continue };
                live.retain(|&x| x != conn);
                state.handle_closed(conn, now);
            }
            _ => {
                let Some(b) = script.byte() else { break };
                now += match b % 4 {
                    0 => Duration::from_millis(u64::from(b)),
                    1 => Duration::from_secs(u64::from(b)),
                    2 => Duration::from_secs(60 * u64::from(b % 16)),
                    _ => Duration::ZERO,
                };
                state.handle_timeout(now);
            }
        }
        drain(&mut state, &mut live, now);
        assert!(
            state.registered_count() <= live.len(),
            "{} registrations on {} live connections",
            state.registered_count(),
            live.len()
        );
    }
    // Every connection goes, every timer runs out: nothing may be left.
    for conn in std::mem::take(&mut live) {
        state.handle_closed(conn, now);
        drain(&mut state, &mut live, now);
    }
    now += ttl + Duration::from_secs(1);
    state.handle_timeout(now);
    drain(&mut state, &mut live, now);
    assert_eq!(state.registered_count(), 0, "registrations left: {state:?}");
    assert_eq!(state.job_count(), 0, "jobs left: {state:?}");
    assert_eq!(state.pending_relays(), 0, "relays left: {state:?}");
    assert!(state.poll_timeout().is_none(), "timer left: {state:?}");
}

/// Applies the state machine's actions the way the server's driver does.
fn drain(state: &mut ServerState, live: &mut Vec<ConnId>, now: Instant) {
    let mut closed = Vec::new();
    while let Some(action) = state.poll_action() {
        let text = format!("{action:?}");
        assert!(
            !contains(text.as_bytes(), SECRET) && !contains(text.as_bytes(), OTHER),
            "a token leaked into {text}"
        );
        match action {
            Action::Send { conn, msg } => {
                assert!(
                    live.contains(&conn) || closed.contains(&conn),
                    "send to unknown {conn}: {msg:?}"
                );
                let mut out = Vec::new();
                msg.encode(&mut out)
                    .unwrap_or_else(|e| panic!("server message {msg:?} does not encode: {e}"));
                assert!(!contains(&out, SECRET), "a token leaked into a frame");
            }
            Action::Close { conn } if live.contains(&conn) => {
                live.retain(|&x| x != conn);
                closed.push(conn);
            }
            Action::Splice { a, b } => {
                assert_ne!(a, b, "a connection spliced with itself");
                for conn in [a, b] {
                    assert!(live.contains(&conn), "splice of unknown {conn}");
                    live.retain(|&x| x != conn);
                }
            }
            _ => {}
        }
    }
    // The driver reports each closed socket back.
    for conn in closed {
        state.handle_closed(conn, now);
    }
    if state.poll_action().is_some() {
        drain(state, live, now);
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}
