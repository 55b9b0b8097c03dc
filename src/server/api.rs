//! The `/v1` HTTP API on the client listener, for server actors (DESIGN §7): JSON in and out,
//! `Authorization: Bearer <API key>`, errors as `application/problem+json` (RFC 9457).
//!
//! Built so far: **`POST /v1/publish`**, one message or a batch (a JSON array), each
//! `{topic: "app/room/topic", data, scope?, filter?, qos?, retain?, idempotency_key?}`. A
//! request goes through the same checks as a WebSocket publish — the topic's syntax, the
//! policy (`Access::Write` for the server actor), the filter, `limits.max_message_bytes` and
//! the broker's packet size — plus the API's own: the `scope` must be the key's own namespace
//! or one its actor is granted (`scopes:` in the policy, DESIGN §3), the body is at most
//! `api.max_body_bytes`, a batch at most `api.max_batch` messages, and each key has a token
//! bucket of requests and one of messages. A batch is all or nothing at validation: one bad
//! item refuses the request and nothing is published. The answer comes after the broker
//! acknowledged every message (QoS 1) or wrote it (QoS 0), within `api.ack_timeout_ms`.
//!
//! `idempotency_key` (per item): a key already seen from the same API key within
//! `api.idempotency_ttl_s` is answered `duplicate` and not published again. The cache is
//! bounded in bytes (`api.idempotency_bytes`, oldest forgotten first); a key is remembered
//! from the moment its message is accepted, so two concurrent requests with one key publish
//! once, and forgotten again if its publish fails, so that a retry can succeed.
//!
//! **`POST /v1/session-tokens`** `{ttl_s, scope?, rooms?}` → 201 `{token, expires_at}` (unix
//! seconds): a guest token of the key's project, in its own namespace or a granted scope.
//!
//! **`GET /v1/presence/{app}/{room}?scope=`** → `{app, room, scope, members: [{actor_id, data,
//! joined_at}]}` and **`GET /v1/lobbies/{app}/{lobby}?scope=`** → `{app, lobby, scope, rooms:
//! {room: members}}`: the merged view of every replica, as this replica holds it (`data` is the
//! member's MessagePack as JSON). The room must be open to the key's actor (a private room
//! lists it); a lobby shows the rooms that are.
//!
//! **`POST /v1/actors/{id}/disconnect`** → 202 `{actor, notified_here}` (that actor's sessions
//! on this replica, in any namespace, that were told): every session of that
//! actor of the key's project, on every replica, in the namespaces the key may reach (its own
//! and its granted scopes), closes with 4001 `disconnected_by_server`. This replica acts at
//! once; the others through the broker (`server::control`), answered once the broker has the
//! request.
//!
//! Every endpoint is in `docs/openapi.yaml` (events pushed to the backend: `crate::webhook`).

// An error is a whole HTTP response (144 bytes), built at most once per request: boxing it
// would buy nothing off the hot path.
#![allow(clippy::result_large_err)]

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, HeaderValue, RETRY_AFTER};
use hyper::{Method, Request, Response, StatusCode};
use parking_lot::Mutex;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::time::Instant;

use super::Proxy;
use super::session::Bucket;
use crate::auth::Actor;
use crate::metrics::Dropped;
use crate::policy::{Access, ActorType};
use crate::topic::ClientTopic;
use crate::topic::filters;
use crate::upstream::PublishError;

/// An API key's actor: (project, actor id).
type KeyId = (Arc<str>, Arc<str>);

/// The per-replica state of the API: rate buckets per key and the idempotency cache.
pub(crate) struct Api {
    /// (project, actor) → (requests, messages). Keys are server actors of the policy, a set
    /// the operator bounds; an actor removed from the policy keeps its entry until restart
    /// (two small buckets).
    buckets: Mutex<HashMap<KeyId, (Bucket, Bucket)>>,
    /// (project, actor, idempotency key) → the message was accepted.
    seen: moka::sync::Cache<(Arc<str>, Arc<str>, String), ()>,
}

