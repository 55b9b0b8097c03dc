//! Presence and lobby frames (PROTOCOL §11–§12) on one replica: event order, per-actor
//! semantics, lists, room switches, scopes, private rooms, session allow-lists, lobbies, the
//! room remembered for a reconnect, and every bound. (Across replicas: `presence::sim_tests`
//! and `tests/presence.rs`.)

use super::*;

fn presence(room: Option<&str>, data: Value) -> Vec<u8> {
    let mut pairs = vec![("type", Value::from("presence")), ("data", data)];
    if let Some(r) = room {
        pairs.push(("roomId", Value::from(r)));
    }
    frame(&pairs)
}

fn get_presence(room: Option<&str>) -> Vec<u8> {
    let mut pairs = vec![("type", Value::from("getPresence"))];
    if let Some(r) = room {
        pairs.push(("roomId", Value::from(r)));
    }
    frame(&pairs)
}

fn lobby(kind: &str, slug: &str) -> Vec<u8> {
    frame(&[("type", Value::from(kind)), ("lobbyId", Value::from(slug))])
}

fn status(n: i64) -> Value {
    Value::Map(vec![(Value::from("status"), Value::from(n))])
}

fn user(proxy: &Arc<Proxy>, sub: &str) -> Client {
    let actor = authenticate(proxy, &user_token(sub));
    Client::new(proxy, actor, 1)
}

/// (event, actor, presence data) of each `presence` event frame.
fn events(frames: &[Bytes]) -> Vec<(String, String, Option<Value>)> {
    decoded(frames)
        .iter()
        .map(|f| {
            assert_eq!(str_of(f, "type"), Some("presence"), "{f:?}");
            let data = f.get("data").expect("data");
            let get = |k: &str| {
                data.as_map()
                    .and_then(|m| m.iter().find(|(key, _)| key.as_str() == Some(k)))
                    .map(|(_, v)| v.clone())
            };
            (
                str_of(f, "event").expect("event").to_string(),
                get("actor_token_id")
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .expect("actor_token_id"),
                get("presence"),
            )
        })
        .collect()
}

fn ev(kind: &str, actor: &str, data: Option<Value>) -> (String, String, Option<Value>) {
    (kind.to_string(), actor.to_string(), data)
}

/// The actors of a `presenceList` reply, checking the entry shape the SDK reads.
fn listed(frame: &[u8], room: Option<&str>) -> Vec<String> {
    let f = fields(frame);
    assert_eq!(str_of(&f, "type"), Some("presenceList"), "{f:?}");
    assert_eq!(str_of(&f, "roomId"), room, "{f:?}");
    let Some(Value::Array(entries)) = f.get("data") else {
        panic!("data is an array: {f:?}")
    };
    entries
        .iter()
        .map(|e| {
            let m: BTreeMap<String, Value> = e
                .as_map()
                .expect("entry map")
                .iter()
                .map(|(k, v)| (k.as_str().expect("key").to_string(), v.clone()))
                .collect();
            assert_eq!(str_of(&m, "status"), Some("online"), "{m:?}");
            assert!(m.get("joinedAt").and_then(Value::as_u64).is_some(), "{m:?}");
            assert!(m.contains_key("presence"), "{m:?}");
            str_of(&m, "actorTokenId")
                .expect("actorTokenId")
                .to_string()
        })
        .collect()
}

fn close_cleanly(mut c: Client) {
    c.machine.end_cleanly();
    drop(c);
}

