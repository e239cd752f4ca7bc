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
//!
//! A pumping receive that has a buffer of its own (`Channel::recv_into`) may also read a payload
//! **straight into that buffer** ([`Reader::poll_frame_into`]): when the header it reads is for
//! its tag, fits its buffer, and the inbox says it is the receiver that message goes to. The
//! half-read payload then lives in the receiver's buffer, so only that receive may continue the
//! frame; everybody else stands aside ([`Reader::direct_owner`]). A receive that stops before the
//! payload is complete (deadline, cancellation) copies what it read into an ordinary half-read
//! frame ([`Reader::detach`]), which is then finished and delivered like any other.
//!
//! A pumping receive may also **spin** for a short while ([`Reader::spin_until`]): instead of
//! registering with the socket and sleeping until the kernel wakes it, it reads the socket with
//! plain non-blocking reads in a loop until a byte comes or the spin window closes, and only then
//! registers and sleeps. On an idle core this removes the wake-up of a sleeping thread from a
//! message's latency (MPICH's network path always polls this way); the window is bounded, and
//! the channel spins only on links whose recent receives were answered within it. A receive
//! whose spin caught its message (read with those plain reads only, nothing left unparsed in
//! the buffer) stops there: it never registered with the socket, so the task the socket wakes
//! is still the one it woke before, and there is nothing to hand back. A small message that
//! arrives whole for a waiting `recv_into` takes that receive out of the inbox in the same step
//! that checks it is the receive's (`Inbox::claim`), one lock instead of two.

use std::future::Future;
use std::io;
use std::pin::{pin, Pin};
use std::task::{ready, Context, Poll, Waker};
use std::time::Instant;

use tokio::io::{AsyncRead, AsyncReadExt, BufReader, ReadBuf};

use super::quic::ReadHalf;
use super::wire;

/// A frame whose header has been read and whose payload is being read.
enum Partial {
    /// Into a vector of its own.
    Owned {
        kind: wire::FrameKind,
        tag: u64,
        len: usize,
        payload: Vec<u8>,
    },
    /// Into the buffer of the receive `owner`, of which `filled` bytes are read.
    Direct {
        tag: u64,
        len: usize,
        filled: usize,
        owner: u64,
    },
}

/// A receive's own buffer, offered to [`Reader::poll_frame_into`].
pub(super) struct Target<'b, F: FnMut(bool) -> bool> {
    /// The receive (the pump's id).
    pub(super) owner: u64,
    /// The tag it waits for.
    pub(super) tag: u64,
    pub(super) buf: &'b mut [u8],
    /// Asked once a header for `tag` that fits `buf` has been read: whether this message is the
    /// receive's (nobody else waits for it first). Its argument says whether the whole payload
    /// is already in the reader's buffer, so that reading it cannot stop half-way (the receive
    /// may then withdraw from the inbox at once, see `Inbox::claim`).
    pub(super) accept: F,
}

/// What [`Reader::poll_frame_into`] read.
pub(super) enum Got {
    /// A frame for somebody else (or one that did not fit), to be delivered.
    Frame(Frame),
    /// A message of this length, now in the target's buffer.
    Direct(usize),
}

/// A parsed frame.
pub(super) enum Frame {
    /// A user message.
    Message { tag: u64, payload: Vec<u8> },
    /// An abort: rank `victim` failed, as rank `reporter` saw (see `Channel::abort`).
    Abort { victim: u32, reporter: u32 },
}

/// Most bytes one spinning read asks for where the target is not initialized yet (it is zeroed
/// before the first read into it); an initialized target (a `recv_into` buffer) is read whole.
const SPIN_READ_MAX: usize = 64 * 1024;

/// Payloads at least this long are read busily (see [`Reader::busy`]); shorter ones come in one
/// piece or nearly so.
pub(super) const BUSY_MIN: usize = 16 * 1024;

