//! One upstream MQTT connection: a single task that owns the socket, speaks MQTT 5 or 3.1.1
//! over rumqttc's codecs, keeps the broker's subscriptions equal to the desired set, and
//! matches every acknowledgement to what it acknowledges.
//!
//! ## Why a client of our own
//!
//! The pool used rumqttc's event loop until issue 12. Every publish then crossed a channel and
//! an `Outgoing` event, acknowledgements had to be matched back to requests by replaying the
//! event order (packet ids were rumqttc's), requests vanished at a clean-session reconnect
//! unless fished out of `EventLoop::pending`, and one channel slot per publish bounded the
//! queue in items rather than bytes. Here the task owns packet ids, so every PUBACK and SUBACK
//! maps to its request by id alone; callers append to a byte-bounded queue under a short lock
//! (no channel, no await); and the task encodes everything queued into one buffer and writes
//! it with one syscall — the batching the fan-in path needed.
//!
//! ## Routing: subscription identifiers, or topic matching
//!
//! With MQTT 5 and subscription identifiers every filter is subscribed with its router id and
//! the broker tags each message with the ids it matched: exact on every broker.
//!
//! A broker without them (MQTT 3.1.1: RabbitMQ before 3.13, NATS; an MQTT 5 broker whose
//! CONNACK says `subscription_identifiers_available: 0`) gets **covers** instead: one
//! subscription per namespace (`[prefix/]app/scope/#`) for all the namespace's filters this
//! connection holds, and the connection matches each message's topic against those filters
//! ([`super::matcher`]). Covers of different namespaces never overlap (their first levels are
//! literals), so each message arrives on a connection at most once whatever the broker's rule
//! for overlapping subscriptions (3.1.1 lets a broker send one copy per matching subscription,
//! and Mosquitto and NATS do; RabbitMQ sends one): routing stays exact. Reserved filters (the
//! `_` app: presence, control, restore) are subscribed as they are; they never overlap each
//! other or a namespace. Load-balanced (`$share`) subscriptions cannot be told apart from a
//! cover's copy without identifiers and are refused on such a connection.
//!
//! ## Lifecycle
//!
//! Connect (TCP with `TCP_NODELAY`, optional TLS, CONNECT with a clean start, CONNACK), then
//! drive the session until it fails; back off (100 ms → 5 s) and go to the next broker of the
//! list after a failed connect. `upstream.protocol: auto` starts with MQTT 5 and falls back to
//! 3.1.1 for a broker that refuses it (a 3.1.1 CONNACK, an MQTT 5 CONNACK saying
//! "unsupported protocol version", an answer that does not decode as MQTT 5, or a close
//! without a word — RabbitMQ's answer); the fallback sticks once 3.1.1 is accepted. After a reconnect every desired filter is subscribed
//! again and unacknowledged QoS 1 publishes are sent again first, in their order.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use parking_lot::Mutex;
use rumqttc::v5::mqttbytes::QoS;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::Notify;

use super::codec::{self, Incoming, Version};
use super::matcher::Matcher;
use super::outbox::{AckSender, Outbox, Pending};
use super::{Dispatch, Endpoint, Protocol};
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

pub(super) struct Options {
    pub client_id: String,
    /// The brokers to connect to, tried in turn from `first`.
    pub endpoints: Arc<[Endpoint]>,
    pub first: usize,
    pub protocol: Protocol,
    pub tls: Option<Arc<rustls::ClientConfig>>,
    pub username: Option<String>,
    pub password: Option<Secret<String>>,
    pub keep_alive: Duration,
    pub connect_timeout: Duration,
    pub max_packet: usize,
    pub max_queued_bytes: usize,
    /// Levels before a filter's namespace ends (`topic_prefix` levels + app + scope).
    pub namespace_depth: usize,
    pub connected: Arc<AtomicUsize>,
    pub dispatch: Arc<dyn Dispatch>,
    pub metrics: crate::metrics::UpstreamMetrics,
    /// (topic, payload) the broker publishes (QoS 1) if this connection dies uncleanly.
    pub will: Option<(String, Bytes)>,
}

/// What a connected connection negotiated (logs, `/readyz`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkStatus {
    pub endpoint: String,
    pub version: Version,
    /// Messages are routed by the broker's subscription identifiers (else by topic matching).
    pub subscription_ids: bool,
}

/// The filters this connection should hold, and which of them changed.
#[derive(Default)]
struct Subscriptions {
    /// Filter → subscription id.
    desired: HashMap<Arc<str>, usize>,
    dirty: HashSet<Arc<str>>,
    /// Set on every (re)connect: the broker has forgotten our subscriptions (clean start).
    resync: bool,
}

struct Shared {
    client_id: String,
    outbox: Mutex<Outbox>,
    subs: Mutex<Subscriptions>,
    /// Wakes the task: something was queued, a filter changed, or a disconnect was asked for.
    wake: Notify,
    /// The broker's Maximum Packet Size (CONNACK); `u32::MAX` when it set none.
    broker_max_packet: AtomicU32,
    /// The task has ended (the pool was dropped, or it disconnected).
    closed: AtomicBool,
    /// A clean DISCONNECT was asked for ([`Connection::disconnect`]), due at this deadline at
    /// the latest.
    closing: Mutex<Option<tokio::time::Instant>>,
    /// Notified (a stored permit) when `closing` is set.
    closing_notify: Notify,
    /// Notified when the task has ended.
    ended: Notify,
    status: Mutex<Option<LinkStatus>>,
    metrics: crate::metrics::UpstreamMetrics,
}

