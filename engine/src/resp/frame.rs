//! Whole RESP2 values, for the few places that need a reply's content (the
//! replication handshake, control queries).

use bytes::{Buf, Bytes, BytesMut};

use super::reply::scan_reply;
use super::{find_crlf, parse_int, RespError};

/// A decoded RESP2 value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    Simple(Bytes),
    Error(Bytes),
    Integer(i64),
    Bulk(Bytes),
    Null,
    Array(Vec<Frame>),
}

impl Frame {
    /// The text of a simple string, error or bulk string.
    pub fn as_bytes(&self) -> Option<&[u8]> {
        match self {
            Frame::Simple(b) | Frame::Error(b) | Frame::Bulk(b) => Some(b),
            _ => None,
        }
    }

    pub fn is_error(&self) -> bool {
        matches!(self, Frame::Error(_))
    }

    /// Lossy text, for messages.
    pub fn to_text(&self) -> String {
        match self {
            Frame::Simple(b) | Frame::Error(b) | Frame::Bulk(b) => {
                String::from_utf8_lossy(b).into_owned()
            }
            Frame::Integer(i) => i.to_string(),
            Frame::Null => "(nil)".to_string(),
            Frame::Array(items) => {
                let inner: Vec<String> = items.iter().map(Frame::to_text).collect();
                format!("[{}]", inner.join(", "))
            }
        }
    }
}

/// Cuts one value off the front of `buf`; `Ok(None)` when incomplete.
pub fn parse_frame(buf: &mut BytesMut) -> Result<Option<Frame>, RespError> {
    // The scan validates structure and length once, so the decode below can
    // trust both.
    let Some(scan) = scan_reply(buf)? else {
        return Ok(None);
    };
    let mut bytes = buf.split_to(scan.len).freeze();
    Ok(Some(decode(&mut bytes)?))
}

fn decode(bytes: &mut Bytes) -> Result<Frame, RespError> {
    let cr = find_crlf(bytes, 0)?.ok_or(RespError::Invalid {
        at: 0,
        what: "truncated frame",
    })?;
    let kind = bytes[0];
    let line = bytes.slice(1..cr);
    bytes.advance(cr + 2);
    Ok(match kind {
        b'+' => Frame::Simple(line),
        b'-' => Frame::Error(line),
        b':' => Frame::Integer(parse_int(&line, 0)?),
        b'$' => {
            let len = parse_int(&line, 0)?;
            if len < 0 {
                Frame::Null
            } else {
                let data = bytes.split_to(len as usize);
                bytes.advance(2);
                Frame::Bulk(data)
            }
        }
        b'*' => {
            let len = parse_int(&line, 0)?;
            if len < 0 {
                Frame::Null
            } else {
                let mut items = Vec::with_capacity(len as usize);
                for _ in 0..len {
                    items.push(decode(bytes)?);
                }
                Frame::Array(items)
            }
        }
        _ => {
            return Err(RespError::Invalid {
                at: 0,
                what: "unknown frame type",
            })
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_every_kind() {
        let mut buf = BytesMut::from(
            &b"+OK\r\n-ERR no\r\n:-42\r\n$3\r\nabc\r\n$-1\r\n*2\r\n:1\r\n*1\r\n+x\r\n"[..],
        );
        let mut frames = Vec::new();
        while let Some(f) = parse_frame(&mut buf).unwrap() {
            frames.push(f);
        }
        assert_eq!(
            frames,
            vec![
                Frame::Simple(Bytes::from_static(b"OK")),
                Frame::Error(Bytes::from_static(b"ERR no")),
                Frame::Integer(-42),
                Frame::Bulk(Bytes::from_static(b"abc")),
                Frame::Null,
                Frame::Array(vec![
                    Frame::Integer(1),
                    Frame::Array(vec![Frame::Simple(Bytes::from_static(b"x"))])
                ]),
            ]
        );
        assert!(buf.is_empty());
    }
}
