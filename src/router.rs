//! The router: which local sessions want which upstream filters, and fan-out of every broker
//! message to them.
//!
//! - **Entries.** One entry per distinct upstream filter (including `$share/…` filters),
//!   shared by its local subscribers. The first subscriber subscribes it upstream; when the
//!   last one leaves, the entry lingers for `upstream.unsubscribe_delay_ms` before it is
//!   unsubscribed, so a leave-and-rejoin (a page reload, an unsubscribe followed by a
//!   subscribe) finds it live and costs the broker nothing. Each entry has its own MQTT 5
//!   subscription identifier, never reused while the broker could still know the old one: a
//!   broker message names exactly the entries it is for.
//! - **Shards.** Entries live in [`SHARDS`] shards by filter hash, each behind its own lock;
//!   the shard is part of the subscription id, so delivery finds an entry with one read lock
//!   of one shard. Nothing on the delivery path takes a lock over the whole table.
//! - **Index by owner.** Each session holds a [`Membership`]: its subscriptions and the
//!   filters each one joined. Subscribing, unsubscribing, replacing and disconnecting touch
//!   only the session's own entries; unsubscribing a topic it never subscribed costs a hash
//!   lookup.
//! - **Readiness.** A subscription's reply (`subscribed`, `filtersUpdated`) is sent once the
//!   broker has granted every filter that was new upstream (SUBACK), at once when all were
//!   already live: after the reply, every later matching message reaches the subscriber.
//! - **Fan-out.** The `message` frame is encoded once per distinct subscription string (the
//!   frame's `topic` is the subscriber's own string) and the same `Bytes` is queued to every
//!   session that receives it. Queues are bounded in frames and bytes; a full queue marks the
//!   session as a slow consumer, which then closes itself. Dispatch never blocks.
//! - Wildcard subscriptions are re-checked per delivery against the current policy (private
//!   rooms, topic ACLs, session allow-lists); exact ones were decided at subscribe time.
//! - Load-balanced (`$share`) entries deliver each message to one local member, round-robin.

use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use indexmap::IndexMap;
use parking_lot::{Mutex, RwLock};
use tokio::sync::{Notify, mpsc, oneshot};
use tokio::time::Instant;

use crate::auth::Actor;
use crate::reload::PolicyStore;
use crate::topic::upstream::TopicLayout;
use crate::upstream::{Dispatch, MAX_SUBSCRIPTION_ID, Pool};
use crate::wire::{encode, envelope};

/// A connection's id, unique within the process.
pub type SessionId = u64;

/// Bits of a subscription id that name its shard (the rest is a sequence within the shard).
const SHARD_BITS: u32 = 6;
const LANES: usize = 1 << SHARD_BITS;
/// Entry shards; the last lane numbers one-shot retained reads ([`Router::fetch_retained`]).
pub const SHARDS: usize = LANES - 1;
const FETCH_LANE: usize = LANES - 1;
/// Largest sequence number within a lane.
const MAX_SEQ: usize = MAX_SUBSCRIPTION_ID >> SHARD_BITS;

fn lane_of(id: usize) -> usize {
    id & (LANES - 1)
}

/// Set when a session's queue overflowed: the session must close as a slow consumer.
#[derive(Debug, Default)]
pub struct Overflow {
    flag: AtomicBool,
    notify: Notify,
}

impl Overflow {
    pub fn is_set(&self) -> bool {
        self.flag.load(Ordering::Acquire)
    }

    /// Completes once the queue has overflowed.
    pub async fn wait(&self) {
        loop {
            let notified = self.notify.notified();
            if self.is_set() {
                return;
            }
            notified.await;
        }
    }

    fn set(&self) {
        if !self.flag.swap(true, Ordering::AcqRel) {
            self.notify.notify_waiters();
        }
    }
}

/// The sending side of a session's outbound queue, bounded in frames and in bytes.
#[derive(Debug, Clone)]
pub struct Outbox {
    tx: mpsc::Sender<Bytes>,
    bytes: Arc<AtomicUsize>,
    max_bytes: usize,
    overflow: Arc<Overflow>,
}

/// The receiving side of an [`Outbox`]: releases each frame's bytes as it is taken.
#[derive(Debug)]
pub struct OutboxReceiver {
    rx: mpsc::Receiver<Bytes>,
    bytes: Arc<AtomicUsize>,
}

