//! One client connection: the driver that owns the WebSocket, the timers and the outbound
//! queue, around the protocol state machine in [`machine`].
//!
//! One task per connection; it is the only writer of its socket. Before authentication it
//! runs the auth handshake (PROTOCOL §4) under `limits.auth_timeout_ms`, closing at once on
//! shutdown. After it, each turn of the loop first checks the conditions that end a session
//! (queue overflow → 1013, shutdown → 1001, credential expiry → 4001, idle → 1000, a policy
//! reload that revokes the actor), then serves *one* of: a client frame, or a batch of queued
//! frames (at most [`WRITE_BATCH`], one flush). Which of the two is served when both are ready
//! is random (an unbiased `select!`), so a subscriber whose queue never empties is still read
//! — its heartbeats keep it alive — and a client that floods frames still gets its queue
//! written.
//!
//! A connection is read at most `publish_per_second + control_per_second +
//! presence.frames_per_second` frames per second
//! (a token bucket of that burst): frames beyond the per-kind limits are refused with error
//! frames until that budget is spent, and then the socket is simply not read until it refills,
//! so a flood costs the proxy a bounded amount of work per connection and its sender TCP
//! backpressure.
//!
//! Every close is a close handshake: the close frame goes out, then what the client still
//! sends is read and discarded until it answers (or [`CLOSE_TIMEOUT`]), so the client sees
//! the code instead of a reset. A message over `limits.max_frame_bytes` closes with 1009
//! before and after authentication; its unread remainder is drained from the raw stream.
//! Read and write failures are classified and logged once, with the peer's actor.

mod machine;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tracing::Instrument;

use super::Proxy;
use crate::auth::Actor;
use crate::auth::session_token::now_unix;
use crate::router::{Outbox, OutboxReceiver, Overflow};
use crate::webhook::{EventKind, Report};
use crate::wire::encode::{self, errors};
pub(crate) use machine::Bucket;
use machine::{Machine, PreAuth};

/// How long one write to the client may take before the client counts as gone.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a reconnecting client's handshake waits for its stored subscription set. A broker
/// sends nothing when there is no retained message, so this is also the cost of restoring
/// an empty set.
const RESTORE_TIMEOUT: Duration = Duration::from_millis(500);
/// How long the handshake waits for restored subscriptions that are new upstream to be
/// granted, so that the `auth` reply means "live" for them too.
const RESTORE_LIVE_TIMEOUT: Duration = Duration::from_secs(2);
/// Frames written per turn before flushing: batches fan-out bursts into few syscalls, and
/// bounds how long a turn keeps the session from reading.
const WRITE_BATCH: usize = 64;
/// How long a close handshake may take: the close frame going out, and the client's answer.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// Why the proxy closed a connection: the WebSocket close code and reason a client can log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    Idle,
    AuthTimeout,
    AuthFailed(&'static str),
    SlowConsumer,
    TokenExpired,
    Revoked,
    ScopeChanged,
    /// `POST /v1/actors/{id}/disconnect`.
    Disconnected,
    ShuttingDown,
    WriteTimeout,
    TooBig,
}

impl CloseReason {
    pub fn code(self) -> u16 {
        match self {
            CloseReason::Idle => 1000,
            CloseReason::ShuttingDown => 1001,
            CloseReason::AuthTimeout | CloseReason::AuthFailed(_) => 1008,
            CloseReason::SlowConsumer | CloseReason::WriteTimeout => 1013,
            CloseReason::TooBig => 1009,
            CloseReason::TokenExpired
            | CloseReason::Revoked
            | CloseReason::ScopeChanged
            | CloseReason::Disconnected => 4001,
        }
    }

    pub fn reason(self) -> &'static str {
        match self {
            CloseReason::Idle => "idle timeout",
            CloseReason::AuthTimeout => "auth timeout",
            CloseReason::AuthFailed(e) => e,
            CloseReason::SlowConsumer => "slow consumer: send queue full",
            CloseReason::TokenExpired => "token_expired",
            CloseReason::Revoked => "access_revoked",
            CloseReason::ScopeChanged => "scope_changed",
            CloseReason::Disconnected => "disconnected_by_server",
            CloseReason::ShuttingDown => "server shutting down",
            CloseReason::WriteTimeout => "write timeout",
            CloseReason::TooBig => "message too big",
        }
    }
}

