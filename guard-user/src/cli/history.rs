//! `guard history` (and `guard tune --history`): the agent's audit trail.

use std::time::Duration;

use anyhow::Result;
use guard_common::proto::Request;

use super::{
    args::{Output, SocketArg},
    call,
    output::print_response,
    prefix, unix_now,
};

pub(crate) async fn history(
    socket: &SocketArg,
    since: Duration,
    p: Option<&str>,
    limit: u32,
    out: Output,
) -> Result<()> {
    let since_unix_secs = unix_now().saturating_sub(since.as_secs());
    let prefix = p.map(prefix).transpose()?;
    let req = Request::History {
        since_unix_secs,
        prefix,
        limit,
    };
    print_response(&call(socket, req).await?, out)
}
