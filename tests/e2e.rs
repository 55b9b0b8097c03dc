//! End to end: the real proxy in-process, a real broker (embedded rumqttd and Mosquitto), and
//! WebSocket clients speaking the wire protocol.

mod common;

use std::time::Duration;

use common::server::*;
use common::*;
use rmpv::Value;

/// Runs each scenario against every broker: the embedded one and Mosquitto with subscription
/// identifiers, Mosquitto spoken to in MQTT 3.1.1 and RabbitMQ (3.1.1 only, detected) with
/// routing by topic matching.
macro_rules! on_both_brokers {
    ($($name:ident),* $(,)?) => {
        mod embedded {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() { super::$name(super::TestBroker::Embedded).await }
            )*
        }
        mod mosquitto {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() { super::$name(super::TestBroker::Mosquitto).await }
            )*
        }
        mod mosquitto_v311 {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() { super::$name(super::TestBroker::MosquittoV3).await }
            )*
        }
        mod rabbitmq {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() { super::$name(super::TestBroker::RabbitMq).await }
            )*
        }
    };
}

on_both_brokers!(
    each_actor_type_connects_and_bad_credentials_are_refused,
    pubsub_round_trip_keeps_payload_bytes,
    echo_on_and_off,
    scopes_are_isolated_for_exact_and_wildcard_subscriptions,
    private_rooms_and_topic_acls,
    adversarial_frames_then_a_healthy_session,
    publish_limits,
    filters_select_sub_topics,
    a_burst_of_subscribes_is_confirmed,
    load_balanced_delivery_reaches_exactly_one_member,
    session_allow_list_and_expiry_close,
    slow_consumer_is_disconnected_and_others_are_unaffected,
    hot_reload_removes_actors_and_revokes_topics,
    readiness_follows_the_upstream,
    reconnect_restores_subscriptions,
    connection_limits,
);

async fn each_actor_type_connects_and_bad_credentials_are_refused(b: TestBroker) {
    let p = start_proxy(b, "").await;
    let (_c, reply) = Client::auth(&p.url, SENSOR1_TOKEN).await;
    assert_eq!(get(&reply, "success"), Some(&Value::Boolean(true)));
    assert_eq!(get_str(&reply, "actorTokenId"), Some("sensor-1"));
    assert_eq!(get_str(&reply, "projectId"), Some("demo"));
    assert_eq!(get_str(&reply, "actorType"), Some("device"));
    assert_eq!(
        get(&reply, "protocolVersion").and_then(Value::as_u64),
        Some(1)
    );
    assert_eq!(
        get(&reply, "restoredSubscriptions"),
        Some(&Value::Array(vec![]))
    );

    let (_c, reply) = Client::auth(&p.url, BILLING_KEY).await;
    assert_eq!(get_str(&reply, "actorType"), Some("server"));
    let (_c, reply) = Client::auth(&p.url, &hs256(&user_claims("alice"))).await;
    assert_eq!(get_str(&reply, "actorType"), Some("user"));
    let session = cuttle::auth::session_token::mint(
        &p.proxy.store.load().policy,
        &cuttle::auth::session_token::MintRequest {
            project: "demo".into(),
            ttl_s: 60,
            ..Default::default()
        },
        now(),
    )
    .unwrap();
    let (_c, reply) = Client::auth(&p.url, &session).await;
    assert_eq!(get_str(&reply, "actorType"), Some("session"));

    for bad in ["nope", "", &hs256(&serde_json::json!({"iss": "x"}))] {
        let (mut c, reply) = Client::auth(&p.url, bad).await;
        assert_eq!(
            get(&reply, "success"),
            Some(&Value::Boolean(false)),
            "{bad}"
        );
        assert_eq!(get_str(&reply, "error"), Some("access_denied"));
        match c.recv_within(2000).await {
            Some(Received::Closed(Some((code, _)))) => assert_eq!(code, 1008),
            other => panic!("expected a close after failed auth, got {other:?}"),
        }
    }

    // Frames before auth get not_authenticated; a heartbeat gets nothing.
    let mut c = Client::connect(&p.url).await;
    c.send_raw(vec![]).await;
    assert!(c.recv_within(300).await.is_none());
    c.send(map(&[
        ("type", "subscribe".into()),
        ("topic", "chat/general/messages".into()),
    ]))
    .await;
    assert_eq!(
        get_str(&c.frame().await, "error"),
        Some("not_authenticated")
    );
}

