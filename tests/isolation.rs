//! The isolation invariant of DESIGN §4, as property tests.
//!
//! For random policies, actors, client topics, wildcards, sub-topic filters and load-balance
//! groups: no upstream filter produced for one namespace (app, scope) matches any upstream topic
//! produced for another; everything produced is a valid MQTT topic or filter; mapping and
//! stripping round-trip; and a wildcard subscription never delivers from a private room the
//! actor is not in, or from a room its session token does not allow.
//!
//! Matching uses a small MQTT 3.1.1 §4.7 matcher written here, independent of the proxy (which
//! never matches topics itself: the broker does, and names the subscription by its id).
//! rumqttc's `mqttbytes::matches` would be the obvious oracle, but it panics on a topic whose
//! first character is multi-byte UTF-8 (it slices `topic[..1]`), which random topics hit.

use std::collections::BTreeMap;
use std::sync::Arc;

use cuttle::auth::{Actor, RoomRef};
use cuttle::diagnostics::Diagnostics;
use cuttle::policy::spec::{ActorSpec, AppSpec, PolicySpec, ProjectSpec, RoomSpec, ScopeSpec};
use cuttle::policy::{ActorType, CompileContext, Policy, compile};
use cuttle::topic::filters::{
    FilterItem, check_group, encode_group, publish_filter, subscription_filters,
};
use cuttle::topic::upstream::TopicLayout;
use cuttle::topic::{ClientFilter, ClientTopic};
use proptest::prelude::*;
use proptest::sample::select;
use rumqttc::mqttbytes::{valid_filter, valid_topic};

/// MQTT topic matching per MQTT 3.1.1 §4.7: `+` matches one level, a trailing `#` matches
/// the rest including the parent level, and wildcards at the first level never match a topic
/// starting with `$`.
fn matches(topic: &str, filter: &str) -> bool {
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut t = topic.split('/');
    let mut f = filter.split('/').peekable();
    while let Some(fl) = f.next() {
        if fl == "#" && f.peek().is_none() {
            return true;
        }
        match t.next() {
            Some(tl) if fl == "+" || fl == tl => continue,
            _ => return false,
        }
    }
    t.next().is_none()
}

#[test]
fn the_oracle_matches_like_mqtt() {
    for (t, f, m) in [
        ("a/b/c", "a/b/c", true),
        ("a/b/c", "a/+/c", true),
        ("a/b/c", "a/#", true),
        ("a", "a/#", true),
        ("a/b", "a/b/#", true),
        ("a/b/c", "a/b", false),
        ("a/b", "a/b/c", false),
        ("a/b/c", "+/+", false),
        ("$SYS/x", "#", false),
        ("$SYS/x", "+/x", false),
        ("$SYS/x", "$SYS/#", true),
        ("é/x", "é/+", true),
        ("a//b", "a/+/b", true),
    ] {
        assert_eq!(matches(t, f), m, "{t} vs {f}");
    }
}

/// Names deliberately shared between apps, scopes, rooms and topics, plus the reserved and
/// hostile strings a client might try.
const NAMES: &[&str] = &[
    "chat",
    "iot",
    "ops",
    "acme",
    "globex",
    "general",
    "vip",
    "messages",
    "orders",
    "_x",
    "acme_chat",
    "sess_1",
];
const HOSTILE: &[&str] = &[
    "_", "+", "#", "$share", "$SYS", "a/b", "", "x y", "Chat", "\0", "a+b", "a#", "|", "%2F", "..",
    "/", "\u{1}", "x\u{7f}", "\u{85}", "\u{fdd0}", "\u{fffe}", "é",
];
const SCOPES: &[&str] = &["acme", "globex", "chat", "general", "_x", "sess_1", "vip"];
const ROOMS: &[&str] = &["general", "vip", "acme", "lobby", "globex"];
const TOPICS: &[&str] = &["messages", "orders", "acme", "general", "telemetry"];
const PERMS: &[&str] = &["none", "read", "write", "read-write"];