impl OutboxReceiver {
    pub async fn recv(&mut self) -> Option<Bytes> {
        let frame = self.rx.recv().await?;
        self.bytes.fetch_sub(frame.len(), Ordering::AcqRel);
        Some(frame)
    }

    pub fn try_recv(&mut self) -> Option<Bytes> {
        let frame = self.rx.try_recv().ok()?;
        self.bytes.fetch_sub(frame.len(), Ordering::AcqRel);
        Some(frame)
    }

    /// Bytes queued and not yet taken.
    pub fn queued_bytes(&self) -> usize {
        self.bytes.load(Ordering::Acquire)
    }

    /// The counter of bytes queued, shared with the senders (for the metrics).
    pub fn queued_bytes_counter(&self) -> Arc<AtomicUsize> {
        self.bytes.clone()
    }
}

impl Outbox {
    /// A queue of at most `capacity` frames and `max_bytes` bytes.
    pub fn channel(capacity: usize, max_bytes: usize) -> (Self, OutboxReceiver, Arc<Overflow>) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let overflow = Arc::new(Overflow::default());
        let bytes = Arc::new(AtomicUsize::new(0));
        (
            Self {
                tx,
                bytes: bytes.clone(),
                max_bytes,
                overflow: overflow.clone(),
            },
            OutboxReceiver { rx, bytes },
            overflow,
        )
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.tx.capacity() == self.tx.max_capacity()
    }

    /// Queues a frame only while the queue is less than half full (frames and bytes), and
    /// never flags the session: for traffic that can be dropped and repaired (presence
    /// events, whose room list follows), which must never cost a connection its messages.
    pub fn offer(&self, frame: Bytes) -> bool {
        let len = frame.len();
        let queued = self.tx.max_capacity() - self.tx.capacity();
        if queued >= (self.tx.max_capacity() / 2).max(1) {
            return false;
        }
        let before = self.bytes.fetch_add(len, Ordering::AcqRel);
        if before + len > self.max_bytes / 2 {
            self.bytes.fetch_sub(len, Ordering::AcqRel);
            return false;
        }
        match self.tx.try_send(frame) {
            Ok(()) => true,
            Err(_) => {
                self.bytes.fetch_sub(len, Ordering::AcqRel);
                false
            }
        }
    }

    /// Queues a frame without waiting. A full queue (frames or bytes) flags the session as a
    /// slow consumer and drops the frame.
    pub fn push(&self, frame: Bytes) -> bool {
        let len = frame.len();
        let before = self.bytes.fetch_add(len, Ordering::AcqRel);
        if before + len > self.max_bytes {
            self.bytes.fetch_sub(len, Ordering::AcqRel);
            self.overflow.set();
            return false;
        }
        match self.tx.try_send(frame) {
            Ok(()) => true,
            Err(e) => {
                self.bytes.fetch_sub(len, Ordering::AcqRel);
                if matches!(e, mpsc::error::TrySendError::Full(_)) {
                    self.overflow.set();
                }
                false
            }
        }
    }
}

/// One local subscription to one upstream filter.
#[derive(Debug, Clone)]
pub struct Subscriber {
    pub session: SessionId,
    /// The client's subscription string: the `topic` of the frames it receives.
    pub topic: Arc<str>,
    pub actor: Arc<Actor>,
    /// Wildcard subscriptions are authorized per delivery.
    pub check_delivery: bool,
    /// The socket id used for echo suppression.
    pub socket_id: Arc<str>,
    pub outbox: Outbox,
}

/// What to do once a subscription's new filters are all granted upstream.
#[derive(Debug, Clone)]
pub enum Reply {
    /// Nothing (a re-plan after a policy reload).
    None,
    /// Queue this frame (`subscribed`, `filtersUpdated`) on the subscriber's outbox.
    Frame(Bytes),
    /// Add one permit (reconnect restore waits for all its subscriptions).
    Signal(Arc<tokio::sync::Semaphore>),
}

/// Whether a subscription is live upstream now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Readiness {
    /// Every filter was already granted: the caller replies at once.
    Now,
    /// The router carries out the [`Reply`] when the broker has granted the new filters (or
    /// queues an error frame if it refused one).
    Later,
}

