//! The deploy stage: what `cargo xtask dist` ships, run the way an operator runs it (see
//! `guard_tests::deploy`). `cargo xtask test` runs it as a stage of its own; by hand, as root:
//! `cargo test -p guard-tests --features deploy --test deploy -- --test-threads=1`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use guard_common::stats::Stat;
use guard_tests::agent::{block_on, connects, host_prefix, wait_for, Listener};
use guard_tests::binaries::{workspace_root, Binaries};
use guard_tests::deploy::lab_rules::LAB_SPEEDUP;
use guard_tests::deploy::nspawn::BootedDebian;
use guard_tests::deploy::pod::{require_podman, PodRun, CLIENT_V4_BASE};
use guard_tests::deploy::prom::{dashboard_queries, unix_now_f64, Prometheus};
use guard_tests::deploy::{build_dist, Dist};
use guard_tests::lab::{Lab, ATTACKER_V4, SERVER_V4};
use guard_tests::process::run_checked;
use guard_tests::report::WsFloodReport;
use guard_tests::stack::{args, Cpus, LegitLoad, Stack};
use guard_tests::tools::TempDir;
use guard_tests::{hping3_syn_flood, require_root, LabClient, Netns};
use guard_user::datapath::GuardMaps;
use guard_user::paths::PinLayout;

const PORT: u16 = 8080;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Generous: systemd units on a busy 2-core machine.
const SETTLE: Duration = Duration::from_secs(60);

/// One dist build per test run, shared by the stages.
fn dist() -> &'static Dist {
    static DIST: OnceLock<Dist> = OnceLock::new();
    DIST.get_or_init(|| build_dist().unwrap_or_else(|e| panic!("{e:#}")))
}

fn ok<T>(r: anyhow::Result<T>) -> T {
    r.unwrap_or_else(|e| panic!("{e:#}"))
}

/// The same package with a higher version, as the next release would ship it: same files,
/// same conffile contents.
fn next_version(deb: &Path, dir: &Path) -> (PathBuf, String) {
    let tree = dir.join("tree");
    ok(run_checked(
        Command::new("dpkg-deb").arg("-R").arg(deb).arg(&tree),
    ));
    let control = tree.join("DEBIAN/control");
    let text = std::fs::read_to_string(&control).expect("the control file");
    let version = format!("{}+deploy1", env!("CARGO_PKG_VERSION"));
    let bumped = text.replace(
        &format!("\nVersion: {}\n", env!("CARGO_PKG_VERSION")),
        &format!("\nVersion: {version}\n"),
    );
    assert_ne!(bumped, text, "no Version line in {}", control.display());
    std::fs::write(&control, bumped).expect("write the control file");
    let out = dir.join("guard-next.deb");
    ok(run_checked(
        Command::new("dpkg-deb")
            // Fast compression: the debug binary is large and only this test unpacks it.
            .args(["--build", "--root-owner-group", "-Zgzip", "-z1"])
            .arg(&tree)
            .arg(&out),
    ));
    (out, version)
}

fn main_pid(deb: &BootedDebian) -> String {
    ok(deb.sh("systemctl show -p MainPID --value guard"))
        .trim()
        .to_string()
}

