//! A fleet lab: guard hosts sharing blocks through a real three-node NATS JetStream cluster.
//!
//! ```text
//!   host a  198.18.0.11/24  eth0 ──┐
//!   host b  198.18.0.12/24  eth0 ──┤
//!   host c  198.18.0.13/24  eth0 ──┼── br0 (switch netns)
//!   nats    198.18.0.200/24 eth0 ──┤     n0 :4222, n1 :4223, n2 :4224 (cluster 6222–6224)
//!   attackers 198.18.0.3, .4, .5 (one namespace each) ──┘
//! ```
//!
//! Each host runs its own agent (XDP on its `eth0`, the service port [`SERVICE_PORT`]) and
//! reaches NATS across the bridge, so cutting a host off (`partition`) is taking its link down,
//! and killing a NATS node is stopping its process. Everything is torn down on drop: agents by
//! their guards, pins by their homes, NATS processes, then the namespaces.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use guard_common::client::Connection;
use guard_common::proto::{BlockRequest, Request, Response};

use crate::agent::{block_on, wait_for, Agent, AgentHome, RunOpts};
use crate::lab::ROLE_IF;
use crate::netns::Netns;
use crate::process::ChildGuard;
use crate::tools::TempDir;

/// Where the fleet tests and the lab expect `nats-server` (`cargo xtask setup` puts it there).
pub const NATS_SERVER: &str = "/usr/local/bin/nats-server";
pub const NATS_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 200);
/// The first attacker's address; attacker `i` is 198.18.0.(3+i).
pub const ATTACKER_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 3);
const ATTACKERS: usize = 3;

pub fn attacker_v4(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 0, 3 + i as u8)
}
/// The port every host's agent protects (and a test listener serves).
pub const SERVICE_PORT: u16 = 8080;
const NATS_NODES: u16 = 3;
const CLIENT_PORT: u16 = 4222;
const CLUSTER_PORT: u16 = 6222;
/// Each node's HTTP monitoring port (`/jsz` tells who leads the stream) is this plus its index.
const MONITOR_PORT: u16 = 8222;

/// Host `i`'s address (198.18.0.11 for the first).
pub fn host_v4(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 0, 11 + i as u8)
}

/// The host names the agents use on the stream.
pub fn host_name(i: usize) -> String {
    format!("host-{}", (b'a' + i as u8) as char)
}

/// A namespace joined to the bridge with one IPv4 address on `eth0`.
fn join(switch: &Netns, role: &str, port: &str, mac_last: u8, v4: Ipv4Addr) -> Result<Netns> {
    let ns = Netns::new(role)?;
    crate::lab::plug(switch, &ns, port, [0x02, 0x67, 0x64, 0, 1, mac_last], v4)?;
    ns.ip(&["link", "set", ROLE_IF, "up"])?;
    Ok(ns)
}

/// A throwaway certificate authority and a server certificate it signed for `NATS_V4`, made
/// with openssl, for the fleet over TLS.
pub struct TestPki {
    dir: TempDir,
}

impl TestPki {
    pub fn new() -> Result<Self> {
        let pki = Self {
            dir: TempDir::new("pki")?,
        };
        let d = pki.dir.path();
        let openssl = |args: &[&str]| -> Result<()> {
            crate::process::run_checked(Command::new("openssl").current_dir(d).args(args)).map(drop)
        };
        const EC: [&str; 5] = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
        ];
        for (key, pem, cn) in [
            ("ca.key", "ca.pem", "/CN=gd-test-ca"),
            ("other-ca.key", "other-ca.pem", "/CN=gd-test-other-ca"),
        ] {
            let args = [
                &["req", "-x509"][..],
                &EC,
                &["-keyout", key, "-out", pem, "-subj", cn, "-days", "1"],
            ]
            .concat();
            openssl(&args).context("make a test CA (openssl)")?;
        }
        std::fs::write(
            d.join("san.ext"),
            format!("subjectAltName=IP:{NATS_V4}\nbasicConstraints=CA:FALSE\n"),
        )?;
        let csr = [
            &["req"][..],
            &EC,
            &[
                "-keyout",
                "server.key",
                "-out",
                "server.csr",
                "-subj",
                "/CN=gd-test-nats",
            ],
        ]
        .concat();
        openssl(&csr)?;
        openssl(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "1",
            "-extfile",
            "san.ext",
        ])?;
        Ok(pki)
    }

    pub fn ca(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// A CA that signed nothing here: a client trusting it must refuse the server.
    pub fn other_ca(&self) -> PathBuf {
        self.dir.path().join("other-ca.pem")
    }

    fn server(&self) -> (PathBuf, PathBuf) {
        (
            self.dir.path().join("server.pem"),
            self.dir.path().join("server.key"),
        )
    }
}

