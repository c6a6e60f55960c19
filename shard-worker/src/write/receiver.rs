//! The receiving half of a pipeline: reads replies in order, judges each
//! batch by them (`verdict.rs`), and then confirms it back to its shard,
//! hands its redirected commands to the writers that serve them, or keeps
//! what did not run for the next connection.

use std::collections::VecDeque;

use bytes::{Buf, BytesMut};
use engine::cluster::Redirect;
use engine::resp::{scan_exec, scan_reply, ExecScan};
use tokio::io::AsyncReadExt;
use tokio::net::tcp::OwnedReadHalf;
use tokio::sync::{mpsc, oneshot};

use super::pipeline::{InFlight, OnError, PipelineCtx, Work};
use super::resend::{rebuild_refused, resend_batch, sub_batch};
use super::verdict::{classify, Class, Outcome, Verdict};
use crate::clock::unix_ms;
use crate::error::WorkerError;
use crate::events;
use crate::progress::StreamPos;
use crate::route::{Batch, ExpectKind, Redirected};

/// A batch whose replies are all in, waiting for commands it redirected to
/// other writers to be confirmed there.
pub(crate) struct Awaiting {
    shard: usize,
    end: Option<StreamPos>,
    commands: u64,
    done: Option<oneshot::Sender<()>>,
    waits: Vec<oneshot::Receiver<()>>,
}

/// A receiver failure, with the batch it was reading and how many of its
/// commands are known to have run.
pub(crate) type RecvFailure = (WorkerError, Option<(InFlight, usize)>);

pub(crate) struct Receiver<'a> {
    addr: String,
    rd: OwnedReadHalf,
    buf: BytesMut,
    ctx: &'a PipelineCtx,
    log: events::LogLimiter,
    pub(crate) awaiting: VecDeque<Awaiting>,
    /// Batches confirmed on this connection.
    pub(crate) confirmed: u64,
    /// Commands that did not run because of a retryable error, to resend.
    pub(crate) retry: Vec<Work>,
    pub(crate) retry_error: Option<WorkerError>,
    /// Per shard: a transaction of it did not run on this connection (see
    /// [`Verdict::chain_broken`]).
    broken: Vec<bool>,
}

/// An EXEC reply, as far as the batch's verdict is concerned.
enum ExecRead {
    /// It ran (errors of single commands inside are reported already).
    Ran,
    /// EXEC itself failed (EXECABORT, CLUSTERDOWN ...).
    Error(String),
    /// A nil reply: the order guard held the transaction back.
    Discarded,
}

