//! The differential evasion corpus on the wire: every generated SYN variant
//! (`guard_tests::evasion`) is first sent to an unguarded server, and the variants its TCP
//! answers with a SYN-ACK are the ones the kernel accepts. Then the corpus goes again with
//! guard at a cap of one SYN per source that never refills, in each attach mode: per family
//! exactly one variant may then get an answer (the plain SYN sent first spends the token), so
//! any other the kernel accepts would be a SYN that passed uncounted.
//!
//! Root, one test at a time (they share bpffs): `cargo xtask test evasion`.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use guard_common::stats::Stat;
use guard_tests::agent::{AgentHome, RunOpts};
use guard_tests::evasion::{corpus, Endpoints, Variant};
use guard_tests::frames::{decode_tcp, TCP_ACK, TCP_SYN};
use guard_tests::lab::{
    Lab, ATTACKER_MAC, ATTACKER_V4, ATTACKER_V6, ROLE_IF, SERVER_MAC, SERVER_V4, SERVER_V6,
};
use guard_tests::packet_socket::PacketSocket;
use guard_tests::require_root;

const PORT: u16 = 8080;
/// A port nobody listens on, for the neighbour warm-up.
const CLOSED_PORT: u16 = 9;

fn endpoints() -> Endpoints {
    Endpoints {
        src_mac: ATTACKER_MAC,
        dst_mac: SERVER_MAC,
        src4: ATTACKER_V4,
        dst4: SERVER_V4,
        src6: ATTACKER_V6,
        dst6: SERVER_V6,
        port: PORT,
    }
}

/// Sends the corpus from the attacker and returns the indices of the variants the server
/// answered with a SYN-ACK (seen leaving the server's interface).
fn answered(lab: &Lab, variants: &[Variant]) -> BTreeSet<usize> {
    // Both families' neighbours resolved beforehand, so no SYN-ACK waits on (or is lost to)
    // address resolution. The closed port is outside guard's protection.
    for ip in [IpAddr::from(SERVER_V4), IpAddr::from(SERVER_V6)] {
        let to = SocketAddr::new(ip, CLOSED_PORT);
        let _ = lab
            .attacker
            .run_in(|| TcpStream::connect_timeout(&to, Duration::from_secs(2)));
    }
    let sniffer = lab
        .server
        .run_in(|| PacketSocket::sniffer(ROLE_IF))
        .expect("enter the server namespace")
        .expect("sniff the server's interface");
    let sender = lab
        .attacker
        .run_in(|| PacketSocket::sender(ROLE_IF))
        .expect("enter the attacker namespace")
        .expect("a packet socket on the attacker's interface");
    let done = AtomicBool::new(false);
    let first_port = variants[0].src_port;
    std::thread::scope(|scope| {
        let seen = scope.spawn(|| {
            let mut ports = BTreeSet::new();
            loop {
                match sniffer.recv(Duration::from_millis(200)).expect("sniff") {
                    Some(s) if s.outgoing => {
                        if let Some(seg) = decode_tcp(&s.frame) {
                            let synack = seg.flags & (TCP_SYN | TCP_ACK) == TCP_SYN | TCP_ACK;
                            if synack && seg.src_port == PORT {
                                ports.insert(seg.dst_port);
                            }
                        }
                    }
                    Some(_) => {}
                    None if done.load(Ordering::Relaxed) => break ports,
                    None => {}
                }
            }
        });
        for v in variants {
            for frame in &v.frames {
                // A full device queue is retried: every frame of the corpus must go out.
                let mut tries = 0;
                while !sender.send(frame).expect("send a corpus frame") {
                    tries += 1;
                    assert!(tries < 1000, "the attacker's interface stays full");
                    std::thread::sleep(Duration::from_micros(100));
                }
            }
            // Paced so the listener's SYN queue and the attacker's RSTs keep up.
            std::thread::sleep(Duration::from_micros(200));
        }
        std::thread::sleep(Duration::from_millis(500));
        done.store(true, Ordering::Relaxed);
        let ports = seen.join().expect("the sniffer thread");
        ports
            .into_iter()
            .filter_map(|p| p.checked_sub(first_port))
            .map(usize::from)
            .filter(|i| *i < variants.len())
            .collect()
    })
}

fn names(variants: &[Variant], picked: &BTreeSet<usize>, v6: bool) -> Vec<String> {
    picked
        .iter()
        .map(|i| &variants[*i])
        .filter(|v| v.v6 == v6)
        .map(|v| v.name.clone())
        .collect()
}

fn stat(home: &AgentHome, s: Stat) -> u64 {
    home.pins()
        .maps()
        .and_then(|m| m.stat(s).map_err(anyhow::Error::from))
        .unwrap_or_else(|e| panic!("read {}: {e:#}", s.name()))
}

