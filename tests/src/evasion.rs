//! The differential evasion corpus: SYN variants generated as the product of independent
//! dimensions — how the TCP header looks, what the IP layer carries, how the datagram is
//! delivered (whole, fragmented at several sizes and in several orders, overlapping,
//! duplicated) — each a list of wire-ready Ethernet frames with correct checksums.
//!
//! `tests/tests/evasion.rs` sends every variant to an unguarded server and records which ones
//! its TCP answers with a SYN-ACK, then sends the corpus again with guard at a cap of one SYN
//! per source: whatever the kernel accepts must then be capped. New dimensions or values added
//! here multiply into the corpus; no variant is written out by hand.

use std::net::{Ipv4Addr, Ipv6Addr};

use crate::frames::{ones_complement_sum, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN};

const TCP_PSH: u8 = 0x08;
const TCP_URG: u8 = 0x20;
const TCP_ECE: u8 = 0x40;
const TCP_CWR: u8 = 0x80;

const NEXTHDR_HOP: u8 = 0;
const NEXTHDR_ROUTING: u8 = 43;
const NEXTHDR_FRAGMENT: u8 = 44;
const NEXTHDR_DEST: u8 = 60;
const IPPROTO_TCP: u8 = 6;

/// Who sends the corpus to whom.
#[derive(Clone, Copy, Debug)]
pub struct Endpoints {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub src4: Ipv4Addr,
    pub dst4: Ipv4Addr,
    pub src6: Ipv6Addr,
    pub dst6: Ipv6Addr,
    pub port: u16,
}

/// One crafted SYN as it goes on the wire.
#[derive(Clone, Debug)]
pub struct Variant {
    pub name: String,
    pub v6: bool,
    /// Unique within a corpus: the server's SYN-ACK names the variant by its destination port.
    pub src_port: u16,
    /// Fragmented or not (the kernel reassembles these).
    pub fragmented: bool,
    /// Some fragment before the last one holds less than the whole 20-byte TCP header.
    pub tiny_first: bool,
    pub frames: Vec<Vec<u8>>,
}

/// The TCP header dimension.
struct TcpShape {
    name: &'static str,
    flags: u8,
    /// The low nibble of byte 12 (reserved bits, AE/NS among them).
    reserved: u8,
    options: Vec<u8>,
    payload: Vec<u8>,
}

fn mss(value: u16) -> Vec<u8> {
    let [hi, lo] = value.to_be_bytes();
    vec![2, 4, hi, lo]
}

fn linux_options() -> Vec<u8> {
    let mut o = mss(1460);
    o.extend_from_slice(&[4, 2, 8, 10, 0, 0, 0x12, 0x34, 0, 0, 0, 0, 1, 3, 3, 7]);
    o
}

fn tcp_shapes() -> Vec<TcpShape> {
    let shape = |name, flags, options: Vec<u8>| TcpShape {
        name,
        flags,
        reserved: 0,
        options,
        payload: Vec::new(),
    };
    let mut longest = mss(1460);
    longest.resize(40, 1); // NOPs to the largest data offset (15 words)
    let mut unknown = vec![253, 6, 0xde, 0xad, 0xbe, 0xef];
    unknown.extend(mss(1400));
    let mut bad_length = mss(1460);
    bad_length.extend_from_slice(&[8, 1, 0, 0]); // a timestamp option claiming 1 byte
    vec![
        shape("syn", TCP_SYN, Vec::new()),
        shape("syn+linux-options", TCP_SYN, linux_options()),
        shape("syn+ece+cwr", TCP_SYN | TCP_ECE | TCP_CWR, linux_options()),
        shape("syn+psh+urg", TCP_SYN | TCP_PSH | TCP_URG, mss(1460)),
        shape("syn+fin", TCP_SYN | TCP_FIN, Vec::new()),
        shape("syn+rst", TCP_SYN | TCP_RST, Vec::new()),
        shape("syn+ack", TCP_SYN | TCP_ACK, Vec::new()),
        TcpShape {
            payload: (0..24).collect(),
            ..shape("syn+data", TCP_SYN, mss(1460))
        },
        shape("syn+40-byte-options", TCP_SYN, longest),
        shape("syn+unknown-option", TCP_SYN, unknown),
        shape("syn+bad-option-length", TCP_SYN, bad_length),
        TcpShape {
            reserved: 0x0f,
            ..shape("syn+reserved-bits", TCP_SYN, mss(1460))
        },
    ]
}

