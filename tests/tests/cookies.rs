//! SYN cookies proven packet by packet: the real program answers SYNs with
//! SYN-ACKs through `BPF_PROG_TEST_RUN`, a reference decoder reads them
//! back (fields, options, checksums), the host side of guard-common checks
//! their cookies, and crafted replies go through the ACK check. Needs root.

use std::net::{IpAddr, TcpListener};

use guard_common::{
    addr::{from_ip, AddrWords},
    config::FLAG_DRY_RUN,
    stats::Stat,
    syncookie::{self, CookieKey, Flow, MODE_ALWAYS, MODE_UNDER_ATTACK},
};
use guard_tests::{
    frames::{decode_tcp, v4, v6, Ext, Frame, Segment, TCP_ACK, TCP_FIN, TCP_SYN},
    testdp::{cookie_key, Dp, XdpOutcome, PORT, V},
};
use guard_user::{
    datapath::monotonic_ns,
    testrun::{TC_ACT_REDIRECT, TC_ACT_SHOT},
};

/// What the reply check returns for "go on" (TC_ACT_UNSPEC, as the kernel
/// reports it).
const TCX_NEXT: u32 = u32::MAX;

const CLIENT_ISN: u32 = 0x1000_0000;
const CLIENT_TSVAL: u32 = 777_000;

fn linux_syn(src: IpAddr) -> Frame {
    Frame::syn(src, PORT)
        .tcp_seq_ack(CLIENT_ISN, 0)
        .linux_syn_options(1460, CLIENT_TSVAL, 9)
}

fn flow_of(syn: &Frame, port: u16) -> Flow {
    Flow {
        client: AddrWords::from_addr(&from_ip(syn.src)),
        server: AddrWords::from_addr(&from_ip(syn.dst)),
        client_port: port,
        server_port: PORT,
    }
}

/// The cookie's verdict by the host-side reference, for the epoch the
/// program made it in (now or the one before).
fn host_check(flow: &Flow, client_isn: u32, cookie: u32) -> Option<syncookie::Negotiated> {
    let epoch = syncookie::epoch_for(cookie, syncookie::epoch_of(monotonic_ns()));
    syncookie::check(
        &cookie_key(syncookie::key_slot(epoch)),
        flow,
        client_isn,
        cookie,
        epoch,
    )
}

fn answered(dp: &Dp, frame: &Frame) -> Segment {
    match dp.run_xdp(&frame.bytes()) {
        XdpOutcome::Tx(out) => decode_tcp(&out).expect("the SYN-ACK decodes"),
        other => panic!("expected a SYN-ACK, got {other:?}"),
    }
}

/// The client's reply to `synack`: ACK of the cookie, timestamps echoed.
fn reply(syn: &Frame, synack: &Segment) -> Frame {
    let mut ack = Frame::syn(syn.src, PORT)
        .tcp_flags(TCP_ACK)
        .tcp_seq_ack(CLIENT_ISN.wrapping_add(1), synack.seq.wrapping_add(1));
    ack.dst = syn.dst;
    ack.vlans = syn.vlans.clone();
    match synack.timestamps() {
        Some((tsval, _)) => {
            let mut o = vec![1, 1, 8, 10];
            o.extend_from_slice(&(CLIENT_TSVAL + 5).to_be_bytes());
            o.extend_from_slice(&tsval.to_be_bytes());
            ack.tcp_options(&o)
        }
        None => ack,
    }
}

