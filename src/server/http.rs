//! HTTP on both listeners: the accept loop, TLS on the client listener, the WebSocket upgrade
//! at `GET /ws`, and the admin endpoints.
//!
//! The accept loop takes a connection slot (a semaphore permit) *before* accepting, so the
//! listen backlog, not memory, absorbs a connection flood; it backs off on accept errors such
//! as EMFILE, and does everything else — the TLS handshake, HTTP parsing, the upgrade,
//! authentication — inside the spawned task under timeouts, so a slow client never holds up
//! `accept`. The admin listener is always plain HTTP: it serves probes on a private port.
//!
//! Neither port can be held by a client that is not a session ([`Bounds`]):
//! - **Client port**, before an upgrade: one request per connection (every response but the
//!   101 says `connection: close`, and hyper closes once it is written), and one deadline,
//!   `limits.handshake_timeout_ms` from `accept`, for all of it — TLS, the request head, any
//!   body, the response. At the deadline the connection is dropped whatever it is doing, so a
//!   slow-loris head, a trickled body or a response never read costs a `max_connections` slot
//!   for at most that long, and a keep-alive client's slot comes back with its response. An
//!   upgrade moves the slot into the session, which has its own limits.
//! - **Admin port**: its own [`ADMIN_MAX_CONNECTIONS`] slots (the client port's never touch
//!   it), 1 s per request head (and idle time between keep-alive requests), 100 requests and
//!   5 s per connection. A probe on a new connection finds a slot while a hundred bad clients
//!   hammer the port; more than 256 could still fill it (each for at most 5 s), which is why
//!   the port stays private.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
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

impl Role {
    /// The `listener` label of the HTTP metrics.
    fn label(self) -> &'static str {
        match self {
            Role::Client => "client",
            Role::Admin => "admin",
        }
    }
}

const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// A listener's connection limit: the semaphore the accept loop takes a permit from before
/// `accept`, and how many accepted connections hold one. The permit taken ahead of the next
/// `accept` is not counted, so an idle listener holds 0.
#[derive(Debug)]
pub(super) struct Slots {
    permits: Arc<Semaphore>,
    held: AtomicUsize,
}

impl Slots {
    pub(super) fn new(max: usize) -> Arc<Self> {
        Arc::new(Self {
            permits: Arc::new(Semaphore::new(max)),
            held: AtomicUsize::new(0),
        })
    }

    /// Accepted connections holding a slot (handshaking, serving HTTP, or in a session).
    pub(super) fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }

    fn hold(self: &Arc<Self>, permit: OwnedSemaphorePermit) -> Slot {
        self.held.fetch_add(1, Ordering::Relaxed);
        Slot {
            _permit: permit,
            slots: self.clone(),
        }
    }
}

/// An accepted connection's share of its listener's limit. It moves into the session on an
/// upgrade; dropping it frees the slot.
pub(super) struct Slot {
    _permit: OwnedSemaphorePermit,
    slots: Arc<Slots>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.slots.held.fetch_sub(1, Ordering::Relaxed);
    }
}

pub(super) async fn accept_loop(
    proxy: Arc<Proxy>,
    listener: TcpListener,
    slots: Arc<Slots>,
    role: Role,
) {
    // The client port stops accepting when the drain begins; the admin port serves on until
    // the process exits, so /readyz reports the drain (503) and /metrics still scrapes.
    let mut shutdown = proxy.shutdown_signal();
    let stops = role == Role::Client;
    let mut backoff = Duration::from_millis(5);
    loop {
        let permit = tokio::select! {
            p = slots.permits.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
            _ = super::shutting_down(&mut shutdown), if stops => return,
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
            _ = super::shutting_down(&mut shutdown), if stops => return,
        };
        backoff = Duration::from_millis(5);
        proxy.metrics.http.accepted(role == Role::Admin);
        let _ = stream.set_nodelay(true);
        let slot = slots.hold(permit);
        let proxy = proxy.clone();
        tokio::spawn(async move {
            let accepted = Instant::now();
            match role {
                Role::Client => {
                    let deadline = accepted + proxy.settings.limits.handshake_timeout;
                    // Loaded once per connection: a rotated certificate serves the next one.
                    match proxy.store.tls_config() {
                        None => {
                            serve_http(proxy, role, stream, slot, peer, Bounds::client(deadline))
                                .await
                        }
                        Some(config) => match tls_handshake(config, stream, peer, deadline).await {
                            Some(stream) => {
                                let bounds = Bounds::client(deadline);
                                serve_http(proxy, role, stream, slot, peer, bounds).await;
                            }
                            None => proxy.metrics.http.handshake_failed("tls"),
                        },
                    }
                }
                Role::Admin => {
                    serve_http(proxy, role, stream, slot, peer, Bounds::admin(accepted)).await
                }
            }
        });
    }
}

