//! `cargo xtask demo` itself, run as a developer runs it: the short demo writes a report that
//! parses and says what the scenarios showed, and an interrupted demo leaves no namespace,
//! process or pin behind. Needs root; run serially (`cargo xtask test` does).

use std::os::unix::fs::MetadataExt as _;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use guard_tests::stack::wait_until;
use guard_tests::tools::TempDir;
use guard_tests::{require_root, ChildGuard};

/// `cargo run -p xtask --features lab -- demo ARGS`: the demo exactly as a developer runs it
/// after setup (`cargo xtask demo` only adds the setup step in front).
fn demo_command(extra: &[&str]) -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(guard_tests::binaries::workspace_root())
        .args([
            "run",
            "-q",
            "-p",
            "xtask",
            "--features",
            "lab",
            "--",
            "demo",
        ])
        .args(extra);
    cmd
}

/// Namespaces a process named after its PID (`gd-<role>-<pid>-<n>`), with their inodes.
fn namespaces_of(pid: u32) -> Vec<(String, u64)> {
    let mark = format!("-{pid}-");
    std::fs::read_dir("/run/netns")
        .map(|dir| {
            dir.flatten()
                .filter_map(|e| {
                    let name = e.file_name().to_string_lossy().into_owned();
                    (name.starts_with("gd-") && name.contains(&mark))
                        .then(|| Some((name, e.metadata().ok()?.ino())))
                        .flatten()
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Processes still inside the network namespace with this inode.
fn processes_in(ino: u64) -> Vec<u32> {
    let want = format!("net:[{ino}]");
    std::fs::read_dir("/proc")
        .map(|dir| {
            dir.flatten()
                .filter_map(|e| {
                    let pid: u32 = e.file_name().to_str()?.parse().ok()?;
                    let ns = std::fs::read_link(e.path().join("ns/net")).ok()?;
                    (ns.to_string_lossy() == want).then_some(pid)
                })
                .collect()
        })
        .unwrap_or_default()
}

fn pins_of(pid: u32) -> Vec<String> {
    let mark = format!("gd-stack-{pid}-");
    std::fs::read_dir("/sys/fs/bpf")
        .map(|dir| {
            dir.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(&mark))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn demo_short_writes_a_report_that_parses() {
    if !require_root("demo_short_writes_a_report_that_parses") {
        return;
    }
    let out = TempDir::new("demo-report").unwrap();
    let mut cmd = demo_command(&["--short", "--out"]);
    cmd.arg(out.path());
    let pid;
    let done = {
        let child = ChildGuard::spawn("cargo xtask demo --short", &mut cmd)
            .unwrap()
            .with_grace(Duration::from_secs(60));
        pid = child.pid();
        // Building aside, the short demo takes about a minute; this only bounds a hang.
        child.wait_timeout(Duration::from_secs(900)).unwrap()
    };
    assert!(
        done.status.success() && !done.stopped,
        "the demo failed ({}):\n{}\n{}",
        done.status,
        done.stdout,
        done.stderr
    );
    let last = done.stdout.lines().last().unwrap_or("");
    assert!(
        last.starts_with("report: ") && last.contains(&*out.path().to_string_lossy()),
        "the last line must say where the report is: {last:?}"
    );

    let json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.path().join("report.json")).expect("report.json"),
    )
    .expect("report.json parses");
    assert_eq!(json["mode"], "short");
    let scenarios = json["scenarios"].as_array().expect("scenarios");
    let keys: Vec<&str> = scenarios.iter().filter_map(|s| s["key"].as_str()).collect();
    assert_eq!(
        keys,
        [
            "syn-flood",
            "message-flood",
            "random-sources",
            "returning-clients"
        ]
    );
    for sc in scenarios {
        let phases = sc["phases"].as_array().expect("phases");
        assert_eq!(phases.len(), 2, "{sc}");
        let (off, on) = (&phases[0], &phases[1]);
        assert_eq!(
            (off["guard"].as_bool(), on["guard"].as_bool()),
            (Some(false), Some(true))
        );
        // Truly without guard: no program, so no kernel counters at all.
        assert!(off["kernel"].is_null(), "{}", sc["key"]);
        // Guard acts by dropping, or (with SYN cookies) by answering in the datapath.
        let answered = on["kernel"]["cookie_sent"].as_u64().unwrap_or(0);
        assert!(
            on["kernel_drops"].as_u64().unwrap_or(0) > 0 || answered > 0,
            "{}: guard neither dropped nor answered anything",
            sc["key"]
        );
        for p in phases {
            assert!(p["legit_connects"].as_u64().unwrap_or(0) > 0, "{p}");
            assert!(!p["legit"]["timeline"].as_array().unwrap().is_empty());
        }
    }
    let flood = &scenarios[1]["phases"];
    assert_eq!(flood[0]["attacker_detail"]["ws_flood"]["close_code"], 1008);
    assert_eq!(flood[1]["attacker_detail"]["ws_flood"]["close_code"], 1008);
    assert!(flood[1]["block_latency_ms"].is_number(), "{}", flood[1]);
    assert!(flood[1]["kernel"]["drop_blocked"].as_u64().unwrap_or(0) > 0);
    assert_eq!(flood[1]["attacker_detail"]["reconnects"]["connected"], 0);
    assert!(
        scenarios[2]["phases"][1]["kernel"]["drop_aggregate_rate"]
            .as_u64()
            .unwrap_or(0)
            > 0
    );

    // The returning-clients scenario runs with cookies under attack: the flood is answered
    // statelessly and first-time clients get in.
    let returning = &scenarios[3]["phases"][1];
    assert!(
        returning["kernel"]["cookie_sent"].as_u64().unwrap_or(0) > 0,
        "{returning}"
    );
    assert!(
        returning["attacker_detail"]["first_timers_connected"]
            .as_u64()
            .unwrap_or(0)
            > 0,
        "{returning}"
    );

    let md = std::fs::read_to_string(out.path().join("report.md")).expect("report.md");
    assert!(md.contains("| scenario | guard |"), "{md}");
    for sc in scenarios {
        assert!(md.contains(sc["title"].as_str().unwrap()), "{md}");
    }
    assert!(returning["kernel"]["pass_known_good"].as_u64().unwrap_or(0) > 0);
    assert_eq!(
        returning["attacker_detail"]["first_timer_reports"]
            .as_array()
            .map(Vec::len),
        Some(16)
    );
    let svg = std::fs::read_to_string(out.path().join("chart.svg")).expect("chart.svg");
    assert!(svg.starts_with("<svg ") && svg.trim_end().ends_with("</svg>"));
    // Four rows, each with four series (legit and CPU, without and with guard).
    assert_eq!(svg.matches("<polyline").count(), 16);

    assert!(namespaces_of(pid).is_empty(), "{:?}", namespaces_of(pid));
    assert!(pins_of(pid).is_empty(), "{:?}", pins_of(pid));
}

#[test]
fn demo_interrupted_mid_flood_leaves_nothing_behind() {
    if !require_root("demo_interrupted_mid_flood_leaves_nothing_behind") {
        return;
    }
    let out = TempDir::new("demo-int").unwrap();
    let mut cmd = demo_command(&["--only", "syn-flood", "--out"]);
    cmd.arg(out.path());
    let child = ChildGuard::spawn("cargo xtask demo", &mut cmd)
        .unwrap()
        .with_grace(Duration::from_secs(60));
    let pid = child.pid();
    // Wait (bounded) until the run with guard floods: the program attached and pinned, the
    // agent and app up, the flood tool running in the demo's attacker namespace.
    let mut seen: Vec<(String, u64)> = Vec::new();
    let flooding = wait_until(Duration::from_secs(600), || {
        seen = namespaces_of(pid);
        Ok(!pins_of(pid).is_empty()
            && seen.iter().any(|(name, ino)| {
                name.starts_with("gd-atk-")
                    && processes_in(*ino).iter().any(|p| {
                        std::fs::read(format!("/proc/{p}/cmdline"))
                            .is_ok_and(|c| c.split(|&b| b == 0).any(|arg| arg == b"syn-flood"))
                    })
            }))
    })
    .unwrap();
    assert!(flooding, "the demo never started its flood with guard");
    assert_eq!(seen.len(), 4, "{seen:?}");

    // Ctrl-C (SIGINT to the demo only: the flood tools run in their own process groups).
    let done = child.stop().unwrap();
    assert!(
        !done.status.success(),
        "an interrupted demo must not claim success"
    );
    assert!(done.stderr.contains("interrupted"), "{}", done.stderr);
    assert!(
        !Path::new(&out.path().join("report.json")).exists(),
        "no report from an interrupted run"
    );
    for (name, ino) in &seen {
        assert!(!Path::new("/run/netns").join(name).exists(), "{name} left");
        assert!(
            processes_in(*ino).is_empty(),
            "processes left in {name}: {:?}",
            processes_in(*ino)
        );
    }
    assert!(pins_of(pid).is_empty(), "{:?}", pins_of(pid));
}
