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

use bytes::BytesMut;
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

/// Builds and hands over batches for one shard.
pub struct Dispatcher {
    shard: usize,
    router: Router,
    builders: Vec<BatchBuilder>,
    stats: Arc<ShardStats>,
}

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
        }
    }

    pub fn router(&self) -> &Router {
        &self.router
    }

    /// Takes the current cluster map. Everything built so far must have
    /// been handed over (the caller flushes and waits first).
    pub fn refresh(&mut self) {
        debug_assert!(self.is_empty());
        self.router.refresh();
        while self.builders.len() < self.router.n_writers() {
            self.builders.push(BatchBuilder::default());
        }
    }

    /// Appends a command for writer `w`, to run in target database `db`.
    /// Hands the batch over first when the database changes. `at` is the
    /// stream position after the commands already in the batch (`None`
    /// during a full sync).
    pub async fn push(
        &mut self,
        w: usize,
        db: Option<u32>,
        kind: ExpectKind,
        at: Option<StreamPos>,
        encode: impl FnOnce(&mut BytesMut),
    ) -> Result<(), WorkerError> {
        if !self.builders[w].accepts_db(db) {
            self.flush_one(w, at).await?;
        }
        self.builders[w].push(db, kind, encode);
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

    /// Whether anything is waiting to be handed over.
    pub fn is_empty(&self) -> bool {
        self.builders.iter().all(BatchBuilder::is_empty)
    }
}
