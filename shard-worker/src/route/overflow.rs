//! A writer's overflow: where batches go when its queue stays full, so that
//! a stalled (paused, reconnecting) target node does not hold up a shard,
//! and the other nodes keep getting theirs.
//!
//! A full queue first gets a short wait: a node that is merely slower than
//! the source (the normal case during a full sync) takes a batch every few
//! milliseconds, and plain backpressure is then both the fastest and the
//! leanest way (the shard's stream spill keeps the source link safe). Only a
//! writer whose queue stays full past [`STALL`] switches to its overflow.
//!
//! Batches are serialized into a [`Spill`] (memory, then disk). Order is
//! kept per producer: once one batch overflowed, every later batch goes to
//! the overflow too, until the writer has consumed it all; the writer reads
//! its queue first (older), then the overflow.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::sync::mpsc;

use super::batch::{Batch, Expect, ExpectKind};
use crate::error::WorkerError;
use crate::progress::{StreamPos, WriterStats};
use crate::spill::Spill;

/// How long a full queue may keep a producer waiting before batches go to
/// the overflow.
pub const STALL: Duration = Duration::from_millis(50);

pub struct Overflow {
    /// Whether batches currently go to the spill (guards the switch).
    active: Mutex<bool>,
    spill: Arc<Spill>,
    /// Bytes read from the spill but not yet a whole record.
    partial: Mutex<BytesMut>,
    stats: Arc<WriterStats>,
}

/// The handing over failed: the writer is gone, or the overflow cannot be
/// written.
pub enum SendError {
    Closed,
    Spill(WorkerError),
}

impl Overflow {
    pub fn new(dir: &Path, target: &str, memory_limit: usize, stats: Arc<WriterStats>) -> Overflow {
        Overflow {
            active: Mutex::new(false),
            spill: Spill::new(
                dir,
                &format!("writer-{target}"),
                memory_limit,
                stats.overflow.clone(),
            ),
            partial: Mutex::new(BytesMut::new()),
            stats,
        }
    }

    /// Hands `batch` over: to the queue when it has room (waiting up to
    /// [`STALL`] for it) and nothing of this writer overflowed before, to the
    /// overflow otherwise.
    ///
    /// Order holds per producer: a producer whose batch overflowed finds the
    /// overflow active next time (or already drained, its batch included).
    pub async fn send(&self, tx: &mpsc::Sender<Batch>, batch: Batch) -> Result<(), SendError> {
        let active = *self.active.lock().expect("overflow lock");
        let batch = if active {
            batch
        } else {
            match tx.try_send(batch) {
                Ok(()) => return self.queued(),
                Err(mpsc::error::TrySendError::Closed(_)) => return Err(SendError::Closed),
                Err(mpsc::error::TrySendError::Full(batch)) => {
                    match tokio::time::timeout(STALL, tx.reserve()).await {
                        Ok(Ok(permit)) => {
                            permit.send(batch);
                            return self.queued();
                        }
                        Ok(Err(_)) => return Err(SendError::Closed),
                        Err(_) => batch,
                    }
                }
            }
        };
        if tx.is_closed() {
            return Err(SendError::Closed);
        }
        let mut active = self.active.lock().expect("overflow lock");
        *active = true;
        self.push(batch)
    }

    fn queued(&self) -> Result<(), SendError> {
        self.stats.counters.queued_batches.add(1);
        Ok(())
    }

    fn push(&self, batch: Batch) -> Result<(), SendError> {
        self.stats.counters.overflow_batches.add(1);
        self.spill.push(encode(&batch)).map_err(SendError::Spill)
    }

    /// The oldest overflowed batch, if any. Call only when the queue is
    /// empty (its batches are older). When the overflow runs dry, new
    /// batches go to the queue again.
    pub fn try_pop(&self) -> Result<Option<Batch>, WorkerError> {
        let mut active = self.active.lock().expect("overflow lock");
        let mut partial = self.partial.lock().expect("overflow partial lock");
        loop {
            if let Some(batch) = decode(&mut partial) {
                self.stats.counters.overflow_batches.sub(1);
                return Ok(Some(batch));
            }
            match self.spill.try_next()? {
                Some(chunk) => partial.extend_from_slice(&chunk),
                None => {
                    if partial.is_empty() {
                        *active = false;
                    }
                    return Ok(None);
                }
            }
        }
    }

    /// Whether anything waits in the overflow.
    pub fn is_empty(&self) -> bool {
        self.partial
            .lock()
            .expect("overflow partial lock")
            .is_empty()
            && self.spill.is_empty()
    }

    /// Waits until something may have been pushed.
    pub async fn readable(&self) {
        self.spill.readable().await;
    }
}

fn kind_code(kind: ExpectKind) -> u8 {
    match kind {
        ExpectKind::Ok => 0,
        ExpectKind::KeepExisting => 1,
        ExpectKind::KeepExistingFunction => 2,
        ExpectKind::TxBegin => 3,
        ExpectKind::TxQueued => 4,
        ExpectKind::TxEnd => 5,
        ExpectKind::TxGuard => 6,
    }
}

fn kind_of(code: u8) -> ExpectKind {
    match code {
        1 => ExpectKind::KeepExisting,
        2 => ExpectKind::KeepExistingFunction,
        3 => ExpectKind::TxBegin,
        4 => ExpectKind::TxQueued,
        5 => ExpectKind::TxEnd,
        6 => ExpectKind::TxGuard,
        _ => ExpectKind::Ok,
    }
}

