//! Heartbeats: every second, each source master gets
//! `SETEX <heartbeat key> 60 <now in ms>` (see `engine::heartbeat`). The
//! key comes back in the replication stream, where the shard's intake
//! measures how late it is (arrival, then application on the target) and
//! drops it. A source that refuses the write (a replica, an account
//! without write rights) gets one warning and no lag figures.

use std::time::Duration;

use engine::resp::Frame;
use shard_worker::conn::Conn;
use shard_worker::progress::HEARTBEAT_PERIOD_MS;
use shard_worker::Endpoint;
use tokio::task::JoinHandle;

/// Seconds a heartbeat key lives when nobody refreshes it.
const TTL_SECS: &str = "60";

/// A stable id for this task: the same sources and targets give the same
/// id (so a restarted task knows its earlier heartbeats), another task (a
/// cascade's next hop) gets another.
pub fn task_id(sources: &[String], targets: &[String]) -> String {
    let mut s: Vec<&String> = sources.iter().collect();
    let mut t: Vec<&String> = targets.iter().collect();
    s.sort();
    t.sort();
    let text = format!(
        "{}|{}",
        s.iter().map(|x| x.as_str()).collect::<Vec<_>>().join(","),
        t.iter().map(|x| x.as_str()).collect::<Vec<_>>().join(",")
    );
    // FNV-1a, 64 bits: stable across builds, unlike std's hasher.
    let mut h: u64 = 0xcbf29ce484222325;
    for b in text.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    format!("{h:016x}")
}

/// Starts writing heartbeats on `source` under `key`; with `sentinel`,
/// on the master the Sentinels name whenever `source` cannot be reached
/// (after a failover).
pub fn spawn(
    source: Endpoint,
    key: Vec<u8>,
    sentinel: Option<crate::url::SentinelSpec>,
) -> JoinHandle<()> {
    tokio::spawn(run(source, key, sentinel))
}

async fn run(mut source: Endpoint, key: Vec<u8>, sentinel: Option<crate::url::SentinelSpec>) {
    let mut tick = tokio::time::interval(Duration::from_millis(HEARTBEAT_PERIOD_MS as u64));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut conn: Option<Conn> = None;
    let name = String::from_utf8_lossy(&key).into_owned();
    loop {
        tick.tick().await;
        if conn.is_none() {
            match tokio::time::timeout(Duration::from_secs(5), Conn::open_authenticated(&source))
                .await
            {
                Ok(Ok(c)) => conn = Some(c),
                Ok(Err(e)) => {
                    tracing::debug!(source = %source, error = %e, "heartbeat: cannot connect");
                    if let Some(spec) = &sentinel {
                        if let Ok(master) = crate::sentinel::master_of(spec).await {
                            source = master;
                        }
                    }
                    continue;
                }
                Err(_) => continue,
            }
        }
        let Some(c) = conn.as_mut() else { continue };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis())
            .to_string();
        let reply = tokio::time::timeout(
            Duration::from_secs(5),
            c.request(&[&b"SETEX"[..], &key, TTL_SECS.as_bytes(), now.as_bytes()]),
        )
        .await;
        match reply {
            Ok(Ok(Frame::Error(_))) if sentinel.is_some() => {
                // The old master back as a replica (READONLY): the
                // Sentinels name the master at the next connection.
                conn = None;
                if let Some(spec) = &sentinel {
                    if let Ok(master) = crate::sentinel::master_of(spec).await {
                        source = master;
                    }
                }
            }
            Ok(Ok(Frame::Error(e))) => {
                tracing::warn!(
                    source = %source,
                    key = %name,
                    error = %String::from_utf8_lossy(&e),
                    "cannot write the heartbeat key on the source: lag is not measured for this shard (the sync itself goes on)"
                );
                return;
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                tracing::debug!(source = %source, error = %e, "heartbeat: connection lost");
                conn = None;
            }
            Err(_) => conn = None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_ids_are_stable_and_distinct() {
        let a = task_id(&["s:1".into(), "s:2".into()], &["t:1".into()]);
        assert_eq!(a, task_id(&["s:2".into(), "s:1".into()], &["t:1".into()]));
        assert_ne!(a, task_id(&["t:1".into()], &["u:1".into()]));
        assert_eq!(a.len(), 16);
    }
}
