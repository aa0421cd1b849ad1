//! A guarded warp app: a WebSocket chat (`/ws`), an SSE feed (`/events`:
//! a tick every 500 ms plus the chat), a page using both (`/`), and the
//! app's metrics (`/metrics`), served by guard's own server (or, with
//! `--server warp`, by plain `warp::serve` for comparison).
//!
//! ```text
//! cargo run -p guard-common --example demo --features warp -- \
//!     --listen 198.18.0.1:8080 --agent-socket /run/guard/control.sock
//! ```

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use futures_util::StreamExt;
use guard_common::addr::Prefix;
use guard_common::app::{
    self, Guard, GuardedWebSocket, Http2Limits, ServerLimits, SseSender, SseSubscription, WsSender,
    WsUpgrade,
};
use guard_common::client::{AgentClient, ClientConfig};
use prometheus::{Registry, TextEncoder};
use warp::http::header::CONTENT_TYPE;
use warp::sse::Event;
use warp::ws::Message;
use warp::{Filter, Reply as _};

const PAGE: &str = include_str!("demo.html");
/// Longest chat line accepted; longer ones are invalid messages.
const MAX_CHAT_LEN: usize = 1000;

#[derive(Parser, Debug)]
#[command(about = "guard's demo app: a guarded WebSocket chat and SSE feed")]
struct Args {
    /// Address to serve on.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// The agent's control socket; without it nothing is reported.
    #[arg(long)]
    agent_socket: Option<PathBuf>,
    /// A proxy whose X-Forwarded-For is believed (repeatable).
    #[arg(long = "trusted-proxy", value_name = "PREFIX")]
    trusted_proxies: Vec<Prefix>,
    /// A prefix that is never reported (repeatable).
    #[arg(long = "allow", value_name = "PREFIX")]
    allowlist: Vec<Prefix>,
    /// Listen backlog: connections the kernel queues before accept.
    #[arg(long, default_value_t = 1024)]
    backlog: u32,
    /// Which server runs the app: guard's own (deadlines, waiting budget,
    /// descriptor reserve), or plain `warp::serve` to compare against.
    #[arg(long, value_enum, default_value_t = ServerKind::Guard)]
    server: ServerKind,
    /// Seconds a new connection has to send a complete request head.
    #[arg(long, value_name = "SECS")]
    head_timeout: Option<u64>,
    /// Connections waiting for a request (not yet admitted), all sources.
    #[arg(long)]
    max_waiting: Option<usize>,
    /// Serve HTTP/2 (h2c prior knowledge) too, with guard's bounds.
    #[arg(long)]
    http2: bool,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum ServerKind {
    Guard,
    Warp,
}

/// Everyone connected: chat members and feed subscribers.
#[derive(Clone, Default)]
struct Hub {
    chat: Arc<Mutex<Vec<WsSender>>>,
    feed: Arc<Mutex<Vec<SseSender>>>,
}

impl Hub {
    fn say(&self, line: &str) {
        let msg = Message::text(line);
        // Senders whose connection is gone (or too slow) leave the hub.
        lock(&self.chat).retain(|tx| tx.send(msg.clone()).is_ok());
        self.publish("chat", line);
    }

    fn publish(&self, kind: &str, data: &str) {
        // warp's `Event` is built per subscriber: it is not `Clone`.
        lock(&self.feed).retain(|tx| tx.send(Event::default().event(kind).data(data)).is_ok());
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

async fn chat(mut ws: GuardedWebSocket, hub: Hub) {
    let who = ws.peer().ip();
    lock(&hub.chat).push(ws.sender());
    while let Some(msg) = ws.next().await {
        // Validation let only short text through.
        if let Ok(text) = msg.to_str() {
            hub.say(&format!("{who}: {text}"));
        }
    }
    log::debug!("{who} left the chat ({:?})", ws.close_reason());
}

fn listener(addr: SocketAddr, backlog: u32) -> anyhow::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()
    } else {
        tokio::net::TcpSocket::new_v6()
    }
    .context("creating the listening socket")?;
    socket.set_reuseaddr(true)?;
    socket.bind(addr).with_context(|| {
        format!("binding {addr} (is the address configured on this host, and the port free?)")
    })?;
    socket.listen(backlog).context("listen")
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let args = Args::parse();

    let registry = Registry::new();
    let defaults = ServerLimits::default();
    let server_limits = ServerLimits {
        head_timeout: args
            .head_timeout
            .map_or(defaults.head_timeout, Duration::from_secs),
        max_waiting: args.max_waiting.unwrap_or(defaults.max_waiting),
        http2: args.http2.then(Http2Limits::default),
        ..defaults
    };
    let mut builder = Guard::builder()
        .registry(&registry)
        .server_limits(server_limits)
        .trusted_proxies(args.trusted_proxies.iter().copied())
        .allowlist(args.allowlist.iter().copied());
    if let Some(path) = &args.agent_socket {
        builder = builder.agent(AgentClient::spawn(ClientConfig::new(path, "guard-demo")));
    } else {
        log::warn!("no --agent-socket: abusive sources are closed but not reported");
    }
    let guard = builder.build().context("building the guard")?;

    let hub = Hub::default();
    let ticker = hub.clone();
    tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_millis(500));
        for n in 0u64.. {
            every.tick().await;
            ticker.publish("tick", &n.to_string());
        }
    });

    let with_hub = {
        let hub = hub.clone();
        warp::any().map(move || hub.clone())
    };
    let ws = warp::path("ws")
        .and(warp::path::end())
        .and(guard.websocket())
        .and(with_hub.clone())
        .map(|up: WsUpgrade, hub: Hub| {
            up.validate(|m| match m.to_str() {
                Ok(t) if t.len() <= MAX_CHAT_LEN => Ok(()),
                Ok(_) => Err("chat line too long".into()),
                Err(()) => Err("chat lines are text".into()),
            })
            .on_upgrade(move |ws| chat(ws, hub))
        });
    let events = warp::path("events")
        .and(warp::path::end())
        .and(guard.sse())
        .and(with_hub)
        .map(|sub: SseSubscription, hub: Hub| {
            let (tx, reply) = sub.channel();
            lock(&hub.feed).push(tx);
            reply
        });
    let metrics =
        warp::path("metrics").and(warp::path::end()).map(move || {
            match TextEncoder::new().encode_to_string(&registry.gather()) {
                Ok(text) => {
                    warp::reply::with_header(text, CONTENT_TYPE, "text/plain; version=0.0.4")
                        .into_response()
                }
                Err(e) => {
                    log::error!("encoding metrics: {e}");
                    warp::http::StatusCode::INTERNAL_SERVER_ERROR.into_response()
                }
            }
        });
    let page = warp::path::end().map(|| warp::reply::html(PAGE));
    let routes = warp::get()
        .and(page.or(ws).or(events).or(metrics))
        .recover(app::recover);

    let listener = listener(args.listen, args.backlog)?;
    let shutdown = async {
        let _ = tokio::signal::ctrl_c().await;
        log::info!("shutting down");
    };
    match args.server {
        ServerKind::Guard => {
            log::info!("serving on http://{} (guard's server)", args.listen);
            guard
                .serve(routes)
                .graceful(shutdown)
                .incoming(listener)
                .await;
        }
        ServerKind::Warp => {
            log::warn!(
                "serving on http://{} with plain warp::serve: no head deadline, no waiting budget",
                args.listen
            );
            warp::serve(routes)
                .incoming(listener)
                .graceful(shutdown)
                .run()
                .await;
        }
    }
    Ok(())
}
