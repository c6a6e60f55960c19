//! Prechecks: everything that can be known to be wrong before any data
//! moves. Each check passes, warns, or fails; one failure refuses the task.
//! A passing precheck also yields the [`Plan`]: the shards and targets the
//! task will run with.

use std::fmt;

use shard_worker::progress::ResumePoint;
use shard_worker::Endpoint;

use crate::checkpoint::{CheckpointState, CheckpointStore};
use crate::config::{OnConflict, TaskConfig};
use crate::server::{probe, ServerInfo};
use crate::url::SourceSpec;

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

/// One source master to sync.
#[derive(Clone, Debug)]
pub struct ShardPlan {
    pub endpoint: Endpoint,
    /// Resume here (from a checkpoint) instead of a full sync.
    pub resume: Option<ResumePoint>,
}

/// What a task runs with.
#[derive(Clone, Debug)]
pub struct Plan {
    pub shards: Vec<ShardPlan>,
    pub targets: Vec<Endpoint>,
    pub source_databases: u32,
}

pub struct Report {
    pub checks: Vec<Check>,
    pub plan: Option<Plan>,
}

impl Report {
    pub fn passed(&self) -> bool {
        self.plan.is_some() && self.checks.iter().all(|c| c.level != Level::Fail)
    }
}

struct Checks(Vec<Check>);

impl Checks {
    fn pass(&mut self, name: &'static str, detail: impl Into<String>) {
        self.0.push(Check {
            level: Level::Pass,
            name,
            detail: detail.into(),
        });
    }
    fn warn(&mut self, name: &'static str, detail: impl Into<String>) {
        self.0.push(Check {
            level: Level::Warn,
            name,
            detail: detail.into(),
        });
    }
    fn fail(&mut self, name: &'static str, detail: impl Into<String>) {
        self.0.push(Check {
            level: Level::Fail,
            name,
            detail: detail.into(),
        });
    }
    fn failed(&self) -> bool {
        self.0.iter().any(|c| c.level == Level::Fail)
    }
}

/// Runs every check against the live servers.
pub async fn run(cfg: &TaskConfig, store: Option<&CheckpointStore>) -> Report {
    let mut checks = Checks(Vec::new());
    let plan = plan(cfg, store, &mut checks).await;
    let plan = if checks.failed() { None } else { plan };
    Report {
        checks: checks.0,
        plan,
    }
}

async fn plan(
    cfg: &TaskConfig,
    store: Option<&CheckpointStore>,
    checks: &mut Checks,
) -> Option<Plan> {
    let source_ep = match &cfg.source {
        SourceSpec::Redis(ep) => ep.clone(),
        SourceSpec::Twemproxy { config, pool } => {
            checks.fail(
                "source",
                format!(
                    "twemproxy:// sources ({}{}) are not supported by this build",
                    config.display(),
                    pool.as_ref().map(|p| format!("#{p}")).unwrap_or_default()
                ),
            );
            return None;
        }
    };
    let source = match probe(&source_ep).await {
        Ok(info) => info,
        Err(e) => {
            checks.fail("source reachable", e.to_string());
            return None;
        }
    };
    checks.pass(
        "source reachable",
        format!(
            "{} is Redis {} ({})",
            source.addr, source.version_text, source.role
        ),
    );
    check_source(&source, checks);

    if cfg.targets.len() > 1 {
        checks.fail(
            "targets",
            "more than one --target is not supported by this build",
        );
        return None;
    }
    let mut target_infos = Vec::new();
    for ep in &cfg.targets {
        match probe(ep).await {
            Ok(info) => {
                checks.pass(
                    "target reachable",
                    format!(
                        "{} is Redis {} ({})",
                        info.addr, info.version_text, info.role
                    ),
                );
                target_infos.push(info);
            }
            Err(e) => checks.fail("target reachable", e.to_string()),
        }
    }
    if checks.failed() {
        return None;
    }

    // Checkpoints of an earlier run of this task.
    let target_addrs: Vec<String> = cfg.targets.iter().map(Endpoint::addr).collect();
    let mut resume = None;
    let mut ours = false;
    if let Some(store) = store {
        match store.load(&source.addr) {
            Ok(Some(ckpt)) if ckpt.targets == target_addrs => {
                ours = true;
                resume = ckpt.resume_point();
                match &ckpt.state {
                    CheckpointState::Resumable { offset, .. } => checks.pass(
                        "checkpoint",
                        format!(
                            "resuming {} from offset {offset} (partial resync)",
                            source.addr
                        ),
                    ),
                    CheckpointState::FullSyncInProgress => checks.warn(
                        "checkpoint",
                        format!(
                            "an earlier full sync of {} did not finish; starting it over",
                            source.addr
                        ),
                    ),
                }
            }
            Ok(Some(ckpt)) => checks.warn(
                "checkpoint",
                format!(
                    "the checkpoint of {} was written for targets {:?}, not {:?}; ignoring it",
                    source.addr, ckpt.targets, target_addrs
                ),
            ),
            Ok(None) => {}
            Err(e) => checks.fail("checkpoint", e.to_string()),
        }
    }

    let source_databases = source.databases.unwrap_or(16);
    if let Some(selected) = cfg.db_filter.selected() {
        for &db in selected {
            if db >= source_databases {
                checks.fail(
                    "databases",
                    format!(
                        "--db {db}: the source has {source_databases} databases (0 to {})",
                        source_databases - 1
                    ),
                );
            }
        }
    }
    for target in &target_infos {
        check_target(cfg, &source, target, source_databases, ours, checks);
    }
    if checks.failed() {
        return None;
    }
    Some(Plan {
        shards: vec![ShardPlan {
            endpoint: source_ep,
            resume,
        }],
        targets: cfg.targets.clone(),
        source_databases,
    })
}

