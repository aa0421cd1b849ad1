//! The operator's CLI in its script form: every `-o json` document read through serde_json
//! against a live agent, with the values checked against what the test itself did (a block
//! it made, an address it allow-listed, traffic it sent), and the exit codes scripts and
//! probes rely on.
//!
//! Run as root, one at a time: `cargo test -p guard-tests --test cli_json -- --test-threads=1`.

use std::io::{Read as _, Write as _};
use std::net::SocketAddr;
use std::os::unix::net::UnixStream;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use guard_tests::agent::{connects, host_prefix, wait_for, AgentHome, Listener, RunOpts};
use guard_tests::lab::{Lab, ATTACKER_V4, LEGIT_V4, ROLE_IF, SERVER_V4};
use guard_tests::launch::LogFilter;
use guard_tests::require_root;
use serde_json::Value;

const PORT: u16 = 8080;

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// `guard -o json ARGS... --control-socket SOCK`, parsed.
fn json(home: &AgentHome, args: &[&str]) -> Value {
    let mut all = vec!["-o", "json"];
    all.extend_from_slice(args);
    let out = home
        .ctl(&all)
        .unwrap_or_else(|e| panic!("guard {all:?}: {e:#}"));
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("guard {all:?} is not JSON ({e}): {out}"))
}

