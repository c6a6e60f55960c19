//! What each shard and each writer has done so far, shared lock-free between
//! the actors that do the work and the coordinator that reports it.
//!
//! ## Applied offsets
//!
//! A shard's *applied* offset is the replication offset up to which every
//! command the shard read is confirmed by the target. It is what we ACK to
//! the source and what checkpoints record. One shard may feed several
//! writers, and each writer confirms its batches in order, so:
//!
//! - the intake publishes `processed`: every command up to that offset has
//!   been handed to a writer (or deliberately dropped);
//! - for each writer, the intake counts batches handed over
//!   (`dispatched_seq`) and the writer counts batches confirmed
//!   (`confirmed_seq`) and records where the last one ended (`confirmed`:
//!   offset and source db);
//! - a writer with nothing outstanding holds nothing back; one with
//!   outstanding batches holds the shard back to its `confirmed` offset.
//!
//! Reading `processed` before the per-writer counters makes the result safe
//! under concurrent updates: a batch is always counted as dispatched before
//! `processed` moves past it.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::Notify;

use crate::clock::unix_ms;
use crate::counters::Counter;

/// The lifecycle of a shard, as `/status` names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum ShardState {
    Prechecking = 0,
    FullSync = 1,
    Incremental = 2,
    Reconnecting = 3,
    Failed = 4,
    Stopped = 5,
}

impl ShardState {
    pub fn as_str(self) -> &'static str {
        match self {
            ShardState::Prechecking => "prechecking",
            ShardState::FullSync => "full_sync",
            ShardState::Incremental => "incremental",
            ShardState::Reconnecting => "reconnecting",
            ShardState::Failed => "failed",
            ShardState::Stopped => "stopped",
        }
    }

    pub const ALL: [ShardState; 6] = [
        ShardState::Prechecking,
        ShardState::FullSync,
        ShardState::Incremental,
        ShardState::Reconnecting,
        ShardState::Failed,
        ShardState::Stopped,
    ];

    fn from_u8(v: u8) -> ShardState {
        ShardState::ALL
            .get(v as usize)
            .copied()
            .unwrap_or(ShardState::Failed)
    }
}

/// Memory and disk held by one spill (a shard's unparsed stream, or a
/// writer's overflow of batches).
#[derive(Default, Debug)]
pub struct SpillGauges {
    /// Bytes waiting in memory.
    pub memory: Counter,
    /// Bytes waiting in spill files.
    pub on_disk: Counter,
    /// Bytes ever written to spill files.
    pub total: Counter,
}

/// The link between one shard and one writer.
#[derive(Default)]
struct Link {
    dispatched_seq: AtomicU64,
    confirmed_seq: AtomicU64,
    /// Batches dispatched before the current stream began: until they are
    /// all confirmed, nothing of the stream is resumable (they may be a full
    /// sync's RESTOREs, or the tail of an older sync).
    fence: AtomicU64,
    /// End position (offset, source db) of the last confirmed batch; `None`
    /// for a full-sync batch. Batches of one link confirm in order, so a
    /// plain store is right (and a full-sync batch correctly resets what an
    /// older sync left).
    confirmed: Mutex<Option<StreamPos>>,
}

/// A position in a replication stream: the offset of the next byte, and
/// the source database selected there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StreamPos {
    pub offset: u64,
    pub db: u32,
}

/// Where a shard can resume: the source's replication id, the offset of the
/// last byte applied, and the database the stream had selected there.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResumePoint {
    pub replid: String,
    pub offset: u64,
    pub db: u32,
}

impl ResumePoint {
    pub fn pos(&self) -> StreamPos {
        StreamPos {
            offset: self.offset,
            db: self.db,
        }
    }
}

