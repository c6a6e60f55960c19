//! The writer actor: one per target node.
//!
//! It owns the receiving ends of its bounded queue and of its redirect lane.
//! Connecting happens in messages to itself (never blocking the mailbox),
//! and the socket belongs to a pipeline task that reports back when it ends.
//! On a lost connection the writer reconnects with backoff and resends what
//! was not confirmed; it fails (and so reaches its supervisor) only on a
//! fatal error or when an outage outlasts the retry policy (an outage ends
//! only once a connection confirmed something). It stops by itself once
//! every producer has dropped its queue handle and everything is confirmed:
//! that is how a task drains.

mod failover;
mod pipeline;
mod receiver;
mod resend;
mod verdict;

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use ractor::{Actor, ActorProcessingErr, ActorRef};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

pub use crate::retry::{Backoff, RetryPolicy};
pub use pipeline::{OnError, PipelineExit};

use crate::conn::Conn;
use crate::endpoint::Endpoint;
use crate::error::{Recovery, WorkerError};
use crate::events;
use crate::progress::WriterStats;
use crate::route::{Batch, ClusterRouting, ExpectKind, Overflow, Redirected};
use pipeline::{PipelineCtx, PipelineStart, Work};
use receiver::Awaiting;

/// Default number of batches written but not yet confirmed.
pub const DEFAULT_WINDOW: usize = 8;
/// Default capacity of a writer's queue, in batches.
pub const DEFAULT_QUEUE: usize = 16;

/// Everything a writer needs to start.
pub struct WriterArgs {
    pub index: usize,
    pub endpoint: Endpoint,
    pub rx: mpsc::Receiver<Batch>,
    /// Commands other writers redirect here (MOVED/ASK).
    pub redirects: mpsc::UnboundedReceiver<Redirected>,
    /// The cluster slot map (cluster targets only).
    pub routing: Option<Arc<ClusterRouting>>,
    /// Batches that did not fit in the queue (shared with producers).
    pub overflow: Arc<Overflow>,
    /// Every shard's stats, indexed by shard, to confirm batches into.
    pub shards: Arc<crate::progress::ShardList>,
    pub stats: Arc<WriterStats>,
    pub retry: RetryPolicy,
    pub window: usize,
    /// The target's version, for rebuilding RESTOREs it refuses.
    pub target_caps: engine::rebuild::TargetCaps,
    /// Keeps this writer's temporary key names apart from others'.
    pub tmp_scope: String,
    /// Exactly-once: where each shard's marker is on this node.
    pub markers: Option<WriterMarkers>,
    /// What a command the node refuses for itself does.
    pub on_error: OnError,
}

/// Where each shard's marker is found on a writer's node (in
/// `route::MARKER_DB`).
#[derive(Clone, Debug)]
pub struct WriterMarkers {
    /// Marker key per shard (indexed like the shards).
    pub keys: Vec<bytes::Bytes>,
    /// The name of the task's writer connections (`CLIENT SETNAME`): before
    /// markers are read, every other connection of that name on the node
    /// is closed, so that nothing an earlier connection sent (still unread
    /// in the node's socket buffer, say after a freeze) runs after the read.
    pub client_name: String,
}

/// The name the writers of task `task` give their connections.
pub fn client_name(task: &str) -> String {
    format!("shardsync-writer-{task}")
}

/// Closes every connection named `name` on the node but `conn` itself:
/// what they sent and the node did not read yet is dropped with them.
/// Needs `CLIENT LIST` and `CLIENT KILL`; a refusal is reported and the
/// markers are read anyway.
pub async fn end_earlier_connections(conn: &mut Conn, name: &str) -> Result<u64, WorkerError> {
    let own = match conn.request(&["CLIENT", "ID"]).await? {
        engine::resp::Frame::Integer(id) => id,
        _ => -1,
    };
    let list = match conn.request(&["CLIENT", "LIST", "TYPE", "normal"]).await? {
        engine::resp::Frame::Bulk(text) => String::from_utf8_lossy(&text).into_owned(),
        other => {
            tracing::warn!(target_node = %conn.addr, reply = %other.to_text(), "cannot list the node's clients: a connection of an earlier run could still apply what it sent after the markers are read");
            return Ok(0);
        }
    };
    let mut ended = 0;
    for id in earlier_connections(&list, name, own) {
        if let engine::resp::Frame::Integer(1) = conn
            .request(&["CLIENT", "KILL", "ID", &id.to_string()])
            .await?
        {
            ended += 1;
        }
    }
    Ok(ended)
}

