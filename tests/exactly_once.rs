//! Exactly once: with writes that double when applied twice (INCR, APPEND,
//! LPUSH, HINCRBY, ...) running throughout, shardsync is killed, its target
//! links are cut, and it is started again with the same command: the target
//! ends identical to the source, with no checkpoint directory and no
//! `--on-conflict`.

use std::time::Duration;

use harness::compare::assert_same;
use harness::load::Load;
use harness::{wait_for, RedisServer, Shardsync, SHORT};

const BIN: &str = env!("CARGO_BIN_EXE_shardsync");
const LONG: Duration = Duration::from_secs(120);

fn metric(sync: &Shardsync, prefix: &str) -> f64 {
    sync.metric_sum(prefix)
}

fn kill9(sync: &mut Shardsync) {
    sync.signal(libc::SIGKILL);
    let done = sync.wait_exit(SHORT);
    assert_eq!(done.code(), None, "killed by the signal");
}

#[test]
fn kill_9_during_replay_and_a_restart_without_flags_apply_everything_once() {
    // A backlog that holds what is written while shardsync is down (the
    // default 1 MB lasted under half a second of this load in CI, and the
    // last restart needed a full sync).
    let source = RedisServer::config()
        .arg("repl-backlog-size", &["64mb"])
        .start();
    let target = RedisServer::start();
    let args = ["--source", &source.url(), "--target", &target.url()];
    let mut load = Load::start(&source, 7, 200);
    for round in 0..3 {
        let mut sync = Shardsync::sync(BIN, &args);
        sync.wait_state("incremental", LONG);
        let before = load.sent();
        wait_for("writes to be replayed", SHORT, || {
            load.sent() > before + 2000
        });
        if round > 0 {
            assert!(
                sync.log().contains("partial resync accepted"),
                "round {round} did not resume:\n{}",
                sync.log()
            );
            assert_eq!(metric(&sync, "shardsync_full_syncs_total"), 0.0);
        }
        kill9(&mut sync);
        // Writes go on while shardsync is down.
        let before = load.sent();
        wait_for("writes while down", SHORT, || load.sent() > before + 1000);
    }
    let sync = Shardsync::sync(BIN, &args);
    sync.wait_state("incremental", LONG);
    load.stop();
    sync.wait_caught_up(&source, LONG);
    assert!(
        sync.log().contains("partial resync accepted"),
        "{}",
        sync.log()
    );
    assert_eq!(source.sync_full(), 1, "one full sync in all, the first");
    assert_same(&source, &target);
}

#[test]
fn target_links_cut_under_load_lose_nothing_and_repeat_nothing() {
    let source = RedisServer::start();
    let target = RedisServer::start();
    let sync = Shardsync::sync(BIN, &["--source", &source.url(), "--target", &target.url()]);
    sync.wait_state("incremental", LONG);
    let mut load = Load::start(&source, 11, 300);
    for _ in 0..8 {
        let before = load.sent();
        wait_for("writes", SHORT, || load.sent() > before + 1500);
        // Our writer's connection, cut while batches are in flight.
        target.kill_clients();
    }
    load.stop();
    sync.wait_caught_up(&source, LONG);
    assert!(metric(&sync, "shardsync_target_reconnects_total") >= 1.0);
    assert_eq!(
        metric(&sync, "shardsync_target_resent_non_idempotent_total"),
        0.0,
        "{}",
        sync.log()
    );
    assert_same(&source, &target);
}

#[test]
fn kill_9_during_the_full_sync_then_the_same_command_continues() {
    let source = RedisServer::config()
        .arg("enable-debug-command", &["yes"])
        .start();
    source.cmd::<()>(&["DEBUG", "POPULATE", "300000", "k", "50"]);
    let target = RedisServer::start();
    let args = ["--source", &source.url(), "--target", &target.url()];
    let mut first = Shardsync::sync(BIN, &args);
    wait_for("keys on the target", LONG, || target.dbsize(0) > 1000);
    kill9(&mut first);
    assert!(target.dbsize(0) < 300_000, "killed during the full sync");
    // Keys the first attempt may have copied, gone from the source while
    // shardsync is down: they must not survive on the target.
    let mut con = source.client();
    for i in 0..2000 {
        let _: i64 = redis::cmd("DEL")
            .arg(format!("k:{i}"))
            .query(&mut con)
            .unwrap();
    }
    let mut load = Load::start(&source, 3, 100);
    // No --on-conflict: the target's marker says the keys are this task's.
    let second = Shardsync::sync(BIN, &args);
    second.wait_state("incremental", LONG);
    assert!(
        second.log().contains("an earlier full sync of") && second.log().contains("did not finish"),
        "{}",
        second.log()
    );
    load.stop();
    second.wait_caught_up(&source, LONG);
    assert_same(&source, &target);
}

