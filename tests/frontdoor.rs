//! The front door under attack: what an unauthenticated client can hold on either listener,
//! measured with real timers.
//!
//! Before a WebSocket upgrade the client port serves one request per connection, all of it
//! (TLS, request head, body, response) under `limits.handshake_timeout_ms`; the admin port has
//! its own slots and short bounds (`src/server/http.rs`). Each test attacks a port the way the
//! audit did and asserts a bound: how long a connection survives, how fast its slot comes
//! back, how long a WebSocket login or a `/healthz` probe takes meanwhile. The figures are
//! printed (`cargo test --test frontdoor -- --nocapture`).

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::server::*;
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tokio::time::{Instant, sleep};

/// The admin bounds in `src/server/http.rs`, restated: the tests measure against them.
const ADMIN_HEAD_TIMEOUT: Duration = Duration::from_secs(1);
const ADMIN_MAX_REQUESTS: usize = 100;
const ADMIN_LIFETIME: Duration = Duration::from_secs(5);

/// Timing assertions: each test runs alone, so two attacks do not share the two CPUs of a
/// small CI machine.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const NOPE: &[u8] = b"GET /nope HTTP/1.1\r\nhost: x\r\n\r\n";
const HEALTHZ: &[u8] = b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n";

fn client_addr(p: &TestProxy) -> SocketAddr {
    p.url
        .trim_start_matches("ws://")
        .trim_end_matches("/ws")
        .parse()
        .expect("the test proxy's address")
}

#[derive(Debug)]
struct Response {
    status: u16,
    headers: Vec<(String, String)>,
}

impl Response {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    fn closes(&self) -> bool {
        self.header("connection")
            .is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("close")))
    }
}

/// Reads one response (head and `content-length` body). `None`: the connection closed, or no
/// whole response arrived within `within`. Callers send one request at a time, so nothing
/// of a next response is read past.
async fn read_response(s: &mut TcpStream, within: Duration) -> Option<Response> {
    let read = async {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        let mut lines = head.split("\r\n");
        let status = lines.next()?.split_whitespace().nth(1)?.parse().ok()?;
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        let len: usize = headers
            .iter()
            .find(|(k, _)| k == "content-length")
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or(0);
        let mut body = buf.len() - head_end;
        while body < len {
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => body += n,
            }
        }
        Some(Response { status, headers })
    };
    tokio::time::timeout(within, read).await.ok().flatten()
}

/// Whether the server closes `s` (EOF or reset) within `within`; anything it sends first is
/// discarded.
async fn closed_within(s: &mut TcpStream, within: Duration) -> bool {
    let wait = async {
        let mut buf = [0u8; 4096];
        while let Ok(n) = s.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
    };
    tokio::time::timeout(within, wait).await.is_ok()
}

/// Polls `done` every 5 ms; how long it took to hold, or `None` if it did not within `within`.
async fn until(within: Duration, mut done: impl FnMut() -> bool) -> Option<Duration> {
    let start = Instant::now();
    loop {
        if done() {
            return Some(start.elapsed());
        }
        if start.elapsed() >= within {
            return None;
        }
        sleep(Duration::from_millis(5)).await;
    }
}

/// A kubelet-style probe: a new connection, `GET /healthz`, `connection: close` (the
/// kubelet disables keep-alive), 2 s to answer. The status (if any) and the time from
/// `connect` to the whole response.
async fn probe(admin: SocketAddr) -> (Option<u16>, Duration) {
    let start = Instant::now();
    let status = tokio::time::timeout(Duration::from_secs(2), async {
        let mut s = TcpStream::connect(admin).await.ok()?;
        s.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await
            .ok()?;
        read_response(&mut s, Duration::from_secs(2))
            .await
            .map(|r| r.status)
    })
    .await
    .ok()
    .flatten();
    (status, start.elapsed())
}

