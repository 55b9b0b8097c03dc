//! What the fuzz targets share: a fixed world (policy, actors, topic layouts) and the pure part
//! of what a session and the router do with a decoded frame, with the invariants that must
//! hold whatever the client sent.
//!
//! The checks restate, for fuzzed input, what `tests/isolation.rs` states for generated input:
//! everything the proxy hands the broker is a valid MQTT topic or filter, a publish topic maps
//! back to the client topic it came from, and a subscription of one namespace (app, scope)
//! receives the publishes of its own namespace and of no other. A violated invariant panics,
//! which libFuzzer reports as a crash with the input that caused it.
//!
//! No I/O: the policy is loaded from text once per process, and the clock is [`NOW`].

use std::path::Path;
use std::sync::{Arc, LazyLock};

use cuttle::auth::{Actor, AuthCacheSettings, Authenticator, Verification};
use cuttle::policy::{Access, ActorType, Policy, SubscriptionGrant};
use cuttle::topic::filters::{self, FilterItem};
use cuttle::topic::upstream::{TopicLayout, scope_segment};
use cuttle::topic::{ClientFilter, ClientTopic, TopicLevel, is_mqtt_unsafe};
use cuttle::wire::decode::PublishFrame;
use cuttle::wire::encode::{self, ErrorFrame};
use cuttle::wire::envelope;
use cuttle::wire::msgpack::Reader;

/// The clock of every target (2026-01-01T00:00:00Z): fixed, so that a run depends on its input
/// alone and a crash reproduces.
pub const NOW: u64 = 1_767_225_600;

/// The socket id the echo envelope carries for the world's publishing session.
pub const SOCKET_ID: &str = "fuzz-socket-1";

/// Every scope segment a publish can land in: the world's two scopes and the unscoped one.
pub const SCOPES: [Option<&str>; 3] = [None, Some("acme"), Some("globex")];

/// The world's policy (see `world.yaml`).
pub const WORLD_YAML: &str = include_str!("../world.yaml");

/// Secrets of the world's policy. Anything else is unset, as a missing variable would be.
pub fn world_env(var: &str) -> Option<String> {
    match var {
        "FUZZ_JWT_SECRET" => Some("fuzz-jwt-secret-fuzz-jwt-secret-0123456789".into()),
        "FUZZ_SESSION_SECRET" => Some("fuzz-session-secret-fuzz-session-secret-01".into()),
        _ => None,
    }
}

pub struct World {
    pub auth: Authenticator,
    /// One actor of each kind, in different scopes and with different room rights.
    pub actors: Vec<Arc<Actor>>,
    /// No prefix, and a two-level prefix.
    pub layouts: Vec<TopicLayout>,
}

impl World {
    pub fn policy(&self) -> &Policy {
        self.auth.policy()
    }
}

/// Built on first use and kept for the process (a static is not a leak to LeakSanitizer).
pub static WORLD: LazyLock<World> = LazyLock::new(build_world);

