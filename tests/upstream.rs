//! The upstream pool against real brokers: the embedded rumqttd and Mosquitto
//! (`CUTTLE_TEST_MQTT_URL`, default `mqtt://127.0.0.1:1883`; the test fails, never skips, when
//! that broker is unreachable).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use cuttle::config::{Broker, UpstreamSettings};
use cuttle::topic::upstream::TopicLayout;
use cuttle::upstream::{Dispatch, Endpoint, Pool, Protocol, publish_qos, qos};
use tokio::sync::{mpsc, oneshot};

struct Collect(mpsc::UnboundedSender<(String, Vec<usize>, Bytes)>);

impl Dispatch for Collect {
    fn dispatch(&self, topic: &str, ids: &[usize], payload: Bytes) {
        let _ = self.0.send((topic.to_string(), ids.to_vec(), payload));
    }

    fn subscription_result(&self, _filter: &str, _id: usize, _granted: bool) {}
}

/// Collects messages and SUBACK results.
struct CollectAll {
    messages: mpsc::UnboundedSender<(String, Vec<usize>, Bytes)>,
    subacks: mpsc::UnboundedSender<(String, usize, bool)>,
}

impl Dispatch for CollectAll {
    fn dispatch(&self, topic: &str, ids: &[usize], payload: Bytes) {
        let _ = self
            .messages
            .send((topic.to_string(), ids.to_vec(), payload));
    }

    fn subscription_result(&self, filter: &str, id: usize, granted: bool) {
        let _ = self.subacks.send((filter.to_string(), id, granted));
    }
}

fn arc(s: String) -> Arc<str> {
    s.into()
}

fn settings(pool: usize) -> UpstreamSettings {
    UpstreamSettings {
        broker: Broker::Embedded,
        protocol: Protocol::Auto,
        ca_certs: Default::default(),
        pool,
        username: None,
        password: None,
        layout: TopicLayout::default(),
        client_id_prefix: "cuttle-test".into(),
        keep_alive: Duration::from_secs(30),
        connect_timeout: Duration::from_secs(5),
        max_filters: 1000,
        unsubscribe_delay: Duration::ZERO,
        embedded_port: 0,
    }
}

/// The broker at `$var` (default `default`, `mqtt://host:port`); fails when unreachable.
fn endpoint_from_env(var: &str, default: &str, hint: &str) -> Endpoint {
    let url = std::env::var(var).unwrap_or_else(|_| default.into());
    let rest = url
        .strip_prefix("mqtt://")
        .unwrap_or_else(|| panic!("{var} must be mqtt://host:port"));
    let (host, port) = rest.rsplit_once(':').expect("host:port");
    let port: u16 = port.parse().expect("port");
    assert!(
        std::net::TcpStream::connect((host, port)).is_ok(),
        "the broker at {url} is unreachable; {hint} or set {var}"
    );
    Endpoint {
        host: host.into(),
        port,
        tls: false,
    }
}

fn mosquitto() -> Endpoint {
    endpoint_from_env(
        "CUTTLE_TEST_MQTT_URL",
        "mqtt://127.0.0.1:1883",
        "start it (mosquitto -d -c /etc/mosquitto/mosquitto.conf)",
    )
}

fn embedded() -> Endpoint {
    embedded_listener(false)
}

/// A new embedded broker; `v311`: its listener speaks MQTT 3.1.1 (`upstream.protocol: v3`).
fn embedded_listener(v311: bool) -> Endpoint {
    let b = cuttle::broker::start(1 << 20, 1000, 0, v311).expect("embedded broker");
    Endpoint {
        host: b.addr.ip().to_string(),
        port: b.addr.port(),
        tls: false,
    }
}

