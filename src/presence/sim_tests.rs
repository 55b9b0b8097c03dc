//! A seeded simulation of several replicas' presence cores over a broker that drops,
//! duplicates, delays and reorders messages, with a fake clock, crashes (with and without a
//! last will), restarts (a new incarnation under the same replica id) and broker-connection
//! blips (a will published while the replica lives on).
//!
//! A reference model knows every connection that is open. The test asserts:
//! - **convergence**: after a quiet period (the replica timeout plus the grace period plus
//!   a repair margin), every live replica lists exactly the model's members of every room,
//!   with the latest data — so no ghost of a crashed replica, and a restarted (late) replica
//!   knows everyone;
//! - **no leave while connected**: a replica never reports `leave` for an actor that has had
//!   a connection in that room, on a replica alive all along, for longer than the settle
//!   bound (and never while the actor is connected on that replica itself);
//! - **well-formed streams**: per replica and (room, actor), events go join, update…, leave;
//! - **isolation**: an event names only a (room key, actor) pair some connection really had —
//!   the same actor id and room slug in another scope or project never merge.
//!
//! `CUTTLE_PRESENCE_SEED=<n>` replays one seed; `CUTTLE_PRESENCE_SEEDS=<n>` runs that many.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use bytes::Bytes;

use super::core::{Config, ConnId, Core, Effects, EventKind, RoomKey};
use super::message::{Body, Message};
use crate::test_rng::Rng;

const REPLICAS: usize = 3;
const HEARTBEAT: u64 = 1000;
const TIMEOUT: u64 = 5000;
const GRACE: u64 = 3000;
const MAX_DELAY: u64 = 150;
/// How long a change may take to reach every replica, lost messages repaired included.
const SETTLE: u64 = 6000;
/// Quiet period before a convergence check.
const QUIET: u64 = TIMEOUT + GRACE + SETTLE;
const STEP: u64 = 50;

fn config(replica: usize, incarnation: u64) -> Config {
    Config {
        replica: format!("r{replica}").into(),
        incarnation,
        heartbeat_ms: HEARTBEAT,
        replica_timeout_ms: TIMEOUT,
        grace_ms: GRACE,
        sync_retry_ms: 1000,
        snapshot_interval_ms: 1000,
        max_room_members: 10_000,
        max_state_bytes: 64 << 20,
        // Small, so snapshots come in several parts.
        max_message_bytes: 300,
        max_replicas: 16,
    }
}

/// A core whose hello was sent into the void (the first replicas start together).
fn hello(mut core: Core) -> Core {
    core.hello(&mut Effects::default());
    core
}

fn keys() -> Vec<RoomKey> {
    let mut out = Vec::new();
    for project in ["p", "q"] {
        for scope in [None, Some("acme"), Some("globex")] {
            for room in ["r1", "r2"] {
                out.push(RoomKey {
                    project: project.into(),
                    app: "chat".into(),
                    scope: scope.map(Into::into),
                    room: room.into(),
                });
            }
        }
    }
    out
}

#[derive(Debug, Clone)]
struct Conn {
    replica: usize,
    room: RoomKey,
    actor: Arc<str>,
    data: Bytes,
    since: u64,
    updated: u64,
}

struct Replica {
    core: Option<Core>,
    incarnation: u64,
    up_since: u64,
    /// (room, actor) → present, as this replica's events say.
    seen: HashMap<(RoomKey, Arc<str>), bool>,
    /// Times the broker published this replica's will while it was alive.
    blips: Vec<u64>,
}

struct Sim {
    rng: Rng,
    now: u64,
    replicas: Vec<Replica>,
    conns: BTreeMap<ConnId, Conn>,
    next_conn: ConnId,
    /// In flight: (delivery time, order) → (to, message).
    network: BTreeMap<(u64, u64), (usize, Message)>,
    order: u64,
    ever: HashSet<(RoomKey, Arc<str>)>,
    keys: Vec<RoomKey>,
    lossy: bool,
    stats: HashMap<&'static str, u64>,
    /// What the backend believes from the joins and leaves the replicas report to it
    /// (webhooks): (room, actor) → present. Checked only with `one_fault_at_a_time`: under
    /// overlapping failures a departure may be reported twice or not at all.
    backend: HashMap<(RoomKey, Arc<str>), bool>,
    one_fault_at_a_time: bool,
    last_fault: u64,
}

