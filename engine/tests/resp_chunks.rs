//! The RESP parsers fed arbitrary input in arbitrary pieces: they must give
//! back exactly what was encoded, account for every byte, and never panic on
//! garbage.

use bytes::BytesMut;
use engine::resp::{encode, parse_command, parse_frame, scan_reply};
use proptest::prelude::*;

fn commands() -> impl Strategy<Value = Vec<Vec<Vec<u8>>>> {
    let arg = prop::collection::vec(any::<u8>(), 0..40);
    let command = prop::collection::vec(arg, 1..6);
    prop::collection::vec(command, 1..20)
}

proptest! {
    #[test]
    fn commands_survive_any_chunking(cmds in commands(), cuts in prop::collection::vec(1usize..50, 1..30)) {
        let mut wire = BytesMut::new();
        for cmd in &cmds {
            encode::command(&mut wire, cmd);
        }
        let total = wire.len();

        let mut buf = BytesMut::new();
        let mut fed = 0;
        let mut cut = cuts.iter().cycle();
        let mut parsed = Vec::new();
        let mut consumed = 0;
        while fed < total || !buf.is_empty() {
            if fed < total {
                let n = (*cut.next().unwrap()).min(total - fed);
                buf.extend_from_slice(&wire[fed..fed + n]);
                fed += n;
            }
            while let Some(cmd) = parse_command(&mut buf).unwrap() {
                consumed += cmd.wire_len();
                parsed.push(cmd.args().map(|a| a.to_vec()).collect::<Vec<_>>());
            }
            if fed == total && !buf.is_empty() {
                prop_assert!(false, "{} bytes left unparsed", buf.len());
            }
        }
        prop_assert_eq!(consumed, total);
        prop_assert_eq!(parsed, cmds);
    }

    #[test]
    fn garbage_never_panics(data in prop::collection::vec(any::<u8>(), 0..200)) {
        let mut buf = BytesMut::from(&data[..]);
        while let Ok(Some(_)) = parse_command(&mut buf) {}
        let mut buf = BytesMut::from(&data[..]);
        while let Ok(Some(_)) = parse_frame(&mut buf) {}
        let _ = scan_reply(&data);
    }

    #[test]
    fn resp_like_garbage_never_panics(parts in prop::collection::vec(
        prop_oneof![
            Just(b"*".to_vec()), Just(b"$".to_vec()), Just(b"+".to_vec()), Just(b"-".to_vec()),
            Just(b":".to_vec()), Just(b"\r\n".to_vec()), Just(b"-1".to_vec()), Just(b"3".to_vec()),
            Just(b"99999999999".to_vec()), prop::collection::vec(any::<u8>(), 0..4),
        ], 0..40)) {
        let data: Vec<u8> = parts.concat();
        let mut buf = BytesMut::from(&data[..]);
        while let Ok(Some(_)) = parse_command(&mut buf) {}
        let mut buf = BytesMut::from(&data[..]);
        while let Ok(Some(_)) = parse_frame(&mut buf) {}
        let _ = scan_reply(&data);
    }
}

#[test]
fn scan_reply_lengths_match_frame_parsing() {
    let replies: &[&[u8]] = &[
        b"+OK\r\n",
        b"-ERR x\r\n",
        b":1\r\n",
        b"$5\r\nhello\r\n",
        b"$-1\r\n",
        b"*2\r\n$1\r\na\r\n*1\r\n-ERR nested\r\n",
    ];
    let all: Vec<u8> = replies.concat();
    let mut offset = 0;
    for reply in replies {
        let scan = scan_reply(&all[offset..]).unwrap().unwrap();
        assert_eq!(scan.len, reply.len());
        let mut one = BytesMut::from(*reply);
        assert!(parse_frame(&mut one).unwrap().is_some());
        assert!(one.is_empty());
        offset += scan.len;
    }
}
