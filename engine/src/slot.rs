//! Redis Cluster key slots.

/// Number of hash slots in a Redis Cluster.
pub const SLOTS: u16 = 16384;

/// The part of a key that is hashed: the content of the first `{...}` when
/// it is non-empty, else the whole key (as Redis's `keyHashSlot`).
pub fn hash_tag(key: &[u8]) -> &[u8] {
    if let Some(open) = key.iter().position(|&b| b == b'{') {
        if let Some(len) = key[open + 1..].iter().position(|&b| b == b'}') {
            if len > 0 {
                return &key[open + 1..open + 1 + len];
            }
        }
    }
    key
}

/// The cluster slot of `key`: CRC16 (XMODEM) of its hash tag, mod 16384.
pub fn slot(key: &[u8]) -> u16 {
    crc16::State::<crc16::XMODEM>::calculate(hash_tag(key)) % SLOTS
}

/// A set of cluster slots (a bitmap: 2 KiB, no allocation per slot).
#[derive(Clone, PartialEq, Eq)]
pub struct SlotSet(Box<[u64; SLOTS as usize / 64]>);

impl SlotSet {
    pub fn empty() -> SlotSet {
        SlotSet(Box::new([0; SLOTS as usize / 64]))
    }

    /// The slots of these inclusive ranges.
    pub fn of_ranges(ranges: &[(u16, u16)]) -> SlotSet {
        let mut set = SlotSet::empty();
        for &(a, b) in ranges {
            for slot in a..=b.min(SLOTS - 1) {
                set.insert(slot);
            }
        }
        set
    }

    #[inline]
    pub fn contains(&self, slot: u16) -> bool {
        let slot = slot % SLOTS;
        self.0[slot as usize / 64] & (1 << (slot % 64)) != 0
    }

    pub fn insert(&mut self, slot: u16) {
        let slot = slot % SLOTS;
        self.0[slot as usize / 64] |= 1 << (slot % 64);
    }

    pub fn remove(&mut self, slot: u16) {
        let slot = slot % SLOTS;
        self.0[slot as usize / 64] &= !(1 << (slot % 64));
    }

    pub fn len(&self) -> usize {
        self.0.iter().map(|w| w.count_ones() as usize).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.0.iter().all(|&w| w == 0)
    }

    /// The slots in the set, in order (a word at a time).
    pub fn iter(&self) -> impl Iterator<Item = u16> + '_ {
        self.0.iter().enumerate().flat_map(|(i, &word)| {
            let mut w = word;
            std::iter::from_fn(move || {
                if w == 0 {
                    return None;
                }
                let bit = w.trailing_zeros();
                w &= w - 1;
                Some((i * 64) as u16 + bit as u16)
            })
        })
    }
}

impl std::fmt::Debug for SlotSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SlotSet({} slots)", self.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slot_sets_hold_ranges_and_single_slots() {
        let mut set = SlotSet::of_ranges(&[(0, 2), (16383, 16383)]);
        assert_eq!(set.len(), 4);
        assert!(set.contains(0) && set.contains(2) && set.contains(16383));
        assert!(!set.contains(3));
        set.remove(1);
        set.insert(100);
        assert_eq!(set.iter().collect::<Vec<_>>(), vec![0, 2, 100, 16383]);
        assert!(!set.is_empty() && SlotSet::empty().is_empty());
    }

    #[test]
    fn hash_tags_follow_redis_rules() {
        assert_eq!(hash_tag(b"{user1}:a"), b"user1");
        assert_eq!(hash_tag(b"foo{}{bar}"), b"foo{}{bar}");
        assert_eq!(hash_tag(b"foo{{bar}}zap"), b"{bar");
        assert_eq!(hash_tag(b"foo{bar}{zap}"), b"bar");
        assert_eq!(hash_tag(b"{a}{b}"), b"a");
        assert_eq!(hash_tag(b"no-tag"), b"no-tag");
        assert_eq!(hash_tag(b"open{only"), b"open{only");
    }

    #[test]
    fn slots_match_the_server() {
        // Values from `CLUSTER KEYSLOT` on Redis 7.0.
        assert_eq!(slot(b"foo"), 12182);
        assert_eq!(slot(b"bar"), 5061);
        assert_eq!(slot(b"{user1}:a"), slot(b"user1"));
        assert_eq!(slot(b""), 0);
    }
}
