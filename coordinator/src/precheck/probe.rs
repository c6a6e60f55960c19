//! The precheck's facts, read from the live servers and the checkpoint
//! directory. Whatever cannot be reached or read becomes a failed check
//! here; everything else is judged in `checks.rs`.

use std::time::{Duration, Instant};

use engine::slot::SLOTS;
use shard_worker::Endpoint;

use super::{CheckpointFact, Checks, SourceMaster, Sources, Target, TargetMaster};
use shard_worker::conn::Conn;
use shard_worker::write::{end_earlier_connections, read_markers, WriterMarkers};

use crate::checkpoint::CheckpointStore;
use crate::config::TaskConfig;
use crate::server::{looks_like_a_proxy, probe, repl_offset, ServerInfo};
use crate::topology::{self, covered_slots, Master, Resolved};
use crate::url::SourceSpec;

/// The shortest interval the write rate is measured over.
const RATE_WINDOW: Duration = Duration::from_millis(100);

/// The source masters (or pool backends), probed.
pub(super) async fn sources(cfg: &TaskConfig, checks: &mut Checks) -> Option<Sources> {
    let sources = match &cfg.source {
        SourceSpec::Redis(ep) => redis_source(ep, checks).await?,
        SourceSpec::Sentinel(spec) => {
            let ep = match crate::sentinel::master_of(spec).await {
                Ok(ep) => ep,
                Err(e) => {
                    checks.fail("source reachable", e.to_string());
                    return None;
                }
            };
            checks.pass(
                "source sentinel",
                format!(
                    "the Sentinels ({}) name {ep} as the master '{}'; a failover is followed",
                    spec.sentinel_list(),
                    spec.name
                ),
            );
            redis_source(&ep, checks).await?
        }
        SourceSpec::Twemproxy { .. } => pool_source(&cfg.source, checks).await?,
    };
    Some(sources)
}

fn master(
    info: ServerInfo,
    endpoint: Endpoint,
    slots: Vec<(u16, u16)>,
    epoch: u64,
) -> SourceMaster {
    SourceMaster {
        info,
        endpoint,
        slot: slots.first().map(|r| r.0),
        slots,
        epoch,
        read_at: Instant::now(),
        write_rate: None,
    }
}

/// A `redis://` source: the server itself, or every master of its cluster.
async fn redis_source(ep: &Endpoint, checks: &mut Checks) -> Option<Sources> {
    let resolved = match topology::resolve(ep).await {
        Ok(r) => r,
        Err(e) => {
            let mut message = e.to_string();
            if looks_like_a_proxy(ep).await {
                message = format!(
                    "{} answers PING but not INFO: it looks like a proxy (Twemproxy?), and PSYNC does not pass through a proxy; give the pool's config instead: --source twemproxy:///path/to/nutcracker.yml[#pool]",
                    ep.addr()
                );
            }
            checks.fail("source reachable", message);
            return None;
        }
    };
    match resolved {
        Resolved::Server(seed) => {
            checks.pass(
                "source reachable",
                format!(
                    "{} is Redis {} ({})",
                    seed.addr, seed.version_text, seed.role
                ),
            );
            let masters = vec![master(seed.clone(), ep.clone(), Vec::new(), 0)];
            Some(Sources { seed, masters })
        }
        Resolved::Cluster { seed, masters } => {
            let probed = cluster_masters(&masters, "source reachable", checks).await;
            checks.pass(
                "source topology",
                format!(
                    "Redis Cluster with {} masters: one shard each",
                    probed.len()
                ),
            );
            let covered = covered_slots(&masters);
            if covered < SLOTS as u32 {
                checks.warn(
                    "source slots",
                    format!("the source cluster (seen from {ep}) serves {covered} of {SLOTS} slots; CLUSTER NODES shows no master for the others"),
                );
            }
            let masters = probed
                .into_iter()
                .map(|(info, m)| master(info, m.endpoint, m.slots, m.epoch))
                .collect();
            Some(Sources { seed, masters })
        }
    }
}

