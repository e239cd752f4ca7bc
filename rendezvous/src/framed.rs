//! Reading length-prefixed frames from a byte stream, shared by the server and the client.

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::time::Instant;

use crate::wire::{frame_len, DecodeError, PREFIX_LEN};

/// Why no frame could be read.
#[derive(Debug)]
pub(crate) enum ReadError {
    /// The stream failed or ended inside a frame.
    Io(io::Error),
    /// The length prefix is out of bounds; the stream cannot be resynchronised.
    Frame(DecodeError),
}

/// Accumulates one frame at a time.
///
/// [`next`](Self::next) is cancel-safe — bytes are only moved into the buffer after a read
/// completes — so callers can `select!` it against timers and outgoing traffic. It never reads
/// past the current frame, so the buffer is bounded by the largest frame allowed, and an
/// oversized prefix is rejected before its body is read.
#[derive(Debug, Default)]
pub(crate) struct FrameReader {
    buf: Vec<u8>,
    started: Option<Instant>,
}

impl FrameReader {
    pub(crate) fn new() -> FrameReader {
        FrameReader::default()
    }

    /// When the first byte of the frame being read arrived (`None` between frames).
    pub(crate) fn started(&self) -> Option<Instant> {
        self.started
    }

    /// The next complete frame, length prefix included, or `None` on a clean end of stream
    /// between frames.
    pub(crate) async fn next<R: AsyncRead + Unpin>(
        &mut self,
        rd: &mut R,
    ) -> Result<Option<Vec<u8>>, ReadError> {
        let mut chunk = [0u8; 4096];
        loop {
            let wanted = self.wanted().map_err(ReadError::Frame)?;
            if wanted == 0 {
                self.started = None;
                return Ok(Some(std::mem::take(&mut self.buf)));
            }
            let n = wanted.min(chunk.len());
            let got = rd.read(&mut chunk[..n]).await.map_err(ReadError::Io)?;
            if got == 0 {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(ReadError::Io(io::ErrorKind::UnexpectedEof.into()))
                };
            }
            if self.buf.is_empty() {
                self.started = Some(Instant::now());
            }
            self.buf.extend_from_slice(&chunk[..got]);
        }
    }

    /// How many more bytes the current frame needs (0: it is complete).
    fn wanted(&self) -> Result<usize, DecodeError> {
        match self.buf.get(..PREFIX_LEN) {
            Some(&[a, b, c, d]) => Ok(PREFIX_LEN + frame_len([a, b, c, d])? - self.buf.len()),
            _ => Ok(PREFIX_LEN - self.buf.len()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{ClientMsg, MAX_FRAME_LEN};

    #[tokio::test]
    async fn reads_frames_split_anyhow_and_rejects_oversized_prefixes() {
        let mut bytes = Vec::new();
        ClientMsg::Status.encode(&mut bytes).unwrap();
        ClientMsg::Leave.encode(&mut bytes).unwrap();
        let (mut tx, mut rx) = tokio::io::duplex(64);
        let writer = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            for b in bytes {
                tx.write_all(&[b]).await.unwrap();
            }
            tx.write_all(&((MAX_FRAME_LEN + 1) as u32).to_be_bytes())
                .await
                .unwrap();
        });
        let mut reader = FrameReader::new();
        let first = reader.next(&mut rx).await.unwrap().unwrap();
        assert_eq!(ClientMsg::decode(&first).unwrap(), ClientMsg::Status);
        let second = reader.next(&mut rx).await.unwrap().unwrap();
        assert_eq!(ClientMsg::decode(&second).unwrap(), ClientMsg::Leave);
        assert!(matches!(
            reader.next(&mut rx).await,
            Err(ReadError::Frame(DecodeError::TooLarge { .. }))
        ));
        writer.await.unwrap();
    }

    #[tokio::test]
    async fn end_of_stream_inside_a_frame_is_an_error() {
        let (mut tx, mut rx) = tokio::io::duplex(64);
        {
            use tokio::io::AsyncWriteExt;
            tx.write_all(&[0, 0, 0, 9, 1]).await.unwrap();
        }
        drop(tx);
        let mut reader = FrameReader::new();
        assert!(matches!(
            reader.next(&mut rx).await,
            Err(ReadError::Io(e)) if e.kind() == io::ErrorKind::UnexpectedEof
        ));
        let (tx, mut rx) = tokio::io::duplex(64);
        drop(tx);
        assert!(matches!(FrameReader::new().next(&mut rx).await, Ok(None)));
    }
}
