//! Telemetry: one struct per event. `emit` writes its log line (if any)
//! and bumps its counter (declared once in `progress.rs`, exported by the
//! coordinator without naming it). Labels are the shard (source
//! `host:port`) and the target node, never a key; events on the hot path
//! are emitted per batch, not per command.
//!
//! Gauges that describe a state (queue depths, bytes waiting in a spill,
//! the full sync's progress) are set where the state changes; everything
//! that counts what happened goes through an event here.

use std::time::{Duration, Instant};

use bytes::BytesMut;
use engine::rebuild::Loss;
use engine::resp::parse_command;

use crate::error::WorkerError;
use crate::progress::{ErrorClass, ShardCounters, WriterCounters, WriterStats};

/// Keeps a flood of identical warnings (say, a million WRONGTYPE replies)
/// from drowning the log: at most `BURST` lines per `WINDOW`, then a count
/// of what was left out.
pub struct LogLimiter {
    window_start: Instant,
    logged: u32,
    suppressed: u64,
}

const BURST: u32 = 20;
const WINDOW: Duration = Duration::from_secs(10);

impl Default for LogLimiter {
    fn default() -> Self {
        Self::new()
    }
}

impl LogLimiter {
    pub fn new() -> LogLimiter {
        LogLimiter {
            window_start: Instant::now(),
            logged: 0,
            suppressed: 0,
        }
    }

    /// `Some(n)` when a line may be logged, `n` being how many were left
    /// out before it; `None` when this one is left out.
    pub fn allow(&mut self) -> Option<u64> {
        if self.window_start.elapsed() >= WINDOW {
            self.window_start = Instant::now();
            self.logged = 0;
        }
        if self.logged < BURST {
            self.logged += 1;
            Some(std::mem::take(&mut self.suppressed))
        } else {
            self.suppressed += 1;
            None
        }
    }
}

/// The command name and first argument of an encoded command, for messages
/// (values are never logged).
pub fn describe_command(encoded: &[u8]) -> (String, String) {
    let mut buf = BytesMut::from(encoded);
    match parse_command(&mut buf) {
        Ok(Some(cmd)) => {
            let name = String::from_utf8_lossy(cmd.name()).to_uppercase();
            let key = cmd.get(1).map(key_text).unwrap_or_default();
            (name, key)
        }
        _ => ("?".into(), String::new()),
    }
}

fn key_text(key: &[u8]) -> String {
    String::from_utf8_lossy(&key[..key.len().min(80)]).into_owned()
}

// ---------------------------------------------------------------- source

/// A full sync began.
pub struct FullSyncStarted<'a> {
    pub source: &'a str,
    pub replid: &'a str,
    pub offset: u64,
    pub transfer: &'a str,
}

impl FullSyncStarted<'_> {
    pub fn emit(self, counters: &ShardCounters) {
        counters.full_syncs.add(1);
        tracing::info!(
            source = self.source,
            replid = self.replid,
            offset = self.offset,
            transfer = self.transfer,
            "full sync started"
        );
    }
}

/// A full sync replaces the task's earlier copy: the copied databases of
/// the target are emptied first, so that nothing the source deleted
/// meanwhile survives.
pub struct TargetEmptied<'a> {
    pub source: &'a str,
}

impl TargetEmptied<'_> {
    pub fn emit(self) {
        tracing::warn!(
            source = self.source,
            "a new full sync replaces the task's earlier copy: emptying the copied databases of the target first"
        );
    }
}

/// Before a full resync over the task's earlier copy, the target's keys in
/// this shard's slots were deleted (other shards share the databases).
pub struct TargetSwept<'a> {
    pub source: &'a str,
    pub keys: u64,
    pub elapsed: Duration,
}

impl TargetSwept<'_> {
    pub fn emit(self) {
        tracing::warn!(
            source = self.source,
            keys = self.keys,
            secs = format!("{:.1}", self.elapsed.as_secs_f64()),
            "a new full sync replaces the task's earlier copy: deleted the target's keys in this shard's slots first"
        );
    }
}

/// The whole RDB was read, handed to the writers and applied.
pub struct FullSyncLoaded<'a> {
    pub source: &'a str,
    pub keys: u64,
    pub bytes: u64,
    pub elapsed: Duration,
}

impl FullSyncLoaded<'_> {
    pub fn emit(self, counters: &ShardCounters) {
        counters.full_syncs_loaded.add(1);
        tracing::info!(
            source = self.source,
            keys = self.keys,
            bytes = self.bytes,
            secs = format!("{:.2}", self.elapsed.as_secs_f64()),
            "RDB read; replaying the stream"
        );
    }
}

