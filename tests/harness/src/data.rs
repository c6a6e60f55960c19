//! Datasets written into a source server with ordinary commands.

use crate::cluster::ClusterClient;
use crate::server::RedisServer;

/// An absolute expiry far in the future (2100-01-01), in ms.
pub const FAR_EXPIRY_MS: i64 = 4_102_444_800_000;

/// Where a dataset is written: a standalone server (any database) or a
/// cluster (database 0 only; commands routed by their key).
pub trait Sink {
    fn run(&mut self, db: u32, args: &[&[u8]]);
}

/// A standalone server, one connection per database.
pub struct ServerSink<'a> {
    server: &'a RedisServer,
    conns: std::collections::HashMap<u32, redis::Connection>,
}

impl<'a> ServerSink<'a> {
    pub fn new(server: &'a RedisServer) -> Self {
        ServerSink {
            server,
            conns: Default::default(),
        }
    }
}

impl Sink for ServerSink<'_> {
    fn run(&mut self, db: u32, args: &[&[u8]]) {
        let server = self.server;
        let con = self.conns.entry(db).or_insert_with(|| server.client_db(db));
        run(con, args);
    }
}

impl Sink for ClusterClient {
    fn run(&mut self, db: u32, args: &[&[u8]]) {
        if db != 0 {
            return; // a cluster has only database 0
        }
        let name = String::from_utf8_lossy(args[0]).to_ascii_uppercase();
        let key: &[u8] = match name.as_str() {
            "FUNCTION" => {
                self.run_everywhere(args);
                return;
            }
            "XGROUP" => args[2],
            "XREADGROUP" => {
                let at = args
                    .iter()
                    .position(|a| a.eq_ignore_ascii_case(b"STREAMS"))
                    .unwrap();
                args[at + 1]
            }
            _ => args[1],
        };
        self.run_on(key, args);
    }
}

fn run(con: &mut redis::Connection, args: &[&[u8]]) {
    let mut cmd = redis::cmd(std::str::from_utf8(args[0]).expect("command names are text"));
    for a in &args[1..] {
        cmd.arg(*a);
    }
    let _: redis::Value = cmd
        .query(con)
        .unwrap_or_else(|e| panic!("{:?}: {e}", String::from_utf8_lossy(&args.concat())));
}

/// Deterministic pseudo-random bytes (no RNG dependency needed).
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// Writes every data type Redis 7.0 has, in every encoding it uses, with
/// TTLs, binary keys and values, several databases and a function library.
pub fn load_all_types(server: &RedisServer) {
    load_all_types_into(&mut ServerSink::new(server));
}

/// [`load_all_types`] into any sink (a cluster keeps database 0's part).
pub fn load_all_types_into(sink: &mut dyn Sink) {
    load_types(sink, true);
}

/// [`load_all_types`] without the function library: what Redis 6.2 holds
/// (and what a 6.2 target can take).
pub fn load_all_types_but_functions(server: &RedisServer) {
    load_types(&mut ServerSink::new(server), false);
}

