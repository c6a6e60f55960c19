//! What a batch's replies say, decided without IO: each error reply is
//! classified ([`classify`]), and the replies of one batch, in order, make a
//! [`Verdict`]: which commands ran, which must go to another node
//! (MOVED/ASK), which did not run and are resent on the next connection,
//! and which RESTOREs are replaced by rebuilt commands.
//!
//! A transaction is judged whole: its commands ran only once its EXEC reply
//! is in, a redirect of any of its commands redirects all of it, and a
//! command of it that did not run means none of it ran.

use std::ops::Range;

use engine::cluster::{parse_redirect, Redirect};

use super::Batch;
use crate::error::{Recovery, WorkerError};
use crate::route::ExpectKind;

/// What one error reply means.
#[derive(Debug)]
pub(crate) enum Class {
    /// BUSYKEY to a RESTORE without REPLACE: the target kept its key.
    KeptExisting,
    /// FUNCTION LOAD without REPLACE found the library: the target kept it.
    KeptFunction,
    /// EXEC refused the transaction because a queued command was refused.
    ExecAbort,
    /// The target cannot read a RESTORE payload (a newer server wrote it).
    RefusedPayload,
    /// The command did not run here: its slot is served elsewhere.
    Redirect(Redirect),
    /// The command did not run, and the connection cannot go on (LOADING,
    /// READONLY, ...): resend it on the next one.
    NotRun(WorkerError),
    /// Waiting cannot help (NOAUTH, NOPERM, OOM).
    Fatal(WorkerError),
    /// An error that concerns this command alone (WRONGTYPE, ERR ...):
    /// counted by `code` and logged; the stream goes on.
    Failed { code: String },
}

/// Classifies the error reply `text` to a command that expected `kind`,
/// from node `addr`.
pub(crate) fn classify(addr: &str, kind: ExpectKind, text: &str) -> Class {
    let code = text.split(' ').next().unwrap_or("ERR");
    match kind {
        ExpectKind::KeepExisting if code == "BUSYKEY" => return Class::KeptExisting,
        ExpectKind::KeepExistingFunction if text.contains("already exists") => {
            return Class::KeptFunction
        }
        ExpectKind::TxEnd if code == "EXECABORT" => return Class::ExecAbort,
        ExpectKind::Ok | ExpectKind::KeepExisting
            if text.starts_with("ERR DUMP payload version or checksum are wrong")
                || text.starts_with("ERR Bad data format") =>
        {
            return Class::RefusedPayload
        }
        _ => {}
    }
    if let Some(redirect) = parse_redirect(text) {
        return Class::Redirect(redirect);
    }
    match WorkerError::from_reply(addr, text.as_bytes()) {
        Some(err) if err.recovery() == Recovery::Fatal => Class::Fatal(err),
        Some(err) => Class::NotRun(err),
        None => Class::Failed { code: code.into() },
    }
}

/// What became of one command, as the verdict counts it.
#[derive(Debug)]
pub(crate) enum Outcome {
    /// It ran.
    Ran,
    /// It was refused for itself (WRONGTYPE, a syntax error: counted and
    /// logged); in a transaction, refused when queued.
    Refused,
    Redirect(Redirect),
    /// EXEC's refusal of a transaction.
    ExecAbort,
    /// It did not run; resend it.
    NotRun,
    /// EXEC's nil reply: the transaction's order guard held it back (the
    /// transaction before it in its slot did not run); resend it.
    Discarded,
    /// A refused RESTORE, replaced by these commands (resent like
    /// [`Outcome::NotRun`]).
    Rebuilt(Batch),
}

