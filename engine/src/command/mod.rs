//! The command table: for every Redis command, which arguments are keys,
//! whether it writes, what it means in a replication stream, and how it
//! splits across cluster slots.
//!
//! `table.rs` is generated from a live server (see
//! `scripts/gen_command_table.py`); this module looks commands up and reads
//! key positions the way Redis's own `getKeysUsingKeySpecs` does. Nothing
//! else in shardsync matches on command names.

mod spec;
mod table;

use std::collections::HashMap;
use std::sync::LazyLock;

use smallvec::SmallVec;

use crate::resp::Command;
pub use spec::*;

/// Longest command name we look up; longer names are unknown.
const MAX_NAME_LEN: usize = 32;

static BY_NAME: LazyLock<HashMap<&'static [u8], &'static CommandSpec>> = LazyLock::new(|| {
    table::COMMANDS
        .iter()
        .map(|spec| (spec.name.as_bytes(), spec))
        .collect()
});

/// Every top-level command in the table.
pub fn all() -> &'static [CommandSpec] {
    table::COMMANDS
}

/// Looks up a top-level command by name, ignoring case.
pub fn lookup_name(name: &[u8]) -> Option<&'static CommandSpec> {
    if name.len() > MAX_NAME_LEN {
        return None;
    }
    let mut lower = [0u8; MAX_NAME_LEN];
    let lower = &mut lower[..name.len()];
    lower.copy_from_slice(name);
    lower.make_ascii_lowercase();
    BY_NAME.get(&*lower).copied()
}

/// Looks up the spec that governs `cmd`: the subcommand's own row for
/// container commands (`XGROUP CREATE`, `FUNCTION LOAD`), else the command's.
pub fn lookup(cmd: &Command) -> Option<&'static CommandSpec> {
    let spec = lookup_name(cmd.name())?;
    if spec.subcommands.is_empty() {
        return Some(spec);
    }
    let sub = cmd.get(1)?;
    spec.subcommands
        .iter()
        .find(|s| s.name.as_bytes().eq_ignore_ascii_case(sub))
}

/// Positions of the key arguments of `cmd`, in the order the key specs give
/// them (for MSET: 1, 3, 5...). A spec that cannot be applied to these
/// arguments (a malformed count, a missing keyword) contributes no keys,
/// as in Redis.
pub fn key_positions(spec: &CommandSpec, cmd: &Command) -> SmallVec<[usize; 4]> {
    let argc = cmd.argc() as i64;
    let mut out = SmallVec::new();
    for key_spec in spec.keys {
        if key_spec.flags.contains(KeyFlags::NOT_KEY) {
            continue;
        }
        let first = match key_spec.begin {
            Begin::Index(i) => i as i64,
            Begin::Keyword {
                keyword,
                start_from,
            } => match find_keyword(cmd, keyword, start_from as i64) {
                Some(pos) => pos + 1,
                None => continue,
            },
            Begin::Unknown => {
                custom_keys(spec, cmd, key_spec, &mut out);
                continue;
            }
        };
        let (first, last, step) = match key_spec.find {
            Find::Range { last, step, limit } => {
                let last = last as i64;
                let end = if last >= 0 {
                    first + last
                } else if limit == 0 {
                    argc + last
                } else {
                    first + ((argc - first) / limit as i64 + last)
                };
                (first, end, step as i64)
            }
            Find::Keynum {
                keynum_idx,
                first_key,
                step,
            } => {
                let idx = first + keynum_idx as i64;
                let Some(numkeys) = cmd
                    .get(idx as usize)
                    .filter(|_| idx >= 0)
                    .and_then(parse_count)
                else {
                    continue;
                };
                let start = first + first_key as i64;
                (start, start + numkeys - 1, step as i64)
            }
            Find::Unknown => continue,
        };
        if step < 1 || first < 1 || last >= argc || last < first {
            continue;
        }
        let mut i = first;
        while i <= last {
            out.push(i as usize);
            i += step;
        }
    }
    out
}

/// Positions of the key arguments of `cmd`, each with whether the command
/// only reads it (its key spec is `RO`).
pub fn key_positions_read_only(spec: &CommandSpec, cmd: &Command) -> SmallVec<[(usize, bool); 4]> {
    let mut out = SmallVec::new();
    for key_spec in spec.keys {
        let one = CommandSpec {
            keys: std::slice::from_ref(key_spec),
            subcommands: &[],
            ..*spec
        };
        let ro = key_spec.flags.contains(KeyFlags::RO);
        out.extend(key_positions(&one, cmd).into_iter().map(|p| (p, ro)));
    }
    out
}

/// The key arguments of `cmd`, borrowed from it.
pub fn keys<'a>(spec: &CommandSpec, cmd: &'a Command) -> SmallVec<[&'a [u8]; 4]> {
    key_positions(spec, cmd)
        .into_iter()
        .map(|i| cmd.arg(i))
        .collect()
}

fn find_keyword(cmd: &Command, keyword: &str, start_from: i64) -> Option<i64> {
    let argc = cmd.argc() as i64;
    let matches = |i: i64| cmd.arg(i as usize).eq_ignore_ascii_case(keyword.as_bytes());
    if start_from > 0 {
        (start_from..argc).find(|&i| matches(i))
    } else {
        let start = argc + start_from;
        (1..=start).rev().find(|&i| i < argc && matches(i))
    }
}