/// `dpkg -i`, edit the conffile, `systemctl enable --now`, reload, stop, upgrade, remove and
/// purge, in a Debian booted with systemd as PID 1, with an attacker and a legit client on
/// the lab's switch checking what protects and what does not at each step.
#[test]
fn the_deb_under_systemd_installs_reloads_upgrades_and_removes() {
    if !require_root("the_deb_under_systemd_installs_reloads_upgrades_and_removes") {
        return;
    }
    let dist = dist();
    let lab = ok(Lab::new());
    let server = SocketAddr::new(SERVER_V4.into(), PORT);
    // The protected service: a plain listener in the namespace the container runs in.
    let _listener = ok(Listener::new(&lab.server, server));
    let os = ok(BootedDebian::boot(&lab.server));

    // Install: the group exists, nothing is started (the interfaces are the operator's to name).
    ok(os.copy_in(&dist.deb, "/root/guard.deb"));
    let installed = ok(os.sh("dpkg -i /root/guard.deb 2>&1"));
    assert!(
        installed.contains("edit /etc/guard/guard.toml"),
        "{installed}"
    );
    ok(os.sh("getent group guard"));
    assert_eq!(
        ok(os.code("systemctl is-active --quiet guard")),
        3,
        "started by dpkg -i"
    );
    assert_eq!(
        ok(os.code("guard status >/dev/null")),
        3,
        "loaded by dpkg -i"
    );

    // The operator's edit: the lab's eth0 and port 8080 are the shipped defaults; the burst
    // is theirs, and a marker line shows the edit survives an upgrade.
    ok(os.sh(
        "sed -i 's/^syn_burst = 40$/syn_burst = 30/' /etc/guard/guard.toml && \
         echo '# edited by the deploy test' >> /etc/guard/guard.toml && \
         grep -q '^syn_burst = 30$' /etc/guard/guard.toml",
    ));

    // Type=notify: `enable --now` returns once the unit is active, and active means attached.
    ok(os.sh("systemctl enable --now guard"));
    assert_eq!(ok(os.sh("systemctl is-active guard")).trim(), "active");
    let status = ok(os.sh("guard status"));
    assert!(status.contains("attached: eth0 ("), "{status}");
    assert!(
        status.contains("syn_burst = 30"),
        "the edited conffile is not in use: {status}"
    );
    let journal = ok(os.sh("journalctl -b -u guard --no-pager -o cat"));
    let attached = journal
        .find("eth0: attached")
        .unwrap_or_else(|| panic!("{journal}"));
    let started = journal
        .find("Started guard.service")
        .unwrap_or_else(|| panic!("{journal}"));
    assert!(
        attached < started,
        "systemd reported ready before attaching:\n{journal}"
    );

    // The packaged agent protects: a blocked attacker is dropped, the legit client is not.
    let attacker = host_prefix(ATTACKER_V4.into());
    assert_eq!(ok(connects(&lab.attacker, server, 3, CONNECT_TIMEOUT)), 3);
    ok(os.sh(&format!("guard block {attacker} --ttl 30m")));
    assert_eq!(
        ok(connects(&lab.attacker, server, 3, CONNECT_TIMEOUT)),
        0,
        "blocked attacker"
    );
    assert_eq!(
        ok(connects(&lab.legit, server, 3, CONNECT_TIMEOUT)),
        3,
        "legit client"
    );

    // `systemctl reload` applies a changed limit without a restart.
    let pid = main_pid(&os);
    ok(os.sh(
        "sed -i 's/^syn_rate = 20$/syn_rate = 7/' /etc/guard/guard.toml && systemctl reload guard",
    ));
    ok(wait_for("the reloaded syn_rate", SETTLE, || {
        Ok(ok(os.sh("guard status"))
            .contains("syn_rate = 7")
            .then_some(()))
    }));
    assert_eq!(main_pid(&os), pid, "reload restarted the agent");

    // `systemctl stop` leaves protection pinned: still attached, the block still drops.
    ok(os.sh("systemctl stop guard"));
    assert_eq!(ok(os.code("systemctl is-active --quiet guard")), 3);
    assert_eq!(
        ok(os.code("guard status >/dev/null")),
        0,
        "not attached after stop"
    );
    assert!(os.bpffs().has_pins(), "stop removed the pins");
    assert_eq!(
        ok(connects(&lab.attacker, server, 3, CONNECT_TIMEOUT)),
        0,
        "after stop"
    );

    // An upgrade keeps the edited conffile and restarts a running agent onto the new binary.
    ok(os.sh("systemctl start guard"));
    let before = main_pid(&os);
    let work = ok(TempDir::new("deploy-next"));
    let (next, next_version) = next_version(&dist.deb, work.path());
    ok(os.copy_in(&next, "/root/guard-next.deb"));
    ok(os.sh("dpkg -i /root/guard-next.deb"));
    assert_eq!(
        ok(os.sh("dpkg-query -W -f '${Version}' guard")).trim(),
        next_version
    );
    let conf = ok(os.sh("cat /etc/guard/guard.toml"));
    assert!(conf.contains("# edited by the deploy test") && conf.contains("syn_burst = 30"));
    ok(wait_for("the upgraded agent", SETTLE, || {
        Ok(
            (ok(os.sh("systemctl is-active guard || true")).trim() == "active"
                && main_pid(&os) != before)
                .then_some(()),
        )
    }));
    assert_eq!(
        ok(connects(&lab.attacker, server, 3, CONNECT_TIMEOUT)),
        0,
        "after upgrade"
    );

    // `dpkg -r`: the agent stops and guard leaves the data path (nothing would be left to
    // unload it); the edited conffile and the group stay.
    ok(os.sh("dpkg -r guard"));
    assert_eq!(
        ok(os.code("test -e /usr/bin/guard")),
        1,
        "/usr/bin/guard is still there"
    );
    assert_eq!(
        ok(os.code("systemctl is-active --quiet guard")),
        3,
        "still running"
    );
    assert!(!os.bpffs().has_pins(), "dpkg -r left guard pinned");
    assert_eq!(
        ok(connects(&lab.attacker, server, 3, CONNECT_TIMEOUT)),
        3,
        "after dpkg -r"
    );
    let conf = ok(os.sh("cat /etc/guard/guard.toml"));
    assert!(conf.contains("# edited by the deploy test"), "{conf}");

    // `dpkg --purge`: the conffile, the audit logs and the enablement go; the group stays.
    ok(os.sh("dpkg --purge guard"));
    for gone in [
        "/etc/guard",
        "/var/log/guard",
        "/etc/systemd/system/multi-user.target.wants/guard.service",
    ] {
        assert_eq!(
            ok(os.code(&format!("test -e {gone}"))),
            1,
            "{gone} survived the purge"
        );
    }
    ok(os.sh("getent group guard"));
}

