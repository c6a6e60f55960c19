//! The reader against RDB files written by real Redis servers (2.8 to 7.4),
//! each with a JSON record of what the server held.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::BytesMut;
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncRead, ReadBuf};

use super::*;
use crate::restore::check_dump_payload;

fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/rdb")
}

/// Every `v*/all-types*.rdb` fixture with its JSON.
fn versioned_fixtures() -> Vec<(PathBuf, serde_json::Value)> {
    let mut out = Vec::new();
    for dir in std::fs::read_dir(fixtures_dir()).unwrap() {
        let dir = dir.unwrap().path();
        if !dir.file_name().unwrap().to_string_lossy().starts_with('v') {
            continue;
        }
        for variant in ["all-types", "all-types-compact"] {
            let rdb = dir.join(format!("{variant}.rdb"));
            let json = dir.join(format!("{variant}.json"));
            let json: serde_json::Value =
                serde_json::from_slice(&std::fs::read(json).unwrap()).unwrap();
            out.push((rdb, json));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    assert!(out.len() >= 18, "fixtures missing");
    out
}

/// Decodes a fixture string: UTF-8 text, or `hex:` + lowercase hex.
fn fixture_bytes(s: &str) -> Vec<u8> {
    match s.strip_prefix("hex:") {
        Some(hex) => (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
            .collect(),
        None => s.as_bytes().to_vec(),
    }
}

/// An `AsyncRead` over a byte slice that hands out small, random chunks, so
/// every read boundary the reader can meet is exercised.
struct Chunked {
    data: Vec<u8>,
    pos: usize,
    rng: rand::rngs::StdRng,
    max_chunk: usize,
}

impl Chunked {
    fn new(data: Vec<u8>, seed: u64, max_chunk: usize) -> Self {
        Chunked {
            data,
            pos: 0,
            rng: rand::rngs::StdRng::seed_from_u64(seed),
            max_chunk,
        }
    }
}

impl AsyncRead for Chunked {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        let left = this.data.len() - this.pos;
        let max = this.max_chunk.min(left).min(buf.remaining());
        let n = if max == 0 {
            0
        } else {
            this.rng.random_range(1..=max)
        };
        buf.put_slice(&this.data[this.pos..this.pos + n]);
        this.pos += n;
        Poll::Ready(Ok(()))
    }
}

async fn read_all<R: AsyncRead + Unpin>(reader: R) -> Result<Vec<RdbItem>, RdbError> {
    let mut rdb = RdbReader::open(reader, BytesMut::new()).await?;
    let mut items = Vec::new();
    while let Some(item) = rdb.next().await? {
        items.push(item);
    }
    Ok(items)
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
        .block_on(f)
}

#[test]
fn every_fixture_yields_exactly_its_keys_types_and_expiries() {
    for (path, json) in versioned_fixtures() {
        let data = std::fs::read(&path).unwrap();
        let items =
            block_on(read_all(&data[..])).unwrap_or_else(|e| panic!("{}: {e}", path.display()));

        let mut got: BTreeMap<(u32, Vec<u8>), (ValueKind, Option<i64>)> = BTreeMap::new();
        let mut functions = 0;
        let mut end = None;
        for item in &items {
            match item {
                RdbItem::Entry(e) => {
                    let (t, version) = check_dump_payload(e.dump_payload()).unwrap();
                    assert_eq!(t, e.rdb_type());
                    let want = json["rdb_version"].as_str().unwrap();
                    assert_eq!(format!("REDIS{version:04}"), want);
                    got.insert((e.db, e.key.to_vec()), (e.kind(), e.expire_ms));
                }
                RdbItem::Function { code } => {
                    functions += 1;
                    assert!(String::from_utf8_lossy(code).contains("fixturelib"));
                }
                RdbItem::End(c) => end = Some(*c),
                _ => {}
            }
        }
        assert_eq!(end, Some(Checksum::Verified), "{}", path.display());

        let mut want = BTreeMap::new();
        for (db, keys) in json["dbs"].as_object().unwrap() {
            for (key, val) in keys.as_object().unwrap() {
                let kind = match val["type"].as_str().unwrap() {
                    "string" => ValueKind::String,
                    "list" => ValueKind::List,
                    "set" => ValueKind::Set,
                    "zset" => ValueKind::ZSet,
                    "hash" => ValueKind::Hash,
                    "stream" => ValueKind::Stream,
                    other => panic!("unexpected type {other}"),
                };
                want.insert(
                    (db.parse::<u32>().unwrap(), fixture_bytes(key)),
                    (kind, val["expire_ms"].as_i64()),
                );
            }
        }
        assert_eq!(got, want, "{}", path.display());
        let want_functions = json
            .get("functions")
            .map_or(0, |f| f.as_array().unwrap().len());
        assert_eq!(functions, want_functions, "{}", path.display());
    }
}

#[test]
fn random_read_boundaries_give_the_same_items() {
    for (path, _) in versioned_fixtures() {
        let data = std::fs::read(&path).unwrap();
        let whole = block_on(read_all(&data[..])).unwrap();
        for (seed, max_chunk) in [(1, 1), (2, 7), (3, 300), (4, 70_000)] {
            let chunked = block_on(read_all(Chunked::new(data.clone(), seed, max_chunk))).unwrap();
            assert_eq!(
                chunked,
                whole,
                "{} with chunks up to {max_chunk}",
                path.display()
            );
        }
    }
}

#[test]
fn bytes_after_the_rdb_are_handed_back() {
    let (path, _) = &versioned_fixtures()[0];
    let mut data = std::fs::read(path).unwrap();
    let rdb_len = data.len();
    data.extend_from_slice(b"*1\r\n$4\r\nPING\r\n");
    block_on(async {
        let mut rdb = RdbReader::open(Chunked::new(data.clone(), 9, 4096), BytesMut::new())
            .await
            .unwrap();
        while rdb.next().await.unwrap().is_some() {}
        assert_eq!(rdb.offset(), rdb_len as u64);
        let (mut rest_reader, leftover) = rdb.into_parts();
        let mut rest = leftover.to_vec();
        tokio::io::AsyncReadExt::read_to_end(&mut rest_reader, &mut rest)
            .await
            .unwrap();
        assert_eq!(rest, b"*1\r\n$4\r\nPING\r\n");
    });
}

#[test]
fn every_single_byte_change_is_detected() {
    // With a CRC64 trailer no single changed byte can go unnoticed: either
    // the structure breaks or the checksum does not match.
    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    for (path, _) in versioned_fixtures() {
        let data = std::fs::read(&path).unwrap();
        for _ in 0..40 {
            let mut mutated = data.clone();
            let at = rng.random_range(0..mutated.len());
            let xor = rng.random_range(1..=255u8);
            mutated[at] ^= xor;
            let result = block_on(read_all(&mutated[..]));
            assert!(
                result.is_err(),
                "{}: byte {at} ^ {xor:#x} went unnoticed",
                path.display()
            );
        }
    }
}

#[test]
fn truncation_anywhere_is_an_error() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    for (path, _) in versioned_fixtures() {
        let data = std::fs::read(&path).unwrap();
        for _ in 0..30 {
            let cut = rng.random_range(0..data.len());
            match block_on(read_all(&data[..cut])) {
                Err(RdbError::Truncated { offset }) => assert!(offset <= cut as u64),
                Err(RdbError::Invalid { .. }) => {}
                other => panic!("{} cut at {cut}: {other:?}", path.display()),
            }
        }
    }
}

#[test]
fn random_garbage_never_panics() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(99);
    for _ in 0..2000 {
        let len = rng.random_range(0..400);
        let mut data: Vec<u8> = b"REDIS0010".to_vec();
        data.extend((0..len).map(|_| rng.random::<u8>()));
        let _ = block_on(read_all(&data[..]));
    }
}

