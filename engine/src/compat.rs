//! Replicated commands adjusted for an older target.
//!
//! A 7.x master propagates stream bookkeeping with options older servers
//! do not parse (`XGROUP SETID ... ENTRIESREAD n`, `XSETID ...
//! ENTRIESADDED n MAXDELETEDID id`). Those counters do not exist before 7.0,
//! so dropping the options keeps everything an older target can hold,
//! whereas sending them unchanged would fail the command (and leave the
//! group's last-delivered ID behind).

use crate::rebuild::TargetCaps;
use crate::resp::Command;

/// `cmd` made acceptable to a target with `caps`; `None` when it needs no
/// change.
pub fn adapt(cmd: &Command, caps: TargetCaps) -> Option<Command> {
    if caps.stream_counters() {
        return None;
    }
    // Options start after `XSETID key id` / `XGROUP CREATE|SETID key group id`.
    let (drop_opts, first_opt): (&[&[u8]], usize) = if cmd.is("XSETID") {
        (&[b"ENTRIESADDED", b"MAXDELETEDID"], 3)
    } else if cmd.is("XGROUP")
        && cmd
            .get(1)
            .is_some_and(|s| s.eq_ignore_ascii_case(b"CREATE") || s.eq_ignore_ascii_case(b"SETID"))
    {
        (&[b"ENTRIESREAD"], 5)
    } else {
        return None;
    };
    let mut args: Vec<&[u8]> = Vec::with_capacity(cmd.argc());
    let mut changed = false;
    let mut i = 0;
    while i < cmd.argc() {
        let a = cmd.arg(i);
        if i >= first_opt
            && i + 1 < cmd.argc()
            && drop_opts.iter().any(|o| a.eq_ignore_ascii_case(o))
        {
            i += 2;
            changed = true;
            continue;
        }
        args.push(a);
        i += 1;
    }
    changed.then(|| Command::from_args(&args))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn adapt_62(args: &[&str]) -> Option<Vec<String>> {
        adapt(&Command::from_args(args), TargetCaps::new(6, 2)).map(|c| {
            c.args()
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect()
        })
    }

    #[test]
    fn stream_counters_are_dropped_for_targets_before_70() {
        assert_eq!(
            adapt_62(&["XGROUP", "SETID", "s", "g", "5-0", "ENTRIESREAD", "3"]).unwrap(),
            ["XGROUP", "SETID", "s", "g", "5-0"]
        );
        assert_eq!(
            adapt_62(&[
                "xgroup",
                "create",
                "s",
                "g",
                "$",
                "MKSTREAM",
                "entriesread",
                "0"
            ])
            .unwrap(),
            ["xgroup", "create", "s", "g", "$", "MKSTREAM"]
        );
        assert_eq!(
            adapt_62(&[
                "XSETID",
                "s",
                "9-0",
                "ENTRIESADDED",
                "12",
                "MAXDELETEDID",
                "3-0"
            ])
            .unwrap(),
            ["XSETID", "s", "9-0"]
        );
        assert_eq!(adapt_62(&["XSETID", "s", "9-0"]), None);
        assert_eq!(adapt_62(&["SET", "ENTRIESREAD", "x", "y"]), None);
        // A group (or key) named like an option stays.
        assert_eq!(
            adapt_62(&[
                "XGROUP",
                "SETID",
                "s",
                "ENTRIESREAD",
                "5-0",
                "ENTRIESREAD",
                "1"
            ])
            .unwrap(),
            ["XGROUP", "SETID", "s", "ENTRIESREAD", "5-0"]
        );
        assert_eq!(
            adapt_62(&["XGROUP", "CREATE", "ENTRIESREAD", "g", "$"]),
            None
        );
        let cmd = Command::from_args(&["XSETID", "s", "9-0", "ENTRIESADDED", "12"]);
        assert!(adapt(&cmd, TargetCaps::new(7, 0)).is_none());
    }
}