/// The source accepted a partial resync.
pub struct PartialResync<'a> {
    pub source: &'a str,
    pub replid: &'a str,
    pub offset: u64,
}

impl PartialResync<'_> {
    pub fn emit(self, counters: &ShardCounters) {
        counters.partial_syncs.add(1);
        tracing::info!(
            source = self.source,
            replid = self.replid,
            offset = self.offset,
            "partial resync accepted; continuing the stream"
        );
    }
}

/// The link to a source master was lost (or could not be made).
pub struct SourceConnectionLost;

impl SourceConnectionLost {
    pub fn emit(self, counters: &ShardCounters) {
        counters.source_reconnects.add(1);
    }
}

/// The link to a source master will be tried again after `retry_in`.
pub struct SourceRetry<'a> {
    pub source: &'a str,
    pub error: &'a str,
    pub retry_in: Duration,
    pub full_resync: bool,
}

impl SourceRetry<'_> {
    pub fn emit(self) {
        tracing::warn!(
            source = self.source,
            error = self.error,
            retry_in_ms = self.retry_in.as_millis() as u64,
            full_resync = self.full_resync,
            "source connection failed; retrying"
        );
    }
}

/// Commands read from the stream.
pub struct CommandsReceived {
    pub n: u64,
}

impl CommandsReceived {
    pub fn emit(self, counters: &ShardCounters) {
        counters.commands_received.add(self.n);
    }
}

/// Commands dropped by design (other databases, PUBLISH, our heartbeat,
/// keys left out).
pub struct CommandsFiltered {
    pub n: u64,
}

impl CommandsFiltered {
    pub fn emit(self, counters: &ShardCounters) {
        counters.commands_filtered.add(self.n);
    }
}

/// A command from the source that cannot be replayed on the target.
pub struct CommandNotReplayed<'a> {
    pub source: &'a str,
    pub command: &'a str,
    pub reason: &'a str,
}

impl CommandNotReplayed<'_> {
    pub fn emit(self, counters: &ShardCounters, limiter: &mut LogLimiter) {
        counters.commands_unsupported.add(1);
        if let Some(suppressed) = limiter.allow() {
            tracing::error!(
                source = self.source,
                command = self.command,
                reason = self.reason,
                suppressed,
                "command not replayed"
            );
        }
    }
}

/// The source emptied databases (FLUSHALL / FLUSHDB), and so does the
/// target. Always logged.
pub struct SourceFlushed<'a> {
    pub source: &'a str,
    pub command: &'a str,
    pub target_dbs: &'a str,
}

impl SourceFlushed<'_> {
    pub fn emit(self, counters: &ShardCounters) {
        counters.source_flushes.add(1);
        tracing::warn!(
            source = self.source,
            command = self.command,
            target_dbs = self.target_dbs,
            "source ran a flush; replaying it on the target"
        );
    }
}

/// A multi-key command split into per-slot parts.
pub struct CommandSplit;

impl CommandSplit {
    pub fn emit(self, counters: &ShardCounters) {
        counters.commands_split.add(1);
    }
}

/// A cross-slot command replaced by an equivalent.
pub struct CommandRewritten;

impl CommandRewritten {
    pub fn emit(self, counters: &ShardCounters) {
        counters.commands_rewritten.add(1);
    }
}

/// A transaction whose keys span slots, applied per slot.
pub struct TransactionSplit;

impl TransactionSplit {
    pub fn emit(self, counters: &ShardCounters) {
        counters.transactions_split.add(1);
    }
}

/// A hand-over ended (`source::handover`): how long the shard waited.
pub struct HandOver {
    pub waited: Duration,
}

impl HandOver {
    pub fn emit(self, counters: &ShardCounters) {
        let ms = self.waited.as_millis() as u64;
        counters.handovers.add(1);
        counters.handover_wait_ms.add(ms);
        if ms > counters.handover_wait_max_ms.get() {
            counters.handover_wait_max_ms.set(ms);
        }
    }
}

/// A hand-over has waited long for another shard.
pub struct HandOverSlow<'a> {
    pub source: &'a str,
    pub other: &'a str,
    pub slot: u16,
    pub offset: u64,
    pub applied: Option<u64>,
    pub secs: u64,
}