#[test]
fn an_unproven_syn_gets_a_synack_with_a_valid_cookie_and_its_options() {
    for (src, vlans) in [
        (v4(198, 19, 4, 5), 0),
        (v4(198, 19, 4, 6), 2),
        (v6("2001:2::5:1"), 0),
        (v6("2001:2::5:2"), 1),
    ] {
        let dp = Dp::with_cookies();
        let mut syn = linux_syn(src);
        for i in 0..vlans {
            syn = syn.vlan(i == 0 && vlans == 2);
        }
        let sent_before = dp.stat(Stat::CookieSent);
        let s = answered(&dp, &syn);
        let name = format!("{src} with {vlans} VLAN tags");
        assert_eq!(dp.stat(Stat::CookieSent), sent_before + 1, "{name}");
        assert_eq!(dp.stat(Stat::SourcesCreated), 0, "{name}: nothing tracked");
        assert_eq!(dp.stat(Stat::SynSeen), 1, "{name}");
        // Back where it came from, as the server.
        assert_eq!(s.dst_mac, [0x02, 0, 0, 0, 0, 0x02], "{name}");
        assert_eq!(s.src_mac, [0x02, 0, 0, 0, 0, 0x01], "{name}");
        assert_eq!(s.vlans.len(), vlans, "{name}: tags kept");
        assert_eq!((s.src, s.dst), (syn.dst, syn.src), "{name}");
        assert_eq!((s.src_port, s.dst_port), (PORT, 40000), "{name}");
        assert_eq!(s.flags, TCP_SYN | TCP_ACK, "{name}");
        assert_eq!(s.ack, CLIENT_ISN + 1, "{name}");
        assert_eq!(s.ttl, 64, "{name}");
        assert!(s.ip_checksum_ok && s.tcp_checksum_ok, "{name}: checksums");
        assert_eq!(s.payload_len, 0, "{name}");
        // What a normal handshake offers: MSS, SACK, timestamps echoing
        // the client's, window scaling.
        let mss = if src.is_ipv4() { 1460 } else { 1440 };
        assert_eq!(s.mss(), Some(mss), "{name}");
        assert!(s.sack_permitted(), "{name}");
        assert_eq!(s.timestamps().map(|t| t.1), Some(CLIENT_TSVAL), "{name}");
        assert_eq!(s.wscale(), Some(7), "{name}");
        // The cookie remembers what the client asked for.
        let n = host_check(&flow_of(&syn, 40000), CLIENT_ISN, s.seq).expect("valid cookie");
        assert_eq!(
            n.mss(src.is_ipv6()),
            if src.is_ipv4() { 1460 } else { 1440 }
        );
        assert!(n.sack);
        assert_eq!(n.wscale, 9);
    }
}

#[test]
fn a_bare_syn_gets_only_what_it_asked_for_and_payload_is_not_echoed() {
    let dp = Dp::with_cookies();
    let syn = Frame::syn(v4(198, 19, 1, 1), PORT)
        .tcp_seq_ack(u32::MAX, 0)
        .tcp_payload(&[0xaa; 100]);
    let s = answered(&dp, &syn);
    assert_eq!(s.ack, 0, "the ISN wraps");
    assert_eq!(s.mss(), Some(1460));
    assert!(!s.sack_permitted());
    assert_eq!(s.timestamps(), None);
    assert_eq!(s.wscale(), None);
    assert_eq!(s.payload_len, 0);
    assert!(s.ip_checksum_ok && s.tcp_checksum_ok);
    let n = host_check(&flow_of(&syn, 40000), u32::MAX, s.seq).expect("valid cookie");
    assert_eq!(n.mss(false), 536, "no MSS option: the RFC default");
    assert!(!n.sack && !n.wscale_ok());
}

#[test]
fn the_hosts_sysctls_limit_what_the_synack_offers() {
    let dp = Dp::with_cookies();
    let mut dp = dp;
    dp.config(|c| c.cookie_opts = syncookie::OPT_TIMESTAMPS);
    let s = answered(&dp, &linux_syn(v4(198, 19, 1, 2)));
    assert!(!s.sack_permitted());
    assert_eq!(s.wscale(), None);
    assert!(s.timestamps().is_some());
}

#[test]
fn sources_that_proved_themselves_or_are_listed_skip_cookies() {
    let mut dp = Dp::with_cookies();
    let good = v4(198, 18, 0, 10);
    dp.dp
        .maps_mut()
        .known_good
        .insert(from_ip(good), monotonic_ns(), 0)
        .expect("mark known good");
    assert_eq!(
        dp.verdict(&linux_syn(good).bytes()),
        (V::Pass, Stat::PassSyn)
    );
    dp.allow("198.18.1.0/24");
    assert_eq!(
        dp.verdict(&linux_syn(v4(198, 18, 1, 9)).bytes()),
        (V::Pass, Stat::PassAllowlisted)
    );
    dp.block("198.19.9.0/24", 0);
    assert_eq!(
        dp.verdict(&linux_syn(v4(198, 19, 9, 9)).bytes()),
        (V::Drop, Stat::DropBlocked)
    );
    assert_eq!(dp.stat(Stat::CookieSent), 0);
}

