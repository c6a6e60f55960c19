//! The source worker actor: one per source master.
//!
//! It connects in `post_start` (so a failure reaches the supervisor), does
//! the replica handshake, and hands the socket's read half to a reader task
//! that empties it into the shard's [`Spill`] as fast as the master
//! writes; an intake task consumes the spill (RDB, then stream). The actor
//! keeps the write half and sends `REPLCONF ACK <applied offset>` every
//! second and whenever the master asks (GETACK). It never blocks on the
//! socket: the tasks report back by message.

pub mod handover;
mod handshake;
mod intake;
mod rewrite;
mod snapshot;
mod stream;
mod sweep;
mod transfer;

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use ractor::{Actor, ActorProcessingErr, ActorRef};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use handshake::{handshake, SyncStart};
pub use intake::{IntakeEnd, IntakeOptions, DEFAULT_BIG_KEY_BYTES};

use crate::conn::Conn;
use crate::endpoint::Endpoint;
use crate::error::WorkerError;
use crate::events;
use crate::progress::{ResumePoint, ShardStats, StreamPos};
use crate::route::{Dispatcher, Router};
use crate::spill::Spill;
use intake::{Intake, IntakeParts};

/// Bytes asked of the socket per read.
const SOCKET_READ: usize = 256 * 1024;

/// How often the applied offset is acknowledged to the master.
const ACK_PERIOD: Duration = Duration::from_secs(1);

/// Everything a source worker needs to start.
pub struct SourceArgs {
    pub shard: usize,
    pub endpoint: Endpoint,
    pub router: Router,
    pub stats: Arc<ShardStats>,
    /// Ask for a partial resync from here (a checkpoint, or where the last
    /// connection left off).
    pub resume: Option<ResumePoint>,
    pub options: IntakeOptions,
    /// Port announced with `REPLCONF listening-port` (shown by the master's
    /// `INFO replication`).
    pub listening_port: u16,
    /// Exactly-once: the shard's marker on its target.
    pub marking: Option<crate::route::Marking>,
    /// Exactly-once on a cluster target, after a restart: what its nodes
    /// applied already.
    pub skip: Option<crate::route::Skip>,
    /// On a cluster source: every shard of the task, for hand-overs
    /// (`handover.rs`), and the slots this one's master served at the
    /// precheck.
    pub peers: Option<Arc<handover::Peers>>,
    pub slots: Vec<(u16, u16)>,
    /// The master joined the source cluster mid-sync: its snapshot waits
    /// for a hand-over (`handover.rs`).
    pub joined: bool,
}

pub enum SourceMsg {
    /// Time to acknowledge.
    AckTick,
    /// The master asked for an acknowledgement.
    GetAck,
    /// The RDB is read: acknowledge now (a diskless master waits for it).
    RdbLoaded,
    /// The intake task ended.
    IntakeExited(Result<IntakeEnd, WorkerError>),
    /// Stop reading, hand over what was read, and stop.
    Stop,
}

pub struct SourceState {
    args: Option<SourceArgs>,
    addr: String,
    stats: Arc<ShardStats>,
    writer: Option<OwnedWriteHalf>,
    stop: watch::Sender<bool>,
    intake: Option<JoinHandle<()>>,
    socket_reader: Option<JoinHandle<()>>,
    ticker: Option<JoinHandle<()>>,
    /// On a cluster source: the hand-over sampler (`handover.rs`).
    sampler: Option<JoinHandle<()>>,
    /// Acknowledging starts once the RDB (if any) is read.
    acking: bool,
}

pub struct SourceWorker;

