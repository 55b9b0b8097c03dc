//! One upstream MQTT 5 connection: its event loop, its subscription reconciler, and the
//! bookkeeping that matches every request to what the broker answers.
//!
//! MQTT 5 because of *subscription identifiers*: every upstream filter is subscribed with its
//! router id, and the broker tags each message with the ids of the subscriptions it matched.
//! With MQTT 3.1.1 a proxy cannot tell which of several overlapping subscriptions a message
//! came through, and brokers differ on whether overlapping subscriptions yield one copy or
//! several — either duplicate or lost deliveries. With ids, routing is exact on every broker.
//!
//! Two tasks per connection:
//! - the **event loop** polls rumqttc (which reconnects when polled after an error), hands
//!   incoming messages and SUBACK results to the dispatcher, matches acknowledgements to
//!   waiting publishes, and backs off between failed connects;
//! - the **reconciler** makes the broker's subscriptions equal the desired set, exactly on
//!   (filter, subscription id): a filter re-added with a new id is subscribed again (MQTT 5
//!   replaces the subscription, id included), not skipped because the filter looks live. The
//!   router marks filters dirty; the reconciler touches only dirty filters (all of them after
//!   a reconnect), so its cost follows the churn, not the table size.
//!
//! ## Request bookkeeping
//!
//! rumqttc assigns packet ids inside its event loop and reports each request it takes from
//! its channel as an `Outgoing` event, in channel order. Every request is therefore pushed
//! onto [`Requests::queued`] *in the same critical section* as the non-blocking `try_*` send
//! that puts it in the channel: no `.await` between them, so no cancelled caller can leave a
//! waiter behind, and the queue order is the channel order. Each `Outgoing` event pops the
//! front and binds it to its packet id.
//!
//! Reconnects: on a connection error rumqttc moves unacknowledged publishes and everything
//! still in its channel to `EventLoop::pending`, and drops that list when the broker starts a
//! clean session — requests (and their acknowledgements) would vanish without an event and
//! shift every later match. The event loop takes that list when the error surfaces and hands
//! it back after the next CONNACK, so every request queued here is sent exactly once more and
//! reported in order; a publish re-sent with its old packet id is recognised as such.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::Mutex;
use rumqttc::Outgoing;
use rumqttc::Transport;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{Packet, SubscribeProperties, SubscribeReasonCode};
use rumqttc::v5::{AsyncClient, Event, EventLoop, MqttOptions, Request};
use tokio::sync::{Notify, oneshot};

use super::{Dispatch, Endpoint};
use crate::secret::Secret;

/// Why a publish did not reach the broker.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PublishError {
    #[error("the upstream connection is shutting down")]
    Closed,
    #[error("the upstream connection's queue is full")]
    Saturated,
    #[error("invalid upstream topic")]
    InvalidTopic,
    #[error("the publish ({size} bytes) exceeds the broker's maximum packet size ({max} bytes)")]
    TooLarge { size: usize, max: usize },
    #[error("the upstream connection was lost before the broker acknowledged the publish")]
    Lost,
}

type AckSender = oneshot::Sender<Result<(), PublishError>>;

pub(super) struct Options {
    pub client_id: String,
    pub endpoint: Endpoint,
    pub username: Option<String>,
    pub password: Option<Secret<String>>,
    pub keep_alive: Duration,
    pub connect_timeout: Duration,
    pub max_packet: usize,
    pub max_queued_bytes: usize,
    pub connected: Arc<AtomicUsize>,
    pub dispatch: Arc<dyn Dispatch>,
    pub metrics: crate::metrics::UpstreamMetrics,
    /// (topic, payload) the broker publishes (QoS 1) if this connection dies uncleanly.
    pub will: Option<(String, Bytes)>,
}

/// A request in rumqttc's channel, not yet reported by its event loop.
enum Queued {
    Publish {
        ack: Option<AckSender>,
        bytes: usize,
        /// When the publish was handed over (for the acknowledgement latency).
        since: Instant,
    },
    Subscribe {
        filter: Arc<str>,
        id: usize,
    },
    Unsubscribe,
}