#[tokio::test(start_paused = true)]
async fn first_entry_joins_then_updates_sender_included_and_later_only_updates() {
    let proxy = proxy();
    let mut alice = user(&proxy, "alice");
    let mut bob = user(&proxy, "bob");
    alice.silent(&presence(Some("general"), status(1)));
    assert_eq!(
        events(&alice.queued()),
        vec![
            ev("join", "alice", Some(status(1))),
            ev("update", "alice", Some(status(1)))
        ]
    );
    bob.silent(&presence(Some("general"), status(7)));
    let both = vec![
        ev("join", "bob", Some(status(7))),
        ev("update", "bob", Some(status(7))),
    ];
    assert_eq!(events(&bob.queued()), both);
    assert_eq!(events(&alice.queued()), both);
    alice.silent(&presence(Some("general"), status(2)));
    let update = vec![ev("update", "alice", Some(status(2)))];
    assert_eq!(events(&alice.queued()), update);
    assert_eq!(events(&bob.queued()), update);
    // The same data again changes nothing: no event.
    alice.silent(&presence(Some("general"), status(2)));
    assert!(bob.queued().is_empty());
    // A clean close leaves at once, to the others.
    close_cleanly(bob);
    assert_eq!(events(&alice.queued()), vec![ev("leave", "bob", None)]);
    assert_eq!(
        listed(
            &alice.reply(&get_presence(Some("general"))),
            Some("general")
        ),
        vec!["alice"]
    );
}

#[tokio::test(start_paused = true)]
async fn an_actor_with_two_connections_is_one_member_until_its_last_leaves() {
    let proxy = proxy();
    let mut watcher = user(&proxy, "bob");
    watcher.silent(&presence(Some("general"), status(0)));
    watcher.queued();
    let mut tab1 = user(&proxy, "alice");
    tab1.silent(&presence(Some("general"), status(1)));
    assert_eq!(
        events(&watcher.queued()),
        vec![
            ev("join", "alice", Some(status(1))),
            ev("update", "alice", Some(status(1)))
        ]
    );
    // The second tab sees itself join (its own map), nobody else sees a second join.
    let mut tab2 = user(&proxy, "alice");
    let own = tab2.send(&presence(Some("general"), status(1)));
    assert_eq!(
        events(&own),
        vec![
            ev("join", "alice", Some(status(1))),
            ev("update", "alice", Some(status(1)))
        ]
    );
    assert!(watcher.queued().is_empty(), "no second join");
    assert_eq!(
        listed(
            &watcher.reply(&get_presence(Some("general"))),
            Some("general")
        ),
        vec!["alice", "bob"]
    );
    // The latest data of any of its connections is the actor's.
    tab2.silent(&presence(Some("general"), status(2)));
    assert_eq!(
        events(&watcher.queued()),
        vec![ev("update", "alice", Some(status(2)))]
    );
    close_cleanly(tab2);
    // Still present through tab 1 (whose data is the actor's again).
    assert_eq!(
        events(&watcher.queued()),
        vec![ev("update", "alice", Some(status(1)))]
    );
    close_cleanly(tab1);
    assert_eq!(events(&watcher.queued()), vec![ev("leave", "alice", None)]);
}

#[tokio::test(start_paused = true)]
async fn a_room_switch_leaves_the_old_room_and_joins_the_new() {
    let proxy = proxy();
    let mut in_general = user(&proxy, "bob");
    in_general.silent(&presence(Some("general"), status(0)));
    let mut in_lobby = user(&proxy, "carol");
    in_lobby.silent(&presence(Some("lobby"), status(0)));
    let mut mover = user(&proxy, "dave");
    mover.silent(&presence(Some("general"), status(1)));
    in_general.queued();
    in_lobby.queued();
    mover.queued();
    mover.silent(&presence(Some("lobby"), status(2)));
    assert_eq!(
        events(&in_general.queued()),
        vec![ev("leave", "dave", None)]
    );
    assert_eq!(
        events(&in_lobby.queued()),
        vec![
            ev("join", "dave", Some(status(2))),
            ev("update", "dave", Some(status(2)))
        ]
    );
    // The mover's own stream: join and update of the new room (its leave is for the others).
    assert_eq!(
        events(&mover.queued()),
        vec![
            ev("join", "dave", Some(status(2))),
            ev("update", "dave", Some(status(2)))
        ]
    );
    assert_eq!(
        listed(&mover.reply(&get_presence(None)), None),
        vec!["carol", "dave"]
    );
}

