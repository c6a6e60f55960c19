//! End-to-end benchmark: shardsync against a native Redis replica, on the
//! same machine, in one run, alternating.
//!
//! ```text
//! cargo bench -p coordinator --bench e2e -- [--keys N] [--runs R] [--value-size B]
//!                                           [--topology standalone|cluster|both]
//! ```
//!
//! For each run it starts fresh loopback servers, fills the source (N keys
//! of B bytes), then times
//!
//! - native replication: `REPLICAOF` until the link is up and DBSIZE = N
//!   (for a 3-master cluster source, one replica per master, in parallel);
//! - shardsync: from process start until the target's DBSIZE = N (a
//!   3-master cluster target for a cluster source) and a marker key
//!   written after the load is there, with the process's peak RSS (VmHWM)
//!   read from /proc before it is stopped;
//! - incremental (standalone): with the replica (native, then shardsync)
//!   in sync, a burst of `redis-benchmark -t set,incr,lpush,hset -n N/2
//!   -P 16` (2 N writes); the time from the burst's end until the replica
//!   applied everything (its offset, or shardsync's applied offset, at
//!   the source's), and the writes applied per second from the burst's
//!   start to then;
//!
//! and prints medians and the ratio to native replication.

use std::time::{Duration, Instant};

use harness::cluster::{key_slot, Cluster};
use harness::{peak_rss_kb, wait_for, RedisServer, Shardsync};

const BIN: &str = env!("CARGO_BIN_EXE_shardsync");

struct Options {
    keys: u64,
    runs: usize,
    value_size: usize,
    topology: String,
}

