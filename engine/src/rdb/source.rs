//! A buffered byte source for the RDB reader.
//!
//! Reading a primitive only moves `pos`; the bytes consumed since the last
//! sync are fed to the CRC64 and to the capture buffer in bulk, when the
//! buffer is compacted or a capture ends. So checksumming and capturing cost
//! one pass over the data, not one call per length byte.

use bytes::{Buf, BytesMut};
use crc::{Crc, Digest, Table, CRC_64_REDIS};
use tokio::io::{AsyncRead, AsyncReadExt};

use super::RdbError;

/// CRC64 as Redis computes it (Jones polynomial, reflected), 16-way sliced.
pub(crate) static CRC64: Crc<u64, Table<16>> = Crc::<u64, Table<16>>::new(&CRC_64_REDIS);

/// Read size when more bytes are needed.
const READ_CHUNK: usize = 256 * 1024;

pub(crate) struct Source<R> {
    reader: R,
    buf: BytesMut,
    /// Next unread byte in `buf`.
    pos: usize,
    /// Stream offset of `buf[0]`.
    base: u64,
    crc: Option<Digest<'static, u64, Table<16>>>,
    /// `buf[crc_mark..pos]` is consumed but not yet checksummed.
    crc_mark: usize,
    capture: Option<BytesMut>,
    /// `buf[capture_mark..pos]` is consumed but not yet captured.
    capture_mark: usize,
    /// A capture longer than this is refused (see `begin_capture`).
    capture_limit: usize,
}

impl<R: AsyncRead + Unpin> Source<R> {
    pub(crate) fn new(reader: R, initial: BytesMut) -> Self {
        Source {
            reader,
            buf: initial,
            pos: 0,
            base: 0,
            crc: Some(CRC64.digest()),
            crc_mark: 0,
            capture: None,
            capture_mark: 0,
            capture_limit: usize::MAX,
        }
    }

    /// Offset of the next byte from the start of the RDB.
    pub(crate) fn offset(&self) -> u64 {
        self.base + self.pos as u64
    }

    fn available(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// Feeds the consumed bytes to the checksum and the capture.
    fn sync(&mut self) -> Result<(), RdbError> {
        if let Some(crc) = &mut self.crc {
            crc.update(&self.buf[self.crc_mark..self.pos]);
        }
        self.crc_mark = self.pos;
        if let Some(capture) = &mut self.capture {
            let new = &self.buf[self.capture_mark..self.pos];
            if capture.len() + new.len() > self.capture_limit {
                return Err(RdbError::TooLarge {
                    offset: self.base + self.pos as u64,
                    limit: self.capture_limit,
                    key: String::new(),
                });
            }
            capture.extend_from_slice(new);
        }
        self.capture_mark = self.pos;
        Ok(())
    }

    /// Makes sure `n` unread bytes are buffered.
    pub(crate) async fn need(&mut self, n: usize) -> Result<(), RdbError> {
        if self.available() >= n {
            return Ok(());
        }
        self.sync()?;
        self.base += self.pos as u64;
        self.buf.advance(self.pos);
        self.pos = 0;
        self.crc_mark = 0;
        self.capture_mark = 0;
        while self.buf.len() < n {
            // Grow by what actually arrives, so a corrupt length cannot make
            // us allocate memory for data that is not there.
            let want = (n - self.buf.len()).clamp(READ_CHUNK / 4, READ_CHUNK);
            self.buf.reserve(want);
            let read = self.reader.read_buf(&mut self.buf).await?;
            if read == 0 {
                return Err(RdbError::Truncated {
                    offset: self.base + self.buf.len() as u64,
                });
            }
        }
        Ok(())
    }

    pub(crate) async fn u8(&mut self) -> Result<u8, RdbError> {
        self.need(1).await?;
        let b = self.buf[self.pos];
        self.pos += 1;
        Ok(b)
    }

    pub(crate) async fn array<const N: usize>(&mut self) -> Result<[u8; N], RdbError> {
        self.need(N).await?;
        let mut out = [0u8; N];
        out.copy_from_slice(&self.buf[self.pos..self.pos + N]);
        self.pos += N;
        Ok(out)
    }

    /// Returns the next `n` bytes (copied out of the buffer).
    pub(crate) async fn take(&mut self, n: usize) -> Result<bytes::Bytes, RdbError> {
        self.need(n).await?;
        let out = bytes::Bytes::copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(out)
    }

    /// Consumes `n` bytes without keeping them (still checksummed and
    /// captured), a chunk at a time.
    pub(crate) async fn skip(&mut self, mut n: u64) -> Result<(), RdbError> {
        while n > 0 {
            if self.available() == 0 {
                self.need(1).await?;
            }
            let step = (self.available() as u64).min(n) as usize;
            self.pos += step;
            n -= step as u64;
        }
        Ok(())
    }

    /// Starts recording consumed bytes into a buffer that begins with
    /// `prefix`. At most `limit` bytes may be recorded.
    pub(crate) fn begin_capture(&mut self, prefix: &[u8], limit: usize) {
        let mut capture = BytesMut::with_capacity(prefix.len() + 64);
        capture.extend_from_slice(prefix);
        self.capture = Some(capture);
        self.capture_mark = self.pos;
        self.capture_limit = limit;
    }

    /// Bytes recorded so far by the capture in progress.
    pub(crate) fn captured_len(&self) -> usize {
        self.capture
            .as_ref()
            .map_or(0, |c| c.len() + (self.pos - self.capture_mark))
    }

    /// Stops recording and returns what was recorded.
    pub(crate) fn end_capture(&mut self) -> Result<BytesMut, RdbError> {
        self.sync()?;
        Ok(self.capture.take().unwrap_or_default())
    }

    /// Drops a capture in progress (after an error).
    pub(crate) fn abandon_capture(&mut self) {
        self.capture = None;
    }

    /// Finishes the checksum over everything consumed so far; later bytes
    /// (the checksum itself) are not included.
    pub(crate) fn finish_crc(&mut self) -> Result<u64, RdbError> {
        self.sync()?;
        Ok(self.crc.take().map(|d| d.finalize()).unwrap_or(0))
    }

    /// Returns the reader and the bytes buffered past the current position.
    pub(crate) fn into_parts(mut self) -> (R, BytesMut) {
        self.buf.advance(self.pos);
        (self.reader, self.buf)
    }
}
