//! What to send again, and elsewhere, of a batch: pure functions over its
//! bytes.
//!
//! - [`sub_batch`]: some of a batch's commands as a batch of their own (for
//!   another node after MOVED, with `ASKING` before each after ASK);
//! - [`resend_batch`]: what did not run, with refused RESTOREs replaced by
//!   the commands that rebuild their values ([`rebuild_refused`]), in the
//!   batch's order.

use std::collections::HashSet;
use std::ops::Range;

use bytes::{Bytes, BytesMut};
use engine::rebuild::TargetCaps;
use engine::resp::encode;
use engine::split::TmpNames;

use crate::route::{Batch, BatchBuilder, ExpectKind};

/// What to send again of `batch`: the commands in `ranges`, and for each
/// refused RESTORE in `rebuilt`, its replacement, in the batch's order.
pub(crate) fn resend_batch(
    batch: &Batch,
    ranges: &[Range<usize>],
    rebuilt: Vec<(usize, Batch)>,
) -> Batch {
    if rebuilt.is_empty() {
        return sub_batch(batch, ranges, None);
    }
    let mut pieces: Vec<(usize, Batch)> = ranges
        .iter()
        .map(|r| (r.start, sub_batch(batch, std::slice::from_ref(r), None)))
        .collect();
    pieces.extend(rebuilt);
    pieces.sort_by_key(|(at, _)| *at);
    let mut b = BatchBuilder::default();
    for (_, piece) in &pieces {
        for i in 0..piece.len() {
            b.push(None, piece.replies[i].kind, |buf| {
                buf.extend_from_slice(piece.command_bytes(i))
            });
        }
    }
    let mut out = b.take(batch.shard, batch.end);
    out.db = batch.db;
    out.wrapped = still_wrapped(batch, &out);
    out
}

/// Whether what is sent again of a wrapped batch is still made of our
/// transactions: it begins with a MULTI and, after its last EXEC, holds at
/// most the node-wide marker of a cluster batch.
pub(crate) fn still_wrapped(from: &Batch, out: &Batch) -> bool {
    let last_exec = out
        .replies
        .iter()
        .rposition(|e| e.kind == ExpectKind::TxEnd);
    from.wrapped
        && out
            .replies
            .first()
            .is_some_and(|e| matches!(e.kind, ExpectKind::TxBegin | ExpectKind::TxGuard))
        && last_exec.is_some_and(|i| i + 2 >= out.replies.len())
}

/// The commands of `batch` in `ranges` (in order), as a batch of their own,
/// with `prefix` (ASKING) when given before each command, or before the
/// MULTI of a transaction: ASKING holds for every command of the MULTI it
/// precedes, up to its EXEC. (Sent one by one after ASKING, a transaction's
/// commands would create keys on the importing node that the migrating one
/// still holds.) An order guard is left out there: the other node holds
/// nothing it could wait for.
pub(crate) fn sub_batch(batch: &Batch, ranges: &[Range<usize>], prefix: Option<&[u8]>) -> Batch {
    let mut b = BatchBuilder::default();
    for range in ranges {
        let mut in_tx = false;
        for i in range.clone() {
            let kind = batch.replies[i].kind;
            if let Some(prefix) = prefix {
                let asking = match kind {
                    ExpectKind::TxGuard => continue,
                    ExpectKind::TxBegin => {
                        in_tx = true;
                        true
                    }
                    ExpectKind::TxEnd => {
                        in_tx = false;
                        false
                    }
                    _ => !in_tx,
                };
                if asking {
                    b.push(None, ExpectKind::Ok, |buf| encode::command(buf, &[prefix]));
                }
            }
            b.push(None, kind, |buf| {
                buf.extend_from_slice(batch.command_bytes(i))
            });
        }
    }
    let mut out = b.take(batch.shard, batch.end);
    out.db = batch.db;
    // Asked batches are not checked by markers on a new connection: the
    // importing node answers a GET of their slot with MOVED.
    out.wrapped = prefix.is_none() && still_wrapped(batch, &out);
    out
}

