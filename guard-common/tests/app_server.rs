//! guard's own server, with real sockets: deadlines, the waiting budget,
//! HTTP/2, TLS and offender reports. Deadlines are short here so the tests
//! are quick; every assertion is on a state (a socket closed, a counter),
//! never on how long something took.
#![cfg(all(feature = "warp", feature = "test-support"))]

mod common;

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use common::{eventually, metric, within, FakeAgent, Mode, SseHub, TestDir};
use guard_common::addr::Prefix;
use guard_common::app::{Guard, Http2Limits, Limits, ServerLimits};
use guard_common::client::{AgentClient, ClientConfig};
use guard_common::state::reason;
use prometheus::Registry;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use warp::filters::BoxedFilter;
use warp::reply::{Reply, Response as HttpResponse};
use warp::Filter;

/// Deadlines short enough for a test, long enough that a prompt client on
/// a loaded machine is never caught by them.
fn quick(limits: ServerLimits) -> ServerLimits {
    ServerLimits {
        head_timeout: Duration::from_secs(1),
        keep_alive_idle: Duration::from_secs(1),
        ..limits
    }
}

fn server_guard(server: ServerLimits, limits: Limits, registry: &Registry) -> Guard {
    Guard::builder()
        .limits(limits)
        .server_limits(server)
        .registry(registry)
        .trusted_proxies(["127.0.0.1".parse().unwrap()])
        .build()
        .unwrap()
}

/// `/hello` plus the shared test app (`/events` is a guarded SSE feed).
fn routes(guard: &Guard) -> BoxedFilter<(HttpResponse,)> {
    let hello = warp::path("hello").map(|| "hello".into_response());
    hello
        .or(common::app(guard, SseHub::default()))
        .unify()
        .boxed()
}

fn closed(registry: &Registry, reason: &str) -> f64 {
    metric(
        registry,
        &format!("guard_app_server_closed_total{{reason=\"{reason}\"}}"),
    )
}

fn waiting(registry: &Registry) -> f64 {
    metric(registry, "guard_app_server_connections_waiting")
}

/// A connection from `from` (any local address) to `addr`.
async fn connect_from(from: IpAddr, addr: SocketAddr) -> TcpStream {
    let socket = match from {
        IpAddr::V4(_) => TcpSocket::new_v4(),
        IpAddr::V6(_) => TcpSocket::new_v6(),
    }
    .unwrap();
    socket.bind(SocketAddr::new(from, 0)).unwrap();
    within("connect", socket.connect(addr)).await.unwrap()
}

/// A request head that is started and never finished.
async fn slow_head(from: IpAddr, addr: SocketAddr) -> TcpStream {
    let mut s = connect_from(from, addr).await;
    s.write_all(b"GET /hello HTTP/1.1\r\nHost: guard\r\nX-Slow: 1\r\n")
        .await
        .unwrap();
    s
}