/// How a session ended, for the one log line at its end.
#[derive(Debug)]
enum End {
    /// The proxy closes, for this reason.
    Close(CloseReason),
    /// The client closed (close frame or EOF).
    ClientClosed,
    /// Reading failed: the client's connection broke (reset, TLS error, protocol violation).
    ReadError(WsError),
}

impl End {
    /// The `reason` label of `cuttle_connections_closed_total` (`metrics::CLOSE_REASONS`).
    fn label(&self) -> &'static str {
        match self {
            End::ClientClosed => "client_closed",
            End::ReadError(_) => "read_error",
            End::Close(r) => match r {
                CloseReason::Idle => "idle",
                CloseReason::AuthTimeout => "auth_timeout",
                CloseReason::AuthFailed(_) => "auth_failed",
                CloseReason::SlowConsumer => "slow_consumer",
                CloseReason::TokenExpired => "token_expired",
                CloseReason::Revoked => "revoked",
                CloseReason::ScopeChanged => "scope_changed",
                CloseReason::Disconnected => "disconnected",
                CloseReason::ShuttingDown => "shutting_down",
                CloseReason::WriteTimeout => "write_timeout",
                CloseReason::TooBig => "too_big",
            },
        }
    }
}

type Ws<S> = WebSocketStream<S>;

/// Runs a session on an upgraded WebSocket until it ends.
pub(super) async fn run<S>(proxy: Arc<Proxy>, ws: Ws<S>, peer: std::net::SocketAddr)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (id, socket_id) = proxy.new_session_id();
    // Every record of the session carries these; the actor's fields are filled in once it
    // authenticates.
    let span = tracing::info_span!(
        "session",
        id,
        %peer,
        actor = tracing::field::Empty,
        actor_type = tracing::field::Empty,
        project = tracing::field::Empty,
        scope = tracing::field::Empty,
    );
    proxy.session_started();
    let guard = SessionCount(proxy.clone());
    let started = tokio::time::Instant::now();
    let pending = proxy.metrics.sessions.pending();
    async move {
        let _guard = guard;
        let mut ws = ws;
        let authenticated = match authenticate(&proxy, &mut ws).await {
            Ok(a) => a,
            Err(end) => {
                drop(pending);
                finish(&proxy, &mut ws, end, None, started).await;
                return;
            }
        };
        drop(pending);
        let Authenticated {
            actor,
            version,
            generation,
            slot: _slot,
            kicks,
            reconnect,
        } = authenticated;
        let span = tracing::Span::current();
        // Display, not Debug: `actor=sensor-1` like every other record, not `actor="sensor-1"`.
        use tracing::field::display;
        span.record("actor", display(&*actor.id));
        span.record("actor_type", display(actor.kind.as_str()));
        span.record("project", display(&*actor.project));
        span.record("scope", display(actor.scope().unwrap_or("-")));
        tracing::debug!("authenticated");
        let _counted = proxy.metrics.sessions.authenticated(actor.kind);
        let limits = proxy.settings.limits;
        let (outbox, rx, overflow) = Outbox::channel(limits.send_queue, limits.send_queue_bytes);
        let _tracked = proxy.track_outbox(id, rx.queued_bytes_counter());
        let mut machine = Machine::new(
            proxy.clone(),
            id,
            socket_id.clone(),
            actor.clone(),
            version,
            outbox,
        );
        // First, so that the backend hears of the connection before its restored
        // subscriptions; a `disconnect` follows it however the session ends.
        proxy.webhooks.report(
            &actor.project,
            Report::of(EventKind::Connect, &actor)
                .with_data(serde_json::json!({ "connection": &*socket_id })),
        );
        // PROTOCOL §13: on an automatic reconnect the SDK never re-subscribes; the server
        // restores what the actor had, re-checked against the current policy.
        let restored = if reconnect {
            restore(&mut machine).await
        } else {
            Vec::new()
        };
        let ok = encode::auth_ok(
            &actor.id,
            &actor.project,
            actor.kind.as_str(),
            version,
            &restored,
        );
        let end = match send(&proxy, &mut ws, ok).await {
            Err(reason) => End::Close(reason),
            Ok(()) => {
                let watched = Watched {
                    authenticated_under: generation,
                    kicks,
                };
                main_loop(&proxy, &mut machine, &mut ws, rx, &overflow, watched).await
            }
        };
        // The proxy's own decisions end presence at once; a broken or idle connection
        // lingers for the grace period (the client is likely to come back).
        if let End::Close(
            CloseReason::Revoked
            | CloseReason::TokenExpired
            | CloseReason::ScopeChanged
            | CloseReason::Disconnected
            | CloseReason::ShuttingDown,
        ) = end
        {
            machine.end_cleanly();
        }
        if let End::Close(CloseReason::TokenExpired) = end {
            proxy.metrics.sessions.token_expired(actor.kind);
        }
        // Leave the router and presence before the close handshake: nothing more is queued.
        drop(machine);
        let code = match &end {
            End::Close(reason) => reason.code(),
            End::ClientClosed => 1000,
            End::ReadError(_) => 1006,
        };
        proxy.webhooks.report(
            &actor.project,
            Report::of(EventKind::Disconnect, &actor).with_data(serde_json::json!({
                "connection": &*socket_id,
                "code": code,
                "reason": end.label(),
                "duration_ms": started.elapsed().as_millis() as u64,
            })),
        );
        finish(&proxy, &mut ws, end, Some(&actor), started).await;
    }
    .instrument(span)
    .await
}

