//! The task supervisor: spawns one writer per target node and one source
//! worker per source master, linked to itself, and decides what happens
//! when one of them fails, from the error's [`Recovery`]:
//!
//! - a source worker that lost its link is started again after a backoff,
//!   asking for a partial resync from where it left off (or a full sync,
//!   when its position is no longer trustworthy);
//! - anything fatal, an outage longer than `--retry-timeout`, or full
//!   resyncs that keep failing, fails the task. An outage ends only when
//!   the shard made progress, so a failure that recurs right after every
//!   reconnection still runs into the timeout.
//!
//! Writers reconnect by themselves (their queue and unconfirmed batches
//! must survive a reconnection), so a writer that fails has given up. On a
//! cluster target, a writer redirected to a node nobody writes to yet asks
//! the supervisor for a new writer ([`NodeRequest`]).
//!
//! Shutdown drains: sources stop reading and hand over what they read;
//! once every source is gone the supervisor drops its queue handles, so
//! each writer's queue closes, and a writer stops once its queue is empty
//! and confirmed.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use engine::slot::SLOTS;
use ractor::{Actor, ActorId, ActorProcessingErr, ActorRef, SupervisionEvent};
use shard_worker::progress::{ResumePoint, ShardList, ShardState, ShardStats, WriterStats};
use shard_worker::route::{ClusterRouting, NodeRequest, Overflow, Router, WriterHandle};
use shard_worker::source::handover::{Peer, Peers};
use shard_worker::source::{IntakeOptions, SourceArgs, SourceMsg, SourceWorker};
use shard_worker::write::{
    Backoff, RetryPolicy, Writer, WriterArgs, WriterMsg, DEFAULT_QUEUE, DEFAULT_WINDOW,
};
use shard_worker::{events, Endpoint, Recovery, WorkerError};
use tokio::sync::{mpsc, oneshot};

use crate::checkpoint::{Checkpoint, CheckpointStore};
use crate::precheck::{ClusterMasters, ShardPlan, TargetPlan};
use crate::status::{TaskStatus, Workers};

/// How often checkpoints are written while the task runs.
const CHECKPOINT_PERIOD: Duration = Duration::from_secs(5);
/// Full resyncs in a row that fail before the shard made any progress:
/// beyond this the task fails (each one costs the source a fork).
const MAX_FUTILE_FULL_RESYNCS: u32 = 3;
/// Writers a task can run; shards track progress per writer up to this.
const MIN_WRITER_SLOTS: usize = 256;

/// How a task ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Stopped on request; everything read was applied.
    Drained,
    /// Stopped on request without waiting for everything to be applied.
    Aborted,
    Failed(String),
    /// The target's topology changed under the task (a node failed over):
    /// stopped without draining, to start again from the target's markers.
    Restart(String),
}

pub struct TaskArgs {
    /// The target's name in status and metrics.
    pub name: String,
    pub shards: Vec<ShardPlan>,
    pub target: TargetPlan,
    pub options: IntakeOptions,
    pub retry: RetryPolicy,
    pub listening_port: u16,
    pub status: Arc<TaskStatus>,
    pub checkpoints: Option<CheckpointStore>,
    pub done: oneshot::Sender<Outcome>,
    /// The task's id (its marker keys carry it).
    pub task_id: String,
    /// Batches carry markers (exactly-once).
    pub exactly_once: bool,
    /// What a command a target node refuses for itself does.
    pub on_error: shard_worker::write::OnError,
    /// A Sentinel-managed source: its master is asked again before each
    /// reconnection (a failover is followed).
    pub sentinel: Option<crate::url::SentinelSpec>,
    /// A Sentinel-managed target: when its Sentinels name another master,
    /// the task starts again from the target's markers there.
    pub target_sentinel: Option<crate::url::SentinelSpec>,
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
    /// The Sentinels of a Sentinel-managed target name another master.
    TargetFailedOver(String),
    /// A writer needs a writer for a node not seen before.
    AddNode(NodeRequest),
    /// A master joined the source cluster: it gets a shard.
    AddShard {
        host: String,
        port: u16,
    },
    Checkpoint,
}

