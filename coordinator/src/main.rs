//! `shardsync`: the binary. Everything the user touches lives in this crate:
//! the command line and task file, prechecks, the supervisor that runs the
//! workers, checkpoints, the status/metrics endpoint, and `verify`.
//!
//! # Layout
//!
//! - `cli` / `config` / `url`: the command line and TOML task file, mapped
//!   onto one validated [`config::TaskConfig`].
//! - `server` / `topology`: what a server says about itself (INFO,
//!   CONFIG), and the masters behind a URL (a server, a cluster's masters,
//!   a Twemproxy pool's backends), resolved the same way for `sync` and
//!   `verify`.
//! - `precheck`: probe → facts → pure checks → plan; the checks that refuse
//!   a task before any data moves, and the plan (shards and targets) of a
//!   passing one.
//! - `run`: a planned task's heartbeats, supervisors and signals.
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
mod ownership;
mod precheck;
mod run;
mod sentinel;
mod server;
mod status;
mod task;
mod topology;
mod twemproxy;
mod url;
mod verify;

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;

use crate::checkpoint::CheckpointStore;
use crate::cli::{Cli, Command, SyncArgs, VerifyArgs};
use crate::config::TaskConfig;
use crate::precheck::Level;
use crate::status::TaskStatus;
use crate::task::Outcome;

const EXIT_FAILED: u8 = 1;
const EXIT_USAGE: u8 = 2;
const EXIT_PRECHECK: u8 = 3;
const EXIT_DIFFERENT: u8 = 4;

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

/// Sentinel-managed targets: the master their Sentinels name now.
async fn resolve_sentinel_targets(
    cfg: &mut config::TaskConfig,
) -> Result<(), sentinel::SentinelError> {
    for (i, spec) in cfg.target_sentinels.clone().iter().enumerate() {
        let Some(spec) = spec else { continue };
        let ep = sentinel::master_of(spec).await?;
        tracing::info!(target_master = %ep, master = %spec.name, "the Sentinels name the target's master");
        cfg.targets[i] = ep;
    }
    Ok(())
}

async fn precheck_only(args: SyncArgs) -> u8 {
    let mut cfg = match config_or_exit(&args) {
        Ok(c) => c,
        Err(code) => return code,
    };
    logging::init(cfg.log_format);
    let store = match open_checkpoints(&cfg) {
        Ok(s) => s,
        Err(code) => return code,
    };
    if let Err(e) = resolve_sentinel_targets(&mut cfg).await {
        println!("FAIL target reachable: {e}");
        println!("precheck refused");
        return EXIT_PRECHECK;
    }
    let mut report = precheck::run(&cfg, store.as_ref()).await;
    if report.retry {
        report = precheck::run(&cfg, store.as_ref()).await;
    }
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
    if store.is_none() && !cfg.exactly_once {
        tracing::info!(
            "no --checkpoint-dir and --no-exactly-once: a restart will begin with a full sync"
        );
    }

    // A target that fails over under the task (a promoted replica) makes it
    // start again here, the way a restart would: from the target's markers.
    let mut cfg = cfg;
    let outcome = loop {
        if let Err(e) = resolve_sentinel_targets(&mut cfg).await {
            tracing::error!("precheck refused: FAIL target reachable: {e}");
            status.set_failed("precheck refused".into());
            return EXIT_PRECHECK;
        }
        let report = precheck::run(&cfg, store.as_ref()).await;
        if report.retry {
            // The source's slot migrations ended while it waited: look at
            // the topology they left.
            continue;
        }
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
        match run::run(&cfg, report.plans, status.clone(), http_addr.port()).await {
            Outcome::Restart(why) => {
                tracing::warn!("{why}: the task starts again from the target's markers");
                status.restart();
            }
            outcome => break outcome,
        }
    };
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
        Outcome::Failed(message) | Outcome::Restart(message) => {
            tracing::error!("{message}");
            EXIT_FAILED
        }
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
        let sources = topology::source_masters(&source).await?;
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
        let side = match topology::resolve(&target)
            .await
            .map_err(|e| e.to_string())?
        {
            topology::Resolved::Cluster { masters, .. } => {
                let (nodes, slots): (Vec<_>, Vec<_>) =
                    masters.into_iter().map(|m| (m.endpoint, m.slots)).unzip();
                verify::Side::open(&nodes, Some(&slots)).await
            }
            topology::Resolved::Server(_) => {
                verify::Side::open(std::slice::from_ref(&target), None).await
            }
        }
        .map_err(|e| e.to_string())?;
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
            let (on_source, on_target) = report.internal_keys;
            println!(
                "compared {} keys: {} differences (left out: shardsync's own keys, {on_source} on the source, {on_target} on the target)",
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
