//! The precheck's rules on facts written by hand (INFO text as servers
//! print it), without servers.

use std::collections::BTreeMap;
use std::time::Instant;

use engine::filter::DbFilter;
use engine::marker::Marker;
use engine::rebuild::TargetCaps;
use shard_worker::Endpoint;

use super::checks;
use super::{CheckpointFact, Checks, Level, SourceMaster, TargetMaster};
use crate::checkpoint::{Checkpoint, CheckpointState};
use crate::config::OnConflict;
use crate::server::{parse_info, BufferLimit, ServerInfo};

const MB: u64 = 1024 * 1024;

fn info(addr: &str, lines: &[&str]) -> ServerInfo {
    let mut text = String::from("redis_version:7.0.15\r\nrun_id:");
    text += addr;
    text += "\r\n";
    for l in lines {
        text += l;
        text += "\r\n";
    }
    parse_info(addr, &text)
}

fn ep(addr: &str) -> Endpoint {
    let (host, port) = addr.rsplit_once(':').unwrap();
    Endpoint::new(host, port.parse().unwrap())
}

fn source(addr: &str, lines: &[&str], rate: Option<f64>) -> SourceMaster {
    SourceMaster {
        info: info(addr, lines),
        endpoint: ep(addr),
        slot: None,
        slots: Vec::new(),
        epoch: 0,
        read_at: Instant::now(),
        write_rate: rate,
    }
}

fn target(addr: &str, lines: &[&str], slots: Vec<(u16, u16)>) -> TargetMaster {
    TargetMaster {
        info: info(addr, lines),
        endpoint: ep(addr),
        slots,
    }
}

/// The checks made, one line each (`LEVEL name: detail`).
fn lines(checks: &Checks) -> Vec<String> {
    checks.0.iter().map(|c| c.to_string()).collect()
}

fn only(checks: &Checks, level: Level) -> Vec<String> {
    checks
        .0
        .iter()
        .filter(|c| c.level == level)
        .map(|c| c.to_string())
        .collect()
}

// ----------------------------------------------------------------- memory

#[test]
fn a_target_smaller_than_the_data_fails_with_both_figures() {
    let src = [source(
        "s:1",
        &["used_memory:120000000", "used_memory_dataset:104857600"],
        None,
    )];
    let dst = [target(
        "t:1",
        &["used_memory:1048576", "maxmemory:8388608"],
        vec![],
    )];
    let mut c = Checks::default();
    checks::memory(&src, 1.0, &dst, true, &mut c);
    let fails = only(&c, Level::Fail);
    assert_eq!(fails.len(), 1, "{fails:?}");
    assert!(
        fails[0].starts_with("FAIL target memory: t:1 has maxmemory 8.0 MB"),
        "{}",
        fails[0]
    );
    assert!(fails[0].contains("100.0 MB on the source"), "{}", fails[0]);
}

#[test]
fn a_cluster_target_is_judged_node_by_node_by_its_share_of_slots() {
    let src = [source("s:1", &["used_memory_dataset:125829120"], None)]; // 120 MB
    let thirds = |max: u64| {
        vec![
            target("t:1", &[&format!("maxmemory:{max}")], vec![(0, 5460)]),
            target("t:2", &[&format!("maxmemory:{max}")], vec![(5461, 10922)]),
            target("t:3", &[&format!("maxmemory:{max}")], vec![(10923, 16383)]),
        ]
    };
    let mut roomy = Checks::default();
    checks::memory(&src, 1.0, &thirds(50 * MB), true, &mut roomy);
    assert!(!roomy.failed(), "{:?}", lines(&roomy));
    let mut tight = Checks::default();
    checks::memory(&src, 1.0, &thirds(30 * MB), true, &mut tight);
    assert_eq!(only(&tight, Level::Fail).len(), 3);
}

#[test]
fn only_the_copied_share_counts_and_no_limit_means_no_check() {
    let seed = info(
        "s:1",
        &[
            "db0:keys=10,expires=0,avg_ttl=0",
            "db1:keys=90,expires=0,avg_ttl=0",
        ],
    );
    let share = checks::copied_share(&seed, &DbFilter::new(vec![0], BTreeMap::new()));
    assert!((share - 0.1).abs() < 1e-9);
    let src = [source("s:1", &["used_memory_dataset:104857600"], None)];
    let mut c = Checks::default();
    checks::memory(
        &src,
        share,
        &[target("t:1", &["maxmemory:15728640"], vec![])],
        true,
        &mut c,
    );
    assert!(!c.failed(), "10 MB into 15 MB: {:?}", lines(&c));
    let mut unlimited = Checks::default();
    checks::memory(
        &src,
        1.0,
        &[target("t:1", &["maxmemory:0"], vec![])],
        true,
        &mut unlimited,
    );
    assert!(unlimited.0.is_empty());
}