/// A topic level or filter value: mostly names (so that most cases reach the mapping and
/// namespaces collide often), sometimes hostile.
fn level() -> impl Strategy<Value = String> {
    prop_oneof![
        18 => select(NAMES).prop_map(String::from),
        1 => select(HOSTILE).prop_map(String::from),
        1 => "[a-z_+#/$|]{0,5}",
    ]
}

/// The app level: one of the policy's apps most of the time, so that the same app is often
/// seen from two scopes (the case isolation is about).
fn app_level() -> impl Strategy<Value = String> {
    prop_oneof![
        8 => select(&["chat", "iot", "ops"][..]).prop_map(String::from),
        1 => level(),
    ]
}

/// Client topic strings: mostly well-formed (so that most cases reach the mapping), with
/// wildcards and hostile levels mixed in.
fn client_string() -> impl Strategy<Value = String> {
    let room = prop_oneof![6 => level(), 2 => Just("+".to_string()), 1 => Just("#".to_string())];
    let topic = prop_oneof![6 => level(), 2 => Just("+".to_string()), 1 => Just("#".to_string())];
    prop_oneof![
        8 => (app_level(), room, proptest::option::weighted(0.95, topic))
            .prop_map(|(a, r, t)| match t { Some(t) => format!("{a}/{r}/{t}"), None => format!("{a}/{r}") }),
        1 => proptest::collection::vec(level(), 1..6).prop_map(|v| v.join("/")),
        1 => ".{0,40}",
    ]
}

/// Publish topic strings: mostly exact, sometimes anything a subscription could be.
fn publish_string() -> impl Strategy<Value = String> {
    prop_oneof![
        8 => (app_level(), level(), level()).prop_map(|(a, r, t)| format!("{a}/{r}/{t}")),
        2 => client_string(),
    ]
}

fn filter_items() -> impl Strategy<Value = Vec<FilterItem>> {
    let item = prop_oneof![
        3 => level().prop_map(FilterItem::One),
        1 => proptest::collection::vec(level(), 1..4).prop_map(FilterItem::All),
    ];
    prop_oneof![
        2 => Just(Vec::new()),
        1 => proptest::collection::vec(item, 1..4),
    ]
}

/// A random but valid two-project policy: fixed apps (`chat`, `iot` in p0; `ops` in p1),
/// random scopes, rooms (some private), topic ACLs and listed devices.
fn policy_spec() -> impl Strategy<Value = PolicySpec> {
    let scopes = proptest::sample::subsequence(SCOPES.to_vec(), 0..=SCOPES.len());
    let rooms = proptest::sample::subsequence(ROOMS.to_vec(), 1..=ROOMS.len());
    let topics = proptest::collection::btree_map(
        select(TOPICS),
        (select(PERMS), select(PERMS), select(PERMS)),
        1..=TOPICS.len(),
    );
    let device_scopes = proptest::collection::vec(proptest::option::of(0usize..8), 4);
    let members =
        proptest::collection::vec(proptest::collection::vec(any::<bool>(), 4), ROOMS.len());
    (scopes, rooms, topics, device_scopes, members).prop_map(
        |(scopes, rooms, topics, dscopes, members)| {
            // The same device ids in both projects (ids are per project), different tokens.
            let actors = |project: &str| -> Vec<ActorSpec> {
                dscopes
                    .iter()
                    .enumerate()
                    .map(|(i, s)| ActorSpec {
                        id: format!("d{i}"),
                        kind: "device".into(),
                        token_sha256: Some(hex::encode(cuttle::auth::sha256(&format!(
                            "{project}-d{i}"
                        )))),
                        api_key_sha256: None,
                        scope: s.and_then(|s| scopes.get(s).map(|s| s.to_string())),
                        scopes: None,
                    })
                    .collect()
            };
            let app = |slug: &str| AppSpec {
                slug: slug.into(),
                topics: topics
                    .iter()
                    .map(|(t, (d, u, s))| {
                        let acl: BTreeMap<String, String> =
                            [("device", d), ("user", u), ("session", s)]
                                .into_iter()
                                .map(|(k, v)| (k.to_string(), v.to_string()))
                                .collect();
                        (t.to_string(), acl)
                    })
                    .collect(),
                rooms: rooms
                    .iter()
                    .enumerate()
                    .map(|(ri, r)| RoomSpec {
                        slug: r.to_string(),
                        actors: members[ri]
                            .iter()
                            .enumerate()
                            .filter(|(_, m)| **m)
                            .map(|(i, _)| format!("d{i}"))
                            .collect(),
                    })
                    .collect(),
                lobbies: Vec::new(),
            };
            let project = |id: &str, apps: Vec<AppSpec>, actors: Vec<ActorSpec>| ProjectSpec {
                id: id.into(),
                jwt: None,
                session: None,
                scopes: scopes
                    .iter()
                    .map(|s| ScopeSpec {
                        slug: s.to_string(),
                        name: None,
                    })
                    .collect(),
                roles: BTreeMap::new(),
                apps,
                actors,
                webhooks: Vec::new(),
            };
            PolicySpec {
                projects: vec![
                    project("p0", vec![app("chat"), app("iot")], actors("p0")),
                    project("p1", vec![app("ops")], actors("p1")),
                ],
            }
        },
    )
}