fn load_types(sink: &mut dyn Sink, functions: bool) {
    let con = &mut Db0(sink);
    // Strings: int, embstr, raw, binary, empty, LZF-compressible, random.
    con.run(&[b"SET", b"str:short", b"hello"]);
    con.run(&[b"SET", b"str:empty", b""]);
    con.run(&[b"SET", b"str:int", b"12345"]);
    con.run(&[b"SET", b"str:neg", b"-42"]);
    con.run(&[b"SET", b"str:big-int", b"12345678901234"]);
    con.run(&[b"SET", b"str:leading-zero", b"007"]);
    con.run(&[b"SET", b"str:binary", b"\x00\xff\r\n\x01"]);
    con.run(&[b"SET", b"str:lzf", "compressible ".repeat(8000).as_bytes()]);
    con.run(&[b"SET", b"str:random", &noise(20_000, 1)]);
    con.run(&[b"SET", b"bin:\x00\xffkey", b"binary key"]);
    con.run(&[b"SET", b"ttl:string", b"expires in 2100"]);
    con.run(&[
        b"PEXPIREAT",
        b"ttl:string",
        FAR_EXPIRY_MS.to_string().as_bytes(),
    ]);
    con.run(&[
        b"SET",
        b"ttl:soon",
        b"expires in an hour",
        b"PX",
        b"3600000",
    ]);

    // Lists: a small listpack node and a multi-node quicklist.
    con.run(&[
        b"RPUSH",
        b"list:small",
        b"a",
        b"",
        b"1",
        b"-1",
        b"12345678901",
        "ü".as_bytes(),
    ]);
    let large: Vec<Vec<u8>> = (0..5000)
        .map(|i| format!("element-{i}").into_bytes())
        .collect();
    for chunk in large.chunks(500) {
        let mut args: Vec<&[u8]> = vec![b"RPUSH", b"list:large"];
        args.extend(chunk.iter().map(Vec::as_slice));
        con.run(&args);
    }
    con.run(&[b"RPUSH", b"list:bigelem", &noise(10_000, 2), b"tail"]);
    con.run(&[b"RPUSH", b"ttl:list", b"x", b"y"]);
    con.run(&[
        b"PEXPIREAT",
        b"ttl:list",
        (FAR_EXPIRY_MS + 86_400_000).to_string().as_bytes(),
    ]);

    // Sets: intset, listpack-less 7.0 hashtable, large int set.
    con.run(&[
        b"SADD",
        b"set:intset",
        b"1",
        b"2",
        b"3",
        b"-5",
        b"70000",
        b"4294967296",
    ]);
    con.run(&[b"SADD", b"set:strings", b"a", b"b", b"c"]);
    let members: Vec<Vec<u8>> = (0..1000).map(|i| format!("m{i}").into_bytes()).collect();
    let mut args: Vec<&[u8]> = vec![b"SADD", b"set:large"];
    args.extend(members.iter().map(Vec::as_slice));
    con.run(&args);
    let ints: Vec<Vec<u8>> = (0..1000).map(|i| i.to_string().into_bytes()).collect();
    let mut args: Vec<&[u8]> = vec![b"SADD", b"set:ints:large"];
    args.extend(ints.iter().map(Vec::as_slice));
    con.run(&args);

    // Hashes: listpack and hashtable.
    con.run(&[
        b"HSET",
        b"hash:small",
        b"f1",
        b"v1",
        b"f2",
        b"2",
        b"",
        b"empty field",
    ]);
    let fields: Vec<Vec<u8>> = (0..1000)
        .flat_map(|i| {
            [
                format!("f{i}").into_bytes(),
                format!("value-{i}").into_bytes(),
            ]
        })
        .collect();
    let mut args: Vec<&[u8]> = vec![b"HSET", b"hash:large"];
    args.extend(fields.iter().map(Vec::as_slice));
    con.run(&args);
    con.run(&[b"HSET", b"hash:bigvalue", b"f", &noise(1000, 3)]);

    // Sorted sets: listpack and skiplist, odd scores included.
    con.run(&[
        b"ZADD",
        b"zset:small",
        b"1",
        b"a",
        b"2.5",
        b"b",
        b"-3.25",
        b"c",
        b"0.1",
        b"d",
        b"inf",
        b"e",
        b"-inf",
        b"f",
        b"1e15",
        b"g",
    ]);
    let zmembers: Vec<Vec<u8>> = (0..1000)
        .flat_map(|i| {
            [
                format!("{}", i as f64 / 7.0 - 50.0).into_bytes(),
                format!("member-{i}").into_bytes(),
            ]
        })
        .collect();
    let mut args: Vec<&[u8]> = vec![b"ZADD", b"zset:large"];
    args.extend(zmembers.iter().map(Vec::as_slice));
    con.run(&args);

    // Streams with consumer groups, pending entries and deletions.
    for i in 1..=300u32 {
        let id = format!("{}-{}", 1_700_000_000_000u64 + i as u64, i % 3);
        let field = format!("field{}", i % 4);
        con.run(&[
            b"XADD",
            b"stream:events",
            id.as_bytes(),
            field.as_bytes(),
            i.to_string().as_bytes(),
            b"common",
            b"x",
        ]);
    }
    for i in (10..=250u64).step_by(10) {
        let id = format!("{}-{}", 1_700_000_000_000u64 + i, i % 3);
        con.run(&[b"XDEL", b"stream:events", id.as_bytes()]);
    }
    con.run(&[b"XGROUP", b"CREATE", b"stream:events", b"grp-a", b"0"]);
    con.run(&[
        b"XREADGROUP",
        b"GROUP",
        b"grp-a",
        b"alice",
        b"COUNT",
        b"5",
        b"STREAMS",
        b"stream:events",
        b">",
    ]);
    con.run(&[
        b"XREADGROUP",
        b"GROUP",
        b"grp-a",
        b"bob",
        b"COUNT",
        b"3",
        b"STREAMS",
        b"stream:events",
        b">",
    ]);
    con.run(&[b"XACK", b"stream:events", b"grp-a", b"1700000000001-1"]);
    // A delivered message deleted while pending: its PEL entry stays.
    con.run(&[b"XDEL", b"stream:events", b"1700000000007-1"]);
    con.run(&[b"XGROUP", b"CREATE", b"stream:events", b"grp-b", b"$"]);
    con.run(&[
        b"XGROUP",
        b"CREATECONSUMER",
        b"stream:events",
        b"grp-b",
        b"carol",
    ]);
    // Trimmed while pending: messages gone, PEL entries left.
    for (key, keep) in [
        (&b"stream:trimmed"[..], &b"2"[..]),
        (b"stream:all-trimmed", b"0"),
    ] {
        for i in 1..=5 {
            con.run(&[
                b"XADD",
                key,
                format!("{i}-1").as_bytes(),
                b"n",
                i.to_string().as_bytes(),
            ]);
        }
        con.run(&[b"XGROUP", b"CREATE", key, b"g", b"0"]);
        con.run(&[
            b"XREADGROUP",
            b"GROUP",
            b"g",
            b"c",
            b"COUNT",
            b"4",
            b"STREAMS",
            key,
            b">",
        ]);
        con.run(&[b"XTRIM", key, b"MAXLEN", keep]);
    }
    con.run(&[b"XADD", b"stream:empty", b"1-1", b"a", b"b"]);
    con.run(&[b"XDEL", b"stream:empty", b"1-1"]);

    // HyperLogLog (sparse and dense), bitmap, geo.
    con.run(&[b"PFADD", b"hll:sparse", b"a", b"b", b"c"]);
    let items: Vec<Vec<u8>> = (0..5000).map(|i| format!("item{i}").into_bytes()).collect();
    let mut args: Vec<&[u8]> = vec![b"PFADD", b"hll:dense"];
    args.extend(items.iter().map(Vec::as_slice));
    con.run(&args);
    con.run(&[b"SETBIT", b"bitmap:sparse", b"100000", b"1"]);
    con.run(&[
        b"GEOADD",
        b"geo:places",
        b"13.361389",
        b"38.115556",
        b"Palermo",
        b"15.087269",
        b"37.502669",
        b"Catania",
    ]);

    // Hash-tagged keys.
    for k in ["{user1}:a", "{user1}:b", "{user1}:c"] {
        con.run(&[b"SET", k.as_bytes(), b"tagged"]);
    }

    // Functions.
    if functions {
        con.run(
            &[
                b"FUNCTION",
                b"LOAD",
                b"#!lua name=testlib\nredis.register_function('echo1', function(keys, args) return args[1] end)",
            ],
        );
    }

    // Other databases (db 2 stays empty).
    let sink = &mut *con.0;
    sink.run(1, &[b"SET", b"str:short", b"in db1"]);
    sink.run(1, &[b"RPUSH", b"db1:list", b"1", b"2", b"3"]);
    sink.run(1, &[b"SET", b"db1:ttl", b"v", b"PX", b"10000000"]);
    sink.run(3, &[b"SET", b"str:short", b"in db3"]);
    sink.run(3, &[b"HSET", b"db3:hash", b"a", b"1"]);
}

