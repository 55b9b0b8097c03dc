//! Presence across replicas, through a real broker: several proxies sharing one topic prefix
//! are one deployment. In-process replicas on the embedded broker of one of them and on
//! Mosquitto (join, list, update, leave across replicas; the reconnect grace), and `cuttle`
//! processes on Mosquitto for what needs a real process: SIGKILL (members reported as left
//! within the configured time), a restart under the same replica id (the new incarnation
//! supersedes the old at once), and a late-starting replica converging. Each test prints its
//! measured times.

mod common;

use std::time::{Duration, Instant};

use common::server::*;
use common::*;
use rmpv::Value;

/// Fast timing for tests: heartbeats every 200 ms, a replica dead after 1 s of silence.
const PRESENCE: &str = "presence: { heartbeat_ms: 200, replica_timeout_ms: 1000, grace_ms: 600 }";

fn presence(room: Option<&str>, n: i64) -> Value {
    let mut pairs = vec![
        ("type", Value::from("presence")),
        ("data", map(&[("n", n.into())])),
    ];
    if let Some(r) = room {
        pairs.push(("roomId", r.into()));
    }
    map(&pairs)
}

fn token(sub: &str) -> String {
    hs256(&user_claims(sub))
}

/// The next `presence` event: (event, actor).
async fn event(c: &mut Client) -> (String, String) {
    let f = c.frame_of("presence").await;
    let data = get(&f, "data").expect("data");
    (
        get_str(&f, "event").expect("event").to_string(),
        get_str(data, "actor_token_id").expect("actor").to_string(),
    )
}

fn ev(kind: &str, actor: &str) -> (String, String) {
    (kind.to_string(), actor.to_string())
}

/// Skips events until (kind, actor); panics on a `leave` of anyone else.
async fn until_event(c: &mut Client, kind: &str, actor: &str) {
    loop {
        let (e, a) = event(c).await;
        if e == kind && a == actor {
            return;
        }
        assert_ne!(
            e, "leave",
            "unexpected leave of {a} while waiting for {kind} {actor}"
        );
    }
}

/// Skips events until each of `actors` has left, in any order; panics on a `leave` of anyone
/// else.
async fn until_leaves(c: &mut Client, actors: &[&str]) {
    let mut left: Vec<String> = Vec::new();
    while left.len() < actors.len() {
        let (e, a) = event(c).await;
        if e != "leave" {
            continue;
        }
        assert!(
            actors.contains(&a.as_str()),
            "unexpected leave of {a} while waiting for {actors:?}"
        );
        if !left.contains(&a) {
            left.push(a);
        }
    }
}

/// No `presence` event within `ms`.
async fn no_event_within(c: &mut Client, ms: u64) {
    let deadline = tokio::time::Instant::now() + Duration::from_millis(ms);
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if left.is_zero() {
            return;
        }
        match c.recv_within(left.as_millis() as u64).await {
            Some(Received::Frame(v)) if get_str(&v, "type") == Some("presence") => {
                panic!("unexpected presence event: {v}")
            }
            None => return,
            Some(Received::Closed(c)) => panic!("closed: {c:?}"),
            _ => continue,
        }
    }
}

/// The actors `getPresence {roomId}` lists.
async fn listed(c: &mut Client, room: &str) -> Vec<String> {
    c.send(map(&[
        ("type", "getPresence".into()),
        ("roomId", room.into()),
    ]))
    .await;
    let f = c.frame_of("presenceList").await;
    let Some(Value::Array(entries)) = get(&f, "data") else {
        panic!("no data: {f}")
    };
    let mut actors: Vec<String> = entries
        .iter()
        .map(|e| {
            get_str(e, "actorTokenId")
                .expect("actorTokenId")
                .to_string()
        })
        .collect();
    actors.sort();
    actors
}