fn compile_spec(spec: &PolicySpec) -> Policy {
    let mut diags = Diagnostics::new();
    let cx = CompileContext::new(std::path::Path::new("."), &|_| None);
    compile(spec, "policy", &cx, &mut diags)
        .unwrap_or_else(|| panic!("generated policy invalid:\n{diags}"))
}

/// Every actor the generated policy can produce: its listed devices, and unlisted users and
/// sessions in every scope (and none), in both projects.
fn actors_of(policy: &Policy) -> Vec<Actor> {
    let mut out = Vec::new();
    for project in policy.projects() {
        for listed in project.actors.values() {
            out.push(actor(
                &project.id,
                &listed.id,
                listed.kind,
                listed.scope.clone(),
                None,
            ));
        }
        let mut scopes: Vec<Option<Arc<str>>> = project.scopes.keys().cloned().map(Some).collect();
        scopes.push(None);
        for s in scopes {
            out.push(actor(
                &project.id,
                "user-x",
                ActorType::User,
                s.clone(),
                None,
            ));
            let rooms = Some(vec![RoomRef {
                app: "chat".into(),
                room: "general".into(),
            }]);
            out.push(actor(&project.id, "sess_x", ActorType::Session, s, rooms));
        }
    }
    out
}

fn actor(
    project: &str,
    id: &str,
    kind: ActorType,
    scope: Option<Arc<str>>,
    rooms: Option<Vec<RoomRef>>,
) -> Actor {
    Actor {
        project: project.into(),
        id: id.into(),
        kind,
        scope,
        roles: Box::new([]),
        rooms: rooms.map(Vec::into_boxed_slice),
        expires_at: None,
        credential_sha256: [0; 32],
        verified_by: cuttle::auth::Verification::Listed,
    }
}

/// `$share/<group>/<filter>` → `<filter>`; the broker matches the filter part.
fn without_share(filter: &str) -> &str {
    filter
        .strip_prefix("$share/")
        .and_then(|rest| rest.split_once('/'))
        .map_or(filter, |(_, f)| f)
}

struct Subscription {
    app: String,
    filters: Vec<String>,
}