/// `[len u32][shard u32][db flag u8, db u32][end flag u8, offset u64, db u32]
/// [wrapped u8][n u32][n x (start u32, kind u8)][payload]`, little-endian.
fn encode(batch: &Batch) -> Bytes {
    let mut body = BytesMut::with_capacity(batch.payload.len() + batch.replies.len() * 5 + 32);
    body.put_u32_le(batch.shard as u32);
    body.put_u8(batch.db.is_some() as u8);
    body.put_u32_le(batch.db.unwrap_or(0));
    body.put_u8(batch.end.is_some() as u8);
    let end = batch.end.unwrap_or(StreamPos { offset: 0, db: 0 });
    body.put_u64_le(end.offset);
    body.put_u32_le(end.db);
    body.put_u8(batch.wrapped as u8);
    body.put_u32_le(batch.replies.len() as u32);
    for e in &batch.replies {
        body.put_u32_le(e.start);
        body.put_u8(kind_code(e.kind));
    }
    body.put_slice(&batch.payload);
    let mut out = BytesMut::with_capacity(body.len() + 4);
    out.put_u32_le(body.len() as u32);
    out.put_slice(&body);
    out.freeze()
}

/// One whole record off the front of `buf`, or `None` when incomplete.
fn decode(buf: &mut BytesMut) -> Option<Batch> {
    if buf.len() < 4 {
        return None;
    }
    let len = u32::from_le_bytes(buf[..4].try_into().expect("4 bytes")) as usize;
    if buf.len() < 4 + len {
        return None;
    }
    buf.advance(4);
    let mut body = buf.split_to(len).freeze();
    let shard = body.get_u32_le() as usize;
    let has_db = body.get_u8() == 1;
    let db = body.get_u32_le();
    let has_end = body.get_u8() == 1;
    let offset = body.get_u64_le();
    let end_db = body.get_u32_le();
    let wrapped = body.get_u8() == 1;
    let n = body.get_u32_le() as usize;
    let mut replies = Vec::with_capacity(n);
    for _ in 0..n {
        let start = body.get_u32_le();
        let kind = kind_of(body.get_u8());
        replies.push(Expect { start, kind });
    }
    Some(Batch {
        shard,
        db: has_db.then_some(db),
        payload: body,
        replies,
        end: has_end.then_some(StreamPos { offset, db: end_db }),
        wrapped,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::route::BatchBuilder;
    use engine::resp::encode as resp;

    #[test]
    fn records_round_trip() {
        let mut b = BatchBuilder::default();
        b.push(Some(3), ExpectKind::TxBegin, |buf| {
            resp::command(buf, &["MULTI"])
        });
        b.push(None, ExpectKind::TxQueued, |buf| {
            resp::command(buf, &["INCR", "x"])
        });
        b.push(None, ExpectKind::TxEnd, |buf| resp::command(buf, &["EXEC"]));
        let batch = b.take(
            7,
            Some(StreamPos {
                offset: 12345,
                db: 3,
            }),
        );
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&encode(&batch));
        buf.extend_from_slice(&encode(&b.take(1, None)));
        let back = decode(&mut buf).unwrap();
        assert_eq!(
            (back.shard, back.db, back.end),
            (
                7,
                Some(3),
                Some(StreamPos {
                    offset: 12345,
                    db: 3
                })
            )
        );
        assert_eq!(back.payload, batch.payload);
        assert_eq!(back.replies, batch.replies);
        let empty = decode(&mut buf).unwrap();
        assert_eq!((empty.shard, empty.end, empty.len()), (1, None, 0));
        assert!(decode(&mut buf).is_none());
    }

    #[test]
    fn overflow_keeps_order_and_gives_the_queue_back() {
        let dir =
            std::env::temp_dir().join(format!("shardsync-overflow-test-{}", std::process::id()));
        let stats = Arc::new(WriterStats::new("t:1"));
        let overflow = Overflow::new(&dir, "t:1", 64, stats);
        let (tx, mut rx) = mpsc::channel(2);
        let batch = |i: u64| {
            let mut b = BatchBuilder::default();
            b.push(None, ExpectKind::Ok, |buf| {
                resp::command(buf, &["SET", "k", &i.to_string()])
            });
            b.take(0, Some(StreamPos { offset: i, db: 0 }))
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        for i in 0..10 {
            assert!(rt.block_on(overflow.send(&tx, batch(i))).is_ok());
        }
        // Two fit the queue, eight overflowed (some on disk: 64 bytes of memory).
        let mut got = Vec::new();
        while let Ok(b) = rx.try_recv() {
            got.push(b.end.unwrap().offset);
        }
        while let Some(b) = overflow.try_pop().unwrap() {
            got.push(b.end.unwrap().offset);
        }
        assert_eq!(got, (0..10).collect::<Vec<_>>());
        // Drained: the queue is used again.
        assert!(rt.block_on(overflow.send(&tx, batch(10))).is_ok());
        assert_eq!(
            rx.try_recv().unwrap().end,
            Some(StreamPos { offset: 10, db: 0 })
        );
        let _ = std::fs::remove_dir_all(dir);
    }
}
