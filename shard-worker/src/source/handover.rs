//! Hand-overs between the shards of a cluster source.
//!
//! Each master of a cluster source has its own stream, replayed by its own
//! shard, and the streams are not ordered with each other. That is right
//! while every key stays on one master. When a slot migrates (`redis-cli
//! --cluster reshard`, `MIGRATE`), a key's history goes on on another
//! master: the exporting master's stream ends it (its writes, then the
//! `DEL` that `MIGRATE` propagates), the importing master's stream goes on
//! (the `RESTORE-ASKING` copy, then what clients send it with `ASKING`
//! and, once the slot is its own, without). So a command of the importing
//! shard that may continue another master's history — a `RESTORE-ASKING`,
//! or any command in a slot that its master has not served long enough
//! (the replay rules' `Action::HandOver`) — waits until every other shard
//! has applied what its master had done by the time the command ran.
//!
//! **Samples.** A sampler task per shard asks its master `CLUSTER NODES`
//! and then its offset (`at`), and right after every other master its
//! offset: whatever the others had done before any command of this master
//! that ends at or before `at` is within those offsets. (`MIGRATE` is
//! synchronous: the exporting master answers nothing before it has
//! propagated its `DEL`, so an offset asked after the copy ran covers the
//! `DEL`.) The sampler runs every second, ten times a second while keys
//! change hands, and at once when a hand-over needs a sample later than
//! the newest. A hand-over waits for the first sample past its command,
//! not for now: a shard that lags behind never waits for what happened
//! after its command ran (two shards each waiting for the other's present
//! would wait for ever).
//!
//! **Settled slots.** A slot the master serves in a sample and that is not
//! settled becomes *pending* from the sample's `at`: its later commands
//! wait only for that sample, and once those offsets are applied (and the
//! stream is past `at`) the slot is settled and its commands go without a
//! wait. A settled slot the master no longer serves stops being settled
//! from the sample's `at` on (what ran before is its own). Slots the master
//! exports (`MIGRATING`) stay settled: the keys it still has were always
//! its own.
//!
//! The view (settled slots, pending ones, samples not yet passed) lives in
//! the shard's [`ShardStats`], so a reconnected intake goes on with it.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use engine::resp::Frame;
use engine::slot::SlotSet;
use tokio::sync::Notify;

use crate::conn::Conn;
use crate::endpoint::Endpoint;
use crate::error::WorkerError;
use crate::events;
use crate::progress::ShardStats;

/// The shards of one task on a cluster source, as each other's hand-overs
/// see them.
#[derive(Default)]
pub struct Peers {
    list: RwLock<Vec<Peer>>,
    /// Where a master that joined the source (serving slots no shard
    /// reads) is announced: the task starts a shard for it.
    announce: Mutex<Option<tokio::sync::mpsc::UnboundedSender<(String, u16)>>>,
    /// Masters announced already (`host:port`).
    announced: Mutex<std::collections::HashSet<String>>,
    /// Keys a migration copied, and the shard whose master has them now
    /// (see `engine::replay::MovedKeys`); forgotten once their slot is
    /// settled there (nobody else can touch them any more).
    imports: Mutex<HashMap<Box<[u8]>, usize>>,
    /// How many keys `imports` holds (no lock taken while it is empty).
    n_imports: AtomicU64,
}

/// One shard: its master and its progress.
#[derive(Clone)]
pub struct Peer {
    pub shard: usize,
    pub endpoint: Endpoint,
    pub stats: Arc<ShardStats>,
    /// Its master joined the source mid-sync.
    pub joined: bool,
}

impl Peer {
    /// Its applied offset, for hand-overs: a master that joined mid-sync
    /// holds, while its first full sync loads, nothing of another
    /// master's keys' history (its snapshot waits for theirs).
    fn applied(&self) -> Option<u64> {
        self.stats.applied().or_else(|| {
            (self.joined && self.stats.state() == crate::progress::ShardState::FullSync)
                .then_some(u64::MAX)
        })
    }
}

impl Peers {
    pub fn new() -> Peers {
        Peers::default()
    }

    /// A shard joins (at start, or a master added to the source mid-sync).
    pub fn add(&self, peer: Peer) {
        let mut list = self.list.write().expect("peers lock");
        list.retain(|p| p.shard != peer.shard);
        list.push(peer);
    }

    /// Every shard.
    pub fn all(&self) -> Vec<Peer> {
        self.list.read().expect("peers lock").clone()
    }

    /// Every shard but `me`.
    pub fn others(&self, me: usize) -> Vec<Peer> {
        let list = self.list.read().expect("peers lock");
        list.iter().filter(|p| p.shard != me).cloned().collect()
    }

    /// Masters that join the source are sent to `tx`.
    pub fn announce_to(&self, tx: tokio::sync::mpsc::UnboundedSender<(String, u16)>) {
        *self.announce.lock().expect("announce lock") = Some(tx);
    }

    /// Announces a master no shard reads, once: `None` when it was
    /// already, else whether someone listens.
    fn announce(&self, host: &str, port: u16) -> Option<bool> {
        let addr = crate::endpoint::addr_of(host, port);
        if self.knows(&addr) || !self.announced.lock().expect("announced lock").insert(addr) {
            return None;
        }
        let tx = self.announce.lock().expect("announce lock");
        Some(
            tx.as_ref()
                .is_some_and(|tx| tx.send((host.to_string(), port)).is_ok()),
        )
    }

    /// A shard whose master stopped being one (it lost its slots and
    /// follows another master now): nobody waits for it any more.
    pub fn remove(&self, shard: usize) {
        self.list
            .write()
            .expect("peers lock")
            .retain(|p| p.shard != shard);
    }

    /// Shard `by` took a migration's copy of `key`: its history continues
    /// there.
    pub fn imported(&self, key: &[u8], by: usize) {
        let mut imports = self.imports.lock().expect("imports lock");
        imports.insert(key.into(), by);
        self.n_imports
            .store(imports.len() as u64, Ordering::Release);
    }

