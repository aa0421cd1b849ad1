//! Adaptive limits end to end: a server whose accept queue overflows makes
//! the agent tighten the per-source limits in the kernel, step by step and
//! never below the floor; calm makes it relax back to the configured values.
//! Root only; run serially (`cargo xtask test`).

use std::{process::Stdio, thread::sleep, time::Duration};

use anyhow::Result;
use guard_tests::twons::{Setup, PORT};

/// Opens `n` connections to a server that never accepts, so the kernel's
/// accept queue overflows (ListenOverflows), then holds them briefly.
const OVERFLOW: &str = r#"
import socket, sys, time
n = int(sys.argv[1]); port = int(sys.argv[2])
socks = []
for _ in range(n):
    s = socket.socket()
    s.setblocking(False)
    try:
        s.connect(("198.18.0.1", port))
    except BlockingIOError:
        pass
    socks.append(s)
time.sleep(2)
"#;

#[test]
fn overflowing_server_tightens_limits_and_calm_relaxes_them() -> Result<()> {
    if !guard_tests::require_root("overflowing_server_tightens_limits_and_calm_relaxes_them") {
        return Ok(());
    }
    let config = std::env::temp_dir().join(format!("gd-adaptive-{}.toml", std::process::id()));
    std::fs::write(
        &config,
        "[limits]\nsyn_rate = 40\nsyn_burst = 80\n\n[adaptive]\nenabled = true\nfloor_syn_rate = 10\nfloor_syn_burst = 20\nstep_percent = 50\ncalm_secs = 2\n",
    )?;
    let setup = Setup::new("adapt", &["--config", config.to_str().unwrap()]);
    let _ = std::fs::remove_file(&config);
    let setup = setup?;
    let live = || setup.maps().config().expect("read the live config");
    assert_eq!(
        (live().syn_rate, live().syn_burst),
        (40, 80),
        "starts as configured"
    );

    let server = setup.server_with_backlog(1)?;
    let out = setup
        .python(OVERFLOW, &["40", &PORT.to_string()])
        .stdout(Stdio::null())
        .output()?;
    assert!(
        out.status.success(),
        "client: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The agent samples once a second.
    let mut tightened = None;
    for _ in 0..50 {
        let c = live();
        if c.syn_rate < 40 {
            tightened = Some(c);
            break;
        }
        sleep(Duration::from_millis(100));
    }
    let tightened = tightened.expect("the agent tightened the limits while the server overflowed");
    assert!(
        tightened.syn_rate >= 10 && tightened.syn_burst >= 20,
        "never below the floor: {tightened:?}"
    );
    assert!(tightened.syn_burst < 80);
    drop(server);

    // Calm: one step back per 2 s, all the way to the configured values.
    let mut relaxed = false;
    for _ in 0..200 {
        let c = live();
        if (c.syn_rate, c.syn_burst) == (40, 80) {
            relaxed = true;
            break;
        }
        sleep(Duration::from_millis(100));
    }
    assert!(
        relaxed,
        "back to the configured limits once calm: {:?}",
        live()
    );
    let log = std::fs::read_to_string(setup.audit_log())?;
    let steps = log
        .lines()
        .filter(|l| l.contains("\"event\":\"adaptive\""))
        .count();
    assert!(
        steps >= 2,
        "every change is audited (tighten and relax): {log}"
    );
    assert!(
        log.contains("level 0"),
        "the return to the configured values is audited"
    );
    Ok(())
}