/// The replies of one batch, in order.
#[derive(Default, Debug)]
pub(crate) struct Verdict {
    /// The batch is one of our transactions (`Batch::wrapped`).
    wrapped: bool,
    /// Of a wrapped batch whose EXEC was refused because the target refused
    /// some of its commands when they were queued: those commands, to be
    /// left out when the rest of their transaction is sent again.
    pub left_out: Vec<usize>,
    /// The transactions (index ranges, MULTI to EXEC) those belong to.
    partial: Vec<Range<usize>>,
    /// Commands of the open transaction refused when queued.
    tx_refused: Vec<usize>,
    /// Refused RESTOREs (by index) and the commands that replace them.
    pub rebuilt: Vec<(usize, Batch)>,
    /// Commands (index ranges) to send to another node instead.
    pub redirects: Vec<(Range<usize>, Redirect)>,
    /// Commands that did not run (retryable error), as index ranges.
    pub not_run: Vec<Range<usize>>,
    /// Commands known to have run: up to the first one that did not, and
    /// a transaction only once its EXEC reply is in.
    pub ran: usize,
    stuck: bool,
    /// A transaction of the batch's shard did not run, earlier on this
    /// connection (in this batch or before it).
    pub chain_broken: bool,
    /// A transaction whose order guard was refused (so it could not hold
    /// the transaction back) ran while `chain_broken`: it may have run
    /// ahead of the one before it in its slot.
    pub reordered: bool,
    /// A transaction was asked to another node for some of its commands
    /// and queued here for others (a slot migration holds its keys on
    /// both): it did not run, and is sent here again.
    pub split: bool,
    /// Where the next transaction's order guard begins, and whether a
    /// command of it was refused.
    guard_from: Option<usize>,
    guard_refused: bool,
    /// Where the open transaction begins when resent: its guard, else its
    /// MULTI.
    tx_from: usize,
    /// The open transaction's MULTI, and what became of it so far.
    tx_open: Option<usize>,
    tx_redirect: Option<Redirect>,
    tx_not_run: bool,
    /// A command of the open transaction was queued here (its keys are on
    /// this node).
    tx_queued: bool,
}

impl Verdict {
    /// The verdict of a batch; `wrapped` when it is one of our
    /// transactions.
    pub fn new(wrapped: bool) -> Verdict {
        Verdict {
            wrapped,
            ..Verdict::default()
        }
    }

    /// The verdict of a batch of a shard whose chain of transactions is
    /// already broken on this connection (see [`Verdict::chain_broken`]).
    pub fn after_break(mut self, broken: bool) -> Verdict {
        self.chain_broken = broken;
        self
    }

    /// Reply `i`, to a command of `kind`, said `outcome`.
    #[inline]
    pub fn reply(&mut self, i: usize, kind: ExpectKind, outcome: Outcome) {
        // Nearly every reply: a plain command that ran, nothing pending.
        if kind == ExpectKind::Ok
            && matches!(outcome, Outcome::Ran)
            && !self.stuck
            && self.tx_open.is_none()
        {
            self.ran = i + 1;
            return;
        }
        if kind == ExpectKind::TxGuard {
            return self.guard_reply(i, &outcome);
        }
        if kind == ExpectKind::TxBegin {
            self.tx_open = Some(i);
            self.tx_from = self.guard_from.take().unwrap_or(i);
            self.tx_redirect = None;
            self.tx_not_run = false;
            self.tx_queued = false;
            self.tx_refused.clear();
        }
        if kind == ExpectKind::TxQueued && matches!(outcome, Outcome::Ran) {
            self.tx_queued = true;
        }
        let in_tx = self.tx_open.is_some();
        let did_not_run = match outcome {
            Outcome::Ran => false,
            Outcome::Refused => {
                if in_tx {
                    self.tx_refused.push(i);
                }
                false
            }
            // Our own transaction refused for some of its commands: the
            // others must run (as they would have without the transaction).
            Outcome::ExecAbort
                if self.wrapped
                    && self.tx_redirect.is_none()
                    && !self.tx_not_run
                    && !self.tx_refused.is_empty() =>
            {
                self.left_out.append(&mut self.tx_refused);
                if self.tx_open.is_some() {
                    // With its guard: what is resent still waits its turn.
                    self.partial.push(self.tx_from..i + 1);
                }
                true
            }
            Outcome::Redirect(r) if in_tx => {
                self.tx_redirect = Some(r);
                true
            }
            Outcome::Redirect(r) => {
                self.redirects.push((i..i + 1, r));
                true
            }
            Outcome::ExecAbort => self.tx_redirect.is_some() || self.tx_not_run,
            Outcome::NotRun | Outcome::Discarded if in_tx => {
                self.tx_not_run = true;
                true
            }
            Outcome::NotRun | Outcome::Discarded => {
                self.not_run.push(i..i + 1);
                true
            }
            Outcome::Rebuilt(batch) => {
                self.rebuilt.push((i, batch));
                true
            }
        };
        if kind == ExpectKind::TxEnd {
            self.end_tx(i, did_not_run);
        }
        self.stuck |= did_not_run || self.tx_redirect.is_some() || self.tx_not_run;
        if !self.stuck && self.tx_open.is_none() {
            self.ran = i + 1;
        }
    }

