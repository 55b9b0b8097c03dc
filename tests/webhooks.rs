//! Webhooks (DESIGN §10) end to end: the real proxy (in-process, and as processes for a
//! SIGKILL) sends to a receiver inside the test; every signature is checked by an independent
//! implementation, the `standardwebhooks` npm package (`tests/node/verify-webhooks.mjs`).
//!
//! Covered: the event schema with the tenant scope, on the embedded broker and Mosquitto;
//! retries on 500, on a timeout and on 429 with `Retry-After`; 410 disabling the endpoint; a
//! dead receiver (the queue stays within its bound in bytes and events, the drops are counted
//! and announced, and a bystander's traffic is not slowed); two replicas reporting each event
//! exactly once; a SIGKILLed replica's presence leave reported once, by one survivor.

mod common;

use std::collections::{BTreeMap, VecDeque};
use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::server::*;
use common::*;
use http_body_util::{BodyExt, Full};
use parking_lot::Mutex;
use rmpv::Value;
use serde_json::Value as Json;

/// How the receiver answers a request.
#[derive(Debug, Clone, Copy)]
enum Reply {
    Status(u16),
    /// 429 with `Retry-After: n` (seconds).
    RetryAfter(u64),
    /// Answers 200 after this long (longer than the proxy's attempt timeout: a timeout).
    Slow(Duration),
}

/// One request as received.
#[derive(Debug, Clone)]
struct Captured {
    headers: BTreeMap<String, String>,
    body: String,
    at: Instant,
}

impl Captured {
    fn json(&self) -> Json {
        serde_json::from_str(&self.body).expect("the body is JSON")
    }

    fn header(&self, name: &str) -> &str {
        self.headers.get(name).map_or("", String::as_str)
    }
}

/// A webhook receiver on a loopback port: records every request and answers from a script
/// (200 once the script is empty).
struct Receiver {
    addr: std::net::SocketAddr,
    captured: Arc<Mutex<Vec<Captured>>>,
    script: Arc<Mutex<VecDeque<Reply>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Receiver {
    async fn start() -> Self {
        Self::start_on(tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap())
    }

    fn start_on(listener: tokio::net::TcpListener) -> Self {
        let addr = listener.local_addr().unwrap();
        let captured: Arc<Mutex<Vec<Captured>>> = Arc::default();
        let script: Arc<Mutex<VecDeque<Reply>>> = Arc::default();
        let (c, sc) = (captured.clone(), script.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (c, sc) = (c.clone(), sc.clone());
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(
                        move |req: hyper::Request<hyper::body::Incoming>| {
                            let (c, sc) = (c.clone(), sc.clone());
                            async move {
                                let headers = req
                                    .headers()
                                    .iter()
                                    .map(|(k, v)| {
                                        (
                                            k.as_str().to_string(),
                                            v.to_str().unwrap_or("").to_string(),
                                        )
                                    })
                                    .collect();
                                let body = req.into_body().collect().await.unwrap().to_bytes();
                                c.lock().push(Captured {
                                    headers,
                                    body: String::from_utf8_lossy(&body).to_string(),
                                    at: Instant::now(),
                                });
                                let reply = sc.lock().pop_front().unwrap_or(Reply::Status(200));
                                let mut resp = hyper::Response::new(Full::new(Bytes::new()));
                                match reply {
                                    Reply::Status(s) => {
                                        *resp.status_mut() = hyper::StatusCode::from_u16(s).unwrap()
                                    }
                                    Reply::RetryAfter(secs) => {
                                        *resp.status_mut() = hyper::StatusCode::TOO_MANY_REQUESTS;
                                        resp.headers_mut().insert(
                                            "retry-after",
                                            secs.to_string().parse().unwrap(),
                                        );
                                    }
                                    Reply::Slow(d) => tokio::time::sleep(d).await,
                                }
                                Ok::<_, Infallible>(resp)
                            }
                        },
                    );
                    let io = hyper_util::rt::TokioIo::new(stream);
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(io, service)
                        .await;
                });
            }
        });
        Self {
            addr,
            captured,
            script,
            task,
        }
    }

    fn url(&self) -> String {
        format!("http://{}/hooks/cuttle", self.addr)
    }

    fn requests(&self) -> Vec<Captured> {
        self.captured.lock().clone()
    }

    /// Every event received so far (batches flattened), in arrival order.
    fn events(&self) -> Vec<Json> {
        let mut out = Vec::new();
        for r in self.requests() {
            match r.json() {
                Json::Array(events) => out.extend(events),
                e => out.push(e),
            }
        }
        out
    }

    /// Waits until `pred` holds for the events received (at most 10 s).
    async fn until(&self, what: &str, pred: impl Fn(&[Json]) -> bool) -> Vec<Json> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let events = self.events();
            if pred(&events) {
                return events;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; received: {events:#?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn of_type<'a>(events: &'a [Json], t: &str) -> Vec<&'a Json> {
    events.iter().filter(|e| e["type"] == t).collect()
}

/// An endpoint line for the policy.
fn endpoint(url: &str, events: &str, more: &str) -> String {
    format!(
        "{{ url: \"{url}\", secret_env: WEBHOOK_SECRET, events: [{events}], allow_private: true{more} }}"
    )
}

const ALL: &str = "connect, disconnect, subscribe, unsubscribe, publish, presence";

/// Quick retries, so that the tests take seconds.
const FAST: &str =
    "webhooks: { timeout_ms: 400, backoff_ms: 50, max_backoff_ms: 400, max_attempts: 4 }";

async fn proxy_with(
    broker_line: &str,
    prefix: &str,
    endpoints: &[String],
    extra: &str,
) -> TestProxy {
    start_replica_with_policy(
        broker_line,
        prefix,
        "",
        extra,
        &test_env,
        &policy_yaml_with_webhooks(endpoints),
    )
    .await
}

fn broker_line(b: TestBroker) -> String {
    let (line, upstream) = b.upstream();
    assert!(
        upstream.is_empty(),
        "{b:?} needs upstream keys this helper does not pass"
    );
    line
}

/// A metric's value (the first series whose line starts with `series`).
fn metric(p: &TestProxy, series: &str) -> f64 {
    let text = p.proxy.metrics.render(&p.proxy.metrics_state(), false);
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with([' ', '{']))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no series {series} in:\n{text}"))
}