/// What a new connection sends again, in order, with each order guard kept
/// only where the transaction it waits for is sent again before it. Any
/// other guard waits for a transaction that ran (confirmed, or shown
/// applied by the node's markers), and could hold its own back for good if
/// that marker changed since (a replayed FLUSHALL, an eviction).
pub(crate) fn drop_settled_guards<'a>(batches: impl IntoIterator<Item = &'a mut Batch>) {
    let mut resent: HashSet<(Vec<u8>, Vec<u8>)> = HashSet::new();
    for batch in batches {
        if !batch.replies.iter().any(|e| e.kind == ExpectKind::TxGuard) {
            continue;
        }
        let mut drop = vec![false; batch.len()];
        let mut i = 0;
        while i < batch.len() {
            if batch.replies[i].kind != ExpectKind::TxGuard {
                if batch.replies[i].kind == ExpectKind::TxQueued {
                    resent.extend(marker_set(batch.command_bytes(i)));
                }
                i += 1;
                continue;
            }
            let from = i;
            let mut waits = None;
            while i < batch.len() && batch.replies[i].kind == ExpectKind::TxGuard {
                waits = waits.or_else(|| {
                    with_args(batch.command_bytes(i), |args| {
                        engine::marker::parse_guard(args).map(|(k, v)| (k.to_vec(), v.to_vec()))
                    })
                });
                i += 1;
            }
            if !waits.is_some_and(|w| resent.contains(&w)) {
                drop[from..i].iter_mut().for_each(|d| *d = true);
            }
        }
        if drop.contains(&true) {
            *batch = kept(batch, &drop);
        }
    }
}

/// `batch` without its transactions whose MULTI is at one of `begins`
/// (with their order guards): what is left to send of a batch whose other
/// transactions the node applied.
pub(crate) fn without_transactions(batch: &Batch, begins: &[usize]) -> Batch {
    let mut drop = vec![false; batch.len()];
    for &begin in begins {
        let mut from = begin;
        while from > 0 && batch.replies[from - 1].kind == ExpectKind::TxGuard {
            from -= 1;
        }
        let to = (begin..batch.len())
            .find(|&i| batch.replies[i].kind == ExpectKind::TxEnd)
            .map_or(batch.len(), |i| i + 1);
        drop[from..to].iter_mut().for_each(|d| *d = true);
    }
    kept(batch, &drop)
}

/// The commands of `batch` not marked in `drop`, as a batch of their own.
fn kept(batch: &Batch, drop: &[bool]) -> Batch {
    let mut keep: Vec<Range<usize>> = Vec::new();
    for i in (0..batch.len()).filter(|&i| !drop[i]) {
        match keep.last_mut() {
            Some(r) if r.end == i => r.end = i + 1,
            _ => keep.push(i..i + 1),
        }
    }
    sub_batch(batch, &keep, None)
}

/// The marker and value of `SET <marker> <value>`, if the encoded command
/// `cmd` is that.
pub(crate) fn marker_set(cmd: &[u8]) -> Option<(Vec<u8>, Vec<u8>)> {
    with_args(cmd, |args| {
        engine::marker::parse_marker_set(args).map(|(k, v)| (k.to_vec(), v.to_vec()))
    })
}

/// `f` of the arguments of the encoded command `cmd`.
pub(crate) fn with_args<T>(cmd: &[u8], f: impl FnOnce(&[&[u8]]) -> Option<T>) -> Option<T> {
    let mut buf = BytesMut::from(cmd);
    let parsed = engine::resp::parse_command(&mut buf).ok()??;
    let args: Vec<&[u8]> = parsed.args().collect();
    f(&args)
}

