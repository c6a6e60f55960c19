//! Prechecks: everything that can be known to be wrong before any data
//! moves. Each check passes, warns, or fails; one failure refuses the task.
//! A passing precheck also yields one [`Plan`] per target: the shards (one
//! per source master) and the target nodes the task will run with.
//!
//! Three steps, so that the rules are tested without servers:
//!
//! 1. `probe.rs` (IO): the servers behind the URLs (`crate::topology`),
//!    what each says about itself (INFO, CONFIG), how fast each source's
//!    replication stream grows, and the checkpoints on disk: the *facts*.
//!    What cannot be reached or read is a failed check there.
//! 2. `checks.rs` (pure): each rule, a function of facts that adds checks.
//! 3. `plan.rs` (pure): the rules applied to one target's facts, and the
//!    plan they allow.

mod checks;
mod plan;
mod probe;

#[cfg(test)]
mod tests;

use std::fmt;

use engine::filter::DbFilter;
use engine::rebuild::TargetCaps;
use shard_worker::progress::ResumePoint;
use shard_worker::Endpoint;

use crate::checkpoint::{Checkpoint, CheckpointStore};
use crate::config::TaskConfig;
use crate::server::ServerInfo;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    Pass,
    Warn,
    Fail,
}

#[derive(Clone, Debug)]
pub struct Check {
    pub level: Level,
    pub name: &'static str,
    pub detail: String,
}

impl fmt::Display for Check {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let level = match self.level {
            Level::Pass => "PASS",
            Level::Warn => "WARN",
            Level::Fail => "FAIL",
        };
        write!(f, "{level} {}: {}", self.name, self.detail)
    }
}

/// The checks made so far.
#[derive(Default, Debug)]
pub struct Checks(pub Vec<Check>);

impl Checks {
    fn add(&mut self, level: Level, name: &'static str, detail: impl Into<String>) {
        self.0.push(Check {
            level,
            name,
            detail: detail.into(),
        });
    }
    pub fn pass(&mut self, name: &'static str, detail: impl Into<String>) {
        self.add(Level::Pass, name, detail)
    }
    pub fn warn(&mut self, name: &'static str, detail: impl Into<String>) {
        self.add(Level::Warn, name, detail)
    }
    pub fn fail(&mut self, name: &'static str, detail: impl Into<String>) {
        self.add(Level::Fail, name, detail)
    }
    pub fn failed(&self) -> bool {
        self.0.iter().any(|c| c.level == Level::Fail)
    }
}

/// One source master to sync.
#[derive(Clone, Debug)]
pub struct ShardPlan {
    pub endpoint: Endpoint,
    /// Resume here (from a checkpoint) instead of a full sync.
    pub resume: Option<ResumePoint>,
    /// A checkpoint says the targets already hold this shard's data.
    pub ours: bool,
    /// On a cluster source, a slot the master serves (for its heartbeat).
    pub slot: Option<u16>,
    /// On a cluster source, every slot range the master serves.
    pub slots: Vec<(u16, u16)>,
    /// On a cluster source, the master's configuration epoch.
    pub config_epoch: u64,
    /// It is copied again although the target's marker could resume it
    /// (its slots changed hands: `engine::ownership`).
    pub copy_again: bool,
    /// The newest sync epoch the target's markers name (0: none).
    pub epoch: u64,
    /// The task began on a target checked empty: what the copied
    /// databases hold is its own (see `route::Marking::fresh`).
    pub fresh: bool,
    /// A cluster target: what its nodes applied beyond `resume`.
    pub skip: Option<shard_worker::route::Skip>,
}

/// A cluster's masters with the slot ranges each serves.
pub type ClusterMasters = Vec<(Endpoint, Vec<(u16, u16)>)>;

/// The target: one server, or the masters of a cluster with their slots.
#[derive(Clone, Debug)]
pub enum TargetPlan {
    Standalone(Endpoint),
    Cluster { masters: ClusterMasters },
}

impl TargetPlan {
    pub fn endpoints(&self) -> Vec<Endpoint> {
        match self {
            TargetPlan::Standalone(ep) => vec![ep.clone()],
            TargetPlan::Cluster { masters } => masters.iter().map(|(ep, _)| ep.clone()).collect(),
        }
    }
}

/// What the task runs with for one target (a task with several targets
/// has one plan each, over the same sources).
#[derive(Clone, Debug)]
pub struct Plan {
    /// The target as named on the command line (`host:port`).
    pub name: String,
    pub shards: Vec<ShardPlan>,
    pub target: TargetPlan,
    pub source_databases: u32,
    /// The databases copied (the configured filter, narrowed to database 0
    /// for a cluster target when only it holds keys).
    pub db_filter: DbFilter,
    /// What the target's oldest master can take.
    pub target_caps: TargetCaps,
    /// Values larger than this are written in parts (the configured
    /// threshold, kept under the target's proto-max-bulk-len).
    pub big_key_bytes: usize,
    /// Where this target's checkpoints live.
    pub checkpoints: Option<CheckpointStore>,
    /// The task's id (its heartbeat and marker keys carry it).
    pub task_id: String,
    /// Batches carry markers (exactly-once): asked for, and the target
    /// supports it.
    pub exactly_once: bool,
}

