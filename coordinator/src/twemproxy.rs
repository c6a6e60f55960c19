//! Twemproxy (nutcracker) pools as a source.
//!
//! A pool shards keys over its `servers:` with its own hash; every backend
//! is a standalone Redis master holding its share, and PSYNC does not pass
//! through the proxy. So a pool is synced by syncing every backend at once,
//! one shard each: the union is the pool's keyspace (keys never live on two
//! backends).

use std::path::{Path, PathBuf};

use serde::Deserialize;
use shard_worker::endpoint::Secret;
use shard_worker::Endpoint;

/// Why a pool cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TwemproxyError {
    #[error("cannot read twemproxy config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("twemproxy config {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("twemproxy config {path} has no pool named {pool:?} (it has: {known})")]
    NoSuchPool {
        path: PathBuf,
        pool: String,
        known: String,
    },
    #[error("twemproxy config {path} defines no pool")]
    NoPool { path: PathBuf },
    #[error("twemproxy pool {pool:?} is a memcached pool (redis: false); shardsync syncs Redis")]
    Memcached { pool: String },
    #[error("twemproxy pool {pool:?} lists no servers")]
    NoServers { pool: String },
    #[error("twemproxy pool {pool:?}: server {server:?} is a unix socket; shardsync connects to backends over TCP (host:port:weight)")]
    UnixSocket { pool: String, server: String },
    #[error("twemproxy pool {pool:?}: server {server:?} is not host:port:weight [name]")]
    BadServer { pool: String, server: String },
}

/// One pool of a nutcracker.yml, as far as shardsync cares.
#[derive(Debug, Default, Deserialize)]
struct PoolConfig {
    #[serde(default)]
    listen: Option<String>,
    /// Absent means true (Redis is what this file is for, here).
    #[serde(default)]
    redis: Option<bool>,
    #[serde(default)]
    redis_auth: Option<String>,
    #[serde(default)]
    servers: Vec<String>,
}

/// A pool's backends, ready to be synced.
#[derive(Debug)]
pub struct Pool {
    pub name: String,
    /// Where clients talk to the proxy (for messages).
    pub listen: Option<String>,
    pub backends: Vec<Endpoint>,
}

