//! Noisy neighbour (issue 8, "one client can never hurt another"): a victim tenant's fan-out
//! latency alone, then while an attacker tenant runs each attack that once hurt every tenant
//! of a replica, then alone again.
//!
//! The victim (scope `acme`) is the fan-out of the main scenarios at a fixed load: N
//! subscribers on `bench/r/t`, publishers stamping every payload, latency in HDR histograms.
//! Its publishes are spread over several sockets so that each stays under the default
//! `limits.publish_per_second`: every limit an attacker can touch is at its default
//! ([`crate::targets::Profile::Noisy`]). The attacker (scope `evil`) uses the same app, rooms
//! and topic names; only the scope the proxy injects separates them, and a victim that ever
//! receives an attacker's message counts it ([`crate::scenario::FOREIGN_PHASE`]).
//!
//! The attacks, as found in issue 8 and fixed since (this measures that they stay fixed):
//! - **restore amplification**: one actor, 4 sockets, `subscribe`/`setFilters` with 100 long
//!   filters in a loop. Each change once re-published the actor's whole retained set;
//!   now control frames are rate-limited (`limits.control_per_second`), restore writes
//!   coalesced (≤ 1/s/actor) and capped (`limits.restore_bytes`).
//! - **unsubscribe flood**: the router preloaded with ~77,000 filters (connections of 1,000
//!   filters each, `limits.filters_per_connection`), then those connections unsubscribe topics
//!   they never subscribed as fast as they can (once O(all filters) under one lock).
//! - **slow consumer**: subscribers that never read, ~900 KB messages published to them at
//!   the per-socket rate limit; they reconnect after being closed (`limits.send_queue_bytes`).
//! - **keep-alive slots**: more HTTP/1.1 keep-alive clients than `limits.max_connections`
//!   sending `GET /nope` over and over (now one request per connection, `connection: close`).
//!
//! The attacker runs on its own thread and single-threaded runtime at nice 10: on this
//! 2-core machine it shares the CPU with the proxy and the victim's clients, and a real
//! attacker's load would come from elsewhere. At a lower priority it still sends as much as
//! the machine has left (its rates are in the figures), but it cannot starve the measuring
//! clients in the tool's own scheduler nor take the CPU the proxy needs to defend itself.
//!
//! Containment figures per phase: what the attacker sent and what it got back (error frames,
//! closes, one response per connection), the proxy's RSS growth, the bytes between the
//! proxy's pool and the broker (`ss`), and how long a new victim connection took meanwhile.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow, bail};
use futures_util::{SinkExt, StreamExt};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::Message;

use crate::scenario::{
    self, CpuMeter, FOREIGN_PHASE, Plan, Record, Shared, connect_many, print_record,
};
use crate::sys;
use crate::targets::{Running, noisy_tokens};
use crate::wire::{self, Client, Endpoint, Payload, STEP_TIMEOUT, nolag};

/// How big the victim and the attacks are.
#[derive(Debug, Clone)]
pub struct Shape {
    /// Victim subscribers.
    pub victims: usize,
    pub payload: usize,
    /// Victim publishes per second, all its publishers together.
    pub rate: f64,
    /// Victim publisher sockets (each under the default 50 publishes/s).
    pub publishers: usize,
    pub duration: Duration,
    /// How long an attack runs before the victim's phase starts.
    pub warmup: Duration,
    /// Pause after an attack stopped (the unsubscribe flood's 77,000 filters leave the broker
    /// `upstream.unsubscribe_delay_ms` later).
    pub settle: Duration,
    pub restore_sockets: usize,
    pub flood_connections: usize,
    pub slow_consumers: usize,
    /// The slow consumers' publisher: messages per second (under the default 50/s).
    pub slow_rate: f64,
    pub slow_bytes: usize,
    /// How long a slow consumer holds its socket unread before looking whether it was closed.
    pub slow_hold: Duration,
    pub keepalive_clients: usize,
    /// Measure the victim alone once more at the end.
    pub again: bool,
    /// The attacks to run, in this order.
    pub attacks: Vec<Attack>,
}