/// Time for a WebSocket client to connect and authenticate, or `None` after 2 s.
async fn login_time(url: &str) -> Option<Duration> {
    let start = Instant::now();
    let client = tokio::time::timeout(Duration::from_secs(2), Client::login(url, SENSOR1_TOKEN))
        .await
        .ok()?;
    let took = start.elapsed();
    drop(client);
    Some(took)
}

/// The audit's client: HTTP keep-alive, `request` every `every` on one connection, a new
/// connection whenever the server closes it.
async fn keep_alive_attacker(addr: SocketAddr, request: &'static [u8], every: Duration) {
    loop {
        let Ok(mut s) = TcpStream::connect(addr).await else {
            sleep(Duration::from_millis(10)).await;
            continue;
        };
        while s.write_all(request).await.is_ok()
            && read_response(&mut s, Duration::from_secs(5))
                .await
                .is_some()
        {
            sleep(every).await;
        }
    }
}

/// Connects and says nothing; reconnects when the server closes.
async fn idle_attacker(addr: SocketAddr) {
    loop {
        let Ok(mut s) = TcpStream::connect(addr).await else {
            sleep(Duration::from_millis(10)).await;
            continue;
        };
        closed_within(&mut s, Duration::from_secs(3600)).await;
    }
}

/// Slow-loris: the start of a request head, then one more byte every 100 ms; reconnects
/// when the server closes (a write fails).
async fn slow_head_attacker(addr: SocketAddr) {
    loop {
        let Ok(mut s) = TcpStream::connect(addr).await else {
            sleep(Duration::from_millis(10)).await;
            continue;
        };
        let mut ok = s.write_all(b"GET /healthz HTTP/1.1\r\nx-a: ").await.is_ok();
        while ok {
            sleep(Duration::from_millis(100)).await;
            ok = s.write_all(b"a").await.is_ok();
        }
    }
}

/// With every slot of the client port taken by HTTP keep-alive clients, each is closed after
/// its response and the slots come back at once; under a continuing keep-alive attack of
/// twice that many clients a WebSocket client still connects and authenticates promptly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_clients_release_their_slot_with_the_response() {
    let _serial = SERIAL.lock().await;
    const MAX: usize = 20;
    // A long handshake deadline: the slots must come back because each connection ends with
    // its response, not because a timer fires.
    let p = start_proxy(
        TestBroker::Embedded,
        "limits: { max_connections: 20, handshake_timeout_ms: 5000 }",
    )
    .await;
    let addr = client_addr(&p);

    // MAX keep-alive clients send one request each and keep the connection open (for 2 s,
    // or until the server closes it). Everything is measured first, then asserted.
    let start = Instant::now();
    let answered = Arc::new(AtomicUsize::new(0));
    let mut clients = JoinSet::new();
    for _ in 0..MAX {
        let answered = answered.clone();
        clients.spawn(async move {
            let mut s = TcpStream::connect(addr).await.expect("connects");
            s.write_all(NOPE).await.expect("sends");
            let r = read_response(&mut s, Duration::from_secs(2)).await;
            answered.fetch_add(1, Ordering::Relaxed);
            let closed = closed_within(&mut s, Duration::from_secs(2)).await;
            (r, closed.then(|| start.elapsed()))
        });
    }
    until(Duration::from_secs(2), || {
        answered.load(Ordering::Relaxed) == MAX
    })
    .await;
    // While the clients still hold their end open.
    let held_after_responses = p.proxy.connection_slots_in_use();
    let released = until(Duration::from_secs(1), || {
        p.proxy.connection_slots_in_use() == 0
    })
    .await;
    let answers = clients.join_all().await;
    let closed: Vec<Duration> = answers.iter().filter_map(|(_, c)| *c).collect();
    eprintln!(
        "client port, {MAX} keep-alive clients on {MAX} slots: {} closed by the server (last at {:?}); \
         slots held once all were answered: {held_after_responses}; all free after {released:?}",
        closed.len(),
        closed.iter().max(),
    );

    // Twice as many attackers, each sending `GET /nope` every 200 ms on a keep-alive
    // connection and reconnecting when closed, while real clients log in.
    let mut attack = JoinSet::new();
    for _ in 0..2 * MAX {
        attack.spawn(keep_alive_attacker(addr, NOPE, Duration::from_millis(200)));
    }
    sleep(Duration::from_millis(300)).await;
    let held_under_attack = p.proxy.connection_slots_in_use();
    let mut logins = Vec::new();
    for _ in 0..5 {
        logins.push(login_time(&p.url).await);
        sleep(Duration::from_millis(100)).await;
    }
    attack.shutdown().await;
    eprintln!(
        "client port, {} keep-alive attackers: {held_under_attack} slots held; WebSocket logins took {logins:?}",
        2 * MAX
    );

    for (r, _) in &answers {
        let r = r.as_ref().expect("a response");
        assert_eq!(r.status, 404);
        assert!(r.closes(), "no `connection: close`: {:?}", r.headers);
    }
    assert_eq!(closed.len(), MAX, "each connection ends after its response");
    assert!(
        closed.iter().all(|t| *t < Duration::from_millis(500)),
        "{closed:?}"
    );
    let released = released.expect("slots released");
    assert!(released < Duration::from_millis(200), "{released:?}");
    for l in &logins {
        let l = l.expect("a WebSocket client logs in during the attack");
        assert!(l < Duration::from_secs(1), "{logins:?}");
    }
    let released = until(Duration::from_secs(2), || {
        p.proxy.connection_slots_in_use() == 0
    })
    .await;
    assert!(released.is_some(), "slots free once the attack stops");
    p.proxy.begin_shutdown();
}

