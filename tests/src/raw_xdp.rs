//! Tiny XDP programs for the lab's own plumbing, loaded and linked with the bpf(2) syscall
//! directly: a few instructions each, lab-only, with no business in guard's object file.
//! Closing the link detaches one; closing the program then unloads it.
//!
//! * [`redirect_program`]: the bench's "NIC" (`rig::wire`): every frame a switch
//!   port receives goes straight into another port, arriving as a raw frame.
//! * [`pass_program`]: gives a veth NAPI, which it needs to receive frames its peer's XDP
//!   program sends back (`XDP_TX`, SYN cookies); since Linux 6.12 GRO no longer does.
//! * [`spoof_sink_program`]: the same, and frames toward the spoofed range die at once, as
//!   replies to forged sources do on the internet: far from the server, costing it nothing.

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
const XDP_DROP: i32 = 1;
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
    const fn new(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Self {
        Self {
            code,
            regs: (src << 4) | dst,
            off,
            imm,
        }
    }
    const fn mov64_imm(dst: u8, imm: i32) -> Self {
        Self::new(0xb7, dst, 0, 0, imm)
    }
    const fn call(helper: i32) -> Self {
        Self::new(0x85, 0, 0, 0, helper)
    }
    /// `dst = *(u32 *)(src + off)`
    const fn load32(dst: u8, src: u8, off: i16) -> Self {
        Self::new(0x61, dst, src, off, 0)
    }
    /// `dst = *(u16 *)(src + off)`
    const fn load16(dst: u8, src: u8, off: i16) -> Self {
        Self::new(0x69, dst, src, off, 0)
    }
    const fn mov64_reg(dst: u8, src: u8) -> Self {
        Self::new(0xbf, dst, src, 0, 0)
    }
    const fn add64_imm(dst: u8, imm: i32) -> Self {
        Self::new(0x07, dst, 0, 0, imm)
    }
    /// `if dst > src goto +off`
    const fn jgt_reg(dst: u8, src: u8, off: i16) -> Self {
        Self::new(0x2d, dst, src, off, 0)
    }
    /// `if dst != imm goto +off`
    const fn jne_imm(dst: u8, imm: i32, off: i16) -> Self {
        Self::new(0x55, dst, 0, off, imm)
    }
    const fn exit() -> Self {
        Self::new(0x95, 0, 0, 0, 0)
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

/// Drops IPv4 frames whose destination lies in `net`/16, passes everything else:
///
/// ```text
/// if data + 34 > data_end       goto pass   (Ethernet + IPv4 header)
/// if ethertype != IPv4          goto pass
/// if daddr[0..2] != net[0..2]   goto pass
/// return XDP_DROP
/// pass: return XDP_PASS
/// ```
///
/// Loads read memory in the host's (little-endian) order, so wire bytes `a b` compare as
/// `b << 8 | a`.
pub fn spoof_sink_program(net: std::net::Ipv4Addr) -> [Insn; 13] {
    let [a, b, _, _] = net.octets();
    let wire16 = |hi: u8, lo: u8| i32::from(u16::from_le_bytes([hi, lo]));
    [
        Insn::load32(2, 1, 0), // r2 = ctx->data
        Insn::load32(3, 1, 4), // r3 = ctx->data_end
        Insn::mov64_reg(4, 2),
        Insn::add64_imm(4, 34),
        Insn::jgt_reg(4, 3, 6),
        Insn::load16(5, 2, 12),
        Insn::jne_imm(5, wire16(0x08, 0x00), 4),
        Insn::load16(5, 2, 30),
        Insn::jne_imm(5, wire16(a, b), 2),
        Insn::mov64_imm(0, XDP_DROP),
        Insn::exit(),
        Insn::mov64_imm(0, XDP_PASS),
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
        // r5 = *(u16 *)(r2 + 30); if r5 != 0x13c6 goto +2   (198.19 on the wire)
        let b = bytes(&spoof_sink_program(std::net::Ipv4Addr::new(198, 19, 0, 0)));
        assert_eq!(b[7], [0x69, 0x25, 30, 0, 0, 0, 0, 0]);
        assert_eq!(b[8], [0x55, 0x05, 2, 0, 0xc6, 0x13, 0, 0]);
        assert_eq!(b[4], [0x2d, 0x34, 6, 0, 0, 0, 0, 0]);
        // r2 = *(u32 *)(r1 + 0); r4 = r2; r4 += 34
        assert_eq!(b[0], [0x61, 0x12, 0, 0, 0, 0, 0, 0]);
        assert_eq!(b[2], [0xbf, 0x24, 0, 0, 0, 0, 0, 0]);
        assert_eq!(b[3], [0x07, 0x04, 0, 0, 34, 0, 0, 0]);
    }
}
