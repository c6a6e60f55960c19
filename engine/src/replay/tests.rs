//! The replay rules, table-driven: RESP bytes in, the actions out, one
//! line per action (`check(config, input, expect)`).

use std::collections::BTreeMap;

use bytes::{BufMut, BytesMut};

use super::snapshot::EntryPlan;
use super::*;
use crate::filter::{KeyFilter, KeyPattern};
use crate::resp::{encode, parse_command};
use crate::restore::Carry;
use crate::slot::slot;

const NOW: i64 = 1_700_000_000_000;

fn standalone() -> (ReplayConfig, bool) {
    (ReplayConfig::default(), false)
}

fn cluster() -> (ReplayConfig, bool) {
    let cfg = ReplayConfig {
        db_filter: DbFilter::new(vec![0], BTreeMap::new()),
        ..ReplayConfig::default()
    };
    (cfg, true)
}

fn with(base: (ReplayConfig, bool), f: impl FnOnce(&mut ReplayConfig)) -> (ReplayConfig, bool) {
    let (mut cfg, cluster) = base;
    f(&mut cfg);
    (cfg, cluster)
}

fn dbs(only: &[u32], map: &[(u32, u32)]) -> DbFilter {
    DbFilter::new(only.to_vec(), map.iter().copied().collect())
}

/// One argument, readable: as is when short and printable, else its size.
fn show_arg(a: &[u8]) -> String {
    if a.len() <= 40 && a.iter().all(|b| b.is_ascii_graphic()) {
        String::from_utf8_lossy(a).into_owned()
    } else {
        format!("<{} bytes>", a.len())
    }
}

fn show_cmd(cmd: &Command) -> String {
    cmd.args().map(show_arg).collect::<Vec<_>>().join(" ")
}

fn show_body(body: &Body) -> String {
    let mut buf = BytesMut::from(body.bytes());
    let cmd = parse_command(&mut buf)
        .expect("valid RESP")
        .expect("a whole command");
    assert!(buf.is_empty(), "one command per send");
    show_cmd(&cmd)
}

fn show_dest(to: Dest) -> String {
    match to {
        Dest::Db(Some(db)) => format!("db{db}"),
        Dest::Db(None) => "db-".into(),
        Dest::Slot(s) => format!("slot{s}"),
        Dest::AnyNode => "any".into(),
        Dest::Everywhere => "all".into(),
    }
}

fn show(action: &Action) -> String {
    match action {
        Action::Send { to, expect, body } => {
            let expect = match expect {
                ExpectKind::Ok => "ok",
                ExpectKind::KeepExisting => "keep",
                ExpectKind::KeepExistingFunction => "keepfn",
                ExpectKind::TxBegin => "begin",
                ExpectKind::TxQueued => "queued",
                ExpectKind::TxEnd => "end",
                ExpectKind::TxGuard => "guard",
            };
            format!("{} {expect} {}", show_dest(*to), show_body(body))
        }
        Action::Rewrite(rewrite) => {
            let (plan, cmd) = &**rewrite;
            let kind = match plan {
                Plan::Rename { .. } => "rename",
                Plan::Copy { .. } => "copy",
                Plan::ListMove { .. } => "listmove",
                Plan::Colocate { .. } => "colocate",
                other => panic!("not a rewrite: {other:?}"),
            };
            format!("rewrite {kind} {}", show_cmd(cmd))
        }
        Action::HandOver { slot, import } => match import {
            Some(key) => format!("handover import {} slot{slot}", show_arg(key)),
            None => format!("handover slot{slot}"),
        },
        Action::GetAck => "getack".into(),
        Action::Heartbeat { written_ms } => format!("heartbeat {written_ms}"),
        Action::Event(e) => match &**e {
            Event::Filtered => "filtered".into(),
            Event::NotReplayed { command, reason } => {
                format!("not-replayed {} ({reason})", command.trim_end())
            }
            Event::Flushed {
                command,
                target_dbs,
            } => format!("flushed {command} {target_dbs}"),
            Event::Split => "split".into(),
            Event::Rewritten => "rewritten".into(),
            Event::TxSplit => "tx-split".into(),
            Event::Restamped => "restamped".into(),
            Event::MovedAway { command } => format!("moved-away {command}"),
            Event::Rebuilt { key, loss } => {
                let mut s = format!("rebuilt {}", show_arg(key));
                if loss.field_ttls > 0 {
                    s += &format!(" field_ttls={}", loss.field_ttls);
                }
                s
            }
        },
    }
}

