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
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use engine::cluster::{parse_redirect, Redirect};
use engine::resp::{encode, scan_reply};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{mpsc, oneshot};

use crate::conn::Conn;
use crate::error::{Recovery, WorkerError};
use crate::events;
use crate::progress::{ShardStats, WriterStats};
use crate::route::{Batch, BatchBuilder, ClusterRouting, ExpectKind, Overflow, Redirected};
use engine::rebuild::{Commands, Rebuild, TargetCaps};
use engine::restore::Existing;
use engine::split::colocated_name;

/// How long replies may keep us waiting before the target is considered
/// gone (a paused or sleeping target answers well within this).
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(120);

/// A batch to write, and who to tell when it is confirmed (a redirected
/// batch tells the writer that redirected it; a batch from the queue tells
/// its shard's progress counters).
pub(crate) type Work = (Batch, Option<oneshot::Sender<()>>);

/// A batch written to the socket, waiting for its replies.
struct InFlight {
    batch: Batch,
    done: Option<oneshot::Sender<()>>,
    /// A `SELECT` was written before the batch (one more reply to read).
    select: bool,
}

/// A batch whose replies are all in, waiting for commands it redirected to
/// other writers to be confirmed there.
pub(crate) struct Awaiting {
    shard: usize,
    end: Option<(u64, u32)>,
    commands: u64,
    done: Option<oneshot::Sender<()>>,
    waits: Vec<oneshot::Receiver<()>>,
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
    pub shards: Arc<[Arc<ShardStats>]>,
    pub stats: Arc<WriterStats>,
    /// The cluster slot map, for MOVED/ASK; `None` on a standalone target.
    pub routing: Option<Arc<ClusterRouting>>,
    /// Batches that did not fit in the queue.
    pub overflow: Arc<Overflow>,
    /// Most batches written but not yet confirmed.
    pub window: usize,
    /// For RESTOREs the target refuses: what it can take instead.
    pub fallback: Fallback,
}

/// How a RESTORE the target refuses as too new is rebuilt.
pub(crate) struct Fallback {
    /// What the connected node runs (read again on every connection).
    pub caps: std::sync::Mutex<TargetCaps>,
    /// Keeps our temporary key names apart from other writers'.
    pub tmp_scope: String,
    pub tmp_names: std::sync::atomic::AtomicU64,
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
    let mut receiver = Receiver {
        addr,
        rd,
        buf: conn.buf,
        ctx,
        log: events::LogLimiter::new(),
        awaiting,
        confirmed: 0,
        retry: Vec::new(),
        retry_error: None,
    };

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
                    self.ctx
                        .stats
                        .queued_batches
                        .fetch_sub(1, Ordering::Relaxed);
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
                        self.ctx.stats.queued_batches.fetch_sub(1, Ordering::Relaxed);
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
    awaiting: VecDeque<Awaiting>,
    confirmed: u64,
    /// Commands that did not run because of a retryable error, to resend.
    retry: Vec<Work>,
    retry_error: Option<WorkerError>,
}

/// A receiver failure, with the batch it was reading and how many of its
/// commands are known to have run.
type RecvFailure = (WorkerError, Option<(InFlight, usize)>);

/// What the replies of one batch said.
#[derive(Default)]
struct Verdict {
    /// Refused RESTOREs (by index) and the commands that replace them.
    rebuilt: Vec<(usize, Batch)>,
    /// Commands (index ranges) to send to another node instead.
    redirects: Vec<(std::ops::Range<usize>, Redirect)>,
    /// Commands that did not run (retryable error), as index ranges.
    not_run: Vec<std::ops::Range<usize>>,
}

