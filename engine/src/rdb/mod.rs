//! A streaming RDB reader.
//!
//! [`RdbReader`] reads an RDB file (or a replication transfer) from any
//! `AsyncRead`, a buffer at a time, and yields one [`RdbItem`] at a time: aux
//! fields, database changes, functions, and [`Entry`]s. It never holds more
//! than the current value: each value's serialized bytes are walked (so the
//! structure of every type is checked) and captured as a ready DUMP payload,
//! which is what `RESTORE` takes. The CRC64 trailer is verified at the end.
//!
//! Versions 1 to 12 (Redis 2.x to 7.4) are read. Errors name the byte offset
//! where reading stopped.

pub mod consts;
mod source;
pub mod value;
mod walk;

use bytes::{Bytes, BytesMut};
use tokio::io::AsyncRead;

use consts::*;
use source::Source;

pub(crate) use source::CRC64;

/// Why an RDB could not be read.
#[derive(Debug, thiserror::Error)]
pub enum RdbError {
    #[error("RDB ends early: truncated at byte {offset}")]
    Truncated { offset: u64 },
    #[error("invalid RDB at byte {offset}: {what}")]
    Invalid { offset: u64, what: String },
    #[error(
        "RDB checksum mismatch: the file says {expected:#018x}, its content gives {actual:#018x}"
    )]
    Checksum { expected: u64, actual: u64 },
    #[error("RDB version {0} is not supported (this build reads versions 1 to {MAX_VERSION})")]
    Version(u16),
    #[error("value of key {key:?} (at byte {offset}) is larger than {limit} bytes, the most one RESTORE can carry")]
    TooLarge {
        offset: u64,
        limit: usize,
        key: String,
    },
    #[error("reading the RDB: {0}")]
    Io(#[from] std::io::Error),
}

/// What the checksum trailer said.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Checksum {
    /// Present and equal to the content's CRC64.
    Verified,
    /// Written as zero: the server ran with `rdbchecksum no`.
    Disabled,
    /// RDB versions before 5 have no trailer.
    Absent,
}

/// The broad type of a value, as `TYPE` names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ValueKind {
    String,
    List,
    Set,
    ZSet,
    Hash,
    Stream,
    Module,
}

impl ValueKind {
    pub fn of_rdb_type(t: u8) -> Option<ValueKind> {
        Some(match t {
            TYPE_STRING => ValueKind::String,
            TYPE_LIST | TYPE_LIST_ZIPLIST | TYPE_LIST_QUICKLIST | TYPE_LIST_QUICKLIST_2 => {
                ValueKind::List
            }
            TYPE_SET | TYPE_SET_INTSET | TYPE_SET_LISTPACK => ValueKind::Set,
            TYPE_ZSET | TYPE_ZSET_2 | TYPE_ZSET_ZIPLIST | TYPE_ZSET_LISTPACK => ValueKind::ZSet,
            TYPE_HASH
            | TYPE_HASH_ZIPMAP
            | TYPE_HASH_ZIPLIST
            | TYPE_HASH_LISTPACK
            | TYPE_HASH_METADATA_PRE_GA
            | TYPE_HASH_LISTPACK_EX_PRE_GA
            | TYPE_HASH_METADATA
            | TYPE_HASH_LISTPACK_EX => ValueKind::Hash,
            TYPE_STREAM_LISTPACKS | TYPE_STREAM_LISTPACKS_2 | TYPE_STREAM_LISTPACKS_3 => {
                ValueKind::Stream
            }
            TYPE_MODULE_PRE_GA | TYPE_MODULE_2 => ValueKind::Module,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            ValueKind::String => "string",
            ValueKind::List => "list",
            ValueKind::Set => "set",
            ValueKind::ZSet => "zset",
            ValueKind::Hash => "hash",
            ValueKind::Stream => "stream",
            ValueKind::Module => "module",
        }
    }
}

/// One key with its value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub db: u32,
    pub key: Bytes,
    /// Absolute expiry in Unix milliseconds.
    pub expire_ms: Option<i64>,
    /// LRU idle time in seconds, when the source uses an LRU policy.
    pub idle_secs: Option<u64>,
    /// LFU frequency, when the source uses an LFU policy.
    pub freq: Option<u8>,
    /// For module values, the module type id (see [`module_type_name`]).
    pub module_id: Option<u64>,
    /// Byte offset of the value in the RDB (for error messages).
    pub value_offset: u64,
    /// The DUMP payload: type byte, serialized value, RDB version (2 bytes
    /// LE) and CRC64 (8 bytes LE).
    payload: Bytes,
}