/// Database 0 of a sink, so the dataset reads as plain `run(con, args)`.
struct Db0<'a>(&'a mut dyn Sink);

impl Db0<'_> {
    fn run(&mut self, args: &[&[u8]]) {
        self.0.run(0, args);
    }
}

/// `n` small string keys (`key:<i>` = 100 bytes), pipelined.
/// `n` rounds of `SET <prefix><i> i`, `INCR <prefix>counter` and `RPUSH
/// <prefix>list i` in one pipeline: writes whose replay twice or not at
/// all shows in the counter and the list.
pub fn set_many(server: &RedisServer, prefix: &str, n: usize) {
    let mut con = server.client();
    let mut pipe = redis::pipe();
    for i in 0..n {
        pipe.cmd("SET").arg(format!("{prefix}{i}")).arg(i).ignore();
        pipe.cmd("INCR").arg(format!("{prefix}counter")).ignore();
        pipe.cmd("RPUSH")
            .arg(format!("{prefix}list"))
            .arg(i)
            .ignore();
    }
    pipe.query::<()>(&mut con).unwrap();
}

pub fn load_strings(server: &RedisServer, n: usize, prefix: &str) {
    let mut con = server.client();
    let value = vec![b'v'; 100];
    for chunk in (0..n).collect::<Vec<_>>().chunks(10_000) {
        let mut pipe = redis::pipe();
        for i in chunk {
            pipe.cmd("SET")
                .arg(format!("{prefix}{i}"))
                .arg(&value)
                .ignore();
        }
        pipe.query::<()>(&mut con).expect("load strings");
    }
}

