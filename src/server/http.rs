//! HTTP on both listeners: the accept loop, TLS on the client listener, the WebSocket upgrade
//! at `GET /ws`, and the admin endpoints.
//!
//! The accept loop takes a connection permit *before* accepting (so the listen backlog, not
//! memory, absorbs a connection flood), backs off on accept errors such as EMFILE, and does
//! everything else — the TLS handshake, HTTP parsing, the upgrade, authentication — inside the
//! spawned task under timeouts, so a slow client never holds up `accept`. The TLS handshake
//! and the HTTP request share one deadline, `limits.handshake_timeout_ms`. The admin listener
//! is always plain HTTP: it serves probes on a private port.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{CONNECTION, HeaderValue, SEC_WEBSOCKET_ACCEPT, SEC_WEBSOCKET_KEY, UPGRADE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role as WsRole, WebSocketConfig};

/// Bytes of outgoing frames gathered before a write to the socket (a flush always writes).
const WRITE_COALESCE: usize = 16 * 1024;

use super::Proxy;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Role {
    Client,
    Admin,
}

const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

pub(super) async fn accept_loop(
    proxy: Arc<Proxy>,
    listener: TcpListener,
    permits: Arc<Semaphore>,
    role: Role,
) {
    let mut shutdown = proxy.shutdown_signal();
    let mut backoff = Duration::from_millis(5);
    loop {
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
            _ = super::shutting_down(&mut shutdown) => return,
        };
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    // EMFILE and friends: shed load for a moment instead of spinning.
                    tracing::warn!(error = %e, "accept failed; backing off {backoff:?}");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
                    continue;
                }
            },
            _ = super::shutting_down(&mut shutdown) => return,
        };
        backoff = Duration::from_millis(5);
        let _ = stream.set_nodelay(true);
        let proxy = proxy.clone();
        tokio::spawn(async move {
            let deadline = Instant::now() + proxy.settings.limits.handshake_timeout;
            // Loaded once per connection: a rotated certificate serves the next one.
            let tls = match role {
                Role::Client => proxy.store.tls_config(),
                Role::Admin => None,
            };
            match tls {
                None => serve_http(proxy, role, stream, permit, peer, deadline).await,
                Some(config) => {
                    if let Some(stream) = tls_handshake(config, stream, peer, deadline).await {
                        serve_http(proxy, role, stream, permit, peer, deadline).await;
                    }
                }
            }
        });
    }
}