crate::counters! {
    /// The counters of one shard (one source master).
    pub struct ShardCounters {
        full_sync_keys: Counter "full_sync_keys_total" =
            "Keys read from the source's RDB in the current full sync.",
        full_sync_bytes: Counter "full_sync_bytes_total" = "RDB bytes read in the current full sync.",
        full_sync_total_bytes: Gauge "full_sync_total_bytes" =
            "Announced RDB size (0 when the transfer is diskless).",
        full_syncs: Counter "full_syncs_total" = "Full syncs started.",
        full_syncs_loaded: Counter "full_syncs_loaded_total" =
            "Full syncs whose RDB was read to the end and applied.",
        partial_syncs: Counter "partial_resyncs_total" = "Partial resyncs accepted by the source.",
        source_offset: Gauge "source_offset_bytes" = "Replication offset read from the source.",
        commands_received: Counter "commands_received_total" =
            "Commands read from the replication stream.",
        commands_filtered: Counter "commands_filtered_total" =
            "Commands not replayed by design (other databases, PUBLISH).",
        commands_unsupported: Counter "commands_unsupported_total" =
            "Commands that could not be replayed (logged as errors).",
        source_reconnects: Counter "source_reconnects_total" = "Source connections lost and retried.",
        source_flushes: Counter "source_flushes_total" =
            "FLUSHALL / FLUSHDB run on the source and replayed on the target.",
        commands_split: Counter "commands_split_total" =
            "Multi-key commands split into per-slot parts (cluster targets).",
        commands_rewritten: Counter "commands_rewritten_total" =
            "Cross-slot commands replaced by an equivalent (cluster targets).",
        transactions_split: Counter "transactions_split_total" =
            "Transactions whose keys span slots, applied per slot.",
        handovers: Counter "source_handovers_total" =
            "Waits for the other source masters' writes before a key that changed masters (slot migrations on a cluster source).",
        handover_wait_ms: Counter "source_handover_wait_ms_total" =
            "Milliseconds the shard waited at hand-overs.",
        handover_wait_max_ms: Gauge "source_handover_wait_max_ms" =
            "The longest wait at one hand-over, in milliseconds.",
        commands_moved_away: Counter "commands_moved_away_total" =
            "Commands of a source master on keys a slot migration copied to another master (MIGRATE COPY): not replayed, that master's stream carries the keys on.",
        handover_cycles: Counter "source_handover_cycles_total" =
            "Hand-overs ended because two shards waited on each other (slots moving both ways at once).",
        barriers: Counter "barriers_total" =
            "Waits for everything dispatched to be confirmed (slot moves, rewrites).",
        values_restamped: Counter "values_converted_total" {"how" = "restamped"} =
            "RDB values not sent as a plain RESTORE, by how: restamped (payload stamped with an older target's RDB version), rebuilt (ordinary commands), in_parts (big values, written in bounded parts).",
        values_rebuilt: Counter "values_converted_total" {"how" = "rebuilt"} =
            "RDB values (and replicated RESTOREs) rebuilt with ordinary commands.",
        big_values: Counter "values_converted_total" {"how" = "in_parts"} =
            "Values big enough to be written in parts.",
        field_ttls_dropped: Counter "field_ttls_dropped_total" =
            "Hash fields written without their TTL (the target predates Redis 7.4).",
        consumers_dropped: Counter "stream_consumers_dropped_total" =
            "Stream consumers without pending entries left out (the target predates Redis 6.2).",
    }
}

crate::counters! {
    /// The counters of one writer (one target node).
    pub struct WriterCounters {
        commands_applied: Counter "commands_applied_total" = "Commands confirmed by the target node.",
        batches_applied: Counter "target_batches_applied_total" = "Batches confirmed by the target node.",
        bytes_written: Counter "target_written_bytes_total" = "Bytes written to the target node.",
        inflight_commands: Gauge "target_inflight_commands" =
            "Commands written and waiting for their reply.",
        queued_batches: Gauge "target_queued_batches" = "Batches waiting in the writer's queue.",
        overflow_batches: Gauge "target_overflow_batches" =
            "Batches waiting in the writer's overflow (its queue was full).",
        keys_skipped: Counter "keys_skipped_total" =
            "Keys kept as the target had them (--on-conflict skip).",
        restores_rebuilt: Counter "target_restores_rebuilt_total" =
            "RESTOREs the target node refused (payload from a newer Redis), rebuilt with ordinary commands.",
        moved: Counter "target_redirects_total" {"kind" = "moved"} =
            "Commands a target node redirected (MOVED or ASK), by kind.",
        asked: Counter "target_redirects_total" {"kind" = "ask"} =
            "Commands a target node redirected for now (ASK).",
        reconnects: Counter "target_reconnects_total" = "Target connections lost and retried.",
        resent_commands: Counter "target_resent_commands_total" =
            "Commands resent after a lost connection.",
        resent_non_idempotent: Counter "target_resent_non_idempotent_total" =
            "Resent commands that may have run twice.",
        guarded_discards: Counter "target_guard_discards_total" =
            "Transactions their order guard held back (one before them in their slot did not run); resent.",
        out_of_order: Counter "target_out_of_order_total" =
            "Transactions that ran ahead of an earlier one of their slot (each starts a full sync of its shard).",
    }
}