#[test]
fn old_encodings_from_redis_test_suite_are_walked() {
    let dir = fixtures_dir().join("redis-assets");
    for name in [
        "encodings.rdb",
        "hash-zipmap.rdb",
        "hash-ziplist.rdb",
        "list-quicklist.rdb",
        "zset-ziplist.rdb",
        "scriptbackup.rdb",
    ] {
        let data = std::fs::read(dir.join(name)).unwrap();
        let items = block_on(read_all(&data[..])).unwrap_or_else(|e| panic!("{name}: {e}"));
        let keys = items
            .iter()
            .filter(|i| matches!(i, RdbItem::Entry(_)))
            .count();
        // scriptbackup.rdb holds only aux fields (a Lua script).
        assert!(keys > 0 || name == "scriptbackup.rdb", "{name} has no keys");
        assert!(matches!(items.last(), Some(RdbItem::End(_))));
    }
}

#[test]
fn values_over_the_limit_are_refused_with_the_offset() {
    let (path, _) = versioned_fixtures()
        .into_iter()
        .find(|(p, _)| p.to_string_lossy().contains("v7.0.15/all-types.rdb"))
        .unwrap();
    let data = std::fs::read(&path).unwrap();
    let err = block_on(async {
        let mut rdb = RdbReader::open(&data[..], BytesMut::new()).await.unwrap();
        rdb.set_max_value_len(10_000);
        loop {
            match rdb.next().await {
                Ok(Some(_)) => continue,
                Ok(None) => panic!("no value was over 10000 bytes"),
                Err(e) => return e,
            }
        }
    });
    assert!(
        matches!(err, RdbError::TooLarge { limit: 10_000, .. }),
        "{err}"
    );
}