/// An outage of a shard's source link, and where the shard was when it
/// began (progress since then ends it).
struct Outage {
    backoff: Backoff,
    marker: (u64, u64),
    futile_full_resyncs: u32,
}

pub struct TaskState {
    shards: Vec<Arc<ShardStats>>,
    /// The same, as writers see them (shards may be added).
    shard_list: Arc<ShardList>,
    shard_eps: Vec<Endpoint>,
    targets: Vec<Endpoint>,
    target_addrs: Vec<String>,
    cluster: Option<ClusterMasters>,
    options: IntakeOptions,
    retry: RetryPolicy,
    on_error: shard_worker::write::OnError,
    listening_port: u16,
    status: Arc<TaskStatus>,
    /// This target's shards and writers, as status and metrics see them.
    group: Arc<Workers>,
    checkpoints: Option<CheckpointStore>,
    done: Option<oneshot::Sender<Outcome>>,
    /// The master copy of the router, for respawns; dropped at shutdown so
    /// the writers' queues can close.
    router: Option<Router>,
    routing: Option<Arc<ClusterRouting>>,
    sources: Vec<Option<ActorRef<SourceMsg>>>,
    writer_refs: Vec<Option<ActorRef<WriterMsg>>>,
    ids: HashMap<ActorId, Child>,
    outages: Vec<Option<Outage>>,
    initial_resume: Vec<Option<ResumePoint>>,
    /// Per shard, on a cluster target: what its nodes applied already.
    skips: Vec<Option<shard_worker::route::Skip>>,
    max_writers: usize,
    stopping: bool,
    /// Each shard's marker key, when batches carry markers.
    marker_keys: Option<Vec<bytes::Bytes>>,
    /// The name of the task's writer connections.
    writer_name: String,
    /// Per shard, what its markers say of the target (fresh task).
    fresh: Vec<bool>,
    /// Per shard, the slot ranges its source master serves (cluster source).
    source_slots: Vec<Vec<(u16, u16)>>,
    /// On a cluster source, every shard, for hand-overs of keys that
    /// change masters (`shard_worker::source::handover`).
    peers: Option<Arc<Peers>>,
    /// Per shard: its master joined the source cluster mid-sync.
    joined: Vec<bool>,
    task_id: String,
    /// On a cluster source with markers: the source's masters as the
    /// precheck saw them, for the recorder of its slot owners, and the
    /// recorder once it runs (ended with the task).
    owners_at_start: Option<Vec<engine::ownership::Owner>>,
    /// The shards that begin with a full sync over an earlier copy.
    copying_at_start: Vec<usize>,
    recorder: Option<AbortOnDrop>,
    sentinel: Option<crate::url::SentinelSpec>,
    target_sentinel: Option<crate::url::SentinelSpec>,
    target_watch: Option<AbortOnDrop>,
}

