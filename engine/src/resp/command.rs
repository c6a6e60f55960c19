//! Commands as they arrive on a replication link: arrays of bulk strings.

use bytes::{Bytes, BytesMut};
use smallvec::SmallVec;

use super::{limits, read_header_int, RespError};

/// One command, cut zero-copy out of the stream buffer.
///
/// `wire` holds the exact bytes the master sent, so the command can be
/// forwarded to a target without re-encoding, and `wire_len` is what the
/// command adds to the replication offset. Arguments are ranges into `wire`.
#[derive(Clone, PartialEq, Eq)]
pub struct Command {
    wire: Bytes,
    args: SmallVec<[(u32, u32); 6]>,
}

impl Command {
    /// Builds a command from arguments (encoding them as RESP).
    pub fn from_args<A: AsRef<[u8]>>(args: &[A]) -> Command {
        let mut buf = BytesMut::new();
        super::encode::command(&mut buf, args);
        parse_command(&mut buf)
            .expect("encoder output is valid RESP")
            .expect("encoder output is complete")
    }

    /// The exact bytes of the command on the wire.
    pub fn wire(&self) -> &Bytes {
        &self.wire
    }

    /// The exact bytes of the command, without the argument index.
    pub fn into_wire(self) -> Bytes {
        self.wire
    }

    /// How many bytes of the stream the command took.
    pub fn wire_len(&self) -> usize {
        self.wire.len()
    }

    pub fn argc(&self) -> usize {
        self.args.len()
    }

    /// Argument `i` (0 is the command name). Panics when out of range, like
    /// slice indexing; use [`Command::get`] when unsure.
    pub fn arg(&self, i: usize) -> &[u8] {
        let (start, end) = self.args[i];
        &self.wire[start as usize..end as usize]
    }

    pub fn get(&self, i: usize) -> Option<&[u8]> {
        self.args
            .get(i)
            .map(|&(s, e)| &self.wire[s as usize..e as usize])
    }

    /// Argument `i` as a zero-copy `Bytes`.
    pub fn arg_bytes(&self, i: usize) -> Bytes {
        let (start, end) = self.args[i];
        self.wire.slice(start as usize..end as usize)
    }

    pub fn name(&self) -> &[u8] {
        self.arg(0)
    }

    pub fn args(&self) -> impl ExactSizeIterator<Item = &[u8]> + '_ {
        self.args
            .iter()
            .map(|&(s, e)| &self.wire[s as usize..e as usize])
    }

    /// Argument 0 compared without regard to case.
    pub fn is(&self, name: &str) -> bool {
        self.name().eq_ignore_ascii_case(name.as_bytes())
    }
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut list = f.debug_list();
        for arg in self.args() {
            list.entry(&String::from_utf8_lossy(arg));
        }
        list.finish()
    }
}

/// Cuts one command (`*N\r\n` followed by N bulk strings) off the front of
/// `buf`. `Ok(None)` means more bytes are needed and `buf` is untouched.
pub fn parse_command(buf: &mut BytesMut) -> Result<Option<Command>, RespError> {
    let Some((len, args)) = scan_command(buf)? else {
        return Ok(None);
    };
    let wire = buf.split_to(len).freeze();
    Ok(Some(Command { wire, args }))
}

type ArgRanges = SmallVec<[(u32, u32); 6]>;

