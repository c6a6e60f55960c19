//! RESTORE commands from RDB entries.
//!
//! A DUMP payload is the value's RDB serialization framed by its type byte
//! and a trailer (RDB version, CRC64); the RDB reader already hands entries
//! over in that form, so a RESTORE is the payload plus the key, TTL and
//! options.

use bytes::BytesMut;

use crate::rdb::{Entry, ValueKind, CRC64};
use crate::rebuild::TargetCaps;
use crate::resp::encode;

/// How RESTORE treats a key that already exists on the target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Existing {
    /// `REPLACE`: the source's value wins. A re-sync therefore never
    /// duplicates list elements or leaves a stale value.
    Replace,
    /// No `REPLACE`: the target's key is kept and the server answers
    /// `BUSYKEY`, which the writer counts as a skipped key.
    Keep,
}

/// Appends `RESTORE key ttl payload [REPLACE] ABSTTL [IDLETIME s | FREQ f]`.
///
/// The TTL is absolute (ABSTTL) so that time spent in transit does not
/// extend it. A key whose expiry has passed is restored with an expiry in
/// the past, which the server treats as a deletion. The LRU idle time or
/// LFU counter is carried over when the source recorded one.
pub fn encode_restore(buf: &mut BytesMut, key: &[u8], entry: &Entry, existing: Existing) {
    encode_restore_payload(buf, key, entry, entry.dump_payload(), existing)
}

/// [`encode_restore`] with another payload for the entry's value (one
/// [`restamp`]ed for an older target).
pub fn encode_restore_payload(
    buf: &mut BytesMut,
    key: &[u8],
    entry: &Entry,
    payload: &[u8],
    existing: Existing,
) {
    let replace = existing == Existing::Replace;
    let lru = entry
        .idle_secs
        .map(|s| (&b"IDLETIME"[..], s as i64))
        .or(entry.freq.map(|f| (&b"FREQ"[..], f as i64)));
    let argc = 5 + replace as usize + if lru.is_some() { 2 } else { 0 };
    encode::array_header(buf, argc);
    encode::bulk(buf, b"RESTORE");
    encode::bulk(buf, key);
    // 0 means "no expiry"; an expiry at or before the epoch becomes 1 ms,
    // already expired.
    encode::bulk_int(buf, entry.expire_ms.map_or(0, |ms| ms.max(1)));
    encode::bulk(buf, payload);
    if replace {
        encode::bulk(buf, b"REPLACE");
    }
    encode::bulk(buf, b"ABSTTL");
    if let Some((option, value)) = lru {
        encode::bulk(buf, option);
        encode::bulk_int(buf, value);
    }
}

/// Why a DUMP payload is not well-formed.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum DumpError {
    #[error("DUMP payload of {0} bytes is too short")]
    TooShort(usize),
    #[error("DUMP payload checksum mismatch")]
    Checksum,
}

/// Checks a DUMP payload's trailer; returns its type byte and RDB version.
pub fn check_dump_payload(payload: &[u8]) -> Result<(u8, u16), DumpError> {
    if payload.len() < 11 {
        return Err(DumpError::TooShort(payload.len()));
    }
    let n = payload.len();
    let crc = u64::from_le_bytes(payload[n - 8..].try_into().expect("8 bytes"));
    if CRC64.checksum(&payload[..n - 8]) != crc {
        return Err(DumpError::Checksum);
    }
    let version = u16::from_le_bytes([payload[n - 10], payload[n - 9]]);
    Ok((payload[0], version))
}

/// The same DUMP payload stamped with another RDB version. A server refuses
/// a payload newer than its own RDB version even when the value's type and
/// encoding are ones it reads (a string is serialized the same way in
/// every version); [`crate::rdb::consts::min_rdb_version_of_type`] says
/// which types an older server can read.
pub fn restamp(payload: &[u8], rdb_version: u16) -> BytesMut {
    let body = &payload[..payload.len() - 10];
    let mut out = BytesMut::with_capacity(payload.len());
    out.extend_from_slice(body);
    crate::rdb::finish_dump_payload(&mut out, rdb_version);
    out
}

/// Whether a server of RDB version `target` can load a value of RDB type
/// `t` serialized at version `from`: as is (`Some(false)`), once restamped
/// with its version (`Some(true)`), or not at all (`None`).
pub fn restore_compat(t: u8, from: u16, target: u16) -> Option<bool> {
    if from <= target {
        return Some(false);
    }
    let min = crate::rdb::consts::min_rdb_version_of_type(t)?;
    (min <= target).then_some(true)
}