/// The task's shards as writers see them: a fixed number of places,
/// filled as shards start (a cluster source may gain masters mid-sync), so
/// that a writer finds a batch's shard without a lock.
pub struct ShardList(Box<[std::sync::OnceLock<Arc<ShardStats>>]>);

/// Shards a task can have (Redis Cluster's own limit is about 1000 nodes).
pub const MAX_SHARDS: usize = 1024;

impl ShardList {
    pub fn new(shards: &[Arc<ShardStats>]) -> ShardList {
        let list = ShardList(
            (0..MAX_SHARDS.max(shards.len()))
                .map(|_| Default::default())
                .collect(),
        );
        for (i, s) in shards.iter().enumerate() {
            list.set(i, s.clone());
        }
        list
    }

    /// Shard `i` starts; `false` when there is no place for it.
    pub fn set(&self, i: usize, stats: Arc<ShardStats>) -> bool {
        self.0.get(i).is_some_and(|place| place.set(stats).is_ok())
    }
}

impl std::ops::Index<usize> for ShardList {
    type Output = Arc<ShardStats>;

    /// Shard `i`, which must have started (a batch names its shard).
    fn index(&self, i: usize) -> &Arc<ShardStats> {
        self.0[i].get().expect("a batch's shard has started")
    }
}

/// Counters and progress of one shard (one source master).
pub struct ShardStats {
    /// `host:port` of the source master.
    pub source: String,
    state: AtomicU8,
    links: Box<[Link]>,
    /// Where everything read was handed to writers: (offset, source db),
    /// published together; `None` while a full sync is being loaded.
    /// Offsets start at 0 on a fresh master, so 0 is a real position.
    processed: Mutex<Option<StreamPos>>,
    /// Replication id of the current sync, and the database selected at
    /// `processed` (together: the resume point).
    replid: Mutex<String>,
    /// The targets already hold this shard's data (a checkpoint of an
    /// earlier run): a full sync must replace what it finds.
    pub ours: AtomicBool,
    /// The sync epoch markers name: every full sync starts a new one.
    epoch: AtomicU64,
    pub counters: ShardCounters,
    /// Stream bytes read from the source and not yet parsed.
    pub stream_spill: Arc<SpillGauges>,
    /// (offset, when it was read), to measure how long unapplied data waits.
    samples: Mutex<VecDeque<(u64, Instant)>>,
    /// Heartbeats seen in the stream, for lag from the source's clock.
    heartbeat: Mutex<HeartbeatLag>,
    /// Heartbeats wait to be applied (checked on confirmations).
    heartbeat_pending: AtomicBool,
    /// Woken whenever a batch of this shard is confirmed.
    confirmed: Notify,
    /// Marker keys this shard keeps on its target nodes (one per node
    /// when batches carry markers).
    pub marker_keys: AtomicU64,
    /// Which of the shard's batches in flight each new transaction must
    /// wait for (the order guard, `route::order`); kept here so that it
    /// outlives a restarted shard worker.
    pub order: Mutex<crate::route::order::Order>,
    /// A writer saw a transaction of this shard run after an earlier one of
    /// its slot did not: what the target holds is out of order, and only a
    /// full sync makes it right.
    out_of_order: AtomicBool,
    /// On a cluster source: what the shard's hand-over sampler and intake
    /// share (`source::handover`), kept across intakes.
    pub handover: crate::source::handover::Shared,
}

