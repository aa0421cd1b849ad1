//! Wrappers for the attack tools. Each one starts the tool in a namespace, bounded both in
//! count and in time (`timeout -s INT` around it, a packet count where the tool has one), and
//! returns a handle to wait on while something else measures.
//!
//! Every destination (and every spoofed source) is checked against the lab ranges first.

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};

use crate::netns::Netns;
use crate::process::{ChildGuard, Finished};
use crate::wire::{ensure_lab_ip, parse_target_url, v4_in, LAB_V4_NET};

/// Upper bound on any single flood's duration: a typo in `secs` must not leave a flood
/// running for hours.
pub const MAX_FLOOD_SECS: u32 = 300;

/// A temporary directory removed on drop (tool config files live here).
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    pub fn new(tag: &str) -> Result<Self> {
        static N: AtomicU32 = AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "gd-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir(&path)
            .with_context(|| format!("cannot create temp dir {}", path.display()))?;
        Ok(Self { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.path) {
            eprintln!("warning: cannot remove {}: {e}", self.path.display());
        }
    }
}

/// Which tool a `Flood` runs; decides how its output is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tool {
    Hping3,
    Trafgen,
    Slowhttptest,
    /// `lab-client syn-flood`: SYNs at a fixed pace.
    PacedSyn,
}

/// A running, bounded attack. Dropping it stops the tool.
pub struct Flood {
    tool: Tool,
    child: ChildGuard,
    /// How long `wait` lets it run before stopping it: its own bound plus slack.
    budget: Duration,
    /// Config and statistics files; removed with the handle.
    dir: Option<TempDir>,
}

/// What a finished attack reported.
#[derive(Debug, Clone, PartialEq)]
pub struct FloodReport {
    pub tool: Tool,
    /// Packets sent (hping3, trafgen) or the most connections slowhttptest held open at
    /// once, when the tool reported it.
    pub sent: Option<u64>,
    /// slowhttptest's last verdict on whether its probe connection still got an answer.
    pub service_available: Option<bool>,
    /// Everything it printed, for diagnostics.
    pub output: String,
}

impl Flood {
    pub fn pid(&self) -> u32 {
        self.child.pid()
    }

    pub fn tool(&self) -> Tool {
        self.tool
    }

    /// Waits for the tool to finish by itself (stopping it if it overstays) and parses what it
    /// printed. Fails if the tool failed before sending anything.
    pub fn wait(self) -> Result<FloodReport> {
        let done = self.child.wait_timeout(self.budget)?;
        parse_report(self.tool, &done, self.dir.as_ref())
    }

    /// Stops it early (SIGINT: the tools still print their statistics).
    pub fn stop(self) -> Result<FloodReport> {
        let done = self.child.stop()?;
        parse_report(self.tool, &done, self.dir.as_ref())
    }
}

fn parse_report(tool: Tool, done: &Finished, dir: Option<&TempDir>) -> Result<FloodReport> {
    let output = format!("{}{}", done.stdout, done.stderr);
    let (sent, service_available) = match tool {
        Tool::Hping3 => (parse_hping3_sent(&output), None),
        Tool::Trafgen => (parse_trafgen_sent(&output), None),
        Tool::PacedSyn => (parse_paced_syn_sent(&done.stdout), None),
        Tool::Slowhttptest => {
            // Its terminal output only has a status every 5 s; the per-second CSV is complete.
            let csv = dir
                .map(|d| d.path().join(format!("{SLOW_STATS}.csv")))
                .and_then(|p| std::fs::read_to_string(p).ok())
                .unwrap_or_default();
            match parse_slowhttptest_csv(&csv) {
                Some(s) => (Some(s.peak_connected), Some(s.service_available)),
                None => (None, None),
            }
        }
    };
    // A tool that exited non-zero without its statistics never ran its attack (bad option,
    // no permission, missing interface): that must fail the caller, not read as "0 sent".
    if sent.is_none() && !done.status.success() {
        bail!(
            "{tool:?} failed ({}) without reporting what it sent: {}",
            done.status,
            output.trim()
        );
    }
    Ok(FloodReport {
        tool,
        sent,
        service_available,
        output,
    })
}

fn check_secs(secs: u32) -> Result<()> {
    ensure!(
        (1..=MAX_FLOOD_SECS).contains(&secs),
        "flood duration {secs}s must be 1..={MAX_FLOOD_SECS}"
    );
    Ok(())
}

