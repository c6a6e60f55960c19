//! `shardsync verify`: compare source and target key by key.
//!
//! Every key of the compared source databases is read on both sides with
//! type-aware commands (so two equal sets in different internal orders
//! compare equal) and its TTL checked; keys the target has beyond the
//! source's are counted from DBSIZE. Either side may be several nodes: a
//! cluster source or a Twemproxy pool is read node by node, a cluster
//! target is read where each key's slot lives. shardsync's own keys (heartbeats, markers)
//! are left out. Run it with writes stopped: a live source moves while it
//! is being read.

use std::collections::BTreeMap;

use engine::filter::KeyFilter;
use engine::resp::Frame;
use shard_worker::conn::Conn;
use shard_worker::{Endpoint, WorkerError};

/// Keys read per round trip.
const BATCH: usize = 500;
/// TTLs may differ by this much (the two reads are not simultaneous).
const TTL_TOLERANCE_MS: i64 = 2000;

#[derive(Debug, Default)]
pub struct VerifyReport {
    pub keys_compared: u64,
    pub differences: Vec<String>,
    pub n_differences: u64,
    /// Per target db: keys in the target not accounted for by the source.
    pub extra_on_target: BTreeMap<u32, u64>,
    /// shardsync's own keys (heartbeats, markers, temporary names) in the
    /// compared databases, left out of the comparison: (source, target).
    pub internal_keys: (u64, u64),
}

impl VerifyReport {
    pub fn consistent(&self) -> bool {
        self.n_differences == 0 && self.extra_on_target.values().all(|&n| n == 0)
    }
}

/// One side of a compare: its nodes, and on a cluster which node serves
/// each slot.
pub struct Side {
    conns: Vec<Conn>,
    /// Slot → index in `conns` (a cluster); `None`: every key on `conns[0]`
    /// (a standalone server), or on any of them (a pool's backends, which
    /// are scanned one by one).
    owner: Option<Vec<u16>>,
}

impl Side {
    /// One server, or (with `slots`) the masters of a cluster.
    pub async fn open(
        nodes: &[Endpoint],
        slots: Option<&[Vec<(u16, u16)>]>,
    ) -> Result<Side, WorkerError> {
        let mut conns = Vec::new();
        for ep in nodes {
            conns.push(Conn::open_authenticated(ep).await?);
        }
        let owner = slots.map(|ranges| {
            let mut owner = vec![0u16; engine::slot::SLOTS as usize];
            for (i, node) in ranges.iter().enumerate() {
                for &(a, b) in node {
                    for slot in a..=b {
                        owner[slot as usize] = i as u16;
                    }
                }
            }
            owner
        });
        Ok(Side { conns, owner })
    }

    pub fn is_cluster(&self) -> bool {
        self.owner.is_some()
    }

    async fn select(&mut self, db: u32) -> Result<(), WorkerError> {
        if self.owner.is_some() {
            return Ok(()); // a cluster has database 0 only
        }
        for c in &mut self.conns {
            select(c, db).await?;
        }
        Ok(())
    }

    /// Runs `commands` where their keys (`keys[i]` for `commands[i]`)
    /// live, one pipeline per node, replies in the order of `commands`.
    async fn pipeline(
        &mut self,
        commands: &[Vec<Vec<u8>>],
        keys: &[&[u8]],
    ) -> Result<Vec<Frame>, WorkerError> {
        let Some(owner) = &self.owner else {
            return self.conns[0].pipeline(commands).await;
        };
        let mut per_node: Vec<Vec<usize>> = vec![Vec::new(); self.conns.len()];
        for (i, key) in keys.iter().enumerate() {
            per_node[owner[engine::slot::slot(key) as usize] as usize].push(i);
        }
        let mut out = vec![Frame::Null; commands.len()];
        for (node, indices) in per_node.iter().enumerate() {
            if indices.is_empty() {
                continue;
            }
            let batch: Vec<Vec<Vec<u8>>> = indices.iter().map(|&i| commands[i].clone()).collect();
            let replies = self.conns[node].pipeline(&batch).await?;
            for (&i, reply) in indices.iter().zip(replies) {
                out[i] = reply;
            }
        }
        Ok(out)
    }
}