impl Entry {
    pub fn rdb_type(&self) -> u8 {
        self.payload[0]
    }

    pub fn kind(&self) -> ValueKind {
        ValueKind::of_rdb_type(self.rdb_type()).expect("entries carry a value type")
    }

    /// The payload `RESTORE` takes.
    pub fn dump_payload(&self) -> &Bytes {
        &self.payload
    }

    /// The serialized value alone (no type byte, no trailer).
    pub fn value_bytes(&self) -> &[u8] {
        &self.payload[1..self.payload.len() - 10]
    }

    /// The value, decoded into its elements. Errors name the byte in the
    /// RDB and the key.
    pub fn decode(&self) -> Result<value::Value, RdbError> {
        value::decode(self.rdb_type(), self.value_bytes()).map_err(|e| RdbError::Invalid {
            offset: self.value_offset + e.at as u64,
            what: format!("{} (value of key {:?})", e.what, lossy_key(&self.key)),
        })
    }

    /// The RDB version the value was serialized with.
    pub fn rdb_version(&self) -> u16 {
        let n = self.payload.len();
        u16::from_le_bytes([self.payload[n - 10], self.payload[n - 9]])
    }
}

/// One part of a value too large to hand over whole (see
/// [`RdbReader::set_part_threshold`]). Parts of one value come one after
/// another, nothing in between.
#[derive(Clone, Debug, PartialEq)]
pub struct Part {
    pub db: u32,
    pub key: Bytes,
    /// Absolute expiry in Unix milliseconds.
    pub expire_ms: Option<i64>,
    pub kind: ValueKind,
    /// 0 for the first part of a value.
    pub index: u32,
    /// Whether this part ends the value.
    pub last: bool,
    /// Byte offset of the value in the RDB.
    pub value_offset: u64,
    /// Some of the value's elements: a List, Set, ZSet or Hash holding
    /// some elements, a String holding the next piece, a Stream holding
    /// some entries (its last part also carries the IDs, counters and
    /// consumer groups).
    pub value: value::Value,
}

/// One thing read from an RDB.
#[derive(Clone, Debug, PartialEq)]
pub enum RdbItem {
    /// An aux field (`redis-ver`, `repl-id`, `ctime`, ...).
    Aux {
        field: Bytes,
        value: Bytes,
    },
    /// The following keys belong to this database.
    SelectDb(u32),
    /// Size hint for the current database.
    ResizeDb {
        keys: u64,
        expires: u64,
    },
    Entry(Entry),
    /// A part of a big value.
    Part(Part),
    /// A function library (`FUNCTION LOAD` takes `code`).
    Function {
        code: Bytes,
    },
    /// Module auxiliary data, skipped.
    ModuleAux {
        module_id: u64,
    },
    /// The end of the file, with what the checksum trailer said.
    End(Checksum),
}

/// Reads an RDB one item at a time.
pub struct RdbReader<R> {
    src: Source<R>,
    version: u16,
    db: u32,
    expire_ms: Option<i64>,
    idle_secs: Option<u64>,
    freq: Option<u8>,
    finished: bool,
    max_value_len: usize,
    /// Values whose serialization grows past this are handed over in parts.
    part_threshold: Option<usize>,
    /// The value being handed over in parts.
    parted: Option<Parted>,
}

/// Where a value handed over in parts is.
struct Parted {
    t: u8,
    db: u32,
    key: Bytes,
    expire_ms: Option<i64>,
    value_offset: u64,
    header: value::SeqHeader,
    /// Elements (nodes) not read yet.
    remaining: u64,
    /// For a plain string: bytes not read yet.
    string_left: Option<u64>,
    /// Stream entries handed over so far (checked against its length).
    stream_entries: u64,
    index: u32,
    /// Elements read before the value turned out big, not handed over yet.
    prefix: Option<Prefix>,
}

