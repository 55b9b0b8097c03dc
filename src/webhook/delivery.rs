//! One endpoint's queue and the worker that empties it (DESIGN §10).
//!
//! The queue is bounded in events and in bytes (`webhooks.queue_events`, `queue_bytes`); a
//! push that does not fit is dropped and counted, and the worker announces the count with a
//! `webhook.dropped` event ahead of the next batch. The worker takes a batch (one event, or
//! after `batch_window_ms` up to `webhooks.max_batch` events within `max_request_bytes`) once
//! one of `webhooks.max_in_flight` request slots is free, and sends it on its own task:
//! attempts of `webhooks.timeout_ms` each, up to `max_attempts`, separated by exponential
//! backoff with jitter or by the receiver's `Retry-After`. A `410 Gone` disables the endpoint
//! (its queue is dropped) until its configuration changes.
//!
//! Memory per endpoint is therefore at most `queue_bytes` queued plus `max_in_flight` batches
//! of at most `max_request_bytes` being sent, whatever the receiver does.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use bytes::{Bytes, BytesMut};
use http_body_util::{BodyExt, Full, Limited};
use hyper::header::{CONTENT_TYPE, HeaderValue, RETRY_AFTER, USER_AGENT};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use parking_lot::Mutex;
use tokio::sync::{Notify, Semaphore};

use super::guard::GuardedResolver;
use super::{Encoded, EndpointConfig, EndpointKey, Webhooks};
use crate::config::WebhookSettings;
use crate::metrics::{WebhookMetrics, WebhookOutcome};

/// How often an idle worker looks whether its endpoint is still in the policy.
const CONFIG_RECHECK: Duration = Duration::from_secs(5);
/// Bytes of a receiver's answer read (so that the connection can be reused); the rest is
/// not read and the connection is dropped.
const MAX_ANSWER_BYTES: usize = 64 << 10;
/// Connections kept idle per endpoint this long.
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

type HttpClient = Client<HttpsConnector<HttpConnector<GuardedResolver>>, Full<Bytes>>;

#[derive(Debug, Default)]
struct Queue {
    items: VecDeque<Arc<Encoded>>,
    bytes: usize,
}

/// One endpoint of one project on this replica.
#[derive(Debug)]
pub(super) struct Endpoint {
    pub key: EndpointKey,
    queue: Mutex<Queue>,
    wake: Notify,
    /// Dropped since the last `webhook.dropped` event: queue full…
    dropped_full: AtomicU64,
    /// …and every attempt failed.
    dropped_exhausted: AtomicU64,
    /// Events in requests being sent or retried.
    in_flight: AtomicUsize,
    /// Disabled (410) or removed from the policy: takes nothing more.
    closed: AtomicBool,
}

impl Endpoint {
    pub(super) fn new(key: EndpointKey) -> Self {
        Self {
            key,
            queue: Mutex::new(Queue::default()),
            wake: Notify::new(),
            dropped_full: AtomicU64::new(0),
            dropped_exhausted: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            closed: AtomicBool::new(false),
        }
    }

    /// Queues `event`, or drops it (counted and announced) when it does not fit.
    pub(super) fn push(&self, event: Arc<Encoded>, s: &WebhookSettings, metrics: &WebhookMetrics) {
        let cost = event.cost();
        let mut q = self.queue.lock();
        if self.closed.load(Ordering::Relaxed) {
            drop(q);
            metrics.events(WebhookOutcome::Disabled, 1);
            return;
        }
        if q.items.len() >= s.queue_events || q.bytes + cost > s.queue_bytes {
            drop(q);
            self.dropped_full.fetch_add(1, Ordering::Relaxed);
            metrics.events(WebhookOutcome::QueueFull, 1);
            return;
        }
        q.bytes += cost;
        q.items.push_back(event);
        drop(q);
        self.wake.notify_one();
    }

    /// (events, bytes) queued.
    pub(super) fn queued(&self) -> (usize, usize) {
        let q = self.queue.lock();
        (q.items.len(), q.bytes)
    }

    pub(super) fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    fn has_work(&self) -> bool {
        !self.queue.lock().items.is_empty()
            || self.dropped_full.load(Ordering::Relaxed) > 0
            || self.dropped_exhausted.load(Ordering::Relaxed) > 0
    }