/// Reads until the server closes the connection; what it sent.
async fn until_closed<S: AsyncRead + Unpin>(s: &mut S) -> Vec<u8> {
    within("the server to close the connection", async {
        let mut all = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return all,
                Ok(n) => all.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
}

/// One complete request; the response as text.
async fn get<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, path: &str, close: bool) -> String {
    let connection = if close { "close" } else { "keep-alive" };
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: guard\r\nConnection: {connection}\r\n\r\n")
            .as_bytes(),
    )
    .await
    .unwrap();
    within("the response", async {
        let mut all = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let text = String::from_utf8_lossy(&all).into_owned();
            if let Some(end) = text.find("\r\n\r\n") {
                let len = text[..end]
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length: "))
                    .map_or(0, |v| v.trim().parse::<usize>().unwrap());
                if all.len() >= end + 4 + len {
                    return text;
                }
            }
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return String::from_utf8_lossy(&all).into_owned(),
                Ok(n) => all.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
}

/// A loopback address in network (/24) `net`, so tests can be sources in
/// different networks.
fn localhost(net: u8) -> IpAddr {
    IpAddr::from([127, 0, net, 1])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_that_never_ends_is_closed_at_its_deadline() {
    let registry = Registry::new();
    let guard = server_guard(quick(ServerLimits::default()), Limits::default(), &registry);
    let addr = common::serve_with(&guard, routes(&guard)).await;

    let mut slow = slow_head(localhost(1), addr).await;
    // One more header line now and then, as slowloris does; the server
    // closes it anyway.
    let drip = async {
        loop {
            tokio::time::sleep(Duration::from_millis(50)).await;
            if slow.write_all(b"X-More: 1\r\n").await.is_err() {
                break;
            }
        }
    };
    within("the slow head to be cut off", drip).await;
    until_closed(&mut slow).await;
    eventually("a head_deadline close", || {
        closed(&registry, "head_deadline") == 1.0
    })
    .await;
    assert_eq!(waiting(&registry), 0.0);

    // A prompt client is served, on a connection of its own.
    let mut prompt = connect_from(localhost(1), addr).await;
    let response = get(&mut prompt, "/hello", true).await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert_eq!(metric(&registry, "guard_app_server_connections_total"), 2.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_larger_than_max_head_size_is_refused_with_431() {
    let registry = Registry::new();
    let server = ServerLimits {
        max_head_size: 8192,
        ..ServerLimits::default()
    };
    let guard = server_guard(server, Limits::default(), &registry);
    let addr = common::serve_with(&guard, routes(&guard)).await;
    let mut s = connect_from(localhost(1), addr).await;
    let cookie = "a".repeat(16 * 1024);
    // The server may stop reading once it has refused: ignore write errors.
    let _ = s
        .write_all(
            format!("GET /hello HTTP/1.1\r\nHost: guard\r\nCookie: {cookie}\r\n\r\n").as_bytes(),
        )
        .await;
    let response = String::from_utf8_lossy(&until_closed(&mut s).await).into_owned();
    assert!(response.starts_with("HTTP/1.1 431"), "{response}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_budget_closes_the_oldest_waiting_and_admits_the_prompt_one() {
    let registry = Registry::new();
    let server = ServerLimits {
        // Long deadlines: only the budget closes anything here.
        head_timeout: Duration::from_secs(600),
        keep_alive_idle: Duration::from_secs(600),
        max_waiting: 3,
        max_waiting_per_network: 3,
        max_waiting_per_source: 2,
        ..ServerLimits::default()
    };
    let guard = server_guard(server, Limits::default(), &registry);
    let addr = common::serve_with(&guard, routes(&guard)).await;

    // Per source: the third slow head from 127.0.0.2 closes its first.
    let mut a1 = slow_head(localhost(2), addr).await;
    eventually("a1 waiting", || waiting(&registry) == 1.0).await;
    let _a2 = slow_head(localhost(2), addr).await;
    eventually("a2 waiting", || waiting(&registry) == 2.0).await;
    let _a3 = slow_head(localhost(2), addr).await;
    until_closed(&mut a1).await;
    eventually("a budget_prefix close", || {
        closed(&registry, "budget_prefix") == 1.0
    })
    .await;
    assert_eq!(waiting(&registry), 2.0);

    // Globally: the budget is full (a2, a3, b1); a prompt client evicts the
    // oldest (a2) and is served.
    let _b1 = slow_head(localhost(3), addr).await;
    eventually("b1 waiting", || waiting(&registry) == 3.0).await;
    let mut prompt = connect_from(localhost(4), addr).await;
    let response = get(&mut prompt, "/hello", true).await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert_eq!(closed(&registry, "budget_global"), 1.0);
    // The prompt one said `Connection: close`: leaving, it took no place.
    until_closed(&mut prompt).await;
    eventually("two slow heads left", || waiting(&registry) == 2.0).await;
    assert_eq!(closed(&registry, "budget_global"), 1.0);
    assert_eq!(closed(&registry, "head_deadline"), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_keep_alive_connection_is_closed_and_a_stream_is_not() {
    let registry = Registry::new();
    // Idle longer than a head may take: hyper's own header timer also runs
    // while a connection idles, and must not close it before this does.
    let server = ServerLimits {
        keep_alive_idle: Duration::from_secs(3),
        ..quick(ServerLimits::default())
    };
    let guard = server_guard(server, Limits::default(), &registry);
    let hub = SseHub::default();
    let app = warp::path("hello")
        .map(|| "hello".into_response())
        .or(common::app(&guard, hub.clone()))
        .unify()
        .boxed();
    let addr = common::serve_with(&guard, app).await;

    // An SSE subscription is a request in flight for as long as it lasts.
    let mut sub = common::sse_connect(addr, "198.18.50.1").await;
    let mut buf = Vec::new();
    assert!(common::read_until(&mut sub, &mut buf, "retry:").await);
    eventually("the subscriber to join", || hub.len() == 1).await;

    let mut keep = connect_from(localhost(1), addr).await;
    let response = get(&mut keep, "/hello", false).await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    until_closed(&mut keep).await;
    eventually("an idle_deadline close", || {
        closed(&registry, "idle_deadline") == 1.0
    })
    .await;

    // Two idle deadlines later the stream still delivers.
    let before = closed(&registry, "idle_deadline");
    let mut again = connect_from(localhost(1), addr).await;
    get(&mut again, "/hello", false).await;
    until_closed(&mut again).await;
    eventually("a second idle close", || {
        closed(&registry, "idle_deadline") == before + 1.0
    })
    .await;
    assert_eq!(hub.send("still here"), 1);
    assert!(common::read_until(&mut sub, &mut buf, "still here").await);
    assert_eq!(closed(&registry, "head_deadline"), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_stops_accepting_and_ends_streams_after_the_grace() {
    let registry = Registry::new();
    let server = ServerLimits {
        shutdown_grace: Duration::from_millis(300),
        ..ServerLimits::default()
    };
    let guard = server_guard(server, Limits::default(), &registry);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let (addr, serving) = guard
        .serve(routes(&guard))
        .graceful(async {
            let _ = stopped.await;
        })
        .bind(([127, 0, 0, 1], 0))
        .await
        .unwrap();
    let server = tokio::spawn(serving);

    let mut sub = common::sse_connect(addr, "198.18.80.1").await;
    let mut buf = Vec::new();
    assert!(common::read_until(&mut sub, &mut buf, "retry:").await);
    let mut keep = connect_from(localhost(1), addr).await;
    let response = get(&mut keep, "/hello", false).await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");

    stop.send(()).unwrap();
    // The SSE stream never ends by itself: the server returns only because
    // the grace period closes it.
    within("the server to stop", server).await.unwrap();
    until_closed(&mut keep).await;
    until_closed(&mut sub).await;
    assert!(TcpStream::connect(addr).await.is_err(), "still listening");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_prior_knowledge_is_refused_by_default() {
    let registry = Registry::new();
    let guard = server_guard(ServerLimits::default(), Limits::default(), &registry);
    let addr = common::serve_with(&guard, routes(&guard)).await;
    let tcp = connect_from(localhost(1), addr).await;
    let outcome = within("an h2 attempt to end", async {
        let (mut client, conn) = h2::client::handshake(tcp).await?;
        tokio::spawn(conn);
        let req = warp::http::Request::get(format!("http://{addr}/hello"))
            .body(())
            .unwrap();
        let (response, _) = client.send_request(req, true)?;
        response.await.map(|r| r.status())
    })
    .await;
    assert!(outcome.is_err(), "h2c was served: {outcome:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_bounds_hold_and_streams_count_against_the_source_caps() {
    let registry = Registry::new();
    let server = ServerLimits {
        http2: Some(Http2Limits {
            max_concurrent_streams: 3,
            ..Http2Limits::default()
        }),
        ..ServerLimits::default()
    };
    let limits = Limits {
        per_ip_max_connections: 2,
        ..Limits::default()
    };
    let guard = server_guard(server, limits, &registry);
    let addr = common::serve_with(&guard, routes(&guard)).await;
    let tcp = connect_from(localhost(1), addr).await;
    let (client, mut conn) = h2::client::handshake(tcp).await.unwrap();

    let subscribe = |mut client: h2::client::SendRequest<warp::hyper::body::Bytes>| async move {
        let req = warp::http::Request::get(format!("http://{addr}/events"))
            .header("x-forwarded-for", "198.18.60.1")
            .body(())
            .unwrap();
        client = client.ready().await.unwrap();
        let (response, _) = client.send_request(req, true).unwrap();
        response.await.unwrap()
    };
    // Drive the connection while three SSE subscriptions go out on it.
    let streams = async {
        let mut statuses = Vec::new();
        let mut bodies = Vec::new();
        for _ in 0..3 {
            let response = subscribe(client.clone()).await;
            statuses.push(response.status().as_u16());
            bodies.push(response.into_body());
        }
        (statuses, bodies)
    };
    let (statuses, _bodies) = within("three h2 streams", async {
        tokio::select! {
            out = streams => out,
            ended = &mut conn => panic!("the h2 connection ended: {ended:?}"),
        }
    })
    .await;
    // The server's SETTINGS hold its bound.
    assert_eq!(conn.max_concurrent_send_streams(), 3);
    // One source, one connection, three streams: the per-IP cap of 2
    // refuses the third as it would a third connection.
    assert_eq!(statuses, [200, 200, 429]);
    assert_eq!(waiting(&registry), 0.0);
}

/// An app's own event stream (warp's SSE reply, not guard's) leaves hyper
/// after its head too: the head says the connection ends with the stream,
/// the events arrive as HTTP/1.1 chunks, and when the stream ends the body
/// ends cleanly and the server closes the connection. A HEAD of the same
/// route is answered by hyper and the connection stays usable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_s_own_event_stream_leaves_hyper_and_ends_cleanly() {
    let registry = Registry::new();
    let guard = server_guard(quick(ServerLimits::default()), Limits::default(), &registry);
    let three_events = warp::path("countdown").map(|| {
        let events = futures_util::stream::iter(
            ["3", "2", "1"]
                .map(|n| Ok::<_, std::convert::Infallible>(warp::sse::Event::default().data(n))),
        );
        warp::sse::reply(events).into_response()
    });
    let (addr, serving) = guard
        .serve(three_events)
        .bind(([127, 0, 0, 1], 0))
        .await
        .unwrap();
    tokio::spawn(serving);

    let mut s = connect_from(localhost(1), addr).await;
    s.write_all(b"GET /countdown HTTP/1.1\r\nHost: guard\r\nAccept: text/event-stream\r\n\r\n")
        .await
        .unwrap();
    let all = until_closed(&mut s).await;
    let text = String::from_utf8_lossy(&all).to_ascii_lowercase();
    let (head, body) = text.split_once("\r\n\r\n").expect("a response head");
    assert!(head.starts_with("http/1.1 200"), "{text}");
    assert!(head.contains("transfer-encoding: chunked"), "{text}");
    assert!(head.contains("connection: close"), "{text}");
    assert_eq!(
        body, "8\r\ndata:3\n\n\r\n8\r\ndata:2\n\n\r\n8\r\ndata:1\n\n\r\n0\r\n\r\n",
        "three chunks, then the last chunk"
    );
    assert_eq!(
        metric(&registry, "guard_app_server_streams_handed_off_total"),
        1.0
    );

    let mut s = connect_from(localhost(1), addr).await;
    s.write_all(b"HEAD /countdown HTTP/1.1\r\nHost: guard\r\n\r\n")
        .await
        .unwrap();
    let head = within("the HEAD response", async {
        let mut all = Vec::new();
        let mut buf = [0u8; 1024];
        while !all.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = s.read(&mut buf).await.unwrap();
            assert!(n > 0, "EOF after HEAD");
            all.extend_from_slice(&buf[..n]);
        }
        String::from_utf8_lossy(&all).into_owned()
    })
    .await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let response = get(&mut s, "/countdown", true).await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert_eq!(
        metric(&registry, "guard_app_server_streams_handed_off_total"),
        2.0,
        "the HEAD was not handed off, the GET after it was"
    );
}

#[cfg(feature = "tls")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_serves_with_a_pem_certificate_and_bad_files_are_a_clear_error() {
    use std::sync::Arc;
    use tokio_rustls::rustls::{ClientConfig as TlsClientConfig, RootCertStore};

    let dir = TestDir::new("tls");
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    let made = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
        ])
        .args(["-nodes", "-days", "1", "-subj", "/CN=localhost"])
        .args(["-addext", "subjectAltName=DNS:localhost"])
        .args(["-addext", "basicConstraints=critical,CA:FALSE"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("the openssl CLI");
    assert!(made.status.success(), "{made:?}");

    let registry = Registry::new();
    let guard = server_guard(quick(ServerLimits::default()), Limits::default(), &registry);
    let missing = guard
        .serve(routes(&guard))
        .tls_pem(dir.path().join("nope.pem"), &key)
        .err()
        .expect("a missing certificate is an error");
    assert!(missing.to_string().contains("nope.pem"), "{missing}");

    let (addr, serving) = guard
        .serve(routes(&guard))
        .tls_pem(&cert, &key)
        .unwrap()
        .bind(([127, 0, 0, 1], 0))
        .await
        .unwrap();
    tokio::spawn(serving);

    use rustls_pki_types::pem::PemObject;
    let mut roots = RootCertStore::empty();
    roots
        .add(rustls_pki_types::CertificateDer::from_pem_file(&cert).unwrap())
        .unwrap();
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let mut config = TlsClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    // Offered h2 first, the server (HTTP/2 off) picks HTTP/1.1.
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = connect_from(localhost(1), addr).await;
    let mut tls = connector
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .expect("the TLS handshake");
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let response = get(&mut tls, "/hello", true).await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(response.ends_with("hello"), "{response}");

    // An event stream over TLS leaves hyper after its head, as in the
    // clear, and its events still arrive (the TLS layer is flushed).
    let tcp = connect_from(localhost(1), addr).await;
    let mut sse = connector
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .expect("the TLS handshake");
    sse.write_all(b"GET /events HTTP/1.1\r\nHost: localhost\r\nAccept: text/event-stream\r\n\r\n")
        .await
        .unwrap();
    let mut stream = Vec::new();
    let mut chunk = [0u8; 4096];
    while !String::from_utf8_lossy(&stream).contains("retry:") {
        let n = tokio::time::timeout(Duration::from_secs(10), sse.read(&mut chunk))
            .await
            .expect("the stream's first event")
            .unwrap();
        assert!(n > 0, "EOF before the first event: {stream:?}");
        stream.extend_from_slice(&chunk[..n]);
    }
    assert_eq!(
        metric(&registry, "guard_app_server_streams_handed_off_total"),
        1.0
    );

    // A client that stalls in the handshake (half a ClientHello) is closed
    // at the head deadline like a slow head.
    let mut stalled = connect_from(localhost(1), addr).await;
    stalled
        .write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01])
        .await
        .unwrap();
    until_closed(&mut stalled).await;
    eventually("a head_deadline close", || {
        closed(&registry, "head_deadline") == 1.0
    })
    .await;
}

/// Runs `test` on a thread of its own inside a fresh network namespace
/// (gone when the thread ends) whose loopback also holds 198.18.0.1/24, so
/// sources are not loopback and can be reported. Needs root.
fn in_private_netns<F>(test: impl FnOnce() -> F + Send + 'static)
where
    F: std::future::Future<Output = ()>,
{
    std::thread::spawn(move || {
        // SAFETY: unshare only changes this thread's namespaces.
        let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(
            rc,
            0,
            "unshare(CLONE_NEWNET): {} (this test needs root)",
            std::io::Error::last_os_error()
        );
        for args in [
            &["link", "set", "lo", "up"][..],
            &["addr", "add", "198.18.0.1/24", "dev", "lo"][..],
        ] {
            // A child forked from this thread shares its namespace.
            let out = std::process::Command::new("ip")
                .args(args)
                .output()
                .unwrap();
            assert!(out.status.success(), "ip {args:?}: {out:?}");
        }
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(test());
    })
    .join()
    .unwrap_or_else(|e| std::panic::resume_unwind(e));
}

#[test]
fn a_source_whose_slow_heads_keep_being_closed_is_reported() {
    in_private_netns(|| async {
        let dir = TestDir::new("slow-offender");
        let mut agent = FakeAgent::start(&dir.sock(), Mode::Answer);
        let registry = Registry::new();
        let guard = Guard::builder()
            .server_limits(quick(ServerLimits {
                offender_threshold: 2,
                ..ServerLimits::default()
            }))
            .registry(&registry)
            .agent(AgentClient::spawn(ClientConfig::new(
                dir.sock(),
                "test-app",
            )))
            .build()
            .unwrap();
        let (addr, serving) = guard
            .serve(routes(&guard))
            .bind(([198, 18, 0, 1], 0))
            .await
            .unwrap();
        tokio::spawn(serving);
        let offender: IpAddr = "198.18.0.2".parse().unwrap();
        let browser: IpAddr = "198.18.0.3".parse().unwrap();

        // A connection that never sends a byte (a browser's preconnect) is
        // closed but not held against its source, so one slow head after it
        // is its first strike, not its second...
        let mut preconnect = connect_from(browser, addr).await;
        until_closed(&mut preconnect).await;
        let mut slow = slow_head(browser, addr).await;
        until_closed(&mut slow).await;
        // ...while two half-sent heads make an offender.
        for _ in 0..2 {
            let mut slow = slow_head(offender, addr).await;
            until_closed(&mut slow).await;
        }
        let block = agent.next_block().await;
        assert_eq!(block.prefix, "198.18.0.2/32".parse::<Prefix>().unwrap());
        assert_eq!(block.reason, reason::SLOW_CONNECTIONS);
        assert!(block.detail.contains("head_deadline"), "{}", block.detail);
        assert_eq!(closed(&registry, "head_deadline"), 4.0);

        // The offender again within the window is not reported twice: the
        // next report is the other source's, once it trips too.
        let mut slow = slow_head(offender, addr).await;
        until_closed(&mut slow).await;
        let mut slow = slow_head(browser, addr).await;
        until_closed(&mut slow).await;
        let block = agent.next_block().await;
        assert_eq!(block.prefix, "198.18.0.3/32".parse::<Prefix>().unwrap());
        agent.stop().await;
    });
}