/// The stream: each command encoded as RESP, all in one buffer.
fn stream(commands: &[Vec<Vec<u8>>]) -> BytesMut {
    let mut buf = BytesMut::new();
    for args in commands {
        encode::command(&mut buf, args);
    }
    buf
}

fn words(line: &str) -> Vec<Vec<u8>> {
    line.split_whitespace()
        .map(|w| w.as_bytes().to_vec())
        .collect()
}

/// Feeds the RESP bytes of `input` through a fresh [`Replay`] and returns
/// the actions, one line each.
fn run_args(base: (ReplayConfig, bool), input: &[Vec<Vec<u8>>]) -> Result<String, ReplayError> {
    run_settled(base, None, input)
}

/// As [`run_args`], from a cluster source whose settled slots are `settled`.
fn run_settled(
    base: (ReplayConfig, bool),
    settled: Option<crate::slot::SlotSet>,
    input: &[Vec<Vec<u8>>],
) -> Result<String, ReplayError> {
    let (cfg, is_cluster) = base;
    let mut replay = Replay::new(cfg, is_cluster);
    replay.set_settled(settled);
    let mut buf = stream(input);
    let mut out = Vec::new();
    while let Some(cmd) = parse_command(&mut buf).expect("valid RESP") {
        replay.step(cmd, || NOW, &mut out)?;
    }
    assert!(buf.is_empty());
    Ok(out.iter().map(show).collect::<Vec<_>>().join("\n"))
}

#[track_caller]
fn check(base: (ReplayConfig, bool), input: &[&str], expect: &str) {
    let input: Vec<Vec<Vec<u8>>> = input.iter().map(|l| words(l)).collect();
    check_args(base, &input, expect);
}

#[track_caller]
fn check_args(base: (ReplayConfig, bool), input: &[Vec<Vec<u8>>], expect: &str) {
    let got = run_args(base, input).expect("the stream is valid");
    let want: Vec<&str> = expect
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    assert_eq!(
        got,
        want.join("\n"),
        "\n--- got:\n{got}\n--- want:\n{}",
        want.join("\n")
    );
}

/// A DUMP payload of a string, stamped with `rdb_version`.
fn string_payload(value: &[u8], rdb_version: u16) -> Vec<u8> {
    let mut p = BytesMut::new();
    p.put_u8(crate::rdb::consts::TYPE_STRING);
    p.put_u8(value.len() as u8);
    p.extend_from_slice(value);
    crate::rdb::finish_dump_payload(&mut p, rdb_version);
    p.to_vec()
}

fn restore(key: &str, payload: Vec<u8>, rest: &[&str]) -> Vec<Vec<u8>> {
    let mut args = vec![b"RESTORE".to_vec(), key.into(), b"0".to_vec(), payload];
    args.extend(rest.iter().map(|a| a.as_bytes().to_vec()));
    args
}

fn include(prefixes: &[&str]) -> KeyFilter {
    KeyFilter::new(
        prefixes.iter().map(|p| KeyPattern::parse(p)).collect(),
        Vec::new(),
    )
}

// ------------------------------------------------------ chatter, SELECT

#[test]
fn a_write_goes_to_its_database() {
    check(standalone(), &["SET a 1"], "db0 ok SET a 1");
}

#[test]
fn select_changes_the_database_of_what_follows() {
    check(
        standalone(),
        &["SELECT 3", "SET a 1", "SELECT 0", "INCR b"],
        "db3 ok SET a 1
         db0 ok INCR b",
    );
}

#[test]
fn ping_and_replconf_are_never_replayed() {
    check(
        standalone(),
        &["PING", "REPLCONF ACK 10", "SET a 1"],
        "db0 ok SET a 1",
    );
}

#[test]
fn getack_asks_for_an_acknowledgement() {
    check(standalone(), &["REPLCONF GETACK *"], "getack");
}

#[test]
fn a_select_without_a_number_stops_the_stream() {
    let input = vec![words("SELECT x")];
    assert!(matches!(
        run_args(standalone(), &input),
        Err(ReplayError::BadSelect(_))
    ));
}

#[test]
fn an_atomic_slot_migration_in_the_stream_stops_it_with_its_command() {
    for line in [
        "CLUSTER SYNCSLOTS ESTABLISH SOURCE aa NAME bb SLOTSRANGE 0 99",
        "cluster syncslots CONF ASM-TASK x:a:b:import:connecting:0-99",
        "TRIMSLOTS RANGES 1 0 99",
        "SFLUSH 0 99",
    ] {
        for base in [standalone(), cluster()] {
            let input = vec![words("SET a 1"), words(line)];
            match run_args(base, &input) {
                Err(ReplayError::SlotMigration { command }) => {
                    assert!(line.to_uppercase().starts_with(&command[..7]), "{command}");
                    let text = ReplayError::SlotMigration { command }.to_string();
                    assert!(text.contains("cannot follow yet"), "{text}");
                }
                other => panic!("{line}: {other:?}"),
            }
        }
    }
    // Other CLUSTER subcommands are not migrations.
    assert!(run_args(standalone(), &[words("CLUSTER RESET")]).is_ok());
}

