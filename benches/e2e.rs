//! End-to-end benchmark: shardsync against a native Redis replica, on the
//! same machine, in one run, alternating.
//!
//! ```text
//! cargo bench -p coordinator --bench e2e -- [--keys N] [--runs R] [--value-size B]
//! ```
//!
//! For each run it starts fresh loopback servers, fills the source with
//! `DEBUG POPULATE` (N keys of B bytes), then times
//!
//! - a native replica: `REPLICAOF` until the link is up and DBSIZE = N;
//! - shardsync: from process start until the target's DBSIZE = N, with the
//!   process's peak RSS (VmHWM) read from /proc before it is stopped;
//!
//! and prints medians and the ratio to the native replica.

use std::time::{Duration, Instant};

use harness::{wait_for, RedisServer, Shardsync};

const BIN: &str = env!("CARGO_BIN_EXE_shardsync");

struct Options {
    keys: u64,
    runs: usize,
    value_size: usize,
}

fn options() -> Options {
    let mut o = Options {
        keys: 1_000_000,
        runs: 3,
        value_size: 100,
    };
    let args: Vec<String> = std::env::args().collect();
    let mut i = 1;
    while i < args.len() {
        let next = args.get(i + 1).cloned().unwrap_or_default();
        match args[i].as_str() {
            "--keys" => o.keys = next.parse().expect("--keys N"),
            "--runs" => o.runs = next.parse().expect("--runs R"),
            "--value-size" => o.value_size = next.parse().expect("--value-size B"),
            // `cargo bench` passes --bench; anything else is ignored too.
            _ => {
                i += 1;
                continue;
            }
        }
        i += 2;
    }
    o
}

fn populated_source(o: &Options) -> RedisServer {
    let source = RedisServer::config()
        .arg("enable-debug-command", &["yes"])
        .start();
    let _: () = redis::cmd("DEBUG")
        .arg("POPULATE")
        .arg(o.keys)
        .arg("key")
        .arg(o.value_size)
        .query(&mut source.client())
        .expect("DEBUG POPULATE");
    assert_eq!(source.dbsize(0), o.keys);
    source
}

fn native_replica(source: &RedisServer, keys: u64) -> Duration {
    let replica = RedisServer::start();
    let start = Instant::now();
    let _: () = redis::cmd("REPLICAOF")
        .arg("127.0.0.1")
        .arg(source.port)
        .query(&mut replica.client())
        .unwrap();
    wait_for("the native replica", Duration::from_secs(600), || {
        replica.info_field("master_link_status").as_deref() == Some("up")
            && replica.dbsize(0) == keys
    });
    start.elapsed()
}

fn peak_rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

fn shardsync(source: &RedisServer, keys: u64) -> (Duration, u64) {
    let target = RedisServer::start();
    let start = Instant::now();
    let mut sync = Shardsync::sync(BIN, &["--source", &source.url(), "--target", &target.url()]);
    wait_for("shardsync's full sync", Duration::from_secs(600), || {
        target.dbsize(0) == keys
    });
    let elapsed = start.elapsed();
    let rss = peak_rss_kb(sync.pid());
    let done = sync.terminate(Duration::from_secs(60));
    assert_eq!(done.code(), Some(0), "{}", done.log);
    (elapsed, rss)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() {
    let o = options();
    println!(
        "standalone -> standalone full sync: {} keys of {} bytes, {} runs, loopback, redis-server {}",
        o.keys,
        o.value_size,
        o.runs,
        String::from_utf8_lossy(
            &std::process::Command::new("redis-server")
                .arg("--version")
                .output()
                .map(|out| out.stdout)
                .unwrap_or_default()
        )
        .split_whitespace()
        .nth(2)
        .unwrap_or("?")
    );
    let mut native = Vec::new();
    let mut ours = Vec::new();
    let mut rss = Vec::new();
    for run in 0..o.runs {
        let source = populated_source(&o);
        let n = native_replica(&source, o.keys);
        let (s, r) = shardsync(&source, o.keys);
        println!(
            "  run {}: native {:.2} s, shardsync {:.2} s, shardsync peak RSS {} MB",
            run + 1,
            n.as_secs_f64(),
            s.as_secs_f64(),
            r / 1024
        );
        native.push(n.as_secs_f64());
        ours.push(s.as_secs_f64());
        rss.push(r as f64 / 1024.0);
    }
    let (n, s, r) = (median(native), median(ours), median(rss));
    println!();
    println!("| run | native replica | shardsync | ratio | shardsync peak RSS |");
    println!("|---|---|---|---|---|");
    println!(
        "| standalone full sync, {} keys | {n:.2} s | {s:.2} s | {:.2}x | {r:.0} MB |",
        o.keys,
        s / n
    );
}
