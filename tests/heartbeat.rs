//! Lag from the source's own clock: a heartbeat key written on every source
//! master each second comes back through the replication stream; its
//! arrival and its application on the target are timed, and it is never
//! replayed. Also a chain of tasks (A → B → C → D): each measures its own
//! heartbeat only, and the data arrives unchanged at the end.

use std::time::{Duration, Instant};

use harness::compare::diff_nodes;
use harness::shardsync::parse_prometheus;
use harness::{wait_for, RedisServer, Shardsync, SHORT};

const BIN: &str = env!("CARGO_BIN_EXE_shardsync");

fn lags(sync: &Shardsync) -> (Option<u64>, Option<u64>) {
    let s = sync.status().expect("status");
    let hb = &s["shards"][0]["heartbeat"];
    (hb["stream_lag_ms"].as_u64(), hb["applied_lag_ms"].as_u64())
}

fn heartbeat_keys(server: &RedisServer) -> Vec<String> {
    server.cmd(&["KEYS", "*shardsync:heartbeat:*"])
}

/// Writes a little on `server` every 10 ms until `until`.
fn write_for(server: &RedisServer, duration: Duration) {
    let mut con = server.client();
    let start = Instant::now();
    let mut i = 0u64;
    while start.elapsed() < duration {
        let _: () = redis::cmd("SET")
            .arg(format!("k:{}", i % 100))
            .arg(i)
            .query(&mut con)
            .unwrap();
        i += 1;
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn lag_follows_a_paused_target_and_the_heartbeat_is_not_replayed() {
    let source = RedisServer::start();
    let target = RedisServer::start();
    let sync = Shardsync::sync(BIN, &["--source", &source.url(), "--target", &target.url()]);
    sync.wait_state("incremental", SHORT);
    wait_for(
        "heartbeat lag figures",
        SHORT,
        || matches!(lags(&sync), (Some(s), Some(a)) if s < 1500 && a < 1500),
    );
    assert_eq!(heartbeat_keys(&source).len(), 1);
    assert!(
        heartbeat_keys(&target).is_empty(),
        "the heartbeat was replayed"
    );

    // The target stops applying for 3 s: the applied lag climbs past 2 s
    // while the stream keeps arriving on time, then both come back down.
    let _: () = target.cmd(&["CLIENT", "PAUSE", "3000", "ALL"]);
    let writer = {
        let port = source.port;
        std::thread::spawn(move || {
            let source = redis::Client::open(format!("redis://127.0.0.1:{port}")).unwrap();
            let mut con = source.get_connection().unwrap();
            for i in 0..300 {
                let _: () = redis::cmd("SET")
                    .arg(format!("p:{i}"))
                    .arg(i)
                    .query(&mut con)
                    .unwrap();
                std::thread::sleep(Duration::from_millis(10));
            }
        })
    };
    let mut peak = (0, u64::MAX);
    let start = Instant::now();
    while start.elapsed() < Duration::from_millis(2900) {
        if let (Some(s), Some(a)) = lags(&sync) {
            if a > peak.0 {
                peak = (a, s);
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    writer.join().unwrap();
    assert!(peak.0 >= 1800, "applied lag peaked at {} ms", peak.0);
    assert!(
        peak.1 < 1500,
        "stream lag was {} ms at the applied peak",
        peak.1
    );
    wait_for(
        "the lag back down",
        SHORT,
        || matches!(lags(&sync), (Some(_), Some(a)) if a < 1500),
    );
    let text = sync.metrics().unwrap();
    let stages: Vec<String> = parse_prometheus(&text)
        .unwrap()
        .into_iter()
        .filter(|(n, _)| n.starts_with("shardsync_heartbeat_lag_seconds"))
        .map(|(n, _)| n)
        .collect();
    assert_eq!(stages.len(), 2, "{text}");
    sync.wait_caught_up(&source, SHORT);
    let diffs: Vec<String> = diff_nodes(&[&source], 0, &[&target], 0)
        .into_iter()
        .filter(|d| !d.contains("shardsync:heartbeat"))
        .collect();
    assert!(diffs.is_empty(), "{}", diffs.join("\n"));
}

#[test]
fn a_source_that_cannot_be_written_syncs_without_lag_and_says_why() {
    // A replica refuses writes (READONLY).
    let master = RedisServer::start();
    let replica = RedisServer::start();
    let _: () = replica.cmd(&["REPLICAOF", "127.0.0.1", &master.port.to_string()]);
    wait_for("the replica to sync", SHORT, || {
        replica.info_field("master_link_status").as_deref() == Some("up")
    });
    let target = RedisServer::start();
    let sync = Shardsync::sync(
        BIN,
        &["--source", &replica.url(), "--target", &target.url()],
    );
    sync.wait_state("incremental", SHORT);
    sync.wait_log("cannot write the heartbeat key", SHORT);
    write_for(&master, Duration::from_millis(300));
    let ok = harness::wait_until(SHORT, || target.dbsize(0) == master.dbsize(0));
    assert!(ok, "target has {} keys\n{}", target.dbsize(0), sync.log());
    assert_eq!(lags(&sync), (None, None));
    let log = sync.log();
    assert!(
        log.contains("READONLY") && log.contains(&replica.addr()),
        "{log}"
    );
}

#[test]
fn no_heartbeat_writes_nothing_on_the_source() {
    let source = RedisServer::start();
    let target = RedisServer::start();
    let sync = Shardsync::sync(
        BIN,
        &[
            "--source",
            &source.url(),
            "--target",
            &target.url(),
            "--no-heartbeat",
        ],
    );
    sync.wait_state("incremental", SHORT);
    std::thread::sleep(Duration::from_millis(1500));
    assert!(heartbeat_keys(&source).is_empty());
    assert_eq!(lags(&sync), (None, None));
}

#[test]
fn a_chain_of_three_tasks_carries_the_data_and_each_measures_its_own_lag() {
    let servers: Vec<RedisServer> = (0..4).map(|_| RedisServer::start()).collect();
    harness::data::load_all_types(&servers[0]);
    let syncs: Vec<Shardsync> = (0..3)
        .map(|i| {
            Shardsync::sync(
                BIN,
                &[
                    "--source",
                    &servers[i].url(),
                    "--target",
                    &servers[i + 1].url(),
                ],
            )
        })
        .collect();
    for s in &syncs {
        s.wait_state("incremental", SHORT);
    }
    write_for(&servers[0], Duration::from_millis(1500));
    for (i, s) in syncs.iter().enumerate() {
        s.wait_caught_up(&servers[i], SHORT);
        wait_for(
            "heartbeat lag figures",
            SHORT,
            || matches!(lags(s), (Some(_), Some(a)) if a < 2000),
        );
    }
    // Each hop's own heartbeat lives on its source and goes no further.
    for (i, server) in servers.iter().enumerate() {
        let want = usize::from(i < 3);
        assert_eq!(heartbeat_keys(server).len(), want, "server {i}");
    }
    let diffs: Vec<String> = harness::compare::diff_all(&servers[0], &servers[3])
        .into_iter()
        .filter(|d| !d.contains("shardsync:heartbeat"))
        .collect();
    assert!(diffs.is_empty(), "{}", diffs.join("\n"));
}
