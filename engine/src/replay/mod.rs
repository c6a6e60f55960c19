//! The replay rules: what each command of a replication stream becomes on
//! the target. Pure: a command goes in, a list of [`Action`]s comes out, and
//! the async intake (`shard-worker`) only carries them out.
//!
//! # Layout
//!
//! - this file: the configuration, the actions, and [`Replay::step`], which
//!   classifies a command (replication chatter, SELECT, MULTI/EXEC/DISCARD,
//!   or a write) and keeps the state that spans commands (the selected
//!   database, the open transaction, temporary key names);
//! - `rules.rs`: what one write becomes — dropped (our heartbeat, key and
//!   database filters, PUBLISH), adjusted (FLUSHALL under a database filter,
//!   SWAPDB and MOVE policy, commands and RESTORE payloads an older target
//!   cannot take), or kept — as *units*: commands with their target
//!   database;
//! - `emit.rs`: units as sends: on a standalone target by database; on a
//!   cluster target by slot (whole, split per slot, or rewritten); a
//!   transaction as MULTI ... EXEC (per slot on a cluster);
//! - `snapshot.rs`: the same decisions for the values of an RDB snapshot.
//!
//! One set of rules serves commands inside and outside a transaction: a
//! write inside one is turned into units exactly as outside, and the units
//! are held until EXEC.

mod emit;
mod rules;
pub mod snapshot;

#[cfg(test)]
mod tests;

use std::borrow::Cow;

use bytes::Bytes;

use crate::command::{self, CommandSpec, Role};
use crate::filter::{DbFilter, KeyFilter};
use crate::rebuild::{Loss, Step, TargetCaps};
use crate::resp::Command;
use crate::slot::SlotSet;
use crate::split::{Plan, TmpNames};

/// What a command's reply must be, beyond "not an error".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExpectKind {
    /// Any reply that is not an error.
    Ok,
    /// A RESTORE without REPLACE: `BUSYKEY` means the target kept its key.
    KeepExisting,
    /// FUNCTION LOAD without REPLACE: "already exists" means the target
    /// kept its library.
    KeepExistingFunction,
    /// `MULTI`: a transaction is confirmed as a whole, at its `EXEC`.
    TxBegin,
    /// A command inside a transaction (`+QUEUED`).
    TxQueued,
    /// `EXEC`: the transaction's replies, errors nested inside.
    TxEnd,
    /// A command of the *order guard* sent just before one of our
    /// transactions (`WATCH` and the guard script of
    /// [`crate::marker::GUARD_SCRIPT`]): part of that transaction, whose
    /// EXEC reply alone says whether it ran.
    TxGuard,
}

impl From<Step> for ExpectKind {
    /// How a rebuilt command's reply is checked.
    fn from(step: Step) -> ExpectKind {
        match step {
            Step::Plain => ExpectKind::Ok,
            Step::Begin => ExpectKind::TxBegin,
            Step::Queued => ExpectKind::TxQueued,
            Step::End => ExpectKind::TxEnd,
        }
    }
}

/// How commands are replayed (the task's options that concern replay).
#[derive(Clone, Debug)]
pub struct ReplayConfig {
    pub db_filter: DbFilter,
    /// Which keys are copied (`--include` / `--exclude`).
    pub key_filter: KeyFilter,
    /// Number of databases on the source (`CONFIG GET databases`), to turn
    /// a FLUSHALL into per-database flushes when databases are filtered.
    pub source_databases: u32,
    /// Replay PUBLISH on the target (off by default: subscribers of the
    /// target would see messages the source's clients published).
    pub replay_publish: bool,
    /// What the target's version allows (its oldest node's, on a cluster):
    /// decides between RESTORE as is, RESTORE of a payload restamped with
    /// the target's RDB version, and rebuilding with ordinary commands.
    pub target_caps: TargetCaps,
    /// Rebuild every value with ordinary commands (never RESTORE).
    pub force_rewrite: bool,
    /// The task's heartbeat id: its heartbeat key is measured and dropped
    /// (see [`crate::heartbeat`]).
    pub heartbeat_id: Option<String>,
    /// Keeps this shard's temporary key names apart from other shards'.
    pub tmp_scope: String,
}

impl Default for ReplayConfig {
    fn default() -> Self {
        ReplayConfig {
            db_filter: DbFilter::all(),
            key_filter: KeyFilter::all(),
            source_databases: 16,
            replay_publish: false,
            target_caps: TargetCaps::LATEST,
            force_rewrite: false,
            heartbeat_id: None,
            tmp_scope: "0".into(),
        }
    }
}

