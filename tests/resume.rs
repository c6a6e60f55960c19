//! Stopping, restarting and losing connections: shardsync continues with a
//! partial resync where it can, and loses nothing.

use std::time::Duration;

use harness::compare::assert_same;
use harness::data::set_many;
use harness::server::TempDir;
use harness::{wait_for, RedisServer, Shardsync, SHORT};

const BIN: &str = env!("CARGO_BIN_EXE_shardsync");

fn metric(sync: &Shardsync, prefix: &str) -> f64 {
    sync.metric_samples(prefix)
        .first()
        .map(|(_, v)| *v)
        .unwrap_or_else(|| panic!("no {prefix}:\n{:?}", sync.metrics()))
}

#[test]
fn a_restart_resumes_from_the_checkpoint_with_a_partial_resync() {
    let source = RedisServer::start();
    set_many(&source, "before:", 500);
    let target = RedisServer::start();
    let ckpt = TempDir::new("ckpt");
    let args = [
        "--source",
        &source.url(),
        "--target",
        &target.url(),
        "--checkpoint-dir",
        ckpt.path().to_str().unwrap(),
    ];
    let mut first = Shardsync::sync(BIN, &args);
    first.wait_caught_up(&source, SHORT);
    set_many(&source, "during:", 500);
    first.wait_caught_up(&source, SHORT);
    let done = first.terminate(SHORT);
    assert_eq!(done.code(), Some(0), "{}", done.log);

    // Written while shardsync is not running: kept in the source's backlog.
    set_many(&source, "while-down:", 500);

    let second = Shardsync::sync(BIN, &args);
    second.wait_caught_up(&source, SHORT);
    assert!(
        second.log().contains("partial resync accepted"),
        "{}",
        second.log()
    );
    assert_eq!(metric(&second, "shardsync_full_syncs_total"), 0.0);
    assert_eq!(metric(&second, "shardsync_partial_resyncs_total"), 1.0);
    set_many(&source, "after:", 100);
    second.wait_caught_up(&source, SHORT);
    // Counters and lists would show any command applied twice or lost.
    assert_same(&source, &target);
}

#[test]
fn a_lost_source_link_continues_with_a_partial_resync() {
    let source = RedisServer::start();
    let target = RedisServer::start();
    let sync = Shardsync::sync(BIN, &["--source", &source.url(), "--target", &target.url()]);
    sync.wait_caught_up(&source, SHORT);
    set_many(&source, "a:", 300);
    sync.wait_caught_up(&source, SHORT);

    // Drop the replication link from the source's side.
    redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("replica")
        .query::<i64>(&mut source.client())
        .unwrap();
    set_many(&source, "b:", 300);
    wait_for("a reconnection", SHORT, || {
        metric(&sync, "shardsync_source_reconnects_total") >= 1.0
    });
    sync.wait_caught_up(&source, SHORT);
    assert_eq!(
        metric(&sync, "shardsync_full_syncs_total"),
        1.0,
        "{}",
        sync.log()
    );
    assert!(metric(&sync, "shardsync_partial_resyncs_total") >= 1.0);
    assert_same(&source, &target);
}

#[test]
fn a_lost_target_link_is_retried_without_losing_writes() {
    let source = RedisServer::start();
    let target = RedisServer::start();
    let sync = Shardsync::sync(BIN, &["--source", &source.url(), "--target", &target.url()]);
    sync.wait_caught_up(&source, SHORT);
    for round in 0..3 {
        let mut con = source.client();
        let mut pipe = redis::pipe();
        for i in 0..2000 {
            pipe.cmd("SET").arg(format!("r{round}:{i}")).arg(i).ignore();
        }
        pipe.query::<()>(&mut con).unwrap();
        // Kill our writer connection on the target while it is busy.
        target.kill_clients();
    }
    sync.wait_caught_up(&source, Duration::from_secs(60));
    assert_same(&source, &target);
    assert!(
        metric(&sync, "shardsync_target_reconnects_total") >= 1.0,
        "{}",
        sync.log()
    );
    assert_eq!(
        metric(&sync, "shardsync_target_resent_non_idempotent_total"),
        0.0
    );
}

#[test]
fn sigterm_drains_and_exits_zero_with_everything_applied() {
    let source = RedisServer::start();
    let target = RedisServer::start();
    let mut sync = Shardsync::sync(BIN, &["--source", &source.url(), "--target", &target.url()]);
    sync.wait_caught_up(&source, SHORT);
    set_many(&source, "x:", 2000);
    let done = sync.terminate(SHORT);
    assert_eq!(done.code(), Some(0), "{}", done.log);
    assert!(
        done.log.contains("every command read was applied"),
        "{}",
        done.log
    );
    // Whatever was read before the signal is on the target: a prefix of
    // the source's writes, never a gap. The counter tells how far it got.
    let counter: i64 = redis::cmd("GET")
        .arg("x:counter")
        .query::<Option<i64>>(&mut target.client())
        .unwrap()
        .unwrap_or(0);
    let list_len: i64 = redis::cmd("LLEN")
        .arg("x:list")
        .query(&mut target.client())
        .unwrap();
    // Each round is INCR then RPUSH: a prefix may end between the two.
    assert!(
        counter == list_len || counter == list_len + 1,
        "counter {counter} and list length {list_len} must advance together"
    );
}

/// A planned failover of a standalone source: shardsync stopped, writes
/// stopped, the replica promoted (`REPLICAOF NO ONE`), writes on the new
/// master, then the same command against the new master. The promoted
/// replica continues the old master's history (PSYNC2: `master_replid2`),
/// so shardsync adopts the marker the old master's sync left on the target
/// and continues with a partial resync: no "target not empty", no second
/// copy of everything.
#[test]
fn a_promoted_replica_continues_the_sync_with_a_partial_resync() {
    let master = RedisServer::start();
    let replica = RedisServer::config()
        .arg("replicaof", &["127.0.0.1", &master.port.to_string()])
        .start();
    let target = RedisServer::start();
    set_many(&master, "before:", 2000);
    let mut sync = Shardsync::sync(BIN, &["--source", &master.url(), "--target", &target.url()]);
    sync.wait_state("incremental", Duration::from_secs(60));
    set_many(&master, "stream:", 500);
    sync.wait_caught_up(&master, SHORT);
    let done = sync.terminate(SHORT);
    assert_eq!(done.code(), Some(0), "{}", done.log);
    // Planned failover: the replica has everything, then takes over.
    wait_for("the replica to catch up", SHORT, || {
        replica.info_field("master_repl_offset") == master.info_field("master_repl_offset")
    });
    replica.cmd::<()>(&["REPLICAOF", "NO", "ONE"]);
    drop(master);
    set_many(&replica, "after:", 500);

    let sync = Shardsync::sync(
        BIN,
        &["--source", &replica.url(), "--target", &target.url()],
    );
    sync.wait_state("incremental", Duration::from_secs(60));
    sync.wait_caught_up(&replica, SHORT);
    let log = sync.log();
    assert!(
        log.contains("continues the history of an earlier master"),
        "{log}"
    );
    assert!(log.contains("partial resync accepted"), "{log}");
    assert_eq!(
        replica.sync_full(),
        0,
        "the new master never made an RDB for us\n{log}"
    );
    assert_same(&replica, &target);
}
