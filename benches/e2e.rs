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
//!   3-master cluster target for a cluster source) and a marker key per
//!   source master, written once the snapshots are forked, is there, with
//!   the process's peak RSS (VmHWM) read from /proc before it is stopped;
//! - incremental: with the replicas (native, then shardsync) in sync, a
//!   burst of `redis-benchmark -t set,incr,lpush,hset -n N/2 -P 16` (2 N
//!   writes; `--cluster` on a cluster); the time from the burst's end until
//!   the replicas applied everything (each replica's offset, or each
//!   shard's applied offset, at its master's), and the writes applied per
//!   second from the burst's start to then;
//!
//! and prints medians and the ratio to native replication.
//!
//! `SHARDSYNC_BENCH_BIN=<path>` measures another shardsync binary (an
//! older build, say) instead of this build's; `SHARDSYNC_BENCH_ARGS` adds
//! options to its command line (`--no-exactly-once`, to measure what the
//! markers cost); `SHARDSYNC_BENCH_RANDOM_KEYS=<n>` makes the burst write
//! random keys among `n` (`redis-benchmark -r`) instead of one per command.
//! `SHARDSYNC_BENCH_PERF=<file>` records a system-wide `perf` profile of
//! each shardsync full sync into `<file>.<n>`; `SHARDSYNC_BENCH_LOG=1`
//! prints shardsync's log after each one.

use std::time::{Duration, Instant};

use harness::cluster::{key_slot, own_slots, Cluster};
use harness::{cpu_secs, peak_rss_kb, wait_for, RedisServer, Shardsync};

const BUILT: &str = env!("CARGO_BIN_EXE_shardsync");

/// The binary measured: this build's, or `SHARDSYNC_BENCH_BIN` (another
/// build of shardsync, to compare two versions on the same machine).
fn bin() -> String {
    std::env::var("SHARDSYNC_BENCH_BIN").unwrap_or_else(|_| BUILT.to_string())
}

/// `shardsync sync` with the bench's source and target, and the options
/// in `SHARDSYNC_BENCH_ARGS` (say `--no-exactly-once`).
fn start_sync(source: &Deployment, target: &Deployment) -> Shardsync {
    let extra = std::env::var("SHARDSYNC_BENCH_ARGS").unwrap_or_default();
    let source_url = source.url();
    let target_url = target.url();
    let mut args = vec!["--source", &source_url, "--target", &target_url];
    args.extend(extra.split_whitespace());
    Shardsync::sync(&bin(), &args)
}

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

/// A source or target: one server, or a 3-master cluster.
enum Deployment {
    One(RedisServer),
    Cluster(Cluster),
}

impl Deployment {
    fn start(cluster: bool) -> Deployment {
        if cluster {
            Deployment::Cluster(Cluster::start(3))
        } else {
            Deployment::One(RedisServer::start())
        }
    }

    fn masters(&self) -> Vec<&RedisServer> {
        match self {
            Deployment::One(s) => vec![s],
            Deployment::Cluster(c) => c.nodes.iter().collect(),
        }
    }

    fn url(&self) -> String {
        self.masters()[0].url()
    }

    fn dbsize(&self) -> u64 {
        self.masters().iter().map(|m| m.raw_dbsize(0)).sum()
    }

    /// Whether `key` exists, asked of the master that serves it.
    fn exists(&self, key: &str) -> bool {
        let master = match self {
            Deployment::One(s) => s,
            Deployment::Cluster(c) => {
                let slot = key_slot(key.as_bytes());
                c.nodes
                    .iter()
                    .find(|n| own_slots(n).iter().any(|&(a, b)| a <= slot && slot <= b))
                    .expect("every slot is served")
            }
        };
        master.cmd::<u64>(&["EXISTS", key]) == 1
    }

    /// One marker key per master, each in a slot that master serves: once
    /// the target has every marker (written after the source forked), each
    /// shard's snapshot is applied.
    fn marker_keys(&self) -> Vec<(&RedisServer, String)> {
        match self {
            Deployment::One(s) => vec![(s, "{key}marker".to_string())],
            Deployment::Cluster(c) => c
                .nodes
                .iter()
                .map(|n| {
                    let slots = own_slots(n);
                    let key = (0..)
                        .map(|i| format!("{{m{i}}}marker"))
                        .find(|k| {
                            let slot = key_slot(k.as_bytes());
                            slots.iter().any(|&(a, b)| a <= slot && slot <= b)
                        })
                        .expect("a tag in the node's slots");
                    (n, key)
                })
                .collect(),
        }
    }

    fn write_markers(&self) -> Vec<String> {
        self.marker_keys()
            .into_iter()
            .map(|(master, key)| {
                let _: () = redis::cmd("SET")
                    .arg(&key)
                    .arg("1")
                    .query(&mut master.client())
                    .unwrap();
                key
            })
            .collect()
    }
}

