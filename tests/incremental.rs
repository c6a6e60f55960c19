//! Incremental replay against real Redis 7.0: every write command of the
//! cloud service's list that 7.0 propagates is run on the source while
//! shardsync streams, and the target must end up identical.

use std::time::Duration;

use harness::compare::{assert_same, diff_db};
use harness::data::load_all_types;
use harness::{wait_for, RedisServer, Shardsync, SHORT};
use redis::Connection;

const BIN: &str = env!("CARGO_BIN_EXE_shardsync");

fn q(con: &mut Connection, args: &[&str]) -> redis::Value {
    let mut cmd = redis::cmd(args[0]);
    for a in &args[1..] {
        cmd.arg(*a);
    }
    cmd.query(con).unwrap_or_else(|e| panic!("{args:?}: {e}"))
}

fn started(source: &RedisServer, target: &RedisServer, extra: &[&str]) -> Shardsync {
    let mut args = vec![
        "--source".to_string(),
        source.url(),
        "--target".to_string(),
        target.url(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let sync = Shardsync::sync(BIN, &args);
    sync.wait_caught_up(source, SHORT);
    sync
}

/// Runs every command of the seeds' list (and the scripting and function
/// commands whose effects Redis 7.0 replicates) on `source`.
fn run_every_command(source: &RedisServer) {
    let mut c = source.client();
    let c = &mut c;
    let future_s = (std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 100_000)
        .to_string();
    let future_ms = format!("{future_s}123");

    // Strings.
    q(c, &["APPEND", "s:append", "abc"]);
    q(c, &["APPEND", "s:append", "def"]);
    q(c, &["SET", "s:n", "10"]);
    q(c, &["INCR", "s:n"]);
    q(c, &["INCRBY", "s:n", "5"]);
    q(c, &["DECR", "s:n"]);
    q(c, &["DECRBY", "s:n", "3"]);
    q(c, &["INCRBYFLOAT", "s:f", "1.5"]);
    q(c, &["INCRBYFLOAT", "s:f", "0.25"]);
    q(c, &["SET", "s:gs", "old"]);
    q(c, &["GETSET", "s:gs", "new"]);
    q(c, &["SET", "s:plain", "v"]);
    q(c, &["SETEX", "s:setex", "100000", "v"]);
    q(c, &["PSETEX", "s:psetex", "100000000", "v"]);
    q(c, &["SETNX", "s:nx", "first"]);
    q(c, &["SETNX", "s:nx", "second"]);
    q(c, &["SETRANGE", "s:range", "5", "xyz"]);
    q(c, &["SETBIT", "s:bits", "7", "1"]);
    q(c, &["SETBIT", "s:bits", "100", "1"]);
    q(c, &["MSET", "s:m1", "a", "s:m2", "b", "s:m3", "c"]);
    q(c, &["MSETNX", "s:mx1", "a", "s:mx2", "b"]);
    q(c, &["MSETNX", "s:mx1", "z", "s:mx3", "z"]);
    q(c, &["DEL", "s:m3"]);
    q(c, &["UNLINK", "s:m2"]);

    // Expiry.
    for k in ["e:1", "e:2", "e:3", "e:4", "e:5"] {
        q(c, &["SET", k, "v"]);
    }
    q(c, &["EXPIRE", "e:1", "100000"]);
    q(c, &["EXPIREAT", "e:2", &future_s]);
    q(c, &["PEXPIRE", "e:3", "100000000"]);
    q(c, &["PEXPIREAT", "e:4", &future_ms]);
    q(c, &["EXPIRE", "e:5", "1000"]);
    q(c, &["PERSIST", "e:5"]);

    // Renames.
    q(c, &["SET", "r:1", "one"]);
    q(c, &["RENAME", "r:1", "r:2"]);
    q(c, &["SET", "r:3", "three"]);
    q(c, &["RENAMENX", "r:3", "r:4"]);
    q(c, &["SET", "r:5", "five"]);
    q(c, &["RENAMENX", "r:5", "r:4"]);

    // Lists, blocking pops included (data is there, so they return at once).
    q(c, &["LPUSH", "l:a", "a", "b", "c"]);
    q(c, &["RPUSH", "l:a", "d", "e", "f", "g"]);
    q(c, &["LPUSHX", "l:a", "x"]);
    q(c, &["RPUSHX", "l:a", "y"]);
    q(c, &["LPUSHX", "l:missing", "x"]);
    q(c, &["LINSERT", "l:a", "BEFORE", "c", "inserted"]);
    q(c, &["LSET", "l:a", "0", "first"]);
    q(c, &["LREM", "l:a", "1", "e"]);
    q(c, &["LTRIM", "l:a", "0", "7"]);
    q(c, &["LPOP", "l:a"]);
    q(c, &["RPOP", "l:a"]);
    q(c, &["RPOPLPUSH", "l:a", "l:b"]);
    q(c, &["BLPOP", "l:a", "1"]);
    q(c, &["BRPOP", "l:a", "1"]);
    q(c, &["BRPOPLPUSH", "l:a", "l:c", "1"]);

    // Hashes.
    q(c, &["HSET", "h:a", "a", "1", "b", "2"]);
    q(c, &["HMSET", "h:a", "c", "3", "d", "4"]);
    q(c, &["HSETNX", "h:a", "a", "not set"]);
    q(c, &["HSETNX", "h:a", "e", "5"]);
    q(c, &["HINCRBY", "h:a", "a", "10"]);
    q(c, &["HINCRBYFLOAT", "h:a", "f", "2.5"]);
    q(c, &["HDEL", "h:a", "b"]);

    // Sets.
    q(c, &["SADD", "set:1", "a", "b", "c", "d", "e"]);
    q(c, &["SADD", "set:2", "c", "d", "e", "f"]);
    q(c, &["SREM", "set:1", "a"]);
    q(c, &["SMOVE", "set:1", "set:2", "b"]);
    q(c, &["SPOP", "set:2"]);
    q(c, &["SINTERSTORE", "set:inter", "set:1", "set:2"]);
    q(c, &["SUNIONSTORE", "set:union", "set:1", "set:2"]);
    q(c, &["SDIFFSTORE", "set:diff", "set:2", "set:1"]);

    // Sorted sets.
    q(
        c,
        &[
            "ZADD", "z:a", "1", "a", "2", "b", "3", "c", "4", "d", "5", "e",
        ],
    );
    q(c, &["ZINCRBY", "z:a", "10", "a"]);
    q(c, &["ZREM", "z:a", "b"]);
    q(c, &["ZREMRANGEBYSCORE", "z:a", "3", "3"]);
    q(c, &["ZREMRANGEBYRANK", "z:a", "0", "0"]);
    q(
        c,
        &["ZADD", "z:lex", "0", "a", "0", "b", "0", "c", "0", "d"],
    );
    q(c, &["ZREMRANGEBYLEX", "z:lex", "[a", "[b"]);
    q(
        c,
        &[
            "ZUNIONSTORE",
            "z:union",
            "2",
            "z:a",
            "z:lex",
            "WEIGHTS",
            "1",
            "2",
        ],
    );
    q(c, &["ZINTERSTORE", "z:inter", "2", "z:a", "z:lex"]);

    // Geo, HyperLogLog, bitmaps.
    q(c, &["GEOADD", "geo", "13.361389", "38.115556", "Palermo"]);
    q(c, &["PFADD", "hll:1", "a", "b", "c"]);
    q(c, &["PFADD", "hll:2", "c", "d"]);
    q(c, &["PFMERGE", "hll:merged", "hll:1", "hll:2"]);
    q(c, &["SET", "bit:1", "abc"]);
    q(c, &["SET", "bit:2", "xyz"]);
    q(c, &["BITOP", "AND", "bit:and", "bit:1", "bit:2"]);

    // RESTORE of a DUMP.
    let payload: Vec<u8> = redis::cmd("DUMP").arg("h:a").query(c).unwrap();
    redis::cmd("RESTORE")
        .arg("restored")
        .arg(0)
        .arg(payload)
        .query::<()>(c)
        .unwrap();

    // Streams and consumer groups.
    let id1: String = redis::cmd("XADD")
        .arg("st")
        .arg("*")
        .arg("f")
        .arg("1")
        .query(c)
        .unwrap();
    let id2: String = redis::cmd("XADD")
        .arg("st")
        .arg("*")
        .arg("f")
        .arg("2")
        .query(c)
        .unwrap();
    for i in 3..20 {
        q(c, &["XADD", "st", "*", "f", &i.to_string()]);
    }
    q(c, &["XGROUP", "CREATE", "st", "g", "0"]);
    q(
        c,
        &[
            "XREADGROUP",
            "GROUP",
            "g",
            "c1",
            "COUNT",
            "3",
            "STREAMS",
            "st",
            ">",
        ],
    );
    q(c, &["XCLAIM", "st", "g", "c2", "0", &id1]);
    q(c, &["XAUTOCLAIM", "st", "g", "c3", "0", "0", "COUNT", "1"]);
    q(c, &["XGROUP", "CREATECONSUMER", "st", "g", "c4"]);
    q(c, &["XACK", "st", "g", &id2]);
    q(c, &["XDEL", "st", &id2]);
    q(c, &["XTRIM", "st", "MAXLEN", "15"]);

    // Transactions, scripts and functions (effects are replicated).
    q(c, &["MULTI"]);
    q(c, &["INCR", "tx:counter"]);
    q(c, &["LPUSH", "tx:list", "a"]);
    q(c, &["SET", "tx:string", "in a transaction"]);
    q(c, &["EXEC"]);
    q(
        c,
        &[
            "EVAL",
            "redis.call('set', KEYS[1], ARGV[1]); return redis.call('incr', KEYS[2])",
            "2",
            "ev:1",
            "ev:2",
            "from eval",
        ],
    );
    let sha: String = redis::cmd("SCRIPT")
        .arg("LOAD")
        .arg("return redis.call('set', KEYS[1], 'from evalsha')")
        .query(c)
        .unwrap();
    q(c, &["EVALSHA", &sha, "1", "ev:sha"]);
    q(
        c,
        &["FUNCTION", "LOAD", "#!lua name=inclib\nredis.register_function('setit', function(keys, args) return redis.call('set', keys[1], args[1]) end)"],
    );
    q(c, &["FCALL", "setit", "1", "fn:key", "from a function"]);

    // Other databases: SELECT, MOVE, SWAPDB.
    q(c, &["SET", "mv:key", "moved to db 3"]);
    q(c, &["MOVE", "mv:key", "3"]);
    let mut db2 = source.client_db(2);
    q(&mut db2, &["SET", "db2:key", "v"]);
    q(&mut db2, &["RPUSH", "db2:list", "a"]);
    let mut db4 = source.client_db(4);
    q(&mut db4, &["SET", "swapped", "was in db 4"]);
    q(c, &["SWAPDB", "4", "5"]);

    // Published messages are not data.
    q(c, &["PUBLISH", "chan", "hello"]);
}

#[test]
fn every_command_of_the_list_replays_identically() {
    let source = RedisServer::start();
    let target = RedisServer::start();
    let sync = started(&source, &target, &[]);
    run_every_command(&source);
    sync.wait_caught_up(&source, SHORT);
    assert_same(&source, &target);
    // Nothing the target refused.
    let status = sync.status().unwrap();
    assert_eq!(
        status["targets"][0]["errors"],
        0,
        "{status}\n{}",
        sync.log()
    );
}

#[test]
fn writes_during_the_full_sync_are_not_lost() {
    let source = RedisServer::config()
        .arg("rdb-key-save-delay", &["50"])
        .start();
    load_all_types(&source);
    harness::data::load_strings(&source, 10_000, "bulk:");
    let target = RedisServer::start();
    let sync = Shardsync::sync(BIN, &["--source", &source.url(), "--target", &target.url()]);
    wait_for("the full sync to begin", SHORT, || {
        sync.status()
            .is_some_and(|s| s["shards"][0]["state"] == "full_sync")
    });
    // Written while the RDB is being produced and sent.
    run_every_command(&source);
    sync.wait_caught_up(&source, Duration::from_secs(60));
    assert_same(&source, &target);
}

#[test]
fn publish_is_replayed_only_when_asked() {
    for replay in [false, true] {
        let source = RedisServer::start();
        let target = RedisServer::start();
        let extra: &[&str] = if replay { &["--replay-publish"] } else { &[] };
        let sync = started(&source, &target, extra);
        let mut sub_con = target.client();
        sub_con
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        let mut pubsub = sub_con.as_pubsub();
        pubsub.subscribe("chan").unwrap();
        q(&mut source.client(), &["PUBLISH", "chan", "hello"]);
        sync.wait_caught_up(&source, SHORT);
        let got = pubsub
            .get_message()
            .ok()
            .map(|m| m.get_payload::<String>().unwrap());
        if replay {
            assert_eq!(got.as_deref(), Some("hello"));
        } else {
            assert_eq!(got, None, "PUBLISH was replayed without --replay-publish");
        }
    }
}

#[test]
fn selected_databases_are_copied_into_their_mapped_numbers() {
    let source = RedisServer::start();
    let mut db0 = source.client_db(0);
    let mut db1 = source.client_db(1);
    q(&mut db0, &["SET", "only-in-db0", "x"]);
    q(&mut db1, &["SET", "before", "db1"]);
    let target = RedisServer::start();
    let sync = started(&source, &target, &["--db", "1", "--db-map", "1:5"]);
    q(&mut db0, &["SET", "db0-later", "x"]);
    q(&mut db1, &["SET", "after", "db1"]);
    q(&mut db1, &["MULTI"]);
    q(&mut db1, &["INCR", "tx"]);
    q(&mut db1, &["EXEC"]);
    sync.wait_caught_up(&source, SHORT);
    assert_eq!(target.dbsize(0), 0);
    assert_eq!(target.dbsize(1), 0);
    let diffs = diff_db(&source, 1, &target, 5);
    assert!(diffs.is_empty(), "{diffs:?}");
    assert_eq!(target.dbsize(5), 3);
}

#[test]
fn flushes_are_replayed_on_the_copied_databases() {
    let source = RedisServer::start();
    let target = RedisServer::start();
    let sync = started(&source, &target, &[]);
    let mut db0 = source.client_db(0);
    let mut db1 = source.client_db(1);
    q(&mut db0, &["SET", "a", "1"]);
    q(&mut db1, &["SET", "b", "1"]);
    sync.wait_caught_up(&source, SHORT);
    assert_eq!(target.dbsize(1), 1);
    q(&mut db1, &["FLUSHDB"]);
    sync.wait_caught_up(&source, SHORT);
    assert_eq!(target.dbsize(1), 0);
    assert_eq!(target.dbsize(0), 1);
    q(&mut db1, &["SET", "c", "1"]);
    q(&mut db0, &["FLUSHALL"]);
    q(&mut db0, &["SET", "after", "flushall"]);
    sync.wait_caught_up(&source, SHORT);
    assert_same(&source, &target);
    assert_eq!(target.dbsize(0), 1);
    assert!(
        sync.log().contains("source ran a flush"),
        "flushes are logged loudly"
    );
}

#[test]
fn a_flushall_inside_a_transaction_respects_the_database_filter() {
    // Only database 1 is copied (into database 5); the target's other
    // databases hold data of their own that a FLUSHALL on the source must
    // not reach.
    let source = RedisServer::start();
    let target = RedisServer::start();
    q(&mut target.client_db(0), &["SET", "targets-own", "keep me"]);
    q(&mut source.client_db(1), &["SET", "copied", "1"]);
    let sync = started(
        &source,
        &target,
        &["--db", "1", "--db-map", "1:5", "--on-conflict", "ignore"],
    );
    let mut db1 = source.client_db(1);
    q(&mut db1, &["MULTI"]);
    q(&mut db1, &["SET", "in-tx", "1"]);
    q(&mut db1, &["FLUSHALL"]);
    q(&mut db1, &["SET", "after-flush", "2"]);
    q(&mut db1, &["SWAPDB", "0", "1"]);
    q(&mut db1, &["EXEC"]);
    sync.wait_caught_up(&source, SHORT);
    let kept: Option<String> = redis::cmd("GET")
        .arg("targets-own")
        .query(&mut target.client_db(0))
        .unwrap();
    assert_eq!(
        kept.as_deref(),
        Some("keep me"),
        "FLUSHALL reached a database that is not copied"
    );
    // The SWAPDB could not be mirrored and says so.
    assert!(
        sync.log().contains("command not replayed"),
        "{}",
        sync.log()
    );
}