/// Compares the selected databases (`dbs`: source db → target db) of
/// every source node (one server, a cluster's masters, a pool's backends)
/// with the target.
pub async fn verify(
    sources: &[Endpoint],
    target: &mut Side,
    dbs: &[(u32, u32)],
    filter: &KeyFilter,
    show: usize,
) -> Result<VerifyReport, WorkerError> {
    let mut srcs = Vec::new();
    for ep in sources {
        srcs.push(Conn::open_authenticated(ep).await?);
    }
    let mut report = VerifyReport::default();
    for &(sdb, tdb) in dbs {
        target.select(tdb).await?;
        let mut in_source = 0u64;
        for src in &mut srcs {
            select(src, sdb).await?;
            in_source += compare_node(src, target, sdb, filter, &mut report, show).await?;
        }
        let mut internal = 0;
        for dst in &mut target.conns {
            internal += internal_keys(dst).await?;
        }
        report.internal_keys.1 += internal;
        let extra = if filter.is_all() {
            let mut target_size = 0;
            for dst in &mut target.conns {
                if let Frame::Integer(n) = dst.request(&["DBSIZE"]).await? {
                    target_size += n as u64;
                }
            }
            // Keys that expired on the source between SCAN and now are
            // already reported as differences; what remains is what the
            // target has more (shardsync's own keys aside).
            target_size
                .saturating_sub(in_source)
                .saturating_sub(internal)
        } else {
            // The target may hold keys the filter leaves out: count only
            // kept keys the source lacks.
            let mut extra = 0;
            for dst in &mut target.conns {
                extra += extra_kept_keys(&mut srcs, dst, filter).await?;
            }
            extra
        };
        report.extra_on_target.insert(tdb, extra);
    }
    Ok(report)
}

/// Compares every kept key of one source node; returns how many it has.
async fn compare_node(
    src: &mut Conn,
    target: &mut Side,
    sdb: u32,
    filter: &KeyFilter,
    report: &mut VerifyReport,
    show: usize,
) -> Result<u64, WorkerError> {
    let mut cursor = "0".to_string();
    let mut in_source = 0u64;
    loop {
        let (next, batch) = src.scan_page(&cursor, None).await?;
        let (internal, batch): (Vec<Vec<u8>>, Vec<Vec<u8>>) = batch
            .into_iter()
            .partition(|k| engine::marker::is_internal(k));
        report.internal_keys.0 += internal.len() as u64;
        let batch: Vec<Vec<u8>> = batch.into_iter().filter(|k| filter.keeps(k)).collect();
        for chunk in batch.chunks(BATCH) {
            in_source += chunk.len() as u64;
            compare_keys(src, target, sdb, chunk, report, show).await?;
        }
        if next == "0" {
            return Ok(in_source);
        }
        cursor = next;
    }
}

/// Kept keys of one target node's selected database that no source node's
/// selected database has.
async fn extra_kept_keys(
    srcs: &mut [Conn],
    dst: &mut Conn,
    filter: &KeyFilter,
) -> Result<u64, WorkerError> {
    let mut extra = 0;
    let mut cursor = "0".to_string();
    loop {
        let (next, batch) = dst.scan_page(&cursor, None).await?;
        let kept: Vec<Vec<&[u8]>> = batch
            .iter()
            .filter(|k| filter.keeps(k) && !engine::marker::is_internal(k))
            .map(|k| vec![&b"EXISTS"[..], k])
            .collect();
        let mut found = vec![false; kept.len()];
        for src in srcs.iter_mut() {
            for (i, reply) in src.pipeline(&kept).await?.into_iter().enumerate() {
                found[i] |= !matches!(reply, Frame::Integer(0));
            }
        }
        extra += found.iter().filter(|f| !**f).count() as u64;
        if next == "0" {
            return Ok(extra);
        }
        cursor = next;
    }
}

/// Keys shardsync wrote for itself (heartbeats, markers, temporary names)
/// in the selected database.
async fn internal_keys(conn: &mut Conn) -> Result<u64, WorkerError> {
    let mut n = 0;
    let mut cursor = "0".to_string();
    loop {
        let (next, batch) = conn.scan_page(&cursor, Some("*shardsync:*")).await?;
        n += batch
            .iter()
            .filter(|k| engine::marker::is_internal(k))
            .count() as u64;
        if next == "0" {
            return Ok(n);
        }
        cursor = next;
    }
}

async fn select(conn: &mut Conn, db: u32) -> Result<(), WorkerError> {
    match conn.request(&["SELECT", &db.to_string()]).await? {
        Frame::Error(e) => Err(WorkerError::Unexpected {
            addr: conn.addr.clone(),
            context: "selecting a database",
            reply: String::from_utf8_lossy(&e).into_owned(),
        }),
        _ => Ok(()),
    }
}

