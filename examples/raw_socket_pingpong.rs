//! Diagnostic (session 12): the floor a loopback TCP ping-pong reaches on this machine without
//! fmi. Two ranks of `fmi run` (which binds each to a core) open one plain `std::net::TcpStream`
//! between them, and rank 0 times round trips of one message: written with one call and read
//! back, either blocking (the kernel wakes the reader) or busily (non-blocking syscalls retried
//! without sleeping, as MPICH's ucx-tcp path polls). Prints the half round trip's quartiles.
//!
//! With `RAW_OP=exchange` both ranks instead send a message and receive one at the same time
//! (as every step of a 2-rank collective does), busily, over one connection used both ways
//! (`RAW_SOCKETS=1`, as fmi's TCP channel has per pair) or over two, one per direction
//! (`RAW_SOCKETS=2`); it prints the time of one exchange.
//!
//! `fmi run -n 2 -- target/release/examples/raw_socket_pingpong` with `RAW_SIZE` (bytes,
//! default 4194304), `RAW_ITERS` (default 500, after 10 untimed), `RAW_MODE` (`busy`, the
//! default, or `block`; exchanges are always busy), `RAW_OP` (`pingpong`, the default, or
//! `exchange`), `RAW_SOCKETS` (1 or 2, exchanges only) and `RAW_PORT` (default 47999, on
//! 127.0.0.1).

use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

