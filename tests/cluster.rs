//! Redis Cluster sources and targets, on real 3-master clusters started by
//! the tests: one shard per source master, routing by slot, cross-slot
//! writes split or rewritten, and a target resharded during the sync.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use harness::cluster::{key_slot, Cluster};
use harness::compare::assert_same_nodes;
use harness::data::{load_all_types, load_all_types_into};
use harness::{wait_for, RedisServer, Shardsync, SHORT};

const BIN: &str = env!("CARGO_BIN_EXE_shardsync");
const LONG: Duration = Duration::from_secs(90);

/// No error reply of these codes reached the target.
fn assert_no_target_errors(sync: &Shardsync, codes: &[&str]) {
    let text = sync.metrics().unwrap();
    for line in text
        .lines()
        .filter(|l| l.starts_with("shardsync_target_errors_total"))
    {
        for code in codes {
            assert!(
                !line.contains(&format!("code=\"{code}\"")),
                "{line}\n--- log ---\n{}",
                sync.log()
            );
        }
    }
}

/// Writes on a cluster source until stopped: same-slot multi-key commands,
/// transactions, counters and lists, spread over every slot.
fn cluster_load(source: &Cluster, stop: Arc<AtomicBool>, rounds: Arc<AtomicU64>) -> JoinHandle<()> {
    let mut c = source.client();
    std::thread::spawn(move || {
        let mut i = 0u64;
        while !stop.load(Ordering::Relaxed) {
            let tag = format!("{{lt{}}}", i % 1009);
            let k = |s: &str| format!("{tag}{s}").into_bytes();
            c.run_on(
                &k("a"),
                &[b"MSET", &k("a"), i.to_string().as_bytes(), &k("b"), b"x"],
            );
            c.run_on(&k("c"), &[b"INCR", &k("c")]);
            c.run_on(&k("l"), &[b"LPUSH", &k("l"), i.to_string().as_bytes()]);
            c.run_on(&k("l"), &[b"LTRIM", &k("l"), b"0", b"20"]);
            c.run_on(
                &k("s"),
                &[b"SADD", &k("s"), (i % 13).to_string().as_bytes()],
            );
            c.run_on(
                &k("z"),
                &[b"ZINCRBY", &k("z"), b"1.5", (i % 7).to_string().as_bytes()],
            );
            c.run_on(&k("h"), &[b"HINCRBY", &k("h"), b"f", b"2"]);
            if i.is_multiple_of(5) {
                c.run_on(&k("a"), &[b"DEL", &k("b"), &k("gone")]);
                c.run_on(&k("u"), &[b"SUNIONSTORE", &k("u"), &k("s"), &k("nothing")]);
                c.run_on(&k("a"), &[b"RENAME", &k("a"), &k("a2")]);
            }
            if i.is_multiple_of(3) {
                c.run_on(&k("t"), &[b"MULTI"]);
                c.run_on(&k("t"), &[b"INCR", &k("t")]);
                c.run_on(&k("t"), &[b"RPUSH", &k("tl"), b"in-tx"]);
                c.run_on(&k("t"), &[b"EXEC"]);
            }
            i += 1;
            rounds.store(i, Ordering::Relaxed);
        }
    })
}

#[test]
fn cluster_to_cluster_copies_everything_under_a_live_load() {
    let source = Cluster::start(3);
    load_all_types_into(&mut source.client());
    harness::data::load_strings_into(&mut source.client(), 5000, "bulk:");
    let target = Cluster::start(3);
    // A different slot layout on the target than on the source.
    target.reshard(0, 2, 700);

    let stop = Arc::new(AtomicBool::new(false));
    let rounds = Arc::new(AtomicU64::new(0));
    let load = cluster_load(&source, stop.clone(), rounds.clone());
    // Any node will do as the seed, on both sides.
    let sync = Shardsync::sync(
        BIN,
        &["--source", &source.url(1), "--target", &target.url(2)],
    );
    wait_for("three shards in /status", SHORT, || {
        sync.status()
            .and_then(|s| s["shards"].as_array().map(|a| a.len()))
            == Some(3)
    });
    let status = sync.status().unwrap();
    let mut sources: Vec<String> = status["shards"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["source"].as_str().unwrap().to_string())
        .collect();
    sources.sort();
    let mut masters: Vec<String> = source.nodes.iter().map(RedisServer::addr).collect();
    masters.sort();
    assert_eq!(sources, masters);

    sync.wait_state("incremental", LONG);
    let before = rounds.load(Ordering::Relaxed);
    wait_for("more writes during incremental", SHORT, || {
        rounds.load(Ordering::Relaxed) > before + 200
    });
    stop.store(true, Ordering::Relaxed);
    load.join().unwrap();
    sync.wait_all_caught_up(&source.masters(), LONG);
    assert_same_nodes(&source.masters(), &target.masters());
    assert_no_target_errors(&sync, &["CROSSSLOT", "MOVED", "ASK"]);

    // `verify` from any node of each side agrees with the harness.
    let done = Shardsync::run(
        BIN,
        "verify",
        &["--source", &source.url(0), "--target", &target.url(1)],
        LONG,
    );
    assert_eq!(done.code(), Some(0), "{}", done.log);
    assert!(done.log.contains(" 0 differences"), "{}", done.log);
}

