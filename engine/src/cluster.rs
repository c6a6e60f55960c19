//! Redis Cluster texts: `CLUSTER NODES` and redirection replies.

use crate::slot::SLOTS;

/// One line of `CLUSTER NODES`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterNode {
    pub id: String,
    /// Announced address (what clients must use).
    pub host: String,
    pub port: u16,
    pub master: bool,
    /// The node that answered (flag `myself`).
    pub myself: bool,
    /// For a replica: the id of its master.
    pub master_id: Option<String>,
    /// Flagged `fail`/`fail?`/`handshake`/`noaddr`: not usable now.
    pub unusable: bool,
    /// Slot ranges served (inclusive), without migrating/importing markers.
    pub slots: Vec<(u16, u16)>,
    /// Its configuration epoch: a master's grows when it takes slots (a
    /// finished migration, a failover).
    pub config_epoch: u64,
    /// It lists a slot it is migrating or importing (`[slot->-id]`,
    /// `[slot-<-id]`): keys of that slot are on two masters.
    pub open_slots: bool,
}

impl ClusterNode {
    /// A master that serves slots and is not failing, handshaking or
    /// without an address: a node to read from or write to.
    pub fn serving_master(&self) -> bool {
        self.master && !self.unusable && !self.slots.is_empty()
    }

    pub fn slot_count(&self) -> u32 {
        self.slots.iter().map(|(a, b)| (*b - *a) as u32 + 1).sum()
    }
}

/// Parses `CLUSTER NODES` output. Lines that do not parse are skipped.
pub fn parse_nodes(text: &str) -> Vec<ClusterNode> {
    text.lines().filter_map(parse_node_line).collect()
}

fn parse_node_line(line: &str) -> Option<ClusterNode> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    if fields.len() < 8 {
        return None;
    }
    // ip:port@cport[,hostname]; IPv6 addresses contain colons.
    let addr = fields[1].split(',').next()?.split('@').next()?;
    let (host, port) = addr.rsplit_once(':')?;
    let port: u16 = port.parse().ok()?;
    let flags: Vec<&str> = fields[2].split(',').collect();
    let master = flags.contains(&"master");
    let myself = flags.contains(&"myself");
    let unusable = flags
        .iter()
        .any(|f| matches!(*f, "fail" | "fail?" | "handshake" | "noaddr"))
        || host.is_empty()
        || port == 0;
    let master_id = (fields[3] != "-").then(|| fields[3].to_string());
    let mut slots = Vec::new();
    let mut open_slots = false;
    for range in &fields[8.min(fields.len())..] {
        if range.starts_with('[') {
            // [slot->-id] migrating / [slot-<-id] importing
            open_slots = true;
            continue;
        }
        let (a, b) = match range.split_once('-') {
            Some((a, b)) => (a.parse().ok()?, b.parse().ok()?),
            None => {
                let s = range.parse().ok()?;
                (s, s)
            }
        };
        if a <= b && b < SLOTS {
            slots.push((a, b));
        }
    }
    Some(ClusterNode {
        id: fields[0].to_string(),
        host: host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string(),
        port,
        master,
        myself,
        master_id,
        unusable,
        slots,
        config_epoch: fields[6].parse().unwrap_or(0),
        open_slots,
    })
}

/// A cluster redirection from an error reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Redirect {
    /// The slot lives elsewhere now: update the slot map.
    Moved { slot: u16, host: String, port: u16 },
    /// The slot is migrating: send this one command there, after ASKING.
    Ask { slot: u16, host: String, port: u16 },
}

impl Redirect {
    pub fn slot(&self) -> u16 {
        match self {
            Redirect::Moved { slot, .. } | Redirect::Ask { slot, .. } => *slot,
        }
    }

    pub fn addr(&self) -> (&str, u16) {
        match self {
            Redirect::Moved { host, port, .. } | Redirect::Ask { host, port, .. } => (host, *port),
        }
    }
}

/// Parses `MOVED 3999 127.0.0.1:6381` / `ASK 3999 127.0.0.1:6381` (the
/// error text without its `-`).
pub fn parse_redirect(error: &str) -> Option<Redirect> {
    let mut parts = error.split_whitespace();
    let kind = parts.next()?;
    let slot: u16 = parts.next()?.parse().ok().filter(|s| *s < SLOTS)?;
    let (host, port) = parts.next()?.rsplit_once(':')?;
    let port: u16 = port.parse().ok()?;
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    match kind {
        "MOVED" => Some(Redirect::Moved { slot, host, port }),
        "ASK" => Some(Redirect::Ask { slot, host, port }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_masters_replicas_and_markers() {
        let text = "\
7cd1 127.0.0.1:30002@40002 master - 0 1795292580376 2 connected 5461-10922\n\
0c0f 127.0.0.1:30003@40003,node-c master - 0 1795292579371 3 connected 10923-16383 [100->-7cd1]\n\
fd8c 127.0.0.1:30001@40001 myself,master - 0 0 1 connected 0-5460 7000\n\
aaaa 127.0.0.1:30004@40004 slave fd8c 0 0 1 connected\n\
bbbb :0@0 master,fail,noaddr - 0 0 4 disconnected\n";
        let nodes = parse_nodes(text);
        assert_eq!(nodes.len(), 5);
        assert_eq!(nodes[0].slots, vec![(5461, 10922)]);
        assert_eq!(nodes[1].slots, vec![(10923, 16383)]);
        assert_eq!(nodes[2].slots, vec![(0, 5460), (7000, 7000)]);
        assert_eq!(nodes[2].slot_count(), 5462);
        assert!(nodes[2].master && !nodes[2].unusable);
        assert_eq!(nodes[3].master_id.as_deref(), Some("fd8c"));
        assert!(!nodes[3].master);
        assert!(nodes[4].unusable);
        let epochs: Vec<u64> = nodes.iter().map(|n| n.config_epoch).collect();
        assert_eq!(epochs, [2, 3, 1, 1, 4]);
        let open: Vec<bool> = nodes.iter().map(|n| n.open_slots).collect();
        assert_eq!(open, [false, true, false, false, false]);
    }

    #[test]
    fn redirects() {
        assert_eq!(
            parse_redirect("MOVED 3999 127.0.0.1:6381"),
            Some(Redirect::Moved {
                slot: 3999,
                host: "127.0.0.1".into(),
                port: 6381
            })
        );
        assert_eq!(
            parse_redirect("ASK 1 [::1]:7000").map(|r| (r.slot(), r.addr().0.to_string())),
            Some((1, "::1".to_string()))
        );
        assert_eq!(parse_redirect("ERR nope"), None);
        assert_eq!(parse_redirect("MOVED 99999 h:1"), None);
    }
}
