//! SSE subscribers, over the plain HTTP/1.1 GET the SSE storm uses too.

use std::cell::RefCell;
use std::io;
use std::net::IpAddr;
use std::time::Duration;

use anyhow::Result;
use guard_tests::report::SseReport;
use guard_tests::wire::{parse_response_head, ChunkedDecoder, ResponseHead, SseParser, Target};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

use crate::cli::SseArgs;
use crate::net::{all_clients, connect, lab_url, ErrorLog, HandshakeError, Stop};

/// An HTTP/1.1 GET over a fresh connection from `bind`; returns the response head and any body
/// bytes that arrived with it.
pub(crate) async fn http_get(
    bind: Option<IpAddr>,
    target: &Target,
    accept: &str,
    limit: Duration,
) -> Result<std::result::Result<(TcpStream, ResponseHead, Vec<u8>), HandshakeError>> {
    let mut stream = match connect(bind, target.addr, limit).await? {
        Ok(s) => s,
        Err(e) => return Ok(Err(e.into())),
    };
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nAccept: {accept}\r\nCache-Control: no-cache\r\n\
         User-Agent: guard-lab-client\r\n\r\n",
        target.path, target.host_header
    );
    let exchange = async {
        stream.write_all(request.as_bytes()).await?;
        let mut buf = Vec::with_capacity(4096);
        let mut chunk = [0u8; 4096];
        loop {
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "closed before a response",
                ));
            }
            buf.extend_from_slice(&chunk[..n]);
            match parse_response_head(&buf) {
                Ok(Some((head, body_at))) => return Ok((head, buf.split_off(body_at))),
                Ok(None) if buf.len() > 65_536 => {
                    return Err(io::Error::other("response head over 64 KiB"))
                }
                Ok(None) => {}
                Err(e) => return Err(io::Error::other(format!("{e:#}"))),
            }
        }
    };
    Ok(match timeout(limit, exchange).await {
        Err(_) => Err(HandshakeError::TimedOut),
        Ok(Err(e)) => Err(HandshakeError::Failed(e.to_string())),
        Ok(Ok((head, body))) => Ok((stream, head, body)),
    })
}

pub(crate) async fn sse(a: SseArgs, stop: &Stop) -> Result<SseReport> {
    let target = lab_url(&a.url, "http", a.crowd.src.bind)?;
    let limit = Duration::from_millis(a.timeout_ms);
    let r = RefCell::new(SseReport {
        cmd: "sse".into(),
        clients: a.crowd.clients,
        ..Default::default()
    });
    let errors = ErrorLog::new();
    let client = |_id: u64| {
        let (r, errors, target) = (&r, &errors, &target);
        async move {
            let mut subscribed_before = false;
            let mut backoff = Duration::from_millis(500);
            loop {
                let got = tokio::select! {
                    got = http_get(a.crowd.src.bind, target, "text/event-stream", limit) => got?,
                    _ = stop.wait() => break,
                };
                match got {
                    Ok((stream, head, body)) if head.status == 200 => {
                        {
                            let mut r = r.borrow_mut();
                            r.subscriptions += 1;
                            if subscribed_before {
                                r.reconnects += 1;
                            }
                        }
                        subscribed_before = true;
                        if let Some(ms) = read_events(stream, &head, body, stop, r, errors).await {
                            // Honour the server's retry hint, within reason.
                            backoff = Duration::from_millis(ms.clamp(100, 5_000));
                        }
                    }
                    Ok((_, head, _)) => {
                        *r.borrow_mut().rejected.entry(head.status).or_default() += 1;
                    }
                    Err(e) => match e.refusal("subscribe", errors) {
                        Some(code) => *r.borrow_mut().rejected.entry(code).or_default() += 1,
                        None => r.borrow_mut().errors += 1,
                    },
                }
                if !stop.pause(backoff).await {
                    break;
                }
            }
            anyhow::Ok(())
        }
    };
    all_clients(a.crowd.clients, client).await?;
    Ok(r.into_inner())
}

/// Reads one SSE stream until it ends or the run does; returns the server's retry hint.
async fn read_events(
    mut stream: TcpStream,
    head: &ResponseHead,
    first: Vec<u8>,
    stop: &Stop,
    r: &RefCell<SseReport>,
    errors: &ErrorLog,
) -> Option<u64> {
    let mut parser = SseParser::default();
    let mut chunked = head.chunked.then(ChunkedDecoder::default);
    let mut decoded = Vec::new();
    let mut feed = |bytes: &[u8], parser: &mut SseParser| -> Result<()> {
        let before = (parser.events, parser.comments);
        match chunked.as_mut() {
            Some(dec) => {
                decoded.clear();
                dec.feed(bytes, &mut decoded)?;
                parser.feed(&decoded)?;
            }
            None => parser.feed(bytes)?,
        }
        let mut r = r.borrow_mut();
        r.events += parser.events - before.0;
        r.comments += parser.comments - before.1;
        Ok(())
    };
    if let Err(e) = feed(&first, &mut parser) {
        errors.note("event stream", &e);
        r.borrow_mut().errors += 1;
        return parser.retry_ms;
    }
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        tokio::select! {
            n = stream.read(&mut buf) => match n {
                Ok(0) => break,
                Ok(n) => {
                    if let Err(e) = feed(&buf[..n], &mut parser) {
                        errors.note("event stream", &e);
                        r.borrow_mut().errors += 1;
                        break;
                    }
                }
                Err(e) => {
                    errors.note("event stream", &e);
                    r.borrow_mut().errors += 1;
                    break;
                }
            },
            _ = stop.wait() => break,
        }
    }
    parser.retry_ms
}
