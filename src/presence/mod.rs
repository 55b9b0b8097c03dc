//! Room presence and lobbies (DESIGN §9, PROTOCOL §11–§12), correct across replicas.
//!
//! - [`core`]: the replica's presence state as a sans-IO machine (local connections, what
//!   every other replica announced, the merged per-actor view, replication rules);
//! - [`message`]: what replicas publish to each other on the reserved topics;
//! - [`frames`]: the client frames (events, lists, lobby frames).
//!
//! [`Presence`] is the replica-wide service around the core: sessions call it (through
//! `server::session::machine`) to enter a room, list one, follow a lobby, and leave; it turns
//! the core's events into frames — encoded once per distinct frame, pushed to the listeners'
//! outboxes without waiting — and its messages into publishes on
//! `[prefix/]_/presence/v1/<replica>`. It subscribes `[prefix/]_/presence/v1/+` with a
//! reserved subscription id (the router hands those messages here), and its last will, set on
//! the pool connection that carries its messages, tells the others when it dies.
//!
//! One mutex guards the state; no I/O, encoding of fan-out frames or `.await` happens under
//! it, and presence frames are rate-limited per connection, so its hold times are bounded by
//! the size of one change (O(the actor's connections), plus the lists a `getPresence` asks
//! for). A ticker (every [`TICK`]) expires lingering connections and silent replicas,
//! heartbeats and answers sync requests; a flusher publishes pending ops in batches; the
//! presence task applies what the broker sends, which the pool's event loop (shared by every
//! tenant's deliveries) only queues (at most 64 MiB; beyond, a message is dropped and the
//! gap repaired).

pub mod core;
pub mod frames;
pub mod message;
#[cfg(test)]
mod sim_tests;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::sync::Notify;

use crate::config::PresenceSettings;
use crate::router::Outbox;
use crate::topic::upstream::TopicLayout;
use crate::upstream::Pool;
use core::{ConnId, Core, Effects, Event, EventKind, Refusal, RoomKey};
pub use frames::LobbyView;

/// How often the ticker runs: the resolution of the grace period and of replica timeouts.
pub const TICK: Duration = Duration::from_millis(100);
/// Least time between two delta publishes: ops of a burst (a join storm) share messages.
const FLUSH_PAUSE: Duration = Duration::from_millis(5);
/// A stale listener gets its room's list once no event was dropped in the room for this long…
const RESYNC_QUIET: Duration = Duration::from_millis(500);
/// …or once it has been stale this long, whatever the room does.
const RESYNC_AT_LEAST: Duration = Duration::from_secs(5);

/// A room whose list is larger than this is not resynced by pushing it: a list is O(members)
/// bytes per listener, and each connection's write buffer keeps the capacity of the largest
/// frame it wrote (a 5,000-member storm resynced with 300 KB lists reached 1.1 GB RSS). Its
/// members repair their map with `getPresence` (`room.fetchPresence()`).
const RESYNC_MAX_LIST_BYTES: usize = 64 << 10;
/// List bytes queued per tick at most, replica-wide.
const RESYNC_BYTES_PER_TICK: usize = 4 << 20;

/// Room listeners that missed events, and when each room last dropped one.
#[derive(Default)]
struct StaleListeners {
    /// (room, connection) → when it first missed an event.
    missed: HashMap<(RoomKey, ConnId), tokio::time::Instant>,
    dropped_at: HashMap<RoomKey, tokio::time::Instant>,
}

/// Bytes of broker messages waiting for the presence task at most.
const INBOX_BYTES: usize = 64 << 20;
/// The reserved subscription id of the presence filter (lane 63, sequence 0: never a router
/// entry, never a retained fetch).
pub const SUBSCRIPTION_ID: usize = crate::router::SHARDS;

/// (project, app, scope): the namespace a lobby's rooms live in.
type AppKey = (Arc<str>, Arc<str>, Option<Arc<str>>);

struct LobbyListener {
    rooms: HashSet<Arc<str>>,
    outbox: Outbox,
}

#[derive(Default)]
struct Listeners {
    rooms: HashMap<RoomKey, HashMap<ConnId, Outbox>>,
    /// Per app namespace: (connection, lobby slug) → what it follows.
    lobbies: HashMap<AppKey, HashMap<(ConnId, Arc<str>), LobbyListener>>,
    /// Per connection, the lobbies it follows: a close costs O(its own lobbies).
    lobbies_of: HashMap<ConnId, Vec<(AppKey, Arc<str>)>>,
}

