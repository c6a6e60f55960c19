//! Sentinel-managed sources: which master the Sentinels name now.
//!
//! Each Sentinel is asked in turn (`SENTINEL GET-MASTER-ADDR-BY-NAME`);
//! the node it names must say it is a master (a Sentinel that has not
//! seen a failover yet may name the old one, which is then a replica or
//! gone). The first answer that checks out is the master.

use engine::resp::Frame;
use shard_worker::conn::Conn;
use shard_worker::Endpoint;

use crate::url::SentinelSpec;

/// Why no master could be found; names the Sentinels and the master's
/// name, never a password.
#[derive(Debug, thiserror::Error)]
pub enum SentinelError {
    #[error("no Sentinel of {sentinels} names a master '{name}': {why}")]
    NoMaster {
        sentinels: String,
        name: String,
        why: String,
    },
}

/// The master the Sentinels of `spec` name now, as an endpoint with the
/// master's credentials.
pub async fn master_of(spec: &SentinelSpec) -> Result<Endpoint, SentinelError> {
    let mut why = Vec::new();
    for sentinel in &spec.sentinels {
        match ask(spec, sentinel).await {
            Ok(master) => match check_master(&master).await {
                Ok(()) => return Ok(master),
                Err(e) => why.push(format!("{sentinel} names {master}, but {e}")),
            },
            Err(e) => why.push(e),
        }
    }
    Err(SentinelError::NoMaster {
        sentinels: spec.sentinel_list(),
        name: spec.name.clone(),
        why: why.join("; "),
    })
}

/// What one Sentinel answers. Without credentials of its own, a Sentinel
/// that asks for them gets the master's (one password for both is usual).
async fn ask(spec: &SentinelSpec, sentinel: &Endpoint) -> Result<Endpoint, String> {
    let mut conn = match Conn::open_authenticated(sentinel).await {
        Ok(c) => c,
        Err(shard_worker::WorkerError::Auth { .. })
            if !spec.sentinel_auth() && spec.master.password.is_some() =>
        {
            let mut with = sentinel.clone();
            with.user.clone_from(&spec.master.user);
            with.password.clone_from(&spec.master.password);
            Conn::open_authenticated(&with)
                .await
                .map_err(|e| e.to_string())?
        }
        Err(e) => return Err(e.to_string()),
    };
    let reply = conn
        .request(&[
            &b"SENTINEL"[..],
            b"GET-MASTER-ADDR-BY-NAME",
            spec.name.as_bytes(),
        ])
        .await
        .map_err(|e| e.to_string())?;
    let (host, port) = master_addr(&reply).ok_or_else(|| match &reply {
        Frame::Null => format!("{sentinel} monitors no master of that name"),
        other => format!(
            "{sentinel} answered {} (is it a Sentinel?)",
            other.to_text()
        ),
    })?;
    Ok(spec.master.with_addr(host, port))
}

/// `[host, port]` from `SENTINEL GET-MASTER-ADDR-BY-NAME`.
fn master_addr(reply: &Frame) -> Option<(String, u16)> {
    let Frame::Array(items) = reply else {
        return None;
    };
    let [Frame::Bulk(host), Frame::Bulk(port)] = items.as_slice() else {
        return None;
    };
    let host = std::str::from_utf8(host).ok()?.to_string();
    let port = std::str::from_utf8(port).ok()?.parse().ok()?;
    Some((host, port))
}

/// The node says it is a master.
async fn check_master(master: &Endpoint) -> Result<(), String> {
    let info = crate::server::replication(master)
        .await
        .map_err(|e| e.to_string())?;
    if info.role == "master" {
        Ok(())
    } else {
        Err("it is not a master (a failover under way?)".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    #[test]
    fn the_master_address_is_read_from_the_sentinels_reply() {
        let reply = Frame::Array(vec![
            Frame::Bulk(Bytes::from_static(b"10.0.0.5")),
            Frame::Bulk(Bytes::from_static(b"6380")),
        ]);
        assert_eq!(master_addr(&reply), Some(("10.0.0.5".into(), 6380)));
        assert_eq!(master_addr(&Frame::Null), None);
        let bad_port = Frame::Array(vec![
            Frame::Bulk(Bytes::from_static(b"h")),
            Frame::Bulk(Bytes::from_static(b"x")),
        ]);
        assert_eq!(master_addr(&bad_port), None);
        assert_eq!(master_addr(&Frame::Array(vec![])), None);
    }
}
