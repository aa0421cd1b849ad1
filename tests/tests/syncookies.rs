//! SYN cookies end to end: the real agent in the lab with `syn_cookies` on, real clients
//! connecting through cookies answered by the datapath, checked from both ends' `TCP_INFO`
//! (what the kernel built the connection with), the agent's counters, and data that flows.
//!
//! Root, one test at a time (they share bpffs): `cargo xtask test syncookies`.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd as _;
use std::time::Duration;

use guard_common::stats::Stat;
use guard_tests::agent::{wait_for, AgentHome, RunOpts};
use guard_tests::lab::{Lab, ROLE_IF, SERVER_V4, SERVER_V6};
use guard_tests::require_root;

const PORT: u16 = 8080;

/// What `TCP_INFO` says about a connection's negotiation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Negotiated {
    timestamps: bool,
    sack: bool,
    wscale: bool,
    snd_wscale: u8,
    rcv_wscale: u8,
    snd_mss: u32,
}

fn tcp_info(s: &TcpStream) -> Negotiated {
    let mut buf = [0u8; 232];
    let mut len = buf.len() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into our buffer.
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            buf.as_mut_ptr() as *mut libc::c_void,
            &mut len,
        )
    };
    assert_eq!(rc, 0, "TCP_INFO: {}", std::io::Error::last_os_error());
    // struct tcp_info: tcpi_options at 5, the two wscale nibbles at 6
    // (snd low, rcv high), tcpi_snd_mss at 16.
    let options = buf[5];
    Negotiated {
        timestamps: options & 1 != 0,
        sack: options & 2 != 0,
        wscale: options & 4 != 0,
        snd_wscale: buf[6] & 0x0f,
        rcv_wscale: buf[6] >> 4,
        snd_mss: u32::from_ne_bytes(buf[16..20].try_into().unwrap()),
    }
}

fn stat(home: &AgentHome, s: Stat) -> u64 {
    home.pins()
        .maps()
        .and_then(|m| m.stat(s).map_err(anyhow::Error::from))
        .unwrap_or_else(|e| panic!("read {}: {e:#}", s.name()))
}

/// Connects from the legit namespace, accepts in the server's, echoes `bytes` both ways and
/// returns both ends' view of the connection (client, server).
fn connect_and_echo(
    lab: &Lab,
    listener: &TcpListener,
    to: SocketAddr,
    bytes: usize,
) -> (Negotiated, Negotiated) {
    let client = lab
        .legit
        .run_in(|| TcpStream::connect_timeout(&to, Duration::from_secs(5)))
        .expect("enter the legit namespace")
        .unwrap_or_else(|e| panic!("connect to {to} through the cookie: {e}"));
    let server = accept_within(listener, Duration::from_secs(5))
        .unwrap_or_else(|| panic!("{to}: the client connected but the server got no connection"));
    for s in [&client, &server] {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
    }
    let data: Vec<u8> = (0..bytes).map(|i| (i % 251) as u8).collect();
    // Each direction on its own thread: the echo is larger than a receive buffer.
    std::thread::scope(|scope| {
        let (c, srv) = (&client, &server);
        let sent = data.clone();
        let sender = scope.spawn(move || {
            let mut c = c;
            c.write_all(&sent)
        });
        let echo = scope.spawn(move || {
            let mut got = vec![0u8; bytes];
            let mut srv = srv;
            srv.read_exact(&mut got)?;
            srv.write_all(&got)
        });
        let mut back = vec![0u8; bytes];
        (&client)
            .read_exact(&mut back)
            .expect("client reads the echo");
        sender.join().unwrap().expect("client writes");
        echo.join().unwrap().expect("server reads and echoes");
        assert!(back == data, "the echo is intact");
    });
    (tcp_info(&client), tcp_info(&server))
}

