//! The lab topology: a bridge in a "switch" namespace and one namespace per
//! role, each joined to the bridge by a veth pair.
//!
//! ```text
//!   server  198.18.0.1/24  2001:2::1/64   eth0 ──┐
//!   legit   198.18.0.2/24 (+ .10–.17)     eth0 ──┼── br0 (switch netns)
//!           2001:2::2/64                         │
//!   attacker 198.18.0.3/24 2001:2::3/64   eth0 ──┘
//! ```
//!
//! Every interface is created directly inside its namespace (`ip -n NS link add ... peer ...
//! netns SWITCH`), so nothing ever appears in the host's namespace and two labs never clash on
//! interface names. No namespace has a default route: the only reachable addresses are the
//! lab's own.
//!
//! XDP on the server's `eth0`: a veth runs native (driver-mode) XDP on the frames its peer
//! transmits, so a program attached to the server's `eth0` (`XdpMode::Driver`) sees everything
//! the legit and attacker namespaces send through the bridge, with nothing set up on the other
//! side. Checked on this kernel with a pass-all and a drop-all program attached by
//! `ip link set dev eth0 xdpdrv`: drop-all cuts the server off from both clients; pass-all
//! carries connects over IPv4 and IPv6, a 5 MB echo (GSO-sized frames) and floods. So no offload
//! is turned off here. The peer (`p-srv`) needs an XDP program of its own only when the
//! server-side program returns `XDP_TX` (SYN cookies): see [`Lab::allow_xdp_tx`].
//!
//! The server namespace keeps the kernel's per-namespace defaults: `tcp_syncookies = 1`
//! (cookies when the SYN queue overflows; a flood shows as `TcpExt:SyncookiesSent`) and
//! `somaxconn = 4096`. A bench that wants a different baseline sets it with `Netns::sysctl`,
//! which only accepts per-namespace `net.*` keys.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::netns::Netns;

/// The server's address.
pub const SERVER_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
pub const SERVER_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 1);
/// The legit clients' main address.
pub const LEGIT_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
pub const LEGIT_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 2);
/// The attacker's own address; spoofed floods use `SPOOF_NET` instead.
pub const ATTACKER_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 3);
pub const ATTACKER_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 3);
/// The range spoofed floods draw sources from. The server routes it to the attacker, whose
/// namespace does not forward, so SYN-ACKs to spoofed sources die there instead of leaving.
pub const SPOOF_NET: (Ipv4Addr, u8) = (Ipv4Addr::new(198, 19, 0, 0), 16);
/// Prefix lengths on the lab's segment.
pub const LAB_V4_PREFIX: u8 = 24;
pub const LAB_V6_PREFIX: u8 = 64;

/// Interface name of every role's end of its veth, inside its own namespace.
pub const ROLE_IF: &str = "eth0";
const BRIDGE: &str = "br0";
/// The switch's port toward the attacker (inside `switch`).
pub const ATTACKER_PORT: &str = "p-atk";
/// The connectivity check's port: "discard", which nothing in a fresh lab listens on.
const CHECK_PORT: u16 = 9;

/// Fixed, locally administered MACs ("gd" in bytes 2–3): each lab has its own bridge, so
/// equal MACs in two labs never meet, and trafgen configs can be written without a look-up.
pub const SERVER_MAC: [u8; 6] = [0x02, 0x67, 0x64, 0, 0, 1];
pub const LEGIT_MAC: [u8; 6] = [0x02, 0x67, 0x64, 0, 0, 2];
pub const ATTACKER_MAC: [u8; 6] = [0x02, 0x67, 0x64, 0, 0, 3];

/// The extra legit addresses 198.18.0.10–17 (several "users" behind one namespace).
pub fn legit_extra_v4() -> Vec<Ipv4Addr> {
    (10..=17).map(|n| Ipv4Addr::new(198, 18, 0, n)).collect()
}