/// How often heartbeats are written.
pub const HEARTBEAT_PERIOD_MS: i64 = 1000;

/// Heartbeats of one shard: the last seen in the stream and the last
/// applied, as (written at, seen or applied at), Unix ms.
#[derive(Default)]
struct HeartbeatLag {
    last_seen: Option<(i64, i64)>,
    last_applied: Option<(i64, i64)>,
    /// (stream offset after it, written at), not applied yet.
    pending: VecDeque<(u64, i64)>,
}

/// At most this many lag samples are kept; beyond it the newest is replaced,
/// so the oldest unapplied time stays exact.
const MAX_SAMPLES: usize = 8192;

impl ShardStats {
    pub fn new(source: impl Into<String>, n_writers: usize) -> ShardStats {
        ShardStats {
            source: source.into(),
            state: AtomicU8::new(ShardState::Prechecking as u8),
            links: (0..n_writers).map(|_| Link::default()).collect(),
            processed: Mutex::new(None),
            replid: Mutex::new(String::new()),
            ours: AtomicBool::new(false),
            epoch: AtomicU64::new(0),
            counters: ShardCounters::default(),
            stream_spill: Arc::new(SpillGauges::default()),
            samples: Mutex::new(VecDeque::new()),
            heartbeat: Mutex::new(HeartbeatLag::default()),
            heartbeat_pending: AtomicBool::new(false),
            confirmed: Notify::new(),
            marker_keys: AtomicU64::new(0),
            order: Mutex::new(Default::default()),
            out_of_order: AtomicBool::new(false),
            handover: Default::default(),
        }
    }

    /// A writer applied a transaction of this shard out of order (see
    /// `out_of_order`); the shard worker starts over with a full sync.
    pub fn note_out_of_order(&self) {
        self.out_of_order.store(true, Ordering::SeqCst);
    }

    /// Whether a writer applied a transaction out of order since this was
    /// last asked.
    pub fn take_out_of_order(&self) -> bool {
        self.out_of_order.swap(false, Ordering::SeqCst)
    }

