//! The slot map of a cluster target, shared by every shard's dispatcher
//! (which routes by it) and every writer (which corrects it on MOVED).
//!
//! Reads are lock-free (one atomic per slot). Every change bumps a
//! generation counter; a dispatcher that sees a new generation first waits
//! until everything it dispatched under the old map is confirmed (see
//! `Intake::follow_map`), so commands for a slot that moved are never
//! reordered across the two writers involved.
//!
//! The map keeps only *weak* handles on the writers' queues: a task drains
//! by dropping every producer's handle so that each queue closes, and the
//! writers themselves hold the map.

use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use engine::slot::SLOTS;
use tokio::sync::{mpsc, oneshot};

use super::{Batch, Overflow, Redirected, WriterHandle};
use crate::endpoint::Endpoint;
use crate::progress::WriterStats;

/// A request to the supervisor: start a writer for a node the map does not
/// know yet (a master added to the target cluster during the sync).
pub struct NodeRequest {
    pub host: String,
    pub port: u16,
    pub reply: oneshot::Sender<Option<WriterHandle>>,
}

/// What the map knows of a writer.
struct Entry {
    target: String,
    endpoint: Endpoint,
    tx: mpsc::WeakSender<Batch>,
    redirect: mpsc::UnboundedSender<Redirected>,
    overflow: Arc<Overflow>,
    stats: Arc<WriterStats>,
}

impl Entry {
    fn of(h: &WriterHandle) -> Entry {
        Entry {
            target: h.target.clone(),
            endpoint: h.endpoint.clone(),
            tx: h.tx.downgrade(),
            redirect: h.redirect.clone(),
            overflow: h.overflow.clone(),
            stats: h.stats.clone(),
        }
    }
}

pub struct ClusterRouting {
    slots: Box<[AtomicU16]>,
    writers: RwLock<Vec<Entry>>,
    generation: AtomicU64,
    spawn: mpsc::Sender<NodeRequest>,
}

impl ClusterRouting {
    /// `owner(slot)` gives the index in `writers` of each slot's master.
    pub fn new(
        owner: impl Fn(u16) -> usize,
        writers: &[WriterHandle],
        spawn: mpsc::Sender<NodeRequest>,
    ) -> ClusterRouting {
        ClusterRouting {
            slots: (0..SLOTS)
                .map(|s| AtomicU16::new(owner(s) as u16))
                .collect(),
            writers: RwLock::new(writers.iter().map(Entry::of).collect()),
            generation: AtomicU64::new(0),
            spawn,
        }
    }

    pub fn writer_for_slot(&self, slot: u16) -> usize {
        self.slots[slot as usize].load(Ordering::Acquire) as usize
    }

    /// The first slot writer `w`'s node serves (where its node-wide marker
    /// lives), if any.
    pub fn home_slot(&self, w: usize) -> Option<u16> {
        (0..SLOTS).find(|&s| self.writer_for_slot(s) == w)
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Handles on every writer, for a producer. A writer whose queue has
    /// already closed (the task is draining) gets a closed queue: handing
    /// it a batch fails, as it should.
    pub fn writers(&self) -> Vec<WriterHandle> {
        self.writers
            .read()
            .expect("writers lock")
            .iter()
            .enumerate()
            .map(|(index, e)| WriterHandle {
                index,
                target: e.target.clone(),
                endpoint: e.endpoint.clone(),
                tx: e.tx.upgrade().unwrap_or_else(|| mpsc::channel(1).0),
                redirect: e.redirect.clone(),
                overflow: e.overflow.clone(),
                stats: e.stats.clone(),
            })
            .collect()
    }

    /// `host:port` and redirect lane of writer `w`.
    pub fn redirect_lane(&self, w: usize) -> Option<(String, mpsc::UnboundedSender<Redirected>)> {
        let writers = self.writers.read().expect("writers lock");
        writers
            .get(w)
            .map(|e| (e.target.clone(), e.redirect.clone()))
    }

    /// Address and credentials of writer `w`'s node.
    pub fn endpoint(&self, w: usize) -> Option<Endpoint> {
        let writers = self.writers.read().expect("writers lock");
        writers.get(w).map(|e| e.endpoint.clone())
    }

    /// The writer of `host:port`, if there is one.
    pub fn find(&self, addr: &str) -> Option<usize> {
        self.writers
            .read()
            .expect("writers lock")
            .iter()
            .position(|e| e.target == addr)
    }

    /// Records that `slot` is served by writer `w` now.
    pub fn move_slot(&self, slot: u16, w: usize) {
        let old = self.slots[slot as usize].swap(w as u16, Ordering::AcqRel);
        if old != w as u16 {
            self.generation.fetch_add(1, Ordering::AcqRel);
            tracing::debug!(slot, writer = w, "target slot moved; following it");
        }
    }

    /// The writer for `host:port`, asking the supervisor to start one for a
    /// node not seen before. `None` when no writer can be had (the task is
    /// stopping, or the writer limit is reached).
    pub async fn writer_for_node(&self, host: &str, port: u16) -> Option<usize> {
        let addr = crate::endpoint::addr_of(host, port);
        if let Some(w) = self.find(&addr) {
            return Some(w);
        }
        let (reply, answer) = oneshot::channel();
        self.spawn
            .send(NodeRequest {
                host: host.to_string(),
                port,
                reply,
            })
            .await
            .ok()?;
        let handle = answer.await.ok()??;
        Some(handle.index)
    }

    /// Adds a writer (the supervisor does, one request at a time, so the
    /// index it chose is the position). Returns the existing index if the
    /// node already has a writer.
    pub fn add_writer(&self, handle: &WriterHandle) -> usize {
        let mut writers = self.writers.write().expect("writers lock");
        if let Some(w) = writers.iter().position(|e| e.target == handle.target) {
            return w;
        }
        let w = writers.len();
        writers.push(Entry::of(handle));
        drop(writers);
        self.generation.fetch_add(1, Ordering::AcqRel);
        w
    }

    /// The index the next added writer will get.
    pub fn next_index(&self) -> usize {
        self.writers.read().expect("writers lock").len()
    }
}
