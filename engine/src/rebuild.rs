//! Rebuilding values with ordinary commands.
//!
//! When RESTORE cannot carry a value (the target is older than the
//! source's RDB encoding, or `--force-rewrite`), the decoded [`Value`] is
//! written with the commands a client would use: SET, RPUSH, SADD, ZADD,
//! HSET (+ HPEXPIREAT for field TTLs), XADD + XSETID + XGROUP CREATE +
//! XGROUP CREATECONSUMER + XCLAIM for streams; the key's TTL comes last.
//!
//! A whole value is written in one transaction on the key itself
//! (`MULTI`, `DEL`, the elements, `PEXPIREAT`, `EXEC`), so nobody sees
//! half of it. A value that comes in parts ([`crate::rdb::Part`]) is built
//! under a temporary name in the same cluster slot (with a safety TTL in
//! case we die half-way) and renamed over the key at the end, in a
//! transaction with its TTL: the key changes at once, and no command is
//! large enough to hold the target up: collection commands carry at most
//! [`MAX_ELEMENTS`] elements and about [`MAX_COMMAND_BYTES`] bytes, strings
//! go in pieces of that size (a single element or stream entry larger than
//! that still goes in one command).
//!
//! Commands of a value in parts may be sent twice (the writer resends what
//! was not confirmed when a connection drops), so each is idempotent: SADD,
//! HSET, ZADD and HPEXPIREAT are by nature, string pieces go with SETRANGE
//! at their offset, and list elements with a script that pushes only when
//! the list has the length it had before them. (A stream entry sent twice
//! is refused by XADD as not newer than the last one: harmless.)
//!
//! Under `Existing::Keep` (`--on-conflict skip`) a key that exists on the
//! target is left alone: strings use `SET NX`, the others are built under
//! the temporary name and moved with RENAMENX.

use bytes::{Bytes, BytesMut};

use crate::rdb::value::{HashField, Stream, StreamId, Value};
use crate::resp::encode;
use crate::restore::Existing;

/// Most elements (members, fields, pairs) in one command.
pub const MAX_ELEMENTS: usize = 512;
/// Commands are cut once their arguments pass this many bytes.
pub const MAX_COMMAND_BYTES: usize = 1024 * 1024;
/// Pushes ARGV[2..] onto KEYS[1] only if its length is ARGV[1].
pub const GUARDED_RPUSH: &str =
    "if redis.call('LLEN', KEYS[1]) ~= tonumber(ARGV[1]) then return -1 end \
     return redis.call('RPUSH', KEYS[1], unpack(ARGV, 2))";

/// TTL of a temporary key while a value is built under it.
pub const TEMP_TTL_MS: i64 = 24 * 3600 * 1000;

/// What the target's version lets us use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TargetCaps {
    pub major: u16,
    pub minor: u16,
}

impl TargetCaps {
    /// A target at least as new as anything this build knows.
    pub const LATEST: TargetCaps = TargetCaps {
        major: u16::MAX,
        minor: 0,
    };

    pub fn new(major: u16, minor: u16) -> TargetCaps {
        TargetCaps { major, minor }
    }

    /// From a `redis_version` string ("7.0.15").
    pub fn parse(version: &str) -> Option<TargetCaps> {
        let mut it = version.split('.');
        let major = it.next()?.parse().ok()?;
        let minor = it.next().unwrap_or("0").parse().ok()?;
        Some(TargetCaps { major, minor })
    }

    fn at_least(&self, major: u16, minor: u16) -> bool {
        (self.major, self.minor) >= (major, minor)
    }

    /// The RDB version the target writes and reads.
    pub fn rdb_version(&self) -> u16 {
        crate::rdb::consts::rdb_version_of_redis(self.major as u32, self.minor as u32)
    }

    /// `SET ... PXAT` (6.2).
    pub fn set_pxat(&self) -> bool {
        self.at_least(6, 2)
    }

    /// XSETID ENTRIESADDED/MAXDELETEDID and XGROUP ... ENTRIESREAD (7.0).
    pub fn stream_counters(&self) -> bool {
        self.at_least(7, 0)
    }