/// `timeout -s INT -k 2 SECS` in front of a tool: SIGINT lets it print statistics; the
/// kill-after catches a tool that ignores SIGINT. `--preserve-status` keeps the tool's own
/// status instead of 124.
fn bounded(ns: &Netns, secs: u32, cpu: Option<usize>) -> Command {
    let mut cmd = ns.command("timeout");
    cmd.args([
        "--preserve-status",
        "-s",
        "INT",
        "-k",
        "2",
        &secs.to_string(),
    ]);
    if let Some(cpu) = cpu {
        cmd.args(["taskset", "-c", &cpu.to_string()]);
    }
    cmd
}

/// A TCP SYN flood with hping3 from `ns` to `target:port` for `secs` seconds.
///
/// `rate: None` is `--flood` (as fast as it can; hping3 ignores `-c` there, so only the
/// timeout bounds it); `Some(r)` sends `r` SYNs per second with `-c r*secs`. `spoof_src` sets
/// one fixed source (`-a`); it must be a lab address (e.g. in `SPOOF_NET`, which the server
/// routes to the attacker). `cpu` pins the tool with taskset. IPv4 only: hping3 has no IPv6.
pub fn hping3_syn_flood(
    ns: &Netns,
    target: IpAddr,
    port: u16,
    spoof_src: Option<IpAddr>,
    secs: u32,
    rate: Option<u32>,
    cpu: Option<usize>,
) -> Result<Flood> {
    ensure_lab_ip(target)?;
    ensure!(target.is_ipv4(), "hping3 has no IPv6 support: {target}");
    ensure!(port != 0, "port 0 is not a target");
    check_secs(secs)?;
    let mut cmd = bounded(ns, secs, cpu);
    cmd.args(["hping3", "-q", "-S", "-p", &port.to_string()]);
    if let Some(src) = spoof_src {
        ensure_lab_ip(src).context("spoofed source")?;
        ensure!(src.is_ipv4(), "spoofed source {src} must be IPv4");
        cmd.args(["-a", &src.to_string()]);
    }
    match rate {
        None => {
            cmd.arg("--flood");
        }
        Some(rate) => {
            ensure!(
                (1..=1_000_000).contains(&rate),
                "rate {rate}/s must be 1..=1000000"
            );
            cmd.args([
                "-i",
                &format!("u{}", 1_000_000 / rate),
                "-c",
                &(u64::from(rate) * u64::from(secs)).to_string(),
            ]);
        }
    }
    cmd.arg(target.to_string());
    Ok(Flood {
        tool: Tool::Hping3,
        child: ChildGuard::spawn("hping3", &mut cmd)?,
        budget: Duration::from_secs(u64::from(secs) + 5),
        dir: None,
    })
}

/// hping3's closing line: "N packets transmitted, M packets received, ...".
pub fn parse_hping3_sent(output: &str) -> Option<u64> {
    output.lines().rev().find_map(|line| {
        let (n, rest) = line.trim().split_once(' ')?;
        rest.starts_with("packets transmitted")
            .then(|| n.parse().ok())
            .flatten()
    })
}

