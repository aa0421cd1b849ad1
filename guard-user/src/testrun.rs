//! Runs a loaded XDP or tc program on a frame we craft, through aya's
//! [`TestRun`] (`BPF_PROG_TEST_RUN`), and returns its verdict, so tests and
//! the datapath benchmark drive the real program in the kernel without a
//! network.

use aya::programs::{
    Program, ProgramError, ProgramInfo, ProgramType, TestRun, TestRunOptions, TestRunResult, Xdp,
};
use aya_obj::programs::XdpAttachType;

/// What one test run of a program returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunOutcome {
    /// The program's return value (an XDP action or a TC action).
    pub retval: u32,
    /// Mean run time per repetition in ns, as the kernel measured it.
    pub duration_ns: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum TestRunError {
    #[error("BPF_PROG_TEST_RUN refused a {len}-byte frame: frames shorter than an Ethernet header (14 bytes) or longer than a page cannot be test-run")]
    FrameSize { len: usize },
    #[error("only XDP and tc programs run on frames here, not a {0:?} program")]
    NotPacketProgram(ProgramType),
    #[error("BPF_PROG_TEST_RUN failed: {0}")]
    Run(#[source] ProgramError),
}

/// Room for the program to grow the frame (a cookie SYN-ACK can be longer
/// than the SYN it answers).
const GROWTH_ROOM: usize = 256;

/// The frame sizes the kernel test-runs: from a whole Ethernet header up
/// to about a page, less the head and tail room it keeps around the frame.
const RUNNABLE_FRAME_LEN: std::ops::RangeInclusive<usize> = 14..=3500;

/// Runs `program` once per `repeat` on a copy of `frame`.
pub fn test_run(program: &Program, frame: &[u8], repeat: u32) -> Result<RunOutcome, TestRunError> {
    test_run_frame(program, frame, repeat).map(|(run, _)| run)
}

/// Like [`test_run`], and also returns the frame as the program left it
/// (a SYN it answered comes back as its SYN-ACK).
pub fn test_run_frame(
    program: &Program,
    frame: &[u8],
    repeat: u32,
) -> Result<(RunOutcome, Vec<u8>), TestRunError> {
    let mut out = vec![0u8; frame.len() + GROWTH_ROOM];
    let opts = TestRunOptions {
        data_in: Some(frame),
        data_out: Some(&mut out),
        repeat,
        ..TestRunOptions::new()
    };
    let result: TestRunResult = match program {
        Program::Xdp(xdp) => xdp.test_run(opts),
        Program::SchedClassifier(tc) => tc.test_run(opts),
        other => return Err(TestRunError::NotPacketProgram(other.prog_type())),
    }
    .map_err(|e| frame_size_error(e, frame.len()))?;
    out.truncate(result.data_size_out as usize);
    let run = RunOutcome {
        retval: result.return_value,
        // The kernel reports a u32 of ns; aya only widened it.
        duration_ns: u32::try_from(result.duration.as_nanos()).unwrap_or(u32::MAX),
    };
    Ok((run, out))
}

/// The kernel answers a frame it cannot run with a bare EINVAL; name the
/// frame size when that is the likely cause.
fn frame_size_error(err: ProgramError, len: usize) -> TestRunError {
    let einval = matches!(
        &err,
        ProgramError::SyscallError(e) if e.io_error.raw_os_error() == Some(libc::EINVAL)
    );
    if einval && !RUNNABLE_FRAME_LEN.contains(&len) {
        TestRunError::FrameSize { len }
    } else {
        TestRunError::Run(err)
    }
}

/// An XDP program some other tool loaded (found by its id among the loaded
/// programs), as a program [`test_run`] can drive.
pub fn foreign_xdp(info: ProgramInfo, name: &str) -> Result<Program, TestRunError> {
    Xdp::from_program_info(info, name.to_owned().into(), XdpAttachType::Interface)
        .map(Program::Xdp)
        .map_err(TestRunError::Run)
}

pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;
pub const TC_ACT_OK: u32 = 0;
pub const TC_ACT_SHOT: u32 = 2;
pub const TC_ACT_REDIRECT: u32 = 7;