/// The captured start of a big value, handed over a part at a time.
struct Prefix {
    bytes: BytesMut,
    /// Next unread byte.
    pos: usize,
    /// RDB offset of `bytes[0]`.
    base: u64,
    /// Elements in `bytes[pos..]`.
    left: u64,
}

/// Size of the parts after the first (which holds everything read before
/// the value turned out to be big).
pub const PART_BYTES: usize = 4 * 1024 * 1024;

/// Values larger than this are refused by default: the target's
/// `proto-max-bulk-len` (512 MB by default) would refuse the RESTORE anyway.
pub const DEFAULT_MAX_VALUE_LEN: usize = 512 * 1024 * 1024;

/// Longest key, aux field or function code accepted.
pub(crate) const MAX_STRING_LEN: u64 = 512 * 1024 * 1024;

impl<R: AsyncRead + Unpin> RdbReader<R> {
    /// Reads the `REDIS000N` header. `initial` holds bytes already read from
    /// `reader` that belong to the RDB.
    pub async fn open(reader: R, initial: BytesMut) -> Result<Self, RdbError> {
        let mut src = Source::new(reader, initial);
        let magic: [u8; 9] = src.array().await?;
        if &magic[..5] != b"REDIS" {
            return Err(RdbError::Invalid {
                offset: 0,
                what: "missing the REDIS magic string".into(),
            });
        }
        let version = std::str::from_utf8(&magic[5..])
            .ok()
            .and_then(|s| s.parse::<u16>().ok())
            .ok_or_else(|| RdbError::Invalid {
                offset: 5,
                what: "the version after REDIS is not a number".into(),
            })?;
        if version == 0 || version > MAX_VERSION {
            return Err(RdbError::Version(version));
        }
        Ok(RdbReader {
            src,
            version,
            db: 0,
            expire_ms: None,
            idle_secs: None,
            freq: None,
            finished: false,
            max_value_len: DEFAULT_MAX_VALUE_LEN,
            part_threshold: None,
            parted: None,
        })
    }

    pub fn version(&self) -> u16 {
        self.version
    }

    /// Bytes consumed so far.
    pub fn offset(&self) -> u64 {
        self.src.offset()
    }

    /// Largest DUMP payload accepted for one value.
    pub fn set_max_value_len(&mut self, len: usize) {
        self.max_value_len = len;
    }

    /// Hands values whose serialization is larger than `bytes` over in
    /// [`Part`]s instead of whole [`Entry`]s: strings stored plain, lists,
    /// sets, sorted sets, hashes and streams stored element by element
    /// (not the single-blob listpack/ziplist/intset encodings, which are
    /// small by construction). Memory then stays within about `bytes` plus
    /// [`PART_BYTES`] whatever the value's size.
    pub fn set_part_threshold(&mut self, bytes: usize) {
        self.part_threshold = Some(bytes.max(1));
    }

    /// Returns the source and whatever was read past the end of the RDB.
    pub fn into_parts(self) -> (R, BytesMut) {
        self.src.into_parts()
    }

