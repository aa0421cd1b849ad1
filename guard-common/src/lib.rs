//! guard's shared crate.
//!
//! The core (no features) is `no_std` and holds the ABI that the XDP/tc
//! program and the agent share through BPF maps, plus the pure functions both
//! sides call: the token bucket, prefix masking, IPv4-mapped normalisation and
//! expiry checks. Features add the std sides:
//!
//! * `user`: `aya::Pod` impls for the map types (the agent).
//! * `proto`: the control-socket protocol codec (no aya).
//! * `client`: the async control-socket client (reconnects, never blocks).
//! * `warp`: admission control and WebSocket/SSE guards for warp apps.
//!
//! Only the core is `no_std`: with `std` (which every other feature turns
//! on) the crate is an ordinary std crate, so the std modules need no
//! imports of their own for `Vec`, `String` or `format!`. The eBPF build
//! (no features) is what keeps the core free of std.
#![cfg_attr(not(any(feature = "std", test)), no_std)]
#![deny(unsafe_op_in_unsafe_fn)]

pub mod addr;
pub mod bucket;
pub mod config;
pub mod event;
pub mod maps;
pub mod state;
pub mod stats;
pub mod syncookie;

#[cfg(feature = "std")]
pub mod config_kv;

#[cfg(feature = "proto")]
pub mod proto;

#[cfg(feature = "client")]
pub mod client;

#[cfg(all(feature = "client", any(test, feature = "test-support")))]
pub mod test_support;

#[cfg(feature = "warp")]
pub mod app;

#[cfg(feature = "user")]
mod pod;

pub use addr::Addr;
pub use bucket::TokenBucket;
pub use config::LiveConfig;
pub use event::OverCapEvent;
pub use state::{BlockEntry, SourceState};