/// Verdicts of the `standardwebhooks` npm package on each request ("ok" or its error).
fn verify_with_npm(requests: &[Captured]) -> Vec<String> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/node");
    assert!(
        dir.join("node_modules/standardwebhooks").is_dir(),
        "tests/node/node_modules/standardwebhooks is missing: run `npm ci --prefix tests/node` (.ci/run does)"
    );
    let input = serde_json::json!({
        "secret": WEBHOOK_SECRET,
        "requests": requests.iter().map(|r| serde_json::json!({
            "headers": r.headers, "body": r.body,
        })).collect::<Vec<_>>(),
    });
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), input.to_string()).unwrap();
    let out = std::process::Command::new("node")
        .arg(dir.join("verify-webhooks.mjs"))
        .arg(file.path())
        .output()
        .expect("node is required for this test");
    assert!(
        out.status.success(),
        "verify-webhooks.mjs failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("a JSON array of verdicts")
}

fn presence_frame(room: &str) -> Value {
    map(&[
        ("type", "presence".into()),
        ("roomId", room.into()),
        ("data", map(&[("status", "online".into())])),
    ])
}

async fn close(mut c: Client) {
    let _ = c.ws.close(None).await;
    let _ = c.closed_within(2000).await;
}

// ---------------------------------------------------------------------------------------
// The events, their tenant and their signatures.
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn events_carry_the_tenant_and_verify_on_the_embedded_broker() {
    events_carry_the_tenant(TestBroker::Embedded).await;
}

#[tokio::test]
async fn events_carry_the_tenant_and_verify_on_mosquitto() {
    events_carry_the_tenant(TestBroker::Mosquitto).await;
}

