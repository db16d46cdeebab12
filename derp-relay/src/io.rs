//! Frames over an async byte stream.

use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};

use crate::proto::frame::{Frame, FrameError, HEADER_LEN, MAX_FRAME_PAYLOAD};

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Reads frames; the buffer is reused, so steady-state reads do not grow it.
pub struct FrameReader<R> {
    inner: R,
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub fn new(inner: R) -> Self {
        FrameReader { inner, buf: vec![0; 2 * (HEADER_LEN + MAX_FRAME_PAYLOAD)], start: 0, end: 0 }
    }

    /// The next frame, or `None` at a clean end of stream.
    pub async fn next(&mut self) -> Result<Option<Frame>, ReadError> {
        loop {
            if let Some((frame, used)) = Frame::decode(&self.buf[self.start..self.end])? {
                self.start += used;
                return Ok(Some(frame));
            }
            if self.start > 0 {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
            let n = self.inner.read(&mut self.buf[self.end..]).await?;
            if n == 0 {
                if self.end > 0 {
                    return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
                }
                return Ok(None);
            }
            self.end += n;
        }
    }
}

/// Encodes and writes one frame.
pub async fn write_frame<W: AsyncWrite + Unpin>(w: &mut W, frame: &Frame, scratch: &mut Vec<u8>) -> std::io::Result<()> {
    scratch.clear();
    frame.encode(scratch).map_err(std::io::Error::other)?;
    w.write_all(scratch).await
}