/// Removes one lobby subscription of `conn` (and the app's entry when it was the last).
fn unlisten(
    lobbies: &mut HashMap<AppKey, HashMap<(ConnId, Arc<str>), LobbyListener>>,
    app: &AppKey,
    conn: ConnId,
    slug: &Arc<str>,
) {
    if let Some(subs) = lobbies.get_mut(app) {
        subs.remove(&(conn, slug.clone()));
        if subs.is_empty() {
            lobbies.remove(app);
        }
    }
}

impl Listeners {
    fn leave_room(&mut self, room: &RoomKey, conn: ConnId) {
        if let Some(l) = self.rooms.get_mut(room) {
            l.remove(&conn);
            if l.is_empty() {
                self.rooms.remove(room);
            }
        }
    }

    fn remove_lobby(&mut self, conn: ConnId, slug: &str) {
        let Some(mine) = self.lobbies_of.get_mut(&conn) else {
            return;
        };
        mine.retain(|(app, s)| {
            if &**s != slug {
                return true;
            }
            unlisten(&mut self.lobbies, app, conn, s);
            false
        });
        if mine.is_empty() {
            self.lobbies_of.remove(&conn);
        }
    }

    fn remove_lobbies(&mut self, conn: ConnId) {
        for (app, slug) in self.lobbies_of.remove(&conn).unwrap_or_default() {
            unlisten(&mut self.lobbies, &app, conn, &slug);
        }
    }
}

struct State {
    core: Core,
    listeners: Listeners,
}

/// The replica's presence service.
pub struct Presence {
    state: Mutex<State>,
    topic: String,
    filter: String,
    pool: OnceLock<Arc<Pool>>,
    /// Where joins and leaves are reported to the backend (DESIGN §10).
    webhooks: OnceLock<Arc<crate::webhook::Webhooks>>,
    flush: Arc<Notify>,
    settings: PresenceSettings,
    /// Messages from the broker, for the task that applies them: the pool's event loop
    /// (shared by every tenant's deliveries) only queues them. Bounded in bytes
    /// ([`INBOX_BYTES`]): beyond it a message is dropped, which the replicas repair as a gap.
    inbox: tokio::sync::mpsc::UnboundedSender<Bytes>,
    inbox_rx: Mutex<Option<tokio::sync::mpsc::UnboundedReceiver<Bytes>>>,
    inbox_bytes: Arc<std::sync::atomic::AtomicUsize>,
    /// Room listeners that missed an event: their list follows once the room is quiet.
    stale: Mutex<StaleListeners>,
    /// Stale room listeners not resynced because the room's list is too large.
    pub resyncs_skipped: std::sync::atomic::AtomicU64,
    /// Lobby events not queued because the connection's queue was half full.
    pub lobby_events_dropped: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for Presence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Presence")
            .field("topic", &self.topic)
            .finish_non_exhaustive()
    }
}

/// Unix milliseconds.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A fresh incarnation id: the start time in ms, with random low bits (two starts in one
/// millisecond still differ). Later starts compare greater.
pub fn incarnation() -> u64 {
    let mut b = [0u8; 2];
    let _ = getrandom::fill(&mut b);
    (now_ms() << 16) | u64::from(u16::from_le_bytes(b))
}

impl Presence {
    /// The service for replica `replica_id`; its will (for the pool connection that
    /// carries `topic`) is [`Presence::will`]. Publishing starts with [`Presence::attach`].
    pub fn new(
        settings: &PresenceSettings,
        replica_id: &str,
        layout: &TopicLayout,
        max_message_bytes: usize,
    ) -> Arc<Self> {
        let cfg = core::Config {
            replica: replica_id.into(),
            incarnation: incarnation(),
            heartbeat_ms: settings.heartbeat.as_millis() as u64,
            replica_timeout_ms: settings.replica_timeout.as_millis() as u64,
            grace_ms: settings.grace.as_millis() as u64,
            sync_retry_ms: (settings.heartbeat.as_millis() as u64).max(500),
            // A late starter waits at most this (plus the broker's round trip) for everyone.
            snapshot_interval_ms: 250,
            max_room_members: settings.max_room_members,
            max_state_bytes: settings.max_state_bytes,
            max_message_bytes: max_message_bytes.clamp(4096, 256 << 10),
            max_replicas: 1024,
        };
        let (inbox, inbox_rx) = tokio::sync::mpsc::unbounded_channel();
        Arc::new(Self {
            topic: layout.presence_topic(replica_id),
            filter: layout.presence_filter(),
            state: Mutex::new(State {
                core: Core::new(cfg),
                listeners: Listeners::default(),
            }),
            pool: OnceLock::new(),
            webhooks: OnceLock::new(),
            flush: Arc::new(Notify::new()),
            settings: settings.clone(),
            inbox,
            inbox_rx: Mutex::new(Some(inbox_rx)),
            inbox_bytes: Arc::new(std::sync::atomic::AtomicUsize::new(0)),
            stale: Mutex::new(StaleListeners::default()),
            lobby_events_dropped: std::sync::atomic::AtomicU64::new(0),
            resyncs_skipped: std::sync::atomic::AtomicU64::new(0),
        })
    }

