//! Pure pieces shared by the lab toolkit and `lab-client`: the lab's address rules, target URL
//! parsing, a send pacer, and the small HTTP/1.1 + SSE decoders the SSE clients need.
//!
//! They are plain functions and state machines so host unit tests cover them without a lab.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};

/// The IPv4 benchmarking range (RFC 2544) every lab address lives in.
pub const LAB_V4_NET: (Ipv4Addr, u8) = (Ipv4Addr::new(198, 18, 0, 0), 15);
/// The IPv6 benchmarking range (RFC 5180) every lab address lives in.
pub const LAB_V6_NET: (Ipv6Addr, u8) = (Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 0), 48);

/// Whether `ip` lies in `net/prefix` (both of the same family).
pub fn v4_in(ip: Ipv4Addr, net: Ipv4Addr, prefix: u8) -> bool {
    let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
    u32::from(ip) & mask == u32::from(net) & mask
}

/// Whether `ip` lies in `net/prefix` (both of the same family).
pub fn v6_in(ip: Ipv6Addr, net: Ipv6Addr, prefix: u8) -> bool {
    let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
    u128::from(ip) & mask == u128::from(net) & mask
}

/// The lab's one traffic rule, checked before any tool sends anything: loopback, or an address
/// in the benchmarking ranges that only exist inside the lab's namespaces. A typo in a target
/// must become an error, never traffic towards someone else's address.
pub fn ensure_lab_ip(ip: IpAddr) -> Result<()> {
    let ok = ip.is_loopback()
        || match ip {
            IpAddr::V4(v4) => v4_in(v4, LAB_V4_NET.0, LAB_V4_NET.1),
            IpAddr::V6(v6) => v6_in(v6, LAB_V6_NET.0, LAB_V6_NET.1),
        };
    ensure!(
        ok,
        "{ip} is outside the lab: targets must be loopback, 198.18.0.0/15 or 2001:2::/48"
    );
    Ok(())
}

/// Parses `a.b.c.d/len` (IPv4 only: the spoofed-source floods are IPv4 tools).
pub fn parse_v4_net(text: &str) -> Result<(Ipv4Addr, u8)> {
    let (addr, len) = text
        .split_once('/')
        .with_context(|| format!("{text:?} is not a subnet: expected a.b.c.d/len"))?;
    let addr: Ipv4Addr = addr
        .parse()
        .with_context(|| format!("{addr:?} in {text:?} is not an IPv4 address"))?;
    let len: u8 = len
        .parse()
        .with_context(|| format!("{len:?} in {text:?} is not a prefix length"))?;
    ensure!(len <= 32, "prefix length {len} in {text:?} is over 32");
    Ok((addr, len))
}

/// A target parsed from a `ws://` or `http://` URL: where to connect and what to ask for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub addr: SocketAddr,
    /// Path and query, always starting with `/`.
    pub path: String,
    /// The `Host` header value as written in the URL.
    pub host_header: String,
}

/// Parses `scheme://IP[:port]/path` for one of `schemes`. The host must be an IP literal inside
/// the lab: the lab has no DNS, and a name would hide where traffic goes.
pub fn parse_target_url(url: &str, schemes: &[&str]) -> Result<Target> {
    let (scheme, rest) = url
        .split_once("://")
        .with_context(|| format!("{url:?} is not a URL: expected scheme://host:port/path"))?;
    ensure!(
        schemes.contains(&scheme),
        "{url:?}: scheme {scheme:?} is not supported here (use one of {schemes:?}; no TLS in the lab)"
    );
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    ensure!(!authority.is_empty(), "{url:?} has no host");
    ensure!(
        !authority.contains('@'),
        "{url:?}: user info is not supported"
    );
    let default_port = match scheme {
        "ws" | "http" => 80,
        _ => bail!("{url:?}: scheme {scheme:?} has no default port"),
    };
    let addr = if let Some(v6) = authority.strip_prefix('[') {
        let (ip, after) = v6
            .split_once(']')
            .with_context(|| format!("{url:?}: unclosed '[' in the host"))?;
        let ip: Ipv6Addr = ip
            .parse()
            .with_context(|| format!("{url:?}: {ip:?} is not an IPv6 address"))?;
        let port = match after.strip_prefix(':') {
            Some(p) => parse_port(p, url)?,
            None if after.is_empty() => default_port,
            None => bail!("{url:?}: junk after the IPv6 host"),
        };
        SocketAddr::new(IpAddr::V6(ip), port)
    } else {
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) => (h, parse_port(p, url)?),
            None => (authority, default_port),
        };
        let ip: Ipv4Addr = host.parse().with_context(|| {
            format!("{url:?}: host {host:?} is not an IP literal (the lab has no DNS)")
        })?;
        SocketAddr::new(IpAddr::V4(ip), port)
    };
    ensure_lab_ip(addr.ip())?;
    Ok(Target {
        addr,
        path: path.to_string(),
        host_header: authority.to_string(),
    })
}

