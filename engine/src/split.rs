//! How a command lands on a Redis Cluster target, where every command's
//! keys must share one slot.
//!
//! [`plan`] looks at a command's keys (from the command table) and returns
//! what to do: send it whole to the slot's owner, split it into independent
//! per-slot parts (DEL, MSET, ...), or rewrite it into an equivalent that
//! respects slots (RENAME and list moves across slots, `*STORE` commands
//! whose sources live in other slots). Only a command with no equivalent is
//! [`Plan::Unsupported`].

use bytes::Bytes;
use smallvec::SmallVec;

use crate::command::{self, CommandSpec, KeyFlags, Role, Split};
use crate::resp::Command;
use std::sync::LazyLock;

use crate::slot::{slot, SLOTS};

/// Where and how one command is applied on a cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Plan {
    /// No keys, and every node needs it (FLUSHALL, FUNCTION LOAD, ...).
    Everywhere,
    /// No keys, any one node will do (PUBLISH reaches every node).
    AnyNode,
    /// Every key in this slot: send the command unchanged to its owner.
    Slot(u16),
    /// Independent parts, in order, each to its slot's owner.
    Parts(Vec<(u16, Command)>),
    /// RENAME / RENAMENX across slots: move the value (DUMP, RESTORE with
    /// its TTL, DEL).
    Rename { src: Bytes, dst: Bytes },
    /// COPY across slots (only propagated when it copied): the value and
    /// TTL of `src` restored as `dst`.
    Copy { src: Bytes, dst: Bytes },
    /// LMOVE / RPOPLPUSH across slots: pop from `src`, push the element to
    /// `dst`.
    ListMove {
        src: Bytes,
        dst: Bytes,
        pop_left: bool,
        push_left: bool,
    },
    /// The written keys share `anchor`; the read-only keys at `copy` (argument
    /// positions) live in other slots. Copy them next to the anchor under
    /// temporary names and run the command there with those names.
    Colocate { anchor: u16, copy: Vec<usize> },
    /// No equivalent on a cluster.
    Unsupported(&'static str),
}

/// Plans `cmd` (whose table row is `spec`, if known) for a cluster target.
pub fn plan(spec: Option<&CommandSpec>, cmd: &Command) -> Plan {
    let Some(spec) = spec else {
        // Unknown commands (modules, newer servers) take their key first,
        // as nearly all commands do.
        return match cmd.get(1) {
            Some(key) => Plan::Slot(slot(key)),
            None => Plan::AnyNode,
        };
    };
    match spec.role {
        Role::FlushAll | Role::FlushDb | Role::Function => return Plan::Everywhere,
        Role::Publish => {
            // SPUBLISH is sharded by its channel's slot; PUBLISH is not.
            return if spec.name == "spublish" {
                cmd.get(1).map_or(Plan::AnyNode, |ch| Plan::Slot(slot(ch)))
            } else {
                Plan::AnyNode
            };
        }
        Role::SwapDb | Role::Move => return Plan::Unsupported("a cluster has only database 0"),
        _ => {}
    }
    let positions = command::key_positions(spec, cmd);
    let Some(&first) = positions.first() else {
        return Plan::AnyNode;
    };
    let first_slot = slot(cmd.arg(first));
    if positions.iter().all(|&p| slot(cmd.arg(p)) == first_slot) {
        return Plan::Slot(first_slot);
    }
    if let Some(parts) = split_by(spec, cmd, &positions, slot) {
        return match parts {
            Ok(parts) => Plan::Parts(parts),
            Err(why) => Plan::Unsupported(why),
        };
    }
    match spec.name {
        "rename" | "renamenx" => Plan::Rename {
            src: cmd.arg_bytes(1),
            dst: cmd.arg_bytes(2),
        },
        "copy" => Plan::Copy {
            src: cmd.arg_bytes(1),
            dst: cmd.arg_bytes(2),
        },
        "rpoplpush" | "brpoplpush" => Plan::ListMove {
            src: cmd.arg_bytes(1),
            dst: cmd.arg_bytes(2),
            pop_left: false,
            push_left: true,
        },
        "lmove" | "blmove" if cmd.argc() >= 5 => Plan::ListMove {
            src: cmd.arg_bytes(1),
            dst: cmd.arg_bytes(2),
            pop_left: cmd.arg(3).eq_ignore_ascii_case(b"left"),
            push_left: cmd.arg(4).eq_ignore_ascii_case(b"left"),
        },
        _ => colocate(spec, cmd),
    }
}

