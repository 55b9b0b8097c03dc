//! The protocol side of a session: what an authenticated connection does with each client
//! frame (PROTOCOL §5–§10, §13), as a state machine that never touches the socket, a timer
//! or a task.
//!
//! [`Machine::on_frame`] takes one inbound frame and appends the replies to write, in order;
//! [`Machine::reevaluate`] re-plans after a policy reload; [`Machine::restore`] re-subscribes a
//! stored set. Its other effects go to the shared machinery it is handed: subscriptions to the
//! router (through the session's [`Membership`]), publishes to the upstream pool (which never
//! waits), the subscription set to the restore writer. The driver (`super`) owns the socket,
//! the clock-driven closes and the outbound queue. Every frame type and every limit is unit
//! tested (`tests`) without a socket or a broker; what only a broker can show (its Maximum
//! Packet Size, the `published` reply, replies that wait for a SUBACK) is left to the
//! integration tests.
//!
//! Limits enforced here, per connection: publishes per second (fixed window, PROTOCOL §9),
//! `subscribe`/`unsubscribe`/`setFilters` per second (token bucket,
//! `limits.control_per_second`; heartbeats share it, beyond which they get no echo), new
//! upstream filters per second (`limits.filters_per_second`, bursts of a connection's cap),
//! subscriptions per connection, upstream filters per connection and per replica (the
//! router), bytes of the stored subscription set (`limits.restore_bytes`), message size,
//! and what the broker accepts (its Maximum Packet Size).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::CloseReason;
use crate::auth::Actor;
use crate::auth::session_token::now_unix;
use crate::metrics::Dropped;
use crate::policy::{Access, SubscriptionGrant};
use crate::router::{JoinError, Membership, Outbox, Readiness, Reply, Subscriber};
use crate::server::Proxy;
use crate::topic::filters::{self, FilterItem};
use crate::topic::{ClientFilter, ClientTopic};
use crate::upstream::PublishError;
use crate::webhook::{EventKind, Report};
use crate::wire::decode::{PublishFrame, SubscribeFrame};
use crate::wire::encode::{self, errors};
use crate::wire::{ClientFrame, FrameError, decode, restore};

/// How long the broker may take to acknowledge a publish that asked for it (`msgRef`).
const PUBLISH_ACK_TIMEOUT: Duration = Duration::from_secs(10);

/// One subscription as the client asked for it.
#[derive(Debug, Clone)]
struct SubState {
    load_balance: bool,
    group: Option<String>,
    items: Vec<FilterItem>,
    /// Bytes of this subscription's entry in the stored set.
    record_bytes: usize,
}

impl SubState {
    fn entry(&self, name: &str) -> restore::Entry {
        restore::Entry {
            name: name.to_string(),
            load_balance: self.load_balance,
            group: self.group.clone(),
            filters: self.items.clone(),
        }
    }
}

/// A token bucket: `rate` per second, bursts of up to `rate`.
#[derive(Debug)]
pub(crate) struct Bucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    at: Instant,
}

impl Bucket {
    pub(crate) fn new(rate: u32, now: Instant) -> Self {
        Self::with_burst(rate, rate, now)
    }

