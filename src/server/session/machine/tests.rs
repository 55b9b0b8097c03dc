//! Unit tests of the session machine, without a socket or a broker: a [`Proxy`] built
//! in-process ([`Proxy::without_broker`]), a [`Machine`] per client, encoded client frames in,
//! decoded replies out. Router effects are observed through the router itself: its entries,
//! and messages handed to it as the broker would ([`Router::matching_ids`] stands in for the
//! broker's matching), which reach the client's outbox. Stored-set effects are observed
//! through the restore writer's pending record.
//!
//! The clock is Tokio's, paused (`start_paused`), so the control token bucket refills only
//! when a test advances it. The publish window is aligned to the wall-clock second (PROTOCOL
//! §9), which a test cannot pause: those tests retry when a second boundary fell inside them.
//!
//! Not observable without a broker, so not tested here: the upstream topic and payload of a
//! publish (echo envelope, QoS, retain), the `published` reply (needs the broker's PUBACK),
//! the pool's refusals (`TooLarge` needs the broker's Maximum Packet Size, `Saturated` tens of
//! MiB queued), and replies that wait for a SUBACK (`Readiness::Later`). The integration
//! tests (`tests/e2e.rs`, `tests/upstream.rs`) cover those against a real broker.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use rmpv::Value;

use super::*;
use crate::config::Loaded;
use crate::router::{OutboxReceiver, Overflow};
use crate::topic::upstream::TopicLayout;
use crate::upstream::Dispatch;

const JWT_SECRET: &str = "unit-jwt-secret-0123456789abcdef-0123456789";
const SESSION_SECRET: &str = "unit-session-secret-0123456789abcdef-01234";
/// `sensor-1`: an unscoped device.
const SENSOR: &str = "tok-sensor-1";
/// `sensor-2`: a device in scope `acme`.
const ACME_SENSOR: &str = "tok-sensor-2";
/// `billing`: a server actor, member of the private room `vip`.
const BILLING: &str = "key-billing";

fn env(var: &str) -> Option<String> {
    match var {
        "JWT_SECRET" => Some(JWT_SECRET.into()),
        "SESSION_SECRET" => Some(SESSION_SECRET.into()),
        _ => None,
    }
}

fn sha(token: &str) -> String {
    hex::encode(crate::auth::sha256(token))
}

/// The whole `proxy.yaml`: `limits` and `upstream` are flow-map entries (`key: value`).
fn config(limits: &[&str], upstream: &[&str]) -> String {
    config_with_presence(limits, upstream, &[])
}

/// [`config`] with `presence:` settings (flow-map entries).
fn config_with_presence(limits: &[&str], upstream: &[&str], presence: &[&str]) -> String {
    let mut up = vec!["pool: 1"];
    up.extend_from_slice(upstream);
    format!(
        r#"
upstream: {{ {up} }}
limits: {{ {limits} }}
presence: {{ {presence} }}
policy:
  projects:
    - id: demo
      jwt: {{ issuer: https://id.example.com, audience: cuttle, algorithms: [HS256], secret_env: JWT_SECRET }}
      session: {{ secret_env: SESSION_SECRET, max_ttl_s: 3600 }}
      scopes: [ {{ slug: acme }} ]
      apps:
        - slug: chat
          topics:
            messages:  {{ device: read-write, user: read-write, session: read, server: read-write }}
            orders:    {{ device: read, server: read-write }}
            analytics: {{ user: none, server: write }}
          rooms:
            - slug: general
            - slug: lobby
            - slug: vip
              actors: [alice, billing]
          lobbies:
            - {{ slug: hall, rooms: [general, lobby, vip] }}
            - {{ slug: backstage, rooms: [vip] }}
      actors:
        - {{ id: alice, type: user }}
        - {{ id: sensor-1, type: device, token_sha256: "{s1}" }}
        - {{ id: sensor-2, type: device, token_sha256: "{s2}", scope: acme }}
        - {{ id: billing, type: server, api_key_sha256: "{billing}" }}
"#,
        up = up.join(", "),
        limits = limits.join(", "),
        presence = presence.join(", "),
        s1 = sha(SENSOR),
        s2 = sha(ACME_SENSOR),
        billing = sha(BILLING),
    )
}

fn loaded(text: &str, path: &Path) -> Loaded {
    crate::config::load_str(text, path, &env).unwrap_or_else(|d| panic!("test config:\n{d}"))
}

/// A proxy with these limits and upstream settings (see [`config`]).
fn proxy_with(limits: &[&str], upstream: &[&str]) -> Arc<Proxy> {
    Proxy::without_broker(loaded(
        &config(limits, upstream),
        Path::new("/nonexistent/proxy.yaml"),
    ))
}

fn proxy() -> Arc<Proxy> {
    proxy_with(&[], &[])
}

fn authenticate(proxy: &Proxy, token: &str) -> Arc<Actor> {
    proxy
        .store
        .snapshot()
        .auth
        .authenticate(token)
        .unwrap_or_else(|e| panic!("{token} authenticates: {e}"))
}

fn user_token(sub: &str) -> String {
    let now = now_unix();
    let claims = serde_json::json!({
        "iss": "https://id.example.com",
        "aud": "cuttle",
        "sub": sub,
        "iat": now,
        "exp": now + 600,
    });
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(JWT_SECRET.as_bytes()),
    )
    .expect("token signed")
}

/// A guest session token limited to `rooms` (`app/room`).
fn session_token(proxy: &Proxy, rooms: &[&str]) -> String {
    let req = crate::auth::session_token::MintRequest {
        project: "demo".into(),
        ttl_s: 600,
        scope: None,
        rooms: rooms.iter().map(|r| r.to_string()).collect(),
    };
    crate::auth::session_token::mint(&proxy.store.snapshot().policy, &req, now_unix())
        .expect("session token minted")
}

/// One client: a machine and the receiving end of its outbox.
struct Client {
    machine: Machine,
    rx: OutboxReceiver,
    _overflow: Arc<Overflow>,
}

impl Client {
    fn new(proxy: &Arc<Proxy>, actor: Arc<Actor>, version: u32) -> Self {
        let (session, socket_id) = proxy.new_session_id();
        let limits = proxy.settings.limits;
        let (outbox, rx, overflow) = Outbox::channel(limits.send_queue, limits.send_queue_bytes);
        Self {
            machine: Machine::new(proxy.clone(), session, socket_id, actor, version, outbox),
            rx,
            _overflow: overflow,
        }
    }

    fn device(proxy: &Arc<Proxy>) -> Self {
        Self::new(proxy, authenticate(proxy, SENSOR), 1)
    }

    /// The replies to one frame.
    fn send(&mut self, frame: &[u8]) -> Vec<Bytes> {
        let mut out = Vec::new();
        self.machine.on_frame(frame, &mut out);
        out
    }

    /// The one reply to `frame`.
    fn reply(&mut self, frame: &[u8]) -> Bytes {
        let out = self.send(frame);
        assert_eq!(out.len(), 1, "one reply expected, got {:?}", decoded(&out));
        out.into_iter().next().expect("one reply")
    }

    fn silent(&mut self, frame: &[u8]) {
        let out = self.send(frame);
        assert!(out.is_empty(), "no reply expected, got {:?}", decoded(&out));
    }

    /// Frames queued on the outbox (deliveries, late replies).
    fn queued(&mut self) -> Vec<Bytes> {
        std::iter::from_fn(|| self.rx.try_recv()).collect()
    }

    fn subscribe_ok(&mut self, topic: &str) {
        let r = self.reply(&subscribe(topic));
        assert_eq!(r, encode::subscribed(topic, false), "{:?}", fields(&r));
    }

    fn stored(&self, proxy: &Proxy) -> Option<Bytes> {
        proxy.restore.pending(&self.machine.restore_topic)
    }
}

// --- client frames ------------------------------------------------------------------------

fn frame(pairs: &[(&str, Value)]) -> Vec<u8> {
    let map = Value::Map(
        pairs
            .iter()
            .map(|(k, v)| (Value::from(*k), v.clone()))
            .collect(),
    );
    let mut out = Vec::new();
    rmpv::encode::write_value(&mut out, &map).expect("vec write");
    out
}

fn subscribe(topic: &str) -> Vec<u8> {
    subscribe_with(topic, &[])
}

fn subscribe_with(topic: &str, extra: &[(&str, Value)]) -> Vec<u8> {
    let mut pairs = vec![
        ("type", Value::from("subscribe")),
        ("topic", Value::from(topic)),
        ("qos", Value::from(1)),
    ];
    pairs.extend_from_slice(extra);
    frame(&pairs)
}

fn unsubscribe(topic: &str) -> Vec<u8> {
    frame(&[
        ("type", Value::from("unsubscribe")),
        ("topic", Value::from(topic)),
    ])
}

fn set_filters(topic: &str, filters: Value) -> Vec<u8> {
    frame(&[
        ("type", Value::from("setFilters")),
        ("topic", Value::from(topic)),
        ("filters", filters),
    ])
}

fn strs(items: &[&str]) -> Value {
    Value::Array(items.iter().map(|s| Value::from(*s)).collect())
}

fn publish(topic: &str, extra: &[(&str, Value)]) -> Vec<u8> {
    let mut pairs = vec![
        ("type", Value::from("publish")),
        ("topic", Value::from(topic)),
        ("data", Value::from("hello")),
        ("qos", Value::from(1)),
    ];
    pairs.extend_from_slice(extra);
    frame(&pairs)
}

// --- server frames ------------------------------------------------------------------------

/// A frame's fields, checking it is exactly one map with string keys.
fn fields(frame: &[u8]) -> BTreeMap<String, Value> {
    let mut rest = frame;
    let v = rmpv::decode::read_value(&mut rest).expect("MessagePack");
    assert!(rest.is_empty(), "exactly one value");
    let Value::Map(pairs) = v else {
        panic!("not a map: {v}")
    };
    pairs
        .into_iter()
        .map(|(k, v)| (k.as_str().expect("str key").to_string(), v))
        .collect()
}

fn decoded(frames: &[Bytes]) -> Vec<BTreeMap<String, Value>> {
    frames
        .iter()
        .map(|f| {
            if f.is_empty() {
                BTreeMap::new()
            } else {
                fields(f)
            }
        })
        .collect()
}

fn str_of<'a>(f: &'a BTreeMap<String, Value>, key: &str) -> Option<&'a str> {
    f.get(key).and_then(Value::as_str)
}

