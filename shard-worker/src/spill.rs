//! A byte FIFO that keeps what does not fit in memory in spill files.
//!
//! Two places use it: a shard's intake, whose input is the source socket
//! emptied by a task that never waits for the targets (a master drops a
//! replica whose output buffer grows past `client-output-buffer-limit
//! replica`, and that replica must then start a full sync again), and each
//! writer's overflow, which takes batches when its queue is full so that a
//! slow target node never holds up the others.
//!
//! Order: once anything is on disk, new bytes go to disk too, until the
//! consumer has caught up, so memory chunks are always older than disk ones.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::Notify;

use crate::error::WorkerError;
use crate::progress::SpillGauges;

/// A spill file is closed and a new one begun past this size, so consumed
/// data is given back to the disk in pieces.
const SEGMENT_BYTES: u64 = 64 * 1024 * 1024;
/// Most bytes read from a spill file at once.
const READ_BYTES: u64 = 256 * 1024;

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
    gauges: Arc<SpillGauges>,
}

impl Spill {
    /// `dir` holds the spill files, named after `name` (stale ones from an
    /// earlier run are removed).
    pub fn new(
        dir: &Path,
        name: &str,
        memory_limit: usize,
        gauges: Arc<SpillGauges>,
    ) -> Arc<Spill> {
        let prefix: String = name
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
            gauges,
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
            self.gauges.memory.set(state.memory_bytes as u64);
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
            self.gauges.on_disk.add(len as u64);
            self.gauges.total.add(len as u64);
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

    /// Waits until something was pushed (or the end recorded) since the
    /// last time anyone waited.
    pub async fn readable(&self) {
        self.readable.notified().await;
    }

    /// Whether nothing is waiting (memory and disk empty).
    pub fn is_empty(&self) -> bool {
        let state = self.state.lock().expect("spill lock");
        state.memory.is_empty() && state.segments.iter().all(|s| s.read >= s.written)
    }

    /// The next bytes if any are waiting.
    pub fn try_next(&self) -> Result<Option<Bytes>, WorkerError> {
        let mut state = self.state.lock().expect("spill lock");
        if let Some(chunk) = state.memory.pop_front() {
            state.memory_bytes -= chunk.len();
            self.gauges.memory.set(state.memory_bytes as u64);
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
                self.gauges.on_disk.sub(n as u64);
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
        self.gauges.on_disk.set(0);
        self.gauges.memory.set(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spill(limit: usize) -> (Arc<Spill>, Arc<SpillGauges>, PathBuf) {
        let dir = std::env::temp_dir().join(format!(
            "shardsync-spill-test-{}-{limit}",
            std::process::id()
        ));
        let gauges = Arc::new(SpillGauges::default());
        (
            Spill::new(&dir, "127.0.0.1:1", limit, gauges.clone()),
            gauges,
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
        assert!(stats.total.get() > 0);
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
        assert_eq!(stats.on_disk.get(), 0);
        let left: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
        assert!(left.is_empty(), "consumed spill files are removed");
        drop(spill);
        let _ = std::fs::remove_dir_all(dir);
    }
}