/// A subscription's pending reply, carried out once each of its new filters is granted.
struct Ready {
    /// Pending filters, plus one held by the joining call until it has registered them all.
    remaining: AtomicUsize,
    /// The subscriber the reply is for: a waiter whose subscriber left is void.
    key: u64,
    topic: Arc<str>,
    reply: Reply,
    outbox: Outbox,
    done: AtomicBool,
}

impl Ready {
    /// One filter became live; carries out the reply when it was the last.
    fn granted(&self) {
        if self.remaining.fetch_sub(1, Ordering::AcqRel) == 1
            && !self.done.swap(true, Ordering::AcqRel)
        {
            match &self.reply {
                Reply::None => {}
                Reply::Frame(f) => {
                    self.outbox.push(f.clone());
                }
                Reply::Signal(s) => s.add_permits(1),
            }
        }
    }

    fn refused(&self) {
        if !self.done.swap(true, Ordering::AcqRel) {
            self.outbox
                .push(encode::errors::subscription_failed(&self.topic));
            if let Reply::Signal(s) = &self.reply {
                s.add_permits(1);
            }
        }
    }
}

/// Where the broker stands on an entry's subscription.
enum Upstream {
    /// SUBSCRIBE sent (or to be sent); replies waiting for the SUBACK.
    Pending(Vec<Arc<Ready>>),
    Live,
    Refused,
}

struct Entry {
    filter: Arc<str>,
    shared: bool,
    /// By subscriber key ([`Membership`]): O(1) join and leave, contiguous for fan-out.
    subscribers: IndexMap<u64, Subscriber>,
    upstream: Upstream,
    next: AtomicUsize,
}

#[derive(Default)]
struct Shard {
    by_filter: HashMap<Arc<str>, usize>,
    entries: HashMap<usize, Entry>,
    next_seq: usize,
}

impl Shard {
    /// A fresh id in lane `lane`: sequence numbers run through the whole lane before one is
    /// used again (live ones are skipped), so the broker cannot confuse a rejoined filter's
    /// new subscription with its old one.
    fn allocate(&mut self, lane: usize) -> Option<usize> {
        for _ in 0..MAX_SEQ {
            self.next_seq = self.next_seq % MAX_SEQ + 1;
            let id = (self.next_seq << SHARD_BITS) | lane;
            if !self.entries.contains_key(&id) {
                return Some(id);
            }
        }
        None
    }
}

/// A one-shot read of a retained message: subscribed until the first message arrives.
struct Fetch {
    filter: Arc<str>,
    waiters: Vec<oneshot::Sender<Bytes>>,
}

#[derive(Default)]
struct Fetches {
    by_filter: HashMap<Arc<str>, usize>,
    by_id: HashMap<usize, Fetch>,
    next_seq: usize,
}

/// Why a subscription could not join its filters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum JoinError {
    #[error("too many upstream filters on this connection")]
    ConnectionLimit,
    #[error("this replica holds as many upstream filters as it may")]
    ReplicaLimit,
}

/// The process-wide router.
pub struct Router {
    store: Arc<PolicyStore>,
    layout: TopicLayout,
    pool: OnceLock<Arc<Pool>>,
    shards: Box<[RwLock<Shard>]>,
    hasher: std::collections::hash_map::RandomState,
    fetches: Mutex<Fetches>,
    /// Entries (live and lingering), for `upstream.max_filters`.
    entries: AtomicUsize,
    max_filters: usize,
    linger: Duration,
    /// Emptied entries waiting out the linger: (deadline, filter, id), oldest first.
    dissolving: Mutex<VecDeque<(Instant, Arc<str>, usize)>>,
    dissolve_poke: Notify,
    next_key: AtomicU64,
    /// Messages that arrived for no live entry (raced with an unsubscribe), for diagnostics.
    pub orphans: AtomicUsize,
    /// Local subscriptions over all entries ((session, filter) pairs), for the metrics.
    subscriptions: AtomicUsize,
    metrics: crate::metrics::RouterMetrics,
    /// Where messages of the presence subscription ([`crate::presence::SUBSCRIPTION_ID`]) go.
    presence: OnceLock<std::sync::Weak<crate::presence::Presence>>,
    /// Where messages of the control subscription ([`crate::server::control::SUBSCRIPTION_ID`])
    /// go.
    control: OnceLock<Box<dyn crate::server::control::ControlSink>>,
}

