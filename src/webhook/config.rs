//! A project's webhook endpoints as the policy declares them (`projects[].webhooks`), validated
//! with every problem reported against its YAML path.

use std::sync::Arc;
use std::time::Duration;

use super::guard;
use super::sign::SigningKey;
use crate::diagnostics::{Diagnostics, quoted};
use crate::policy::CompileContext;
use crate::policy::spec::WebhookSpec;
use crate::topic::{ClientFilter, ClientTopic};

/// The event types an endpoint can ask for (DESIGN §10). `webhook.dropped` is not asked for:
/// every endpoint gets its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventKind {
    Connect,
    Disconnect,
    Subscribe,
    Unsubscribe,
    Publish,
    Presence,
    /// Events this endpoint lost (queue full, retries exhausted).
    Dropped,
}

impl EventKind {
    pub const SUBSCRIBABLE: [EventKind; 6] = [
        EventKind::Connect,
        EventKind::Disconnect,
        EventKind::Subscribe,
        EventKind::Unsubscribe,
        EventKind::Publish,
        EventKind::Presence,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Connect => "connect",
            EventKind::Disconnect => "disconnect",
            EventKind::Subscribe => "subscribe",
            EventKind::Unsubscribe => "unsubscribe",
            EventKind::Publish => "publish",
            EventKind::Presence => "presence",
            EventKind::Dropped => "webhook.dropped",
        }
    }

    fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

/// One endpoint of a project, compiled.
#[derive(Debug)]
pub struct EndpointConfig {
    /// As written; with the project, the endpoint's identity across reloads.
    pub url: Arc<str>,
    pub uri: hyper::Uri,
    /// `None`: the secret's variable is unset, and the endpoint is off (failing closed).
    pub key: Option<SigningKey>,
    events: u8,
    /// Publish events only for these `app/room/topic` filters (`None`: every topic).
    topics: Option<Vec<String>>,
    pub allow_private: bool,
    /// 0: one event per request.
    pub batch_window: Duration,
    /// SHA-256 of everything above (the secret included): a `410` disables the endpoint until
    /// its configuration changes.
    pub fingerprint: [u8; 32],
}

impl EndpointConfig {
    /// Whether this endpoint takes events of `kind` (and is on).
    pub fn wants(&self, kind: EventKind) -> bool {
        self.key.is_some() && self.events & kind.bit() != 0
    }

    /// Whether a publish to `topic` is sent to this endpoint.
    pub fn wants_publish(&self, topic: &ClientTopic<'_>) -> bool {
        self.wants(EventKind::Publish)
            && self.topics.as_ref().is_none_or(|filters| {
                filters.iter().any(|f| {
                    ClientFilter::parse(f)
                        .is_ok_and(|f| f.app == topic.app && f.matches(topic.room, topic.topic))
                })
            })
    }
}

/// Longest batching window: beyond it events are late, not batched.
const MAX_BATCH_WINDOW_MS: u64 = 60_000;