fn env_num(var: &str, default: usize) -> usize {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Gives up on a peer that stopped answering.
const STALL: Duration = Duration::from_secs(10);

fn stalled(since: Instant) -> std::io::Result<()> {
    if since.elapsed() > STALL {
        return Err(std::io::Error::new(
            ErrorKind::TimedOut,
            "the peer has not moved a byte for 10 s",
        ));
    }
    Ok(())
}

fn write_msg(s: &mut TcpStream, buf: &[u8], busy: bool) -> std::io::Result<()> {
    if !busy {
        return s.write_all(buf);
    }
    let (mut at, mut since) = (0, Instant::now());
    while at < buf.len() {
        match s.write(&buf[at..]) {
            Ok(0) => return Err(ErrorKind::WriteZero.into()),
            Ok(n) => (at, since) = (at + n, Instant::now()),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {
                stalled(since)?;
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn read_msg(s: &mut TcpStream, buf: &mut [u8], busy: bool) -> std::io::Result<()> {
    if !busy {
        return s.read_exact(buf);
    }
    let (mut at, mut since) = (0, Instant::now());
    while at < buf.len() {
        match s.read(&mut buf[at..]) {
            Ok(0) => return Err(ErrorKind::UnexpectedEof.into()),
            Ok(n) => (at, since) = (at + n, Instant::now()),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {
                stalled(since)?;
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Sends `out` while receiving `inb` over `ws` and `rs` (the same socket or two), busily.
fn exchange(ws: &TcpStream, rs: &TcpStream, out: &[u8], inb: &mut [u8]) -> std::io::Result<()> {
    let (mut w, mut r, mut since) = (0, 0, Instant::now());
    while w < out.len() || r < inb.len() {
        let mut moved = false;
        if w < out.len() {
            match (&mut &*ws).write(&out[w..]) {
                Ok(0) => return Err(ErrorKind::WriteZero.into()),
                Ok(n) => (w, moved) = (w + n, true),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {}
                Err(e) => return Err(e),
            }
        }
        if r < inb.len() {
            match (&mut &*rs).read(&mut inb[r..]) {
                Ok(0) => return Err(ErrorKind::UnexpectedEof.into()),
                Ok(n) => (r, moved) = (r + n, true),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {}
                Err(e) => return Err(e),
            }
        }
        if moved {
            since = Instant::now();
        } else {
            stalled(since)?;
        }
    }
    Ok(())
}

fn connect(rank: usize, port: u16) -> std::io::Result<TcpStream> {
    if rank == 0 {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, port))?;
        return Ok(listener.accept()?.0);
    }
    // Rank 0 may not listen yet: at most 500 tries, 10 ms apart.
    let mut tries = 0;
    loop {
        match TcpStream::connect((Ipv4Addr::LOCALHOST, port)) {
            Ok(s) => return Ok(s),
            Err(e) if tries >= 500 => return Err(e),
            Err(_) => {
                tries += 1;
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

fn main() -> std::io::Result<()> {
    let rank = env_num("FMI_RANK", 0);
    if env_num("FMI_SIZE", 2) != 2 || rank > 1 {
        eprintln!("raw_socket_pingpong: run it on exactly 2 ranks (fmi run -n 2 -- ...)");
        std::process::exit(2);
    }
    let size = env_num("RAW_SIZE", 4 << 20);
    let iters = env_num("RAW_ITERS", 500).max(1);
    let busy = std::env::var("RAW_MODE").map_or(true, |m| m != "block");
    let port = u16::try_from(env_num("RAW_PORT", 47999)).unwrap_or(47999);

    let op_exchange = std::env::var("RAW_OP").is_ok_and(|op| op == "exchange");
    let sockets = if op_exchange {
        env_num("RAW_SOCKETS", 1).clamp(1, 2)
    } else {
        1
    };
    let mut all = Vec::new();
    for k in 0..sockets {
        // The second connection on the next port, so the two are accepted in order.
        let s = connect(rank, port.wrapping_add(k as u16))?;
        s.set_nodelay(true)?;
        s.set_nonblocking(busy || op_exchange)?;
        all.push(s);
    }
    if op_exchange {
        // Rank 0 writes on the first connection and reads the second, rank 1 the other way.
        let (ws, rs) = if rank == 0 {
            (0, sockets - 1)
        } else {
            (sockets - 1, 0)
        };
        let out = vec![1u8; size];
        let mut inb = vec![0u8; size];
        let mut us = Vec::with_capacity(iters);
        for i in 0..iters + 10 {
            let start = Instant::now();
            exchange(&all[ws], &all[rs], &out, &mut inb)?;
            if i >= 10 {
                us.push(start.elapsed().as_secs_f64() * 1e6);
            }
        }
        if rank == 0 {
            us.sort_by(f64::total_cmp);
            let at = |q: f64| us[((us.len() - 1) as f64 * q) as usize];
            let avg = us.iter().sum::<f64>() / us.len() as f64;
            println!(
                "raw exchange over {sockets} connection(s) {size} B x {iters}: p25 {:.2} p50 {:.2} p75 {:.2} avg {avg:.2} us",
                at(0.25),
                at(0.5),
                at(0.75),
            );
        }
        return Ok(());
    }
    let mut s = all.remove(0);
    let mut buf = vec![1u8; size];
    let mut half_us = Vec::with_capacity(iters);
    for i in 0..iters + 10 {
        let start = Instant::now();
        if rank == 0 {
            write_msg(&mut s, &buf, busy)?;
            read_msg(&mut s, &mut buf, busy)?;
        } else {
            read_msg(&mut s, &mut buf, busy)?;
            write_msg(&mut s, &buf, busy)?;
        }
        if i >= 10 {
            half_us.push(start.elapsed().as_secs_f64() * 1e6 / 2.0);
        }
    }
    if rank == 0 {
        half_us.sort_by(f64::total_cmp);
        let at = |q: f64| half_us[((half_us.len() - 1) as f64 * q) as usize];
        let avg = half_us.iter().sum::<f64>() / half_us.len() as f64;
        println!(
            "raw {} {size} B x {iters}: half round trip p25 {:.2} p50 {:.2} p75 {:.2} avg {avg:.2} us, {:.2} GB/s (size / avg)",
            if busy { "busy" } else { "block" },
            at(0.25),
            at(0.5),
            at(0.75),
            size as f64 / avg / 1e3,
        );
    }
    Ok(())
}
