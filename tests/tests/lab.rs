//! Privileged smoke tests of the lab toolkit itself: topology, lab-client, the flood tools'
//! wiring, and cleanup. Run as root with `--test-threads=1` (they share the host's kernel).
//! Without root each test says it was skipped and returns.

use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::time::Duration;

use guard_tests::lab::{self, Lab, ATTACKER_V4, LEGIT_V4, LEGIT_V6, SERVER_V4, SERVER_V6};
use guard_tests::report::{ConnFloodReport, EchoReport};
use guard_tests::{
    hping3_syn_flood, require_root, syn_loss_probe_with, ClientRun, LabClient, Netns,
};

const ECHO_PORT: u16 = 9000;

fn client() -> LabClient {
    LabClient::at(env!("CARGO_BIN_EXE_lab-client"))
}

/// An echo server with a real backlog on both server addresses' wildcard.
fn serve_echo(lab: &Lab, secs: u32) -> ClientRun<EchoReport> {
    let args: Vec<String> = [
        "serve-echo",
        "--listen",
        &format!("[::]:{ECHO_PORT}"),
        "--secs",
        &secs.to_string(),
    ]
    .map(String::from)
    .into();
    let mut server = client()
        .spawn(
            &lab.server,
            &args,
            None,
            Duration::from_secs(u64::from(secs) + 10),
        )
        .expect("start serve-echo");
    server
        .wait_ready("listening on", Duration::from_secs(10))
        .expect("serve-echo ready");
    server
}

fn snmp(ns: &Netns, group: &str, field: &str) -> u64 {
    ns.counter(group, field)
        .unwrap_or_else(|e| panic!("{group}:{field}: {e:#}"))
}

fn netns_exists(name: &str) -> bool {
    Path::new("/run/netns").join(name).exists()
}

