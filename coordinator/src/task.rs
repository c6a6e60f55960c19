//! The task supervisor: spawns one writer per target node and one source
//! worker per source master, linked to itself, and decides what happens
//! when one of them fails, from the error's [`Recovery`]:
//!
//! - a source worker that lost its link is started again after a backoff,
//!   asking for a partial resync from where it left off (or a full sync,
//!   when its position is no longer trustworthy);
//! - anything fatal, or an outage longer than `--retry-timeout`, fails the
//!   task.
//!
//! Writers reconnect by themselves (their queue and unconfirmed batches
//! must survive a reconnection), so a writer that fails has given up.
//!
//! Shutdown drains: sources stop reading and hand over what they read;
//! once every source is gone the supervisor drops its queue handles, so
//! each writer's queue closes, and a writer stops once its queue is empty
//! and confirmed.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use ractor::{Actor, ActorId, ActorProcessingErr, ActorRef, SupervisionEvent};
use shard_worker::progress::{ResumePoint, ShardState, ShardStats, WriterStats};
use shard_worker::route::{Router, Topology, WriterHandle};
use shard_worker::source::{IntakeOptions, SourceArgs, SourceMsg, SourceWorker};
use shard_worker::write::{
    Backoff, RetryPolicy, Writer, WriterArgs, WriterMsg, DEFAULT_QUEUE, DEFAULT_WINDOW,
};
use shard_worker::{Endpoint, Recovery, WorkerError};
use tokio::sync::{mpsc, oneshot};

use crate::checkpoint::{Checkpoint, CheckpointStore};
use crate::status::{TaskStatus, Workers};

/// How often checkpoints are written while the task runs.
const CHECKPOINT_PERIOD: Duration = Duration::from_secs(5);

/// How a task ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Stopped on request; everything read was applied.
    Drained,
    /// Stopped on request without waiting for everything to be applied.
    Aborted,
    Failed(String),
}

pub struct TaskArgs {
    pub shards: Vec<(Endpoint, Option<ResumePoint>)>,
    pub targets: Vec<Endpoint>,
    pub options: IntakeOptions,
    pub retry: RetryPolicy,
    pub listening_port: u16,
    pub status: Arc<TaskStatus>,
    pub checkpoints: Option<CheckpointStore>,
    pub done: oneshot::Sender<Outcome>,
}

pub enum TaskMsg {
    /// Stop reading and drain.
    Shutdown,
    /// Stop now, without draining.
    Abort,
    /// Start shard `n`'s worker again; `full` forgets its position.
    Respawn {
        shard: usize,
        full: bool,
    },
    Checkpoint,
}

pub struct TaskState {
    shards: Vec<Arc<ShardStats>>,
    shard_eps: Vec<Endpoint>,
    writers: Vec<Arc<WriterStats>>,
    targets: Vec<Endpoint>,
    target_addrs: Vec<String>,
    options: IntakeOptions,
    retry: RetryPolicy,
    listening_port: u16,
    status: Arc<TaskStatus>,
    checkpoints: Option<CheckpointStore>,
    done: Option<oneshot::Sender<Outcome>>,
    /// The master copy of the router, for respawns; dropped at shutdown so
    /// the writers' queues can close.
    router: Option<Router>,
    sources: Vec<Option<ActorRef<SourceMsg>>>,
    writer_refs: Vec<Option<ActorRef<WriterMsg>>>,
    ids: HashMap<ActorId, Child>,
    outages: Vec<Option<Backoff>>,
    initial_resume: Vec<Option<ResumePoint>>,
    stopping: bool,
}

#[derive(Clone, Copy, Debug)]
enum Child {
    Source(usize),
    Writer(usize),
}

pub struct Task;

