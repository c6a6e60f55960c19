//! Running the `shardsync` binary under test and reading its status.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::server::{free_port, RedisServer, TempDir};
use crate::wait::{wait_for, wait_until};

pub struct Shardsync {
    child: Option<Child>,
    pub http_port: u16,
    log_path: PathBuf,
    _dir: TempDir,
}

/// What a finished run left behind.
pub struct Finished {
    pub status: ExitStatus,
    pub log: String,
}

impl Finished {
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }
}

impl Shardsync {
    /// Starts `bin sync <args> --http 127.0.0.1:<free port>`.
    pub fn sync(bin: &str, args: &[&str]) -> Shardsync {
        Self::spawn(bin, "sync", args)
    }

    fn spawn(bin: &str, sub: &str, args: &[&str]) -> Shardsync {
        let dir = TempDir::new("shardsync");
        let http_port = free_port();
        let log_path = dir.path().join("shardsync.log");
        let log = std::fs::File::create(&log_path).expect("create the log file");
        let mut cmd = Command::new(bin);
        cmd.arg(sub).args(args);
        // `verify` serves no status.
        if sub != "verify" {
            cmd.args(["--http", &format!("127.0.0.1:{http_port}")]);
        }
        let child = cmd
            .env(
                "SHARDSYNC_LOG",
                std::env::var("SHARDSYNC_TEST_LOG").unwrap_or("info".into()),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone the log file"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {bin}: {e}"));
        Shardsync {
            child: Some(child),
            http_port,
            log_path,
            _dir: dir,
        }
    }

    /// Runs `bin <sub> <args>` to completion (or kills it after `timeout`).
    pub fn run(bin: &str, sub: &str, args: &[&str], timeout: Duration) -> Finished {
        let mut s = Self::spawn(bin, sub, args);
        s.wait_exit(timeout)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    fn http_get(&self, path: &str) -> Option<String> {
        let mut stream = TcpStream::connect(("127.0.0.1", self.http_port)).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
        )
        .ok()?;
        let mut response = String::new();
        stream.read_to_string(&mut response).ok()?;
        let (head, body) = response.split_once("\r\n\r\n")?;
        head.starts_with("HTTP/1.1 200").then(|| body.to_string())
    }

    /// `GET /status`, parsed.
    pub fn status(&self) -> Option<serde_json::Value> {
        serde_json::from_str(&self.http_get("/status")?).ok()
    }

    /// `GET /metrics`.
    pub fn metrics(&self) -> Option<String> {
        self.http_get("/metrics")
    }

    /// The samples (`name{labels}`, value) whose name starts with `prefix`.
    pub fn metric_samples(&self, prefix: &str) -> Vec<(String, f64)> {
        let text = self.metrics().expect("metrics");
        parse_prometheus(&text)
            .unwrap_or_else(|e| panic!("{e}\n{text}"))
            .into_iter()
            .filter(|(n, _)| n.starts_with(prefix))
            .collect()
    }

    /// The sum of the samples whose name starts with `prefix`.
    pub fn metric_sum(&self, prefix: &str) -> f64 {
        self.metric_samples(prefix).iter().map(|(_, v)| v).sum()
    }

    /// Waits for the task state (`/status` `.state`).
    pub fn wait_state(&self, state: &str, timeout: Duration) {
        let ok = wait_until(timeout, || {
            self.status().is_some_and(|s| s["state"] == state)
        });
        assert!(
            ok,
            "task never reached state {state}; last status {:?}\n--- log ---\n{}",
            self.status(),
            self.log()
        );
    }

    /// Waits until every shard applied everything `source` has written so far.
    pub fn wait_caught_up(&self, source: &RedisServer, timeout: Duration) {
        self.wait_caught_up_via(source, &source.addr(), timeout);
    }

    /// [`Shardsync::wait_caught_up`] for every master of a source.
    pub fn wait_all_caught_up(&self, masters: &[&RedisServer], timeout: Duration) {
        for m in masters {
            self.wait_caught_up(m, timeout);
        }
    }

    /// [`Shardsync::wait_caught_up`] for a source reached at `addr` (a
    /// proxy in front of it).
    pub fn wait_caught_up_via(&self, source: &RedisServer, addr: &str, timeout: Duration) {
        let target = source.master_repl_offset();
        let ok = wait_until(timeout, || {
            self.status().is_some_and(|s| {
                s["state"] == "incremental"
                    && s["shards"].as_array().is_some_and(|shards| {
                        shards.iter().any(|sh| {
                            sh["source"] == addr
                                && sh["applied_offset"].as_u64().is_some_and(|a| a >= target)
                        })
                    })
            })
        });
        assert!(
            ok,
            "shard {addr} never applied offset {target}; last status {:?}\n--- log ---\n{}",
            self.status(),
            self.log()
        );
    }

    /// Sends a signal to the process.
    pub fn signal(&self, sig: i32) {
        unsafe {
            libc::kill(self.pid() as i32, sig);
        }
    }

    /// SIGTERM, then waits for the exit.
    pub fn terminate(&mut self, timeout: Duration) -> Finished {
        self.signal(libc::SIGTERM);
        self.wait_exit(timeout)
    }

    /// Waits for the process to exit; kills it if it outlives `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Finished {
        let mut child = self.child.take().expect("not yet waited for");
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(status) = child.try_wait().expect("wait on shardsync") {
                break status;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let status = child.wait().expect("wait on killed shardsync");
                panic!(
                    "shardsync did not exit within {timeout:?} (killed: {status})\n--- log ---\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        Finished {
            status,
            log: self.log(),
        }
    }

    /// Waits until the log contains `needle`.
    pub fn wait_log(&self, needle: &str, timeout: Duration) {
        wait_for(&format!("log line {needle:?}"), timeout, || {
            self.log().contains(needle)
        });
    }
}

