//! Batches: the unit that travels from a shard's intake to a writer.
//!
//! A batch is a run of RESP-encoded commands for one writer, all to run in
//! one target database, with what each reply should look like. Building
//! commands straight into one buffer means no allocation per command and
//! one socket write per batch.

use bytes::{Bytes, BytesMut};
use engine::resp::encode;

use crate::progress::StreamPos;

pub use engine::replay::ExpectKind;

/// One command's place in a batch and what its reply should be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Expect {
    /// Byte offset of the command in the batch payload.
    pub start: u32,
    pub kind: ExpectKind,
}

/// Commands for one writer.
#[derive(Clone, Debug)]
pub struct Batch {
    /// Index of the shard the commands came from.
    pub shard: usize,
    /// Target database the commands run in; `None` when it does not matter
    /// (a cluster target has only db 0, functions are global).
    pub db: Option<u32>,
    pub payload: Bytes,
    pub replies: Vec<Expect>,
    /// Stream position after the last command. `None` for full-sync
    /// batches, which make nothing resumable by themselves.
    pub end: Option<StreamPos>,
    /// The batch is one transaction of ours: `MULTI`, its commands, the
    /// SET of its shard's marker, `EXEC` (exactly-once): it runs whole or
    /// not at all, and the marker says which.
    pub wrapped: bool,
}

impl Batch {
    pub fn len(&self) -> usize {
        self.replies.len()
    }

    pub fn is_empty(&self) -> bool {
        self.replies.is_empty()
    }

    /// The commands from reply `k` on, as a batch of their own (for resending
    /// after a connection loss). A cut inside a transaction moves back to
    /// its `MULTI`, and to the order guard before it: a transaction whose
    /// EXEC reply was not seen either ran whole or not at all, so it is
    /// resent whole.
    pub fn tail_from(&self, k: usize) -> Batch {
        let mut k = k.min(self.replies.len());
        if let Some(open) = self.replies[..k]
            .iter()
            .rposition(|e| matches!(e.kind, ExpectKind::TxBegin | ExpectKind::TxEnd))
        {
            if self.replies[open].kind == ExpectKind::TxBegin {
                k = open;
            }
        }
        while k > 0 && self.replies[k - 1].kind == ExpectKind::TxGuard {
            k -= 1;
        }
        let cut = self
            .replies
            .get(k)
            .map_or(self.payload.len(), |e| e.start as usize);
        Batch {
            shard: self.shard,
            db: self.db,
            payload: self.payload.slice(cut..),
            replies: self.replies[k..]
                .iter()
                .map(|e| Expect {
                    start: e.start - cut as u32,
                    kind: e.kind,
                })
                .collect(),
            end: self.end,
            // From one of our MULTIs (or its guard) on, the rest is still ours.
            wrapped: self.wrapped
                && self
                    .replies
                    .get(k)
                    .is_some_and(|e| matches!(e.kind, ExpectKind::TxBegin | ExpectKind::TxGuard)),
        }
    }

    /// The encoded command at reply index `i`.
    pub fn command_bytes(&self, i: usize) -> &[u8] {
        let start = self.replies[i].start as usize;
        let end = self
            .replies
            .get(i + 1)
            .map_or(self.payload.len(), |e| e.start as usize);
        &self.payload[start..end]
    }
}

/// A slot transaction's marker, and the order guard it goes out behind
/// (the marker to watch and the value it must hold), if any.
pub struct SlotMark {
    pub key: Bytes,
    pub guard: Option<(Bytes, Bytes)>,
}

/// Accumulates one writer's next batch.
pub struct BatchBuilder {
    db: Option<u32>,
    buf: BytesMut,
    replies: Vec<Expect>,
    /// The batch being built is one of our transactions (see
    /// [`Batch::wrapped`]).
    pub(crate) wrapped: bool,
    /// Cluster exactly-once: the slot of each command (parallel to
    /// `replies`), to group them into one transaction per slot.
    slots: Vec<u16>,
    /// The batch holds a keyless command that must not be reordered with
    /// what follows: hand it over before the next command joins.
    pub(crate) seal_next: bool,
}

/// Room a batch is built in: a full batch (`FLUSH_BYTES`) plus its last
/// command fits without the buffer being regrown (and copied) midway.
const BUILD_ROOM: usize = super::FLUSH_BYTES + 64 * 1024;

impl Default for BatchBuilder {
    fn default() -> Self {
        BatchBuilder {
            db: None,
            buf: BytesMut::with_capacity(BUILD_ROOM),
            replies: Vec::new(),
            wrapped: false,
            slots: Vec::new(),
            seal_next: false,
        }
    }
}

impl BatchBuilder {
    pub fn is_empty(&self) -> bool {
        self.replies.is_empty()
    }

    pub fn bytes(&self) -> usize {
        self.buf.len()
    }

    pub fn commands(&self) -> usize {
        self.replies.len()
    }

    /// The database the batch runs in, if one is set.
    pub fn db(&self) -> Option<u32> {
        self.db
    }

    /// Sets the database of a batch whose commands do not name one.
    pub fn default_db(&mut self, db: u32) {
        self.db.get_or_insert(db);
    }

    /// Whether a command for database `db` can join this batch.
    pub fn accepts_db(&self, db: Option<u32>) -> bool {
        self.is_empty() || db.is_none() || self.db.is_none() || self.db == db
    }

    /// Appends one command written by `encode`.
    pub fn push(&mut self, db: Option<u32>, kind: ExpectKind, encode: impl FnOnce(&mut BytesMut)) {
        debug_assert!(self.accepts_db(db));
        if db.is_some() {
            self.db = db;
        }
        self.replies.push(Expect {
            start: self.buf.len() as u32,
            kind,
        });
        encode(&mut self.buf);
    }

