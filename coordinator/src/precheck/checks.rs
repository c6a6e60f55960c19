//! The precheck's rules: pure functions of what the servers said about
//! themselves (and of the task's options) that add checks.

use engine::filter::DbFilter;
use engine::rebuild::TargetCaps;

use super::{CheckpointFact, Checks, SourceMaster, TargetMaster};
use crate::checkpoint::CheckpointState;
use crate::config::OnConflict;
use crate::server::ServerInfo;
use engine::marker::Marker;
use shard_worker::progress::ResumePoint;

/// The speed a full sync is assumed to reach when judging settings that
/// must outlast one (about what shardsync reaches on two cores).
pub const ASSUMED_SYNC_BYTES_PER_SEC: f64 = 40.0 * 1024.0 * 1024.0;
/// repl-timeout the seeds ask for on big datasets.
pub const REPL_TIMEOUT_BIG_SECS: u64 = 600;
/// A dataset this large makes a full sync long enough for repl-timeout to
/// matter.
pub const BIG_DATASET_BYTES: u64 = 1024 * 1024 * 1024;
/// The backlog should cover at least this long an absence.
pub const BACKLOG_MIN_SECS: f64 = 60.0;
/// The backlog suggested: this long an absence.
pub const BACKLOG_SUGGESTED_SECS: f64 = 600.0;

const MB: f64 = 1024.0 * 1024.0;

fn mb(bytes: f64) -> String {
    format!("{:.1} MB", bytes / MB)
}

/// A size rounded up to whole MB, as CONFIG SET takes it.
fn config_mb(bytes: f64) -> String {
    format!("{}mb", (bytes / MB).ceil().max(1.0) as u64)
}

/// The source can be replicated from.
pub fn source(info: &ServerInfo, checks: &mut Checks) {
    if info.version < (2, 8, 0) {
        checks.fail(
            "source version",
            format!(
                "{} runs Redis {}; PSYNC needs 2.8 or newer",
                info.addr, info.version_text
            ),
        );
    }
    if info.role == "slave" {
        if info.master_link_up {
            checks.pass(
                "source role",
                format!(
                    "{} is a replica; syncing from it spares its master",
                    info.addr
                ),
            );
        } else {
            checks.warn(
                "source role",
                format!("{} is a replica whose link to its master is down; it refuses PSYNC until the link is up", info.addr),
            );
        }
    }
    if let Some(delay) = info.diskless_sync_delay.filter(|d| *d > 0) {
        checks.warn(
            "source diskless delay",
            format!(
                "{} waits repl-diskless-sync-delay = {delay} s before each diskless transfer",
                info.addr
            ),
        );
    }
}

/// Seconds a full sync of `info`'s data is expected to take.
pub fn expected_sync_secs(info: &ServerInfo) -> f64 {
    info.used_memory as f64 / ASSUMED_SYNC_BYTES_PER_SEC
}