async fn events_carry_the_tenant(b: TestBroker) {
    let rx = Receiver::start().await;
    // A second endpoint takes only publishes of chat/+/orders: the topic filter.
    let orders = Receiver::start().await;
    let p = proxy_with(
        &broker_line(b),
        &unique_prefix(),
        &[
            endpoint(&rx.url(), ALL, ""),
            endpoint(&orders.url(), "publish", ", topics: [\"chat/+/orders\"]"),
        ],
        FAST,
    )
    .await;

    let mut s1 = Client::login(&p.url, SENSOR1_TOKEN).await; // scope acme
    s1.subscribe("chat/general/messages").await;
    s1.publish("chat/general/messages", map(&[("n", 1.into())]))
        .await;
    s1.send(presence_frame("general")).await;
    s1.frame_of("presence").await;
    s1.send(map(&[
        ("type", "unsubscribe".into()),
        ("topic", "chat/general/messages".into()),
    ]))
    .await;
    s1.frame_of("unsubscribed").await;
    close(s1).await;
    let s0 = Client::login(&p.url, SENSOR0_TOKEN).await; // unscoped
    close(s0).await;

    let events = rx
        .until("every event of sensor-1 and sensor-0", |e| {
            of_type(e, "disconnect").len() == 2 && of_type(e, "presence").len() == 2
        })
        .await;
    let by = |t: &str| of_type(&events, t);
    let connect = by("connect");
    assert_eq!(connect.len(), 2, "{events:#?}");
    assert_eq!(
        connect[0]["actor"],
        serde_json::json!({"id": "sensor-1", "type": "device"})
    );
    assert_eq!(connect[0]["scope"], "acme");
    assert_eq!(connect[0]["project"], "demo");
    assert_eq!(connect[1]["actor"]["id"], "sensor-0");
    assert_eq!(connect[1]["scope"], Json::Null, "unscoped: null");

    let sub = by("subscribe");
    assert_eq!(sub.len(), 1);
    assert_eq!(
        (&sub[0]["app"], &sub[0]["room"], &sub[0]["topic"]),
        (&"chat".into(), &"general".into(), &"messages".into())
    );
    let publish = by("publish");
    assert_eq!(publish.len(), 1);
    assert_eq!(
        publish[0]["data"],
        serde_json::json!({"n": 1}),
        "the payload as JSON"
    );
    assert_eq!(publish[0]["scope"], "acme");
    assert_eq!(by("unsubscribe").len(), 1);
    let presence = by("presence");
    assert_eq!(presence[0]["data"]["action"], "join");
    assert_eq!(
        presence[0]["data"]["presence"],
        serde_json::json!({"status": "online"})
    );
    assert_eq!(presence[0]["room"], "general");
    assert_eq!(presence[0]["scope"], "acme");
    assert_eq!(
        presence[1]["data"]["action"], "leave",
        "a clean close leaves at once"
    );
    let disconnect = by("disconnect");
    assert_eq!(disconnect[0]["data"]["code"], 1000);
    assert_eq!(disconnect[0]["data"]["reason"], "client_closed");

    // One replica: its sequence numbers grow by one per event, ids are unique.
    let replica = p.proxy.presence.replica_id();
    let mut seqs: Vec<u64> = events.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert!(events.iter().all(|e| e["replica"] == *replica));
    seqs.sort_unstable();
    assert_eq!(
        seqs,
        (1..=seqs.len() as u64).collect::<Vec<_>>(),
        "{events:#?}"
    );
    let ids: std::collections::HashSet<_> = events.iter().map(|e| e["id"].to_string()).collect();
    assert_eq!(ids.len(), events.len());

    // The filtered endpoint got nothing: no publish to an orders topic happened.
    assert!(orders.requests().is_empty(), "{:?}", orders.events());
    let mut billing = Client::login(&p.url, BILLING_KEY).await;
    billing
        .publish("chat/general/orders", map(&[("id", 7.into())]))
        .await;
    let got = orders.until("the orders publish", |e| e.len() == 1).await;
    assert_eq!(got[0]["topic"], "orders");
    assert_eq!(got[0]["actor"]["type"], "server");

    // Every request verifies with an independent implementation; a tampered one does not.
    let mut requests = rx.requests();
    requests.extend(orders.requests());
    for r in &requests {
        assert_eq!(r.header("content-type"), "application/json");
        assert_eq!(r.header("webhook-id"), r.json()["id"].as_str().unwrap());
    }
    let verdicts = verify_with_npm(&requests);
    assert!(verdicts.iter().all(|v| v == "ok"), "{verdicts:?}");
    let mut tampered = requests[0].clone();
    tampered.body = tampered.body.replace("sensor-1", "sensor-2");
    let mut replayed = requests[1].clone();
    replayed
        .headers
        .insert("webhook-id".into(), "another-id".into());
    let verdicts = verify_with_npm(&[tampered, replayed]);
    assert!(verdicts.iter().all(|v| v != "ok"), "{verdicts:?}");
}