#[test]
fn a_full_resync_after_the_backlog_is_lost_leaves_no_deleted_key() {
    let source = RedisServer::config()
        .arg("repl-backlog-size", &["16kb"])
        .start();
    let target = RedisServer::start();
    let mut con = source.client();
    for i in 0..3000 {
        let _: () = redis::cmd("SET")
            .arg(format!("old:{i}"))
            .arg(i)
            .query(&mut con)
            .unwrap();
    }
    let args = ["--source", &source.url(), "--target", &target.url()];
    let mut first = Shardsync::sync(BIN, &args);
    first.wait_caught_up(&source, SHORT);
    let done = first.terminate(SHORT);
    assert_eq!(done.code(), Some(0), "{}", done.log);
    // While shardsync is away: more writes than the backlog holds, and
    // deletions of keys the target has.
    for i in 0..1500 {
        let _: i64 = redis::cmd("DEL")
            .arg(format!("old:{i}"))
            .query(&mut con)
            .unwrap();
        let _: () = redis::cmd("SET")
            .arg(format!("new:{i}"))
            .arg("x".repeat(100))
            .query(&mut con)
            .unwrap();
    }
    let second = Shardsync::sync(BIN, &args);
    second.wait_caught_up(&source, LONG);
    assert_eq!(source.sync_full(), 2, "the backlog was lost: a full resync");
    assert!(
        second.log().contains("emptying the copied databases"),
        "{}",
        second.log()
    );
    assert_same(&source, &target);
}

#[test]
fn without_exactly_once_no_marker_is_written_and_the_precheck_says_what_that_costs() {
    let source = RedisServer::start();
    let target = RedisServer::start();
    let _: () = source.cmd(&["SET", "a", "1"]);
    let sync = Shardsync::sync(
        BIN,
        &[
            "--source",
            &source.url(),
            "--target",
            &target.url(),
            "--no-exactly-once",
        ],
    );
    sync.wait_caught_up(&source, SHORT);
    assert!(
        sync.log().contains("--no-exactly-once: commands resent"),
        "{}",
        sync.log()
    );
    assert!(target.internal_keys(0).is_empty(), "no marker");
    assert_same(&source, &target);

    // With it, one marker per source master, in database 0 (where the
    // source keeps its heartbeat: both sides count one key more).
    let target2 = RedisServer::start();
    let with = Shardsync::sync(
        BIN,
        &["--source", &source.url(), "--target", &target2.url()],
    );
    with.wait_caught_up(&source, SHORT);
    let markers: Vec<String> = target2
        .internal_keys(0)
        .into_iter()
        .map(|k| String::from_utf8_lossy(&k).into_owned())
        .filter(|k| k.starts_with("shardsync:applied:"))
        .collect();
    assert_eq!(markers.len(), 1, "{markers:?}");
    // The source holds both tasks' heartbeats; the second task copied the
    // first one's (another task's heartbeat is data to it) and added its
    // marker.
    assert_eq!(target2.raw_dbsize(0), source.raw_dbsize(0));
}