/// Three `nats-server` processes with JetStream, clustered, in one namespace.
pub struct NatsCluster {
    nodes: Vec<Option<ChildGuard>>,
    /// Client connections over TLS with this certificate and key.
    tls: Option<(PathBuf, PathBuf)>,
    dir: TempDir,
    ns: Netns,
}

impl NatsCluster {
    fn start(ns: Netns, tls: Option<(PathBuf, PathBuf)>) -> Result<Self> {
        ensure!(
            std::path::Path::new(NATS_SERVER).is_file(),
            "{NATS_SERVER} is missing: run `cargo xtask setup`"
        );
        let mut cluster = Self {
            nodes: (0..NATS_NODES).map(|_| None).collect(),
            tls,
            dir: TempDir::new("nats")?,
            ns,
        };
        for i in 0..NATS_NODES as usize {
            cluster.start_node(i)?;
        }
        Ok(cluster)
    }

    /// The client URLs of every node, as an agent's `[fleet] urls`.
    pub fn urls(&self) -> Vec<String> {
        let scheme = if self.tls.is_some() { "tls" } else { "nats" };
        (0..NATS_NODES)
            .map(|i| format!("{scheme}://{NATS_V4}:{}", CLIENT_PORT + i))
            .collect()
    }

    fn store(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("n{i}"))
    }

    /// Starts node `i` (again, on its old store after a kill).
    pub fn start_node(&mut self, i: usize) -> Result<()> {
        ensure!(self.nodes[i].is_none(), "NATS node {i} is already running");
        let routes: Vec<String> = (0..NATS_NODES)
            .filter(|j| *j as usize != i)
            .map(|j| format!("nats://{NATS_V4}:{}", CLUSTER_PORT + j))
            .collect();
        let mut cmd = self.ns.command(NATS_SERVER);
        cmd.args(["-n", &format!("n{i}"), "-a", &NATS_V4.to_string()])
            .args(["-p", &(CLIENT_PORT + i as u16).to_string()])
            .args(["-js", "-sd"])
            .arg(self.store(i))
            .args(["--cluster_name", "gd-fleet"])
            .args([
                "--cluster",
                &format!("nats://{NATS_V4}:{}", CLUSTER_PORT + i as u16),
            ])
            .args(["--routes", &routes.join(",")])
            .args(["-m", &(MONITOR_PORT + i as u16).to_string()]);
        if let Some((cert, key)) = &self.tls {
            cmd.arg("--tls")
                .arg("--tlscert")
                .arg(cert)
                .arg("--tlskey")
                .arg(key);
        }
        let mut child = ChildGuard::spawn(&format!("nats-server n{i}"), &mut cmd)?
            .with_grace(Duration::from_secs(5));
        child.wait_for_stderr("Server is ready", Duration::from_secs(30))?;
        self.nodes[i] = Some(child);
        Ok(())
    }

    /// The node that leads `stream` now, as a live node's `/jsz` reports it.
    pub fn stream_leader(&self, stream: &str) -> Result<usize> {
        let live = self
            .nodes
            .iter()
            .position(Option::is_some)
            .context("no NATS node is running")?;
        let url = format!(
            "http://{NATS_V4}:{}/jsz?accounts=true&streams=true",
            MONITOR_PORT + live as u16
        );
        let out = crate::process::run_checked(self.ns.command("curl").args(["-sf", &url]))?;
        let jsz: serde_json::Value = serde_json::from_str(&out).context("parse /jsz")?;
        let leader = jsz["account_details"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|a| a["stream_detail"].as_array().into_iter().flatten())
            .find(|st| st["name"] == stream)
            .and_then(|st| st["cluster"]["leader"].as_str())
            .with_context(|| format!("/jsz names no leader for {stream}"))?;
        leader
            .strip_prefix('n')
            .and_then(|n| n.parse().ok())
            .filter(|n: &usize| *n < self.nodes.len())
            .with_context(|| format!("unexpected leader name {leader:?}"))
    }

    /// Kills node `i` outright (SIGKILL), as a crash would.
    pub fn kill_node(&mut self, i: usize) -> Result<()> {
        let child = self.nodes[i].take().context("that node is not running")?;
        let pid = libc::pid_t::try_from(child.pid()).context("pid out of range")?;
        // SAFETY: our own child's PID, not reaped yet (the guard reaps it just below).
        unsafe { libc::kill(pid, libc::SIGKILL) };
        child.wait_timeout(Duration::from_secs(10))?;
        Ok(())
    }
}