#[test]
fn shapes_a_synack_cannot_mirror_go_the_ordinary_way_on_purpose() {
    let dp = Dp::with_cookies();
    let src = v4(198, 19, 2, 2);
    for (name, frame) in [
        ("IPv4 options", linux_syn(src).ipv4_options(&[1, 1, 1, 0])),
        ("SYN+FIN", linux_syn(src).tcp_flags(TCP_SYN | TCP_FIN)),
        (
            "IPv6 extension header",
            linux_syn(v6("2001:2::9")).ext(Ext::DestOpts),
        ),
        ("first fragment", linux_syn(src).ipv4_fragment(0, true)),
    ] {
        assert_eq!(
            dp.verdict(&frame.bytes()),
            (V::Pass, Stat::PassSyn),
            "{name}"
        );
    }
    assert_eq!(dp.stat(Stat::CookieSent), 0);
}

#[test]
fn no_key_means_no_cookie() {
    let mut dp = Dp::new();
    dp.config(|c| c.syn_cookies = MODE_ALWAYS);
    assert_eq!(
        dp.verdict(&linux_syn(v4(198, 19, 3, 3)).bytes()),
        (V::Pass, Stat::PassSyn)
    );
}

#[test]
fn under_attack_cookies_start_when_the_budget_runs_dry_and_track_nothing() {
    let mut dp = Dp::with_cookies();
    dp.config(|c| {
        // 1/s: the first SYN fills the bucket (its clock starts at zero),
        // and the test ends long before a second token.
        c.syn_cookies = MODE_UNDER_ATTACK;
        c.global_syn_rate = 1;
        c.global_syn_burst = 3;
    });
    for i in 0..3 {
        let syn = linux_syn(v4(198, 19, 5, i));
        assert_eq!(dp.verdict(&syn.bytes()), (V::Pass, Stat::PassSyn), "#{i}");
    }
    for i in 3..50 {
        let syn = linux_syn(v4(198, 19, 5, i));
        answered(&dp, &syn);
    }
    assert_eq!(dp.stat(Stat::CookieSent), 47);
    assert_eq!(dp.stat(Stat::DropGlobalBudget), 0);
    assert_eq!(
        dp.stat(Stat::SourcesCreated),
        3,
        "only the sources judged before the budget ran dry are tracked"
    );
}

#[test]
fn dry_run_counts_the_cookie_it_would_send_and_passes_the_syn() {
    let mut dp = Dp::with_cookies();
    dp.config(|c| c.flags |= FLAG_DRY_RUN);
    assert_eq!(
        dp.verdict(&linux_syn(v4(198, 19, 6, 6)).bytes()),
        (V::Pass, Stat::WouldCookie)
    );
}

#[test]
fn the_tc_attach_answers_by_redirecting_the_rewritten_frame() {
    let dp = Dp::with_cookies();
    for src in [v4(198, 19, 7, 7), v6("2001:2::7:7")] {
        let syn = linux_syn(src);
        let (action, out) = dp.run_tc_frame(&syn.bytes());
        assert_eq!(action, TC_ACT_REDIRECT, "{src}");
        let s = decode_tcp(&out).expect("the SYN-ACK decodes");
        assert_eq!(s.flags, TCP_SYN | TCP_ACK);
        assert!(s.ip_checksum_ok && s.tcp_checksum_ok, "{src}");
        assert!(host_check(&flow_of(&syn, 40000), CLIENT_ISN, s.seq).is_some());
    }
}

