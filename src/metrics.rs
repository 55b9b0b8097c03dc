//! Prometheus metrics: every `cuttle_*` series, the handles that update them, and the text
//! served at `GET /metrics` on the admin port (README "Metrics" lists them all).
//!
//! Two kinds of series:
//! - **Events** (counters, histograms) are counted where they happen. Their handles are
//!   resolved once, here, for every label value — label values are closed sets (actor type,
//!   frame type, reason) — so the hot path is one relaxed atomic add, never a map lookup, and
//!   every series exists (at 0) from the first scrape, which is what `rate()` needs.
//! - **State** (upstream filters, queued outbox bytes, presence members, the policy
//!   generation) is read from the component that owns it when Prometheus scrapes
//!   ([`Metrics::render`] with a [`State`]), so it costs nothing between scrapes and can never
//!   drift from the truth.
//!
//! No label carries a topic, an actor, a room or a scope: their number is the tenants', not
//! the operator's, and one series per value would grow Prometheus without bound.
//!
//! `prometheus-client` (the Prometheus project's own Rust client) rather than the `prometheus`
//! crate: typed label sets and metrics owned by whoever creates them (no global registry, so
//! every in-process test server has its own), OpenMetrics and the classic text format from
//! one registry, and no protobuf dependency.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use prometheus_client::encoding::{prometheus_text, text};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

use crate::policy::ActorType;

/// One label, `name="value"`; values are `'static`: closed sets only.
type Label = [(&'static str, &'static str); 1];
type Labels2 = [(&'static str, &'static str); 2];

/// The `actor_type` label's values: the four actor types, and `unknown` for a credential that
/// did not resolve (an opaque device token and a server API key look alike until then).
pub const ACTOR_TYPES: [&str; 5] = ["device", "user", "server", "session", "unknown"];

fn actor_index(kind: ActorType) -> usize {
    match kind {
        ActorType::Device => 0,
        ActorType::User => 1,
        ActorType::Server => 2,
        ActorType::Session => 3,
    }
}

/// Why a client message did not go on (`cuttle_messages_dropped_total{reason}`). The
/// discriminant indexes [`Dropped::ALL`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dropped {
    /// Over `limits.publish_per_second`.
    Rate,
    /// Over `limits.max_message_bytes` or the broker's packet size.
    Size,
    /// The policy refused the publish, or the delivery to a subscriber.
    Acl,
    /// A topic, filter or frame that cannot be published.
    Invalid,
    /// The upstream pool refused it (saturated, disconnected) or the broker never
    /// acknowledged it.
    Broker,
    /// A subscriber's send queue was full: the frame is dropped and the session closed (1013).
    SlowConsumer,
}

impl Dropped {
    const ALL: [Dropped; 6] = [
        Dropped::Rate,
        Dropped::Size,
        Dropped::Acl,
        Dropped::Invalid,
        Dropped::Broker,
        Dropped::SlowConsumer,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Dropped::Rate => "rate",
            Dropped::Size => "size",
            Dropped::Acl => "acl",
            Dropped::Invalid => "invalid",
            Dropped::Broker => "broker",
            Dropped::SlowConsumer => "slow_consumer",
        }
    }
}

/// The frame types a client can send (`ClientFrame::kind`), plus `invalid` for a frame that
/// did not decode: the closed set of `cuttle_frames_received_total{type}`.
const FRAME_TYPES: [&str; 15] = [
    "heartbeat",
    "auth",
    "publish",
    "subscribe",
    "unsubscribe",
    "setFilters",
    "presence",
    "getPresence",
    "lobbySubscribe",
    "lobbyUnsubscribe",
    "getLobbyPresence",
    "ack",
    "batchAck",
    "ignored",
    "invalid",
];

