//! Prechecks: everything that can be known to be wrong before any data
//! moves. Each check passes, warns, or fails; one failure refuses the task.
//! A passing precheck also yields the [`Plan`]: the shards (one per source
//! master) and the target nodes the task will run with.

use std::fmt;

use engine::cluster::ClusterNode;
use engine::filter::DbFilter;
use engine::rebuild::TargetCaps;
use engine::slot::SLOTS;
use shard_worker::progress::ResumePoint;
use shard_worker::Endpoint;

use crate::checkpoint::{CheckpointState, CheckpointStore};
use crate::config::{OnConflict, TaskConfig};
use crate::server::{cluster_nodes, looks_like_a_proxy, probe, ServerInfo};
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
    /// A checkpoint says the targets already hold this shard's data.
    pub ours: bool,
    /// On a cluster source, a slot the master serves (for its heartbeat).
    pub slot: Option<u16>,
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
}

pub struct Report {
    pub checks: Vec<Check>,
    /// One per target; empty when the precheck refused the task.
    pub plans: Vec<Plan>,
}

impl Report {
    pub fn passed(&self) -> bool {
        !self.plans.is_empty() && self.checks.iter().all(|c| c.level != Level::Fail)
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
    let plans = plan(cfg, store, &mut checks).await;
    let plans = if checks.failed() { Vec::new() } else { plans };
    Report {
        checks: checks.0,
        plans,
    }
}

/// The masters of a cluster, probed; `None` (with failed checks) when the
/// cluster cannot be used.
async fn cluster_masters(
    seed: &Endpoint,
    role: &'static str,
    checks: &mut Checks,
) -> Option<Vec<(ServerInfo, Endpoint, Vec<(u16, u16)>)>> {
    let nodes = match cluster_nodes(seed).await {
        Ok(n) => n,
        Err(e) => {
            checks.fail(role, format!("cannot read the cluster's nodes: {e}"));
            return None;
        }
    };
    let masters: Vec<&ClusterNode> = nodes.iter().filter(|n| n.serving_master()).collect();
    let covered: u32 = masters.iter().map(|n| n.slot_count()).sum();
    let mut out = Vec::new();
    for node in masters {
        let ep = seed.with_addr(node.host.clone(), node.port);
        match probe(&ep).await {
            Ok(info) => {
                checks.pass(
                    if role == "source" {
                        "source reachable"
                    } else {
                        "target reachable"
                    },
                    format!(
                        "{} is Redis {} (cluster master, {} slots)",
                        info.addr,
                        info.version_text,
                        node.slot_count()
                    ),
                );
                out.push((info, ep, node.slots.clone()));
            }
            Err(e) => checks.fail(
                if role == "source" {
                    "source reachable"
                } else {
                    "target reachable"
                },
                e.to_string(),
            ),
        }
    }
    if covered < SLOTS as u32 {
        let msg = format!(
            "the {role} cluster (seen from {seed}) serves {covered} of {SLOTS} slots; CLUSTER NODES shows no master for the others"
        );
        if role == "target" {
            checks.fail("target slots", msg);
        } else {
            checks.warn("source slots", msg);
        }
    }
    Some(out)
}

/// The source side of a task: the masters (or backends) to sync.
struct Sources {
    /// The server the source URL names (for a pool: its first backend, with
    /// the pool's keyspace summed).
    seed: ServerInfo,
    masters: Vec<(ServerInfo, Endpoint)>,
    /// Per master, on a cluster source, a slot it serves.
    slots: Vec<Option<u16>>,
}

async fn plan(cfg: &TaskConfig, store: Option<&CheckpointStore>, checks: &mut Checks) -> Vec<Plan> {
    let Some(sources) = plan_sources(cfg, checks).await else {
        return Vec::new();
    };
    let mut plans = Vec::new();
    let mut seen: Vec<(String, ServerInfo)> = Vec::new();
    for target_ep in &cfg.targets {
        let name = target_ep.addr();
        let store = match store {
            Some(s) if cfg.targets.len() > 1 => match s.for_target(&name) {
                Ok(s) => Some(s),
                Err(e) => {
                    checks.fail("checkpoint", e.to_string());
                    continue;
                }
            },
            Some(s) => Some(s.clone()),
            None => None,
        };
        if let Some((plan, infos)) = plan_target(cfg, &sources, target_ep, store, checks).await {
            for info in infos {
                if let Some((other, _)) = seen
                    .iter()
                    .find(|(_, i)| !i.run_id.is_empty() && i.run_id == info.run_id)
                {
                    checks.fail(
                        "targets",
                        format!(
                            "{} (target {name}) is also a node of target {other}: give each target once",
                            info.addr
                        ),
                    );
                }
                seen.push((name.clone(), info));
            }
            plans.push(plan);
        }
    }
    if plans.len() > 1 {
        checks.pass(
            "targets",
            format!(
                "{} targets, each with its own writers, backpressure and checkpoints; each source master serves one replication link per target",
                plans.len()
            ),
        );
    }
    plans
}

async fn plan_sources(cfg: &TaskConfig, checks: &mut Checks) -> Option<Sources> {
    let (seed, masters, slots) = match &cfg.source {
        SourceSpec::Redis(ep) => source_masters(ep, checks).await?,
        SourceSpec::Twemproxy {
            config,
            pool,
            user,
            password,
        } => twemproxy_backends(config, pool.as_deref(), user, password, checks).await?,
    };
    for (info, _) in &masters {
        check_source(info, checks);
    }
    Some(Sources {
        seed,
        masters,
        slots,
    })
}

/// The plan for one target, with the servers it is made of.
async fn plan_target(
    cfg: &TaskConfig,
    src: &Sources,
    target_ep: &Endpoint,
    store: Option<CheckpointStore>,
    checks: &mut Checks,
) -> Option<(Plan, Vec<ServerInfo>)> {
    let (seed, sources, slots) = (&src.seed, &src.masters, &src.slots);
    let target_seed = match probe(target_ep).await {
        Ok(info) => info,
        Err(e) => {
            checks.fail("target reachable", e.to_string());
            return None;
        }
    };
    let (target, targets): (TargetPlan, Vec<ServerInfo>) = if target_seed.cluster {
        let masters = cluster_masters(target_ep, "target", checks).await?;
        checks.pass(
            "target topology",
            format!(
                "Redis Cluster with {} masters: one writer each",
                masters.len()
            ),
        );
        let infos = masters.iter().map(|(i, _, _)| i.clone()).collect();
        (
            TargetPlan::Cluster {
                masters: masters.into_iter().map(|(_, e, s)| (e, s)).collect(),
            },
            infos,
        )
    } else {
        checks.pass(
            "target reachable",
            format!(
                "{} is Redis {} ({})",
                target_seed.addr, target_seed.version_text, target_seed.role
            ),
        );
        (
            TargetPlan::Standalone(target_ep.clone()),
            vec![target_seed.clone()],
        )
    };
    if checks.failed() {
        return None;
    }

    // Checkpoints of an earlier run of this task.
    let target_addrs: Vec<String> = target.endpoints().iter().map(Endpoint::addr).collect();
    let mut shards = Vec::new();
    for ((info, ep), slot) in sources.iter().zip(slots) {
        let mut shard = ShardPlan {
            endpoint: ep.clone(),
            resume: None,
            ours: false,
            slot: *slot,
        };
        if let Some(store) = &store {
            match store.load(&info.addr) {
                Ok(Some(ckpt)) if same_targets(&ckpt.targets, &target_addrs) => {
                    shard.ours = true;
                    shard.resume = ckpt.resume_point();
                    match &ckpt.state {
                        CheckpointState::Resumable { offset, .. } => checks.pass(
                            "checkpoint",
                            format!(
                                "resuming {} from offset {offset} (partial resync)",
                                info.addr
                            ),
                        ),
                        CheckpointState::FullSyncInProgress => checks.warn(
                            "checkpoint",
                            format!(
                                "an earlier full sync of {} did not finish; starting it over",
                                info.addr
                            ),
                        ),
                    }
                }
                Ok(Some(ckpt)) => checks.warn(
                    "checkpoint",
                    format!(
                        "the checkpoint of {} was written for targets {:?}, not {:?}; ignoring it",
                        info.addr, ckpt.targets, target_addrs
                    ),
                ),
                Ok(None) => {}
                Err(e) => checks.fail("checkpoint", e.to_string()),
            }
        }
        shards.push(shard);
    }
    let ours = shards.iter().any(|s| s.ours);

    let source_databases = sources
        .iter()
        .filter_map(|(i, _)| i.databases)
        .max()
        .unwrap_or(16);
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
    let db_filter = match &target {
        TargetPlan::Cluster { .. } => cluster_db_filter(cfg, seed, source_databases, checks),
        TargetPlan::Standalone(_) => cfg.db_filter.clone(),
    };
    for (source, _) in sources {
        for t in &targets {
            if !source.run_id.is_empty() && source.run_id == t.run_id {
                checks.fail("target", format!("{} is the source itself", t.addr));
            }
        }
    }
    let newest_source = sources
        .iter()
        .map(|(i, _)| i)
        .max_by_key(|i| i.version)
        .expect("at least one source");
    for t in &targets {
        check_target(cfg, t, &db_filter, source_databases, ours, checks);
    }
    let oldest_target = targets
        .iter()
        .min_by_key(|t| t.version)
        .expect("at least one target");
    let target_caps = TargetCaps::new(
        oldest_target.version.0.min(u16::MAX as u32) as u16,
        oldest_target.version.1.min(u16::MAX as u32) as u16,
    );
    check_versions(
        cfg,
        sources,
        newest_source,
        oldest_target,
        target_caps,
        checks,
    );
    // Every RESTORE must stay under what the target accepts in one
    // argument (with room for the rest of the command).
    let mut big_key_bytes = cfg.big_key_threshold;
    if let Some(limit) = targets.iter().filter_map(|t| t.proto_max_bulk_len).min() {
        let ceiling = (limit as usize).saturating_sub(1024 * 1024).max(1024);
        if big_key_bytes > ceiling {
            checks.warn(
                "big keys",
                format!(
                    "the target takes arguments up to {limit} bytes (proto-max-bulk-len): values over {ceiling} bytes are written in parts"
                ),
            );
            big_key_bytes = ceiling;
        }
    }
    if checks.failed() {
        return None;
    }
    Some((
        Plan {
            name: target_ep.addr(),
            shards,
            target,
            source_databases,
            db_filter,
            target_caps,
            big_key_bytes,
            checkpoints: store,
        },
        targets,
    ))
}

/// The masters of a `redis://` source: itself, or every master of its
/// cluster. Also returns the server the URL names.
async fn source_masters(
    source_ep: &Endpoint,
    checks: &mut Checks,
) -> Option<(ServerInfo, Vec<(ServerInfo, Endpoint)>, Vec<Option<u16>>)> {
    let seed = match probe(source_ep).await {
        Ok(info) => info,
        Err(e) => {
            let mut message = e.to_string();
            if looks_like_a_proxy(source_ep).await {
                message = format!(
                    "{} answers PING but not INFO: it looks like a proxy (Twemproxy?), and PSYNC does not pass through a proxy; give the pool's config instead: --source twemproxy:///path/to/nutcracker.yml[#pool]",
                    source_ep.addr()
                );
            }
            checks.fail("source reachable", message);
            return None;
        }
    };
    // One shard per source master.
    let sources: Vec<(ServerInfo, Endpoint)> = if seed.cluster {
        let masters = cluster_masters(source_ep, "source", checks).await?;
        checks.pass(
            "source topology",
            format!(
                "Redis Cluster with {} masters: one shard each",
                masters.len()
            ),
        );
        let slots = masters
            .iter()
            .map(|(_, _, ranges)| ranges.first().map(|r| r.0))
            .collect();
        return Some((
            seed,
            masters.into_iter().map(|(i, e, _)| (i, e)).collect(),
            slots,
        ));
    } else {
        checks.pass(
            "source reachable",
            format!(
                "{} is Redis {} ({})",
                seed.addr, seed.version_text, seed.role
            ),
        );
        vec![(seed.clone(), source_ep.clone())]
    };
    Some((seed, sources, vec![None]))
}

/// The backends of a Twemproxy pool, one shard each (each a standalone
/// master). The first backend stands for the source in checks that need
/// one.
async fn twemproxy_backends(
    config: &std::path::Path,
    pool: Option<&str>,
    user: &Option<String>,
    password: &Option<shard_worker::endpoint::Secret>,
    checks: &mut Checks,
) -> Option<(ServerInfo, Vec<(ServerInfo, Endpoint)>, Vec<Option<u16>>)> {
    let pool = match crate::twemproxy::load(
        config,
        pool,
        user.as_deref(),
        password.as_ref().map(|p| p.expose()),
    ) {
        Ok(p) => p,
        Err(e) => {
            checks.fail("source", e.to_string());
            return None;
        }
    };
    checks.pass(
        "source topology",
        format!(
            "Twemproxy pool {:?} ({}{}): {} backends, one shard each",
            pool.name,
            config.display(),
            pool.listen
                .as_ref()
                .map(|l| format!(", listening on {l}"))
                .unwrap_or_default(),
            pool.backends.len()
        ),
    );
    let mut sources = Vec::new();
    for ep in pool.backends {
        match probe(&ep).await {
            Ok(info) if info.cluster => checks.fail(
                "source reachable",
                format!(
                    "{} is a Redis Cluster node, not a Twemproxy backend",
                    info.addr
                ),
            ),
            Ok(info) => {
                checks.pass(
                    "source reachable",
                    format!(
                        "{} is Redis {} ({})",
                        info.addr, info.version_text, info.role
                    ),
                );
                sources.push((info, ep));
            }
            Err(e) => checks.fail("source reachable", e.to_string()),
        }
    }
    if checks.failed() || sources.is_empty() {
        return None;
    }
    let mut addrs: Vec<&str> = sources.iter().map(|(i, _)| i.run_id.as_str()).collect();
    addrs.sort_unstable();
    addrs.dedup();
    if addrs.len() < sources.len() {
        checks.fail("source topology", "the pool lists one Redis server twice");
        return None;
    }
    // Stands for the whole pool: keys in any backend's databases.
    let mut seed = sources[0].0.clone();
    for (info, _) in &sources[1..] {
        for (db, n) in &info.keyspace {
            *seed.keyspace.entry(*db).or_default() += n;
        }
    }
    let slots = vec![None; sources.len()];
    Some((seed, sources, slots))
}

/// Checkpoints name their targets; a cluster's masters may be listed in
/// another order.
fn same_targets(a: &[String], b: &[String]) -> bool {
    let mut a = a.to_vec();
    let mut b = b.to_vec();
    a.sort();
    b.sort();
    a == b
}

/// A cluster target has only database 0: exactly one source database may
/// land there.
fn cluster_db_filter(
    cfg: &TaskConfig,
    source: &ServerInfo,
    databases: u32,
    checks: &mut Checks,
) -> DbFilter {
    if cfg.db_filter.selected().is_some() || !cfg.db_filter.mapping().is_empty() {
        let written: Vec<(u32, u32)> = (0..databases)
            .filter_map(|db| cfg.db_filter.target_db(db).map(|t| (db, t)))
            .collect();
        if let Some((db, t)) = written.iter().find(|(_, t)| *t != 0) {
            checks.fail(
                "databases",
                format!("source database {db} would go to database {t}, but a cluster target has only database 0 (use --db {db} --db-map {db}:0)"),
            );
        }
        return cfg.db_filter.clone();
    }
    let used: Vec<u32> = source
        .keyspace
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(db, _)| *db)
        .collect();
    if used.iter().any(|&db| db != 0) {
        let list: Vec<String> = used.iter().map(|d| d.to_string()).collect();
        checks.fail(
            "databases",
            format!(
                "the source has keys in databases {} but a cluster target has only database 0: choose one with --db N (and --db-map N:0 when N is not 0)",
                list.join(", ")
            ),
        );
    } else if !source.cluster {
        checks.warn(
            "databases",
            "a cluster target has only database 0: database 0 is copied; writes the source receives in other databases are not",
        );
    }
    DbFilter::new(vec![0], Default::default())
}

