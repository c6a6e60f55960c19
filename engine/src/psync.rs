//! Whether a master will continue a stream: the test Redis's
//! `masterTryPartialResynchronization` makes (`replication.c`), on the
//! fields of its `INFO replication`. Used to know *before* asking that a
//! PSYNC will end in a full resync.

/// The fields of `INFO replication` the answer depends on.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Backlog {
    pub replid: String,
    pub replid2: String,
    /// Up to where `replid2` is valid (`second_repl_offset`, -1: none).
    pub second_offset: i64,
    pub active: bool,
    pub first_byte: u64,
    pub histlen: u64,
}

impl Backlog {
    /// Reads the fields from an `INFO replication` reply (`None` when one
    /// is missing: an old or unusual server, so nothing can be said).
    pub fn parse(info: &str) -> Option<Backlog> {
        let field = |name: &str| {
            info.lines()
                .find_map(|l| l.trim_end().strip_prefix(name)?.strip_prefix(':'))
                .map(str::to_string)
        };
        Some(Backlog {
            replid: field("master_replid")?,
            replid2: field("master_replid2")?,
            second_offset: field("second_repl_offset")?.parse().ok()?,
            active: field("repl_backlog_active")? == "1",
            first_byte: field("repl_backlog_first_byte_offset")?.parse().ok()?,
            histlen: field("repl_backlog_histlen")?.parse().ok()?,
        })
    }

    /// Whether `PSYNC <replid> <offset + 1>` (a replica that has applied
    /// everything up to `offset`) would be answered `+CONTINUE`.
    pub fn continues(&self, replid: &str, offset: u64) -> bool {
        let wanted = offset + 1;
        let same_history = replid == self.replid
            || (replid == self.replid2
                && self.second_offset >= 0
                && wanted <= self.second_offset as u64);
        same_history
            && self.active
            && wanted >= self.first_byte
            && wanted <= self.first_byte + self.histlen
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const INFO: &str = "# Replication\r\nrole:master\r\nconnected_slaves:0\r\n\
        master_failover_state:no-failover\r\n\
        master_replid:aaaa\r\nmaster_replid2:bbbb\r\n\
        master_repl_offset:5000\r\nsecond_repl_offset:1200\r\n\
        repl_backlog_active:1\r\nrepl_backlog_size:1048576\r\n\
        repl_backlog_first_byte_offset:1001\r\nrepl_backlog_histlen:4000\r\n";

    #[test]
    fn reads_the_fields_of_info_replication() {
        let b = Backlog::parse(INFO).unwrap();
        assert_eq!(
            b,
            Backlog {
                replid: "aaaa".into(),
                replid2: "bbbb".into(),
                second_offset: 1200,
                active: true,
                first_byte: 1001,
                histlen: 4000,
            }
        );
        assert_eq!(Backlog::parse("# Replication\r\nrole:master\r\n"), None);
    }

    #[test]
    fn continues_inside_the_backlog_of_the_same_history_only() {
        let b = Backlog::parse(INFO).unwrap();
        // Caught up, and anywhere the backlog still holds.
        assert!(b.continues("aaaa", 5000));
        assert!(b.continues("aaaa", 1000), "asks 1001, the first byte held");
        assert!(
            !b.continues("aaaa", 999),
            "asks 1000: fell out of the backlog"
        );
        assert!(!b.continues("aaaa", 5001), "ahead of the master");
        assert!(!b.continues("cccc", 3000), "another history");
        // The previous history (a promoted replica) up to where it ended.
        assert!(b.continues("bbbb", 1199));
        assert!(!b.continues("bbbb", 1200), "past second_repl_offset");
        let inactive = Backlog {
            active: false,
            ..b.clone()
        };
        assert!(!inactive.continues("aaaa", 3000), "no backlog at all");
        let no_second = Backlog {
            second_offset: -1,
            ..b
        };
        assert!(!no_second.continues("bbbb", 1100));
    }
}
