//! A cluster source resharded during the sync (issue 13, part 1): keys
//! move between masters with MIGRATE while clients write, and every key's
//! history stays in order across the two shards' streams.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use harness::cluster::{Cluster, ClusterClient};
use harness::compare::assert_same_nodes;
use harness::data::load_all_types_into;
use harness::{wait_for, RedisServer, Shardsync, SHORT};

const BIN: &str = env!("CARGO_BIN_EXE_shardsync");
const LONG: Duration = Duration::from_secs(120);

/// A command that may meet a slot being migrated: MOVED, ASK and TRYAGAIN
/// are followed.
fn run(c: &mut ClusterClient, key: &[u8], args: &[&[u8]]) {
    c.run_on(key, args);
}

/// A transaction on one hash tag, sent to the node that serves it; during a
/// migration it may be refused (ASK, TRYAGAIN, EXECABORT): then it did not
/// run on the source either.
fn transaction(c: &mut ClusterClient, tag: &str, i: u64) {
    let k = |s: &str| format!("{tag}{s}");
    let result: redis::RedisResult<()> = redis::pipe()
        .atomic()
        .cmd("INCR")
        .arg(k("t"))
        .ignore()
        .cmd("RPUSH")
        .arg(k("tl"))
        .arg(i)
        .ignore()
        .cmd("SET")
        .arg(k("tx"))
        .arg(i)
        .arg("EX")
        .arg(300)
        .ignore()
        .query(c.node_for(tag.as_bytes()));
    if result.is_err() {
        c.refresh();
    }
}

/// [`reshard_load`] running, counted in rounds.
struct LiveWrites {
    stop: Arc<AtomicBool>,
    rounds: Arc<AtomicU64>,
    thread: JoinHandle<()>,
}

impl LiveWrites {
    /// Starts the writes and waits for their first 200 rounds.
    fn start(source: &Cluster) -> LiveWrites {
        let stop = Arc::new(AtomicBool::new(false));
        let rounds = Arc::new(AtomicU64::new(0));
        let thread = reshard_load(source, stop.clone(), rounds.clone());
        let load = LiveWrites {
            stop,
            rounds,
            thread,
        };
        wait_for("writes", SHORT, || load.rounds() > 200);
        load
    }

    fn rounds(&self) -> u64 {
        self.rounds.load(Ordering::Relaxed)
    }

    /// Waits for 200 more rounds (`what`), stops the writes, and says how
    /// many rounds ran in all.
    fn stop_after_more(self, what: &str) -> u64 {
        let before = self.rounds();
        wait_for(what, SHORT, || self.rounds() > before + 200);
        self.stop.store(true, Ordering::Relaxed);
        let rounds = self.rounds.clone();
        self.thread.join().unwrap();
        rounds.load(Ordering::Relaxed)
    }
}

/// Writes of every type (with TTLs, deletes, MULTI/EXEC, multi-key
/// commands in one slot) over 2,000 hash tags until stopped.
fn reshard_load(source: &Cluster, stop: Arc<AtomicBool>, rounds: Arc<AtomicU64>) -> JoinHandle<()> {
    let mut c = source.client();
    std::thread::spawn(move || {
        let mut i = 0u64;
        while !stop.load(Ordering::Relaxed) {
            let tag = format!("{{r{}}}", (i * 7919) % 2000);
            let k = |s: &str| format!("{tag}{s}").into_bytes();
            let n = i.to_string();
            let n = n.as_bytes();
            run(&mut c, &k("s"), &[b"SET", &k("s"), n]);
            run(&mut c, &k("e"), &[b"SET", &k("e"), n, b"EX", b"600"]);
            run(&mut c, &k("c"), &[b"INCR", &k("c")]);
            run(&mut c, &k("l"), &[b"RPUSH", &k("l"), n]);
            run(&mut c, &k("l"), &[b"LTRIM", &k("l"), b"-15", b"-1"]);
            run(&mut c, &k("h"), &[b"HINCRBY", &k("h"), b"f", b"3"]);
            run(&mut c, &k("z"), &[b"ZINCRBY", &k("z"), b"1", n]);
            run(
                &mut c,
                &k("x"),
                &[b"XADD", &k("x"), b"MAXLEN", b"10", b"*", b"f", n],
            );
            run(&mut c, &k("m"), &[b"MSET", &k("m"), n, &k("m2"), n]);
            if i.is_multiple_of(3) {
                run(&mut c, &k("s"), &[b"DEL", &k("s"), &k("m2")]);
                run(&mut c, &k("g"), &[b"SADD", &k("g"), n]);
            }
            if i.is_multiple_of(4) {
                transaction(&mut c, &tag, i);
            }
            i += 1;
            rounds.store(i, Ordering::Relaxed);
        }
    })
}

