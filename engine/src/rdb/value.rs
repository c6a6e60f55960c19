//! Values decoded into their elements.
//!
//! [`decode`] turns one serialized value (as an [`Entry`](super::Entry)
//! carries it) into a [`Value`]: what the rewrite path replays as ordinary
//! commands when RESTORE cannot be used, and what tests compare. Every
//! encoding RDB versions 1 to 12 use is read: plain and int/LZF strings,
//! linked lists, quicklists (ziplist nodes, listpack and plain nodes),
//! ziplists, listpacks, intsets, zipmaps, skiplist and listpack sorted sets
//! (ASCII and binary scores), hashes with field TTLs, and streams with their
//! consumer groups, pending entries and consumers.
//!
//! Structure is validated as it is read (lengths, terminators, element
//! counts), so a corrupt value gives an error naming the byte where reading
//! stopped, never a panic.

use bytes::Bytes;

use super::consts::*;

/// Why a value could not be decoded; `at` is the byte offset within the
/// value where reading stopped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what} (at byte {at} of the value)")]
pub struct DecodeError {
    pub at: usize,
    pub what: String,
}

impl DecodeError {
    /// The same error, `base` bytes further (for a blob inside the value).
    fn shift(self, base: usize) -> DecodeError {
        DecodeError {
            at: self.at + base,
            what: self.what,
        }
    }
}

/// A stream entry ID.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct StreamId {
    pub ms: u64,
    pub seq: u64,
}