impl std::fmt::Debug for Router {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Router")
            .field("filters", &self.filter_count())
            .finish_non_exhaustive()
    }
}

impl Router {
    /// A router with metrics of its own (benches, unit tests).
    pub fn new(store: Arc<PolicyStore>) -> Arc<Self> {
        Self::with_metrics(store, crate::metrics::Metrics::new().router.clone())
    }

    pub fn with_metrics(
        store: Arc<PolicyStore>,
        metrics: crate::metrics::RouterMetrics,
    ) -> Arc<Self> {
        let settings = store.settings();
        let layout = settings.upstream.layout.clone();
        let max_filters = settings.upstream.max_filters;
        let linger = settings.upstream.unsubscribe_delay;
        Arc::new(Self {
            store,
            layout,
            pool: OnceLock::new(),
            shards: (0..SHARDS).map(|_| RwLock::new(Shard::default())).collect(),
            hasher: std::collections::hash_map::RandomState::new(),
            fetches: Mutex::new(Fetches::default()),
            entries: AtomicUsize::new(0),
            max_filters,
            linger,
            dissolving: Mutex::new(VecDeque::new()),
            dissolve_poke: Notify::new(),
            next_key: AtomicU64::new(1),
            orphans: AtomicUsize::new(0),
            subscriptions: AtomicUsize::new(0),
            metrics,
            presence: OnceLock::new(),
            control: OnceLock::new(),
        })
    }

    /// Hands the messages of the presence subscription to `presence` (once, at start-up).
    pub fn attach_presence(&self, presence: &Arc<crate::presence::Presence>) {
        let _ = self.presence.set(Arc::downgrade(presence));
    }

    /// Hands the messages of the control subscription to `sink` (once, at start-up).
    pub fn attach_control(&self, sink: Box<dyn crate::server::control::ControlSink>) {
        let _ = self.control.set(sink);
    }

    /// Connects the router to the pool it subscribes through (once, at start-up), and starts
    /// the task that unsubscribes emptied entries after their linger. Must be called inside a
    /// Tokio runtime.
    pub fn attach(self: &Arc<Self>, pool: Arc<Pool>) {
        if self.pool.set(pool).is_ok() && !self.linger.is_zero() {
            tokio::spawn(dissolver(self.clone()));
        }
    }

    pub fn layout(&self) -> &TopicLayout {
        &self.layout
    }

    /// Distinct upstream filters held (with local subscribers, or lingering).
    pub fn filter_count(&self) -> usize {
        self.entries.load(Ordering::Relaxed)
    }

    /// Local subscriptions: (session, upstream filter) pairs.
    pub fn subscription_count(&self) -> usize {
        self.subscriptions.load(Ordering::Relaxed)
    }

    /// The subscription id of `filter`'s entry, if it has one (diagnostics, benches, tests).
    pub fn subscription_id(&self, filter: &str) -> Option<usize> {
        self.shards[self.shard_of(filter)]
            .read()
            .by_filter
            .get(filter)
            .copied()
    }

    /// A new, empty membership for one session.
    pub fn membership(self: &Arc<Self>, session: SessionId, max_filters: usize) -> Membership {
        Membership {
            router: self.clone(),
            session,
            subs: HashMap::new(),
            filters: HashMap::new(),
            max_filters,
        }
    }

    fn shard_of(&self, filter: &str) -> usize {
        (self.hasher.hash_one(filter) % SHARDS as u64) as usize
    }