/// Why a session ended (`cuttle_connections_closed_total{reason}`): the proxy's close reasons
/// and the client's own ways of leaving.
pub const CLOSE_REASONS: [&str; 13] = [
    "client_closed",
    "read_error",
    "idle",
    "auth_timeout",
    "auth_failed",
    "slow_consumer",
    "token_expired",
    "revoked",
    "scope_changed",
    "disconnected",
    "shutting_down",
    "write_timeout",
    "too_big",
];

/// Sessions: connections, authentication, frames and bytes, publishes.
#[derive(Debug, Clone)]
pub struct SessionMetrics {
    connections: [Gauge; 4],
    pending: Gauge,
    auth: Family<Labels2, Counter>,
    auth_ok: [Counter; 4],
    frames_in: Family<Label, Counter>,
    bytes_in: Counter,
    frames_out: Counter,
    bytes_out: Counter,
    closed: Family<Label, Counter>,
    token_expiries: [Counter; 4],
    published: [Counter; 4],
    dropped: [Counter; 6],
    duration: Histogram,
}

impl SessionMetrics {
    /// A WebSocket session started (not yet authenticated). The returned guard counts it
    /// until it is dropped, however the session ends.
    pub fn pending(&self) -> GaugeGuard {
        GaugeGuard::inc(&self.pending)
    }

    /// The session authenticated as `kind`; counted under it until the guard is dropped.
    pub fn authenticated(&self, kind: ActorType) -> GaugeGuard {
        self.auth_ok[actor_index(kind)].inc();
        GaugeGuard::inc(&self.connections[actor_index(kind)])
    }

    /// An `auth` frame was refused: `actor_type` as far as the credential tells it, `reason`
    /// from a closed set ([`crate::auth::AuthError::reason`], `connection_limit_reached`,
    /// `timeout`).
    pub fn auth_failed(&self, actor_type: &'static str, reason: &'static str) {
        self.auth
            .get_or_create(&[("actor_type", actor_type), ("result", reason)])
            .inc();
    }

    /// A frame from the client of `kind` (a `ClientFrame::kind`, or `invalid`), `bytes` long.
    pub fn frame_in(&self, kind: &'static str, bytes: usize) {
        self.frames_in.get_or_create(&[("type", kind)]).inc();
        self.bytes_in.inc_by(bytes as u64);
    }

    /// `frames` frames of `bytes` bytes in all were written to a client.
    pub fn frames_out(&self, frames: usize, bytes: usize) {
        self.frames_out.inc_by(frames as u64);
        self.bytes_out.inc_by(bytes as u64);
    }

    /// The session ended after `lived`, for `reason` (one of [`CLOSE_REASONS`]).
    pub fn closed(&self, reason: &'static str, lived: Duration) {
        self.closed.get_or_create(&[("reason", reason)]).inc();
        self.duration.observe(lived.as_secs_f64());
    }

    /// The actor's credential (session token, JWT) expired during the session.
    pub fn token_expired(&self, kind: ActorType) {
        self.token_expiries[actor_index(kind)].inc();
    }

    /// A publish of an actor of `kind` was handed to the upstream pool.
    pub fn published(&self, kind: ActorType) {
        self.published[actor_index(kind)].inc();
    }

    pub fn dropped(&self, why: Dropped) {
        self.dropped[why as usize].inc();
    }

    /// A handle on the `dropped{reason}` counter, for a task that outlives the session.
    pub fn dropped_counter(&self, why: Dropped) -> Counter {
        self.dropped[why as usize].clone()
    }
}

/// Fan-out: what the router delivered and dropped.
#[derive(Debug, Clone)]
pub struct RouterMetrics {
    delivered: Counter,
    fanout: Histogram,
    slow_consumer: Counter,
    acl: Counter,
}

impl RouterMetrics {
    /// One broker message was queued to `recipients` sessions.
    pub fn fanned_out(&self, recipients: usize) {
        self.delivered.inc_by(recipients as u64);
        self.fanout.observe(recipients as f64);
    }

    /// A frame could not be queued: the subscriber's queue was full.
    pub fn slow_consumer(&self) {
        self.slow_consumer.inc();
    }

