//! Applied-position markers: keys shardsync writes on a target node in the
//! same transaction as the commands they describe, so that the target
//! itself says how far in a source's stream it got.
//!
//! A marker belongs to one task (its id) and one source shard (the source
//! master's `host:port`); on a cluster target it carries a hash tag (it
//! must share its transaction's slot). Its value says either that a full
//! sync is being loaded (written before its first key) or the stream
//! position of the last batch applied. Every full sync starts a new
//! *epoch*, so a marker left by an older sync never passes for a newer one.
//!
//! Every key shardsync writes for itself (heartbeats, markers, temporary
//! names) is of one family: `shardsync:` after an optional `{hash tag}`
//! ([`is_internal`]).

/// What every marker key's name contains.
pub const MARK: &str = "shardsync:applied:";

/// The marker of task `task` for source shard `shard`, in `slot` when
/// given (cluster targets).
pub fn key(task: &str, shard: &str, slot: Option<u16>) -> Vec<u8> {
    match slot {
        Some(s) => format!("{{{}}}{MARK}{task}:{shard}", crate::split::slot_tag(s)).into_bytes(),
        None => format!("{MARK}{task}:{shard}").into_bytes(),
    }
}

/// On a cluster target, the marker of slot `slot` for the shard whose
/// marker is `base` ([`key`] without a slot): `{tag}base`, in `slot`.
pub fn in_slot(base: &[u8], slot: u16) -> Vec<u8> {
    let tag = crate::split::slot_tag(slot);
    let mut k = Vec::with_capacity(base.len() + tag.len() + 2);
    k.push(b'{');
    k.extend_from_slice(tag.as_bytes());
    k.push(b'}');
    k.extend_from_slice(base);
    k
}

/// On a cluster target, the shard's node-wide marker on the node serving
/// `home` (a slot it serves): everything up to its position is applied on
/// that node, in every slot. `{tag}base:node`.
pub fn node_wide(base: &[u8], home: u16) -> Vec<u8> {
    let mut k = in_slot(base, home);
    k.extend_from_slice(b":node");
    k
}

/// Whether `key` is one shardsync writes for itself: `shardsync:...`,
/// possibly after a `{hash tag}`.
pub fn is_internal(key: &[u8]) -> bool {
    untagged(key).is_some_and(|rest| rest.starts_with(b"shardsync:"))
}

/// Whether `key` is a marker key (of any task, shard or slot).
pub fn is_marker(key: &[u8]) -> bool {
    untagged(key).is_some_and(|rest| rest.starts_with(MARK.as_bytes()))
}

/// `key` without its leading `{hash tag}`; `None` for an unclosed one.
fn untagged(key: &[u8]) -> Option<&[u8]> {
    match key.strip_prefix(b"{") {
        Some(tagged) => tagged
            .iter()
            .position(|&b| b == b'}')
            .map(|end| &tagged[end + 1..]),
        None => Some(key),
    }
}

/// The order guard's script: it rewrites the marker `KEYS[1]` (with its own
/// value, or creates and deletes it when there is none) unless it holds
/// `ARGV[1]`. Any write of a key another command WATCHes makes that
/// command's transaction discard itself at EXEC, so `WATCH m`, this script
/// and then `MULTI ... EXEC` run the transaction only if `m` holds
/// `ARGV[1]`: only if the transaction before it in the same slot ran. The
/// value never changes, so a marker a restart reads is never disturbed.
pub const GUARD_SCRIPT: &str = "local v = redis.call('GET', KEYS[1]) \
if v ~= ARGV[1] then if v then redis.call('SET', KEYS[1], v) \
else redis.call('SET', KEYS[1], ''); redis.call('DEL', KEYS[1]) end end";