/// The source settings that decide whether a long sync survives:
/// repl-timeout on a big dataset, the replica output buffer against the
/// writes it must hold during a full sync, and the backlog against how long
/// shardsync may be away and still continue.
pub fn replication(m: &SourceMaster, checks: &mut Checks) {
    let info = &m.info;
    if let Some(timeout) = info.repl_timeout {
        if timeout < REPL_TIMEOUT_BIG_SECS && info.used_memory >= BIG_DATASET_BYTES {
            checks.warn(
                "source repl-timeout",
                format!(
                    "{} has repl-timeout {timeout} s and holds {}: a full sync may outlast it; run CONFIG SET repl-timeout {REPL_TIMEOUT_BIG_SECS}",
                    info.addr,
                    mb(info.used_memory as f64)
                ),
            );
        }
    }
    let Some(rate) = m.write_rate.filter(|r| *r > 0.0) else {
        return;
    };
    let secs = expected_sync_secs(info);
    if let Some(limit) = &info.replica_buffer_limit {
        // What the master buffers for us while it produces and sends the
        // snapshot: every write of that time.
        let held = rate * secs;
        let over_hard = limit.hard > 0 && held > limit.hard as f64;
        let over_soft = limit.soft > 0 && held > limit.soft as f64 && secs > limit.soft_secs as f64;
        if over_hard || over_soft {
            let want = config_mb(2.0 * held);
            checks.warn(
                "source output buffer",
                format!(
                    "{} receives {}/s of writes; a full sync of {} (about {secs:.0} s) makes it buffer about {} for us, over its client-output-buffer-limit {} (hard {}, soft {} for {} s), and it would drop the link: run CONFIG SET client-output-buffer-limit \"{} {want} {want} 0\"",
                    info.addr,
                    mb(rate),
                    mb(info.used_memory as f64),
                    mb(held),
                    limit.class,
                    mb(limit.hard as f64),
                    mb(limit.soft as f64),
                    limit.soft_secs,
                    limit.class,
                ),
            );
        }
    }
    if let Some(backlog) = info.repl_backlog_size.filter(|b| *b > 0) {
        let away = backlog as f64 / rate;
        if away < BACKLOG_MIN_SECS {
            checks.warn(
                "source backlog",
                format!(
                    "{} receives {}/s of writes: its repl-backlog-size of {} covers {away:.0} s, so a shardsync restart or a lost link longer than that needs a full sync; run CONFIG SET repl-backlog-size {}",
                    info.addr,
                    mb(rate),
                    mb(backlog as f64),
                    config_mb(rate * BACKLOG_SUGGESTED_SECS),
                ),
            );
        } else {
            checks.pass(
                "source backlog",
                format!(
                    "{}: at {}/s of writes, repl-backlog-size {} lets shardsync be away {away:.0} s and still continue",
                    info.addr,
                    mb(rate),
                    mb(backlog as f64)
                ),
            );
        }
    }
}

/// The target databases written to (sorted, once each).
pub fn written_dbs(filter: &DbFilter, source_databases: u32) -> Vec<u32> {
    let mut written: Vec<u32> = (0..source_databases)
        .filter_map(|db| filter.target_db(db))
        .collect();
    written.sort_unstable();
    written.dedup();
    written
}