    pub fn settings(&self) -> &PresenceSettings {
        &self.settings
    }

    /// This replica's id (`presence.replica_id`, or the one derived at start-up).
    pub fn replica_id(&self) -> Arc<str> {
        self.state.lock().core.config().replica.clone()
    }

    /// This process's incarnation (later starts of the replica id compare greater).
    pub fn incarnation(&self) -> u64 {
        self.state.lock().core.config().incarnation
    }

    /// Reports joins and leaves through `webhooks` from now on.
    pub fn attach_webhooks(&self, webhooks: Arc<crate::webhook::Webhooks>) {
        let _ = self.webhooks.set(webhooks);
    }

    /// Hands the joins and leaves this replica reports to the webhooks (outside the lock).
    fn report(&self, fx: &Effects) {
        if let Some(w) = self.webhooks.get() {
            let reported = fx.events.iter().filter(|e| e.origin.reported_here());
            for e in reported.chain(&fx.reports) {
                w.presence(e);
            }
        }
    }

    /// The topic this replica publishes on.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// The last will: `Gone` for this incarnation.
    pub fn will(&self) -> Bytes {
        self.state.lock().core.will().encode()
    }

    /// Starts publishing through `pool`, subscribes the presence filter and runs the ticker
    /// and the flusher. Must be called inside a Tokio runtime.
    pub fn attach(self: &Arc<Self>, pool: Arc<Pool>) {
        let filter: Arc<str> = self.filter.as_str().into();
        pool.subscribe(&filter, SUBSCRIPTION_ID);
        let _ = self.pool.set(pool);
        if let Some(mut rx) = self.inbox_rx.lock().take() {
            let weak = Arc::downgrade(self);
            tokio::spawn(async move {
                while let Some(payload) = rx.recv().await {
                    let Some(p) = weak.upgrade() else { return };
                    p.inbox_bytes
                        .fetch_sub(payload.len(), std::sync::atomic::Ordering::AcqRel);
                    p.apply_upstream(&payload);
                }
            });
        }
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(TICK);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(p) = weak.upgrade() else { return };
                p.run(|core, fx| core.tick(now_ms(), fx));
                p.resync_stale();
            }
        });
        let weak = Arc::downgrade(self);
        let flush = self.flush.clone();
        tokio::spawn(async move {
            loop {
                flush.notified().await;
                let Some(p) = weak.upgrade() else { return };
                p.run(|core, fx| core.flush(fx));
                drop(p);
                tokio::time::sleep(FLUSH_PAUSE).await;
            }
        });
    }

    /// Runs `f` on the core under the lock, then delivers its effects outside it.
    fn run<R>(&self, f: impl FnOnce(&mut Core, &mut Effects) -> R) -> R {
        let mut fx = Effects::default();
        let (r, deliveries) = {
            let mut st = self.state.lock();
            let r = f(&mut st.core, &mut fx);
            let deliveries = route(&st.listeners, &fx.events);
            (r, deliveries)
        };
        self.deliver(deliveries);
        self.report(&fx);
        self.publish(fx.messages);
        r
    }

    fn publish(&self, messages: Vec<message::Message>) {
        if messages.is_empty() {
            return;
        }
        let Some(pool) = self.pool.get() else {
            return;
        };
        for m in messages {
            // A refused publish (saturated pool) is a gap the others see and repair by
            // asking for a snapshot.
            if let Err(e) = pool.publish(
                self.topic.clone(),
                crate::upstream::qos(1),
                false,
                m.encode(),
                None,
            ) {
                tracing::debug!(error = %e, "presence message not published");
            }
        }
    }

    /// The broker answered the presence subscription (after every connect): when granted,
    /// say hello, so that every replica sends its snapshot.
    pub fn on_subscribed(&self, granted: bool) {
        if granted {
            self.run(|core, fx| core.hello(fx));
        } else {
            tracing::error!(filter = %self.filter, "the broker refused the presence subscription: presence is local to this replica");
        }
    }

    /// A message from the broker on the presence filter.
    /// Called on the pool's event loop: never waits, never runs presence logic there.
    pub fn on_upstream(&self, payload: Bytes) {
        use std::sync::atomic::Ordering;
        let len = payload.len();
        if self.inbox_bytes.fetch_add(len, Ordering::AcqRel) + len > INBOX_BYTES {
            self.inbox_bytes.fetch_sub(len, Ordering::AcqRel);
            tracing::warn!(
                "presence inbox full: a message from the broker was dropped (repaired as a gap)"
            );
            return;
        }
        if self.inbox.send(payload).is_err() {
            self.inbox_bytes.fetch_sub(len, Ordering::AcqRel);
        }
    }

    /// Applies one message from the broker (on the presence task).
    fn apply_upstream(&self, payload: &[u8]) {
        match message::Message::decode(payload) {
            Ok(m) => self.run(|core, fx| core.on_message(m, now_ms(), fx)),
            Err(e) => tracing::debug!(error = %e, "presence message ignored"),
        }
    }

    /// Connection `conn` (whose frames go to `outbox`) of `actor` is in `room` with `data`.
    /// Returns the frames for the connection itself that the events do not carry: its own
    /// `join` and `update` when it enters a room where its actor was already present.
    pub fn set(
        &self,
        conn: ConnId,
        outbox: &Outbox,
        room: RoomKey,
        actor: &Arc<str>,
        data: Bytes,
    ) -> Result<Vec<Bytes>, Refusal> {
        let now = now_ms();
        let mut fx = Effects::default();
        let (outcome, member, deliveries) = {
            let mut st = self.state.lock();
            let st = &mut *st;
            let previous = st.core.room_of(conn).cloned();
            let outcome = st
                .core
                .set(conn, room.clone(), actor.clone(), data, now, &mut fx)?;
            if let Some(prev) = previous.filter(|p| *p != room) {
                st.listeners.leave_room(&prev, conn);
            }
            // Listening from now on: the events below (join, update) include the sender.
            st.listeners
                .rooms
                .entry(room.clone())
                .or_default()
                .insert(conn, outbox.clone());
            let member = st.core.member(&room, actor);
            (outcome, member, route(&st.listeners, &fx.events))
        };
        self.deliver(deliveries);
        self.report(&fx);
        self.flush.notify_one();
        let mut own = Vec::new();
        if outcome.entered
            && !outcome.announced_join
            && let Some(m) = member
        {
            own.push(frames::event(EventKind::Join, actor, Some(&m)));
            own.push(frames::event(EventKind::Update, actor, Some(&m)));
        }
        Ok(own)
    }

    /// Connection `conn` leaves its room: at once, or after the grace period when `linger`
    /// (an abnormal close).
    pub fn leave(&self, conn: ConnId, linger: bool) {
        self.end(conn, linger, false);
    }

    /// Connection `conn` closed: it leaves its room ([`Presence::leave`]) and every lobby.
    pub fn close(&self, conn: ConnId, linger: bool) {
        self.end(conn, linger, true);
    }

    fn end(&self, conn: ConnId, linger: bool, lobbies: bool) {
        let now = now_ms();
        let mut fx = Effects::default();
        let deliveries = {
            let mut st = self.state.lock();
            let st = &mut *st;
            if let Some(room) = st.core.room_of(conn).cloned() {
                st.listeners.leave_room(&room, conn);
            }
            if lobbies {
                st.listeners.remove_lobbies(conn);
            }
            st.core.close(conn, linger, now, &mut fx);
            route(&st.listeners, &fx.events)
        };
        self.deliver(deliveries);
        self.report(&fx);
        self.flush.notify_one();
        self.publish(fx.messages);
    }

    /// The members of `room`.
    pub fn members(&self, room: &RoomKey) -> core::Members {
        self.state.lock().core.members(room)
    }

    /// The room connection `conn` is in.
    pub fn room_of(&self, conn: ConnId) -> Option<RoomKey> {
        self.state.lock().core.room_of(conn).cloned()
    }

    /// The members of each of `rooms` of app `key`.
    pub fn lobby_view(&self, key: &RoomKey, rooms: &[Arc<str>]) -> LobbyView {
        view(&self.state.lock().core, key, rooms)
    }

    /// Follows lobby `slug` (rooms of `key`'s app and namespace) and returns its current view.
    /// `key.room` is ignored. Subscribing again replaces the room set.
    pub fn lobby_subscribe(
        &self,
        conn: ConnId,
        outbox: &Outbox,
        key: &RoomKey,
        slug: &Arc<str>,
        rooms: &[Arc<str>],
    ) -> LobbyView {
        let mut st = self.state.lock();
        let app: AppKey = (key.project.clone(), key.app.clone(), key.scope.clone());
        st.listeners.remove_lobby(conn, slug);
        st.listeners.lobbies.entry(app.clone()).or_default().insert(
            (conn, slug.clone()),
            LobbyListener {
                rooms: rooms.iter().cloned().collect(),
                outbox: outbox.clone(),
            },
        );
        st.listeners
            .lobbies_of
            .entry(conn)
            .or_default()
            .push((app, slug.clone()));
        view(&st.core, key, rooms)
    }

    /// Stops following lobby `slug`.
    pub fn lobby_unsubscribe(&self, conn: ConnId, slug: &str) {
        self.state.lock().listeners.remove_lobby(conn, slug);
    }

    /// A graceful drain: every member of this replica leaves, and one goodbye tells the
    /// others at once (instead of their timeout).
    pub fn goodbye(&self) {
        let mut fx = Effects::default();
        let (bye, deliveries) = {
            let mut st = self.state.lock();
            let bye = st.core.goodbye(now_ms(), &mut fx);
            (bye, route(&st.listeners, &fx.events))
        };
        self.deliver(deliveries);
        self.report(&fx);
        fx.messages.push(bye);
        self.publish(fx.messages);
    }

    /// Replicas heard from and alive, besides this one.
    pub fn live_replicas(&self) -> usize {
        self.state.lock().core.live_replicas()
    }

    /// Presence's share of the scrape-time metrics (one short lock).
    pub fn metrics(&self) -> crate::metrics::PresenceState {
        let (local_connections, members, replicas, state_bytes, ops_dropped) = {
            let st = self.state.lock();
            let (local, merged) = st.core.sizes();
            (
                local,
                merged,
                st.core.live_replicas(),
                st.core.state_bytes(),
                st.core.dropped_ops,
            )
        };
        crate::metrics::PresenceState {
            local_connections,
            members,
            replicas,
            state_bytes,
            lobby_events_dropped: self
                .lobby_events_dropped
                .load(std::sync::atomic::Ordering::Relaxed),
            resyncs_skipped: self
                .resyncs_skipped
                .load(std::sync::atomic::Ordering::Relaxed),
            ops_dropped,
        }
    }
}

