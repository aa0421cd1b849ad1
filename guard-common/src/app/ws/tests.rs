//! The upgrade guard finishes itself, over real sockets: guard's server
//! hands every request's upgrade over, and raw clients write frames by
//! hand.

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::StreamExt;
use prometheus::Registry;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use warp::reply::Reply;
use warp::{Filter, Rejection};

use crate::app::{Guard, GuardedWebSocket, Limits, ViolationPolicy, WsUpgrade};
use crate::client::{AgentClient, ClientConfig};
use crate::state::reason;

use super::frames::client_frame;
use crate::test_support::{within, FakeAgent, Mode, TestDir};

/// Serves `filter` with `guard`'s server on an ephemeral loopback port.
pub(crate) async fn serve_guarded<F, R>(guard: &Guard, filter: F) -> SocketAddr
where
    F: Filter<Extract = (R,), Error = Rejection> + Clone + Send + Sync + 'static,
    R: Reply,
{
    let (addr, serving) = guard
        .serve(filter)
        .bind(([127, 0, 0, 1], 0))
        .await
        .expect("bind a loopback port");
    tokio::spawn(serving);
    addr
}

/// A guard that believes loopback's `X-Forwarded-For`, reporting to
/// `agent` if given.
pub(crate) fn guard(limits: Limits, registry: &Registry, agent: Option<ClientConfig>) -> Guard {
    let mut b = Guard::builder()
        .limits(limits)
        .registry(registry)
        .trusted_proxies(["127.0.0.1".parse().unwrap()]);
    if let Some(cfg) = agent {
        b = b.agent(AgentClient::spawn(cfg));
    }
    b.build().unwrap()
}

/// `/echo`: every message back; the handler checks it got guard's socket.
fn echo_app(guard: &Guard) -> impl Filter<Extract = (impl Reply,), Error = Rejection> + Clone {
    warp::path("echo")
        .and(guard.websocket())
        .map(|up: WsUpgrade| {
            up.on_upgrade(|mut ws: GuardedWebSocket| async move {
                assert!(ws.metered, "guard's own upgrade, not warp's");
                while let Some(msg) = ws.next().await {
                    let _ = ws.send(msg);
                }
            })
        })
        .recover(crate::app::recover)
}

const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
/// RFC 6455's example: the accept key for `KEY`.
const ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

/// A raw client that did the handshake by hand, as `ip` behind the
/// trusted proxy; returns the stream and the response head.
async fn raw_upgrade(addr: SocketAddr, ip: &str) -> (TcpStream, String) {
    let mut s = within("connect", TcpStream::connect(addr)).await.unwrap();
    let req = format!(
        "GET /echo HTTP/1.1\r\nHost: {addr}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {KEY}\r\nX-Forwarded-For: {ip}\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    within("the handshake response", async {
        let mut b = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            assert_eq!(s.read(&mut b).await.unwrap(), 1, "EOF in the response head");
            head.push(b[0]);
        }
    })
    .await;
    (s, String::from_utf8_lossy(&head).into_owned())
}

/// A server frame as read off the wire: opcode and payload.
async fn read_frame(s: &mut (impl AsyncRead + Unpin)) -> Option<(u8, Vec<u8>)> {
    let mut h = [0u8; 2];
    s.read_exact(&mut h).await.ok()?;
    let len = match h[1] & 0x7f {
        126 => u64::from(s.read_u16().await.ok()?),
        127 => s.read_u64().await.ok()?,
        n => u64::from(n),
    };
    let mut payload = vec![0u8; usize::try_from(len).ok()?];
    s.read_exact(&mut payload).await.ok()?;
    Some((h[0] & 0x0f, payload))
}

/// Writes `frames` as fast as the server takes them, stopping at the first
/// error (the server closed), while reading for its close frame.
async fn send_reading_close(
    s: TcpStream,
    frames: impl Iterator<Item = Vec<u8>> + Send + 'static,
) -> Option<u16> {
    let (mut rd, mut wr) = s.into_split();
    let writer = tokio::spawn(async move {
        for f in frames {
            if wr.write_all(&f).await.is_err() {
                return;
            }
        }
        // Keep the write side open: a FIN now could race the close frame.
        std::future::pending::<()>().await;
    });
    let code = within("the close frame", async {
        while let Some((op, payload)) = read_frame(&mut rd).await {
            if op == 0x8 {
                return payload.get(..2).map(|c| u16::from_be_bytes([c[0], c[1]]));
            }
        }
        None
    })
    .await;
    writer.abort();
    code
}