/// The ids of the clients named `name` in a `CLIENT LIST` reply, `own`
/// aside.
pub fn earlier_connections(list: &str, name: &str, own: i64) -> Vec<i64> {
    list.lines()
        .filter_map(|line| {
            let mut id = None;
            let mut named = false;
            for field in line.split(' ') {
                if let Some(v) = field.strip_prefix("id=") {
                    id = v.parse::<i64>().ok();
                } else if let Some(v) = field.strip_prefix("name=") {
                    named = v == name;
                }
            }
            id.filter(|&i| named && i != own)
        })
        .collect()
}

pub enum WriterMsg {
    /// Try to (re)connect and start a pipeline.
    Connect,
    /// The pipeline task ended.
    PipelineExited(Box<PipelineExit>),
}

pub struct WriterState {
    endpoint: Endpoint,
    ctx: Arc<PipelineCtx>,
    rx: Option<mpsc::Receiver<Batch>>,
    redirects: Option<mpsc::UnboundedReceiver<Redirected>>,
    /// Work to resend first on the next connection.
    unconfirmed: VecDeque<Work>,
    /// Batches whose replies are in, waiting on redirects, in order.
    awaiting: VecDeque<Awaiting>,
    retry: RetryPolicy,
    outage: Option<Backoff>,
    pipeline: Option<JoinHandle<()>>,
    markers: Option<WriterMarkers>,
}

pub struct Writer;

impl Actor for Writer {
    type Msg = WriterMsg;
    type State = WriterState;
    type Arguments = WriterArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: WriterArgs,
    ) -> Result<WriterState, ActorProcessingErr> {
        myself.send_message(WriterMsg::Connect)?;
        Ok(WriterState {
            endpoint: args.endpoint,
            ctx: Arc::new(PipelineCtx {
                writer: args.index,
                shards: args.shards,
                stats: args.stats,
                routing: args.routing,
                overflow: args.overflow,
                window: args.window,
                reply_timeout: args.retry.reply_timeout,
                fallback: pipeline::Fallback {
                    caps: std::sync::Mutex::new(args.target_caps),
                    tmp_names: std::sync::Mutex::new(engine::split::TmpNames::new(args.tmp_scope)),
                },
                on_error: args.on_error,
            }),
            rx: Some(args.rx),
            redirects: Some(args.redirects),
            unconfirmed: VecDeque::new(),
            awaiting: VecDeque::new(),
            retry: args.retry,
            outage: None,
            pipeline: None,
            markers: args.markers,
        })
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        state: &mut WriterState,
    ) -> Result<(), ActorProcessingErr> {
        if let Some(task) = state.pipeline.take() {
            task.abort();
        }
        state.ctx.stats.connected.store(false, Ordering::Relaxed);
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        message: WriterMsg,
        state: &mut WriterState,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            WriterMsg::Connect => connect(&myself, state).await,
            WriterMsg::PipelineExited(exit) => pipeline_exited(&myself, state, *exit),
        }
    }
}

/// How long a cluster node may be unreachable before the writer asks the
/// other nodes whether a replica took its place.
const FOLLOW_AFTER: std::time::Duration = std::time::Duration::from_secs(1);