    /// Adds `sub` (as `key`) to the entry of `filter`, creating and subscribing it upstream
    /// if needed. Registers `ready` with a pending entry.
    fn join(
        &self,
        filter: &str,
        key: u64,
        sub: &Subscriber,
        ready: &Arc<Ready>,
    ) -> Result<(Arc<str>, usize), JoinError> {
        let lane = self.shard_of(filter);
        let mut shard = self.shards[lane].write();
        let id = match shard.by_filter.get(filter) {
            Some(id) => *id,
            None => {
                if self.entries.fetch_add(1, Ordering::AcqRel) >= self.max_filters {
                    self.entries.fetch_sub(1, Ordering::AcqRel);
                    return Err(JoinError::ReplicaLimit);
                }
                let Some(id) = shard.allocate(lane) else {
                    self.entries.fetch_sub(1, Ordering::AcqRel);
                    return Err(JoinError::ReplicaLimit);
                };
                let filter: Arc<str> = filter.into();
                shard.by_filter.insert(filter.clone(), id);
                shard.entries.insert(
                    id,
                    Entry {
                        filter: filter.clone(),
                        shared: filter.starts_with("$share/"),
                        subscribers: IndexMap::new(),
                        // Without a pool (benches, unit tests) nothing will answer.
                        upstream: if self.pool.get().is_some() {
                            Upstream::Pending(Vec::new())
                        } else {
                            Upstream::Live
                        },
                        next: AtomicUsize::new(0),
                    },
                );
                if let Some(pool) = self.pool.get() {
                    pool.subscribe(&filter, id);
                }
                id
            }
        };
        let Some(entry) = shard.entries.get_mut(&id) else {
            return Err(JoinError::ReplicaLimit); // unreachable: inserted or found above
        };
        if entry.subscribers.insert(key, sub.clone()).is_none() {
            self.subscriptions.fetch_add(1, Ordering::Relaxed);
        }
        match &mut entry.upstream {
            Upstream::Pending(waiters) => {
                ready.remaining.fetch_add(1, Ordering::AcqRel);
                waiters.push(ready.clone());
            }
            Upstream::Live => {}
            Upstream::Refused => ready.refused(),
        }
        Ok((entry.filter.clone(), id))
    }

    /// Removes subscriber `key` from entry `id`; an emptied entry starts to dissolve.
    fn leave(&self, filter: &str, id: usize, key: u64) {
        let lane = lane_of(id);
        let Some(shard) = self.shards.get(lane) else {
            return;
        };
        let mut shard = shard.write();
        let Some(entry) = shard.entries.get_mut(&id) else {
            return;
        };
        if entry.subscribers.swap_remove(&key).is_some() {
            self.subscriptions.fetch_sub(1, Ordering::Relaxed);
        }
        if !entry.subscribers.is_empty() {
            return;
        }
        if self.linger.is_zero() || self.pool.get().is_none() {
            self.drop_entry(&mut shard, id);
        } else {
            drop(shard);
            let deadline = Instant::now() + self.linger;
            self.dissolving
                .lock()
                .push_back((deadline, filter.into(), id));
            self.dissolve_poke.notify_one();
        }
    }

    fn drop_entry(&self, shard: &mut Shard, id: usize) {
        if let Some(e) = shard.entries.remove(&id) {
            shard.by_filter.remove(&e.filter);
            self.entries.fetch_sub(1, Ordering::AcqRel);
            if let Some(pool) = self.pool.get() {
                pool.unsubscribe(&e.filter, id);
            }
        }
    }

    /// Drops entry `id` if it is still empty (its linger is over).
    fn dissolve(&self, id: usize) {
        let Some(shard) = self.shards.get(lane_of(id)) else {
            return;
        };
        let mut shard = shard.write();
        if shard
            .entries
            .get(&id)
            .is_some_and(|e| e.subscribers.is_empty())
        {
            self.drop_entry(&mut shard, id);
        }
    }

    /// Reads the retained message of `filter` (an exact topic): subscribes, waits up to
    /// `timeout` for the broker to send it, unsubscribes. `None` when there is none (a broker
    /// sends nothing for a topic without a retained message) or it did not come in time.
    pub async fn fetch_retained(&self, filter: &str, timeout: Duration) -> Option<Bytes> {
        let (tx, rx) = oneshot::channel();
        {
            let mut f = self.fetches.lock();
            match f.by_filter.get(filter).copied() {
                Some(id) => {
                    if let Some(fetch) = f.by_id.get_mut(&id) {
                        fetch.waiters.push(tx);
                    }
                }
                None => {
                    let mut id = None;
                    for _ in 0..MAX_SEQ {
                        f.next_seq = f.next_seq % MAX_SEQ + 1;
                        let candidate = (f.next_seq << SHARD_BITS) | FETCH_LANE;
                        if !f.by_id.contains_key(&candidate) {
                            id = Some(candidate);
                            break;
                        }
                    }
                    let id = id?;
                    let filter: Arc<str> = filter.into();
                    f.by_filter.insert(filter.clone(), id);
                    f.by_id.insert(
                        id,
                        Fetch {
                            filter: filter.clone(),
                            waiters: vec![tx],
                        },
                    );
                    if let Some(pool) = self.pool.get() {
                        pool.subscribe(&filter, id);
                    }
                }
            }
        }
        let got = tokio::time::timeout(timeout, rx)
            .await
            .ok()
            .and_then(Result::ok);
        if got.is_none() {
            // Leave the fetch if nobody else is still waiting on it.
            let mut f = self.fetches.lock();
            if let Some(id) = f.by_filter.get(filter).copied()
                && let Some(fetch) = f.by_id.get_mut(&id)
            {
                fetch.waiters.retain(|w| !w.is_closed());
                if fetch.waiters.is_empty()
                    && let Some(fetch) = f.by_id.remove(&id)
                {
                    f.by_filter.remove(&fetch.filter);
                    if let Some(pool) = self.pool.get() {
                        pool.unsubscribe(&fetch.filter, id);
                    }
                }
            }
        }
        got
    }

