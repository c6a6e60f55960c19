//! The record of a cluster source's slot owners on the target
//! (`engine::ownership`): written while the task runs, read by the
//! precheck of the next run.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use engine::ownership::{Owner, Ownership};
use engine::resp::Frame;
use shard_worker::conn::Conn;
use shard_worker::endpoint::Endpoint;
use shard_worker::progress::ShardState;
use shard_worker::source::handover::Peers;
use shard_worker::WorkerError;

/// How often the recorder looks.
const PERIOD: Duration = Duration::from_secs(1);
/// A record is written again this often even when it did not change.
const REWRITE: Duration = Duration::from_secs(30);
/// A shard stays "moving" this long after the target applied its stream
/// past the change: its markers (refreshed every second on idle nodes)
/// must say so too before a restart may resume it.
const SETTLE: Duration = Duration::from_secs(5);
/// A master whose slots or epoch the recorder sees change is "moving" this
/// long whatever its shard says: its shard learns of the change from its
/// own sampler, a moment later.
const NOTICED: Duration = Duration::from_secs(10);
/// How long no slot may have been open before masters are copied again.
const QUIET: Duration = Duration::from_secs(5);

/// The record under `key`, from whichever of `nodes` holds it (a cluster
/// target: the node serving its slot; MOVED is followed once).
pub async fn read(nodes: &[Endpoint], key: &[u8]) -> Result<Option<Ownership>, WorkerError> {
    match request(nodes, &[&b"GET"[..], key]).await? {
        Frame::Bulk(v) => Ok(Ownership::parse(&v)),
        _ => Ok(None),
    }
}

/// `args` (one key's command) on the node of `nodes` that serves its key
/// (MOVED followed once; ASK with ASKING). An error reply is an error.
async fn request(nodes: &[Endpoint], args: &[&[u8]]) -> Result<Frame, WorkerError> {
    let refused = |ep: &Endpoint, text: String| WorkerError::TargetRefused {
        addr: ep.addr(),
        what: "the record of the source's slot owners",
        message: text,
    };
    let mut last = None;
    for ep in nodes {
        let mut conn = Conn::open_authenticated(ep).await?;
        let reply = conn.request(args).await?;
        let Frame::Error(e) = &reply else {
            return Ok(reply);
        };
        let text = String::from_utf8_lossy(e).into_owned();
        let Some(redirect) = engine::cluster::parse_redirect(&text) else {
            last = Some(refused(ep, text));
            continue;
        };
        let (host, port) = redirect.addr();
        let there = ep.with_addr(host, port);
        let mut conn = Conn::open_authenticated(&there).await?;
        if matches!(redirect, engine::cluster::Redirect::Ask { .. }) {
            conn.request(&["ASKING"]).await?;
        }
        return match conn.request(args).await? {
            Frame::Error(e) => Err(refused(&there, String::from_utf8_lossy(&e).into_owned())),
            reply => Ok(reply),
        };
    }
    Err(last.unwrap_or(WorkerError::Closed {
        addr: String::new(),
        context: "no target node for the record of the source's slot owners",
    }))
}