/// Asserts an error frame's wire fields literally (what the SDK matches on), independently of
/// the constructor that built it.
fn assert_error(
    frame: &[u8],
    error: &str,
    code: Option<u64>,
    topic: Option<&str>,
    hint: Option<&str>,
) {
    let f = fields(frame);
    assert_eq!(str_of(&f, "type"), Some("error"), "{f:?}");
    assert_eq!(str_of(&f, "error"), Some(error), "{f:?}");
    assert_eq!(f.get("code").and_then(Value::as_u64), code, "{f:?}");
    assert_eq!(str_of(&f, "topic"), topic, "{f:?}");
    if let Some(h) = hint {
        assert_eq!(str_of(&f, "hint"), Some(h), "{f:?}");
    }
}

/// Hands `data` to the router as the broker would deliver a message on `upstream`.
fn broker_delivers(proxy: &Proxy, upstream: &str, data: &Value) {
    let mut payload = Vec::new();
    rmpv::encode::write_value(&mut payload, data).expect("vec write");
    let ids = proxy.router.matching_ids(upstream);
    proxy.router.dispatch(upstream, &ids, payload.into());
}

/// `(topic, filter)` of each `message` frame.
fn messages(frames: &[Bytes]) -> Vec<(String, Option<String>)> {
    decoded(frames)
        .iter()
        .map(|f| {
            assert_eq!(str_of(f, "type"), Some("message"), "{f:?}");
            (
                str_of(f, "topic").expect("topic").to_string(),
                str_of(f, "filter").map(str::to_owned),
            )
        })
        .collect()
}

fn stored_names(record: &Bytes) -> Vec<String> {
    match restore::decode(record).expect("a valid record") {
        Some(r) => r.entries.into_iter().map(|e| e.name).collect(),
        None => Vec::new(),
    }
}

// --- heartbeats and frames that are not acted on -----------------------------------------

#[tokio::test(start_paused = true)]
async fn heartbeat_is_echoed_with_an_empty_frame() {
    let proxy = proxy();
    let mut c = Client::device(&proxy);
    assert_eq!(c.reply(b""), encode::heartbeat());
    assert!(c.reply(b"").is_empty());
}

#[tokio::test(start_paused = true)]
async fn frames_not_acted_on_are_ignored_silently() {
    let proxy = proxy();
    let mut c = Client::device(&proxy);
    // Unknown type, no type, a required key missing (PROTOCOL §6).
    c.silent(&frame(&[("type", Value::from("teleport"))]));
    c.silent(&frame(&[("topic", Value::from("chat/general/messages"))]));
    c.silent(&frame(&[("type", Value::from("subscribe"))]));
    c.silent(&frame(&[("type", Value::from("unsubscribe"))]));
    c.silent(&frame(&[
        ("type", Value::from("setFilters")),
        ("topic", Value::from("chat/general/messages")),
    ]));
    c.silent(&frame(&[
        ("type", Value::from("publish")),
        ("topic", Value::from("chat/general/messages")),
    ]));
    // A second auth (PROTOCOL §7), presence without data or lobby frames without lobbyId
    // (required keys missing), acks (no recording).
    c.silent(&frame(&[
        ("type", Value::from("auth")),
        ("token", Value::from(SENSOR)),
    ]));
    c.silent(&frame(&[("type", Value::from("presence"))]));
    for t in ["lobbySubscribe", "lobbyUnsubscribe", "getLobbyPresence"] {
        c.silent(&frame(&[("type", Value::from(t))]));
    }
    c.silent(&frame(&[
        ("type", Value::from("ack")),
        ("msgId", Value::from("m")),
    ]));
    c.silent(&frame(&[
        ("type", Value::from("batchAck")),
        ("msgIds", strs(&["m"])),
    ]));
    assert_eq!(proxy.router.filter_count(), 0);
    assert!(c.machine.subs.is_empty());
    assert!(c.queued().is_empty());
}

#[tokio::test(start_paused = true)]
async fn malformed_frames_get_invalid_frame() {
    let proxy = proxy();
    let mut c = Client::device(&proxy);
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (
            vec![0xc1],
            "invalid MessagePack: reserved MessagePack marker",
        ),
        (vec![0x81], "invalid MessagePack: truncated MessagePack"),
        (
            frame(&[]).into_iter().chain([0x01]).collect(),
            "a frame must be exactly one MessagePack value",
        ),
        (
            {
                let mut b = Vec::new();
                rmpv::encode::write_value(&mut b, &strs(&["subscribe"])).expect("vec write");
                b
            },
            "a frame must be a MessagePack map",
        ),
        (
            {
                let mut b = Vec::new();
                let v = Value::Map(vec![(Value::from(1), Value::from("subscribe"))]);
                rmpv::encode::write_value(&mut b, &v).expect("vec write");
                b
            },
            "frame keys must be strings",
        ),
        (
            frame(&[
                ("type", Value::from("subscribe")),
                ("topic", Value::from(7)),
            ]),
            "field 'topic' has the wrong type",
        ),
        (
            frame(&[
                ("type", Value::from("setFilters")),
                ("topic", Value::from("chat/general/messages")),
                ("filters", Value::from("a")),
            ]),
            "field 'filters' has the wrong type",
        ),
    ];
    for (bytes, hint) in cases {
        let r = c.reply(&bytes);
        assert_eq!(r, errors::invalid_frame(hint), "{:?}", fields(&r));
        assert_error(&r, "invalid_frame", None, None, Some(hint));
    }
    // More than 100 filters is refused while decoding, with the reference's own string.
    let many: Vec<String> = (0..101).map(|i| format!("f{i}")).collect();
    let many: Vec<&str> = many.iter().map(String::as_str).collect();
    let r = c.reply(&subscribe_with(
        "chat/general/messages",
        &[("filters", strs(&many))],
    ));
    assert_eq!(r, errors::plain("too_many_filters (max 100)"));
    assert_error(&r, "too_many_filters (max 100)", None, None, None);
    // None of it changed anything.
    assert_eq!(proxy.router.filter_count(), 0);
    assert!(c.machine.subs.is_empty());
    assert_eq!(c.stored(&proxy), None);
}