/// Every database `--db` names exists on the source.
pub fn selected_dbs(filter: &DbFilter, source_databases: u32, checks: &mut Checks) {
    for &db in filter.selected().unwrap_or_default() {
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

/// A target node can take what we write.
pub fn target(
    target: &ServerInfo,
    written: &[u32],
    on_conflict: OnConflict,
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
    if let Some(n) = target.databases {
        if let Some(&db) = written.iter().find(|&&db| db >= n) {
            checks.fail(
                "databases",
                format!("{} has {n} databases, but database {db} would be written (see --db / --db-map)", target.addr),
            );
        }
    }
    if on_conflict == OnConflict::Precheck && !ours {
        target_empty(target, written, checks);
    }
}

fn target_empty(target: &ServerInfo, written: &[u32], checks: &mut Checks) {
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

/// The share of the source's keys in the databases copied (1 when the
/// source reports no keys).
pub fn copied_share(seed: &ServerInfo, filter: &DbFilter) -> f64 {
    let total: u64 = seed.keyspace.values().sum();
    if total == 0 {
        return 1.0;
    }
    let copied: u64 = seed
        .keyspace
        .iter()
        .filter(|(db, _)| filter.target_db(**db).is_some())
        .map(|(_, n)| n)
        .sum();
    copied as f64 / total as f64
}

/// The data the source holds, bytes: the dataset without the server's own
/// overhead where the server reports it.
fn data_bytes(info: &ServerInfo) -> u64 {
    info.used_memory_dataset.unwrap_or(info.used_memory)
}

/// Each target node has room for what it gets: on a cluster its share of
/// the slots, of the copied share of every source master's data. On a
/// target checked empty that comes on top of what it uses; on one that may
/// already hold (some of) the same keys, the larger of the two counts.
pub fn memory(
    sources: &[SourceMaster],
    share_copied: f64,
    targets: &[TargetMaster],
    fresh: bool,
    checks: &mut Checks,
) {
    let data: u64 = sources.iter().map(|m| data_bytes(&m.info)).sum();
    let copied = data as f64 * share_copied;
    let cluster = targets.iter().any(|t| !t.slots.is_empty());
    for t in targets.iter().filter(|t| t.info.maxmemory > 0) {
        let share = if cluster {
            let slots: u32 = t.slots.iter().map(|&(a, b)| (b - a) as u32 + 1).sum();
            slots as f64 / engine::slot::SLOTS as f64
        } else {
            1.0
        };
        let incoming = copied * share;
        let used = t.info.used_memory as f64;
        let needed = if fresh {
            incoming + used
        } else {
            let held = data_bytes(&t.info) as f64;
            incoming.max(held) + (used - held).max(0.0)
        };
        if needed > t.info.maxmemory as f64 {
            checks.fail(
                "target memory",
                format!(
                    "{} has maxmemory {} and already uses {}; the data it would receive takes {} on the source (used_memory_dataset): raise its maxmemory, or copy less (--db, --include)",
                    t.info.addr,
                    mb(t.info.maxmemory as f64),
                    mb(used),
                    mb(incoming)
                ),
            );
        }
    }
}

/// The target is not one of the sources.
pub fn not_the_source(sources: &[SourceMaster], targets: &[TargetMaster], checks: &mut Checks) {
    for s in sources {
        for t in targets {
            if !s.info.run_id.is_empty() && s.info.run_id == t.info.run_id {
                checks.fail("target", format!("{} is the source itself", t.info.addr));
            }
        }
    }
}

/// A cluster target has only database 0: exactly one source database may
/// land there. Returns the databases copied.
pub fn cluster_db_filter(
    filter: &DbFilter,
    seed: &ServerInfo,
    databases: u32,
    checks: &mut Checks,
) -> DbFilter {
    if filter.selected().is_some() || !filter.mapping().is_empty() {
        let wrong = (0..databases)
            .filter_map(|db| filter.target_db(db).map(|t| (db, t)))
            .find(|(_, t)| *t != 0);
        if let Some((db, t)) = wrong {
            checks.fail(
                "databases",
                format!("source database {db} would go to database {t}, but a cluster target has only database 0 (use --db {db} --db-map {db}:0)"),
            );
        }
        return filter.clone();
    }
    let used: Vec<u32> = seed
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
    } else if !seed.cluster {
        checks.warn(
            "databases",
            "a cluster target has only database 0: database 0 is copied; writes the source receives in other databases are not",
        );
    }
    DbFilter::new(vec![0], Default::default())
}

/// How values cross between the source's and the target's versions, and
/// what an older target cannot hold.
pub fn versions(
    force_rewrite: bool,
    sources: &[SourceMaster],
    oldest_target: &ServerInfo,
    caps: TargetCaps,
    checks: &mut Checks,
) {
    let Some(newest) = sources.iter().map(|m| &m.info).max_by_key(|i| i.version) else {
        return;
    };
    let (source_rdb, target_rdb) = (newest.rdb_version(), oldest_target.rdb_version());
    let pair = format!(
        "{} (Redis {}, RDB {}) {} {} (Redis {}, RDB {})",
        oldest_target.addr,
        oldest_target.version_text,
        target_rdb,
        if target_rdb >= source_rdb {
            "takes the RESTORE payloads of"
        } else {
            "is older than"
        },
        newest.addr,
        newest.version_text,
        source_rdb
    );
    if force_rewrite {
        checks.pass(
            "target version",
            "--force-rewrite: every value is rebuilt with ordinary commands",
        );
    } else if target_rdb >= source_rdb {
        checks.pass("target version", format!("{pair} as they are"));
    } else {
        checks.pass(
            "target version",
            format!("{pair}: values in encodings it reads are restored with their payload restamped, the others are rebuilt with ordinary commands"),
        );
    }
    for s in sources {
        if let Some(n) = s.info.function_libraries.filter(|&n| n > 0) {
            if oldest_target.version < (7, 0, 0) {
                checks.fail(
                    "functions",
                    format!(
                        "{} holds {n} function libraries, but {} runs Redis {}, which has no functions (7.0+)",
                        s.info.addr, oldest_target.addr, oldest_target.version_text
                    ),
                );
            }
        }
    }
    if newest.version >= (7, 4, 0) && !caps.field_ttls() {
        checks.warn(
            "hash field TTLs",
            format!(
                "{} (Redis {}) may hold hash fields with TTLs; {} (Redis {}) has none: such fields are written without their TTL (counted as field_ttls_dropped)",
                newest.addr, newest.version_text, oldest_target.addr, oldest_target.version_text
            ),
        );
    }
}

/// The big-key threshold kept under what every target takes in one
/// argument (with room for the rest of the command).
pub fn big_keys(threshold: usize, targets: &[TargetMaster], checks: &mut Checks) -> usize {
    let Some(limit) = targets
        .iter()
        .filter_map(|t| t.info.proto_max_bulk_len)
        .min()
    else {
        return threshold;
    };
    let ceiling = (limit as usize).saturating_sub(1024 * 1024).max(1024);
    if threshold <= ceiling {
        return threshold;
    }
    checks.warn(
        "big keys",
        format!(
            "the target takes arguments up to {limit} bytes (proto-max-bulk-len): values over {ceiling} bytes are written in parts"
        ),
    );
    ceiling
}

/// One shard's markers on one master of a cluster target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeMarkers {
    pub addr: String,
    /// Its node-wide marker: everything before it applied on the node.
    pub node: Option<Marker>,
    /// The markers of the slots it serves.
    pub slots: Vec<(u16, Marker)>,
}

/// What one shard's markers on a cluster target say together: the marker
/// the shard resumes from — the node furthest behind — and what each node
/// and slot applied beyond it. Resumable only when every node's marker
/// names the same sync (epoch and replication id); a node without one, or
/// one still loading a full sync, makes the shard start over (`Full`).
pub fn cluster_markers(
    nodes: &[NodeMarkers],
) -> (Option<Marker>, Option<shard_worker::route::Skip>) {
    let markers: Vec<&Marker> = nodes.iter().filter_map(|n| n.node.as_ref()).collect();
    let Some(newest) = markers.iter().map(|m| m.epoch()).max() else {
        return (None, None);
    };
    let fresh = markers.iter().all(|m| m.fresh());
    let start_over = (
        Some(Marker::Full {
            epoch: newest,
            fresh,
        }),
        None,
    );
    // The node furthest behind: its marker and offset.
    let mut floor: Option<(&Marker, u64)> = None;
    let mut skip = shard_worker::route::Skip {
        slots: vec![0; engine::slot::SLOTS as usize],
        ..Default::default()
    };
    let mut history: Option<(&str, u64)> = None;
    for n in nodes {
        let Some(Marker::Applied {
            epoch,
            replid,
            offset,
            ..
        }) = &n.node
        else {
            return start_over;
        };
        if *epoch != newest || history.is_some_and(|h| h != (replid.as_str(), *epoch)) {
            return start_over;
        }
        history = Some((replid, *epoch));
        skip.replid.clone_from(replid);
        skip.nodes.insert(n.addr.clone(), *offset);
        if let (Some(m), true) = (&n.node, floor.is_none_or(|(_, o)| *offset < o)) {
            floor = Some((m, *offset));
        }
        for (slot, m) in &n.slots {
            if let Marker::Applied {
                epoch: e,
                replid: r,
                offset: o,
                ..
            } = m
            {
                if *e == *epoch && r == replid && o > offset {
                    skip.slots[*slot as usize] = *o;
                }
            }
        }
    }
    (floor.map(|(m, _)| m.clone()), Some(skip))
}

/// A source master promoted from a replica continues the history it
/// replicated (its `master_replid2` up to `second_repl_offset`), and its
/// own since (`master_replid` up to `master_repl_offset`). A marker an
/// earlier run left under another master's name (another address, so
/// another key) is this shard's if it names one of those `histories` at a
/// position the master can continue from: the newest such one, else
/// `None`. (After a failover a run followed — a Sentinel source — the
/// marker names the new master's own history.)
pub fn adopted_marker(histories: &[(&str, u64)], found: &[Marker]) -> Option<Marker> {
    engine::marker::newest(
        found
            .iter()
            .filter(|m| {
                matches!(m, Marker::Applied { replid, offset, .. }
            if histories.iter().any(|(id, upto)| replid == id && offset <= upto))
            })
            .cloned(),
    )
}

/// Where a shard starts, from what an earlier run of the task left.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Start {
    /// The target holds this shard's data (a full sync replaces it).
    pub ours: bool,
    /// Continue with a partial resync from here.
    pub resume: Option<ResumePoint>,
    /// The newest sync epoch the target's marker names.
    pub epoch: u64,
    /// The marker says the task began on a target checked empty.
    pub fresh: bool,
}

