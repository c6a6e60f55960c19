//! What one write of the stream becomes: dropped, adjusted, or kept, as
//! units (commands with their target database).
//!
//! The rules, in the order they apply:
//!
//! 1. our own heartbeat is measured and dropped;
//! 2. the key filter keeps, trims (DEL of kept keys only, ...) or drops a
//!    command, or reports one that moves data from dropped keys into kept
//!    ones;
//! 3. a command an older target cannot take is adjusted (stream counters
//!    dropped, RESTORE payloads restamped or rebuilt as commands);
//! 4. by role: PUBLISH is dropped unless asked for; FLUSHALL flushes only
//!    the copied databases; SWAPDB and MOVE replay only when databases are
//!    copied as they are; everything else runs in its database's target
//!    database, or is dropped when that database is not copied.

use std::borrow::Cow;

use super::{describe, Action, Event, Replay, Unit, UnitBody};
use crate::command::{CommandSpec, Role};
use crate::filter::Kept;
use crate::rebuild::{self, Rebuilt};
use crate::resp::Command;
use crate::restore::{self, Carry};
use smallvec::SmallVec;

const DBS_FILTERED: &str = "databases are filtered or renamed (--db / --db-map), so moving data between them cannot be mirrored";
const CLUSTER_ONE_DB: &str = "a cluster has only database 0";

/// What [`Replay::moved_away`] found.
enum MovedAway {
    None,
    All,
    /// The command without the keys that moved away.
    Rest(Command),
}

/// What version adaptation made of a command.
enum Adapted {
    /// Commands that replace it (one, for a restamped RESTORE or a stream
    /// command without counters).
    Commands(Vec<Command>),
    /// A RESTORE rebuilt as commands in the key's slot.
    Rebuilt { slot: u16, rebuilt: Rebuilt },
    /// Nothing can be sent (reported).
    Dropped,
}

impl Replay {
    /// The units for one write (`role`), appended to `units`; what is
    /// dropped or reported goes to `out`.
    #[inline]
    pub(super) fn write(
        &mut self,
        role: Role,
        mut cmd: Command,
        mut spec: Option<&'static CommandSpec>,
        now_ms: &dyn Fn() -> i64,
        out: &mut Vec<Action>,
        units: &mut Vec<Unit>,
    ) {
        if role == Role::Data && cmd.get(1).is_some_and(|k| self.cfg.is_heartbeat(k)) {
            if let Some(written_ms) = crate::heartbeat::written_ms(&cmd) {
                out.push(Action::Heartbeat { written_ms });
            }
            out.push(Action::event(Event::Filtered));
            return;
        }
        if cmd.is("RESTORE-ASKING") {
            // A slot migration's copy of a key: the exporting master's
            // history of it goes first, and the copy replaces what that
            // history left on the target.
            if let Some(import) = restore::import_restore(&cmd, now_ms()) {
                out.push(Action::HandOver {
                    slot: crate::slot::slot(import.arg(1)),
                    import: Some(import.arg_bytes(1)),
                });
                spec = crate::command::lookup(&import);
                cmd = import;
            }
        } else {
            if let Some(slot) = self.unsettled_slot(spec, &cmd) {
                out.push(Action::HandOver { slot, import: None });
            }
            match self.moved_away(spec, &cmd) {
                MovedAway::None => {}
                MovedAway::All => {
                    return out.push(Action::event(Event::MovedAway {
                        command: describe(&cmd),
                    }))
                }
                MovedAway::Rest(rest) => {
                    out.push(Action::event(Event::MovedAway {
                        command: describe(&cmd),
                    }));
                    spec = crate::command::lookup(&rest);
                    cmd = rest;
                }
            }
        }
        if matches!(role, Role::Data | Role::Script | Role::Move) {
            match self.cfg.key_filter.keep(spec, &cmd) {
                Kept::All => {}
                Kept::Nothing => return out.push(Action::event(Event::Filtered)),
                Kept::Part(cmds) => {
                    for c in cmds {
                        self.in_its_db(Unit::command(None, c), out, units);
                    }
                    return;
                }
                Kept::Mixed => {
                    return not_replayed(
                        out,
                        &cmd,
                        "it moves data from keys left out by --include/--exclude into kept ones",
                    )
                }
            }
        }
        if role == Role::Data {
            if let Some(adapted) = self.adapt(&cmd, now_ms, out) {
                match adapted {
                    Adapted::Commands(cmds) => {
                        for c in cmds {
                            self.in_its_db(Unit::command(None, c), out, units);
                        }
                    }
                    Adapted::Rebuilt { slot, rebuilt } => {
                        self.rebuilt_units(slot, rebuilt, out, units)
                    }
                    Adapted::Dropped => {}
                }
                return;
            }
        }
        match role {
            Role::Publish if !self.cfg.replay_publish => out.push(Action::event(Event::Filtered)),
            // Keyless and global: no database to select.
            Role::Publish | Role::Function => units.push(Unit::of(None, cmd, spec)),
            Role::FlushAll => self.flush_all(cmd, spec, out, units),
            Role::FlushDb => self.flush_db(cmd, spec, out, units),
            Role::SwapDb => {
                let dbs = [db_arg(&cmd, 1), db_arg(&cmd, 2)];
                // SWAPDB does not depend on the selected database.
                self.between_dbs(Unit::of(None, cmd, spec), &dbs, out, units)
            }
            Role::Move => {
                let dbs = [Some(self.db), db_arg(&cmd, 2)];
                let tdb = self.cfg.db_filter.target_db(self.db);
                self.between_dbs(Unit::of(tdb, cmd, spec), &dbs, out, units)
            }
            _ => self.in_its_db(Unit::of(None, cmd, spec), out, units),
        }
    }

