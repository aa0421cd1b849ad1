//! The image built from the shipped Dockerfile, running the shipped k8s sidecar manifest in
//! a pod with `podman kube play` (the closest thing to a kubelet that installs here).
//!
//! podman runs the manifest as written except where it cannot ([`podman_variant`] derives
//! what it runs from the shipped file and says why for each change): podman has no native
//! sidecars (an initContainer with `restartPolicy: Always` is run to completion, so guard
//! would have to exit before the app starts), no registry here (images are local), one pod is
//! enough (`replicas`), and the node's bpffs is a folder of the stage's own so its pins go
//! with it (podman runs no preStop hook, which is what unloads them on a cluster).
//!
//! The pod sits on a podman network created inside 198.18.0.0/15 ([`POD_SUBNET`]); client
//! namespaces join its bridge with a veth each. Pods, containers, images and the network
//! carry [`PREFIX`] and this process's PID and are removed on drop; [`sweep_leftovers`]
//! removes those of runs that died without dropping.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, ensure, Context as _, Result};

use super::{cached_rootfs, BpffsScratch, Dist, Rootfs, PREFIX};
use crate::netns::Netns;
use crate::process::{describe, run_checked};
use crate::tools::TempDir;

/// The pod network: a lab range, never podman's default 10.88.0.0/16.
pub const POD_SUBNET: &str = "198.18.96.0/24";
/// The bridge's own address on it (podman takes the first).
pub const POD_GATEWAY: &str = "198.18.96.1";
/// Client namespaces get addresses from here up (podman hands out from .2 on).
pub const CLIENT_V4_BASE: u8 = 200;

/// The guard container's seccomp profile, in the folder given as `--seccomp-profile-root`.
pub const SECCOMP_PROFILE: &str = "guard.json";
/// podman's own default profile, which [`guard_seccomp_profile`] extends.
pub const PODMAN_DEFAULT_SECCOMP: &str = "/usr/share/containers/seccomp.json";

/// The shipped manifest's names this derivation relies on.
const DEPLOYMENT_NAME: &str = "chat";
const GUARD_IMAGE: &str = "registry.example.com/guard:";
const APP_IMAGE: &str = "registry.example.com/chat:1.0.0";
const INIT_IMAGE: &str = "busybox:1.36";

/// What the podman variant changes besides the native sidecar.
#[derive(Debug, Clone)]
pub struct Variant {
    /// The Deployment's (and so the pod's) name.
    pub name: String,
    /// Local image for the guard sidecar.
    pub guard_image: String,
    /// Local image for the app.
    pub app_image: String,
    /// Local image for the `chmod` init container (any image with coreutils).
    pub init_image: String,
    /// Host folder standing in for the node's `/sys/fs/bpf`.
    pub bpffs: PathBuf,
}

/// The manifest podman runs, derived from the shipped one. Every change is checked to apply
/// exactly once, so an edit of the shipped file that breaks an assumption fails here with
/// what to update instead of running something else.
pub fn podman_variant(manifest: &str, v: &Variant) -> Result<String> {
    let mut out = move_native_sidecar(manifest)?;
    out = replace_once(
        &out,
        &format!("kind: Deployment\nmetadata:\n  name: {DEPLOYMENT_NAME}\n"),
        &format!("kind: Deployment\nmetadata:\n  name: {}\n", v.name),
    )?;
    out = replace_once(&out, "\n  replicas: 2\n", "\n  replicas: 1\n")?;
    out = replace_prefixed_once(&out, &format!("image: {GUARD_IMAGE}"), &v.guard_image)?;
    out = replace_once(
        &out,
        &format!("image: {APP_IMAGE}\n"),
        &format!("image: {}\n", v.app_image),
    )?;
    out = replace_once(
        &out,
        &format!("image: {INIT_IMAGE}\n"),
        &format!("image: {}\n", v.init_image),
    )?;
    // The init container as podman's "always" type: podman 4.3 removes a finished "once"
    // init container and, when runc still reports it running, gives up on the whole pod
    // (eight plays in a row here, on a quiet machine). "always" keeps the finished
    // container instead; it runs the same, once, before the others.
    out = replace_once(
        &out,
        "      annotations:\n",
        &format!(
            "      annotations:\n        \
             container.seccomp.security.alpha.kubernetes.io/guard: localhost/{SECCOMP_PROFILE}\n        \
             io.podman.annotations.init.container.type: always\n"
        ),
    )?;
    out = replace_once(
        &out,
        "          hostPath:\n            path: /sys/fs/bpf\n",
        &format!(
            "          hostPath:\n            path: {}\n",
            v.bpffs.display()
        ),
    )?;
    Ok(out)
}

