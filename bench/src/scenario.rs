//! The scenarios: fan-out, fan-in, idle connections and connect rate, each producing
//! [`Record`]s.
//!
//! Throughput is measured closed-loop with a window: a publisher may have at most `window`
//! deliveries outstanding (published × subscribers − delivered), so the figure is the rate a
//! system sustains without shedding messages rather than how fast it can fill its queues and
//! drop. Every system gets the same window. The fixed-rate mode publishes open-loop at a rate
//! that makes `fixed_rate` deliveries per second in total, for latency at a known load.
//!
//! Latency is publisher send → subscriber receive, both in this process on one monotonic
//! clock, recorded in HDR histograms (ns, 3 significant digits). Each measurement is a
//! *phase* whose id is in every payload, so stragglers from an earlier phase are not counted.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use arc_swap::ArcSwap;
use futures_util::StreamExt;
use hdrhistogram::Histogram;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::targets::{Profile, Running, Target};
use crate::wire::{Client, Endpoint, Payload, STEP_TIMEOUT};
use crate::{sys, tls};

/// How a run is shaped.
#[derive(Debug, Clone)]
pub struct Plan {
    pub fanout_n: Vec<usize>,
    pub fanin_n: Vec<usize>,
    pub idle_n: Vec<usize>,
    pub payloads: Vec<usize>,
    /// QoS levels of the fan-out and fan-in phases (0, 1); QoS 1 only where the protocol
    /// has it ([`crate::wire::Protocol::has_qos1`]).
    pub qos: Vec<u8>,
    /// The rooms scenario's shape.
    pub rooms: crate::rooms::RoomsShape,
    /// The churn scenario's shape.
    pub churn: crate::rooms::ChurnShape,
    /// Length of each measured phase.
    pub duration: Duration,
    /// Deliveries per second in the fixed-rate mode.
    pub fixed_rate: u64,
    /// Outstanding deliveries allowed per subscriber (fan-out) in the max-rate mode.
    pub window_per_subscriber: u32,
    /// Outstanding deliveries allowed in total in fan-in.
    pub fanin_window: u32,
    /// Concurrent clients in the connect scenario.
    pub connect_concurrency: usize,
    /// The noisy-neighbour scenario's victim and attacks.
    pub noisy: crate::noisy::Shape,
    /// The presence scenario's storms and bystander.
    pub presence: crate::presence::Shape,
    /// Concurrent connection attempts while building up N clients.
    pub ramp_concurrency: usize,
    /// Time to let a server settle before reading its RSS.
    pub settle: Duration,
}

/// One measured figure set: a row of the results.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct Record {
    pub target: String,
    pub scenario: String,
    /// Client count (subscribers for fan-out, publishers for fan-in, connections for idle,
    /// concurrency for connect).
    pub n: usize,
    pub payload: usize,
    /// `max` or `fixed` (throughput phases; `max-qos1`, `fixed-qos1` at QoS 1), `plain` or
    /// `tls` (connect), `idle`, `chat`/`busy` (rooms), `alone`/`churn` (churn).
    pub mode: String,
    /// QoS of the publishes and subscriptions (0 where the scenario has none).
    #[serde(default)]
    pub qos: u8,
    pub published_per_s: Option<f64>,
    pub delivered_per_s: Option<f64>,
    pub p50_us: Option<f64>,
    pub p99_us: Option<f64>,
    pub p999_us: Option<f64>,
    pub max_us: Option<f64>,
    /// Deliveries that never arrived (the drain waits while any are still arriving).
    pub lost: Option<u64>,
    /// Clients that failed to connect or were disconnected.
    pub errors: u64,
    pub rss_per_conn_kib: Option<f64>,
    pub rss_mib: Option<f64>,
    pub broker_connections: Option<usize>,
    pub connects_per_s: Option<f64>,
    /// Server CPU time over wall time during the phase (1.0 = one core busy).
    pub server_cores: Option<f64>,
    /// Noisy neighbour: what the attacker did and got during the victim's phase.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub noisy: Option<crate::noisy::Figures>,
    /// Presence: convergence, broker traffic and what the members got in one storm.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub presence: Option<crate::presence::Figures>,
    /// Webhooks: events the slow receiver got during the scenario (over all its phases).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook_events: Option<u64>,
    /// Churn: subscribe + unsubscribe operations completed per second during the phase.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub churn_per_s: Option<f64>,
    /// Churn: p99 of one subscribe or unsubscribe round trip (request → acknowledgement).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub churn_p99_us: Option<f64>,
}

