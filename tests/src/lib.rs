//! guard's lab toolkit: network namespaces, the lab topology, guarded child processes, attack
//! tool wrappers and measurements, shared by the privileged end-to-end tests
//! (`tests/tests/*.rs`) and by `cargo xtask demo`/`bench`.
//!
//! Everything here keeps to the lab's rules: traffic only to loopback or lab addresses
//! (198.18.0.0/15, 2001:2::/48) inside namespaces this process created, every flood bounded in
//! count and time, and cleanup by RAII guards so a failing test leaves nothing behind.
//!
//! Errors are `anyhow` with context: every caller is a test or a developer command that
//! prints them, and the context (which command, which namespace) is what a reader needs.
//!
//! What lives where:
//! - one of each thing every set-up needs: [`launch`] (the `guard run` command line and its
//!   environment), [`pins`] (a pin folder unloaded on drop), [`cgroup`], [`binaries`] (building
//!   and finding the agent, lab-client and the demo app), [`process`] (guarded children),
//!   [`netns`];
//! - the set-ups, each a topology around those: [`agent`] (one agent in a namespace, for the
//!   agent's tests), [`stack`] (the demo: app, agent, legit load, attacks; the e2e tests drive
//!   it too), [`rig`] (the bench's server and the baselines), [`twons`] (two namespaces and a
//!   Python server), [`fleet`] (three hosts and a NATS cluster), [`lab`] (the shared topology);
//! - traffic and what it measures: [`tools`] (hping3, trafgen, slowhttptest), [`paced_syn`],
//!   [`packet_socket`], [`measure`], [`report`] (lab-client's reports), [`ws_bulk`], and
//!   [`wire`] (the pure pieces lab-client shares: address rules, URLs, pacing, HTTP/SSE);
//! - crafted packets: [`frames`], [`testdp`] (`BPF_PROG_TEST_RUN` on the real program),
//!   [`raw_xdp`], the evasion corpus [`evasion`] and the kernel-rules decoder [`reference`];
//! - what operators install, run as they run it: [`deploy`] (the .deb under a booted systemd,
//!   the image in a pod; `cargo xtask test`'s deploy stage).

pub mod agent;
pub mod binaries;
pub mod cgroup;
pub mod deploy;
pub mod evasion;
pub mod fleet;
pub mod frames;
pub mod lab;
pub mod launch;
pub mod measure;
pub mod netns;
pub mod paced_syn;
pub mod packet_socket;
pub mod pins;
pub mod process;
pub mod raw_xdp;
pub mod reference;
pub mod report;
pub mod rig;
pub mod stack;
pub mod testdp;
pub mod tools;
pub mod twons;
pub mod wire;
pub mod ws_bulk;

pub use lab::Lab;
pub use measure::{syn_loss_probe, syn_loss_probe_with, ClientRun, CpuSampler, LabClient};
pub use netns::Netns;
pub use process::{is_root, require_root, ChildGuard, Finished};
pub use report::ProbeResult;
pub use tools::{
    hping3_syn_flood, slowhttptest, trafgen_random_sources, Flood, FloodReport, SynFlood,
};
