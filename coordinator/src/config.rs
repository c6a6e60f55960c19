//! Task configuration: the TOML file (`--config`) and the command line map
//! onto the same [`TaskConfig`]. Flags given on the command line override
//! the file.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use engine::filter::{DbFilter, KeyFilter, KeyPattern};
use serde::Deserialize;
use shard_worker::Endpoint;

use crate::cli::SyncArgs;
use crate::url::{self, SourceSpec, UrlError};

/// What to do with keys the target already has.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum OnConflict {
    /// Refuse to start unless the target's databases we write to are empty.
    #[default]
    Precheck,
    /// Start anyway; the source's value replaces the target's (RESTORE REPLACE).
    Ignore,
    /// Start anyway; keys the target already has are kept as they are.
    Skip,
}

/// What a replayed command the target refuses for itself (WRONGTYPE, a
/// syntax error, BUSYKEY, a command it does not know) does to the task.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum OnError {
    /// The task stops, with one line naming the node, the command and its
    /// key: the target no longer matches the source there.
    #[default]
    Stop,
    /// The command is counted and logged, and the sync goes on.
    Skip,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// One or several values (TOML `target = "..."` or `target = ["...", ...]`).
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

/// The TOML task file.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Source URL: `redis://[user[:password]@]host:port` or
    /// `twemproxy:///path/nutcracker.yml[#pool]`.
    pub source: Option<String>,
    /// Target URL(s).
    pub target: Option<OneOrMany>,
    /// Address of the status and metrics endpoint.
    pub http: Option<String>,
    /// Where checkpoints are kept (none: a restart starts with a full sync).
    pub checkpoint_dir: Option<PathBuf>,
    /// Source databases to copy (default: all).
    #[serde(default)]
    pub db: Vec<u32>,
    /// Renamed databases, as `"SRC:DST"`.
    #[serde(default)]
    pub db_map: Vec<String>,
    pub on_conflict: Option<OnConflict>,
    /// How long network errors are retried, e.g. `"720m"`, `"30s"`.
    pub retry_timeout: Option<String>,
    /// How long a target node may answer nothing, e.g. `"120s"`.
    pub target_timeout: Option<String>,
    pub log_format: Option<LogFormat>,
    /// Replay PUBLISH on the target.
    pub replay_publish: Option<bool>,
    /// Memory per shard and per target node before spilling to disk
    /// (`"32MB"`).
    pub spill_memory: Option<String>,
    /// Values larger than this are written in parts (`"64MB"`).
    pub big_key_threshold: Option<String>,
    /// Rebuild every value with ordinary commands instead of RESTORE.
    pub force_rewrite: Option<bool>,
    /// Keys copied: prefixes or globs (default: every key).
    #[serde(default)]
    pub include: Vec<String>,
    /// Keys left out: prefixes or globs.
    #[serde(default)]
    pub exclude: Vec<String>,
    /// Write the heartbeat key on the sources (default true).
    pub heartbeat: Option<bool>,
    /// Apply every replayed command exactly once, across lost links and
    /// restarts (markers on the target; default true).
    pub exactly_once: Option<bool>,
    /// What a command the target refuses for itself does: `"stop"` (the
    /// default) or `"skip"`.
    pub on_error: Option<OnError>,
}

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("no source given (--source URL or `source` in the config file)")]
    NoSource,
    #[error("no target given (--target URL or `target` in the config file)")]
    NoTarget,
    #[error(transparent)]
    Url(#[from] UrlError),
    #[error("--http {0}: expected host:port, e.g. 127.0.0.1:9750")]
    Http(String),
    #[error("--{0} {1}: expected a duration like 30s, 10m or 12h")]
    Duration(&'static str, String),
    #[error("--db-map {0}: expected SRC:DST, two database numbers")]
    DbMap(String),
    #[error("--{0} {1}: expected a size like 64MB, 512KB or 1GB")]
    Size(&'static str, String),
    #[error("--include/--exclude {0:?}: an empty pattern")]
    Pattern(String),
    #[error("--db-map maps source databases {0} and {1} onto the same target database {2}")]
    DbMapCollision(u32, u32, u32),
}

/// A resolved, validated task.
#[derive(Clone, Debug)]
pub struct TaskConfig {
    pub source: SourceSpec,
    pub targets: Vec<Endpoint>,
    /// Per target: the Sentinels that name its master (`redis+sentinel://`);
    /// its endpoint is then what they said when last asked.
    pub target_sentinels: Vec<Option<url::SentinelSpec>>,
    pub http: SocketAddr,
    pub checkpoint_dir: Option<PathBuf>,
    pub db_filter: DbFilter,
    pub on_conflict: OnConflict,
    pub retry_timeout: Duration,
    /// A target node silent this long is reconnected.
    pub target_timeout: Duration,
    pub log_format: LogFormat,
    pub replay_publish: bool,
    pub spill_memory: usize,
    pub big_key_threshold: usize,
    pub force_rewrite: bool,
    pub key_filter: KeyFilter,
    pub heartbeat: bool,
    pub exactly_once: bool,
    pub on_error: OnError,
}

pub const DEFAULT_SPILL_MEMORY: &str = "32MB";
pub const DEFAULT_BIG_KEY_THRESHOLD: &str = "64MB";
pub const DEFAULT_HTTP: &str = "127.0.0.1:9750";
pub const DEFAULT_RETRY_TIMEOUT: &str = "720m";
pub const DEFAULT_TARGET_TIMEOUT: &str = "120s";

/// A duration option (`name` for the error), or its default.
fn duration(
    name: &'static str,
    given: Option<String>,
    default: &str,
) -> Result<Duration, ConfigError> {
    let text = given.unwrap_or_else(|| default.to_string());
    match humantime::parse_duration(&text) {
        Ok(d) if !d.is_zero() => Ok(d),
        _ => Err(ConfigError::Duration(name, text)),
    }
}

impl FileConfig {
    pub fn load(path: &Path) -> Result<FileConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.message().to_string()
                + &e.span()
                    .map(|s| format!(" (at byte {})", s.start))
                    .unwrap_or_default(),
        })
    }
}