#[tokio::test(start_paused = true)]
async fn pre_auth_classifies_frames() {
    assert!(matches!(pre_auth(b""), PreAuth::Ignore));
    let auth = frame(&[
        ("type", Value::from("auth")),
        ("token", Value::from("t0k")),
        ("reconnect", Value::from(true)),
        ("protocolVersion", Value::from(7)),
    ]);
    match pre_auth(&auth) {
        PreAuth::Auth {
            token,
            reconnect,
            version,
        } => {
            assert_eq!(*token.expose(), "t0k");
            assert!(reconnect);
            assert_eq!(version, 2, "negotiated down to 2");
        }
        _ => panic!("an auth frame with a token"),
    }
    let plain = frame(&[("type", Value::from("auth")), ("token", Value::from("t"))]);
    assert!(matches!(
        pre_auth(&plain),
        PreAuth::Auth {
            reconnect: false,
            version: 1,
            ..
        }
    ));
    let not_auth = |b: &[u8]| match pre_auth(b) {
        PreAuth::Reply(r) => r,
        _ => panic!("a reply expected"),
    };
    // No token, or any other frame: not_authenticated (PROTOCOL §4).
    let no_token = frame(&[("type", Value::from("auth"))]);
    assert_eq!(not_auth(&no_token), errors::not_authenticated());
    assert_error(
        &not_auth(&subscribe("chat/general/messages")),
        "not_authenticated",
        None,
        None,
        None,
    );
    assert_error(
        &not_auth(&frame(&[("type", Value::from("teleport"))])),
        "not_authenticated",
        None,
        None,
        None,
    );
    assert_error(&not_auth(&[0xc1]), "invalid_frame", None, None, None);
}

// --- subscribe, unsubscribe, setFilters ---------------------------------------------------

#[tokio::test(start_paused = true)]
async fn subscribe_joins_the_router_and_delivers() {
    let proxy = proxy();
    let mut c = Client::device(&proxy);
    let r = c.reply(&subscribe("chat/general/messages"));
    let f = fields(&r);
    assert_eq!(str_of(&f, "type"), Some("subscribed"));
    assert_eq!(str_of(&f, "topic"), Some("chat/general/messages"));
    assert_eq!(f.get("loadBalance"), Some(&Value::from(false)));
    // No filters: the topic and all its sub-topics (PROTOCOL §10), in the unscoped namespace.
    assert!(
        proxy
            .router
            .subscription_id("chat/_/general/messages/#")
            .is_some()
    );
    assert_eq!(proxy.router.filter_count(), 1);

    broker_delivers(&proxy, "chat/_/general/messages", &Value::from(1));
    broker_delivers(&proxy, "chat/_/general/messages/x", &Value::from(2));
    broker_delivers(&proxy, "chat/_/lobby/messages", &Value::from(3));
    broker_delivers(&proxy, "chat/acme/general/messages", &Value::from(4));
    let got = c.queued();
    assert_eq!(
        messages(&got),
        [
            ("chat/general/messages".to_string(), None),
            ("chat/general/messages".to_string(), Some("x".to_string())),
        ]
    );
    assert_eq!(decoded(&got)[0].get("data"), Some(&Value::from(1)));

    // The stored set names the subscription.
    let stored = c.stored(&proxy).expect("set submitted");
    assert_eq!(stored_names(&stored), ["chat/general/messages"]);
}

#[tokio::test(start_paused = true)]
async fn scoped_actor_subscribes_in_its_own_namespace() {
    let proxy = proxy();
    let mut c = Client::new(&proxy, authenticate(&proxy, ACME_SENSOR), 1);
    c.subscribe_ok("chat/general/messages");
    assert!(
        proxy
            .router
            .subscription_id("chat/acme/general/messages/#")
            .is_some()
    );
    broker_delivers(&proxy, "chat/_/general/messages", &Value::from(1));
    assert!(
        c.queued().is_empty(),
        "another namespace's message delivered"
    );
    broker_delivers(&proxy, "chat/acme/general/messages", &Value::from(2));
    assert_eq!(messages(&c.queued()).len(), 1);
}

#[tokio::test(start_paused = true)]
async fn subscribe_with_filters_joins_one_filter_per_item() {
    let proxy = proxy();
    let mut c = Client::device(&proxy);
    let items = Value::Array(vec![Value::from("Red"), strs(&["b", "A"])]);
    c.subscribe_ok_with("chat/general/messages", &[("filters", items)]);
    assert!(
        proxy
            .router
            .subscription_id("chat/_/general/messages/Red")
            .is_some()
    );
    assert!(
        proxy
            .router
            .subscription_id("chat/_/general/messages/a|b")
            .is_some()
    );
    assert_eq!(proxy.router.filter_count(), 2);
    broker_delivers(&proxy, "chat/_/general/messages/Red", &Value::from(1));
    broker_delivers(&proxy, "chat/_/general/messages/a|b", &Value::from(2));
    broker_delivers(&proxy, "chat/_/general/messages", &Value::from(3));
    broker_delivers(&proxy, "chat/_/general/messages/blue", &Value::from(4));
    assert_eq!(
        messages(&c.queued()),
        [
            ("chat/general/messages".to_string(), Some("Red".to_string())),
            ("chat/general/messages".to_string(), Some("a|b".to_string())),
        ]
    );
}

impl Client {
    fn subscribe_ok_with(&mut self, topic: &str, extra: &[(&str, Value)]) {
        let r = self.reply(&subscribe_with(topic, extra));
        assert_eq!(
            str_of(&fields(&r), "type"),
            Some("subscribed"),
            "{:?}",
            fields(&r)
        );
    }
}

#[tokio::test(start_paused = true)]
async fn subscribe_errors_name_the_topic() {
    let proxy = proxy();
    let mut c = Client::device(&proxy);
    let topic = "chat/general/messages";
    let bad = [
        (
            vec![("filters", strs(&["a/b"]))],
            "invalid_filter_chars (/, #, +, | not allowed)",
        ),
        (
            vec![("filters", strs(&["a|b"]))],
            "invalid_filter_chars (/, #, +, | not allowed)",
        ),
        // An AND group needs at least two items.
        (
            vec![("filters", Value::Array(vec![strs(&["x"])]))],
            "invalid_filter_chars (/, #, +, | not allowed)",
        ),
        (
            vec![
                ("loadBalance", Value::from(true)),
                ("loadBalanceGroup", Value::from("g/1")),
            ],
            "invalid_load_balance_group (1-128 bytes; /, #, +, NUL not allowed)",
        ),
    ];
    for (extra, error) in bad {
        let r = c.reply(&subscribe_with(topic, &extra));
        assert_eq!(r, errors::filter_error(error, topic, None));
        assert_error(&r, error, None, Some(topic), None);
    }
    // Filters need a topic level to hang under.
    let r = c.reply(&subscribe_with(
        "chat/general/#",
        &[("filters", strs(&["a"]))],
    ));
    assert_error(
        &r,
        "filters_need_topic_level",
        None,
        Some("chat/general/#"),
        None,
    );
    // Not a topic at all.
    for t in [
        "chat",
        "chat/general",
        "chat//messages",
        "chat/gen#eral/messages",
    ] {
        let r = c.reply(&subscribe(t));
        assert_error(&r, "invalid_topic", None, Some(t), None);
        assert!(fields(&r).contains_key("hint"));
    }
    assert_eq!(proxy.router.filter_count(), 0);
    assert!(c.machine.subs.is_empty());
    assert_eq!(c.stored(&proxy), None, "nothing to store: nothing changed");
}

#[tokio::test(start_paused = true)]
async fn load_balanced_subscriptions_share_one_entry_and_deliver_once() {
    let proxy = proxy();
    let mut a = Client::device(&proxy);
    let mut b = Client::device(&proxy);
    let lb = [
        ("loadBalance", Value::from(true)),
        ("loadBalanceGroup", Value::from("workers")),
    ];
    for c in [&mut a, &mut b] {
        let r = c.reply(&subscribe_with("chat/general/messages", &lb));
        assert_eq!(r, encode::subscribed("chat/general/messages", true));
    }
    // One `$share` entry for both; the plain filter is not subscribed.
    assert_eq!(proxy.router.filter_count(), 1);
    assert!(
        proxy
            .router
            .subscription_id("chat/_/general/messages/#")
            .is_none()
    );
    for n in 0..4 {
        broker_delivers(&proxy, "chat/_/general/messages", &Value::from(n));
    }
    let (ga, gb) = (a.queued().len(), b.queued().len());
    assert_eq!(ga + gb, 4, "each message reaches exactly one member");
    assert_eq!((ga, gb), (2, 2), "round-robin over local members");

    // Re-subscribing the same string without loadBalance switches to broadcast (PROTOCOL §10).
    let r = a.reply(&subscribe("chat/general/messages"));
    assert_eq!(r, encode::subscribed("chat/general/messages", false));
    assert_eq!(proxy.router.filter_count(), 2);
    broker_delivers(&proxy, "chat/_/general/messages", &Value::from(9));
    assert_eq!(a.queued().len(), 1);
    assert_eq!(b.queued().len(), 1, "b is the only member of the group now");
}