    /// Whether `cmd` touches keys copied to another master (see
    /// [`super::MovedKeys`]): none, all (dropped), or some of a command
    /// whose keys are independent (DEL, UNLINK, MSET, ...: the rest).
    fn moved_away(&self, spec: Option<&CommandSpec>, cmd: &Command) -> MovedAway {
        let (Some(moved), Some(spec)) = (&self.moved, spec) else {
            return MovedAway::None;
        };
        if moved.none() {
            return MovedAway::None;
        }
        let positions = crate::command::key_positions(spec, cmd);
        let away: SmallVec<[bool; 4]> = positions
            .iter()
            .map(|&p| moved.moved_away(cmd.arg(p)))
            .collect();
        if !away.contains(&true) {
            return MovedAway::None;
        }
        if !away.contains(&false) {
            return MovedAway::All;
        }
        match crate::split::split_by(spec, cmd, &positions, |k| !moved.moved_away(k)) {
            Some(Ok(parts)) => parts
                .into_iter()
                .find(|(stays, _)| *stays)
                .map_or(MovedAway::All, |(_, rest)| MovedAway::Rest(rest)),
            // Keys that depend on each other: the command stays whole.
            _ => MovedAway::None,
        }
    }

    /// On a cluster source, the first slot of `cmd`'s keys that is not
    /// settled (see [`Replay::set_settled`]).
    #[inline]
    fn unsettled_slot(&self, spec: Option<&CommandSpec>, cmd: &Command) -> Option<u16> {
        let settled = self.settled.as_ref()?;
        crate::command::key_positions(spec?, cmd)
            .into_iter()
            .map(|i| crate::slot::slot(cmd.arg(i)))
            .find(|&slot| !settled.contains(slot))
    }

    /// `unit` in the target database of the selected source database, or
    /// dropped when that database is not copied.
    #[inline]
    fn in_its_db(&self, mut unit: Unit, out: &mut Vec<Action>, units: &mut Vec<Unit>) {
        match self.current_tdb() {
            Some(tdb) => {
                unit.tdb = tdb;
                units.push(unit);
            }
            None => out.push(Action::event(Event::Filtered)),
        }
    }

    /// FLUSHALL: every database when all are copied as they are (and on a
    /// cluster, whose one database is copied); otherwise FLUSHDB, with the
    /// same ASYNC/SYNC modifier, in each target database we write to.
    fn flush_all(
        &self,
        cmd: Command,
        spec: Option<&'static CommandSpec>,
        out: &mut Vec<Action>,
        units: &mut Vec<Unit>,
    ) {
        if self.cluster || self.cfg.identity_dbs() {
            out.push(flushed("FLUSHALL", "all".into()));
            units.push(Unit::of(None, cmd, spec));
            return;
        }
        let mut tdbs: Vec<u32> = Vec::new();
        for db in 0..self.cfg.source_databases {
            if let Some(tdb) = self.cfg.db_filter.target_db(db) {
                if !tdbs.contains(&tdb) {
                    tdbs.push(tdb);
                }
            }
        }
        let listed: Vec<String> = tdbs.iter().map(u32::to_string).collect();
        out.push(flushed("FLUSHALL", listed.join(",")));
        for tdb in tdbs {
            let flushdb = match cmd.get(1) {
                Some(modifier) => Command::from_args(&[&b"FLUSHDB"[..], modifier]),
                None => Command::from_args(&[b"FLUSHDB"]),
            };
            units.push(Unit::command(Some(tdb), flushdb));
        }
    }

    fn flush_db(
        &self,
        cmd: Command,
        spec: Option<&'static CommandSpec>,
        out: &mut Vec<Action>,
        units: &mut Vec<Unit>,
    ) {
        let Some(tdb) = self.current_tdb() else {
            return out.push(Action::event(Event::Filtered));
        };
        out.push(flushed(
            "FLUSHDB",
            tdb.map_or("0".into(), |d| d.to_string()),
        ));
        units.push(Unit::of(tdb, cmd, spec));
    }