impl std::fmt::Debug for Api {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Api").finish_non_exhaustive()
    }
}

/// Longest `idempotency_key`, in bytes.
const MAX_IDEMPOTENCY_KEY: usize = 256;

impl Api {
    pub(crate) fn new(settings: &crate::config::ApiSettings) -> Self {
        let seen = moka::sync::Cache::builder()
            .max_capacity(settings.idempotency_bytes as u64)
            // What an entry costs: its strings and the cache's own overhead (~100 B).
            .weigher(|k: &(Arc<str>, Arc<str>, String), _: &()| {
                u32::try_from(k.0.len() + k.1.len() + k.2.len() + 128).unwrap_or(u32::MAX)
            })
            .time_to_live(settings.idempotency_ttl)
            .build();
        Self {
            buckets: Mutex::new(HashMap::new()),
            seen,
        }
    }
}

/// Every route served, as (method, path template): what `docs/openapi.yaml` documents
/// (`tests/api.rs` holds the two together, and each route to the live server).
pub const ROUTES: &[(&str, &str)] = &[
    ("POST", "/v1/publish"),
    ("POST", "/v1/session-tokens"),
    ("GET", "/v1/presence/{app}/{room}"),
    ("GET", "/v1/lobbies/{app}/{lobby}"),
    ("POST", "/v1/actors/{id}/disconnect"),
];

/// Serves one `/v1/...` request.
pub(super) async fn handle(proxy: Arc<Proxy>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_string();
    let segments: Vec<&str> = path.trim_start_matches("/v1/").split('/').collect();
    let answer = match (req.method(), segments.as_slice()) {
        (&Method::POST, ["publish"]) => publish(&proxy, req).await,
        (&Method::POST, ["session-tokens"]) => session_token(&proxy, req).await,
        (&Method::GET, ["presence", app, slug]) => presence(&proxy, &req, app, slug),
        (&Method::GET, ["lobbies", app, slug]) => lobby(&proxy, &req, app, slug),
        (&Method::POST, ["actors", id, "disconnect"]) => match percent_decoded(id) {
            Some(id) => disconnect(&proxy, &req, &id).await,
            None => Err(problem(
                StatusCode::BAD_REQUEST,
                "invalid-actor",
                "the actor id is not valid percent-encoded UTF-8",
            )),
        },
        (_, ["publish"] | ["session-tokens"] | ["actors", _, "disconnect"]) => {
            Err(not_allowed("POST"))
        }
        (_, ["presence" | "lobbies", _, _]) => Err(not_allowed("GET")),
        _ => Err(problem(
            StatusCode::NOT_FOUND,
            "not-found",
            "no such endpoint (docs/openapi.yaml lists them)",
        )),
    };
    match answer {
        Ok(r) | Err(r) => r,
    }
}

fn not_allowed(allow: &'static str) -> Response<Full<Bytes>> {
    let mut r = problem(
        StatusCode::METHOD_NOT_ALLOWED,
        "method-not-allowed",
        &format!("use {allow}"),
    );
    r.headers_mut()
        .insert(hyper::header::ALLOW, HeaderValue::from_static(allow));
    r
}

type Answer = Result<Response<Full<Bytes>>, Response<Full<Bytes>>>;

/// A problem document: `type` is `urn:cuttle:problem:<slug>`.
fn problem(status: StatusCode, slug: &str, detail: &str) -> Response<Full<Bytes>> {
    problem_with(status, slug, detail, json!({}))
}

fn problem_with(
    status: StatusCode,
    slug: &str,
    detail: &str,
    extra: Value,
) -> Response<Full<Bytes>> {
    let mut body = json!({
        "type": format!("urn:cuttle:problem:{slug}"),
        "title": status.canonical_reason().unwrap_or("error"),
        "status": status.as_u16(),
        "detail": detail,
    });
    if let (Some(b), Value::Object(extra)) = (body.as_object_mut(), extra) {
        b.extend(extra);
    }
    let mut r = respond(status, &body);
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/problem+json"),
    );
    r
}