/// The throughput-phase mode label: `max`/`fixed` at QoS 0 (the labels of earlier runs),
/// `max-qos1`/`fixed-qos1` at QoS 1.
pub fn throughput_mode(fixed: bool, qos: u8) -> String {
    qos_mode(if fixed { "fixed" } else { "max" }, qos)
}

/// A phase's mode label at `qos`: `base` at QoS 0, `base-qos1` at QoS 1.
pub fn qos_mode(base: &str, qos: u8) -> String {
    if qos == 0 {
        base.to_string()
    } else {
        format!("{base}-qos{qos}")
    }
}

/// The QoS levels of `plan` that `running`'s protocol has.
pub(crate) fn qos_levels(running: &Running, plan: &Plan) -> Vec<u8> {
    let has_qos1 = running.endpoint.protocol.has_qos1();
    plan.qos
        .iter()
        .copied()
        .filter(|&q| q == 0 || has_qos1)
        .collect()
}

/// The QoS subscribers take so that every level of `plan` reaches them as published (MQTT
/// delivers at the lower of the publish and subscription QoS).
pub(crate) fn subscriber_qos(running: &Running, plan: &Plan) -> u8 {
    qos_levels(running, plan).into_iter().max().unwrap_or(0)
}

const SHARDS: usize = 16;

/// The phase id of payloads no measurement owns: the noisy-neighbour attacker stamps its
/// messages with it, so a victim that ever receives one counts it (see [`Shared::foreign`]).
pub const FOREIGN_PHASE: u32 = u32::MAX;

/// One measurement's shared state.
pub(crate) struct Phase {
    pub(crate) id: u32,
    window: Arc<Semaphore>,
    histograms: Vec<Mutex<Histogram<u64>>>,
    pub(crate) delivered: AtomicU64,
}

impl Phase {
    fn new(id: u32, window: usize) -> Result<Arc<Phase>> {
        let mut histograms = Vec::with_capacity(SHARDS);
        for _ in 0..SHARDS {
            // 1 µs .. 60 s in ns, 3 significant digits.
            histograms.push(Mutex::new(Histogram::new_with_bounds(
                1_000,
                60_000_000_000,
                3,
            )?));
        }
        Ok(Arc::new(Phase {
            id,
            window: Arc::new(Semaphore::new(window.min(Semaphore::MAX_PERMITS))),
            histograms,
            delivered: AtomicU64::new(0),
        }))
    }

    pub(crate) fn merged(&self) -> Result<Histogram<u64>> {
        let mut total = Histogram::new_with_bounds(1_000, 60_000_000_000, 3)?;
        for h in &self.histograms {
            total.add(&*h.lock())?;
        }
        Ok(total)
    }
}

/// State shared by the subscriber tasks of one target.
pub(crate) struct Shared {
    current: ArcSwap<Phase>,
    next_id: AtomicU32,
    pub(crate) disconnected: AtomicU64,
    /// Deliveries stamped [`FOREIGN_PHASE`]: another tenant's messages, which must never come.
    pub(crate) foreign: AtomicU64,
}

impl Shared {
    pub(crate) fn new() -> Result<Arc<Shared>> {
        Ok(Arc::new(Shared {
            current: ArcSwap::new(Phase::new(0, 0)?),
            next_id: AtomicU32::new(1),
            disconnected: AtomicU64::new(0),
            foreign: AtomicU64::new(0),
        }))
    }

    pub(crate) fn begin(&self, window: usize) -> Result<Arc<Phase>> {
        let phase = Phase::new(self.next_id.fetch_add(1, Ordering::Relaxed), window)?;
        self.current.store(Arc::clone(&phase));
        Ok(phase)
    }
}