// ------------------------------------------------------ database filter

#[test]
fn writes_in_databases_not_copied_are_filtered() {
    let base = with(standalone(), |c| c.db_filter = dbs(&[0], &[]));
    check(
        base,
        &["SELECT 1", "SET a 1", "SELECT 0", "SET b 2"],
        "filtered\ndb0 ok SET b 2",
    );
}

#[test]
fn db_map_renames_the_database() {
    let base = with(standalone(), |c| c.db_filter = dbs(&[1], &[(1, 5)]));
    check(base, &["SELECT 1", "HSET h f v"], "db5 ok HSET h f v");
}

#[test]
fn scripts_in_databases_not_copied_are_filtered() {
    let base = with(standalone(), |c| c.db_filter = dbs(&[0], &[]));
    check(base, &["SELECT 2", "EVAL return 0"], "filtered");
}

// ------------------------------------------------------ PUBLISH, FUNCTION

#[test]
fn publish_is_filtered_by_default() {
    check(standalone(), &["PUBLISH ch hello"], "filtered");
}

#[test]
fn publish_is_replayed_when_asked_in_no_particular_database() {
    let base = with(standalone(), |c| c.replay_publish = true);
    check(
        base,
        &["SELECT 4", "PUBLISH ch hello"],
        "db- ok PUBLISH ch hello",
    );
}

#[test]
fn function_load_goes_to_no_particular_database() {
    check(
        standalone(),
        &["SELECT 2", "FUNCTION DELETE lib"],
        "db- ok FUNCTION DELETE lib",
    );
}

// ------------------------------------------------------ FLUSHALL, FLUSHDB

#[test]
fn flushall_with_every_database_copied_flushes_all() {
    check(
        standalone(),
        &["FLUSHALL"],
        "flushed FLUSHALL all
         db- ok FLUSHALL",
    );
}

#[test]
fn flushall_under_a_db_filter_flushes_only_the_copied_databases_at_once() {
    let base = with(standalone(), |c| c.db_filter = dbs(&[0, 2], &[(2, 7)]));
    check(
        base,
        &["FLUSHALL"],
        "flushed FLUSHALL 0,7
         db0 begin MULTI
         db- queued FLUSHDB
         db- queued SELECT 7
         db- queued FLUSHDB
         db- end EXEC
         db- ok SELECT 0",
    );
}

#[test]
fn flushall_keeps_its_async_modifier_under_a_db_filter() {
    let base = with(standalone(), |c| c.db_filter = dbs(&[3], &[]));
    check(
        base,
        &["FLUSHALL ASYNC"],
        "flushed FLUSHALL 3
         db3 ok FLUSHDB ASYNC",
    );
}

#[test]
fn flushall_in_a_transaction_follows_the_same_rules() {
    // Outside and inside a transaction the rule is one: the modifier stays.
    let base = with(standalone(), |c| c.db_filter = dbs(&[0], &[]));
    check(
        base,
        &["MULTI", "SET a 1", "FLUSHALL ASYNC", "EXEC"],
        "flushed FLUSHALL 0
         db0 begin MULTI
         db- queued SET a 1
         db- queued FLUSHDB ASYNC
         db- end EXEC",
    );
}

#[test]
fn flushdb_of_a_copied_database_is_replayed_there() {
    let base = with(standalone(), |c| c.db_filter = dbs(&[3], &[(3, 4)]));
    check(
        base,
        &["SELECT 3", "FLUSHDB"],
        "flushed FLUSHDB 4
         db4 ok FLUSHDB",
    );
}

#[test]
fn flushdb_of_a_database_not_copied_is_filtered() {
    let base = with(standalone(), |c| c.db_filter = dbs(&[0], &[]));
    check(base, &["SELECT 3", "FLUSHDB"], "filtered");
}

// ------------------------------------------------------ SWAPDB, MOVE

#[test]
fn swapdb_with_every_database_copied_is_replayed() {
    check(standalone(), &["SWAPDB 0 1"], "db- ok SWAPDB 0 1");
}

#[test]
fn swapdb_touching_a_copied_database_under_a_filter_is_reported() {
    let base = with(standalone(), |c| c.db_filter = dbs(&[0], &[]));
    check(
        base,
        &["SWAPDB 0 5"],
        "not-replayed SWAPDB 0 (databases are filtered or renamed (--db / --db-map), so moving data between them cannot be mirrored)",
    );
}

