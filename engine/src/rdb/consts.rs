//! RDB opcodes and value types, as Redis's `rdb.h` defines them.

// Value types: the byte before a key.
pub const TYPE_STRING: u8 = 0;
pub const TYPE_LIST: u8 = 1;
pub const TYPE_SET: u8 = 2;
pub const TYPE_ZSET: u8 = 3;
pub const TYPE_HASH: u8 = 4;
pub const TYPE_ZSET_2: u8 = 5;
pub const TYPE_MODULE_PRE_GA: u8 = 6;
pub const TYPE_MODULE_2: u8 = 7;
pub const TYPE_HASH_ZIPMAP: u8 = 9;
pub const TYPE_LIST_ZIPLIST: u8 = 10;
pub const TYPE_SET_INTSET: u8 = 11;
pub const TYPE_ZSET_ZIPLIST: u8 = 12;
pub const TYPE_HASH_ZIPLIST: u8 = 13;
pub const TYPE_LIST_QUICKLIST: u8 = 14;
pub const TYPE_STREAM_LISTPACKS: u8 = 15;
pub const TYPE_HASH_LISTPACK: u8 = 16;
pub const TYPE_ZSET_LISTPACK: u8 = 17;
pub const TYPE_LIST_QUICKLIST_2: u8 = 18;
pub const TYPE_STREAM_LISTPACKS_2: u8 = 19;
pub const TYPE_SET_LISTPACK: u8 = 20;
pub const TYPE_STREAM_LISTPACKS_3: u8 = 21;
pub const TYPE_HASH_METADATA_PRE_GA: u8 = 22;
pub const TYPE_HASH_LISTPACK_EX_PRE_GA: u8 = 23;
pub const TYPE_HASH_METADATA: u8 = 24;
pub const TYPE_HASH_LISTPACK_EX: u8 = 25;

// Opcodes.
pub const OPCODE_SLOT_INFO: u8 = 244;
pub const OPCODE_FUNCTION2: u8 = 245;
pub const OPCODE_FUNCTION_PRE_GA: u8 = 246;
pub const OPCODE_MODULE_AUX: u8 = 247;
pub const OPCODE_IDLE: u8 = 248;
pub const OPCODE_FREQ: u8 = 249;
pub const OPCODE_AUX: u8 = 250;
pub const OPCODE_RESIZEDB: u8 = 251;
pub const OPCODE_EXPIRETIME_MS: u8 = 252;
pub const OPCODE_EXPIRETIME: u8 = 253;
pub const OPCODE_SELECTDB: u8 = 254;
pub const OPCODE_EOF: u8 = 255;

// Module value sub-opcodes.
pub const MODULE_OPCODE_EOF: u64 = 0;
pub const MODULE_OPCODE_SINT: u64 = 1;
pub const MODULE_OPCODE_UINT: u64 = 2;
pub const MODULE_OPCODE_FLOAT: u64 = 3;
pub const MODULE_OPCODE_DOUBLE: u64 = 4;
pub const MODULE_OPCODE_STRING: u64 = 5;

// Special string encodings (the low bits of a length byte tagged 0b11).
pub const ENC_INT8: u8 = 0;
pub const ENC_INT16: u8 = 1;
pub const ENC_INT32: u8 = 2;
pub const ENC_LZF: u8 = 3;

/// The newest RDB version this reader understands (Redis 7.4).
pub const MAX_VERSION: u16 = 12;

/// Whether `t` introduces a key (as opposed to an opcode).
pub fn is_value_type(t: u8) -> bool {
    t <= 7 || (9..=25).contains(&t)
}

/// The RDB version a Redis release writes (for DUMP payload compatibility:
/// a server refuses a payload newer than its own version).
pub fn rdb_version_of_redis(major: u32, minor: u32) -> u16 {
    match (major, minor) {
        (0..=2, _) => 6,
        (3, 0..=1) => 6,
        (3, _) => 7,
        (4, _) => 8,
        (5 | 6, _) => 9,
        (7, 0..=1) => 10,
        (7, 2..=3) => 11,
        _ => 12,
    }
}

/// The first RDB version with value type `t`: a server whose own RDB
/// version is older cannot load it (`None` for unknown types).
pub fn min_rdb_version_of_type(t: u8) -> Option<u16> {
    Some(match t {
        TYPE_STRING | TYPE_LIST | TYPE_SET | TYPE_ZSET | TYPE_HASH => 1,
        TYPE_HASH_ZIPMAP | TYPE_LIST_ZIPLIST | TYPE_SET_INTSET | TYPE_ZSET_ZIPLIST
        | TYPE_HASH_ZIPLIST => 2,
        TYPE_LIST_QUICKLIST => 7,
        TYPE_ZSET_2 | TYPE_MODULE_PRE_GA | TYPE_MODULE_2 => 8,
        TYPE_STREAM_LISTPACKS => 9,
        TYPE_HASH_LISTPACK
        | TYPE_ZSET_LISTPACK
        | TYPE_LIST_QUICKLIST_2
        | TYPE_STREAM_LISTPACKS_2 => 10,
        TYPE_SET_LISTPACK | TYPE_STREAM_LISTPACKS_3 => 11,
        TYPE_HASH_METADATA_PRE_GA
        | TYPE_HASH_LISTPACK_EX_PRE_GA
        | TYPE_HASH_METADATA
        | TYPE_HASH_LISTPACK_EX => 12,
        _ => return None,
    })
}