/// The runtime's default seccomp profile, plus `bpf` for a container holding CAP_BPF and
/// `perf_event_open` for one holding CAP_PERFMON: what recent containerd and CRI-O allow by
/// default, and what the manifest's header tells operators to give guard where the runtime's
/// default refuses them. podman 4.3's (Debian 12) allows both only with CAP_SYS_ADMIN, so
/// `RuntimeDefault` fails guard's first `bpf()` with EPERM despite its capabilities.
pub fn guard_seccomp_profile(default: &str) -> Result<String> {
    use serde_json::{json, Value};
    const OPENED: [(&str, &str); 2] = [("bpf", "CAP_BPF"), ("perf_event_open", "CAP_PERFMON")];
    let mut profile: Value =
        serde_json::from_str(default).context("the default seccomp profile is not JSON")?;
    let rules = profile
        .get_mut("syscalls")
        .and_then(Value::as_array_mut)
        .context("the default seccomp profile has no `syscalls` list")?;
    // Refusing rules for them would win over the allowing ones added below.
    for rule in rules.iter_mut() {
        if rule.get("action").and_then(Value::as_str) == Some("SCMP_ACT_ALLOW") {
            continue;
        }
        if let Some(names) = rule.get_mut("names").and_then(Value::as_array_mut) {
            names.retain(|n| !OPENED.iter().any(|(call, _)| n.as_str() == Some(call)));
        }
    }
    rules.retain(|r| {
        r.get("names")
            .and_then(Value::as_array)
            .is_none_or(|n| !n.is_empty())
    });
    for (call, cap) in OPENED {
        rules.push(json!({
            "names": [call],
            "action": "SCMP_ACT_ALLOW",
            "args": [],
            "includes": { "caps": [cap] },
            "excludes": {}
        }));
    }
    serde_json::to_string_pretty(&profile).context("encode the seccomp profile")
}

/// The guard initContainer with `restartPolicy: Always` (a native sidecar) becomes the first
/// of `containers:`, without that field: podman starts it with the app instead of waiting
/// for it to exit. On a cluster it starts, and passes its startup probe, before the app.
fn move_native_sidecar(manifest: &str) -> Result<String> {
    const ITEM: &str = "        - name: guard\n";
    const CONTAINERS: &str = "      containers:\n";
    let start = manifest
        .find(ITEM)
        .context("the manifest has no `- name: guard` container")?;
    let end = manifest[start..]
        .find(CONTAINERS)
        .map(|i| start + i)
        .context("the guard container is not an initContainer before `containers:`")?;
    let block = &manifest[start..end];
    let kept: Vec<&str> = block
        .lines()
        .filter(|l| {
            let t = l.trim();
            t != "restartPolicy: Always" && !t.starts_with("# Native sidecar")
        })
        .collect();
    ensure!(
        kept.len() + 2 == block.lines().count(),
        "the guard initContainer is no longer a commented native sidecar \
         (`restartPolicy: Always`): update podman_variant"
    );
    let mut moved = kept.join("\n");
    moved.push('\n');
    let mut out = String::with_capacity(manifest.len());
    out.push_str(&manifest[..start]);
    out.push_str(CONTAINERS);
    out.push_str(&moved);
    out.push_str(&manifest[end + CONTAINERS.len()..]);
    Ok(out)
}

fn replace_once(text: &str, from: &str, to: &str) -> Result<String> {
    let n = text.matches(from).count();
    ensure!(n == 1, "the manifest has {n} of {from:?} (expected one)");
    Ok(text.replacen(from, to, 1))
}

/// Replaces the rest of the one line starting with `prefix` (after its indentation).
fn replace_prefixed_once(text: &str, prefix: &str, image: &str) -> Result<String> {
    let lines: Vec<usize> = text
        .lines()
        .enumerate()
        .filter(|(_, l)| l.trim_start().starts_with(prefix))
        .map(|(i, _)| i)
        .collect();
    ensure!(
        lines.len() == 1,
        "the manifest has {} lines starting with {prefix:?} (expected one)",
        lines.len()
    );
    let out: Vec<String> = text
        .lines()
        .enumerate()
        .map(|(i, l)| {
            if i == lines[0] {
                let indent = &l[..l.len() - l.trim_start().len()];
                format!("{indent}image: {image}")
            } else {
                l.to_string()
            }
        })
        .collect();
    Ok(out.join("\n") + "\n")
}

