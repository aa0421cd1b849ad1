//! What the client's unit tests and the warp side's integration tests share: a fake agent
//! speaking the real codec over a real Unix socket, a temp directory for its socket, and a
//! bounded wait. Built for this crate's tests and, with the `test-support` feature, for other
//! crates' tests; never part of a release build.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::string::String;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use std::vec::Vec;
use std::{format, vec};

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;
use tokio::task::{JoinHandle, JoinSet};

use crate::proto::{
    BlockOutcome, BlockRequest, ErrorCode, FrameDecoder, Message, Request, Response, PROTO_VERSION,
};

/// Bound on waits for what should take milliseconds; only a broken client or guard runs
/// into it (it fails the test, it measures nothing).
pub const PATIENCE: Duration = Duration::from_secs(20);

/// `fut`, or a panic naming `what` after [`PATIENCE`].
pub async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(PATIENCE, fut)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what} ({PATIENCE:?})"))
}

/// Polls `cond` every 2 ms until it holds, or panics naming `what` after [`PATIENCE`].
pub async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    within(what, async {
        while !cond() {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    })
    .await
}

/// A fresh directory under the system temp dir, removed on drop ([`tempfile::TempDir`]),
/// named after `tag` so a leftover one says which test made it; kept as a type of its own
/// for the control-socket path and file writing that tests of three crates share.
pub struct TestDir(tempfile::TempDir);

impl TestDir {
    pub fn new(tag: &str) -> Self {
        let dir = tempfile::Builder::new()
            .prefix(&format!("guard-{tag}-"))
            .tempdir()
            .expect("create a test directory");
        Self(dir)
    }

    pub fn path(&self) -> &Path {
        self.0.path()
    }

    /// Where a control socket goes in it.
    pub fn sock(&self) -> PathBuf {
        self.path().join("control.sock")
    }

    /// Writes `content` at `relative`, creating its folders.
    pub fn write(&self, relative: &str, content: &str) {
        let p = self.path().join(relative);
        std::fs::create_dir_all(p.parent().expect("a file path")).expect("create folders");
        std::fs::write(p, content).expect("write a test file");
    }
}

/// How the fake agent behaves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Answers every request.
    Answer,
    /// Accepts connections and holds them without reading a byte.
    NeverRead,
    /// Closes every connection as soon as it is accepted.
    CloseAtOnce,
    /// Answers the handshake, then reads requests but never answers.
    StallAfterHello,
    /// Answers the handshake with another protocol version.
    WrongVersion,
    /// Closes the first session once its handshake is answered, as an agent does with an
    /// idle session; answers every later one.
    CloseFirstAfterHello,
}

/// What the fake agent saw.
#[derive(Debug, PartialEq)]
pub enum Event {
    Hello(String),
    Request(Request),
    Closed,
}

/// An agent stand-in speaking the real codec over a real Unix socket.
pub struct FakeAgent {
    task: JoinHandle<()>,
    events: mpsc::UnboundedReceiver<Event>,
    accepted: Arc<AtomicUsize>,
}

impl FakeAgent {
    /// Listens at `path` (replacing a socket file an earlier fake left there).
    pub fn start(path: &Path, mode: Mode) -> Self {
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path).expect("bind the fake agent's socket");
        let (tx, events) = mpsc::unbounded_channel();
        let accepted = Arc::new(AtomicUsize::new(0));
        let counter = accepted.clone();
        let task = tokio::spawn(async move {
            // Dropping the set (when this task is aborted) closes every connection, as an
            // agent exiting would.
            let mut conns = JoinSet::new();
            let mut held = Vec::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let earlier = counter.fetch_add(1, Ordering::Relaxed);
                let mode = match mode {
                    Mode::CloseFirstAfterHello if earlier > 0 => Mode::Answer,
                    other => other,
                };
                match mode {
                    Mode::NeverRead => held.push(stream),
                    Mode::CloseAtOnce => drop(stream),
                    _ => {
                        conns.spawn(serve_fake(stream, mode, tx.clone()));
                    }
                }
            }
        });
        Self {
            task,
            events,
            accepted,
        }
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::Relaxed)
    }

    /// The live count of accepted connections, to watch while the agent is borrowed.
    pub fn accepted_counter(&self) -> Arc<AtomicUsize> {
        self.accepted.clone()
    }

    /// Stops listening and closes every connection.
    pub async fn stop(self) {
        self.task.abort();
        let _ = self.task.await;
    }

    pub async fn next_event(&mut self) -> Event {
        match tokio::time::timeout(PATIENCE, self.events.recv()).await {
            Ok(Some(e)) => e,
            Ok(None) => panic!("the fake agent stopped"),
            Err(_) => panic!("the fake agent saw nothing within {PATIENCE:?}"),
        }
    }

    /// The next request, skipping handshakes and closes.
    pub async fn next_request(&mut self) -> Request {
        loop {
            match self.next_event().await {
                Event::Request(r) => return r,
                Event::Hello(_) | Event::Closed => {}
            }
        }
    }

    /// The next block report; any other request in between fails the test.
    pub async fn next_block(&mut self) -> BlockRequest {
        match self.next_request().await {
            Request::Block(block) => block,
            other => panic!("expected a block report, got {other:?}"),
        }
    }
}

async fn serve_fake(mut stream: UnixStream, mode: Mode, tx: mpsc::UnboundedSender<Event>) {
    let mut dec = FrameDecoder::new();
    let mut buf = [0u8; 1024];
    loop {
        let msg = match dec.decode() {
            Ok(Some(Message::Request(r))) => r,
            Ok(Some(Message::Response(_))) | Err(_) => break,
            Ok(None) => match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    dec.feed(&buf[..n]);
                    continue;
                }
            },
        };
        let hello = matches!(msg, Request::Hello { .. });
        let answer = match msg {
            Request::Hello { client_name, .. } => {
                let _ = tx.send(Event::Hello(client_name));
                Some(Response::HelloOk {
                    version: if mode == Mode::WrongVersion {
                        PROTO_VERSION + 1
                    } else {
                        PROTO_VERSION
                    },
                    agent_version: "fake-1".into(),
                })
            }
            other => {
                let answer = match &other {
                    _ if mode == Mode::StallAfterHello => None,
                    Request::Block(block) => Some(Response::BlockResult {
                        outcome: BlockOutcome::Added,
                        reason_text: "blocked".into(),
                        expires_in_secs: block.ttl_secs,
                    }),
                    Request::Stats => Some(Response::Stats {
                        counters: vec![("packets".into(), 7)],
                    }),
                    Request::Unblock { .. } => {
                        Some(Response::error(ErrorCode::NotFound, "not blocked"))
                    }
                    Request::ListAllows => None,
                    _ => Some(Response::Ok),
                };
                let _ = tx.send(Event::Request(other));
                answer
            }
        };
        if let Some(answer) = answer {
            let mut out = BytesMut::new();
            answer.encode(&mut out).expect("encode an answer");
            if stream.write_all(&out).await.is_err() {
                break;
            }
        }
        if hello && mode == Mode::CloseFirstAfterHello {
            break;
        }
    }
    let _ = tx.send(Event::Closed);
}
