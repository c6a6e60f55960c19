//! Micro-benchmark of routing into a cluster target:
//!
//! ```text
//! cargo bench -p shardsync-benches --bench router
//! ```
//!
//! A replication stream of ordinary writes (SET, INCR, HSET, LPUSH, with a
//! cross-slot MSET now and then) is cut into commands, looked up in the
//! command table, planned (`split::plan`: one slot, or per-slot parts),
//! routed through the shared slot map of a 3-master target, and appended
//! to the per-writer batches: everything a shard's intake does per command
//! short of handing batches to the writers. Commands/s, two ways: the
//! replay rules (`engine::replay::Replay::step`, then its actions carried
//! out as `source/stream.rs` does: what shardsync runs), and the bare
//! table lookup + `split::plan` the intake used before the rules became
//! their own module (the cost floor the rules are measured against).

use std::sync::Arc;

use bytes::BytesMut;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use engine::command;
use engine::filter::DbFilter;
use engine::replay::{Action, Dest, Replay, ReplayConfig};
use engine::resp::{encode, parse_command};
use engine::split::{self, Plan};
use shard_worker::progress::WriterStats;
use shard_worker::route::{
    BatchBuilder, ClusterRouting, ExpectKind, Overflow, Router, WriterHandle,
};
use shard_worker::Endpoint;
use tokio::sync::mpsc;

fn stream(n: usize) -> Vec<u8> {
    let mut buf = BytesMut::new();
    let value = vec![b'x'; 100];
    for i in 0..n {
        let key = format!("key:{i:08}");
        match i % 5 {
            0 => encode::command(&mut buf, &[&b"SET"[..], key.as_bytes(), &value]),
            1 => encode::command(&mut buf, &[&b"INCR"[..], key.as_bytes()]),
            2 => encode::command(&mut buf, &[&b"HSET"[..], key.as_bytes(), b"f", &value]),
            3 if i % 100 == 3 => encode::command(
                &mut buf,
                &[
                    &b"MSET"[..],
                    key.as_bytes(),
                    b"1",
                    b"other",
                    b"2",
                    b"third",
                    b"3",
                ],
            ),
            _ => encode::command(&mut buf, &[&b"LPUSH"[..], key.as_bytes(), &value]),
        }
    }
    buf.to_vec()
}

fn cluster_router(spill: &std::path::Path) -> Router {
    let handles: Vec<WriterHandle> = (0..3)
        .map(|i| {
            let target = format!("127.0.0.1:{}", 7000 + i);
            let stats = Arc::new(WriterStats::new(target.clone()));
            let (tx, _rx) = mpsc::channel(16);
            let (redirect, _) = mpsc::unbounded_channel();
            WriterHandle {
                index: i,
                overflow: Arc::new(Overflow::new(spill, &target, 1 << 20, stats.clone())),
                target,
                endpoint: Endpoint::new("127.0.0.1", 7000 + i as u16),
                tx,
                redirect,
                stats,
            }
        })
        .collect();
    let (node_tx, _) = mpsc::channel(1);
    let routing = ClusterRouting::new(|s| (s as usize * 3) / 16384, &handles, node_tx);
    Router::cluster(Arc::new(routing))
}

fn router(c: &mut Criterion) {
    let n = 10_000;
    let bytes = stream(n);
    let spill = std::env::temp_dir().join(format!("shardsync-router-bench-{}", std::process::id()));
    let router = cluster_router(&spill);
    let mut group = c.benchmark_group("router");
    group.throughput(Throughput::Elements(n as u64));
    group.bench_function("route 10k writes into a 3-master cluster", |b| {
        b.iter(|| {
            let mut buf = BytesMut::from(&bytes[..]);
            let mut builders: Vec<BatchBuilder> = (0..3).map(|_| BatchBuilder::default()).collect();
            let mut routed = 0usize;
            while let Some(cmd) = parse_command(&mut buf).unwrap() {
                let spec = command::lookup(&cmd);
                match split::plan(spec, &cmd) {
                    Plan::Slot(slot) => {
                        let w = router.writer_for_slot(slot);
                        builders[w].push(None, ExpectKind::Ok, |out| {
                            out.extend_from_slice(cmd.wire())
                        });
                        routed += 1;
                    }
                    Plan::Parts(parts) => {
                        for (slot, part) in parts {
                            let w = router.writer_for_slot(slot);
                            builders[w].push(None, ExpectKind::Ok, |out| {
                                out.extend_from_slice(part.wire())
                            });
                            routed += 1;
                        }
                    }
                    _ => unreachable!("only single-slot and split commands here"),
                }
                for b in &mut builders {
                    if b.commands() >= 4096 {
                        std::hint::black_box(b.take(0, None));
                    }
                }
            }
            std::hint::black_box(routed)
        })
    });
    for (name, cluster_source) in [
        ("replay rules: route 10k writes into a 3-master cluster", false),
        (
            "replay rules: route 10k writes of a cluster source (hand-over checks, every slot settled)",
            true,
        ),
    ] {
    group.bench_function(
        name,
        |b| {
            let cfg = ReplayConfig {
                db_filter: DbFilter::new(vec![0], Default::default()),
                ..ReplayConfig::default()
            };
            b.iter(|| {
                let mut replay = Replay::new(cfg.clone(), true);
                if cluster_source {
                    replay.set_settled(Some(engine::slot::SlotSet::of_ranges(&[(0, 16383)])));
                    replay.set_moved_keys(std::sync::Arc::new(
                        shard_worker::source::handover::MovedAway {
                            peers: std::sync::Arc::new(shard_worker::source::handover::Peers::new()),
                            me: 0,
                        },
                    ));
                }
                let mut actions = Vec::new();
                let mut buf = BytesMut::from(&bytes[..]);
                let mut builders: Vec<BatchBuilder> =
                    (0..3).map(|_| BatchBuilder::default()).collect();
                let mut routed = 0usize;
                while let Some(cmd) = parse_command(&mut buf).unwrap() {
                    replay.step(cmd, || 0, &mut actions).unwrap();
                    for action in actions.drain(..) {
                        let Action::Send { to, expect, body } = action else {
                            continue;
                        };
                        let Dest::Slot(slot) = to else {
                            unreachable!("only keyed commands here")
                        };
                        let w = router.writer_for_slot(slot);
                        builders[w].push(None, expect, |out| out.extend_from_slice(body.bytes()));
                        routed += 1;
                    }
                    for b in &mut builders {
                        if b.commands() >= 4096 {
                            std::hint::black_box(b.take(0, None));
                        }
                    }
                }
                std::hint::black_box(routed)
            })
        },
    );
    }
    group.finish();
    let _ = std::fs::remove_dir_all(&spill);
}

criterion_group!(benches, router);
criterion_main!(benches);
