//! Where a Redis server is and how to log in, with the password kept out of
//! every `Display` and `Debug`.

use std::fmt;

/// A secret that never prints.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Secret {
        Secret(s.into())
    }

    /// The secret itself, for the one place that sends it (AUTH).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// One Redis server. Displays as `host:port`, never with credentials.
#[derive(Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub host: String,
    pub port: u16,
    /// ACL user; `None` means the default user.
    pub user: Option<String>,
    pub password: Option<Secret>,
    pub tls: bool,
}

impl Endpoint {
    pub fn new(host: impl Into<String>, port: u16) -> Endpoint {
        Endpoint {
            host: host.into(),
            port,
            user: None,
            password: None,
            tls: false,
        }
    }

    /// Same credentials and TLS setting, another address (a node found by
    /// discovery).
    pub fn with_addr(&self, host: impl Into<String>, port: u16) -> Endpoint {
        Endpoint {
            host: host.into(),
            port,
            ..self.clone()
        }
    }

    /// `host:port`, for logs, status and metric labels.
    pub fn addr(&self) -> String {
        self.to_string()
    }
}

/// `host:port`, with IPv6 hosts in brackets: how every address is shown
/// and compared.
pub fn addr_of(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&addr_of(&self.host, self.port))
    }
}

impl fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Endpoint")
            .field("addr", &self.to_string())
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field("tls", &self.tls)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_print() {
        let mut ep = Endpoint::new("127.0.0.1", 6379);
        ep.user = Some("admin".into());
        ep.password = Some(Secret::new("hunter2"));
        let shown = format!("{ep} {ep:?} {:?}", ep.password);
        assert!(!shown.contains("hunter2"), "{shown}");
        assert_eq!(ep.to_string(), "127.0.0.1:6379");
        assert_eq!(Endpoint::new("::1", 7000).to_string(), "[::1]:7000");
    }
}