/// Formats a MAC as `aa:bb:cc:dd:ee:ff`.
pub fn fmt_mac(mac: [u8; 6]) -> String {
    mac.map(|b| format!("{b:02x}")).join(":")
}

/// The whole lab; dropping it deletes all four namespaces (and with them every veth and the
/// bridge). Built step by step from guards, so a failure half-way cleans up too.
#[derive(Debug)]
pub struct Lab {
    pub server: Netns,
    pub legit: Netns,
    pub attacker: Netns,
    pub switch: Netns,
    /// The pass-all program on `p-srv` while XDP_TX is allowed (its fds outlive the
    /// namespaces by a moment at drop, which detaches nothing twice: the link went with them).
    peer_xdp: Option<crate::raw_xdp::RawXdp>,
}

/// A namespace holding only a bridge (`BRIDGE`), up, for [`plug`] to join others to.
pub fn new_switch(role: &str) -> Result<Netns> {
    let switch = Netns::new(role)?;
    // The switch only bridges frames; without IPv6 on its ports it stays silent (no
    // router solicitations or MLD reports mixed into captures).
    switch.sysctl("net.ipv6.conf.default.disable_ipv6", "1")?;
    switch.sysctl("net.ipv6.conf.all.disable_ipv6", "1")?;
    switch.ip(&["link", "add", BRIDGE, "type", "bridge"])?;
    switch.ip(&["link", "set", BRIDGE, "up"])?;
    Ok(switch)
}

/// Joins `ns` to the switch's bridge: its `ROLE_IF` (with `mac`) paired with the switch port
/// `port`, and `v4` on it. The caller brings `ROLE_IF` up once its addresses are in place.
pub fn plug(switch: &Netns, ns: &Netns, port: &str, mac: [u8; 6], v4: Ipv4Addr) -> Result<()> {
    let mac = fmt_mac(mac);
    ns.ip(&[
        "link",
        "add",
        ROLE_IF,
        "address",
        &mac,
        "type",
        "veth",
        "peer",
        "name",
        port,
        "netns",
        switch.name(),
    ])
    .with_context(|| format!("cannot create the veth pair for {}", ns.name()))?;
    switch.ip(&["link", "set", port, "master", BRIDGE, "up"])?;
    ns.ip(&[
        "addr",
        "add",
        &format!("{v4}/{LAB_V4_PREFIX}"),
        "dev",
        ROLE_IF,
    ])?;
    Ok(())
}

impl Lab {
    /// Builds the topology and checks that the server answers both clients over
    /// IPv4 and IPv6 (`check_connectivity`).
    pub fn new() -> Result<Self> {
        let switch = new_switch("sw")?;

        let server = Netns::new("srv")?;
        let legit = Netns::new("leg")?;
        let attacker = Netns::new("atk")?;
        let roles = [
            (&server, "p-srv", SERVER_MAC, SERVER_V4, SERVER_V6),
            (&legit, "p-leg", LEGIT_MAC, LEGIT_V4, LEGIT_V6),
            (
                &attacker,
                ATTACKER_PORT,
                ATTACKER_MAC,
                ATTACKER_V4,
                ATTACKER_V6,
            ),
        ];
        for (ns, port, mac, v4, v6) in roles {
            plug(&switch, ns, port, mac, v4)?;
            // nodad: the address is usable at once instead of after ~1 s of duplicate
            // detection, and the lab owns the whole segment anyway.
            ns.ip(&[
                "addr",
                "add",
                &format!("{v6}/{LAB_V6_PREFIX}"),
                "dev",
                ROLE_IF,
                "nodad",
            ])?;
            ns.ip(&["link", "set", ROLE_IF, "up"])?;
        }
        for extra in legit_extra_v4() {
            legit.ip(&[
                "addr",
                "add",
                &format!("{extra}/{LAB_V4_PREFIX}"),
                "dev",
                ROLE_IF,
            ])?;
        }
        server.ip(&[
            "route",
            "add",
            &format!("{}/{}", SPOOF_NET.0, SPOOF_NET.1),
            "via",
            &ATTACKER_V4.to_string(),
            "dev",
            ROLE_IF,
        ])?;

        let lab = Self {
            server,
            legit,
            attacker,
            switch,
            peer_xdp: None,
        };
        lab.check_connectivity()?;
        Ok(lab)
    }

