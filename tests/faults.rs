//! Fault injection, seeded and reproducible: shardsync is killed (`kill -9`)
//! at random points of every phase — the handshake, the RDB transfer, the
//! RESTORE pipeline, incremental replay, right after a large source
//! transaction, while the stream spills to disk — and started again with
//! the same command each time; its links go through TCP proxies that reset
//! them, stall them beyond the writer's timeout and cut replies in half;
//! the target is frozen (SIGSTOP) and restarted (`kill -9`, appendonly).
//! Writes whose effect doubles when applied twice run throughout. In the
//! end the target equals the source key by key, and the source ran no full
//! resync after the first incremental phase.
//!
//! `SHARDSYNC_FAULT_SEED` picks another seed (the log names the one used);
//! `SHARDSYNC_FAULT_SCALE=N` multiplies the rounds (a soak; see
//! benches/RESULTS.md).

use std::time::{Duration, Instant};

use harness::compare::diff_all;
use harness::load::{Load, Rng};
use harness::proxy::Proxy;
use harness::{wait_for, wait_until, RedisServer, Shardsync, SHORT};

const BIN: &str = env!("CARGO_BIN_EXE_shardsync");
const LONG: Duration = Duration::from_secs(180);
/// Keys on the source before the first sync (times the scale): enough for
/// the full sync to take a moment, so that kills land inside it.
const PRELOAD: u64 = 150_000;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Where a fault was injected, for the summary.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Point {
    KillHandshake,
    KillRdbTransfer,
    KillRestorePipeline,
    KillIncremental,
    KillAfterSourceTransaction,
    KillDuringSpill,
    SourceLinkReset,
    TargetLinkReset,
    TargetReplyCut,
    TargetLinkStalled,
    TargetFrozen,
    TargetRestarted,
}

struct Rig {
    source: RedisServer,
    target: RedisServer,
    source_proxy: Proxy,
    target_proxy: Proxy,
    rng: Rng,
    seed: u64,
    load: Load,
    sync: Option<Shardsync>,
    /// (point, seconds into the test) of every fault.
    faults: Vec<(Point, f64)>,
    started: Instant,
    preload: u64,
}