/// A spawned task that ends when this is dropped (with the task's state).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
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
        let targets = args.target.endpoints();
        let max_writers = MIN_WRITER_SLOTS.max(4 * targets.len());
        let shards: Vec<Arc<ShardStats>> = args
            .shards
            .iter()
            .map(|plan| {
                let stats = Arc::new(ShardStats::new(plan.endpoint.addr(), max_writers));
                stats.ours.store(plan.ours, Ordering::Relaxed);
                if let Some(point) = &plan.resume {
                    stats.seed(point);
                }
                stats.seed_epoch(plan.epoch);
                stats
            })
            .collect();
        let group = args
            .status
            .add_group(Workers::new(args.name.clone(), shards.clone()));
        let cluster_source = args.shards.iter().any(|s| !s.slots.is_empty());
        let peers = cluster_source.then(|| {
            let peers = Arc::new(Peers::new());
            for (shard, (plan, stats)) in args.shards.iter().zip(&shards).enumerate() {
                peers.add(Peer {
                    shard,
                    endpoint: plan.endpoint.clone(),
                    stats: stats.clone(),
                    joined: false,
                });
            }
            peers
        });
        let marker_keys = args.exactly_once.then(|| {
            args.shards
                .iter()
                .map(|s| engine::marker::key(&args.task_id, &s.endpoint.addr(), None).into())
                .collect()
        });
        let owners_at_start = (cluster_source && marker_keys.is_some()).then(|| {
            args.shards
                .iter()
                .map(|s| engine::ownership::Owner {
                    addr: s.endpoint.addr(),
                    epoch: s.config_epoch,
                    slots: s.slots.clone(),
                })
                .collect()
        });
        // Shards copied again over a copy the target's markers could have
        // resumed (their "applied" marker stays until the full sync's own
        // replaces it, after its sweep).
        let copying_at_start = args
            .shards
            .iter()
            .enumerate()
            .filter(|(_, s)| s.copy_again)
            .map(|(i, _)| i)
            .collect();
        Ok(TaskState {
            owners_at_start,
            copying_at_start,
            recorder: None,
            sentinel: args.sentinel.clone(),
            target_sentinel: args.target_sentinel.clone(),
            target_watch: None,
            marker_keys,
            writer_name: shard_worker::write::client_name(&args.task_id),
            task_id: args.task_id.clone(),
            fresh: args.shards.iter().map(|s| s.fresh).collect(),
            source_slots: args.shards.iter().map(|s| s.slots.clone()).collect(),
            joined: vec![false; args.shards.len()],
            peers,
            shard_eps: args.shards.iter().map(|s| s.endpoint.clone()).collect(),
            skips: args.shards.iter().map(|s| s.skip.clone()).collect(),
            initial_resume: args.shards.into_iter().map(|s| s.resume).collect(),
            outages: shards.iter().map(|_| None).collect(),
            sources: shards.iter().map(|_| None).collect(),
            shard_list: Arc::new(ShardList::new(&shards)),
            shards,
            target_addrs: targets.iter().map(Endpoint::addr).collect(),
            cluster: match args.target {
                TargetPlan::Cluster { masters } => Some(masters),
                TargetPlan::Standalone(_) => None,
            },
            targets,
            writer_refs: Vec::new(),
            options: args.options,
            retry: args.retry,
            on_error: args.on_error,
            listening_port: args.listening_port,
            status: args.status,
            group,
            checkpoints: args.checkpoints,
            done: Some(args.done),
            router: None,
            routing: None,
            ids: HashMap::new(),
            max_writers,
            stopping: false,
        })
    }

    async fn post_start(
        &self,
        myself: ActorRef<TaskMsg>,
        state: &mut TaskState,
    ) -> Result<(), ActorProcessingErr> {
        // Queues first: the cluster map needs every writer's handle, and
        // every writer needs the map.
        let mut handles = Vec::new();
        let mut lanes = Vec::new();
        for (index, endpoint) in state.targets.clone().into_iter().enumerate() {
            let (handle, rx, redirects) = writer_channels(index, endpoint, &state.options);
            state.group.add_writer(handle.stats.clone());
            handles.push(handle);
            lanes.push((rx, redirects));
        }
        if let Some(masters) = &state.cluster {
            let mut owner = vec![0usize; SLOTS as usize];
            for (i, (_, ranges)) in masters.iter().enumerate() {
                for &(a, b) in ranges {
                    for slot in a..=b {
                        owner[slot as usize] = i;
                    }
                }
            }
            let (node_tx, mut node_rx) = mpsc::channel::<NodeRequest>(16);
            let routing = Arc::new(ClusterRouting::new(
                |s| owner[s as usize],
                &handles,
                node_tx,
            ));
            let me = myself.clone();
            tokio::spawn(async move {
                while let Some(request) = node_rx.recv().await {
                    if me.send_message(TaskMsg::AddNode(request)).is_err() {
                        return;
                    }
                }
            });
            state.router = Some(Router::cluster(routing.clone()));
            state.routing = Some(routing);
        } else {
            state.router = Some(Router::single(handles[0].clone()));
        }
        for (handle, (rx, redirects)) in handles.iter().zip(lanes) {
            spawn_writer(&myself, state, handle, rx, redirects).await?;
        }
        for shard in 0..state.shards.len() {
            let resume = state.initial_resume[shard].take();
            spawn_source(&myself, state, shard, resume).await?;
        }
        if let Some(peers) = &state.peers {
            let (tx, mut rx) = mpsc::unbounded_channel::<(String, u16)>();
            peers.announce_to(tx);
            let me = myself.clone();
            tokio::spawn(async move {
                while let Some((host, port)) = rx.recv().await {
                    if me.send_message(TaskMsg::AddShard { host, port }).is_err() {
                        return;
                    }
                }
            });
        }
        if let (Some(peers), Some(start)) = (&state.peers, state.owners_at_start.take()) {
            let key = engine::ownership::key(&state.task_id, state.cluster.is_some());
            state.recorder = Some(AbortOnDrop(tokio::spawn(crate::ownership::recorder(
                peers.clone(),
                state.targets.clone(),
                key,
                start,
                std::mem::take(&mut state.copying_at_start),
            ))));
        }
        if let (Some(spec), Some(target)) = (state.target_sentinel.clone(), state.targets.first()) {
            state.target_watch = Some(AbortOnDrop(tokio::spawn(watch_target_sentinels(
                spec,
                target.addr(),
                myself.clone(),
            ))));
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
                    follow_sentinels(state, shard).await;
                    let resume = if full {
                        None
                    } else {
                        state.shards[shard].handover_point()
                    };
                    spawn_source(&myself, state, shard, resume).await?;
                }
            }
            TaskMsg::TargetFailedOver(message) => {
                if !state.stopping {
                    tracing::warn!("{message}: starting again from the target's markers");
                    finish(&myself, state, Outcome::Restart(message));
                }
            }
            TaskMsg::AddNode(request) => add_node(&myself, state, request).await?,
            TaskMsg::AddShard { host, port } => add_shard(&myself, state, host, port).await?,
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
                        if !state.stopping
                            && matches!(worker_err, Some(WorkerError::TargetFailedOver { .. }))
                        {
                            tracing::warn!("{message}: starting again from the target's markers");
                            finish(&myself, state, Outcome::Restart(message));
                        } else {
                            fail(&myself, state, message);
                        }
                    }
                    None => {}
                }
            }
            _ => {}
        }
        Ok(())
    }
}

