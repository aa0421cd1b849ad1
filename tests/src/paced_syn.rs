//! A SYN flood at a truly fixed rate: one frame every `1/rate` seconds, from a raw packet
//! socket, for `lab-client syn-flood`.
//!
//! trafgen's `-b RATE` is a per-second budget, not a pace: it sends a second's worth of frames
//! as fast as it can, then sleeps out the second (measured here: `-b 100000pps` sent each
//! second's 100 000 SYNs in ~0.22 s, ~450k/s, then nothing for ~0.78 s; `-b 3000pps` sent its
//! 3 000 in one burst). A receiver then sees bursts at the sender's full speed, which overflow
//! a veth's 256-frame ring whenever its packet thread is slower per frame than the sender, and
//! the "fixed rate" measures burst absorption instead of cost per SYN. Its gap mode (`-t`)
//! sleeps per frame and tops out near 35k/s here. This sender spins to each frame's due time
//! (the attacker's core is its own) and reports how late it ever was.

use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{ensure, Result};

use crate::packet_socket::PacketSocket;
use crate::report::SynFloodReport;
use crate::wire::{ensure_lab_ip, v4_in, LAB_V4_NET};

const ETH_LEN: usize = 14;
const IP_LEN: usize = 20;
const TCP_LEN: usize = 20;
/// Ethernet + IPv4 + TCP, no options: what trafgen's SYN config sends too.
pub const FRAME_LEN: usize = ETH_LEN + IP_LEN + TCP_LEN;

/// What to send.
#[derive(Debug, Clone)]
pub struct SynSpec {
    /// Sources are drawn uniformly from this network (a /32 is one fixed source).
    pub src_net: (Ipv4Addr, u8),
    pub dst: Ipv4Addr,
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub port: u16,
}

/// Builds SYN frames with random source (inside the network), IP ID, source port and
/// sequence number, and correct checksums.
pub struct SynFrames {
    frame: [u8; FRAME_LEN],
    net: u32,
    host_mask: u32,
    rng: u64,
}