fn respond(status: StatusCode, body: &Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

/// The server actor behind the request's API key.
fn authenticate(
    proxy: &Proxy,
    req: &Request<Incoming>,
) -> Result<Arc<Actor>, Response<Full<Bytes>>> {
    let unauthorized = |detail: &str| {
        let mut r = problem(StatusCode::UNAUTHORIZED, "unauthorized", detail);
        r.headers_mut().insert(
            hyper::header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer"),
        );
        r
    };
    let token = req
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| unauthorized("an `Authorization: Bearer <API key>` header is required"))?;
    let metrics = &proxy.metrics.sessions;
    let actor = proxy.store.load().auth.authenticate(token).map_err(|e| {
        tracing::debug!(reason = %e, "api: authentication failed");
        metrics.auth_failed(crate::auth::claimed_type(token), e.reason());
        unauthorized("invalid API key")
    })?;
    if actor.kind != ActorType::Server {
        metrics.auth_failed(actor.kind.as_str(), "not_a_server");
        return Err(problem(
            StatusCode::FORBIDDEN,
            "not-a-server",
            "the HTTP API is for server actors (API keys)",
        ));
    }
    Ok(actor)
}

/// Takes `requests` and `messages` tokens from the key's buckets, or answers 429.
fn admit(proxy: &Proxy, actor: &Actor, messages: usize) -> Result<(), Response<Full<Bytes>>> {
    let api = &proxy.settings.api;
    let now = Instant::now();
    let wait = {
        let mut buckets = proxy.api.buckets.lock();
        let (requests, msgs) = buckets
            .entry((actor.project.clone(), actor.id.clone()))
            .or_insert_with(|| {
                (
                    Bucket::new(api.requests_per_second, now),
                    Bucket::new(api.messages_per_second, now),
                )
            });
        if !requests.take_n(1, now) {
            Some(requests.wait_for(1, now))
        } else if !msgs.take_n(messages, now) {
            Some(msgs.wait_for(messages, now))
        } else {
            None
        }
    };
    let Some(wait) = wait else {
        return Ok(());
    };
    let seconds = wait.as_secs_f64().ceil().max(1.0) as u64;
    let mut r = problem_with(
        StatusCode::TOO_MANY_REQUESTS,
        "rate-limited",
        "over api.requests_per_second or api.messages_per_second for this API key",
        json!({ "retry_after_s": seconds }),
    );
    if let Ok(v) = HeaderValue::from_str(&seconds.to_string()) {
        r.headers_mut().insert(RETRY_AFTER, v);
    }
    Err(r)
}

/// Reads the body, at most `api.max_body_bytes`, as JSON.
async fn json_body(proxy: &Proxy, req: Request<Incoming>) -> Result<Value, Response<Full<Bytes>>> {
    let max = proxy.settings.api.max_body_bytes;
    let too_large = || {
        problem(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body-too-large",
            &format!("the body is over api.max_body_bytes ({max} bytes)"),
        )
    };
    let declared = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max as u64) {
        return Err(too_large());
    }
    let is_json = req
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !is_json {
        return Err(problem(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported-media-type",
            "the body must be application/json",
        ));
    }
    let bytes = match Limited::new(req.into_body(), max).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => return Err(too_large()),
        Err(_) => {
            return Err(problem(
                StatusCode::BAD_REQUEST,
                "bad-body",
                "the body could not be read",
            ));
        }
    };
    serde_json::from_slice(&bytes).map_err(|e| {
        problem(
            StatusCode::BAD_REQUEST,
            "invalid-json",
            &format!("the body is not valid JSON: {e}"),
        )
    })
}

/// One message of `POST /v1/publish`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PublishItem {
    topic: String,
    data: Value,
    #[serde(default)]
    scope: Option<String>,
    #[serde(default)]
    filter: Option<String>,
    #[serde(default)]
    qos: Option<u8>,
    #[serde(default)]
    retain: bool,
    #[serde(default)]
    idempotency_key: Option<String>,
}