/// Slow or stalled clients on the client port are closed by the handshake deadline, whatever
/// part of the exchange they stall in; an upgraded session is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_exchanges_on_the_client_port_end_at_the_handshake_deadline() {
    let _serial = SERIAL.lock().await;
    const DEADLINE: Duration = Duration::from_millis(500);
    let p = start_proxy(
        TestBroker::Embedded,
        "limits: { max_connections: 20, handshake_timeout_ms: 500 }",
    )
    .await;
    let addr = client_addr(&p);
    let mut session = Client::login(&p.url, SENSOR1_TOKEN).await;
    assert_eq!(
        p.proxy.connection_slots_in_use(),
        1,
        "the session holds its slot"
    );

    let mut stalled = JoinSet::new();
    // Each case: what the client sends, then whether it trickles more (one byte every 50
    // ms) — it waits for the server to close the connection.
    let cases: [(&'static str, &'static [u8], bool); 5] = [
        ("silent", b"", false),
        ("half a head", b"GET /ws HTTP/1.1\r\nhost: x\r\n", false),
        ("a trickled head", b"GET /ws HTTP/1.1\r\nx-a: ", true),
        (
            "a trickled body",
            b"POST /nope HTTP/1.1\r\nhost: x\r\ncontent-length: 1000000\r\n\r\n",
            true,
        ),
        (
            "a valid head, then nothing",
            b"GET /ws HTTP/1.1\r\nhost: x\r\n\r\n",
            false,
        ),
    ];
    for (name, first, trickle) in cases {
        stalled.spawn(async move {
            let start = Instant::now();
            let s = TcpStream::connect(addr).await.expect("connects");
            let (mut rx, mut tx) = s.into_split();
            tx.write_all(first).await.expect("sends");
            let writer = tokio::spawn(async move {
                while trickle && tx.write_all(b"a").await.is_ok() {
                    sleep(Duration::from_millis(50)).await;
                }
                // Keeps the write half (and so the connection) open until aborted.
                std::future::pending::<()>().await;
            });
            let wait = async {
                let mut buf = [0u8; 1024];
                while let Ok(n) = rx.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                }
            };
            let closed = tokio::time::timeout(Duration::from_secs(3), wait)
                .await
                .is_ok();
            writer.abort();
            (name, closed.then(|| start.elapsed()))
        });
    }
    // A client that pipelines requests and never reads a response: the answers fill the
    // socket buffers, the server's write blocks. It sees the end as a failed write.
    stalled.spawn(async move {
        let start = Instant::now();
        let mut s = TcpStream::connect(addr).await.expect("connects");
        let requests = NOPE.repeat(8 * 1024 * 1024 / NOPE.len());
        let failed = tokio::time::timeout(Duration::from_secs(3), s.write_all(&requests)).await;
        let at = match failed {
            Ok(Err(_)) => Some(start.elapsed()),
            // Everything written (the server read it all) or still blocked: not closed.
            Ok(Ok(())) | Err(_) => None,
        };
        ("pipelined requests, responses never read", at)
    });
    let results = stalled.join_all().await;
    let released = until(Duration::from_secs(1), || {
        p.proxy.connection_slots_in_use() == 1
    })
    .await;
    eprintln!(
        "client port, handshake deadline {DEADLINE:?}: closed after {results:?}; \
         slots back to the session's 1 after {released:?}"
    );
    for (name, at) in &results {
        let at = at.unwrap_or_else(|| panic!("{name}: not closed within 3 s"));
        assert!(
            at < DEADLINE + Duration::from_millis(400),
            "{name}: closed after {at:?}"
        );
    }
    assert!(released.is_some(), "stalled clients' slots released");

    // The session outlived the deadline and still works; its slot goes when it does.
    session
        .send(map(&[
            ("type", "subscribe".into()),
            ("topic", "chat/general/messages".into()),
        ]))
        .await;
    assert_eq!(get_str(&session.frame().await, "type"), Some("subscribed"));
    drop(session);
    assert!(
        until(Duration::from_secs(2), || p.proxy.connection_slots_in_use()
            == 0)
        .await
        .is_some(),
        "the session's slot released when it ends"
    );
    p.proxy.begin_shutdown();
}

