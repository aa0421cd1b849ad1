//! The lab-client workloads the demo's scenarios and their end-to-end tests launch from the
//! attacker namespace, typed: a scenario and its test start the same attack through the same
//! function and differ only in the numbers they pass.

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use anyhow::Result;

use super::{args, attacker_ip, Stack};
use crate::lab::{ATTACKER_V4, ROLE_IF};
use crate::report::{ConnFloodReport, ProbeReport, SlowHeadsReport, StormReport, WsFloodReport};
use crate::ClientRun;

/// How long past its own end a workload may run before it is killed: room for its last
/// connects to time out and for it to print its report.
const SLACK: Duration = Duration::from_secs(15);

fn budget(secs: u32) -> Duration {
    Duration::from_secs(u64::from(secs)) + SLACK
}

/// `lab-client conn-flood`: up to `count` connects, `parallel` in flight, each held `hold_ms`
/// and given up after `connect_timeout_ms` (so an unanswered attempt costs about one SYN
/// below 1 s), for `secs` seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnFlood {
    pub count: u64,
    pub parallel: u32,
    pub hold_ms: u32,
    pub connect_timeout_ms: u32,
    pub secs: u32,
}

/// Which handshake a storm repeats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StormKind {
    WebSocket,
    Sse,
}

/// `lab-client ws-storm` / `sse-storm`: up to `count` handshakes, `parallel` at a time,
/// each held `hold_ms`, given up after `timeout_ms`, for `secs` seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Storm {
    pub kind: StormKind,
    pub count: u64,
    pub parallel: u32,
    pub hold_ms: u32,
    pub timeout_ms: u32,
    pub secs: u32,
}

/// Where the slow-heads sources live: 2 046 host addresses (eight /24s) outside the spoofed
/// floods' range, so that neither their routes nor the switch's sink for forged sources
/// touch them.
pub const SLOW_NET: (Ipv4Addr, u8) = (Ipv4Addr::new(198, 18, 64, 0), 21);

/// `lab-client slow-heads`: the first `sources` addresses of [`SLOW_NET`], each holding one
/// request head that never ends (a header line every `interval_ms`), reopened `reconnect_ms`
/// after the server closes it; first connects spread over `ramp_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlowHeads {
    pub sources: u32,
    pub interval_ms: u32,
    pub reconnect_ms: u32,
    pub ramp_ms: u32,
    pub connect_timeout_ms: u32,
    pub secs: u32,
}

impl Stack {
    /// Slow request heads from many real sources (see [`SlowHeads`]).
    pub fn slow_heads(&self, s: SlowHeads) -> Result<ClientRun<SlowHeadsReport>> {
        self.own_slow_net()?;
        self.attacker(
            args(&[
                "slow-heads",
                "--target",
                &self.app_addr().to_string(),
                "--src-net",
                &format!("{}/{}", SLOW_NET.0, SLOW_NET.1),
                "--sources",
                &s.sources.to_string(),
                "--interval-ms",
                &s.interval_ms.to_string(),
                "--reconnect-ms",
                &s.reconnect_ms.to_string(),
                "--ramp-ms",
                &s.ramp_ms.to_string(),
                "--connect-timeout-ms",
                &s.connect_timeout_ms.to_string(),
                "--secs",
                &s.secs.to_string(),
            ]),
            budget(s.secs),
        )
    }

    /// The distinct sources in [`SLOW_NET`] the agent blocked for slow connections, from the
    /// audit records after the first `skip`.
    pub fn slow_sources_blocked(&self, skip: usize) -> Result<usize> {
        let in_slow_net = |prefix: &str| {
            prefix
                .split('/')
                .next()
                .and_then(|ip| ip.parse::<Ipv4Addr>().ok())
                .is_some_and(|ip| {
                    let mask = u32::MAX << (32 - u32::from(SLOW_NET.1));
                    u32::from(ip) & mask == u32::from(SLOW_NET.0)
                })
        };
        let blocked: std::collections::BTreeSet<String> = self
            .audit()?
            .into_iter()
            .skip(skip)
            .filter(|r| r["event"] == "block" && r["reason"] == "slow_connections")
            .filter_map(|r| r["prefix"].as_str().map(str::to_owned))
            .filter(|p| in_slow_net(p))
            .collect();
        Ok(blocked.len())
    }

