//! Units as sends.
//!
//! On a standalone target a unit goes to its target database. On a cluster
//! target `crate::split` plans each command: whole to its slot's owner,
//! split into per-slot parts, or rewritten into a slot-respecting equivalent
//! (after a barrier, by the intake). A transaction becomes MULTI ... EXEC:
//! on a standalone target with SELECTs between databases; on a cluster one
//! per slot, or command by command when one of them must be rewritten.

use bytes::Bytes;
use smallvec::{smallvec, SmallVec};

use super::rules::not_replayed;
use super::{Action, Body, Dest, Event, ExpectKind, Replay, Unit, UnitBody};
use crate::resp::encode;
use crate::split::{self, Plan};

fn multi() -> Body {
    Body::Encoded(Bytes::from_static(b"*1\r\n$5\r\nMULTI\r\n"))
}

fn exec() -> Body {
    Body::Encoded(Bytes::from_static(b"*1\r\n$4\r\nEXEC\r\n"))
}

fn select(db: u32) -> Body {
    let mut buf = bytes::BytesMut::new();
    encode::command(
        &mut buf,
        &[b"SELECT", itoa::Buffer::new().format(db).as_bytes()],
    );
    Body::Encoded(buf.freeze())
}

fn send(out: &mut Vec<Action>, to: Dest, expect: ExpectKind, body: Body) {
    out.push(Action::Send { to, expect, body });
}

fn body_of(unit: UnitBody) -> Body {
    match unit {
        UnitBody::Command { cmd, .. } => Body::Wire(cmd.into_wire()),
        UnitBody::Rebuilt { bytes, .. } => Body::Encoded(bytes),
    }
}

/// Commands each in one slot: nearly always one (inline, no allocation).
type InSlots = SmallVec<[(u16, Body); 1]>;

/// Where a unit lands on a cluster.
enum Landing {
    /// Each command in one slot (the command, or its per-slot parts).
    Slots(InSlots),
    /// Keyless: any one node, or every node.
    Keyless(Dest, Body),
    /// Only a rewrite can carry it (never inside a MULTI).
    Rewrite(Plan, crate::resp::Command),
    /// No equivalent on a cluster.
    Unsupported(crate::resp::Command, &'static str),
}

fn land(unit: UnitBody) -> Landing {
    match unit {
        UnitBody::Rebuilt { slot, bytes } => {
            Landing::Slots(smallvec![(slot, Body::Encoded(bytes))])
        }
        UnitBody::Command { cmd, spec } => land_plan(split::plan(spec, &cmd), cmd),
    }
}

fn land_plan(plan: Plan, cmd: crate::resp::Command) -> Landing {
    match plan {
        Plan::Slot(slot) => Landing::Slots(smallvec![(slot, Body::Wire(cmd.into_wire()))]),
        Plan::Parts(parts) => Landing::Slots(
            parts
                .into_iter()
                .map(|(slot, part)| (slot, Body::Wire(part.into_wire())))
                .collect(),
        ),
        Plan::AnyNode => Landing::Keyless(Dest::AnyNode, Body::Wire(cmd.into_wire())),
        Plan::Everywhere => Landing::Keyless(Dest::Everywhere, Body::Wire(cmd.into_wire())),
        Plan::Unsupported(reason) => Landing::Unsupported(cmd, reason),
        plan @ (Plan::Rename { .. }
        | Plan::Copy { .. }
        | Plan::ListMove { .. }
        | Plan::Colocate { .. }) => Landing::Rewrite(plan, cmd),
    }
}

impl Replay {
    /// Units of one command outside a transaction: one goes alone; several
    /// (a trimmed or rebuilt command, per-database flushes) make a
    /// transaction of their own, as the source applied them at once.
    #[inline]
    pub(super) fn emit_alone(&mut self, units: &mut Vec<Unit>, out: &mut Vec<Action>) {
        match units.len() {
            0 => {}
            1 => {
                let unit = units.pop().expect("one unit");
                self.emit_one(unit, out);
            }
            _ => self.emit_tx(std::mem::take(units), out),
        }
    }