impl Actor for SourceWorker {
    type Msg = SourceMsg;
    type State = SourceState;
    type Arguments = SourceArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        args: SourceArgs,
    ) -> Result<SourceState, ActorProcessingErr> {
        let (stop, _) = watch::channel(false);
        Ok(SourceState {
            addr: args.endpoint.addr(),
            stats: args.stats.clone(),
            args: Some(args),
            writer: None,
            stop,
            intake: None,
            socket_reader: None,
            ticker: None,
            sampler: None,
            acking: false,
        })
    }

    async fn post_start(
        &self,
        myself: ActorRef<Self::Msg>,
        state: &mut SourceState,
    ) -> Result<(), ActorProcessingErr> {
        let args = state.args.take().expect("arguments are used once");
        let mut conn = Conn::open_authenticated(&args.endpoint).await?;
        if let Some(peers) = &args.peers {
            if is_replica(&mut conn).await? {
                // A cluster master that lost all its slots follows the
                // master that took the last one (Redis 7's replica
                // migration): its own history ended, and another shard
                // reads the one it follows.
                events::SourceMasterDemoted {
                    source: &state.addr,
                }
                .emit();
                peers.remove(args.shard);
                args.stats.set_state(crate::progress::ShardState::Stopped);
                myself.stop(Some("the master became a replica".into()));
                return Ok(());
            }
        }
        let start = sweep::handshake_swept(&mut conn, &args, &state.addr).await?;
        let (reader, writer) = conn.stream.into_split();
        state.writer = Some(writer);

        let mut dispatcher = Dispatcher::new(args.shard, args.router, args.stats.clone());
        if let Some(marking) = args.marking.clone() {
            dispatcher.set_marking(marking);
            if let Some(skip) = args.skip.clone() {
                dispatcher.set_skip(skip);
            }
        }
        let (replid, start, full) = match &start {
            SyncStart::Full { replid, offset } => {
                let at = StreamPos {
                    offset: *offset,
                    db: 0,
                };
                (replid.clone(), at, true)
            }
            SyncStart::Continue { replid, offset } => {
                let at = StreamPos {
                    offset: *offset,
                    db: args.resume.as_ref().map_or(0, |r| r.db),
                };
                events::PartialResync {
                    source: &state.addr,
                    replid,
                    offset: *offset,
                }
                .emit(&args.stats.counters);
                args.stats.begin_incremental(replid, at);
                state.acking = true;
                (replid.clone(), at, false)
            }
        };
        let spill = Spill::new(
            &args.options.spill_dir,
            &state.addr,
            args.options.spill_memory,
            args.stats.stream_spill.clone(),
        );
        state.socket_reader = Some(tokio::spawn(read_socket(
            reader,
            spill.clone(),
            state.addr.clone(),
            args.options.read_timeout,
        )));
        let parts = IntakeParts {
            addr: state.addr.clone(),
            input: spill,
            buf: conn.buf,
            dispatcher,
            stats: args.stats.clone(),
            actor: myself.clone(),
            stop: state.stop.subscribe(),
            options: args.options,
            handover: args.peers.clone().map(|peers| intake::HandOverParts {
                peers,
                me: args.shard,
                slots: args.slots.clone(),
                joined: args.joined,
            }),
        };
        if let Some(peers) = args.peers.clone() {
            state.sampler = Some(tokio::spawn(handover::sampler(
                peers,
                args.shard,
                args.endpoint.clone(),
                args.stats.clone(),
            )));
        }
        let mut intake = Intake::new(parts, replid, start);
        let me = myself.clone();
        state.intake = Some(tokio::spawn(async move {
            let result = async {
                if full && !intake.full_sync().await? {
                    return Ok(IntakeEnd::Stopped);
                }
                intake.stream().await
            }
            .await;
            let _ = me.send_message(SourceMsg::IntakeExited(result));
        }));
        state.ticker = Some(myself.send_interval(ACK_PERIOD, || SourceMsg::AckTick));
        Ok(())
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        state: &mut SourceState,
    ) -> Result<(), ActorProcessingErr> {
        if let Some(t) = state.ticker.take() {
            t.abort();
        }
        if let Some(t) = state.sampler.take() {
            t.abort();
        }
        if let Some(t) = state.intake.take() {
            t.abort();
        }
        if let Some(t) = state.socket_reader.take() {
            t.abort();
        }
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        message: SourceMsg,
        state: &mut SourceState,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            SourceMsg::AckTick | SourceMsg::GetAck => {
                if state.acking {
                    send_ack(state, false).await;
                }
            }
            SourceMsg::RdbLoaded => {
                state.acking = true;
                send_ack(state, true).await;
            }
            SourceMsg::IntakeExited(Ok(IntakeEnd::Stopped)) => {
                state.intake = None;
                myself.stop(Some("stopped".into()));
            }
            SourceMsg::IntakeExited(Err(err)) => {
                state.intake = None;
                return Err(Box::new(err));
            }
            SourceMsg::Stop => {
                let _ = state.stop.send(true);
                if state.intake.is_none() {
                    myself.stop(Some("stopped".into()));
                }
            }
        }
        Ok(())
    }
}

/// Whether the server is a replica now (`INFO replication`).
async fn is_replica(conn: &mut Conn) -> Result<bool, WorkerError> {
    Ok(match conn.request(&["INFO", "replication"]).await? {
        engine::resp::Frame::Bulk(text) => String::from_utf8_lossy(&text)
            .lines()
            .any(|l| l.trim_end() == "role:slave"),
        _ => false,
    })
}

/// Sends `REPLCONF ACK <applied offset>`. Right after an RDB (`first`),
/// before anything of it is applied, the RDB's own offset is acknowledged
/// instead: a master that sent it diskless streams nothing until it gets an
/// ACK. Failures are left to the intake, which sees the same broken
/// connection.
async fn send_ack(state: &mut SourceState, first: bool) {
    let offset = match state.stats.applied() {
        Some(applied) => applied,
        None if first => match state.stats.processed() {
            Some(p) => p,
            None => return,
        },
        None => return,
    };
    let Some(writer) = state.writer.as_mut() else {
        return;
    };
    let ack = engine::resp::encode::to_bytes(&["REPLCONF", "ACK", &offset.to_string()]);
    match tokio::time::timeout(Duration::from_secs(5), writer.write_all(&ack)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::debug!(source = %state.addr, error = %e, "ACK not sent"),
        Err(_) => tracing::debug!(source = %state.addr, "ACK not sent within 5 s"),
    }
}

/// Reads the socket into `spill` until the connection ends, a read is idle
/// longer than `timeout`, or the spill fails; records why in `spill`.
async fn read_socket(
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