impl<'a> Receiver<'a> {
    pub fn new(
        addr: String,
        rd: OwnedReadHalf,
        buf: BytesMut,
        ctx: &'a PipelineCtx,
        awaiting: VecDeque<Awaiting>,
    ) -> Receiver<'a> {
        Receiver {
            addr,
            rd,
            buf,
            ctx,
            log: events::LogLimiter::new(),
            awaiting,
            confirmed: 0,
            retry: Vec::new(),
            retry_error: None,
            broken: Vec::new(),
        }
    }

    pub async fn run(
        &mut self,
        inflight: &mut mpsc::Receiver<InFlight>,
    ) -> Result<(), RecvFailure> {
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
            let Some(a) = self.awaiting.pop_front() else {
                return;
            };
            self.confirm(a.shard, a.end, a.commands, a.done);
        }
    }

    fn confirm(
        &mut self,
        shard: usize,
        end: Option<StreamPos>,
        commands: u64,
        done: Option<oneshot::Sender<()>>,
    ) {
        events::BatchConfirmed { commands }.emit(&self.ctx.stats.counters);
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
                    let refused = WorkerError::TargetRefused {
                        addr: self.addr.clone(),
                        what: "SELECT",
                        message: err,
                    };
                    return Err((refused, Some((item, 0))));
                }
                Err(e) => return Err((e, Some((item, 0)))),
            }
        }
        let shard = item.batch.shard;
        let broken = self.broken.get(shard).copied().unwrap_or(false);
        let mut verdict = Verdict::new(item.batch.wrapped).after_break(broken);
        let n = item.batch.replies.len();
        let mut begin = 0;
        for i in 0..n {
            let kind = item.batch.replies[i].kind;
            if kind == ExpectKind::TxBegin {
                begin = i;
            }
            let read = if item.batch.wrapped && kind == ExpectKind::TxEnd {
                self.exec_reply(&item.batch, begin).await
            } else {
                self.next_reply()
                    .await
                    .map(|e| e.map_or(ExecRead::Ran, ExecRead::Error))
            };
            let read = match read {
                Ok(read) => read,
                Err(e) => return Err((e, Some((item, verdict.ran)))),
            };
            let outcome = match read {
                ExecRead::Ran => Outcome::Ran,
                ExecRead::Discarded => {
                    events::GuardDiscarded.emit(&self.ctx.stats.counters);
                    self.retry_error.get_or_insert(WorkerError::Resend {
                        addr: self.addr.clone(),
                        why: "transactions their order guard held back (one before them in their slot did not run)",
                    });
                    Outcome::Discarded
                }
                ExecRead::Error(text) => match self.outcome(&item.batch, i, kind, &text) {
                    Ok(outcome) => outcome,
                    Err(fatal) => return Err((fatal, Some((item, verdict.ran)))),
                },
            };
            verdict.reply(i, kind, outcome);
        }
        if verdict.chain_broken {
            if self.broken.len() <= shard {
                self.broken.resize(shard + 1, false);
            }
            self.broken[shard] = true;
        }
        if verdict.reordered {
            let source = &self.ctx.shards[shard];
            events::AppliedOutOfOrder {
                target: &self.addr,
                source: &source.source,
            }
            .emit(&self.ctx.stats.counters);
            source.note_out_of_order();
        }
        if verdict.split {
            events::TargetRefusedForNow { code: "TRYAGAIN" }.emit(&self.ctx.stats);
            // As TRYAGAIN: after a pause, within the retry policy (a
            // migration left half-way holds the keys apart for good).
            self.retry_error.get_or_insert(WorkerError::TargetBusy {
                addr: self.addr.clone(),
                message: "TRYAGAIN a transaction whose keys a slot migration holds on two nodes (sent again until they are on one)".into(),
            });
        }
        if !verdict.left_out.is_empty() {
            self.retry_error.get_or_insert(WorkerError::Resend {
                addr: self.addr.clone(),
                why: "a batch without the commands the target refused when queued",
            });
        }
        self.settle(item, verdict).await
    }

    /// What an error reply to command `i` means for it; `Err` when the task
    /// must fail.
    fn outcome(
        &mut self,
        batch: &Batch,
        i: usize,
        kind: ExpectKind,
        text: &str,
    ) -> Result<Outcome, WorkerError> {
        let counters = &self.ctx.stats.counters;
        Ok(match classify(&self.addr, kind, text) {
            Class::KeptExisting => {
                events::KeySkipped.emit(counters);
                Outcome::Ran
            }
            Class::KeptFunction => Outcome::Ran,
            Class::ExecAbort => Outcome::ExecAbort,
            Class::Redirect(r) => Outcome::Redirect(r),
            Class::NotRun(err) => {
                let code = text.split(' ').next().unwrap_or("ERR");
                events::TargetRefusedForNow { code }.emit(&self.ctx.stats);
                self.retry_error.get_or_insert(err);
                Outcome::NotRun
            }
            Class::Fatal(err) => return Err(err),
            Class::RefusedPayload if batch.end.is_some() => {
                // From the replication stream: later commands on the key
                // may have run already, so the value cannot be put in its
                // place any more.
                let (_, key) = events::describe_command(batch.command_bytes(i));
                return Err(WorkerError::TargetRefused {
                    addr: self.addr.clone(),
                    what: "a RESTORE from the replication stream (the target runs an older Redis than the precheck saw; restart the task to plan for it)",
                    message: format!("key {key:?}: {text}"),
                });
            }
            Class::RefusedPayload => match self.rebuild(batch, i, text) {
                Some(rebuilt) => {
                    self.retry_error.get_or_insert(WorkerError::Resend {
                        addr: self.addr.clone(),
                        why: "values rebuilt with ordinary commands (the target refused their RESTORE payloads)",
                    });
                    Outcome::Rebuilt(rebuilt)
                }
                None => self.failed(batch, i, "ERR", text)?,
            },
            Class::Failed { code } => self.failed(batch, i, &code, text)?,
        })
    }

    /// An error about command `i` alone: the replay is wrong on this node.
    /// The task stops with one line naming the node, the command and its
    /// key, or with `--on-error skip` it is counted, logged and left out.
    fn failed(
        &mut self,
        batch: &Batch,
        i: usize,
        code: &str,
        text: &str,
    ) -> Result<Outcome, WorkerError> {
        if moved_already(batch.command_bytes(i), text) {
            // The RENAME of a value built in parts, sent again after a lost
            // reply: the first one moved it.
            return Ok(Outcome::Ran);
        }
        if self.ctx.on_error == OnError::Stop {
            let (command, key) = events::describe_command(batch.command_bytes(i));
            let source = &self.ctx.shards[batch.shard].source;
            return Err(WorkerError::TargetRefused {
                addr: self.addr.clone(),
                what: "a replayed command",
                message: format!(
                    "{command} key {key:?} (from {source}): {text} \
                     (--on-error skip counts and logs such refusals and goes on)"
                ),
            });
        }
        self.report_failed(batch, i, code, text);
        Ok(Outcome::Refused)
    }

    fn report_failed(&mut self, batch: &Batch, i: usize, code: &str, text: &str) {
        events::TargetCommandFailed {
            target: &self.addr,
            source: &self.ctx.shards[batch.shard].source,
            command: batch.command_bytes(i),
            code,
            reply: text,
        }
        .emit(&self.ctx.stats, &mut self.log);
    }

    /// The commands that rebuild RESTORE `i` of `batch`, which the target
    /// refused, for what the node runs.
    fn rebuild(&mut self, batch: &Batch, i: usize, reply: &str) -> Option<Batch> {
        let fallback = &self.ctx.fallback;
        let caps = *fallback.caps.lock().expect("caps lock");
        let mut names = fallback.tmp_names.lock().expect("tmp names lock");
        let (rebuilt, key) = rebuild_refused(batch, i, caps, &mut names, unix_ms())?;
        drop(names);
        events::RestoreRebuilt {
            target: &self.addr,
            key: &key,
            reply,
        }
        .emit(&self.ctx.stats.counters, &mut self.log);
        Some(rebuilt)
    }

    /// Decides what to do with a batch whose replies are all in.
    async fn settle(&mut self, item: InFlight, mut verdict: Verdict) -> Result<(), RecvFailure> {
        let InFlight { batch, done, .. } = item;
        // Its replies are in: no longer in flight on this connection.
        events::RepliesRead {
            commands: batch.len() as u64,
        }
        .emit(&self.ctx.stats.counters);
        if verdict.must_resend() {
            // This connection ends: resend what did not run (redirected
            // commands included: they will be redirected from there; refused
            // RESTOREs as their rebuilt commands). The batch is confirmed
            // once that remainder is, and batches after it wait their turn
            // behind it.
            let ranges = verdict.take_resend();
            let rest = resend_batch(&batch, &ranges, std::mem::take(&mut verdict.rebuilt));
            let (tx, rx) = oneshot::channel();
            self.retry.push((rest, Some(tx)));
            self.settle_after(batch.shard, batch.end, 0, done, vec![rx]);
            return Ok(());
        }
        let mut waits = Vec::new();
        // Counted as applied by the writer that applies them.
        let redirected: u64 = verdict.redirects.iter().map(|(r, _)| r.len() as u64).sum();
        for (range, redirect) in verdict.redirects {
            if let Some(wait) = self
                .redirect(&batch, range, redirect)
                .await
                .map_err(|e| (e, None))?
            {
                waits.push(wait);
            }
        }
        let commands = batch.len() as u64 - redirected;
        self.settle_after(batch.shard, batch.end, commands, done, waits);
        Ok(())
    }

    /// Hands the commands of `batch` in `range` to the writer of the node
    /// `redirect` names (correcting the slot map on MOVED); the receiver
    /// fires once they are confirmed there.
    async fn redirect(
        &mut self,
        batch: &Batch,
        range: std::ops::Range<usize>,
        redirect: Redirect,
    ) -> Result<Option<oneshot::Receiver<()>>, WorkerError> {
        let (host, port) = redirect.addr();
        let Some(routing) = &self.ctx.routing else {
            return Err(WorkerError::Unexpected {
                addr: self.addr.clone(),
                context: "writing to a standalone target",
                reply: "a cluster redirection".into(),
            });
        };
        let Some(w) = routing.writer_for_node(host, port).await else {
            return Err(WorkerError::Closed {
                addr: crate::endpoint::addr_of(host, port),
                context: "redirecting commands (no writer for the node)",
            });
        };
        let ask = matches!(redirect, Redirect::Ask { .. });
        events::CommandsRedirected {
            ask,
            commands: range.len() as u64,
        }
        .emit(&self.ctx.stats.counters);
        if !ask {
            routing.move_slot(redirect.slot(), w);
        }
        let Some((target, lane)) = routing.redirect_lane(w) else {
            return Ok(None);
        };
        let redirected = sub_batch(batch, &[range], ask.then_some(b"ASKING"));
        let (tx, rx) = oneshot::channel();
        let sent = lane.send(Redirected {
            batch: redirected,
            done: tx,
        });
        if sent.is_err() {
            return Err(WorkerError::Closed {
                addr: target,
                context: "redirecting commands (the writer stopped)",
            });
        }
        Ok(Some(rx))
    }

    /// Confirms a batch once `waits` complete. A shard's batches confirm in
    /// order (the queue); a batch another writer handed us (`done`) has no
    /// order to keep and is reported back on its own, so it can never wait
    /// behind a batch that waits for it.
    fn settle_after(
        &mut self,
        shard: usize,
        end: Option<StreamPos>,
        commands: u64,
        done: Option<oneshot::Sender<()>>,
        waits: Vec<oneshot::Receiver<()>>,
    ) {
        let Some(done) = done else {
            self.awaiting.push_back(Awaiting {
                shard,
                end,
                commands,
                done: None,
                waits,
            });
            return;
        };
        events::BatchConfirmed { commands }.emit(&self.ctx.stats.counters);
        self.confirmed += 1;
        if waits.is_empty() {
            let _ = done.send(());
            return;
        }
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
            self.read_more().await?;
        }
    }

    /// Reads the EXEC reply of one of our transactions: each command's
    /// error inside it is reported (it ran, refused for itself), and
    /// `Some(text)` is returned only when EXEC itself failed.
    async fn exec_reply(&mut self, batch: &Batch, begin: usize) -> Result<ExecRead, WorkerError> {
        loop {
            let scanned = scan_exec(&self.buf).map_err(|source| WorkerError::Protocol {
                addr: self.addr.clone(),
                source,
            })?;
            match scanned {
                Some(ExecScan::Ran { len, errors }) => {
                    let texts: Vec<(usize, String)> = errors
                        .into_iter()
                        .map(|(j, r)| (j, String::from_utf8_lossy(&self.buf[r]).into_owned()))
                        .collect();
                    self.buf.advance(len);
                    for (j, text) in texts {
                        // Element j is the reply of the command queued j-th,
                        // after the MULTI at `begin`; it is judged as if the
                        // command had run alone (a refused RESTORE payload
                        // from the stream stops the task there too).
                        let i = begin + 1 + j;
                        if let Outcome::Redirect(_) | Outcome::NotRun =
                            self.outcome(batch, i, ExpectKind::Ok, &text)?
                        {
                            let code = text.split(' ').next().unwrap_or("ERR").to_string();
                            self.report_failed(batch, i, &code, &text);
                        }
                    }
                    return Ok(ExecRead::Ran);
                }
                Some(ExecScan::Discarded { len }) => {
                    self.buf.advance(len);
                    return Ok(ExecRead::Discarded);
                }
                Some(ExecScan::Other(scan)) => {
                    let error = scan
                        .error
                        .map(|r| String::from_utf8_lossy(&self.buf[r]).into_owned());
                    self.buf.advance(scan.len);
                    return Ok(error.map_or(ExecRead::Ran, ExecRead::Error));
                }
                None => self.read_more().await?,
            }
        }
    }

    /// Reads more reply bytes.
    async fn read_more(&mut self) -> Result<(), WorkerError> {
        if self.buf.capacity() - self.buf.len() < 16 * 1024 {
            self.buf.reserve(64 * 1024);
        }
        let limit = self.ctx.reply_timeout;
        let read = tokio::time::timeout(limit, self.rd.read_buf(&mut self.buf)).await;
        match read {
            Ok(Ok(0)) => Err(WorkerError::Closed {
                addr: self.addr.clone(),
                context: "waiting for replies",
            }),
            Ok(Ok(_)) => Ok(()),
            Ok(Err(source)) => Err(WorkerError::Io {
                addr: self.addr.clone(),
                context: "reading replies",
                source,
            }),
            Err(_) => Err(WorkerError::Timeout {
                addr: self.addr.clone(),
                context: "waiting for replies",
                secs: limit.as_secs(),
            }),
        }
    }
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

