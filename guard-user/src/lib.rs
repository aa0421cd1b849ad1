//! guard's agent as a library: the binary `guard` is a thin CLI over it, and
//! the privileged tests and `cargo xtask` drive the same code.

pub mod adaptive;
pub mod agent;
pub mod audit;
pub mod control;
pub mod cookies;
pub mod datapath;
pub mod docs;
pub mod duration;
pub mod explain;
pub mod fleet;
pub mod kfunc;
pub mod logging;
pub mod metrics;
pub mod notify;
pub mod paths;
pub mod pod_cgroup;
pub mod settings;
pub mod testrun;
pub mod tune;
