//! Who is on the other end: the socket's address, or, behind a trusted
//! proxy, the client the proxy names.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::prelude::rust_2021::*;
use std::sync::Arc;

use warp::http::HeaderMap;

use crate::addr::Prefix;

/// Which header a trusted proxy names the client in.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ProxyHeader {
    /// `X-Forwarded-For: client, proxy1, proxy2` (nginx, HAProxy, most
    /// load balancers).
    #[default]
    XForwardedFor,
    /// RFC 7239 `Forwarded: for=client, for="[2001:db8::1]:4711"`.
    Forwarded,
}

impl ProxyHeader {
    fn name(self) -> &'static str {
        match self {
            Self::XForwardedFor => "x-forwarded-for",
            Self::Forwarded => "forwarded",
        }
    }
}

/// The client of one connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peer {
    ip: IpAddr,
    proxy: Option<IpAddr>,
    identity: Option<Arc<str>>,
}

impl Peer {
    /// A client seen directly (no proxy).
    pub fn new(ip: IpAddr) -> Self {
        Self {
            ip: ip.to_canonical(),
            proxy: None,
            identity: None,
        }
    }

    /// The client's address: the socket's, or the one a trusted proxy named.
    pub fn ip(&self) -> IpAddr {
        self.ip
    }

    /// The trusted proxy the connection came through, if any.
    pub fn proxy(&self) -> Option<IpAddr> {
        self.proxy
    }

    /// The app-supplied identity (a user id), if any.
    pub fn identity(&self) -> Option<&str> {
        self.identity.as_deref()
    }

    /// Keys connection and message limits by `identity` as well as by
    /// address, so one misbehaving user behind a shared address is closed
    /// without the address being reported.
    pub fn with_identity(mut self, identity: impl Into<Arc<str>>) -> Self {
        self.identity = Some(identity.into());
        self
    }
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.ip)?;
        if let Some(id) = &self.identity {
            write!(f, " ({id:?})")?;
        }
        if let Some(proxy) = self.proxy {
            write!(f, " via {proxy}")?;
        }
        Ok(())
    }
}

/// The proxies whose headers are believed.
#[derive(Clone, Debug, Default)]
pub(crate) struct ProxyConfig {
    pub trusted: Vec<Prefix>,
    pub header: ProxyHeader,
}

impl ProxyConfig {
    pub fn is_trusted(&self, ip: IpAddr) -> bool {
        self.trusted.iter().any(|p| p.contains(ip))
    }

    /// The peer of a connection from `remote`. Proxy headers count only
    /// when `remote` is a trusted proxy; then the client is the nearest hop,
    /// walking back from the end of the list, that is not itself a trusted
    /// proxy (every hop before it could have been written by the client).
    pub fn resolve(&self, remote: SocketAddr, headers: &HeaderMap) -> Peer {
        let remote = remote.ip().to_canonical();
        if !self.is_trusted(remote) {
            return Peer::new(remote);
        }
        // Several header lines mean the same as one comma-joined line.
        let mut hops = Vec::new();
        for value in headers.get_all(self.header.name()) {
            let Ok(value) = value.to_str() else {
                log::debug!(
                    "non-ASCII {} from proxy {remote}; using the proxy's address",
                    self.header.name()
                );
                return Peer::new(remote);
            };
            for element in value.split(',') {
                hops.push(match self.header {
                    ProxyHeader::XForwardedFor => parse_node(element),
                    ProxyHeader::Forwarded => forwarded_for(element),
                });
            }
        }
        let mut nearest = remote;
        for hop in hops.iter().rev() {
            match hop {
                Some(ip) if self.is_trusted(*ip) => nearest = *ip,
                Some(ip) => {
                    return Peer {
                        ip: *ip,
                        proxy: Some(remote),
                        identity: None,
                    }
                }
                // A hop we cannot read ends what we can vouch for; the
                // nearest trusted proxy then stands for its clients.
                None => break,
            }
        }
        Peer {
            ip: nearest,
            proxy: (nearest != remote).then_some(remote),
            identity: None,
        }
    }
}

/// The `for=` parameter of one `Forwarded` element.
fn forwarded_for(element: &str) -> Option<IpAddr> {
    element.split(';').find_map(|pair| {
        let (key, value) = pair.split_once('=')?;
        key.trim()
            .eq_ignore_ascii_case("for")
            .then(|| parse_node(value))
            .flatten()
    })
}

