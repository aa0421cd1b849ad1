//! What guard is measured against: the reference programs (guard-ebpf's `bench-ref` binary,
//! see its file for what each does and why) and xdp-filter from xdp-tools, the peer a user
//! would pick to drop a blocked source.

use std::path::PathBuf;

use aya::programs::{SchedClassifier, Xdp};
use aya::Ebpf;
use guard_tests::netns::Netns;

use anyhow::bail;
use guard_common::syncookie::CookieKey;

use super::*;

/// The reference programs, loaded (not attached) for test runs.
pub(super) struct Refs {
    ebpf: Ebpf,
}

/// Which reference program.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub(super) enum Ref {
    /// Returns the action, nothing else: the harness's cost per run.
    Empty(Verdict),
    /// Reads what a per-source SYN filter must, then takes the action.
    Minimal(Verdict),
    /// The same plus one exact-match lookup of the source: for verdicts that depend on it.
    Lookup(Verdict),
    /// Turns a SYN into a SYN-ACK in place (fixed ISN) and sends it.
    Tx,
    /// Answers a SYN with the kernel's own cookie helper (XDP only).
    KernelCookie,
    /// The same answer with guard's cookie (`syncookie::make`) instead (XDP only).
    GuardCookie,
    /// The kernel's cookie computed, the frame left alone (XDP only).
    KernelCookieCalc,
    /// Guard's cookie computed, the frame left alone (XDP only).
    GuardCookieCalc,
}

impl Ref {
    /// The name the tables show.
    pub(super) fn label(self) -> &'static str {
        match self {
            Ref::Empty(_) => "empty",
            Ref::Minimal(_) => "minimal",
            Ref::Lookup(_) => "minimal+lookup",
            Ref::Tx => "minimal SYN-ACK",
            Ref::KernelCookie => "kernel cookie",
            Ref::GuardCookie => "guard's MAC",
            Ref::KernelCookieCalc => "kernel cookie, computed only",
            Ref::GuardCookieCalc => "guard's cookie, computed only",
        }
    }
}

impl Refs {
    /// Loads every reference; `drop_sources` are the sources the lookup references drop.
    pub(super) fn load(drop_sources: &[IpAddr], cookie_key: &CookieKey) -> Result<Self> {
        let mut ebpf = Ebpf::load(guard_user::datapath::BENCH_REF_OBJECT)
            .context("load the bench's reference programs")?;
        let names: Vec<String> = ebpf.programs().map(|(name, _)| name.to_string()).collect();
        for name in names {
            let prog = ebpf
                .program_mut(&name)
                .with_context(|| format!("reference program {name}"))?;
            if name.starts_with("ref_xdp") {
                let p: &mut Xdp = prog.try_into()?;
                p.load()
                    .with_context(|| format!("the verifier refused {name}"))?;
            } else {
                let p: &mut SchedClassifier = prog.try_into()?;
                p.load()
                    .with_context(|| format!("the verifier refused {name}"))?;
            }
        }
        let mut sources: aya::maps::HashMap<_, [u64; 2], u32> = ebpf
            .map_mut("REF_SOURCES")
            .context("no REF_SOURCES map in the reference object")?
            .try_into()?;
        for ip in drop_sources {
            let key = guard_common::addr::AddrWords::from_addr(&from_ip(*ip)).0;
            sources.insert(key, REF_DROP_MARK, 0)?;
        }
        let mut key: aya::maps::Array<_, CookieKey> = ebpf
            .map_mut("REF_COOKIE_KEY")
            .context("no REF_COOKIE_KEY map in the reference object")?
            .try_into()?;
        key.set(0, *cookie_key, 0)?;
        Ok(Self { ebpf })
    }

    fn name(hook: Hook, r: Ref) -> Result<&'static str> {
        use Verdict::{Drop, Pass};
        Ok(match (hook, r) {
            (Hook::Xdp, Ref::Empty(Pass)) => "ref_xdp_empty_pass",
            (Hook::Xdp, Ref::Empty(Drop)) => "ref_xdp_empty_drop",
            (Hook::Tc, Ref::Empty(Pass)) => "ref_tc_empty_pass",
            (Hook::Tc, Ref::Empty(Drop)) => "ref_tc_empty_drop",
            (Hook::Xdp, Ref::Minimal(Pass)) => "ref_xdp_pass",
            (Hook::Xdp, Ref::Minimal(Drop)) => "ref_xdp_drop",
            (Hook::Tc, Ref::Minimal(Pass)) => "ref_tc_pass",
            (Hook::Tc, Ref::Minimal(Drop)) => "ref_tc_drop",
            (Hook::Xdp, Ref::Tx) => "ref_xdp_tx",
            (Hook::Tc, Ref::Tx) => "ref_tc_tx",
            (Hook::Xdp, Ref::Lookup(Pass)) => "ref_xdp_pass_lookup",
            (Hook::Xdp, Ref::Lookup(Drop)) => "ref_xdp_drop_lookup",
            (Hook::Tc, Ref::Lookup(Pass)) => "ref_tc_pass_lookup",
            (Hook::Tc, Ref::Lookup(Drop)) => "ref_tc_drop_lookup",
            (Hook::Xdp, Ref::KernelCookie) => "ref_xdp_cookie",
            (Hook::Xdp, Ref::GuardCookie) => "ref_xdp_sipcookie",
            (Hook::Xdp, Ref::KernelCookieCalc) => "ref_xdp_kcookie_calc",
            (Hook::Xdp, Ref::GuardCookieCalc) => "ref_xdp_gcookie_calc",
            (
                Hook::Tc,
                Ref::KernelCookie | Ref::GuardCookie | Ref::KernelCookieCalc | Ref::GuardCookieCalc,
            ) => {
                bail!("the cookie references are XDP only")
            }
        })
    }

    pub(super) fn program(&self, hook: Hook, r: Ref) -> Result<&LoadedProgram> {
        let name = Self::name(hook, r)?;
        self.ebpf
            .program(name)
            .with_context(|| format!("no reference program {name} in the object"))
    }
}