impl Sim {
    fn new(seed: u64) -> Self {
        let replicas = (0..REPLICAS)
            .map(|i| Replica {
                core: Some(hello(Core::new(config(i, 1)))),
                incarnation: 1,
                up_since: 0,
                seen: HashMap::new(),
                blips: Vec::new(),
            })
            .collect();
        Self {
            rng: Rng::new(seed),
            now: 0,
            replicas,
            conns: BTreeMap::new(),
            next_conn: 1,
            network: BTreeMap::new(),
            order: 0,
            ever: HashSet::new(),
            keys: keys(),
            lossy: true,
            stats: HashMap::new(),
            backend: HashMap::new(),
            one_fault_at_a_time: false,
            last_fault: 0,
        }
    }

    fn count(&mut self, what: &'static str) {
        *self.stats.entry(what).or_insert(0) += 1;
    }

    /// The broker: every live replica (the sender included) gets each message, maybe late,
    /// twice, or never.
    fn send(&mut self, from: usize, messages: Vec<Message>) {
        for m in messages {
            for to in 0..REPLICAS {
                if self.replicas[to].core.is_none() {
                    continue;
                }
                if self.lossy && self.rng.chance(20) {
                    self.count("dropped");
                    continue;
                }
                let copies = if self.lossy && self.rng.chance(30) {
                    2
                } else {
                    1
                };
                for _ in 0..copies {
                    let at = self.now + 1 + self.rng.below(MAX_DELAY as usize) as u64;
                    self.order += 1;
                    // Through the codec, as on the broker.
                    let wire = Message::decode(&m.encode()).expect("own messages decode");
                    self.network.insert((at, self.order), (to, wire));
                }
            }
            let _ = from;
        }
    }

    fn effects(&mut self, replica: usize, fx: Effects) {
        if std::env::var("CUTTLE_PRESENCE_TRACE").is_ok() {
            for e in &fx.events {
                eprintln!(
                    "{} r{replica} event {:?} {} {:?} {:?}",
                    self.now, e.kind, e.actor, e.room, e.origin
                );
            }
            for e in &fx.reports {
                eprintln!(
                    "{} r{replica} reports {:?} {} {:?}",
                    self.now, e.kind, e.actor, e.room
                );
            }
            for m in &fx.messages {
                eprintln!("{} r{replica} sends {:?}", self.now, m);
            }
        }
        for e in &fx.events {
            assert!(
                self.ever.contains(&(e.room.clone(), e.actor.clone())),
                "replica {replica} reported {:?} of {} in {:?}, which no connection ever was (isolation)",
                e.kind,
                e.actor,
                e.room
            );
            let key = (e.room.clone(), e.actor.clone());
            let present = self.replicas[replica]
                .seen
                .get(&key)
                .copied()
                .unwrap_or(false);
            match e.kind {
                EventKind::Join => assert!(!present, "replica {replica}: {key:?} joined twice"),
                EventKind::Update => {
                    assert!(present, "replica {replica}: update of absent {key:?}")
                }
                EventKind::Leave => {
                    assert!(present, "replica {replica}: leave of absent {key:?}");
                    self.check_leave(replica, &e.room, &e.actor);
                }
            }
            if e.origin.reported_here() {
                self.tell_backend(e);
            }
            self.replicas[replica]
                .seen
                .insert(key, e.kind != EventKind::Leave);
        }
        for e in &fx.reports {
            self.tell_backend(e);
        }
        self.send(replica, fx.messages);
    }