/// The IPv4 dimension.
struct V4Extra {
    name: &'static str,
    tos: u8,
    dont_fragment: bool,
    ttl: u8,
    options: Vec<u8>,
}

fn v4_extras() -> Vec<V4Extra> {
    let extra = |name, options: Vec<u8>| V4Extra {
        name,
        tos: 0,
        dont_fragment: true,
        ttl: 64,
        options,
    };
    let mut record_route = vec![7, 11, 4];
    record_route.resize(12, 0);
    vec![
        extra("plain", Vec::new()),
        V4Extra {
            tos: 0x03,
            ..extra("ecn-ce", Vec::new())
        },
        V4Extra {
            tos: 0xb8 | 0x02,
            ..extra("dscp-ef+ect0", Vec::new())
        },
        V4Extra {
            dont_fragment: false,
            ttl: 1,
            ..extra("no-df+ttl-1", Vec::new())
        },
        extra("ip-options-nop", vec![1, 1, 1, 1]),
        extra("ip-option-router-alert", vec![0x94, 4, 0, 0]),
        extra("ip-option-record-route", record_route),
        extra(
            "ip-option-timestamp",
            vec![0x44, 12, 5, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        ),
        // The largest header: 40 bytes of options.
        extra("ip-options-40-bytes", vec![1; 40]),
    ]
}

/// One IPv6 extension header, its next-header byte filled in on assembly.
#[derive(Clone)]
struct Ext6 {
    kind: u8,
    bytes: Vec<u8>,
}

impl Ext6 {
    /// Hop-by-hop or destination options padded with PadN to `len8` 8-byte units.
    fn options(kind: u8, len8: usize) -> Self {
        let mut bytes = vec![0, (len8 - 1) as u8, 1, (len8 * 8 - 4) as u8];
        bytes.resize(len8 * 8, 0);
        Self { kind, bytes }
    }

    fn routing(kind: u8) -> Self {
        // Type `kind` with no segments left: processed and passed over.
        let mut bytes = vec![0, 2, kind, 0];
        bytes.resize(24, 0);
        Self {
            kind: NEXTHDR_ROUTING,
            bytes,
        }
    }

    fn fragment(offset: usize, more: bool, id: u32) -> Self {
        let field = ((offset / 8) as u16) << 3 | u16::from(more);
        let mut bytes = vec![0, 0];
        bytes.extend_from_slice(&field.to_be_bytes());
        bytes.extend_from_slice(&id.to_be_bytes());
        Self {
            kind: NEXTHDR_FRAGMENT,
            bytes,
        }
    }
}

/// The IPv6 dimension: headers before the fragment header (the unfragmentable part) and
/// after it (travelling inside the fragments).
struct V6Extra {
    name: &'static str,
    traffic_class: u8,
    flow_label: u32,
    unfragmentable: Vec<Ext6>,
    fragmentable: Vec<Ext6>,
}

fn v6_extras(id: u32) -> Vec<V6Extra> {
    let extra = |name, unfragmentable: Vec<Ext6>, fragmentable: Vec<Ext6>| V6Extra {
        name,
        traffic_class: 0,
        flow_label: 0,
        unfragmentable,
        fragmentable,
    };
    let dest = || Ext6::options(NEXTHDR_DEST, 1);
    vec![
        extra("plain", vec![], vec![]),
        V6Extra {
            traffic_class: 0x03,
            flow_label: 0xabcde,
            ..extra("ecn-ce+flow-label", vec![], vec![])
        },
        extra("hop-by-hop", vec![Ext6::options(NEXTHDR_HOP, 1)], vec![]),
        extra("dest-opts", vec![], vec![dest()]),
        extra(
            "dest-opts-64-bytes",
            vec![],
            vec![Ext6::options(NEXTHDR_DEST, 8)],
        ),
        extra(
            "hop-by-hop+dest-opts",
            vec![Ext6::options(NEXTHDR_HOP, 1)],
            vec![dest()],
        ),
        extra("routing-type-0", vec![Ext6::routing(0)], vec![]),
        extra("routing-type-4", vec![Ext6::routing(4)], vec![]),
        extra(
            "atomic-fragment",
            vec![],
            vec![Ext6::fragment(0, false, id)],
        ),
        extra("two-dest-opts", vec![], vec![dest(), dest()]),
        extra("seven-dest-opts", vec![], vec![dest(); 7]),
    ]
}

/// How a datagram reaches the server.
#[derive(Clone, Copy, Debug)]
enum Delivery {
    Whole,
    /// Fragments: the first holds `first` bytes of the fragmentable part, the rest follow in
    /// pieces of `chunk` bytes (`None`: one piece), sent in `order`.
    Split {
        first: usize,
        chunk: Option<usize>,
        order: Order,
    },
    /// The first fragment holds the whole TCP header, the rest in one piece, sent last first.
    HeaderFirstReversed,
    /// A first fragment with harmless flags (ACK), then one at offset 8 that rewrites them
    /// to the SYN (RFC 3128).
    Overlap,
    /// An 8-byte first fragment sent twice.
    DuplicateFirst,
}

#[derive(Clone, Copy, Debug)]
enum Order {
    Forward,
    Reverse,
    LastFirst,
    Shuffled(u64),
}

fn deliveries() -> Vec<Delivery> {
    use Delivery::*;
    use Order::*;
    vec![
        Whole,
        Split {
            first: 8,
            chunk: None,
            order: Forward,
        },
        Split {
            first: 8,
            chunk: None,
            order: Reverse,
        },
        Split {
            first: 16,
            chunk: None,
            order: Forward,
        },
        Split {
            first: 16,
            chunk: Some(8),
            order: LastFirst,
        },
        Split {
            first: 24,
            chunk: None,
            order: Forward,
        },
        Split {
            first: 8,
            chunk: Some(8),
            order: Shuffled(0x5eed),
        },
        HeaderFirstReversed,
        Overlap,
        DuplicateFirst,
    ]
}

impl Delivery {
    fn name(&self) -> String {
        match self {
            Self::Whole => "whole".into(),
            Self::Split {
                first,
                chunk,
                order,
            } => {
                let rest = chunk.map_or("rest".to_string(), |c| format!("{c}s"));
                format!("frag-{first}+{rest}-{order:?}").to_lowercase()
            }
            Self::HeaderFirstReversed => "frag-header-first-reversed".into(),
            Self::Overlap => "frag-overlap-rewrites-flags".into(),
            Self::DuplicateFirst => "frag-8-first-twice".into(),
        }
    }

    /// The byte ranges of the fragmentable part each frame carries, in sending order, with
    /// "more fragments" set on all but the piece that ends the datagram. `None` when the
    /// datagram is too short for this delivery.
    fn pieces(&self, len: usize, tcp_header: usize) -> Option<Vec<(usize, usize, bool)>> {
        let split = |cuts: Vec<usize>| -> Vec<(usize, usize, bool)> {
            let mut bounds = vec![0];
            bounds.extend(cuts.into_iter().filter(|c| *c > 0 && *c < len));
            bounds.push(len);
            bounds
                .windows(2)
                .map(|w| (w[0], w[1], w[1] != len))
                .collect()
        };
        match *self {
            Self::Whole => Some(vec![(0, len, false)]),
            Self::Split {
                first,
                chunk,
                order,
            } => {
                if first >= len {
                    return None;
                }
                let mut cuts = vec![first];
                if let Some(c) = chunk {
                    let mut at = first + c;
                    while at < len {
                        cuts.push(at);
                        at += c;
                    }
                }
                let mut p = split(cuts);
                match order {
                    Order::Forward => {}
                    Order::Reverse => p.reverse(),
                    Order::LastFirst => p.rotate_right(1),
                    Order::Shuffled(seed) => shuffle(&mut p, seed),
                }
                Some(p)
            }
            Self::HeaderFirstReversed => {
                let first = tcp_header.div_ceil(8) * 8;
                if first >= len {
                    return None;
                }
                let mut p = split(vec![first]);
                p.reverse();
                Some(p)
            }
            Self::Overlap => (len > 24).then(|| vec![(0, 24, true), (8, len, false)]),
            Self::DuplicateFirst => (len > 8).then(|| {
                let mut p = split(vec![8]);
                p.insert(1, p[0]);
                p
            }),
        }
    }
}

fn shuffle<T>(items: &mut [T], seed: u64) {
    let mut x = seed | 1;
    for i in (1..items.len()).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        items.swap(i, (x % (i as u64 + 1)) as usize);
    }
}