    /// The shard whose master took `key` by a migration, if any did.
    pub fn importer(&self, key: &[u8]) -> Option<usize> {
        if self.n_imports.load(Ordering::Acquire) == 0 {
            return None;
        }
        self.imports.lock().expect("imports lock").get(key).copied()
    }

    /// `slots` are settled on shard `by`: its imports there are forgotten.
    pub fn settled(&self, by: usize, slots: &SlotSet) {
        if self.n_imports.load(Ordering::Acquire) == 0 {
            return;
        }
        let mut imports = self.imports.lock().expect("imports lock");
        imports.retain(|key, &mut shard| shard != by || !slots.contains(engine::slot::slot(key)));
        self.n_imports
            .store(imports.len() as u64, Ordering::Release);
    }

    /// Shard `shard`'s applied offset for hand-overs (`u64::MAX` for a
    /// shard that is gone: nothing of it is left to wait for).
    pub fn applied(&self, shard: usize) -> Option<u64> {
        let list = self.list.read().expect("peers lock");
        list.iter()
            .find(|p| p.shard == shard)
            .map_or(Some(u64::MAX), Peer::applied)
    }

    /// Whether a shard reads the master at `addr` (`host:port`).
    pub fn knows(&self, addr: &str) -> bool {
        self.shard_of(addr).is_some()
    }

    /// The shard that reads the master at `addr` (`host:port`).
    pub fn shard_of(&self, addr: &str) -> Option<usize> {
        let list = self.list.read().expect("peers lock");
        list.iter()
            .find(|p| p.endpoint.addr() == addr)
            .map(|p| p.shard)
    }
}

/// The keys copied away from one shard's master (`MovedKeys` for its
/// replay rules).
pub struct MovedAway {
    pub peers: Arc<Peers>,
    pub me: usize,
}

impl engine::replay::MovedKeys for MovedAway {
    fn moved_away(&self, key: &[u8]) -> bool {
        self.peers.importer(key).is_some_and(|by| by != self.me)
    }

    fn none(&self) -> bool {
        self.peers.n_imports.load(Ordering::Acquire) == 0
    }
}

/// Each other shard with the offset of its master it must have applied.
pub type Offsets = Vec<(usize, u64)>;

/// What one hand-over waits for, and when its command ran, as far as the
/// samples tell: after `after`, at or before `by`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Need {
    pub offsets: Offsets,
    pub after: Option<Instant>,
    pub by: Option<Instant>,
}

/// One look at the masters (see the module's doc).
#[derive(Clone, Debug)]
pub struct Sample {
    /// When it was taken.
    pub taken: Instant,
    /// This shard's master's offset, asked after its slots.
    pub at: u64,
    /// The slots it served (`None`: `CLUSTER NODES` gave nothing usable).
    pub served: Option<SlotSet>,
    /// The other masters' offsets, asked after `at`.
    pub peers: Offsets,
    /// Which shard's master serves each slot range, as this master sees
    /// the cluster (masters no shard reads are left out).
    pub owners: Vec<(u16, u16, usize)>,
}

/// Slots found served by this shard's master, not settled yet.
#[derive(Clone, Debug)]
struct Pending {
    /// The master's offset when it was found serving them: commands from
    /// here on ran while it did.
    from: u64,
    /// When that was.
    taken: Instant,
    slots: SlotSet,
    /// The other masters' offsets asked after that.
    peers: Offsets,
}

/// The pure part of a shard's hand-overs (settled slots are the replay
/// rules' own set).
#[derive(Clone, Debug, Default)]
pub struct Settling {
    pending: Vec<Pending>,
    /// Settled slots the master no longer serves, from its offset then.
    leaving: Vec<(u64, SlotSet)>,
    /// Samples the stream has not passed: (`at`, when, the others'
    /// offsets), and the last one it passed.
    samples: VecDeque<(u64, Instant, Offsets)>,
    passed: Option<(u64, Instant)>,
    /// Per slot, the shard whose master served it in the last sample
    /// (`u16::MAX`: none known), and the ones that served it before: a
    /// key of the slot has its history on those masters only.
    owner: Option<Box<[u16]>>,
    previous: HashMap<u16, Vec<usize>>,
    /// This shard.
    pub me: Option<usize>,
}

impl Settling {
    /// What a hand-over for a command in `slot` that spans `start..end` of
    /// the stream waits for: the others' offsets of the slot's pending
    /// sample, or of the first sample taken after the command ran; `None`
    /// while no sample is that late. A migration's copy (`import`) ran
    /// after its slot was found served (a pending slot is served: the copy
    /// came late): it waits for a sample after it.
    pub fn need(&self, slot: u16, start: u64, end: u64, import: bool) -> Option<Need> {
        let first = self.samples.iter().position(|(at, _, _)| *at >= end);
        let by = first.map(|i| self.samples[i].1);
        // The last look before the command ran.
        let before = match first {
            Some(0) | None => self.samples.back().filter(|_| first.is_none()).map(|s| s.1),
            Some(i) => Some(self.samples[i - 1].1),
        }
        .or_else(|| self.passed.filter(|(at, _)| *at < end).map(|(_, t)| t));
        if !import {
            if let Some(p) = self
                .pending
                .iter()
                .find(|p| p.from <= start && p.slots.contains(slot))
            {
                return Some(Need {
                    offsets: self.relevant(slot, &p.peers),
                    after: before.map_or(Some(p.taken), |b| Some(b.max(p.taken))),
                    by,
                });
            }
        }
        let i = first?;
        Some(Need {
            offsets: self.relevant(slot, &self.samples[i].2),
            after: before,
            by,
        })
    }

    /// Of `offsets`, those of the shards whose masters served `slot` (its
    /// keys' history is there); all of them when none is known but this
    /// one (`me` is never in `offsets`), or for [`ANY_SLOT`].
    fn relevant(&self, slot: u16, offsets: &Offsets) -> Offsets {
        if slot >= engine::slot::SLOTS {
            return offsets.clone();
        }
        let owner = self
            .owner
            .as_ref()
            .map(|o| o[slot as usize])
            .filter(|&o| o != u16::MAX)
            .map(usize::from);
        let mut served: Vec<usize> = self.previous.get(&slot).cloned().unwrap_or_default();
        served.extend(owner);
        served.retain(|&s| Some(s) != self.me);
        if served.is_empty() {
            // Nobody else is known to have served it: all of them.
            return offsets.clone();
        }
        // Masters that served it and are gone (a master emptied into a
        // replica) have nothing left to wait for.
        offsets
            .iter()
            .copied()
            .filter(|(shard, _)| served.contains(shard))
            .collect()
    }