    /// Waits until the applied offset reaches `offset`, or `timeout`
    /// passed; returns whether it did.
    pub async fn wait_applied(&self, offset: u64, timeout: std::time::Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.confirmed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.applied().is_some_and(|a| a >= offset) {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.applied().is_some_and(|a| a >= offset);
            }
        }
    }

    /// The current sync epoch (see `engine::marker`).
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// Continues from the newest epoch a target's markers name.
    pub fn seed_epoch(&self, epoch: u64) {
        self.epoch.fetch_max(epoch, Ordering::AcqRel);
    }

    /// A full sync begins a new epoch; returns it.
    pub fn next_epoch(&self) -> u64 {
        self.epoch.fetch_add(1, Ordering::AcqRel) + 1
    }

    /// The replication id of the current sync.
    pub fn replid(&self) -> String {
        self.replid.lock().expect("replid lock").clone()
    }

    pub fn state(&self) -> ShardState {
        ShardState::from_u8(self.state.load(Ordering::Acquire))
    }

    pub fn set_state(&self, state: ShardState) {
        self.state.store(state as u8, Ordering::Release);
    }

    /// A full sync begins: nothing is resumable until it is loaded.
    pub fn begin_full_sync(&self, replid: &str, offset: u64, total_bytes: u64) {
        *self.replid.lock().expect("replid lock") = replid.to_string();
        *self.processed.lock().expect("processed lock") = None;
        let c = &self.counters;
        c.source_offset.set(offset);
        c.full_sync_keys.set(0);
        c.full_sync_bytes.set(0);
        c.full_sync_total_bytes.set(total_bytes);
        self.samples.lock().expect("samples lock").clear();
        // Offsets of the history before are meaningless in the new one.
        self.handover.forget_horizon();
        self.set_state(ShardState::FullSync);
    }

    /// How far the current full sync has read: keys and RDB bytes.
    pub fn full_sync_progress(&self, keys: u64, bytes: u64) {
        self.counters.full_sync_keys.set(keys);
        self.counters.full_sync_bytes.set(bytes);
    }

    /// The stream continues at `at` (after a full sync's RDB, or a partial
    /// resync). Everything dispatched before is fenced off: the stream is
    /// resumable only once all of it is confirmed.
    pub fn begin_incremental(&self, replid: &str, at: StreamPos) {
        for link in self.links.iter() {
            link.fence
                .store(link.dispatched_seq.load(Ordering::SeqCst), Ordering::SeqCst);
        }
        *self.replid.lock().expect("replid lock") = replid.to_string();
        self.counters.source_offset.set(at.offset);
        *self.processed.lock().expect("processed lock") = Some(at);
        self.set_state(ShardState::Incremental);
    }

    /// Starts from a checkpoint: until a connection says otherwise, this is
    /// where the shard resumes (a failed first attempt retries from it).
    pub fn seed(&self, point: &ResumePoint) {
        *self.replid.lock().expect("replid lock") = point.replid.clone();
        *self.processed.lock().expect("processed lock") = Some(point.pos());
        self.counters.source_offset.set(point.offset);
    }

    /// Records that a batch was handed to writer `w`.
    pub fn note_dispatched(&self, w: usize) {
        self.links[w].dispatched_seq.fetch_add(1, Ordering::SeqCst);
    }

    /// Called by writer `w` when a batch ending at `end` is confirmed;
    /// `None` marks a full-sync batch, which makes nothing resumable.
    /// Where writer `w`'s node is for sure: the end of its last confirmed
    /// batch of this shard (`None`: none of the stream yet).
    pub fn confirmed_end(&self, w: usize) -> Option<StreamPos> {
        let link = self.links.get(w)?;
        *link.confirmed.lock().expect("link lock")
    }

    /// How many batches this shard handed writer `w`, and how many of them
    /// it confirmed (the next batch handed over is number `dispatched + 1`).
    pub fn link_seqs(&self, w: usize) -> (u64, u64) {
        self.links.get(w).map_or((0, 0), |l| {
            (
                l.dispatched_seq.load(Ordering::SeqCst),
                l.confirmed_seq.load(Ordering::SeqCst),
            )
        })
    }

    /// Whether everything dispatched to writer `w` is confirmed.
    pub fn link_drained(&self, w: usize) -> bool {
        self.links.get(w).is_some_and(|l| {
            l.confirmed_seq.load(Ordering::SeqCst) >= l.dispatched_seq.load(Ordering::SeqCst)
        })
    }

    pub fn note_confirmed(&self, w: usize, end: Option<StreamPos>) {
        let link = &self.links[w];
        *link.confirmed.lock().expect("link lock") = end;
        link.confirmed_seq.fetch_add(1, Ordering::SeqCst);
        self.confirmed.notify_waiters();
        self.settle_heartbeats();
    }

    /// Our heartbeat, written at `written_ms` (Unix ms), arrived in the
    /// stream; it is applied once everything up to `offset` is.
    pub fn heartbeat_seen(&self, written_ms: i64, offset: u64) {
        let mut hb = self.heartbeat.lock().expect("heartbeat lock");
        hb.last_seen = Some((written_ms, unix_ms()));
        if hb.pending.len() >= MAX_SAMPLES {
            hb.pending.pop_front();
        }
        hb.pending.push_back((offset, written_ms));
        self.heartbeat_pending.store(true, Ordering::Release);
    }

    /// Marks heartbeats up to the applied offset as applied, now.
    fn settle_heartbeats(&self) {
        if !self.heartbeat_pending.load(Ordering::Acquire) {
            return;
        }
        let Some(applied) = self.applied() else {
            return;
        };
        let mut hb = self.heartbeat.lock().expect("heartbeat lock");
        while let Some(&(offset, written)) = hb.pending.front() {
            if offset > applied {
                break;
            }
            hb.pending.pop_front();
            hb.last_applied = Some((written, unix_ms()));
        }
        if hb.pending.is_empty() {
            self.heartbeat_pending.store(false, Ordering::Release);
        }
    }

    /// Lag measured with heartbeats, in ms: from a heartbeat's write on the
    /// source to its arrival in the stream, and to the target's
    /// confirmation of everything before it. A heartbeat overdue (more than
    /// [`HEARTBEAT_PERIOD_MS`] after the last one) makes the lag grow with
    /// the wait. `None` until a heartbeat is seen.
    /// Whether this shard's heartbeat key has been seen in its stream (it
    /// then exists on the source, with a short TTL, while the task runs).
    pub fn heartbeat_key_seen(&self) -> bool {
        self.heartbeat
            .lock()
            .expect("heartbeat lock")
            .last_seen
            .is_some()
    }

    pub fn heartbeat_lags(&self) -> (Option<u64>, Option<u64>) {
        self.settle_heartbeats();
        let now = unix_ms();
        let hb = self.heartbeat.lock().expect("heartbeat lock");
        let lag = |point: Option<(i64, i64)>| {
            point.map(|(written, at)| {
                (at - written)
                    .max(now - written - HEARTBEAT_PERIOD_MS)
                    .max(0) as u64
            })
        };
        (lag(hb.last_seen), lag(hb.last_applied))
    }

    /// Waits until every batch dispatched so far is confirmed.
    pub async fn wait_drained(&self) {
        loop {
            let notified = self.confirmed.notified();
            tokio::pin!(notified);
            // Registered before the check, so a confirmation in between is
            // not missed.
            notified.as_mut().enable();
            if self.drained() {
                return;
            }
            notified.await;
        }
    }

    /// How many writers this shard can feed (links are allocated up front).
    pub fn max_writers(&self) -> usize {
        self.links.len()
    }

    /// Publishes that everything up to `at` has been dispatched.
    pub fn publish_processed(&self, at: StreamPos) {
        *self.processed.lock().expect("processed lock") = Some(at);
        // The applied offset may move with it (hand-overs wait for it).
        self.confirmed.notify_waiters();
        self.settle_heartbeats();
        let mut samples = self.samples.lock().expect("samples lock");
        if samples.back().is_none_or(|&(o, _)| o < at.offset) {
            if samples.len() >= MAX_SAMPLES {
                samples.pop_back();
            }
            samples.push_back((at.offset, Instant::now()));
        }
    }

    /// The position up to which everything read is confirmed by the
    /// targets. It reads `processed` before the per-link counters, and each
    /// position under its own short lock.
    fn applied_point(&self) -> Option<StreamPos> {
        let mut point = (*self.processed.lock().expect("processed lock"))?;
        for link in self.links.iter() {
            let dispatched = link.dispatched_seq.load(Ordering::SeqCst);
            let confirmed = link.confirmed_seq.load(Ordering::SeqCst);
            if confirmed < link.fence.load(Ordering::SeqCst) {
                return None;
            }
            if confirmed < dispatched {
                let held = (*link.confirmed.lock().expect("link lock"))?;
                if held.offset < point.offset {
                    point = held;
                }
            }
        }
        Some(point)
    }

    /// The offset up to which everything read is confirmed by the targets;
    /// `None` while a full sync is not yet wholly applied.
    pub fn applied(&self) -> Option<u64> {
        self.applied_point().map(|p| p.offset)
    }

    /// Whether every dispatched batch is confirmed.
    pub fn drained(&self) -> bool {
        self.links.iter().all(|l| {
            l.confirmed_seq.load(Ordering::SeqCst) >= l.dispatched_seq.load(Ordering::SeqCst)
        })
    }

    /// The offset we have read and handed over (what the first ACK after a
    /// full sync reports); `None` during a full sync.
    pub fn processed(&self) -> Option<u64> {
        self.processed
            .lock()
            .expect("processed lock")
            .map(|p| p.offset)
    }

    fn point_of(&self, pos: StreamPos) -> ResumePoint {
        ResumePoint {
            replid: self.replid.lock().expect("replid lock").clone(),
            offset: pos.offset,
            db: pos.db,
        }
    }

    /// Where a restart could continue, if anything is resumable.
    pub fn resume_point(&self) -> Option<ResumePoint> {
        if self.state() == ShardState::FullSync {
            return None;
        }
        Some(self.point_of(self.applied_point()?))
    }

    /// Where a new connection continues after a lost one: right after what
    /// was read and handed over (those batches are still queued and will be
    /// applied), not after what is applied.
    pub fn handover_point(&self) -> Option<ResumePoint> {
        if self.state() == ShardState::FullSync {
            return None;
        }
        let pos = (*self.processed.lock().expect("processed lock"))?;
        Some(self.point_of(pos))
    }

    /// Milliseconds the oldest unapplied command has waited since it was
    /// read; 0 when everything read is applied.
    pub fn lag_ms(&self) -> u64 {
        if self.state() == ShardState::FullSync {
            return 0;
        }
        let applied = self.applied();
        let mut samples = self.samples.lock().expect("samples lock");
        while samples
            .front()
            .is_some_and(|&(o, _)| applied.is_some_and(|a| o <= a))
        {
            samples.pop_front();
        }
        samples
            .front()
            .map_or(0, |&(_, t)| t.elapsed().as_millis() as u64)
    }
}