#[test]
fn swapdb_of_databases_not_copied_is_filtered() {
    let base = with(standalone(), |c| c.db_filter = dbs(&[0], &[]));
    check(base, &["SWAPDB 2 3"], "filtered");
}

#[test]
fn swapdb_of_databases_not_copied_into_a_cluster_is_filtered() {
    check(
        cluster(),
        &["SWAPDB 2 3", "SET a 1"],
        "filtered\nslot15495 ok SET a 1",
    );
}

#[test]
fn swapdb_of_the_copied_database_into_a_cluster_is_reported() {
    check(
        cluster(),
        &["SWAPDB 0 3"],
        "not-replayed SWAPDB 0 (a cluster has only database 0)",
    );
}

#[test]
fn move_with_every_database_copied_is_replayed_in_its_database() {
    check(standalone(), &["SELECT 2", "MOVE k 1"], "db2 ok MOVE k 1");
}

#[test]
fn move_into_a_copied_database_from_one_not_copied_is_reported() {
    let base = with(standalone(), |c| c.db_filter = dbs(&[1], &[]));
    check(
        base,
        &["SELECT 2", "MOVE k 1"],
        "not-replayed MOVE k (databases are filtered or renamed (--db / --db-map), so moving data between them cannot be mirrored)",
    );
}

#[test]
fn move_between_databases_not_copied_is_filtered() {
    let base = with(standalone(), |c| c.db_filter = dbs(&[0], &[]));
    check(base, &["SELECT 2", "MOVE k 3"], "filtered");
}

// ------------------------------------------------------ transactions

#[test]
fn a_transaction_is_sent_whole_in_its_database() {
    check(
        standalone(),
        &["SELECT 1", "MULTI", "SET a 1", "INCR b", "EXEC"],
        "db1 begin MULTI
         db- queued SET a 1
         db- queued INCR b
         db- end EXEC",
    );
}

#[test]
fn a_select_inside_a_transaction_is_kept_and_undone_after_exec() {
    check(
        standalone(),
        &["MULTI", "SET a 1", "SELECT 2", "SET b 2", "EXEC", "SET c 3"],
        "db0 begin MULTI
         db- queued SET a 1
         db- queued SELECT 2
         db- queued SET b 2
         db- end EXEC
         db- ok SELECT 0
         db2 ok SET c 3",
    );
}

#[test]
fn a_discarded_transaction_sends_nothing() {
    check(
        standalone(),
        &["MULTI", "SET a 1", "DISCARD", "SET b 2"],
        "db0 ok SET b 2",
    );
}

#[test]
fn commands_of_a_transaction_in_databases_not_copied_are_left_out() {
    let base = with(standalone(), |c| c.db_filter = dbs(&[0], &[]));
    check(
        base,
        &["MULTI", "SET a 1", "SELECT 1", "SET b 2", "EXEC"],
        "filtered
         db0 begin MULTI
         db- queued SET a 1
         db- end EXEC",
    );
}

#[test]
fn a_transaction_with_nothing_copied_sends_nothing() {
    let base = with(standalone(), |c| c.db_filter = dbs(&[0], &[]));
    check(base, &["SELECT 1", "MULTI", "SET b 2", "EXEC"], "filtered");
}

#[test]
fn an_exec_without_multi_sends_nothing() {
    check(standalone(), &["EXEC"], "");
}

#[test]
fn the_open_transaction_holds_its_commands_until_exec() {
    let (cfg, is_cluster) = standalone();
    let mut replay = Replay::new(cfg, is_cluster);
    let mut out = Vec::new();
    for line in ["MULTI", "SET a 1"] {
        let cmd = Command::from_args(&words(line));
        replay.step(cmd, || NOW, &mut out).unwrap();
    }
    assert!(replay.in_tx());
    assert!(out.is_empty());
    replay
        .step(Command::from_args(&["EXEC"]), || NOW, &mut out)
        .unwrap();
    assert!(!replay.in_tx());
    assert_eq!(out.len(), 3);
}

// ------------------------------------------------------ heartbeat

#[test]
fn our_heartbeat_is_measured_and_dropped() {
    let base = with(standalone(), |c| c.heartbeat_id = Some("t1".into()));
    check(
        base,
        &[
            "SETEX {ss1}shardsync:heartbeat:t1 10 1700000000123",
            "SET a 1",
        ],
        "heartbeat 1700000000123
         filtered
         db0 ok SET a 1",
    );
}