pub(super) struct Connection {
    shared: Arc<Shared>,
}

impl Drop for Connection {
    fn drop(&mut self) {
        // The pool is gone: the task sends DISCONNECT and ends.
        let mut closing = self.shared.closing.lock();
        if closing.is_none() {
            *closing = Some(tokio::time::Instant::now());
        }
        drop(closing);
        self.shared.closing_notify.notify_one();
        self.shared.wake.notify_one();
    }
}

const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Connect timeout of a 3.1.1 attempt after an MQTT 5 CONNECT met a silent close.
const FALLBACK_TIMEOUT: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Bytes encoded into the write buffer per round at most: big enough that one write carries
/// hundreds of small publishes, small enough that reading is not starved meanwhile.
const WRITE_BATCH: usize = 256 << 10;
/// Read buffer growth step.
const READ_CHUNK: usize = 64 << 10;
/// QoS 1 publishes in flight at most (also bounded by the broker's Receive Maximum).
const MAX_INFLIGHT: usize = 1024;
/// SUBSCRIBEs and UNSUBSCRIBEs awaiting their acknowledgement at most: a restore of thousands
/// of filters reaches the broker as fast as it answers, not all at once.
const MAX_PENDING_SUBSCRIPTIONS: usize = 512;
/// Namespaces it takes at their byte bound to fill a connection's queue: one namespace may
/// hold this share of it at most (see [`super::outbox`]).
const LANES_TO_FILL: usize = 4;

impl Connection {
    pub fn start(o: Options) -> Self {
        let shared = Arc::new(Shared {
            client_id: o.client_id.clone(),
            outbox: Mutex::new(Outbox::new(
                o.max_queued_bytes,
                o.max_queued_bytes / LANES_TO_FILL,
                o.namespace_depth,
            )),
            subs: Mutex::new(Subscriptions::default()),
            wake: Notify::new(),
            broker_max_packet: AtomicU32::new(u32::MAX),
            closed: AtomicBool::new(false),
            closing: Mutex::new(None),
            closing_notify: Notify::new(),
            ended: Notify::new(),
            status: Mutex::new(None),
            metrics: o.metrics.clone(),
        });
        tokio::spawn(run(shared.clone(), o));
        Self { shared }
    }

    /// Waits until everything already handed over is written and acknowledged (some brokers,
    /// rumqttd among them, drop publishes still unrouted when a DISCONNECT arrives), then
    /// sends DISCONNECT and ends: the broker discards the will (presence has said goodbye) and
    /// logs no reset. Completes when the task has ended, or after `timeout` in all.
    pub async fn disconnect(&self, timeout: Duration) {
        let shared = &self.shared;
        let ended = shared.ended.notified();
        tokio::pin!(ended);
        ended.as_mut().enable();
        if shared.closed.load(Ordering::Acquire) {
            return;
        }
        let deadline = tokio::time::Instant::now() + timeout;
        // The DISCONNECT itself needs a moment: ask for it a little before the deadline.
        let due = deadline - (timeout / 10).min(Duration::from_millis(200));
        shared.closing.lock().get_or_insert(due);
        shared.closing_notify.notify_one();
        shared.wake.notify_one();
        let _ = tokio::time::timeout_at(deadline, ended).await;
    }

    /// Subscribes `filter` (at [`SUBSCRIPTION_QOS`]) with routing id `id`.
    pub fn subscribe(&self, filter: &Arc<str>, id: usize) {
        let mut s = self.shared.subs.lock();
        s.desired.insert(filter.clone(), id);
        s.dirty.insert(filter.clone());
        drop(s);
        self.shared.wake.notify_one();
    }

    /// Unsubscribes `filter` if it is still subscribed with `id` (a newer subscription of the
    /// same filter is left alone).
    pub fn unsubscribe(&self, filter: &Arc<str>, id: usize) {
        let mut s = self.shared.subs.lock();
        if s.desired.get(filter).is_some_and(|have| *have == id) {
            s.desired.remove(filter);
            s.dirty.insert(filter.clone());
        }
        drop(s);
        self.shared.wake.notify_one();
    }

    pub fn filter_count(&self) -> usize {
        self.shared.subs.lock().desired.len()
    }

    pub fn status(&self) -> Option<LinkStatus> {
        self.shared.status.lock().clone()
    }

    /// The largest payload a publish to a topic of `topic_len` bytes may carry on this
    /// connection (the broker's Maximum Packet Size, once known).
    pub fn max_payload(&self, topic_len: usize) -> usize {
        let max = self.shared.broker_max_packet.load(Ordering::Relaxed) as usize;
        max.saturating_sub(topic_len + codec::PUBLISH_OVERHEAD)
    }

    /// Queues a publish without waiting. With `ack`, the sender completes once the broker
    /// acknowledged (PUBACK for QoS 1, written to the socket for QoS 0) or the publish was
    /// lost.
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
        // QoS 2 would need PUBREC/PUBREL/PUBCOMP for nothing: the proxy's own acknowledgement
        // to its client is at-least-once.
        let p = Pending::new(Bytes::from(topic), cap_qos(qos), retain, payload, ack);
        // A packet over the broker's maximum would make it drop the whole connection (and we
        // would send it again after every reconnect): refuse it to its sender instead.
        let size = p.packet_size();
        let max = shared.broker_max_packet.load(Ordering::Relaxed) as usize;
        if size > max {
            return Err(PublishError::TooLarge { size, max });
        }
        let wake = shared.outbox.lock().push(p)?;
        if wake {
            shared.wake.notify_one();
        }
        Ok(())
    }
}