async fn connect(
    myself: &ActorRef<WriterMsg>,
    state: &mut WriterState,
) -> Result<(), ActorProcessingErr> {
    if let Some(now) = failed_over(state).await {
        // What the old node acknowledged and never passed on is not on
        // its replica: only the markers there say where to resume.
        return Err(Box::new(WorkerError::TargetFailedOver {
            addr: state.endpoint.addr(),
            now,
        }));
    }
    let conn = match Conn::open_authenticated(&state.endpoint).await {
        Ok(mut conn) => {
            // Lets operators see in CLIENT LIST which connections are ours;
            // failure (a very old server) does not matter.
            let name = state
                .markers
                .as_ref()
                .map_or_else(|| "shardsync-writer".to_string(), |m| m.client_name.clone());
            let _ = conn.request(&["CLIENT", "SETNAME", &name]).await;
            // What this node runs now (it may have been replaced since the
            // precheck): rebuilt values must suit it.
            if let Ok(engine::resp::Frame::Bulk(info)) = conn.request(&["INFO", "server"]).await {
                let info = String::from_utf8_lossy(&info);
                if let Some(caps) = info
                    .lines()
                    .find_map(|l| l.strip_prefix("redis_version:"))
                    .and_then(|v| engine::rebuild::TargetCaps::parse(v.trim()))
                {
                    *state.ctx.fallback.caps.lock().expect("caps lock") = caps;
                }
            }
            conn
        }
        Err(err) => return retry_later(myself, state, err),
    };
    if state.outage.is_some() {
        tracing::info!(target_node = %state.endpoint, "reconnected to the target");
    }
    let mut conn = conn;
    if let Some(m) = &state.markers {
        if let Err(err) = end_earlier_connections(&mut conn, &m.client_name).await {
            return retry_later(myself, state, err);
        }
    }
    if let Err(err) = confirm_applied(&mut conn, state).await {
        return retry_later(myself, state, err);
    }
    let stats = &state.ctx.stats;
    stats.connected.store(true, Ordering::Relaxed);
    let mut resend = std::mem::take(&mut state.unconfirmed);
    resend::drop_settled_guards(resend.iter_mut().map(|(batch, _)| batch));
    report_resend(&resend, stats, &state.endpoint.addr());
    let start = PipelineStart {
        conn,
        rx: state
            .rx
            .take()
            .expect("the queue is here between pipelines"),
        redirects: state
            .redirects
            .take()
            .expect("the redirect lane is here between pipelines"),
        resend,
        awaiting: std::mem::take(&mut state.awaiting),
    };
    let ctx = state.ctx.clone();
    let me = myself.clone();
    state.pipeline = Some(tokio::spawn(async move {
        let exit = pipeline::run(start, &ctx).await;
        // If the actor is gone there is nobody left to tell.
        let _ = me.send_message(WriterMsg::PipelineExited(Box::new(exit)));
    }));
    Ok(())
}

fn pipeline_exited(
    myself: &ActorRef<WriterMsg>,
    state: &mut WriterState,
    exit: PipelineExit,
) -> Result<(), ActorProcessingErr> {
    state.pipeline = None;
    state.rx = Some(exit.rx);
    state.redirects = Some(exit.redirects);
    state.unconfirmed = exit.unconfirmed;
    state.awaiting = exit.awaiting;
    if exit.confirmed > 0 {
        // This connection made progress: whatever comes next is a new outage.
        state.outage = None;
    }
    let stats = &state.ctx.stats;
    stats.counters.inflight_commands.set(0);
    stats.connected.store(false, Ordering::Relaxed);
    match exit.result {
        Ok(()) => {
            // The queue closed and everything is confirmed: drained.
            myself.stop(None);
            Ok(())
        }
        Err(err @ WorkerError::Resend { .. }) => {
            tracing::info!(target_node = %state.endpoint, "{err}");
            myself.send_message(WriterMsg::Connect)?;
            Ok(())
        }
        Err(err) => {
            events::TargetConnectionLost.emit(&stats.counters);
            retry_later(myself, state, err)
        }
    }
}

/// A cluster node unreachable for a while: the address of the promoted
/// replica that serves its slots now, if the cluster has failed it over
/// (see `failover.rs`).
async fn failed_over(state: &WriterState) -> Option<String> {
    let (Some(routing), Some(outage)) = (state.ctx.routing.as_ref(), &state.outage) else {
        return None;
    };
    if outage.elapsed() < FOLLOW_AFTER {
        return None;
    }
    let next = failover::find_successor(routing, state.ctx.writer, &state.endpoint).await?;
    // Slots that went to a master with a writer of its own are followed
    // by MOVED replies once this node answers again.
    routing.find(&next.addr()).is_none().then(|| next.addr())
}