/// The trafgen packet config for TCP SYNs from random sources in `src_net` (a /16, /24 or /32:
/// trafgen randomizes whole bytes with `drnd()`) to `dst:port`. Source ports, IP IDs and
/// sequence numbers are random too; checksums are recomputed per packet.
pub fn trafgen_syn_config(
    src_net: (Ipv4Addr, u8),
    dst: Ipv4Addr,
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    port: u16,
) -> Result<String> {
    let (net, prefix) = src_net;
    ensure!(
        matches!(prefix, 16 | 24 | 32),
        "source subnet /{prefix}: trafgen randomizes whole bytes, use /16, /24 or /32"
    );
    ensure!(
        v4_in(net, LAB_V4_NET.0, LAB_V4_NET.1),
        "source subnet {net}/{prefix} is outside 198.18.0.0/15"
    );
    ensure_lab_ip(dst.into())?;
    ensure!(port != 0, "port 0 is not a target");
    let fixed = usize::from(prefix / 8);
    let octets = net.octets();
    let hex = |bytes: &[u8]| {
        bytes
            .iter()
            .map(|b| format!("0x{b:02x}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut src = hex(&octets[..fixed]);
    if fixed < 4 {
        write!(src, ", drnd({})", 4 - fixed).expect("writing to a String");
    }
    Ok(format!(
        "/* TCP SYN, random sources in {net}/{prefix} -> {dst}:{port}; written by guard-tests */
{{
  /* Ethernet: dst, src, IPv4 */
  {dst_mac}, {src_mac}, c16(0x0800),
  /* IPv4: v4 ihl5, tos, total length 40, random id, DF, ttl 64, TCP, checksum */
  0x45, 0x00, c16(40), drnd(2), c16(0x4000), 64, 6, csumip(14, 33),
  /* source, destination */
  {src}, {dst_ip},
  /* TCP: random source port, destination port, random seq, ack 0 */
  drnd(2), c16({port}), drnd(4), c32(0),
  /* data offset 5, SYN, window 64240, checksum, urgent 0 */
  0x50, 0x02, c16(64240), csumtcp(14, 34), c16(0),
}}
",
        dst_mac = hex(&dst_mac),
        src_mac = hex(&src_mac),
        dst_ip = hex(&dst.octets()),
    ))
}

/// A SYN flood's shape: from `ns`'s `iface`, sources random in `src_subnet` (e.g.
/// "198.19.0.0/16"; a /32 is one spoofed source), to `dst:port` via `dst_mac`, `pps` SYNs per
/// second for `secs` seconds, the sender pinned to `cpu`.
#[derive(Debug, Clone, Copy)]
pub struct SynFlood<'a> {
    pub ns: &'a Netns,
    pub iface: &'a str,
    pub src_subnet: &'a str,
    pub dst: Ipv4Addr,
    pub dst_mac: [u8; 6],
    pub port: u16,
    pub pps: u32,
    pub secs: u32,
    pub cpu: Option<usize>,
}

/// `flood` sent with trafgen (`-n pps*secs -b pps`), a fixed offered rate so cost is compared
/// at equal load (a flood at maximum rate only finds ceilings): a
/// per-second budget that trafgen sends in one burst at its full speed (see
/// [`crate::paced_syn`]; [`paced_syn_flood`] sends the rate evenly). One trafgen process
/// (`-P 1`); it touches no machine-wide setting (`--no-sock-mem`, `-Q`: no IRQ affinity
/// changes). trafgen pins the worker that sends to CPU 0 itself, whatever `cpu` says (see
/// `measure::TRAFGEN_CPU`): only the parent, which waits, follows `cpu`. trafgen randomizes
/// whole bytes: the subnet must be a /16, /24 or /32.
pub fn trafgen_random_sources(flood: &SynFlood) -> Result<Flood> {
    ensure!(
        (1..=10_000_000).contains(&flood.pps),
        "rate {} pps must be 1..=10000000",
        flood.pps
    );
    trafgen_syn(flood, true)
}

/// The same flood as fast as one core sends. A rate (`-b`) puts trafgen on its slow path (one
/// send call per packet); without one it fills its memory-mapped TX ring, several times
/// faster. Still bounded: `timeout` in time and `-n` at a count far above what one core
/// sends in `secs`.
#[allow(clippy::too_many_arguments)]
pub fn trafgen_flat_out(
    ns: &Netns,
    iface: &str,
    src_subnet: &str,
    dst: Ipv4Addr,
    dst_mac: [u8; 6],
    port: u16,
    secs: u32,
    cpu: Option<usize>,
) -> Result<Flood> {
    let flood = SynFlood {
        ns,
        iface,
        src_subnet,
        dst,
        dst_mac,
        port,
        pps: FLAT_OUT_PPS,
        secs,
        cpu,
    };
    trafgen_syn(&flood, false)
}

/// Packets per second no single core reaches: the count bound of a flat-out flood.
const FLAT_OUT_PPS: u32 = 5_000_000;

/// `flood` with trafgen: `paced`, at `flood.pps` (`-b`); otherwise flat out, where `pps` only
/// bounds the count.
fn trafgen_syn(flood: &SynFlood, paced: bool) -> Result<Flood> {
    check_secs(flood.secs)?;
    let src_net = crate::wire::parse_v4_net(flood.src_subnet)?;
    let src_mac = flood.ns.mac(flood.iface)?;
    let config = trafgen_syn_config(src_net, flood.dst, src_mac, flood.dst_mac, flood.port)?;
    let dir = TempDir::new("trafgen")?;
    let conf = dir.path().join("syn.cfg");
    std::fs::write(&conf, config).with_context(|| format!("cannot write {}", conf.display()))?;
    let count = u64::from(flood.pps) * u64::from(flood.secs);
    let mut cmd = bounded(flood.ns, flood.secs, flood.cpu);
    cmd.arg("trafgen")
        .args(["--dev", flood.iface, "--conf"])
        .arg(&conf)
        .args(["-n", &count.to_string()]);
    if paced {
        cmd.args(["-b", &format!("{}pps", flood.pps)]);
    }
    cmd.args(["-P", "1", "--no-sock-mem", "-Q"]);
    Ok(Flood {
        tool: Tool::Trafgen,
        child: ChildGuard::spawn("trafgen", &mut cmd)?,
        budget: Duration::from_secs(u64::from(flood.secs) + 5),
        dir: Some(dir),
    })
}

/// `flood` at a truly fixed pace (`lab-client syn-flood`, see [`crate::paced_syn`]): one SYN
/// every 1/pps s, from any prefix inside 198.18.0.0/15. Use it where the load must be a rate
/// rather than trafgen's once-a-second burst.
pub fn paced_syn_flood(client: &crate::LabClient, flood: &SynFlood) -> Result<Flood> {
    check_secs(flood.secs)?;
    let src_mac = flood.ns.mac(flood.iface)?;
    let flags = [
        ("--iface", flood.iface.to_string()),
        ("--src-net", flood.src_subnet.to_string()),
        ("--dst", flood.dst.to_string()),
        ("--src-mac", crate::lab::fmt_mac(src_mac)),
        ("--dst-mac", crate::lab::fmt_mac(flood.dst_mac)),
        ("--port", flood.port.to_string()),
        ("--rate", flood.pps.to_string()),
        ("--secs", flood.secs.to_string()),
    ];
    let args: Vec<String> = std::iter::once("syn-flood".to_string())
        .chain(
            flags
                .into_iter()
                .flat_map(|(flag, value)| [flag.to_string(), value]),
        )
        .collect();
    let mut cmd = client.command(flood.ns, &args, flood.cpu);
    Ok(Flood {
        tool: Tool::PacedSyn,
        child: ChildGuard::spawn("lab-client syn-flood", &mut cmd)?,
        budget: Duration::from_secs(u64::from(flood.secs) + 5),
        dir: None,
    })
}

/// `lab-client syn-flood`'s JSON report: its `sent`.
fn parse_paced_syn_sent(stdout: &str) -> Option<u64> {
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with('{'))?;
    serde_json::from_str::<crate::report::SynFloodReport>(line)
        .ok()
        .map(|r| r.sent)
}

/// trafgen's summary: "N packets outgoing".
pub fn parse_trafgen_sent(output: &str) -> Option<u64> {
    output.lines().rev().find_map(|line| {
        let (n, rest) = line.trim().split_once(' ')?;
        (rest.trim() == "packets outgoing")
            .then(|| n.parse().ok())
            .flatten()
    })
}

/// File prefix of slowhttptest's statistics in the flood's temp dir.
const SLOW_STATS: &str = "slow";

/// A slowloris attack (slow headers) with slowhttptest from `ns` against `url`: `conns`
/// connections opened at up to 200/s, each trickling a header every 10 s, for `secs` seconds.
pub fn slowhttptest(ns: &Netns, url: &str, conns: u32, secs: u32) -> Result<Flood> {
    parse_target_url(url, &["http"])?;
    check_secs(secs)?;
    ensure!(
        (1..=65_000).contains(&conns),
        "{conns} connections must be 1..=65000"
    );
    let dir = TempDir::new("slow")?;
    let mut cmd = bounded(ns, secs + 3, None);
    cmd.args(["slowhttptest", "-H", "-c", &conns.to_string()])
        .args(["-r", &conns.min(200).to_string()])
        .args(["-i", "10", "-x", "24", "-p", "3"])
        .args(["-l", &secs.to_string(), "-u", url, "-g", "-o"])
        .arg(dir.path().join(SLOW_STATS));
    Ok(Flood {
        tool: Tool::Slowhttptest,
        child: ChildGuard::spawn("slowhttptest", &mut cmd)?,
        budget: Duration::from_secs(u64::from(secs) + 8),
        dir: Some(dir),
    })
}

/// What slowhttptest's per-second statistics say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlowStatus {
    /// Most connections open at once.
    pub peak_connected: u64,
    /// The last second's counts.
    pub connected: u64,
    pub pending: u64,
    pub closed: u64,
    /// Whether its probe connection still got an answer in the last second.
    pub service_available: bool,
}

