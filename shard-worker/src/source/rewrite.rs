//! Slot-respecting equivalents of commands whose keys span slots on a
//! cluster target, run by the intake itself once everything before them is
//! confirmed (a barrier), so they see the target exactly as the source was
//! when the command ran:
//!
//! - RENAME/RENAMENX across slots: DUMP the source key, RESTORE it (with its
//!   TTL) under the new name, DEL the old one; COPY the same without the DEL;
//! - LMOVE/RPOPLPUSH across slots: pop from one list, push the element onto
//!   the other;
//! - a command that writes one slot and reads others (SUNIONSTORE, BITOP,
//!   PFMERGE, COPY, SORT ... STORE, ...): copy the keys it reads next to the
//!   key it writes, under temporary names (with a short TTL, in case we die
//!   half-way), run it there with those names, delete the copies.
//!
//! With markers (exactly-once), each write of a rewrite is a transaction
//! in its slot that also sets the slot's marker to the position after the
//! command ([`Marks`]), and what a slot already applied (after a restart)
//! is not written again. The steps are ordered so that whatever prefix of
//! them ran, the rest can still be done: a list move pushes a copy of the
//! element first and pops it after; a rename restores under the new name
//! first and deletes the old one after.

use std::collections::HashMap;
use std::sync::Arc;

use engine::cluster::{parse_redirect, Redirect};
use engine::resp::{Command, Frame};
use engine::slot::slot;
use engine::split::{colocated_name, with_args_replaced, Plan};

use crate::conn::Conn;
use crate::error::WorkerError;
use crate::route::ClusterRouting;

/// How long temporary copies live if nobody deletes them.
const TEMP_TTL_MS: &str = "60000";
/// Redirections followed for one request before giving up.
const MAX_REDIRECTS: usize = 5;

/// Request/response connections to target nodes, opened on first use.
pub(crate) struct TargetControl {
    routing: Arc<ClusterRouting>,
    conns: HashMap<String, Conn>,
    /// Keeps our temporary names apart from other shards'.
    scope: String,
}

/// Exactly-once for one rewrite: how its writes are marked.
pub(crate) struct Marks {
    /// The shard's marker key, to put in a slot (`engine::marker::in_slot`).
    pub base: bytes::Bytes,
    /// The marker value: the position after the rewritten command.
    pub value: Vec<u8>,
    /// Slots that already hold this rewrite's write (after a restart).
    pub applied: Vec<u16>,
}

/// What a rewrite did.
pub(crate) enum Outcome {
    Done,
    /// The target did not hold what the source had (it diverged); nothing
    /// was changed. The reason is logged by the caller.
    Diverged(String),
}

impl TargetControl {
    pub fn new(routing: Arc<ClusterRouting>, scope: String) -> TargetControl {
        TargetControl {
            routing,
            conns: HashMap::new(),
            scope,
        }
    }

    /// Runs one command on the master serving `slot`, following MOVED (and
    /// correcting the shared map) and ASK.
    async fn call(&mut self, slot: u16, args: &[&[u8]]) -> Result<Frame, WorkerError> {
        let mut w = self.routing.writer_for_slot(slot);
        let mut asking = false;
        for _ in 0..MAX_REDIRECTS {
            let conn = self.conn(w, slot).await?;
            if asking {
                conn.request(&["ASKING"]).await?;
            }
            let reply = conn.request(args).await?;
            let Frame::Error(e) = &reply else {
                return Ok(reply);
            };
            match parse_redirect(&String::from_utf8_lossy(e)) {
                Some(Redirect::Moved { slot, host, port }) => {
                    let Some(next) = self.routing.writer_for_node(&host, port).await else {
                        return Ok(reply);
                    };
                    self.routing.move_slot(slot, next);
                    w = next;
                    asking = false;
                }
                Some(Redirect::Ask { host, port, .. }) => {
                    let Some(next) = self.routing.writer_for_node(&host, port).await else {
                        return Ok(reply);
                    };
                    w = next;
                    asking = true;
                }
                None => {
                    if let Some(err) = WorkerError::from_reply(&conn.addr, e) {
                        return Err(err);
                    }
                    return Ok(reply);
                }
            }
        }
        Err(WorkerError::Unexpected {
            addr: format!("slot {slot}"),
            context: "running a rewritten command",
            reply: format!("redirected more than {MAX_REDIRECTS} times"),
        })
    }