    #[inline]
    fn emit_one(&mut self, unit: Unit, out: &mut Vec<Action>) {
        if !self.cluster {
            return send(out, Dest::Db(unit.tdb), ExpectKind::Ok, body_of(unit.body));
        }
        match unit.body {
            // The common case, sent without building a landing.
            UnitBody::Command { cmd, spec } => match split::plan(spec, &cmd) {
                Plan::Slot(slot) => send(
                    out,
                    Dest::Slot(slot),
                    ExpectKind::Ok,
                    Body::Wire(cmd.into_wire()),
                ),
                plan => emit_landed(land_plan(plan, cmd), out),
            },
            body => emit_landed(land(body), out),
        }
    }

    /// A whole transaction (or a command that became several).
    pub(super) fn emit_tx(&mut self, units: Vec<Unit>, out: &mut Vec<Action>) {
        if units.is_empty() {
            return;
        }
        if self.cluster {
            emit_tx_cluster(units, out)
        } else {
            emit_tx_standalone(units, out)
        }
    }
}

/// On a cluster: atomic (MULTI/EXEC on the owner) when all its keys share a
/// slot; otherwise one MULTI/EXEC per slot, or, when a command in it has no
/// per-slot form, command by command.
fn emit_tx_cluster(units: Vec<Unit>, out: &mut Vec<Action>) {
    let landed: Vec<Landing> = units.into_iter().map(|u| land(u.body)).collect();
    if !landed.iter().all(|l| matches!(l, Landing::Slots(_))) {
        out.push(Action::event(Event::TxSplit));
        for landing in landed {
            emit_landed(landing, out);
        }
        return;
    }
    let mut groups: Vec<(u16, Vec<Body>)> = Vec::new();
    for landing in landed {
        // Every landing is `Slots` (checked above).
        let Landing::Slots(parts) = landing else {
            continue;
        };
        for (slot, body) in parts {
            match groups.iter_mut().find(|(s, _)| *s == slot) {
                Some((_, bodies)) => bodies.push(body),
                None => groups.push((slot, vec![body])),
            }
        }
    }
    if groups.len() > 1 {
        out.push(Action::event(Event::TxSplit));
    }
    for (slot, bodies) in groups {
        let to = Dest::Slot(slot);
        send(out, to, ExpectKind::TxBegin, multi());
        for body in bodies {
            send(out, to, ExpectKind::TxQueued, body);
        }
        send(out, to, ExpectKind::TxEnd, exec());
    }
}

/// One landed command, alone.
fn emit_landed(landing: Landing, out: &mut Vec<Action>) {
    match landing {
        Landing::Slots(parts) => {
            if parts.len() > 1 {
                out.push(Action::event(Event::Split));
            }
            for (slot, body) in parts {
                send(out, Dest::Slot(slot), ExpectKind::Ok, body);
            }
        }
        Landing::Keyless(to, body) => send(out, to, ExpectKind::Ok, body),
        Landing::Rewrite(plan, cmd) => {
            out.push(Action::event(Event::Rewritten));
            out.push(Action::Rewrite(Box::new((plan, cmd))));
        }
        Landing::Unsupported(cmd, reason) => not_replayed(out, &cmd, reason),
    }
}

/// On a standalone target: MULTI in the first unit's database, SELECT
/// between databases inside, and the connection put back in that first
/// database after EXEC (the writer tracks the database it selected).
fn emit_tx_standalone(units: Vec<Unit>, out: &mut Vec<Action>) {
    let first = units.iter().find_map(|u| u.tdb);
    send(out, Dest::Db(first), ExpectKind::TxBegin, multi());
    let mut current = first;
    for unit in units {
        if let Some(tdb) = unit.tdb {
            if current != Some(tdb) {
                current = Some(tdb);
                send(out, Dest::Db(None), ExpectKind::TxQueued, select(tdb));
            }
        }
        send(
            out,
            Dest::Db(None),
            ExpectKind::TxQueued,
            body_of(unit.body),
        );
    }
    send(out, Dest::Db(None), ExpectKind::TxEnd, exec());
    if let (Some(first), true) = (first, current != first) {
        send(out, Dest::Db(None), ExpectKind::Ok, select(first));
    }
}
