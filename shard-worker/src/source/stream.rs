//! The command stream: after the snapshot, or right after `+CONTINUE`.
//!
//! Every byte advances the replication offset. Each command goes through
//! the replay rules (`engine::replay::Replay::step`), and the intake carries
//! out the actions they return: commands into the writers' batches,
//! rewrites after a barrier, acknowledgements the master asks for, our
//! heartbeat's arrival, events. Batches are handed over when full, and all
//! of them whenever the input runs dry; then the position reached (outside
//! a transaction) is published as processed.

use engine::replay::Action;
use engine::resp::parse_command;

use super::intake::{Intake, IntakeEnd};
use super::SourceMsg;
use crate::clock::unix_ms;
use crate::error::WorkerError;
use crate::events;
use crate::progress::StreamPos;

impl Intake {
    /// The position reached, as far as batches built now are concerned.
    fn here(&self) -> StreamPos {
        StreamPos {
            offset: self.offset,
            db: self.replay.db(),
        }
    }

    /// Reads and replays the command stream until asked to stop.
    pub async fn stream(&mut self) -> Result<IntakeEnd, WorkerError> {
        self.safe = Some(self.here());
        self.dispatcher.set_stream(self.stats.epoch(), &self.replid);
        let mut actions = Vec::new();
        loop {
            while let Some(cmd) =
                parse_command(&mut self.buf).map_err(|source| WorkerError::Protocol {
                    addr: self.addr.clone(),
                    source,
                })?
            {
                self.cmd_start = self.offset;
                if self.cmd_start >= self.next_leave {
                    self.leave_slots();
                }
                self.offset += cmd.wire_len() as u64;
                events::CommandsReceived { n: 1 }.emit(&self.stats.counters);
                self.replay
                    .step(cmd, unix_ms, &mut actions)
                    .map_err(|e| match e {
                        engine::replay::ReplayError::SlotMigration { .. } => {
                            WorkerError::CannotFollow {
                                addr: self.addr.clone(),
                                message: e.to_string(),
                            }
                        }
                        e => WorkerError::Unexpected {
                            addr: self.addr.clone(),
                            context: "reading the replication stream",
                            reply: e.to_string(),
                        },
                    })?;
                if !self.execute(&mut actions).await? {
                    // Asked to stop while a hand-over waited: the command
                    // is not sent, and the position stays before it.
                    self.dispatcher.flush_all(self.safe).await?;
                    if let Some(at) = self.safe {
                        self.stats.publish_processed(at);
                    }
                    return Ok(IntakeEnd::Stopped);
                }
                if !self.replay.in_tx() {
                    self.safe = Some(self.here());
                }
                self.dispatcher.flush_full(self.safe).await?;
                // A yield point now and then (see `snapshot.rs`).
                tokio::task::coop::consume_budget().await;
            }
            self.dispatcher.flush_all(self.safe).await?;
            if self.stats.take_out_of_order() {
                return Err(WorkerError::OutOfOrder {
                    addr: self.addr.clone(),
                });
            }
            self.dispatcher.refresh_markers(self.safe).await?;
            if let Some(at) = self.safe {
                self.stats.publish_processed(at);
            }
            self.stats.counters.source_offset.set(self.offset);
            self.absorb_samples();
            self.settle_ready();

            if self.stop_requested() {
                return Ok(IntakeEnd::Stopped);
            }
            let mut stop = self.stop.clone();
            tokio::select! {
                biased;
                _ = stop.changed() => return Ok(IntakeEnd::Stopped),
                read = self.read_more() => read?,
            }
        }
    }

    /// Carries out (and empties) `actions`. On a cluster target, a change
    /// of the slot map is followed before the first command is routed.
    /// `false`: asked to stop at a hand-over (the rest is not carried out).
    async fn execute(&mut self, actions: &mut Vec<Action>) -> Result<bool, WorkerError> {
        let mut followed = false;
        for action in actions.drain(..) {
            match action {
                Action::Send { to, expect, body } => {
                    // The check is inline: an await per command costs more
                    // than the map ever changes.
                    if !followed && self.dispatcher.router().stale() {
                        self.follow_map().await?;
                    }
                    followed = true;
                    let bytes = body.bytes();
                    self.send_with(to, expect, |buf| buf.extend_from_slice(bytes))
                        .await?;
                }
                Action::Rewrite(rewrite) => {
                    let (plan, cmd) = *rewrite;
                    self.rewrite(plan, cmd).await?
                }
                Action::GetAck => {
                    let _ = self.actor.send_message(SourceMsg::GetAck);
                }
                Action::Heartbeat { written_ms } => {
                    self.stats.heartbeat_seen(written_ms, self.offset)
                }
                Action::Event(event) => self.report(*event),
                Action::HandOver { slot, import } => {
                    if !self.hand_over(slot, import, self.cmd_start).await? {
                        return Ok(false);
                    }
                }
            }
        }
        Ok(true)
    }
}
