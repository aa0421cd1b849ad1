//! A small safe wrapper over `BPF_PROG_TEST_RUN`, which aya 0.14 does not
//! expose: it runs a loaded program on a frame we craft and returns its
//! verdict, so tests and the datapath benchmark drive the real program in
//! the kernel without a network.

use std::os::fd::{AsRawFd, BorrowedFd};

const BPF_PROG_TEST_RUN: libc::c_long = 10;

/// The `test` member of `union bpf_attr` (include/uapi/linux/bpf.h).
#[repr(C)]
#[derive(Default)]
struct TestRunAttr {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
    flags: u32,
    cpu: u32,
    batch_size: u32,
    _pad: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TestRun {
    /// The program's return value (an XDP action or a TC action).
    pub retval: u32,
    /// Mean run time per repetition in ns, as the kernel measured it.
    pub duration_ns: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum TestRunError {
    #[error("BPF_PROG_TEST_RUN refused a {len}-byte frame: frames shorter than an Ethernet header (14 bytes) or longer than a page cannot be test-run")]
    FrameSize { len: usize },
    #[error("BPF_PROG_TEST_RUN failed: {0}")]
    Syscall(#[source] std::io::Error),
}

/// Runs `prog` once per `repeat` on a copy of `frame`.
pub fn test_run(prog: BorrowedFd<'_>, frame: &[u8], repeat: u32) -> Result<TestRun, TestRunError> {
    test_run_frame(prog, frame, repeat).map(|(run, _)| run)
}

/// Like [`test_run`], and also returns the frame as the program left it
/// (a SYN it answered comes back as its SYN-ACK).
pub fn test_run_frame(
    prog: BorrowedFd<'_>,
    frame: &[u8],
    repeat: u32,
) -> Result<(TestRun, Vec<u8>), TestRunError> {
    // Room for the program to grow the frame (a cookie SYN-ACK can be
    // longer than the SYN it answers).
    let mut out = vec![0u8; frame.len() + 256];
    let mut attr = TestRunAttr {
        prog_fd: prog.as_raw_fd() as u32,
        data_size_in: frame.len() as u32,
        data_size_out: out.len() as u32,
        data_in: frame.as_ptr() as u64,
        data_out: out.as_mut_ptr() as u64,
        repeat,
        ..Default::default()
    };
    // SAFETY: attr is a valid, fully initialised bpf_attr prefix whose
    // pointers reference live buffers of the stated sizes for the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_TEST_RUN,
            &mut attr as *mut TestRunAttr,
            std::mem::size_of::<TestRunAttr>() as u32,
        )
    };
    if rc < 0 {
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EINVAL) && !(14..=3500).contains(&frame.len()) {
            return Err(TestRunError::FrameSize { len: frame.len() });
        }
        return Err(TestRunError::Syscall(err));
    }
    out.truncate(attr.data_size_out as usize);
    Ok((
        TestRun {
            retval: attr.retval,
            duration_ns: attr.duration,
        },
        out,
    ))
}

pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;
pub const TC_ACT_OK: u32 = 0;
pub const TC_ACT_SHOT: u32 = 2;
pub const TC_ACT_REDIRECT: u32 = 7;