/// A validated message, ready for the pool.
struct Ready {
    topic: String,
    upstream: String,
    payload: Bytes,
    qos: u8,
    retain: bool,
    idempotency: Option<(Arc<str>, Arc<str>, String)>,
}

/// Why an item is refused: status, problem slug, detail, metrics reason.
type Refusal = (StatusCode, &'static str, String, Dropped);

async fn publish(proxy: &Arc<Proxy>, req: Request<Incoming>) -> Answer {
    let actor = authenticate(proxy, &req)?;
    let body = json_body(proxy, req).await?;
    let (items, batch) = match body {
        Value::Array(a) => (a, true),
        v @ Value::Object(_) => (vec![v], false),
        _ => {
            return Err(problem(
                StatusCode::BAD_REQUEST,
                "invalid-request",
                "the body must be a message object or an array of them",
            ));
        }
    };
    let max_batch = proxy.settings.api.max_batch;
    if items.is_empty() || items.len() > max_batch {
        return Err(problem(
            StatusCode::BAD_REQUEST,
            "invalid-batch",
            &format!("a batch holds 1 to api.max_batch ({max_batch}) messages"),
        ));
    }
    admit(proxy, &actor, items.len())?;

    // Validate everything first: a batch is refused whole, before anything is published.
    let mut ready = Vec::with_capacity(items.len());
    let mut errors = Vec::new();
    for (i, item) in items.into_iter().enumerate() {
        let checked = serde_json::from_value::<PublishItem>(item)
            .map_err(|e| {
                (
                    StatusCode::BAD_REQUEST,
                    "invalid-request",
                    e.to_string(),
                    Dropped::Invalid,
                )
            })
            .and_then(|item| validate(proxy, &actor, item));
        match checked {
            Ok(r) => ready.push(r),
            Err(refusal) => errors.push((i, refusal)),
        }
    }
    if !errors.is_empty() {
        for (_, (_, _, _, why)) in &errors {
            proxy.metrics.sessions.dropped(*why);
        }
        let (status, slug, detail, _) = &errors[0].1;
        let status = if errors.iter().all(|(_, e)| e.0 == *status) {
            *status
        } else {
            StatusCode::BAD_REQUEST
        };
        let list: Vec<Value> = errors
            .iter()
            .map(|(i, (s, slug, detail, _))| {
                json!({"index": i, "status": s.as_u16(), "type": format!("urn:cuttle:problem:{slug}"), "detail": detail})
            })
            .collect();
        let detail = if batch {
            format!(
                "{} of the batch's messages are refused; nothing was published",
                list.len()
            )
        } else {
            detail.clone()
        };
        return Err(problem_with(
            status,
            slug,
            &detail,
            json!({ "errors": list }),
        ));
    }

    // Publish, then wait for every acknowledgement.
    let mut results: Vec<Value> = Vec::with_capacity(ready.len());
    let mut waits = Vec::new();
    for r in ready {
        if let Some(key) = &r.idempotency {
            // Remembered from now: a concurrent duplicate sees it and is not published.
            let entry = proxy.api.seen.entry(key.clone()).or_insert(());
            if !entry.is_fresh() {
                results.push(json!({"topic": r.topic, "status": "duplicate"}));
                continue;
            }
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        let qos = crate::upstream::publish_qos(r.qos);
        match proxy.pool.publish(
            r.upstream.clone(),
            qos,
            r.retain,
            r.payload.clone(),
            Some(tx),
        ) {
            Ok(()) => {
                waits.push((results.len(), r.idempotency.clone(), rx));
                results.push(json!({"topic": r.topic, "status": "published"}));
            }
            Err(e) => {
                forget(proxy, &r.idempotency);
                proxy.metrics.sessions.dropped(Dropped::Broker);
                tracing::debug!(actor = %actor.id, error = %e, "api: publish refused by the upstream pool");
                results
                    .push(json!({"topic": r.topic, "status": "failed", "detail": e.to_string()}));
            }
        }
    }
    let timeout = proxy.settings.api.ack_timeout;
    let mut timed_out = false;
    let acks = futures_util::future::join_all(
        waits
            .into_iter()
            .map(|(i, key, rx)| async move { (i, key, tokio::time::timeout(timeout, rx).await) }),
    )
    .await;
    for (i, key, ack) in acks {
        let outcome = match ack {
            Ok(Ok(Ok(()))) => {
                proxy.metrics.sessions.published(ActorType::Server);
                continue;
            }
            Ok(Ok(Err(e))) => e.to_string(),
            Ok(Err(_)) => PublishError::Lost.to_string(),
            Err(_) => {
                timed_out = true;
                format!(
                    "no acknowledgement from the broker within api.ack_timeout_ms ({} ms)",
                    timeout.as_millis()
                )
            }
        };
        forget(proxy, &key);
        proxy.metrics.sessions.dropped(Dropped::Broker);
        if let Some(r) = results.get_mut(i) {
            *r = json!({"topic": r["topic"], "status": "failed", "detail": outcome});
        }
    }
    let failed = results.iter().filter(|r| r["status"] == "failed").count();
    if failed > 0 {
        let status = if timed_out {
            StatusCode::GATEWAY_TIMEOUT
        } else {
            StatusCode::BAD_GATEWAY
        };
        return Err(problem_with(
            status,
            "broker-unavailable",
            &format!(
                "{failed} of {} messages were not acknowledged by the broker",
                results.len()
            ),
            json!({ "results": results }),
        ));
    }
    Ok(if batch {
        respond(StatusCode::OK, &json!({ "results": results }))
    } else {
        let one = results.into_iter().next().unwrap_or(Value::Null);
        respond(StatusCode::OK, &one)
    })
}

fn forget(proxy: &Proxy, key: &Option<(Arc<str>, Arc<str>, String)>) {
    if let Some(k) = key {
        proxy.api.seen.invalidate(k);
    }
}

/// The checks of one message (module docs), in the WebSocket pipeline's order.
fn validate(proxy: &Proxy, actor: &Actor, item: PublishItem) -> Result<Ready, Refusal> {
    let limits = &proxy.settings.limits;
    let snapshot = proxy.store.load();
    let policy = &snapshot.policy;
    let refuse = |status, slug, detail: String, why| Err((status, slug, detail, why));
    let scope = granted_scope(policy, actor, item.scope.as_deref()).map_err(|detail| {
        (
            StatusCode::FORBIDDEN,
            "scope-not-granted",
            detail,
            Dropped::Acl,
        )
    })?;
    let topic = match ClientTopic::parse(&item.topic) {
        Ok(t) => t,
        Err(e) => {
            return refuse(
                StatusCode::BAD_REQUEST,
                "invalid-topic",
                format!("invalid topic {:?}: {e}", item.topic),
                Dropped::Invalid,
            );
        }
    };
    if let Err(d) = policy.authorize(actor, topic, Access::Write) {
        tracing::debug!(actor = %actor.id, topic = %item.topic, reason = %d, "api: publish denied");
        return refuse(
            StatusCode::FORBIDDEN,
            "not-authorized",
            d.to_string(),
            Dropped::Acl,
        );
    }
    let filter = match filters::publish_filter(item.filter.as_deref(), &[]) {
        Ok(f) => f,
        Err(e) => {
            return refuse(
                StatusCode::BAD_REQUEST,
                "invalid-filter",
                e.to_string(),
                Dropped::Invalid,
            );
        }
    };
    if let Some(k) = &item.idempotency_key
        && (k.is_empty() || k.len() > MAX_IDEMPOTENCY_KEY)
    {
        return refuse(
            StatusCode::BAD_REQUEST,
            "invalid-request",
            format!("idempotency_key must be 1 to {MAX_IDEMPOTENCY_KEY} bytes"),
            Dropped::Invalid,
        );
    }
    let mut data = Vec::new();
    crate::wire::msgpack::write_json(&mut data, &item.data);
    if data.len() > limits.max_message_bytes {
        return refuse(
            StatusCode::PAYLOAD_TOO_LARGE,
            "message-too-large",
            format!(
                "data is {} bytes as MessagePack, over limits.max_message_bytes ({})",
                data.len(),
                limits.max_message_bytes
            ),
            Dropped::Size,
        );
    }
    let upstream = proxy
        .router
        .layout()
        .publish_topic(scope.as_deref(), topic, filter.as_deref());
    let max = proxy.pool.max_payload(&upstream);
    if data.len() > max {
        return refuse(
            StatusCode::PAYLOAD_TOO_LARGE,
            "message-too-large",
            format!("data is over what the broker accepts ({max} bytes)"),
            Dropped::Size,
        );
    }
    let idempotency = item
        .idempotency_key
        .map(|k| (actor.project.clone(), actor.id.clone(), k));
    Ok(Ready {
        topic: item.topic,
        upstream,
        payload: Bytes::from(data),
        qos: item.qos.unwrap_or(1),
        retain: item.retain,
        idempotency,
    })
}

/// The namespace a request addresses: the key's own (`requested` absent), or a scope of its
/// project that its actor is granted. `Err`: the detail of the refusal.
fn granted_scope(
    policy: &crate::policy::Policy,
    actor: &Actor,
    requested: Option<&str>,
) -> Result<Option<Arc<str>>, String> {
    let Some(s) = requested else {
        return Ok(actor.scope.clone());
    };
    let project = policy.project(&actor.project);
    let grants = project
        .and_then(|p| p.actors.get(&*actor.id))
        .map(|a| a.grants.clone())
        .unwrap_or_default();
    match project.and_then(|p| p.scopes.get(s)) {
        Some(scope) if grants.allows(Some(&scope.slug), actor.scope()) => {
            Ok(Some(scope.slug.clone()))
        }
        _ => Err(format!("scope {s:?} is not granted to this API key")),
    }
}

/// `?scope=<slug>` of a GET request.
fn scope_param(req: &Request<Incoming>) -> Option<String> {
    req.uri().query()?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == "scope" && !v.is_empty()).then(|| v.to_string())
    })
}

