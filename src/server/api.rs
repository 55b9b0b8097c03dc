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
//! The rest of `/v1` (session tokens, presence and lobby queries, disconnects) answers 404
//! until it is built (issue 11).

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

/// Serves one `/v1/...` request.
pub(super) async fn handle(proxy: Arc<Proxy>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_string();
    match (req.method(), path.as_str()) {
        (&Method::POST, "/v1/publish") => match publish(&proxy, req).await {
            Ok(r) | Err(r) => r,
        },
        (_, "/v1/publish") => {
            let mut r = problem(
                StatusCode::METHOD_NOT_ALLOWED,
                "method-not-allowed",
                "use POST",
            );
            r.headers_mut()
                .insert(hyper::header::ALLOW, HeaderValue::from_static("POST"));
            r
        }
        _ => problem(
            StatusCode::NOT_FOUND,
            "not-found",
            "no such endpoint (built: POST /v1/publish)",
        ),
    }
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
    // The namespace: the key's own, or a granted scope of its project.
    let grants = policy
        .project(&actor.project)
        .and_then(|p| p.actors.get(&*actor.id))
        .map(|a| a.grants.clone())
        .unwrap_or_default();
    let scope = match item.scope.as_deref() {
        None => actor.scope.clone(),
        Some(s) => {
            let known = policy
                .project(&actor.project)
                .and_then(|p| p.scopes.get(s).map(|sc| sc.slug.clone()));
            match known {
                Some(slug) if grants.allows(Some(&slug), actor.scope()) => Some(slug),
                _ => {
                    return refuse(
                        StatusCode::FORBIDDEN,
                        "scope-not-granted",
                        format!("scope {s:?} is not granted to this API key"),
                        Dropped::Acl,
                    );
                }
            }
        }
    };
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
