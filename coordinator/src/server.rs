//! What a Redis server says about itself (INFO, CONFIG GET), for topology
//! discovery and prechecks.

use std::collections::BTreeMap;

use engine::rdb::consts::rdb_version_of_redis;
use engine::resp::Frame;
use shard_worker::conn::Conn;
use shard_worker::{Endpoint, WorkerError};

/// Facts about one server.
#[derive(Clone, Debug)]
pub struct ServerInfo {
    pub addr: String,
    pub version: (u32, u32, u32),
    pub version_text: String,
    /// `master` or `slave`.
    pub role: String,
    /// For a replica: whether its link to its master is up.
    pub master_link_up: bool,
    pub cluster: bool,
    pub run_id: String,
    /// Keys per database (from the keyspace section).
    pub keyspace: BTreeMap<u32, u64>,
    pub maxmemory_policy: Option<String>,
    /// `CONFIG GET databases`; `None` when CONFIG is not allowed.
    pub databases: Option<u32>,
    pub diskless_sync_delay: Option<u64>,
    /// `CONFIG GET proto-max-bulk-len`: the largest argument it takes.
    pub proto_max_bulk_len: Option<u64>,
    /// Function libraries it holds (`FUNCTION LIST`, 7.0+).
    pub function_libraries: Option<usize>,
    /// Heartbeat keys of shardsync tasks (this server being their source),
    /// per database; only looked for in small databases.
    pub heartbeat_keys: BTreeMap<u32, u64>,
    /// `used_memory` (INFO memory), bytes.
    pub used_memory: u64,
    /// `used_memory_dataset` (4.0+): the data without the server's own
    /// overhead.
    pub used_memory_dataset: Option<u64>,
    /// `maxmemory`, bytes; 0 for no limit.
    pub maxmemory: u64,
    /// `master_repl_offset`: bytes of replication stream produced so far.
    pub master_repl_offset: u64,
    /// `master_replid`: the replication history it is in.
    pub replid: String,
    /// `repl_backlog_size`, bytes.
    pub repl_backlog_size: Option<u64>,
    /// The history this server continues after a promotion (PSYNC2):
    /// `master_replid2` and `second_repl_offset`, when it has one.
    pub earlier_history: Option<(String, u64)>,
    /// `CONFIG GET repl-timeout`, seconds.
    pub repl_timeout: Option<u64>,
    /// `CONFIG GET client-output-buffer-limit`, its replica class.
    pub replica_buffer_limit: Option<BufferLimit>,
}

/// A `client-output-buffer-limit` class: the hard limit, and the soft limit
/// with the seconds a client may stay over it (0: no limit).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BufferLimit {
    /// The class name as the server spells it (`slave` or `replica`).
    pub class: String,
    pub hard: u64,
    pub soft: u64,
    pub soft_secs: u64,
}

/// The replica class of a `client-output-buffer-limit` value
/// (`normal 0 0 0 slave 268435456 67108864 60 pubsub ...`).
pub fn parse_buffer_limit(value: &str) -> Option<BufferLimit> {
    let words: Vec<&str> = value.split_whitespace().collect();
    words.chunks(4).find_map(|c| match c {
        [class, hard, soft, secs] if matches!(*class, "slave" | "replica") => Some(BufferLimit {
            class: class.to_string(),
            hard: parse_size(hard)?,
            soft: parse_size(soft)?,
            soft_secs: secs.parse().ok()?,
        }),
        _ => None,
    })
}

/// A size as `CONFIG GET` prints it: bytes, or with a k/kb/m/mb/g/gb unit.
fn parse_size(text: &str) -> Option<u64> {
    let lower = text.to_ascii_lowercase();
    let digits = lower.trim_end_matches(|c: char| c.is_ascii_alphabetic());
    let n: u64 = digits.parse().ok()?;
    let unit = match &lower[digits.len()..] {
        "" | "b" => 1,
        "k" => 1000,
        "kb" => 1024,
        "m" => 1000 * 1000,
        "mb" => 1024 * 1024,
        "g" => 1000 * 1000 * 1000,
        "gb" => 1024 * 1024 * 1024,
        _ => return None,
    };
    Some(n * unit)
}

impl ServerInfo {
    /// The RDB version this server writes and accepts in RESTORE.
    pub fn rdb_version(&self) -> u16 {
        rdb_version_of_redis(self.version.0, self.version.1)
    }
}