/// `podman` with the configuration this machine needs: no default ulimits (root here lacks
/// CAP_SYS_RESOURCE to apply them) and runc (crun refuses the hybrid cgroup layout).
pub struct Podman {
    conf: TempDir,
}

impl Podman {
    pub fn new() -> Result<Self> {
        let conf = TempDir::new("deploy-podman")?;
        std::fs::write(
            conf.path().join("containers.conf"),
            "[containers]\ndefault_ulimits = []\n\n[engine]\nruntime = \"runc\"\n",
        )
        .context("write containers.conf")?;
        Ok(Self { conf })
    }

    pub fn command(&self) -> Command {
        let mut cmd = Command::new("podman");
        cmd.env("CONTAINERS_CONF", self.conf.path().join("containers.conf"));
        cmd
    }

    /// `podman args...`; its stdout, or an error with its stderr.
    pub fn run(&self, args: &[&str]) -> Result<String> {
        run_checked(self.command().args(args))
    }

    /// `podman exec CONTAINER argv...`: exit code and stdout+stderr, whatever the code.
    pub fn exec(&self, container: &str, argv: &[&str]) -> Result<(i32, String)> {
        let mut cmd = self.command();
        cmd.args(["exec", container]).args(argv);
        let out = cmd
            .output()
            .with_context(|| format!("run {}", describe(&cmd)))?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok((out.status.code().unwrap_or(-1), text))
    }

    /// Names of `what` (`pod`, `network`, `image`) whose name starts with `prefix`.
    fn names(&self, what: &str, prefix: &str) -> Result<Vec<String>> {
        let format = match what {
            "image" => "{{.Repository}}:{{.Tag}}",
            _ => "{{.Name}}",
        };
        let listed = self.run(&[what, "ls", "--format", format])?;
        Ok(listed
            .lines()
            .map(str::trim)
            .filter(|n| n.starts_with(prefix) || n.starts_with(&format!("localhost/{prefix}")))
            .map(String::from)
            .collect())
    }
}

/// The pid a name of this stage carries (`gd-deploy-<pid>...`), if any.
fn owner_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix("localhost/").unwrap_or(name);
    let rest = rest.strip_prefix(PREFIX)?.strip_prefix('-')?;
    rest.split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

/// Removes pods, images and networks of earlier runs whose process is gone.
pub fn sweep_leftovers(podman: &Podman) -> Result<Vec<String>> {
    let mut removed = Vec::new();
    let dead = |n: &str| owner_pid(n).is_some_and(|p| !Path::new(&format!("/proc/{p}")).exists());
    for (what, rm) in [
        ("pod", &["pod", "rm", "-f"][..]),
        ("image", &["rmi", "-f"][..]),
        ("network", &["network", "rm", "-f"][..]),
    ] {
        for name in podman.names(what, PREFIX)? {
            if dead(&name) {
                let mut args = rm.to_vec();
                args.push(&name);
                podman.run(&args)?;
                removed.push(name);
            }
        }
    }
    Ok(removed)
}

/// The images a pod run builds: the base (the mmdebstrap root filesystem imported, standing
/// in for `debian:bookworm-slim`), guard's from the shipped Dockerfile, and the app's.
pub struct Images {
    pub base: String,
    pub guard: String,
    pub app: String,
}