/// Splits a command whose keys are independent (DEL, UNLINK, EXISTS,
/// TOUCH, MSET, MSETNX, SMOVE, ...) into parts that each hold the keys of
/// one group (`group` of the key), in order of first appearance. `None`
/// when the command does not split; `Err` when it is malformed.
pub fn split_by<G: PartialEq>(
    spec: &CommandSpec,
    cmd: &Command,
    positions: &[usize],
    group: impl Fn(&[u8]) -> G,
) -> Option<Result<Vec<(G, Command)>, &'static str>> {
    match (spec.split, spec.name) {
        (Split::PerKey, _) => Some(Ok(per_group(cmd, positions, group))),
        // MSETNX is only propagated when it set every key, so it is an
        // MSET by then.
        (Split::PerKeyValue, _) | (_, "msetnx") => {
            Some(per_group_pairs(cmd, positions, b"MSET", group))
        }
        (_, "smove") if cmd.argc() == 4 => {
            let (src, dst) = (group(cmd.arg(1)), group(cmd.arg(2)));
            if src == dst {
                return Some(Ok(vec![(src, cmd.clone())]));
            }
            Some(Ok(vec![
                (src, Command::from_args(&[b"SREM", cmd.arg(1), cmd.arg(3)])),
                (dst, Command::from_args(&[b"SADD", cmd.arg(2), cmd.arg(3)])),
            ]))
        }
        _ => None,
    }
}

/// Splits a command whose arguments after the name are all keys.
fn per_group<G: PartialEq>(
    cmd: &Command,
    positions: &[usize],
    group: impl Fn(&[u8]) -> G,
) -> Vec<(G, Command)> {
    let mut groups: Vec<(G, Vec<&[u8]>)> = Vec::new();
    for &p in positions {
        let g = group(cmd.arg(p));
        match groups.iter_mut().find(|(gg, _)| *gg == g) {
            Some((_, keys)) => keys.push(cmd.arg(p)),
            None => groups.push((g, vec![cmd.arg(p)])),
        }
    }
    groups
        .into_iter()
        .map(|(g, keys)| {
            let mut args = vec![cmd.arg(0)];
            args.extend(keys);
            (g, Command::from_args(&args))
        })
        .collect()
}

/// Splits a `KEY VALUE KEY VALUE ...` command per group, as `name`.
fn per_group_pairs<G: PartialEq>(
    cmd: &Command,
    positions: &[usize],
    name: &[u8],
    group: impl Fn(&[u8]) -> G,
) -> Result<Vec<(G, Command)>, &'static str> {
    let mut groups: Vec<(G, Vec<&[u8]>)> = Vec::new();
    for &p in positions {
        let Some(value) = cmd.get(p + 1) else {
            return Err("a key without its value");
        };
        let g = group(cmd.arg(p));
        let pair = [cmd.arg(p), value];
        match groups.iter_mut().find(|(gg, _)| *gg == g) {
            Some((_, args)) => args.extend(pair),
            None => groups.push((g, pair.to_vec())),
        }
    }
    Ok(groups
        .into_iter()
        .map(|(g, pairs)| {
            let mut args = vec![name];
            args.extend(pairs);
            (g, Command::from_args(&args))
        })
        .collect())
}