fn options() -> Options {
    let mut o = Options {
        keys: 1_000_000,
        runs: 3,
        value_size: 100,
        topology: "both".into(),
    };
    let args: Vec<String> = std::env::args().collect();
    let mut i = 1;
    while i < args.len() {
        let next = args.get(i + 1).cloned().unwrap_or_default();
        match args[i].as_str() {
            "--keys" => o.keys = next.parse().expect("--keys N"),
            "--runs" => o.runs = next.parse().expect("--runs R"),
            "--value-size" => o.value_size = next.parse().expect("--value-size B"),
            "--topology" => o.topology = next.clone(),
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

fn native_replica(source: &RedisServer, keys: u64) -> (Duration, u64) {
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
    (start.elapsed(), peak_rss_kb(replica.pid()))
}

/// The marker written after the load: once the target has it (and every
/// key), the full sync is over.
fn write_marker(source: &RedisServer) {
    let _: () = redis::cmd("SET")
        .arg("{key}marker")
        .arg("1")
        .query(&mut source.client())
        .unwrap();
}

fn has_marker(target: &RedisServer) -> bool {
    target
        .cmd::<Option<String>>(&["GET", "{key}marker"])
        .is_some()
}

fn shardsync(source: &RedisServer, keys: u64) -> (Duration, u64) {
    let target = RedisServer::start();
    let start = Instant::now();
    let mut sync = Shardsync::sync(BIN, &["--source", &source.url(), "--target", &target.url()]);
    // The marker goes in once the source forked its snapshot: it travels in
    // the stream, behind every key.
    wait_for("the full sync to start", Duration::from_secs(60), || {
        sync.status()
            .is_some_and(|s| s["shards"][0]["state"] != "prechecking")
    });
    write_marker(source);
    wait_for("shardsync's full sync", Duration::from_secs(600), || {
        has_marker(&target) && target.dbsize(0) >= keys
    });
    let elapsed = start.elapsed();
    let rss = peak_rss_kb(sync.pid());
    let done = sync.terminate(Duration::from_secs(60));
    assert_eq!(done.code(), Some(0), "{}", done.log);
    (elapsed, rss)
}

/// A 3-master cluster holding `keys` keys (`key:<i>`), written per node
/// in pipelines.
fn populated_cluster(o: &Options) -> Cluster {
    let cluster = Cluster::start(3);
    let owners: Vec<Vec<(u16, u16)>> = cluster.nodes.iter().map(own_slots).collect();
    let value = vec![b'v'; o.value_size];
    let mut pipes: Vec<redis::Pipeline> = (0..3).map(|_| redis::pipe()).collect();
    let mut counts = [0usize; 3];
    let mut cons: Vec<redis::Connection> = cluster.nodes.iter().map(|n| n.client()).collect();
    for i in 0..o.keys {
        let key = format!("key:{i}");
        let slot = key_slot(key.as_bytes());
        let n = owners
            .iter()
            .position(|r| r.iter().any(|&(a, b)| a <= slot && slot <= b))
            .expect("every slot is served");
        pipes[n].cmd("SET").arg(&key).arg(&value).ignore();
        counts[n] += 1;
        if counts[n] % 10_000 == 0 {
            let pipe = std::mem::replace(&mut pipes[n], redis::pipe());
            pipe.query::<()>(&mut cons[n]).expect("load");
        }
    }
    for (n, pipe) in pipes.into_iter().enumerate() {
        pipe.query::<()>(&mut cons[n]).expect("load");
    }
    assert_eq!(cluster.dbsize(), o.keys);
    cluster
}

fn own_slots(node: &RedisServer) -> Vec<(u16, u16)> {
    let nodes: String = node.cmd(&["CLUSTER", "NODES"]);
    let line = nodes
        .lines()
        .find(|l| l.contains("myself"))
        .expect("myself");
    line.split_whitespace()
        .skip(8)
        .filter(|r| !r.starts_with('['))
        .map(|r| {
            let (a, b) = r.split_once('-').unwrap_or((r, r));
            (a.parse().unwrap(), b.parse().unwrap())
        })
        .collect()
}

/// One native replica per master of `source`, started together.
fn native_cluster_replicas(source: &Cluster, keys: u64) -> (Duration, u64) {
    let replicas: Vec<RedisServer> = source.nodes.iter().map(|_| RedisServer::start()).collect();
    let start = Instant::now();
    for (replica, master) in replicas.iter().zip(&source.nodes) {
        let _: () = redis::cmd("REPLICAOF")
            .arg("127.0.0.1")
            .arg(master.port)
            .query(&mut replica.client())
            .unwrap();
    }
    wait_for("the native replicas", Duration::from_secs(600), || {
        replicas
            .iter()
            .all(|r| r.info_field("master_link_status").as_deref() == Some("up"))
            && replicas.iter().map(|r| r.dbsize(0)).sum::<u64>() == keys
    });
    let rss = replicas.iter().map(|r| peak_rss_kb(r.pid())).sum();
    (start.elapsed(), rss)
}

fn shardsync_cluster(source: &Cluster, keys: u64) -> (Duration, u64) {
    let target = Cluster::start(3);
    let start = Instant::now();
    let mut sync = Shardsync::sync(
        BIN,
        &["--source", &source.url(0), "--target", &target.url(0)],
    );
    wait_for(
        "shardsync's cluster full sync",
        Duration::from_secs(600),
        || target.dbsize() == keys,
    );
    let elapsed = start.elapsed();
    let rss = peak_rss_kb(sync.pid());
    let done = sync.terminate(Duration::from_secs(60));
    assert_eq!(done.code(), Some(0), "{}", done.log);
    (elapsed, rss)
}

/// `redis-benchmark -t set,incr,lpush,hset -n <n> -P 16` against `port`.
fn burst(port: u16, n: u64) -> (Instant, Instant) {
    let start = Instant::now();
    let out = std::process::Command::new("redis-benchmark")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args([
            "-t",
            "set,incr,lpush,hset",
            "-n",
            &n.to_string(),
            "-P",
            "16",
            "-q",
        ])
        .output()
        .expect("redis-benchmark");
    assert!(out.status.success(), "redis-benchmark failed");
    (start, Instant::now())
}

/// Native: a replica in sync, the burst, until its offset is the master's.
fn native_incremental(n: u64) -> (Duration, f64) {
    let source = RedisServer::start();
    let replica = RedisServer::start();
    let _: () = redis::cmd("REPLICAOF")
        .arg("127.0.0.1")
        .arg(source.port)
        .query(&mut replica.client())
        .unwrap();
    wait_for("the native replica", Duration::from_secs(60), || {
        replica.info_field("master_link_status").as_deref() == Some("up")
    });
    let (start, end) = burst(source.port, n);
    let target = source.master_repl_offset();
    wait_for(
        "the native replica to catch up",
        Duration::from_secs(600),
        || {
            replica
                .info_field("slave_repl_offset")
                .and_then(|v| v.parse::<u64>().ok())
                .is_some_and(|o| o >= target)
        },
    );
    let done = Instant::now();
    (done - end, (4 * n) as f64 / (done - start).as_secs_f64())
}

/// shardsync: caught up with an empty source, the burst, until its applied
/// offset is the source's.
fn shardsync_incremental(n: u64) -> (Duration, f64, u64) {
    let source = RedisServer::start();
    let target = RedisServer::start();
    let mut sync = Shardsync::sync(BIN, &["--source", &source.url(), "--target", &target.url()]);
    write_marker(&source);
    wait_for("shardsync in sync", Duration::from_secs(60), || {
        has_marker(&target)
    });
    let (start, end) = burst(source.port, n);
    let offset = source.master_repl_offset();
    wait_for("shardsync to catch up", Duration::from_secs(600), || {
        sync.status().is_some_and(|s| {
            s["shards"][0]["applied_offset"]
                .as_u64()
                .is_some_and(|a| a >= offset)
        })
    });
    let done = Instant::now();
    let rss = peak_rss_kb(sync.pid());
    let finished = sync.terminate(Duration::from_secs(60));
    assert_eq!(finished.code(), Some(0), "{}", finished.log);
    (
        done.saturating_duration_since(end),
        (4 * n) as f64 / (done - start).as_secs_f64(),
        rss,
    )
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

struct Row {
    name: String,
    native: f64,
    native_rss_mb: f64,
    ours: f64,
    rss_mb: f64,
}

fn measure(o: &Options, cluster: bool) -> Row {
    let mut native = Vec::new();
    let mut native_rss = Vec::new();
    let mut ours = Vec::new();
    let mut rss = Vec::new();
    for run in 0..o.runs {
        let ((n, nr), (s, r)) = if cluster {
            let source = populated_cluster(o);
            (
                native_cluster_replicas(&source, o.keys),
                shardsync_cluster(&source, o.keys),
            )
        } else {
            let source = populated_source(o);
            (native_replica(&source, o.keys), shardsync(&source, o.keys))
        };
        println!(
            "  {} run {}: native {:.2} s (replica peak RSS {} MB), shardsync {:.2} s, shardsync peak RSS {} MB",
            if cluster {
                "3 -> 3 cluster"
            } else {
                "standalone"
            },
            run + 1,
            n.as_secs_f64(),
            nr / 1024,
            s.as_secs_f64(),
            r / 1024
        );
        native.push(n.as_secs_f64());
        native_rss.push(nr as f64 / 1024.0);
        ours.push(s.as_secs_f64());
        rss.push(r as f64 / 1024.0);
    }
    Row {
        name: if cluster {
            format!(
                "3-master cluster -> 3-master cluster full sync, {} keys",
                o.keys
            )
        } else {
            format!("standalone -> standalone full sync, {} keys", o.keys)
        },
        native: median(native),
        native_rss_mb: median(native_rss),
        ours: median(ours),
        rss_mb: median(rss),
    }
}

struct IncrementalRow {
    native_behind: f64,
    native_rate: f64,
    behind: f64,
    rate: f64,
    rss_mb: f64,
}

fn measure_incremental(o: &Options) -> IncrementalRow {
    let n = o.keys / 2;
    let (mut nb, mut nr, mut b, mut r, mut m) = (vec![], vec![], vec![], vec![], vec![]);
    for run in 0..o.runs {
        let (native_behind, native_rate) = native_incremental(n);
        let (behind, rate, rss) = shardsync_incremental(n);
        println!(
            "  incremental run {}: native {:.2} s behind ({:.0} writes/s), shardsync {:.2} s behind ({:.0} writes/s applied), peak RSS {} MB",
            run + 1,
            native_behind.as_secs_f64(),
            native_rate,
            behind.as_secs_f64(),
            rate,
            rss / 1024
        );
        nb.push(native_behind.as_secs_f64());
        nr.push(native_rate);
        b.push(behind.as_secs_f64());
        r.push(rate);
        m.push(rss as f64 / 1024.0);
    }
    IncrementalRow {
        native_behind: median(nb),
        native_rate: median(nr),
        behind: median(b),
        rate: median(r),
        rss_mb: median(m),
    }
}

fn main() {
    let o = options();
    println!(
        "{} keys of {} bytes, {} runs, loopback, redis-server {}",
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
    let mut rows = Vec::new();
    if o.topology != "cluster" {
        rows.push(measure(&o, false));
    }
    if o.topology != "standalone" {
        rows.push(measure(&o, true));
    }
    let incremental = (o.topology != "cluster").then(|| measure_incremental(&o));
    println!();
    println!(
        "| run | native replication | its peak RSS | shardsync | ratio | shardsync peak RSS |"
    );
    println!("|---|---|---|---|---|---|");
    for r in rows {
        println!(
            "| {} | {:.2} s | {:.0} MB | {:.2} s | {:.2}x | {:.0} MB |",
            r.name,
            r.native,
            r.native_rss_mb,
            r.ours,
            r.ours / r.native,
            r.rss_mb
        );
    }
    if let Some(i) = incremental {
        println!();
        println!("| incremental burst ({} writes) | native replication | shardsync | shardsync peak RSS |", 2 * o.keys);
        println!("|---|---|---|---|");
        println!(
            "| behind after the burst's end | {:.2} s | {:.2} s | {:.0} MB |",
            i.native_behind, i.behind, i.rss_mb
        );
        println!(
            "| writes applied per second (burst start to caught up) | {:.0} | {:.0} | |",
            i.native_rate, i.rate
        );
    }
}
