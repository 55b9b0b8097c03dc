//! Runs the real proxy in-process on port 0 against a chosen broker, and a WebSocket test
//! client that speaks the wire protocol with rmpv (an encoder independent of the proxy's).
#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use rmpv::Value;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use super::*;

/// The `name`s of an `auth` reply's `restoredSubscriptions`, sorted.
pub fn restored_names(reply: &Value) -> Vec<String> {
    let mut names: Vec<String> = get(reply, "restoredSubscriptions")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|e| get_str(e, "name").map(String::from))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// Which broker the proxy under test uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TestBroker {
    Embedded,
    Mosquitto,
    /// Mosquitto spoken to in MQTT 3.1.1 (`upstream.protocol: v3`): routing by topic matching.
    MosquittoV3,
    /// RabbitMQ's MQTT plugin (3.1.1 only; detected, not configured).
    RabbitMq,
}

impl TestBroker {
    /// `upstream.broker`, and any further `upstream` keys (`, key: value`).
    pub fn upstream(self) -> (String, &'static str) {
        match self {
            TestBroker::Embedded => ("embedded".into(), ""),
            TestBroker::Mosquitto => (mosquitto_url(), ""),
            TestBroker::MosquittoV3 => (mosquitto_url(), ", protocol: v3"),
            TestBroker::RabbitMq => (rabbitmq_mqtt_url(), ""),
        }
    }

    /// Whether the broker offers subscription identifiers (else: topic matching, and
    /// load-balanced subscriptions are refused).
    pub fn has_subscription_ids(self) -> bool {
        matches!(self, TestBroker::Embedded | TestBroker::Mosquitto)
    }
}

/// RabbitMQ's MQTT listener for tests: `CUTTLE_TEST_RABBITMQ_MQTT_URL`, default
/// `mqtt://127.0.0.1:1884` (bench/setup-services.sh enables it). Fails when unreachable.
pub fn rabbitmq_mqtt_url() -> String {
    let url = std::env::var("CUTTLE_TEST_RABBITMQ_MQTT_URL")
        .unwrap_or_else(|_| "mqtt://127.0.0.1:1884".into());
    let hostport = url.trim_start_matches("mqtt://").to_string();
    assert!(
        std::net::TcpStream::connect(&hostport).is_ok(),
        "RabbitMQ's MQTT listener at {url} is unreachable; run bench/setup-services.sh or set CUTTLE_TEST_RABBITMQ_MQTT_URL"
    );
    url
}

/// The Mosquitto URL for tests: `CUTTLE_TEST_MQTT_URL`, default `mqtt://127.0.0.1:1883`.
/// Fails (never skips) when unreachable.
pub fn mosquitto_url() -> String {
    let url =
        std::env::var("CUTTLE_TEST_MQTT_URL").unwrap_or_else(|_| "mqtt://127.0.0.1:1883".into());
    let hostport = url.trim_start_matches("mqtt://").to_string();
    assert!(
        std::net::TcpStream::connect(&hostport).is_ok(),
        "the test broker at {url} is unreachable; start it (mosquitto -d -c /etc/mosquitto/mosquitto.conf) or set CUTTLE_TEST_MQTT_URL"
    );
    url
}

pub struct TestProxy {
    pub proxy: Arc<cuttle::server::Proxy>,
    pub url: String,
    pub admin: std::net::SocketAddr,
    pub dir: tempfile::TempDir,
    /// The upstream topic prefix (unique per proxy), to observe the broker side.
    pub prefix: String,
}

/// Starts a proxy with the test policy, `extra` top-level YAML (e.g. limits), on `broker`.
pub async fn start_proxy(broker: TestBroker, extra: &str) -> TestProxy {
    let (broker_line, upstream) = broker.upstream();
    start_proxy_with(&broker_line, upstream, extra, &test_env).await
}

/// Starts a proxy with the test policy on the broker `broker_line` (`embedded` or a URL).
pub async fn start_proxy_on(broker_line: &str, extra: &str) -> TestProxy {
    start_proxy_with(broker_line, "", extra, &test_env).await
}

/// Like [`start_proxy`], with more `upstream` keys (`key: value, …`).
pub async fn start_proxy_upstream(broker: TestBroker, upstream: &str, extra: &str) -> TestProxy {
    let (broker_line, fixed) = broker.upstream();
    start_proxy_with(
        &broker_line,
        &format!("{fixed}, {upstream}"),
        extra,
        &test_env,
    )
    .await
}

