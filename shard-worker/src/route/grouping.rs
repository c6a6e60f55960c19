//! Exactly-once on a cluster target: a batch to a node becomes one
//! transaction per slot, with that slot's marker, and the shard's
//! node-wide marker after them (see [`Grouping`]); after a restart, what
//! the nodes and slots already applied is not sent again ([`Skip`]).

use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use engine::marker::Marker;
use engine::resp::encode;

use super::batch::SlotMark;
use super::{Dispatcher, ExpectKind, Topology};
use crate::error::WorkerError;
use crate::progress::StreamPos;

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

/// Cluster exactly-once: a transaction must stay in one slot, so a batch
/// to a node becomes one transaction per slot, each with the SET of that
/// slot's marker (`{tag}<marker>`), followed by the SET of the shard's
/// node-wide marker (`{tag of the node's first slot}<marker>:node`), which
/// names only what the node has for sure: the end of the last batch it
/// confirmed, or where this one begins when nothing is in flight to it. A
/// keyless command (FLUSHALL, FUNCTION LOAD) is a batch of its own, in the
/// transaction of the node's first slot.
pub(super) struct Grouping {
    /// Marker names per slot, built on first use.
    pub(super) slot_keys: Vec<Option<Bytes>>,
    /// Per writer: its node's first slot and node-wide marker name.
    pub(super) homes: Vec<Option<(u16, Bytes)>>,
    /// Slots that hold a marker of this shard (for `/status`).
    pub(super) marked_slots: Vec<bool>,
    pub(super) n_marked: u64,
    /// After a restart: what the nodes already applied.
    pub(super) skip: Option<Skip>,
    /// Per writer, the node-wide floor from `skip`.
    pub(super) floors: Vec<u64>,
    /// Per writer, where the batch being built begins (the position before
    /// its first command).
    pub(super) opened: Vec<Option<StreamPos>>,
}

/// On a cluster target, a node's marker moves this often on a quiet
/// stream (one SET per node): it is what a restart resumes from.
pub const NODE_MARKER_REFRESH: Duration = Duration::from_secs(1);

impl Dispatcher {
    /// Cluster exactly-once: what the target's nodes already applied (read
    /// from their markers by the precheck).
    pub fn set_skip(&mut self, skip: Skip) {
        if let Some(g) = &mut self.grouping {
            g.skip = Some(skip);
            g.floors.clear();
        }
    }

