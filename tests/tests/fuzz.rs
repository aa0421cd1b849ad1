//! The parser fuzzed: random mutations of real SYNs (the whole evasion corpus, VLAN-tagged
//! frames, every extension header) go through the real program with `BPF_PROG_TEST_RUN`,
//! twice each, under a cap of one SYN per source. The host-side reference decoder
//! (`guard_tests::reference`, written from the kernel's rules) says what each frame is; the
//! program must never crash or answer with an action it does not use, and must never pass
//! a second copy of what the reference calls a protected SYN, nor any copy of a fragment
//! that hides or rewrites a TCP header. With cookies on, every SYN-ACK it builds must be a
//! well-formed one.
//!
//! `GUARD_FUZZ_FRAMES` (default 100 000 per phase) and `GUARD_FUZZ_SEED` (default fixed, so
//! CI is repeatable; a failure prints the seed and the frame) tune a run. Root.

use std::collections::BTreeMap;

use guard_tests::evasion::{corpus, Endpoints};
use guard_tests::frames::{arp, decode_tcp, v4, v6, Ext, Frame, TCP_ACK, TCP_SYN};
use guard_tests::reference::{judge, Judged};
use guard_tests::require_root;
use guard_tests::testdp::{Dp, XdpOutcome, PORT};
use guard_user::testrun::{TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT};

/// tcx's "next program": what the cookie-reply check returns for everything it lets by.
const TCX_NEXT: u32 = u32::MAX;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn byte(&mut self) -> u8 {
        self.next() as u8
    }
}

/// (whole datagrams, everything): mutations of whole SYNs are what most often stay SYNs.
fn seeds() -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
    let ends = Endpoints {
        src_mac: [2, 0, 0, 0, 0, 3],
        dst_mac: [2, 0, 0, 0, 0, 1],
        src4: "198.18.0.3".parse().unwrap(),
        dst4: "198.18.0.1".parse().unwrap(),
        src6: "2001:2::3".parse().unwrap(),
        dst6: "2001:2::1".parse().unwrap(),
        port: PORT,
    };
    let variants = corpus(&ends, 10_000, 0);
    let mut whole: Vec<Vec<u8>> = variants
        .iter()
        .filter(|v| !v.fragmented)
        .flat_map(|v| v.frames.clone())
        .collect();
    let mut out: Vec<Vec<u8>> = variants.into_iter().flat_map(|v| v.frames).collect();
    for src in [v4(198, 18, 0, 3), v6("2001:2::3")] {
        let syn = || Frame::syn(src, PORT).linux_syn_options(1460, 5, 7);
        out.push(syn().bytes());
        out.push(syn().vlan(false).bytes());
        out.push(syn().vlan(true).vlan(false).bytes());
        out.push(syn().tcp_flags(TCP_ACK).tcp_seq_ack(7, 0x1234_5678).bytes());
        out.push(syn().tcp_payload(&[0x55; 32]).bytes());
        out.push(syn().udp(PORT).bytes());
        out.push(syn().icmp().bytes());
    }
    for ext in [
        Ext::HopByHop,
        Ext::Routing,
        Ext::DestOpts,
        Ext::Auth,
        Ext::Fragment {
            offset: 0,
            more: true,
        },
        Ext::Fragment {
            offset: 1,
            more: false,
        },
    ] {
        out.push(Frame::syn(v6("2001:2::3"), PORT).ext(ext).bytes());
        out.push(
            Frame::syn(v6("2001:2::3"), PORT)
                .ext(ext)
                .ext(Ext::DestOpts)
                .vlan(false)
                .bytes(),
        );
    }
    out.push(arp());
    whole.extend(out.iter().filter(|f| judge(f) != Judged::Other).cloned());
    (whole, out)
}

/// Where the IP header would start, looking through up to two tags.
fn l3_of(f: &[u8]) -> usize {
    let mut at = 12;
    for _ in 0..2 {
        match f.get(at..at + 2) {
            Some([0x81, 0x00]) | Some([0x88, 0xa8]) => at += 4,
            _ => break,
        }
    }
    at + 2
}

const BYTES: [u8; 20] = [
    0, 1, 2, 4, 5, 6, 8, 0x0f, 0x10, 0x12, 0x20, 0x2c, 0x33, 0x3b, 0x40, 0x45, 0x50, 0x60, 0x80,
    0xff,
];
const WORDS: [u16; 12] = [
    0, 1, 8, 20, 28, 40, 0x0800, 0x86dd, 0x8100, 0x2000, PORT, 0xffff,
];

fn set(f: &mut [u8], at: usize, v: u8) {
    if let Some(b) = f.get_mut(at) {
        *b = v;
    }
}