fn check_source(source: &ServerInfo, checks: &mut Checks) {
    if source.version < (2, 8, 0) {
        checks.fail(
            "source version",
            format!(
                "{} runs Redis {}; PSYNC needs 2.8 or newer",
                source.addr, source.version_text
            ),
        );
    }
    if source.cluster {
        checks.fail(
            "source topology",
            format!(
                "{} is a Redis Cluster node; cluster sources are not supported by this build",
                source.addr
            ),
        );
    }
    if source.role == "slave" {
        if source.master_link_up {
            checks.pass(
                "source role",
                format!(
                    "{} is a replica; syncing from it spares its master",
                    source.addr
                ),
            );
        } else {
            checks.warn(
                "source role",
                format!("{} is a replica whose link to its master is down; it refuses PSYNC until the link is up", source.addr),
            );
        }
    }
    if let Some(delay) = source.diskless_sync_delay.filter(|d| *d > 0) {
        checks.warn(
            "source diskless delay",
            format!(
                "{} waits repl-diskless-sync-delay = {delay} s before each diskless transfer",
                source.addr
            ),
        );
    }
}

fn check_target(
    cfg: &TaskConfig,
    source: &ServerInfo,
    target: &ServerInfo,
    source_databases: u32,
    ours: bool,
    checks: &mut Checks,
) {
    if target.cluster {
        checks.fail(
            "target topology",
            format!(
                "{} is a Redis Cluster node; cluster targets are not supported by this build",
                target.addr
            ),
        );
        return;
    }
    if !source.run_id.is_empty() && source.run_id == target.run_id {
        checks.fail("target", format!("{} is the source itself", target.addr));
        return;
    }
    if target.role == "slave" {
        checks.fail(
            "target role",
            format!(
                "{} is a read-only replica; point --target at its master",
                target.addr
            ),
        );
    }
    if target.rdb_version() < source.rdb_version() {
        checks.fail(
            "target version",
            format!(
                "{} runs Redis {} (RDB {}), older than the source's {} (RDB {}): it would refuse the source's RESTORE payloads",
                target.addr,
                target.version_text,
                target.rdb_version(),
                source.version_text,
                source.rdb_version()
            ),
        );
    } else {
        checks.pass(
            "target version",
            format!(
                "{} (RDB {}) accepts RDB {} payloads",
                target.addr,
                target.rdb_version(),
                source.rdb_version()
            ),
        );
    }
    match target.maxmemory_policy.as_deref() {
        Some("noeviction") | None => {}
        Some(policy) => checks.warn(
            "target eviction",
            format!("{} has maxmemory-policy {policy}: it may evict synced keys; noeviction makes a full target fail loudly instead", target.addr),
        ),
    }
    // The target databases this task writes to.
    let mut written: Vec<u32> = (0..source_databases)
        .filter_map(|db| cfg.db_filter.target_db(db))
        .collect();
    written.sort_unstable();
    written.dedup();
    if let Some(n) = target.databases {
        if let Some(&db) = written.iter().find(|&&db| db >= n) {
            checks.fail(
                "databases",
                format!("{} has {n} databases, but database {db} would be written (see --db / --db-map)", target.addr),
            );
        }
    }
    if cfg.on_conflict == OnConflict::Precheck && !ours {
        let busy: Vec<String> = written
            .iter()
            .filter_map(|db| {
                target
                    .keyspace
                    .get(db)
                    .filter(|&&n| n > 0)
                    .map(|n| format!("db{db}: {n} keys"))
            })
            .collect();
        if busy.is_empty() {
            checks.pass(
                "target empty",
                format!("{} holds no keys in the databases written to", target.addr),
            );
        } else {
            checks.fail(
                "target empty",
                format!(
                    "{} is not empty ({}); use --on-conflict ignore (source wins) or skip (target wins) to write into it anyway",
                    target.addr,
                    busy.join(", ")
                ),
            );
        }
    }
}
