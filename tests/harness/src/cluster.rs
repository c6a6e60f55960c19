//! Real Redis Clusters: N masters on free ports, created with
//! `redis-cli --cluster create`, and a small client that routes by slot.

use std::collections::HashMap;
use std::process::Command;
use std::time::Duration;

use crate::server::{RedisServer, ServerConfig};
use crate::wait::wait_for;

pub struct Cluster {
    pub nodes: Vec<RedisServer>,
}

/// CRC16 XMODEM of the hash tag, as Redis computes slots (written here
/// again so the harness does not trust the code under test).
pub fn key_slot(key: &[u8]) -> u16 {
    let mut k = key;
    if let Some(open) = key.iter().position(|&b| b == b'{') {
        if let Some(len) = key[open + 1..].iter().position(|&b| b == b'}') {
            if len > 0 {
                k = &key[open + 1..open + 1 + len];
            }
        }
    }
    let mut crc: u16 = 0;
    for &b in k {
        crc ^= (b as u16) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc % 16384
}

/// The slot ranges a cluster node serves (its own CLUSTER NODES line).
pub fn own_slots(node: &RedisServer) -> Vec<(u16, u16)> {
    let nodes: String = node.cmd(&["CLUSTER", "NODES"]);
    let line = nodes
        .lines()
        .find(|l| l.contains("myself"))
        .expect("myself line");
    line.split_whitespace()
        .skip(8)
        .filter(|r| !r.starts_with('['))
        .map(|r| {
            let (a, b) = r.split_once('-').unwrap_or((r, r));
            (a.parse().unwrap(), b.parse().unwrap())
        })
        .collect()
}

impl Cluster {
    /// Starts `masters` cluster nodes and joins them into one cluster.
    pub fn start(masters: usize) -> Cluster {
        Self::start_with(masters, RedisServer::config())
    }

    pub fn start_with(masters: usize, config: ServerConfig) -> Cluster {
        let nodes: Vec<RedisServer> = (0..masters).map(|_| Self::node(config.clone())).collect();
        let mut args = vec!["create".to_string()];
        args.extend(nodes.iter().map(RedisServer::addr));
        args.extend([
            "--cluster-replicas".into(),
            "0".into(),
            "--cluster-yes".into(),
        ]);
        cluster_cli(&args, config.password.as_deref());
        let cluster = Cluster { nodes };
        cluster.wait_stable();
        cluster
    }

    /// A node that is not (yet) part of any cluster. Its cluster config
    /// file is relative to its own `--dir`.
    pub fn node(config: ServerConfig) -> RedisServer {
        config
            .arg("cluster-enabled", &["yes"])
            .arg("cluster-node-timeout", &["5000"])
            .arg("cluster-config-file", &["nodes.conf"])
            .start()
    }

    /// Waits until every node agrees the cluster is ok.
    pub fn wait_stable(&self) {
        wait_for(
            "cluster_state:ok on every node",
            Duration::from_secs(30),
            || {
                self.nodes.iter().all(|n| {
                    let info: String = n.cmd(&["CLUSTER", "INFO"]);
                    info.contains("cluster_state:ok")
                        && self.nodes.iter().all(|other| {
                            let nodes: String = n.cmd(&["CLUSTER", "NODES"]);
                            nodes.contains(&format!("{}@", other.addr()))
                        })
                })
            },
        );
    }

    pub fn url(&self, i: usize) -> String {
        self.nodes[i].url()
    }

    pub fn masters(&self) -> Vec<&RedisServer> {
        self.nodes
            .iter()
            .filter(|n| n.info_field("role").as_deref() == Some("master"))
            .collect()
    }

    /// Keys over every node.
    pub fn dbsize(&self) -> u64 {
        self.nodes.iter().map(|n| n.dbsize(0)).sum()
    }

    /// The node id of node `i`.
    pub fn id(&self, i: usize) -> String {
        self.nodes[i].cmd(&["CLUSTER", "MYID"])
    }

    /// A client routing by slot (refreshing its map on MOVED).
    pub fn client(&self) -> ClusterClient {
        ClusterClient::new(
            self.nodes.iter().map(|n| n.port).collect(),
            self.nodes[0].password.clone(),
        )
    }

    /// Moves `count` slots from node `from` to node `to` with
    /// `redis-cli --cluster reshard` (keys migrate with MIGRATE).
    pub fn reshard(&self, from: usize, to: usize, count: usize) {
        let args = self.reshard_args(from, to, count);
        cluster_cli(&args, self.nodes[0].password.as_deref());
        self.wait_stable();
    }

    /// [`Cluster::reshard`] in a thread of its own (the caller waits for
    /// the cluster to be stable after joining it).
    pub fn reshard_in_background(
        &self,
        from: usize,
        to: usize,
        count: usize,
    ) -> std::thread::JoinHandle<()> {
        let args = self.reshard_args(from, to, count);
        let password = self.nodes[0].password.clone();
        std::thread::spawn(move || cluster_cli(&args, password.as_deref()))
    }

    fn reshard_args(&self, from: usize, to: usize, count: usize) -> Vec<String> {
        vec![
            "reshard".to_string(),
            self.nodes[0].addr(),
            "--cluster-from".into(),
            self.id(from),
            "--cluster-to".into(),
            self.id(to),
            "--cluster-slots".into(),
            count.to_string(),
            "--cluster-yes".into(),
        ]
    }

    /// Starts a node with `config` and adds it as a replica of node
    /// `master`; returns once it has synced.
    pub fn add_replica(&mut self, master: usize, config: ServerConfig) {
        let node = Self::node(config);
        let args = [
            "add-node".to_string(),
            node.addr(),
            self.nodes[master].addr(),
            "--cluster-slave".into(),
            "--cluster-master-id".into(),
            self.id(master),
        ];
        cluster_cli(&args, node.password.as_deref());
        wait_for("the replica to sync", Duration::from_secs(30), || {
            node.info_field("master_link_status").as_deref() == Some("up")
        });
        self.nodes.push(node);
        self.wait_stable();
    }

    /// Kills node `i` (-9, if it still runs) and waits until the cluster has promoted one of
    /// its replicas and is ok again; the dead node leaves `nodes`. Returns
    /// the index (in `nodes`, after the removal) of the promoted replica.
    pub fn fail_master(&mut self, i: usize) -> usize {
        let port = self.nodes[i].port.to_string();
        // (Node `i` itself may be dead already.)
        let replicas: Vec<u16> = self
            .nodes
            .iter()
            .enumerate()
            .filter(|(j, n)| {
                *j != i && n.info_field("master_port").as_deref() == Some(port.as_str())
            })
            .map(|(_, n)| n.port)
            .collect();
        assert!(!replicas.is_empty(), "node {i} has no replica");
        let dead = self.nodes.remove(i);
        dead.signal(libc::SIGKILL);
        drop(dead);
        let promoted = |n: &RedisServer| {
            replicas.contains(&n.port)
                && n.info_field("role").as_deref() == Some("master")
                && !own_slots(n).is_empty()
        };
        wait_for("a replica to take over", Duration::from_secs(60), || {
            self.nodes.iter().any(promoted)
                && self.nodes.iter().all(|n| {
                    let info: String = n.cmd(&["CLUSTER", "INFO"]);
                    info.contains("cluster_state:ok")
                })
        });
        self.nodes
            .iter()
            .position(promoted)
            .expect("a promoted replica")
    }

    /// Adds `node` to the cluster as an empty master.
    pub fn add_master(&mut self, node: RedisServer) {
        cluster_cli(
            &["add-node".to_string(), node.addr(), self.nodes[0].addr()],
            None,
        );
        self.nodes.push(node);
        self.wait_stable();
    }
}

/// Runs commands against the node that serves their key.
pub struct ClusterClient {
    ports: Vec<u16>,
    password: Option<String>,
    slots: Vec<u16>,
    conns: HashMap<u16, redis::Connection>,
}

impl ClusterClient {
    fn new(ports: Vec<u16>, password: Option<String>) -> ClusterClient {
        let mut c = ClusterClient {
            ports,
            password,
            slots: vec![0; 16384],
            conns: HashMap::new(),
        };
        c.refresh();
        c
    }

    pub fn conn(&mut self, port: u16) -> &mut redis::Connection {
        let password = self.password.clone();
        self.conns.entry(port).or_insert_with(|| {
            let url = match &password {
                Some(p) => format!("redis://:{p}@127.0.0.1:{port}/"),
                None => format!("redis://127.0.0.1:{port}/"),
            };
            redis::Client::open(url).unwrap().get_connection().unwrap()
        })
    }

    /// Reloads the slot map from CLUSTER SLOTS.
    pub fn refresh(&mut self) {
        let port = self.ports[0];
        let slots: Vec<(u16, u16, (String, u16))> = {
            let raw: redis::Value = redis::cmd("CLUSTER")
                .arg("SLOTS")
                .query(self.conn(port))
                .unwrap();
            let redis::Value::Array(ranges) = raw else {
                panic!("CLUSTER SLOTS")
            };
            ranges
                .into_iter()
                .map(|r| {
                    let redis::Value::Array(parts) = r else {
                        panic!("slot range")
                    };
                    let n = |v: &redis::Value| match v {
                        redis::Value::Int(i) => *i,
                        _ => panic!("int"),
                    };
                    let redis::Value::Array(master) = &parts[2] else {
                        panic!("master")
                    };
                    (
                        n(&parts[0]) as u16,
                        n(&parts[1]) as u16,
                        (String::new(), n(&master[1]) as u16),
                    )
                })
                .collect()
        };
        for (a, b, (_, port)) in slots {
            for s in a..=b {
                self.slots[s as usize] = port;
            }
            if !self.ports.contains(&port) {
                self.ports.push(port);
            }
        }
    }

    /// The port of the master serving `route_key`'s slot.
    pub fn port_for(&self, route_key: &[u8]) -> u16 {
        self.slots[key_slot(route_key) as usize]
    }

    /// The connection to the master serving `route_key`'s slot.
    pub fn node_for(&mut self, route_key: &[u8]) -> &mut redis::Connection {
        let port = self.slots[key_slot(route_key) as usize];
        self.conn(port)
    }

    /// Runs `args` on the owner of `route_key`'s slot, following MOVED/ASK.
    pub fn run_on(&mut self, route_key: &[u8], args: &[&[u8]]) -> redis::Value {
        let slot = key_slot(route_key);
        for _ in 0..10 {
            let port = self.slots[slot as usize];
            let mut cmd = redis::cmd(std::str::from_utf8(args[0]).unwrap());
            for a in &args[1..] {
                cmd.arg(*a);
            }
            match cmd.query::<redis::Value>(self.conn(port)) {
                Ok(v) => return v,
                Err(e) if e.code() == Some("MOVED") || e.code() == Some("TRYAGAIN") => {
                    std::thread::sleep(Duration::from_millis(20));
                    self.refresh();
                }
                Err(e) if e.code() == Some("ASK") => {
                    let target: u16 = e
                        .detail()
                        .and_then(|d| d.split(':').nth(1)?.parse().ok())
                        .unwrap();
                    let c = self.conn(target);
                    let _: () = redis::cmd("ASKING").query(c).unwrap();
                    match cmd.query(c) {
                        Ok(v) => return v,
                        // A multi-key command whose keys the migration has
                        // split between the two nodes: again in a moment.
                        Err(e) if e.code() == Some("TRYAGAIN") => {
                            std::thread::sleep(Duration::from_millis(20));
                        }
                        Err(e) => panic!("{args:?}: {e}"),
                    }
                }
                Err(e) => panic!(
                    "{:?}: {e}",
                    args.iter()
                        .map(|a| String::from_utf8_lossy(a))
                        .collect::<Vec<_>>()
                ),
            }
        }
        panic!(
            "too many redirections for {:?}",
            String::from_utf8_lossy(route_key)
        );
    }

    /// Runs a keyless command on every master.
    pub fn run_everywhere(&mut self, args: &[&[u8]]) {
        for port in self.ports.clone() {
            let mut cmd = redis::cmd(std::str::from_utf8(args[0]).unwrap());
            for a in &args[1..] {
                cmd.arg(*a);
            }
            let _: redis::Value = cmd.query(self.conn(port)).unwrap();
        }
    }
}

/// Runs `redis-cli --cluster <args>` (with `-a password` when given) and
/// panics with its output if it fails.
fn cluster_cli(args: &[String], password: Option<&str>) {
    let mut cmd = Command::new("redis-cli");
    cmd.arg("--cluster").args(args);
    if let Some(p) = password {
        cmd.args(["-a", p, "--no-auth-warning"]);
    }
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("run redis-cli --cluster {}: {e}", args[0]));
    assert!(
        out.status.success(),
        "redis-cli --cluster {} failed: {}{}",
        args[0],
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