    /// A join or leave reported to the backend (webhooks).
    fn tell_backend(&mut self, e: &super::core::Event) {
        let key = (e.room.clone(), e.actor.clone());
        {
            if e.kind != EventKind::Update {
                let join = e.kind == EventKind::Join;
                let was = self.backend.insert(key.clone(), join).unwrap_or(false);
                if was == join {
                    // Tolerated (and counted): one actor joining on two replicas within the
                    // replication delay is reported by both.
                    self.count(if join {
                        "backend_dup_join"
                    } else {
                        "backend_dup_leave"
                    });
                }
                self.count("backend_reports");
            }
        }
    }

    /// A leave is wrong when the actor has a settled connection in the room.
    fn check_leave(&self, at: usize, room: &RoomKey, actor: &Arc<str>) {
        let now = self.now;
        for c in self.conns.values() {
            if c.room != *room || c.actor != *actor {
                continue;
            }
            if c.replica == at {
                panic!(
                    "replica {at} reported {actor} leaving {room:?} at {now} while connected to it"
                );
            }
            let host = &self.replicas[c.replica];
            let settled = |t: u64| t + SETTLE <= now;
            let blipped = host.blips.iter().any(|b| b + SETTLE > now);
            if settled(c.since)
                && settled(host.up_since)
                && settled(self.replicas[at].up_since)
                && !blipped
            {
                panic!(
                    "replica {at} reported {actor} leaving {room:?} at {now} while connected to replica {} since {}",
                    c.replica, c.since
                );
            }
        }
    }

    fn with_core(&mut self, r: usize, f: impl FnOnce(&mut Core, u64, &mut Effects)) {
        let now = self.now;
        let mut fx = Effects::default();
        if let Some(core) = self.replicas[r].core.as_mut() {
            f(core, now, &mut fx);
            core.flush(&mut fx);
        }
        self.effects(r, fx);
    }

    fn live(&self) -> Vec<usize> {
        (0..REPLICAS)
            .filter(|r| self.replicas[*r].core.is_some())
            .collect()
    }

    fn data(&mut self) -> Bytes {
        Bytes::from(vec![0x81, 0xa1, b'n', (self.rng.below(100)) as u8])
    }

    fn act(&mut self) {
        let live = self.live();
        let roll = self.rng.below(100);
        // One fault at a time: none while the last one may still be settling.
        let fault_allowed =
            !self.one_fault_at_a_time || self.now >= self.last_fault + TIMEOUT + SETTLE;
        let open: Vec<ConnId> = self.conns.keys().copied().collect();
        if roll < 30 && !live.is_empty() {
            let r = *self.rng.pick(&live);
            let room = self.rng.pick(&self.keys).clone();
            let actor: Arc<str> = format!("u{}", self.rng.below(4)).into();
            let data = self.data();
            let id = self.next_conn;
            self.next_conn += 1;
            if std::env::var("CUTTLE_PRESENCE_TRACE").is_ok() {
                eprintln!("{} r{r} new conn {id} of {actor} in {room:?}", self.now);
            }
            self.ever.insert((room.clone(), actor.clone()));
            let now = self.now;
            self.conns.insert(
                id,
                Conn {
                    replica: r,
                    room: room.clone(),
                    actor: actor.clone(),
                    data: data.clone(),
                    since: now,
                    updated: now,
                },
            );
            self.with_core(r, |core, now, fx| {
                core.set(id, room, actor, data, now, fx)
                    .expect("within bounds");
            });
        } else if roll < 45 && !open.is_empty() {
            let id = *self.rng.pick(&open);
            let data = self.data();
            let Some(c) = self.conns.get_mut(&id) else {
                return;
            };
            c.data = data.clone();
            c.updated = self.now;
            let (r, room, actor) = (c.replica, c.room.clone(), c.actor.clone());
            self.with_core(r, |core, now, fx| {
                core.set(id, room, actor, data, now, fx)
                    .expect("within bounds");
            });
        } else if roll < 55 && !open.is_empty() {
            // Room switch: same namespace, another room.
            let id = *self.rng.pick(&open);
            let data = self.data();
            let Some(c) = self.conns.get_mut(&id) else {
                return;
            };
            let room = RoomKey {
                room: if &*c.room.room == "r1" {
                    "r2".into()
                } else {
                    "r1".into()
                },
                ..c.room.clone()
            };
            c.room = room.clone();
            c.data = data.clone();
            c.since = self.now;
            c.updated = self.now;
            if std::env::var("CUTTLE_PRESENCE_TRACE").is_ok() {
                eprintln!(
                    "{} r{} conn {id} of {} switches to {room:?}",
                    self.now, c.replica, c.actor
                );
            }
            let (r, actor) = (c.replica, c.actor.clone());
            self.ever.insert((room.clone(), actor.clone()));
            self.with_core(r, |core, now, fx| {
                core.set(id, room, actor, data, now, fx)
                    .expect("within bounds");
            });
        } else if roll < 75 && !open.is_empty() {
            let id = *self.rng.pick(&open);
            let linger = self.rng.chance(2);
            let Some(c) = self.conns.remove(&id) else {
                return;
            };
            if std::env::var("CUTTLE_PRESENCE_TRACE").is_ok() {
                eprintln!(
                    "{} r{} close conn {id} of {} in {:?} linger {linger}",
                    self.now, c.replica, c.actor, c.room
                );
            }
            self.with_core(c.replica, |core, now, fx| core.close(id, linger, now, fx));
        } else if !fault_allowed {
        } else if roll < 77 && live.len() > 1 {
            let r = *self.rng.pick(&live);
            self.last_fault = self.now;
            self.crash(r);
        } else if roll < 80 {
            let down: Vec<usize> = (0..REPLICAS)
                .filter(|r| self.replicas[*r].core.is_none())
                .collect();
            if !down.is_empty() {
                let r = *self.rng.pick(&down);
                self.last_fault = self.now;
                self.restart(r);
            }
        } else if roll < 81 && !live.is_empty() {
            // The replica's broker connection drops and comes back: its will goes out.
            let r = *self.rng.pick(&live);
            self.last_fault = self.now;
            self.count("blips");
            self.replicas[r].blips.push(self.now);
            let will = self.replicas[r].core.as_ref().map(Core::will);
            if let Some(w) = will {
                self.send(r, vec![w]);
            }
        }
    }

