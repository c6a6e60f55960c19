//! The comparator is the tests' oracle: it must see every kind of
//! difference, between two 7.0 servers and across 6.2 and 7.0. Each pair
//! starts identical (a native replica of the loaded server, detached), then
//! one thing is changed on one side.

use harness::compare::diff_all;
use harness::data::load_all_types_but_functions;
use harness::{wait_for, RedisServer, SHORT};

/// A detached native replica of `source`, on `replica`.
fn copy_natively(source: &RedisServer, replica: &RedisServer) {
    let _: () = replica.cmd(&["REPLICAOF", "127.0.0.1", &source.port.to_string()]);
    wait_for("the native replica to load", SHORT, || {
        replica.info_field("master_link_status").as_deref() == Some("up")
            && replica.info_field("master_sync_in_progress").as_deref() == Some("0")
            && replica.dbsize(0) == source.dbsize(0)
    });
    let _: () = replica.cmd(&["REPLICAOF", "NO", "ONE"]);
}

fn changes() -> Vec<(&'static str, Vec<&'static str>)> {
    vec![
        (
            "a list element",
            vec!["LSET", "list:large", "4000", "changed"],
        ),
        (
            "a hash field",
            vec!["HSET", "hash:large", "f999", "changed"],
        ),
        ("a set member", vec!["SREM", "set:large", "m500"]),
        ("a score", vec!["ZINCRBY", "zset:large", "0.5", "member-10"]),
        ("a string", vec!["APPEND", "str:random", "x"]),
        (
            "an expiry",
            vec!["PEXPIREAT", "ttl:string", "4102444805000"],
        ),
        ("a TTL removed", vec!["PERSIST", "ttl:list"]),
        ("an extra key", vec!["SET", "extra", "1"]),
        ("a missing key", vec!["DEL", "geo:places"]),
        // Past the 10 entries XINFO STREAM FULL shows by default.
        (
            "a late stream entry",
            vec!["XDEL", "stream:events", "1700000000201-0"],
        ),
        (
            "a pending entry",
            vec!["XACK", "stream:events", "grp-a", "1700000000008-2"],
        ),
        (
            "a group's last ID",
            vec!["XGROUP", "SETID", "stream:events", "grp-b", "0"],
        ),
        (
            "a consumer",
            vec!["XGROUP", "CREATECONSUMER", "stream:events", "grp-a", "zed"],
        ),
        ("another database", vec!["SELECT", "1"]),
    ]
}

fn check_pair(make_source: fn() -> RedisServer, make_replica: fn() -> RedisServer) {
    for (what, cmd) in changes() {
        let source = make_source();
        load_all_types_but_functions(&source);
        let replica = make_replica();
        copy_natively(&source, &replica);
        let same = diff_all(&source, &replica);
        assert!(
            same.is_empty(),
            "identical copies differ:\n{}",
            same.join("\n")
        );
        if what == "another database" {
            let mut con = replica.client_db(3);
            let _: () = redis::cmd("HSET")
                .arg(&["db3:hash", "b", "2"])
                .query(&mut con)
                .unwrap();
        } else {
            let _: redis::Value = replica.cmd(&cmd);
        }
        assert!(
            !diff_all(&source, &replica).is_empty(),
            "{what} went unnoticed"
        );
    }
}

#[test]
fn every_change_between_two_70_servers_is_seen() {
    check_pair(RedisServer::start, RedisServer::start);
}

#[test]
fn every_change_between_62_and_70_is_seen() {
    check_pair(
        || RedisServer::config().redis62().start(),
        RedisServer::start,
    );
}