fn build_world() -> World {
    // A broken fixture must stop the run loudly, not fuzz an empty policy.
    let loaded = cuttle::config::load_str(
        WORLD_YAML,
        Path::new("/nonexistent/cuttle-fuzz/world.yaml"),
        &world_env,
    )
    .unwrap_or_else(|d| panic!("fuzz/world.yaml does not load:\n{d}"));
    let auth = Authenticator::new(Arc::new(loaded.policy), AuthCacheSettings::default());
    let listed = |token: &str| {
        auth.authenticate_at(token, NOW)
            .unwrap_or_else(|e| panic!("fuzz/world.yaml: {token}: {e}"))
    };
    let device = listed("fuzz-device-token");
    let server = listed("fuzz-server-key");
    // A user and a session are built directly: verifying them would need a signed token, and a
    // minted session id is random, which would make runs differ.
    let user = Arc::new(Actor {
        project: "fuzz".into(),
        id: "alice".into(),
        kind: ActorType::User,
        scope: Some("acme".into()),
        roles: vec![Arc::from("moderator")].into_boxed_slice(),
        rooms: None,
        expires_at: Some(NOW + 3600),
        credential_sha256: [1; 32],
        verified_by: Verification::Jwt {
            key: [2; 32],
            listed: true,
            scope_claim: None,
        },
    });
    let session = Arc::new(Actor {
        project: "fuzz".into(),
        // Characters MQTT reserves, as a JWT `sub` or session id could hold: the default
        // load-balance group is made from the actor id.
        id: "guest/+#%$\u{85}".into(),
        kind: ActorType::Session,
        scope: Some("globex".into()),
        roles: Box::new([]),
        rooms: Some(
            vec![cuttle::auth::RoomRef {
                app: "chat".into(),
                room: "general".into(),
            }]
            .into_boxed_slice(),
        ),
        expires_at: Some(NOW + 600),
        credential_sha256: [3; 32],
        verified_by: Verification::Session {
            key: [4; 32],
            issued_at: NOW,
        },
    });
    let layouts = ["", "prod/eu"]
        .into_iter()
        .map(|p| TopicLayout::new(p).unwrap_or_else(|e| panic!("prefix {p:?}: {e}")))
        .collect();
    World {
        auth,
        actors: vec![device, server, user, session],
        layouts,
    }
}

/// An `auth` token: what `Authenticator::authenticate` does on a cache miss (listed hash
/// lookup, then session-token or JWT verification), without the cache, so that a run does not
/// depend on what earlier inputs left in it.
pub fn authenticate(world: &World, token: &str) {
    let _ = world
        .policy()
        .credential(&cuttle::auth::sha256(token))
        .is_some();
    if let Ok(actor) = world.auth.verify_uncached(token, NOW) {
        // Only a correctly signed token gets here; it must name the world's project.
        assert_eq!(&*actor.project, "fuzz", "{actor:?}");
    }
}

/// A publish, as `Session::publish` handles it after the rate and size limits, for every actor
/// and layout of the world; then what `Router::deliver` does with the upstream message.
pub fn publish(world: &World, p: &PublishFrame<'_>) {
    let topic = match ClientTopic::parse(p.topic) {
        Ok(t) => t,
        Err(e) => {
            assert_frame(
                &ErrorFrame {
                    error: "invalid_topic",
                    topic: Some(p.topic),
                    hint: Some(&e.to_string()),
                    msg_ref: p.msg_ref,
                    ..Default::default()
                }
                .encode(),
            );
            return;
        }
    };
    check_client_topic(p.topic, topic);
    let filter = filters::publish_filter(p.filter, &p.filters);
    for actor in &world.actors {
        // The session stops at a denial; the topic work below is pure, so it runs regardless.
        let _ = world.policy().authorize(actor, topic, Access::Write);
        let Ok(filter) = &filter else { continue };
        for layout in &world.layouts {
            let upstream = check_publish(layout, actor.scope(), topic, filter.as_deref());
            let delivered = layout
                .parse_upstream(&upstream)
                .map(|up| up.client_topic())
                .unwrap_or_else(|| unreachable!("checked by check_publish"));
            let _ = world.policy().authorize_delivery(actor, delivered);
        }
    }
    if let Err(e) = &filter {
        assert_frame(
            &ErrorFrame {
                error: &e.to_string(),
                topic: Some(p.topic),
                msg_ref: p.msg_ref,
                ..Default::default()
            }
            .encode(),
        );
    }
    check_envelope(p.data);
    let filter = filter.ok().flatten();
    assert_frame(&encode::message(p.topic, p.data, filter.as_deref()));
    if let Some(msg_ref) = p.msg_ref {
        assert_frame(&encode::published(p.topic, msg_ref));
    }
}