impl Images {
    /// Builds all three. `demo` is the demo app binary, which the app image runs as
    /// `registry.example.com/chat` would run the operator's app.
    pub fn build(podman: &Podman, name: &str, dist: &Dist, demo: &Path) -> Result<Self> {
        let images = Self {
            base: format!("localhost/{name}/debian:bookworm-slim"),
            guard: format!("localhost/{name}/guard:{}", dist.version),
            app: format!("localhost/{name}/chat:1.0.0"),
        };
        let tar = cached_rootfs(Rootfs::Minbase)?;
        // A registry's Debian image sets PATH; an imported root filesystem has no config
        // at all, and the manifest's probes and commands (`guard status`, `chmod`) need it.
        podman.run(&[
            "import",
            "--change",
            "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            &tar.to_string_lossy(),
            &images.base,
        ])?;
        // The shipped Dockerfile, unedited, with the dist folder as its context; `--from`
        // replaces its public base (no registry here) with the same release made locally.
        podman
            .run(&[
                "build",
                "--from",
                &images.base,
                "-f",
                &dist.dockerfile.to_string_lossy(),
                "--build-arg",
                &format!("VERSION={}", dist.version),
                "--build-arg",
                &format!("ARCH={}", std::env::consts::ARCH),
                "-t",
                &images.guard,
                &dist.dir.to_string_lossy(),
            ])
            .context("build the guard image from the shipped Dockerfile")?;
        let ctx = TempDir::new("deploy-app")?;
        std::fs::copy(demo, ctx.path().join("chat")).context("copy the demo app")?;
        std::fs::write(
            ctx.path().join("Containerfile"),
            format!(
                "FROM {}\nCOPY chat /usr/bin/chat\nUSER 10001:10001\n\
                 ENTRYPOINT [\"/usr/bin/chat\", \"--listen\", \"0.0.0.0:8080\", \
                 \"--agent-socket\", \"/run/guard/control.sock\"]\n",
                images.base
            ),
        )?;
        podman
            .run(&["build", "-t", &images.app, &ctx.path().to_string_lossy()])
            .context("build the app image")?;
        Ok(images)
    }
}

/// The pod, its network and images; everything removed on drop.
pub struct PodRun {
    pub podman: Podman,
    pub name: String,
    pub network: String,
    pub bridge: String,
    manifest: TempDir,
    images: Option<Images>,
    pub bpffs: BpffsScratch,
    played: bool,
}

impl PodRun {
    /// Creates the network and builds the images; [`PodRun::play`] starts the pod.
    pub fn prepare(dist: &Dist, demo: &Path) -> Result<Self> {
        let podman = Podman::new()?;
        for gone in sweep_leftovers(&podman)? {
            eprintln!("deploy: removed {gone}, a leftover of an earlier run");
        }
        let name = format!("{PREFIX}-{}", std::process::id());
        let network = name.clone();
        podman
            .run(&[
                "network",
                "create",
                "--subnet",
                POD_SUBNET,
                "--gateway",
                POD_GATEWAY,
                &network,
            ])
            .with_context(|| format!("create the pod network {network} on {POD_SUBNET}"))?;
        let mut run = Self {
            podman,
            name: name.clone(),
            network,
            bridge: String::new(),
            manifest: TempDir::new("deploy-kube")?,
            images: None,
            bpffs: BpffsScratch::new("pod")?,
            played: false,
        };
        run.bridge = run
            .podman
            .run(&[
                "network",
                "inspect",
                &run.network,
                "--format",
                "{{.NetworkInterface}}",
            ])?
            .trim()
            .to_string();
        ensure!(!run.bridge.is_empty(), "the pod network has no bridge");
        run.images = Some(Images::build(&run.podman, &name, dist, demo)?);
        Ok(run)
    }

    fn manifest_path(&self) -> PathBuf {
        self.manifest.path().join("k8s-sidecar.podman.yaml")
    }

    /// Derives the podman variant of `shipped` and plays it on the pod network.
    pub fn play(&mut self, shipped: &str) -> Result<String> {
        let images = self.images.as_ref().context("images not built")?;
        let variant = podman_variant(
            shipped,
            &Variant {
                name: self.name.clone(),
                guard_image: images.guard.clone(),
                app_image: images.app.clone(),
                init_image: images.base.clone(),
                bpffs: self.bpffs.path().to_path_buf(),
            },
        )?;
        std::fs::write(self.manifest_path(), variant).context("write the podman manifest")?;
        let default = std::fs::read_to_string(PODMAN_DEFAULT_SECCOMP)
            .with_context(|| format!("read podman's default profile {PODMAN_DEFAULT_SECCOMP}"))?;
        std::fs::write(
            self.manifest.path().join(SECCOMP_PROFILE),
            guard_seccomp_profile(&default)?,
        )
        .context("write the seccomp profile")?;
        self.played = true;
        let manifest = self.manifest_path();
        let profiles = self.manifest.path().to_string_lossy().into_owned();
        let play = || {
            self.podman.run(&[
                "kube",
                "play",
                "--seccomp-profile-root",
                &profiles,
                "--network",
                &self.network,
                &manifest.to_string_lossy(),
            ])
        };
        // The variant's init container is of the "always" type, which podman does not remove
        // (see `podman_variant`); should the race it avoids show up anyway, start over, up to
        // eight times.
        let mut tries = 0;
        loop {
            tries += 1;
            match play() {
                Err(e) if tries < 8 && format!("{e:#}").contains("init container") => {
                    eprintln!("deploy: podman kube play hit its init-container race, again: {e:#}");
                    self.remove_pod();
                }
                other => return other,
            }
        }
    }

