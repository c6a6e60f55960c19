//! Routing: which writer gets a command, and batching commands per writer.
//!
//! A shard's intake holds a [`Dispatcher`]: it appends each command to the
//! batch being built for the writer that owns the command's key, and hands
//! batches over through the writers' bounded queues. A full queue makes the
//! intake wait briefly (backpressure); a queue that stays full sends the
//! batch to that writer's [`Overflow`] (memory, then disk), so one stalled
//! target node holds up only what is routed to it.

pub mod batch;
pub mod cluster;
mod grouping;
pub mod order;
pub mod overflow;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use engine::marker::Marker;
use engine::resp::encode;
use tokio::sync::{mpsc, oneshot};

pub use batch::{Batch, BatchBuilder, Expect, ExpectKind};
pub use cluster::{ClusterRouting, NodeRequest};
use grouping::Grouping;
pub use grouping::{Skip, NODE_MARKER_REFRESH};
pub use overflow::Overflow;

use crate::error::WorkerError;
use crate::progress::{ShardStats, StreamPos, WriterStats};

/// Commands another writer could not apply (MOVED/ASK), handed to the
/// writer of the node that serves them. `done` fires once they are
/// confirmed.
pub struct Redirected {
    pub batch: Batch,
    pub done: oneshot::Sender<()>,
}

/// The sending side of one writer's queues.
#[derive(Clone)]
pub struct WriterHandle {
    pub index: usize,
    /// `host:port` of the target node.
    pub target: String,
    /// Its address and credentials (for rewrites' own connections).
    pub endpoint: crate::Endpoint,
    pub tx: mpsc::Sender<Batch>,
    /// Redirected commands jump the queue: they are older than anything
    /// queued for their slot.
    pub redirect: mpsc::UnboundedSender<Redirected>,
    /// Where batches go when the queue is full.
    pub overflow: Arc<Overflow>,
    pub stats: Arc<WriterStats>,
}

/// How keys map to writers.
#[derive(Clone)]
pub enum Topology {
    /// One standalone target: every command goes to writer 0.
    Single,
    /// A cluster target: by slot.
    Cluster(Arc<ClusterRouting>),
}

/// Where commands go: the writers and the topology that chooses among them.
#[derive(Clone)]
pub struct Router {
    pub topology: Topology,
    pub writers: Vec<WriterHandle>,
    /// The cluster map generation `writers` was taken at.
    seen_generation: u64,
}

impl Router {
    pub fn single(writer: WriterHandle) -> Router {
        Router {
            topology: Topology::Single,
            writers: vec![writer],
            seen_generation: 0,
        }
    }

    pub fn cluster(routing: Arc<ClusterRouting>) -> Router {
        Router {
            writers: routing.writers(),
            seen_generation: routing.generation(),
            topology: Topology::Cluster(routing),
        }
    }

    pub fn is_cluster(&self) -> bool {
        matches!(self.topology, Topology::Cluster(_))
    }

    /// The writer for a command on `key`.
    pub fn writer_for_key(&self, key: &[u8]) -> usize {
        match &self.topology {
            Topology::Single => 0,
            Topology::Cluster(r) => r.writer_for_slot(engine::slot::slot(key)),
        }
    }

    pub fn writer_for_slot(&self, slot: u16) -> usize {
        match &self.topology {
            Topology::Single => 0,
            Topology::Cluster(r) => r.writer_for_slot(slot),
        }
    }

    /// The writer for a command without keys.
    pub fn default_writer(&self) -> usize {
        0
    }

    pub fn n_writers(&self) -> usize {
        self.writers.len()
    }

    /// Whether the cluster map changed since this router last looked.
    #[inline]
    pub fn stale(&self) -> bool {
        match &self.topology {
            Topology::Single => false,
            Topology::Cluster(r) => r.generation() != self.seen_generation,
        }
    }

    /// Takes the current map (writers added since included).
    pub fn refresh(&mut self) {
        if let Topology::Cluster(r) = &self.topology {
            self.seen_generation = r.generation();
            self.writers = r.writers();
        }
    }
}