/// The values of metric `name` over every shard.
fn metric_values(sync: &Shardsync, name: &str) -> Vec<u64> {
    let text = sync.metrics().unwrap_or_default();
    text.lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|v| v as u64)
        .collect()
}

fn metric(sync: &Shardsync, name: &str) -> u64 {
    metric_values(sync, name).iter().sum()
}

fn metric_max(sync: &Shardsync, name: &str) -> u64 {
    metric_values(sync, name).into_iter().max().unwrap_or(0)
}

/// Waits until the task's record of the source's slot owners on the target
/// (`engine::ownership`) names no master as moving: the first full syncs
/// are applied and settled, so a restart would resume every master whose
/// slots did not move since.
fn wait_record_settled(target: &[&RedisServer]) {
    wait_for("the record of slot owners to settle", LONG, || {
        target.iter().any(|n| {
            n.internal_keys(0).iter().any(|k| {
                let k = String::from_utf8_lossy(k).into_owned();
                k.contains("shardsync:ownership:") && {
                    let v: String = n.cmd(&["GET", &k]);
                    v.contains("master ") && !v.contains("moving ")
                }
            })
        })
    });
}

#[test]
fn a_source_resharded_there_and_back_under_live_writes_ends_identical() {
    let source = Cluster::start(3);
    load_all_types_into(&mut source.client());
    harness::data::load_strings_into(&mut source.client(), 20_000, "k:");
    let target = Cluster::start(3);
    let sync = Shardsync::sync(
        BIN,
        &["--source", &source.url(0), "--target", &target.url(0)],
    );
    sync.wait_state("incremental", LONG);
    let load = LiveWrites::start(&source);

    let keys_before: Vec<u64> = source.masters().iter().map(|m| m.dbsize(0)).collect();
    source.reshard(0, 1, 1000);
    source.reshard(1, 0, 1000);
    let rounds = load.stop_after_more("writes after the resharding");
    sync.wait_all_caught_up(&source.masters(), LONG);
    assert_same_nodes(&source.masters(), &target.masters());

    let log = sync.log();
    assert!(!log.contains("refused a replayed command"), "{log}");
    let handovers = metric(&sync, "shardsync_source_handovers_total");
    let longest = metric_max(&sync, "shardsync_source_handover_wait_max_ms");
    assert!(handovers > 0, "the migrations were handed over\n{log}");
    eprintln!(
        "keys per master before: {keys_before:?}; hand-overs: {handovers}; longest wait: {longest} ms; \
         rounds of writes: {}; cycles: {}",
        rounds,
        metric(&sync, "shardsync_source_handover_cycles_total")
    );
}

#[test]
fn a_masters_slots_spread_over_two_masters_added_mid_sync_end_identical() {
    let mut source = Cluster::start(3);
    load_all_types_into(&mut source.client());
    harness::data::load_strings_into(&mut source.client(), 20_000, "k:");
    let target = Cluster::start(3);
    let sync = Shardsync::sync(
        BIN,
        &["--source", &source.url(0), "--target", &target.url(0)],
    );
    sync.wait_state("incremental", LONG);
    let load = LiveWrites::start(&source);

    // Two empty masters join; master 0's slots are spread over them.
    source.add_master(Cluster::node(RedisServer::config()));
    source.add_master(Cluster::node(RedisServer::config()));
    let half = source.nodes[0].dbsize(0);
    source.reshard(0, 3, 2731);
    source.reshard(0, 4, 2730);
    // Emptied, master 0 follows the master that took its last slot.
    wait_for("master 0 to follow another master", SHORT, || {
        source.nodes[0].info_field("role").as_deref() == Some("slave")
    });
    assert!(harness::cluster::own_slots(&source.nodes[0]).is_empty());
    load.stop_after_more("writes after the resharding");
    wait_for("five shards in /status", SHORT, || {
        sync.status()
            .and_then(|s| s["shards"].as_array().map(|a| a.len()))
            == Some(5)
    });
    sync.wait_all_caught_up(&source.masters(), LONG);
    assert_same_nodes(&source.masters(), &target.masters());
    let log = sync.log();
    assert_eq!(
        log.matches("a master joined the source cluster: starting a shard for it")
            .count(),
        2,
        "{log}"
    );
    assert!(log.contains("its shard is done"), "{log}");
    eprintln!(
        "keys moved off master 0: {half}; hand-overs: {}; longest wait: {} ms",
        metric(&sync, "shardsync_source_handovers_total"),
        metric_max(&sync, "shardsync_source_handover_wait_max_ms")
    );
}

