//! The report: the terminal table, Markdown, JSON and the SVG chart.
#![cfg(feature = "lab")]

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context as _, Result};
use guard_tests::deploy::lab_rules::LAB_SPEEDUP;
use guard_tests::fleet::FleetDemo;

use super::chart::{self, Row};
use super::phase::*;
use super::run::ALERT_DRAIN_SECS;
use super::scenarios::*;

pub(super) const COLUMNS: [&str; 8] = [
    "guard",
    "legit conn ok",
    "legit msgs",
    "lost SYN",
    "server CPU",
    "kernel drops",
    "detect→block",
    "attacker got",
];

pub(super) fn cells(p: &Phase) -> [String; 8] {
    [
        if p.guard { "on" } else { "off" }.to_string(),
        format!(
            "{:.1}% ({}/{})",
            p.legit_success_pct, p.legit_connects_ok, p.legit_connects
        ),
        p.legit_delivered.to_string(),
        format!("{}/{}", p.lost_syn, p.probe_connects),
        format!(
            "{:.0}% (before {:.0}%)",
            p.server_cpu_pct, p.server_cpu_before_pct
        ),
        match &p.kernel {
            None => "-".to_string(),
            Some(k) if k.drops() == 0 => "0".to_string(),
            Some(k) => format!("{} ({})", k.drops(), k.drop_breakdown()),
        },
        p.block_latency_ms
            .map_or_else(|| "-".to_string(), |ms| format!("{ms:.1} ms")),
        p.attacker.clone(),
    ]
}

pub(super) const WIDTHS: [usize; 8] = [5, 22, 10, 9, 16, 34, 12, 0];

pub(super) fn header() -> String {
    let mut line = String::new();
    for (c, w) in COLUMNS.iter().zip(WIDTHS) {
        let _ = write!(line, "{c:<w$}  ");
    }
    line.trim_end().to_string()
}

pub(super) fn row_text(sc: &Scenario, p: &Phase) -> String {
    let mut line = String::new();
    if !p.guard {
        let _ = writeln!(line, "{}", sc.title);
    }
    for (c, w) in cells(p).iter().zip(WIDTHS) {
        let _ = write!(line, "{c:<w$}  ");
    }
    line.trim_end().to_string()
}

