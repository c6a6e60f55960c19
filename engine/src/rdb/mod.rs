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

    /// The RDB version the value was serialized with.
    pub fn rdb_version(&self) -> u16 {
        let n = self.payload.len();
        u16::from_le_bytes([self.payload[n - 10], self.payload[n - 9]])
    }
}

/// One thing read from an RDB.
#[derive(Clone, Debug, PartialEq, Eq)]
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
}

/// Values larger than this are refused by default: the target's
/// `proto-max-bulk-len` (512 MB by default) would refuse the RESTORE anyway.
pub const DEFAULT_MAX_VALUE_LEN: usize = 512 * 1024 * 1024;

/// Longest key, aux field or function code accepted.
const MAX_STRING_LEN: u64 = 512 * 1024 * 1024;

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

    /// Returns the source and whatever was read past the end of the RDB.
    pub fn into_parts(self) -> (R, BytesMut) {
        self.src.into_parts()
    }

    /// The next item, or `None` after [`RdbItem::End`].
    pub async fn next(&mut self) -> Result<Option<RdbItem>, RdbError> {
        if self.finished {
            return Ok(None);
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
        let module_id = match walk::value(&mut self.src, rdb_type).await {
            Ok(module_id) => module_id,
            Err(err) => {
                self.src.abandon_capture();
                return Err(with_key(err, &key, value_at));
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
            payload: payload.freeze(),
        };
        Ok(RdbItem::Entry(entry))
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

fn invalid(offset: u64, what: &str) -> RdbError {
    RdbError::Invalid {
        offset,
        what: format!("{what} out of range"),
    }
}

/// Names the key in errors raised while reading its value.
fn with_key(err: RdbError, key: &[u8], value_at: u64) -> RdbError {
    let key = String::from_utf8_lossy(&key[..key.len().min(64)]).into_owned();
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
