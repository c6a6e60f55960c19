//! Source and target URLs.
//!
//! ```text
//! redis://[user[:password]@]host:port     standalone, master-replica or cluster
//! rediss://...                            the same over TLS
//! twemproxy:///abs/path/nutcracker.yml[#pool]   source only
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
}

pub fn parse_source(text: &str) -> Result<SourceSpec, UrlError> {
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

pub fn parse_target(text: &str) -> Result<Endpoint, UrlError> {
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
}