#[tokio::test(start_paused = true)]
async fn lists_unknown_rooms_and_presence_without_a_room() {
    let proxy = proxy();
    let mut c = user(&proxy, "bob");
    // Nowhere yet: no room, an empty list without roomId; an unknown slug: [] with it.
    assert!(listed(&c.reply(&get_presence(None)), None).is_empty());
    assert!(listed(&c.reply(&get_presence(Some("nope"))), Some("nope")).is_empty());
    // Presence for an unknown room, or without a room on a fresh connection: stored, silent.
    c.silent(&presence(Some("nope"), status(1)));
    c.silent(&presence(None, status(1)));
    assert!(c.queued().is_empty());
    assert!(proxy.presence.members(&key(None, "general")).is_empty());
    // In a room, presence without roomId updates it.
    c.silent(&presence(Some("general"), status(1)));
    c.queued();
    c.silent(&presence(None, status(2)));
    assert_eq!(
        events(&c.queued()),
        vec![ev("update", "bob", Some(status(2)))]
    );
}

fn key(scope: Option<&str>, room: &str) -> crate::presence::core::RoomKey {
    crate::presence::core::RoomKey {
        project: "demo".into(),
        app: "chat".into(),
        scope: scope.map(Into::into),
        room: room.into(),
    }
}

#[tokio::test(start_paused = true)]
async fn scopes_never_see_each_other() {
    let proxy = proxy();
    let mut unscoped = Client::device(&proxy);
    let mut acme = Client::new(&proxy, authenticate(&proxy, ACME_SENSOR), 1);
    unscoped.silent(&presence(Some("general"), status(1)));
    acme.silent(&presence(Some("general"), status(2)));
    assert_eq!(
        events(&unscoped.queued()).len(),
        2,
        "its own join and update only"
    );
    assert_eq!(
        events(&acme.queued()).len(),
        2,
        "its own join and update only"
    );
    assert_eq!(
        listed(
            &unscoped.reply(&get_presence(Some("general"))),
            Some("general")
        ),
        vec!["sensor-1"]
    );
    assert_eq!(
        listed(&acme.reply(&get_presence(Some("general"))), Some("general")),
        vec!["sensor-2"]
    );
    assert_eq!(
        proxy.presence.members(&key(Some("acme"), "general")).len(),
        1
    );
    assert_eq!(proxy.presence.members(&key(None, "general")).len(), 1);
}

#[tokio::test(start_paused = true)]
async fn private_rooms_and_session_allow_lists_apply() {
    let proxy = proxy();
    // sensor-1 is not a member of vip: ignored, and vip lists nothing to it.
    let mut outsider = Client::device(&proxy);
    outsider.silent(&presence(Some("vip"), status(1)));
    assert!(outsider.queued().is_empty());
    assert!(proxy.presence.members(&key(None, "vip")).is_empty());
    let mut alice = user(&proxy, "alice");
    alice.silent(&presence(Some("vip"), status(1)));
    assert_eq!(events(&alice.queued()).len(), 2);
    assert!(listed(&outsider.reply(&get_presence(Some("vip"))), Some("vip")).is_empty());
    assert_eq!(
        listed(&alice.reply(&get_presence(Some("vip"))), Some("vip")),
        vec!["alice"]
    );
    // A guest limited to chat/general may be present there only.
    let token = session_token(&proxy, &["chat/general"]);
    let mut guest = Client::new(&proxy, authenticate(&proxy, &token), 1);
    guest.silent(&presence(Some("lobby"), status(1)));
    assert!(guest.queued().is_empty());
    assert!(proxy.presence.members(&key(None, "lobby")).is_empty());
    guest.silent(&presence(Some("general"), status(1)));
    assert_eq!(events(&guest.queued()).len(), 2);
}