impl TaskConfig {
    /// Merges the config file (if any) with the command line and validates.
    pub fn from_args(args: &SyncArgs) -> Result<TaskConfig, ConfigError> {
        let file = match &args.config {
            Some(path) => FileConfig::load(path)?,
            None => FileConfig::default(),
        };
        let source = args
            .source
            .clone()
            .or(file.source)
            .ok_or(ConfigError::NoSource)?;
        let targets: Vec<String> = if !args.targets.is_empty() {
            args.targets.clone()
        } else {
            match file.target {
                Some(OneOrMany::One(t)) => vec![t],
                Some(OneOrMany::Many(ts)) => ts,
                None => vec![],
            }
        };
        if targets.is_empty() {
            return Err(ConfigError::NoTarget);
        }
        let http = args
            .http
            .clone()
            .or(file.http)
            .unwrap_or_else(|| DEFAULT_HTTP.to_string());
        let http: SocketAddr = http.parse().map_err(|_| ConfigError::Http(http.clone()))?;
        let retry_timeout = duration(
            "retry-timeout",
            args.retry_timeout.clone().or(file.retry_timeout),
            DEFAULT_RETRY_TIMEOUT,
        )?;
        let target_timeout = duration(
            "target-timeout",
            args.target_timeout.clone().or(file.target_timeout),
            DEFAULT_TARGET_TIMEOUT,
        )?;
        let dbs = if !args.dbs.is_empty() {
            args.dbs.clone()
        } else {
            file.db
        };
        let maps = if !args.db_maps.is_empty() {
            args.db_maps.clone()
        } else {
            file.db_map
        };
        let (targets, target_sentinels) = targets
            .iter()
            .map(|t| url::parse_sync_target(t))
            .collect::<Result<Vec<_>, _>>()?
            .into_iter()
            .unzip();
        Ok(TaskConfig {
            source: url::parse_source(&source)?,
            targets,
            target_sentinels,
            http,
            checkpoint_dir: args.checkpoint_dir.clone().or(file.checkpoint_dir),
            db_filter: db_filter(dbs, &maps)?,
            on_conflict: args.on_conflict.or(file.on_conflict).unwrap_or_default(),
            retry_timeout,
            target_timeout,
            log_format: args.log_format.or(file.log_format).unwrap_or_default(),
            replay_publish: args.replay_publish || file.replay_publish.unwrap_or(false),
            spill_memory: {
                let text = args
                    .spill_memory
                    .clone()
                    .or(file.spill_memory)
                    .unwrap_or_else(|| DEFAULT_SPILL_MEMORY.to_string());
                parse_size(&text).ok_or(ConfigError::Size("spill-memory", text))?
            },
            big_key_threshold: {
                let text = args
                    .big_key_threshold
                    .clone()
                    .or(file.big_key_threshold)
                    .unwrap_or_else(|| DEFAULT_BIG_KEY_THRESHOLD.to_string());
                parse_size(&text)
                    .filter(|&n| n >= 1024)
                    .ok_or(ConfigError::Size("big-key-threshold", text))?
            },
            force_rewrite: args.force_rewrite || file.force_rewrite.unwrap_or(false),
            heartbeat: !args.no_heartbeat && file.heartbeat.unwrap_or(true),
            exactly_once: !args.no_exactly_once && file.exactly_once.unwrap_or(true),
            on_error: args.on_error.or(file.on_error).unwrap_or_default(),
            key_filter: key_filter(
                if args.includes.is_empty() {
                    &file.include
                } else {
                    &args.includes
                },
                if args.excludes.is_empty() {
                    &file.exclude
                } else {
                    &args.excludes
                },
            )?,
        })
    }
}

