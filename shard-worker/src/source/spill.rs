//! The intake's input: bytes read from the source socket by a task that
//! never waits for the targets, queued in memory up to a limit and in spill
//! files beyond it, then consumed in order by the intake.
//!
//! A master drops a replica whose output buffer grows past
//! `client-output-buffer-limit replica`, and then the replica must start a
//! full sync again. Reading the socket at the speed the master writes,
//! whatever the targets do, keeps that buffer empty; what the targets cannot
//! take yet waits here instead, on local disk past `memory_limit`.
//!
//! Order: once anything is on disk, new bytes go to disk too, until the
//! consumer has caught up, so memory chunks are always older than disk ones.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::AsyncReadExt;
use tokio::net::tcp::OwnedReadHalf;
use tokio::sync::Notify;

use crate::error::WorkerError;
use crate::progress::ShardStats;

/// A spill file is closed and a new one begun past this size, so consumed
/// data is given back to the disk in pieces.
const SEGMENT_BYTES: u64 = 64 * 1024 * 1024;
/// Most bytes read from a spill file at once.
const READ_BYTES: u64 = 256 * 1024;
/// Bytes asked of the socket per read.
const SOCKET_READ: usize = 256 * 1024;

struct Segment {
    path: PathBuf,
    file: File,
    written: u64,
    read: u64,
}

struct State {
    memory: VecDeque<Bytes>,
    memory_bytes: usize,
    segments: VecDeque<Segment>,
    next_segment: u64,
    /// Why the producer stopped (after which nothing more comes).
    end: Option<WorkerError>,
}

/// A FIFO of stream bytes: memory, then disk.
pub struct Spill {
    state: Mutex<State>,
    readable: Notify,
    memory_limit: usize,
    dir: PathBuf,
    prefix: String,
    stats: Arc<ShardStats>,
}

impl Spill {
    /// `dir` holds the spill files, named after `shard` (stale ones from an
    /// earlier run are removed).
    pub fn new(dir: &Path, shard: &str, memory_limit: usize, stats: Arc<ShardStats>) -> Arc<Spill> {
        let prefix: String = shard
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        let spill = Spill {
            state: Mutex::new(State {
                memory: VecDeque::new(),
                memory_bytes: 0,
                segments: VecDeque::new(),
                next_segment: 0,
                end: None,
            }),
            readable: Notify::new(),
            memory_limit,
            dir: dir.to_path_buf(),
            prefix,
            stats,
        };
        spill.remove_stale_files();
        Arc::new(spill)
    }

    fn remove_stale_files(&self) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(&format!("{}-", self.prefix)) && name.ends_with(".spill") {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }

    fn disk_error(&self, what: &str, e: std::io::Error) -> WorkerError {
        WorkerError::Spill {
            dir: self.dir.display().to_string(),
            message: format!("{what}: {e}"),
        }
    }

    /// Appends bytes read from the socket.
    pub fn push(&self, chunk: Bytes) -> Result<(), WorkerError> {
        let len = chunk.len();
        let mut state = self.state.lock().expect("spill lock");
        if state.segments.is_empty() && state.memory_bytes + len <= self.memory_limit {
            state.memory_bytes += len;
            state.memory.push_back(chunk);
            self.stats
                .buffered_bytes
                .store(state.memory_bytes as u64, Ordering::Relaxed);
        } else {
            let need_new = state
                .segments
                .back()
                .is_none_or(|s| s.written >= SEGMENT_BYTES);
            if need_new {
                std::fs::create_dir_all(&self.dir)
                    .map_err(|e| self.disk_error("creating the spill directory", e))?;
                let path = self
                    .dir
                    .join(format!("{}-{}.spill", self.prefix, state.next_segment));
                state.next_segment += 1;
                let file = std::fs::OpenOptions::new()
                    .create(true)
                    .truncate(true)
                    .read(true)
                    .write(true)
                    .open(&path)
                    .map_err(|e| self.disk_error("creating a spill file", e))?;
                state.segments.push_back(Segment {
                    path,
                    file,
                    written: 0,
                    read: 0,
                });
            }
            let seg = state.segments.back_mut().expect("a segment");
            seg.file
                .seek(SeekFrom::Start(seg.written))
                .and_then(|_| seg.file.write_all(&chunk))
                .map_err(|e| self.disk_error("writing a spill file", e))?;
            seg.written += len as u64;
            self.stats
                .spill_bytes
                .fetch_add(len as u64, Ordering::Relaxed);
            self.stats
                .spilled_bytes_total
                .fetch_add(len as u64, Ordering::Relaxed);
        }
        drop(state);
        self.readable.notify_one();
        Ok(())
    }

    /// Records why no more bytes will come.
    pub fn finish(&self, reason: WorkerError) {
        self.state.lock().expect("spill lock").end = Some(reason);
        self.readable.notify_one();
    }

