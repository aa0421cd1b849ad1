//! WebSocket workloads: well-behaved chat clients and a single flooding one.

use std::cell::{Cell, RefCell};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use anyhow::Result;
use futures_util::stream::StreamExt;
use futures_util::SinkExt;
use guard_tests::report::{WsChatReport, WsFloodReport};
use guard_tests::wire::{parse_target_url, Pacer, Target};
use tokio::net::TcpStream;
use tokio::time::{timeout, MissedTickBehavior};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;

use crate::cli::{WsChatArgs, WsFloodArgs};
use crate::net::{all_clients, connect, lab_url, until_stopped, ErrorLog, HandshakeError, Stop};

/// TCP connect from `bind`, then the WebSocket handshake over that socket.
pub(crate) async fn ws_connect(
    bind: Option<IpAddr>,
    target: &Target,
    limit: Duration,
) -> Result<std::result::Result<WebSocketStream<TcpStream>, HandshakeError>> {
    let stream = match connect(bind, target.addr, limit).await? {
        Ok(s) => s,
        Err(e) => return Ok(Err(e.into())),
    };
    let url = format!("ws://{}{}", target.host_header, target.path);
    Ok(
        match timeout(limit, tokio_tungstenite::client_async(url, stream)).await {
            Err(_) => Err(HandshakeError::TimedOut),
            Ok(Ok((ws, _))) => Ok(ws),
            Ok(Err(WsError::Http(resp))) => Err(HandshakeError::Status(resp.status().as_u16())),
            Ok(Err(e)) => Err(HandshakeError::Failed(e.to_string())),
        },
    )
}

/// The normal close a client sends when the run ends.
fn goodbye() -> Message {
    Message::Close(Some(CloseFrame {
        code: CloseCode::Normal,
        reason: "lab-client done".into(),
    }))
}

/// The close code of a close frame; 1005 ("no status received") for a bare close.
fn close_code(frame: &Option<CloseFrame>) -> u16 {
    frame.as_ref().map_or(1005, |f| u16::from(f.code))
}

pub(crate) async fn ws_chat(a: WsChatArgs, stop: &Stop) -> Result<WsChatReport> {
    let target = lab_url(&a.url, "ws", a.crowd.src.bind)?;
    let limit = Duration::from_millis(a.timeout_ms);
    let r = RefCell::new(WsChatReport {
        cmd: "ws-chat".into(),
        clients: a.crowd.clients,
        ..Default::default()
    });
    let errors = ErrorLog::new();
    let period = Duration::from_micros(1_000_000 / a.rate);
    let (bind, message) = (a.crowd.src.bind, a.message.as_str());
    let client = |id: u64| {
        let (r, errors, target) = (&r, &errors, &target);
        async move {
            loop {
                let ws = tokio::select! {
                    ws = ws_connect(bind, target, limit) => ws?,
                    _ = stop.wait() => break,
                };
                match ws {
                    Ok(ws) => {
                        r.borrow_mut().connects += 1;
                        chat_session(id, ws, message, period, stop, r, errors).await;
                    }
                    Err(e) => match e.refusal("handshake", errors) {
                        Some(code) => *r.borrow_mut().rejected.entry(code).or_default() += 1,
                        None => r.borrow_mut().errors += 1,
                    },
                }
                // A legit client comes back after a pause, not in a tight loop.
                if !stop.pause(Duration::from_millis(500)).await {
                    break;
                }
            }
            anyhow::Ok(())
        }
    };
    all_clients(a.crowd.clients, client).await?;
    Ok(r.into_inner())
}

/// A chat message from `--message`: `{client}` and `{n}` filled in.
fn render_message(template: &str, client: u64, n: u64) -> String {
    template
        .replace("{client}", &client.to_string())
        .replace("{n}", &n.to_string())
}