#[test]
fn a_target_that_may_hold_the_keys_already_counts_them_once() {
    let src = [source("s:1", &["used_memory_dataset:62914560"], None)]; // 60 MB
    let dst = [target(
        "t:1",
        &[
            "used_memory:65011712",
            "used_memory_dataset:62914560",
            "maxmemory:67108864",
        ],
        vec![],
    )];
    let mut again = Checks::default();
    checks::memory(&src, 1.0, &dst, false, &mut again);
    assert!(!again.failed(), "{:?}", lines(&again));
    let mut fresh = Checks::default();
    checks::memory(&src, 1.0, &dst, true, &mut fresh);
    assert!(fresh.failed());
}

// ------------------------------------------------------ source settings

#[test]
fn a_short_repl_timeout_on_a_big_dataset_warns_with_the_config_set() {
    let mut m = source("s:1", &["used_memory:2147483648"], None);
    m.info.repl_timeout = Some(60);
    let mut c = Checks::default();
    checks::replication(&m, &mut c);
    let warns = only(&c, Level::Warn);
    assert_eq!(warns.len(), 1, "{warns:?}");
    assert!(
        warns[0].contains("CONFIG SET repl-timeout 600"),
        "{}",
        warns[0]
    );

    m.info.repl_timeout = Some(600);
    let mut ok = Checks::default();
    checks::replication(&m, &mut ok);
    assert!(only(&ok, Level::Warn).is_empty());

    let mut small = source("s:1", &["used_memory:1048576"], None);
    small.info.repl_timeout = Some(60);
    let mut c = Checks::default();
    checks::replication(&small, &mut c);
    assert!(c.0.is_empty(), "a small dataset syncs well within 60 s");
}

#[test]
fn writes_that_outgrow_the_replica_buffer_during_a_full_sync_warn() {
    // 4 GB at 40 MB/s is about 100 s; 10 MB/s of writes make 1 GB.
    let mut m = source("s:1", &["used_memory:4294967296"], Some(10.0 * MB as f64));
    m.info.replica_buffer_limit = Some(BufferLimit {
        class: "slave".into(),
        hard: 256 * MB,
        soft: 64 * MB,
        soft_secs: 60,
    });
    let mut c = Checks::default();
    checks::replication(&m, &mut c);
    let warn = only(&c, Level::Warn)
        .into_iter()
        .find(|w| w.contains("output buffer"))
        .expect("an output buffer warning");
    assert!(
        warn.contains("CONFIG SET client-output-buffer-limit \"slave 2048mb 2048mb 0\""),
        "{warn}"
    );

    m.write_rate = Some(1000.0);
    let mut quiet = Checks::default();
    checks::replication(&m, &mut quiet);
    assert!(
        !lines(&quiet).iter().any(|l| l.contains("output buffer")),
        "{:?}",
        lines(&quiet)
    );
}

#[test]
fn a_backlog_shorter_than_a_minute_of_writes_warns() {
    let short = source("s:1", &["repl_backlog_size:1048576"], Some(MB as f64));
    let mut c = Checks::default();
    checks::replication(&short, &mut c);
    let warns = only(&c, Level::Warn);
    assert_eq!(warns.len(), 1, "{warns:?}");
    assert!(warns[0].contains("covers 1 s"), "{}", warns[0]);
    assert!(
        warns[0].contains("CONFIG SET repl-backlog-size 600mb"),
        "{}",
        warns[0]
    );

    let long = source("s:1", &["repl_backlog_size:1073741824"], Some(MB as f64));
    let mut c = Checks::default();
    checks::replication(&long, &mut c);
    assert_eq!(only(&c, Level::Warn), Vec::<String>::new());
    assert!(lines(&c)[0].contains("away 1024 s"), "{:?}", lines(&c));

    let idle = source("s:1", &["repl_backlog_size:1048576"], Some(0.0));
    let mut c = Checks::default();
    checks::replication(&idle, &mut c);
    assert!(c.0.is_empty(), "no writes, nothing to judge");
}