/// `/healthz` on a new connection answers promptly while 104 bad clients hold or hammer
/// the admin port (64 of them the audit's keep-alive clients, enough to fill its old 64
/// slots) and every slot of the client port is taken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_answers_while_both_ports_are_attacked() {
    let _serial = SERIAL.lock().await;
    const MAX: usize = 20;
    let p = start_proxy(
        TestBroker::Embedded,
        "limits: { max_connections: 20, handshake_timeout_ms: 500 }",
    )
    .await;
    let addr = client_addr(&p);
    let mut attack = JoinSet::new();
    // The client port: twice its slots in silent connections, each replaced when closed.
    for _ in 0..2 * MAX {
        attack.spawn(idle_attacker(addr));
    }
    for _ in 0..64 {
        attack.spawn(keep_alive_attacker(
            p.admin,
            NOPE,
            Duration::from_millis(200),
        ));
    }
    for _ in 0..20 {
        attack.spawn(slow_head_attacker(p.admin));
    }
    for _ in 0..20 {
        attack.spawn(idle_attacker(p.admin));
    }
    sleep(Duration::from_millis(500)).await;

    let mut probes = Vec::new();
    let mut client_slots = Vec::new();
    let mut admin_slots = Vec::new();
    for _ in 0..10 {
        client_slots.push(p.proxy.connection_slots_in_use());
        admin_slots.push(p.proxy.admin_slots_in_use());
        probes.push(probe(p.admin).await);
        sleep(Duration::from_millis(100)).await;
    }
    attack.shutdown().await;
    let worst = probes.iter().map(|(_, t)| *t).max().unwrap_or_default();
    eprintln!(
        "healthz under attack: worst {worst:?} of {probes:?}; client slots held {client_slots:?}; \
         admin connections {admin_slots:?}"
    );
    assert!(
        client_slots.contains(&MAX),
        "the client port was saturated: {client_slots:?}"
    );
    for (status, t) in &probes {
        assert_eq!(*status, Some(200), "probe after {t:?}");
    }
    assert!(worst < Duration::from_millis(500), "{probes:?}");
    p.proxy.begin_shutdown();
}

