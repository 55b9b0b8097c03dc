//! Webhooks (DESIGN §10): what happens on this replica's connections — connects, disconnects,
//! subscriptions, publishes, presence joins and leaves — reported to each project's backend as
//! signed JSON over HTTP, without ever blocking or slowing the data path.
//!
//! - [`config`]: the endpoints as the policy declares them (`projects[].webhooks`);
//! - [`sign`]: Standard Webhooks signatures;
//! - [`guard`]: the SSRF guard (no private or loopback targets unless allowed);
//! - [`delivery`]: one queue and one worker per endpoint — batching, the concurrency cap,
//!   retries with backoff, `410` — and the HTTP client.
//!
//! The data path calls [`Webhooks::emit`]: when no endpoint of the project wants the event it
//! returns after one pass over the project's (usually empty) endpoint list; otherwise the
//! event is encoded to JSON **once** and its bytes are shared by the queues of every endpoint
//! that wants it. A queue push takes one short mutex of that endpoint (no `.await`, no I/O);
//! a full queue drops the event, counts it and has it announced by a `webhook.dropped` event
//! when the endpoint next has room.
//!
//! Each replica reports the events of its own connections, so replicas never duplicate one
//! another; presence events are reported by the replica that caused them, and the leaves of a
//! departed replica's members by one survivor ([`crate::presence::core::Origin`]).

pub mod config;
mod delivery;
pub mod guard;
pub mod sign;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use parking_lot::Mutex;
use serde::Serialize;

pub use config::{EndpointConfig, EventKind};

use crate::config::WebhookSettings;
use crate::metrics::{WebhookMetrics, WebhookState};
use crate::policy::Project;
use crate::reload::PolicyStore;
use delivery::Endpoint;

/// (project, url): an endpoint's identity across policy reloads.
type EndpointKey = (Arc<str>, Arc<str>);

/// One event, encoded, shared by the queues of every endpoint that takes it.
#[derive(Debug)]
pub(crate) struct Encoded {
    pub id: String,
    pub json: Bytes,
    /// When it happened (for `cuttle_webhook_delivery_latency_seconds`).
    pub at: Instant,
}

impl Encoded {
    /// What it costs in a queue's byte bound.
    fn cost(&self) -> usize {
        self.json.len() + self.id.len() + 64
    }
}

/// What happened, as the data path reports it; borrowed, so that an event nobody wants costs
/// nothing.
#[derive(Debug)]
pub struct Report<'a> {
    pub kind: EventKind,
    pub scope: Option<&'a str>,
    pub actor_id: &'a str,
    pub actor_type: &'a str,
    pub app: Option<&'a str>,
    pub room: Option<&'a str>,
    pub topic: Option<&'a str>,
    pub data: Data<'a>,
}

/// An event's `data`.
#[derive(Debug)]
pub enum Data<'a> {
    None,
    Json(serde_json::Value),
    /// A client's MessagePack value (a publish's payload): converted to JSON only when some
    /// endpoint takes the event, and only up to `webhooks.max_data_bytes`.
    Msgpack(&'a [u8]),
}

impl<'a> Report<'a> {
    /// A report of `kind` by `actor`, with no location or data yet.
    pub fn of(kind: EventKind, actor: &'a crate::auth::Actor) -> Self {
        Self {
            kind,
            scope: actor.scope(),
            actor_id: &actor.id,
            actor_type: actor.kind.as_str(),
            app: None,
            room: None,
            topic: None,
            data: Data::None,
        }
    }

    /// With `app`, `room` and `topic` taken from a client topic or filter string
    /// (`app/room/topic`, wildcards kept as written).
    pub fn at(mut self, topic: &'a str) -> Self {
        let mut levels = topic.splitn(3, '/');
        self.app = levels.next();
        self.room = levels.next();
        self.topic = levels.next();
        self
    }

    pub fn with_data(mut self, data: serde_json::Value) -> Self {
        self.data = Data::Json(data);
        self
    }

    pub fn with_payload(mut self, msgpack: &'a [u8]) -> Self {
        self.data = Data::Msgpack(msgpack);
        self
    }
}

/// The event as it goes on the wire (DESIGN §10).
#[derive(Serialize)]
struct Wire<'a> {
    id: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    timestamp: &'a str,
    project: &'a str,
    scope: Option<&'a str>,
    actor: Option<WireActor<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    app: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    room: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    topic: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<&'a serde_json::Value>,
    /// The payload is not representable as JSON (a map with non-string keys, …): its
    /// MessagePack bytes, base64.
    #[serde(skip_serializing_if = "Option::is_none")]
    data_base64: Option<String>,
    /// The payload was larger than `webhooks.max_data_bytes` and is left out.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    data_truncated: bool,
    replica: &'a str,
    seq: u64,
}

#[derive(Serialize)]
struct WireActor<'a> {
    id: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
}