/// A subscribe or setFilters, as `Session::plan` handles it, for every actor and layout.
pub fn subscribe(
    world: &World,
    topic: &str,
    items: &[FilterItem],
    load_balance: bool,
    group: Option<&str>,
) {
    assert_frame(&encode::subscribed(topic, load_balance));
    assert_frame(&encode::unsubscribed(topic));
    let Ok(filter) = ClientFilter::parse(topic) else {
        return;
    };
    check_client_filter(topic, &filter);
    let Ok(sub) = filters::subscription_filters(items) else {
        return;
    };
    for level in &sub {
        check_filter_level(level);
    }
    for actor in &world.actors {
        if let Ok(grant) = world.policy().authorize_subscription(actor, &filter) {
            // Wildcards are decided per delivery; only exact subscriptions are decided now.
            assert_eq!(
                grant == SubscriptionGrant::Exact,
                !filter.is_wildcard(),
                "{topic:?}"
            );
        }
        let share = match (load_balance, group) {
            (false, _) => None,
            (true, Some(g)) if filters::check_group(g).is_err() => continue,
            (true, Some(g)) => Some(g.to_string()),
            // PROTOCOL §10: the group defaults to the actor id, made safe.
            (true, None) => Some(filters::encode_group(&actor.id).into_owned()),
        };
        for layout in &world.layouts {
            check_subscription(layout, actor.scope(), &filter, &sub, share.as_deref());
        }
    }
}

/// A client topic that parsed for publishing: the subscription parser agrees, and it prints
/// back to the string it came from.
pub fn check_client_topic(s: &str, topic: ClientTopic<'_>) {
    assert_eq!(
        ClientFilter::parse(s).ok().and_then(|f| f.as_exact()),
        Some(topic),
        "{s:?}"
    );
    assert_eq!(topic.to_string(), s);
}

/// A client filter that parsed: it is an exact topic exactly when the publish parser takes it.
pub fn check_client_filter(s: &str, filter: &ClientFilter<'_>) {
    assert_eq!(ClientTopic::parse(s).ok(), filter.as_exact(), "{s:?}");
}

/// The upstream topic of a publish is a valid MQTT topic in the actor's namespace, and maps
/// back to the same client topic, scope and filter. Returns it.
pub fn check_publish(
    layout: &TopicLayout,
    scope: Option<&str>,
    topic: ClientTopic<'_>,
    filter: Option<&str>,
) -> String {
    let upstream = layout.publish_topic(scope, topic, filter);
    check_mqtt_topic(&upstream);
    assert!(
        upstream.starts_with(&namespace(layout, topic.app, scope)),
        "{upstream:?}"
    );
    let back = layout
        .parse_upstream(&upstream)
        .unwrap_or_else(|| panic!("{upstream:?} does not parse back"));
    assert_eq!(back.client_topic(), topic, "{upstream:?}");
    assert_eq!(back.scope, scope, "{upstream:?}");
    assert_eq!(back.filter, filter, "{upstream:?}");
    upstream
}

/// The upstream filters of a subscription: valid MQTT filters (under `$share/<name>/` when
/// load-balanced) whose first levels name the actor's namespace, matching the publishes of
/// that namespace under the subscription and those of no other scope.
pub fn check_subscription(
    layout: &TopicLayout,
    scope: Option<&str>,
    filter: &ClientFilter<'_>,
    sub: &[String],
    share: Option<&str>,
) {
    let result = layout.subscription_filters(scope, filter, sub, share);
    // The one refusal left after validation: sub-topic filters under `app/#` or `app/room/#`.
    assert_eq!(
        result.is_err(),
        filter.topic == TopicLevel::All && !sub.is_empty(),
        "{filter:?} {sub:?} {result:?}"
    );
    let Ok(upstream) = result else { return };
    assert_eq!(upstream.len(), sub.len().max(1), "{upstream:?}");
    let ns = namespace(layout, filter.app, scope);
    // A concrete topic under the filter: its own levels, or any value for a wildcard.
    let concrete = ClientTopic {
        app: filter.app,
        room: filter.room.exact().unwrap_or("some-room"),
        topic: filter.topic.exact().unwrap_or("some-topic"),
    };
    for (i, f) in upstream.iter().enumerate() {
        let plain = match share {
            None => f.as_str(),
            Some(group) => {
                let (name, plain) = f
                    .strip_prefix("$share/")
                    .and_then(|rest| rest.split_once('/'))
                    .unwrap_or_else(|| panic!("{f:?} is not a $share filter"));
                assert_eq!(
                    name,
                    TopicLayout::share_name(filter.app, scope, group, plain),
                    "{f:?}"
                );
                plain
            }
        };
        check_mqtt_filter(plain);
        assert!(plain.starts_with(&ns), "{plain:?} outside {ns:?}");
        let subfilter = sub.get(i).map(String::as_str);
        for other in SCOPES {
            let published = layout.publish_topic(other, concrete, subfilter);
            assert_eq!(
                mqtt_matches(plain, &published),
                other == scope,
                "filter {plain:?} vs topic {published:?}"
            );
        }
    }
}