/// Connects, logs in and reads INFO (and a few CONFIG values).
pub async fn probe(ep: &Endpoint) -> Result<ServerInfo, WorkerError> {
    let mut conn = Conn::open_authenticated(ep).await?;
    let info = match conn.request(&["INFO"]).await? {
        Frame::Bulk(text) => String::from_utf8_lossy(&text).into_owned(),
        Frame::Error(e) => {
            return Err(WorkerError::from_reply(&conn.addr, &e).unwrap_or(
                WorkerError::Unexpected {
                    addr: conn.addr.clone(),
                    context: "reading INFO (is this a Redis server?)",
                    reply: String::from_utf8_lossy(&e).into_owned(),
                },
            ))
        }
        other => {
            return Err(WorkerError::Unexpected {
                addr: conn.addr.clone(),
                context: "reading INFO (is this a Redis server?)",
                reply: other.to_text(),
            })
        }
    };
    let mut info = parse_info(&conn.addr, &info);
    info.databases = config_get(&mut conn, "databases")
        .await
        .and_then(|v| v.parse().ok());
    info.diskless_sync_delay = config_get(&mut conn, "repl-diskless-sync-delay")
        .await
        .and_then(|v| v.parse().ok());
    info.proto_max_bulk_len = config_get(&mut conn, "proto-max-bulk-len")
        .await
        .and_then(|v| v.parse().ok());
    info.repl_timeout = config_get(&mut conn, "repl-timeout")
        .await
        .and_then(|v| v.parse().ok());
    info.replica_buffer_limit = config_get(&mut conn, "client-output-buffer-limit")
        .await
        .and_then(|v| parse_buffer_limit(&v));
    if info.version.0 >= 7 {
        info.function_libraries = match conn.request(&["FUNCTION", "LIST"]).await {
            Ok(Frame::Array(libs)) => Some(libs.len()),
            _ => None,
        };
    }
    // A task whose source this is writes its heartbeat here: that alone
    // does not make the server hold data.
    let small: Vec<u32> = info
        .keyspace
        .iter()
        .filter(|(_, &n)| n > 0 && n <= 100)
        .map(|(&db, _)| db)
        .collect();
    for db in small {
        if !matches!(
            conn.request(&["SELECT", &db.to_string()]).await,
            Ok(Frame::Simple(_))
        ) {
            continue;
        }
        if let Ok(Frame::Array(keys)) = conn
            .request(&["KEYS", &format!("*{}*", engine::heartbeat::MARK)])
            .await
        {
            if !keys.is_empty() {
                info.heartbeat_keys.insert(db, keys.len() as u64);
            }
        }
    }
    Ok(info)
}

/// The nodes of the cluster `ep` belongs to (`CLUSTER NODES`).
pub async fn cluster_nodes(
    ep: &Endpoint,
) -> Result<Vec<engine::cluster::ClusterNode>, WorkerError> {
    let mut conn = Conn::open_authenticated(ep).await?;
    match conn.request(&["CLUSTER", "NODES"]).await? {
        Frame::Bulk(text) => Ok(engine::cluster::parse_nodes(&String::from_utf8_lossy(
            &text,
        ))),
        other => Err(WorkerError::Unexpected {
            addr: conn.addr.clone(),
            context: "reading CLUSTER NODES",
            reply: other.to_text(),
        }),
    }
}

/// `master_repl_offset` now (to measure how fast the stream grows).
pub async fn repl_offset(ep: &Endpoint) -> Result<u64, WorkerError> {
    Ok(replication(ep).await?.master_repl_offset)
}

/// What `INFO replication` says (role, offsets, histories); the other
/// fields stay empty.
pub async fn replication(ep: &Endpoint) -> Result<ServerInfo, WorkerError> {
    let mut conn = Conn::open_authenticated(ep).await?;
    match conn.request(&["INFO", "replication"]).await? {
        Frame::Bulk(text) => Ok(parse_info(&conn.addr, &String::from_utf8_lossy(&text))),
        other => Err(WorkerError::Unexpected {
            addr: conn.addr.clone(),
            context: "reading INFO replication",
            reply: other.to_text(),
        }),
    }
}

/// `CONFIG GET name`; `None` when refused (ACL, renamed command) or absent.
async fn config_get(conn: &mut Conn, name: &str) -> Option<String> {
    match conn.request(&["CONFIG", "GET", name]).await.ok()? {
        Frame::Array(items) if items.len() >= 2 => Some(items[1].to_text()),
        _ => None,
    }
}

