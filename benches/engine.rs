//! Micro-benchmarks of the engine's hot paths:
//!
//! ```text
//! cargo bench -p shardsync-benches --bench engine
//! ```
//!
//! - RESP: parsing a replication stream of SETs (commands/s, MB/s);
//! - RDB: reading the largest fixture from a real server (MB/s), every
//!   value walked, checksummed and captured as a DUMP payload;
//! - RESTORE: encoding RESTORE commands from entries.

use bytes::BytesMut;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use engine::rdb::{RdbItem, RdbReader};
use engine::resp::{encode, parse_command};
use engine::restore::{encode_restore, Existing};

fn replication_stream(n: usize) -> Vec<u8> {
    let mut buf = BytesMut::new();
    let value = vec![b'x'; 100];
    for i in 0..n {
        encode::command(
            &mut buf,
            &[&b"SET"[..], format!("key:{i:08}").as_bytes(), &value],
        );
    }
    buf.to_vec()
}

fn resp(c: &mut Criterion) {
    let n = 10_000;
    let stream = replication_stream(n);
    let mut group = c.benchmark_group("resp");
    group.throughput(Throughput::Elements(n as u64));
    group.bench_function("parse 10k SET commands", |b| {
        b.iter(|| {
            let mut buf = BytesMut::from(&stream[..]);
            let mut total = 0;
            while let Some(cmd) = parse_command(&mut buf).unwrap() {
                total += cmd.wire_len();
            }
            assert_eq!(total, stream.len());
        })
    });
    group.finish();
}

fn fixture() -> Vec<u8> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../engine/tests/data/rdb/v7.4.1/all-types.rdb"
    );
    std::fs::read(path).expect("fixture")
}

fn read_entries(data: &[u8]) -> Vec<engine::rdb::Entry> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut rdb = RdbReader::open(data, BytesMut::new()).await.unwrap();
        let mut out = Vec::new();
        while let Some(item) = rdb.next().await.unwrap() {
            if let RdbItem::Entry(e) = item {
                out.push(e);
            }
        }
        out
    })
}

fn rdb(c: &mut Criterion) {
    let data = fixture();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let mut group = c.benchmark_group("rdb");
    group.throughput(Throughput::Bytes(data.len() as u64));
    group.bench_function("read all-types.rdb (7.4.1)", |b| {
        b.iter(|| {
            rt.block_on(async {
                let mut rdb = RdbReader::open(&data[..], BytesMut::new()).await.unwrap();
                while rdb.next().await.unwrap().is_some() {}
            })
        })
    });
    group.finish();

    let entries = read_entries(&data);
    let mut group = c.benchmark_group("restore");
    group.throughput(Throughput::Elements(entries.len() as u64));
    group.bench_function("encode RESTORE for every fixture entry", |b| {
        let mut buf = BytesMut::with_capacity(1 << 20);
        b.iter(|| {
            buf.clear();
            for e in &entries {
                encode_restore(&mut buf, &e.key, e, Existing::Replace);
            }
        })
    });
    group.finish();
}

criterion_group!(benches, resp, rdb);
criterion_main!(benches);