/// One node: `1.2.3.4`, `1.2.3.4:80`, `2001:db8::1`, `[2001:db8::1]:80`,
/// optionally quoted. Obfuscated and `unknown` nodes are not addresses.
fn parse_node(node: &str) -> Option<IpAddr> {
    let node = node.trim().trim_matches('"');
    if let Ok(ip) = node.parse::<IpAddr>() {
        return Some(ip.to_canonical());
    }
    if let Ok(sa) = node.parse::<SocketAddr>() {
        return Some(sa.ip().to_canonical());
    }
    let bracketed = node.strip_prefix('[')?.strip_suffix(']')?;
    bracketed.parse::<IpAddr>().ok().map(|ip| ip.to_canonical())
}

#[cfg(test)]
mod tests {
    use super::*;
    use warp::http::HeaderValue;

    fn cfg(header: ProxyHeader) -> ProxyConfig {
        ProxyConfig {
            trusted: vec!["10.0.0.0/8".parse().unwrap(), "fd00::/8".parse().unwrap()],
            header,
        }
    }

    fn headers(name: &'static str, values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(name, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn headers_from_an_untrusted_peer_are_ignored() {
        let h = headers("x-forwarded-for", &["1.2.3.4"]);
        let p = cfg(ProxyHeader::XForwardedFor).resolve(sa("198.18.0.5:1000"), &h);
        assert_eq!(p.ip(), "198.18.0.5".parse::<IpAddr>().unwrap());
        assert_eq!(p.proxy(), None);
    }

    #[test]
    fn the_nearest_untrusted_hop_is_the_client() {
        let c = cfg(ProxyHeader::XForwardedFor);
        // The client forged the first entry; the proxy appended the real one.
        let h = headers("x-forwarded-for", &["6.6.6.6, 198.18.0.7, 10.1.1.1"]);
        let p = c.resolve(sa("10.0.0.1:1000"), &h);
        assert_eq!(p.ip(), "198.18.0.7".parse::<IpAddr>().unwrap());
        assert_eq!(p.proxy(), Some("10.0.0.1".parse().unwrap()));
        // Two header lines join.
        let h = headers("x-forwarded-for", &["6.6.6.6", "198.18.0.8"]);
        assert_eq!(
            c.resolve(sa("10.0.0.1:1"), &h).ip(),
            "198.18.0.8".parse::<IpAddr>().unwrap()
        );
        // Ports and brackets are tolerated; v4-mapped meets v4.
        let h = headers("x-forwarded-for", &["[::ffff:198.18.0.9]:5555"]);
        assert_eq!(
            c.resolve(sa("10.0.0.1:1"), &h).ip(),
            "198.18.0.9".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn unreadable_hops_fall_back_to_the_nearest_trusted_proxy() {
        let c = cfg(ProxyHeader::XForwardedFor);
        let h = headers("x-forwarded-for", &["198.18.0.7, garbage, 10.2.2.2"]);
        let p = c.resolve(sa("10.0.0.1:1000"), &h);
        assert_eq!(p.ip(), "10.2.2.2".parse::<IpAddr>().unwrap());
        let none = c.resolve(sa("10.0.0.1:1000"), &HeaderMap::new());
        assert_eq!(none.ip(), "10.0.0.1".parse::<IpAddr>().unwrap());
        assert_eq!(none.proxy(), None);
    }

    #[test]
    fn forwarded_header() {
        let c = cfg(ProxyHeader::Forwarded);
        let h = headers(
            "forwarded",
            &[
                r#"for=6.6.6.6, for="[2001:db8:cafe::17]:4711";proto=https, For=10.3.3.3;by=10.0.0.1"#,
            ],
        );
        let p = c.resolve(sa("[fd00::1]:443"), &h);
        assert_eq!(p.ip(), "2001:db8:cafe::17".parse::<IpAddr>().unwrap());
        let h = headers("forwarded", &["for=unknown"]);
        assert_eq!(
            c.resolve(sa("10.0.0.1:1"), &h).ip(),
            "10.0.0.1".parse::<IpAddr>().unwrap()
        );
        // The other header is not read.
        let h = headers("x-forwarded-for", &["198.18.0.1"]);
        assert_eq!(
            c.resolve(sa("10.0.0.1:1"), &h).ip(),
            "10.0.0.1".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn identity_and_display() {
        let p = Peer::new("::ffff:198.18.0.1".parse().unwrap()).with_identity("alice");
        assert_eq!(p.ip(), "198.18.0.1".parse::<IpAddr>().unwrap());
        assert_eq!(p.identity(), Some("alice"));
        assert_eq!(p.to_string(), "198.18.0.1 (\"alice\")");
    }
}
