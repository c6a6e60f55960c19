//! The heartbeat key: a timestamp shardsync writes on every source master
//! each second, to measure lag from the stream itself.
//!
//! Its name carries the task's id, so a task recognizes its own heartbeat
//! (and drops it from what it replays) while another task's, an upstream
//! one in a cascade say, is ordinary data to it. On a cluster source the
//! name carries a hash tag of a slot the master owns.

use crate::resp::Command;
use crate::split::slot_tag;

/// The heartbeat key for a task `id`, in `slot` when given.
pub fn key(id: &str, slot: Option<u16>) -> Vec<u8> {
    match slot {
        Some(s) => format!("{{{}}}shardsync:heartbeat:{id}", slot_tag(s)).into_bytes(),
        None => format!("shardsync:heartbeat:{id}").into_bytes(),
    }
}

/// What every heartbeat key's name contains.
pub const MARK: &str = "shardsync:heartbeat:";

/// Whether `key` is some task's heartbeat (for comparisons, which leave
/// them out: a task never replays its own).
pub fn is_any(key: &[u8]) -> bool {
    key.windows(MARK.len()).any(|w| w == MARK.as_bytes())
}

/// Whether `key` is task `id`'s heartbeat (in whatever slot).
///
/// Asked of every key of a snapshot, so it allocates nothing.
pub fn is_ours(key: &[u8], id: &str) -> bool {
    let Some(rest) = key.strip_suffix(id.as_bytes()) else {
        return false;
    };
    let Some(prefix) = rest.strip_suffix(MARK.as_bytes()) else {
        return false;
    };
    prefix.is_empty() || prefix.ends_with(b"}")
}

/// The timestamp (Unix ms) a replicated write of the heartbeat carries:
/// `SET key ts ...`, `SETEX key ttl ts`, `PSETEX key ttl ts`.
pub fn written_ms(cmd: &Command) -> Option<i64> {
    let value = if cmd.is("SET") {
        cmd.get(2)?
    } else if cmd.is("SETEX") || cmd.is("PSETEX") {
        cmd.get(3)?
    } else {
        return None;
    };
    std::str::from_utf8(value).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::slot::slot;

    #[test]
    fn keys_land_in_their_slot_and_are_recognized() {
        let k = key("ab12", Some(4242));
        assert_eq!(slot(&k), 4242);
        assert!(is_ours(&k, "ab12"));
        assert!(is_ours(&key("ab12", None), "ab12"));
        assert!(!is_ours(&k, "ab1"));
        assert!(!is_ours(b"xshardsync:heartbeat:ab12", "ab12"));
        assert!(!is_ours(&key("other", Some(1)), "ab12"));
        assert!(is_any(&k) && is_any(&key("other", None)));
        assert!(!is_any(b"shardsync:heart"));
    }

    #[test]
    fn timestamps_are_read_from_what_masters_propagate() {
        let at = |args: &[&str]| written_ms(&Command::from_args(args));
        assert_eq!(
            at(&["SET", "k", "1700000000123", "PXAT", "1700000060123"]),
            Some(1700000000123)
        );
        assert_eq!(at(&["SETEX", "k", "60", "42"]), Some(42));
        assert_eq!(at(&["DEL", "k"]), None);
        assert_eq!(at(&["SET", "k", "x"]), None);
    }
}