/// Batch size at which a batch is handed over without waiting for more.
pub const FLUSH_BYTES: usize = 256 * 1024;
/// Command count at which a batch is handed over.
pub const FLUSH_COMMANDS: usize = 4096;

/// Exactly-once on a standalone target: every batch of the stream is one
/// transaction that also sets the shard's marker (in database 0) to the
/// position the batch ends at, so the target says exactly how far it got.
#[derive(Clone, Debug)]
pub struct Marking {
    /// The shard's marker key.
    pub key: Bytes,
    /// The task began on a target checked empty (kept in every marker).
    pub fresh: bool,
    /// When the target's copied databases hold only this shard's data (a
    /// fresh task with one source master): they are emptied before a full
    /// sync that replaces an earlier copy, so that keys the source deleted
    /// meanwhile do not survive.
    pub flush_dbs: Option<Vec<u32>>,
    /// When other shards write to the same target databases (a cluster
    /// source into a standalone target): before a full sync that replaces
    /// an earlier copy, the target's keys in these slot ranges (this
    /// shard's) are deleted instead, database by database.
    pub sweep: Option<Sweep>,
}

/// This shard's part of the target, to empty before a full resync.
#[derive(Clone, Debug)]
pub struct Sweep {
    /// The source master's slot ranges.
    pub slots: Vec<(u16, u16)>,
    /// The target databases copied.
    pub dbs: Vec<u32>,
}

/// The database markers live in: one marker per shard on a node, whatever
/// the databases written (a source master's heartbeat is in its database
/// 0 too, so both sides' key counts differ by the same one per master).
pub const MARKER_DB: u32 = 0;

const MULTI: &[u8] = b"*1\r\n$5\r\nMULTI\r\n";
const EXEC: &[u8] = b"*1\r\n$4\r\nEXEC\r\n";

fn select(buf: &mut BytesMut, db: u32) {
    encode::command(
        buf,
        &[&b"SELECT"[..], itoa::Buffer::new().format(db).as_bytes()],
    )
}

/// Builds and hands over batches for one shard.
pub struct Dispatcher {
    shard: usize,
    router: Router,
    builders: Vec<BatchBuilder>,
    stats: Arc<ShardStats>,
    marking: Option<Marking>,
    /// The sync the stream's markers name: its epoch and replication id.
    stream: Option<(u64, String)>,
    /// Per writer, the position its last marker was sent with, and when.
    marked: Vec<Option<(u64, Instant)>>,
    /// Cluster exactly-once (see [`Grouping`]).
    grouping: Option<Grouping>,
}

/// A quiet stream (nothing but our filtered heartbeat, say) still moves
/// its markers this often, so that a restart never needs more of the
/// source's backlog than that.
pub const MARKER_REFRESH: Duration = Duration::from_secs(5);

impl Dispatcher {
    pub fn new(shard: usize, router: Router, stats: Arc<ShardStats>) -> Dispatcher {
        let builders = (0..router.n_writers())
            .map(|_| BatchBuilder::default())
            .collect();
        Dispatcher {
            shard,
            router,
            builders,
            stats,
            marking: None,
            stream: None,
            marked: Vec::new(),
            grouping: None,
        }
    }

    /// Exactly-once on a quiet stream: a writer that got no batch since
    /// its marker was last moved gets one holding only the marker, at most
    /// every [`MARKER_REFRESH`]. Call with every batch handed over.
    pub async fn refresh_markers(&mut self, at: Option<StreamPos>) -> Result<(), WorkerError> {
        let (Some(_), Some(_), Some(at)) = (&self.marking, &self.stream, at) else {
            return Ok(());
        };
        for w in 0..self.builders.len() {
            let every = if self.grouping.is_some() {
                NODE_MARKER_REFRESH
            } else {
                MARKER_REFRESH
            };
            let fresh = self
                .marked
                .get(w)
                .copied()
                .flatten()
                .is_some_and(|(offset, when)| offset >= at.offset || when.elapsed() < every);
            if fresh || !self.builders[w].is_empty() {
                continue;
            }
            if self.grouping.is_some() {
                // Nothing of the shard in flight to the node: it has all of
                // the stream before `at` that is its own.
                if !self.stats.link_drained(w) {
                    continue;
                }
                if let Some((_, key)) = self.home(w) {
                    let value = self.applied_value(at);
                    self.builders[w].push(None, ExpectKind::Ok, |buf| {
                        encode::command(buf, &[&b"SET"[..], &key, &value])
                    });
                    self.note_marked(w, at);
                    self.flush_one(w, Some(at)).await?;
                }
                continue;
            }
            self.open_wrapped(w, Some(MARKER_DB));
            self.flush_one(w, Some(at)).await?;
        }
        Ok(())
    }

