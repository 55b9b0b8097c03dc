//! Authorization decisions (DESIGN §3, §4): topic ACLs in both directions, the `server`
//! default, private rooms, session allow-lists, roles, and wildcard subscriptions with their
//! delivery-time check; room access alone (for presence) and the policy-order resolution of
//! bare lobby slugs (DESIGN §9, PROTOCOL A12).

mod common;

use std::sync::Arc;

use common::*;
use cuttle::auth::session_token::{self, MintRequest};
use cuttle::auth::{Actor, Authenticator};
use cuttle::policy::authorize::{DENIAL_CODE_V2, DENIAL_ERROR_V1, DENIAL_ERROR_V2};
use cuttle::policy::{Access, ActorType, Denial, SubscriptionGrant};
use cuttle::policy::{App, Policy, Room};
use cuttle::topic::{ClientFilter, ClientTopic};
use serde_json::json;

struct Fx {
    auth: Authenticator,
}

impl Fx {
    fn new() -> Self {
        Self {
            auth: authenticator(),
        }
    }
    fn device(&self) -> Arc<Actor> {
        self.auth.authenticate(SENSOR1_TOKEN).unwrap()
    }
    fn server(&self) -> Arc<Actor> {
        self.auth.authenticate(BILLING_KEY).unwrap()
    }
    fn user(&self, sub: &str, roles: &[&str]) -> Arc<Actor> {
        let mut c = user_claims(sub);
        c["roles"] = json!(roles);
        self.auth.authenticate(&hs256(&c)).unwrap()
    }
    fn session(&self, rooms: &[&str]) -> Arc<Actor> {
        let t = session_token::mint(
            self.auth.policy(),
            &MintRequest {
                project: "demo".into(),
                ttl_s: 600,
                scope: None,
                rooms: rooms.iter().map(|r| r.to_string()).collect(),
            },
            now(),
        )
        .unwrap();
        self.auth.authenticate(&t).unwrap()
    }
    fn can(&self, actor: &Actor, topic: &str, access: Access) -> Result<(), Denial> {
        self.auth
            .policy()
            .authorize(actor, ClientTopic::parse(topic).unwrap(), access)
    }
    fn sub(&self, actor: &Actor, filter: &str) -> Result<SubscriptionGrant, Denial> {
        self.auth
            .policy()
            .authorize_subscription(actor, &ClientFilter::parse(filter).unwrap())
    }
    fn delivers(&self, actor: &Actor, topic: &str) -> bool {
        self.auth
            .policy()
            .authorize_delivery(actor, ClientTopic::parse(topic).unwrap())
    }
}

use Access::{Read, Write};

#[test]
fn topic_acl_in_both_directions() {
    let fx = Fx::new();
    let (device, server, bob, sess) = (
        fx.device(),
        fx.server(),
        fx.user("bob", &[]),
        fx.session(&[]),
    );
    // messages: device rw, user rw, session read
    assert_eq!(fx.can(&device, "chat/general/messages", Write), Ok(()));
    assert_eq!(fx.can(&bob, "chat/general/messages", Read), Ok(()));
    assert_eq!(fx.can(&sess, "chat/general/messages", Read), Ok(()));
    assert_eq!(
        fx.can(&sess, "chat/general/messages", Write),
        Err(Denial::Permission {
            kind: ActorType::Session,
            access: cuttle::policy::authorize::AccessVerb::Write
        })
    );
    // orders: device read only, user none
    assert_eq!(fx.can(&device, "chat/general/orders", Read), Ok(()));
    assert!(fx.can(&device, "chat/general/orders", Write).is_err());
    assert!(fx.can(&bob, "chat/general/orders", Read).is_err());
    // telemetry: device write only (a device cannot read other devices' telemetry)
    assert_eq!(fx.can(&device, "chat/general/telemetry", Write), Ok(()));
    assert!(fx.can(&device, "chat/general/telemetry", Read).is_err());
    // server: read-write unless the topic lists it; analytics lists `server: write`
    assert_eq!(fx.can(&server, "chat/general/messages", Write), Ok(()));
    assert_eq!(fx.can(&server, "chat/general/messages", Read), Ok(()));
    assert_eq!(fx.can(&server, "chat/general/analytics", Write), Ok(()));
    assert!(fx.can(&server, "chat/general/analytics", Read).is_err());
    // telemetry lists `server: read`
    assert!(fx.can(&server, "chat/general/telemetry", Write).is_err());
}