#[test]
fn module_type_names_decode() {
    // "MBbloom--" encoding version 0, as RedisBloom registers it.
    let charset = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut id: u64 = 0;
    for c in b"MBbloom--" {
        id = (id << 6) | charset.iter().position(|x| x == c).unwrap() as u64;
    }
    assert_eq!(module_type_name(id << 10), "MBbloom--");
}

#[test]
fn distinct_keys_per_database() {
    // db2 of the fixtures is empty; str:short is in db0, db1 and db3.
    let (path, _) = versioned_fixtures().pop().unwrap();
    let data = std::fs::read(path).unwrap();
    let items = block_on(read_all(&data[..])).unwrap();
    let dbs: BTreeSet<u32> = items
        .iter()
        .filter_map(|i| match i {
            RdbItem::Entry(e) if &e.key[..] == b"str:short" => Some(e.db),
            _ => None,
        })
        .collect();
    assert_eq!(dbs, BTreeSet::from([0, 1, 3]));
}

/// A decoded value in the fixture JSON's terms.
fn as_json(v: &value::Value) -> serde_json::Value {
    use serde_json::json;
    let text = |b: &[u8]| match std::str::from_utf8(b) {
        Ok(s) => json!(s),
        Err(_) => json!(format!(
            "hex:{}",
            b.iter().map(|x| format!("{x:02x}")).collect::<String>()
        )),
    };
    match v {
        value::Value::String(b) => text(b),
        value::Value::List(items) => json!(items.iter().map(|b| text(b)).collect::<Vec<_>>()),
        value::Value::Set(items) => {
            let mut sorted: Vec<&bytes::Bytes> = items.iter().collect();
            sorted.sort();
            json!(sorted.iter().map(|b| text(b)).collect::<Vec<_>>())
        }
        value::Value::ZSet(items) => {
            // ZRANGE order: by score, then member.
            let mut sorted = items.clone();
            sorted.sort_by(|a, b| a.1.partial_cmp(&b.1).unwrap().then(a.0.cmp(&b.0)));
            json!(sorted
                .iter()
                .map(|(m, s)| json!([text(m), format!("{s:?}")]))
                .collect::<Vec<_>>())
        }
        value::Value::Hash(fields) => {
            let mut map = serde_json::Map::new();
            let mut sorted: Vec<&value::HashField> = fields.iter().collect();
            sorted.sort_by(|a, b| a.field.cmp(&b.field));
            for f in sorted {
                let k = match text(&f.field) {
                    serde_json::Value::String(s) => s,
                    _ => unreachable!(),
                };
                map.insert(k, text(&f.value));
            }
            serde_json::Value::Object(map)
        }
        value::Value::Stream(s) => {
            let id = |i: &value::StreamId| json!(i.to_string());
            let mut out = json!({
                "entries": s.entries.iter().map(|e| json!([id(&e.id), e.fields.iter().flat_map(|(f, v)| [text(f), text(v)]).collect::<Vec<_>>()])).collect::<Vec<_>>(),
                "length": s.length,
                "last_id": id(&s.last_id),
                "groups": s.groups.iter().map(|g| {
                    let mut pel: Vec<&value::PendingEntry> = g.pending.iter().collect();
                    pel.sort_by_key(|p| p.id);
                    json!({
                        "name": text(&g.name),
                        "last_id": id(&g.last_id),
                        "pending": pel.iter().map(|p| json!([id(&p.id), p.consumer.as_ref().map(|c| text(c))])).collect::<Vec<_>>(),
                        "consumers": g.consumers.iter().map(|c| json!([text(&c.name), c.pending.len()])).collect::<Vec<_>>(),
                    })
                }).collect::<Vec<_>>(),
            });
            if let Some(max) = &s.max_deleted_id {
                out["max_deleted_entry_id"] = id(max);
                out["entries_added"] = json!(s.entries_added);
            }
            out
        }
        value::Value::Module { .. } => json!("module"),
    }
}