#[tokio::test(start_paused = true)]
async fn load_balance_group_defaults_to_the_actor_id() {
    let proxy = proxy();
    let mut a = Client::device(&proxy);
    a.subscribe_ok_with(
        "chat/general/messages",
        &[("loadBalance", Value::from(true))],
    );
    // What was asked for is stored, not the default filled in.
    let stored = restore::decode(&a.stored(&proxy).expect("stored"))
        .expect("valid")
        .expect("a record");
    assert_eq!(stored.entries[0].group, None);
    assert!(stored.entries[0].load_balance);
    let mut b = Client::device(&proxy);
    b.subscribe_ok_with(
        "chat/general/messages",
        &[
            ("loadBalance", Value::from(true)),
            ("loadBalanceGroup", Value::from("sensor-1")),
        ],
    );
    assert_eq!(
        proxy.router.filter_count(),
        1,
        "the default group is the actor id"
    );
}

#[tokio::test(start_paused = true)]
async fn unsubscribe_always_replies_and_leaves_the_router() {
    let proxy = proxy();
    let mut c = Client::device(&proxy);
    let mut other = Client::device(&proxy);
    c.subscribe_ok("chat/general/messages");
    c.subscribe_ok("chat/lobby/messages");
    other.subscribe_ok("chat/general/messages");
    assert_eq!(proxy.router.filter_count(), 2);

    // A topic never subscribed: the same reply, nothing touched (PROTOCOL §6: always).
    let before = c.stored(&proxy);
    let r = c.reply(&unsubscribe("chat/vip/messages"));
    assert_eq!(r, encode::unsubscribed("chat/vip/messages"));
    assert_eq!(proxy.router.filter_count(), 2);
    assert_eq!(c.stored(&proxy), before);

    let r = c.reply(&unsubscribe("chat/general/messages"));
    let f = fields(&r);
    assert_eq!(str_of(&f, "type"), Some("unsubscribed"));
    assert_eq!(str_of(&f, "topic"), Some("chat/general/messages"));
    // The other session still holds the entry.
    assert_eq!(proxy.router.filter_count(), 2);
    broker_delivers(&proxy, "chat/_/general/messages", &Value::from(1));
    assert!(c.queued().is_empty(), "delivered after unsubscribe");
    assert_eq!(other.queued().len(), 1);
    assert_eq!(
        stored_names(&c.stored(&proxy).expect("stored")),
        ["chat/lobby/messages"]
    );

    // The last subscription gone: the entry goes, the stored set is cleared.
    c.reply(&unsubscribe("chat/lobby/messages"));
    assert_eq!(proxy.router.filter_count(), 1);
    assert_eq!(c.stored(&proxy), Some(Bytes::new()));
}

#[tokio::test(start_paused = true)]
async fn set_filters_switches_filters_and_echoes_them() {
    let proxy = proxy();
    let mut c = Client::device(&proxy);
    let topic = "chat/general/messages";

    let r = c.reply(&set_filters(topic, strs(&["a"])));
    assert_eq!(r, errors::not_subscribed(topic));
    assert_error(&r, "not_subscribed", None, Some(topic), None);
    assert_eq!(proxy.router.filter_count(), 0);

    c.subscribe_ok(topic);
    let items = Value::Array(vec![Value::from("a"), strs(&["Y", "x"])]);
    let r = c.reply(&set_filters(topic, items.clone()));
    let f = fields(&r);
    assert_eq!(str_of(&f, "type"), Some("filtersUpdated"));
    assert_eq!(str_of(&f, "topic"), Some(topic));
    assert_eq!(f.get("filters"), Some(&items), "the filters as sent");
    assert!(
        proxy
            .router
            .subscription_id("chat/_/general/messages/#")
            .is_none()
    );
    assert!(
        proxy
            .router
            .subscription_id("chat/_/general/messages/a")
            .is_some()
    );
    assert!(
        proxy
            .router
            .subscription_id("chat/_/general/messages/x|y")
            .is_some()
    );
    broker_delivers(&proxy, "chat/_/general/messages", &Value::from(1));
    broker_delivers(&proxy, "chat/_/general/messages/a", &Value::from(2));
    assert_eq!(
        messages(&c.queued()),
        [(topic.to_string(), Some("a".to_string()))]
    );

    // An invalid set leaves the current one in place.
    let r = c.reply(&set_filters(topic, strs(&["a+"])));
    assert_error(
        &r,
        "invalid_filter_chars (/, #, +, | not allowed)",
        None,
        Some(topic),
        None,
    );
    assert!(
        proxy
            .router
            .subscription_id("chat/_/general/messages/a")
            .is_some()
    );

    // [] goes back to the whole topic.
    let r = c.reply(&set_filters(topic, Value::Array(vec![])));
    assert_eq!(
        r,
        encode::filters_updated(topic, Bytes::from_static(&[0x90]))
    );
    assert_eq!(proxy.router.filter_count(), 1);
    assert!(
        proxy
            .router
            .subscription_id("chat/_/general/messages/#")
            .is_some()
    );
    let stored = restore::decode(&c.stored(&proxy).expect("stored"))
        .expect("valid")
        .expect("a record");
    assert!(stored.entries[0].filters.is_empty());
}

#[tokio::test(start_paused = true)]
async fn set_filters_keeps_load_balancing() {
    let proxy = proxy();
    let mut c = Client::device(&proxy);
    let topic = "chat/general/messages";
    c.subscribe_ok_with(
        topic,
        &[
            ("loadBalance", Value::from(true)),
            ("loadBalanceGroup", Value::from("g")),
        ],
    );
    c.reply(&set_filters(topic, strs(&["a"])));
    let share = TopicLayout::share_name("chat", None, "g", "chat/_/general/messages/a");
    let filter = format!("$share/{share}/chat/_/general/messages/a");
    assert!(proxy.router.subscription_id(&filter).is_some(), "{filter}");
    assert_eq!(proxy.router.filter_count(), 1);
}

// --- publish ------------------------------------------------------------------------------

/// Runs `f` until it ran within one wall-clock second (the publish window, PROTOCOL §9).
async fn within_one_second(mut f: impl FnMut()) {
    for _ in 0..5 {
        let start = now_unix();
        f();
        if now_unix() == start {
            return;
        }
    }
    panic!("never ran within one second");
}

#[tokio::test(start_paused = true)]
async fn publish_is_accepted_without_a_reply() {
    let proxy = proxy();
    let mut c = Client::device(&proxy);
    let topic = "chat/general/messages";
    c.silent(&publish(topic, &[]));
    c.silent(&publish(topic, &[("filter", Value::from("a|b"))]));
    c.silent(&publish(topic, &[("filters", strs(&["B", "a"]))]));
    c.silent(&publish(
        topic,
        &[("echo", Value::from(false)), ("qos", Value::from(0))],
    ));
    c.silent(&publish(topic, &[("data", Value::Binary(vec![0; 64]))]));
    assert!(c.queued().is_empty());
}

#[tokio::test(start_paused = true)]
async fn publish_with_msg_ref_fails_when_the_broker_never_acknowledges() {
    let proxy = proxy();
    let mut c = Client::device(&proxy);
    let topic = "chat/general/messages";
    c.silent(&publish(topic, &[("msgRef", Value::from("r1"))]));
    // The reply waits for the broker's acknowledgement; this proxy has no broker.
    tokio::time::sleep(PUBLISH_ACK_TIMEOUT - Duration::from_millis(100)).await;
    assert!(c.queued().is_empty(), "replied before the ack timeout");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let got = c.queued();
    assert_eq!(got, [errors::publish_failed(topic, "r1")]);
    assert_error(&got[0], "publish_failed", None, Some(topic), None);
    assert_eq!(str_of(&fields(&got[0]), "msgRef"), Some("r1"));
}