fn parse_port(text: &str, url: &str) -> Result<u16> {
    let port: u16 = text
        .parse()
        .with_context(|| format!("{url:?}: {text:?} is not a port"))?;
    ensure!(port != 0, "{url:?}: port 0 is not a target");
    Ok(port)
}

/// Spreads `rate` sends per second over time without a sub-millisecond timer: the caller ticks
/// at whatever granularity it has and sends `due(now)` items each tick.
///
/// Debt is capped at one second's worth so a stalled sender does not burst a backlog at once
/// (a flood tool that catches up by bursting would measure its own stall, not the server).
#[derive(Debug, Clone)]
pub struct Pacer {
    rate: u64,
    start: Instant,
    issued: u64,
}

impl Pacer {
    pub fn new(rate_per_sec: u64, start: Instant) -> Self {
        Self {
            rate: rate_per_sec,
            start,
            issued: 0,
        }
    }

    /// How many sends are due at `now`; counts them as issued.
    pub fn due(&mut self, now: Instant) -> u64 {
        let elapsed = now.saturating_duration_since(self.start);
        let target = (elapsed.as_micros() * u128::from(self.rate) / 1_000_000) as u64;
        let mut due = target.saturating_sub(self.issued);
        if due > self.rate.max(1) {
            // Forget the debt beyond one second.
            self.issued = target - self.rate.max(1);
            due = self.rate.max(1);
        }
        self.issued += due;
        due
    }

    /// The tick period that keeps each batch small: 1 ms for fast rates, one send's spacing
    /// for slow ones.
    pub fn tick(&self) -> Duration {
        if self.rate == 0 {
            return Duration::from_secs(1);
        }
        Duration::from_micros((1_000_000 / self.rate).clamp(1_000, 1_000_000))
    }
}

/// The status line and the headers that matter for reading a body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseHead {
    pub status: u16,
    pub chunked: bool,
    pub content_length: Option<u64>,
    pub content_type: Option<String>,
}

/// Finds the end of an HTTP response head in `buf`; returns the head and the index where the
/// body starts, or `None` if more bytes are needed.
pub fn parse_response_head(buf: &[u8]) -> Result<Option<(ResponseHead, usize)>> {
    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Ok(None);
    };
    let head = std::str::from_utf8(&buf[..end]).context("response head is not UTF-8")?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    ensure!(
        version.starts_with("HTTP/1."),
        "not an HTTP/1.x response: {status_line:?}"
    );
    let status: u16 = parts
        .next()
        .unwrap_or_default()
        .parse()
        .with_context(|| format!("bad status line {status_line:?}"))?;
    let mut out = ResponseHead {
        status,
        chunked: false,
        content_length: None,
        content_type: None,
    };
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            bail!("bad header line {line:?}");
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("transfer-encoding") {
            out.chunked = value
                .rsplit(',')
                .next()
                .is_some_and(|v| v.trim().eq_ignore_ascii_case("chunked"));
        } else if name.eq_ignore_ascii_case("content-length") {
            out.content_length = Some(
                value
                    .parse()
                    .with_context(|| format!("bad content-length {value:?}"))?,
            );
        } else if name.eq_ignore_ascii_case("content-type") {
            out.content_type = Some(value.to_string());
        }
    }
    Ok(Some((out, end + 4)))
}

/// Incremental decoder for `Transfer-Encoding: chunked` bodies (hyper streams SSE this way).
#[derive(Debug, Default)]
pub struct ChunkedDecoder {
    state: ChunkState,
    line: Vec<u8>,
}

#[derive(Debug, Default, PartialEq, Eq)]
enum ChunkState {
    #[default]
    Size,
    Data(u64),
    DataEnd,
    Trailer,
    Done,
}

/// Chunk-size lines and trailers longer than this are garbage, not HTTP.
const MAX_CHUNK_LINE: usize = 4096;

