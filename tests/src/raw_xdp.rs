//! Tiny XDP programs for the lab's own plumbing, loaded and linked with the bpf(2) syscall
//! directly: a few instructions each, lab-only, with no business in guard's object file.
//! Closing the link detaches one; closing the program then unloads it.
//!
//! * [`redirect_program`]: the bench's "NIC" (xtask's `bench_wire`): every frame a switch
//!   port receives goes straight into another port, arriving as a raw frame.
//! * [`pass_program`]: gives a veth NAPI, which it needs to receive frames its peer's XDP
//!   program sends back (`XDP_TX`, SYN cookies); since Linux 6.12 GRO no longer does.

use std::ffi::CString;
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};

use anyhow::{Context as _, Result};

use crate::netns::Netns;

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_PROG_TYPE_XDP: u32 = 6;
const BPF_XDP: u32 = 37;
const XDP_FLAGS_DRV_MODE: u32 = 1 << 2;
const BPF_FUNC_REDIRECT: i32 = 23;
const XDP_PASS: i32 = 2;

/// One eBPF instruction (`struct bpf_insn`).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Insn {
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
pub fn redirect_program(ifindex: u32) -> [Insn; 4] {
    [
        Insn::mov64_imm(1, ifindex as i32),
        Insn::mov64_imm(2, 0),
        Insn::call(BPF_FUNC_REDIRECT),
        Insn::exit(),
    ]
}

/// `return XDP_PASS;`
pub fn pass_program() -> [Insn; 2] {
    [Insn::mov64_imm(0, XDP_PASS), Insn::exit()]
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

/// A raw program attached (native mode) to an interface of a namespace; dropping it
/// detaches and unloads it.
#[derive(Debug)]
pub struct RawXdp {
    _link: OwnedFd,
    _prog: OwnedFd,
}

impl RawXdp {
    /// Loads `insns` as XDP program `name` (at most 15 bytes) and links it to `iface` in `ns`.
    pub fn attach(ns: &Netns, iface: &str, name: &str, insns: &[Insn]) -> Result<Self> {
        let index = ns.run_in(|| ifindex(iface))??;
        let license = CString::new("GPL").expect("no NUL");
        let mut prog_name = [0u8; 16];
        let n = name.len().min(15);
        prog_name[..n].copy_from_slice(&name.as_bytes()[..n]);
        let mut load = ProgLoadAttr {
            prog_type: BPF_PROG_TYPE_XDP,
            insn_cnt: insns.len() as u32,
            insns: insns.as_ptr() as u64,
            license: license.as_ptr() as u64,
            prog_name,
            ..Default::default()
        };
        let prog = bpf(BPF_PROG_LOAD, &mut load)
            .with_context(|| format!("the kernel refused the lab's {name} program"))?;
        let prog_fd = prog.as_raw_fd() as u32;
        // The kernel looks the interface up in the caller's namespace.
        let link = ns
            .run_in(|| {
                bpf(
                    BPF_LINK_CREATE,
                    &mut LinkCreateAttr {
                        prog_fd,
                        target_ifindex: index,
                        attach_type: BPF_XDP,
                        flags: XDP_FLAGS_DRV_MODE,
                    },
                )
            })?
            .with_context(|| format!("cannot attach {name} to {iface} in {}", ns.name()))?;
        Ok(Self {
            _link: link,
            _prog: prog,
        })
    }
}

fn ifindex(name: &str) -> Result<u32> {
    guard_user::datapath::nix_if_index(name)
        .with_context(|| format!("no interface {name} in this namespace"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(p: &[Insn]) -> Vec<[u8; 8]> {
        p.iter()
            .map(|i| {
                let mut b = [0u8; 8];
                b[0] = i.code;
                b[1] = i.regs;
                b[2..4].copy_from_slice(&i.off.to_le_bytes());
                b[4..].copy_from_slice(&i.imm.to_le_bytes());
                b
            })
            .collect()
    }

    #[test]
    fn encodes_the_programs() {
        // r1 = 7; r2 = 0; call bpf_redirect; exit — as `llvm-objdump` prints them.
        let b = bytes(&redirect_program(7));
        assert_eq!(b[0], [0xb7, 0x01, 0, 0, 7, 0, 0, 0]);
        assert_eq!(b[1], [0xb7, 0x02, 0, 0, 0, 0, 0, 0]);
        assert_eq!(b[2], [0x85, 0x00, 0, 0, 23, 0, 0, 0]);
        assert_eq!(b[3], [0x95, 0x00, 0, 0, 0, 0, 0, 0]);
        // r0 = XDP_PASS; exit
        let b = bytes(&pass_program());
        assert_eq!(b[0], [0xb7, 0x00, 0, 0, 2, 0, 0, 0]);
        assert_eq!(b[1], [0x95, 0x00, 0, 0, 0, 0, 0, 0]);
        assert_eq!(std::mem::size_of::<Insn>(), 8);
    }
}
