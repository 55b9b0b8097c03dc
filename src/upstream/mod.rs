//! The upstream pool: `upstream.pool` MQTT connections shared by every session, spread over
//! the configured brokers (`upstream.brokers`, or every address of a broker's name).
//!
//! - **Subscriptions** are reference-counted by the router; the pool only hears "filter X is
//!   now wanted / no longer wanted". Each filter lives on exactly one connection (chosen by
//!   hash), so a broker message reaches the proxy once. After a reconnect the connection
//!   re-subscribes everything assigned to it.
//! - **Publishes** of one topic always use the same connection, so they keep their order.
//!   Publishing never waits: a full connection, or a namespace at its share of it, refuses at
//!   once ([`PublishError::Saturated`]; the queue and its fairness: [`outbox`]), and a
//!   publish larger than the broker's Maximum Packet Size is refused to its sender
//!   ([`PublishError::TooLarge`]) instead of costing the shared connection. A publish that
//!   asks for an acknowledgement completes when the broker acknowledged it (PUBACK for QoS 1
//!   — QoS 2 is sent as QoS 1 — written to the socket for QoS 0).
//! - **Incoming messages** and **SUBACK results** are handed to a [`Dispatch`] on the
//!   connection's event-loop task; dispatching must never block (the router only does
//!   `try_send`s).
//!
//! Each connection is one task on rumqttc's MQTT codecs (MQTT 5, or 3.1.1 with routing by
//! topic matching: [`connection`] explains both). Reconnects back off exponentially
//! (100 ms → 5 s) and move to the next broker after a failed connect; `connected()` and
//! [`Pool::links`] feed `/readyz`.

mod codec;
mod connection;
mod matcher;
mod outbox;

use std::hash::BuildHasher;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use rumqttc::v5::mqttbytes::QoS;
use tokio::sync::oneshot;

use crate::config::UpstreamSettings;

pub use codec::Version;
pub use connection::{LinkStatus, PublishError};

/// `upstream.protocol`: which MQTT version the pool speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Protocol {
    /// MQTT 5, falling back to 3.1.1 for a broker that refuses it.
    #[default]
    Auto,
    V5,
    V3,
}

/// Receives every message the broker delivers, with the identifiers of the subscriptions it
/// matched. Called on a connection's event-loop task: must not block or await.
pub trait Dispatch: Send + Sync + 'static {
    fn dispatch(&self, topic: &str, subscription_ids: &[usize], payload: Bytes);

    /// The broker answered the SUBSCRIBE of `filter` with subscription id `id`: granted or
    /// refused. From here on (when granted) every matching message carries `id`.
    fn subscription_result(&self, filter: &str, id: usize, granted: bool);
}

/// Payload bytes of publishes one connection holds before the broker has them: at least this,
/// and room for a few messages of the largest size.
const QUEUED_BYTES_MIN: usize = 32 << 20;

/// Largest MQTT 5 subscription identifier.
pub const MAX_SUBSCRIPTION_ID: usize = 268_435_455;

/// Where the pool connects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub host: String,
    pub port: u16,
    pub tls: bool,
}

/// The pool of upstream connections.
pub struct Pool {
    conns: Vec<connection::Connection>,
    connected: Arc<AtomicUsize>,
    hasher: std::collections::hash_map::RandomState,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("size", &self.conns.len())
            .field("connected", &self.connected())
            .finish()
    }
}

/// The MQTT QoS for a protocol `qos` value (0, 1, 2).
pub fn qos(level: u8) -> QoS {
    match level {
        0 => QoS::AtMostOnce,
        2 => QoS::ExactlyOnce,
        _ => QoS::AtLeastOnce,
    }
}

/// The QoS a client publish is sent upstream with: `qos` capped at 1. Exactly-once cannot
/// survive the hop anyway (the proxy's acknowledgement to the client is at-least-once), and
/// rumqttc's QoS 2 publishing stalled after the broker's in-flight window against Mosquitto
/// 2.0 in our tests (20 messages, then nothing).
pub fn publish_qos(level: u8) -> QoS {
    match level {
        0 => QoS::AtMostOnce,
        _ => QoS::AtLeastOnce,
    }
}

impl Pool {
    /// Starts `settings.pool` connections to `endpoints` (connection `i` starts at endpoint
    /// `i`, modulo their number). Returns at once; connections come up in the background (see
    /// [`Pool::connected`]). Must be called inside a Tokio runtime.
    pub fn start(
        settings: &UpstreamSettings,
        endpoints: Vec<Endpoint>,
        max_packet: usize,
        dispatch: Arc<dyn Dispatch>,
    ) -> Arc<Self> {
        let metrics = crate::metrics::Metrics::new().upstream.clone();
        Self::start_with_will(settings, endpoints, max_packet, dispatch, None, metrics)
    }