async fn compare_keys(
    src: &mut Conn,
    dst: &mut Side,
    db: u32,
    keys: &[Vec<u8>],
    report: &mut VerifyReport,
    show: usize,
) -> Result<(), WorkerError> {
    let meta: Vec<Vec<Vec<u8>>> = keys
        .iter()
        .flat_map(|k| {
            [
                vec![b"TYPE".to_vec(), k.clone()],
                vec![b"PTTL".to_vec(), k.clone()],
            ]
        })
        .collect();
    let meta_keys: Vec<&[u8]> = keys.iter().flat_map(|k| [&k[..], &k[..]]).collect();
    let src_meta = src.pipeline(&meta).await?;
    let dst_meta = dst.pipeline(&meta, &meta_keys).await?;
    let mut reads: Vec<Vec<Vec<u8>>> = Vec::new();
    let mut read_keys: Vec<&[u8]> = Vec::new();
    let mut compared = Vec::new();
    for (i, key) in keys.iter().enumerate() {
        let s_type = src_meta[2 * i].to_text();
        let d_type = dst_meta[2 * i].to_text();
        if s_type == "none" {
            continue; // expired or deleted meanwhile
        }
        report.keys_compared += 1;
        let name = String::from_utf8_lossy(key);
        if d_type != s_type {
            let what = if d_type == "none" {
                "missing on the target".to_string()
            } else {
                format!("type {s_type} on the source, {d_type} on the target")
            };
            note(report, show, format!("db{db} {name:?}: {what}"));
            continue;
        }
        let (Frame::Integer(s_ttl), Frame::Integer(d_ttl)) =
            (&src_meta[2 * i + 1], &dst_meta[2 * i + 1])
        else {
            continue;
        };
        let ttl_differs = (*s_ttl < 0) != (*d_ttl < 0) || (s_ttl - d_ttl).abs() > TTL_TOLERANCE_MS;
        if ttl_differs {
            note(
                report,
                show,
                format!("db{db} {name:?}: TTL {s_ttl} ms on the source, {d_ttl} ms on the target"),
            );
        }
        for cmd in value_reads(&s_type, key) {
            reads.push(cmd);
            read_keys.push(&key[..]);
        }
        compared.push((key, s_type));
    }
    let src_vals = src.pipeline(&reads).await?;
    let dst_vals = dst.pipeline(&reads, &read_keys).await?;
    let mut at = 0;
    for (key, kind) in compared {
        let n = value_reads(&kind, key).len();
        let equal = (at..at + n).all(|j| {
            normalize(&kind, j - at, &src_vals[j]) == normalize(&kind, j - at, &dst_vals[j])
        });
        if !equal {
            note(
                report,
                show,
                format!(
                    "db{db} {:?}: {kind} values differ",
                    String::from_utf8_lossy(key)
                ),
            );
        }
        at += n;
    }
    Ok(())
}

/// The commands that read a whole value of type `kind`.
fn value_reads(kind: &str, key: &[u8]) -> Vec<Vec<Vec<u8>>> {
    let k = key.to_vec();
    let cmd = |parts: &[&[u8]]| parts.iter().map(|p| p.to_vec()).collect::<Vec<_>>();
    match kind {
        "string" => vec![cmd(&[b"GET", &k])],
        "list" => vec![cmd(&[b"LRANGE", &k, b"0", b"-1"])],
        "set" => vec![cmd(&[b"SMEMBERS", &k])],
        "zset" => vec![cmd(&[b"ZRANGE", &k, b"0", b"-1", b"WITHSCORES"])],
        "hash" => vec![cmd(&[b"HGETALL", &k])],
        "stream" => vec![
            cmd(&[b"XRANGE", &k, b"-", b"+"]),
            cmd(&[b"XINFO", b"GROUPS", &k]),
        ],
        // Module types and anything newer: compare serialized values.
        _ => vec![cmd(&[b"DUMP", &k])],
    }
}

/// Makes replies comparable: unordered collections are sorted; stream
/// group info keeps only what replication carries.
fn normalize(kind: &str, read: usize, frame: &Frame) -> Frame {
    match (kind, frame) {
        ("set", Frame::Array(items)) => {
            let mut items = items.clone();
            items.sort_by(|a, b| a.as_bytes().cmp(&b.as_bytes()));
            Frame::Array(items)
        }
        ("hash", Frame::Array(items)) => {
            let mut pairs: Vec<(Frame, Frame)> = items
                .chunks(2)
                .filter(|c| c.len() == 2)
                .map(|c| (c[0].clone(), c[1].clone()))
                .collect();
            pairs.sort_by(|a, b| a.0.as_bytes().cmp(&b.0.as_bytes()));
            Frame::Array(pairs.into_iter().flat_map(|(a, b)| [a, b]).collect())
        }
        ("stream", Frame::Array(groups)) if read == 1 => {
            // Per group: name, consumers, pending, last-delivered-id.
            let mut kept: Vec<Frame> = groups
                .iter()
                .map(|g| match g {
                    Frame::Array(fields) => Frame::Array(
                        fields
                            .chunks(2)
                            .filter(|c| {
                                matches!(
                                    c[0].as_bytes(),
                                    Some(
                                        b"name" | b"consumers" | b"pending" | b"last-delivered-id"
                                    )
                                )
                            })
                            .flat_map(|c| c.iter().cloned())
                            .collect(),
                    ),
                    other => other.clone(),
                })
                .collect();
            kept.sort_by_key(|g| g.to_text());
            Frame::Array(kept)
        }
        _ => frame.clone(),
    }
}

fn note(report: &mut VerifyReport, show: usize, line: String) {
    report.n_differences += 1;
    if report.differences.len() < show {
        report.differences.push(line);
    }
}