impl ChunkedDecoder {
    /// Feeds raw body bytes; appends decoded payload to `out`.
    pub fn feed(&mut self, mut input: &[u8], out: &mut Vec<u8>) -> Result<()> {
        while !input.is_empty() {
            match self.state {
                ChunkState::Size | ChunkState::DataEnd | ChunkState::Trailer => {
                    let Some(nl) = input.iter().position(|&b| b == b'\n') else {
                        self.line.extend_from_slice(input);
                        ensure!(self.line.len() <= MAX_CHUNK_LINE, "chunk line too long");
                        return Ok(());
                    };
                    self.line.extend_from_slice(&input[..nl]);
                    input = &input[nl + 1..];
                    let line = std::mem::take(&mut self.line);
                    let line = line.strip_suffix(b"\r").unwrap_or(&line);
                    self.state = match self.state {
                        ChunkState::Size => {
                            let text = std::str::from_utf8(line).context("chunk size not UTF-8")?;
                            let hex = text.split(';').next().unwrap_or_default().trim();
                            let size = u64::from_str_radix(hex, 16)
                                .with_context(|| format!("bad chunk size {text:?}"))?;
                            if size == 0 {
                                ChunkState::Trailer
                            } else {
                                ChunkState::Data(size)
                            }
                        }
                        ChunkState::DataEnd => {
                            ensure!(line.is_empty(), "chunk not followed by CRLF");
                            ChunkState::Size
                        }
                        _ if line.is_empty() => ChunkState::Done,
                        _ => ChunkState::Trailer,
                    };
                }
                ChunkState::Data(left) => {
                    let take = usize::try_from(left).unwrap_or(usize::MAX).min(input.len());
                    out.extend_from_slice(&input[..take]);
                    input = &input[take..];
                    let left = left - take as u64;
                    self.state = if left == 0 {
                        ChunkState::DataEnd
                    } else {
                        ChunkState::Data(left)
                    };
                }
                ChunkState::Done => bail!("bytes after the last chunk"),
            }
        }
        Ok(())
    }

    /// Whether the terminating zero-size chunk and trailers were seen.
    pub fn is_done(&self) -> bool {
        self.state == ChunkState::Done
    }
}

/// Counts Server-Sent Events in a byte stream (the event-stream format: lines ending in LF,
/// CRLF or CR; an event is dispatched by a blank line if it carried a `data` field; lines
/// starting with `:` are comments, which servers use as keep-alives).
#[derive(Debug, Default)]
pub struct SseParser {
    line: Vec<u8>,
    after_cr: bool,
    has_data: bool,
    pub events: u64,
    pub comments: u64,
    /// The last `retry:` value the server asked for, in milliseconds.
    pub retry_ms: Option<u64>,
}

/// An event line longer than this means the stream is not SSE.
const MAX_SSE_LINE: usize = 1 << 20;

impl SseParser {
    pub fn feed(&mut self, input: &[u8]) -> Result<()> {
        for &b in input {
            if self.after_cr {
                self.after_cr = false;
                if b == b'\n' {
                    continue;
                }
            }
            match b {
                b'\r' => {
                    self.after_cr = true;
                    self.end_line();
                }
                b'\n' => self.end_line(),
                _ => {
                    self.line.push(b);
                    ensure!(self.line.len() <= MAX_SSE_LINE, "SSE line over 1 MiB");
                }
            }
        }
        Ok(())
    }

