//! One connection's worth of pipelined writing.
//!
//! Two loops share the connection: the sender takes work (batches to
//! resend, batches redirected here by other writers, then the queue) and
//! writes it; the receiver reads replies in order, checks every one, and
//! confirms batches back to their shards, in order. Between them, a bounded
//! queue of batches in flight caps how much is unconfirmed at once.
//!
//! Replies that are not plain successes:
//!
//! - `MOVED` / `ASK` (cluster targets): the command did not run here. It is
//!   handed to the writer of the node that serves its slot (through that
//!   writer's redirect lane, ahead of its queue), the slot map is corrected
//!   on MOVED, and this batch is confirmed only once the redirected commands
//!   are.
//! - LOADING, BUSY, READONLY, TRYAGAIN, ... : the command did not run, and
//!   the connection cannot go on. The receiver stops the sender, reads every
//!   reply still in flight, and hands back exactly the commands that did not
//!   run, to be sent on the next connection (nothing runs twice).
//! - an error that concerns one command (WRONGTYPE, ...): counted and logged.
//! - an error waiting cannot fix (NOAUTH, NOPERM, OOM): the task fails.
//!
//! When the connection itself fails, every batch without a full set of
//! replies is handed back (the current one cut at its first unconfirmed
//! command), to be resent on the next connection.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use engine::resp::encode;
use engine::split::TmpNames;
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::{mpsc, oneshot};

use super::receiver::{Awaiting, Receiver};
use crate::conn::Conn;
use crate::error::WorkerError;
use crate::events;
use crate::progress::WriterStats;
use crate::route::{Batch, ClusterRouting, Overflow, Redirected};
use engine::rebuild::TargetCaps;

/// A batch to write, and who to tell when it is confirmed (a redirected
/// batch tells the writer that redirected it; a batch from the queue tells
/// its shard's progress counters).
pub(crate) type Work = (Batch, Option<oneshot::Sender<()>>);

/// A batch written to the socket, waiting for its replies.
pub(crate) struct InFlight {
    pub batch: Batch,
    pub done: Option<oneshot::Sender<()>>,
    /// A `SELECT` was written before the batch (one more reply to read).
    pub select: bool,
}

/// What the pipeline gives back when it ends.
pub struct PipelineExit {
    pub(crate) rx: mpsc::Receiver<Batch>,
    pub(crate) redirects: mpsc::UnboundedReceiver<Redirected>,
    /// Work not confirmed, in order, to send first on the next connection.
    pub(crate) unconfirmed: VecDeque<Work>,
    /// Batches waiting on redirects, to keep confirming in order.
    pub(crate) awaiting: VecDeque<Awaiting>,
    /// Batches confirmed during this connection (an outage ends only once
    /// a connection made progress).
    pub(crate) confirmed: u64,
    /// `Ok` when the queue closed and everything was confirmed.
    pub(crate) result: Result<(), WorkerError>,
}

pub(crate) struct PipelineCtx {
    pub writer: usize,
    pub shards: Arc<crate::progress::ShardList>,
    pub stats: Arc<WriterStats>,
    /// The cluster slot map, for MOVED/ASK; `None` on a standalone target.
    pub routing: Option<Arc<ClusterRouting>>,
    /// Batches that did not fit in the queue.
    pub overflow: Arc<Overflow>,
    /// Most batches written but not yet confirmed.
    pub window: usize,
    /// How long replies may keep us waiting before the target is taken as
    /// gone (`--target-timeout`).
    pub reply_timeout: Duration,
    /// For RESTOREs the target refuses: what it can take instead.
    pub fallback: Fallback,
    /// What a command the target refuses for itself does to the task.
    pub on_error: OnError,
}

/// What a replayed command the target refuses for itself (WRONGTYPE, a
/// syntax error, BUSYKEY, a command it does not know) does: the replay is
/// wrong on that node, so by default the task stops there, with one line
/// naming the node, the command and its key.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OnError {
    #[default]
    Stop,
    /// Count it (`target_errors_total{code}`, `target_refusals_total{class="replay"}`), log it, go on.
    Skip,
}

/// How a RESTORE the target refuses as too new is rebuilt.
pub(crate) struct Fallback {
    /// What the connected node runs (read again on every connection).
    pub caps: std::sync::Mutex<TargetCaps>,
    /// Temporary key names (kept apart from other writers' by their scope).
    pub tmp_names: std::sync::Mutex<TmpNames>,
}

pub(crate) struct PipelineStart {
    pub conn: Conn,
    pub rx: mpsc::Receiver<Batch>,
    pub redirects: mpsc::UnboundedReceiver<Redirected>,
    pub resend: VecDeque<Work>,
    pub awaiting: VecDeque<Awaiting>,
}

