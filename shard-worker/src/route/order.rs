//! The order guard's bookkeeping. Batches are pipelined: when a
//! transaction of ours is refused by an error that comes and goes
//! (CLUSTERDOWN, LOADING, BUSY, OOM), a later transaction of the same slot,
//! already on the wire, may run a moment later, ahead of it. So a
//! transaction whose predecessor (the last transaction that set the same
//! marker) may still be in flight goes out behind an *order guard*:
//! `WATCH <marker>` and a script that writes the marker unless it holds
//! the value the predecessor sets (`engine::marker::GUARD_SCRIPT`), so its
//! EXEC discards it unless the predecessor ran.
//!
//! [`Order`] remembers, per writer, the batches of a shard not yet known to
//! be confirmed (with the marker value they set) and, on a cluster target,
//! which batch last carried each slot's transaction. It lives in the
//! shard's stats so that it outlives a restarted shard worker while the
//! writers still hold its batches.

use std::collections::VecDeque;

use bytes::Bytes;

/// What a transaction about to be sealed must wait for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pred {
    /// The slot whose marker to watch (cluster: the transaction's own, or
    /// the slot of a keyless batch after which every slot's markers may be
    /// gone); `None` on a standalone target (the shard's one marker).
    pub slot: Option<u16>,
    /// The value that marker holds once the predecessor ran.
    pub value: Bytes,
}

/// See the module documentation.
#[derive(Default, Debug)]
pub struct Order {
    /// Per writer: (sequence number, marker value) of this shard's batches
    /// that set markers, oldest first, until their confirmation is seen.
    pending: Vec<VecDeque<(u64, Bytes)>>,
    /// Cluster targets: per slot, (writer + 1, sequence number) of the last
    /// batch that carried a transaction of it (0: none).
    slots: Vec<(u32, u64)>,
    /// Per writer: the last keyless batch (sequence number, its slot). A
    /// FLUSHALL in it deletes every marker on the node but its own.
    barriers: Vec<Option<(u64, u16)>>,
}

impl Order {
    /// Forgets what writer `w` confirmed: every batch up to sequence number
    /// `confirmed`.
    pub fn prune(&mut self, w: usize, confirmed: u64) {
        if let Some(p) = self.pending.get_mut(w) {
            while p.front().is_some_and(|(seq, _)| *seq <= confirmed) {
                p.pop_front();
            }
        }
    }

    /// Forgets everything: what is in flight sets markers that a full sync
    /// is about to replace.
    pub fn clear(&mut self) {
        *self = Order::default();
    }

    fn value(&self, w: usize, seq: u64) -> Option<&Bytes> {
        let p = self.pending.get(w)?;
        let i = p.binary_search_by_key(&seq, |(s, _)| *s).ok()?;
        Some(&p[i].1)
    }

    /// Standalone target: what the next batch to writer `w` waits for (the
    /// last one, while it is not confirmed).
    pub fn before_batch(&self, w: usize) -> Option<Pred> {
        let (_, value) = self.pending.get(w)?.back()?;
        Some(Pred {
            slot: None,
            value: value.clone(),
        })
    }

    /// Cluster target: what the next transaction of `slot` to writer `w`
    /// waits for.
    pub fn before_slot(&self, w: usize, slot: u16) -> Option<Pred> {
        let (writer, seq) = self.slots.get(slot as usize).copied().unwrap_or((0, 0));
        let barrier = self.barriers.get(w).copied().flatten();
        // The later of the slot's own last transaction and the node's
        // last keyless batch, if it is still in flight to this writer (a
        // transaction sent to another node cannot be waited for here).
        let (seq, watch) = match barrier {
            Some((b, home)) if writer != w as u32 + 1 || b > seq => (b, home),
            _ if writer == w as u32 + 1 => (seq, slot),
            _ => return None,
        };
        let value = self.value(w, seq)?.clone();
        Some(Pred {
            slot: Some(watch),
            value,
        })
    }

