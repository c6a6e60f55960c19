//! The snapshot: the RDB that follows `+FULLRESYNC`, value by value.
//!
//! The RDB reader (`engine::rdb`) yields one item at a time, already framed
//! as a DUMP payload; the replay rules (`engine::replay::snapshot`) say
//! whether a value is copied, where, and how (RESTORE as is, restamped, or
//! rebuilt); this module carries that out per whole value, per part of a
//! big value, and per function library. The last batch of the snapshot is
//! confirmed before the stream starts.

use std::collections::HashSet;
use std::io;
use std::time::Instant;

use bytes::Bytes;
use engine::rdb::{Entry, Part, RdbError, RdbItem, RdbReader};
use engine::rebuild::{self, Commands, Key, Rebuild};
use engine::replay::snapshot::EntryPlan;
use engine::replay::{Dest, ExpectKind};
use engine::resp::encode;
use engine::restore::{encode_restore, encode_restore_payload, restamp, Carry, Existing};
use tokio_util::io::StreamReader;

use super::intake::Intake;
use super::transfer::Transfer;
use super::SourceMsg;
use crate::clock::unix_ms;
use crate::error::WorkerError;
use crate::events;
use crate::progress::StreamPos;

/// What the snapshot keeps between items.
struct Snapshot {
    /// Values read so far (our heartbeat aside).
    keys: u64,
    /// What a RESTORE does to a key the target has.
    existing: Existing,
    /// The big value being written in parts, if any.
    parts: Option<InParts>,
    /// Module types seen (each reported once).
    module_types: HashSet<u64>,
}

/// A big value being written in parts.
struct InParts {
    /// `None` when the value is not copied.
    rebuild: Option<Rebuild>,
    to: Option<Dest>,
}

/// What a RESTORE's reply must be.
fn restore_kind(existing: Existing) -> ExpectKind {
    match existing {
        Existing::Replace => ExpectKind::Ok,
        Existing::Keep => ExpectKind::KeepExisting,
    }
}

impl Intake {
    /// Reads the RDB transfer that follows `+FULLRESYNC`. Returns `false`
    /// when asked to stop before it ended.
    pub async fn full_sync(&mut self) -> Result<bool, WorkerError> {
        let header = self.read_transfer_header().await?;
        let total = match &header {
            Transfer::Sized(len) => *len,
            Transfer::Marked(_) => 0,
        };
        self.safe = None;
        self.stats.begin_full_sync(&self.replid, self.offset, total);
        events::FullSyncStarted {
            source: &self.addr,
            replid: &self.replid,
            offset: self.offset,
            transfer: match header {
                Transfer::Sized(_) => "disk",
                Transfer::Marked(_) => "diskless",
            },
        }
        .emit(&self.stats.counters);
        // Recorded on the target before its first key: a restart then
        // knows the keys are this task's, and that the sync must start over.
        let epoch = self.stats.next_epoch();
        let over_earlier = self.stats.counters.full_syncs.get() > 1
            || self.stats.ours.load(std::sync::atomic::Ordering::Relaxed);
        if self.dispatcher.begin_full(epoch, over_earlier).await? {
            events::TargetEmptied { source: &self.addr }.emit();
        }
        if !self.hand_over_snapshot(self.offset).await? {
            return Ok(false);
        }
        let started = Instant::now();
        let mut snap = Snapshot {
            keys: 0,
            existing: self.snapshot_existing(),
            parts: None,
            module_types: HashSet::new(),
        };
        let Some(rdb_len) = self.read_snapshot(&mut snap).await? else {
            return Ok(false);
        };
        self.end_of_transfer(&header, rdb_len).await?;
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
        events::FullSyncLoaded {
            source: &self.addr,
            keys: snap.keys,
            bytes: rdb_len,
            elapsed: started.elapsed(),
        }
        .emit(&self.stats.counters);
        // After a full sync the master selects a db before any command; 0
        // stands until then.
        self.replay.start_at(0);
        let at = StreamPos {
            offset: self.offset,
            db: 0,
        };
        self.stats.begin_incremental(&self.replid, at);
        // A master that sent the RDB diskless waits for this first ACK
        // before it streams any command.
        let _ = self.actor.send_message(SourceMsg::RdbLoaded);
        Ok(true)
    }