/// How values cross between the source's and the target's versions, and
/// what an older target cannot hold.
fn check_versions(
    cfg: &TaskConfig,
    sources: &[(ServerInfo, Endpoint)],
    newest_source: &ServerInfo,
    oldest_target: &ServerInfo,
    caps: TargetCaps,
    checks: &mut Checks,
) {
    let (source_rdb, target_rdb) = (newest_source.rdb_version(), oldest_target.rdb_version());
    if cfg.force_rewrite {
        checks.pass(
            "target version",
            "--force-rewrite: every value is rebuilt with ordinary commands",
        );
    } else if target_rdb >= source_rdb {
        checks.pass(
            "target version",
            format!(
                "{} (Redis {}, RDB {}) takes the RESTORE payloads of {} (Redis {}, RDB {}) as they are",
                oldest_target.addr,
                oldest_target.version_text,
                target_rdb,
                newest_source.addr,
                newest_source.version_text,
                source_rdb
            ),
        );
    } else {
        checks.pass(
            "target version",
            format!(
                "{} (Redis {}, RDB {}) is older than {} (Redis {}, RDB {}): values in encodings it reads are restored with their payload restamped, the others are rebuilt with ordinary commands",
                oldest_target.addr,
                oldest_target.version_text,
                target_rdb,
                newest_source.addr,
                newest_source.version_text,
                source_rdb
            ),
        );
    }
    for (source, _) in sources {
        if let Some(n) = source.function_libraries.filter(|&n| n > 0) {
            if oldest_target.version < (7, 0, 0) {
                checks.fail(
                    "functions",
                    format!(
                        "{} holds {n} function libraries, but {} runs Redis {}, which has no functions (7.0+)",
                        source.addr, oldest_target.addr, oldest_target.version_text
                    ),
                );
            }
        }
    }
    if newest_source.version >= (7, 4, 0) && !caps.field_ttls() {
        checks.warn(
            "hash field TTLs",
            format!(
                "{} (Redis {}) may hold hash fields with TTLs; {} (Redis {}) has none: such fields are written without their TTL (counted as field_ttls_dropped)",
                newest_source.addr,
                newest_source.version_text,
                oldest_target.addr,
                oldest_target.version_text
            ),
        );
    }
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
    target: &ServerInfo,
    db_filter: &DbFilter,
    source_databases: u32,
    ours: bool,
    checks: &mut Checks,
) {
    if target.role == "slave" {
        checks.fail(
            "target role",
            format!(
                "{} is a read-only replica; point --target at its master",
                target.addr
            ),
        );
    }
    if target.version < (5, 0, 0) {
        checks.fail(
            "target version",
            format!(
                "{} runs Redis {}; shardsync writes RESTORE ... ABSTTL, which needs 5.0 or newer",
                target.addr, target.version_text
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
        .filter_map(|db| db_filter.target_db(db))
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
                let heartbeats = target.heartbeat_keys.get(db).copied().unwrap_or(0);
                target
                    .keyspace
                    .get(db)
                    .map(|&n| n.saturating_sub(heartbeats))
                    .filter(|&n| n > 0)
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
