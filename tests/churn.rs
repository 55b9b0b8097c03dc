//! Model-based churn test: seeded random sequences of connect, disconnect, reconnect with
//! restore, subscribe (exact, wildcard, with filters, load-balanced), unsubscribe, setFilters
//! and publish, across several sessions, actors and scopes, against the real proxy on both
//! brokers. A reference model predicts which session receives which message:
//!
//! - every message published after a subscription's reply (`subscribed`, `filtersUpdated`,
//!   or the `auth` reply of a restoring reconnect) reaches every matching subscription of
//!   every session exactly once (once per subscription string, as the SDK routes);
//! - a load-balanced group's message reaches exactly one of its members;
//! - nothing reaches a session of another namespace, or a subscription that does not match.
//!
//! Failures print the seed; `CHURN_SEED=<n>` replays one sequence, `CHURN_SEQUENCES` and
//! `CHURN_STEPS` change the size.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use common::server::*;
use common::*;
use futures_util::{SinkExt, StreamExt};
use rmpv::Value;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Who {
    Sensor1, // device, scope acme
    Sensor2, // device, scope globex
    Alice,   // user, scope acme
    Bob,     // user, unscoped
    Billing, // server, unscoped
}

const ACTORS: [Who; 5] = [
    Who::Sensor1,
    Who::Sensor2,
    Who::Alice,
    Who::Bob,
    Who::Billing,
];

impl Who {
    fn token(self) -> String {
        match self {
            Who::Sensor1 => SENSOR1_TOKEN.into(),
            Who::Sensor2 => SENSOR2_TOKEN.into(),
            Who::Alice => hs256(&user_claims("alice")),
            Who::Bob => hs256(&user_claims("bob")),
            Who::Billing => BILLING_KEY.into(),
        }
    }

    fn namespace(self) -> &'static str {
        match self {
            Who::Sensor1 | Who::Alice => "acme",
            Who::Sensor2 => "globex",
            Who::Bob | Who::Billing => "_",
        }
    }
}

/// Subscription strings the sequences use: all readable by every actor here.
const PATTERNS: [&str; 4] = [
    "chat/general/messages",
    "chat/lobby/messages",
    "chat/+/messages",
    "chat/#",
];
const ROOMS: [&str; 2] = ["general", "lobby"];
const FILTERS: [&str; 3] = ["a", "b", "c"];

#[derive(Debug, Clone, PartialEq, Eq)]
struct Sub {
    filters: Vec<String>,
    load_balance: bool,
}

impl Sub {
    fn matches(&self, pattern: &str, room: &str, filter: Option<&str>) -> bool {
        let topic_ok = match pattern {
            "chat/#" | "chat/+/messages" => true,
            p => p == format!("chat/{room}/messages"),
        };
        // Unfiltered subscriptions get filtered publishes too (PROTOCOL A4).
        let filter_ok =
            self.filters.is_empty() || filter.is_some_and(|f| self.filters.iter().any(|s| s == f));
        topic_ok && filter_ok
    }
}

/// A live client connection.
struct Conn {
    who: Who,
    tx: futures_util::stream::SplitSink<
        tokio_tungstenite::WebSocketStream<
            tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
        >,
        Message,
    >,
    rx: mpsc::UnboundedReceiver<Value>,
    /// Subscriptions confirmed by the proxy (the model).
    subs: BTreeMap<String, Sub>,
    /// Messages received: (subscription string, payload id) → copies.
    got: HashMap<(String, u64), u32>,
}

async fn connect(url: &str, who: Who, reconnect: bool) -> (Conn, Value) {
    let (ws, _) = tokio_tungstenite::connect_async(url)
        .await
        .expect("websocket connects");
    let (mut tx, mut stream) = ws.split();
    let (ftx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(Ok(m)) = stream.next().await {
            if let Message::Binary(b) = m
                && !b.is_empty()
            {
                let mut slice = &b[..];
                if let Ok(v) = rmpv::decode::read_value(&mut slice)
                    && ftx.send(v).is_err()
                {
                    return;
                }
            }
        }
    });
    let mut auth = vec![("type", "auth".into()), ("token", who.token().into())];
    if reconnect {
        auth.push(("reconnect", true.into()));
    }
    tx.send(Message::Binary(encode(&map(&auth)).into()))
        .await
        .unwrap();
    let mut c = Conn {
        who,
        tx,
        rx,
        subs: BTreeMap::new(),
        got: HashMap::new(),
    };
    let reply = c.wait_for("auth", None).await;
    (c, reply)
}

