//! `shardsync`: the binary. Everything the user touches lives in this crate:
//! the command line and task file, prechecks, the supervisor that runs the
//! workers, checkpoints, the status/metrics endpoint, and `verify`.
//!
//! # Layout
//!
//! - `cli` / `config` / `url`: the command line and TOML task file, mapped
//!   onto one validated [`config::TaskConfig`].
//! - `server` / `precheck`: what the servers say about themselves, and the
//!   checks that refuse a task before any data moves; a passing precheck
//!   yields the plan (shards and targets).
//! - `task`: the supervisor actor; spawns writers and shard workers and
//!   restarts or fails them by their errors' recovery.
//! - `checkpoint`: resume points on disk.
//! - `status` / `metrics` / `http`: `/status` and `/metrics`.
//! - `verify`: the key-by-key compare.
//!
//! Exit codes: 0 done (or stopped cleanly), 1 the task failed, 2 bad usage
//! or configuration, 3 precheck refused, 4 verify found differences.

mod checkpoint;
mod cli;
mod config;
mod heartbeat;
mod http;
mod logging;
mod metrics;
mod precheck;
mod server;
mod status;
mod task;
mod twemproxy;
mod url;
mod verify;

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use engine::replay::ReplayConfig;
use engine::restore::Existing;
use ractor::Actor;
use shard_worker::source::IntakeOptions;
use shard_worker::write::RetryPolicy;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::oneshot;

use crate::checkpoint::CheckpointStore;
use crate::cli::{Cli, Command, SyncArgs, VerifyArgs};
use crate::config::{OnConflict, TaskConfig};
use crate::precheck::Level;
use crate::status::TaskStatus;
use crate::task::{Outcome, Task, TaskArgs, TaskMsg};

const EXIT_FAILED: u8 = 1;
const EXIT_USAGE: u8 = 2;
const EXIT_PRECHECK: u8 = 3;
const EXIT_DIFFERENT: u8 = 4;

/// How long a stop waits for in-flight writes before giving up on them.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(60);

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::from(EXIT_FAILED);
        }
    };
    let code = runtime.block_on(async {
        match cli.command {
            Command::Sync(args) => sync(args).await,
            Command::Precheck(args) => precheck_only(args).await,
            Command::Verify(args) => verify(args).await,
        }
    });
    // Worker tasks may still be winding down; they hold nothing worth
    // waiting for once the outcome is known.
    runtime.shutdown_timeout(Duration::from_secs(1));
    ExitCode::from(code)
}

fn config_or_exit(args: &SyncArgs) -> Result<TaskConfig, u8> {
    TaskConfig::from_args(args).map_err(|e| {
        eprintln!("error: {e}");
        EXIT_USAGE
    })
}

fn open_checkpoints(cfg: &TaskConfig) -> Result<Option<CheckpointStore>, u8> {
    match &cfg.checkpoint_dir {
        Some(dir) => CheckpointStore::open(dir).map(Some).map_err(|e| {
            tracing::error!("{e}");
            EXIT_USAGE
        }),
        None => Ok(None),
    }
}

async fn precheck_only(args: SyncArgs) -> u8 {
    let cfg = match config_or_exit(&args) {
        Ok(c) => c,
        Err(code) => return code,
    };
    logging::init(cfg.log_format);
    let store = match open_checkpoints(&cfg) {
        Ok(s) => s,
        Err(code) => return code,
    };
    let report = precheck::run(&cfg, store.as_ref()).await;
    for check in &report.checks {
        println!("{check}");
    }
    if report.passed() {
        println!("precheck passed");
        0
    } else {
        println!("precheck refused");
        EXIT_PRECHECK
    }
}

