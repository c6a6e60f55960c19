//! Moving off Twemproxy in one command: every backend of a real
//! `nutcracker` pool synced at once (one shard each) into a cluster or a
//! standalone server, with clients writing through the proxy meanwhile, and
//! the union compared key by key.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use harness::cluster::Cluster;
use harness::compare::diff_nodes;
use harness::twemproxy::Twemproxy;
use harness::{RedisServer, Shardsync, SHORT};

const BIN: &str = env!("CARGO_BIN_EXE_shardsync");
const LONG: Duration = Duration::from_secs(90);

/// Every type Twemproxy passes through, written through it (streams, which
/// it does not pass, straight to two backends).
fn load_through(proxy: &Twemproxy, backends: &[&RedisServer], n: usize) {
    let mut con = proxy.client();
    for i in 0..n {
        let mut pipe = redis::pipe();
        pipe.cmd("SET")
            .arg(format!("str:{i}"))
            .arg(format!("value-{i}"))
            .ignore();
        pipe.cmd("SETEX")
            .arg(format!("ttl:{i}"))
            .arg(3600)
            .arg(i)
            .ignore();
        pipe.cmd("HSET")
            .arg(format!("hash:{i}"))
            .arg(&["a", "1", "b", "2"])
            .ignore();
        pipe.cmd("RPUSH")
            .arg(format!("list:{i}"))
            .arg(&["x", "y", "z"])
            .ignore();
        pipe.cmd("SADD")
            .arg(format!("set:{i}"))
            .arg(&["m1", "m2", "3"])
            .ignore();
        pipe.cmd("ZADD")
            .arg(format!("zset:{i}"))
            .arg(&["1", "one", "2.5", "two"])
            .ignore();
        pipe.cmd("INCRBY")
            .arg(format!("counter:{}", i % 50))
            .arg(i)
            .ignore();
        if i.is_multiple_of(10) {
            pipe.cmd("PFADD")
                .arg(format!("hll:{i}"))
                .arg(&["a", "b", "c"])
                .ignore();
            pipe.cmd("MSET")
                .arg(format!("m:{i}:a"))
                .arg(1)
                .arg(format!("m:{i}:b"))
                .arg(2)
                .ignore();
        }
        let _: () = pipe.query(&mut con).expect("write through the proxy");
    }
    for (b, backend) in backends.iter().enumerate().step_by(2) {
        let mut con = backend.client();
        for i in 1..=50 {
            let _: String = redis::cmd("XADD")
                .arg(format!("stream:{b}"))
                .arg(format!("{i}-1"))
                .arg("n")
                .arg(i)
                .query(&mut con)
                .unwrap();
        }
        let _: () = redis::cmd("XGROUP")
            .arg(&[&format!("stream:{b}"), "CREATE", "g", "0"][..])
            .query(&mut con)
            .or_else(|_| {
                redis::cmd("XGROUP")
                    .arg("CREATE")
                    .arg(format!("stream:{b}"))
                    .arg("g")
                    .arg("0")
                    .query(&mut con)
            })
            .unwrap();
    }
}

/// Writes through the proxy until `stop`: overwrites, increments, deletes,
/// list pushes, multi-key MSET/DEL (which the proxy splits per backend).
fn live_writer(proxy_url: String, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let mut con = harness::twemproxy::proxy_client(&proxy_url)
            .get_connection()
            .unwrap();
        let mut n = 0u64;
        while !stop.load(Ordering::Relaxed) {
            let i = n % 500;
            let mut pipe = redis::pipe();
            pipe.cmd("SET")
                .arg(format!("str:{i}"))
                .arg(format!("live-{n}"))
                .ignore();
            pipe.cmd("INCR").arg(format!("counter:{}", n % 50)).ignore();
            pipe.cmd("RPUSH").arg(format!("list:{i}")).arg(n).ignore();
            pipe.cmd("HINCRBY")
                .arg(format!("hash:{i}"))
                .arg("a")
                .arg(1)
                .ignore();
            pipe.cmd("MSET")
                .arg(format!("live:{n}:a"))
                .arg(n)
                .arg(format!("live:{n}:b"))
                .arg(n)
                .ignore();
            if n.is_multiple_of(7) {
                pipe.cmd("DEL")
                    .arg(format!("set:{i}"))
                    .arg(format!("zset:{i}"))
                    .ignore();
            }
            let _: () = pipe.query(&mut con).expect("live write through the proxy");
            n += 1;
        }
        n
    })
}