#[test]
fn status_and_verify_count_internal_keys_so_that_dbsize_reconciles() {
    let source = RedisServer::start();
    let target = RedisServer::start();
    harness::data::load_strings(&source, 500, "k");
    let args = ["--source", &source.url(), "--target", &target.url()];
    let sync = Shardsync::sync(BIN, &args);
    sync.wait_state("incremental", LONG);
    wait_for("the heartbeat to come back", SHORT, || {
        sync.status()
            .is_some_and(|s| s["internal_keys"]["source"].as_u64() == Some(1))
    });
    sync.wait_caught_up(&source, LONG);
    let status = sync.status().expect("status");
    let internal = &status["internal_keys"];
    let (on_source, on_target) = (
        internal["source"].as_u64().unwrap(),
        internal["target"].as_u64().unwrap(),
    );
    assert_eq!((on_source, on_target), (1, 1), "{status}");
    assert_eq!(status["shards"][0]["internal_keys"]["target"], 1);
    // DBSIZE minus shardsync's own keys is the same on both sides.
    assert_eq!(source.raw_dbsize(0) - on_source, 500);
    assert_eq!(target.raw_dbsize(0) - on_target, 500);
    assert_eq!(source.internal_keys(0).len() as u64, on_source);
    assert_eq!(target.internal_keys(0).len() as u64, on_target);
    let done = Shardsync::run(BIN, "verify", &args, SHORT);
    assert_eq!(done.code(), Some(0), "{}", done.log);
    assert!(
        done.log.contains(
            "compared 500 keys: 0 differences (left out: shardsync's own keys, 1 on the source, 1 on the target)"
        ),
        "{}",
        done.log
    );
}

#[test]
fn a_cluster_source_full_resync_into_a_shared_target_leaves_no_deleted_key() {
    use harness::cluster::Cluster;
    use harness::compare::assert_same_nodes;
    let source = Cluster::start_with(3, RedisServer::config().arg("repl-backlog-size", &["16kb"]));
    let target = RedisServer::start();
    let mut con = source.client();
    let set = |con: &mut harness::cluster::ClusterClient, key: &str, value: &str| {
        con.run_on(key.as_bytes(), &[b"SET", key.as_bytes(), value.as_bytes()]);
    };
    for i in 0..3000 {
        set(&mut con, &format!("old:{i}"), &i.to_string());
    }
    let args = ["--source", &source.url(0), "--target", &target.url()];
    let mut first = Shardsync::sync(BIN, &args);
    for m in source.masters() {
        first.wait_caught_up(m, LONG);
    }
    kill9(&mut first);
    // While shardsync is away: more writes than any master's backlog
    // holds, and deletions of keys the target has, on every master.
    let fat = "x".repeat(100);
    for i in 0..1500 {
        let key = format!("old:{i}");
        con.run_on(key.as_bytes(), &[b"DEL", key.as_bytes()]);
        set(&mut con, &format!("new:{i}"), &fat);
    }
    let syncs_before: u64 = source.masters().iter().map(|m| m.sync_full()).sum();
    let second = Shardsync::sync(BIN, &args);
    for m in source.masters() {
        second.wait_caught_up(m, LONG);
    }
    let syncs: u64 = source.masters().iter().map(|m| m.sync_full()).sum();
    assert_eq!(
        syncs - syncs_before,
        3,
        "every backlog was lost: 3 full resyncs"
    );
    assert_eq!(
        second
            .log()
            .matches("deleted the target's keys in this shard's slots")
            .count(),
        3,
        "{}",
        second.log()
    );
    assert_same_nodes(&source.masters(), &[&target]);
}

#[test]
fn cluster_to_cluster_kill_9_and_cut_links_apply_everything_once() {
    use harness::cluster::Cluster;
    use harness::compare::assert_same_nodes;
    let source = Cluster::start_with(3, RedisServer::config().arg("repl-backlog-size", &["64mb"]));
    let target = Cluster::start(3);
    let args = ["--source", &source.url(0), "--target", &target.url(0)];
    let mut load = Load::start_cluster(&source, 5, 100);
    let writes = |load: &Load, n: u64| {
        let before = load.sent();
        wait_for("writes", SHORT, || load.sent() > before + n);
    };
    for round in 0..3 {
        let mut sync = Shardsync::sync(BIN, &args);
        sync.wait_state("incremental", LONG);
        writes(&load, 1500);
        if round > 0 {
            assert_eq!(
                sync.log().matches("partial resync accepted").count(),
                3,
                "round {round}: every shard resumes\n{}",
                sync.log()
            );
            assert_eq!(metric(&sync, "shardsync_full_syncs_total"), 0.0);
        }
        // Every target node drops our writers' connections under load.
        for m in target.masters() {
            m.kill_clients();
        }
        writes(&load, 1500);
        kill9(&mut sync);
        writes(&load, 1000);
    }
    let sync = Shardsync::sync(BIN, &args);
    sync.wait_state("incremental", LONG);
    load.stop();
    for m in source.masters() {
        sync.wait_caught_up(m, LONG);
    }
    let full: u64 = source.masters().iter().map(|m| m.sync_full()).sum();
    assert_eq!(
        full,
        3,
        "one full sync per master in all, the first\n{}",
        sync.log()
    );
    assert_eq!(
        metric(&sync, "shardsync_target_resent_non_idempotent_total"),
        0.0
    );
    assert_same_nodes(&source.masters(), &target.masters());
}