fn assert_gone(names: &[String]) {
    for name in names {
        assert!(!netns_exists(name), "netns {name} left behind");
    }
    let mine = format!("-{}-", std::process::id());
    let left: Vec<String> = guard_tests::netns::leftovers()
        .unwrap()
        .into_iter()
        .filter(|l| l.contains(&mine))
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

#[test]
fn lab_carries_tcp_both_families_and_cleans_up() {
    if !require_root("lab_carries_tcp_both_families_and_cleans_up") {
        return;
    }
    let names: Vec<String>;
    {
        let lab = Lab::new().expect("build the lab");
        names = lab
            .namespaces()
            .iter()
            .map(|n| n.name().to_string())
            .collect();
        assert!(names.iter().all(|n| netns_exists(n)));
        // Every veth lives inside the lab: nothing of it shows on the host.
        let mine = format!("-{}-", std::process::id());
        let on_host: Vec<String> = guard_tests::netns::leftovers()
            .unwrap()
            .into_iter()
            .filter(|l| l.starts_with("link ") && l.contains(&mine))
            .collect();
        assert!(on_host.is_empty(), "{on_host:?}");
        // No namespace may have a default route: only lab addresses are reachable.
        for ns in lab.namespaces() {
            for family in ["-4", "-6"] {
                let routes = ns.ip(&[family, "route", "show", "default"]).unwrap();
                assert!(routes.trim().is_empty(), "{}: {routes}", ns.name());
            }
        }
        assert_eq!(lab.server.mac(Lab::server_if()).unwrap(), lab::SERVER_MAC);

        let server = serve_echo(&lab, 60);
        let c = client();
        // Main, extra and IPv6 legit sources all reach the server, and without a flood no
        // SYN is lost.
        for (src, dst) in [
            (IpAddr::from(LEGIT_V4), IpAddr::from(SERVER_V4)),
            (Ipv4Addr::new(198, 18, 0, 17).into(), SERVER_V4.into()),
            (LEGIT_V6.into(), SERVER_V6.into()),
        ] {
            let p = syn_loss_probe_with(&c, &lab.legit, src, dst, ECHO_PORT, 50, 2, None)
                .unwrap_or_else(|e| panic!("probe from {src}: {e:#}"));
            assert_eq!(
                (p.attempted, p.connected, p.lost_syn),
                (50, 50, 0),
                "{src}: {p:?}"
            );
        }
        // The default probe finds lab-client next to the test binary by itself.
        let p = guard_tests::syn_loss_probe(
            &lab.legit,
            Ipv4Addr::new(198, 18, 0, 10).into(),
            SERVER_V4.into(),
            ECHO_PORT,
            20,
        )
        .unwrap();
        assert_eq!((p.attempted, p.connected, p.lost_syn), (20, 20, 0), "{p:?}");
        // A source the namespace does not own is a clear error, not a count.
        let err = syn_loss_probe_with(
            &c,
            &lab.legit,
            ATTACKER_V4.into(),
            SERVER_V4.into(),
            ECHO_PORT,
            1,
            1,
            None,
        )
        .unwrap_err();
        assert!(format!("{err:#}").contains("cannot bind"), "{err:#}");

        // Real handshakes in parallel from the attacker: all complete against a real backlog.
        let args: Vec<String> = [
            "conn-flood",
            "--target",
            &format!("{SERVER_V4}:{ECHO_PORT}"),
            "--bind",
            &ATTACKER_V4.to_string(),
            "--count",
            "300",
            "--parallel",
            "30",
            "--hold-ms",
            "5",
            "--secs",
            "20",
        ]
        .map(String::from)
        .into();
        let f: ConnFloodReport = c
            .run(&lab.attacker, &args, Duration::from_secs(30))
            .unwrap();
        assert_eq!((f.attempted, f.connected), (300, 300), "{f:?}");

        // Counters are per namespace: the server counted the traffic, the bridge-only switch
        // namespace saw no TCP at all (the host's own counters would not be zero).
        assert!(snmp(&lab.server, "Tcp", "InSegs") > 450);
        assert_eq!(snmp(&lab.switch, "Tcp", "InSegs"), 0);

        let echo = server.stop().unwrap();
        // 3 probes of 50, one of 20, plus the flood's 300.
        assert_eq!(echo.accepted, 470, "{echo:?}");
    }
    assert_gone(&names);
}

#[test]
fn spoofed_hping3_flood_reaches_the_server_and_replies_die_at_the_attacker() {
    if !require_root("spoofed_hping3_flood_reaches_the_server_and_replies_die_at_the_attacker") {
        return;
    }
    let lab = Lab::new().expect("build the lab");
    let server = serve_echo(&lab, 30);
    let spoof: IpAddr = Ipv4Addr::new(198, 19, 0, 7).into();
    let server_in = snmp(&lab.server, "Tcp", "InSegs");
    let server_out = snmp(&lab.server, "Tcp", "OutSegs");
    let attacker_in = snmp(&lab.attacker, "Ip", "InReceives");

    // 2 s at 500 SYN/s: small enough that nothing on the path drops, so counts can be compared.
    let report = hping3_syn_flood(
        &lab.attacker,
        SERVER_V4.into(),
        ECHO_PORT,
        Some(spoof),
        2,
        Some(500),
        None,
    )
    .unwrap()
    .wait()
    .unwrap();
    let sent = report.sent.expect("hping3 statistics");
    assert!(sent > 0 && sent <= 1000, "{report:?}");

    let got = snmp(&lab.server, "Tcp", "InSegs") - server_in;
    assert!(got >= sent, "server saw {got} TCP segments of {sent} SYNs");
    // The server answered (SYN-ACKs or cookies) towards the spoofed source; the route sends
    // them to the attacker, which receives them and, not forwarding, drops them.
    let answered = snmp(&lab.server, "Tcp", "OutSegs") - server_out;
    assert!(
        answered >= sent,
        "server sent {answered} segments for {sent} SYNs"
    );
    let bounced = snmp(&lab.attacker, "Ip", "InReceives") - attacker_in;
    assert!(bounced >= sent, "attacker received {bounced} of {answered}");
    let echo = server.stop().unwrap();
    assert_eq!(
        echo.accepted, 0,
        "spoofed SYNs must never complete: {echo:?}"
    );
}

#[test]
fn hping3_full_speed_flood_stops_by_itself() {
    if !require_root("hping3_full_speed_flood_stops_by_itself") {
        return;
    }
    let lab = Lab::new().expect("build the lab");
    // --flood ignores -c: only the timeout bounds it. It must end within the budget and
    // still report its count.
    let report = hping3_syn_flood(
        &lab.attacker,
        SERVER_V4.into(),
        ECHO_PORT,
        Some(Ipv4Addr::new(198, 19, 0, 9).into()),
        2,
        None,
        None,
    )
    .unwrap()
    .wait()
    .unwrap();
    assert!(report.sent.unwrap_or(0) > 0, "{report:?}");
    // Outside the lab: refused before anything runs.
    assert!(hping3_syn_flood(
        &lab.attacker,
        Ipv4Addr::new(192, 0, 2, 1).into(),
        80,
        None,
        1,
        None,
        None
    )
    .is_err());
}

#[test]
fn trafgen_random_sources_reach_the_server() {
    if !require_root("trafgen_random_sources_reach_the_server") {
        return;
    }
    let lab = Lab::new().expect("build the lab");
    let server = serve_echo(&lab, 30);
    let before = snmp(&lab.server, "Tcp", "InSegs");
    let report = guard_tests::trafgen_random_sources(&random_sources(&lab, 1000, 2))
        .unwrap()
        .wait()
        .unwrap();
    let sent = report.sent.expect("trafgen statistics");
    assert_eq!(sent, 2000, "{report:?}");
    // Valid checksums and the right MAC: the server's TCP stack accepts them all.
    let got = snmp(&lab.server, "Tcp", "InSegs") - before;
    assert!(got >= sent, "server TCP took {got} of {sent}");
    assert_eq!(snmp(&lab.server, "Tcp", "InErrs"), 0);
    assert_eq!(server.stop().unwrap().accepted, 0);
}

/// SYNs from random sources in 198.19.0.0/16 to the echo server, `pps` for `secs`.
fn random_sources(lab: &Lab, pps: u32, secs: u32) -> guard_tests::SynFlood<'_> {
    guard_tests::SynFlood {
        ns: &lab.attacker,
        iface: Lab::attacker_if(),
        src_subnet: "198.19.0.0/16",
        dst: SERVER_V4,
        dst_mac: lab::SERVER_MAC,
        port: ECHO_PORT,
        pps,
        secs,
        cpu: None,
    }
}