    /// Runs the equivalent of `cmd` described by `plan`, its writes marked
    /// with `marks` when given.
    pub async fn run(
        &mut self,
        plan: &Plan,
        cmd: &Command,
        marks: Option<&Marks>,
    ) -> Result<Outcome, WorkerError> {
        match plan {
            Plan::Rename { src, dst } => self.rename(src, dst, true, marks).await,
            Plan::Copy { src, dst } => self.rename(src, dst, false, marks).await,
            Plan::ListMove {
                src,
                dst,
                pop_left,
                push_left,
            } => {
                let pop: &[u8] = if *pop_left { b"LPOP" } else { b"RPOP" };
                let push: &[u8] = if *push_left { b"LPUSH" } else { b"RPUSH" };
                let end: &[u8] = if *pop_left { b"0" } else { b"-1" };
                if !applied(marks, slot(dst)) {
                    // A copy of the element first, the pop after: if only
                    // the push ran, the pop is what is left to do.
                    match self.call(slot(src), &[b"LINDEX", src, end]).await? {
                        Frame::Bulk(element) => {
                            let pushed =
                                self.write(slot(dst), &[push, dst, &element], marks).await?;
                            if let Outcome::Diverged(why) = pushed {
                                return Ok(Outcome::Diverged(why));
                            }
                        }
                        other => {
                            return Ok(Outcome::Diverged(format!(
                                "the list to pop from was empty on the target ({})",
                                other.to_text()
                            )))
                        }
                    }
                }
                self.write(slot(src), &[pop, src], marks).await
            }
            Plan::Colocate { anchor, copy } => self.colocate(*anchor, copy, cmd, marks).await,
            _ => Ok(Outcome::Diverged("not a rewrite".into())),
        }
    }

    /// A write of a rewrite in `slot`: with markers, one transaction with
    /// the slot's marker, or nothing when the slot has it already.
    async fn write(
        &mut self,
        slot: u16,
        args: &[&[u8]],
        marks: Option<&Marks>,
    ) -> Result<Outcome, WorkerError> {
        let Some(m) = marks else {
            return self.must(slot, args).await;
        };
        if m.applied.contains(&slot) {
            return Ok(Outcome::Done);
        }
        let key = engine::marker::in_slot(&m.base, slot);
        let replies = self
            .pipeline_in(
                slot,
                &[
                    vec![&b"MULTI"[..]],
                    args.to_vec(),
                    vec![&b"SET"[..], &key, &m.value],
                    vec![&b"EXEC"[..]],
                ],
            )
            .await?;
        match replies.last() {
            Some(Frame::Array(results)) => match results.first() {
                Some(Frame::Error(e)) => Ok(Outcome::Diverged(format!(
                    "the target refused a step: {}",
                    String::from_utf8_lossy(e)
                ))),
                _ => Ok(Outcome::Done),
            },
            other => {
                let text = other.map(Frame::to_text).unwrap_or_default();
                if let Some(err) = WorkerError::from_reply(&format!("slot {slot}"), text.as_bytes())
                {
                    return Err(err);
                }
                Err(WorkerError::Unexpected {
                    addr: format!("slot {slot}"),
                    context: "running a marked step of a rewrite",
                    reply: text,
                })
            }
        }
    }

    /// Several commands in one round trip on the master serving `slot` (no
    /// redirection: a slot moving during a rewrite fails it, and the shard
    /// starts again from its markers).
    async fn pipeline_in(
        &mut self,
        slot: u16,
        commands: &[Vec<&[u8]>],
    ) -> Result<Vec<Frame>, WorkerError> {
        let w = self.routing.writer_for_slot(slot);
        self.conn(w, slot).await?.pipeline(commands).await
    }

    /// The connection to writer `w`'s node (for `slot`), opened on first
    /// use.
    async fn conn(&mut self, w: usize, slot: u16) -> Result<&mut Conn, WorkerError> {
        let endpoint = self
            .routing
            .endpoint(w)
            .ok_or_else(|| WorkerError::Unexpected {
                addr: format!("slot {slot}"),
                context: "routing a rewritten command",
                reply: "no writer serves this slot".into(),
            })?;
        let target = endpoint.addr();
        if !self.conns.contains_key(&target) {
            let conn = Conn::open_authenticated(&endpoint).await?;
            self.conns.insert(target.clone(), conn);
        }
        Ok(self.conns.get_mut(&target).expect("just inserted"))
    }