/// Every master of a cluster, probed; one failed check per unreachable one.
async fn cluster_masters(
    masters: &[Master],
    check: &'static str,
    checks: &mut Checks,
) -> Vec<(ServerInfo, Master)> {
    let mut out = Vec::new();
    for m in masters {
        match probe(&m.endpoint).await {
            Ok(info) => {
                let slots = covered_slots(std::slice::from_ref(m));
                checks.pass(
                    check,
                    format!(
                        "{} is Redis {} (cluster master, {slots} slots)",
                        info.addr, info.version_text
                    ),
                );
                out.push((info, m.clone()));
            }
            Err(e) => checks.fail(check, e.to_string()),
        }
    }
    out
}

/// The backends of a Twemproxy pool, one shard each (each a standalone
/// master). The first backend stands for the source in checks that need
/// one, with the whole pool's keyspace.
async fn pool_source(spec: &SourceSpec, checks: &mut Checks) -> Option<Sources> {
    let SourceSpec::Twemproxy { config, .. } = spec else {
        return None;
    };
    let pool = match topology::pool(spec)? {
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
    let mut masters = Vec::new();
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
                masters.push(master(info, ep, Vec::new(), 0));
            }
            Err(e) => checks.fail("source reachable", e.to_string()),
        }
    }
    if checks.failed() || masters.is_empty() {
        return None;
    }
    let mut ids: Vec<&str> = masters.iter().map(|m| m.info.run_id.as_str()).collect();
    ids.sort_unstable();
    ids.dedup();
    if ids.len() < masters.len() {
        checks.fail("source topology", "the pool lists one Redis server twice");
        return None;
    }
    let mut seed = masters[0].info.clone();
    for m in &masters[1..] {
        for (db, n) in &m.info.keyspace {
            *seed.keyspace.entry(*db).or_default() += n;
        }
    }
    Some(Sources { seed, masters })
}

/// Every target, probed, with the checkpoints an earlier run left for it.
pub(super) async fn targets(
    cfg: &TaskConfig,
    store: Option<&CheckpointStore>,
    sources: &Sources,
    checks: &mut Checks,
) -> Vec<Target> {
    let mut out = Vec::new();
    for ep in &cfg.targets {
        let name = ep.addr();
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
        let Some((cluster, masters)) = target_masters(ep, checks).await else {
            continue;
        };
        let found = sources
            .masters
            .iter()
            .map(|m| match store.as_ref().map(|s| s.load(&m.info.addr)) {
                None | Some(Ok(None)) => CheckpointFact::None,
                Some(Ok(Some(c))) => CheckpointFact::Found(c),
                Some(Err(e)) => CheckpointFact::Unreadable(e.to_string()),
            })
            .collect();
        out.push(Target {
            name,
            endpoint: ep.clone(),
            cluster,
            masters,
            checkpoints: store,
            found,
            markers: vec![None; sources.masters.len()],
            skips: vec![None; sources.masters.len()],
            again: vec![None; sources.masters.len()],
        });
    }
    out
}

/// A target's masters: the server itself, or every master of its cluster
/// (which must serve every slot).
async fn target_masters(ep: &Endpoint, checks: &mut Checks) -> Option<(bool, Vec<TargetMaster>)> {
    let resolved = match topology::resolve(ep).await {
        Ok(r) => r,
        Err(e) => {
            checks.fail("target reachable", e.to_string());
            return None;
        }
    };
    match resolved {
        Resolved::Server(info) => {
            checks.pass(
                "target reachable",
                format!(
                    "{} is Redis {} ({})",
                    info.addr, info.version_text, info.role
                ),
            );
            let m = TargetMaster {
                info,
                endpoint: ep.clone(),
                slots: Vec::new(),
            };
            Some((false, vec![m]))
        }
        Resolved::Cluster { masters, .. } => {
            let probed = cluster_masters(&masters, "target reachable", checks).await;
            checks.pass(
                "target topology",
                format!(
                    "Redis Cluster with {} masters: one writer each",
                    probed.len()
                ),
            );
            let covered = covered_slots(&masters);
            if covered < SLOTS as u32 {
                checks.fail(
                    "target slots",
                    format!("the target cluster (seen from {ep}) serves {covered} of {SLOTS} slots; CLUSTER NODES shows no master for the others"),
                );
            }
            let masters = probed
                .into_iter()
                .map(|(info, m)| TargetMaster {
                    info,
                    endpoint: m.endpoint,
                    slots: m.slots,
                })
                .collect();
            Some((true, masters))
        }
    }
}

