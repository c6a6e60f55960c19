//! Full sync against real Redis 7.0 servers: every data type arrives
//! identical (type, value, expiry) over both RDB transfer forms, and the
//! status endpoint shows the sync's progress.

use std::time::Duration;

use harness::compare::assert_same;
use harness::data::{load_all_types, load_strings};
use harness::shardsync::parse_prometheus;
use harness::{wait_for, RedisServer, Shardsync, SHORT};

const BIN: &str = env!("CARGO_BIN_EXE_shardsync");

fn sync_and_compare(source: RedisServer) {
    load_all_types(&source);
    let target = RedisServer::start();
    let mut sync = Shardsync::sync(BIN, &["--source", &source.url(), "--target", &target.url()]);
    sync.wait_caught_up(&source, SHORT);
    assert_same(&source, &target);

    let done = sync.terminate(SHORT);
    assert_eq!(done.code(), Some(0), "{}", done.log);
}

#[test]
fn diskless_full_sync_copies_every_type() {
    sync_and_compare(RedisServer::start());
}

#[test]
fn disk_based_full_sync_copies_every_type() {
    let source = RedisServer::config().disk_sync().start();
    sync_and_compare(source);
}

#[test]
fn the_log_says_which_transfer_form_was_used() {
    for (source, form) in [
        (RedisServer::start(), "diskless"),
        (RedisServer::config().disk_sync().start(), "disk"),
    ] {
        load_strings(&source, 100, "k:");
        let target = RedisServer::start();
        let sync = Shardsync::sync(BIN, &["--source", &source.url(), "--target", &target.url()]);
        sync.wait_caught_up(&source, SHORT);
        let log = sync.log();
        assert!(
            log.contains(&format!("transfer=\"{form}\"")),
            "expected a {form} transfer:\n{log}"
        );
        // A disk-based transfer announces its size; a diskless one cannot.
        let status = sync.status().unwrap();
        let total = status["shards"][0]["full_sync"]["total_bytes"]
            .as_u64()
            .unwrap();
        let bytes = status["shards"][0]["full_sync"]["bytes"].as_u64().unwrap();
        if form == "disk" {
            assert_eq!(total, bytes, "{status}");
        } else {
            assert_eq!(total, 0, "{status}");
        }
    }
}

#[test]
fn status_shows_full_sync_then_incremental_with_a_moving_offset() {
    // Slow the source's RDB down (100 us per key) so the full sync lasts
    // long enough to be observed.
    let source = RedisServer::config()
        .arg("rdb-key-save-delay", &["100"])
        .start();
    load_strings(&source, 20_000, "slow:");
    let target = RedisServer::start();
    let sync = Shardsync::sync(BIN, &["--source", &source.url(), "--target", &target.url()]);

    wait_for("state full_sync with keys arriving", SHORT, || {
        sync.status().is_some_and(|s| {
            s["state"] == "full_sync"
                && s["shards"][0]["state"] == "full_sync"
                && s["shards"][0]["full_sync"]["keys"].as_u64().unwrap_or(0) > 0
        })
    });
    let metrics = sync.metrics().expect("metrics during full sync");
    let samples = parse_prometheus(&metrics).unwrap_or_else(|e| panic!("{e}\n{metrics}"));
    assert!(samples
        .iter()
        .any(|(name, v)| name.starts_with("shardsync_full_sync_keys_total") && *v > 0.0));

    sync.wait_state("incremental", Duration::from_secs(60));
    let status = sync.status().unwrap();
    let shard = &status["shards"][0];
    assert_eq!(shard["source"], source.addr());
    assert_eq!(shard["full_sync"]["keys"], 20_000);
    let first_offset = shard["offset"].as_u64().unwrap();

    let mut con = source.client();
    for i in 0..100 {
        redis::cmd("SET")
            .arg(format!("after:{i}"))
            .arg(i)
            .query::<()>(&mut con)
            .unwrap();
    }
    wait_for("the offset to move", SHORT, || {
        sync.status()
            .and_then(|s| s["shards"][0]["offset"].as_u64())
            .is_some_and(|o| o > first_offset)
    });
    sync.wait_caught_up(&source, SHORT);
    assert_eq!(target.dbsize(0), 20_100);

    let metrics = sync.metrics().unwrap();
    let samples = parse_prometheus(&metrics).unwrap_or_else(|e| panic!("{e}\n{metrics}"));
    let value = |prefix: &str| {
        samples
            .iter()
            .find(|(n, _)| n.starts_with(prefix))
            .map(|(_, v)| *v)
            .unwrap_or_else(|| panic!("no {prefix} in\n{metrics}"))
    };
    assert_eq!(value("shardsync_full_sync_keys_total"), 20_000.0);
    assert!(value("shardsync_commands_applied_total") >= 20_100.0);
    assert!(value("shardsync_source_offset_bytes") > first_offset as f64);
    assert!(samples
        .iter()
        .any(|(n, v)| n.contains("state=\"incremental\"") && *v == 1.0));
}