/// A writer's queues and the handle producers use.
fn writer_channels(
    index: usize,
    endpoint: Endpoint,
    options: &IntakeOptions,
) -> (
    WriterHandle,
    mpsc::Receiver<shard_worker::route::Batch>,
    mpsc::UnboundedReceiver<shard_worker::route::Redirected>,
) {
    let (tx, rx) = mpsc::channel(DEFAULT_QUEUE);
    let (redirect, redirects) = mpsc::unbounded_channel();
    let stats = Arc::new(WriterStats::new(endpoint.addr()));
    let overflow = Arc::new(Overflow::new(
        &options.spill_dir,
        &endpoint.addr(),
        options.spill_memory,
        stats.clone(),
    ));
    let handle = WriterHandle {
        index,
        target: endpoint.addr(),
        stats,
        endpoint,
        tx,
        redirect,
        overflow,
    };
    (handle, rx, redirects)
}

async fn spawn_writer(
    myself: &ActorRef<TaskMsg>,
    state: &mut TaskState,
    handle: &WriterHandle,
    rx: mpsc::Receiver<shard_worker::route::Batch>,
    redirects: mpsc::UnboundedReceiver<shard_worker::route::Redirected>,
) -> Result<(), ActorProcessingErr> {
    let (actor, _) = Actor::spawn_linked(
        None,
        Writer,
        WriterArgs {
            index: handle.index,
            endpoint: handle.endpoint.clone(),
            rx,
            redirects,
            routing: state.routing.clone(),
            overflow: handle.overflow.clone(),
            shards: state.shard_list.clone(),
            stats: handle.stats.clone(),
            retry: state.retry.clone(),
            window: DEFAULT_WINDOW,
            on_error: state.on_error,
            target_caps: state.options.replay.target_caps,
            tmp_scope: format!("{}w{}", state.options.replay.tmp_scope, handle.index),
            markers: state
                .marker_keys
                .clone()
                .map(|keys| shard_worker::write::WriterMarkers {
                    keys,
                    client_name: state.writer_name.clone(),
                }),
        },
        myself.get_cell(),
    )
    .await?;
    state
        .ids
        .insert(actor.get_id(), Child::Writer(handle.index));
    while state.writer_refs.len() <= handle.index {
        state.writer_refs.push(None);
    }
    state.writer_refs[handle.index] = Some(actor);
    Ok(())
}

