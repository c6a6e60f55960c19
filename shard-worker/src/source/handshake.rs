//! The replica handshake: what a Redis replica says to its master, up to
//! the master's answer to PSYNC.

use std::time::Duration;

use bytes::Buf;
use engine::resp::Frame;

use crate::conn::Conn;
use crate::error::{Recovery, WorkerError};
use crate::progress::ResumePoint;

/// How the master answered PSYNC.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SyncStart {
    /// A full sync: an RDB follows, then the stream from `offset`.
    Full { replid: String, offset: u64 },
    /// A partial resync: the stream continues from the offset we gave.
    Continue { replid: String, offset: u64 },
}

/// Sends REPLCONF and PSYNC on an authenticated connection and reads the
/// answer. `resume` asks for a partial resync from that point.
pub async fn handshake(
    conn: &mut Conn,
    resume: Option<&ResumePoint>,
    listening_port: u16,
) -> Result<SyncStart, WorkerError> {
    let port = listening_port.to_string();
    replconf(conn, &["REPLCONF", "listening-port", &port]).await?;
    replconf(conn, &["REPLCONF", "capa", "eof", "capa", "psync2"]).await?;

    let (replid, next) = match resume {
        Some(r) => (r.replid.clone(), (r.offset + 1).to_string()),
        None => ("?".to_string(), "-1".to_string()),
    };
    let psync = engine::resp::encode::to_bytes(&["PSYNC", &replid, &next]);
    tokio::io::AsyncWriteExt::write_all(&mut conn.stream, &psync)
        .await
        .map_err(|source| WorkerError::Io {
            addr: conn.addr.clone(),
            context: "sending PSYNC",
            source,
        })?;

    let line = read_line_skipping_keepalives(conn, "waiting for the answer to PSYNC").await?;
    parse_psync_reply(&conn.addr, &line, resume)
}

/// Sends a REPLCONF. Errors other than permission problems are ignored, as
/// Redis's own replica does (older masters do not know every option).
async fn replconf(conn: &mut Conn, args: &[&str]) -> Result<(), WorkerError> {
    if let Frame::Error(e) = conn.request(args).await? {
        if let Some(err) = WorkerError::from_reply(&conn.addr, &e) {
            return Err(err);
        }
        tracing::debug!(source = %conn.addr, reply = %String::from_utf8_lossy(&e), "REPLCONF not understood");
    }
    Ok(())
}

/// Reads one `\r\n`-terminated line, dropping the bare `\n` keep-alives a
/// master sends while it prepares a sync.
pub async fn read_line_skipping_keepalives(
    conn: &mut Conn,
    context: &'static str,
) -> Result<String, WorkerError> {
    loop {
        while conn.buf.first() == Some(&b'\n') {
            conn.buf.advance(1);
        }
        if let Some(nl) = conn.buf.iter().position(|&b| b == b'\n') {
            let line = conn.buf.split_to(nl + 1);
            let text = String::from_utf8_lossy(&line)
                .trim_end_matches(['\r', '\n'])
                .to_string();
            return Ok(text);
        }
        if conn.buf.len() > 64 * 1024 {
            return Err(WorkerError::Unexpected {
                addr: conn.addr.clone(),
                context,
                reply: "a line longer than 64 KiB".into(),
            });
        }
        conn.fill(context, KEEPALIVE_TIMEOUT).await?;
    }
}

/// Longest silence accepted while the master prepares a sync (it sends a
/// newline every second meanwhile).
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(60);

fn parse_psync_reply(
    addr: &str,
    line: &str,
    resume: Option<&ResumePoint>,
) -> Result<SyncStart, WorkerError> {
    let unexpected = || WorkerError::Unexpected {
        addr: addr.to_string(),
        context: "reading the answer to PSYNC",
        reply: line.chars().take(200).collect(),
    };
    if let Some(rest) = line.strip_prefix("+FULLRESYNC ") {
        let mut parts = rest.split(' ');
        let replid = parts
            .next()
            .filter(|r| r.len() == 40)
            .ok_or_else(unexpected)?;
        let offset = parts
            .next()
            .and_then(|o| o.parse::<u64>().ok())
            .ok_or_else(unexpected)?;
        return Ok(SyncStart::Full {
            replid: replid.to_string(),
            offset,
        });
    }
    if let Some(rest) = line.strip_prefix("+CONTINUE") {
        let Some(resume) = resume else {
            return Err(unexpected());
        };
        // A master promoted since we last synced announces its new id; the
        // stream is still continuous (PSYNC2).
        let new_id = rest.trim();
        let replid = if new_id.len() == 40 {
            new_id.to_string()
        } else {
            resume.replid.clone()
        };
        return Ok(SyncStart::Continue {
            replid,
            offset: resume.offset,
        });
    }
    if let Some(err) = line.strip_prefix('-') {
        if let Some(e) = WorkerError::from_reply(addr, err.as_bytes()) {
            return Err(e);
        }
        let code = err.split(' ').next().unwrap_or("");
        let recovery = if code == "NOMASTERLINK" || err.contains("not connected with my master") {
            // A replica used as source, whose own master link is down.
            Recovery::Reconnect
        } else if err.contains("unknown command") {
            Recovery::Fatal
        } else {
            Recovery::Reconnect
        };
        let message = if err.contains("unknown command") {
            format!("{err} (the source does not support PSYNC: Redis 2.8 or newer is needed, and proxies cannot be synced from)")
        } else {
            err.to_string()
        };
        return Err(WorkerError::ReplicationRefused {
            addr: addr.to_string(),
            message,
            recovery,
        });
    }
    Err(unexpected())
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "8de1787ba490483314a4d30f1c628bc5025eb761";

    #[test]
    fn full_and_partial_answers() {
        assert_eq!(
            parse_psync_reply("h:1", &format!("+FULLRESYNC {ID} 1234"), None).unwrap(),
            SyncStart::Full {
                replid: ID.into(),
                offset: 1234
            }
        );
        let resume = ResumePoint {
            replid: ID.into(),
            offset: 99,
            db: 2,
        };
        assert_eq!(
            parse_psync_reply("h:1", "+CONTINUE", Some(&resume)).unwrap(),
            SyncStart::Continue {
                replid: ID.into(),
                offset: 99
            }
        );
        let promoted = "a".repeat(40);
        assert_eq!(
            parse_psync_reply("h:1", &format!("+CONTINUE {promoted}"), Some(&resume)).unwrap(),
            SyncStart::Continue {
                replid: promoted,
                offset: 99
            }
        );
    }

    #[test]
    fn refusals_carry_their_recovery() {
        let r = |line: &str| parse_psync_reply("h:1", line, None).unwrap_err().recovery();
        assert_eq!(
            r("-NOPERM this user has no permissions to run the 'psync' command"),
            Recovery::Fatal
        );
        assert_eq!(
            r("-NOMASTERLINK Can't SYNC while not connected with my master"),
            Recovery::Reconnect
        );
        assert_eq!(r("-ERR unknown command 'PSYNC'"), Recovery::Fatal);
        assert_eq!(
            r("-LOADING Redis is loading the dataset in memory"),
            Recovery::Reconnect
        );
        assert_eq!(r("+FULLRESYNC short 1"), Recovery::FullResync);
    }
}