/// Logs and counts how the session ended, and closes it.
async fn finish<S>(
    proxy: &Proxy,
    ws: &mut Ws<S>,
    end: End,
    actor: Option<&Arc<Actor>>,
    started: tokio::time::Instant,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    proxy
        .metrics
        .sessions
        .closed(end.label(), started.elapsed());
    let actor = actor.map(|a| a.id.to_string());
    match end {
        End::Close(reason) => {
            tracing::debug!(
                actor,
                code = reason.code(),
                reason = reason.reason(),
                "closing"
            );
            close(ws, reason).await;
        }
        End::ClientClosed => tracing::debug!(actor, "client closed"),
        End::ReadError(e) => {
            tracing::debug!(actor, error = %e, kind = read_error_kind(&e), "connection broken")
        }
    }
}

/// A read error's class, for the log: whose fault and what kind.
fn read_error_kind(e: &WsError) -> &'static str {
    match e {
        WsError::Io(io) if io.kind() == std::io::ErrorKind::ConnectionReset => "reset by peer",
        WsError::Io(io) if io.kind() == std::io::ErrorKind::UnexpectedEof => "eof mid-frame",
        WsError::Io(_) => "io",
        WsError::Protocol(_) => "protocol violation",
        WsError::Utf8(_) => "invalid utf-8",
        WsError::Capacity(_) => "too big",
        WsError::Tls(_) => "tls",
        _ => "other",
    }
}

/// Reads the stored set, restores it, and waits (bounded) until what it subscribed is live.
async fn restore(machine: &mut Machine) -> Vec<Bytes> {
    let Some(payload) = machine.fetch_record(RESTORE_TIMEOUT).await else {
        return Vec::new();
    };
    let (restored, later, live) = machine.restore(&payload);
    if later > 0 {
        let n = u32::try_from(later).unwrap_or(u32::MAX);
        if tokio::time::timeout(RESTORE_LIVE_TIMEOUT, live.acquire_many(n))
            .await
            .is_err()
        {
            tracing::debug!(
                pending = later,
                "restored subscriptions not yet granted upstream"
            );
        }
    }
    restored
}

/// Decrements the open-session gauge however the session ends (including a panic unwinding
/// or the task being aborted).
struct SessionCount(Arc<Proxy>);

impl Drop for SessionCount {
    fn drop(&mut self) {
        self.0.session_ended();
    }
}

async fn send<S>(proxy: &Proxy, ws: &mut Ws<S>, frame: Bytes) -> Result<(), CloseReason>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    proxy.metrics.sessions.frames_out(1, frame.len());
    match tokio::time::timeout(WRITE_TIMEOUT, ws.send(Message::Binary(frame))).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) | Err(_) => Err(CloseReason::WriteTimeout),
    }
}

/// Sends the close frame, then reads (and discards) what the client still sends until it
/// answers or [`CLOSE_TIMEOUT`] passes: closing a socket with unread data resets it, and the
/// client would see 1006 instead of the code.
async fn close<S>(ws: &mut Ws<S>, reason: CloseReason)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let frame = CloseFrame {
        code: CloseCode::from(reason.code()),
        reason: reason.reason().into(),
    };
    let handshake = async {
        if ws.close(Some(frame)).await.is_err() {
            return;
        }
        if reason == CloseReason::TooBig {
            // The rest of the oversized message is still in the stream, unparsed: frames
            // after it cannot be found, so drain raw bytes until the client hangs up. On the
            // heap, and only here: an array would sit in every session's task (this future
            // is part of the session's), and that alone was 8 KiB of each idle connection's
            // resident memory (the regression from 8.2 to 16.1 KiB, BENCHMARKS.md).
            let mut buf = vec![0u8; 8192];
            while let Ok(n) = ws.get_mut().read(&mut buf).await {
                if n == 0 {
                    break;
                }
            }
        } else {
            while let Some(Ok(_)) = ws.next().await {}
        }
    };
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, handshake).await;
}

