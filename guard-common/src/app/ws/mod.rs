//! A WebSocket under guard: inbound limits, validation, idle timeout and a
//! bounded outbound queue, all driven from the one task that owns the
//! socket (no extra task or channel hop per message).
//!
//! [`WsUpgrade`] (in `upgrade`) finishes an admitted upgrade into a
//! [`GuardedWebSocket`]; every method of the socket, and the stream that
//! drives it, is in `guarded`. The pieces it is built from: the violation
//! window and byte charging in `inbound`, the bounded queue toward the
//! client in `outbound`, and in `socket` the connection underneath, warp's
//! or one guard upgraded itself with sized buffers and frames metered by
//! `frames`.

mod frames;
mod guarded;
mod inbound;
mod outbound;
mod socket;
#[cfg(test)]
pub(crate) mod tests;
mod upgrade;

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;

use hyper::upgrade::OnUpgrade;
use warp::filters::ws::{Message, Ws};

pub use guarded::GuardedWebSocket;
pub use outbound::{SendError, WsSender};
pub use upgrade::WsUpgrade;

/// Close codes (RFC 6455, 7.4.1).
const CLOSE_NORMAL: u16 = 1000;
const CLOSE_PROTOCOL: u16 = 1002;
const CLOSE_INVALID_PAYLOAD: u16 = 1007;
const CLOSE_POLICY: u16 = 1008;
const CLOSE_TOO_BIG: u16 = 1009;

/// Why the app's check refused a message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Invalid(pub Cow<'static, str>);

impl fmt::Display for Invalid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<&'static str> for Invalid {
    fn from(s: &'static str) -> Self {
        Self(Cow::Borrowed(s))
    }
}

impl From<String> for Invalid {
    fn from(s: String) -> Self {
        Self(Cow::Owned(s))
    }
}

type Validator = Arc<dyn Fn(&Message) -> Result<(), Invalid> + Send + Sync>;

/// How the upgrade is finished.
pub(crate) enum Handshake {
    /// By warp (the app is served by `warp::serve`).
    Warp(Ws),
    /// By guard, on the connection guard's server handed over: the
    /// request's `Sec-WebSocket-Key` (already checked by warp's `ws()`
    /// filter) answers with the accept key.
    Sized { upgrade: OnUpgrade, key: String },
}