/// [`start_proxy_on`] with more `upstream` keys (`upstream_extra`, e.g.
/// `", username: u, password_env: VAR"`) and the secrets of `env`.
pub async fn start_proxy_with(
    broker_line: &str,
    upstream_extra: &str,
    extra: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> TestProxy {
    start_replica(broker_line, &unique_prefix(), upstream_extra, extra, env).await
}

/// A topic prefix no other test uses: it keeps tests sharing one Mosquitto apart.
pub fn unique_prefix() -> String {
    let mut b = [0u8; 6];
    getrandom::fill(&mut b).unwrap();
    format!("t{}", hex::encode(b))
}

/// A proxy on `broker_line` with topic prefix `prefix`: proxies started with the same prefix
/// are replicas of one deployment (they share presence).
pub async fn start_replica(
    broker_line: &str,
    prefix: &str,
    upstream_extra: &str,
    extra: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> TestProxy {
    start_replica_with_policy(
        broker_line,
        prefix,
        upstream_extra,
        extra,
        env,
        &policy_yaml(),
    )
    .await
}

/// [`start_replica`] on a broker list: `brokers` is a YAML flow list of URLs.
pub async fn start_replica_brokers(
    brokers: &str,
    prefix: &str,
    upstream_extra: &str,
    extra: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> TestProxy {
    start_replica(brokers, prefix, upstream_extra, extra, env).await
}

/// [`start_replica`] with `policy` (the content under `policy:`) instead of the test policy.
pub async fn start_replica_with_policy(
    broker_line: &str,
    prefix: &str,
    upstream_extra: &str,
    extra: &str,
    env: &dyn Fn(&str) -> Option<String>,
    policy: &str,
) -> TestProxy {
    let dir = tempfile::tempdir().unwrap();
    copy_key_fixtures(dir.path());
    let prefix = prefix.to_string();
    let indented: String = policy.lines().map(|l| format!("  {l}\n")).collect();
    // `[url, …]`: a broker list (`upstream.brokers`).
    let brokers = if broker_line.starts_with('[') {
        format!("brokers: {broker_line}")
    } else {
        format!("broker: \"{broker_line}\"")
    };
    let text = format!(
        "listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\nupstream: {{ {brokers}, pool: 2, topic_prefix: {prefix}{upstream_extra} }}\n{extra}\npolicy:\n{indented}"
    );
    let path = dir.path().join("proxy.yaml");
    std::fs::write(&path, text).unwrap();
    let loaded = cuttle::config::load_with_env(&path, env).unwrap_or_else(|d| panic!("{d}"));
    let proxy = cuttle::server::Proxy::start(loaded).expect("proxy starts");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}/ws", listener.local_addr().unwrap());
    let admin_addr = admin.local_addr().unwrap();
    {
        let proxy = proxy.clone();
        tokio::spawn(async move { proxy.serve(listener, admin).await });
    }
    tokio::time::timeout(Duration::from_secs(10), async {
        while !proxy.is_ready() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("proxy ready (upstream connected)");
    TestProxy {
        proxy,
        url,
        admin: admin_addr,
        dir,
        prefix,
    }
}

pub fn map(pairs: &[(&str, Value)]) -> Value {
    Value::Map(
        pairs
            .iter()
            .map(|(k, v)| (Value::from(*k), v.clone()))
            .collect(),
    )
}

/// A `subscribe` frame as the SDK sends it (`qos` 1), with `extra` fields (`filters`, …).
pub fn subscribe_frame(topic: &str, extra: &[(&str, Value)]) -> Value {
    let mut pairs = vec![
        ("type", Value::from("subscribe")),
        ("topic", topic.into()),
        ("qos", 1.into()),
    ];
    pairs.extend(extra.iter().cloned());
    map(&pairs)
}

pub fn encode(v: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    rmpv::encode::write_value(&mut out, v).unwrap();
    out
}

pub fn get<'a>(v: &'a Value, key: &str) -> Option<&'a Value> {
    v.as_map()?
        .iter()
        .find(|(k, _)| k.as_str() == Some(key))
        .map(|(_, v)| v)
}

pub fn get_str<'a>(v: &'a Value, key: &str) -> Option<&'a str> {
    get(v, key)?.as_str()
}

