//! The intake: everything read from a source master goes through here.
//!
//! Its input is the shard's [`Spill`]: a reader task empties the socket into
//! it whatever the targets do. After a `+FULLRESYNC` the intake reads the RDB
//! transfer (`$<len>` or diskless `$EOF:<mark>`), turning each entry into a
//! RESTORE for the writer that owns the key; then, and directly after a
//! `+CONTINUE`, it reads the command stream, keeping the replication offset
//! byte-exact, tracking SELECT, holding transactions until their EXEC, and
//! handing commands to writers. Replication chatter (PING, REPLCONF) counts
//! in the offset but is never replayed.
//!
//! On a cluster target every command is planned by `engine::split`: sent
//! whole to its slot's owner, split per slot, or rewritten (after a
//! barrier: every earlier command confirmed). A change of the target's slot
//! map is followed the same way: barrier, then route by the new map.
//!
//! The offset published as *processed* only moves at points outside a
//! transaction, after the batches holding everything before it were handed
//! over; a resumed stream therefore never starts inside a transaction.

use std::io;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use engine::command::{self, CommandSpec, Role};
use engine::filter::{DbFilter, Kept, KeyFilter};
use engine::rdb::{RdbError, RdbItem, RdbReader};
use engine::rebuild::{Commands, Rebuild, Step, TargetCaps};
use engine::resp::{encode, parse_command, Command};
use engine::restore::{encode_restore, encode_restore_payload, restamp, restore_compat, Existing};
use engine::split::{self, Plan};
use ractor::ActorRef;
use tokio::sync::watch;
use tokio_util::io::StreamReader;

use super::rewrite::{self, TargetControl};
use super::SourceMsg;
use crate::error::WorkerError;
use crate::events::{self, LogLimiter};
use crate::progress::ShardStats;
use crate::route::{Dispatcher, ExpectKind, Topology};
use crate::spill::Spill;

/// How the intake treats what it reads.
#[derive(Clone, Debug)]
pub struct IntakeOptions {
    /// What a RESTORE does to a key the target already has.
    pub existing: Existing,
    pub db_filter: DbFilter,
    /// Which keys are copied (`--include` / `--exclude`).
    pub key_filter: KeyFilter,
    /// Number of databases on the source (`CONFIG GET databases`), to turn
    /// a FLUSHALL into per-database flushes when databases are filtered.
    pub source_databases: u32,
    /// Replay PUBLISH on the target (off by default: subscribers of the
    /// target would see messages the source's clients published).
    pub replay_publish: bool,
    /// Longest silence on the replication link before it is considered dead.
    pub read_timeout: Duration,
    /// Largest value (DUMP payload) accepted in one RESTORE.
    pub max_value_len: usize,
    /// Where stream bytes the targets cannot take yet are spilled.
    pub spill_dir: PathBuf,
    /// Stream bytes held in memory per shard before spilling to disk.
    pub spill_memory: usize,
    /// What the target's version allows (its oldest node's, on a cluster):
    /// decides between RESTORE as is, RESTORE of a payload restamped with
    /// the target's RDB version, and rebuilding with ordinary commands.
    pub target_caps: TargetCaps,
    /// Rebuild every value with ordinary commands (never RESTORE).
    pub force_rewrite: bool,
    /// Values whose serialization passes this many bytes are written in
    /// parts (bounded commands under a temporary name, renamed at the end).
    pub big_key_bytes: usize,
    /// Keeps this shard's temporary key names apart from other shards'.
    pub tmp_scope: String,
    /// The task's heartbeat id: its heartbeat key is measured and dropped
    /// (see `engine::heartbeat`).
    pub heartbeat_id: Option<String>,
}

/// Default for [`IntakeOptions::big_key_bytes`].
pub const DEFAULT_BIG_KEY_BYTES: usize = 64 * 1024 * 1024;

impl Default for IntakeOptions {
    fn default() -> Self {
        IntakeOptions {
            existing: Existing::Replace,
            db_filter: DbFilter::all(),
            key_filter: KeyFilter::all(),
            source_databases: 16,
            replay_publish: false,
            read_timeout: Duration::from_secs(60),
            max_value_len: engine::rdb::DEFAULT_MAX_VALUE_LEN,
            spill_dir: std::env::temp_dir().join("shardsync-spill"),
            spill_memory: 32 * 1024 * 1024,
            target_caps: TargetCaps::LATEST,
            force_rewrite: false,
            big_key_bytes: DEFAULT_BIG_KEY_BYTES,
            tmp_scope: "0".into(),
            heartbeat_id: None,
        }
    }
}

/// How an intake ended without error.
#[derive(Debug, PartialEq, Eq)]
pub enum IntakeEnd {
    /// Asked to stop; everything read was handed over.
    Stopped,
}

/// Where the stream was when a transaction opened, and what it holds.
struct OpenTx {
    /// Source db when MULTI arrived.
    start_db: u32,
    commands: Vec<(Command, Option<&'static CommandSpec>)>,
}

/// A stream position: replication offset and the source db selected there.
type At = Option<(u64, u32)>;

/// How a value from the RDB reaches the target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Carry {
    /// RESTORE of the payload as is.
    Restore,
    /// RESTORE of the payload stamped with the target's RDB version (the
    /// encoding is one the target reads).
    Restamp,
    /// Ordinary commands.
    Rebuild,
}

/// A big value being written in parts.
struct InParts {
    /// `None` when its database is not copied.
    rebuild: Option<Rebuild>,
    writer: usize,
    db: Option<u32>,
}