/// Reads deliveries until the connection ends; records those of the current phase.
pub(crate) async fn subscriber_loop(index: usize, mut client: Client, shared: Arc<Shared>) {
    loop {
        match client.next_payload().await {
            Ok(Some(payload)) => {
                if Payload::read(&payload).is_some_and(|(id, _)| id == FOREIGN_PHASE) {
                    shared.foreign.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                record_delivery(&shared.current.load(), index, &payload);
                if client.flush_acks().await.is_err() {
                    shared.disconnected.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            }
            Ok(None) | Err(_) => {
                shared.disconnected.fetch_add(1, Ordering::Relaxed);
                return;
            }
        }
    }
}

/// Counts `payload` in `phase` (latency into shard `index`, one window permit back) if it
/// belongs to it; payloads of other phases are stragglers and ignored.
pub(crate) fn record_delivery(phase: &Phase, index: usize, payload: &[u8]) {
    let Some((phase_id, sent)) = Payload::read(payload) else {
        return;
    };
    if phase.id != phase_id {
        return;
    }
    let latency = crate::wire::now_ns().saturating_sub(sent).max(1_000);
    let _ = phase.histograms[index % SHARDS].lock().record(latency);
    phase.delivered.fetch_add(1, Ordering::Relaxed);
    phase.window.add_permits(1);
}

/// Connects `count` clients starting at `first_index`, `concurrency` at a time, running
/// `setup` on each; returns the clients and the number that failed.
pub(crate) async fn connect_many<F, Fut>(
    ep: &Endpoint,
    first_index: usize,
    count: usize,
    concurrency: usize,
    setup: F,
) -> (Vec<Client>, u64)
where
    F: Fn(Client) -> Fut + Copy,
    Fut: Future<Output = Result<Client>>,
{
    let results: Vec<Result<Client>> = futures_util::stream::iter(first_index..first_index + count)
        .map(|i| async move {
            tokio::time::timeout(STEP_TIMEOUT, async {
                let client = Client::connect(ep, i).await?;
                setup(client).await
            })
            .await
            .context("timed out")?
        })
        .buffer_unordered(concurrency.max(1))
        .collect()
        .await;
    let mut clients = Vec::with_capacity(count);
    let mut failed = 0;
    let mut first_error = None;
    for r in results {
        match r {
            Ok(c) => clients.push(c),
            Err(e) => {
                failed += 1;
                first_error.get_or_insert(e);
            }
        }
    }
    if let Some(e) = first_error {
        eprintln!("    {failed} of {count} clients failed to connect; first error: {e:#}");
    }
    (clients, failed)
}

pub(crate) fn percentiles(rec: &mut Record, h: &Histogram<u64>) {
    if h.is_empty() {
        return;
    }
    let us = |ns: u64| ns as f64 / 1_000.0;
    rec.p50_us = Some(us(h.value_at_quantile(0.50)));
    rec.p99_us = Some(us(h.value_at_quantile(0.99)));
    rec.p999_us = Some(us(h.value_at_quantile(0.999)));
    rec.max_us = Some(us(h.max()));
}

pub(crate) struct CpuMeter {
    pid: u32,
    start_cpu: Option<f64>,
    start: Instant,
}

impl CpuMeter {
    pub(crate) fn start(pid: u32) -> Self {
        CpuMeter {
            pid,
            start_cpu: sys::cpu_seconds(pid),
            start: Instant::now(),
        }
    }
    pub(crate) fn cores(&self) -> Option<f64> {
        let now = sys::cpu_seconds(self.pid)?;
        Some((now - self.start_cpu?) / self.start.elapsed().as_secs_f64())
    }
}

pub(crate) fn base_record(
    running: &Running,
    scenario: &str,
    n: usize,
    payload: usize,
    mode: &str,
) -> Record {
    Record {
        target: running.target.name().to_string(),
        scenario: scenario.into(),
        n,
        payload,
        mode: mode.into(),
        ..Record::default()
    }
}

/// Fan-out: one publisher, N subscribers on one topic.
/// The fan-out again, on a proxy that sends every event (connect, subscribe, publish, …) to
/// a receiver answering each request after 50 ms: the records are the fan-out's, under
/// scenario `webhooks`, with what the receiver got.
async fn webhooks(
    running: &Running,
    plan: &Plan,
    out: &mut Vec<Record>,
    sink: Option<&crate::webhook_sink::Sink>,
) -> Result<()> {
    use std::sync::atomic::Ordering;
    let Some(sink) = sink else {
        bail!("the webhooks scenario needs its receiver");
    };
    let first = out.len();
    let before = sink.counts.events.load(Ordering::Relaxed);
    fanout(running, plan, out).await?;
    let events = sink.counts.events.load(Ordering::Relaxed) - before;
    let requests = sink.counts.requests.load(Ordering::Relaxed);
    eprintln!(
        "{}: webhooks: the receiver got {events} events in {requests} requests so far",
        running.target
    );
    for r in &mut out[first..] {
        r.scenario = "webhooks".into();
        r.webhook_events = Some(events);
    }
    Ok(())
}

pub async fn fanout(running: &Running, plan: &Plan, out: &mut Vec<Record>) -> Result<()> {
    let ep = &running.endpoint;
    let shared = Shared::new()?;
    let mut tasks = JoinSet::new();
    let mut connected = 0usize;
    let mut publisher = Client::connect(ep, 0).await.context("fan-out publisher")?;
    let mut warmed = false;
    let sub_qos = subscriber_qos(running, plan);
    for &n in &plan.fanout_n {
        let (clients, failed) = connect_many(
            ep,
            1 + connected,
            n.saturating_sub(connected),
            plan.ramp_concurrency,
            |mut c| async move {
                c.set_qos(sub_qos);
                c.subscribe(false).await?;
                Ok(c)
            },
        )
        .await;
        for client in clients {
            let (i, shared) = (connected, Arc::clone(&shared));
            connected += 1;
            tasks.spawn(subscriber_loop(i, client, shared));
        }
        let live = connected.saturating_sub(shared.disconnected.load(Ordering::Relaxed) as usize);
        eprintln!("  fan-out N={n}: {live} subscribers");
        tokio::time::sleep(plan.settle).await;
        if !warmed {
            let _ = fanout_phase(
                &mut publisher,
                &shared,
                live,
                64,
                None,
                Duration::from_millis(500),
                plan,
            )
            .await?;
            warmed = true;
        }
        for (payload, qos) in iproduct(&plan.payloads, &qos_levels(running, plan)) {
            publisher.set_qos(qos);
            for fixed in [false, true] {
                let cpu = CpuMeter::start(running.server_pid);
                let rate = fixed.then(|| plan.fixed_rate as f64 / live.max(1) as f64);
                let rec = fanout_phase(
                    &mut publisher,
                    &shared,
                    live,
                    payload,
                    rate,
                    plan.duration,
                    plan,
                )
                .await?;
                let errors = failed + shared.disconnected.load(Ordering::Relaxed);
                finish(
                    rec,
                    running,
                    ("fanout", n, payload),
                    (fixed, qos),
                    cpu.cores(),
                    errors,
                    out,
                );
            }
        }
    }
    tasks.abort_all();
    publisher.close().await;
    Ok(())
}

/// Every (payload, QoS) pair, payload-major.
fn iproduct(payloads: &[usize], qos: &[u8]) -> Vec<(usize, u8)> {
    payloads
        .iter()
        .flat_map(|&p| qos.iter().map(move |&q| (p, q)))
        .collect()
}

/// Labels a throughput phase's figures with what was measured — (scenario, N, payload) and
/// (fixed, QoS) — prints and keeps them.
fn finish(
    mut rec: Record,
    running: &Running,
    (scenario, n, payload): (&str, usize, usize),
    (fixed, qos): (bool, u8),
    server_cores: Option<f64>,
    errors: u64,
    out: &mut Vec<Record>,
) {
    let label = base_record(running, scenario, n, payload, &throughput_mode(fixed, qos));
    rec.target = label.target;
    rec.scenario = label.scenario;
    rec.n = n;
    rec.payload = payload;
    rec.mode = label.mode;
    rec.qos = qos;
    rec.server_cores = server_cores;
    rec.errors = errors;
    print_record(&rec);
    out.push(rec);
}

/// One fan-out measurement: max-rate with a window (`rate: None`) or fixed-rate.
async fn fanout_phase(
    publisher: &mut Client,
    shared: &Shared,
    subscribers: usize,
    payload: usize,
    rate: Option<f64>,
    duration: Duration,
    plan: &Plan,
) -> Result<Record> {
    let fan = subscribers.max(1);
    let window = fan * plan.window_per_subscriber as usize;
    let phase = shared.begin(window)?;
    let start = tokio::time::Instant::now();
    let deadline = start + duration;
    let mut published = 0u64;
    let mut buf = Vec::with_capacity(payload);
    let mut ticker = rate.map(|r| {
        let mut t = tokio::time::interval(Duration::from_secs_f64(1.0 / r.max(0.1)));
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        t
    });
    let permits = u32::try_from(fan).unwrap_or(u32::MAX);
    loop {
        if let Some(t) = ticker.as_mut() {
            if tokio::time::timeout_at(deadline, t.tick()).await.is_err() {
                break;
            }
        } else {
            match tokio::time::timeout_at(
                deadline,
                Arc::clone(&phase.window).acquire_many_owned(permits),
            )
            .await
            {
                Ok(Ok(p)) => p.forget(),
                _ => break,
            }
        }
        Payload::stamp(&mut buf, payload, phase.id);
        publisher.publish(&buf).await.context("publish")?;
        published += 1;
    }
    let delivered_in_window = phase.delivered.load(Ordering::Relaxed);
    let elapsed = start.elapsed().as_secs_f64();
    let expected = published * fan as u64;
    drain(&phase, expected).await;
    let mut rec = Record {
        published_per_s: Some(published as f64 / elapsed),
        delivered_per_s: Some(delivered_in_window as f64 / elapsed),
        lost: Some(expected.saturating_sub(phase.delivered.load(Ordering::Relaxed))),
        ..Record::default()
    };
    percentiles(&mut rec, &phase.merged()?);
    Ok(rec)
}

/// Waits until `expected` deliveries of `phase` have arrived, as long as they keep coming
/// (a backlogged broker is slow, not lossy: it gets up to 30 s, and up to 3 s without any
/// delivery — NATS's JetStream-paced QoS 1 paused longer than 1 s), so that what is still
/// missing afterwards was really lost and no backlog spills into the next phase.
pub(crate) async fn drain(phase: &Phase, expected: u64) {
    let give_up = Instant::now() + Duration::from_secs(30);
    let mut last = phase.delivered.load(Ordering::Relaxed);
    let mut last_progress = Instant::now();
    while last < expected && Instant::now() < give_up {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let now = phase.delivered.load(Ordering::Relaxed);
        if now > last {
            last = now;
            last_progress = Instant::now();
        } else if last_progress.elapsed() > Duration::from_secs(3) {
            return;
        }
    }
}

/// A fan-out at a fixed rate until `end` completes: `publishers` share `rate` publishes/s
/// of `payload` bytes (their ticks spread over one period), delivered to `subscribers`
/// reading with [`subscriber_loop`] on `shared`. Then waits for the stragglers
/// ([`drain`]); `errors` counts the publishers that failed.
pub(crate) async fn fixed_rate_phase<T>(
    publishers: Vec<Client>,
    shared: &Shared,
    subscribers: usize,
    rate: f64,
    payload: usize,
    end: impl Future<Output = T>,
) -> Result<FixedRun<T>> {
    let n = publishers.len().max(1);
    let phase = shared.begin(0)?;
    let start = tokio::time::Instant::now();
    let published = Arc::new(AtomicU64::new(0));
    let period = Duration::from_secs_f64(n as f64 / rate.max(0.1));
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let mut tasks = JoinSet::new();
    for (i, mut client) in publishers.into_iter().enumerate() {
        let (phase_id, published, mut stopped) =
            (phase.id, Arc::clone(&published), stopped.clone());
        tasks.spawn(async move {
            let mut buf = Vec::with_capacity(payload);
            let offset = period.mul_f64(i as f64 / n as f64);
            let mut ticker = tokio::time::interval_at(start + offset, period);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            let mut failed = false;
            loop {
                tokio::select! {
                    biased;
                    _ = stopped.wait_for(|s| *s) => break,
                    _ = ticker.tick() => {}
                }
                Payload::stamp(&mut buf, payload, phase_id);
                if client.publish(&buf).await.is_err() {
                    failed = true;
                    break;
                }
                published.fetch_add(1, Ordering::Relaxed);
            }
            (client, failed)
        });
    }
    let ended = end.await;
    let _ = stop.send(true);
    let mut back = Vec::with_capacity(n);
    let mut failed = 0;
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok((client, f)) => {
                failed += u64::from(f);
                back.push(client);
            }
            Err(_) => failed += 1,
        }
    }
    let delivered_in_window = phase.delivered.load(Ordering::Relaxed);
    let elapsed = start.elapsed().as_secs_f64().max(1e-3);
    let expected = published.load(Ordering::Relaxed) * subscribers as u64;
    drain(&phase, expected).await;
    let mut rec = Record {
        published_per_s: Some(published.load(Ordering::Relaxed) as f64 / elapsed),
        delivered_per_s: Some(delivered_in_window as f64 / elapsed),
        lost: Some(expected.saturating_sub(phase.delivered.load(Ordering::Relaxed))),
        errors: failed,
        ..Record::default()
    };
    percentiles(&mut rec, &phase.merged()?);
    Ok(FixedRun {
        record: rec,
        publishers: back,
        ended,
    })
}

