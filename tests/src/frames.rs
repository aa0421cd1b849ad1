//! Crafted Ethernet frames for driving the guard program through
//! `BPF_PROG_TEST_RUN`: every header the parser handles, built byte by byte
//! so a test states exactly what is on the wire.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

const TPID_8021Q: u16 = 0x8100;
const TPID_8021AD: u16 = 0x88a8;

/// An IPv6 extension header to put before the transport header.
#[derive(Clone, Copy, Debug)]
pub enum Ext {
    HopByHop,
    Routing,
    DestOpts,
    /// `offset` in 8-byte units; non-zero means a later fragment.
    Fragment {
        offset: u16,
        more: bool,
    },
    Auth,
}

#[derive(Clone, Debug)]
pub enum L4 {
    Tcp {
        src_port: u16,
        dst_port: u16,
        flags: u8,
        seq: u32,
        ack: u32,
        /// Raw option bytes (padded with end-of-list to a multiple of 4).
        options: Vec<u8>,
        payload: Vec<u8>,
    },
    Udp {
        src_port: u16,
        dst_port: u16,
    },
    Icmp,
}

#[derive(Clone, Debug)]
pub struct Frame {
    /// VLAN tags, outermost first (`true` = 802.1ad S-tag).
    pub vlans: Vec<bool>,
    pub src: IpAddr,
    pub dst: IpAddr,
    /// IPv4 options (padded to 4 bytes); ignored for IPv6.
    pub ipv4_options: Vec<u8>,
    /// IPv4 fragment offset in 8-byte units; ignored for IPv6.
    pub ipv4_frag_offset: u16,
    pub ipv4_more_fragments: bool,
    /// IPv6 extension headers in order; ignored for IPv4.
    pub ext: Vec<Ext>,
    pub l4: L4,
    /// Overrides the IP version nibble (to build broken headers).
    pub version_override: Option<u8>,
    /// Overrides the IPv4 IHL nibble.
    pub ihl_override: Option<u8>,
}