async fn wait_ready(pool: &Pool) {
    tokio::time::timeout(Duration::from_secs(10), async {
        while !pool.is_ready() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("pool connects");
}

/// A topic unique to this run, so parallel runs against one shared broker do not interfere.
fn unique(prefix: &str) -> String {
    let mut b = [0u8; 6];
    getrandom::fill(&mut b).unwrap();
    format!("cuttle-test-{prefix}-{}", hex::encode(b))
}

async fn roundtrip(endpoint: Endpoint) {
    roundtrip_with(endpoint, Protocol::Auto).await;
}

async fn roundtrip_with(endpoint: Endpoint, protocol: Protocol) {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let pool = Pool::start(
        &settings_v(3, protocol),
        vec![endpoint],
        1 << 20,
        Arc::new(Collect(tx)),
    );
    wait_ready(&pool).await;
    assert_eq!(pool.connected(), 3);

    // Two levels, like every filter the router makes: `[prefix/]app/scope/…`.
    let base = format!("{}/acme", unique("rt"));
    pool.subscribe(&arc(format!("{base}/#")), 7);
    // Overlapping filters: one message carries both subscription ids, whichever connection
    // each filter lives on, and whether the broker sends one copy or two.
    pool.subscribe(&arc(format!("{base}/+")), 8);
    // Subscriptions are applied asynchronously: publish until the first one arrives.
    let payload = Bytes::from_static(b"\x92\x01\xc4\x02\x00\xff"); // msgpack with a bin inside
    let got = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let (ack_tx, ack_rx) = oneshot::channel();
            pool.publish(
                format!("{base}/a"),
                qos(1),
                false,
                payload.clone(),
                Some(ack_tx),
            )
            .unwrap();
            ack_rx.await.unwrap().unwrap();
            // Gather every copy of this one publish (a broker may send one copy naming both
            // subscriptions, or one copy per subscription).
            let mut copies = Vec::new();
            while let Ok(Some(m)) =
                tokio::time::timeout(Duration::from_millis(200), rx.recv()).await
            {
                copies.push(m);
            }
            let mut ids: Vec<usize> = copies.iter().flat_map(|(_, ids, _)| ids.clone()).collect();
            ids.sort_unstable();
            ids.dedup();
            if ids == [7, 8] {
                break copies;
            }
        }
    })
    .await
    .expect("both subscriptions deliver, each message naming the subscriptions it matched");
    for (topic, _, p) in &got {
        assert_eq!(topic, &format!("{base}/a"));
        assert_eq!(p, &payload, "payload byte-exact");
    }
    pool.unsubscribe(&arc(format!("{base}/+")), 8);

    // Order is kept for one topic, at every QoS.
    while rx.try_recv().is_ok() {}
    for level in [0u8, 1, 2] {
        for i in 0..50u8 {
            pool.publish(
                format!("{base}/order"),
                publish_qos(level),
                false,
                Bytes::from(vec![level, i]),
                None,
            )
            .unwrap();
        }
    }
    let mut seen = Vec::new();
    while seen.len() < 150 {
        let Ok(Some((_, ids, p))) = tokio::time::timeout(Duration::from_secs(10), rx.recv()).await
        else {
            panic!("only {} of 150 delivered: {seen:?}", seen.len());
        };
        // Only copies routed through subscription 7 count: until the broker has processed the
        // unsubscribe of 8, copies through 8 may still arrive, and are told apart by their id.
        if p.len() == 2 && ids.contains(&7) {
            seen.push((p[0], p[1]));
        }
    }
    for level in [0u8, 1, 2] {
        let order: Vec<u8> = seen
            .iter()
            .filter(|(l, _)| *l == level)
            .map(|(_, i)| *i)
            .collect();
        assert_eq!(order, (0..50).collect::<Vec<_>>(), "qos {level} order");
    }

    // Unsubscribe stops delivery.
    pool.unsubscribe(&arc(format!("{base}/#")), 7);
    // The unsubscribe is applied asynchronously: probe with a fresh topic, matched by both
    // former filters, until a probe is no longer delivered through them.
    let stopped = tokio::time::timeout(Duration::from_secs(10), async {
        let mut probe = 0;
        loop {
            probe += 1;
            let topic = format!("{base}/after{probe}");
            pool.publish(topic.clone(), qos(1), false, payload.clone(), None)
                .unwrap();
            let deadline = tokio::time::Instant::now() + Duration::from_millis(700);
            let mut delivered = false;
            while let Ok(Some((t, ids, _))) = tokio::time::timeout_at(deadline, rx.recv()).await {
                // rumqttd keeps forwarding for a while after UNSUBSCRIBE, without subscription
                // ids; such copies match no router entry and are dropped there. What must stop
                // is delivery through the unsubscribed subscriptions.
                delivered |= t == topic && (ids.contains(&7) || ids.contains(&8));
            }
            if !delivered {
                return probe;
            }
        }
    })
    .await;
    assert!(stopped.is_ok(), "still delivered 10 s after unsubscribing");
    assert_eq!(pool.filter_count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_roundtrip_embedded() {
    roundtrip(embedded()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_roundtrip_mosquitto() {
    roundtrip(mosquitto()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_to_an_unreachable_broker_times_out_not_hangs() {
    // A port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let (tx, _rx) = mpsc::unbounded_channel();
    let pool = Pool::start(
        &settings(1),
        vec![Endpoint {
            host: "127.0.0.1".into(),
            port,
            tls: false,
        }],
        1 << 20,
        Arc::new(Collect(tx)),
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!pool.is_ready());
    let (ack_tx, ack_rx) = oneshot::channel();
    let sent = pool.publish("a/b".into(), qos(1), false, Bytes::new(), Some(ack_tx));
    // Queued (the request channel has room) but never acknowledged.
    assert!(sent.is_ok());
    assert!(
        tokio::time::timeout(Duration::from_millis(500), ack_rx)
            .await
            .is_err()
    );
}

/// A private Mosquitto on a free port with `extra` config lines; killed when dropped.
struct PrivateMosquitto {
    child: Option<tokio::process::Child>,
    port: u16,
    conf: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl PrivateMosquitto {
    async fn start(extra: &str) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!("listener {port} 127.0.0.1\nallow_anonymous true\n{extra}\n"),
        )
        .unwrap();
        let mut m = Self {
            child: None,
            port,
            conf,
            _dir: dir,
        };
        m.restart().await;
        m
    }

    async fn restart(&mut self) {
        let child = tokio::process::Command::new("mosquitto")
            .arg("-c")
            .arg(&self.conf)
            .kill_on_drop(true)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("mosquitto must be installed for this test");
        self.child = Some(child);
        let port = self.port;
        tokio::time::timeout(Duration::from_secs(10), async {
            while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("mosquitto listens");
    }

    async fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill().await;
        }
    }

    fn endpoint(&self) -> Endpoint {
        Endpoint {
            host: "127.0.0.1".into(),
            port: self.port,
            tls: false,
        }
    }
}

type Messages = mpsc::UnboundedReceiver<(String, Vec<usize>, Bytes)>;
type SubAcks = mpsc::UnboundedReceiver<(String, usize, bool)>;

fn collect_all() -> (Arc<CollectAll>, Messages, SubAcks) {
    let (mtx, mrx) = mpsc::unbounded_channel();
    let (stx, srx) = mpsc::unbounded_channel();
    (
        Arc::new(CollectAll {
            messages: mtx,
            subacks: stx,
        }),
        mrx,
        srx,
    )
}

/// Regression: a publish larger than the broker's Maximum Packet Size used to be written
/// anyway; Mosquitto dropped the *shared* connection (and rumqttc re-sent the packet after
/// every reconnect). It is refused to its sender now, and the connection never blinks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_over_the_brokers_packet_limit_is_refused_not_paid_for_by_the_connection() {
    let broker = PrivateMosquitto::start("max_packet_size 4096").await;
    let (dispatch, mut messages, mut subacks) = collect_all();
    let pool = Pool::start(&settings(1), vec![broker.endpoint()], 1 << 20, dispatch);
    wait_ready(&pool).await;
    let base = unique("mps");
    let filter = arc(format!("{base}/#"));
    pool.subscribe(&filter, 3);
    let (_, id, granted) = tokio::time::timeout(Duration::from_secs(5), subacks.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!((id, granted), (3, true));
    let topic = format!("{base}/x");
    let max = pool.max_payload(&topic);
    assert!(max < 4096 && max > 3000, "max payload {max} from CONNACK");
    for _ in 0..20 {
        let err = pool
            .publish(
                topic.clone(),
                qos(1),
                false,
                Bytes::from(vec![0u8; 8000]),
                None,
            )
            .unwrap_err();
        assert!(
            matches!(err, cuttle::upstream::PublishError::TooLarge { .. }),
            "{err}"
        );
    }
    // Exactly at the limit still goes through; the connection was never lost.
    let (ack_tx, ack_rx) = oneshot::channel();
    pool.publish(
        topic.clone(),
        qos(1),
        false,
        Bytes::from(vec![1u8; max]),
        Some(ack_tx),
    )
    .unwrap();
    tokio::time::timeout(Duration::from_secs(5), ack_rx)
        .await
        .expect("acknowledged")
        .unwrap()
        .unwrap();
    let (_, ids, p) = tokio::time::timeout(Duration::from_secs(5), messages.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!((ids, p.len()), (vec![3], max));
    assert_eq!(pool.connected(), 1);
    assert!(
        tokio::time::timeout(Duration::from_millis(300), subacks.recv())
            .await
            .is_err(),
        "no reconnect (which would resubscribe) happened"
    );
}

/// Every broker subscription is QoS 0, whatever the clients asked (`SUBSCRIPTION_QOS`): the
/// broker's own log shows the SUBSCRIBE at QoS 0 and a QoS 1 publish delivered to the pool at
/// QoS 0 (no PUBACK owed), while the publish itself still went upstream at QoS 1 (acknowledged).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_subscriptions_are_qos_0_and_publishes_keep_qos_1() {
    use std::os::unix::fs::PermissionsExt;
    // Mosquitto drops root for its own user: the log must be writable by it.
    let logs = tempfile::tempdir().unwrap();
    std::fs::set_permissions(logs.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let log = logs.path().join("mosquitto.log");
    let broker =
        PrivateMosquitto::start(&format!("log_type all\nlog_dest file {}", log.display())).await;
    let (dispatch, mut messages, mut subacks) = collect_all();
    let pool = Pool::start(&settings(1), vec![broker.endpoint()], 1 << 20, dispatch);
    wait_ready(&pool).await;
    let base = unique("qos0");
    let filter = arc(format!("{base}/#"));
    pool.subscribe(&filter, 5);
    let (_, id, granted) = tokio::time::timeout(Duration::from_secs(5), subacks.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!((id, granted), (5, true));
    let (ack_tx, ack_rx) = oneshot::channel();
    pool.publish(
        format!("{base}/x"),
        qos(1),
        false,
        Bytes::from_static(b"hello"),
        Some(ack_tx),
    )
    .unwrap();
    tokio::time::timeout(Duration::from_secs(5), ack_rx)
        .await
        .expect("the broker acknowledged the QoS 1 publish")
        .unwrap()
        .unwrap();
    let (_, ids, payload) = tokio::time::timeout(Duration::from_secs(5), messages.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!((ids, &payload[..]), (vec![5], &b"hello"[..]));
    // Mosquitto writes its log as it goes; give the last lines a moment.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let text = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("Sending PUBLISH to") || tokio::time::Instant::now() > deadline {
            break text;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        text.contains(&format!("\t{base}/# (QoS 0)")),
        "the SUBSCRIBE asked for QoS 0:\n{text}"
    );
    let delivered: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("Sending PUBLISH to") && l.contains(&format!("'{base}/x'")))
        .collect();
    assert!(
        !delivered.is_empty() && delivered.iter().all(|l| l.contains(", q0,")),
        "delivered to the pool at QoS 0: {delivered:?}"
    );
    assert!(
        text.lines().any(|l| l.contains("Received PUBLISH from")
            && l.contains(", q1,")
            && l.contains(&format!("'{base}/x'"))),
        "the publish went upstream at QoS 1:\n{text}"
    );
}

/// Regression ("ack shift"): a publish whose caller gave up used to leave its waiter queued,
/// and every later acknowledgement went to the wrong publish. Waiters are now queued in the
/// same critical section as the request, so abandoned ones shift nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledgements_match_their_publishes_when_callers_give_up() {
    let (dispatch, _messages, _subacks) = collect_all();
    let pool = Pool::start(&settings(1), vec![mosquitto()], 1 << 20, dispatch);
    wait_ready(&pool).await;
    let topic = unique("acks");
    let mut kept = Vec::new();
    for i in 0..300 {
        let (tx, rx) = oneshot::channel();
        let level = [0u8, 1, 1][i % 3];
        pool.publish(
            topic.clone(),
            publish_qos(level),
            false,
            Bytes::new(),
            Some(tx),
        )
        .unwrap();
        if i % 2 == 0 {
            drop(rx); // the caller gave up
        } else {
            kept.push(rx);
        }
    }
    for rx in kept {
        tokio::time::timeout(Duration::from_secs(5), rx)
            .await
            .expect("every kept waiter is answered")
            .unwrap()
            .unwrap();
    }
}

/// Acknowledgement bookkeeping survives a reconnect: publishes queued while the broker is
/// down are sent after it is back, in order, and each one's acknowledgement reaches it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledgements_survive_a_broker_restart() {
    let mut broker = PrivateMosquitto::start("").await;
    let (dispatch, mut messages, mut subacks) = collect_all();
    let pool = Pool::start(&settings(1), vec![broker.endpoint()], 1 << 20, dispatch);
    wait_ready(&pool).await;
    let base = unique("restart");
    pool.subscribe(&arc(format!("{base}/#")), 5);
    assert!(
        subacks
            .recv()
            .await
            .is_some_and(|(_, id, ok)| id == 5 && ok)
    );
    broker.stop().await;
    tokio::time::timeout(Duration::from_secs(10), async {
        while pool.is_ready() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the pool notices");
    let mut acks = Vec::new();
    for i in 0..40u8 {
        let (tx, rx) = oneshot::channel();
        pool.publish(
            format!("{base}/t"),
            qos(1),
            false,
            Bytes::from(vec![i]),
            Some(tx),
        )
        .unwrap();
        acks.push(rx);
    }
    broker.restart().await;
    for rx in acks {
        tokio::time::timeout(Duration::from_secs(15), rx)
            .await
            .expect("acknowledged after the restart")
            .unwrap()
            .unwrap();
    }
    // A fresh publish after all that is acknowledged too (nothing shifted).
    let (tx, rx) = oneshot::channel();
    pool.publish(
        format!("{base}/t"),
        qos(1),
        false,
        Bytes::from_static(b"z"),
        Some(tx),
    )
    .unwrap();
    tokio::time::timeout(Duration::from_secs(5), rx)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    // The resubscription after the restart was granted again, and delivers.
    assert!(
        tokio::time::timeout(Duration::from_secs(5), messages.recv())
            .await
            .is_ok()
    );
}

/// Regression ("lost deliveries under churn"): a filter dropped and added again with a new
/// id before the reconciler ran used to be skipped as "already subscribed", so the broker
/// kept tagging messages with the old id and the router dropped them. Reconciliation is on
/// (filter, id) now.
async fn resubscribe_with_a_new_id(endpoint: Endpoint) {
    let (dispatch, mut messages, mut subacks) = collect_all();
    let pool = Pool::start(&settings(1), vec![endpoint], 1 << 20, dispatch);
    wait_ready(&pool).await;
    let base = unique("reid");
    let filter = arc(format!("{base}/#"));
    pool.subscribe(&filter, 7);
    assert!(
        subacks
            .recv()
            .await
            .is_some_and(|(_, id, ok)| id == 7 && ok)
    );
    for next in [9usize, 11, 13] {
        // Leave and rejoin at once, as a reloading page does.
        pool.unsubscribe(&filter, next - 2);
        pool.subscribe(&filter, next);
        let (_, id, ok) = tokio::time::timeout(Duration::from_secs(5), subacks.recv())
            .await
            .expect("the new id is subscribed")
            .unwrap();
        assert_eq!((id, ok), (next, true));
        while messages.try_recv().is_ok() {}
        let (tx, rx) = oneshot::channel();
        pool.publish(format!("{base}/m"), qos(1), false, Bytes::new(), Some(tx))
            .unwrap();
        rx.await.unwrap().unwrap();
        let (_, ids, _) = tokio::time::timeout(Duration::from_secs(5), messages.recv())
            .await
            .expect("delivered")
            .unwrap();
        assert_eq!(ids, vec![next], "tagged with the new id only");
    }
    // An unsubscribe naming an old id leaves the newer subscription alone.
    pool.unsubscribe(&filter, 7);
    assert_eq!(pool.filter_count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resubscribe_with_a_new_id_embedded() {
    resubscribe_with_a_new_id(embedded()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resubscribe_with_a_new_id_mosquitto() {
    resubscribe_with_a_new_id(mosquitto()).await;
}

/// Regression: rumqttc draws SUBSCRIBE packet ids from the same 1..=Receive-Maximum cycle as
/// publishes without checking them (Mosquitto's Receive Maximum is 20), so a burst of more
/// subscribes than that — one 100-filter `subscribe` frame — reused ids still waiting for their
/// SUBACK; the SUBACKs matched the wrong filters and some subscriptions never became live
/// (the client's `subscribed` never came). Every SUBACK now finds its own filter.
async fn a_burst_of_subscribes_larger_than_receive_maximum(endpoint: Endpoint) {
    const BURST: usize = 150;
    let (dispatch, mut messages, mut subacks) = collect_all();
    let pool = Pool::start(&settings(1), vec![endpoint], 1 << 20, dispatch);
    wait_ready(&pool).await;
    let base = unique("burst");
    for i in 0..BURST {
        pool.subscribe(&arc(format!("{base}/{i}")), 1000 + i);
    }
    let mut granted = std::collections::HashMap::new();
    while granted.len() < BURST {
        let (filter, id, ok) = tokio::time::timeout(Duration::from_secs(5), subacks.recv())
            .await
            .unwrap_or_else(|_| panic!("only {} of {BURST} SUBACKs matched", granted.len()))
            .unwrap();
        assert!(ok, "{filter} refused");
        assert_eq!(
            filter,
            format!("{base}/{}", id - 1000),
            "SUBACK matched to another filter"
        );
        assert!(
            granted.insert(id, filter).is_none(),
            "id {id} acknowledged twice"
        );
    }
    // And every one of them is live: a publish to each is delivered with its own id.
    for i in [0, BURST / 2, BURST - 1] {
        let (tx, rx) = oneshot::channel();
        pool.publish(format!("{base}/{i}"), qos(1), false, Bytes::new(), Some(tx))
            .unwrap();
        rx.await.unwrap().unwrap();
        let (_, ids, _) = tokio::time::timeout(Duration::from_secs(5), messages.recv())
            .await
            .expect("delivered")
            .unwrap();
        assert_eq!(ids, vec![1000 + i]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_subscribes_larger_than_receive_maximum_embedded() {
    a_burst_of_subscribes_larger_than_receive_maximum(embedded()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_subscribes_larger_than_receive_maximum_mosquitto() {
    a_burst_of_subscribes_larger_than_receive_maximum(mosquitto()).await;
}

/// Regression (rumqttd 0.20, patched in vendor/rumqttd): an UNSUBSCRIBE of a shared filter
/// left its data request in place, so the broker kept delivering for it (without an id) and,
/// after a re-SUBSCRIBE, delivered every message twice under the new id — the churn test
/// without linger saw a load-balanced subscriber get one message twice. Mosquitto is the
/// reference behaviour.
async fn an_unsubscribed_shared_subscription_delivers_nothing(endpoint: Endpoint) {
    let (dispatch, mut messages, mut subacks) = collect_all();
    let pool = Pool::start(&settings(1), vec![endpoint], 1 << 20, dispatch);
    wait_ready(&pool).await;
    let base = unique("share");
    let shared = arc(format!("$share/g{base}/{base}/#"));
    let plain = arc(format!("{base}/plain/#"));
    // What one publish to `<base>/plain/x` reaches: the subscription ids of each copy.
    let publish = async |messages: &mut Messages| {
        let (tx, rx) = oneshot::channel();
        pool.publish(
            format!("{base}/plain/x"),
            qos(1),
            false,
            Bytes::new(),
            Some(tx),
        )
        .unwrap();
        rx.await.unwrap().unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut copies = Vec::new();
        while let Ok((_, ids, _)) = messages.try_recv() {
            copies.push(ids);
        }
        copies.sort();
        copies
    };
    let granted = async |subacks: &mut SubAcks, want: usize| {
        let (_, id, ok) = tokio::time::timeout(Duration::from_secs(5), subacks.recv())
            .await
            .expect("SUBACK")
            .unwrap();
        assert_eq!((id, ok), (want, true));
    };
    pool.subscribe(&shared, 1);
    granted(&mut subacks, 1).await;
    pool.subscribe(&plain, 2);
    granted(&mut subacks, 2).await;
    assert_eq!(publish(&mut messages).await, [vec![1], vec![2]]);

    pool.unsubscribe(&shared, 1);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(publish(&mut messages).await, [vec![2]], "after UNSUBSCRIBE");

    pool.subscribe(&shared, 3);
    granted(&mut subacks, 3).await;
    assert_eq!(
        publish(&mut messages).await,
        [vec![2], vec![3]],
        "after re-SUBSCRIBE"
    );

    // Leave and rejoin at once (no linger), twice.
    for id in [4, 5] {
        pool.unsubscribe(&shared, id - 1);
        pool.subscribe(&shared, id);
        granted(&mut subacks, id).await;
        assert_eq!(
            publish(&mut messages).await,
            [vec![2], vec![id]],
            "rejoin {id}"
        );
    }
    // The plain subscription's UNSUBSCRIBE does not disturb the shared one.
    pool.unsubscribe(&plain, 2);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(publish(&mut messages).await, [vec![5]]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unsubscribed_shared_subscription_delivers_nothing_embedded() {
    an_unsubscribed_shared_subscription_delivers_nothing(embedded()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unsubscribed_shared_subscription_delivers_nothing_mosquitto() {
    an_unsubscribed_shared_subscription_delivers_nothing(mosquitto()).await;
}

/// The end of a drain: what was handed over before `disconnect` reaches the broker, the
/// connection then closes with DISCONNECT (the broker drops the will) and does not come back,
/// and later publishes are refused.
async fn a_clean_disconnect_sends_what_came_before_and_no_will(endpoint: Endpoint) {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let listener = Pool::start(
        &settings(1),
        vec![endpoint.clone()],
        1 << 20,
        Arc::new(Collect(tx)),
    );
    wait_ready(&listener).await;
    let base = unique("bye");
    listener.subscribe(&arc(format!("{base}/#")), 9);
    let (sink, _) = mpsc::unbounded_channel();
    let will = (format!("{base}/will"), Bytes::from_static(b"gone"));
    let sender = Pool::start_with_will(
        &settings(1),
        vec![endpoint],
        1 << 20,
        Arc::new(Collect(sink)),
        Some(will),
        cuttle::metrics::Metrics::new().upstream.clone(),
    );
    wait_ready(&sender).await;
    // The subscription is live once a probe arrives.
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            sender
                .publish(format!("{base}/probe"), qos(0), false, Bytes::new(), None)
                .unwrap();
            if let Ok(Some(_)) = tokio::time::timeout(Duration::from_millis(200), rx.recv()).await {
                break;
            }
        }
    })
    .await
    .expect("the listener's subscription goes live");
    while tokio::time::timeout(Duration::from_millis(200), rx.recv())
        .await
        .is_ok()
    {}

    const N: usize = 200;
    for i in 0..N {
        let payload = Bytes::from(format!("m{i}"));
        sender
            .publish(format!("{base}/m"), qos(1), false, payload, None)
            .unwrap();
    }
    sender.disconnect(Duration::from_secs(5)).await;
    assert_eq!(sender.connected(), 0);

    // Everything arrives (a loaded machine may take a while), then nothing more: no will.
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while got
        .iter()
        .filter(|(t, _): &&(String, Bytes)| t.ends_with("/m"))
        .count()
        < N
    {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some((topic, _, payload))) => got.push((topic, payload)),
            _ => break,
        }
    }
    while let Ok(Some((topic, _, payload))) =
        tokio::time::timeout(Duration::from_millis(500), rx.recv()).await
    {
        got.push((topic, payload));
    }
    let messages: Vec<_> = got.iter().filter(|(t, _)| t.ends_with("/m")).collect();
    assert_eq!(
        messages.len(),
        N,
        "every publish handed over before the DISCONNECT"
    );
    assert!(
        !got.iter().any(|(t, _)| t.ends_with("/will")),
        "a clean disconnect must not publish the will"
    );
    let refused = sender.publish(format!("{base}/m"), qos(0), false, Bytes::new(), None);
    assert!(
        refused.is_err(),
        "a publish after the disconnect is refused"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        sender.connected(),
        0,
        "a disconnected pool does not reconnect"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_disconnect_sends_what_came_before_and_no_will_embedded() {
    a_clean_disconnect_sends_what_came_before_and_no_will(embedded()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_disconnect_sends_what_came_before_and_no_will_mosquitto() {
    a_clean_disconnect_sends_what_came_before_and_no_will(mosquitto()).await;
}

/// [`settings`] speaking `protocol`.
fn settings_v(pool: usize, protocol: Protocol) -> UpstreamSettings {
    UpstreamSettings {
        protocol,
        ..settings(pool)
    }
}

/// RabbitMQ's MQTT plugin (3.1.1 only): `CUTTLE_TEST_RABBITMQ_MQTT_URL`, default
/// `mqtt://127.0.0.1:1884` (bench/setup-services.sh enables it). Fails when unreachable.
fn rabbitmq() -> Endpoint {
    endpoint_from_env(
        "CUTTLE_TEST_RABBITMQ_MQTT_URL",
        "mqtt://127.0.0.1:1884",
        "run bench/setup-services.sh",
    )
}

/// Routing by topic matching (no subscription identifiers) against a reference model: a
/// seeded generator subscribes, re-subscribes under new ids and unsubscribes overlapping
/// filters of two namespaces on a pool of three connections, and after every change publishes
/// a probe. Each probe must reach every live filter it matches exactly once — whether the
/// broker sends one copy per connection or one per matching subscription — and nothing else.
async fn topic_matching_routes_exactly(endpoint: Endpoint, protocol: Protocol, seed: u64) {
    let (dispatch, mut messages, mut subacks) = collect_all();
    let pool = Pool::start(&settings_v(3, protocol), vec![endpoint], 1 << 20, dispatch);
    wait_ready(&pool).await;
    for link in pool.links() {
        let link = link.expect("connected");
        assert!(!link.subscription_ids, "{link:?} routes by topic");
    }
    let base = unique("match");
    let namespaces = [format!("{base}/acme"), format!("{base}/globex")];
    let patterns = ["r/t/#", "+/t/#", "#", "r/+/#", "r/t/f", "+/+/#", "q/t/#"];
    let topics = ["r/t", "r/t/f", "q/t", "r/u/g", "q/t/f/x"];
    let mut rng = seed.max(1);
    let mut next = move |n: usize| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        (rng % n as u64) as usize
    };
    // The model: filter → id.
    let mut live: std::collections::HashMap<String, usize> = Default::default();
    let mut next_id = 1usize;
    for step in 0..30u32 {
        let filter = format!("{}/{}", namespaces[next(2)], patterns[next(patterns.len())]);
        if live.contains_key(&filter) && next(3) > 0 {
            let id = live.remove(&filter).unwrap();
            pool.unsubscribe(&arc(filter.clone()), id);
            tokio::time::sleep(Duration::from_millis(50)).await;
        } else {
            let id = next_id;
            next_id += 1;
            live.insert(filter.clone(), id);
            pool.subscribe(&arc(filter.clone()), id);
            tokio::time::timeout(Duration::from_secs(10), async {
                loop {
                    let (f, got, ok) = subacks.recv().await.unwrap();
                    if f == filter && got == id {
                        assert!(ok, "seed {seed} step {step}: {filter} refused");
                        return;
                    }
                }
            })
            .await
            .unwrap_or_else(|_| panic!("seed {seed} step {step}: no SUBACK for {filter}"));
        }
        let topic = format!("{}/{}", namespaces[next(2)], topics[next(topics.len())]);
        let mut want: Vec<usize> = live
            .iter()
            .filter(|(f, _)| rumqttc::matches(&topic, f))
            .map(|(_, id)| *id)
            .collect();
        want.sort_unstable();
        let probe = Bytes::from(format!("probe-{seed}-{step}"));
        let (tx, rx) = oneshot::channel();
        pool.publish(topic.clone(), qos(1), false, probe.clone(), Some(tx))
            .unwrap();
        rx.await.unwrap().unwrap();
        let mut got: Vec<usize> = Vec::new();
        let settle = if want.is_empty() { 300 } else { 3000 };
        let deadline = tokio::time::Instant::now() + Duration::from_millis(settle);
        while let Ok(Some((t, ids, p))) = tokio::time::timeout_at(deadline, messages.recv()).await {
            if p == probe {
                assert_eq!(t, topic);
                got.extend(ids);
                if got.len() >= want.len() {
                    // Any extra copy comes right behind.
                    let more = tokio::time::Instant::now() + Duration::from_millis(150);
                    while let Ok(Some((_, ids, p))) =
                        tokio::time::timeout_at(more, messages.recv()).await
                    {
                        if p == probe {
                            got.extend(ids);
                        }
                    }
                    break;
                }
            }
        }
        got.sort_unstable();
        assert_eq!(
            got, want,
            "seed {seed} step {step}: {topic} reached ids {got:?}, want {want:?}; live {live:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topic_matching_routes_exactly_mosquitto_v311() {
    for seed in [1, 2] {
        topic_matching_routes_exactly(mosquitto(), Protocol::V3, seed).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topic_matching_routes_exactly_embedded_v311() {
    topic_matching_routes_exactly(embedded_listener(true), Protocol::V3, 3).await;
}

/// RabbitMQ 3.10 speaks MQTT 3.1.1 only: `auto` must find that out by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topic_matching_routes_exactly_rabbitmq_detected() {
    topic_matching_routes_exactly(rabbitmq(), Protocol::Auto, 4).await;
}

/// The pool's own round trip over MQTT 3.1.1: payloads byte-exact, order per topic at every
/// QoS, unsubscribe stops delivery.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_roundtrip_mosquitto_v311() {
    roundtrip_with(mosquitto(), Protocol::V3).await;
}

/// Without subscription identifiers a `$share` subscription's copies cannot be told from a
/// namespace cover's: refused, and said so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_subscriptions_are_refused_without_subscription_ids() {
    let (dispatch, _messages, mut subacks) = collect_all();
    let pool = Pool::start(
        &settings_v(1, Protocol::V3),
        vec![mosquitto()],
        1 << 20,
        dispatch,
    );
    wait_ready(&pool).await;
    let base = unique("share311");
    pool.subscribe(&arc(format!("$share/g/{base}/acme/#")), 9);
    let (_, id, granted) = tokio::time::timeout(Duration::from_secs(5), subacks.recv())
        .await
        .expect("an answer")
        .unwrap();
    assert_eq!((id, granted), (9, false));
}

/// A scripted MQTT 5 broker for one connection: CONNACK with Receive Maximum `window`, every
/// publish reported as (topic, qos), QoS 1 publishes acknowledged at once unless their topic
/// starts with `held_prefix`; those wait until the test releases them, oldest first. Every
/// SUBSCRIBE is reported (its filters) and never acknowledged.
struct ScriptedBroker {
    endpoint: Endpoint,
    publishes: mpsc::UnboundedReceiver<(String, u8)>,
    subscribes: mpsc::UnboundedReceiver<Vec<String>>,
    release: mpsc::UnboundedSender<usize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for ScriptedBroker {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl ScriptedBroker {
    async fn start(window: u16, held_prefix: &'static str) -> Self {
        use rumqttc::v5::mqttbytes::v5::{ConnAck, ConnAckProperties, Packet, PingResp, PubAck};
        use rumqttc::v5::mqttbytes::{Error as CodecError, QoS};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (ptx, publishes) = mpsc::unbounded_channel();
        let (stx, subscribes) = mpsc::unbounded_channel();
        let (release, mut rrx) = mpsc::unbounded_channel::<usize>();
        let task = tokio::spawn(async move {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            let mut rbuf = bytes::BytesMut::new();
            let mut held: std::collections::VecDeque<u16> = Default::default();
            loop {
                // Answer every whole packet read so far.
                let mut out = bytes::BytesMut::new();
                loop {
                    let packet = match Packet::read(&mut rbuf, None) {
                        Ok(p) => p,
                        Err(CodecError::InsufficientBytes(_)) => break,
                        Err(e) => panic!("the pool sent a packet that does not decode: {e:?}"),
                    };
                    let reply = match packet {
                        Packet::Connect(..) => Some(Packet::ConnAck(ConnAck {
                            session_present: false,
                            code: rumqttc::v5::mqttbytes::v5::ConnectReturnCode::Success,
                            properties: Some(ConnAckProperties {
                                session_expiry_interval: None,
                                receive_max: Some(window),
                                max_qos: None,
                                retain_available: None,
                                max_packet_size: None,
                                assigned_client_identifier: None,
                                topic_alias_max: None,
                                reason_string: None,
                                user_properties: Vec::new(),
                                wildcard_subscription_available: None,
                                subscription_identifiers_available: None,
                                shared_subscription_available: None,
                                server_keep_alive: None,
                                response_information: None,
                                server_reference: None,
                                authentication_method: None,
                                authentication_data: None,
                            }),
                        })),
                        Packet::Publish(p) => {
                            let topic = String::from_utf8_lossy(&p.topic).into_owned();
                            let _ = ptx.send((topic.clone(), p.qos as u8));
                            if p.qos != QoS::AtLeastOnce {
                                None
                            } else if topic.starts_with(held_prefix) {
                                held.push_back(p.pkid);
                                None
                            } else {
                                Some(Packet::PubAck(PubAck::new(p.pkid, None)))
                            }
                        }
                        Packet::Subscribe(sub) => {
                            let _ = stx.send(sub.filters.into_iter().map(|f| f.path).collect());
                            None
                        }
                        Packet::PingReq(_) => Some(Packet::PingResp(PingResp)),
                        _ => None,
                    };
                    if let Some(r) = reply {
                        r.write(&mut out, None).unwrap();
                    }
                }
                if !out.is_empty() && sock.write_all(&out).await.is_err() {
                    return;
                }
                tokio::select! {
                    n = sock.read_buf(&mut rbuf) => {
                        if !matches!(n, Ok(n) if n > 0) {
                            return;
                        }
                    }
                    n = rrx.recv() => {
                        let mut out = bytes::BytesMut::new();
                        for _ in 0..n.unwrap_or(0) {
                            if let Some(pkid) = held.pop_front() {
                                Packet::PubAck(PubAck::new(pkid, None)).write(&mut out, None).unwrap();
                            }
                        }
                        if sock.write_all(&out).await.is_err() {
                            return;
                        }
                    }
                }
            }
        });
        Self {
            endpoint: Endpoint {
                host: "127.0.0.1".into(),
                port,
                tls: false,
            },
            publishes,
            subscribes,
            release,
            task,
        }
    }

    /// A scripted broker and a one-connection pool connected to it.
    async fn with_pool(window: u16, held_prefix: &'static str) -> (Self, Arc<Pool>) {
        let broker = Self::start(window, held_prefix).await;
        let (tx, _rx) = mpsc::unbounded_channel();
        let pool = Pool::start(
            &settings(1),
            vec![broker.endpoint.clone()],
            1 << 20,
            Arc::new(Collect(tx)),
        );
        wait_ready(&pool).await;
        (broker, pool)
    }

    /// The next publish the broker received, within `within`.
    async fn next(&mut self, within: Duration) -> Option<(String, u8)> {
        tokio::time::timeout(within, self.publishes.recv())
            .await
            .ok()
            .flatten()
    }
}

/// Regression (issue 12's churn bench on NATS and RabbitMQ): the pool connection's queue was
/// one FIFO, so a tenant's QoS 1 backlog on a broker slow to acknowledge held every other
/// tenant's publishes behind it, QoS 0 included, and one tenant could fill the whole byte
/// budget. Now each namespace has its own lane: another tenant's QoS 0 goes at once, its QoS 1
/// gets one of the next window slots to free up, and a lane at its byte bound refuses only its
/// own publishes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_tenants_qos_1_backlog_does_not_hold_another_tenants_publishes() {
    let window = 5;
    let (mut broker, pool) = ScriptedBroker::with_pool(window, "app/slow/").await;
    let backlog = 50;
    for i in 0..backlog {
        pool.publish(
            format!("app/slow/t/{i}"),
            qos(1),
            false,
            Bytes::from_static(b"s"),
            None,
        )
        .unwrap();
    }
    // The broker holds the window's worth of them unacknowledged.
    for i in 0..window {
        let (topic, q) = broker
            .next(Duration::from_secs(5))
            .await
            .expect("slow publish");
        assert_eq!((topic, q), (format!("app/slow/t/{i}"), 1));
    }
    assert_eq!(
        broker.next(Duration::from_millis(200)).await,
        None,
        "window full"
    );

    // Another tenant's QoS 0 goes at once, past the 45 waiting.
    let sent = std::time::Instant::now();
    pool.publish(
        "app/fast/t".into(),
        qos(0),
        false,
        Bytes::from_static(b"f"),
        None,
    )
    .unwrap();
    assert_eq!(
        broker.next(Duration::from_secs(2)).await,
        Some(("app/fast/t".into(), 0)),
        "another tenant's QoS 0 publish waited behind the QoS 1 backlog"
    );
    let qos0_latency = sent.elapsed();
    assert!(
        qos0_latency < Duration::from_millis(500),
        "{qos0_latency:?}"
    );

    // Its QoS 1 waits for a slot like everybody's, but gets one of the first two to free up
    // (the slow lane waited longer), not the 46th.
    let (ack_tx, ack_rx) = oneshot::channel();
    pool.publish(
        "app/fast/q".into(),
        qos(1),
        false,
        Bytes::from_static(b"f"),
        Some(ack_tx),
    )
    .unwrap();
    assert_eq!(
        broker.next(Duration::from_millis(200)).await,
        None,
        "no slot yet"
    );
    broker.release.send(2).unwrap();
    let mut got = Vec::new();
    while let Some((topic, _)) = broker.next(Duration::from_millis(500)).await {
        got.push(topic);
    }
    // (Its immediate acknowledgement frees a slot for the slow lane again.)
    assert_eq!(got, ["app/slow/t/5", "app/fast/q", "app/slow/t/6"]);
    tokio::time::timeout(Duration::from_secs(2), ack_rx)
        .await
        .expect("acknowledged")
        .unwrap()
        .unwrap();

    // The slow tenant fills its lane (a quarter of the connection's 32 MiB): its publishes are
    // refused, the other tenant's still go.
    let big = Bytes::from(vec![0u8; 1 << 20]);
    let mut accepted = 0usize;
    let refused = loop {
        match pool.publish("app/slow/big".into(), qos(1), false, big.clone(), None) {
            Ok(()) => accepted += 1,
            Err(e) => break e,
        }
        assert!(accepted < 32, "the slow lane was never bounded");
    };
    assert_eq!(refused, cuttle::upstream::PublishError::Saturated);
    assert_eq!(
        accepted, 7,
        "8 MiB lane: 7 publishes of 1 MiB after the backlog"
    );
    pool.publish("app/fast/t".into(), qos(0), false, big.clone(), None)
        .expect("another tenant's publish is accepted");
    assert_eq!(
        broker.next(Duration::from_secs(2)).await,
        Some(("app/fast/t".into(), 0))
    );
}

/// The connection's own caps on what awaits the broker, measured on a broker that acknowledges
/// nothing: QoS 1 publishes in flight stop at 1,024 even when the broker's Receive Maximum
/// allows more, and SUBSCRIBEs awaiting their SUBACK stop at 512 (the rest wait their turn,
/// so a restore of thousands of filters never floods the broker).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_flight_publishes_and_pending_subscribes_are_capped() {
    let (mut broker, pool) = ScriptedBroker::with_pool(u16::MAX, "app/").await;
    for i in 0..1500 {
        pool.publish(
            format!("app/acme/t/{i}"),
            qos(1),
            false,
            Bytes::from_static(b"p"),
            None,
        )
        .unwrap();
    }
    let mut in_flight = 0;
    while broker.next(Duration::from_millis(500)).await.is_some() {
        in_flight += 1;
    }
    assert_eq!(
        in_flight, 1024,
        "QoS 1 publishes written without an acknowledgement"
    );
    for i in 0..600 {
        pool.subscribe(&arc(format!("app/acme/f/{i}")), i + 1);
    }
    let mut pending = 0;
    while let Ok(Some(filters)) =
        tokio::time::timeout(Duration::from_millis(500), broker.subscribes.recv()).await
    {
        pending += filters.len();
    }
    assert_eq!(pending, 512, "filters subscribed without a SUBACK");
    // Releasing some publish acknowledgements lets exactly as many more go.
    broker.release.send(100).unwrap();
    let mut more = 0;
    while broker.next(Duration::from_millis(500)).await.is_some() {
        more += 1;
    }
    assert_eq!(more, 100);
}