/// How many legit sources the tune step observes: `--suggest` proposes the 99th percentile,
/// so one flooding source must be under 1 % of them to be the outlier.
const LEGIT_SOURCES: u8 = 60;

/// `n` more addresses on `ns`'s eth0 after `first` (a /24 address), for legit sources.
fn add_sources(ns: &Netns, first: &str, n: u8) -> anyhow::Result<Vec<std::net::IpAddr>> {
    let base: std::net::Ipv4Addr = first.parse()?;
    let [a, b, c, d] = base.octets();
    let mut out = vec![std::net::IpAddr::from(base)];
    for i in 1..n {
        let ip = std::net::Ipv4Addr::new(a, b, c, d - i);
        ns.ip(&["addr", "add", &format!("{ip}/24"), "dev", "eth0"])?;
        out.push(ip.into());
    }
    Ok(out)
}

/// `rounds` rounds, a second apart, of one connect from each source: (succeeded, tried).
fn legit_rounds(
    ns: &Netns,
    sources: &[std::net::IpAddr],
    to: SocketAddr,
    rounds: u32,
) -> (u32, u32) {
    ok(ns.run_in(|| {
        block_on(async {
            let (mut good, mut tried) = (0, 0);
            for _ in 0..rounds {
                let tick = tokio::time::Instant::now() + Duration::from_secs(1);
                for src in sources {
                    tried += 1;
                    let sock = tokio::net::TcpSocket::new_v4().expect("a socket");
                    sock.bind(SocketAddr::new(*src, 0))
                        .expect("bind a legit source");
                    if let Ok(Ok(_)) = tokio::time::timeout(CONNECT_TIMEOUT, sock.connect(to)).await
                    {
                        good += 1;
                    }
                }
                tokio::time::sleep_until(tick).await;
            }
            (good, tried)
        })
    }))
}

/// `syn_rate` and `syn_burst` from `guard tune --suggest`'s "suggest: syn_rate=R syn_burst=B".
fn suggested(text: &str) -> (u32, u32) {
    let line = text
        .lines()
        .find(|l| l.starts_with("suggest: syn_rate="))
        .unwrap_or_else(|| panic!("no syn_rate proposal in {text}"));
    let value = |key: &str| -> u32 {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(key))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {key} in {line}"))
    };
    (value("syn_rate="), value("syn_burst="))
}

/// `curl` from `ns`: the HTTP status and the body.
fn http_get(ns: &Netns, url: &str) -> (u16, String) {
    let out = ok(ns.exec(&["curl", "-s", "--max-time", "5", "-w", "\n%{http_code}", url]));
    let (body, code) = out.trim_end().rsplit_once('\n').unwrap_or(("", out.trim()));
    (code.parse().unwrap_or(0), body.to_string())
}