    fn crash(&mut self, r: usize) {
        self.count("crashes");
        if std::env::var("CUTTLE_PRESENCE_TRACE").is_ok() {
            eprintln!("{} r{r} crashes", self.now);
        }
        let will = self.replicas[r].core.take().map(|c| c.will());
        self.conns.retain(|_, c| c.replica != r);
        self.network.retain(|_, (to, _)| *to != r);
        self.replicas[r].seen.clear();
        // A network cut leaves no will; a dead process's connection does.
        if let Some(w) = will
            && self.rng.chance(2)
        {
            self.count("wills");
            self.send(r, vec![w]);
        }
    }

    fn restart(&mut self, r: usize) {
        self.count("restarts");
        if std::env::var("CUTTLE_PRESENCE_TRACE").is_ok() {
            eprintln!("{} r{r} restarts", self.now);
        }
        let now = self.now;
        let rep = &mut self.replicas[r];
        rep.incarnation += 1;
        let mut core = Core::new(config(r, rep.incarnation));
        rep.up_since = now;
        rep.blips.clear();
        // Its subscription is granted: it says hello (delivered like any message).
        let mut fx = Effects::default();
        core.hello(&mut fx);
        rep.core = Some(core);
        self.effects(r, fx);
    }

    /// Advances the clock by one step: deliveries due, ticks.
    fn advance(&mut self) {
        self.now += STEP;
        while let Some((&(at, order), _)) = self.network.iter().next() {
            if at > self.now {
                break;
            }
            let Some((to, m)) = self.network.remove(&(at, order)) else {
                break;
            };
            if std::env::var("CUTTLE_PRESENCE_TRACE").is_ok() {
                eprintln!("{} r{to} receives {:?}", self.now, m);
            }
            self.with_core(to, |core, now, fx| core.on_message(m, now, fx));
        }
        if self.now % 100 == 0 {
            for r in self.live() {
                self.with_core(r, |core, now, fx| core.tick(now, fx));
            }
        }
    }