impl std::fmt::Display for StreamId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct StreamEntry {
    pub id: StreamId,
    pub fields: Vec<(Bytes, Bytes)>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct PendingEntry {
    pub id: StreamId,
    pub delivery_time_ms: u64,
    pub delivery_count: u64,
    /// The consumer that owns it (from the consumers' own lists).
    pub consumer: Option<Bytes>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Consumer {
    pub name: Bytes,
    pub seen_time_ms: u64,
    /// RDB_TYPE_STREAM_LISTPACKS_3 (7.2+) only.
    pub active_time_ms: Option<u64>,
    pub pending: Vec<StreamId>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ConsumerGroup {
    pub name: Bytes,
    pub last_id: StreamId,
    /// 7.0+; `None` when unknown.
    pub entries_read: Option<u64>,
    pub pending: Vec<PendingEntry>,
    pub consumers: Vec<Consumer>,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Stream {
    pub entries: Vec<StreamEntry>,
    pub length: u64,
    pub last_id: StreamId,
    /// 7.0+ (RDB_TYPE_STREAM_LISTPACKS_2 and later).
    pub first_id: Option<StreamId>,
    pub max_deleted_id: Option<StreamId>,
    pub entries_added: Option<u64>,
    pub groups: Vec<ConsumerGroup>,
}

/// One hash field; `expire_ms` is its absolute TTL (7.4 field expiry).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HashField {
    pub field: Bytes,
    pub value: Bytes,
    pub expire_ms: Option<i64>,
}

/// A decoded value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    String(Bytes),
    List(Vec<Bytes>),
    Set(Vec<Bytes>),
    ZSet(Vec<(Bytes, f64)>),
    Hash(Vec<HashField>),
    Stream(Box<Stream>),
    /// A module value: only its module can make sense of it.
    Module {
        module_id: u64,
    },
}

impl Value {
    /// Whether the value holds no element (Redis skips such keys).
    pub fn is_empty(&self) -> bool {
        match self {
            Value::List(v) | Value::Set(v) => v.is_empty(),
            Value::ZSet(v) => v.is_empty(),
            Value::Hash(v) => v.is_empty(),
            Value::String(_) | Value::Stream(_) | Value::Module { .. } => false,
        }
    }
}

/// Decodes the value of RDB type `rdb_type` serialized in `bytes`.
pub fn decode(rdb_type: u8, bytes: &[u8]) -> Result<Value, DecodeError> {
    let mut c = Cursor::new(bytes);
    let value = decode_from(&mut c, rdb_type)?;
    if c.pos != bytes.len() {
        return Err(c.err(format!(
            "{} bytes left after the value",
            bytes.len() - c.pos
        )));
    }
    Ok(value)
}

fn decode_from(c: &mut Cursor, t: u8) -> Result<Value, DecodeError> {
    if is_sequence(t) {
        let header = seq_header(c, t)?;
        let mut value = empty_of(t);
        for _ in 0..header.count {
            seq_element(c, t, &header, &mut value)?;
        }
        if let Value::Stream(s) = &mut value {
            stream_tail(c, t, s)?;
            if s.length != s.entries.len() as u64 {
                return Err(c.err(format!(
                    "stream says {} entries, holds {}",
                    s.length,
                    s.entries.len()
                )));
            }
        }
        return Ok(value);
    }
    Ok(match t {
        TYPE_STRING => Value::String(c.string()?),
        TYPE_HASH_ZIPMAP => Value::Hash(
            pairs(blob_of(c, zipmap)?)
                .map_err(|what| c.err(what))?
                .into_iter()
                .map(|(field, value)| HashField {
                    field,
                    value,
                    expire_ms: None,
                })
                .collect(),
        ),
        TYPE_LIST_ZIPLIST => Value::List(blob_of(c, ziplist)?),
        TYPE_SET_INTSET => Value::Set(blob_of(c, intset)?),
        TYPE_SET_LISTPACK => Value::Set(blob_of(c, listpack)?),
        TYPE_ZSET_ZIPLIST | TYPE_ZSET_LISTPACK => {
            let items = if t == TYPE_ZSET_ZIPLIST {
                blob_of(c, ziplist)?
            } else {
                blob_of(c, listpack)?
            };
            let items = pairs(items).map_err(|what| c.err(what))?;
            let mut out = Vec::with_capacity(items.len());
            for (member, score) in items {
                let score = parse_score(&score).ok_or_else(|| {
                    c.err(format!(
                        "score {:?} is not a number",
                        String::from_utf8_lossy(&score)
                    ))
                })?;
                out.push((member, score));
            }
            Value::ZSet(out)
        }
        TYPE_HASH_ZIPLIST | TYPE_HASH_LISTPACK => {
            let items = if t == TYPE_HASH_ZIPLIST {
                blob_of(c, ziplist)?
            } else {
                blob_of(c, listpack)?
            };
            Value::Hash(
                pairs(items)
                    .map_err(|what| c.err(what))?
                    .into_iter()
                    .map(|(field, value)| HashField {
                        field,
                        value,
                        expire_ms: None,
                    })
                    .collect(),
            )
        }
        TYPE_HASH_LISTPACK_EX | TYPE_HASH_LISTPACK_EX_PRE_GA => {
            if t == TYPE_HASH_LISTPACK_EX {
                let _min_expire: [u8; 8] = c.array()?;
            }
            let items = blob_of(c, listpack_items)?;
            if items.len() % 3 != 0 {
                return Err(
                    c.err("a hash listpack with TTLs needs field, value, TTL triples".into())
                );
            }
            let mut out = Vec::with_capacity(items.len() / 3);
            for triple in items.chunks(3) {
                // A TTL of 0 means none (HASH_LP_NO_TTL).
                let expire_ms = match &triple[2] {
                    LpItem::Int(0) => None,
                    LpItem::Int(ms) => Some(*ms),
                    LpItem::Str(_) => {
                        return Err(c.err("a hash field TTL is not an integer".into()))
                    }
                };
                out.push(HashField {
                    field: triple[0].to_bytes(),
                    value: triple[1].to_bytes(),
                    expire_ms,
                });
            }
            Value::Hash(out)
        }
        TYPE_MODULE_2 => {
            let module_id = c.plain_len()?;
            // The opcodes were walked when the entry was read; only the
            // module itself can interpret them.
            c.pos = c.buf.len();
            Value::Module { module_id }
        }
        other => return Err(c.err(format!("value type {other} cannot be decoded"))),
    })
}

/// Whether values of type `t` are serialized as a count and that many
/// elements (quicklist and stream nodes count as elements): the values the
/// reader can hand over in parts.
pub fn is_sequence(t: u8) -> bool {
    matches!(
        t,
        TYPE_LIST
            | TYPE_SET
            | TYPE_ZSET
            | TYPE_ZSET_2
            | TYPE_HASH
            | TYPE_HASH_METADATA
            | TYPE_HASH_METADATA_PRE_GA
            | TYPE_LIST_QUICKLIST
            | TYPE_LIST_QUICKLIST_2
            | TYPE_STREAM_LISTPACKS
            | TYPE_STREAM_LISTPACKS_2
            | TYPE_STREAM_LISTPACKS_3
    )
}

/// What precedes a sequence's elements.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SeqHeader {
    /// Hashes with field TTLs (7.4): the smallest TTL, which the others
    /// are stored relative to.
    pub min_expire: Option<u64>,
    /// Number of elements (nodes for quicklists and streams).
    pub count: u64,
}

/// Reads the header of a sequence value from the start of `bytes` (the
/// value, without its type byte). Returns it and its length in bytes.
pub fn decode_header(t: u8, bytes: &[u8]) -> Result<(SeqHeader, usize), DecodeError> {
    let mut c = Cursor::new(bytes);
    let header = seq_header(&mut c, t)?;
    Ok((header, c.pos))
}

/// Decodes exactly `n` elements of a sequence value of type `t` from
/// `bytes`: one part of a value the reader hands over in parts. A stream's
/// part holds entries only (see [`decode_stream_tail`]).
pub fn decode_elements(
    t: u8,
    header: &SeqHeader,
    bytes: &[u8],
    n: u64,
) -> Result<Value, DecodeError> {
    let mut c = Cursor::new(bytes);
    let mut value = empty_of(t);
    for _ in 0..n {
        seq_element(&mut c, t, header, &mut value)?;
    }
    if c.pos != bytes.len() {
        return Err(c.err(format!(
            "{} bytes left after {n} elements",
            bytes.len() - c.pos
        )));
    }
    Ok(value)
}

/// Decodes up to `max` elements of a sequence value from the start of
/// `bytes`, stopping once `budget` bytes were read. Returns them, the bytes
/// read and how many were decoded (at least one when `max` > 0).
pub fn decode_some(
    t: u8,
    header: &SeqHeader,
    bytes: &[u8],
    max: u64,
    budget: usize,
) -> Result<(Value, usize, u64), DecodeError> {
    let mut c = Cursor::new(bytes);
    let mut value = empty_of(t);
    let mut n = 0;
    while n < max && (n == 0 || c.pos < budget) {
        seq_element(&mut c, t, header, &mut value)?;
        n += 1;
    }
    Ok((value, c.pos, n))
}

/// Decodes what follows a stream's nodes: length, IDs, counters and the
/// consumer groups (entries stay empty).
pub fn decode_stream_tail(t: u8, bytes: &[u8]) -> Result<Stream, DecodeError> {
    let mut c = Cursor::new(bytes);
    let mut s = Stream::default();
    stream_tail(&mut c, t, &mut s)?;
    if c.pos != bytes.len() {
        return Err(c.err(format!(
            "{} bytes left after the stream",
            bytes.len() - c.pos
        )));
    }
    Ok(s)
}

fn seq_header(c: &mut Cursor, t: u8) -> Result<SeqHeader, DecodeError> {
    let min_expire = if t == TYPE_HASH_METADATA {
        Some(u64::from_le_bytes(c.array()?))
    } else {
        None
    };
    Ok(SeqHeader {
        min_expire,
        count: c.plain_len()?,
    })
}

fn empty_of(t: u8) -> Value {
    match t {
        TYPE_LIST | TYPE_LIST_QUICKLIST | TYPE_LIST_QUICKLIST_2 => Value::List(Vec::new()),
        TYPE_SET => Value::Set(Vec::new()),
        TYPE_ZSET | TYPE_ZSET_2 => Value::ZSet(Vec::new()),
        TYPE_STREAM_LISTPACKS | TYPE_STREAM_LISTPACKS_2 | TYPE_STREAM_LISTPACKS_3 => {
            Value::Stream(Box::default())
        }
        _ => Value::Hash(Vec::new()),
    }
}

/// Decodes one element of a sequence value into `out` (made by
/// [`empty_of`] for the same type).
fn seq_element(
    c: &mut Cursor,
    t: u8,
    header: &SeqHeader,
    out: &mut Value,
) -> Result<(), DecodeError> {
    match (t, out) {
        (TYPE_LIST, Value::List(v)) | (TYPE_SET, Value::Set(v)) => v.push(c.string()?),
        (TYPE_ZSET | TYPE_ZSET_2, Value::ZSet(v)) => {
            let member = c.string()?;
            let score = if t == TYPE_ZSET_2 {
                f64::from_le_bytes(c.array()?)
            } else {
                c.ascii_double()?
            };
            if score.is_nan() {
                return Err(c.err("a sorted set score is NaN".into()));
            }
            v.push((member, score));
        }
        (TYPE_HASH, Value::Hash(v)) => v.push(HashField {
            field: c.string()?,
            value: c.string()?,
            expire_ms: None,
        }),
        (TYPE_HASH_METADATA | TYPE_HASH_METADATA_PRE_GA, Value::Hash(v)) => {
            let ttl = c.plain_len()?;
            let expire_ms = match (ttl, header.min_expire) {
                (0, _) => None,
                // Relative to the minimum, plus one (0 means none).
                (ttl, Some(min)) => Some(ttl.wrapping_add(min).wrapping_sub(1) as i64),
                (ttl, None) => Some(ttl as i64),
            };
            v.push(HashField {
                field: c.string()?,
                value: c.string()?,
                expire_ms,
            });
        }
        (TYPE_LIST_QUICKLIST_2, Value::List(v)) => match c.plain_len()? {
            1 => v.push(c.string()?),
            2 => {
                let node = blob_of(c, listpack)?;
                if node.is_empty() {
                    return Err(c.err("an empty listpack node in a quicklist".into()));
                }
                v.extend(node);
            }
            other => return Err(c.err(format!("unknown quicklist container {other}"))),
        },
        (TYPE_LIST_QUICKLIST, Value::List(v)) => {
            let node = blob_of(c, ziplist)?;
            if node.is_empty() {
                return Err(c.err("an empty ziplist node in a quicklist".into()));
            }
            v.extend(node);
        }
        (
            TYPE_STREAM_LISTPACKS | TYPE_STREAM_LISTPACKS_2 | TYPE_STREAM_LISTPACKS_3,
            Value::Stream(s),
        ) => {
            let master = stream_id(&c.string()?, c)?;
            let items = blob_of(c, listpack_items)?;
            stream_node(master, &items, &mut s.entries).map_err(|what| c.err(what))?;
        }
        (t, _) => return Err(c.err(format!("value type {t} is not a sequence"))),
    }
    Ok(())
}

/// A cursor over one value's bytes.
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn new(buf: &'a [u8]) -> Cursor<'a> {
        Cursor { buf, pos: 0 }
    }

    fn err(&self, what: String) -> DecodeError {
        DecodeError { at: self.pos, what }
    }

    /// After a ziplist's or listpack's end marker: nothing may follow, and
    /// the header's element count (65535: "too many to count here") must
    /// match what was read.
    fn check_end(&self, declared: u16, n_read: usize, format: &str) -> Result<(), DecodeError> {
        if self.pos != self.buf.len() {
            return Err(self.err(format!("bytes after the {format}'s end marker")));
        }
        if declared != u16::MAX && declared as usize != n_read {
            return Err(self.err(format!("{format} says {declared} elements, has {n_read}")));
        }
        Ok(())
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.buf.len() - self.pos < n {
            return Err(self.err(format!(
                "value ends early: {n} bytes needed, {} left",
                self.buf.len() - self.pos
            )));
        }
        let out = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        Ok(self.take(N)?.try_into().expect("N bytes"))
    }

    /// A length, or `Err` of the special-encoding tag.
    fn length(&mut self) -> Result<Result<u64, u8>, DecodeError> {
        let first = self.u8()?;
        Ok(match first >> 6 {
            0 => Ok((first & 0x3f) as u64),
            1 => Ok((((first & 0x3f) as u64) << 8) | self.u8()? as u64),
            2 => match first {
                0x80 => Ok(u32::from_be_bytes(self.array()?) as u64),
                0x81 => Ok(u64::from_be_bytes(self.array()?)),
                _ => return Err(self.err(format!("unknown length encoding {first:#04x}"))),
            },
            _ => Err(first & 0x3f),
        })
    }

    fn plain_len(&mut self) -> Result<u64, DecodeError> {
        match self.length()? {
            Ok(n) => Ok(n),
            Err(tag) => Err(self.err(format!("expected a length, found string encoding {tag}"))),
        }
    }

    /// A collection's element count, refused when it cannot fit in what is
    /// left (every element takes at least a byte).
    fn count(&mut self) -> Result<u64, DecodeError> {
        let n = self.plain_len()?;
        if n > (self.buf.len() - self.pos) as u64 {
            return Err(self.err(format!(
                "{n} elements cannot fit in {} bytes",
                self.buf.len() - self.pos
            )));
        }
        Ok(n)
    }

    fn string(&mut self) -> Result<Bytes, DecodeError> {
        Ok(match self.length()? {
            Ok(n) => {
                let n =
                    usize::try_from(n).map_err(|_| self.err("string length overflows".into()))?;
                Bytes::copy_from_slice(self.take(n)?)
            }
            Err(ENC_INT8) => Bytes::from((self.u8()? as i8).to_string()),
            Err(ENC_INT16) => Bytes::from(i16::from_le_bytes(self.array()?).to_string()),
            Err(ENC_INT32) => Bytes::from(i32::from_le_bytes(self.array()?).to_string()),
            Err(ENC_LZF) => {
                let clen = self.plain_len()? as usize;
                let len = self.plain_len()? as usize;
                let at = self.pos as u64;
                let data = self.take(clen)?;
                super::walk::lzf_decompress(data, len, at).map_err(|_| {
                    self.err("LZF data does not decompress to its stated length".into())
                })?
            }
            Err(tag) => return Err(self.err(format!("unknown string encoding {tag}"))),
        })
    }

    /// A string holding an encoded blob (ziplist, listpack, intset,
    /// zipmap), with the offset its errors are relative to (where its bytes
    /// start, or the string's start when it was compressed).
    fn blob(&mut self) -> Result<(Bytes, usize), DecodeError> {
        let start = self.pos;
        let blob = self.string()?;
        let base = if self.pos - start >= blob.len() {
            self.pos - blob.len()
        } else {
            start
        };
        Ok((blob, base))
    }

    /// An RDB_TYPE_ZSET score: a length byte (253 NaN, 254 +inf, 255 -inf)
    /// then ASCII.
    fn ascii_double(&mut self) -> Result<f64, DecodeError> {
        match self.u8()? {
            253 => Ok(f64::NAN),
            254 => Ok(f64::INFINITY),
            255 => Ok(f64::NEG_INFINITY),
            n => {
                let text = self.take(n as usize)?;
                parse_score(text).ok_or_else(|| self.err("a score is not a number".into()))
            }
        }
    }
}

/// Parses a score as Redis prints and stores them ("inf", "-inf", decimals).
pub fn parse_score(text: &[u8]) -> Option<f64> {
    let s = std::str::from_utf8(text).ok()?;
    match s {
        "inf" | "+inf" => Some(f64::INFINITY),
        "-inf" => Some(f64::NEG_INFINITY),
        _ => s.parse::<f64>().ok(),
    }
}

/// Reads a blob string and decodes it with `decode`, errors pointing into
/// the value.
fn blob_of<T>(
    c: &mut Cursor,
    decode: impl FnOnce(&[u8]) -> Result<T, DecodeError>,
) -> Result<T, DecodeError> {
    let (blob, base) = c.blob()?;
    decode(&blob).map_err(|e| e.shift(base))
}

/// Alternating items as pairs (fields and values, members and scores).
fn pairs(items: Vec<Bytes>) -> Result<Vec<(Bytes, Bytes)>, String> {
    if !items.len().is_multiple_of(2) {
        return Err(format!("{} items cannot make pairs", items.len()));
    }
    let mut it = items.into_iter();
    let mut out = Vec::new();
    while let (Some(a), Some(b)) = (it.next(), it.next()) {
        out.push((a, b));
    }
    Ok(out)
}

/// A listpack element.
#[derive(Clone, Debug, PartialEq, Eq)]
enum LpItem {
    Int(i64),
    Str(Bytes),
}

impl LpItem {
    fn to_bytes(&self) -> Bytes {
        match self {
            LpItem::Int(v) => Bytes::from(v.to_string()),
            LpItem::Str(b) => b.clone(),
        }
    }
}

/// The elements of a listpack, as strings.
pub fn listpack(blob: &[u8]) -> Result<Vec<Bytes>, DecodeError> {
    Ok(listpack_items(blob)?.iter().map(LpItem::to_bytes).collect())
}

fn listpack_items(blob: &[u8]) -> Result<Vec<LpItem>, DecodeError> {
    let mut c = Cursor::new(blob);
    let total = u32::from_le_bytes(c.array()?) as usize;
    if total != blob.len() {
        return Err(c.err(format!("listpack says {total} bytes, has {}", blob.len())));
    }
    let declared = u16::from_le_bytes(c.array()?);
    let mut out = Vec::new();
    loop {
        let start = c.pos;
        let b = c.u8()?;
        let item = if b == 0xff {
            break;
        } else if b & 0x80 == 0 {
            LpItem::Int((b & 0x7f) as i64)
        } else if b & 0xc0 == 0x80 {
            LpItem::Str(Bytes::copy_from_slice(c.take((b & 0x3f) as usize)?))
        } else if b & 0xe0 == 0xc0 {
            let v = (((b & 0x1f) as i64) << 8) | c.u8()? as i64;
            LpItem::Int(sign_extend(v, 13))
        } else if b & 0xf0 == 0xe0 {
            let len = (((b & 0x0f) as usize) << 8) | c.u8()? as usize;
            LpItem::Str(Bytes::copy_from_slice(c.take(len)?))
        } else {
            match b {
                0xf0 => {
                    let len = u32::from_le_bytes(c.array()?) as usize;
                    LpItem::Str(Bytes::copy_from_slice(c.take(len)?))
                }
                0xf1 => LpItem::Int(i16::from_le_bytes(c.array()?) as i64),
                0xf2 => {
                    let [a, b2, d] = c.array()?;
                    LpItem::Int(sign_extend(
                        i64::from_le_bytes([a, b2, d, 0, 0, 0, 0, 0]),
                        24,
                    ))
                }
                0xf3 => LpItem::Int(i32::from_le_bytes(c.array()?) as i64),
                0xf4 => LpItem::Int(i64::from_le_bytes(c.array()?)),
                other => return Err(c.err(format!("unknown listpack encoding {other:#04x}"))),
            }
        };
        // The back-length: how long the entry (without it) is.
        let entry_len = c.pos - start;
        // As lpEncodeBacklen sizes it; it must say `entry_len` back.
        let backlen_size = match entry_len {
            0..=127 => 1,
            128..=16382 => 2,
            16383..=2097150 => 3,
            2097151..=268435454 => 4,
            _ => 5,
        };
        let backlen = c.take(backlen_size)?;
        // Stored big-endian in 7-bit groups, the first byte's high bit clear.
        let decoded = backlen
            .iter()
            .fold(0usize, |acc, b| (acc << 7) | (b & 0x7f) as usize);
        if decoded != entry_len {
            return Err(c.err(format!(
                "listpack entry of {entry_len} bytes has a back-length of {decoded}"
            )));
        }
        out.push(item);
    }
    c.check_end(declared, out.len(), "listpack")?;
    Ok(out)
}

fn sign_extend(v: i64, bits: u32) -> i64 {
    let shift = 64 - bits;
    (v << shift) >> shift
}

/// The elements of a ziplist, as strings.
pub fn ziplist(blob: &[u8]) -> Result<Vec<Bytes>, DecodeError> {
    let mut c = Cursor::new(blob);
    let total = u32::from_le_bytes(c.array()?) as usize;
    if total != blob.len() {
        return Err(c.err(format!("ziplist says {total} bytes, has {}", blob.len())));
    }
    let _tail: [u8; 4] = c.array()?;
    let declared = u16::from_le_bytes(c.array()?);
    let mut out = Vec::new();
    let mut prev_len = 0usize;
    loop {
        let start = c.pos;
        let first = c.u8()?;
        if first == 0xff {
            break;
        }
        let prev = if first < 254 {
            first as usize
        } else if first == 254 {
            u32::from_le_bytes(c.array()?) as usize
        } else {
            return Err(c.err("a ziplist entry's previous length is 255".into()));
        };
        if prev != prev_len {
            return Err(c.err(format!(
                "ziplist entry says the previous one is {prev} bytes, it is {prev_len}"
            )));
        }
        let enc = c.u8()?;
        let item = match enc >> 6 {
            0 => Bytes::copy_from_slice(c.take((enc & 0x3f) as usize)?),
            1 => {
                let len = (((enc & 0x3f) as usize) << 8) | c.u8()? as usize;
                Bytes::copy_from_slice(c.take(len)?)
            }
            2 => {
                let len = u32::from_be_bytes(c.array()?) as usize;
                Bytes::copy_from_slice(c.take(len)?)
            }
            _ => {
                let v: i64 = match enc {
                    0xc0 => i16::from_le_bytes(c.array()?) as i64,
                    0xd0 => i32::from_le_bytes(c.array()?) as i64,
                    0xe0 => i64::from_le_bytes(c.array()?),
                    0xf0 => {
                        let [a, b, d] = c.array()?;
                        sign_extend(i64::from_le_bytes([a, b, d, 0, 0, 0, 0, 0]), 24)
                    }
                    0xfe => c.u8()? as i8 as i64,
                    0xf1..=0xfd => (enc & 0x0f) as i64 - 1,
                    other => return Err(c.err(format!("unknown ziplist encoding {other:#04x}"))),
                };
                Bytes::from(v.to_string())
            }
        };
        prev_len = c.pos - start;
        out.push(item);
    }
    c.check_end(declared, out.len(), "ziplist")?;
    Ok(out)
}

/// The members of an intset, as decimal strings.
pub fn intset(blob: &[u8]) -> Result<Vec<Bytes>, DecodeError> {
    let mut c = Cursor::new(blob);
    let width = u32::from_le_bytes(c.array()?) as usize;
    if !matches!(width, 2 | 4 | 8) {
        return Err(c.err(format!("intset integer width {width}")));
    }
    let n = u32::from_le_bytes(c.array()?) as usize;
    if blob.len() != 8 + n * width {
        return Err(c.err(format!(
            "intset of {n} {width}-byte integers in {} bytes",
            blob.len()
        )));
    }
    let mut out = Vec::with_capacity(n);
    let mut last: Option<i64> = None;
    for _ in 0..n {
        let v = match width {
            2 => i16::from_le_bytes(c.array()?) as i64,
            4 => i32::from_le_bytes(c.array()?) as i64,
            _ => i64::from_le_bytes(c.array()?),
        };
        if last.is_some_and(|l| l >= v) {
            return Err(c.err("intset members are not in ascending order".into()));
        }
        last = Some(v);
        out.push(Bytes::from(v.to_string()));
    }
    Ok(out)
}

/// The fields and values of a zipmap (Redis before 2.6), flattened.
pub fn zipmap(blob: &[u8]) -> Result<Vec<Bytes>, DecodeError> {
    let mut c = Cursor::new(blob);
    let _count = c.u8()?;
    let mut out = Vec::new();
    let zm_len = |c: &mut Cursor| -> Result<Option<usize>, DecodeError> {
        match c.u8()? {
            255 => Ok(None),
            254 => Ok(Some(u32::from_le_bytes(c.array()?) as usize)),
            n => Ok(Some(n as usize)),
        }
    };
    while let Some(klen) = zm_len(&mut c)? {
        out.push(Bytes::copy_from_slice(c.take(klen)?));
        let Some(vlen) = zm_len(&mut c)? else {
            return Err(c.err("a zipmap field without a value".into()));
        };
        let free = c.u8()? as usize;
        out.push(Bytes::copy_from_slice(c.take(vlen)?));
        c.take(free)?;
    }
    if c.pos != blob.len() {
        return Err(c.err("bytes after the zipmap's end marker".into()));
    }
    Ok(out)
}

fn stream_id(raw: &[u8], c: &Cursor) -> Result<StreamId, DecodeError> {
    if raw.len() != 16 {
        return Err(c.err(format!("a stream ID of {} bytes", raw.len())));
    }
    Ok(StreamId {
        ms: u64::from_be_bytes(raw[..8].try_into().expect("8 bytes")),
        seq: u64::from_be_bytes(raw[8..].try_into().expect("8 bytes")),
    })
}

const STREAM_ITEM_FLAG_DELETED: i64 = 1;
const STREAM_ITEM_FLAG_SAMEFIELDS: i64 = 2;

/// Everything after a stream's nodes.
fn stream_tail(c: &mut Cursor, t: u8, s: &mut Stream) -> Result<(), DecodeError> {
    s.length = c.plain_len()?;
    s.last_id = StreamId {
        ms: c.plain_len()?,
        seq: c.plain_len()?,
    };
    if t >= TYPE_STREAM_LISTPACKS_2 {
        s.first_id = Some(StreamId {
            ms: c.plain_len()?,
            seq: c.plain_len()?,
        });
        s.max_deleted_id = Some(StreamId {
            ms: c.plain_len()?,
            seq: c.plain_len()?,
        });
        s.entries_added = Some(c.plain_len()?);
    }
    let groups = c.count()?;
    for _ in 0..groups {
        let name = c.string()?;
        let last_id = StreamId {
            ms: c.plain_len()?,
            seq: c.plain_len()?,
        };
        let entries_read = if t >= TYPE_STREAM_LISTPACKS_2 {
            // -1 (unknown) is stored as the largest length.
            Some(c.plain_len()?).filter(|&n| n != u64::MAX)
        } else {
            None
        };
        let pel = c.count()?;
        let mut pending = Vec::with_capacity(pel.min(1 << 16) as usize);
        for _ in 0..pel {
            let id = stream_id(c.take(16)?, c)?;
            let delivery_time_ms = u64::from_le_bytes(c.array()?);
            let delivery_count = c.plain_len()?;
            pending.push(PendingEntry {
                id,
                delivery_time_ms,
                delivery_count,
                consumer: None,
            });
        }
        let by_id: std::collections::HashMap<StreamId, usize> =
            pending.iter().enumerate().map(|(i, p)| (p.id, i)).collect();
        let n_consumers = c.count()?;
        let mut consumers = Vec::with_capacity(n_consumers.min(1 << 16) as usize);
        for _ in 0..n_consumers {
            let name = c.string()?;
            let seen_time_ms = u64::from_le_bytes(c.array()?);
            let active_time_ms = if t >= TYPE_STREAM_LISTPACKS_3 {
                Some(u64::from_le_bytes(c.array()?))
            } else {
                None
            };
            let owned = c.count()?;
            let mut ids = Vec::with_capacity(owned.min(1 << 16) as usize);
            for _ in 0..owned {
                let id = stream_id(c.take(16)?, c)?;
                match by_id.get(&id) {
                    Some(&i) if pending[i].consumer.is_none() => {
                        pending[i].consumer = Some(name.clone())
                    }
                    Some(_) => return Err(c.err(format!("two consumers own {id}"))),
                    None => {
                        return Err(c.err(format!(
                            "consumer owns {id}, which the group has not pending"
                        )))
                    }
                }
                ids.push(id);
            }
            consumers.push(Consumer {
                name,
                seen_time_ms,
                active_time_ms,
                pending: ids,
            });
        }
        s.groups.push(ConsumerGroup {
            name,
            last_id,
            entries_read,
            pending,
            consumers,
        });
    }
    Ok(())
}

/// The next listpack item as an integer (stream nodes store some numbers
/// as strings).
fn lp_int<'a>(
    it: &mut impl Iterator<Item = &'a LpItem>,
    context: &str,
    what: &str,
) -> Result<i64, String> {
    match it.next() {
        Some(LpItem::Int(v)) => Ok(*v),
        Some(LpItem::Str(s)) => std::str::from_utf8(s)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or(format!("{context}: {what} is not an integer")),
        None => Err(format!("{context} ends before its {what}")),
    }
}