    /// XGROUP CREATECONSUMER (6.2).
    pub fn create_consumer(&self) -> bool {
        self.at_least(6, 2)
    }

    /// XTRIM ... MINID (6.2).
    pub fn xtrim_minid(&self) -> bool {
        self.at_least(6, 2)
    }

    /// Hash field TTLs, HPEXPIREAT (7.4).
    pub fn field_ttls(&self) -> bool {
        self.at_least(7, 4)
    }
}

/// A command's place in the output, for checking its reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    Plain,
    /// `MULTI`.
    Begin,
    /// Inside a transaction (`+QUEUED`).
    Queued,
    /// `EXEC`.
    End,
}

/// Encoded commands, each with its [`Step`].
#[derive(Debug, Default)]
pub struct Commands {
    buf: BytesMut,
    marks: Vec<(usize, Step)>,
    in_tx: bool,
}

impl Commands {
    pub fn new() -> Commands {
        Commands::default()
    }

    fn command(&mut self, args: &[&[u8]]) {
        let step = if self.in_tx {
            Step::Queued
        } else {
            Step::Plain
        };
        self.marks.push((self.buf.len(), step));
        encode::array_header(&mut self.buf, args.len());
        for a in args {
            encode::bulk(&mut self.buf, a);
        }
    }

    fn begin(&mut self) {
        self.command(&[b"MULTI"]);
        self.marks.last_mut().expect("just pushed").1 = Step::Begin;
        self.in_tx = true;
    }

    fn end(&mut self) {
        self.in_tx = false;
        self.command(&[b"EXEC"]);
        self.marks.last_mut().expect("just pushed").1 = Step::End;
    }

    pub fn len(&self) -> usize {
        self.marks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.marks.is_empty()
    }

    /// Bytes encoded so far.
    pub fn bytes(&self) -> usize {
        self.buf.len()
    }

    /// Each command's step and encoded bytes, in order.
    pub fn iter(&self) -> impl Iterator<Item = (Step, &[u8])> + '_ {
        self.marks.iter().enumerate().map(|(i, &(start, step))| {
            let end = self.marks.get(i + 1).map_or(self.buf.len(), |m| m.0);
            (step, &self.buf[start..end])
        })
    }

    /// The encoded commands and where each starts.
    pub fn into_parts(self) -> (BytesMut, Vec<(usize, Step)>) {
        debug_assert!(!self.in_tx);
        (self.buf, self.marks)
    }

    /// Decoded arguments of every command (for tests and logs).
    pub fn to_args(&self) -> Vec<Vec<Vec<u8>>> {
        self.iter()
            .map(|(_, bytes)| {
                let mut b = BytesMut::from(bytes);
                let cmd = crate::resp::parse_command(&mut b)
                    .expect("valid RESP")
                    .expect("complete");
                cmd.args().map(|a| a.to_vec()).collect()
            })
            .collect()
    }
}

/// What a rebuild could not express on the target.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Loss {
    /// Hash fields written without their TTL (the target predates 7.4).
    pub field_ttls: u64,
    /// Stream consumers without pending entries, which a target before 6.2
    /// cannot be given.
    pub consumers: u64,
}

/// The key a value is rebuilt under, and how.
#[derive(Clone, Copy, Debug)]
pub struct Key<'a> {
    pub key: &'a [u8],
    /// Absolute expiry, Unix ms.
    pub expire_ms: Option<i64>,
    pub existing: Existing,
    /// What the target's version can take.
    pub caps: TargetCaps,
}

/// A whole value rebuilt as ordinary commands (in one MULTI/EXEC), and
/// what it could not carry.
#[derive(Debug)]
pub struct Rebuilt {
    pub key: Bytes,
    pub commands: Commands,
    pub loss: Loss,
}