/// Scores as numbers: servers before 7.2 print 0.1 as 0.10000000000000001.
fn normalize(v: &serde_json::Value, kind: &str) -> serde_json::Value {
    use serde_json::json;
    match (kind, v) {
        ("zset", serde_json::Value::Array(items)) => json!(items
            .iter()
            .map(|pair| {
                let score = match &pair[1] {
                    serde_json::Value::String(s) => value::parse_score(s.as_bytes()).unwrap(),
                    serde_json::Value::Number(n) => n.as_f64().unwrap(),
                    other => panic!("score {other}"),
                };
                json!([pair[0], format!("{score:?}")])
            })
            .collect::<Vec<_>>()),
        ("stream", serde_json::Value::Object(m)) => {
            // Groups' entries_read depends on the server's bookkeeping (the
            // JSON records what XINFO showed), and consumers are compared
            // as a set.
            let mut m = m.clone();
            if let Some(serde_json::Value::Array(groups)) = m.get_mut("groups") {
                for g in groups.iter_mut() {
                    if let serde_json::Value::Object(g) = g {
                        g.remove("entries_read");
                        if let Some(serde_json::Value::Array(c)) = g.get_mut("consumers") {
                            c.sort_by_key(|x| x.to_string());
                        }
                    }
                }
            }
            serde_json::Value::Object(m)
        }
        _ => v.clone(),
    }
}

