//! RESP2: the Redis wire protocol, as the replication link and the target
//! connections use it.
//!
//! Framing is done in two phases, like mini-redis: a cheap scan finds out
//! whether a whole frame is buffered and how long it is, then the frame is
//! cut out of the buffer. "Not enough bytes yet" is `Ok(None)`, never an
//! error: the caller reads more and tries again. Every length is checked
//! against a cap before anything is allocated, and nesting depth is bounded,
//! so hostile or corrupt input yields an error, never a panic or a huge
//! allocation.
//!
//! The replication offset counts bytes of the stream, so every parse reports
//! exactly how many bytes it consumed ([`Command::wire_len`]).

mod command;
pub mod encode;
mod frame;
mod reply;

pub use command::{parse_command, Command};
pub use frame::{parse_frame, Frame};
pub use reply::{scan_exec, scan_reply, ExecScan, ReplyScan};

/// Caps applied while framing; beyond them input is rejected as invalid.
pub mod limits {
    /// Largest bulk string accepted (Redis's own `proto-max-bulk-len` can be
    /// raised well past its 512 MB default, so the cap is generous).
    pub const MAX_BULK_LEN: u64 = 4 * 1024 * 1024 * 1024 - 1;
    /// Most elements in one array (a command's arguments, or a reply).
    pub const MAX_ARRAY_LEN: u64 = 64 * 1024 * 1024;
    /// Deepest nesting of arrays in a reply (EXEC returns arrays of arrays).
    pub const MAX_DEPTH: usize = 32;
    /// Longest header line (`*123\r\n`, `+OK\r\n`, `-ERR ...\r\n`).
    pub const MAX_LINE_LEN: usize = 64 * 1024;
}

/// Why a byte sequence is not valid RESP.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RespError {
    #[error("invalid RESP at byte {at}: {what}")]
    Invalid { at: usize, what: &'static str },
    #[error("RESP {what} of {len} is over the limit of {limit}")]
    TooLarge {
        what: &'static str,
        len: u64,
        limit: u64,
    },
    #[error("RESP nesting deeper than {0} levels")]
    TooDeep(usize),
}

/// Finds the `\r\n` that ends the line starting at `start`; returns the index
/// of the `\r`. `Ok(None)` when the line is not complete yet.
fn find_crlf(buf: &[u8], start: usize) -> Result<Option<usize>, RespError> {
    let window_end = buf.len().min(start + limits::MAX_LINE_LEN + 2);
    match memchr::memchr(b'\n', &buf[start..window_end]) {
        Some(i) => {
            let nl = start + i;
            if nl == start || buf[nl - 1] != b'\r' {
                return Err(RespError::Invalid {
                    at: nl,
                    what: "line ends with a bare \\n",
                });
            }
            Ok(Some(nl - 1))
        }
        None if window_end - start > limits::MAX_LINE_LEN => Err(RespError::TooLarge {
            what: "header line",
            len: (window_end - start) as u64,
            limit: limits::MAX_LINE_LEN as u64,
        }),
        None => Ok(None),
    }
}

/// Parses a decimal integer as RESP writes them (optional `-`, digits only).
fn parse_int(digits: &[u8], at: usize) -> Result<i64, RespError> {
    let invalid = RespError::Invalid {
        at,
        what: "not an integer",
    };
    let (neg, body) = match digits.split_first() {
        Some((b'-', rest)) => (true, rest),
        _ => (false, digits),
    };
    if body.is_empty() || body.len() > 19 {
        return Err(invalid);
    }
    let mut value: i64 = 0;
    for &b in body {
        if !b.is_ascii_digit() {
            return Err(invalid);
        }
        value = value
            .checked_mul(10)
            .and_then(|v| v.checked_add((b - b'0') as i64))
            .ok_or(invalid.clone())?;
    }
    Ok(if neg { -value } else { value })
}

/// Reads a `<prefix><integer>\r\n` header at `start`. Returns the integer and
/// the index just past the line.
fn read_header_int(buf: &[u8], start: usize) -> Result<Option<(i64, usize)>, RespError> {
    let Some(cr) = find_crlf(buf, start)? else {
        return Ok(None);
    };
    let value = parse_int(&buf[start + 1..cr], start)?;
    Ok(Some((value, cr + 2)))
}
