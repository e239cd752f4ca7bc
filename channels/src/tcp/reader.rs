//! The receiving side of one connection: a frame parser that any task may drive.
//!
//! A connection's bytes are parsed by whoever holds its [`Reader`]: normally the connection's
//! background task, but a `recv` waiting for a message from that peer takes over and reads the
//! socket itself ("pumps"), so that the thread that waits for a message is the one the socket
//! wakes. Without that, an arriving message wakes the background task, which then has to wake the
//! waiting receiver: two hand-offs instead of one. The parser keeps a half-read frame between
//! polls, so who reads next does not matter.
//!
//! Only the last task to poll a socket is woken when it becomes readable. The pumping receiver
//! therefore records itself as the reader's `owner`, and when it stops (its message came, it
//! was cancelled or the buffer bound was reached) it polls the socket once more with the
//! background task's waker (or wakes that task), so that the task gets the wake-ups back; the
//! task stands aside while a receive owns the reader.

use std::future::Future;
use std::io;
use std::pin::{pin, Pin};
use std::task::{ready, Context, Poll, Waker};

use tokio::io::{AsyncRead, AsyncReadExt, BufReader, ReadBuf};
use tokio::net::tcp::OwnedReadHalf;

use super::wire;

/// A frame whose header has been read and whose payload is being read.
struct Partial {
    tag: u64,
    len: usize,
    payload: Vec<u8>,
}

/// A parsed message.
pub(super) struct Frame {
    pub(super) tag: u64,
    pub(super) payload: Vec<u8>,
}

/// Parser state of one connection's receiving half.
pub(super) struct Reader {
    read: BufReader<OwnedReadHalf>,
    header: [u8; wire::FRAME_HEADER_LEN],
    /// Header bytes read so far (0 while between frames or reading a payload).
    have: usize,
    partial: Option<Partial>,
    max_message: usize,
    /// The receive currently registered with the socket for wake-ups, if any (else the
    /// background task is, or will be once woken).
    pub(super) owner: Option<u64>,
    /// The background task's waker, for handing the socket back to it.
    pub(super) background: Option<Waker>,
}

impl Reader {
    pub(super) fn new(read: OwnedReadHalf, buffer: usize, max_message: usize) -> Reader {
        Reader {
            read: BufReader::with_capacity(buffer, read),
            header: [0; wire::FRAME_HEADER_LEN],
            have: 0,
            partial: None,
            max_message,
            owner: None,
            background: None,
        }
    }

    /// Reads the next frame. `Pending` (with `cx` registered for the socket's next wake-up) when
    /// the socket has no more bytes for now; an error when the connection has ended or sent
    /// something that is not a frame.
    pub(super) fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Frame>> {
        if self.partial.is_none() {
            while self.have < wire::FRAME_HEADER_LEN {
                let mut buf = ReadBuf::new(&mut self.header[self.have..]);
                ready!(Pin::new(&mut self.read).poll_read(cx, &mut buf))?;
                let n = buf.filled().len();
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into()));
                }
                self.have += n;
            }
            self.have = 0;
            let frame = wire::decode_frame_header(&self.header).map_err(|kind| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("unknown frame kind {kind}"),
                )
            })?;
            let len = match usize::try_from(frame.len) {
                Ok(len) if len <= self.max_message => len,
                _ => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!(
                            "frame of {} bytes exceeds the limit of {}",
                            frame.len, self.max_message
                        ),
                    )))
                }
            };
            // Exactly sized and not zeroed: `read_buf` fills the spare capacity.
            self.partial = Some(Partial {
                tag: frame.tag,
                len,
                payload: Vec::with_capacity(len),
            });
        }
        if let Some(p) = self.partial.as_mut() {
            // Each round reads at least one byte or returns, so the loop is bounded by `len`.
            while p.payload.len() < p.len {
                let rest = (p.len - p.payload.len()) as u64;
                // `take` keeps the read inside this frame whatever spare capacity the vector has.
                // Whatever the buffer holds is taken from it, the rest is read straight from the
                // socket into the payload.
                let mut limited = (&mut self.read).take(rest);
                let read = pin!(limited.read_buf(&mut p.payload));
                if ready!(read.poll(cx))? == 0 {
                    return Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into()));
                }
            }
        }
        match self.partial.take() {
            Some(p) => Poll::Ready(Ok(Frame {
                tag: p.tag,
                payload: p.payload,
            })),
            None => Poll::Ready(Err(io::ErrorKind::InvalidData.into())),
        }
    }
}
