//! One source, several targets (`--target` given more than once): each
//! target has its own shard workers, writers, backpressure, status entries,
//! metrics and checkpoints, so a paused target holds up nobody but itself
//! (its backlog waits on disk) and catches up once it is back.

use std::time::{Duration, Instant};

use harness::cluster::Cluster;
use harness::compare::{assert_same, assert_same_nodes};
use harness::{wait_for, wait_until, RedisServer, Shardsync, SHORT};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_shardsync");

/// The status entries of the shards writing to `target`.
fn shards_of(status: &Value, target: &str) -> Vec<Value> {
    status["shards"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|s| s["target"] == target)
                .cloned()
                .collect()
        })
        .unwrap_or_default()
}

/// Whether the shards writing to `target` applied `offset` of `source`.
fn applied(sync: &Shardsync, source: &RedisServer, target: &str, offset: u64) -> bool {
    sync.status().is_some_and(|s| {
        shards_of(&s, target).iter().any(|sh| {
            sh["source"] == source.addr()
                && sh["state"] == "incremental"
                && sh["applied_offset"].as_u64() >= Some(offset)
        })
    })
}

fn wait_all_applied(sync: &Shardsync, source: &RedisServer, targets: &[&str], timeout: Duration) {
    let offset = source.master_repl_offset();
    let ok = wait_until(timeout, || {
        targets.iter().all(|t| applied(sync, source, t, offset))
    });
    assert!(
        ok,
        "not every target applied offset {offset}; status {:?}\n--- log ---\n{}",
        sync.status(),
        sync.log()
    );
}

/// Samples of `name` whose labels mention `labels`.
fn metric(sync: &Shardsync, name: &str, labels: &str) -> Vec<f64> {
    sync.metric_samples(name)
        .into_iter()
        .filter(|(n, _)| n.contains(labels))
        .map(|(_, v)| v)
        .collect()
}

fn set(server: &RedisServer, key: &str, value: &str) {
    let _: () = redis::cmd("SET")
        .arg(key)
        .arg(value)
        .query(&mut server.client())
        .unwrap();
}

fn get(server: &RedisServer, key: &str) -> Option<String> {
    server.cmd(&["GET", key])
}

/// `n` pipelined writes of `size` bytes, with a cross-slot MSET now and
/// then (split per slot on a cluster target, whole elsewhere).
fn write_burst(server: &RedisServer, prefix: &str, n: usize, size: usize) {
    let mut con = server.client();
    let value = vec![b'v'; size];
    for chunk in (0..n).collect::<Vec<_>>().chunks(5000) {
        let mut pipe = redis::pipe();
        for &i in chunk {
            pipe.cmd("SET")
                .arg(format!("{prefix}{i}"))
                .arg(&value)
                .ignore();
            if i % 1000 == 0 {
                pipe.cmd("MSET")
                    .arg(format!("{prefix}m{i}:a"))
                    .arg(i)
                    .arg(format!("{prefix}m{i}:b"))
                    .arg(i + 1)
                    .ignore();
                pipe.cmd("INCR").arg(format!("{prefix}counter")).ignore();
            }
        }
        pipe.query::<()>(&mut con).unwrap();
    }
}