    /// A delivery the policy refused (a subscriber whose access changed).
    pub fn delivery_denied(&self) {
        self.acl.inc();
    }
}

/// The upstream pool's connections.
#[derive(Debug, Clone)]
pub struct UpstreamMetrics {
    connects: Counter,
    disconnects: Counter,
    connect_failures: Counter,
    ack_latency: Histogram,
}

impl UpstreamMetrics {
    /// CONNACK received (first connect or a reconnect).
    pub fn connected(&self) {
        self.connects.inc();
    }

    /// An established connection was lost.
    pub fn disconnected(&self) {
        self.disconnects.inc();
    }

    /// A connect attempt failed.
    pub fn connect_failed(&self) {
        self.connect_failures.inc();
    }

    /// A QoS ≥ 1 publish was acknowledged `elapsed` after it was handed to the pool.
    pub fn acknowledged(&self, elapsed: Duration) {
        self.ack_latency.observe(elapsed.as_secs_f64());
    }
}

/// The HTTP front door of both listeners.
#[derive(Debug, Clone)]
pub struct HttpMetrics {
    accepted: [Counter; 2],
    responses: Family<Labels2, Counter>,
    handshake_failures: Family<Label, Counter>,
}

impl HttpMetrics {
    /// A TCP connection was accepted on the client (`admin: false`) or admin listener.
    pub fn accepted(&self, admin: bool) {
        self.accepted[usize::from(admin)].inc();
    }

    /// An HTTP response with `status` on `listener` (`client`, `admin`).
    pub fn response(&self, listener: &'static str, status: u16) {
        self.responses
            .get_or_create(&[("listener", listener), ("code", status_label(status))])
            .inc();
    }

    /// A client-port connection that never became a session: `tls`, `plain_http_on_tls`,
    /// `deadline`, `upgrade`.
    pub fn handshake_failed(&self, reason: &'static str) {
        self.handshake_failures
            .get_or_create(&[("reason", reason)])
            .inc();
    }
}

/// Status codes as label values: the ones the proxy answers, and `other`.
fn status_label(status: u16) -> &'static str {
    match status {
        101 => "101",
        200 => "200",
        201 => "201",
        202 => "202",
        400 => "400",
        401 => "401",
        403 => "403",
        404 => "404",
        405 => "405",
        413 => "413",
        409 => "409",
        415 => "415",
        422 => "422",
        429 => "429",
        502 => "502",
        503 => "503",
        504 => "504",
        _ => "other",
    }
}

/// Increments a gauge now and decrements it when dropped.
#[derive(Debug)]
pub struct GaugeGuard(Gauge);

impl GaugeGuard {
    fn inc(g: &Gauge) -> Self {
        g.inc();
        Self(g.clone())
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// State read at scrape time from the components that own it.
#[derive(Debug, Default, Clone)]
pub struct State {
    pub policy_generation: u64,
    pub policy_loaded_unix: u64,
    pub reloads_ok: u64,
    pub reloads_failed: u64,
    pub reloads_unchanged: u64,
    pub tls_rotations: u64,
    pub upstream_pool: usize,
    pub upstream_up: usize,
    pub upstream_filters: usize,
    pub upstream_orphans: u64,
    pub local_subscriptions: usize,
    pub outbox_bytes: usize,
    pub connection_slots_in_use: usize,
    pub max_connections: usize,
    pub auth_verifications: u64,
    pub presence: PresenceState,
    pub webhooks: WebhookState,
}

/// Webhook delivery's share of [`State`], summed over this replica's endpoints.
#[derive(Debug, Default, Clone)]
pub struct WebhookState {
    pub queued_events: usize,
    pub queued_bytes: usize,
    pub in_flight: usize,
    pub active: usize,
    pub disabled: usize,
}

/// Presence's share of [`State`].
#[derive(Debug, Default, Clone)]
pub struct PresenceState {
    pub local_connections: usize,
    pub members: usize,
    pub replicas: usize,
    pub state_bytes: usize,
    pub lobby_events_dropped: u64,
    pub resyncs_skipped: u64,
    pub ops_dropped: u64,
}

/// Every metric of one proxy.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub sessions: SessionMetrics,
    pub router: RouterMetrics,
    pub upstream: UpstreamMetrics,
    pub http: HttpMetrics,
    pub webhooks: WebhookMetrics,
}

/// What became of a webhook event (`cuttle_webhook_events_total{outcome}`); the discriminant
/// indexes [`WebhookOutcome::ALL`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WebhookOutcome {
    /// The receiver answered 2xx.
    Delivered,
    /// The endpoint's queue was full (bytes or count).
    QueueFull,
    /// Every attempt failed (`webhooks.max_attempts`).
    RetriesExhausted,
    /// The endpoint answered 410 Gone and is disabled.
    Disabled,
}

