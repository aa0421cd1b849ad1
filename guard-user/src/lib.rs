//! guard's agent as a library: the binary `guard` is a thin CLI over it, and
//! the privileged tests and `cargo xtask` drive the same code.

pub mod datapath;
pub mod paths;
pub mod testrun;
pub mod control;
