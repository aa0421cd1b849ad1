//! The agent's side of SYN cookies: the keys (random, one per epoch,
//! rotated ahead of use) and the host facts a cookie SYN-ACK must agree
//! with — the MSS the interfaces carry, the window scale the kernel would
//! choose, and the TCP features this namespace has turned on (the kernel
//! refuses to build a cookie connection with one it has turned off).

use std::path::Path;

use guard_common::{
    syncookie::{self, CookieKey, KEY_SLOTS, OPT_SACK, OPT_TIMESTAMPS, OPT_WSCALE},
    LiveConfig,
};
use log::{info, warn};

use crate::datapath::{monotonic_ns, DatapathError, GuardMaps};

/// What the SYN-ACK must say for this host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostParams {
    pub mss_v4: u16,
    pub mss_v6: u16,
    pub wscale: u8,
    /// `syncookie::OPT_*` the namespace allows.
    pub opts: u8,
    /// `net.ipv4.tcp_syncookies` is on: without it the kernel ignores a
    /// cookie connection handed to it.
    pub kernel_accepts_cookies: bool,
}

impl Default for HostParams {
    fn default() -> Self {
        let d = LiveConfig::DEFAULT;
        Self {
            mss_v4: d.cookie_mss_v4,
            mss_v6: d.cookie_mss_v6,
            wscale: d.cookie_wscale,
            opts: d.cookie_opts,
            kernel_accepts_cookies: true,
        }
    }
}

impl HostParams {
    /// Reads them for `interfaces` in this network namespace; what cannot
    /// be read keeps its default. MTUs come from the kernel (an ioctl), not
    /// from /sys, which shows the namespace that mounted it.
    pub fn detect(interfaces: &[String]) -> Self {
        Self::from_sources(Path::new("/proc/sys"), interface_mtu, interfaces)
    }

    fn from_sources(
        proc_sys: &Path,
        mtu_of: impl Fn(&str) -> Option<u32>,
        interfaces: &[String],
    ) -> Self {
        let read = |p: &Path| std::fs::read_to_string(p).ok();
        let sysctl = |name: &str| read(&proc_sys.join(name));
        let flag = |name: &str| {
            sysctl(name)
                .and_then(|v| v.trim().parse::<u32>().ok())
                .map(|v| v != 0)
        };
        let mut p = Self::default();
        let mtu = interfaces.iter().filter_map(|i| mtu_of(i)).min();
        if let Some(mtu) = mtu {
            // The least the kernel takes for a cookie connection; a smaller
            // link MTU than that is not one guard can serve cookies on.
            p.mss_v4 = mtu.saturating_sub(40).clamp(536, u16::MAX as u32) as u16;
            p.mss_v6 = mtu.saturating_sub(60).clamp(1220, u16::MAX as u32) as u16;
        }
        let rmem_max = sysctl("net/ipv4/tcp_rmem")
            .and_then(|v| v.split_whitespace().nth(2)?.parse::<u64>().ok());
        let core_max = sysctl("net/core/rmem_max").and_then(|v| v.trim().parse::<u64>().ok());
        if let Some(space) = rmem_max.max(core_max) {
            p.wscale = wscale_for(space);
        }
        let mut opts = 0;
        for (name, bit) in [
            ("net/ipv4/tcp_sack", OPT_SACK),
            ("net/ipv4/tcp_timestamps", OPT_TIMESTAMPS),
            ("net/ipv4/tcp_window_scaling", OPT_WSCALE),
        ] {
            if flag(name).unwrap_or(true) {
                opts |= bit;
            }
        }
        p.opts = opts;
        p.kernel_accepts_cookies = flag("net/ipv4/tcp_syncookies").unwrap_or(true);
        p
    }

    /// `cfg` with this host's cookie fields.
    pub fn apply(&self, cfg: &mut LiveConfig) {
        cfg.cookie_mss_v4 = self.mss_v4;
        cfg.cookie_mss_v6 = self.mss_v6;
        cfg.cookie_wscale = self.wscale;
        cfg.cookie_opts = self.opts;
    }
}