impl Drop for Shardsync {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        // SHARDSYNC_TEST_KEEP_LOGS=<dir> keeps every run's log there (the
        // temporary directory goes with the test), to read a passing run.
        if let Some(dir) = std::env::var_os("SHARDSYNC_TEST_KEEP_LOGS") {
            let dir = PathBuf::from(dir);
            let name = format!(
                "shardsync-{}-{}.log",
                std::thread::current()
                    .name()
                    .unwrap_or("test")
                    .replace("::", "-"),
                self.http_port
            );
            let _ = std::fs::create_dir_all(&dir);
            let _ = std::fs::copy(&self.log_path, dir.join(name));
        }
    }
}

/// Checks that `text` is well-formed Prometheus text exposition: comment
/// lines are HELP/TYPE, every sample is `name{labels} value` with a
/// `shardsync_` name and a numeric value, and every sample's family was
/// declared by a TYPE line. Returns the samples as (name with labels, value).
pub fn parse_prometheus(text: &str) -> Result<Vec<(String, f64)>, String> {
    let mut declared = std::collections::HashSet::new();
    let mut samples = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# ") {
            let mut parts = rest.splitn(3, ' ');
            match (parts.next(), parts.next(), parts.next()) {
                (Some("HELP"), Some(_), Some(_)) => {}
                (Some("TYPE"), Some(name), Some(kind)) => {
                    if !["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind) {
                        return Err(format!("line {n}: bad type {kind}"));
                    }
                    declared.insert(name.to_string());
                }
                _ => return Err(format!("line {n}: bad comment {line:?}")),
            }
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .ok_or_else(|| format!("line {n}: no value: {line:?}"))?;
        let value: f64 = value
            .parse()
            .map_err(|_| format!("line {n}: value not a number: {line:?}"))?;
        let name = series.split('{').next().unwrap_or("");
        if !name.starts_with("shardsync_") {
            return Err(format!("line {n}: {name} is not prefixed shardsync_"));
        }
        if !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
        {
            return Err(format!("line {n}: bad metric name {name}"));
        }
        if let Some(labels) = series.strip_prefix(name) {
            let braced = labels.starts_with('{') && labels.ends_with('}');
            if !labels.is_empty() && !braced {
                return Err(format!("line {n}: bad labels {labels}"));
            }
        }
        if !declared.contains(name) {
            return Err(format!("line {n}: {name} has no TYPE line"));
        }
        samples.push((series.to_string(), value));
    }
    if samples.is_empty() {
        return Err("no samples".into());
    }
    Ok(samples)
}