    /// Gives the attacker namespace every address of [`SLOW_NET`] at once (a `local` route:
    /// the kernel's "AnyIP", instead of a thousand `ip addr add`) and routes the range to it
    /// from the server. Idempotent; the routes go away with the namespaces.
    fn own_slow_net(&self) -> Result<()> {
        let net = format!("{}/{}", SLOW_NET.0, SLOW_NET.1);
        self.lab
            .attacker
            .ip(&["route", "replace", "local", &net, "dev", "lo"])?;
        self.lab.server.ip(&[
            "route",
            "replace",
            &net,
            "via",
            &ATTACKER_V4.to_string(),
            "dev",
            ROLE_IF,
        ])?;
        Ok(())
    }

    /// A connection flood from the attacker's own address.
    pub fn conn_flood(&self, f: ConnFlood) -> Result<ClientRun<ConnFloodReport>> {
        self.conn_flood_from(attacker_ip(), f)
    }

    /// A connection flood from `source`, one of the attacker namespace's addresses.
    pub fn conn_flood_from(
        &self,
        source: IpAddr,
        f: ConnFlood,
    ) -> Result<ClientRun<ConnFloodReport>> {
        self.attacker(
            args(&[
                "conn-flood",
                "--target",
                &self.app_addr().to_string(),
                "--bind",
                &source.to_string(),
                "--count",
                &f.count.to_string(),
                "--parallel",
                &f.parallel.to_string(),
                "--hold-ms",
                &f.hold_ms.to_string(),
                "--connect-timeout-ms",
                &f.connect_timeout_ms.to_string(),
                "--secs",
                &f.secs.to_string(),
            ]),
            budget(f.secs),
        )
    }

    /// Many real sources at once: one connection flood per address of `sources` (see
    /// `attacker_sources`).
    pub fn conn_floods(
        &self,
        sources: &[std::net::Ipv4Addr],
        f: ConnFlood,
    ) -> Result<Vec<ClientRun<ConnFloodReport>>> {
        sources
            .iter()
            .map(|ip| self.conn_flood_from((*ip).into(), f))
            .collect()
    }

    /// A handshake storm from the attacker's address against the app's WebSocket or SSE
    /// endpoint.
    pub fn storm(&self, s: Storm) -> Result<ClientRun<StormReport>> {
        self.attacker(self.storm_args(s, attacker_ip()), budget(s.secs))
    }

    /// The same handshakes from `from`, an address of the legit namespace (see
    /// `fresh_legit_sources`): newcomers arriving during an attack, every one of whom should
    /// get in. They run on the server's core, like the other legit clients.
    pub fn newcomers(&self, s: Storm, from: Ipv4Addr) -> Result<ClientRun<StormReport>> {
        self.client.spawn(
            &self.lab.legit,
            &self.storm_args(s, IpAddr::V4(from)),
            self.cpus.server,
            budget(s.secs),
        )
    }

    fn storm_args(&self, s: Storm, bind: IpAddr) -> Vec<String> {
        let (cmd, url) = match s.kind {
            StormKind::WebSocket => ("ws-storm", self.ws_url()),
            StormKind::Sse => ("sse-storm", self.sse_url()),
        };
        args(&[
            cmd,
            "--url",
            &url,
            "--bind",
            &bind.to_string(),
            "--count",
            &s.count.to_string(),
            "--parallel",
            &s.parallel.to_string(),
            "--hold-ms",
            &s.hold_ms.to_string(),
            "--timeout-ms",
            &s.timeout_ms.to_string(),
            "--secs",
            &s.secs.to_string(),
        ])
    }

    /// One admitted WebSocket client sending `rate` messages a second for at most `secs`
    /// seconds (it stops early when the server closes it).
    pub fn ws_flood(&self, rate: u32, secs: u32) -> Result<ClientRun<WsFloodReport>> {
        self.attacker(
            args(&[
                "ws-flood",
                "--url",
                &self.ws_url(),
                "--bind",
                &attacker_ip().to_string(),
                "--rate",
                &rate.to_string(),
                "--secs",
                &secs.to_string(),
            ]),
            budget(secs),
        )
    }

    /// `count` sequential connects from the attacker's address, `interval_ms` apart: whether
    /// it can reach the app at all.
    pub fn attacker_probe(&self, count: u32, interval_ms: u32) -> Result<ClientRun<ProbeReport>> {
        self.attacker(
            args(&[
                "probe",
                "--target",
                &self.app_addr().to_string(),
                "--bind",
                &attacker_ip().to_string(),
                "--count",
                &count.to_string(),
                "--interval-ms",
                &interval_ms.to_string(),
            ]),
            // Each connect may take its 3 s default connect timeout, then the interval.
            Duration::from_millis(u64::from(count) * (3000 + u64::from(interval_ms))) + SLACK,
        )
    }
}
