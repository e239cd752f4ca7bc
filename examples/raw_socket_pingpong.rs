//! Diagnostic (session 12): the floor a loopback TCP ping-pong reaches on this machine without
//! fmi. Two ranks of `fmi run` (which binds each to a core) open one plain `std::net::TcpStream`
//! between them, and rank 0 times round trips of one message: written with one call and read
//! back, either blocking (the kernel wakes the reader) or busily (non-blocking syscalls retried
//! without sleeping, as MPICH's ucx-tcp path polls). Prints the half round trip's quartiles.
//!
//! `fmi run -n 2 -- target/release/examples/raw_socket_pingpong` with `RAW_SIZE` (bytes,
//! default 4194304), `RAW_ITERS` (default 500, after 10 untimed), `RAW_MODE` (`busy`, the
//! default, or `block`) and `RAW_PORT` (default 47999, on 127.0.0.1).

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

    let mut s = connect(rank, port)?;
    s.set_nodelay(true)?;
    s.set_nonblocking(busy)?;
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