impl SynFrames {
    pub fn new(spec: &SynSpec, seed: u64) -> Result<Self> {
        let (net, prefix) = spec.src_net;
        ensure!(prefix <= 32, "prefix /{prefix} is longer than 32 bits");
        ensure!(
            prefix >= LAB_V4_NET.1 && v4_in(net, LAB_V4_NET.0, LAB_V4_NET.1),
            "source network {net}/{prefix} is not inside 198.18.0.0/15"
        );
        ensure_lab_ip(spec.dst.into())?;
        ensure!(spec.port != 0, "port 0 is not a target");
        let host_mask = u32::MAX.checked_shr(u32::from(prefix)).unwrap_or(0);
        let mut frame = [0u8; FRAME_LEN];
        frame[0..6].copy_from_slice(&spec.dst_mac);
        frame[6..12].copy_from_slice(&spec.src_mac);
        frame[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
        let ip = &mut frame[ETH_LEN..ETH_LEN + IP_LEN];
        ip[0] = 0x45;
        ip[2..4].copy_from_slice(&((IP_LEN + TCP_LEN) as u16).to_be_bytes());
        ip[6..8].copy_from_slice(&0x4000u16.to_be_bytes()); // DF
        ip[8] = 64;
        ip[9] = 6;
        ip[16..20].copy_from_slice(&spec.dst.octets());
        let tcp = &mut frame[ETH_LEN + IP_LEN..];
        tcp[2..4].copy_from_slice(&spec.port.to_be_bytes());
        tcp[12] = 0x50; // data offset 5
        tcp[13] = 0x02; // SYN
        tcp[14..16].copy_from_slice(&64240u16.to_be_bytes());
        Ok(Self {
            frame,
            net: u32::from(net) & !host_mask,
            host_mask,
            // xorshift must not start at 0.
            rng: seed | 1,
        })
    }

    fn random(&mut self) -> u64 {
        let mut x = self.rng;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.rng = x;
        x
    }

    /// The next frame.
    pub fn next_frame(&mut self) -> &[u8; FRAME_LEN] {
        let r = self.random();
        let src = self.net | (r as u32 & self.host_mask);
        let id = (r >> 32) as u16;
        let sport = ((r >> 48) as u16) | 1024;
        let seq = self.random() as u32;
        let (ip, tcp) = self.frame[ETH_LEN..].split_at_mut(IP_LEN);
        ip[4..6].copy_from_slice(&id.to_be_bytes());
        ip[12..16].copy_from_slice(&src.to_be_bytes());
        ip[10..12].copy_from_slice(&[0, 0]);
        let sum = !fold(add_words(0, ip));
        ip[10..12].copy_from_slice(&sum.to_be_bytes());
        tcp[0..2].copy_from_slice(&sport.to_be_bytes());
        tcp[4..8].copy_from_slice(&seq.to_be_bytes());
        tcp[16..18].copy_from_slice(&[0, 0]);
        // Pseudo-header: source, destination, zero + protocol, TCP length.
        let mut acc = add_words(0, &ip[12..20]);
        acc += 6 + TCP_LEN as u32;
        let sum = !fold(add_words(acc, tcp));
        tcp[16..18].copy_from_slice(&sum.to_be_bytes());
        &self.frame
    }
}

/// Adds big-endian 16-bit words (the data has even length here) to a ones'-complement
/// accumulator.
fn add_words(mut acc: u32, data: &[u8]) -> u32 {
    for w in data.chunks_exact(2) {
        acc += u32::from(u16::from_be_bytes([w[0], w[1]]));
    }
    acc
}

fn fold(mut acc: u32) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

/// How far ahead of a frame's due time the sender sleeps instead of spinning: sleeps overshoot
/// by tens of microseconds.
const SPIN_WINDOW: Duration = Duration::from_micros(300);
/// A frame this late counts as part of a burst the sender could not avoid.
const LATE: Duration = Duration::from_millis(1);

/// Sends `rate` SYNs per second, evenly spaced, for `secs` seconds or until `stop` is set.
pub fn send(
    iface: &str,
    spec: &SynSpec,
    rate: u32,
    secs: u32,
    stop: &AtomicBool,
) -> Result<SynFloodReport> {
    ensure!(rate > 0, "rate must be at least 1 SYN/s");
    let socket = PacketSocket::sender(iface)?;
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
        ^ u64::from(std::process::id());
    let mut frames = SynFrames::new(spec, seed.wrapping_mul(0x9e37_79b9_7f4a_7c15))?;
    let count = u64::from(rate) * u64::from(secs);
    let mut report = SynFloodReport {
        cmd: "syn-flood".into(),
        ..Default::default()
    };
    let start = Instant::now();
    let mut next = 0u64;
    while next < count && !stop.load(Ordering::Relaxed) {
        let due = start
            + Duration::from_nanos((u128::from(next) * 1_000_000_000 / u128::from(rate)) as u64);
        let now = Instant::now();
        if now < due {
            let ahead = due - now;
            if ahead > SPIN_WINDOW {
                std::thread::sleep(ahead - SPIN_WINDOW / 2);
            } else {
                std::hint::spin_loop();
            }
            continue;
        }
        let late = now - due;
        report.late_max_us = report.late_max_us.max(late.as_micros() as u64);
        if late > LATE {
            report.late_frames += 1;
        }
        if socket.send(frames.next_frame())? {
            report.sent += 1;
        } else {
            report.no_room += 1;
        }
        next += 1;
    }
    report.elapsed_ms = start.elapsed().as_millis() as u64;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(net: (Ipv4Addr, u8)) -> SynSpec {
        SynSpec {
            src_net: net,
            dst: Ipv4Addr::new(198, 18, 0, 1),
            src_mac: [2, 0, 0, 0, 0, 3],
            dst_mac: [2, 0, 0, 0, 0, 1],
            port: 8080,
        }
    }

    /// RFC 1071: summing a header with its checksum in place gives 0xffff.
    fn verifies(data: &[u8], pseudo: u32) -> bool {
        fold(add_words(pseudo, data)) == 0xffff
    }

    #[test]
    fn frames_are_valid_syns_from_inside_the_network() {
        let mut f = SynFrames::new(&spec((Ipv4Addr::new(198, 19, 0, 0), 16)), 42).unwrap();
        let mut sources = std::collections::HashSet::new();
        for _ in 0..1000 {
            let frame = *f.next_frame();
            let ip = &frame[ETH_LEN..ETH_LEN + IP_LEN];
            let tcp = &frame[ETH_LEN + IP_LEN..];
            assert!(verifies(ip, 0), "IPv4 header checksum");
            let pseudo = add_words(0, &ip[12..20]) + 6 + TCP_LEN as u32;
            assert!(verifies(tcp, pseudo), "TCP checksum");
            let src = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
            assert!(v4_in(src, Ipv4Addr::new(198, 19, 0, 0), 16), "{src}");
            assert_eq!(&ip[16..20], &[198, 18, 0, 1]);
            assert_eq!(u16::from_be_bytes([tcp[2], tcp[3]]), 8080);
            assert_eq!(tcp[13], 0x02, "SYN only");
            sources.insert(src);
        }
        assert!(
            sources.len() > 900,
            "sources should vary: {}",
            sources.len()
        );
        // A /32 is one source.
        let mut one = SynFrames::new(&spec((Ipv4Addr::new(198, 19, 0, 7), 32)), 7).unwrap();
        for _ in 0..10 {
            assert_eq!(&one.next_frame()[26..30], &[198, 19, 0, 7]);
        }
    }

    #[test]
    fn refuses_targets_outside_the_lab() {
        assert!(SynFrames::new(&spec((Ipv4Addr::new(10, 0, 0, 0), 16)), 1).is_err());
        assert!(SynFrames::new(&spec((Ipv4Addr::new(198, 18, 0, 0), 8)), 1).is_err());
        let mut s = spec((Ipv4Addr::new(198, 19, 0, 0), 16));
        s.dst = Ipv4Addr::new(8, 8, 8, 8);
        assert!(SynFrames::new(&s, 1).is_err());
        s.dst = Ipv4Addr::new(198, 18, 0, 1);
        s.port = 0;
        assert!(SynFrames::new(&s, 1).is_err());
    }
}
