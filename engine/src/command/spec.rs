//! The shape of one command-table row.
//!
//! Key positions follow Redis 7 key specs (`COMMAND INFO`): a key spec says
//! where the search for keys begins (a fixed index, or just after a keyword)
//! and how keys are found from there (a range with a step, or a count read
//! from an argument). Reading them the way the server does is what lets one
//! table describe `MSET k v k v`, `ZUNIONSTORE dst 2 a b WEIGHTS ...` and
//! `SORT k ... STORE dst` without a special case per command.

bitflags::bitflags! {
    /// A set of command flags, as `COMMAND INFO` reports them (the ones we use).
    #[derive(Clone, Copy, PartialEq, Eq, Debug)]
    pub struct CmdFlags: u16 {
        const WRITE = 1 << 0;
        const READONLY = 1 << 1;
        const DENYOOM = 1 << 2;
        const ADMIN = 1 << 3;
        const PUBSUB = 1 << 4;
        const NOSCRIPT = 1 << 5;
        const BLOCKING = 1 << 6;
        const MOVABLE_KEYS = 1 << 7;
        const FAST = 1 << 8;
    }
}

impl CmdFlags {
    /// No flag (the generated table's spelling of `empty()`).
    pub const NONE: CmdFlags = CmdFlags::empty();
}

bitflags::bitflags! {
    /// Flags of one key spec: how the command treats the keys it finds.
    #[derive(Clone, Copy, PartialEq, Eq, Debug)]
    pub struct KeyFlags: u16 {
        /// Read only.
        const RO = 1 << 0;
        /// Read and write.
        const RW = 1 << 1;
        /// Overwritten without being read (a destination).
        const OW = 1 << 2;
        /// Deleted.
        const RM = 1 << 3;
        const INSERT = 1 << 4;
        const DELETE = 1 << 5;
        const UPDATE = 1 << 6;
        const ACCESS = 1 << 7;
        /// The argument is not a key name (e.g. a pattern), though it routes like one.
        const NOT_KEY = 1 << 8;
        /// The spec may not find every key; the server falls back to custom code.
        const INCOMPLETE = 1 << 9;
        const VARIABLE_FLAGS = 1 << 10;
    }
}

impl KeyFlags {
    /// No flag (the generated table's spelling of `empty()`).
    pub const NONE: KeyFlags = KeyFlags::empty();
}

/// Where the search for a key spec's keys begins.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Begin {
    /// At this argument index (0 is the command name).
    Index(i32),
    /// Just after `keyword`, searched from `start_from` (negative: from the
    /// end, backwards).
    Keyword {
        keyword: &'static str,
        start_from: i32,
    },
    /// The server uses custom code (SORT's STORE); see `keys::custom_keys`.
    Unknown,
}

/// How keys are found once the search has begun.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Find {
    /// `last` is relative to the first key when >= 0, or counts from the end
    /// of the arguments when negative; `limit` > 0 means "the first 1/limit
    /// of what remains" (XREADGROUP's STREAMS k1 k2 id1 id2).
    Range {
        last: i32,
        step: i32,
        limit: i32,
    },
    /// The number of keys is the argument at `keynum_idx` (relative to the
    /// begin position); keys start at `first_key` (also relative).
    Keynum {
        keynum_idx: i32,
        first_key: i32,
        step: i32,
    },
    Unknown,
}

/// One key spec.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct KeySpec {
    pub begin: Begin,
    pub find: Find,
    pub flags: KeyFlags,
}

/// The command family, as `COMMAND DOCS` groups them.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Group {
    String,
    Bitmap,
    List,
    Hash,
    Set,
    SortedSet,
    Geo,
    HyperLogLog,
    Stream,
    Generic,
    Transactions,
    Scripting,
    Pubsub,
    Connection,
    Server,
    Cluster,
}

/// What a command means when it arrives in a replication stream.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Role {
    /// An ordinary write: replay it on the target.
    Data,
    /// The master's keep-alive: counted in the offset, never replayed.
    Ping,
    /// Replication control (`REPLCONF GETACK`): answered, never replayed.
    Replconf,
    /// Changes the database of what follows.
    Select,
    /// Opens a transaction; what follows until `Exec` is applied atomically.
    Multi,
    Exec,
    Discard,
    /// Pub/sub traffic, replayed only when asked for.
    Publish,
    /// Empties every database of the source.
    FlushAll,
    /// Empties the selected database of the source.
    FlushDb,
    /// Swaps two databases.
    SwapDb,
    /// Moves a key to another database.
    Move,
    /// Changes server-side functions or scripts (FUNCTION LOAD/DELETE/...).
    Function,
    /// Runs a script. Redis 7 replicates effects, not scripts, so these only
    /// arrive from old sources.
    Script,
}

/// How a multi-key command divides across cluster slots.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Split {
    /// Must run whole, where all its keys are (or be rewritten).
    Whole,
    /// Every key is independent: `DEL a b` equals `DEL a` then `DEL b`.
    PerKey,
    /// Key/value pairs are independent: `MSET a 1 b 2`.
    PerKeyValue,
}

/// One row of the command table.
#[derive(Debug)]
pub struct CommandSpec {
    /// Lower-case name (a subcommand's own name, without its container).
    pub name: &'static str,
    /// Redis arity: exact argument count when positive, minimum when negative.
    pub arity: i32,
    pub flags: CmdFlags,
    pub group: Group,
    pub role: Role,
    /// Applying it twice leaves the same data as applying it once.
    pub idempotent: bool,
    pub split: Split,
    pub keys: &'static [KeySpec],
    pub subcommands: &'static [CommandSpec],
}

impl CommandSpec {
    pub fn is_write(&self) -> bool {
        self.flags.contains(CmdFlags::WRITE)
    }
}
