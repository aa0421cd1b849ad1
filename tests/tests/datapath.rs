//! The datapath proven packet by packet: the real program, loaded into this
//! kernel, driven with crafted frames through `BPF_PROG_TEST_RUN`; verdicts
//! and counters read back from its maps.
//!
//! Each test loads its own unpinned copy of the program, so they share no
//! kernel state. Needs root (run through `cargo xtask test`).

use std::{thread::sleep, time::Duration};

use guard_common::{
    addr::{from_ip, Prefix},
    config::{FLAG_BLOCK_ALL_TRAFFIC, FLAG_DRY_RUN},
    event::{EVENT_AGGREGATE_OVER_CAP, EVENT_SOURCE_OVER_CAP},
    stats::Stat,
};
use guard_tests::{
    frames::{arp, v4, v6, Ext, Frame, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
    testdp::{Dp, PORT, V},
};
use guard_user::{datapath::monotonic_ns, paths::AttachKind, testrun::test_run};

/// Every kind of frame the parser distinguishes, with what it must do.
fn verdict_table() -> Vec<(&'static str, Vec<u8>, V, Stat)> {
    let a4 = v4(198, 18, 0, 2);
    let a6 = v6("2001:2::2");
    use Stat::*;
    vec![
        ("v4 SYN", Frame::syn(a4, PORT).bytes(), V::Pass, PassSyn),
        ("v6 SYN", Frame::syn(a6, PORT).bytes(), V::Pass, PassSyn),
        (
            "v4 SYN, one 802.1Q tag",
            Frame::syn(a4, PORT).vlan(false).bytes(),
            V::Pass,
            PassSyn,
        ),
        (
            "v6 SYN, QinQ tags",
            Frame::syn(a6, PORT).vlan(true).vlan(false).bytes(),
            V::Pass,
            PassSyn,
        ),
        (
            "v4 SYN, 12 bytes of IP options",
            Frame::syn(a4, PORT)
                .ipv4_options(&[0x94, 4, 0, 0, 1, 1, 1, 1, 1, 1, 1, 0])
                .bytes(),
            V::Pass,
            PassSyn,
        ),
        (
            "v6 SYN behind hop-by-hop",
            Frame::syn(a6, PORT).ext(Ext::HopByHop).bytes(),
            V::Pass,
            PassSyn,
        ),
        (
            "v6 SYN behind routing",
            Frame::syn(a6, PORT).ext(Ext::Routing).bytes(),
            V::Pass,
            PassSyn,
        ),
        (
            "v6 SYN behind destination options",
            Frame::syn(a6, PORT).ext(Ext::DestOpts).bytes(),
            V::Pass,
            PassSyn,
        ),
        (
            "v6 SYN in a first fragment",
            Frame::syn(a6, PORT)
                .ext(Ext::Fragment {
                    offset: 0,
                    more: true,
                })
                .bytes(),
            V::Pass,
            PassSyn,
        ),
        (
            "v6 SYN behind AH",
            Frame::syn(a6, PORT).ext(Ext::Auth).bytes(),
            V::Pass,
            PassSyn,
        ),
        (
            "v6 SYN behind all of them",
            Frame::syn(a6, PORT)
                .ext(Ext::HopByHop)
                .ext(Ext::DestOpts)
                .ext(Ext::Routing)
                .ext(Ext::Fragment {
                    offset: 0,
                    more: false,
                })
                .ext(Ext::Auth)
                .ext(Ext::DestOpts)
                .bytes(),
            V::Pass,
            PassSyn,
        ),
        (
            "v6 with a 7-header chain (hides what follows)",
            (0..7)
                .fold(Frame::syn(a6, PORT), |f, _| f.ext(Ext::DestOpts))
                .bytes(),
            V::Drop,
            DropExtHeaderChain,
        ),
        (
            "IPv4-mapped v6 SYN",
            Frame::syn(v6("::ffff:198.18.0.9"), PORT).bytes(),
            V::Pass,
            PassSyn,
        ),
        (
            "v4 SYN to an unprotected port",
            Frame::syn(a4, 22).bytes(),
            V::Pass,
            PassUnprotected,
        ),
        (
            "v4 SYN-ACK",
            Frame::syn(a4, PORT).tcp_flags(TCP_SYN | TCP_ACK).bytes(),
            V::Pass,
            PassNotSyn,
        ),
        (
            "v4 ACK",
            Frame::syn(a4, PORT).tcp_flags(TCP_ACK).bytes(),
            V::Pass,
            PassNotSyn,
        ),
        (
            "v4 RST",
            Frame::syn(a4, PORT).tcp_flags(TCP_RST).bytes(),
            V::Pass,
            PassNotSyn,
        ),
        (
            "v6 FIN-ACK",
            Frame::syn(a6, PORT).tcp_flags(TCP_FIN | TCP_ACK).bytes(),
            V::Pass,
            PassNotSyn,
        ),
        (
            "v4 UDP to the port",
            Frame::syn(a4, PORT).udp(PORT).bytes(),
            V::Pass,
            PassUnprotected,
        ),
        (
            "v6 UDP to the port",
            Frame::syn(a6, PORT).udp(PORT).bytes(),
            V::Pass,
            PassUnprotected,
        ),
        (
            "v4 ICMP",
            Frame::syn(a4, PORT).icmp().bytes(),
            V::Pass,
            PassUnprotected,
        ),
        (
            "v6 ICMPv6",
            Frame::syn(a6, PORT).icmp().bytes(),
            V::Pass,
            PassUnprotected,
        ),
        (
            "v4 later fragment",
            Frame::syn(a4, PORT).ipv4_fragment(185, false).bytes(),
            V::Pass,
            PassFragment,
        ),
        (
            "v4 first fragment SYN",
            Frame::syn(a4, PORT).ipv4_fragment(0, true).bytes(),
            V::Pass,
            PassSyn,
        ),
        (
            "v6 later fragment",
            Frame::syn(a6, PORT)
                .ext(Ext::Fragment {
                    offset: 185,
                    more: false,
                })
                .bytes(),
            V::Pass,
            PassFragment,
        ),
        ("ARP", arp(), V::Pass, PassUnprotected),
        (
            "v4 header claiming version 5",
            Frame::syn(a4, PORT).version(5).bytes(),
            V::Pass,
            PassMalformed,
        ),
        (
            "v4 header with IHL 4",
            Frame::syn(a4, PORT).ihl(4).bytes(),
            V::Pass,
            PassMalformed,
        ),
        (
            "v6 header claiming version 4",
            Frame::syn(a6, PORT).version(4).bytes(),
            V::Pass,
            PassMalformed,
        ),
    ]
}

#[test]
fn every_frame_kind_gets_its_verdict_in_xdp_and_tc() {
    let dp = Dp::new();
    for (name, frame, want, stat) in verdict_table() {
        let (got, moved) = dp.verdict(&frame);
        assert_eq!((got, moved), (want, stat), "{name}");
        assert_eq!(dp.run_tc(&frame), want, "{name} (tc)");
    }
}

#[test]
fn truncated_frames_never_crash_and_never_count_as_syns() {
    let mut dp = Dp::new();
    // After one complete SYN each, every source is over its cap, so a
    // truncated frame mistaken for a SYN would show up as a drop.
    dp.config(|c| {
        c.syn_rate = 0;
        c.syn_burst = 1;
    });
    let table = verdict_table();
    for (_, frame, _, stat) in &table {
        if *stat == Stat::PassSyn {
            dp.run(frame);
        }
    }
    let mut tc_runs = 0;
    for (name, frame, _, full_stat) in table {
        for len in 14..frame.len() {
            let before = dp.stats();
            let v = dp.run(&frame[..len]);
            let after = dp.stats();
            let delta = |s: Stat| after[s.index() as usize] - before[s.index() as usize];
            assert_eq!(
                delta(Stat::SynSeen),
                0,
                "{name} cut at {len} bytes is no SYN"
            );
            if full_stat == Stat::DropExtHeaderChain && v == V::Drop {
                // Cut after the 7th header began: still a hiding chain.
                assert_eq!(delta(Stat::DropExtHeaderChain), 1, "{name} cut at {len}");
            } else {
                assert_eq!(v, V::Pass, "{name} cut at {len} bytes must pass");
            }
            // The skb test-run refuses frames without a whole IP header
            // (the stack would never build such an skb); run what it takes.
            if let Some(tc) = dp.try_run_tc(&frame[..len]) {
                assert_eq!(tc, v, "{name} cut at {len} (tc)");
                tc_runs += 1;
            } else {
                assert!(len < 14 + 40, "{name}: tc refused {len} bytes");
            }
        }
    }
    assert!(
        tc_runs > 200,
        "the tc program saw {tc_runs} truncated frames"
    );
    // Shorter than an Ethernet header: the kernel refuses to test-run it
    // (and no driver delivers one); say so rather than skip silently.
    assert!(test_run(dp.dp.program(AttachKind::XdpNative), &[0u8; 13], 1).is_err());
}

#[test]
fn burst_plus_n_syns_drop_exactly_n_and_other_sources_are_untouched() {
    let mut dp = Dp::new();
    dp.config(|c| {
        c.syn_rate = 0;
        c.syn_burst = 40;
    });
    let attacker = v4(198, 18, 0, 3);
    assert_eq!(dp.syns(attacker, 40 + 25), (40, 25));
    let stats = dp.stats();
    assert_eq!(stats[Stat::DropSourceRate.index() as usize], 25);
    assert_eq!(stats[Stat::PassSyn.index() as usize], 40);
    // Other sources, v4 and v6, keep their own buckets.
    assert_eq!(dp.syns(v4(198, 18, 0, 2), 40), (40, 0));
    assert_eq!(dp.syns(v6("2001:2::2"), 40), (40, 0));
    // The attacker's IPv4-mapped IPv6 form is the same source.
    assert_eq!(dp.syns(v6("::ffff:198.18.0.3"), 3), (0, 3));
    // Non-SYN traffic of a capped source still flows (established
    // connections are not what the cap is for).
    let ack = Frame::syn(attacker, PORT).tcp_flags(TCP_ACK).bytes();
    assert_eq!(dp.run(&ack), V::Pass);
}

#[test]
fn ipv6_sources_are_their_slash_64_by_default() {
    let mut dp = Dp::new();
    dp.config(|c| {
        c.syn_rate = 0;
        c.syn_burst = 10;
    });
    assert_eq!(dp.syns(v6("2001:2:0:1::1"), 6), (6, 0));
    assert_eq!(dp.syns(v6("2001:2:0:1::ffff"), 6), (4, 2), "same /64");
    assert_eq!(dp.syns(v6("2001:2:0:2::1"), 6), (6, 0), "another /64");
    // Narrowing the source to /128 separates hosts.
    dp.config(|c| c.source_prefix_v6 = 128);
    assert_eq!(dp.syns(v6("2001:2:0:1::1234"), 6), (6, 0));
}

#[test]
fn aggregate_cap_limits_a_prefix_of_many_sources() {
    let mut dp = Dp::new();
    dp.config(|c| {
        c.syn_rate = 0;
        c.syn_burst = 5;
        c.aggregate_rate = 0;
        c.aggregate_burst = 8;
    });
    let mut pass = 0;
    let mut drop = 0;
    for host in 10..20 {
        let (p, d) = dp.syns(v4(198, 19, 7, host), 1);
        pass += p;
        drop += d;
    }
    assert_eq!(
        (pass, drop),
        (8, 2),
        "ten /32s in one /24 share a budget of 8"
    );
    let stats = dp.stats();
    assert_eq!(stats[Stat::DropAggregateRate.index() as usize], 2);
    assert_eq!(stats[Stat::DropSourceRate.index() as usize], 0);
    assert_eq!(
        dp.syns(v4(198, 19, 8, 1), 5),
        (5, 0),
        "another /24 is untouched"
    );
    let events = dp.events();
    let agg: Vec<_> = events
        .iter()
        .filter(|e| e.kind == EVENT_AGGREGATE_OVER_CAP)
        .collect();
    assert_eq!(agg.len(), 1, "one event per window for the prefix");
    let p: Prefix = "198.19.7.0/24".parse().unwrap();
    assert_eq!(agg[0].addr, p.addr());
    assert_eq!(agg[0].prefix_len as u32, p.prefix_len());
}

#[test]
fn one_source_over_its_own_cap_does_not_drain_its_neighbours_aggregate() {
    let mut dp = Dp::new();
    dp.config(|c| {
        c.syn_rate = 0;
        c.syn_burst = 3;
        c.aggregate_rate = 0;
        c.aggregate_burst = 8;
    });
    assert_eq!(
        dp.syns(v4(198, 19, 7, 1), 50),
        (3, 47),
        "the flooder is capped alone"
    );
    let stats = dp.stats();
    assert_eq!(stats[Stat::DropSourceRate.index() as usize], 47);
    assert_eq!(stats[Stat::DropAggregateRate.index() as usize], 0);
    let mut pass = 0;
    for host in 10..15 {
        pass += dp.syns(v4(198, 19, 7, host), 1).0;
    }
    assert_eq!(pass, 5, "its /24 still has 8 - 3 tokens for the neighbours");
}

#[test]
fn a_saturated_aggregate_drops_spoofed_sources_without_tracking_them() {
    let mut dp = Dp::new();
    dp.config(|c| {
        c.syn_rate = 0;
        c.syn_burst = 5;
        c.aggregate_rate = 0;
        c.aggregate_burst = 4;
    });
    for host in 1..=4 {
        assert_eq!(dp.syns(v4(198, 19, 9, host), 1), (1, 0));
    }
    let created = dp.stats()[Stat::SourcesCreated.index() as usize];
    assert_eq!(created, 4);
    let mut drop = 0;
    for host in 5..=200 {
        drop += dp.syns(v4(198, 19, 9, host), 1).1;
    }
    assert_eq!(
        drop, 196,
        "every new source in the saturated /24 is dropped"
    );
    let stats = dp.stats();
    assert_eq!(
        stats[Stat::SourcesCreated.index() as usize],
        created,
        "no per-source state for SYNs the aggregate dropped"
    );
    assert_eq!(stats[Stat::DropAggregateRate.index() as usize], 196);
}

#[test]
fn the_bucket_refills_with_time() {
    let mut dp = Dp::new();
    // 10/s gives 100 ms of slack between back-to-back test runs before a
    // token could sneak in.
    dp.config(|c| {
        c.syn_rate = 10;
        c.syn_burst = 2;
    });
    let src = v4(198, 18, 0, 4);
    assert_eq!(dp.syns(src, 3), (2, 1));
    // At least 300 ms at 10/s is at least 3 tokens, capped at the burst.
    sleep(Duration::from_millis(300));
    assert_eq!(dp.syns(src, 3), (2, 1));
}

#[test]
fn one_event_per_window_for_a_source_over_its_cap() {
    let mut dp = Dp::new();
    dp.config(|c| {
        c.syn_rate = 0;
        c.syn_burst = 2;
        c.event_interval_ms = 60_000;
    });
    let src = v4(198, 18, 0, 3);
    assert_eq!(dp.syns(src, 12), (2, 10));
    let events = dp.events();
    assert_eq!(events.len(), 1, "ten over-cap SYNs, one event: {events:?}");
    let e = events[0];
    assert_eq!(e.kind, EVENT_SOURCE_OVER_CAP);
    assert_eq!(e.addr, from_ip(src));
    assert_eq!(e.prefix_len, 128);
    assert_eq!(
        (e.syns, e.over_cap),
        (3, 1),
        "the event is raised by the first over-cap SYN"
    );
    assert_eq!(e.dry_run, 0);
    assert_eq!(dp.stats()[Stat::EventsLost.index() as usize], 0);
}

#[test]
fn blocklist_drops_until_expiry_and_scope_decides_what_it_covers() {
    let mut dp = Dp::new();
    let attacker = v4(198, 18, 0, 3);
    let syn = Frame::syn(attacker, PORT).bytes();
    let ack = Frame::syn(attacker, PORT).tcp_flags(TCP_ACK).bytes();
    let udp = Frame::syn(attacker, PORT).udp(53).bytes();
    let other_port = Frame::syn(attacker, 22).bytes();

    dp.block("198.18.0.0/24", 0);
    assert_eq!(dp.verdict(&syn), (V::Drop, Stat::DropBlocked));
    assert_eq!(
        dp.verdict(&ack),
        (V::Drop, Stat::DropBlocked),
        "ports scope: all TCP to the port"
    );
    assert_eq!(dp.verdict(&udp), (V::Pass, Stat::PassUnprotected));
    assert_eq!(dp.verdict(&other_port), (V::Pass, Stat::PassUnprotected));
    assert_eq!(
        dp.verdict(&Frame::syn(v4(198, 18, 1, 3), PORT).bytes()).0,
        V::Pass
    );

    dp.config(|c| c.flags |= FLAG_BLOCK_ALL_TRAFFIC);
    assert_eq!(dp.verdict(&udp), (V::Drop, Stat::DropBlocked));
    assert_eq!(dp.verdict(&other_port), (V::Drop, Stat::DropBlocked));
    assert_eq!(
        dp.verdict(&Frame::syn(attacker, PORT).ipv4_fragment(100, false).bytes()),
        (V::Drop, Stat::DropBlocked),
        "block-all covers fragments"
    );
    assert_eq!(dp.verdict(&arp()), (V::Pass, Stat::PassUnprotected));
    dp.config(|c| c.flags &= !FLAG_BLOCK_ALL_TRAFFIC);

    // Expiry is judged by the kernel's own clock.
    dp.dp
        .maps_mut()
        .remove_block(&"198.18.0.0/24".parse().unwrap())
        .unwrap();
    dp.block("198.18.0.3/32", monotonic_ns() - 1);
    assert_eq!(
        dp.verdict(&syn).1,
        Stat::PassSyn,
        "an expired entry no longer applies"
    );
    dp.block("198.18.0.3/32", monotonic_ns() + 300_000_000);
    assert_eq!(dp.verdict(&syn), (V::Drop, Stat::DropBlocked));
    sleep(Duration::from_millis(400));
    assert_eq!(dp.verdict(&syn), (V::Pass, Stat::PassSyn));

    // IPv6 prefixes block every address inside them.
    dp.block("2001:2:0:9::/64", 0);
    assert_eq!(
        dp.verdict(&Frame::syn(v6("2001:2:0:9::77"), PORT).bytes()),
        (V::Drop, Stat::DropBlocked)
    );
    assert_eq!(
        dp.verdict(&Frame::syn(v6("2001:2:0:8::77"), PORT).bytes())
            .0,
        V::Pass
    );
}

#[test]
fn allowlist_beats_blocklist_and_caps() {
    let mut dp = Dp::new();
    dp.config(|c| {
        c.syn_rate = 0;
        c.syn_burst = 1;
    });
    dp.block("198.18.0.0/16", 0);
    dp.allow("198.18.0.10/31");
    for host in [10, 11] {
        let src = v4(198, 18, 0, host);
        assert_eq!(
            dp.verdict(&Frame::syn(src, PORT).bytes()),
            (V::Pass, Stat::PassAllowlisted)
        );
        assert_eq!(
            dp.syns(src, 5),
            (5, 0),
            "allow-listed sources are never capped"
        );
    }
    assert_eq!(
        dp.verdict(&Frame::syn(v4(198, 18, 0, 12), PORT).bytes()),
        (V::Drop, Stat::DropBlocked)
    );
}

#[test]
fn dry_run_counts_would_drops_and_passes_everything() {
    let mut dp = Dp::new();
    dp.config(|c| {
        c.flags |= FLAG_DRY_RUN;
        c.syn_rate = 0;
        c.syn_burst = 2;
        c.aggregate_rate = 0;
        c.aggregate_burst = 3;
    });
    let src = v4(198, 18, 0, 3);
    assert_eq!(dp.syns(src, 5), (5, 0));
    let stats = dp.stats();
    assert_eq!(stats[Stat::WouldDropSourceRate.index() as usize], 3);
    assert_eq!(stats[Stat::DropSourceRate.index() as usize], 0);
    // Sources 2 and 3 of the /24 pass their own caps; the third
    // admitted SYN exhausts the aggregate of 3 budget, the rest would drop.
    assert_eq!(dp.syns(v4(198, 18, 0, 4), 2), (2, 0));
    assert_eq!(dp.stats()[Stat::WouldDropAggregateRate.index() as usize], 1);
    dp.block("198.18.0.3/32", 0);
    assert_eq!(
        dp.verdict(&Frame::syn(src, PORT).bytes()),
        (V::Pass, Stat::WouldDropBlocked)
    );
    let events = dp.events();
    assert!(!events.is_empty() && events.iter().all(|e| e.dry_run == 1));
    // Enforcing again drops.
    dp.config(|c| c.flags &= !FLAG_DRY_RUN);
    assert_eq!(
        dp.verdict(&Frame::syn(src, PORT).bytes()),
        (V::Drop, Stat::DropBlocked)
    );
}

#[test]
fn ports_are_live_and_exact() {
    let mut dp = Dp::new();
    let src = v4(198, 18, 0, 2);
    assert_eq!(
        dp.verdict(&Frame::syn(src, 9000).bytes()).1,
        Stat::PassUnprotected
    );
    dp.dp.maps_mut().set_ports(&[8080, 9000]).unwrap();
    assert_eq!(dp.dp.maps().ports().unwrap(), vec![8080, 9000]);
    assert_eq!(dp.verdict(&Frame::syn(src, 9000).bytes()).1, Stat::PassSyn);
    dp.dp.maps_mut().set_ports(&[9000]).unwrap();
    assert_eq!(
        dp.verdict(&Frame::syn(src, 8080).bytes()).1,
        Stat::PassUnprotected
    );
}

#[test]
fn conn_limit_drops_new_syns_of_a_source_holding_its_maximum() {
    let mut dp = Dp::new();
    dp.config(|c| c.conn_limit = 3);
    let src = v4(198, 18, 0, 5);
    let key = from_ip(src);
    // Each SYN its own connection (client port), as a client opens them.
    let syn = |port: u16| Frame::syn(src, PORT).tcp_ports(port, PORT).bytes();
    // What sockops would have counted for this source.
    dp.dp.maps_mut().conns.insert(key, 1u64, 0).unwrap();
    assert_eq!(dp.verdict(&syn(40001)), (V::Pass, Stat::PassSyn));
    assert_eq!(dp.verdict(&syn(40002)), (V::Pass, Stat::PassSyn));
    assert_eq!(
        dp.verdict(&syn(40003)),
        (V::Drop, Stat::DropConnLimit),
        "one established and two in flight hold all three"
    );
    assert_eq!(
        dp.verdict(&Frame::syn(v4(198, 18, 0, 6), PORT).bytes()),
        (V::Pass, Stat::PassSyn)
    );
    // Established traffic of the capped source still flows.
    assert_eq!(
        dp.verdict(&Frame::syn(src, PORT).tcp_flags(TCP_ACK).bytes())
            .0,
        V::Pass
    );
    // A counter one below zero (a pruning race) reads as none open.
    dp.dp.maps_mut().conns.insert(key, u64::MAX, 0).unwrap();
    assert_eq!(dp.verdict(&syn(40004)), (V::Pass, Stat::PassSyn));
    dp.dp.maps_mut().conns.insert(key, 3u64, 0).unwrap();
    dp.config(|c| c.flags |= FLAG_DRY_RUN);
    assert_eq!(dp.verdict(&syn(40005)), (V::Pass, Stat::WouldDropConnLimit));
    dp.config(|c| {
        c.flags &= !FLAG_DRY_RUN;
        c.conn_limit = 0;
    });
    assert_eq!(
        dp.verdict(&syn(40006)),
        (V::Pass, Stat::PassSyn),
        "0 turns the cap off"
    );
}

/// Issue 24, finding 1: conn_limit was checked against established connections only, so
/// one address that held back its ACKs got every SYN through and then all its connections.
#[test]
fn handshakes_in_flight_count_against_conn_limit_until_they_complete_or_time_out() {
    let mut dp = Dp::new();
    dp.config(|c| {
        c.conn_limit = 5;
        c.handshake_timeout_s = 1;
    });
    let src = v4(198, 18, 0, 7);
    let syn = |port: u16| Frame::syn(src, PORT).tcp_ports(port, PORT).bytes();
    // Thirty connections opened at once, none of them established yet.
    let passed = (41000..41030)
        .filter(|port| dp.run(&syn(*port)) == V::Pass)
        .count();
    assert_eq!(passed, 5, "no more handshakes than conn_limit");
    assert_eq!(dp.stat(Stat::DropConnLimit), 25);
    assert_eq!(dp.stat(Stat::HandshakeCharged), 5);
    // A retransmitted SYN of a handshake in flight is the same connection: it passes and
    // is not charged again.
    assert_eq!(dp.verdict(&syn(41002)), (V::Pass, Stat::PassSyn));
    assert_eq!(dp.stat(Stat::HandshakeCharged), 5);
    // Other sources hold their own.
    assert_eq!(
        dp.verdict(&Frame::syn(v4(198, 18, 0, 8), PORT).bytes()),
        (V::Pass, Stat::PassSyn)
    );
    // Handshakes that never complete stop counting once the timeout is over (1 s here;
    // a charge lives at most a third longer).
    sleep(Duration::from_millis(2500));
    assert_eq!(dp.verdict(&syn(41100)), (V::Pass, Stat::PassSyn));
    assert_eq!(
        dp.stat(Stat::HandshakeCharged),
        7,
        "its 6, and the other source's"
    );
}

#[test]
fn global_budget_keeps_known_good_sources_in_and_squeezes_unknown_ones() {
    let mut dp = Dp::new();
    // 1/s: the first SYN fills the bucket to its burst (it starts with a
    // zero timestamp), and the test is over long before a second token.
    dp.config(|c| {
        c.global_syn_rate = 1;
        c.global_syn_burst = 3;
        c.known_good_ttl_s = 60;
    });
    let known = v4(198, 18, 0, 10);
    let stale = v4(198, 18, 0, 11);
    let now = monotonic_ns();
    dp.dp
        .maps_mut()
        .known_good
        .insert(from_ip(known), now, 0)
        .unwrap();
    dp.dp
        .maps_mut()
        .known_good
        .insert(from_ip(stale), now - 120_000_000_000, 0)
        .unwrap();
    // The budget of 3 is shared by everyone while it lasts.
    for host in 20..23 {
        assert_eq!(
            dp.verdict(&Frame::syn(v4(198, 19, 0, host), PORT).bytes()),
            (V::Pass, Stat::PassSyn)
        );
    }
    // Spent: unknown sources are dropped, known-good ones still pass.
    for host in 23..30 {
        assert_eq!(
            dp.verdict(&Frame::syn(v4(198, 19, 0, host), PORT).bytes()),
            (V::Drop, Stat::DropGlobalBudget)
        );
    }
    for _ in 0..5 {
        assert_eq!(
            dp.verdict(&Frame::syn(known, PORT).bytes()),
            (V::Pass, Stat::PassKnownGood)
        );
    }
    assert_eq!(
        dp.verdict(&Frame::syn(stale, PORT).bytes()),
        (V::Drop, Stat::DropGlobalBudget),
        "known-good status expires"
    );
    // Known-good sources keep their own per-source cap.
    dp.config(|c| {
        c.syn_rate = 0;
        c.syn_burst = 1;
    });
    let k2 = v4(198, 18, 0, 12);
    dp.dp
        .maps_mut()
        .known_good
        .insert(from_ip(k2), monotonic_ns(), 0)
        .unwrap();
    assert_eq!(
        dp.verdict(&Frame::syn(k2, PORT).bytes()),
        (V::Pass, Stat::PassKnownGood)
    );
    assert_eq!(
        dp.verdict(&Frame::syn(k2, PORT).bytes()),
        (V::Drop, Stat::DropSourceRate)
    );
    dp.config(|c| c.flags |= FLAG_DRY_RUN);
    assert_eq!(
        dp.verdict(&Frame::syn(v4(198, 19, 0, 40), PORT).bytes()),
        (V::Pass, Stat::WouldDropGlobalBudget)
    );
}

#[test]
fn empty_list_flags_let_the_program_skip_lookups_and_nothing_else() {
    use guard_common::config::{FLAG_ALLOW_EMPTY, FLAG_BLOCK_EMPTY};
    let mut dp = Dp::new();
    let src = v4(198, 18, 0, 3);
    let syn = Frame::syn(src, PORT).bytes();
    dp.block("198.18.0.3/32", 0);
    dp.allow("198.18.0.9/32");
    assert_eq!(dp.verdict(&syn), (V::Drop, Stat::DropBlocked));
    // The agent sets these only while the trie really is empty; the
    // program then trusts them and does not look (that is the saving).
    dp.config(|c| c.flags |= FLAG_BLOCK_EMPTY);
    assert_eq!(dp.verdict(&syn), (V::Pass, Stat::PassSyn));
    dp.config(|c| c.flags = (c.flags & !FLAG_BLOCK_EMPTY) | FLAG_ALLOW_EMPTY);
    assert_eq!(
        dp.verdict(&Frame::syn(v4(198, 18, 0, 9), PORT).bytes()),
        (V::Pass, Stat::PassSyn),
        "not looked up, so not allow-listed"
    );
    assert_eq!(dp.verdict(&syn), (V::Drop, Stat::DropBlocked));
}

/// `frame` (Ethernet, then IPv4 or IPv6 without VLAN tags) cut to the first `payload` bytes
/// after the IP header, its IP length saying so: a fragment as short as the sender chose.
fn cut_to(mut frame: Vec<u8>, payload: usize) -> Vec<u8> {
    if frame[12..14] == [0x08, 0x00] {
        let ihl = usize::from(frame[14] & 0x0f) * 4;
        frame[16..18].copy_from_slice(&((ihl + payload) as u16).to_be_bytes());
        frame.truncate(14 + ihl + payload);
    } else {
        frame[18..20].copy_from_slice(&(payload as u16).to_be_bytes());
        frame.truncate(14 + 40 + payload);
    }
    frame
}

#[test]
fn fragments_that_hide_or_rewrite_a_tcp_header_are_dropped() {
    let mut dp = Dp::new();
    let (a4, a6) = (v4(198, 18, 0, 3), v6("2001:2::3"));
    let first6 = Ext::Fragment {
        offset: 0,
        more: true,
    };
    let cases = [
        (
            "v4 first fragment with 8 bytes of TCP",
            cut_to(Frame::syn(a4, PORT).ipv4_fragment(0, true).bytes(), 8),
            V::Drop,
            Stat::DropTinyFragment,
        ),
        (
            "v4 first fragment too short to name its port",
            cut_to(Frame::syn(a4, PORT).ipv4_fragment(0, true).bytes(), 2),
            V::Drop,
            Stat::DropTinyFragment,
        ),
        (
            "v4 tiny first fragment toward another port",
            cut_to(Frame::syn(a4, PORT + 1).ipv4_fragment(0, true).bytes(), 8),
            V::Pass,
            Stat::PassUnprotected,
        ),
        (
            "v4 TCP fragment at offset 8",
            Frame::syn(a4, PORT).ipv4_fragment(1, false).bytes(),
            V::Drop,
            Stat::DropOverlapFragment,
        ),
        (
            "v4 first fragment holding the whole header",
            cut_to(Frame::syn(a4, PORT).ipv4_fragment(0, true).bytes(), 20),
            V::Pass,
            Stat::PassSyn,
        ),
        (
            "v4 whole datagram shorter than a TCP header",
            cut_to(Frame::syn(a4, PORT).bytes(), 8),
            V::Pass,
            Stat::PassUnprotected,
        ),
        (
            "v6 first fragment with 8 bytes of TCP",
            cut_to(Frame::syn(a6, PORT).ext(first6).bytes(), 8 + 8),
            V::Drop,
            Stat::DropTinyFragment,
        ),
        (
            "v6 first fragment ending inside its header chain",
            cut_to(
                Frame::syn(a6, PORT)
                    .ext(first6)
                    .ext(Ext::DestOpts)
                    .ext(Ext::DestOpts)
                    .bytes(),
                8 + 8,
            ),
            V::Drop,
            Stat::DropTinyFragment,
        ),
        (
            "v6 first fragment whose TCP header hides behind an atomic fragment header",
            cut_to(
                Frame::syn(a6, PORT)
                    .ext(first6)
                    .ext(Ext::Fragment {
                        offset: 0,
                        more: false,
                    })
                    .bytes(),
                8 + 8 + 8,
            ),
            V::Drop,
            Stat::DropTinyFragment,
        ),
        (
            "v6 TCP fragment at offset 8",
            Frame::syn(a6, PORT)
                .ext(Ext::Fragment {
                    offset: 1,
                    more: false,
                })
                .bytes(),
            V::Drop,
            Stat::DropOverlapFragment,
        ),
        (
            "v6 datagram whose chain outruns its length",
            cut_to(
                Frame::syn(a6, PORT)
                    .ext(Ext::DestOpts)
                    .ext(Ext::DestOpts)
                    .bytes(),
                8,
            ),
            V::Pass,
            Stat::PassMalformed,
        ),
    ];
    for (name, frame, want, stat) in &cases {
        assert_eq!(dp.verdict(frame), (*want, *stat), "{name}");
        assert_eq!(dp.run_tc(frame), *want, "{name} (tc)");
    }
    // Dry run counts what it would drop; the allowlist comes first.
    let tiny = &cases[0].1;
    dp.config(|c| c.flags |= FLAG_DRY_RUN);
    assert_eq!(dp.verdict(tiny), (V::Pass, Stat::WouldDropTinyFragment));
    assert_eq!(
        dp.verdict(&cases[3].1),
        (V::Pass, Stat::WouldDropOverlapFragment)
    );
    dp.config(|c| c.flags &= !FLAG_DRY_RUN);
    dp.allow("198.18.0.3/32");
    assert_eq!(dp.verdict(tiny), (V::Pass, Stat::PassAllowlisted));
}
