//! The replay rules for the values of an RDB snapshot: which are copied,
//! where they go, and how they are carried (RESTORE as is, restamped, or
//! rebuilt with ordinary commands).

use super::{Dest, Replay};
use crate::restore::{self, Carry};

/// What becomes of one value of the snapshot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryPlan {
    /// Our own heartbeat: neither copied nor counted.
    Heartbeat,
    /// Counted as read, not copied (its database or key is filtered out).
    Skip,
    /// Copied to `to`, carried as `carry`.
    Copy { to: Dest, carry: Carry },
}

impl Replay {
    /// Where a value of key `key` in source database `db` goes, when it is
    /// copied.
    pub fn dest_of_key(&self, db: u32, key: &[u8]) -> Option<Dest> {
        if !self.cfg.key_filter.keeps(key) {
            return None;
        }
        let tdb = self.target_db(db)?;
        Some(if self.cluster {
            Dest::Slot(crate::slot::slot(key))
        } else {
            Dest::Db(tdb)
        })
    }

    /// The plan for a whole value of the snapshot: RDB type `rdb_type`,
    /// serialized at RDB version `rdb_version`.
    pub fn plan_entry(&self, db: u32, key: &[u8], rdb_type: u8, rdb_version: u16) -> EntryPlan {
        if self.cfg.is_heartbeat(key) {
            return EntryPlan::Heartbeat;
        }
        match self.dest_of_key(db, key) {
            None => EntryPlan::Skip,
            Some(to) => EntryPlan::Copy {
                to,
                carry: restore::carry(
                    rdb_type,
                    rdb_version,
                    self.cfg.target_caps,
                    self.cfg.force_rewrite,
                ),
            },
        }
    }

    /// Where a function library goes: to every node.
    pub fn dest_of_functions(&self) -> Dest {
        if self.cluster {
            Dest::Everywhere
        } else {
            Dest::Db(None)
        }
    }
}