fn scope_refused(detail: String) -> Response<Full<Bytes>> {
    problem(StatusCode::FORBIDDEN, "scope-not-granted", &detail)
}

/// `POST /v1/session-tokens` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SessionTokenRequest {
    ttl_s: u64,
    #[serde(default)]
    scope: Option<String>,
    #[serde(default)]
    rooms: Vec<String>,
}

/// `POST /v1/session-tokens` → `{token, expires_at}`: a guest token of the key's project, in
/// its own namespace or a granted scope.
async fn session_token(proxy: &Arc<Proxy>, req: Request<Incoming>) -> Answer {
    use crate::auth::session_token::{MintError, MintRequest, mint, now_unix};
    let actor = authenticate(proxy, &req)?;
    admit(proxy, &actor, 0)?;
    let body = json_body(proxy, req).await?;
    let r: SessionTokenRequest = serde_json::from_value(body)
        .map_err(|e| problem(StatusCode::BAD_REQUEST, "invalid-request", &e.to_string()))?;
    let snapshot = proxy.store.load();
    let scope =
        granted_scope(&snapshot.policy, &actor, r.scope.as_deref()).map_err(scope_refused)?;
    let now = now_unix();
    let request = MintRequest {
        project: actor.project.to_string(),
        ttl_s: r.ttl_s,
        scope: scope.map(|s| s.to_string()),
        rooms: r.rooms,
    };
    match mint(&snapshot.policy, &request, now) {
        Ok(token) => Ok(respond(
            StatusCode::CREATED,
            &json!({"token": token, "expires_at": now + request.ttl_s}),
        )),
        Err(MintError::NotConfigured(_) | MintError::NoSecret { .. }) => Err(problem(
            StatusCode::CONFLICT,
            "session-tokens-disabled",
            "session tokens are not configured for this project (session: with a secret)",
        )),
        Err(e @ MintError::UnknownScope(_)) => Err(scope_refused(e.to_string())),
        Err(e) => Err(problem(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid-request",
            &e.to_string(),
        )),
    }
}