impl Rig {
    fn args(&self) -> Vec<String> {
        [
            "--source",
            &self.source_proxy.url(None),
            "--target",
            &self.target_proxy.url(None),
            "--target-timeout",
            "2s",
            "--spill-memory",
            "1MB",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }

    fn start(&mut self) {
        let args = self.args();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.sync = Some(Shardsync::sync(BIN, &args));
    }

    fn sync(&self) -> &Shardsync {
        self.sync.as_ref().expect("running")
    }

    fn note(&mut self, point: Point) {
        self.faults
            .push((point, self.started.elapsed().as_secs_f64()));
    }

    fn kill(&mut self, point: Point) {
        let mut sync = self.sync.take().expect("running");
        sync.signal(libc::SIGKILL);
        let done = sync.wait_exit(SHORT);
        assert_eq!(done.code(), None, "killed by the signal:\n{}", done.log);
        self.note(point);
    }

    fn millis(&mut self, below: u64) -> Duration {
        Duration::from_millis(self.rng.below(below))
    }

    fn full_sync_progress(&self) -> (u64, u64) {
        self.sync()
            .status()
            .map(|s| {
                let f = &s["shards"][0]["full_sync"];
                (
                    f["bytes"].as_u64().unwrap_or(0),
                    f["keys"].as_u64().unwrap_or(0),
                )
            })
            .unwrap_or((0, 0))
    }

    /// Lets writes go on for a random while (`at_least` commands or more).
    fn writes(&mut self, at_least: u64) {
        let n = at_least + self.rng.below(at_least * 2);
        let before = self.load.sent();
        wait_for("writes", SHORT, || self.load.sent() > before + n);
    }

    /// A kill during the full sync, at `point`; the restart must carry on
    /// without `--on-conflict`.
    fn kill_in_full_sync(&mut self, point: Point) {
        self.start();
        match point {
            Point::KillHandshake => std::thread::sleep(self.millis(150)),
            Point::KillRdbTransfer => {
                wait_for("the RDB to arrive", LONG, || {
                    self.full_sync_progress().0 > 0
                });
                std::thread::sleep(self.millis(40));
            }
            _ => {
                let at = self.preload / 10 + self.rng.below(self.preload * 7 / 10);
                let reached = wait_until(LONG, || self.full_sync_progress().1 >= at);
                assert!(reached, "{}", self.context());
            }
        }
        let state = self.sync().status().map(|s| s["state"].clone());
        self.kill(point);
        if let Some(state) = state {
            assert_ne!(state, "incremental", "{point:?} came too late");
        }
    }

    /// Starts shardsync again and waits until it replays.
    fn resume(&mut self) {
        self.start();
        self.sync().wait_state("incremental", LONG);
        let log = self.sync().log();
        assert!(
            log.contains("partial resync accepted"),
            "after {:?}: no partial resync\n{}",
            self.faults.last(),
            self.context()
        );
    }

    fn kill_incremental(&mut self) {
        self.writes(300);
        self.kill(Point::KillIncremental);
        self.writes(300);
        self.resume();
    }

    fn kill_after_source_transaction(&mut self) {
        let seed = self.rng.next_u64();
        Load::transaction(&self.source, seed, 3000);
        std::thread::sleep(self.millis(30));
        self.kill(Point::KillAfterSourceTransaction);
        self.resume();
    }

    fn kill_during_spill(&mut self) {
        self.target.signal(libc::SIGSTOP);
        let spilled = wait_until(LONG, || {
            self.sync().metric_sum("shardsync_spilled_bytes_total")
                + self
                    .sync()
                    .metric_sum("shardsync_target_overflow_spilled_bytes_total")
                > 0.0
        });
        std::thread::sleep(self.millis(300));
        self.kill(Point::KillDuringSpill);
        self.target.signal(libc::SIGCONT);
        assert!(spilled, "nothing spilled while the target was frozen");
        self.resume();
    }

    /// Target links lost or refused so far (this process).
    fn target_failures(&self) -> usize {
        self.sync()
            .log()
            .matches("target connection failed")
            .count()
    }

    fn resumes(&self) -> usize {
        self.sync().log().matches("partial resync accepted").count()
    }

    /// A link fault; shardsync keeps running, reconnects the link it hit
    /// (and resumes the stream for the source's) and goes on.
    fn link_fault(&mut self, point: Point) {
        self.writes(300);
        // Faults land on working links, not on a writer between attempts.
        wait_for("the target link", SHORT, || {
            self.sync()
                .status()
                .is_some_and(|s| s["targets"][0]["connected"] == true)
        });
        let (failures, resumes) = (self.target_failures(), self.resumes());
        match point {
            Point::SourceLinkReset => self.source_proxy.reset(),
            Point::TargetLinkReset => self.target_proxy.reset(),
            Point::TargetReplyCut => {
                self.target_proxy.cut_next_reply();
                wait_for("a reply to cut", SHORT, || !self.target_proxy.cut_pending());
            }
            Point::TargetLinkStalled => {
                self.target_proxy.stall(true);
                std::thread::sleep(Duration::from_millis(2500 + self.rng.below(1000)));
                self.target_proxy.stall(false);
            }
            Point::TargetFrozen => {
                self.target.signal(libc::SIGSTOP);
                std::thread::sleep(Duration::from_millis(2500 + self.rng.below(1000)));
                self.target.signal(libc::SIGCONT);
            }
            Point::TargetRestarted => self.target.restart(),
            _ => unreachable!("not a link fault"),
        }
        self.note(point);
        let recovered = if point == Point::SourceLinkReset {
            wait_until(SHORT, || self.resumes() > resumes)
        } else {
            wait_until(SHORT, || self.target_failures() > failures)
        };
        assert!(recovered, "{point:?} was not noticed\n{}", self.context());
        self.writes(300);
        let state = self.sync().status().map(|s| s["state"].clone());
        assert_ne!(state, Some("failed".into()), "{}", self.sync().log());
    }

    /// What a failure message needs: the faults so far, both servers' and
    /// shardsync's logs.
    fn context(&self) -> String {
        format!(
            "{}\nfaults: {:?}\n--- source log ---\n{}\n--- target log ---\n{}\n--- shardsync log ---\n{}",
            self.summary(),
            self.faults,
            self.source.log_tail(30),
            self.target.log_tail(30),
            self.sync.as_ref().map(|s| s.log()).unwrap_or_default()
        )
    }

    fn summary(&self) -> String {
        let mut counts = std::collections::BTreeMap::new();
        for (p, _) in &self.faults {
            *counts.entry(*p).or_insert(0) += 1;
        }
        format!(
            "seed {}: {} keys preloaded, {} commands written meanwhile; {} faults, {} kills: {:?}",
            self.seed,
            self.preload,
            self.load.sent(),
            self.faults.len(),
            self.faults
                .iter()
                .filter(|(p, _)| format!("{p:?}").starts_with("Kill"))
                .count(),
            counts
        )
    }
}

#[test]
fn standalone_kill_9_anywhere_and_link_faults_leave_the_target_identical() {
    let seed = env_u64("SHARDSYNC_FAULT_SEED", 20261201);
    let scale = env_u64("SHARDSYNC_FAULT_SCALE", 1) as usize;
    let source = RedisServer::config()
        .arg("enable-debug-command", &["yes"])
        .arg("repl-backlog-size", &["256mb"])
        .start();
    let preload = PRELOAD * scale as u64;
    source.cmd::<()>(&["DEBUG", "POPULATE", &preload.to_string(), "pre", "64"]);
    let target = RedisServer::config()
        .arg("appendonly", &["yes"])
        .arg("appendfsync", &["always"])
        .start();
    let source_proxy = Proxy::start(&source.addr());
    let target_proxy = Proxy::start(&target.addr());
    let load = Load::start(&source, seed, 200);
    let mut rig = Rig {
        source,
        target,
        source_proxy,
        target_proxy,
        rng: Rng::new(seed),
        seed,
        load,
        sync: None,
        faults: Vec::new(),
        started: Instant::now(),
        preload,
    };
    eprintln!("fault seed {seed} (SHARDSYNC_FAULT_SEED), scale {scale}");

    // The full sync, killed in each of its phases.
    for point in [
        Point::KillHandshake,
        Point::KillRdbTransfer,
        Point::KillRestorePipeline,
        Point::KillRdbTransfer,
        Point::KillRestorePipeline,
    ]
    .repeat(scale)
    {
        rig.kill_in_full_sync(point);
    }
    rig.start();
    rig.sync().wait_state("incremental", LONG);
    let full_syncs = rig.source.sync_full();

    // Then the stream: kills and link faults in a seeded order.
    let mut plan: Vec<Point> = Vec::new();
    for _ in 0..scale {
        plan.extend([Point::KillIncremental; 10]);
        plan.extend([Point::KillAfterSourceTransaction; 3]);
        plan.extend([Point::KillDuringSpill; 2]);
        plan.extend([Point::SourceLinkReset; 2]);
        plan.extend([Point::TargetLinkReset; 2]);
        plan.extend([Point::TargetReplyCut; 3]);
        plan.extend([
            Point::TargetLinkStalled,
            Point::TargetFrozen,
            Point::TargetRestarted,
        ]);
    }
    for i in (1..plan.len()).rev() {
        let j = rig.rng.below(i as u64 + 1) as usize;
        plan.swap(i, j);
    }
    for point in plan {
        match point {
            Point::KillIncremental => rig.kill_incremental(),
            Point::KillAfterSourceTransaction => rig.kill_after_source_transaction(),
            Point::KillDuringSpill => rig.kill_during_spill(),
            link => rig.link_fault(link),
        }
    }

    rig.load.stop();
    let summary = rig.summary();
    eprintln!("{summary} in {:.0} s", rig.started.elapsed().as_secs_f64());
    let addr = rig.source_proxy.addr();
    rig.sync().wait_caught_up_via(&rig.source, &addr, LONG);
    let diff = diff_all(&rig.source, &rig.target);
    assert!(
        diff.is_empty(),
        "{summary}\n{} differences:\n{}\n{}",
        diff.len(),
        diff.iter().take(20).cloned().collect::<Vec<_>>().join("\n"),
        rig.sync().log()
    );
    assert_eq!(
        rig.source.sync_full(),
        full_syncs,
        "no full resync once the stream ran (the backlog was large enough)\n{summary}"
    );
    let resent = rig
        .sync()
        .metric_sum("shardsync_target_resent_non_idempotent_total");
    assert_eq!(resent, 0.0, "{}", rig.sync().log());
}

/// Cluster → cluster: shardsync killed in the full sync and throughout the
/// stream (also while it spills behind a frozen target node), every target
/// node's links cut, a target node frozen beyond the writer's timeout, one
/// killed and restarted with its AOF (it answers LOADING, then CLUSTERDOWN
/// and OK by turns: refusals that come and go, which the order guards are
/// for); writes in one slot per round keep going (cross-key commands stay
/// in a slot on a cluster source).
#[test]
fn cluster_kill_9_anywhere_and_node_faults_leave_the_target_identical() {
    use harness::cluster::Cluster;
    use harness::compare::diff_nodes;
    let seed = env_u64("SHARDSYNC_FAULT_SEED", 20261201) ^ 0xc1;
    let scale = env_u64("SHARDSYNC_FAULT_SCALE", 1) as usize;
    let mut rng = Rng::new(seed);
    let source = Cluster::start_with(
        3,
        RedisServer::config()
            .arg("enable-debug-command", &["yes"])
            .arg("repl-backlog-size", &["128mb"]),
    );
    {
        // 120,000 keys, pipelined to the master of each one's slot.
        let mut client = source.client();
        let value = "v".repeat(64);
        let mut by_node: std::collections::HashMap<u16, redis::Pipeline> = Default::default();
        for i in 0..120_000u32 {
            let key = format!("pre:{i}");
            by_node
                .entry(client.port_for(key.as_bytes()))
                .or_default()
                .cmd("SET")
                .arg(&key)
                .arg(&value)
                .ignore();
            if i % 4000 == 3999 {
                for (port, pipe) in by_node.drain() {
                    let _: () = pipe.query(client.conn(port)).unwrap();
                }
            }
        }
    }
    let mut target = Cluster::start_with(
        3,
        RedisServer::config()
            .arg("appendonly", &["yes"])
            .arg("appendfsync", &["always"]),
    );
    let args = [
        "--source",
        &source.url(0),
        "--target",
        &target.url(0),
        "--target-timeout",
        "2s",
        "--spill-memory",
        "1MB",
    ];
    let mut load = Load::start_cluster(&source, seed, 100);
    let mut kills = Vec::new();
    // The log of every killed process, for a failure's message.
    let logs = std::cell::RefCell::new(Vec::new());
    let kill = |sync: &mut Shardsync, kills: &mut Vec<&'static str>, point: &'static str| {
        sync.signal(libc::SIGKILL);
        let done = sync.wait_exit(SHORT);
        assert_eq!(done.code(), None);
        logs.borrow_mut()
            .push(format!("--- killed at {point} ---\n{}", done.log));
        kills.push(point);
    };
    let writes = |load: &Load, rng: &mut Rng| {
        let n = 300 + rng.below(1000);
        let before = load.sent();
        wait_for("writes", SHORT, || load.sent() > before + n);
    };
    let keys = |sync: &Shardsync| -> u64 {
        sync.status()
            .map(|s| {
                s["shards"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(|x| x["full_sync"]["keys"].as_u64())
                            .sum()
                    })
                    .unwrap_or(0)
            })
            .unwrap_or(0)
    };
    for _ in 0..2 * scale {
        let mut sync = Shardsync::sync(BIN, &args);
        let at = 5000 + rng.below(60_000);
        wait_for("full sync progress", LONG, || keys(&sync) >= at);
        kill(&mut sync, &mut kills, "full sync");
    }
    let mut sync = Shardsync::sync(BIN, &args);
    sync.wait_state("incremental", LONG);
    let full_syncs: u64 = source.masters().iter().map(|m| m.sync_full()).sum();
    let mut faults = Vec::new();
    let mut plan = Vec::new();
    for _ in 0..scale {
        plan.extend(["kill"; 6]);
        plan.extend([
            "cut links",
            "cut links",
            "freeze node",
            "kill during spill",
            "restart node",
        ]);
    }
    for i in (1..plan.len()).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        plan.swap(i, j);
    }
    if let Ok(only) = std::env::var("SHARDSYNC_FAULT_ONLY") {
        plan.retain(|p| only.split(',').any(|o| o == *p));
    }
    for point in plan {
        writes(&load, &mut rng);
        let node = rng.below(3) as usize;
        match point {
            "kill" | "kill during spill" => {
                if point == "kill during spill" {
                    target.nodes[node].signal(libc::SIGSTOP);
                    let spilled = wait_until(LONG, || {
                        sync.metric_sum("shardsync_spilled_bytes_total")
                            + sync.metric_sum("shardsync_target_overflow_spilled_bytes_total")
                            > 0.0
                    });
                    assert!(spilled, "nothing spilled behind a frozen node");
                }
                kill(&mut sync, &mut kills, point);
                target.nodes[node].signal(libc::SIGCONT);
                writes(&load, &mut rng);
                sync = Shardsync::sync(BIN, &args);
                sync.wait_state("incremental", LONG);
                assert_eq!(
                    sync.log().matches("partial resync accepted").count(),
                    3,
                    "after {point}: every shard resumes\n{}",
                    sync.log()
                );
            }
            "cut links" => {
                for m in target.masters() {
                    m.kill_clients();
                }
                faults.push(point);
            }
            "freeze node" => {
                target.nodes[node].signal(libc::SIGSTOP);
                std::thread::sleep(Duration::from_millis(2500 + rng.below(1000)));
                target.nodes[node].signal(libc::SIGCONT);
                faults.push(point);
            }
            _ => {
                target.nodes[node].restart();
                target.wait_stable();
                faults.push(point);
            }
        }
    }
    writes(&load, &mut rng);
    load.stop();
    for m in source.masters() {
        sync.wait_caught_up(m, LONG);
    }
    let summary = format!(
        "seed {seed}: {} kills {:?}, {} node faults {:?}, {} commands written",
        kills.len(),
        kills,
        faults.len(),
        faults,
        load.sent()
    );
    eprintln!("{summary}");
    let diff = diff_nodes(&source.masters(), 0, &target.masters(), 0);
    assert!(
        diff.is_empty(),
        "{summary}\n{} differences:\n{}\n{}\n--- the last process ---\n{}",
        diff.len(),
        diff.iter().take(20).cloned().collect::<Vec<_>>().join("\n"),
        logs.borrow().join("\n"),
        sync.log()
    );
    // A full resync only where a refused order guard let a transaction run
    // ahead of its slot's earlier one (shardsync says so in its log).
    let in_logs = |what: &str| {
        logs.borrow()
            .iter()
            .chain(std::iter::once(&sync.log()))
            .map(|log| log.matches(what).count() as u64)
            .sum::<u64>()
    };
    let out_of_order = in_logs("starting this source over with a full sync");
    eprintln!(
        "connections restarted to resend what order guards held back: {}; out of order: {out_of_order}",
        in_logs("their order guard held back")
    );
    let after: u64 = source.masters().iter().map(|m| m.sync_full()).sum();
    assert_eq!(
        after,
        full_syncs + out_of_order,
        "no full resync once the stream ran\n{summary}"
    );
    assert_eq!(
        sync.metric_sum("shardsync_target_resent_non_idempotent_total"),
        0.0
    );
}