/// How `migrate_slot` moves keys.
#[derive(Clone, Copy)]
enum Form {
    /// Several keys per MIGRATE, with REPLACE.
    KeysReplace,
    /// One MIGRATE ... COPY per key, then a clean-up DEL on the exporter.
    CopyThenDel,
    /// Half the keys, a pause (slot left MIGRATING/IMPORTING while clients
    /// write), then the rest.
    Interrupted,
}

fn ok(con: &mut redis::Connection, args: &[&str]) {
    let mut cmd = redis::cmd(args[0]);
    for a in &args[1..] {
        cmd.arg(*a);
    }
    let _: redis::Value = cmd.query(con).unwrap_or_else(|e| panic!("{args:?}: {e}"));
}

/// Moves `slot` from master `from` to master `to` by hand, as an operator
/// (or a tool) does with CLUSTER SETSLOT and MIGRATE; returns the keys moved.
fn migrate_slot(source: &Cluster, slot: u16, from: usize, to: usize, form: Form) -> usize {
    let (src, dst) = (&source.nodes[from], &source.nodes[to]);
    let (mut s, mut d) = (src.client(), dst.client());
    let slot_s = slot.to_string();
    ok(
        &mut d,
        &["CLUSTER", "SETSLOT", &slot_s, "IMPORTING", &source.id(from)],
    );
    ok(
        &mut s,
        &["CLUSTER", "SETSLOT", &slot_s, "MIGRATING", &source.id(to)],
    );
    let port = dst.port.to_string();
    let mut moved = 0;
    let mut round = 0;
    loop {
        let keys: Vec<String> = redis::cmd("CLUSTER")
            .arg("GETKEYSINSLOT")
            .arg(slot)
            .arg(if matches!(form, Form::Interrupted) && round == 0 {
                3
            } else {
                1000
            })
            .query(&mut s)
            .unwrap();
        if keys.is_empty() {
            break;
        }
        moved += keys.len();
        match form {
            Form::KeysReplace | Form::Interrupted => {
                let mut cmd = redis::cmd("MIGRATE");
                cmd.arg("127.0.0.1").arg(&port).arg("").arg(0).arg(5000);
                cmd.arg("REPLACE").arg("KEYS");
                for k in &keys {
                    cmd.arg(k);
                }
                let _: redis::Value = cmd.query(&mut s).unwrap();
            }
            Form::CopyThenDel => {
                for k in &keys {
                    ok(
                        &mut s,
                        &["MIGRATE", "127.0.0.1", &port, k, "0", "5000", "COPY"],
                    );
                }
                // A moment of writes to the exporter's copies (lost when
                // the slot moves), then the operator's clean-up.
                std::thread::sleep(Duration::from_millis(300));
                for k in &keys {
                    // (ASK: a client deleted it meanwhile.)
                    let _: redis::RedisResult<redis::Value> =
                        redis::cmd("DEL").arg(k).query(&mut s);
                }
            }
        }
        if matches!(form, Form::Interrupted) && round == 0 {
            // Left half-done while clients keep writing.
            std::thread::sleep(Duration::from_secs(2));
        }
        round += 1;
    }
    for node in source.masters() {
        ok(
            &mut node.client(),
            &["CLUSTER", "SETSLOT", &slot_s, "NODE", &source.id(to)],
        );
    }
    moved
}