/// A guard command with `--pin-dir` (status, explain, unload): exit code and stdout.
fn with_pins(home: &AgentHome, args: &[&str]) -> (Option<i32>, String) {
    let root = home
        .pins()
        .root()
        .to_str()
        .expect("UTF-8 pin root")
        .to_string();
    let socket = home.socket().to_str().expect("UTF-8 socket").to_string();
    let mut all: Vec<&str> = args.to_vec();
    all.extend(["--pin-dir", &root]);
    if args.contains(&"explain") {
        all.extend(["--control-socket", &socket]);
    }
    let out = home
        .cli_output(&all)
        .unwrap_or_else(|e| panic!("guard {all:?}: {e:#}"));
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

fn parse(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

fn explain(home: &AgentHome, addr: &str) -> Value {
    let (code, out) = with_pins(home, &["-o", "json", "explain", addr]);
    assert_eq!(code, Some(0), "explain {addr}: {out}");
    parse(&out)
}

#[test]
fn json_documents_carry_what_the_agent_did() {
    if !require_root("json_documents_carry_what_the_agent_did") {
        return;
    }
    let lab = Lab::new().expect("build the lab");
    let home = AgentHome::new().expect("agent home");
    let agent = home
        .start(&lab.server, &RunOpts::new(ROLE_IF, PORT))
        .unwrap_or_else(|e| panic!("start the agent: {e:#}"));
    let server = SocketAddr::new(SERVER_V4.into(), PORT);
    let attacker = host_prefix(ATTACKER_V4.into());
    let legit = host_prefix(LEGIT_V4.into());

    // status: loaded, attached where the agent said, healthy, exit 0.
    let (code, out) = with_pins(&home, &["-o", "json", "status"]);
    assert_eq!(code, Some(0), "{out}");
    let s = parse(&out);
    assert_eq!(s["loaded"], true);
    assert_eq!(s["healthy"], true, "{s}");
    assert_eq!(s["attached"][0]["interface"], ROLE_IF);
    assert_eq!(s["protected_ports"], serde_json::json!([PORT]));
    assert_eq!(s["blocked_prefixes"], 0);

    // Real traffic first, so the attacker's bucket is tracked.
    let _listener = Listener::new(&lab.server, server).expect("listener");
    assert_eq!(
        connects(&lab.attacker, server, 3, Duration::from_secs(1)).unwrap(),
        3
    );
    let e = explain(&home, &ATTACKER_V4.to_string());
    assert_eq!(e["source"]["key"], attacker);
    assert_eq!(e["source"]["tracked"], true, "{e}");
    assert!(e["source"]["syns"].as_u64().unwrap() >= 3, "{e}");
    assert_eq!(e["blocked_by"], Value::Null);
    assert_eq!(e["next_syn"]["decided"], "pass");
    assert_eq!(e["next_syn"]["cause"], "within_limits");

    // A block with a compound TTL and a reason.
    let b = json(
        &home,
        &[
            "block",
            &attacker,
            "--ttl",
            "1h30m",
            "--reason",
            "message_flood",
        ],
    );
    assert_eq!(b["outcome"], "added", "{b}");
    let left = b["expires_in_secs"].as_u64().unwrap();
    assert!((5_390..=5_400).contains(&left), "{b}");

    let blocks = json(&home, &["blocks"]);
    assert_eq!(blocks["total"], 1, "{blocks}");
    let entry = &blocks["entries"][0];
    assert_eq!(entry["prefix"], attacker);
    assert_eq!(entry["reason"], "message_flood");
    assert!(
        entry["origin"].as_str().unwrap().starts_with("guard-cli"),
        "{entry}"
    );
    let until = entry["expires"]["unix"].as_u64().unwrap();
    assert!(until.abs_diff(now() + 5_400) <= 15, "{entry}");
    assert!(entry["expires"]["rfc3339"].as_str().unwrap().ends_with('Z'));

    // explain says blocked by that entry, with who and when from the audit log.
    let e = explain(&home, &ATTACKER_V4.to_string());
    let hit = &e["blocked_by"];
    assert_eq!(hit["prefix"], attacker, "{e}");
    assert_eq!(hit["reason"], "message_flood");
    assert_eq!(hit["active"], true);
    assert!(
        hit["origin"].as_str().unwrap().starts_with("guard-cli"),
        "{e}"
    );
    assert!(
        hit["since"]["unix"].as_u64().unwrap().abs_diff(now()) <= 30,
        "{e}"
    );
    assert!(
        hit["until"]["unix"].as_u64().unwrap().abs_diff(until) <= 2,
        "{e}"
    );
    // The agent answers for the source key: no streak, since nothing went over its cap.
    assert_eq!(e["escalation"][0]["prefix"], attacker, "{e}");
    assert_eq!(e["escalation"][0]["tracked"], false, "{e}");
    assert_eq!(e["notes"], serde_json::json!([]), "{e}");
    assert_eq!(e["next_syn"]["decided"], "drop");
    assert_eq!(e["next_syn"]["effective"], "drop");
    assert_eq!(e["next_syn"]["cause"], "blocked");
    let summary = e["summary"].as_str().unwrap();
    assert!(
        summary.contains("DROP") && summary.contains(&attacker),
        "{summary}"
    );
    // And the kernel agrees: the attacker no longer connects, the legit client does.
    assert_eq!(
        connects(&lab.attacker, server, 2, Duration::from_secs(1)).unwrap(),
        0
    );

    // The allow list: an entry the test made, named by explain.
    let a = json(&home, &["allow", &legit]);
    assert_eq!(a["ok"], true, "{a}");
    let allows = json(&home, &["allows"]);
    let entries: Vec<&str> = allows["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(
        entries.contains(&legit.as_str()) && entries.contains(&"127.0.0.0/8"),
        "{allows}"
    );
    let e = explain(&home, &LEGIT_V4.to_string());
    assert_eq!(e["allowlisted_by"], legit, "{e}");
    assert_eq!(e["next_syn"]["cause"], "allowlisted");
    assert_eq!(
        connects(&lab.legit, server, 2, Duration::from_secs(1)).unwrap(),
        2
    );

    // Live config, changed and read back.
    let c = json(&home, &["config", "--set", "syn_rate=33"]);
    assert_eq!(c["config"]["syn_rate"], "33", "{c}");
    let c = json(&home, &["config"]);
    assert_eq!(c["config"]["syn_rate"], "33", "{c}");
    assert_eq!(c["config"]["dry_run"], "false", "{c}");

    // history: JSON lines, the block among them with its reason and origin.
    let out = home
        .ctl(&["-o", "json", "history", "--since", "1h 30m"])
        .expect("history");
    let records: Vec<Value> = out.lines().map(parse).collect();
    let block = records
        .iter()
        .find(|r| r["event"] == "block" && r["prefix"] == attacker)
        .unwrap_or_else(|| panic!("no block record in {out}"));
    assert_eq!(block["reason"], "message_flood");
    assert_eq!(block["ttl_secs"], 5_400);
    assert!(records
        .iter()
        .any(|r| r["event"] == "allow" && r["prefix"] == legit));

    // logrotate's move-and-SIGHUP: the block now lives in audit.jsonl.1, and history still
    // finds it, before the lines of the new file.
    std::fs::rename(home.audit_log(), home.dir().join("audit.jsonl.1")).expect("rotate");
    agent.hup().expect("SIGHUP");
    // The file reappears when the reload starts; its own "reloaded" record comes once the
    // reload applied, and the change below must come after it.
    wait_for("the reload's record", Duration::from_secs(10), || {
        let text = std::fs::read_to_string(home.audit_log()).unwrap_or_default();
        Ok(text.contains("operator:sighup").then_some(()))
    })
    .unwrap();
    json(&home, &["config", "--set", "syn_rate=34"]);
    let out = home
        .ctl(&["-o", "json", "history", "--since", "1h"])
        .expect("history");
    let events: Vec<Value> = out.lines().map(parse).collect();
    let block_at = events
        .iter()
        .position(|r| r["event"] == "block" && r["prefix"] == attacker)
        .unwrap_or_else(|| panic!("the rotated block is missing: {out}"));
    let last = events.last().unwrap();
    assert_eq!(last["event"], "config", "{out}");
    assert!(
        last["detail"].as_str().unwrap().contains("syn_rate=34"),
        "{out}"
    );
    assert!(
        block_at < events.len() - 1,
        "time order across files: {out}"
    );

    // status counts what was done.
    let (code, out) = with_pins(&home, &["-o", "json", "status"]);
    assert_eq!(code, Some(0));
    let s = parse(&out);
    assert_eq!(s["blocked_prefixes"], 1, "{s}");
    assert!(s["counters"]["drop_blocked"].as_u64().unwrap() >= 1, "{s}");

    // Unloaded: status exits 3 (a startup probe fails), explain refuses with 1.
    drop(agent);
    let (code, out) = with_pins(&home, &["unload"]);
    assert_eq!(code, Some(0), "{out}");
    let (code, out) = with_pins(&home, &["-o", "json", "status"]);
    assert_eq!(code, Some(3), "{out}");
    assert_eq!(parse(&out)["loaded"], false);
    let (code, _) = with_pins(&home, &["status"]);
    assert_eq!(code, Some(3));
    let (code, _) = with_pins(&home, &["explain", &ATTACKER_V4.to_string()]);
    assert_eq!(code, Some(1));
}

#[test]
fn config_check_prints_the_effective_settings_or_fails() {
    if !require_root("config_check_prints_the_effective_settings_or_fails") {
        return;
    }
    let home = AgentHome::new().expect("agent home");
    let good = home.dir().join("good.toml");
    std::fs::write(
        &good,
        "interfaces = [\"eth0\"]\nports = [8080]\nlog_level = \"debug\"\n\
         [limits]\nsyn_rate = 7\n[blocks]\ndefault_ttl_secs = \"1h30m\"\n",
    )
    .unwrap();
    let out = home
        .cli_output(&["-o", "json", "config", "check", good.to_str().unwrap()])
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let j = parse(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(j["valid"], true);
    assert_eq!(j["limits"]["syn_rate"], "7");
    assert_eq!(j["default_ttl_secs"], 5_400);
    assert_eq!(j["log_level"], "debug");
    assert_eq!(j["interfaces"], serde_json::json!(["eth0"]));

    let bad = home.dir().join("bad.toml");
    std::fs::write(
        &bad,
        "interfaces = [\"eth0\"]\nports = [8080]\n[blocks]\ndefault_ttl_secs = \"5w\"\n",
    )
    .unwrap();
    let out = home
        .cli_output(&["config", "check", bad.to_str().unwrap()])
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("unknown unit") && err.contains("bad.toml"),
        "{err}"
    );
    // Usage errors stay clap's 2.
    let out = home
        .cli_output(&["block", "198.18.0.3", "--ttl", "1x"])
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

/// Sends the agent a frame with a zero length, which it answers with an error and logs at
/// debug level only.
fn send_bad_frame(home: &AgentHome) {
    let mut s = UnixStream::connect(home.socket()).expect("connect to the control socket");
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(&[0, 0, 0, 0]).expect("write");
    let mut reply = Vec::new();
    let _ = s.read_to_end(&mut reply);
    assert!(
        reply.len() > 5 && reply[4] == 0x80,
        "an error reply, not a panic: {reply:?}"
    );
}

#[test]
fn log_level_changes_on_sighup() {
    if !require_root("log_level_changes_on_sighup") {
        return;
    }
    let lab = Lab::new().expect("build the lab");
    let home = AgentHome::new().expect("agent home");
    let mut opts = RunOpts::new(ROLE_IF, PORT).config("log_level = \"info\"\n");
    opts.log = LogFilter::Unset;
    let agent = home
        .start(&lab.server, &opts)
        .unwrap_or_else(|e| panic!("start the agent: {e:#}"));
    const DEBUG_LINE: &str = "sent a bad frame";
    let value = |name: &str| {
        agent
            .scrape()
            .expect("scrape")
            .value(name, &[])
            .unwrap_or_else(|| panic!("{name} is not exported"))
    };
    assert_eq!(value("guard_config_last_reload_successful"), 1.0);
    let loaded_at = value("guard_config_last_reload_success_timestamp_seconds");
    assert!(loaded_at > 1.7e9, "{loaded_at}");
    assert!(value("process_resident_memory_bytes") > 0.0);
    send_bad_frame(&home);
    // The reply comes after the line would have been logged; give the stderr reader a moment.
    std::thread::sleep(Duration::from_millis(500));
    assert!(!agent.log().contains(DEBUG_LINE), "{}", agent.log());

    std::fs::write(home.dir().join("guard.toml"), "log_level = \"debug\"\n").unwrap();
    agent.hup().expect("SIGHUP");
    wait_for("the reload", Duration::from_secs(10), || {
        // The level is applied first; the reload's metrics are set
        // when it is done, just before this line.
        let log = agent.log();
        Ok(
            (log.contains("log level: debug") && log.contains("configuration reloaded"))
                .then_some(()),
        )
    })
    .unwrap_or_else(|e| panic!("{e:#}: {}", agent.log()));
    assert_eq!(value("guard_config_last_reload_successful"), 1.0);
    assert!(value("guard_config_last_reload_success_timestamp_seconds") >= loaded_at);
    send_bad_frame(&home);
    wait_for("the debug line", Duration::from_secs(10), || {
        Ok(agent.log().contains(DEBUG_LINE).then_some(()))
    })
    .unwrap_or_else(|e| panic!("{e:#}: {}", agent.log()));

    // And back: a bad level is refused and the running one kept.
    std::fs::write(
        home.dir().join("guard.toml"),
        "log_level = \"info,x=loud\"\n",
    )
    .unwrap();
    agent.hup().expect("SIGHUP");
    wait_for("the refusal", Duration::from_secs(10), || {
        Ok(agent.log().contains("reload refused").then_some(()))
    })
    .unwrap_or_else(|e| panic!("{e:#}: {}", agent.log()));
    assert_eq!(value("guard_config_last_reload_successful"), 0.0);
    let before = agent.log().matches(DEBUG_LINE).count();
    send_bad_frame(&home);
    wait_for("debug still on", Duration::from_secs(10), || {
        Ok((agent.log().matches(DEBUG_LINE).count() > before).then_some(()))
    })
    .unwrap_or_else(|e| panic!("{e:#}: {}", agent.log()));
}
