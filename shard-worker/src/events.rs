//! Telemetry: one struct per event; `emit` writes one structured log line
//! and updates the counter that goes with it. Labels are the shard (source
//! `host:port`) and the target node, never a key.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use engine::resp::parse_command;

use crate::progress::{ShardStats, WriterStats};

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
            let key = cmd
                .get(1)
                .map(|k| String::from_utf8_lossy(&k[..k.len().min(80)]).into_owned())
                .unwrap_or_default();
            (name, key)
        }
        _ => ("?".into(), String::new()),
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
        stats.count_error(self.code);
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

/// A command from the source that cannot be replayed on the target.
pub struct CommandNotReplayed<'a> {
    pub source: &'a str,
    pub command: &'a str,
    pub reason: &'a str,
}

impl CommandNotReplayed<'_> {
    pub fn emit(self, stats: &ShardStats, limiter: &mut LogLimiter) {
        stats.commands_unsupported.fetch_add(1, Ordering::Relaxed);
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
    pub fn emit(self) {
        tracing::warn!(
            source = self.source,
            command = self.command,
            target_dbs = self.target_dbs,
            "source ran a flush; replaying it on the target"
        );
    }
}

/// A full sync began.
pub struct FullSyncStarted<'a> {
    pub source: &'a str,
    pub replid: &'a str,
    pub offset: u64,
    pub transfer: &'a str,
}

impl FullSyncStarted<'_> {
    pub fn emit(self) {
        tracing::info!(
            source = self.source,
            replid = self.replid,
            offset = self.offset,
            transfer = self.transfer,
            "full sync started"
        );
    }
}

/// The whole RDB was read and handed to the writers.
pub struct FullSyncRead<'a> {
    pub source: &'a str,
    pub keys: u64,
    pub bytes: u64,
    pub elapsed: Duration,
}

impl FullSyncRead<'_> {
    pub fn emit(self) {
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
    pub fn emit(self, stats: &ShardStats) {
        stats.partial_syncs.fetch_add(1, Ordering::Relaxed);
        tracing::info!(
            source = self.source,
            replid = self.replid,
            offset = self.offset,
            "partial resync accepted; continuing the stream"
        );
    }
}

/// Commands sent before a lost connection, with no reply, were sent again.
pub struct CommandsResent<'a> {
    pub target: &'a str,
    pub commands: u64,
    pub non_idempotent: u64,
}

impl CommandsResent<'_> {
    pub fn emit(self, stats: &WriterStats) {
        stats
            .resent_commands
            .fetch_add(self.commands, Ordering::Relaxed);
        stats
            .resent_non_idempotent
            .fetch_add(self.non_idempotent, Ordering::Relaxed);
        if self.non_idempotent > 0 {
            tracing::warn!(
                target_node = self.target,
                commands = self.commands,
                non_idempotent = self.non_idempotent,
                "resent commands whose replies were lost; non-idempotent ones may have run twice"
            );
        } else if self.commands > 0 {
            tracing::info!(
                target_node = self.target,
                commands = self.commands,
                "resent commands whose replies were lost (all idempotent)"
            );
        }
    }
}

fn key_text(key: &[u8]) -> String {
    String::from_utf8_lossy(&key[..key.len().min(80)]).into_owned()
}

/// A value too big for one RESTORE is written in parts. Counted by the
/// caller (`big_values`).
pub struct BigValue<'a> {
    pub source: &'a str,
    pub key: &'a [u8],
    pub kind: &'a str,
}

impl BigValue<'_> {
    pub fn emit(self) {
        tracing::info!(
            source = self.source,
            key = key_text(self.key),
            kind = self.kind,
            "big value: writing it in parts"
        );
    }
}

/// Hash fields with a TTL went to a target without field TTLs (before
/// 7.4): they were written without it. Counted by the caller.
pub struct FieldTtlsDropped<'a> {
    pub source: &'a str,
    pub key: &'a [u8],
    pub fields: u64,
}

impl FieldTtlsDropped<'_> {
    pub fn emit(self, limiter: &mut LogLimiter) {
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

/// The target refused a RESTORE payload (a newer Redis wrote it), and the
/// value was rebuilt with ordinary commands.
pub struct RestoreRebuilt<'a> {
    pub target: &'a str,
    pub key: &'a [u8],
    pub reply: &'a str,
}

impl RestoreRebuilt<'_> {
    pub fn emit(self, stats: &WriterStats, limiter: &mut LogLimiter) {
        stats.restores_rebuilt.fetch_add(1, Ordering::Relaxed);
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
