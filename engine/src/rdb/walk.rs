//! Walking serialized values: every length, string and fixed field of each
//! type is read (and so checked for presence), without decoding what does
//! not need decoding. The source captures the bytes as they are walked.

use bytes::Bytes;
use tokio::io::AsyncRead;

use super::consts::*;
use super::source::Source;
use super::value::is_sequence;
use super::{RdbError, MAX_STRING_LEN};

/// A length field: a plain length, or the tag of a special string encoding.
enum Length {
    Len(u64),
    Encoded(u8),
}

async fn length<R: AsyncRead + Unpin>(src: &mut Source<R>) -> Result<Length, RdbError> {
    let at = src.offset();
    let first = src.u8().await?;
    Ok(match first >> 6 {
        0 => Length::Len((first & 0x3f) as u64),
        1 => {
            let next = src.u8().await?;
            Length::Len((((first & 0x3f) as u64) << 8) | next as u64)
        }
        2 => match first {
            0x80 => Length::Len(u32::from_be_bytes(src.array().await?) as u64),
            0x81 => Length::Len(u64::from_be_bytes(src.array().await?)),
            _ => {
                return Err(RdbError::Invalid {
                    offset: at,
                    what: format!("unknown length encoding {first:#04x}"),
                })
            }
        },
        _ => Length::Encoded(first & 0x3f),
    })
}

/// A length that must not be a special string encoding.
pub(super) async fn plain_len<R: AsyncRead + Unpin>(src: &mut Source<R>) -> Result<u64, RdbError> {
    let at = src.offset();
    match length(src).await? {
        Length::Len(n) => Ok(n),
        Length::Encoded(tag) => Err(RdbError::Invalid {
            offset: at,
            what: format!("expected a length, found string encoding {tag}"),
        }),
    }
}

/// Reads and decodes a string (integer and LZF encodings included).
pub(super) async fn string<R: AsyncRead + Unpin>(
    src: &mut Source<R>,
    max_len: u64,
) -> Result<Bytes, RdbError> {
    let at = src.offset();
    match length(src).await? {
        Length::Len(n) => {
            check_len(n, max_len, at, "string")?;
            src.take(n as usize).await
        }
        Length::Encoded(ENC_INT8) => {
            let v = src.u8().await? as i8;
            Ok(Bytes::from(v.to_string()))
        }
        Length::Encoded(ENC_INT16) => {
            let v = i16::from_le_bytes(src.array().await?);
            Ok(Bytes::from(v.to_string()))
        }
        Length::Encoded(ENC_INT32) => {
            let v = i32::from_le_bytes(src.array().await?);
            Ok(Bytes::from(v.to_string()))
        }
        Length::Encoded(ENC_LZF) => {
            let compressed_len = plain_len(src).await?;
            let len = plain_len(src).await?;
            check_len(compressed_len, max_len, at, "compressed string")?;
            check_len(len, max_len, at, "string")?;
            let compressed = src.take(compressed_len as usize).await?;
            lzf_decompress(&compressed, len as usize, at)
        }
        Length::Encoded(tag) => Err(RdbError::Invalid {
            offset: at,
            what: format!("unknown string encoding {tag}"),
        }),
    }
}

pub(crate) fn lzf_decompress(data: &[u8], len: usize, at: u64) -> Result<Bytes, RdbError> {
    if len == 0 {
        return Ok(Bytes::new());
    }
    // A back-reference of 3 bytes yields at most 264: a stated length past
    // that ratio is corrupt, and must not be allocated.
    if len > data.len().saturating_mul(90).saturating_add(64) || len as u64 > MAX_STRING_LEN {
        return Err(RdbError::Invalid {
            offset: at,
            what: format!(
                "LZF data of {} bytes cannot decompress to the stated {len}",
                data.len()
            ),
        });
    }
    match lzf::decompress(data, len) {
        Ok(out) if out.len() == len => Ok(Bytes::from(out)),
        _ => Err(RdbError::Invalid {
            offset: at,
            what: "LZF data does not decompress to its stated length".into(),
        }),
    }
}

fn check_len(n: u64, max: u64, at: u64, what: &str) -> Result<(), RdbError> {
    if n > max {
        return Err(RdbError::Invalid {
            offset: at,
            what: format!("{what} length {n} is over the limit of {max}"),
        });
    }
    Ok(())
}

/// Steps over a string without decoding it.
async fn skip_string<R: AsyncRead + Unpin>(src: &mut Source<R>) -> Result<(), RdbError> {
    let at = src.offset();
    let header = length(src).await?;
    skip_string_body(src, header, at).await
}

