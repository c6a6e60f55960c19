//! Key-by-key comparison of two servers, independent of shardsync's own
//! `verify` so that tests check the product against a separate oracle.
//!
//! Every key's type, value (read per type, unordered collections sorted),
//! and exact expiry time (PEXPIRETIME) must match; streams are compared with
//! `XINFO STREAM FULL COUNT 0` (every entry and pending entry) minus what
//! legitimately differs (internal radix-tree sizes and wall-clock times of
//! consumers and deliveries); function libraries are compared with their
//! code.
//!
//! Servers before 7.0 have no PEXPIRETIME: their expiry is read as TIME +
//! PTTL, and compared with a tolerance of [`TTL_SLACK_MS`]. Their streams
//! have no counters (entries-added, max-deleted-entry-id,
//! recorded-first-entry-id), which are then left out on both sides.

use std::collections::{BTreeMap, BTreeSet};

use redis::Value;

use crate::server::RedisServer;

/// A value in a form that compares equal when the data is equal.
#[derive(Debug, PartialEq)]
enum Fingerprint {
    String(Vec<u8>),
    List(Vec<Vec<u8>>),
    Set(BTreeSet<Vec<u8>>),
    ZSet(Vec<(Vec<u8>, String)>),
    Hash(BTreeMap<Vec<u8>, Vec<u8>>),
    Stream(String),
    Other(String, Vec<u8>),
}

/// shardsync's heartbeat keys (written on a source every second, never
/// replayed by the task that writes them) are left out of comparisons.
pub fn is_heartbeat(key: &[u8]) -> bool {
    key.windows(HEARTBEAT.len()).any(|w| w == HEARTBEAT)
}

const HEARTBEAT: &[u8] = b"shardsync:heartbeat:";

/// Keys shardsync writes for itself (heartbeats on sources, applied markers
/// on targets, temporary names): `shardsync:...`, possibly after a
/// `{hash tag}`. Comparisons leave them out.
pub fn is_internal(key: &[u8]) -> bool {
    let rest = match key.strip_prefix(b"{") {
        Some(tagged) => match tagged.iter().position(|&b| b == b'}') {
            Some(end) => &tagged[end + 1..],
            None => return false,
        },
        None => key,
    };
    rest.starts_with(b"shardsync:")
}

