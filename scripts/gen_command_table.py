#!/usr/bin/env python3
"""Generate engine/src/command/table.rs from a live Redis server.

The command table is the one place that knows, for every Redis command, which
argument positions are keys (Redis 7 key specs), whether it writes, and how
shardsync treats it in a replication stream. Key positions and flags come from
the server itself (`COMMAND` and `COMMAND DOCS`); what shardsync does with a
command (its replication role, whether replaying it twice is harmless, how a
multi-key form splits across cluster slots) is shardsync's own knowledge and
lives in the dictionaries below, so regenerating never loses it.

Usage (needs redis-cli and a server of the version to mirror, 7.0 here):

    redis-server --port 7777 --save '' --daemonize yes
    python3 scripts/gen_command_table.py 7777 > engine/src/command/table.rs
    redis-cli -p 7777 shutdown nosave
    cargo fmt
"""

import json
import subprocess
import sys

# Commands that newer servers propagate but the generating server does not
# know. Same fields as a COMMAND reply row; the group is given separately.
EXTRA = [
    # Redis 7.4 hash field expiration (HFE).
    (["hexpire", -6, ["write", "denyoom", "fast"], 1, 1, 1, [], [], [
        {"flags": ["RW", "update"], "begin_search": {"type": "index", "spec": {"index": 1}},
         "find_keys": {"type": "range", "spec": {"lastkey": 0, "keystep": 1, "limit": 0}}}], []], "hash"),
    (["hpexpire", -6, ["write", "denyoom", "fast"], 1, 1, 1, [], [], [
        {"flags": ["RW", "update"], "begin_search": {"type": "index", "spec": {"index": 1}},
         "find_keys": {"type": "range", "spec": {"lastkey": 0, "keystep": 1, "limit": 0}}}], []], "hash"),
    (["hexpireat", -6, ["write", "denyoom", "fast"], 1, 1, 1, [], [], [
        {"flags": ["RW", "update"], "begin_search": {"type": "index", "spec": {"index": 1}},
         "find_keys": {"type": "range", "spec": {"lastkey": 0, "keystep": 1, "limit": 0}}}], []], "hash"),
    (["hpexpireat", -6, ["write", "denyoom", "fast"], 1, 1, 1, [], [], [
        {"flags": ["RW", "update"], "begin_search": {"type": "index", "spec": {"index": 1}},
         "find_keys": {"type": "range", "spec": {"lastkey": 0, "keystep": 1, "limit": 0}}}], []], "hash"),
    (["hpersist", -5, ["write", "fast"], 1, 1, 1, [], [], [
        {"flags": ["RW", "update"], "begin_search": {"type": "index", "spec": {"index": 1}},
         "find_keys": {"type": "range", "spec": {"lastkey": 0, "keystep": 1, "limit": 0}}}], []], "hash"),
    (["httl", -5, ["readonly", "fast"], 1, 1, 1, [], [], [
        {"flags": ["RO", "access"], "begin_search": {"type": "index", "spec": {"index": 1}},
         "find_keys": {"type": "range", "spec": {"lastkey": 0, "keystep": 1, "limit": 0}}}], []], "hash"),
    (["hpttl", -5, ["readonly", "fast"], 1, 1, 1, [], [], [
        {"flags": ["RO", "access"], "begin_search": {"type": "index", "spec": {"index": 1}},
         "find_keys": {"type": "range", "spec": {"lastkey": 0, "keystep": 1, "limit": 0}}}], []], "hash"),
    (["hexpiretime", -5, ["readonly", "fast"], 1, 1, 1, [], [], [
        {"flags": ["RO", "access"], "begin_search": {"type": "index", "spec": {"index": 1}},
         "find_keys": {"type": "range", "spec": {"lastkey": 0, "keystep": 1, "limit": 0}}}], []], "hash"),
    (["hpexpiretime", -5, ["readonly", "fast"], 1, 1, 1, [], [], [
        {"flags": ["RO", "access"], "begin_search": {"type": "index", "spec": {"index": 1}},
         "find_keys": {"type": "range", "spec": {"lastkey": 0, "keystep": 1, "limit": 0}}}], []], "hash"),
]

