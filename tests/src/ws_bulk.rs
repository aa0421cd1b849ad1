//! A WebSocket bulk transfer between two lab namespaces, for comparing how well connections
//! admitted in different ways carry data (`cargo xtask bench --cookies`).

use std::net::{IpAddr, SocketAddr, TcpListener};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context as _, Result};
use futures_util::{SinkExt as _, StreamExt as _};
use tokio_tungstenite::tungstenite::Message;

use crate::netns::Netns;

/// Binary messages of this size carry the transfer.
const MESSAGE: usize = 64 * 1024;

/// Sends `bytes` from `client_ns`, bound to `client_ip`, to `listener` (opened in its own
/// namespace) over one WebSocket, and returns the seconds from the connect to the server
/// having read the last byte.
pub fn transfer(
    listener: &TcpListener,
    client_ns: &Netns,
    client_ip: IpAddr,
    bytes: usize,
) -> Result<f64> {
    let to = listener.local_addr()?;
    let listener = listener.try_clone()?;
    listener.set_nonblocking(true)?;
    // The socket belongs to the namespace it is created in, wherever it is used later.
    let socket = client_ns.run_in(|| -> Result<tokio::net::TcpSocket> {
        let s = if client_ip.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        s.bind(SocketAddr::new(client_ip, 0))
            .with_context(|| format!("bind {client_ip}"))?;
        Ok(s)
    })??;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::from_std(listener)?;
        let start = Instant::now();
        let server = async {
            let (stream, _) = listener.accept().await?;
            let mut ws = tokio_tungstenite::accept_async(stream).await?;
            let mut got = 0usize;
            while got < bytes {
                match ws.next().await {
                    Some(Ok(Message::Binary(b))) => got += b.len(),
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return Err(anyhow::Error::from(e)),
                    None => break,
                }
            }
            Ok::<usize, anyhow::Error>(got)
        };
        let client = async {
            let stream = socket.connect(to).await.context("connect")?;
            let url = format!("ws://{to}/bulk");
            let (mut ws, _) = tokio_tungstenite::client_async(url, stream).await?;
            let chunk = tokio_tungstenite::tungstenite::Bytes::from(vec![0x5a; MESSAGE]);
            let mut sent = 0;
            while sent < bytes {
                ws.feed(Message::Binary(chunk.clone())).await?;
                sent += MESSAGE;
            }
            ws.flush().await?;
            Ok::<_, anyhow::Error>(ws)
        };
        let run = async { tokio::try_join!(server, client) };
        let (got, _ws) = tokio::time::timeout(Duration::from_secs(120), run)
            .await
            .context("the transfer did not finish in 120 s")??;
        ensure!(got >= bytes, "the server read {got} of {bytes} bytes");
        Ok(start.elapsed().as_secs_f64())
    })
}