#[tokio::test(start_paused = true)]
async fn lobbies_list_and_follow_their_open_rooms() {
    let proxy = proxy();
    let mut in_general = user(&proxy, "carol");
    in_general.silent(&presence(Some("general"), status(1)));
    let mut bob = user(&proxy, "bob");
    let r = fields(&bob.reply(&lobby("lobbySubscribe", "hall")));
    assert_eq!(str_of(&r, "type"), Some("lobbySubscribed"), "{r:?}");
    assert_eq!(str_of(&r, "lobbyId"), Some("hall"));
    // bob may not use vip: the lobby shows general and lobby only.
    let rooms: BTreeMap<String, Value> = r["presence"]
        .as_map()
        .expect("presence map")
        .iter()
        .map(|(k, v)| (k.as_str().expect("room").to_string(), v.clone()))
        .collect();
    assert_eq!(
        rooms.keys().cloned().collect::<Vec<_>>(),
        vec!["general", "lobby"]
    );
    let general = rooms["general"].as_map().expect("members");
    assert_eq!(general.len(), 1);
    assert_eq!(general[0].0.as_str(), Some("carol"));
    // Live events carry the lobby slug and the room slug.
    let mut dave = user(&proxy, "dave");
    dave.silent(&presence(Some("lobby"), status(3)));
    let live = decoded(&bob.queued());
    let kinds: Vec<_> = live
        .iter()
        .map(|f| str_of(f, "event").unwrap_or_default().to_string())
        .collect();
    assert_eq!(kinds, vec!["join", "update"], "{live:?}");
    for f in &live {
        assert_eq!(str_of(f, "type"), Some("lobbyPresence"));
        assert_eq!(str_of(f, "lobbyId"), Some("hall"));
        assert_eq!(str_of(f, "roomId"), Some("lobby"));
        assert_eq!(str_of(f, "actorId"), Some("dave"));
        assert_eq!(f.get("data"), Some(&status(3)));
    }
    // A private room it cannot use sends it nothing.
    let mut alice = user(&proxy, "alice");
    alice.silent(&presence(Some("vip"), status(1)));
    assert!(bob.queued().is_empty());
    // getLobbyPresence: the same shape.
    let l = fields(&bob.reply(&lobby("getLobbyPresence", "hall")));
    assert_eq!(str_of(&l, "type"), Some("lobbyPresenceList"));
    assert_eq!(l["presence"].as_map().map(Vec::len), Some(2));
    // A leave reaches it with `data: {}`.
    close_cleanly(dave);
    let f = decoded(&bob.queued());
    assert_eq!(str_of(&f[0], "event"), Some("leave"));
    assert_eq!(f[0].get("data"), Some(&Value::Map(vec![])));
    // Lobbies it may not see: not_authorized with lobbyId.
    for slug in ["backstage", "nope"] {
        let e = fields(&bob.reply(&lobby("lobbySubscribe", slug)));
        assert_eq!(str_of(&e, "error"), Some("not_authorized"), "{e:?}");
        assert_eq!(str_of(&e, "lobbyId"), Some(slug));
    }
    // Unsubscribed: answered, and silent from then on.
    let u = fields(&bob.reply(&lobby("lobbyUnsubscribe", "hall")));
    assert_eq!(str_of(&u, "type"), Some("lobbyUnsubscribed"));
    in_general.silent(&presence(Some("general"), status(9)));
    assert!(bob.queued().is_empty());
    // A member of vip sees it in the lobby.
    let a = fields(&alice.reply(&lobby("lobbySubscribe", "backstage")));
    assert_eq!(a["presence"].as_map().map(Vec::len), Some(1));
}