/// The ACK check needs a listener on the port: lookups find it in this
/// (the test's) network namespace. One test owns the port, so parallel
/// tests never race for it.
#[test]
fn replies_are_checked_genuine_forged_foreign_stale_and_capped() {
    let listen_port = 18_443;
    let _listener = TcpListener::bind(("0.0.0.0", listen_port)).expect("listen");
    let _listener6 = TcpListener::bind(("::", listen_port)).ok();
    let mut dp = Dp::with_cookies();
    dp.dp
        .maps_mut()
        .set_ports(&[PORT, listen_port])
        .expect("ports");
    // Replies go to the listener's port; the SYN-ACK came from it.
    let syn_to = |src: IpAddr, port: u16| linux_syn(src).tcp_ports(port, listen_port);
    let reply_to = |syn: &Frame, s: &Segment, port: u16| reply(syn, s).tcp_ports(port, listen_port);
    // The reply check is its own tc program behind either attach.
    {
        let run = |dp: &Dp, f: &[u8]| dp.run_cookie_ack(f);
        let before = |dp: &Dp| {
            [
                Stat::CookieAckValid,
                Stat::CookieAckInvalid,
                Stat::CookieAckOverCap,
                Stat::CookieAckAssignFailed,
            ]
            .map(|s| dp.stat(s))
        };
        let src = v4(198, 19, 8, 8);
        let syn = syn_to(src, 41000);
        let s = answered(&dp, &syn);
        assert_eq!(s.src_port, listen_port);

        // Genuine: handed over (test-run skbs are not at tc ingress, which
        // the kernel requires for the hand-over, so "refused" counts too:
        // either way the cookie was recognised).
        let b = before(&dp);
        assert_eq!(run(&dp, &reply_to(&syn, &s, 41000).bytes()), TCX_NEXT);
        let a = before(&dp);
        assert_eq!(a[0] + a[3], b[0] + b[3] + 1, "recognised as genuine");
        assert_eq!(a[1], b[1], "not invalid");

        // Forged: one bit off in the acknowledgment.
        let mut forged = reply_to(&syn, &s, 41000);
        forged = forged.tcp_seq_ack(CLIENT_ISN + 1, s.seq.wrapping_add(2));
        let b = before(&dp);
        assert_eq!(run(&dp, &forged.bytes()), TCX_NEXT, "left to the kernel");
        assert_eq!(before(&dp)[1], b[1] + 1, "forged counts invalid");

        // Foreign: the same cookie replayed from another source or port.
        let mut other_src = reply_to(&syn, &s, 41000);
        other_src.src = v4(198, 19, 8, 9);
        let b = before(&dp);
        run(&dp, &other_src.bytes());
        assert_eq!(before(&dp)[1], b[1] + 1, "another source");
        let b = before(&dp);
        run(&dp, &reply_to(&syn, &s, 41001).bytes());
        assert_eq!(before(&dp)[1], b[1] + 1, "another port");

        // Stale: made with a key two epochs old (the slot it would use now
        // holds a different key) and with a key that was rotated away.
        let flow = Flow {
            client: AddrWords::from_addr(&from_ip(src)),
            server: AddrWords::from_addr(&from_ip(syn.dst)),
            client_port: 41002,
            server_port: listen_port,
        };
        let now = syncookie::epoch_of(monotonic_ns());
        let n = syncookie::Negotiated::from_syn(false, 1460, true, Some(7), syncookie::OPT_ALL);
        let old = now - 2;
        let stale = syncookie::make(
            &cookie_key(syncookie::key_slot(old)),
            &flow,
            CLIENT_ISN,
            old,
            &n,
        );
        let mut stale_ack = reply_to(&syn, &s, 41002);
        stale_ack = stale_ack.tcp_seq_ack(CLIENT_ISN + 1, stale.wrapping_add(1));
        let b = before(&dp);
        run(&dp, &stale_ack.bytes());
        assert_eq!(before(&dp)[1], b[1] + 1, "stale");
    }

    // Rotation: a valid cookie stops checking once its key is replaced.
    let syn = syn_to(v4(198, 19, 8, 20), 42000);
    let s = answered(&dp, &syn);
    let epoch = syncookie::epoch_for(s.seq, syncookie::epoch_of(monotonic_ns()));
    dp.dp
        .maps_mut()
        .set_cookie_key(syncookie::key_slot(epoch), &CookieKey { k0: 9, k1: 9 })
        .expect("rotate");
    let b = dp.stat(Stat::CookieAckInvalid);
    dp.run_cookie_ack(&reply_to(&syn, &s, 42000).bytes());
    assert_eq!(dp.stat(Stat::CookieAckInvalid), b + 1, "rotated away");
    dp.dp
        .maps_mut()
        .set_cookie_key(
            syncookie::key_slot(epoch),
            &cookie_key(syncookie::key_slot(epoch)),
        )
        .expect("restore");

    // A proven source is capped like any other: burst 1, no refill (set
    // once both SYN-ACKs went out, which the same cap bounds per address).
    let src = v4(198, 19, 8, 30);
    let first = syn_to(src, 43000);
    let s1 = answered(&dp, &first);
    let second = syn_to(src, 43001);
    let s2 = answered(&dp, &second);
    dp.config(|c| {
        c.syn_rate = 0;
        c.syn_burst = 1;
    });
    let over = dp.stat(Stat::CookieAckOverCap);
    assert_eq!(
        dp.run_cookie_ack(&reply_to(&first, &s1, 43000).bytes()),
        TCX_NEXT
    );
    assert_eq!(
        dp.run_cookie_ack(&reply_to(&second, &s2, 43001).bytes()),
        TC_ACT_SHOT
    );
    assert_eq!(dp.stat(Stat::CookieAckOverCap), over + 1);
}