/// The value a RESTORE carries, rebuilt as ordinary commands for a target
/// that cannot read its payload. The one way a RESTORE is rebuilt, whether
/// it came from the stream or a target refused it. `Ok(None)` for a module
/// value, which only its module could rebuild; `Err` when the payload does
/// not decode.
pub fn rebuild_restore(
    args: &crate::restore::RestoreArgs,
    caps: TargetCaps,
    tmp: impl FnOnce() -> Vec<u8>,
    now_ms: i64,
) -> Result<Option<Rebuilt>, String> {
    let value = crate::restore::decode_payload(&args.payload)?;
    if matches!(value, Value::Module { .. }) {
        return Ok(None);
    }
    let existing = if args.replace {
        Existing::Replace
    } else {
        Existing::Keep
    };
    let target = Key {
        key: &args.key,
        expire_ms: args.expire_ms,
        existing,
        caps,
    };
    Ok(Some(rebuild_value(target, &value, tmp, now_ms)))
}

/// A whole decoded value rebuilt as ordinary commands (see
/// [`Rebuild::whole`]).
pub fn rebuild_value(
    target: Key<'_>,
    value: &Value,
    tmp: impl FnOnce() -> Vec<u8>,
    now_ms: i64,
) -> Rebuilt {
    let mut commands = Commands::new();
    let loss = Rebuild::whole(target, value, tmp, now_ms, &mut commands);
    Rebuilt {
        key: Bytes::copy_from_slice(target.key),
        commands,
        loss,
    }
}

/// One value being rebuilt.
pub struct Rebuild {
    key: Bytes,
    /// Where elements go: the key, or the temporary name.
    dest: Vec<u8>,
    tmp: Option<Vec<u8>>,
    expire_ms: Option<i64>,
    existing: Existing,
    caps: TargetCaps,
    /// Whether anything was written to `dest`.
    created: bool,
    /// String bytes or list elements written so far.
    written: u64,
    pub loss: Loss,
}

impl Rebuild {
    /// Writes a whole value. `tmp` gives a temporary name in the key's slot
    /// (used under `Existing::Keep`); `now_ms` decides what has expired.
    pub fn whole(
        target: Key<'_>,
        value: &Value,
        tmp: impl FnOnce() -> Vec<u8>,
        now_ms: i64,
        out: &mut Commands,
    ) -> Loss {
        let Key {
            key,
            expire_ms,
            existing,
            caps,
        } = target;
        if matches!(value, Value::Module { .. }) {
            // Only its module can make sense of it: nothing to write.
            return Loss::default();
        }
        let expired = expire_ms.is_some_and(|ms| ms <= now_ms);
        let value = live(value, now_ms);
        let empty = value.is_empty() || expired;
        let replace = existing == Existing::Replace;
        if empty {
            // What the source holds is nothing: so must the target.
            if replace {
                out.command(&[b"DEL", key]);
            }
            return Loss::default();
        }
        if let Value::String(s) = &*value {
            if caps.set_pxat() || expire_ms.is_none() {
                let mut args: Vec<&[u8]> = vec![b"SET", key, s];
                if !replace {
                    args.push(b"NX");
                }
                let ms = expire_ms.map(|ms| ms.to_string());
                if let Some(ms) = &ms {
                    args.push(b"PXAT");
                    args.push(ms.as_bytes());
                }
                out.command(&args);
                return Loss::default();
            }
        }
        let mut r = Rebuild {
            key: Bytes::copy_from_slice(key),
            dest: if replace { key.to_vec() } else { tmp() },
            tmp: None,
            expire_ms,
            existing,
            caps,
            created: false,
            written: 0,
            loss: Loss::default(),
        };
        out.begin();
        out.command(&[b"DEL", &r.dest]);
        match &*value {
            Value::Stream(s) => r.stream_whole(s, out),
            v => r.elements(v, now_ms, out),
        }
        if let Some(ms) = expire_ms {
            out.command(&[b"PEXPIREAT", &r.dest, ms.to_string().as_bytes()]);
        }
        if !replace {
            out.command(&[b"RENAMENX", &r.dest, key]);
            out.command(&[b"DEL", &r.dest]);
        }
        out.end();
        r.loss
    }

    /// Starts a value that comes in parts, built under `tmp` (a name in the
    /// key's slot that nothing else uses).
    pub fn begin(target: Key<'_>, tmp: Vec<u8>, out: &mut Commands) -> Rebuild {
        out.command(&[b"DEL", &tmp]);
        Rebuild {
            key: Bytes::copy_from_slice(target.key),
            dest: tmp.clone(),
            tmp: Some(tmp),
            expire_ms: target.expire_ms,
            existing: target.existing,
            caps: target.caps,
            created: false,
            written: 0,
            loss: Loss::default(),
        }
    }

