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
pub mod overflow;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use engine::marker::Marker;
use engine::resp::encode;
use tokio::sync::{mpsc, oneshot};

pub use batch::{Batch, BatchBuilder, Expect, ExpectKind};
pub use cluster::{ClusterRouting, NodeRequest};
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

/// Cluster exactly-once, after a restart: what each target node already
/// applied of the stream, from its markers. The stream resumes where the
/// node furthest behind is; what another node (or slot) already has is not
/// sent to it again.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Skip {
    /// The replication history the offsets are of (a stream of another,
    /// after a full resync, skips nothing).
    pub replid: String,
    /// Per target node (`host:port`): everything of the stream before
    /// this offset is applied there (its node-wide marker).
    pub nodes: std::collections::HashMap<String, u64>,
    /// Per slot (16,384 entries, or none): everything of the slot before
    /// this offset is applied (its slot marker; 0 when not ahead).
    pub slots: Vec<u64>,
}

/// The database markers live in: one marker per shard on a node, whatever
/// the databases written (a source master's heartbeat is in its database
/// 0 too, so both sides' key counts differ by the same one per master).
pub const MARKER_DB: u32 = 0;

const MULTI: &[u8] = b"*1\r\n$5\r\nMULTI\r\n";
const EXEC: &[u8] = b"*1\r\n$4\r\nEXEC\r\n";

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

/// Cluster exactly-once: a transaction must stay in one slot, so a batch
/// to a node becomes one transaction per slot, each with the SET of that
/// slot's marker (`{tag}<marker>`), followed by the SET of the shard's
/// node-wide marker (`{tag of the node's first slot}<marker>:node`): a node
/// runs a connection's commands in order, so once that last SET ran, every
/// slot of the batch did. A keyless command (FLUSHALL, FUNCTION LOAD) is
/// a batch of its own, in the transaction of the node's first slot.
struct Grouping {
    /// Marker names per slot, built on first use.
    slot_keys: Vec<Option<Bytes>>,
    /// Per writer: its node's first slot and node-wide marker name.
    homes: Vec<Option<(u16, Bytes)>>,
    /// Slots that hold a marker of this shard (for `/status`).
    marked_slots: Vec<bool>,
    n_marked: u64,
    /// After a restart: what the nodes already applied.
    skip: Option<Skip>,
    /// Per writer, the node-wide floor from `skip`.
    floors: Vec<u64>,
    /// Per writer, where the batch being built begins (the position before
    /// its first command).
    opened: Vec<Option<StreamPos>>,
}