/// Counters and state of one writer (one target node).
pub struct WriterStats {
    /// `host:port` of the target node.
    pub target: String,
    pub connected: AtomicBool,
    pub counters: WriterCounters,
    /// Batches that did not fit in the queue, waiting in the overflow.
    pub overflow: Arc<SpillGauges>,
    /// Error replies by class and code (`WRONGTYPE`, `ERR`, ...).
    errors: Mutex<std::collections::BTreeMap<(ErrorClass, String), u64>>,
}

/// What an error reply from a target node meant.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum ErrorClass {
    /// The node refused a replayed command for itself (WRONGTYPE, a syntax
    /// error, BUSYKEY ...): the replay is wrong there. The task stops,
    /// unless `--on-error skip` says to count, log and go on.
    Replay,
    /// The node refused for now (LOADING, CLUSTERDOWN, TRYAGAIN, BUSY,
    /// MASTERDOWN, READONLY): sent again on a new connection.
    Retried,
}

impl ErrorClass {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::Replay => "replay",
            ErrorClass::Retried => "retried",
        }
    }
}

impl WriterStats {
    pub fn new(target: impl Into<String>) -> WriterStats {
        WriterStats {
            target: target.into(),
            connected: AtomicBool::new(false),
            counters: WriterCounters::default(),
            overflow: Arc::new(SpillGauges::default()),
            errors: Mutex::new(Default::default()),
        }
    }