pub(super) fn markdown(r: &Report) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "# guard lab report\n");
    if r.scenarios.is_empty() {
        if let Some(f) = &r.fleet {
            fleet_markdown(&mut md, f);
        }
        return md;
    }
    let _ = writeln!(
        md,
        "Each scenario ran twice for {}s of attack between {:.1}s of warm-up and {:.1}s of \
         recovery: **off** = no program loaded, no agent, the app reporting to nobody (its \
         own warp-side limits still apply); **on** = the agent running with its defaults \
         (per-source SYN cap 20/s, burst 40) plus the scenario's live tuning (and adaptive \
         mode where the scenario says so). Legit clients throughout: 4 WebSocket chatters, \
         4 SSE subscribers, a SYN-loss probe at 10 connects/s and a timeline probe starting \
         10 connects/s whether or not earlier ones finished, from four addresses.\n",
        r.timing.attack_secs, r.timing.warmup_secs, r.timing.tail_secs
    );
    let _ = writeln!(md, "| scenario | {} |", COLUMNS.join(" | "));
    let _ = writeln!(md, "|---{}|", "|---".repeat(COLUMNS.len()));
    for sc in &r.scenarios {
        for p in &sc.phases {
            let title = if p.guard { "" } else { sc.title };
            let cells: Vec<String> = cells(p).iter().map(|c| c.replace('|', "/")).collect();
            let _ = writeln!(md, "| {title} | {} |", cells.join(" | "));
        }
    }
    let _ = writeln!(
        md,
        "\n![legit connects and server CPU over time](chart.svg)\n"
    );
    let _ = writeln!(md, "## How to read it\n");
    let _ = writeln!(
        md,
        "- **legit conn ok**: legit connection attempts that succeeded (probe connects, \
         WebSocket handshakes, SSE subscriptions, timeline connects).\n\
         - **legit msgs**: chat messages and feed events that reached legit clients.\n\
         - **lost SYN**: probe connects whose first SYN did not make it (resent, refused or \
         timed out), of all probe connects.\n\
         - **server CPU**: CPU the server side itself used while the attack ran (before it \
         in brackets), in percent of one core: {}, read per process from /proc so that \
         other work on a shared machine does not count. {}The busy share of the whole core \
         (`core_busy_pct`) is in report.json.\n\
         - **kernel drops**: packets guard's program dropped during the run, by reason.\n\
         - **detect→block**: mean time from the app detecting abuse to the block being in \
         the kernel (`guard_block_latency_seconds`).\n\
         - **attacker got**: what the attack achieved. SYN floods run at a fixed offered rate, \
         evenly paced, on the attacker's core, so check the rates \
         they reached in the two runs before comparing server CPU. Scenario 8's flood runs \
         as fast as trafgen goes, which on veth depends on guard's verdict itself.\n\
         - **scenarios 7 and 9** give the app a ceiling, as every server has one: a number \
         of connection slots (its open-files limit) behind a short listen backlog. Once \
         both are full, the server's own kernel drops every new SYN (\"server's queue \
         dropped\"). The slot hoarder never sends a byte, so no request-level limit sees \
         it; only the kernel's count of its open connections (`conn_limit`) does.\n\
         - **scenario 8**: the legit clients connected before the flood, so they return as \
         known-good; the first-time clients are fresh addresses arriving one by one during \
         the flood, each with one connect that may last until the flood ends.\n\
         - **scenario 9**: when adaptive mode stepped (from the audit log) and from when on \
         every timeline slice completed at least 99 % of its connects, both counted from \
         the attack's start.\n",
        if r.napi_thread_pinned {
            "the server's packet (NAPI) thread, the app and the agent"
        } else {
            "the app and the agent (the packet thread was not found, so packet processing is \
             missing)"
        },
        match (r.server_core, r.attacker_core) {
            (Some(s), Some(a)) => format!(
                "All of them and the legit clients are pinned to cpu{s}, the attack tools to cpu{a}. "
            ),
            _ => String::new(),
        }
    );
    alerts_markdown(&mut md, r);
    let with_audit: Vec<&ScenarioReport> = r
        .scenarios
        .iter()
        .filter(|s| s.phases.iter().any(|p| !p.audit.is_empty()))
        .collect();
    if !with_audit.is_empty() {
        let _ = writeln!(md, "## Audit log (runs with guard)\n");
        for sc in with_audit {
            let _ = writeln!(md, "{}:\n", sc.title);
            let _ = writeln!(md, "```");
            for p in &sc.phases {
                for rec in &p.audit {
                    let _ = writeln!(md, "{rec}");
                }
            }
            let _ = writeln!(md, "```\n");
        }
    }
    if let Some(f) = &r.fleet {
        fleet_markdown(&mut md, f);
    }
    md
}