pub struct Report {
    pub checks: Vec<Check>,
    /// One per target; empty when the precheck refused the task.
    pub plans: Vec<Plan>,
    /// It waited for the source's slot migrations to end: what it saw of
    /// the source before is stale, and it must run again.
    pub retry: bool,
}

impl Report {
    pub fn passed(&self) -> bool {
        !self.plans.is_empty() && self.checks.iter().all(|c| c.level != Level::Fail)
    }
}

// ------------------------------------------------------------------ facts

/// One source master (or pool backend), as probed.
#[derive(Clone, Debug)]
pub struct SourceMaster {
    pub info: ServerInfo,
    pub endpoint: Endpoint,
    /// On a cluster source, a slot the master serves.
    pub slot: Option<u16>,
    /// On a cluster source, the slot ranges it serves.
    pub slots: Vec<(u16, u16)>,
    /// On a cluster source, its configuration epoch.
    pub epoch: u64,
    /// When `info` was read (its `master_repl_offset` is of that moment).
    pub read_at: std::time::Instant,
    /// How fast its replication stream grows, bytes/s (`None`: not
    /// measured).
    pub write_rate: Option<f64>,
}

/// The source side of a task.
#[derive(Clone, Debug)]
pub struct Sources {
    /// The server the source URL names (for a pool: its first backend, with
    /// the pool's keyspace summed).
    pub seed: ServerInfo,
    pub masters: Vec<SourceMaster>,
}

/// One master of a target, as probed.
#[derive(Clone, Debug)]
pub struct TargetMaster {
    pub info: ServerInfo,
    pub endpoint: Endpoint,
    /// Slot ranges it serves (a cluster target); empty for a standalone one.
    pub slots: Vec<(u16, u16)>,
}

/// What an earlier run left for one source master.
#[derive(Clone, Debug)]
pub enum CheckpointFact {
    None,
    Found(Checkpoint),
    Unreadable(String),
}

/// One target, as probed.
#[derive(Clone, Debug)]
pub struct Target {
    /// As named on the command line.
    pub name: String,
    pub endpoint: Endpoint,
    pub cluster: bool,
    pub masters: Vec<TargetMaster>,
    pub checkpoints: Option<CheckpointStore>,
    /// Per source master, in the order of [`Sources::masters`].
    pub found: Vec<CheckpointFact>,
    /// Per source master, the newest marker this task left on the target
    /// (a cluster target: what its nodes' markers say together).
    pub markers: Vec<Option<engine::marker::Marker>>,
    /// Per source master, on a cluster target: what each node and slot
    /// already applied beyond that point.
    pub skips: Vec<Option<shard_worker::route::Skip>>,
    /// Per source master of a cluster: copied again rather than resumed
    /// (its slots changed hands; `engine::ownership`).
    pub again: Vec<Option<engine::ownership::Again>>,
}

/// The task's id: the addresses it was given — the source URL's (a
/// Twemproxy pool: its backends) and the targets' — not the masters found
/// behind them, so that it survives a target cluster failing over or
/// growing (its markers carry the id).
fn task_id(cfg: &TaskConfig, sources: &Sources) -> String {
    let source_addrs: Vec<String> = match &cfg.source {
        crate::url::SourceSpec::Redis(ep) => vec![ep.addr()],
        // Not the master's address: it changes at a failover.
        crate::url::SourceSpec::Sentinel(spec) => vec![spec.id()],
        crate::url::SourceSpec::Twemproxy { .. } => {
            sources.masters.iter().map(|m| m.endpoint.addr()).collect()
        }
    };
    // A Sentinel-managed target by its name: its master's address changes
    // at a failover.
    let target_addrs: Vec<String> = cfg
        .targets
        .iter()
        .zip(cfg.target_sentinels.iter().chain(std::iter::repeat(&None)))
        .map(|(ep, sentinel)| match sentinel {
            Some(spec) => spec.id(),
            None => ep.addr(),
        })
        .collect();
    crate::heartbeat::task_id(&source_addrs, &target_addrs)
}

/// Runs every check against the live servers.
pub async fn run(cfg: &TaskConfig, store: Option<&CheckpointStore>) -> Report {
    let mut checks = Checks::default();
    let mut plans = Vec::new();
    let mut retry = false;
    if let Some(mut sources) = probe::sources(cfg, &mut checks).await {
        let mut targets = probe::targets(cfg, store, &sources, &mut checks).await;
        let task_id = task_id(cfg, &sources);
        if cfg.exactly_once {
            probe::markers(&task_id, &sources, &mut targets, &mut checks).await;
            retry = probe::ownership(&task_id, &sources, &mut targets, &mut checks).await;
        }
        probe::write_rates(&mut sources).await;
        plans = plan::plans(cfg, &task_id, &sources, &targets, &mut checks);
    }
    if checks.failed() {
        plans.clear();
    }
    Report {
        checks: checks.0,
        plans,
        retry,
    }
}