/// An interface's MTU in this network namespace.
fn interface_mtu(name: &str) -> Option<u32> {
    // SAFETY: plain socket/ioctl/close on a zeroed ifreq we own; the name
    // is copied with its terminating NUL inside the field.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return None;
        }
        let mut req: libc::ifreq = std::mem::zeroed();
        let bytes = name.as_bytes();
        if bytes.len() >= req.ifr_name.len() {
            libc::close(fd);
            return None;
        }
        for (dst, src) in req.ifr_name.iter_mut().zip(bytes) {
            *dst = *src as libc::c_char;
        }
        let rc = libc::ioctl(fd, libc::SIOCGIFMTU, &mut req);
        libc::close(fd);
        (rc == 0).then_some(req.ifr_ifru.ifru_mtu as u32)
    }
}

/// The shift Linux gives a connection whose receive buffer may grow to
/// `space` bytes (`tcp_select_initial_window`: log2(space) - 15, 0..=14).
pub fn wscale_for(space: u64) -> u8 {
    let log2 = 63 - space.max(1).leading_zeros() as i64;
    (log2 - 15).clamp(0, syncookie::MAX_WSCALE as i64) as u8
}

/// Why cookies cannot be turned on here, as the sentence an operator needs.
pub fn unavailable_reason(kernel_supported: bool, host: &HostParams) -> Option<&'static str> {
    if !kernel_supported {
        return Some("syn_cookies needs Linux >= 6.9 with BTF (the kernel function bpf_sk_assign_tcp_reqsk hands cookie connections to the listener); keep syn_cookies = off on this kernel");
    }
    if !host.kernel_accepts_cookies {
        return Some("net.ipv4.tcp_syncookies is 0 in this network namespace, so the kernel ignores the connections guard's cookies prove: set it to 1 (sysctl -w net.ipv4.tcp_syncookies=1) or keep syn_cookies = off");
    }
    None
}

