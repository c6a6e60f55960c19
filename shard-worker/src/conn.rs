//! Opening connections and talking request/response on them (handshakes,
//! AUTH). The hot paths (replication intake, pipelined writes) read and
//! write the socket directly.

use std::time::Duration;

use bytes::BytesMut;
use engine::resp::{encode, parse_frame, Frame};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::endpoint::Endpoint;
use crate::error::WorkerError;

/// How long to wait for a TCP connection.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long to wait for one reply during a handshake.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(30);

/// A connection used request/response, with its read buffer.
pub struct Conn {
    pub stream: TcpStream,
    pub buf: BytesMut,
    pub addr: String,
}

impl Conn {
    /// Connects (no AUTH).
    pub async fn open(ep: &Endpoint) -> Result<Conn, WorkerError> {
        let addr = ep.addr();
        if ep.tls {
            return Err(WorkerError::Connect {
                addr,
                source: std::io::Error::new(
                    std::io::ErrorKind::Unsupported,
                    "rediss:// (TLS) is not supported by this build",
                ),
            });
        }
        let connect = TcpStream::connect((ep.host.as_str(), ep.port));
        let stream = match tokio::time::timeout(CONNECT_TIMEOUT, connect).await {
            Ok(Ok(s)) => s,
            Ok(Err(source)) => return Err(WorkerError::Connect { addr, source }),
            Err(_) => {
                return Err(WorkerError::Connect {
                    addr,
                    source: std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("no answer within {} s", CONNECT_TIMEOUT.as_secs()),
                    ),
                })
            }
        };
        let _ = stream.set_nodelay(true);
        Ok(Conn {
            stream,
            buf: BytesMut::with_capacity(64 * 1024),
            addr,
        })
    }

    /// Connects and logs in (AUTH when the endpoint has a password), then
    /// checks with PING that the server accepts commands.
    pub async fn open_authenticated(ep: &Endpoint) -> Result<Conn, WorkerError> {
        let mut conn = Conn::open(ep).await?;
        if let Some(password) = &ep.password {
            let reply = match &ep.user {
                Some(user) => {
                    conn.request(&[b"AUTH", user.as_bytes(), password.expose().as_bytes()])
                        .await?
                }
                None => {
                    conn.request(&[b"AUTH", password.expose().as_bytes()])
                        .await?
                }
            };
            if let Frame::Error(e) = &reply {
                return Err(WorkerError::from_reply(&conn.addr, e).unwrap_or_else(|| {
                    WorkerError::Auth {
                        addr: conn.addr.clone(),
                        message: String::from_utf8_lossy(e).into_owned(),
                    }
                }));
            }
        }
        let reply = conn.request(&[b"PING"]).await?;
        if let Frame::Error(e) = &reply {
            let text = String::from_utf8_lossy(e).into_owned();
            return Err(WorkerError::from_reply(&conn.addr, e).unwrap_or(
                WorkerError::Unexpected {
                    addr: conn.addr.clone(),
                    context: "checking the connection with PING",
                    reply: text,
                },
            ));
        }
        Ok(conn)
    }

    /// Sends one command and reads its reply.
    pub async fn request<A: AsRef<[u8]>>(&mut self, args: &[A]) -> Result<Frame, WorkerError> {
        let mut out = BytesMut::new();
        encode::command(&mut out, args);
        self.stream
            .write_all(&out)
            .await
            .map_err(|source| WorkerError::Io {
                addr: self.addr.clone(),
                context: "sending a command",
                source,
            })?;
        self.read_frame("waiting for a reply", REPLY_TIMEOUT).await
    }

    /// One SCAN step (1000 keys at a time, `MATCH pattern` when given): the
    /// next cursor (`"0"` at the end) and the keys.
    pub async fn scan_page(
        &mut self,
        cursor: &str,
        pattern: Option<&str>,
    ) -> Result<(String, Vec<Vec<u8>>), WorkerError> {
        let mut args = vec!["SCAN", cursor, "COUNT", "1000"];
        if let Some(p) = pattern {
            args.extend(["MATCH", p]);
        }
        let reply = self.request(&args).await?;
        scan_reply(&reply).ok_or_else(|| WorkerError::Unexpected {
            addr: self.addr.clone(),
            context: "scanning keys",
            reply: reply.to_text(),
        })
    }

    /// Sends several commands at once and reads their replies, in order.
    pub async fn pipeline<A: AsRef<[u8]>>(
        &mut self,
        commands: &[Vec<A>],
    ) -> Result<Vec<Frame>, WorkerError> {
        let mut out = BytesMut::new();
        for args in commands {
            encode::command(&mut out, args);
        }
        self.stream
            .write_all(&out)
            .await
            .map_err(|source| WorkerError::Io {
                addr: self.addr.clone(),
                context: "sending commands",
                source,
            })?;
        let mut replies = Vec::with_capacity(commands.len());
        for _ in commands {
            replies.push(
                self.read_frame("waiting for replies", REPLY_TIMEOUT)
                    .await?,
            );
        }
        Ok(replies)
    }

    /// Reads one reply.
    pub async fn read_frame(
        &mut self,
        context: &'static str,
        timeout: Duration,
    ) -> Result<Frame, WorkerError> {
        loop {
            if let Some(frame) =
                parse_frame(&mut self.buf).map_err(|source| WorkerError::Protocol {
                    addr: self.addr.clone(),
                    source,
                })?
            {
                return Ok(frame);
            }
            self.fill(context, timeout).await?;
        }
    }

    /// Reads more bytes into the buffer.
    pub async fn fill(
        &mut self,
        context: &'static str,
        timeout: Duration,
    ) -> Result<(), WorkerError> {
        self.buf.reserve(64 * 1024);
        match tokio::time::timeout(timeout, self.stream.read_buf(&mut self.buf)).await {
            Ok(Ok(0)) => Err(WorkerError::Closed {
                addr: self.addr.clone(),
                context,
            }),
            Ok(Ok(_)) => Ok(()),
            Ok(Err(source)) => Err(WorkerError::Io {
                addr: self.addr.clone(),
                context,
                source,
            }),
            Err(_) => Err(WorkerError::Timeout {
                addr: self.addr.clone(),
                context,
                secs: timeout.as_secs(),
            }),
        }
    }
}

fn scan_reply(reply: &Frame) -> Option<(String, Vec<Vec<u8>>)> {
    let Frame::Array(parts) = reply else {
        return None;
    };
    let cursor = String::from_utf8_lossy(parts.first()?.as_bytes()?).into_owned();
    let Frame::Array(keys) = parts.get(1)? else {
        return None;
    };
    let keys = keys
        .iter()
        .filter_map(|k| k.as_bytes().map(<[u8]>::to_vec))
        .collect();
    Some((cursor, keys))
}