/// Parses slowhttptest's `-g` CSV: "Seconds,Closed,Pending,Connected,Service Available", one
/// row per second; "Service Available" is 0 when its probe got no answer.
pub fn parse_slowhttptest_csv(csv: &str) -> Option<SlowStatus> {
    let mut lines = csv.lines();
    let header: Vec<&str> = lines.next()?.split(',').map(str::trim).collect();
    let col = |name: &str| header.iter().position(|h| *h == name);
    let (closed, pending, connected, avail) = (
        col("Closed")?,
        col("Pending")?,
        col("Connected")?,
        col("Service Available")?,
    );
    let mut out: Option<SlowStatus> = None;
    for line in lines {
        let row: Vec<u64> = line
            .split(',')
            .map(|v| v.trim().parse())
            .collect::<Result<_, _>>()
            .ok()?;
        let get = |i: usize| row.get(i).copied();
        let now = get(connected)?;
        out = Some(SlowStatus {
            peak_connected: out.map_or(now, |o| o.peak_connected.max(now)),
            connected: now,
            pending: get(pending)?,
            closed: get(closed)?,
            service_available: get(avail)? > 0,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hping3_stats() {
        let out = "HPING 198.18.0.1 (eth0 198.18.0.1): S set, 40 headers + 0 data bytes\n\
                   hping in flood mode, no replies will be shown\n\n\
                   --- 198.18.0.1 hping statistic ---\n\
                   187340 packets transmitted, 0 packets received, 100% packet loss\n";
        assert_eq!(parse_hping3_sent(out), Some(187_340));
        assert_eq!(
            parse_hping3_sent("[open_sockraw] socket(): Operation not permitted"),
            None
        );
    }

    #[test]
    fn trafgen_stats() {
        let out = "\n  19998 packets outgoing\n  1079892 bytes outgoing\n  4 sec, 1 usec on CPU0 (9999 packets)\n";
        assert_eq!(parse_trafgen_sent(out), Some(19_998));
        assert_eq!(parse_trafgen_sent("device eth9 not found"), None);
    }

    #[test]
    fn slowhttptest_csv() {
        let csv = "Seconds,Closed,Pending,Connected,Service Available\n\
                   0,0,1,0,20\n1,0,0,20,20\n2,3,0,17,0\n";
        assert_eq!(
            parse_slowhttptest_csv(csv),
            Some(SlowStatus {
                peak_connected: 20,
                connected: 17,
                pending: 0,
                closed: 3,
                service_available: false
            })
        );
        assert_eq!(parse_slowhttptest_csv(""), None);
        assert_eq!(
            parse_slowhttptest_csv("Seconds,Closed,Pending,Connected,Service Available\n"),
            None
        );
        assert_eq!(parse_slowhttptest_csv("a,b\n1,2\n"), None);
        assert_eq!(
            parse_slowhttptest_csv(
                "Seconds,Closed,Pending,Connected,Service Available\n1,x,0,0,0\n"
            ),
            None
        );
    }

    #[test]
    fn trafgen_config_layout() {
        let cfg = trafgen_syn_config(
            (Ipv4Addr::new(198, 19, 0, 0), 16),
            Ipv4Addr::new(198, 18, 0, 1),
            [2, 0x67, 0x64, 0, 0, 3],
            [2, 0x67, 0x64, 0, 0, 1],
            8080,
        )
        .unwrap();
        assert!(
            cfg.contains("0xc6, 0x13, drnd(2), 0xc6, 0x12, 0x00, 0x01"),
            "{cfg}"
        );
        assert!(cfg.contains("c16(8080)"));
        assert!(cfg.starts_with("/* TCP SYN"));
        // A /32 has no random part.
        let one = trafgen_syn_config(
            (Ipv4Addr::new(198, 19, 1, 2), 32),
            Ipv4Addr::new(198, 18, 0, 1),
            [0; 6],
            [0; 6],
            80,
        )
        .unwrap();
        assert!(one.contains("0xc6, 0x13, 0x01, 0x02, 0xc6"), "{one}");
        assert!(!one.contains("drnd(0)"));
        // Outside the lab, unaligned, or port 0: refused.
        for (net, p, port) in [
            (Ipv4Addr::new(10, 0, 0, 0), 16, 80),
            (Ipv4Addr::new(198, 19, 0, 0), 20, 80),
            (Ipv4Addr::new(198, 19, 0, 0), 16, 0),
        ] {
            assert!(trafgen_syn_config(
                (net, p),
                Ipv4Addr::new(198, 18, 0, 1),
                [0; 6],
                [0; 6],
                port
            )
            .is_err());
        }
        assert!(trafgen_syn_config(
            (Ipv4Addr::new(198, 19, 0, 0), 16),
            Ipv4Addr::new(8, 8, 8, 8),
            [0; 6],
            [0; 6],
            80
        )
        .is_err());
    }

    #[test]
    fn temp_dir_is_removed() {
        let dir = TempDir::new("unit").unwrap();
        let path = dir.path().to_path_buf();
        std::fs::write(path.join("f"), "x").unwrap();
        drop(dir);
        assert!(!path.exists());
    }
}
