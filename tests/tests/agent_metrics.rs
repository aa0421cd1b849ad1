//! The agent's `/metrics`: it passes promtool and counts exactly what was sent, every series
//! the shipped alerts and dashboard query is exported, and (ignored, a measurement) memory,
//! scrape time and block latency with a million blocks. Needs root; one at a time
//! (`cargo test -p guard-tests --test agent_metrics -- --test-threads=1`).

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv6Addr};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use guard_common::addr::Prefix;
use guard_common::client::Connection;
use guard_common::proto::{BlockOutcome, BlockRequest, Request, Response};
use guard_common::state::reason;
use guard_common::stats::Stat;
use guard_tests::agent::{
    block_on, promtool_check, send_syns, settle, solo_netns, AgentHome, RunOpts, Scrape,
};
use guard_tests::lab::{Lab, ATTACKER_V4, ROLE_IF};
use guard_tests::require_root;

/// The protected port.
const PORT: u16 = 8080;

#[test]
fn metrics_pass_promtool_and_count_exactly_what_was_sent() {
    if !require_root("metrics_pass_promtool_and_count_exactly_what_was_sent") {
        return;
    }
    let lab = Lab::new().expect("build the lab");
    let home = AgentHome::new().expect("agent home");
    let agent = home
        .start(&lab.server, &RunOpts::new(ROLE_IF, PORT))
        .expect("start the agent");
    assert_eq!(
        agent.http_get("/healthz").expect("GET /healthz"),
        (200, "ok\n".to_string())
    );
    let text = agent.scrape_text().expect("scrape");
    promtool_check(&text).unwrap_or_else(|e| panic!("{e:#}\n{text}"));

    let packets = |m: &Scrape, verdict: &str, reason: &str| {
        m.value(
            "guard_packets_total",
            &[("verdict", verdict), ("reason", reason)],
        )
        .unwrap_or_else(|| panic!("no guard_packets_total{{{verdict},{reason}}}"))
    };
    let syn_seen = |m: &Scrape| m.get("guard_syn_seen_total", &[]).unwrap();

    // Under the cap (burst 40): every SYN is seen and admitted.
    let m0 = agent.scrape().expect("scrape /metrics");
    let sent = send_syns(&lab, PORT, 20, 10).expect("send SYNs");
    let admitted = settle(
        "admitted SYNs",
        (packets(&m0, "pass", "syn_admitted") as u64) + sent,
        || {
            packets(
                &agent.scrape().expect("scrape /metrics"),
                "pass",
                "syn_admitted",
            ) as u64
        },
    );
    let m1 = agent.scrape().expect("scrape /metrics");
    assert_eq!(admitted - packets(&m0, "pass", "syn_admitted") as u64, sent);
    assert_eq!(syn_seen(&m1) - syn_seen(&m0), sent as f64);

    // Blocked: every SYN is a blocked drop, and a blocked SYN is not counted as seen.
    let resp = home
        .call(Request::Block(BlockRequest {
            prefix: Prefix::host(ATTACKER_V4.into()),
            ttl_secs: 600,
            reason: reason::OPERATOR,
            detected_at_unix_ns: 0,
            detail: "metrics test".into(),
        }))
        .expect("block");
    assert!(
        matches!(
            resp,
            Response::BlockResult {
                outcome: BlockOutcome::Added,
                ..
            }
        ),
        "{resp:?}"
    );
    std::thread::sleep(Duration::from_millis(300));
    let m2 = agent.scrape().expect("scrape /metrics");
    let sent = send_syns(&lab, PORT, 200, 100).expect("send SYNs");
    let target = packets(&m2, "drop", "blocked") as u64 + sent;
    settle("blocked drops", target, || {
        packets(&agent.scrape().expect("scrape /metrics"), "drop", "blocked") as u64
    });
    let text = agent.scrape_text().expect("scrape");
    promtool_check(&text).unwrap_or_else(|e| panic!("{e:#}\n{text}"));
    let m3 = Scrape::parse(&text).unwrap();
    assert_eq!(
        packets(&m3, "drop", "blocked") - packets(&m2, "drop", "blocked"),
        sent as f64
    );
    assert_eq!(syn_seen(&m3), syn_seen(&m2), "blocked SYNs are not seen");
    assert_eq!(
        packets(&m3, "pass", "syn_admitted"),
        packets(&m2, "pass", "syn_admitted")
    );
    // The agent's own gauges and counters agree with what it was asked.
    let get = |name, labels: &[(&str, &str)]| m3.get(name, labels).unwrap();
    assert_eq!(get("guard_blocklist_entries", &[]), 1.0);
    assert_eq!(
        get("guard_block_reports_total", &[("result", "added")]),
        1.0
    );
    assert_eq!(
        get(
            "guard_control_requests_total",
            &[("request", "block"), ("result", "ok")]
        ),
        1.0
    );
    assert_eq!(
        get(
            "guard_attach_info",
            &[("interface", ROLE_IF), ("mode", "xdp")]
        ),
        1.0
    );
    assert_eq!(get("guard_config", &[("key", "syn_rate")]), 20.0);
    // Kernel-side totals and the exported ones are the same numbers.
    assert_eq!(
        home.stat(Stat::DropBlocked).expect("read a counter") as f64,
        packets(&m3, "drop", "blocked")
    );
    assert_eq!(
        home.stat(Stat::SourcesCreated).expect("read a counter") as f64,
        get("guard_sources_created_total", &[])
    );
    assert!(
        get("guard_sources_created_total", &[]) >= 1.0,
        "the admitted sources count"
    );
}