#[test]
fn old_sources_and_replicas() {
    let mut old = info("s:1", &[]);
    old.version = (2, 6, 17);
    let mut c = Checks::default();
    checks::source(&old, &mut c);
    assert!(only(&c, Level::Fail)[0].contains("PSYNC needs 2.8"));

    let down = info("s:2", &["role:slave", "master_link_status:down"]);
    let mut c = Checks::default();
    checks::source(&down, &mut c);
    assert!(only(&c, Level::Warn)[0].contains("link to its master is down"));
}

// ----------------------------------------------------------------- target

#[test]
fn a_target_with_keys_is_refused_unless_they_are_heartbeats_or_ours() {
    let mut t = info("t:1", &["db0:keys=3,expires=0,avg_ttl=0"]);
    let mut c = Checks::default();
    checks::target(&t, &[0], OnConflict::Precheck, false, &mut c);
    assert!(only(&c, Level::Fail)[0].contains("FAIL target empty: t:1 is not empty (db0: 3 keys)"));

    t.heartbeat_keys.insert(0, 3);
    let mut c = Checks::default();
    checks::target(&t, &[0], OnConflict::Precheck, false, &mut c);
    assert!(!c.failed(), "{:?}", lines(&c));

    let busy = info("t:1", &["db0:keys=3,expires=0,avg_ttl=0"]);
    for (on_conflict, ours) in [(OnConflict::Ignore, false), (OnConflict::Precheck, true)] {
        let mut c = Checks::default();
        checks::target(&busy, &[0], on_conflict, ours, &mut c);
        assert!(!c.failed(), "{on_conflict:?} ours={ours}: {:?}", lines(&c));
    }
}

#[test]
fn replicas_old_targets_eviction_and_missing_databases() {
    let mut t = info("t:1", &["role:slave", "maxmemory_policy:allkeys-lru"]);
    t.version = (4, 0, 14);
    t.databases = Some(4);
    let mut c = Checks::default();
    checks::target(&t, &[0, 5], OnConflict::Ignore, false, &mut c);
    let text = lines(&c).join("\n");
    assert!(
        text.contains("FAIL target role: t:1 is a read-only replica"),
        "{text}"
    );
    assert!(
        text.contains("FAIL target version: t:1 runs Redis"),
        "{text}"
    );
    assert!(text.contains("WARN target eviction"), "{text}");
    assert!(text.contains("database 5 would be written"), "{text}");
}

#[test]
fn the_target_cannot_be_the_source() {
    let s = [source("s:1", &[], None)];
    let t = [target("s:1", &[], vec![])];
    let mut c = Checks::default();
    checks::not_the_source(&s, &t, &mut c);
    assert_eq!(
        only(&c, Level::Fail),
        ["FAIL target: s:1 is the source itself"]
    );
}

// -------------------------------------------------------------- databases

#[test]
fn a_cluster_target_takes_one_database() {
    let several = info(
        "s:1",
        &[
            "db0:keys=1,expires=0,avg_ttl=0",
            "db2:keys=1,expires=0,avg_ttl=0",
        ],
    );
    let mut c = Checks::default();
    checks::cluster_db_filter(&DbFilter::all(), &several, 16, &mut c);
    assert!(only(&c, Level::Fail)[0].contains("databases 0, 2"));

    let mut c = Checks::default();
    let f = DbFilter::new(vec![2], BTreeMap::new());
    checks::cluster_db_filter(&f, &several, 16, &mut c);
    assert!(only(&c, Level::Fail)[0].contains("use --db 2 --db-map 2:0"));

    let one = info("s:1", &["db0:keys=5,expires=0,avg_ttl=0"]);
    let mut c = Checks::default();
    let f = checks::cluster_db_filter(&DbFilter::all(), &one, 16, &mut c);
    assert_eq!(f, DbFilter::new(vec![0], BTreeMap::new()));
    assert!(!c.failed());
}

#[test]
fn selected_databases_must_exist_and_written_ones_are_listed_once() {
    let f = DbFilter::new(vec![1, 20], BTreeMap::from([(20, 1)]));
    let mut c = Checks::default();
    checks::selected_dbs(&f, 16, &mut c);
    assert!(only(&c, Level::Fail)[0].contains("--db 20: the source has 16 databases (0 to 15)"));
    assert_eq!(checks::written_dbs(&f, 32), vec![1]);
}

// --------------------------------------------------------------- versions