/// `accept` that gives up after `limit` (a cookie ACK the kernel did not take would leave
/// the client connected and the listener empty).
fn accept_within(listener: &TcpListener, limit: Duration) -> Option<TcpStream> {
    listener
        .set_nonblocking(true)
        .expect("nonblocking listener");
    let deadline = std::time::Instant::now() + limit;
    let got = loop {
        match listener.accept() {
            Ok((s, _)) => break Some(s),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if std::time::Instant::now() >= deadline {
                    break None;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("accept: {e}"),
        }
    };
    listener.set_nonblocking(false).expect("blocking listener");
    if let Some(s) = &got {
        s.set_nonblocking(false).expect("blocking stream");
    }
    got
}

#[test]
fn clients_connect_through_cookies_with_their_options_in_each_attach_mode() {
    if !require_root("clients_connect_through_cookies_with_their_options_in_each_attach_mode") {
        return;
    }
    for mode in ["xdp-native", "xdp-generic", "tc"] {
        let mut lab = Lab::new().expect("build the lab");
        lab.allow_xdp_tx().expect("XDP_TX on the lab's veth");
        let home = AgentHome::new().expect("agent home");
        let _agent = home
            .start(
                &lab.server,
                &RunOpts::new(ROLE_IF, PORT)
                    .attach(mode)
                    .set("syn_cookies=always"),
            )
            .unwrap_or_else(|e| panic!("{mode}: start the agent: {e:#}"));
        let listeners: Vec<(SocketAddr, TcpListener)> = [
            SocketAddr::new(SERVER_V4.into(), PORT),
            SocketAddr::new(SERVER_V6.into(), PORT),
        ]
        .into_iter()
        .map(|addr| {
            let l = lab
                .server
                .run_in(|| TcpListener::bind(addr))
                .unwrap()
                .expect("listen");
            (addr, l)
        })
        .collect();

        for (addr, listener) in &listeners {
            let sent = stat(&home, Stat::CookieSent);
            let valid = stat(&home, Stat::CookieAckValid);
            let (client, server) = connect_and_echo(&lab, listener, *addr, 1 << 20);
            let name = format!("{mode} {addr}");
            assert_eq!(
                stat(&home, Stat::CookieSent),
                sent + 1,
                "{name}: answered by cookie"
            );
            assert_eq!(
                stat(&home, Stat::CookieAckValid),
                valid + 1,
                "{name}: its ACK handed the connection over"
            );
            // Both ends agree on what a normal handshake gives: timestamps, SACK, window
            // scaling, each side's shift as the other announced it, a full-sized MSS.
            for (end, n) in [("client", client), ("server", server)] {
                assert!(n.timestamps && n.sack && n.wscale, "{name} {end}: {n:?}");
            }
            assert_eq!(
                client.snd_wscale, server.rcv_wscale,
                "{name}: {client:?} {server:?}"
            );
            assert_eq!(
                client.rcv_wscale, server.snd_wscale,
                "{name}: {client:?} {server:?}"
            );
            let full = if addr.is_ipv4() { 1460 - 12 } else { 1440 - 12 };
            assert_eq!(server.snd_mss, full, "{name}: server MSS {server:?}");
            assert_eq!(client.snd_mss, full, "{name}: client MSS {client:?}");
        }

        // The handshake proved the client: it is known good now, so its next SYN goes the
        // ordinary way (and is still admitted).
        let (addr, listener) = &listeners[0];
        let _ = wait_for("known-good", Duration::from_secs(5), || {
            Ok(home
                .pins()
                .maps()?
                .known_good
                .keys()
                .count()
                .ge(&1)
                .then_some(()))
        });
        let sent = stat(&home, Stat::CookieSent);
        let passed = stat(&home, Stat::PassSyn);
        connect_and_echo(&lab, listener, *addr, 1000);
        assert_eq!(
            stat(&home, Stat::CookieSent),
            sent,
            "{mode}: no cookie for a known source"
        );
        assert_eq!(stat(&home, Stat::PassSyn), passed + 1, "{mode}");
    }
}

#[test]
fn cookies_are_refused_live_without_a_budget_to_be_under_attack_against() {
    if !require_root("cookies_are_refused_live_without_a_budget_to_be_under_attack_against") {
        return;
    }
    let lab = Lab::new().expect("build the lab");
    let home = AgentHome::new().expect("agent home");
    let _agent = home
        .start(&lab.server, &RunOpts::new(ROLE_IF, PORT))
        .expect("start the agent");
    let socket = home.socket();
    let out = home
        .cli_output(&[
            "config",
            "--set",
            "syn_cookies=under-attack",
            "--control-socket",
            socket.to_str().expect("a UTF-8 path"),
        ])
        .expect("guard config");
    let text =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("global_syn_rate"), "{text}");
    let ok = home
        .ctl(&[
            "config",
            "--set",
            "syn_cookies=under-attack",
            "--set",
            "global_syn_rate=1000",
            "--set",
            "global_syn_burst=2000",
        ])
        .expect("set a budget and cookies together");
    assert!(ok.contains("syn_cookies"), "{ok}");
}