/// This replica's webhook delivery.
pub struct Webhooks {
    store: Arc<PolicyStore>,
    settings: WebhookSettings,
    replica: Arc<str>,
    /// Distinguishes this process's event ids from a restarted one's (same replica id).
    incarnation: u64,
    seq: AtomicU64,
    endpoints: ArcSwap<HashMap<EndpointKey, Arc<Endpoint>>>,
    /// Serialises changes of `endpoints` (rare: an endpoint's first event, its removal).
    changing: Mutex<()>,
    /// Endpoints disabled by a `410`, with the fingerprint of the configuration that got it:
    /// a changed configuration (a new url path, a new secret) is tried again.
    disabled: Mutex<HashMap<EndpointKey, [u8; 32]>>,
    pub(crate) metrics: WebhookMetrics,
}

impl std::fmt::Debug for Webhooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Webhooks")
            .field("replica", &self.replica)
            .finish_non_exhaustive()
    }
}

impl Webhooks {
    pub fn new(
        store: Arc<PolicyStore>,
        settings: WebhookSettings,
        replica: Arc<str>,
        incarnation: u64,
        metrics: WebhookMetrics,
    ) -> Arc<Self> {
        Arc::new(Self {
            store,
            settings,
            replica,
            incarnation,
            seq: AtomicU64::new(0),
            endpoints: ArcSwap::from_pointee(HashMap::new()),
            changing: Mutex::new(()),
            disabled: Mutex::new(HashMap::new()),
            metrics,
        })
    }

    /// Reports `report` to every endpoint of `project` that takes it. Never waits.
    pub fn emit(self: &Arc<Self>, project: &Project, report: Report<'_>) {
        if project.webhooks.is_empty() {
            return;
        }
        let wants = |c: &EndpointConfig| match (report.kind, report.app, report.room, report.topic)
        {
            (EventKind::Publish, Some(app), Some(room), Some(topic)) => {
                c.wants_publish(&crate::topic::ClientTopic { app, room, topic })
            }
            (kind, ..) => c.wants(kind),
        };
        let mut targets = project.webhooks.iter().filter(|c| wants(c)).peekable();
        if targets.peek().is_none() {
            return;
        }
        let event = Arc::new(self.encode(&project.id, &report));
        for cfg in targets {
            if let Some(ep) = self.endpoint(&project.id, cfg) {
                ep.push(event.clone(), &self.settings, &self.metrics);
            }
        }
    }

    /// [`Webhooks::emit`] for the project with id `project` in the current policy.
    pub fn report(self: &Arc<Self>, project: &str, report: Report<'_>) {
        let snapshot = self.store.load();
        if let Some(p) = snapshot.policy.projects.get(project) {
            self.emit(p, report);
        }
    }

    /// Encodes one event with the next sequence number of this replica.
    fn encode(&self, project: &str, r: &Report<'_>) -> Encoded {
        let seq = self.seq.fetch_add(1, Ordering::Relaxed) + 1;
        let id = format!("{}-{:x}-{seq}", self.replica, self.incarnation);
        let timestamp = humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string();
        let max = self.settings.max_data_bytes;
        let converted = match &r.data {
            Data::Msgpack(bytes) if bytes.len() <= max => {
                crate::wire::msgpack::read_json(bytes).ok()
            }
            _ => None,
        };
        let (data, data_base64, data_truncated) = match &r.data {
            Data::None => (None, None, false),
            Data::Json(v) => (Some(v), None, false),
            Data::Msgpack(bytes) if bytes.len() > max => (None, None, true),
            Data::Msgpack(bytes) => match &converted {
                Some(v) => (Some(v), None, false),
                None => {
                    use base64::Engine;
                    let b64 = base64::engine::general_purpose::STANDARD.encode(bytes);
                    (None, Some(b64), false)
                }
            },
        };
        let wire = Wire {
            id: &id,
            kind: r.kind.as_str(),
            timestamp: &timestamp,
            project,
            scope: r.scope,
            actor: (!r.actor_id.is_empty()).then_some(WireActor {
                id: r.actor_id,
                kind: r.actor_type,
            }),
            app: r.app,
            room: r.room,
            topic: r.topic,
            data,
            data_base64,
            data_truncated,
            replica: &self.replica,
            seq,
        };
        // Serialising borrowed strings and a `Value` cannot fail.
        let json = serde_json::to_vec(&wire).unwrap_or_default();
        Encoded {
            id,
            json: Bytes::from(json),
            at: Instant::now(),
        }
    }