    fn remove_pod(&self) {
        let manifest = self.manifest_path();
        if let Err(e) = self
            .podman
            .run(&["kube", "down", &manifest.to_string_lossy()])
        {
            eprintln!("warning: deploy cleanup, kube down: {e:#}");
        }
        // Whatever kube down left (a pod it did not create fully).
        if self.podman.run(&["pod", "exists", &self.pod()]).is_ok() {
            if let Err(e) = self.podman.run(&["pod", "rm", "-f", &self.pod()]) {
                eprintln!("warning: deploy cleanup, pod rm: {e:#}");
            }
        }
    }

    /// The pod's name as podman gives it (`<deployment>-pod-0`).
    pub fn pod(&self) -> String {
        format!("{}-pod-0", self.name)
    }

    /// A container of the pod by its manifest name.
    pub fn container(&self, name: &str) -> String {
        format!("{}-{name}", self.pod())
    }

    /// The pod's address on the pod network.
    pub fn pod_ip(&self) -> Result<String> {
        let infra = self.podman.run(&[
            "pod",
            "inspect",
            &self.pod(),
            "--format",
            "{{.InfraContainerID}}",
        ])?;
        let ip = self.podman.run(&[
            "inspect",
            infra.trim(),
            "--format",
            "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
        ])?;
        let ip = ip.trim().to_string();
        ensure!(!ip.is_empty(), "the pod has no address on {}", self.network);
        Ok(ip)
    }

    /// Plugs `ns` into the pod network's bridge with `eth0` at `.{host}` of [`POD_SUBNET`].
    pub fn plug(&self, ns: &Netns, host: u8) -> Result<String> {
        let base = POD_SUBNET.split('/').next().context("subnet")?;
        let mut octets: Vec<&str> = base.split('.').collect();
        let last = host.to_string();
        octets[3] = &last;
        let addr = octets.join(".");
        // Host-side names are limited to 15 bytes: the PID keeps them unique.
        let peer = format!("gdp{}-{host}", std::process::id());
        ensure!(peer.len() <= 15, "interface name {peer} too long");
        run_checked(Command::new("ip").args([
            "link",
            "add",
            &peer,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            ns.name(),
        ]))?;
        run_checked(Command::new("ip").args(["link", "set", &peer, "master", &self.bridge, "up"]))?;
        ns.ip(&["addr", "add", &format!("{addr}/24"), "dev", "eth0"])?;
        ns.ip(&["link", "set", "eth0", "up"])?;
        Ok(addr)
    }
}

impl Drop for PodRun {
    fn drop(&mut self) {
        let warn = |what: &str, r: Result<String>| {
            if let Err(e) = r {
                eprintln!("warning: deploy cleanup, {what}: {e:#}");
            }
        };
        if self.played {
            self.remove_pod();
        }
        if let Some(images) = self.images.take() {
            for image in [images.app, images.guard, images.base] {
                warn("rmi", self.podman.run(&["rmi", "-f", &image]));
            }
        }
        warn(
            "network rm",
            self.podman.run(&["network", "rm", "-f", &self.network]),
        );
    }
}