/// A successful handshake: the actor, the negotiated version, and the policy generation the
/// actor was authenticated under.
struct Authenticated {
    actor: Arc<Actor>,
    version: u32,
    generation: u64,
    slot: ActorSlot,
    /// Disconnect requests for this actor (`POST /v1/actors/{id}/disconnect`).
    kicks: super::KickWatch,
    /// The auth frame had `reconnect: true`: restore the actor's subscriptions.
    reconnect: bool,
}

/// One of an actor's `connections_per_actor` slots, released however the session ends.
struct ActorSlot(Arc<Proxy>, Arc<Actor>);

impl Drop for ActorSlot {
    fn drop(&mut self) {
        self.0.actors.release(&self.1.project, &self.1.id);
    }
}

/// The auth handshake (PROTOCOL §4), within `limits.auth_timeout_ms`; ends at once (1001) if
/// the proxy starts draining.
async fn authenticate<S>(proxy: &Arc<Proxy>, ws: &mut Ws<S>) -> Result<Authenticated, End>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let deadline = tokio::time::Instant::now() + proxy.settings.limits.auth_timeout;
    let mut shutdown = proxy.shutdown_signal();
    let metrics = &proxy.metrics.sessions;
    loop {
        let msg = tokio::select! {
            _ = super::shutting_down(&mut shutdown) => {
                return Err(End::Close(CloseReason::ShuttingDown));
            }
            m = tokio::time::timeout_at(deadline, ws.next()) => m,
        };
        let msg = match msg {
            Err(_) => {
                metrics.auth_failed("unknown", "timeout");
                return Err(End::Close(CloseReason::AuthTimeout));
            }
            Ok(None) => return Err(End::ClientClosed),
            // PROTOCOL §1: a message over the frame limit closes with 1009, before auth too.
            Ok(Some(Err(WsError::Capacity(_)))) => return Err(End::Close(CloseReason::TooBig)),
            Ok(Some(Err(e))) => return Err(End::ReadError(e)),
            Ok(Some(Ok(m))) => m,
        };
        let bytes = match msg {
            Message::Binary(b) => b,
            Message::Text(t) => {
                metrics.frame_in("invalid", t.len());
                send(proxy, ws, errors::invalid_frame("binary frames only"))
                    .await
                    .map_err(End::Close)?;
                continue;
            }
            Message::Close(_) => return Err(End::ClientClosed),
            _ => continue,
        };
        let pre_auth = machine::pre_auth(&bytes);
        let kind = match &pre_auth {
            PreAuth::Auth { .. } => "auth",
            PreAuth::Ignore => "ignored",
            PreAuth::Reply(_) => "invalid",
        };
        metrics.frame_in(kind, bytes.len());
        let (token, reconnect, version) = match pre_auth {
            PreAuth::Ignore => continue,
            PreAuth::Reply(frame) => {
                send(proxy, ws, frame).await.map_err(End::Close)?;
                continue;
            }
            PreAuth::Auth {
                token,
                reconnect,
                version,
            } => (token, reconnect, version),
        };
        let snapshot = proxy.store.load();
        let actor = match snapshot.auth.authenticate(token.expose()) {
            Ok(a) => a,
            Err(e) => {
                tracing::debug!(reason = %e, "authentication failed");
                metrics.auth_failed(crate::auth::claimed_type(token.expose()), e.reason());
                let wire = e.wire_error();
                send(proxy, ws, encode::auth_failed(wire))
                    .await
                    .map_err(End::Close)?;
                return Err(End::Close(CloseReason::AuthFailed(wire)));
            }
        };
        let max = proxy.settings.limits.connections_per_actor;
        let Some(kicks) = proxy.actors.acquire(&actor.project, &actor.id, max) else {
            let wire = "connection_limit_reached";
            tracing::debug!(actor = %actor.id, max, "authentication refused: connections_per_actor reached");
            metrics.auth_failed(actor.kind.as_str(), wire);
            send(proxy, ws, encode::auth_failed(wire))
                .await
                .map_err(End::Close)?;
            return Err(End::Close(CloseReason::AuthFailed(wire)));
        };
        let slot = ActorSlot(proxy.clone(), actor.clone());
        return Ok(Authenticated {
            actor,
            version,
            generation: snapshot.generation,
            slot,
            kicks,
            reconnect,
        });
    }
}