/// Cross-slot writes only a standalone (or Twemproxy) source can issue.
fn cross_slot_round(con: &mut redis::Connection, i: u64) {
    let q = |con: &mut redis::Connection, args: &[&str]| {
        let mut cmd = redis::cmd(args[0]);
        for a in &args[1..] {
            cmd.arg(*a);
        }
        let _: redis::Value = cmd.query(con).unwrap_or_else(|e| panic!("{args:?}: {e}"));
    };
    let n = |s: &str| format!("{s}:{i}");
    let (a, b, c, d) = (n("a"), n("b"), n("c"), n("d"));
    q(con, &["MSET", &a, "1", &b, "2", &c, "3", &d, "4"]);
    q(con, &["MSETNX", &n("nx1"), "x", &n("nx2"), "y"]);
    q(con, &["DEL", &a, &n("missing"), &b]);
    q(con, &["UNLINK", &c, &n("other")]);
    q(con, &["RENAME", &d, &n("renamed")]);
    q(con, &["SET", &n("rnx"), "v"]);
    q(con, &["RENAMENX", &n("rnx"), &n("rnx2")]);
    q(con, &["SADD", &n("s1"), "m1", "m2", "m3"]);
    q(con, &["SADD", &n("s2"), "m3", "m4"]);
    q(con, &["SMOVE", &n("s1"), &n("s2"), "m1"]);
    q(con, &["SUNIONSTORE", &n("su"), &n("s1"), &n("s2")]);
    q(con, &["SINTERSTORE", &n("si"), &n("s1"), &n("s2")]);
    q(con, &["SDIFFSTORE", &n("sd"), &n("s2"), &n("s1")]);
    q(con, &["ZADD", &n("z1"), "1", "a", "2", "b"]);
    q(con, &["ZADD", &n("z2"), "3", "b", "4", "c"]);
    q(
        con,
        &[
            "ZUNIONSTORE",
            &n("zu"),
            "2",
            &n("z1"),
            &n("z2"),
            "WEIGHTS",
            "1",
            "10",
        ],
    );
    q(
        con,
        &[
            "ZINTERSTORE",
            &n("zi"),
            "2",
            &n("z1"),
            &n("z2"),
            "AGGREGATE",
            "MAX",
        ],
    );
    q(con, &["RPUSH", &n("l1"), "x", "y", "z"]);
    q(con, &["RPOPLPUSH", &n("l1"), &n("l2")]);
    q(con, &["LMOVE", &n("l1"), &n("l2"), "LEFT", "RIGHT"]);
    q(con, &["SET", &n("b1"), "foo"]);
    q(con, &["SET", &n("b2"), "bar"]);
    q(con, &["BITOP", "OR", &n("bor"), &n("b1"), &n("b2")]);
    q(con, &["PFADD", &n("h1"), "a", "b"]);
    q(con, &["PFADD", &n("h2"), "c"]);
    q(con, &["PFMERGE", &n("hm"), &n("h1"), &n("h2")]);
    q(con, &["COPY", &n("b1"), &n("bcopy")]);
    // A transaction across slots, and one within a slot.
    q(con, &["MULTI"]);
    q(con, &["SET", &n("tx1"), "1"]);
    q(con, &["INCR", &n("tx2")]);
    q(con, &["MSET", &n("tx3"), "a", &n("tx4"), "b"]);
    q(con, &["EXEC"]);
    let tag = format!("{{tag{i}}}");
    q(con, &["MULTI"]);
    q(con, &["SET", &format!("{tag}x"), "1"]);
    q(con, &["RENAME", &format!("{tag}x"), &format!("{tag}y")]);
    q(con, &["EXEC"]);
}