impl WebhookOutcome {
    pub const ALL: [WebhookOutcome; 4] = [
        WebhookOutcome::Delivered,
        WebhookOutcome::QueueFull,
        WebhookOutcome::RetriesExhausted,
        WebhookOutcome::Disabled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            WebhookOutcome::Delivered => "delivered",
            WebhookOutcome::QueueFull => "dropped_queue_full",
            WebhookOutcome::RetriesExhausted => "dropped_retries_exhausted",
            WebhookOutcome::Disabled => "dropped_disabled",
        }
    }
}

/// How one webhook request ended (`cuttle_webhook_attempts_total{result}`).
pub const WEBHOOK_ATTEMPT_RESULTS: [&str; 6] = [
    "ok",
    "gone",
    "rate_limited",
    "error_status",
    "timeout",
    "connect_error",
];

#[derive(Debug, Clone)]
pub struct WebhookMetrics {
    events: [Counter; 4],
    attempts: [Counter; 6],
    request_seconds: Histogram,
    delivery_seconds: Histogram,
}

impl WebhookMetrics {
    pub fn events(&self, outcome: WebhookOutcome, n: usize) {
        self.events[outcome as usize].inc_by(n as u64);
    }

    /// One request's end; `result` is one of [`WEBHOOK_ATTEMPT_RESULTS`].
    pub fn attempt(&self, result: &'static str, took: Duration) {
        if let Some(i) = WEBHOOK_ATTEMPT_RESULTS.iter().position(|r| *r == result) {
            self.attempts[i].inc();
        }
        self.request_seconds.observe(took.as_secs_f64());
    }

    /// An event delivered `since` it was emitted.
    pub fn delivered_after(&self, since: Duration) {
        self.delivery_seconds.observe(since.as_secs_f64());
    }
}

/// Fan-out sizes: 1 to 65,536 recipients.
fn fanout_buckets() -> impl Iterator<Item = f64> {
    exponential_buckets(1.0, 4.0, 9)
}

/// Publish-to-acknowledgement latency: 100 µs to ~6.5 s.
fn ack_buckets() -> impl Iterator<Item = f64> {
    exponential_buckets(0.0001, 4.0, 9)
}

/// Session lifetimes: 1 s to ~3 days.
fn duration_buckets() -> impl Iterator<Item = f64> {
    exponential_buckets(1.0, 4.0, 10)
}

/// Registers `metric` under `name` (with `unit` appended to it) and returns it: the registry
/// and the returned handle share the series.
fn registered<M>(r: &mut Registry, name: &str, help: &str, unit: Option<Unit>, metric: M) -> M
where
    M: prometheus_client::registry::Metric + Clone,
{
    match unit {
        Some(u) => r.register_with_unit(name, help, u, metric.clone()),
        None => r.register(name, help, metric.clone()),
    }
    metric
}

/// Registers a new family and returns it.
fn family<L, M>(r: &mut Registry, name: &str, help: &str, unit: Option<Unit>) -> Family<L, M>
where
    L: prometheus_client::encoding::EncodeLabelSet
        + Clone
        + std::hash::Hash
        + Eq
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
    M: prometheus_client::metrics::TypedMetric
        + prometheus_client::encoding::EncodeMetric
        + Default
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    registered(r, name, help, unit, Family::<L, M>::default())
}