/// The TCP header and payload with its checksum over `pseudo` (the pseudo-header's sum).
fn tcp_segment(shape: &TcpShape, src_port: u16, port: u16, flags: u8, pseudo: &[u8]) -> Vec<u8> {
    let mut options = shape.options.clone();
    options.resize(options.len().div_ceil(4) * 4, 0);
    let mut t = Vec::new();
    t.extend_from_slice(&src_port.to_be_bytes());
    t.extend_from_slice(&port.to_be_bytes());
    t.extend_from_slice(
        &0x1000_0000u32
            .wrapping_add(u32::from(src_port))
            .to_be_bytes(),
    );
    t.extend_from_slice(&0u32.to_be_bytes());
    t.push((((20 + options.len()) / 4) as u8) << 4 | shape.reserved);
    t.push(flags);
    t.extend_from_slice(&64240u16.to_be_bytes());
    t.extend_from_slice(&[0, 0, 0, 0]);
    t.extend_from_slice(&options);
    t.extend_from_slice(&shape.payload);
    let mut sum_input = pseudo.to_vec();
    let len = t.len() as u32;
    if pseudo.len() == 8 {
        sum_input.extend_from_slice(&[0, IPPROTO_TCP]);
        sum_input.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        sum_input.extend_from_slice(&len.to_be_bytes());
        sum_input.extend_from_slice(&[0, 0, 0, IPPROTO_TCP]);
    }
    sum_input.extend_from_slice(&t);
    let sum = !ones_complement_sum(&sum_input, 0);
    t[16..18].copy_from_slice(&sum.to_be_bytes());
    t
}