#[test]
fn an_older_target_is_planned_and_functions_refused() {
    let mut s = source("s:1", &[], None);
    s.info.function_libraries = Some(2);
    let mut t = info("t:1", &[]);
    t.version = (6, 2, 16);
    t.version_text = "6.2.16".into();
    let mut c = Checks::default();
    checks::versions(false, &[s], &t, TargetCaps::new(6, 2), &mut c);
    let text = lines(&c).join("\n");
    assert!(text.contains("is older than s:1"), "{text}");
    assert!(text.contains("restamped"), "{text}");
    assert!(
        text.contains("FAIL functions: s:1 holds 2 function libraries"),
        "{text}"
    );
}

#[test]
fn hash_field_ttls_into_a_target_without_them_warn() {
    let mut s = source("s:1", &[], None);
    s.info.version = (7, 4, 1);
    let t = info("t:1", &[]);
    let mut c = Checks::default();
    checks::versions(false, &[s], &t, TargetCaps::new(7, 0), &mut c);
    assert!(only(&c, Level::Warn)[0].contains("hash fields with TTLs"));
}

#[test]
fn big_keys_stay_under_the_targets_bulk_limit() {
    let mut t = target("t:1", &[], vec![]);
    t.info.proto_max_bulk_len = Some(16 * MB);
    let mut c = Checks::default();
    assert_eq!(
        checks::big_keys(64 * MB as usize, &[t.clone()], &mut c),
        15 * MB as usize
    );
    assert_eq!(only(&c, Level::Warn).len(), 1);
    let mut c = Checks::default();
    assert_eq!(
        checks::big_keys(8 * MB as usize, &[t], &mut c),
        8 * MB as usize
    );
    assert!(c.0.is_empty());
}

// ------------------------------------------------------------ checkpoints

fn ckpt(targets: &[&str], state: CheckpointState) -> CheckpointFact {
    CheckpointFact::Found(Checkpoint {
        format: crate::checkpoint::FORMAT,
        source: "s:1".into(),
        targets: targets.iter().map(|t| t.to_string()).collect(),
        state,
        written_at_ms: 0,
    })
}

#[test]
fn a_checkpoint_for_these_targets_resumes_and_one_for_others_is_ignored() {
    let resumable = CheckpointState::Resumable {
        replid: "r".into(),
        offset: 77,
        db: 2,
    };
    let targets = vec!["t:2".to_string(), "t:1".to_string()];
    let mut c = Checks::default();
    let (ours, resume) = checks::checkpoint(
        "s:1",
        &ckpt(&["t:1", "t:2"], resumable.clone()),
        &targets,
        &mut c,
    );
    assert!(ours);
    assert_eq!(resume.map(|p| (p.offset, p.db)), Some((77, 2)));
    assert!(lines(&c)[0].contains("resuming s:1 from offset 77"));

    let mut c = Checks::default();
    let (ours, resume) = checks::checkpoint("s:1", &ckpt(&["x:1"], resumable), &targets, &mut c);
    assert!(!ours && resume.is_none());
    assert!(only(&c, Level::Warn)[0].contains("ignoring it"));

    let mut c = Checks::default();
    let unfinished = ckpt(&["t:1", "t:2"], CheckpointState::FullSyncInProgress);
    let (ours, resume) = checks::checkpoint("s:1", &unfinished, &targets, &mut c);
    assert!(
        ours && resume.is_none(),
        "our data is there: a full sync replaces it"
    );

    let mut c = Checks::default();
    let bad = CheckpointFact::Unreadable("checkpoint /d/s: bad".into());
    checks::checkpoint("s:1", &bad, &targets, &mut c);
    assert!(c.failed());
}

fn applied(epoch: u64, replid: &str, offset: u64) -> Marker {
    Marker::Applied {
        epoch,
        fresh: true,
        replid: replid.into(),
        offset,
        db: 0,
    }
}

fn node(addr: &str, marker: Option<Marker>, slots: Vec<(u16, Marker)>) -> checks::NodeMarkers {
    checks::NodeMarkers {
        addr: addr.into(),
        node: marker,
        slots,
    }
}

