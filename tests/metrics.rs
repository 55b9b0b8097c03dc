//! `GET /metrics`: a scripted workload against the real proxy (embedded broker and
//! Mosquitto), then the exposition parsed and every series the README lists checked for a
//! value the workload implies — and for the naming and label rules that keep it safe to scrape.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use common::server::*;
use common::*;
use rmpv::Value;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_series_after_a_workload_embedded() {
    workload(TestBroker::Embedded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_series_after_a_workload_mosquitto() {
    workload(TestBroker::Mosquitto).await;
}

/// One scrape: `name{labels}` → value, and `# TYPE` by family name.
#[derive(Debug)]
struct Scrape {
    samples: BTreeMap<String, f64>,
    types: BTreeMap<String, String>,
    text: String,
}

impl Scrape {
    /// The value of `series` (`name` or `name{a="x",b="y"}`, labels in exposition order).
    fn get(&self, series: &str) -> f64 {
        *self
            .samples
            .get(series)
            .unwrap_or_else(|| panic!("no series {series} in\n{}", self.text))
    }

    /// Sum over every series of `name`, whatever its labels.
    fn sum(&self, name: &str) -> f64 {
        self.samples
            .iter()
            .filter(|(k, _)| *k == name || k.starts_with(&format!("{name}{{")))
            .map(|(_, v)| v)
            .sum()
    }
}

async fn http_get(admin: std::net::SocketAddr, path: &str, accept: &str) -> (String, String) {
    let headers = [("Accept", accept), ("Connection", "close")];
    http_exchange(admin, "GET", path, &headers, b"").await
}

async fn scrape(admin: std::net::SocketAddr) -> Scrape {
    let (head, body) = http_get(admin, "/metrics", "*/*").await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.contains("content-type: text/plain; version=0.0.4"),
        "{head}"
    );
    parse(&body)
}

fn parse(text: &str) -> Scrape {
    let mut samples = BTreeMap::new();
    let mut types = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            types.insert(name.to_string(), kind.to_string());
            continue;
        }
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap();
        let value: f64 = value.parse().unwrap_or_else(|_| panic!("value in {line}"));
        assert!(
            samples.insert(series.to_string(), value).is_none(),
            "duplicate series {series}"
        );
    }
    Scrape {
        samples,
        types,
        text: text.to_string(),
    }
}

/// Names and labels: `cuttle_` prefix, counters end in `_total`, units in names, and only
/// label names from a closed list (never a topic, actor, room or scope).
fn check_conventions(s: &Scrape) {
    let allowed_labels: BTreeSet<&str> = [
        "actor_type",
        "result",
        "type",
        "reason",
        "listener",
        "code",
        "version",
        "outcome",
        "state",
        "le",
    ]
    .into();
    for (name, kind) in &s.types {
        assert!(
            name.starts_with("cuttle_"),
            "{name} lacks the cuttle_ prefix"
        );
        assert!(
            ["counter", "gauge", "histogram"].contains(&kind.as_str()),
            "{name}: {kind}"
        );
        if kind == "counter" {
            assert!(
                name.ends_with("_total"),
                "counter {name} must end in _total"
            );
        }
        if name.contains("latency") || name.contains("duration") || name.contains("_ack") {
            assert!(name.ends_with("_seconds"), "{name}: a time in seconds");
        }
    }
    for series in s.samples.keys() {
        let Some((_, labels)) = series.split_once('{') else {
            continue;
        };
        for pair in labels.trim_end_matches('}').split("\",") {
            let (k, _) = pair.split_once('=').unwrap();
            assert!(allowed_labels.contains(k), "label {k} in {series}");
        }
    }
}