/// A connection's receiving half, read through tokio, or (TCP only) with plain non-blocking
/// reads while a receive spins on it (until `until`) or reads a long payload busily (`busy`).
/// A QUIC stream's bytes arrive through the endpoint's task, so there is no socket of its own
/// to spin on.
struct SpinRead {
    half: ReadHalf,
    until: Option<Instant>,
    /// Until when the spin loops without yielding; after it, up to `until`, an empty socket
    /// yields to the runtime instead (see [`Reader::spin_tight_until`]). `None`: loops
    /// throughout.
    tight: Option<Instant>,
    /// While a receive drives the reader: how long a payload read in progress may go without a
    /// byte before the reader sleeps until the kernel wakes it (see [`Reader::busy`]).
    busy: Option<std::time::Duration>,
    /// While a long payload is read: when its last bytes came (or its header).
    progress: Option<Instant>,
}

/// One plain non-blocking read of up to `want` bytes into `buf`, straight from the descriptor
/// (tokio's own reads do not touch the socket until its reactor has seen it readable; the socket
/// is non-blocking already). `None` when the socket has nothing now.
fn read_now(
    tcp: &tokio::net::tcp::OwnedReadHalf,
    buf: &mut ReadBuf<'_>,
    want: usize,
) -> Option<io::Result<()>> {
    let socket = socket2::SockRef::from(tcp.as_ref());
    loop {
        match io::Read::read(&mut &*socket, buf.initialize_unfilled_to(want)) {
            Ok(n) => {
                buf.advance(n);
                return Some(Ok(()));
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return None,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Some(Err(e)),
        }
    }
}

impl AsyncRead for SpinRead {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        let initialized = buf.initialized().len() - buf.filled().len();
        let want = buf.remaining().min(SPIN_READ_MAX.max(initialized));
        if let (Some(until), true, ReadHalf::Tcp(tcp)) = (me.until, want > 0, &me.half) {
            loop {
                if let Some(read) = read_now(tcp, buf, want) {
                    return Poll::Ready(read);
                }
                let now = Instant::now();
                if now >= until {
                    me.until = None;
                    break;
                }
                if me.tight.is_some_and(|tight| now >= tight) {
                    // A long wait: the task is polled again at once, and whatever it is joined
                    // with (a send of the same exchange) runs meanwhile.
                    cx.waker().wake_by_ref();
                    return Poll::Pending;
                }
                // No `yield_now`: with other processes on the machine (niced builds here) a yield
                // hands the core to them and the spin gains nothing.
                std::hint::spin_loop();
            }
        }
        if let (Some(window), Some(since), true, ReadHalf::Tcp(tcp)) =
            (me.busy, me.progress, want > 0, &me.half)
        {
            // The middle of a long payload whose sender is writing it now: read what has come
            // and, while bytes keep coming, yield instead of sleeping, so that the transfer does
            // not cost a sleeping thread's wake-up per socket buffer. Yielding (not looping
            // here) lets the rest of the task run: a send joined with this receive keeps
            // writing, which the peer's receive may be waiting for.
            if let Some(read) = read_now(tcp, buf, want) {
                me.progress = Some(Instant::now());
                return Poll::Ready(read);
            }
            if since.elapsed() < window {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
        }
        // Registers `cx` for the socket's next readiness. A byte read by the spin above leaves
        // at most a spurious wake-up behind, which finds the socket empty.
        Pin::new(&mut me.half).poll_read(cx, buf)
    }
}

/// Parser state of one connection's receiving half.
pub(super) struct Reader {
    read: BufReader<SpinRead>,
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
    pub(super) fn new(read: ReadHalf, buffer: usize, max_message: usize) -> Reader {
        Reader {
            read: BufReader::with_capacity(
                buffer,
                SpinRead {
                    half: read,
                    until: None,
                    tight: None,
                    busy: None,
                    progress: None,
                },
            ),
            header: [0; wire::FRAME_HEADER_LEN],
            have: 0,
            partial: None,
            max_message,
            owner: None,
            background: None,
        }
    }

    /// Until `until` (if given), reads that find the socket empty spin instead of waiting for the
    /// kernel's wake-up (see the module documentation); `None` stops spinning. Whoever sets it
    /// clears it before giving up the reader, so the background task never spins.
    pub(super) fn spin_until(&mut self, until: Option<Instant>) {
        self.read.get_mut().until = until;
    }

    /// While `window` is given, a long payload (at least [`BUSY_MIN`] bytes) in the middle of
    /// being read is read busily: when the socket is empty the read yields to the runtime (its
    /// task is polled again at once) instead of sleeping, until `window` passes without a byte.
    /// Set by a receive while it drives the reader, and cleared before it lets go, so the
    /// background task never reads busily.
    pub(super) fn busy(&mut self, window: Option<std::time::Duration>) {
        self.read.get_mut().busy = window;
    }

    /// Whether a receive can spin on this connection: TCP only (a QUIC stream's bytes come
    /// through the endpoint's task, so there is no socket of its own to read).
    pub(super) fn can_spin(&self) -> bool {
        matches!(self.read.get_ref().half, ReadHalf::Tcp(_))
    }

    /// The QUIC stream under this reader, for the shutdown's linger (what is buffered and
    /// unparsed is dropped: the endpoint is closing).
    pub(super) fn into_quic(self) -> Option<quinn::RecvStream> {
        match self.read.into_inner().half {
            ReadHalf::Quic(r) => Some(r),
            ReadHalf::Tcp(_) | ReadHalf::Stored(_) => None,
        }
    }

    /// Whether a spin is still under way (its window not yet over).
    pub(super) fn spinning(&self) -> bool {
        self.read.get_ref().until.is_some()
    }

    /// Where a spin longer than the usual window stops looping tightly and starts yielding to
    /// the runtime between reads (`None`: tight until the end). Set with
    /// [`Reader::spin_until`]; a read that returns `Pending` while [`Reader::spinning`] still
    /// holds has yielded, and its task is already woken.
    pub(super) fn spin_tight_until(&mut self, tight: Option<Instant>) {
        self.read.get_mut().tight = tight;
    }

    /// Whether bytes read from the socket wait in the reader's buffer, unparsed: a receive that
    /// stops reading before this is `false` must make sure somebody is woken to read them.
    pub(super) fn holds_bytes(&self) -> bool {
        !self.read.buffer().is_empty()
    }

    /// The receive reading a payload into its own buffer, if one is: nobody else may read this
    /// connection until it has finished or detached.
    pub(super) fn direct_owner(&self) -> Option<u64> {
        match self.partial {
            Some(Partial::Direct { owner, .. }) => Some(owner),
            _ => None,
        }
    }

    /// Turns the payload that receive `owner` is reading into its buffer `buf` into an ordinary
    /// half-read frame (a copy of what was read so far), because that receive is ending.
    pub(super) fn detach(&mut self, owner: u64, buf: &[u8]) {
        if let Some(Partial::Direct {
            tag,
            len,
            filled,
            owner: o,
        }) = self.partial
        {
            if o == owner {
                let mut payload = Vec::with_capacity(len);
                payload.extend_from_slice(&buf[..filled]);
                self.partial = Some(Partial::Owned {
                    kind: wire::FrameKind::Message,
                    tag,
                    len,
                    payload,
                });
            }
        }
    }

    /// Reads the next frame. `Pending` (with `cx` registered for the socket's next wake-up) when
    /// the socket has no more bytes for now; an error when the connection has ended or sent
    /// something that is not a frame. Stands aside (`Pending`, without touching the socket) while
    /// a receive reads a payload into its own buffer: that receive is the one the socket wakes.
    pub(super) fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Frame>> {
        let mut none = Target {
            owner: 0,
            tag: 0,
            buf: &mut [],
            accept: |_| false,
        };
        if self.direct_owner().is_some() {
            return Poll::Pending;
        }
        match ready!(self.poll_frame_into(cx, &mut none))? {
            Got::Frame(frame) => Poll::Ready(Ok(frame)),
            // `accept` refuses every message, so nothing goes to the empty target.
            Got::Direct(_) => Poll::Ready(Err(io::ErrorKind::InvalidData.into())),
        }
    }

    /// Like [`Reader::poll_frame`], but a message for `target` (its tag, short enough for its
    /// buffer, and accepted) is read straight into the target's buffer. The caller must offer the
    /// same target (same owner and buffer) until the frame is complete, or [`Reader::detach`].
    pub(super) fn poll_frame_into<F: FnMut(bool) -> bool>(
        &mut self,
        cx: &mut Context<'_>,
        target: &mut Target<'_, F>,
    ) -> Poll<io::Result<Got>> {
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
            let abort = frame.kind == wire::FrameKind::Abort;
            let len = match usize::try_from(frame.len) {
                // An abort's length is fixed (and small) whatever the message limit.
                Ok(len) if len <= self.max_message || abort => len,
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
            if len >= BUSY_MIN {
                self.read.get_mut().progress = Some(Instant::now());
            }
            let whole = len <= self.read.buffer().len();
            self.partial = Some(
                if !abort
                    && frame.tag == target.tag
                    && len <= target.buf.len()
                    && (target.accept)(whole)
                {
                    Partial::Direct {
                        tag: frame.tag,
                        len,
                        filled: 0,
                        owner: target.owner,
                    }
                } else {
                    // Exactly sized and not zeroed: `read_buf` fills the spare capacity.
                    Partial::Owned {
                        kind: frame.kind,
                        tag: frame.tag,
                        len,
                        payload: Vec::with_capacity(len),
                    }
                },
            );
        }
        match self.partial.as_mut() {
            Some(Partial::Owned { len, payload, .. }) => {
                // Each round reads at least one byte or returns, so the loop is bounded by `len`.
                while payload.len() < *len {
                    let rest = (*len - payload.len()) as u64;
                    // `take` keeps the read inside this frame whatever spare capacity the vector
                    // has. Whatever the buffer holds is taken from it, the rest is read straight
                    // from the socket into the payload.
                    let mut limited = (&mut self.read).take(rest);
                    let read = pin!(limited.read_buf(payload));
                    if ready!(read.poll(cx))? == 0 {
                        return Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into()));
                    }
                }
            }
            Some(Partial::Direct {
                len, filled, owner, ..
            }) => {
                if *owner != target.owner || *len > target.buf.len() {
                    // Somebody else's buffer: not ours to continue.
                    return Poll::Pending;
                }
                // Bounded by `len` as above. `BufReader` hands over what it holds, then reads
                // large remainders from the socket straight into the caller's buffer.
                while *filled < *len {
                    let mut buf = ReadBuf::new(&mut target.buf[*filled..*len]);
                    ready!(Pin::new(&mut self.read).poll_read(cx, &mut buf))?;
                    let n = buf.filled().len();
                    if n == 0 {
                        return Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into()));
                    }
                    *filled += n;
                }
            }
            None => {}
        }
        self.read.get_mut().progress = None;
        match self.partial.take() {
            Some(Partial::Owned {
                kind: wire::FrameKind::Message,
                tag,
                payload,
                ..
            }) => Poll::Ready(Ok(Got::Frame(Frame::Message { tag, payload }))),
            Some(Partial::Owned {
                kind: wire::FrameKind::Abort,
                payload,
                ..
            }) => match wire::decode_abort(&payload) {
                Some((victim, reporter)) => {
                    Poll::Ready(Ok(Got::Frame(Frame::Abort { victim, reporter })))
                }
                None => Poll::Ready(Err(io::ErrorKind::InvalidData.into())),
            },
            Some(Partial::Direct { len, .. }) => Poll::Ready(Ok(Got::Direct(len))),
            None => Poll::Ready(Err(io::ErrorKind::InvalidData.into())),
        }
    }
}