    /// Writes one part's elements (a stream part's IDs and groups wait for
    /// [`Rebuild::finish`]).
    pub fn part(&mut self, value: &Value, now_ms: i64, out: &mut Commands) {
        let was_created = self.created;
        let value = live(value, now_ms);
        self.elements(&value, now_ms, out);
        if self.created && !was_created {
            // If we die before the rename, the half-built copy goes away.
            out.command(&[b"PEXPIRE", &self.dest, TEMP_TTL_MS.to_string().as_bytes()]);
        }
    }

    /// Ends a value that came in parts; `last` is its last part (a stream's
    /// carries its IDs and groups).
    pub fn finish(mut self, last: &Value, now_ms: i64, out: &mut Commands) -> Loss {
        let tmp = self.tmp.clone().expect("a rebuild in parts");
        let replace = self.existing == Existing::Replace;
        if let Value::Stream(s) = last {
            // Pending entries of deleted messages cannot be put back here:
            // the stream is complete before its groups are known.
            self.stream_ids(s, out);
            self.stream_groups(s, true, None, out);
        }
        let expired = self.expire_ms.is_some_and(|ms| ms <= now_ms);
        if !self.created || expired {
            out.command(&[b"DEL", &tmp]);
            if replace {
                out.command(&[b"DEL", &self.key]);
            }
            return self.loss;
        }
        let ttl = self.expire_ms.map(|ms| ms.to_string());
        out.begin();
        if replace {
            out.command(&[b"RENAME", &tmp, &self.key]);
            match &ttl {
                Some(ms) => out.command(&[b"PEXPIREAT", &self.key, ms.as_bytes()]),
                None => out.command(&[b"PERSIST", &self.key]),
            }
        } else {
            match &ttl {
                Some(ms) => out.command(&[b"PEXPIREAT", &tmp, ms.as_bytes()]),
                None => out.command(&[b"PERSIST", &tmp]),
            }
            out.command(&[b"RENAMENX", &tmp, &self.key]);
            out.command(&[b"DEL", &tmp]);
        }
        out.end();
        self.loss
    }

    /// The commands that add `value`'s elements to `dest`.
    fn elements(&mut self, value: &Value, now_ms: i64, out: &mut Commands) {
        let dest = self.dest.clone();
        match value {
            Value::String(s) => {
                for piece in pieces(s) {
                    if self.written == 0 && self.tmp.is_none() {
                        out.command(&[b"SET", &dest, piece]);
                    } else {
                        let offset = self.written.to_string();
                        out.command(&[b"SETRANGE", &dest, offset.as_bytes(), piece]);
                    }
                    self.written += piece.len() as u64;
                    self.created = true;
                }
            }
            Value::List(items) if self.tmp.is_some() => self.guarded_rpush(items, out),
            Value::List(items) => self.batched(out, b"RPUSH", items.iter().map(|i| vec![&i[..]])),
            Value::Set(items) => self.batched(out, b"SADD", items.iter().map(|i| vec![&i[..]])),
            Value::ZSet(items) => {
                let scores: Vec<String> = items.iter().map(|(_, s)| format_score(*s)).collect();
                self.batched(
                    out,
                    b"ZADD",
                    items
                        .iter()
                        .zip(&scores)
                        .map(|((m, _), s)| vec![s.as_bytes(), &m[..]]),
                )
            }
            Value::Hash(fields) => {
                self.batched(
                    out,
                    b"HSET",
                    fields.iter().map(|f| vec![&f.field[..], &f.value[..]]),
                );
                self.field_ttls(fields, now_ms, out);
            }
            Value::Stream(s) => self.stream_entries(&s.entries, out),
            Value::Module { .. } => {}
        }
    }