    /// Batch `seq` to writer `w` sets its markers to `value`.
    pub fn note_batch(&mut self, w: usize, seq: u64, value: Bytes) {
        if self.pending.len() <= w {
            self.pending.resize_with(w + 1, VecDeque::new);
        }
        self.pending[w].push_back((seq, value));
    }

    /// Batch `seq` to writer `w` carries a transaction of `slot`.
    pub fn note_slot(&mut self, w: usize, slot: u16, seq: u64) {
        if self.slots.is_empty() {
            self.slots = vec![(0, 0); engine::slot::SLOTS as usize];
        }
        self.slots[slot as usize] = (w as u32 + 1, seq);
    }

    /// Batch `seq` to writer `w` is a keyless one, in `slot`'s transaction.
    pub fn note_barrier(&mut self, w: usize, seq: u64, slot: u16) {
        if self.barriers.len() <= w {
            self.barriers.resize(w + 1, None);
        }
        self.barriers[w] = Some((seq, slot));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> Bytes {
        Bytes::copy_from_slice(s.as_bytes())
    }

    #[test]
    fn a_standalone_batch_waits_for_the_last_unconfirmed_one() {
        let mut o = Order::default();
        assert_eq!(o.before_batch(0), None, "nothing sent yet");
        o.note_batch(0, 1, v("m1"));
        o.note_batch(0, 2, v("m2"));
        assert_eq!(o.before_batch(0).map(|p| p.value), Some(v("m2")));
        assert_eq!(o.before_batch(1), None, "another writer");
        o.prune(0, 1);
        assert_eq!(o.before_batch(0).map(|p| p.value), Some(v("m2")));
        o.prune(0, 2);
        assert_eq!(o.before_batch(0), None, "confirmed: nothing to wait for");
    }

    #[test]
    fn a_slot_waits_for_its_own_last_transaction_on_the_same_node() {
        let mut o = Order::default();
        o.note_batch(0, 1, v("a"));
        o.note_slot(0, 7, 1);
        o.note_batch(0, 2, v("b"));
        o.note_slot(0, 9, 2);
        let pred = |o: &Order, w, s| o.before_slot(w, s);
        assert_eq!(
            pred(&o, 0, 7),
            Some(Pred {
                slot: Some(7),
                value: v("a")
            })
        );
        assert_eq!(pred(&o, 0, 9).map(|p| p.value), Some(v("b")));
        assert_eq!(pred(&o, 0, 8), None, "a slot never sent");
        assert_eq!(pred(&o, 1, 7), None, "sent to another node (moved)");
        o.prune(0, 1);
        assert_eq!(pred(&o, 0, 7), None, "confirmed");
        assert!(pred(&o, 0, 9).is_some());
    }

    #[test]
    fn after_a_keyless_batch_every_slot_waits_for_it() {
        let mut o = Order::default();
        o.note_batch(0, 1, v("a"));
        o.note_slot(0, 7, 1);
        // FLUSHALL in the transaction of slot 0, the node's first.
        o.note_batch(0, 2, v("f"));
        o.note_slot(0, 0, 2);
        o.note_barrier(0, 2, 0);
        let want = Some(Pred {
            slot: Some(0),
            value: v("f"),
        });
        assert_eq!(o.before_slot(0, 7), want);
        assert_eq!(o.before_slot(0, 300), want, "a slot never sent");
        // A later transaction of slot 7 is what its next one waits for.
        o.note_batch(0, 3, v("c"));
        o.note_slot(0, 7, 3);
        assert_eq!(
            o.before_slot(0, 7).map(|p| (p.slot, p.value)),
            Some((Some(7), v("c")))
        );
        o.prune(0, 2);
        assert_eq!(
            o.before_slot(0, 300),
            None,
            "the keyless batch is confirmed"
        );
        o.clear();
        assert_eq!(o.before_slot(0, 7), None);
    }
}