/// Where the CPU time of one sync went, in seconds.
#[derive(Default, Clone, Copy)]
struct Cpu {
    /// The source masters' snapshot children.
    forks: f64,
    /// The replicas, or shardsync's targets.
    servers: f64,
    /// shardsync itself.
    shardsync: f64,
}

/// The source masters' snapshot children's CPU so far, once no snapshot
/// is running (a child's time is counted once it is reaped).
fn fork_cpu(source: &Deployment) -> f64 {
    wait_for("the snapshots to end", Duration::from_secs(60), || {
        source
            .masters()
            .iter()
            .all(|m| m.info_field("rdb_bgsave_in_progress").as_deref() == Some("0"))
    });
    source.masters().iter().map(|m| m.cpu().1).sum()
}

fn servers_cpu(servers: &[&RedisServer]) -> f64 {
    servers.iter().map(|s| s.cpu().0).sum()
}

/// A standalone source filled with `DEBUG POPULATE`.
fn populated_source(o: &Options) -> Deployment {
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
    Deployment::One(source)
}

/// A 3-master cluster holding `keys` keys (`key:<i>`), written per node
/// in pipelines.
fn populated_cluster(o: &Options) -> Deployment {
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
    Deployment::Cluster(cluster)
}

/// `REPLICAOF` each master of `source` on its replica, all at once.
fn replicate(source: &Deployment, replicas: &[RedisServer]) {
    for (replica, master) in replicas.iter().zip(source.masters()) {
        let _: () = redis::cmd("REPLICAOF")
            .arg("127.0.0.1")
            .arg(master.port)
            .query(&mut replica.client())
            .unwrap();
    }
}

fn links_up(replicas: &[RedisServer]) -> bool {
    replicas
        .iter()
        .all(|r| r.info_field("master_link_status").as_deref() == Some("up"))
}

/// One native replica per master of `source`, started together, until
/// every link is up and the replicas hold `keys` keys.
fn native_replicas(source: &Deployment, keys: u64) -> (Duration, u64, Cpu) {
    let replicas: Vec<RedisServer> = source
        .masters()
        .iter()
        .map(|_| RedisServer::start())
        .collect();
    let forks_before = fork_cpu(source);
    let start = Instant::now();
    replicate(source, &replicas);
    wait_for("the native replicas", Duration::from_secs(600), || {
        links_up(&replicas) && replicas.iter().map(|r| r.raw_dbsize(0)).sum::<u64>() == keys
    });
    let elapsed = start.elapsed();
    let rss = replicas.iter().map(|r| peak_rss_kb(r.pid())).sum();
    let cpu = Cpu {
        forks: fork_cpu(source) - forks_before,
        servers: servers_cpu(&replicas.iter().collect::<Vec<_>>()),
        shardsync: 0.0,
    };
    (elapsed, rss, cpu)
}

/// shardsync from process start until the target holds every key and every
/// marker.
fn shardsync_full(source: &Deployment, keys: u64) -> (Duration, u64, Cpu) {
    let target = Deployment::start(matches!(source, Deployment::Cluster(_)));
    let forks_before = fork_cpu(source);
    let targets_before = servers_cpu(&target.masters());
    let profile = Profile::start();
    let start = Instant::now();
    let mut sync = start_sync(source, &target);
    let n_shards = source.masters().len();
    // The markers go in once every source forked its snapshot: they travel
    // in the stream, behind every key.
    wait_for("the full sync to start", Duration::from_secs(60), || {
        sync.status().is_some_and(|s| {
            let shards = s["shards"].as_array().cloned().unwrap_or_default();
            shards.len() == n_shards && shards.iter().all(|sh| sh["state"] != "prechecking")
        })
    });
    let markers = source.write_markers();
    wait_for("shardsync's full sync", Duration::from_secs(600), || {
        markers.iter().all(|m| target.exists(m)) && target.dbsize() >= keys
    });
    let elapsed = start.elapsed();
    drop(profile);
    let rss = peak_rss_kb(sync.pid());
    let cpu = Cpu {
        forks: fork_cpu(source) - forks_before,
        servers: servers_cpu(&target.masters()) - targets_before,
        shardsync: cpu_secs(sync.pid()),
    };
    let done = sync.terminate(Duration::from_secs(60));
    assert_eq!(done.code(), Some(0), "{}", done.log);
    if std::env::var_os("SHARDSYNC_BENCH_LOG").is_some() {
        println!("{}", done.log);
        for m in target.masters() {
            println!(
                "target {}: {} reads, {} writes, {} commands",
                m.addr(),
                m.info_field("total_reads_processed").unwrap_or_default(),
                m.info_field("total_writes_processed").unwrap_or_default(),
                m.info_field("total_commands_processed").unwrap_or_default(),
            );
        }
    }
    (elapsed, rss, cpu)
}