fn random_key() -> std::io::Result<CookieKey> {
    let mut bytes = [0u8; 16];
    let mut filled = 0;
    while filled < bytes.len() {
        // SAFETY: getrandom writes at most the remaining length into our
        // buffer.
        let n = unsafe {
            libc::getrandom(
                bytes[filled..].as_mut_ptr() as *mut libc::c_void,
                bytes.len() - filled,
                0,
            )
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        filled += n as usize;
    }
    let k0 = u64::from_ne_bytes(bytes[..8].try_into().expect("8 bytes"));
    let k1 = u64::from_ne_bytes(bytes[8..].try_into().expect("8 bytes"));
    let key = CookieKey { k0, k1 };
    // All zero means "no key" to the program; 2^-128 is not worth a branch
    // on the datapath, but it is worth one here.
    if key.is_set() {
        Ok(key)
    } else {
        random_key()
    }
}

/// Keeps a fresh key ready for the next epoch.
#[derive(Debug, Default)]
pub struct KeyRotation {
    /// The epoch during which the next epoch's key was last written.
    prepared_in: Option<u64>,
}

impl KeyRotation {
    /// At start: keys of the current and the previous epoch are kept when
    /// set (an earlier run's cookies may be coming back); every other slot
    /// gets a new key, and so does any slot left unset.
    pub fn start(&mut self, maps: &mut GuardMaps) -> Result<(), DatapathError> {
        let now = syncookie::epoch_of(monotonic_ns());
        let keys = maps.cookie_keys()?;
        let live = [
            syncookie::key_slot(now),
            syncookie::key_slot(now.wrapping_sub(1)),
        ];
        let mut written = 0;
        for slot in 0..KEY_SLOTS {
            if live.contains(&slot) && keys[slot as usize].is_set() {
                continue;
            }
            maps.set_cookie_key(slot, &random_key().map_err(key_err)?)?;
            written += 1;
        }
        self.prepared_in = Some(now);
        info!("SYN cookie keys ready ({written} of {KEY_SLOTS} slots new)");
        Ok(())
    }

    /// Once per epoch: a new key for the next one, in the slot whose
    /// cookies expired an epoch ago. Returns whether it wrote one.
    pub fn tick(&mut self, maps: &mut GuardMaps) -> bool {
        self.tick_at(maps, syncookie::epoch_of(monotonic_ns()))
    }

    fn tick_at(&mut self, maps: &mut GuardMaps, now: u64) -> bool {
        if self.prepared_in == Some(now) {
            return false;
        }
        let slot = syncookie::key_slot(now + 1);
        match random_key()
            .map_err(key_err)
            .and_then(|k| maps.set_cookie_key(slot, &k))
        {
            Ok(()) => {
                self.prepared_in = Some(now);
                true
            }
            Err(e) => {
                warn!("rotate the SYN cookie key: {e}");
                false
            }
        }
    }
}

fn key_err(source: std::io::Error) -> DatapathError {
    DatapathError::Io {
        action: "draw a SYN cookie key from getrandom".into(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use guard_common::test_support::TestDir;

    #[test]
    fn window_scale_follows_the_buffer_as_linux_computes_it() {
        // Linux's defaults: tcp_rmem max 6 MiB gives 7.
        assert_eq!(wscale_for(6 * 1024 * 1024), 7);
        assert_eq!(wscale_for(65535), 0);
        assert_eq!(wscale_for(131072), 2);
        assert_eq!(wscale_for(1 << 40), 14, "capped at 14");
        assert_eq!(wscale_for(0), 0);
    }

    fn mtus(name: &str) -> Option<u32> {
        match name {
            "eth0" => Some(9000),
            "eth1" => Some(1500),
            _ => None,
        }
    }

    #[test]
    fn loopback_has_an_mtu() {
        assert!(interface_mtu("lo").is_some_and(|m| m >= 1500));
        assert_eq!(interface_mtu("no-such-if0"), None);
    }

    fn fake_host(files: &[(&str, &str)]) -> TestDir {
        let dir = TestDir::new("cookies");
        for (path, content) in files {
            dir.write(path, content);
        }
        dir
    }

    #[test]
    fn host_params_come_from_the_namespaces_sysctls_and_the_smallest_mtu() {
        let dir = fake_host(&[
            ("sys/net/ipv4/tcp_rmem", "4096\t131072\t33554432\n"),
            ("sys/net/core/rmem_max", "212992\n"),
            ("sys/net/ipv4/tcp_sack", "0\n"),
            ("sys/net/ipv4/tcp_timestamps", "1\n"),
            ("sys/net/ipv4/tcp_window_scaling", "1\n"),
            ("sys/net/ipv4/tcp_syncookies", "1\n"),
        ]);
        let p = HostParams::from_sources(
            &dir.path().join("sys"),
            mtus,
            &["eth0".into(), "eth1".into()],
        );
        assert_eq!((p.mss_v4, p.mss_v6), (1460, 1440));
        assert_eq!(p.wscale, 10, "32 MiB");
        assert_eq!(p.opts, OPT_TIMESTAMPS | OPT_WSCALE);
        assert!(p.kernel_accepts_cookies);
        assert_eq!(unavailable_reason(true, &p), None);
        assert!(unavailable_reason(false, &p).unwrap().contains("6.9"));

        let dir = fake_host(&[("sys/net/ipv4/tcp_syncookies", "0\n")]);
        let p = HostParams::from_sources(&dir.path().join("sys"), mtus, &[]);
        assert!(!p.kernel_accepts_cookies);
        assert!(unavailable_reason(true, &p)
            .unwrap()
            .contains("tcp_syncookies"));
        assert_eq!(p.mss_v4, 1460, "unreadable: defaults");
        assert_eq!(p.opts, syncookie::OPT_ALL);
    }

    #[test]
    fn keys_are_random_and_set() {
        let a = random_key().unwrap();
        let b = random_key().unwrap();
        assert!(a.is_set() && b.is_set());
        assert_ne!(a, b);
    }
}