    /// The next item, or `None` after [`RdbItem::End`].
    pub async fn next(&mut self) -> Result<Option<RdbItem>, RdbError> {
        if self.finished {
            return Ok(None);
        }
        if self.parted.is_some() {
            return self.next_part().await.map(Some);
        }
        loop {
            let at = self.src.offset();
            let op = self.src.u8().await?;
            match op {
                OPCODE_AUX => {
                    let field = walk::string(&mut self.src, MAX_STRING_LEN).await?;
                    let value = walk::string(&mut self.src, MAX_STRING_LEN).await?;
                    return Ok(Some(RdbItem::Aux { field, value }));
                }
                OPCODE_SELECTDB => {
                    let db = walk::plain_len(&mut self.src).await?;
                    self.db = u32::try_from(db).map_err(|_| invalid(at, "database number"))?;
                    return Ok(Some(RdbItem::SelectDb(self.db)));
                }
                OPCODE_RESIZEDB => {
                    let keys = walk::plain_len(&mut self.src).await?;
                    let expires = walk::plain_len(&mut self.src).await?;
                    return Ok(Some(RdbItem::ResizeDb { keys, expires }));
                }
                OPCODE_EXPIRETIME_MS => {
                    let ms = i64::from_le_bytes(self.src.array().await?);
                    self.expire_ms = Some(ms);
                }
                OPCODE_EXPIRETIME => {
                    let secs = i32::from_le_bytes(self.src.array().await?);
                    self.expire_ms = Some(secs as i64 * 1000);
                }
                OPCODE_IDLE => self.idle_secs = Some(walk::plain_len(&mut self.src).await?),
                OPCODE_FREQ => self.freq = Some(self.src.u8().await?),
                OPCODE_SLOT_INFO => {
                    // Slot sizing hints (7.4+ cluster RDBs): slot, keys, expires.
                    for _ in 0..3 {
                        walk::plain_len(&mut self.src).await?;
                    }
                }
                OPCODE_MODULE_AUX => {
                    let module_id = walk::module_aux(&mut self.src).await?;
                    return Ok(Some(RdbItem::ModuleAux { module_id }));
                }
                OPCODE_FUNCTION2 => {
                    let code = walk::string(&mut self.src, MAX_STRING_LEN).await?;
                    return Ok(Some(RdbItem::Function { code }));
                }
                OPCODE_FUNCTION_PRE_GA => {
                    let code = walk::function_pre_ga(&mut self.src, MAX_STRING_LEN).await?;
                    return Ok(Some(RdbItem::Function { code }));
                }
                OPCODE_EOF => {
                    self.finished = true;
                    return Ok(Some(RdbItem::End(self.read_checksum().await?)));
                }
                t if is_value_type(t) => return self.read_entry(t).await.map(Some),
                other => {
                    return Err(RdbError::Invalid {
                        offset: at,
                        what: format!("unknown opcode or value type {other}"),
                    })
                }
            }
        }
    }

    async fn read_entry(&mut self, rdb_type: u8) -> Result<RdbItem, RdbError> {
        let key = walk::string(&mut self.src, MAX_STRING_LEN).await?;
        let value_at = self.src.offset();
        self.src.begin_capture(&[rdb_type], self.max_value_len);
        let walked = match self.part_threshold {
            Some(threshold) if value::is_sequence(rdb_type) => {
                self.walk_sequence(rdb_type, threshold).await
            }
            Some(threshold) if rdb_type == TYPE_STRING => {
                self.walk_string(threshold).await.map(|big| match big {
                    Some(len) => Walked::BigString(len),
                    None => Walked::Whole(None),
                })
            }
            _ => walk::value(&mut self.src, rdb_type)
                .await
                .map(Walked::Whole),
        };
        let walked = match walked {
            Ok(w) => w,
            Err(err) => {
                self.src.abandon_capture();
                return Err(with_key(err, &key, value_at));
            }
        };
        let module_id = match walked {
            Walked::Whole(module_id) => module_id,
            Walked::Big { read } => {
                let mut captured = self
                    .src
                    .end_capture()
                    .map_err(|err| with_key(err, &key, value_at))?;
                let _type_byte = captured.split_to(1);
                let (header, used) = value::decode_header(rdb_type, &captured)
                    .map_err(|e| with_key(part_error(e, value_at), &key, value_at))?;
                self.idle_secs = None;
                self.freq = None;
                self.parted = Some(Parted {
                    t: rdb_type,
                    db: self.db,
                    key,
                    expire_ms: self.expire_ms.take(),
                    value_offset: value_at,
                    header,
                    remaining: header.count - read,
                    string_left: None,
                    stream_entries: 0,
                    index: 0,
                    prefix: Some(Prefix {
                        bytes: captured,
                        pos: used,
                        base: value_at,
                        left: read,
                    }),
                });
                return self.next_part().await;
            }
            Walked::BigString(len) => {
                self.src.abandon_capture();
                self.idle_secs = None;
                self.freq = None;
                self.parted = Some(Parted {
                    t: rdb_type,
                    db: self.db,
                    key,
                    expire_ms: self.expire_ms.take(),
                    value_offset: value_at,
                    header: value::SeqHeader::default(),
                    remaining: 0,
                    string_left: Some(len),
                    stream_entries: 0,
                    index: 0,
                    prefix: None,
                });
                return self.next_part().await;
            }
        };
        let mut payload = self
            .src
            .end_capture()
            .map_err(|err| with_key(err, &key, value_at))?;
        finish_dump_payload(&mut payload, self.version);
        let entry = Entry {
            db: self.db,
            key,
            expire_ms: self.expire_ms.take(),
            idle_secs: self.idle_secs.take(),
            freq: self.freq.take(),
            module_id,
            value_offset: value_at,
            payload: payload.freeze(),
        };
        Ok(RdbItem::Entry(entry))
    }

