//! The task as `/status` shows it.
//!
//! ```json
//! {"state": "...", "shards": [{"source": "host:port", "state": "...",
//!   "offset": N, "lag_ms": N,
//!   "full_sync": {"keys": N, "bytes": N, "total_bytes": N}}]}
//! ```
//!
//! Fields beyond the contract (applied offsets, targets, the error that
//! failed the task) are added, never renamed. With several targets a
//! source appears once per target, its entry naming the target.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use serde::Serialize;
use shard_worker::progress::{ShardState, ShardStats, WriterStats};

/// The shards and writers of one target, known once the precheck has
/// planned the task (writers are added when a cluster target gains a
/// master).
pub struct Workers {
    /// The target as named on the command line.
    pub target: String,
    /// Shards are added when a cluster source gains a master.
    shards: RwLock<Vec<Arc<ShardStats>>>,
    writers: RwLock<Vec<Arc<WriterStats>>>,
}

impl Workers {
    pub fn new(target: String, shards: Vec<Arc<ShardStats>>) -> Workers {
        Workers {
            target,
            shards: RwLock::new(shards),
            writers: RwLock::new(Vec::new()),
        }
    }

    pub fn shards(&self) -> Vec<Arc<ShardStats>> {
        self.shards.read().expect("shards lock").clone()
    }

    pub fn add_shard(&self, stats: Arc<ShardStats>) {
        self.shards.write().expect("shards lock").push(stats);
    }

    pub fn writers(&self) -> Vec<Arc<WriterStats>> {
        self.writers.read().expect("writers lock").clone()
    }

    pub fn add_writer(&self, stats: Arc<WriterStats>) {
        self.writers.write().expect("writers lock").push(stats);
    }

    /// Marks every shard that did not fail as stopped.
    pub fn set_stopped(&self) {
        for s in &self.shards() {
            if s.state() != ShardState::Failed {
                s.set_state(ShardState::Stopped);
            }
        }
    }

    /// A shard's state as reported: an incremental shard whose target
    /// connection is down is `reconnecting`.
    pub fn shard_state(&self, shard: &ShardStats) -> ShardState {
        let state = shard.state();
        let writers_down = self
            .writers()
            .iter()
            .any(|w| !w.connected.load(Ordering::Relaxed));
        if state == ShardState::Incremental && writers_down {
            ShardState::Reconnecting
        } else {
            state
        }
    }
}

/// Task-level state set by the coordinator itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
enum Phase {
    Prechecking = 0,
    Running = 1,
    Stopped = 2,
    Failed = 3,
}

pub struct TaskStatus {
    phase: AtomicU8,
    groups: RwLock<Vec<Arc<Workers>>>,
    error: Mutex<Option<String>>,
    pub started: Instant,
}

impl Default for TaskStatus {
    fn default() -> Self {
        TaskStatus {
            phase: AtomicU8::new(Phase::Prechecking as u8),
            groups: RwLock::new(Vec::new()),
            error: Mutex::new(None),
            started: Instant::now(),
        }
    }
}

impl TaskStatus {
    /// Adds the workers of one target; the task runs once it has any.
    pub fn add_group(&self, workers: Workers) -> Arc<Workers> {
        let workers = Arc::new(workers);
        self.groups
            .write()
            .expect("groups lock")
            .push(workers.clone());
        self.phase.store(Phase::Running as u8, Ordering::Release);
        workers
    }

    /// Forgets the workers: the task starts again (a target failed over).
    pub fn restart(&self) {
        self.groups.write().expect("groups lock").clear();
        self.phase
            .store(Phase::Prechecking as u8, Ordering::Release);
    }

    /// The workers of every target, in the order the targets were given.
    pub fn groups(&self) -> Vec<Arc<Workers>> {
        self.groups.read().expect("groups lock").clone()
    }

    pub fn set_stopped(&self) {
        self.phase.store(Phase::Stopped as u8, Ordering::Release);
        for g in self.groups() {
            g.set_stopped();
        }
    }

    pub fn set_failed(&self, error: String) {
        *self.error.lock().expect("error lock") = Some(error);
        self.phase.store(Phase::Failed as u8, Ordering::Release);
    }

    pub fn error(&self) -> Option<String> {
        self.error.lock().expect("error lock").clone()
    }

