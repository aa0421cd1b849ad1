//! The single-host scenarios: what each attacks with, how the app runs, what the run with
//! guard tunes first.
#![cfg(feature = "lab")]

use std::net::Ipv4Addr;

use anyhow::Result;
use serde::Serialize;

use super::attacks::*;
use guard_tests::stack::{Adaptive, AppOptions, Stack, WarpServer};

/// How long each phase's parts last.
#[derive(Debug, Clone, Copy, Serialize)]
pub(super) struct Timing {
    /// Legit clients alone first: the baseline.
    pub(super) warmup_secs: f64,
    pub(super) attack_secs: u32,
    /// Legit clients alone after the attack: recovery.
    pub(super) tail_secs: f64,
}

impl Timing {
    pub(super) fn legit_secs(&self) -> u32 {
        (self.warmup_secs + f64::from(self.attack_secs) + self.tail_secs).ceil() as u32
    }
}

/// What the attack tool reported.
pub(super) struct Attack {
    pub(super) summary: String,
    pub(super) detail: serde_json::Value,
}

pub(super) struct Scenario {
    pub(super) key: &'static str,
    pub(super) title: &'static str,
    /// Live config the run with guard sets through the control socket before the attack
    /// (`guard config --set`), without restarting anything.
    pub(super) tune: &'static [&'static str],
    /// The agent's adaptive mode, for the run with guard.
    pub(super) adaptive: Option<Adaptive>,
    /// How the app runs, the same in both runs.
    pub(super) app: AppOptions,
    pub(super) attack: fn(&Stack, &Timing) -> Result<Attack>,
    pub(super) in_short: bool,
    /// An attack that needs longer than the run's to show its effect (e.g. one that only
    /// bites once connections outlive a deadline) runs at least this many seconds.
    pub(super) min_attack_secs: u32,
}

impl Scenario {
    /// The run's timing, with this scenario's own attack length if it needs a longer one.
    pub(super) fn timing(&self, run: &Timing) -> Timing {
        Timing {
            attack_secs: run.attack_secs.max(self.min_attack_secs),
            ..*run
        }
    }
}

pub(super) const SPOOFED: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 7);
/// The floods' fixed offered rates (CPU cost compares between runs only at equal offered
/// work, which a flood tool's maximum rate is not): high
/// enough to load the server core without guard, low enough that a shared attacker core
/// sustains them.
pub(super) const ONE_SOURCE_PPS: u32 = 50_000;
pub(super) const RANDOM_SOURCES_PPS: u32 = 40_000;

/// The slot hoarder's pace: three quarters of the default per-source cap (20/s), so the
/// rate cap never fires, and the app it starves: 48 connection slots behind a backlog of 32
/// (a small server, so that one source fills it within the attack).
pub(super) const HOARD_PER_SEC: u32 = 15;
/// Both runs on plain `warp::serve`: the hoarder's connections never send a request, which
/// guard's server would close on its own (scenario 10 shows that layer); here the kernel's
/// `conn_limit` is what is shown.
pub(super) const HOARD_APP: AppOptions = AppOptions {
    backlog: 32,
    slots: Some(48),
    warp_server: WarpServer::Always,
    ..AppOptions::ROOMY
};
/// First-time clients during the random-source flood: fresh legit addresses
/// 198.18.0.40.. that never connected before.
pub(super) const FIRST_TIMER_BASE: u8 = 40;
pub(super) const FIRST_TIMERS: u8 = 16;
/// The overload: many real sources (198.18.0.100..), each keeping 40 connections in
/// flight and holding each for a second: 40 new connections a second per source, under
/// the generous static cap of 50/s the scenario sets, and together far more than the app's
/// slots hold.
pub(super) const OVERLOAD_SOURCE_BASE: u8 = 100;
pub(super) const OVERLOAD_SOURCES: u8 = 10;
pub(super) const OVERLOAD_PARALLEL: u32 = 40;
pub(super) const OVERLOAD_HOLD_MS: u32 = 1000;
pub(super) const OVERLOAD_APP: AppOptions = AppOptions {
    backlog: 64,
    slots: Some(200),
    // The kernel's adaptive caps are what is shown; guard's server would shed the overload's
    // idle connections itself.
    warp_server: WarpServer::Always,
    ..AppOptions::ROOMY
};