pub fn parse_info(addr: &str, text: &str) -> ServerInfo {
    let mut fields = BTreeMap::new();
    let mut keyspace = BTreeMap::new();
    for line in text.lines() {
        let Some((k, v)) = line.trim_end().split_once(':') else {
            continue;
        };
        if let Some(db) = k.strip_prefix("db").and_then(|n| n.parse::<u32>().ok()) {
            // db0:keys=1,expires=0,avg_ttl=0
            let keys = v
                .split(',')
                .find_map(|kv| kv.strip_prefix("keys="))
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
            keyspace.insert(db, keys);
        } else {
            fields.insert(k.to_string(), v.to_string());
        }
    }
    let number = |name: &str| fields.get(name).and_then(|v| v.trim().parse::<u64>().ok());
    let version_text = fields.get("redis_version").cloned().unwrap_or_default();
    let mut parts = version_text
        .split('.')
        .map(|p| p.parse::<u32>().unwrap_or(0));
    let version = (
        parts.next().unwrap_or(0),
        parts.next().unwrap_or(0),
        parts.next().unwrap_or(0),
    );
    ServerInfo {
        addr: addr.to_string(),
        version,
        version_text,
        role: fields
            .get("role")
            .cloned()
            .unwrap_or_else(|| "master".into()),
        master_link_up: fields.get("master_link_status").is_some_and(|s| s == "up"),
        cluster: fields.get("cluster_enabled").is_some_and(|v| v == "1"),
        run_id: fields.get("run_id").cloned().unwrap_or_default(),
        keyspace,
        maxmemory_policy: fields.get("maxmemory_policy").cloned(),
        databases: None,
        diskless_sync_delay: None,
        proto_max_bulk_len: None,
        function_libraries: None,
        heartbeat_keys: BTreeMap::new(),
        used_memory: number("used_memory").unwrap_or(0),
        used_memory_dataset: number("used_memory_dataset"),
        maxmemory: number("maxmemory").unwrap_or(0),
        master_repl_offset: number("master_repl_offset").unwrap_or(0),
        replid: fields.get("master_replid").cloned().unwrap_or_default(),
        repl_backlog_size: number("repl_backlog_size"),
        earlier_history: fields
            .get("master_replid2")
            .filter(|id| !id.is_empty() && id.bytes().any(|b| b != b'0'))
            .zip(number("second_repl_offset").filter(|&o| o > 0))
            .map(|(id, offset)| (id.clone(), offset)),
        repl_timeout: None,
        replica_buffer_limit: None,
    }
}

/// Whether `ep` answers PING on a fresh connection (after INFO failed
/// there: a proxy such as Twemproxy closes the connection on commands it
/// does not know).
pub async fn looks_like_a_proxy(ep: &Endpoint) -> bool {
    let Ok(Ok(mut conn)) = tokio::time::timeout(
        std::time::Duration::from_secs(3),
        Conn::open_authenticated(ep),
    )
    .await
    else {
        return false;
    };
    matches!(
        tokio::time::timeout(std::time::Duration::from_secs(3), conn.request(&["PING"])).await,
        Ok(Ok(Frame::Simple(ref s))) if s == "PONG"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_fields_we_use() {
        let text = "# Server\r\nredis_version:7.0.15\r\nrun_id:abc\r\n# Replication\r\nrole:slave\r\nmaster_link_status:up\r\n# Cluster\r\ncluster_enabled:0\r\n# Memory\r\nmaxmemory_policy:noeviction\r\n# Keyspace\r\ndb0:keys=12,expires=1,avg_ttl=0\r\ndb3:keys=2,expires=0,avg_ttl=0\r\n";
        let info = parse_info("h:1", text);
        assert_eq!(info.version, (7, 0, 15));
        assert_eq!(info.rdb_version(), 10);
        assert_eq!(info.role, "slave");
        assert!(info.master_link_up);
        assert!(!info.cluster);
        assert_eq!(info.keyspace, BTreeMap::from([(0, 12), (3, 2)]));
        assert_eq!(info.maxmemory_policy.as_deref(), Some("noeviction"));
    }

    #[test]
    fn parses_memory_and_replication_figures() {
        let text = "# Memory\r\nused_memory:1048576\r\nused_memory_dataset:5000\r\nmaxmemory:8388608\r\n# Replication\r\nmaster_repl_offset:777\r\nrepl_backlog_size:1048576\r\n";
        let info = parse_info("h:1", text);
        assert_eq!(info.used_memory, 1048576);
        assert_eq!(info.used_memory_dataset, Some(5000));
        assert_eq!(info.maxmemory, 8388608);
        assert_eq!(info.master_repl_offset, 777);
        assert_eq!(info.earlier_history, None, "no second history");
        let promoted = parse_info(
            "h:1",
            "master_replid:aa\r\nmaster_replid2:bb\r\nsecond_repl_offset:4242\r\n",
        );
        assert_eq!(promoted.earlier_history, Some(("bb".to_string(), 4242)));
        let fresh = parse_info(
            "h:1",
            "master_replid2:0000000000000000000000000000000000000000\r\nsecond_repl_offset:-1\r\n",
        );
        assert_eq!(fresh.earlier_history, None);
        assert_eq!(info.repl_backlog_size, Some(1048576));
    }

    #[test]
    fn parses_the_replica_buffer_limit() {
        let v = "normal 0 0 0 slave 268435456 67108864 60 pubsub 33554432 8388608 60";
        assert_eq!(
            parse_buffer_limit(v),
            Some(BufferLimit {
                class: "slave".into(),
                hard: 256 << 20,
                soft: 64 << 20,
                soft_secs: 60,
            })
        );
        let v = "normal 0 0 0 replica 512mb 128mb 120 pubsub 32mb 8mb 60";
        assert_eq!(
            parse_buffer_limit(v).map(|l| (l.hard, l.soft_secs)),
            Some((512 << 20, 120))
        );
        assert_eq!(parse_buffer_limit("normal 0 0 0"), None);
    }
}