impl ReplayConfig {
    /// Every database copied as-is: commands that move data between
    /// databases can be replayed unchanged.
    pub fn identity_dbs(&self) -> bool {
        self.db_filter == DbFilter::all()
    }

    /// Whether `key` is this task's heartbeat.
    pub fn is_heartbeat(&self, key: &[u8]) -> bool {
        self.heartbeat_id
            .as_deref()
            .is_some_and(|id| crate::heartbeat::is_ours(key, id))
    }
}

/// Where a command goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dest {
    /// The standalone target, in this database (`None`: whichever is
    /// selected; the command does not depend on it).
    Db(Option<u32>),
    /// The cluster node that serves this slot.
    Slot(u16),
    /// Any one cluster node (a keyless command that one node suffices for).
    AnyNode,
    /// Every cluster node (FLUSHALL, FUNCTION LOAD, ...).
    Everywhere,
}

/// The bytes of a command to send.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Body {
    /// A command of the stream, forwarded exactly as the master sent it
    /// (its bytes only: the argument index is not needed any more, and a
    /// smaller action is cheaper to move).
    Wire(Bytes),
    /// A command shardsync encoded (rebuilt values, MULTI/EXEC, SELECT, ...).
    Encoded(Bytes),
}

impl Body {
    pub fn bytes(&self) -> &[u8] {
        match self {
            Body::Wire(bytes) => bytes,
            Body::Encoded(bytes) => bytes,
        }
    }
}

/// Something a rule decided that telemetry reports (one counter and/or
/// one log line each, in `shard-worker`'s events).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// A command dropped by design (other databases, PUBLISH, our
    /// heartbeat, keys left out by the key filter).
    Filtered,
    /// A command that cannot be replayed on the target.
    NotReplayed {
        /// Its name and first argument (values are never reported).
        command: String,
        reason: Cow<'static, str>,
    },
    /// The source emptied databases, and so will the target.
    Flushed {
        command: &'static str,
        target_dbs: String,
    },
    /// A multi-key command split into per-slot parts.
    Split,
    /// A cross-slot command replaced by a slot-respecting equivalent.
    Rewritten,
    /// A transaction that could not stay whole (keys in several slots).
    TxSplit,
    /// A RESTORE payload restamped with the target's RDB version.
    Restamped,
    /// A command on keys a slot migration copied to another master, not
    /// replayed (see [`MovedKeys`]).
    MovedAway { command: String },
    /// A value rebuilt with ordinary commands, and what it lost.
    Rebuilt { key: Bytes, loss: Loss },
}

/// One thing for the intake to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Append a command to the batch of the writer that `to` names.
    Send {
        to: Dest,
        expect: ExpectKind,
        body: Body,
    },
    /// Wait until everything handed over is confirmed, then run a
    /// cross-slot equivalent of the command over control connections
    /// (boxed, as events are: rare, and every action stays small to move).
    Rewrite(Box<(Plan, Command)>),
    /// A key changes hands between masters of a cluster source (a slot
    /// migration's `RESTORE-ASKING`, or a command in a slot that this
    /// shard's master did not serve for long enough): what the other
    /// masters did before it must be applied before it is sent. `import`:
    /// the key of a migration's copy (it always waits for a look at the
    /// other masters taken after it, and the key's history continues on
    /// this shard's master from here: see [`MovedKeys`]).
    HandOver {
        slot: u16,
        import: Option<Bytes>,
    },
    /// The master asked for an acknowledgement.
    GetAck,
    /// Our heartbeat, written on the source at `written_ms` (Unix ms),
    /// arrived with this command.
    Heartbeat {
        written_ms: i64,
    },
    Event(Box<Event>),
}

impl Action {
    pub(crate) fn event(event: Event) -> Action {
        Action::Event(Box::new(event))
    }
}

/// Keys a slot migration copied to another master of a cluster source
/// (`RESTORE-ASKING` in that master's stream): their history continues
/// there. What this master still does to them afterwards (after a
/// `MIGRATE ... COPY`: its clean-up `DEL`, writes the cluster drops once the
/// slot moves) is not replayed.
pub trait MovedKeys: Send + Sync {
    fn moved_away(&self, key: &[u8]) -> bool;

    /// Whether no key is known to have moved (checked first, once per
    /// command: the common case costs no key lookup).
    fn none(&self) -> bool {
        false
    }
}

