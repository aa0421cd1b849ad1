//! Who is on the other end: the socket's address, or, behind a trusted
//! proxy, the client the proxy names.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use warp::http::HeaderMap;
use warp::reject::Reject;

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

/// A trusted proxy's header does not name the client: the hop it vouches
/// for is not an address. [`super::recover`] answers 400; see
/// `ProxyConfig::resolve` for why the proxy is not taken for the client.
#[derive(Debug)]
pub struct UnreadableProxyHeader;

impl Reject for UnreadableProxyHeader {}

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
    ///
    /// Each element is read on its own, from the header's bytes: junk in an
    /// element the client wrote (a non-ASCII byte, say) costs nothing, the
    /// walk stops at the address the proxy appended before reaching it.
    ///
    /// A hop the walk has to read and cannot (not an address: garbage, a
    /// non-ASCII byte, `unknown`, an obfuscated node) refuses the request
    /// rather than falling back to the nearest trusted proxy. There is no
    /// client to name, and the proxy is certainly not it: taking its address
    /// would file whoever sent the request under the proxy, with the limits
    /// all of the proxy's clients share (their slots to use up) and the
    /// proxy's exemption from reports (never blocked). A refusal costs an
    /// honest deployment nothing it had: a proxy that names no clients
    /// leaves no per-client limits to enforce, and the 400 says why.
    /// Without any header the request is the proxy's own (a health check).
    pub fn resolve(
        &self,
        remote: SocketAddr,
        headers: &HeaderMap,
    ) -> Result<Peer, UnreadableProxyHeader> {
        let remote = remote.ip().to_canonical();
        if !self.is_trusted(remote) {
            return Ok(Peer::new(remote));
        }
        // Several header lines mean the same as one comma-joined line.
        let mut hops = Vec::new();
        for value in headers.get_all(self.header.name()) {
            for element in value.as_bytes().split(|b| *b == b',') {
                let element = std::str::from_utf8(element).ok();
                hops.push(element.and_then(|e| match self.header {
                    ProxyHeader::XForwardedFor => parse_node(e),
                    ProxyHeader::Forwarded => forwarded_for(e),
                }));
            }
        }
        let mut nearest = remote;
        for hop in hops.iter().rev() {
            match hop {
                Some(ip) if self.is_trusted(*ip) => nearest = *ip,
                Some(ip) => {
                    return Ok(Peer {
                        ip: *ip,
                        proxy: Some(remote),
                        identity: None,
                    })
                }
                None => {
                    log::debug!(
                        "refused: {} from trusted proxy {remote} has a hop that is not an \
                         address where the client should be (after {nearest})",
                        self.header.name()
                    );
                    return Err(UnreadableProxyHeader);
                }
            }
        }
        // Every hop is a trusted proxy: the request is the first one's own.
        Ok(Peer {
            ip: nearest,
            proxy: (nearest != remote).then_some(remote),
            identity: None,
        })
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
        let p = cfg(ProxyHeader::XForwardedFor)
            .resolve(sa("198.18.0.5:1000"), &h)
            .unwrap();
        assert_eq!(p.ip(), "198.18.0.5".parse::<IpAddr>().unwrap());
        assert_eq!(p.proxy(), None);
    }

    #[test]
    fn the_nearest_untrusted_hop_is_the_client() {
        let c = cfg(ProxyHeader::XForwardedFor);
        // The client forged the first entry; the proxy appended the real one.
        let h = headers("x-forwarded-for", &["6.6.6.6, 198.18.0.7, 10.1.1.1"]);
        let p = c.resolve(sa("10.0.0.1:1000"), &h).unwrap();
        assert_eq!(p.ip(), "198.18.0.7".parse::<IpAddr>().unwrap());
        assert_eq!(p.proxy(), Some("10.0.0.1".parse().unwrap()));
        // Two header lines join.
        let h = headers("x-forwarded-for", &["6.6.6.6", "198.18.0.8"]);
        assert_eq!(
            c.resolve(sa("10.0.0.1:1"), &h).unwrap().ip(),
            "198.18.0.8".parse::<IpAddr>().unwrap()
        );
        // Ports and brackets are tolerated; v4-mapped meets v4.
        let h = headers("x-forwarded-for", &["[::ffff:198.18.0.9]:5555"]);
        assert_eq!(
            c.resolve(sa("10.0.0.1:1"), &h).unwrap().ip(),
            "198.18.0.9".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn an_unreadable_hop_where_the_client_should_be_refuses_the_request() {
        let c = cfg(ProxyHeader::XForwardedFor);
        // The client is behind 10.2.2.2, which names it unreadably: the
        // proxy is not taken for the client.
        for value in [
            "198.18.0.7, garbage, 10.2.2.2",
            "",
            "198.18.0.7,",
            " , 10.2.2.2",
        ] {
            let h = headers("x-forwarded-for", &[value]);
            assert!(c.resolve(sa("10.0.0.1:1000"), &h).is_err(), "{value:?}");
        }
        // Junk the walk never reaches is harmless.
        let h = headers("x-forwarded-for", &["garbage, 198.18.0.7, 10.2.2.2"]);
        let p = c.resolve(sa("10.0.0.1:1000"), &h).unwrap();
        assert_eq!(p.ip(), "198.18.0.7".parse::<IpAddr>().unwrap());
        // No header, or only trusted hops: the request is a proxy's own.
        let none = c.resolve(sa("10.0.0.1:1000"), &HeaderMap::new()).unwrap();
        assert_eq!(none.ip(), "10.0.0.1".parse::<IpAddr>().unwrap());
        assert_eq!(none.proxy(), None);
        let h = headers("x-forwarded-for", &["10.2.2.2"]);
        let own = c.resolve(sa("10.0.0.1:1000"), &h).unwrap();
        assert_eq!(own.ip(), "10.2.2.2".parse::<IpAddr>().unwrap());
        assert_eq!(own.proxy(), Some("10.0.0.1".parse().unwrap()));
    }

    /// Issue 17: one non-ASCII byte made the whole header unreadable, and
    /// the client was taken for the trusted proxy.
    #[test]
    fn a_non_ascii_byte_never_makes_the_proxy_the_client() {
        let bytes = |values: &[&[u8]]| {
            let mut h = HeaderMap::new();
            for v in values {
                h.append("x-forwarded-for", HeaderValue::from_bytes(v).unwrap());
            }
            h
        };
        let c = cfg(ProxyHeader::XForwardedFor);
        let client = "198.18.0.7".parse::<IpAddr>().unwrap();
        for h in [
            bytes(&[b"\xff, 198.18.0.7"]),
            bytes(&[b"6.6.6.6\xc3\xa9, 198.18.0.7, 10.2.2.2"]),
            bytes(&["\u{e9}vil".as_bytes(), b"198.18.0.7"]),
        ] {
            let p = c.resolve(sa("10.0.0.1:1000"), &h).unwrap();
            assert_eq!(p.ip(), client, "{h:?}");
            assert_eq!(p.proxy(), Some("10.0.0.1".parse().unwrap()));
        }
        for h in [
            bytes(&[b"198.18.0.7\xff"]),
            bytes(&[b"198.18.0.7, \xff, 10.2.2.2"]),
            bytes(&[b"198.18.0.7", b"\xff"]),
        ] {
            assert!(c.resolve(sa("10.0.0.1:1000"), &h).is_err(), "{h:?}");
        }
        let f = cfg(ProxyHeader::Forwarded);
        let h = {
            let mut h = HeaderMap::new();
            h.append(
                "forwarded",
                HeaderValue::from_bytes(b"for=\"\xff\", for=198.18.0.7;proto=https").unwrap(),
            );
            h
        };
        assert_eq!(f.resolve(sa("10.0.0.1:1"), &h).unwrap().ip(), client);
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
        let p = c.resolve(sa("[fd00::1]:443"), &h).unwrap();
        assert_eq!(p.ip(), "2001:db8:cafe::17".parse::<IpAddr>().unwrap());
        // A proxy that hides its clients names none to limit.
        for hidden in ["for=unknown", "for=_hidden", "proto=https"] {
            let h = headers("forwarded", &[hidden]);
            assert!(c.resolve(sa("10.0.0.1:1"), &h).is_err(), "{hidden}");
        }
        // The other header is not read.
        let h = headers("x-forwarded-for", &["198.18.0.1"]);
        assert_eq!(
            c.resolve(sa("10.0.0.1:1"), &h).unwrap().ip(),
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