/// A SUBSCRIBE waiting for its SUBACK.
enum SubRequest {
    /// A filter subscribed as it is, with its id.
    Filter { filter: Arc<str>, id: usize },
    /// A namespace cover (topic matching).
    Cover(Arc<str>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CoverState {
    Pending(u16),
    Granted,
    Refused,
}

/// One namespace's cover subscription and the filters it carries.
struct Cover {
    filters: HashSet<Arc<str>>,
    state: CoverState,
}

/// How this session maps the desired filters to broker subscriptions.
enum Routes {
    /// Every filter subscribed with its id: filter → id asked for.
    Ids(HashMap<Arc<str>, usize>),
    /// Topic matching (module docs).
    Match {
        matcher: Matcher,
        /// Cover filter → its state and filters.
        covers: HashMap<Arc<str>, Cover>,
        /// Filter → the cover it is under (reserved filters are their own).
        cover_of: HashMap<Arc<str>, Arc<str>>,
    },
}

/// State that outlives one network connection.
struct Session {
    shared: Arc<Shared>,
    dispatch: Arc<dyn Dispatch>,
    namespace_depth: usize,
    /// The largest packet we accept (told the broker in an MQTT 5 CONNECT).
    max_in: usize,
    /// QoS 1 publishes written and not acknowledged, by packet id.
    inflight: HashMap<u16, Pending>,
    subacks: HashMap<u16, SubRequest>,
    unsubacks: HashSet<u16>,
    next_pkid: u16,
    /// Dirty filters not yet handled (the pending-subscription bound was reached).
    backlog: VecDeque<Arc<str>>,
    /// Filters whose outcome is known and not yet reported to the dispatcher.
    results: Vec<(Arc<str>, usize, bool)>,
    scratch_ids: Vec<usize>,
}

/// One network connection's negotiated parameters.
struct Link {
    version: Version,
    routes: Routes,
    window: usize,
    /// The broker's Maximum Packet Size.
    max_packet: usize,
    keep_alive: Duration,
}

type Stream = Box<dyn AsyncStream>;
trait AsyncStream: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> AsyncStream for T {}

/// Why a connection attempt failed.
#[derive(Debug, thiserror::Error)]
enum ConnectError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error("the broker refused the connection: {0}")]
    Refused(String),
    /// The broker does not speak the version we tried (`auto` then tries 3.1.1).
    #[error("the broker does not speak {0}")]
    Version(&'static str),
    #[error("{0}")]
    Protocol(String),
}

async fn run(shared: Arc<Shared>, o: Options) {
    let mut session = Session {
        shared: shared.clone(),
        dispatch: o.dispatch.clone(),
        namespace_depth: o.namespace_depth,
        max_in: o.max_packet,
        inflight: HashMap::new(),
        subacks: HashMap::new(),
        unsubacks: HashSet::new(),
        next_pkid: 0,
        backlog: VecDeque::new(),
        results: Vec::new(),
        scratch_ids: Vec::new(),
    };
    let n = o.endpoints.len().max(1);
    let mut index = o.first % n;
    // Per broker: it speaks 3.1.1 only (configured, or learnt in auto mode: MQTT 5 was refused
    // and 3.1.1 then accepted), so use 3.1.1 from now on.
    let mut speaks_311 = vec![o.protocol == Protocol::V3; n];
    // Auto mode: the last attempt's answer suggested a 3.1.1 broker, try it next. Not sticky
    // until 3.1.1 is accepted: a broker (or a load balancer) closing before CONNACK for another
    // reason must not cost a broker that does speak MQTT 5 its subscription ids for good.
    let mut try_311 = false;
    let mut backoff = BACKOFF_MIN;
    let mut attempt = 0usize;
    loop {
        if shared.closing.lock().is_some() {
            break;
        }
        let Some(endpoint) = o.endpoints.get(index) else {
            break; // no endpoint at all (validation prevents it)
        };
        let version = if speaks_311[index] || try_311 {
            Version::V311
        } else {
            Version::V5
        };
        let name = format!("{}:{}", endpoint.host, endpoint.port);
        // A 3.1.1 attempt after a silent close is a probe: a broker that does speak MQTT 5
        // may never answer it, so it gets a short timeout.
        let timeout = if try_311 {
            o.connect_timeout.min(FALLBACK_TIMEOUT)
        } else {
            o.connect_timeout
        };
        let connecting = tokio::time::timeout(timeout, connect(&o, endpoint, version, attempt));
        attempt = attempt.wrapping_add(1);
        let outcome = tokio::select! {
            r = connecting => r.unwrap_or(Err(ConnectError::Timeout(timeout))),
            () = closing_requested(&shared) => break,
        };
        match outcome {
            Ok((stream, ack, leftover)) => {
                backoff = BACKOFF_MIN;
                if try_311 {
                    tracing::info!(client_id = %shared.client_id, endpoint = %name, "the broker does not speak MQTT 5: using MQTT 3.1.1 (routing by topic matching)");
                    speaks_311[index] = true;
                    try_311 = false;
                }
                let link = session.open(&o, version, &ack);
                *shared.status.lock() = Some(LinkStatus {
                    endpoint: name.clone(),
                    version,
                    subscription_ids: matches!(link.routes, Routes::Ids(_)),
                });
                o.connected.fetch_add(1, Ordering::Relaxed);
                shared.metrics.connected();
                tracing::info!(
                    client_id = %shared.client_id,
                    endpoint = %name,
                    protocol = version.name(),
                    routing = if matches!(link.routes, Routes::Ids(_)) { "subscription ids" } else { "topic matching" },
                    max_packet = link.max_packet,
                    "upstream connected"
                );
                let end = session.drive(stream, leftover, link).await;
                o.connected.fetch_sub(1, Ordering::Relaxed);
                *shared.status.lock() = None;
                session.lost();
                match end {
                    Ok(()) => break, // clean DISCONNECT
                    Err(e) => {
                        shared.metrics.disconnected();
                        tracing::warn!(client_id = %shared.client_id, endpoint = %name, error = %e, "upstream connection lost");
                    }
                }
                // Back to the same broker first (a blip, a restart), after the shortest
                // backoff; after a failed connect, the next one.
            }
            Err(ConnectError::Version(_))
                if o.protocol == Protocol::Auto && version == Version::V5 =>
            {
                tracing::debug!(client_id = %shared.client_id, endpoint = %name, "MQTT 5 refused: trying MQTT 3.1.1");
                try_311 = true;
                continue;
            }
            Err(e) => {
                try_311 = false;
                shared.metrics.connect_failed();
                tracing::debug!(client_id = %shared.client_id, endpoint = %name, error = %e, "upstream connect failed");
                if n > 1 {
                    tracing::warn!(client_id = %shared.client_id, endpoint = %name, error = %e, "upstream broker unreachable: trying the next one");
                }
                index = (index + 1) % n;
            }
        }
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            () = closing_requested(&shared) => break,
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
    shut_down(&shared, &mut session);
}

/// Completes once a disconnect was asked for.
async fn closing_requested(shared: &Shared) {
    loop {
        let notified = shared.closing_notify.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if shared.closing.lock().is_some() {
            return;
        }
        notified.await;
    }
}

/// TCP (Nagle off), TLS, CONNECT, CONNACK. Returns the stream, the CONNACK and any bytes
/// read past it.
async fn connect(
    o: &Options,
    endpoint: &Endpoint,
    version: Version,
    attempt: usize,
) -> Result<(Stream, codec::ConnAck, BytesMut), ConnectError> {
    let addrs: Vec<std::net::SocketAddr> =
        tokio::net::lookup_host((endpoint.host.as_str(), endpoint.port))
            .await?
            .collect();
    if addrs.is_empty() {
        return Err(ConnectError::Protocol(format!(
            "{} resolves to no address",
            endpoint.host
        )));
    }
    // A name with several addresses: spread the pool over them, and move on after a failure.
    let addr = addrs[(o.first + attempt) % addrs.len()];
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    // Nagle would hold a small publish until the broker ACKs the previous one, and brokers
    // delay ACKs for QoS 0 traffic they never answer: 40 ms stalls.
    tcp.set_nodelay(true)?;
    let mut stream: Stream = match (&o.tls, endpoint.tls) {
        (None, true) => return Err(ConnectError::Protocol("no TLS configuration".into())),
        (Some(config), true) => {
            let name = rustls::pki_types::ServerName::try_from(endpoint.host.clone())
                .map_err(|e| ConnectError::Protocol(format!("invalid TLS server name: {e}")))?;
            let tls = tokio_rustls::TlsConnector::from(config.clone())
                .connect(name, tcp)
                .await?;
            Box::new(tls)
        }
        _ => Box::new(tcp),
    };
    let password = o.password.as_ref().map(|p| p.expose().as_str());
    let mut out = BytesMut::new();
    codec::connect(
        version,
        &codec::ConnectOptions {
            client_id: &o.client_id,
            keep_alive_s: u16::try_from(o.keep_alive.as_secs()).unwrap_or(u16::MAX),
            username: o.username.as_deref(),
            password,
            will: o.will.as_ref().map(|(t, p)| (t.as_str(), p)),
            max_packet: u32::try_from(o.max_packet).unwrap_or(u32::MAX),
        },
        &mut out,
    )
    .map_err(ConnectError::Protocol)?;
    stream.write_all(&out).await?;
    let mut buf = BytesMut::with_capacity(1024);
    loop {
        if let Some(len) =
            codec::frame_len(&buf).map_err(|e| ConnectError::Protocol(e.to_string()))?
        {
            if len > 64 << 10 {
                return Err(ConnectError::Protocol("oversized CONNACK".into()));
            }
            if buf.len() >= len {
                let frame = buf.split_to(len);
                return match codec::decode(version, frame) {
                    Ok(Incoming::ConnAck(ack)) if ack.wants_v311 => {
                        Err(ConnectError::Version(version.name()))
                    }
                    Ok(Incoming::ConnAck(ack)) => match &ack.refused {
                        Some(why) => Err(ConnectError::Refused(why.clone())),
                        None => Ok((stream, ack, buf)),
                    },
                    Ok(other) => Err(ConnectError::Protocol(format!(
                        "expected CONNACK, got {other:?}"
                    ))),
                    Err(e) if version == Version::V5 => {
                        tracing::debug!(error = %e, "undecodable answer to an MQTT 5 CONNECT");
                        Err(ConnectError::Version(version.name()))
                    }
                    Err(e) => Err(ConnectError::Protocol(e.to_string())),
                };
            }
        }
        if stream.read_buf(&mut buf).await? == 0 {
            // RabbitMQ closes on an MQTT 5 CONNECT without a word. So may a broker still
            // starting, or a proxy in between: worth one 3.1.1 attempt, not a conclusion.
            return Err(if version == Version::V5 && buf.is_empty() {
                ConnectError::Version(version.name())
            } else {
                ConnectError::Protocol("connection closed before CONNACK".into())
            });
        }
    }
}

/// What woke the connected loop.
enum Wake {
    Read(std::io::Result<usize>),
    Wrote(std::io::Result<usize>),
    Work,
    Timer,
}

/// Why a connected session ended.
#[derive(Debug, thiserror::Error)]
enum DriveError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("the broker closed the connection")]
    Eof,
    #[error("the broker sent DISCONNECT ({0})")]
    Disconnected(String),
    #[error("no PINGRESP within {0:?}")]
    KeepAlive(Duration),
    #[error("{0}")]
    Frame(#[from] codec::FrameError),
}

impl Session {
    /// A CONNACK arrived: start the session's routes over (clean start).
    fn open(&mut self, o: &Options, version: Version, ack: &codec::ConnAck) -> Link {
        let max_packet = ack.max_packet.unwrap_or(u32::MAX);
        self.shared
            .broker_max_packet
            .store(max_packet, Ordering::Relaxed);
        self.subacks.clear();
        self.unsubacks.clear();
        self.backlog.clear();
        self.results.clear();
        self.shared.subs.lock().resync = true;
        let routes = if version == Version::V5 && ack.subscription_ids {
            Routes::Ids(HashMap::new())
        } else {
            Routes::Match {
                matcher: Matcher::default(),
                covers: HashMap::new(),
                cover_of: HashMap::new(),
            }
        };
        let window = usize::from(ack.receive_max.unwrap_or(u16::MAX)).clamp(1, MAX_INFLIGHT);
        let keep_alive = ack
            .server_keep_alive
            .map(|s| Duration::from_secs(u64::from(s)))
            .filter(|d| !d.is_zero())
            .unwrap_or(o.keep_alive);
        Link {
            version,
            routes,
            window,
            max_packet: max_packet as usize,
            keep_alive,
        }
    }