    /// Appends a command of slot `slot` (cluster exactly-once: grouped by
    /// slot when the batch is sealed, see [`BatchBuilder::group_by_slot`]).
    pub fn push_in_slot(
        &mut self,
        slot: u16,
        kind: ExpectKind,
        encode: impl FnOnce(&mut BytesMut),
    ) {
        self.slots.push(slot);
        self.push(None, kind, encode);
    }

    /// Cluster exactly-once: rewrites the batch as one transaction per
    /// slot — `MULTI`, the slot's commands in their order, the SET of the
    /// slot's marker to `value`, `EXEC` — slots in ascending order.
    /// Commands of different slots touch different keys, so their relative
    /// order does not matter. `mark(slot)` names the slot's marker and, when
    /// the transaction must wait for an earlier one, the marker and value of
    /// its order guard (sent before its MULTI, see `order.rs`).
    pub fn group_by_slot(&mut self, value: &[u8], mut mark: impl FnMut(u16) -> SlotMark) {
        const MULTI: &[u8] = b"*1\r\n$5\r\nMULTI\r\n";
        const EXEC: &[u8] = b"*1\r\n$4\r\nEXEC\r\n";
        debug_assert_eq!(self.slots.len(), self.replies.len());
        let mut order: Vec<usize> = (0..self.replies.len()).collect();
        order.sort_by_key(|&i| self.slots[i]);
        let mut buf = BytesMut::with_capacity(self.buf.len() * 2 + 1024);
        let mut replies = Vec::with_capacity(self.replies.len() * 2 + 4);
        // Each reply expected where its command starts in `buf`.
        let mut expect = |buf: &BytesMut, kind| {
            replies.push(Expect {
                start: buf.len() as u32,
                kind,
            })
        };
        let mut k = 0;
        while k < order.len() {
            let slot = self.slots[order[k]];
            let SlotMark { key, guard } = mark(slot);
            if let Some((watch, expected)) = guard {
                engine::marker::guard_commands(&watch, &expected, |cmd| {
                    expect(&buf, ExpectKind::TxGuard);
                    encode::command(&mut buf, cmd);
                });
            }
            expect(&buf, ExpectKind::TxBegin);
            buf.extend_from_slice(MULTI);
            while k < order.len() && self.slots[order[k]] == slot {
                let i = order[k];
                let start = self.replies[i].start as usize;
                let end = self
                    .replies
                    .get(i + 1)
                    .map_or(self.buf.len(), |e| e.start as usize);
                expect(&buf, self.replies[i].kind);
                buf.extend_from_slice(&self.buf[start..end]);
                k += 1;
            }
            expect(&buf, ExpectKind::TxQueued);
            encode::command(&mut buf, &[&b"SET"[..], &key, value]);
            expect(&buf, ExpectKind::TxEnd);
            buf.extend_from_slice(EXEC);
        }
        self.buf = buf;
        self.replies = replies;
        self.slots.clear();
    }

    /// Takes the batch built so far.
    pub fn take(&mut self, shard: usize, end: Option<StreamPos>) -> Batch {
        let payload = self.buf.split().freeze();
        // The next batch is likely the size of this one: no regrowing.
        let next_replies = Vec::with_capacity(self.replies.len());
        // Small batches (the stream's) share one allocation; a new one is
        // taken once a full batch would no longer fit in what is left.
        if self.buf.capacity() < super::FLUSH_BYTES + 16 * 1024 {
            self.buf.reserve(BUILD_ROOM);
        }
        Batch {
            shard,
            db: self.db.take(),
            payload,
            replies: std::mem::replace(&mut self.replies, next_replies),
            end,
            wrapped: {
                self.slots.clear();
                self.seal_next = false;
                std::mem::take(&mut self.wrapped)
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use engine::resp::encode;

    fn batch(cmds: &[(&[&str], ExpectKind)]) -> Batch {
        let mut b = BatchBuilder::default();
        for (args, kind) in cmds {
            b.push(Some(0), *kind, |buf| encode::command(buf, args));
        }
        b.take(0, Some(StreamPos { offset: 99, db: 0 }))
    }

    #[test]
    fn tail_keeps_whole_commands() {
        let b = batch(&[
            (&["SET", "a", "1"], ExpectKind::Ok),
            (&["SET", "b", "2"], ExpectKind::Ok),
            (&["DEL", "c"], ExpectKind::Ok),
        ]);
        let t = b.tail_from(1);
        assert_eq!(t.len(), 2);
        assert_eq!(&t.payload[..], &b.payload[b.replies[1].start as usize..]);
        assert_eq!(t.command_bytes(0), b.command_bytes(1));
        assert_eq!(t.replies[0].start, 0);
        assert!(b.tail_from(3).is_empty());
    }

    #[test]
    fn tail_inside_a_transaction_resends_it_whole() {
        let b = batch(&[
            (&["SET", "a", "1"], ExpectKind::Ok),
            (&["MULTI"], ExpectKind::TxBegin),
            (&["INCR", "x"], ExpectKind::TxQueued),
            (&["INCR", "y"], ExpectKind::TxQueued),
            (&["EXEC"], ExpectKind::TxEnd),
            (&["SET", "b", "2"], ExpectKind::Ok),
        ]);
        assert_eq!(
            b.tail_from(3).len(),
            5,
            "cut after a QUEUED moves back to MULTI"
        );
        assert_eq!(b.tail_from(5).len(), 1, "after EXEC's reply the tx is done");
    }
}