/// The two commands of an order guard (see [`GUARD_SCRIPT`]), each handed
/// to `each` as its arguments (no allocation: they are built on the data
/// path): the transaction after them runs only if marker `key` holds
/// `expected`.
pub fn guard_commands(key: &[u8], expected: &[u8], mut each: impl FnMut(&[&[u8]])) {
    each(&[b"WATCH", key]);
    each(&[b"EVAL", GUARD_SCRIPT.as_bytes(), b"1", key, expected]);
}

/// The marker and the value an order guard's script expects, from its
/// arguments (`None` for any other command).
pub fn parse_guard<'a>(args: &[&'a [u8]]) -> Option<(&'a [u8], &'a [u8])> {
    match args {
        [eval, script, b"1", key, expected]
            if eval.eq_ignore_ascii_case(b"EVAL") && *script == GUARD_SCRIPT.as_bytes() =>
        {
            Some((key, expected))
        }
        _ => None,
    }
}

/// The marker and the value of `SET <marker> <value>` (`None` for any
/// other command).
pub fn parse_marker_set<'a>(args: &[&'a [u8]]) -> Option<(&'a [u8], &'a [u8])> {
    match args {
        [set, key, value] if set.eq_ignore_ascii_case(b"SET") && is_marker(key) => {
            Some((key, value))
        }
        _ => None,
    }
}

/// What a marker says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Marker {
    /// Full sync number `epoch` is being loaded: the target holds this
    /// task's data, not yet resumable.
    Full { epoch: u64, fresh: bool },
    /// Everything of the stream up to `offset` (with source db `db`
    /// selected there) is applied, in sync `epoch` of replication id
    /// `replid`.
    Applied {
        epoch: u64,
        fresh: bool,
        replid: String,
        offset: u64,
        db: u32,
    },
}

/// The format version written first in every value.
const VERSION: &str = "1";

impl Marker {
    pub fn epoch(&self) -> u64 {
        match self {
            Marker::Full { epoch, .. } | Marker::Applied { epoch, .. } => *epoch,
        }
    }

