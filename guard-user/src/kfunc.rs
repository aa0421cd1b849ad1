//! Resolves the program's kfunc call before it is loaded.
//!
//! aya 0.14 relocates helper and BPF-to-BPF calls but not calls to kernel
//! functions, so the cookie check's call to `bpf_sk_assign_tcp_reqsk` is
//! compiled as a kfunc `call` with a placeholder immediate
//! ([`KFUNC_ASSIGN_REQSK_INSN`]); here it gets that function's BTF id in the
//! running kernel. A kernel without the kfunc (before 6.9) gets
//! `r0 = -EOPNOTSUPP` in its place instead: the program still loads, every
//! cookie reply then counts as refused, and the agent turns cookies away
//! with a sentence saying why.

use aya::Btf;
use aya_obj::btf::BtfKind;
use guard_common::syncookie::KFUNC_ASSIGN_REQSK_INSN;

const KFUNC: &str = "bpf_sk_assign_tcp_reqsk";
/// `r0 = -95` (BPF_ALU64 | BPF_MOV | BPF_K), the errno of "not supported".
const MOV_R0_EOPNOTSUPP: [u8; 8] = [0xb7, 0x00, 0x00, 0x00, 0xa1, 0xff, 0xff, 0xff];

/// The object with its kfunc calls resolved, 8-byte aligned as the ELF
/// parser wants it.
pub struct Resolved {
    words: Vec<u64>,
    len: usize,
    /// Whether the kernel has `bpf_sk_assign_tcp_reqsk` (SYN cookies work).
    pub assign_reqsk: bool,
}

impl Resolved {
    pub fn bytes(&self) -> &[u8] {
        // SAFETY: `words` holds at least `len` initialised bytes.
        unsafe { std::slice::from_raw_parts(self.words.as_ptr() as *const u8, self.len) }
    }
}

/// The kfunc's BTF id in `btf` (the running kernel's, normally).
pub fn assign_reqsk_id(btf: &Btf) -> Option<u32> {
    btf.id_by_type_name_kind(KFUNC, BtfKind::Func).ok()
}

/// Patches every placeholder call in `object`: with `id` when the kernel
/// has the kfunc, with the "not supported" fallback when it does not.
pub fn resolve(object: &[u8], id: Option<u32>) -> Resolved {
    let mut bytes = object.to_vec();
    let replacement = match id {
        Some(id) => {
            let mut insn = KFUNC_ASSIGN_REQSK_INSN;
            insn[4..].copy_from_slice(&id.to_le_bytes());
            insn
        }
        None => MOV_R0_EOPNOTSUPP,
    };
    let mut at = 0;
    while let Some(pos) = find(&bytes[at..], &KFUNC_ASSIGN_REQSK_INSN) {
        let start = at + pos;
        // Instructions are 8-byte aligned within their section, and
        // sections are aligned in the file: an unaligned match is data.
        if start % 8 == 0 {
            bytes[start..start + 8].copy_from_slice(&replacement);
        }
        at = start + 1;
    }
    let len = bytes.len();
    let mut words = vec![0u64; len.div_ceil(8)];
    // SAFETY: `words` has room for `len` bytes.
    unsafe {
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), words.as_mut_ptr() as *mut u8, len);
    }
    Resolved {
        words,
        len,
        assign_reqsk: id.is_some(),
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_aligned_placeholder_is_replaced_and_nothing_else() {
        let mut object = vec![0u8; 64];
        object[8..16].copy_from_slice(&KFUNC_ASSIGN_REQSK_INSN);
        object[40..48].copy_from_slice(&KFUNC_ASSIGN_REQSK_INSN);
        // The same bytes off the instruction grid are data, not a call.
        object[19..27].copy_from_slice(&KFUNC_ASSIGN_REQSK_INSN);
        let r = resolve(&object, Some(0x1234_5678));
        assert!(r.assign_reqsk);
        let b = r.bytes();
        assert_eq!(b.len(), 64);
        assert_eq!(&b[8..16], &[0x85, 0x20, 0, 0, 0x78, 0x56, 0x34, 0x12]);
        assert_eq!(&b[40..48], &[0x85, 0x20, 0, 0, 0x78, 0x56, 0x34, 0x12]);
        assert_eq!(&b[19..27], &KFUNC_ASSIGN_REQSK_INSN);
        assert_eq!(b.as_ptr() as usize % 8, 0);

        let r = resolve(&object, None);
        assert!(!r.assign_reqsk);
        assert_eq!(&r.bytes()[8..16], &MOV_R0_EOPNOTSUPP);
    }

    #[test]
    fn this_kernel_names_the_kfunc_when_it_has_btf() {
        // Linux >= 6.9 with BTF (these machines run 6.18); skipped where the
        // kernel has no BTF to read.
        if let Ok(btf) = Btf::from_sys_fs() {
            assert!(
                assign_reqsk_id(&btf).is_some(),
                "{KFUNC} missing from vmlinux BTF"
            );
        }
    }
}
