//! RESTORE commands from RDB entries.
//!
//! A DUMP payload is the value's RDB serialization framed by its type byte
//! and a trailer (RDB version, CRC64); the RDB reader already hands entries
//! over in that form, so a RESTORE is the payload plus the key, TTL and
//! options.

use bytes::BytesMut;

use crate::rdb::{Entry, CRC64};
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
    encode::bulk(buf, entry.dump_payload());
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