// ---------------------------------------------------------------------------------------
// Retries, timeouts, Retry-After, 410.
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn failed_attempts_are_retried_and_410_disables() {
    let rx = Receiver::start().await;
    let p = proxy_with(
        "embedded",
        &unique_prefix(),
        &[endpoint(&rx.url(), "connect", "")],
        FAST,
    )
    .await;

    // 500, 500, then 200: one event, three attempts, one message id.
    rx.script
        .lock()
        .extend([Reply::Status(500), Reply::Status(500)]);
    let c = Client::login(&p.url, SENSOR1_TOKEN).await;
    let reqs = wait_requests(&rx, 3).await;
    let ids: Vec<&str> = reqs.iter().map(|r| r.header("webhook-id")).collect();
    assert!(ids.iter().all(|i| *i == ids[0]), "{ids:?}");
    assert!(
        reqs[1].at - reqs[0].at >= Duration::from_millis(25),
        "backoff before a retry"
    );
    assert_eq!(
        metric(&p, "cuttle_webhook_attempts_total{result=\"error_status\"}"),
        2.0
    );
    assert_eq!(
        metric(&p, "cuttle_webhook_events_total{outcome=\"delivered\"}"),
        1.0
    );
    close(c).await;

    // A receiver slower than the attempt timeout (400 ms): retried.
    rx.captured.lock().clear();
    rx.script
        .lock()
        .push_back(Reply::Slow(Duration::from_millis(1500)));
    let c = Client::login(&p.url, SENSOR1_TOKEN).await;
    let reqs = wait_requests(&rx, 2).await;
    assert_eq!(reqs[0].header("webhook-id"), reqs[1].header("webhook-id"));
    let gap = reqs[1].at - reqs[0].at;
    assert!(
        gap >= Duration::from_millis(400),
        "retried after the timeout: {gap:?}"
    );
    assert_eq!(
        metric(&p, "cuttle_webhook_attempts_total{result=\"timeout\"}"),
        1.0
    );
    close(c).await;

    // 429 with Retry-After: 1 — the next attempt waits a second, not the 50 ms backoff (but
    // max_backoff_ms caps it: 400 ms here would cut it, so this endpoint allows 2 s).
    drop(p);
    let rx = Receiver::start().await;
    let p = proxy_with(
        "embedded",
        &unique_prefix(),
        &[endpoint(&rx.url(), "connect", "")],
        "webhooks: { timeout_ms: 400, backoff_ms: 50, max_backoff_ms: 2000, max_attempts: 4 }",
    )
    .await;
    rx.script.lock().push_back(Reply::RetryAfter(1));
    let c = Client::login(&p.url, SENSOR1_TOKEN).await;
    let reqs = wait_requests(&rx, 2).await;
    let gap = reqs[1].at - reqs[0].at;
    assert!(
        gap >= Duration::from_millis(950) && gap < Duration::from_millis(1800),
        "Retry-After honoured: {gap:?}"
    );
    assert_eq!(
        metric(&p, "cuttle_webhook_attempts_total{result=\"rate_limited\"}"),
        1.0
    );
    close(c).await;

    // 410 Gone: the endpoint is disabled; later events are not sent.
    rx.captured.lock().clear();
    rx.script.lock().push_back(Reply::Status(410));
    let c = Client::login(&p.url, SENSOR1_TOKEN).await;
    wait_requests(&rx, 1).await;
    close(c).await;
    for _ in 0..3 {
        close(Client::login(&p.url, SENSOR1_TOKEN).await).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(rx.requests().len(), 1, "nothing after the 410");
    assert_eq!(
        metric(&p, "cuttle_webhook_endpoints{state=\"disabled\"}"),
        1.0
    );
    assert!(
        metric(
            &p,
            "cuttle_webhook_events_total{outcome=\"dropped_disabled\"}"
        ) >= 3.0
    );
}

async fn wait_requests(rx: &Receiver, n: usize) -> Vec<Captured> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let reqs = rx.requests();
        if reqs.len() >= n {
            return reqs;
        }
        assert!(
            Instant::now() < deadline,
            "{} of {n} requests: {reqs:#?}",
            reqs.len()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

// ---------------------------------------------------------------------------------------
// A dead receiver.
// ---------------------------------------------------------------------------------------

/// The receiver is down while 2,000 publishes happen: the queue stays within its bounds (20 KB,
/// 50 events), the drops are counted, a bystander loses and waits for nothing, and when the
/// receiver is back a `webhook.dropped` event announces exactly what was lost.
#[tokio::test]
async fn a_dead_receiver_costs_a_bounded_queue_and_announced_drops() {
    // Reserve a port, then leave it closed: connections are refused.
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}/hooks/cuttle");
    let p = proxy_with(
        "embedded",
        &unique_prefix(),
        &[endpoint(&url, "publish", "")],
        "webhooks: { queue_events: 50, queue_bytes: 20000, max_in_flight: 1, timeout_ms: 300, backoff_ms: 100, max_backoff_ms: 100, max_attempts: 100 }\nlimits: { publish_per_second: 100000 }",
    )
    .await;
    let mut bystander = Client::login(&p.url, SENSOR1_TOKEN).await;
    bystander.subscribe("chat/general/messages").await;
    let mut sender = Client::login(&p.url, SENSOR1_TOKEN).await;
    let payload = "x".repeat(200);
    let started = Instant::now();
    let mut max_bytes = 0f64;
    let mut max_events = 0f64;
    const N: usize = 2000;
    for i in 0..N {
        sender
            .publish(
                "chat/general/messages",
                map(&[("i", (i as i64).into()), ("pad", payload.as_str().into())]),
            )
            .await;
        if i % 100 == 0 {
            max_bytes = max_bytes.max(metric(&p, "cuttle_webhook_queue_bytes"));
            max_events = max_events.max(metric(&p, "cuttle_webhook_queue_events"));
        }
    }
    // The bystander gets all of them, in order, while the webhooks fail.
    for i in 0..N {
        let f = bystander.frame_of("message").await;
        let data = get(&f, "data").unwrap();
        assert_eq!(get(data, "i").and_then(Value::as_i64), Some(i as i64));
    }
    let took = started.elapsed();
    eprintln!(
        "{N} publishes delivered to a bystander in {} ms with the receiver down",
        took.as_millis()
    );
    assert!(took < Duration::from_secs(20), "{took:?}");
    max_bytes = max_bytes.max(metric(&p, "cuttle_webhook_queue_bytes"));
    max_events = max_events.max(metric(&p, "cuttle_webhook_queue_events"));
    eprintln!("queue at most {max_bytes} bytes, {max_events} events (bounds 20000, 50)");
    assert!(max_bytes <= 20000.0 && max_events <= 50.0);
    assert!(max_bytes > 10000.0, "the queue filled: {max_bytes}");
    let dropped = metric(
        &p,
        "cuttle_webhook_events_total{outcome=\"dropped_queue_full\"}",
    );
    assert!(dropped >= (N - 100) as f64, "{dropped}");
    assert!(
        metric(
            &p,
            "cuttle_webhook_attempts_total{result=\"connect_error\"}"
        ) >= 1.0
    );

    // The receiver comes back: what was queued arrives, and one announcement of the drops.
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap();
    let rx = Receiver::start_on(listener);
    // Announcements sum up every drop (the first may have been taken, and then retried,
    // while drops went on).
    let announced = |e: &[Json]| -> f64 {
        of_type(e, "webhook.dropped")
            .iter()
            .map(|a| a["data"]["queue_full"].as_f64().unwrap())
            .sum()
    };
    let events = rx
        .until("the drop announcements", |e| announced(e) >= dropped)
        .await;
    assert_eq!(announced(&events), dropped);
    let first = of_type(&events, "webhook.dropped")[0];
    assert_eq!(first["project"], "demo");
    assert_eq!(first["data"]["retries_exhausted"], 0);
    let queued = rx
        .until("the queued events", |e| {
            of_type(e, "publish").len() as f64 + dropped >= N as f64
        })
        .await;
    assert_eq!(of_type(&queued, "publish").len() as f64 + dropped, N as f64);
    assert_eq!(metric(&p, "cuttle_webhook_queue_bytes"), 0.0);
}

// ---------------------------------------------------------------------------------------
// Several replicas.
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn two_replicas_report_each_event_once_on_mosquitto() {
    two_replicas(None).await;
}

#[tokio::test]
async fn two_replicas_report_each_event_once_on_the_embedded_broker() {
    two_replicas(Some(())).await;
}

/// One actor with a connection on each replica: two connects and two disconnects (one per
/// connection, each from its replica), but one presence join and one leave for the actor.
async fn two_replicas(embedded: Option<()>) {
    let rx = Receiver::start().await;
    let prefix = unique_prefix();
    let hooks = [endpoint(&rx.url(), "connect, disconnect, presence", "")];
    let extra = format!(
        "{FAST}\npresence: {{ heartbeat_ms: 200, replica_timeout_ms: 1000, grace_ms: 300 }}"
    );
    let a = proxy_with(
        &embedded.map_or_else(mosquitto_url, |_| "embedded".into()),
        &prefix,
        &hooks,
        &extra,
    )
    .await;
    let b_broker = match a.proxy.embedded_broker {
        Some(addr) => format!("mqtt://{addr}"),
        None => mosquitto_url(),
    };
    let b = proxy_with(&b_broker, &prefix, &hooks, &extra).await;

    let mut on_a = Client::login(&a.url, SENSOR1_TOKEN).await;
    on_a.send(presence_frame("general")).await;
    on_a.frame_of("presence").await;
    rx.until("the join", |e| of_type(e, "presence").len() == 1)
        .await;
    // B learns of A's member before its own connection arrives.
    let deadline = Instant::now() + Duration::from_secs(5);
    while metric(&b, "cuttle_presence_members") < 1.0 {
        assert!(Instant::now() < deadline, "replica B never saw A's member");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut on_b = Client::login(&b.url, SENSOR1_TOKEN).await;
    on_b.send(presence_frame("general")).await;
    on_b.frame_of("presence").await;
    close(on_b).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    close(on_a).await;
    rx.until("both disconnects and the leave", |e| {
        of_type(e, "disconnect").len() == 2 && of_type(e, "presence").len() >= 2
    })
    .await;
    tokio::time::sleep(Duration::from_millis(800)).await; // duplicates would arrive by now
    let events = rx.events();
    let presence = of_type(&events, "presence");
    let actions: Vec<&str> = presence
        .iter()
        .map(|e| e["data"]["action"].as_str().unwrap())
        .collect();
    assert_eq!(actions, ["join", "leave"], "{events:#?}");
    let ra = a.proxy.presence.replica_id();
    let rb = b.proxy.presence.replica_id();
    let replicas = |t: &str| -> Vec<String> {
        of_type(&events, t)
            .iter()
            .map(|e| e["replica"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(replicas("connect"), [ra.to_string(), rb.to_string()]);
    let mut d = replicas("disconnect");
    d.sort();
    let mut want = vec![ra.to_string(), rb.to_string()];
    want.sort();
    assert_eq!(d, want);
    // Both the join and the leave come from A: its connection was first in and last out.
    assert_eq!(replicas("presence"), [ra.to_string(), ra.to_string()]);
    let ids: std::collections::HashSet<_> = events.iter().map(|e| e["id"].to_string()).collect();
    assert_eq!(ids.len(), events.len(), "ids unique across replicas");
}

/// Three replicas; the one holding a member is SIGKILLed: the two survivors both see the
/// member leave, exactly one of them (the lowest replica id) reports it.
#[tokio::test]
async fn a_killed_replicas_members_leave_once() {
    let rx = Receiver::start().await;
    let prefix = unique_prefix();
    let broker = mosquitto_url();
    let hooks = [endpoint(&rx.url(), "presence", "")];
    let policy = policy_yaml_with_webhooks(&hooks);
    let extra = format!(
        "{FAST}\npresence: {{ replica_id: REPLICA, heartbeat_ms: 200, replica_timeout_ms: 1000, grace_ms: 300 }}"
    );
    let survivor = |id: &'static str| {
        let (broker, prefix, policy, extra) = (
            broker.clone(),
            prefix.clone(),
            policy.clone(),
            extra.clone(),
        );
        async move {
            start_replica_with_policy(
                &broker,
                &prefix,
                "",
                &extra.replace("REPLICA", id),
                &test_env,
                &policy,
            )
            .await
        }
    };
    let a = survivor("a-survivor").await;
    let c = survivor("c-survivor").await;
    let mut b = spawn_process_replica(&prefix, "b-doomed", &broker, &policy, FAST).await;

    let mut member = Client::login(&b.url, SENSOR1_TOKEN).await;
    member.send(presence_frame("general")).await;
    member.frame_of("presence").await;
    let joined = rx.until("the join", |e| !e.is_empty()).await;
    assert_eq!(joined[0]["replica"], "b-doomed");
    for p in [&a, &c] {
        let deadline = Instant::now() + Duration::from_secs(5);
        while metric(p, "cuttle_presence_members") < 1.0 {
            assert!(Instant::now() < deadline, "a survivor never saw the member");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    // A member that changed within a heartbeat of its replica's death is reported by every
    // survivor that knew it (the designated one may not have); this one is older.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let killed = Instant::now();
    b.child.start_kill().expect("SIGKILL");
    let _ = b.child.wait().await;
    let events = rx.until("the leave", |e| e.len() >= 2).await;
    let reported = killed.elapsed();
    // Both survivors have dropped the member; a duplicate would have been sent by now.
    for p in [&a, &c] {
        let deadline = Instant::now() + Duration::from_secs(5);
        while metric(p, "cuttle_presence_members") > 0.0 {
            assert!(
                Instant::now() < deadline,
                "a survivor still lists the member"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    tokio::time::sleep(Duration::from_millis(800)).await;
    let events_after = rx.events();
    assert_eq!(
        events_after.len(),
        2,
        "exactly one leave: {events_after:#?}"
    );
    assert_eq!(events[1]["data"]["action"], "leave");
    assert_eq!(
        events[1]["actor"],
        serde_json::json!({"id": "sensor-1", "type": "device"})
    );
    assert_eq!(events[1]["scope"], "acme");
    assert_eq!(
        events[1]["replica"], "a-survivor",
        "the lowest surviving replica id reports it"
    );
    eprintln!("SIGKILL → leave webhook in {} ms", reported.as_millis());
    drop(member);
}

// ---------------------------------------------------------------------------------------
// Throughput.
// ---------------------------------------------------------------------------------------

/// Events per second one replica delivers to a receiver that answers at once, one event per
/// request and batched. Printed for the notes; the floor only catches a collapse (this runs
/// in the debug build, on a shared 2-core machine).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivery_throughput_of_one_replica() {
    for (label, more) in [
        ("one event per request", ""),
        ("batched (10 ms)", ", batch_window_ms: 10"),
    ] {
        let rx = Receiver::start().await;
        let p = proxy_with(
            "embedded",
            &unique_prefix(),
            &[endpoint(&rx.url(), "publish", more)],
            "limits: { publish_per_second: 100000 }",
        )
        .await;
        let mut sender = Client::login(&p.url, SENSOR1_TOKEN).await;
        const N: usize = 5000;
        let started = Instant::now();
        for i in 0..N {
            sender
                .publish("chat/general/messages", map(&[("i", (i as i64).into())]))
                .await;
        }
        // Every publish handled; one the upstream pool refused (saturated by this burst) has
        // no event.
        let handled = || {
            metric(&p, "cuttle_messages_published_total{actor_type=\"device\"}")
                + metric(&p, "cuttle_messages_dropped_total{reason=\"broker\"}")
        };
        while handled() < N as f64 {
            assert!(
                Instant::now() < started + Duration::from_secs(60),
                "{}",
                handled()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let published = metric(&p, "cuttle_messages_published_total{actor_type=\"device\"}");
        assert!(published >= N as f64 / 2.0, "{published}");
        let deadline = Instant::now() + Duration::from_secs(60);
        let delivered = || metric(&p, "cuttle_webhook_events_total{outcome=\"delivered\"}");
        while delivered() < published {
            assert!(
                Instant::now() < deadline,
                "{} of {published} delivered",
                delivered()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let took = started.elapsed();
        let rate = published / took.as_secs_f64();
        eprintln!(
            "webhook throughput, {label}: {published} events in {} ms = {rate:.0} events/s, {} requests",
            took.as_millis(),
            rx.requests().len()
        );
        assert_eq!(rx.events().len() as f64, published);
        assert_eq!(
            metric(
                &p,
                "cuttle_webhook_events_total{outcome=\"dropped_queue_full\"}"
            ),
            0.0
        );
        assert!(rate > 300.0, "{rate:.0} events/s");
    }
}
