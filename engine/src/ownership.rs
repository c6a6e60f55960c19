//! Which source master served which slots, as the task last saw it: one
//! key per task on the target, next to the markers, so that a restart
//! knows whether a cluster source's slots changed hands in a way the
//! target's markers cannot order.
//!
//! A shard resumes from its own marker. When a slot moved from master A to
//! master B, what A's stream did to a key must be applied before what B's
//! does; the live hand-overs see the move happen, a restart does not. So
//! the task records the masters' slots and configuration epochs (a master's
//! epoch grows whenever it takes slots), and which masters were in the
//! middle of a change the target had not caught up with (`moving`). A
//! restart that finds a master moving then, or whose slots or epoch differ
//! now, copies that master again (a full sync) instead of resuming it.

use crate::slot::SLOTS;

/// What every record key's name contains.
pub const NAME: &str = "shardsync:ownership:";

/// The record of task `task`; on a cluster target it carries a hash tag
/// (slot 0's).
pub fn key(task: &str, cluster_target: bool) -> Vec<u8> {
    if cluster_target {
        format!("{{{}}}{NAME}{task}", crate::split::slot_tag(0)).into_bytes()
    } else {
        format!("{NAME}{task}").into_bytes()
    }
}

/// One source master: its address, configuration epoch and slot ranges
/// (inclusive, in order).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Owner {
    pub addr: String,
    pub epoch: u64,
    pub slots: Vec<(u16, u16)>,
}

/// The source's masters (by address) and those moving.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Ownership {
    pub masters: Vec<Owner>,
    pub moving: Vec<String>,
}

/// Why a master is copied again at a restart.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Again {
    /// Its slots were changing hands and the target had not caught up.
    Moving,
    /// It serves other slots now, or took slots since (its epoch grew).
    Changed,
    /// It was not a master of the source then.
    New,
}

impl Again {
    pub fn describe(self) -> &'static str {
        match self {
            Again::Moving => "its slots were changing hands when the task stopped",
            Again::Changed => "its slots changed hands while the task was stopped",
            Again::New => "it was not one of the source's masters when the task stopped",
        }
    }
}

const VERSION: &str = "1";

impl Ownership {
    /// Masters sorted by address, `moving` sorted: equal views encode the
    /// same.
    pub fn new(mut masters: Vec<Owner>, mut moving: Vec<String>) -> Ownership {
        masters.sort_by(|a, b| a.addr.cmp(&b.addr));
        moving.sort();
        moving.dedup();
        Ownership { masters, moving }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = format!("{VERSION}\n");
        for m in &self.masters {
            let ranges: Vec<String> = m.slots.iter().map(|(a, b)| format!("{a}-{b}")).collect();
            let ranges = if ranges.is_empty() {
                "-".to_string()
            } else {
                ranges.join(",")
            };
            out.push_str(&format!("master {} {} {ranges}\n", m.addr, m.epoch));
        }
        for addr in &self.moving {
            out.push_str(&format!("moving {addr}\n"));
        }
        out.into_bytes()
    }

    /// Reads a record; `None` when it is not one this build writes.
    pub fn parse(value: &[u8]) -> Option<Ownership> {
        let text = std::str::from_utf8(value).ok()?;
        let mut lines = text.lines();
        if lines.next()? != VERSION {
            return None;
        }
        let mut masters = Vec::new();
        let mut moving = Vec::new();
        for line in lines {
            let words: Vec<&str> = line.split(' ').collect();
            match words.as_slice() {
                ["master", addr, epoch, ranges] => {
                    let mut slots = Vec::new();
                    if *ranges != "-" {
                        for r in ranges.split(',') {
                            let (a, b) = r.split_once('-')?;
                            let (a, b): (u16, u16) = (a.parse().ok()?, b.parse().ok()?);
                            if a > b || b >= SLOTS {
                                return None;
                            }
                            slots.push((a, b));
                        }
                    }
                    masters.push(Owner {
                        addr: addr.to_string(),
                        epoch: epoch.parse().ok()?,
                        slots,
                    });
                }
                ["moving", addr] => moving.push(addr.to_string()),
                _ => return None,
            }
        }
        Some(Ownership::new(masters, moving))
    }