    /// Up to `max` events within `max_bytes` of body (one at least, if any).
    fn take(&self, max: usize, max_bytes: usize) -> Vec<Arc<Encoded>> {
        let mut q = self.queue.lock();
        let mut out = Vec::new();
        let mut body = 2;
        while out.len() < max {
            let Some(next) = q.items.front() else { break };
            let len = next.json.len() + 1;
            if !out.is_empty() && body + len > max_bytes {
                break;
            }
            body += len;
            let cost = next.cost();
            if let Some(e) = q.items.pop_front() {
                q.bytes = q.bytes.saturating_sub(cost);
                out.push(e);
            }
        }
        out
    }

    /// Takes nothing more and drops what is queued (counted as disabled).
    pub(super) fn close(&self, metrics: &WebhookMetrics) {
        self.closed.store(true, Ordering::Relaxed);
        let dropped = {
            let mut q = self.queue.lock();
            let n = q.items.len();
            q.items.clear();
            q.bytes = 0;
            n
        };
        metrics.events(WebhookOutcome::Disabled, dropped);
        self.wake.notify_one();
    }
}

/// The endpoint's worker: runs until the endpoint is disabled or leaves the policy.
pub(super) async fn run(hooks: Arc<Webhooks>, ep: Arc<Endpoint>) {
    let s = hooks.settings;
    let slots = Arc::new(Semaphore::new(s.max_in_flight));
    let mut client: Option<(bool, HttpClient)> = None;
    loop {
        let cfg = match hooks.config_of(&ep.key) {
            Some(cfg) if cfg.key.is_some() && !ep.closed.load(Ordering::Relaxed) => cfg,
            _ => {
                // Removed from the policy (or its secret), or disabled by a 410.
                if !ep.closed.load(Ordering::Relaxed) {
                    hooks.retire(&ep, None);
                }
                return;
            }
        };
        if !ep.has_work() {
            tokio::select! {
                _ = ep.wake.notified() => {}
                _ = tokio::time::sleep(CONFIG_RECHECK) => {}
            }
            continue;
        }
        let batching = !cfg.batch_window.is_zero();
        if batching {
            tokio::time::sleep(cfg.batch_window).await;
        }
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let http = match &client {
            Some((private, c)) if *private == cfg.allow_private => c.clone(),
            _ => match build_client(cfg.allow_private, &s) {
                Ok(c) => {
                    client = Some((cfg.allow_private, c.clone()));
                    c
                }
                Err(e) => {
                    tracing::error!(error = %e, "webhooks: no TLS configuration; endpoint not served");
                    hooks.retire(&ep, None);
                    return;
                }
            },
        };
        let full = ep.dropped_full.swap(0, Ordering::Relaxed);
        let exhausted = ep.dropped_exhausted.swap(0, Ordering::Relaxed);
        let announced = (full, exhausted);
        let mut batch = Vec::new();
        if full + exhausted > 0 {
            batch.push(Arc::new(
                hooks.next_dropped_event(&ep.key.0, full, exhausted),
            ));
        }
        // Not batching: the announcement goes alone, the events wait for the next request.
        if batching || batch.is_empty() {
            let room = if batching { s.max_batch } else { 1 };
            batch.extend(ep.take(room.saturating_sub(batch.len()).max(1), s.max_request_bytes));
        }
        if batch.is_empty() {
            continue;
        }
        let events = batch.len() - usize::from(full + exhausted > 0);
        ep.in_flight.fetch_add(events, Ordering::Relaxed);
        let attempt = Attempt {
            hooks: hooks.clone(),
            ep: ep.clone(),
            http,
            batch,
            events,
            announced,
            batching,
        };
        tokio::spawn(async move {
            attempt.deliver().await;
            drop(slot);
        });
    }
}

/// How one request ended.
enum Answer {
    Ok,
    Gone,
    Retry(Option<Duration>),
}

/// One batch and what it takes to send it.
struct Attempt {
    hooks: Arc<Webhooks>,
    ep: Arc<Endpoint>,
    http: HttpClient,
    batch: Vec<Arc<Encoded>>,
    /// Events of the batch, not counting a leading announcement.
    events: usize,
    /// The counts a leading `webhook.dropped` announces (0, 0: none).
    announced: (u64, u64),
    batching: bool,
}