    /// Moves (`remove_src`) or copies the value and TTL of `src` to `dst`.
    async fn rename(
        &mut self,
        src: &[u8],
        dst: &[u8],
        remove_src: bool,
        marks: Option<&Marks>,
    ) -> Result<Outcome, WorkerError> {
        if applied(marks, slot(dst)) {
            // The new name was written before a restart: what is left is
            // the old one's deletion.
            if remove_src {
                return self.write(slot(src), &[b"DEL", src], marks).await;
            }
            return Ok(Outcome::Done);
        }
        let payload = match self.call(slot(src), &[b"DUMP", src]).await? {
            Frame::Bulk(p) => p,
            _ if !remove_src => {
                return Ok(Outcome::Diverged(
                    "the key to copy does not exist on the target".into(),
                ))
            }
            _ => {
                // Already renamed (a replay after a reconnection) or diverged.
                let exists = self.call(slot(dst), &[b"EXISTS", dst]).await?;
                return Ok(if exists == Frame::Integer(1) {
                    Outcome::Done
                } else {
                    Outcome::Diverged("the key to rename does not exist on the target".into())
                });
            }
        };
        let ttl = match self.call(slot(src), &[b"PTTL", src]).await? {
            Frame::Integer(ms) if ms > 0 => ms.to_string(),
            _ => "0".to_string(),
        };
        if let Outcome::Diverged(why) = self
            .write(
                slot(dst),
                &[b"RESTORE", dst, ttl.as_bytes(), &payload, b"REPLACE"],
                marks,
            )
            .await?
        {
            return Ok(Outcome::Diverged(why));
        }
        if remove_src {
            self.write(slot(src), &[b"DEL", src], marks).await?;
        }
        Ok(Outcome::Done)
    }

    async fn colocate(
        &mut self,
        anchor: u16,
        copy: &[usize],
        cmd: &Command,
        marks: Option<&Marks>,
    ) -> Result<Outcome, WorkerError> {
        if applied(marks, anchor) {
            return Ok(Outcome::Done);
        }
        let mut names = Vec::with_capacity(copy.len());
        for (n, &pos) in copy.iter().enumerate() {
            let name = colocated_name(anchor, &self.scope, n as u64);
            let key = cmd.arg(pos);
            match self.call(slot(key), &[b"DUMP", key]).await? {
                Frame::Bulk(payload) => {
                    let restored = self
                        .must(
                            anchor,
                            &[
                                b"RESTORE",
                                &name,
                                TEMP_TTL_MS.as_bytes(),
                                &payload,
                                b"REPLACE",
                            ],
                        )
                        .await?;
                    if let Outcome::Diverged(why) = restored {
                        return Ok(Outcome::Diverged(why));
                    }
                }
                // A key that does not exist reads as empty: so does a
                // temporary name that does not exist.
                _ => {
                    self.call(anchor, &[b"DEL", &name]).await?;
                }
            }
            names.push(name);
        }
        let rewritten = with_args_replaced(cmd, copy, &names);
        let args: Vec<&[u8]> = rewritten.args().collect();
        let outcome = self.write(anchor, &args, marks).await?;
        let mut del: Vec<&[u8]> = vec![b"DEL"];
        del.extend(names.iter().map(Vec::as_slice));
        self.call(anchor, &del).await?;
        Ok(outcome)
    }

    /// Runs a step that must succeed; an error reply means the target
    /// diverged from the source for this key.
    async fn must(&mut self, slot: u16, args: &[&[u8]]) -> Result<Outcome, WorkerError> {
        match self.call(slot, args).await? {
            Frame::Error(e) => Ok(Outcome::Diverged(format!(
                "the target refused a step: {}",
                String::from_utf8_lossy(&e)
            ))),
            _ => Ok(Outcome::Done),
        }
    }
}

/// Whether `slot` already holds the rewrite's write (after a restart).
fn applied(marks: Option<&Marks>, slot: u16) -> bool {
    marks.is_some_and(|m| m.applied.contains(&slot))
}

/// The slots a rewrite writes.
pub(crate) fn written_slots(plan: &Plan) -> Vec<u16> {
    match plan {
        Plan::Rename { src, dst } | Plan::Copy { src, dst } | Plan::ListMove { src, dst, .. } => {
            vec![slot(src), slot(dst)]
        }
        Plan::Colocate { anchor, .. } => vec![*anchor],
        _ => Vec::new(),
    }
}