    /// The owners a sample names: a slot whose owner changed keeps the
    /// earlier one among those that served it.
    fn owners(&mut self, owners: &[(u16, u16, usize)]) {
        let owner = self
            .owner
            .get_or_insert_with(|| vec![u16::MAX; engine::slot::SLOTS as usize].into());
        for &(a, b, shard) in owners {
            let shard16 = shard.min(u16::MAX as usize - 1) as u16;
            for slot in a..=b.min(engine::slot::SLOTS - 1) {
                let was = owner[slot as usize];
                if was == shard16 {
                    continue;
                }
                if was != u16::MAX {
                    let before = self.previous.entry(slot).or_default();
                    if !before.contains(&usize::from(was)) {
                        before.push(usize::from(was));
                    }
                }
                owner[slot as usize] = shard16;
            }
        }
    }

    /// Takes in a sample: its slots (against the replay rules' `settled`),
    /// and its offsets for later hand-overs. Returns the newly pending
    /// slots' count.
    pub fn absorb(&mut self, settled: &SlotSet, sample: Sample) -> usize {
        self.owners(&sample.owners);
        let mut n = 0;
        if let Some(served) = &sample.served {
            let fresh = self.served(settled, served, sample.at);
            n = fresh.len();
            if !fresh.is_empty() {
                self.pending.push(Pending {
                    from: sample.at,
                    taken: sample.taken,
                    slots: fresh,
                    peers: sample.peers.clone(),
                });
            }
        }
        // Samples come in order; one per offset is enough (the earliest).
        if self.samples.back().is_none_or(|(at, _, _)| *at < sample.at) {
            self.samples
                .push_back((sample.at, sample.taken, sample.peers));
        }
        n
    }

    /// The master serves `served` as of its offset `at`: what it no longer
    /// serves is no longer settled for the commands from `at` on (those
    /// before ran while it did) and no longer pending; what it serves and
    /// is neither is returned, to become pending.
    fn served(&mut self, settled: &SlotSet, served: &SlotSet, at: u64) -> SlotSet {
        let mut fresh = SlotSet::empty();
        let mut leaving = SlotSet::empty();
        let mut look = served.clone();
        for slot in settled.iter() {
            look.insert(slot);
        }
        for p in &self.pending {
            for slot in p.slots.iter() {
                look.insert(slot);
            }
        }
        for slot in look.iter() {
            let serves = served.contains(slot);
            let left = self.leaving.iter_mut().find(|(_, l)| l.contains(slot));
            if settled.contains(slot) {
                match (serves, left) {
                    (true, Some((_, l))) => l.remove(slot),
                    (false, None) => leaving.insert(slot),
                    _ => {}
                }
                continue;
            }
            let pending = self.pending.iter_mut().find(|p| p.slots.contains(slot));
            match (serves, pending) {
                (false, Some(p)) => p.slots.remove(slot),
                (true, None) => fresh.insert(slot),
                _ => {}
            }
        }
        self.pending.retain(|p| !p.slots.is_empty());
        self.leaving.retain(|(_, l)| !l.is_empty());
        if !leaving.is_empty() {
            self.leaving.push((at, leaving));
        }
        fresh
    }

    /// Where the stream must be for a slot that left to stop being
    /// settled (`u64::MAX`: none is leaving).
    pub fn next_leave(&self) -> u64 {
        self.leaving
            .iter()
            .map(|&(at, _)| at)
            .min()
            .unwrap_or(u64::MAX)
    }

    /// The stream is at `offset`: slots that left before it are no longer
    /// settled, and samples before it can serve no later command.
    pub fn leave(&mut self, settled: &mut SlotSet, offset: u64) {
        self.leaving.retain(|(at, slots)| {
            if *at > offset {
                return true;
            }
            for slot in slots.iter() {
                settled.remove(slot);
            }
            false
        });
        self.prune(offset);
    }

    /// Samples before `offset` can serve no later command.
    pub fn prune(&mut self, offset: u64) {
        while self.samples.front().is_some_and(|(at, _, _)| *at < offset) {
            if let Some((at, taken, _)) = self.samples.pop_front() {
                self.passed = Some((at, taken));
            }
        }
    }

    /// Settles the pending slots whose other masters' offsets are applied
    /// (`applied` of each shard), once the stream is at `offset` past where
    /// they were found served. Returns the slots settled.
    pub fn settle(
        &mut self,
        settled: &mut SlotSet,
        offset: u64,
        applied: impl Fn(usize) -> Option<u64>,
    ) -> SlotSet {
        let mut now = SlotSet::empty();
        for p in &self.pending {
            if p.from > offset {
                continue;
            }
            if applied_all(&p.peers, &applied) {
                for slot in p.slots.iter() {
                    now.insert(slot);
                }
                continue;
            }
            for slot in p.slots.iter() {
                if applied_all(&self.relevant(slot, &p.peers), &applied) {
                    now.insert(slot);
                }
            }
        }
        if now.is_empty() {
            return now;
        }
        for p in &mut self.pending {
            for slot in now.iter() {
                p.slots.remove(slot);
            }
        }
        self.pending.retain(|p| !p.slots.is_empty());
        for slot in now.iter() {
            settled.insert(slot);
        }
        now
    }

    /// Whether `slot` is pending (served by the master, not settled).
    pub fn is_pending(&self, slot: u16) -> bool {
        self.pending.iter().any(|p| p.slots.contains(slot))
    }

    /// Whether slots are pending or leaving: the master's slots are
    /// changing hands.
    pub fn changing(&self) -> bool {
        !self.pending.is_empty() || !self.leaving.is_empty()
    }