impl Frame {
    /// A connection-opening SYN from `src` to `dst_port`.
    pub fn syn(src: IpAddr, dst_port: u16) -> Self {
        let dst = match src {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::new(198, 18, 0, 1)),
            IpAddr::V6(_) => IpAddr::V6("2001:2::1".parse().expect("literal")),
        };
        Self {
            vlans: Vec::new(),
            src,
            dst,
            ipv4_options: Vec::new(),
            ipv4_frag_offset: 0,
            ipv4_more_fragments: false,
            ext: Vec::new(),
            l4: L4::Tcp {
                src_port: 40000,
                dst_port,
                flags: TCP_SYN,
                seq: 1,
                ack: 0,
                options: Vec::new(),
                payload: Vec::new(),
            },
            version_override: None,
            ihl_override: None,
        }
    }

    pub fn tcp_flags(mut self, flags: u8) -> Self {
        if let L4::Tcp { flags: f, .. } = &mut self.l4 {
            *f = flags;
        }
        self
    }

    /// The options a Linux client puts in its SYN: MSS, SACK permitted,
    /// timestamps, window scale.
    pub fn linux_syn_options(self, mss: u16, tsval: u32, wscale: u8) -> Self {
        let mut o = vec![2, 4];
        o.extend_from_slice(&mss.to_be_bytes());
        o.extend_from_slice(&[4, 2, 8, 10]);
        o.extend_from_slice(&tsval.to_be_bytes());
        o.extend_from_slice(&0u32.to_be_bytes());
        o.extend_from_slice(&[1, 3, 3, wscale]);
        self.tcp_options(&o)
    }

    pub fn tcp_options(mut self, bytes: &[u8]) -> Self {
        if let L4::Tcp { options, .. } = &mut self.l4 {
            *options = bytes.to_vec();
        }
        self
    }

    pub fn tcp_seq_ack(mut self, seq_no: u32, ack_no: u32) -> Self {
        if let L4::Tcp { seq, ack, .. } = &mut self.l4 {
            *seq = seq_no;
            *ack = ack_no;
        }
        self
    }

    pub fn tcp_ports(mut self, src: u16, dst: u16) -> Self {
        if let L4::Tcp {
            src_port, dst_port, ..
        } = &mut self.l4
        {
            *src_port = src;
            *dst_port = dst;
        }
        self
    }

    pub fn tcp_payload(mut self, bytes: &[u8]) -> Self {
        if let L4::Tcp { payload, .. } = &mut self.l4 {
            *payload = bytes.to_vec();
        }
        self
    }

    pub fn udp(mut self, dst_port: u16) -> Self {
        self.l4 = L4::Udp {
            src_port: 40000,
            dst_port,
        };
        self
    }

    pub fn icmp(mut self) -> Self {
        self.l4 = L4::Icmp;
        self
    }

    pub fn vlan(mut self, s_tag: bool) -> Self {
        self.vlans.push(s_tag);
        self
    }

    pub fn ipv4_options(mut self, options: &[u8]) -> Self {
        self.ipv4_options = options.to_vec();
        self
    }

    pub fn ipv4_fragment(mut self, offset: u16, more: bool) -> Self {
        self.ipv4_frag_offset = offset;
        self.ipv4_more_fragments = more;
        self
    }

    pub fn ext(mut self, ext: Ext) -> Self {
        self.ext.push(ext);
        self
    }

    pub fn version(mut self, v: u8) -> Self {
        self.version_override = Some(v);
        self
    }

    pub fn ihl(mut self, ihl: u8) -> Self {
        self.ihl_override = Some(ihl);
        self
    }

    fn l4_proto(&self) -> u8 {
        match (&self.l4, self.src) {
            (L4::Tcp { .. }, _) => 6,
            (L4::Udp { .. }, _) => 17,
            (L4::Icmp, IpAddr::V4(_)) => 1,
            (L4::Icmp, IpAddr::V6(_)) => 58,
        }
    }

    fn l4_bytes(&self) -> Vec<u8> {
        match &self.l4 {
            L4::Tcp {
                src_port,
                dst_port,
                flags,
                seq,
                ack,
                options,
                payload,
            } => {
                let mut opts = options.clone();
                while !opts.len().is_multiple_of(4) {
                    opts.push(0);
                }
                let mut t = Vec::with_capacity(20 + opts.len() + payload.len());
                t.extend_from_slice(&src_port.to_be_bytes());
                t.extend_from_slice(&dst_port.to_be_bytes());
                t.extend_from_slice(&seq.to_be_bytes());
                t.extend_from_slice(&ack.to_be_bytes());
                t.push(((5 + opts.len() / 4) as u8) << 4);
                t.push(*flags);
                t.extend_from_slice(&64240u16.to_be_bytes()); // window
                t.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent
                t.extend_from_slice(&opts);
                t.extend_from_slice(payload);
                t
            }
            L4::Udp { src_port, dst_port } => {
                let mut u = Vec::with_capacity(8);
                u.extend_from_slice(&src_port.to_be_bytes());
                u.extend_from_slice(&dst_port.to_be_bytes());
                u.extend_from_slice(&8u16.to_be_bytes());
                u.extend_from_slice(&[0, 0]);
                u
            }
            L4::Icmp => vec![8, 0, 0, 0, 0, 1, 0, 1],
        }
    }

    /// The frame's bytes, Ethernet header first.
    pub fn bytes(&self) -> Vec<u8> {
        let mut f = Vec::with_capacity(128);
        f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x01]); // dst MAC
        f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x02]); // src MAC
        for s_tag in &self.vlans {
            let tpid = if *s_tag { TPID_8021AD } else { TPID_8021Q };
            f.extend_from_slice(&tpid.to_be_bytes());
            f.extend_from_slice(&100u16.to_be_bytes()); // TCI: VLAN 100
        }
        let l4 = self.l4_bytes();
        match (self.src, self.dst) {
            (IpAddr::V4(src), IpAddr::V4(dst)) => {
                f.extend_from_slice(&0x0800u16.to_be_bytes());
                let mut opts = self.ipv4_options.clone();
                while !opts.len().is_multiple_of(4) {
                    opts.push(0); // end-of-options padding
                }
                let ihl = self.ihl_override.unwrap_or((5 + opts.len() / 4) as u8);
                let version = self.version_override.unwrap_or(4);
                let total = 20 + opts.len() + l4.len();
                f.push((version << 4) | (ihl & 0x0f));
                f.push(0);
                f.extend_from_slice(&(total as u16).to_be_bytes());
                f.extend_from_slice(&0x1234u16.to_be_bytes());
                let frag = (self.ipv4_frag_offset & 0x1fff)
                    | if self.ipv4_more_fragments { 0x2000 } else { 0 };
                f.extend_from_slice(&frag.to_be_bytes());
                f.push(64);
                f.push(self.l4_proto());
                f.extend_from_slice(&[0, 0]);
                f.extend_from_slice(&src.octets());
                f.extend_from_slice(&dst.octets());
                f.extend_from_slice(&opts);
                f.extend_from_slice(&l4);
            }
            (IpAddr::V6(src), IpAddr::V6(dst)) => {
                f.extend_from_slice(&0x86ddu16.to_be_bytes());
                let mut chain = Vec::new();
                let protos: Vec<u8> = self
                    .ext
                    .iter()
                    .map(|e| match e {
                        Ext::HopByHop => 0,
                        Ext::Routing => 43,
                        Ext::Fragment { .. } => 44,
                        Ext::Auth => 51,
                        Ext::DestOpts => 60,
                    })
                    .chain(std::iter::once(self.l4_proto()))
                    .collect();
                for (i, e) in self.ext.iter().enumerate() {
                    let next = protos[i + 1];
                    match e {
                        Ext::HopByHop | Ext::DestOpts => {
                            // 8 bytes: next, len 0, PadN option of 4 bytes.
                            chain.extend_from_slice(&[next, 0, 1, 4, 0, 0, 0, 0]);
                        }
                        Ext::Routing => {
                            // 16 bytes (len 1): type 4, 0 segments left.
                            chain.extend_from_slice(&[next, 1, 4, 0, 0, 0, 0, 0]);
                            chain.extend_from_slice(&[0; 8]);
                        }
                        Ext::Fragment { offset, more } => {
                            let v = (offset << 3) | u16::from(*more);
                            chain.extend_from_slice(&[next, 0]);
                            chain.extend_from_slice(&v.to_be_bytes());
                            chain.extend_from_slice(&0xabcd_0001u32.to_be_bytes());
                        }
                        Ext::Auth => {
                            // 16 bytes: (len + 2) * 4 with len 2.
                            chain.extend_from_slice(&[next, 2, 0, 0]);
                            chain.extend_from_slice(&[0; 12]);
                        }
                    }
                }
                let version = self.version_override.unwrap_or(6);
                f.extend_from_slice(&[version << 4, 0, 0, 0]);
                f.extend_from_slice(&((chain.len() + l4.len()) as u16).to_be_bytes());
                f.push(protos[0]);
                f.push(64);
                f.extend_from_slice(&src.octets());
                f.extend_from_slice(&dst.octets());
                f.extend_from_slice(&chain);
                f.extend_from_slice(&l4);
            }
            _ => panic!("source and destination must be the same family"),
        }
        f
    }
}