    pub fn count_error(&self, class: ErrorClass, code: &str) {
        *self
            .errors
            .lock()
            .expect("errors lock")
            .entry((class, code.to_string()))
            .or_default() += 1;
    }

    /// Error replies so far, by class and code.
    pub fn error_counts(&self) -> Vec<(ErrorClass, String, u64)> {
        self.errors
            .lock()
            .expect("errors lock")
            .iter()
            .map(|((class, code), n)| (*class, code.clone(), *n))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pos(offset: u64, db: u32) -> StreamPos {
        StreamPos { offset, db }
    }

    #[test]
    fn applied_waits_for_every_writer() {
        let s = ShardStats::new("src:1", 2);
        s.begin_incremental("r", pos(100, 0));
        assert_eq!(s.applied(), Some(100));

        s.note_dispatched(0);
        s.note_dispatched(1);
        s.publish_processed(pos(150, 0));
        assert_eq!(
            s.applied(),
            None,
            "nothing since the sync began is confirmed yet"
        );

        s.note_confirmed(0, Some(pos(150, 0)));
        assert_eq!(s.applied(), None, "writer 1 still holds the shard back");
        s.note_confirmed(1, Some(pos(150, 0)));
        assert_eq!(s.applied(), Some(150));

        // A writer that received nothing new does not hold the shard back.
        s.note_dispatched(0);
        s.publish_processed(pos(200, 0));
        assert_eq!(s.applied(), Some(150));
        s.note_confirmed(0, Some(pos(200, 0)));
        assert_eq!(s.applied(), Some(200));
        assert!(s.drained());
    }

    #[test]
    fn full_sync_batches_make_nothing_resumable() {
        let s = ShardStats::new("src:1", 1);
        s.begin_full_sync("r", 0, 0);
        s.note_dispatched(0);
        s.note_dispatched(0);
        s.note_confirmed(0, None);
        assert_eq!(s.applied(), None);
        assert_eq!(s.resume_point(), None);
        // The RDB is fully dispatched; one batch is still outstanding.
        s.begin_incremental("r", pos(0, 0));
        assert_eq!(s.applied(), None);
        s.note_confirmed(0, None);
        // A fresh master starts at offset 0, which is a real position.
        assert_eq!(s.applied(), Some(0));
        assert_eq!(
            s.resume_point(),
            Some(ResumePoint {
                replid: "r".into(),
                offset: 0,
                db: 0
            })
        );
    }

    #[test]
    fn lag_is_the_age_of_the_oldest_unapplied_read() {
        let s = ShardStats::new("src:1", 1);
        s.begin_incremental("r", pos(10, 0));
        assert_eq!(s.lag_ms(), 0);
        s.note_dispatched(0);
        s.publish_processed(pos(20, 0));
        std::thread::sleep(std::time::Duration::from_millis(30));
        assert!(s.lag_ms() >= 30);
        s.note_confirmed(0, Some(pos(20, 0)));
        assert_eq!(s.lag_ms(), 0);
    }

    #[test]
    fn resume_point_carries_the_db_of_the_applied_offset() {
        let s = ShardStats::new("src:1", 1);
        s.begin_incremental("r", pos(10, 0));
        s.note_dispatched(0);
        s.publish_processed(pos(20, 3));
        s.note_confirmed(0, Some(pos(20, 3)));
        s.note_dispatched(0);
        s.publish_processed(pos(30, 5));
        // The batch up to 30 (db 5) is still outstanding: resume at 20, db 3.
        let p = s.resume_point().unwrap();
        assert_eq!((p.offset, p.db), (20, 3));
    }

    #[test]
    fn restores_outstanding_after_a_second_full_sync_hold_everything_back() {
        // The review's scenario: old history at 900, a new sync at 50 whose
        // RESTOREs are still queued when the stream begins.
        let s = ShardStats::new("src:1", 1);
        s.begin_incremental("old", pos(10, 0));
        s.note_dispatched(0);
        s.publish_processed(pos(900, 0));
        s.note_confirmed(0, Some(pos(900, 0)));
        s.begin_full_sync("new", 50, 0);
        s.note_dispatched(0);
        s.begin_incremental("new", pos(50, 0));
        assert_eq!(s.applied(), None);
        assert_eq!(s.resume_point(), None);
        s.note_confirmed(0, None);
        assert_eq!(s.applied(), Some(50));
    }

    #[test]
    fn a_seeded_resume_point_survives_until_a_connection() {
        let s = ShardStats::new("src:1", 1);
        let p = ResumePoint {
            replid: "r".into(),
            offset: 77,
            db: 4,
        };
        s.seed(&p);
        assert_eq!(s.handover_point(), Some(p.clone()));
        assert_eq!(s.resume_point(), Some(p));
    }

    #[test]
    fn a_new_full_sync_forgets_the_old_history() {
        let s = ShardStats::new("src:1", 1);
        s.begin_incremental("old", pos(10, 0));
        s.note_dispatched(0);
        s.publish_processed(pos(900, 0));
        s.note_confirmed(0, Some(pos(900, 0)));
        s.begin_full_sync("new", 50, 0);
        s.note_dispatched(0);
        s.note_dispatched(0);
        s.note_confirmed(0, None);
        s.begin_incremental("new", pos(50, 0));
        // One RESTORE batch is outstanding: nothing of "new" is resumable,
        // and the old offset 900 must not be paired with "new".
        assert_eq!(s.resume_point(), None);
    }
}