# What a command means inside a replication stream. Everything not listed is
# `Role::Data`: an ordinary command to replay on the target.
ROLE = {
    "ping": "Ping",
    "replconf": "Replconf",
    "select": "Select",
    "multi": "Multi",
    "exec": "Exec",
    "discard": "Discard",
    "publish": "Publish",
    "spublish": "Publish",
    "flushall": "FlushAll",
    "flushdb": "FlushDb",
    "swapdb": "SwapDb",
    "move": "Move",
    "function|load": "Function",
    "function|delete": "Function",
    "function|flush": "Function",
    "function|restore": "Function",
    "script|load": "Function",
    "script|flush": "Function",
    "eval": "Script",
    "evalsha": "Script",
    "eval_ro": "Script",
    "evalsha_ro": "Script",
    "fcall": "Script",
    "fcall_ro": "Script",
}

# Commands whose second application leaves the data as the first did, given
# the same prior state. A writer that lost its connection may resend these
# without risk; anything else resent is counted as a possible duplicate.
IDEMPOTENT = {
    "set", "setex", "psetex", "setnx", "mset", "msetnx", "getset", "getdel", "setrange",
    "setbit", "del", "unlink", "expire", "pexpire", "expireat", "pexpireat", "persist",
    "restore", "restore-asking", "hset", "hmset", "hsetnx", "hdel", "sadd", "srem",
    "zadd", "zrem", "zremrangebylex", "zremrangebyrank", "zremrangebyscore", "ltrim",
    "lset", "pfadd", "pfmerge", "sinterstore", "sunionstore", "sdiffstore", "zunionstore",
    "zinterstore", "zdiffstore", "zrangestore", "bitop", "geoadd", "geosearchstore",
    "xadd", "xdel", "xack", "xsetid", "xtrim", "xgroup|create", "xgroup|setid",
    "xgroup|destroy", "xgroup|createconsumer", "xgroup|delconsumer", "xclaim",
    "select", "flushall", "flushdb", "copy", "function|load", "function|delete",
    "function|flush", "function|restore", "hexpire", "hpexpire", "hexpireat",
    "hpexpireat", "hpersist", "ping", "multi", "exec", "touch",
}

# How a multi-key command divides when its keys live in different cluster
# slots. `PerKey`: every key is independent (DEL a b == DEL a; DEL b).
# `PerKeyValue`: key/value pairs are independent (MSET). Everything else is
# `Whole`: it must run where all its keys are, or be rewritten.
SPLIT = {
    "del": "PerKey",
    "unlink": "PerKey",
    "touch": "PerKey",
    "exists": "PerKey",
    "mset": "PerKeyValue",
}

FLAGS = {
    "write": "WRITE",
    "readonly": "READONLY",
    "denyoom": "DENYOOM",
    "admin": "ADMIN",
    "pubsub": "PUBSUB",
    "noscript": "NOSCRIPT",
    "blocking": "BLOCKING",
    "movablekeys": "MOVABLE_KEYS",
    "fast": "FAST",
}

KEY_FLAGS = {
    "RO": "RO",
    "RW": "RW",
    "OW": "OW",
    "RM": "RM",
    "insert": "INSERT",
    "delete": "DELETE",
    "update": "UPDATE",
    "access": "ACCESS",
    "not_key": "NOT_KEY",
    "incomplete": "INCOMPLETE",
    "variable_flags": "VARIABLE_FLAGS",
}

GROUPS = {
    "generic": "Generic", "string": "String", "list": "List", "set": "Set",
    "sorted-set": "SortedSet", "hash": "Hash", "pubsub": "Pubsub",
    "transactions": "Transactions", "connection": "Connection", "server": "Server",
    "scripting": "Scripting", "hyperloglog": "HyperLogLog", "cluster": "Cluster",
    "geo": "Geo", "stream": "Stream", "bitmap": "Bitmap", "sentinel": "Server",
    "module": "Server",
}
GROUP_ORDER = ["String", "Bitmap", "List", "Hash", "Set", "SortedSet", "Geo",
               "HyperLogLog", "Stream", "Generic", "Transactions", "Scripting",
               "Pubsub", "Connection", "Server", "Cluster"]