    /// The task's state, derived from its shards while it runs.
    pub fn state(&self) -> &'static str {
        match self.phase() {
            Phase::Prechecking => return "prechecking",
            Phase::Stopped => return "stopped",
            Phase::Failed => return "failed",
            Phase::Running => {}
        }
        let groups = self.groups();
        if groups.is_empty() {
            return "prechecking";
        }
        let states: Vec<ShardState> = groups
            .iter()
            .flat_map(|g| {
                g.shards()
                    .iter()
                    .map(|s| g.shard_state(s))
                    .collect::<Vec<_>>()
            })
            .collect();
        let any = |st: ShardState| states.contains(&st);
        if any(ShardState::Failed) {
            "failed"
        } else if any(ShardState::Reconnecting) {
            "reconnecting"
        } else if any(ShardState::FullSync) || any(ShardState::Prechecking) {
            "full_sync"
        } else if states.iter().all(|s| *s == ShardState::Stopped) && !states.is_empty() {
            "stopped"
        } else {
            "incremental"
        }
    }

    fn phase(&self) -> Phase {
        match self.phase.load(Ordering::Acquire) {
            0 => Phase::Prechecking,
            1 => Phase::Running,
            2 => Phase::Stopped,
            _ => Phase::Failed,
        }
    }

    pub fn snapshot(&self) -> StatusJson {
        let mut shards = Vec::new();
        let mut targets = Vec::new();
        for w in self.groups() {
            for s in &w.shards() {
                let (stream_lag_ms, applied_lag_ms) = s.heartbeat_lags();
                shards.push(ShardJson {
                    source: s.source.clone(),
                    target: w.target.clone(),
                    state: w.shard_state(s).as_str(),
                    offset: s.counters.source_offset.get(),
                    applied_offset: s.applied().unwrap_or(0),
                    lag_ms: s.lag_ms(),
                    full_sync: FullSyncJson {
                        keys: s.counters.full_sync_keys.get(),
                        bytes: s.counters.full_sync_bytes.get(),
                        total_bytes: s.counters.full_sync_total_bytes.get(),
                    },
                    heartbeat: HeartbeatJson {
                        stream_lag_ms,
                        applied_lag_ms,
                    },
                    internal_keys: InternalKeysJson {
                        source: u64::from(s.heartbeat_key_seen()),
                        target: s.marker_keys.load(Ordering::Relaxed),
                    },
                    values: ValuesJson {
                        restamped: s.counters.values_restamped.get(),
                        rebuilt: s.counters.values_rebuilt.get(),
                        in_parts: s.counters.big_values.get(),
                        field_ttls_dropped: s.counters.field_ttls_dropped.get(),
                        consumers_dropped: s.counters.consumers_dropped.get(),
                    },
                });
            }
            for t in &w.writers() {
                let errors = ErrorsJson::of(&t.error_counts());
                targets.push(TargetJson {
                    target: t.target.clone(),
                    connected: t.connected.load(Ordering::Relaxed),
                    commands_applied: t.counters.commands_applied.get(),
                    // Commands refused for themselves (what it always
                    // counted); refusals that were resent are in
                    // `errors_by_class`.
                    errors: errors.replay,
                    errors_by_class: errors,
                });
            }
        }
        let internal_keys = InternalKeysJson {
            source: shards.iter().map(|s| s.internal_keys.source).sum(),
            target: shards.iter().map(|s| s.internal_keys.target).sum(),
        };
        StatusJson {
            state: self.state(),
            internal_keys,
            shards,
            targets,
            uptime_secs: self.started.elapsed().as_secs(),
            error: self.error(),
        }
    }
}

#[derive(Serialize)]
pub struct StatusJson {
    pub state: &'static str,
    /// shardsync's own keys on each side, all shards together: with every
    /// database copied and no key filter, `DBSIZE` (summed over the
    /// nodes) minus these is the same on both sides once caught up.
    pub internal_keys: InternalKeysJson,
    pub shards: Vec<ShardJson>,
    pub targets: Vec<TargetJson>,
    pub uptime_secs: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Serialize)]
pub struct ShardJson {
    pub source: String,
    /// The target this shard's data goes to (as named on the command line).
    pub target: String,
    pub state: &'static str,
    /// Replication offset read from the source.
    pub offset: u64,
    /// Replication offset confirmed by the target(s).
    pub applied_offset: u64,
    pub lag_ms: u64,
    pub full_sync: FullSyncJson,
    /// Lag measured with the heartbeat key (null until one is seen, or when
    /// the source cannot be written to).
    pub heartbeat: HeartbeatJson,
    /// shardsync's own keys for this shard: its heartbeat on the source,
    /// its markers on the target.
    pub internal_keys: InternalKeysJson,
    /// RDB values not sent as a plain RESTORE.
    pub values: ValuesJson,
}

/// Keys shardsync keeps for itself (the `shardsync:` family), per side.
#[derive(Serialize, Clone, Copy)]
pub struct InternalKeysJson {
    pub source: u64,
    pub target: u64,
}

#[derive(Serialize)]
pub struct HeartbeatJson {
    /// From the heartbeat's write on the source to its arrival here.
    pub stream_lag_ms: Option<u64>,
    /// From its write to the target confirming everything before it.
    pub applied_lag_ms: Option<u64>,
}

#[derive(Serialize)]
pub struct ValuesJson {
    /// Payloads stamped with an older target's RDB version.
    pub restamped: u64,
    /// Rebuilt with ordinary commands.
    pub rebuilt: u64,
    /// Big values written in bounded parts.
    pub in_parts: u64,
    /// Hash fields written without their TTL (target before 7.4).
    pub field_ttls_dropped: u64,
    /// Stream consumers without pending entries left out (target before 6.2).
    pub consumers_dropped: u64,
}

#[derive(Serialize)]
pub struct FullSyncJson {
    pub keys: u64,
    pub bytes: u64,
    /// Size of the RDB when the source announced it; 0 for diskless
    /// transfers, whose size is not known in advance.
    pub total_bytes: u64,
}

#[derive(Serialize)]
pub struct TargetJson {
    pub target: String,
    pub connected: bool,
    pub commands_applied: u64,
    pub errors: u64,
    pub errors_by_class: ErrorsJson,
}

/// A target node's error replies by class.
#[derive(Serialize, Default)]
pub struct ErrorsJson {
    /// Commands it refused for themselves (skipped with `--on-error skip`).
    pub replay: u64,
    /// Refused for now (LOADING, CLUSTERDOWN ...) and sent again.
    pub retried: u64,
}

impl ErrorsJson {
    fn of(counts: &[(shard_worker::progress::ErrorClass, String, u64)]) -> ErrorsJson {
        use shard_worker::progress::ErrorClass;
        let sum = |class| counts.iter().filter(|c| c.0 == class).map(|c| c.2).sum();
        ErrorsJson {
            replay: sum(ErrorClass::Replay),
            retried: sum(ErrorClass::Retried),
        }
    }
}
