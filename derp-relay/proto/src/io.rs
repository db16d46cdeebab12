//! Frames over an async byte stream.

use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};

use crate::frame::{Frame, FrameError, FrameRef, HEADER_LEN, MAX_FRAME_PAYLOAD};

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// First size of a reader's buffer; it grows to the largest frame seen.
const INITIAL_BUFFER: usize = 4 * 1024;
/// A busy connection's buffer (reads that fill it whole) grows to this, so
/// one read brings in dozens of frames.
const BUSY_BUFFER: usize = 64 * 1024;

/// Reads frames; the buffer is reused, so steady-state reads do not grow it,
/// and an idle connection holds only a small one.
pub struct FrameReader<R> {
    inner: R,
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// Largest payload accepted now (see [`FrameReader::set_limit`]).
    limit: usize,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub fn new(inner: R) -> Self {
        FrameReader {
            inner,
            buf: vec![0; INITIAL_BUFFER],
            start: 0,
            end: 0,
            limit: MAX_FRAME_PAYLOAD,
        }
    }

    /// Refuses frames with payloads over `limit` (at most
    /// [`MAX_FRAME_PAYLOAD`]) as [`FrameError::TooLong`] before reading them:
    /// a peer that has not proved its key only ever needs small ones, so it
    /// cannot make the buffer grow.
    pub fn set_limit(&mut self, limit: usize) {
        self.limit = limit.min(MAX_FRAME_PAYLOAD);
    }

    /// The next frame, or `None` at a clean end of stream.
    pub async fn next(&mut self) -> Result<Option<Frame>, ReadError> {
        let Some(n) = self.fill().await? else {
            return Ok(None);
        };
        let at = self.start;
        let (frame, _) = Frame::decode(&self.buf[at..at + n])?.ok_or(FrameError::Malformed {
            kind: self.buf[at],
            len: n,
        })?;
        self.start += n;
        Ok(Some(frame))
    }

    /// The next frame, packets borrowed from the buffer (valid until the
    /// next call), or `None` at a clean end of stream.
    pub async fn next_ref(&mut self) -> Result<Option<FrameRef<'_>>, ReadError> {
        let Some(n) = self.fill().await? else {
            return Ok(None);
        };
        let at = self.start;
        self.start += n;
        let whole = &self.buf[at..at + n];
        let (frame, _) = FrameRef::decode(whole)?.ok_or(FrameError::Malformed {
            kind: whole[0],
            len: n,
        })?;
        Ok(Some(frame))
    }

    /// Reads until a whole frame is buffered at `start`; its length, or
    /// `None` at a clean end of stream.
    async fn fill(&mut self) -> Result<Option<usize>, ReadError> {
        loop {
            let pending = &self.buf[self.start..self.end];
            if pending.len() >= HEADER_LEN {
                let len = u32::from_be_bytes([pending[1], pending[2], pending[3], pending[4]]);
                if len as usize > self.limit {
                    return Err(FrameError::TooLong(len as usize).into());
                }
                if pending.len() >= HEADER_LEN + len as usize {
                    return Ok(Some(HEADER_LEN + len as usize));
                }
            }
            if self.start > 0 {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
            if self.end == self.buf.len() {
                // A frame larger than the buffer (its length is within the
                // limit): make room for it.
                let need = if self.end >= HEADER_LEN {
                    HEADER_LEN
                        + u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]])
                            as usize
                } else {
                    HEADER_LEN
                };
                self.buf.resize(
                    need.max(self.buf.len() * 2)
                        .min(HEADER_LEN + MAX_FRAME_PAYLOAD),
                    0,
                );
            }
            let free = self.buf.len() - self.end;
            let n = self.inner.read(&mut self.buf[self.end..]).await?;
            if n == 0 {
                if self.end > 0 {
                    return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
                }
                return Ok(None);
            }
            self.end += n;
            if n == free && self.buf.len() < BUSY_BUFFER && self.limit > INITIAL_BUFFER {
                // The read filled the buffer: more is waiting. Bigger reads.
                self.buf.resize((self.buf.len() * 2).min(BUSY_BUFFER), 0);
            }
        }
    }
}

/// Encodes and writes one frame.
pub async fn write_frame<W: AsyncWrite + Unpin>(
    w: &mut W,
    frame: &Frame,
    scratch: &mut Vec<u8>,
) -> std::io::Result<()> {
    scratch.clear();
    frame.encode(scratch).map_err(std::io::Error::other)?;
    w.write_all(scratch).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reads_frames_of_every_size_through_a_small_buffer() {
        let mut bytes = Vec::new();
        let sizes = [
            0usize,
            1,
            100,
            INITIAL_BUFFER,
            40_000,
            MAX_FRAME_PAYLOAD - 32,
            5,
        ];
        for (i, n) in sizes.iter().enumerate() {
            Frame::SendPacket {
                dst: [i as u8; 32],
                data: vec![i as u8; *n],
            }
            .encode(&mut bytes)
            .unwrap();
        }
        // Delivered in small pieces, as a socket would.
        let (mut tx, rx) = tokio::io::duplex(4096);
        tokio::spawn(async move {
            use tokio::io::AsyncWriteExt as _;
            for chunk in bytes.chunks(3000) {
                tx.write_all(chunk).await.unwrap();
            }
        });
        let mut reader = FrameReader::new(rx);
        for (i, n) in sizes.iter().enumerate() {
            match reader.next().await.unwrap() {
                Some(Frame::SendPacket { dst, data }) => {
                    assert_eq!(dst, [i as u8; 32]);
                    assert_eq!(data.len(), *n);
                }
                other => panic!("{other:?}"),
            }
        }
        assert!(reader.next().await.unwrap().is_none());
    }

    #[tokio::test]
    async fn a_lowered_limit_refuses_large_frames_before_reading_them() {
        // Only the header of a 60 KiB frame arrives: refused at once, the
        // buffer never grows to hold it.
        let (mut tx, rx) = tokio::io::duplex(64);
        use tokio::io::AsyncWriteExt as _;
        tx.write_all(&[0x04, 0, 0, 0xf0, 0]).await.unwrap();
        let mut reader = FrameReader::new(rx);
        reader.set_limit(1024);
        assert!(matches!(
            reader.next().await,
            Err(ReadError::Frame(FrameError::TooLong(0xf000)))
        ));
        assert_eq!(reader.buf.len(), INITIAL_BUFFER);
    }
}