def redis(port, *args):
    out = subprocess.check_output(["redis-cli", "-p", str(port), "--json", *args])
    return json.loads(out)


def rust_flags(names, table, ty):
    parts = [f"{ty}::{table[n]}" for n in names if n in table]
    if not parts:
        return f"{ty}::NONE"
    return ".union(".join(parts) + ")" * (len(parts) - 1)


def key_spec(ks):
    bs, fk = ks["begin_search"], ks["find_keys"]
    if bs["type"] == "index":
        begin = f"Begin::Index({bs['spec']['index']})"
    elif bs["type"] == "keyword":
        begin = f"Begin::Keyword {{ keyword: {json.dumps(bs['spec']['keyword'])}, start_from: {bs['spec']['startfrom']} }}"
    else:
        begin = "Begin::Unknown"
    if fk["type"] == "range":
        s = fk["spec"]
        find = f"Find::Range {{ last: {s['lastkey']}, step: {s['keystep']}, limit: {s['limit']} }}"
    elif fk["type"] == "keynum":
        s = fk["spec"]
        find = f"Find::Keynum {{ keynum_idx: {s['keynumidx']}, first_key: {s['firstkey']}, step: {s['keystep']} }}"
    else:
        find = "Find::Unknown"
    flags = rust_flags(ks.get("flags", []), KEY_FLAGS, "KeyFlags")
    return f"KeySpec {{ begin: {begin}, find: {find}, flags: {flags} }}"


def spec(row, group, full_name, indent):
    name, arity, flags = row[0], row[1], row[2]
    keys = row[8]
    subs = sorted(row[9], key=lambda r: r[0])
    short = name.split("|")[-1]
    pad = " " * indent
    lines = [f"{pad}CommandSpec {{"]
    lines.append(f"{pad}    name: {json.dumps(short)},")
    lines.append(f"{pad}    arity: {arity},")
    lines.append(f"{pad}    flags: {rust_flags(flags, FLAGS, 'CmdFlags')},")
    lines.append(f"{pad}    group: Group::{group},")
    lines.append(f"{pad}    role: Role::{ROLE.get(full_name, 'Data')},")
    lines.append(f"{pad}    idempotent: {'true' if full_name in IDEMPOTENT else 'false'},")
    lines.append(f"{pad}    split: Split::{SPLIT.get(full_name, 'Whole')},")
    if keys:
        lines.append(f"{pad}    keys: &[")
        for ks in keys:
            lines.append(f"{pad}        {key_spec(ks)},")
        lines.append(f"{pad}    ],")
    else:
        lines.append(f"{pad}    keys: &[],")
    if subs:
        lines.append(f"{pad}    subcommands: &[")
        for s in subs:
            lines.append(spec(s, group, s[0], indent + 8) + ",")
        lines.append(f"{pad}    ],")
    else:
        lines.append(f"{pad}    subcommands: &[],")
    lines.append(f"{pad}}}")
    return "\n".join(lines)


def main():
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 7777
    rows = redis(port, "COMMAND")
    docs = redis(port, "COMMAND", "DOCS")
    version = next(l for l in subprocess.check_output(
        ["redis-cli", "-p", str(port), "INFO", "server"], text=True).splitlines()
        if l.startswith("redis_version:")).split(":")[1].strip()
    entries = [(r, GROUPS[docs.get(r[0], {}).get("group", "server")]) for r in rows]
    known = {r[0] for r in rows}
    entries += [(r, g and GROUPS[g]) for r, g in EXTRA if r[0] not in known]
    print("// @generated by scripts/gen_command_table.py from redis-server", version)
    print("// plus the newer commands listed in the script. Do not edit by hand: change")
    print("// the script's ROLE / IDEMPOTENT / SPLIT / EXTRA tables and regenerate.")
    print()
    print("use super::spec::*;")
    print()
    print("/// Every command the generating server knows, grouped by family.")
    print("pub static COMMANDS: &[CommandSpec] = &[")
    for group in GROUP_ORDER:
        members = sorted((r for r, g in entries if g == group), key=lambda r: r[0])
        if not members:
            continue
        print(f"    // ---- {group} ----")
        for r in members:
            print(spec(r, group, r[0], 4) + ",")
    print("];")


if __name__ == "__main__":
    main()