fn keys(con: &mut redis::Connection) -> BTreeSet<Vec<u8>> {
    let mut out = BTreeSet::new();
    let mut cursor: u64 = 0;
    loop {
        let (next, batch): (u64, Vec<Vec<u8>>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("COUNT")
            .arg(1000)
            .query(con)
            .expect("SCAN");
        out.extend(batch.into_iter().filter(|k| !is_internal(k)));
        if next == 0 {
            return out;
        }
        cursor = next;
    }
}

/// Expiries read as TIME + PTTL (servers before 7.0) may differ by this.
pub const TTL_SLACK_MS: i64 = 1000;

/// How a comparison reads the servers on each side.
#[derive(Clone, Copy, Debug)]
struct Mode {
    /// PEXPIRETIME exists (7.0+); otherwise TIME + PTTL.
    exact_ttl: bool,
    /// Leave out stream counters one side cannot have.
    stream_counters: bool,
}

fn major_version(con: &mut redis::Connection) -> u32 {
    let info: String = redis::cmd("INFO").arg("server").query(con).expect("INFO");
    info.lines()
        .find_map(|l| l.strip_prefix("redis_version:"))
        .and_then(|v| v.split('.').next())
        .and_then(|m| m.trim().parse().ok())
        .unwrap_or(0)
}

fn now_ms(con: &mut redis::Connection) -> i64 {
    let (secs, micros): (i64, i64) = redis::cmd("TIME").query(con).expect("TIME");
    secs * 1000 + micros / 1000
}

/// Type, value and expiry of many keys, in two pipelined round trips.
fn fingerprints(
    con: &mut redis::Connection,
    keys: &[&Vec<u8>],
    mode: Mode,
) -> Vec<(String, Option<Fingerprint>, i64)> {
    let mut meta = redis::pipe();
    for k in keys {
        meta.cmd("TYPE").arg(k.as_slice());
        if mode.exact_ttl {
            meta.cmd("PEXPIRETIME").arg(k.as_slice());
        } else {
            meta.cmd("PTTL").arg(k.as_slice());
        }
    }
    let now = if mode.exact_ttl { 0 } else { now_ms(con) };
    let meta: Vec<Value> = meta.query(con).expect("TYPE/PEXPIRETIME");
    let mut reads = redis::pipe();
    let mut kinds = Vec::with_capacity(keys.len());
    for (i, k) in keys.iter().enumerate() {
        let kind: String = redis::from_redis_value(meta[2 * i].clone()).unwrap_or_default();
        let k = k.as_slice();
        match kind.as_str() {
            "none" => {
                reads.cmd("EXISTS").arg(k);
            }
            "string" => {
                reads.cmd("GET").arg(k);
            }
            "list" => {
                reads.cmd("LRANGE").arg(k).arg(0).arg(-1);
            }
            "set" => {
                reads.cmd("SMEMBERS").arg(k);
            }
            "zset" => {
                reads.cmd("ZRANGE").arg(k).arg(0).arg(-1).arg("WITHSCORES");
            }
            "hash" => {
                reads.cmd("HGETALL").arg(k);
            }
            "stream" => {
                reads
                    .cmd("XINFO")
                    .arg("STREAM")
                    .arg(k)
                    .arg("FULL")
                    .arg("COUNT")
                    .arg(0);
            }
            _ => {
                reads.cmd("DUMP").arg(k);
            }
        }
        kinds.push(kind);
    }
    let values: Vec<Value> = reads.query(con).expect("value reads");
    kinds
        .into_iter()
        .zip(values)
        .enumerate()
        .map(|(i, (kind, v))| {
            let mut expire: i64 = redis::from_redis_value(meta[2 * i + 1].clone()).unwrap_or(-3);
            if !mode.exact_ttl && expire >= 0 {
                expire += now;
            }
            let fp = match kind.as_str() {
                "none" => None,
                "string" => Some(Fingerprint::String(redis::from_redis_value(v).unwrap())),
                "list" => Some(Fingerprint::List(redis::from_redis_value(v).unwrap())),
                "set" => Some(Fingerprint::Set(redis::from_redis_value(v).unwrap())),
                "zset" => {
                    let flat: Vec<Vec<u8>> = redis::from_redis_value(v).unwrap();
                    Some(Fingerprint::ZSet(
                        flat.chunks(2)
                            .map(|c| (c[0].clone(), normalize_score(&c[1])))
                            .collect(),
                    ))
                }
                "hash" => Some(Fingerprint::Hash(redis::from_redis_value(v).unwrap())),
                "stream" => Some(Fingerprint::Stream(canonical_stream(
                    &v,
                    mode.stream_counters,
                ))),
                other => Some(Fingerprint::Other(
                    other.to_string(),
                    redis::from_redis_value(v).unwrap(),
                )),
            };
            (kind, fp, expire)
        })
        .collect()
}

/// Fingerprints of the keys located on each node (`at`: key -> node).
fn fingerprints_at(
    cons: &mut [redis::Connection],
    at: &BTreeMap<Vec<u8>, usize>,
    mode: Mode,
) -> BTreeMap<Vec<u8>, (String, Option<Fingerprint>, i64)> {
    let mut out = BTreeMap::new();
    for (node, con) in cons.iter_mut().enumerate() {
        let keys: Vec<&Vec<u8>> = at
            .iter()
            .filter(|(_, n)| **n == node)
            .map(|(k, _)| k)
            .collect();
        for chunk in keys.chunks(500) {
            for (k, fp) in chunk.iter().zip(fingerprints(con, chunk, mode)) {
                out.insert((*k).clone(), fp);
            }
        }
    }
    out
}

/// Scores compared as numbers (7.0 and 7.2 print some differently).
fn normalize_score(s: &[u8]) -> String {
    let text = String::from_utf8_lossy(s);
    match text.parse::<f64>() {
        Ok(v) => format!("{v:?}"),
        Err(_) => text.into_owned(),
    }
}

/// XINFO STREAM FULL as text, without fields that may differ between two
/// equal streams: radix-tree sizes (internal layout), consumer seen/active
/// times and PEL delivery times (wall clock of the server that applied them),
/// and a group's `entries-read`/`lag`: Redis 7.0 replicates XREADGROUP as
/// XCLAIM ... LASTID, which does not carry them, so even a native replica
/// shows them as nil (checked against redis-server 7.0.15).
fn canonical_stream(v: &Value, counters: bool) -> String {
    const SKIP: &[&str] = &[
        "radix-tree-keys",
        "radix-tree-nodes",
        "seen-time",
        "active-time",
        "entries-read",
        "lag",
    ];
    const COUNTERS: &[&str] = &[
        "entries-added",
        "max-deleted-entry-id",
        "recorded-first-entry-id",
    ];
    fn text(v: &Value, counters: bool) -> String {
        match v {
            Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
            Value::SimpleString(s) => s.clone(),
            Value::Int(i) => i.to_string(),
            Value::Nil => "nil".into(),
            Value::Okay => "OK".into(),
            Value::Array(items) => {
                let is_map = items.len() % 2 == 0
                    && items
                        .iter()
                        .step_by(2)
                        .all(|k| matches!(k, Value::BulkString(_) | Value::SimpleString(_)))
                    && items.iter().step_by(2).any(|k| {
                        let t = text(k, counters);
                        t.chars().all(|c| c.is_ascii_lowercase() || c == '-') && t.contains('-')
                            || [
                                "length",
                                "groups",
                                "consumers",
                                "entries",
                                "pending",
                                "name",
                                "lag",
                            ]
                            .contains(&t.as_str())
                    });
                if is_map {
                    let parts: Vec<String> = items
                        .chunks(2)
                        .filter(|kv| {
                            let k = text(&kv[0], counters);
                            !SKIP.contains(&k.as_str())
                                && (counters || !COUNTERS.contains(&k.as_str()))
                        })
                        .map(|kv| format!("{}={}", text(&kv[0], counters), text(&kv[1], counters)))
                        .collect();
                    format!("{{{}}}", parts.join(","))
                } else {
                    // PEL entries: [id, consumer, delivery-time, count] in a
                    // group, [id, delivery-time, count] in a consumer.
                    let ints = items.iter().filter(|i| matches!(i, Value::Int(_))).count();
                    let drop_time = match (items.len(), ints) {
                        (4, 2) => Some(2),
                        (3, 2) => Some(1),
                        _ => None,
                    };
                    let parts: Vec<String> = items
                        .iter()
                        .enumerate()
                        .filter(|(i, _)| Some(*i) != drop_time)
                        .map(|(_, x)| text(x, counters))
                        .collect();
                    format!("[{}]", parts.join(","))
                }
            }
            other => format!("{other:?}"),
        }
    }
    text(v, counters)
}

fn functions(con: &mut redis::Connection) -> String {
    let v: Value = redis::cmd("FUNCTION")
        .arg("LIST")
        .arg("WITHCODE")
        .query(con)
        .unwrap_or(Value::Nil);
    let mut libs: Vec<String> = match v {
        Value::Array(items) => items.iter().map(|i| format!("{i:?}")).collect(),
        _ => vec![],
    };
    libs.sort();
    libs.join("\n")
}

/// Differences between database `sdb` of `src` and `tdb` of `dst`.
pub fn diff_db(src: &RedisServer, sdb: u32, dst: &RedisServer, tdb: u32) -> Vec<String> {
    diff_nodes(&[src], sdb, &[dst], tdb)
}

/// Differences between the union of `src` nodes' database `sdb` and the
/// union of `dst` nodes' database `tdb` (a cluster's masters, or one
/// server). Each key is read on the node that holds it.
pub fn diff_nodes(src: &[&RedisServer], sdb: u32, dst: &[&RedisServer], tdb: u32) -> Vec<String> {
    let mut s_cons: Vec<redis::Connection> = src.iter().map(|n| n.client_db(sdb)).collect();
    let mut d_cons: Vec<redis::Connection> = dst.iter().map(|n| n.client_db(tdb)).collect();
    let locate = |cons: &mut Vec<redis::Connection>| {
        let mut at = BTreeMap::new();
        for (i, con) in cons.iter_mut().enumerate() {
            for k in keys(con) {
                at.insert(k, i);
            }
        }
        at
    };
    let s_major = major_version(&mut s_cons[0]);
    let d_major = major_version(&mut d_cons[0]);
    let both_70 = s_major >= 7 && d_major >= 7;
    let mode = |major: u32| Mode {
        exact_ttl: major >= 7,
        stream_counters: both_70,
    };
    let s_keys = locate(&mut s_cons);
    let d_keys = locate(&mut d_cons);
    let s_fps = fingerprints_at(&mut s_cons, &s_keys, mode(s_major));
    let d_fps = fingerprints_at(&mut d_cons, &d_keys, mode(d_major));
    let slack = if both_70 { 0 } else { TTL_SLACK_MS };
    let mut out = Vec::new();
    for k in d_keys.keys().filter(|k| !s_keys.contains_key(*k)) {
        out.push(format!(
            "db{tdb} {:?}: only on the target",
            String::from_utf8_lossy(k)
        ));
    }
    for (k, (s_kind, s_fp, s_exp)) in &s_fps {
        let name = String::from_utf8_lossy(k);
        if s_kind == "none" {
            continue; // expired while comparing
        }
        let Some((d_kind, d_fp, d_exp)) = d_fps.get(k) else {
            out.push(format!("db{sdb} {name:?}: missing on the target"));
            continue;
        };
        if s_kind != d_kind {
            out.push(format!(
                "db{sdb} {name:?}: type {s_kind} on the source, {d_kind} on the target"
            ));
        } else if s_fp != d_fp {
            out.push(format!(
                "db{sdb} {name:?}: {s_kind} values differ:\n{}",
                first_difference(&format!("{s_fp:?}"), &format!("{d_fp:?}"))
            ));
        } else if (s_exp - d_exp).abs() > slack || (*s_exp < 0) != (*d_exp < 0) {
            out.push(format!(
                "db{sdb} {name:?}: expiry {s_exp} on the source, {d_exp} on the target"
            ));
        }
    }
    out
}

/// Where two long renderings first differ, with a little context.
fn first_difference(a: &str, b: &str) -> String {
    let at = a
        .char_indices()
        .zip(b.chars())
        .find(|((_, x), y)| x != y)
        .map_or(a.len().min(b.len()), |((i, _), _)| i);
    let window = |s: &str| -> String {
        let start = s.floor_char_boundary(at.saturating_sub(120));
        let end = s.ceil_char_boundary((at + 240).min(s.len()));
        format!("…{}…", &s[start..end])
    };
    format!(
        "  ({} and {} characters, first difference at {at})\n  source {}\n  target {}",
        a.len(),
        b.len(),
        window(a),
        window(b)
    )
}

/// Panics with every difference between database 0 of two node sets
/// (clusters), function libraries included (every target master must
/// have the source's).
pub fn assert_same_nodes(src: &[&RedisServer], dst: &[&RedisServer]) {
    let mut diffs = diff_nodes(src, 0, dst, 0);
    let want = functions(&mut src[0].client());
    for d in dst {
        if functions(&mut d.client()) != want {
            diffs.push(format!("function libraries differ on {}", d.addr()));
        }
    }
    assert!(
        diffs.is_empty(),
        "{} differences:\n{}",
        diffs.len(),
        diffs.join("\n")
    );
}

/// Differences over every database (same numbers on both sides), plus the
/// function libraries.
pub fn diff_all(src: &RedisServer, dst: &RedisServer) -> Vec<String> {
    let mut out = Vec::new();
    for db in 0..16 {
        if src.dbsize(db) > 0 || dst.dbsize(db) > 0 {
            out.extend(diff_db(src, db, dst, db));
        }
    }
    if functions(&mut src.client()) != functions(&mut dst.client()) {
        out.push("function libraries differ".into());
    }
    out
}

/// Panics with every difference listed.
pub fn assert_same(src: &RedisServer, dst: &RedisServer) {
    let diffs = diff_all(src, dst);
    assert!(
        diffs.is_empty(),
        "{} differences between {} and {}:\n{}",
        diffs.len(),
        src.addr(),
        dst.addr(),
        diffs.join("\n")
    );
}
