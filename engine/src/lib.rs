//! shardsync's engine: the pure, synchronous-or-`AsyncRead` core that every
//! other crate builds on. It does no network IO of its own, keeps no global
//! state (beyond a read-only command table) and knows nothing of actors.
//!
//! # Layout
//!
//! - [`resp`]: RESP2 framing. Commands from a replication stream
//!   ([`resp::parse_command`], zero-copy, with exact wire lengths for offset
//!   accounting), reply scanning for pipelined writers
//!   ([`resp::scan_reply`]), whole frames for handshakes, and encoding.
//! - [`rdb`]: the streaming RDB reader ([`rdb::RdbReader`]): one item at a
//!   time from any `AsyncRead`, every value type's structure walked, each
//!   value captured as a DUMP payload, CRC64 verified.
//! - [`restore`]: RESTORE commands from RDB entries.
//! - [`command`]: the one command table: key positions (Redis 7 key specs),
//!   write flag, role in a replication stream, idempotency, cross-slot split.
//! - [`slot`]: cluster hash slots (CRC16 XMODEM, hash tags).
//! - [`cluster`]: `CLUSTER NODES` and MOVED/ASK replies.
//! - [`split`]: how a command lands on a cluster target (whole, split per
//!   slot, or rewritten when its keys span slots).
//! - [`filter`]: which databases and keys are synchronized, and where they
//!   land.
//! - [`heartbeat`]: the heartbeat key lag is measured with.
//! - [`marker`]: the applied-position markers written on targets with the
//!   commands they describe, and the `shardsync:` family of internal keys.
//! - [`rebuild`], [`compat`]: values and commands for older targets.
//! - [`replay`]: the replay rules: [`replay::Replay::step`] turns each
//!   command of a stream into actions (send to a database / slot / every
//!   node, rewrite, acknowledge, report), and the same rules place each
//!   snapshot value; pure, so that every rule is tested with bytes in and
//!   actions out.
//!
//! Data flows through these in this order: bytes from a source become RDB
//! items or commands; the replay rules decide, with the command table,
//! filters, `split` and `rebuild`, what each becomes on the target; the
//! results are RESP bytes for a target's writer.

pub mod cluster;
pub mod command;
pub mod compat;
pub mod filter;
pub mod heartbeat;
pub mod marker;
pub mod ownership;
pub mod psync;
pub mod rdb;
pub mod rebuild;
pub mod replay;
pub mod resp;
pub mod restore;
pub mod slot;
pub mod split;