    /// The connection is gone: unacknowledged publishes go back to the front of the queue,
    /// in their order, to be sent again after the next CONNACK.
    fn lost(&mut self) {
        let again: Vec<Pending> = self.inflight.drain().map(|(_, p)| p).collect();
        self.shared.outbox.lock().requeue(again);
    }

    fn next_pkid(&mut self) -> u16 {
        // In use at most MAX_INFLIGHT + MAX_PENDING_SUBSCRIPTIONS of 65,535: a free one is near.
        loop {
            self.next_pkid = self.next_pkid.checked_add(1).unwrap_or(1);
            let id = self.next_pkid;
            if !self.inflight.contains_key(&id)
                && !self.subacks.contains_key(&id)
                && !self.unsubacks.contains(&id)
            {
                return id;
            }
        }
    }

    async fn drive(
        &mut self,
        stream: Stream,
        mut rbuf: BytesMut,
        mut link: Link,
    ) -> Result<(), DriveError> {
        let (mut rd, mut wr) = tokio::io::split(stream);
        let mut wbuf = BytesMut::with_capacity(WRITE_BATCH);
        let ping_every = (link.keep_alive / 2).max(Duration::from_millis(500));
        let mut next_ping = tokio::time::Instant::now() + ping_every;
        let mut ping_sent: Option<tokio::time::Instant> = None;
        let mut disconnecting = false;
        // Bytes of the input skipped because a packet exceeded our maximum.
        let mut discard = 0usize;
        // Anything read together with the CONNACK.
        self.on_input(&mut rbuf, &mut link, &mut wbuf, &mut discard)?;
        loop {
            let now = tokio::time::Instant::now();
            let closing = *self.shared.closing.lock();
            if !disconnecting {
                self.fill(&mut link, &mut wbuf);
                if let Some(due) = closing {
                    let settled = self.inflight.is_empty() && self.shared.outbox.lock().is_empty();
                    if settled || now >= due {
                        codec::disconnect(&mut wbuf);
                        disconnecting = true;
                    }
                }
            }
            if disconnecting && wbuf.is_empty() {
                let _ = wr.shutdown().await;
                return Ok(());
            }
            if let Some(sent) = ping_sent {
                if now >= sent + link.keep_alive {
                    return Err(DriveError::KeepAlive(link.keep_alive));
                }
            } else if now >= next_ping {
                codec::pingreq(&mut wbuf);
                ping_sent = Some(now);
                next_ping = now + ping_every;
            }
            let timer = match ping_sent {
                Some(sent) => sent + link.keep_alive,
                None => next_ping,
            };
            let timer = closing.map_or(timer, |d| d.min(timer));
            if rbuf.capacity() - rbuf.len() < READ_CHUNK / 4 {
                rbuf.reserve(READ_CHUNK);
            }
            let has_out = !wbuf.is_empty();
            let wake = tokio::select! {
                r = rd.read_buf(&mut rbuf) => Wake::Read(r),
                r = wr.write_buf(&mut wbuf), if has_out => Wake::Wrote(r),
                () = self.shared.wake.notified(), if !has_out => Wake::Work,
                () = tokio::time::sleep_until(timer) => Wake::Timer,
            };
            match wake {
                Wake::Read(Ok(0)) => return Err(DriveError::Eof),
                Wake::Read(Ok(_)) => {
                    if self.on_input(&mut rbuf, &mut link, &mut wbuf, &mut discard)? {
                        ping_sent = None;
                    }
                }
                Wake::Read(Err(e)) | Wake::Wrote(Err(e)) => return Err(e.into()),
                Wake::Wrote(Ok(_)) => {
                    if wbuf.is_empty() {
                        wbuf.clear(); // reuse the allocation from its start
                    }
                }
                Wake::Work | Wake::Timer => {}
            }
        }
    }