/// How a value reaches the target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Carry {
    /// RESTORE of the payload as is.
    Restore,
    /// RESTORE of the payload stamped with the target's RDB version (the
    /// encoding is one the target reads).
    Restamp,
    /// Ordinary commands ([`crate::rebuild`]).
    Rebuild,
}

/// How a value of RDB type `t`, serialized at RDB version `version` (a
/// snapshot's entry, or a replicated RESTORE's payload), reaches a target
/// with `caps`; `force_rewrite` rebuilds whatever can be rebuilt. Module
/// values only ever go as RESTORE: only their module could rebuild one.
pub fn carry(t: u8, version: u16, caps: TargetCaps, force_rewrite: bool) -> Carry {
    let is_module = ValueKind::of_rdb_type(t) == Some(ValueKind::Module);
    let force = force_rewrite && !is_module;
    match restore_compat(t, version, caps.rdb_version()) {
        Some(false) if !force => Carry::Restore,
        Some(true) if !force => Carry::Restamp,
        None if is_module => Carry::Restore,
        _ => Carry::Rebuild,
    }
}

/// The parts of a `RESTORE key ttl payload [REPLACE] [ABSTTL] [IDLETIME s]
/// [FREQ f]` command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RestoreArgs {
    pub key: bytes::Bytes,
    /// Absolute expiry in Unix ms (a relative TTL is converted with `now_ms`).
    pub expire_ms: Option<i64>,
    pub replace: bool,
    pub payload: bytes::Bytes,
}

/// Whether `cmd` is a RESTORE (or RESTORE-ASKING).
pub fn is_restore(cmd: &crate::resp::Command) -> bool {
    cmd.is("RESTORE") || cmd.is("RESTORE-ASKING")
}

/// Reads a RESTORE (or RESTORE-ASKING) command; `None` when it is not one
/// or is malformed (the target will say why).
pub fn parse_restore(cmd: &crate::resp::Command, now_ms: i64) -> Option<RestoreArgs> {
    if !is_restore(cmd) || cmd.argc() < 4 {
        return None;
    }
    let ttl: i64 = std::str::from_utf8(cmd.arg(2)).ok()?.parse().ok()?;
    let mut replace = false;
    let mut absttl = false;
    let mut i = 4;
    while i < cmd.argc() {
        let opt = cmd.arg(i);
        if opt.eq_ignore_ascii_case(b"REPLACE") {
            replace = true;
        } else if opt.eq_ignore_ascii_case(b"ABSTTL") {
            absttl = true;
        } else if opt.eq_ignore_ascii_case(b"IDLETIME") || opt.eq_ignore_ascii_case(b"FREQ") {
            i += 1;
        } else {
            return None;
        }
        i += 1;
    }
    let expire_ms = match (ttl, absttl) {
        (0, _) => None,
        (t, true) => Some(t),
        (t, false) => Some(now_ms + t),
    };
    Some(RestoreArgs {
        key: cmd.arg_bytes(1),
        expire_ms,
        replace,
        payload: cmd.arg_bytes(3),
    })
}

/// The RESTORE that a slot migration's `RESTORE-ASKING key ttl payload`
/// stands for on the target: with REPLACE (the target may still hold the
/// key from the exporting master's stream; the copy is its whole value),
/// and with an absolute TTL (the importing master counted it from when it
/// ran the command: `now_ms`). `None` when it does not parse.
pub fn import_restore(cmd: &crate::resp::Command, now_ms: i64) -> Option<crate::resp::Command> {
    let args = parse_restore(cmd, now_ms)?;
    let ttl = itoa::Buffer::new()
        .format(args.expire_ms.unwrap_or(0))
        .to_owned();
    let mut argv: Vec<&[u8]> = vec![b"RESTORE", &args.key, ttl.as_bytes(), &args.payload];
    argv.push(b"REPLACE");
    if args.expire_ms.is_some() {
        argv.push(b"ABSTTL");
    }
    Some(crate::resp::Command::from_args(&argv))
}