    /// The masters of `now` a restart copies again rather than resumes,
    /// with why. A master at a new address serving exactly the slots of one
    /// that is gone is that master's promoted replica (a failover): its
    /// history continues, and it is judged as that master.
    pub fn to_copy_again(&self, now: &[Owner]) -> Vec<(String, Again)> {
        if self.masters.is_empty() {
            return Vec::new();
        }
        let mut out = Vec::new();
        for m in now {
            let then = self.masters.iter().find(|o| o.addr == m.addr).or_else(|| {
                self.masters
                    .iter()
                    .find(|o| o.slots == m.slots && !now.iter().any(|n| n.addr == o.addr))
            });
            let again = match then {
                None => Some(Again::New),
                Some(o) if self.moving.contains(&o.addr) => Some(Again::Moving),
                Some(o) if o.slots != m.slots => Some(Again::Changed),
                // Same slots at the same address, yet it took slots since:
                // they went away and came back.
                Some(o) if o.addr == m.addr && m.epoch > o.epoch => Some(Again::Changed),
                Some(_) => None,
            };
            if let Some(again) = again {
                out.push((m.addr.clone(), again));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owner(addr: &str, epoch: u64, slots: &[(u16, u16)]) -> Owner {
        Owner {
            addr: addr.into(),
            epoch,
            slots: slots.to_vec(),
        }
    }

    fn three() -> Vec<Owner> {
        vec![
            owner("a:1", 1, &[(0, 5460)]),
            owner("b:1", 2, &[(5461, 10922)]),
            owner("c:1", 3, &[(10923, 16383)]),
        ]
    }

    #[test]
    fn records_round_trip_and_foreign_ones_are_refused() {
        let rec = Ownership::new(
            vec![owner("b:1", 2, &[(1, 2), (9, 9)]), owner("a:1", 1, &[])],
            vec!["b:1".into(), "a:1".into(), "b:1".into()],
        );
        assert_eq!(rec.masters[0].addr, "a:1", "sorted");
        assert_eq!(rec.moving, ["a:1", "b:1"]);
        let text = rec.encode();
        assert_eq!(
            String::from_utf8_lossy(&text),
            "1\nmaster a:1 1 -\nmaster b:1 2 1-2,9-9\nmoving a:1\nmoving b:1\n"
        );
        assert_eq!(Ownership::parse(&text), Some(rec));
        for bad in [
            &b"2\nmaster a:1 1 -\n"[..],
            b"1\nmaster a:1 x -\n",
            b"1\nmaster a:1 1 5-2\n",
            b"1\nmaster a:1 1 0-16384\n",
            b"1\nslaves a:1\n",
            b"",
        ] {
            assert_eq!(
                Ownership::parse(bad),
                None,
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        assert_eq!(
            key("t", true),
            format!("{{{}}}shardsync:ownership:t", crate::split::slot_tag(0)).into_bytes()
        );
        assert_eq!(crate::slot::slot(&key("t", true)), 0);
        assert!(crate::marker::is_internal(&key("t", false)));
    }

    #[test]
    fn an_unchanged_source_resumes_every_master() {
        let rec = Ownership::new(three(), vec![]);
        assert!(rec.to_copy_again(&three()).is_empty());
        assert!(
            Ownership::default().to_copy_again(&three()).is_empty(),
            "no record"
        );
    }

    #[test]
    fn masters_whose_slots_moved_or_were_moving_are_copied_again() {
        // 1000 slots went from a to b while the task was down.
        let mut now = three();
        now[0].slots = vec![(1000, 5460)];
        now[1].slots = vec![(0, 999), (5461, 10922)];
        now[1].epoch = 4;
        let rec = Ownership::new(three(), vec![]);
        assert_eq!(
            rec.to_copy_again(&now),
            [
                ("a:1".into(), Again::Changed),
                ("b:1".into(), Again::Changed)
            ]
        );
        // Moving when it stopped: copied again even if nothing moved since.
        let rec = Ownership::new(three(), vec!["c:1".into()]);
        assert_eq!(rec.to_copy_again(&three()), [("c:1".into(), Again::Moving)]);
        // There and back while down: the same slots, but b took slots.
        let mut now = three();
        now[1].epoch = 9;
        let rec = Ownership::new(three(), vec![]);
        assert_eq!(rec.to_copy_again(&now), [("b:1".into(), Again::Changed)]);
        // A master added since.
        let mut now = three();
        now[2].slots = vec![(10923, 12000)];
        now.push(owner("d:1", 5, &[(12001, 16383)]));
        assert_eq!(
            rec.to_copy_again(&now),
            [("c:1".into(), Again::Changed), ("d:1".into(), Again::New)]
        );
    }

    #[test]
    fn a_promoted_replica_is_judged_as_the_master_it_replaced() {
        let rec = Ownership::new(three(), vec![]);
        let mut now = three();
        now[0] = owner("a:2", 7, &[(0, 5460)]);
        assert!(rec.to_copy_again(&now).is_empty(), "a failover");
        let rec = Ownership::new(three(), vec!["a:1".into()]);
        assert_eq!(rec.to_copy_again(&now), [("a:2".into(), Again::Moving)]);
    }
}