    /// What every live replica must list once settled.
    fn check_converged(&self, seed: u64) {
        let mut expected: BTreeMap<RoomKey, BTreeMap<Arc<str>, &Conn>> = BTreeMap::new();
        for c in self.conns.values() {
            let e = expected.entry(c.room.clone()).or_default();
            let newer = e.get(&c.actor).is_none_or(|o| c.updated > o.updated);
            if newer {
                e.insert(c.actor.clone(), c);
            }
        }
        for r in self.live() {
            let Some(core) = self.replicas[r].core.as_ref() else {
                continue;
            };
            for key in &self.keys {
                let got: BTreeMap<Arc<str>, Bytes> = core
                    .members(key)
                    .iter()
                    .map(|(a, m)| (a.clone(), m.data.clone()))
                    .collect();
                let want: BTreeMap<Arc<str>, Bytes> = expected
                    .get(key)
                    .map(|m| m.iter().map(|(a, c)| (a.clone(), c.data.clone())).collect())
                    .unwrap_or_default();
                assert_eq!(
                    got, want,
                    "seed {seed}: replica {r} at {} lists {key:?} wrongly",
                    self.now
                );
                // The events it sent agree with its lists.
                let seen: BTreeSet<&Arc<str>> = self.replicas[r]
                    .seen
                    .iter()
                    .filter(|((k, _), present)| k == key && **present)
                    .map(|((_, a), _)| a)
                    .collect();
                let listed: BTreeSet<&Arc<str>> = want.keys().collect();
                assert_eq!(
                    seen, listed,
                    "seed {seed}: replica {r}'s events disagree with its list of {key:?}"
                );
            }
        }
        // The backend, told each change once by one replica, agrees with the model.
        for key in self.keys.iter().filter(|_| self.one_fault_at_a_time) {
            let told: BTreeSet<&Arc<str>> = self
                .backend
                .iter()
                .filter(|((k, _), present)| k == key && **present)
                .map(|((_, a), _)| a)
                .collect();
            let want: BTreeSet<&Arc<str>> = expected
                .get(key)
                .map(|m| m.keys().collect())
                .unwrap_or_default();
            assert_eq!(
                told, want,
                "seed {seed}: at {} the webhooks told the backend a different membership of {key:?}",
                self.now
            );
        }
    }
}

fn run(seed: u64, rounds: usize, one_fault_at_a_time: bool) -> HashMap<&'static str, u64> {
    let mut sim = Sim::new(seed);
    sim.one_fault_at_a_time = one_fault_at_a_time;
    // The backend's view is checked over a broker that delays and reorders but does not
    // lose messages (QoS 1 to a connected subscriber): a join reported by a replica that
    // crashes before any other heard of the member cannot be taken back by anyone.
    sim.lossy = !one_fault_at_a_time;
    for _ in 0..rounds {
        // Activity…
        for _ in 0..600 {
            if sim.rng.chance(2) {
                sim.act();
            }
            sim.advance();
        }
        // …then quiet, still lossy: everyone must agree with the model.
        let until = sim.now + QUIET;
        while sim.now < until {
            sim.advance();
        }
        sim.check_converged(seed);
        sim.count("checks");
    }
    sim.stats
}

struct SeedReport(u64);

impl Drop for SeedReport {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "presence simulation failed with seed {0}; replay with \
                 CUTTLE_PRESENCE_SEED={0} cargo test --lib presence::sim_tests",
                self.0
            );
        }
    }
}

/// Runs the seeds `CUTTLE_PRESENCE_SEED` (one) or 1..=`CUTTLE_PRESENCE_SEEDS` (default 32),
/// four rounds each, and sums their statistics.
fn run_seeds(one_fault_at_a_time: bool) -> HashMap<&'static str, u64> {
    let seeds: Vec<u64> = match std::env::var("CUTTLE_PRESENCE_SEED") {
        Ok(s) => vec![s.parse().expect("CUTTLE_PRESENCE_SEED is a number")],
        Err(_) => {
            let n = std::env::var("CUTTLE_PRESENCE_SEEDS")
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(32u64);
            (1..=n).collect()
        }
    };
    let mut total: HashMap<&'static str, u64> = HashMap::new();
    for seed in seeds {
        let _report = SeedReport(seed);
        for (k, v) in run(seed, 4, one_fault_at_a_time) {
            *total.entry(k).or_insert(0) += v;
        }
    }
    total
}

