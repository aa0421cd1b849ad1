//! What the warp-side tests share: a fake agent on a real Unix socket, an
//! app served on 127.0.0.1:0, and real clients.
// Each test crate uses a different part of this module.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::{SinkExt, StreamExt};
use guard_common::app::{Guard, GuardedWebSocket, SseSubscription, WsSender, WsUpgrade};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use warp::filters::BoxedFilter;
use warp::reply::{Reply, Response as HttpResponse};
use warp::Filter;

// Each test crate uses a different part of these.
#[allow(unused_imports)]
pub use guard_common::test_support::{within, FakeAgent, Mode, TestDir, PATIENCE};

/// Polls `cond` until it holds (the guard updates counters from other
/// tasks).
pub async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    within(what, async {
        while !cond() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
}

pub fn unix_ns_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

/// Serves `routes` with guard's server (default server limits) on an
/// ephemeral loopback port. The serving guard is not the app's: the budget
/// and deadlines need no admission state, and the app's guard keeps its
/// registry to itself.
pub async fn serve(routes: BoxedFilter<(HttpResponse,)>) -> SocketAddr {
    serve_with(&Guard::builder().build().unwrap(), routes).await
}

/// Serves `routes` with `guard`'s server on an ephemeral loopback port.
pub async fn serve_with(guard: &Guard, routes: BoxedFilter<(HttpResponse,)>) -> SocketAddr {
    let (addr, serving) = guard
        .serve(routes)
        .bind(([127, 0, 0, 1], 0))
        .await
        .expect("bind an ephemeral loopback port");
    tokio::spawn(serving);
    addr
}

/// Every chat member's sender; a message goes to all of them.
#[derive(Clone, Default)]
pub struct Hub(Arc<Mutex<Vec<WsSender>>>);

impl Hub {
    pub fn join(&self, tx: WsSender) {
        self.0.lock().unwrap().push(tx);
    }

    pub fn broadcast(&self, msg: warp::ws::Message) {
        self.0
            .lock()
            .unwrap()
            .retain(|tx| tx.send(msg.clone()).is_ok());
    }
}

/// `/chat` (broadcast to all), `/echo`, and `/events` (SSE: the events
/// pushed through `feed`), all guarded.
pub fn app(guard: &Guard, feed: SseHub) -> BoxedFilter<(HttpResponse,)> {
    let hub = Hub::default();
    let chat = warp::path("chat")
        .and(guard.websocket())
        .map(move |up: WsUpgrade| {
            let hub = hub.clone();
            up.on_upgrade(move |mut ws: GuardedWebSocket| async move {
                hub.join(ws.sender());
                while let Some(msg) = ws.next().await {
                    hub.broadcast(msg);
                }
            })
        });
    let echo = warp::path("echo")
        .and(guard.websocket())
        .map(|up: WsUpgrade| up.on_upgrade(echo_loop));
    // Echo of JSON-looking messages only.
    let json = warp::path("json")
        .and(guard.websocket())
        .map(|up: WsUpgrade| {
            up.validate(|m| match m.as_bytes().first() {
                Some(b'{') => Ok(()),
                _ => Err("not a JSON object".into()),
            })
            .on_upgrade(echo_loop)
        });
    // Echo, with limits keyed by the `x-user` header as well.
    let ident = warp::path("ident")
        .and(guard.websocket_with_identity(warp::header::optional::<String>("x-user")))
        .map(|up: WsUpgrade| up.on_upgrade(echo_loop));
    let events = warp::path("events")
        .and(guard.sse())
        .map(move |sub: SseSubscription| {
            let (tx, reply) = sub.channel();
            feed.join(tx);
            reply
        });
    chat.map(Reply::into_response)
        .or(echo.map(Reply::into_response))
        .unify()
        .or(json.map(Reply::into_response))
        .unify()
        .or(ident.map(Reply::into_response))
        .unify()
        .or(events.map(Reply::into_response))
        .unify()
        .recover(guard_common::app::recover)
        .unify()
        .boxed()
}

pub async fn echo_loop(mut ws: GuardedWebSocket) {
    while let Some(msg) = ws.next().await {
        if ws.send(msg).is_err() {
            break;
        }
    }
}

/// A guard for tests: loopback is the trusted proxy (clients name their
/// address in `X-Forwarded-For`), with an agent client if `agent` is set.
pub fn guard(
    limits: guard_common::app::Limits,
    registry: &prometheus::Registry,
    agent: Option<guard_common::client::ClientConfig>,
) -> Guard {
    let mut b = Guard::builder()
        .limits(limits)
        .registry(registry)
        .trusted_proxies(["127.0.0.1".parse().unwrap()]);
    if let Some(cfg) = agent {
        b = b.agent(guard_common::client::AgentClient::spawn(cfg));
    }
    b.build().unwrap()
}

/// SSE subscribers of the test app.
#[derive(Clone, Default)]
pub struct SseHub(Arc<Mutex<Vec<guard_common::app::SseSender>>>);

impl SseHub {
    pub fn join(&self, tx: guard_common::app::SseSender) {
        self.0.lock().unwrap().push(tx);
    }

    /// Sends to every subscriber; how many took it.
    pub fn send(&self, data: &str) -> usize {
        let mut subs = self.0.lock().unwrap();
        subs.retain(|tx| tx.send(warp::sse::Event::default().data(data)).is_ok());
        subs.len()
    }

    pub fn len(&self) -> usize {
        self.0.lock().unwrap().len()
    }
}

pub type Client = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A WebSocket client that a trusted proxy on loopback forwards for `ip`
/// (so it is reportable), optionally with an identity header.
pub async fn ws_connect(addr: SocketAddr, path: &str, ip: &str, user: Option<&str>) -> Client {
    let mut req = format!("ws://{addr}{path}").into_client_request().unwrap();
    req.headers_mut()
        .insert("x-forwarded-for", ip.parse().unwrap());
    if let Some(user) = user {
        req.headers_mut().insert("x-user", user.parse().unwrap());
    }
    let (ws, _) = within(
        "the websocket handshake",
        tokio_tungstenite::connect_async(req),
    )
    .await
    .expect("handshake");
    ws
}

/// Reads until the server's close frame; its code and reason (None if the
/// connection ended without one).
pub async fn close_frame(ws: &mut Client) -> Option<(CloseCode, String)> {
    within("the close frame", async {
        while let Some(msg) = ws.next().await {
            match msg {
                Ok(WsMessage::Close(frame)) => {
                    return frame.map(|f| (f.code, f.reason.as_str().to_owned()))
                }
                Ok(_) => {}
                Err(_) => return None,
            }
        }
        None
    })
    .await
}

/// Sends as fast as it can until the server closes; returns the close code
/// and how many messages went out.
pub async fn flood(mut ws: Client, payload: &str) -> (Option<CloseCode>, usize) {
    let (mut tx, mut rx) = (&mut ws).split();
    let reader = async {
        while let Some(msg) = rx.next().await {
            match msg {
                Ok(WsMessage::Close(frame)) => return frame.map(|f| f.code),
                Ok(_) => {}
                Err(_) => return None,
            }
        }
        None
    };
    let writer = async {
        let mut sent = 0;
        // The cap only stops a guard that never closes from looping forever.
        while sent < 100_000 {
            if tx.send(WsMessage::text(payload)).await.is_err() {
                break;
            }
            sent += 1;
        }
        sent
    };
    tokio::pin!(reader, writer);
    let mut sent = None;
    let code = within("the flood to be closed", async {
        loop {
            tokio::select! {
                code = &mut reader => return code,
                n = &mut writer, if sent.is_none() => sent = Some(n),
            }
        }
    })
    .await;
    (code, sent.unwrap_or_default())
}

/// Reads text messages until one equals `want`.
pub async fn recv_until(ws: &mut Client, want: &str) {
    within(&format!("message {want:?}"), async {
        loop {
            match ws.next().await {
                Some(Ok(WsMessage::Text(t))) if t.as_str() == want => return,
                Some(Ok(_)) => {}
                other => panic!("connection ended before {want:?}: {other:?}"),
            }
        }
    })
    .await
}

/// A raw HTTP/1.1 SSE subscription through a trusted proxy for `ip`.
pub async fn sse_connect(addr: SocketAddr, ip: &str) -> TcpStream {
    let mut s = within("the SSE connect", TcpStream::connect(addr))
        .await
        .unwrap();
    let req = format!(
        "GET /events HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\nX-Forwarded-For: {ip}\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    s
}

/// Reads from `s` until `buf` contains `needle`; false at EOF.
pub async fn read_until(s: &mut TcpStream, buf: &mut Vec<u8>, needle: &str) -> bool {
    within(&format!("{needle:?} on the SSE stream"), async {
        let mut chunk = vec![0u8; 64 * 1024];
        loop {
            if contains(buf, needle) {
                return true;
            }
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return contains(buf, needle),
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await
}

pub fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}

/// The status line and headers of an HTTP response in `buf`.
pub fn head(buf: &[u8]) -> String {
    let end = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("complete response head");
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// A metric's value in the registry's text exposition.
pub fn metric(registry: &prometheus::Registry, series: &str) -> f64 {
    let text = prometheus::TextEncoder::new()
        .encode_to_string(&registry.gather())
        .unwrap();
    text.lines()
        .find_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            (name == series).then(|| value.parse().unwrap())
        })
        .unwrap_or_else(|| panic!("no series {series} in\n{text}"))
}
