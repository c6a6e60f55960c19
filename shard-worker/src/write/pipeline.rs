//! One connection's worth of pipelined writing.
//!
//! Two loops share the connection: the sender takes batches from the queue
//! and writes them; the receiver reads replies in order, checks every one,
//! and confirms batches back to their shards. Between them, a bounded queue
//! of batches in flight caps how much is unconfirmed at once.
//!
//! When the connection fails, every batch without a full set of replies is
//! handed back (the receiver's current one cut at its first unconfirmed
//! command), to be resent on the next connection.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use engine::resp::{encode, scan_reply};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::mpsc;

use crate::conn::Conn;
use crate::error::WorkerError;
use crate::events;
use crate::progress::{ShardStats, WriterStats};
use crate::route::{Batch, ExpectKind};

/// A batch written to the socket, waiting for its replies.
struct InFlight {
    batch: Batch,
    /// A `SELECT` was written before the batch (one more reply to read).
    select: bool,
}

/// What the pipeline gives back when it ends.
pub struct PipelineExit {
    pub(crate) rx: mpsc::Receiver<Batch>,
    /// Batches (or tails of batches) not confirmed, in order.
    pub(crate) unconfirmed: VecDeque<Batch>,
    /// `Ok` when the queue closed and everything was confirmed.
    pub(crate) result: Result<(), WorkerError>,
}

pub(crate) struct PipelineCtx {
    pub writer: usize,
    pub shards: Arc<[Arc<ShardStats>]>,
    pub stats: Arc<WriterStats>,
    /// Most batches written but not yet confirmed.
    pub window: usize,
}

pub(crate) async fn run(
    conn: Conn,
    rx: mpsc::Receiver<Batch>,
    resend: VecDeque<Batch>,
    ctx: &PipelineCtx,
) -> PipelineExit {
    let addr = conn.addr.clone();
    let (rd, wr) = conn.stream.into_split();
    let (inflight_tx, mut inflight_rx) = mpsc::channel::<InFlight>(ctx.window.max(1));

    let mut sender = Sender {
        addr: addr.clone(),
        wr,
        rx,
        resend,
        current_db: Some(0),
        held: None,
        ctx,
    };
    let mut receiver = Receiver {
        addr,
        rd,
        buf: conn.buf,
        ctx,
        log: events::LogLimiter::new(),
    };

    let (send_result, recv_result) =
        tokio::join!(sender.run(inflight_tx), receiver.run(&mut inflight_rx));

    // Collect, in order, everything that was not confirmed.
    let mut unconfirmed = VecDeque::new();
    let partial = recv_result
        .as_ref()
        .err()
        .and_then(|(_, partial)| partial.clone());
    if let Some((batch, confirmed)) = partial {
        let tail = batch.tail_from(confirmed);
        if !tail.is_empty() {
            unconfirmed.push_back(tail);
        }
    }
    inflight_rx.close();
    while let Ok(item) = inflight_rx.try_recv() {
        unconfirmed.push_back(item.batch);
    }
    if let Some(batch) = sender.held.take() {
        unconfirmed.push_back(batch);
    }
    unconfirmed.extend(sender.resend.drain(..));

    let result = match (send_result, recv_result) {
        (_, Err((err, _))) => Err(err),
        (Err(err), Ok(())) => Err(err),
        (Ok(()), Ok(())) => Ok(()),
    };
    PipelineExit {
        rx: sender.rx,
        unconfirmed,
        result,
    }
}

struct Sender<'a> {
    addr: String,
    wr: OwnedWriteHalf,
    rx: mpsc::Receiver<Batch>,
    resend: VecDeque<Batch>,
    /// Database the connection is in, as far as what we wrote goes.
    current_db: Option<u32>,
    /// A batch taken from the queue but not yet handed to the receiver.
    held: Option<Batch>,
    ctx: &'a PipelineCtx,
}

impl Sender<'_> {
    async fn run(&mut self, inflight: mpsc::Sender<InFlight>) -> Result<(), WorkerError> {
        let mut select_buf = BytesMut::new();
        loop {
            let from_resend = !self.resend.is_empty();
            let batch = match self.resend.pop_front() {
                Some(b) => b,
                None => tokio::select! {
                    biased;
                    // The receiver failed: stop, whatever the queue holds.
                    _ = inflight.closed() => return Ok(()),
                    next = self.rx.recv() => match next {
                        Some(b) => b,
                        // Every producer is gone: what we have is all there is.
                        None => return Ok(()),
                    },
                },
            };
            if !from_resend {
                self.ctx
                    .stats
                    .queued_batches
                    .fetch_sub(1, Ordering::Relaxed);
            }
            self.held = Some(batch);
            // Wait for room in the window before writing, so at most
            // `window` batches are ever unconfirmed.
            let Ok(permit) = inflight.reserve().await else {
                // The receiver stopped (connection failed): keep `held`.
                return Ok(());
            };
            let batch = self.held.take().expect("held batch");
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
            permit.send(InFlight { batch, select });
            self.ctx
                .stats
                .inflight_commands
                .fetch_add(n_commands, Ordering::Relaxed);
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
            self.ctx
                .stats
                .bytes_written
                .fetch_add(n_bytes as u64, Ordering::Relaxed);
        }
    }
}

struct Receiver<'a> {
    addr: String,
    rd: OwnedReadHalf,
    buf: BytesMut,
    ctx: &'a PipelineCtx,
    log: events::LogLimiter,
}