    /// Completes the fetches a message is for; returns whether it was for one.
    fn complete_fetches(&self, ids: &[usize], payload: &Bytes) -> bool {
        if !ids.iter().any(|id| lane_of(*id) == FETCH_LANE) {
            return false;
        }
        let mut f = self.fetches.lock();
        let mut any = false;
        for id in ids {
            if let Some(fetch) = f.by_id.remove(id) {
                any = true;
                f.by_filter.remove(&fetch.filter);
                if let Some(pool) = self.pool.get() {
                    pool.unsubscribe(&fetch.filter, *id);
                }
                for w in fetch.waiters {
                    let _ = w.send(payload.clone());
                }
            }
        }
        any
    }

    fn deliver(&self, topic: &str, ids: &[usize], payload: Bytes) {
        if ids.contains(&crate::presence::SUBSCRIPTION_ID) {
            if let Some(p) = self.presence.get().and_then(std::sync::Weak::upgrade) {
                p.on_upstream(payload);
            }
            return;
        }
        if ids.contains(&crate::server::control::SUBSCRIPTION_ID) {
            if let Some(sink) = self.control.get() {
                sink.deliver(&payload);
            }
            return;
        }
        if self.complete_fetches(ids, &payload) {
            return;
        }
        let Some(up) = self.layout.parse_upstream(topic) else {
            return;
        };
        let (data, sender) = envelope::unwrap(&payload);
        let client_topic = up.client_topic();
        let snapshot = self.store.load();
        let policy = &snapshot.policy;
        let metrics = &self.metrics;
        let echo = |s: &Subscriber| sender == Some(&*s.socket_id);
        let denied =
            |s: &Subscriber| s.check_delivery && !policy.authorize_delivery(&s.actor, client_topic);
        let mut queued = 0usize;
        let mut push = |s: &Subscriber, frame: Bytes| {
            if s.outbox.push(frame) {
                queued += 1;
            } else {
                metrics.slow_consumer();
            }
        };
        // One encoded frame per distinct subscription string.
        let mut frames: Vec<(Arc<str>, Bytes)> = Vec::new();
        let mut frame_for = |sub_topic: &Arc<str>| -> Bytes {
            if let Some((_, b)) = frames.iter().find(|(t, _)| t == sub_topic) {
                return b.clone();
            }
            let b = encode::message(sub_topic, data, up.filter);
            frames.push((sub_topic.clone(), b.clone()));
            b
        };
        let mut found = false;
        for id in ids {
            let Some(shard) = self.shards.get(lane_of(*id)) else {
                continue;
            };
            let shard = shard.read();
            let Some(e) = shard.entries.get(id) else {
                continue;
            };
            found = true;
            if e.shared {
                // One local member per message, round-robin over those allowed to have it.
                let n = e.subscribers.len();
                let start = e.next.fetch_add(1, Ordering::Relaxed);
                let member = (0..n)
                    .filter_map(|i| e.subscribers.get_index((start + i) % n))
                    .map(|(_, s)| s)
                    .find(|s| !echo(s) && !denied(s));
                match member {
                    Some(s) => push(s, frame_for(&s.topic)),
                    // A member skipped for another is not a drop; the group having none the
                    // policy allows is (counted once, not once per member).
                    None if e.subscribers.values().any(|s| !echo(s)) => metrics.delivery_denied(),
                    None => {}
                }
            } else {
                for s in e.subscribers.values().filter(|s| !echo(s)) {
                    if denied(s) {
                        metrics.delivery_denied();
                    } else {
                        push(s, frame_for(&s.topic));
                    }
                }
            }
        }
        if found {
            self.metrics.fanned_out(queued);
        } else {
            self.orphans.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn on_subscription_result(&self, filter: &str, id: usize, granted: bool) {
        if id == crate::presence::SUBSCRIPTION_ID {
            if let Some(p) = self.presence.get().and_then(std::sync::Weak::upgrade) {
                p.on_subscribed(granted);
            }
            return;
        }
        if id == crate::server::control::SUBSCRIPTION_ID {
            if !granted {
                tracing::error!(%filter, "the broker refused the control subscription: API disconnects reach only this replica");
            }
            return;
        }
        let Some(shard) = self.shards.get(lane_of(id)) else {
            return;
        };
        let mut shard = shard.write();
        let Some(entry) = shard.entries.get_mut(&id) else {
            return; // dissolved meanwhile
        };
        if *entry.filter != *filter {
            return;
        }
        let state = if granted {
            Upstream::Live
        } else {
            Upstream::Refused
        };
        if let Upstream::Pending(waiters) = std::mem::replace(&mut entry.upstream, state) {
            for w in waiters {
                // A subscriber that left (or re-subscribed elsewhere) is owed nothing here.
                if !entry.subscribers.contains_key(&w.key) {
                    continue;
                }
                if granted { w.granted() } else { w.refused() }
            }
        }
    }
}

impl Dispatch for Router {
    fn dispatch(&self, topic: &str, subscription_ids: &[usize], payload: Bytes) {
        self.deliver(topic, subscription_ids, payload);
    }

    fn subscription_result(&self, filter: &str, id: usize, granted: bool) {
        self.on_subscription_result(filter, id, granted);
    }
}

/// Unsubscribes emptied entries once their linger is over (and they are still empty). Runs as
/// long as the process (the router lives as long as the proxy).
async fn dissolver(router: Arc<Router>) {
    loop {
        let due: Vec<usize> = {
            let mut q = router.dissolving.lock();
            let now = Instant::now();
            let mut due = Vec::new();
            while q.front().is_some_and(|(at, _, _)| *at <= now) {
                if let Some((_, _, id)) = q.pop_front() {
                    due.push(id);
                }
            }
            due
        };
        for id in due {
            router.dissolve(id);
        }
        let next = router.dissolving.lock().front().map(|(at, _, _)| *at);
        match next {
            Some(at) => {
                tokio::select! {
                    _ = tokio::time::sleep_until(at) => {}
                    _ = router.dissolve_poke.notified() => {}
                }
            }
            None => router.dissolve_poke.notified().await,
        }
    }
}

/// One subscription of a session: its subscriber key and the entries it joined.
#[derive(Debug)]
struct Joined {
    key: u64,
    filters: Vec<(Arc<str>, usize)>,
}

/// A session's subscriptions in the router, indexed by the session: what it costs to change
/// follows what the session holds. Dropping it leaves everything.
pub struct Membership {
    router: Arc<Router>,
    session: SessionId,
    subs: HashMap<Arc<str>, Joined>,
    /// Upstream filter → how many of this session's subscriptions joined it.
    filters: HashMap<Arc<str>, u32>,
    max_filters: usize,
}

impl std::fmt::Debug for Membership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Membership")
            .field("session", &self.session)
            .field("subscriptions", &self.subs.len())
            .field("filters", &self.filters.len())
            .finish()
    }
}