/// One guard host of the fleet.
pub struct FleetHost {
    pub name: String,
    pub v4: Ipv4Addr,
    pub home: AgentHome,
    pub ns: Netns,
}

impl FleetHost {
    /// `guard run` on this host, in the fleet, with `extra` TOML appended to its config.
    pub fn start(&self, urls: &[String], extra: &str) -> Result<Agent> {
        self.start_with(urls, "", extra)
    }

    /// Like `start`, with `fleet_extra` lines in its `[fleet]` section.
    pub fn start_with(&self, urls: &[String], fleet_extra: &str, extra: &str) -> Result<Agent> {
        let urls: Vec<String> = urls.iter().map(|u| format!("{u:?}")).collect();
        let config = format!(
            "[fleet]\nurls = [{}]\nhost = \"{}\"\nreplicas = 3\n{fleet_extra}\n[blocks]\ncapacity = 131072\nmax_ttl_secs = 86400\n{extra}",
            urls.join(", "),
            self.name
        );
        self.home.start(
            &self.ns,
            &RunOpts::new(ROLE_IF, SERVICE_PORT)
                .config(&config)
                .log("info,guard_user::fleet=debug"),
        )
    }

    /// Cuts the host off the fleet (and everything else): its link goes down.
    pub fn partition(&self) -> Result<()> {
        self.ns.ip(&["link", "set", ROLE_IF, "down"]).map(drop)
    }

    pub fn heal(&self) -> Result<()> {
        self.ns.ip(&["link", "set", ROLE_IF, "up"]).map(drop)
    }

    /// The prefixes in this host's kernel blocklist.
    pub fn kernel_blocks(&self) -> Result<Vec<String>> {
        let maps = self.home.pins().maps()?;
        Ok(maps
            .blocks()?
            .into_iter()
            .map(|(p, _)| p.to_string())
            .collect())
    }
}

/// The whole fleet lab. Field order is drop order: hosts (pins unloaded), NATS, then the
/// attacker and the switch.
pub struct FleetLab {
    pub hosts: Vec<FleetHost>,
    pub nats: NatsCluster,
    pub attackers: Vec<Netns>,
    pub switch: Netns,
}

impl FleetLab {
    pub fn new(hosts: usize) -> Result<Self> {
        Self::build(hosts, None)
    }

    /// The lab with the NATS nodes taking clients over TLS only, with `pki`'s server
    /// certificate.
    pub fn with_tls(hosts: usize, pki: &TestPki) -> Result<Self> {
        Self::build(hosts, Some(pki.server()))
    }

