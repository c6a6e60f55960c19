//! Running a planned task: heartbeats on the sources, one supervisor per
//! target, signals, and the outcome.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use engine::replay::ReplayConfig;
use engine::restore::Existing;
use ractor::Actor;
use shard_worker::source::IntakeOptions;
use shard_worker::write::RetryPolicy;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::oneshot;

use crate::checkpoint;
use crate::config::{OnConflict, TaskConfig};
use crate::heartbeat;
use crate::precheck::Plan;
use crate::status::TaskStatus;
use crate::task::{Outcome, Task, TaskArgs, TaskMsg};

/// How long a stop waits for in-flight writes before giving up on them.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(60);

/// What every target's task shares.
struct Shared<'a> {
    cfg: &'a TaskConfig,
    status: Arc<TaskStatus>,
    listening_port: u16,
    heartbeat_id: Option<String>,
    spill_base: PathBuf,
    /// Temporary key names of this run: distinct from any other run's.
    scope: String,
    many: bool,
}

/// Runs the task until it is stopped or fails.
pub async fn run(
    cfg: &TaskConfig,
    plans: Vec<Plan>,
    status: Arc<TaskStatus>,
    listening_port: u16,
) -> Outcome {
    let spill_base = match &cfg.checkpoint_dir {
        Some(dir) => dir.join("spill"),
        None => std::env::temp_dir().join(format!("shardsync-spill-{}", std::process::id())),
    };
    // Heartbeats on every source master, under this task's id (one id for
    // all its targets: each target's workers see the same heartbeat).
    let heartbeat_id = cfg.heartbeat.then(|| plans[0].task_id.clone());
    let heartbeats: Vec<_> = match &heartbeat_id {
        Some(id) => plans[0]
            .shards
            .iter()
            .map(|s| {
                let sentinel = match &cfg.source {
                    crate::url::SourceSpec::Sentinel(spec) => Some(spec.clone()),
                    _ => None,
                };
                heartbeat::spawn(
                    s.endpoint.clone(),
                    engine::heartbeat::key(id, s.slot),
                    sentinel,
                )
            })
            .collect(),
        None => Vec::new(),
    };
    let shared = Shared {
        cfg,
        status,
        listening_port,
        heartbeat_id,
        spill_base,
        scope: run_scope(),
        many: plans.len() > 1,
    };
    let mut tasks = Vec::new();
    let mut dones = Vec::new();
    let mut outcome = None;
    for (i, plan) in plans.into_iter().enumerate() {
        let (done_tx, done_rx) = oneshot::channel();
        match Actor::spawn(None, Task, task_args(&shared, i, plan, done_tx)).await {
            Ok((task, _)) => {
                tasks.push(task);
                dones.push(done_rx);
            }
            Err(e) => {
                for t in &tasks {
                    let _ = t.send_message(TaskMsg::Abort);
                }
                outcome = Some(Outcome::Failed(format!("cannot start the task: {e}")));
                break;
            }
        }
    }
    let outcome = match outcome {
        Some(failed) => failed,
        None => wait_for_outcome(&tasks, dones).await,
    };
    for h in heartbeats {
        h.abort();
    }
    if cfg.checkpoint_dir.is_none() {
        let _ = std::fs::remove_dir_all(&shared.spill_base);
    }
    outcome
}