/// Runs a client subscription through the same steps the session will: parse, filters, group,
/// layout. `None` when any step refuses the input (the client gets an error, nothing upstream).
fn subscribe(
    layout: &TopicLayout,
    scope: Option<&str>,
    actor_id: &str,
    topic: &str,
    items: &[FilterItem],
    group: Option<&Option<String>>,
) -> Option<Subscription> {
    let f = ClientFilter::parse(topic).ok()?;
    let sub = subscription_filters(items).ok()?;
    let share = match group {
        None => None,
        Some(Some(g)) => {
            check_group(g).ok()?;
            Some(g.clone())
        }
        Some(None) => Some(encode_group(actor_id).into_owned()),
    };
    let filters = layout
        .subscription_filters(scope, &f, &sub, share.as_deref())
        .ok()?;
    Some(Subscription {
        app: f.app.to_string(),
        filters,
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 5000, ..ProptestConfig::default() })]

    #[test]
    fn no_filter_of_one_namespace_matches_a_topic_of_another(
        spec in policy_spec(),
        prefix in select(&["", "cuttle", "a/b", "acme"][..]),
        (ai, bi) in (any::<prop::sample::Index>(), any::<prop::sample::Index>()),
        sub_topic in client_string(),
        items in filter_items(),
        group in proptest::option::of(proptest::option::of(level())),
        pub_topic in publish_string(),
        pub_filter in proptest::option::of(level()),
        pub_filters in proptest::collection::vec(level(), 0..2),
    ) {
        let policy = compile_spec(&spec);
        let actors = actors_of(&policy);
        let (a, b) = (ai.get(&actors), bi.get(&actors));
        let layout = TopicLayout::new(prefix).unwrap();

        let sub = subscribe(&layout, a.scope(), &a.id, &sub_topic, &items, group.as_ref());
        let publish = ClientTopic::parse(&pub_topic).ok().and_then(|t| {
            let f = publish_filter(pub_filter.as_deref(), &pub_filters).ok()?;
            Some((t, layout.publish_topic(b.scope(), t, f.as_deref())))
        });

        if let Some(sub) = &sub {
            for f in &sub.filters {
                prop_assert!(valid_filter(without_share(f)), "invalid MQTT filter {f:?}");
                prop_assert!(!f.chars().any(cuttle::topic::is_mqtt_unsafe), "unsafe character in {f:?}");
                if let Some(rest) = f.strip_prefix("$share/") {
                    let (name, _) = rest.split_once('/').unwrap();
                    prop_assert!(!name.is_empty() && !name.contains(['+', '#']), "bad share name {name:?}");
                }
            }
        }
        if let Some((t, topic)) = &publish {
            prop_assert!(valid_topic(topic) && !topic.starts_with('$'), "invalid MQTT topic {topic:?}");
            prop_assert!(!topic.chars().any(cuttle::topic::is_mqtt_unsafe), "unsafe character in {topic:?}");
            // Round trip.
            let back = layout.parse_upstream(topic).expect("own topics parse");
            prop_assert_eq!(back.client_topic(), *t);
            prop_assert_eq!(back.scope, b.scope());
        }
        if let (Some(sub), Some((t, topic))) = (&sub, &publish) {
            let same_namespace = sub.app == t.app && a.scope() == b.scope();
            if !same_namespace {
                for f in &sub.filters {
                    prop_assert!(
                        !matches(topic, without_share(f)),
                        "filter {f:?} of ({}, {:?}) matches topic {topic:?} of ({}, {:?})",
                        sub.app, a.scope(), t.app, b.scope()
                    );
                }
            }
        }
    }

    /// The presence topics (DESIGN §9) are out of every client's reach: no filter a client
    /// can cause matches a replica's presence topic, and the presence filter matches no topic
    /// a client can publish to, whatever the replica id.
    #[test]
    fn presence_topics_are_out_of_every_client_s_reach(
        spec in policy_spec(),
        prefix in select(&["", "cuttle", "a/b", "acme"][..]),
        ai in any::<prop::sample::Index>(),
        sub_topic in client_string(),
        items in filter_items(),
        group in proptest::option::of(proptest::option::of(level())),
        pub_topic in publish_string(),
        pub_filter in proptest::option::of(level()),
        replica in ".{0,40}",
    ) {
        let policy = compile_spec(&spec);
        let actors = actors_of(&policy);
        let a = ai.get(&actors);
        let layout = TopicLayout::new(prefix).unwrap();
        let presence = layout.presence_topic(&replica);
        let presence_filter = layout.presence_filter();
        prop_assert!(valid_topic(&presence) && !presence.starts_with('$'), "invalid presence topic {presence:?}");
        prop_assert!(!presence.chars().any(cuttle::topic::is_mqtt_unsafe), "unsafe character in {presence:?}");
        prop_assert!(valid_filter(&presence_filter));
        prop_assert!(matches(&presence, &presence_filter), "{presence_filter:?} misses {presence:?}");
        if let Some(sub) = subscribe(&layout, a.scope(), &a.id, &sub_topic, &items, group.as_ref()) {
            for f in &sub.filters {
                prop_assert!(!matches(&presence, without_share(f)), "client filter {f:?} matches {presence:?}");
            }
        }
        if let Ok(t) = ClientTopic::parse(&pub_topic)
            && let Ok(f) = publish_filter(pub_filter.as_deref(), &[])
        {
            let topic = layout.publish_topic(a.scope(), t, f.as_deref());
            prop_assert!(!matches(&topic, &presence_filter), "presence filter matches client topic {topic:?}");
        }
    }

    #[test]
    fn same_namespace_exact_subscriptions_do_match(
        scope in proptest::option::of(select(SCOPES)),
        app in select(NAMES), room in select(ROOMS), topic in select(TOPICS),
        filter in proptest::option::of(select(NAMES)),
    ) {
        // Non-vacuity: the mapping isolates by making filters *miss* other namespaces, so
        // check that they still hit their own.
        let layout = TopicLayout::new("").unwrap();
        let client = format!("{app}/{room}/{topic}");
        let t = ClientTopic::parse(&client).unwrap();
        let published = layout.publish_topic(scope, t, filter);
        let unfiltered = layout
            .subscription_filters(scope, &ClientFilter::parse(&client).unwrap(), &[], None)
            .unwrap();
        prop_assert!(matches(&published, &unfiltered[0]));
        for wildcard in [format!("{app}/+/{topic}"), format!("{app}/#"), format!("{app}/{room}/+")] {
            let f = layout
                .subscription_filters(scope, &ClientFilter::parse(&wildcard).unwrap(), &[], None)
                .unwrap();
            prop_assert!(matches(&published, &f[0]), "{wildcard} → {f:?} vs {published}");
        }
        if let Some(fv) = filter {
            let filtered = layout
                .subscription_filters(scope, &ClientFilter::parse(&client).unwrap(), &[fv.to_string()], None)
                .unwrap();
            prop_assert!(matches(&published, &filtered[0]));
        }
    }

    #[test]
    fn wildcard_delivery_respects_private_rooms_and_session_lists(
        spec in policy_spec(),
        ai in any::<prop::sample::Index>(),
        sub_topic in client_string(),
        room in select(ROOMS), topic in select(TOPICS),
    ) {
        let policy = compile_spec(&spec);
        let actors = actors_of(&policy);
        let a = ai.get(&actors);
        let Ok(filter) = ClientFilter::parse(&sub_topic) else { return Ok(()) };
        if policy.authorize_subscription(a, &filter).is_err() || !filter.matches(room, topic) {
            return Ok(());
        }
        let delivered = ClientTopic { app: filter.app, room, topic };
        if policy.authorize_delivery(a, delivered) {
            let project = policy.project(&a.project).unwrap();
            let r = &project.apps[filter.app].rooms[room];
            if let Some(members) = &r.members {
                prop_assert!(a.kind != ActorType::Session && members.contains(&a.id),
                    "{} delivered from private room {room}", a.id);
            }
            prop_assert!(a.room_allowed(filter.app, room));
        }
    }

    #[test]
    fn parsers_never_panic(s in ".{0,600}", bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
        let layout = TopicLayout::new("p").unwrap();
        let _ = ClientTopic::parse(&s);
        let _ = ClientFilter::parse(&s);
        let _ = layout.parse_upstream(&s);
        let lossy = String::from_utf8_lossy(&bytes);
        let _ = ClientFilter::parse(&lossy);
        let _ = layout.parse_upstream(&lossy);
        let _ = publish_filter(Some(&s), &[lossy.to_string()]);
        let _ = subscription_filters(&[FilterItem::One(s.clone()), FilterItem::All(vec![s.clone(), lossy.to_string()])]);
        let _ = encode_group(&s);
    }
}