/// The markers this task left on each standalone target, per source
/// master. A target that cannot be read fails the check (the probe just
/// reached it).
pub(super) async fn markers(
    task_id: &str,
    sources: &Sources,
    targets: &mut [Target],
    checks: &mut Checks,
) {
    let keys: Vec<bytes::Bytes> = sources
        .masters
        .iter()
        .map(|m| engine::marker::key(task_id, &m.endpoint.addr(), None).into())
        .collect();
    let spec = WriterMarkers {
        keys,
        client_name: shard_worker::write::client_name(task_id),
    };
    for t in targets.iter_mut().filter(|t| t.cluster) {
        for (shard, base) in spec.keys.iter().enumerate() {
            match cluster_markers(task_id, &t.masters, base).await {
                Ok(nodes) => {
                    let (marker, skip) = super::checks::cluster_markers(&nodes);
                    t.markers[shard] = marker;
                    t.skips[shard] = skip;
                }
                Err(e) => checks.fail("target markers", e.to_string()),
            }
        }
    }
    for t in targets.iter_mut().filter(|t| !t.cluster) {
        let read = async {
            let mut conn = Conn::open_authenticated(&t.endpoint).await?;
            end_earlier_connections(&mut conn, &spec.client_name).await?;
            let mut found = read_markers(&mut conn, &spec).await?;
            adopt_markers(&mut conn, sources, &mut found, checks).await?;
            Ok::<_, shard_worker::WorkerError>(found)
        };
        match read.await {
            Ok(found) => t.markers = found,
            Err(e) => checks.fail("target markers", e.to_string()),
        }
    }
}

/// On a cluster source, the record of its slot owners an earlier run left
/// on each target: which masters are copied again rather than resumed
/// (`engine::ownership`). Before those full syncs begin, the source's open
/// slot migrations must end: a snapshot taken while a slot's keys are on
/// two masters cannot be put in order with the other's stream. `true`
/// when it waited for them: the topology probed before is stale (the
/// precheck runs again).
pub(super) async fn ownership(
    task_id: &str,
    sources: &Sources,
    targets: &mut [Target],
    checks: &mut Checks,
) -> bool {
    if sources.masters.iter().all(|m| m.slots.is_empty()) {
        return false;
    }
    let now: Vec<engine::ownership::Owner> = sources
        .masters
        .iter()
        .map(|m| engine::ownership::Owner {
            addr: m.endpoint.addr(),
            epoch: m.epoch,
            slots: m.slots.clone(),
        })
        .collect();
    let mut any = false;
    for t in targets.iter_mut() {
        let key = engine::ownership::key(task_id, t.cluster);
        let nodes: Vec<Endpoint> = if t.cluster {
            t.masters.iter().map(|m| m.endpoint.clone()).collect()
        } else {
            vec![t.endpoint.clone()]
        };
        let record = match crate::ownership::read(&nodes, &key).await {
            Ok(r) => r,
            Err(e) => {
                checks.fail("source resharded", e.to_string());
                continue;
            }
        };
        let Some(record) = record else {
            continue;
        };
        for (addr, why) in record.to_copy_again(&now) {
            // Only where there is something to resume.
            if let Some(shard) = sources
                .masters
                .iter()
                .position(|m| m.endpoint.addr() == addr)
            {
                if matches!(
                    t.markers[shard],
                    Some(engine::marker::Marker::Applied { .. })
                ) {
                    t.again[shard] = Some(why);
                    any = true;
                }
            }
        }
    }
    if any {
        let seeds: Vec<Endpoint> = sources.masters.iter().map(|m| m.endpoint.clone()).collect();
        return crate::ownership::wait_for_closed_migrations(&seeds).await;
    }
    false
}