#[test]
fn every_fixture_value_decodes_to_exactly_its_json() {
    for (path, json) in versioned_fixtures() {
        let data = std::fs::read(&path).unwrap();
        let items = block_on(read_all(&data[..])).unwrap();
        let mut checked = 0;
        let mut seen = BTreeSet::new();
        for item in &items {
            let RdbItem::Entry(e) = item else { continue };
            let key = match std::str::from_utf8(&e.key) {
                Ok(s) => s.to_string(),
                Err(_) => format!(
                    "hex:{}",
                    e.key.iter().map(|x| format!("{x:02x}")).collect::<String>()
                ),
            };
            let want = &json["dbs"][e.db.to_string()][&key];
            seen.insert((e.db.to_string(), key.clone()));
            let kind = want["type"].as_str().unwrap();
            let value = e
                .decode()
                .unwrap_or_else(|err| panic!("{} {key}: {err}", path.display()));
            assert_eq!(
                normalize(&as_json(&value), kind),
                normalize(&want["value"], kind),
                "{} db{} {key}",
                path.display(),
                e.db
            );
            // Hash field TTLs (7.4).
            if let value::Value::Hash(fields) = &value {
                let ttls: std::collections::BTreeMap<String, i64> = fields
                    .iter()
                    .filter_map(|f| {
                        Some((String::from_utf8_lossy(&f.field).into_owned(), f.expire_ms?))
                    })
                    .collect();
                let want_ttls: std::collections::BTreeMap<String, i64> = want
                    .get("field_expire_ms")
                    .and_then(|m| m.as_object())
                    .map(|m| {
                        m.iter()
                            .map(|(k, v)| (k.clone(), v.as_i64().unwrap()))
                            .collect()
                    })
                    .unwrap_or_default();
                assert_eq!(ttls, want_ttls, "{} {key} field TTLs", path.display());
            }
            checked += 1;
        }
        assert!(checked > 40, "{}: only {checked} values", path.display());
        let listed: BTreeSet<(String, String)> = json["dbs"]
            .as_object()
            .unwrap()
            .iter()
            .flat_map(|(db, keys)| {
                keys.as_object()
                    .unwrap()
                    .keys()
                    .map(move |k| (db.clone(), k.clone()))
            })
            .collect();
        assert_eq!(
            seen,
            listed,
            "{}: keys in the RDB vs the JSON",
            path.display()
        );
    }
}

#[test]
fn redis_test_suite_encodings_decode() {
    let dir = fixtures_dir().join("redis-assets");
    for name in [
        "encodings.rdb",
        "hash-zipmap.rdb",
        "hash-ziplist.rdb",
        "list-quicklist.rdb",
        "zset-ziplist.rdb",
    ] {
        let data = std::fs::read(dir.join(name)).unwrap();
        for item in block_on(read_all(&data[..])).unwrap() {
            if let RdbItem::Entry(e) = item {
                let v = e.decode().unwrap_or_else(|err| panic!("{name}: {err}"));
                assert!(!v.is_empty(), "{name}: empty value");
            }
        }
    }
}

#[test]
fn corrupt_assets_fail_cleanly_with_the_offset_and_key() {
    let dir = fixtures_dir().join("redis-assets");
    // The damaged ziplist: Redis refuses "key:000000000091" at byte 494.
    let data = std::fs::read(dir.join("corrupt_ziplist.rdb")).unwrap();
    let mut errors = Vec::new();
    for item in block_on(read_all(&data[..])).unwrap() {
        if let RdbItem::Entry(e) = item {
            if let Err(err) = e.decode() {
                errors.push(err.to_string());
            }
        }
    }
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(errors[0].contains("key:000000000091"), "{}", errors[0]);
    assert!(errors[0].contains("at byte"), "{}", errors[0]);

    // Empty collections: Redis skips those keys; they decode as empty.
    let data = std::fs::read(dir.join("corrupt_empty_keys.rdb")).unwrap();
    let mut empty = 0;
    for item in block_on(read_all(&data[..])).unwrap() {
        if let RdbItem::Entry(e) = item {
            match e.decode() {
                Ok(v) if v.is_empty() => empty += 1,
                Ok(v) => panic!("{:?} is not empty: {v:?}", e.key),
                Err(err) => assert!(err.to_string().contains("empty"), "{err}"),
            }
        }
    }
    assert!(empty >= 5, "{empty} empty values");
}