/// Starts a writer for a target node that appeared during the sync.
async fn add_node(
    myself: &ActorRef<TaskMsg>,
    state: &mut TaskState,
    request: NodeRequest,
) -> Result<(), ActorProcessingErr> {
    let Some(routing) = state.routing.clone() else {
        let _ = request.reply.send(None);
        return Ok(());
    };
    let addr = shard_worker::endpoint::addr_of(&request.host, request.port);
    if let Some(w) = routing.find(&addr) {
        let _ = request.reply.send(routing.writers().into_iter().nth(w));
        return Ok(());
    }
    let index = routing.next_index();
    if state.stopping || index >= state.max_writers {
        tracing::error!(node = %addr, "no writer for a new target node (stopping, or too many nodes)");
        let _ = request.reply.send(None);
        return Ok(());
    }
    tracing::info!(node = %addr, "a new target master appeared; starting a writer for it");
    let endpoint = state.targets[0].with_addr(request.host.clone(), request.port);
    let (handle, rx, redirects) = writer_channels(index, endpoint, &state.options);
    state.group.add_writer(handle.stats.clone());
    spawn_writer(myself, state, &handle, rx, redirects).await?;
    routing.add_writer(&handle);
    if let Some(router) = &mut state.router {
        router.refresh();
    }
    let _ = request.reply.send(Some(handle));
    Ok(())
}

/// A master joined the source cluster mid-sync (a shard's sampler saw it
/// serve slots): it gets a shard of its own, with a full sync whose
/// snapshot waits for the other shards (`handover.rs`). Its heartbeat is
/// not written (no lag measured for it until a restart).
async fn add_shard(
    myself: &ActorRef<TaskMsg>,
    state: &mut TaskState,
    host: String,
    port: u16,
) -> Result<(), ActorProcessingErr> {
    let endpoint = state.shard_eps[0].with_addr(host, port);
    let addr = endpoint.addr();
    if state.stopping || state.shard_eps.iter().any(|e| e.addr() == addr) {
        return Ok(());
    }
    let Some(peers) = state.peers.clone() else {
        return Ok(());
    };
    let shard = state.shards.len();
    let stats = Arc::new(ShardStats::new(addr.clone(), state.max_writers));
    if !state.shard_list.set(shard, stats.clone()) {
        tracing::warn!(master = %addr, "a master joined the source cluster and the task has no room for another shard: its writes are not copied");
        return Ok(());
    }
    state.group.add_shard(stats.clone());
    peers.add(Peer {
        shard,
        endpoint: endpoint.clone(),
        stats: stats.clone(),
        joined: true,
    });
    if let Some(keys) = &mut state.marker_keys {
        keys.push(engine::marker::key(&state.task_id, &addr, None).into());
    }
    state.shards.push(stats);
    state.shard_eps.push(endpoint);
    state
        .fresh
        .push(state.fresh.first().copied().unwrap_or(true));
    state.source_slots.push(Vec::new());
    state.skips.push(None);
    state.initial_resume.push(None);
    state.outages.push(None);
    state.sources.push(None);
    state.joined.push(true);
    spawn_source(myself, state, shard, None).await
}