    /// RPUSH in bounded batches, each applied only if the list still has
    /// the length it had before the batch (so that a resent batch is not
    /// pushed twice).
    fn guarded_rpush(&mut self, items: &[Bytes], out: &mut Commands) {
        let mut start = 0;
        while start < items.len() {
            let mut end = start;
            let mut bytes = 0;
            while end < items.len() && end - start < MAX_ELEMENTS && bytes < MAX_COMMAND_BYTES {
                bytes += items[end].len();
                end += 1;
            }
            let expected = self.written.to_string();
            let mut args: Vec<&[u8]> = vec![
                b"EVAL",
                GUARDED_RPUSH.as_bytes(),
                b"1",
                &self.dest,
                expected.as_bytes(),
            ];
            args.extend(items[start..end].iter().map(|i| &i[..]));
            out.command(&args);
            self.written += (end - start) as u64;
            self.created = true;
            start = end;
        }
    }

    /// `verb dest <elements>...`, cut into bounded commands.
    fn batched<'a>(
        &mut self,
        out: &mut Commands,
        verb: &[u8],
        elements: impl Iterator<Item = Vec<&'a [u8]>>,
    ) {
        let mut args: Vec<&[u8]> = Vec::new();
        let mut n = 0;
        let mut bytes = 0;
        let dest = self.dest.clone();
        for element in elements {
            if args.is_empty() {
                args.push(verb);
                args.push(&dest);
            }
            for a in element {
                bytes += a.len();
                args.push(a);
            }
            n += 1;
            if n == MAX_ELEMENTS || bytes >= MAX_COMMAND_BYTES {
                out.command(&args);
                self.created = true;
                args.clear();
                n = 0;
                bytes = 0;
            }
        }
        if !args.is_empty() {
            out.command(&args);
            self.created = true;
        }
    }

    /// HPEXPIREAT for fields with a TTL, grouped by TTL.
    fn field_ttls(&mut self, fields: &[HashField], now_ms: i64, out: &mut Commands) {
        let mut with_ttl: Vec<(i64, &[u8])> = fields
            .iter()
            .filter_map(|f| Some((f.expire_ms?, &f.field[..])))
            .filter(|(ms, _)| *ms > now_ms)
            .collect();
        if with_ttl.is_empty() {
            return;
        }
        if !self.caps.field_ttls() {
            self.loss.field_ttls += with_ttl.len() as u64;
            return;
        }
        with_ttl.sort_by_key(|(ms, _)| *ms);
        for group in with_ttl.chunk_by(|a, b| a.0 == b.0) {
            for chunk in group.chunks(MAX_ELEMENTS) {
                let ms = chunk[0].0.to_string();
                let n = chunk.len().to_string();
                let mut args: Vec<&[u8]> = vec![
                    b"HPEXPIREAT",
                    &self.dest,
                    ms.as_bytes(),
                    b"FIELDS",
                    n.as_bytes(),
                ];
                args.extend(chunk.iter().map(|(_, f)| *f));
                out.command(&args);
            }
        }
    }

    /// A whole stream. Pending entries whose message was deleted (trimmed
    /// or XDEL'd after delivery) cannot be claimed into a group as such:
    /// each is added in its place in ID order, claimed, and deleted again.
    fn stream_whole(&mut self, s: &Stream, out: &mut Commands) {
        let live: std::collections::HashSet<StreamId> = s.entries.iter().map(|e| e.id).collect();
        let mut ghosts: Vec<StreamId> = s
            .groups
            .iter()
            .flat_map(|g| g.pending.iter())
            .filter(|p| p.consumer.is_some() && !live.contains(&p.id))
            .map(|p| p.id)
            .collect();
        ghosts.sort_unstable();
        ghosts.dedup();
        if ghosts.is_empty() {
            self.stream_entries(&s.entries, out);
            self.stream_ids(s, out);
            self.stream_groups(s, true, None, out);
            return;
        }
        let dest = self.dest.clone();
        // The groups first (they create the stream), so ghosts can be
        // claimed as they pass; their IDs and counters are set at the end.
        for (i, g) in s.groups.iter().enumerate() {
            let mut args: Vec<&[u8]> = vec![b"XGROUP", b"CREATE", &dest, &g.name, b"0-0"];
            if i == 0 {
                args.push(b"MKSTREAM");
            }
            out.command(&args);
        }
        self.created = true;
        // Ghosts before the first message were trimmed away on the source:
        // they go the same way (XTRIM leaves the max-deleted ID alone); the
        // others were XDEL'd, and are again.
        let first_live = s.entries.first().map(|e| e.id);
        let leading = ghosts
            .iter()
            .take_while(|g| first_live.is_none_or(|f| **g < f))
            .count();
        let mut entries = s.entries.iter().peekable();
        for (i, &ghost) in ghosts.iter().enumerate() {
            while let Some(e) = entries.next_if(|e| e.id < ghost) {
                self.stream_entries(std::slice::from_ref(e), out);
            }
            let id = ghost.to_string();
            out.command(&[b"XADD", &dest, id.as_bytes(), b"deleted", b""]);
            for g in &s.groups {
                for p in g.pending.iter().filter(|p| p.id == ghost) {
                    self.claim(&g.name, p, out);
                }
            }
            if i >= leading || !self.caps.xtrim_minid() {
                // (Before 6.2 there is no MINID, nor a max-deleted ID to
                // keep.)
                out.command(&[b"XDEL", &dest, id.as_bytes()]);
            } else if i + 1 == leading {
                match first_live {
                    Some(f) => out.command(&[b"XTRIM", &dest, b"MINID", f.to_string().as_bytes()]),
                    None => out.command(&[b"XTRIM", &dest, b"MAXLEN", b"0"]),
                }
            }
        }
        let rest: Vec<_> = entries.cloned().collect();
        self.stream_entries(&rest, out);
        self.stream_ids(s, out);
        for g in &s.groups {
            let last = g.last_id.to_string();
            let mut args: Vec<&[u8]> = vec![b"XGROUP", b"SETID", &dest, &g.name, last.as_bytes()];
            let read = g.entries_read.map(|n| n.to_string());
            if let (true, Some(read)) = (self.caps.stream_counters(), &read) {
                args.push(b"ENTRIESREAD");
                args.push(read.as_bytes());
            }
            out.command(&args);
        }
        self.stream_groups(s, false, Some(&live), out);
    }

    fn stream_entries(&mut self, entries: &[crate::rdb::value::StreamEntry], out: &mut Commands) {
        for e in entries {
            let id = e.id.to_string();
            let mut args: Vec<&[u8]> = vec![b"XADD", &self.dest, id.as_bytes()];
            for (f, v) in &e.fields {
                args.push(f);
                args.push(v);
            }
            out.command(&args);
            self.created = true;
        }
    }

    /// A stream's last ID and counters (after its entries); creates it
    /// empty when no entry was added.
    fn stream_ids(&mut self, s: &Stream, out: &mut Commands) {
        let dest = self.dest.clone();
        if !self.created {
            // No entry left: create the stream with one entry trimmed away
            // at once, which leaves it empty with its last ID.
            let id = if s.last_id == StreamId::default() {
                StreamId { ms: 0, seq: 1 }
            } else {
                s.last_id
            };
            out.command(&[
                b"XADD",
                &dest,
                b"MAXLEN",
                b"0",
                id.to_string().as_bytes(),
                b"x",
                b"y",
            ]);
            self.created = true;
        }
        let last = s.last_id.to_string();
        let mut args: Vec<Vec<u8>> = vec![b"XSETID".to_vec(), dest.clone(), last.into_bytes()];
        if self.caps.stream_counters() {
            if let Some(added) = s.entries_added {
                args.push(b"ENTRIESADDED".to_vec());
                args.push(added.to_string().into_bytes());
            }
            if let Some(max) = s.max_deleted_id.filter(|m| *m != StreamId::default()) {
                args.push(b"MAXDELETEDID".to_vec());
                args.push(max.to_string().into_bytes());
            }
        }
        let refs: Vec<&[u8]> = args.iter().map(|a| &a[..]).collect();
        out.command(&refs);
    }

    /// Consumer groups (created here when `create`), their consumers, and
    /// their pending entries (only those of messages in `live`, when given:
    /// the others were claimed already).
    fn stream_groups(
        &mut self,
        s: &Stream,
        create: bool,
        live: Option<&std::collections::HashSet<StreamId>>,
        out: &mut Commands,
    ) {
        let dest = self.dest.clone();
        for g in &s.groups {
            if create {
                let last = g.last_id.to_string();
                let mut args: Vec<&[u8]> =
                    vec![b"XGROUP", b"CREATE", &dest, &g.name, last.as_bytes()];
                let read = g.entries_read.map(|n| n.to_string());
                if let (true, Some(read)) = (self.caps.stream_counters(), &read) {
                    args.push(b"ENTRIESREAD");
                    args.push(read.as_bytes());
                }
                out.command(&args);
            }
            if self.caps.create_consumer() {
                for c in &g.consumers {
                    out.command(&[b"XGROUP", b"CREATECONSUMER", &dest, &g.name, &c.name]);
                }
            } else {
                // XCLAIM creates the consumers that own pending entries;
                // the others cannot be made before 6.2.
                self.loss.consumers +=
                    g.consumers.iter().filter(|c| c.pending.is_empty()).count() as u64;
            }
            for p in g
                .pending
                .iter()
                .filter(|p| live.is_none_or(|l| l.contains(&p.id)))
            {
                self.claim(&g.name, p, out);
            }
        }
    }

    /// Puts a pending entry in its consumer's list, with its delivery time
    /// and count.
    fn claim(&self, group: &[u8], p: &crate::rdb::value::PendingEntry, out: &mut Commands) {
        let Some(consumer) = &p.consumer else { return };
        let id = p.id.to_string();
        let time = p.delivery_time_ms.to_string();
        let count = p.delivery_count.to_string();
        out.command(&[
            b"XCLAIM",
            &self.dest,
            group,
            consumer,
            b"0",
            id.as_bytes(),
            b"TIME",
            time.as_bytes(),
            b"RETRYCOUNT",
            count.as_bytes(),
            b"FORCE",
            b"JUSTID",
        ]);
    }
}