/// The admin port serves kubelet probes — a new connection per probe, keep-alive off, a 1 s
/// timeout by default — and, later, Prometheus scrapes (one keep-alive connection per
/// scraper, a request every 15–60 s). Nothing legitimate there needs more than a few
/// connections or more than milliseconds per request, so its bounds are tight, fixed and its
/// own: nothing on the client port, and no handful of misbehaving clients on the pod network,
/// keeps a probe from a slot. (Before these bounds 64 HTTP keep-alive clients held all 64
/// admin slots forever, and liveness failed.)
///
/// Connections at once: two orders of magnitude above legitimate use (≈ 3 probes, 1–2
/// scrapers), still a bound on memory: ~10 KiB each (hyper's 8 KiB read buffer and a task),
/// ~2.5 MiB in all.
pub(super) const ADMIN_MAX_CONNECTIONS: usize = 256;
/// Time to send a request head and, on a keep-alive connection, to start the next one (hyper
/// restarts the timer for each head). A probe slower than this has already failed the
/// kubelet's default 1 s timeout; an idle scraper just reconnects for its next scrape.
const ADMIN_HEAD_TIMEOUT: Duration = Duration::from_secs(1);
/// Requests on one keep-alive connection; the last response says `connection: close`, so a
/// client hammering the port keeps going back through `accept` for a slot.
const ADMIN_MAX_REQUESTS: u32 = 100;
/// A connection's whole life, whatever it is doing (a trickled body, a response it does not
/// read). No slot is held longer, so keeping all ADMIN_MAX_CONNECTIONS busy takes more than
/// 50 new connections a second, every second.
const ADMIN_LIFETIME: Duration = Duration::from_secs(5);

/// How long one HTTP connection may last and how much it may ask. On the client port these
/// cover the exchange up to the WebSocket upgrade; a session has its own limits.
#[derive(Debug, Clone, Copy)]
struct Bounds {
    /// The connection is dropped at this instant, whatever it is doing.
    end: Instant,
    /// For each request head, from when hyper starts waiting for it.
    head_timeout: Duration,
    /// Responses on one connection; the last one says `connection: close`.
    max_requests: u32,
    /// hyper's read buffer cap, i.e. the largest request head (hyper's minimum is 8 KiB).
    max_buf: usize,
}

impl Bounds {
    /// The client port: one request per connection, and everything — TLS, the request
    /// head, any body, the response — by the handshake deadline. So a client that is not
    /// upgrading holds its `max_connections` slot until its response is written, and no
    /// client holds one for longer than `limits.handshake_timeout` without a session.
    fn client(deadline: Instant) -> Self {
        Self {
            end: deadline,
            head_timeout: deadline.saturating_duration_since(Instant::now()),
            max_requests: 1,
            max_buf: 16 * 1024,
        }
    }

    fn admin(accepted: Instant) -> Self {
        Self {
            end: accepted + ADMIN_LIFETIME,
            head_timeout: ADMIN_HEAD_TIMEOUT,
            max_requests: ADMIN_MAX_REQUESTS,
            max_buf: 8 * 1024,
        }
    }
}