    /// [`Pool::start`], with a last will `(topic, payload)` on the connection that carries
    /// publishes to `topic` (so the broker sends it after everything that connection
    /// published: presence's goodbye when the replica dies).
    pub fn start_with_will(
        settings: &UpstreamSettings,
        endpoints: Vec<Endpoint>,
        max_packet: usize,
        dispatch: Arc<dyn Dispatch>,
        will: Option<(String, Bytes)>,
        metrics: crate::metrics::UpstreamMetrics,
    ) -> Arc<Self> {
        let connected = Arc::new(AtomicUsize::new(0));
        let hasher = std::collections::hash_map::RandomState::new();
        let size = settings.pool.max(1);
        let will_on = will
            .as_ref()
            .map(|(topic, _)| (hasher.hash_one(topic.as_str()) % size as u64) as usize);
        // Client ids must be unique across replicas and restarts, or the broker kicks the
        // older session: prefix, a random instance id, and the connection index.
        let instance = instance_id();
        let tls = endpoints
            .iter()
            .any(|e| e.tls)
            .then(|| crate::tls::upstream_client_config(&settings.ca_certs.0))
            .and_then(|r| {
                r.map_err(|e| tracing::error!(error = %e, "no TLS configuration for the upstream brokers"))
                    .ok()
            });
        let endpoints: Arc<[Endpoint]> = endpoints.into();
        let namespace_depth = settings.layout.namespace_depth();
        let conns = (0..size)
            .map(|i| {
                connection::Connection::start(connection::Options {
                    client_id: format!("{}-{instance}-{i}", settings.client_id_prefix),
                    endpoints: endpoints.clone(),
                    first: i,
                    protocol: settings.protocol,
                    tls: tls.clone(),
                    namespace_depth,
                    username: settings.username.clone(),
                    password: settings.password.clone(),
                    keep_alive: settings.keep_alive,
                    connect_timeout: settings.connect_timeout,
                    max_packet,
                    max_queued_bytes: QUEUED_BYTES_MIN.max(4 * max_packet),
                    connected: connected.clone(),
                    dispatch: dispatch.clone(),
                    metrics: metrics.clone(),
                    will: will.clone().filter(|_| will_on == Some(i)),
                })
            })
            .collect();
        Arc::new(Self {
            conns,
            connected,
            hasher,
        })
    }

    /// Disconnects every connection cleanly (MQTT DISCONNECT once what was already handed
    /// over is acknowledged), at most `timeout` in all: the end of a drain.
    pub async fn disconnect(&self, timeout: std::time::Duration) {
        futures_util::future::join_all(self.conns.iter().map(|c| c.disconnect(timeout))).await;
    }

    /// Connections currently connected to the broker.
    pub fn connected(&self) -> usize {
        self.connected.load(Ordering::Relaxed)
    }

    pub fn size(&self) -> usize {
        self.conns.len()
    }

    /// What each connection negotiated (`None`: not connected), in pool order.
    pub fn links(&self) -> Vec<Option<LinkStatus>> {
        self.conns.iter().map(|c| c.status()).collect()
    }

    /// Whether every connection is up.
    pub fn is_ready(&self) -> bool {
        self.connected() == self.conns.len()
    }

    fn pick(&self, key: &str) -> &connection::Connection {
        let h = self.hasher.hash_one(key);
        // `conns` is never empty (pool >= 1 by validation); modulo keeps the index in range.
        &self.conns[(h % self.conns.len() as u64) as usize]
    }

    /// Subscribes `filter` with subscription identifier `id` (1..=[`MAX_SUBSCRIPTION_ID`];
    /// called by the router when its first local subscriber arrives). A filter subscribed
    /// again with another id is re-subscribed upstream with the new id.
    pub fn subscribe(&self, filter: &Arc<str>, id: usize) {
        self.pick(filter).subscribe(filter, id);
    }

    /// Unsubscribes `filter` if it is still subscribed with `id` (called when the router
    /// drops the entry).
    pub fn unsubscribe(&self, filter: &Arc<str>, id: usize) {
        self.pick(filter).unsubscribe(filter, id);
    }

    /// The largest payload a publish to `topic` may carry (the broker's Maximum Packet Size
    /// less the packet's own bytes; unlimited until a broker said otherwise).
    pub fn max_payload(&self, topic: &str) -> usize {
        self.pick(topic).max_payload(topic.len())
    }

    /// Number of distinct upstream filters wanted.
    pub fn filter_count(&self) -> usize {
        self.conns.iter().map(|c| c.filter_count()).sum()
    }

    /// Publishes without waiting (see [`PublishError`] for refusals). With `ack`, the sender
    /// completes once the broker acknowledged, or with the reason it never will.
    pub fn publish(
        &self,
        topic: String,
        qos: QoS,
        retain: bool,
        payload: Bytes,
        ack: Option<oneshot::Sender<Result<(), PublishError>>>,
    ) -> Result<(), PublishError> {
        self.pick(&topic).publish(topic, qos, retain, payload, ack)
    }
}

fn instance_id() -> String {
    let mut b = [0u8; 4];
    if getrandom::fill(&mut b).is_err() {
        // No entropy source: fall back to the pid, which is unique per host at least.
        return format!("p{}", std::process::id());
    }
    hex::encode(b)
}