/// A source master without a marker of its own that was promoted from a
/// replica (a planned failover, then the same command against the new
/// master): a marker left under the old master's name that names the
/// history it continues is taken as its own (`checks::adopted_marker`).
/// Markers are in database 0 of a standalone target.
async fn adopt_markers(
    conn: &mut Conn,
    sources: &Sources,
    found: &mut [Option<engine::marker::Marker>],
    checks: &mut Checks,
) -> Result<(), shard_worker::WorkerError> {
    let pattern = format!("{}*", engine::marker::MARK);
    for (shard, marker) in found.iter_mut().enumerate() {
        let Some(master) = sources.masters.get(shard) else {
            continue;
        };
        let (None, Some((replid2, second))) = (&marker, &master.info.earlier_history) else {
            continue;
        };
        let mut others = Vec::new();
        let mut cursor = "0".to_string();
        loop {
            let (next, keys) = conn.scan_page(&cursor, Some(&pattern)).await?;
            for key in keys {
                if let engine::resp::Frame::Bulk(v) = conn.request(&[&b"GET"[..], &key]).await? {
                    others.extend(engine::marker::Marker::parse(&v));
                }
            }
            if next == "0" {
                break;
            }
            cursor = next;
        }
        let histories = [
            (replid2.as_str(), *second),
            (master.info.replid.as_str(), master.info.master_repl_offset),
        ];
        if let Some(m) = super::checks::adopted_marker(&histories, &others) {
            checks.pass(
                "source failover",
                format!(
                    "{} continues the history of an earlier master ({replid2}): resuming from the marker that master's sync left",
                    master.endpoint
                ),
            );
            *marker = Some(m);
        }
    }
    Ok(())
}

/// One shard's markers on every master of a cluster target: its node-wide
/// marker (in the master's first slot) and the marker of each slot it
/// serves.
async fn cluster_markers(
    task: &str,
    masters: &[TargetMaster],
    base: &[u8],
) -> Result<Vec<super::checks::NodeMarkers>, shard_worker::WorkerError> {
    let mut out = Vec::new();
    for m in masters {
        let mut conn = Conn::open_authenticated(&m.endpoint).await?;
        end_earlier_connections(&mut conn, &shard_worker::write::client_name(task)).await?;
        let slots: Vec<u16> = m.slots.iter().flat_map(|&(a, b)| a..=b).collect();
        let Some(&home) = slots.iter().min() else {
            continue;
        };
        let mut keys = vec![engine::marker::node_wide(base, home)];
        keys.extend(slots.iter().map(|&s| engine::marker::in_slot(base, s)));
        let mut found = Vec::with_capacity(keys.len());
        for chunk in keys.chunks(1000) {
            let gets: Vec<Vec<&[u8]>> = chunk.iter().map(|k| vec![&b"GET"[..], k]).collect();
            found.extend(conn.pipeline(&gets).await?.into_iter().map(|r| match r {
                engine::resp::Frame::Bulk(v) => engine::marker::Marker::parse(&v),
                _ => None,
            }));
        }
        let node = found.first().cloned().flatten();
        let slot_markers = slots
            .iter()
            .zip(found.into_iter().skip(1))
            .filter_map(|(&s, m)| m.map(|m| (s, m)))
            .collect();
        out.push(super::checks::NodeMarkers {
            addr: m.endpoint.addr(),
            node,
            slots: slot_markers,
        });
    }
    Ok(out)
}

/// How fast each source master's replication stream grows: its offset
/// read again, at least [`RATE_WINDOW`] after the probe.
pub(super) async fn write_rates(sources: &mut Sources) {
    let Some(first) = sources.masters.iter().map(|m| m.read_at).min() else {
        return;
    };
    let elapsed = first.elapsed();
    if elapsed < RATE_WINDOW {
        tokio::time::sleep(RATE_WINDOW - elapsed).await;
    }
    for m in &mut sources.masters {
        if let Ok(offset) = repl_offset(&m.endpoint).await {
            let secs = m.read_at.elapsed().as_secs_f64();
            let grown = offset.saturating_sub(m.info.master_repl_offset);
            m.write_rate = Some(grown as f64 / secs.max(0.001));
        }
    }
}
