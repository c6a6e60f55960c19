//! Test harness for shardsync's integration tests and benchmarks.
//!
//! # Layout
//!
//! - [`server`]: real `redis-server` processes on free loopback ports,
//!   killed on drop (`REDIS_SERVER` picks another binary, e.g. 6.2).
//! - [`shardsync`]: the binary under test as a child process: status and
//!   metrics over HTTP, signals, logs, a Prometheus text checker.
//! - [`cluster`]: real Redis Clusters (`redis-cli --cluster create`),
//!   resharding, and a client that routes by slot.
//! - [`data`]: datasets (every type and encoding, bulk strings), written
//!   into a server or a cluster.
//! - [`compare`]: a key-by-key comparator independent of `shardsync verify`.
//! - [`load`]: live writes of commands that show when they are applied
//!   twice or lost (fault tests).
//! - [`proxy`]: a TCP proxy that resets, stalls, or cuts replies in half
//!   on command (link faults).
//! - [`twemproxy`]: a real `nutcracker` in front of real backends.
//! - [`wait`]: polling helpers (tests never sleep a fixed time to "let
//!   things settle").

pub mod cluster;
pub mod compare;
pub mod data;
pub mod load;
pub mod proxy;
pub mod sentinel;
pub mod server;
pub mod shardsync;
pub mod twemproxy;
pub mod wait;

pub use server::{cpu_secs, peak_rss_kb, RedisServer, ServerConfig};
pub use shardsync::Shardsync;
pub use wait::{wait_for, wait_until};

/// Timeout for things that take a moment (a sync of a small dataset).
pub const SHORT: std::time::Duration = std::time::Duration::from_secs(30);