    /// The task began on a target checked empty: what the target holds of
    /// the copied databases is the task's own.
    pub fn fresh(&self) -> bool {
        match self {
            Marker::Full { fresh, .. } | Marker::Applied { fresh, .. } => *fresh,
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let flags = |fresh: bool| if fresh { "f" } else { "-" };
        match self {
            Marker::Full { epoch, fresh } => {
                format!("{VERSION} {epoch} {} full", flags(*fresh)).into_bytes()
            }
            Marker::Applied {
                epoch,
                fresh,
                replid,
                offset,
                db,
            } => format!("{VERSION} {epoch} {} {replid} {offset} {db}", flags(*fresh)).into_bytes(),
        }
    }

    /// Reads a marker's value; `None` when it is not one this build writes.
    pub fn parse(value: &[u8]) -> Option<Marker> {
        let text = std::str::from_utf8(value).ok()?;
        let mut words = text.split(' ');
        if words.next()? != VERSION {
            return None;
        }
        let epoch = words.next()?.parse().ok()?;
        let fresh = match words.next()? {
            "f" => true,
            "-" => false,
            _ => return None,
        };
        let marker = match words.next()? {
            "full" => Marker::Full { epoch, fresh },
            replid => Marker::Applied {
                epoch,
                fresh,
                replid: replid.to_string(),
                offset: words.next()?.parse().ok()?,
                db: words.next()?.parse().ok()?,
            },
        };
        words.next().is_none().then_some(marker)
    }

    /// Whether `self` was written after `other`: a later epoch, or in the
    /// same epoch a position further on (a full sync's marker comes before
    /// any position of its epoch).
    pub fn is_newer_than(&self, other: &Marker) -> bool {
        let rank = |m: &Marker| match m {
            Marker::Full { epoch, .. } => (*epoch, 0, 0),
            Marker::Applied { epoch, offset, .. } => (*epoch, 1, *offset),
        };
        rank(self) > rank(other)
    }
}

/// The newest of several markers of one shard (read from the databases
/// or nodes it writes to).
pub fn newest(markers: impl IntoIterator<Item = Marker>) -> Option<Marker> {
    markers
        .into_iter()
        .fold(None, |best: Option<Marker>, m| match best {
            Some(b) if !m.is_newer_than(&b) => Some(b),
            _ => Some(m),
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::slot::slot;

    fn applied(epoch: u64, offset: u64) -> Marker {
        Marker::Applied {
            epoch,
            fresh: true,
            replid: "r".into(),
            offset,
            db: 3,
        }
    }

    fn full(epoch: u64) -> Marker {
        Marker::Full {
            epoch,
            fresh: false,
        }
    }

    #[test]
    fn a_guard_names_its_marker_and_expected_value() {
        let mut cmds: Vec<Vec<Vec<u8>>> = Vec::new();
        guard_commands(b"{a}shardsync:applied:t:s", b"1 2 f r 9 0", |c| {
            cmds.push(c.iter().map(|a| a.to_vec()).collect())
        });
        let args = |i: usize| -> Vec<&[u8]> { cmds[i].iter().map(Vec::as_slice).collect() };
        let (watch, eval) = (args(0), args(1));
        assert_eq!(cmds.len(), 2);
        assert_eq!(watch, [&b"WATCH"[..], b"{a}shardsync:applied:t:s"]);
        assert_eq!(
            parse_guard(&eval),
            Some((&b"{a}shardsync:applied:t:s"[..], &b"1 2 f r 9 0"[..]))
        );
        assert_eq!(parse_guard(&[b"EVAL", b"return 1", b"1", b"k", b"v"]), None);
        assert_eq!(parse_guard(&watch), None);
        assert_eq!(
            parse_marker_set(&[b"set", b"shardsync:applied:t:s", b"v"]),
            Some((&b"shardsync:applied:t:s"[..], &b"v"[..]))
        );
        assert_eq!(parse_marker_set(&[b"SET", b"user:1", b"v"]), None);
    }

    #[test]
    fn values_round_trip_and_foreign_ones_are_refused() {
        for m in [full(4), applied(7, 123456)] {
            assert_eq!(Marker::parse(&m.encode()), Some(m.clone()));
        }
        assert_eq!(applied(2, 9).encode(), b"1 2 f r 9 3");
        assert_eq!(full(2).encode(), b"1 2 - full");
        for bad in [
            &b"2 1 - full"[..],
            b"1 x - full",
            b"1 1 full",
            b"1 1 ? full",
            b"1 1 - r 9",
            b"1 1 - r 9 3 extra",
            b"\xff",
        ] {
            assert_eq!(Marker::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn the_newest_marker_is_the_latest_epoch_then_the_furthest_position() {
        assert_eq!(
            newest([applied(1, 900), full(2), applied(1, 50)]),
            Some(full(2))
        );
        assert_eq!(
            newest([full(2), applied(2, 10), applied(2, 7)]),
            Some(applied(2, 10))
        );
        assert_eq!(newest([]), None);
    }

    #[test]
    fn keys_are_internal_and_land_in_their_slot() {
        let k = key("t1", "10.0.0.5:6379", None);
        assert_eq!(k, b"shardsync:applied:t1:10.0.0.5:6379");
        let tagged = key("t1", "10.0.0.5:6379", Some(4242));
        assert_eq!(slot(&tagged), 4242);
        for k in [
            &k[..],
            &tagged,
            b"shardsync:heartbeat:x",
            b"{ss7}shardsync:tmp:a:1",
        ] {
            assert!(is_internal(k), "{}", String::from_utf8_lossy(k));
        }
        assert!(is_marker(&tagged) && is_marker(&k));
        assert!(!is_marker(b"shardsync:heartbeat:x") && !is_marker(b"{unclosed"));
        for k in [
            &b"user:1"[..],
            b"{shardsync}x",
            b"{a}b",
            b"myshardsync:x",
            b"{unclosed",
        ] {
            assert!(!is_internal(k), "{}", String::from_utf8_lossy(k));
        }
    }
}
