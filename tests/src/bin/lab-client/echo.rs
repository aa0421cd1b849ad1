//! `serve-echo`: a TCP echo server with a real listen backlog, for lab plumbing tests.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use guard_tests::report::EchoReport;
use tokio::net::TcpSocket;
use tokio::time::sleep;

use crate::cli::EchoArgs;
use crate::net::Stop;

pub(crate) async fn serve_echo(a: EchoArgs, stop: &Stop) -> Result<EchoReport> {
    let sock = if a.listen.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .context("cannot create a TCP socket")?;
    sock.set_reuseaddr(true).context("SO_REUSEADDR")?;
    sock.bind(a.listen)
        .with_context(|| format!("cannot bind {}", a.listen))?;
    let listener = sock
        .listen(a.backlog)
        .with_context(|| format!("cannot listen on {}", a.listen))?;
    // The readiness line ChildGuard::wait_for_stderr looks for.
    eprintln!("listening on {}", listener.local_addr()?);
    let accepted = Arc::new(AtomicU64::new(0));
    let echoed = Arc::new(AtomicU64::new(0));
    loop {
        let conn = tokio::select! {
            conn = listener.accept() => conn,
            _ = stop.wait() => break,
        };
        match conn {
            Ok((stream, _)) => {
                accepted.fetch_add(1, Ordering::Relaxed);
                let echoed = Arc::clone(&echoed);
                tokio::spawn(async move {
                    let (mut rd, mut wr) = stream.into_split();
                    if let Ok(n) = tokio::io::copy(&mut rd, &mut wr).await {
                        echoed.fetch_add(n, Ordering::Relaxed);
                    }
                });
            }
            // EMFILE and friends: keep serving, but do not spin.
            Err(e) => {
                eprintln!("lab-client: accept: {e}");
                sleep(Duration::from_millis(10)).await;
            }
        }
    }
    Ok(EchoReport {
        cmd: "serve-echo".into(),
        accepted: accepted.load(Ordering::Relaxed),
        bytes_echoed: echoed.load(Ordering::Relaxed),
        elapsed_ms: 0,
    })
}