#[tokio::test(start_paused = true)]
async fn publish_rate_is_a_fixed_window_per_second() {
    let proxy = proxy_with(&["publish_per_second: 3"], &[]);
    let topic = "chat/general/messages";
    within_one_second(|| {
        let mut c = Client::device(&proxy);
        for _ in 0..3 {
            c.silent(&publish(topic, &[]));
        }
        let r = c.reply(&publish(topic, &[("msgRef", Value::from("r"))]));
        assert_eq!(r, errors::rate_limited(topic, Some("r")));
        assert_error(&r, "rate_limit_exceeded", Some(42910), Some(topic), None);
        assert_eq!(str_of(&fields(&r), "msgRef"), Some("r"));
        // Refused publishes do not count, and the window is per connection.
        let r = c.reply(&publish(topic, &[]));
        assert_eq!(r, errors::rate_limited(topic, None));
        let mut other = Client::device(&proxy);
        other.silent(&publish(topic, &[]));
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn publishes_refused_after_the_rate_check_still_count() {
    let proxy = proxy_with(&["publish_per_second: 2"], &[]);
    within_one_second(|| {
        let mut c = Client::device(&proxy);
        // Denied (devices may only read orders), but it passed the rate check (PROTOCOL §9).
        let r = c.reply(&publish("chat/general/orders", &[]));
        assert_error(
            &r,
            "not_authorized",
            None,
            Some("chat/general/orders"),
            None,
        );
        c.silent(&publish("chat/general/messages", &[]));
        let r = c.reply(&publish("chat/general/messages", &[]));
        assert_error(
            &r,
            "rate_limit_exceeded",
            Some(42910),
            Some("chat/general/messages"),
            None,
        );
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn publish_rate_window_resets_with_the_second() {
    let proxy = proxy_with(&["publish_per_second: 1"], &[]);
    let mut c = Client::device(&proxy);
    let topic = "chat/general/messages";
    // Wall-clock time: wait for the next second (the paused Tokio clock does not move it).
    let start = now_unix();
    c.send(&publish(topic, &[]));
    while now_unix() == start {
        std::thread::sleep(Duration::from_millis(20));
    }
    c.silent(&publish(topic, &[]));
}

#[tokio::test(start_paused = true)]
async fn publish_data_over_the_limit_is_refused() {
    let proxy = proxy_with(&["max_message_bytes: 16"], &[]);
    let mut c = Client::device(&proxy);
    let topic = "chat/general/messages";
    // bin8 of 14 bytes: 16 bytes of MessagePack, exactly the limit (strictly greater is refused).
    c.silent(&publish(topic, &[("data", Value::Binary(vec![7; 14]))]));
    let r = c.reply(&publish(
        topic,
        &[
            ("data", Value::Binary(vec![7; 15])),
            ("msgRef", Value::from("big")),
        ],
    ));
    assert_eq!(r, errors::message_too_large(topic, Some("big"), 16));
    assert_error(&r, "message_too_large", Some(42930), Some(topic), None);
    let f = fields(&r);
    assert_eq!(f.get("maxSizeBytes").and_then(Value::as_u64), Some(16));
    assert_eq!(str_of(&f, "msgRef"), Some("big"));
}

#[tokio::test(start_paused = true)]
async fn publish_errors_echo_the_msg_ref() {
    let proxy = proxy();
    let mut c = Client::device(&proxy);
    let m = ("msgRef", Value::from("m1"));
    // Not a topic (a publish must name one exact topic).
    for t in [
        "chat/+/messages",
        "chat/general",
        "chat/general/messages/extra",
    ] {
        let r = c.reply(&publish(t, std::slice::from_ref(&m)));
        assert_error(&r, "invalid_topic", None, Some(t), None);
        assert_eq!(str_of(&fields(&r), "msgRef"), Some("m1"));
    }
    // A bad filter.
    let topic = "chat/general/messages";
    let r = c.reply(&publish(
        topic,
        &[("filter", Value::from("a/b")), m.clone()],
    ));
    assert_eq!(
        r,
        errors::filter_error(
            "invalid_filter_chars (/, #, +, | not allowed)",
            topic,
            Some("m1")
        )
    );
    let r = c.reply(&publish(topic, &[("filters", strs(&["ok", "n#"])), m]));
    assert_error(
        &r,
        "invalid_filter_chars (/, #, +, | not allowed)",
        None,
        Some(topic),
        None,
    );
}

// --- authorization ------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn denials_are_not_authorized_for_v1_and_unknown_topic_for_v2() {
    let proxy = proxy();
    let actor = authenticate(&proxy, SENSOR);
    let mut v1 = Client::new(&proxy, actor.clone(), 1);
    let mut v2 = Client::new(&proxy, actor, 2);
    // Devices may read orders, not write them; may not read analytics at all.
    let cases = [
        (
            publish("chat/general/orders", &[]),
            "chat/general/orders",
            "device actors may not write this topic",
        ),
        (
            subscribe("chat/general/analytics"),
            "chat/general/analytics",
            "device actors may not read this topic",
        ),
        (
            subscribe("chat/general/nope"),
            "chat/general/nope",
            "no such topic in this app",
        ),
        (
            subscribe("chat/kitchen/messages"),
            "chat/kitchen/messages",
            "no such room in this app",
        ),
        (
            subscribe("other/general/messages"),
            "other/general/messages",
            "no such app in this project",
        ),
        (
            subscribe("chat/+/analytics"),
            "chat/+/analytics",
            "no room and topic under this wildcard is readable by this actor",
        ),
    ];
    for (bytes, topic, hint) in cases {
        let r = v1.reply(&bytes);
        assert_eq!(r, errors::denied(1, topic, hint, None));
        assert_error(&r, "not_authorized", None, Some(topic), None);
        assert!(!fields(&r).contains_key("hint"), "v1 carries no hint");
        let r = v2.reply(&bytes);
        assert_error(&r, "unknown_topic", Some(42940), Some(topic), Some(hint));
    }
    // Reading orders is fine.
    v1.subscribe_ok("chat/general/orders");
    assert_eq!(proxy.router.filter_count(), 1);
}

#[tokio::test(start_paused = true)]
async fn each_actor_type_gets_its_own_permissions() {
    let proxy = proxy();
    // A user (JWT): messages read-write, analytics none.
    let mut user = Client::new(&proxy, authenticate(&proxy, &user_token("bob")), 2);
    assert_eq!(user.machine.actor().kind, crate::policy::ActorType::User);
    user.subscribe_ok("chat/general/messages");
    user.silent(&publish("chat/general/messages", &[]));
    let r = user.reply(&subscribe("chat/general/analytics"));
    assert_error(
        &r,
        "unknown_topic",
        Some(42940),
        Some("chat/general/analytics"),
        Some("user actors may not read this topic"),
    );

    // A server (API key): analytics is write-only, orders read-write.
    let mut server = Client::new(&proxy, authenticate(&proxy, BILLING), 2);
    server.silent(&publish("chat/general/analytics", &[]));
    let r = server.reply(&subscribe("chat/general/analytics"));
    assert_error(
        &r,
        "unknown_topic",
        Some(42940),
        Some("chat/general/analytics"),
        Some("server actors may not read this topic"),
    );
    server.subscribe_ok("chat/general/orders");

    // A guest session: messages read-only.
    let token = session_token(&proxy, &[]);
    let mut guest = Client::new(&proxy, authenticate(&proxy, &token), 2);
    assert_eq!(
        guest.machine.actor().kind,
        crate::policy::ActorType::Session
    );
    guest.subscribe_ok("chat/general/messages");
    let r = guest.reply(&publish("chat/general/messages", &[]));
    assert_error(
        &r,
        "unknown_topic",
        Some(42940),
        Some("chat/general/messages"),
        Some("session actors may not write this topic"),
    );
}

#[tokio::test(start_paused = true)]
async fn private_rooms_admit_only_their_members() {
    let proxy = proxy();
    let vip = "chat/vip/messages";
    let private = "the room is private and this actor is not a member";

    let mut outsider = Client::new(&proxy, authenticate(&proxy, SENSOR), 2);
    let r = outsider.reply(&subscribe(vip));
    assert_error(&r, "unknown_topic", Some(42940), Some(vip), Some(private));
    let r = outsider.reply(&publish(vip, &[]));
    assert_error(&r, "unknown_topic", Some(42940), Some(vip), Some(private));

    // A user who is a listed member, and a server that is one.
    let mut alice = Client::new(&proxy, authenticate(&proxy, &user_token("alice")), 2);
    alice.subscribe_ok(vip);
    let mut billing = Client::new(&proxy, authenticate(&proxy, BILLING), 2);
    billing.subscribe_ok(vip);
    billing.silent(&publish(vip, &[]));
    // A user token claiming to be someone else is not a member.
    let mut bob = Client::new(&proxy, authenticate(&proxy, &user_token("bob")), 2);
    let r = bob.reply(&subscribe(vip));
    assert_error(&r, "unknown_topic", Some(42940), Some(vip), Some(private));

    // A wildcard covering the private room is accepted (other rooms are readable), but
    // messages of the private room are not delivered through it.
    outsider.subscribe_ok("chat/+/messages");
    broker_delivers(&proxy, "chat/_/vip/messages", &Value::from(1));
    assert!(
        outsider.queued().is_empty(),
        "private room delivered to a non-member"
    );
    assert_eq!(alice.queued().len(), 1);
    assert_eq!(billing.queued().len(), 1);
    broker_delivers(&proxy, "chat/_/general/messages", &Value::from(2));
    assert_eq!(
        messages(&outsider.queued()),
        [("chat/+/messages".to_string(), None)]
    );
}

#[tokio::test(start_paused = true)]
async fn session_tokens_are_held_to_their_rooms() {
    let proxy = proxy();
    let token = session_token(&proxy, &["chat/general"]);
    let mut guest = Client::new(&proxy, authenticate(&proxy, &token), 2);
    guest.subscribe_ok("chat/general/messages");
    let r = guest.reply(&subscribe("chat/lobby/messages"));
    assert_error(
        &r,
        "unknown_topic",
        Some(42940),
        Some("chat/lobby/messages"),
        Some("the session token does not allow this room"),
    );
    // Sessions are never members of a private room.
    let r = guest.reply(&subscribe("chat/vip/messages"));
    assert_error(
        &r,
        "unknown_topic",
        Some(42940),
        Some("chat/vip/messages"),
        Some("the room is private and this actor is not a member"),
    );
    // Through a wildcard, only the allowed room is delivered.
    guest.subscribe_ok("chat/+/messages");
    broker_delivers(&proxy, "chat/_/lobby/messages", &Value::from(1));
    assert!(guest.queued().is_empty());
    broker_delivers(&proxy, "chat/_/general/messages", &Value::from(2));
    let got = messages(&guest.queued());
    assert_eq!(got.len(), 2, "one per subscription: {got:?}");
}

// --- limits -------------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn control_frames_share_a_token_bucket() {
    let proxy = proxy_with(&["control_per_second: 3"], &[]);
    let mut c = Client::device(&proxy);
    let topic = "chat/general/messages";
    c.subscribe_ok(topic);
    c.reply(&set_filters(topic, strs(&["a"])));
    c.reply(&unsubscribe("chat/lobby/messages"));
    let stored = c.stored(&proxy);
    // The bucket is empty: each kind is refused, with the limit named, and has no effect.
    for (bytes, t) in [
        (subscribe("chat/lobby/messages"), "chat/lobby/messages"),
        (unsubscribe(topic), topic),
        (set_filters(topic, strs(&["b"])), topic),
    ] {
        let r = c.reply(&bytes);
        assert_eq!(r, errors::control_rate_limited(t));
        assert_error(
            &r,
            "rate_limit_exceeded",
            Some(42910),
            Some(t),
            Some("limits.control_per_second"),
        );
    }
    assert_eq!(proxy.router.filter_count(), 1);
    assert!(
        proxy
            .router
            .subscription_id("chat/_/general/messages/a")
            .is_some()
    );
    assert!(!c.machine.subs.contains_key("chat/lobby/messages"));
    assert_eq!(c.stored(&proxy), stored);
    // Heartbeats draw on the same bucket: no echo now.
    c.silent(b"");
    // Publishes do not (they have their own window).
    c.silent(&publish(topic, &[]));

    // Refills at the rate: one token after a third of a second, not before.
    tokio::time::advance(Duration::from_millis(300)).await;
    assert_error(
        &c.reply(&unsubscribe(topic)),
        "rate_limit_exceeded",
        Some(42910),
        Some(topic),
        None,
    );
    tokio::time::advance(Duration::from_millis(40)).await;
    assert_eq!(c.reply(&unsubscribe(topic)), encode::unsubscribed(topic));
    assert_error(
        &c.reply(&subscribe(topic)),
        "rate_limit_exceeded",
        Some(42910),
        Some(topic),
        None,
    );
    // A burst is at most the rate, however long the bucket was idle.
    tokio::time::advance(Duration::from_secs(60)).await;
    for _ in 0..3 {
        assert_eq!(c.reply(&unsubscribe(topic)), encode::unsubscribed(topic));
    }
    assert_error(
        &c.reply(&unsubscribe(topic)),
        "rate_limit_exceeded",
        Some(42910),
        Some(topic),
        None,
    );
}

/// `limits.filters_per_second` bounds what subscription changes cost the broker: each
/// accepted `subscribe`/`setFilters` may join up to 100 new upstream filters (the restore
/// amplification attack changed 100 filters per frame); a burst of the connection's cap is
/// allowed, then joins refill at the rate. Re-joining filters the session holds is free.
#[tokio::test(start_paused = true)]
async fn new_upstream_filters_are_rate_limited() {
    let proxy = proxy_with(
        &[
            "filters_per_second: 10",
            "filters_per_connection: 30",
            "control_per_second: 1000",
        ],
        &[],
    );
    let mut c = Client::device(&proxy);
    let topic = "chat/general/messages";
    let items = |from: usize, n: usize| {
        Value::Array(
            (from..from + n)
                .map(|i| Value::from(format!("f{i}")))
                .collect(),
        )
    };
    // The burst is the connection's cap: 30 filters at once.
    c.subscribe_ok_with(topic, &[("filters", items(0, 20))]);
    c.subscribe_ok_with("chat/lobby/messages", &[("filters", items(0, 10))]);
    assert_eq!(proxy.router.filter_count(), 30);
    // Switching to 10 other filters joins 10 new ones: refused, nothing changes.
    let r = c.reply(&set_filters(topic, items(100, 10)));
    assert_eq!(r, errors::filters_rate_limited(topic));
    assert_error(
        &r,
        "rate_limit_exceeded",
        Some(42910),
        Some(topic),
        Some("limits.filters_per_second"),
    );
    assert_eq!(proxy.router.filter_count(), 30);
    // Narrowing to filters it holds costs nothing.
    let r = c.reply(&set_filters(topic, items(0, 5)));
    assert_eq!(fields(&r).get("type"), Some(&Value::from("filtersUpdated")));
    // One second later, 10 joins are there again.
    tokio::time::advance(Duration::from_secs(1)).await;
    let r = c.reply(&set_filters(topic, items(100, 10)));
    assert_eq!(fields(&r).get("type"), Some(&Value::from("filtersUpdated")));
    assert!(
        proxy
            .router
            .subscription_id("chat/_/general/messages/f109")
            .is_some()
    );
    let r = c.reply(&set_filters(topic, items(200, 1)));
    assert_eq!(r, errors::filters_rate_limited(topic));
}

#[tokio::test(start_paused = true)]
async fn heartbeats_beyond_the_control_budget_get_no_echo() {
    let proxy = proxy_with(&["control_per_second: 2"], &[]);
    let mut c = Client::device(&proxy);
    assert_eq!(c.reply(b""), encode::heartbeat());
    assert_eq!(c.reply(b""), encode::heartbeat());
    // Never an error frame for a heartbeat: just no echo.
    for _ in 0..10 {
        c.silent(b"");
    }
    // And they spent the subscribe budget too.
    let r = c.reply(&subscribe("chat/general/messages"));
    assert_eq!(r, errors::control_rate_limited("chat/general/messages"));
    tokio::time::advance(Duration::from_millis(500)).await;
    assert_eq!(c.reply(b""), encode::heartbeat());
}

#[tokio::test(start_paused = true)]
async fn subscriptions_per_connection_is_enforced() {
    let proxy = proxy_with(&["subscriptions_per_connection: 2"], &[]);
    let mut c = Client::device(&proxy);
    c.subscribe_ok("chat/general/messages");
    c.subscribe_ok("chat/lobby/messages");
    let r = c.reply(&subscribe("chat/general/orders"));
    assert_eq!(
        r,
        errors::too_many_subscriptions(
            "chat/general/orders",
            "limits.subscriptions_per_connection"
        )
    );
    assert_error(
        &r,
        "too_many_subscriptions",
        None,
        Some("chat/general/orders"),
        Some("limits.subscriptions_per_connection"),
    );
    assert_eq!(proxy.router.filter_count(), 2);
    // Re-subscribing a held topic replaces it: not a new subscription.
    c.subscribe_ok_with("chat/lobby/messages", &[("filters", strs(&["a"]))]);
    c.reply(&set_filters("chat/general/messages", strs(&["b"])));
    // After an unsubscribe there is room again.
    c.reply(&unsubscribe("chat/lobby/messages"));
    c.subscribe_ok("chat/general/orders");
    // Per connection: another connection of the same actor has its own.
    let mut other = Client::device(&proxy);
    other.subscribe_ok("chat/lobby/messages");
    other.subscribe_ok("chat/lobby/orders");
}

#[tokio::test(start_paused = true)]
async fn filters_per_connection_is_enforced() {
    let proxy = proxy_with(&["filters_per_connection: 3"], &[]);
    let mut c = Client::device(&proxy);
    let general = "chat/general/messages";
    c.subscribe_ok_with(general, &[("filters", strs(&["a", "b"]))]);
    c.subscribe_ok("chat/lobby/messages");
    let hint = "limits.filters_per_connection";
    // A fourth distinct upstream filter.
    let r = c.reply(&subscribe("chat/general/orders"));
    assert_eq!(
        r,
        errors::too_many_subscriptions("chat/general/orders", hint)
    );
    // setFilters counts what the set would hold after the switch.
    let r = c.reply(&set_filters(general, strs(&["a", "b", "c"])));
    assert_error(
        &r,
        "too_many_subscriptions",
        None,
        Some(general),
        Some(hint),
    );
    // Refused changes change nothing.
    assert_eq!(proxy.router.filter_count(), 3);
    assert!(
        proxy
            .router
            .subscription_id("chat/_/general/messages/c")
            .is_none()
    );
    broker_delivers(&proxy, "chat/_/general/messages/b", &Value::from(1));
    assert_eq!(c.queued().len(), 1, "the old filters still deliver");
    assert_eq!(c.machine.subs[general].items.len(), 2);
    // Switching within the cap is fine (filters it drops make room).
    let r = c.reply(&set_filters(general, strs(&["c", "d"])));
    assert_eq!(str_of(&fields(&r), "type"), Some("filtersUpdated"));
    // Still three held: a wildcard over the same room is one more distinct filter.
    let r = c.reply(&subscribe_with("chat/general/#", &[]));
    assert_error(
        &r,
        "too_many_subscriptions",
        None,
        Some("chat/general/#"),
        Some(hint),
    );
}

#[tokio::test(start_paused = true)]
async fn upstream_max_filters_caps_the_replica() {
    let proxy = proxy_with(&[], &["max_filters: 2"]);
    let mut a = Client::device(&proxy);
    // Another actor: the stored set is per actor.
    let mut b = Client::new(&proxy, authenticate(&proxy, BILLING), 1);
    a.subscribe_ok("chat/general/messages");
    a.subscribe_ok("chat/lobby/messages");
    let r = b.reply(&subscribe("chat/general/orders"));
    assert_eq!(
        r,
        errors::too_many_subscriptions("chat/general/orders", "upstream.max_filters")
    );
    assert_error(
        &r,
        "too_many_subscriptions",
        None,
        Some("chat/general/orders"),
        Some("upstream.max_filters"),
    );
    assert!(b.machine.subs.is_empty());
    assert_eq!(b.stored(&proxy), None, "a refused subscribe stores nothing");
    // Joining an entry that exists costs the replica nothing.
    b.subscribe_ok("chat/general/messages");
    // A refused setFilters keeps the subscription as it was.
    let r = a.reply(&set_filters("chat/lobby/messages", strs(&["x"])));
    assert_error(
        &r,
        "too_many_subscriptions",
        None,
        Some("chat/lobby/messages"),
        Some("upstream.max_filters"),
    );
    assert!(
        proxy
            .router
            .subscription_id("chat/_/lobby/messages/#")
            .is_some()
    );
    assert!(
        proxy
            .router
            .subscription_id("chat/_/lobby/messages/x")
            .is_none()
    );
    assert_eq!(proxy.router.filter_count(), 2);
    // When an entry goes, there is room again.
    a.reply(&unsubscribe("chat/lobby/messages"));
    b.subscribe_ok("chat/general/orders");
}

/// `n` filter values of 100 bytes each.
fn long_filters(n: usize, tag: char) -> Value {
    Value::Array(
        (0..n)
            .map(|i| Value::from(format!("{i:02}{}", tag.to_string().repeat(98))))
            .collect(),
    )
}

#[tokio::test(start_paused = true)]
async fn restore_bytes_caps_the_stored_set() {
    // The smallest cap: 1 KiB of record.
    let proxy = proxy_with(&["restore_bytes: 1024"], &[]);
    let mut c = Client::device(&proxy);
    let general = "chat/general/messages";
    c.subscribe_ok_with(general, &[("filters", long_filters(5, 'a'))]);
    let stored = c.stored(&proxy).expect("stored");
    assert!(stored.len() <= 1024);
    let filters_before = proxy.router.filter_count();

    // Another subscription that would take the record over the cap.
    let lobby = "chat/lobby/messages";
    let r = c.reply(&subscribe_with(lobby, &[("filters", long_filters(5, 'b'))]));
    assert_eq!(
        r,
        errors::too_many_subscriptions(lobby, "limits.restore_bytes")
    );
    assert_error(
        &r,
        "too_many_subscriptions",
        None,
        Some(lobby),
        Some("limits.restore_bytes"),
    );
    assert_eq!(c.stored(&proxy), Some(stored.clone()), "stored set changed");
    assert!(!c.machine.subs.contains_key(lobby));
    assert_eq!(
        proxy.router.filter_count(),
        filters_before,
        "refused, yet subscribed"
    );

    // A setFilters growing the held subscription over the cap: refused, the old set stays.
    let r = c.reply(&set_filters(general, long_filters(10, 'c')));
    assert_error(
        &r,
        "too_many_subscriptions",
        None,
        Some(general),
        Some("limits.restore_bytes"),
    );
    assert_eq!(c.stored(&proxy), Some(stored.clone()));
    assert_eq!(proxy.router.filter_count(), filters_before);
    assert_eq!(c.machine.record(), stored, "the session's own set changed");

    // A small subscription still fits.
    c.subscribe_ok(lobby);
    let now = c.stored(&proxy).expect("stored");
    assert_eq!(stored_names(&now), [general, lobby]);
    assert!(now.len() <= 1024, "{} bytes stored", now.len());
    // The accounting follows unsubscribes: room again once the big one is gone.
    c.reply(&unsubscribe(general));
    c.subscribe_ok_with("chat/general/orders", &[("filters", long_filters(8, 'd'))]);
}

#[tokio::test(start_paused = true)]
async fn stored_set_is_submitted_only_when_it_changed() {
    let proxy = proxy();
    let mut c = Client::device(&proxy);
    c.subscribe_ok("chat/general/messages");
    let first = c.stored(&proxy).expect("stored");
    // Take the pending record away as the writer would; an unchanged set is not resubmitted.
    proxy
        .restore
        .submit(&c.machine.restore_topic, Bytes::from_static(b"sentinel"));
    c.subscribe_ok("chat/general/messages");
    c.reply(&unsubscribe("chat/never/subscribed"));
    assert_eq!(c.stored(&proxy), Some(Bytes::from_static(b"sentinel")));
    c.subscribe_ok("chat/lobby/messages");
    let second = c.stored(&proxy).expect("stored");
    assert_ne!(second, first);
    let record = restore::decode(&second).expect("valid").expect("a record");
    assert_eq!(record.actor, "sensor-1");
    assert_eq!(record.scope, None);
}

/// Regression: a refused subscribe or setFilters on a fresh connection used to submit the
/// connection's empty set, clearing the set another connection of the same actor stored.
#[tokio::test(start_paused = true)]
async fn refused_changes_do_not_clear_the_stored_set() {
    let proxy = proxy();
    let mut first = Client::device(&proxy);
    first.subscribe_ok("chat/general/messages");
    let stored = first.stored(&proxy).expect("stored");
    let mut second = Client::device(&proxy);
    second.reply(&subscribe("chat/general/analytics")); // denied
    second.reply(&subscribe_with(
        "chat/general/messages",
        &[("filters", strs(&["a/b"]))],
    ));
    second.reply(&set_filters("chat/general/messages", strs(&["a"]))); // not subscribed
    assert_eq!(second.stored(&proxy), Some(stored));
    assert_eq!(second.machine.submitted, None);
}

// --- restore (PROTOCOL §13) ---------------------------------------------------------------

fn record_of(actor: &Actor, entries: Vec<restore::Entry>) -> Bytes {
    restore::encode(&restore::Record {
        scope: actor.scope.as_deref().map(str::to_owned),
        actor: actor.id.to_string(),
        entries,
        room: None,
    })
}

fn entry(name: &str, filters: &[&str]) -> restore::Entry {
    restore::Entry {
        name: name.into(),
        load_balance: false,
        group: None,
        filters: filters
            .iter()
            .map(|f| FilterItem::One(f.to_string()))
            .collect(),
    }
}

#[tokio::test(start_paused = true)]
async fn restore_resubscribes_what_is_still_allowed() {
    let proxy = proxy_with(&["subscriptions_per_connection: 3"], &[]);
    let actor = authenticate(&proxy, SENSOR);
    let mut c = Client::new(&proxy, actor.clone(), 1);
    let entries = vec![
        entry("chat/general/messages", &["a"]),
        entry("chat/general/analytics", &[]), // no longer readable: skipped
        entry("chat/vip/messages", &[]),      // private: skipped
        entry("chat/lobby/messages", &[]),
        entry("chat/general/orders", &[]),
        entry("chat/lobby/orders", &[]), // over the subscription limit: skipped
    ];
    let (restored, later, _live) = c.machine.restore(&record_of(&actor, entries.clone()));
    assert_eq!(later, 0, "no broker: everything is live at once");
    let names: Vec<String> = restored
        .iter()
        .map(|b| fields(b)["name"].as_str().expect("name").to_string())
        .collect();
    assert_eq!(
        names,
        [
            "chat/general/messages",
            "chat/lobby/messages",
            "chat/general/orders"
        ]
    );
    assert_eq!(restored[0], entries[0].encode(), "returned as stored");
    assert!(
        proxy
            .router
            .subscription_id("chat/_/general/messages/a")
            .is_some()
    );
    assert_eq!(proxy.router.filter_count(), 3);
    // What was restored is what is stored from now on (no write needed).
    assert_eq!(c.machine.submitted, Some(c.machine.record()));
    broker_delivers(&proxy, "chat/_/lobby/messages", &Value::from(1));
    assert_eq!(
        messages(&c.queued()),
        [("chat/lobby/messages".to_string(), None)]
    );
}

#[tokio::test(start_paused = true)]
async fn restore_ignores_records_it_must_not_trust() {
    let proxy = proxy();
    let actor = authenticate(&proxy, SENSOR);
    let other = authenticate(&proxy, ACME_SENSOR);
    let mut c = Client::new(&proxy, actor.clone(), 1);
    let entries = vec![entry("chat/general/messages", &[])];
    let mut someone_else = (*actor).clone();
    someone_else.id = "sensor-9".into();
    for payload in [
        record_of(&other, entries.clone()), // another scope and actor
        record_of(&someone_else, entries.clone()), // another actor
        Bytes::from_static(&[0xc1]),        // garbage
        Bytes::from_static(&[0x90]),        // the legacy bare array
        Bytes::new(),                       // a cleared set
    ] {
        let (restored, later, _) = c.machine.restore(&payload);
        assert!(restored.is_empty());
        assert_eq!(later, 0);
    }
    assert_eq!(proxy.router.filter_count(), 0);
    assert!(c.machine.subs.is_empty());
}

#[tokio::test(start_paused = true)]
async fn restore_respects_restore_bytes() {
    let proxy = proxy_with(&["restore_bytes: 1024"], &[]);
    let actor = authenticate(&proxy, SENSOR);
    let mut c = Client::new(&proxy, actor.clone(), 1);
    let long: Vec<String> = (0..5)
        .map(|i| format!("{i:02}{}", "x".repeat(98)))
        .collect();
    let long: Vec<&str> = long.iter().map(String::as_str).collect();
    let entries = vec![
        entry("chat/general/messages", &long),
        entry("chat/lobby/messages", &long), // would take the set over the cap
        entry("chat/general/orders", &[]),
    ];
    let (restored, _, _) = c.machine.restore(&record_of(&actor, entries));
    assert_eq!(restored.len(), 2);
    assert!(c.machine.record().len() <= 1024);
    assert!(!c.machine.subs.contains_key("chat/lobby/messages"));
}

// --- policy reload ------------------------------------------------------------------------

/// A proxy whose config lives in a file, so that a test can change it and reload.
fn reloadable(dir: &Path) -> (Arc<Proxy>, std::path::PathBuf) {
    let path = dir.join("proxy.yaml");
    let text = config(&[], &[]);
    std::fs::write(&path, &text).expect("config written");
    (Proxy::without_broker(loaded(&text, &path)), path)
}

fn reload(proxy: &Proxy, path: &Path, from: &str, to: &str) {
    let text = std::fs::read_to_string(path).expect("config read");
    assert!(text.contains(from), "{from} not in the config");
    std::fs::write(path, text.replace(from, to)).expect("config written");
    let outcome = proxy.store.reload_blocking(&env);
    assert!(
        matches!(outcome, crate::reload::ReloadOutcome::Applied { .. }),
        "{outcome:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn reevaluate_drops_revoked_subscriptions() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (proxy, path) = reloadable(dir.path());
    let mut c = Client::new(&proxy, authenticate(&proxy, SENSOR), 2);
    c.subscribe_ok("chat/general/messages");
    c.subscribe_ok("chat/general/orders");
    c.subscribe_ok("chat/+/orders");
    reload(
        &proxy,
        &path,
        "orders:    { device: read,",
        "orders:    { device: none,",
    );
    let mut out = Vec::new();
    c.machine
        .reevaluate(&mut out)
        .expect("the actor is still valid");
    let mut topics: Vec<String> = out
        .iter()
        .map(|f| {
            let f = fields(f);
            assert_eq!(str_of(&f, "error"), Some("unknown_topic"), "{f:?}");
            str_of(&f, "topic").expect("topic").to_string()
        })
        .collect();
    topics.sort();
    assert_eq!(topics, ["chat/+/orders", "chat/general/orders"]);
    assert_eq!(proxy.router.filter_count(), 1);
    assert_eq!(
        stored_names(&c.stored(&proxy).expect("stored")),
        ["chat/general/messages"]
    );
    broker_delivers(&proxy, "chat/_/general/orders", &Value::from(1));
    assert!(c.queued().is_empty());
}

#[tokio::test(start_paused = true)]
async fn reevaluate_closes_when_the_actor_is_gone_or_moved() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (proxy, path) = reloadable(dir.path());
    let mut sensor = Client::new(&proxy, authenticate(&proxy, SENSOR), 1);
    let mut acme = Client::new(&proxy, authenticate(&proxy, ACME_SENSOR), 1);
    reload(&proxy, &path, ", scope: acme }", " }");
    let mut out = Vec::new();
    assert_eq!(
        acme.machine.reevaluate(&mut out),
        Err(CloseReason::ScopeChanged)
    );
    reload(&proxy, &path, "- { id: sensor-1,", "- { id: sensor-one,");
    assert_eq!(
        sensor.machine.reevaluate(&mut out),
        Err(CloseReason::Revoked)
    );
    assert!(out.is_empty());
}

mod presence;

/// Each connection's task holds the session future inline, and the whole of it is copied
/// into the task (so resident) whether an await point uses it or not: its size is part of
/// every idle connection's memory. Regression: an 8 KiB array for the oversize-close drain
/// made every session's future 7 KiB larger (idle RSS 8.2 → 16.1 KiB per connection).
#[tokio::test]
async fn the_session_future_stays_small() {
    use tokio_tungstenite::tungstenite::protocol::Role;
    let (io, _client) = tokio::io::duplex(64);
    let ws = tokio_tungstenite::WebSocketStream::from_raw_socket(io, Role::Server, None).await;
    let peer = std::net::SocketAddr::from(([127, 0, 0, 1], 1));
    let session = crate::server::session::run(proxy(), ws, peer);
    let size = std::mem::size_of_val(&session);
    assert!(size <= 4096, "the session future is {size} bytes");
    println!("session future: {size} bytes");
}