/// Decodes one stream listpack node (the layout of t_stream.c): a master
/// entry with the field names most entries share, then entries as deltas
/// from the master ID.
fn stream_node(
    master: StreamId,
    items: &[LpItem],
    out: &mut Vec<StreamEntry>,
) -> Result<(), String> {
    let mut it = items.iter();
    let count = lp_int(&mut it, "stream node", "entry count")?;
    let deleted = lp_int(&mut it, "stream node", "deleted count")?;
    let n_master = lp_int(&mut it, "stream node", "master field count")?;
    if count < 0 || deleted < 0 || n_master < 0 {
        return Err("stream node: a negative count".into());
    }
    let master_fields: Vec<Bytes> = (0..n_master)
        .map(|_| {
            it.next()
                .map(LpItem::to_bytes)
                .ok_or("stream node: master fields cut short".to_string())
        })
        .collect::<Result<_, _>>()?;
    // The master entry ends with a 0.
    if it.next() != Some(&LpItem::Int(0)) {
        return Err("stream node: the master entry does not end with 0".into());
    }
    let next_int =
        |it: &mut std::slice::Iter<'_, LpItem>, what: &str| lp_int(it, "stream entry", what);
    let mut live = 0;
    let mut dead = 0;
    while it.len() > 0 {
        let flags = next_int(&mut it, "flags")?;
        let ms = master
            .ms
            .wrapping_add(next_int(&mut it, "ms delta")? as u64);
        let seq = master
            .seq
            .wrapping_add(next_int(&mut it, "seq delta")? as u64);
        let fields = if flags & STREAM_ITEM_FLAG_SAMEFIELDS != 0 {
            let mut f = Vec::with_capacity(master_fields.len());
            for name in &master_fields {
                let v = it
                    .next()
                    .ok_or("stream entry: values cut short")?
                    .to_bytes();
                f.push((name.clone(), v));
            }
            f
        } else {
            let n = next_int(&mut it, "field count")?;
            if n < 0 {
                return Err("stream entry: a negative field count".into());
            }
            let mut f = Vec::with_capacity((n as usize).min(it.len() / 2));
            for _ in 0..n {
                let name = it
                    .next()
                    .ok_or("stream entry: fields cut short")?
                    .to_bytes();
                let v = it
                    .next()
                    .ok_or("stream entry: values cut short")?
                    .to_bytes();
                f.push((name, v));
            }
            f
        };
        next_int(&mut it, "back-count")?;
        if flags & STREAM_ITEM_FLAG_DELETED != 0 {
            dead += 1;
        } else {
            live += 1;
            out.push(StreamEntry {
                id: StreamId { ms, seq },
                fields,
            });
        }
    }
    if live != count || dead != deleted {
        return Err(format!(
            "stream node says {count} entries and {deleted} deleted, holds {live} and {dead}"
        ));
    }
    Ok(())
}