/// The corpus, IPv4 variants then IPv6 ones, each family starting with the plain whole SYN.
/// Source ports run from `first_port`; IP IDs and fragment identifications from `id_base`, so
/// two corpora sent one after the other never share a reassembly queue.
pub fn corpus(ends: &Endpoints, first_port: u16, id_base: u32) -> Vec<Variant> {
    let mut out = Vec::new();
    let mut next_port = first_port;
    let shapes = tcp_shapes();
    let ethernet = |ethertype: u16| {
        let mut f = ends.dst_mac.to_vec();
        f.extend_from_slice(&ends.src_mac);
        f.extend_from_slice(&ethertype.to_be_bytes());
        f
    };
    for extra in v4_extras() {
        for shape in &shapes {
            for delivery in deliveries() {
                let id = id_base.wrapping_add(out.len() as u32) as u16;
                let sport = next_port;
                let mut pseudo = ends.src4.octets().to_vec();
                pseudo.extend_from_slice(&ends.dst4.octets());
                let tcp = tcp_segment(shape, sport, ends.port, shape.flags, &pseudo);
                let benign = tcp_segment(shape, sport, ends.port, TCP_ACK, &pseudo);
                let header_len = 20 + shape.options.len().div_ceil(4) * 4;
                let Some(pieces) = delivery.pieces(tcp.len(), header_len) else {
                    continue;
                };
                let overlap = matches!(delivery, Delivery::Overlap);
                let frames = pieces
                    .iter()
                    .enumerate()
                    .map(|(i, &(from, to, more))| {
                        // The overlap's first piece carries the harmless header.
                        let source = if overlap && i == 0 { &benign } else { &tcp };
                        let whole = matches!(delivery, Delivery::Whole);
                        let mut f = ethernet(0x0800);
                        f.extend(ipv4_header(ends, &extra, id, from, more, to - from, whole));
                        f.extend_from_slice(&source[from..to]);
                        f
                    })
                    .collect();
                out.push(variant(
                    format!("v4 {} {} {}", shape.name, extra.name, delivery.name()),
                    false,
                    sport,
                    (&pieces, 0),
                    frames,
                ));
                next_port += 1;
            }
        }
    }
    let v6_id_base = id_base.wrapping_add(out.len() as u32);
    for extra_index in 0..v6_extras(0).len() {
        for shape in &shapes {
            for delivery in deliveries() {
                let id = v6_id_base.wrapping_add(out.len() as u32);
                let extra = v6_extras(id).swap_remove(extra_index);
                let sport = next_port;
                let mut pseudo = ends.src6.octets().to_vec();
                pseudo.extend_from_slice(&ends.dst6.octets());
                let tcp = tcp_segment(shape, sport, ends.port, shape.flags, &pseudo);
                let benign = tcp_segment(shape, sport, ends.port, TCP_ACK, &pseudo);
                // The fragmentable part: the extension headers that travel inside the
                // fragments, then the segment.
                let inner = |segment: &[u8]| chain(&extra.fragmentable, IPPROTO_TCP, segment);
                let (part, benign_part) = (inner(&tcp), inner(&benign));
                let first_kind = extra.fragmentable.first().map_or(IPPROTO_TCP, |e| e.kind);
                let inner_headers = part.len() - tcp.len();
                let header_len = inner_headers + 20 + shape.options.len().div_ceil(4) * 4;
                let Some(pieces) = delivery.pieces(part.len(), header_len) else {
                    continue;
                };
                let whole = matches!(delivery, Delivery::Whole);
                let overlap = matches!(delivery, Delivery::Overlap);
                let frames = pieces
                    .iter()
                    .enumerate()
                    .map(|(i, &(from, to, more))| {
                        let source = if overlap && i == 0 {
                            &benign_part
                        } else {
                            &part
                        };
                        let mut headers = extra.unfragmentable.clone();
                        if !whole {
                            headers.push(Ext6::fragment(from, more, id));
                        }
                        let body = chain(&headers, first_kind, &source[from..to]);
                        let next = headers.first().map_or(first_kind, |e| e.kind);
                        let mut f = ethernet(0x86dd);
                        f.extend(ipv6_header(ends, &extra, next, body.len()));
                        f.extend(body);
                        f
                    })
                    .collect();
                out.push(variant(
                    format!("v6 {} {} {}", shape.name, extra.name, delivery.name()),
                    true,
                    sport,
                    (&pieces, inner_headers),
                    frames,
                ));
                next_port += 1;
            }
        }
    }
    out
}