async fn pubsub_round_trip_keeps_payload_bytes(b: TestBroker) {
    let p = start_proxy(b, "").await;
    let mut sub = Client::login(&p.url, SENSOR1_TOKEN).await;
    let mut publ = Client::login(&p.url, &hs256(&user_claims("alice"))).await;
    let reply = sub.subscribe("chat/general/messages").await;
    assert_eq!(get_str(&reply, "type"), Some("subscribed"));

    let payload = Value::Map(vec![
        ("text".into(), "hi".into()),
        ("blob".into(), Value::Binary(vec![0, 159, 146, 150, 255])),
        ("n".into(), Value::from(-7)),
        ("nothing".into(), Value::Nil),
        ("when".into(), Value::Ext(-1, vec![0, 0, 0, 1])),
    ]);
    publ.publish("chat/general/messages", payload.clone()).await;
    let m = sub.frame_of("message").await;
    assert_eq!(get_str(&m, "topic"), Some("chat/general/messages"));
    assert_eq!(
        get(&m, "data"),
        Some(&payload),
        "binary stays binary, ext stays ext"
    );

    // Heartbeats are echoed.
    sub.send_raw(vec![]).await;
    assert!(matches!(sub.recv_within(2000).await, Some(Received::Empty)));

    // Unsubscribe stops delivery and always answers.
    sub.send(map(&[
        ("type", "unsubscribe".into()),
        ("topic", "chat/general/messages".into()),
    ]))
    .await;
    assert_eq!(
        get_str(&sub.frame_of("unsubscribed").await, "topic"),
        Some("chat/general/messages")
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    publ.publish("chat/general/messages", "again".into()).await;
    sub.no_message_within(500).await;
}

async fn echo_on_and_off(b: TestBroker) {
    let p = start_proxy(b, "").await;
    let mut a = Client::login(&p.url, SENSOR1_TOKEN).await;
    let mut a2 = Client::login(&p.url, SENSOR1_TOKEN).await; // same actor, other socket
    a.subscribe("chat/general/messages").await;
    a2.subscribe("chat/general/messages").await;

    a.publish("chat/general/messages", "echoed".into()).await;
    assert_eq!(
        get(&a.frame_of("message").await, "data"),
        Some(&Value::from("echoed"))
    );
    assert_eq!(
        get(&a2.frame_of("message").await, "data"),
        Some(&Value::from("echoed"))
    );

    a.send(map(&[
        ("type", "publish".into()),
        ("topic", "chat/general/messages".into()),
        ("data", "quiet".into()),
        ("echo", false.into()),
    ]))
    .await;
    // The other socket of the same actor still receives it, unwrapped.
    assert_eq!(
        get(&a2.frame_of("message").await, "data"),
        Some(&Value::from("quiet"))
    );
    a.no_message_within(500).await;
}

async fn scopes_are_isolated_for_exact_and_wildcard_subscriptions(b: TestBroker) {
    let p = start_proxy(b, "").await;
    // sensor-1 is acme, sensor-2 globex, billing unscoped; carol is an unscoped user.
    let mut acme = Client::login(&p.url, SENSOR1_TOKEN).await;
    let mut globex = Client::login(&p.url, SENSOR2_TOKEN).await;
    let mut unscoped = Client::login(&p.url, BILLING_KEY).await;
    for c in [&mut globex, &mut unscoped] {
        for t in [
            "chat/general/messages",
            "chat/+/messages",
            "chat/#",
            "chat/general/+",
        ] {
            c.subscribe(t).await;
        }
    }
    acme.subscribe("chat/general/messages").await;
    acme.publish("chat/general/messages", "acme only".into())
        .await;
    assert_eq!(
        get(&acme.frame_of("message").await, "data"),
        Some(&Value::from("acme only"))
    );
    globex.no_message_within(500).await;
    unscoped.no_message_within(100).await;

    // And the other way round: unscoped traffic never reaches a scoped subscriber.
    unscoped
        .publish("chat/general/messages", "unscoped".into())
        .await;
    let m = unscoped.frame_of("message").await;
    assert_eq!(get(&m, "data"), Some(&Value::from("unscoped")));
    acme.no_message_within(500).await;
    globex.no_message_within(100).await;
}

async fn private_rooms_and_topic_acls(b: TestBroker) {
    let p = start_proxy(b, "").await;
    let mut device = Client::login(&p.url, SENSOR1_TOKEN).await;
    // vip is private (alice, billing): denied with the topic echoed.
    let r = device.subscribe("chat/vip/messages").await;
    assert_eq!(get_str(&r, "error"), Some("not_authorized"));
    assert_eq!(get_str(&r, "topic"), Some("chat/vip/messages"));
    // orders is read-only for devices: subscribe yes, publish no.
    assert_eq!(
        get_str(&device.subscribe("chat/general/orders").await, "type"),
        Some("subscribed")
    );
    device.publish("chat/general/orders", "x".into()).await;
    let e = device.frame_of("error").await;
    assert_eq!(get_str(&e, "error"), Some("not_authorized"));

    // A wildcard over rooms never delivers from the private room.
    let mut wild = Client::login(&p.url, SENSOR1_TOKEN).await;
    wild.subscribe("chat/+/messages").await;
    let mut alice = Client::login(&p.url, &hs256(&user_claims("alice"))).await;
    alice.subscribe("chat/vip/messages").await;
    alice.publish("chat/vip/messages", "secret".into()).await;
    assert_eq!(
        get(&alice.frame_of("message").await, "data"),
        Some(&Value::from("secret"))
    );
    wild.no_message_within(500).await;
    alice
        .publish("chat/general/messages", "public".into())
        .await;
    let m = wild.frame_of("message").await;
    assert_eq!(
        get_str(&m, "topic"),
        Some("chat/+/messages"),
        "the subscribed string"
    );
    assert_eq!(get(&m, "data"), Some(&Value::from("public")));
}

async fn adversarial_frames_then_a_healthy_session(b: TestBroker) {
    let p = start_proxy(b, "").await;
    let mut bad = Client::login(&p.url, SENSOR1_TOKEN).await;
    let mut good = Client::login(&p.url, SENSOR1_TOKEN).await;
    good.subscribe("chat/general/messages").await;

    let hostile: Vec<Vec<u8>> = vec![
        vec![0xc1],                         // reserved marker
        vec![0x93, 1, 2, 3],                // not a map
        vec![0x80, 0xc0],                   // trailing bytes
        vec![0xdf, 0xff, 0xff, 0xff, 0xff], // map claiming 4 billion entries
        vec![0x91; 10_000],                 // deep nesting
        encode(&map(&[("type", "subscribe".into()), ("topic", 5.into())])),
        encode(&map(&[
            ("type", "publish".into()),
            ("topic", "chat/+/messages".into()),
            ("data", 1.into()),
        ])),
        encode(&map(&[("type", "subscribe".into()), ("topic", "#".into())])),
        encode(&map(&[
            ("type", "subscribe".into()),
            ("topic", "chat/\0/x".into()),
        ])),
        encode(&map(&[
            ("type", "subscribe".into()),
            ("topic", "chat/general/messages".into()),
            ("filters", Value::Array(vec!["a/b".into()])),
        ])),
        encode(&map(&[
            ("type", "publish".into()),
            ("topic", "chat/general/messages".into()),
            ("data", 1.into()),
            ("filter", "x/#".into()),
        ])),
        // Characters Mosquitto answers by dropping the (shared, pooled) connection.
        encode(&map(&[
            ("type", "publish".into()),
            ("topic", "chat/general/messages".into()),
            ("data", 1.into()),
            ("filter", "x\u{1}".into()),
        ])),
        encode(&map(&[
            ("type", "subscribe".into()),
            ("topic", "chat/general/messages".into()),
            ("filters", Value::Array(vec!["\u{7f}".into()])),
        ])),
        encode(&map(&[
            ("type", "subscribe".into()),
            ("topic", "chat/general/messages".into()),
            ("loadBalance", true.into()),
            ("loadBalanceGroup", "g\u{85}".into()),
        ])),
    ];
    for frame in hostile {
        bad.send_raw(frame).await;
        let reply = bad.frame().await;
        assert_eq!(get_str(&reply, "type"), Some("error"), "{reply}");
    }
    // Text frames are refused with an error, not a crash.
    use futures_util::SinkExt;
    bad.ws
        .send(tokio_tungstenite::tungstenite::Message::Text(
            "{\"type\":\"auth\"}".into(),
        ))
        .await
        .unwrap();
    assert_eq!(get_str(&bad.frame().await, "error"), Some("invalid_frame"));
    // Unknown types and missing required keys are ignored silently.
    bad.send(map(&[("type", "nonsense".into())])).await;
    bad.send(map(&[
        ("type", "publish".into()),
        ("topic", "chat/general/messages".into()),
    ]))
    .await;
    assert!(bad.recv_within(300).await.is_none());

    // Both sessions still work.
    bad.publish("chat/general/messages", "still here".into())
        .await;
    assert_eq!(
        get(&good.frame_of("message").await, "data"),
        Some(&Value::from("still here"))
    );
}

async fn publish_limits(b: TestBroker) {
    let p = start_proxy(
        b,
        "limits: { publish_per_second: 5, max_message_bytes: 1000 }",
    )
    .await;
    let mut c = Client::login(&p.url, SENSOR1_TOKEN).await;
    let big = Value::Map(vec![("blob".into(), "x".repeat(2000).into())]);
    c.send(map(&[
        ("type", "publish".into()),
        ("topic", "chat/general/messages".into()),
        ("data", big),
        ("msgRef", "r1".into()),
    ]))
    .await;
    let e = c.frame_of("error").await;
    assert_eq!(get_str(&e, "error"), Some("message_too_large"));
    assert_eq!(get(&e, "code").and_then(Value::as_u64), Some(42930));
    assert_eq!(get(&e, "maxSizeBytes").and_then(Value::as_u64), Some(1000));
    assert_eq!(get_str(&e, "msgRef"), Some("r1"));

    // Wait for a fresh second, then burst: 5 go through (the oversized one counted last second
    // or this one; either way at most 5 pass), the rest get 42910.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    tokio::time::sleep(Duration::from_millis(
        1000 - now.subsec_millis() as u64 + 20,
    ))
    .await;
    for _ in 0..8 {
        c.publish("chat/general/messages", "x".into()).await;
    }
    let mut limited = 0;
    while let Some(Received::Frame(f)) = c.recv_within(500).await {
        if get_str(&f, "error") == Some("rate_limit_exceeded") {
            assert_eq!(get(&f, "code").and_then(Value::as_u64), Some(42910));
            limited += 1;
        }
    }
    assert_eq!(limited, 3);

    // A msgRef is acknowledged with `published` once the broker took it.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    c.send(map(&[
        ("type", "publish".into()),
        ("topic", "chat/general/messages".into()),
        ("data", 1.into()),
        ("msgRef", "m-1".into()),
    ]))
    .await;
    let ack = c.frame_of("published").await;
    assert_eq!(get_str(&ack, "msgRef"), Some("m-1"));
    assert_eq!(get_str(&ack, "topic"), Some("chat/general/messages"));
}