/// `n` string keys (`<prefix><i>` = 100 bytes) into any sink, one command
/// at a time (use [`load_strings`] for speed on a standalone server).
pub fn load_strings_into(sink: &mut dyn Sink, n: usize, prefix: &str) {
    let value = vec![b'v'; 100];
    for i in 0..n {
        let key = format!("{prefix}{i}");
        sink.run(0, &[b"SET", key.as_bytes(), &value]);
    }
}

/// Values big enough to be written in parts under a small
/// `--big-key-threshold` (a few hundred KB each, `n` elements per
/// collection): a hash, a list, a set, a sorted set, a stream with a
/// consumer group and pending entries, a plain (incompressible) string, and
/// a list with a TTL.
pub fn load_big_values(server: &RedisServer, n: usize) {
    let mut con = server.client();
    let mut pipe = redis::pipe();
    for chunk_start in (0..n).step_by(500) {
        let range = chunk_start..(chunk_start + 500).min(n);
        let mut hset = redis::cmd("HSET");
        hset.arg("big:hash");
        let mut rpush = redis::cmd("RPUSH");
        rpush.arg("big:list");
        let mut sadd = redis::cmd("SADD");
        sadd.arg("big:set");
        let mut zadd = redis::cmd("ZADD");
        zadd.arg("big:zset");
        let mut ttl = redis::cmd("RPUSH");
        ttl.arg("big:ttl-list");
        for i in range {
            hset.arg(format!("field-{i}"))
                .arg(format!("value-{i}-{}", "v".repeat(i % 17)));
            rpush.arg(format!("element-{i}"));
            sadd.arg(format!("member-{i}"));
            zadd.arg(i as f64 / 3.0 - 1000.0).arg(format!("z-{i}"));
            ttl.arg(
                noise(8, i as u64)
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect::<String>(),
            );
        }
        pipe.add_command(hset).ignore();
        pipe.add_command(rpush).ignore();
        pipe.add_command(sadd).ignore();
        pipe.add_command(zadd).ignore();
        pipe.add_command(ttl).ignore();
    }
    for i in 1..=(n / 5).max(10) {
        pipe.cmd("XADD")
            .arg("big:stream")
            .arg(format!("{}-{}", 1_700_000_000_000u64 + i as u64, i % 2))
            .arg("n")
            .arg(i)
            .arg("payload")
            .arg(
                noise(20, i as u64 + 7)
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect::<String>(),
            )
            .ignore();
    }
    pipe.cmd("XGROUP")
        .arg("CREATE")
        .arg("big:stream")
        .arg("readers")
        .arg("0")
        .ignore();
    pipe.cmd("XREADGROUP")
        .arg("GROUP")
        .arg("readers")
        .arg("r1")
        .arg("COUNT")
        .arg(25)
        .arg("STREAMS")
        .arg("big:stream")
        .arg(">")
        .ignore();
    pipe.cmd("SET")
        .arg("big:string")
        .arg(noise(300_000, 9))
        .ignore();
    pipe.cmd("PEXPIREAT")
        .arg("big:ttl-list")
        .arg(FAR_EXPIRY_MS)
        .ignore();
    let _: () = pipe.query(&mut con).expect("load big values");
}