    /// Handles every whole packet in `rbuf`. Returns whether a PINGRESP was among them.
    fn on_input(
        &mut self,
        rbuf: &mut BytesMut,
        link: &mut Link,
        wbuf: &mut BytesMut,
        discard: &mut usize,
    ) -> Result<bool, DriveError> {
        let mut pong = false;
        loop {
            if *discard > 0 {
                let n = (*discard).min(rbuf.len());
                let _ = rbuf.split_to(n);
                *discard -= n;
                if *discard > 0 {
                    return Ok(pong);
                }
            }
            let Some(len) = codec::frame_len(rbuf)? else {
                return Ok(pong);
            };
            if len > self.max_in {
                // Larger than we accept (a 3.1.1 broker cannot be told our maximum): skip it
                // rather than fail the connection every other session shares.
                tracing::warn!(client_id = %self.shared.client_id, bytes = len, "upstream packet over the maximum size skipped");
                *discard = len;
                continue;
            }
            if rbuf.len() < len {
                rbuf.reserve(len - rbuf.len());
                return Ok(pong);
            }
            let frame = rbuf.split_to(len);
            match codec::decode(link.version, frame)? {
                Incoming::Publish {
                    topic,
                    qos,
                    pkid,
                    payload,
                    subscription_ids,
                } => {
                    self.deliver(link, &topic, &subscription_ids, payload);
                    match qos {
                        QoS::AtMostOnce => {}
                        QoS::AtLeastOnce => codec::puback(pkid, wbuf),
                        // Subscriptions are QoS ≤ 1, but a broker may still send QoS 2.
                        QoS::ExactlyOnce => codec::pubrec(pkid, wbuf),
                    }
                }
                Incoming::PubAck(pkid) | Incoming::PubComp(pkid) => self.acknowledged(pkid),
                Incoming::PubRec(pkid) => {
                    // Only QoS 2 publishes get a PUBREC and we send none; answer so the
                    // broker is not left waiting.
                    tracing::debug!(client_id = %self.shared.client_id, pkid, "unexpected PUBREC");
                }
                Incoming::PubRel(pkid) => codec::pubcomp(pkid, wbuf),
                Incoming::SubAck { pkid, granted } => self.on_suback(link, pkid, granted),
                Incoming::UnsubAck(pkid) => {
                    self.unsubacks.remove(&pkid);
                }
                Incoming::PingResp => pong = true,
                Incoming::Disconnect(reason) => return Err(DriveError::Disconnected(reason)),
                Incoming::ConnAck(_) | Incoming::Other => {}
            }
        }
    }