pub(crate) async fn run(start: PipelineStart, ctx: &PipelineCtx) -> PipelineExit {
    let PipelineStart {
        conn,
        rx,
        redirects,
        resend,
        awaiting,
    } = start;
    let addr = conn.addr.clone();
    let (rd, wr) = conn.stream.into_split();
    let (inflight_tx, mut inflight_rx) = mpsc::channel::<InFlight>(ctx.window.max(1));

    let mut sender = Sender {
        addr: addr.clone(),
        wr,
        rx,
        overflow: ctx.overflow.clone(),
        redirects,
        resend,
        current_db: Some(0),
        held: None,
        ctx,
    };
    let mut receiver = Receiver::new(addr, rd, conn.buf, ctx, awaiting);

    let (send_result, recv_result) =
        tokio::join!(sender.run(inflight_tx), receiver.run(&mut inflight_rx));

    // Collect, in order, everything that was not confirmed.
    let mut unconfirmed: VecDeque<Work> = receiver.retry.drain(..).collect();
    let mut result = send_result;
    if let Err((err, partial)) = recv_result {
        if let Some((item, from)) = partial {
            let tail = item.batch.tail_from(from);
            if !tail.is_empty() {
                unconfirmed.push_back((tail, item.done));
            }
        }
        result = Err(err);
    } else if let Some(err) = receiver.retry_error.take() {
        result = Err(err);
    }
    inflight_rx.close();
    while let Ok(item) = inflight_rx.try_recv() {
        unconfirmed.push_back((item.batch, item.done));
    }
    if let Some(work) = sender.held.take() {
        unconfirmed.push_back(work);
    }
    unconfirmed.extend(sender.resend.drain(..));
    PipelineExit {
        rx: sender.rx,
        redirects: sender.redirects,
        unconfirmed,
        awaiting: std::mem::take(&mut receiver.awaiting),
        confirmed: receiver.confirmed,
        result,
    }
}

struct Sender<'a> {
    addr: String,
    wr: OwnedWriteHalf,
    rx: mpsc::Receiver<Batch>,
    overflow: Arc<Overflow>,
    redirects: mpsc::UnboundedReceiver<Redirected>,
    resend: VecDeque<Work>,
    /// Database the connection is in, as far as what we wrote goes.
    current_db: Option<u32>,
    /// Work taken but not yet handed to the receiver.
    held: Option<Work>,
    ctx: &'a PipelineCtx,
}

impl Sender<'_> {
    /// The next work: resends, then redirected batches, then the queue,
    /// then the overflow (younger than anything in the queue). `None` when
    /// the queue is closed and both are drained, or the receiver stopped.
    async fn next(
        &mut self,
        inflight: &mpsc::Sender<InFlight>,
    ) -> Result<Option<Work>, WorkerError> {
        if let Some(work) = self.resend.pop_front() {
            return Ok(Some(work));
        }
        let overflow = self.overflow.clone();
        loop {
            if let Ok(r) = self.redirects.try_recv() {
                return Ok(Some((r.batch, Some(r.done))));
            }
            match self.rx.try_recv() {
                Ok(batch) => {
                    self.ctx.stats.counters.queued_batches.sub(1);
                    return Ok(Some((batch, None)));
                }
                Err(mpsc::error::TryRecvError::Empty) => {}
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    // Every producer is gone: what remains is all there is.
                    return Ok(overflow.try_pop()?.map(|b| (b, None)));
                }
            }
            if let Some(batch) = overflow.try_pop()? {
                return Ok(Some((batch, None)));
            }
            tokio::select! {
                biased;
                // The receiver failed: stop, whatever the queue holds.
                _ = inflight.closed() => return Ok(None),
                Some(r) = self.redirects.recv() => return Ok(Some((r.batch, Some(r.done)))),
                next = self.rx.recv() => {
                    if let Some(batch) = next {
                        self.ctx.stats.counters.queued_batches.sub(1);
                        return Ok(Some((batch, None)));
                    }
                }
                _ = overflow.readable() => {}
            }
        }
    }

    async fn run(&mut self, inflight: mpsc::Sender<InFlight>) -> Result<(), WorkerError> {
        let mut select_buf = BytesMut::new();
        loop {
            let Some(work) = self.next(&inflight).await? else {
                return Ok(());
            };
            self.held = Some(work);
            // Wait for room in the window before writing, so at most
            // `window` batches are ever unconfirmed.
            let Ok(permit) = inflight.reserve().await else {
                // The receiver stopped: keep `held` for the next connection.
                return Ok(());
            };
            let (batch, done) = self.held.take().expect("held work");
            let select = match batch.db {
                Some(db) if self.current_db != Some(db) => {
                    select_buf.clear();
                    encode::command(
                        &mut select_buf,
                        &[&b"SELECT"[..], itoa::Buffer::new().format(db).as_bytes()],
                    );
                    self.current_db = Some(db);
                    true
                }
                _ => false,
            };
            let n_commands = batch.len() as u64;
            let n_bytes = batch.payload.len() + if select { select_buf.len() } else { 0 };
            let payload = batch.payload.clone();
            permit.send(InFlight {
                batch,
                done,
                select,
            });
            // Counted before the write: its replies can be read (and
            // counted out) as soon as it is on the wire.
            events::BatchInFlight {
                commands: n_commands,
            }
            .emit(&self.ctx.stats.counters);
            let written = async {
                if select {
                    self.wr.write_all(&select_buf).await?;
                }
                self.wr.write_all(&payload).await
            }
            .await;
            if let Err(source) = written {
                return Err(WorkerError::Io {
                    addr: self.addr.clone(),
                    context: "writing to the target",
                    source,
                });
            }
            events::BytesWritten {
                bytes: n_bytes as u64,
            }
            .emit(&self.ctx.stats.counters);
        }
    }
}