/// On a cluster target, a node's marker moves this often on a quiet
/// stream (one SET per node): it is what a restart resumes from.
pub const NODE_MARKER_REFRESH: Duration = Duration::from_secs(1);

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

    /// Cluster exactly-once: what the target's nodes already applied (read
    /// from their markers by the precheck).
    pub fn set_skip(&mut self, skip: Skip) {
        if let Some(g) = &mut self.grouping {
            g.skip = Some(skip);
            g.floors.clear();
        }
    }

    /// Writer `w`'s home slot and node-wide marker name.
    fn home(&mut self, w: usize) -> Option<(u16, Bytes)> {
        let g = self.grouping.as_mut()?;
        if g.homes.len() <= w {
            g.homes.resize(w + 1, None);
        }
        if g.homes[w].is_none() {
            let Topology::Cluster(routing) = &self.router.topology else {
                return None;
            };
            let base = &self.marking.as_ref()?.key;
            g.homes[w] = routing
                .home_slot(w)
                .map(|h| (h, engine::marker::node_wide(base, h).into()));
        }
        g.homes[w].clone()
    }

    /// Whether a command of `slot` starting at `offset`, for writer `w`, is
    /// applied on its node already (after a restart).
    fn applied_already(&mut self, w: usize, slot: u16, offset: u64) -> bool {
        let Some(g) = self.grouping.as_mut() else {
            return false;
        };
        let Some(skip) = &g.skip else {
            return false;
        };
        if self.stream.as_ref().is_none_or(|(_, r)| *r != skip.replid) {
            return false;
        }
        if g.floors.len() != self.router.writers.len() {
            g.floors = self
                .router
                .writers
                .iter()
                .map(|h| skip.nodes.get(&h.target).copied().unwrap_or(0))
                .collect();
        }
        let slot_floor = skip.slots.get(slot as usize).copied().unwrap_or(0);
        offset < g.floors.get(w).copied().unwrap_or(0).max(slot_floor)
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
            let b = &mut self.builders[w];
            b.push(Some(MARKER_DB), ExpectKind::TxBegin, |buf| {
                buf.extend_from_slice(MULTI)
            });
            b.wrapped = true;
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
            b.push(db, ExpectKind::TxBegin, |buf| buf.extend_from_slice(MULTI));
            b.wrapped = true;
        }
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

    /// [`Dispatcher::push`] on a cluster target with markers: the command
    /// joins its slot's transaction (a keyless one, its node's first slot's,
    /// alone in its batch); a source transaction's own MULTI/EXEC are left
    /// out (each slot's part is inside one of ours). After a restart, what
    /// the node already applied is not sent again.
    async fn push_grouped(
        &mut self,
        w: usize,
        kind: ExpectKind,
        at: StreamPos,
        slot: Option<u16>,
        encode: impl FnOnce(&mut BytesMut),
    ) -> Result<(), WorkerError> {
        let Some(in_slot) = slot.or_else(|| self.home(w).map(|(h, _)| h)) else {
            // A node serving no slot: nothing to mark there.
            self.builders[w].push(None, kind, encode);
            return Ok(());
        };
        if self.applied_already(w, in_slot, at.offset) {
            return Ok(());
        }
        if self.builders[w].seal_next {
            self.flush_one(w, Some(at)).await?;
        }
        if matches!(kind, ExpectKind::TxBegin | ExpectKind::TxEnd) {
            return Ok(());
        }
        // Outside a source transaction, a keyless command keeps its place:
        // a batch of its own.
        let alone = slot.is_none() && kind != ExpectKind::TxQueued;
        if alone && !self.builders[w].is_empty() {
            self.flush_one(w, Some(at)).await?;
        }
        if self.builders[w].is_empty() {
            if let Some(g) = &mut self.grouping {
                if g.opened.len() <= w {
                    g.opened.resize(w + 1, None);
                }
                g.opened[w] = Some(at);
            }
        }
        let b = &mut self.builders[w];
        b.push_in_slot(in_slot, ExpectKind::TxQueued, encode);
        b.wrapped = true;
        b.seal_next |= alone;
        Ok(())
    }

    /// Cluster exactly-once: the shard's marker key (to put in a slot), or
    /// `None` without slot markers.
    pub(crate) fn slot_marker_base(&self) -> Option<Bytes> {
        self.grouping.as_ref()?;
        Some(self.marking.as_ref()?.key.clone())
    }

    /// Whether slot `slot`'s node already applied what starts at `offset`
    /// (after a restart).
    pub(crate) fn slot_applied(&mut self, slot: u16, offset: u64) -> bool {
        let w = self.router.writer_for_slot(slot);
        self.applied_already(w, slot, offset)
    }

    /// The marker value for the stream position `at`.
    pub(crate) fn applied_value(&self, at: StreamPos) -> Vec<u8> {
        let (Some(marking), Some((epoch, replid))) = (&self.marking, &self.stream) else {
            return Vec::new();
        };
        Marker::Applied {
            epoch: *epoch,
            fresh: marking.fresh,
            replid: replid.clone(),
            offset: at.offset,
            db: at.db,
        }
        .encode()
    }

    fn note_marked(&mut self, w: usize, at: StreamPos) {
        if self.marked.len() <= w {
            self.marked.resize(w + 1, None);
        }
        self.marked[w] = Some((at.offset, Instant::now()));
    }

    /// Seals a cluster batch (see [`Grouping`]). Its node-wide marker says
    /// where the node was for sure before this batch (the end of the last
    /// batch it confirmed): a slot transaction of this batch that does not
    /// run (refused, redirected) must not pass for applied.
    fn seal_grouped(&mut self, w: usize, at: StreamPos) {
        let value = self.applied_value(at);
        // With every earlier batch to the node confirmed, it has all of the
        // stream before this batch's first command.
        let opened = self
            .grouping
            .as_mut()
            .and_then(|g| g.opened.get_mut(w).and_then(Option::take));
        let confirmed = self.stats.confirmed_end(w);
        let floor = match opened.filter(|_| self.stats.link_drained(w)) {
            Some(p) if confirmed.is_none_or(|c| c.offset <= p.offset) => Some(p),
            _ => confirmed,
        }
        .map(|p| self.applied_value(p));
        let home = self.home(w).zip(floor);
        self.note_marked(w, at);
        let (Some(marking), Some(g)) = (&self.marking, &mut self.grouping) else {
            return;
        };
        let base = &marking.key;
        let b = &mut self.builders[w];
        b.group_by_slot(|buf, slot| {
            let key = g.slot_keys[slot as usize]
                .get_or_insert_with(|| engine::marker::in_slot(base, slot).into());
            if !g.marked_slots[slot as usize] {
                g.marked_slots[slot as usize] = true;
                g.n_marked += 1;
            }
            encode::command(buf, &[&b"SET"[..], key, &value]);
        });
        if let Some(((_, key), floor)) = home {
            b.push(None, ExpectKind::Ok, |buf| {
                encode::command(buf, &[&b"SET"[..], &key, &floor])
            });
        }
        let homes = g.homes.iter().filter(|h| h.is_some()).count() as u64;
        self.stats
            .marker_keys
            .store(g.n_marked + homes, std::sync::atomic::Ordering::Relaxed);
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

    /// Ends a wrapped batch: the SET of the shard's marker to `at` (in
    /// the marker's database, the batch's restored after), then EXEC.
    fn seal(&mut self, w: usize, at: Option<StreamPos>) {
        if !self.builders[w].wrapped {
            return;
        }
        if let (Some(_), Some(at)) = (&self.grouping, at) {
            return self.seal_grouped(w, at);
        }
        let b = &mut self.builders[w];
        if let (Some(marking), Some((epoch, replid)), Some(at)) = (&self.marking, &self.stream, at)
        {
            if self.marked.len() <= w {
                self.marked.resize(w + 1, None);
            }
            self.marked[w] = Some((at.offset, Instant::now()));
            let value = Marker::Applied {
                epoch: *epoch,
                fresh: marking.fresh,
                replid: replid.clone(),
                offset: at.offset,
                db: at.db,
            }
            .encode();
            b.default_db(MARKER_DB);
            let db = b.db().unwrap_or(MARKER_DB);
            let select = |buf: &mut BytesMut, db: u32| {
                encode::command(
                    buf,
                    &[&b"SELECT"[..], itoa::Buffer::new().format(db).as_bytes()],
                )
            };
            if db != MARKER_DB {
                b.push(None, ExpectKind::TxQueued, |buf| select(buf, MARKER_DB));
            }
            b.push(None, ExpectKind::TxQueued, |buf| {
                encode::command(buf, &[&b"SET"[..], &marking.key, &value])
            });
            if db != MARKER_DB {
                b.push(None, ExpectKind::TxQueued, |buf| select(buf, db));
            }
        }
        b.push(None, ExpectKind::TxEnd, |buf| buf.extend_from_slice(EXEC));
    }

    /// Whether anything is waiting to be handed over.
    pub fn is_empty(&self) -> bool {
        self.builders.iter().all(BatchBuilder::is_empty)
    }
}