impl Actor for Task {
    type Msg = TaskMsg;
    type State = TaskState;
    type Arguments = TaskArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<TaskMsg>,
        args: TaskArgs,
    ) -> Result<TaskState, ActorProcessingErr> {
        let n_writers = args.targets.len();
        let shards: Vec<Arc<ShardStats>> = args
            .shards
            .iter()
            .map(|(ep, _)| Arc::new(ShardStats::new(ep.addr(), n_writers)))
            .collect();
        let writers: Vec<Arc<WriterStats>> = args
            .targets
            .iter()
            .map(|ep| Arc::new(WriterStats::new(ep.addr())))
            .collect();
        args.status.set_workers(Workers {
            shards: shards.clone(),
            writers: writers.clone(),
        });
        Ok(TaskState {
            shard_eps: args.shards.iter().map(|(ep, _)| ep.clone()).collect(),
            initial_resume: args.shards.into_iter().map(|(_, r)| r).collect(),
            outages: shards.iter().map(|_| None).collect(),
            sources: shards.iter().map(|_| None).collect(),
            shards,
            target_addrs: args.targets.iter().map(Endpoint::addr).collect(),
            targets: args.targets,
            writer_refs: Vec::new(),
            writers,
            options: args.options,
            retry: args.retry,
            listening_port: args.listening_port,
            status: args.status,
            checkpoints: args.checkpoints,
            done: Some(args.done),
            router: None,
            ids: HashMap::new(),
            stopping: false,
        })
    }

    async fn post_start(
        &self,
        myself: ActorRef<TaskMsg>,
        state: &mut TaskState,
    ) -> Result<(), ActorProcessingErr> {
        let shard_stats: Arc<[Arc<ShardStats>]> = state.shards.clone().into();
        let mut handles = Vec::new();
        for (index, stats) in state.writers.clone().into_iter().enumerate() {
            let (tx, rx) = mpsc::channel(DEFAULT_QUEUE);
            let endpoint = state.targets[index].clone();
            let (actor, _) = Actor::spawn_linked(
                None,
                Writer,
                WriterArgs {
                    index,
                    endpoint,
                    rx,
                    shards: shard_stats.clone(),
                    stats: stats.clone(),
                    retry: state.retry.clone(),
                    window: DEFAULT_WINDOW,
                },
                myself.get_cell(),
            )
            .await?;
            state.ids.insert(actor.get_id(), Child::Writer(index));
            state.writer_refs.push(Some(actor));
            handles.push(WriterHandle {
                index,
                target: stats.target.clone(),
                tx,
                stats,
            });
        }
        state.router = Some(Router {
            topology: Topology::Single,
            writers: handles,
        });
        for shard in 0..state.shards.len() {
            let resume = state.initial_resume[shard].take();
            spawn_source(&myself, state, shard, resume).await?;
        }
        myself.send_interval(CHECKPOINT_PERIOD, || TaskMsg::Checkpoint);
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<TaskMsg>,
        message: TaskMsg,
        state: &mut TaskState,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            TaskMsg::Shutdown => {
                if state.stopping {
                    return Ok(());
                }
                state.stopping = true;
                tracing::info!("stopping: no more reads; applying what was read");
                for source in state.sources.iter().flatten() {
                    let _ = source.send_message(SourceMsg::Stop);
                }
                check_drained(&myself, state);
            }
            TaskMsg::Abort => {
                tracing::warn!("stopping without waiting for in-flight writes");
                finish(&myself, state, Outcome::Aborted);
            }
            TaskMsg::Respawn { shard, full } => {
                if !state.stopping {
                    let resume = if full {
                        None
                    } else {
                        state.shards[shard].handover_point()
                    };
                    spawn_source(&myself, state, shard, resume).await?;
                }
            }
            TaskMsg::Checkpoint => write_checkpoints(state),
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<TaskMsg>,
        event: SupervisionEvent,
        state: &mut TaskState,
    ) -> Result<(), ActorProcessingErr> {
        match event {
            SupervisionEvent::ActorStarted(cell) => {
                if let Some(Child::Source(shard)) = state.ids.get(&cell.get_id()) {
                    // Connected and past the handshake: the outage is over.
                    state.outages[*shard] = None;
                }
            }
            SupervisionEvent::ActorTerminated(cell, _, _) => {
                match state.ids.remove(&cell.get_id()) {
                    Some(Child::Source(shard)) => state.sources[shard] = None,
                    Some(Child::Writer(w)) => state.writer_refs[w] = None,
                    None => {}
                }
                check_drained(&myself, state);
            }
            SupervisionEvent::ActorFailed(cell, err) => {
                let child = state.ids.remove(&cell.get_id());
                let worker_err = err.downcast_ref::<WorkerError>();
                let message = err.to_string();
                match child {
                    Some(Child::Source(shard)) => {
                        state.sources[shard] = None;
                        if state.stopping {
                            check_drained(&myself, state);
                            return Ok(());
                        }
                        let recovery = worker_err.map_or(Recovery::Fatal, WorkerError::recovery);
                        source_failed(&myself, state, shard, recovery, message);
                    }
                    Some(Child::Writer(w)) => {
                        state.writer_refs[w] = None;
                        fail(&myself, state, message);
                    }
                    None => {}
                }
            }
            _ => {}
        }
        Ok(())
    }
}