/// A command that writes keys in one slot and only reads the others.
fn colocate(spec: &CommandSpec, cmd: &Command) -> Plan {
    // Key positions with the flags of the spec that found them.
    let mut written: SmallVec<[usize; 2]> = SmallVec::new();
    let mut read: SmallVec<[usize; 4]> = SmallVec::new();
    for key_spec in spec.keys {
        let one = CommandSpec {
            keys: std::slice::from_ref(key_spec),
            subcommands: &[],
            ..*spec
        };
        for p in command::key_positions(&one, cmd) {
            if key_spec.flags.contains(KeyFlags::RO) {
                read.push(p);
            } else {
                written.push(p);
            }
        }
    }
    let Some(&w0) = written.first() else {
        return Plan::Unsupported("its keys span slots and it writes none of them");
    };
    let anchor = slot(cmd.arg(w0));
    if written.iter().any(|&p| slot(cmd.arg(p)) != anchor) {
        return Plan::Unsupported("it writes keys in different slots");
    }
    let copy: Vec<usize> = read
        .into_iter()
        .filter(|&p| slot(cmd.arg(p)) != anchor)
        .collect();
    Plan::Colocate { anchor, copy }
}

/// For every slot, a short hash tag (`ss<i>`) that lands in it, found once
/// by trying `i = 0, 1, ...` (about 160,000 CRCs, a few milliseconds).
static SLOT_TAGS: LazyLock<Vec<u32>> = LazyLock::new(|| {
    let mut tags = vec![u32::MAX; SLOTS as usize];
    let mut missing = SLOTS as usize;
    let mut i = 0u32;
    while missing > 0 {
        let s = slot(format!("ss{i}").as_bytes()) as usize;
        if tags[s] == u32::MAX {
            tags[s] = i;
            missing -= 1;
        }
        i += 1;
    }
    tags
});

/// A hash tag (without braces) that lands in `slot`.
pub fn slot_tag(slot: u16) -> String {
    format!("ss{}", SLOT_TAGS[slot as usize])
}

/// The `n`-th temporary key name in slot `anchor` (any key's slot can be
/// matched, whatever characters the key holds). `scope` keeps the names of
/// concurrent users apart (one per shard of a task).
pub fn colocated_name(anchor: u16, scope: &str, n: u64) -> Vec<u8> {
    format!(
        "{{ss{}}}shardsync:tmp:{scope}:{n}",
        SLOT_TAGS[anchor as usize]
    )
    .into_bytes()
}

/// Temporary key names for one user (a shard's intake, a writer): each
/// fresh, in the slot asked for.
#[derive(Clone, Debug)]
pub struct TmpNames {
    scope: String,
    used: u64,
}

impl TmpNames {
    pub fn new(scope: impl Into<String>) -> TmpNames {
        TmpNames {
            scope: scope.into(),
            used: 0,
        }
    }

    /// A name in `slot` that nobody used before.
    pub fn next(&mut self, slot: u16) -> Vec<u8> {
        self.used += 1;
        colocated_name(slot, &self.scope, self.used)
    }
}