/// Each admin connection is bounded: a request head (or the next one, on keep-alive) within
/// ADMIN_HEAD_TIMEOUT, ADMIN_MAX_REQUESTS requests, ADMIN_LIFETIME in all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_connections_are_bounded() {
    let _serial = SERIAL.lock().await;
    let p = start_proxy(TestBroker::Embedded, "").await;
    let admin = p.admin;
    let slack = Duration::from_millis(500);
    let start = Instant::now();
    let mut cases = JoinSet::new();

    cases.spawn(async move {
        let mut s = TcpStream::connect(admin).await.expect("connects");
        let closed = closed_within(&mut s, Duration::from_secs(8)).await;
        ("silent", closed.then(|| start.elapsed()), 0)
    });
    cases.spawn(async move {
        let s = TcpStream::connect(admin).await.expect("connects");
        let (mut rx, mut tx) = s.into_split();
        let writer = tokio::spawn(async move {
            let mut ok = tx
                .write_all(b"GET /healthz HTTP/1.1\r\nx-a: ")
                .await
                .is_ok();
            while ok {
                sleep(Duration::from_millis(100)).await;
                ok = tx.write_all(b"a").await.is_ok();
            }
            std::future::pending::<()>().await;
        });
        let mut buf = [0u8; 1024];
        let wait = async { while !matches!(rx.read(&mut buf).await, Ok(0) | Err(_)) {} };
        let closed = tokio::time::timeout(Duration::from_secs(8), wait)
            .await
            .is_ok();
        writer.abort();
        ("slow head", closed.then(|| start.elapsed()), 0)
    });
    cases.spawn(async move {
        let mut s = TcpStream::connect(admin).await.expect("connects");
        let mut answered = 0;
        let mut told_to_close = false;
        while !told_to_close && answered <= ADMIN_MAX_REQUESTS {
            if s.write_all(HEALTHZ).await.is_err() {
                break;
            }
            let Some(r) = read_response(&mut s, Duration::from_secs(2)).await else {
                break;
            };
            answered += 1;
            told_to_close = r.closes();
        }
        let closed = told_to_close && closed_within(&mut s, Duration::from_secs(2)).await;
        (
            "keep-alive, back to back",
            closed.then(|| start.elapsed()),
            answered,
        )
    });
    cases.spawn(async move {
        let mut s = TcpStream::connect(admin).await.expect("connects");
        let mut answered = 0;
        while s.write_all(HEALTHZ).await.is_ok()
            && read_response(&mut s, Duration::from_secs(2))
                .await
                .is_some()
        {
            answered += 1;
            if start.elapsed() > Duration::from_secs(8) {
                return ("keep-alive, a request every 300 ms", None, answered);
            }
            sleep(Duration::from_millis(300)).await;
        }
        (
            "keep-alive, a request every 300 ms",
            Some(start.elapsed()),
            answered,
        )
    });
    let results = cases.join_all().await;
    let released = until(Duration::from_secs(1), || p.proxy.admin_slots_in_use() == 0).await;
    eprintln!(
        "admin connections (closed after, responses): {results:?}; all free after {released:?}"
    );
    for (name, closed, answered) in results {
        let at = closed.unwrap_or_else(|| panic!("{name}: not closed"));
        match name {
            "silent" | "slow head" => assert!(
                at >= ADMIN_HEAD_TIMEOUT - Duration::from_millis(50)
                    && at < ADMIN_HEAD_TIMEOUT + slack,
                "{name}: {at:?}"
            ),
            "keep-alive, back to back" => assert_eq!(answered, ADMIN_MAX_REQUESTS, "{name}"),
            _ => assert!(
                at >= ADMIN_LIFETIME - Duration::from_millis(50) && at < ADMIN_LIFETIME + slack,
                "{name}: {at:?} after {answered} responses"
            ),
        }
    }
    assert!(released.is_some(), "admin slots released");
    // The port still answers.
    assert_eq!(probe(admin).await.0, Some(200));
    p.proxy.begin_shutdown();
}