/// Requests in flight, in the order rumqttc reports them (module docs).
#[derive(Default)]
struct Requests {
    queued: VecDeque<Queued>,
    /// QoS ≥ 1 publishes written, waiting for PUBACK/PUBCOMP, by packet id.
    inflight: HashMap<u16, (Option<AckSender>, Instant)>,
    /// SUBSCRIBEs written, waiting for SUBACK, by packet id, oldest first. rumqttc takes
    /// SUBSCRIBE ids from the same 1..=Receive-Maximum cycle as publishes and never checks
    /// them for collisions (Mosquitto's Receive Maximum is 20): one 100-filter subscribe, or
    /// a subscribe outliving 20 QoS 1 publishes, reuses an id still waiting for its SUBACK.
    /// The broker answers SUBSCRIBEs in order, so a queue per id keeps every match exact.
    subacks: HashMap<u16, VecDeque<(Arc<str>, usize)>>,
}

/// The filters this connection should hold, and which of them changed.
#[derive(Default)]
struct Subscriptions {
    /// Filter → (QoS, subscription id).
    desired: HashMap<Arc<str>, (QoS, usize)>,
    dirty: HashSet<Arc<str>>,
}

struct Shared {
    client_id: String,
    client: AsyncClient,
    requests: Mutex<Requests>,
    subs: Mutex<Subscriptions>,
    /// Set on every (re)connect: the broker has forgotten our subscriptions (clean start).
    resync: AtomicBool,
    poke: Notify,
    /// The broker's Maximum Packet Size (CONNACK); `u32::MAX` when it set none.
    broker_max_packet: AtomicU32,
    /// Payload bytes of publishes in rumqttc's channel: bounded, so a burst of large
    /// publishes costs a known amount of memory and then fails fast.
    queued_bytes: AtomicUsize,
    max_queued_bytes: usize,
    /// The event loop has ended (the pool was dropped, or it disconnected).
    closed: AtomicBool,
    /// A clean DISCONNECT was asked for ([`Connection::disconnect`]): the event loop ends once
    /// it is written instead of reconnecting.
    closing: AtomicBool,
    /// Notified when the event loop has ended.
    ended: Notify,
    metrics: crate::metrics::UpstreamMetrics,
}

pub(super) struct Connection {
    shared: Arc<Shared>,
}

/// Requests buffered between callers and the event loop.
const REQUEST_CAPACITY: usize = 1024;
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// How long the reconciler waits when rumqttc's channel is full before trying again.
const RECONCILE_RETRY: Duration = Duration::from_millis(10);

/// Upper bound of a PUBLISH packet's size beyond topic and payload: fixed header (1 + up to 4
/// length bytes), topic length (2), packet id (2), properties length (1).
const PUBLISH_OVERHEAD: usize = 10;

impl Connection {
    pub fn start(o: Options) -> Self {
        let mut mqtt = MqttOptions::new(&o.client_id, &o.endpoint.host, o.endpoint.port);
        mqtt.set_keep_alive(o.keep_alive)
            .set_clean_start(true)
            .set_max_packet_size(Some(u32::try_from(o.max_packet).unwrap_or(u32::MAX)))
            .set_request_channel_capacity(REQUEST_CAPACITY)
            .set_connection_timeout(o.connect_timeout.as_secs().max(1));
        // rumqttc leaves Nagle on. With a broker that sends nothing back for QoS 0, the next
        // small publish then waits for the peer's delayed ACK (40 ms): a p99 of ~35 ms instead
        // of ~3 ms at 100 publishes/s in the benchmarks.
        let mut network = mqtt.network_options();
        network.set_tcp_nodelay(true);
        mqtt.set_network_options(network);
        if let Some(user) = &o.username {
            // From here the password is in rumqttc's `MqttOptions`, whose `Debug` prints it:
            // never format `mqtt` or the event loop's `options`.
            let password = o.password.as_ref().map(Secret::expose);
            mqtt.set_credentials(user, password.cloned().unwrap_or_default());
        }
        if let Some((topic, payload)) = &o.will {
            mqtt.set_last_will(rumqttc::v5::mqttbytes::v5::LastWill::new(
                topic.as_str(),
                payload.to_vec(),
                QoS::AtLeastOnce,
                false,
                None,
            ));
        }
        if o.endpoint.tls {
            mqtt.set_transport(Transport::tls_with_default_config());
        }
        let (client, eventloop) = AsyncClient::new(mqtt, REQUEST_CAPACITY);
        let shared = Arc::new(Shared {
            client_id: o.client_id.clone(),
            client,
            requests: Mutex::new(Requests::default()),
            subs: Mutex::new(Subscriptions::default()),
            resync: AtomicBool::new(false),
            poke: Notify::new(),
            broker_max_packet: AtomicU32::new(u32::MAX),
            queued_bytes: AtomicUsize::new(0),
            max_queued_bytes: o.max_queued_bytes,
            closed: AtomicBool::new(false),
            closing: AtomicBool::new(false),
            ended: Notify::new(),
            metrics: o.metrics,
        });
        tokio::spawn(run_event_loop(
            eventloop,
            shared.clone(),
            o.connected,
            o.dispatch,
        ));
        tokio::spawn(reconcile(shared.clone()));
        Self { shared }
    }

