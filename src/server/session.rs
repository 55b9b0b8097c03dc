//! One client connection: the NoLag protocol over a WebSocket (PROTOCOL §1–§10).
//!
//! One task per connection owns the socket; it is the only writer. It waits on, in priority
//! order: its outbound queue overflowing (slow consumer → close), shutdown, credential expiry,
//! the idle timer, policy reloads (re-evaluate the actor and every subscription), frames queued
//! by the router, and frames from the client. Every wait the client controls has a timeout,
//! and every failure of client input is an error frame or a close — never a panic, and never
//! anything another session can notice.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::oneshot;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tracing::Instrument;

use super::Proxy;
use crate::auth::Actor;
use crate::auth::session_token::now_unix;
use crate::policy::authorize::{DENIAL_CODE_V2, DENIAL_ERROR_V1, DENIAL_ERROR_V2};
use crate::policy::{Access, Denial, SubscriptionGrant};
use crate::router::{Outbox, SessionId, Subscriber};
use crate::topic::filters::{self, FilterItem};
use crate::topic::{ClientFilter, ClientTopic};
use crate::wire::decode::{PublishFrame, SubscribeFrame};
use crate::wire::encode::{self, ErrorFrame};
use crate::wire::{ClientFrame, FrameError, decode, restore};

/// How long one write to the client may take before the client counts as gone.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the broker may take to acknowledge a publish that asked for it (`msgRef`).
const PUBLISH_ACK_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a reconnecting client's handshake waits for its stored subscription set. A broker
/// sends nothing when there is no retained message, so this is also the cost of restoring
/// an empty set.
const RESTORE_TIMEOUT: Duration = Duration::from_millis(500);
/// Frames written per wake-up before flushing: batches fan-out bursts into few syscalls.
const WRITE_BATCH: usize = 64;

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
            CloseReason::TokenExpired | CloseReason::Revoked | CloseReason::ScopeChanged => 4001,
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
            CloseReason::ShuttingDown => "server shutting down",
            CloseReason::WriteTimeout => "write timeout",
            CloseReason::TooBig => "message too big",
        }
    }
}

struct SubState {
    load_balance: bool,
    group: Option<String>,
    items: Vec<FilterItem>,
    qos: u8,
}

struct Session {
    proxy: Arc<Proxy>,
    id: SessionId,
    socket_id: Arc<str>,
    actor: Arc<Actor>,
    version: u32,
    outbox: Outbox,
    subs: HashMap<Arc<str>, SubState>,
    rate_second: u64,
    rate_count: u32,
}

type Ws<S> = WebSocketStream<S>;

/// Runs a session on an upgraded WebSocket until it ends.
pub(super) async fn run<S>(proxy: Arc<Proxy>, ws: Ws<S>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (id, socket_id) = proxy.new_session_id();
    let span = tracing::info_span!("session", id);
    proxy.session_started();
    let guard = SessionCount(proxy.clone());
    async move {
        let _guard = guard;
        let mut ws = ws;
        let authenticated = match authenticate(&proxy, &mut ws).await {
            Ok(a) => a,
            Err(reason) => {
                if let Some(reason) = reason {
                    tracing::debug!(reason = reason.reason(), "closed before auth");
                    close(&mut ws, reason).await;
                }
                return;
            }
        };
        let Authenticated {
            actor,
            version,
            generation,
            slot: _slot,
            reconnect,
        } = authenticated;
        tracing::debug!(actor = %actor.id, kind = %actor.kind, project = %actor.project, "authenticated");
        let (outbox, rx, overflow) = Outbox::channel(proxy.settings.limits.send_queue);
        let mut session = Session {
            proxy: proxy.clone(),
            id,
            socket_id,
            actor: actor.clone(),
            version,
            outbox,
            subs: HashMap::new(),
            rate_second: 0,
            rate_count: 0,
        };
        // PROTOCOL §13: on an automatic reconnect the SDK never re-subscribes; the server
        // restores what the actor had, re-checked against the current policy.
        let restored = if reconnect {
            session.restore().await
        } else {
            Vec::new()
        };
        let ok = encode::auth_ok(&actor.id, &actor.project, actor.kind.as_str(), version, &restored);
        if let Err(reason) = send(&mut ws, ok).await {
            proxy.router.remove(id, None);
            close(&mut ws, reason).await;
            return;
        }
        let reason = session.main_loop(&mut ws, rx, &overflow, generation).await;
        proxy.router.remove(id, None);
        if let Some(reason) = reason {
            tracing::debug!(reason = reason.reason(), "closing");
            close(&mut ws, reason).await;
        }
    }
    .instrument(span)
    .await
}