/// Serves HTTP/1.1 on one connection (plain or TLS). The request head must arrive by
/// `deadline`.
async fn serve_http<I>(
    proxy: Arc<Proxy>,
    role: Role,
    io: I,
    permit: OwnedSemaphorePermit,
    peer: SocketAddr,
    deadline: Instant,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    // The permit bounds *connections*, so an upgrade takes it along into the session;
    // otherwise it is released when this HTTP connection ends.
    let permit = Arc::new(Mutex::new(Some(permit)));
    let header_timeout = deadline.saturating_duration_since(Instant::now());
    let svc = hyper::service::service_fn(move |req| {
        let proxy = proxy.clone();
        let permit = permit.clone();
        async move { Ok::<_, Infallible>(route(proxy, role, req, &permit)) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .header_read_timeout(header_timeout)
        .timer(hyper_util::rt::TokioTimer::new())
        .max_buf_size(16 * 1024)
        .serve_connection(TokioIo::new(io), svc)
        .with_upgrades();
    if let Err(e) = conn.await {
        tracing::debug!(%peer, error = %e, "http connection ended with an error");
    }
}

/// The first byte of a TLS connection: a handshake record.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// Completes the TLS handshake by `deadline`. Failures are the client's (a scanner, a
/// client that does not trust the certificate, a timeout) and are logged at debug level.
async fn tls_handshake(
    config: Arc<rustls::ServerConfig>,
    stream: TcpStream,
    peer: SocketAddr,
    deadline: Instant,
) -> Option<TlsStream<TcpStream>> {
    let handshake = async {
        let mut first = [0u8; 1];
        match stream.peek(&mut first).await {
            Ok(0) | Err(_) => return None,
            // `GET /ws HTTP/1.1`: a ws:// client on the wss:// port. Tell it in words, as
            // nginx does, rather than with a TLS alert it will report as gibberish.
            Ok(_) if first[0].is_ascii_uppercase() => {
                refuse_plain_http(stream).await;
                tracing::debug!(%peer, "plain HTTP on the TLS listener refused");
                return None;
            }
            Ok(_) if first[0] != TLS_HANDSHAKE_RECORD => {
                tracing::debug!(%peer, "not a TLS handshake");
                return None;
            }
            Ok(_) => {}
        }
        match TlsAcceptor::from(config).accept(stream).await {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::debug!(%peer, error = %e, "TLS handshake failed");
                None
            }
        }
    };
    match tokio::time::timeout_at(deadline, handshake).await {
        Ok(s) => s,
        Err(_) => {
            tracing::debug!(%peer, "TLS handshake timed out");
            None
        }
    }
}

/// Answers a plain HTTP request on the TLS port with 400 and closes.
async fn refuse_plain_http(mut stream: TcpStream) {
    // Read the request head first: closing with unread data would reset the connection and
    // could destroy the answer before the client reads it.
    let mut buf = vec![0u8; 8 * 1024];
    let mut filled = 0;
    while filled < buf.len() {
        match stream.read(&mut buf[filled..]).await {
            Ok(0) | Err(_) => return,
            Ok(n) => filled += n,
        }
        if buf[..filled].windows(4).any(|w| w == b"\r\n\r\n") {
            break;
        }
    }
    const BODY: &str = "this port speaks TLS: connect with wss:// or https://\n";
    let response = format!(
        "HTTP/1.1 400 Bad Request\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{BODY}",
        BODY.len()
    );
    let _ = stream.write_all(response.as_bytes()).await;
    let _ = stream.shutdown().await;
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *r.status_mut() = status;
    r
}

type PermitSlot = Mutex<Option<OwnedSemaphorePermit>>;

fn route(
    proxy: Arc<Proxy>,
    role: Role,
    req: Request<Incoming>,
    permit: &PermitSlot,
) -> Response<Full<Bytes>> {
    match (role, req.method(), req.uri().path()) {
        (Role::Admin, &Method::GET, "/healthz") => text(StatusCode::OK, "ok\n"),
        (Role::Admin, &Method::GET, "/readyz") => {
            if proxy.is_ready() {
                text(StatusCode::OK, "ready\n")
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
            }
        }
        // The query string is ignored (PROTOCOL §1).
        (Role::Client, &Method::GET, "/ws") => upgrade(proxy, req, permit),
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// Answers a WebSocket upgrade and hands the upgraded connection to a session task.
fn upgrade(
    proxy: Arc<Proxy>,
    mut req: Request<Incoming>,
    permit: &PermitSlot,
) -> Response<Full<Bytes>> {
    let is_upgrade = req
        .headers()
        .get(UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    let version_ok = req
        .headers()
        .get("sec-websocket-version")
        .is_some_and(|v| v == "13");
    let Some(key) = req.headers().get(SEC_WEBSOCKET_KEY).cloned() else {
        return text(StatusCode::BAD_REQUEST, "websocket upgrade expected\n");
    };
    if !is_upgrade || !version_ok {
        return text(StatusCode::BAD_REQUEST, "websocket upgrade expected\n");
    }
    let accept = derive_accept_key(key.as_bytes());
    let limits = proxy.settings.limits;
    let on_upgrade = hyper::upgrade::on(&mut req);
    let permit = permit.lock().take();
    tokio::spawn(async move {
        let _permit = permit;
        let upgraded = match tokio::time::timeout(limits.handshake_timeout, on_upgrade).await {
            Ok(Ok(u)) => u,
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "websocket upgrade failed");
                return;
            }
            Err(_) => return,
        };
        // Buffers sized for thousands of mostly idle clients: the defaults (128 KiB read
        // buffer per connection) would cost more than the rest of the session together.
        // tungstenite zero-fills and keeps its whole read buffer, so its size is resident
        // per connection: 1 KiB instead of 4 KiB took idle RSS from 11.5 to 8.4 KiB per
        // connection (BENCHMARKS.md). Larger frames still arrive whole (the buffer grows to the
        // frame), in more reads.
        // Writes collect up to WRITE_COALESCE bytes before reaching the socket, so the
        // session's feed-then-flush batches become one syscall instead of one per frame
        // (the buffer is only as large as the biggest burst, and empty for idle clients).
        let config = WebSocketConfig::default()
            .read_buffer_size(1024)
            .write_buffer_size(WRITE_COALESCE)
            .max_write_buffer_size(limits.max_frame_bytes + 64 * 1024)
            .max_message_size(Some(limits.max_frame_bytes))
            .max_frame_size(Some(limits.max_frame_bytes));
        let ws =
            WebSocketStream::from_raw_socket(TokioIo::new(upgraded), WsRole::Server, Some(config))
                .await;
        super::session::run(proxy, ws).await;
    });
    // No subprotocol and no permessage-deflate are negotiated (PROTOCOL §1).
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = r.headers_mut();
    h.insert(UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(CONNECTION, HeaderValue::from_static("Upgrade"));
    if let Ok(v) = HeaderValue::from_str(&accept) {
        h.insert(SEC_WEBSOCKET_ACCEPT, v);
    }
    r
}