fn set16(f: &mut [u8], at: usize, v: u16) {
    if at + 2 <= f.len() {
        f[at..at + 2].copy_from_slice(&v.to_be_bytes());
    }
}

fn mutate(rng: &mut Rng, seed: &[u8]) -> Vec<u8> {
    let mut f = seed.to_vec();
    for _ in 0..=rng.below(3) {
        let len = f.len().max(1);
        match rng.below(9) {
            0 => {
                let at = rng.below(len);
                let bit = rng.below(8);
                if let Some(b) = f.get_mut(at) {
                    *b ^= 1 << bit;
                }
            }
            1 => {
                let at = rng.below(len);
                let v = if rng.below(2) == 0 {
                    BYTES[rng.below(BYTES.len())]
                } else {
                    rng.byte()
                };
                set(&mut f, at, v);
            }
            2 => f.truncate(rng.below(len + 1)),
            3 => {
                for _ in 0..=rng.below(64) {
                    f.push(rng.byte());
                }
            }
            4 | 5 => {
                // A header field the parser branches on, set to an edge value.
                let l3 = l3_of(&f);
                let v6 = f.get(l3).is_some_and(|b| b >> 4 == 6);
                let field = rng.below(8);
                let byte = BYTES[rng.below(BYTES.len())];
                let word = WORDS[rng.below(WORDS.len())].wrapping_add(rng.below(3) as u16);
                let l4 = if v6 {
                    l3 + 40
                } else {
                    l3 + usize::from(f.get(l3).map_or(5, |b| b & 0x0f)) * 4
                };
                match (v6, field) {
                    (false, 0) => set(&mut f, l3, 0x40 | (byte & 0x0f)),
                    (false, 1) => set16(&mut f, l3 + 2, word),
                    (false, 2) => set16(&mut f, l3 + 6, word),
                    (false, 3) => set(&mut f, l3 + 9, byte),
                    (true, 0) => set16(&mut f, l3 + 4, word),
                    (true, 1) => set(&mut f, l3 + 6, byte),
                    (true, 2) => set(&mut f, l3 + 40, byte),
                    (true, 3) => set(&mut f, l3 + 41, byte),
                    (_, 4) => set(&mut f, l4 + 12, byte),
                    (_, 5) => set(&mut f, l4 + 13, byte),
                    (_, 6) => set16(&mut f, l4 + 2, word),
                    _ => set16(&mut f, l3 + 42, word),
                }
            }
            6 => {
                let at = rng.below(len).min(f.len());
                let tag = [[0x81, 0x00, 0, 100], [0x88, 0xa8, 0, 100]][rng.below(2)];
                let at = if rng.below(2) == 0 {
                    12.min(f.len())
                } else {
                    at
                };
                f.splice(at..at, tag);
            }
            7 => {
                let from = rng.below(len).min(f.len());
                let to = (from + 1 + rng.below(16)).min(f.len());
                f.drain(from..to);
            }
            _ => {
                let at = rng.below(len);
                set16(&mut f, at, WORDS[rng.below(WORDS.len())]);
            }
        }
    }
    f
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Kind {
    ProtectedSyn,
    OtherSyn,
    Evasive,
    Other,
}

fn kind(j: &Judged) -> Kind {
    match j {
        Judged::Syn { dst_port, .. } if *dst_port == PORT => Kind::ProtectedSyn,
        Judged::Syn { .. } => Kind::OtherSyn,
        Judged::TinyFirstFragment { dst_port, .. } if dst_port.is_none_or(|p| p == PORT) => {
            Kind::Evasive
        }
        Judged::OverlapFragment { .. } => Kind::Evasive,
        _ => Kind::Other,
    }
}

fn settings() -> (u64, usize) {
    let seed = std::env::var("GUARD_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x6775_6172_645f_667a);
    let frames = std::env::var("GUARD_FUZZ_FRAMES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(100_000);
    (seed, frames)
}

/// A SYN-ACK the program built must be one a client can take.
fn check_synack(out: &[u8], input: &[u8], what: &str) {
    let seg = decode_tcp(out).unwrap_or_else(|| {
        panic!("{what}: the SYN-ACK does not decode: {out:02x?} from {input:02x?}")
    });
    assert_eq!(seg.flags, TCP_SYN | TCP_ACK, "{what}: {seg:?}");
    assert_eq!(seg.src_port, PORT, "{what}: {seg:?}");
    assert!(
        seg.ip_checksum_ok && seg.tcp_checksum_ok,
        "{what}: checksums {seg:?}"
    );
    assert!(seg.mss().is_some(), "{what}: an MSS is always offered");
}

fn fuzz(dp: &Dp, cookies: bool) -> BTreeMap<Kind, usize> {
    let (seed, n) = settings();
    let (whole, seeds) = seeds();
    let mut rng =
        Rng(seed.wrapping_add(u64::from(cookies).wrapping_mul(0x9e37_79b9_7f4a_7c15)) | 1);
    let mut kinds = BTreeMap::new();
    let mut untestable_in_tc = 0usize;
    for i in 0..n {
        let pool = if rng.below(2) == 0 { &whole } else { &seeds };
        let pick = rng.below(pool.len());
        let frame = mutate(&mut rng, &pool[pick]);
        // Both attaches refuse test frames shorter than an Ethernet header; the kernel never
        // hands them one.
        if frame.len() < 14 {
            continue;
        }
        let judged = judge(&frame);
        let k = kind(&judged);
        *kinds.entry(k).or_insert(0) += 1;
        let what =
            format!("frame {i} (seed {seed}, cookies {cookies}) judged {judged:?}: {frame:02x?}");
        let xdp = [dp.run_xdp(&frame), dp.run_xdp(&frame)];
        for out in &xdp {
            if let XdpOutcome::Tx(out) = out {
                assert!(cookies, "{what}: XDP_TX without cookies");
                check_synack(out, &frame, &what);
            }
        }
        match k {
            Kind::ProtectedSyn => {
                // The token went to the first copy (or to an earlier frame of the source);
                // the second is over the cap, or answered statelessly.
                assert_ne!(xdp[1], XdpOutcome::Pass, "{what}: XDP passed it twice");
            }
            Kind::Evasive => assert!(
                xdp.iter().all(|o| *o == XdpOutcome::Drop),
                "{what}: XDP let it by: {xdp:?}"
            ),
            Kind::OtherSyn | Kind::Other => {}
        }
        if let Some(reply) = dp.try_run_cookie_ack(&frame) {
            assert!(
                reply == TCX_NEXT || reply == TC_ACT_SHOT,
                "{what}: cookie-reply action {reply}"
            );
        }
        // The kernel builds a test skb only from frames whose IP header is all there; the
        // rest reach tc in real life but cannot be tested there (XDP took them above).
        let Some(tc_first) = dp.try_run_tc_frame(&frame) else {
            untestable_in_tc += 1;
            continue;
        };
        let tc = [tc_first, dp.run_tc_frame(&frame)];
        for (action, out) in &tc {
            match *action {
                TC_ACT_OK | TC_ACT_SHOT => {}
                TC_ACT_REDIRECT if cookies => check_synack(out, &frame, &what),
                other => panic!("{what}: tc action {other}"),
            }
        }
        match k {
            // XDP spent the source's token already: tc must not pass either copy.
            Kind::ProtectedSyn => assert!(
                tc.iter().all(|(a, _)| *a != TC_ACT_OK),
                "{what}: tc passed it after XDP took the token"
            ),
            Kind::Evasive => assert!(
                tc.iter().all(|(a, _)| *a == TC_ACT_SHOT),
                "{what}: tc let it by"
            ),
            Kind::OtherSyn | Kind::Other => {}
        }
    }
    println!("{untestable_in_tc} frames the kernel would not test-run in tc (checked in XDP only)");
    kinds
}

fn capped_dp() -> Dp {
    let mut dp = Dp::new();
    dp.config(|c| {
        c.syn_rate = 0;
        c.syn_burst = 1;
    });
    dp
}

fn assert_coverage(kinds: &BTreeMap<Kind, usize>, what: &str) {
    println!("{what}: {kinds:?}");
    let (_, n) = settings();
    // The run means something only if every kind came up often.
    for (k, share) in [
        (Kind::ProtectedSyn, 50),
        (Kind::Evasive, 100),
        (Kind::Other, 5),
    ] {
        let got = kinds.get(&k).copied().unwrap_or(0);
        assert!(got >= n / share, "{what}: only {got} frames of kind {k:?}");
    }
}

#[test]
fn mutated_frames_never_crash_and_never_pass_a_capped_syn() {
    if !require_root("mutated_frames_never_crash_and_never_pass_a_capped_syn") {
        return;
    }
    let dp = capped_dp();
    let kinds = fuzz(&dp, false);
    assert_coverage(&kinds, "cookies off");
}

#[test]
fn with_cookies_every_answer_is_a_well_formed_synack() {
    if !require_root("with_cookies_every_answer_is_a_well_formed_synack") {
        return;
    }
    let mut dp = Dp::with_cookies();
    dp.config(|c| {
        c.syn_rate = 0;
        c.syn_burst = 1;
    });
    let kinds = fuzz(&dp, true);
    assert_coverage(&kinds, "cookies always");
}