    fn end_line(&mut self) {
        let line = std::mem::take(&mut self.line);
        if line.is_empty() {
            if self.has_data {
                self.events += 1;
            }
            self.has_data = false;
            return;
        }
        if line[0] == b':' {
            self.comments += 1;
            return;
        }
        let (field, value) = match line.iter().position(|&b| b == b':') {
            Some(i) => {
                let v = &line[i + 1..];
                (&line[..i], v.strip_prefix(b" ").unwrap_or(v))
            }
            None => (&line[..], &b""[..]),
        };
        match field {
            b"data" => self.has_data = true,
            b"retry" => {
                if let Some(ms) = std::str::from_utf8(value).ok().and_then(|v| v.parse().ok()) {
                    self.retry_ms = Some(ms);
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lab_range_accepts_only_lab_and_loopback() {
        for ok in [
            "198.18.0.1",
            "198.19.255.255",
            "127.0.0.1",
            "::1",
            "2001:2::1",
        ] {
            ensure_lab_ip(ok.parse().unwrap()).unwrap();
        }
        for bad in [
            "198.20.0.1",
            "10.0.0.1",
            "8.8.8.8",
            "2001:3::1",
            "2001:db8::1",
        ] {
            let err = ensure_lab_ip(bad.parse().unwrap()).unwrap_err();
            assert!(err.to_string().contains("outside the lab"), "{err}");
        }
    }

    #[test]
    fn subnets_parse_and_reject_garbage() {
        assert_eq!(
            parse_v4_net("198.19.0.0/16").unwrap(),
            (Ipv4Addr::new(198, 19, 0, 0), 16)
        );
        assert!(parse_v4_net("198.19.0.0").is_err());
        assert!(parse_v4_net("198.19.0.0/33").is_err());
        assert!(parse_v4_net("x/8").is_err());
        assert!(v4_in(Ipv4Addr::new(1, 2, 3, 4), Ipv4Addr::UNSPECIFIED, 0));
    }

    #[test]
    fn target_urls() {
        let t = parse_target_url("ws://198.18.0.1:8080/ws", &["ws"]).unwrap();
        assert_eq!(t.addr, "198.18.0.1:8080".parse().unwrap());
        assert_eq!(t.path, "/ws");
        assert_eq!(t.host_header, "198.18.0.1:8080");
        let t = parse_target_url("http://[2001:2::1]/events?x=1", &["http"]).unwrap();
        assert_eq!(t.addr, "[2001:2::1]:80".parse().unwrap());
        assert_eq!(t.path, "/events?x=1");
        let t = parse_target_url("http://127.0.0.1:9", &["http"]).unwrap();
        assert_eq!(t.path, "/");
        for bad in [
            "wss://198.18.0.1/ws",
            "ws://example.com/ws",
            "ws://10.0.0.1/ws",
            "ws://198.18.0.1:0/",
            "ws://198.18.0.1:99999/",
            "198.18.0.1:80",
            "ws://[2001:2::1/",
        ] {
            assert!(parse_target_url(bad, &["ws"]).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn pacer_spreads_and_caps_debt() {
        let t0 = Instant::now();
        let mut p = Pacer::new(1000, t0);
        assert_eq!(p.due(t0), 0);
        assert_eq!(p.due(t0 + Duration::from_millis(10)), 10);
        assert_eq!(p.due(t0 + Duration::from_millis(10)), 0);
        assert_eq!(p.due(t0 + Duration::from_millis(25)), 15);
        // A 5 s stall owes 5000 sends, but only one second's worth is paid at once...
        assert_eq!(p.due(t0 + Duration::from_millis(5025)), 1000);
        // ...and the rest is forgotten rather than burst on the next ticks.
        assert_eq!(p.due(t0 + Duration::from_millis(5026)), 1);
        assert_eq!(p.tick(), Duration::from_millis(1));
        assert_eq!(Pacer::new(2, t0).tick(), Duration::from_millis(500));
        assert_eq!(Pacer::new(0, t0).due(t0 + Duration::from_secs(9)), 0);
    }

    #[test]
    fn response_head() {
        let raw = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\nabc";
        let (head, body) = parse_response_head(raw).unwrap().unwrap();
        assert_eq!(head.status, 200);
        assert!(head.chunked);
        assert_eq!(head.content_type.as_deref(), Some("text/event-stream"));
        assert_eq!(&raw[body..], b"abc");
        assert!(parse_response_head(b"HTTP/1.1 200 OK\r\n")
            .unwrap()
            .is_none());
        let (head, _) = parse_response_head(b"HTTP/1.1 429 Too Many\r\ncontent-length: 5\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!((head.status, head.content_length), (429, Some(5)));
        assert!(parse_response_head(b"SSH-2.0\r\n\r\n").is_err());
    }

    #[test]
    fn chunked_decoding_split_anywhere() {
        let raw = b"5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\nx-trailer: 1\r\n\r\n";
        // Every split point must give the same result: TCP segments split anywhere.
        for split in 0..raw.len() {
            let mut d = ChunkedDecoder::default();
            let mut out = Vec::new();
            d.feed(&raw[..split], &mut out).unwrap();
            d.feed(&raw[split..], &mut out).unwrap();
            assert_eq!(out, b"hello, world");
            assert!(d.is_done());
        }
        let mut d = ChunkedDecoder::default();
        assert!(d.feed(b"zz\r\n", &mut Vec::new()).is_err());
        let mut d = ChunkedDecoder::default();
        assert!(d.feed(b"1\r\nab\r\n", &mut Vec::new()).is_err());
    }

    #[test]
    fn sse_counts_events_comments_and_retry() {
        let raw = b": keep-alive\n\ndata: one\n\nevent: x\ndata: a\ndata: b\r\n\r\nretry: 1500\n\nid: 3\n\ndata\r\rdata:";
        for split in 0..raw.len() {
            let mut p = SseParser::default();
            p.feed(&raw[..split]).unwrap();
            p.feed(&raw[split..]).unwrap();
            // "one", "a\nb", and the bare "data" line; the retry/id-only blocks carry no data,
            // and the last "data:" is not yet dispatched.
            assert_eq!(p.events, 3, "split at {split}");
            assert_eq!(p.comments, 1);
            assert_eq!(p.retry_ms, Some(1500));
        }
    }
}