    /// Slots pending, for logs.
    pub fn pending_slots(&self) -> usize {
        self.pending.iter().map(|p| p.slots.len()).sum()
    }
}

/// Whether every shard in `offsets` applied its offset.
pub fn applied_all(offsets: &Offsets, applied: impl Fn(usize) -> Option<u64>) -> bool {
    offsets
        .iter()
        .all(|&(shard, o)| applied(shard).is_some_and(|a| a >= o))
}

/// A shard's hand-over view, kept in its [`ShardStats`] across intakes.
#[derive(Clone, Debug)]
pub struct View {
    pub settled: SlotSet,
    pub settling: Settling,
}

/// What a shard's sampler and intake share (in its [`ShardStats`]).
pub struct Shared {
    pub view: Mutex<Option<View>>,
    /// Samples the intake has not taken in yet.
    samples: Mutex<Vec<Sample>>,
    /// A sample was taken.
    sampled: Notify,
    /// The intake wants a sample now.
    wanted: Notify,
    /// Until when (Unix ms) the sampler runs ten times a second.
    busy_until: AtomicU64,
    /// Where the intake waits at a hand-over (`u64::MAX`: it does not),
    /// and when the command it waits with ran (see [`Need`]).
    waiting_at: AtomicU64,
    window: Mutex<(Option<Instant>, Option<Instant>)>,
    /// The slot of the migration copy the intake waits with
    /// (`u32::MAX`: none).
    waiting_import: std::sync::atomic::AtomicU32,
    /// The shard it waits for now (`u64::MAX`: none).
    waiting_on: AtomicU64,
    /// The furthest offset of this shard's stream where its slots changed
    /// hands (a hand-over, a slot found served or no longer served): until
    /// the target applied that far, a restart cannot resume the shard in
    /// order with the others (see `engine::ownership`).
    horizon: AtomicU64,
}

impl Default for Shared {
    fn default() -> Self {
        Shared {
            view: Mutex::new(None),
            samples: Mutex::new(Vec::new()),
            sampled: Notify::new(),
            wanted: Notify::new(),
            busy_until: AtomicU64::new(0),
            waiting_at: AtomicU64::new(u64::MAX),
            window: Mutex::new((None, None)),
            waiting_import: std::sync::atomic::AtomicU32::new(u32::MAX),
            waiting_on: AtomicU64::new(u64::MAX),
            horizon: AtomicU64::new(0),
        }
    }
}

impl Shared {
    /// See [`Shared::horizon`](#structfield.horizon): where in the stream
    /// the shard's slots last changed hands (0: never).
    pub fn horizon(&self) -> u64 {
        self.horizon.load(Ordering::SeqCst)
    }

    /// A full sync begins: what changed hands before is in its snapshot.
    pub fn forget_horizon(&self) {
        self.horizon.store(0, Ordering::SeqCst);
    }

    fn changed_at(&self, offset: u64) {
        self.horizon.fetch_max(offset, Ordering::SeqCst);
    }

    /// Where the intake waits at a hand-over, if it does.
    pub fn waiting_at(&self) -> Option<u64> {
        let at = self.waiting_at.load(Ordering::SeqCst);
        (at != u64::MAX).then_some(at)
    }

    fn take_samples(&self) -> Vec<Sample> {
        std::mem::take(&mut *self.samples.lock().expect("samples lock"))
    }

    fn busy(&self) {
        let until = crate::clock::unix_ms() as u64 + BUSY_FOR.as_millis() as u64;
        self.busy_until.fetch_max(until, Ordering::Relaxed);
    }

    fn period(&self) -> Duration {
        if self.busy_until.load(Ordering::Relaxed) > crate::clock::unix_ms() as u64 {
            BUSY_PERIOD
        } else {
            IDLE_PERIOD
        }
    }
}

/// A hand-over for keys of any slot (a joined shard's snapshot).
const ANY_SLOT: u16 = u16::MAX;

/// How long a hand-over waits before it says so in the log.
const SLOW_WAIT: Duration = Duration::from_secs(5);
/// How long two shards that wait on each other wait before the lower one
/// goes on (see `Intake::wait_for`).
const CYCLE_WAIT: Duration = Duration::from_millis(100);
/// How often the sampler looks, and while keys change hands.
const IDLE_PERIOD: Duration = Duration::from_secs(1);
const BUSY_PERIOD: Duration = Duration::from_millis(20);
/// How long after a hand-over the sampler stays fast.
const BUSY_FOR: Duration = Duration::from_secs(10);

/// The sampler task of one shard (see the module's doc); runs until
/// aborted with its worker.
pub async fn sampler(peers: Arc<Peers>, me: usize, own: Endpoint, stats: Arc<ShardStats>) {
    let shared = &stats.handover;
    let mut conns: HashMap<String, Conn> = HashMap::new();
    let mut log = events::LogLimiter::new();
    loop {
        let sample = take_sample(&mut conns, &peers, me, &own).await;
        match sample {
            Ok(sample) => {
                shared.samples.lock().expect("samples lock").push(sample);
                shared.sampled.notify_waiters();
            }
            Err(e) => {
                if log.allow().is_some() {
                    tracing::warn!(source = %own, error = %e, "could not ask the source masters where they are (slot migrations wait); asking again");
                }
            }
        }
        let period = shared.period();
        tokio::select! {
            _ = tokio::time::sleep(period) => {}
            _ = shared.wanted.notified() => {}
        }
    }
}