    /// A presence change this replica reports ([`crate::presence::core::Origin`]): joins and
    /// leaves only.
    pub fn presence(self: &Arc<Self>, e: &crate::presence::core::Event) {
        use crate::presence::core::EventKind as P;
        let action = match e.kind {
            P::Join => "join",
            P::Leave => "leave",
            P::Update => return,
        };
        let snapshot = self.store.load();
        let Some(project) = snapshot.policy.projects.get(&*e.room.project) else {
            return;
        };
        if project.webhooks.is_empty() {
            return;
        }
        let mut data = serde_json::Map::new();
        data.insert("action".into(), action.into());
        if let Some(m) = &e.member {
            data.insert(
                "presence".into(),
                crate::wire::msgpack::read_json(&m.data).unwrap_or(serde_json::Value::Null),
            );
            data.insert("joined_at".into(), m.joined_at.into());
        }
        let report = Report {
            kind: EventKind::Presence,
            scope: e.room.scope.as_deref(),
            actor_id: &e.actor,
            actor_type: actor_type_of(project, &e.actor),
            app: Some(&e.room.app),
            room: Some(&e.room.room),
            topic: None,
            data: Data::Json(serde_json::Value::Object(data)),
        };
        self.emit(project, report);
    }

    /// The endpoint of `cfg`, created (with its worker) on its first event; `None` while it
    /// is disabled under this configuration.
    fn endpoint(
        self: &Arc<Self>,
        project: &Arc<str>,
        cfg: &Arc<EndpointConfig>,
    ) -> Option<Arc<Endpoint>> {
        let key: EndpointKey = (project.clone(), cfg.url.clone());
        if let Some(ep) = self.endpoints.load().get(&key) {
            return Some(ep.clone());
        }
        {
            let mut disabled = self.disabled.lock();
            match disabled.get(&key) {
                Some(fp) if *fp == cfg.fingerprint => {
                    self.metrics
                        .events(crate::metrics::WebhookOutcome::Disabled, 1);
                    return None;
                }
                Some(_) => {
                    disabled.remove(&key);
                }
                None => {}
            }
        }
        // No runtime (a unit test of the policy alone): nothing can be sent.
        let runtime = tokio::runtime::Handle::try_current().ok()?;
        let _changing = self.changing.lock();
        if let Some(ep) = self.endpoints.load().get(&key) {
            return Some(ep.clone());
        }
        let ep = Arc::new(Endpoint::new(key.clone()));
        let mut map = HashMap::clone(&self.endpoints.load());
        map.insert(key, ep.clone());
        self.endpoints.store(Arc::new(map));
        runtime.spawn(delivery::run(self.clone(), ep.clone()));
        Some(ep)
    }

    /// The current configuration of endpoint `key`, if the policy still has it.
    fn config_of(&self, key: &EndpointKey) -> Option<Arc<EndpointConfig>> {
        let snapshot = self.store.load();
        let project = snapshot.policy.projects.get(&*key.0)?;
        project.webhooks.iter().find(|c| c.url == key.1).cloned()
    }

    /// Closes endpoint `ep` (its queue dropped) and forgets it: removed from the policy, or
    /// disabled under `disabled_under` (a 410).
    fn retire(&self, ep: &Endpoint, disabled_under: Option<[u8; 32]>) {
        ep.close(&self.metrics);
        let key = &ep.key;
        let _changing = self.changing.lock();
        let mut map = HashMap::clone(&self.endpoints.load());
        map.remove(key);
        self.endpoints.store(Arc::new(map));
        if let Some(fp) = disabled_under {
            self.disabled.lock().insert(key.clone(), fp);
        }
    }

    /// Waits (at most `within`) until every queued event has been sent or given up on: a
    /// drain's last step before the broker connections close.
    pub async fn drain(&self, within: Duration) {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let s = self.state();
            if s.queued_events == 0 && s.in_flight == 0 {
                return;
            }
            if tokio::time::Instant::now() >= deadline {
                tracing::warn!(
                    queued = s.queued_events,
                    in_flight = s.in_flight,
                    "webhook events still undelivered at exit"
                );
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// For the metrics.
    pub fn state(&self) -> WebhookState {
        let mut s = WebhookState {
            disabled: self.disabled.lock().len(),
            ..WebhookState::default()
        };
        for ep in self.endpoints.load().values() {
            let (events, bytes) = ep.queued();
            s.queued_events += events;
            s.queued_bytes += bytes;
            s.in_flight += ep.in_flight();
            s.active += 1;
        }
        s
    }

    fn next_dropped_event(&self, project: &str, queue_full: u64, exhausted: u64) -> Encoded {
        let data = serde_json::json!({
            "count": queue_full + exhausted,
            "queue_full": queue_full,
            "retries_exhausted": exhausted,
        });
        let report = Report {
            kind: EventKind::Dropped,
            scope: None,
            actor_id: "",
            actor_type: "",
            app: None,
            room: None,
            topic: None,
            data: Data::Json(data),
        };
        self.encode(project, &report)
    }
}

/// The actor type of a presence member. Presence replicates actor ids only, so the type comes
/// from the policy (devices and servers are always listed, users may be) and, for actors it
/// does not list, from the id: session ids are minted as `sess_…`; anything else is a user.
fn actor_type_of(project: &Project, actor: &str) -> &'static str {
    match project.actors.get(actor) {
        Some(listed) => listed.kind.as_str(),
        None if actor.starts_with("sess_") => "session",
        None => "user",
    }
}