fn scan_command(buf: &[u8]) -> Result<Option<(usize, ArgRanges)>, RespError> {
    if buf.is_empty() {
        return Ok(None);
    }
    if buf[0] != b'*' {
        return Err(RespError::Invalid {
            at: 0,
            what: "a command must be an array",
        });
    }
    let Some((count, mut pos)) = read_header_int(buf, 0)? else {
        return Ok(None);
    };
    if count < 1 {
        return Err(RespError::Invalid {
            at: 0,
            what: "a command needs at least one argument",
        });
    }
    if count as u64 > limits::MAX_ARRAY_LEN {
        return Err(RespError::TooLarge {
            what: "argument count",
            len: count as u64,
            limit: limits::MAX_ARRAY_LEN,
        });
    }
    // Capacity is bounded by what can actually be in the buffer, so a
    // corrupt count cannot force a large allocation.
    let mut args = ArgRanges::with_capacity((count as usize).min(buf.len() / 4 + 1));
    for _ in 0..count {
        if pos >= buf.len() {
            return Ok(None);
        }
        if buf[pos] != b'$' {
            return Err(RespError::Invalid {
                at: pos,
                what: "a command argument must be a bulk string",
            });
        }
        let Some((len, data_start)) = read_header_int(buf, pos)? else {
            return Ok(None);
        };
        if len < 0 {
            return Err(RespError::Invalid {
                at: pos,
                what: "a command argument cannot be null",
            });
        }
        if len as u64 > limits::MAX_BULK_LEN {
            return Err(RespError::TooLarge {
                what: "bulk string",
                len: len as u64,
                limit: limits::MAX_BULK_LEN,
            });
        }
        let data_end = data_start + len as usize;
        if data_end + 2 > buf.len() {
            return Ok(None);
        }
        if &buf[data_end..data_end + 2] != b"\r\n" {
            return Err(RespError::Invalid {
                at: data_end,
                what: "bulk string not followed by \\r\\n",
            });
        }
        if data_end > u32::MAX as usize {
            return Err(RespError::TooLarge {
                what: "command",
                len: data_end as u64,
                limit: u32::MAX as u64,
            });
        }
        args.push((data_start as u32, data_end as u32));
        pos = data_end + 2;
    }
    Ok(Some((pos, args)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_all(input: &[u8]) -> Result<Vec<Command>, RespError> {
        let mut buf = BytesMut::from(input);
        let mut out = Vec::new();
        while let Some(cmd) = parse_command(&mut buf)? {
            out.push(cmd);
        }
        Ok(out)
    }

    #[test]
    fn parses_a_command_and_reports_its_wire_length() {
        let input = b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$5\r\nhello\r\n";
        let cmds = parse_all(input).unwrap();
        assert_eq!(cmds.len(), 1);
        assert_eq!(cmds[0].wire_len(), input.len());
        assert_eq!(
            cmds[0].args().collect::<Vec<_>>(),
            vec![&b"SET"[..], b"k", b"hello"]
        );
        assert!(cmds[0].is("set"));
    }

    #[test]
    fn incomplete_input_is_not_an_error_and_consumes_nothing() {
        let input = b"*2\r\n$4\r\nPING\r\n$3\r\nab";
        let mut buf = BytesMut::from(&input[..]);
        assert_eq!(parse_command(&mut buf).unwrap(), None);
        assert_eq!(&buf[..], &input[..]);
    }

    #[test]
    fn empty_and_binary_arguments() {
        let cmds = parse_all(b"*2\r\n$0\r\n\r\n$3\r\n\x00\r\n\r\n").unwrap();
        assert_eq!(cmds[0].arg(0), b"");
        assert_eq!(cmds[0].arg(1), b"\x00\r\n");
    }

    #[test]
    fn rejects_what_is_not_a_command() {
        for bad in [
            &b"+OK\r\n"[..],
            b"*0\r\n",
            b"*-1\r\n",
            b"*1\r\n:5\r\n",
            b"*1\r\n$-1\r\n",
            b"*1\r\n$3\r\nabcXY",
            b"*x\r\n",
            b"*1\n",
            b"*99999999999999999999\r\n",
        ] {
            assert!(
                parse_all(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn huge_declared_lengths_are_refused_before_allocating() {
        assert!(matches!(
            parse_all(b"*1\r\n$99999999999\r\n"),
            Err(RespError::TooLarge { .. })
        ));
        assert!(matches!(
            parse_all(b"*999999999\r\n"),
            Err(RespError::TooLarge { .. })
        ));
    }

    #[test]
    fn from_args_round_trips() {
        let cmd = Command::from_args(&["RESTORE", "key", "0", "payload"]);
        assert_eq!(cmd.argc(), 4);
        assert_eq!(cmd.arg(3), b"payload");
        assert_eq!(
            &cmd.wire()[..],
            b"*4\r\n$7\r\nRESTORE\r\n$3\r\nkey\r\n$1\r\n0\r\n$7\r\npayload\r\n"
        );
    }
}