/// Decodes the value a DUMP payload holds.
pub fn decode_payload(payload: &[u8]) -> Result<crate::rdb::value::Value, String> {
    let (t, _) = check_dump_payload(payload).map_err(|e| e.to_string())?;
    crate::rdb::value::decode(t, &payload[1..payload.len() - 10]).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resp::Command;

    #[test]
    fn restamped_payloads_keep_their_value_and_check() {
        let mut p = BytesMut::from(&[0u8, 3, b'a', b'b', b'c'][..]);
        crate::rdb::finish_dump_payload(&mut p, 10);
        let older = restamp(&p, 9);
        assert_eq!(check_dump_payload(&older), Ok((0, 9)));
        assert_eq!(&older[..5], &p[..5]);
        assert_eq!(
            decode_payload(&older).unwrap(),
            crate::rdb::value::Value::String("abc".into())
        );
    }

    #[test]
    fn compat_by_type_and_version() {
        use crate::rdb::consts::*;
        assert_eq!(restore_compat(TYPE_HASH_LISTPACK, 10, 10), Some(false));
        assert_eq!(restore_compat(TYPE_STRING, 10, 9), Some(true));
        assert_eq!(restore_compat(TYPE_SET_INTSET, 11, 9), Some(true));
        assert_eq!(restore_compat(TYPE_HASH_LISTPACK, 10, 9), None);
        assert_eq!(restore_compat(TYPE_SET_LISTPACK, 11, 10), None);
        assert_eq!(restore_compat(TYPE_STREAM_LISTPACKS_3, 11, 10), None);
        assert_eq!(restore_compat(TYPE_LIST_QUICKLIST_2, 12, 11), Some(true));
        assert_eq!(restore_compat(TYPE_HASH_LISTPACK_EX, 12, 11), None);
    }

    #[test]
    fn carry_by_type_version_and_force() {
        use crate::rdb::consts::*;
        let v62 = TargetCaps::new(6, 2);
        let v70 = TargetCaps::new(7, 0);
        assert_eq!(carry(TYPE_HASH_LISTPACK, 10, v70, false), Carry::Restore);
        assert_eq!(carry(TYPE_STRING, 10, v62, false), Carry::Restamp);
        assert_eq!(carry(TYPE_HASH_LISTPACK, 10, v62, false), Carry::Rebuild);
        assert_eq!(carry(TYPE_STRING, 10, v70, true), Carry::Rebuild);
        // Module values: RESTORE whatever the versions or the option.
        assert_eq!(carry(TYPE_MODULE_2, 10, v70, true), Carry::Restore);
        assert_eq!(carry(TYPE_MODULE_2, 11, v62, true), Carry::Restamp);
    }

    #[test]
    fn a_migrations_restore_replaces_with_an_absolute_ttl() {
        let cmd = Command::from_args(&["RESTORE-ASKING", "k", "5000", "P"]);
        let import = import_restore(&cmd, 1_000).unwrap();
        let argv: Vec<&[u8]> = import.args().collect();
        assert_eq!(
            argv,
            [&b"RESTORE"[..], b"k", b"6000", b"P", b"REPLACE", b"ABSTTL"]
        );
        let cmd = Command::from_args(&["RESTORE-ASKING", "k", "0", "P", "REPLACE"]);
        let argv: Vec<Vec<u8>> = import_restore(&cmd, 1_000)
            .unwrap()
            .args()
            .map(<[u8]>::to_vec)
            .collect();
        assert_eq!(argv, [&b"RESTORE"[..], b"k", b"0", b"P", b"REPLACE"]);
    }

    #[test]
    fn restore_commands_parse() {
        let cmd = Command::from_args(&[
            "RESTORE", "k", "5000", "PAYLOAD", "REPLACE", "IDLETIME", "3",
        ]);
        let args = parse_restore(&cmd, 1_000).unwrap();
        assert_eq!(&args.key[..], b"k");
        assert_eq!(args.expire_ms, Some(6_000));
        assert!(args.replace);
        let cmd = Command::from_args(&["restore", "k", "123", "P", "absttl"]);
        assert_eq!(parse_restore(&cmd, 1_000).unwrap().expire_ms, Some(123));
        let cmd = Command::from_args(&["RESTORE", "k", "0", "P"]);
        assert_eq!(parse_restore(&cmd, 1_000).unwrap().expire_ms, None);
        assert!(parse_restore(&Command::from_args(&["SET", "k", "0", "P"]), 0).is_none());
        assert!(parse_restore(&Command::from_args(&["RESTORE", "k", "x", "P"]), 0).is_none());
    }
}
