//! Big keys and RDB reading: memory and throughput figures.
//!
//! ```text
//! cargo bench -p coordinator --bench bigkeys -- [--size-mb N] [--strings N]
//! ```
//!
//! 1. For one hash and one list of about N MB each (1 KB incompressible
//!    elements; default 1024 MB): a native replica's full sync (time, peak
//!    RSS) and shardsync's (time until the target holds every element, the
//!    process's peak RSS from /proc VmHWM). shardsync writes such a value in
//!    parts (`--big-key-threshold`, 64 MB by default), so its memory stays
//!    far below the value's size.
//! 2. RDB reader throughput (MB/s) over files written by redis-server 7.0:
//!    the hash's and the list's RDBs, an RDB of N small strings (DEBUG
//!    POPULATE, 100-byte values; default 10,000,000, about 1.2 GB), and the
//!    largest fixture of the repository (all types). Each is read twice:
//!    walking values into DUMP payloads (what RESTORE takes), and decoding
//!    every element (what the rewrite path does); values over 64 MB come in
//!    decoded parts either way, as in shardsync.

use std::path::Path;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use engine::rdb::{RdbItem, RdbReader};
use harness::{wait_for, RedisServer, Shardsync};

const BIN: &str = env!("CARGO_BIN_EXE_shardsync");
const LONG: Duration = Duration::from_secs(1800);

struct Options {
    size_mb: usize,
    strings: u64,
}

fn options() -> Options {
    let mut o = Options {
        size_mb: 1024,
        strings: 10_000_000,
    };
    let args: Vec<String> = std::env::args().collect();
    let mut i = 1;
    while i < args.len() {
        let next = args.get(i + 1).cloned().unwrap_or_default();
        match args[i].as_str() {
            "--size-mb" => o.size_mb = next.parse().expect("--size-mb N"),
            "--strings" => o.strings = next.parse().expect("--strings N"),
            _ => {
                i += 1;
                continue;
            }
        }
        i += 2;
    }
    o
}

/// 1 KB of incompressible bytes, different for each `i`.
fn element(i: u64) -> Vec<u8> {
    harness::data::noise(1024, i)
}

/// A source holding one `kind` ("hash" or "list") of `n` 1 KB elements.
fn big_source(kind: &str, n: u64) -> RedisServer {
    let source = RedisServer::config()
        .arg("client-output-buffer-limit", &["replica", "0", "0", "0"])
        .start();
    let mut con = source.client();
    let batch = 200u64;
    let mut i = 0;
    while i < n {
        let mut pipe = redis::pipe();
        for _ in 0..20 {
            if i >= n {
                break;
            }
            let mut cmd = redis::cmd(if kind == "hash" { "HSET" } else { "RPUSH" });
            cmd.arg("big");
            for j in i..(i + batch).min(n) {
                if kind == "hash" {
                    cmd.arg(format!("field:{j}"));
                }
                cmd.arg(element(j));
            }
            i = (i + batch).min(n);
            pipe.add_command(cmd).ignore();
        }
        let _: () = pipe.query(&mut con).expect("load");
    }
    source
}

fn length(server: &RedisServer, kind: &str) -> u64 {
    let cmd = if kind == "hash" { "HLEN" } else { "LLEN" };
    redis::cmd(cmd)
        .arg("big")
        .query(&mut server.client())
        .unwrap_or(0)
}

fn native(source: &RedisServer, kind: &str, n: u64) -> (Duration, u64) {
    let replica = RedisServer::start();
    let start = Instant::now();
    let _: () = redis::cmd("REPLICAOF")
        .arg("127.0.0.1")
        .arg(source.port)
        .query(&mut replica.client())
        .unwrap();
    wait_for("the native replica", LONG, || {
        replica.info_field("master_link_status").as_deref() == Some("up")
            && length(&replica, kind) == n
    });
    (start.elapsed(), harness::peak_rss_kb(replica.pid()) / 1024)
}

fn shardsync(source: &RedisServer, kind: &str, n: u64) -> (Duration, u64) {
    let target = RedisServer::start();
    let start = Instant::now();
    let mut sync = Shardsync::sync(BIN, &["--source", &source.url(), "--target", &target.url()]);
    wait_for("shardsync", LONG, || length(&target, kind) == n);
    let elapsed = start.elapsed();
    let rss = harness::peak_rss_kb(sync.pid()) / 1024;
    let done = sync.terminate(Duration::from_secs(120));
    assert_eq!(done.code(), Some(0), "{}", done.log);
    assert!(done.log.contains("writing it in parts"), "{}", done.log);
    (elapsed, rss)
}