#[test]
fn unknown_names_are_denied() {
    let fx = Fx::new();
    let d = fx.device();
    assert_eq!(
        fx.can(&d, "nope/general/messages", Read),
        Err(Denial::UnknownApp)
    );
    assert_eq!(
        fx.can(&d, "chat/nope/messages", Read),
        Err(Denial::UnknownRoom)
    );
    assert_eq!(
        fx.can(&d, "chat/general/nope", Read),
        Err(Denial::UnknownTopic)
    );
    // Another project's app does not exist for this actor.
    assert_eq!(fx.can(&d, "ops/main/jobs", Read), Err(Denial::UnknownApp));
    // The wire strings for a denial.
    assert_eq!(
        (DENIAL_ERROR_V1, DENIAL_ERROR_V2, DENIAL_CODE_V2),
        ("not_authorized", "unknown_topic", 42940)
    );
}

#[test]
fn private_rooms_admit_only_their_actors() {
    let fx = Fx::new();
    let alice = fx.user("alice", &[]);
    assert_eq!(fx.can(&alice, "chat/vip/messages", Write), Ok(()));
    assert_eq!(fx.can(&fx.server(), "chat/vip/orders", Write), Ok(()));
    assert_eq!(
        fx.can(&fx.device(), "chat/vip/messages", Read),
        Err(Denial::PrivateRoom)
    );
    assert_eq!(
        fx.can(&fx.user("bob", &[]), "chat/vip/messages", Read),
        Err(Denial::PrivateRoom)
    );
    // An unlisted user named like nobody in the room.
    assert_eq!(
        fx.can(&fx.user("carol", &[]), "chat/vip/messages", Read),
        Err(Denial::PrivateRoom)
    );
    assert_eq!(
        fx.can(&fx.session(&[]), "chat/vip/messages", Read),
        Err(Denial::PrivateRoom)
    );
}

#[test]
fn session_allow_list_restricts_rooms() {
    let fx = Fx::new();
    let s = fx.session(&["chat/general"]);
    assert_eq!(fx.can(&s, "chat/general/messages", Read), Ok(()));
    assert_eq!(
        fx.can(&s, "chat/lobby/messages", Read),
        Err(Denial::SessionRoom)
    );
    // Without a list, every public room.
    assert_eq!(
        fx.can(&fx.session(&[]), "chat/lobby/messages", Read),
        Ok(())
    );
}

#[test]
fn roles_grant_extra_topics_to_users() {
    let fx = Fx::new();
    let plain = fx.user("carol", &[]);
    let moderator = fx.user("carol", &["moderator"]);
    let auditor = fx.user("dave", &["auditor"]);
    assert!(fx.can(&plain, "chat/general/analytics", Read).is_err());
    assert_eq!(fx.can(&moderator, "chat/general/analytics", Read), Ok(()));
    assert!(
        fx.can(&moderator, "chat/general/analytics", Write).is_err(),
        "grants are exact"
    );
    assert_eq!(fx.can(&auditor, "chat/general/orders", Read), Ok(()));
    // Roles never reach other actor types (a device has no role claim).
    assert!(
        fx.can(&fx.device(), "chat/general/analytics", Read)
            .is_err()
    );
}

#[test]
fn wildcard_subscriptions_are_checked_at_delivery() {
    let fx = Fx::new();
    let device = fx.device();
    // A wildcard over rooms is accepted (general and lobby are readable)…
    assert_eq!(
        fx.sub(&device, "chat/+/messages"),
        Ok(SubscriptionGrant::CheckEachDelivery)
    );
    // …but never delivers from the private room it is not in.
    assert!(fx.delivers(&device, "chat/general/messages"));
    assert!(!fx.delivers(&device, "chat/vip/messages"));
    // A wildcard over topics delivers only readable topics.
    assert_eq!(
        fx.sub(&device, "chat/general/+"),
        Ok(SubscriptionGrant::CheckEachDelivery)
    );
    assert!(fx.delivers(&device, "chat/general/orders"));
    assert!(!fx.delivers(&device, "chat/general/telemetry"));
    assert!(!fx.delivers(&device, "chat/general/analytics"));
    assert_eq!(
        fx.sub(&device, "chat/#"),
        Ok(SubscriptionGrant::CheckEachDelivery)
    );

    // Exact subscriptions are decided up front.
    assert_eq!(
        fx.sub(&device, "chat/general/messages"),
        Ok(SubscriptionGrant::Exact)
    );
    assert_eq!(
        fx.sub(&device, "chat/vip/messages"),
        Err(Denial::PrivateRoom)
    );
    assert_eq!(fx.sub(&device, "chat/vip/#"), Err(Denial::PrivateRoom));
    assert_eq!(fx.sub(&device, "chat/+/nope"), Err(Denial::UnknownTopic));
    assert_eq!(fx.sub(&device, "nope/#"), Err(Denial::UnknownApp));

    // Nothing readable under the wildcard: refused at subscribe time.
    let server = fx.server();
    assert_eq!(
        fx.sub(&server, "chat/+/analytics"),
        Err(Denial::NothingReadable)
    );
    let s = fx.session(&["chat/general"]);
    assert_eq!(fx.sub(&s, "chat/+/orders"), Err(Denial::NothingReadable));
    assert_eq!(
        fx.sub(&s, "chat/+/messages"),
        Ok(SubscriptionGrant::CheckEachDelivery)
    );
    assert!(fx.delivers(&s, "chat/general/messages"));
    assert!(!fx.delivers(&s, "chat/lobby/messages"));
}