async fn spawn_source(
    myself: &ActorRef<TaskMsg>,
    state: &mut TaskState,
    shard: usize,
    resume: Option<ResumePoint>,
) -> Result<(), ActorProcessingErr> {
    let Some(router) = state.router.clone() else {
        return Ok(());
    };
    let (actor, _) = Actor::spawn_linked(
        None,
        SourceWorker,
        SourceArgs {
            shard,
            endpoint: state.shard_eps[shard].clone(),
            router,
            stats: state.shards[shard].clone(),
            resume,
            options: state.options.clone(),
            listening_port: state.listening_port,
        },
        myself.get_cell(),
    )
    .await?;
    state.ids.insert(actor.get_id(), Child::Source(shard));
    state.sources[shard] = Some(actor);
    Ok(())
}

/// A source worker failed: retry it, or fail the task.
fn source_failed(
    myself: &ActorRef<TaskMsg>,
    state: &mut TaskState,
    shard: usize,
    recovery: Recovery,
    message: String,
) {
    let stats = &state.shards[shard];
    if recovery == Recovery::Fatal {
        stats.set_state(ShardState::Failed);
        fail(myself, state, message);
        return;
    }
    stats.set_state(ShardState::Reconnecting);
    stats
        .source_reconnects
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let outage = state.outages[shard].get_or_insert_with(|| Backoff::start(&state.retry));
    match outage.next_delay(&state.retry) {
        Some(delay) => {
            let full = recovery == Recovery::FullResync;
            tracing::warn!(
                source = %stats.source,
                error = %message,
                retry_in_ms = delay.as_millis() as u64,
                full_resync = full,
                "source connection failed; retrying"
            );
            myself.send_after(delay, move || TaskMsg::Respawn { shard, full });
        }
        None => {
            let secs = outage.elapsed().as_secs();
            stats.set_state(ShardState::Failed);
            let message = WorkerError::RetriesExhausted {
                addr: stats.source.clone(),
                secs,
                last: message,
            }
            .to_string();
            fail(myself, state, message);
        }
    }
}

/// Once every source has stopped, let the queues close; once every writer
/// has drained, finish.
fn check_drained(myself: &ActorRef<TaskMsg>, state: &mut TaskState) {
    if !state.stopping {
        return;
    }
    if state.sources.iter().all(Option::is_none) {
        state.router = None;
    }
    if state.writer_refs.iter().all(Option::is_none) {
        finish(myself, state, Outcome::Drained);
    }
}

fn fail(myself: &ActorRef<TaskMsg>, state: &mut TaskState, message: String) {
    state.status.set_failed(message.clone());
    finish(myself, state, Outcome::Failed(message));
}

/// Stops every child, writes the checkpoints and reports the outcome.
fn finish(myself: &ActorRef<TaskMsg>, state: &mut TaskState, outcome: Outcome) {
    let Some(done) = state.done.take() else {
        return;
    };
    state.stopping = true;
    for source in state.sources.iter().flatten() {
        source.stop(None);
    }
    for writer in state.writer_refs.iter().flatten() {
        writer.stop(None);
    }
    state.router = None;
    write_checkpoints(state);
    if !matches!(outcome, Outcome::Failed(_)) {
        state.status.set_stopped();
    }
    let _ = done.send(outcome);
    myself.stop(None);
}

fn write_checkpoints(state: &TaskState) {
    let Some(store) = &state.checkpoints else {
        return;
    };
    for stats in &state.shards {
        let ckpt = Checkpoint::of(stats, &state.target_addrs);
        if let Err(e) = store.save(&ckpt) {
            tracing::error!(error = %e, "checkpoint not written");
        }
    }
}