    fn deliver(&mut self, link: &Link, topic: &[u8], ids: &[usize], payload: Bytes) {
        let Ok(topic) = std::str::from_utf8(topic) else {
            tracing::debug!("upstream message with a non-UTF-8 topic dropped");
            return;
        };
        match &link.routes {
            Routes::Ids(_) => self.dispatch.dispatch(topic, ids, payload),
            Routes::Match { matcher, .. } => {
                let mut found = std::mem::take(&mut self.scratch_ids);
                found.clear();
                matcher.matches(topic, &mut found);
                if !found.is_empty() {
                    self.dispatch.dispatch(topic, &found, payload);
                }
                self.scratch_ids = found;
            }
        }
    }

    fn acknowledged(&mut self, pkid: u16) {
        let Some(p) = self.inflight.remove(&pkid) else {
            return;
        };
        self.shared.metrics.acknowledged(p.since.elapsed());
        self.shared.outbox.lock().release(&p);
        if let Some(tx) = p.ack {
            let _ = tx.send(Ok(()));
        }
    }

    fn on_suback(&mut self, link: &mut Link, pkid: u16, granted: bool) {
        match self.subacks.remove(&pkid) {
            Some(SubRequest::Filter { filter, id }) => {
                if !granted {
                    tracing::warn!(client_id = %self.shared.client_id, %filter, "the broker refused a subscription");
                }
                self.dispatch.subscription_result(&filter, id, granted);
            }
            Some(SubRequest::Cover(cover)) => {
                let Routes::Match {
                    matcher, covers, ..
                } = &mut link.routes
                else {
                    return;
                };
                let Some(c) = covers.get_mut(&cover) else {
                    return; // unsubscribed meanwhile
                };
                if c.state != CoverState::Pending(pkid) {
                    return; // subscribed again since
                }
                c.state = if granted {
                    CoverState::Granted
                } else {
                    tracing::warn!(client_id = %self.shared.client_id, %cover, "the broker refused a subscription");
                    CoverState::Refused
                };
                for f in &c.filters {
                    if let Some(id) = matcher.get(f) {
                        self.dispatch.subscription_result(f, id, granted);
                    }
                }
            }
            None => {}
        }
    }