#[test]
fn replicas_converge_over_a_lossy_broker() {
    let total = run_seeds(false);
    // The faults the test is about did happen.
    for what in ["dropped", "crashes", "wills", "restarts", "blips", "checks"] {
        assert!(
            total.get(what).copied().unwrap_or(0) > 0,
            "no {what} in the simulation: {total:?}"
        );
    }
    eprintln!("presence simulation: {total:?}");
}

/// The webhooks' view (DESIGN §10): every join and leave of the merged membership is reported
/// to the backend by exactly one replica — the one whose connection caused it, or for a dead,
/// departed or revived replica's members one survivor — so that what the backend was told
/// agrees with the model after every quiet period. Faults (crashes, restarts, blips) come one
/// at a time here; duplicates (one actor joining on two replicas at once) are counted.
#[test]
fn the_backend_is_told_each_membership_change() {
    let total = run_seeds(true);
    for what in ["crashes", "restarts", "backend_reports", "checks"] {
        assert!(
            total.get(what).copied().unwrap_or(0) > 0,
            "no {what}: {total:?}"
        );
    }
    // Duplicates (a join or leave the backend already had) are consistent, and frequent
    // here: the simulation's four actors change on two replicas within the replication delay
    // all the time. The integration tests (tests/webhooks.rs) count exactly one of each in
    // the ordinary cases: an actor on two replicas in turn, a killed replica's member.
    let reports = total["backend_reports"];
    let dups = total.get("backend_dup_join").copied().unwrap_or(0)
        + total.get("backend_dup_leave").copied().unwrap_or(0);
    eprintln!("backend reports: {reports}, duplicates: {dups} ({total:?})");
}

#[test]
fn a_restarted_replica_supersedes_its_old_incarnation_at_once() {
    let mut a = Core::new(config(0, 1));
    let mut b_old = Core::new(config(1, 1));
    let room = keys()[0].clone();
    let mut fx = Effects::default();
    b_old
        .set(
            7,
            room.clone(),
            "alice".into(),
            Bytes::from_static(&[0x80]),
            10,
            &mut fx,
        )
        .unwrap();
    b_old.flush(&mut fx);
    let mut seen = Effects::default();
    for m in fx.messages {
        a.on_message(m, 20, &mut seen);
    }
    assert_eq!(a.members(&room).len(), 1);
    // b restarts: its hello (a new incarnation) removes alice before any timeout.
    let mut b_new = Core::new(config(1, 2));
    let mut fx = Effects::default();
    b_new.hello(&mut fx);
    let mut seen = Effects::default();
    for m in fx.messages {
        a.on_message(m, 40, &mut seen);
    }
    assert!(a.members(&room).is_empty());
    assert_eq!(seen.events.last().map(|e| e.kind), Some(EventKind::Leave));
    // A late message (or will) of the old incarnation changes nothing.
    let mut seen = Effects::default();
    a.on_message(b_old.will(), 50, &mut seen);
    let mut fx = Effects::default();
    b_old
        .set(
            8,
            room.clone(),
            "bob".into(),
            Bytes::from_static(&[0x80]),
            60,
            &mut fx,
        )
        .unwrap();
    b_old.flush(&mut fx);
    for m in fx.messages {
        a.on_message(m, 70, &mut seen);
    }
    assert!(seen.events.is_empty(), "{:?}", seen.events);
    assert!(a.members(&room).is_empty());
}