#[test]
fn keys_that_expire_during_the_sync_do_not_reappear() {
    let source = RedisServer::start();
    let mut con = source.client();
    // Already expired by the time anything reads it on the target.
    redis::cmd("SET")
        .arg("short-lived")
        .arg("x")
        .arg("PX")
        .arg(300)
        .query::<()>(&mut con)
        .unwrap();
    redis::cmd("SET")
        .arg("kept")
        .arg("y")
        .query::<()>(&mut con)
        .unwrap();
    let target = RedisServer::start();
    let sync = Shardsync::sync(BIN, &["--source", &source.url(), "--target", &target.url()]);
    sync.wait_caught_up(&source, SHORT);
    wait_for(
        "the short-lived key to be gone on both sides",
        SHORT,
        || {
            let s: bool = redis::cmd("EXISTS")
                .arg("short-lived")
                .query::<i64>(&mut source.client())
                .unwrap()
                == 0;
            let t: bool = redis::cmd("EXISTS")
                .arg("short-lived")
                .query::<i64>(&mut target.client())
                .unwrap()
                == 0;
            s && t
        },
    );
    let kept: String = redis::cmd("GET")
        .arg("kept")
        .query(&mut target.client())
        .unwrap();
    assert_eq!(kept, "y");
}

#[test]
fn lfu_counters_travel_with_the_keys() {
    // With an LFU policy the RDB carries each key's frequency counter
    // (the FREQ opcode), and RESTORE ... FREQ keeps it on the target.
    let source = RedisServer::config()
        .arg("maxmemory-policy", &["allkeys-lfu"])
        .start();
    let mut con = source.client();
    redis::cmd("SET")
        .arg("hot")
        .arg("x")
        .query::<()>(&mut con)
        .unwrap();
    redis::cmd("SET")
        .arg("cold")
        .arg("y")
        .query::<()>(&mut con)
        .unwrap();
    for _ in 0..2000 {
        redis::cmd("GET")
            .arg("hot")
            .query::<String>(&mut con)
            .unwrap();
    }
    let freq = |server: &RedisServer, key: &str| -> i64 {
        redis::cmd("OBJECT")
            .arg("FREQ")
            .arg(key)
            .query(&mut server.client())
            .unwrap()
    };
    let hot = freq(&source, "hot");
    assert!(hot > freq(&source, "cold"));
    let target = RedisServer::config()
        .arg("maxmemory-policy", &["allkeys-lfu"])
        .start();
    let sync = Shardsync::sync(BIN, &["--source", &source.url(), "--target", &target.url()]);
    sync.wait_caught_up(&source, SHORT);
    // The counter decays with time, so allow one step of decay.
    let copied = freq(&target, "hot");
    assert!(
        copied >= hot - 1 && copied > freq(&target, "cold"),
        "source {hot}, target {copied}"
    );
}
