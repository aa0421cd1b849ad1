//! Out of descriptors: the accept loop keeps turning, sheds waiting
//! connections before admitted ones, and a prompt client is still served.
//!
//! A test binary of its own, and the server in a child process of it: the
//! child lowers its open-files limit, which would starve any other test in
//! the same process.
#![cfg(all(feature = "warp", feature = "test-support"))]

mod common;

use std::io::{BufRead, BufReader};
use std::net::{IpAddr, SocketAddr};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{within, SseHub};
use guard_common::app::{Guard, Limits, ServerLimits};
use prometheus::{Registry, TextEncoder};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use warp::reply::Reply;
use warp::Filter;

/// Set in the child: serve instead of test.
const CHILD_ENV: &str = "GUARD_FD_TEST_CHILD";
/// The child's open-files limit, soft and hard: room for the runtime and a
/// few dozen connections, far fewer than the slow heads sent at it.
const CHILD_NOFILE: u64 = 96;
const SLOW_HEADS: usize = 200;
const SUBSCRIBERS: usize = 3;

#[test]
fn emfile_never_stops_accepting() {
    if std::env::var_os(CHILD_ENV).is_some() {
        serve_in_child();
        return;
    }
    let exe = std::env::current_exe().unwrap();
    let child = Command::new(exe)
        .args(["--exact", "emfile_never_stops_accepting", "--nocapture"])
        .env(CHILD_ENV, "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut child = KillOnDrop(child);
    let stdout = child.0.stdout.take().unwrap();
    let addr: SocketAddr = BufReader::new(stdout)
        .lines()
        .map_while(Result::ok)
        .find_map(|l| l.strip_prefix("listening on ").map(|a| a.parse().unwrap()))
        .expect("the child's address");
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(against_the_child(addr));
}

async fn against_the_child(addr: SocketAddr) {
    // Admitted first: SSE subscribers, requests in flight.
    let mut subscribers = Vec::new();
    for i in 0..SUBSCRIBERS {
        let mut s = common::sse_connect(addr, &format!("198.18.70.{}", i + 1)).await;
        let mut buf = Vec::new();
        assert!(common::read_until(&mut s, &mut buf, "retry:").await);
        subscribers.push((s, buf));
    }
    // Then far more slow heads than the child has descriptors, each from a
    // network of its own so only descriptors limit them.
    let mut slow = Vec::new();
    for i in 0..SLOW_HEADS {
        let from = IpAddr::from([127, 1, (i / 250) as u8, (i % 250) as u8 + 1]);
        let socket = TcpSocket::new_v4().unwrap();
        socket.bind(SocketAddr::new(from, 0)).unwrap();
        let mut s = within("a slow connect", socket.connect(addr))
            .await
            .unwrap();
        s.write_all(b"GET /hello HTTP/1.1\r\nHost: guard\r\n")
            .await
            .unwrap();
        slow.push(s);
    }
    // Prompt clients keep getting in.
    for _ in 0..5 {
        let response = get(addr, "/hello").await;
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    }
    let metrics = get(addr, "/metrics").await;
    let value = |series: &str| -> f64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {series} in {metrics}"))
    };
    assert!(
        value("guard_app_server_accept_errors_total{kind=\"emfile\"}") >= 1.0,
        "{metrics}"
    );
    assert!(
        value("guard_app_server_closed_total{reason=\"fd_shed\"}") >= 1.0,
        "{metrics}"
    );
    assert!(
        value("guard_app_server_connections_total") >= (SLOW_HEADS + SUBSCRIBERS + 5) as f64,
        "{metrics}"
    );
    // The admitted subscribers were never shed: they still receive.
    assert!(get(addr, "/broadcast").await.starts_with("HTTP/1.1 200"));
    for (s, buf) in &mut subscribers {
        assert!(common::read_until(s, buf, "still here").await);
    }
    drop(slow);
}

async fn get(addr: SocketAddr, path: &str) -> String {
    within(&format!("GET {path}"), async {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: guard\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut response = Vec::new();
        let _ = s.read_to_end(&mut response).await;
        String::from_utf8_lossy(&response).into_owned()
    })
    .await
}

/// The child: a server under a small open-files limit, until its stdin
/// closes (the parent ended, however it ended).
fn serve_in_child() {
    let limit = libc::rlimit {
        rlim_cur: CHILD_NOFILE,
        rlim_max: CHILD_NOFILE,
    };
    // SAFETY: setrlimit reads one initialised rlimit struct.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) }, 0);
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(async {
            let registry = Registry::new();
            let guard = Guard::builder()
                .limits(Limits::default())
                .server_limits(ServerLimits {
                    // Only descriptors limit the slow heads here.
                    head_timeout: Duration::from_secs(600),
                    max_waiting: 100_000,
                    max_waiting_per_network: 100_000,
                    max_waiting_per_source: 100_000,
                    // No early shedding: run into EMFILE itself.
                    fd_low_water: 0,
                    ..ServerLimits::default()
                })
                .registry(&registry)
                .trusted_proxies(["127.0.0.1".parse().unwrap()])
                .build()
                .unwrap();
            let hub = SseHub::default();
            let broadcast = {
                let hub = hub.clone();
                warp::path("broadcast").map(move || {
                    hub.send("still here");
                    "sent".into_response()
                })
            };
            let metrics = warp::path("metrics").map(move || {
                TextEncoder::new()
                    .encode_to_string(&registry.gather())
                    .unwrap()
                    .into_response()
            });
            let hello = warp::path("hello").map(|| "hello".into_response());
            let routes = hello
                .or(metrics)
                .unify()
                .or(broadcast)
                .unify()
                .or(common::app(&guard, hub))
                .unify()
                .boxed();
            let (addr, serving) = guard.serve(routes).bind(([127, 0, 0, 1], 0)).await.unwrap();
            println!("listening on {addr}");
            let stdin_closed = tokio::task::spawn_blocking(|| {
                let mut line = String::new();
                while std::io::stdin().read_line(&mut line).is_ok_and(|n| n > 0) {}
            });
            tokio::select! {
                () = serving => {}
                _ = stdin_closed => {}
            }
        });
}

/// Ends the child whatever happens to the test.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