/// The length of a plain (not integer- or LZF-encoded) string that starts
/// here, after reading its header; `None` for the other encodings, whose
/// header is then consumed too and must be finished with
/// [`skip_string_rest`].
pub(super) async fn string_header<R: AsyncRead + Unpin>(
    src: &mut Source<R>,
) -> Result<StringHeader, RdbError> {
    let at = src.offset();
    Ok(StringHeader {
        at,
        length: length(src).await?,
    })
}

/// A string's header, read by [`string_header`].
pub(super) struct StringHeader {
    at: u64,
    length: Length,
}

impl StringHeader {
    /// The length of a plain string.
    pub(super) fn plain(&self) -> Option<u64> {
        match self.length {
            Length::Len(n) => Some(n),
            Length::Encoded(_) => None,
        }
    }
}

/// Steps over the rest of a string whose header was read.
pub(super) async fn skip_string_rest<R: AsyncRead + Unpin>(
    src: &mut Source<R>,
    header: StringHeader,
) -> Result<(), RdbError> {
    skip_string_body(src, header.length, header.at).await
}

async fn skip_string_body<R: AsyncRead + Unpin>(
    src: &mut Source<R>,
    header: Length,
    at: u64,
) -> Result<(), RdbError> {
    match header {
        Length::Len(n) => src.skip(n).await,
        Length::Encoded(ENC_INT8) => src.skip(1).await,
        Length::Encoded(ENC_INT16) => src.skip(2).await,
        Length::Encoded(ENC_INT32) => src.skip(4).await,
        Length::Encoded(ENC_LZF) => {
            let compressed_len = plain_len(src).await?;
            let _len = plain_len(src).await?;
            src.skip(compressed_len).await
        }
        Length::Encoded(tag) => Err(RdbError::Invalid {
            offset: at,
            what: format!("unknown string encoding {tag}"),
        }),
    }
}

/// Steps over an old-style (RDB_TYPE_ZSET) score: a length byte, or 253-255
/// for NaN/+inf/-inf, then that many ASCII bytes.
async fn skip_ascii_double<R: AsyncRead + Unpin>(src: &mut Source<R>) -> Result<(), RdbError> {
    let len = src.u8().await?;
    if len < 253 {
        src.skip(len as u64).await?;
    }
    Ok(())
}

async fn skip_lens<R: AsyncRead + Unpin>(src: &mut Source<R>, n: usize) -> Result<(), RdbError> {
    for _ in 0..n {
        plain_len(src).await?;
    }
    Ok(())
}

/// Walks one value of RDB type `t`. Returns the module id for module values.
pub(super) async fn value<R: AsyncRead + Unpin>(
    src: &mut Source<R>,
    t: u8,
) -> Result<Option<u64>, RdbError> {
    let at = src.offset();
    match t {
        TYPE_STRING | TYPE_HASH_ZIPMAP | TYPE_LIST_ZIPLIST | TYPE_SET_INTSET
        | TYPE_ZSET_ZIPLIST | TYPE_HASH_ZIPLIST | TYPE_HASH_LISTPACK | TYPE_ZSET_LISTPACK
        | TYPE_SET_LISTPACK => skip_string(src).await?,
        t if is_sequence(t) => {
            let n = seq_header(src, t).await?;
            for _ in 0..n {
                element(src, t).await?;
            }
            if is_stream(t) {
                stream_tail(src, t).await?;
            }
        }
        TYPE_HASH_LISTPACK_EX | TYPE_HASH_LISTPACK_EX_PRE_GA => {
            if t == TYPE_HASH_LISTPACK_EX {
                src.skip(8).await?; // minimum field expiry, ms
            }
            skip_string(src).await?;
        }
        TYPE_MODULE_2 => {
            let module_id = plain_len(src).await?;
            module_value(src).await?;
            return Ok(Some(module_id));
        }
        TYPE_MODULE_PRE_GA => {
            return Err(RdbError::Invalid {
                offset: at,
                what: "a module value in the pre-release (4.0 RC) format cannot be read \
                       without its module"
                    .into(),
            })
        }
        other => {
            return Err(RdbError::Invalid {
                offset: at,
                what: format!("unknown value type {other}"),
            })
        }
    }
    Ok(None)
}

pub(super) fn is_stream(t: u8) -> bool {
    matches!(
        t,
        TYPE_STREAM_LISTPACKS | TYPE_STREAM_LISTPACKS_2 | TYPE_STREAM_LISTPACKS_3
    )
}

/// Walks a sequence value's header (see [`is_sequence`]); returns its
/// element count.
pub(super) async fn seq_header<R: AsyncRead + Unpin>(
    src: &mut Source<R>,
    t: u8,
) -> Result<u64, RdbError> {
    if t == TYPE_HASH_METADATA {
        src.skip(8).await?; // minimum field expiry, ms
    }
    plain_len(src).await
}

