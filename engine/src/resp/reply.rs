//! Scanning replies without decoding them.
//!
//! A writer only needs to know, for each reply in a pipeline, how long it is
//! and whether it (or anything nested in it, as in an EXEC reply) is an
//! error. Scanning answers both without allocating.

use std::ops::Range;

use super::{find_crlf, limits, read_header_int, RespError};

/// What a scan found about one complete reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplyScan {
    /// Bytes the reply takes in the buffer.
    pub len: usize,
    /// The text of the first error in the reply (without the `-`), as a range
    /// of the buffer; `None` when the reply holds no error.
    pub error: Option<Range<usize>>,
}

/// Scans the reply at the front of `buf`; `Ok(None)` when incomplete.
pub fn scan_reply(buf: &[u8]) -> Result<Option<ReplyScan>, RespError> {
    // Fast paths for the replies almost every write gets, alone and inside
    // a transaction.
    if buf.starts_with(b"+OK\r\n") {
        return Ok(Some(ReplyScan {
            len: 5,
            error: None,
        }));
    }
    if buf.starts_with(b"+QUEUED\r\n") {
        return Ok(Some(ReplyScan {
            len: 9,
            error: None,
        }));
    }
    let mut error = None;
    match scan_at(buf, 0, 0, &mut error)? {
        Some(end) => Ok(Some(ReplyScan { len: end, error })),
        None => Ok(None),
    }
}

/// An EXEC reply, element by element.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExecScan {
    /// The transaction ran: the reply's length, and the first error inside
    /// each element that holds one (element index, error text range).
    Ran {
        len: usize,
        errors: Vec<(usize, Range<usize>)>,
    },
    /// A nil reply: the transaction discarded itself because a key it
    /// WATCHed was written (our order guard held it back).
    Discarded { len: usize },
    /// Not an array (EXECABORT, an error): as [`scan_reply`] sees it.
    Other(ReplyScan),
}

/// Scans the EXEC reply at the front of `buf`, noting errors per element;
/// `Ok(None)` when incomplete.
pub fn scan_exec(buf: &[u8]) -> Result<Option<ExecScan>, RespError> {
    if buf.first() != Some(&b'*') {
        return Ok(scan_reply(buf)?.map(ExecScan::Other));
    }
    let Some((count, mut pos)) = read_header_int(buf, 0)? else {
        return Ok(None);
    };
    if count == -1 {
        return Ok(Some(ExecScan::Discarded { len: pos }));
    }
    if count < 0 {
        return Ok(scan_reply(buf)?.map(ExecScan::Other));
    }
    if count as u64 > limits::MAX_ARRAY_LEN {
        return Err(RespError::TooLarge {
            what: "array",
            len: count as u64,
            limit: limits::MAX_ARRAY_LEN,
        });
    }
    let mut errors = Vec::new();
    for i in 0..count as usize {
        let mut error = None;
        match scan_at(buf, pos, 1, &mut error)? {
            Some(next) => pos = next,
            None => return Ok(None),
        }
        if let Some(e) = error {
            errors.push((i, e));
        }
    }
    Ok(Some(ExecScan::Ran { len: pos, errors }))
}

