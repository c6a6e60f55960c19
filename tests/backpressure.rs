//! A slow or paused target must never cost the source link (the master drops
//! a replica whose output buffer passes `client-output-buffer-limit
//! replica`), must keep memory bounded (what waits goes to disk), and must
//! hold up only what is routed to it.

use std::time::{Duration, Instant};

use harness::cluster::{key_slot, own_slots, Cluster};
use harness::compare::{assert_same, assert_same_nodes};
use harness::{wait_for, RedisServer, Shardsync, SHORT};

const BIN: &str = env!("CARGO_BIN_EXE_shardsync");

/// These tests push bursts as fast as a pipelined client can and measure
/// what a stalled target costs; run in parallel on 2 cores they starve each
/// other's shardsync of CPU (a debug build reads far slower than a release
/// one), which is not what they measure. One at a time.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn exclusive() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

/// `n` writes of `size` bytes, pipelined.
fn write_burst(server: &RedisServer, prefix: &str, n: usize, size: usize) {
    let mut con = server.client();
    let value = vec![b'x'; size];
    for chunk in (0..n).collect::<Vec<_>>().chunks(5000) {
        let mut pipe = redis::pipe();
        for i in chunk {
            pipe.cmd("SET")
                .arg(format!("{prefix}{i}"))
                .arg(&value)
                .ignore();
            pipe.cmd("INCR").arg(format!("{prefix}counter")).ignore();
        }
        pipe.query::<()>(&mut con).unwrap();
    }
}

fn stat(server: &RedisServer, field: &str) -> u64 {
    server
        .info_field(field)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[test]
fn a_paused_target_neither_drops_the_source_link_nor_grows_memory() {
    let _one = exclusive();
    // An 8 MB hard limit: a replica that stops reading while 40 MB of
    // writes arrive is disconnected by the master (8 MB rather than less:
    // on 2 busy cores, even a reader that never waits may fall a few MB
    // behind a pipelined burst for a moment).
    let source = RedisServer::config()
        .arg("client-output-buffer-limit", &["replica 8388608 4194304 5"])
        .start();
    let target = RedisServer::start();
    let sync = Shardsync::sync(
        BIN,
        &[
            "--source",
            &source.url(),
            "--target",
            &target.url(),
            "--spill-memory",
            "1MB",
        ],
    );
    sync.wait_caught_up(&source, SHORT);
    // A master buffers writes for a replica until the full sync is wholly
    // over on its side (the diskless fork has exited, the first ACK is in):
    // only once a write has come through is the stream really flowing.
    let _: () = redis::cmd("SET")
        .arg("marker")
        .arg(1)
        .query(&mut source.client())
        .unwrap();
    sync.wait_caught_up(&source, SHORT);
    let full_syncs_before = stat(&source, "sync_full");

    let _: () = redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(6000)
        .arg("WRITE")
        .query(&mut target.client())
        .unwrap();
    let paused_at = Instant::now();
    write_burst(&source, "burst:", 200_000, 200);
    assert!(
        paused_at.elapsed() < Duration::from_secs(6),
        "the burst outlasted the pause"
    );

    sync.wait_caught_up(&source, Duration::from_secs(60));
    assert_same(&source, &target);
    let source_log = std::fs::read_to_string(source.dir().join("redis.log")).unwrap_or_default();
    assert_eq!(
        stat(&source, "sync_full"),
        full_syncs_before,
        "the source ran another full sync:\n{source_log}\n--- shardsync ---\n{}",
        sync.log()
    );
    assert_eq!(
        stat(&source, "sync_partial_ok"),
        0,
        "the link was dropped and resumed"
    );
    assert_eq!(
        sync.metric_sum("shardsync_source_reconnects_total"),
        0.0,
        "{}",
        sync.log()
    );
    let spilled = sync.metric_sum("shardsync_spilled_bytes_total")
        + sync.metric_sum("shardsync_target_overflow_spilled_bytes_total");
    assert!(spilled > 10e6, "what waited went to disk ({spilled} bytes)");
    let rss = harness::peak_rss_kb(sync.pid()) / 1024;
    eprintln!(
        "paused target: {} MB spilled to disk, peak RSS {rss} MB",
        spilled as u64 / 1_000_000
    );
    assert!(rss < 200, "peak RSS {rss} MB with 1 MB of spill memory");
}

#[test]
fn a_paused_cluster_node_holds_up_only_its_own_slots() {
    let _one = exclusive();
    let source = RedisServer::start();
    let target = Cluster::start(3);
    let sync = Shardsync::sync(
        BIN,
        &["--source", &source.url(), "--target", &target.url(0)],
    );
    sync.wait_caught_up(&source, SHORT);

    // Pause the master serving slot 0 for a while.
    let ranges: Vec<Vec<(u16, u16)>> = target.nodes.iter().map(own_slots).collect();
    let paused = ranges
        .iter()
        .position(|r| r.iter().any(|&(a, _)| a == 0))
        .expect("a node serves slot 0");
    let _: () = redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(8000)
        .arg("WRITE")
        .query(&mut target.nodes[paused].client())
        .unwrap();
    let paused_at = Instant::now();
    write_burst(&source, "k:", 50_000, 100);

    // Keys on the other nodes arrive while the paused one waits.
    let others: Vec<&RedisServer> = target
        .nodes
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != paused)
        .map(|(_, n)| n)
        .collect();
    let expected_elsewhere = (0..50_000)
        .filter(|i| {
            let slot = key_slot(format!("k:{i}").as_bytes());
            !ranges[paused].iter().any(|&(a, b)| a <= slot && slot <= b)
        })
        .count() as u64;
    wait_for(
        "the unpaused nodes to have their keys",
        Duration::from_secs(5),
        || others.iter().map(|n| n.dbsize(0)).sum::<u64>() >= expected_elsewhere,
    );
    assert!(
        paused_at.elapsed() < Duration::from_secs(8),
        "the other nodes waited for the paused one"
    );

    sync.wait_caught_up(&source, Duration::from_secs(60));
    assert_same_nodes(&[&source], &target.masters());
}

