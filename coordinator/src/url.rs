//! Source and target URLs.
//!
//! ```text
//! redis://[user[:password]@]host:port     standalone, master-replica or cluster
//! rediss://...                            the same over TLS
//! twemproxy:///abs/path/nutcracker.yml[#pool]   source only
//! redis+sentinel://[user[:password]@]host:port[,host:port...]/<master-name>
//!     [?sentinel_user=U&sentinel_password=P]  source only: the master the
//!     Sentinels name (the credentials are the master's; the Sentinels'
//!     own are in the query, else the master's are tried if they ask);
//!     a `sync` source or target
//! ```
//!
//! `redis://:password@host:port` and `redis://password@host:port` both mean
//! "the default user with this password". Characters that URLs reserve
//! (`@`, `:`, `/`, `%`, ...) in a user or password are percent-encoded.

use std::path::PathBuf;

use shard_worker::{Endpoint, Secret};

/// Why a URL was refused. The URL itself is never repeated (it may hold a
/// password); the message says which part is wrong.
#[derive(Debug, thiserror::Error)]
pub enum UrlError {
    #[error("{role} URL is not a valid URL ({0})", role = .1)]
    Syntax(String, &'static str),
    #[error("{role} URL has scheme '{scheme}'; expected redis://, rediss:// or twemproxy://")]
    Scheme { role: &'static str, scheme: String },
    #[error("{role} URL has no host")]
    NoHost { role: &'static str },
    #[error("{role} URL has no port (write host:port, e.g. 127.0.0.1:6379)")]
    NoPort { role: &'static str },
    #[error("{role} URL has a path or query; shardsync takes databases from --db and --db-map")]
    Path { role: &'static str },
    #[error("twemproxy URLs are only valid as a source")]
    TwemproxyTarget,
    #[error("twemproxy URL needs an absolute path to nutcracker.yml: twemproxy:///path/nutcracker.yml[#pool] (twemproxy://[user:]password@localhost/path/... to give the backends' credentials)")]
    TwemproxyPath,
    #[error("{role} URL's user or password is not valid percent-encoded UTF-8")]
    Encoding { role: &'static str },
    #[error("{role} URL needs the master's name: redis+sentinel://host:port[,host:port...]/<master-name>")]
    SentinelName { role: &'static str },
    #[error("{role} URL has query parameter '{key}'; a Sentinel URL takes sentinel_user and sentinel_password")]
    SentinelQuery { role: &'static str, key: String },
    #[error("a Sentinel URL names no one server to compare; give the target's master as redis://host:port")]
    SentinelTarget,
}

/// A parsed source.
#[derive(Clone, Debug)]
pub enum SourceSpec {
    Redis(Endpoint),
    /// A Twemproxy pool: every backend listed in the config file.
    Twemproxy {
        config: PathBuf,
        pool: Option<String>,
        /// Credentials for the backends (`twemproxy://[user:]password@/...`);
        /// without them the pool's `redis_auth` is used.
        user: Option<String>,
        password: Option<Secret>,
    },
    /// A master the Sentinels name (and follow through failovers).
    Sentinel(SentinelSpec),
}

/// A Sentinel-managed master: the Sentinels to ask, the master's name, and
/// how to reach the master they name (credentials, TLS; host and port are
/// the Sentinels' answer).
#[derive(Clone, Debug)]
pub struct SentinelSpec {
    pub sentinels: Vec<Endpoint>,
    pub name: String,
    pub master: Endpoint,
}

impl SentinelSpec {
    /// Credentials were given for the Sentinels themselves.
    pub fn sentinel_auth(&self) -> bool {
        self.sentinels.iter().any(|s| s.password.is_some())
    }

    /// What names this master in a task id: its name and the Sentinels
    /// (sorted), not its address, which changes at a failover. (Two
    /// Sentinel groups may both call their master `mymaster`.)
    pub fn id(&self) -> String {
        let mut addrs: Vec<String> = self.sentinels.iter().map(Endpoint::addr).collect();
        addrs.sort();
        format!("sentinel:{}@{}", self.name, addrs.join(","))
    }

    /// The Sentinels' addresses, for messages.
    pub fn sentinel_list(&self) -> String {
        self.sentinels
            .iter()
            .map(Endpoint::addr)
            .collect::<Vec<_>>()
            .join(",")
    }
}

pub fn parse_source(text: &str) -> Result<SourceSpec, UrlError> {
    if let Some(spec) = parse_sentinel(text, "source")? {
        return Ok(SourceSpec::Sentinel(spec));
    }
    let url = url::Url::parse(text).map_err(|e| UrlError::Syntax(e.to_string(), "source"))?;
    if url.scheme() == "twemproxy" {
        // The file is local: no host, or `localhost` (which is how
        // credentials can be given: twemproxy://:pw@localhost/path).
        if url
            .host_str()
            .is_some_and(|h| !h.is_empty() && h != "localhost")
            || !url.path().starts_with('/')
            || url.path() == "/"
        {
            return Err(UrlError::TwemproxyPath);
        }
        let decode = |s: &str| percent_decode(s).ok_or(UrlError::Encoding { role: "source" });
        let user = decode(url.username())?;
        let password = url.password().map(decode).transpose()?;
        let (user, password) = match (user.is_empty(), password) {
            (false, None) => (None, Some(user)),
            (true, password) => (None, password),
            (false, Some(p)) => (Some(user), Some(p)),
        };
        return Ok(SourceSpec::Twemproxy {
            config: PathBuf::from(url.path()),
            pool: url.fragment().filter(|f| !f.is_empty()).map(str::to_string),
            user,
            password: password.map(Secret::new),
        });
    }
    endpoint_from(&url, "source").map(SourceSpec::Redis)
}

/// A `sync` target: a server or cluster node, or a Sentinel-managed master
/// (then the endpoint is the master as the URL describes it — credentials,
/// TLS — at the first Sentinel's address, until the Sentinels are asked).
pub fn parse_sync_target(text: &str) -> Result<(Endpoint, Option<SentinelSpec>), UrlError> {
    match parse_sentinel(text, "target")? {
        Some(spec) => Ok((spec.master.clone(), Some(spec))),
        None => parse_target(text).map(|ep| (ep, None)),
    }
}

pub fn parse_target(text: &str) -> Result<Endpoint, UrlError> {
    if parse_sentinel(text, "target")?.is_some() {
        return Err(UrlError::SentinelTarget);
    }
    let url = url::Url::parse(text).map_err(|e| UrlError::Syntax(e.to_string(), "target"))?;
    if url.scheme() == "twemproxy" {
        return Err(UrlError::TwemproxyTarget);
    }
    endpoint_from(&url, "target")
}

fn endpoint_from(url: &url::Url, role: &'static str) -> Result<Endpoint, UrlError> {
    let tls = match url.scheme() {
        "redis" => false,
        "rediss" => true,
        other => {
            return Err(UrlError::Scheme {
                role,
                scheme: other.to_string(),
            })
        }
    };
    let host = match url.host() {
        Some(url::Host::Domain(d)) if !d.is_empty() => d.to_string(),
        Some(url::Host::Ipv4(ip)) => ip.to_string(),
        Some(url::Host::Ipv6(ip)) => ip.to_string(),
        _ => return Err(UrlError::NoHost { role }),
    };
    let port = url.port().ok_or(UrlError::NoPort { role })?;
    if !(url.path().is_empty() || url.path() == "/") || url.query().is_some() {
        return Err(UrlError::Path { role });
    }
    let decode = |s: &str| percent_decode(s).ok_or(UrlError::Encoding { role });
    let user = decode(url.username())?;
    let password = url.password().map(decode).transpose()?;
    let (user, password) = match (user.is_empty(), password) {
        // redis://secret@host: a password for the default user.
        (false, None) => (None, Some(user)),
        (true, password) => (None, password),
        (false, Some(p)) => (Some(user), Some(p)),
    };
    Ok(Endpoint {
        host,
        port,
        user,
        password: password.map(Secret::new),
        tls,
    })
}

/// `redis+sentinel://` (or `rediss+sentinel://`) URLs; `None` for any
/// other scheme. The host list is not one host, so the authority is split
/// by hand and each `host:port` read as a `redis://` one.
fn parse_sentinel(text: &str, role: &'static str) -> Result<Option<SentinelSpec>, UrlError> {
    let (tls, rest) = if let Some(r) = text.strip_prefix("redis+sentinel://") {
        (false, r)
    } else if let Some(r) = text.strip_prefix("rediss+sentinel://") {
        (true, r)
    } else {
        return Ok(None);
    };
    let (authority, path) = rest
        .split_once('/')
        .ok_or(UrlError::SentinelName { role })?;
    let (path, query) = match path.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (path, None),
    };
    let name = percent_decode(path).ok_or(UrlError::Encoding { role })?;
    if name.is_empty() || name.contains('/') {
        return Err(UrlError::SentinelName { role });
    }
    let (userinfo, hosts) = match authority.rsplit_once('@') {
        Some((u, h)) => (Some(u), h),
        None => (None, authority),
    };
    let scheme = if tls { "rediss" } else { "redis" };
    let credentials = userinfo.map_or(String::new(), |u| format!("{u}@"));
    let mut sentinels = Vec::new();
    for host in hosts.split(',') {
        if host.is_empty() {
            return Err(UrlError::NoHost { role });
        }
        let url = url::Url::parse(&format!("{scheme}://{host}"))
            .map_err(|e| UrlError::Syntax(e.to_string(), role))?;
        sentinels.push(endpoint_from(&url, role)?);
    }
    // The master: the URL's credentials, the Sentinels' answer for the rest.
    let url = url::Url::parse(&format!(
        "{scheme}://{credentials}{}",
        hosts.split(',').next().unwrap_or_default()
    ))
    .map_err(|e| UrlError::Syntax(e.to_string(), role))?;
    let master = endpoint_from(&url, role)?;
    let (mut user, mut password) = (None, None);
    for (key, value) in url::form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        match key.as_ref() {
            "sentinel_user" => user = Some(value.into_owned()),
            "sentinel_password" => password = Some(Secret::new(value.into_owned())),
            other => {
                return Err(UrlError::SentinelQuery {
                    role,
                    key: other.to_string(),
                })
            }
        }
    }
    for s in &mut sentinels {
        s.user.clone_from(&user);
        s.password.clone_from(&password);
    }
    Ok(Some(SentinelSpec {
        sentinels,
        name,
        master,
    }))
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(s: &str) -> Endpoint {
        parse_target(s).unwrap()
    }

    #[test]
    fn credentials_forms() {
        let e = ep("redis://127.0.0.1:6379");
        assert_eq!(
            (e.host.as_str(), e.port, e.user.clone()),
            ("127.0.0.1", 6379, None)
        );
        assert!(e.password.is_none());

        let e = ep("redis://admin:s3cr%40t%3A@db.example:7000");
        assert_eq!(e.user.as_deref(), Some("admin"));
        assert_eq!(e.password.unwrap().expose(), "s3cr@t:");

        let e = ep("redis://:only-pass@h:1");
        assert_eq!(e.user, None);
        assert_eq!(e.password.unwrap().expose(), "only-pass");

        let e = ep("redis://bare@h:1");
        assert_eq!(e.user, None);
        assert_eq!(e.password.unwrap().expose(), "bare");

        let e = ep("rediss://[::1]:6380");
        assert!(e.tls);
        assert_eq!(e.to_string(), "[::1]:6380");
    }

    #[test]
    fn bad_urls_say_what_is_wrong_without_the_password() {
        for (url, want) in [
            ("http://h:1", "scheme"),
            ("redis://h", "no port"),
            ("redis://:pw@:1", "not a valid URL"),
            ("redis://h:1/0", "path"),
            ("nonsense", "not a valid URL"),
        ] {
            let msg = parse_target(url).unwrap_err().to_string();
            assert!(msg.contains(want), "{url}: {msg}");
            assert!(!msg.contains("pw"), "{msg}");
        }
        assert!(matches!(
            parse_target("twemproxy:///etc/n.yml"),
            Err(UrlError::TwemproxyTarget)
        ));
    }

    #[test]
    fn twemproxy_sources() {
        match parse_source("twemproxy:///etc/nutcracker.yml#alpha").unwrap() {
            SourceSpec::Twemproxy {
                config,
                pool,
                password,
                ..
            } => {
                assert_eq!(config, PathBuf::from("/etc/nutcracker.yml"));
                assert_eq!(pool.as_deref(), Some("alpha"));
                assert!(password.is_none());
            }
            other => panic!("{other:?}"),
        }
        match parse_source("twemproxy://:p%40ss@localhost/etc/n.yml").unwrap() {
            SourceSpec::Twemproxy { password, user, .. } => {
                assert_eq!(
                    password.map(|p| p.expose().to_string()).as_deref(),
                    Some("p@ss")
                );
                assert!(user.is_none());
            }
            other => panic!("{other:?}"),
        }
        assert!(parse_source("twemproxy://relative/n.yml").is_err());
    }

    #[test]
    fn sentinel_sources() {
        let SourceSpec::Sentinel(spec) = parse_source(
            "redis+sentinel://app:m%40ster@10.0.0.1:26379,[::1]:26380,s3:26381/my%20master?sentinel_password=s%26p",
        )
        .unwrap() else {
            panic!("a Sentinel source");
        };
        assert_eq!(spec.name, "my master");
        assert_eq!(spec.sentinel_list(), "10.0.0.1:26379,[::1]:26380,s3:26381");
        assert_eq!(spec.master.user.as_deref(), Some("app"));
        assert_eq!(spec.master.password.as_ref().unwrap().expose(), "m@ster");
        assert!(spec.sentinel_auth());
        for s in &spec.sentinels {
            assert_eq!(s.password.as_ref().unwrap().expose(), "s&p");
            assert_eq!(s.user, None);
        }
        assert!(!format!("{spec:?}").contains("m@ster"), "{spec:?}");
        assert!(!format!("{spec:?}").contains("s&p"), "{spec:?}");

        let SourceSpec::Sentinel(spec) = parse_source("rediss+sentinel://h:1/m").unwrap() else {
            panic!("a Sentinel source");
        };
        assert!(spec.master.tls && spec.sentinels[0].tls && !spec.sentinel_auth());
        assert!(spec.master.password.is_none() && spec.sentinels[0].password.is_none());

        for (url, want) in [
            ("redis+sentinel://h:1", "master's name"),
            ("redis+sentinel://h:1/", "master's name"),
            ("redis+sentinel://:pw@h/m", "no port"),
            ("redis+sentinel://h:1,/m", "no host"),
            (
                "redis+sentinel://:pw@h:1/m?db=2",
                "sentinel_user and sentinel_password",
            ),
        ] {
            let msg = parse_source(url).unwrap_err().to_string();
            assert!(msg.contains(want), "{url}: {msg}");
            assert!(!msg.contains("pw"), "{msg}");
        }
        assert!(matches!(
            parse_target("redis+sentinel://h:1/m"),
            Err(UrlError::SentinelTarget)
        ));
        let (ep, spec) = parse_sync_target("redis+sentinel://:pw@h:1,g:2/m").unwrap();
        assert_eq!(spec.unwrap().sentinel_list(), "h:1,g:2");
        assert_eq!(ep.password.unwrap().expose(), "pw");
        assert!(parse_sync_target("redis://h:1").unwrap().1.is_none());
    }
}