    /// The next bytes, oldest first; the producer's end reason once
    /// everything before it was consumed.
    pub async fn next(&self) -> Result<Bytes, WorkerError> {
        loop {
            if let Some(out) = self.try_next()? {
                return Ok(out);
            }
            self.readable.notified().await;
        }
    }

    fn try_next(&self) -> Result<Option<Bytes>, WorkerError> {
        let mut state = self.state.lock().expect("spill lock");
        if let Some(chunk) = state.memory.pop_front() {
            state.memory_bytes -= chunk.len();
            self.stats
                .buffered_bytes
                .store(state.memory_bytes as u64, Ordering::Relaxed);
            return Ok(Some(chunk));
        }
        while let Some(seg) = state.segments.front_mut() {
            if seg.read < seg.written {
                let n = (seg.written - seg.read).min(READ_BYTES) as usize;
                let mut buf = vec![0u8; n];
                seg.file
                    .seek(SeekFrom::Start(seg.read))
                    .and_then(|_| seg.file.read_exact(&mut buf))
                    .map_err(|e| self.disk_error("reading a spill file", e))?;
                seg.read += n as u64;
                self.stats
                    .spill_bytes
                    .fetch_sub(n as u64, Ordering::Relaxed);
                return Ok(Some(Bytes::from(buf)));
            }
            // Consumed. The producer writes only to the last segment; once
            // that one is consumed too, new bytes may go to memory again.
            let seg = state.segments.pop_front().expect("front segment");
            let _ = std::fs::remove_file(&seg.path);
        }
        match state.end.take() {
            Some(reason) => Err(reason),
            None => Ok(None),
        }
    }
}

impl Drop for Spill {
    fn drop(&mut self) {
        if let Ok(state) = self.state.lock() {
            for seg in &state.segments {
                let _ = std::fs::remove_file(&seg.path);
            }
        }
        self.stats.spill_bytes.store(0, Ordering::Relaxed);
        self.stats.buffered_bytes.store(0, Ordering::Relaxed);
    }
}

/// Reads the socket into `spill` until the connection ends, a read is idle
/// longer than `timeout`, or the spill fails; records why in `spill`.
pub async fn read_socket(
    mut reader: OwnedReadHalf,
    spill: Arc<Spill>,
    addr: String,
    timeout: Duration,
) {
    let mut buf = BytesMut::with_capacity(SOCKET_READ);
    loop {
        if buf.capacity() - buf.len() < SOCKET_READ / 4 {
            buf.reserve(SOCKET_READ);
        }
        let reason = match tokio::time::timeout(timeout, reader.read_buf(&mut buf)).await {
            Ok(Ok(0)) => WorkerError::Closed {
                addr,
                context: "reading the replication stream",
            },
            Ok(Ok(_)) => match spill.push(buf.split().freeze()) {
                Ok(()) => continue,
                Err(e) => e,
            },
            Ok(Err(source)) => WorkerError::Io {
                addr,
                context: "reading the replication stream",
                source,
            },
            Err(_) => WorkerError::Timeout {
                addr,
                context: "reading the replication stream",
                secs: timeout.as_secs(),
            },
        };
        spill.finish(reason);
        return;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spill(limit: usize) -> (Arc<Spill>, Arc<ShardStats>, PathBuf) {
        let dir = std::env::temp_dir().join(format!(
            "shardsync-spill-test-{}-{limit}",
            std::process::id()
        ));
        let stats = Arc::new(ShardStats::new("127.0.0.1:1", 1));
        (
            Spill::new(&dir, "127.0.0.1:1", limit, stats.clone()),
            stats,
            dir,
        )
    }

    #[tokio::test]
    async fn bytes_come_out_in_order_across_memory_and_disk() {
        let (spill, stats, dir) = spill(100);
        let mut expected = Vec::new();
        for i in 0..50u8 {
            let chunk = vec![i; 30 + i as usize];
            expected.extend_from_slice(&chunk);
            spill.push(Bytes::from(chunk)).unwrap();
            // Consume now and then, so memory and disk alternate.
            if i % 7 == 0 {
                let got = spill.next().await.unwrap();
                assert_eq!(&got[..], &expected[..got.len()]);
                expected.drain(..got.len());
            }
        }
        assert!(stats.spilled_bytes_total.load(Ordering::Relaxed) > 0);
        spill.finish(WorkerError::Closed {
            addr: "x".into(),
            context: "test",
        });
        let mut rest = Vec::new();
        loop {
            match spill.next().await {
                Ok(chunk) => rest.extend_from_slice(&chunk),
                Err(WorkerError::Closed { .. }) => break,
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(rest, expected);
        assert_eq!(stats.spill_bytes.load(Ordering::Relaxed), 0);
        let left: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
        assert!(left.is_empty(), "consumed spill files are removed");
        drop(spill);
        let _ = std::fs::remove_dir_all(dir);
    }
}