#[test]
fn another_tasks_heartbeat_is_ordinary_data() {
    let base = with(standalone(), |c| c.heartbeat_id = Some("t1".into()));
    check(
        base,
        &["SETEX shardsync:heartbeat:t2 10 5"],
        "db0 ok SETEX shardsync:heartbeat:t2 10 5",
    );
}

// ------------------------------------------------------ key filter

#[test]
fn keys_left_out_are_filtered() {
    let base = with(standalone(), |c| c.key_filter = include(&["user:"]));
    check(
        base,
        &["SET order:1 x", "SET user:1 y"],
        "filtered\ndb0 ok SET user:1 y",
    );
}

#[test]
fn a_multi_key_command_is_trimmed_to_the_kept_keys() {
    let base = with(standalone(), |c| c.key_filter = include(&["user:"]));
    check(
        base,
        &["DEL user:1 order:1 user:2"],
        "db0 ok DEL user:1 user:2",
    );
}

#[test]
fn a_move_from_left_out_keys_into_kept_ones_is_reported() {
    let base = with(standalone(), |c| c.key_filter = include(&["user:"]));
    check(
        base,
        &["RENAME order:1 user:1"],
        "not-replayed RENAME order:1 (it moves data from keys left out by --include/--exclude into kept ones)",
    );
}

#[test]
fn a_trimmed_command_inside_a_transaction_stays_in_it() {
    let base = with(standalone(), |c| c.key_filter = include(&["user:"]));
    check(
        base,
        &["MULTI", "MSET user:1 a order:1 b", "INCR user:2", "EXEC"],
        "db0 begin MULTI
         db- queued MSET user:1 a
         db- queued INCR user:2
         db- end EXEC",
    );
}

#[test]
fn a_rename_of_a_kept_key_to_a_left_out_one_deletes_it() {
    let base = with(standalone(), |c| c.key_filter = include(&["user:"]));
    check(base, &["RENAME user:1 order:1"], "db0 ok DEL user:1");
}

// ------------------------------------------------------ older targets

#[test]
fn stream_counters_are_dropped_for_a_target_before_7_0() {
    let base = with(standalone(), |c| c.target_caps = TargetCaps::new(6, 2));
    check(
        base,
        &["XSETID s 5-0 ENTRIESADDED 9 MAXDELETEDID 3-0"],
        "db0 ok XSETID s 5-0",
    );
}

#[test]
fn a_restore_the_target_reads_goes_as_it_is() {
    let input = vec![restore("k", string_payload(b"v", 10), &["REPLACE"])];
    let base = with(standalone(), |c| c.target_caps = TargetCaps::new(7, 0));
    check_args(base, &input, "db0 ok RESTORE k 0 <13 bytes> REPLACE");
}

#[test]
fn a_restore_payload_newer_than_the_target_is_restamped() {
    let input = vec![restore("k", string_payload(b"v", 10), &["REPLACE"])];
    let base = with(standalone(), |c| c.target_caps = TargetCaps::new(6, 2));
    let (cfg, is_cluster) = base;
    let mut replay = Replay::new(cfg.clone(), is_cluster);
    let mut buf = stream(&input);
    let mut out = Vec::new();
    let cmd = parse_command(&mut buf).unwrap().unwrap();
    replay.step(cmd, || NOW, &mut out).unwrap();
    let lines: Vec<String> = out.iter().map(show).collect();
    assert_eq!(
        lines,
        ["restamped", "db0 ok RESTORE k 0 <13 bytes> REPLACE"]
    );
    let Action::Send { body, .. } = &out[1] else {
        panic!("a send")
    };
    let mut b = BytesMut::from(body.bytes());
    let sent = parse_command(&mut b).unwrap().unwrap();
    assert_eq!(
        crate::restore::check_dump_payload(sent.arg(3)),
        Ok((crate::rdb::consts::TYPE_STRING, 9)),
        "stamped with 6.2's RDB version, checksum redone"
    );
}

#[test]
fn force_rewrite_rebuilds_a_replicated_restore() {
    let input = vec![restore("k", string_payload(b"v", 10), &["REPLACE"])];
    let base = with(standalone(), |c| c.force_rewrite = true);
    check_args(base, &input, "rebuilt k\ndb0 ok SET k v");
}

#[test]
fn a_rebuilt_restore_inside_a_transaction_joins_it() {
    let input = vec![
        words("MULTI"),
        restore("k", string_payload(b"v", 10), &[]),
        words("INCR n"),
        words("EXEC"),
    ];
    let base = with(standalone(), |c| c.force_rewrite = true);
    check_args(
        base,
        &input,
        "rebuilt k
         db0 begin MULTI
         db- queued SET k v NX
         db- queued INCR n
         db- end EXEC",
    );
}