#[cfg(test)]
mod tests {
    //! What the dispatcher hands a writer, with and without markers.

    use super::*;
    use crate::Endpoint;

    const MARKER: &[u8] = b"shardsync:applied:t:src:1";

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

    fn pos(offset: u64) -> Option<StreamPos> {
        Some(StreamPos { offset, db: 5 })
    }

    /// Each command of a batch with its expected reply, one line each.
    fn lines(b: &Batch) -> Vec<String> {
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
        assert_eq!(rx.try_recv().unwrap().len(), 4, "the SET's batch");
        assert!(rx.try_recv().is_err(), "no marker-only batch after it");
    }

    /// A dispatcher for a two-node cluster target (slots below 8192 on
    /// writer 0, the rest on writer 1), with markers.
    fn cluster_dispatcher() -> (Dispatcher, Vec<mpsc::Receiver<Batch>>, Arc<ShardStats>) {
        let dir = std::env::temp_dir().join(format!("shardsync-dispatch-c-{}", std::process::id()));
        let mut handles = Vec::new();
        let mut rxs = Vec::new();
        for i in 0..2 {
            let stats = Arc::new(WriterStats::new(format!("n:{i}")));
            let (tx, rx) = mpsc::channel(64);
            let (redirect, _) = mpsc::unbounded_channel();
            handles.push(WriterHandle {
                index: i,
                target: format!("n:{i}"),
                endpoint: Endpoint::new("127.0.0.1", 1),
                tx,
                redirect,
                overflow: Arc::new(Overflow::new(
                    &dir,
                    &format!("n:{i}"),
                    1 << 20,
                    stats.clone(),
                )),
                stats,
            });
            rxs.push(rx);
        }
        let (spawn, _) = mpsc::channel(1);
        let routing = Arc::new(ClusterRouting::new(
            |slot| usize::from(slot >= 8192),
            &handles,
            spawn,
        ));
        let shard = Arc::new(ShardStats::new("src:1", 2));
        let mut d = Dispatcher::new(0, Router::cluster(routing), shard.clone());
        d.set_marking(Marking {
            key: Bytes::from_static(MARKER),
            fresh: true,
            flush_dbs: None,
            sweep: None,
        });
        d.set_stream(2, "r");
        (d, rxs, shard)
    }

