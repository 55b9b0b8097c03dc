//! The ceiling baseline: a minimal WebSocket broadcast server with no auth, no policy and no
//! broker — what this machine and this WebSocket stack (tokio + tungstenite) can do at best.
//!
//! A connection whose first frame is `S` is a subscriber (the server answers `K`); any other
//! frame is a message, sent as is to every subscriber. Each message is one `Bytes` shared by
//! all subscribers (a tokio broadcast channel), and a subscriber's writes are batched: feed
//! everything that is ready, flush once — the same shape as cuttle's session writer.
//!
//! It runs as a child process (`cuttle-bench serve-broadcast`) so that its memory and CPU are
//! measured apart from the load generator, like every other target.

use std::net::SocketAddr;

use anyhow::Result;
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpListener;
use tokio::sync::broadcast;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

/// Messages a slow subscriber may fall behind before it skips ahead (like a bounded queue).
const CHANNEL: usize = 4096;

pub async fn serve(listen: SocketAddr) -> Result<()> {
    let listener = TcpListener::bind(listen).await?;
    let (tx, _) = broadcast::channel::<Bytes>(CHANNEL);
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(_) => {
                // Out of fds or similar: back off instead of spinning.
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            }
        };
        let tx = tx.clone();
        tokio::spawn(async move {
            let _ = stream.set_nodelay(true);
            // Frames fed between flushes collect in tungstenite's write buffer (default
            // 128 KiB target), so a batch goes out in one write.
            let config = WebSocketConfig::default().read_buffer_size(4096);
            let Ok(ws) = tokio_tungstenite::accept_async_with_config(stream, Some(config)).await
            else {
                return;
            };
            let _ = connection(ws, tx).await;
        });
    }
}

async fn connection(
    mut ws: tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>,
    tx: broadcast::Sender<Bytes>,
) -> Result<()> {
    let first = loop {
        match ws.next().await {
            Some(Ok(Message::Binary(b))) => break b,
            Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return Ok(()),
            Some(Ok(_)) => continue,
        }
    };
    if &first[..] != b"S" {
        // A publisher: every frame goes to every subscriber.
        let _ = tx.send(first);
        while let Some(msg) = ws.next().await {
            match msg? {
                Message::Binary(b) => {
                    let _ = tx.send(b);
                }
                Message::Close(_) => break,
                _ => {}
            }
        }
        return Ok(());
    }
    let mut rx = tx.subscribe();
    ws.send(Message::Binary(Bytes::from_static(b"K"))).await?;
    loop {
        tokio::select! {
            got = rx.recv() => {
                match got {
                    Ok(b) => ws.feed(Message::Binary(b)).await?,
                    Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => return Ok(()),
                }
                // Batch what is already queued, then flush once.
                for _ in 0..64 {
                    match rx.try_recv() {
                        Ok(b) => ws.feed(Message::Binary(b)).await?,
                        Err(_) => break,
                    }
                }
                ws.flush().await?;
            }
            msg = ws.next() => match msg {
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return Ok(()),
                Some(Ok(_)) => {}
            },
        }
    }
}