/// Slow request heads: 1 500 real sources (in 198.18.64.0/21), one never-ending head each,
/// against an app that starts at the open-files soft limit a systemd service gets (1 024), so
/// that together they hold more descriptors than it has. Without guard the app runs on plain
/// `warp::serve`, which bounds neither.
pub(super) const SLOW_SOURCES: u32 = 1500;
pub(super) const SLOW_APP: AppOptions = AppOptions {
    start_nofile: Some(1024),
    warp_server: WarpServer::WithoutGuard,
    ..AppOptions::ROOMY
};
/// Long enough for guard's head deadline (10 s) to close the first heads several times over,
/// and for the sources it reports to be seen blocked.
pub(super) const SLOW_ATTACK_SECS: u32 = 30;
/// Newcomers arrive once the slow heads had time to take hold (their ramp, then a head
/// deadline): fresh legit addresses 198.18.0.60 (WebSocket) and .61 (SSE), one handshake at
/// a time, each held half a second.
pub(super) const NEWCOMERS_AFTER_SECS: u32 = 15;
pub(super) const NEWCOMER_BASE: u8 = 60;

pub(super) const SCENARIOS: [Scenario; 10] = [
    Scenario {
        key: "syn-flood",
        title: "1. SYN flood, one spoofed source (198.19.0.7, 50k SYN/s evenly paced)",
        tune: &[],
        adaptive: None,
        app: AppOptions::ROOMY,
        attack: syn_flood,
        in_short: true,
        min_attack_secs: 0,
    },
    Scenario {
        key: "conn-flood",
        title: "2. TCP connection flood, one real source (lab-client conn-flood)",
        tune: &[],
        adaptive: None,
        app: AppOptions::ROOMY,
        attack: conn_flood,
        in_short: false,
        min_attack_secs: 0,
    },
    Scenario {
        key: "storms",
        title: "3. WebSocket handshake + SSE subscription storms, one source",
        tune: &[],
        adaptive: None,
        app: AppOptions::ROOMY,
        attack: storms,
        in_short: false,
        min_attack_secs: 0,
    },
    Scenario {
        key: "message-flood",
        title: "4. WebSocket message flood from an admitted client, then its reconnects",
        tune: &[],
        adaptive: None,
        app: AppOptions::ROOMY,
        attack: message_flood,
        in_short: true,
        min_attack_secs: 0,
    },
    Scenario {
        key: "slowloris",
        title: "5. slowloris (slowhttptest, 1000 slow connections)",
        tune: &[],
        adaptive: None,
        app: AppOptions::ROOMY,
        attack: slowloris,
        in_short: false,
        min_attack_secs: 0,
    },
    Scenario {
        key: "random-sources",
        title: "6. SYN flood, random sources in 198.19.0.0/16 (40k SYN/s evenly paced), aggregate /16 cap",
        tune: &[
            "aggregate_prefix_v4=16",
            "aggregate_rate=200",
            "aggregate_burst=400",
        ],
        adaptive: None,
        app: AppOptions::ROOMY,
        attack: random_sources,
        in_short: true,
        min_attack_secs: 0,
    },
    Scenario {
        key: "slot-hoarder",
        title: "7. Slot hoarder: one source, 15 new connections/s (under its cap), none closed; app with 48 slots; conn_limit=20",
        tune: &["conn_limit=20"],
        adaptive: None,
        app: HOARD_APP,
        attack: slot_hoarder,
        in_short: false,
        min_attack_secs: 0,
    },
    Scenario {
        key: "returning-clients",
        title: "8. Random-source SYN flood (trafgen flat out) vs returning and first-time clients; global budget 1000/s, SYN cookies under attack",
        tune: &[
            "global_syn_rate=1000",
            "global_syn_burst=2000",
            "known_good_ttl_s=600",
            "syn_cookies=under-attack",
        ],
        adaptive: None,
        app: AppOptions::ROOMY,
        attack: returning_clients,
        in_short: true,
        min_attack_secs: 0,
    },
    Scenario {
        key: "adaptive",
        title: "9. Overload: 10 real sources at 40 connections/s each (under a static cap of 50/s); app with 200 slots; --adaptive",
        tune: &["syn_rate=50", "syn_burst=100"],
        adaptive: Some(Adaptive {
            floor_syn_rate: 12,
            floor_syn_burst: 12,
            step_percent: 50,
            calm_secs: 30,
        }),
        app: OVERLOAD_APP,
        attack: adaptive_overload,
        in_short: false,
        min_attack_secs: 0,
    },
    Scenario {
        key: "slow-sources",
        title: "10. Slow request heads from 1500 sources, one each (app at a 1024 open-files soft limit; without guard on plain warp::serve)",
        tune: &[],
        adaptive: None,
        app: SLOW_APP,
        attack: slow_sources,
        in_short: false,
        min_attack_secs: SLOW_ATTACK_SECS,
    },
];