/// A test client over any stream: plain TCP from [`Client::connect`], or TLS (tests/tls.rs).
pub struct Client<S = MaybeTlsStream<TcpStream>> {
    pub ws: WebSocketStream<S>,
}

/// Anything the client can receive.
#[derive(Debug)]
pub enum Received {
    Frame(Value),
    Empty,
    Closed(Option<(u16, String)>),
}

impl Client {
    pub async fn connect(url: &str) -> Self {
        let (ws, _) = tokio_tungstenite::connect_async(url)
            .await
            .expect("websocket connects");
        Self { ws }
    }

    /// Connects and authenticates; returns the client and the auth reply.
    pub async fn auth(url: &str, token: &str) -> (Self, Value) {
        let mut c = Self::connect(url).await;
        let reply = c.authenticate(token).await;
        (c, reply)
    }

    /// Connects and authenticates as the SDK's automatic reconnect does (`reconnect: true`),
    /// asserting success; returns the `auth` reply (`restoredSubscriptions`).
    pub async fn auth_reconnect(url: &str, token: &str) -> (Self, Value) {
        let mut c = Self::connect(url).await;
        c.send(map(&[
            ("type", "auth".into()),
            ("token", token.into()),
            ("reconnect", true.into()),
        ]))
        .await;
        let reply = c.frame_of("auth").await;
        assert_eq!(
            get(&reply, "success"),
            Some(&Value::Boolean(true)),
            "{reply}"
        );
        (c, reply)
    }

    /// Connects and authenticates, asserting success.
    pub async fn login(url: &str, token: &str) -> Self {
        let (c, reply) = Self::auth(url, token).await;
        assert_eq!(
            get(&reply, "success"),
            Some(&Value::Boolean(true)),
            "{reply}"
        );
        c
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Client<S> {
    pub fn from_ws(ws: WebSocketStream<S>) -> Self {
        Self { ws }
    }

    /// Sends `auth` with `token`; returns the reply.
    pub async fn authenticate(&mut self, token: &str) -> Value {
        self.send(map(&[("type", "auth".into()), ("token", token.into())]))
            .await;
        self.frame_of("auth").await
    }

    pub async fn send(&mut self, v: Value) {
        self.ws
            .send(Message::Binary(encode(&v).into()))
            .await
            .unwrap();
    }

    pub async fn send_raw(&mut self, bytes: Vec<u8>) {
        self.ws.send(Message::Binary(bytes.into())).await.unwrap();
    }

    /// Next message within `ms` milliseconds, if any.
    pub async fn recv_within(&mut self, ms: u64) -> Option<Received> {
        loop {
            let msg = tokio::time::timeout(Duration::from_millis(ms), self.ws.next())
                .await
                .ok()?;
            return Some(match msg {
                None | Some(Err(_)) => Received::Closed(None),
                Some(Ok(Message::Binary(b))) if b.is_empty() => Received::Empty,
                Some(Ok(Message::Binary(b))) => {
                    let mut slice = &b[..];
                    let v =
                        rmpv::decode::read_value(&mut slice).expect("server frames are msgpack");
                    assert!(slice.is_empty(), "exactly one value per frame");
                    Received::Frame(v)
                }
                Some(Ok(Message::Text(t))) => panic!("server sent a text frame: {t}"),
                Some(Ok(Message::Close(c))) => {
                    Received::Closed(c.map(|c| (u16::from(c.code), c.reason.to_string())))
                }
                Some(Ok(_)) => continue,
            });
        }
    }

    /// The next map frame (skipping heartbeats), within 5 s.
    pub async fn frame(&mut self) -> Value {
        loop {
            match self.recv_within(5000).await {
                Some(Received::Frame(v)) => return v,
                Some(Received::Empty) => continue,
                other => panic!("expected a frame, got {other:?}"),
            }
        }
    }

    /// The next frame of `kind`, skipping others, within 5 s.
    pub async fn frame_of(&mut self, kind: &str) -> Value {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.recv_within(left.as_millis() as u64).await {
                Some(Received::Frame(v)) if get_str(&v, "type") == Some(kind) => return v,
                Some(Received::Frame(_)) | Some(Received::Empty) => continue,
                other => panic!("expected a {kind} frame, got {other:?}"),
            }
        }
    }

    /// Reads until the connection closes (within `ms`); returns the close code and reason
    /// if a close frame arrived.
    pub async fn closed_within(&mut self, ms: u64) -> Option<(u16, String)> {
        let deadline = tokio::time::Instant::now() + Duration::from_millis(ms);
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.recv_within(left.as_millis() as u64).await {
                Some(Received::Closed(c)) => return c,
                Some(_) => continue,
                None => panic!("not closed within {ms} ms"),
            }
        }
    }