#[test]
fn acks_cost_no_check_while_no_cookie_can_be_outstanding() {
    let listen_port = 18_444;
    let _listener = TcpListener::bind(("0.0.0.0", listen_port)).expect("listen");
    let mut dp = Dp::with_cookies();
    dp.dp
        .maps_mut()
        .set_ports(&[PORT, listen_port])
        .expect("ports");
    let ack = Frame::syn(v4(198, 19, 9, 1), listen_port)
        .tcp_flags(TCP_ACK)
        .tcp_seq_ack(5, 6);
    assert_eq!(dp.run_cookie_ack(&ack.bytes()), TCX_NEXT);
    let checked: u64 = [
        Stat::CookieAckValid,
        Stat::CookieAckInvalid,
        Stat::CookieAckOverCap,
        Stat::CookieAckAssignFailed,
    ]
    .iter()
    .map(|s| dp.stat(*s))
    .sum();
    assert_eq!(checked, 0, "no cookie sent yet: the ACK was not checked");
    // Once one was sent, the same ACK is checked (and is not ours).
    answered(&dp, &linux_syn(v4(198, 19, 9, 2)));
    dp.run_cookie_ack(&ack.bytes());
    assert_eq!(dp.stat(Stat::CookieAckInvalid), 1);
}

/// Issue 24, finding 7: with cookies on, every forged SYN drew a SYN-ACK toward the address
/// it named (3 000 of 3 000 reflected). They are now capped per destination like SYNs per
/// source.
#[test]
fn synacks_toward_one_address_are_capped_so_forged_syns_are_not_reflected() {
    let mut dp = Dp::with_cookies();
    dp.config(|c| {
        c.syn_rate = 0;
        c.syn_burst = 40;
    });
    let victim = v4(198, 19, 11, 1);
    let mut reflected = 0;
    for port in 0..3000u16 {
        let syn = linux_syn(victim).tcp_ports(20_000 + port, PORT);
        match dp.run_xdp(&syn.bytes()) {
            XdpOutcome::Tx(_) => reflected += 1,
            XdpOutcome::Drop => {}
            XdpOutcome::Pass => panic!("a SYN from an unproven source passed"),
        }
    }
    assert_eq!(
        reflected, 40,
        "no more SYN-ACKs toward one address than its burst"
    );
    assert_eq!(dp.stat(Stat::CookieSent), 40);
    assert_eq!(dp.stat(Stat::DropSynAckRate), 2960);
    assert_eq!(
        dp.stat(Stat::SourcesCreated),
        0,
        "still nothing tracked per source"
    );
    // Every other address gets its own share.
    answered(&dp, &linux_syn(v4(198, 19, 11, 2)));
    dp.config(|c| c.flags |= FLAG_DRY_RUN);
    assert_eq!(
        dp.verdict(&linux_syn(victim).bytes()),
        (V::Pass, Stat::WouldDropSynAckRate)
    );
}