/// Serves HTTP/1.1 on one connection (plain or TLS) within `bounds`.
async fn serve_http<I>(
    proxy: Arc<Proxy>,
    role: Role,
    io: I,
    slot: Slot,
    peer: SocketAddr,
    bounds: Bounds,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    // The slot bounds *connections*, so an upgrade takes it along into the session;
    // otherwise it is released when this HTTP connection ends.
    let slot = Arc::new(Mutex::new(Some(slot)));
    let served = AtomicU32::new(0);
    let metrics = proxy.metrics.clone();
    let svc = hyper::service::service_fn(move |req| {
        let proxy = proxy.clone();
        let slot = slot.clone();
        let nth = served.fetch_add(1, Ordering::Relaxed).saturating_add(1);
        async move {
            let metrics = proxy.metrics.clone();
            let mut response = if role == Role::Client && req.uri().path().starts_with("/v1/") {
                super::api::handle(proxy, req).await
            } else {
                route(proxy, role, req, &slot, peer)
            };
            metrics
                .http
                .response(role.label(), response.status().as_u16());
            // `connection: close` makes hyper end the connection once this response is
            // written. Not hyper's `keep_alive(false)`: that would answer the upgrade with
            // `connection: Upgrade, close`, a contradiction a strict client or an
            // intermediary may act on.
            if nth >= bounds.max_requests && response.status() != StatusCode::SWITCHING_PROTOCOLS {
                response
                    .headers_mut()
                    .insert(CONNECTION, HeaderValue::from_static("close"));
            }
            Ok::<_, Infallible>(response)
        }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .header_read_timeout(bounds.head_timeout)
        .timer(hyper_util::rt::TokioTimer::new())
        .max_buf_size(bounds.max_buf)
        .serve_connection(TokioIo::new(io), svc)
        .with_upgrades();
    // After an upgrade `conn` completes at once (the socket moves to the session), so the
    // cut-off only ever applies to HTTP.
    match tokio::time::timeout_at(bounds.end, conn).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "http connection ended with an error"),
        Err(_) => {
            if role == Role::Client {
                metrics.http.handshake_failed("deadline");
            }
            tracing::debug!(%peer, ?role, "http connection cut off at its deadline")
        }
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

/// `GET /metrics`: the OpenMetrics format when the scraper asks for it (Prometheus does),
/// the classic text format otherwise (curl, older scrapers).
fn metrics(proxy: &Proxy, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let openmetrics = req
        .headers()
        .get(hyper::header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("application/openmetrics-text"));
    let body = proxy.metrics.render(&proxy.metrics_state(), openmetrics);
    let mut r = Response::new(Full::new(Bytes::from(body)));
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        HeaderValue::from_static(crate::metrics::content_type(openmetrics)),
    );
    r
}

fn text_owned(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *r.status_mut() = status;
    r
}

/// Where a connection's slot waits until an upgrade takes it.
type SlotCell = Mutex<Option<Slot>>;

fn route(
    proxy: Arc<Proxy>,
    role: Role,
    req: Request<Incoming>,
    slot: &SlotCell,
    peer: SocketAddr,
) -> Response<Full<Bytes>> {
    match (role, req.method(), req.uri().path()) {
        (Role::Admin, &Method::GET, "/healthz") => text(StatusCode::OK, "ok\n"),
        (Role::Admin, &Method::GET, "/readyz") => {
            // First line: the verdict (probes read the status); then one line per upstream
            // connection: where it is and how it routes (subscription ids or topic matching).
            let links = upstream_links(&proxy);
            if proxy.is_ready() {
                text_owned(StatusCode::OK, format!("ready\n{links}"))
            } else if proxy.is_draining() {
                text_owned(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("not ready: draining\n{links}"),
                )
            } else {
                text_owned(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("not ready: upstream not connected\n{links}"),
                )
            }
        }
        (Role::Admin, &Method::GET, "/metrics") => metrics(&proxy, &req),
        // The query string is ignored (PROTOCOL §1).
        (Role::Client, &Method::GET, "/ws") => upgrade(proxy, req, slot, peer),
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// `/readyz` detail: one line per upstream connection.
fn upstream_links(proxy: &Proxy) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    for (i, link) in proxy.pool.links().iter().enumerate() {
        let _ = match link {
            Some(l) => writeln!(
                out,
                "upstream {i}: connected to {} ({}, routing by {})",
                l.endpoint,
                l.version.name(),
                if l.subscription_ids {
                    "subscription ids"
                } else {
                    "topic matching"
                }
            ),
            None => writeln!(out, "upstream {i}: not connected"),
        };
    }
    out
}

/// Answers a WebSocket upgrade and hands the upgraded connection to a session task.
fn upgrade(
    proxy: Arc<Proxy>,
    mut req: Request<Incoming>,
    slot: &SlotCell,
    peer: SocketAddr,
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
    let slot = slot.lock().take();
    tokio::spawn(async move {
        let _slot = slot;
        let upgraded = match tokio::time::timeout(limits.handshake_timeout, on_upgrade).await {
            Ok(Ok(u)) => u,
            Ok(Err(e)) => {
                proxy.metrics.http.handshake_failed("upgrade");
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
        super::session::run(proxy, ws, peer).await;
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