/// Decrements the open-session gauge however the session ends (including a panic unwinding
/// or the task being aborted).
struct SessionCount(Arc<Proxy>);

impl Drop for SessionCount {
    fn drop(&mut self) {
        self.0.session_ended();
    }
}

async fn send<S>(ws: &mut Ws<S>, frame: Bytes) -> Result<(), CloseReason>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    match tokio::time::timeout(WRITE_TIMEOUT, ws.send(Message::Binary(frame))).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) => Err(CloseReason::WriteTimeout),
        Err(_) => Err(CloseReason::WriteTimeout),
    }
}

/// How long a close frame may take to go out: a slow consumer's socket may be full, and it
/// is then dropped without one.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

async fn close<S>(ws: &mut Ws<S>, reason: CloseReason)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let frame = CloseFrame {
        code: CloseCode::from(reason.code()),
        reason: reason.reason().into(),
    };
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, ws.close(Some(frame))).await;
}

fn error(e: &str) -> Bytes {
    ErrorFrame {
        error: e,
        ..Default::default()
    }
    .encode()
}

/// The auth handshake (PROTOCOL §4). `Err(None)`: the client went away.
/// A successful handshake: the actor, the negotiated version, and the policy generation the
/// actor was authenticated under.
struct Authenticated {
    actor: Arc<Actor>,
    version: u32,
    generation: u64,
    slot: ActorSlot,
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

async fn authenticate<S>(
    proxy: &Arc<Proxy>,
    ws: &mut Ws<S>,
) -> Result<Authenticated, Option<CloseReason>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let deadline = tokio::time::Instant::now() + proxy.settings.limits.auth_timeout;
    loop {
        let msg = match tokio::time::timeout_at(deadline, ws.next()).await {
            Err(_) => return Err(Some(CloseReason::AuthTimeout)),
            Ok(None) | Ok(Some(Err(_))) => return Err(None),
            Ok(Some(Ok(m))) => m,
        };
        let bytes = match msg {
            Message::Binary(b) => b,
            Message::Text(_) => {
                send(ws, invalid_frame("binary frames only"))
                    .await
                    .map_err(Some)?;
                continue;
            }
            Message::Close(_) => return Err(None),
            _ => continue,
        };
        let auth = match decode(&bytes) {
            Ok(ClientFrame::Heartbeat) => continue, // no reply before auth
            Ok(ClientFrame::Auth(a)) => a,
            Ok(_) => {
                send(ws, error("not_authenticated")).await.map_err(Some)?;
                continue;
            }
            Err(e) => {
                send(ws, frame_error(&e)).await.map_err(Some)?;
                continue;
            }
        };
        let Some(token) = auth.token else {
            send(ws, error("not_authenticated")).await.map_err(Some)?;
            continue;
        };
        let snapshot = proxy.store.load();
        let actor = match snapshot.auth.authenticate(token.expose()) {
            Ok(a) => a,
            Err(e) => {
                tracing::info!(reason = %e, "authentication failed");
                let wire = e.wire_error();
                send(ws, encode::auth_failed(wire)).await.map_err(Some)?;
                return Err(Some(CloseReason::AuthFailed(wire)));
            }
        };
        let max = proxy.settings.limits.connections_per_actor;
        if !proxy.actors.acquire(&actor.project, &actor.id, max) {
            let wire = "connection_limit_reached";
            send(ws, encode::auth_failed(wire)).await.map_err(Some)?;
            return Err(Some(CloseReason::AuthFailed(wire)));
        }
        let slot = ActorSlot(proxy.clone(), actor.clone());
        return Ok(Authenticated {
            actor,
            version: auth.protocol_version.clamp(1, 2),
            generation: snapshot.generation,
            slot,
            reconnect: auth.reconnect,
        });
    }
}

fn invalid_frame(hint: &str) -> Bytes {
    ErrorFrame {
        error: "invalid_frame",
        hint: Some(hint),
        ..Default::default()
    }
    .encode()
}