impl Conn {
    async fn send(&mut self, v: Value) {
        self.tx
            .send(Message::Binary(encode(&v).into()))
            .await
            .unwrap();
    }

    fn record(&mut self, frame: &Value) {
        if std::env::var("CHURN_TRACE").as_deref() == Ok("2") {
            eprintln!("    {:?} got {frame}", self.who);
        }
        if get_str(frame, "type") == Some("message") {
            let topic = get_str(frame, "topic").unwrap_or_default().to_string();
            let id = get_str(frame, "data")
                .and_then(|d| d.strip_prefix('m'))
                .and_then(|n| n.parse().ok())
                .unwrap_or(u64::MAX);
            *self.got.entry((topic, id)).or_insert(0) += 1;
        }
    }

    /// Waits for a frame of `kind` (for `topic`), recording messages met on the way. Error
    /// frames fail the test: every step here is one the policy allows.
    async fn wait_for(&mut self, kind: &str, topic: Option<&str>) -> Value {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let Ok(Some(f)) = tokio::time::timeout_at(deadline, self.rx.recv()).await else {
                panic!("no {kind} for {topic:?} within 5 s");
            };
            self.record(&f);
            let t = get_str(&f, "type");
            if t == Some("error") {
                panic!("error frame while waiting for {kind}: {f}");
            }
            if t == Some(kind) && (topic.is_none() || get_str(&f, "topic") == topic) {
                return f;
            }
        }
    }

    /// Takes everything already received.
    fn drain(&mut self) {
        while let Ok(f) = self.rx.try_recv() {
            if get_str(&f, "type") == Some("error") {
                panic!("unexpected error frame: {f}");
            }
            self.record(&f);
        }
    }
}

fn filters_value(fs: &[String]) -> Value {
    Value::Array(fs.iter().map(|f| Value::from(f.as_str())).collect())
}

/// The SDK's `subscribe`: `loadBalance` only when on, `filters` only when non-empty.
fn subscription_frame(pattern: &str, load_balance: bool, filters: &[String]) -> Value {
    let mut extra = Vec::new();
    if load_balance {
        extra.push(("loadBalance", true.into()));
    }
    if !filters.is_empty() {
        extra.push(("filters", filters_value(filters)));
    }
    subscribe_frame(pattern, &extra)
}

/// What one publish must produce: (slot, subscription string) receivers, and load-balanced
/// groups (exactly one member each).
struct Expected {
    id: u64,
    each: HashSet<(usize, String)>,
    groups: Vec<(Share, Vec<(usize, String)>)>,
    /// Subscriptions confirmed after the publish was sent that match it: the message may
    /// still have been on its way to the broker, so they may get it (never required to).
    allowed: HashSet<(usize, String)>,
    /// The load-balanced ones among `allowed`, with their share (they count as members of it).
    allowed_lb: HashMap<(usize, String), Share>,
    /// Subscriptions replaced (re-subscribed) while the message was in flight: the proxy joins
    /// the new upstream filters before leaving the old, so nothing is lost and a copy may come
    /// through each — at most twice (QoS 1 is at-least-once) — and, for a switch between
    /// broadcast and load-balanced, the copy through the old one does not count as a member of
    /// the new one's share.
    twice: HashSet<(usize, String)>,
    ns: &'static str,
    room: &'static str,
    filter: Option<&'static str>,
}