fn by_actor<M>(f: &Family<Label, M>) -> [M; 4]
where
    M: prometheus_client::metrics::TypedMetric + Default + Clone,
{
    let get = |i: usize| f.get_or_create(&[("actor_type", ACTOR_TYPES[i])]).clone();
    [get(0), get(1), get(2), get(3)]
}

impl Metrics {
    pub fn new() -> Arc<Self> {
        let mut r = Registry::default();
        Info::register(&mut r);

        let connections: Family<Label, Gauge> = family(
            &mut r,
            "cuttle_connections",
            "Authenticated WebSocket sessions open, by actor type",
            None,
        );
        let pending = registered(
            &mut r,
            "cuttle_connections_unauthenticated",
            "WebSocket sessions open that have not authenticated yet",
            None,
            Gauge::default(),
        );
        let auth: Family<Labels2, Counter> = family(
            &mut r,
            "cuttle_auth_attempts",
            "auth frames answered, by actor type and result (ok, or the reason of the refusal)",
            None,
        );
        let auth_ok = {
            let get = |i: usize| {
                auth.get_or_create(&[("actor_type", ACTOR_TYPES[i]), ("result", "ok")])
                    .clone()
            };
            [get(0), get(1), get(2), get(3)]
        };
        let frames_in: Family<Label, Counter> = family(
            &mut r,
            "cuttle_frames_received",
            "Binary frames received from clients, by frame type",
            None,
        );
        for t in FRAME_TYPES {
            let _ = frames_in.get_or_create(&[("type", t)]);
        }
        let bytes_in = registered(
            &mut r,
            "cuttle_received",
            "Bytes of binary frames received from clients",
            Some(Unit::Bytes),
            Counter::default(),
        );
        let frames_out = registered(
            &mut r,
            "cuttle_frames_sent",
            "Frames written to clients",
            None,
            Counter::default(),
        );
        let bytes_out = registered(
            &mut r,
            "cuttle_sent",
            "Bytes of frames written to clients",
            Some(Unit::Bytes),
            Counter::default(),
        );
        let closed: Family<Label, Counter> = family(
            &mut r,
            "cuttle_connections_closed",
            "WebSocket sessions ended, by reason",
            None,
        );
        for c in CLOSE_REASONS {
            let _ = closed.get_or_create(&[("reason", c)]);
        }
        let expiries: Family<Label, Counter> = family(
            &mut r,
            "cuttle_token_expiries",
            "Sessions closed (4001 token_expired) because their session token or JWT expired, by actor type",
            None,
        );
        let published: Family<Label, Counter> = family(
            &mut r,
            "cuttle_messages_published",
            "Client publishes handed to the upstream broker, by actor type",
            None,
        );
        let dropped: Family<Label, Counter> = family(
            &mut r,
            "cuttle_messages_dropped",
            "Messages not published or not delivered, by reason",
            None,
        );
        let dropped_by =
            Dropped::ALL.map(|d| dropped.get_or_create(&[("reason", d.as_str())]).clone());
        let duration = registered(
            &mut r,
            "cuttle_connection_duration",
            "How long authenticated and unauthenticated WebSocket sessions lasted",
            Some(Unit::Seconds),
            Histogram::new(duration_buckets()),
        );
        let sessions = SessionMetrics {
            connections: by_actor(&connections),
            pending,
            auth,
            auth_ok,
            frames_in,
            bytes_in,
            frames_out,
            bytes_out,
            closed,
            token_expiries: by_actor(&expiries),
            published: by_actor(&published),
            dropped: dropped_by.clone(),
            duration,
        };

        let delivered = registered(
            &mut r,
            "cuttle_messages_delivered",
            "Messages queued to subscribers (one per recipient session)",
            None,
            Counter::default(),
        );
        let fanout = registered(
            &mut r,
            "cuttle_fanout_recipients",
            "Local recipients of each message from the broker",
            None,
            Histogram::new(fanout_buckets()),
        );
        let router = RouterMetrics {
            delivered,
            fanout,
            slow_consumer: dropped_by[Dropped::SlowConsumer as usize].clone(),
            acl: dropped_by[Dropped::Acl as usize].clone(),
        };

        let counter = |r: &mut Registry, name: &str, help: &str| {
            registered(r, name, help, None, Counter::default())
        };
        let upstream = UpstreamMetrics {
            connects: counter(
                &mut r,
                "cuttle_upstream_connects",
                "Upstream MQTT connections established (CONNACK), first connects and reconnects",
            ),
            disconnects: counter(
                &mut r,
                "cuttle_upstream_disconnects",
                "Established upstream MQTT connections lost",
            ),
            connect_failures: counter(
                &mut r,
                "cuttle_upstream_connect_failures",
                "Upstream MQTT connect attempts that failed",
            ),
            ack_latency: registered(
                &mut r,
                "cuttle_upstream_publish_ack",
                "Time from handing a QoS 1 publish to the pool to the broker's PUBACK",
                Some(Unit::Seconds),
                Histogram::new(ack_buckets()),
            ),
        };

        let accepted: Family<Label, Counter> = family(
            &mut r,
            "cuttle_tcp_connections_accepted",
            "TCP connections accepted, by listener (client, admin)",
            None,
        );
        // One statement per handle: `get_or_create` returns a read guard, and two guards
        // alive in one expression deadlock the family's lock.
        let client = accepted.get_or_create(&[("listener", "client")]).clone();
        let admin = accepted.get_or_create(&[("listener", "admin")]).clone();
        let http = HttpMetrics {
            accepted: [client, admin],
            responses: family(
                &mut r,
                "cuttle_http_responses",
                "HTTP responses, by listener and status code (101 is a WebSocket upgrade)",
                None,
            ),
            handshake_failures: family(
                &mut r,
                "cuttle_handshake_failures",
                "Client-port connections that never became a WebSocket session, by reason",
                None,
            ),
        };
        // The series every replica has, at 0 until they happen.
        for (listener, code) in [
            ("client", 101),
            ("client", 400),
            ("client", 404),
            ("admin", 200),
            ("admin", 404),
            ("admin", 503),
        ] {
            let _ = http
                .responses
                .get_or_create(&[("listener", listener), ("code", status_label(code))]);
        }
        for reason in ["tls", "deadline", "upgrade"] {
            let _ = http.handshake_failures.get_or_create(&[("reason", reason)]);
        }
        let events: Family<Label, Counter> = family(
            &mut r,
            "cuttle_webhook_events",
            "Webhook events, by outcome (delivered, or why they were dropped)",
            None,
        );
        let attempts: Family<Label, Counter> = family(
            &mut r,
            "cuttle_webhook_attempts",
            "Webhook requests, by result (ok, gone, rate_limited, error_status, timeout, connect_error)",
            None,
        );
        let webhooks = WebhookMetrics {
            events: WebhookOutcome::ALL
                .map(|o| events.get_or_create(&[("outcome", o.as_str())]).clone()),
            attempts: WEBHOOK_ATTEMPT_RESULTS
                .map(|a| attempts.get_or_create(&[("result", a)]).clone()),
            request_seconds: registered(
                &mut r,
                "cuttle_webhook_request_duration",
                "Webhook request latency, from sending to the receiver's status (or the timeout)",
                Some(Unit::Seconds),
                Histogram::new(ack_buckets()),
            ),
            delivery_seconds: registered(
                &mut r,
                "cuttle_webhook_delivery_latency",
                "From an event happening to its receiver answering 2xx, retries included",
                Some(Unit::Seconds),
                Histogram::new(ack_buckets()),
            ),
        };
        Arc::new(Self {
            registry: r,
            sessions,
            router,
            upstream,
            http,
            webhooks,
        })
    }