    /// Wraps the stream's batches with the shard's marker (exactly-once).
    pub fn set_marking(&mut self, marking: Marking) {
        self.marking = Some(marking);
        if self.router.is_cluster() {
            self.grouping = Some(Grouping {
                slot_keys: vec![None; engine::slot::SLOTS as usize],
                homes: Vec::new(),
                marked_slots: vec![false; engine::slot::SLOTS as usize],
                n_marked: 0,
                skip: None,
                floors: Vec::new(),
                opened: Vec::new(),
            });
        }
        self.stats.marker_keys.store(
            self.builders.len() as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
    }

    /// The stream from here on belongs to sync `epoch` of `replid`.
    pub fn set_stream(&mut self, epoch: u64, replid: &str) {
        self.stream = Some((epoch, replid.to_string()));
    }

    /// Before the first key of full sync `epoch`: every marker of the shard
    /// says a full sync is being loaded (the target holds this task's data
    /// from now on, and nothing is resumable). When it replaces an earlier
    /// copy (`over_earlier`) and the marking allows, the copied databases
    /// are emptied first.
    pub async fn begin_full(
        &mut self,
        epoch: u64,
        over_earlier: bool,
    ) -> Result<bool, WorkerError> {
        let Some(marking) = self.marking.clone() else {
            return Ok(false);
        };
        // The full sync replaces every marker: nothing earlier is waited for.
        self.stats.order.lock().expect("order lock").clear();
        let mut flushed = false;
        if let (true, Some(dbs)) = (over_earlier, &marking.flush_dbs) {
            for w in 0..self.builders.len() {
                for &db in dbs {
                    self.push(w, Some(db), ExpectKind::Ok, None, None, |buf| {
                        encode::command(buf, &[b"FLUSHDB"])
                    })
                    .await?;
                }
            }
            flushed = true;
        }
        let value = Marker::Full {
            epoch,
            fresh: marking.fresh,
        }
        .encode();
        for w in 0..self.builders.len() {
            let key = match self.grouping {
                Some(_) => match self.home(w) {
                    Some((_, key)) => key,
                    None => continue,
                },
                None => marking.key.clone(),
            };
            self.push(w, Some(MARKER_DB), ExpectKind::Ok, None, None, |buf| {
                encode::command(buf, &[&b"SET"[..], &key, &value])
            })
            .await?;
        }
        self.flush_all(None).await?;
        Ok(flushed)
    }

    pub fn router(&self) -> &Router {
        &self.router
    }

    /// Takes the current cluster map. Everything built so far must have
    /// been handed over (the caller flushes and waits first).
    pub fn refresh(&mut self) {
        debug_assert!(self.is_empty());
        self.router.refresh();
        if let Some(g) = &mut self.grouping {
            g.homes.clear();
            g.floors.clear();
        }
        while self.builders.len() < self.router.n_writers() {
            self.builders.push(BatchBuilder::default());
        }
    }

    /// Appends a command for writer `w`, to run in target database `db`.
    /// Hands the batch over first when the database changes. `at` is the
    /// stream position after the commands already in the batch (`None`
    /// during a full sync).
    ///
    /// With a marking, a batch of the stream is one transaction: it opens
    /// with MULTI, a source transaction's own MULTI/EXEC are left out (the
    /// batch is atomic already; a source transaction is never split between
    /// batches), and every command is queued.
    pub async fn push(
        &mut self,
        w: usize,
        db: Option<u32>,
        kind: ExpectKind,
        at: Option<StreamPos>,
        slot: Option<u16>,
        encode: impl FnOnce(&mut BytesMut),
    ) -> Result<(), WorkerError> {
        if let (Some(_), Some(pos)) = (&self.grouping, at) {
            return self.push_grouped(w, kind, pos, slot, encode).await;
        }
        if !self.builders[w].accepts_db(db) {
            self.flush_one(w, at).await?;
        }
        let b = &mut self.builders[w];
        if self.marking.is_none() || at.is_none() {
            b.push(db, kind, encode);
            return Ok(());
        }
        if b.is_empty() {
            self.open_wrapped(w, db);
        }
        let b = &mut self.builders[w];
        if matches!(kind, ExpectKind::TxBegin | ExpectKind::TxEnd) {
            // The source transaction's own MULTI/EXEC are left out, but the
            // database its MULTI names is the batch's.
            if let Some(db) = db {
                b.default_db(db);
            }
            return Ok(());
        }
        b.push(db, ExpectKind::TxQueued, encode);
        Ok(())
    }

    /// Hands over every batch that reached its size.
    pub async fn flush_full(&mut self, at: Option<StreamPos>) -> Result<(), WorkerError> {
        for w in 0..self.builders.len() {
            let b = &self.builders[w];
            if b.bytes() >= FLUSH_BYTES || b.commands() >= FLUSH_COMMANDS {
                self.flush_one(w, at).await?;
            }
        }
        Ok(())
    }

    /// Hands over every non-empty batch, marking them as ending at `at`.
    pub async fn flush_all(&mut self, at: Option<StreamPos>) -> Result<(), WorkerError> {
        for w in 0..self.builders.len() {
            if !self.builders[w].is_empty() {
                self.flush_one(w, at).await?;
            }
        }
        Ok(())
    }

    async fn flush_one(&mut self, w: usize, at: Option<StreamPos>) -> Result<(), WorkerError> {
        self.seal(w, at);
        let batch = self.builders[w].take(self.shard, at);
        // Counted before it is handed over, so that `processed` can never
        // move past a batch the progress table does not know about.
        self.stats.note_dispatched(w);
        let handle = &self.router.writers[w];
        handle
            .overflow
            .send(&handle.tx, batch)
            .await
            .map_err(|e| match e {
                overflow::SendError::Closed => WorkerError::Closed {
                    addr: handle.target.clone(),
                    context: "handing commands to its writer (the writer stopped)",
                },
                overflow::SendError::Spill(e) => e,
            })
    }

    /// Standalone exactly-once: opens writer `w`'s batch as one of our
    /// transactions, for database `db`. While the shard's previous batch
    /// to the node may still be in flight, the MULTI goes out behind an
    /// order guard (see `order.rs`): the transaction runs only if that
    /// batch did. The guard runs in the markers' database, so the batch's
    /// database is settled here.
    fn open_wrapped(&mut self, w: usize, db: Option<u32>) {
        let (_, confirmed) = self.stats.link_seqs(w);
        let pred = {
            let mut order = self.stats.order.lock().expect("order lock");
            order.prune(w, confirmed);
            order.before_batch(w)
        };
        let b = &mut self.builders[w];
        if let (Some(pred), Some(marking)) = (pred, &self.marking) {
            let db = db.unwrap_or(MARKER_DB);
            b.default_db(db);
            if db != MARKER_DB {
                b.push(None, ExpectKind::TxGuard, |buf| select(buf, MARKER_DB));
            }
            engine::marker::guard_commands(&marking.key, &pred.value, |cmd| {
                b.push(None, ExpectKind::TxGuard, |buf| encode::command(buf, cmd))
            });
            if db != MARKER_DB {
                b.push(None, ExpectKind::TxGuard, |buf| select(buf, db));
            }
        }
        b.push(db, ExpectKind::TxBegin, |buf| buf.extend_from_slice(MULTI));
        b.wrapped = true;
    }

    /// Ends a wrapped batch: the SET of the shard's marker to `at` (in
    /// the marker's database, the batch's restored after), then EXEC.
    fn seal(&mut self, w: usize, at: Option<StreamPos>) {
        if !self.builders[w].wrapped {
            return;
        }
        if let (Some(_), Some(at)) = (&self.grouping, at) {
            return self.seal_grouped(w, at);
        }
        if let (Some(marking), Some(_), Some(at)) = (&self.marking, &self.stream, at) {
            let key = marking.key.clone();
            let value: Bytes = self.applied_value(at).into();
            self.note_marked(w, at);
            let (dispatched, _) = self.stats.link_seqs(w);
            self.stats.order.lock().expect("order lock").note_batch(
                w,
                dispatched + 1,
                value.clone(),
            );
            let b = &mut self.builders[w];
            b.default_db(MARKER_DB);
            let db = b.db().unwrap_or(MARKER_DB);
            if db != MARKER_DB {
                b.push(None, ExpectKind::TxQueued, |buf| select(buf, MARKER_DB));
            }
            b.push(None, ExpectKind::TxQueued, |buf| {
                encode::command(buf, &[&b"SET"[..], &key, &value])
            });
            if db != MARKER_DB {
                b.push(None, ExpectKind::TxQueued, |buf| select(buf, db));
            }
        }
        let b = &mut self.builders[w];
        b.push(None, ExpectKind::TxEnd, |buf| buf.extend_from_slice(EXEC));
    }

    /// Whether anything is waiting to be handed over.
    pub fn is_empty(&self) -> bool {
        self.builders.iter().all(BatchBuilder::is_empty)
    }
}

#[cfg(test)]
pub(super) mod tests {
    //! What the dispatcher hands a writer, with and without markers.