/// 100 filters are 100 SUBSCRIBEs on the pool, more than Mosquitto's Receive Maximum (20):
/// rumqttc then reuses packet ids still waiting for their SUBACK, and every SUBACK must still
/// be matched to its filter, or `subscribed` never comes (found by the noisy-neighbour
/// benchmark).
async fn a_burst_of_subscribes_is_confirmed(b: TestBroker) {
    let p = start_proxy(b, "").await;
    let mut c = Client::login(&p.url, SENSOR1_TOKEN).await;
    let filters: Vec<Value> = (0..100).map(|i| Value::from(format!("f{i}"))).collect();
    c.send(subscribe_frame(
        "chat/general/messages",
        &[("filters", Value::Array(filters))],
    ))
    .await;
    assert_eq!(get_str(&c.frame().await, "type"), Some("subscribed"));
}

async fn filters_select_sub_topics(b: TestBroker) {
    let p = start_proxy(b, "").await;
    let mut all = Client::login(&p.url, SENSOR1_TOKEN).await;
    let mut only_a = Client::login(&p.url, SENSOR1_TOKEN).await;
    let mut pub_ = Client::login(&p.url, SENSOR1_TOKEN).await;
    all.subscribe("chat/general/messages").await;
    only_a
        .send(subscribe_frame(
            "chat/general/messages",
            &[("filters", Value::Array(vec!["a".into()]))],
        ))
        .await;
    assert_eq!(get_str(&only_a.frame().await, "type"), Some("subscribed"));
    tokio::time::sleep(Duration::from_millis(250)).await;

    pub_.send(map(&[
        ("type", "publish".into()),
        ("topic", "chat/general/messages".into()),
        ("data", "for a".into()),
        ("filter", "a".into()),
    ]))
    .await;
    let m = only_a.frame_of("message").await;
    assert_eq!(get_str(&m, "filter"), Some("a"));
    assert_eq!(get(&m, "data"), Some(&Value::from("for a")));
    // Unfiltered subscribers receive filtered publishes too, tagged with the filter (A4).
    assert_eq!(get_str(&all.frame_of("message").await, "filter"), Some("a"));

    pub_.send(map(&[
        ("type", "publish".into()),
        ("topic", "chat/general/messages".into()),
        ("data", "for b".into()),
        ("filter", "b".into()),
    ]))
    .await;
    assert_eq!(
        get(&all.frame_of("message").await, "data"),
        Some(&Value::from("for b"))
    );
    only_a.no_message_within(500).await;

    // setFilters switches to b; [] would restore everything.
    only_a
        .send(map(&[
            ("type", "setFilters".into()),
            ("topic", "chat/general/messages".into()),
            ("filters", Value::Array(vec!["b".into()])),
        ]))
        .await;
    let up = only_a.frame_of("filtersUpdated").await;
    assert_eq!(get(&up, "filters"), Some(&Value::Array(vec!["b".into()])));
    tokio::time::sleep(Duration::from_millis(250)).await;
    pub_.send(map(&[
        ("type", "publish".into()),
        ("topic", "chat/general/messages".into()),
        ("data", "b again".into()),
        ("filter", "b".into()),
    ]))
    .await;
    assert_eq!(
        get(&only_a.frame_of("message").await, "data"),
        Some(&Value::from("b again"))
    );

    // setFilters on a topic not subscribed.
    only_a
        .send(map(&[
            ("type", "setFilters".into()),
            ("topic", "chat/lobby/messages".into()),
            ("filters", Value::Array(vec![])),
        ]))
        .await;
    assert_eq!(
        get_str(&only_a.frame_of("error").await, "error"),
        Some("not_subscribed")
    );
}

