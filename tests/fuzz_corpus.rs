//! Runs every seed of `fuzz/corpus/<target>/` through the body of that fuzz target (the same
//! code `cargo fuzz run <target>` runs, from `fuzz/src/lib.rs`), on the stable toolchain: the
//! suite's smoke run of the fuzzers. It also checks that each target has seeds, and exercises
//! each target on a few thousand pseudo-random mutations of its seeds (deterministic, seeded)
//! so that a decoder regression shows up here before a fuzzing campaign.

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

#[path = "../fuzz/src/lib.rs"]
mod targets;

use std::path::PathBuf;

type Target = fn(&[u8]);

const TARGETS: [(&str, Target); 5] = [
    ("rendezvous_client_frame", targets::rendezvous_client_frame),
    ("rendezvous_server_frame", targets::rendezvous_server_frame),
    ("tcp_wire", targets::tcp_wire),
    ("storage_chunk", targets::storage_chunk),
    ("server_state", targets::server_state),
];

fn seeds(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut out: Vec<(PathBuf, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| {
            let path = e.expect("directory entry").path();
            let bytes = std::fs::read(&path).expect("read a seed");
            (path, bytes)
        })
        .collect();
    out.sort();
    out
}

/// xorshift64*: small, deterministic, good enough to flip bytes.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

fn mutate(seed: &[u8], rng: &mut Rng) -> Vec<u8> {
    let mut v = seed.to_vec();
    for _ in 0..=(rng.next() % 4) {
        let r = rng.next();
        match r % 4 {
            0 if !v.is_empty() => {
                let i = (r >> 8) as usize % v.len();
                v[i] ^= 1 << ((r >> 40) % 8);
            }
            1 if !v.is_empty() => {
                let i = (r >> 8) as usize % v.len();
                v[i] = (r >> 32) as u8;
            }
            2 if !v.is_empty() => {
                let i = (r >> 8) as usize % v.len();
                v.truncate(i);
            }
            _ => v.push((r >> 16) as u8),
        }
    }
    v
}

#[test]
fn every_fuzz_target_passes_its_corpus_and_mutations() {
    for (name, target) in TARGETS {
        let seeds = seeds(name);
        assert!(!seeds.is_empty(), "fuzz/corpus/{name} has no seeds");
        for (path, bytes) in &seeds {
            let ok = std::panic::catch_unwind(|| target(bytes));
            assert!(ok.is_ok(), "{name} fails on seed {}", path.display());
        }
        let mut rng = Rng(0x5eed_0000 ^ name.len() as u64);
        for i in 0..2000 {
            let (_, seed) = &seeds[i % seeds.len()];
            let input = mutate(seed, &mut rng);
            let ok = std::panic::catch_unwind(|| target(&input));
            assert!(ok.is_ok(), "{name} fails on mutation {i}: {input:?}");
        }
    }
}