/// `cmd` with the arguments at `positions` replaced by `names`.
pub fn with_args_replaced(cmd: &Command, positions: &[usize], names: &[Vec<u8>]) -> Command {
    let args: Vec<&[u8]> = cmd
        .args()
        .enumerate()
        .map(|(i, a)| match positions.iter().position(|&p| p == i) {
            Some(j) => names[j].as_slice(),
            None => a,
        })
        .collect();
    Command::from_args(&args)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn planned(args: &[&str]) -> Plan {
        let cmd = Command::from_args(args);
        plan(command::lookup(&cmd), &cmd)
    }

    fn parts(p: Plan) -> Vec<Vec<String>> {
        match p {
            Plan::Parts(parts) => parts
                .into_iter()
                .map(|(s, c)| {
                    let args: Vec<String> = c
                        .args()
                        .map(|a| String::from_utf8_lossy(a).into_owned())
                        .collect();
                    for a in &args[1..] {
                        if !a.chars().all(|c| c.is_ascii_digit())
                            && !["member"].contains(&a.as_str())
                        {
                            assert_eq!(slot(a.as_bytes()), s, "{a} routed to slot {s}");
                        }
                    }
                    args
                })
                .collect(),
            other => panic!("not split: {other:?}"),
        }
    }

    #[test]
    fn same_slot_commands_go_whole() {
        assert_eq!(
            planned(&["MSET", "{u}a", "1", "{u}b", "2"]),
            Plan::Slot(slot(b"u"))
        );
        assert_eq!(planned(&["SET", "foo", "bar"]), Plan::Slot(slot(b"foo")));
        assert_eq!(planned(&["RENAME", "{x}1", "{x}2"]), Plan::Slot(slot(b"x")));
    }

    #[test]
    fn independent_keys_split_per_slot_in_order() {
        assert_eq!(
            parts(planned(&["DEL", "foo", "bar", "{foo}x"])),
            vec![vec!["DEL", "foo", "{foo}x"], vec!["DEL", "bar"]]
        );
        assert_eq!(
            parts(planned(&["MSET", "foo", "1", "bar", "2", "{foo}z", "3"])),
            vec![
                vec!["MSET", "foo", "1", "{foo}z", "3"],
                vec!["MSET", "bar", "2"]
            ]
        );
        assert_eq!(
            parts(planned(&["MSETNX", "foo", "1", "bar", "2"])),
            vec![vec!["MSET", "foo", "1"], vec!["MSET", "bar", "2"]]
        );
        assert_eq!(
            parts(planned(&["SMOVE", "foo", "bar", "member"])),
            vec![vec!["SREM", "foo", "member"], vec!["SADD", "bar", "member"]]
        );
    }

    #[test]
    fn moves_and_stores_across_slots_are_rewritten() {
        assert!(matches!(
            planned(&["RENAME", "foo", "bar"]),
            Plan::Rename { .. }
        ));
        assert_eq!(
            planned(&["LMOVE", "foo", "bar", "RIGHT", "LEFT"]),
            Plan::ListMove {
                src: Bytes::from_static(b"foo"),
                dst: Bytes::from_static(b"bar"),
                pop_left: false,
                push_left: true
            }
        );
        assert_eq!(
            planned(&["SUNIONSTORE", "dst", "dst2", "{dst}x"]),
            Plan::Colocate {
                anchor: slot(b"dst"),
                copy: vec![2]
            }
        );
        assert_eq!(
            planned(&[
                "ZUNIONSTORE",
                "foo",
                "2",
                "bar",
                "{foo}z",
                "WEIGHTS",
                "1",
                "2"
            ]),
            Plan::Colocate {
                anchor: slot(b"foo"),
                copy: vec![3]
            }
        );
        assert_eq!(
            planned(&["BITOP", "AND", "foo", "bar", "baz"]),
            Plan::Colocate {
                anchor: slot(b"foo"),
                copy: vec![3, 4]
            }
        );
        assert!(matches!(
            planned(&["PFMERGE", "foo", "bar"]),
            Plan::Colocate { .. }
        ));
        assert!(matches!(
            planned(&["COPY", "foo", "bar"]),
            Plan::Copy { .. }
        ));
        assert!(matches!(
            planned(&["SORT", "foo", "STORE", "bar"]),
            Plan::Colocate { copy, .. } if copy == vec![1]
        ));
    }

    #[test]
    fn keyless_and_impossible_commands() {
        assert_eq!(planned(&["FLUSHALL"]), Plan::Everywhere);
        assert_eq!(planned(&["FUNCTION", "LOAD", "code"]), Plan::Everywhere);
        assert_eq!(planned(&["PUBLISH", "ch", "m"]), Plan::AnyNode);
        assert_eq!(planned(&["SPUBLISH", "ch", "m"]), Plan::Slot(slot(b"ch")));
        assert!(matches!(
            planned(&["SWAPDB", "0", "1"]),
            Plan::Unsupported(_)
        ));
        assert!(matches!(
            planned(&["EVAL", "x", "2", "foo", "bar"]),
            Plan::Unsupported(_)
        ));
        assert_eq!(
            planned(&["MODULE.CMD", "key", "x"]),
            Plan::Slot(slot(b"key"))
        );
    }

    #[test]
    fn temporary_names_land_in_any_slot() {
        for s in 0..SLOTS {
            assert_eq!(slot(&colocated_name(s, "a1", 7)), s);
        }
        for key in [&b"plain"[..], b"{tag}x", b"a{b", b"x{}y", b"a}b"] {
            assert_eq!(slot(&colocated_name(slot(key), "x", 0)), slot(key));
        }
    }
}