    /// `rate` per second, bursts of up to `burst` (at least `rate`).
    pub(crate) fn with_burst(rate: u32, burst: u32, now: Instant) -> Self {
        let rate = f64::from(rate.max(1));
        let burst = f64::from(burst).max(rate);
        Self {
            rate,
            burst,
            tokens: burst,
            at: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.at = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
    }

    pub(super) fn take(&mut self, now: Instant) -> bool {
        self.take_n(1, now)
    }

    /// Takes `n` tokens if there are that many; takes none otherwise.
    pub(crate) fn take_n(&mut self, n: usize, now: Instant) -> bool {
        self.refill(now);
        let n = n as f64;
        if self.tokens >= n {
            self.tokens -= n;
            true
        } else {
            false
        }
    }

    /// How long until `n` tokens are there (zero when they are now; `n` beyond the burst
    /// waits as if the bucket refilled past it).
    pub(crate) fn wait_for(&mut self, n: usize, now: Instant) -> Duration {
        self.refill(now);
        let missing = n as f64 - self.tokens;
        Duration::from_secs_f64((missing / self.rate).max(0.0))
    }

    /// Takes a token even when there is none, going into debt: for work already done (a frame
    /// already read). `Some(t)`: the bucket is in debt until `t`.
    pub(super) fn charge(&mut self, now: Instant) -> Option<Instant> {
        self.refill(now);
        self.tokens -= 1.0;
        (self.tokens < 0.0).then(|| now + Duration::from_secs_f64(-self.tokens / self.rate))
    }
}

/// An authenticated session's protocol state.
pub(super) struct Machine {
    proxy: Arc<Proxy>,
    socket_id: Arc<str>,
    actor: Arc<Actor>,
    version: u32,
    outbox: Outbox,
    membership: Membership,
    subs: HashMap<Arc<str>, SubState>,
    /// PROTOCOL §9: a fixed window aligned to the wall-clock second.
    rate_second: u64,
    rate_count: u32,
    control: Bucket,
    /// `limits.filters_per_second`: new upstream filters joined.
    filter_joins: Bucket,
    /// Sum of `record_bytes` over `subs`.
    record_bytes: usize,
    restore_topic: String,
    /// The set as last handed to the restore writer: unchanged sets are not written again.
    submitted: Option<Bytes>,
    /// `presence.frames_per_second`: presence, getPresence and lobby frames.
    presence_rate: Bucket,
    /// `app/room` the actor was last present in (from the restore record, then this
    /// connection's own), stored with the subscription set.
    remembered_room: Option<String>,
    /// Lobby slugs this connection follows.
    lobbies: std::collections::HashSet<Arc<str>>,
    /// Whether the close was abnormal (the default): presence then lingers for the grace
    /// period, so a reconnect does not flap.
    linger_on_close: bool,
}

impl Drop for Machine {
    fn drop(&mut self) {
        self.proxy
            .presence
            .close(self.membership.session(), self.linger_on_close);
    }
}

/// A subscription that could not be made, as its error frame.
type Refusal = Bytes;

impl Machine {
    pub(super) fn new(
        proxy: Arc<Proxy>,
        session: crate::router::SessionId,
        socket_id: Arc<str>,
        actor: Arc<Actor>,
        version: u32,
        outbox: Outbox,
    ) -> Self {
        let limits = proxy.settings.limits;
        let membership = proxy
            .router
            .membership(session, limits.filters_per_connection as usize);
        let restore_topic =
            proxy
                .router
                .layout()
                .restore_topic(&actor.project, actor.scope(), &actor.id);
        Self {
            socket_id,
            actor,
            version,
            outbox,
            membership,
            subs: HashMap::new(),
            rate_second: 0,
            rate_count: 0,
            control: Bucket::new(limits.control_per_second, Instant::now()),
            filter_joins: Bucket::with_burst(
                limits.filters_per_second,
                limits.filters_per_connection,
                Instant::now(),
            ),
            record_bytes: 0,
            restore_topic,
            submitted: None,
            presence_rate: Bucket::new(proxy.presence.settings().frames_per_second, Instant::now()),
            remembered_room: None,
            lobbies: std::collections::HashSet::new(),
            linger_on_close: true,
            proxy,
        }
    }

    /// The session ends by a clean close (the client's close frame, or the proxy's own
    /// decision): presence leaves at once instead of lingering.
    pub(super) fn end_cleanly(&mut self) {
        self.linger_on_close = false;
    }

    pub(super) fn actor(&self) -> &Arc<Actor> {
        &self.actor
    }

