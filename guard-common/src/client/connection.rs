//! One request/response session with the agent, and the errors that say
//! what to check when talking to it fails.

use std::io;
use std::path::{Path, PathBuf};
use std::string::{String, ToString};
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use crate::proto::{
    cap_str, ErrorCode, FrameDecoder, Message, ProtoError, Request, Response, MAX_NAME_LEN,
    PROTO_VERSION,
};

/// What went wrong talking to the agent, phrased as what to check.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "no agent listening at {}: is `guard run` running? ({source})",
        .path.display()
    )]
    NoAgent { path: PathBuf, source: io::Error },
    #[error(
        "permission denied opening {}: your uid/gid is not allowed on the agent's control \
         socket (run as root or as a member of the socket's group)",
        .path.display()
    )]
    PermissionDenied { path: PathBuf, source: io::Error },
    #[error("connecting to the agent at {} failed: {source}", .path.display())]
    Connect { path: PathBuf, source: io::Error },
    #[error("the agent at {} closed the connection{}", .path.display(), closed_hint(*.during_handshake))]
    Closed {
        path: PathBuf,
        during_handshake: bool,
    },
    #[error(
        "talking to the agent at {} failed: {source}; it may have restarted, try again",
        .path.display()
    )]
    Io { path: PathBuf, source: io::Error },
    #[error(
        "the agent at {} did not answer within {timeout:?}; it may be overloaded or stuck \
         (see its log)",
        .path.display()
    )]
    Timeout { path: PathBuf, timeout: Duration },
    #[error(
        "the agent at {} sent a malformed frame: {source}; are the agent and this client the \
         same version?",
        .path.display()
    )]
    Protocol { path: PathBuf, source: ProtoError },
    #[error(
        "the agent at {} answered with an unexpected `{got}` message; are the agent and this \
         client the same version?",
        .path.display()
    )]
    Unexpected { path: PathBuf, got: &'static str },
    #[error(
        "the agent at {} speaks protocol version {agent}, this client speaks {PROTO_VERSION}: \
         upgrade the older side",
        .path.display()
    )]
    VersionMismatch { path: PathBuf, agent: u16 },
    #[error("the agent refused the request ({code}): {message}")]
    Agent { code: ErrorCode, message: String },
    #[error("cannot encode the request: {0}")]
    Encode(ProtoError),
    #[error(
        "the connection to {} is unusable after an earlier failure; connect again",
        .path.display()
    )]
    Broken { path: PathBuf },
    #[error("AgentClient::spawn needs a tokio runtime; call it from within one")]
    NoRuntime,
}

fn closed_hint(during_handshake: bool) -> &'static str {
    if during_handshake {
        " during the handshake: your uid/gid is probably not allowed on the control socket, \
         or the agent is at its connection limit (see the agent's log)"
    } else {
        "; it may have restarted, try again"
    }
}

/// A request/response session with the agent.
pub struct Connection {
    stream: UnixStream,
    decoder: FrameDecoder,
    out: BytesMut,
    path: PathBuf,
    timeout: Duration,
    agent_version: String,
    /// A call failed part-way; the stream may hold a late answer, so the
    /// next call could read the wrong one.
    broken: bool,
}

impl Connection {
    /// Connects and shakes hands, allowing 2 s for each step.
    pub async fn connect(
        path: impl AsRef<Path>,
        client_name: &str,
    ) -> Result<Connection, ClientError> {
        Self::connect_with_timeout(path, client_name, Duration::from_secs(2)).await
    }

