//! A target master that died: once its cluster has promoted a replica, the
//! task follows it. While a writer cannot reach its node, it asks the
//! cluster's other nodes (`CLUSTER NODES`) who serves its slots now; when a
//! healthy master at another address does (and no other writer serves that
//! address), the writer fails with `WorkerError::TargetFailedOver` and the
//! task starts again the way a restart does: the new topology, every node's
//! markers (the replica holds them exactly as far as it holds the data,
//! writes the old master acknowledged but never passed on included), a
//! partial resync from the node furthest behind.

use engine::cluster::{parse_nodes, ClusterNode};
use engine::resp::Frame;

use crate::conn::Conn;
use crate::endpoint::{addr_of, Endpoint};
use crate::route::ClusterRouting;

/// Who serves `slot` now, by one node's `CLUSTER NODES`: the address of a
/// healthy master other than `me` (`host:port`), or `None` when `me` still
/// does or nobody healthy does (the failover is not over).
pub fn successor(nodes: &[ClusterNode], me: &str, slot: u16) -> Option<(String, u16)> {
    let owner = nodes
        .iter()
        .filter(|n| n.serving_master())
        .find(|n| n.slots.iter().any(|&(a, b)| (a..=b).contains(&slot)))?;
    (addr_of(&owner.host, owner.port) != me).then(|| (owner.host.clone(), owner.port))
}

/// Asks the other nodes writer `w` knows who serves its home slot now;
/// the first that answers decides. `None`: stay (or nobody could tell).
pub async fn find_successor(routing: &ClusterRouting, w: usize, me: &Endpoint) -> Option<Endpoint> {
    let slot = routing.home_slot(w)?;
    let me_addr = me.addr();
    for other in routing.writers() {
        if other.index == w || other.endpoint.addr() == me_addr {
            continue;
        }
        let Ok(mut conn) = Conn::open_authenticated(&other.endpoint).await else {
            continue;
        };
        let Ok(Frame::Bulk(text)) = conn.request(&["CLUSTER", "NODES"]).await else {
            continue;
        };
        let nodes = parse_nodes(&String::from_utf8_lossy(&text));
        return successor(&nodes, &me_addr, slot).map(|(host, port)| me.with_addr(host, port));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const NODES: &str = "\
a1 127.0.0.1:7001@17001 master,fail - 0 0 1 disconnected
b2 127.0.0.1:7002@17002 myself,master - 0 0 2 connected 5461-10922
c3 127.0.0.1:7003@17003 master - 0 0 3 connected 10923-16383
d4 127.0.0.1:7004@17004 master - 0 0 4 connected 0-5460
e5 127.0.0.1:7005@17005 slave b2 0 0 2 connected
";

    #[test]
    fn a_promoted_replica_takes_over_the_dead_masters_slots() {
        let nodes = parse_nodes(NODES);
        assert_eq!(
            successor(&nodes, "127.0.0.1:7001", 0),
            Some(("127.0.0.1".to_string(), 7004))
        );
        assert_eq!(
            successor(&nodes, "127.0.0.1:7002", 6000),
            None,
            "still mine"
        );
    }

    #[test]
    fn before_the_failover_is_over_the_writer_stays() {
        // The master is flagged as failing but still owns its slots.
        let nodes = parse_nodes(
            "a1 127.0.0.1:7001@17001 master,fail - 0 0 1 connected 0-5460\n\
             b2 127.0.0.1:7002@17002 myself,master - 0 0 2 connected 5461-16383\n",
        );
        assert_eq!(successor(&nodes, "127.0.0.1:7001", 0), None);
    }
}
