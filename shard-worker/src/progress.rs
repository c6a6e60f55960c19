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
    pub memory: AtomicU64,
    /// Bytes waiting in spill files.
    pub on_disk: AtomicU64,
    /// Bytes ever written to spill files.
    pub total: AtomicU64,
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
    confirmed: Mutex<Option<(u64, u32)>>,
}

/// Where a shard can resume: the source's replication id, the offset of the
/// last byte applied, and the database the stream had selected there.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResumePoint {
    pub replid: String,
    pub offset: u64,
    pub db: u32,
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
    processed: Mutex<Option<(u64, u32)>>,
    /// Offset of the stream read so far (status shows it).
    pub source_offset: AtomicU64,
    /// Replication id of the current sync, and the database selected at
    /// `processed` (together: the resume point).
    replid: Mutex<String>,
    /// The targets already hold this shard's data (a checkpoint of an
    /// earlier run): a full sync must replace what it finds.
    pub ours: AtomicBool,
    /// Full syncs whose RDB was read to the end.
    pub full_syncs_loaded: AtomicU64,
    pub full_sync_keys: AtomicU64,
    pub full_sync_bytes: AtomicU64,
    /// Size of the RDB transfer when the source announced it (disk-based
    /// transfers); 0 when unknown (diskless).
    pub full_sync_total_bytes: AtomicU64,
    pub full_syncs: AtomicU64,
    pub partial_syncs: AtomicU64,
    pub commands_received: AtomicU64,
    pub commands_filtered: AtomicU64,
    pub commands_unsupported: AtomicU64,
    /// Multi-key commands split into per-slot parts (cluster targets).
    pub commands_split: AtomicU64,
    /// Commands rewritten into a slot-respecting equivalent.
    pub commands_rewritten: AtomicU64,
    /// Transactions that could not stay whole (keys in several slots).
    pub transactions_split: AtomicU64,
    /// Waits for every dispatched batch to be confirmed (slot map changes,
    /// rewrites).
    pub barriers: AtomicU64,
    pub source_reconnects: AtomicU64,
    /// RDB values whose DUMP payload was restamped with the (older)
    /// target's RDB version.
    pub values_restamped: AtomicU64,
    /// RDB values (and replicated RESTOREs) rebuilt with ordinary commands.
    pub values_rebuilt: AtomicU64,
    /// Values big enough to be written in parts.
    pub big_values: AtomicU64,
    /// Hash fields written without their TTL (the target predates 7.4).
    pub field_ttls_dropped: AtomicU64,
    /// Stream consumers without pending entries left out (target before 6.2).
    pub consumers_dropped: AtomicU64,
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

fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
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
            source_offset: AtomicU64::new(0),
            replid: Mutex::new(String::new()),
            ours: AtomicBool::new(false),
            full_syncs_loaded: AtomicU64::new(0),
            full_sync_keys: AtomicU64::new(0),
            full_sync_bytes: AtomicU64::new(0),
            full_sync_total_bytes: AtomicU64::new(0),
            full_syncs: AtomicU64::new(0),
            partial_syncs: AtomicU64::new(0),
            commands_received: AtomicU64::new(0),
            commands_filtered: AtomicU64::new(0),
            commands_unsupported: AtomicU64::new(0),
            commands_split: AtomicU64::new(0),
            commands_rewritten: AtomicU64::new(0),
            transactions_split: AtomicU64::new(0),
            barriers: AtomicU64::new(0),
            source_reconnects: AtomicU64::new(0),
            values_restamped: AtomicU64::new(0),
            values_rebuilt: AtomicU64::new(0),
            big_values: AtomicU64::new(0),
            field_ttls_dropped: AtomicU64::new(0),
            consumers_dropped: AtomicU64::new(0),
            stream_spill: Arc::new(SpillGauges::default()),
            samples: Mutex::new(VecDeque::new()),
            heartbeat: Mutex::new(HeartbeatLag::default()),
            heartbeat_pending: AtomicBool::new(false),
            confirmed: Notify::new(),
        }
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
        self.source_offset.store(offset, Ordering::Release);
        self.full_sync_keys.store(0, Ordering::Relaxed);
        self.full_sync_bytes.store(0, Ordering::Relaxed);
        self.full_sync_total_bytes
            .store(total_bytes, Ordering::Relaxed);
        self.full_syncs.fetch_add(1, Ordering::Relaxed);
        self.samples.lock().expect("samples lock").clear();
        self.set_state(ShardState::FullSync);
    }

    /// The stream continues from `offset` (after a full sync's RDB, or a
    /// partial resync). Everything dispatched before is fenced off: the
    /// stream is resumable only once all of it is confirmed.
    pub fn begin_incremental(&self, replid: &str, offset: u64, db: u32) {
        for link in self.links.iter() {
            link.fence
                .store(link.dispatched_seq.load(Ordering::SeqCst), Ordering::SeqCst);
        }
        *self.replid.lock().expect("replid lock") = replid.to_string();
        self.source_offset.store(offset, Ordering::Release);
        *self.processed.lock().expect("processed lock") = Some((offset, db));
        self.set_state(ShardState::Incremental);
    }

    /// Starts from a checkpoint: until a connection says otherwise, this is
    /// where the shard resumes (a failed first attempt retries from it).
    pub fn seed(&self, point: &ResumePoint) {
        *self.replid.lock().expect("replid lock") = point.replid.clone();
        *self.processed.lock().expect("processed lock") = Some((point.offset, point.db));
        self.source_offset.store(point.offset, Ordering::Release);
    }

    /// Records that a batch was handed to writer `w`.
    pub fn note_dispatched(&self, w: usize) {
        self.links[w].dispatched_seq.fetch_add(1, Ordering::SeqCst);
    }

    /// Called by writer `w` when a batch ending at `end` (offset, source db)
    /// is confirmed; `None` marks a full-sync batch, which makes nothing
    /// resumable.
    pub fn note_confirmed(&self, w: usize, end: Option<(u64, u32)>) {
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

    /// Publishes that everything up to `offset` has been dispatched, with
    /// `db` selected at that point.
    pub fn publish_processed(&self, offset: u64, db: u32) {
        *self.processed.lock().expect("processed lock") = Some((offset, db));
        self.settle_heartbeats();
        let mut samples = self.samples.lock().expect("samples lock");
        if samples.back().is_none_or(|&(o, _)| o < offset) {
            if samples.len() >= MAX_SAMPLES {
                samples.pop_back();
            }
            samples.push_back((offset, Instant::now()));
        }
    }

    /// The offset up to which everything read is confirmed by the targets,
    /// with the source db selected at that offset.
    fn applied_point(&self) -> Option<(u64, u32)> {
        let mut point = (*self.processed.lock().expect("processed lock"))?;
        for link in self.links.iter() {
            let dispatched = link.dispatched_seq.load(Ordering::SeqCst);
            let confirmed = link.confirmed_seq.load(Ordering::SeqCst);
            if confirmed < link.fence.load(Ordering::SeqCst) {
                return None;
            }
            if confirmed < dispatched {
                let held = (*link.confirmed.lock().expect("link lock"))?;
                if held.0 < point.0 {
                    point = held;
                }
            }
        }
        Some(point)
    }

    /// The offset up to which everything read is confirmed by the targets;
    /// `None` while a full sync is not yet wholly applied.
    pub fn applied(&self) -> Option<u64> {
        self.applied_point().map(|p| p.0)
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
        self.processed.lock().expect("processed lock").map(|p| p.0)
    }

    /// Where a restart could continue, if anything is resumable.
    pub fn resume_point(&self) -> Option<ResumePoint> {
        if self.state() == ShardState::FullSync {
            return None;
        }
        let (offset, db) = self.applied_point()?;
        let replid = self.replid.lock().expect("replid lock").clone();
        Some(ResumePoint { replid, offset, db })
    }

    /// Where a new connection continues after a lost one: right after what
    /// was read and handed over (those batches are still queued and will be
    /// applied), not after what is applied.
    pub fn handover_point(&self) -> Option<ResumePoint> {
        if self.state() == ShardState::FullSync {
            return None;
        }
        let (offset, db) = (*self.processed.lock().expect("processed lock"))?;
        let replid = self.replid.lock().expect("replid lock").clone();
        Some(ResumePoint { replid, offset, db })
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

/// Counters of one writer (one target node).
pub struct WriterStats {
    /// `host:port` of the target node.
    pub target: String,
    pub connected: AtomicBool,
    pub commands_applied: AtomicU64,
    pub batches_applied: AtomicU64,
    pub bytes_written: AtomicU64,
    pub inflight_commands: AtomicU64,
    /// Batches handed to the writer's queue and not yet taken from it.
    pub queued_batches: AtomicU64,
    /// Batches that did not fit in the queue, waiting in the overflow.
    pub overflow: Arc<SpillGauges>,
    pub overflow_batches: AtomicU64,
    pub keys_skipped: AtomicU64,
    /// RESTOREs the node refused (payload from a newer Redis) and that were
    /// rebuilt with ordinary commands.
    pub restores_rebuilt: AtomicU64,
    /// Commands the node said live elsewhere (MOVED) or elsewhere for now
    /// (ASK), handed to the right writer.
    pub moved: AtomicU64,
    pub asked: AtomicU64,
    pub reconnects: AtomicU64,
    pub resent_commands: AtomicU64,
    pub resent_non_idempotent: AtomicU64,
    /// Error replies by code (`WRONGTYPE`, `ERR`, ...).
    pub errors: Mutex<std::collections::BTreeMap<String, u64>>,
}

impl WriterStats {
    pub fn new(target: impl Into<String>) -> WriterStats {
        WriterStats {
            target: target.into(),
            connected: AtomicBool::new(false),
            commands_applied: AtomicU64::new(0),
            batches_applied: AtomicU64::new(0),
            bytes_written: AtomicU64::new(0),
            inflight_commands: AtomicU64::new(0),
            queued_batches: AtomicU64::new(0),
            overflow: Arc::new(SpillGauges::default()),
            overflow_batches: AtomicU64::new(0),
            keys_skipped: AtomicU64::new(0),
            restores_rebuilt: AtomicU64::new(0),
            moved: AtomicU64::new(0),
            asked: AtomicU64::new(0),
            reconnects: AtomicU64::new(0),
            resent_commands: AtomicU64::new(0),
            resent_non_idempotent: AtomicU64::new(0),
            errors: Mutex::new(Default::default()),
        }
    }

    pub fn count_error(&self, code: &str) {
        *self
            .errors
            .lock()
            .expect("errors lock")
            .entry(code.to_string())
            .or_default() += 1;
    }

    pub fn error_counts(&self) -> Vec<(String, u64)> {
        self.errors
            .lock()
            .expect("errors lock")
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn applied_waits_for_every_writer() {
        let s = ShardStats::new("src:1", 2);
        s.begin_incremental("r", 100, 0);
        assert_eq!(s.applied(), Some(100));

        s.note_dispatched(0);
        s.note_dispatched(1);
        s.publish_processed(150, 0);
        assert_eq!(
            s.applied(),
            None,
            "nothing since the sync began is confirmed yet"
        );

        s.note_confirmed(0, Some((150, 0)));
        assert_eq!(s.applied(), None, "writer 1 still holds the shard back");
        s.note_confirmed(1, Some((150, 0)));
        assert_eq!(s.applied(), Some(150));

        // A writer that received nothing new does not hold the shard back.
        s.note_dispatched(0);
        s.publish_processed(200, 0);
        assert_eq!(s.applied(), Some(150));
        s.note_confirmed(0, Some((200, 0)));
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
        s.begin_incremental("r", 0, 0);
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
        s.begin_incremental("r", 10, 0);
        assert_eq!(s.lag_ms(), 0);
        s.note_dispatched(0);
        s.publish_processed(20, 0);
        std::thread::sleep(std::time::Duration::from_millis(30));
        assert!(s.lag_ms() >= 30);
        s.note_confirmed(0, Some((20, 0)));
        assert_eq!(s.lag_ms(), 0);
    }

    #[test]
    fn resume_point_carries_the_db_of_the_applied_offset() {
        let s = ShardStats::new("src:1", 1);
        s.begin_incremental("r", 10, 0);
        s.note_dispatched(0);
        s.publish_processed(20, 3);
        s.note_confirmed(0, Some((20, 3)));
        s.note_dispatched(0);
        s.publish_processed(30, 5);
        // The batch up to 30 (db 5) is still outstanding: resume at 20, db 3.
        let p = s.resume_point().unwrap();
        assert_eq!((p.offset, p.db), (20, 3));
    }

    #[test]
    fn restores_outstanding_after_a_second_full_sync_hold_everything_back() {
        // The review's scenario: old history at 900, a new sync at 50 whose
        // RESTOREs are still queued when the stream begins.
        let s = ShardStats::new("src:1", 1);
        s.begin_incremental("old", 10, 0);
        s.note_dispatched(0);
        s.publish_processed(900, 0);
        s.note_confirmed(0, Some((900, 0)));
        s.begin_full_sync("new", 50, 0);
        s.note_dispatched(0);
        s.begin_incremental("new", 50, 0);
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
        s.begin_incremental("old", 10, 0);
        s.note_dispatched(0);
        s.publish_processed(900, 0);
        s.note_confirmed(0, Some((900, 0)));
        s.begin_full_sync("new", 50, 0);
        s.note_dispatched(0);
        s.note_dispatched(0);
        s.note_confirmed(0, None);
        s.begin_incremental("new", 50, 0);
        // One RESTORE batch is outstanding: nothing of "new" is resumable,
        // and the old offset 900 must not be paired with "new".
        assert_eq!(s.resume_point(), None);
    }
}
