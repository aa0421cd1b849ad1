//! `guard explain ADDR`: the verdict read from the pins, completed with what
//! only the agent knows (who made a block, escalation strikes).

use std::net::IpAddr;

use anyhow::{bail, Result};
use guard_common::{
    addr::Prefix,
    proto::{Request, Response},
};
use guard_user::{
    datapath,
    explain::{self, BlockMeta},
    paths::PinLayout,
};

use super::{
    args::{Output, PinArg, SocketArg},
    call,
    output::emit,
    unix_now,
};

/// Who made the block on `prefix` and when, from the agent's audit log.
/// Most blocks are hours old, so the recent past is asked first: the agent
/// then opens only the files written since (a full read can mean months of
/// rotated, compressed logs). Only a block extended for longer than that
/// needs the whole log.
async fn block_meta(socket: &SocketArg, prefix: Prefix) -> Result<Option<BlockMeta>> {
    let now = unix_now();
    for since in [
        now.saturating_sub(2 * 86_400),
        now.saturating_sub(30 * 86_400),
        0,
    ] {
        let req = Request::History {
            since_unix_secs: since,
            prefix: Some(prefix),
            limit: guard_common::proto::MAX_LIST_ENTRIES,
        };
        match call(socket, req).await? {
            Response::History { lines } => {
                if let Some(meta) = BlockMeta::from_audit(&lines, &prefix) {
                    return Ok(Some(meta));
                }
            }
            other => bail!("the agent answered `{}` to a history request", other.name()),
        }
    }
    Ok(None)
}

pub(crate) async fn explain_cmd(
    addr: IpAddr,
    pins: &PinArg,
    socket: &SocketArg,
    out: Output,
) -> Result<()> {
    let layout = PinLayout::new(&pins.pin_dir);
    if !layout.map(guard_common::maps::CONFIG).exists() {
        bail!(
            "guard is not loaded (no pins under {}): nothing judges {addr}",
            layout.dir().display()
        );
    }
    let maps = datapath::GuardMaps::open_pinned(&layout)?;
    let mut e = explain::explain(&maps, addr)?;
    if let Some(hit) = &e.blocked_by {
        match block_meta(socket, hit.prefix).await {
            Ok(Some(meta)) => e.set_block_meta(meta),
            Ok(None) => e
                .notes
                .push("the audit log has no record of this block".into()),
            Err(err) => e.notes.push(format!(
                "who made the block is unknown: the agent could not be asked ({err:#})"
            )),
        }
    }
    let (source_key, aggregate_key) = e.keys;
    for key in std::iter::once(source_key).chain(aggregate_key) {
        match call(socket, Request::Escalation { prefix: key }).await {
            Ok(Response::Escalation {
                tracked,
                strikes,
                streak_secs,
            }) => e.escalation.push(explain::EscalationState {
                prefix: key,
                tracked,
                strikes,
                streak_secs,
            }),
            Ok(other) => {
                e.notes.push(format!(
                    "the agent answered `{}` to an escalation request",
                    other.name()
                ));
                break;
            }
            Err(err) => {
                e.notes
                    .push(format!("escalation strikes are unknown ({err:#})"));
                break;
            }
        }
    }
    if out == Output::Json {
        return emit(&e);
    }
    print!("{}", explain::render_text(&e));
    Ok(())
}