async fn spawn_source(
    myself: &ActorRef<TaskMsg>,
    state: &mut TaskState,
    shard: usize,
    resume: Option<ResumePoint>,
) -> Result<(), ActorProcessingErr> {
    let Some(mut router) = state.router.clone() else {
        return Ok(());
    };
    router.refresh();
    let (actor, _) = Actor::spawn_linked(
        None,
        SourceWorker,
        SourceArgs {
            shard,
            endpoint: state.shard_eps[shard].clone(),
            router,
            stats: state.shards[shard].clone(),
            resume,
            options: {
                let mut options = state.options.clone();
                options.replay.tmp_scope = format!("{}s{shard}", options.replay.tmp_scope);
                options
            },
            listening_port: state.listening_port,
            marking: state
                .marker_keys
                .as_ref()
                .map(|keys| marking(state, keys, shard)),
            skip: state.skips[shard].clone(),
            peers: state.peers.clone(),
            slots: state.source_slots[shard].clone(),
            joined: state.joined[shard],
        },
        myself.get_cell(),
    )
    .await?;
    state.ids.insert(actor.get_id(), Child::Source(shard));
    state.sources[shard] = Some(actor);
    Ok(())
}

/// How shard `shard`'s batches carry its marker. Before a full sync over
/// its earlier copy, a fresh task with one source master empties the
/// copied databases (every node of a cluster target); with a cluster
/// source, each shard deletes the keys of its own slots instead (the
/// databases hold other shards' data too).
fn marking(state: &TaskState, keys: &[bytes::Bytes], shard: usize) -> shard_worker::route::Marking {
    let fresh = state.fresh[shard];
    let alone = state.shards.len() == 1;
    let replay = &state.options.replay;
    let mut dbs: Vec<u32> = (0..replay.source_databases)
        .filter_map(|db| replay.db_filter.target_db(db))
        .collect();
    dbs.sort_unstable();
    dbs.dedup();
    let slots = &state.source_slots[shard];
    let sweep = (fresh && !alone && !slots.is_empty()).then(|| shard_worker::route::Sweep {
        slots: slots.clone(),
        dbs: dbs.clone(),
    });
    shard_worker::route::Marking {
        key: keys[shard].clone(),
        fresh,
        flush_dbs: (fresh && alone).then_some(dbs),
        sweep,
    }
}

/// A Sentinel-managed target's master is `current`: once a second its
/// Sentinels are asked; when they name another master (they promoted a
/// replica), the task is told, and starts again from that master's
/// markers (it holds them as far as it holds the data).
async fn watch_target_sentinels(
    spec: crate::url::SentinelSpec,
    current: String,
    task: ActorRef<TaskMsg>,
) {
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        if let Ok(ep) = crate::sentinel::master_of(&spec).await {
            if ep.addr() != current {
                let _ = task.send_message(TaskMsg::TargetFailedOver(format!(
                    "{current}: the target's Sentinels name {} as the master '{}' now (a failover)",
                    ep.addr(),
                    spec.name
                )));
                return;
            }
        }
    }
}

/// How long asking the Sentinels may hold the task up.
const SENTINEL_ASK: Duration = Duration::from_secs(5);