fn migrate(backends: usize, into_cluster: bool) {
    let servers: Vec<RedisServer> = (0..backends).map(|_| RedisServer::start()).collect();
    let refs: Vec<&RedisServer> = servers.iter().collect();
    let proxy = Twemproxy::start("alpha", &refs, None);
    load_through(&proxy, &refs, 2000);
    for s in &servers {
        assert!(
            s.dbsize(0) > 100,
            "the pool spreads keys over every backend"
        );
    }

    let cluster;
    let standalone;
    let (target_url, targets): (String, Vec<&RedisServer>) = if into_cluster {
        cluster = Cluster::start(3);
        (cluster.url(0), cluster.masters())
    } else {
        standalone = RedisServer::start();
        (standalone.url(), vec![&standalone])
    };
    let stop = Arc::new(AtomicBool::new(false));
    let writer = live_writer(proxy.url(), stop.clone());
    let mut sync = Shardsync::sync(
        BIN,
        &[
            "--source",
            &proxy.source_url("alpha"),
            "--target",
            &target_url,
        ],
    );
    sync.wait_state("incremental", LONG);
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    let writes = writer.join().unwrap();
    assert!(writes > 10, "the live writer ran ({writes} rounds)");
    for s in &servers {
        sync.wait_caught_up(s, LONG);
    }
    let status = sync.status().unwrap();
    assert_eq!(
        status["shards"].as_array().unwrap().len(),
        backends,
        "{status}"
    );
    let diffs = diff_nodes(&refs, 0, &targets, 0);
    assert!(
        diffs.is_empty(),
        "{} differences:\n{}",
        diffs.len(),
        diffs.join("\n")
    );
    let done = sync.terminate(SHORT);
    assert_eq!(done.code(), Some(0), "{}", done.log);

    // `verify` reads the pool backend by backend and the target where each
    // key lives, and agrees; then it notices a key lost on the target.
    let source_url = proxy.source_url("alpha");
    let verify = || {
        Shardsync::run(
            BIN,
            "verify",
            &["--source", &source_url, "--target", &target_url],
            LONG,
        )
    };
    let done = verify();
    assert_eq!(done.code(), Some(0), "{}", done.log);
    // Data keys (shardsync's own keys aside: a heartbeat per backend).
    let total: u64 = servers.iter().map(|s| s.dbsize(0)).sum();
    assert!(
        done.log
            .contains(&format!("compared {total} keys: 0 differences")),
        "{total} keys in the pool\n{}",
        done.log
    );
    let victim = targets
        .iter()
        .find_map(|t| {
            let key: Option<String> = t.cmd(&["RANDOMKEY"]);
            key.filter(|k| !harness::compare::is_internal(k.as_bytes()))
                .map(|k| (t, k))
        })
        .expect("a key on the target");
    let _: i64 = victim.0.cmd(&["DEL", &victim.1]);
    let done = verify();
    assert_eq!(done.code(), Some(4), "{}", done.log);
    assert!(
        done.log
            .contains(&format!("{:?}: missing on the target", victim.1)),
        "{}",
        done.log
    );
}

#[test]
fn a_four_backend_pool_moves_into_a_cluster_in_one_command() {
    migrate(4, true);
}

#[test]
fn a_two_backend_pool_moves_into_one_server() {
    migrate(2, false);
}

#[test]
fn pool_credentials_reach_the_backends() {
    let servers: Vec<RedisServer> = (0..2)
        .map(|_| RedisServer::config().password("pool-secret").start())
        .collect();
    let refs: Vec<&RedisServer> = servers.iter().collect();
    let proxy = Twemproxy::start("beta", &refs, Some("pool-secret"));
    let target = RedisServer::start();
    let sync = Shardsync::sync(
        BIN,
        &[
            "--source",
            &proxy.source_url("beta"),
            "--target",
            &target.url(),
        ],
    );
    for s in &servers {
        sync.wait_caught_up(s, SHORT);
    }
    assert!(!sync.log().contains("pool-secret"), "{}", sync.log());
}

#[test]
fn pointing_redis_url_at_the_proxy_says_to_use_its_config() {
    let backend = RedisServer::start();
    let proxy = Twemproxy::start("alpha", &[&backend], None);
    let target = RedisServer::start();
    let done = Shardsync::run(
        BIN,
        "sync",
        &["--source", &proxy.url(), "--target", &target.url()],
        SHORT,
    );
    assert_eq!(done.code(), Some(3), "{}", done.log);
    assert!(
        done.log.contains(&proxy.addr()) && done.log.contains("twemproxy:///"),
        "{}",
        done.log
    );
}

#[test]
fn bad_pools_are_refused_with_the_reason() {
    let dir = harness::server::TempDir::new("nutcracker-bad");
    let target = RedisServer::start();
    for (yml, needle) in [
        (
            "m:\n  redis: false\n  servers:\n   - 127.0.0.1:11211:1\n",
            "memcached",
        ),
        ("a:\n  servers:\n   - /tmp/r.sock:1 r\n", "unix socket"),
        ("a:\n  listen: 1\n  servers: [\n", "twemproxy config"),
    ] {
        let path = dir.path().join("n.yml");
        std::fs::write(&path, yml).unwrap();
        let done = Shardsync::run(
            BIN,
            "sync",
            &[
                "--source",
                &format!("twemproxy://{}", path.display()),
                "--target",
                &target.url(),
            ],
            SHORT,
        );
        assert_eq!(done.code(), Some(3), "{}", done.log);
        assert!(done.log.contains(needle), "{needle}: {}", done.log);
    }
}