/// The source's masters now (serving ones), as the first of `seeds` that
/// answers sees them.
async fn source_view(seeds: &[Endpoint]) -> Result<Vec<Owner>, WorkerError> {
    let mut last = None;
    for ep in seeds {
        match crate::server::cluster_nodes(ep).await {
            Ok(nodes) => {
                return Ok(nodes
                    .iter()
                    .filter(|n| n.serving_master())
                    .map(|n| Owner {
                        addr: shard_worker::endpoint::addr_of(&n.host, n.port),
                        epoch: n.config_epoch,
                        slots: n.slots.clone(),
                    })
                    .collect())
            }
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or(WorkerError::Closed {
        addr: String::new(),
        context: "no source master to ask for its slots",
    }))
}

/// The masters among `seeds` migrating or importing a slot (each lists
/// its own open slots only).
async fn open_migrations(seeds: &[Endpoint]) -> Result<Vec<String>, WorkerError> {
    let mut open = Vec::new();
    for ep in seeds {
        let nodes = crate::server::cluster_nodes(ep).await?;
        if nodes.iter().any(|n| n.myself && n.open_slots) {
            open.push(ep.addr());
        }
    }
    Ok(open)
}

/// Waits until no master of the source has migrated or imported a slot
/// for [`QUIET`] (a reshard moves slot after slot, with instants between
/// them; a full sync taken while a slot's keys are on two masters could
/// not be put in order with the other master's stream). Says so every
/// 10 s.
/// `true` when a migration was seen open (the caller looks again at the
/// topology it left).
pub async fn wait_for_closed_migrations(seeds: &[Endpoint]) -> bool {
    let started = Instant::now();
    let mut quiet_since: Option<Instant> = None;
    let mut said: Option<Instant> = None;
    loop {
        match open_migrations(seeds).await {
            Ok(open) if open.is_empty() => {
                let since = *quiet_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= QUIET {
                    if said.is_some() {
                        tracing::info!(
                            waited_secs = started.elapsed().as_secs(),
                            "the source's slot migrations ended"
                        );
                    }
                    return said.is_some();
                }
            }
            Ok(open) => {
                quiet_since = None;
                if said.is_none_or(|at| at.elapsed() >= Duration::from_secs(10)) {
                    said = Some(Instant::now());
                    tracing::warn!(
                        masters = %open.join(","),
                        waited_secs = started.elapsed().as_secs(),
                        "the source cluster is migrating slots: the masters whose slots changed hands are copied again once the migrations end"
                    );
                }
            }
            Err(e) => {
                quiet_since = None;
                if said.is_none_or(|at| at.elapsed() >= Duration::from_secs(10)) {
                    said = Some(Instant::now());
                    tracing::warn!(error = %e, "cannot ask the source whether slots are being migrated; asking again");
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Keeps the record of task `task` on the target (`nodes`: its masters, or
/// the server) true while the task runs: the source's masters as a shard's
/// master sees them, and the shards whose slots changed hands at a point
/// of their stream the target has not applied yet. Runs until aborted.
/// `start`: the masters as the precheck saw them; `copying`: the shards
/// copied again because their slots changed hands (moving until that full
/// sync is applied: a kill before that must copy them again, not resume
/// them from the older "applied" marker the target still holds).
pub async fn recorder(
    peers: Arc<Peers>,
    nodes: Vec<Endpoint>,
    key: Vec<u8>,
    start: Vec<Owner>,
    copying: Vec<usize>,
) {
    let mut written: Option<(Ownership, Instant)> = None;
    let mut moving = Moving::new(start, copying);
    let mut log = shard_worker::events::LogLimiter::new();
    loop {
        let all = peers.all();
        let seeds: Vec<Endpoint> = all.iter().map(|p| p.endpoint.clone()).collect();
        let result = async {
            let owners = source_view(&seeds).await?;
            let shards: Vec<ShardNow> = all
                .iter()
                .map(|p| ShardNow {
                    shard: p.shard,
                    addr: p.endpoint.addr(),
                    horizon: p.stats.handover.horizon(),
                    applied: p.stats.applied().unwrap_or(0),
                    incremental: p.stats.state() == ShardState::Incremental
                        && p.stats.applied().is_some(),
                })
                .collect();
            let now = moving.observe(Instant::now(), &owners, &shards);
            let record = Ownership::new(owners, now);
            let due = written
                .as_ref()
                .is_none_or(|(w, at)| *w != record || at.elapsed() >= REWRITE);
            if due {
                let value = record.encode();
                match request(&nodes, &[&b"SET"[..], &key, &value]).await? {
                    Frame::Simple(ok) if &ok[..] == b"OK" => {
                        written = Some((record, Instant::now()));
                    }
                    other => {
                        return Err(WorkerError::Unexpected {
                            addr: nodes.first().map(Endpoint::addr).unwrap_or_default(),
                            context: "writing the record of the source's slot owners",
                            reply: other.to_text(),
                        })
                    }
                }
            }
            Ok::<_, WorkerError>(())
        }
        .await;
        if let Err(e) = result {
            if log.allow().is_some() {
                tracing::warn!(error = %e, "cannot record the source's slot owners on the target (a restart after a reshard relies on it); trying again");
            }
        }
        tokio::time::sleep(PERIOD).await;
    }
}

/// One shard as the recorder sees it: where its slots last changed hands
/// in its stream (0: never), and how far the target applied it.
#[derive(Clone, Debug)]
struct ShardNow {
    shard: usize,
    addr: String,
    horizon: u64,
    applied: u64,
    /// Its stream is applied past a full sync or a resume point.
    incremental: bool,
}

/// Which masters are moving (the pure part of the recorder): those whose
/// slots or epoch it saw change in the last [`NOTICED`], and those whose
/// shard's stream has a change the target has not applied for
/// [`SETTLE`].
struct Moving {
    seen: HashMap<String, Owner>,
    noticed: HashMap<String, Instant>,
    /// Per shard: the horizon it caught up with, and when.
    caught: HashMap<usize, (u64, Instant)>,
    /// Shards in the full sync they began with, and when each was first
    /// seen past it.
    copying: HashMap<usize, Option<Instant>>,
}

impl Moving {
    fn new(start: Vec<Owner>, copying: Vec<usize>) -> Moving {
        Moving {
            seen: start.into_iter().map(|o| (o.addr.clone(), o)).collect(),
            noticed: HashMap::new(),
            caught: HashMap::new(),
            copying: copying.into_iter().map(|s| (s, None)).collect(),
        }
    }

    fn observe(&mut self, now: Instant, owners: &[Owner], shards: &[ShardNow]) -> Vec<String> {
        for o in owners {
            if self.seen.get(&o.addr) != Some(o) {
                self.noticed.insert(o.addr.clone(), now);
                self.seen.insert(o.addr.clone(), o.clone());
            }
        }
        self.noticed
            .retain(|_, at| now.saturating_duration_since(*at) < NOTICED);
        let mut out: Vec<String> = self.noticed.keys().cloned().collect();
        for s in shards {
            if let Some(past) = self.copying.get_mut(&s.shard) {
                if s.incremental {
                    let at = *past.get_or_insert(now);
                    if now.saturating_duration_since(at) >= SETTLE {
                        self.copying.remove(&s.shard);
                    } else {
                        out.push(s.addr.clone());
                    }
                } else {
                    *past = None;
                    out.push(s.addr.clone());
                }
            }
        }
        for s in shards.iter().filter(|s| s.horizon > 0) {
            let settled = if s.applied >= s.horizon {
                let (h, at) = self.caught.entry(s.shard).or_insert((s.horizon, now));
                if *h != s.horizon {
                    *h = s.horizon;
                    *at = now;
                }
                now.saturating_duration_since(*at) >= SETTLE
            } else {
                self.caught.remove(&s.shard);
                false
            };
            if !settled {
                out.push(s.addr.clone());
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owner(addr: &str, epoch: u64, slots: &[(u16, u16)]) -> Owner {
        Owner {
            addr: addr.into(),
            epoch,
            slots: slots.to_vec(),
        }
    }

    fn shard(shard: usize, addr: &str, horizon: u64, applied: u64) -> ShardNow {
        ShardNow {
            shard,
            addr: addr.into(),
            horizon,
            applied,
            incremental: true,
        }
    }

    fn sorted(mut v: Vec<String>) -> Vec<String> {
        v.sort();
        v
    }

    #[test]
    fn a_shard_moves_until_the_target_applied_its_change_for_a_while() {
        let t0 = Instant::now();
        let owners = [owner("a:1", 1, &[(0, 99)]), owner("b:1", 2, &[(100, 199)])];
        let mut m = Moving::new(owners.to_vec(), vec![]);
        let quiet = [shard(0, "a:1", 0, 50), shard(1, "b:1", 0, 70)];
        assert!(m.observe(t0, &owners, &quiet).is_empty(), "nothing moved");
        // b's stream changed hands at 100; applied 90.
        let behind = [shard(0, "a:1", 0, 50), shard(1, "b:1", 100, 90)];
        assert_eq!(m.observe(t0, &owners, &behind), ["b:1"]);
        // Applied past it: still moving for SETTLE, then not.
        let past = [shard(0, "a:1", 0, 50), shard(1, "b:1", 100, 120)];
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(m.observe(t1, &owners, &past), ["b:1"]);
        assert_eq!(
            m.observe(t1 + SETTLE - Duration::from_millis(1), &owners, &past),
            ["b:1"]
        );
        assert!(m.observe(t1 + SETTLE, &owners, &past).is_empty());
        // A later change starts over.
        let again = [shard(0, "a:1", 0, 50), shard(1, "b:1", 200, 200)];
        assert_eq!(m.observe(t1 + SETTLE, &owners, &again), ["b:1"]);
    }

    #[test]
    fn masters_seen_changing_move_for_a_while_whatever_their_shards_say() {
        let t0 = Instant::now();
        let before = [owner("a:1", 1, &[(0, 99)]), owner("b:1", 2, &[(100, 199)])];
        let mut m = Moving::new(before.to_vec(), vec![]);
        let after = [owner("a:1", 1, &[(0, 49)]), owner("b:1", 3, &[(50, 199)])];
        let shards = [shard(0, "a:1", 0, 50), shard(1, "b:1", 0, 70)];
        assert_eq!(sorted(m.observe(t0, &after, &shards)), ["a:1", "b:1"]);
        assert_eq!(
            sorted(m.observe(t0 + NOTICED - Duration::from_millis(1), &after, &shards)),
            ["a:1", "b:1"]
        );
        assert!(m.observe(t0 + NOTICED, &after, &shards).is_empty());
        // A master that joins is noticed too.
        let joined = [
            after[0].clone(),
            after[1].clone(),
            owner("c:1", 4, &[(150, 199)]),
        ];
        assert_eq!(m.observe(t0 + NOTICED, &joined, &shards), ["c:1"]);
    }

    #[test]
    fn a_shard_copied_again_moves_until_its_full_sync_is_applied() {
        let t0 = Instant::now();
        let owners = [owner("a:1", 1, &[(0, 99)]), owner("b:1", 2, &[(100, 199)])];
        let mut m = Moving::new(owners.to_vec(), vec![0]);
        let mut loading = shard(0, "a:1", 0, 0);
        loading.incremental = false;
        let b = shard(1, "b:1", 0, 70);
        assert_eq!(m.observe(t0, &owners, &[loading, b.clone()]), ["a:1"]);
        let done = shard(0, "a:1", 0, 10);
        assert_eq!(m.observe(t0, &owners, &[done.clone(), b.clone()]), ["a:1"]);
        assert!(m
            .observe(t0 + SETTLE, &owners, &[done.clone(), b])
            .is_empty());
    }
}
