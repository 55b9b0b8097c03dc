//! The router: which local sessions want which upstream filters, and fan-out of every broker
//! message to them.
//!
//! - One entry per distinct upstream filter (including `$share/…` filters), reference-counted
//!   by its local subscribers. The first subscriber subscribes it upstream, the last one to
//!   leave unsubscribes it. Each entry has an MQTT 5 subscription identifier, so a broker
//!   message names exactly the entries it is for: no topic matching here, and no duplicate or
//!   missed deliveries when filters overlap.
//! - Fan-out: the `message` frame is encoded once per distinct subscription string (the frame's
//!   `topic` is the subscriber's own string) and the same `Bytes` is queued to every session
//!   that receives it. Queues are bounded; a full queue marks the session as a slow consumer,
//!   which then closes itself. Dispatch never blocks.
//! - Wildcard subscriptions are re-checked per delivery against the current policy (private
//!   rooms, topic ACLs, session allow-lists); exact ones were decided at subscribe time.
//! - Load-balanced (`$share`) entries deliver each message to one local member, round-robin.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use parking_lot::RwLock;
use tokio::sync::{Notify, mpsc, oneshot};

use crate::auth::Actor;
use crate::reload::PolicyStore;
use crate::topic::upstream::TopicLayout;
use crate::upstream::{Dispatch, MAX_SUBSCRIPTION_ID, Pool};
use crate::wire::{encode, envelope};

/// A connection's id, unique within the process.
pub type SessionId = u64;

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

/// The sending side of a session's bounded outbound queue.
#[derive(Debug, Clone)]
pub struct Outbox {
    tx: mpsc::Sender<Bytes>,
    overflow: Arc<Overflow>,
}

impl Outbox {
    /// A queue of `capacity` frames.
    pub fn channel(capacity: usize) -> (Self, mpsc::Receiver<Bytes>, Arc<Overflow>) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let overflow = Arc::new(Overflow::default());
        (
            Self {
                tx,
                overflow: overflow.clone(),
            },
            rx,
            overflow,
        )
    }

    /// Queues a frame without waiting. A full queue flags the session as a slow consumer.
    pub fn push(&self, frame: Bytes) -> bool {
        match self.tx.try_send(frame) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.overflow.set();
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
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

struct Entry {
    filter: String,
    shared: bool,
    subscribers: Vec<Subscriber>,
    next: AtomicUsize,
}

/// A one-shot read of a retained message: subscribed until the first message arrives.
struct Fetch {
    filter: String,
    waiters: Vec<oneshot::Sender<Bytes>>,
}

#[derive(Default)]
struct Table {
    by_filter: HashMap<String, usize>,
    entries: HashMap<usize, Entry>,
    fetch_by_filter: HashMap<String, usize>,
    fetches: HashMap<usize, Fetch>,
    next_id: usize,
}

impl Table {
    fn allocate_id(&mut self) -> Option<usize> {
        // Ids cycle through 1..=MAX; a live id is skipped. With at most MAX live entries this
        // always terminates; the bound is what MQTT 5 allows.
        for _ in 0..MAX_SUBSCRIPTION_ID {
            self.next_id = self.next_id % MAX_SUBSCRIPTION_ID + 1;
            if !self.entries.contains_key(&self.next_id)
                && !self.fetches.contains_key(&self.next_id)
            {
                return Some(self.next_id);
            }
        }
        None
    }
}

/// The process-wide router.
pub struct Router {
    store: Arc<PolicyStore>,
    layout: TopicLayout,
    pool: OnceLock<Arc<Pool>>,
    table: RwLock<Table>,
    /// Messages that arrived for no live entry (raced with an unsubscribe), for diagnostics.
    pub orphans: AtomicUsize,
}

impl std::fmt::Debug for Router {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Router")
            .field("filters", &self.filter_count())
            .finish_non_exhaustive()
    }
}

impl Router {
    pub fn new(store: Arc<PolicyStore>) -> Arc<Self> {
        let layout = store.settings().upstream.layout.clone();
        Arc::new(Self {
            store,
            layout,
            pool: OnceLock::new(),
            table: RwLock::new(Table::default()),
            orphans: AtomicUsize::new(0),
        })
    }

    /// Connects the router to the pool it subscribes through (once, at start-up).
    pub fn attach(&self, pool: Arc<Pool>) {
        let _ = self.pool.set(pool);
    }

    pub fn layout(&self) -> &TopicLayout {
        &self.layout
    }

    /// Distinct upstream filters with local subscribers.
    pub fn filter_count(&self) -> usize {
        self.table.read().entries.len()
    }