/// Compiles `projects[i].webhooks` (at `path`).
pub fn compile(
    specs: &[WebhookSpec],
    path: &str,
    cx: &CompileContext<'_>,
    diags: &mut Diagnostics,
) -> Vec<Arc<EndpointConfig>> {
    let mut out: Vec<Arc<EndpointConfig>> = Vec::new();
    for (i, w) in specs.iter().enumerate() {
        let wp = format!("{path}[{i}]");
        let Some(uri) = check_url(w, &format!("{wp}.url"), diags) else {
            continue;
        };
        if out.iter().any(|e| *e.url == *w.url) {
            diags.error(
                format!("{wp}.url"),
                format!("duplicate webhook url {}", quoted(&w.url)),
            );
            continue;
        }
        let mut events = 0u8;
        if w.events.is_empty() {
            diags.error(
                format!("{wp}.events"),
                "must name at least one event type (connect, disconnect, subscribe, unsubscribe, publish, presence)",
            );
        }
        for (j, e) in w.events.iter().enumerate() {
            match EventKind::SUBSCRIBABLE.iter().find(|k| k.as_str() == e) {
                Some(k) if events & k.bit() != 0 => diags.error(
                    format!("{wp}.events[{j}]"),
                    format!("duplicate event type {}", quoted(e)),
                ),
                Some(k) => events |= k.bit(),
                None => diags.error(
                    format!("{wp}.events[{j}]"),
                    format!(
                        "unknown event type {} (expected connect, disconnect, subscribe, unsubscribe, publish or presence)",
                        quoted(e)
                    ),
                ),
            }
        }
        if let Some(topics) = &w.topics {
            if events & EventKind::Publish.bit() == 0 {
                diags.warn(
                    format!("{wp}.topics"),
                    "filters publish events, but this endpoint does not take them",
                );
            }
            for (j, t) in topics.iter().enumerate() {
                if let Err(e) = ClientFilter::parse(t) {
                    diags.error(
                        format!("{wp}.topics[{j}]"),
                        format!("invalid filter {}: {e}", quoted(t)),
                    );
                }
            }
        }
        if w.batch_window_ms > MAX_BATCH_WINDOW_MS {
            diags.error(
                format!("{wp}.batch_window_ms"),
                format!(
                    "{} is out of range (0..={MAX_BATCH_WINDOW_MS})",
                    w.batch_window_ms
                ),
            );
        }
        let sp = format!("{wp}.secret_env");
        let secret = cx.secret(&w.secret_env, &sp, diags);
        let key = secret
            .as_ref()
            .and_then(|s| match SigningKey::parse(s.expose()) {
                Ok(k) => Some(k),
                Err(why) => {
                    diags.error(&sp, format!("{}: {why}", quoted(&w.secret_env)));
                    None
                }
            });
        let fingerprint = {
            use sha2::{Digest, Sha256};
            let mut h = Sha256::new();
            for part in [
                w.url.as_str(),
                secret.as_ref().map_or("", |s| s.expose().as_str()),
                &w.events.join(","),
                &w.topics.as_ref().map(|t| t.join(",")).unwrap_or_default(),
                if w.allow_private { "private" } else { "public" },
                &w.batch_window_ms.to_string(),
            ] {
                h.update(part.as_bytes());
                h.update([0]);
            }
            h.finalize().into()
        };
        out.push(Arc::new(EndpointConfig {
            url: w.url.as_str().into(),
            uri,
            key,
            events,
            topics: w.topics.clone(),
            allow_private: w.allow_private,
            batch_window: Duration::from_millis(w.batch_window_ms.min(MAX_BATCH_WINDOW_MS)),
            fingerprint,
        }));
    }
    out
}

fn check_url(w: &WebhookSpec, path: &str, diags: &mut Diagnostics) -> Option<hyper::Uri> {
    let uri: hyper::Uri = match w.url.parse() {
        Ok(u) => u,
        Err(e) => {
            diags.error(path, format!("invalid url {}: {e}", quoted(&w.url)));
            return None;
        }
    };
    if !matches!(uri.scheme_str(), Some("http" | "https")) {
        diags.error(
            path,
            format!("{}: the scheme must be https or http", quoted(&w.url)),
        );
        return None;
    }
    let Some(host) = uri.host() else {
        diags.error(path, format!("{}: no host", quoted(&w.url)));
        return None;
    };
    if uri.authority().is_some_and(|a| a.as_str().contains('@')) {
        diags.error(
            path,
            format!(
                "{}: credentials in the url are not supported",
                quoted(&w.url)
            ),
        );
        return None;
    }
    let literal = host.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = literal.parse::<std::net::IpAddr>()
        && !guard::is_public(ip)
        && !w.allow_private
    {
        diags.error(
            path,
            format!(
                "{}: {ip} is a private, loopback or link-local address; set allow_private: true to send webhooks there",
                quoted(&w.url)
            ),
        );
        return None;
    }
    Some(uri)
}
