//! The operator's commands behind `guard`: clap types in `args`, printing in
//! `output`, a module for each command with logic of its own (the one-request
//! commands are dispatched straight from main.rs). What every command shares,
//! talking to the agent and parsing a prefix, is here.

mod args;
mod config;
mod explain;
mod history;
mod output;
mod status;
mod tune;

use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{bail, Result};
use guard_common::{
    addr::Prefix,
    client::Connection,
    proto::{Request, Response},
};

pub(crate) use args::{Cmd, ConfigAction, Output, SocketArg};
pub(crate) use config::config_check;
pub(crate) use explain::explain_cmd;
pub(crate) use history::history;
pub(crate) use output::print_response;
pub(crate) use status::{status, unload};
pub(crate) use tune::tune_cmd;

pub(crate) fn prefix(text: &str) -> Result<Prefix> {
    text.parse::<Prefix>().map_err(|e| anyhow::anyhow!("{e}"))
}

pub(crate) async fn call(socket: &SocketArg, req: Request) -> Result<Response> {
    let mut conn = Connection::connect(&socket.control_socket, "guard-cli")
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let resp = conn.call(req).await.map_err(|e| anyhow::anyhow!("{e}"))?;
    if let Response::Error { code, message } = &resp {
        bail!("the agent refused: {message} ({})", code.name());
    }
    Ok(resp)
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}