/// The image built from the shipped Dockerfile runs the shipped sidecar manifest under
/// `podman kube play`: the app answers a client namespace, guard attaches to the pod's eth0,
/// the app's report of a message flood crosses the shared socket volume and the offender is
/// dropped in the pod's kernel datapath while a legit client still gets in, and both metrics
/// endpoints answer on the pod address.
#[test]
fn the_image_runs_the_sidecar_manifest_in_a_pod() {
    if !require_root("the_image_runs_the_sidecar_manifest_in_a_pod") {
        return;
    }
    ok(require_podman());
    let dist = dist();
    let demo = ok(Binaries::build(false)).demo.expect("the demo app");
    let mut pod = ok(PodRun::prepare(dist, &demo));
    let shipped =
        std::fs::read_to_string(workspace_root().join("guard-user/deploy/k8s-sidecar.yaml"))
            .expect("the shipped manifest");
    ok(pod.play(&shipped));
    let guard = pod.container("guard");
    let sidecar = |argv: &[&str]| ok(pod.podman.exec(&guard, argv));

    // What the startup probe waits for: `guard status` exits 0 once attached and healthy.
    ok(wait_for(
        "guard status in the sidecar",
        Duration::from_secs(120),
        || Ok((sidecar(&["guard", "status"]).0 == 0).then_some(())),
    ));
    let (_, status) = sidecar(&["guard", "status"]);
    assert!(status.contains("attached: eth0 (tc)"), "{status}");
    assert!(
        status.contains("dry_run = true"),
        "the ConfigMap is not in use: {status}"
    );
    // With the node's cgroup tree mounted, connection tracking counts the pod, not the
    // sidecar's own cgroup namespace.
    let logs = pod
        .podman
        .command()
        .args(["logs", &guard])
        .output()
        .expect("podman logs");
    let logs = String::from_utf8_lossy(&logs.stderr) + String::from_utf8_lossy(&logs.stdout);
    assert!(
        logs.contains("connection tracking counts the pod's cgroup"),
        "{logs}"
    );

    let legit = ok(Netns::new("dleg"));
    let attacker = ok(Netns::new("datk"));
    let legit_ip = ok(pod.plug(&legit, CLIENT_V4_BASE));
    let attacker_ip = ok(pod.plug(&attacker, CLIENT_V4_BASE + 1));
    let pod_ip = ok(pod.pod_ip());
    let app: SocketAddr = format!("{pod_ip}:8080").parse().expect("the app's address");

    // The app answers, and both metrics endpoints are there to scrape on the pod address.
    ok(wait_for("the app", SETTLE, || {
        Ok((http_get(&legit, &format!("http://{app}/metrics")).0 == 200).then_some(()))
    }));
    let (code, agent_metrics) = http_get(&legit, &format!("http://{pod_ip}:9940/metrics"));
    assert_eq!(code, 200, "{agent_metrics}");
    assert!(agent_metrics.contains("guard_"), "{agent_metrics}");

    // A real Prometheus scrapes both endpoints with the shipped alert rules loaded: every
    // rule healthy, and with no attack the only active one is the reminder that guard is
    // still in dry-run (the ConfigMap's start).
    let deploy = workspace_root().join("guard-user/deploy");
    let prom = ok(Prometheus::start(
        &legit,
        &format!("{pod_ip}:9940"),
        &app.to_string(),
        &[&deploy.join("alerts.yml")],
    ));
    ok(prom.wait_targets_up(2, SETTLE));
    let rules = ok(prom.alert_rules());
    assert!(rules.len() >= 20, "{rules:?}");
    for rule in &rules {
        assert_eq!(rule.health, "ok", "{rule:?}");
    }
    ok(wait_for("the dry-run reminder alone", SETTLE, || {
        Ok((ok(prom.active_alerts()) == ["GuardDryRunLeftOn"]).then_some(()))
    }));

    // Still in dry-run, as shipped: `guard tune --suggest --observe` in the sidecar watches
    // real traffic (many legit sources at about one connect a second, one source at 200 SYN/s)
    // and proposes limits; applied and enforced, they cap the flood and not the clients.
    let pins = pod.bpffs.pin_roots();
    assert_eq!(pins.len(), 1, "{pins:?}");
    let maps = ok(GuardMaps::open_pinned(&PinLayout::new(&pins[0])).map_err(anyhow::Error::from));
    let sources = ok(add_sources(&legit, &legit_ip, LEGIT_SOURCES));
    let observe = std::thread::scope(|s| {
        let tune = s.spawn(|| sidecar(&["guard", "tune", "--suggest", "--observe", "10s"]));
        let flood = ok(hping3_syn_flood(
            &attacker,
            app.ip(),
            8080,
            None,
            12,
            Some(200),
            None,
        ));
        let (ok_n, all) = legit_rounds(&legit, &sources, app, 12);
        ok(flood.wait());
        assert_eq!(ok_n, all, "legit connects failed in dry-run");
        tune.join().expect("the tune thread")
    });
    let (code, suggestion) = observe;
    assert_eq!(code, 0, "{suggestion}");
    eprintln!("guard tune --suggest in the sidecar:\n{suggestion}");
    let (rate, burst) = suggested(&suggestion);
    assert!(
        rate < 200 && suggestion.contains(&format!("would have capped 1 of {}", LEGIT_SOURCES + 1)),
        "the proposal does not single out the flood: {suggestion}"
    );
    let (code, out) = sidecar(&[
        "guard",
        "config",
        "--set",
        &format!("syn_rate={rate}"),
        "--set",
        &format!("syn_burst={burst}"),
    ]);
    assert_eq!(code, 0, "{out}");
    // As the manifest's ConfigMap says: enforce once the limits are right.
    let (code, out) = sidecar(&["guard", "config", "--enforce"]);
    assert_eq!(code, 0, "{out}");
    let capped_before = ok(maps.stat(Stat::DropSourceRate).map_err(anyhow::Error::from));
    let (ok_n, all) = std::thread::scope(|s| {
        let flood = ok(hping3_syn_flood(
            &attacker,
            app.ip(),
            8080,
            None,
            6,
            Some(200),
            None,
        ));
        let legit_run = s.spawn(|| legit_rounds(&legit, &sources, app, 6));
        ok(flood.wait());
        legit_run.join().expect("the legit thread")
    });
    let capped = ok(maps.stat(Stat::DropSourceRate).map_err(anyhow::Error::from)) - capped_before;
    eprintln!(
        "enforced syn_rate={rate} syn_burst={burst}: {capped} flood SYNs capped, \
         legit {ok_n}/{all} connects"
    );
    assert_eq!(ok_n, all, "the suggested limits dropped legit clients");
    // 200/s for 6 s is 1200 SYNs; the cap lets rate × 6 + burst through.
    assert!(
        capped >= 1200 - u64::from(rate) * 6 - u64::from(burst) - 100,
        "only {capped} SYNs of the flood were capped (syn_rate {rate}, burst {burst})"
    );

    // Enforcing and capping leave no alert active.
    ok(wait_for("the alerts to settle", SETTLE, || {
        Ok(ok(prom.active_alerts()).is_empty().then_some(()))
    }));

    // A message flood: the app closes it and reports the source over the socket on the
    // shared emptyDir; the agent blocks it in the pod's kernel datapath.
    let client = ok(LabClient::locate());
    let report: WsFloodReport = ok(client.run(
        &attacker,
        &[
            "ws-flood".into(),
            "--url".into(),
            format!("ws://{app}/ws"),
            "--bind".into(),
            attacker_ip.clone(),
            "--rate".into(),
            "2000".into(),
            "--secs".into(),
            "10".into(),
        ],
        Duration::from_secs(30),
    ));
    assert!(report.connected, "{report:?}");
    assert_eq!(
        report.close_code,
        Some(1008),
        "the app did not close the flood: {report:?}"
    );
    let offender = format!("{attacker_ip}/32");
    ok(wait_for(
        "the app's report to become a block",
        SETTLE,
        || {
            Ok(sidecar(&["guard", "blocks"])
                .1
                .contains(&offender)
                .then_some(()))
        },
    ));
    assert_eq!(
        ok(connects(&attacker, app, 3, CONNECT_TIMEOUT)),
        0,
        "the offender still connects"
    );
    // At the pace the limits were tuned to: one connect a second from each legit source.
    let (ok_n, all) = legit_rounds(&legit, &sources, app, 2);
    assert_eq!(
        ok_n, all,
        "legit clients ({legit_ip} and down) were dropped too"
    );
    let (_, explained) = sidecar(&["guard", "explain", &attacker_ip]);
    assert!(explained.to_lowercase().contains("block"), "{explained}");
    let (_, status) = sidecar(&["guard", "status"]);
    assert!(status.contains("blocked prefixes: 1"), "{status}");

    // The blocked offender keeps flooding SYNs: the kernel drops them, and the drop-surge
    // alert's condition holds (it fires after its `for:`, minutes on a real server).
    let flood = ok(hping3_syn_flood(
        &attacker,
        pod_ip.parse().expect("the pod's address"),
        8080,
        None,
        10,
        // Over 50 drops/s averaged across the rule's 5-minute window takes >15000 drops.
        Some(3000),
        None,
    ));
    ok(wait_for(
        "GuardDropsSurging to become pending",
        SETTLE,
        || {
            Ok(ok(prom.alert_rules())
                .iter()
                .any(|r| r.name == "GuardDropsSurging" && r.state != "inactive")
                .then_some(()))
        },
    ));
    ok(flood.stop());

    // Every dashboard query has data over the test's span on this server, except the fleet's (this pod is in no
    // fleet: those panels stay empty on a lone host by design).
    let dashboard = std::fs::read_to_string(deploy.join("dashboard.json")).expect("dashboard");
    let empty: Vec<String> = ok(dashboard_queries(&dashboard))
        .into_iter()
        .filter(|q| !q.contains("guard_fleet_"))
        .filter(|q| !ok(prom.has_data_since_start(q)))
        .collect();
    assert!(
        empty.is_empty(),
        "dashboard queries without data: {empty:#?}"
    );
}

