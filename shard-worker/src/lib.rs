//! shardsync's workers: the actors that move data.
//!
//! # Layout
//!
//! Following a replayed command from the source socket to the target:
//!
//! - [`source`]: the source worker actor, one per source master.
//!   `handshake` speaks the replica protocol up to PSYNC's answer; the
//!   intake reads the RDB transfer (`transfer`), the snapshot's values
//!   (`snapshot`) and then the command stream (`stream`), keeping the
//!   replication offset. What each value and command becomes is decided by
//!   `engine::replay`; the intake carries out its actions through the
//!   dispatcher.
//! - [`route`]: the [`route::Router`] decides which writer gets a command
//!   (by key); the [`route::Dispatcher`] builds per-writer
//!   [`route::Batch`]es and hands them over through bounded queues.
//! - [`write`]: the writer actor, one per target node: pipelined writes,
//!   every reply checked, batches confirmed back into [`progress`].
//! - [`spill`]: a memory-then-disk byte FIFO: a shard's unparsed stream
//!   (the source is read at its own pace whatever the targets do) and each
//!   writer's overflow of batches.
//! - [`progress`]: per-shard and per-writer counters and the applied-offset
//!   bookkeeping that ACKs, checkpoints and `/status` read.
//! - [`counters`]: the counter type and the `counters!` declaration (each
//!   counter once, with the metric that exports it).
//! - [`events`]: telemetry events (a log line and/or a counter each); every
//!   counter is bumped through one.
//! - [`conn`], [`endpoint`], [`error`]: connections, addresses with
//!   redacted credentials, and errors that carry their [`error::Recovery`].
//! - [`retry`], [`clock`]: retry policy and backoff (writers and the
//!   coordinator's supervisor), and the wall clock in Unix ms.
//!
//! Shard workers never message each other; only confirmations flow back
//! from writers, through the lock-free counters in [`progress`]. On a
//! cluster source a shard reads the others' applied offsets (and a shared
//! record of migrated keys) for hand-overs (`source::handover`).

pub mod clock;
pub mod conn;
pub mod counters;
pub mod endpoint;
pub mod error;
pub mod events;
pub mod progress;
pub mod retry;
pub mod route;
pub mod source;
pub mod spill;
pub mod write;

pub use endpoint::{Endpoint, Secret};
pub use error::{Recovery, WorkerError};
