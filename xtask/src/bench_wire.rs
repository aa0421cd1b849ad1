//! The bench's "NIC": a four-instruction XDP program on the switch's attacker port that
//! redirects every frame from the attacker straight into the server's veth, where it arrives
//! as a raw frame (`xdp_frame`), the way a NIC's DMA hands frames to its driver.
//!
//! Without it, frames cross the bridge as socket buffers built on the attacker's core, and
//! the server's veth receives those: native XDP then has to free a socket buffer for every
//! frame it drops, a cost a NIC driver never pays (it recycles the page), while the filters
//! after XDP get their socket buffer built for free. With it, the server's core does what a
//! NIC driver's poll does: run XDP on the raw frame and, for frames that pass (or when no
//! XDP program is attached), build the socket buffer the stack needs.
//!
//! The program is loaded and linked with the bpf(2) syscall directly: it is four
//! instructions, bench-only, and has no business in guard's own object file. Closing the
//! link detaches it; closing the program then unloads it.

use std::ffi::CString;
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};

use anyhow::{Context as _, Result};
use guard_tests::netns::Netns;

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_PROG_TYPE_XDP: u32 = 6;
const BPF_XDP: u32 = 37;
const XDP_FLAGS_DRV_MODE: u32 = 1 << 2;
const BPF_FUNC_REDIRECT: i32 = 23;

/// One eBPF instruction (`struct bpf_insn`).
#[repr(C)]
#[derive(Clone, Copy)]
struct Insn {
    code: u8,
    /// dst_reg in the low nibble, src_reg in the high one.
    regs: u8,
    off: i16,
    imm: i32,
}

impl Insn {
    const fn mov64_imm(dst: u8, imm: i32) -> Self {
        Self {
            code: 0xb7,
            regs: dst,
            off: 0,
            imm,
        }
    }
    const fn call(helper: i32) -> Self {
        Self {
            code: 0x85,
            regs: 0,
            off: 0,
            imm: helper,
        }
    }
    const fn exit() -> Self {
        Self {
            code: 0x95,
            regs: 0,
            off: 0,
            imm: 0,
        }
    }
}

/// `return bpf_redirect(ifindex, 0);`
fn redirect_program(ifindex: u32) -> [Insn; 4] {
    [
        Insn::mov64_imm(1, ifindex as i32),
        Insn::mov64_imm(2, 0),
        Insn::call(BPF_FUNC_REDIRECT),
        Insn::exit(),
    ]
}

/// The leading fields of `union bpf_attr` for BPF_PROG_LOAD; the kernel takes the size it is
/// given and treats the rest as zero.
#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
}

/// The leading fields of `union bpf_attr` for BPF_LINK_CREATE.
#[repr(C)]
#[derive(Default)]
struct LinkCreateAttr {
    prog_fd: u32,
    target_ifindex: u32,
    attach_type: u32,
    flags: u32,
}

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> std::io::Result<OwnedFd> {
    // SAFETY: `attr` is a live, fully initialised #[repr(C)] prefix of `union bpf_attr`, and
    // its size is passed along, so the kernel reads no further than it.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T,
            std::mem::size_of::<T>() as libc::c_uint,
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: on success both commands return a new file descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(rc as i32) })
}

/// The redirect attached to `from` (a port of the `switch` namespace), sending everything it
/// receives out of `to` (another port there). Dropping it detaches and unloads the program.
///
/// A raw frame carries no checksum state: the sender's veth must compute checksums itself
/// ([`disable_checksum_offload`]), or its own TCP's segments arrive with the partial checksum
/// veth offload leaves in them, and are dropped as corrupt.
pub struct Wire {
    _link: OwnedFd,
    _prog: OwnedFd,
}