#[tokio::test(start_paused = true)]
async fn every_presence_bound_is_enforced() {
    let proxy = Proxy::without_broker(loaded(
        &config_with_presence(
            &[],
            &[],
            &[
                "max_data_bytes: 16",
                "frames_per_second: 3",
                "max_room_members: 2",
                "lobbies_per_connection: 1",
            ],
        ),
        Path::new("/nonexistent/proxy.yaml"),
    ));
    let mut a = user(&proxy, "a");
    let big = Value::Map(vec![(Value::from("x"), Value::from("y".repeat(20)))]);
    let e = a.reply(&presence(Some("general"), big));
    assert_error(
        &e,
        "message_too_large",
        Some(42930),
        None,
        Some("presence.max_data_bytes"),
    );
    assert_eq!(
        fields(&e).get("maxSizeBytes").and_then(Value::as_u64),
        Some(16)
    );
    a.silent(&presence(Some("general"), status(1)));
    a.reply(&get_presence(None));
    // The fourth frame within the second is refused; time refills the budget.
    let e = a.reply(&get_presence(None));
    assert_error(
        &e,
        "rate_limit_exceeded",
        Some(42910),
        None,
        Some("presence.frames_per_second"),
    );
    tokio::time::advance(Duration::from_secs(1)).await;
    let mut b = user(&proxy, "b");
    b.silent(&presence(Some("general"), status(1)));
    let mut c = user(&proxy, "c");
    let e = c.reply(&presence(Some("general"), status(1)));
    assert_error(
        &e,
        "presence_unavailable",
        None,
        None,
        Some("presence.max_room_members"),
    );
    assert_eq!(proxy.presence.members(&key(None, "general")).len(), 2);
    // Another connection of a member is not a new member.
    let mut b2 = user(&proxy, "b");
    assert_eq!(b2.send(&presence(Some("general"), status(2))).len(), 2);
    // One lobby per connection here.
    assert_eq!(
        str_of(&fields(&a.reply(&lobby("lobbySubscribe", "hall"))), "type"),
        Some("lobbySubscribed")
    );
    let e = fields(&a.reply(&lobby("lobbySubscribe", "backstage")));
    assert_eq!(str_of(&e, "error"), Some("not_authorized"));
    let alice_lobbies = user(&proxy, "alice").reply(&lobby("lobbySubscribe", "backstage"));
    assert_eq!(
        str_of(&fields(&alice_lobbies), "type"),
        Some("lobbySubscribed")
    );
}

#[tokio::test(start_paused = true)]
async fn the_room_is_remembered_for_a_reconnect() {
    let proxy = proxy();
    let mut first = user(&proxy, "bob");
    first.silent(&presence(Some("lobby"), status(1)));
    let stored = first.stored(&proxy).expect("record submitted");
    let record = restore::decode(&stored).expect("valid").expect("not empty");
    assert_eq!(record.room.as_deref(), Some("chat/lobby"));
    drop(first); // abnormal: lingers (grace), and the record stays
    // The SDK reconnects with reconnect:true, and re-sends presence without roomId.
    let mut second = user(&proxy, "bob");
    let (restored, _, _) = second.machine.restore(&stored);
    assert!(restored.is_empty());
    let own = second.send(&presence(None, status(2)));
    // bob was still present (the first connection lingers): its own join (as bob is now), no
    // second member; the others see an update.
    assert_eq!(
        events(&own),
        vec![
            ev("join", "bob", Some(status(2))),
            ev("update", "bob", Some(status(2)))
        ]
    );
    assert_eq!(
        events(&second.queued()),
        vec![ev("update", "bob", Some(status(2)))]
    );
    assert_eq!(proxy.presence.members(&key(None, "lobby")).len(), 1);
    // Another actor's record never puts anyone in a room.
    let mut carol = user(&proxy, "carol");
    carol.machine.restore(&stored);
    carol.silent(&presence(None, status(1)));
    assert!(carol.queued().is_empty());
    assert!(
        proxy
            .presence
            .members(&key(None, "lobby"))
            .iter()
            .all(|(a, _)| &**a != "carol")
    );
}