    /// Asserts that no `message` frame arrives within `ms`.
    pub async fn no_message_within(&mut self, ms: u64) {
        let deadline = tokio::time::Instant::now() + Duration::from_millis(ms);
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return;
            }
            match self.recv_within(left.as_millis() as u64).await {
                Some(Received::Frame(v)) if get_str(&v, "type") == Some("message") => {
                    panic!("unexpected delivery: {v}")
                }
                None | Some(Received::Closed(_)) => return,
                _ => continue,
            }
        }
    }

    pub async fn subscribe(&mut self, topic: &str) -> Value {
        self.send(subscribe_frame(topic, &[])).await;
        let reply = self.frame().await;
        // Give the upstream subscription time to become live (PROTOCOL §14: ~200 ms).
        tokio::time::sleep(Duration::from_millis(250)).await;
        reply
    }

    pub async fn publish(&mut self, topic: &str, data: Value) {
        self.send(map(&[
            ("type", "publish".into()),
            ("topic", topic.into()),
            ("data", data),
            ("qos", 1.into()),
            ("echo", true.into()),
        ]))
        .await;
    }
}

/// One HTTP/1.1 exchange on a new connection to `addr`: `method path` with `headers` and
/// `body` (and its Content-Length), read until the server closes. Returns (head, body).
/// A keep-alive port (admin) needs `("Connection", "close")` among the headers.
pub async fn http_exchange(
    addr: impl tokio::net::ToSocketAddrs,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    s.write_all(body).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(15), s.read_to_end(&mut out))
        .await
        .expect("an answer within 15 s")
        .unwrap();
    let text = String::from_utf8_lossy(&out).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    (head.to_string(), body.to_string())
}

/// A `cuttle` process (the built binary), killed when dropped.
pub struct Process {
    pub child: tokio::process::Child,
    pub url: String,
    pub admin: u16,
    _dir: tempfile::TempDir,
}

/// Starts replica `id` of deployment `prefix` as a process, with `policy` (the content under
/// `policy:`) and `extra` top-level YAML. `broker`: a URL, or `embedded:<port>` (this process
/// hosts the broker on that port). Presence timing is short (heartbeat 200 ms, replica
/// timeout 1 s, grace 600 ms). Returns once `/readyz` answers 200.
pub async fn spawn_process_replica(
    prefix: &str,
    id: &str,
    broker: &str,
    policy: &str,
    extra: &str,
) -> Process {
    use std::process::Stdio;
    let dir = tempfile::tempdir().unwrap();
    copy_key_fixtures(dir.path());
    let (port, admin) = (free_port(), free_port());
    let indented: String = policy.lines().map(|l| format!("  {l}\n")).collect();
    let upstream = match broker.strip_prefix("embedded:") {
        Some(p) => format!("broker: embedded, embedded_port: {p}"),
        None => format!("broker: \"{broker}\""),
    };
    let text = format!(
        "listen: 127.0.0.1:{port}\nadmin: 127.0.0.1:{admin}\nlog: {{ level: \"warn,cuttle::presence=info\" }}\nupstream: {{ {upstream}, pool: 2, topic_prefix: {prefix} }}\npresence: {{ replica_id: {id}, heartbeat_ms: 200, replica_timeout_ms: 1000, grace_ms: 600 }}\n{extra}\npolicy:\n{indented}"
    );
    let path = dir.path().join("proxy.yaml");
    std::fs::write(&path, text).unwrap();
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_cuttle"))
        .arg("--config")
        .arg(&path)
        .env("JWT_SECRET", JWT_SECRET)
        .env("SESSION_SECRET", SESSION_SECRET)
        .env("WEBHOOK_SECRET", WEBHOOK_SECRET)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("cuttle starts");
    let url = format!("ws://127.0.0.1:{port}/ws");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        if readyz(admin).await {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "replica {id} not ready"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Process {
        child,
        url,
        admin,
        _dir: dir,
    }
}

async fn readyz(admin: u16) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", admin)).await else {
        return false;
    };
    if s.write_all(b"GET /readyz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .is_err()
    {
        return false;
    }
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf).await;
    buf.starts_with(b"HTTP/1.1 200")
}