fn scan_at(
    buf: &[u8],
    start: usize,
    depth: usize,
    error: &mut Option<Range<usize>>,
) -> Result<Option<usize>, RespError> {
    if depth > limits::MAX_DEPTH {
        return Err(RespError::TooDeep(limits::MAX_DEPTH));
    }
    if start >= buf.len() {
        return Ok(None);
    }
    match buf[start] {
        b'+' | b':' => Ok(find_crlf(buf, start)?.map(|cr| cr + 2)),
        b'-' => {
            let Some(cr) = find_crlf(buf, start)? else {
                return Ok(None);
            };
            if error.is_none() {
                *error = Some(start + 1..cr);
            }
            Ok(Some(cr + 2))
        }
        b'$' => {
            let Some((len, data_start)) = read_header_int(buf, start)? else {
                return Ok(None);
            };
            if len < 0 {
                return if len == -1 {
                    Ok(Some(data_start))
                } else {
                    Err(RespError::Invalid {
                        at: start,
                        what: "negative bulk length",
                    })
                };
            }
            if len as u64 > limits::MAX_BULK_LEN {
                return Err(RespError::TooLarge {
                    what: "bulk string",
                    len: len as u64,
                    limit: limits::MAX_BULK_LEN,
                });
            }
            let end = data_start + len as usize;
            if end + 2 > buf.len() {
                return Ok(None);
            }
            if &buf[end..end + 2] != b"\r\n" {
                return Err(RespError::Invalid {
                    at: end,
                    what: "bulk string not followed by \\r\\n",
                });
            }
            Ok(Some(end + 2))
        }
        b'*' => {
            let Some((count, mut pos)) = read_header_int(buf, start)? else {
                return Ok(None);
            };
            if count < 0 {
                return if count == -1 {
                    Ok(Some(pos))
                } else {
                    Err(RespError::Invalid {
                        at: start,
                        what: "negative array length",
                    })
                };
            }
            if count as u64 > limits::MAX_ARRAY_LEN {
                return Err(RespError::TooLarge {
                    what: "array",
                    len: count as u64,
                    limit: limits::MAX_ARRAY_LEN,
                });
            }
            for _ in 0..count {
                match scan_at(buf, pos, depth + 1, error)? {
                    Some(next) => pos = next,
                    None => return Ok(None),
                }
            }
            Ok(Some(pos))
        }
        _ => Err(RespError::Invalid {
            at: start,
            what: "unknown reply type",
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exec_replies_report_each_failed_element() {
        let buf = b"*4\r\n+OK\r\n-WRONGTYPE bad\r\n:3\r\n-ERR no\r\n+PONG\r\n";
        let Some(ExecScan::Ran { len, errors }) = scan_exec(buf).unwrap() else {
            panic!("an array")
        };
        assert_eq!(&buf[len..], b"+PONG\r\n");
        let texts: Vec<(usize, &[u8])> =
            errors.iter().map(|(i, r)| (*i, &buf[r.clone()])).collect();
        assert_eq!(texts, [(1, &b"WRONGTYPE bad"[..]), (3, &b"ERR no"[..])]);
        let abort = b"-EXECABORT Transaction discarded\r\n";
        assert!(matches!(
            scan_exec(abort).unwrap(),
            Some(ExecScan::Other(ReplyScan { error: Some(_), .. }))
        ));
        assert_eq!(scan_exec(b"*2\r\n+OK\r\n").unwrap(), None, "incomplete");
        assert_eq!(
            scan_exec(b"*-1\r\n+OK\r\n").unwrap(),
            Some(ExecScan::Discarded { len: 5 }),
            "a transaction a WATCHed write discarded"
        );
    }

    fn scan(input: &[u8]) -> Option<ReplyScan> {
        scan_reply(input).unwrap()
    }

    #[test]
    fn lengths_of_every_kind() {
        assert_eq!(scan(b"+OK\r\n").unwrap().len, 5);
        assert_eq!(scan(b"+QUEUED\r\nrest").unwrap().len, 9);
        assert_eq!(scan(b":12\r\n").unwrap().len, 5);
        assert_eq!(scan(b"$-1\r\n").unwrap().len, 5);
        assert_eq!(scan(b"$2\r\nab\r\n").unwrap().len, 8);
        assert_eq!(scan(b"*-1\r\n").unwrap().len, 5);
        assert_eq!(scan(b"*2\r\n:1\r\n$1\r\nx\r\n").unwrap().len, 15);
    }

    #[test]
    fn finds_errors_at_top_level_and_nested() {
        let input = b"-BUSYKEY Target key name already exists.\r\n";
        let s = scan(input).unwrap();
        assert_eq!(
            &input[s.error.unwrap()],
            b"BUSYKEY Target key name already exists."
        );

        let input = b"*3\r\n+OK\r\n-WRONGTYPE Operation\r\n-ERR second\r\n";
        let s = scan(input).unwrap();
        assert_eq!(s.len, input.len());
        assert_eq!(&input[s.error.unwrap()], b"WRONGTYPE Operation");
    }

    #[test]
    fn incomplete_replies_need_more_bytes() {
        for partial in [&b""[..], b"+O", b"$3\r\nab", b"*2\r\n:1\r\n", b"-ERR"] {
            assert_eq!(scan_reply(partial).unwrap(), None, "{partial:?}");
        }
    }

    #[test]
    fn depth_is_capped() {
        let deep = "*1\r\n".repeat(100);
        assert!(matches!(
            scan_reply(deep.as_bytes()),
            Err(RespError::TooDeep(_))
        ));
    }
}