/// The room `app/room` of the key's project, if the key's actor may see it.
fn room_of<'p>(
    policy: &'p crate::policy::Policy,
    actor: &Actor,
    app: &str,
    room: &str,
) -> Result<(&'p crate::policy::App, &'p crate::policy::Room), Response<Full<Bytes>>> {
    let not_found = || {
        problem(
            StatusCode::NOT_FOUND,
            "no-such-room",
            "no such room in this API key's project",
        )
    };
    let app = policy
        .project(&actor.project)
        .and_then(|p| p.apps.get(app))
        .ok_or_else(not_found)?;
    let room = app.rooms.get(room).ok_or_else(not_found)?;
    policy
        .room_access(actor, app, room)
        .map_err(|d| problem(StatusCode::FORBIDDEN, "not-authorized", &d.to_string()))?;
    Ok((app, room))
}

/// The members of a room as JSON: `[{actor_id, data, joined_at}]`, sorted by actor id.
fn members_json(members: &[(Arc<str>, crate::presence::core::Member)]) -> Value {
    Value::Array(
        members
            .iter()
            .map(|(actor, m)| {
                json!({
                    "actor_id": &**actor,
                    "data": crate::wire::msgpack::read_json(&m.data).unwrap_or(Value::Null),
                    "joined_at": m.joined_at,
                })
            })
            .collect(),
    )
}