impl Receiver<'_> {
    async fn run(&mut self, inflight: &mut mpsc::Receiver<InFlight>) -> Result<(), RecvFailure> {
        loop {
            self.confirm_ready();
            let waiting_redirect = self.awaiting.front().is_some_and(|a| !a.waits.is_empty());
            tokio::select! {
                biased;
                ok = wait_front(&mut self.awaiting), if waiting_redirect => {
                    if !ok {
                        return Err((WorkerError::Closed {
                            addr: self.addr.clone(),
                            context: "waiting for redirected commands (their writer stopped)",
                        }, None));
                    }
                }
                item = inflight.recv() => match item {
                    Some(item) => {
                        if let Err(failure) = self.receive(item).await {
                            // Tells the sender to stop; what is queued stays readable.
                            inflight.close();
                            return Err(failure);
                        }
                        if self.retry_error.is_some() {
                            // Drain: stop sending, read what is in flight.
                            inflight.close();
                        }
                    }
                    // Drained after a retryable error: what waits on the
                    // resend is carried over to the next connection.
                    None if self.retry_error.is_some() => {
                        self.confirm_ready();
                        return Ok(());
                    }
                    None if self.awaiting.iter().all(|a| a.waits.is_empty()) => {
                        self.confirm_ready();
                        return Ok(());
                    }
                    None => {}
                },
            }
        }
    }

    /// Confirms, in order, the batches at the front that wait for nothing.
    fn confirm_ready(&mut self) {
        while self.awaiting.front().is_some_and(|a| a.waits.is_empty()) {
            let a = self.awaiting.pop_front().expect("front");
            self.confirm(a.shard, a.end, a.commands, a.done);
        }
    }

    fn confirm(
        &mut self,
        shard: usize,
        end: Option<(u64, u32)>,
        commands: u64,
        done: Option<oneshot::Sender<()>>,
    ) {
        let stats = &self.ctx.stats;
        stats
            .commands_applied
            .fetch_add(commands, Ordering::Relaxed);
        stats.batches_applied.fetch_add(1, Ordering::Relaxed);
        self.confirmed += 1;
        match done {
            // A redirected batch: the writer that sent it here confirms.
            Some(done) => {
                let _ = done.send(());
            }
            None => self.ctx.shards[shard].note_confirmed(self.ctx.writer, end),
        }
    }

    /// Reads and checks every reply of one in-flight batch, then confirms
    /// it, hands its redirects over, or keeps what did not run.
    async fn receive(&mut self, item: InFlight) -> Result<(), RecvFailure> {
        if item.select {
            match self.next_reply().await {
                Ok(None) => {}
                Ok(Some(err)) => {
                    return Err((
                        WorkerError::TargetRefused {
                            addr: self.addr.clone(),
                            what: "SELECT",
                            message: err,
                        },
                        Some((item, 0)),
                    ))
                }
                Err(e) => return Err((e, Some((item, 0)))),
            }
        }
        let mut verdict = Verdict::default();
        // Commands known to have run: up to the first one that did not, and
        // a transaction only once its EXEC reply is in.
        let mut ran = 0;
        let mut stuck = false;
        let mut tx_open: Option<usize> = None;
        let mut tx_redirect: Option<Redirect> = None;
        let mut tx_not_run = false;
        for i in 0..item.batch.replies.len() {
            let error = match self.next_reply().await {
                Ok(e) => e,
                Err(e) => return Err((e, Some((item, ran)))),
            };
            let kind = item.batch.replies[i].kind;
            if kind == ExpectKind::TxBegin {
                tx_open = Some(i);
                tx_redirect = None;
                tx_not_run = false;
            }
            let mut did_not_run = false;
            if let Some(text) = error {
                match self.classify(&item.batch, i, kind, &text) {
                    Reply::Ran => {}
                    Reply::Redirect(r) if tx_open.is_some() => {
                        tx_redirect = Some(r);
                        did_not_run = true;
                    }
                    Reply::Redirect(r) => {
                        verdict.redirects.push((i..i + 1, r));
                        did_not_run = true;
                    }
                    Reply::ExecAbort if tx_redirect.is_some() || tx_not_run => did_not_run = true,
                    Reply::ExecAbort => {}
                    Reply::NotRun(err) => {
                        if tx_open.is_some() {
                            tx_not_run = true;
                        } else {
                            verdict.not_run.push(i..i + 1);
                        }
                        did_not_run = true;
                        self.retry_error.get_or_insert(err);
                    }
                    Reply::Rebuilt(b) => {
                        verdict.rebuilt.push((i, b));
                        did_not_run = true;
                        self.retry_error.get_or_insert(WorkerError::Resend {
                            addr: self.addr.clone(),
                            why: "values rebuilt with ordinary commands (the target refused their RESTORE payloads)",
                        });
                    }
                    Reply::Fatal(err) => return Err((err, Some((item, ran)))),
                }
            }
            if kind == ExpectKind::TxEnd {
                if let Some(begin) = tx_open.take() {
                    if let Some(r) = tx_redirect.take() {
                        verdict.redirects.push((begin..i + 1, r));
                    } else if tx_not_run {
                        verdict.not_run.push(begin..i + 1);
                    }
                    tx_not_run = false;
                }
            }
            stuck |= did_not_run || tx_redirect.is_some() || tx_not_run;
            if !stuck && tx_open.is_none() {
                ran = i + 1;
            }
        }
        self.settle(item, verdict).await
    }

    /// Decides what to do with a batch whose replies are all in.
    async fn settle(&mut self, item: InFlight, mut verdict: Verdict) -> Result<(), RecvFailure> {
        let InFlight { batch, done, .. } = item;
        // Its replies are in: no longer in flight on this connection.
        self.ctx
            .stats
            .inflight_commands
            .fetch_sub(batch.len() as u64, Ordering::Relaxed);
        if !verdict.not_run.is_empty() || !verdict.rebuilt.is_empty() {
            // This connection ends: resend what did not run (redirected
            // commands included: they will be redirected from there; refused
            // RESTOREs as their rebuilt commands). The batch is confirmed
            // once that remainder is, and batches after it wait their turn
            // behind it.
            let mut ranges: Vec<std::ops::Range<usize>> = verdict.not_run;
            ranges.extend(verdict.redirects.drain(..).map(|(r, _)| r));
            ranges.sort_by_key(|r| r.start);
            let rest = resend_batch(&batch, &ranges, verdict.rebuilt);
            let (tx, rx) = oneshot::channel();
            self.retry.push((rest, Some(tx)));
            self.settle_after(batch.shard, batch.end, 0, done, vec![rx]);
            return Ok(());
        }
        let mut waits = Vec::new();
        // Counted as applied by the writer that applies them.
        let redirected: u64 = verdict.redirects.iter().map(|(r, _)| r.len() as u64).sum();
        for (range, redirect) in verdict.redirects {
            let (host, port) = redirect.addr();
            let Some(routing) = &self.ctx.routing else {
                return Err((
                    WorkerError::Unexpected {
                        addr: self.addr.clone(),
                        context: "writing to a standalone target",
                        reply: "a cluster redirection".into(),
                    },
                    None,
                ));
            };
            let Some(w) = routing.writer_for_node(host, port).await else {
                return Err((
                    WorkerError::Closed {
                        addr: crate::endpoint::addr_of(host, port),
                        context: "redirecting commands (no writer for the node)",
                    },
                    None,
                ));
            };
            let ask = matches!(redirect, Redirect::Ask { .. });
            let counter = if ask {
                &self.ctx.stats.asked
            } else {
                &self.ctx.stats.moved
            };
            counter.fetch_add(range.len() as u64, Ordering::Relaxed);
            if !ask {
                routing.move_slot(redirect.slot(), w);
            }
            let Some((target, lane)) = routing.redirect_lane(w) else {
                continue;
            };
            let redirected = sub_batch(&batch, &[range], ask.then_some(b"ASKING"));
            let (tx, rx) = oneshot::channel();
            if lane
                .send(Redirected {
                    batch: redirected,
                    done: tx,
                })
                .is_err()
            {
                return Err((
                    WorkerError::Closed {
                        addr: target,
                        context: "redirecting commands (the writer stopped)",
                    },
                    None,
                ));
            }
            waits.push(rx);
        }
        let commands = batch.len() as u64 - redirected;
        self.settle_after(batch.shard, batch.end, commands, done, waits);
        Ok(())
    }

    /// Confirms a batch once `waits` complete. A shard's batches confirm in
    /// order (the queue); a batch another writer handed us (`done`) has no
    /// order to keep and is reported back on its own, so it can never wait
    /// behind a batch that waits for it.
    fn settle_after(
        &mut self,
        shard: usize,
        end: Option<(u64, u32)>,
        commands: u64,
        done: Option<oneshot::Sender<()>>,
        waits: Vec<oneshot::Receiver<()>>,
    ) {
        match done {
            Some(done) => {
                let stats = &self.ctx.stats;
                stats
                    .commands_applied
                    .fetch_add(commands, Ordering::Relaxed);
                stats.batches_applied.fetch_add(1, Ordering::Relaxed);
                self.confirmed += 1;
                if waits.is_empty() {
                    let _ = done.send(());
                } else {
                    tokio::spawn(async move {
                        for wait in waits {
                            if wait.await.is_err() {
                                // Dropping `done` tells the sender it failed.
                                return;
                            }
                        }
                        let _ = done.send(());
                    });
                }
            }
            None => self.awaiting.push_back(Awaiting {
                shard,
                end,
                commands,
                done: None,
                waits,
            }),
        }
    }

    /// Handles an error reply to command `i`.
    fn classify(&mut self, batch: &Batch, i: usize, kind: ExpectKind, text: &str) -> Reply {
        let code = text.split(' ').next().unwrap_or("ERR");
        match kind {
            ExpectKind::KeepExisting if code == "BUSYKEY" => {
                self.ctx.stats.keys_skipped.fetch_add(1, Ordering::Relaxed);
                return Reply::Ran;
            }
            ExpectKind::KeepExistingFunction if text.contains("already exists") => {
                return Reply::Ran
            }
            ExpectKind::TxEnd if code == "EXECABORT" => return Reply::ExecAbort,
            ExpectKind::Ok | ExpectKind::KeepExisting
                if text.starts_with("ERR DUMP payload version or checksum are wrong")
                    || text.starts_with("ERR Bad data format") =>
            {
                if batch.end.is_some() {
                    // From the replication stream: later commands on the
                    // key may have run already, so the value cannot be put
                    // in its place any more.
                    let (_, key) = events::describe_command(batch.command_bytes(i));
                    return Reply::Fatal(WorkerError::TargetRefused {
                        addr: self.addr.clone(),
                        what: "a RESTORE from the replication stream (the target runs an older Redis than the precheck saw; restart the task to plan for it)",
                        message: format!("key {key:?}: {text}"),
                    });
                }
                if let Some(rebuilt) = self.rebuild_restore(batch, i, text) {
                    return Reply::Rebuilt(rebuilt);
                }
            }
            _ => {}
        }
        if let Some(redirect) = parse_redirect(text) {
            return Reply::Redirect(redirect);
        }
        if let Some(err) = WorkerError::from_reply(&self.addr, text.as_bytes()) {
            return if err.recovery() == Recovery::Fatal {
                Reply::Fatal(err)
            } else {
                Reply::NotRun(err)
            };
        }
        events::TargetCommandFailed {
            target: &self.addr,
            source: &self.ctx.shards[batch.shard].source,
            command: batch.command_bytes(i),
            code,
            reply: text,
        }
        .emit(&self.ctx.stats, &mut self.log);
        Reply::Ran
    }

    /// The commands that rebuild the value of RESTORE `i` of `batch`, which
    /// the target refused; `None` when it is not a RESTORE or its payload
    /// cannot be decoded (then the refusal is reported as it is).
    fn rebuild_restore(&mut self, batch: &Batch, i: usize, reply: &str) -> Option<Batch> {
        let mut bytes = BytesMut::from(batch.command_bytes(i));
        let cmd = engine::resp::parse_command(&mut bytes).ok()??;
        let now = crate::source::now_ms();
        let args = engine::restore::parse_restore(&cmd, now)?;
        let value = engine::restore::decode_payload(&args.payload).ok()?;
        if matches!(value, engine::rdb::value::Value::Module { .. }) {
            // Only its module can rebuild it: the refusal stands.
            return None;
        }
        let existing = if args.replace {
            Existing::Replace
        } else {
            Existing::Keep
        };
        let fallback = &self.ctx.fallback;
        let n = fallback.tmp_names.fetch_add(1, Ordering::Relaxed);
        let tmp = colocated_name(engine::slot::slot(&args.key), &fallback.tmp_scope, n);
        let mut out = Commands::new();
        Rebuild::whole(
            &args.key,
            &value,
            args.expire_ms,
            existing,
            *fallback.caps.lock().expect("caps lock"),
            || tmp,
            now,
            &mut out,
        );
        events::RestoreRebuilt {
            target: &self.addr,
            key: &args.key,
            reply,
        }
        .emit(&self.ctx.stats, &mut self.log);
        let mut b = BatchBuilder::default();
        for (step, bytes) in out.iter() {
            b.push(None, crate::source::step_kind(step), |buf| {
                buf.extend_from_slice(bytes)
            });
        }
        let mut rebuilt = b.take(batch.shard, batch.end);
        rebuilt.db = batch.db;
        Some(rebuilt)
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
            match tokio::time::timeout(REPLY_TIMEOUT, self.rd.read_buf(&mut self.buf)).await {
                Ok(Ok(0)) => {
                    return Err(WorkerError::Closed {
                        addr: self.addr.clone(),
                        context: "waiting for replies",
                    })
                }
                Ok(Ok(_)) => {}
                Ok(Err(source)) => {
                    return Err(WorkerError::Io {
                        addr: self.addr.clone(),
                        context: "reading replies",
                        source,
                    })
                }
                Err(_) => {
                    return Err(WorkerError::Timeout {
                        addr: self.addr.clone(),
                        context: "waiting for replies",
                        secs: REPLY_TIMEOUT.as_secs(),
                    })
                }
            }
        }
    }
}