#[test]
fn every_syn_variant_the_kernel_accepts_is_capped() {
    if !require_root("every_syn_variant_the_kernel_accepts_is_capped") {
        return;
    }
    let lab = Lab::new().expect("build the lab");
    // A real backlog: nothing here may be refused for want of room (the attacker's kernel
    // resets every answered SYN anyway).
    let listeners: Vec<TcpListener> = [IpAddr::from(SERVER_V4), IpAddr::from(SERVER_V6)]
        .into_iter()
        .map(|ip| {
            lab.server
                .run_in(|| TcpListener::bind(SocketAddr::new(ip, PORT)))
                .expect("enter the server namespace")
                .expect("listen")
        })
        .collect();

    // Unguarded: what the kernel accepts.
    let baseline = corpus(&endpoints(), 10_000, 0);
    let accepted = answered(&lab, &baseline);
    let accepted_v4 = names(&baseline, &accepted, false);
    let accepted_v6 = names(&baseline, &accepted, true);
    println!(
        "corpus: {} variants ({} IPv4, {} IPv6); the unguarded kernel answered {} ({} IPv4, {} IPv6)",
        baseline.len(),
        baseline.iter().filter(|v| !v.v6).count(),
        baseline.iter().filter(|v| v.v6).count(),
        accepted.len(),
        accepted_v4.len(),
        accepted_v6.len(),
    );
    // The corpus has teeth: the plain SYNs get in, and so do the fragment tricks that went
    // past every limit before guard judged fragments (a tiny first fragment, in order and
    // reversed).
    for must in [
        "v4 syn plain whole",
        "v6 syn plain whole",
        "v4 syn plain frag-8+rest-forward",
        "v4 syn plain frag-8+rest-reverse",
        "v4 syn+linux-options plain frag-16+8s-lastfirst",
    ] {
        assert!(
            accepted_v4.iter().chain(&accepted_v6).any(|n| n == must),
            "the unguarded kernel should accept {must:?}; it accepted {accepted_v4:?} {accepted_v6:?}"
        );
    }
    let tiny_accepted = accepted.iter().filter(|i| baseline[**i].tiny_first).count();
    assert!(
        tiny_accepted > 10,
        "tiny first fragments accepted: {tiny_accepted}"
    );

    for (round, mode) in ["xdp-native", "xdp-generic", "tc"].into_iter().enumerate() {
        let home = AgentHome::new().expect("agent home");
        let agent = home
            .start(
                &lab.server,
                &RunOpts::new(ROLE_IF, PORT)
                    .attach(mode)
                    .set("syn_rate=0")
                    .set("syn_burst=1"),
            )
            .unwrap_or_else(|e| panic!("{mode}: start the agent: {e:#}"));
        // Fresh ports and IDs: no reassembly queue or connection of an earlier round is hit.
        let first_port = 20_000 + 3_000 * round as u16;
        let guarded_corpus = corpus(&endpoints(), first_port, 0x8000 * (round as u32 + 1));
        let passed = answered(&lab, &guarded_corpus);
        for v6 in [false, true] {
            let got = names(&guarded_corpus, &passed, v6);
            let plain = if v6 {
                "v6 syn plain whole"
            } else {
                "v4 syn plain whole"
            };
            assert!(
                got.len() <= 1 && got.iter().all(|n| n == plain),
                "{mode}: with a cap of one SYN only {plain:?} may be answered; these passed \
                 uncounted: {got:?}"
            );
            assert_eq!(got.len(), 1, "{mode}: the first SYN is within the cap");
        }
        let tiny_sent: u64 = guarded_corpus
            .iter()
            .filter(|v| v.tiny_first)
            .map(|v| v.frames.len() as u64)
            .sum();
        let tiny_dropped = stat(&home, Stat::DropTinyFragment);
        assert!(
            tiny_dropped > 0 && tiny_dropped <= tiny_sent,
            "{mode}: tiny first fragments dropped {tiny_dropped} of at most {tiny_sent} frames"
        );
        assert!(
            stat(&home, Stat::DropOverlapFragment) > 0,
            "{mode}: overlapping fragments are dropped"
        );
        println!(
            "{mode}: answered with guard at one SYN per source: {} (the plain SYN of each family); \
             dropped {} tiny first fragments, {} overlapping ones, {} SYNs over the cap",
            passed.len(),
            tiny_dropped,
            stat(&home, Stat::DropOverlapFragment),
            stat(&home, Stat::DropSourceRate),
        );
        drop(agent);
    }
    drop(listeners);
}