#[test]
fn mutated_values_never_panic_the_decoder() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    for (path, _) in versioned_fixtures() {
        let data = std::fs::read(&path).unwrap();
        for item in block_on(read_all(&data[..])).unwrap() {
            let RdbItem::Entry(e) = item else { continue };
            let value = e.value_bytes().to_vec();
            for _ in 0..8 {
                let mut m = value.clone();
                if m.is_empty() {
                    break;
                }
                let at = rng.random_range(0..m.len());
                m[at] ^= rng.random_range(1..=255u8);
                if rng.random_bool(0.3) {
                    m.truncate(rng.random_range(0..m.len()));
                }
                let _ = value::decode(e.rdb_type(), &m);
            }
        }
    }
}

/// Appends part `p` of a value to what was gathered so far.
fn gather(into: &mut Option<value::Value>, p: value::Value) {
    use value::Value::*;
    let Some(acc) = into else {
        *into = Some(p);
        return;
    };
    match (acc, p) {
        (String(a), String(b)) => {
            let mut joined = a.to_vec();
            joined.extend_from_slice(&b);
            *a = joined.into();
        }
        (List(a), List(b)) | (Set(a), Set(b)) => a.extend(b),
        (ZSet(a), ZSet(b)) => a.extend(b),
        (Hash(a), Hash(b)) => a.extend(b),
        (Stream(a), Stream(mut b)) => {
            let mut entries = std::mem::take(&mut a.entries);
            entries.append(&mut b.entries);
            **a = *b;
            a.entries = entries;
        }
        (a, b) => panic!("parts of different kinds: {a:?} then {b:?}"),
    }
}

async fn read_with_threshold(data: Vec<u8>, threshold: usize, seed: u64) -> Vec<RdbItem> {
    let mut rdb = RdbReader::open(Chunked::new(data, seed, 4096), BytesMut::new())
        .await
        .unwrap();
    rdb.set_part_threshold(threshold);
    let mut items = Vec::new();
    while let Some(item) = rdb.next().await.unwrap() {
        items.push(item);
    }
    items
}

#[test]
fn big_values_come_in_parts_that_add_up_to_the_whole_value() {
    for (path, _) in versioned_fixtures() {
        let data = std::fs::read(&path).unwrap();
        let whole: Vec<Entry> = block_on(read_all(&data[..]))
            .unwrap()
            .into_iter()
            .filter_map(|i| match i {
                RdbItem::Entry(e) => Some(e),
                _ => None,
            })
            .collect();
        for threshold in [1, 200, 5000] {
            let items = block_on(read_with_threshold(
                data.clone(),
                threshold,
                threshold as u64,
            ));
            assert!(matches!(
                items.last(),
                Some(RdbItem::End(Checksum::Verified | Checksum::Absent))
            ));
            let mut got = Vec::new();
            let mut open: Option<(Part, Option<value::Value>)> = None;
            let mut parted = 0;
            for item in items {
                match item {
                    RdbItem::Part(p) => {
                        let (first, acc) = open.get_or_insert_with(|| {
                            assert_eq!(
                                p.index,
                                0,
                                "{}: a value starts with part 0",
                                path.display()
                            );
                            (p.clone(), None)
                        });
                        assert_eq!(
                            (&first.key, first.db, first.expire_ms),
                            (&p.key, p.db, p.expire_ms)
                        );
                        gather(acc, p.value.clone());
                        if p.last {
                            let (first, acc) = open.take().unwrap();
                            got.push((first.db, first.key, first.expire_ms, acc.unwrap()));
                            parted += 1;
                        }
                    }
                    RdbItem::Entry(e) => {
                        assert!(open.is_none(), "an entry inside a value in parts");
                        got.push((e.db, e.key.clone(), e.expire_ms, e.decode().unwrap()));
                    }
                    _ => assert!(open.is_none(), "an item inside a value in parts"),
                }
            }
            assert_eq!(
                got.len(),
                whole.len(),
                "{} threshold {threshold}",
                path.display()
            );
            for ((db, key, expire, value), e) in got.into_iter().zip(&whole) {
                assert_eq!((db, &key, expire), (e.db, &e.key, e.expire_ms));
                assert_eq!(
                    value,
                    e.decode().unwrap(),
                    "{} {key:?} threshold {threshold}",
                    path.display()
                );
            }
            if threshold == 1 {
                assert!(
                    parted > 10,
                    "{}: only {parted} values in parts",
                    path.display()
                );
            }
        }
    }
}