/// Writes to the keys of `tags` (whichever master serves them, following
/// ASK) until stopped.
fn hot_tags(source: &Cluster, tags: Vec<String>, stop: Arc<AtomicBool>) -> JoinHandle<u64> {
    let mut c = source.client();
    std::thread::spawn(move || {
        let mut i = 0u64;
        while !stop.load(Ordering::Relaxed) {
            for tag in &tags {
                let k = |s: &str| format!("{tag}{s}").into_bytes();
                let n = i.to_string();
                let n = n.as_bytes();
                run(&mut c, &k("h1"), &[b"INCR", &k("h1")]);
                run(&mut c, &k("h2"), &[b"APPEND", &k("h2"), b"."]);
                run(&mut c, &k("h3"), &[b"SET", &k("h3"), n, b"PX", b"900000"]);
                if i.is_multiple_of(7) {
                    run(&mut c, &k("h2"), &[b"DEL", &k("h2")]);
                }
                run(&mut c, &k("h4"), &[b"RPUSH", &k("h4"), n]);
            }
            i += 1;
            std::thread::sleep(Duration::from_millis(1));
        }
        i
    })
}

#[test]
fn migrate_with_keys_replace_copy_and_a_pause_halfway_ends_identical() {
    let source = Cluster::start(3);
    let target = Cluster::start(3);
    // Three tags of master 0's slots, with keys before the sync.
    let slots = harness::cluster::own_slots(&source.nodes[0]);
    let tags: Vec<String> = (0..)
        .map(|n| format!("{{m{n}}}"))
        .filter(|t| {
            let s = harness::cluster::key_slot(t.as_bytes());
            slots.iter().any(|&(a, b)| (a..=b).contains(&s))
        })
        .take(3)
        .collect();
    let mut c = source.client();
    for tag in &tags {
        for j in 0..50 {
            let k = format!("{tag}pre{j}");
            c.run_on(k.as_bytes(), &[b"SET", k.as_bytes(), b"v"]);
        }
    }
    let sync = Shardsync::sync(
        BIN,
        &["--source", &source.url(0), "--target", &target.url(0)],
    );
    sync.wait_state("incremental", LONG);
    let stop = Arc::new(AtomicBool::new(false));
    let writer = hot_tags(&source, tags.clone(), stop.clone());
    std::thread::sleep(Duration::from_millis(500));

    let slot = |t: &String| harness::cluster::key_slot(t.as_bytes());
    let a = migrate_slot(&source, slot(&tags[0]), 0, 1, Form::KeysReplace);
    let b = migrate_slot(&source, slot(&tags[1]), 0, 2, Form::CopyThenDel);
    let c = migrate_slot(&source, slot(&tags[2]), 0, 1, Form::Interrupted);
    // And back, with the copy form.
    let d = migrate_slot(&source, slot(&tags[0]), 1, 0, Form::CopyThenDel);
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    let rounds = writer.join().unwrap();
    source.wait_stable();
    sync.wait_all_caught_up(&source.masters(), LONG);
    assert_same_nodes(&source.masters(), &target.masters());
    let log = sync.log();
    assert!(!log.contains("refused a replayed command"), "{log}");
    eprintln!(
        "keys moved: {a} (KEYS REPLACE), {b} (COPY), {c} (paused halfway), {d} (COPY, back); \
         rounds of writes: {rounds}; hand-overs: {}; longest wait: {} ms; commands on copied keys left out: {}",
        metric(&sync, "shardsync_source_handovers_total"),
        metric_max(&sync, "shardsync_source_handover_wait_max_ms"),
        metric(&sync, "shardsync_commands_moved_away_total"),
    );
}

/// shardsync killed (-9) while a reshard moves slots, started again while
/// the reshard goes on: the restart does not know in which order the two
/// masters' streams touched the moved keys, so it copies those masters
/// again once their slots stopped moving; nothing is lost or stale.
#[test]
fn killed_mid_reshard_and_restarted_ends_identical() {
    let source = Cluster::start(3);
    load_all_types_into(&mut source.client());
    harness::data::load_strings_into(&mut source.client(), 20_000, "k:");
    let target = Cluster::start(3);
    let args = ["--source", &source.url(0), "--target", &target.url(0)];
    let mut first = Shardsync::sync(BIN, &args);
    first.wait_state("incremental", LONG);
    let load = LiveWrites::start(&source);

    let slots = |n: &RedisServer| -> u32 {
        harness::cluster::own_slots(n)
            .iter()
            .map(|(a, b)| (*b - *a) as u32 + 1)
            .sum()
    };
    wait_record_settled(&target.masters());
    let served = slots(&source.nodes[1]);
    let reshard = source.reshard_in_background(0, 1, 2000);
    wait_for("a few hundred slots moved", LONG, || {
        slots(&source.nodes[1]) > served + 200
    });
    first.signal(libc::SIGKILL);
    let killed = first.wait_exit(SHORT);
    assert_eq!(killed.code(), None, "killed by the signal");
    let second = Shardsync::sync(BIN, &args);
    reshard.join().expect("the reshard");
    source.wait_stable();
    load.stop_after_more("writes after the resharding");
    second.wait_all_caught_up(&source.masters(), LONG);
    assert_same_nodes(&source.masters(), &target.masters());
    let log = second.log();
    // The two masters whose slots were moving are copied again, once the
    // reshard ended; the third resumes.
    assert_eq!(
        log.matches("starts with a full sync instead of resuming")
            .count(),
        2,
        "{log}"
    );
    assert_eq!(log.matches("partial resync accepted").count(), 1, "{log}");
    eprintln!(
        "waited for the reshard to end before copying again: {}",
        log.contains("the source's slot migrations ended")
    );
}