impl Wire {
    pub fn attach(switch: &Netns, from: &str, to: &str) -> Result<Self> {
        let (from_index, to_index) =
            switch.run_in(|| -> Result<(u32, u32)> { Ok((ifindex(from)?, ifindex(to)?)) })??;
        let insns = redirect_program(to_index);
        let license = CString::new("GPL").expect("no NUL");
        let mut name = [0u8; 16];
        name[..7].copy_from_slice(b"gd_wire");
        let mut load = ProgLoadAttr {
            prog_type: BPF_PROG_TYPE_XDP,
            insn_cnt: insns.len() as u32,
            insns: insns.as_ptr() as u64,
            license: license.as_ptr() as u64,
            prog_name: name,
            ..Default::default()
        };
        let prog = bpf(BPF_PROG_LOAD, &mut load)
            .context("the kernel refused the bench's redirect program")?;
        // The kernel looks the interface up in the caller's namespace.
        let prog_fd = prog.as_raw_fd() as u32;
        let link = switch
            .run_in(|| {
                bpf(
                    BPF_LINK_CREATE,
                    &mut LinkCreateAttr {
                        prog_fd,
                        target_ifindex: from_index,
                        attach_type: BPF_XDP,
                        flags: XDP_FLAGS_DRV_MODE,
                    },
                )
            })?
            .with_context(|| format!("cannot attach the redirect to the switch's {from}"))?;
        Ok(Self {
            _link: link,
            _prog: prog,
        })
    }
}

/// Makes the veth `ifname` in `ns` put complete checksums into what it sends.
pub fn disable_checksum_offload(ns: &Netns, ifname: &str) -> Result<()> {
    ns.exec(&["ethtool", "-K", ifname, "tx", "off"])
        .with_context(|| format!("cannot turn checksum offload off on {ifname}"))?;
    Ok(())
}

fn ifindex(name: &str) -> Result<u32> {
    guard_user::datapath::nix_if_index(name)
        .with_context(|| format!("no interface {name} in this namespace"))
}

#[cfg(test)]
mod tests {
    use std::net::{SocketAddr, TcpListener, TcpStream};
    use std::time::Duration;

    use guard_tests::lab::{Lab, ATTACKER_PORT, ROLE_IF, SERVER_V4};

    use super::*;

    /// Whether the attacker can open a TCP connection to the server.
    fn attacker_reaches_server(lab: &Lab) -> Result<bool> {
        let listener = lab.server.run_in(|| TcpListener::bind((SERVER_V4, 0)))??;
        let to: SocketAddr = listener.local_addr()?;
        Ok(lab
            .attacker
            .run_in(|| TcpStream::connect_timeout(&to, Duration::from_secs(2)))?
            .is_ok())
    }

    /// The bridge refuses to forward anything the attacker sends: then only the redirect can
    /// carry the attacker's frames to the server (and the server's replies still take the
    /// bridge back).
    #[test]
    fn the_redirect_carries_the_attackers_frames_past_the_bridge() {
        if !guard_tests::require_root("the_redirect_carries_the_attackers_frames_past_the_bridge") {
            return;
        }
        let lab = Lab::new().unwrap();
        // The server's veth takes redirected frames only with NAPI on, as the bench has it.
        lab.thread_server_napi().unwrap();
        let rules = format!(
            "table bridge gdwire {{ chain from_attacker {{ type filter hook forward priority 0; \
             iifname \"{ATTACKER_PORT}\" drop; }}; }}"
        );
        lab.switch.exec(&["nft", &rules]).unwrap();
        assert!(
            !attacker_reaches_server(&lab).unwrap(),
            "the bridge still forwards the attacker's frames: the test proves nothing"
        );
        disable_checksum_offload(&lab.attacker, ROLE_IF).unwrap();
        let wire = Wire::attach(&lab.switch, ATTACKER_PORT, "p-srv").unwrap();
        assert!(attacker_reaches_server(&lab).unwrap());
        drop(wire);
        assert!(
            !attacker_reaches_server(&lab).unwrap(),
            "dropping the wire must detach it"
        );
    }

    #[test]
    fn encodes_the_redirect() {
        let p = redirect_program(7);
        let bytes: Vec<[u8; 8]> = p
            .iter()
            .map(|i| {
                let mut b = [0u8; 8];
                b[0] = i.code;
                b[1] = i.regs;
                b[2..4].copy_from_slice(&i.off.to_le_bytes());
                b[4..].copy_from_slice(&i.imm.to_le_bytes());
                b
            })
            .collect();
        // r1 = 7; r2 = 0; call bpf_redirect; exit — as `llvm-objdump` prints them.
        assert_eq!(bytes[0], [0xb7, 0x01, 0, 0, 7, 0, 0, 0]);
        assert_eq!(bytes[1], [0xb7, 0x02, 0, 0, 0, 0, 0, 0]);
        assert_eq!(bytes[2], [0x85, 0x00, 0, 0, 23, 0, 0, 0]);
        assert_eq!(bytes[3], [0x95, 0x00, 0, 0, 0, 0, 0, 0]);
        assert_eq!(std::mem::size_of::<Insn>(), 8);
    }
}