/// `tcp_start`: where the TCP header begins in the fragmentable part.
fn variant(
    name: String,
    v6: bool,
    src_port: u16,
    (pieces, tcp_start): (&[(usize, usize, bool)], usize),
    frames: Vec<Vec<u8>>,
) -> Variant {
    // A first fragment that ends before byte 20 of the TCP header is tiny.
    let tiny_first = pieces
        .iter()
        .any(|&(from, to, more)| from == 0 && more && to < tcp_start + 20);
    Variant {
        name,
        v6,
        src_port,
        fragmented: pieces.len() > 1,
        tiny_first,
        frames,
    }
}

/// `headers` linked in order, the last pointing at `last_next`, followed by `payload`.
fn chain(headers: &[Ext6], last_next: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, h) in headers.iter().enumerate() {
        let mut bytes = h.bytes.clone();
        bytes[0] = headers.get(i + 1).map_or(last_next, |n| n.kind);
        out.extend(bytes);
    }
    out.extend_from_slice(payload);
    out
}

fn ipv4_header(
    ends: &Endpoints,
    extra: &V4Extra,
    id: u16,
    offset: usize,
    more: bool,
    payload_len: usize,
    whole: bool,
) -> Vec<u8> {
    // Options travel in the first fragment only; a later fragment's header needs none.
    let mut options = if offset == 0 || whole {
        extra.options.clone()
    } else {
        Vec::new()
    };
    options.resize(options.len().div_ceil(4) * 4, 0);
    let ihl = 20 + options.len();
    let mut h = vec![0x40 | (ihl / 4) as u8, extra.tos];
    h.extend_from_slice(&((ihl + payload_len) as u16).to_be_bytes());
    h.extend_from_slice(&id.to_be_bytes());
    let mut frag = (offset / 8) as u16;
    if more {
        frag |= 0x2000;
    }
    if extra.dont_fragment {
        frag |= 0x4000;
    }
    h.extend_from_slice(&frag.to_be_bytes());
    h.extend_from_slice(&[extra.ttl, IPPROTO_TCP, 0, 0]);
    h.extend_from_slice(&ends.src4.octets());
    h.extend_from_slice(&ends.dst4.octets());
    h.extend_from_slice(&options);
    let sum = !ones_complement_sum(&h, 0);
    h[10..12].copy_from_slice(&sum.to_be_bytes());
    h
}