impl Shape {
    pub fn full(duration: Duration) -> Self {
        Shape {
            victims: 100,
            payload: 1024,
            rate: 100.0,
            publishers: 4,
            duration,
            warmup: Duration::from_secs(1),
            settle: Duration::from_secs(4),
            restore_sockets: 4,
            flood_connections: 77,
            slow_consumers: 8,
            slow_rate: 40.0,
            slow_bytes: 900_000,
            slow_hold: Duration::from_secs(1),
            keepalive_clients: crate::targets::NOISY_MAX_CONNECTIONS,
            again: true,
            attacks: Attack::ALL.to_vec(),
        }
    }

    /// Seconds in all: CI keeps it compiling and working, nothing more.
    pub fn smoke() -> Self {
        Shape {
            victims: 20,
            rate: 40.0,
            duration: Duration::from_millis(800),
            warmup: Duration::from_millis(200),
            settle: Duration::from_millis(200),
            flood_connections: 2,
            slow_consumers: 2,
            slow_rate: 20.0,
            slow_hold: Duration::from_millis(300),
            keepalive_clients: 50,
            again: false,
            ..Shape::full(Duration::from_secs(1))
        }
    }
}

/// The attacks, in the order they run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attack {
    Restore,
    Unsubscribe,
    SlowConsumer,
    KeepAlive,
}

impl Attack {
    const ALL: [Attack; 4] = [
        Attack::Restore,
        Attack::Unsubscribe,
        Attack::SlowConsumer,
        Attack::KeepAlive,
    ];

    /// The attacks named in `names`, in the canonical order; all of them for an empty list.
    pub fn parse_list(names: &[String]) -> Result<Vec<Attack>> {
        if let Some(bad) = names
            .iter()
            .find(|n| !Attack::ALL.iter().any(|a| a.name() == n.as_str()))
        {
            bail!("unknown attack `{bad}`");
        }
        Ok(Attack::ALL
            .into_iter()
            .filter(|a| names.is_empty() || names.iter().any(|n| n == a.name()))
            .collect())
    }

    pub fn name(self) -> &'static str {
        match self {
            Attack::Restore => "restore-amplification",
            Attack::Unsubscribe => "unsubscribe-flood",
            Attack::SlowConsumer => "slow-consumer",
            Attack::KeepAlive => "keepalive-slots",
        }
    }
}

/// Phase names (the records' `mode`): the victim alone, under each attack, alone again.
pub const ALONE: &str = "alone";
pub const ALONE_AGAIN: &str = "alone-again";

/// What one phase measured besides the victim's latency.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Figures {
    /// Frames (or HTTP requests, or messages) the attacker sent per second in the phase.
    pub attacker_sent_per_s: f64,
    /// `rate_limit_exceeded` error frames the attacker got.
    pub rate_limited: u64,
    /// Other error frames (`too_many_subscriptions`, …), by `error` and hint-less.
    pub refused: BTreeMap<String, u64>,
    /// Replies that did what was asked (`subscribed`, `filtersUpdated`, `unsubscribed`,
    /// HTTP responses).
    pub accepted: u64,
    /// Connections the proxy closed, by close code (0: no close frame, the socket ended).
    pub closed: BTreeMap<u16, u64>,
    /// Slow consumers found still open after their hold.
    pub survived: u64,
    pub attacker_connections: u64,
    /// Upstream filters the attacker held while it flooded (unsubscribe flood).
    pub preloaded_filters: u64,
    /// Keep-alive: most responses one connection got, and responses without
    /// `connection: close`.
    pub max_responses_per_connection: u64,
    pub kept_alive: u64,
    /// Proxy RSS: most during the phase minus just before the attack proper, MiB.
    pub rss_growth_mib: f64,
    /// Proxy RSS the attack's setup added (connections, preloaded filters), MiB.
    #[serde(default)]
    pub setup_rss_mib: f64,
    /// Pool ↔ broker traffic during the phase, KiB/s.
    pub to_broker_kib_s: Option<f64>,
    pub from_broker_kib_s: Option<f64>,
    /// New victim connections (connect + auth + subscribe) made during the phase.
    pub probes: u64,
    pub probe_failures: u64,
    pub probe_max_ms: Option<f64>,
    /// Attacker messages delivered to the victim (must be 0).
    pub foreign: u64,
}

