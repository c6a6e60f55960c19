//! Live writes for fault tests: a thread that keeps sending a mix of
//! commands whose effect doubles when applied twice (INCR, APPEND, LPUSH,
//! HINCRBY, LMOVE, BITOP over changing strings, ...) or vanishes when lost, over a small key space so that they
//! pile up on the same keys. Seeded: the same seed gives the same commands.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use crate::server::RedisServer;

/// A running load; stops (and joins) on [`Load::stop`] or drop.
pub struct Load {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

/// Small xorshift generator (no dependency, reproducible).
pub struct Rng(pub u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

/// One pipeline of `n` commands of the mix, every key name starting with
/// `tag` (a hash tag on a cluster: one slot for the whole round).
fn round(rng: &mut Rng, n: usize, tag: &str) -> redis::Pipeline {
    let mut pipe = redis::pipe();
    for _ in 0..n {
        let k = rng.below(40);
        match rng.below(16) {
            0 => pipe.cmd("INCR").arg(format!("{tag}ctr:{k}")),
            1 => pipe
                .cmd("INCRBYFLOAT")
                .arg(format!("{tag}flt:{k}"))
                .arg("0.5"),
            2 => pipe.cmd("APPEND").arg(format!("{tag}str:{k}")).arg("ab"),
            3 => pipe
                .cmd("LPUSH")
                .arg(format!("{tag}list:{k}"))
                .arg(rng.below(1000)),
            4 => pipe.cmd("LPOP").arg(format!("{tag}list:{k}")),
            5 => pipe
                .cmd("HINCRBY")
                .arg(format!("{tag}hash:{k}"))
                .arg(rng.below(5))
                .arg(1),
            6 => pipe
                .cmd("SADD")
                .arg(format!("{tag}set:{k}"))
                .arg(rng.below(50)),
            7 => pipe
                .cmd("ZINCRBY")
                .arg(format!("{tag}zset:{k}"))
                .arg(1)
                .arg(rng.below(10)),
            8 => pipe
                .cmd("SETRANGE")
                .arg(format!("{tag}str:{k}"))
                .arg(rng.below(8))
                .arg("z"),
            9 => pipe
                .cmd("RPOPLPUSH")
                .arg(format!("{tag}list:{k}"))
                .arg(format!("{tag}list:{}", rng.below(40))),
            10 => pipe
                .cmd("EVAL")
                .arg("redis.call('INCR', KEYS[1]); return redis.call('LPUSH', KEYS[2], ARGV[1])")
                .arg(2)
                .arg(format!("{tag}ctr:{k}"))
                .arg(format!("{tag}list:{k}"))
                .arg(rng.below(100)),
            12 => pipe
                .cmd("PFADD")
                .arg(format!("{tag}hll:{}", k % 8))
                .arg(rng.below(5000)),
            13 => pipe
                .cmd("BITOP")
                .arg("XOR")
                .arg(format!("{tag}bits:{}", k % 8))
                .arg(format!("{tag}str:{k}"))
                .arg(format!("{tag}str:{}", rng.below(40))),
            14 => pipe.cmd("SPOP").arg(format!("{tag}set:{k}")),
            15 => pipe
                .cmd("LMOVE")
                .arg(format!("{tag}list:{k}"))
                .arg(format!("{tag}list:{}", rng.below(40)))
                .arg("LEFT")
                .arg("RIGHT"),
            _ => pipe
                .cmd("XADD")
                .arg(format!("{tag}stream:{}", k % 4))
                .arg("*")
                .arg("f")
                .arg(rng.below(100)),
        };
        pipe.ignore();
    }
    pipe
}

/// Where a load writes: one server, or a cluster (a round per hash tag).
enum Sink {
    One(redis::Connection),
    Cluster(crate::cluster::ClusterClient),
}

impl Sink {
    /// The tag of the next round (none on one server) and its connection.
    fn next(&mut self, rng: &mut Rng) -> (String, &mut redis::Connection) {
        match self {
            Sink::One(con) => (String::new(), con),
            Sink::Cluster(client) => {
                let tag = format!("{{g{}}}", rng.below(8));
                let con = client.node_for(tag.as_bytes());
                (tag, con)
            }
        }
    }
}

impl Load {
    /// Starts writing to `server` in rounds of `batch` pipelined commands,
    /// with a MULTI/EXEC block after each round.
    pub fn start(server: &RedisServer, seed: u64, batch: usize) -> Load {
        Self::spawn(Sink::One(server.client()), seed, batch)
    }

    /// [`Load::start`] on a cluster: each round (and its MULTI/EXEC block)
    /// goes to one of eight hash tags, so that multi-key commands stay in
    /// one slot, pipelined to the master serving it.
    pub fn start_cluster(cluster: &crate::cluster::Cluster, seed: u64, batch: usize) -> Load {
        Self::spawn(Sink::Cluster(cluster.client()), seed, batch)
    }

    fn spawn(mut sink: Sink, seed: u64, batch: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let (stop2, sent2) = (stop.clone(), sent.clone());
        let thread = std::thread::spawn(move || {
            let mut rng = Rng(seed.max(1));
            while !stop2.load(Ordering::Relaxed) {
                let (tag, con) = sink.next(&mut rng);
                let _: () = round(&mut rng, batch, &tag).query(con).expect("load round");
                let k = rng.below(40);
                let _: () = redis::pipe()
                    .atomic()
                    .cmd("INCR")
                    .arg(format!("{tag}ctr:{k}"))
                    .ignore()
                    .cmd("APPEND")
                    .arg(format!("{tag}str:{k}"))
                    .arg("tx")
                    .ignore()
                    .query(con)
                    .expect("load transaction");
                sent2.fetch_add(batch as u64 + 2, Ordering::Relaxed);
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
        });
        Load {
            stop,
            sent,
            thread: Some(thread),
        }
    }

    /// One source transaction of `n` commands of the mix (MULTI/EXEC), on
    /// a connection of its own.
    pub fn transaction(server: &RedisServer, seed: u64, n: usize) {
        let mut rng = Rng::new(seed);
        let mut pipe = round(&mut rng, n, "");
        let _: () = pipe
            .atomic()
            .query(&mut server.client())
            .expect("big transaction");
    }

    /// Commands sent so far.
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    /// Stops writing and waits for the last round to be answered.
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().expect("load thread");
        }
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