#[test]
fn standalone_to_cluster_cross_slot_rewrites_apply_once_across_kills() {
    use harness::cluster::Cluster;
    use harness::compare::assert_same_nodes;
    // RPOPLPUSH, LMOVE and BITOP of the load span slots on the target:
    // they are rewritten (pop and push, colocated copies), and kills land
    // in the middle of them.
    let source = RedisServer::config()
        .arg("repl-backlog-size", &["64mb"])
        .start();
    let target = Cluster::start(3);
    let args = ["--source", &source.url(), "--target", &target.url(0)];
    let mut load = Load::start(&source, 13, 50);
    for round in 0..4 {
        let mut sync = Shardsync::sync(BIN, &args);
        sync.wait_state("incremental", LONG);
        let before = load.sent();
        wait_for("writes", SHORT, || load.sent() > before + 500);
        if round > 0 {
            assert!(
                sync.log().contains("partial resync accepted"),
                "{}",
                sync.log()
            );
        }
        if round == 0 {
            wait_for("cross-slot commands to be rewritten", SHORT, || {
                metric(&sync, "shardsync_commands_rewritten_total") > 0.0
            });
        }
        kill9(&mut sync);
        let before = load.sent();
        wait_for("writes while down", SHORT, || load.sent() > before + 300);
    }
    let sync = Shardsync::sync(BIN, &args);
    sync.wait_state("incremental", LONG);
    load.stop();
    sync.wait_caught_up(&source, LONG);
    assert_eq!(source.sync_full(), 1, "one full sync in all, the first");
    assert_same_nodes(&[&source], &target.masters());
}

/// A script that keeps the server busy for `ARGV[1]` ms (other clients get
/// BUSY once `lua-time-limit` has passed).
const BUSY_FOR: &str = "local function us(t) return tonumber(t[1]) * 1000000 + tonumber(t[2]) end \
    local start = us(redis.call('TIME')) \
    while us(redis.call('TIME')) - start < tonumber(ARGV[1]) * 1000 do end";

/// A target that refuses writes for a moment and then takes them again
/// (BUSY while a long script runs; CLUSTERDOWN, LOADING and OOM come and go
/// the same way): the batches pipelined behind a refused one must not run
/// ahead of it once the refusals stop. Their order guards hold them back;
/// the target ends identical, without a second full sync.
#[test]
fn a_target_that_refuses_writes_for_a_moment_never_applies_them_out_of_order() {
    const ROUNDS: u64 = 150;
    let source = RedisServer::start();
    let target = RedisServer::config().arg("lua-time-limit", &["20"]).start();
    let sync = Shardsync::sync(BIN, &["--source", &source.url(), "--target", &target.url()]);
    sync.wait_state("incremental", LONG);
    let mut load = Load::start(&source, 13, 300);
    // Refusals for 1 to 4 ms after the threshold: they stop while batches
    // sent behind the first refused one are still arriving.
    for round in 0..ROUNDS {
        let before = load.sent();
        wait_for("writes", SHORT, || load.sent() > before + 300);
        let ms = 21 + round % 4;
        target.cmd::<()>(&["EVAL", BUSY_FOR, "0", &ms.to_string()]);
    }
    load.stop();
    sync.wait_caught_up(&source, LONG);
    eprintln!(
        "busy periods: {ROUNDS}; refusals seen: {}; transactions held back by their guard: {}",
        sync.log().matches("BUSY").count(),
        metric(&sync, "shardsync_target_guard_discards_total")
    );
    assert!(
        sync.log().contains("BUSY"),
        "the target never refused a write\n{}",
        sync.log()
    );
    assert_same(&source, &target);
    let out_of_order = metric(&sync, "shardsync_target_out_of_order_total");
    assert_eq!(
        source.sync_full() as f64,
        1.0 + out_of_order,
        "a full resync only where a refused guard let a transaction through\n{}",
        sync.log()
    );
}