impl HandOverSlow<'_> {
    pub fn emit(self) {
        tracing::info!(
            source = self.source,
            other = self.other,
            slot = self.slot,
            offset = self.offset,
            applied = self.applied.map_or_else(|| "none yet".to_string(), |a| a.to_string()),
            secs = self.secs,
            "a key of this slot came from another source master: waiting until that master's writes up to its offset are applied"
        );
    }
}

/// Two shards waited on each other at hand-overs; this one went on.
pub struct HandOverCycle<'a> {
    pub source: &'a str,
    pub other: &'a str,
    pub slot: u16,
}

impl HandOverCycle<'_> {
    pub fn emit(self, counters: &ShardCounters) {
        counters.handover_cycles.add(1);
        tracing::warn!(
            source = self.source,
            other = self.other,
            slot = self.slot,
            "this shard and another wait on each other (slots moving both ways between their masters at once); going on: keys of this slot may differ until `shardsync verify` is run and they are written again"
        );
    }
}

/// A source master could not be asked its offset for a hand-over.
pub struct HandOverBlind<'a> {
    pub source: &'a str,
    pub other: &'a str,
    pub error: &'a WorkerError,
}

impl HandOverBlind<'_> {
    pub fn emit(self) {
        tracing::warn!(
            source = self.source,
            other = self.other,
            error = %self.error,
            "could not ask another source master its offset for a hand-over; waiting only for what its shard read"
        );
    }
}

/// A source master serves slots and no shard of the task reads it (added
/// to the cluster mid-sync).
pub struct SourceMasterJoined<'a> {
    pub source: &'a str,
    pub master: &'a str,
    /// A shard is started for it.
    pub followed: bool,
}

impl SourceMasterJoined<'_> {
    pub fn emit(self) {
        if self.followed {
            tracing::info!(
                seen_by = self.source,
                master = self.master,
                "a master joined the source cluster: starting a shard for it"
            );
        } else {
            tracing::warn!(
                seen_by = self.source,
                master = self.master,
                "a master joined the source cluster and no shard reads it: its writes are not copied; restart the task to include it"
            );
        }
    }
}

/// A cluster source master became a replica (it lost its slots): its
/// shard is done.
pub struct SourceMasterDemoted<'a> {
    pub source: &'a str,
}

impl SourceMasterDemoted<'_> {
    pub fn emit(self) {
        tracing::info!(
            source = self.source,
            "this source master lost all its slots and follows another master now: its shard is done (the master it follows has its own)"
        );
    }
}

/// The Sentinels name another master for a source (a failover): the
/// shard continues there.
pub struct SourceMasterFollowed<'a> {
    pub name: &'a str,
    pub from: &'a str,
    pub to: &'a str,
}

impl SourceMasterFollowed<'_> {
    pub fn emit(self) {
        tracing::warn!(
            master = self.name,
            from = self.from,
            to = self.to,
            "the Sentinels name another master (a failover): continuing there, with a partial resync if its history allows"
        );
    }
}

/// A command on keys a migration copied to another master, not replayed.
pub struct CommandMovedAway<'a> {
    pub source: &'a str,
    pub command: &'a str,
}

impl CommandMovedAway<'_> {
    pub fn emit(self, counters: &ShardCounters) {
        counters.commands_moved_away.add(1);
        tracing::debug!(
            source = self.source,
            command = self.command,
            "not replayed: a slot migration copied these keys to another master, whose stream carries them on"
        );
    }
}

/// The intake waited for everything it dispatched to be confirmed.
pub struct Barrier;

impl Barrier {
    pub fn emit(self, counters: &ShardCounters) {
        counters.barriers.add(1);
    }
}

/// A DUMP payload restamped with an older target's RDB version.
pub struct ValueRestamped;

impl ValueRestamped {
    pub fn emit(self, counters: &ShardCounters) {
        counters.values_restamped.add(1);
    }
}

/// A value rebuilt with ordinary commands; what it lost is reported by
/// [`FieldTtlsDropped`] and [`ConsumersDropped`].
pub struct ValueRebuilt<'a> {
    pub source: &'a str,
    pub key: &'a [u8],
    pub loss: Loss,
}

impl ValueRebuilt<'_> {
    pub fn emit(self, counters: &ShardCounters, limiter: &mut LogLimiter) {
        counters.values_rebuilt.add(1);
        if self.loss.field_ttls > 0 {
            FieldTtlsDropped {
                source: self.source,
                key: self.key,
                fields: self.loss.field_ttls,
            }
            .emit(counters, limiter);
        }
        if self.loss.consumers > 0 {
            ConsumersDropped {
                source: self.source,
                key: self.key,
                consumers: self.loss.consumers,
            }
            .emit(counters, limiter);
        }
    }
}