impl Membership {
    pub fn session(&self) -> SessionId {
        self.session
    }

    /// Distinct upstream filters this session holds.
    pub fn filter_count(&self) -> usize {
        self.filters.len()
    }

    pub fn contains(&self, topic: &str) -> bool {
        self.subs.contains_key(topic)
    }

    /// What making subscription `topic` exactly `filters` would change in this session's
    /// distinct upstream filters: (joined, left). What a change costs upstream, at most.
    pub fn changes(&self, topic: &str, filters: &[String]) -> (usize, usize) {
        let added = filters
            .iter()
            .filter(|f| !self.filters.contains_key(f.as_str()))
            .count();
        let removed = self.subs.get(topic).map_or(0, |j| {
            j.filters
                .iter()
                .filter(|(f, _)| {
                    !filters.iter().any(|n| n.as_str() == &**f)
                        && self.filters.get(f).copied() == Some(1)
                })
                .count()
        });
        (added, removed)
    }

    /// Makes the subscription `sub.topic` exactly `filters`: new filters are joined first,
    /// then filters no longer wanted are left, so switching filters (or between broadcast and
    /// load-balanced) loses no message and does not churn an upstream subscription both sets
    /// share. Existing entries get `sub`'s current actor and grant.
    ///
    /// `reply` says what confirms the subscription; see [`Readiness`] for who carries it out.
    pub fn replace(
        &mut self,
        filters: &[String],
        sub: &Subscriber,
        reply: Reply,
    ) -> Result<Readiness, JoinError> {
        let key = match self.subs.get(&*sub.topic) {
            Some(j) => j.key,
            None => self.router.next_key.fetch_add(1, Ordering::Relaxed),
        };
        // The connection's cap counts distinct filters, as the broker does.
        let (added, removed) = self.changes(&sub.topic, filters);
        if self.filters.len() + added - removed > self.max_filters {
            return Err(JoinError::ConnectionLimit);
        }
        let ready = Arc::new(Ready {
            remaining: AtomicUsize::new(1),
            key,
            topic: sub.topic.clone(),
            reply,
            outbox: sub.outbox.clone(),
            done: AtomicBool::new(false),
        });
        let mut joined = Vec::with_capacity(filters.len());
        for f in filters {
            match self.router.join(f, key, sub, &ready) {
                Ok(j) => joined.push(j),
                Err(e) => {
                    // Undo the joins this call made that the old set does not hold.
                    ready.done.store(true, Ordering::Release);
                    let old = self.subs.get(&*sub.topic);
                    for (f, id) in joined {
                        let kept = old.is_some_and(|j| j.filters.iter().any(|(_, o)| *o == id));
                        if !kept {
                            self.router.leave(&f, id, key);
                        }
                    }
                    return Err(e);
                }
            }
        }
        let previous = self.subs.insert(
            sub.topic.clone(),
            Joined {
                key,
                filters: joined.clone(),
            },
        );
        for (f, _) in &joined {
            *self.filters.entry(f.clone()).or_insert(0) += 1;
        }
        if let Some(previous) = previous {
            for (f, id) in previous.filters {
                self.release_filter(&f);
                if !joined.iter().any(|(_, j)| *j == id) {
                    self.router.leave(&f, id, key);
                }
            }
        }
        // Drop the joining call's own count: zero means nothing was pending.
        if ready.remaining.fetch_sub(1, Ordering::AcqRel) == 1
            && !ready.done.swap(true, Ordering::AcqRel)
        {
            return Ok(Readiness::Now);
        }
        Ok(Readiness::Later)
    }