/// An ARP request: not IP at all.
pub fn arp() -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x02]);
    f.extend_from_slice(&0x0806u16.to_be_bytes());
    f.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x02, 198, 18, 0, 2]);
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&[198, 18, 0, 1]);
    f
}

pub fn v4(a: u8, b: u8, c: u8, d: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(a, b, c, d))
}

pub fn v6(s: &str) -> IpAddr {
    IpAddr::V6(s.parse::<Ipv6Addr>().expect("valid IPv6 literal"))
}

/// A TCP segment as a receiver reads it: the reference decoder tests hold
/// the program's output (and, for the evasion corpus, its input) to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Segment {
    pub dst_mac: [u8; 6],
    pub src_mac: [u8; 6],
    /// VLAN TPIDs, outermost first.
    pub vlans: Vec<u16>,
    pub src: IpAddr,
    pub dst: IpAddr,
    /// IPv4 TTL or IPv6 hop limit.
    pub ttl: u8,
    /// IPv4 only: the don't-fragment bit.
    pub dont_fragment: bool,
    pub src_port: u16,
    pub dst_port: u16,
    pub seq: u32,
    pub ack: u32,
    pub flags: u8,
    pub window: u16,
    /// (kind, value) of every option but NOP and end-of-list.
    pub options: Vec<(u8, Vec<u8>)>,
    pub payload_len: usize,
    /// IPv4 header checksum (true for IPv6, which has none).
    pub ip_checksum_ok: bool,
    pub tcp_checksum_ok: bool,
}

impl Segment {
    pub fn option(&self, kind: u8) -> Option<&[u8]> {
        self.options
            .iter()
            .find(|(k, _)| *k == kind)
            .map(|(_, v)| v.as_slice())
    }

    pub fn mss(&self) -> Option<u16> {
        self.option(2).map(|v| u16::from_be_bytes([v[0], v[1]]))
    }

    pub fn wscale(&self) -> Option<u8> {
        self.option(3).map(|v| v[0])
    }