/// `[prefix/]app/scope/`: the literal levels that name one namespace.
fn namespace(layout: &TopicLayout, app: &str, scope: Option<&str>) -> String {
    let prefix = layout.prefix();
    let sep = if prefix.is_empty() { "" } else { "/" };
    format!("{prefix}{sep}{app}/{}/", scope_segment(scope))
}

/// A sub-topic level produced from client filters: one non-empty literal level.
pub fn check_filter_level(level: &str) {
    assert!(!level.is_empty() && !level.starts_with('$'), "{level:?}");
    assert!(
        !level
            .chars()
            .any(|c| matches!(c, '/' | '+' | '#' | '\0') || is_mqtt_unsafe(c)),
        "{level:?}"
    );
}

/// What a broker accepts as a PUBLISH topic, and nothing a broker may refuse (MQTT 5 §4.7,
/// plus Mosquitto's refusal of control characters): no wildcards, no empty levels, no `$`
/// start, at most 65,535 bytes.
pub fn check_mqtt_topic(t: &str) {
    assert!(!t.is_empty() && t.len() <= 65_535, "{t:?}");
    assert!(!t.starts_with('$'), "{t:?}");
    for level in t.split('/') {
        assert!(!level.is_empty(), "empty level in {t:?}");
        check_literal_chars(level, t);
    }
}

/// What a broker accepts as a SUBSCRIBE filter: `+` and `#` fill whole levels, `#` only last.
pub fn check_mqtt_filter(f: &str) {
    assert!(!f.is_empty() && f.len() <= 65_535, "{f:?}");
    assert!(!f.starts_with('$'), "{f:?}");
    let levels: Vec<&str> = f.split('/').collect();
    for (i, level) in levels.iter().enumerate() {
        match *level {
            "+" => {}
            "#" => assert_eq!(i, levels.len() - 1, "'#' not last in {f:?}"),
            _ => {
                assert!(!level.is_empty(), "empty level in {f:?}");
                check_literal_chars(level, f);
            }
        }
    }
}

fn check_literal_chars(level: &str, whole: &str) {
    assert!(
        !level
            .chars()
            .any(|c| matches!(c, '+' | '#' | '\0') || is_mqtt_unsafe(c)),
        "{whole:?}"
    );
}

/// MQTT topic matching (MQTT 5 §4.7.1), written here rather than taken from the proxy so that
/// the proxy's layout is checked against the standard, not against itself.
pub fn mqtt_matches(filter: &str, topic: &str) -> bool {
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            // `#` also matches the parent level: `a/#` matches `a`.
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// The echo envelope: whatever `data` is, the receiving side gets it back byte for byte, and
/// the sender is named exactly when echo is off.
pub fn check_envelope(data: &[u8]) {
    for echo in [true, false] {
        let payload = envelope::wrap(data, SOCKET_ID, echo);
        let (back, sender) = envelope::unwrap(&payload);
        assert_eq!(back, data, "echo {echo}");
        assert_eq!(sender, (!echo).then_some(SOCKET_ID), "echo {echo}");
    }
}

/// A server → client frame is exactly one MessagePack map with string keys (values are only
/// measured: `data` may nest as deep as the client sent it).
pub fn assert_frame(frame: &[u8]) {
    let mut r = Reader::new(frame);
    let n = r.map_len().expect("a frame is a map");
    for _ in 0..n {
        r.str().expect("frame keys are strings");
        r.value_bytes().expect("frame values are complete");
    }
    assert!(r.is_empty(), "trailing bytes after a frame");
}