/// Counters the attacker's tasks bump.
#[derive(Debug, Default)]
struct Tally {
    sent: AtomicU64,
    rate_limited: AtomicU64,
    refused: Mutex<BTreeMap<String, u64>>,
    accepted: AtomicU64,
    closed: Mutex<BTreeMap<u16, u64>>,
    survived: AtomicU64,
    connections: AtomicU64,
    preloaded: AtomicU64,
    max_per_conn: AtomicU64,
    kept_alive: AtomicU64,
}

impl Tally {
    fn inc(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }

    fn close(&self, code: u16) {
        *self.closed.lock().entry(code).or_default() += 1;
    }

    /// Counts one frame the proxy sent to an attacker connection.
    fn reply(&self, frame: &[u8]) {
        match wire::frame_kind(frame) {
            Some((kind, error)) if kind == "error" => {
                let error = error.unwrap_or_default();
                if error == "rate_limit_exceeded" {
                    Self::inc(&self.rate_limited);
                } else {
                    *self.refused.lock().entry(error).or_default() += 1;
                }
            }
            Some((kind, _))
                if matches!(
                    kind.as_str(),
                    "subscribed" | "filtersUpdated" | "unsubscribed"
                ) =>
            {
                Self::inc(&self.accepted)
            }
            _ => {}
        }
    }
}

/// A running attack: its thread, the stop signal and its counters.
struct Attacker {
    stop: watch::Sender<bool>,
    thread: std::thread::JoinHandle<()>,
    tally: Arc<Tally>,
}

/// Starts `attack` on its own thread; returns once its setup (connections, preloaded
/// filters) is done and the attack proper is running.
async fn launch(attack: Attack, ep: Endpoint, shape: Shape) -> Result<Attacker> {
    let (stop, stopped) = watch::channel(false);
    let (ready_tx, ready) = oneshot::channel::<Result<()>>();
    let tally = Arc::new(Tally::default());
    let t = Arc::clone(&tally);
    let thread = std::thread::Builder::new()
        .name(format!("attack-{}", attack.name()))
        .spawn(move || {
            sys::nice_this_thread(10);
            match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt.block_on(attack_main(attack, ep, shape, t, stopped, ready_tx)),
                Err(e) => {
                    let _ = ready_tx.send(Err(e.into()));
                }
            }
        })?;
    let attacker = Attacker {
        stop,
        thread,
        tally,
    };
    // The unsubscribe flood's preload subscribes ~77,000 filters at the broker first.
    match tokio::time::timeout(Duration::from_secs(180), ready).await {
        Ok(Ok(Ok(()))) => Ok(attacker),
        Ok(Ok(Err(e))) => {
            attacker.finish().await;
            Err(e.context(format!("{} setup", attack.name())))
        }
        _ => {
            attacker.finish().await;
            bail!("{} setup did not finish", attack.name())
        }
    }
}

impl Attacker {
    /// Stops the attack and waits for its thread (its sockets close with its runtime).
    async fn finish(self) {
        let _ = self.stop.send(true);
        let thread = self.thread;
        let _ = tokio::task::spawn_blocking(move || thread.join()).await;
    }
}