impl Attempt {
    async fn deliver(self) {
        let s = self.hooks.settings;
        let metrics = &self.hooks.metrics;
        let (id, body) = self.body();
        let mut attempt = 0u32;
        let outcome = loop {
            attempt += 1;
            if self.ep.closed.load(Ordering::Relaxed) {
                break WebhookOutcome::Disabled;
            }
            // Read on every attempt: a rotated secret signs the retries.
            let Some(cfg) = self.hooks.config_of(&self.ep.key) else {
                break WebhookOutcome::Disabled;
            };
            let started = tokio::time::Instant::now();
            let (label, answer) =
                match tokio::time::timeout(s.timeout, self.send(&cfg, &id, &body)).await {
                    Err(_) => ("timeout", Answer::Retry(None)),
                    Ok(Err(e)) => {
                        tracing::debug!(url = %self.ep.key.1, error = %e, "webhook request failed");
                        ("connect_error", Answer::Retry(None))
                    }
                    Ok(Ok((status, retry_after))) => classify(status, retry_after),
                };
            metrics.attempt(label, started.elapsed());
            match answer {
                Answer::Ok => break WebhookOutcome::Delivered,
                Answer::Gone => {
                    tracing::warn!(project = %self.ep.key.0, url = %self.ep.key.1, "webhook endpoint answered 410 Gone: disabled until its configuration changes");
                    self.hooks.retire(&self.ep, Some(cfg.fingerprint));
                    break WebhookOutcome::Disabled;
                }
                Answer::Retry(_) if attempt >= s.max_attempts => {
                    tracing::debug!(url = %self.ep.key.1, attempts = attempt, "webhook batch dropped: every attempt failed");
                    break WebhookOutcome::RetriesExhausted;
                }
                Answer::Retry(after) => {
                    tokio::time::sleep(backoff(attempt, after, &s)).await;
                }
            }
        };
        metrics.events(outcome, self.events);
        match outcome {
            WebhookOutcome::Delivered => {
                for e in &self.batch {
                    metrics.delivered_after(e.at.elapsed());
                }
            }
            WebhookOutcome::RetriesExhausted => {
                // Announced by the next request, with what this one failed to announce.
                let (full, exhausted) = self.announced;
                self.ep.dropped_full.fetch_add(full, Ordering::Relaxed);
                self.ep
                    .dropped_exhausted
                    .fetch_add(exhausted + self.events as u64, Ordering::Relaxed);
                self.ep.wake.notify_one();
            }
            WebhookOutcome::QueueFull | WebhookOutcome::Disabled => {}
        }
        self.ep.in_flight.fetch_sub(self.events, Ordering::Relaxed);
    }

    /// The message id and the body: the event itself, or (batching) a JSON array of events.
    fn body(&self) -> (String, Bytes) {
        match self.batch.as_slice() {
            [one] if !self.batching => (one.id.clone(), one.json.clone()),
            events => {
                let first = events.first().map_or("", |e| e.id.as_str());
                let mut body = BytesMut::with_capacity(
                    2 + events.iter().map(|e| e.json.len() + 1).sum::<usize>(),
                );
                body.extend_from_slice(b"[");
                for (i, e) in events.iter().enumerate() {
                    if i > 0 {
                        body.extend_from_slice(b",");
                    }
                    body.extend_from_slice(&e.json);
                }
                body.extend_from_slice(b"]");
                (format!("batch-{first}"), body.freeze())
            }
        }
    }

    /// One request: the status and `Retry-After`, with the answer read (bounded).
    async fn send(
        &self,
        cfg: &EndpointConfig,
        id: &str,
        body: &Bytes,
    ) -> Result<(hyper::StatusCode, Option<Duration>), Box<dyn std::error::Error + Send + Sync>>
    {
        let key = cfg.key.as_ref().ok_or("no signing key")?;
        let timestamp = crate::auth::session_token::now_unix();
        let req = hyper::Request::post(cfg.uri.clone())
            .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
            .header(
                USER_AGENT,
                HeaderValue::from_static(concat!("cuttle/", env!("CARGO_PKG_VERSION"))),
            )
            .header("webhook-id", id)
            .header("webhook-timestamp", timestamp)
            .header("webhook-signature", key.sign(id, timestamp, body))
            .body(Full::new(body.clone()))?;
        let resp = self.http.request(req).await?;
        let status = resp.status();
        let retry_after = resp
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_retry_after);
        // Read so that the connection goes back to the pool; a long answer is not waited for.
        let _ = Limited::new(resp.into_body(), MAX_ANSWER_BYTES)
            .collect()
            .await;
        Ok((status, retry_after))
    }
}