/// Reads pool `pool` (or the only / first one) of the config at `path`.
/// Backends log in with `user`/`password` when given, else with the pool's
/// `redis_auth`.
pub fn load(
    path: &Path,
    pool: Option<&str>,
    user: Option<&str>,
    password: Option<&str>,
) -> Result<Pool, TwemproxyError> {
    let text = std::fs::read_to_string(path).map_err(|source| TwemproxyError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse(&text, path, pool, user, password)
}

fn parse(
    text: &str,
    path: &Path,
    pool: Option<&str>,
    user: Option<&str>,
    password: Option<&str>,
) -> Result<Pool, TwemproxyError> {
    let parse_error = |message: String| TwemproxyError::Parse {
        path: path.to_path_buf(),
        message,
    };
    // A mapping keeps the file's order, so "the first pool" means it.
    let pools: serde_yaml_ng::Mapping =
        serde_yaml_ng::from_str(text).map_err(|e| parse_error(e.to_string()))?;
    let names: Vec<String> = pools
        .keys()
        .map(|k| match k {
            serde_yaml_ng::Value::String(s) => s.clone(),
            other => serde_yaml_ng::to_string(other)
                .unwrap_or_default()
                .trim()
                .to_string(),
        })
        .collect();
    let index = match pool {
        Some(name) => {
            names
                .iter()
                .position(|n| n == name)
                .ok_or_else(|| TwemproxyError::NoSuchPool {
                    path: path.to_path_buf(),
                    pool: name.to_string(),
                    known: names.join(", "),
                })?
        }
        None if names.is_empty() => {
            return Err(TwemproxyError::NoPool {
                path: path.to_path_buf(),
            })
        }
        None => 0,
    };
    let name = names[index].clone();
    let value = pools.values().nth(index).cloned().unwrap_or_default();
    let config: PoolConfig =
        serde_yaml_ng::from_value(value).map_err(|e| parse_error(format!("pool {name:?}: {e}")))?;
    if config.redis == Some(false) {
        return Err(TwemproxyError::Memcached { pool: name });
    }
    if config.servers.is_empty() {
        return Err(TwemproxyError::NoServers { pool: name });
    }
    let (user, password) = match (user, password) {
        (None, None) => (None, config.redis_auth.clone()),
        (u, p) => (u.map(str::to_string), p.map(str::to_string)),
    };
    let mut backends = Vec::new();
    for server in &config.servers {
        let (host, port) = server_address(&name, server)?;
        backends.push(Endpoint {
            host,
            port,
            user: user.clone(),
            password: password.clone().map(Secret::new),
            tls: false,
        });
    }
    Ok(Pool {
        name,
        listen: config.listen,
        backends,
    })
}

/// `host:port:weight [name]` → (host, port).
fn server_address(pool: &str, server: &str) -> Result<(String, u16), TwemproxyError> {
    let address = server.split_whitespace().next().unwrap_or("");
    if address.starts_with('/') {
        return Err(TwemproxyError::UnixSocket {
            pool: pool.to_string(),
            server: server.to_string(),
        });
    }
    let bad = || TwemproxyError::BadServer {
        pool: pool.to_string(),
        server: server.to_string(),
    };
    // The weight is last; the port before it.
    let (rest, weight) = address.rsplit_once(':').ok_or_else(bad)?;
    weight.parse::<u32>().map_err(|_| bad())?;
    let (host, port) = rest.rsplit_once(':').ok_or_else(bad)?;
    let port = port.parse::<u16>().map_err(|_| bad())?;
    if host.is_empty() {
        return Err(bad());
    }
    Ok((host.trim_matches(['[', ']']).to_string(), port))
}

#[cfg(test)]
mod tests {
    use super::*;

    const YML: &str = "
alpha:
  listen: 127.0.0.1:22121
  hash: fnv1a_64
  distribution: ketama
  auto_eject_hosts: true
  redis: true
  redis_auth: s3cret
  server_retry_timeout: 2000
  servers:
   - 127.0.0.1:6379:1 one
   - 10.0.0.2:6380:1
beta:
  listen: 127.0.0.1:22122
  redis: true
  servers:
   - 127.0.0.1:7000:1
mem:
  listen: 127.0.0.1:22123
  servers:
   - 127.0.0.1:11211:1
  redis: false
";

    fn p(pool: Option<&str>) -> Result<Pool, TwemproxyError> {
        parse(YML, Path::new("/etc/n.yml"), pool, None, None)
    }

    #[test]
    fn the_first_pool_by_default_and_a_named_one() {
        let pool = p(None).unwrap();
        assert_eq!(pool.name, "alpha");
        let addrs: Vec<String> = pool.backends.iter().map(Endpoint::addr).collect();
        assert_eq!(addrs, ["127.0.0.1:6379", "10.0.0.2:6380"]);
        assert!(pool.backends.iter().all(|b| b.password.is_some()));
        assert_eq!(pool.listen.as_deref(), Some("127.0.0.1:22121"));
        let beta = p(Some("beta")).unwrap();
        assert_eq!(beta.backends.len(), 1);
        assert!(beta.backends[0].password.is_none());
    }

    #[test]
    fn refusals_say_why() {
        let e = p(Some("gamma")).unwrap_err().to_string();
        assert!(
            e.contains("no pool named \"gamma\"") && e.contains("alpha, beta, mem"),
            "{e}"
        );
        assert!(p(Some("mem"))
            .unwrap_err()
            .to_string()
            .contains("memcached"));
        let unix = "a:\n  servers:\n   - /tmp/redis.sock:1 one\n";
        let e = parse(unix, Path::new("/n.yml"), None, None, None).unwrap_err();
        assert!(e.to_string().contains("unix socket"), "{e}");
        let bad = "a:\n  servers:\n   - 127.0.0.1:6379\n";
        let e = parse(bad, Path::new("/n.yml"), None, None, None).unwrap_err();
        assert!(e.to_string().contains("host:port:weight"), "{e}");
        let e = parse("a: [", Path::new("/n.yml"), None, None, None).unwrap_err();
        assert!(e.to_string().starts_with("twemproxy config /n.yml:"), "{e}");
    }

    #[test]
    fn url_credentials_win_over_redis_auth() {
        let pool = parse(YML, Path::new("/n.yml"), None, Some("app"), Some("pw")).unwrap();
        assert_eq!(pool.backends[0].user.as_deref(), Some("app"));
        assert_eq!(
            pool.backends[0].password.as_ref().map(|s| s.expose()),
            Some("pw")
        );
    }
}