fn room_key(
    actor: &Actor,
    app: &Arc<str>,
    room: &Arc<str>,
    scope: Option<Arc<str>>,
) -> crate::presence::core::RoomKey {
    crate::presence::core::RoomKey {
        project: actor.project.clone(),
        app: app.clone(),
        scope,
        room: room.clone(),
    }
}

/// A presence read: the key's actor (admitted by its buckets), the policy, and the namespace
/// `?scope=` names.
type PresenceRead = (Arc<Actor>, Arc<crate::reload::Snapshot>, Option<Arc<str>>);

fn presence_read(
    proxy: &Proxy,
    req: &Request<Incoming>,
) -> Result<PresenceRead, Response<Full<Bytes>>> {
    let actor = authenticate(proxy, req)?;
    admit(proxy, &actor, 0)?;
    let snapshot = proxy.store.snapshot();
    let scope = granted_scope(&snapshot.policy, &actor, scope_param(req).as_deref())
        .map_err(scope_refused)?;
    Ok((actor, snapshot, scope))
}

/// `GET /v1/presence/{app}/{room}?scope=` → `{app, room, scope, members}`, across replicas.
fn presence(proxy: &Arc<Proxy>, req: &Request<Incoming>, app: &str, room: &str) -> Answer {
    let (actor, snapshot, scope) = presence_read(proxy, req)?;
    let (app, room) = room_of(&snapshot.policy, &actor, app, room)?;
    let members = proxy
        .presence
        .members(&room_key(&actor, &app.slug, &room.slug, scope.clone()));
    Ok(respond(
        StatusCode::OK,
        &json!({
            "app": &*app.slug,
            "room": &*room.slug,
            "scope": scope.as_deref(),
            "members": members_json(&members),
        }),
    ))
}

/// `GET /v1/lobbies/{app}/{lobby}?scope=` → `{app, lobby, scope, rooms: {room: members}}`:
/// the lobby's rooms the key's actor may see.
fn lobby(proxy: &Arc<Proxy>, req: &Request<Incoming>, app: &str, lobby: &str) -> Answer {
    let (actor, snapshot, scope) = presence_read(proxy, req)?;
    let policy = &snapshot.policy;
    let found = policy
        .project(&actor.project)
        .and_then(|p| p.lobby(lobby))
        .filter(|(a, _)| &*a.slug == app);
    let Some((app, lobby)) = found else {
        return Err(problem(
            StatusCode::NOT_FOUND,
            "no-such-lobby",
            "no such lobby in this app of the API key's project",
        ));
    };
    let rooms = policy.lobby_rooms_open_to(&actor, app, lobby);
    let key = room_key(&actor, &app.slug, &app.slug, scope.clone());
    let view = proxy.presence.lobby_view(&key, &rooms);
    let rooms: serde_json::Map<String, Value> = view
        .iter()
        .map(|(room, members)| (room.to_string(), members_json(members)))
        .collect();
    Ok(respond(
        StatusCode::OK,
        &json!({
            "app": &*app.slug,
            "lobby": &*lobby.slug,
            "scope": scope.as_deref(),
            "rooms": rooms,
        }),
    ))
}