#[test]
fn a_restore_payload_that_does_not_decode_is_reported() {
    // A well-formed trailer around a body that is no listpack.
    let mut p = BytesMut::new();
    p.put_u8(crate::rdb::consts::TYPE_HASH_LISTPACK);
    p.extend_from_slice(b"\x05junk!");
    crate::rdb::finish_dump_payload(&mut p, 11);
    let input = vec![restore("h", p.to_vec(), &["REPLACE"])];
    let base = with(standalone(), |c| c.target_caps = TargetCaps::new(6, 2));
    let got = run_args(base, &input).unwrap();
    assert!(
        got.starts_with("not-replayed RESTORE h (its payload cannot be decoded"),
        "{got}"
    );
}

#[test]
fn a_restore_with_a_broken_checksum_is_left_to_the_target() {
    let mut payload = string_payload(b"v", 10);
    let n = payload.len();
    payload[n - 1] ^= 0xff;
    let input = vec![restore("k", payload, &[])];
    let base = with(standalone(), |c| c.target_caps = TargetCaps::new(6, 2));
    check_args(base, &input, "db0 ok RESTORE k 0 <13 bytes>");
}

// ------------------------------------------------------ cluster targets

#[test]
fn on_a_cluster_a_command_goes_to_its_slot() {
    check(
        cluster(),
        &["SET a 1", "HSET b f v"],
        "slot15495 ok SET a 1\nslot3300 ok HSET b f v",
    );
}

#[test]
fn on_a_cluster_only_database_0_is_copied() {
    check(cluster(), &["SELECT 1", "SET a 1"], "filtered");
}

#[test]
fn on_a_cluster_independent_keys_are_split_per_slot() {
    check(
        cluster(),
        &["DEL a b {a}x"],
        "split
         slot15495 ok DEL a {a}x
         slot3300 ok DEL b",
    );
}

#[test]
fn on_a_cluster_mset_across_slots_is_split() {
    check(
        cluster(),
        &["MSET a 1 b 2"],
        "split
         slot15495 ok MSET a 1
         slot3300 ok MSET b 2",
    );
}

#[test]
fn on_a_cluster_a_rename_across_slots_is_rewritten() {
    check(
        cluster(),
        &["RENAME a b"],
        "rewritten\nrewrite rename RENAME a b",
    );
}

#[test]
fn on_a_cluster_a_rename_within_a_slot_goes_whole() {
    check(
        cluster(),
        &["RENAME {a}1 {a}2"],
        "slot15495 ok RENAME {a}1 {a}2",
    );
}

#[test]
fn on_a_cluster_a_list_move_across_slots_is_rewritten() {
    check(
        cluster(),
        &["LMOVE a b LEFT RIGHT"],
        "rewritten\nrewrite listmove LMOVE a b LEFT RIGHT",
    );
}

#[test]
fn on_a_cluster_a_store_with_sources_elsewhere_is_colocated() {
    check(
        cluster(),
        &["SUNIONSTORE a b c"],
        "rewritten\nrewrite colocate SUNIONSTORE a b c",
    );
}

#[test]
fn on_a_cluster_a_transaction_in_one_slot_stays_atomic() {
    check(
        cluster(),
        &["MULTI", "SET {a}1 x", "INCR {a}2", "EXEC"],
        "slot15495 begin MULTI
         slot15495 queued SET {a}1 x
         slot15495 queued INCR {a}2
         slot15495 end EXEC",
    );
}

#[test]
fn on_a_cluster_a_transaction_across_slots_is_one_per_slot() {
    check(
        cluster(),
        &["MULTI", "SET a 1", "SET b 2", "DEL {a}x {b}y", "EXEC"],
        "tx-split
         slot15495 begin MULTI
         slot15495 queued SET a 1
         slot15495 queued DEL {a}x
         slot15495 end EXEC
         slot3300 begin MULTI
         slot3300 queued SET b 2
         slot3300 queued DEL {b}y
         slot3300 end EXEC",
    );
}

#[test]
fn on_a_cluster_a_transaction_with_a_rewrite_goes_command_by_command() {
    check(
        cluster(),
        &["MULTI", "SET a 1", "RENAME a b", "EXEC"],
        "tx-split
         slot15495 ok SET a 1
         rewritten
         rewrite rename RENAME a b",
    );
}

#[test]
fn on_a_cluster_flushall_goes_everywhere() {
    check(
        cluster(),
        &["FLUSHALL"],
        "flushed FLUSHALL all\nall ok FLUSHALL",
    );
}