/// Schedules a reconnection, or fails when waiting cannot help.
fn retry_later(
    myself: &ActorRef<WriterMsg>,
    state: &mut WriterState,
    err: WorkerError,
) -> Result<(), ActorProcessingErr> {
    if err.recovery() == Recovery::Fatal {
        return Err(Box::new(err));
    }
    let outage = state
        .outage
        .get_or_insert_with(|| Backoff::start(&state.retry));
    let Some(delay) = outage.next_delay(&state.retry) else {
        return Err(Box::new(WorkerError::RetriesExhausted {
            addr: state.endpoint.addr(),
            secs: outage.elapsed().as_secs(),
            last: err.to_string(),
        }));
    };
    events::TargetRetry {
        target: &state.endpoint.addr(),
        error: &err.to_string(),
        retry_in: delay,
    }
    .emit();
    myself.send_after(delay, || WriterMsg::Connect);
    Ok(())
}

/// Exactly-once: before anything is sent again on a new connection, the
/// node's markers say which of the unconfirmed batches' transactions it
/// applied. Those are not sent again. Batches are confirmed here only
/// while every batch before them is (confirmations stay in order: the
/// node-wide marker and the order guards count on it); a batch applied
/// whole behind one that is not goes out without its transactions, to be
/// confirmed in its turn. Transactions that refusals held back need not
/// form a prefix, so each one's marker decides for itself. A marker the
/// node refuses to read (CLUSTERDOWN, LOADING) says nothing: the
/// connection is tried again later.
async fn confirm_applied(conn: &mut Conn, state: &mut WriterState) -> Result<(), WorkerError> {
    if state.markers.is_none() || state.unconfirmed.is_empty() || !state.awaiting.is_empty() {
        return Ok(());
    }
    let ctx = state.ctx.clone();
    let mut unconfirmed = std::mem::take(&mut state.unconfirmed);
    let mut keep = VecDeque::with_capacity(unconfirmed.len());
    let mut skipped = 0u64;
    let mut partly = 0u64;
    let mut in_order = true;
    while let Some((batch, done)) = unconfirmed.pop_front() {
        let txs = match batch.end.filter(|_| batch.wrapped) {
            Some(_) => marked_transactions(&batch),
            None => Vec::new(),
        };
        if txs.is_empty() {
            in_order = false;
            keep.push_back((batch, done));
            continue;
        }
        let applied = match applied_transactions(conn, &ctx, &batch, &txs).await {
            Ok(applied) => applied,
            Err(err) => {
                // Nothing is lost: everything goes out on a later connection.
                keep.push_back((batch, done));
                keep.extend(unconfirmed);
                state.unconfirmed = keep;
                return Err(err);
            }
        };
        if in_order && applied.iter().all(|a| *a) {
            skipped += 1;
            events::BatchConfirmed {
                commands: batch.len() as u64,
            }
            .emit(&ctx.stats.counters);
            match done {
                Some(done) => {
                    let _ = done.send(());
                }
                None => ctx.shards[batch.shard].note_confirmed(ctx.writer, batch.end),
            }
            continue;
        }
        in_order = false;
        if applied.iter().any(|a| *a) {
            partly += 1;
            let begins: Vec<usize> = txs
                .iter()
                .zip(&applied)
                .filter(|(_, a)| **a)
                .map(|((begin, _), _)| *begin)
                .collect();
            keep.push_back((resend::without_transactions(&batch, &begins), done));
        } else {
            keep.push_back((batch, done));
        }
    }
    if skipped > 0 || partly > 0 {
        tracing::info!(
            target_node = %state.endpoint,
            batches = skipped,
            partly_applied = partly,
            "the node's markers show batches applied before the connection was lost; not sending them again"
        );
    }
    state.unconfirmed = keep;
    Ok(())
}