    /// A reply to the order guard before a transaction. Its errors hold
    /// nothing back: the EXEC reply says whether the transaction ran.
    fn guard_reply(&mut self, i: usize, outcome: &Outcome) {
        if self.guard_from.is_none() {
            self.guard_from = Some(i);
            self.guard_refused = false;
        }
        self.guard_refused |= !matches!(outcome, Outcome::Ran);
    }

    /// The open transaction's EXEC reply (at `i`) is in; `did_not_run`
    /// when it refused the transaction.
    fn end_tx(&mut self, i: usize, did_not_run: bool) {
        let Some(begin) = self.tx_open.take() else {
            return;
        };
        let split = matches!(self.tx_redirect, Some(Redirect::Ask { .. })) && self.tx_queued;
        if split {
            // ASK for some commands, QUEUED for others: the slot is being
            // migrated and its keys are on both nodes, so the transaction can
            // run on neither (the importing node refuses it with TRYAGAIN,
            // and its commands one by one would create keys there that still
            // exist here). It is sent here again, as TRYAGAIN would be, until
            // they are together.
            self.tx_redirect = None;
            self.not_run.push(self.tx_from..i + 1);
            self.chain_broken = true;
            self.split = true;
        } else if let Some(r) = self.tx_redirect.take() {
            // Redirected without its guard: the other node holds nothing it
            // could wait for.
            self.redirects.push((begin..i + 1, r));
            self.chain_broken = true;
        } else if self.tx_not_run {
            self.not_run.push(self.tx_from..i + 1);
            self.chain_broken = true;
        } else if did_not_run {
            // Refused for some of its commands: resent without them.
            self.chain_broken = true;
        } else if self.guard_refused && self.chain_broken {
            self.reordered = true;
        }
        self.tx_not_run = false;
        self.tx_queued = false;
        self.guard_refused = false;
    }

    /// Whether this connection must end so that what did not run (and the
    /// rebuilt commands) go out first on the next one.
    pub fn must_resend(&self) -> bool {
        !self.not_run.is_empty() || !self.rebuilt.is_empty() || !self.left_out.is_empty()
    }

