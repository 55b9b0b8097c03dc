//! The presence state of one replica, with no socket, task or clock: every input carries the
//! time (`now`, unix milliseconds) and every effect is returned — the [`Event`]s local
//! listeners must see and the [`Message`]s to publish to the other replicas. The service
//! (`super`) wraps it in a mutex, a ticker and the broker; the simulation test
//! (`super::sim_tests`) runs several of them over a lossy in-memory network.
//!
//! What it holds:
//! - **local connections** (`conns`): which room each of this replica's connections is in,
//!   with its presence data; a connection closed abnormally lingers `grace` first;
//! - **local members** (`local`): per room, the actors this replica announces — an actor is
//!   present while any of its connections is (or lingers), with the data of its most
//!   recently updated connection;
//! - **remote members** (`remotes`): per other replica, what it announced, tagged with its
//!   incarnation and the sequence number of the last message applied.
//!
//! A room's members are the union over all sources, per actor (the SDK keys members by
//! actor): the earliest `joined_at`, the data of the latest update. Events are the changes of
//! that merged view — `join` (followed by `update`, PROTOCOL A8) when an actor appears
//! anywhere, `update` when its data changes, `leave` when it is gone everywhere — so an actor
//! with two connections, on one replica or two, never joins twice and never leaves while
//! still connected somewhere.
//!
//! Replication (DESIGN §9): each replica is the only writer of its members. It publishes
//! ordered deltas (`seq` + 1 per message, state-based ops: "actor X in room R has data D" /
//! "is gone"), a heartbeat carrying its last `seq`, and on request a snapshot of everything it
//! holds. A receiver applies a delta newer than the last one it applied; a gap (a lost
//! message, seen from a later delta or a heartbeat) makes it ask that replica for a snapshot,
//! which replaces what it held. A newer incarnation of a replica (a restart) replaces the
//! older one's members at once; messages of an older incarnation are ignored. A replica not
//! heard from for `replica_timeout`, or whose last will (or goodbye) arrives, has its members
//! removed. A replica that hears its own will while alive re-announces itself with a
//! snapshot, so a dropped broker connection heals.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;

use super::message::{Body, Message, Op};

/// A local connection (the router's session id).
pub type ConnId = u64;

/// One room's presence namespace. The project and the scope are part of the key: members of
/// one namespace can never be listed or announced in another (DESIGN §4).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RoomKey {
    pub project: Arc<str>,
    pub app: Arc<str>,
    /// `None`: the unscoped namespace.
    pub scope: Option<Arc<str>>,
    pub room: Arc<str>,
}

impl RoomKey {
    /// Bytes this key costs in the state bound.
    fn cost(&self) -> usize {
        self.project.len()
            + self.app.len()
            + self.scope.as_deref().map_or(0, str::len)
            + self.room.len()
            + 64
    }
}

/// An actor's presence in a room.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// The client's `data`, MessagePack passed through byte-exact.
    pub data: Bytes,
    /// Unix seconds (PROTOCOL §11).
    pub joined_at: u64,
    /// Unix milliseconds of the data: the latest wins when sources disagree.
    pub updated: u64,
}

impl Member {
    fn cost(&self, actor: &str) -> usize {
        self.data.len() + actor.len() + 64
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    Join,
    Update,
    Leave,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Join => "join",
            EventKind::Update => "update",
            EventKind::Leave => "leave",
        }
    }
}

/// A change of a room's merged membership, for the local listeners of that room.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub room: RoomKey,
    pub actor: Arc<str>,
    pub kind: EventKind,
    /// The member after the change; `None` for a leave.
    pub member: Option<Member>,
    /// What caused it: which replica reports it to the backend (webhooks, DESIGN §10).
    pub origin: Origin,
}

/// The cause of a presence [`Event`]. Every replica sees every change of the merged view;
/// one of them reports it to the backend (webhooks): the replica whose own connection caused
/// it ([`Origin::Local`]). The members of a replica that died, left or restarted cannot be
/// reported by it: their leaves are held by every survivor for a replica timeout (a replica
/// declared dead by a blip comes back within it, and nothing is reported), then reported by
/// the surviving replica with the lowest id that has been up for a replica timeout
/// ([`Effects::reports`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// A connection of this replica (a set, a close, an expired grace period).
    Local,
    /// A message of another, live replica: that replica reports it.
    Remote,
    /// Another replica's members removed because it died, left or restarted (reported later,
    /// if still true, through [`Effects::reports`]); `leader`: this replica reports it
    /// directly (a draining replica alone: nobody else will).
    Departed { leader: bool },
}

impl Origin {
    /// Whether this event is reported to the backend as it happens.
    pub fn reported_here(self) -> bool {
        matches!(self, Origin::Local | Origin::Departed { leader: true })
    }
}

/// Why a local presence change was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("the room has {0} members, the most presence.max_room_members allows")]
    RoomFull(usize),
    #[error("this replica holds presence.max_state_bytes of presence state")]
    StateFull,
    #[error("this replica is shutting down and has said goodbye")]
    Draining,
}

/// What a `set` did for the connection itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SetOutcome {
    /// The connection entered the room with this call (it was elsewhere, or nowhere).
    pub entered: bool,
    /// The events already contain a `join` for this actor (the actor was absent everywhere).
    pub announced_join: bool,
}

