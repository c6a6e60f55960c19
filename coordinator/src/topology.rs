//! Where a task's servers are: behind a `redis://` URL a standalone server
//! or every master of its cluster (with the slots each serves), behind a
//! `twemproxy://` URL every backend of the pool. `sync`'s precheck and
//! `verify` resolve both sides here, the same way.

use shard_worker::{Endpoint, WorkerError};

use crate::server::{cluster_nodes, probe, ServerInfo};
use crate::twemproxy::{self, Pool, TwemproxyError};
use crate::url::SourceSpec;

/// A master and the slot ranges it serves (none outside a cluster).
#[derive(Clone, Debug)]
pub struct Master {
    pub endpoint: Endpoint,
    pub slots: Vec<(u16, u16)>,
    /// Its configuration epoch (grows when it takes slots).
    pub epoch: u64,
}

/// What a `redis://` URL leads to.
#[derive(Clone, Debug)]
pub enum Resolved {
    /// A standalone server (a master or a replica), as probed.
    Server(ServerInfo),
    /// A cluster: the node the URL names (as probed) and every master
    /// serving slots.
    Cluster {
        seed: ServerInfo,
        masters: Vec<Master>,
    },
}

/// How many slots `masters` serve between them.
pub fn covered_slots(masters: &[Master]) -> u32 {
    masters
        .iter()
        .flat_map(|m| &m.slots)
        .map(|&(a, b)| (b - a) as u32 + 1)
        .sum()
}

/// Probes `ep` and, when it is a cluster node, finds the cluster's masters
/// (`CLUSTER NODES`, masters serving slots and not failed).
pub async fn resolve(ep: &Endpoint) -> Result<Resolved, WorkerError> {
    let seed = probe(ep).await?;
    if !seed.cluster {
        return Ok(Resolved::Server(seed));
    }
    let masters = cluster_nodes(ep)
        .await?
        .into_iter()
        .filter(|n| n.serving_master())
        .map(|n| Master {
            endpoint: ep.with_addr(n.host.clone(), n.port),
            slots: n.slots,
            epoch: n.config_epoch,
        })
        .collect();
    Ok(Resolved::Cluster { seed, masters })
}

/// The backends of a Twemproxy pool source.
pub fn pool(spec: &SourceSpec) -> Option<Result<Pool, TwemproxyError>> {
    let SourceSpec::Twemproxy {
        config,
        pool,
        user,
        password,
    } = spec
    else {
        return None;
    };
    Some(twemproxy::load(
        config,
        pool.as_deref(),
        user.as_deref(),
        password.as_ref().map(|p| p.expose()),
    ))
}

/// The source masters (or backends) a task reads from.
pub async fn source_masters(spec: &SourceSpec) -> Result<Vec<Endpoint>, String> {
    if let Some(pool) = pool(spec) {
        return Ok(pool.map_err(|e| e.to_string())?.backends);
    }
    let ep = match spec {
        SourceSpec::Redis(ep) => ep.clone(),
        SourceSpec::Sentinel(s) => crate::sentinel::master_of(s)
            .await
            .map_err(|e| e.to_string())?,
        SourceSpec::Twemproxy { .. } => return Ok(Vec::new()),
    };
    let ep = &ep;
    Ok(match resolve(ep).await.map_err(|e| e.to_string())? {
        Resolved::Server(_) => vec![ep.clone()],
        Resolved::Cluster { masters, .. } => masters.into_iter().map(|m| m.endpoint).collect(),
    })
}
