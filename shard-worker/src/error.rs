//! Errors of the workers, each carrying what to do about it.

use engine::rdb::RdbError;
use engine::resp::RespError;

/// What recovers from an error. The supervisor decides from this, never from
/// message text.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Recovery {
    /// Reconnect and continue where we were: the source is asked for a
    /// partial resync from our offset (it may still answer with a full one).
    Reconnect,
    /// Reconnect and start over with a full sync: our position in the stream
    /// is no longer trustworthy (corrupt data, protocol violation).
    FullResync,
    /// Waiting will not help (wrong password, missing permission, a target
    /// out of memory): the task fails now.
    Fatal,
}

/// A worker failure, naming the server (`host:port`) and the cause.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("{addr}: cannot connect: {source}")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{addr}: connection lost while {context}: {source}")]
    Io {
        addr: String,
        context: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{addr}: connection closed by the server while {context}")]
    Closed { addr: String, context: &'static str },
    #[error("{addr}: no data for {secs} s while {context}")]
    Timeout {
        addr: String,
        context: &'static str,
        secs: u64,
    },
    #[error("{addr}: authentication failed: {message}")]
    Auth { addr: String, message: String },
    #[error("{addr}: permission denied: {message}")]
    NoPerm { addr: String, message: String },
    #[error("{addr}: server is loading its dataset, will retry")]
    Loading { addr: String },
    #[error("{addr}: replication refused: {message}")]
    ReplicationRefused {
        addr: String,
        message: String,
        recovery: Recovery,
    },
    /// The source's stream carries something shardsync cannot follow yet
    /// (an atomic slot migration): the task stops with this line.
    #[error("{addr}: {message}")]
    CannotFollow { addr: String, message: String },
    #[error("{addr}: protocol error: {source}")]
    Protocol {
        addr: String,
        #[source]
        source: RespError,
    },
    #[error("{addr}: unexpected reply while {context}: {reply}")]
    Unexpected {
        addr: String,
        context: &'static str,
        reply: String,
    },
    #[error("{addr}: RDB transfer failed: {source}")]
    Rdb {
        addr: String,
        #[source]
        source: RdbError,
    },
    #[error("{addr}: target is out of memory: {message}")]
    TargetOom { addr: String, message: String },
    #[error("{addr}: target refused a write, will retry: {message}")]
    TargetBusy { addr: String, message: String },
    #[error("{addr}: the target refused {what}: {message}")]
    TargetRefused {
        addr: String,
        what: &'static str,
        message: String,
    },
    #[error("spill directory {dir}: {message}")]
    Spill { dir: String, message: String },
    /// Not a failure: the connection is restarted on purpose so that
    /// replacement commands go out ahead of everything else.
    #[error("{addr}: reconnecting to send {why}")]
    Resend { addr: String, why: &'static str },
    /// A target node ran a transaction of this source ahead of an earlier
    /// one of its slot (see `route::order`): only a full sync makes the
    /// target exact again.
    #[error("{addr}: a target node applied this source's writes out of order (it refused a transaction for a moment and ran a later one of the same slot); starting over with a full sync")]
    OutOfOrder { addr: String },
    /// A target node is gone and its cluster promoted a replica in its
    /// place: the task starts again from the target's markers, which the
    /// replica holds as far as it holds the data.
    #[error("{addr}: the target node is gone and {now} serves its slots now (a failover)")]
    TargetFailedOver { addr: String, now: String },
    #[error("{addr}: gave up after retrying for {secs} s; last error: {last}")]
    RetriesExhausted {
        addr: String,
        secs: u64,
        last: String,
    },
}

impl WorkerError {
    pub fn recovery(&self) -> Recovery {
        match self {
            WorkerError::Connect { .. }
            | WorkerError::Io { .. }
            | WorkerError::Closed { .. }
            | WorkerError::Timeout { .. }
            | WorkerError::Loading { .. }
            | WorkerError::TargetBusy { .. }
            | WorkerError::Resend { .. }
            | WorkerError::TargetFailedOver { .. } => Recovery::Reconnect,
            WorkerError::ReplicationRefused { recovery, .. } => *recovery,
            WorkerError::Protocol { .. }
            | WorkerError::Unexpected { .. }
            | WorkerError::OutOfOrder { .. } => Recovery::FullResync,
            // The same RDB would fail the same way (a value too large, a
            // format we cannot read): retrying means another fork on the
            // source for nothing.
            WorkerError::Rdb { .. } => Recovery::Fatal,
            WorkerError::Auth { .. }
            | WorkerError::NoPerm { .. }
            | WorkerError::TargetOom { .. }
            | WorkerError::Spill { .. }
            | WorkerError::TargetRefused { .. }
            | WorkerError::CannotFollow { .. }
            | WorkerError::RetriesExhausted { .. } => Recovery::Fatal,
        }
    }

    /// Classifies an error reply (without its leading `-`) from `addr`.
    /// `None` when the reply is an ordinary command error (WRONGTYPE, ERR
    /// ...), which concerns one command rather than the connection.
    pub fn from_reply(addr: &str, reply: &[u8]) -> Option<WorkerError> {
        let text = String::from_utf8_lossy(reply).into_owned();
        let code = text.split(' ').next().unwrap_or("");
        let addr = addr.to_string();
        Some(match code {
            "NOAUTH" | "WRONGPASS" => WorkerError::Auth {
                addr,
                message: text,
            },
            "NOPERM" => WorkerError::NoPerm {
                addr,
                message: text,
            },
            "LOADING" => WorkerError::Loading { addr },
            "OOM" => WorkerError::TargetOom {
                addr,
                message: text,
            },
            "READONLY" | "MASTERDOWN" | "BUSY" | "TRYAGAIN" | "CLUSTERDOWN" => {
                WorkerError::TargetBusy {
                    addr,
                    message: text,
                }
            }
            _ if text.starts_with("ERR invalid password")
                || text.starts_with("ERR AUTH")
                || text.starts_with("ERR Client sent AUTH") =>
            {
                WorkerError::Auth {
                    addr,
                    message: text,
                }
            }
            _ => return None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_are_classified_by_code() {
        let r = |s: &str| WorkerError::from_reply("h:1", s.as_bytes()).map(|e| e.recovery());
        assert_eq!(
            r("WRONGPASS invalid username-password pair"),
            Some(Recovery::Fatal)
        );
        assert_eq!(
            r("NOPERM this user has no permissions"),
            Some(Recovery::Fatal)
        );
        assert_eq!(r("OOM command not allowed"), Some(Recovery::Fatal));
        assert_eq!(r("LOADING Redis is loading"), Some(Recovery::Reconnect));
        assert_eq!(
            r("READONLY You can't write against a read only replica."),
            Some(Recovery::Reconnect)
        );
        assert_eq!(r("WRONGTYPE Operation against a key"), None);
        assert_eq!(r("ERR unknown command"), None);
    }
}