/// The reply-check rig: a listener on `port` (lookups find it in the test's namespace) and
/// a program with cookies on protecting it.
fn reply_rig(port: u16) -> (TcpListener, Dp) {
    let listener = TcpListener::bind(("0.0.0.0", port)).expect("listen");
    let mut dp = Dp::with_cookies();
    dp.dp.maps_mut().set_ports(&[PORT, port]).expect("ports");
    (listener, dp)
}

/// Replies the check recognised as genuine (handed over, or refused by the kernel because a
/// test-run skb is not at tc ingress).
fn recognised(dp: &Dp) -> u64 {
    dp.stat(Stat::CookieAckValid) + dp.stat(Stat::CookieAckAssignFailed)
}

/// Issue 24, findings 1 and 7: a genuine reply to a cookie was charged only to the rate
/// caps, and counted valid even from a blocked source.
#[test]
fn a_cookie_reply_meets_what_its_syn_would_blocks_and_conn_limit_included() {
    let listen_port = 18_445;
    let (_listener, mut dp) = reply_rig(listen_port);
    dp.config(|c| c.conn_limit = 2);
    let syn_to = |src: IpAddr, port: u16| linux_syn(src).tcp_ports(port, listen_port);
    let reply_to = |syn: &Frame, s: &Segment, port: u16| reply(syn, s).tcp_ports(port, listen_port);

    // Blocked after its SYN was answered: its reply is dropped, and not counted valid.
    let blocked = v4(198, 19, 12, 1);
    let syn = syn_to(blocked, 44000);
    let s = answered(&dp, &syn);
    dp.block("198.19.12.1/32", 0);
    let before = recognised(&dp);
    assert_eq!(
        dp.run_cookie_ack(&reply_to(&syn, &s, 44000).bytes()),
        TC_ACT_SHOT
    );
    assert_eq!(dp.stat(Stat::CookieAckBlocked), 1);
    assert_eq!(
        recognised(&dp),
        before,
        "a blocked source's reply is not valid"
    );

    // A source holding its cap by the time its reply comes (its SYN found it under) has
    // the reply refused, however genuine.
    let src = v4(198, 19, 12, 2);
    let key = from_ip(src);
    let syn = syn_to(src, 44001);
    let s = answered(&dp, &syn);
    dp.dp.maps_mut().conns.insert(key, 2u64, 0).unwrap();
    assert_eq!(
        dp.run_cookie_ack(&reply_to(&syn, &s, 44001).bytes()),
        TC_ACT_SHOT
    );
    assert_eq!(dp.stat(Stat::CookieAckConnLimit), 1);
    assert_eq!(recognised(&dp), before);

    // Under it, the reply is admitted and charged as a handshake in flight until it is
    // established; a connection the kernel refuses to build gives its charge back at once.
    dp.dp.maps_mut().conns.insert(key, 1u64, 0).unwrap();
    let syn = syn_to(src, 44002);
    let s = answered(&dp, &syn);
    assert_eq!(
        dp.run_cookie_ack(&reply_to(&syn, &s, 44002).bytes()),
        TCX_NEXT
    );
    assert_eq!(recognised(&dp), before + 1);
    assert_eq!(dp.stat(Stat::HandshakeCharged), 1);
    let in_flight = dp.dp.maps().in_flight.get(&key, 0).expect("charged");
    assert_eq!(in_flight.counts.iter().sum::<u64>(), 0, "given back");
}