/// Polls `getPresence` until it lists `want`; returns how long that took.
async fn until_listed(c: &mut Client, room: &str, want: &[&str], secs: u64) -> Duration {
    let start = Instant::now();
    loop {
        let got = listed(c, room).await;
        if got == want {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < Duration::from_secs(secs),
            "{room} lists {got:?}, not {want:?}, after {secs} s"
        );
        // Within presence.frames_per_second (10).
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
}

async fn replicas_share_presence(embedded: bool) {
    let prefix = unique_prefix();
    let (first_line, second_line);
    let a;
    if embedded {
        a = start_replica("embedded", &prefix, "", PRESENCE, &test_env).await;
        first_line = "embedded".to_string();
        second_line = format!(
            "mqtt://{}",
            a.proxy.embedded_broker.expect("embedded broker")
        );
    } else {
        first_line = mosquitto_url();
        second_line = first_line.clone();
        a = start_replica(&first_line, &prefix, "", PRESENCE, &test_env).await;
    }
    let _ = first_line;
    let mut bob = Client::login(&a.url, &token("bob")).await;
    bob.send(presence(Some("general"), 1)).await;
    assert_eq!(event(&mut bob).await, ev("join", "bob"));
    assert_eq!(event(&mut bob).await, ev("update", "bob"));
    // A replica that starts late converges to the members of the others.
    let started = Instant::now();
    let b = start_replica(&second_line, &prefix, "", PRESENCE, &test_env).await;
    let mut carol = Client::login(&b.url, &token("carol")).await;
    let converged = until_listed(&mut carol, "general", &["bob"], 5).await;
    eprintln!(
        "late replica lists the others' members {} ms after its start ({} ms after ready)",
        started.elapsed().as_millis(),
        converged.as_millis()
    );
    // Events cross replicas, both ways.
    carol.send(presence(Some("general"), 2)).await;
    assert_eq!(event(&mut carol).await, ev("join", "carol"));
    assert_eq!(event(&mut carol).await, ev("update", "carol"));
    let t = Instant::now();
    assert_eq!(event(&mut bob).await, ev("join", "carol"));
    eprintln!("cross-replica join seen in {} ms", t.elapsed().as_millis());
    assert_eq!(event(&mut bob).await, ev("update", "carol"));
    bob.send(presence(Some("general"), 3)).await;
    assert_eq!(event(&mut carol).await, ev("update", "bob"));
    assert_eq!(listed(&mut carol, "general").await, vec!["bob", "carol"]);
    assert_eq!(listed(&mut bob, "general").await, vec!["bob", "carol"]);
    // A third replica: its member is seen on both others.
    let c = start_replica(&second_line, &prefix, "", PRESENCE, &test_env).await;
    let mut dave = Client::login(&c.url, &token("dave")).await;
    until_listed(&mut dave, "general", &["bob", "carol"], 5).await;
    dave.send(presence(Some("general"), 9)).await;
    assert_eq!(event(&mut bob).await, ev("join", "dave"));
    assert_eq!(event(&mut carol).await, ev("join", "dave"));
    dave.ws.close(None).await.unwrap();
    assert_eq!(event(&mut bob).await, ev("update", "dave"));
    assert_eq!(event(&mut bob).await, ev("leave", "dave"));
    assert_eq!(event(&mut carol).await, ev("update", "dave"));
    assert_eq!(event(&mut carol).await, ev("leave", "dave"));
    // One actor on both replicas is one member: bob joins on b too, and leaving a keeps him.
    let mut bob_on_b = Client::login(&b.url, &token("bob")).await;
    bob_on_b.send(presence(Some("general"), 3)).await;
    assert_eq!(event(&mut bob_on_b).await, ev("join", "bob"));
    assert_eq!(event(&mut bob_on_b).await, ev("update", "bob"));
    no_event_within(&mut carol, 300).await;
    bob.ws.close(None).await.unwrap();
    no_event_within(&mut carol, 500).await;
    assert_eq!(listed(&mut carol, "general").await, vec!["bob", "carol"]);
    // A clean close of the last connection leaves at once, on the other replica too.
    let t = Instant::now();
    bob_on_b.ws.close(None).await.unwrap();
    assert_eq!(event(&mut carol).await, ev("leave", "bob"));
    eprintln!(
        "leave after a clean close seen in {} ms",
        t.elapsed().as_millis()
    );
    // Another scope is another namespace, across replicas too.
    let mut acme = Client::login(&a.url, SENSOR1_TOKEN).await;
    acme.send(presence(Some("general"), 4)).await;
    assert_eq!(event(&mut acme).await, ev("join", "sensor-1"));
    no_event_within(&mut carol, 400).await;
    assert_eq!(listed(&mut carol, "general").await, vec!["carol"]);
    let mut acme_on_b = Client::login(&b.url, SENSOR1_TOKEN).await;
    assert_eq!(listed(&mut acme_on_b, "general").await, vec!["sensor-1"]);
}

#[tokio::test]
async fn replicas_share_presence_on_the_embedded_broker_of_one() {
    replicas_share_presence(true).await;
}

#[tokio::test]
async fn replicas_share_presence_on_mosquitto() {
    replicas_share_presence(false).await;
}

#[tokio::test]
async fn a_dropped_connection_lingers_for_the_grace_and_a_reconnect_does_not_flap() {
    let p = start_proxy(TestBroker::Embedded, PRESENCE).await;
    let mut watcher = Client::login(&p.url, &token("carol")).await;
    watcher.send(presence(Some("general"), 0)).await;
    event(&mut watcher).await;
    event(&mut watcher).await;
    let mut bob = Client::login(&p.url, &token("bob")).await;
    bob.send(presence(Some("general"), 1)).await;
    assert_eq!(event(&mut watcher).await, ev("join", "bob"));
    assert_eq!(event(&mut watcher).await, ev("update", "bob"));
    // The network drops (no close frame); the SDK reconnects with reconnect:true and re-sends
    // its presence without roomId: bob is back in general, and nobody saw him leave.
    drop(bob);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (mut bob, _) = Client::auth_reconnect(&p.url, &token("bob")).await;
    bob.send(presence(None, 1)).await;
    assert_eq!(event(&mut bob).await, ev("join", "bob"));
    no_event_within(&mut watcher, 1000).await;
    assert_eq!(listed(&mut watcher, "general").await, vec!["bob", "carol"]);
    // Dropped for good: the leave comes after the grace (600 ms), not before.
    let t = Instant::now();
    drop(bob);
    no_event_within(&mut watcher, 400).await;
    assert_eq!(event(&mut watcher).await, ev("leave", "bob"));
    let waited = t.elapsed();
    eprintln!(
        "leave after an abnormal close: {} ms (grace 600 ms)",
        waited.as_millis()
    );
    assert!(waited >= Duration::from_millis(550), "{waited:?}");
    assert!(waited < Duration::from_millis(1500), "{waited:?}");
}

/// `broker`: a URL, or `embedded:<port>` (this process hosts the broker on that port).
async fn spawn_replica(prefix: &str, id: &str, broker: &str) -> Process {
    spawn_process_replica(prefix, id, broker, &policy_yaml(), "").await
}

#[tokio::test]
async fn killed_replicas_on_mosquitto() {
    killed_replicas(None).await;
}

#[tokio::test]
async fn killed_replicas_on_the_embedded_broker_of_one() {
    killed_replicas(Some(free_port())).await;
}

/// Five `cuttle` processes on Mosquitto, or on the embedded broker of r1 (`embedded`: its port):
/// a network cut (SIGSTOP) and a SIGKILL are reported as leaves in bounded time, a restart
/// under the same id and a late starter converge, a SIGTERM drain announces its departures.
async fn killed_replicas(embedded: Option<u16>) {
    let prefix = unique_prefix();
    let (first, others) = match embedded {
        Some(port) => (
            format!("embedded:{port}"),
            format!("mqtt://127.0.0.1:{port}"),
        ),
        None => (mosquitto_url(), mosquitto_url()),
    };
    let r1 = spawn_replica(&prefix, "r1", &first).await;
    let r2 = spawn_replica(&prefix, "r2", &others).await;
    let mut r3 = spawn_replica(&prefix, "r3", &others).await;
    let mut r5 = spawn_replica(&prefix, "r5", &others).await;
    let mut watcher = Client::login(&r1.url, &token("carol")).await;
    watcher.send(presence(Some("general"), 0)).await;
    event(&mut watcher).await;
    event(&mut watcher).await;
    let mut bob = Client::login(&r2.url, &token("bob")).await;
    bob.send(presence(Some("general"), 1)).await;
    until_event(&mut watcher, "join", "bob").await;
    let mut dave = Client::login(&r3.url, &token("dave")).await;
    dave.send(presence(Some("general"), 2)).await;
    until_event(&mut watcher, "update", "dave").await;
    let mut on_r2 = Client::login(&r2.url, &token("erin")).await;
    until_listed(&mut on_r2, "general", &["bob", "carol", "dave"], 5).await;

    // r3 freezes (SIGSTOP: its sockets stay open, so no will — a network cut): dave is
    // reported as left on r1 once r3 has been silent for the replica timeout (1 s).
    let t = Instant::now();
    let pid = r3.child.id().expect("running") as i32;
    // SAFETY: sending signals to our own child process.
    unsafe { libc_kill(pid, 19) };
    until_event(&mut watcher, "leave", "dave").await;
    let to_leave = t.elapsed();
    eprintln!(
        "network cut (SIGSTOP) → leave on another replica: {} ms (timeout 1000 ms)",
        to_leave.as_millis()
    );
    assert!(
        to_leave >= Duration::from_millis(800),
        "left before the timeout: {to_leave:?}"
    );
    assert!(to_leave < Duration::from_millis(1800), "{to_leave:?}");
    // Then SIGKILL: the broker publishes its will (of the incarnation already gone): no event.
    r3.child.start_kill().expect("kill");
    r3.child.wait().await.expect("reaped");
    no_event_within(&mut watcher, 300).await;
    // A live replica killed: the broker sees its connections close and publishes its last
    // will at once.
    let mut hal = Client::login(&r2.url, &token("hal")).await;
    hal.send(presence(Some("general"), 6)).await;
    until_event(&mut watcher, "join", "hal").await;
    let mut ian = Client::login(&r5.url, &token("ian")).await;
    ian.send(presence(Some("general"), 7)).await;
    until_event(&mut watcher, "join", "ian").await;
    let t = Instant::now();
    r5.child.start_kill().expect("kill");
    until_event(&mut watcher, "leave", "ian").await;
    let to_leave = t.elapsed();
    eprintln!(
        "SIGKILL → leave on another replica: {} ms (by its last will)",
        to_leave.as_millis()
    );
    assert!(to_leave < Duration::from_millis(1800), "{to_leave:?}");
    until_listed(&mut on_r2, "general", &["bob", "carol", "hal"], 3).await;
    drop((dave, ian));

    // r3 restarts under the same id: a new incarnation; its member joins everywhere.
    let r3 = spawn_replica(&prefix, "r3", &others).await;
    let mut frank = Client::login(&r3.url, &token("frank")).await;
    let late = until_listed(&mut frank, "general", &["bob", "carol", "hal"], 5).await;
    eprintln!(
        "restarted replica converged {} ms after ready",
        late.as_millis()
    );
    frank.send(presence(Some("general"), 5)).await;
    until_event(&mut watcher, "join", "frank").await;
    // A fourth replica that starts now converges to everyone.
    let t = Instant::now();
    let r4 = spawn_replica(&prefix, "r4", &others).await;
    let mut gina = Client::login(&r4.url, &token("gina")).await;
    let late = until_listed(&mut gina, "general", &["bob", "carol", "frank", "hal"], 5).await;
    eprintln!(
        "late replica converged {} ms after spawn ({} ms after ready)",
        t.elapsed().as_millis(),
        late.as_millis()
    );
    // A graceful stop (SIGTERM) announces its members' departure at once.
    let t = Instant::now();
    let pid = r2.child.id().expect("running") as i32;
    // SAFETY: sending a signal to our own child process.
    unsafe { libc_kill(pid, 15) };
    // The goodbye's leaves come in no particular order.
    until_leaves(&mut watcher, &["bob", "hal"]).await;
    let drained = t.elapsed();
    eprintln!(
        "SIGTERM → leave on another replica: {} ms",
        drained.as_millis()
    );
    assert!(
        drained < Duration::from_millis(900),
        "a drain is not a timeout: {drained:?}"
    );
    drop((r1, r2, r3, r4, r5));
}

unsafe extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}