#[tokio::test(start_paused = true)]
async fn a_reload_that_closes_a_room_or_a_lobby_takes_the_connection_out() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (proxy, path) = reloadable(dir.path());
    let mut watcher = user(&proxy, "alice");
    watcher.silent(&presence(Some("lobby"), status(0)));
    let mut bob = user(&proxy, "bob");
    bob.silent(&presence(Some("lobby"), status(1)));
    assert_eq!(
        fields(&bob.reply(&lobby("lobbySubscribe", "hall")))["presence"]
            .as_map()
            .map(Vec::len),
        Some(2)
    );
    watcher.queued();
    bob.queued();
    // `lobby` becomes private to alice and billing: bob leaves it, and the lobby shows him
    // only `general` from now on.
    reload(
        &proxy,
        &path,
        "- slug: lobby\n",
        "- slug: lobby\n              actors: [alice, billing]\n",
    );
    let mut out = Vec::new();
    bob.machine
        .reevaluate(&mut out)
        .expect("bob is still valid");
    assert!(out.is_empty(), "{:?}", decoded(&out));
    assert_eq!(events(&watcher.queued()), vec![ev("leave", "bob", None)]);
    // (bob's lobby still followed `lobby` when he left it: he sees his own leave there.)
    let own: Vec<_> = decoded(&bob.queued())
        .iter()
        .map(|f| {
            (
                str_of(f, "type").map(str::to_owned),
                str_of(f, "event").map(str::to_owned),
            )
        })
        .collect();
    assert_eq!(
        own,
        vec![(Some("lobbyPresence".into()), Some("leave".into()))]
    );
    assert_eq!(
        listed(&watcher.reply(&get_presence(Some("lobby"))), Some("lobby")),
        vec!["alice"]
    );
    watcher.silent(&presence(Some("lobby"), status(5)));
    let q = bob.queued();
    assert!(
        q.is_empty(),
        "the lobby no longer follows `lobby` for bob: {:?}",
        decoded(&q)
    );
    let l = fields(&bob.reply(&lobby("getLobbyPresence", "hall")));
    assert_eq!(l["presence"].as_map().map(Vec::len), Some(1));
    // A lobby with no room left open to it ends with not_authorized.
    reload(
        &proxy,
        &path,
        "{ slug: hall, rooms: [general, lobby, vip] }",
        "{ slug: hall, rooms: [lobby, vip] }",
    );
    let mut out = Vec::new();
    bob.machine
        .reevaluate(&mut out)
        .expect("bob is still valid");
    let e = fields(&out[0]);
    assert_eq!(str_of(&e, "error"), Some("not_authorized"));
    assert_eq!(str_of(&e, "lobbyId"), Some("hall"));
}

/// A join storm in a room larger than a member's queue: presence uses at most half of the
/// queue and never flags the session a slow consumer; the member gets the room's list (which
/// replaces the SDK's map) once its queue drains.
#[tokio::test(start_paused = true)]
async fn a_join_storm_never_fills_a_member_s_queue_and_the_list_repairs_what_it_missed() {
    let proxy = proxy_with(&["send_queue: 8"], &[]);
    let mut member = user(&proxy, "member");
    member.silent(&presence(Some("general"), status(0)));
    let mut others = Vec::new();
    for i in 0..20 {
        let mut c = user(&proxy, &format!("u{i}"));
        c.silent(&presence(Some("general"), status(i)));
        others.push(c);
    }
    assert!(
        !member._overflow.is_set(),
        "presence flagged the member a slow consumer"
    );
    let first = decoded(&member.queued());
    assert!(
        first.len() <= 4,
        "presence took more than half the queue: {}",
        first.len()
    );
    // The member reads; once the room has been quiet for 500 ms, a tick sends the list (one,
    // not one per tick: a list is O(members)).
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(member.queued().is_empty(), "a list during the storm");
    tokio::time::sleep(Duration::from_millis(400)).await;
    let later = decoded(&member.queued());
    let list = later
        .iter()
        .find(|f| str_of(f, "type") == Some("presenceList"))
        .unwrap_or_else(|| panic!("no presenceList after the storm: {later:?}"));
    assert_eq!(str_of(list, "roomId"), Some("general"));
    assert_eq!(list["data"].as_array().map(Vec::len), Some(21));
    // Messages still fit: the queue was never more than half presence.
    assert!(!member._overflow.is_set());
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(member.queued().is_empty(), "the list is sent once");
}