    /// Encodes what is due into `wbuf`: subscription changes, then queued publishes (up to
    /// [`WRITE_BATCH`] bytes and the in-flight window).
    fn fill(&mut self, link: &mut Link, wbuf: &mut BytesMut) {
        self.reconcile(link, wbuf);
        for (filter, id, granted) in std::mem::take(&mut self.results) {
            self.dispatch.subscription_result(&filter, id, granted);
        }
        if wbuf.len() >= WRITE_BATCH {
            return;
        }
        let shared = self.shared.clone();
        let mut o = shared.outbox.lock();
        o.admit(link.window.saturating_sub(self.inflight.len()));
        while wbuf.len() < WRITE_BATCH {
            let Some(mut p) = o.pop(self.inflight.len() < link.window) else {
                break;
            };
            if p.packet_size() > link.max_packet {
                // Accepted before this broker's maximum was known (a reconnect to another
                // node): refuse it now rather than lose the connection.
                o.release(&p);
                if let Some(tx) = p.ack.take() {
                    let _ = tx.send(Err(PublishError::TooLarge {
                        size: p.packet_size(),
                        max: link.max_packet,
                    }));
                }
                continue;
            }
            if p.qos == QoS::AtMostOnce {
                codec::publish(link.version, &p.topic, p.qos, p.retain, 0, &p.payload, wbuf);
                o.release(&p);
                // QoS 0: handed to the socket is all the acknowledgement there is.
                if let Some(tx) = p.ack.take() {
                    let _ = tx.send(Ok(()));
                }
            } else {
                let pkid = self.next_pkid();
                codec::publish(
                    link.version,
                    &p.topic,
                    p.qos,
                    p.retain,
                    pkid,
                    &p.payload,
                    wbuf,
                );
                self.inflight.insert(pkid, p);
            }
        }
    }

    /// Brings the broker's subscriptions towards the desired set (only the filters that
    /// changed, or all after a reconnect), within the pending-subscription bound.
    fn reconcile(&mut self, link: &mut Link, wbuf: &mut BytesMut) {
        {
            let mut subs = self.shared.subs.lock();
            if std::mem::take(&mut subs.resync) {
                subs.dirty.clear();
                self.backlog.clear();
                self.backlog.extend(subs.desired.keys().cloned());
            } else if !subs.dirty.is_empty() {
                self.backlog.extend(subs.dirty.drain());
            }
        }
        while self.subacks.len() + self.unsubacks.len() < MAX_PENDING_SUBSCRIPTIONS {
            let Some(filter) = self.backlog.pop_front() else {
                return;
            };
            let want = self.shared.subs.lock().desired.get(&filter).copied();
            match &mut link.routes {
                Routes::Match { .. } => self.reconcile_match(link, filter, want, wbuf),
                Routes::Ids(actual) => {
                    let have = actual.get(&filter).copied();
                    match (want, have) {
                        (Some(id), have) if have != Some(id) => {
                            let pkid = self.next_pkid();
                            codec::subscribe(
                                link.version,
                                pkid,
                                &filter,
                                SUBSCRIPTION_QOS,
                                Some(id),
                                wbuf,
                            );
                            tracing::trace!(client_id = %self.shared.client_id, %filter, id, pkid, "SUBSCRIBE");
                            actual.insert(filter.clone(), id);
                            self.subacks.insert(pkid, SubRequest::Filter { filter, id });
                        }
                        (None, Some(_)) => {
                            let pkid = self.next_pkid();
                            codec::unsubscribe(link.version, pkid, &filter, wbuf);
                            tracing::trace!(client_id = %self.shared.client_id, %filter, pkid, "UNSUBSCRIBE");
                            actual.remove(&filter);
                            self.unsubacks.insert(pkid);
                        }
                        _ => {}
                    }
                }
            }
        }
    }