    /// What to send again of a batch of `len` commands: the commands that
    /// did not run, and of a transaction refused for some of its commands,
    /// all the others. Index ranges, in order.
    pub fn take_resend(&mut self) -> Vec<Range<usize>> {
        let mut ranges = std::mem::take(&mut self.not_run);
        ranges.extend(self.redirects.drain(..).map(|(r, _)| r));
        for tx in std::mem::take(&mut self.partial) {
            let mut from = tx.start;
            for &i in self.left_out.iter().filter(|i| tx.contains(i)) {
                if i > from {
                    ranges.push(from..i);
                }
                from = i + 1;
            }
            if from < tx.end {
                ranges.push(from..tx.end);
            }
        }

        ranges.sort_by_key(|r| r.start);
        ranges
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BytesMut;
    use engine::resp::scan_reply;
    use ExpectKind::{Ok as Plain, TxBegin, TxEnd, TxGuard, TxQueued};

    /// Scans `replies` (RESP bytes) against `kinds` and returns the verdict;
    /// error replies are classified, and a refused payload counts as not
    /// run (its rebuild is tested in `resend.rs`).
    fn judge(kinds: &[ExpectKind], replies: &[u8]) -> Verdict {
        judge_as(false, kinds, replies)
    }

    fn judge_as(wrapped: bool, kinds: &[ExpectKind], replies: &[u8]) -> Verdict {
        judge_with(Verdict::new(wrapped), kinds, replies)
    }

    fn judge_with(mut v: Verdict, kinds: &[ExpectKind], replies: &[u8]) -> Verdict {
        let mut buf = BytesMut::from(replies);
        for (i, &kind) in kinds.iter().enumerate() {
            if kind == TxEnd && buf.starts_with(b"*-1\r\n") {
                let _ = buf.split_to(5);
                v.reply(i, kind, Outcome::Discarded);
                continue;
            }
            let scan = scan_reply(&buf).unwrap().expect("a whole reply");
            let error = scan
                .error
                .map(|r| String::from_utf8_lossy(&buf[r]).into_owned());
            let _ = buf.split_to(scan.len);
            let outcome = match error.map(|t| classify("t:1", kind, &t)) {
                None | Some(Class::KeptExisting | Class::KeptFunction) => Outcome::Ran,
                Some(Class::Failed { .. }) => Outcome::Refused,
                Some(Class::ExecAbort) => Outcome::ExecAbort,
                Some(Class::Redirect(r)) => Outcome::Redirect(r),
                Some(Class::NotRun(_) | Class::RefusedPayload) => Outcome::NotRun,
                Some(Class::Fatal(e)) => panic!("fatal: {e}"),
            };
            v.reply(i, kind, outcome);
        }
        assert!(buf.is_empty(), "every reply read");
        v
    }

    type Pairs = Vec<(usize, usize)>;

    /// (redirected, not run) ranges as (start, end) pairs.
    fn ranges(v: &Verdict) -> (Pairs, Pairs) {
        (
            v.redirects.iter().map(|(r, _)| (r.start, r.end)).collect(),
            v.not_run.iter().map(|r| (r.start, r.end)).collect(),
        )
    }

    #[test]
    fn plain_successes_all_ran() {
        let v = judge(&[Plain, Plain], b"+OK\r\n:1\r\n");
        assert_eq!(v.ran, 2);
        assert!(!v.must_resend());
    }

    #[test]
    fn an_error_about_one_command_does_not_stop_the_batch() {
        let v = judge(
            &[Plain, Plain],
            b"-WRONGTYPE Operation against a key holding the wrong kind of value\r\n+OK\r\n",
        );
        assert_eq!(v.ran, 2);
        assert_eq!(ranges(&v), (vec![], vec![]));
    }

    #[test]
    fn a_moved_command_is_redirected_and_holds_back_what_ran() {
        let v = judge(
            &[Plain, Plain, Plain],
            b"+OK\r\n-MOVED 3999 127.0.0.1:7001\r\n+OK\r\n",
        );
        assert_eq!(ranges(&v), (vec![(1, 2)], vec![]));
        assert_eq!(v.ran, 1, "known to have run: up to the redirect");
        assert!(!v.must_resend(), "redirects go to another writer");
    }

    #[test]
    fn a_redirect_inside_a_transaction_redirects_all_of_it() {
        let v = judge(
            &[Plain, TxBegin, TxQueued, TxQueued, TxEnd],
            b"+OK\r\n+OK\r\n-MOVED 12 127.0.0.1:7002\r\n+QUEUED\r\n-EXECABORT Transaction discarded because of previous errors.\r\n",
        );
        assert_eq!(ranges(&v), (vec![(1, 5)], vec![]));
        assert_eq!(v.ran, 1);
    }

    #[test]
    fn a_transaction_asked_away_for_some_keys_only_is_sent_here_again() {
        // The migrating node has `{a}x` (queued) but no longer `{a}y`
        // (ASK): the keys are on two nodes, the transaction runs on
        // neither. Nothing is redirected; it is sent again here.
        let kinds = [Plain, TxBegin, TxQueued, TxQueued, TxEnd];
        let split = judge_as(
            true,
            &kinds,
            b"+OK\r\n+OK\r\n+QUEUED\r\n-ASK 12 127.0.0.1:7002\r\n-EXECABORT Transaction discarded because of previous errors.\r\n",
        );
        assert_eq!(ranges(&split), (vec![], vec![(1, 5)]));
        assert!(split.split && split.chain_broken && split.must_resend());
        assert_eq!(split.ran, 1);
        // Every command asked away: the whole transaction goes there.
        let asked = judge_as(
            true,
            &kinds,
            b"+OK\r\n+OK\r\n-ASK 12 127.0.0.1:7002\r\n-ASK 12 127.0.0.1:7002\r\n-EXECABORT Transaction discarded because of previous errors.\r\n",
        );
        assert_eq!(ranges(&asked), (vec![(1, 5)], vec![]));
        assert!(!asked.split && !asked.must_resend());
        // MOVED is for the whole slot: redirected even beside a keyless
        // command that was queued.
        let moved = judge_as(
            true,
            &kinds,
            b"+OK\r\n+OK\r\n+QUEUED\r\n-MOVED 12 127.0.0.1:7002\r\n-EXECABORT Transaction discarded because of previous errors.\r\n",
        );
        assert_eq!(ranges(&moved), (vec![(1, 5)], vec![]));
    }

    #[test]
    fn the_importing_node_refusing_an_asked_transaction_sends_it_again() {
        // ASKING, MULTI, two commands, EXEC: the importing node lacks one
        // of the keys (TRYAGAIN at EXEC).
        let v = judge(
            &[Plain, TxBegin, TxQueued, TxQueued, TxEnd],
            b"+OK\r\n+OK\r\n+QUEUED\r\n+QUEUED\r\n-TRYAGAIN Multiple keys request during rehashing of slot\r\n",
        );
        assert_eq!(ranges(&v), (vec![], vec![(1, 5)]));
        assert!(v.must_resend() && !v.split);
    }

    #[test]
    fn execabort_of_a_transaction_we_caused_counts_as_ran() {
        // A queued command refused for itself (syntax): the source's own
        // transaction would have been refused the same way.
        let v = judge(
            &[TxBegin, TxQueued, TxEnd],
            b"+OK\r\n-ERR wrong number of arguments\r\n-EXECABORT Transaction discarded because of previous errors.\r\n",
        );
        assert_eq!(ranges(&v), (vec![], vec![]));
        assert_eq!(v.ran, 3);
    }

    #[test]
    fn a_loading_target_did_not_run_the_command() {
        let v = judge(
            &[Plain, Plain, Plain],
            b"+OK\r\n-LOADING Redis is loading the dataset in memory\r\n+OK\r\n",
        );
        assert_eq!(ranges(&v), (vec![], vec![(1, 2)]));
        assert!(v.must_resend());
        assert_eq!(v.ran, 1);
    }

    #[test]
    fn a_command_that_did_not_run_inside_a_transaction_resends_all_of_it() {
        let v = judge(
            &[TxBegin, TxQueued, TxEnd, Plain],
            b"+OK\r\n-READONLY You can't write against a read only replica.\r\n-EXECABORT x\r\n+OK\r\n",
        );
        assert_eq!(ranges(&v), (vec![], vec![(0, 3)]));
        assert_eq!(v.ran, 0);
    }

    #[test]
    fn our_transaction_refused_for_some_commands_is_sent_again_without_them() {
        // MULTI, SET, a command the target does not know, the marker, EXEC.
        let kinds = [TxBegin, TxQueued, TxQueued, TxQueued, TxEnd];
        let replies = b"+OK\r\n+QUEUED\r\n-ERR unknown command 'NEWCMD'\r\n+QUEUED\r\n-EXECABORT Transaction discarded because of previous errors.\r\n";
        let mut v = judge_as(true, &kinds, replies);
        assert!(v.must_resend());
        assert_eq!(v.left_out, [2]);
        assert_eq!(v.ran, 0, "nothing of it ran");
        let again: Vec<(usize, usize)> = v.take_resend().iter().map(|r| (r.start, r.end)).collect();
        assert_eq!(again, [(0, 2), (3, 5)]);
        // The same replies to a source's own transaction: it would have been
        // refused on the source too, so nothing is sent again.
        let v = judge_as(false, &kinds, replies);
        assert!(!v.must_resend());
        assert_eq!(v.ran, 5);
    }

    #[test]
    fn a_transaction_counts_as_run_only_at_its_exec() {
        let mut v = Verdict::default();
        v.reply(0, TxBegin, Outcome::Ran);
        v.reply(1, TxQueued, Outcome::Ran);
        assert_eq!(v.ran, 0);
        v.reply(2, TxEnd, Outcome::Ran);
        assert_eq!(v.ran, 3);
    }

    #[test]
    fn classes_of_error_replies() {
        assert!(matches!(
            classify(
                "t:1",
                ExpectKind::KeepExisting,
                "BUSYKEY Target key name already exists."
            ),
            Class::KeptExisting
        ));
        assert!(matches!(
            classify(
                "t:1",
                ExpectKind::Ok,
                "BUSYKEY Target key name already exists."
            ),
            Class::Failed { .. }
        ));
        assert!(matches!(
            classify(
                "t:1",
                ExpectKind::KeepExistingFunction,
                "ERR Library 'lib' already exists"
            ),
            Class::KeptFunction
        ));
        assert!(matches!(
            classify(
                "t:1",
                ExpectKind::Ok,
                "ERR DUMP payload version or checksum are wrong"
            ),
            Class::RefusedPayload
        ));
        assert!(matches!(
            classify("t:1", ExpectKind::Ok, "ASK 7 127.0.0.1:7003"),
            Class::Redirect(Redirect::Ask { .. })
        ));
        assert!(matches!(
            classify(
                "t:1",
                ExpectKind::Ok,
                "OOM command not allowed when used memory > 'maxmemory'."
            ),
            Class::Fatal(_)
        ));
        assert!(matches!(
            classify("t:1", ExpectKind::Ok, "NOPERM this user has no permissions"),
            Class::Fatal(_)
        ));
        match classify("t:1", ExpectKind::Ok, "WRONGTYPE Operation against a key") {
            Class::Failed { code } => assert_eq!(code, "WRONGTYPE"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn of_several_slot_transactions_only_the_refused_one_is_sent_again() {
        // A cluster batch: two slot transactions, the second refused for an
        // unknown command, then the node-wide marker.
        let kinds = [
            TxBegin, TxQueued, TxQueued, TxEnd, TxBegin, TxQueued, TxQueued, TxQueued, TxEnd, Plain,
        ];
        let replies = b"+OK\r\n+QUEUED\r\n+QUEUED\r\n*2\r\n:1\r\n+OK\r\n\
            +OK\r\n+QUEUED\r\n-ERR unknown command 'NEWCMD'\r\n+QUEUED\r\n-EXECABORT Transaction discarded because of previous errors.\r\n\
            +OK\r\n";
        let mut v = judge_as(true, &kinds, replies);
        assert!(v.must_resend());
        assert_eq!(v.left_out, [6]);
        assert_eq!(v.ran, 4, "the first transaction ran");
        let again: Vec<(usize, usize)> = v.take_resend().iter().map(|r| (r.start, r.end)).collect();
        assert_eq!(
            again,
            [(4, 6), (7, 9)],
            "the second one without the refused command"
        );
    }

    /// A guarded transaction: WATCH, the guard script, MULTI, two commands
    /// (one the marker's SET), EXEC.
    const GUARDED: [ExpectKind; 6] = [TxGuard, TxGuard, TxBegin, TxQueued, TxQueued, TxEnd];

    #[test]
    fn a_transaction_its_guard_held_back_is_resent_with_its_guard() {
        let v = judge_as(
            true,
            &GUARDED,
            b"+OK\r\n$-1\r\n+OK\r\n+QUEUED\r\n+QUEUED\r\n*-1\r\n",
        );
        assert!(v.must_resend());
        assert_eq!(ranges(&v), (vec![], vec![(0, 6)]), "guard included");
        assert_eq!(v.ran, 0);
        assert!(v.chain_broken && !v.reordered);
    }

    #[test]
    fn a_refused_guard_decides_nothing_the_exec_reply_does() {
        let refused_guard_ran = b"-CLUSTERDOWN The cluster is down\r\n\
            -CLUSTERDOWN The cluster is down\r\n+OK\r\n+QUEUED\r\n+QUEUED\r\n*2\r\n:1\r\n+OK\r\n";
        let v = judge_as(true, &GUARDED, refused_guard_ran);
        assert!(!v.must_resend(), "it ran: not sent again");
        assert_eq!(v.ran, 6);
        assert!(!v.reordered, "nothing before it failed on this connection");

        let v = judge_with(
            Verdict::new(true).after_break(true),
            &GUARDED,
            refused_guard_ran,
        );
        assert!(!v.must_resend());
        assert!(
            v.reordered,
            "it may have run ahead of the one that did not run"
        );
    }

    #[test]
    fn a_transaction_refused_earlier_in_the_batch_breaks_the_chain() {
        // The first transaction refused (CLUSTERDOWN while queued), then a
        // guarded one whose guard was refused but which ran: out of order.
        let mut kinds = vec![TxBegin, TxQueued, TxEnd];
        kinds.extend(GUARDED);
        let replies = b"+OK\r\n-CLUSTERDOWN The cluster is down\r\n\
            -EXECABORT Transaction discarded because of previous errors.\r\n\
            -CLUSTERDOWN The cluster is down\r\n-CLUSTERDOWN The cluster is down\r\n\
            +OK\r\n+QUEUED\r\n+QUEUED\r\n*2\r\n:1\r\n+OK\r\n";
        let v = judge_as(true, &kinds, replies);
        assert_eq!(ranges(&v), (vec![], vec![(0, 3)]));
        assert!(v.reordered);
    }
}