/// How long the lab runs with legit clients only while no alert may fire: longer than the
/// lab variant's longest window over traffic (10 s, the shipped 10 min) plus its longest
/// `for:` on such a rule (10 s), so a rule that misfires on normal traffic has time to fire.
const QUIET_SECS: u32 = 25;
/// A SYN flood from one spoofed source, far over the surge rule's 50 drops/s and the
/// default per-source cap (20/s), long enough for the lab's `for: 5s`.
const SYN_FLOOD_PPS: u32 = 20_000;
const SYN_FLOOD_SECS: u32 = 10;
/// Message floods from this many sources at once: the app's rule wants more than 5 floods
/// in its window (one flooding client is a broken client, several are an attack).
const FLOODERS: u8 = 12;
/// Generous bounds for alerts to reach a state: seconds of rule time on a busy machine.
const ALERT_LIMIT: Duration = Duration::from_secs(90);

/// Waits until `alert` has fired since `since` (Unix seconds); every alert that fired then.
/// On failure, says what the rule's series looked like.
fn wait_fired(prom: &Prometheus, alert: &str, since: f64, series: &str) -> Vec<String> {
    let waited = wait_for(&format!("{alert} to fire"), ALERT_LIMIT, || {
        let fired = prom.fired_between(since, unix_now_f64())?;
        if fired.iter().any(|a| a == alert) {
            return Ok(Some(fired));
        }
        // One rule evaluation a second: asking more often only loads the machine.
        std::thread::sleep(Duration::from_millis(500));
        Ok(None)
    });
    waited.unwrap_or_else(|e| {
        let span = (unix_now_f64() - since).ceil() as u64;
        let seen = prom.query(&format!("{series}[{span}s]"));
        let active = prom.active_between(since, unix_now_f64());
        panic!("{e:#}\n{series} since then: {seen:?}\nactive: {active:?}")
    })
}