#[test]
fn decisions_follow_the_current_policy() {
    // Actors refer to the policy by name, so a new snapshot decides for an old actor.
    let fx = Fx::new();
    let device = fx.device();
    let revoked = policy_yaml().replace(
        "messages:  { device: read-write, user: read-write, session: read }",
        "messages:  { device: none, user: read-write, session: read }",
    );
    let p2 = try_compile(&revoked).unwrap();
    assert!(fx.can(&device, "chat/general/messages", Read).is_ok());
    assert!(
        p2.authorize(
            &device,
            ClientTopic::parse("chat/general/messages").unwrap(),
            Read
        )
        .is_err()
    );
}

/// The `chat` app of the test policy and one of its rooms.
fn chat_room<'p>(policy: &'p Policy, room: &str) -> (&'p App, &'p Room) {
    let app = policy.project("demo").unwrap().apps.get("chat").unwrap();
    (app, app.rooms.get(room).unwrap())
}

#[test]
fn room_access_alone() {
    let fx = Fx::new();
    let policy = fx.auth.policy();
    let access = |actor: &Actor, room: &str| {
        let (app, room) = chat_room(policy, room);
        policy.room_access(actor, app, room)
    };
    let (alice, bob, device, server) = (
        fx.user("alice", &[]),
        fx.user("bob", &[]),
        fx.device(),
        fx.server(),
    );
    let open_session = fx.session(&[]);
    // A public room admits everyone, sessions included.
    for actor in [&alice, &bob, &device, &server, &open_session] {
        assert_eq!(access(actor, "general"), Ok(()), "{}", actor.id);
    }
    // A private room admits its listed actors only, and never a session.
    assert_eq!(access(&alice, "vip"), Ok(()));
    assert_eq!(access(&server, "vip"), Ok(()));
    assert_eq!(access(&bob, "vip"), Err(Denial::PrivateRoom));
    assert_eq!(access(&device, "vip"), Err(Denial::PrivateRoom));
    assert_eq!(access(&open_session, "vip"), Err(Denial::PrivateRoom));
    // A session's allow-list must name the room.
    let listed = fx.session(&["chat/general"]);
    assert_eq!(access(&listed, "general"), Ok(()));
    assert_eq!(access(&listed, "lobby"), Err(Denial::SessionRoom));
}

#[test]
fn bare_lobby_slugs_resolve_in_policy_order() {
    // Names chosen so that neither alphabetical nor declaration-reversed order is the YAML
    // order; several apps declare `hall`.
    let policy = try_compile(
        r#"
projects:
  - id: demo
    apps:
      - slug: zeta
        rooms: [ { slug: a }, { slug: b }, { slug: c } ]
        lobbies:
          - { slug: hall, rooms: [c, a, b] }
          - { slug: a, rooms: [a] }
      - slug: alpha
        rooms: [ { slug: b } ]
        lobbies: [ { slug: hall, rooms: [b] }, { slug: side, rooms: [b] } ]
      - slug: mid
        rooms: [ { slug: c } ]
        lobbies: [ { slug: hall, rooms: [c] } ]
      - slug: beta
"#,
    )
    .unwrap_or_else(|d| panic!("{d}"));
    let project = policy.project("demo").unwrap();
    let order: Vec<&str> = project.apps_in_order().map(|a| &*a.slug).collect();
    assert_eq!(order, ["zeta", "alpha", "mid", "beta"]);

    let (app, hall) = project.lobby("hall").unwrap();
    assert_eq!((&*app.slug, &*hall.slug), ("zeta", "hall"));
    // Rooms keep their YAML order.
    let rooms: Vec<&str> = hall.rooms.iter().map(|r| &**r).collect();
    assert_eq!(rooms, ["c", "a", "b"]);
    // Only the later app declares `side`.
    assert_eq!(&*project.lobby("side").unwrap().0.slug, "alpha");
    // A lobby may be named like a room: they are separate namespaces.
    let (app, a) = project.lobby("a").unwrap();
    assert_eq!((&*app.slug, a.rooms.len()), ("zeta", 1));
    assert!(project.lobby("nope").is_none());
    // Each app still holds its own `hall`, for callers that name the app.
    let mid = project.apps.get("mid").unwrap();
    assert_eq!(&*mid.lobbies.get("hall").unwrap().rooms[0], "c");
}