/// One sample: this master's slots and offset, then the others' offsets.
async fn take_sample(
    conns: &mut HashMap<String, Conn>,
    peers: &Peers,
    me: usize,
    own: &Endpoint,
) -> Result<Sample, WorkerError> {
    let taken = Instant::now();
    let (text, at, _) = ask(conns, own, true).await?;
    let nodes = engine::cluster::parse_nodes(&text);
    let (served, masters) = served_slots(&nodes);
    for (host, port) in masters {
        if let Some(followed) = peers.announce(&host, port) {
            events::SourceMasterJoined {
                source: &own.addr(),
                master: &crate::endpoint::addr_of(&host, port),
                followed,
            }
            .emit();
        }
    }
    let mut offsets = Vec::new();
    for peer in peers.others(me) {
        let offset = match ask(conns, &peer.endpoint, false).await {
            // A master that became a replica (it lost its slots) has a new
            // history: what its shard read of the old one is all there is.
            Ok((_, _, false)) => peer.stats.processed().unwrap_or(0),
            Ok((_, offset, true)) => offset,
            Err(e) => {
                // What its shard read is all that can be waited for.
                events::HandOverBlind {
                    source: &own.addr(),
                    other: &peer.stats.source,
                    error: &e,
                }
                .emit();
                peer.stats.processed().unwrap_or(0)
            }
        };
        offsets.push((peer.shard, offset));
    }
    let mut owners = Vec::new();
    let me_addr = own.addr();
    for node in nodes.iter().filter(|n| n.serving_master()) {
        let addr = crate::endpoint::addr_of(&node.host, node.port);
        let shard = if addr == me_addr {
            Some(me)
        } else {
            peers.shard_of(&addr)
        };
        if let Some(shard) = shard {
            owners.extend(node.slots.iter().map(|&(a, b)| (a, b, shard)));
        }
    }
    Ok(Sample {
        taken,
        at,
        served: nodes.iter().any(|n| n.myself).then_some(served),
        peers: offsets,
        owners,
    })
}

/// Asks the master at `ep` (with `nodes`: `CLUSTER NODES` first) and then
/// its offset and whether it is still a master, pipelined on one
/// connection kept open: the offset is taken after the slots were.
async fn ask(
    conns: &mut HashMap<String, Conn>,
    ep: &Endpoint,
    nodes: bool,
) -> Result<(String, u64, bool), WorkerError> {
    let addr = ep.addr();
    let mut conn = match conns.remove(&addr) {
        Some(conn) => conn,
        None => Conn::open_authenticated(ep).await?,
    };
    let mut requests: Vec<Vec<&str>> = Vec::with_capacity(2);
    if nodes {
        requests.push(vec!["CLUSTER", "NODES"]);
    }
    requests.push(vec!["INFO", "replication"]);
    let replies = conn.pipeline(&requests).await?;
    let text = |f: &Frame| match f {
        Frame::Bulk(b) => Ok(String::from_utf8_lossy(b).into_owned()),
        other => Err(WorkerError::Unexpected {
            addr: addr.clone(),
            context: "asking a source master where it is (hand-overs)",
            reply: other.to_text(),
        }),
    };
    let info = text(replies.last().expect("one reply per request"))?;
    let offset = info
        .lines()
        .find_map(|l| l.trim_end().strip_prefix("master_repl_offset:"))
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| WorkerError::Unexpected {
            addr: addr.clone(),
            context: "reading master_repl_offset (hand-overs)",
            reply: info.lines().take(3).collect::<Vec<_>>().join(" "),
        })?;
    let nodes_text = if nodes {
        text(&replies[0])?
    } else {
        String::new()
    };
    let master = !info.lines().any(|l| l.trim_end() == "role:slave");
    conns.insert(addr, conn);
    Ok((nodes_text, offset, master))
}

/// The slots `CLUSTER NODES` (as the node that answered) says it serves,
/// and the serving masters it names.
pub fn served_slots(nodes: &[engine::cluster::ClusterNode]) -> (SlotSet, Vec<(String, u16)>) {
    let served = nodes
        .iter()
        .find(|n| n.myself)
        .map_or_else(SlotSet::empty, |n| SlotSet::of_ranges(&n.slots));
    let masters = nodes
        .iter()
        .filter(|n| n.serving_master())
        .map(|n| (n.host.clone(), n.port))
        .collect();
    (served, masters)
}

/// The intake's side.
pub(super) struct HandOvers {
    pub peers: Arc<Peers>,
    pub me: usize,
    pub settling: Settling,
    /// The master joined the source mid-sync (see `hand_over_snapshot`).
    pub joined: bool,
}

impl super::intake::Intake {
    /// Carries out `Action::HandOver` for the command that spans
    /// `start..` the intake's offset. Returns `false` when the intake was
    /// asked to stop meanwhile: the command is not sent.
    pub(super) async fn hand_over(
        &mut self,
        slot: u16,
        import: Option<bytes::Bytes>,
        start: u64,
    ) -> Result<bool, WorkerError> {
        let end = self.offset;
        if self.handovers.is_none() {
            return Ok(true);
        }
        self.stats.handover.changed_at(end);
        if !self
            .hand_over_until(slot, import.is_some(), start, end)
            .await?
        {
            return Ok(false);
        }
        if let (Some(key), Some(h)) = (import, self.handovers.as_ref()) {
            h.peers.imported(&key, h.me);
        }
        Ok(true)
    }

    /// A shard for a master that joined the source mid-sync: its snapshot
    /// holds keys other masters' streams may still be deleting (the `DEL`
    /// of the `MIGRATE` that copied them), so it waits for the others'
    /// offsets of a sample taken after its `+FULLRESYNC` (at `offset`).
    pub(super) async fn hand_over_snapshot(&mut self, offset: u64) -> Result<bool, WorkerError> {
        if !self.handovers.as_ref().is_some_and(|h| h.joined) {
            return Ok(true);
        }
        self.hand_over_until(ANY_SLOT, true, offset, offset).await
    }