/// The members of each of `rooms` of `key`'s app namespace (`key.room` is ignored).
fn view(core: &Core, key: &RoomKey, rooms: &[Arc<str>]) -> LobbyView {
    rooms
        .iter()
        .map(|r| {
            let room = RoomKey {
                room: r.clone(),
                ..key.clone()
            };
            (r.clone(), core.members(&room))
        })
        .collect()
}

/// Who gets one event: the room's listeners, and the lobby listeners following the room.
struct Targets {
    event: Event,
    room: Vec<(ConnId, Outbox)>,
    lobbies: Vec<(Arc<str>, Outbox)>,
}

/// The listeners of each event (under the lock: clones of their outboxes, no encoding).
fn route(listeners: &Listeners, events: &[Event]) -> Vec<Targets> {
    let mut out = Vec::with_capacity(events.len());
    for e in events {
        let room = listeners
            .rooms
            .get(&e.room)
            .map(|r| r.iter().map(|(c, o)| (*c, o.clone())).collect())
            .unwrap_or_default();
        let app: AppKey = (
            e.room.project.clone(),
            e.room.app.clone(),
            e.room.scope.clone(),
        );
        let lobbies = listeners
            .lobbies
            .get(&app)
            .map(|subs| {
                subs.iter()
                    .filter(|(_, s)| s.rooms.contains(&e.room.room))
                    .map(|((_, slug), s)| (slug.clone(), s.outbox.clone()))
                    .collect()
            })
            .unwrap_or_default();
        out.push(Targets {
            event: e.clone(),
            room,
            lobbies,
        });
    }
    out
}