fn quiet_limits() -> Limits {
    Limits {
        ping_interval: None,
        ..Limits::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guard_answers_the_handshake_and_echoes() {
    let registry = Registry::new();
    let guard = guard(quiet_limits(), &registry, None);
    let addr = serve_guarded(&guard, echo_app(&guard)).await;
    let (mut s, head) = raw_upgrade(addr, "198.18.40.1").await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let lower = head.to_ascii_lowercase();
    assert!(lower.contains("upgrade: websocket"), "{head}");
    assert!(lower.contains("connection: upgrade"), "{head}");
    assert!(head.contains(ACCEPT), "{head}");

    s.write_all(&client_frame(true, 0x1, b"hello"))
        .await
        .unwrap();
    let got = within("the echo", read_frame(&mut s)).await;
    assert_eq!(got, Some((0x1, b"hello".to_vec())));
    // A message in three fragments comes back whole.
    s.write_all(&client_frame(false, 0x2, b"ab")).await.unwrap();
    s.write_all(&client_frame(false, 0x0, b"cd")).await.unwrap();
    s.write_all(&client_frame(true, 0x0, b"ef")).await.unwrap();
    let got = within("the echo", read_frame(&mut s)).await;
    assert_eq!(got, Some((0x2, b"abcdef".to_vec())));
    assert_eq!(guard.open_connections(), 1);

    // And a real client library agrees with the handshake.
    let (mut client, _) = within(
        "a tungstenite handshake",
        tokio_tungstenite::connect_async(format!("ws://{addr}/echo")),
    )
    .await
    .unwrap();
    use futures_util::SinkExt;
    client
        .send(tokio_tungstenite::tungstenite::Message::text("hi"))
        .await
        .unwrap();
    let echoed = within("the echo", client.next()).await.unwrap().unwrap();
    assert_eq!(echoed.into_text().unwrap().as_str(), "hi");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_network_over_its_cap_is_answered_429_instead_of_upgraded() {
    let registry = Registry::new();
    let guard = guard(
        Limits {
            per_ip_max_connections: 1,
            per_prefix_max_connections_v4: 1,
            ..quiet_limits()
        },
        &registry,
        None,
    );
    let addr = serve_guarded(&guard, echo_app(&guard)).await;
    let (_held, head) = raw_upgrade(addr, "198.18.41.1").await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    // Same /24, another address: the network's cap.
    let (_s, head) = raw_upgrade(addr, "198.18.41.2").await;
    assert!(head.starts_with("HTTP/1.1 429"), "{head}");
    assert!(
        head.to_ascii_lowercase().contains("retry-after: 10"),
        "{head}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_messages_close_with_1009_whole_or_in_fragments() {
    let registry = Registry::new();
    let limits = Limits {
        max_message_size: 1024,
        max_frame_size: 512,
        byte_burst: 1024 * 1024,
        ..quiet_limits()
    };
    let guard = guard(limits, &registry, None);
    let addr = serve_guarded(&guard, echo_app(&guard)).await;

    // One frame over max_frame_size.
    let (s, _) = raw_upgrade(addr, "198.18.42.1").await;
    let code = send_reading_close(s, std::iter::once(client_frame(true, 0x2, &[0u8; 600]))).await;
    assert_eq!(code, Some(1009));

    // Frames each within max_frame_size that add up past max_message_size.
    let (s, _) = raw_upgrade(addr, "198.18.42.2").await;
    let parts = (0..3)
        .map(|i| client_frame(false, if i == 0 { 0x2 } else { 0x0 }, &[0u8; 500]))
        .chain(std::iter::once(client_frame(true, 0x0, &[0u8; 10])));
    let code = send_reading_close(s, parts).await;
    assert_eq!(code, Some(1009));

    // Within both: echoed.
    let (mut s, _) = raw_upgrade(addr, "198.18.42.3").await;
    s.write_all(&client_frame(false, 0x2, &[1u8; 500]))
        .await
        .unwrap();
    s.write_all(&client_frame(true, 0x0, &[2u8; 500]))
        .await
        .unwrap();
    let (op, payload) = within("the echo", read_frame(&mut s)).await.unwrap();
    assert_eq!((op, payload.len()), (0x2, 1000));
}

/// Limits under which 5 frames pass at once and then 1 a second.
fn flood_limits() -> Limits {
    Limits {
        message_rate: 1,
        message_burst: 5,
        violation_threshold: 10,
        violation_window: Duration::from_secs(3600),
        ..quiet_limits()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fragments_count_toward_the_message_rate_and_a_fragmented_flood_is_reported() {
    let dir = TestDir::new("wsfrag");
    let mut agent = FakeAgent::start(&dir.sock(), Mode::Answer);
    let registry = Registry::new();
    let guard = guard(
        flood_limits(),
        &registry,
        Some(ClientConfig::new(dir.sock(), "test-app")),
    );
    let addr = serve_guarded(&guard, echo_app(&guard)).await;

    // One message of 40 small fragments: 40 frames against a burst of 5.
    let (s, _) = raw_upgrade(addr, "198.18.43.66").await;
    let fragments = (0..40u8).map(|i| {
        let op = if i == 0 { 0x1 } else { 0x0 };
        client_frame(i == 39, op, b"z")
    });
    let code = send_reading_close(s, fragments).await;
    assert_eq!(code, Some(1008));
    let block = agent.next_block().await;
    assert_eq!(
        block.prefix,
        "198.18.43.66/32".parse::<crate::addr::Prefix>().unwrap()
    );
    assert_eq!(block.reason, reason::MESSAGE_FLOOD);

    // Five fragments fit the burst: the message goes through.
    let (mut s, _) = raw_upgrade(addr, "198.18.43.7").await;
    for i in 0..5u8 {
        let op = if i == 0 { 0x1 } else { 0x0 };
        s.write_all(&client_frame(i == 4, op, b"ok")).await.unwrap();
    }
    let got = within("the echo", read_frame(&mut s)).await;
    assert_eq!(got, Some((0x1, b"okokokokok".to_vec())));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_continuation_flood_is_closed_with_1008() {
    let registry = Registry::new();
    let guard = guard(flood_limits(), &registry, None);
    let addr = serve_guarded(&guard, echo_app(&guard)).await;
    let (s, _) = raw_upgrade(addr, "198.18.44.66").await;
    // A message that never ends: 65 536 empty fragments after its first.
    let flood = std::iter::once(client_frame(false, 0x1, b"x"))
        .chain(std::iter::repeat_with(|| client_frame(false, 0x0, b"")).take(65_536));
    let code = send_reading_close(s, flood).await;
    assert_eq!(code, Some(1008));
    let floods = registry
        .gather()
        .iter()
        .filter(|f| f.name() == "guard_app_floods_detected_total")
        .flat_map(|f| f.get_metric())
        .map(|m| m.get_counter().get_value())
        .sum::<f64>();
    assert_eq!(floods, 1.0);
    crate::test_support::wait_until("the slot given back", || guard.open_connections() == 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_drop_over_rate_fragments_cost_messages_not_the_connection() {
    let registry = Registry::new();
    let guard = guard(
        Limits {
            violation_policy: ViolationPolicy::Drop,
            ..flood_limits()
        },
        &registry,
        None,
    );
    let addr = serve_guarded(&guard, echo_app(&guard)).await;
    let (mut s, _) = raw_upgrade(addr, "198.18.45.1").await;
    // Eight frames in one write: three over the burst, so the message is
    // dropped.
    let message: Vec<u8> = (0..8u8)
        .flat_map(|i| client_frame(i == 7, if i == 0 { 0x1 } else { 0x0 }, b"d"))
        .collect();
    s.write_all(&message).await.unwrap();
    // The pong (tungstenite answers pings whatever the buckets say) shows
    // the connection still open and that nothing was echoed before it.
    s.write_all(&client_frame(true, 0x9, b"p")).await.unwrap();
    let got = within("the pong", read_frame(&mut s)).await;
    assert_eq!(got, Some((0xa, b"p".to_vec())));
    // One message dropped for its three frames over, not three.
    let dropped = || {
        registry
            .gather()
            .iter()
            .filter(|f| f.name() == "guard_app_messages_dropped_total")
            .flat_map(|f| f.get_metric())
            .map(|m| m.get_counter().get_value())
            .sum::<f64>()
    };
    assert_eq!(dropped(), 1.0, "the fragmented message only");
    assert_eq!(guard.open_connections(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_apps_validation_holds_on_guards_upgrade() {
    let registry = Registry::new();
    let guard = guard(
        Limits {
            violation_policy: ViolationPolicy::Drop,
            ..quiet_limits()
        },
        &registry,
        None,
    );
    let app = warp::path("echo")
        .and(guard.websocket())
        .map(|up: WsUpgrade| {
            up.validate(|msg| match msg.to_str() {
                Ok(t) if t.contains("bad") => Err("no bad words".into()),
                _ => Ok(()),
            })
            .on_upgrade(|mut ws: GuardedWebSocket| async move {
                while let Some(msg) = ws.next().await {
                    let _ = ws.send(msg);
                }
            })
        })
        .recover(crate::app::recover);
    let addr = serve_guarded(&guard, app).await;
    let (mut s, _) = raw_upgrade(addr, "198.18.46.1").await;
    s.write_all(&client_frame(true, 0x1, b"a bad one"))
        .await
        .unwrap();
    s.write_all(&client_frame(true, 0x1, b"a good one"))
        .await
        .unwrap();
    let got = within("the echo", read_frame(&mut s)).await;
    assert_eq!(got, Some((0x1, b"a good one".to_vec())));
}