    /// Makes `sub`'s subscriptions (its session and client string) exactly `filters`: new
    /// filters are added first, then filters no longer wanted are left, so that switching
    /// filters (or between broadcast and load-balanced) loses no message and does not churn
    /// an upstream subscription both sets share. Existing entries get `sub`'s current actor.
    pub fn replace(&self, filters: &[String], qos: u8, sub: &Subscriber) -> bool {
        let mut t = self.table.write();
        let mut subscribe_upstream = Vec::new();
        for f in filters {
            let id = match t.by_filter.get(f) {
                Some(id) => *id,
                None => {
                    let Some(id) = t.allocate_id() else {
                        return false;
                    };
                    t.by_filter.insert(f.clone(), id);
                    t.entries.insert(
                        id,
                        Entry {
                            filter: f.clone(),
                            shared: f.starts_with("$share/"),
                            subscribers: Vec::new(),
                            next: AtomicUsize::new(0),
                        },
                    );
                    subscribe_upstream.push((f.clone(), id));
                    id
                }
            };
            if let Some(e) = t.entries.get_mut(&id) {
                match e
                    .subscribers
                    .iter_mut()
                    .find(|s| s.session == sub.session && s.topic == sub.topic)
                {
                    Some(existing) => *existing = sub.clone(),
                    None => e.subscribers.push(sub.clone()),
                }
            }
        }
        if let Some(pool) = self.pool.get() {
            for (f, id) in subscribe_upstream {
                pool.subscribe(&f, crate::upstream::qos(qos), id);
            }
        }
        // Leave the filters of this subscription that are no longer wanted.
        let mut emptied = Vec::new();
        for (id, e) in t.entries.iter_mut() {
            if filters.contains(&e.filter) {
                continue;
            }
            e.subscribers
                .retain(|s| !(s.session == sub.session && s.topic == sub.topic));
            if e.subscribers.is_empty() {
                emptied.push(*id);
            }
        }
        self.drop_entries(&mut t, emptied);
        true
    }

    fn drop_entries(&self, t: &mut Table, ids: Vec<usize>) {
        for id in ids {
            if let Some(e) = t.entries.remove(&id) {
                t.by_filter.remove(&e.filter);
                if let Some(pool) = self.pool.get() {
                    pool.unsubscribe(&e.filter);
                }
            }
        }
    }

    /// Removes the subscriptions of `session` whose client string is `topic` (all of them
    /// when `topic` is `None`).
    pub fn remove(&self, session: SessionId, topic: Option<&str>) {
        let mut t = self.table.write();
        let mut emptied = Vec::new();
        for (id, e) in t.entries.iter_mut() {
            e.subscribers
                .retain(|s| !(s.session == session && topic.is_none_or(|tp| *s.topic == *tp)));
            if e.subscribers.is_empty() {
                emptied.push(*id);
            }
        }
        self.drop_entries(&mut t, emptied);
    }

    /// Reads the retained message of `filter` (an exact topic): subscribes, waits up to
    /// `timeout` for the broker to send it, unsubscribes. `None` when there is none (a broker
    /// sends nothing for a topic without a retained message) or it did not come in time.
    pub async fn fetch_retained(
        &self,
        filter: &str,
        timeout: std::time::Duration,
    ) -> Option<Bytes> {
        let (tx, rx) = oneshot::channel();
        {
            let mut t = self.table.write();
            match t.fetch_by_filter.get(filter).copied() {
                Some(id) => {
                    if let Some(f) = t.fetches.get_mut(&id) {
                        f.waiters.push(tx);
                    }
                }
                None => {
                    let id = t.allocate_id()?;
                    t.fetch_by_filter.insert(filter.to_string(), id);
                    t.fetches.insert(
                        id,
                        Fetch {
                            filter: filter.to_string(),
                            waiters: vec![tx],
                        },
                    );
                    if let Some(pool) = self.pool.get() {
                        pool.subscribe(filter, crate::upstream::qos(1), id);
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
            let mut t = self.table.write();
            if let Some(id) = t.fetch_by_filter.get(filter).copied()
                && let Some(f) = t.fetches.get_mut(&id)
            {
                f.waiters.retain(|w| !w.is_closed());
                if f.waiters.is_empty() {
                    t.fetches.remove(&id);
                    t.fetch_by_filter.remove(filter);
                    if let Some(pool) = self.pool.get() {
                        pool.unsubscribe(filter);
                    }
                }
            }
        }
        got
    }

    /// Completes the fetches a message is for; returns whether it was for one.
    fn complete_fetches(&self, ids: &[usize], payload: &Bytes) -> bool {
        if self.table.read().fetches.is_empty() {
            return false;
        }
        let mut t = self.table.write();
        let mut any = false;
        for id in ids {
            if let Some(f) = t.fetches.remove(id) {
                any = true;
                t.fetch_by_filter.remove(&f.filter);
                if let Some(pool) = self.pool.get() {
                    pool.unsubscribe(&f.filter);
                }
                for w in f.waiters {
                    let _ = w.send(payload.clone());
                }
            }
        }
        any
    }

    fn deliver(&self, topic: &str, ids: &[usize], payload: Bytes) {
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
        let allowed = |s: &Subscriber| {
            sender != Some(&*s.socket_id)
                && (!s.check_delivery || policy.authorize_delivery(&s.actor, client_topic))
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
        let t = self.table.read();
        let mut found = false;
        for id in ids {
            let Some(e) = t.entries.get(id) else { continue };
            found = true;
            if e.shared {
                // One local member per message, round-robin over those allowed to have it.
                let n = e.subscribers.len();
                let start = e.next.fetch_add(1, Ordering::Relaxed);
                if let Some(s) = (0..n)
                    .map(|i| &e.subscribers[(start + i) % n])
                    .find(|s| allowed(s))
                {
                    s.outbox.push(frame_for(&s.topic));
                }
            } else {
                for s in e.subscribers.iter().filter(|s| allowed(s)) {
                    s.outbox.push(frame_for(&s.topic));
                }
            }
        }
        if !found {
            self.orphans.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl Dispatch for Router {
    fn dispatch(&self, topic: &str, subscription_ids: &[usize], payload: Bytes) {
        self.deliver(topic, subscription_ids, payload);
    }
}