fn parse_count(arg: &[u8]) -> Option<i64> {
    std::str::from_utf8(arg)
        .ok()?
        .parse::<i64>()
        .ok()
        .filter(|&n| n >= 0)
}

/// Keys the server finds with custom code. Only SORT's `STORE destination`
/// matters for replication (BY/GET patterns are not keys of their own).
fn custom_keys(
    spec: &CommandSpec,
    cmd: &Command,
    key_spec: &KeySpec,
    out: &mut SmallVec<[usize; 4]>,
) {
    if spec.name != "sort" || !key_spec.flags.contains(KeyFlags::OW) {
        return;
    }
    // Mirrors sortGetKeys: skip the arguments of LIMIT (2), GET and BY (1);
    // the last STORE wins.
    let mut store = None;
    let mut i = 2;
    while i < cmd.argc() {
        let arg = cmd.arg(i);
        let skip = if arg.eq_ignore_ascii_case(b"limit") {
            2
        } else if arg.eq_ignore_ascii_case(b"get") || arg.eq_ignore_ascii_case(b"by") {
            1
        } else if arg.eq_ignore_ascii_case(b"store") {
            store = Some(i + 1);
            1
        } else {
            0
        };
        i += 1 + skip;
    }
    if let Some(pos) = store.filter(|&p| p < cmd.argc()) {
        out.push(pos);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys_of(args: &[&str]) -> Vec<String> {
        let cmd = Command::from_args(args);
        let spec = lookup(&cmd).expect("known command");
        let found: Vec<String> = keys(spec, &cmd)
            .iter()
            .map(|k| String::from_utf8_lossy(k).into_owned())
            .collect();
        found
    }

    #[test]
    fn lookup_ignores_case_and_resolves_subcommands() {
        let cmd = Command::from_args(&["xGroup", "CREATE", "s", "g", "$"]);
        let spec = lookup(&cmd).unwrap();
        assert_eq!(spec.name, "create");
        assert!(spec.is_write());
        assert!(lookup(&Command::from_args(&["NOSUCHCOMMAND"])).is_none());
        assert_eq!(lookup_name(b"SeT").unwrap().name, "set");
    }

    #[test]
    fn key_positions_for_every_kind_of_spec() {
        assert_eq!(keys_of(&["SET", "k", "v", "EX", "10"]), ["k"]);
        assert_eq!(keys_of(&["MSET", "a", "1", "b", "2"]), ["a", "b"]);
        assert_eq!(keys_of(&["DEL", "a", "b", "c"]), ["a", "b", "c"]);
        assert_eq!(keys_of(&["RENAME", "a", "b"]), ["a", "b"]);
        assert_eq!(
            keys_of(&["BITOP", "AND", "d", "s1", "s2"]),
            ["d", "s1", "s2"]
        );
        assert_eq!(
            keys_of(&["ZUNIONSTORE", "d", "2", "a", "b", "WEIGHTS", "1", "2"]),
            ["d", "a", "b"]
        );
        assert_eq!(
            keys_of(&["EVAL", "return 1", "2", "k1", "k2", "arg"]),
            ["k1", "k2"]
        );
        assert_eq!(keys_of(&["LMPOP", "2", "l1", "l2", "LEFT"]), ["l1", "l2"]);
        assert_eq!(
            keys_of(&[
                "XREADGROUP",
                "GROUP",
                "g",
                "c",
                "STREAMS",
                "s1",
                "s2",
                ">",
                ">"
            ]),
            ["s1", "s2"]
        );
        assert_eq!(
            keys_of(&["GEORADIUS", "src", "0", "0", "1", "km", "STORE", "dst"]),
            ["src", "dst"]
        );
        assert_eq!(
            keys_of(&["SORT", "src", "BY", "w_*", "LIMIT", "0", "5", "STORE", "dst"]),
            ["src", "dst"]
        );
        assert_eq!(
            keys_of(&["XGROUP", "CREATE", "stream", "g", "$"]),
            ["stream"]
        );
        assert_eq!(keys_of(&["FLUSHALL"]), Vec::<String>::new());
        assert_eq!(keys_of(&["PUBLISH", "chan", "msg"]), Vec::<String>::new());
    }

    #[test]
    fn malformed_counts_give_no_keys_instead_of_panicking() {
        assert!(keys_of(&["ZUNIONSTORE", "d", "x", "a"]) == ["d"]);
        assert!(keys_of(&["ZUNIONSTORE", "d", "9", "a"]) == ["d"]);
        assert!(keys_of(&["MSET"]).is_empty());
    }

    #[test]
    fn replication_roles_come_from_the_table() {
        let role = |args: &[&str]| lookup(&Command::from_args(args)).unwrap().role;
        assert_eq!(role(&["PING"]), Role::Ping);
        assert_eq!(role(&["REPLCONF", "GETACK", "*"]), Role::Replconf);
        assert_eq!(role(&["select", "3"]), Role::Select);
        assert_eq!(role(&["MULTI"]), Role::Multi);
        assert_eq!(role(&["EXEC"]), Role::Exec);
        assert_eq!(role(&["FUNCTION", "LOAD", "code"]), Role::Function);
        assert_eq!(role(&["SET", "k", "v"]), Role::Data);
    }
}