    /// Connects and shakes hands; `timeout` also applies to every later
    /// [`Connection::call`].
    pub async fn connect_with_timeout(
        path: impl AsRef<Path>,
        client_name: &str,
        timeout: Duration,
    ) -> Result<Connection, ClientError> {
        let path = path.as_ref().to_path_buf();
        let stream = match tokio::time::timeout(timeout, UnixStream::connect(&path)).await {
            Err(_) => return Err(ClientError::Timeout { path, timeout }),
            Ok(Err(source)) => {
                return Err(match source.kind() {
                    io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => {
                        ClientError::NoAgent { path, source }
                    }
                    io::ErrorKind::PermissionDenied => {
                        ClientError::PermissionDenied { path, source }
                    }
                    _ => ClientError::Connect { path, source },
                })
            }
            Ok(Ok(s)) => s,
        };
        let mut conn = Connection {
            stream,
            decoder: FrameDecoder::new(),
            out: BytesMut::new(),
            path,
            timeout,
            agent_version: String::new(),
            broken: false,
        };
        let hello = Request::Hello {
            version: PROTO_VERSION,
            client_name: cap_str(client_name, MAX_NAME_LEN).to_string(),
        };
        match conn.exchange(hello, true).await? {
            Response::HelloOk {
                version,
                agent_version,
            } => {
                if version != PROTO_VERSION {
                    return Err(ClientError::VersionMismatch {
                        path: conn.path,
                        agent: version,
                    });
                }
                conn.agent_version = agent_version;
                Ok(conn)
            }
            other => Err(ClientError::Unexpected {
                path: conn.path,
                got: other.name(),
            }),
        }
    }

    /// The agent's version string from the handshake.
    pub fn agent_version(&self) -> &str {
        &self.agent_version
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// Sends one request and returns its answer. An `Error` answer comes
    /// back as [`ClientError::Agent`] and leaves the connection usable; any
    /// other failure leaves it [`ClientError::Broken`].
    pub async fn call(&mut self, req: Request) -> Result<Response, ClientError> {
        self.exchange(req, false).await
    }

    async fn exchange(&mut self, req: Request, handshake: bool) -> Result<Response, ClientError> {
        if self.broken {
            return Err(ClientError::Broken {
                path: self.path.clone(),
            });
        }
        self.out.clear();
        req.encode(&mut self.out).map_err(ClientError::Encode)?;
        let timeout = self.timeout;
        let result = match tokio::time::timeout(timeout, self.send_and_read(handshake)).await {
            Ok(r) => r,
            Err(_) => Err(ClientError::Timeout {
                path: self.path.clone(),
                timeout,
            }),
        };
        match result {
            Ok(Response::Error { code, message }) => Err(ClientError::Agent { code, message }),
            Ok(r) => Ok(r),
            Err(e) => {
                self.broken = true;
                Err(e)
            }
        }
    }

    async fn send_and_read(&mut self, handshake: bool) -> Result<Response, ClientError> {
        if let Err(source) = self.stream.write_all(&self.out).await {
            return Err(self.io_error(source, handshake));
        }
        let mut buf = [0u8; 4096];
        loop {
            match self.decoder.decode() {
                Ok(Some(Message::Response(r))) => return Ok(r),
                Ok(Some(Message::Request(r))) => {
                    return Err(ClientError::Unexpected {
                        path: self.path.clone(),
                        got: r.name(),
                    })
                }
                Ok(None) => {}
                Err(source) => {
                    return Err(ClientError::Protocol {
                        path: self.path.clone(),
                        source,
                    })
                }
            }
            match self.stream.read(&mut buf).await {
                Ok(0) => {
                    return Err(ClientError::Closed {
                        path: self.path.clone(),
                        during_handshake: handshake,
                    })
                }
                Ok(n) => self.decoder.feed(&buf[..n]),
                Err(source) => return Err(self.io_error(source, handshake)),
            }
        }
    }

    fn io_error(&self, source: io::Error, handshake: bool) -> ClientError {
        // A peer the agent refused is closed before it reads a byte, so the
        // handshake can fail on the write as well as on the read.
        if matches!(
            source.kind(),
            io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
        ) {
            return ClientError::Closed {
                path: self.path.clone(),
                during_handshake: handshake,
            };
        }
        ClientError::Io {
            path: self.path.clone(),
            source,
        }
    }

    /// Resolves when the agent closes an idle session (or sends something
    /// unasked, which this protocol never does). Cancel-safe: nothing is
    /// lost if a report arrives first and this is dropped.
    pub(super) async fn wait_for_close(&mut self) -> ClientError {
        let mut buf = [0u8; 64];
        let read = self.stream.read(&mut buf).await;
        self.broken = true;
        match read {
            Ok(0) => ClientError::Closed {
                path: self.path.clone(),
                during_handshake: false,
            },
            Ok(_) => ClientError::Unexpected {
                path: self.path.clone(),
                got: "unsolicited",
            },
            Err(source) => self.io_error(source, false),
        }
    }
}