/// A receiver failure, with the batch it was reading and how many of its
/// replies were confirmed.
type RecvFailure = (WorkerError, Option<(Batch, usize)>);

impl Receiver<'_> {
    async fn run(&mut self, inflight: &mut mpsc::Receiver<InFlight>) -> Result<(), RecvFailure> {
        while let Some(item) = inflight.recv().await {
            if let Err(failure) = self.confirm(item).await {
                // Tells the sender to stop; what is queued stays readable.
                inflight.close();
                return Err(failure);
            }
        }
        Ok(())
    }

    /// Reads and checks every reply of one in-flight batch.
    async fn confirm(&mut self, item: InFlight) -> Result<(), RecvFailure> {
        let InFlight { batch, select } = item;
        if select {
            let scan = match self.next_reply().await {
                Ok(s) => s,
                Err(e) => return Err((e, Some((batch, 0)))),
            };
            if let Some(err) = scan {
                // A target without this database is a setup error.
                return Err((
                    WorkerError::Unexpected {
                        addr: self.addr.clone(),
                        context: "selecting a database",
                        reply: err,
                    },
                    Some((batch, 0)),
                ));
            }
        }
        // Commands confirmed so far: everything before the last reply read,
        // except that a transaction counts only once its EXEC reply is in.
        let mut confirmed = 0;
        for i in 0..batch.replies.len() {
            let error = match self.next_reply().await {
                Ok(e) => e,
                Err(e) => return Err((e, Some((batch, confirmed)))),
            };
            let kind = batch.replies[i].kind;
            if let Some(text) = error {
                if let Some(fatal_or_retry) = self.classify(&batch, i, kind, &text) {
                    return Err((fatal_or_retry, Some((batch, confirmed))));
                }
            }
            if kind != ExpectKind::TxBegin && kind != ExpectKind::TxQueued {
                confirmed = i + 1;
            }
        }
        let n = batch.len() as u64;
        let stats = &self.ctx.stats;
        stats.inflight_commands.fetch_sub(n, Ordering::Relaxed);
        stats.commands_applied.fetch_add(n, Ordering::Relaxed);
        stats.batches_applied.fetch_add(1, Ordering::Relaxed);
        self.ctx.shards[batch.shard].note_confirmed(self.ctx.writer, batch.end);
        Ok(())
    }

    /// Handles an error reply to command `i`. Returns an error when the
    /// connection should end (the command was not executed and must be
    /// resent, or the task must fail); `None` when the error concerns this
    /// command only (it is counted and logged).
    fn classify(
        &mut self,
        batch: &Batch,
        i: usize,
        kind: ExpectKind,
        text: &str,
    ) -> Option<WorkerError> {
        let code = text.split(' ').next().unwrap_or("ERR");
        match kind {
            ExpectKind::KeepExisting if code == "BUSYKEY" => {
                self.ctx.stats.keys_skipped.fetch_add(1, Ordering::Relaxed);
                return None;
            }
            ExpectKind::KeepExistingFunction if text.contains("already exists") => {
                return None;
            }
            _ => {}
        }
        if let Some(err) = WorkerError::from_reply(&self.addr, text.as_bytes()) {
            return Some(err);
        }
        events::TargetCommandFailed {
            target: &self.addr,
            source: &self.ctx.shards[batch.shard].source,
            command: batch.command_bytes(i),
            code,
            reply: text,
        }
        .emit(&self.ctx.stats, &mut self.log);
        None
    }

    /// Reads the next reply; `Some(text)` when it is (or holds) an error.
    async fn next_reply(&mut self) -> Result<Option<String>, WorkerError> {
        loop {
            let scanned = scan_reply(&self.buf).map_err(|source| WorkerError::Protocol {
                addr: self.addr.clone(),
                source,
            })?;
            if let Some(scan) = scanned {
                let error = scan
                    .error
                    .map(|r| String::from_utf8_lossy(&self.buf[r]).into_owned());
                self.buf.advance(scan.len);
                return Ok(error);
            }
            if self.buf.capacity() - self.buf.len() < 16 * 1024 {
                self.buf.reserve(64 * 1024);
            }
            match self.rd.read_buf(&mut self.buf).await {
                Ok(0) => {
                    return Err(WorkerError::Closed {
                        addr: self.addr.clone(),
                        context: "waiting for replies",
                    })
                }
                Ok(_) => {}
                Err(source) => {
                    return Err(WorkerError::Io {
                        addr: self.addr.clone(),
                        context: "reading replies",
                        source,
                    })
                }
            }
        }
    }
}

/// Backoff between reconnection attempts, and how long to keep trying.
#[derive(Clone, Debug)]
pub struct RetryPolicy {
    /// Give up when an outage lasts longer than this.
    pub timeout: Duration,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            timeout: Duration::from_secs(720 * 60),
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
        }
    }
}

/// The state of one outage: when it began and the next delay.
#[derive(Debug)]
pub struct Backoff {
    started: Instant,
    next: Duration,
}

impl Backoff {
    pub fn start(policy: &RetryPolicy) -> Backoff {
        Backoff {
            started: Instant::now(),
            next: policy.initial_backoff,
        }
    }

    /// The delay before the next attempt, or `None` when the outage has
    /// outlasted the policy's timeout.
    pub fn next_delay(&mut self, policy: &RetryPolicy) -> Option<Duration> {
        if self.started.elapsed() >= policy.timeout {
            return None;
        }
        let delay = self.next;
        self.next = (self.next * 2).min(policy.max_backoff);
        Some(delay)
    }

    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }
}