/// Fails with the command when podman is missing (setup installs it).
pub fn require_podman() -> Result<()> {
    let ok = Command::new("podman")
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !ok {
        bail!("podman is not installed: run `cargo xtask setup`");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shipped() -> String {
        std::fs::read_to_string(
            crate::binaries::workspace_root().join("guard-user/deploy/k8s-sidecar.yaml"),
        )
        .unwrap()
    }

    fn variant() -> Variant {
        Variant {
            name: "gd-deploy-1".into(),
            guard_image: "localhost/gd-deploy-1/guard:0.1.0".into(),
            app_image: "localhost/gd-deploy-1/chat:1.0.0".into(),
            init_image: "localhost/gd-deploy-1/debian:bookworm-slim".into(),
            bpffs: PathBuf::from("/sys/fs/bpf/gd-deploy-pod-1"),
        }
    }

    #[test]
    fn the_podman_variant_runs_guard_beside_the_app() {
        let out = podman_variant(&shipped(), &variant()).unwrap();
        let (init, containers) = out.split_once("      containers:\n").unwrap();
        let init = &init[init.find("initContainers:").unwrap()..];
        assert!(!init.contains("- name: guard\n"), "{init}");
        assert!(init.contains("- name: guard-run-dir\n"));
        let guard = containers.find("        - name: guard\n").unwrap();
        let app = containers.find("        - name: app\n").unwrap();
        assert!(guard < app, "guard must come first");
        assert!(!out.lines().any(|l| l.trim() == "restartPolicy: Always"));
        // Everything else of the sidecar is kept: capabilities, probes, mounts.
        for kept in [
            "add: [\"BPF\", \"NET_ADMIN\", \"PERFMON\"]",
            "command: [\"guard\", \"unload\"]",
            "value: /host/sys/fs/cgroup",
            "supplementalGroups: [9940]",
        ] {
            assert!(out.contains(kept), "lost {kept}");
        }
        assert!(out.contains("image: localhost/gd-deploy-1/guard:0.1.0\n"));
        assert!(out.contains("image: localhost/gd-deploy-1/chat:1.0.0\n"));
        assert!(out.contains("path: /sys/fs/bpf/gd-deploy-pod-1\n"));
        assert!(out.contains(
            "container.seccomp.security.alpha.kubernetes.io/guard: localhost/guard.json\n"
        ));
        assert!(out.contains("io.podman.annotations.init.container.type: always\n"));
        assert!(out.contains("  name: gd-deploy-1\n") && out.contains("  replicas: 1\n"));
        assert!(!out.contains("registry.example.com") && !out.contains("busybox"));
    }

    #[test]
    fn a_manifest_without_the_native_sidecar_is_refused() {
        let edited = shipped().replace("          restartPolicy: Always\n", "");
        let err = podman_variant(&edited, &variant()).unwrap_err();
        assert!(format!("{err:#}").contains("native sidecar"), "{err:#}");
    }

    #[test]
    fn the_seccomp_profile_opens_bpf_for_cap_bpf_only() {
        let default = r#"{"defaultAction": "SCMP_ACT_ERRNO", "syscalls": [
            {"names": ["read", "write"], "action": "SCMP_ACT_ALLOW"},
            {"names": ["bpf", "perf_event_open", "quotactl"], "action": "SCMP_ACT_ALLOW",
             "includes": {"caps": ["CAP_SYS_ADMIN"]}},
            {"names": ["bpf", "perf_event_open"], "action": "SCMP_ACT_ERRNO",
             "excludes": {"caps": ["CAP_SYS_ADMIN"]}}
        ]}"#;
        let out: serde_json::Value =
            serde_json::from_str(&guard_seccomp_profile(default).unwrap()).unwrap();
        let rules = out["syscalls"].as_array().unwrap();
        // The refusing rule is gone (it only named these two), the rest is as it was.
        assert!(
            rules.iter().all(|r| r["action"] == "SCMP_ACT_ALLOW"),
            "{out}"
        );
        assert_eq!(rules[1]["names"].as_array().unwrap().len(), 3);
        let opened = |call: &str, cap: &str| {
            rules.iter().any(|r| {
                r["names"] == serde_json::json!([call])
                    && r["includes"]["caps"] == serde_json::json!([cap])
            })
        };
        assert!(opened("bpf", "CAP_BPF") && opened("perf_event_open", "CAP_PERFMON"));
        assert!(guard_seccomp_profile("{}").is_err());
    }

    #[test]
    fn owner_pids_come_from_names() {
        assert_eq!(owner_pid("gd-deploy-42-pod-0"), Some(42));
        assert_eq!(owner_pid("localhost/gd-deploy-7/guard:0.1.0"), Some(7));
        assert_eq!(owner_pid("gd-deployx-7"), None);
        assert_eq!(owner_pid("chat-pod-0"), None);
    }
}