/// Where shard `source` starts. The target's marker wins over the local
/// checkpoint: it was written in the same transaction as the data, so it
/// says exactly what the target holds, where a checkpoint may lag behind
/// what was applied after it. The checkpoint is the fallback (markers off,
/// or none found).
pub fn start(
    source: &str,
    marker: Option<&Marker>,
    checkpoint_fact: &CheckpointFact,
    target_addrs: &[String],
    checks: &mut Checks,
) -> Start {
    match marker {
        Some(Marker::Applied {
            epoch,
            fresh,
            replid,
            offset,
            db,
        }) => {
            checks.pass(
                "checkpoint",
                format!("resuming {source} from offset {offset}, where the target's marker says it is (partial resync)"),
            );
            Start {
                ours: true,
                resume: Some(ResumePoint {
                    replid: replid.clone(),
                    offset: *offset,
                    db: *db,
                }),
                epoch: *epoch,
                fresh: *fresh,
            }
        }
        Some(Marker::Full { epoch, fresh }) => {
            checks.warn(
                "checkpoint",
                format!("an earlier full sync of {source} did not finish (the target's marker says so); starting it over, replacing the keys it wrote"),
            );
            Start {
                ours: true,
                resume: None,
                epoch: *epoch,
                fresh: *fresh,
            }
        }
        None => {
            let (ours, resume) = checkpoint(source, checkpoint_fact, target_addrs, checks);
            Start {
                ours,
                resume,
                epoch: 0,
                fresh: false,
            }
        }
    }
}