    fn reconcile_match(
        &mut self,
        link: &mut Link,
        filter: Arc<str>,
        want: Option<usize>,
        wbuf: &mut BytesMut,
    ) {
        let Routes::Match {
            matcher,
            covers,
            cover_of,
        } = &mut link.routes
        else {
            return;
        };
        if filter.starts_with("$share/") {
            // Module docs: a shared subscription's copies are indistinguishable here.
            if let Some(id) = want {
                tracing::warn!(client_id = %self.shared.client_id, %filter, "load-balanced subscriptions need a broker with MQTT 5 subscription identifiers: refused");
                self.results.push((filter, id, false));
            }
            return;
        }
        let have = matcher.get(&filter);
        match (want, have) {
            (Some(id), have) if have != Some(id) => {
                matcher.insert(&filter, id);
                let cover: Arc<str> = match cover_of.get(&filter) {
                    Some(c) => c.clone(),
                    None => {
                        let c = cover_for(&filter, self.namespace_depth);
                        cover_of.insert(filter.clone(), c.clone());
                        c
                    }
                };
                match covers.get_mut(&cover) {
                    Some(c) => {
                        c.filters.insert(filter.clone());
                        match c.state {
                            CoverState::Pending(_) => {} // reported with the SUBACK
                            CoverState::Granted => self.results.push((filter, id, true)),
                            CoverState::Refused => self.results.push((filter, id, false)),
                        }
                    }
                    None => {
                        let pkid = self.next_pkid();
                        codec::subscribe(link.version, pkid, &cover, SUBSCRIPTION_QOS, None, wbuf);
                        tracing::trace!(client_id = %self.shared.client_id, %cover, pkid, "SUBSCRIBE cover");
                        self.subacks.insert(pkid, SubRequest::Cover(cover.clone()));
                        covers.insert(
                            cover,
                            Cover {
                                filters: HashSet::from([filter]),
                                state: CoverState::Pending(pkid),
                            },
                        );
                    }
                }
            }
            (None, Some(_)) => {
                matcher.remove(&filter);
                let Some(cover) = cover_of.remove(&filter) else {
                    return;
                };
                let empty = covers.get_mut(&cover).is_some_and(|c| {
                    c.filters.remove(&filter);
                    c.filters.is_empty()
                });
                if empty {
                    covers.remove(&cover);
                    let pkid = self.next_pkid();
                    codec::unsubscribe(link.version, pkid, &cover, wbuf);
                    tracing::trace!(client_id = %self.shared.client_id, %cover, pkid, "UNSUBSCRIBE cover");
                    self.unsubacks.insert(pkid);
                }
            }
            _ => {}
        }
    }
}

/// The QoS of every broker subscription (filters and namespace covers alike): 0, whatever
/// the clients asked for. Acknowledgements on the broker → proxy hop buy nothing: the session
/// starts clean, so whatever the broker had not delivered when a connection drops is gone at
/// either QoS, TCP already delivers in order within a connection, and the proxy's own
/// delivery to a WebSocket client has no acknowledgement. (Before, a filter shared by
/// clients of both levels got the first one's QoS anyway.) What QoS 1 costs: a PUBACK per
/// message and the broker's in-flight window (Mosquitto: 20 messages per connection); on NATS
/// a JetStream consumer per subscription, which took 1–30 s to deliver again after a node
/// died in `tests/cluster.rs`, against 0.3 s at QoS 0. cuttle-bench's fan-in at N = 100 did
/// not separate the two levels on the embedded broker and Mosquitto: the difference was
/// inside this machine's run-to-run spread (66k–119k deliveries/s for the same phase).
/// (A client publish at QoS 1 still goes upstream at QoS 1: see [`cap_qos`].)
const SUBSCRIPTION_QOS: QoS = QoS::AtMostOnce;

/// Publishes go upstream at QoS 1 at most: the proxy's acknowledgement to its client is
/// at-least-once anyway, and QoS 2 would cost the broker two more packets per message.
fn cap_qos(qos: QoS) -> QoS {
    match qos {
        QoS::AtMostOnce => QoS::AtMostOnce,
        _ => QoS::AtLeastOnce,
    }
}

/// The subscription that carries `filter` when routing by topic: its namespace
/// (`[prefix/]app/scope/#`), or the filter itself for the reserved app `_` and anything too
/// short to have a namespace.
pub(super) fn cover_for(filter: &str, namespace_depth: usize) -> Arc<str> {
    let mut end = 0;
    let mut levels = 0;
    for (i, b) in filter.bytes().enumerate() {
        if b == b'/' {
            levels += 1;
            if levels == namespace_depth {
                end = i;
                break;
            }
        }
    }
    if levels < namespace_depth {
        return filter.into();
    }
    let namespace = &filter[..end];
    let app = namespace.rsplit('/').nth(1).unwrap_or_default();
    if app == crate::topic::upstream::UNSCOPED || namespace.contains(['+', '#']) {
        return filter.into();
    }
    if filter.len() == end + 2 && filter.ends_with("/#") {
        return filter.into();
    }
    format!("{namespace}/#").into()
}

/// Ends the task: every waiting publish fails.
fn shut_down(shared: &Shared, session: &mut Session) {
    shared.closed.store(true, Ordering::Release);
    let queued = shared.outbox.lock().drain();
    for p in queued {
        if let Some(tx) = p.ack {
            let _ = tx.send(Err(PublishError::Closed));
        }
    }
    for (_, p) in session.inflight.drain() {
        if let Some(tx) = p.ack {
            let _ = tx.send(Err(PublishError::Lost));
        }
    }
    shared.ended.notify_waiters();
}

#[cfg(test)]
mod tests {
    use super::cover_for;

    #[test]
    fn covers_are_namespaces_and_reserved_filters_are_their_own() {
        assert_eq!(&*cover_for("app/acme/room/t/#", 2), "app/acme/#");
        assert_eq!(&*cover_for("app/_/+/+/#", 2), "app/_/#");
        assert_eq!(&*cover_for("app/acme/#", 2), "app/acme/#");
        assert_eq!(&*cover_for("pre/app/acme/r/t/f", 3), "pre/app/acme/#");
        assert_eq!(&*cover_for("_/presence/v1/+", 2), "_/presence/v1/+");
        assert_eq!(
            &*cover_for("pre/_/restore/v2/p/s/a", 3),
            "pre/_/restore/v2/p/s/a"
        );
        assert_eq!(&*cover_for("short", 2), "short");
    }
}