/// Reads an RDB file; returns (MB/s walking, MB/s decoding every element).
fn read_rdb(path: &Path) -> (f64, f64) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let size = std::fs::metadata(path).unwrap().len() as f64 / 1e6;
    let mut rates = Vec::new();
    for decode in [false, true] {
        // Small files are read many times for a stable figure.
        let rounds = ((200.0 / size).ceil() as usize).max(1);
        let start = Instant::now();
        for _ in 0..rounds {
            rt.block_on(async {
                let file = tokio::fs::File::open(path).await.unwrap();
                let file = tokio::io::BufReader::with_capacity(1 << 20, file);
                let mut rdb = RdbReader::open(file, BytesMut::new()).await.unwrap();
                // As shardsync reads: values over 64 MB come in parts.
                rdb.set_part_threshold(64 << 20);
                let mut elements = 0usize;
                while let Some(item) = rdb.next().await.unwrap() {
                    match item {
                        RdbItem::Entry(e) if decode => {
                            elements += usize::from(!e.decode().unwrap().is_empty())
                        }
                        RdbItem::Entry(e) => elements += e.dump_payload().len(),
                        RdbItem::Part(p) => elements += usize::from(!p.value.is_empty()),
                        _ => {}
                    }
                }
                std::hint::black_box(elements);
            });
        }
        rates.push(size * rounds as f64 / start.elapsed().as_secs_f64());
    }
    (rates[0], rates[1])
}

fn saved_rdb(server: &RedisServer) -> std::path::PathBuf {
    // A replication child may still be finishing.
    wait_for("SAVE", LONG, || {
        redis::cmd("SAVE").query::<()>(&mut server.client()).is_ok()
    });
    server.dir().join("dump.rdb")
}

fn main() {
    let o = options();
    let n = (o.size_mb as u64) << 10;
    println!(
        "machine: {} cores; redis-server {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        std::process::Command::new("redis-server")
            .arg("--version")
            .output()
            .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_string())
            .unwrap_or_default()
    );
    let mut rdb_rows = Vec::new();

    println!(
        "\n| big key | elements | native replica | native RSS | shardsync | shardsync peak RSS |"
    );
    println!("|---|---|---|---|---|---|");
    for kind in ["hash", "list"] {
        let source = big_source(kind, n);
        let (nt, nrss) = native(&source, kind, n);
        let (st, srss) = shardsync(&source, kind, n);
        println!(
            "| {} MB {kind} | {n} × 1 KB | {:.1} s | {nrss} MB | {:.1} s | {srss} MB |",
            o.size_mb,
            nt.as_secs_f64(),
            st.as_secs_f64()
        );
        let rdb = saved_rdb(&source);
        let mb = std::fs::metadata(&rdb).unwrap().len() / 1_000_000;
        rdb_rows.push((
            format!("one {kind} of {n} × 1 KB ({mb} MB)"),
            read_rdb(&rdb),
        ));
    }

    let source = RedisServer::config()
        .arg("enable-debug-command", &["yes"])
        .start();
    let _: () = redis::cmd("DEBUG")
        .arg("POPULATE")
        .arg(o.strings)
        .arg("key")
        .arg(100)
        .query(&mut source.client())
        .expect("DEBUG POPULATE");
    let rdb = saved_rdb(&source);
    let mb = std::fs::metadata(&rdb).unwrap().len() / 1_000_000;
    rdb_rows.push((
        format!("{} strings of 100 B ({mb} MB)", o.strings),
        read_rdb(&rdb),
    ));
    drop(source);
    let fixture =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../engine/tests/data/rdb/v7.4.1/all-types.rdb");
    let kb = std::fs::metadata(&fixture).unwrap().len() / 1000;
    rdb_rows.push((
        format!("largest fixture, v7.4.1/all-types.rdb ({kb} KB, every type)"),
        read_rdb(&fixture),
    ));

    println!("\n| RDB | walk to DUMP payloads (big values in parts) | decode every element |");
    println!("|---|---|---|");
    for (name, (walk, decode)) in rdb_rows {
        println!("| {name} | {walk:.0} MB/s | {decode:.0} MB/s |");
    }
}
