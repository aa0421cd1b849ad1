//! One connection: framing with timeouts, turns for heavy reads, dispatch to the handler.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use guard_common::proto::{
    cap_str, newest_history_lines, BytesMut, ErrorCode, FrameDecoder, Message, ProtoError, Request,
    Response, MAX_LIST_ENTRIES, PROTO_VERSION,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::Semaphore;

use super::*;

pub(super) struct Limits {
    pub(super) handshake_timeout: Duration,
    pub(super) frame_timeout: Duration,
    pub(super) idle_timeout: Option<Duration>,
    pub(super) agent_version: String,
    /// One turn for the requests that walk a whole table or file
    /// (`list_blocks`, `history`): however many sessions ask at once, the
    /// agent does that work once at a time.
    pub(super) reads: Semaphore,
}

/// Whether `req` walks a whole table or file, and so waits its turn.
pub(super) fn is_heavy(req: &Request) -> bool {
    matches!(req, Request::ListBlocks { .. } | Request::History { .. })
}

/// Counts a task as waiting for as long as it holds this.
pub(super) struct Waiting<'a>(&'a AtomicU64);

impl<'a> Waiting<'a> {
    fn new(gauge: &'a AtomicU64) -> Self {
        gauge.fetch_add(1, Ordering::Relaxed);
        Self(gauge)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Why reading a frame stopped.
pub(super) enum ReadEnd {
    /// The client closed (or reset) the connection.
    Closed,
    /// A frame, once started, did not complete in time.
    TimedOut,
    /// No frame started within the idle timeout.
    Idle,
    Malformed(ProtoError),
}

pub(super) struct Session {
    stream: UnixStream,
    decoder: FrameDecoder,
    out: BytesMut,
    stats: Arc<ControlStats>,
    frame_timeout: Duration,
}

impl Session {
    /// The next message. `idle` bounds the wait for a frame to start; once
    /// it has, the rest must come within the frame timeout.
    async fn read(&mut self, idle: Option<Duration>) -> Result<Message, ReadEnd> {
        let mut buf = [0u8; 4096];
        let mut frame_started = (self.decoder.buffered() > 0).then(Instant::now);
        loop {
            match self.decoder.decode() {
                Ok(Some(msg)) => return Ok(msg),
                Ok(None) => {}
                Err(e) => return Err(ReadEnd::Malformed(e)),
            }
            let wait = match frame_started {
                Some(t) => Some(self.frame_timeout.saturating_sub(t.elapsed())),
                None => idle,
            };
            let read = self.stream.read(&mut buf);
            let n = match wait {
                Some(wait) => match tokio::time::timeout(wait, read).await {
                    Ok(r) => r,
                    Err(_) if frame_started.is_none() => return Err(ReadEnd::Idle),
                    Err(_) => return Err(ReadEnd::TimedOut),
                },
                None => read.await,
            };
            match n {
                Ok(0) | Err(_) => return Err(ReadEnd::Closed),
                Ok(n) => {
                    self.decoder.feed(&buf[..n]);
                    frame_started.get_or_insert_with(Instant::now);
                }
            }
        }
    }

    /// Sends a reply; false if the connection should close.
    async fn write(&mut self, resp: &Response) -> bool {
        self.out.clear();
        if let Err(e) = resp.encode(&mut self.out) {
            log::error!("cannot encode a {} control reply: {e}", resp.name());
            self.out.clear();
            let fallback = Response::error(
                ErrorCode::Internal,
                format!("the agent could not encode its {} reply: {e}", resp.name()),
            );
            if fallback.encode(&mut self.out).is_err() {
                return false;
            }
        }
        match tokio::time::timeout(self.frame_timeout, self.stream.write_all(&self.out)).await {
            Ok(Ok(())) => true,
            Ok(Err(_)) => false,
            Err(_) => {
                ControlStats::bump(&self.stats.timeouts);
                false
            }
        }
    }

    /// Handles a read failure: a malformed frame is answered before
    /// closing, so the client learns why.
    async fn fail(&mut self, end: ReadEnd, peer: &PeerInfo) {
        match end {
            ReadEnd::Closed => {}
            ReadEnd::TimedOut => {
                ControlStats::bump(&self.stats.timeouts);
                log::debug!("control client {peer:?} too slow; dropped");
            }
            ReadEnd::Idle => {
                ControlStats::bump(&self.stats.idle_closed);
                log::debug!("control client {peer:?} idle; closed");
            }
            ReadEnd::Malformed(e) => {
                ControlStats::bump(&self.stats.bad_frames);
                log::debug!("control client {peer:?} sent a bad frame: {e}");
                self.write(&Response::error(e.code(), e.to_string())).await;
            }
        }
    }

    /// Rejects a message that is well-formed but out of place, then the
    /// connection closes.
    async fn unexpected(&mut self, what: &str) {
        ControlStats::bump(&self.stats.bad_frames);
        self.write(&Response::error(ErrorCode::Unexpected, what))
            .await;
    }
}

/// Decrements the active-connection gauge however the task ends.
pub(super) struct Active(Arc<ControlStats>);

impl Active {
    fn new(stats: Arc<ControlStats>) -> Self {
        stats.active.fetch_add(1, Ordering::Relaxed);
        Self(stats)
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

pub(super) async fn connection(
    stream: UnixStream,
    mut peer: PeerInfo,
    handler: Arc<dyn ControlHandler>,
    policy: Policy,
    limits: Arc<Limits>,
    stats: Arc<ControlStats>,
    _permit: SlotPermit,
) {
    let _active = Active::new(stats.clone());
    let mut s = Session {
        stream,
        decoder: FrameDecoder::new(),
        out: BytesMut::new(),
        stats: stats.clone(),
        frame_timeout: limits.frame_timeout,
    };

    let hello = match tokio::time::timeout(limits.handshake_timeout, s.read(None)).await {
        Err(_) => Err(ReadEnd::TimedOut),
        Ok(r) => r,
    };
    let hello_kind = Request::Hello {
        version: 0,
        client_name: String::new(),
    }
    .kind_index();
    match hello {
        Err(end) => return s.fail(end, &peer).await,
        Ok(Message::Request(Request::Hello {
            version,
            client_name,
        })) => {
            if version != PROTO_VERSION {
                ControlStats::bump(&stats.handshake_failed);
                let reply = Response::error(
                    ErrorCode::BadVersion,
                    format!(
                        "this agent speaks control protocol version {PROTO_VERSION}, the client \
                         {version}: upgrade the older side"
                    ),
                );
                stats.count_request(hello_kind, &reply);
                s.write(&reply).await;
                return;
            }
            peer.client_name = client_name;
            let reply = Response::HelloOk {
                version: PROTO_VERSION,
                agent_version: limits.agent_version.clone(),
            };
            stats.count_request(hello_kind, &reply);
            if !s.write(&reply).await {
                return;
            }
            log::debug!("control client {peer:?} connected");
        }
        Ok(_) => {
            return s
                .unexpected("the first message on the control socket must be hello")
                .await
        }
    }

    let mut refused_before = false;
    loop {
        let req = match s.read(limits.idle_timeout).await {
            Err(end) => return s.fail(end, &peer).await,
            Ok(Message::Request(Request::Hello { .. })) => {
                return s.unexpected("hello was already exchanged").await
            }
            Ok(Message::Response(r)) => {
                return s
                    .unexpected(&format!(
                        "the agent takes requests, not a `{}` reply",
                        r.name()
                    ))
                    .await
            }
            Ok(Message::Request(req)) => req,
        };
        let kind = req.kind_index();
        let name = req.name();
        log::debug!("control request {name} from {peer:?}");
        if let Err(reply) = authorize(&peer, &req, &policy) {
            ControlStats::bump(&stats.not_permitted);
            // Once per session: a compromised client retrying in a loop
            // shows in the counter, not in a flood of log lines.
            if !refused_before {
                refused_before = true;
                log::warn!(
                    "control client {:?} (uid {}, {}) may not {name}: {}",
                    peer.client_name,
                    peer.uid,
                    peer.role.name(),
                    match &reply {
                        Response::Error { message, .. } => message.as_str(),
                        _ => "",
                    }
                );
            }
            stats.count_request(kind, &reply);
            if !s.write(&reply).await {
                return;
            }
            continue;
        }
        // At most a page of history, and none is no work at all.
        let (req, history_limit) = match req {
            Request::History {
                since_unix_secs,
                prefix,
                limit,
            } => {
                let limit = limit.min(MAX_LIST_ENTRIES);
                let req = Request::History {
                    since_unix_secs,
                    prefix,
                    limit,
                };
                (req, Some(limit as usize))
            }
            other => (other, None),
        };
        if history_limit == Some(0) {
            let reply = Response::History { lines: Vec::new() };
            stats.count_request(kind, &reply);
            if !s.write(&reply).await {
                return;
            }
            continue;
        }
        let turn = if is_heavy(&req) {
            let _waiting = Waiting::new(&stats.reads_waiting);
            // Never closed, so acquiring cannot fail.
            Some(
                limits
                    .reads
                    .acquire()
                    .await
                    .expect("the reads semaphore stays open"),
            )
        } else {
            None
        };
        let h = handler.clone();
        let p = peer.clone();
        let reply = match tokio::task::spawn_blocking(move || h.handle(&p, req)).await {
            Ok(reply) => reply,
            Err(e) => {
                ControlStats::bump(&stats.handler_panics);
                log::error!("control handler failed on a {name} request: {e}");
                Response::error(
                    ErrorCode::Internal,
                    format!("the agent failed handling this {name} request; see its log"),
                )
            }
        };
        drop(turn);
        let reply = match reply {
            // A handler's message is free text; keep the reply encodable.
            Response::Error { code, message } if message.len() > 4096 => Response::Error {
                code,
                message: cap_str(&message, 4096).to_string(),
            },
            // No more than asked for, and what one frame can carry.
            Response::History { lines } => Response::History {
                lines: newest_history_lines(lines, history_limit.unwrap_or(0)),
            },
            other => other,
        };
        stats.count_request(kind, &reply);
        if !s.write(&reply).await {
            return;
        }
    }
}
