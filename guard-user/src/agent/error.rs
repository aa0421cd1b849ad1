//! Why the agent did not do what it was asked: the domain's errors. Whoever asked maps
//! them to its own terms (the control handler to wire replies, the fleet to drop reasons).

use guard_common::addr::Prefix;

use super::rules::{Owner, Refusal};
use crate::datapath::DatapathError;

#[derive(Debug, thiserror::Error)]
pub(super) enum AgentError {
    /// A rule every block meets refused it.
    #[error("{}", .refusal.message(.prefix, .owner))]
    Refused {
        prefix: Prefix,
        owner: Owner,
        refusal: Refusal,
    },
    #[error("{0} is not blocked")]
    NotBlocked(Prefix),
    #[error("{0} is not allow-listed")]
    NotAllowed(Prefix),
    #[error("{0} is loopback or a trusted proxy and stays allowed")]
    StaysAllowed(Prefix),
    /// A live config change the config's own rules, or this host, refuse.
    #[error("{0}")]
    InvalidConfig(String),
    /// The change was fine, the kernel write failed; nothing changed.
    #[error(
        "writing the live config to the kernel failed ({0}); the running config is unchanged, \
         retry"
    )]
    ConfigWrite(String),
    #[error("kernel map update failed: {0}")]
    BlockWrite(DatapathError),
    #[error("{0}")]
    Kernel(#[from] DatapathError),
}