    /// Lets the server's XDP program answer frames (`XDP_TX`, SYN cookies): a veth delivers
    /// such frames only to a peer that runs XDP itself. The switch's program also carries off
    /// every frame toward [`SPOOF_NET`] (replies to forged sources, whoever sent them), as the
    /// internet would: a NIC transmits at line rate, but here each reply would otherwise be
    /// bridged to the attacker on the server's core and overflow the veth's ring, costing the
    /// server what a real one never pays.
    pub fn allow_xdp_tx(&mut self) -> Result<()> {
        if self.peer_xdp.is_none() {
            let sink = crate::raw_xdp::spoof_sink_program(SPOOF_NET.0);
            self.peer_xdp = Some(
                crate::raw_xdp::RawXdp::attach(&self.switch, "p-srv", "gd_spoof_sink", &sink)
                    .context("an XDP program on the switch's server port")?,
            );
        }
        Ok(())
    }

    /// Undoes [`Lab::allow_xdp_tx`].
    pub fn forbid_xdp_tx(&mut self) {
        self.peer_xdp = None;
    }

    /// The server's interface (inside `server`) that guard's XDP program attaches to.
    pub fn server_if() -> &'static str {
        ROLE_IF
    }

    /// The attacker's interface (inside `attacker`), for trafgen.
    pub fn attacker_if() -> &'static str {
        ROLE_IF
    }

    /// Moves the server's receive processing into its own `napi/eth0-<id>` kernel thread and
    /// returns that thread's PID, so benches can pin it to the server's core.
    ///
    /// A veth hands packets to its NAPI context only when GRO is on and the sending peer (the
    /// switch's `p-srv`) does no TSO; otherwise they are processed on the sender's core and a
    /// flood would cost the attacker's core, not the server's. `threaded` then moves that
    /// context into a kthread; which one is ours comes from a real connection's
    /// `SO_INCOMING_NAPI_ID`, so no other lab's thread is ever touched. Calling it again
    /// (after a program swap replaced the thread) finds the current thread. The thread goes
    /// away with the namespace.
    pub fn thread_server_napi(&self) -> Result<u32> {
        self.switch
            .exec(&["ethtool", "-K", "p-srv", "tso", "off"])
            .context("turn TSO off on the switch's server port")?;
        self.server
            .exec(&["ethtool", "-K", ROLE_IF, "gro", "on"])
            .context("enable GRO (NAPI) on the server veth")?;
        self.write_server_sysfs(&[("threaded", "1".into())])
            .context("enable threaded NAPI on the server veth")?;
        let id = self.server_napi_id()?;
        let name = format!("napi/{ROLE_IF}-{id}");
        find_kthread(&name).with_context(|| format!("no kernel thread {name}"))
    }

    /// Gives the server's veth the interrupt coalescing of a NIC: after a poll that found
    /// work, its NAPI context stays scheduled for up to `defer` more polls, `timeout` apart,
    /// instead of being woken again by every frame.
    ///
    /// A veth has no coalescing of its own: at a fixed offered rate every frame wakes the
    /// server's NAPI thread, and that wake-up (the same whatever filter runs) then makes up
    /// most of the server's cost per frame, hiding what the filters themselves cost. Per-device
    /// settings on this lab's own interface: they go with the namespace.
    pub fn coalesce_server_rx(&self, timeout: Duration, defer: u32) -> Result<()> {
        self.write_server_sysfs(&[
            ("napi_defer_hard_irqs", defer.to_string()),
            ("gro_flush_timeout", timeout.as_nanos().to_string()),
        ])
        .context("set interrupt coalescing on the server veth")
    }

    /// Writes attributes of the server's veth under /sys/class/net. Only the namespace's own
    /// sysfs shows its interfaces, hence `ip netns exec` (which mounts it) rather than
    /// `nsenter`.
    fn write_server_sysfs(&self, attrs: &[(&str, String)]) -> Result<()> {
        let script = attrs
            .iter()
            .map(|(attr, value)| format!("echo {value} > /sys/class/net/{ROLE_IF}/{attr}"))
            .collect::<Vec<_>>()
            .join(" && ");
        crate::process::run_checked(std::process::Command::new("ip").args([
            "netns",
            "exec",
            self.server.name(),
            "sh",
            "-c",
            &script,
        ]))?;
        Ok(())
    }

    /// The NAPI id the server's packets arrive on, from one real connection.
    fn server_napi_id(&self) -> Result<u32> {
        use std::io::{Read as _, Write as _};
        use std::os::fd::AsRawFd as _;
        let listener = self
            .server
            .run_in(|| std::net::TcpListener::bind((SERVER_V4, 0)))??;
        let to = listener.local_addr()?;
        self.legit.run_in(|| -> Result<()> {
            let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(3))?;
            s.write_all(b"n")?;
            Ok(())
        })??;
        let (mut conn, _) = listener.accept()?;
        conn.set_read_timeout(Some(Duration::from_secs(3)))?;
        conn.read_exact(&mut [0u8; 1])?;
        let mut id: u32 = 0;
        let mut len = std::mem::size_of::<u32>() as libc::socklen_t;
        // SAFETY: getsockopt on a socket we own, into a local u32 of the stated size.
        let rc = unsafe {
            libc::getsockopt(
                conn.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_INCOMING_NAPI_ID,
                (&mut id as *mut u32).cast(),
                &mut len,
            )
        };
        anyhow::ensure!(
            rc == 0 && id != 0,
            "the server's packets carry no NAPI id: threaded NAPI is not in effect"
        );
        Ok(id)
    }

    /// Every namespace of this lab.
    pub fn namespaces(&self) -> [&Netns; 4] {
        [&self.server, &self.legit, &self.attacker, &self.switch]
    }

    /// One bounded TCP connect per path to a port nobody listens on: a refusal (RST) proves
    /// the SYN got there and the answer came back, with no listener and no ping needed.
    pub fn check_connectivity(&self) -> Result<()> {
        let paths: [(&Netns, IpAddr); 4] = [
            (&self.legit, SERVER_V4.into()),
            (&self.legit, SERVER_V6.into()),
            (&self.attacker, SERVER_V4.into()),
            (&self.server, LEGIT_V4.into()),
        ];
        for (ns, dst) in paths {
            let to = SocketAddr::new(dst, CHECK_PORT);
            let res = ns.run_in(|| TcpStream::connect_timeout(&to, Duration::from_secs(2)))?;
            match res {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {}
                Err(e) => bail!("lab check: {} cannot reach {to}: {e}", ns.name()),
            }
        }
        Ok(())
    }
}

/// The PID of the kernel thread whose name is exactly `name`.
pub fn find_kthread(name: &str) -> Option<u32> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        // Processes come and go while we look; a vanished one is simply not ours.
        let comm = std::fs::read_to_string(e.path().join("comm")).ok()?;
        (comm.trim_end() == name).then_some(pid)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_stay_in_the_lab_ranges() {
        let mut all: Vec<IpAddr> = vec![
            SERVER_V4.into(),
            SERVER_V6.into(),
            LEGIT_V4.into(),
            LEGIT_V6.into(),
            ATTACKER_V4.into(),
            ATTACKER_V6.into(),
            SPOOF_NET.0.into(),
        ];
        all.extend(legit_extra_v4().into_iter().map(IpAddr::from));
        for ip in all {
            crate::wire::ensure_lab_ip(ip).unwrap();
        }
        assert_eq!(legit_extra_v4().len(), 8);
        assert_eq!(fmt_mac(SERVER_MAC), "02:67:64:00:00:01");
    }
}
