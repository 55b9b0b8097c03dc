//! The broker goes away and comes back: clients stay connected, `/readyz` reports not-ready
//! meanwhile, the pool reconnects with backoff and every subscription is re-established.
//!
//! Mosquitto: a private instance on a free port, really stopped and started. rumqttd (which
//! cannot be stopped in-process): the pool reaches it through a TCP relay that the test cuts
//! and restores, which is what a broker restart looks like from the proxy.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::server::*;
use common::*;
use rmpv::Value;
use tokio::net::{TcpListener, TcpStream};

async fn wait_until(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    tokio::time::timeout(Duration::from_secs(secs), async {
        while !f() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out waiting for {what}"));
}

async fn scenario(p: &TestProxy, stop: impl AsyncFnOnce(), start: impl AsyncFnOnce()) {
    let mut sub = Client::login(&p.url, SENSOR1_TOKEN).await;
    sub.subscribe("chat/general/messages").await;
    let mut wild = Client::login(&p.url, SENSOR1_TOKEN).await;
    wild.subscribe("chat/+/messages").await;
    let mut publ = Client::login(&p.url, SENSOR1_TOKEN).await;
    publ.publish("chat/general/messages", "before".into()).await;
    assert_eq!(
        get(&sub.frame_of("message").await, "data"),
        Some(&Value::from("before"))
    );

    stop().await;
    wait_until("not ready", 10, || !p.proxy.is_ready()).await;
    // Clients stay connected: a heartbeat is still answered.
    sub.send_raw(vec![]).await;
    assert!(matches!(sub.recv_within(2000).await, Some(Received::Empty)));

    start().await;
    wait_until("ready again", 20, || p.proxy.is_ready()).await;
    // Subscriptions come back without the clients doing anything.
    let delivered = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            publ.publish("chat/general/messages", "after".into()).await;
            if let Some(Received::Frame(f)) = sub.recv_within(300).await
                && get(&f, "data") == Some(&Value::from("after"))
            {
                return;
            }
        }
    })
    .await;
    assert!(delivered.is_ok(), "exact subscription recovered");
    let m = wild.frame_of("message").await;
    assert_eq!(
        get_str(&m, "topic"),
        Some("chat/+/messages"),
        "wildcard subscription recovered"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_stop_and_start() {
    assert!(
        std::process::Command::new("mosquitto")
            .arg("-h")
            .output()
            .is_ok(),
        "mosquitto must be installed for this test"
    );
    let port = free_port();
    let spawn = move || {
        tokio::process::Command::new("mosquitto")
            .args(["-p", &port.to_string()])
            .kill_on_drop(true)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("mosquitto starts")
    };
    let broker = Arc::new(tokio::sync::Mutex::new(Some(spawn())));
    wait_until("mosquitto listening", 10, || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    })
    .await;
    let p = start_proxy_on(&format!("mqtt://127.0.0.1:{port}"), "").await;
    let (b1, b2) = (broker.clone(), broker.clone());
    scenario(
        &p,
        async move || {
            if let Some(mut child) = b1.lock().await.take() {
                let _ = child.kill().await;
            }
        },
        async move || {
            *b2.lock().await = Some(spawn());
        },
    )
    .await;
}

/// A TCP relay that can refuse and cut connections, standing in for a broker restart.
struct Relay {
    addr: SocketAddr,
    up: Arc<AtomicBool>,
    generation: Arc<tokio::sync::watch::Sender<u64>>,
}

impl Relay {
    async fn new(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let up = Arc::new(AtomicBool::new(true));
        let (generation, _) = tokio::sync::watch::channel(0u64);
        let generation = Arc::new(generation);
        let (u, g) = (up.clone(), generation.clone());
        tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    return;
                };
                if !u.load(Ordering::SeqCst) {
                    continue; // dropped: connection refused-ish
                }
                let mut cut = g.subscribe();
                tokio::spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = cut.changed() => {}
                    }
                });
            }
        });
        Self {
            addr,
            up,
            generation,
        }
    }

    fn cut(&self) {
        self.up.store(false, Ordering::SeqCst);
        self.generation.send_modify(|g| *g += 1);
    }

    fn restore(&self) {
        self.up.store(true, Ordering::SeqCst);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_broker_connection_loss_and_recovery() {
    let broker = cuttle::broker::start(2 << 20, 100, 0, false).expect("embedded broker");
    let relay = Arc::new(Relay::new(broker.addr).await);
    let p = start_proxy_on(&format!("mqtt://{}", relay.addr), "").await;
    let (r1, r2) = (relay.clone(), relay.clone());
    scenario(&p, async move || r1.cut(), async move || r2.restore()).await;
}
