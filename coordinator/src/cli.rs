//! The command line.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::config::{LogFormat, OnConflict, OnError};

/// shardsync: one-way Redis-to-Redis synchronization (full copy, then every
/// write as it happens).
#[derive(Debug, Parser)]
#[command(name = "shardsync", version, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Copy the source to the target, then keep it in sync until SIGINT/SIGTERM.
    Sync(SyncArgs),
    /// Run the prechecks only; exit 0 when they pass.
    Precheck(SyncArgs),
    /// Compare source and target key by key; exit 0 when consistent.
    Verify(VerifyArgs),
}

#[derive(Debug, Clone, Default, Args)]
pub struct SyncArgs {
    /// Task file (TOML); flags given here override it.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Source: redis://[user[:password]@]host:port, rediss://..., or
    /// twemproxy:///path/nutcracker.yml[#pool].
    #[arg(long, value_name = "URL")]
    pub source: Option<String>,
    /// Target: redis://[user[:password]@]host:port (repeatable).
    #[arg(long = "target", value_name = "URL")]
    pub targets: Vec<String>,
    /// Status and metrics endpoint [default: 127.0.0.1:9750].
    #[arg(long, value_name = "ADDR")]
    pub http: Option<String>,
    /// Directory for checkpoints; a restart resumes from them with a partial
    /// resync.
    #[arg(long, value_name = "DIR")]
    pub checkpoint_dir: Option<PathBuf>,
    /// Source database to copy (repeatable; default: all).
    #[arg(long = "db", value_name = "N")]
    pub dbs: Vec<u32>,
    /// Copy source database SRC into target database DST (repeatable).
    #[arg(long = "db-map", value_name = "SRC:DST")]
    pub db_maps: Vec<String>,
    /// What to do when the target already holds keys [default: precheck].
    #[arg(long, value_enum)]
    pub on_conflict: Option<OnConflict>,
    /// How long network errors are retried before the task fails
    /// [default: 720m].
    #[arg(long, value_name = "DURATION")]
    pub retry_timeout: Option<String>,
    /// A target node that answers nothing for this long is taken as down:
    /// the connection is dropped and opened again [default: 120s].
    #[arg(long, value_name = "DURATION")]
    pub target_timeout: Option<String>,
    /// Log format [default: text].
    #[arg(long, value_enum)]
    pub log_format: Option<LogFormat>,
    /// Replay PUBLISH on the target (off by default).
    #[arg(long)]
    pub replay_publish: bool,
    /// Memory per shard (unparsed stream) and per target node (batches
    /// waiting for it) before spilling to disk, e.g. 32MB [default: 32MB].
    #[arg(long, value_name = "SIZE")]
    pub spill_memory: Option<String>,
    /// Values whose serialization is larger than this are written in
    /// bounded parts instead of one RESTORE, e.g. 64MB [default: 64MB].
    #[arg(long, value_name = "SIZE")]
    pub big_key_threshold: Option<String>,
    /// Rebuild every value with ordinary commands (SET, RPUSH, HSET, ZADD,
    /// XADD, ...) instead of RESTORE, whatever the versions.
    #[arg(long)]
    pub force_rewrite: bool,
    /// Copy only keys that start with PREFIX or match GLOB (repeatable).
    #[arg(long = "include", value_name = "PREFIX|GLOB")]
    pub includes: Vec<String>,
    /// Leave out keys that start with PREFIX or match GLOB (repeatable).
    #[arg(long = "exclude", value_name = "PREFIX|GLOB")]
    pub excludes: Vec<String>,
    /// Do not write the heartbeat key on the sources (no lag figures from
    /// the source's clock).
    #[arg(long)]
    pub no_heartbeat: bool,
    /// Do not write applied-position markers on the targets: commands resent
    /// after a lost target link or a restart may then run twice.
    #[arg(long)]
    pub no_exactly_once: bool,
    /// What a replayed command the target refuses for itself (WRONGTYPE, a
    /// syntax error, BUSYKEY) does: stop the task with one line naming the
    /// node, command and key, or skip it (counted and logged)
    /// [default: stop].
    #[arg(long, value_enum)]
    pub on_error: Option<OnError>,
}

#[derive(Debug, Clone, Args)]
pub struct VerifyArgs {
    /// Source: redis://[user[:password]@]host:port (a server or any node of
    /// a cluster), or twemproxy:///path/nutcracker.yml[#pool].
    #[arg(long, value_name = "URL")]
    pub source: String,
    /// Target: redis://[user[:password]@]host:port (a server or any node of
    /// a cluster).
    #[arg(long = "target", value_name = "URL")]
    pub target: String,
    /// Source database to compare (repeatable; default: all with keys).
    #[arg(long = "db", value_name = "N")]
    pub dbs: Vec<u32>,
    /// Source database SRC was copied into target database DST.
    #[arg(long = "db-map", value_name = "SRC:DST")]
    pub db_maps: Vec<String>,
    /// Compare only keys that start with PREFIX or match GLOB (repeatable).
    #[arg(long = "include", value_name = "PREFIX|GLOB")]
    pub includes: Vec<String>,
    /// Leave out keys that start with PREFIX or match GLOB (repeatable).
    #[arg(long = "exclude", value_name = "PREFIX|GLOB")]
    pub excludes: Vec<String>,
    /// Differences to print before stopping the list.
    #[arg(long, default_value_t = 20)]
    pub show: usize,
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn help_opens_with_a_sentence_for_users() {
        let help = Cli::command().render_help().to_string();
        let first = help.lines().next().unwrap_or_default();
        assert!(
            first.starts_with("shardsync: one-way Redis-to-Redis"),
            "{first}"
        );
        assert!(!help.contains("The shardsync binary"), "{help}");
    }
}