fn classify(status: hyper::StatusCode, retry_after: Option<Duration>) -> (&'static str, Answer) {
    match status.as_u16() {
        200..=299 => ("ok", Answer::Ok),
        410 => ("gone", Answer::Gone),
        429 => ("rate_limited", Answer::Retry(retry_after)),
        _ => ("error_status", Answer::Retry(retry_after)),
    }
}

/// `Retry-After`: seconds, or an HTTP date.
fn parse_retry_after(v: &str) -> Option<Duration> {
    let v = v.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(v).ok()?;
    Some(at.duration_since(SystemTime::now()).unwrap_or_default())
}

/// The wait after failed attempt number `attempt` (1-based): the receiver's `Retry-After`
/// if it gave one, else `backoff × 2^(attempt-1)` with jitter over its upper half (spread
/// retries of many replicas apart, never retry sooner than half the schedule); both capped
/// at `max_backoff`.
fn backoff(attempt: u32, retry_after: Option<Duration>, s: &WebhookSettings) -> Duration {
    if let Some(after) = retry_after {
        return after.min(s.max_backoff);
    }
    let exp = s
        .backoff
        .saturating_mul(1u32 << attempt.saturating_sub(1).min(20))
        .min(s.max_backoff);
    let half = exp / 2;
    let jitter = getrandom::u64().unwrap_or(0) % (half.as_millis() as u64 + 1);
    half + Duration::from_millis(jitter)
}

fn build_client(allow_private: bool, s: &WebhookSettings) -> Result<HttpClient, rustls::Error> {
    let mut http = HttpConnector::new_with_resolver(GuardedResolver { allow_private });
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(s.timeout));
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_provider_and_webpki_roots(rustls::crypto::aws_lc_rs::default_provider())?
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    Ok(Client::builder(TokioExecutor::new())
        .pool_idle_timeout(IDLE_TIMEOUT)
        .pool_max_idle_per_host(s.max_in_flight)
        .build(https))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> WebhookSettings {
        WebhookSettings {
            queue_events: 3,
            queue_bytes: 1000,
            max_in_flight: 1,
            timeout: Duration::from_secs(1),
            max_attempts: 3,
            backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(2),
            max_batch: 10,
            max_request_bytes: 1 << 20,
            max_data_bytes: 1024,
        }
    }

    fn event(len: usize) -> Arc<Encoded> {
        Arc::new(Encoded {
            id: "x".into(),
            json: Bytes::from(vec![b'a'; len]),
            at: std::time::Instant::now(),
        })
    }

    #[test]
    fn the_queue_is_bounded_in_events_and_bytes() {
        let m = crate::metrics::Metrics::new();
        let s = settings();
        let ep = Endpoint::new(("p".into(), "u".into()));
        for _ in 0..5 {
            ep.push(event(10), &s, &m.webhooks);
        }
        assert_eq!(ep.queued().0, 3, "count bound");
        assert_eq!(ep.dropped_full.load(Ordering::Relaxed), 2);
        let ep = Endpoint::new(("p".into(), "u".into()));
        for _ in 0..5 {
            ep.push(event(400), &s, &m.webhooks);
        }
        let (n, bytes) = ep.queued();
        assert_eq!(n, 2, "byte bound");
        assert!(bytes <= s.queue_bytes, "{bytes}");
        let taken = ep.take(10, 1 << 20);
        assert_eq!(taken.len(), 2);
        assert_eq!(ep.queued(), (0, 0));
    }

    #[test]
    fn backoff_grows_with_jitter_and_honours_retry_after() {
        let s = settings();
        for attempt in 1..10 {
            let d = backoff(attempt, None, &s);
            let exp = (s.backoff * (1 << (attempt - 1))).min(s.max_backoff);
            assert!(d >= exp / 2 && d <= exp, "{attempt}: {d:?} vs {exp:?}");
        }
        assert_eq!(
            backoff(1, Some(Duration::from_secs(1)), &s),
            Duration::from_secs(1)
        );
        assert_eq!(
            backoff(1, Some(Duration::from_secs(3600)), &s),
            s.max_backoff
        );
        assert_eq!(parse_retry_after("7"), Some(Duration::from_secs(7)));
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon"), None);
    }
}
