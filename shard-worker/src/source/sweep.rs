//! Before a full resync that replaces the task's earlier copy on a target
//! other shards write to as well (a cluster source): the target's keys in
//! this shard's slots are deleted, on every node, so that
//! keys the source deleted while the stream could not continue do not
//! survive. Memory stays bounded: the target is scanned a page at a time.
//!
//! It runs before PSYNC when the master's backlog shows the stream cannot
//! continue (the master is then not yet sending an RDB that would wait),
//! or right after an unforeseen `+FULLRESYNC`.

use std::time::Instant;

use engine::resp::Frame;

use crate::conn::Conn;
use crate::error::WorkerError;
use crate::events;
use crate::progress::ShardStats;
use crate::route::{Router, Sweep};

/// The replica handshake, with this shard's slots swept first when the
/// sync is a full one over the task's earlier copy (before `PSYNC` when the
/// master's backlog shows it, else right after `+FULLRESYNC`).
pub(super) async fn handshake_swept(
    conn: &mut Conn,
    args: &super::SourceArgs,
    addr: &str,
) -> Result<super::SyncStart, WorkerError> {
    let earlier = args.stats.counters.full_syncs.get() > 0
        || args.stats.ours.load(std::sync::atomic::Ordering::Relaxed);
    let plan = args
        .marking
        .as_ref()
        .and_then(|m| m.sweep.as_ref())
        .filter(|_| earlier);
    let mut swept = false;
    if let Some(plan) = plan {
        if !would_continue(conn, args.resume.as_ref()).await? {
            run(&args.router, plan, &args.stats, addr).await?;
            swept = true;
        }
    }
    let start = super::handshake(conn, args.resume.as_ref(), args.listening_port).await?;
    if let (Some(plan), false, super::SyncStart::Full { .. }) = (plan, swept, &start) {
        run(&args.router, plan, &args.stats, addr).await?;
    }
    Ok(start)
}

/// Whether `PSYNC` from `resume` would continue, by the master's own
/// `INFO replication` (`true` when it cannot be told: an old server).
async fn would_continue(
    conn: &mut Conn,
    resume: Option<&crate::progress::ResumePoint>,
) -> Result<bool, WorkerError> {
    let Some(resume) = resume else {
        return Ok(false);
    };
    let info = match conn.request(&["INFO", "replication"]).await? {
        Frame::Bulk(text) => String::from_utf8_lossy(&text).into_owned(),
        _ => return Ok(true),
    };
    Ok(engine::psync::Backlog::parse(&info)
        .is_none_or(|b| b.continues(&resume.replid, resume.offset)))
}

/// Deletes the target's keys in `sweep`'s slots, on every target node and
/// copied database, once everything this shard handed over is applied.
async fn run(
    router: &Router,
    sweep: &Sweep,
    stats: &ShardStats,
    source: &str,
) -> Result<u64, WorkerError> {
    stats.wait_drained().await;
    let started = Instant::now();
    let mut ours = vec![false; engine::slot::SLOTS as usize];
    for &(a, b) in &sweep.slots {
        for slot in a..=b {
            ours[slot as usize] = true;
        }
    }
    let mut deleted = 0;
    for writer in &router.writers {
        let mut conn = Conn::open_authenticated(&writer.endpoint).await?;
        for &db in &sweep.dbs {
            if let Frame::Error(e) = conn.request(&["SELECT", &db.to_string()]).await? {
                return Err(WorkerError::Unexpected {
                    addr: conn.addr.clone(),
                    context: "selecting a database to sweep",
                    reply: String::from_utf8_lossy(&e).into_owned(),
                });
            }
            deleted += sweep_db(&mut conn, &ours, router.is_cluster()).await?;
        }
    }
    events::TargetSwept {
        source,
        keys: deleted,
        elapsed: started.elapsed(),
    }
    .emit();
    Ok(deleted)
}

/// One database of one node: every key whose slot is ours (shardsync's
/// own keys aside) is unlinked, a SCAN page at a time.
async fn sweep_db(conn: &mut Conn, ours: &[bool], cluster: bool) -> Result<u64, WorkerError> {
    let mut deleted = 0;
    let mut cursor = "0".to_string();
    loop {
        let (next, keys) = conn.scan_page(&cursor, None).await?;
        let doomed: Vec<&[u8]> = keys
            .iter()
            .map(Vec::as_slice)
            .filter(|k| ours[engine::slot::slot(k) as usize] && !engine::marker::is_internal(k))
            .collect();
        // One UNLINK for the page; on a cluster node one per key (a
        // command's keys must share a slot there).
        let commands: Vec<Vec<&[u8]>> = if doomed.is_empty() {
            Vec::new()
        } else if cluster {
            doomed.iter().map(|k| vec![&b"UNLINK"[..], k]).collect()
        } else {
            vec![std::iter::once(&b"UNLINK"[..]).chain(doomed).collect()]
        };
        for reply in conn.pipeline(&commands).await? {
            match reply {
                Frame::Integer(n) => deleted += n.max(0) as u64,
                other => {
                    return Err(WorkerError::Unexpected {
                        addr: conn.addr.clone(),
                        context: "deleting this shard's keys before a full resync",
                        reply: other.to_text(),
                    })
                }
            }
        }
        if next == "0" {
            return Ok(deleted);
        }
        cursor = next;
    }
}