    /// SWAPDB / MOVE (`unit`, in the target database it would run in),
    /// which move data between the source databases `dbs` (`None`: not a
    /// database number; the target will say so). Dropped when none of them
    /// is copied; replayed as is when every database is copied unchanged to
    /// a standalone target; otherwise there is no equivalent.
    fn between_dbs(
        &self,
        unit: Unit,
        dbs: &[Option<u32>],
        out: &mut Vec<Action>,
        units: &mut Vec<Unit>,
    ) {
        let touched = dbs
            .iter()
            .any(|db| db.is_none_or(|db| self.cfg.db_filter.target_db(db).is_some()));
        if !touched {
            return out.push(Action::event(Event::Filtered));
        }
        let UnitBody::Command { cmd, .. } = &unit.body else {
            return units.push(unit);
        };
        if self.cluster {
            return not_replayed(out, cmd, CLUSTER_ONE_DB);
        }
        if !self.cfg.identity_dbs() {
            return not_replayed(out, cmd, DBS_FILTERED);
        }
        units.push(unit);
    }

    /// A replicated command the target cannot take as is, made acceptable:
    /// stream counters dropped for a target before 7.0, a RESTORE payload
    /// restamped or rebuilt as commands for an older target. `None` when
    /// the command goes as it is.
    fn adapt(
        &mut self,
        cmd: &Command,
        now_ms: &dyn Fn() -> i64,
        out: &mut Vec<Action>,
    ) -> Option<Adapted> {
        let caps = self.cfg.target_caps;
        if let Some(adapted) = crate::compat::adapt(cmd, caps) {
            return Some(Adapted::Commands(vec![adapted]));
        }
        if !restore::is_restore(cmd) {
            return None;
        }
        let now = now_ms();
        let args = restore::parse_restore(cmd, now)?;
        let (t, version) = restore::check_dump_payload(&args.payload).ok()?;
        match restore::carry(t, version, caps, self.cfg.force_rewrite) {
            Carry::Restore => None,
            Carry::Restamp => {
                out.push(Action::event(Event::Restamped));
                let payload = restore::restamp(&args.payload, caps.rdb_version());
                let mut argv: Vec<&[u8]> = cmd.args().collect();
                argv[3] = &payload;
                Some(Adapted::Commands(vec![Command::from_args(&argv)]))
            }
            Carry::Rebuild => {
                let slot = crate::slot::slot(&args.key);
                let tmp = self.tmp.next(slot);
                match rebuild::rebuild_restore(&args, caps, || tmp, now) {
                    Ok(Some(rebuilt)) => Some(Adapted::Rebuilt { slot, rebuilt }),
                    // Only its module could rebuild a module value: let the
                    // target say what it thinks of it.
                    Ok(None) => None,
                    Err(why) => {
                        let reason = format!("its payload cannot be decoded ({why})");
                        not_replayed(out, cmd, reason);
                        Some(Adapted::Dropped)
                    }
                }
            }
        }
    }

    /// The commands of a rebuilt value as units of the selected database.
    /// Their own MULTI/EXEC are left out: they are replayed as one
    /// transaction of the source would be (alone, several commands become a
    /// transaction of their own).
    fn rebuilt_units(
        &self,
        slot: u16,
        rebuilt: Rebuilt,
        out: &mut Vec<Action>,
        units: &mut Vec<Unit>,
    ) {
        out.push(Action::event(Event::Rebuilt {
            key: rebuilt.key.clone(),
            loss: rebuilt.loss,
        }));
        let Some(tdb) = self.current_tdb() else {
            return out.push(Action::event(Event::Filtered));
        };
        let (buf, marks) = rebuilt.commands.into_parts();
        let all = buf.freeze();
        for (i, &(start, step)) in marks.iter().enumerate() {
            if !matches!(step, rebuild::Step::Plain | rebuild::Step::Queued) {
                continue;
            }
            let end = marks.get(i + 1).map_or(all.len(), |m| m.0);
            units.push(Unit {
                tdb,
                body: UnitBody::Rebuilt {
                    slot,
                    bytes: all.slice(start..end),
                },
            });
        }
    }
}

/// Argument `i` as a database number.
fn db_arg(cmd: &Command, i: usize) -> Option<u32> {
    std::str::from_utf8(cmd.get(i)?).ok()?.parse().ok()
}

fn flushed(command: &'static str, target_dbs: String) -> Action {
    Action::event(Event::Flushed {
        command,
        target_dbs,
    })
}

pub(super) fn not_replayed(
    out: &mut Vec<Action>,
    cmd: &Command,
    reason: impl Into<Cow<'static, str>>,
) {
    out.push(Action::event(Event::NotReplayed {
        command: describe(cmd),
        reason: reason.into(),
    }));
}
