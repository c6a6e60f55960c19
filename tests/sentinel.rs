//! A Sentinel-managed source (issue 13, part 4): shardsync asks the
//! Sentinels for the master (`redis+sentinel://`) and, when the master
//! dies, follows the replica they elect without a restart.

use std::time::Duration;

use harness::compare::assert_same;
use harness::data::set_many;
use harness::sentinel::Sentinel;
use harness::{wait_for, RedisServer, Shardsync, SHORT};

const BIN: &str = env!("CARGO_BIN_EXE_shardsync");
const LONG: Duration = Duration::from_secs(90);

#[test]
fn a_source_master_killed_mid_sync_is_followed_to_the_replica_the_sentinels_elect() {
    let mut master = RedisServer::config()
        .arg("repl-backlog-size", &["64mb"])
        .start();
    let replica = RedisServer::config()
        .arg("replicaof", &["127.0.0.1", &master.port.to_string()])
        .arg("repl-backlog-size", &["64mb"])
        .start();
    wait_for("the replica to sync", SHORT, || {
        replica.info_field("master_link_status").as_deref() == Some("up")
    });
    let sentinels: Vec<Sentinel> = (0..3).map(|_| Sentinel::start(&master, "main")).collect();
    wait_for(
        "the Sentinels to know each other and the replica",
        LONG,
        || sentinels.iter().all(|s| s.knows("main", 2, 1)),
    );
    set_many(&master, "before:", 5000);
    let target = RedisServer::start();
    let addrs: Vec<String> = sentinels.iter().map(Sentinel::addr).collect();
    let url = format!("redis+sentinel://{}/main", addrs.join(","));
    let mut sync = Shardsync::sync(BIN, &["--source", &url, "--target", &target.url()]);
    sync.wait_state("incremental", LONG);
    set_many(&master, "stream:", 1000);
    // The replica holds everything the master acknowledged: the failover
    // itself loses nothing.
    wait_for("the replica to catch up", SHORT, || {
        replica.master_repl_offset() >= master.master_repl_offset()
            && replica
                .info_field("slave_repl_offset")
                .and_then(|o| o.parse::<u64>().ok())
                >= Some(master.master_repl_offset())
    });
    let old = master.addr();
    master.kill();
    wait_for("the Sentinels to elect the replica", LONG, || {
        sentinels[0].master_addr("main") == Some(replica.addr())
            && replica.info_field("role").as_deref() == Some("master")
    });
    set_many(&replica, "after:", 1000);
    // The shard keeps its first master's name in status and metrics.
    sync.wait_caught_up_via(&replica, &old, LONG);
    assert_same(&replica, &target);
    let log = sync.log();
    assert!(
        log.contains("the Sentinels name another master (a failover)"),
        "{log}"
    );
    assert_eq!(log.matches("full sync started").count(), 1, "{log}");
    assert_eq!(
        log.matches("partial resync accepted").count(),
        1,
        "after the failover the stream continues on the new master\n{log}"
    );

    // Stopped and started again with the same URL: the new master (another
    // address) continues from the marker the followed sync left.
    let done = sync.terminate(SHORT);
    assert_eq!(done.code(), Some(0), "{}", done.log);
    set_many(&replica, "later:", 500);
    let again = Shardsync::sync(BIN, &["--source", &url, "--target", &target.url()]);
    again.wait_state("incremental", LONG);
    again.wait_caught_up(&replica, LONG);
    assert_same(&replica, &target);
    let log = again.log();
    assert!(log.contains("partial resync accepted"), "{log}");
    assert!(!log.contains("full sync started"), "{log}");
}

#[test]
fn a_sentinel_url_that_names_no_master_is_one_clear_line() {
    let master = RedisServer::start();
    let sentinel = Sentinel::start(&master, "main");
    let target = RedisServer::start();
    let url = format!("redis+sentinel://{}/other", sentinel.addr());
    let done = Shardsync::run(
        BIN,
        "sync",
        &["--source", &url, "--target", &target.url()],
        SHORT,
    );
    assert_eq!(done.code(), Some(3), "{}", done.log);
    assert!(
        done.log.contains(&format!(
            "no Sentinel of {} names a master 'other'",
            sentinel.addr()
        )),
        "{}",
        done.log
    );
    assert!(
        done.log.contains("monitors no master of that name"),
        "{}",
        done.log
    );
}

#[test]
fn a_target_master_killed_mid_sync_is_followed_to_the_replica_the_sentinels_elect() {
    let source = RedisServer::config()
        .arg("repl-backlog-size", &["64mb"])
        .start();
    set_many(&source, "before:", 5000);
    let mut master = RedisServer::start();
    let replica = RedisServer::config()
        .arg("replicaof", &["127.0.0.1", &master.port.to_string()])
        .start();
    wait_for("the replica to sync", SHORT, || {
        replica.info_field("master_link_status").as_deref() == Some("up")
    });
    let sentinels: Vec<Sentinel> = (0..3).map(|_| Sentinel::start(&master, "dst")).collect();
    wait_for(
        "the Sentinels to know each other and the replica",
        LONG,
        || sentinels.iter().all(|s| s.knows("dst", 2, 1)),
    );
    let addrs: Vec<String> = sentinels.iter().map(Sentinel::addr).collect();
    let url = format!("redis+sentinel://{}/dst", addrs.join(","));
    let sync = Shardsync::sync(BIN, &["--source", &source.url(), "--target", &url]);
    sync.wait_state("incremental", LONG);
    set_many(&source, "stream:", 1000);
    sync.wait_caught_up(&source, SHORT);
    // The replica holds what the master applied, markers included.
    let written = master.master_repl_offset();
    wait_for("the replica to catch up", SHORT, || {
        replica
            .info_field("slave_repl_offset")
            .and_then(|o| o.parse::<u64>().ok())
            >= Some(written)
    });
    master.kill();
    set_many(&source, "after:", 1000);
    wait_for("the Sentinels to elect the replica", LONG, || {
        sentinels[0].master_addr("dst") == Some(replica.addr())
            && replica.info_field("role").as_deref() == Some("master")
    });
    wait_for("the task to follow", LONG, || {
        sync.log().contains("the target's Sentinels name")
    });
    set_many(&source, "later:", 1000);
    sync.wait_caught_up(&source, LONG);
    assert_same(&source, &replica);
    let log = sync.log();
    assert!(
        log.contains(&format!(
            "the target's Sentinels name {} as the master 'dst' now (a failover): starting again from the target's markers",
            replica.addr()
        )),
        "{log}"
    );
    assert_eq!(log.matches("full sync started").count(), 1, "{log}");
    assert_eq!(log.matches("partial resync accepted").count(), 1, "{log}");
}
