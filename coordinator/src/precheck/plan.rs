//! The rules applied to the facts, and the plan they allow: one per target.

use engine::rebuild::TargetCaps;
use shard_worker::Endpoint;

use super::{checks, Checks, Plan, ShardPlan, Sources, Target, TargetPlan};
use crate::config::{OnConflict, TaskConfig};

/// Whether the target gets markers (asked for unless --no-exactly-once).
fn exactly_once(cfg: &TaskConfig, target: &Target, checks: &mut Checks) -> bool {
    if !cfg.exactly_once {
        checks.warn(
            "exactly once",
            format!("--no-exactly-once: commands resent to {} after a lost link or a restart may run twice", target.name),
        );
        return false;
    }
    if target.cluster {
        checks.pass(
            "exactly once",
            format!("every batch to a node of {} is one transaction per slot, each with its slot's marker, and the node's own marker after them: nothing is applied twice", target.name),
        );
        return true;
    }
    checks.pass(
        "exactly once",
        format!("every batch to {} carries its position in a marker key (one per source master, database 0): nothing is applied twice", target.name),
    );
    true
}
use crate::server::ServerInfo;

/// A plan per target; targets whose rules fail have none.
pub(super) fn plans(
    cfg: &TaskConfig,
    task_id: &str,
    sources: &Sources,
    targets: &[Target],
    checks: &mut Checks,
) -> Vec<Plan> {
    for m in &sources.masters {
        checks::source(&m.info, checks);
        checks::replication(m, checks);
    }
    if checks.failed() {
        return Vec::new();
    }
    let mut plans = Vec::new();
    let mut seen: Vec<(&str, &ServerInfo)> = Vec::new();
    for target in targets {
        for m in &target.masters {
            let other = seen
                .iter()
                .find(|(_, i)| !i.run_id.is_empty() && i.run_id == m.info.run_id);
            if let Some((other, _)) = other {
                checks.fail(
                    "targets",
                    format!(
                        "{} (target {}) is also a node of target {other}: give each target once",
                        m.info.addr, target.name
                    ),
                );
            }
            seen.push((&target.name, &m.info));
        }
        if let Some(plan) = plan_target(cfg, task_id, sources, target, checks) {
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

/// The plan for one target.
fn plan_target(
    cfg: &TaskConfig,
    task_id: &str,
    sources: &Sources,
    target: &Target,
    checks: &mut Checks,
) -> Option<Plan> {
    if checks.failed() || target.masters.is_empty() {
        return None;
    }
    let target_plan = if target.cluster {
        TargetPlan::Cluster {
            masters: target
                .masters
                .iter()
                .map(|m| (m.endpoint.clone(), m.slots.clone()))
                .collect(),
        }
    } else {
        TargetPlan::Standalone(target.endpoint.clone())
    };
    let target_addrs: Vec<String> = target_plan.endpoints().iter().map(Endpoint::addr).collect();
    let shards: Vec<ShardPlan> = sources
        .masters
        .iter()
        .zip(&target.found)
        .zip(&target.markers)
        .zip(&target.skips)
        .zip(&target.again)
        .map(|((((m, fact), marker), skip), again)| {
            let start = match again {
                Some(why) => checks::copy_again(&m.info.addr, marker.as_ref(), *why, checks),
                None => checks::start(&m.info.addr, marker.as_ref(), fact, &target_addrs, checks),
            };
            let resumes = start.resume.is_some();
            ShardPlan {
                endpoint: m.endpoint.clone(),
                resume: start.resume,
                ours: start.ours,
                slot: m.slot,
                slots: m.slots.clone(),
                config_epoch: m.epoch,
                copy_again: again.is_some(),
                epoch: start.epoch,
                fresh: start.fresh,
                skip: skip.clone().filter(|_| resumes),
            }
        })
        .collect();
    let ours = shards.iter().any(|s| s.ours);
    // A task that begins now on a target the precheck finds empty.
    let mut shards = shards;
    if !ours && cfg.on_conflict == OnConflict::Precheck {
        for s in &mut shards {
            s.fresh = true;
        }
    }

    let source_databases = sources
        .masters
        .iter()
        .filter_map(|m| m.info.databases)
        .max()
        .unwrap_or(16);
    checks::selected_dbs(&cfg.db_filter, source_databases, checks);
    let db_filter = if target.cluster {
        checks::cluster_db_filter(&cfg.db_filter, &sources.seed, source_databases, checks)
    } else {
        cfg.db_filter.clone()
    };
    checks::not_the_source(&sources.masters, &target.masters, checks);
    let written = checks::written_dbs(&db_filter, source_databases);
    for t in &target.masters {
        checks::target(&t.info, &written, cfg.on_conflict, ours, checks);
    }
    let fresh = cfg.on_conflict == OnConflict::Precheck && !ours;
    let share = checks::copied_share(&sources.seed, &db_filter);
    checks::memory(&sources.masters, share, &target.masters, fresh, checks);
    let oldest = target
        .masters
        .iter()
        .map(|m| &m.info)
        .min_by_key(|i| i.version)?;
    let target_caps = TargetCaps::new(
        oldest.version.0.min(u16::MAX as u32) as u16,
        oldest.version.1.min(u16::MAX as u32) as u16,
    );
    checks::versions(
        cfg.force_rewrite,
        &sources.masters,
        oldest,
        target_caps,
        checks,
    );
    let big_key_bytes = checks::big_keys(cfg.big_key_threshold, &target.masters, checks);
    if checks.failed() {
        return None;
    }
    Some(Plan {
        name: target.name.clone(),
        shards,
        target: target_plan,
        source_databases,
        db_filter,
        target_caps,
        big_key_bytes,
        checkpoints: target.checkpoints.clone(),
        task_id: task_id.to_string(),
        exactly_once: exactly_once(cfg, target, checks),
    })
}