async fn attack_main(
    attack: Attack,
    ep: Endpoint,
    shape: Shape,
    tally: Arc<Tally>,
    mut stopped: watch::Receiver<bool>,
    ready: oneshot::Sender<Result<()>>,
) {
    let mut tasks = JoinSet::new();
    let setup = match attack {
        Attack::Restore => restore_attack(&ep, &shape, &tally, &mut tasks),
        Attack::Unsubscribe => unsubscribe_attack(&ep, &shape, &tally, &mut tasks).await,
        Attack::SlowConsumer => slow_consumer_attack(&ep, &shape, &tally, &mut tasks),
        Attack::KeepAlive => keepalive_attack(&ep, &shape, &tally, &mut tasks),
    };
    let failed = setup.is_err();
    let _ = ready.send(setup);
    if !failed {
        let _ = stopped.wait_for(|s| *s).await;
    }
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
}

/// Reconnects with a short pause whenever `conn` ends (the proxy closed it, or it failed).
async fn forever<F, Fut>(conn: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Result<()>>,
{
    loop {
        let _ = conn().await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Counts everything the proxy sends on an attacker connection until it ends.
async fn count_replies<S>(mut stream: S, tally: Arc<Tally>)
where
    S: futures_util::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    while let Some(msg) = stream.next().await {
        match msg {
            Ok(Message::Binary(b)) => tally.reply(&b),
            Ok(Message::Close(c)) => {
                tally.close(c.map_or(0, |c| u16::from(c.code)));
                return;
            }
            Ok(_) => {}
            Err(_) => break,
        }
    }
    tally.close(0);
}

/// `n` sub-topic filter values of `len` digits, distinct per `seed`.
fn long_filters(seed: u64, n: usize, len: usize) -> Vec<String> {
    (0..n as u64)
        .map(|j| format!("{:0>len$}", seed * 1000 + j))
        .collect()
}

/// One actor (attacker token 0), `restore_sockets` sockets, each sending `subscribe` and
/// `setFilters` with 100 filters of 96 bytes as fast as its socket takes them.
fn restore_attack(
    ep: &Endpoint,
    shape: &Shape,
    tally: &Arc<Tally>,
    tasks: &mut JoinSet<()>,
) -> Result<()> {
    for socket in 0..shape.restore_sockets {
        let (ep, tally) = (ep.clone(), Arc::clone(tally));
        tasks.spawn(forever(move || {
            let (ep, tally) = (ep.clone(), Arc::clone(&tally));
            async move {
                let client = Client::connect(&ep, 0).await?;
                Tally::inc(&tally.connections);
                let (mut sink, stream) = client.into_ws()?.split();
                let reader = tokio::spawn(count_replies(stream, Arc::clone(&tally)));
                let mut seed = socket as u64 * 1_000_000;
                let result: Result<()> = async {
                    loop {
                        seed += 1;
                        let topic = format!("bench/a{}/t", seed % 8);
                        let filters = long_filters(seed, 100, 96);
                        let frame = if seed % 2 == 0 {
                            nolag::subscribe(&topic, &filters)
                        } else {
                            nolag::set_filters(&topic, &filters)
                        };
                        sink.feed(Message::Binary(frame)).await?;
                        Tally::inc(&tally.sent);
                        if seed % 8 == 0 {
                            sink.flush().await?;
                        }
                    }
                }
                .await;
                reader.abort();
                result
            }
        }));
    }
    Ok(())
}

/// Preloads the router with `flood_connections` × 1,000 distinct filters (10 subscriptions
/// of 100 filters per connection), then every one of those connections unsubscribes topics
/// it never subscribed, as fast as its socket takes the frames.
async fn unsubscribe_attack(
    ep: &Endpoint,
    shape: &Shape,
    tally: &Arc<Tally>,
    tasks: &mut JoinSet<()>,
) -> Result<()> {
    const SUBS: usize = 10;
    let preloaded: Vec<Result<_>> = futures_util::stream::iter(0..shape.flood_connections)
        .map(|c| {
            let (ep, tally) = (ep.clone(), Arc::clone(tally));
            async move {
                let client = Client::connect(&ep, c).await?;
                Tally::inc(&tally.connections);
                let mut ws = client.into_ws()?;
                for s in 0..SUBS {
                    let filters: Vec<String> = (0..100).map(|j| format!("c{c}s{s}f{j}")).collect();
                    ws.feed(Message::Binary(nolag::subscribe(
                        &format!("bench/a{s}/t"),
                        &filters,
                    )))
                    .await?;
                }
                ws.flush().await?;
                let mut answered = 0;
                tokio::time::timeout(Duration::from_secs(60), async {
                    while answered < SUBS {
                        match ws.next().await {
                            Some(Ok(Message::Binary(b))) => match wire::frame_kind(&b) {
                                Some((k, _)) if k == "subscribed" => {
                                    tally.preloaded.fetch_add(100, Ordering::Relaxed);
                                    answered += 1;
                                }
                                Some((k, e)) if k == "error" => {
                                    bail!("preload refused: {}", e.unwrap_or_default())
                                }
                                _ => {}
                            },
                            Some(Ok(_)) => {}
                            _ => bail!("closed during the preload"),
                        }
                    }
                    Ok(())
                })
                .await
                .map_err(|_| {
                    anyhow!("preload timed out: {answered} of {SUBS} subscriptions confirmed")
                })??;
                anyhow::Ok(ws)
            }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    let mut sockets = Vec::with_capacity(preloaded.len());
    for p in preloaded {
        sockets.push(p?);
    }
    for (c, ws) in sockets.into_iter().enumerate() {
        let tally = Arc::clone(tally);
        tasks.spawn(async move {
            let (mut sink, stream) = ws.split();
            let reader = tokio::spawn(count_replies(stream, Arc::clone(&tally)));
            let mut n = 0u64;
            loop {
                n += 1;
                let frame = nolag::unsubscribe(&format!("bench/never{c}x{n}/t"));
                if sink.feed(Message::Binary(frame)).await.is_err() {
                    break;
                }
                Tally::inc(&tally.sent);
                if n % 32 == 0 && sink.flush().await.is_err() {
                    break;
                }
            }
            reader.abort();
        });
    }
    Ok(())
}

/// `slow_consumers` subscribers that never read their socket and one publisher sending
/// `slow_bytes` messages to their topic at `slow_rate`. Each subscriber holds its socket
/// for `slow_hold`, then reads what is there to see whether the proxy closed it, and
/// reconnects.
fn slow_consumer_attack(
    ep: &Endpoint,
    shape: &Shape,
    tally: &Arc<Tally>,
    tasks: &mut JoinSet<()>,
) -> Result<()> {
    for k in 0..shape.slow_consumers {
        let (ep, tally, hold) = (ep.clone(), Arc::clone(tally), shape.slow_hold);
        tasks.spawn(forever(move || {
            let (ep, tally) = (ep.clone(), Arc::clone(&tally));
            async move {
                let mut client = Client::connect(&ep, 1 + k).await?;
                client.subscribe(false).await?;
                Tally::inc(&tally.connections);
                let mut ws = client.into_ws()?;
                tokio::time::sleep(hold).await;
                let looked = tokio::time::timeout(Duration::from_millis(500), async {
                    while let Some(msg) = ws.next().await {
                        match msg {
                            Ok(Message::Close(c)) => {
                                return Some(c.map_or(0, |c| u16::from(c.code)));
                            }
                            Ok(_) => {}
                            Err(_) => return Some(0),
                        }
                    }
                    Some(0)
                })
                .await;
                match looked {
                    Ok(Some(code)) => tally.close(code),
                    _ => Tally::inc(&tally.survived),
                }
                Ok(())
            }
        }));
    }
    let (ep, tally, rate, size) = (
        ep.clone(),
        Arc::clone(tally),
        shape.slow_rate,
        shape.slow_bytes,
    );
    tasks.spawn(forever(move || {
        let (ep, tally) = (ep.clone(), Arc::clone(&tally));
        async move {
            let mut publisher = Client::connect(&ep, 0).await?;
            let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut buf = Vec::with_capacity(size);
            loop {
                ticker.tick().await;
                Payload::stamp(&mut buf, size, FOREIGN_PHASE);
                publisher.publish(&buf).await?;
                Tally::inc(&tally.sent);
            }
        }
    }));
    Ok(())
}

/// `keepalive_clients` HTTP/1.1 clients, each sending `GET /nope` on its connection again
/// after every response, reconnecting when the proxy closes it.
fn keepalive_attack(
    ep: &Endpoint,
    shape: &Shape,
    tally: &Arc<Tally>,
    tasks: &mut JoinSet<()>,
) -> Result<()> {
    for i in 0..shape.keepalive_clients {
        let (ep, tally) = (ep.clone(), Arc::clone(tally));
        tasks.spawn(forever(move || {
            let (ep, tally) = (ep.clone(), Arc::clone(&tally));
            async move {
                let mut tcp = wire::tcp_connect(&ep, i).await?;
                Tally::inc(&tally.connections);
                let mut responses = 0u64;
                let mut buf = Vec::with_capacity(1024);
                let result: Result<()> = async {
                    loop {
                        tcp.write_all(b"GET /nope HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
                            .await?;
                        Tally::inc(&tally.sent);
                        let head =
                            tokio::time::timeout(STEP_TIMEOUT, read_response(&mut tcp, &mut buf))
                                .await
                                .map_err(|_| anyhow!("no response"))??;
                        responses += 1;
                        Tally::inc(&tally.accepted);
                        if !head.contains("connection: close") {
                            Tally::inc(&tally.kept_alive);
                        }
                    }
                }
                .await;
                tally.max_per_conn.fetch_max(responses, Ordering::Relaxed);
                result
            }
        }));
    }
    Ok(())
}

/// Reads one HTTP response (head and `content-length` body) from `tcp`; returns the head,
/// lowercased. `buf` keeps what was read past it.
async fn read_response(tcp: &mut tokio::net::TcpStream, buf: &mut Vec<u8>) -> Result<String> {
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let body: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            while buf.len() < end + 4 + body {
                if tcp.read_buf(buf).await? == 0 {
                    bail!("closed inside a response body");
                }
            }
            buf.drain(..end + 4 + body);
            return Ok(head);
        }
        if buf.len() > 64 << 10 {
            bail!("response head too long");
        }
        if tcp.read_buf(buf).await? == 0 {
            bail!("closed");
        }
    }
}

/// New victim connections, one every 200 ms, timed (connect + auth + subscribe + close).
async fn probe_loop(ep: Endpoint, first: usize, times: Arc<Mutex<(u64, u64, f64)>>) {
    let mut i = first;
    loop {
        let started = Instant::now();
        let ok = tokio::time::timeout(STEP_TIMEOUT, async {
            let mut c = Client::connect(&ep, i).await?;
            c.subscribe(false).await?;
            c.close().await;
            anyhow::Ok(())
        })
        .await;
        let ms = started.elapsed().as_secs_f64() * 1000.0;
        {
            let mut t = times.lock();
            match ok {
                Ok(Ok(())) => {
                    t.0 += 1;
                    t.2 = t.2.max(ms);
                }
                _ => t.1 += 1,
            }
        }
        i += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The victim's fixed-rate fan-out for `duration`: each publisher at its share of the rate.
async fn victim_phase(
    publishers: Vec<Client>,
    shared: &Shared,
    subscribers: usize,
    shape: &Shape,
) -> Result<(Record, Vec<Client>)> {
    let run = scenario::fixed_rate_phase(
        publishers,
        shared,
        subscribers,
        shape.rate,
        shape.payload,
        tokio::time::sleep(shape.duration),
    )
    .await?;
    Ok((run.record, run.publishers))
}

/// The noisy-neighbour scenario against one (noisy-profile) cuttle target.
pub async fn run(running: &Running, plan: &Plan, out: &mut Vec<Record>) -> Result<()> {
    let shape = &plan.noisy;
    let ep = &running.endpoint;
    let mut attacker_ep = ep.clone();
    attacker_ep.tokens = noisy_tokens(true);
    // Up to 1,000 keep-alive clients reconnecting: spread them over source addresses.
    attacker_ep.source_addresses = 8;

    let shared = Shared::new()?;
    let (publishers, failed_pub) =
        connect_many(ep, 0, shape.publishers, 4, |c| async move { Ok(c) }).await;
    if publishers.is_empty() {
        bail!("no victim publisher could connect");
    }
    let (clients, failed_sub) = connect_many(
        ep,
        shape.publishers,
        shape.victims,
        plan.ramp_concurrency,
        |mut c| async move {
            c.subscribe(false).await?;
            Ok(c)
        },
    )
    .await;
    let subscribers = clients.len();
    let mut tasks = JoinSet::new();
    for (i, client) in clients.into_iter().enumerate() {
        tasks.spawn(scenario::subscriber_loop(i, client, Arc::clone(&shared)));
    }
    eprintln!(
        "  noisy: victim {subscribers} subscribers, {} publishers, {} B at {} publishes/s",
        publishers.len(),
        shape.payload,
        shape.rate
    );
    tokio::time::sleep(plan.settle).await;
    let mut warm = shape.clone();
    warm.duration = Duration::from_millis(500);
    let (_, mut publishers) = victim_phase(publishers, &shared, subscribers, &warm).await?;

    let mut phases: Vec<Option<Attack>> = vec![None];
    phases.extend(shape.attacks.iter().copied().map(Some));
    if shape.again {
        phases.push(None);
    }
    let mut probe_index = shape.publishers + shape.victims;
    for (i, attack) in phases.into_iter().enumerate() {
        let mode = match attack {
            Some(a) => a.name(),
            None if i == 0 => ALONE,
            None => ALONE_AGAIN,
        };
        let rss_setup = running.server_rss()?;
        let attacker = match attack {
            Some(a) => match launch(a, attacker_ep.clone(), shape.clone()).await {
                Ok(att) => Some(att),
                Err(e) => {
                    // The gap shows in the report; the other attacks still run.
                    eprintln!("    noisy {mode}: {e:#}");
                    let mut rec =
                        scenario::base_record(running, "noisy", subscribers, shape.payload, mode);
                    rec.errors = 1;
                    out.push(rec);
                    continue;
                }
            },
            None => None,
        };
        // Growth is counted from here: what the setup holds (the unsubscribe flood's 77,000
        // filters) is reported apart.
        let rss_before = running.server_rss()?;
        if attacker.is_some() {
            tokio::time::sleep(shape.warmup).await;
        }
        let tally_at =
            |a: &Option<Attacker>| a.as_ref().map(|a| a.tally.sent.load(Ordering::Relaxed));
        let sent_before = tally_at(&attacker);
        let foreign_before = shared.foreign.load(Ordering::Relaxed);
        let disconnected_before = shared.disconnected.load(Ordering::Relaxed);
        let traffic_before = running.broker_port.and_then(sys::broker_traffic);
        let cpu = CpuMeter::start(running.server_pid);
        let rss_max = Arc::new(AtomicU64::new(rss_before));
        let sampler = {
            let (rss_max, pid) = (Arc::clone(&rss_max), running.server_pid);
            tokio::spawn(async move {
                loop {
                    if let Ok(rss) = sys::rss_bytes(pid) {
                        rss_max.fetch_max(rss, Ordering::Relaxed);
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            })
        };
        let probes = Arc::new(Mutex::new((0u64, 0u64, 0f64)));
        let prober = tokio::spawn(probe_loop(ep.clone(), probe_index, Arc::clone(&probes)));
        let measured = Instant::now();

        let (mut rec, back) = victim_phase(publishers, &shared, subscribers, shape).await?;
        publishers = back;

        let window = measured.elapsed().as_secs_f64().max(1e-3);
        prober.abort();
        sampler.abort();
        let cores = cpu.cores();
        let traffic_after = running.broker_port.and_then(sys::broker_traffic);
        let sent_after = tally_at(&attacker);
        if let Ok(rss) = running.server_rss() {
            rss_max.fetch_max(rss, Ordering::Relaxed);
        }
        let (probe_ok, probe_failed, probe_max) = *probes.lock();
        probe_index += (probe_ok + probe_failed) as usize + 1;
        let mut fig = Figures {
            setup_rss_mib: rss_before.saturating_sub(rss_setup) as f64 / (1 << 20) as f64,
            rss_growth_mib: rss_max.load(Ordering::Relaxed).saturating_sub(rss_before) as f64
                / (1 << 20) as f64,
            probes: probe_ok,
            probe_failures: probe_failed,
            probe_max_ms: (probe_ok > 0).then_some(probe_max),
            foreign: shared.foreign.load(Ordering::Relaxed) - foreign_before,
            ..Figures::default()
        };
        if let (Some((rx0, tx0)), Some((rx1, tx1))) = (traffic_before, traffic_after) {
            fig.to_broker_kib_s = Some(rx1.saturating_sub(rx0) as f64 / 1024.0 / window);
            fig.from_broker_kib_s = Some(tx1.saturating_sub(tx0) as f64 / 1024.0 / window);
        }
        if let Some(att) = attacker {
            if let (Some(a), Some(b)) = (sent_before, sent_after) {
                fig.attacker_sent_per_s = b.saturating_sub(a) as f64 / window;
            }
            let t = Arc::clone(&att.tally);
            att.finish().await;
            fig.rate_limited = t.rate_limited.load(Ordering::Relaxed);
            fig.refused = t.refused.lock().clone();
            fig.accepted = t.accepted.load(Ordering::Relaxed);
            fig.closed = t.closed.lock().clone();
            fig.survived = t.survived.load(Ordering::Relaxed);
            fig.attacker_connections = t.connections.load(Ordering::Relaxed);
            fig.preloaded_filters = t.preloaded.load(Ordering::Relaxed);
            fig.max_responses_per_connection = t.max_per_conn.load(Ordering::Relaxed);
            fig.kept_alive = t.kept_alive.load(Ordering::Relaxed);
        }
        rec.target = running.target.name().into();
        rec.scenario = "noisy".into();
        rec.n = subscribers;
        rec.payload = shape.payload;
        rec.mode = mode.into();
        rec.server_cores = cores;
        rec.rss_mib = Some(rss_max.load(Ordering::Relaxed) as f64 / (1 << 20) as f64);
        rec.errors += failed_pub
            + failed_sub
            + (shared.disconnected.load(Ordering::Relaxed) - disconnected_before);
        print_record(&rec);
        eprintln!("      {}", describe(&rec, &fig));
        rec.noisy = Some(fig);
        out.push(rec);
        tokio::time::sleep(if attack.is_some() {
            shape.settle
        } else {
            plan.settle
        })
        .await;
    }
    tasks.abort_all();
    for p in publishers {
        p.close().await;
    }
    Ok(())
}

/// One line of a phase's containment figures, for the log.
fn describe(rec: &Record, f: &Figures) -> String {
    format!(
        "{}: attacker sent {:.0}/s, accepted {}, rate-limited {}, refused {:?}, closed {:?}, survived {}, conns {}, preloaded {}, max resp/conn {}, kept-alive {}; proxy RSS +{:.1} MiB (setup +{:.1}); broker ← {:?} KiB/s → {:?} KiB/s; probes {} (failed {}, max {:?} ms); foreign {}",
        rec.mode,
        f.attacker_sent_per_s,
        f.accepted,
        f.rate_limited,
        f.refused,
        f.closed,
        f.survived,
        f.attacker_connections,
        f.preloaded_filters,
        f.max_responses_per_connection,
        f.kept_alive,
        f.rss_growth_mib,
        f.setup_rss_mib,
        f.to_broker_kib_s.map(|v| v.round()),
        f.from_broker_kib_s.map(|v| v.round()),
        f.probes,
        f.probe_failures,
        f.probe_max_ms.map(|v| (v * 10.0).round() / 10.0),
        f.foreign,
    )
}
