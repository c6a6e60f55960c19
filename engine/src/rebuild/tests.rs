use super::*;
use crate::rdb::value::{Consumer, ConsumerGroup, PendingEntry, StreamEntry};

const V70: TargetCaps = TargetCaps { major: 7, minor: 0 };
const V62: TargetCaps = TargetCaps { major: 6, minor: 2 };
const V74: TargetCaps = TargetCaps { major: 7, minor: 4 };
const NOW: i64 = 1_000_000;

fn text(cmds: &Commands) -> Vec<String> {
    cmds.to_args()
        .iter()
        .map(|args| {
            args.iter()
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect()
}

fn steps(cmds: &Commands) -> Vec<Step> {
    cmds.iter().map(|(s, _)| s).collect()
}

fn whole(
    value: &Value,
    expire: Option<i64>,
    existing: Existing,
    caps: TargetCaps,
) -> (Vec<String>, Loss) {
    let mut out = Commands::new();
    let loss = Rebuild::whole(
        Key {
            key: b"k",
            expire_ms: expire,
            existing,
            caps,
        },
        value,
        || b"tmp".to_vec(),
        NOW,
        &mut out,
    );
    (text(&out), loss)
}

fn list(n: usize) -> Value {
    Value::List((0..n).map(|i| Bytes::from(i.to_string())).collect())
}

#[test]
fn a_whole_value_is_one_transaction_with_the_ttl_last() {
    let mut out = Commands::new();
    Rebuild::whole(
        Key {
            key: b"k",
            expire_ms: Some(NOW + 5),
            existing: Existing::Replace,
            caps: V70,
        },
        &list(3),
        Vec::new,
        NOW,
        &mut out,
    );
    assert_eq!(
        text(&out),
        [
            "MULTI",
            "DEL k",
            "RPUSH k 0 1 2",
            &format!("PEXPIREAT k {}", NOW + 5),
            "EXEC"
        ]
    );
    assert_eq!(
        steps(&out),
        [
            Step::Begin,
            Step::Queued,
            Step::Queued,
            Step::Queued,
            Step::End
        ]
    );
}

#[test]
fn elements_are_cut_into_bounded_commands() {
    let (cmds, _) = whole(&list(1200), None, Existing::Replace, V70);
    let pushes: Vec<usize> = cmds
        .iter()
        .filter(|c| c.starts_with("RPUSH"))
        .map(|c| c.split(' ').count() - 2)
        .collect();
    assert_eq!(pushes, [512, 512, 176]);
    // Big elements cut by bytes.
    let big = Value::Set(
        (0..5)
            .map(|i| Bytes::from(vec![b'a' + i; 600_000]))
            .collect(),
    );
    let (cmds, _) = whole(&big, None, Existing::Replace, V70);
    assert_eq!(cmds.iter().filter(|c| c.starts_with("SADD")).count(), 3);
}

#[test]
fn strings_use_set_with_pxat_or_a_transaction_on_old_targets() {
    let v = Value::String("hello".into());
    assert_eq!(whole(&v, None, Existing::Replace, V62).0, ["SET k hello"]);
    assert_eq!(
        whole(&v, Some(NOW + 9), Existing::Replace, V62).0,
        [format!("SET k hello PXAT {}", NOW + 9)]
    );
    assert_eq!(
        whole(&v, Some(NOW + 9), Existing::Keep, V70).0,
        [format!("SET k hello NX PXAT {}", NOW + 9)]
    );
    let old = TargetCaps::new(6, 0);
    assert_eq!(
        whole(&v, Some(NOW + 9), Existing::Replace, old).0,
        [
            "MULTI",
            "DEL k",
            "SET k hello",
            &format!("PEXPIREAT k {}", NOW + 9),
            "EXEC"
        ]
    );
}

#[test]
fn keeping_existing_keys_builds_aside_and_renames_if_absent() {
    let (cmds, _) = whole(&list(2), Some(NOW + 1), Existing::Keep, V70);
    assert_eq!(
        cmds,
        [
            "MULTI",
            "DEL tmp",
            "RPUSH tmp 0 1",
            &format!("PEXPIREAT tmp {}", NOW + 1),
            "RENAMENX tmp k",
            "DEL tmp",
            "EXEC"
        ]
    );
}

#[test]
fn expired_and_empty_values_delete_the_key_or_do_nothing() {
    assert_eq!(
        whole(&list(2), Some(NOW), Existing::Replace, V70).0,
        ["DEL k"]
    );
    assert!(whole(&list(2), Some(NOW - 1), Existing::Keep, V70)
        .0
        .is_empty());
    assert_eq!(whole(&list(0), None, Existing::Replace, V70).0, ["DEL k"]);
    // Every field expired: an empty hash.
    let h = Value::Hash(vec![HashField {
        field: "f".into(),
        value: "v".into(),
        expire_ms: Some(NOW - 5),
    }]);
    assert_eq!(whole(&h, None, Existing::Replace, V74).0, ["DEL k"]);
}

#[test]
fn hash_field_ttls_need_a_74_target() {
    let h = Value::Hash(vec![
        HashField {
            field: "a".into(),
            value: "1".into(),
            expire_ms: Some(NOW + 10),
        },
        HashField {
            field: "b".into(),
            value: "2".into(),
            expire_ms: None,
        },
        HashField {
            field: "c".into(),
            value: "3".into(),
            expire_ms: Some(NOW + 10),
        },
        HashField {
            field: "d".into(),
            value: "4".into(),
            expire_ms: Some(NOW - 10),
        },
        HashField {
            field: "e".into(),
            value: "5".into(),
            expire_ms: Some(NOW + 20),
        },
    ]);
    let (cmds, loss) = whole(&h, None, Existing::Replace, V74);
    assert_eq!(
        cmds,
        [
            "MULTI",
            "DEL k",
            "HSET k a 1 b 2 c 3 e 5",
            &format!("HPEXPIREAT k {} FIELDS 2 a c", NOW + 10),
            &format!("HPEXPIREAT k {} FIELDS 1 e", NOW + 20),
            "EXEC"
        ]
    );
    assert_eq!(loss, Loss::default());
    let (cmds, loss) = whole(&h, None, Existing::Replace, V70);
    assert!(!cmds.iter().any(|c| c.starts_with("HPEXPIREAT")));
    assert_eq!(loss.field_ttls, 3);
}

fn sid(ms: u64, seq: u64) -> StreamId {
    StreamId { ms, seq }
}

fn stream() -> Stream {
    Stream {
        entries: vec![
            StreamEntry {
                id: sid(1, 0),
                fields: vec![("a".into(), "1".into())],
            },
            StreamEntry {
                id: sid(3, 1),
                fields: vec![("b".into(), "2".into()), ("c".into(), "3".into())],
            },
        ],
        length: 2,
        last_id: sid(5, 0),
        first_id: Some(sid(1, 0)),
        max_deleted_id: Some(sid(5, 0)),
        entries_added: Some(4),
        groups: vec![ConsumerGroup {
            name: "g".into(),
            last_id: sid(3, 1),
            entries_read: Some(3),
            pending: vec![PendingEntry {
                id: sid(3, 1),
                delivery_time_ms: 777,
                delivery_count: 2,
                consumer: Some("alice".into()),
            }],
            consumers: vec![
                Consumer {
                    name: "alice".into(),
                    seen_time_ms: 1,
                    active_time_ms: None,
                    pending: vec![sid(3, 1)],
                },
                Consumer {
                    name: "bob".into(),
                    seen_time_ms: 1,
                    active_time_ms: None,
                    pending: vec![],
                },
            ],
        }],
    }
}

#[test]
fn streams_carry_ids_counters_groups_consumers_and_pending_entries() {
    let (cmds, _) = whole(
        &Value::Stream(Box::new(stream())),
        None,
        Existing::Replace,
        V70,
    );
    assert_eq!(
        cmds,
        [
            "MULTI",
            "DEL k",
            "XADD k 1-0 a 1",
            "XADD k 3-1 b 2 c 3",
            "XSETID k 5-0 ENTRIESADDED 4 MAXDELETEDID 5-0",
            "XGROUP CREATE k g 3-1 ENTRIESREAD 3",
            "XGROUP CREATECONSUMER k g alice",
            "XGROUP CREATECONSUMER k g bob",
            "XCLAIM k g alice 0 3-1 TIME 777 RETRYCOUNT 2 FORCE JUSTID",
            "EXEC"
        ]
    );
    // 6.2 has no counters.
    let (cmds, _) = whole(
        &Value::Stream(Box::new(stream())),
        None,
        Existing::Replace,
        V62,
    );
    assert!(cmds.contains(&"XSETID k 5-0".to_string()), "{cmds:?}");
    assert!(
        cmds.contains(&"XGROUP CREATE k g 3-1".to_string()),
        "{cmds:?}"
    );
}

#[test]
fn an_empty_stream_is_created_by_a_trimmed_entry() {
    let mut s = stream();
    s.entries.clear();
    s.length = 0;
    s.groups.clear();
    let (cmds, _) = whole(&Value::Stream(Box::new(s)), None, Existing::Replace, V70);
    assert_eq!(
        cmds,
        [
            "MULTI",
            "DEL k",
            "XADD k MAXLEN 0 5-0 x y",
            "XSETID k 5-0 ENTRIESADDED 4 MAXDELETEDID 5-0",
            "EXEC"
        ]
    );
}

#[test]
fn parts_build_aside_with_a_safety_ttl_and_rename_at_the_end() {
    let mut out = Commands::new();
    let mut r = Rebuild::begin(
        Key {
            key: b"k",
            expire_ms: None,
            existing: Existing::Replace,
            caps: V70,
        },
        b"tmp".to_vec(),
        &mut out,
    );
    r.part(&Value::Set(vec!["a".into(), "b".into()]), NOW, &mut out);
    r.part(&Value::Set(vec!["c".into()]), NOW, &mut out);
    r.finish(&Value::Set(vec![]), NOW, &mut out);
    assert_eq!(
        text(&out),
        [
            "DEL tmp",
            "SADD tmp a b",
            "PEXPIRE tmp 86400000",
            "SADD tmp c",
            "MULTI",
            "RENAME tmp k",
            "PERSIST k",
            "EXEC"
        ]
    );
    // Strings go piece by piece at their offset; the TTL goes on at the
    // rename (RENAMENX under Keep).
    let mut out = Commands::new();
    let mut r = Rebuild::begin(
        Key {
            key: b"k",
            expire_ms: Some(NOW + 3),
            existing: Existing::Keep,
            caps: V70,
        },
        b"tmp".to_vec(),
        &mut out,
    );
    r.part(&Value::String("ab".into()), NOW, &mut out);
    r.part(&Value::String("cd".into()), NOW, &mut out);
    r.finish(&Value::String("".into()), NOW, &mut out);
    let cmds = text(&out);
    assert_eq!(
        &cmds[1..4],
        [
            "SETRANGE tmp 0 ab",
            "PEXPIRE tmp 86400000",
            "SETRANGE tmp 2 cd"
        ]
    );
    assert!(cmds.contains(&format!("PEXPIREAT tmp {}", NOW + 3)));
    assert!(cmds.contains(&"RENAMENX tmp k".to_string()));
}

#[test]
fn list_parts_push_only_onto_the_length_they_expect() {
    let mut out = Commands::new();
    let mut r = Rebuild::begin(
        Key {
            key: b"k",
            expire_ms: None,
            existing: Existing::Replace,
            caps: V70,
        },
        b"tmp".to_vec(),
        &mut out,
    );
    r.part(&list(600), NOW, &mut out);
    r.part(&list(2), NOW, &mut out);
    let evals: Vec<Vec<Vec<u8>>> = out
        .to_args()
        .into_iter()
        .filter(|a| a[0] == b"EVAL")
        .collect();
    let shape: Vec<(String, usize)> = evals
        .iter()
        .map(|a| {
            assert_eq!(a[1], GUARDED_RPUSH.as_bytes());
            assert_eq!((&a[2][..], &a[3][..]), (&b"1"[..], &b"tmp"[..]));
            (String::from_utf8(a[4].clone()).unwrap(), a.len() - 5)
        })
        .collect();
    assert_eq!(
        shape,
        [
            ("0".to_string(), 512),
            ("512".to_string(), 88),
            ("600".to_string(), 2)
        ]
    );
}

#[test]
fn scores_print_back_to_the_same_double() {
    for s in [
        0.1,
        1.0,
        -3.25,
        1e15,
        1e300,
        5e-324,
        -0.0,
        1.0 / 3.0,
        f64::MAX,
        f64::MIN_POSITIVE,
    ] {
        assert_eq!(
            format_score(s).parse::<f64>().unwrap().to_bits(),
            s.to_bits(),
            "{s}"
        );
    }
    assert_eq!(format_score(f64::INFINITY), "inf");
    assert_eq!(format_score(f64::NEG_INFINITY), "-inf");
}

#[test]
fn pending_entries_of_deleted_messages_are_put_back() {
    // 1-0 was trimmed away and 3-1 deleted after delivery; both stay pending.
    let mut s = stream();
    s.entries = vec![
        StreamEntry {
            id: sid(2, 0),
            fields: vec![("a".into(), "1".into())],
        },
        StreamEntry {
            id: sid(4, 0),
            fields: vec![("b".into(), "2".into())],
        },
    ];
    s.groups[0].pending = vec![
        PendingEntry {
            id: sid(1, 0),
            delivery_time_ms: 5,
            delivery_count: 1,
            consumer: Some("bob".into()),
        },
        PendingEntry {
            id: sid(3, 1),
            delivery_time_ms: 6,
            delivery_count: 3,
            consumer: Some("alice".into()),
        },
        PendingEntry {
            id: sid(4, 0),
            delivery_time_ms: 7,
            delivery_count: 1,
            consumer: Some("alice".into()),
        },
    ];
    let (cmds, _) = whole(&Value::Stream(Box::new(s)), None, Existing::Replace, V70);
    assert_eq!(
        cmds,
        [
            "MULTI",
            "DEL k",
            "XGROUP CREATE k g 0-0 MKSTREAM",
            "XADD k 1-0 deleted ",
            "XCLAIM k g bob 0 1-0 TIME 5 RETRYCOUNT 1 FORCE JUSTID",
            "XTRIM k MINID 2-0",
            "XADD k 2-0 a 1",
            "XADD k 3-1 deleted ",
            "XCLAIM k g alice 0 3-1 TIME 6 RETRYCOUNT 3 FORCE JUSTID",
            "XDEL k 3-1",
            "XADD k 4-0 b 2",
            "XSETID k 5-0 ENTRIESADDED 4 MAXDELETEDID 5-0",
            "XGROUP SETID k g 3-1 ENTRIESREAD 3",
            "XGROUP CREATECONSUMER k g alice",
            "XGROUP CREATECONSUMER k g bob",
            "XCLAIM k g alice 0 4-0 TIME 7 RETRYCOUNT 1 FORCE JUSTID",
            "EXEC"
        ]
    );
}

#[test]
fn every_command_of_a_value_in_parts_is_safe_to_resend() {
    for value in [list(700), Value::String("x".repeat(10).into())] {
        let mut out = Commands::new();
        let mut r = Rebuild::begin(
            Key {
                key: b"k",
                expire_ms: Some(NOW + 9),
                existing: Existing::Replace,
                caps: V70,
            },
            b"{x}shardsync:tmp:1".to_vec(),
            &mut out,
        );
        r.part(&value, NOW, &mut out);
        r.part(&value, NOW, &mut out);
        r.finish(&value, NOW, &mut out);
        for args in out.to_args() {
            let args: Vec<&[u8]> = args.iter().map(|a| &a[..]).collect();
            assert!(
                safe_to_resend(&args),
                "{}",
                String::from_utf8_lossy(&args.join(&b' '))
            );
        }
    }
    // Not so what a client sent, nor a RENAME of a user's key.
    for args in [
        &[&b"RPUSH"[..], b"k", b"v"][..],
        &[b"EVAL", b"return redis.call('INCR', KEYS[1])", b"1", b"k"],
        &[b"RENAME", b"a", b"b"],
        &[b"INCR", b"k"],
        &[],
    ] {
        assert!(!safe_to_resend(args), "{args:?}");
    }
}