    /// Walks a sequence value until its end or until what was captured
    /// passes `threshold`.
    async fn walk_sequence(&mut self, t: u8, threshold: usize) -> Result<Walked, RdbError> {
        let n = walk::seq_header(&mut self.src, t).await?;
        for i in 0..n {
            walk::element(&mut self.src, t).await?;
            if self.src.captured_len() > threshold {
                return Ok(Walked::Big { read: i + 1 });
            }
        }
        if walk::is_stream(t) {
            walk::stream_tail(&mut self.src, t).await?;
        }
        Ok(Walked::Whole(None))
    }

    /// Walks a string; a plain one longer than `threshold` is left unread
    /// and its length returned.
    async fn walk_string(&mut self, threshold: usize) -> Result<Option<u64>, RdbError> {
        let header = walk::string_header(&mut self.src).await?;
        match header.plain() {
            Some(len) if len > threshold as u64 => {
                if len > MAX_STRING_LEN {
                    return Err(RdbError::Invalid {
                        offset: self.src.offset(),
                        what: format!("string length {len} is over the limit of {MAX_STRING_LEN}"),
                    });
                }
                Ok(Some(len))
            }
            _ => {
                walk::skip_string_rest(&mut self.src, header).await?;
                Ok(None)
            }
        }
    }

    /// The next part of the value being handed over in parts.
    async fn next_part(&mut self) -> Result<RdbItem, RdbError> {
        let mut p = self.parted.take().expect("a value in parts");
        let result = self.read_part(&mut p).await;
        let item = match result {
            Ok(item) => item,
            Err(err) => {
                self.src.abandon_capture();
                return Err(with_key(err, &p.key, p.value_offset));
            }
        };
        if !item.last {
            self.parted = Some(p);
        }
        Ok(RdbItem::Part(item))
    }

    async fn read_part(&mut self, p: &mut Parted) -> Result<Part, RdbError> {
        let part_bytes = PART_BYTES.min(self.part_threshold.unwrap_or(PART_BYTES));
        let at = self.src.offset();
        let (value, last) = if let Some(prefix) = &mut p.prefix {
            let (value, used, n) = value::decode_some(
                p.t,
                &p.header,
                &prefix.bytes[prefix.pos..],
                prefix.left,
                part_bytes,
            )
            .map_err(|e| part_error(e, prefix.base + prefix.pos as u64))?;
            prefix.pos += used;
            prefix.left -= n;
            if prefix.left == 0 {
                if prefix.pos != prefix.bytes.len() {
                    return Err(RdbError::Invalid {
                        offset: prefix.base + prefix.pos as u64,
                        what: "bytes left after the elements read".into(),
                    });
                }
                p.prefix = None;
            }
            p.stream_entries += stream_len(&value);
            let last = p.prefix.is_none() && p.remaining == 0 && !walk::is_stream(p.t);
            (value, last)
        } else if let Some(left) = p.string_left {
            let n = left.min(part_bytes as u64);
            let piece = self.src.take(n as usize).await?;
            p.string_left = Some(left - n);
            (value::Value::String(piece), left == n)
        } else {
            self.src.begin_capture(&[], self.max_value_len);
            let mut n = 0;
            while p.remaining > 0 && (n == 0 || self.src.captured_len() < part_bytes) {
                walk::element(&mut self.src, p.t).await?;
                n += 1;
                p.remaining -= 1;
            }
            let bytes = self.src.end_capture()?;
            let mut value =
                value::decode_elements(p.t, &p.header, &bytes, n).map_err(|e| part_error(e, at))?;
            p.stream_entries += stream_len(&value);
            let last = p.remaining == 0;
            if last && walk::is_stream(p.t) {
                let tail_at = self.src.offset();
                self.src.begin_capture(&[], self.max_value_len);
                walk::stream_tail(&mut self.src, p.t).await?;
                let bytes = self.src.end_capture()?;
                let mut tail =
                    value::decode_stream_tail(p.t, &bytes).map_err(|e| part_error(e, tail_at))?;
                if tail.length != p.stream_entries {
                    return Err(RdbError::Invalid {
                        offset: tail_at,
                        what: format!(
                            "stream says {} entries, holds {}",
                            tail.length, p.stream_entries
                        ),
                    });
                }
                if let value::Value::Stream(s) = &mut value {
                    tail.entries = std::mem::take(&mut s.entries);
                    **s = tail;
                }
            }
            (value, last)
        };
        let part = Part {
            db: p.db,
            key: p.key.clone(),
            expire_ms: p.expire_ms,
            kind: ValueKind::of_rdb_type(p.t).expect("a value type"),
            index: p.index,
            last,
            value_offset: p.value_offset,
            value,
        };
        p.index += 1;
        Ok(part)
    }