    use super::*;
    use crate::Endpoint;

    pub(super) const MARKER: &[u8] = b"shardsync:applied:t:src:1";

    fn dispatcher(marked: bool) -> (Dispatcher, mpsc::Receiver<Batch>) {
        let dir = std::env::temp_dir().join(format!("shardsync-dispatch-{}", std::process::id()));
        let stats = Arc::new(WriterStats::new("t:1"));
        let (tx, rx) = mpsc::channel(64);
        let (redirect, _) = mpsc::unbounded_channel();
        let handle = WriterHandle {
            index: 0,
            target: "t:1".into(),
            endpoint: Endpoint::new("127.0.0.1", 1),
            tx,
            redirect,
            overflow: Arc::new(Overflow::new(&dir, "t:1", 1 << 20, stats.clone())),
            stats,
        };
        let shard = Arc::new(ShardStats::new("src:1", 1));
        let mut d = Dispatcher::new(0, Router::single(handle), shard);
        if marked {
            d.set_marking(Marking {
                key: Bytes::from_static(MARKER),
                fresh: true,
                flush_dbs: Some(vec![0, 4]),
                sweep: None,
            });
            d.set_stream(2, "r");
        }
        (d, rx)
    }

    pub(super) fn pos(offset: u64) -> Option<StreamPos> {
        Some(StreamPos { offset, db: 5 })
    }