    fn release_filter(&mut self, filter: &Arc<str>) {
        if let Some(n) = self.filters.get_mut(filter) {
            *n -= 1;
            if *n == 0 {
                self.filters.remove(filter);
            }
        }
    }

    /// Leaves the subscription `topic`; `false` if the session had none.
    pub fn remove(&mut self, topic: &str) -> bool {
        let Some(j) = self.subs.remove(topic) else {
            return false;
        };
        for (f, id) in j.filters {
            self.release_filter(&f);
            self.router.leave(&f, id, j.key);
        }
        true
    }

    /// Leaves every subscription.
    pub fn clear(&mut self) {
        for (_, j) in self.subs.drain() {
            for (f, id) in j.filters {
                self.router.leave(&f, id, j.key);
            }
        }
        self.filters.clear();
    }
}

impl Drop for Membership {
    fn drop(&mut self) {
        self.clear();
    }
}

#[cfg(test)]
impl Router {
    /// The subscription ids a broker holding exactly this router's subscriptions would tag a
    /// message on `topic` with: every entry whose filter matches. Unit tests, which have no
    /// broker, stand in for one with this.
    pub(crate) fn matching_ids(&self, topic: &str) -> Vec<usize> {
        let mut ids: Vec<usize> = self
            .shards
            .iter()
            .flat_map(|s| {
                s.read()
                    .entries
                    .iter()
                    .filter(|(_, e)| tests::mqtt_matches(&e.filter, topic))
                    .map(|(id, _)| *id)
                    .collect::<Vec<_>>()
            })
            .collect();
        ids.sort_unstable();
        ids
    }
}

#[cfg(test)]
mod tests;