    async fn hand_over_until(
        &mut self,
        slot: u16,
        import: bool,
        start: u64,
        end: u64,
    ) -> Result<bool, WorkerError> {
        self.stats.handover.busy();
        let began = Instant::now();
        let mut need = loop {
            self.absorb_samples();
            let h = self.handovers.as_ref().expect("hand-overs on");
            if let Some(need) = h.settling.need(slot, start, end, import) {
                break need;
            }
            // No sample is late enough: ask for one.
            let shared = &self.stats.handover;
            let sampled = shared.sampled.notified();
            tokio::pin!(sampled);
            sampled.as_mut().enable();
            if !shared.samples.lock().expect("samples lock").is_empty() {
                continue;
            }
            shared.wanted.notify_one();
            let mut stop = self.stop.clone();
            tokio::select! {
                _ = &mut sampled => {}
                _ = stop.changed() => return Ok(false),
                _ = tokio::time::sleep(SLOW_WAIT) => {
                    tracing::info!(source = %self.addr, slot, "a hand-over waits for the source masters' offsets");
                }
            }
        };
        if slot == ANY_SLOT {
            // A joined shard's snapshot: shards in a full sync of their own
            // (another master that joined) hold none of its keys' history.
            let h = self.handovers.as_ref().expect("hand-overs on");
            let peers = h.peers.others(h.me);
            need.offsets.retain(|(shard, _)| {
                peers
                    .iter()
                    .find(|p| p.shard == *shard)
                    .is_some_and(|p| p.stats.state() != crate::progress::ShardState::FullSync)
            });
        }
        if !self.applied(&need.offsets) {
            // What this shard read before the command goes out first (a
            // shard waiting for it waits for no more than that).
            self.dispatcher.flush_all(self.safe).await?;
            if let Some(at) = self.safe {
                self.stats.publish_processed(at);
            }
            if !self.wait_for(&need, slot, start, import).await {
                return Ok(false);
            }
        }
        events::HandOver {
            waited: began.elapsed(),
        }
        .emit(&self.stats.counters);
        self.settle_ready();
        Ok(true)
    }

    /// Whether each other shard applied its offset in `offsets`.
    fn applied(&self, offsets: &Offsets) -> bool {
        let Some(h) = self.handovers.as_ref() else {
            return true;
        };
        applied_all(offsets, |shard| h.peers.applied(shard))
    }