    async fn read_checksum(&mut self) -> Result<Checksum, RdbError> {
        let actual = self.src.finish_crc()?;
        if self.version < 5 {
            return Ok(Checksum::Absent);
        }
        let expected = u64::from_le_bytes(self.src.array().await?);
        if expected == 0 {
            Ok(Checksum::Disabled)
        } else if expected == actual {
            Ok(Checksum::Verified)
        } else {
            Err(RdbError::Checksum { expected, actual })
        }
    }
}

/// Appends the DUMP trailer (RDB version, then CRC64 of everything before it).
pub fn finish_dump_payload(payload: &mut BytesMut, rdb_version: u16) {
    payload.extend_from_slice(&rdb_version.to_le_bytes());
    let crc = CRC64.checksum(payload);
    payload.extend_from_slice(&crc.to_le_bytes());
}

/// How far [`RdbReader::read_entry`] got into a value.
enum Walked {
    /// All of it (with the module id for module values).
    Whole(Option<u64>),
    /// A sequence that turned out big, after this many elements.
    Big { read: u64 },
    /// A plain string this long, not read yet.
    BigString(u64),
}

fn stream_len(v: &value::Value) -> u64 {
    match v {
        value::Value::Stream(s) => s.entries.len() as u64,
        _ => 0,
    }
}

fn lossy_key(key: &[u8]) -> String {
    String::from_utf8_lossy(&key[..key.len().min(64)]).into_owned()
}

/// A part that does not decode (the caller names the key).
fn part_error(e: value::DecodeError, base: u64) -> RdbError {
    RdbError::Invalid {
        offset: base + e.at as u64,
        what: e.what,
    }
}

fn invalid(offset: u64, what: &str) -> RdbError {
    RdbError::Invalid {
        offset,
        what: format!("{what} out of range"),
    }
}

/// Names the key in errors raised while reading its value.
fn with_key(err: RdbError, key: &[u8], value_at: u64) -> RdbError {
    let key = lossy_key(key);
    match err {
        RdbError::Invalid { offset, what } => RdbError::Invalid {
            offset,
            what: format!("{what} (value of key {key:?}, starting at byte {value_at})"),
        },
        RdbError::TooLarge { limit, .. } => RdbError::TooLarge {
            offset: value_at,
            limit,
            key,
        },
        other => other,
    }
}

/// The name of a module type from its id (9 characters of a 64-character
/// alphabet, then a 10-bit encoding version), as Redis encodes it.
pub fn module_type_name(module_id: u64) -> String {
    const CHARSET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut id = module_id >> 10;
    let mut name = [0u8; 9];
    for slot in name.iter_mut().rev() {
        *slot = CHARSET[(id & 63) as usize];
        id >>= 6;
    }
    String::from_utf8_lossy(&name).into_owned()
}

#[cfg(test)]
mod tests;