#[test]
fn standalone_to_cluster_splits_and_rewrites_cross_slot_writes() {
    let source = RedisServer::start();
    // A cluster target has only database 0.
    let mut sink = harness::data::ServerSink::new(&source);
    load_all_types_into(&mut OnlyDb0(&mut sink));
    let mut con = source.client();
    for i in 0..20 {
        cross_slot_round(&mut con, i);
    }
    // Cross-slot writes keep coming during the full sync and after it.
    let stop = Arc::new(AtomicBool::new(false));
    let rounds = Arc::new(AtomicU64::new(20));
    let load = {
        let (stop, rounds, mut con) = (stop.clone(), rounds.clone(), source.client());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let i = rounds.fetch_add(1, Ordering::Relaxed);
                cross_slot_round(&mut con, i);
            }
        })
    };
    let target = Cluster::start(3);
    let sync = Shardsync::sync(
        BIN,
        &["--source", &source.url(), "--target", &target.url(0)],
    );
    sync.wait_state("incremental", LONG);
    let before = rounds.load(Ordering::Relaxed);
    wait_for("cross-slot rounds during incremental", SHORT, || {
        rounds.load(Ordering::Relaxed) > before + 30
    });
    stop.store(true, Ordering::Relaxed);
    load.join().unwrap();
    sync.wait_caught_up(&source, LONG);
    assert_same_nodes(&[&source], &target.masters());
    assert_no_target_errors(&sync, &["CROSSSLOT"]);
    assert!(sync.metric_sum("shardsync_commands_split_total") > 0.0);
    assert!(sync.metric_sum("shardsync_commands_rewritten_total") > 0.0);
    assert!(sync.metric_sum("shardsync_transactions_split_total") > 0.0);
    assert_eq!(
        sync.metric_sum("shardsync_commands_unsupported_total"),
        0.0,
        "{}",
        sync.log()
    );
}

/// Keeps only database 0 of a dataset.
struct OnlyDb0<'a>(&'a mut dyn harness::data::Sink);

impl harness::data::Sink for OnlyDb0<'_> {
    fn run(&mut self, db: u32, args: &[&[u8]]) {
        if db == 0 {
            self.0.run(0, args);
        }
    }
}

#[test]
fn a_target_resharded_during_the_sync_loses_nothing() {
    let source = Cluster::start(3);
    harness::data::load_strings_into(&mut source.client(), 20_000, "k:");
    let mut target = Cluster::start(3);
    let stop = Arc::new(AtomicBool::new(false));
    let rounds = Arc::new(AtomicU64::new(0));
    let load = cluster_load(&source, stop.clone(), rounds.clone());
    let sync = Shardsync::sync(
        BIN,
        &["--source", &source.url(0), "--target", &target.url(0)],
    );
    sync.wait_state("incremental", LONG);

    // Move slots between the target's masters while writes flow, then add a
    // fourth master and move slots to it.
    target.reshard(0, 1, 300);
    target.reshard(2, 0, 200);
    let extra = Cluster::node(RedisServer::config());
    target.add_master(extra);
    target.reshard(1, 3, 250);

    let before = rounds.load(Ordering::Relaxed);
    wait_for("writes after the resharding", SHORT, || {
        rounds.load(Ordering::Relaxed) > before + 100
    });
    // Keys over every slot: some land in the slots the new master serves,
    // which shardsync's map still gives to their old owner.
    harness::data::load_strings_into(&mut source.client(), 3000, "after:");
    stop.store(true, Ordering::Relaxed);
    load.join().unwrap();
    sync.wait_all_caught_up(&source.masters(), LONG);
    assert_same_nodes(&source.masters(), &target.masters());
    assert_no_target_errors(&sync, &["MOVED", "ASK", "CROSSSLOT"]);
    let status = sync.status().unwrap();
    assert_eq!(
        status["targets"].as_array().unwrap().len(),
        4,
        "a writer for the new master: {status}"
    );
    assert!(
        sync.metric_sum("shardsync_barriers_total") > 0.0,
        "slot moves were followed"
    );
}

#[test]
fn a_standalone_source_with_several_databases_needs_a_choice() {
    let source = RedisServer::start();
    load_all_types(&source); // keys in databases 0, 1 and 3
    let target = Cluster::start(3);
    let refused = Shardsync::run(
        BIN,
        "sync",
        &["--source", &source.url(), "--target", &target.url(0)],
        SHORT,
    );
    assert_eq!(refused.code(), Some(3), "{}", refused.log);
    assert!(refused.log.contains("only database 0"), "{}", refused.log);

    // Database 3 alone, into the cluster's database 0.
    let sync = Shardsync::sync(
        BIN,
        &[
            "--source",
            &source.url(),
            "--target",
            &target.url(0),
            "--db",
            "3",
            "--db-map",
            "3:0",
        ],
    );
    sync.wait_caught_up(&source, LONG);
    let diffs = harness::compare::diff_nodes(&[&source], 3, &target.masters(), 0);
    assert!(diffs.is_empty(), "{diffs:?}");
    assert_eq!(target.dbsize(), source.dbsize(3));
}