/// shardsync stopped (SIGTERM, drained), the source resharded meanwhile,
/// then the same command again: the two masters whose slots changed hands
/// are copied again (their markers cannot order the move), the third
/// resumes.
#[test]
fn a_source_resharded_while_stopped_is_copied_again_where_slots_moved() {
    let source = Cluster::start(3);
    load_all_types_into(&mut source.client());
    harness::data::load_strings_into(&mut source.client(), 20_000, "k:");
    let target = Cluster::start(3);
    let args = ["--source", &source.url(0), "--target", &target.url(0)];
    let mut first = Shardsync::sync(BIN, &args);
    first.wait_state("incremental", LONG);
    let load = LiveWrites::start(&source);
    wait_record_settled(&target.masters());
    first.signal(libc::SIGTERM);
    assert_eq!(first.wait_exit(LONG).code(), Some(0));

    source.reshard(0, 1, 500);
    let second = Shardsync::sync(BIN, &args);
    load.stop_after_more("writes after the restart");
    second.wait_all_caught_up(&source.masters(), LONG);
    assert_same_nodes(&source.masters(), &target.masters());
    let log = second.log();
    assert_eq!(
        log.matches("instead of resuming: its slots changed hands while the task was stopped")
            .count(),
        2,
        "{log}"
    );
    assert_eq!(log.matches("partial resync accepted").count(), 1, "{log}");
}

/// Valkey 9's atomic slot migration (`CLUSTER MIGRATESLOTS`) puts the
/// migration's own traffic in the masters' streams (the importer's copy of
/// keys the exporter's stream also writes, the exporter's clean-up after
/// the switch), which shardsync cannot follow yet: the task stops with one
/// line naming the master and the command. The same command, run again
/// once the migration ended, copies the two masters again: identical.
#[test]
fn an_atomic_slot_migration_of_valkey_9_stops_the_task_then_a_rerun_copies_again() {
    let config = || RedisServer::config().valkey9();
    let source = Cluster::start_with(3, config());
    harness::data::load_strings_into(&mut source.client(), 20_000, "k:");
    let target = config().start();
    let args = ["--source", &source.url(0), "--target", &target.url()];
    let mut first = Shardsync::sync(BIN, &args);
    first.wait_state("incremental", LONG);
    wait_record_settled(&[&target]);
    let to = source.id(1);
    let _: String = source.nodes[0].cmd(&[
        "CLUSTER",
        "MIGRATESLOTS",
        "SLOTSRANGE",
        "0",
        "999",
        "NODE",
        &to,
    ]);
    let done = first.wait_exit(LONG);
    assert_eq!(done.code(), Some(1), "{}", done.log);
    assert!(
        done.log
            .contains(&format!("{}: CLUSTER SYNCSLOTS", source.nodes[1].addr()))
            && done.log.contains("takes part in an atomic slot migration"),
        "{}",
        done.log
    );
    wait_for("the migration to end", LONG, || {
        harness::cluster::own_slots(&source.nodes[1])
            .iter()
            .any(|&(a, _)| a == 0)
    });
    source.wait_stable();

    let again = Shardsync::sync(BIN, &args);
    again.wait_all_caught_up(&source.masters(), LONG);
    assert_same_nodes(&source.masters(), &[&target]);
    let log = again.log();
    assert_eq!(
        log.matches("starts with a full sync instead of resuming")
            .count(),
        2,
        "{log}"
    );
}