    /// The exposition: `openmetrics` for the OpenMetrics text format (Prometheus asks for it
    /// in its `Accept` header), else the classic text format 0.0.4.
    pub fn render(&self, state: &State, openmetrics: bool) -> String {
        let scraped = scrape_registry(state);
        let mut out = String::with_capacity(16 * 1024);
        // Writing to a String cannot fail; an encoder error would be a bug in a metric's
        // encoding and leaves a partial page, which Prometheus reports as a scrape error.
        if openmetrics {
            let _ = text::encode_registry(&mut out, &self.registry);
            let _ = text::encode_registry(&mut out, &scraped);
            let _ = text::encode_eof(&mut out);
        } else {
            let _ = prometheus_text::encode(&mut out, &self.registry);
            let _ = prometheus_text::encode(&mut out, &scraped);
        }
        out
    }
}

/// `Content-Type` of [`Metrics::render`]'s output.
pub fn content_type(openmetrics: bool) -> &'static str {
    if openmetrics {
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    } else {
        prometheus_text::CONTENT_TYPE
    }
}

/// `cuttle_build_info{version="…"} 1`.
struct Info;

impl Info {
    fn register(r: &mut Registry) {
        let info: Family<Label, Gauge> = Family::default();
        info.get_or_create(&[("version", env!("CARGO_PKG_VERSION"))])
            .set(1);
        r.register("cuttle_build_info", "The running build; always 1", info);
    }
}