#[test]
fn on_a_cluster_functions_go_everywhere() {
    check(
        cluster(),
        &["FUNCTION DELETE lib"],
        "all ok FUNCTION DELETE lib",
    );
}

#[test]
fn on_a_cluster_publish_goes_to_any_node_and_spublish_to_its_slot() {
    let base = with(cluster(), |c| c.replay_publish = true);
    check(
        base,
        &["PUBLISH ch m", "SPUBLISH a m"],
        "any ok PUBLISH ch m\nslot15495 ok SPUBLISH a m",
    );
}

#[test]
fn on_a_cluster_move_is_reported() {
    check(
        cluster(),
        &["MOVE a 1"],
        "not-replayed MOVE a (a cluster has only database 0)",
    );
}

#[test]
fn unknown_commands_route_by_their_first_argument() {
    check(
        cluster(),
        &["MODULE.SET a 1", "MODULE.TICK"],
        "slot15495 ok MODULE.SET a 1\nany ok MODULE.TICK",
    );
}

#[test]
fn on_a_cluster_a_rebuilt_restore_is_a_transaction_in_its_slot() {
    let input = vec![restore("a", string_payload(b"v", 10), &["REPLACE"])];
    let base = with(cluster(), |c| c.force_rewrite = true);
    // One command: no transaction needed.
    check_args(base, &input, "rebuilt a\nslot15495 ok SET a v");
}

#[test]
fn slots_rendered_here_are_the_slots_of_their_keys() {
    // The literals the cases above use.
    assert_eq!((slot(b"a"), slot(b"b"), slot(b"c")), (15495, 3300, 7365));
}

// ------------------------------------------------------ snapshot

#[test]
fn snapshot_values_go_to_their_mapped_database() {
    let (cfg, is_cluster) = with(standalone(), |c| c.db_filter = dbs(&[2], &[(2, 6)]));
    let r = Replay::new(cfg, is_cluster);
    use crate::rdb::consts::TYPE_STRING;
    assert_eq!(
        r.plan_entry(2, b"k", TYPE_STRING, 10),
        EntryPlan::Copy {
            to: Dest::Db(Some(6)),
            carry: Carry::Restore
        }
    );
    assert_eq!(r.plan_entry(0, b"k", TYPE_STRING, 10), EntryPlan::Skip);
}

#[test]
fn snapshot_values_on_a_cluster_go_to_their_slot_and_heartbeats_nowhere() {
    let (cfg, is_cluster) = with(cluster(), |c| {
        c.heartbeat_id = Some("t".into());
        c.target_caps = TargetCaps::new(6, 2);
        c.key_filter = include(&["a", "{ss"]);
    });
    let r = Replay::new(cfg, is_cluster);
    use crate::rdb::consts::{TYPE_HASH_LISTPACK, TYPE_STRING};
    assert_eq!(
        r.plan_entry(0, b"a", TYPE_STRING, 10),
        EntryPlan::Copy {
            to: Dest::Slot(15495),
            carry: Carry::Restamp
        }
    );
    assert_eq!(
        r.plan_entry(0, b"a", TYPE_HASH_LISTPACK, 10),
        EntryPlan::Copy {
            to: Dest::Slot(15495),
            carry: Carry::Rebuild
        }
    );
    assert_eq!(
        r.plan_entry(0, b"{ss5}shardsync:heartbeat:t", TYPE_STRING, 10),
        EntryPlan::Heartbeat
    );
    assert_eq!(r.plan_entry(0, b"b", TYPE_STRING, 10), EntryPlan::Skip);
    assert_eq!(r.dest_of_functions(), Dest::Everywhere);
}

// ------------------------------------------- cluster sources: hand-overs

/// Every slot but those of `keys`.
fn settled_but(keys: &[&str]) -> crate::slot::SlotSet {
    let mut set = crate::slot::SlotSet::of_ranges(&[(0, 16383)]);
    for k in keys {
        set.remove(slot(k.as_bytes()));
    }
    set
}

fn lines(input: &[&str]) -> Vec<Vec<Vec<u8>>> {
    input.iter().map(|l| words(l)).collect()
}

#[test]
fn a_migrations_restore_asking_waits_for_a_hand_over_and_replaces() {
    // Whatever the settled slots: a migration copy always hands over.
    let mut args = restore("k", string_payload(b"v", 10), &[]);
    args[0] = b"RESTORE-ASKING".to_vec();
    args[2] = b"5000".to_vec();
    let got = run_settled(cluster(), Some(settled_but(&[])), &[args]).unwrap();
    let s = slot(b"k");
    let want = format!(
        "handover import k slot{s}\nslot{s} ok RESTORE k {} <13 bytes> REPLACE ABSTTL",
        NOW + 5000
    );
    assert_eq!(got, want);
}

