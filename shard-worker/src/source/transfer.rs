//! The RDB transfer's framing: `$<len>\r\n` (a disk-based sync: exactly
//! `len` bytes follow) or `$EOF:<40 bytes>\r\n` (diskless: the same 40
//! bytes follow the RDB), with bare `\n` keep-alives before it while the
//! master prepares the snapshot.

use bytes::Buf;
use engine::rdb::RdbError;

use super::intake::Intake;
use crate::error::WorkerError;

/// The two RDB transfer forms.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Transfer {
    /// `$<len>`: the RDB is exactly `len` bytes (disk-based sync).
    Sized(u64),
    /// `$EOF:<mark>`: the RDB is followed by the same 40-byte mark
    /// (diskless sync).
    Marked(Vec<u8>),
}

/// Longest header line accepted.
const MAX_HEADER: usize = 1024;

/// Reads a transfer header line (without its `\r\n`).
pub(super) fn parse_transfer_header(addr: &str, line: &str) -> Result<Transfer, WorkerError> {
    let bad = || WorkerError::Unexpected {
        addr: addr.to_string(),
        context: "reading the RDB transfer header",
        reply: line.chars().take(120).collect(),
    };
    let rest = line.strip_prefix('$').ok_or_else(bad)?;
    if let Some(mark) = rest.strip_prefix("EOF:") {
        if mark.len() != 40 {
            return Err(bad());
        }
        return Ok(Transfer::Marked(mark.as_bytes().to_vec()));
    }
    rest.parse::<u64>().map(Transfer::Sized).map_err(|_| bad())
}

impl Intake {
    /// Reads `$<len>\r\n` or `$EOF:<40 bytes>\r\n`, skipping keep-alives.
    pub(super) async fn read_transfer_header(&mut self) -> Result<Transfer, WorkerError> {
        loop {
            while self.buf.first() == Some(&b'\n') {
                self.buf.advance(1);
            }
            if let Some(nl) = self.buf.iter().position(|&b| b == b'\n') {
                let line = self.buf.split_to(nl + 1);
                let text = String::from_utf8_lossy(&line)
                    .trim_end_matches(['\r', '\n'])
                    .to_string();
                return parse_transfer_header(&self.addr, &text);
            }
            if self.buf.len() > MAX_HEADER {
                return Err(WorkerError::Unexpected {
                    addr: self.addr.clone(),
                    context: "waiting for the RDB transfer",
                    reply: "a header line longer than 1 KiB".into(),
                });
            }
            self.read_more().await?;
        }
    }

    /// Checks the end of the transfer once the RDB reader reached its EOF
    /// opcode after `rdb_len` bytes.
    pub(super) async fn end_of_transfer(
        &mut self,
        header: &Transfer,
        rdb_len: u64,
    ) -> Result<(), WorkerError> {
        match header {
            Transfer::Sized(len) if *len != rdb_len => Err(WorkerError::Unexpected {
                addr: self.addr.clone(),
                context: "reading the RDB transfer",
                reply: format!("the RDB ended after {rdb_len} of the {len} bytes announced"),
            }),
            Transfer::Sized(_) => Ok(()),
            Transfer::Marked(mark) => self.expect_eof_mark(mark).await,
        }
    }

    async fn expect_eof_mark(&mut self, mark: &[u8]) -> Result<(), WorkerError> {
        while self.buf.len() < mark.len() {
            self.read_more().await?;
        }
        if &self.buf[..mark.len()] != mark {
            return Err(WorkerError::Unexpected {
                addr: self.addr.clone(),
                context: "reading the end of the RDB transfer",
                reply: "the end-of-transfer mark does not match".into(),
            });
        }
        self.buf.advance(mark.len());
        Ok(())
    }

    /// The worker error for an RDB reader error: the input's own failure
    /// (the link, the spill) as it was, anything else as an RDB error.
    pub(super) fn rdb_error(&self, source: RdbError) -> WorkerError {
        match source {
            RdbError::Io(e) if e.get_ref().is_some_and(|inner| inner.is::<WorkerError>()) => {
                match e.into_inner().map(|inner| inner.downcast::<WorkerError>()) {
                    Some(Ok(worker)) => *worker,
                    _ => WorkerError::Closed {
                        addr: self.addr.clone(),
                        context: "receiving the RDB",
                    },
                }
            }
            RdbError::Io(e) => WorkerError::Io {
                addr: self.addr.clone(),
                context: "receiving the RDB",
                source: e,
            },
            other => WorkerError::Rdb {
                addr: self.addr.clone(),
                source: other,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transfer_headers() {
        assert_eq!(
            parse_transfer_header("h:1", "$1234").unwrap(),
            Transfer::Sized(1234)
        );
        let mark = "x".repeat(40);
        assert_eq!(
            parse_transfer_header("h:1", &format!("$EOF:{mark}")).unwrap(),
            Transfer::Marked(mark.into_bytes())
        );
        assert!(parse_transfer_header("h:1", "$EOF:short").is_err());
        assert!(parse_transfer_header("h:1", "+OK").is_err());
        assert!(parse_transfer_header("h:1", "$-1").is_err());
    }

    #[test]
    fn a_bad_header_names_the_server_and_what_it_sent() {
        let err = parse_transfer_header("src:6379", "-ERR no").unwrap_err();
        let text = err.to_string();
        assert!(text.starts_with("src:6379: "), "{text}");
        assert!(text.contains("-ERR no"), "{text}");
    }
}
