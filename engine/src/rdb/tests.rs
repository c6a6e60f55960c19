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