#[test]
fn the_harness_slot_function_agrees_with_the_server() {
    // The comparator and loaders route with their own CRC16; check it
    // against CLUSTER KEYSLOT.
    let cluster = Cluster::start(3);
    for key in ["foo", "bar", "{user1}:a", "", "a{b}c", "x{}y"] {
        let slot: i64 = cluster.nodes[0].cmd(&["CLUSTER", "KEYSLOT", key]);
        assert_eq!(key_slot(key.as_bytes()) as i64, slot, "{key}");
    }
}

#[test]
fn sigterm_drains_a_cluster_task_and_exits_zero() {
    // Writers hold the shared slot map; the map must not keep their queues
    // open, or a drain never ends.
    let source = Cluster::start(3);
    harness::data::load_strings_into(&mut source.client(), 2000, "d:");
    let target = Cluster::start(3);
    let mut sync = Shardsync::sync(
        BIN,
        &["--source", &source.url(0), "--target", &target.url(0)],
    );
    sync.wait_all_caught_up(&source.masters(), LONG);
    let done = sync.terminate(SHORT);
    assert_eq!(done.code(), Some(0), "{}", done.log);
    assert!(
        done.log.contains("every command read was applied"),
        "{}",
        done.log
    );
}

/// A target master killed (-9) under live writes, its replica frozen just
/// before (so writes the master acknowledged never reach it): the replica
/// takes over after the cluster's node timeout, and shardsync follows it —
/// the writer asks the other nodes who serves its slots now, and the task
/// starts again from the markers the replica holds (as far as it holds the
/// data). The target ends identical.
#[test]
fn a_target_master_that_dies_is_followed_to_its_promoted_replica() {
    // A backlog that outlasts the failover (node timeout + election).
    let source = Cluster::start_with(3, RedisServer::config().arg("repl-backlog-size", &["64mb"]));
    harness::data::load_strings_into(&mut source.client(), 20_000, "k:");
    let mut target = Cluster::start(3);
    target.add_replica(0, RedisServer::config());
    let dead = target.nodes[0].addr();
    let mut load = harness::load::Load::start_cluster(&source, 17, 100);
    let sync = Shardsync::sync(
        BIN,
        &["--source", &source.url(0), "--target", &target.url(1)],
    );
    sync.wait_state("incremental", LONG);
    let before = load.sent();
    wait_for("writes", SHORT, || load.sent() > before + 3000);
    // Every shard's node marker on the master says a stream position (the
    // full sync's end applied there), and the replica holds it: what the
    // replica has is resumable. (Frozen before that, it would hold only the
    // "full sync under way" markers, and the task would rightly start over.)
    wait_for("each shard's applied marker on the master", LONG, || {
        let values: Vec<String> = target.nodes[0]
            .internal_keys(0)
            .iter()
            .filter(|k| k.ends_with(b":node"))
            .map(|k| target.nodes[0].cmd(&["GET", std::str::from_utf8(k).unwrap()]))
            .collect();
        values.len() == 3 && values.iter().all(|v| !v.ends_with(" full"))
    });
    let written = target.nodes[0].master_repl_offset();
    let replica = target.nodes.len() - 1;
    wait_for("the replica to hold the markers", LONG, || {
        target.nodes[replica]
            .info_field("slave_repl_offset")
            .and_then(|v| v.parse::<u64>().ok())
            .is_some_and(|o| o >= written)
    });

    // The replica falls behind for a moment (frozen): what the master
    // acknowledges meanwhile never reaches it, and dies with the master.
    target.nodes[replica].signal(libc::SIGSTOP);
    let before = load.sent();
    wait_for("writes the replica misses", SHORT, || {
        load.sent() > before + 2000
    });
    target.nodes[0].signal(libc::SIGKILL);
    target.nodes[replica].signal(libc::SIGCONT);
    let promoted = target.fail_master(0);
    let now = target.nodes[promoted].addr();
    let before = load.sent();
    wait_for("writes after the failover", LONG, || {
        load.sent() > before + 3000
    });
    load.stop();
    sync.wait_all_caught_up(&source.masters(), LONG);
    assert_same_nodes(&source.masters(), &target.masters());
    let log = sync.log();
    assert!(
        log.contains(&format!("{now} serves its slots now (a failover)")),
        "{log}"
    );
    assert!(
        log.contains("starts again from the target's markers"),
        "{log}"
    );
    assert_eq!(
        (
            log.matches("full sync started").count(),
            log.matches("partial resync accepted").count()
        ),
        (3, 3),
        "one full sync per shard at the start; after the failover each resumes\n{log}"
    );
    let status = sync.status().unwrap();
    let targets: Vec<String> = status["targets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["target"].as_str().unwrap_or("").to_string())
        .collect();
    assert!(targets.contains(&now), "{status}");
    assert!(!targets.contains(&dead), "{status}");
    assert!(
        status["targets"]
            .as_array()
            .unwrap()
            .iter()
            .all(|t| t["connected"] == true),
        "{status}"
    );
}