/// Whether each transaction `txs` of `batch` (from [`marked_transactions`])
/// is applied on the node, by its marker.
async fn applied_transactions(
    conn: &mut Conn,
    ctx: &PipelineCtx,
    batch: &Batch,
    txs: &[(usize, Vec<u8>)],
) -> Result<Vec<bool>, WorkerError> {
    let Some(end) = batch.end else {
        return Ok(vec![false; txs.len()]);
    };
    let epoch = ctx.shards[batch.shard].epoch();
    let keys: Vec<Vec<&[u8]>> = txs.iter().map(|(_, key)| vec![&b"GET"[..], key]).collect();
    let replies = conn.pipeline(&keys).await?;
    replies
        .iter()
        .map(|reply| match reply {
            engine::resp::Frame::Bulk(v) => Ok(matches!(
                engine::marker::Marker::parse(v),
                Some(engine::marker::Marker::Applied { epoch: e, offset, .. })
                    if e == epoch && offset >= end.offset
            )),
            engine::resp::Frame::Error(e) => Err(WorkerError::from_reply(&conn.addr, e)
                .unwrap_or_else(|| WorkerError::Unexpected {
                    addr: conn.addr.clone(),
                    context: "reading the node's markers",
                    reply: String::from_utf8_lossy(e).into_owned(),
                })),
            _ => Ok(false),
        })
        .collect()
}

/// Each of our transactions in `batch`: where its MULTI is, and the key of
/// the marker it sets (the last SET of a `shardsync:applied:` key in it).
pub(crate) fn marked_transactions(batch: &Batch) -> Vec<(usize, Vec<u8>)> {
    let mut out = Vec::new();
    let mut begin = None;
    let mut key = None;
    for i in 0..batch.len() {
        match batch.replies[i].kind {
            ExpectKind::TxBegin => {
                begin = Some(i);
                key = None;
            }
            ExpectKind::TxEnd => {
                if let (Some(b), Some(k)) = (begin.take(), key.take()) {
                    out.push((b, k));
                }
            }
            _ if begin.is_some() => {
                if let Some((k, _)) = resend::marker_set(batch.command_bytes(i)) {
                    key = Some(k);
                }
            }
            _ => {}
        }
    }
    out
}

/// The marker of each shard on the node (`None` where there is none). The
/// connection is in database 0 (a new one), where markers are.
pub async fn read_markers(
    conn: &mut Conn,
    markers: &WriterMarkers,
) -> Result<Vec<Option<engine::marker::Marker>>, WorkerError> {
    let mut found = Vec::with_capacity(markers.keys.len());
    for key in &markers.keys {
        let marker = match conn.request(&[&b"GET"[..], key]).await? {
            engine::resp::Frame::Bulk(value) => engine::marker::Marker::parse(&value),
            _ => None,
        };
        found.push(marker);
    }
    Ok(found)
}

/// Counts what is about to be sent a second time.
fn report_resend(resend: &VecDeque<Work>, stats: &WriterStats, target: &str) {
    let mut commands = 0;
    let mut non_idempotent = 0;
    let mut marked = 0;
    for (batch, _) in resend {
        for i in 0..batch.len() {
            commands += 1;
            if batch.wrapped {
                // A transaction the marker showed not applied: it runs once.
                marked += 1;
                continue;
            }
            let safe = resend::with_args(batch.command_bytes(i), |args| {
                Some(engine::rebuild::safe_to_resend(args))
            });
            if safe != Some(true) {
                non_idempotent += 1;
            }
        }
    }
    events::CommandsResent {
        target,
        commands,
        non_idempotent,
        marked,
    }
    .emit(&stats.counters);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn earlier_connections_are_the_others_of_our_name() {
        let list = "id=3 addr=127.0.0.1:5 laddr=127.0.0.1:6379 fd=8 name=shardsync-writer-ab age=9 db=0\n\
                    id=7 addr=127.0.0.1:6 laddr=127.0.0.1:6379 fd=9 name=shardsync-writer-ab age=1 db=0\n\
                    id=8 addr=127.0.0.1:7 laddr=127.0.0.1:6379 fd=10 name=shardsync-writer-cd age=1 db=0\n\
                    id=9 addr=127.0.0.1:8 laddr=127.0.0.1:6379 fd=11 name= age=1 db=0\n";
        assert_eq!(earlier_connections(list, "shardsync-writer-ab", 7), [3]);
        assert_eq!(earlier_connections(list, "shardsync-writer-ab", -1), [3, 7]);
        assert!(earlier_connections(list, "other", 7).is_empty());
    }
}