/// What [`fixed_rate_phase`] measured, its publishers back, and what `end` returned.
pub(crate) struct FixedRun<T> {
    pub(crate) record: Record,
    pub(crate) publishers: Vec<Client>,
    pub(crate) ended: T,
}

/// Fan-in: N publishers, one subscriber.
pub async fn fanin(running: &Running, plan: &Plan, out: &mut Vec<Record>) -> Result<()> {
    let ep = &running.endpoint;
    let shared = Shared::new()?;
    let mut subscriber = Client::connect(ep, 0).await.context("fan-in subscriber")?;
    subscriber.set_qos(subscriber_qos(running, plan));
    subscriber.subscribe(false).await?;
    let sub_task = tokio::spawn(subscriber_loop(0, subscriber, Arc::clone(&shared)));
    let mut publishers: Vec<Client> = Vec::new();
    let mut failed = 0;
    for &n in &plan.fanin_n {
        let more = n.saturating_sub(publishers.len());
        let (clients, f) = connect_many(
            ep,
            1 + publishers.len(),
            more,
            plan.ramp_concurrency,
            |c| async move { Ok(c) },
        )
        .await;
        failed += f;
        publishers.extend(clients);
        eprintln!("  fan-in N={n}: {} publishers", publishers.len());
        tokio::time::sleep(plan.settle).await;
        for (payload, qos) in iproduct(&plan.payloads, &qos_levels(running, plan)) {
            for p in &mut publishers {
                p.set_qos(qos);
            }
            for fixed in [false, true] {
                let cpu = CpuMeter::start(running.server_pid);
                let (rec, back) = fanin_phase(publishers, &shared, payload, fixed, plan).await?;
                publishers = back;
                let errors = failed + shared.disconnected.load(Ordering::Relaxed);
                finish(
                    rec,
                    running,
                    ("fanin", n, payload),
                    (fixed, qos),
                    cpu.cores(),
                    errors,
                    out,
                );
            }
        }
    }
    sub_task.abort();
    for p in publishers {
        p.close().await;
    }
    Ok(())
}