/// Hash fields with a TTL went to a target without field TTLs (before
/// 7.4): they were written without it.
pub struct FieldTtlsDropped<'a> {
    pub source: &'a str,
    pub key: &'a [u8],
    pub fields: u64,
}

impl FieldTtlsDropped<'_> {
    pub fn emit(self, counters: &ShardCounters, limiter: &mut LogLimiter) {
        counters.field_ttls_dropped.add(self.fields);
        if let Some(suppressed) = limiter.allow() {
            tracing::warn!(
                source = self.source,
                key = key_text(self.key),
                fields = self.fields,
                suppressed,
                "hash field TTLs cannot be carried: the target predates Redis 7.4; fields written without TTL"
            );
        }
    }
}

/// Stream consumers without pending entries went to a target before 6.2,
/// which cannot create them: left out.
pub struct ConsumersDropped<'a> {
    pub source: &'a str,
    pub key: &'a [u8],
    pub consumers: u64,
}

impl ConsumersDropped<'_> {
    pub fn emit(self, counters: &ShardCounters, limiter: &mut LogLimiter) {
        counters.consumers_dropped.add(self.consumers);
        if let Some(suppressed) = limiter.allow() {
            tracing::warn!(
                source = self.source,
                key = key_text(self.key),
                consumers = self.consumers,
                suppressed,
                "stream consumers without pending entries cannot be created before Redis 6.2; left out"
            );
        }
    }
}

/// A value too big for one RESTORE is written in parts.
pub struct BigValue<'a> {
    pub source: &'a str,
    pub key: &'a [u8],
    pub kind: &'a str,
}

impl BigValue<'_> {
    pub fn emit(self, counters: &ShardCounters) {
        counters.big_values.add(1);
        tracing::info!(
            source = self.source,
            key = key_text(self.key),
            kind = self.kind,
            "big value: writing it in parts"
        );
    }
}

/// The first value of a module type in a snapshot (reported once per type).
pub struct ModuleValues<'a> {
    pub source: &'a str,
    pub module_type: &'a str,
    pub module_id: u64,
    pub key: &'a [u8],
}

impl ModuleValues<'_> {
    pub fn emit(self) {
        tracing::info!(
            source = self.source,
            module_type = self.module_type,
            module_id = self.module_id,
            key = key_text(self.key),
            "module values are restored as they are: the target needs the same module loaded"
        );
    }
}

// ---------------------------------------------------------------- target

/// A batch is about to be written to the target node: its commands are in
/// flight until their replies are read.
pub struct BatchInFlight {
    pub commands: u64,
}

impl BatchInFlight {
    pub fn emit(self, counters: &WriterCounters) {
        counters.inflight_commands.add(self.commands);
    }
}

/// Bytes written to the target node.
pub struct BytesWritten {
    pub bytes: u64,
}

impl BytesWritten {
    pub fn emit(self, counters: &WriterCounters) {
        counters.bytes_written.add(self.bytes);
    }
}

/// A batch's replies are all in (its commands are no longer in flight).
pub struct RepliesRead {
    pub commands: u64,
}

impl RepliesRead {
    pub fn emit(self, counters: &WriterCounters) {
        counters.inflight_commands.sub(self.commands);
    }
}

/// A batch was confirmed: its commands ran on the node.
pub struct BatchConfirmed {
    pub commands: u64,
}

impl BatchConfirmed {
    pub fn emit(self, counters: &WriterCounters) {
        counters.commands_applied.add(self.commands);
        counters.batches_applied.add(1);
    }
}

/// A RESTORE without REPLACE found the key (`--on-conflict skip`).
pub struct KeySkipped;

impl KeySkipped {
    pub fn emit(self, counters: &WriterCounters) {
        counters.keys_skipped.add(1);
    }
}

/// The node said these commands live elsewhere (MOVED) or elsewhere for
/// now (ASK); they were handed to the right writer.
pub struct CommandsRedirected {
    pub ask: bool,
    pub commands: u64,
}

impl CommandsRedirected {
    pub fn emit(self, counters: &WriterCounters) {
        let counter = if self.ask {
            &counters.asked
        } else {
            &counters.moved
        };
        counter.add(self.commands);
    }
}

/// A working connection to the target node was lost.
pub struct TargetConnectionLost;

impl TargetConnectionLost {
    pub fn emit(self, counters: &WriterCounters) {
        counters.reconnects.add(1);
    }
}