impl Presence {
    /// Encodes each distinct frame once and offers it to its listeners, without waiting.
    /// Presence never fills a connection's queue: an event that does not fit in the half
    /// of the queue it may use ([`Outbox::offer`]) is dropped, and the room's `presenceList`
    /// (which replaces the SDK's map) follows on a later tick — so a join storm in a large
    /// room neither disconnects its members as slow consumers nor crowds out their messages.
    fn deliver(&self, targets: Vec<Targets>) {
        let mut stale = Vec::new();
        for t in targets {
            let e = &t.event;
            if !t.room.is_empty() {
                let frame = frames::event(e.kind, &e.actor, e.member.as_ref());
                for (conn, o) in &t.room {
                    if !o.offer(frame.clone()) {
                        stale.push((e.room.clone(), *conn));
                    }
                }
            }
            let mut by_slug: HashMap<&str, Bytes> = HashMap::new();
            for (slug, o) in &t.lobbies {
                let frame = by_slug
                    .entry(slug)
                    .or_insert_with(|| {
                        frames::lobby_event(e.kind, slug, &e.room.room, &e.actor, e.member.as_ref())
                    })
                    .clone();
                if !o.offer(frame) {
                    // The SDK has no frame that replaces a lobby's view: counted, logged.
                    self.lobby_events_dropped
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            }
        }
        if !stale.is_empty() {
            let now = tokio::time::Instant::now();
            let mut s = self.stale.lock();
            for (room, conn) in stale {
                s.dropped_at.insert(room.clone(), now);
                s.missed.entry((room, conn)).or_insert(now);
            }
        }
    }

    /// Sends the room list to the listeners that missed events (on the ticker). A list is
    /// O(members) bytes, so it is sent once the room's storm is over — no event dropped in it
    /// for [`RESYNC_QUIET`], or the listener stale for [`RESYNC_AT_LEAST`] — only into an
    /// empty queue, within [`RESYNC_BYTES_PER_TICK`], and never for a room whose list is over
    /// [`RESYNC_MAX_LIST_BYTES`]: during a storm in a large room, repairing every member with
    /// lists would cost as much as the events it replaces.
    fn resync_stale(&self) {
        let now = tokio::time::Instant::now();
        let due: Vec<(RoomKey, ConnId)> = {
            let mut s = self.stale.lock();
            if s.missed.is_empty() {
                return;
            }
            let StaleListeners { missed, dropped_at } = &mut *s;
            dropped_at.retain(|_, at| now.duration_since(*at) < RESYNC_AT_LEAST);
            missed
                .iter()
                .filter(|((room, _), since)| {
                    now.duration_since(**since) >= RESYNC_AT_LEAST
                        || dropped_at
                            .get(room)
                            .is_none_or(|at| now.duration_since(*at) >= RESYNC_QUIET)
                })
                .map(|(k, _)| k.clone())
                .collect()
        };
        let mut lists: HashMap<RoomKey, Bytes> = HashMap::new();
        let mut budget = RESYNC_BYTES_PER_TICK;
        for (room, conn) in due {
            let outbox = {
                let st = self.state.lock();
                st.listeners
                    .rooms
                    .get(&room)
                    .and_then(|r| r.get(&conn))
                    .cloned()
            };
            let Some(outbox) = outbox else {
                // Left the room meanwhile.
                self.stale.lock().missed.remove(&(room, conn));
                continue;
            };
            if !outbox.is_empty() {
                continue; // next tick
            }
            let frame = match lists.get(&room) {
                Some(f) => f.clone(),
                None => {
                    let members = self.members(&room);
                    let f = frames::list(Some(&room.room), &members);
                    lists.insert(room.clone(), f.clone());
                    f
                }
            };
            if frame.len() > RESYNC_MAX_LIST_BYTES {
                self.stale.lock().missed.remove(&(room, conn));
                self.resyncs_skipped
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                continue;
            }
            if frame.len() > budget {
                break; // the rest on later ticks
            }
            if outbox.offer(frame.clone()) {
                budget -= frame.len();
                self.stale.lock().missed.remove(&(room, conn));
            }
        }
    }
}
