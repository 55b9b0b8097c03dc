//! cuttle on a real broker cluster: three `nats-server` processes clustered on loopback, with
//! JetStream and their MQTT 3.1.1 listeners (NATS offers no MQTT 5, so the pool detects 3.1.1
//! and routes by topic matching). Replicas attached to different nodes behave as one
//! deployment, restore works through the cluster's retained messages, and killing a node
//! moves its replica's connections to the others without losing a subscription.
//!
//! The test starts every process it uses and kills them when it ends, also on failure.

mod common;

use std::time::{Duration, Instant};

use common::server::*;
use common::*;
use rmpv::Value;

/// The tests take turns: two clusters of JetStream nodes at once overload a two-core machine
/// (elections time out), which is not what these tests are about.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A three-node NATS cluster; every node is killed on drop.
struct NatsCluster {
    nodes: Vec<Option<std::process::Child>>,
    mqtt_ports: Vec<u16>,
    _dir: tempfile::TempDir,
}

/// `GET /healthz` on a node's monitoring port answers 200.
fn healthy(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"GET /healthz HTTP/1.0\r\nHost: x\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    answer.starts_with("HTTP/1.0 200") || answer.starts_with("HTTP/1.1 200")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

impl NatsCluster {
    fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let n = 3;
        let client: Vec<u16> = (0..n).map(|_| free_port()).collect();
        let route: Vec<u16> = (0..n).map(|_| free_port()).collect();
        let mqtt: Vec<u16> = (0..n).map(|_| free_port()).collect();
        let monitor: Vec<u16> = (0..n).map(|_| free_port()).collect();
        let routes = route
            .iter()
            .map(|p| format!("\"nats://127.0.0.1:{p}\""))
            .collect::<Vec<_>>()
            .join(", ");
        let mut nodes = Vec::new();
        for i in 0..n {
            let conf = dir.path().join(format!("n{i}.conf"));
            let store = dir.path().join(format!("js{i}"));
            std::fs::write(
                &conf,
                format!(
                    "server_name: n{i}\nhost: 127.0.0.1\nport: {}\nhttp: 127.0.0.1:{}\n\
                     jetstream {{ store_dir: \"{}\", max_memory_store: 64MB, max_file_store: 256MB }}\n\
                     cluster {{ name: cuttle-test, host: 127.0.0.1, port: {}, routes: [{routes}] }}\n\
                     mqtt {{ host: 127.0.0.1, port: {}, stream_replicas: 3 }}\n",
                    client[i],
                    monitor[i],
                    store.display(),
                    route[i],
                    mqtt[i]
                ),
            )
            .unwrap();
            let log = std::fs::File::create(dir.path().join(format!("n{i}.log"))).unwrap();
            let child = std::process::Command::new("nats-server")
                .arg("-c")
                .arg(&conf)
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .expect("nats-server must be installed (tests/cluster.rs)");
            nodes.push(Some(child));
        }
        let cluster = Self {
            nodes,
            mqtt_ports: mqtt,
            _dir: dir,
        };
        // Healthy: routes up and JetStream (which NATS's MQTT needs) current on every node.
        let deadline = Instant::now() + Duration::from_secs(30);
        for port in &monitor {
            while !healthy(*port) {
                assert!(
                    Instant::now() < deadline,
                    "nats-server :{port} never healthy"
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        cluster
    }

    fn url(&self, i: usize) -> String {
        format!("mqtt://127.0.0.1:{}", self.mqtt_ports[i])
    }

    fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // What the nodes said, for the failure's report.
            for i in 0..self.nodes.len() {
                let log = self._dir.path().join(format!("n{i}.log"));
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(40).collect();
                eprintln!("--- nats node {i} (last lines) ---");
                for l in tail.iter().rev() {
                    eprintln!("{l}");
                }
            }
        }
        for i in 0..self.nodes.len() {
            self.kill(i);
        }
    }
}

/// A replica of deployment `prefix` on the brokers `urls` (a list: `upstream.brokers`).
async fn replica(prefix: &str, urls: &[String], extra: &str) -> TestProxy {
    let list = urls
        .iter()
        .map(|u| format!("\"{u}\""))
        .collect::<Vec<_>>()
        .join(", ");
    start_replica_brokers(&format!("[{list}]"), prefix, "", extra, &test_env).await
}

/// Publishes `data` from `publ` until `sub` receives it (subscriptions reach the broker
/// asynchronously); returns how long that took.
async fn until_delivered(publ: &mut Client, sub: &mut Client, topic: &str, data: &str) -> Duration {
    until_delivered_to(publ, sub, topic, None, data).await
}

/// [`until_delivered`], published with sub-topic `filter`.
async fn until_delivered_to(
    publ: &mut Client,
    sub: &mut Client,
    topic: &str,
    filter: Option<&str>,
    data: &str,
) -> Duration {
    let start = Instant::now();
    loop {
        assert!(
            start.elapsed() < Duration::from_secs(90),
            "{topic} {filter:?}: {data} never delivered"
        );
        publish_to(publ, topic, filter, data).await;
        while let Some(Received::Frame(f)) = sub.recv_within(300).await {
            if get_str(&f, "type") == Some("message") && get(&f, "data") == Some(&Value::from(data))
            {
                return start.elapsed();
            }
        }
    }
}

async fn publish_to(publ: &mut Client, topic: &str, filter: Option<&str>, data: &str) {
    let mut frame = vec![
        ("type", "publish".into()),
        ("topic", topic.into()),
        ("data", data.into()),
    ];
    if let Some(f) = filter {
        frame.push(("filter", f.into()));
    }
    publ.send(map(&frame)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_on_different_nats_nodes_deliver_to_each_other_and_restore() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let cluster = NatsCluster::start();
    let prefix = unique_prefix();
    let a = replica(&prefix, &[cluster.url(0)], "").await;
    let b = replica(&prefix, &[cluster.url(1)], "").await;
    for p in [&a, &b] {
        for link in p.proxy.pool.links() {
            let link = link.expect("connected");
            assert_eq!(link.version, cuttle::upstream::Version::V311, "{link:?}");
            assert!(!link.subscription_ids);
        }
    }

    // A's subscriber hears B's publisher, through two nodes.
    let mut sub = Client::login(&a.url, SENSOR1_TOKEN).await;
    sub.subscribe("chat/general/messages").await;
    let mut publ = Client::login(&b.url, &hs256(&user_claims("alice"))).await;
    let took = until_delivered(&mut publ, &mut sub, "chat/general/messages", "a-from-b").await;
    println!("first delivery across nodes after {took:?}");
    // And exactly once: the next message arrives once.
    publ.publish("chat/general/messages", "once".into()).await;
    let m = sub.frame_of("message").await;
    assert_eq!(get(&m, "data"), Some(&Value::from("once")));
    sub.no_message_within(500).await;
    // Another scope hears nothing.
    let mut globex = Client::login(&a.url, SENSOR2_TOKEN).await;
    globex.subscribe("chat/general/messages").await;
    publ.publish("chat/general/messages", "acme only".into())
        .await;
    assert_eq!(
        get(&sub.frame_of("message").await, "data"),
        Some(&Value::from("acme only"))
    );
    globex.no_message_within(500).await;
    // Records are written at most once a second per actor (server::restore); another replica
    // reads what the broker holds.
    tokio::time::sleep(Duration::from_millis(2000)).await;
    drop(sub);

    // The SDK's automatic reconnect lands on the other replica (other node): the set
    // written through node 0 is read back through node 1.
    let (mut again, reply) = Client::auth_reconnect(&b.url, SENSOR1_TOKEN).await;
    assert_eq!(restored_names(&reply), ["chat/general/messages"]);
    let mut publ_a = Client::login(&a.url, &hs256(&user_claims("alice"))).await;
    until_delivered(&mut publ_a, &mut again, "chat/general/messages", "restored").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_a_nats_node_moves_its_connections_without_losing_subscriptions() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let mut cluster = NatsCluster::start();
    let prefix = unique_prefix();
    let all: Vec<String> = (0..3).map(|i| cluster.url(i)).collect();
    // The subscriber's replica: a pool of 2 over three nodes (connection 0 starts on node 0,
    // connection 1 on node 1).
    let a = replica(&prefix, &all, "").await;
    let on = |links: &[Option<cuttle::upstream::LinkStatus>]| -> Vec<String> {
        links
            .iter()
            .map(|l| l.as_ref().map_or("down".into(), |l| l.endpoint.clone()))
            .collect()
    };
    // The node connection 0 is on (it starts on node 0, but moves on if that node was not
    // ready to take MQTT connections yet).
    let before = on(&a.proxy.pool.links());
    let victim = (0..3)
        .find(|i| before[0] == format!("127.0.0.1:{}", cluster.mqtt_ports[*i]))
        .expect("connection 0 is on a node");
    let victim_addr = before[0].clone();
    println!("pool on {before:?}; killing node {victim}");
    // The publisher's replica on a node that survives.
    let b = replica(&prefix, &[cluster.url((victim + 1) % 3)], "").await;

    // Enough upstream filters (one per sub-topic filter) that both pool connections hold
    // some.
    const TOPIC: &str = "chat/general/messages";
    let filters: Vec<String> = (0..8).map(|i| format!("f{i}")).collect();
    let mut sub = Client::login(&a.url, SENSOR1_TOKEN).await;
    sub.send(subscribe_frame(
        TOPIC,
        &[(
            "filters",
            Value::Array(filters.iter().map(|f| f.as_str().into()).collect()),
        )],
    ))
    .await;
    sub.frame_of("subscribed").await;
    let mut publ = Client::login(&b.url, &hs256(&user_claims("alice"))).await;
    for f in &filters {
        until_delivered_to(&mut publ, &mut sub, TOPIC, Some(f), "before").await;
    }

    cluster.kill(victim);
    let killed = Instant::now();
    // For the report if recovery fails: where both replicas' connections are.
    let watch = {
        let (pa, pb) = (a.proxy.clone(), b.proxy.clone());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let show = |p: &cuttle::server::Proxy| -> Vec<String> {
                    p.pool
                        .links()
                        .iter()
                        .map(|l| l.as_ref().map_or("down".into(), |l| l.endpoint.clone()))
                        .collect()
                };
                println!(
                    "{:?} after the kill: subscriber's replica {:?}, publisher's {:?}",
                    killed.elapsed(),
                    show(&pa),
                    show(&pb)
                );
            }
        })
    };
    // Every subscription is heard again, through the surviving nodes.
    let mut worst = Duration::ZERO;
    for f in &filters {
        until_delivered_to(&mut publ, &mut sub, TOPIC, Some(f), "after").await;
        worst = worst.max(killed.elapsed());
    }
    watch.abort();
    println!("every subscription delivering again {worst:?} after the node died");
    // The pool moves within a few hundred milliseconds; covers are QoS 0 (no JetStream
    // consumer to re-elect). Publishes are QoS 1, stored by JetStream first.
    assert!(worst < Duration::from_secs(15), "recovery took {worst:?}");
    // NATS may still drop a connection or two while its JetStream settles (a CONNECT that
    // waited on a leader election): wait for both connections up and unchanged for 2 s.
    let settle = Instant::now();
    let mut stable_since = Instant::now();
    let mut last = on(&a.proxy.pool.links());
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = on(&a.proxy.pool.links());
        if now != last || now.iter().any(|l| l == "down") {
            stable_since = Instant::now();
            last = now;
        } else if stable_since.elapsed() > Duration::from_secs(2) {
            break;
        }
        assert!(
            settle.elapsed() < Duration::from_secs(30),
            "the pool never settled: {last:?}"
        );
    }
    assert!(
        !last.contains(&victim_addr),
        "both connections on the surviving nodes: {last:?}"
    );
    // And each message arrives exactly once.
    while sub.recv_within(300).await.is_some() {}
    for f in &filters {
        publish_to(&mut publ, TOPIC, Some(f), "exactly-once").await;
    }
    let mut seen = Vec::new();
    while let Some(Received::Frame(f)) = sub.recv_within(1500).await {
        if get(&f, "data") == Some(&Value::from("exactly-once")) {
            seen.push(get_str(&f, "filter").unwrap_or_default().to_string());
        }
    }
    seen.sort();
    assert_eq!(seen, filters);
}