/// Issue 24, finding 7: invalid replies were limited only globally, so about 2^23 of them
/// forged a connection from any address. Now a source, its prefix, and (once they failed)
/// everyone together run out of guesses, and a correct guess past that gets nothing.
#[test]
fn guesses_at_a_cookie_are_limited_per_source_per_prefix_and_for_all_who_failed() {
    let listen_port = 18_446;
    let (_listener, mut dp) = reply_rig(listen_port);
    dp.config(|c| {
        c.invalid_ack_rate = 0;
        c.invalid_ack_burst = 3;
        c.invalid_ack_aggregate_rate = 0;
        c.invalid_ack_aggregate_burst = 5;
        c.invalid_ack_global_burst = 0;
    });
    let syn_to = |src: IpAddr, port: u16| linux_syn(src).tcp_ports(port, listen_port);
    let reply_to = |syn: &Frame, s: &Segment, port: u16| reply(syn, s).tcp_ports(port, listen_port);
    let guess = |syn: &Frame, s: &Segment, port: u16, k: u32| {
        reply_to(syn, s, port).tcp_seq_ack(CLIENT_ISN + 1, s.seq.wrapping_add(2 + k))
    };

    let guesser = v4(198, 19, 13, 1);
    let syn = syn_to(guesser, 45000);
    let s = answered(&dp, &syn);
    for k in 0..3 {
        assert_eq!(
            dp.run_cookie_ack(&guess(&syn, &s, 45000, k).bytes()),
            TCX_NEXT,
            "guess {k}: checked, wrong, left to the kernel"
        );
    }
    assert_eq!(dp.stat(Stat::CookieAckInvalid), 3);
    assert_eq!(
        dp.run_cookie_ack(&guess(&syn, &s, 45000, 3).bytes()),
        TC_ACT_SHOT
    );
    // The right answer, past the limit, is refused unchecked like any other guess.
    let before = recognised(&dp);
    assert_eq!(
        dp.run_cookie_ack(&reply_to(&syn, &s, 45000).bytes()),
        TC_ACT_SHOT
    );
    assert_eq!(recognised(&dp), before);
    assert_eq!(dp.stat(Stat::CookieAckLimited), 2);
    assert_eq!(
        dp.stat(Stat::CookieAckInvalid),
        3,
        "nothing more was checked"
    );

    // Its neighbour has the prefix's last two guesses.
    let neighbour = v4(198, 19, 13, 2);
    let syn = syn_to(neighbour, 45001);
    let s = answered(&dp, &syn);
    for k in 0..2 {
        assert_eq!(
            dp.run_cookie_ack(&guess(&syn, &s, 45001, k).bytes()),
            TCX_NEXT
        );
    }
    assert_eq!(
        dp.run_cookie_ack(&guess(&syn, &s, 45001, 2).bytes()),
        TC_ACT_SHOT,
        "the /24 is out of guesses"
    );
    // Elsewhere, replies are checked as before.
    let other = v4(198, 19, 14, 1);
    let syn = syn_to(other, 45002);
    let s = answered(&dp, &syn);
    let before = recognised(&dp);
    assert_eq!(
        dp.run_cookie_ack(&reply_to(&syn, &s, 45002).bytes()),
        TCX_NEXT
    );
    assert_eq!(recognised(&dp), before + 1);

    // Everyone together: a budget of two failures. Once it is spent, sources that failed
    // before are refused unchecked, while one that never sent a wrong reply is still
    // checked (so a flood of forged replies cannot shut new clients out).
    dp.config(|c| {
        c.invalid_ack_burst = 1000;
        c.invalid_ack_aggregate_burst = 1000;
        c.invalid_ack_global_rate = 1;
        c.invalid_ack_global_burst = 2;
    });
    let (a, b, fresh) = (v4(198, 19, 15, 1), v4(198, 19, 16, 1), v4(198, 19, 17, 1));
    let (syn_a, syn_b, syn_f) = (syn_to(a, 46000), syn_to(b, 46001), syn_to(fresh, 46002));
    let (s_a, s_b, s_f) = (
        answered(&dp, &syn_a),
        answered(&dp, &syn_b),
        answered(&dp, &syn_f),
    );
    let limited = dp.stat(Stat::CookieAckLimited);
    dp.run_cookie_ack(&guess(&syn_a, &s_a, 46000, 0).bytes());
    dp.run_cookie_ack(&guess(&syn_b, &s_b, 46001, 0).bytes());
    assert_eq!(
        dp.run_cookie_ack(&guess(&syn_a, &s_a, 46000, 1).bytes()),
        TC_ACT_SHOT,
        "failed before, and everyone's budget is spent"
    );
    assert_eq!(dp.stat(Stat::CookieAckLimited), limited + 1);
    let before = recognised(&dp);
    assert_eq!(
        dp.run_cookie_ack(&reply_to(&syn_f, &s_f, 46002).bytes()),
        TCX_NEXT
    );
    assert_eq!(
        recognised(&dp),
        before + 1,
        "a client that never failed gets in"
    );
}
