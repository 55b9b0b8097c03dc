//! `POST /v1/publish`: a server actor's HTTP publish, on both brokers. Every success and
//! failure mode of the endpoint, and the isolation promise: a device in `acme` receives a
//! server's publish into `acme`; one in `globex` and an unscoped one do not.

mod common;

use std::time::Duration;

use common::server::*;
use common::*;
use rmpv::Value;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_api_embedded() {
    publish_api(TestBroker::Embedded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_api_mosquitto() {
    publish_api(TestBroker::Mosquitto).await;
}

struct Reply {
    status: u16,
    head: String,
    body: serde_json::Value,
}

/// One HTTP/1.1 request on its own connection (the client port answers one per connection).
async fn request(
    p: &TestProxy,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Reply {
    let addr = p
        .url
        .trim_start_matches("ws://")
        .trim_end_matches("/ws")
        .to_string();
    let (head, body) = http_exchange(addr, method, path, headers, body).await;
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = serde_json::from_str(&body).unwrap_or(serde_json::Value::Null);
    Reply {
        status,
        head: head.to_lowercase(),
        body,
    }
}

async fn post(p: &TestProxy, key: &str, body: serde_json::Value) -> Reply {
    let auth = format!("Bearer {key}");
    request(
        p,
        "POST",
        "/v1/publish",
        &[
            ("Authorization", &auth),
            ("Content-Type", "application/json"),
        ],
        body.to_string().as_bytes(),
    )
    .await
}

fn problem_type(r: &Reply) -> &str {
    r.body["type"].as_str().unwrap_or("")
}

/// The `message` frames arriving within `ms`.
async fn messages_within(c: &mut Client, ms: u64) -> Vec<rmpv::Value> {
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_millis(ms);
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if left.is_zero() {
            return got;
        }
        match c.recv_within(left.as_millis() as u64).await {
            Some(Received::Frame(v)) if get_str(&v, "type") == Some("message") => got.push(v),
            None | Some(Received::Closed(_)) => return got,
            _ => {}
        }
    }
}

async fn publish_api(b: TestBroker) {
    let p = start_proxy(
        b,
        "limits: { max_message_bytes: 1000 }\napi: { max_body_bytes: 65536, requests_per_second: 40, max_batch: 10 }",
    )
    .await;
    let topic = "chat/general/orders";
    let mut acme = Client::login(&p.url, SENSOR1_TOKEN).await;
    let mut globex = Client::login(&p.url, SENSOR2_TOKEN).await;
    let mut unscoped = Client::login(&p.url, SENSOR0_TOKEN).await;
    for c in [&mut acme, &mut globex, &mut unscoped] {
        assert_eq!(
            get_str(&c.subscribe(topic).await, "type"),
            Some("subscribed")
        );
    }

    // Into acme: only the acme device hears it, with the data as MessagePack.
    let r = post(
        &p,
        BILLING_KEY,
        json!({"topic": topic, "scope": "acme", "data": {"n": 1, "s": "x"}}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body, json!({"topic": topic, "status": "published"}));
    let got = acme.frame_of("message").await;
    let data = get(&got, "data").unwrap();
    assert_eq!(get(data, "n").and_then(Value::as_u64), Some(1));
    assert_eq!(get_str(data, "s"), Some("x"));
    globex.no_message_within(400).await;
    unscoped.no_message_within(100).await;

    // No scope: the key's own namespace (billing is unscoped).
    let r = post(&p, BILLING_KEY, json!({"topic": topic, "data": "own"})).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        get_str(&unscoped.frame_of("message").await, "data"),
        Some("own")
    );
    acme.no_message_within(400).await;
    globex.no_message_within(100).await;

    // A scope not granted to the key; one granted by "*".
    let r = post(
        &p,
        BILLING_KEY,
        json!({"topic": topic, "scope": "globex", "data": 1}),
    )
    .await;
    assert_eq!(
        (r.status, problem_type(&r)),
        (403, "urn:cuttle:problem:scope-not-granted")
    );
    assert!(
        r.head.contains("content-type: application/problem+json"),
        "{}",
        r.head
    );
    let r = post(
        &p,
        BILLING_KEY,
        json!({"topic": topic, "scope": "initech", "data": 1}),
    )
    .await;
    assert_eq!(r.status, 403, "an unknown scope is not granted either");
    let r = post(
        &p,
        HUB_KEY,
        json!({"topic": topic, "scope": "globex", "data": "g"}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        get_str(&globex.frame_of("message").await, "data"),
        Some("g")
    );
    acme.no_message_within(300).await;

    // Authentication.
    let r = request(
        &p,
        "POST",
        "/v1/publish",
        &[("Content-Type", "application/json")],
        b"{}",
    )
    .await;
    assert_eq!(r.status, 401);
    assert!(r.head.contains("www-authenticate: bearer"), "{}", r.head);
    let r = post(&p, "key-nobody-has", json!({"topic": topic, "data": 1})).await;
    assert_eq!(
        (r.status, problem_type(&r)),
        (401, "urn:cuttle:problem:unauthorized")
    );
    let r = post(&p, SENSOR1_TOKEN, json!({"topic": topic, "data": 1})).await;
    assert_eq!(
        (r.status, problem_type(&r)),
        (403, "urn:cuttle:problem:not-a-server")
    );
    // A key of another project cannot reach this project's apps.
    let r = post(&p, OPS_KEY, json!({"topic": topic, "data": 1})).await;
    assert_eq!(
        (r.status, problem_type(&r)),
        (403, "urn:cuttle:problem:not-authorized")
    );

    // The policy (servers may only read telemetry), the topic, the sizes, the body.
    let r = post(
        &p,
        BILLING_KEY,
        json!({"topic": "chat/general/telemetry", "scope": "acme", "data": 1}),
    )
    .await;
    assert_eq!(
        (r.status, problem_type(&r)),
        (403, "urn:cuttle:problem:not-authorized")
    );
    let r = post(&p, BILLING_KEY, json!({"topic": "chat//orders", "data": 1})).await;
    assert_eq!(
        (r.status, problem_type(&r)),
        (400, "urn:cuttle:problem:invalid-topic")
    );
    let r = post(
        &p,
        BILLING_KEY,
        json!({"topic": topic, "data": "x".repeat(2000)}),
    )
    .await;
    assert_eq!(
        (r.status, problem_type(&r)),
        (413, "urn:cuttle:problem:message-too-large")
    );
    let r = post(
        &p,
        BILLING_KEY,
        json!({"topic": topic, "data": "x".repeat(70_000)}),
    )
    .await;
    assert_eq!(
        (r.status, problem_type(&r)),
        (413, "urn:cuttle:problem:body-too-large")
    );
    let r = post(&p, BILLING_KEY, json!({"topic": topic})).await;
    assert_eq!(
        (r.status, problem_type(&r)),
        (400, "urn:cuttle:problem:invalid-request")
    );
    let auth = format!("Bearer {BILLING_KEY}");
    let r = request(
        &p,
        "POST",
        "/v1/publish",
        &[
            ("Authorization", &auth),
            ("Content-Type", "application/json"),
        ],
        b"{nope",
    )
    .await;
    assert_eq!(
        (r.status, problem_type(&r)),
        (400, "urn:cuttle:problem:invalid-json")
    );
    let r = request(
        &p,
        "POST",
        "/v1/publish",
        &[("Authorization", &auth), ("Content-Type", "text/plain")],
        b"{}",
    )
    .await;
    assert_eq!(r.status, 415);
    let r = request(&p, "GET", "/v1/publish", &[("Authorization", &auth)], b"").await;
    assert_eq!(r.status, 405);
    assert!(r.head.contains("allow: post"), "{}", r.head);
    let r = request(&p, "GET", "/v1/nope", &[("Authorization", &auth)], b"").await;
    assert_eq!(r.status, 404);
    acme.no_message_within(200).await;

    // A batch is all or nothing at validation.
    let r = post(
        &p,
        BILLING_KEY,
        json!([
            {"topic": topic, "scope": "acme", "data": "b1"},
            {"topic": "chat/general/telemetry", "scope": "acme", "data": "b2"},
        ]),
    )
    .await;
    assert_eq!(r.status, 403, "{}", r.body);
    assert_eq!(r.body["errors"][0]["index"], 1);
    acme.no_message_within(400).await;
    let batch: Vec<_> = (0..3)
        .map(|i| json!({"topic": topic, "scope": "acme", "data": i}))
        .collect();
    let r = post(&p, BILLING_KEY, json!(batch)).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["results"].as_array().map(Vec::len), Some(3));
    assert_eq!(messages_within(&mut acme, 1500).await.len(), 3);
    let eleven: Vec<_> = (0..11)
        .map(|i| json!({"topic": topic, "data": i}))
        .collect();
    let r = post(&p, BILLING_KEY, json!(eleven)).await;
    assert_eq!(
        (r.status, problem_type(&r)),
        (400, "urn:cuttle:problem:invalid-batch")
    );

    // Idempotent replay: published once.
    let once =
        json!({"topic": topic, "scope": "acme", "data": "once", "idempotency_key": "order-42"});
    assert_eq!(
        post(&p, BILLING_KEY, once.clone()).await.body["status"],
        "published"
    );
    let again = post(&p, BILLING_KEY, once.clone()).await;
    assert_eq!(
        (again.status, again.body["status"].as_str()),
        (200, Some("duplicate"))
    );
    // The same key from another API key is another key.
    let hub = post(&p, HUB_KEY, once).await;
    assert_eq!(hub.body["status"], "published");
    assert_eq!(messages_within(&mut acme, 1000).await.len(), 2);

    // The per-key request rate: 40/s; a burst of 60 gets 429 with Retry-After. Sent at once:
    // one after the other, each waiting for the broker's acknowledgement, they came slower
    // than the bucket refills on a loaded machine (a clean-clone CI run saw no 429).
    let burst = (0..60).map(|_| post(&p, BILLING_KEY, json!({"topic": topic, "data": 0})));
    let replies = futures_util::future::join_all(burst).await;
    let limited = replies
        .into_iter()
        .find(|r| r.status == 429)
        .expect("a burst over api.requests_per_second is refused");
    assert_eq!(problem_type(&limited), "urn:cuttle:problem:rate-limited");
    assert!(limited.head.contains("retry-after: "), "{}", limited.head);
    // Another key is unaffected.
    assert_eq!(
        post(&p, HUB_KEY, json!({"topic": topic, "data": 0}))
            .await
            .status,
        200
    );

    // The metrics saw the server's publishes and the refusals.
    let published = p.proxy.metrics.render(&p.proxy.metrics_state(), false);
    let line = published
        .lines()
        .find(|l| l.starts_with("cuttle_messages_published_total{actor_type=\"server\"}"))
        .unwrap();
    let n: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(n >= 9.0, "{line}");
}

#[test]
fn scope_grants_are_validated_with_their_yaml_path() {
    let yaml = policy_yaml()
        .replace("scopes: [acme] }", "scopes: [acme, initech, acme] }")
        .replace("scopes: \"*\" }", "scopes: \"all\" }");
    let errors: Vec<String> = match try_compile(&yaml) {
        Ok(_) => panic!("accepted"),
        Err(d) => d.errors().map(|e| e.to_string()).collect(),
    };
    assert!(
        errors
            .iter()
            .any(|e| e.contains("actors[") && e.contains(".scopes[1]: unknown scope 'initech'")),
        "{errors:?}"
    );
    assert!(
        errors
            .iter()
            .any(|e| e.contains(".scopes[2]: scope 'acme' is granted twice")),
        "{errors:?}"
    );
    assert!(
        errors
            .iter()
            .any(|e| e.contains(".scopes: expected \"*\" or a list")),
        "{errors:?}"
    );
    let device = policy_yaml().replace("scope: globex }", "scope: globex, scopes: [acme] }");
    let errors: Vec<String> = match try_compile(&device) {
        Ok(_) => panic!("accepted"),
        Err(d) => d.errors().map(|e| e.to_string()).collect(),
    };
    assert!(
        errors
            .iter()
            .any(|e| e.contains("only server actors have scope grants")),
        "{errors:?}"
    );
}

async fn get_json(p: &TestProxy, key: &str, path: &str) -> Reply {
    let auth = format!("Bearer {key}");
    request(p, "GET", path, &[("Authorization", &auth)], b"").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_tokens_presence_and_lobbies_embedded() {
    session_tokens_presence_and_lobbies(TestBroker::Embedded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_tokens_presence_and_lobbies_mosquitto() {
    session_tokens_presence_and_lobbies(TestBroker::Mosquitto).await;
}

async fn session_tokens_presence_and_lobbies(b: TestBroker) {
    let p = start_proxy(b, "").await;
    // A second replica of the same deployment: the API reads presence across replicas.
    let broker = match p.proxy.embedded_broker {
        Some(addr) => format!("mqtt://{addr}"),
        None => mosquitto_url(),
    };
    let q = start_replica(&broker, &p.prefix, "", "", &test_env).await;

    // Session tokens: minted into a granted scope, usable over WebSocket at once.
    let auth = format!("Bearer {BILLING_KEY}");
    let mint = |body: serde_json::Value| {
        let auth = auth.clone();
        let p = &p;
        async move {
            request(
                p,
                "POST",
                "/v1/session-tokens",
                &[
                    ("Authorization", &auth),
                    ("Content-Type", "application/json"),
                ],
                body.to_string().as_bytes(),
            )
            .await
        }
    };
    let r = mint(json!({"ttl_s": 600, "scope": "acme", "rooms": ["chat/general"]})).await;
    assert_eq!(r.status, 201, "{}", r.body);
    let token = r.body["token"].as_str().unwrap().to_string();
    let expires = r.body["expires_at"].as_u64().unwrap();
    assert!(
        expires >= now() + 590 && expires <= now() + 610,
        "{expires}"
    );
    let mut guest = Client::login(&p.url, &token).await;
    assert_eq!(
        get_str(&guest.subscribe("chat/general/messages").await, "type"),
        Some("subscribed")
    );
    assert_eq!(
        get_str(&guest.subscribe("chat/lobby/messages").await, "error"),
        Some("not_authorized"),
        "the token's rooms are its allow-list"
    );
    let r = mint(json!({"ttl_s": 600, "scope": "globex"})).await;
    assert_eq!(
        (r.status, problem_type(&r)),
        (403, "urn:cuttle:problem:scope-not-granted")
    );
    let r = mint(json!({"ttl_s": 999_999})).await;
    assert_eq!(r.status, 422, "{}", r.body);
    let r = mint(json!({"ttl_s": 60, "rooms": ["chat/nope"]})).await;
    assert_eq!(r.status, 422, "{}", r.body);
    let r = mint(json!({"ttl": 60})).await;
    assert_eq!(r.status, 400, "{}", r.body);

    // Presence: alice (acme) on replica q, read through p.
    let mut alice = Client::login(&q.url, &hs256(&user_claims("alice"))).await;
    alice
        .send(map(&[
            ("type", "presence".into()),
            ("roomId", "vip".into()),
            ("data", map(&[("status", "online".into())])),
        ]))
        .await;
    alice.frame_of("presence").await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let r = loop {
        let r = get_json(&p, BILLING_KEY, "/v1/presence/chat/vip?scope=acme").await;
        assert_eq!(r.status, 200, "{}", r.body);
        if r.body["members"].as_array().is_some_and(|m| !m.is_empty()) {
            break r;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "alice never showed up on p: {}",
            r.body
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(r.body["scope"], "acme");
    assert_eq!(r.body["members"][0]["actor_id"], "alice");
    assert_eq!(r.body["members"][0]["data"], json!({"status": "online"}));
    assert!(r.body["members"][0]["joined_at"].as_u64().unwrap() >= now() - 60);
    // Other namespaces do not see her; a scope not granted is refused; a private room is
    // refused to a key its actor is not listed in.
    let r = get_json(&p, BILLING_KEY, "/v1/presence/chat/vip").await;
    assert_eq!(r.body["members"], json!([]), "the unscoped namespace");
    let r = get_json(&p, HUB_KEY, "/v1/presence/chat/general?scope=globex").await;
    assert_eq!((r.status, &r.body["members"]), (200, &json!([])));
    let r = get_json(&p, BILLING_KEY, "/v1/presence/chat/vip?scope=globex").await;
    assert_eq!(r.status, 403);
    let r = get_json(&p, HUB_KEY, "/v1/presence/chat/vip?scope=acme").await;
    assert_eq!(
        (r.status, problem_type(&r)),
        (403, "urn:cuttle:problem:not-authorized")
    );
    let r = get_json(&p, BILLING_KEY, "/v1/presence/chat/nope").await;
    assert_eq!(r.status, 404);
    let r = get_json(&p, OPS_KEY, "/v1/presence/chat/general").await;
    assert_eq!(r.status, 404, "another project's app");

    // Lobbies: `hall` holds general, lobby and vip.
    let r = get_json(&p, BILLING_KEY, "/v1/lobbies/chat/hall?scope=acme").await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["lobby"], "hall");
    assert_eq!(r.body["rooms"]["vip"][0]["actor_id"], "alice");
    assert_eq!(r.body["rooms"]["general"], json!([]));
    let r = get_json(&p, HUB_KEY, "/v1/lobbies/chat/hall?scope=acme").await;
    assert!(
        r.body["rooms"].get("vip").is_none(),
        "a private room the key may not see: {}",
        r.body
    );
    assert!(r.body["rooms"].get("general").is_some());
    let r = get_json(&p, BILLING_KEY, "/v1/lobbies/chat/nope").await;
    assert_eq!(r.status, 404);
    let r = request(
        &p,
        "POST",
        "/v1/lobbies/chat/hall",
        &[("Authorization", &auth)],
        b"",
    )
    .await;
    assert_eq!(r.status, 405);
}

/// `docs/openapi.yaml` documents exactly the routes served, and each documented route is live
/// (401 without a key, 405 for another method); an undocumented one is 404.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_document_matches_the_routes() {
    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/openapi.yaml")).unwrap();
    let doc: serde_json::Value = serde_saphyr::from_str(&text).expect("openapi.yaml parses");
    assert_eq!(doc["openapi"], "3.1.0");
    let mut documented: Vec<(String, String)> = Vec::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            documented.push((method.to_uppercase(), path.clone()));
        }
    }
    documented.sort();
    let mut served: Vec<(String, String)> = cuttle::server::API_ROUTES
        .iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    served.sort();
    assert_eq!(documented, served);

    let p = start_proxy(TestBroker::Embedded, "").await;
    for (method, template) in &documented {
        let path = template
            .replace("{id}", "alice")
            .replace("{app}", "chat")
            .replace("{room}", "general")
            .replace("{lobby}", "hall");
        let r = request(
            &p,
            method,
            &path,
            &[("Content-Type", "application/json")],
            b"{}",
        )
        .await;
        assert_eq!(r.status, 401, "{method} {path}: {}", r.body);
        let other = if method == "GET" { "POST" } else { "GET" };
        let r = request(&p, other, &path, &[], b"").await;
        assert_eq!(r.status, 405, "{other} {path}");
    }
    let r = request(&p, "GET", "/v1/nope", &[], b"").await;
    assert_eq!(r.status, 404);
}

/// Whether a `message` with `data` arrives within `ms` (returns as soon as it does); every
/// message's data read meanwhile is added to `seen`.
async fn heard_within(c: &mut Client, data: &str, ms: u64, seen: &mut Vec<String>) -> bool {
    let deadline = tokio::time::Instant::now() + Duration::from_millis(ms);
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if left.is_zero() {
            return false;
        }
        match c.recv_within(left.as_millis() as u64).await {
            Some(Received::Frame(v)) if get_str(&v, "type") == Some("message") => {
                let got = get_str(&v, "data").unwrap_or_default().to_string();
                let found = got == data;
                seen.push(got);
                if found {
                    return true;
                }
            }
            None | Some(Received::Closed(_)) => return false,
            _ => {}
        }
    }
}

/// Model-based: random (server key, requested scope) publishes against a small model of the
/// grants. A publish is accepted exactly when the model grants the scope, and then only the
/// device of that namespace receives it; a refused one reaches nobody.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_keys_reach_exactly_their_granted_scopes() {
    let seed = std::env::var("CUTTLE_API_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5c0_9e5u64);
    let p = start_proxy(TestBroker::Embedded, "").await;
    let topic = "chat/general/orders";
    // The devices, by namespace.
    let namespaces = [None, Some("acme"), Some("globex")];
    let mut devices = Vec::new();
    for token in [SENSOR0_TOKEN, SENSOR1_TOKEN, SENSOR2_TOKEN] {
        let mut c = Client::login(&p.url, token).await;
        c.subscribe(topic).await;
        devices.push(c);
    }
    // The model: each key's own namespace and grants.
    struct Key {
        key: &'static str,
        own: Option<&'static str>,
        grants: &'static [&'static str],
    }
    let keys = [
        Key {
            key: BILLING_KEY,
            own: None,
            grants: &["acme"],
        },
        Key {
            key: HUB_KEY,
            own: None,
            grants: &["acme", "globex"],
        },
        Key {
            key: ACME_BOT_KEY,
            own: Some("acme"),
            grants: &[],
        },
    ];
    let requests = [None, Some("acme"), Some("globex"), Some("initech")];
    let mut rng = Rng(seed);
    // What each device may hear (the model), and what it heard.
    let mut expected: Vec<Vec<String>> = vec![Vec::new(); 3];
    let mut seen: Vec<Vec<String>> = vec![Vec::new(); 3];
    for step in 0..24 {
        let k = rng.pick(&keys);
        let requested = *rng.pick(&requests);
        let target = requested.or(k.own);
        let allowed = requested.is_none_or(|s| Some(s) == k.own || k.grants.contains(&s));
        let data = format!("step-{step}");
        let mut body = json!({"topic": topic, "data": data});
        if let Some(s) = requested {
            body["scope"] = json!(s);
        }
        let r = post(&p, k.key, body).await;
        let ctx = format!("seed {seed} step {step}: key {} scope {requested:?}", k.key);
        assert_eq!(
            r.status,
            if allowed { 200 } else { 403 },
            "{ctx}: {}",
            r.body
        );
        for (d, (ns, device)) in namespaces.iter().zip(devices.iter_mut()).enumerate() {
            if allowed && *ns == target {
                expected[d].push(data.clone());
            }
            let wait = if allowed && *ns == target { 3000 } else { 150 };
            let heard = heard_within(device, &data, wait, &mut seen[d]).await;
            assert_eq!(
                heard,
                allowed && *ns == target,
                "{ctx}: device of {ns:?} (CUTTLE_API_SEED={seed})"
            );
        }
    }
    // Late deliveries too: everything each device ever heard was meant for its namespace.
    for (d, device) in devices.iter_mut().enumerate() {
        heard_within(device, "-", 500, &mut seen[d]).await;
        for got in &seen[d] {
            assert!(
                expected[d].contains(got),
                "device of {:?} heard {got} (CUTTLE_API_SEED={seed})",
                namespaces[d]
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnect_embedded() {
    disconnect_everywhere(TestBroker::Embedded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnect_mosquitto() {
    disconnect_everywhere(TestBroker::Mosquitto).await;
}

/// Whether the client stays open (no close frame, no EOF) for `ms`.
async fn stays_open(c: &mut Client, ms: u64) -> bool {
    let deadline = tokio::time::Instant::now() + Duration::from_millis(ms);
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if left.is_zero() {
            return true;
        }
        match c.recv_within(left.as_millis() as u64).await {
            Some(Received::Closed(_)) => return false,
            None => return true,
            _ => {}
        }
    }
}

/// `POST /v1/actors/{id}/disconnect` closes the actor's connections on every replica, in the
/// namespaces the key may reach, and nothing else.
async fn disconnect_everywhere(b: TestBroker) {
    let p = start_proxy(b, "").await;
    let broker = match p.proxy.embedded_broker {
        Some(addr) => format!("mqtt://{addr}"),
        None => mosquitto_url(),
    };
    let q = start_replica(&broker, &p.prefix, "", "", &test_env).await;
    // The control subscription is live once a probe disconnect reaches q.
    let alice = hs256(&user_claims("alice"));
    let mut eve_claims = user_claims("eve");
    eve_claims["scope"] = json!("globex");
    let eve = hs256(&eve_claims);
    let auth = |key: &str| format!("Bearer {key}");
    let kick = |key: &'static str, id: &'static str| {
        let p = &p;
        async move {
            let a = auth(key);
            request(
                p,
                "POST",
                &format!("/v1/actors/{id}/disconnect"),
                &[("Authorization", &a)],
                b"",
            )
            .await
        }
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let mut probe = Client::login(&q.url, &alice).await;
        assert_eq!(kick(BILLING_KEY, "alice").await.status, 202);
        if !stays_open(&mut probe, 1000).await {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the control subscription never went live on q"
        );
    }

    let mut alice_p = Client::login(&p.url, &alice).await;
    let mut alice_q = Client::login(&q.url, &alice).await;
    let mut bob_q = Client::login(&q.url, &hs256(&user_claims("bob"))).await;
    let mut eve_p = Client::login(&p.url, &eve).await;

    let r = kick(BILLING_KEY, "alice").await;
    assert_eq!(r.status, 202, "{}", r.body);
    assert_eq!(r.body["actor"], "alice");
    assert_eq!(r.body["notified_here"], 1);
    for c in [&mut alice_p, &mut alice_q] {
        assert_eq!(
            c.closed_within(5000).await,
            Some((4001, "disconnected_by_server".to_string()))
        );
    }
    assert!(
        stays_open(&mut bob_q, 500).await,
        "another actor is untouched"
    );
    // billing may reach acme and the unscoped namespace, not globex.
    assert_eq!(kick(BILLING_KEY, "eve").await.status, 202);
    assert!(
        stays_open(&mut eve_p, 1000).await,
        "eve is in globex, not granted to billing"
    );
    // Another project's key reaches nobody here.
    assert_eq!(kick(OPS_KEY, "bob").await.status, 202);
    assert!(stays_open(&mut bob_q, 1000).await, "another project's key");
    // hub may reach every scope.
    assert_eq!(kick(HUB_KEY, "eve").await.status, 202);
    assert_eq!(eve_p.closed_within(5000).await.map(|c| c.0), Some(4001));
    assert!(stays_open(&mut bob_q, 300).await);
    // Bad requests.
    let a = auth(BILLING_KEY);
    let r = request(
        &p,
        "POST",
        "/v1/actors/a%0Ab/disconnect",
        &[("Authorization", &a)],
        b"",
    )
    .await;
    assert_eq!(r.status, 400, "{}", r.body);
    let r = request(&p, "POST", "/v1/actors/alice/disconnect", &[], b"").await;
    assert_eq!(r.status, 401);
    // The closes are counted.
    let text = p.proxy.metrics.render(&p.proxy.metrics_state(), false);
    assert!(
        text.contains("cuttle_connections_closed_total{reason=\"disconnected\"} 2"),
        "p closed alice and eve"
    );
}