/// Connecting to the target node failed, or its connection was lost; the
/// writer tries again after `retry_in`.
pub struct TargetRetry<'a> {
    pub target: &'a str,
    pub error: &'a str,
    pub retry_in: Duration,
}

impl TargetRetry<'_> {
    pub fn emit(self) {
        tracing::warn!(
            target_node = self.target,
            error = self.error,
            retry_in_ms = self.retry_in.as_millis() as u64,
            "target connection failed; retrying"
        );
    }
}

/// The target answered a command with an error that concerns that command
/// only (WRONGTYPE, ERR ...). Counted per error code.
pub struct TargetCommandFailed<'a> {
    pub target: &'a str,
    pub source: &'a str,
    pub command: &'a [u8],
    pub code: &'a str,
    pub reply: &'a str,
}

impl TargetCommandFailed<'_> {
    pub fn emit(self, stats: &WriterStats, limiter: &mut LogLimiter) {
        stats.count_error(ErrorClass::Replay, self.code);
        if let Some(suppressed) = limiter.allow() {
            let (command, key) = describe_command(self.command);
            tracing::warn!(
                target_node = self.target,
                source = self.source,
                command,
                key,
                error = self.reply,
                suppressed,
                "target rejected a replayed command"
            );
        }
    }
}

/// A transaction's order guard held it back: the one before it in its
/// slot did not run. It is resent behind that one.
pub struct GuardDiscarded;

impl GuardDiscarded {
    pub fn emit(self, counters: &WriterCounters) {
        counters.guarded_discards.add(1);
    }
}

/// A transaction ran although one before it in its slot did not, and its
/// order guard could not hold it back (the guard itself was refused, by an
/// error that went away before the transaction was read). The shard starts
/// over with a full sync, which makes the target exact again.
pub struct AppliedOutOfOrder<'a> {
    pub target: &'a str,
    pub source: &'a str,
}

impl AppliedOutOfOrder<'_> {
    pub fn emit(self, counters: &WriterCounters) {
        counters.out_of_order.add(1);
        tracing::error!(
            target_node = self.target,
            source = self.source,
            "a transaction ran ahead of an earlier one of its slot that the node refused for a moment; \
             starting this source over with a full sync"
        );
    }
}

/// A target node refused a command for now (LOADING, CLUSTERDOWN, ...): it
/// is sent again on a new connection (the connection's end is logged by
/// the writer's retry).
pub struct TargetRefusedForNow<'a> {
    pub code: &'a str,
}

impl TargetRefusedForNow<'_> {
    pub fn emit(self, stats: &WriterStats) {
        stats.count_error(ErrorClass::Retried, self.code);
    }
}

/// Commands sent before a lost connection, with no reply, were sent again.
pub struct CommandsResent<'a> {
    pub target: &'a str,
    pub commands: u64,
    pub non_idempotent: u64,
    /// Of `commands`, those in batches the node's marker showed not
    /// applied: they run once.
    pub marked: u64,
}

impl CommandsResent<'_> {
    pub fn emit(self, counters: &WriterCounters) {
        counters.resent_commands.add(self.commands);
        counters.resent_non_idempotent.add(self.non_idempotent);
        if self.non_idempotent > 0 {
            tracing::warn!(
                target_node = self.target,
                commands = self.commands,
                non_idempotent = self.non_idempotent,
                "resent commands whose replies were lost; non-idempotent ones may have run twice"
            );
        } else if self.marked == self.commands && self.commands > 0 {
            tracing::info!(
                target_node = self.target,
                commands = self.commands,
                "resent commands whose replies were lost; the node's marker shows it did not apply them"
            );
        } else if self.commands > 0 {
            tracing::info!(
                target_node = self.target,
                commands = self.commands,
                "resent commands whose replies were lost (all idempotent or not applied)"
            );
        }
    }
}

/// The target refused a RESTORE payload (a newer Redis wrote it), and the
/// value was rebuilt with ordinary commands.
pub struct RestoreRebuilt<'a> {
    pub target: &'a str,
    pub key: &'a [u8],
    pub reply: &'a str,
}

impl RestoreRebuilt<'_> {
    pub fn emit(self, counters: &WriterCounters, limiter: &mut LogLimiter) {
        counters.restores_rebuilt.add(1);
        if let Some(suppressed) = limiter.allow() {
            tracing::info!(
                target_node = self.target,
                key = key_text(self.key),
                refusal = self.reply,
                suppressed,
                "target refused a RESTORE payload; rebuilding the value with ordinary commands"
            );
        }
    }
}
