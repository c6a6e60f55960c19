//! Key filters (`--include` / `--exclude`, prefixes or Redis globs) on the
//! snapshot and on the stream: commands are trimmed to the kept keys, a
//! command that would move data from a left-out key into a kept one is
//! reported, and `verify` with the same filters agrees.

use std::collections::BTreeSet;

use harness::{RedisServer, Shardsync, SHORT};

const BIN: &str = env!("CARGO_BIN_EXE_shardsync");

const FILTERS: [&str; 6] = [
    "--include",
    "user:",
    "--include",
    "order:*",
    "--exclude",
    "*:tmp:*",
];

/// What the filters above keep, written independently of shardsync.
fn kept(key: &str) -> bool {
    (key.starts_with("user:") || key.starts_with("order:")) && !key.contains(":tmp:")
}

fn keys(server: &RedisServer) -> BTreeSet<String> {
    let all: Vec<String> = server.cmd(&["KEYS", "*"]);
    all.into_iter()
        .filter(|k| !harness::compare::is_internal(k.as_bytes()))
        .collect()
}

fn run(server: &RedisServer, args: &[&str]) {
    let _: redis::Value = server.cmd(args);
}

/// Kept keys of the source with the value each has; the target must hold
/// exactly these.
fn assert_target_holds_the_kept_keys(source: &RedisServer, target: &RedisServer) {
    let want: BTreeSet<String> = keys(source).into_iter().filter(|k| kept(k)).collect();
    let have = keys(target);
    let missing: Vec<&String> = want.difference(&have).collect();
    let extra: Vec<&String> = have.difference(&want).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "missing on the target: {missing:?}\nnot to be copied but there: {extra:?}"
    );
    for k in &want {
        let t: String = source.cmd(&["TYPE", k]);
        if t == "string" {
            let a: Option<String> = source.cmd(&["GET", k]);
            let b: Option<String> = target.cmd(&["GET", k]);
            assert_eq!(a, b, "{k}");
        }
    }
}

#[test]
fn filters_select_keys_in_the_snapshot_and_trim_the_stream() {
    let source = RedisServer::start();
    for prefix in ["user:", "order:", "cache:", "user:tmp:", "order:tmp:"] {
        harness::data::load_strings(&source, 300, prefix);
    }
    run(&source, &["SADD", "cache:set", "a", "b"]);
    run(&source, &["SADD", "user:set", "c"]);
    let target = RedisServer::start();
    let (s, t) = (source.url(), target.url());
    let mut args = vec!["--source", &s, "--target", &t];
    args.extend(FILTERS);
    let sync = Shardsync::sync(BIN, &args);
    sync.wait_caught_up(&source, SHORT);
    assert_eq!(target.dbsize(0), 601, "300 user:, 300 order: and user:set");
    assert_target_holds_the_kept_keys(&source, &target);

    // The stream: single keys, multi-key commands trimmed, renames across
    // the filter's edge, a transaction mixing kept and dropped keys.
    for cmd in [
        &["SET", "user:new", "1"][..],
        &["SET", "cache:new", "1"],
        &["SET", "user:tmp:new", "1"],
        &["MSET", "user:m", "1", "cache:m", "2", "order:m", "3"],
        &["DEL", "user:0", "cache:0", "order:tmp:0"],
        &["UNLINK", "cache:1", "order:1"],
        &["RENAME", "user:2", "cache:renamed"],
        &["RENAME", "order:2", "order:renamed"],
        &["RENAME", "cache:2", "cache:renamed2"],
        &["SMOVE", "user:set", "cache:set", "c"],
        &["EXPIRE", "user:3", "1000"],
        &["SADD", "user:set", "d"],
    ] {
        run(&source, cmd);
    }
    let mut con = source.client();
    let _: () = redis::pipe()
        .atomic()
        .cmd("SET")
        .arg("user:tx")
        .arg("1")
        .ignore()
        .cmd("SET")
        .arg("cache:tx")
        .arg("1")
        .ignore()
        .cmd("INCR")
        .arg("order:counter")
        .ignore()
        .query(&mut con)
        .unwrap();
    sync.wait_caught_up(&source, SHORT);
    assert_target_holds_the_kept_keys(&source, &target);
    let ttl: i64 = target.cmd(&["TTL", "user:3"]);
    assert!(ttl > 900, "EXPIRE on a kept key is replayed (ttl {ttl})");
    let members: BTreeSet<String> = target.cmd(&["SMEMBERS", "user:set"]);
    assert_eq!(
        members,
        BTreeSet::from(["d".to_string()]),
        "SMOVE to a dropped set removed the member"
    );

    // `verify` with the same filters finds nothing to report.
    let mut vargs = vec!["--source", &s, "--target", &t];
    vargs.extend(FILTERS);
    let done = Shardsync::run(BIN, "verify", &vargs, SHORT);
    assert_eq!(done.code(), Some(0), "{}", done.log);
    assert!(done.log.contains("0 differences"), "{}", done.log);

    // Data from a left-out key into a kept one has no equivalent: the
    // command is reported (named, with its source) and counted.
    run(&source, &["SUNIONSTORE", "user:union", "cache:set"]);
    run(&source, &["SET", "user:after", "1"]);
    sync.wait_caught_up(&source, SHORT);
    let log = sync.log();
    assert!(
        log.contains("SUNIONSTORE user:union") && log.contains(&source.addr()),
        "{log}"
    );
    let s_json = sync.status().unwrap();
    assert_eq!(
        target
            .cmd::<Option<String>>(&["GET", "user:after"])
            .as_deref(),
        Some("1")
    );
    let metrics = sync.metrics().unwrap();
    let unsupported: f64 = harness::shardsync::parse_prometheus(&metrics)
        .unwrap()
        .into_iter()
        .filter(|(n, _)| n.starts_with("shardsync_commands_unsupported_total"))
        .map(|(_, v)| v)
        .sum();
    assert_eq!(unsupported, 1.0, "{s_json}");
    let done = Shardsync::run(BIN, "verify", &vargs, SHORT);
    assert_eq!(done.code(), Some(4), "{}", done.log);
    assert!(done.log.contains("user:union"), "{}", done.log);
}