#[test]
fn one_actor_on_two_replicas_is_one_member() {
    let mut a = Core::new(config(0, 1));
    let mut b = Core::new(config(1, 1));
    // Both said hello before anything else.
    a.hello(&mut Effects::default());
    b.hello(&mut Effects::default());
    let room = keys()[0].clone();
    let mut fa = Effects::default();
    a.set(
        1,
        room.clone(),
        "alice".into(),
        Bytes::from_static(&[0x81, 0xa1, b'x', 1]),
        10,
        &mut fa,
    )
    .unwrap();
    a.flush(&mut fa);
    let mut fb = Effects::default();
    b.set(
        2,
        room.clone(),
        "alice".into(),
        Bytes::from_static(&[0x81, 0xa1, b'x', 2]),
        20,
        &mut fb,
    )
    .unwrap();
    b.flush(&mut fb);
    let mut ea = Effects::default();
    for m in fb.messages {
        a.on_message(m, 30, &mut ea);
    }
    // Already present on a: the newer data is an update, not a second join.
    assert_eq!(
        ea.events.iter().map(|e| e.kind).collect::<Vec<_>>(),
        vec![EventKind::Update]
    );
    let members = a.members(&room);
    assert_eq!(members.len(), 1);
    assert_eq!(&members[0].1.data[..], &[0x81, 0xa1, b'x', 2]);
    // alice leaves a, but is still on b: no leave on a, her data stays b's.
    let mut ea = Effects::default();
    a.close(1, false, 40, &mut ea);
    assert!(
        ea.events.iter().all(|e| e.kind != EventKind::Leave),
        "{:?}",
        ea.events
    );
    assert_eq!(a.members(&room).len(), 1);
    // A gap (a lost delta) is repaired by a snapshot: b's leave is lost, its heartbeat shows
    // the gap, a asks, b answers.
    let mut fb = Effects::default();
    b.close(2, false, 50, &mut fb);
    b.flush(&mut fb);
    drop(fb); // lost
    let mut fb = Effects::default();
    b.tick(50 + HEARTBEAT + 1, &mut fb);
    let mut ea = Effects::default();
    for m in fb.messages {
        a.on_message(m, 1100, &mut ea);
    }
    let asks: Vec<Message> = ea
        .messages
        .drain(..)
        .filter(|m| matches!(m.body, Body::SyncRequest { .. }))
        .collect();
    assert_eq!(asks.len(), 1);
    let mut fb = Effects::default();
    for m in asks {
        b.on_message(m, 1200, &mut fb);
    }
    b.tick(1300, &mut fb);
    let mut ea = Effects::default();
    for m in fb.messages {
        a.on_message(m, 1400, &mut ea);
    }
    assert!(a.members(&room).is_empty());
    assert_eq!(
        ea.events.iter().map(|e| e.kind).collect::<Vec<_>>(),
        vec![EventKind::Leave]
    );
}

#[test]
fn after_its_goodbye_a_draining_replica_announces_nothing() {
    let mut a = Core::new(config(0, 1));
    let mut b = Core::new(config(1, 1));
    let room = keys()[0].clone();
    let mut fa = Effects::default();
    a.set(
        1,
        room.clone(),
        "alice".into(),
        Bytes::from_static(&[0x80]),
        10,
        &mut fa,
    )
    .unwrap();
    a.flush(&mut fa);
    let mut eb = Effects::default();
    for m in fa.messages {
        b.on_message(m, 20, &mut eb);
    }
    assert_eq!(b.members(&room).len(), 1);
    let mut fa = Effects::default();
    let bye = a.goodbye(30, &mut fa);
    assert_eq!(
        fa.events.iter().map(|e| e.kind).collect::<Vec<_>>(),
        vec![EventKind::Leave]
    );
    let mut eb = Effects::default();
    b.on_message(bye, 40, &mut eb);
    assert!(b.members(&room).is_empty());
    // A session still draining sends presence: refused; time passes: no heartbeat, no
    // snapshot that would take it back.
    let mut fa = Effects::default();
    assert_eq!(
        a.set(
            2,
            room.clone(),
            "bob".into(),
            Bytes::from_static(&[0x80]),
            50,
            &mut fa
        ),
        Err(super::core::Refusal::Draining)
    );
    a.tick(50 + 10 * HEARTBEAT, &mut fa);
    a.hello(&mut fa);
    assert!(fa.messages.is_empty(), "{:?}", fa.messages);
}