/// A `RENAME` / `RENAMENX` of one of our temporary names refused with
/// "no such key": sent again after a lost reply, it finds the value moved
/// by the first (see `engine::rebuild::safe_to_resend`).
fn moved_already(cmd: &[u8], reply: &str) -> bool {
    reply.starts_with("ERR no such key")
        && super::resend::with_args(cmd, |args| {
            let rename = args.first().is_some_and(|n| {
                n.eq_ignore_ascii_case(b"RENAME") || n.eq_ignore_ascii_case(b"RENAMENX")
            });
            Some(rename && args.get(1).is_some_and(|k| engine::marker::is_internal(k)))
        })
        .unwrap_or(false)
}

#[cfg(test)]
mod moved_tests {
    use super::*;

    fn encoded(args: &[&[u8]]) -> Vec<u8> {
        let mut out = bytes::BytesMut::new();
        engine::resp::encode::command(&mut out, args);
        out.to_vec()
    }

    #[test]
    fn a_resent_rename_of_our_temporary_name_counts_as_ran() {
        let ours = encoded(&[b"RENAME", b"{x}shardsync:tmp:1", b"k"]);
        assert!(moved_already(&ours, "ERR no such key"));
        assert!(!moved_already(&ours, "WRONGTYPE Operation against a key"));
        let users = encoded(&[b"RENAME", b"a", b"b"]);
        assert!(
            !moved_already(&users, "ERR no such key"),
            "a user's RENAME stays an error"
        );
    }
}
