//! A control-socket client running as another uid (python3 under `setpriv`), for what a
//! reporter that is not an operator — a compromised app — can do: the agent tells roles
//! apart by the peer's credentials, so the test must really connect as that uid. The frames
//! are encoded here and only carried by the script.

use std::io::Write as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use guard_common::proto::{decode_frame, BytesMut, Message, Request, Response, PROTO_VERSION};

use crate::process::ChildGuard;
use crate::tools::TempDir;

/// The uid the reproductions ran as.
pub const NOBODY: u32 = 65534;

/// The distribution's interpreter: root's PATH may lead to one under /root (pyenv), which
/// another uid may not run.
const SYSTEM_PYTHON: &str = "/usr/bin/python3";

/// Sends frames and reads replies, one after the other; or opens sessions and holds them.
const CLIENT: &str = r#"
import socket, struct, sys, time

def frame(s):
    head = b""
    while len(head) < 4:
        chunk = s.recv(4 - len(head))
        if not chunk:
            return None
        head += chunk
    (n,) = struct.unpack(">I", head)
    body = b""
    while len(body) < n:
        chunk = s.recv(n - len(body))
        if not chunk:
            return None
        body += chunk
    return head + body

def connect(path, hello):
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(30)
    s.connect(path)
    try:
        s.sendall(hello)
    except OSError:
        pass  # turned away at once: the reply is still there to read
    return s

mode, path, hello = sys.argv[1], sys.argv[2], bytes.fromhex(sys.argv[3])
if mode == "frames":
    data = open(sys.argv[4], "rb").read()
    s = connect(path, hello)
    out = sys.stdout.buffer
    reply = frame(s)
    if reply is None:
        sys.exit("closed before hello was answered")
    out.write(reply)
    i = 0
    while i < len(data):
        (n,) = struct.unpack(">I", data[i:i + 4])
        s.sendall(data[i:i + 4 + n])
        i += 4 + n
        reply = frame(s)
        if reply is None:
            break
        out.write(reply)
    out.flush()
else:
    count, hold = int(sys.argv[4]), float(sys.argv[5])
    held = []
    for _ in range(count):
        s = connect(path, hello)
        reply = frame(s)
        print("reply", reply.hex() if reply else "", file=sys.stderr, flush=True)
        held.append(s)
    print("held", file=sys.stderr, flush=True)
    time.sleep(hold)
"#;

fn encode(req: &Request) -> Result<Vec<u8>> {
    let mut b = BytesMut::new();
    req.encode(&mut b)
        .map_err(|e| anyhow::anyhow!("encode {}: {e}", req.name()))?;
    Ok(b.to_vec())
}

fn hello_hex() -> Result<String> {
    let hello = encode(&Request::Hello {
        version: PROTO_VERSION,
        client_name: "hostile-reporter".into(),
    })?;
    Ok(hello.iter().map(|b| format!("{b:02x}")).collect())
}

fn decode_all(mut bytes: &[u8]) -> Result<Vec<Response>> {
    let mut out = Vec::new();
    while !bytes.is_empty() {
        match decode_frame(bytes) {
            Ok(Some((Message::Response(r), used))) => {
                out.push(r);
                bytes = &bytes[used..];
            }
            other => bail!("not a response frame: {other:?}"),
        }
    }
    Ok(out)
}

fn client_as(uid: u32) -> Command {
    let mut cmd = Command::new("timeout");
    cmd.args(["-s", "KILL", "600", "setpriv"])
        .arg(format!("--reuid={uid}"))
        .arg(format!("--regid={uid}"))
        .args(["--clear-groups", SYSTEM_PYTHON, "-c", CLIENT]);
    cmd
}

/// The socket, opened to every uid (the agent's own check must still decide).
fn open_socket(socket: &Path) -> Result<()> {
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o666))
        .with_context(|| format!("chmod {}", socket.display()))
}

/// Sends `requests` as `uid` on one session, each once the previous one was answered, and
/// returns the replies (the first is the agent's answer to `hello`).
pub fn requests_as(uid: u32, socket: &Path, requests: &[Request]) -> Result<Vec<Response>> {
    open_socket(socket)?;
    let dir = TempDir::new("reporter")?;
    let frames = dir.path().join("frames");
    let mut file = std::fs::File::create(&frames)?;
    for r in requests {
        file.write_all(&encode(r)?)?;
    }
    drop(file);
    std::fs::set_permissions(&frames, std::fs::Permissions::from_mode(0o644))?;
    let out = client_as(uid)
        .arg("frames")
        .arg(socket)
        .arg(hello_hex()?)
        .arg(&frames)
        .output()
        .context("run python3 as the reporter")?;
    ensure!(
        out.status.success(),
        "the reporter's client failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    decode_all(&out.stdout)
}

/// Sessions a uid opened and keeps open until this drops (or `hold` passes).
pub struct HeldSessions {
    child: ChildGuard,
    /// The agent's first reply on each: `HelloOk`, or the error it closed with.
    pub replies: Vec<Response>,
}

impl HeldSessions {
    /// Opens `count` sessions as `uid`, one after the other, each with its `hello` sent.
    pub fn open(uid: u32, socket: &Path, count: usize, hold: Duration) -> Result<Self> {
        open_socket(socket)?;
        let mut cmd = client_as(uid);
        cmd.arg("sessions")
            .arg(socket)
            .arg(hello_hex()?)
            .arg(count.to_string())
            .arg(hold.as_secs().to_string());
        let mut child = ChildGuard::spawn("the reporter's sessions", &mut cmd)?;
        child.wait_for_stderr("held", Duration::from_secs(120))?;
        let mut replies = Vec::new();
        for line in child.stderr_so_far().lines() {
            let Some(hex) = line.strip_prefix("reply ") else {
                continue;
            };
            let bytes = (0..hex.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&hex[i..i + 2], 16))
                .collect::<Result<Vec<u8>, _>>()
                .context("the client's hex")?;
            let mut frames = decode_all(&bytes)?;
            ensure!(frames.len() == 1, "one reply per session: {frames:?}");
            replies.push(frames.remove(0));
        }
        ensure!(
            replies.len() == count,
            "{} replies for {count} sessions",
            replies.len()
        );
        Ok(Self { child, replies })
    }

    /// Closes every session.
    pub fn close(self) -> Result<()> {
        self.child.stop().map(drop)
    }
}