/// Longest wait a timer is set for: a token can claim any `exp`, and `Instant` arithmetic
/// panics on overflow.
const MAX_TIMER: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// Instant at which a unix time (seconds) is reached, from now (at most [`MAX_TIMER`] away).
fn instant_at(unix: u64) -> tokio::time::Instant {
    let wait = Duration::from_secs(unix.saturating_sub(now_unix())).min(MAX_TIMER);
    tokio::time::Instant::now() + wait
}

/// What one turn of the loop got.
enum Turn {
    Stop(End),
    Client(Message),
    Queued(Bytes),
    Reload,
    /// The read budget refilled: the socket is read again.
    Resume,
    /// Something was looked at that needs nothing done (a disconnect for other namespaces).
    Nothing,
}

/// What a session watches besides its socket and queue.
struct Watched {
    /// The policy generation the actor was authenticated under.
    authenticated_under: u64,
    kicks: super::KickWatch,
}

async fn main_loop<S>(
    proxy: &Arc<Proxy>,
    machine: &mut Machine,
    ws: &mut Ws<S>,
    mut rx: OutboxReceiver,
    overflow: &Overflow,
    watched: Watched,
) -> End
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let idle_timeout = proxy.settings.limits.idle_timeout;
    let idle = tokio::time::sleep(idle_timeout);
    tokio::pin!(idle);
    let expiry = tokio::time::sleep_until(match machine.actor().expires_at {
        Some(t) => instant_at(t),
        None => tokio::time::Instant::now() + MAX_TIMER,
    });
    tokio::pin!(expiry);
    let mut shutdown = proxy.shutdown_signal();
    let mut policy = proxy.store.subscribe();
    let mut replies: Vec<Bytes> = Vec::new();
    // Every frame the client sends costs a decode and usually a reply, refused ones too: a
    // connection is read at most as fast as its limits admit frames, beyond which its socket
    // waits (TCP backpressure on the sender, no work here) until the budget refills.
    let limits = &proxy.settings.limits;
    let mut reads = Bucket::new(
        limits
            .publish_per_second
            .saturating_add(limits.control_per_second)
            .saturating_add(proxy.settings.presence.frames_per_second),
        tokio::time::Instant::now(),
    );
    let mut paused_until: Option<tokio::time::Instant> = None;
    // A reload may have landed between authentication and here: catch up before serving.
    let mut reload = *policy.borrow_and_update() != watched.authenticated_under;
    let mut kicks = watched.kicks;
    // A request sent before this session subscribed is not for it.
    kicks.borrow_and_update();
    let mut kicks_open = true;

    loop {
        if reload {
            reload = false;
            if let Err(reason) = machine.reevaluate(&mut replies) {
                return End::Close(reason);
            }
            if let Err(reason) = write_replies(proxy, ws, &mut replies).await {
                return End::Close(reason);
            }
        }
        // The conditions that end a session come first, every turn.
        let turn = tokio::select! {
            biased;
            _ = overflow.wait() => Turn::Stop(End::Close(CloseReason::SlowConsumer)),
            _ = super::shutting_down(&mut shutdown) => Turn::Stop(End::Close(CloseReason::ShuttingDown)),
            _ = &mut expiry => Turn::Stop(End::Close(CloseReason::TokenExpired)),
            _ = &mut idle => Turn::Stop(End::Close(CloseReason::Idle)),
            changed = policy.changed() => match changed {
                Ok(()) => Turn::Reload,
                Err(_) => Turn::Stop(End::Close(CloseReason::ShuttingDown)),
            },
            kicked = kicks.changed(), if kicks_open => match kicked {
                Ok(()) => {
                    let scope = machine.actor().scope();
                    let applies = kicks
                        .borrow_and_update()
                        .as_ref()
                        .is_some_and(|d| d.namespaces.contains(scope));
                    if applies {
                        Turn::Stop(End::Close(CloseReason::Disconnected))
                    } else {
                        Turn::Nothing
                    }
                }
                Err(_) => {
                    kicks_open = false;
                    Turn::Nothing
                }
            },
            // Reading and writing share what is left fairly: whichever is ready, at random.
            turn = serve_one(ws, &mut rx, paused_until) => turn,
        };
        match turn {
            Turn::Stop(end) => return end,
            Turn::Reload => reload = true,
            Turn::Resume => paused_until = None,
            Turn::Nothing => {}
            Turn::Queued(first) => {
                // A client that stops reading blocks this write; its queue then overflows,
                // which must end the session at once, not after the write timeout.
                let written = tokio::select! {
                    biased;
                    _ = overflow.wait() => Err(CloseReason::SlowConsumer),
                    r = write_batch(proxy, ws, first, &mut rx) => r,
                };
                if let Err(reason) = written {
                    return End::Close(reason);
                }
            }
            Turn::Client(msg) => {
                let now = tokio::time::Instant::now();
                idle.as_mut().reset(now + idle_timeout);
                paused_until = reads.charge(now);
                match msg {
                    Message::Binary(b) => machine.on_frame(&b, &mut replies),
                    Message::Text(t) => {
                        proxy.metrics.sessions.frame_in("invalid", t.len());
                        replies.push(errors::invalid_frame("binary frames only"));
                    }
                    Message::Close(_) => {
                        // A goodbye: presence leaves at once (no reconnect grace).
                        machine.end_cleanly();
                        return End::ClientClosed;
                    }
                    // Pings are answered by tungstenite on the next write or flush.
                    Message::Ping(_)
                        if tokio::time::timeout(WRITE_TIMEOUT, ws.flush())
                            .await
                            .is_err() =>
                    {
                        return End::Close(CloseReason::WriteTimeout);
                    }
                    _ => {}
                }
                if let Err(reason) = write_replies(proxy, ws, &mut replies).await {
                    return End::Close(reason);
                }
            }
        }
    }
}

