//! The verdict paths the benchmark times: the frame that takes each one, the live config it
//! needs and the counter that proves it was taken; the million sources' addresses.

use super::*;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub(super) enum Verdict {
    Pass,
    Drop,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub(super) enum Hook {
    Xdp,
    Tc,
}

impl Hook {
    pub(super) const BOTH: [Hook; 2] = [Hook::Xdp, Hook::Tc];

    pub(super) fn kind(self) -> AttachKind {
        match self {
            Hook::Xdp => AttachKind::XdpNative,
            Hook::Tc => AttachKind::Tc,
        }
    }

    pub(super) fn retval(self, v: Verdict) -> u32 {
        match (self, v) {
            (Hook::Xdp, Verdict::Pass) => XDP_PASS,
            (Hook::Xdp, Verdict::Drop) => XDP_DROP,
            (Hook::Tc, Verdict::Pass) => TC_ACT_OK,
            (Hook::Tc, Verdict::Drop) => TC_ACT_SHOT,
        }
    }
}

/// One verdict path: the frame that takes it, the live config it needs, and the counter that
/// proves it was taken.
pub(super) struct PathDef {
    pub(super) key: &'static str,
    pub(super) label: &'static str,
    pub(super) frame: Vec<u8>,
    pub(super) verdict: Verdict,
    pub(super) stat: Stat,
    pub(super) config: fn(&mut LiveConfig),
    /// The cheapest program that could take the same verdict: `Lookup` when the verdict
    /// depends on the source (any such filter looks the source up once).
    pub(super) reference: Ref,
}

/// Every path but the allow-listed one runs as the agent configures a host
/// without an operator allowlist (the program then skips that lookup); the
/// blocklist holds an entry throughout, as during an attack.
pub(super) fn paths() -> Vec<PathDef> {
    let syn = |a, b, c, d| Frame::syn(v4(a, b, c, d), PORT);
    vec![
        PathDef {
            key: "pass_unprotected",
            label: "pass: not TCP (UDP to the port)",
            frame: syn(198, 18, 0, 2).udp(PORT).bytes(),
            verdict: Verdict::Pass,
            stat: Stat::PassUnprotected,
            config: |c| c.flags |= FLAG_ALLOW_EMPTY,
            reference: Ref::Minimal(Verdict::Pass),
        },
        PathDef {
            key: "pass_allowlisted",
            label: "pass: allow-listed SYN",
            frame: syn(198, 18, 0, 16).bytes(),
            verdict: Verdict::Pass,
            stat: Stat::PassAllowlisted,
            config: |_| {},
            reference: Ref::Lookup(Verdict::Pass),
        },
        PathDef {
            key: "pass_syn_admitted",
            label: "pass: SYN admitted (tracked, under cap)",
            frame: syn(198, 18, 0, 10).bytes(),
            verdict: Verdict::Pass,
            stat: Stat::PassSyn,
            config: |c| {
                c.flags |= FLAG_ALLOW_EMPTY;
                c.syn_burst = HUGE_BURST;
            },
            reference: Ref::Lookup(Verdict::Pass),
        },
        PathDef {
            key: "pass_not_syn",
            label: "pass: ACK (not a SYN)",
            frame: syn(198, 18, 0, 2).tcp_flags(TCP_ACK).bytes(),
            verdict: Verdict::Pass,
            stat: Stat::PassNotSyn,
            config: |c| c.flags |= FLAG_ALLOW_EMPTY,
            reference: Ref::Minimal(Verdict::Pass),
        },
        PathDef {
            key: "drop_blocked",
            label: "drop: blocked source",
            frame: Frame::syn(blocked_ip(), PORT).bytes(),
            verdict: Verdict::Drop,
            stat: Stat::DropBlocked,
            config: |c| c.flags |= FLAG_ALLOW_EMPTY,
            reference: Ref::Lookup(Verdict::Drop),
        },
        PathDef {
            key: "drop_source_rate",
            label: "drop: source over its SYN cap",
            frame: syn(198, 18, 0, 2).bytes(),
            verdict: Verdict::Drop,
            stat: Stat::DropSourceRate,
            config: |c| c.flags |= FLAG_ALLOW_EMPTY,
            reference: Ref::Lookup(Verdict::Drop),
        },
        PathDef {
            key: "drop_aggregate",
            label: "drop: /24 over its aggregate cap",
            // Its own /24, so its aggregate entry is not shared with the other paths.
            frame: syn(198, 18, 1, 14).bytes(),
            verdict: Verdict::Drop,
            stat: Stat::DropAggregateRate,
            config: |c| {
                c.flags |= FLAG_ALLOW_EMPTY;
                c.syn_burst = HUGE_BURST;
                c.aggregate_rate = 1;
                c.aggregate_burst = 1;
            },
            reference: Ref::Lookup(Verdict::Drop),
        },
        PathDef {
            key: "dry_run_would_drop",
            label: "dry-run: would drop (over cap), passes",
            frame: syn(198, 18, 0, 2).bytes(),
            verdict: Verdict::Pass,
            stat: Stat::WouldDropSourceRate,
            config: |c| c.flags |= FLAG_DRY_RUN | FLAG_ALLOW_EMPTY,
            reference: Ref::Lookup(Verdict::Pass),
        },
    ]
}

/// The sources the drop paths drop, for the lookup references' table.
pub(super) fn drop_sources() -> Result<Vec<IpAddr>> {
    paths()
        .iter()
        .filter(|p| p.verdict == Verdict::Drop)
        .map(|p| {
            guard_tests::frames::decode_tcp(&p.frame)
                .map(|s| s.src)
                .with_context(|| format!("{}: its frame is no TCP segment", p.key))
        })
        .collect()
}

/// The config every measurement starts from: guard's defaults (20 SYN/s, burst 40), each IPv6
/// address its own source (for the population), and a wide event interval.
pub(super) fn base_config() -> LiveConfig {
    LiveConfig {
        source_prefix_v6: 128,
        event_interval_ms: EVENT_INTERVAL_MS,
        ..LiveConfig::DEFAULT
    }
}

/// The `i`-th population source, inside 2001:2::/48 (never 2001:2::1, the frames' target).
pub(super) fn population_ip(i: u32) -> IpAddr {
    IpAddr::V6(Ipv6Addr::new(
        0x2001,
        2,
        0,
        0x100 | (i >> 16) as u16,
        0,
        0,
        0,
        i as u16,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    pub(super) fn population_stays_in_the_benchmarking_range() {
        for i in [0, 1, 65_535, 65_536, MANY - 1] {
            let IpAddr::V6(ip) = population_ip(i) else {
                panic!("not IPv6")
            };
            assert_eq!(ip.segments()[..3], [0x2001, 2, 0]);
            assert_ne!(ip, "2001:2::1".parse::<Ipv6Addr>().unwrap());
        }
        let all: std::collections::HashSet<IpAddr> = (0..MANY).map(population_ip).collect();
        assert_eq!(all.len(), MANY as usize);
    }
}