async fn sync(args: SyncArgs) -> u8 {
    let cfg = match config_or_exit(&args) {
        Ok(c) => c,
        Err(code) => return code,
    };
    logging::init(cfg.log_format);
    let status = Arc::new(TaskStatus::default());
    let http_addr = match http::serve(cfg.http, status.clone()).await {
        Ok(addr) => addr,
        Err(e) => {
            tracing::error!("{e}");
            return EXIT_USAGE;
        }
    };
    tracing::info!(status = %format!("http://{http_addr}/status"), metrics = %format!("http://{http_addr}/metrics"), "shardsync {}", env!("CARGO_PKG_VERSION"));
    let store = match open_checkpoints(&cfg) {
        Ok(s) => s,
        Err(code) => return code,
    };
    if store.is_none() {
        tracing::info!("no --checkpoint-dir: a restart will begin with a full sync");
    }

    let report = precheck::run(&cfg, store.as_ref()).await;
    for check in &report.checks {
        match check.level {
            Level::Pass => tracing::info!("precheck: {check}"),
            Level::Warn => tracing::warn!("precheck: {check}"),
            Level::Fail => tracing::error!("precheck refused: {check}"),
        }
    }
    if !report.passed() {
        status.set_failed("precheck refused".into());
        return EXIT_PRECHECK;
    }
    let plans = report.plans;
    let many = plans.len() > 1;

    let spill_base = match &cfg.checkpoint_dir {
        Some(dir) => dir.join("spill"),
        None => std::env::temp_dir().join(format!("shardsync-spill-{}", std::process::id())),
    };
    // Heartbeats on every source master, under this task's id (one id for
    // all its targets: each target's workers see the same heartbeat).
    let source_addrs: Vec<String> = plans[0].shards.iter().map(|s| s.endpoint.addr()).collect();
    let target_addrs: Vec<String> = plans
        .iter()
        .flat_map(|p| p.target.endpoints())
        .map(|e| e.addr())
        .collect();
    let heartbeat_id = cfg
        .heartbeat
        .then(|| heartbeat::task_id(&source_addrs, &target_addrs));
    let heartbeats: Vec<_> = match &heartbeat_id {
        Some(id) => plans[0]
            .shards
            .iter()
            .map(|s| heartbeat::spawn(s.endpoint.clone(), engine::heartbeat::key(id, s.slot)))
            .collect(),
        None => Vec::new(),
    };
    let scope = run_scope();
    let mut tasks = Vec::new();
    let mut dones = Vec::new();
    for (i, plan) in plans.into_iter().enumerate() {
        // Each target spills into a directory of its own.
        let spill_dir = if many {
            spill_base.join(format!("to-{}", checkpoint::file_name(&plan.name)))
        } else {
            spill_base.clone()
        };
        let replay = ReplayConfig {
            db_filter: plan.db_filter.clone(),
            key_filter: cfg.key_filter.clone(),
            source_databases: plan.source_databases,
            replay_publish: cfg.replay_publish,
            target_caps: plan.target_caps,
            force_rewrite: cfg.force_rewrite,
            heartbeat_id: heartbeat_id.clone(),
            // Temporary key names of this run: distinct from any other run's.
            tmp_scope: if many {
                format!("{scope}t{i}")
            } else {
                scope.clone()
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
        let (done_tx, done_rx) = oneshot::channel();
        let args = TaskArgs {
            name: plan.name,
            shards: plan.shards,
            target: plan.target,
            options,
            retry: RetryPolicy {
                timeout: cfg.retry_timeout,
                ..RetryPolicy::default()
            },
            listening_port: http_addr.port(),
            status: status.clone(),
            checkpoints: plan.checkpoints,
            done: done_tx,
        };
        match Actor::spawn(None, Task, args).await {
            Ok((task, _)) => {
                tasks.push(task);
                dones.push(done_rx);
            }
            Err(e) => {
                tracing::error!("cannot start the task: {e}");
                for t in &tasks {
                    let _ = t.send_message(TaskMsg::Abort);
                }
                return EXIT_FAILED;
            }
        }
    }
    let outcome = wait_for_outcome(&tasks, dones).await;
    for h in heartbeats {
        h.abort();
    }
    if cfg.checkpoint_dir.is_none() {
        let _ = std::fs::remove_dir_all(&spill_base);
    }
    match outcome {
        Outcome::Drained => {
            status.set_stopped();
            tracing::info!("stopped; every command read was applied");
            0
        }
        Outcome::Aborted => {
            status.set_stopped();
            tracing::warn!("stopped without draining; the checkpoint holds what was applied");
            0
        }
        Outcome::Failed(message) => {
            tracing::error!("{message}");
            EXIT_FAILED
        }
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

async fn verify(args: VerifyArgs) -> u8 {
    logging::init(args.log_format);
    let parsed = (|| {
        let source = url::parse_source(&args.source)?;
        let target = url::parse_target(&args.target)?;
        let filter = config::db_filter(args.dbs.clone(), &args.db_maps)?;
        let keys = config::key_filter(&args.includes, &args.excludes)?;
        Ok::<_, config::ConfigError>((source, target, filter, keys))
    })();
    let (source, target, filter, keys) = match parsed {
        Ok(p) => p,
        Err(e) => {
            eprintln!("error: {e}");
            return EXIT_USAGE;
        }
    };
    let resolved = async {
        let sources: Vec<shard_worker::Endpoint> = match &source {
            url::SourceSpec::Redis(ep) => {
                match server::masters(ep).await.map_err(|e| e.to_string())? {
                    Some(masters) => masters.into_iter().map(|(ep, _)| ep).collect(),
                    None => vec![ep.clone()],
                }
            }
            url::SourceSpec::Twemproxy {
                config,
                pool,
                user,
                password,
            } => {
                twemproxy::load(
                    config,
                    pool.as_deref(),
                    user.as_deref(),
                    password.as_ref().map(|p| p.expose()),
                )
                .map_err(|e| e.to_string())?
                .backends
            }
        };
        // The databases with keys on any source node.
        let mut used = std::collections::BTreeSet::new();
        for ep in &sources {
            used.extend(
                server::probe(ep)
                    .await
                    .map_err(|e| e.to_string())?
                    .keyspace
                    .into_keys(),
            );
        }
        let side = match server::masters(&target).await.map_err(|e| e.to_string())? {
            Some(masters) => {
                let (nodes, slots): (Vec<_>, Vec<_>) = masters.into_iter().unzip();
                verify::Side::open(&nodes, Some(&slots))
                    .await
                    .map_err(|e| e.to_string())?
            }
            None => verify::Side::open(std::slice::from_ref(&target), None)
                .await
                .map_err(|e| e.to_string())?,
        };
        Ok::<_, String>((sources, used, side))
    }
    .await;
    let (sources, used, mut side) = match resolved {
        Ok(r) => r,
        Err(e) => {
            tracing::error!("{e}");
            return EXIT_FAILED;
        }
    };
    let dbs: Vec<(u32, u32)> = used
        .into_iter()
        .filter_map(|db| filter.target_db(db).map(|t| (db, t)))
        .collect();
    if side.is_cluster() {
        if let Some((db, t)) = dbs.iter().find(|(_, t)| *t != 0) {
            eprintln!("error: source database {db} would be compared with database {t}, but a cluster target has only database 0 (use --db {db} --db-map {db}:0)");
            return EXIT_USAGE;
        }
    }
    match verify::verify(&sources, &mut side, &dbs, &keys, args.show).await {
        Ok(report) => {
            for line in &report.differences {
                println!("{line}");
            }
            for (db, n) in report.extra_on_target.iter().filter(|(_, n)| **n > 0) {
                println!("db{db}: {n} keys on the target that the source does not have");
            }
            println!(
                "compared {} keys: {} differences",
                report.keys_compared, report.n_differences
            );
            if report.consistent() {
                0
            } else {
                EXIT_DIFFERENT
            }
        }
        Err(e) => {
            tracing::error!("{e}");
            EXIT_FAILED
        }
    }
}