/// With `--prometheus`: per scenario, the alerts its attack fired and those that stayed quiet.
pub(super) fn alerts_markdown(md: &mut String, r: &Report) {
    let rows: Vec<(&str, &PhaseAlerts)> = r
        .scenarios
        .iter()
        .flat_map(|sc| {
            sc.phases
                .iter()
                .filter_map(move |p| p.alerts.as_ref().map(|a| (sc.title, a)))
        })
        .collect();
    if rows.is_empty() {
        return;
    }
    let _ = writeln!(
        md,
        "## Prometheus alerts (lab variant of guard-user/deploy/alerts.yml)\n"
    );
    let _ = writeln!(
        md,
        "A Prometheus server scraped the agent (job=\"guard\") and the app (job=\"app\") every \
         second, in the runs with guard, with the shipped rules sped up for the lab: same rules, \
         expressions and thresholds, `for:` and every time span {speedup} times shorter \
         (`for: 5m` is 5 s, `rate(...[5m])` is `[5s]`, `[1d] offset 1h` is `[1440s] offset 60s`), \
         derived in code and written to the lab's temp folder; the shipped file is unchanged. \
         Count thresholds over a window (`increase(...[10m]) > 5`) are therefore {speedup} times \
         stricter per second. Each run waits until no alert is active, then watches from the \
         attack's start until {drain} s after its end (the longest window). **fired during**: \
         firing at some evaluation then; **pending only**: condition held, but not for the \
         rule's `for:`; **stayed quiet**: never active; **active before**: left over from an \
         earlier run.\n",
        speedup = LAB_SPEEDUP,
        drain = ALERT_DRAIN_SECS,
    );
    let _ = writeln!(
        md,
        "| scenario | fired during | pending only | stayed quiet | active before |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|");
    let list = |v: Vec<&str>| {
        if v.is_empty() {
            "—".to_string()
        } else {
            v.join(", ")
        }
    };
    for (title, a) in rows {
        let before: Vec<&str> = a.before.iter().map(String::as_str).collect();
        let _ = writeln!(
            md,
            "| {title} | {} | {} | {} | {} |",
            list(a.fired_during()),
            list(a.pending_only()),
            list(a.quiet()),
            list(before)
        );
    }
    let _ = writeln!(md);
}

pub(super) fn fleet_markdown(md: &mut String, f: &FleetDemo) {
    let _ = writeln!(md, "## Fleet: blocks shared through NATS JetStream\n");
    let _ = writeln!(
        md,
        "Hosts {} (a guard agent each, in its own namespace), a JetStream cluster of {} \
         nats-server nodes (stream replicated three times) and attackers on the same \
         bridge. A step's time runs from the decision (the app's report, the operator's \
         unblock, or the restart) until the last other host's kernel agrees, polled every \
         5 ms.\n",
        f.hosts.join(", "),
        f.nats_nodes
    );
    let _ = writeln!(
        md,
        "| step | source | dropped on | served on | in every kernel after |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|");
    for st in &f.steps {
        let list = |v: &[String]| {
            if v.is_empty() {
                "-".to_string()
            } else {
                v.join(", ")
            }
        };
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} |",
            st.what.replace('|', "/"),
            st.source,
            list(&st.dropped_on),
            list(&st.served_on),
            st.propagation_ms
                .map(|m| format!("{m} ms"))
                .unwrap_or_else(|| "-".into())
        );
    }
    let _ = writeln!(md);
}

pub(super) fn chart(r: &Report) -> String {
    let rows: Vec<Row> = r
        .scenarios
        .iter()
        .map(|sc| {
            let mut row = Row {
                title: sc.title.to_string(),
                ..Row::default()
            };
            for p in &sc.phases {
                let success: Vec<(f64, f64)> = p
                    .legit
                    .timeline
                    .iter()
                    .filter(|s| s.connects > 0)
                    .map(|s| {
                        (
                            s.t,
                            f64::from(s.connects_ok) * 100.0 / f64::from(s.connects),
                        )
                    })
                    .collect();
                let cpu: Vec<(f64, f64)> = p
                    .legit
                    .timeline
                    .iter()
                    .map(|s| (s.t, s.server_cpu))
                    .collect();
                if p.guard {
                    row.on_success = success;
                    row.on_cpu = cpu;
                    row.attack = p.attack_window;
                } else {
                    row.off_success = success;
                    row.off_cpu = cpu;
                }
            }
            row
        })
        .collect();
    chart::render(&rows)
}

pub(super) fn write_report(out: &Path, r: &Report) -> Result<()> {
    std::fs::create_dir_all(out)
        .with_context(|| format!("cannot create the report folder {}", out.display()))?;
    let write = |name: &str, text: String| {
        let path = out.join(name);
        std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))
    };
    write("report.json", serde_json::to_string_pretty(r)? + "\n")?;
    write("report.md", markdown(r))?;
    write("chart.svg", chart(r))?;
    Ok(())
}