/// A Sentinel-managed source: before its worker connects again, the
/// master the Sentinels name now (a failover promoted a replica: the
/// worker continues there, with a partial resync when its history allows).
async fn follow_sentinels(state: &mut TaskState, shard: usize) {
    let Some(spec) = &state.sentinel else {
        return;
    };
    // Bounded: the task's other messages wait meanwhile.
    let asked = tokio::time::timeout(SENTINEL_ASK, crate::sentinel::master_of(spec)).await;
    let Ok(asked) = asked else {
        tracing::warn!(
            secs = SENTINEL_ASK.as_secs(),
            "the Sentinels did not answer in time; trying the last master again"
        );
        return;
    };
    match asked {
        Ok(ep) if ep.addr() != state.shard_eps[shard].addr() => {
            events::SourceMasterFollowed {
                name: &spec.name,
                from: &state.shard_eps[shard].addr(),
                to: &ep.addr(),
            }
            .emit();
            state.shard_eps[shard] = ep;
        }
        Ok(_) => {}
        Err(e) => {
            tracing::warn!(error = %e, "cannot ask the Sentinels for the master; trying the last one again")
        }
    }
}

/// Where a shard is, to tell whether it moved since an outage began.
fn progress_marker(stats: &ShardStats) -> (u64, u64) {
    (
        stats.counters.commands_received.get(),
        stats.counters.full_syncs_loaded.get(),
    )
}

/// A source worker failed: retry it, or fail the task.
fn source_failed(
    myself: &ActorRef<TaskMsg>,
    state: &mut TaskState,
    shard: usize,
    recovery: Recovery,
    message: String,
) {
    let stats = state.shards[shard].clone();
    if recovery == Recovery::Fatal {
        stats.set_state(ShardState::Failed);
        fail(myself, state, message);
        return;
    }
    if stats.state() == ShardState::FullSync {
        tracing::warn!(
            source = %stats.source,
            "the link dropped during a full sync: if this repeats, the source's \
             client-output-buffer-limit replica is too small for the writes it receives \
             while it produces and sends an RDB (its log says 'overcoming of output buffer limits')"
        );
    }
    stats.set_state(ShardState::Reconnecting);
    events::SourceConnectionLost.emit(&stats.counters);
    let marker = progress_marker(&stats);
    let outage = &mut state.outages[shard];
    if outage.as_ref().is_some_and(|o| o.marker != marker) {
        *outage = None;
    }
    let outage = outage.get_or_insert_with(|| Outage {
        backoff: Backoff::start(&state.retry),
        marker,
        futile_full_resyncs: 0,
    });
    let full = recovery == Recovery::FullResync;
    if full {
        outage.futile_full_resyncs += 1;
        if outage.futile_full_resyncs > MAX_FUTILE_FULL_RESYNCS {
            stats.set_state(ShardState::Failed);
            let message = format!(
                "{message} ({MAX_FUTILE_FULL_RESYNCS} full resyncs in a row failed the same way)"
            );
            fail(myself, state, message);
            return;
        }
    }
    match outage.backoff.next_delay(&state.retry) {
        Some(delay) => {
            events::SourceRetry {
                source: &stats.source,
                error: &message,
                retry_in: delay,
                full_resync: full,
            }
            .emit();
            myself.send_after(delay, move || TaskMsg::Respawn { shard, full });
        }
        None => {
            let secs = outage.backoff.elapsed().as_secs();
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
        state.routing = None;
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
    state.routing = None;
    state.recorder = None;
    state.target_watch = None;
    write_checkpoints(state);
    if !matches!(outcome, Outcome::Failed(_)) {
        state.group.set_stopped();
    }
    let _ = done.send(outcome);
    myself.stop(None);
}

fn write_checkpoints(state: &TaskState) {
    let Some(store) = &state.checkpoints else {
        return;
    };
    for stats in &state.shards {
        let Some(ckpt) = Checkpoint::of(stats, &state.target_addrs) else {
            continue;
        };
        if let Err(e) = store.save(&ckpt) {
            tracing::error!(error = %e, "checkpoint not written");
        }
    }
}