/// What one error reply means.
enum Reply {
    /// The command ran (or the error concerns it alone, counted and logged).
    Ran,
    Redirect(Redirect),
    /// EXEC refused a transaction because a queued command was refused.
    ExecAbort,
    /// The command did not run; the connection must end (then resend it).
    NotRun(WorkerError),
    /// A RESTORE refused because the target cannot read its payload: these
    /// commands rebuild the value instead (sent like [`Reply::NotRun`]).
    Rebuilt(Batch),
    Fatal(WorkerError),
}

/// Waits for the front batch's redirects; `false` if one was lost.
async fn wait_front(awaiting: &mut VecDeque<Awaiting>) -> bool {
    let Some(front) = awaiting.front_mut() else {
        return true;
    };
    while let Some(wait) = front.waits.last_mut() {
        // Removed only once complete, so a cancelled wait can be resumed.
        let ok = wait.await.is_ok();
        front.waits.pop();
        if !ok {
            return false;
        }
    }
    true
}

/// What to send again of `batch`: the commands in `ranges`, and for each
/// refused RESTORE in `rebuilt`, its replacement, in the batch's order.
fn resend_batch(
    batch: &Batch,
    ranges: &[std::ops::Range<usize>],
    rebuilt: Vec<(usize, Batch)>,
) -> Batch {
    if rebuilt.is_empty() {
        return sub_batch(batch, ranges, None);
    }
    let mut pieces: Vec<(usize, Batch)> = ranges
        .iter()
        .map(|r| (r.start, sub_batch(batch, std::slice::from_ref(r), None)))
        .collect();
    pieces.extend(rebuilt);
    pieces.sort_by_key(|(at, _)| *at);
    let mut b = BatchBuilder::default();
    for (_, piece) in &pieces {
        for i in 0..piece.len() {
            b.push(None, piece.replies[i].kind, |buf| {
                buf.extend_from_slice(piece.command_bytes(i))
            });
        }
    }
    let mut out = b.take(batch.shard, batch.end);
    out.db = batch.db;
    out
}