    fn build(hosts: usize, tls: Option<(PathBuf, PathBuf)>) -> Result<Self> {
        ensure!((1..=8).contains(&hosts), "1 to 8 hosts");
        let switch = crate::lab::new_switch("fsw")?;
        let nats_ns = join(&switch, "nats", "p-nats", 200, NATS_V4)?;
        let attackers = (0..ATTACKERS)
            .map(|i| {
                join(
                    &switch,
                    &format!("fat{i}"),
                    &format!("p-atk{i}"),
                    3 + i as u8,
                    attacker_v4(i),
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let mut list = Vec::new();
        for i in 0..hosts {
            let ns = join(
                &switch,
                &format!("fh{i}"),
                &format!("p-h{i}"),
                11 + i as u8,
                host_v4(i),
            )?;
            list.push(FleetHost {
                name: host_name(i),
                v4: host_v4(i),
                home: AgentHome::new()?,
                ns,
            });
        }
        let nats = NatsCluster::start(nats_ns, tls)?;
        Ok(Self {
            hosts: list,
            nats,
            attackers,
            switch,
        })
    }

    /// Starts every host's agent.
    pub fn start_all(&self, extra: &str) -> Result<Vec<Agent>> {
        self.start_all_with("", extra)
    }

    /// Starts every host's agent with `fleet_extra` lines in its `[fleet]` section.
    pub fn start_all_with(&self, fleet_extra: &str, extra: &str) -> Result<Vec<Agent>> {
        let urls = self.nats.urls();
        self.hosts
            .iter()
            .map(|h| h.start_with(&urls, fleet_extra, extra))
            .collect()
    }
}

/// A metric of an agent, 0 when absent.
pub fn metric(agent: &Agent, name: &str, labels: &[(&str, &str)]) -> Result<f64> {
    Ok(agent.scrape()?.value(name, labels).unwrap_or(0.0))
}

/// Waits until the agent subscribed and replayed the stream.
pub fn wait_caught_up(agent: &Agent, limit: Duration) -> Result<()> {
    wait_for("the agent to catch up with the fleet stream", limit, || {
        Ok((metric(agent, "guard_fleet_caught_up", &[])? == 1.0).then_some(()))
    })
}

/// Waits until the agent's blocklist holds exactly `n` entries.
pub fn wait_blocklist_len(agent: &Agent, n: u64, limit: Duration) -> Result<()> {
    let mut last = 0.0;
    wait_for(&format!("{n} blocks"), limit, || {
        last = metric(agent, "guard_blocklist_entries", &[])?;
        Ok((last as u64 == n).then_some(()))
    })
    .with_context(|| format!("the blocklist holds {last}"))
}

/// The `n` distinct /32 prefixes the fleet tests block, numbered from `first`: from 198.18.1.0
/// upward, clear of every lab host.
pub fn test_prefixes(first: u32, n: u32) -> Vec<String> {
    let base = u32::from(Ipv4Addr::new(198, 18, 1, 0));
    (first..first + n)
        .map(|i| format!("{}/32", Ipv4Addr::from(base + i)))
        .collect()
}

/// Blocks every prefix through the host's control socket over `connections` concurrent
/// sessions (the way many apps report at once), each block `ttl_secs` long.
pub fn block_all(
    home: &AgentHome,
    prefixes: &[String],
    ttl_secs: u32,
    connections: usize,
) -> Result<()> {
    let socket = home.socket();
    block_on(async {
        let chunk = prefixes.len().div_ceil(connections.max(1)).max(1);
        let mut tasks = Vec::new();
        for part in prefixes.chunks(chunk) {
            let socket = socket.clone();
            let part: Vec<String> = part.to_vec();
            tasks.push(async move {
                let mut conn = Connection::connect(&socket, "guard-fleet-test")
                    .await
                    .map_err(|e| anyhow::anyhow!("connect: {e}"))?;
                for p in part {
                    let resp = conn
                        .call(Request::Block(BlockRequest {
                            prefix: p.parse().map_err(|e| anyhow::anyhow!("{p}: {e:?}"))?,
                            ttl_secs,
                            reason: guard_common::state::reason::OPERATOR,
                            detected_at_unix_ns: 0,
                            detail: "fleet test".into(),
                        }))
                        .await
                        .map_err(|e| anyhow::anyhow!("block {p}: {e}"))?;
                    ensure!(
                        matches!(resp, Response::BlockResult { .. }),
                        "block {p}: {resp:?}"
                    );
                }
                Ok::<_, anyhow::Error>(())
            });
        }
        for r in futures_util::future::join_all(tasks).await {
            r?;
        }
        Ok(())
    })
}

/// Whether `nats-server` is where the fleet tests expect it.
pub fn nats_available() -> bool {
    Command::new(NATS_SERVER)
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// `SocketAddr` of host `i`'s service.
pub fn service(i: usize) -> SocketAddr {
    SocketAddr::from((host_v4(i), SERVICE_PORT))
}

/// Whether host `i` drops attacker `a` now: none of two connects gets through.
pub fn drops(lab: &FleetLab, a: usize, i: usize) -> Result<bool> {
    Ok(crate::agent::connects(&lab.attackers[a], service(i), 2, Duration::from_secs(1))? == 0)
}

/// One step of the fleet scenario, as the report shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FleetStep {
    pub what: String,
    pub source: String,
    /// Hosts that drop the source after the step.
    pub dropped_on: Vec<String>,
    /// Hosts that still serve it.
    pub served_on: Vec<String>,
    /// From the decision to the block in the last other host's kernel (polled every 5 ms).
    pub propagation_ms: Option<u64>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct FleetDemo {
    pub hosts: Vec<String>,
    pub nats_nodes: u16,
    pub steps: Vec<FleetStep>,
}

/// Reports a block the way an app does (client name and reason), on host `on`.
fn app_report(home: &AgentHome, prefix: &str) -> Result<()> {
    let socket = home.socket();
    block_on(async {
        let mut conn = Connection::connect(&socket, "chat-app")
            .await
            .map_err(|e| anyhow::anyhow!("connect: {e}"))?;
        let resp = conn
            .call(Request::Block(BlockRequest {
                prefix: prefix
                    .parse()
                    .map_err(|e| anyhow::anyhow!("{prefix}: {e:?}"))?,
                ttl_secs: 600,
                reason: guard_common::state::reason::MESSAGE_FLOOD,
                detected_at_unix_ns: 0,
                detail: "fleet demo: message flood".into(),
            }))
            .await
            .map_err(|e| anyhow::anyhow!("block {prefix}: {e}"))?;
        ensure!(matches!(resp, Response::BlockResult { .. }), "{resp:?}");
        Ok(())
    })
}

/// Milliseconds until every host in `on` has `prefix` in its kernel (or lacks it, `present`
/// false), polled every 5 ms for at most 30 s.
/// Polls until the kernels of hosts `on` hold (or no longer hold) `prefix`; the time is counted
/// from `start`, taken just before the decision was made.
fn propagation(
    lab: &FleetLab,
    on: &[usize],
    prefix: &str,
    present: bool,
    start: std::time::Instant,
) -> Result<u64> {
    let mut pending: Vec<usize> = on.to_vec();
    while !pending.is_empty() {
        let mut still = Vec::new();
        for &i in &pending {
            if lab.hosts[i].kernel_blocks()?.iter().any(|p| p == prefix) != present {
                still.push(i);
            }
        }
        pending = still;
        ensure!(
            start.elapsed() < Duration::from_secs(120),
            "{prefix} did not reach hosts {pending:?} within 120 s"
        );
        if !pending.is_empty() {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    Ok(start.elapsed().as_millis() as u64)
}

/// The fleet scenario of `cargo xtask demo` (and of its test): three hosts, three NATS nodes.
/// An attacker flagged on host a is dropped on b and c; a NATS node is killed and a decision
/// on b still reaches everyone; host c restarts while a decides and catches up; an unblock on
/// c lifts a block everywhere. `say` narrates.
pub fn demo_scenario(mut say: impl FnMut(&str)) -> Result<FleetDemo> {
    let mut lab = FleetLab::new(3)?;
    let mut agents: Vec<Option<Agent>> = lab.start_all("")?.into_iter().map(Some).collect();
    for a in agents.iter().flatten() {
        wait_caught_up(a, Duration::from_secs(120))?;
    }
    let _listeners: Vec<crate::agent::Listener> = (0..lab.hosts.len())
        .map(|i| crate::agent::Listener::new(&lab.hosts[i].ns, service(i)))
        .collect::<Result<_>>()?;
    let names: Vec<String> = lab.hosts.iter().map(|h| h.name.clone()).collect();
    let mut steps = Vec::new();
    let mut record = |lab: &FleetLab, what: &str, a: usize, ms: Option<u64>| -> Result<()> {
        let (mut dropped_on, mut served_on) = (Vec::new(), Vec::new());
        for (i, name) in names.iter().enumerate() {
            if drops(lab, a, i)? {
                dropped_on.push(name.clone());
            } else {
                served_on.push(name.clone());
            }
        }
        let step = FleetStep {
            what: what.to_string(),
            source: attacker_v4(a).to_string(),
            dropped_on,
            served_on,
            propagation_ms: ms,
        };
        say(&format!(
            "fleet: {what}: {} dropped on {:?}, served on {:?}{}",
            step.source,
            step.dropped_on,
            step.served_on,
            ms.map(|m| format!(", in every kernel after {m} ms"))
                .unwrap_or_default()
        ));
        steps.push(step);
        Ok(())
    };
    record(&lab, "before any decision", 0, None)?;

    let first = format!("{}/32", attacker_v4(0));
    let decided = Instant::now();
    app_report(&lab.hosts[0].home, &first)?;
    let ms = propagation(&lab, &[1, 2], &first, true, decided)?;
    record(&lab, "flagged by the app on host-a", 0, Some(ms))?;

    // The worst node to lose: the stream's leader, so that writes wait for JetStream to
    // elect another.
    let leader = lab.nats.stream_leader("GUARD_BLOCKS")?;
    lab.nats.kill_node(leader)?;
    let second = format!("{}/32", attacker_v4(1));
    let decided = Instant::now();
    app_report(&lab.hosts[1].home, &second)?;
    let ms = propagation(&lab, &[0, 2], &second, true, decided).with_context(|| {
        let logs: Vec<String> = agents
            .iter()
            .flatten()
            .map(|a| {
                a.log()
                    .lines()
                    .rev()
                    .take(15)
                    .collect::<Vec<_>>()
                    .join("\n")
            })
            .collect();
        format!("agent logs (newest first):\n{}", logs.join("\n---\n"))
    })?;
    record(
        &lab,
        &format!("NATS node n{leader} (the stream's leader) killed, then flagged on host-b"),
        1,
        Some(ms),
    )?;

    if let Some(c) = agents[2].take() {
        c.stop()?;
    }
    let third = format!("{}/32", attacker_v4(2));
    let decided = Instant::now();
    app_report(&lab.hosts[0].home, &third)?;
    let ms = propagation(&lab, &[1], &third, true, decided)?;
    record(
        &lab,
        "flagged on host-a while host-c's agent is down",
        2,
        Some(ms),
    )?;
    let urls = lab.nats.urls();
    let restarted = Instant::now();
    agents[2] = Some(lab.hosts[2].start(&urls, "")?);
    let ms = propagation(&lab, &[2], &third, true, restarted)?;
    record(
        &lab,
        "host-c's agent restarted (time: from its start to the block in its kernel)",
        2,
        Some(ms),
    )?;
    lab.nats.start_node(leader)?;

    // Where it was decided: another host's unblock lifts only the copies the fleet brought.
    let decided = Instant::now();
    lab.hosts[0].home.ctl(&["unblock", &first])?;
    let ms = propagation(&lab, &[1, 2], &first, false, decided)?;
    record(
        &lab,
        "unblocked by the operator on host-a, where it was decided",
        0,
        Some(ms),
    )?;
    drop(agents);
    Ok(FleetDemo {
        hosts: lab.hosts.iter().map(|h| h.name.clone()).collect(),
        nats_nodes: NATS_NODES,
        steps,
    })
}

/// A NATS client of the test's own, on the lab's bridge (from the first attacker's namespace):
/// what a rogue publisher, or an operator with JetStream rights, does to the fleet's stream.
/// `f` gets a JetStream context and the stream's config as an agent of this lab makes it.
pub fn with_jetstream<T, F, Fut>(lab: &FleetLab, f: F) -> Result<T>
where
    T: Send,
    F: FnOnce(async_nats::jetstream::Context, async_nats::jetstream::stream::Config) -> Fut + Send,
    Fut: std::future::Future<Output = Result<T>>,
{
    let urls = lab.nats.urls();
    let settings = guard_user::fleet::FleetSettings::resolve(
        &guard_user::fleet::FleetFile {
            replicas: Some(3),
            ..Default::default()
        },
        &urls,
        Some("gd-test-admin"),
    )?
    .context("fleet settings with urls")?;
    // What `[blocks] max_ttl_secs` is on every lab host (FleetHost::start_with).
    let config = guard_user::fleet::stream_config(&settings, Duration::from_secs(86_400));
    let tls = lab.nats.tls.is_some();
    lab.attackers[0].run_in(move || {
        block_on(async move {
            ensure!(!tls, "with_jetstream speaks plain NATS only");
            let addrs: Vec<async_nats::ServerAddr> = urls
                .iter()
                .map(|u| u.parse().context("a NATS URL"))
                .collect::<Result<_>>()?;
            let client = async_nats::ConnectOptions::new()
                .connection_timeout(Duration::from_secs(5))
                .connect(addrs)
                .await
                .context("connect to the lab's NATS")?;
            f(async_nats::jetstream::new(client), config).await
        })
    })?
}

/// Publishes `payload` on host `host`'s subject as is (no agent wrote it), and waits for
/// JetStream to store it.
pub fn publish_raw(lab: &FleetLab, host: &str, payload: Vec<u8>) -> Result<()> {
    let subject = format!("guard.blocks.{host}");
    with_jetstream(lab, move |js, _| async move {
        js.publish(subject, payload.into())
            .await
            .map_err(|e| anyhow::anyhow!("publish: {e}"))?
            .await
            .map_err(|e| anyhow::anyhow!("stored: {e}"))?;
        Ok(())
    })
}

/// Deletes the fleet's stream, as an operator cleaning up (or an accident) would.
pub fn delete_stream(lab: &FleetLab) -> Result<()> {
    with_jetstream(lab, |js, config| async move {
        js.delete_stream(&config.name)
            .await
            .map_err(|e| anyhow::anyhow!("delete stream {}: {e}", config.name))?;
        Ok(())
    })
}

/// Whether the fleet's stream exists now.
pub fn stream_exists(lab: &FleetLab) -> Result<bool> {
    with_jetstream(lab, |js, config| async move {
        Ok(js.get_stream(&config.name).await.is_ok())
    })
}

/// Creates the fleet's stream (empty) as an agent would.
pub fn create_stream(lab: &FleetLab) -> Result<()> {
    with_jetstream(lab, |js, config| async move {
        let name = config.name.clone();
        js.create_stream(config)
            .await
            .map_err(|e| anyhow::anyhow!("create stream {name}: {e}"))?;
        Ok(())
    })
}

/// A batch as an agent would write it, of `host`, with `decisions`.
pub fn batch_json(host: &str, decisions: Vec<guard_user::fleet::Decision>) -> Vec<u8> {
    serde_json::to_vec(&guard_user::fleet::Batch {
        v: guard_user::fleet::WIRE_VERSION,
        host: host.to_string(),
        decisions,
    })
    .expect("a batch serialises")
}

/// A decision dated `decided_unix_ms`, blocking `prefix` for an hour from now (or lifting it).
pub fn decision(
    action: guard_user::fleet::Action,
    prefix: &str,
    decided_unix_ms: u64,
) -> guard_user::fleet::Decision {
    let now = guard_user::fleet::unix_now_ms();
    guard_user::fleet::Decision {
        action,
        prefix: prefix.to_string(),
        expires_unix_ms: match action {
            guard_user::fleet::Action::Block => now + 3_600_000,
            guard_user::fleet::Action::Unblock => 0,
        },
        decided_unix_ms,
        reason: "operator".into(),
        origin: "operator:uid=0".into(),
        level: 0,
        detail: "rogue publisher".into(),
    }
}