/// One connected chat client: a message every `period`, counting what comes back, until the
/// server closes or the run ends (then a normal close, waiting briefly for the reply).
async fn chat_session(
    id: u64,
    ws: WebSocketStream<TcpStream>,
    template: &str,
    period: Duration,
    stop: &Stop,
    r: &RefCell<WsChatReport>,
    errors: &ErrorLog,
) {
    let (mut tx, mut rx) = ws.split();
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut n = 0u64;
    loop {
        tokio::select! {
            _ = tick.tick() => {
                n += 1;
                let text = render_message(template, id, n);
                match tx.send(Message::text(text)).await {
                    Ok(()) => r.borrow_mut().sent += 1,
                    Err(e) => {
                        errors.note("send", &e);
                        r.borrow_mut().errors += 1;
                        return;
                    }
                }
            }
            msg = rx.next() => match msg {
                Some(Ok(Message::Text(_) | Message::Binary(_))) => r.borrow_mut().received += 1,
                Some(Ok(Message::Close(frame))) => {
                    *r.borrow_mut().close_codes.entry(close_code(&frame)).or_default() += 1;
                    // Keep reading: tungstenite answers the close, then the stream ends.
                }
                Some(Ok(_)) => {}
                Some(Err(WsError::ConnectionClosed | WsError::AlreadyClosed)) | None => return,
                Some(Err(e)) => {
                    errors.note("receive", &e);
                    r.borrow_mut().errors += 1;
                    return;
                }
            },
            _ = stop.wait() => {
                if tx.send(goodbye()).await.is_ok() {
                    // Wait (bounded) for the server's close reply so it sees a clean close;
                    // replies to messages sent just before still count.
                    let _ = timeout(Duration::from_secs(1), async {
                        while let Some(Ok(msg)) = rx.next().await {
                            if matches!(msg, Message::Text(_) | Message::Binary(_)) {
                                r.borrow_mut().received += 1;
                            }
                        }
                    })
                    .await;
                }
                return;
            }
        }
    }
}

pub(crate) async fn ws_flood(a: WsFloodArgs, stop: &Stop) -> Result<WsFloodReport> {
    let target = parse_target_url(&a.url, &["ws"])?;
    let limit = Duration::from_millis(a.timeout_ms);
    let mut r = WsFloodReport {
        cmd: "ws-flood".into(),
        ..Default::default()
    };
    let ws = tokio::select! {
        ws = ws_connect(a.src.bind, &target, limit) => ws?,
        _ = stop.wait() => return Ok(r),
    };
    let ws = match ws {
        Ok(ws) => ws,
        Err(HandshakeError::Status(code)) => {
            r.handshake_status = Some(code);
            return Ok(r);
        }
        Err(HandshakeError::TimedOut) => {
            r.error = Some("handshake timed out".into());
            return Ok(r);
        }
        Err(HandshakeError::Failed(e)) => {
            r.error = Some(format!("handshake failed: {e}"));
            return Ok(r);
        }
    };
    r.connected = true;
    let (mut tx, mut rx) = ws.split();
    let sent = Cell::new(0u64);
    let payload = "x".repeat(a.size as usize);

    // The writer paces frames and hands the sink back when the run ends, so a normal close
    // can be sent; a send error (the server closed or reset) ends it early.
    let writer = async {
        let mut pacer = Pacer::new(a.rate, Instant::now());
        let mut tick = tokio::time::interval(pacer.tick());
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            if !until_stopped(stop, tick.tick()).await {
                return Ok(tx);
            }
            for _ in 0..pacer.due(Instant::now()) {
                tx.feed(Message::text(payload.as_str())).await?;
                sent.set(sent.get() + 1);
            }
            // Under backpressure flush blocks; the run's end must still win.
            if !until_stopped(stop, tx.flush()).await {
                return Ok(tx);
            }
        }
    };
    let mut close: Option<CloseFrame> = None;
    let mut got_close = false;
    let mut received = 0u64;
    let mut read_error: Option<String> = None;
    let reader = async {
        while let Some(msg) = rx.next().await {
            match msg {
                Ok(Message::Text(_) | Message::Binary(_)) => received += 1,
                Ok(Message::Close(frame)) => {
                    got_close = true;
                    close = frame;
                }
                Ok(_) => {}
                Err(WsError::ConnectionClosed | WsError::AlreadyClosed) => break,
                Err(e) => {
                    read_error = Some(e.to_string());
                    break;
                }
            }
        }
    };
    tokio::pin!(writer, reader);
    tokio::select! {
        () = &mut reader => {}
        w = &mut writer => {
            match w {
                Ok(mut tx) => {
                    let _ = timeout(Duration::from_secs(1), tx.send(goodbye())).await;
                }
                Err(e) => {
                    let e: WsError = e;
                    if !matches!(e, WsError::ConnectionClosed | WsError::AlreadyClosed) {
                        r.error = Some(format!("send: {e}"));
                    }
                }
            }
            // Collect the server's close frame (or reset) after our last write, bounded.
            let _ = timeout(Duration::from_secs(2), &mut reader).await;
        }
    }
    r.sent = sent.get();
    r.received = received;
    if got_close {
        r.close_code = Some(close_code(&close));
        r.close_reason = close
            .map(|f| f.reason.to_string())
            .filter(|s| !s.is_empty());
    }
    if r.error.is_none() {
        r.error = read_error;
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_templates() {
        assert_eq!(
            render_message(r#"{"text":"hi {n}","from":{client}}"#, 3, 7),
            r#"{"text":"hi 7","from":3}"#
        );
        assert_eq!(render_message("plain", 1, 1), "plain");
    }
}
