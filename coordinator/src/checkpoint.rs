//! Checkpoints: where each shard can resume, on disk.
//!
//! One file per shard, named after the source, written with bincode to a
//! temporary file, synced, and renamed over the old one, so a crash leaves
//! either the old checkpoint or the new one, never a torn one. A checkpoint
//! records the *applied* offset: everything before it is confirmed by the
//! targets.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use shard_worker::progress::{ResumePoint, ShardState, ShardStats};

/// Format version written in every file.
pub const FORMAT: u32 = 1;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CheckpointState {
    /// A full sync was under way: the targets hold part of this source's
    /// data (so a restart may write over it without the empty-target check).
    FullSyncInProgress,
    /// Everything up to `offset` of replication history `replid` is applied.
    Resumable {
        replid: String,
        offset: u64,
        db: u32,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub format: u32,
    /// `host:port` of the source master.
    pub source: String,
    /// `host:port` of every target, to notice a checkpoint of another task.
    pub targets: Vec<String>,
    pub state: CheckpointState,
    pub written_at_ms: u64,
}

impl Checkpoint {
    /// The checkpoint of a shard, or `None` when it has nothing to record
    /// (it never began a sync, and had no checkpoint to begin from).
    pub fn of(stats: &ShardStats, targets: &[String]) -> Option<Checkpoint> {
        let started = stats.counters.full_syncs.get() > 0 || stats.ours.load(Ordering::Relaxed);
        let state = match (stats.state(), stats.resume_point()) {
            (ShardState::FullSync, _) => CheckpointState::FullSyncInProgress,
            (_, Some(p)) => CheckpointState::Resumable {
                replid: p.replid,
                offset: p.offset,
                db: p.db,
            },
            (_, None) if started => CheckpointState::FullSyncInProgress,
            (_, None) => return None,
        };
        Some(Checkpoint {
            format: FORMAT,
            source: stats.source.clone(),
            targets: targets.to_vec(),
            state,
            written_at_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
        })
    }

    pub fn resume_point(&self) -> Option<ResumePoint> {
        match &self.state {
            CheckpointState::Resumable { replid, offset, db } => Some(ResumePoint {
                replid: replid.clone(),
                offset: *offset,
                db: *db,
            }),
            CheckpointState::FullSyncInProgress => None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("checkpoint directory {dir}: {source}")]
    Dir {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("checkpoint {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "checkpoint {path} is not readable ({message}); delete it to start over with a full sync"
    )]
    Corrupt { path: PathBuf, message: String },
}

/// The directory of a task's checkpoints.
#[derive(Clone, Debug)]
pub struct CheckpointStore {
    dir: PathBuf,
}

impl CheckpointStore {
    pub fn open(dir: &Path) -> Result<CheckpointStore, CheckpointError> {
        std::fs::create_dir_all(dir).map_err(|source| CheckpointError::Dir {
            dir: dir.to_path_buf(),
            source,
        })?;
        Ok(CheckpointStore {
            dir: dir.to_path_buf(),
        })
    }

    /// The store of one target of a task with several: a directory of
    /// its own (`to-<host_port>`) under this one.
    pub fn for_target(&self, target: &str) -> Result<CheckpointStore, CheckpointError> {
        CheckpointStore::open(&self.dir.join(format!("to-{}", file_name(target))))
    }

    pub fn path_for(&self, source: &str) -> PathBuf {
        self.dir.join(format!("shard-{}.ckpt", file_name(source)))
    }

    pub fn load(&self, source: &str) -> Result<Option<Checkpoint>, CheckpointError> {
        let path = self.path_for(source);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(CheckpointError::Io { path, source }),
        };
        let (ckpt, _): (Checkpoint, usize) =
            bincode::serde::decode_from_slice(&bytes, bincode::config::standard()).map_err(
                |e| CheckpointError::Corrupt {
                    path: path.clone(),
                    message: e.to_string(),
                },
            )?;
        if ckpt.format != FORMAT {
            return Err(CheckpointError::Corrupt {
                path,
                message: format!("format {} (this build writes {FORMAT})", ckpt.format),
            });
        }
        Ok(Some(ckpt))
    }

    pub fn save(&self, ckpt: &Checkpoint) -> Result<(), CheckpointError> {
        let path = self.path_for(&ckpt.source);
        let tmp = path.with_extension("ckpt.tmp");
        let io = |source| CheckpointError::Io {
            path: path.clone(),
            source,
        };
        let bytes = bincode::serde::encode_to_vec(ckpt, bincode::config::standard())
            .expect("checkpoints always encode");
        let mut file = std::fs::File::create(&tmp).map_err(io)?;
        file.write_all(&bytes).map_err(io)?;
        file.sync_all().map_err(io)?;
        drop(file);
        std::fs::rename(&tmp, &path).map_err(io)?;
        // The rename itself is durable once the directory is synced.
        if let Ok(dir) = std::fs::File::open(&self.dir) {
            let _ = dir.sync_all();
        }
        Ok(())
    }
}

/// `host:port` as a file name.
pub fn file_name(addr: &str) -> String {
    addr.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn save_and_load_round_trip_atomically() {
        let dir = std::env::temp_dir().join(format!("shardsync-ckpt-{}", std::process::id()));
        let store = CheckpointStore::open(&dir).unwrap();
        assert_eq!(store.load("127.0.0.1:6379").unwrap(), None);
        let ckpt = Checkpoint {
            format: FORMAT,
            source: "127.0.0.1:6379".into(),
            targets: vec!["127.0.0.1:7000".into()],
            state: CheckpointState::Resumable {
                replid: "r".repeat(40),
                offset: 12345,
                db: 2,
            },
            written_at_ms: 1,
        };
        store.save(&ckpt).unwrap();
        assert_eq!(store.load("127.0.0.1:6379").unwrap(), Some(ckpt.clone()));
        assert!(!store
            .path_for("127.0.0.1:6379")
            .with_extension("ckpt.tmp")
            .exists());
        std::fs::write(store.path_for("127.0.0.1:6379"), b"garbage").unwrap();
        assert!(matches!(
            store.load("127.0.0.1:6379"),
            Err(CheckpointError::Corrupt { .. })
        ));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