    pub fn sack_permitted(&self) -> bool {
        self.option(4).is_some()
    }

    /// (TSval, TSecr)
    pub fn timestamps(&self) -> Option<(u32, u32)> {
        self.option(8).map(|v| {
            (
                u32::from_be_bytes([v[0], v[1], v[2], v[3]]),
                u32::from_be_bytes([v[4], v[5], v[6], v[7]]),
            )
        })
    }
}

/// RFC 1071 over `bytes` with `initial` already summed in (folded, not yet complemented).
pub fn ones_complement_sum(bytes: &[u8], initial: u32) -> u16 {
    let mut sum = initial;
    for pair in bytes.chunks(2) {
        sum += u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// Decodes an unfragmented TCP segment (no IPv6 extension headers); `None`
/// for anything else or anything truncated.
pub fn decode_tcp(frame: &[u8]) -> Option<Segment> {
    let mut at = 12;
    let mut vlans = Vec::new();
    let mut ethertype = u16::from_be_bytes([*frame.get(at)?, *frame.get(at + 1)?]);
    while ethertype == TPID_8021Q || ethertype == TPID_8021AD {
        vlans.push(ethertype);
        at += 4;
        ethertype = u16::from_be_bytes([*frame.get(at)?, *frame.get(at + 1)?]);
    }
    let l3 = at + 2;
    let ip = frame.get(l3..)?;
    let (src, dst, ttl, dont_fragment, tcp, ip_checksum_ok, pseudo) = match ethertype {
        0x0800 => {
            let ihl = usize::from(ip.first()? & 0x0f) * 4;
            let total = usize::from(u16::from_be_bytes([*ip.get(2)?, *ip.get(3)?]));
            if *ip.get(9)? != 6 || ip.len() < total || total < ihl {
                return None;
            }
            let src = IpAddr::V4(Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]));
            let dst = IpAddr::V4(Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]));
            let tcp = &ip[ihl..total];
            let mut pseudo = ip[12..20].to_vec();
            pseudo.extend_from_slice(&[0, 6]);
            pseudo.extend_from_slice(&(tcp.len() as u16).to_be_bytes());
            let ok = ones_complement_sum(&ip[..ihl], 0) == 0xffff;
            (src, dst, ip[8], ip[6] & 0x40 != 0, tcp, ok, pseudo)
        }
        0x86dd => {
            let payload = usize::from(u16::from_be_bytes([*ip.get(4)?, *ip.get(5)?]));
            if *ip.get(6)? != 6 || ip.len() < 40 + payload {
                return None;
            }
            let src = IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(&ip[8..24]).ok()?));
            let dst = IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(&ip[24..40]).ok()?));
            let tcp = &ip[40..40 + payload];
            let mut pseudo = ip[8..40].to_vec();
            pseudo.extend_from_slice(&(tcp.len() as u32).to_be_bytes());
            pseudo.extend_from_slice(&[0, 0, 0, 6]);
            (src, dst, ip[7], false, tcp, true, pseudo)
        }
        _ => return None,
    };
    if tcp.len() < 20 {
        return None;
    }
    let data_offset = usize::from(tcp[12] >> 4) * 4;
    if data_offset < 20 || tcp.len() < data_offset {
        return None;
    }
    let mut options = Vec::new();
    let mut i = 20;
    while i < data_offset {
        match tcp[i] {
            0 => break,
            1 => i += 1,
            kind => {
                let len = usize::from(*tcp.get(i + 1)?);
                if len < 2 || i + len > data_offset {
                    return None;
                }
                options.push((kind, tcp[i + 2..i + len].to_vec()));
                i += len;
            }
        }
    }
    let mut all = pseudo;
    all.extend_from_slice(tcp);
    let be16 = |i: usize| u16::from_be_bytes([tcp[i], tcp[i + 1]]);
    let be32 = |i: usize| u32::from_be_bytes([tcp[i], tcp[i + 1], tcp[i + 2], tcp[i + 3]]);
    Some(Segment {
        dst_mac: frame[0..6].try_into().ok()?,
        src_mac: frame[6..12].try_into().ok()?,
        vlans,
        src,
        dst,
        ttl,
        dont_fragment,
        src_port: be16(0),
        dst_port: be16(2),
        seq: be32(4),
        ack: be32(8),
        flags: tcp[13],
        window: be16(14),
        options,
        payload_len: tcp.len() - data_offset,
        ip_checksum_ok,
        tcp_checksum_ok: ones_complement_sum(&all, 0) == 0xffff,
    })
}