#[test]
fn a_cluster_target_resumes_where_its_furthest_behind_node_is() {
    let nodes = [
        node(
            "a:1",
            Some(applied(2, "r", 500)),
            vec![
                (7, applied(2, "r", 650)),
                (8, applied(2, "r", 400)),
                (9, applied(1, "r", 900)),
            ],
        ),
        node(
            "b:1",
            Some(applied(2, "r", 300)),
            vec![(9000, applied(2, "r", 350))],
        ),
    ];
    let (marker, skip) = checks::cluster_markers(&nodes);
    assert_eq!(
        marker,
        Some(applied(2, "r", 300)),
        "the node furthest behind"
    );
    let skip = skip.unwrap();
    assert_eq!(skip.replid, "r");
    assert_eq!(skip.nodes["a:1"], 500);
    assert_eq!(skip.nodes["b:1"], 300);
    assert_eq!(skip.slots[7], 650, "a slot ahead of its node");
    assert_eq!(
        skip.slots[8], 0,
        "behind its node: the node's marker says more"
    );
    assert_eq!(
        skip.slots[9], 0,
        "an older sync's marker counts for nothing"
    );
    assert_eq!(skip.slots[9000], 350);
}

#[test]
fn a_cluster_target_starts_over_unless_every_node_names_the_same_sync() {
    let full = Marker::Full {
        epoch: 3,
        fresh: true,
    };
    let start_over = (Some(full.clone()), None);
    let loading = [
        node("a:1", Some(applied(3, "r", 10)), vec![]),
        node("b:1", Some(full.clone()), vec![]),
    ];
    assert_eq!(
        checks::cluster_markers(&loading),
        start_over,
        "one node still loading"
    );
    let missing = [
        node("a:1", Some(applied(3, "r", 10)), vec![]),
        node("b:1", None, vec![]),
    ];
    assert_eq!(
        checks::cluster_markers(&missing),
        start_over,
        "one node without a marker"
    );
    let histories = [
        node("a:1", Some(applied(3, "r", 10)), vec![]),
        node("b:1", Some(applied(3, "q", 10)), vec![]),
    ];
    assert_eq!(
        checks::cluster_markers(&histories),
        start_over,
        "two histories"
    );
    let older = [
        node("a:1", Some(applied(3, "r", 10)), vec![]),
        node("b:1", Some(applied(2, "r", 10)), vec![]),
    ];
    assert_eq!(checks::cluster_markers(&older), start_over, "an older sync");
    assert_eq!(
        checks::cluster_markers(&[node("a:1", None, vec![])]),
        (None, None)
    );
}

#[test]
fn a_promoted_source_adopts_the_marker_of_the_history_it_continues() {
    let applied = |replid: &str, offset| Marker::Applied {
        epoch: 1,
        fresh: true,
        replid: replid.into(),
        offset,
        db: 0,
    };
    let found = [
        applied("old", 900),
        applied("old", 1200),
        applied("other", 500),
        Marker::Full {
            epoch: 2,
            fresh: true,
        },
    ];
    assert_eq!(
        checks::adopted_marker(&[("old", 1000)], &found),
        Some(applied("old", 900)),
        "the newest the new master can continue from (it has the history up to 1000)"
    );
    assert_eq!(
        checks::adopted_marker(&[("old", 2000)], &found),
        Some(applied("old", 1200))
    );
    assert_eq!(checks::adopted_marker(&[("unrelated", 2000)], &found), None);
    // A marker of the master's own history (a run that followed the
    // failover wrote it): taken as well.
    // (Its offsets go on from where the old history ended.)
    let mut found = found.to_vec();
    found.push(applied("new", 1300));
    assert_eq!(
        checks::adopted_marker(&[("old", 1000), ("new", 1500)], &found),
        Some(applied("new", 1300))
    );
    assert_eq!(
        checks::adopted_marker(&[("old", 1000), ("new", 1250)], &found),
        Some(applied("old", 900)),
        "not beyond where the master is"
    );
}

#[test]
fn a_master_whose_slots_changed_hands_is_copied_again_in_its_epoch() {
    let mut c = Checks::default();
    let marker = applied(4, "r", 900);
    let start = checks::copy_again(
        "a:1",
        Some(&marker),
        engine::ownership::Again::Moving,
        &mut c,
    );
    assert_eq!(
        start,
        checks::Start {
            ours: true,
            resume: None,
            epoch: 4,
            fresh: true
        }
    );
    assert_eq!(c.0.len(), 1);
    assert_eq!(c.0[0].level, Level::Warn);
    assert!(
        c.0[0]
            .to_string()
            .contains("a:1 starts with a full sync instead of resuming"),
        "{}",
        c.0[0]
    );
}