fn ipv6_header(ends: &Endpoints, extra: &V6Extra, next: u8, payload_len: usize) -> Vec<u8> {
    let word = 6u32 << 28 | u32::from(extra.traffic_class) << 20 | extra.flow_label;
    let mut h = word.to_be_bytes().to_vec();
    h.extend_from_slice(&(payload_len as u16).to_be_bytes());
    h.extend_from_slice(&[next, 64]);
    h.extend_from_slice(&ends.src6.octets());
    h.extend_from_slice(&ends.dst6.octets());
    h
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frames::decode_tcp;

    fn ends() -> Endpoints {
        Endpoints {
            src_mac: [2, 0, 0, 0, 0, 3],
            dst_mac: [2, 0, 0, 0, 0, 1],
            src4: Ipv4Addr::new(198, 18, 0, 3),
            dst4: Ipv4Addr::new(198, 18, 0, 1),
            src6: "2001:2::3".parse().unwrap(),
            dst6: "2001:2::1".parse().unwrap(),
            port: 8080,
        }
    }

    /// Reassembles a variant's fragments the way a receiver would (for in-range pieces the
    /// last writer wins, which is enough to check the generator) into a whole frame.
    fn reassemble_v4(frames: &[Vec<u8>]) -> Vec<u8> {
        let mut data = vec![0u8; 0];
        let mut first_header = Vec::new();
        for f in frames {
            let ip = &f[14..];
            let ihl = usize::from(ip[0] & 0x0f) * 4;
            let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
            let offset = usize::from(u16::from_be_bytes([ip[6], ip[7]]) & 0x1fff) * 8;
            if offset == 0 {
                first_header = f[..14 + ihl].to_vec();
            }
            let piece = &ip[ihl..total];
            if data.len() < offset + piece.len() {
                data.resize(offset + piece.len(), 0);
            }
            data[offset..offset + piece.len()].copy_from_slice(piece);
        }
        let mut whole = first_header;
        let ihl = usize::from(whole[14] & 0x0f) * 4;
        whole[16..18].copy_from_slice(&((ihl + data.len()) as u16).to_be_bytes());
        whole[20..22].copy_from_slice(&[0x40, 0]);
        whole[24..26].copy_from_slice(&[0, 0]);
        let sum = !ones_complement_sum(&whole[14..14 + ihl], 0);
        whole[24..26].copy_from_slice(&sum.to_be_bytes());
        whole.extend(data);
        whole
    }

    #[test]
    fn every_variant_is_a_valid_syn_once_put_together() {
        let corpus = corpus(&ends(), 10_000, 0);
        assert!(corpus.len() > 1500, "{} variants", corpus.len());
        let ports: std::collections::HashSet<u16> = corpus.iter().map(|v| v.src_port).collect();
        assert_eq!(ports.len(), corpus.len(), "one source port per variant");
        assert_eq!(corpus[0].name, "v4 syn plain whole");
        let first_v6 = corpus.iter().find(|v| v.v6).unwrap();
        assert_eq!(first_v6.name, "v6 syn plain whole");
        for v in corpus.iter().filter(|v| !v.v6) {
            let overlap = v.name.contains("overlap");
            let frame = if v.fragmented {
                reassemble_v4(&v.frames)
            } else {
                v.frames[0].clone()
            };
            // The reference decoder refuses a bad option length (as a receiver's option
            // parser stops there); the rest of that header is checked all the same.
            let frame = if v.name.contains("bad-option-length") {
                let mut fixed = frame.clone();
                let ihl = usize::from(fixed[14] & 0x0f) * 4;
                let at = 14 + ihl + 20 + 4;
                assert_eq!(fixed[at..at + 2], [8, 1], "{}", v.name);
                // NOP NOP for the bad option keeps the checksum: same word sum.
                let old = u16::from_be_bytes([fixed[at], fixed[at + 1]]);
                fixed[at..at + 2].copy_from_slice(&[1, 1]);
                let sum_at = 14 + ihl + 16;
                let sum = u16::from_be_bytes([fixed[sum_at], fixed[sum_at + 1]]);
                // RFC 1624: HC' = ~(~HC + ~m + m')
                let updated = !ones_complement_sum(
                    &[
                        (!sum).to_be_bytes(),
                        (!old).to_be_bytes(),
                        0x0101u16.to_be_bytes(),
                    ]
                    .concat(),
                    0,
                );
                fixed[sum_at..sum_at + 2].copy_from_slice(&updated.to_be_bytes());
                fixed
            } else {
                frame
            };
            let seg = decode_tcp(&frame).unwrap_or_else(|| panic!("{}: decodes", v.name));
            assert!(seg.ip_checksum_ok, "{}", v.name);
            assert!(seg.tcp_checksum_ok, "{}", v.name);
            assert_eq!(seg.src_port, v.src_port);
            assert_eq!(seg.dst_port, 8080);
            assert!(seg.flags & TCP_SYN != 0 || overlap, "{}", v.name);
            for f in &v.frames {
                let ip = &f[14..];
                let ihl = usize::from(ip[0] & 0x0f) * 4;
                assert_eq!(ones_complement_sum(&ip[..ihl], 0), 0xffff, "{}", v.name);
                assert_eq!(
                    usize::from(u16::from_be_bytes([ip[2], ip[3]])),
                    ip.len(),
                    "{}: total length",
                    v.name
                );
            }
        }
        let whole_v6 = corpus
            .iter()
            .filter(|v| v.v6 && !v.fragmented && !v.name.contains("dest-opts"))
            .filter(|v| !v.name.contains("hop-by-hop") && !v.name.contains("routing"))
            .filter(|v| !v.name.contains("atomic") && !v.name.contains("bad-option"));
        for v in whole_v6 {
            let seg = decode_tcp(&v.frames[0]).unwrap_or_else(|| panic!("{}", v.name));
            assert!(seg.tcp_checksum_ok, "{}", v.name);
        }
    }

    #[test]
    fn deliveries_cover_the_datagram_exactly_once_bar_the_overlaps() {
        for d in deliveries() {
            let Some(pieces) = d.pieces(44, 40) else {
                panic!("{d:?} fits 44 bytes")
            };
            let mut covered = [0u8; 44];
            for (from, to, _) in &pieces {
                assert!(from % 8 == 0, "{d:?}: offsets are 8-byte units");
                for c in &mut covered[*from..*to] {
                    *c += 1;
                }
            }
            let ends_once = pieces.iter().filter(|p| !p.2).count();
            assert_eq!(ends_once, 1, "{d:?}: one piece ends the datagram");
            let max = *covered.iter().max().unwrap();
            match d {
                Delivery::Overlap | Delivery::DuplicateFirst => assert_eq!(max, 2, "{d:?}"),
                _ => assert_eq!(max, 1, "{d:?}"),
            }
            assert!(covered.iter().all(|c| *c >= 1), "{d:?}: no hole");
        }
        let tiny = corpus(&ends(), 1, 0)
            .into_iter()
            .filter(|v| v.tiny_first)
            .count();
        assert!(tiny > 200, "{tiny} tiny-first variants");
    }
}