    /// Handles one binary frame from the client; replies are appended to `out` in order.
    pub(super) fn on_frame(&mut self, bytes: &[u8], out: &mut Vec<Bytes>) {
        let metrics = &self.proxy.metrics.sessions;
        let frame = match decode(bytes) {
            Ok(f) => f,
            Err(e) => {
                metrics.frame_in("invalid", bytes.len());
                out.push(frame_error(&e));
                return;
            }
        };
        metrics.frame_in(frame.kind(), bytes.len());
        let now = Instant::now();
        match frame {
            // PROTOCOL §3: echoed, within the control budget (an echo flood is refused
            // silently: heartbeats are never answered with errors).
            ClientFrame::Heartbeat if self.control.take(now) => out.push(encode::heartbeat()),
            ClientFrame::Heartbeat => {}
            ClientFrame::Publish(p) => match self.publish(p) {
                Ok(()) => self.proxy.metrics.sessions.published(self.actor.kind),
                Err((why, reply)) => {
                    self.proxy.metrics.sessions.dropped(why);
                    out.push(reply);
                }
            },
            ClientFrame::Subscribe(s) => {
                if !self.control.take(now) {
                    out.push(errors::control_rate_limited(s.topic));
                    return;
                }
                if let Some(reply) = self.subscribe(s) {
                    out.push(reply);
                }
            }
            ClientFrame::Unsubscribe { topic } => {
                if !self.control.take(now) {
                    out.push(errors::control_rate_limited(topic));
                    return;
                }
                if let Some(st) = self.subs.remove(topic) {
                    self.report(EventKind::Unsubscribe, topic, st.load_balance);
                    self.membership.remove(topic);
                    self.record_bytes -= st.record_bytes;
                    self.submit_restore();
                }
                out.push(encode::unsubscribed(topic));
            }
            ClientFrame::SetFilters { topic, filters } => {
                if !self.control.take(now) {
                    out.push(errors::control_rate_limited(topic));
                    return;
                }
                if let Some(reply) = self.set_filters(topic, filters) {
                    out.push(reply);
                }
            }
            f @ (ClientFrame::Presence { .. }
            | ClientFrame::GetPresence { .. }
            | ClientFrame::LobbySubscribe { .. }
            | ClientFrame::GetLobbyPresence { .. }
            | ClientFrame::LobbyUnsubscribe { .. })
                // Over the budget: the error frame is out, the frame falls through, ignored.
                if self.presence_budget(now, out) =>
            {
                self.presence_frame(f, out)
            }
            // A second `auth` is ignored (PROTOCOL §7); acks only matter with message
            // recording, which is off. Both are ignored, as the protocol ignores frames it
            // does not act on.
            _ => {}
        }
    }

