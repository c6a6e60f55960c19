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

/// The masters of `ep`'s cluster with the slots each serves, or `None`
/// when `ep` is not a cluster node.
pub async fn masters(
    ep: &Endpoint,
) -> Result<Option<Vec<(Endpoint, Vec<(u16, u16)>)>>, WorkerError> {
    if !probe(ep).await?.cluster {
        return Ok(None);
    }
    Ok(Some(
        cluster_nodes(ep)
            .await?
            .into_iter()
            .filter(|n| n.serving_master())
            .map(|n| (ep.with_addr(n.host.clone(), n.port), n.slots))
            .collect(),
    ))
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
}
