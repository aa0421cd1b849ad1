//! `guard tune`: several live changes, a suggestion from observed traffic, or
//! the current state, in one command.

use std::collections::BTreeMap;

use anyhow::Result;
use guard_common::{
    proto::{BlockRequest, Request, Response},
    state::reason,
};
use guard_user::{datapath, paths::PinLayout, tune};

use super::{
    args::{Output, TuneArgs},
    call,
    history::history,
    output::{emit, print_response},
    prefix,
};

pub(crate) async fn tune_cmd(a: TuneArgs, out: Output) -> Result<()> {
    let TuneArgs {
        change,
        block,
        unblock,
        allow,
        suggest,
        observe,
        history: show_history,
        since,
        prefix: p,
        socket,
        pins,
    } = a;
    if show_history {
        return history(&socket, since, p.as_deref(), 500, out).await;
    }
    let mut acted = false;
    let changes = change.changes()?;
    if !changes.is_empty() {
        print_response(&call(&socket, Request::SetConfig { changes }).await?, out)?;
        acted = true;
    }
    for p in &block {
        let req = Request::Block(BlockRequest {
            prefix: prefix(p)?,
            ttl_secs: 0,
            reason: reason::OPERATOR,
            detected_at_unix_ns: 0,
            detail: "guard tune --block".into(),
        });
        print_response(&call(&socket, req).await?, out)?;
        acted = true;
    }
    for p in &unblock {
        print_response(
            &call(&socket, Request::Unblock { prefix: prefix(p)? }).await?,
            out,
        )?;
        acted = true;
    }
    for p in &allow {
        print_response(
            &call(&socket, Request::Allow { prefix: prefix(p)? }).await?,
            out,
        )?;
        acted = true;
    }
    if suggest {
        let layout = PinLayout::new(&pins.pin_dir);
        let maps = datapath::GuardMaps::open_pinned(&layout)?;
        eprintln!(
            "observing per-source SYN rates for {}s ...",
            observe.as_secs()
        );
        let text = tokio::task::spawn_blocking(move || tune::observe_and_suggest(&maps, observe))
            .await??;
        print!("{text}");
        acted = true;
    }
    if !acted {
        let config = call(&socket, Request::GetConfig).await?;
        let stats = call(&socket, Request::Stats).await?;
        match (out, &config, &stats) {
            // One document, as every other command prints.
            (Output::Json, Response::Config { entries }, Response::Stats { counters }) => {
                let config: BTreeMap<&str, &str> = entries
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_str()))
                    .collect();
                let counters: BTreeMap<&str, u64> =
                    counters.iter().map(|(k, v)| (k.as_str(), *v)).collect();
                emit(&serde_json::json!({ "config": config, "counters": counters }))?;
            }
            _ => {
                println!("live config:");
                print_response(&config, out)?;
                println!("counters:");
                print_response(&stats, out)?;
            }
        }
    }
    Ok(())
}