    /// Writer `w`'s home slot and node-wide marker name.
    pub(super) fn home(&mut self, w: usize) -> Option<(u16, Bytes)> {
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
    pub(super) fn applied_already(&mut self, w: usize, slot: u16, offset: u64) -> bool {
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

    /// [`Dispatcher::push`] on a cluster target with markers: the command
    /// joins its slot's transaction (a keyless one, its node's first slot's,
    /// alone in its batch); a source transaction's own MULTI/EXEC are left
    /// out (each slot's part is inside one of ours). After a restart, what
    /// the node already applied is not sent again.
    pub(super) async fn push_grouped(
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

    pub(super) fn note_marked(&mut self, w: usize, at: StreamPos) {
        if self.marked.len() <= w {
            self.marked.resize(w + 1, None);
        }
        self.marked[w] = Some((at.offset, Instant::now()));
    }

    /// Seals a cluster batch (see [`Grouping`]). Its node-wide marker says
    /// where the node was for sure before this batch (the end of the last
    /// batch it confirmed): a slot transaction of this batch that does not
    /// run (refused, redirected) must not pass for applied.
    pub(super) fn seal_grouped(&mut self, w: usize, at: StreamPos) {
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
        // This batch is the next one handed to the writer (see `order.rs`).
        let (dispatched, confirmed) = self.stats.link_seqs(w);
        let seq = dispatched + 1;
        let mut order = self.stats.order.lock().expect("order lock");
        order.prune(w, confirmed);
        let keyless = b.seal_next;
        let mut key_of = |slot: u16| -> Bytes {
            g.slot_keys[slot as usize]
                .get_or_insert_with(|| engine::marker::in_slot(base, slot).into())
                .clone()
        };
        // Noted first: a slot later in this batch may wait for an earlier
        // one of it (after a keyless batch, its first slot's).
        order.note_batch(w, seq, value.clone().into());
        let mut first = None;
        b.group_by_slot(&value, |slot| {
            first.get_or_insert(slot);
            let guard = order
                .before_slot(w, slot)
                .map(|pred| (key_of(pred.slot.unwrap_or(slot)), pred.value));
            order.note_slot(w, slot, seq);
            if !g.marked_slots[slot as usize] {
                g.marked_slots[slot as usize] = true;
                g.n_marked += 1;
            }
            SlotMark {
                key: key_of(slot),
                guard,
            }
        });
        if let (true, Some(slot)) = (keyless, first) {
            order.note_barrier(w, seq, slot);
        }
        drop(order);
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
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use bytes::Bytes;
    use engine::resp::encode;
    use tokio::sync::mpsc;

    use super::*;
    use crate::progress::{ShardStats, WriterStats};
    use crate::route::tests::{lines, pos, MARKER};
    use crate::route::{Batch, ClusterRouting, Marking, Overflow, Router, WriterHandle};
    use crate::Endpoint;

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
    async fn a_slot_transaction_waits_for_the_slots_last_one_still_in_flight() {
        let (mut d, mut rxs, shard) = cluster_dispatcher();
        let guards = |b: &Batch| -> Vec<String> {
            lines(b)
                .into_iter()
                .filter(|l| l.starts_with("TxGuard"))
                .map(|l| l.replace(engine::marker::GUARD_SCRIPT, "<guard>"))
                .collect()
        };
        let x = tag(engine::slot::slot(b"{x}"));
        let home = tag(0);
        push_slot(&mut d, 0, ExpectKind::Ok, 10, &["INCR", "{x}a"]).await;
        d.flush_all(pos(20)).await.unwrap();
        let first = rxs[0].try_recv().unwrap();
        assert!(guards(&first).is_empty(), "nothing in flight before it");
        // {x} again and {y}, first seen: only {x} waits (for the first batch).
        push_slot(&mut d, 0, ExpectKind::Ok, 20, &["INCR", "{x}a"]).await;
        push_slot(&mut d, 0, ExpectKind::Ok, 20, &["INCR", "{y}b"]).await;
        d.flush_all(pos(30)).await.unwrap();
        assert_eq!(
            guards(&rxs[0].try_recv().unwrap()),
            [
                format!("TxGuard WATCH {{{x}}}shardsync:applied:t:src:1"),
                format!("TxGuard EVAL <guard> 1 {{{x}}}shardsync:applied:t:src:1 1 2 f r 20 5"),
            ]
        );
        // A FLUSHALL deletes every marker on the node but its own (the
        // node's first slot's): after it, every slot waits for it.
        push_slot(&mut d, 0, ExpectKind::Ok, 30, &["FLUSHALL"]).await;
        push_slot(&mut d, 0, ExpectKind::Ok, 40, &["INCR", "{z}c"]).await;
        d.flush_all(pos(50)).await.unwrap();
        let flush = rxs[0].try_recv().unwrap();
        assert!(guards(&flush).is_empty(), "its slot was never sent");
        assert_eq!(
            guards(&rxs[0].try_recv().unwrap()),
            [
                format!("TxGuard WATCH {{{home}}}shardsync:applied:t:src:1"),
                format!("TxGuard EVAL <guard> 1 {{{home}}}shardsync:applied:t:src:1 1 2 f r 40 5"),
            ]
        );
        // Everything confirmed: nothing to wait for.
        for _ in 0..4 {
            shard.note_confirmed(0, pos(50));
        }
        push_slot(&mut d, 0, ExpectKind::Ok, 50, &["INCR", "{x}a"]).await;
        d.flush_all(pos(60)).await.unwrap();
        assert!(guards(&rxs[0].try_recv().unwrap()).is_empty());
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
}