/// Waits until no alert is pending or firing, so the next scenario starts from nothing.
fn settle(prom: &Prometheus, after: &str) {
    let left = ok(prom.wait_quiet(ALERT_LIMIT));
    assert!(left.is_empty(), "still active after {after}: {left:?}");
}

/// The shipped alert rules, sped up for the lab (same expressions and thresholds, `for:` and
/// windows 60 times shorter), on a real Prometheus scraping the lab's agent and demo app:
/// with legit clients only nothing fires (nor is pending); a SYN flood fires
/// GuardDropsSurging and nothing of the app's; message floods from several sources fire
/// GuardAppFloodsDetected.
#[test]
fn the_alert_rules_fire_for_each_attack_and_stay_quiet_without_one() {
    if !require_root("the_alert_rules_fire_for_each_attack_and_stay_quiet_without_one") {
        return;
    }
    assert_eq!(
        LAB_SPEEDUP, 60,
        "the bounds above assume minutes become seconds"
    );
    let bins = ok(Binaries::build(false));
    let mut stack = ok(Stack::new(bins, Cpus::detect(), Duration::from_secs(300)));
    ok(stack.start_agent(&[]));
    ok(stack.start_app(true));
    let shipped = workspace_root().join("guard-user/deploy/alerts.yml");
    let prom = ok(Prometheus::start_lab_rules(
        &stack.lab.server,
        &stack.metrics_addr().to_string(),
        &stack.app_addr().to_string(),
        &shipped,
    ));
    ok(prom.wait_targets_up(2, SETTLE));
    // Every shipped rule loaded and healthy in its sped-up form.
    let rules = ok(prom.alert_rules());
    let shipped_rules = std::fs::read_to_string(&shipped)
        .expect("alerts.yml")
        .matches("- alert: ")
        .count();
    assert_eq!(rules.len(), shipped_rules, "{rules:?}");
    for rule in &rules {
        assert_eq!(rule.health, "ok", "{rule:?}");
    }
    settle(&prom, "the agent and the app came up");

    // No attack: legit clients chat, subscribe and connect; nothing fires, nothing is pending.
    let t0 = unix_now_f64();
    let legit = ok(LegitLoad::start(&stack, QUIET_SECS));
    let outcome = ok(legit.finish());
    let (good, all) = outcome.connections();
    assert!(all > 0 && good == all, "legit clients: {good}/{all}");
    let quiet = ok(prom.active_between(t0, unix_now_f64()));
    eprintln!("no attack ({QUIET_SECS} s, {all} legit connects): active {quiet:?}");
    assert!(quiet.is_empty(), "alerts active with no attack: {quiet:?}");

    // A SYN flood from one spoofed source: the kernel drops it, the surge rule fires; the
    // app never sees a handshake, so none of its rules does.
    let t1 = unix_now_f64();
    let flood = ok(stack.syn_flood("198.19.0.7/32", SYN_FLOOD_PPS, SYN_FLOOD_SECS));
    let during = wait_fired(
        &prom,
        "GuardDropsSurging",
        t1,
        "guard_packets_total{verdict=\"drop\"}",
    );
    let sent = ok(flood.wait()).sent;
    settle(&prom, "the SYN flood");
    let fired = ok(prom.fired_between(t1, unix_now_f64()));
    eprintln!("SYN flood ({sent:?} SYNs): fired {fired:?} (first seen with {during:?})");
    assert!(
        !fired.iter().any(|a| a.starts_with("GuardApp")),
        "an app rule fired on a SYN flood the app never saw: {fired:?}"
    );

    // Message floods from several sources at once: each is closed (1008) and reported, and
    // the app's flood rule fires.
    let sources = ok(stack.attacker_sources(60, FLOODERS));
    let t2 = unix_now_f64();
    let runs: Vec<_> = sources
        .iter()
        .map(|src| {
            ok(stack.attacker::<WsFloodReport>(
                args(&[
                    "ws-flood",
                    "--url",
                    &stack.ws_url(),
                    "--bind",
                    &src.to_string(),
                    "--rate",
                    "2000",
                    "--secs",
                    "3",
                ]),
                Duration::from_secs(30),
            ))
        })
        .collect();
    for (src, run) in sources.iter().zip(runs) {
        let report = ok(run.wait());
        assert_eq!(report.close_code, Some(1008), "{src}: {report:?}");
        eprintln!(
            "{src}: {:?} after {} messages",
            report.close_reason, report.sent
        );
    }
    wait_fired(
        &prom,
        "GuardAppFloodsDetected",
        t2,
        "guard_app_floods_detected_total",
    );
    settle(&prom, "the message floods");
    let fired = ok(prom.fired_between(t2, unix_now_f64()));
    eprintln!("message floods from {FLOODERS} sources: fired {fired:?}");
}