/// `value` without hash fields whose TTL has passed.
/// Whether sending `args` a second time (after a lost reply) leaves what
/// sending it once does: the commands idempotent by nature, and those a
/// rebuild in parts makes so — the guarded RPUSH script (a resent batch
/// finds the list longer and pushes nothing) and the RENAME / RENAMENX of
/// its temporary name (the second finds nothing to move and is refused).
pub fn safe_to_resend(args: &[&[u8]]) -> bool {
    let Some(name) = args.first() else {
        return false;
    };
    if crate::command::lookup_name(name).is_some_and(|spec| spec.idempotent) {
        return true;
    }
    if name.eq_ignore_ascii_case(b"EVAL") {
        return args.get(1).is_some_and(|s| *s == GUARDED_RPUSH.as_bytes());
    }
    (name.eq_ignore_ascii_case(b"RENAME") || name.eq_ignore_ascii_case(b"RENAMENX"))
        && args.get(1).is_some_and(|k| crate::marker::is_internal(k))
}

fn live(value: &Value, now_ms: i64) -> std::borrow::Cow<'_, Value> {
    match value {
        Value::Hash(fields)
            if fields
                .iter()
                .any(|f| f.expire_ms.is_some_and(|ms| ms <= now_ms)) =>
        {
            std::borrow::Cow::Owned(Value::Hash(
                fields
                    .iter()
                    .filter(|f| f.expire_ms.is_none_or(|ms| ms > now_ms))
                    .cloned()
                    .collect(),
            ))
        }
        v => std::borrow::Cow::Borrowed(v),
    }
}

/// A string in pieces of at most [`MAX_COMMAND_BYTES`] (one empty piece for
/// the empty string).
fn pieces(s: &[u8]) -> impl Iterator<Item = &[u8]> {
    let n = s.len().div_ceil(MAX_COMMAND_BYTES).max(1);
    (0..n).map(move |i| &s[i * MAX_COMMAND_BYTES..((i + 1) * MAX_COMMAND_BYTES).min(s.len())])
}

/// A score as ZADD reads it back to the same double (shortest round-trip
/// form; `inf` / `-inf`).
pub fn format_score(score: f64) -> String {
    if score == f64::INFINITY {
        "inf".into()
    } else if score == f64::NEG_INFINITY {
        "-inf".into()
    } else {
        format!("{score:?}")
    }
}

#[cfg(test)]
mod tests;