#[test]
fn a_corrupt_element_in_a_later_part_names_the_key_and_offset() {
    // A list of 1000 elements whose 600th has an invalid length encoding.
    let mut rdb = b"REDIS0009".to_vec();
    rdb.extend_from_slice(&[TYPE_LIST, 8]);
    rdb.extend_from_slice(b"list:big");
    rdb.extend_from_slice(&[0x40 | 0x03, 0xe8]); // 1000, 14-bit length
    let mut bad_at = 0;
    for i in 0..1000 {
        if i == 600 {
            bad_at = rdb.len();
            rdb.push(0x82);
        } else {
            rdb.push(10);
            rdb.extend_from_slice(b"0123456789");
        }
    }
    let err = block_on(async {
        let mut reader = RdbReader::open(&rdb[..], BytesMut::new()).await.unwrap();
        reader.set_part_threshold(100);
        let mut parts = 0;
        loop {
            match reader.next().await {
                Ok(Some(RdbItem::Part(_))) => parts += 1,
                Ok(other) => panic!("unexpected {other:?}"),
                Err(e) => {
                    assert!(parts >= 1, "the error came before any part");
                    break e;
                }
            }
        }
    });
    let text = err.to_string();
    assert!(text.contains("list:big"), "{text}");
    assert!(text.contains(&format!("at byte {bad_at}")), "{text}");
    assert!(text.contains("length encoding"), "{text}");
}

#[test]
fn mutated_fixtures_never_panic_the_reader_in_parts() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    for (path, _) in versioned_fixtures() {
        let data = std::fs::read(&path).unwrap();
        for _ in 0..30 {
            let mut mutated = data.clone();
            for _ in 0..rng.random_range(1..4) {
                let at = rng.random_range(9..mutated.len());
                mutated[at] ^= rng.random_range(1..=255u8);
            }
            let threshold = rng.random_range(1..2000);
            let _ = block_on(async {
                let mut rdb = RdbReader::open(&mutated[..], BytesMut::new()).await?;
                rdb.set_part_threshold(threshold);
                while let Some(item) = rdb.next().await? {
                    if let RdbItem::Entry(e) = item {
                        let _ = e.decode();
                    }
                }
                Ok::<_, RdbError>(())
            });
        }
    }
}

#[test]
fn listpack_entries_at_back_length_boundaries_decode() {
    let data = std::fs::read(fixtures_dir().join("generated/listpack-backlen.rdb")).unwrap();
    let want: Vec<Vec<u8>> = [125usize, 126, 127, 16377, 16378, 16379]
        .iter()
        .map(|&n| {
            let mut v = format!("{n}:").into_bytes();
            v.resize(n, b'x');
            v
        })
        .collect();
    let mut seen = 0;
    for item in block_on(read_all(&data[..])).unwrap() {
        let RdbItem::Entry(e) = item else { continue };
        let values: Vec<Vec<u8>> = match e.decode().unwrap() {
            value::Value::List(items) => items.iter().map(|b| b.to_vec()).collect(),
            value::Value::Hash(fields) => {
                let mut f: Vec<_> = fields.iter().map(|f| f.value.to_vec()).collect();
                f.sort_by_key(|v| v.len());
                f
            }
            value::Value::Stream(s) => s.entries.iter().map(|e| e.fields[0].1.to_vec()).collect(),
            other => panic!("{other:?}"),
        };
        assert_eq!(values, want, "{:?}", e.key);
        seen += 1;
    }
    assert_eq!(seen, 3);
}