/// The commands that rebuild the value of RESTORE `i` of `batch`, which the
/// target refused, for a node running `caps`, and the key; `None` when it is
/// not a RESTORE whose payload decodes, or holds a module value (then the
/// refusal stands).
pub(crate) fn rebuild_refused(
    batch: &Batch,
    i: usize,
    caps: TargetCaps,
    tmp: &mut TmpNames,
    now_ms: i64,
) -> Option<(Batch, Bytes)> {
    let mut bytes = BytesMut::from(batch.command_bytes(i));
    let cmd = engine::resp::parse_command(&mut bytes).ok()??;
    let args = engine::restore::parse_restore(&cmd, now_ms)?;
    let name = tmp.next(engine::slot::slot(&args.key));
    let rebuilt = engine::rebuild::rebuild_restore(&args, caps, || name, now_ms).ok()??;
    let mut b = BatchBuilder::default();
    for (step, bytes) in rebuilt.commands.iter() {
        b.push(None, step.into(), |buf| buf.extend_from_slice(bytes));
    }
    let mut out = b.take(batch.shard, batch.end);
    out.db = batch.db;
    Some((out, rebuilt.key))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::progress::StreamPos;

    fn batch(cmds: &[(&[&[u8]], ExpectKind)]) -> Batch {
        let mut b = BatchBuilder::default();
        for (args, kind) in cmds {
            b.push(None, *kind, |buf| encode::command(buf, args));
        }
        b.take(3, Some(StreamPos { offset: 10, db: 0 }))
    }

    fn args_of(b: &Batch) -> Vec<String> {
        (0..b.len())
            .map(|i| {
                let mut buf = BytesMut::from(b.command_bytes(i));
                let cmd = engine::resp::parse_command(&mut buf).unwrap().unwrap();
                cmd.args()
                    .map(|a| String::from_utf8_lossy(a).into_owned())
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .collect()
    }

    #[test]
    fn sub_batches_keep_order_and_can_prefix_asking() {
        let b = batch(&[
            (&[b"SET", b"a", b"1"], ExpectKind::Ok),
            (&[b"SET", b"b", b"2"], ExpectKind::Ok),
            (&[b"MULTI"], ExpectKind::TxBegin),
            (&[b"INCR", b"c"], ExpectKind::TxQueued),
            (&[b"EXEC"], ExpectKind::TxEnd),
        ]);
        let s = sub_batch(&b, &[0..1, 2..5], None);
        assert_eq!(s.len(), 4);
        assert_eq!(s.command_bytes(0), b.command_bytes(0));
        assert_eq!(s.replies[1].kind, ExpectKind::TxBegin);
        assert_eq!(s.shard, 3);
        assert_eq!(s.end, Some(StreamPos { offset: 10, db: 0 }));

        let asked = sub_batch(&b, &[0..1, 2..5], Some(b"ASKING"));
        // ASKING before a plain command, and once before a MULTI: the
        // transaction stays whole.
        let asking = &b"*1\r\n$6\r\nASKING\r\n"[..];
        let sent: Vec<&[u8]> = (0..asked.len()).map(|i| asked.command_bytes(i)).collect();
        assert_eq!(
            sent,
            [
                asking,
                b.command_bytes(0),
                asking,
                b.command_bytes(2),
                b.command_bytes(3),
                b.command_bytes(4)
            ]
        );
        let kinds: Vec<ExpectKind> = asked.replies.iter().map(|e| e.kind).collect();
        use ExpectKind::*;
        assert_eq!(kinds, [Ok, Ok, Ok, TxBegin, TxQueued, TxEnd]);
    }

    #[test]
    fn a_refused_restore_is_resent_as_its_rebuild_in_its_place() {
        let mut payload = BytesMut::from(&[0u8, 1, b'v'][..]);
        engine::rdb::finish_dump_payload(&mut payload, 11);
        let b = batch(&[
            (&[b"SET", b"a", b"1"], ExpectKind::Ok),
            (
                &[b"RESTORE", b"k", b"0", &payload, b"REPLACE"],
                ExpectKind::Ok,
            ),
            (&[b"SET", b"z", b"2"], ExpectKind::Ok),
        ]);
        let mut tmp = TmpNames::new("w0");
        let (rebuilt, key) =
            rebuild_refused(&b, 1, TargetCaps::new(6, 2), &mut tmp, 0).expect("a RESTORE");
        assert_eq!(&key[..], b"k");
        assert_eq!(args_of(&rebuilt), ["SET k v"]);
        // The first SET ran; the RESTORE was refused; the last SET did not
        // run: the rebuild goes first, in the RESTORE's place.
        let not_run = std::ops::Range { start: 2, end: 3 };
        let again = resend_batch(&b, std::slice::from_ref(&not_run), vec![(1, rebuilt)]);
        assert_eq!(args_of(&again), ["SET k v", "SET z 2"]);
        assert_eq!(again.end, b.end);
        assert!(rebuild_refused(&b, 0, TargetCaps::new(6, 2), &mut tmp, 0).is_none());
    }

    #[test]
    fn what_is_resent_of_a_cluster_batch_is_still_ours() {
        // Two slot transactions and the node-wide marker, none of which ran
        // (CLUSTERDOWN): resent as it was, still checked by its markers.
        let mut b = batch(&[
            (&[b"MULTI"], ExpectKind::TxBegin),
            (&[b"INCR", b"{a}x"], ExpectKind::TxQueued),
            (
                &[b"SET", b"{a}shardsync:applied:t:s", b"m"],
                ExpectKind::TxQueued,
            ),
            (&[b"EXEC"], ExpectKind::TxEnd),
            (&[b"MULTI"], ExpectKind::TxBegin),
            (&[b"LPUSH", b"{b}y", b"1"], ExpectKind::TxQueued),
            (
                &[b"SET", b"{b}shardsync:applied:t:s", b"m"],
                ExpectKind::TxQueued,
            ),
            (&[b"EXEC"], ExpectKind::TxEnd),
            (
                &[b"SET", b"{c}shardsync:applied:t:s:node", b"m"],
                ExpectKind::Ok,
            ),
        ]);
        b.wrapped = true;
        assert!(resend_batch(&b, &[0..4, 4..8, 8..9], Vec::new()).wrapped);
        assert!(
            resend_batch(&b, &[4..8, 8..9], Vec::new()).wrapped,
            "from the second"
        );
        assert!(
            !resend_batch(&b, std::slice::from_ref(&(8..9)), Vec::new()).wrapped,
            "the node marker alone"
        );
        assert!(
            !sub_batch(&b, std::slice::from_ref(&(0..4)), Some(b"ASKING")).wrapped,
            "an asked batch is not checked by markers"
        );
    }

    /// A slot transaction setting marker `m` to `value`, behind a guard
    /// waiting for `waits` when given.
    fn slot_tx(cmds: &mut Vec<(Vec<Vec<u8>>, ExpectKind)>, waits: Option<&str>, value: &str) {
        let m = b"{a}shardsync:applied:t:s".to_vec();
        if let Some(w) = waits {
            engine::marker::guard_commands(&m, w.as_bytes(), |cmd| {
                cmds.push((
                    cmd.iter().map(|a| a.to_vec()).collect(),
                    ExpectKind::TxGuard,
                ))
            });
        }
        cmds.push((vec![b"MULTI".to_vec()], ExpectKind::TxBegin));
        cmds.push((
            vec![b"INCR".to_vec(), b"{a}x".to_vec()],
            ExpectKind::TxQueued,
        ));
        cmds.push((
            vec![b"SET".to_vec(), m, value.as_bytes().to_vec()],
            ExpectKind::TxQueued,
        ));
        cmds.push((vec![b"EXEC".to_vec()], ExpectKind::TxEnd));
    }

    fn owned_batch(cmds: &[(Vec<Vec<u8>>, ExpectKind)]) -> Batch {
        let mut b = BatchBuilder::default();
        for (args, kind) in cmds {
            b.push(None, *kind, |buf| encode::command(buf, args));
        }
        let mut out = b.take(0, Some(StreamPos { offset: 10, db: 0 }));
        out.wrapped = true;
        out
    }

    #[test]
    fn a_guard_stays_only_behind_the_transaction_it_waits_for() {
        // Resent on a new connection: "2" waits for "1" (which ran: not
        // resent), "3" for "2", and in the next batch "4" for "3".
        let mut first = Vec::new();
        slot_tx(&mut first, Some("1"), "2");
        slot_tx(&mut first, Some("2"), "3");
        let mut second = Vec::new();
        slot_tx(&mut second, Some("3"), "4");
        let mut batches = vec![owned_batch(&first), owned_batch(&second)];
        let before = batches.clone();
        drop_settled_guards(batches.iter_mut());
        let kinds = |b: &Batch| b.replies.iter().map(|e| e.kind).collect::<Vec<_>>();
        assert_eq!(
            args_of(&batches[0])[..2],
            ["MULTI", "INCR {a}x"],
            "the guard waiting for what ran is gone"
        );
        assert_eq!(batches[0].len(), before[0].len() - 2);
        assert_eq!(
            batches[0].payload[..],
            before[0].payload[before[0].replies[2].start as usize..],
            "the rest as it was, the second guard included"
        );
        assert!(batches[0].wrapped);
        assert_eq!(
            kinds(&batches[1]),
            kinds(&before[1]),
            "its guard waits for the first batch"
        );
        assert_eq!(batches[1].payload, before[1].payload);
    }

    #[test]
    fn a_cut_inside_a_guarded_transaction_resends_it_with_its_guard() {
        let mut cmds = Vec::new();
        slot_tx(&mut cmds, None, "1");
        slot_tx(&mut cmds, Some("1"), "2");
        let b = owned_batch(&cmds);
        // Replies seen up to the second transaction's guard, or inside it.
        for k in [4, 5, 6, 8] {
            let tail = b.tail_from(k);
            assert_eq!(tail.len(), 6, "from its guard (cut at {k})");
            assert_eq!(tail.replies[0].kind, ExpectKind::TxGuard);
            assert!(tail.wrapped);
        }
    }

    #[test]
    fn what_the_node_applied_of_a_batch_is_left_out_wherever_it_is() {
        // Three slot transactions (the second behind a guard) and the
        // node-wide marker; the node applied the first and the third, not
        // the second (a refusal that came and went).
        let mut cmds = Vec::new();
        slot_tx(&mut cmds, None, "1");
        slot_tx(&mut cmds, Some("1"), "2");
        slot_tx(&mut cmds, None, "3");
        cmds.push((
            vec![
                b"SET".to_vec(),
                b"{c}shardsync:applied:t:s:node".to_vec(),
                b"0".to_vec(),
            ],
            ExpectKind::Ok,
        ));
        let b = owned_batch(&cmds);
        let rest = without_transactions(&b, &[0, 10]);
        let kinds: Vec<ExpectKind> = rest.replies.iter().map(|e| e.kind).collect();
        use ExpectKind::*;
        assert_eq!(
            kinds,
            [TxGuard, TxGuard, TxBegin, TxQueued, TxQueued, TxEnd, Ok],
            "the second with its guard, and the node marker"
        );
        assert_eq!(rest.command_bytes(0), b.command_bytes(4));
        assert!(rest.wrapped);
        let none = without_transactions(&b, &[0, 6, 10]);
        assert_eq!(args_of(&none), ["SET {c}shardsync:applied:t:s:node 0"]);
        assert!(!none.wrapped);
    }
}