    /// Waits until everything already handed over is written and acknowledged (some brokers,
    /// rumqttd among them, drop publishes still unrouted when a DISCONNECT arrives), then
    /// sends DISCONNECT and ends the event loop once it is written: the broker discards the
    /// will (presence has said goodbye) and logs no reset. Completes when the loop has ended,
    /// or after `timeout` in all.
    pub async fn disconnect(&self, timeout: Duration) {
        let shared = &self.shared;
        let deadline = tokio::time::Instant::now() + timeout;
        let settled = async {
            loop {
                {
                    let r = shared.requests.lock();
                    if r.queued.is_empty() && r.inflight.is_empty() {
                        return;
                    }
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        };
        let _ = tokio::time::timeout_at(deadline, settled).await;
        let ended = shared.ended.notified();
        tokio::pin!(ended);
        ended.as_mut().enable();
        if shared.closed.load(Ordering::Acquire) {
            return;
        }
        shared.closing.store(true, Ordering::Release);
        if shared.client.try_disconnect().is_err() {
            return; // the loop is gone, or its channel is full: nothing clean to do
        }
        let _ = tokio::time::timeout_at(deadline, ended).await;
    }

    pub fn subscribe(&self, filter: &Arc<str>, qos: QoS, id: usize) {
        let mut s = self.shared.subs.lock();
        s.desired.insert(filter.clone(), (qos, id));
        s.dirty.insert(filter.clone());
        drop(s);
        self.shared.poke.notify_one();
    }

    /// Unsubscribes `filter` if it is still subscribed with `id` (a newer subscription of the
    /// same filter is left alone).
    pub fn unsubscribe(&self, filter: &Arc<str>, id: usize) {
        let mut s = self.shared.subs.lock();
        if s.desired.get(filter).is_some_and(|(_, have)| *have == id) {
            s.desired.remove(filter);
            s.dirty.insert(filter.clone());
        }
        drop(s);
        self.shared.poke.notify_one();
    }

    pub fn filter_count(&self) -> usize {
        self.shared.subs.lock().desired.len()
    }

    /// The largest payload a publish to a topic of `topic_len` bytes may carry on this
    /// connection (the broker's Maximum Packet Size, once known).
    pub fn max_payload(&self, topic_len: usize) -> usize {
        let max = self.shared.broker_max_packet.load(Ordering::Relaxed) as usize;
        max.saturating_sub(topic_len + PUBLISH_OVERHEAD)
    }

    /// Hands a publish to the event loop without waiting. With `ack`, the sender completes
    /// once the broker acknowledged (PUBACK for QoS 1, PUBCOMP for QoS 2, written to the
    /// socket for QoS 0) or the publish was lost.
    pub fn publish(
        &self,
        topic: String,
        qos: QoS,
        retain: bool,
        payload: Bytes,
        ack: Option<AckSender>,
    ) -> Result<(), PublishError> {
        let shared = &self.shared;
        if shared.closed.load(Ordering::Relaxed) {
            return Err(PublishError::Closed);
        }
        if !rumqttc::v5::mqttbytes::valid_topic(&topic) {
            return Err(PublishError::InvalidTopic);
        }
        // A packet over the broker's maximum would make rumqttc fail the whole connection
        // (and re-send it after every reconnect): refuse it to its sender instead.
        let size = topic.len() + payload.len() + PUBLISH_OVERHEAD;
        let max = shared.broker_max_packet.load(Ordering::Relaxed) as usize;
        if size > max {
            return Err(PublishError::TooLarge { size, max });
        }
        let bytes = payload.len();
        if shared.queued_bytes.load(Ordering::Relaxed) + bytes > shared.max_queued_bytes {
            return Err(PublishError::Saturated);
        }
        let mut requests = shared.requests.lock();
        requests.queued.push_back(Queued::Publish {
            ack,
            bytes,
            since: Instant::now(),
        });
        match shared.client.try_publish(topic, qos, retain, payload) {
            Ok(()) => {
                shared.queued_bytes.fetch_add(bytes, Ordering::Relaxed);
                Ok(())
            }
            Err(_) => {
                // Still under the lock: the entry just pushed is the newest.
                requests.queued.pop_back();
                Err(if shared.closed.load(Ordering::Relaxed) {
                    PublishError::Closed
                } else {
                    PublishError::Saturated
                })
            }
        }
    }
}

impl Shared {
    /// Sends a SUBSCRIBE for one filter with its id. `false`: the channel is full.
    fn try_subscribe(&self, filter: &Arc<str>, qos: QoS, id: usize) -> bool {
        let props = SubscribeProperties {
            id: Some(id),
            user_properties: Vec::new(),
        };
        let mut requests = self.requests.lock();
        requests.queued.push_back(Queued::Subscribe {
            filter: filter.clone(),
            id,
        });
        let sent = self
            .client
            .try_subscribe_with_properties(filter.to_string(), qos, props)
            .is_ok();
        if !sent {
            requests.queued.pop_back();
        }
        sent
    }

    fn try_unsubscribe(&self, filter: &str) -> bool {
        let mut requests = self.requests.lock();
        requests.queued.push_back(Queued::Unsubscribe);
        let sent = self.client.try_unsubscribe(filter.to_string()).is_ok();
        if !sent {
            requests.queued.pop_back();
        }
        sent
    }

    /// rumqttc reported a request it took from its channel: bind it.
    fn on_outgoing(&self, out: &Outgoing) {
        let mut r = self.requests.lock();
        match *out {
            Outgoing::Publish(pkid) => {
                if pkid != 0 && r.inflight.contains_key(&pkid) {
                    return; // re-sent after a reconnect with its old packet id
                }
                match r.queued.pop_front() {
                    Some(Queued::Publish { ack, bytes, since }) => {
                        self.queued_bytes.fetch_sub(bytes, Ordering::Relaxed);
                        if pkid == 0 {
                            // QoS 0: written to the socket is all the acknowledgement there is.
                            if let Some(tx) = ack {
                                let _ = tx.send(Ok(()));
                            }
                        } else {
                            r.inflight.insert(pkid, (ack, since));
                        }
                    }
                    other => self.out_of_step("publish", other),
                }
            }
            Outgoing::Subscribe(pkid) => match r.queued.pop_front() {
                Some(Queued::Subscribe { filter, id }) => {
                    r.subacks.entry(pkid).or_default().push_back((filter, id));
                }
                other => self.out_of_step("subscribe", other),
            },
            Outgoing::Unsubscribe(_) => match r.queued.pop_front() {
                Some(Queued::Unsubscribe) => {}
                other => self.out_of_step("unsubscribe", other),
            },
            _ => {}
        }
    }

    /// A report that does not match the oldest request: a bug here or a rumqttc change. Logged
    /// loudly; the match resumes with the next request.
    fn out_of_step(&self, reported: &str, queued: Option<Queued>) {
        let queued = match queued {
            Some(Queued::Publish { .. }) => "publish",
            Some(Queued::Subscribe { .. }) => "subscribe",
            Some(Queued::Unsubscribe) => "unsubscribe",
            None => "nothing",
        };
        tracing::error!(client_id = %self.client_id, reported, queued, "upstream request bookkeeping out of step");
    }

    fn resolve(&self, pkid: u16) {
        let Some((ack, since)) = self.requests.lock().inflight.remove(&pkid) else {
            return;
        };
        self.metrics.acknowledged(since.elapsed());
        if let Some(tx) = ack {
            let _ = tx.send(Ok(()));
        }
    }
}

/// Whether a SUBACK reason code grants the subscription.
fn granted(code: &SubscribeReasonCode) -> bool {
    matches!(code, SubscribeReasonCode::Success(_))
}

async fn run_event_loop(
    mut eventloop: EventLoop,
    shared: Arc<Shared>,
    connected: Arc<AtomicUsize>,
    dispatch: Arc<dyn Dispatch>,
) {
    let mut is_connected = false;
    let mut backoff = BACKOFF_MIN;
    // Requests rumqttc would drop at the next clean session (module docs).
    let mut carried: Vec<Request> = Vec::new();
    let endpoint = format!(
        "{}:{}",
        eventloop.options.broker_address().0,
        eventloop.options.broker_address().1
    );
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::Publish(p))) => {
                let ids = p
                    .properties
                    .as_ref()
                    .map(|props| props.subscription_identifiers.as_slice())
                    .unwrap_or_default();
                match std::str::from_utf8(&p.topic) {
                    Ok(topic) => {
                        tracing::trace!(client_id = %shared.client_id, topic, ?ids, "upstream publish");
                        dispatch.dispatch(topic, ids, p.payload)
                    }
                    Err(_) => tracing::debug!("upstream message with a non-UTF-8 topic dropped"),
                }
            }
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                let props = ack.properties.as_ref();
                let ids = props.and_then(|p| p.subscription_identifiers_available);
                if ids == Some(0) {
                    // Without ids every message would reach the router unroutable: refuse to
                    // count this connection as up, so /readyz says why nothing works.
                    tracing::error!(
                        client_id = %shared.client_id,
                        %endpoint,
                        "the broker does not support MQTT 5 subscription identifiers, which cuttle requires"
                    );
                    tokio::time::sleep(BACKOFF_MAX).await;
                    continue;
                }
                let max_packet = props.and_then(|p| p.max_packet_size).unwrap_or(u32::MAX);
                shared
                    .broker_max_packet
                    .store(max_packet, Ordering::Relaxed);
                if !is_connected {
                    is_connected = true;
                    connected.fetch_add(1, Ordering::Relaxed);
                }
                shared.metrics.connected();
                backoff = BACKOFF_MIN;
                tracing::info!(client_id = %shared.client_id, %endpoint, max_packet, "upstream connected");
                // SUBSCRIBEs of the old session will never be acknowledged; the resync
                // subscribes everything again.
                shared.requests.lock().subacks.clear();
                // Requests carried over go out first, in their order, before anything new.
                eventloop.pending.extend(carried.drain(..));
                shared.resync.store(true, Ordering::Release);
                shared.poke.notify_one();
            }
            Ok(Event::Outgoing(Outgoing::Disconnect)) if shared.closing.load(Ordering::Acquire) => {
                tracing::debug!(client_id = %shared.client_id, %endpoint, "upstream disconnected");
                if is_connected {
                    connected.fetch_sub(1, Ordering::Relaxed);
                }
                shut_down(&shared);
                return;
            }
            Ok(Event::Outgoing(out)) => shared.on_outgoing(&out),
            Ok(Event::Incoming(Packet::PubAck(a))) => shared.resolve(a.pkid),
            Ok(Event::Incoming(Packet::PubComp(c))) => shared.resolve(c.pkid),
            Ok(Event::Incoming(Packet::SubAck(ack))) => {
                let sub = {
                    let mut r = shared.requests.lock();
                    match r.subacks.get_mut(&ack.pkid) {
                        Some(waiting) => {
                            let sub = waiting.pop_front();
                            if waiting.is_empty() {
                                r.subacks.remove(&ack.pkid);
                            }
                            sub
                        }
                        None => None,
                    }
                };
                tracing::trace!(client_id = %shared.client_id, pkid = ack.pkid, ?sub, "SUBACK");
                if let Some((filter, id)) = sub {
                    let ok = ack.return_codes.first().is_some_and(granted);
                    if !ok {
                        tracing::warn!(client_id = %shared.client_id, %filter, code = ?ack.return_codes.first(), "the broker refused a subscription");
                    }
                    dispatch.subscription_result(&filter, id, ok);
                }
            }
            Ok(_) => {}
            Err(e) => {
                // rumqttc has just moved what it will drop into `pending`: keep it.
                carried.extend(eventloop.pending.drain(..).filter(|r| {
                    matches!(
                        r,
                        Request::Publish(_)
                            | Request::PubRel(_)
                            | Request::Subscribe(_)
                            | Request::Unsubscribe(_)
                    )
                }));
                if is_connected {
                    is_connected = false;
                    connected.fetch_sub(1, Ordering::Relaxed);
                    shared.metrics.disconnected();
                    tracing::warn!(client_id = %shared.client_id, %endpoint, error = %e, "upstream connection lost");
                } else {
                    shared.metrics.connect_failed();
                    tracing::debug!(client_id = %shared.client_id, %endpoint, error = %e, "upstream connect failed");
                }
                if matches!(e, rumqttc::v5::ConnectionError::RequestsDone)
                    || shared.closing.load(Ordering::Acquire)
                {
                    shut_down(&shared);
                    return; // the pool was dropped, or disconnected
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
}

/// Fails every waiting publish: the event loop is gone.
fn shut_down(shared: &Shared) {
    shared.closed.store(true, Ordering::Release);
    shared.ended.notify_waiters();
    let mut r = shared.requests.lock();
    for q in r.queued.drain(..) {
        if let Queued::Publish { ack: Some(tx), .. } = q {
            let _ = tx.send(Err(PublishError::Closed));
        }
    }
    for (_, (tx, _)) in r.inflight.drain() {
        if let Some(tx) = tx {
            let _ = tx.send(Err(PublishError::Lost));
        }
    }
}

/// Keeps the broker's subscriptions equal to the desired set, on (filter, id).
async fn reconcile(shared: Arc<Shared>) {
    // What this connection has asked the broker for: filter → subscription id.
    let mut actual: HashMap<Arc<str>, usize> = HashMap::new();
    // Dirty filters not yet handled (rumqttc's channel was full).
    let mut backlog: VecDeque<Arc<str>> = VecDeque::new();
    loop {
        if backlog.is_empty() {
            shared.poke.notified().await;
        }
        if shared.closed.load(Ordering::Relaxed) {
            return;
        }
        {
            let mut subs = shared.subs.lock();
            if shared.resync.swap(false, Ordering::AcqRel) {
                actual.clear();
                backlog.clear();
                subs.dirty.clear();
                backlog.extend(subs.desired.keys().cloned());
            } else {
                backlog.extend(subs.dirty.drain());
            }
        }
        while let Some(filter) = backlog.pop_front() {
            let want = shared.subs.lock().desired.get(&filter).copied();
            let have = actual.get(&filter).copied();
            let sent = match (want, have) {
                (Some((qos, id)), have) if have != Some(id) => {
                    let sent = shared.try_subscribe(&filter, qos, id);
                    tracing::trace!(client_id = %shared.client_id, %filter, id, sent, "SUBSCRIBE");
                    if sent {
                        actual.insert(filter.clone(), id);
                    }
                    sent
                }
                (None, Some(_)) => {
                    let sent = shared.try_unsubscribe(&filter);
                    tracing::trace!(client_id = %shared.client_id, %filter, sent, "UNSUBSCRIBE");
                    if sent {
                        actual.remove(&filter);
                    }
                    sent
                }
                _ => true,
            };
            if !sent {
                backlog.push_front(filter);
                tokio::time::sleep(RECONCILE_RETRY).await;
                break;
            }
        }
    }
}