async fn fanin_phase(
    publishers: Vec<Client>,
    shared: &Shared,
    payload: usize,
    fixed: bool,
    plan: &Plan,
) -> Result<(Record, Vec<Client>)> {
    let n = publishers.len().max(1);
    let phase = shared.begin(plan.fanin_window as usize)?;
    let start = tokio::time::Instant::now();
    let deadline = start + plan.duration;
    let published = Arc::new(AtomicU64::new(0));
    let per_publisher_rate = plan.fixed_rate as f64 / n as f64;
    let mut tasks = JoinSet::new();
    for (i, mut client) in publishers.into_iter().enumerate() {
        let (phase, published) = (Arc::clone(&phase), Arc::clone(&published));
        tasks.spawn(async move {
            let mut buf = Vec::with_capacity(payload);
            let mut ticker = fixed.then(|| {
                let period = Duration::from_secs_f64(1.0 / per_publisher_rate.max(0.01));
                // Spread the publishers' ticks over one period instead of firing together.
                let offset = period.mul_f64((i as f64 * 0.618_034) % 1.0);
                let mut t = tokio::time::interval_at(start + offset, period);
                t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
                t
            });
            loop {
                if let Some(t) = ticker.as_mut() {
                    if tokio::time::timeout_at(deadline, t.tick()).await.is_err() {
                        break;
                    }
                } else {
                    match tokio::time::timeout_at(
                        deadline,
                        Arc::clone(&phase.window).acquire_owned(),
                    )
                    .await
                    {
                        Ok(Ok(p)) => p.forget(),
                        _ => break,
                    }
                }
                Payload::stamp(&mut buf, payload, phase.id);
                if client.publish(&buf).await.is_err() {
                    break;
                }
                published.fetch_add(1, Ordering::Relaxed);
            }
            client
        });
    }
    let mut back = Vec::with_capacity(n);
    while let Some(joined) = tasks.join_next().await {
        if let Ok(client) = joined {
            back.push(client);
        }
    }
    let delivered_in_window = phase.delivered.load(Ordering::Relaxed);
    let elapsed = start
        .elapsed()
        .as_secs_f64()
        .max(plan.duration.as_secs_f64());
    let published = published.load(Ordering::Relaxed);
    drain(&phase, published).await;
    let mut rec = Record {
        published_per_s: Some(published as f64 / elapsed),
        delivered_per_s: Some(delivered_in_window as f64 / elapsed),
        lost: Some(published.saturating_sub(phase.delivered.load(Ordering::Relaxed))),
        ..Record::default()
    };
    percentiles(&mut rec, &phase.merged()?);
    Ok((rec, back))
}

