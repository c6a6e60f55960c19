//! A real Twemproxy (`nutcracker`) in front of real Redis backends, on free
//! loopback ports, killed on drop.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::server::{free_port, RedisServer, TempDir};
use crate::wait::wait_until;

pub struct Twemproxy {
    pub port: u16,
    child: Child,
    dir: TempDir,
    /// `host:port` of each backend, in the config's order.
    pub backends: Vec<String>,
    /// The pool's `redis_auth` (clients log in to the proxy with it too).
    auth: Option<String>,
}

impl Twemproxy {
    /// A pool named `pool` (ketama distribution, fnv1a_64 hash) over
    /// `backends`; `auth` is the pool's `redis_auth`.
    pub fn start(pool: &str, backends: &[&RedisServer], auth: Option<&str>) -> Twemproxy {
        let dir = TempDir::new("twemproxy");
        for _attempt in 0..5 {
            let port = free_port();
            let stats = free_port();
            let servers: Vec<String> = backends
                .iter()
                .enumerate()
                .map(|(i, b)| format!("   - 127.0.0.1:{}:1 backend{i}", b.port))
                .collect();
            let config = format!(
                "{pool}:\n  listen: 127.0.0.1:{port}\n  hash: fnv1a_64\n  distribution: ketama\n  \
                 redis: true\n  auto_eject_hosts: false\n  timeout: 5000\n{}  servers:\n{}\n",
                auth.map(|a| format!("  redis_auth: {a}\n"))
                    .unwrap_or_default(),
                servers.join("\n")
            );
            let path = dir.path().join("nutcracker.yml");
            std::fs::write(&path, config).expect("write nutcracker.yml");
            let child = Command::new("nutcracker")
                .arg("-c")
                .arg(&path)
                .arg("-s")
                .arg(stats.to_string())
                .arg("-o")
                .arg(dir.path().join("nutcracker.log"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("run nutcracker (scripts/install-deps.sh installs it)");
            let mut proxy = Twemproxy {
                port,
                child,
                dir: TempDir::new("twemproxy-unused"),
                backends: backends.iter().map(|b| b.addr()).collect(),
                auth: auth.map(str::to_string),
            };
            let up = wait_until(Duration::from_secs(10), || proxy.exited() || proxy.ping());
            if up && !proxy.exited() {
                proxy.dir = dir;
                return proxy;
            }
        }
        panic!("nutcracker did not start after 5 attempts");
    }

    fn exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    fn ping(&self) -> bool {
        proxy_client(&self.url())
            .get_connection_with_timeout(Duration::from_millis(500))
            .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c))
            .is_ok()
    }

    /// `redis://127.0.0.1:<port>`: the proxy, for clients.
    pub fn url(&self) -> String {
        match &self.auth {
            Some(a) => format!("redis://:{a}@127.0.0.1:{}", self.port),
            None => format!("redis://127.0.0.1:{}", self.port),
        }
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The config file.
    pub fn config(&self) -> PathBuf {
        self.dir.path().join("nutcracker.yml")
    }

    /// `twemproxy:///.../nutcracker.yml#pool`, for shardsync.
    pub fn source_url(&self, pool: &str) -> String {
        format!("twemproxy://{}#{pool}", self.config().display())
    }

    pub fn client(&self) -> redis::Connection {
        proxy_client(&self.url())
            .get_connection()
            .expect("connect to nutcracker")
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

/// A client for a proxy: Twemproxy closes the connection on commands it
/// does not pass (such as the `CLIENT SETINFO` clients send on connecting).
pub fn proxy_client(url: &str) -> redis::Client {
    use redis::IntoConnectionInfo;
    let info = url.into_connection_info().expect("a redis:// URL");
    let settings = info.redis_settings().clone().set_skip_set_lib_name();
    redis::Client::open(info.set_redis_settings(settings)).expect("client")
}

impl Drop for Twemproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