/// Walks one element of a sequence value.
pub(super) async fn element<R: AsyncRead + Unpin>(
    src: &mut Source<R>,
    t: u8,
) -> Result<(), RdbError> {
    match t {
        TYPE_LIST | TYPE_SET | TYPE_LIST_QUICKLIST => skip_string(src).await,
        TYPE_LIST_QUICKLIST_2 => {
            let container_at = src.offset();
            let container = plain_len(src).await?;
            // 1: a plain node (one big element), 2: a packed listpack.
            if container != 1 && container != 2 {
                return Err(RdbError::Invalid {
                    offset: container_at,
                    what: format!("unknown quicklist container {container}"),
                });
            }
            skip_string(src).await
        }
        TYPE_ZSET => {
            skip_string(src).await?;
            skip_ascii_double(src).await
        }
        TYPE_ZSET_2 => {
            skip_string(src).await?;
            src.skip(8).await
        }
        TYPE_HASH => {
            skip_string(src).await?;
            skip_string(src).await
        }
        TYPE_HASH_METADATA | TYPE_HASH_METADATA_PRE_GA => {
            plain_len(src).await?; // field TTL
            skip_string(src).await?;
            skip_string(src).await
        }
        // A stream node: master entry ID (16 bytes big-endian), listpack.
        _ => {
            skip_string(src).await?;
            skip_string(src).await
        }
    }
}

/// Walks what follows a stream's nodes.
pub(super) async fn stream_tail<R: AsyncRead + Unpin>(
    src: &mut Source<R>,
    t: u8,
) -> Result<(), RdbError> {
    // length, last ID (ms, seq)
    skip_lens(src, 3).await?;
    if t >= TYPE_STREAM_LISTPACKS_2 {
        // first ID, max deleted ID, entries added
        skip_lens(src, 5).await?;
    }
    let groups = plain_len(src).await?;
    for _ in 0..groups {
        skip_string(src).await?; // group name
        skip_lens(src, 2).await?; // last delivered ID
        if t >= TYPE_STREAM_LISTPACKS_2 {
            plain_len(src).await?; // entries read
        }
        let pending = plain_len(src).await?;
        for _ in 0..pending {
            src.skip(16).await?; // raw ID
            src.skip(8).await?; // delivery time
            plain_len(src).await?; // delivery count
        }
        let consumers = plain_len(src).await?;
        for _ in 0..consumers {
            skip_string(src).await?; // name
            src.skip(8).await?; // seen time
            if t >= TYPE_STREAM_LISTPACKS_3 {
                src.skip(8).await?; // active time
            }
            let owned = plain_len(src).await?;
            src.skip(owned.saturating_mul(16)).await?; // raw IDs of owned entries
        }
    }
    Ok(())
}

/// Walks a module value's self-describing opcodes up to its EOF opcode.
async fn module_value<R: AsyncRead + Unpin>(src: &mut Source<R>) -> Result<(), RdbError> {
    loop {
        let at = src.offset();
        match plain_len(src).await? {
            MODULE_OPCODE_EOF => return Ok(()),
            MODULE_OPCODE_SINT | MODULE_OPCODE_UINT => {
                plain_len(src).await?;
            }
            MODULE_OPCODE_FLOAT => src.skip(4).await?,
            MODULE_OPCODE_DOUBLE => src.skip(8).await?,
            MODULE_OPCODE_STRING => skip_string(src).await?,
            other => {
                return Err(RdbError::Invalid {
                    offset: at,
                    what: format!("unknown module value opcode {other}"),
                })
            }
        }
    }
}

/// Walks module aux data; returns the module id.
pub(super) async fn module_aux<R: AsyncRead + Unpin>(src: &mut Source<R>) -> Result<u64, RdbError> {
    let module_id = plain_len(src).await?;
    let at = src.offset();
    let when_opcode = plain_len(src).await?;
    if when_opcode != MODULE_OPCODE_UINT {
        return Err(RdbError::Invalid {
            offset: at,
            what: format!(
                "module aux 'when' has opcode {when_opcode}, expected {MODULE_OPCODE_UINT}"
            ),
        });
    }
    plain_len(src).await?; // when
    module_value(src).await?;
    Ok(module_id)
}

/// Reads a 7.0-RC function record (name, engine, optional description,
/// code) and returns the code, which is all `FUNCTION LOAD` needs.
pub(super) async fn function_pre_ga<R: AsyncRead + Unpin>(
    src: &mut Source<R>,
    max_len: u64,
) -> Result<Bytes, RdbError> {
    skip_string(src).await?; // library name
    skip_string(src).await?; // engine
    if plain_len(src).await? != 0 {
        skip_string(src).await?; // description
    }
    string(src, max_len).await
}