/// `DROP_MARK` of bench_ref.rs: what `*_drop_lookup` drops.
const REF_DROP_MARK: u32 = 1;

/// xdp-filter (xdp-tools) loaded by its own CLI on a veth in a namespace of ours, dropping
/// one source, with its program opened by id for test runs. Unloaded on drop; its pins live
/// in a folder of ours under bpffs (`LIBXDP_BPFFS`), never in the shared default.
pub(super) struct XdpFilter {
    // Declared first so the fd closes before the setup below unloads the program.
    prog: LoadedProgram,
    /// The program's name as the kernel knows it (which of xdp-filter's objects runs).
    pub(super) name: String,
    _setup: XdpFilterSetup,
}

/// The namespace, the veth and the pin folder xdp-filter runs in; xdp-filter unloaded and
/// the folder removed on drop (deleting the namespace detaches the program in any case).
struct XdpFilterSetup {
    pin_dir: PathBuf,
    ns: Netns,
}

const XF_IFACE: &str = "xf0";
/// The features guard's drop needs (IPv4 and IPv6 source addresses).
const XF_FEATURES: &str = "ipv4,ipv6";

impl XdpFilter {
    /// Loads xdp-filter (native mode, default allow) with `blocked` as a source to drop.
    pub(super) fn load(blocked: IpAddr) -> Result<Self> {
        ensure!(
            std::process::Command::new("xdp-filter")
                .arg("help")
                .output()
                .is_ok(),
            "xdp-filter not found: `cargo xtask setup` installs it (Debian package xdp-tools)"
        );
        let ns = Netns::new("xflt")?;
        ns.ip(&[
            "link", "add", XF_IFACE, "type", "veth", "peer", "name", "xf1",
        ])?;
        ns.ip(&["link", "set", XF_IFACE, "up"])?;
        ns.ip(&["link", "set", "xf1", "up"])?;
        let pin_dir = PathBuf::from(guard_user::paths::BPFFS_ROOT)
            .join(format!("gd-xflt-{}", std::process::id()));
        std::fs::create_dir_all(&pin_dir)
            .with_context(|| format!("create {}", pin_dir.display()))?;
        let setup = XdpFilterSetup { pin_dir, ns };
        setup.xdp_filter(&[
            "load",
            "-m",
            "native",
            "-p",
            "allow",
            "-f",
            XF_FEATURES,
            XF_IFACE,
        ])?;
        setup.xdp_filter(&["ip", &blocked.to_string(), "-m", "src"])?;
        let id = setup.attached_id()?;
        let info = aya::programs::loaded_programs()
            .filter_map(Result::ok)
            .find(|p| p.id() == id)
            .with_context(|| format!("xdp-filter's program #{id} is not loaded"))?;
        let name = format!(
            "xdp-filter ({}, -f {XF_FEATURES})",
            info.name_as_str().unwrap_or("?")
        );
        let prog = guard_user::testrun::foreign_xdp(info, &name)
            .with_context(|| format!("open xdp-filter's program #{id}"))?;
        Ok(Self {
            prog,
            name,
            _setup: setup,
        })
    }

    pub(super) fn program(&self) -> &LoadedProgram {
        &self.prog
    }
}

impl XdpFilterSetup {
    fn xdp_filter(&self, args: &[&str]) -> Result<String> {
        let mut cmd = self.ns.command("xdp-filter");
        cmd.env("LIBXDP_BPFFS", &self.pin_dir).args(args);
        run_checked(&mut cmd).with_context(|| format!("xdp-filter {}", args.join(" ")))
    }

    /// The id of the XDP program on the veth (xdp-filter's own, or libxdp's dispatcher in
    /// front of it: either way what a frame runs through).
    fn attached_id(&self) -> Result<u32> {
        let out = self.ns.ip(&["-j", "link", "show", "dev", XF_IFACE])?;
        let v: serde_json::Value = serde_json::from_str(&out).context("ip's JSON")?;
        let xdp = &v[0]["xdp"];
        xdp["prog"]["id"]
            .as_u64()
            .or_else(|| xdp["attached"][0]["prog"]["id"].as_u64())
            .and_then(|id| u32::try_from(id).ok())
            .with_context(|| format!("no XDP program on {XF_IFACE}: {out}"))
    }
}

impl Drop for XdpFilterSetup {
    fn drop(&mut self) {
        if let Err(e) = self.xdp_filter(&["unload", XF_IFACE]) {
            eprintln!("warning: {e:#}");
        }
        if let Err(e) = std::fs::remove_dir_all(&self.pin_dir) {
            eprintln!("warning: cannot remove {}: {e}", self.pin_dir.display());
        }
    }
}