    async fn push_slot(d: &mut Dispatcher, w: usize, kind: ExpectKind, at: u64, args: &[&str]) {
        let slot = (args.len() > 1).then(|| engine::slot::slot(args[1].as_bytes()));
        d.push(w, None, kind, pos(at), slot, |buf| {
            encode::command(buf, args)
        })
        .await
        .unwrap();
    }

    fn tag(slot: u16) -> String {
        engine::split::slot_tag(slot)
    }

    #[tokio::test]
    async fn a_cluster_batch_is_one_transaction_per_slot_then_the_node_marker() {
        let (mut d, mut rxs, shard) = cluster_dispatcher();
        let low: Vec<String> = (0..)
            .map(|i| format!("{{k{i}}}v"))
            .filter(|k| engine::slot::slot(k.as_bytes()) < 8192)
            .take(2)
            .collect();
        let (a, b) = (low[0].as_str(), low[1].as_str());
        let (sa, sb) = (
            engine::slot::slot(a.as_bytes()),
            engine::slot::slot(b.as_bytes()),
        );
        assert_ne!(sa, sb);
        push_slot(&mut d, 0, ExpectKind::Ok, 10, &["INCR", a]).await;
        push_slot(&mut d, 0, ExpectKind::Ok, 20, &["LPUSH", b, "v"]).await;
        // A source transaction: its MULTI/EXEC are left out, its commands
        // join their slots' transactions.
        push_slot(&mut d, 0, ExpectKind::TxBegin, 30, &["MULTI"]).await;
        push_slot(&mut d, 0, ExpectKind::TxQueued, 30, &["APPEND", a, "z"]).await;
        push_slot(&mut d, 0, ExpectKind::TxEnd, 30, &["EXEC"]).await;
        // The node confirmed an earlier batch, ending at 5.
        shard.note_dispatched(0);
        shard.note_confirmed(0, pos(5));
        d.flush_all(pos(40)).await.unwrap();
        let batch = rxs[0].try_recv().unwrap();
        assert!(batch.wrapped);
        let (first, second) = if sa < sb { (a, b) } else { (b, a) };
        let cmds = |key: &str| -> Vec<String> {
            if key == a {
                vec![
                    format!("TxQueued INCR {a}"),
                    format!("TxQueued APPEND {a} z"),
                ]
            } else {
                vec![format!("TxQueued LPUSH {b} v")]
            }
        };
        let mut want = Vec::new();
        for key in [first, second] {
            let slot = engine::slot::slot(key.as_bytes());
            want.push("TxBegin MULTI".to_string());
            want.extend(cmds(key));
            want.push(format!(
                "TxQueued SET {{{}}}shardsync:applied:t:src:1 1 2 f r 40 5",
                tag(slot)
            ));
            want.push("TxEnd EXEC".to_string());
        }
        want.push(format!(
            "Ok SET {{{}}}shardsync:applied:t:src:1:node 1 2 f r 10 5",
            tag(0)
        ));
        assert_eq!(
            lines(&batch),
            want,
            "every earlier batch confirmed: the node has all before this one's first command"
        );
        assert_eq!(
            crate::write::marked_transactions(&batch)
                .iter()
                .map(|(at, _)| *at)
                .collect::<Vec<_>>(),
            [0, if first == a { 5 } else { 4 }],
            "where each slot transaction begins"
        );
        assert!(rxs[1].try_recv().is_err(), "nothing for the other node");
        // That batch is not confirmed yet: the next one's node marker says
        // only what was.
        push_slot(&mut d, 0, ExpectKind::Ok, 50, &["INCR", a]).await;
        d.flush_all(pos(60)).await.unwrap();
        let next = lines(&rxs[0].try_recv().unwrap());
        assert_eq!(
            next.last().unwrap(),
            &format!(
                "Ok SET {{{}}}shardsync:applied:t:src:1:node 1 2 f r 5 5",
                tag(0)
            )
        );
    }