/// Idle: N authenticated connections with two subscriptions each; RSS per connection and the
/// broker's connection count at each N.
pub async fn idle(running: &Running, plan: &Plan, out: &mut Vec<Record>) -> Result<()> {
    let mut ep = running.endpoint.clone();
    // 20,000 connections from one source address can run out of ephemeral ports when the
    // previous scenario's sockets are still in TIME_WAIT.
    ep.source_addresses = 8;
    tokio::time::sleep(plan.settle).await;
    let base = running.server_rss()?;
    let mut clients: Vec<Client> = Vec::new();
    let mut failed = 0;
    for &n in &plan.idle_n {
        let more = n.saturating_sub(clients.len());
        let (new, f) = connect_many(
            &ep,
            clients.len(),
            more,
            plan.ramp_concurrency,
            |mut c| async move {
                c.subscribe(false).await?;
                c.subscribe(true).await?;
                Ok(c)
            },
        )
        .await;
        failed += f;
        clients.extend(new);
        tokio::time::sleep(plan.settle).await;
        let rss = running.server_rss()?;
        let held = clients.len();
        let mut rec = base_record(running, "idle", n, 0, "idle");
        rec.errors = failed;
        rec.rss_mib = Some(rss as f64 / (1 << 20) as f64);
        rec.rss_per_conn_kib =
            (held > 0).then(|| (rss.saturating_sub(base)) as f64 / held as f64 / 1024.0);
        rec.broker_connections = running.broker_connections();
        print_record(&rec);
        out.push(rec);
        if f > 0 && f as usize == more {
            eprintln!("  no new connection succeeded at N={n}; stopping the idle ramp");
            break;
        }
    }
    drop(clients);
    Ok(())
}