    /// The publish pipeline (PROTOCOL §9): rate → size → authorization → filters → upstream.
    /// A refused publish: why (for the metrics) and the error frame.
    fn publish(&mut self, p: PublishFrame<'_>) -> Result<(), (Dropped, Bytes)> {
        let limits = &self.proxy.settings.limits;
        let msg_ref = p.msg_ref;
        let now = now_unix();
        if now != self.rate_second {
            self.rate_second = now;
            self.rate_count = 0;
        }
        if self.rate_count >= limits.publish_per_second {
            return Err((Dropped::Rate, errors::rate_limited(p.topic, msg_ref)));
        }
        self.rate_count += 1;
        if p.data.len() > limits.max_message_bytes {
            let max = limits.max_message_bytes;
            return Err((
                Dropped::Size,
                errors::message_too_large(p.topic, msg_ref, max),
            ));
        }
        let topic = match ClientTopic::parse(p.topic) {
            Ok(t) => t,
            Err(e) => {
                let reply = errors::invalid_topic(p.topic, &e.to_string(), msg_ref);
                return Err((Dropped::Invalid, reply));
            }
        };
        let snapshot = self.proxy.store.load();
        if let Err(d) = snapshot.policy.authorize(&self.actor, topic, Access::Write) {
            tracing::debug!(actor = %self.actor.id, topic = p.topic, reason = %d, "publish denied");
            let reply = errors::denied(self.version, p.topic, &d.to_string(), msg_ref);
            return Err((Dropped::Acl, reply));
        }
        let filter = match filters::publish_filter(p.filter, &p.filters) {
            Ok(f) => f,
            Err(e) => {
                let reply = errors::filter_error(&e.to_string(), p.topic, msg_ref);
                return Err((Dropped::Invalid, reply));
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
        if let Err(e) = self
            .proxy
            .pool
            .publish(upstream, qos, p.retain, payload, ack)
        {
            return Err(match e {
                PublishError::TooLarge { max, .. } => {
                    // What the client may send is what fits the broker's packet.
                    let max = max.saturating_sub(p.topic.len() + 64);
                    let reply = errors::message_too_large(p.topic, msg_ref, max);
                    (Dropped::Size, reply)
                }
                PublishError::InvalidTopic => {
                    let reply =
                        errors::invalid_topic(p.topic, "not a valid upstream topic", msg_ref);
                    (Dropped::Invalid, reply)
                }
                PublishError::Saturated | PublishError::Closed | PublishError::Lost => {
                    tracing::debug!(actor = %self.actor.id, error = %e, "publish refused by the upstream pool");
                    (
                        Dropped::Broker,
                        errors::broker_unavailable(p.topic, msg_ref),
                    )
                }
            });
        }
        if let Some(project) = snapshot.policy.projects.get(&*self.actor.project) {
            let report = Report::of(EventKind::Publish, &self.actor)
                .at(p.topic)
                .with_payload(p.data);
            self.proxy.webhooks.emit(project, report);
        }
        if let (Some(msg_ref), Some(ack_rx)) = (msg_ref, ack_rx) {
            // The `published` reply waits for the broker without holding up this session.
            // At most publish_per_second × PUBLISH_ACK_TIMEOUT of these per connection.
            let outbox = self.outbox.clone();
            let (topic, msg_ref) = (p.topic.to_string(), msg_ref.to_string());
            let lost = self.proxy.metrics.sessions.dropped_counter(Dropped::Broker);
            tokio::spawn(async move {
                let frame = match tokio::time::timeout(PUBLISH_ACK_TIMEOUT, ack_rx).await {
                    Ok(Ok(Ok(()))) => encode::published(&topic, &msg_ref),
                    _ => {
                        lost.inc();
                        errors::publish_failed(&topic, &msg_ref)
                    }
                };
                outbox.push(frame);
            });
        }
        Ok(())
    }

    /// A subscription of this connection began or ended: to the webhooks.
    fn report(&self, kind: EventKind, topic: &str, load_balance: bool) {
        let snapshot = self.proxy.store.load();
        let Some(project) = snapshot.policy.projects.get(&*self.actor.project) else {
            return;
        };
        if project.webhooks.is_empty() {
            return;
        }
        let data = serde_json::json!({
            "connection": &*self.socket_id,
            "load_balance": load_balance,
        });
        let report = Report::of(kind, &self.actor).at(topic).with_data(data);
        self.proxy.webhooks.emit(project, report);
    }

    /// Upstream filters for a subscription of this actor, or the error frame to send.
    fn plan(
        &self,
        topic: &str,
        items: &[FilterItem],
        load_balance: bool,
        group: Option<&str>,
    ) -> Result<(Vec<String>, SubscriptionGrant), Refusal> {
        let filter = ClientFilter::parse(topic)
            .map_err(|e| errors::invalid_topic(topic, &e.to_string(), None))?;
        let snapshot = self.proxy.store.load();
        let grant = snapshot
            .policy
            .authorize_subscription(&self.actor, &filter)
            .map_err(|d| {
                tracing::debug!(actor = %self.actor.id, topic, reason = %d, "subscription denied");
                errors::denied(self.version, topic, &d.to_string(), None)
            })?;
        let filter_error =
            |e: &dyn std::fmt::Display| errors::filter_error(&e.to_string(), topic, None);
        let sub = filters::subscription_filters(items).map_err(|e| filter_error(&e))?;
        let share = if load_balance {
            Some(match group {
                Some(g) => {
                    filters::check_group(g).map_err(|e| filter_error(&e))?;
                    g.to_string()
                }
                // PROTOCOL §10: the group defaults to the actor id.
                None => filters::encode_group(&self.actor.id).into_owned(),
            })
        } else {
            None
        };
        let upstream = self
            .proxy
            .router
            .layout()
            .subscription_filters(self.actor.scope(), &filter, &sub, share.as_deref())
            .map_err(|e| filter_error(&e))?;
        Ok((upstream, grant))
    }

    fn subscriber(&self, topic: &str, grant: SubscriptionGrant) -> Subscriber {
        Subscriber {
            session: self.membership.session(),
            topic: topic.into(),
            actor: self.actor.clone(),
            check_delivery: grant == SubscriptionGrant::CheckEachDelivery,
            socket_id: self.socket_id.clone(),
            outbox: self.outbox.clone(),
        }
    }

    /// Makes subscription `topic` the planned one, within the limits. `Ok(true)`: live now.
    fn join(&mut self, topic: &str, state: SubState, reply: Reply) -> Result<Readiness, Refusal> {
        let limits = &self.proxy.settings.limits;
        if self.subs.len() >= limits.subscriptions_per_connection as usize
            && !self.subs.contains_key(topic)
        {
            return Err(errors::too_many_subscriptions(
                topic,
                "limits.subscriptions_per_connection",
            ));
        }
        let previous = self.subs.get(topic).map_or(0, |s| s.record_bytes);
        let record_bytes = self.record_bytes - previous + state.record_bytes;
        let record = restore::record_len(
            self.actor.scope(),
            &self.actor.id,
            record_bytes + restore::room_len(self.remembered_room.as_deref()),
        );
        if record > limits.restore_bytes {
            return Err(errors::too_many_subscriptions(
                topic,
                "limits.restore_bytes",
            ));
        }
        let (upstream, grant) = self.plan(
            topic,
            &state.items,
            state.load_balance,
            state.group.as_deref(),
        )?;
        // What the change costs the broker: one SUBSCRIBE per filter new to this session
        // (and, later, one UNSUBSCRIBE each). Over the connection's cap, `replace` refuses it.
        let (joins, _) = self.membership.changes(topic, &upstream);
        if joins <= limits.filters_per_connection as usize
            && !self.filter_joins.take_n(joins, Instant::now())
        {
            return Err(errors::filters_rate_limited(topic));
        }
        let sub = self.subscriber(topic, grant);
        let ready = self
            .membership
            .replace(&upstream, &sub, reply)
            .map_err(|e| {
                let limit = match e {
                    JoinError::ConnectionLimit => "limits.filters_per_connection",
                    JoinError::ReplicaLimit => "upstream.max_filters",
                };
                errors::too_many_subscriptions(topic, limit)
            })?;
        self.record_bytes = record_bytes;
        let load_balance = state.load_balance;
        if self.subs.insert(topic.into(), state).is_none() {
            self.report(EventKind::Subscribe, topic, load_balance);
        }
        Ok(ready)
    }

    fn sub_state(
        topic: &str,
        load_balance: bool,
        group: Option<String>,
        items: Vec<FilterItem>,
    ) -> SubState {
        let mut st = SubState {
            load_balance,
            group,
            items,
            record_bytes: 0,
        };
        st.record_bytes = st.entry(topic).encode().len();
        st
    }

    fn subscribe(&mut self, s: SubscribeFrame<'_>) -> Option<Bytes> {
        let state = Self::sub_state(
            s.topic,
            s.load_balance,
            s.load_balance_group.map(str::to_owned),
            s.filters,
        );
        let reply = encode::subscribed(s.topic, s.load_balance);
        let joined = self.join(s.topic, state, Reply::Frame(reply.clone()));
        self.answer(joined, reply)
    }

    fn set_filters(&mut self, topic: &str, items: Vec<FilterItem>) -> Option<Bytes> {
        let Some(current) = self.subs.get(topic) else {
            return Some(errors::not_subscribed(topic));
        };
        let echoed = encode_filter_items(&items);
        let state = Self::sub_state(topic, current.load_balance, current.group.clone(), items);
        let reply = encode::filters_updated(topic, echoed);
        let joined = self.join(topic, state, Reply::Frame(reply.clone()));
        self.answer(joined, reply)
    }

    /// The reply to a subscribe or setFilters now, if any; a change is stored. A refused one
    /// changed nothing and stores nothing: a fresh session (nothing submitted yet) would
    /// otherwise write its empty set and clear the actor's stored one.
    fn answer(&mut self, joined: Result<Readiness, Refusal>, reply: Bytes) -> Option<Bytes> {
        match joined {
            Ok(ready) => {
                self.submit_restore();
                (ready == Readiness::Now).then_some(reply)
            }
            Err(refusal) => Some(refusal),
        }
    }

    /// The subscription set as stored for reconnect restore.
    fn record(&self) -> Bytes {
        if self.subs.is_empty() && self.remembered_room.is_none() {
            return Bytes::new(); // clears the retained record
        }
        let mut entries: Vec<restore::Entry> =
            self.subs.iter().map(|(t, st)| st.entry(t)).collect();
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        restore::encode(&restore::Record {
            scope: self.actor.scope.as_deref().map(str::to_owned),
            actor: self.actor.id.to_string(),
            entries,
            room: self.remembered_room.clone(),
        })
    }

    /// Hands the set to the restore writer if it changed since the last time.
    fn submit_restore(&mut self) {
        let record = self.record();
        if self.submitted.as_ref() == Some(&record) {
            return;
        }
        self.proxy
            .restore
            .submit(&self.restore_topic, record.clone());
        self.submitted = Some(record);
    }

    /// The stored record to restore from: one still waiting on this replica is newer than
    /// the broker's.
    pub(super) async fn fetch_record(&self, timeout: Duration) -> Option<Bytes> {
        if let Some(pending) = self.proxy.restore.pending(&self.restore_topic) {
            return Some(pending);
        }
        self.proxy
            .router
            .fetch_retained(&self.restore_topic, timeout)
            .await
    }

    /// Restores a stored record (QoS 1, re-checked against the current policy and the
    /// limits) and returns the entries restored, for `restoredSubscriptions`, with a
    /// semaphore that gets one permit per restored subscription that goes live later.
    pub(super) fn restore(
        &mut self,
        payload: &[u8],
    ) -> (Vec<Bytes>, usize, Arc<tokio::sync::Semaphore>) {
        let live = Arc::new(tokio::sync::Semaphore::new(0));
        let record = match restore::decode(payload) {
            Ok(Some(r)) => r,
            Ok(None) => return (Vec::new(), 0, live),
            Err(e) => {
                tracing::info!(actor = %self.actor.id, error = %e, "stored subscription set not restored");
                return (Vec::new(), 0, live);
            }
        };
        // Never trusted across owners, whatever topic it came from.
        if record.scope.as_deref() != self.actor.scope() || *record.actor != *self.actor.id {
            tracing::warn!(actor = %self.actor.id, "stored subscription set of another owner ignored");
            return (Vec::new(), 0, live);
        }
        self.remembered_room = record.room;
        let mut restored = Vec::new();
        let mut later = 0;
        for e in record.entries {
            let state =
                Self::sub_state(&e.name, e.load_balance, e.group.clone(), e.filters.clone());
            match self.join(&e.name, state, Reply::Signal(live.clone())) {
                Ok(ready) => {
                    if ready == Readiness::Later {
                        later += 1;
                    }
                    restored.push(e.encode());
                }
                Err(_) => continue, // no longer allowed, or over a limit: not restored
            }
        }
        // What is restored is what is stored from now on.
        self.submitted = Some(self.record());
        (restored, later, live)
    }

    /// After a policy reload: re-check the actor, then every subscription. Revoked
    /// subscriptions stop at once and their error frames are appended to `out`.
    pub(super) fn reevaluate(&mut self, out: &mut Vec<Bytes>) -> Result<(), CloseReason> {
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
        let mut changed = false;
        for topic in topics {
            let Some(state) = self.subs.get(&topic).cloned() else {
                continue;
            };
            if let Err(frame) = self.join(&topic, state, Reply::None) {
                // Revoked: stop delivering at once and tell the client why.
                self.membership.remove(&topic);
                if let Some(st) = self.subs.remove(&topic) {
                    self.record_bytes -= st.record_bytes;
                }
                changed = true;
                out.push(frame);
            }
        }
        if changed {
            self.submit_restore();
        }
        self.reevaluate_presence(out);
        Ok(())
    }
}

fn frame_error(e: &FrameError) -> Bytes {
    match e {
        FrameError::TooManyFilters => errors::plain("too_many_filters (max 100)"),
        other => errors::invalid_frame(&other.to_string()),
    }
}

/// Re-encodes a `filters` array for the `filtersUpdated` echo.
fn encode_filter_items(items: &[FilterItem]) -> Bytes {
    let mut out = Vec::new();
    encode::write_filter_items(&mut out, items);
    out.into()
}

/// The reply to a frame before authentication (PROTOCOL §4): `None` for heartbeats, the auth
/// frame's token when it carries one.
pub(super) enum PreAuth<'a> {
    Ignore,
    Reply(Bytes),
    Auth {
        token: crate::secret::Secret<&'a str>,
        reconnect: bool,
        version: u32,
    },
}

/// Classifies a frame received before authentication.
pub(super) fn pre_auth(bytes: &[u8]) -> PreAuth<'_> {
    match decode(bytes) {
        Ok(ClientFrame::Heartbeat) => PreAuth::Ignore, // no reply before auth
        Ok(ClientFrame::Auth(a)) => match a.token {
            Some(token) => PreAuth::Auth {
                token,
                reconnect: a.reconnect,
                version: a.protocol_version.clamp(1, 2),
            },
            None => PreAuth::Reply(errors::not_authenticated()),
        },
        Ok(_) => PreAuth::Reply(errors::not_authenticated()),
        Err(e) => PreAuth::Reply(frame_error(&e)),
    }
}

mod presence;
#[cfg(test)]
mod tests;