#[test]
fn a_target_busy_with_a_script_gets_exactly_what_it_refused_again() {
    let _one = exclusive();
    // The target answers BUSY while a 3-second script runs: nothing it
    // refused is lost and nothing it ran runs twice (INCR counts it).
    let source = RedisServer::start();
    let target = RedisServer::config()
        .arg("busy-reply-threshold", &["100"])
        .start();
    let sync = Shardsync::sync(BIN, &["--source", &source.url(), "--target", &target.url()]);
    sync.wait_caught_up(&source, SHORT);

    let target_port = target.port;
    let script = std::thread::spawn(move || {
        let mut con = redis::Client::open(format!("redis://127.0.0.1:{target_port}"))
            .unwrap()
            .get_connection()
            .unwrap();
        let _: redis::Value = redis::cmd("EVAL")
            .arg(
                "local t = redis.call('TIME') local start = t[1] * 1000000 + t[2] \
                 repeat t = redis.call('TIME') until t[1] * 1000000 + t[2] - start > 3000000 \
                 return 1",
            )
            .arg(0)
            .query(&mut con)
            .unwrap();
    });
    std::thread::sleep(Duration::from_millis(300));
    let mut con = source.client();
    for i in 0..2000 {
        let _: i64 = redis::cmd("INCR").arg("counter").query(&mut con).unwrap();
        if i % 100 == 0 {
            let _: () = redis::cmd("RPUSH")
                .arg("log")
                .arg(i)
                .query(&mut con)
                .unwrap();
        }
    }
    script.join().unwrap();
    sync.wait_caught_up(&source, SHORT);
    assert_same(&source, &target);
    let counter: i64 = target.cmd(&["GET", "counter"]);
    assert_eq!(counter, 2000);
    // It did see BUSY, and came back.
    let log = sync.log();
    assert!(log.contains("BUSY"), "{log}");
}