/// Connect rate: `concurrency` loops of connect + authenticate + close for `duration`.
pub async fn connect_rate(
    running: &Running,
    plan: &Plan,
    out: &mut Vec<Record>,
    tls: Option<&tls::Material>,
) -> Result<()> {
    let mut modes: Vec<(&str, Endpoint, Option<tls::Client>, u32)> =
        vec![("plain", running.endpoint.clone(), None, running.server_pid)];
    let sibling = match tls {
        Some(m) => running.start_tls_sibling(&m.server).await?,
        None => None,
    };
    if let (Some(s), Some(m)) = (&sibling, tls) {
        modes.push(("tls", s.endpoint.clone(), Some(m.client.clone()), s.pid));
    }
    for (mode, mut ep, tls_client, server_pid) in modes {
        ep.source_addresses = 8;
        let ep = Arc::new(ep);
        let done = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let cpu = CpuMeter::start(server_pid);
        let start = tokio::time::Instant::now();
        let deadline = start + plan.duration;
        let mut tasks = JoinSet::new();
        for worker in 0..plan.connect_concurrency {
            let (ep, done, failed, tls_client) = (
                Arc::clone(&ep),
                Arc::clone(&done),
                Arc::clone(&failed),
                tls_client.clone(),
            );
            tasks.spawn(async move {
                let mut i = worker;
                while tokio::time::Instant::now() < deadline {
                    let attempt = tokio::time::timeout(STEP_TIMEOUT, async {
                        let client = match &tls_client {
                            Some(tc) => {
                                let tcp = crate::wire::tcp_connect(&ep, i).await?;
                                let io = tc.connect(tcp).await?;
                                Client::connect_over(&ep, i, io).await?
                            }
                            None => Client::connect(&ep, i).await?,
                        };
                        client.close().await;
                        anyhow::Ok(())
                    })
                    .await;
                    match attempt {
                        Ok(Ok(())) => done.fetch_add(1, Ordering::Relaxed),
                        _ => failed.fetch_add(1, Ordering::Relaxed),
                    };
                    i += 1000; // next token of the same residue class: actors stay spread
                }
            });
        }
        while tasks.join_next().await.is_some() {}
        let elapsed = start.elapsed().as_secs_f64();
        let mut rec = base_record(running, "connect", plan.connect_concurrency, 0, mode);
        rec.connects_per_s = Some(done.load(Ordering::Relaxed) as f64 / elapsed);
        rec.errors = failed.load(Ordering::Relaxed);
        rec.server_cores = cpu.cores();
        print_record(&rec);
        out.push(rec);
        // Let the server finish closing before the next measurement.
        tokio::time::sleep(plan.settle).await;
    }
    Ok(())
}