fn frame_error(e: &FrameError) -> Bytes {
    match e {
        FrameError::TooManyFilters => error("too_many_filters (max 100)"),
        other => invalid_frame(&other.to_string()),
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

impl Session {
    async fn main_loop<S>(
        &mut self,
        ws: &mut Ws<S>,
        mut rx: tokio::sync::mpsc::Receiver<Bytes>,
        overflow: &crate::router::Overflow,
        authenticated_under: u64,
    ) -> Option<CloseReason>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let idle_timeout = self.proxy.settings.limits.idle_timeout;
        let idle = tokio::time::sleep(idle_timeout);
        tokio::pin!(idle);
        let expiry = tokio::time::sleep_until(match self.actor.expires_at {
            Some(t) => instant_at(t),
            None => tokio::time::Instant::now() + MAX_TIMER,
        });
        tokio::pin!(expiry);
        let mut shutdown = self.proxy.shutdown_signal();
        let mut policy = self.proxy.store.subscribe();
        // A reload may have landed between authentication and here: catch up before serving.
        if *policy.borrow_and_update() != authenticated_under
            && let Err(reason) = self.reevaluate(ws).await
        {
            return Some(reason);
        }

        loop {
            tokio::select! {
                biased;
                _ = overflow.wait() => return Some(CloseReason::SlowConsumer),
                _ = super::shutting_down(&mut shutdown) => return Some(CloseReason::ShuttingDown),
                _ = &mut expiry => return Some(CloseReason::TokenExpired),
                _ = &mut idle => return Some(CloseReason::Idle),
                changed = policy.changed() => {
                    if changed.is_ok()
                        && let Err(reason) = self.reevaluate(ws).await
                    {
                        return Some(reason);
                    }
                }
                frame = rx.recv() => {
                    let frame = frame?;
                    // A client that stops reading blocks this write; its queue then overflows,
                    // which must end the session at once, not after the write timeout.
                    tokio::select! {
                        biased;
                        _ = overflow.wait() => return Some(CloseReason::SlowConsumer),
                        r = self.write_batch(ws, frame, &mut rx) => {
                            if let Err(r) = r {
                                return Some(r);
                            }
                        }
                    }
                }
                msg = ws.next() => {
                    let msg = match msg {
                        // PROTOCOL §1: a message over the frame limit closes with 1009.
                        Some(Err(tokio_tungstenite::tungstenite::Error::Capacity(_))) => {
                            return Some(CloseReason::TooBig);
                        }
                        None | Some(Err(_)) => return None,
                        Some(Ok(m)) => m,
                    };
                    idle.as_mut().reset(tokio::time::Instant::now() + idle_timeout);
                    match msg {
                        Message::Binary(b) => {
                            if let Err(r) = self.handle(ws, &b).await {
                                return Some(r);
                            }
                        }
                        Message::Text(_) => {
                            if let Err(r) = send(ws, invalid_frame("binary frames only")).await {
                                return Some(r);
                            }
                        }
                        Message::Close(_) => return None,
                        // Pings are answered by tungstenite on the next write or flush.
                        Message::Ping(_)
                            if tokio::time::timeout(WRITE_TIMEOUT, ws.flush()).await.is_err() =>
                        {
                            return Some(CloseReason::WriteTimeout);
                        }
                        _ => {}
                    }
                }
            }
        }
    }

    /// Writes `first` and whatever else is queued (up to a batch), then flushes once.
    async fn write_batch<S>(
        &mut self,
        ws: &mut Ws<S>,
        first: Bytes,
        rx: &mut tokio::sync::mpsc::Receiver<Bytes>,
    ) -> Result<(), CloseReason>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let write = async {
            ws.feed(Message::Binary(first)).await?;
            for _ in 1..WRITE_BATCH {
                match rx.try_recv() {
                    Ok(f) => ws.feed(Message::Binary(f)).await?,
                    Err(_) => break,
                }
            }
            ws.flush().await
        };
        match tokio::time::timeout(WRITE_TIMEOUT, write).await {
            Ok(Ok(())) => Ok(()),
            _ => Err(CloseReason::WriteTimeout),
        }
    }

    async fn handle<S>(&mut self, ws: &mut Ws<S>, bytes: &[u8]) -> Result<(), CloseReason>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let reply = match decode(bytes) {
            Err(e) => Some(frame_error(&e)),
            Ok(frame) => match frame {
                ClientFrame::Heartbeat => Some(encode::heartbeat()),
                ClientFrame::Publish(p) => self.publish(p).await,
                ClientFrame::Subscribe(s) => {
                    let reply = self.subscribe(s);
                    self.persist().await;
                    Some(reply)
                }
                ClientFrame::Unsubscribe { topic } => {
                    self.proxy.router.remove(self.id, Some(topic));
                    if self.subs.remove(topic).is_some() {
                        self.persist().await;
                    }
                    Some(encode::unsubscribed(topic))
                }
                ClientFrame::SetFilters { topic, filters } => {
                    let reply = self.set_filters(topic, filters);
                    self.persist().await;
                    Some(reply)
                }
                // Presence and lobbies (PROTOCOL §11–12) are not served by this build; acks
                // only matter with message recording, which is off. All are ignored, as the
                // protocol ignores frames it does not act on.
                _ => None,
            },
        };
        match reply {
            Some(frame) => send(ws, frame).await,
            None => Ok(()),
        }
    }

    fn denial(&self, topic: &str, d: Denial, msg_ref: Option<&str>) -> Bytes {
        let hint = d.to_string();
        if self.version >= 2 {
            ErrorFrame {
                error: DENIAL_ERROR_V2,
                code: Some(DENIAL_CODE_V2),
                topic: Some(topic),
                hint: Some(&hint),
                msg_ref,
                ..Default::default()
            }
            .encode()
        } else {
            ErrorFrame {
                error: DENIAL_ERROR_V1,
                topic: Some(topic),
                msg_ref,
                ..Default::default()
            }
            .encode()
        }
    }

    fn topic_error(topic: &str, hint: &str, msg_ref: Option<&str>) -> Bytes {
        ErrorFrame {
            error: "invalid_topic",
            topic: Some(topic),
            hint: Some(hint),
            msg_ref,
            ..Default::default()
        }
        .encode()
    }

    /// The publish pipeline (PROTOCOL §9): rate → size → authorization → filters → upstream.
    async fn publish(&mut self, p: PublishFrame<'_>) -> Option<Bytes> {
        let limits = &self.proxy.settings.limits;
        let msg_ref = p.msg_ref;
        let now = now_unix();
        if now != self.rate_second {
            self.rate_second = now;
            self.rate_count = 0;
        }
        if self.rate_count >= limits.publish_per_second {
            return Some(
                ErrorFrame {
                    error: "rate_limit_exceeded",
                    code: Some(42910),
                    topic: Some(p.topic),
                    msg_ref,
                    ..Default::default()
                }
                .encode(),
            );
        }
        self.rate_count += 1;
        if p.data.len() > limits.max_message_bytes {
            return Some(
                ErrorFrame {
                    error: "message_too_large",
                    code: Some(42930),
                    topic: Some(p.topic),
                    msg_ref,
                    max_size_bytes: Some(limits.max_message_bytes as u64),
                    ..Default::default()
                }
                .encode(),
            );
        }
        let topic = match ClientTopic::parse(p.topic) {
            Ok(t) => t,
            Err(e) => return Some(Self::topic_error(p.topic, &e.to_string(), msg_ref)),
        };
        let snapshot = self.proxy.store.load();
        if let Err(d) = snapshot.policy.authorize(&self.actor, topic, Access::Write) {
            return Some(self.denial(p.topic, d, msg_ref));
        }
        let filter = match filters::publish_filter(p.filter, &p.filters) {
            Ok(f) => f,
            Err(e) => {
                return Some(
                    ErrorFrame {
                        error: &e.to_string(),
                        topic: Some(p.topic),
                        msg_ref,
                        ..Default::default()
                    }
                    .encode(),
                );
            }
        };
        let upstream =
            self.proxy
                .router
                .layout()
                .publish_topic(self.actor.scope(), topic, filter.as_deref());
        let payload = crate::wire::envelope::wrap(p.data, &self.socket_id, p.echo);
        let qos = crate::upstream::publish_qos(p.qos);
        let (ack, ack_rx) = match msg_ref {
            Some(_) => {
                let (tx, rx) = oneshot::channel();
                (Some(tx), Some(rx))
            }
            None => (None, None),
        };
        let sent = self
            .proxy
            .pool
            .publish(upstream, qos, p.retain, payload, ack, PUBLISH_ACK_TIMEOUT)
            .await;
        if let Err(e) = sent {
            tracing::warn!(error = %e, "publish not taken by the upstream pool");
            return Some(
                ErrorFrame {
                    error: "broker_unavailable",
                    topic: Some(p.topic),
                    msg_ref,
                    ..Default::default()
                }
                .encode(),
            );
        }
        if let (Some(msg_ref), Some(ack_rx)) = (msg_ref, ack_rx) {
            // The `published` reply waits for the broker without holding up this session.
            let outbox = self.outbox.clone();
            let (topic, msg_ref) = (p.topic.to_string(), msg_ref.to_string());
            tokio::spawn(async move {
                let frame = match tokio::time::timeout(PUBLISH_ACK_TIMEOUT, ack_rx).await {
                    Ok(Ok(Ok(()))) => encode::published(&topic, &msg_ref),
                    _ => ErrorFrame {
                        error: "publish_failed",
                        topic: Some(&topic),
                        msg_ref: Some(&msg_ref),
                        hint: Some("the broker did not acknowledge the publish"),
                        ..Default::default()
                    }
                    .encode(),
                };
                outbox.push(frame);
            });
        }
        None
    }

    /// Upstream filters for a subscription of this actor, or the error frame to send.
    fn plan(
        &self,
        topic: &str,
        items: &[FilterItem],
        load_balance: bool,
        group: Option<&str>,
    ) -> Result<(Vec<String>, SubscriptionGrant), Bytes> {
        let filter = ClientFilter::parse(topic)
            .map_err(|e| Self::topic_error(topic, &e.to_string(), None))?;
        let snapshot = self.proxy.store.load();
        let grant = snapshot
            .policy
            .authorize_subscription(&self.actor, &filter)
            .map_err(|d| self.denial(topic, d, None))?;
        let filter_error = |e: filters::FilterError| {
            ErrorFrame {
                error: &e.to_string(),
                topic: Some(topic),
                ..Default::default()
            }
            .encode()
        };
        let sub = filters::subscription_filters(items).map_err(filter_error)?;
        let share = if load_balance {
            let group = match group {
                Some(g) => {
                    filters::check_group(g).map_err(|e| {
                        ErrorFrame {
                            error: &e.to_string(),
                            topic: Some(topic),
                            ..Default::default()
                        }
                        .encode()
                    })?;
                    g.to_string()
                }
                // PROTOCOL §10: the group defaults to the actor id.
                None => filters::encode_group(&self.actor.id).into_owned(),
            };
            Some(group)
        } else {
            None
        };
        let upstream = self
            .proxy
            .router
            .layout()
            .subscription_filters(self.actor.scope(), &filter, &sub, share.as_deref())
            .map_err(filter_error)?;
        Ok((upstream, grant))
    }

    fn subscriber(&self, topic: &str, grant: SubscriptionGrant) -> Subscriber {
        Subscriber {
            session: self.id,
            topic: topic.into(),
            actor: self.actor.clone(),
            check_delivery: grant == SubscriptionGrant::CheckEachDelivery,
            socket_id: self.socket_id.clone(),
            outbox: self.outbox.clone(),
        }
    }

    fn subscribe(&mut self, s: SubscribeFrame<'_>) -> Bytes {
        let max = self.proxy.settings.limits.subscriptions_per_connection as usize;
        if self.subs.len() >= max && !self.subs.contains_key(s.topic) {
            return ErrorFrame {
                error: "too_many_subscriptions",
                topic: Some(s.topic),
                hint: Some("limits.subscriptions_per_connection"),
                ..Default::default()
            }
            .encode();
        }
        let (upstream, grant) =
            match self.plan(s.topic, &s.filters, s.load_balance, s.load_balance_group) {
                Ok(p) => p,
                Err(frame) => return frame,
            };
        let sub = self.subscriber(s.topic, grant);
        if !self.proxy.router.replace(&upstream, s.qos, &sub) {
            return error("subscription_limit_reached");
        }
        self.subs.insert(
            s.topic.into(),
            SubState {
                load_balance: s.load_balance,
                group: s.load_balance_group.map(str::to_owned),
                items: s.filters,
                qos: s.qos,
            },
        );
        encode::subscribed(s.topic, s.load_balance)
    }

    fn set_filters(&mut self, topic: &str, items: Vec<FilterItem>) -> Bytes {
        let Some(state) = self.subs.get(topic) else {
            return ErrorFrame {
                error: "not_subscribed",
                topic: Some(topic),
                ..Default::default()
            }
            .encode();
        };
        let (upstream, grant) =
            match self.plan(topic, &items, state.load_balance, state.group.as_deref()) {
                Ok(p) => p,
                Err(frame) => return frame,
            };
        let sub = self.subscriber(topic, grant);
        // PROTOCOL §9: setFilters subscriptions use QoS 1.
        if !self.proxy.router.replace(&upstream, 1, &sub) {
            return error("subscription_limit_reached");
        }
        let echoed = encode_filter_items(&items);
        if let Some(state) = self.subs.get_mut(topic) {
            state.items = items;
            state.qos = 1;
        }
        encode::filters_updated(topic, echoed)
    }

    /// The actor's subscription set as stored for reconnect restore.
    fn entries(&self) -> Vec<restore::Entry> {
        let mut entries: Vec<restore::Entry> = self
            .subs
            .iter()
            .map(|(topic, st)| restore::Entry {
                name: topic.to_string(),
                load_balance: st.load_balance,
                group: st.group.clone(),
                filters: st.items.clone(),
            })
            .collect();
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        entries
    }

    /// Stores the subscription set where any replica can read it: a retained message on the
    /// actor's reserved topic (an empty payload clears it). Keyed by actor, like the
    /// reference: the actor's last socket to change its subscriptions wins.
    async fn persist(&self) {
        let entries = self.entries();
        let payload = if entries.is_empty() {
            Bytes::new()
        } else {
            restore::encode(&entries)
        };
        let topic = self
            .proxy
            .router
            .layout()
            .restore_topic(&self.actor.project, &self.actor.id);
        let qos = crate::upstream::publish_qos(1);
        if let Err(e) = self
            .proxy
            .pool
            .publish(topic, qos, true, payload, None, PUBLISH_ACK_TIMEOUT)
            .await
        {
            tracing::warn!(error = %e, "cannot store the subscription set for reconnect restore");
        }
    }

    /// Restores the stored subscription set (QoS 1, re-checked against the current policy) and
    /// returns the entries restored, for `restoredSubscriptions`.
    async fn restore(&mut self) -> Vec<Bytes> {
        let topic = self
            .proxy
            .router
            .layout()
            .restore_topic(&self.actor.project, &self.actor.id);
        let Some(payload) = self
            .proxy
            .router
            .fetch_retained(&topic, RESTORE_TIMEOUT)
            .await
        else {
            return Vec::new();
        };
        let entries = match restore::decode(&payload) {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(error = %e, "stored subscription set unreadable; nothing restored");
                return Vec::new();
            }
        };
        let max = self.proxy.settings.limits.subscriptions_per_connection as usize;
        let mut restored = Vec::new();
        for e in entries.into_iter().take(max) {
            let Ok((upstream, grant)) =
                self.plan(&e.name, &e.filters, e.load_balance, e.group.as_deref())
            else {
                continue; // no longer allowed: not restored
            };
            let sub = self.subscriber(&e.name, grant);
            if !self.proxy.router.replace(&upstream, 1, &sub) {
                continue;
            }
            restored.push(e.encode());
            self.subs.insert(
                e.name.as_str().into(),
                SubState {
                    load_balance: e.load_balance,
                    group: e.group,
                    items: e.filters,
                    qos: 1,
                },
            );
        }
        restored
    }

    /// After a policy reload: re-check the actor, then every subscription.
    async fn reevaluate<S>(&mut self, ws: &mut Ws<S>) -> Result<(), CloseReason>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let snapshot = self.proxy.store.snapshot();
        let actor = match snapshot.auth.revalidate(&self.actor, now_unix()) {
            Ok(a) => a,
            Err(crate::auth::AuthError::Expired) => return Err(CloseReason::TokenExpired),
            Err(e) => {
                tracing::info!(reason = %e, "actor no longer valid after policy reload");
                return Err(CloseReason::Revoked);
            }
        };
        if actor.scope != self.actor.scope {
            // Every upstream filter of this session names the old namespace.
            return Err(CloseReason::ScopeChanged);
        }
        self.actor = actor;
        let topics: Vec<Arc<str>> = self.subs.keys().cloned().collect();
        for topic in topics {
            let Some(state) = self.subs.get(&topic) else {
                continue;
            };
            let plan = self.plan(
                &topic,
                &state.items,
                state.load_balance,
                state.group.as_deref(),
            );
            let qos = state.qos;
            match plan {
                Ok((upstream, grant)) => {
                    let sub = self.subscriber(&topic, grant);
                    self.proxy.router.replace(&upstream, qos, &sub);
                }
                Err(frame) => {
                    // Revoked: stop delivering at once and tell the client why.
                    self.proxy.router.remove(self.id, Some(&topic));
                    self.subs.remove(&topic);
                    send(ws, frame).await?;
                }
            }
        }
        Ok(())
    }
}

/// Re-encodes a `filters` array for the `filtersUpdated` echo.
fn encode_filter_items(items: &[FilterItem]) -> Bytes {
    let mut out = Vec::new();
    encode::write_filter_items(&mut out, items);
    out.into()
}