/// A stream the rules cannot follow.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ReplayError {
    #[error("a SELECT without a valid db: {0}")]
    BadSelect(String),
    /// The master takes part in an atomic slot migration: its stream
    /// carries the migration's own traffic (an importer's copy of keys the
    /// exporter's stream also writes, an exporter's clean-up of slots it
    /// gave away), which cannot be told from writes by these commands alone.
    #[error("{command}: this master takes part in an atomic slot migration (Valkey 9 CLUSTER MIGRATESLOTS, Redis 8.4 CLUSTER MIGRATION), which shardsync cannot follow yet; it stops here rather than apply the migration's copies and clean-up as writes. Run the same command again once the migration ended: the masters whose slots moved are copied again")]
    SlotMigration { command: String },
}

/// A write turned into what the target runs: a command, in a target
/// database (standalone; `None` on a cluster or when the database does not
/// matter).
#[derive(Clone, Debug)]
pub(crate) struct Unit {
    tdb: Option<u32>,
    body: UnitBody,
}

#[derive(Clone, Debug)]
enum UnitBody {
    /// A command (from the stream, or made from one); routed by its keys.
    Command {
        cmd: Command,
        spec: Option<&'static CommandSpec>,
    },
    /// One of the commands that rebuild a value, all in the value's slot.
    Rebuilt { slot: u16, bytes: Bytes },
}

impl Unit {
    /// A command made by a rule (its table row looked up).
    fn command(tdb: Option<u32>, cmd: Command) -> Unit {
        let spec = command::lookup(&cmd);
        Unit::of(tdb, cmd, spec)
    }

    /// A command whose table row is known.
    fn of(tdb: Option<u32>, cmd: Command, spec: Option<&'static CommandSpec>) -> Unit {
        Unit {
            tdb,
            body: UnitBody::Command { cmd, spec },
        }
    }
}

/// How the stream treats a command, by its role.
enum Class {
    /// PING, REPLCONF other than GETACK: counted in the offset only.
    Chatter,
    GetAck,
    Select,
    Multi,
    Exec,
    Discard,
    Write(Role),
}

#[inline]
fn classify(spec: Option<&CommandSpec>, cmd: &Command) -> Class {
    match spec.map_or(Role::Data, |s| s.role) {
        Role::Ping => Class::Chatter,
        Role::Replconf
            if cmd
                .get(1)
                .is_some_and(|a| a.eq_ignore_ascii_case(b"GETACK")) =>
        {
            Class::GetAck
        }
        Role::Replconf => Class::Chatter,
        Role::Select => Class::Select,
        Role::Multi => Class::Multi,
        Role::Exec => Class::Exec,
        Role::Discard => Class::Discard,
        role => Class::Write(role),
    }
}

/// The replay state of one shard's stream.
pub struct Replay {
    cfg: ReplayConfig,
    /// The target is a cluster (one database, commands routed by slot).
    cluster: bool,
    /// Source database selected in the stream.
    db: u32,
    /// Its target database, as [`Replay::target_db`] gives it (kept with
    /// `db`: asked for every command, changed only by SELECT).
    tdb: Option<Option<u32>>,
    /// The open transaction's units, held until EXEC.
    tx: Option<Vec<Unit>>,
    tmp: TmpNames,
    /// Reused for the units of one command (no allocation per command).
    scratch: Vec<Unit>,
    /// On a cluster source: the slots whose commands need no hand-over
    /// (the shard's master has served them long enough); `None` otherwise.
    settled: Option<SlotSet>,
    /// On a cluster source: keys copied to another master.
    moved: Option<std::sync::Arc<dyn MovedKeys>>,
}

impl Replay {
    pub fn new(cfg: ReplayConfig, cluster: bool) -> Replay {
        let mut replay = Replay {
            tmp: TmpNames::new(cfg.tmp_scope.clone()),
            cfg,
            cluster,
            db: 0,
            tdb: None,
            tx: None,
            scratch: Vec::new(),
            settled: None,
            moved: None,
        };
        replay.select(0);
        replay
    }

    /// Source database `db` is selected from here on.
    fn select(&mut self, db: u32) {
        self.db = db;
        self.tdb = self.target_db(db);
    }

    /// The target database of the selected source database (see
    /// [`Replay::target_db`]).
    fn current_tdb(&self) -> Option<Option<u32>> {
        self.tdb
    }

    pub fn config(&self) -> &ReplayConfig {
        &self.cfg
    }

    pub fn is_cluster(&self) -> bool {
        self.cluster
    }

    /// The source database selected at this point of the stream.
    pub fn db(&self) -> u32 {
        self.db
    }