#[test]
fn paced_syns_reach_the_server_with_valid_checksums() {
    if !require_root("paced_syns_reach_the_server_with_valid_checksums") {
        return;
    }
    let lab = Lab::new().expect("build the lab");
    let server = serve_echo(&lab, 30);
    let before = snmp(&lab.server, "Tcp", "InSegs");
    let errors_before = snmp(&lab.server, "Tcp", "InErrs");
    let report = guard_tests::tools::paced_syn_flood(&client(), &random_sources(&lab, 2000, 2))
        .unwrap()
        .wait()
        .unwrap();
    let sent = report.sent.expect("lab-client syn-flood's report");
    assert_eq!(sent, 4000, "{report:?}");
    // Checksums the server's TCP accepts: it takes every SYN and rejects none.
    let got = snmp(&lab.server, "Tcp", "InSegs") - before;
    assert!(got >= sent, "server TCP took {got} of {sent}");
    assert_eq!(snmp(&lab.server, "Tcp", "InErrs"), errors_before);
    assert_eq!(server.stop().unwrap().accepted, 0);
}

#[test]
fn slowhttptest_holds_connections_open() {
    if !require_root("slowhttptest_holds_connections_open") {
        return;
    }
    let lab = Lab::new().expect("build the lab");
    let server = serve_echo(&lab, 30);
    let report = guard_tests::slowhttptest(
        &lab.attacker,
        &format!("http://{SERVER_V4}:{ECHO_PORT}/"),
        20,
        3,
    )
    .unwrap()
    .wait()
    .unwrap();
    // The echo server never sends an HTTP response, so every slow connection stays open.
    assert_eq!(report.sent, Some(20), "{}", report.output);
    assert!(server.stop().unwrap().accepted >= 20);
}

#[test]
fn server_napi_thread_can_be_pinned() {
    if !require_root("server_napi_thread_can_be_pinned") {
        return;
    }
    let lab = Lab::new().expect("build the lab");
    let tid = lab.thread_server_napi().unwrap();
    guard_tests::process::pin_to_cpu(tid, 0).unwrap();
    let comm = std::fs::read_to_string(format!("/proc/{tid}/comm")).unwrap();
    assert!(comm.starts_with("napi/eth0-"), "{comm}");
    // Traffic still flows through the threaded path.
    let server = serve_echo(&lab, 30);
    let p = syn_loss_probe_with(
        &client(),
        &lab.legit,
        LEGIT_V4.into(),
        SERVER_V4.into(),
        ECHO_PORT,
        20,
        2,
        Some(0),
    )
    .unwrap();
    assert_eq!((p.connected, p.lost_syn), (20, 0), "{p:?}");
    server.stop().unwrap();
    drop(lab);
    // The thread belongs to the veth and dies with the namespace.
    let gone = (0..100).any(|_| {
        std::thread::sleep(Duration::from_millis(20));
        !Path::new(&format!("/proc/{tid}")).exists()
    });
    assert!(gone, "napi thread {tid} outlived the lab");
}

#[test]
fn lab_is_removed_when_a_test_panics() {
    if !require_root("lab_is_removed_when_a_test_panics") {
        return;
    }
    let (tx, rx) = std::sync::mpsc::channel();
    let outcome = std::thread::spawn(move || {
        let lab = Lab::new().expect("build the lab");
        let server = serve_echo(&lab, 60);
        tx.send((
            lab.namespaces()
                .iter()
                .map(|n| n.name().to_string())
                .collect::<Vec<_>>(),
            server.pid(),
        ))
        .unwrap();
        panic!("deliberate panic with a lab and a server running");
    })
    .join();
    assert!(outcome.is_err());
    let (names, pid) = rx.recv().unwrap();
    assert_gone(&names);
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "serve-echo (pid {pid}) survived the panic"
    );
}
