//! Real Redis Sentinels (`redis-server <conf> --sentinel`) watching a
//! master, killed on drop.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::server::{free_port, redis_server_binary, RedisServer, TempDir};
use crate::wait::wait_until;

pub struct Sentinel {
    pub port: u16,
    child: Child,
    dir: TempDir,
}

impl Sentinel {
    /// A Sentinel monitoring `master` as `name` (quorum 2; the master is
    /// judged down after 1 s, a failover may take 3 s).
    pub fn start(master: &RedisServer, name: &str) -> Sentinel {
        for _attempt in 0..5 {
            let port = free_port();
            let dir = TempDir::new(&format!("sentinel-{port}"));
            let conf: PathBuf = dir.path().join("sentinel.conf");
            let mut text = format!(
                "port {port}\nbind 127.0.0.1\ndaemonize no\ndir {dir}\nlogfile {dir}/sentinel.log\n\
                 sentinel monitor {name} 127.0.0.1 {m} 2\n\
                 sentinel down-after-milliseconds {name} 1000\n\
                 sentinel failover-timeout {name} 3000\n\
                 sentinel parallel-syncs {name} 1\n",
                dir = dir.path().display(),
                m = master.port,
            );
            if let Some(p) = &master.password {
                text.push_str(&format!("sentinel auth-pass {name} {p}\n"));
            }
            std::fs::write(&conf, text).expect("write sentinel.conf");
            let child = Command::new(redis_server_binary())
                .arg(&conf)
                .arg("--sentinel")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("run redis-server --sentinel");
            let mut s = Sentinel { port, child, dir };
            let up = wait_until(Duration::from_secs(10), || {
                s.exited() || s.master_addr(name).is_some()
            });
            if up && !s.exited() {
                return s;
            }
        }
        panic!("redis-server --sentinel did not start after 5 attempts");
    }

    fn exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The master it names for `name` (`host:port`).
    pub fn master_addr(&self, name: &str) -> Option<String> {
        let client = redis::Client::open(format!("redis://127.0.0.1:{}/", self.port)).ok()?;
        let mut con = client
            .get_connection_with_timeout(Duration::from_secs(1))
            .ok()?;
        let (host, port): (String, String) = redis::cmd("SENTINEL")
            .arg("GET-MASTER-ADDR-BY-NAME")
            .arg(name)
            .query(&mut con)
            .ok()?;
        Some(format!("{host}:{port}"))
    }

    /// Whether it knows `others` other Sentinels and `replicas` replicas of
    /// `name` (they find each other through the master, in a few seconds).
    pub fn knows(&self, name: &str, others: u32, replicas: u32) -> bool {
        let Ok(client) = redis::Client::open(format!("redis://127.0.0.1:{}/", self.port)) else {
            return false;
        };
        let Ok(mut con) = client.get_connection_with_timeout(Duration::from_secs(1)) else {
            return false;
        };
        let Ok(fields) = redis::cmd("SENTINEL")
            .arg("MASTER")
            .arg(name)
            .query::<Vec<String>>(&mut con)
        else {
            return false;
        };
        let field = |k: &str| -> u32 {
            fields
                .chunks(2)
                .find(|kv| kv[0] == k)
                .and_then(|kv| kv.get(1)?.parse().ok())
                .unwrap_or(0)
        };
        field("num-other-sentinels") >= others && field("num-slaves") >= replicas
    }

    /// The end of its log (for failure messages).
    pub fn log_tail(&self, n: usize) -> String {
        let text =
            std::fs::read_to_string(self.dir.path().join("sentinel.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }
}

impl Drop for Sentinel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