/// Timing and bounds of one replica.
#[derive(Debug, Clone)]
pub struct Config {
    /// Stable across restarts (a host name, a pod name): what a new incarnation supersedes.
    pub replica: Arc<str>,
    /// Grows with each start of `replica` (start time in ms, randomised low bits).
    pub incarnation: u64,
    pub heartbeat_ms: u64,
    /// A replica not heard from for this long is dead: its members leave.
    pub replica_timeout_ms: u64,
    /// How long a connection closed abnormally stays present (a reconnect absorbs it).
    pub grace_ms: u64,
    /// How often a replica asks again for a snapshot it has not received.
    pub sync_retry_ms: u64,
    /// At most one snapshot per this interval (sync requests in between are coalesced).
    pub snapshot_interval_ms: u64,
    pub max_room_members: usize,
    /// Bytes of presence state (local and remote) this replica holds at most.
    pub max_state_bytes: usize,
    /// Bytes of one published message at most (deltas and snapshots are cut to fit).
    pub max_message_bytes: usize,
    /// Other replicas tracked at most (dead ones are forgotten first).
    pub max_replicas: usize,
}

#[derive(Debug)]
struct LocalConn {
    room: RoomKey,
    actor: Arc<str>,
    data: Bytes,
    joined_at: u64,
    updated: u64,
    /// Closed abnormally: present until then.
    lingers_until: Option<u64>,
}

#[derive(Debug, Default)]
struct Remote {
    incarnation: u64,
    /// Sequence number of the last message applied.
    applied: u64,
    heard: u64,
    /// Removed (timed out or its will arrived): holds nothing until a snapshot revives it.
    dead: bool,
    /// When this incarnation was first heard from (or revived): a replica this fresh may not
    /// know another's members yet, so it is not trusted to report their departure.
    since: u64,
    /// A gap was seen: a snapshot is wanted. `Some(t)`: last asked at `t`.
    wants_sync: Option<u64>,
    members: HashMap<RoomKey, HashMap<Arc<str>, Member>>,
    /// The snapshot being received: its seq, the number of parts, the parts so far (by
    /// index: a duplicated part is not counted twice).
    assembling: Option<(u64, u32, std::collections::BTreeMap<u32, Vec<Op>>)>,
    /// Bytes of the parts so far: a snapshot larger than `max_state_bytes` is abandoned.
    assembling_bytes: usize,
    /// The latest deltas received, by seq (bounded by [`LOG_MESSAGES`] and [`LOG_BYTES`]): a
    /// snapshot older than what was applied meanwhile is rebased on them instead of being
    /// thrown away, so deltas that overtake a snapshot's parts cannot starve the repair.
    log: std::collections::BTreeMap<u64, Vec<Op>>,
    log_bytes: usize,
}

/// What snapshots may cost this replica's broker connection on average: after a snapshot of
/// `n` bytes the next waits `n / SNAPSHOT_BYTES_PER_SECOND` (and at least the configured
/// interval), however many replicas ask.
const SNAPSHOT_BYTES_PER_SECOND: usize = 8 << 20;

/// Departed members held for confirmation, at most (beyond, the oldest are given up).
const MAX_PENDING_DEPARTURES: usize = 100_000;

/// Deltas kept per replica for rebasing a snapshot, at most…
const LOG_MESSAGES: usize = 128;
/// …and at most this many bytes of them.
const LOG_BYTES: usize = 1 << 20;

/// Events and messages produced by one call.
#[derive(Debug, Default)]
pub struct Effects {
    pub events: Vec<Event>,
    pub messages: Vec<Message>,
    /// Departures confirmed now, for the backend only (the listeners saw them when they
    /// happened): leaves of a departed replica's members, still gone a replica timeout later.
    pub reports: Vec<Event>,
}

/// A room's merged members, sorted by actor id, shared.
pub type Members = Arc<Vec<(Arc<str>, Member)>>;

/// One room's members announced by this replica: actor → (member, its connections here).
type LocalMembers = HashMap<Arc<str>, (Member, Vec<ConnId>)>;

/// The presence state of one replica.
#[derive(Debug)]
pub struct Core {
    cfg: Config,
    /// Sequence number of the last message published.
    seq: u64,
    conns: HashMap<ConnId, LocalConn>,
    /// What this replica announces: room → actor → (member, its connections).
    local: HashMap<RoomKey, LocalMembers>,
    remotes: HashMap<Arc<str>, Remote>,
    /// Merged member count per room (for `max_room_members`).
    /// The merged view, kept as it changes: room → actor → member. Lists read it (and the
    /// cached, shared copy of it) instead of merging the sources again.
    merged: HashMap<RoomKey, std::collections::BTreeMap<Arc<str>, Member>>,
    /// Lists built since the room last changed (what a burst of `getPresence` shares).
    lists: std::cell::RefCell<HashMap<RoomKey, Members>>,
    state_bytes: usize,
    /// Ops not yet published.
    pending: Vec<Op>,
    last_heartbeat: u64,
    last_snapshot: Option<u64>,
    /// Bytes of the last snapshot: large ones space the next one out
    /// ([`SNAPSHOT_BYTES_PER_SECOND`]).
    last_snapshot_bytes: usize,
    snapshot_wanted: bool,
    /// Said goodbye (a drain): announces nothing more.
    gone: bool,
    /// Remote ops dropped because the state bound was reached (for the log and metrics).
    pub dropped_ops: u64,
    /// The time of the call being handled.
    clock: u64,
    /// The cause of the events being produced (set by each entry point).
    cause: Origin,
    /// While `cause` is a departure: the replica that departed.
    departing: Option<Arc<str>>,
    /// Leaves of departed replicas' members, held for confirmation (oldest first)…
    departures: std::collections::VecDeque<Departure>,
    /// …and those confirmed, left to another replica to report, still watched.
    handed_over: Vec<Departure>,
    /// What this replica last told the backend per member, and when (kept for a replica
    /// timeout, bounded).
    recent: HashMap<(RoomKey, Arc<str>), (bool, u64, u64)>,
}

