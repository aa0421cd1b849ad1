//! The async client of the agent's control socket.
//!
//! Two ways in:
//!
//! * [`AgentClient`] for the app's hot path: [`AgentClient::report`] never
//!   waits. Reports go into a bounded queue that a background task drains
//!   into the agent, reconnecting with backoff when the agent is absent or
//!   restarting. Blocking is best effort by design: the app must keep
//!   serving whether or not the agent is there.
//! * [`Connection`] for request/response tools (the `guard` CLI, `cargo
//!   xtask tune`): one call at a time, each with a timeout, errors that say
//!   what to do.
//!
//! The reporter's handle and queue are in `reporter`, the task that drains
//! it in `task` (pacing its reconnects with `backoff`); the task talks to
//! the agent through the same [`Connection`] the tools use (`connection`),
//! so both share one [`ClientError`].

mod backoff;
mod connection;
mod reporter;
mod task;

#[cfg(test)]
mod tests;

pub use connection::{ClientError, Connection};
pub use reporter::{AgentClient, BlockReport, ClientConfig, ClientStats, ReportError};
