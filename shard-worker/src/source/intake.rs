//! The intake: everything read from a source master goes through here.
//!
//! Its input is the shard's [`Spill`]: a reader task empties the socket into
//! it whatever the targets do. After a `+FULLRESYNC` the intake reads the RDB
//! transfer (`transfer.rs`) and the snapshot's values (`snapshot.rs`); then,
//! and directly after a `+CONTINUE`, the command stream (`stream.rs`),
//! keeping the replication offset byte-exact.
//!
//! The intake decides nothing itself: `engine::replay` says what each value
//! and each command becomes on the target, as actions, and the intake
//! carries them out: it appends commands to the writers' batches (through
//! the [`Dispatcher`]), waits for confirmations where a rule needs a
//! barrier, runs cross-slot rewrites, and reports events.
//!
//! The position published as *processed* only moves at points outside a
//! transaction, after the batches holding everything before it were handed
//! over; a resumed stream therefore never starts inside a transaction.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use engine::replay::{Dest, Event, ExpectKind, Replay, ReplayConfig};
use engine::restore::Existing;
use ractor::ActorRef;
use tokio::sync::watch;

use engine::slot::SlotSet;

use super::handover::{HandOvers, Peers, Settling, View};
use super::rewrite::TargetControl;
use super::SourceMsg;
use crate::error::WorkerError;
use crate::events::{self, LogLimiter};
use crate::progress::{ShardStats, StreamPos};
use crate::route::{Dispatcher, Topology};
use crate::spill::Spill;

/// How the intake treats what it reads.
#[derive(Clone, Debug)]
pub struct IntakeOptions {
    /// The replay rules' options (filters, versions, heartbeat, ...).
    pub replay: ReplayConfig,
    /// What a snapshot's RESTORE does to a key the target already has.
    pub existing: Existing,
    /// Longest silence on the replication link before it is considered dead.
    pub read_timeout: Duration,
    /// Largest value (DUMP payload) accepted in one RESTORE.
    pub max_value_len: usize,
    /// Where stream bytes the targets cannot take yet are spilled.
    pub spill_dir: PathBuf,
    /// Stream bytes held in memory per shard before spilling to disk.
    pub spill_memory: usize,
    /// Values whose serialization passes this many bytes are written in
    /// parts (bounded commands under a temporary name, renamed at the end).
    pub big_key_bytes: usize,
}

/// Default for [`IntakeOptions::big_key_bytes`].
pub const DEFAULT_BIG_KEY_BYTES: usize = 64 * 1024 * 1024;

impl Default for IntakeOptions {
    fn default() -> Self {
        IntakeOptions {
            replay: ReplayConfig::default(),
            existing: Existing::Replace,
            read_timeout: Duration::from_secs(60),
            max_value_len: engine::rdb::DEFAULT_MAX_VALUE_LEN,
            spill_dir: std::env::temp_dir().join("shardsync-spill"),
            spill_memory: 32 * 1024 * 1024,
            big_key_bytes: DEFAULT_BIG_KEY_BYTES,
        }
    }
}

/// How an intake ended without error.
#[derive(Debug, PartialEq, Eq)]
pub enum IntakeEnd {
    /// Asked to stop; everything read was handed over.
    Stopped,
}

/// What the source worker hands its intake.
pub(crate) struct IntakeParts {
    pub addr: String,
    pub input: Arc<Spill>,
    /// Bytes read past the handshake's reply.
    pub buf: BytesMut,
    pub dispatcher: Dispatcher,
    pub stats: Arc<ShardStats>,
    pub actor: ActorRef<SourceMsg>,
    pub stop: watch::Receiver<bool>,
    pub options: IntakeOptions,
    /// On a cluster source: the task's shards, this one's index and
    /// master, and the slots its master served at the precheck.
    pub handover: Option<HandOverParts>,
}

/// What hand-overs need (see `handover.rs`).
pub(crate) struct HandOverParts {
    pub peers: Arc<Peers>,
    pub me: usize,
    pub slots: Vec<(u16, u16)>,
    /// The master joined the source mid-sync.
    pub joined: bool,
}