/// The supervisor's arguments for target `i`'s plan.
fn task_args(
    shared: &Shared<'_>,
    i: usize,
    plan: Plan,
    done: oneshot::Sender<Outcome>,
) -> TaskArgs {
    let cfg = shared.cfg;
    // Each target spills into a directory of its own.
    let spill_dir = if shared.many {
        shared
            .spill_base
            .join(format!("to-{}", checkpoint::file_name(&plan.name)))
    } else {
        shared.spill_base.clone()
    };
    let replay = ReplayConfig {
        db_filter: plan.db_filter.clone(),
        key_filter: cfg.key_filter.clone(),
        source_databases: plan.source_databases,
        replay_publish: cfg.replay_publish,
        target_caps: plan.target_caps,
        force_rewrite: cfg.force_rewrite,
        heartbeat_id: shared.heartbeat_id.clone(),
        tmp_scope: if shared.many {
            format!("{}t{i}", shared.scope)
        } else {
            shared.scope.clone()
        },
    };
    let options = IntakeOptions {
        replay,
        existing: match cfg.on_conflict {
            OnConflict::Skip => Existing::Keep,
            OnConflict::Precheck | OnConflict::Ignore => Existing::Replace,
        },
        spill_dir,
        spill_memory: cfg.spill_memory,
        big_key_bytes: plan.big_key_bytes,
        ..IntakeOptions::default()
    };
    TaskArgs {
        name: plan.name,
        shards: plan.shards,
        target: plan.target,
        options,
        retry: RetryPolicy {
            timeout: cfg.retry_timeout,
            reply_timeout: cfg.target_timeout,
            ..RetryPolicy::default()
        },
        listening_port: shared.listening_port,
        status: shared.status.clone(),
        checkpoints: plan.checkpoints,
        done,
        task_id: plan.task_id,
        exactly_once: plan.exactly_once,
        sentinel: match &cfg.source {
            crate::url::SourceSpec::Sentinel(spec) => Some(spec.clone()),
            _ => None,
        },
        // Plans are in the order of the targets.
        target_sentinel: cfg.target_sentinels.get(i).cloned().flatten(),
        on_error: match cfg.on_error {
            crate::config::OnError::Stop => shard_worker::write::OnError::Stop,
            crate::config::OnError::Skip => shard_worker::write::OnError::Skip,
        },
    }
}

/// A short tag unique to this run, for temporary key names.
fn run_scope() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!("{:x}{:x}", std::process::id(), nanos & 0xfff)
}

/// Waits for every target's task to end; the first SIGINT/SIGTERM drains
/// them, a second one (or a drain that takes too long) stops them at once.
/// One task failing stops the others (their checkpoints are written, so a
/// restart resumes them) and fails the run.
async fn wait_for_outcome(
    tasks: &[ractor::ActorRef<TaskMsg>],
    dones: Vec<oneshot::Receiver<Outcome>>,
) -> Outcome {
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        return Outcome::Failed("cannot install signal handlers".into());
    };
    let (tx, mut outcomes) = tokio::sync::mpsc::unbounded_channel();
    for done in dones {
        let tx = tx.clone();
        tokio::spawn(async move {
            let outcome = done
                .await
                .unwrap_or_else(|_| Outcome::Failed("the task ended without an outcome".into()));
            let _ = tx.send(outcome);
        });
    }
    drop(tx);
    let send_all = |msg: fn() -> TaskMsg| {
        for t in tasks {
            let _ = t.send_message(msg());
        }
    };
    let mut deadline: Option<tokio::time::Instant> = None;
    let mut combined = Outcome::Drained;
    let mut left = tasks.len();
    while left > 0 {
        let drain_timer = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            outcome = outcomes.recv() => {
                let Some(outcome) = outcome else { break };
                left -= 1;
                match outcome {
                    Outcome::Failed(message) if !matches!(combined, Outcome::Failed(_)) => {
                        if left > 0 {
                            tracing::warn!("one target failed: stopping the others");
                        }
                        send_all(|| TaskMsg::Abort);
                        combined = Outcome::Failed(message);
                    }
                    Outcome::Restart(why) if !matches!(combined, Outcome::Failed(_)) => {
                        send_all(|| TaskMsg::Abort);
                        combined = Outcome::Restart(why);
                    }
                    Outcome::Aborted if combined == Outcome::Drained => combined = Outcome::Aborted,
                    _ => {}
                }
            }
            _ = term.recv() => on_signal(&send_all, &mut deadline),
            _ = int.recv() => on_signal(&send_all, &mut deadline),
            _ = drain_timer => {
                tracing::warn!(secs = DRAIN_TIMEOUT.as_secs(), "drain took too long");
                send_all(|| TaskMsg::Abort);
                deadline = None;
            }
        }
    }
    combined
}

fn on_signal(send_all: &dyn Fn(fn() -> TaskMsg), deadline: &mut Option<tokio::time::Instant>) {
    if deadline.is_none() {
        tracing::info!("signal received: draining (send it again to stop at once)");
        send_all(|| TaskMsg::Shutdown);
        *deadline = Some(tokio::time::Instant::now() + DRAIN_TIMEOUT);
    } else {
        send_all(|| TaskMsg::Abort);
    }
}