/// The commands of `batch` in `ranges` (in order), as a batch of their own,
/// each preceded by `prefix` when given (ASKING). A transaction sent with a
/// prefix loses its MULTI/EXEC: after ASKING each command runs alone.
fn sub_batch(batch: &Batch, ranges: &[std::ops::Range<usize>], prefix: Option<&[u8]>) -> Batch {
    let mut b = BatchBuilder::default();
    for range in ranges {
        for i in range.clone() {
            let kind = batch.replies[i].kind;
            if prefix.is_some() {
                if matches!(kind, ExpectKind::TxBegin | ExpectKind::TxEnd) {
                    continue;
                }
                b.push(None, ExpectKind::Ok, |buf| {
                    encode::command(buf, &[prefix.unwrap_or_default()])
                });
            }
            let kind = if prefix.is_some() && kind == ExpectKind::TxQueued {
                ExpectKind::Ok
            } else {
                kind
            };
            b.push(None, kind, |buf| {
                buf.extend_from_slice(batch.command_bytes(i))
            });
        }
    }
    let mut out = b.take(batch.shard, batch.end);
    out.db = batch.db;
    out
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

/// The state of one outage: when it began and the next delay. An outage
/// ends only when a new connection made progress, so a failure that recurs
/// right after each reconnection still runs into the policy's timeout.
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

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(cmds: &[(&[&str], ExpectKind)]) -> Batch {
        let mut b = BatchBuilder::default();
        for (args, kind) in cmds {
            b.push(None, *kind, |buf| encode::command(buf, args));
        }
        b.take(3, Some((10, 0)))
    }

    #[test]
    fn sub_batches_keep_order_and_can_prefix_asking() {
        let b = batch(&[
            (&["SET", "a", "1"], ExpectKind::Ok),
            (&["SET", "b", "2"], ExpectKind::Ok),
            (&["MULTI"], ExpectKind::TxBegin),
            (&["INCR", "c"], ExpectKind::TxQueued),
            (&["EXEC"], ExpectKind::TxEnd),
        ]);
        let s = sub_batch(&b, &[0..1, 2..5], None);
        assert_eq!(s.len(), 4);
        assert_eq!(s.command_bytes(0), b.command_bytes(0));
        assert_eq!(s.replies[1].kind, ExpectKind::TxBegin);
        assert_eq!((s.shard, s.end), (3, Some((10, 0))));

        let asked = sub_batch(&b, std::slice::from_ref(&(2..5)), Some(b"ASKING"));
        // MULTI/EXEC dropped; ASKING before the one command.
        assert_eq!(asked.len(), 2);
        assert_eq!(asked.command_bytes(0), b"*1\r\n$6\r\nASKING\r\n");
        assert_eq!(asked.command_bytes(1), b.command_bytes(3));
        assert!(asked.replies.iter().all(|e| e.kind == ExpectKind::Ok));
    }
}
