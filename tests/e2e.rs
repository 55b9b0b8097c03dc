//! End to end: the real proxy in-process, a real broker (embedded rumqttd and Mosquitto), and
//! WebSocket clients speaking the wire protocol.

mod common;

use std::time::Duration;

use common::server::*;
use common::*;
use rmpv::Value;

/// Runs each scenario against both brokers.
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