/// Writes the seed corpus (`cargo test --release -p fmi-suite --test fuzz_corpus -- --ignored`):
/// one valid encoding of every message kind and a few scripted conversations. The committed
/// files are its output; fuzzing campaigns add nothing to the committed corpus.
#[test]
#[ignore = "regenerates fuzz/corpus; run by hand"]
fn write_seed_corpus() {
    use fmi_channels::JobId;
    use fmi_rendezvous::wire::{ClientMsg, ServerMsg};
    use fmi_rendezvous::{Endpoint, RefuseReason, Token};
    use std::net::{Ipv4Addr, SocketAddr};
    use std::time::Duration;

    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    let write = |target: &str, name: &str, bytes: &[u8]| {
        let dir = root.join(target);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(name), bytes).unwrap();
    };
    let job = JobId::new("job-a").unwrap();
    let token = Token::new(b"seed-token".to_vec()).unwrap();
    let ep = |port: u16| Endpoint::from(SocketAddr::from((Ipv4Addr::LOCALHOST, port)));
    let client = [
        (
            "register",
            ClientMsg::Register {
                job: job.clone(),
                rank: 1,
                size: 4,
                endpoints: vec![ep(4000), Endpoint::new("host.example:4001").unwrap()],
                token: token.clone(),
            },
        ),
        ("status", ClientMsg::Status),
        ("leave", ClientMsg::Leave),
        ("hold", ClientMsg::Hold),
        ("connect", ClientMsg::Connect { peer: 3 }),
        (
            "relay",
            ClientMsg::Relay {
                job: job.clone(),
                from: 0,
                to: 2,
                token,
            },
        ),
    ];
    for (name, msg) in client {
        let mut out = Vec::new();
        msg.encode(&mut out).unwrap();
        write("rendezvous_client_frame", name, &out);
    }
    let server = [
        (
            "missing",
            ServerMsg::Missing {
                ranks: vec![0, 2, 7],
            },
        ),
        (
            "peers",
            ServerMsg::Peers {
                size: 3,
                first: 0,
                endpoints: vec![vec![ep(1)], vec![ep(2), ep(3)], vec![]],
            },
        ),
        (
            "refused",
            ServerMsg::Refused {
                reason: RefuseReason::JobExpired,
            },
        ),
        (
            "punch",
            ServerMsg::Punch {
                peer: 1,
                public: Some(SocketAddr::from((Ipv4Addr::LOCALHOST, 5000))),
                private: vec![ep(5001)],
                start_in: Duration::from_millis(10),
            },
        ),
        ("relay_offer", ServerMsg::RelayOffer { peer: 2 }),
        ("relayed", ServerMsg::Relayed { peer: 2 }),
        ("no_peer", ServerMsg::NoPeer { peer: 5 }),
    ];
    for (name, msg) in server {
        let mut out = Vec::new();
        msg.encode(&mut out).unwrap();
        write("rendezvous_server_frame", name, &out);
    }

    // TCP: hello (head + body), reply, frame header.
    let mut hello = b"fmiT".to_vec();
    let (jobb, tok) = (b"job-a", b"0123456789abcdef");
    let body_len = 4 + 4 + 1 + jobb.len() + 2 + tok.len();
    hello.extend_from_slice(&1u16.to_le_bytes());
    hello.extend_from_slice(&(body_len as u16).to_le_bytes());
    hello.extend_from_slice(&2u32.to_le_bytes());
    hello.extend_from_slice(&1u32.to_le_bytes());
    hello.push(jobb.len() as u8);
    hello.extend_from_slice(jobb);
    hello.extend_from_slice(&(tok.len() as u16).to_le_bytes());
    hello.extend_from_slice(tok);
    write("tcp_wire", "hello", &hello);
    write("tcp_wire", "reply_accepted", b"fmiT\x01\x00\x00");
    write("tcp_wire", "reply_bad_token", b"fmiT\x01\x00\x06");
    let mut frame = vec![1u8];
    frame.extend_from_slice(&7u64.to_le_bytes());
    frame.extend_from_slice(&4096u64.to_le_bytes());
    write("tcp_wire", "frame_header", &frame);
    // An abort frame: kind 2, tag 0, length 8, victim 3, reporter 1.
    let mut abort = vec![2u8];
    abort.extend_from_slice(&0u64.to_le_bytes());
    abort.extend_from_slice(&8u64.to_le_bytes());
    abort.extend_from_slice(&3u32.to_le_bytes());
    abort.extend_from_slice(&1u32.to_le_bytes());
    write("tcp_wire", "abort_frame", &abort);

    // Storage: chunk 0 of a one-chunk and of a three-chunk message; a job id.
    let mut one = vec![0xF1];
    one.extend_from_slice(&5u64.to_le_bytes());
    one.extend_from_slice(&1u32.to_le_bytes());
    one.extend_from_slice(b"hello");
    write("storage_chunk", "one_chunk", &one);
    let mut three = vec![0xF1];
    three.extend_from_slice(&100u64.to_le_bytes());
    three.extend_from_slice(&3u32.to_le_bytes());
    three.extend_from_slice(&[7u8; 20]);
    write("storage_chunk", "three_chunks", &three);
    write("storage_chunk", "job_id", b"t-job_1.2");

    // Rendezvous state machine scripts (see `server_state` in fuzz/src/lib.rs for the format).
    let complete_hold_punch_relay: &[u8] = &[
        0, 0, 0, 1, 0, 2, 0, 3, // accept 4 connections
        1, 0, 0, 0, 1, // conn0 registers job-a rank 0 of 2
        1, 0, 3, 0, 0, // conn0 holds
        1, 1, 0, 6, 1, // conn1 registers job-a rank 1 of 2: complete
        1, 1, 3, 0, 0, // conn1 holds
        1, 0, 4, 1, 0, // conn0 asks to punch rank 1
        1, 2, 5, 0, 1, // conn2 relays 0 -> 1
        1, 3, 5, 9, 0, // conn3 relays 1 -> 0: spliced
        6, 200, 6, 61, 6, 2, // time passes
    ];
    write(
        "server_state",
        "complete_hold_punch_relay",
        complete_hold_punch_relay,
    );
    let mut refusals = vec![
        0, 0, 0, 1, 0, 2, // accept 3
        1, 0, 0, 0, 0x81, // conn0 registers with the other token
        1, 1, 0, 6, 1, // conn1 registers with the secret token: refused
        4, 2, // conn2 sends garbage
        5, 0, // conn0 closes
        1, 1, 4, 1, 0, // connect from a refused connection
        6, 2, 6, 3, // time passes past the TTL
    ];
    let mut raw = Vec::new();
    ClientMsg::Status.encode(&mut raw).unwrap();
    refusals.extend_from_slice(&[0, 9, 3, 3, raw.len() as u8]);
    refusals.extend_from_slice(&raw);
    write("server_state", "refusals_and_garbage", &refusals);
}