/// One upstream shared subscription: (namespace, pattern, group — the actor, the upstream
/// filter level: `#` without filters, else the message's filter). MQTT identifies a shared
/// subscription by group *and* filter, so one actor's two load-balanced subscriptions of a
/// pattern with different filters are two shares, each owed one copy.
type Share = (&'static str, String, Who, String);

fn share_of(ns: &'static str, pattern: &str, who: Who, sub: &Sub, filter: Option<&str>) -> Share {
    let level = if sub.filters.is_empty() {
        "#".to_string()
    } else {
        filter.unwrap_or_default().to_string()
    };
    (ns, pattern.to_string(), who, level)
}

struct Model {
    slots: Vec<Option<Conn>>,
    /// The stored set per actor (the last set any of its sockets changed to).
    records: HashMap<Who, BTreeMap<String, Sub>>,
    expected: Vec<Expected>,
    next_id: u64,
}

impl Model {
    /// Slot `slot`'s connection goes away (after a settle): what it received is settled, and
    /// nothing further is expected of it.
    fn forget(&mut self, slot: usize) {
        let got = self.slots[slot]
            .as_ref()
            .map(|c| c.got.clone())
            .unwrap_or_default();
        for e in &mut self.expected {
            e.each.retain(|k| k.0 != slot);
            e.allowed.retain(|k| k.0 != slot);
            e.allowed_lb.retain(|k, _| k.0 != slot);
            e.groups.retain(|(_, g)| {
                !g.iter()
                    .any(|k| k.0 == slot && got.contains_key(&(k.1.clone(), e.id)))
            });
            for (_, g) in &mut e.groups {
                g.retain(|k| k.0 != slot);
            }
            e.groups.retain(|(_, g)| !g.is_empty());
        }
        self.slots[slot] = None;
    }

    /// `slot` is about to replace its subscription `pattern`: publishes on their way may reach
    /// it through the old and the new upstream filters.
    fn allow_twice(&mut self, slot: usize, pattern: &str) {
        let Some(c) = &self.slots[slot] else { return };
        if !c.subs.contains_key(pattern) {
            return;
        }
        for e in &mut self.expected {
            e.twice.insert((slot, pattern.to_string()));
        }
    }

    /// A subscription of `slot` was just confirmed: earlier publishes it matches may reach it.
    fn allow_in_flight(&mut self, slot: usize) {
        let Some(c) = &self.slots[slot] else { return };
        for e in &mut self.expected {
            if c.who.namespace() != e.ns {
                continue;
            }
            for (pattern, sub) in &c.subs {
                if sub.matches(pattern, e.room, e.filter) {
                    e.allowed.insert((slot, pattern.clone()));
                    if sub.load_balance {
                        let share = share_of(e.ns, pattern, c.who, sub, e.filter);
                        e.allowed_lb.insert((slot, pattern.clone()), share);
                    }
                }
            }
        }
    }

    fn predict(
        &self,
        publisher: usize,
        room: &'static str,
        filter: Option<&'static str>,
        echo: bool,
        id: u64,
    ) -> Expected {
        let Some(p) = &self.slots[publisher] else {
            unreachable!()
        };
        let ns = p.who.namespace();
        let mut each = HashSet::new();
        let mut groups: HashMap<Share, Vec<(usize, String)>> = HashMap::new();
        for (i, c) in self.slots.iter().enumerate() {
            let Some(c) = c else { continue };
            if c.who.namespace() != ns || (!echo && i == publisher) {
                continue;
            }
            for (pattern, sub) in &c.subs {
                if !sub.matches(pattern, room, filter) {
                    continue;
                }
                if sub.load_balance {
                    // The group defaults to the actor id: same actor, same pattern, same
                    // upstream filter → one share.
                    groups
                        .entry(share_of(ns, pattern, c.who, sub, filter))
                        .or_default()
                        .push((i, pattern.clone()));
                } else {
                    each.insert((i, pattern.clone()));
                }
            }
        }
        Expected {
            id,
            each,
            groups: groups.into_iter().collect(),
            allowed: HashSet::new(),
            allowed_lb: HashMap::new(),
            twice: HashSet::new(),
            ns,
            room,
            filter,
        }
    }
}

/// Received copies of message `id` per (slot, subscription string).
fn copies(slots: &[Option<Conn>], id: u64) -> HashMap<(usize, String), u32> {
    let mut out = HashMap::new();
    for (i, c) in slots.iter().enumerate() {
        let Some(c) = c else { continue };
        for ((topic, mid), n) in &c.got {
            if *mid == id {
                out.insert((i, topic.clone()), *n);
            }
        }
    }
    out
}

/// Checks one publish's deliveries; `complete` once everything expected has arrived.
fn check(e: &Expected, slots: &[Option<Conn>], seed: u64, complete: bool) -> bool {
    let got = copies(slots, e.id);
    let in_groups: HashSet<&(usize, String)> = e.groups.iter().flat_map(|(_, g)| g).collect();
    for (k, n) in &got {
        assert!(
            e.each.contains(k) || in_groups.contains(k) || e.allowed.contains(k),
            "seed {seed}: message {} reached slot {} via {:?}, which the model says must not get it (expected {:?} and groups {:?})",
            e.id,
            k.0,
            k.1,
            e.each,
            e.groups
        );
        let most = if e.twice.contains(k) { 2 } else { 1 };
        assert!(
            *n <= most,
            "seed {seed}: message {} reached {k:?} {n} times",
            e.id
        );
    }
    // In-flight members count towards the share they joined.
    for (share, g) in &e.groups {
        let reached: Vec<&(usize, String)> = g
            .iter()
            .chain(
                e.allowed_lb
                    .iter()
                    .filter(|(k, s)| *s == share && !g.contains(k))
                    .map(|(k, _)| k),
            )
            .filter(|m| got.contains_key(*m))
            .collect();
        let members = reached.len();
        let strict = reached.iter().filter(|m| !e.twice.contains(**m)).count();
        assert!(
            strict <= 1,
            "seed {seed}: load-balanced message {} reached {strict} members of {g:?}",
            e.id
        );
        if complete && members == 0 {
            return false;
        }
    }
    if !complete {
        return true;
    }
    e.each.iter().all(|k| got.contains_key(k))
}

/// Waits until every expected delivery of the publishes so far has arrived, asserting no
/// unexpected or duplicate one on the way.
/// Closes `slot`'s socket and waits until the proxy has ended its session: the model has the
/// old connection gone before anything else happens. (Dropping only the sending half would
/// leave the socket open and its session subscribed — still a member of its load-balance
/// groups, which then hand it messages the model expects elsewhere.)
async fn disconnect(p: &TestProxy, m: &mut Model, slot: usize) {
    if let Some(c) = m.slots[slot].as_mut() {
        let _ = c.tx.close().await;
    }
    m.forget(slot);
    let live = m.slots.iter().flatten().count();
    tokio::time::timeout(Duration::from_secs(5), async {
        while p.proxy.open_connections() > live {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    })
    .await
    .expect("the proxy ends a closed session");
}

async fn settle(m: &mut Model, seed: u64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        for c in m.slots.iter_mut().flatten() {
            c.drain();
        }
        let done = m.expected.iter().all(|e| check(e, &m.slots, seed, true));
        if done {
            return;
        }
        if tokio::time::Instant::now() > deadline {
            for e in &m.expected {
                if !check(e, &m.slots, seed, true) {
                    let got = copies(&m.slots, e.id);
                    let missing: Vec<_> = e.each.iter().filter(|k| !got.contains_key(*k)).collect();
                    let all: Vec<_> = m
                        .slots
                        .iter()
                        .enumerate()
                        .filter_map(|(i, c)| {
                            c.as_ref().map(|c| (i, c.got.keys().collect::<Vec<_>>()))
                        })
                        .collect();
                    panic!(
                        "seed {seed}: message {} missed {missing:?} (groups {:?}, got {got:?}; everything received: {all:?})",
                        e.id, e.groups
                    );
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn sequence(p: &TestProxy, seed: u64, steps: usize) {
    let mut rng = Rng(seed);
    let mut m = Model {
        slots: (0..5).map(|_| None).collect(),
        records: HashMap::new(),
        expected: Vec::new(),
        next_id: 0,
    };
    for _ in 0..steps {
        let slot = rng.below(m.slots.len());
        let Some(conn) = m.slots[slot].as_mut() else {
            let who = *rng.pick(&ACTORS);
            let (c, reply) = connect(&p.url, who, false).await;
            assert_eq!(
                get(&reply, "success"),
                Some(&Value::Boolean(true)),
                "{reply}"
            );
            m.slots[slot] = Some(c);
            m.allow_in_flight(slot);
            continue;
        };
        let who = conn.who;
        let action = rng.below(20);
        if std::env::var("CHURN_TRACE").is_ok() {
            eprintln!(
                "step: slot {slot} ({who:?}) action {action} subs {:?}",
                conn.subs
            );
        }
        match action {
            // Publish (the most common step).
            0..=7 => {
                let room = *rng.pick(&ROOMS);
                let filter = (rng.below(3) == 0).then(|| *rng.pick(&FILTERS));
                let echo = rng.below(4) != 0;
                let id = m.next_id;
                m.next_id += 1;
                let mut frame = vec![
                    ("type", "publish".into()),
                    ("topic", format!("chat/{room}/messages").into()),
                    ("data", format!("m{id}").into()),
                    ("qos", 1.into()),
                    ("echo", echo.into()),
                ];
                if let Some(f) = filter {
                    frame.push(("filter", f.into()));
                }
                let expected = m.predict(slot, room, filter, echo, id);
                if std::env::var("CHURN_TRACE").is_ok() {
                    eprintln!("  publish {id} room {room} filter {filter:?} echo {echo}");
                }
                let Some(conn) = m.slots[slot].as_mut() else {
                    unreachable!()
                };
                conn.send(map(&frame)).await;
                m.expected.push(expected);
                settle(&mut m, seed).await;
            }
            // Subscribe (exact, wildcard, filters, load-balanced): live once confirmed.
            8..=11 => {
                let pattern = rng.pick(&PATTERNS).to_string();
                let load_balance = rng.below(5) == 0;
                let filters: Vec<String> =
                    if !load_balance && pattern != "chat/#" && rng.below(3) == 0 {
                        vec![rng.pick(&FILTERS).to_string()]
                    } else {
                        vec![]
                    };
                let frame = subscription_frame(&pattern, load_balance, &filters);
                m.allow_twice(slot, &pattern);
                let Some(conn) = m.slots[slot].as_mut() else {
                    unreachable!()
                };
                conn.send(frame).await;
                conn.wait_for("subscribed", Some(&pattern)).await;
                if std::env::var("CHURN_TRACE").is_ok() {
                    eprintln!("  subscribed {pattern} filters {filters:?} lb {load_balance}");
                }
                let before = conn.subs.clone();
                conn.subs.insert(
                    pattern,
                    Sub {
                        filters,
                        load_balance,
                    },
                );
                if conn.subs != before {
                    let set = conn.subs.clone();
                    m.records.insert(who, set);
                }
                m.allow_in_flight(slot);
            }
            // Unsubscribe (sometimes of a topic never subscribed).
            12..=13 => {
                let pattern = rng.pick(&PATTERNS).to_string();
                // Messages already on their way to the old subscription are settled first.
                settle(&mut m, seed).await;
                let Some(conn) = m.slots[slot].as_mut() else {
                    unreachable!()
                };
                conn.send(map(&[
                    ("type", "unsubscribe".into()),
                    ("topic", pattern.as_str().into()),
                ]))
                .await;
                conn.wait_for("unsubscribed", Some(&pattern)).await;
                if conn.subs.remove(&pattern).is_some() {
                    let set = conn.subs.clone();
                    m.records.insert(who, set);
                }
            }
            // Unsubscribe and resubscribe at once (a page's handler churn).
            14 => {
                let Some(pattern) = conn.subs.keys().next().cloned() else {
                    continue;
                };
                settle(&mut m, seed).await;
                let Some(conn) = m.slots[slot].as_mut() else {
                    unreachable!()
                };
                let sub = conn.subs.remove(&pattern).unwrap_or(Sub {
                    filters: vec![],
                    load_balance: false,
                });
                conn.send(map(&[
                    ("type", "unsubscribe".into()),
                    ("topic", pattern.as_str().into()),
                ]))
                .await;
                conn.send(subscription_frame(&pattern, sub.load_balance, &sub.filters))
                    .await;
                conn.wait_for("unsubscribed", Some(&pattern)).await;
                conn.wait_for("subscribed", Some(&pattern)).await;
                conn.subs.insert(pattern, sub);
                let set = conn.subs.clone();
                m.records.insert(who, set);
                m.allow_in_flight(slot);
            }
            // setFilters on a subscription (not load-balanced ones, to keep groups simple).
            15..=16 => {
                let Some((pattern, sub)) = conn
                    .subs
                    .iter()
                    .find(|(p, s)| !s.load_balance && p.as_str() != "chat/#")
                    .map(|(p, s)| (p.clone(), s.clone()))
                else {
                    continue;
                };
                let filters: Vec<String> = if rng.below(3) == 0 {
                    vec![]
                } else {
                    vec![rng.pick(&FILTERS).to_string()]
                };
                let narrowing = !sub.filters.is_empty() || !filters.is_empty();
                if narrowing {
                    settle(&mut m, seed).await;
                }
                let Some(conn) = m.slots[slot].as_mut() else {
                    unreachable!()
                };
                conn.send(map(&[
                    ("type", "setFilters".into()),
                    ("topic", pattern.as_str().into()),
                    ("filters", filters_value(&filters)),
                ]))
                .await;
                conn.wait_for("filtersUpdated", Some(&pattern)).await;
                let before = conn.subs.clone();
                conn.subs.insert(
                    pattern,
                    Sub {
                        filters,
                        load_balance: false,
                    },
                );
                if conn.subs != before {
                    let set = conn.subs.clone();
                    m.records.insert(who, set);
                }
                m.allow_in_flight(slot);
            }
            // Disconnect.
            17 => {
                settle(&mut m, seed).await;
                disconnect(p, &mut m, slot).await;
            }
            // Reconnect with restore (the SDK's automatic reconnect), or a page reload.
            _ => {
                settle(&mut m, seed).await;
                disconnect(p, &mut m, slot).await;
                let (mut c, reply) = connect(&p.url, who, true).await;
                assert_eq!(
                    get(&reply, "success"),
                    Some(&Value::Boolean(true)),
                    "{reply}"
                );
                let record = m.records.get(&who).cloned().unwrap_or_default();
                let names = restored_names(&reply);
                let want: Vec<String> = record.keys().cloned().collect();
                assert_eq!(names, want, "seed {seed}: restored set of {who:?}");
                c.subs = record;
                m.slots[slot] = Some(c);
                m.allow_in_flight(slot);
            }
        }
    }
    settle(&mut m, seed).await;
    // Stragglers: nothing more may arrive.
    tokio::time::sleep(Duration::from_millis(300)).await;
    for c in m.slots.iter_mut().flatten() {
        c.drain();
    }
    for e in &m.expected {
        assert!(
            check(e, &m.slots, seed, true),
            "seed {seed}: message {} incomplete at the end",
            e.id
        );
    }
}

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

async fn churn(b: TestBroker, linger_ms: u64) {
    if std::env::var("CHURN_TRACE").as_deref() == Ok("3") {
        let _ = cuttle::logging::try_init(
            cuttle::config::LogFormat::Pretty,
            tracing_subscriber::EnvFilter::new("cuttle::upstream=trace"),
            std::io::stderr,
            false,
        );
    }
    let sequences = env_num("CHURN_SEQUENCES", 8);
    let steps = env_num("CHURN_STEPS", 100) as usize;
    let base = env_num("CHURN_SEED", 0xC0FFEE ^ linger_ms);
    let seeds: Vec<u64> = match std::env::var("CHURN_SEED") {
        Ok(_) => vec![base],
        Err(_) => (0..sequences)
            .map(|i| base.wrapping_add(i * 7919))
            .collect(),
    };
    for seed in seeds {
        // A fresh proxy per sequence: records and lingering entries start empty.
        let p = start_proxy_upstream(b, &format!("unsubscribe_delay_ms: {linger_ms}"), "").await;
        eprintln!("churn: broker {b:?}, linger {linger_ms} ms, seed {seed}, {steps} steps");
        sequence(&p, seed, steps).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churn_embedded_with_linger() {
    churn(TestBroker::Embedded, 2000).await;
}

/// Without the linger every leave unsubscribes upstream at once, and a rejoin subscribes
/// again with a new id: the broker sees UNSUBSCRIBE/SUBSCRIBE pairs for one filter in quick
/// succession.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churn_embedded_without_linger() {
    churn(TestBroker::Embedded, 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churn_mosquitto_without_linger() {
    churn(TestBroker::Mosquitto, 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churn_mosquitto_with_linger() {
    churn(TestBroker::Mosquitto, 2000).await;
}

/// The guarantee the churn test leans on, alone: a publish sent right after `subscribed`
/// arrives, with echo on and off, for a filter new upstream every time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_right_after_subscribed_arrives() {
    let p = start_proxy_upstream(TestBroker::Embedded, "unsubscribe_delay_ms: 0", "").await;
    let (mut publ, _) = connect(&p.url, Who::Alice, false).await;
    for round in 0..20u64 {
        let (mut sub, _) = connect(&p.url, Who::Alice, false).await;
        sub.send(subscribe_frame("chat/general/messages", &[]))
            .await;
        sub.wait_for("subscribed", Some("chat/general/messages"))
            .await;
        publ.send(map(&[
            ("type", "publish".into()),
            ("topic", "chat/general/messages".into()),
            ("data", format!("m{round}").into()),
            ("echo", (round % 2 == 0).into()),
        ]))
        .await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
        while !sub
            .got
            .contains_key(&("chat/general/messages".to_string(), round))
        {
            assert!(
                tokio::time::Instant::now() < deadline,
                "round {round}: not delivered"
            );
            sub.drain();
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}