/// `64MB`, `512KB`, `1GB`, `4096` (bytes; powers of 1024).
pub fn parse_size(text: &str) -> Option<usize> {
    let t = text.trim().to_ascii_uppercase();
    let (digits, unit) = t.split_at(t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len()));
    let n: usize = digits.parse().ok()?;
    let mult = match unit.trim() {
        "" | "B" => 1,
        "K" | "KB" => 1 << 10,
        "M" | "MB" => 1 << 20,
        "G" | "GB" => 1 << 30,
        _ => return None,
    };
    n.checked_mul(mult)
}

/// Builds the key filter from `--include` and `--exclude`.
pub fn key_filter(include: &[String], exclude: &[String]) -> Result<KeyFilter, ConfigError> {
    for p in include.iter().chain(exclude) {
        if p.is_empty() {
            return Err(ConfigError::Pattern(p.clone()));
        }
    }
    Ok(KeyFilter::new(
        include.iter().map(|p| KeyPattern::parse(p)).collect(),
        exclude.iter().map(|p| KeyPattern::parse(p)).collect(),
    ))
}

/// Builds the database filter from `--db` and `--db-map`.
pub fn db_filter(dbs: Vec<u32>, maps: &[String]) -> Result<DbFilter, ConfigError> {
    let mut map = BTreeMap::new();
    for m in maps {
        let (src, dst) = m
            .split_once(':')
            .and_then(|(a, b)| Some((a.trim().parse::<u32>().ok()?, b.trim().parse::<u32>().ok()?)))
            .ok_or_else(|| ConfigError::DbMap(m.clone()))?;
        map.insert(src, dst);
    }
    let filter = DbFilter::new(dbs, map);
    // Two source databases landing in one target database would merge them.
    let sources: Vec<u32> = match filter.selected() {
        Some(s) => s.to_vec(),
        None => (0..64).chain(filter.mapping().keys().copied()).collect(),
    };
    let mut seen: BTreeMap<u32, u32> = BTreeMap::new();
    for src in sources {
        if let Some(dst) = filter.target_db(src) {
            if let Some(&other) = seen.get(&dst) {
                if other != src {
                    return Err(ConfigError::DbMapCollision(
                        other.min(src),
                        other.max(src),
                        dst,
                    ));
                }
            }
            seen.insert(dst, src);
        }
    }
    Ok(filter)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_config_refuses_unknown_fields() {
        let err = toml::from_str::<FileConfig>("source = 'redis://h:1'\ntargte = 'x'").unwrap_err();
        assert!(err.to_string().contains("targte"), "{err}");
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("32MB"), Some(32 << 20));
        assert_eq!(parse_size("512kb"), Some(512 << 10));
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("1 GB"), Some(1 << 30));
        assert_eq!(parse_size("lots"), None);
    }

    #[test]
    fn db_map_parsing_and_collisions() {
        let f = db_filter(vec![1], &["1:0".into()]).unwrap();
        assert_eq!(f.target_db(1), Some(0));
        assert!(matches!(
            db_filter(vec![], &["x".into()]),
            Err(ConfigError::DbMap(_))
        ));
        // Without --db, db 0 is copied too, so mapping 1 onto 0 would merge.
        assert!(matches!(
            db_filter(vec![], &["1:0".into()]),
            Err(ConfigError::DbMapCollision(0, 1, 0))
        ));
        assert!(db_filter(vec![0, 1], &["1:2".into()]).is_ok());
    }
}