    #[tokio::test]
    async fn a_keyless_command_keeps_its_place_alone_in_its_batch() {
        let (mut d, mut rxs, _) = cluster_dispatcher();
        push_slot(&mut d, 0, ExpectKind::Ok, 10, &["SET", "{x}a", "1"]).await;
        push_slot(&mut d, 0, ExpectKind::Ok, 20, &["FLUSHALL"]).await;
        push_slot(&mut d, 0, ExpectKind::Ok, 30, &["SET", "{x}a", "2"]).await;
        d.flush_all(pos(40)).await.unwrap();
        let batches: Vec<Vec<String>> = std::iter::from_fn(|| rxs[0].try_recv().ok())
            .map(|b| {
                lines(&b)
                    .into_iter()
                    .filter(|l| !l.contains("shardsync:"))
                    .collect()
            })
            .collect();
        assert_eq!(
            batches,
            [
                vec!["TxBegin MULTI", "TxQueued SET {x}a 1", "TxEnd EXEC"],
                vec!["TxBegin MULTI", "TxQueued FLUSHALL", "TxEnd EXEC"],
                vec!["TxBegin MULTI", "TxQueued SET {x}a 2", "TxEnd EXEC"],
            ]
        );
    }

    #[tokio::test]
    async fn after_a_restart_what_a_node_or_slot_applied_is_not_sent_again() {
        let (mut d, mut rxs, _) = cluster_dispatcher();
        let ahead = engine::slot::slot(b"{x}a");
        let mut slots = vec![0; engine::slot::SLOTS as usize];
        slots[ahead as usize] = 25;
        d.set_skip(Skip {
            replid: "r".into(),
            nodes: [("n:0".to_string(), 15), ("n:1".to_string(), 0)].into(),
            slots,
        });
        push_slot(
            &mut d,
            0,
            ExpectKind::Ok,
            10,
            &["SET", "{y}b", "before the node's marker"],
        )
        .await;
        push_slot(&mut d, 0, ExpectKind::Ok, 20, &["SET", "{y}b", "after it"]).await;
        push_slot(&mut d, 0, ExpectKind::Ok, 20, &["INCR", "{x}a"]).await;
        push_slot(&mut d, 0, ExpectKind::Ok, 30, &["INCR", "{x}a"]).await;
        let other = (0..)
            .map(|i| format!("k{i}"))
            .find(|k| engine::slot::slot(k.as_bytes()) >= 8192)
            .unwrap();
        push_slot(&mut d, 1, ExpectKind::Ok, 10, &["SET", &other, "1"]).await;
        d.flush_all(pos(40)).await.unwrap();
        let sent = |rx: &mut mpsc::Receiver<Batch>| -> Vec<String> {
            lines(&rx.try_recv().unwrap())
                .into_iter()
                .filter(|l| {
                    !l.contains("shardsync:") && !l.contains("MULTI") && !l.contains("EXEC")
                })
                .collect()
        };
        let mut node0 = sent(&mut rxs[0]);
        node0.sort();
        assert_eq!(node0, ["TxQueued INCR {x}a", "TxQueued SET {y}b after it"]);
        assert_eq!(sent(&mut rxs[1]), [format!("TxQueued SET {other} 1")]);
        // A stream of another history (a full resync) skips nothing.
        d.set_stream(3, "other");
        push_slot(&mut d, 0, ExpectKind::Ok, 10, &["SET", "{y}b", "x"]).await;
        d.flush_all(pos(11)).await.unwrap();
        assert_eq!(sent(&mut rxs[0]), ["TxQueued SET {y}b x"]);
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