/// Waits for a client frame or a queued frame, whichever comes first (at random when both
/// are ready).
async fn serve_one<S>(
    ws: &mut Ws<S>,
    rx: &mut OutboxReceiver,
    paused_until: Option<tokio::time::Instant>,
) -> Turn
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let paused = paused_until.is_some();
    let resume = tokio::time::sleep_until(paused_until.unwrap_or_else(tokio::time::Instant::now));
    tokio::select! {
        _ = resume, if paused => Turn::Resume,
        msg = ws.next(), if !paused => match msg {
            None => Turn::Stop(End::ClientClosed),
            // PROTOCOL §1: a message over the frame limit closes with 1009.
            Some(Err(WsError::Capacity(_))) => Turn::Stop(End::Close(CloseReason::TooBig)),
            Some(Err(e)) => Turn::Stop(End::ReadError(e)),
            Some(Ok(m)) => Turn::Client(m),
        },
        frame = rx.recv() => match frame {
            Some(f) => Turn::Queued(f),
            // Unreachable while the machine holds an outbox sender; end cleanly if not.
            None => Turn::Stop(End::Close(CloseReason::ShuttingDown)),
        },
    }
}

/// Writes the machine's replies (in order) with one flush.
async fn write_replies<S>(
    proxy: &Proxy,
    ws: &mut Ws<S>,
    replies: &mut Vec<Bytes>,
) -> Result<(), CloseReason>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    if replies.is_empty() {
        return Ok(());
    }
    let bytes = replies.iter().map(Bytes::len).sum();
    proxy.metrics.sessions.frames_out(replies.len(), bytes);
    let write = async {
        for r in replies.drain(..) {
            ws.feed(Message::Binary(r)).await?;
        }
        ws.flush().await
    };
    match tokio::time::timeout(WRITE_TIMEOUT, write).await {
        Ok(Ok(())) => Ok(()),
        _ => Err(CloseReason::WriteTimeout),
    }
}

/// Writes `first` and whatever else is queued (up to a batch), then flushes once.
async fn write_batch<S>(
    proxy: &Proxy,
    ws: &mut Ws<S>,
    first: Bytes,
    rx: &mut OutboxReceiver,
) -> Result<(), CloseReason>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    // Counted once per batch: one pair of atomic adds for up to WRITE_BATCH frames.
    let (mut frames, mut bytes) = (1, first.len());
    let write = async {
        ws.feed(Message::Binary(first)).await?;
        for _ in 1..WRITE_BATCH {
            match rx.try_recv() {
                Some(f) => {
                    frames += 1;
                    bytes += f.len();
                    ws.feed(Message::Binary(f)).await?
                }
                None => break,
            }
        }
        ws.flush().await
    };
    let written = tokio::time::timeout(WRITE_TIMEOUT, write).await;
    proxy.metrics.sessions.frames_out(frames, bytes);
    match written {
        Ok(Ok(())) => Ok(()),
        _ => Err(CloseReason::WriteTimeout),
    }
}