pub(crate) struct Intake {
    pub addr: String,
    input: Arc<Spill>,
    buf: BytesMut,
    dispatcher: Dispatcher,
    stats: Arc<ShardStats>,
    actor: ActorRef<SourceMsg>,
    stop: watch::Receiver<bool>,
    options: IntakeOptions,
    /// Replication id of this sync.
    replid: String,
    /// Offset of the next byte of the stream.
    offset: u64,
    /// Source db selected at `offset`.
    db: u32,
    tx: Option<OpenTx>,
    control: Option<TargetControl>,
    log: LogLimiter,
    /// The big value being written in parts, if any.
    parts: Option<InParts>,
    /// Temporary names handed out so far.
    tmp_names: u64,
    /// Module types seen in the RDB (each reported once).
    module_types: std::collections::HashSet<u64>,
}

impl Intake {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        addr: String,
        input: Arc<Spill>,
        buf: BytesMut,
        dispatcher: Dispatcher,
        stats: Arc<ShardStats>,
        actor: ActorRef<SourceMsg>,
        stop: watch::Receiver<bool>,
        options: IntakeOptions,
        replid: String,
        offset: u64,
        db: u32,
    ) -> Intake {
        Intake {
            addr,
            input,
            buf,
            dispatcher,
            stats,
            actor,
            stop,
            options,
            replid,
            offset,
            db,
            tx: None,
            control: None,
            log: LogLimiter::new(),
            parts: None,
            tmp_names: 0,
            module_types: Default::default(),
        }
    }

    fn stop_requested(&self) -> bool {
        *self.stop.borrow()
    }

    /// Target database for source database `db`: `Some(db')` on a
    /// standalone target, `None` (no SELECT) on a cluster, which has only
    /// db 0; the outer `None` when `db` is not copied.
    fn target_db(&self, db: u32) -> Option<Option<u32>> {
        let tdb = self.options.db_filter.target_db(db)?;
        Some((!self.dispatcher.router().is_cluster()).then_some(tdb))
    }

    async fn read_more(&mut self) -> Result<(), WorkerError> {
        let chunk = self.input.next().await?;
        self.buf.extend_from_slice(&chunk);
        Ok(())
    }

    // ---------------------------------------------------------------- RDB

    /// Reads the RDB transfer that follows `+FULLRESYNC`. Returns `false`
    /// when asked to stop before it ended.
    pub async fn full_sync(&mut self) -> Result<bool, WorkerError> {
        let header = self.read_transfer_header().await?;
        let (total, mark) = match &header {
            Transfer::Sized(len) => (*len, None),
            Transfer::Marked(mark) => (0, Some(mark.clone())),
        };
        self.stats.begin_full_sync(&self.replid, self.offset, total);
        events::FullSyncStarted {
            source: &self.addr,
            replid: &self.replid,
            offset: self.offset,
            transfer: if mark.is_some() { "diskless" } else { "disk" },
        }
        .emit();
        let started = Instant::now();

        let input = self.input.clone();
        let chunks = futures::stream::unfold(Some(input), |input| async move {
            let input = input?;
            match input.next().await {
                Ok(chunk) => Some((Ok::<Bytes, io::Error>(chunk), Some(input))),
                Err(e) => Some((Err(io::Error::other(e)), None)),
            }
        });
        let reader = StreamReader::new(Box::pin(chunks));
        let initial = std::mem::take(&mut self.buf);
        let mut rdb = RdbReader::open(reader, initial)
            .await
            .map_err(|e| self.rdb_error(e))?;
        rdb.set_max_value_len(self.options.max_value_len);
        rdb.set_part_threshold(self.options.big_key_bytes);

        // A second full sync in this task, or one over data an earlier run
        // wrote: what the target holds is ours, and must be replaced even
        // under --on-conflict skip, or it would stay stale.
        let resync_existing = if self.stats.full_syncs.load(Ordering::Relaxed) > 1
            || self.stats.ours.load(Ordering::Relaxed)
        {
            Existing::Replace
        } else {
            self.options.existing
        };
        // One stop future for the whole snapshot: a fresh `changed()` per
        // entry registers and drops a waiter each time, a fifth of the
        // intake's CPU on small keys.
        let mut stop = self.stop.clone();
        let stopped = async move {
            let _ = stop.wait_for(|stop| *stop).await;
        };
        tokio::pin!(stopped);
        let mut keys = 0u64;
        loop {
            let item = tokio::select! {
                biased;
                _ = &mut stopped => {
                    self.dispatcher.flush_all(None).await?;
                    return Ok(false);
                }
                item = rdb.next() => item.map_err(|e| self.rdb_error(e))?,
            };
            let Some(item) = item else { break };
            // While the spill holds data nothing here waits, and the socket
            // readers (and other shards) sharing this runtime's threads
            // would wait behind a whole snapshot: yield whenever the task's
            // cooperative budget is spent.
            tokio::task::coop::consume_budget().await;
            match item {
                RdbItem::Entry(entry) => {
                    // Our own heartbeat is neither copied nor counted.
                    if self.is_heartbeat(&entry.key) {
                        continue;
                    }
                    keys += 1;
                    self.stats.full_sync_keys.store(keys, Ordering::Relaxed);
                    self.stats
                        .full_sync_bytes
                        .store(rdb.offset(), Ordering::Relaxed);
                    let Some(tdb) = self.target_db(entry.db) else {
                        continue;
                    };
                    if !self.options.key_filter.keeps(&entry.key) {
                        continue;
                    }
                    self.follow_map(None).await?;
                    let w = self.dispatcher.router().writer_for_key(&entry.key);
                    let existing = resync_existing;
                    if let Some(id) = entry.module_id {
                        if self.module_types.insert(id) {
                            tracing::info!(
                                source = %self.addr,
                                module_type = %engine::rdb::module_type_name(id),
                                module_id = id,
                                key = %String::from_utf8_lossy(&entry.key[..entry.key.len().min(80)]),
                                "module values are restored as they are: the target needs the same module loaded"
                            );
                        }
                    }
                    match self.carry(&entry) {
                        Carry::Restore => {
                            let kind = restore_kind(existing);
                            self.dispatcher
                                .push(w, tdb, kind, None, |buf| {
                                    encode_restore(buf, &entry.key, &entry, existing)
                                })
                                .await?;
                        }
                        Carry::Restamp => {
                            self.stats.values_restamped.fetch_add(1, Ordering::Relaxed);
                            let payload = restamp(
                                entry.dump_payload(),
                                self.options.target_caps.rdb_version(),
                            );
                            let kind = restore_kind(existing);
                            self.dispatcher
                                .push(w, tdb, kind, None, |buf| {
                                    encode_restore_payload(
                                        buf, &entry.key, &entry, &payload, existing,
                                    )
                                })
                                .await?;
                        }
                        Carry::Rebuild => {
                            let value = entry.decode().map_err(|e| self.rdb_error(e))?;
                            self.stats.values_rebuilt.fetch_add(1, Ordering::Relaxed);
                            let mut out = Commands::new();
                            let slot = engine::slot::slot(&entry.key);
                            let tmp = self.tmp_name(slot);
                            let loss = Rebuild::whole(
                                &entry.key,
                                &value,
                                entry.expire_ms,
                                existing,
                                self.options.target_caps,
                                || tmp,
                                now_ms(),
                                &mut out,
                            );
                            self.note_loss(&entry.key, loss);
                            self.push_commands(w, tdb, &out).await?;
                        }
                    }
                    self.dispatcher.flush_full(None).await?;
                }
                RdbItem::Part(part) => {
                    if part.index == 0 {
                        keys += 1;
                        self.stats.full_sync_keys.store(keys, Ordering::Relaxed);
                        self.stats.big_values.fetch_add(1, Ordering::Relaxed);
                        let mut out = Commands::new();
                        let copied = self
                            .target_db(part.db)
                            .filter(|_| self.options.key_filter.keeps(&part.key));
                        let in_parts = match copied {
                            None => InParts {
                                rebuild: None,
                                writer: 0,
                                db: None,
                            },
                            Some(tdb) => {
                                self.follow_map(None).await?;
                                let slot = engine::slot::slot(&part.key);
                                let tmp = self.tmp_name(slot);
                                let rebuild = Rebuild::begin(
                                    &part.key,
                                    tmp,
                                    part.expire_ms,
                                    resync_existing,
                                    self.options.target_caps,
                                    &mut out,
                                );
                                events::BigValue {
                                    source: &self.addr,
                                    key: &part.key,
                                    kind: part.kind.name(),
                                }
                                .emit();
                                InParts {
                                    rebuild: Some(rebuild),
                                    writer: self.dispatcher.router().writer_for_key(&part.key),
                                    db: tdb,
                                }
                            }
                        };
                        self.push_commands(in_parts.writer, in_parts.db, &out)
                            .await?;
                        self.parts = Some(in_parts);
                    }
                    self.stats
                        .full_sync_bytes
                        .store(rdb.offset(), Ordering::Relaxed);
                    let Some(mut in_parts) = self.parts.take() else {
                        return Err(self.rdb_error(RdbError::Invalid {
                            offset: part.value_offset,
                            what: "a value part without its first part".into(),
                        }));
                    };
                    if let Some(mut rebuild) = in_parts.rebuild.take() {
                        let mut out = Commands::new();
                        let now = now_ms();
                        rebuild.part(&part.value, now, &mut out);
                        if part.last {
                            let loss = rebuild.finish(&part.value, now, &mut out);
                            self.note_loss(&part.key, loss);
                        } else {
                            in_parts.rebuild = Some(rebuild);
                        }
                        self.push_commands(in_parts.writer, in_parts.db, &out)
                            .await?;
                    }
                    if !part.last {
                        self.parts = Some(in_parts);
                    }
                    self.dispatcher.flush_full(None).await?;
                }
                RdbItem::Function { code } => {
                    let (args, kind): (&[&[u8]], _) = match resync_existing {
                        Existing::Replace => (&[b"FUNCTION", b"LOAD", b"REPLACE"], ExpectKind::Ok),
                        Existing::Keep => {
                            (&[b"FUNCTION", b"LOAD"], ExpectKind::KeepExistingFunction)
                        }
                    };
                    for w in 0..self.dispatcher.router().n_writers() {
                        self.dispatcher
                            .push(w, None, kind, None, |buf| {
                                encode::array_header(buf, args.len() + 1);
                                for a in args {
                                    encode::bulk(buf, a);
                                }
                                encode::bulk(buf, &code);
                            })
                            .await?;
                    }
                }
                RdbItem::ModuleAux { module_id } => {
                    tracing::debug!(source = %self.addr, module = %engine::rdb::module_type_name(module_id), "module aux data skipped");
                }
                RdbItem::End(checksum) => {
                    tracing::debug!(source = %self.addr, ?checksum, "RDB end");
                }
                RdbItem::Aux { .. } | RdbItem::SelectDb(_) | RdbItem::ResizeDb { .. } => {}
            }
        }
        let rdb_len = rdb.offset();
        self.stats.full_sync_bytes.store(rdb_len, Ordering::Relaxed);
        let (reader, rest) = rdb.into_parts();
        let (_, unread) = reader.into_inner_with_chunk();
        self.buf = rest;
        if let Some(unread) = unread {
            self.buf.extend_from_slice(&unread);
        }
        match header {
            Transfer::Sized(len) if len != rdb_len => {
                return Err(WorkerError::Unexpected {
                    addr: self.addr.clone(),
                    context: "reading the RDB transfer",
                    reply: format!("the RDB ended after {rdb_len} of the {len} bytes announced"),
                })
            }
            Transfer::Marked(mark) => self.expect_eof_mark(&mark).await?,
            _ => {}
        }
        // Everything from the RDB is confirmed before any command of the
        // stream goes out: a RESTORE the target refuses is rewritten by its
        // writer, and must not land after a later command on its key.
        self.dispatcher.flush_all(None).await?;
        let mut stop = self.stop.clone();
        tokio::select! {
            biased;
            _ = stop.changed() => return Ok(false),
            _ = self.stats.wait_drained() => {}
        }
        self.stats.full_syncs_loaded.fetch_add(1, Ordering::Relaxed);
        // After a full sync the master selects a db before any command; 0
        // stands until then.
        self.db = 0;
        self.stats.begin_incremental(&self.replid, self.offset, 0);
        events::FullSyncRead {
            source: &self.addr,
            keys,
            bytes: rdb_len,
            elapsed: started.elapsed(),
        }
        .emit();
        // A master that sent the RDB diskless waits for this first ACK
        // before it streams any command.
        let _ = self.actor.send_message(SourceMsg::RdbLoaded);
        Ok(true)
    }

    /// How an RDB value reaches the target.
    fn carry(&self, entry: &engine::rdb::Entry) -> Carry {
        let target = self.options.target_caps.rdb_version();
        let compat = restore_compat(entry.rdb_type(), entry.rdb_version(), target);
        let is_module = entry.kind() == engine::rdb::ValueKind::Module;
        match compat {
            // Only its module can rebuild a module value.
            Some(false) if is_module || !self.options.force_rewrite => Carry::Restore,
            Some(true) if is_module || !self.options.force_rewrite => Carry::Restamp,
            None if is_module => Carry::Restore,
            _ => Carry::Rebuild,
        }
    }

    fn is_heartbeat(&self, key: &[u8]) -> bool {
        self.options
            .heartbeat_id
            .as_deref()
            .is_some_and(|id| engine::heartbeat::is_ours(key, id))
    }

    /// A fresh temporary key name in `slot`.
    fn tmp_name(&mut self, slot: u16) -> Vec<u8> {
        self.tmp_names += 1;
        split::colocated_name(slot, &self.options.tmp_scope, self.tmp_names)
    }

    /// Reports what a rebuild could not carry.
    fn note_loss(&mut self, key: &[u8], loss: engine::rebuild::Loss) {
        if loss.consumers > 0 {
            self.stats
                .consumers_dropped
                .fetch_add(loss.consumers, Ordering::Relaxed);
            if let Some(suppressed) = self.log.allow() {
                tracing::warn!(
                    source = %self.addr,
                    key = %String::from_utf8_lossy(&key[..key.len().min(80)]),
                    consumers = loss.consumers,
                    suppressed,
                    "stream consumers without pending entries cannot be created before Redis 6.2; left out"
                );
            }
        }
        if loss.field_ttls > 0 {
            self.stats
                .field_ttls_dropped
                .fetch_add(loss.field_ttls, Ordering::Relaxed);
            events::FieldTtlsDropped {
                source: &self.addr,
                key,
                fields: loss.field_ttls,
            }
            .emit(&mut self.log);
        }
    }

    /// Hands rebuilt commands to writer `w`.
    async fn push_commands(
        &mut self,
        w: usize,
        db: Option<u32>,
        out: &Commands,
    ) -> Result<(), WorkerError> {
        for (step, bytes) in out.iter() {
            self.dispatcher
                .push(w, db, step_kind(step), None, |buf| {
                    buf.extend_from_slice(bytes)
                })
                .await?;
        }
        Ok(())
    }

    fn rdb_error(&self, source: RdbError) -> WorkerError {
        match source {
            // The input's own failure (the link, the spill), carried through
            // the RDB reader.
            RdbError::Io(e) if e.get_ref().is_some_and(|inner| inner.is::<WorkerError>()) => {
                match e.into_inner().map(|inner| inner.downcast::<WorkerError>()) {
                    Some(Ok(worker)) => *worker,
                    _ => WorkerError::Closed {
                        addr: self.addr.clone(),
                        context: "receiving the RDB",
                    },
                }
            }
            RdbError::Io(e) => WorkerError::Io {
                addr: self.addr.clone(),
                context: "receiving the RDB",
                source: e,
            },
            other => WorkerError::Rdb {
                addr: self.addr.clone(),
                source: other,
            },
        }
    }

    /// Reads `$<len>\r\n` or `$EOF:<40 bytes>\r\n`, skipping keep-alives.
    async fn read_transfer_header(&mut self) -> Result<Transfer, WorkerError> {
        loop {
            while self.buf.first() == Some(&b'\n') {
                self.buf.advance(1);
            }
            if let Some(nl) = self.buf.iter().position(|&b| b == b'\n') {
                let line = self.buf.split_to(nl + 1);
                let text = String::from_utf8_lossy(&line)
                    .trim_end_matches(['\r', '\n'])
                    .to_string();
                return parse_transfer_header(&self.addr, &text);
            }
            if self.buf.len() > 1024 {
                return Err(WorkerError::Unexpected {
                    addr: self.addr.clone(),
                    context: "waiting for the RDB transfer",
                    reply: "a header line longer than 1 KiB".into(),
                });
            }
            self.read_more().await?;
        }
    }

    async fn expect_eof_mark(&mut self, mark: &[u8]) -> Result<(), WorkerError> {
        while self.buf.len() < mark.len() {
            self.read_more().await?;
        }
        if &self.buf[..mark.len()] != mark {
            return Err(WorkerError::Unexpected {
                addr: self.addr.clone(),
                context: "reading the end of the RDB transfer",
                reply: "the end-of-transfer mark does not match".into(),
            });
        }
        self.buf.advance(mark.len());
        Ok(())
    }

    // ------------------------------------------------------------- stream

    /// Reads and replays the command stream until asked to stop.
    pub async fn stream(&mut self) -> Result<IntakeEnd, WorkerError> {
        let mut safe = Some((self.offset, self.db));
        loop {
            while let Some(cmd) =
                parse_command(&mut self.buf).map_err(|source| WorkerError::Protocol {
                    addr: self.addr.clone(),
                    source,
                })?
            {
                self.offset += cmd.wire_len() as u64;
                self.stats.commands_received.fetch_add(1, Ordering::Relaxed);
                self.handle(cmd, safe).await?;
                if self.tx.is_none() {
                    safe = Some((self.offset, self.db));
                }
                self.dispatcher.flush_full(safe).await?;
                // A yield point now and then (see `full_sync`).
                tokio::task::coop::consume_budget().await;
            }
            self.dispatcher.flush_all(safe).await?;
            if let Some((offset, db)) = safe {
                self.stats.publish_processed(offset, db);
            }
            self.stats
                .source_offset
                .store(self.offset, Ordering::Relaxed);

            if self.stop_requested() {
                return Ok(IntakeEnd::Stopped);
            }
            let mut stop = self.stop.clone();
            tokio::select! {
                biased;
                _ = stop.changed() => return Ok(IntakeEnd::Stopped),
                read = self.read_more() => read?,
            }
        }
    }

    async fn handle(&mut self, cmd: Command, safe: At) -> Result<(), WorkerError> {
        let spec = command::lookup(&cmd);
        let role = spec.map_or(Role::Data, |s| s.role);
        if role == Role::Data && cmd.get(1).is_some_and(|k| self.is_heartbeat(k)) {
            if let Some(written) = engine::heartbeat::written_ms(&cmd) {
                self.stats.heartbeat_seen(written, self.offset);
            }
            self.stats.commands_filtered.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        if matches!(role, Role::Data | Role::Script | Role::Move) {
            match self.options.key_filter.keep(spec, &cmd) {
                Kept::All => {}
                Kept::Nothing => {
                    self.stats.commands_filtered.fetch_add(1, Ordering::Relaxed);
                    return Ok(());
                }
                Kept::Part(cmds) => return self.handle_replacement(cmds, safe).await,
                Kept::Mixed => {
                    self.not_replayed(
                        &cmd,
                        "it moves data from keys left out by --include/--exclude into kept ones",
                    );
                    return Ok(());
                }
            }
        }
        if role == Role::Data {
            if let Some(replacement) = self.adapt(&cmd) {
                return self.handle_replacement(replacement, safe).await;
            }
        }
        let cluster = self.dispatcher.router().is_cluster();
        match role {
            Role::Ping => Ok(()),
            Role::Replconf => {
                if cmd
                    .get(1)
                    .is_some_and(|a| a.eq_ignore_ascii_case(b"GETACK"))
                {
                    let _ = self.actor.send_message(SourceMsg::GetAck);
                }
                Ok(())
            }
            Role::Select => {
                let db = cmd
                    .get(1)
                    .and_then(|a| std::str::from_utf8(a).ok())
                    .and_then(|s| s.parse::<u32>().ok())
                    .ok_or_else(|| WorkerError::Unexpected {
                        addr: self.addr.clone(),
                        context: "reading the replication stream",
                        reply: format!("a SELECT without a valid db: {cmd:?}"),
                    })?;
                self.db = db;
                if let Some(tx) = &mut self.tx {
                    tx.commands.push((cmd, spec));
                }
                Ok(())
            }
            Role::Multi => {
                self.tx = Some(OpenTx {
                    start_db: self.db,
                    commands: Vec::new(),
                });
                Ok(())
            }
            Role::Exec => match self.tx.take() {
                Some(tx) if cluster => self.dispatch_tx_cluster(tx, safe).await,
                Some(tx) => self.dispatch_tx(tx, safe).await,
                None => Ok(()),
            },
            Role::Discard => {
                self.tx = None;
                Ok(())
            }
            _ if self.tx.is_some() => {
                if let Some(tx) = &mut self.tx {
                    tx.commands.push((cmd, spec));
                }
                Ok(())
            }
            Role::Publish if !self.options.replay_publish => {
                self.stats.commands_filtered.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Role::FlushAll if !cluster => self.flush_all_dbs(&cmd, safe).await,
            Role::FlushAll => {
                events::SourceFlushed {
                    source: &self.addr,
                    command: "FLUSHALL",
                    target_dbs: "all",
                }
                .emit();
                self.route(&cmd, spec, safe).await
            }
            Role::FlushDb => {
                let Some(tdb) = self.target_db(self.db) else {
                    self.stats.commands_filtered.fetch_add(1, Ordering::Relaxed);
                    return Ok(());
                };
                events::SourceFlushed {
                    source: &self.addr,
                    command: "FLUSHDB",
                    target_dbs: &tdb.map_or("0".into(), |d| d.to_string()),
                }
                .emit();
                self.route(&cmd, spec, safe).await
            }
            Role::SwapDb | Role::Move if !cluster && !self.identity_dbs() => {
                self.not_replayed(&cmd, "databases are filtered or renamed (--db / --db-map), so moving data between them cannot be mirrored");
                Ok(())
            }
            Role::Function | Role::Publish | Role::SwapDb => self.route(&cmd, spec, safe).await,
            Role::Move | Role::Script | Role::Data => {
                if self.target_db(self.db).is_none() {
                    self.stats.commands_filtered.fetch_add(1, Ordering::Relaxed);
                    return Ok(());
                }
                self.route(&cmd, spec, safe).await
            }
        }
    }

    /// A replicated command the target cannot take as is, made acceptable:
    /// stream counters dropped for a target before 7.0, a RESTORE payload
    /// restamped or rebuilt as commands for an older target. `None` when
    /// the command goes as it is.
    fn adapt(&mut self, cmd: &Command) -> Option<Vec<Command>> {
        let caps = self.options.target_caps;
        if let Some(adapted) = engine::compat::adapt(cmd, caps) {
            return Some(vec![adapted]);
        }
        if !engine::restore::is_restore(cmd) {
            return None;
        }
        let now = now_ms();
        let args = engine::restore::parse_restore(cmd, now)?;
        let (t, version) = engine::restore::check_dump_payload(&args.payload).ok()?;
        let is_module =
            engine::rdb::ValueKind::of_rdb_type(t) == Some(engine::rdb::ValueKind::Module);
        let force = self.options.force_rewrite && !is_module;
        match restore_compat(t, version, caps.rdb_version()) {
            Some(false) if !force => None,
            Some(true) if !force => {
                self.stats.values_restamped.fetch_add(1, Ordering::Relaxed);
                let payload = restamp(&args.payload, caps.rdb_version());
                let mut argv: Vec<&[u8]> = cmd.args().collect();
                argv[3] = &payload;
                Some(vec![Command::from_args(&argv)])
            }
            // Only its module could rebuild a module value: let the target
            // say what it thinks of it.
            _ if is_module => None,
            _ => {
                let value = match engine::restore::decode_payload(&args.payload) {
                    Ok(v) => v,
                    Err(why) => {
                        self.not_replayed(cmd, &format!("its payload cannot be decoded ({why})"));
                        return Some(Vec::new());
                    }
                };
                self.stats.values_rebuilt.fetch_add(1, Ordering::Relaxed);
                let existing = if args.replace {
                    Existing::Replace
                } else {
                    Existing::Keep
                };
                let tmp = self.tmp_name(engine::slot::slot(&args.key));
                let mut out = Commands::new();
                let loss = Rebuild::whole(
                    &args.key,
                    &value,
                    args.expire_ms,
                    existing,
                    caps,
                    || tmp,
                    now,
                    &mut out,
                );
                self.note_loss(&args.key, loss);
                // The rebuild's own MULTI/EXEC are left out: the commands
                // are replayed as one transaction of the source would be.
                Some(
                    out.iter()
                        .filter(|(step, _)| matches!(step, Step::Plain | Step::Queued))
                        .map(|(_, bytes)| {
                            let mut buf = BytesMut::from(bytes);
                            parse_command(&mut buf)
                                .ok()
                                .flatten()
                                .expect("rebuilt commands are valid RESP")
                        })
                        .collect(),
                )
            }
        }
    }

    /// Replays what [`Intake::adapt`] made of a command: inside an open
    /// transaction, as part of it; otherwise alone, or as a transaction of
    /// its own when it takes several commands.
    async fn handle_replacement(
        &mut self,
        cmds: Vec<Command>,
        safe: At,
    ) -> Result<(), WorkerError> {
        if let Some(tx) = &mut self.tx {
            for cmd in cmds {
                let spec = command::lookup(&cmd);
                tx.commands.push((cmd, spec));
            }
            return Ok(());
        }
        match cmds.len() {
            0 => Ok(()),
            1 => {
                let cmd = cmds.into_iter().next().expect("one command");
                let spec = command::lookup(&cmd);
                if self.target_db(self.db).is_none() {
                    self.stats.commands_filtered.fetch_add(1, Ordering::Relaxed);
                    return Ok(());
                }
                self.route(&cmd, spec, safe).await
            }
            _ => {
                let tx = OpenTx {
                    start_db: self.db,
                    commands: cmds
                        .into_iter()
                        .map(|c| {
                            let spec = command::lookup(&c);
                            (c, spec)
                        })
                        .collect(),
                };
                if self.dispatcher.router().is_cluster() {
                    self.dispatch_tx_cluster(tx, safe).await
                } else {
                    self.dispatch_tx(tx, safe).await
                }
            }
        }
    }

    /// Every database copied as-is: commands that move data between
    /// databases can be replayed unchanged.
    fn identity_dbs(&self) -> bool {
        self.options.db_filter == DbFilter::all()
    }

    fn not_replayed(&mut self, cmd: &Command, reason: &str) {
        let name = String::from_utf8_lossy(cmd.name()).to_uppercase();
        let key = cmd
            .get(1)
            .map(|k| String::from_utf8_lossy(&k[..k.len().min(80)]).into_owned())
            .unwrap_or_default();
        events::CommandNotReplayed {
            source: &self.addr,
            command: &format!("{name} {key}"),
            reason,
        }
        .emit(&self.stats, &mut self.log);
    }

    /// Hands one command to the writer(s) that must apply it.
    async fn route(
        &mut self,
        cmd: &Command,
        spec: Option<&'static CommandSpec>,
        safe: At,
    ) -> Result<(), WorkerError> {
        if !self.dispatcher.router().is_cluster() {
            let tdb = self.target_db(self.db).flatten();
            // Keyless commands (FLUSHALL, FUNCTION ...) do not depend on
            // the selected database.
            let db = match spec.map(|s| s.role) {
                Some(Role::FlushAll | Role::Function | Role::Publish | Role::SwapDb) => None,
                _ => tdb,
            };
            return self.push_wire(0, db, cmd, safe).await;
        }
        self.follow_map(safe).await?;
        match split::plan(spec, cmd) {
            Plan::Slot(slot) => {
                let w = self.dispatcher.router().writer_for_slot(slot);
                self.push_wire(w, None, cmd, safe).await
            }
            Plan::AnyNode => self.push_wire(0, None, cmd, safe).await,
            Plan::Everywhere => {
                for w in 0..self.dispatcher.router().n_writers() {
                    self.push_wire(w, None, cmd, safe).await?;
                }
                Ok(())
            }
            Plan::Parts(parts) => {
                self.stats.commands_split.fetch_add(1, Ordering::Relaxed);
                for (slot, part) in parts {
                    let w = self.dispatcher.router().writer_for_slot(slot);
                    self.push_wire(w, None, &part, safe).await?;
                }
                Ok(())
            }
            plan @ (Plan::Rename { .. }
            | Plan::Copy { .. }
            | Plan::ListMove { .. }
            | Plan::Colocate { .. }) => {
                self.stats
                    .commands_rewritten
                    .fetch_add(1, Ordering::Relaxed);
                self.barrier(safe).await?;
                let Topology::Cluster(routing) = &self.dispatcher.router().topology else {
                    unreachable!("cluster checked above")
                };
                let control = self.control.get_or_insert_with(|| {
                    TargetControl::new(routing.clone(), self.options.tmp_scope.clone())
                });
                if let rewrite::Outcome::Diverged(why) = control.run(&plan, cmd).await? {
                    self.not_replayed(cmd, &why);
                }
                Ok(())
            }
            Plan::Unsupported(reason) => {
                self.not_replayed(cmd, reason);
                Ok(())
            }
        }
    }

    async fn push_wire(
        &mut self,
        w: usize,
        db: Option<u32>,
        cmd: &Command,
        safe: At,
    ) -> Result<(), WorkerError> {
        self.dispatcher
            .push(w, db, ExpectKind::Ok, safe, |buf| {
                buf.extend_from_slice(cmd.wire())
            })
            .await
    }

    /// Waits until everything handed over so far is confirmed.
    async fn barrier(&mut self, safe: At) -> Result<(), WorkerError> {
        self.dispatcher.flush_all(safe).await?;
        self.stats.barriers.fetch_add(1, Ordering::Relaxed);
        self.stats.wait_drained().await;
        Ok(())
    }

    /// Follows a change of the target's slot map: what was routed by the
    /// old map is confirmed first (its writers redirect it), then the new
    /// map is used.
    async fn follow_map(&mut self, safe: At) -> Result<(), WorkerError> {
        if self.dispatcher.router().stale() {
            self.barrier(safe).await?;
            self.dispatcher.refresh();
        }
        Ok(())
    }

    async fn flush_all_dbs(&mut self, cmd: &Command, safe: At) -> Result<(), WorkerError> {
        if self.identity_dbs() {
            events::SourceFlushed {
                source: &self.addr,
                command: "FLUSHALL",
                target_dbs: "all",
            }
            .emit();
            return self.push_wire(0, None, cmd, safe).await;
        }
        // Only the databases we copy are flushed on the target.
        let filter = self.options.db_filter.clone();
        let targets: Vec<u32> = (0..self.options.source_databases)
            .filter_map(|db| filter.target_db(db))
            .collect();
        let listed: Vec<String> = targets.iter().map(u32::to_string).collect();
        events::SourceFlushed {
            source: &self.addr,
            command: "FLUSHALL",
            target_dbs: &listed.join(","),
        }
        .emit();
        // Keep any ASYNC/SYNC modifier.
        let modifier = cmd.get(1).map(<[u8]>::to_vec);
        for tdb in targets {
            let modifier = modifier.clone();
            self.dispatcher
                .push(0, Some(tdb), ExpectKind::Ok, safe, |buf| match &modifier {
                    Some(m) => encode::command(buf, &[&b"FLUSHDB"[..], m]),
                    None => encode::command(buf, &[b"FLUSHDB"]),
                })
                .await?;
        }
        Ok(())
    }

    /// Hands a whole transaction to the standalone target, as MULTI ...
    /// EXEC. Commands in databases that are not copied are left out;
    /// SELECTs inside the transaction are kept (renamed), and the connection
    /// is put back in the transaction's first database after EXEC.
    async fn dispatch_tx(&mut self, tx: OpenTx, safe: At) -> Result<(), WorkerError> {
        let mut db = tx.start_db;
        let identity = self.identity_dbs();
        let mut kept: Vec<(u32, Command)> = Vec::new();
        for (cmd, spec) in &tx.commands {
            match spec.map(|s| s.role) {
                Some(Role::Select) => {
                    // `handle` validated it.
                    db = std::str::from_utf8(cmd.arg(1))
                        .ok()
                        .and_then(|s| s.parse().ok())
                        .unwrap_or(db);
                    continue;
                }
                Some(Role::Publish) if !self.options.replay_publish => continue,
                // Databases are filtered or renamed: a FLUSHALL flushes the
                // copied ones only; moves between databases cannot be
                // mirrored (the same rules as outside a transaction).
                Some(Role::FlushAll) if !identity => {
                    let filter = self.options.db_filter.clone();
                    let mut flushed = Vec::new();
                    for source_db in 0..self.options.source_databases {
                        if let Some(tdb) = filter.target_db(source_db) {
                            kept.push((tdb, Command::from_args(&[b"FLUSHDB"])));
                            flushed.push(tdb.to_string());
                        }
                    }
                    events::SourceFlushed {
                        source: &self.addr,
                        command: "FLUSHALL",
                        target_dbs: &flushed.join(","),
                    }
                    .emit();
                    continue;
                }
                Some(Role::SwapDb | Role::Move) if !identity => {
                    self.not_replayed(cmd, "databases are filtered or renamed (--db / --db-map), so moving data between them cannot be mirrored");
                    continue;
                }
                _ => {}
            }
            match self.options.db_filter.target_db(db) {
                Some(tdb) => kept.push((tdb, cmd.clone())),
                None => {
                    self.stats.commands_filtered.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        let Some(&(first_db, _)) = kept.first() else {
            return Ok(());
        };
        let d = &mut self.dispatcher;
        d.push(0, Some(first_db), ExpectKind::TxBegin, safe, |buf| {
            encode::command(buf, &[b"MULTI"])
        })
        .await?;
        let mut current = first_db;
        for (tdb, cmd) in &kept {
            if *tdb != current {
                current = *tdb;
                d.push(0, None, ExpectKind::TxQueued, safe, |buf| {
                    encode::command(buf, &[&b"SELECT"[..], tdb.to_string().as_bytes()])
                })
                .await?;
            }
            d.push(0, None, ExpectKind::TxQueued, safe, |buf| {
                buf.extend_from_slice(cmd.wire())
            })
            .await?;
        }
        d.push(0, None, ExpectKind::TxEnd, safe, |buf| {
            encode::command(buf, &[b"EXEC"])
        })
        .await?;
        if current != first_db {
            d.push(0, None, ExpectKind::Ok, safe, |buf| {
                encode::command(buf, &[&b"SELECT"[..], first_db.to_string().as_bytes()])
            })
            .await?;
        }
        Ok(())
    }

    /// A transaction on a cluster target: atomic (MULTI/EXEC on the owner)
    /// when all its keys share a slot; otherwise one MULTI/EXEC per slot,
    /// or, when a command in it needs a rewrite, command by command.
    async fn dispatch_tx_cluster(&mut self, tx: OpenTx, safe: At) -> Result<(), WorkerError> {
        let mut db = tx.start_db;
        let mut kept: Vec<(Command, Option<&'static CommandSpec>)> = Vec::new();
        for (cmd, spec) in tx.commands {
            match spec.map(|s| s.role) {
                Some(Role::Select) => {
                    db = std::str::from_utf8(cmd.arg(1))
                        .ok()
                        .and_then(|s| s.parse().ok())
                        .unwrap_or(db);
                }
                Some(Role::Publish) if !self.options.replay_publish => {}
                _ if self.options.db_filter.target_db(db).is_none() => {
                    self.stats.commands_filtered.fetch_add(1, Ordering::Relaxed);
                }
                _ => kept.push((cmd, spec)),
            }
        }
        if kept.is_empty() {
            return Ok(());
        }
        self.follow_map(safe).await?;
        let mut groups: Vec<(u16, Vec<Command>)> = Vec::new();
        let mut whole = true;
        for (cmd, spec) in &kept {
            let parts = match split::plan(*spec, cmd) {
                Plan::Slot(s) => vec![(s, cmd.clone())],
                Plan::Parts(parts) => parts,
                _ => {
                    whole = false;
                    break;
                }
            };
            for (s, part) in parts {
                match groups.iter_mut().find(|(gs, _)| *gs == s) {
                    Some((_, cmds)) => cmds.push(part),
                    None => groups.push((s, vec![part])),
                }
            }
        }
        if !whole {
            self.stats
                .transactions_split
                .fetch_add(1, Ordering::Relaxed);
            for (cmd, spec) in &kept {
                self.route(cmd, *spec, safe).await?;
            }
            return Ok(());
        }
        if groups.len() > 1 {
            self.stats
                .transactions_split
                .fetch_add(1, Ordering::Relaxed);
        }
        for (slot, cmds) in groups {
            let w = self.dispatcher.router().writer_for_slot(slot);
            let d = &mut self.dispatcher;
            d.push(w, None, ExpectKind::TxBegin, safe, |buf| {
                encode::command(buf, &[b"MULTI"])
            })
            .await?;
            for cmd in &cmds {
                d.push(w, None, ExpectKind::TxQueued, safe, |buf| {
                    buf.extend_from_slice(cmd.wire())
                })
                .await?;
            }
            d.push(w, None, ExpectKind::TxEnd, safe, |buf| {
                encode::command(buf, &[b"EXEC"])
            })
            .await?;
        }
        Ok(())
    }
}

/// The two RDB transfer forms.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Transfer {
    /// `$<len>`: the RDB is exactly `len` bytes (disk-based sync).
    Sized(u64),
    /// `$EOF:<mark>`: the RDB is followed by the same 40-byte mark
    /// (diskless sync).
    Marked(Vec<u8>),
}

/// What the reply to a RESTORE must be.
fn restore_kind(existing: Existing) -> ExpectKind {
    match existing {
        Existing::Replace => ExpectKind::Ok,
        Existing::Keep => ExpectKind::KeepExisting,
    }
}

/// How a rebuilt command's reply is checked.
pub(crate) fn step_kind(step: Step) -> ExpectKind {
    match step {
        Step::Plain => ExpectKind::Ok,
        Step::Begin => ExpectKind::TxBegin,
        Step::Queued => ExpectKind::TxQueued,
        Step::End => ExpectKind::TxEnd,
    }
}

pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn parse_transfer_header(addr: &str, line: &str) -> Result<Transfer, WorkerError> {
    let bad = || WorkerError::Unexpected {
        addr: addr.to_string(),
        context: "reading the RDB transfer header",
        reply: line.chars().take(120).collect(),
    };
    let rest = line.strip_prefix('$').ok_or_else(bad)?;
    if let Some(mark) = rest.strip_prefix("EOF:") {
        if mark.len() != 40 {
            return Err(bad());
        }
        return Ok(Transfer::Marked(mark.as_bytes().to_vec()));
    }
    rest.parse::<u64>().map(Transfer::Sized).map_err(|_| bad())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transfer_headers() {
        assert_eq!(
            parse_transfer_header("h:1", "$1234").unwrap(),
            Transfer::Sized(1234)
        );
        let mark = "x".repeat(40);
        assert_eq!(
            parse_transfer_header("h:1", &format!("$EOF:{mark}")).unwrap(),
            Transfer::Marked(mark.into_bytes())
        );
        assert!(parse_transfer_header("h:1", "$EOF:short").is_err());
        assert!(parse_transfer_header("h:1", "+OK").is_err());
        assert!(parse_transfer_header("h:1", "$-1").is_err());
    }
}