/// `redis-benchmark -t set,incr,lpush,hset -n <n> -P 16` against
/// `source` (with `--cluster` for a cluster).
fn burst(source: &Deployment, n: u64) -> (Instant, Instant) {
    let start = Instant::now();
    let mut cmd = std::process::Command::new("redis-benchmark");
    cmd.args([
        "-h",
        "127.0.0.1",
        "-p",
        &source.masters()[0].port.to_string(),
    ]);
    if matches!(source, Deployment::Cluster(_)) {
        cmd.arg("--cluster");
    }
    // Random keys over that many names (redis-benchmark's -r) instead of
    // one key per command: every write in a slot of its own, say.
    if let Ok(range) = std::env::var("SHARDSYNC_BENCH_RANDOM_KEYS") {
        cmd.args(["-r", &range]);
    }
    let out = cmd
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
    assert!(
        out.status.success(),
        "redis-benchmark failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (start, Instant::now())
}

/// Every source master's replication offset, by address.
fn offsets(source: &Deployment) -> Vec<(String, u64)> {
    source
        .masters()
        .iter()
        .map(|m| (m.addr(), m.master_repl_offset()))
        .collect()
}

/// Native: a replica per master in sync, the burst, until every replica's
/// offset is its master's.
fn native_incremental(cluster: bool, n: u64) -> (Duration, f64) {
    let source = Deployment::start(cluster);
    let replicas: Vec<RedisServer> = source
        .masters()
        .iter()
        .map(|_| RedisServer::start())
        .collect();
    replicate(&source, &replicas);
    wait_for("the native replicas", Duration::from_secs(60), || {
        links_up(&replicas)
    });
    let (start, end) = burst(&source, n);
    let wanted = offsets(&source);
    wait_for(
        "the native replicas to catch up",
        Duration::from_secs(600),
        || {
            replicas.iter().zip(&wanted).all(|(r, (_, offset))| {
                r.info_field("slave_repl_offset")
                    .and_then(|v| v.parse::<u64>().ok())
                    .is_some_and(|o| o >= *offset)
            })
        },
    );
    let done = Instant::now();
    (done - end, (4 * n) as f64 / (done - start).as_secs_f64())
}

/// shardsync: caught up with an empty source, the burst, until every
/// shard's applied offset is its master's.
fn shardsync_incremental(cluster: bool, n: u64) -> (Duration, f64, u64, (f64, f64)) {
    let source = Deployment::start(cluster);
    let target = Deployment::start(cluster);
    let mut sync = start_sync(&source, &target);
    let n_shards = source.masters().len();
    wait_for("shardsync's workers", Duration::from_secs(60), || {
        sync.status()
            .is_some_and(|s| s["shards"].as_array().map(Vec::len) == Some(n_shards))
    });
    let markers = source.write_markers();
    wait_for("shardsync in sync", Duration::from_secs(60), || {
        markers.iter().all(|m| target.exists(m))
    });
    let target_cpu = |t: &Deployment| t.masters().iter().map(|m| m.cpu().0).sum::<f64>();
    let cpu_before = (target_cpu(&target), cpu_secs(sync.pid()));
    let (start, end) = burst(&source, n);
    let wanted = offsets(&source);
    wait_for("shardsync to catch up", Duration::from_secs(600), || {
        sync.status().is_some_and(|s| {
            let shards = s["shards"].as_array().cloned().unwrap_or_default();
            wanted.iter().all(|(addr, offset)| {
                shards.iter().any(|sh| {
                    sh["source"].as_str() == Some(addr)
                        && sh["applied_offset"].as_u64().is_some_and(|a| a >= *offset)
                })
            })
        })
    });
    let done = Instant::now();
    let cpu = (
        target_cpu(&target) - cpu_before.0,
        cpu_secs(sync.pid()) - cpu_before.1,
    );
    let rss = peak_rss_kb(sync.pid());
    let finished = sync.terminate(Duration::from_secs(60));
    assert_eq!(finished.code(), Some(0), "{}", finished.log);
    (
        done.saturating_duration_since(end),
        (4 * n) as f64 / (done - start).as_secs_f64(),
        rss,
        cpu,
    )
}

/// With `SHARDSYNC_BENCH_PERF=<file>` set, a system-wide `perf record`
/// (cpu-clock, call graphs) runs while shardsync syncs, into `<file>.<n>`:
/// the profile of shardsync and of the servers it drives, nothing else of
/// the bench.
struct Profile(Option<std::process::Child>);

impl Profile {
    fn start() -> Profile {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static N: AtomicUsize = AtomicUsize::new(0);
        let Ok(path) = std::env::var("SHARDSYNC_BENCH_PERF") else {
            return Profile(None);
        };
        let out = format!("{path}.{}", N.fetch_add(1, Ordering::Relaxed));
        let child = std::process::Command::new("perf")
            .args([
                "record",
                "-q",
                "-e",
                "cpu-clock",
                "-F",
                "1999",
                "-a",
                "-g",
                "-o",
                &out,
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("perf record (SHARDSYNC_BENCH_PERF is set)");
        Profile(Some(child))
    }
}

impl Drop for Profile {
    fn drop(&mut self) {
        if let Some(child) = &mut self.0 {
            // perf writes its file on SIGINT.
            let _ = std::process::Command::new("kill")
                .args(["-INT", &child.id().to_string()])
                .status();
            let _ = child.wait();
        }
    }
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

fn topology_name(cluster: bool) -> &'static str {
    if cluster {
        "3-master cluster -> 3-master cluster"
    } else {
        "standalone -> standalone"
    }
}

fn measure(o: &Options, cluster: bool) -> Row {
    let mut native = Vec::new();
    let mut native_rss = Vec::new();
    let mut ours = Vec::new();
    let mut rss = Vec::new();
    for run in 0..o.runs {
        let source = if cluster {
            populated_cluster(o)
        } else {
            populated_source(o)
        };
        let (n, nr, ncpu) = native_replicas(&source, o.keys);
        let (s, r, cpu) = shardsync_full(&source, o.keys);
        println!(
            "  {} full sync, run {}: native {:.2} s (replica peak RSS {} MB; CPU s: snapshots {:.2}, replicas {:.2}), shardsync {:.2} s (peak RSS {} MB; CPU s: snapshots {:.2}, targets {:.2}, shardsync {:.2})",
            topology_name(cluster),
            run + 1,
            n.as_secs_f64(),
            nr / 1024,
            ncpu.forks,
            ncpu.servers,
            s.as_secs_f64(),
            r / 1024,
            cpu.forks,
            cpu.servers,
            cpu.shardsync,
        );
        native.push(n.as_secs_f64());
        native_rss.push(nr as f64 / 1024.0);
        ours.push(s.as_secs_f64());
        rss.push(r as f64 / 1024.0);
    }
    Row {
        name: format!("{} full sync, {} keys", topology_name(cluster), o.keys),
        native: median(native),
        native_rss_mb: median(native_rss),
        ours: median(ours),
        rss_mb: median(rss),
    }
}

struct IncrementalRow {
    name: &'static str,
    native_behind: f64,
    native_rate: f64,
    behind: f64,
    rate: f64,
    rss_mb: f64,
}

fn measure_incremental(o: &Options, cluster: bool) -> IncrementalRow {
    let n = o.keys / 2;
    let (mut nb, mut nr, mut b, mut r, mut m) = (vec![], vec![], vec![], vec![], vec![]);
    for run in 0..o.runs {
        let (native_behind, native_rate) = native_incremental(cluster, n);
        let (behind, rate, rss, cpu) = shardsync_incremental(cluster, n);
        println!(
            "  {} incremental, run {}: native {:.2} s behind ({:.0} writes/s), shardsync {:.2} s behind ({:.0} writes/s applied), peak RSS {} MB; CPU s from the burst to caught up: targets {:.2}, shardsync {:.2}",
            topology_name(cluster),
            run + 1,
            native_behind.as_secs_f64(),
            native_rate,
            behind.as_secs_f64(),
            rate,
            rss / 1024,
            cpu.0,
            cpu.1
        );
        nb.push(native_behind.as_secs_f64());
        nr.push(native_rate);
        b.push(behind.as_secs_f64());
        r.push(rate);
        m.push(rss as f64 / 1024.0);
    }
    IncrementalRow {
        name: topology_name(cluster),
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
    let topologies: Vec<bool> = match o.topology.as_str() {
        "standalone" => vec![false],
        "cluster" => vec![true],
        _ => vec![false, true],
    };
    let mut rows = Vec::new();
    let mut incremental = Vec::new();
    for &cluster in &topologies {
        rows.push(measure(&o, cluster));
        incremental.push(measure_incremental(&o, cluster));
    }
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
    println!();
    println!(
        "| incremental burst, {} writes | native: behind at the end | native: writes/s applied | shardsync: behind at the end | shardsync: writes/s applied | ratio (writes/s) | shardsync peak RSS |",
        2 * o.keys
    );
    println!("|---|---|---|---|---|---|---|");
    for i in incremental {
        println!(
            "| {} | {:.2} s | {:.0} | {:.2} s | {:.0} | {:.2}x | {:.0} MB |",
            i.name,
            i.native_behind,
            i.native_rate,
            i.behind,
            i.rate,
            i.rate / i.native_rate,
            i.rss_mb
        );
    }
}