    /// Each command of a batch with its expected reply, one line each.
    pub(super) fn lines(b: &Batch) -> Vec<String> {
        (0..b.len())
            .map(|i| {
                let mut buf = BytesMut::from(b.command_bytes(i));
                let cmd = engine::resp::parse_command(&mut buf).unwrap().unwrap();
                let args: Vec<String> = cmd
                    .args()
                    .map(|a| String::from_utf8_lossy(a).into_owned())
                    .collect();
                format!("{:?} {}", b.replies[i].kind, args.join(" "))
            })
            .collect()
    }

    async fn push(d: &mut Dispatcher, db: Option<u32>, kind: ExpectKind, at: u64, args: &[&str]) {
        d.push(0, db, kind, pos(at), None, |buf| encode::command(buf, args))
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn a_marked_batch_is_one_transaction_ending_with_its_marker() {
        let (mut d, mut rx) = dispatcher(true);
        push(&mut d, Some(2), ExpectKind::Ok, 10, &["SET", "a", "1"]).await;
        push(&mut d, Some(2), ExpectKind::Ok, 20, &["INCR", "b"]).await;
        d.flush_all(pos(30)).await.unwrap();
        let b = rx.try_recv().unwrap();
        assert!(b.wrapped);
        assert_eq!((b.db, b.end), (Some(2), pos(30)));
        assert_eq!(
            lines(&b),
            [
                "TxBegin MULTI",
                "TxQueued SET a 1",
                "TxQueued INCR b",
                "TxQueued SELECT 0",
                "TxQueued SET shardsync:applied:t:src:1 1 2 f r 30 5",
                "TxQueued SELECT 2",
                "TxEnd EXEC",
            ]
        );
    }

    #[tokio::test]
    async fn a_source_transaction_joins_the_batch_in_its_database() {
        let (mut d, mut rx) = dispatcher(true);
        push(&mut d, Some(0), ExpectKind::TxBegin, 10, &["MULTI"]).await;
        push(&mut d, None, ExpectKind::TxQueued, 10, &["INCR", "x"]).await;
        push(&mut d, None, ExpectKind::TxEnd, 10, &["EXEC"]).await;
        d.flush_all(pos(40)).await.unwrap();
        let b = rx.try_recv().unwrap();
        assert_eq!(b.db, Some(0));
        assert_eq!(
            lines(&b),
            [
                "TxBegin MULTI",
                "TxQueued INCR x",
                "TxQueued SET shardsync:applied:t:src:1 1 2 f r 40 5",
                "TxEnd EXEC",
            ],
            "no SELECT around the marker in database 0, no nested MULTI"
        );
    }

    #[tokio::test]
    async fn a_change_of_database_ends_the_batch_at_the_position_before_it() {
        let (mut d, mut rx) = dispatcher(true);
        push(&mut d, Some(1), ExpectKind::Ok, 10, &["SET", "a", "1"]).await;
        push(&mut d, Some(3), ExpectKind::Ok, 10, &["SET", "b", "2"]).await;
        d.flush_all(pos(20)).await.unwrap();
        let first = rx.try_recv().unwrap();
        let second = rx.try_recv().unwrap();
        assert_eq!((first.db, first.end), (Some(1), pos(10)));
        assert_eq!((second.db, second.end), (Some(3), pos(20)));
        assert!(first.wrapped && second.wrapped);
        assert!(lines(&first)[3].ends_with(" 10 5"), "{:?}", lines(&first));
    }

    #[tokio::test]
    async fn keyless_batches_run_in_the_markers_database() {
        let (mut d, mut rx) = dispatcher(true);
        push(
            &mut d,
            None,
            ExpectKind::Ok,
            10,
            &["FUNCTION", "DELETE", "lib"],
        )
        .await;
        d.flush_all(pos(20)).await.unwrap();
        let b = rx.try_recv().unwrap();
        assert_eq!(b.db, Some(MARKER_DB));
        assert_eq!(lines(&b).len(), 4);
    }

    #[tokio::test]
    async fn snapshot_batches_are_not_wrapped_and_a_full_sync_is_marked_first() {
        let (mut d, mut rx) = dispatcher(true);
        assert!(!d.begin_full(3, false).await.unwrap(), "nothing flushed");
        d.push(0, Some(0), ExpectKind::Ok, None, None, |buf| {
            encode::command(buf, &["RESTORE", "k", "0", "p", "REPLACE"])
        })
        .await
        .unwrap();
        d.flush_all(None).await.unwrap();
        let mark = rx.try_recv().unwrap();
        assert_eq!(
            lines(&mark),
            ["Ok SET shardsync:applied:t:src:1 1 3 f full"]
        );
        assert_eq!(mark.db, Some(MARKER_DB));
        let restore = rx.try_recv().unwrap();
        assert!(!mark.wrapped && !restore.wrapped);
        assert_eq!(lines(&restore), ["Ok RESTORE k 0 p REPLACE"]);
    }

    #[tokio::test]
    async fn a_full_sync_over_an_earlier_copy_empties_the_copied_databases_first() {
        let (mut d, mut rx) = dispatcher(true);
        assert!(d.begin_full(4, true).await.unwrap());
        let got: Vec<(Option<u32>, Vec<String>)> = std::iter::from_fn(|| rx.try_recv().ok())
            .map(|b| (b.db, lines(&b)))
            .collect();
        assert_eq!(
            got,
            [
                (Some(0), vec!["Ok FLUSHDB".to_string()]),
                (Some(4), vec!["Ok FLUSHDB".to_string()]),
                (
                    Some(0),
                    vec!["Ok SET shardsync:applied:t:src:1 1 4 f full".to_string()]
                ),
            ]
        );
    }

    #[tokio::test]
    async fn a_quiet_stream_moves_its_marker_now_and_then() {
        let (mut d, mut rx) = dispatcher(true);
        d.refresh_markers(pos(10)).await.unwrap();
        let b = rx.try_recv().unwrap();
        assert_eq!(
            lines(&b),
            [
                "TxBegin MULTI",
                "TxQueued SET shardsync:applied:t:src:1 1 2 f r 10 5",
                "TxEnd EXEC"
            ]
        );
        // Fresh enough: nothing more for a while, whatever the position.
        d.refresh_markers(pos(20)).await.unwrap();
        push(&mut d, Some(0), ExpectKind::Ok, 30, &["SET", "a", "1"]).await;
        d.flush_all(pos(40)).await.unwrap();
        d.refresh_markers(pos(40)).await.unwrap();
        assert_eq!(
            rx.try_recv().unwrap().len(),
            6,
            "the SET's batch, behind the order guard of the unconfirmed one"
        );
        assert!(rx.try_recv().is_err(), "no marker-only batch after it");
    }

    #[tokio::test]
    async fn a_batch_behind_an_unconfirmed_one_runs_only_if_that_one_did() {
        let (mut d, mut rx) = dispatcher(true);
        push(&mut d, Some(0), ExpectKind::Ok, 10, &["INCR", "a"]).await;
        d.flush_all(pos(20)).await.unwrap();
        let first = rx.try_recv().unwrap();
        assert_eq!(
            first.replies[0].kind,
            ExpectKind::TxBegin,
            "nothing to wait for"
        );
        // The first is still in flight: the second waits for its marker,
        // watched in the markers' database (the batch's is restored after).
        push(&mut d, Some(3), ExpectKind::Ok, 20, &["INCR", "b"]).await;
        d.flush_all(pos(30)).await.unwrap();
        let second = rx.try_recv().unwrap();
        let guard = engine::marker::GUARD_SCRIPT;
        assert_eq!(
            lines(&second)[..5],
            [
                "TxGuard SELECT 0".to_string(),
                "TxGuard WATCH shardsync:applied:t:src:1".into(),
                format!("TxGuard EVAL {guard} 1 shardsync:applied:t:src:1 1 2 f r 20 5"),
                "TxGuard SELECT 3".into(),
                "TxBegin MULTI".into(),
            ]
        );
        assert_eq!(second.db, Some(3));
        // Both confirmed: the third waits for nothing.
        d.stats.note_confirmed(0, first.end);
        d.stats.note_confirmed(0, second.end);
        push(&mut d, Some(0), ExpectKind::Ok, 30, &["INCR", "c"]).await;
        d.flush_all(pos(40)).await.unwrap();
        let third = rx.try_recv().unwrap();
        assert_eq!(third.replies[0].kind, ExpectKind::TxBegin);
    }

    #[tokio::test]
    async fn without_markers_batches_stay_as_they_were() {
        let (mut d, mut rx) = dispatcher(false);
        push(&mut d, Some(2), ExpectKind::Ok, 10, &["SET", "a", "1"]).await;
        d.begin_full(1, true).await.unwrap();
        d.flush_all(pos(20)).await.unwrap();
        let b = rx.try_recv().unwrap();
        assert!(!b.wrapped);
        assert_eq!(lines(&b), ["Ok SET a 1"]);
        assert!(rx.try_recv().is_err(), "no marker batch");
    }
}
