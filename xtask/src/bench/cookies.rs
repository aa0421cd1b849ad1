//! `cargo xtask bench --cookies`: does a connection admitted by a SYN cookie carry data as
//! well as a normally admitted one? One lab, one agent with `syn_cookies = always`, and in
//! each round a WebSocket bulk transfer from a fresh client address (its SYN answered by the
//! datapath's cookie) and one from the same address again (now known-good: the ordinary
//! handshake), in alternating order. The ratio of the medians is the result; each transfer
//! is checked against guard's counters to have been admitted the way it claims.
//!
//! The lab has no netem, so its round trip is tens of microseconds and window scaling is
//! barely exercised here; that both ends negotiated it is proven by the e2e test
//! (`tests/tests/syncookies.rs`, from `TCP_INFO`).
#![cfg(feature = "lab")]

use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};

use anyhow::{ensure, Context as _, Result};
use guard_common::stats::Stat;
use guard_tests::agent::{AgentHome, RunOpts};
use guard_tests::lab::{Lab, LAB_V4_PREFIX, ROLE_IF, SERVER_V4};
use serde::Serialize;

use super::table::{median, Goal};

const PORT: u16 = 8080;
const GOAL_RATIO: f64 = 0.90;

#[derive(Debug, Serialize)]
pub struct CookieReport {
    pub bytes_per_transfer: usize,
    /// MB/s of each transfer, per way of admission.
    pub cookie_mb_s: Vec<f64>,
    pub normal_mb_s: Vec<f64>,
    pub ratio_of_medians: f64,
}

pub fn run(quick: bool) -> Result<CookieReport> {
    let (rounds, bytes) = if quick { (3, 64 << 20) } else { (7, 256 << 20) };
    println!("\n== WebSocket bulk transfer: cookie-admitted vs normally admitted connections");
    let mut lab = Lab::new().context("build the lab")?;
    lab.allow_xdp_tx()?;
    let sources: Vec<Ipv4Addr> = (0..rounds)
        .map(|i| Ipv4Addr::new(198, 18, 0, 40 + i as u8))
        .collect();
    for ip in &sources {
        lab.legit.ip(&[
            "addr",
            "add",
            &format!("{ip}/{LAB_V4_PREFIX}"),
            "dev",
            ROLE_IF,
        ])?;
    }
    let home = AgentHome::new()?;
    let _agent = home.start(
        &lab.server,
        &RunOpts::new(ROLE_IF, PORT)
            .attach("xdp-native")
            .set("syn_cookies=always"),
    )?;
    let listener = lab
        .server
        .run_in(|| TcpListener::bind(SocketAddr::new(SERVER_V4.into(), PORT)))??;
    let cookies_sent = || -> Result<u64> { Ok(home.pins().maps()?.stat(Stat::CookieSent)?) };

    let mut cookie = Vec::new();
    let mut normal = Vec::new();
    let mut one = |round: usize, src: Ipv4Addr, by_cookie: bool| -> Result<()> {
        let before = cookies_sent()?;
        let secs = guard_tests::ws_bulk::transfer(&listener, &lab.legit, IpAddr::V4(src), bytes)?;
        let answered = cookies_sent()? - before;
        ensure!(
            answered == u64::from(by_cookie),
            "round {round}: expected {} cookie for {src}, guard sent {answered}",
            u64::from(by_cookie)
        );
        let mb_s = bytes as f64 / secs / 1e6;
        let way = if by_cookie { "cookie" } else { "normal" };
        println!("  round {round}: {way} {mb_s:8.0} MB/s");
        if by_cookie {
            cookie.push(mb_s);
        } else {
            normal.push(mb_s);
        }
        Ok(())
    };
    for (round, src) in sources.iter().copied().enumerate() {
        // A fresh source is answered by cookie; one that connected before is known-good.
        // The order alternates so neither way always runs second, on a warmed-up path.
        match round.checked_sub(1).map(|prev| sources[prev]) {
            Some(prev) if round % 2 == 1 => {
                one(round, prev, false)?;
                one(round, src, true)?;
            }
            _ => {
                one(round, src, true)?;
                one(round, src, false)?;
            }
        }
    }
    let ratio = median(&cookie) / median(&normal).max(f64::MIN_POSITIVE);
    println!(
        "  median: cookie {:.0} MB/s, normal {:.0} MB/s, ratio {ratio:.2}",
        median(&cookie),
        median(&normal)
    );
    Ok(CookieReport {
        bytes_per_transfer: bytes,
        cookie_mb_s: cookie,
        normal_mb_s: normal,
        ratio_of_medians: ratio,
    })
}

impl CookieReport {
    pub fn goals(&self) -> Vec<Goal> {
        vec![Goal::new(
            "SYN cookies: WebSocket bulk throughput of a cookie-admitted connection",
            ">= 0.90x a normally admitted one",
            format!("{:.2}x", self.ratio_of_medians),
            Some(self.ratio_of_medians >= GOAL_RATIO),
        )]
    }
}