async fn load_balanced_delivery_reaches_exactly_one_member(b: TestBroker) {
    let p = start_proxy(b, "").await;
    if !b.has_subscription_ids() {
        // Routing by topic matching cannot tell a shared subscription's copy from the
        // namespace cover's: refused, with the reason.
        let mut c = Client::login(&p.url, SENSOR1_TOKEN).await;
        c.send(subscribe_frame(
            "chat/general/messages",
            &[
                ("loadBalance", true.into()),
                ("loadBalanceGroup", "workers".into()),
            ],
        ))
        .await;
        assert_eq!(
            get_str(&c.frame_of("error").await, "error"),
            Some("subscription_failed")
        );
        return;
    }
    let mut members = Vec::new();
    for _ in 0..3 {
        let mut c = Client::login(&p.url, SENSOR1_TOKEN).await;
        c.send(subscribe_frame(
            "chat/general/messages",
            &[
                ("loadBalance", true.into()),
                ("loadBalanceGroup", "workers".into()),
            ],
        ))
        .await;
        let r = c.frame().await;
        assert_eq!(get(&r, "loadBalance"), Some(&Value::Boolean(true)));
        members.push(c);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut publ = Client::login(&p.url, BILLING_KEY).await;
    // billing is unscoped: use an acme publisher instead, the group is acme's.
    let mut acme_pub = Client::login(&p.url, &hs256(&user_claims("alice"))).await;
    for i in 0..30 {
        acme_pub
            .publish("chat/general/messages", Value::from(i))
            .await;
    }
    let mut got = Vec::new();
    for c in members.iter_mut() {
        while let Some(Received::Frame(f)) = c.recv_within(600).await {
            if get_str(&f, "type") == Some("message") {
                got.push(get(&f, "data").and_then(Value::as_i64).unwrap());
            }
        }
    }
    got.sort_unstable();
    assert_eq!(
        got,
        (0..30).collect::<Vec<_>>(),
        "each message exactly once across the group"
    );
    publ.no_message_within(100).await;
}

async fn session_allow_list_and_expiry_close(b: TestBroker) {
    let p = start_proxy(b, "").await;
    let mint = |ttl_s: u64, rooms: Vec<String>| {
        cuttle::auth::session_token::mint(
            &p.proxy.store.load().policy,
            &cuttle::auth::session_token::MintRequest {
                project: "demo".into(),
                ttl_s,
                scope: None,
                rooms,
            },
            now(),
        )
        .unwrap()
    };
    let mut guest = Client::login(&p.url, &mint(60, vec!["chat/general".into()])).await;
    assert_eq!(
        get_str(&guest.subscribe("chat/general/messages").await, "type"),
        Some("subscribed")
    );
    assert_eq!(
        get_str(&guest.subscribe("chat/lobby/messages").await, "error"),
        Some("not_authorized")
    );
    // Sessions may read messages but not write them.
    guest.publish("chat/general/messages", "x".into()).await;
    assert_eq!(
        get_str(&guest.frame_of("error").await, "error"),
        Some("not_authorized")
    );

    // A token that expires in 2 s: the connection is closed then, with a reason.
    let mut short = Client::login(&p.url, &mint(2, vec![])).await;
    let started = std::time::Instant::now();
    loop {
        match short.recv_within(4000).await {
            Some(Received::Closed(Some((code, reason)))) => {
                assert_eq!((code, reason.as_str()), (4001, "token_expired"));
                break;
            }
            Some(Received::Empty) | Some(Received::Frame(_)) => continue,
            other => panic!("expected an expiry close, got {other:?}"),
        }
    }
    assert!(started.elapsed() < Duration::from_secs(4));
}

async fn slow_consumer_is_disconnected_and_others_are_unaffected(b: TestBroker) {
    let p = start_proxy(
        b,
        "limits: { send_queue: 64, send_queue_bytes: 67108864, publish_per_second: 100000 }",
    )
    .await;
    // The slow client subscribes and then stops reading.
    let mut slow = Client::login(&p.url, SENSOR1_TOKEN).await;
    slow.subscribe("chat/general/messages").await;
    let mut healthy = Client::login(&p.url, SENSOR1_TOKEN).await;
    healthy.subscribe("chat/general/messages").await;
    let mut publ = Client::login(&p.url, &hs256(&user_claims("alice"))).await;
    const N: usize = 400;
    let healthy_reader = tokio::spawn(async move {
        let mut n = 0;
        loop {
            match healthy.recv_within(5000).await {
                Some(Received::Frame(f)) if get_str(&f, "type") == Some("message") => {
                    n += 1;
                    if n == N {
                        break;
                    }
                }
                Some(Received::Frame(_)) | Some(Received::Empty) => continue,
                _ => break,
            }
        }
        n
    });
    // 400 x 100 KB: far more than the slow client's socket buffers and queue can hold. Paced
    // so that a reading client keeps up on a loaded machine.
    let blob = Value::Binary(vec![7; 100_000]);
    for i in 0..N {
        publ.publish("chat/general/messages", blob.clone()).await;
        if i % 20 == 19 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    assert_eq!(
        healthy_reader.await.unwrap(),
        N,
        "the healthy subscriber got everything"
    );
    // The slow one was closed; if its close frame got through, it says why.
    if let Some((code, reason)) = slow.closed_within(10_000).await {
        assert_eq!(code, 1013);
        assert!(reason.contains("slow consumer"), "{reason}");
    }
    tokio::time::timeout(Duration::from_secs(5), async {
        while p.proxy.open_connections() > 2 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the slow session ended");
}

async fn hot_reload_removes_actors_and_revokes_topics(b: TestBroker) {
    let p = start_proxy(b, "").await;
    let mut sensor2 = Client::login(&p.url, SENSOR2_TOKEN).await;
    let mut sensor1 = Client::login(&p.url, SENSOR1_TOKEN).await;
    sensor1.subscribe("chat/general/messages").await;
    sensor1.subscribe("chat/general/orders").await;

    // New policy: sensor-2 removed, devices lose `orders`, a new device appears.
    let path = p.dir.path().join("proxy.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    let new = text
        .replace(
            &format!(
                "{{ id: sensor-2, type: device, token_sha256: \"{}\", scope: globex }}",
                sha(SENSOR2_TOKEN)
            ),
            &format!(
                "{{ id: sensor-3, type: device, token_sha256: \"{}\", scope: globex }}",
                sha("tok-sensor-3")
            ),
        )
        .replace(
            "orders:    { device: read, server: read-write }",
            "orders:    { device: none, server: read-write }",
        );
    assert_ne!(new, text);
    std::fs::write(&path, new).unwrap();
    assert!(matches!(
        p.proxy.store.reload_blocking(&test_env),
        cuttle::reload::ReloadOutcome::Applied { .. }
    ));

    // The removed actor is disconnected with a reason it can log.
    let reason = sensor2.closed_within(3000).await;
    assert_eq!(reason, Some((4001, "access_revoked".to_string())));
    // The revoked topic is unsubscribed with an error frame; the other stays.
    let e = sensor1.frame_of("error").await;
    assert_eq!(get_str(&e, "topic"), Some("chat/general/orders"));
    let mut billing = Client::login(&p.url, BILLING_KEY).await;
    billing.publish("chat/general/orders", "o".into()).await;
    sensor1.no_message_within(500).await;
    // New actors connect at once.
    let (_c, r) = Client::auth(&p.url, "tok-sensor-3").await;
    assert_eq!(get(&r, "success"), Some(&Value::Boolean(true)));
}

async fn readiness_follows_the_upstream(b: TestBroker) {
    let p = start_proxy(b, "").await;
    let get_status = |path: &'static str| {
        let addr = p.admin;
        async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            s.write_all(
                format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes(),
            )
            .await
            .unwrap();
            let mut buf = String::new();
            s.read_to_string(&mut buf).await.unwrap();
            buf.split_whitespace().nth(1).unwrap_or("").to_string()
        }
    };
    assert_eq!(get_status("/healthz").await, "200");
    assert_eq!(get_status("/readyz").await, "200");
    assert_eq!(get_status("/nope").await, "404");
    p.proxy.begin_shutdown();
    // Draining: not ready (the admin listener stops too; a refused connection also means
    // not ready to a load balancer).
    let addr = p.admin;
    let status = tokio::time::timeout(Duration::from_secs(2), async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        match tokio::net::TcpStream::connect(addr).await {
            Err(_) => "refused".to_string(),
            Ok(mut s) => {
                let _ = s
                    .write_all(b"GET /readyz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
                    .await;
                let mut buf = String::new();
                let _ = s.read_to_string(&mut buf).await;
                buf.split_whitespace()
                    .nth(1)
                    .unwrap_or("closed")
                    .to_string()
            }
        }
    })
    .await
    .unwrap_or_else(|_| "timeout".into());
    assert_ne!(status, "200");
}

async fn reconnect_restores_subscriptions(b: TestBroker) {
    let p = start_proxy(b, "").await;
    let mut first = Client::login(&p.url, SENSOR1_TOKEN).await;
    first.subscribe("chat/general/messages").await;
    first
        .send(subscribe_frame(
            "chat/+/messages",
            &[("filters", Value::Array(vec!["a".into()]))],
        ))
        .await;
    first.frame_of("subscribed").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(first); // the connection drops, as on a network change

    // A plain connect restores nothing.
    let (_plain, reply) = Client::auth(&p.url, SENSOR1_TOKEN).await;
    assert_eq!(
        get(&reply, "restoredSubscriptions"),
        Some(&Value::Array(vec![]))
    );

    // The SDK's automatic reconnect: `reconnect: true`, and it never re-subscribes.
    let (mut again, reply) = Client::auth_reconnect(&p.url, SENSOR1_TOKEN).await;
    assert_eq!(
        restored_names(&reply),
        ["chat/+/messages", "chat/general/messages"]
    );
    tokio::time::sleep(Duration::from_millis(300)).await;

    let mut publ = Client::login(&p.url, &hs256(&user_claims("alice"))).await;
    publ.publish("chat/general/messages", "back".into()).await;
    let m = again.frame_of("message").await;
    assert_eq!(get_str(&m, "topic"), Some("chat/general/messages"));
    assert_eq!(get(&m, "data"), Some(&Value::from("back")));
    // The restored filter still applies: only the `a` sub-topic reaches the wildcard.
    publ.send(map(&[
        ("type", "publish".into()),
        ("topic", "chat/lobby/messages".into()),
        ("data", "for a".into()),
        ("filter", "a".into()),
    ]))
    .await;
    let m = again.frame_of("message").await;
    assert_eq!(get_str(&m, "topic"), Some("chat/+/messages"));
    assert_eq!(get_str(&m, "filter"), Some("a"));

    // Another actor has its own (empty) set.
    let (_other, reply) = Client::auth_reconnect(&p.url, SENSOR2_TOKEN).await;
    assert_eq!(
        get(&reply, "restoredSubscriptions"),
        Some(&Value::Array(vec![]))
    );
}

async fn connection_limits(b: TestBroker) {
    let p = start_proxy(
        b,
        "limits: { auth_timeout_ms: 500, connections_per_actor: 2, max_frame_bytes: 1048576 }",
    )
    .await;
    // No auth frame in time: closed with a reason.
    let mut silent = Client::connect(&p.url).await;
    assert_eq!(
        silent.closed_within(3000).await,
        Some((1008, "auth timeout".to_string()))
    );

    // At most two connections per actor.
    let _a = Client::login(&p.url, SENSOR1_TOKEN).await;
    let _b = Client::login(&p.url, SENSOR1_TOKEN).await;
    let (mut c, reply) = Client::auth(&p.url, SENSOR1_TOKEN).await;
    assert_eq!(get(&reply, "success"), Some(&Value::Boolean(false)));
    assert_eq!(get_str(&reply, "error"), Some("connection_limit_reached"));
    c.closed_within(3000).await;
    // Another actor is not affected.
    let _other = Client::login(&p.url, BILLING_KEY).await;

    // A message over the frame limit closes with 1009.
    let mut big = Client::login(&p.url, SENSOR2_TOKEN).await;
    big.send_raw(vec![0x80; 1_100_000]).await;
    assert_eq!(
        big.closed_within(3000).await.map(|(code, _)| code),
        Some(1009)
    );
}

/// PROTOCOL §3: an idle client is closed with 1000 after 60 s without any inbound frame, never
/// sooner; heartbeats keep a client alive. (Embedded broker only: the broker plays no part.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_clients_are_closed_after_60_s_and_heartbeats_keep_them() {
    let p = start_proxy(TestBroker::Embedded, "").await;
    let mut idle = Client::login(&p.url, SENSOR1_TOKEN).await;
    let mut alive = Client::login(&p.url, SENSOR1_TOKEN).await;
    let started = std::time::Instant::now();
    let keepalive = tokio::spawn(async move {
        for _ in 0..4 {
            tokio::time::sleep(Duration::from_secs(20)).await;
            alive.send_raw(vec![]).await;
            assert!(matches!(
                alive.recv_within(2000).await,
                Some(Received::Empty)
            ));
        }
        alive
    });
    let closed = idle.closed_within(70_000).await;
    let elapsed = started.elapsed();
    assert_eq!(closed, Some((1000, "idle timeout".to_string())));
    assert!(
        elapsed >= Duration::from_secs(59),
        "closed after {elapsed:?}"
    );
    let mut alive = keepalive.await.unwrap();
    alive.send_raw(vec![]).await;
    assert!(
        matches!(alive.recv_within(2000).await, Some(Received::Empty)),
        "the heartbeating client is still connected after 80 s"
    );
}