/// A departed replica's member, gone from the merged view at `at`.
#[derive(Debug)]
struct Departure {
    at: u64,
    replica: Arc<str>,
    room: RoomKey,
    actor: Arc<str>,
    /// The member changed less than a heartbeat before its replica was last heard from: the
    /// designated reporter may not have heard of it, so this replica reports it too (a
    /// duplicate rather than a leave nobody reports).
    fresh: bool,
}

impl Core {
    pub fn new(cfg: Config) -> Self {
        Self {
            cfg,
            seq: 0,
            conns: HashMap::new(),
            local: HashMap::new(),
            remotes: HashMap::new(),
            merged: HashMap::new(),
            lists: std::cell::RefCell::new(HashMap::new()),
            state_bytes: 0,
            pending: Vec::new(),
            last_heartbeat: 0,
            last_snapshot: None,
            last_snapshot_bytes: 0,
            snapshot_wanted: false,
            dropped_ops: 0,
            gone: false,
            clock: 0,
            cause: Origin::Remote,
            departing: None,
            departures: std::collections::VecDeque::new(),
            handed_over: Vec::new(),
            recent: HashMap::new(),
        }
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Bytes of presence state held (local and remote).
    pub fn state_bytes(&self) -> usize {
        self.state_bytes
    }

    /// The room a local connection is in.
    pub fn room_of(&self, conn: ConnId) -> Option<&RoomKey> {
        self.conns.get(&conn).map(|c| &c.room)
    }

    /// The merged member of `actor` in `room`, if present anywhere.
    pub fn member(&self, room: &RoomKey, actor: &str) -> Option<Member> {
        let mut best: Option<Member> = None;
        let mut consider = |m: &Member| match &mut best {
            None => best = Some(m.clone()),
            Some(b) => {
                let joined_at = b.joined_at.min(m.joined_at);
                if m.updated > b.updated || (m.updated == b.updated && m.data > b.data) {
                    *b = m.clone();
                }
                b.joined_at = joined_at;
            }
        };
        if let Some((m, _)) = self.local.get(room).and_then(|r| r.get(actor)) {
            consider(m);
        }
        for remote in self.remotes.values() {
            if let Some(m) = remote.members.get(room).and_then(|r| r.get(actor)) {
                consider(m);
            }
        }
        best
    }

    /// Every member of `room`, merged, sorted by actor id: shared until the room changes, so
    /// lists cost O(members) once per change, not once per request.
    pub fn members(&self, room: &RoomKey) -> Members {
        if let Some(l) = self.lists.borrow().get(room) {
            return l.clone();
        }
        let list: Members = Arc::new(
            self.merged
                .get(room)
                .map(|m| m.iter().map(|(a, m)| (a.clone(), m.clone())).collect())
                .unwrap_or_default(),
        );
        if !list.is_empty() {
            self.lists.borrow_mut().insert(room.clone(), list.clone());
        }
        list
    }

    /// Number of members of `room` (merged).
    pub fn member_count(&self, room: &RoomKey) -> usize {
        self.merged.get(room).map_or(0, |m| m.len())
    }

    // ------------------------------------------------------------------------------------
    // Local changes.
    // ------------------------------------------------------------------------------------

    /// Connection `conn` of `actor` is in `room` with `data` (a `presence` frame). A
    /// connection is in one room at most: entering another leaves the previous one first.
    pub fn set(
        &mut self,
        conn: ConnId,
        room: RoomKey,
        actor: Arc<str>,
        data: Bytes,
        now: u64,
        fx: &mut Effects,
    ) -> Result<SetOutcome, Refusal> {
        self.clock = now;
        if self.gone {
            return Err(Refusal::Draining);
        }
        let same_room = self.conns.get(&conn).is_some_and(|c| c.room == room);
        let present = self.member(&room, &actor).is_some();
        if !present {
            let count = self.member_count(&room);
            if count >= self.cfg.max_room_members {
                return Err(Refusal::RoomFull(count));
            }
        }
        if self.state_bytes + data.len() + actor.len() + 64 > self.cfg.max_state_bytes {
            return Err(Refusal::StateFull);
        }
        if !same_room {
            self.remove_conn(conn, now, fx);
        }
        let joined_at = now / 1000;
        let entry = self.conns.entry(conn).or_insert_with(|| LocalConn {
            room: room.clone(),
            actor: actor.clone(),
            data: Bytes::new(),
            joined_at,
            updated: now,
            lingers_until: None,
        });
        entry.data = data;
        entry.updated = now;
        entry.lingers_until = None;
        self.refresh_local(&room, &actor, Some(conn), fx);
        Ok(SetOutcome {
            entered: !same_room,
            announced_join: !present,
        })
    }

    /// Connection `conn` closed. `linger`: abnormally — it stays present for the grace
    /// period, so a reconnect does not flap; otherwise it leaves at once.
    pub fn close(&mut self, conn: ConnId, linger: bool, now: u64, fx: &mut Effects) {
        self.clock = now;
        if linger && self.cfg.grace_ms > 0 {
            if let Some(c) = self.conns.get_mut(&conn) {
                c.lingers_until = Some(now + self.cfg.grace_ms);
            }
        } else {
            self.remove_conn(conn, now, fx);
        }
    }

    fn remove_conn(&mut self, conn: ConnId, _now: u64, fx: &mut Effects) {
        if let Some(c) = self.conns.remove(&conn) {
            self.refresh_local(&c.room, &c.actor, None, fx);
        }
    }

    /// Recomputes what this replica announces for (room, actor) from its connections (those
    /// listed for it, plus `joining`), and queues the op and the events of any change. Costs
    /// O(this actor's connections in the room), whatever the room's size.
    fn refresh_local(
        &mut self,
        room: &RoomKey,
        actor: &Arc<str>,
        joining: Option<ConnId>,
        fx: &mut Effects,
    ) {
        let mut ids: Vec<ConnId> = match self.local.get(room).and_then(|r| r.get(actor)) {
            Some((_, ids)) => ids.clone(),
            None => Vec::new(),
        };
        if let Some(j) = joining
            && !ids.contains(&j)
        {
            ids.push(j);
        }
        let mut conns: Vec<ConnId> = Vec::with_capacity(ids.len());
        let mut newest: Option<&LocalConn> = None;
        let mut joined_at = u64::MAX;
        for id in ids {
            let Some(c) = self.conns.get(&id) else {
                continue;
            };
            if c.room != *room || c.actor != *actor {
                continue;
            }
            conns.push(id);
            joined_at = joined_at.min(c.joined_at);
            if newest.is_none_or(|n| c.updated >= n.updated) {
                newest = Some(c);
            }
        }
        let old = self
            .local
            .get(room)
            .and_then(|r| r.get(actor))
            .map(|(m, _)| m.clone());
        // While the actor stays present here, it keeps the time it first joined.
        if let Some(o) = &old {
            joined_at = joined_at.min(o.joined_at);
        }
        let announced = newest.map(|c| Member {
            data: c.data.clone(),
            joined_at,
            updated: c.updated,
        });
        let before = self.member(room, actor);
        if let Some(old) = &old {
            self.state_bytes = self.state_bytes.saturating_sub(old.cost(actor));
        }
        match &announced {
            Some(m) => {
                self.state_bytes += m.cost(actor);
                let r = self.local.entry(room.clone()).or_default();
                r.insert(actor.clone(), (m.clone(), conns));
            }
            None => {
                if let Some(r) = self.local.get_mut(room) {
                    r.remove(actor);
                    if r.is_empty() {
                        self.local.remove(room);
                    }
                }
            }
        }
        // Any change, the time of an update with the same data included: the latest update
        // of any connection wins everywhere, so every replica must know when it was.
        if old != announced {
            self.pending.push(match &announced {
                Some(m) => Op::Set {
                    room: room.clone(),
                    actor: actor.clone(),
                    member: m.clone(),
                },
                None => Op::Remove {
                    room: room.clone(),
                    actor: actor.clone(),
                },
            });
        }
        let after = self.member(room, actor);
        if old.is_some() && announced.is_none() && before.is_some() && after.is_some() {
            // Its last connection here left, but the actor is present elsewhere: should
            // that replica's last connection leave at the same moment (neither seeing the
            // other's leave), each must report the leave when the other's arrives.
            // Only concurrent leaves (within a replication delay) are both hidden.
            let window = self.cfg.heartbeat_ms / 2;
            self.note_for((room.clone(), actor.clone()), true, window);
        }
        // A local change, unless the caller says otherwise (a goodbye).
        let cause = self.cause;
        if cause == Origin::Remote {
            self.cause = Origin::Local;
        }
        self.diff(room, actor, before, after, fx);
        self.cause = cause;
    }

    /// Events for the change of a merged member.
    fn diff(
        &mut self,
        room: &RoomKey,
        actor: &Arc<str>,
        before: Option<Member>,
        after: Option<Member>,
        fx: &mut Effects,
    ) {
        let origin = self.cause;
        let event = |kind, member| Event {
            room: room.clone(),
            actor: actor.clone(),
            kind,
            member,
            origin,
        };
        if before != after {
            self.lists.borrow_mut().remove(room);
            match &after {
                Some(m) => {
                    self.merged
                        .entry(room.clone())
                        .or_default()
                        .insert(actor.clone(), m.clone());
                }
                None => {
                    if let Some(r) = self.merged.get_mut(room) {
                        r.remove(actor);
                        if r.is_empty() {
                            self.merged.remove(room);
                        }
                    }
                }
            }
        }
        if let (Origin::Departed { leader: false }, Some(replica), Some(gone)) =
            (origin, &self.departing, &before)
            && after.is_none()
        {
            self.departures.push_back(Departure {
                at: self.clock,
                replica: replica.clone(),
                room: room.clone(),
                actor: actor.clone(),
                fresh: self
                    .remotes
                    .get(replica)
                    .is_none_or(|r| r.heard.saturating_sub(gone.updated) < self.cfg.heartbeat_ms),
            });
            if self.departures.len() > MAX_PENDING_DEPARTURES {
                self.departures.pop_front();
            }
        }
        if let (Origin::Departed { .. }, Some(_), Some(m)) = (origin, &before, &after)
            && self.local.get(room).is_some_and(|r| r.contains_key(actor))
        {
            // The departed replica was a source of this actor, which stays present through a
            // connection here that joined while it was: what the backend last heard may have
            // come from the departed one (a leave whose delta never arrived here). Said again.
            fx.reports
                .push(self.report_to_backend(room, actor, Some(m.clone())));
        }
        if before.is_some() != after.is_some() {
            let present = after.is_some();
            let key = (room.clone(), actor.clone());
            if origin.reported_here() {
                self.note_reported(key, present);
            } else if self.recent.get(&key).is_some_and(|(told, at, window)| {
                *told != present && self.clock.saturating_sub(*at) <= *window
            }) {
                // This replica told the backend otherwise a moment ago, from a view the
                // other replica's change had not reached yet (one actor leaving here while
                // joining there): it corrects what it said.
                fx.reports
                    .push(self.report_to_backend(room, actor, after.clone()));
            }
        }
        match (before, after) {
            (None, Some(m)) => {
                fx.events.push(event(EventKind::Join, Some(m.clone())));
                fx.events.push(event(EventKind::Update, Some(m)));
            }
            (Some(_), None) => {
                fx.events.push(event(EventKind::Leave, None));
            }
            (Some(b), Some(a)) if b.data != a.data => {
                fx.events.push(event(EventKind::Update, Some(a)));
            }
            _ => {}
        }
    }

    // ------------------------------------------------------------------------------------
    // Time.
    // ------------------------------------------------------------------------------------

    /// Expires lingering connections and silent replicas, heartbeats, answers sync requests
    /// and publishes pending ops. Call often (every ~100 ms) and after every local change.
    pub fn tick(&mut self, now: u64, fx: &mut Effects) {
        self.clock = now;
        self.confirm_departures(now, fx);
        self.recent
            .retain(|_, (_, at, window)| now.saturating_sub(*at) <= *window);
        let mut expired: Vec<ConnId> = self
            .conns
            .iter()
            .filter(|(_, c)| c.lingers_until.is_some_and(|t| t <= now))
            .map(|(id, _)| *id)
            .collect();
        expired.sort_unstable();
        for id in expired {
            self.remove_conn(id, now, fx);
        }
        let mut silent: Vec<Arc<str>> = self
            .remotes
            .iter()
            .filter(|(_, r)| !r.dead && now.saturating_sub(r.heard) >= self.cfg.replica_timeout_ms)
            .map(|(id, _)| id.clone())
            .collect();
        silent.sort();
        for id in silent {
            tracing::info!(replica = %id, "presence: replica silent past the timeout, its members leave");
            self.kill(&id, fx);
        }
        let mut retry: Vec<Arc<str>> = self
            .remotes
            .iter()
            // Dead ones too: a replica declared dead that is heard from again (its will went
            // out while it lived) is asked until its snapshot revives it.
            .filter(|(_, r)| {
                r.wants_sync
                    .is_some_and(|t| now.saturating_sub(t) >= self.cfg.sync_retry_ms)
            })
            .map(|(id, _)| id.clone())
            .collect();
        retry.sort();
        for id in retry {
            self.request_sync(&id, now, fx);
        }
        let pause = self
            .cfg
            .snapshot_interval_ms
            .max((self.last_snapshot_bytes as u64 * 1000) / SNAPSHOT_BYTES_PER_SECOND as u64);
        if self.snapshot_wanted
            && self
                .last_snapshot
                .is_none_or(|t| now.saturating_sub(t) >= pause)
        {
            self.snapshot(now, fx);
        }
        if self.gone {
            fx.messages.clear();
            self.pending.clear();
            return;
        }
        self.flush(fx);
        if now.saturating_sub(self.last_heartbeat) >= self.cfg.heartbeat_ms {
            self.last_heartbeat = now;
            fx.messages.push(self.message(Body::Heartbeat));
        }
    }

    /// Hello: asks every replica for its snapshot. Sent once this replica receives the
    /// presence topics (the broker granted its subscription, again after a reconnect), so a
    /// late starter converges as soon as the answers arrive.
    pub fn hello(&mut self, fx: &mut Effects) {
        if self.gone {
            return;
        }
        self.push(Body::SyncRequest { target: None }, fx);
    }

    /// Publishes the pending ops as deltas (cut to `max_message_bytes`).
    pub fn flush(&mut self, fx: &mut Effects) {
        if self.pending.is_empty() {
            return;
        }
        let ops = std::mem::take(&mut self.pending);
        for chunk in chunks(ops, self.cfg.max_message_bytes) {
            self.seq += 1;
            fx.messages.push(self.message(Body::Delta { ops: chunk }));
        }
    }

    /// A graceful drain: every local member leaves, here and (by one goodbye) everywhere.
    pub fn goodbye(&mut self, now: u64, fx: &mut Effects) -> Message {
        // From here on nothing is announced: a presence frame of a session still draining,
        // a heartbeat or a snapshot would make the others take this replica back.
        self.gone = true;
        let mut conns: Vec<ConnId> = self.conns.keys().copied().collect();
        conns.sort_unstable();
        // The others drop these members when the goodbye arrives and one of them reports
        // the leaves; alone, this replica reports them itself.
        let alone = self.live_replicas() == 0;
        self.cause = Origin::Departed { leader: alone };
        for c in conns {
            self.remove_conn(c, now, fx);
        }
        self.cause = Origin::Remote;
        self.pending.clear();
        self.message(Body::Gone)
    }

    /// This replica's last will: what the broker publishes if its connection dies.
    pub fn will(&self) -> Message {
        self.message(Body::Gone)
    }

    fn message(&self, body: Body) -> Message {
        Message {
            replica: self.cfg.replica.clone(),
            incarnation: self.cfg.incarnation,
            seq: self.seq,
            body,
        }
    }

    fn push(&mut self, body: Body, fx: &mut Effects) {
        let m = self.message(body);
        fx.messages.push(m);
    }

    fn request_sync(&mut self, replica: &Arc<str>, now: u64, fx: &mut Effects) {
        if let Some(r) = self.remotes.get_mut(replica) {
            r.wants_sync = Some(now);
        }
        self.push(
            Body::SyncRequest {
                target: Some(replica.clone()),
            },
            fx,
        );
    }

    /// Everything this replica announces, in parts of `max_message_bytes`, all at the
    /// current `seq` (pending ops are flushed first, so the snapshot covers them).
    fn snapshot(&mut self, now: u64, fx: &mut Effects) {
        self.flush(fx);
        self.snapshot_wanted = false;
        self.last_snapshot = Some(now);
        let mut members: Vec<(&RoomKey, &Arc<str>, &Member)> = self
            .local
            .iter()
            .flat_map(|(room, actors)| actors.iter().map(move |(actor, (m, _))| (room, actor, m)))
            .collect();
        members.sort_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)));
        let ops: Vec<Op> = members
            .into_iter()
            .map(|(room, actor, m)| Op::Set {
                room: room.clone(),
                actor: actor.clone(),
                member: m.clone(),
            })
            .collect();
        self.last_snapshot_bytes = ops.iter().map(Op::encoded_len).sum();
        let parts = chunks(ops, self.cfg.max_message_bytes);
        let total = parts.len().max(1) as u32;
        if parts.is_empty() {
            self.push(
                Body::Snapshot {
                    part: 0,
                    parts: 1,
                    ops: Vec::new(),
                },
                fx,
            );
        }
        for (i, ops) in parts.into_iter().enumerate() {
            self.push(
                Body::Snapshot {
                    part: i as u32,
                    parts: total,
                    ops,
                },
                fx,
            );
        }
    }

    // ------------------------------------------------------------------------------------
    // Messages from the broker (including this replica's own, which it mostly ignores).
    // ------------------------------------------------------------------------------------

    pub fn on_message(&mut self, m: Message, now: u64, fx: &mut Effects) {
        self.clock = now;
        if m.replica == self.cfg.replica {
            match m.body {
                // Our own will, while we are alive: the others dropped our members.
                Body::Gone if m.incarnation == self.cfg.incarnation => {
                    tracing::info!(
                        "presence: this replica's last will was published; announcing again"
                    );
                    self.snapshot_wanted = true;
                }
                Body::SyncRequest { target: None } if m.incarnation != self.cfg.incarnation => {
                    tracing::warn!(replica = %m.replica, "presence: another process uses this replica id (presence.replica_id must be unique)");
                }
                _ => {}
            }
            return;
        }
        if let Body::SyncRequest { target } = &m.body {
            if target.as_ref().is_none_or(|t| *t == self.cfg.replica) {
                self.snapshot_wanted = true;
            }
            // A hello also tells us the sender exists; its state arrives with its snapshot.
            if target.is_some() {
                return;
            }
        }
        if !self.remotes.contains_key(&m.replica) {
            if self.remotes.len() >= self.cfg.max_replicas && !self.forget_one_dead() {
                tracing::warn!(replica = %m.replica, "presence: more replicas than this one tracks (1,024, live or recently dead); ignored");
                return;
            }
            self.remotes.insert(
                m.replica.clone(),
                Remote {
                    since: now,
                    ..Remote::default()
                },
            );
        }
        let Some(r) = self.remotes.get_mut(&m.replica) else {
            return;
        };
        if m.incarnation < r.incarnation {
            return; // an older incarnation's message (or will), superseded
        }
        if m.incarnation > r.incarnation {
            // A restart: the old incarnation's members are gone at once.
            let id = m.replica.clone();
            self.clear(&id, fx);
            if let Some(r) = self.remotes.get_mut(&id) {
                r.incarnation = m.incarnation;
                r.since = now;
                r.applied = 0;
                r.dead = false;
                r.wants_sync = None;
                r.assembling = None;
                r.log.clear();
                r.log_bytes = 0;
            }
        }
        let id = m.replica.clone();
        let Some(r) = self.remotes.get_mut(&id) else {
            return;
        };
        tracing::trace!(replica = %id, incarnation = m.incarnation, seq = m.seq, applied = r.applied, dead = r.dead, kind = m.body.kind(), "presence message");
        r.heard = now;
        match m.body {
            Body::SyncRequest { .. } => {
                // A hello of a fresh incarnation: it holds nothing yet.
                if r.dead && m.seq == 0 {
                    r.dead = false;
                }
            }
            Body::Heartbeat => {
                if r.dead || m.seq > r.applied {
                    // We missed something (or declared it dead too early): ask for it all.
                    if r.wants_sync.is_none() {
                        self.request_sync(&id, now, fx);
                    }
                }
            }
            Body::Delta { ops } => {
                if m.seq <= r.applied && !r.dead {
                    return; // a duplicate, or overtaken
                }
                if !r.log.contains_key(&m.seq) {
                    r.log_bytes += ops.iter().map(Op::encoded_len).sum::<usize>();
                    r.log.insert(m.seq, ops.clone());
                    while r.log.len() > LOG_MESSAGES || r.log_bytes > LOG_BYTES {
                        let Some((_, old)) = r.log.pop_first() else {
                            break;
                        };
                        r.log_bytes = r
                            .log_bytes
                            .saturating_sub(old.iter().map(Op::encoded_len).sum::<usize>());
                    }
                }
                if r.dead {
                    // Heard from again: its snapshot (rebased on these deltas) revives it.
                    if r.wants_sync.is_none() {
                        self.request_sync(&id, now, fx);
                    }
                    return;
                }
                let gap = m.seq != r.applied.saturating_add(1);
                r.applied = m.seq;
                for op in ops {
                    self.apply(&id, op, fx);
                }
                if gap {
                    self.request_sync(&id, now, fx);
                }
            }
            Body::Snapshot { part, parts, ops } => {
                // Older than what was applied: usable only if every delta applied since is
                // still in the log.
                let stale = m.seq < r.applied
                    && (r.dead
                        || r.log
                            .first_key_value()
                            .is_none_or(|(s, _)| *s > m.seq.saturating_add(1)));
                if stale || parts == 0 || part >= parts {
                    return;
                }
                let fresh =
                    !matches!(&r.assembling, Some((seq, n, _)) if *seq == m.seq && *n == parts);
                if fresh {
                    r.assembling = Some((m.seq, parts, std::collections::BTreeMap::new()));
                    r.assembling_bytes = 0;
                }
                r.assembling_bytes += ops.iter().map(Op::encoded_len).sum::<usize>();
                if r.assembling_bytes > self.cfg.max_state_bytes {
                    tracing::warn!(replica = %id, "presence: a snapshot larger than presence.max_state_bytes was dropped");
                    r.assembling = None;
                    r.assembling_bytes = 0;
                    self.dropped_ops += 1;
                    return;
                }
                let Some((_, _, got)) = r.assembling.as_mut() else {
                    return;
                };
                got.insert(part, ops);
                if got.len() < parts as usize {
                    return;
                }
                let Some((seq, _, got)) = r.assembling.take() else {
                    return;
                };
                // The snapshot, then every logged delta after it, in order.
                let mut desired: HashMap<(RoomKey, Arc<str>), Member> = HashMap::new();
                let mut later = got
                    .into_values()
                    .flatten()
                    .map(|op| (seq, op))
                    .collect::<Vec<_>>();
                let mut top = seq;
                let mut contiguous = true;
                for (s, ops) in r.log.range(seq.saturating_add(1)..) {
                    contiguous &= *s == top.saturating_add(1);
                    top = *s;
                    later.extend(ops.iter().cloned().map(|op| (*s, op)));
                }
                for (_, op) in later {
                    match op {
                        Op::Set {
                            room,
                            actor,
                            member,
                        } => {
                            desired.insert((room, actor), member);
                        }
                        Op::Remove { room, actor } => {
                            desired.remove(&(room, actor));
                        }
                    }
                }
                r.applied = if r.dead { top } else { r.applied.max(top) };
                let revived = std::mem::replace(&mut r.dead, false);
                // A hole in the log (a lost delta after the snapshot): ask again later.
                r.wants_sync = (!contiguous).then_some(now);
                if revived {
                    // Declared dead too early (a blip, a late heartbeat): its members are
                    // back before their leaves were confirmed, so none is reported.
                    r.since = now;
                }
                self.replace(&id, desired, fx);
            }
            Body::Gone => {
                tracing::info!(replica = %id, "presence: replica gone (goodbye or last will), its members leave");
                self.kill(&id, fx);
            }
        }
    }

    /// Applies one op of replica `id`.
    fn apply(&mut self, id: &Arc<str>, op: Op, fx: &mut Effects) {
        let (room, actor) = match &op {
            Op::Set { room, actor, .. } | Op::Remove { room, actor } => {
                (room.clone(), actor.clone())
            }
        };
        let before = self.member(&room, &actor);
        let count = self.member_count(&room);
        let Some(r) = self.remotes.get_mut(id) else {
            return;
        };
        match op {
            Op::Set { member, .. } => {
                let cost = member.cost(&actor);
                let old = r
                    .members
                    .get(&room)
                    .and_then(|m| m.get(&actor))
                    .map(|m| m.cost(&actor));
                let room_cost = if r.members.contains_key(&room) {
                    0
                } else {
                    room.cost()
                };
                if self.state_bytes + cost + room_cost > self.cfg.max_state_bytes + old.unwrap_or(0)
                {
                    self.dropped_ops += 1;
                    return;
                }
                if before.is_none() && count >= self.cfg.max_room_members {
                    self.dropped_ops += 1;
                    return;
                }
                self.state_bytes = self.state_bytes + cost + room_cost - old.unwrap_or(0);
                r.members
                    .entry(room.clone())
                    .or_default()
                    .insert(actor.clone(), member);
            }
            Op::Remove { .. } => {
                if let Some(m) = r.members.get_mut(&room) {
                    if let Some(old) = m.remove(&actor) {
                        self.state_bytes = self.state_bytes.saturating_sub(old.cost(&actor));
                    }
                    if m.is_empty() {
                        r.members.remove(&room);
                        self.state_bytes = self.state_bytes.saturating_sub(room.cost());
                    }
                }
            }
        }
        let after = self.member(&room, &actor);
        self.diff(&room, &actor, before, after, fx);
    }

    /// Every (room, actor) replica `id` announced, sorted (the same inputs give the same
    /// events, which the seeded simulation needs).
    fn held(&self, id: &Arc<str>) -> Vec<(RoomKey, Arc<str>)> {
        let mut held: Vec<(RoomKey, Arc<str>)> = self
            .remotes
            .get(id)
            .map(|r| {
                r.members
                    .iter()
                    .flat_map(|(room, m)| m.keys().map(|a| (room.clone(), a.clone())))
                    .collect()
            })
            .unwrap_or_default();
        held.sort();
        held
    }

    /// Replaces everything replica `id` announced by a snapshot's ops.
    fn replace(
        &mut self,
        id: &Arc<str>,
        wanted: HashMap<(RoomKey, Arc<str>), Member>,
        fx: &mut Effects,
    ) {
        for (room, actor) in self.held(id) {
            if !wanted.contains_key(&(room.clone(), actor.clone())) {
                self.apply(id, Op::Remove { room, actor }, fx);
            }
        }
        let mut sets: Vec<_> = wanted.into_iter().collect();
        sets.sort_by(|a, b| a.0.cmp(&b.0));
        for ((room, actor), member) in sets {
            self.apply(
                id,
                Op::Set {
                    room,
                    actor,
                    member,
                },
                fx,
            );
        }
    }

    /// Removes everything replica `id` announced, and marks it dead.
    fn kill(&mut self, id: &Arc<str>, fx: &mut Effects) {
        self.clear(id, fx);
        self.mark_dead(id);
    }

    /// Who reports the departure of replica `gone`'s members: the lowest id among this
    /// replica and the live replicas other than `gone` that have been up for a replica
    /// timeout (a fresher one may not know `gone`'s members; should it know them, both report:
    /// a duplicate is better than a leave nobody reports). `None`: this replica.
    fn departure_reporter(&self, gone: &Arc<str>, now: u64) -> Option<Arc<str>> {
        self.remotes
            .iter()
            .filter(|(id, r)| {
                !r.dead
                    && *id != gone
                    && now.saturating_sub(r.since) >= self.cfg.replica_timeout_ms
                    && ***id < *self.cfg.replica
            })
            .map(|(id, _)| id)
            .min()
            .cloned()
    }

    /// A join (`member` present) or leave this replica reports to the backend only, noted as
    /// what it last told it.
    fn report_to_backend(
        &mut self,
        room: &RoomKey,
        actor: &Arc<str>,
        member: Option<Member>,
    ) -> Event {
        self.note_reported((room.clone(), actor.clone()), member.is_some());
        Event {
            room: room.clone(),
            actor: actor.clone(),
            kind: if member.is_some() {
                EventKind::Join
            } else {
                EventKind::Leave
            },
            member,
            origin: Origin::Local,
        }
    }

    /// Remembers (for a replica timeout) what this replica last told the backend about a
    /// member.
    fn note_reported(&mut self, key: (RoomKey, Arc<str>), present: bool) {
        self.note_for(key, present, self.cfg.replica_timeout_ms);
    }

    /// [`Self::note_reported`], remembered for `window` ms.
    fn note_for(&mut self, key: (RoomKey, Arc<str>), present: bool, window: u64) {
        if self.recent.len() >= MAX_PENDING_DEPARTURES {
            let now = self.clock;
            self.recent
                .retain(|_, (_, at, window)| now.saturating_sub(*at) <= *window);
        }
        if self.recent.len() < MAX_PENDING_DEPARTURES {
            self.recent.insert(key, (present, self.clock, window));
        }
    }

    /// Reports the departures held for a replica timeout that still hold (the member is
    /// absent everywhere), if this replica is the reporter. One whose reporter is another
    /// replica is watched for two more replica timeouts, in case that one dies before it can
    /// report it.
    fn confirm_departures(&mut self, now: u64, fx: &mut Effects) {
        let confirm = self.cfg.replica_timeout_ms;
        let mut due = std::mem::take(&mut self.handed_over);
        while self
            .departures
            .front()
            .is_some_and(|d| now.saturating_sub(d.at) >= confirm)
        {
            due.extend(self.departures.pop_front());
        }
        for d in due {
            if self.member(&d.room, &d.actor).is_some() {
                continue; // back (a blip, a reconnect elsewhere): nothing to report
            }
            let reports_here = d.fresh || self.departure_reporter(&d.replica, now).is_none();
            if reports_here {
                fx.reports
                    .push(self.report_to_backend(&d.room, &d.actor, None));
            } else if now.saturating_sub(d.at) < confirm.saturating_mul(3) {
                self.handed_over.push(d);
            }
        }
    }

    fn mark_dead(&mut self, id: &Arc<str>) {
        if let Some(r) = self.remotes.get_mut(id) {
            r.dead = true;
            r.wants_sync = None;
            r.assembling = None;
            r.log.clear();
            r.log_bytes = 0;
        }
    }

    /// Removes everything replica `id` announced: it died, left or restarted.
    fn clear(&mut self, id: &Arc<str>, fx: &mut Effects) {
        self.cause = Origin::Departed { leader: false };
        self.departing = Some(id.clone());
        for (room, actor) in self.held(id) {
            self.apply(id, Op::Remove { room, actor }, fx);
        }
        self.cause = Origin::Remote;
        self.departing = None;
    }

    /// Forgets one dead replica (to make room for a new one). Returns whether it could.
    fn forget_one_dead(&mut self) -> bool {
        let oldest = self
            .remotes
            .iter()
            .filter(|(_, r)| r.dead)
            .min_by_key(|(_, r)| r.heard)
            .map(|(id, _)| id.clone());
        match oldest {
            Some(id) => {
                self.remotes.remove(&id);
                true
            }
            None => false,
        }
    }

    /// Replicas currently alive (not timed out or gone), for diagnostics.
    pub fn live_replicas(&self) -> usize {
        self.remotes.values().filter(|r| !r.dead).count()
    }

    /// Sizes for the metrics: (this replica's connections in a room, members of every room
    /// merged across replicas, per actor).
    pub fn sizes(&self) -> (usize, usize) {
        let merged = self.merged.values().map(|m| m.len()).sum();
        (self.conns.len(), merged)
    }
}

/// Cuts ops into groups whose encoding stays under `max_bytes` (one op per group at least).
fn chunks(ops: Vec<Op>, max_bytes: usize) -> Vec<Vec<Op>> {
    let mut out = Vec::new();
    let mut cur = Vec::new();
    let mut bytes = 0;
    for op in ops {
        let n = op.encoded_len();
        if !cur.is_empty() && bytes + n > max_bytes {
            out.push(std::mem::take(&mut cur));
            bytes = 0;
        }
        bytes += n;
        cur.push(op);
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}