    /// Waits until each other shard applied its offset in `need`; `false`
    /// when asked to stop meanwhile. Two shards whose commands ran within
    /// one sample of each other may each wait for the other. Then the one
    /// whose command ran first goes on once the other applied everything it
    /// handed over (the other's blocked command ran later, so what it did
    /// before this one is in there); when the samples cannot tell which ran
    /// first, after [`CYCLE_WAIT`] the one with the lower index goes on, and
    /// says so.
    async fn wait_for(&mut self, need: &Need, slot: u16, start: u64, import: bool) -> bool {
        let Some(h) = self.handovers.as_ref() else {
            return true;
        };
        let me = h.me;
        let peers = h.peers.others(me);
        let began = Instant::now();
        let mut said = began;
        let shared = &self.stats.handover;
        *shared.window.lock().expect("window lock") = (need.after, need.by);
        let copy = if import && slot < engine::slot::SLOTS {
            u32::from(slot)
        } else {
            u32::MAX
        };
        shared.waiting_import.store(copy, Ordering::SeqCst);
        shared.waiting_at.store(start, Ordering::SeqCst);
        let mut done = true;
        'peers: for &(shard, offset) in &need.offsets {
            let Some(peer) = peers.iter().find(|p| p.shard == shard) else {
                continue;
            };
            shared.waiting_on.store(shard as u64, Ordering::SeqCst);
            while !peer
                .stats
                .wait_applied(offset, Duration::from_millis(20))
                .await
                && peer.applied().is_none_or(|a| a < offset)
            {
                if *self.stop.borrow() {
                    done = false;
                    break 'peers;
                }
                let other = &peer.stats.handover;
                let handed_over = peer.stats.applied().is_some()
                    && peer.stats.applied() == peer.stats.processed();
                let on_me = other.waiting_on.load(Ordering::SeqCst) == me as u64;
                if other.waiting_at().is_some() && on_me && handed_over {
                    // It waits with a copy of a key this master exports: for
                    // this master's `DEL` of it, further on in this stream
                    // than anything this command needs of it.
                    let copy = other.waiting_import.load(Ordering::SeqCst);
                    let serves = |slot: u16| {
                        self.replay.settled().is_some_and(|s| s.contains(slot))
                            || self
                                .handovers
                                .as_ref()
                                .is_some_and(|h| h.settling.is_pending(slot))
                    };
                    if copy != u32::MAX && (serves(copy as u16) || (!import && serves(slot))) {
                        // Or it waits with a copy while this command's slot
                        // is this master's: the other master no longer
                        // serves it, so nothing it did after its copy can
                        // touch this command's keys.
                        continue 'peers;
                    }
                    let (after, by) = *other.window.lock().expect("window lock");
                    let first = need.by.zip(after).is_some_and(|(mine, its)| mine < its);
                    let second = by.zip(need.after).is_some_and(|(its, mine)| its < mine);
                    if first {
                        continue 'peers;
                    }
                    if !second && me < shard && began.elapsed() >= CYCLE_WAIT {
                        events::HandOverCycle {
                            source: &self.addr,
                            other: &peer.stats.source,
                            slot,
                        }
                        .emit(&self.stats.counters);
                        continue 'peers;
                    }
                }
                if said.elapsed() >= SLOW_WAIT {
                    said = Instant::now();
                    events::HandOverSlow {
                        source: &self.addr,
                        other: &peer.stats.source,
                        slot,
                        offset,
                        applied: peer.stats.applied(),
                        secs: began.elapsed().as_secs(),
                    }
                    .emit();
                }
            }
        }
        shared.waiting_at.store(u64::MAX, Ordering::SeqCst);
        shared.waiting_on.store(u64::MAX, Ordering::SeqCst);
        shared.waiting_import.store(u32::MAX, Ordering::SeqCst);
        done
    }

    /// Takes in the samples taken since the last call.
    pub(super) fn absorb_samples(&mut self) {
        let samples = self.stats.handover.take_samples();
        if samples.is_empty() {
            return;
        }
        let (Some(h), Some(settled)) = (self.handovers.as_mut(), self.replay.settled()) else {
            return;
        };
        for sample in samples {
            let at = sample.at;
            h.settling.absorb(settled, sample);
            if h.settling.changing() {
                self.stats.handover.changed_at(at);
            }
        }
        h.settling.prune(self.offset);
        self.next_leave = h.settling.next_leave();
        self.keep_view();
        self.settle_ready();
    }

    /// Settles the pending slots that are ready (and keeps the view).
    pub(super) fn settle_ready(&mut self) {
        let (Some(h), Some(settled)) = (self.handovers.as_mut(), self.replay.settled_mut()) else {
            return;
        };
        if h.settling.pending_slots() == 0 {
            return;
        }
        let peers = &h.peers;
        let now = h
            .settling
            .settle(settled, self.offset, |shard| peers.applied(shard));
        if !now.is_empty() {
            tracing::debug!(source = %self.addr, slots = now.len(), "slots settled");
            h.peers.settled(h.me, &now);
            self.keep_view();
        }
    }

    /// Keeps the view in the shard's stats, for the next intake (after a
    /// change only: it is a few tens of KB).
    fn keep_view(&self) {
        let (Some(h), Some(settled)) = (self.handovers.as_ref(), self.replay.settled()) else {
            return;
        };
        *self.stats.handover.view.lock().expect("view lock") = Some(View {
            settled: settled.clone(),
            settling: h.settling.clone(),
        });
    }

    /// The stream passed where a slot that left stops being settled.
    pub(super) fn leave_slots(&mut self) {
        let (Some(h), Some(settled)) = (self.handovers.as_mut(), self.replay.settled_mut()) else {
            return;
        };
        h.settling.leave(settled, self.offset);
        self.next_leave = h.settling.next_leave();
        self.keep_view();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(slots: &[u16]) -> SlotSet {
        let mut s = SlotSet::empty();
        for &slot in slots {
            s.insert(slot);
        }
        s
    }

    fn sample(at: u64, served: &[u16], peers: Offsets) -> Sample {
        Sample {
            taken: Instant::now(),
            at,
            served: Some(set(served)),
            peers,
            owners: Vec::new(),
        }
    }

    #[test]
    fn a_hand_over_waits_for_the_first_sample_after_its_command() {
        let settled = set(&[1]);
        let mut s = Settling::default();
        assert_eq!(
            s.need(7, 100, 120, false).map(|n| n.offsets),
            None,
            "no sample yet"
        );
        s.absorb(&settled, sample(110, &[1], vec![(1, 50)]));
        assert_eq!(
            s.need(7, 100, 120, false).map(|n| n.offsets),
            None,
            "too early for it"
        );
        s.absorb(&settled, sample(120, &[1], vec![(1, 60)]));
        s.absorb(&settled, sample(300, &[1], vec![(1, 90)]));
        assert_eq!(
            s.need(7, 100, 120, false).map(|n| n.offsets),
            Some(vec![(1, 60)])
        );
        assert_eq!(
            s.need(7, 120, 200, true).map(|n| n.offsets),
            Some(vec![(1, 90)])
        );
        // Passed samples are dropped.
        let mut settled = settled;
        s.leave(&mut settled, 121);
        assert_eq!(
            s.need(7, 100, 120, false).map(|n| n.offsets),
            Some(vec![(1, 90)])
        );
    }

    #[test]
    fn a_slot_newly_served_settles_once_the_others_applied_that_sample() {
        let mut settled = set(&[1, 2]);
        let mut s = Settling::default();
        // Slot 2 moved away, 3 moved in.
        assert_eq!(
            s.absorb(&settled, sample(1000, &[1, 3], vec![(1, 50), (2, 70)])),
            1
        );
        // 2 stays settled for what ran before the master was seen without it.
        assert_eq!(s.next_leave(), 1000);
        s.leave(&mut settled, 999);
        assert_eq!(settled, set(&[1, 2]));
        s.leave(&mut settled, 1000);
        assert_eq!(settled, set(&[1]));
        assert_eq!(s.next_leave(), u64::MAX);
        // Commands that ran before it was seen served wait for a later
        // sample; later ones for the offsets of that sample.
        assert_eq!(s.need(3, 900, 1001, false).map(|n| n.offsets), None);
        assert_eq!(
            s.need(3, 1000, 1050, false).map(|n| n.offsets),
            Some(vec![(1, 50), (2, 70)])
        );
        // A migration's copy waits for a sample after it.
        assert_eq!(s.need(3, 1000, 1050, true).map(|n| n.offsets), None);
        // Not settled while a shard is behind, or the stream before `from`.
        let applied = |shard: usize| Some(if shard == 1 { 50 } else { 69 });
        assert!(s.settle(&mut settled, 2000, applied).is_empty());
        let applied = |_| Some(100);
        assert!(s.settle(&mut settled, 999, applied).is_empty());
        assert_eq!(s.settle(&mut settled, 1000, applied), set(&[3]));
        assert_eq!(settled, set(&[1, 3]));
        assert_eq!(s.pending_slots(), 0);
    }

    #[test]
    fn a_shard_in_a_full_sync_holds_settling_back() {
        let mut settled = SlotSet::empty();
        let mut s = Settling::default();
        s.absorb(&settled, sample(0, &[5], vec![(1, 10)]));
        assert!(s.settle(&mut settled, 10, |_| None).is_empty());
        assert!(!settled.contains(5));
    }

    #[test]
    fn a_pending_slot_that_leaves_again_is_forgotten() {
        let mut settled = SlotSet::empty();
        let mut s = Settling::default();
        assert_eq!(s.absorb(&settled, sample(10, &[5, 6], vec![])), 2);
        assert_eq!(s.absorb(&settled, sample(15, &[6], vec![])), 0);
        assert_eq!(s.pending_slots(), 1);
        assert_eq!(s.need(5, 20, 30, false).map(|n| n.offsets), None);
        assert_eq!(s.settle(&mut settled, 20, |_| Some(0)), set(&[6]));
        assert_eq!(settled, set(&[6]));
    }

    #[test]
    fn a_slot_that_comes_back_before_it_left_stays_settled() {
        let mut settled = set(&[1]);
        let mut s = Settling::default();
        s.absorb(&settled, sample(100, &[], vec![]));
        s.absorb(&settled, sample(150, &[1], vec![]));
        assert_eq!(s.next_leave(), u64::MAX);
        s.leave(&mut settled, 200);
        assert_eq!(settled, set(&[1]));
    }

    #[test]
    fn a_sample_without_slots_only_gives_offsets() {
        let settled = SlotSet::empty();
        let mut s = Settling::default();
        let blind = Sample {
            taken: Instant::now(),
            at: 10,
            served: None,
            peers: vec![(0, 4)],
            owners: Vec::new(),
        };
        assert_eq!(s.absorb(&settled, blind), 0);
        assert_eq!(s.pending_slots(), 0);
        assert_eq!(
            s.need(9, 0, 10, false).map(|n| n.offsets),
            Some(vec![(0, 4)])
        );
    }

    #[test]
    fn a_hand_over_waits_only_for_the_masters_that_served_its_slot() {
        let settled = SlotSet::empty();
        let mut s = Settling {
            me: Some(0),
            ..Settling::default()
        };
        // Shard 0 (this one) imports slot 5 from shard 1; shard 2 serves
        // other slots.
        let mut first = sample(10, &[], vec![(1, 100), (2, 200)]);
        first.owners = vec![(0, 9, 1), (10, 20, 2)];
        s.absorb(&settled, first);
        assert_eq!(
            s.need(5, 0, 10, true).map(|n| n.offsets),
            Some(vec![(1, 100)])
        );
        // Once the slot is this master's, its earlier owner still counts.
        let mut later = sample(20, &[5], vec![(1, 110), (2, 210)]);
        later.owners = vec![(0, 4, 1), (5, 5, 0), (6, 9, 1), (10, 20, 2)];
        s.absorb(&settled, later);
        assert_eq!(
            s.need(5, 20, 30, false).map(|n| n.offsets),
            Some(vec![(1, 110)])
        );
        let mut settled = settled;
        let applied = |shard: usize| Some(if shard == 1 { 110 } else { 0 });
        assert_eq!(
            s.settle(&mut settled, 20, applied),
            set(&[5]),
            "shard 2 does not matter"
        );
        // A slot whose only known owner is this master: every other shard.
        let mut s = Settling {
            me: Some(0),
            ..Settling::default()
        };
        let mut only = sample(10, &[], vec![(1, 100), (2, 200)]);
        only.owners = vec![(7, 7, 0)];
        s.absorb(&SlotSet::empty(), only);
        assert_eq!(
            s.need(7, 0, 10, false).map(|n| n.offsets),
            Some(vec![(1, 100), (2, 200)])
        );
    }

    #[test]
    fn a_hand_over_knows_between_which_looks_its_command_ran() {
        let settled = SlotSet::empty();
        let mut s = Settling::default();
        let (a, b) = (sample(100, &[], vec![]), sample(200, &[], vec![]));
        let (ta, tb) = (a.taken, b.taken);
        s.absorb(&settled, a);
        s.absorb(&settled, b);
        let need = s.need(9, 150, 180, false).unwrap();
        assert_eq!((need.after, need.by), (Some(ta), Some(tb)));
        let need = s.need(9, 50, 90, false).unwrap();
        assert_eq!((need.after, need.by), (None, Some(ta)));
        assert_eq!(s.need(9, 200, 250, false), None);
        // Passed samples still bound it from below.
        let mut settled = settled;
        s.leave(&mut settled, 201);
        assert_eq!(s.need(9, 201, 250, false), None);
        s.absorb(&settled, sample(300, &[], vec![]));
        assert_eq!(s.need(9, 201, 250, false).unwrap().after, Some(tb));
    }

    #[test]
    fn a_slot_whose_earlier_master_is_gone_waits_for_nobody() {
        let mut s = Settling {
            me: Some(0),
            ..Settling::default()
        };
        let mut first = sample(10, &[], vec![(1, 100), (2, 200)]);
        first.owners = vec![(5, 5, 3)];
        s.absorb(&SlotSet::empty(), first);
        // Shard 3 (its master emptied into a replica) is no longer asked.
        let mut later = sample(20, &[5], vec![(1, 110), (2, 210)]);
        later.owners = vec![(5, 5, 0)];
        s.absorb(&SlotSet::empty(), later);
        assert_eq!(s.need(5, 20, 30, false).map(|n| n.offsets), Some(vec![]));
    }

    #[test]
    fn imports_are_remembered_until_their_slot_settles_at_the_importer() {
        let peers = Peers::new();
        let moved = MovedAway {
            peers: Arc::new(Peers::new()),
            me: 0,
        };
        assert!(!engine::replay::MovedKeys::moved_away(&moved, b"k"));
        peers.imported(b"k", 1);
        peers.imported(b"j", 2);
        assert_eq!(peers.importer(b"k"), Some(1));
        let slot = engine::slot::slot(b"k");
        peers.settled(2, &set(&[slot]));
        assert_eq!(peers.importer(b"k"), Some(1), "another shard's slot");
        peers.settled(1, &set(&[slot]));
        assert_eq!(peers.importer(b"k"), None);
        assert_eq!(peers.importer(b"j"), Some(2));
        let moved = MovedAway {
            peers: Arc::new(peers),
            me: 2,
        };
        assert!(
            !engine::replay::MovedKeys::moved_away(&moved, b"j"),
            "its own"
        );
        moved.peers.imported(b"j", 1);
        assert!(engine::replay::MovedKeys::moved_away(&moved, b"j"));
    }

    #[test]
    fn served_slots_are_the_answering_nodes() {
        let text = "\
a 127.0.0.1:7000@17000 myself,master - 0 0 1 connected 0-100 [100->-b]
b 127.0.0.1:7001@17001 master - 0 0 2 connected 101-200 [50-<-a]
c 127.0.0.1:7002@17002 master - 0 0 3 connected
";
        let nodes = engine::cluster::parse_nodes(text);
        let (served, masters) = served_slots(&nodes);
        // The slot it exports is still its own.
        assert_eq!(served, SlotSet::of_ranges(&[(0, 100)]));
        assert_eq!(
            masters,
            vec![
                ("127.0.0.1".to_string(), 7000),
                ("127.0.0.1".to_string(), 7001)
            ]
        );
    }
}