/// Metric names the deploy files query but nothing exports yet, each with the feature that
/// will export it. The test fails if one of them appears (remove it here) or if a new
/// queried name is exported by neither side. Adaptive limits (`guard_adaptive_level`,
/// `guard_adaptive_changes_total`) and concurrent connection tracking
/// (`guard_concurrent_connections_tracked`) were listed here until the agent exported them.
const KNOWN_MISSING: &[(&str, &str)] = &[];

/// Made by Prometheus itself for every scrape target.
const SCRAPER_MADE: &[&str] = &["up"];

/// Series an agent registers only with `[fleet]` on; the fleet tests check them against a
/// fleet agent's scrape.
const FLEET_ONLY_PREFIX: &str = "guard_fleet_";

#[test]
fn every_metric_the_deploy_files_query_is_exported() {
    if !require_root("every_metric_the_deploy_files_query_is_exported") {
        return;
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../guard-user/deploy/metric_names.py");
    let out = Command::new("python3")
        .arg(&script)
        .output()
        .expect("run metric_names.py");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let queried: BTreeSet<String> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    assert!(queried.len() > 10, "{queried:?}");

    // The agent: a fresh one, so every series must exist before anything happened.
    let ns = solo_netns().expect("a namespace with a veth pair");
    let home = AgentHome::new().expect("agent home");
    let agent = home
        .start(&ns, &RunOpts::new(ROLE_IF, PORT))
        .expect("start the agent");
    let agent_names: BTreeSet<String> = agent
        .scrape()
        .expect("scrape /metrics")
        .families
        .into_keys()
        .collect();

    // The app: the registry a warp app hands to the guard.
    let registry = prometheus::Registry::new();
    let _guard = guard_common::app::Guard::builder()
        .registry(&registry)
        .build()
        .expect("build the app guard");
    let app_text = prometheus::TextEncoder::new()
        .encode_to_string(&registry.gather())
        .expect("encode");
    promtool_check(&app_text).unwrap_or_else(|e| panic!("{e:#}\n{app_text}"));
    let app_names: BTreeSet<String> = Scrape::parse(&app_text)
        .unwrap()
        .families
        .into_keys()
        .collect();

    let exported: BTreeSet<&String> = agent_names.union(&app_names).collect();
    let known: BTreeSet<&str> = KNOWN_MISSING.iter().map(|(n, _)| *n).collect();
    let missing: Vec<&String> = queried
        .iter()
        .filter(|n| !exported.contains(n))
        .filter(|n| !known.contains(n.as_str()) && !SCRAPER_MADE.contains(&n.as_str()))
        .filter(|n| !n.starts_with(FLEET_ONLY_PREFIX))
        .collect();
    assert!(
        missing.is_empty(),
        "queried by alerts.yml/dashboard.json but exported by neither the agent nor the app: \
         {missing:?}"
    );
    for (name, feature) in KNOWN_MISSING {
        assert!(
            queried.contains(*name),
            "{name} is no longer queried: drop it from KNOWN_MISSING"
        );
        assert!(
            !exported.iter().any(|n| n == name),
            "{name} ({feature}) is exported now: drop it from KNOWN_MISSING"
        );
    }
    // The two sides never claim the same name.
    let both: Vec<&String> = agent_names.intersection(&app_names).collect();
    assert!(both.is_empty(), "{both:?}");
}

/// Percentile of sorted samples (nearest rank).
fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

/// Not a test: the numbers for the agent's report. RSS at idle and with a million blocks
/// (inserted over one control connection, as an app would), `/metrics` scrape time with them,
/// and detection-to-block latency from `guard_block_latency_seconds`.
/// `GUARD_MEASURE_BLOCKS` overrides the million.
#[test]
#[ignore = "measurement, minutes long: run with --ignored --nocapture"]
fn measure_agent_memory_scrape_and_block_latency() {
    if !require_root("measure_agent_memory_scrape_and_block_latency") {
        return;
    }
    let n: u32 = std::env::var("GUARD_MEASURE_BLOCKS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let ns = solo_netns().expect("a namespace with a veth pair");
    let home = AgentHome::new().expect("agent home");
    // Audit records would be a million log lines and file lines: measure the agent, not them.
    let opts = RunOpts::new(ROLE_IF, PORT)
        .log("info,guard::audit=warn")
        .audit_log("/dev/null");
    let agent = home.start(&ns, &opts).expect("start the agent");
    std::thread::sleep(Duration::from_secs(2));
    let rss_idle = agent.rss_kib().unwrap();

    let sock = home.socket();
    let now_ns = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
    };
    let block = |i: u32, detected: u64| {
        Request::Block(BlockRequest {
            // Lab addresses only (2001:2::/48), one /128 each.
            prefix: Prefix::host(IpAddr::V6(Ipv6Addr::from(
                0x2001_0002_0000_0000_0000_0000_0000_0000u128 + u128::from(i),
            ))),
            ttl_secs: 3600,
            reason: reason::OPERATOR,
            detected_at_unix_ns: detected,
            detail: String::new(),
        })
    };
    let (rtts, inserted, insert_time) = block_on(async {
        let mut conn = Connection::connect(&sock, "measure").await.unwrap();
        let mut rtts = Vec::new();
        for i in 0..300 {
            let t = Instant::now();
            conn.call(block(n + i, now_ns())).await.unwrap();
            rtts.push(t.elapsed());
        }
        let start = Instant::now();
        let deadline = start + Duration::from_secs(1200);
        let mut inserted = 0u32;
        for i in 0..n {
            if Instant::now() >= deadline {
                break;
            }
            match conn.call(block(i, 0)).await {
                Ok(_) => inserted += 1,
                Err(e) => {
                    eprintln!("stopped at {i}: {e}");
                    break;
                }
            }
            if i % 100_000 == 0 && i > 0 {
                eprintln!("{i} blocks after {:?}", start.elapsed());
            }
        }
        (rtts, inserted, start.elapsed())
    });
    let m = agent.scrape().expect("scrape /metrics");
    let p50 = m.histogram_quantile("guard_block_latency_seconds", 0.5);
    let p99 = m.histogram_quantile("guard_block_latency_seconds", 0.99);
    let mut rtts = rtts;
    rtts.sort();
    let rss_full = agent.rss_kib().unwrap();
    let mut scrapes = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        let text = agent.scrape_text().unwrap();
        scrapes.push(t.elapsed());
        assert!(text.contains("guard_blocklist_entries"));
    }
    scrapes.sort();
    let entries = agent
        .scrape()
        .expect("scrape /metrics")
        .get("guard_blocklist_entries", &[])
        .unwrap();
    println!("MEASURE rss idle: {rss_idle} KiB");
    println!(
        "MEASURE blocks inserted: {inserted} in {insert_time:?} ({:.0}/s), blocklist_entries {entries}",
        f64::from(inserted) / insert_time.as_secs_f64()
    );
    println!("MEASURE rss with blocks: {rss_full} KiB");
    println!(
        "MEASURE scrape time: min {:?} median {:?} max {:?}",
        scrapes[0], scrapes[2], scrapes[4]
    );
    println!("MEASURE block latency (histogram): p50 {p50:?} s, p99 {p99:?} s");
    println!(
        "MEASURE block round trip (client): p50 {:?} p99 {:?}",
        percentile(&rtts, 0.5),
        percentile(&rtts, 0.99)
    );
    println!(
        "MEASURE {}",
        m.samples
            .iter()
            .filter(|s| s.name.starts_with("guard_block_latency_seconds"))
            .map(|s| format!("{:?}={}", s.labels, s.value))
            .collect::<Vec<_>>()
            .join(" ")
    );
}