/// `POST /v1/actors/{id}/disconnect`.
async fn disconnect(proxy: &Arc<Proxy>, req: &Request<Incoming>, id: &str) -> Answer {
    use super::control::{Disconnect, Namespaces};
    use crate::policy::ScopeGrants;
    let actor = authenticate(proxy, req)?;
    admit(proxy, &actor, 0)?;
    if let Err(why) = crate::policy::check_actor_id(id) {
        return Err(problem(
            StatusCode::BAD_REQUEST,
            "invalid-actor",
            &format!("invalid actor id {id:?}: {why}"),
        ));
    }
    let grants = {
        let snapshot = proxy.store.load();
        snapshot
            .policy
            .project(&actor.project)
            .and_then(|p| p.actors.get(&*actor.id))
            .map(|a| a.grants.clone())
            .unwrap_or_default()
    };
    let own = actor.scope.as_deref().map(str::to_string);
    let namespaces = match grants {
        ScopeGrants::All => Namespaces::AllScopes { own },
        ScopeGrants::Some(list) => {
            let mut n = vec![own];
            n.extend(list.iter().map(|s| Some(s.to_string())));
            Namespaces::Only(n)
        }
        ScopeGrants::Own => Namespaces::Only(vec![own]),
    };
    let request = Disconnect {
        project: actor.project.to_string(),
        actor: id.to_string(),
        namespaces,
    };
    let notified_here = proxy.kick(&request);
    let topic = proxy.router.layout().control_topic("disconnect");
    let (tx, rx) = tokio::sync::oneshot::channel();
    let sent = proxy
        .pool
        .publish(
            topic,
            crate::upstream::qos(1),
            false,
            request.encode(),
            Some(tx),
        )
        .map_err(|e| e.to_string());
    let acked = match sent {
        Ok(()) => match tokio::time::timeout(proxy.settings.api.ack_timeout, rx).await {
            Ok(Ok(Ok(()))) => Ok(()),
            Ok(Ok(Err(e))) => Err(e.to_string()),
            _ => Err("no acknowledgement from the broker".to_string()),
        },
        Err(e) => Err(e),
    };
    tracing::debug!(by = %actor.id, actor = id, notified_here, ok = acked.is_ok(), "api: disconnect");
    match acked {
        Ok(()) => Ok(respond(
            StatusCode::ACCEPTED,
            &json!({"actor": id, "notified_here": notified_here}),
        )),
        Err(detail) => Err(problem_with(
            StatusCode::BAD_GATEWAY,
            "broker-unavailable",
            &format!("closed here, but the other replicas were not told: {detail}"),
            json!({"notified_here": notified_here}),
        )),
    }
}

/// A path segment with its `%XX` escapes decoded (actor ids may hold characters a URL must
/// escape, e.g. `auth0|123`). `None`: a broken escape or invalid UTF-8.
fn percent_decoded(segment: &str) -> Option<String> {
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        if b == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::percent_decoded;

    #[test]
    fn path_segments_are_percent_decoded() {
        assert_eq!(percent_decoded("alice").as_deref(), Some("alice"));
        assert_eq!(percent_decoded("auth0%7C123").as_deref(), Some("auth0|123"));
        assert_eq!(percent_decoded("a%20b").as_deref(), Some("a b"));
        for bad in ["%", "%4", "%zz", "%ff%fe"] {
            assert_eq!(percent_decoded(bad), None, "{bad}");
        }
    }
}