/// Where shard `source` starts when the source's slots changed hands in a
/// way its marker cannot order against the other shards' (see
/// `engine::ownership`): over again, with a full sync that replaces what
/// the target holds of it.
pub fn copy_again(
    source: &str,
    marker: Option<&Marker>,
    why: engine::ownership::Again,
    checks: &mut Checks,
) -> Start {
    checks.warn(
        "source resharded",
        format!(
            "{source} starts with a full sync instead of resuming: {}",
            why.describe()
        ),
    );
    Start {
        ours: true,
        resume: None,
        epoch: marker.map_or(0, Marker::epoch),
        fresh: marker.is_some_and(Marker::fresh),
    }
}

/// What an earlier run's checkpoint of `source` means for this one:
/// whether the targets hold its data, and where to resume.
pub fn checkpoint(
    source: &str,
    fact: &CheckpointFact,
    target_addrs: &[String],
    checks: &mut Checks,
) -> (bool, Option<ResumePoint>) {
    let ckpt = match fact {
        CheckpointFact::None => return (false, None),
        CheckpointFact::Unreadable(e) => {
            checks.fail("checkpoint", e.clone());
            return (false, None);
        }
        CheckpointFact::Found(c) => c,
    };
    if !same_targets(&ckpt.targets, target_addrs) {
        checks.warn(
            "checkpoint",
            format!(
                "the checkpoint of {source} was written for targets {:?}, not {:?}; ignoring it",
                ckpt.targets, target_addrs
            ),
        );
        return (false, None);
    }
    match &ckpt.state {
        CheckpointState::Resumable { offset, .. } => checks.pass(
            "checkpoint",
            format!("resuming {source} from offset {offset} (partial resync)"),
        ),
        CheckpointState::FullSyncInProgress => checks.warn(
            "checkpoint",
            format!("an earlier full sync of {source} did not finish; starting it over"),
        ),
    }
    (true, ckpt.resume_point())
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