#[test]
fn every_target_gets_the_stream_and_a_paused_one_holds_up_only_itself() {
    let source = RedisServer::start();
    harness::data::load_strings(&source, 5000, "base:");
    let a = RedisServer::start();
    let b = RedisServer::start();
    let c = Cluster::start(3);
    let c_seed = c.masters()[0].addr();
    let sync = Shardsync::sync(
        BIN,
        &[
            "--source",
            &source.url(),
            "--target",
            &a.url(),
            "--target",
            &b.url(),
            "--target",
            &c.url(0),
            "--spill-memory",
            "1MB",
        ],
    );
    let targets = [a.addr(), b.addr(), c_seed.clone()];
    let names: Vec<&str> = targets.iter().map(String::as_str).collect();
    sync.wait_state("incremental", SHORT);
    // Once a write has come through on every link, the stream flows.
    set(&source, "warm", "1");
    wait_all_applied(&sync, &source, &names, SHORT);
    let status = sync.status().unwrap();
    for t in &names {
        assert_eq!(
            shards_of(&status, t).len(),
            1,
            "one shard for {t}: {status}"
        );
    }
    assert_eq!(
        source.info_field("connected_slaves").as_deref(),
        Some("3"),
        "one replication link per target"
    );

    // B stops applying writes; a burst arrives. A and C get it (and the
    // marker after it) while B is still paused; B's share waits, on disk
    // beyond 1 MB.
    let pause_ms = 12_000;
    let _: () = b.cmd(&["CLIENT", "PAUSE", &pause_ms.to_string(), "WRITE"]);
    let paused_at = Instant::now();
    write_burst(&source, "burst:", 60_000, 200);
    set(&source, "marker", "after-burst");
    wait_for("A and C to get the marker", SHORT, || {
        get(&a, "marker").is_some() && {
            let mut cc = c.client();
            cc.run_on(b"marker", &[b"GET", b"marker"]) != redis::Value::Nil
        }
    });
    let waited = paused_at.elapsed();
    assert!(
        waited < Duration::from_millis(pause_ms - 2000),
        "A and C caught up only after {waited:?}, near the end of B's pause"
    );
    assert_eq!(get(&b, "marker"), None, "B is paused; nothing was applied");
    let offset = source.master_repl_offset();
    assert!(
        !applied(&sync, &source, &b.addr(), offset),
        "B's shard reports everything applied while B is paused"
    );
    assert!(applied(&sync, &source, &a.addr(), offset));
    let waiting = metric(
        &sync,
        "shardsync_target_overflow_spilled_bytes_total",
        &b.addr(),
    );
    assert!(
        waiting.iter().sum::<f64>() > 1e6,
        "B's backlog went to disk: {waiting:?}"
    );

    // B comes back and catches up; everyone holds what the source holds.
    wait_all_applied(&sync, &source, &names, Duration::from_secs(60));
    assert_eq!(get(&b, "marker").as_deref(), Some("after-burst"));
    assert_same(&source, &a);
    assert_same(&source, &b);
    assert_same_nodes(&[&source], &c.masters());
    eprintln!(
        "one-to-many: A and C had the burst after {waited:?} while B was paused; B spilled {:.1} MB",
        waiting.iter().sum::<f64>() / 1e6
    );

    // Per-shard metrics name their target; the source link never dropped.
    for t in &names {
        let applied = metric(
            &sync,
            "shardsync_applied_offset_bytes",
            &format!("target=\"{t}\""),
        );
        assert_eq!(applied.len(), 1, "applied offset for {t}");
    }
    assert_eq!(sync.metric_sum("shardsync_source_reconnects_total"), 0.0);
    assert_eq!(source.info_field("sync_partial_ok").as_deref(), Some("0"));
}

#[test]
fn several_targets_resume_from_their_own_checkpoints() {
    let source = RedisServer::start();
    harness::data::load_strings(&source, 2000, "k:");
    let a = RedisServer::start();
    let b = RedisServer::start();
    let dir = harness::server::TempDir::new("multi-ckpt");
    let ckpt = dir.path().to_str().unwrap().to_string();
    let args = [
        "--source",
        &source.url(),
        "--target",
        &a.url(),
        "--target",
        &b.url(),
        "--checkpoint-dir",
        &ckpt,
    ];
    let mut sync = Shardsync::sync(BIN, &args);
    let names = [a.addr(), b.addr()];
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    sync.wait_state("incremental", SHORT);
    set(&source, "warm", "1");
    wait_all_applied(&sync, &source, &names, SHORT);
    let done = sync.terminate(SHORT);
    assert_eq!(done.code(), Some(0), "{}", sync.log());
    let first_log = sync.log();
    for t in &names {
        let sub = dir.path().join(format!("to-{}", t.replace(':', "_")));
        assert!(
            std::fs::read_dir(&sub).is_ok_and(|mut d| d.next().is_some()),
            "no checkpoint in {}",
            sub.display()
        );
    }

    // Written while nothing runs: both targets get it by partial resync.
    set(&source, "while-down", "x");
    let sync = Shardsync::sync(BIN, &args);
    wait_all_applied(&sync, &source, &names, SHORT);
    assert_eq!(get(&a, "while-down").as_deref(), Some("x"));
    assert_eq!(get(&b, "while-down").as_deref(), Some("x"));
    assert_eq!(
        source.info_field("sync_partial_ok").as_deref(),
        Some("2"),
        "{first_log}\n--- second run ---\n{}",
        sync.log()
    );
    assert!(
        sync.log().matches("partial resync").count() >= 2,
        "{}",
        sync.log()
    );
    assert_same(&source, &a);
    assert_same(&source, &b);
}

#[test]
fn the_same_target_twice_is_refused() {
    let source = RedisServer::start();
    let a = RedisServer::start();
    let done = Shardsync::run(
        BIN,
        "sync",
        &[
            "--source",
            &source.url(),
            "--target",
            &a.url(),
            "--target",
            &a.url(),
        ],
        SHORT,
    );
    assert_eq!(done.code(), Some(3), "{}", done.log);
    assert!(
        done.log
            .contains(&format!("{} (target {}) is also", a.addr(), a.addr())),
        "{}",
        done.log
    );
}