pub(crate) struct Intake {
    pub(super) addr: String,
    pub(super) input: Arc<Spill>,
    pub(super) buf: BytesMut,
    pub(super) dispatcher: Dispatcher,
    pub(super) stats: Arc<ShardStats>,
    pub(super) actor: ActorRef<SourceMsg>,
    pub(super) stop: watch::Receiver<bool>,
    pub(super) options: IntakeOptions,
    pub(super) replay: Replay,
    /// Replication id of this sync.
    pub(super) replid: String,
    /// Offset of the next byte of the stream.
    pub(super) offset: u64,
    /// The last position outside a transaction up to which everything was
    /// handed to the dispatcher: where the batches built now end (`None`
    /// during a full sync, whose batches make nothing resumable).
    pub(super) safe: Option<StreamPos>,
    /// Connections for cross-slot rewrites (cluster targets only).
    control: Option<TargetControl>,
    pub(super) log: LogLimiter,
    /// Hand-overs between the shards of a cluster source.
    pub(super) handovers: Option<HandOvers>,
    /// Where the command being carried out began.
    pub(super) cmd_start: u64,
    /// Where the stream must be for a slot that left to stop being
    /// settled (`u64::MAX`: none).
    pub(super) next_leave: u64,
}

impl Intake {
    /// An intake whose stream starts at `start` of sync `replid`.
    pub fn new(parts: IntakeParts, replid: String, start: StreamPos) -> Intake {
        let IntakeParts {
            addr,
            input,
            buf,
            dispatcher,
            stats,
            actor,
            stop,
            options,
            handover,
        } = parts;
        let cluster = dispatcher.router().is_cluster();
        let control = match &dispatcher.router().topology {
            Topology::Cluster(routing) => Some(TargetControl::new(
                routing.clone(),
                options.replay.tmp_scope.clone(),
            )),
            Topology::Single => None,
        };
        let mut replay = Replay::new(options.replay.clone(), cluster);
        replay.start_at(start.db);
        let handovers = handover.map(|parts| {
            let view = stats
                .handover
                .view
                .lock()
                .expect("view lock")
                .clone()
                .unwrap_or_else(|| View {
                    settled: SlotSet::of_ranges(&parts.slots),
                    settling: Settling::default(),
                });
            replay.set_settled(Some(view.settled));
            replay.set_moved_keys(Arc::new(super::handover::MovedAway {
                peers: parts.peers.clone(),
                me: parts.me,
            }));
            let mut settling = view.settling;
            settling.me = Some(parts.me);
            HandOvers {
                peers: parts.peers,
                me: parts.me,
                settling,
                joined: parts.joined,
            }
        });
        Intake {
            addr,
            input,
            buf,
            dispatcher,
            stats,
            actor,
            stop,
            options,
            replay,
            replid,
            offset: start.offset,
            safe: None,
            control,
            log: LogLimiter::new(),
            next_leave: handovers
                .as_ref()
                .map_or(u64::MAX, |h| h.settling.next_leave()),
            handovers,
            cmd_start: start.offset,
        }
    }

    pub(super) fn stop_requested(&self) -> bool {
        *self.stop.borrow()
    }

    pub(super) async fn read_more(&mut self) -> Result<(), WorkerError> {
        let chunk = self.input.next().await?;
        self.buf.extend_from_slice(&chunk);
        Ok(())
    }

    /// Appends a command written by `encode` to the batch of the writer(s)
    /// that `to` names.
    pub(super) async fn send_with(
        &mut self,
        to: Dest,
        expect: ExpectKind,
        encode: impl Fn(&mut BytesMut),
    ) -> Result<(), WorkerError> {
        let safe = self.safe;
        let router = self.dispatcher.router();
        let (w, db, slot) = match to {
            Dest::Db(db) => (router.default_writer(), db, None),
            Dest::Slot(slot) => (router.writer_for_slot(slot), None, Some(slot)),
            Dest::AnyNode => (router.default_writer(), None, None),
            Dest::Everywhere => {
                for w in 0..router.n_writers() {
                    self.dispatcher
                        .push(w, None, expect, safe, None, &encode)
                        .await?;
                }
                return Ok(());
            }
        };
        self.dispatcher
            .push(w, db, expect, safe, slot, encode)
            .await
    }