async fn workload(b: TestBroker) {
    let p = start_proxy(
        b,
        "limits: { publish_per_second: 100, max_message_bytes: 100000, send_queue: 8, send_queue_bytes: 262144 }",
    )
    .await;
    let before = scrape(p.admin).await;
    check_conventions(&before);
    assert_eq!(before.get(r#"cuttle_build_info{version="0.1.0"}"#), 1.0);
    assert_eq!(before.get("cuttle_upstream_pool_size"), 2.0);
    assert_eq!(before.get("cuttle_upstream_connections_up"), 2.0);
    assert!(before.get("cuttle_upstream_connects_total") >= 2.0);
    assert_eq!(before.get("cuttle_policy_generation"), 1.0);
    for t in ["device", "user", "server", "session"] {
        assert_eq!(
            before.get(&format!(r#"cuttle_connections{{actor_type="{t}"}}"#)),
            0.0
        );
    }

    // Authentication: two good ones, an unknown device token, a JWT with a bad signature.
    let mut sensor = Client::login(&p.url, SENSOR1_TOKEN).await;
    let mut alice = Client::login(&p.url, &hs256(&user_claims("alice"))).await;
    let (_, bad) = Client::auth(&p.url, "no-such-token").await;
    assert_eq!(get(&bad, "success"), Some(&Value::Boolean(false)));
    let forged = sign(
        jsonwebtoken::Algorithm::HS256,
        None,
        &jsonwebtoken::EncodingKey::from_secret(OTHER_SECRET.as_bytes()),
        &user_claims("alice"),
    );
    let (_, bad_jwt) = Client::auth(&p.url, &forged).await;
    assert_eq!(get(&bad_jwt, "success"), Some(&Value::Boolean(false)));

    // Traffic: 5 publishes by alice, delivered to the sensor (and echoed to alice).
    sensor.subscribe("chat/general/messages").await;
    alice.subscribe("chat/general/messages").await;
    for i in 0..5 {
        alice
            .send(map(&[
                ("type", "publish".into()),
                ("topic", "chat/general/messages".into()),
                ("data", Value::from(format!("m{i}"))),
                ("qos", 1.into()),
                ("msgRef", Value::from(format!("r{i}"))),
            ]))
            .await;
        assert_eq!(
            get_str(&sensor.frame_of("message").await, "type"),
            Some("message")
        );
    }
    for _ in 0..5 {
        alice.frame_of("published").await;
    }
    // Refusals, one of each kind: acl, size, invalid topic; then a burst over the rate limit.
    sensor.publish("chat/general/analytics", "x".into()).await;
    assert_eq!(
        get_str(&sensor.frame_of("error").await, "error"),
        Some("not_authorized")
    );
    sensor
        .publish("chat/general/messages", Value::Binary(vec![0; 200_000]))
        .await;
    assert_eq!(
        get_str(&sensor.frame_of("error").await, "error"),
        Some("message_too_large")
    );
    sensor.publish("chat//messages", "x".into()).await;
    sensor.frame_of("error").await;
    // Bursts over publish_per_second until one is refused (a burst may straddle a second).
    let mut rate_limited = false;
    for _ in 0..10 {
        for _ in 0..120 {
            sensor.publish("chat/lobby/messages", "x".into()).await;
        }
        while let Some(Received::Frame(f)) = sensor.recv_within(300).await {
            rate_limited |= get_str(&f, "error") == Some("rate_limit_exceeded");
        }
        if rate_limited {
            break;
        }
    }
    assert!(rate_limited, "no publish was rate limited");
    // Presence: alice joins a room.
    alice
        .send(map(&[
            ("type", "presence".into()),
            ("roomId", "general".into()),
            ("data", map(&[("status", "online".into())])),
        ]))
        .await;
    let joined = alice.frame_of("presence").await;
    assert_eq!(get_str(&joined, "event"), Some("join"), "{joined:?}");

    // A guest whose token expires in 1 s.
    let token = cuttle::auth::session_token::mint(
        &p.proxy.store.load().policy,
        &cuttle::auth::session_token::MintRequest {
            project: "demo".into(),
            ttl_s: 1,
            scope: None,
            rooms: vec![],
        },
        now(),
    )
    .unwrap();
    let mut guest = Client::login(&p.url, &token).await;

    // A slow consumer: subscribed, never reading, and sent more than its queue holds.
    let mut slow = Client::login(&p.url, SENSOR1_TOKEN).await;
    slow.subscribe("chat/lobby/messages").await;
    let mut publisher = Client::login(&p.url, &hs256(&user_claims("alice"))).await;
    let blob = Value::Binary(vec![7; 50_000]);
    for i in 0..800 {
        publisher.publish("chat/lobby/messages", blob.clone()).await;
        if i % 80 == 79 {
            tokio::time::sleep(Duration::from_millis(1000)).await;
            let s = scrape(p.admin).await;
            if s.get(r#"cuttle_messages_dropped_total{reason="slow_consumer"}"#) > 0.0 {
                break;
            }
        }
    }

    // A reload that applies and one that is rejected.
    let path = p.dir.path().join("proxy.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, text.replace("name: Acme }", "name: Acme Inc }")).unwrap();
    let store = p.proxy.store.clone();
    tokio::task::spawn_blocking(move || {
        store.reload_blocking(&test_env);
    })
    .await
    .unwrap();
    std::fs::write(&path, "policy: [not, a, policy]").unwrap();
    let store = p.proxy.store.clone();
    tokio::task::spawn_blocking(move || {
        store.reload_blocking(&test_env);
    })
    .await
    .unwrap();

    // The guest's session is closed at expiry.
    let closed = guest.closed_within(4000).await;
    assert_eq!(closed.map(|c| c.0), Some(4001));

    // The slow consumer's and the guest's close handshakes take up to 2 s (neither answers).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let s = loop {
        let s = scrape(p.admin).await;
        if s.get(r#"cuttle_connections{actor_type="device"}"#) == 1.0
            && s.get(r#"cuttle_connections{actor_type="session"}"#) == 0.0
        {
            break s;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the slow consumer stayed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    check_conventions(&s);
    let n = |series: &str| s.get(series);
    // Connections by actor type, and the guest gone.
    // The slow consumer was closed; the sensor remains.
    assert_eq!(n(r#"cuttle_connections{actor_type="device"}"#), 1.0);
    assert_eq!(n(r#"cuttle_connections{actor_type="user"}"#), 2.0);
    assert_eq!(n(r#"cuttle_connections{actor_type="session"}"#), 0.0);
    assert_eq!(n("cuttle_connections_unauthenticated"), 0.0);
    // Auth results by actor type and reason.
    assert_eq!(
        n(r#"cuttle_auth_attempts_total{actor_type="device",result="ok"}"#),
        2.0
    );
    assert_eq!(
        n(r#"cuttle_auth_attempts_total{actor_type="user",result="ok"}"#),
        2.0
    );
    assert_eq!(
        n(r#"cuttle_auth_attempts_total{actor_type="session",result="ok"}"#),
        1.0
    );
    assert_eq!(
        n(r#"cuttle_auth_attempts_total{actor_type="unknown",result="unknown_credential"}"#),
        1.0
    );
    assert_eq!(
        n(r#"cuttle_auth_attempts_total{actor_type="user",result="bad_signature"}"#),
        1.0
    );
    // Frames and bytes.
    assert_eq!(n(r#"cuttle_frames_received_total{type="auth"}"#), 7.0);
    assert!(n(r#"cuttle_frames_received_total{type="publish"}"#) >= 5.0 + 3.0 + 120.0 + 80.0);
    assert_eq!(n(r#"cuttle_frames_received_total{type="presence"}"#), 1.0);
    assert!(n("cuttle_received_bytes_total") > 200_000.0 + 80.0 * 50_000.0);
    assert!(n("cuttle_frames_sent_total") >= 20.0);
    assert!(n("cuttle_sent_bytes_total") > n("cuttle_frames_sent_total"));
    // Messages published, delivered, dropped by reason.
    assert!(n(r#"cuttle_messages_published_total{actor_type="user"}"#) >= 5.0 + 80.0);
    assert!(n(r#"cuttle_messages_published_total{actor_type="device"}"#) >= 97.0);
    assert!(n("cuttle_messages_delivered_total") >= 10.0);
    assert_eq!(n(r#"cuttle_messages_dropped_total{reason="acl"}"#), 1.0);
    assert_eq!(n(r#"cuttle_messages_dropped_total{reason="size"}"#), 1.0);
    assert_eq!(n(r#"cuttle_messages_dropped_total{reason="invalid"}"#), 1.0);
    assert!(n(r#"cuttle_messages_dropped_total{reason="rate"}"#) >= 1.0);
    assert!(n(r#"cuttle_messages_dropped_total{reason="slow_consumer"}"#) >= 1.0);
    assert_eq!(n(r#"cuttle_messages_dropped_total{reason="broker"}"#), 0.0);
    assert_eq!(
        n(r#"cuttle_connections_closed_total{reason="slow_consumer"}"#),
        1.0
    );
    // Subscriptions: local (sensor, alice) and upstream filters.
    assert!(n("cuttle_subscriptions") >= 2.0);
    assert!(n("cuttle_upstream_filters") >= 1.0);
    // Upstream: up, connects, publish-to-ack latency (alice's QoS 1 publishes at least).
    assert_eq!(n("cuttle_upstream_connections_up"), 2.0);
    assert_eq!(n("cuttle_upstream_disconnects_total"), 0.0);
    assert!(n("cuttle_upstream_publish_ack_seconds_count") >= 5.0);
    let ack_sum = n("cuttle_upstream_publish_ack_seconds_sum");
    assert!(ack_sum > 0.0 && ack_sum < 60.0, "ack latency sum {ack_sum}");
    assert!(
        n(r#"cuttle_upstream_publish_ack_seconds_bucket{le="+Inf"}"#)
            == n("cuttle_upstream_publish_ack_seconds_count")
    );
    // Fan-out: one observation per broker message that had local subscribers.
    assert!(n("cuttle_fanout_recipients_count") >= 5.0);
    assert!(n("cuttle_fanout_recipients_sum") >= 10.0);
    // Outbox bytes: the remaining clients read everything; nothing near the bound is queued.
    assert!(n("cuttle_outbox_bytes") < 262144.0 * 4.0);
    // Policy: one reload applied, one rejected.
    assert_eq!(n("cuttle_policy_generation"), 2.0);
    assert_eq!(n(r#"cuttle_policy_reloads_total{result="ok"}"#), 1.0);
    assert_eq!(n(r#"cuttle_policy_reloads_total{result="error"}"#), 1.0);
    assert!(n("cuttle_policy_loaded_timestamp_seconds") >= (now() - 60) as f64);
    // Token expiry.
    assert_eq!(
        n(r#"cuttle_token_expiries_total{actor_type="session"}"#),
        1.0
    );
    assert_eq!(
        n(r#"cuttle_connections_closed_total{reason="token_expired"}"#),
        1.0
    );
    assert!(n("cuttle_connection_duration_seconds_count") >= 2.0);
    // Presence.
    assert_eq!(n("cuttle_presence_local_connections"), 1.0);
    assert_eq!(n("cuttle_presence_members"), 1.0);
    // The front door: TCP accepts and HTTP responses (101 per upgrade, 200 per scrape).
    assert!(n(r#"cuttle_tcp_connections_accepted_total{listener="client"}"#) >= 7.0);
    assert_eq!(
        n(r#"cuttle_http_responses_total{listener="client",code="101"}"#),
        7.0
    );
    assert!(n(r#"cuttle_http_responses_total{listener="admin",code="200"}"#) >= 1.0);
    assert!(n("cuttle_connection_slots_in_use") >= 3.0);

    // Clients leaving take their gauges with them.
    drop((sensor, alice, publisher, slow));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let s = scrape(p.admin).await;
        if s.sum("cuttle_connections") == 0.0 {
            assert!(
                s.get(r#"cuttle_connections_closed_total{reason="read_error"}"#)
                    + s.get(r#"cuttle_connections_closed_total{reason="client_closed"}"#)
                    >= 3.0
            );
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "connections never went to 0"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // OpenMetrics when asked for it: same series, `# EOF` at the end.
    let (head, body) = http_get(p.admin, "/metrics", "application/openmetrics-text").await;
    assert!(head.contains("application/openmetrics-text"), "{head}");
    assert!(
        body.ends_with("# EOF\n"),
        "{}",
        &body[body.len().saturating_sub(200)..]
    );
    assert!(body.contains("cuttle_messages_delivered_total"));
}

/// During a drain the admin port keeps answering: `/readyz` says why it is not ready, and
/// `/metrics` still scrapes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_port_answers_through_the_drain() {
    let p = start_proxy(TestBroker::Embedded, "").await;
    let (head, body) = http_get(p.admin, "/readyz", "*/*").await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    // The verdict, then each upstream connection and how it routes.
    let lines: Vec<&str> = body.lines().collect();
    assert_eq!(lines.len(), 3, "{body}");
    assert_eq!(lines[0], "ready");
    for (i, line) in lines[1..].iter().enumerate() {
        assert!(
            line.starts_with(&format!("upstream {i}: connected to 127.0.0.1:"))
                && line.ends_with("(MQTT 5, routing by subscription ids)"),
            "{body}"
        );
    }
    p.proxy.begin_shutdown();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (head, body) = http_get(p.admin, "/readyz", "*/*").await;
    assert!(head.starts_with("HTTP/1.1 503"), "{head}");
    assert!(body.starts_with("not ready: draining\n"), "{body}");
    let (head, _) = http_get(p.admin, "/healthz", "*/*").await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let s = scrape(p.admin).await;
    assert!(s.get(r#"cuttle_http_responses_total{listener="admin",code="503"}"#) >= 1.0);
    // The client port is closed.
    let url = p
        .url
        .trim_start_matches("ws://")
        .trim_end_matches("/ws")
        .to_string();
    assert!(tokio::net::TcpStream::connect(url).await.is_err());
}