pub fn print_record(r: &Record) {
    let f = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.1}"));
    eprintln!(
        "    {:<18} {:<7} n={:<6} payload={:<5} {:<5} delivered/s={} p50={}µs p99={}µs p999={}µs lost={} errors={} rss/conn={}KiB broker_conns={} connects/s={} cores={}",
        r.target,
        r.scenario,
        r.n,
        r.payload,
        r.mode,
        f(r.delivered_per_s),
        f(r.p50_us),
        f(r.p99_us),
        f(r.p999_us),
        r.lost.map_or("-".into(), |v| v.to_string()),
        r.errors,
        f(r.rss_per_conn_kib),
        r.broker_connections.map_or("-".into(), |v| v.to_string()),
        f(r.connects_per_s),
        r.server_cores.map_or("-".into(), |v| format!("{v:.2}")),
    );
}

/// Runs every scenario of `plan` against `target`.
pub async fn run_target(
    target: Target,
    plan: &Plan,
    scenarios: &[String],
    tls_files: Option<&tls::Material>,
    out: &mut Vec<Record>,
) -> Result<()> {
    let mut running = crate::targets::start(target).await?;
    eprintln!(
        "{target}: serving at {} (server pid {})",
        running.endpoint.addr, running.server_pid
    );
    let tenants = matches!(target, Target::CuttleEmbedded | Target::CuttleMosquitto);
    // The webhooks scenario's receiver outlives the proxy restarts.
    let sink = if tenants && scenarios.iter().any(|s| s == "webhooks") {
        Some(crate::webhook_sink::start().await?)
    } else {
        None
    };
    for (i, scenario) in scenarios.iter().enumerate() {
        if matches!(scenario.as_str(), "noisy" | "presence" | "webhooks") && !tenants {
            // The baselines have no tenants to isolate and no presence: nothing to measure.
            continue;
        }
        if !target.runs(scenario) {
            // See Target::runs: a scenario that does not apply to this target.
            continue;
        }
        let profile = match scenario.as_str() {
            "noisy" => Profile::Noisy,
            "presence" => Profile::Presence(plan.presence.layout()),
            "webhooks" => Profile::Webhooks {
                sink: sink.as_ref().map_or(0, |s| s.port),
            },
            _ => Profile::Standard,
        };
        if (scenario == "idle" && i > 0 || running.profile != profile) && running.restartable() {
            // Memory per connection needs a fresh process: after fan-out the allocator holds
            // freed memory that new connections reuse, which would make them look free. The
            // noisy-neighbour and presence scenarios have policies and limits of their own.
            drop(running);
            running = crate::targets::start_with(target, profile).await?;
        }
        let result = match scenario.as_str() {
            "noisy" => crate::noisy::run(&running, plan, out).await,
            "presence" => crate::presence::run(&running, plan, out).await,
            "fanout" => fanout(&running, plan, out).await,
            "webhooks" => webhooks(&running, plan, out, sink.as_ref()).await,
            "fanin" => fanin(&running, plan, out).await,
            "rooms" => crate::rooms::rooms(&running, plan, out).await,
            "churn" => crate::rooms::churn(&running, plan, out).await,
            "idle" => idle(&running, plan, out).await,
            "connect" => connect_rate(&running, plan, out, tls_files).await,
            other => bail!("unknown scenario `{other}`"),
        };
        if let Err(e) = result {
            // One failing scenario does not hide the others; the gap shows in the report.
            eprintln!("  {target} {scenario} failed: {e:#}");
            out.push(Record {
                target: target.name().into(),
                scenario: scenario.clone(),
                mode: "failed".into(),
                errors: 1,
                ..Record::default()
            });
        }
        // Sockets of the previous scenario close; give the server a moment.
        tokio::time::sleep(plan.settle).await;
    }
    Ok(())
}