#[test]
fn a_restore_asking_into_a_standalone_target_hands_over_too() {
    let mut args = restore("k", string_payload(b"v", 10), &["REPLACE"]);
    args[0] = b"RESTORE-ASKING".to_vec();
    let got = run_settled(standalone(), Some(settled_but(&[])), &[args]).unwrap();
    assert_eq!(
        got,
        format!(
            "handover import k slot{}\ndb0 ok RESTORE k 0 <13 bytes> REPLACE",
            slot(b"k")
        )
    );
}

#[test]
fn a_command_in_a_slot_not_settled_hands_over_first() {
    let input = lines(&["SET a 1", "SET b 2"]);
    let got = run_settled(cluster(), Some(settled_but(&["b"])), &input).unwrap();
    let (a, b) = (slot(b"a"), slot(b"b"));
    assert_eq!(
        got,
        format!("slot{a} ok SET a 1\nhandover slot{b}\nslot{b} ok SET b 2")
    );
    // Any key of a multi-key command; keyless commands never.
    let input = lines(&["DEL a b", "FLUSHALL"]);
    let got = run_settled(standalone(), Some(settled_but(&["b"])), &input).unwrap();
    assert_eq!(
        got,
        format!("handover slot{b}\ndb0 ok DEL a b\nflushed FLUSHALL all\ndb- ok FLUSHALL")
    );
}

#[test]
fn without_a_cluster_source_nothing_hands_over() {
    check(standalone(), &["SET b 2"], "db0 ok SET b 2");
}

#[test]
fn a_transactions_hand_over_comes_before_any_of_its_commands() {
    let input = lines(&["MULTI", "SET a 1", "SET b 2", "EXEC"]);
    let got = run_settled(standalone(), Some(settled_but(&["b"])), &input).unwrap();
    assert_eq!(
        got,
        format!(
            "handover slot{}\ndb0 begin MULTI\ndb- queued SET a 1\ndb- queued SET b 2\ndb- end EXEC",
            slot(b"b")
        )
    );
}

/// Keys copied away, for the tests.
struct Away(Vec<&'static str>);

impl MovedKeys for Away {
    fn moved_away(&self, key: &[u8]) -> bool {
        self.0.iter().any(|k| k.as_bytes() == key)
    }
}

fn run_moved(base: (ReplayConfig, bool), away: &[&'static str], input: &[&str]) -> String {
    let (cfg, is_cluster) = base;
    let mut replay = Replay::new(cfg, is_cluster);
    replay.set_moved_keys(std::sync::Arc::new(Away(away.to_vec())));
    let mut buf = stream(&lines(input));
    let mut out = Vec::new();
    while let Some(cmd) = parse_command(&mut buf).expect("valid RESP") {
        replay.step(cmd, || NOW, &mut out).unwrap();
    }
    out.iter().map(show).collect::<Vec<_>>().join("\n")
}

#[test]
fn what_a_master_still_does_to_keys_copied_away_is_not_replayed() {
    let got = run_moved(
        standalone(),
        &["{t}a"],
        &[
            "DEL {t}a {t}b",
            "SET {t}a 1",
            "SET {t}c 2",
            "SMOVE {t}a {t}s x",
        ],
    );
    assert_eq!(
        got,
        "moved-away DEL {t}a\ndb0 ok DEL {t}b\nmoved-away SET {t}a\ndb0 ok SET {t}c 2\n\
         moved-away SMOVE {t}a\ndb0 ok SADD {t}s x"
    );
}

#[test]
fn a_migrations_copy_is_never_taken_for_a_key_moved_away() {
    let mut args = restore("{t}a", string_payload(b"v", 10), &[]);
    args[0] = b"RESTORE-ASKING".to_vec();
    let (cfg, is_cluster) = standalone();
    let mut replay = Replay::new(cfg, is_cluster);
    replay.set_moved_keys(std::sync::Arc::new(Away(vec!["{t}a"])));
    let mut buf = stream(&[args]);
    let mut out = Vec::new();
    let cmd = parse_command(&mut buf).unwrap().unwrap();
    replay.step(cmd, || NOW, &mut out).unwrap();
    let got: Vec<String> = out.iter().map(show).collect();
    assert_eq!(
        got,
        [
            format!("handover import {{t}}a slot{}", slot(b"{t}a")),
            "db0 ok RESTORE {t}a 0 <13 bytes> REPLACE".to_string()
        ]
    );
}