    /// Waits until everything handed over so far is confirmed.
    pub(super) async fn barrier(&mut self) -> Result<(), WorkerError> {
        self.dispatcher.flush_all(self.safe).await?;
        events::Barrier.emit(&self.stats.counters);
        self.stats.wait_drained().await;
        Ok(())
    }

    /// Follows a change of the target's slot map: what was routed by the
    /// old map is confirmed first (its writers redirect it), then the new
    /// map is used.
    pub(super) async fn follow_map(&mut self) -> Result<(), WorkerError> {
        if self.dispatcher.router().stale() {
            self.barrier().await?;
            self.dispatcher.refresh();
        }
        Ok(())
    }

    /// Runs the cross-slot equivalent of `cmd` once everything before it is
    /// confirmed, so that it reads the target exactly as the source was.
    pub(super) async fn rewrite(
        &mut self,
        plan: engine::split::Plan,
        cmd: engine::resp::Command,
    ) -> Result<(), WorkerError> {
        self.barrier().await?;
        if self.control.is_none() {
            // The rules plan rewrites for cluster targets only.
            self.report(Event::NotReplayed {
                command: engine::replay::describe(&cmd),
                reason: "a rewrite needs a cluster target".into(),
            });
            return Ok(());
        }
        // Exactly-once: its writes carry their slots' markers (outside a
        // source transaction, where the position after it is a resumable
        // one).
        let marks = match (self.dispatcher.slot_marker_base(), self.safe) {
            (Some(base), Some(start)) if !self.replay.in_tx() => {
                let end = crate::progress::StreamPos {
                    offset: self.offset,
                    db: self.replay.db(),
                };
                let applied = super::rewrite::written_slots(&plan)
                    .into_iter()
                    .filter(|&s| self.dispatcher.slot_applied(s, start.offset))
                    .collect();
                Some(super::rewrite::Marks {
                    base,
                    value: self.dispatcher.applied_value(end),
                    applied,
                })
            }
            _ => None,
        };
        let Some(control) = self.control.as_mut() else {
            return Ok(());
        };
        if let super::rewrite::Outcome::Diverged(why) =
            control.run(&plan, &cmd, marks.as_ref()).await?
        {
            self.report(Event::NotReplayed {
                command: engine::replay::describe(&cmd),
                reason: why.into(),
            });
        }
        Ok(())
    }

    /// Reports what a replay rule decided.
    pub(super) fn report(&mut self, event: Event) {
        let c = &self.stats.counters;
        match event {
            Event::Filtered => events::CommandsFiltered { n: 1 }.emit(c),
            Event::NotReplayed { command, reason } => events::CommandNotReplayed {
                source: &self.addr,
                command: &command,
                reason: &reason,
            }
            .emit(c, &mut self.log),
            Event::Flushed {
                command,
                target_dbs,
            } => events::SourceFlushed {
                source: &self.addr,
                command,
                target_dbs: &target_dbs,
            }
            .emit(c),
            Event::Split => events::CommandSplit.emit(c),
            Event::Rewritten => events::CommandRewritten.emit(c),
            Event::TxSplit => events::TransactionSplit.emit(c),
            Event::Restamped => events::ValueRestamped.emit(c),
            Event::MovedAway { command } => events::CommandMovedAway {
                source: &self.addr,
                command: &command,
            }
            .emit(c),
            Event::Rebuilt { key, loss } => events::ValueRebuilt {
                source: &self.addr,
                key: &key,
                loss,
            }
            .emit(c, &mut self.log),
        }
    }
}