    /// A second full sync in this task, or one over data an earlier run
    /// wrote: what the target holds is ours, and must be replaced even
    /// under `--on-conflict skip`, or it would stay stale.
    fn snapshot_existing(&self) -> Existing {
        let c = &self.stats.counters;
        if c.full_syncs.get() > 1 || self.stats.ours.load(std::sync::atomic::Ordering::Relaxed) {
            Existing::Replace
        } else {
            self.options.existing
        }
    }

    /// Reads the RDB to its end; its length, or `None` when asked to stop.
    async fn read_snapshot(&mut self, snap: &mut Snapshot) -> Result<Option<u64>, WorkerError> {
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
        // One stop future for the whole snapshot: a fresh `changed()` per
        // entry registers and drops a waiter each time, a fifth of the
        // intake's CPU on small keys.
        let mut stop = self.stop.clone();
        let stopped = async move {
            let _ = stop.wait_for(|stop| *stop).await;
        };
        tokio::pin!(stopped);
        loop {
            let item = tokio::select! {
                biased;
                _ = &mut stopped => {
                    self.dispatcher.flush_all(None).await?;
                    return Ok(None);
                }
                item = rdb.next() => item.map_err(|e| self.rdb_error(e))?,
            };
            let Some(item) = item else { break };
            // While the spill holds data nothing here waits, and the socket
            // readers (and other shards) sharing this runtime's threads
            // would wait behind a whole snapshot: yield whenever the task's
            // cooperative budget is spent.
            tokio::task::coop::consume_budget().await;
            let read = rdb.offset();
            match item {
                RdbItem::Entry(entry) => self.snapshot_entry(snap, entry, read).await?,
                RdbItem::Part(part) => self.snapshot_part(snap, part, read).await?,
                RdbItem::Function { code } => self.snapshot_function(snap.existing, &code).await?,
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
        self.stats.full_sync_progress(snap.keys, rdb_len);
        let (reader, rest) = rdb.into_parts();
        let (_, unread) = reader.into_inner_with_chunk();
        self.buf = rest;
        if let Some(unread) = unread {
            self.buf.extend_from_slice(&unread);
        }
        Ok(Some(rdb_len))
    }

    /// One whole value.
    async fn snapshot_entry(
        &mut self,
        snap: &mut Snapshot,
        entry: Entry,
        read: u64,
    ) -> Result<(), WorkerError> {
        let plan =
            self.replay
                .plan_entry(entry.db, &entry.key, entry.rdb_type(), entry.rdb_version());
        let (to, carry) = match plan {
            EntryPlan::Heartbeat => return Ok(()),
            EntryPlan::Skip => {
                snap.keys += 1;
                self.stats.full_sync_progress(snap.keys, read);
                return Ok(());
            }
            EntryPlan::Copy { to, carry } => (to, carry),
        };
        snap.keys += 1;
        self.stats.full_sync_progress(snap.keys, read);
        if let Some(id) = entry.module_id.filter(|id| snap.module_types.insert(*id)) {
            events::ModuleValues {
                source: &self.addr,
                module_type: &engine::rdb::module_type_name(id),
                module_id: id,
                key: &entry.key,
            }
            .emit();
        }
        if self.dispatcher.router().stale() {
            self.follow_map().await?;
        }
        let existing = snap.existing;
        match carry {
            Carry::Restore => {
                self.send_with(to, restore_kind(existing), |buf| {
                    encode_restore(buf, &entry.key, &entry, existing)
                })
                .await?
            }
            Carry::Restamp => {
                events::ValueRestamped.emit(&self.stats.counters);
                let version = self.options.replay.target_caps.rdb_version();
                let payload = restamp(entry.dump_payload(), version);
                self.send_with(to, restore_kind(existing), |buf| {
                    encode_restore_payload(buf, &entry.key, &entry, &payload, existing)
                })
                .await?
            }
            Carry::Rebuild => self.rebuild_entry(to, &entry, existing).await?,
        }
        self.dispatcher.flush_full(None).await
    }

    /// A whole value rebuilt with ordinary commands.
    async fn rebuild_entry(
        &mut self,
        to: Dest,
        entry: &Entry,
        existing: Existing,
    ) -> Result<(), WorkerError> {
        let value = entry.decode().map_err(|e| self.rdb_error(e))?;
        let tmp = self.replay.tmp_names().next(engine::slot::slot(&entry.key));
        let target = Key {
            key: &entry.key,
            expire_ms: entry.expire_ms,
            existing,
            caps: self.options.replay.target_caps,
        };
        let rebuilt = rebuild::rebuild_value(target, &value, || tmp, unix_ms());
        events::ValueRebuilt {
            source: &self.addr,
            key: &rebuilt.key,
            loss: rebuilt.loss,
        }
        .emit(&self.stats.counters, &mut self.log);
        self.send_commands(Some(to), &rebuilt.commands).await
    }

    /// One part of a big value: built under a temporary name in its slot,
    /// renamed over the key with its last part.
    async fn snapshot_part(
        &mut self,
        snap: &mut Snapshot,
        part: Part,
        read: u64,
    ) -> Result<(), WorkerError> {
        if part.index == 0 {
            snap.keys += 1;
            snap.parts = Some(self.begin_parts(&part, snap.existing).await?);
        }
        self.stats.full_sync_progress(snap.keys, read);
        let Some(mut in_parts) = snap.parts.take() else {
            return Err(self.rdb_error(RdbError::Invalid {
                offset: part.value_offset,
                what: "a value part without its first part".into(),
            }));
        };
        if let Some(mut rebuild) = in_parts.rebuild.take() {
            let mut out = Commands::new();
            let now = unix_ms();
            rebuild.part(&part.value, now, &mut out);
            if part.last {
                let loss = rebuild.finish(&part.value, now, &mut out);
                self.report_loss(&part.key, loss);
            } else {
                in_parts.rebuild = Some(rebuild);
            }
            self.send_commands(in_parts.to, &out).await?;
        }
        if !part.last {
            snap.parts = Some(in_parts);
        }
        self.dispatcher.flush_full(None).await
    }

    /// The first part of a big value: where it goes, and its rebuild begun.
    async fn begin_parts(
        &mut self,
        part: &Part,
        existing: Existing,
    ) -> Result<InParts, WorkerError> {
        let Some(to) = self.replay.dest_of_key(part.db, &part.key) else {
            return Ok(InParts {
                rebuild: None,
                to: None,
            });
        };
        if self.dispatcher.router().stale() {
            self.follow_map().await?;
        }
        let tmp = self.replay.tmp_names().next(engine::slot::slot(&part.key));
        let target = Key {
            key: &part.key,
            expire_ms: part.expire_ms,
            existing,
            caps: self.options.replay.target_caps,
        };
        let mut out = Commands::new();
        let rebuild = Rebuild::begin(target, tmp, &mut out);
        events::BigValue {
            source: &self.addr,
            key: &part.key,
            kind: part.kind.name(),
        }
        .emit(&self.stats.counters);
        self.send_commands(Some(to), &out).await?;
        Ok(InParts {
            rebuild: Some(rebuild),
            to: Some(to),
        })
    }

    /// A function library, loaded on every node.
    async fn snapshot_function(
        &mut self,
        existing: Existing,
        code: &[u8],
    ) -> Result<(), WorkerError> {
        let (args, kind): (&[&[u8]], _) = match existing {
            Existing::Replace => (&[b"FUNCTION", b"LOAD", b"REPLACE"], ExpectKind::Ok),
            Existing::Keep => (&[b"FUNCTION", b"LOAD"], ExpectKind::KeepExistingFunction),
        };
        let to = self.replay.dest_of_functions();
        self.send_with(to, kind, |buf| {
            encode::array_header(buf, args.len() + 1);
            for a in args {
                encode::bulk(buf, a);
            }
            encode::bulk(buf, code);
        })
        .await
    }

    /// What a value written in parts could not carry.
    fn report_loss(&mut self, key: &[u8], loss: rebuild::Loss) {
        let c = &self.stats.counters;
        if loss.field_ttls > 0 {
            events::FieldTtlsDropped {
                source: &self.addr,
                key,
                fields: loss.field_ttls,
            }
            .emit(c, &mut self.log);
        }
        if loss.consumers > 0 {
            events::ConsumersDropped {
                source: &self.addr,
                key,
                consumers: loss.consumers,
            }
            .emit(c, &mut self.log);
        }
    }

    /// Hands rebuilt commands to the writer of `to` (nothing when `None`:
    /// the value is not copied).
    async fn send_commands(&mut self, to: Option<Dest>, out: &Commands) -> Result<(), WorkerError> {
        let Some(to) = to else {
            return Ok(());
        };
        for (step, bytes) in out.iter() {
            self.send_with(to, step.into(), |buf| buf.extend_from_slice(bytes))
                .await?;
        }
        Ok(())
    }
}