    /// Where the stream continues: after a full sync the master selects a
    /// database before any command, so 0 stands until then; after a partial
    /// resync, the database selected where the stream left off.
    pub fn start_at(&mut self, db: u32) {
        self.select(db);
        self.tx = None;
    }

    /// On a cluster source, the slots whose commands go without a
    /// [`Action::HandOver`]: every command with a key in any other slot
    /// gets one (see `shard-worker`'s `source/handover.rs`).
    pub fn set_settled(&mut self, settled: Option<SlotSet>) {
        self.settled = settled;
    }

    pub fn settled_mut(&mut self) -> Option<&mut SlotSet> {
        self.settled.as_mut()
    }

    pub fn settled(&self) -> Option<&SlotSet> {
        self.settled.as_ref()
    }

    /// On a cluster source: which keys were copied to another master.
    pub fn set_moved_keys(&mut self, moved: std::sync::Arc<dyn MovedKeys>) {
        self.moved = Some(moved);
    }

    /// Whether a transaction is open (its commands are held until EXEC).
    pub fn in_tx(&self) -> bool {
        self.tx.is_some()
    }

    /// Temporary key names of this shard (shared with the snapshot, so
    /// that no two uses ever pick the same name).
    pub fn tmp_names(&mut self) -> &mut TmpNames {
        &mut self.tmp
    }

    /// The target database for source database `db`: `Some(Some(db'))` on
    /// a standalone target, `Some(None)` on a cluster (which has only
    /// database 0, never selected); `None` when `db` is not copied.
    pub fn target_db(&self, db: u32) -> Option<Option<u32>> {
        let tdb = self.cfg.db_filter.target_db(db)?;
        Some((!self.cluster).then_some(tdb))
    }

    /// Appends to `out` what the target must do for `cmd`, the next command
    /// of the stream. `now_ms` (Unix ms) is asked only when a TTL or an
    /// expiry matters (replicated RESTOREs).
    pub fn step(
        &mut self,
        cmd: Command,
        now_ms: impl Fn() -> i64,
        out: &mut Vec<Action>,
    ) -> Result<(), ReplayError> {
        let spec = command::lookup(&cmd);
        // CLUSTER (a rare command) or one this build does not know.
        if spec.is_none_or(|s| s.group == command::Group::Cluster) && slot_migration(&cmd) {
            return Err(ReplayError::SlotMigration {
                command: describe(&cmd),
            });
        }
        match classify(spec, &cmd) {
            Class::Chatter => {}
            Class::GetAck => out.push(Action::GetAck),
            Class::Select => {
                let db = cmd
                    .get(1)
                    .and_then(|a| std::str::from_utf8(a).ok())
                    .and_then(|s| s.parse::<u32>().ok())
                    .ok_or_else(|| ReplayError::BadSelect(format!("{cmd:?}")))?;
                self.select(db);
            }
            Class::Multi => self.tx = Some(Vec::new()),
            Class::Exec => {
                if let Some(units) = self.tx.take() {
                    self.emit_tx(units, out);
                }
            }
            Class::Discard => self.tx = None,
            Class::Write(role) => {
                let mut units = std::mem::take(&mut self.scratch);
                self.write(role, cmd, spec, &now_ms, out, &mut units);
                match &mut self.tx {
                    Some(tx) => tx.append(&mut units),
                    None => self.emit_alone(&mut units, out),
                }
                self.scratch = units;
            }
        }
        Ok(())
    }
}

/// An atomic slot migration's own command: Valkey 9's `CLUSTER SYNCSLOTS
/// ...` (an importing primary's stream), Redis 8.4's `CLUSTER SYNCSLOTS
/// CONF ...` and `TRIMSLOTS` (an exporter's, or a failed import's,
/// clean-up), and `SFLUSH`.
fn slot_migration(cmd: &Command) -> bool {
    let name = cmd.name();
    if name.eq_ignore_ascii_case(b"CLUSTER") {
        return cmd
            .get(1)
            .is_some_and(|sub| sub.eq_ignore_ascii_case(b"SYNCSLOTS"));
    }
    name.eq_ignore_ascii_case(b"TRIMSLOTS") || name.eq_ignore_ascii_case(b"SFLUSH")
}

/// The command name and first argument, for messages (values are never
/// logged).
pub fn describe(cmd: &Command) -> String {
    let name = String::from_utf8_lossy(cmd.name()).to_uppercase();
    let key = cmd
        .get(1)
        .map(|k| String::from_utf8_lossy(&k[..k.len().min(80)]).into_owned())
        .unwrap_or_default();
    format!("{name} {key}")
}