fn gauge(r: &mut Registry, name: &str, help: &str, v: impl TryInto<i64>) {
    let v = v.try_into().unwrap_or(i64::MAX);
    r.register(name, help, ConstGauge::new(v));
}

fn counter(r: &mut Registry, name: &str, help: &str, v: u64) {
    r.register(name, help, ConstCounter::new(v));
}

/// A registry of the scrape-time series, built for one scrape.
fn scrape_registry(s: &State) -> Registry {
    let mut r = Registry::default();
    gauge(
        &mut r,
        "cuttle_policy_generation",
        "Generation of the policy in use (1 at start, +1 per applied reload)",
        s.policy_generation,
    );
    gauge(
        &mut r,
        "cuttle_policy_loaded_timestamp_seconds",
        "Unix time the policy in use was loaded",
        s.policy_loaded_unix,
    );
    let reloads: Family<Label, ConstCounterCell> = Family::default();
    reloads.get_or_create(&[("result", "ok")]).set(s.reloads_ok);
    reloads
        .get_or_create(&[("result", "error")])
        .set(s.reloads_failed);
    reloads
        .get_or_create(&[("result", "unchanged")])
        .set(s.reloads_unchanged);
    r.register(
        "cuttle_policy_reloads",
        "Configuration re-reads after a file change, by result (ok: a new generation; error: invalid, the old policy stays)",
        reloads,
    );
    counter(
        &mut r,
        "cuttle_tls_certificate_reloads",
        "TLS certificate rotations applied",
        s.tls_rotations,
    );
    gauge(
        &mut r,
        "cuttle_upstream_pool_size",
        "Upstream MQTT connections configured (upstream.pool)",
        s.upstream_pool,
    );
    gauge(
        &mut r,
        "cuttle_upstream_connections_up",
        "Upstream MQTT connections currently connected",
        s.upstream_up,
    );
    gauge(
        &mut r,
        "cuttle_upstream_filters",
        "Distinct filters subscribed upstream (shared by every local subscriber)",
        s.upstream_filters,
    );
    counter(
        &mut r,
        "cuttle_upstream_orphan_messages",
        "Broker messages that matched no live subscription (a late delivery after an unsubscribe)",
        s.upstream_orphans,
    );
    gauge(
        &mut r,
        "cuttle_subscriptions",
        "Local subscriptions: (session, upstream filter) pairs",
        s.local_subscriptions,
    );
    gauge(
        &mut r,
        "cuttle_outbox_bytes",
        "Bytes queued to clients and not yet written, over all sessions",
        s.outbox_bytes,
    );
    gauge(
        &mut r,
        "cuttle_connection_slots_in_use",
        "Client-port connections holding a limits.max_connections slot (handshakes and sessions)",
        s.connection_slots_in_use,
    );
    gauge(
        &mut r,
        "cuttle_connection_slots",
        "limits.max_connections",
        s.max_connections,
    );
    counter(
        &mut r,
        "cuttle_auth_verifications",
        "Credential signature verifications (resolution cache misses) under the current policy generation",
        s.auth_verifications,
    );
    let p = &s.presence;
    gauge(
        &mut r,
        "cuttle_presence_local_connections",
        "Connections of this replica present in a room",
        p.local_connections,
    );
    gauge(
        &mut r,
        "cuttle_presence_members",
        "Room members over every room, merged across replicas (one per actor and room)",
        p.members,
    );
    gauge(
        &mut r,
        "cuttle_presence_replicas",
        "Other replicas whose presence state this replica holds",
        p.replicas,
    );
    r.register_with_unit(
        "cuttle_presence_state",
        "Presence state held (presence.max_state_bytes bounds it)",
        Unit::Bytes,
        ConstGauge::new(i64::try_from(p.state_bytes).unwrap_or(i64::MAX)),
    );
    counter(
        &mut r,
        "cuttle_presence_lobby_events_dropped",
        "lobbyPresence events not queued because the subscriber's queue was half full",
        p.lobby_events_dropped,
    );
    counter(
        &mut r,
        "cuttle_presence_resyncs_skipped",
        "Room list resyncs to stale listeners skipped (queue not empty, or over the per-tick budget)",
        p.resyncs_skipped,
    );
    counter(
        &mut r,
        "cuttle_presence_ops_dropped",
        "Remote presence changes dropped because presence.max_state_bytes was reached",
        p.ops_dropped,
    );
    let w = &s.webhooks;
    gauge(
        &mut r,
        "cuttle_webhook_queue_events",
        "Webhook events waiting, over every endpoint (webhooks.queue_events bounds each)",
        w.queued_events,
    );
    r.register_with_unit(
        "cuttle_webhook_queue",
        "Bytes of webhook events waiting, over every endpoint (webhooks.queue_bytes bounds each)",
        Unit::Bytes,
        ConstGauge::new(i64::try_from(w.queued_bytes).unwrap_or(i64::MAX)),
    );
    gauge(
        &mut r,
        "cuttle_webhook_in_flight",
        "Webhook events in requests being sent or retried",
        w.in_flight,
    );
    let endpoints: Family<Label, Gauge> = Family::default();
    for (state, n) in [("active", w.active), ("disabled", w.disabled)] {
        endpoints
            .get_or_create(&[("state", state)])
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }
    r.register(
        "cuttle_webhook_endpoints",
        "Webhook endpoints this replica sends to, by state (disabled: answered 410 Gone)",
        endpoints,
    );
    r
}

/// A counter family's cell whose value is set at scrape time.
#[derive(Debug, Default)]
struct ConstCounterCell(AtomicU64);

impl ConstCounterCell {
    fn set(&self, v: u64) {
        self.0.store(v, Ordering::Relaxed);
    }
}

impl prometheus_client::metrics::TypedMetric for ConstCounterCell {
    const TYPE: prometheus_client::metrics::MetricType =
        prometheus_client::metrics::MetricType::Counter;
}

impl prometheus_client::encoding::EncodeMetric for ConstCounterCell {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::MetricEncoder,
    ) -> Result<(), std::fmt::Error> {
        encoder.encode_counter::<prometheus_client::encoding::NoLabelSet, _, u64>(
            &self.0.load(Ordering::Relaxed),
            None,
        )
    }

    fn metric_type(&self) -> prometheus_client::metrics::MetricType {
        prometheus_client::metrics::MetricType::Counter
    }
}
