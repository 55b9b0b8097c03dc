//! Two scenarios of many small topics, the shape of chat and of page reloads:
//!
//! - **rooms**: `rooms × members` clients, each subscribed to its room's topic and publishing
//!   on it at a chat rate (every client every `interval`), so every message reaches all the
//!   room's members, the sender included (cuttle with `echo: true`; MQTT 3.1.1 and NATS
//!   always echo). Figures: deliveries/s, latency, lost deliveries, at each rate and QoS.
//! - **churn**: bystanders receive a fixed-rate fan-out (the comparison's fixed load) while
//!   churners subscribe to and unsubscribe from distinct room topics at a sustained rate,
//!   each operation waiting for its acknowledgement. Figures: the bystanders' latency alone
//!   and under churn, the churn rate achieved and one operation's round trip.
//!
//! Neither runs against the broadcast server, which has one stream and no topics.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Result, bail};
use hdrhistogram::Histogram;
use parking_lot::Mutex;
use tokio::task::JoinSet;

use crate::scenario::{
    self, CpuMeter, Plan, Record, Shared, base_record, connect_many, percentiles, print_record,
    qos_levels, subscriber_qos,
};
use crate::targets::Running;
use crate::wire::{Client, Payload};

/// The rooms scenario's shape.
#[derive(Debug, Clone)]
pub struct RoomsShape {
    pub rooms: usize,
    pub members: usize,
    pub payload: usize,
    /// (mode label, time between one client's messages).
    pub rates: Vec<(&'static str, Duration)>,
    /// Length of each measured phase (at least two intervals of the slowest rate).
    pub phase: Duration,
}

impl RoomsShape {
    /// 10,000 clients in 1,000 rooms; `chat` = a message every 5 s per client (2,000
    /// messages/s, 20,000 deliveries/s), `busy` = every second (100,000 deliveries/s).
    pub fn full(duration: Duration) -> Self {
        RoomsShape {
            rooms: 1000,
            members: 10,
            payload: 64,
            rates: vec![
                ("chat", Duration::from_secs(5)),
                ("busy", Duration::from_secs(1)),
            ],
            phase: (duration * 2).max(Duration::from_secs(10)),
        }
    }

    pub fn smoke() -> Self {
        RoomsShape {
            rooms: 20,
            members: 5,
            payload: 64,
            rates: vec![
                ("chat", Duration::from_millis(500)),
                ("busy", Duration::from_millis(100)),
            ],
            phase: Duration::from_millis(1500),
        }
    }

    pub fn clients(&self) -> usize {
        self.rooms * self.members
    }
}

/// The churn scenario's shape.
#[derive(Debug, Clone)]
pub struct ChurnShape {
    /// Subscribers of the bystanders' fan-out (at the plan's fixed load in total).
    pub bystanders: usize,
    pub payload: usize,
    /// Connections subscribing and unsubscribing.
    pub churners: usize,
    /// Subscribe + unsubscribe operations per second over all churners.
    pub ops_per_s: f64,
    /// Distinct room topics the churners cycle through.
    pub topics: usize,
    pub phase: Duration,
}

impl ChurnShape {
    /// 2,000 operations/s (1,000 subscribes + 1,000 unsubscribes) from 200 connections: 10
    /// per connection per second, under cuttle's default `control_per_second` of 20.
    pub fn full(duration: Duration) -> Self {
        ChurnShape {
            bystanders: 100,
            payload: 1024,
            churners: 200,
            ops_per_s: 2000.0,
            topics: 1000,
            phase: duration,
        }
    }

    pub fn smoke() -> Self {
        ChurnShape {
            bystanders: 10,
            payload: 64,
            churners: 10,
            ops_per_s: 100.0,
            topics: 20,
            phase: Duration::from_secs(1),
        }
    }
}

/// The rooms scenario against one target.
pub async fn rooms(running: &Running, plan: &Plan, out: &mut Vec<Record>) -> Result<()> {
    let shape = &plan.rooms;
    let mut ep = running.endpoint.clone();
    ep.source_addresses = 8;
    let sub_qos = subscriber_qos(running, plan);
    let members = shape.members.max(1);
    let (clients, failed) = connect_many(
        &ep,
        0,
        shape.clients(),
        plan.ramp_concurrency,
        |c| async move { Ok(c) },
    )
    .await;
    // Rooms by connection order: every room gets `members` clients (the failed ones are
    // missing from the end).
    let mut joined = Vec::with_capacity(clients.len());
    let mut subscribe_failed = 0u64;
    let mut pending = JoinSet::new();
    for (i, mut c) in clients.into_iter().enumerate() {
        let room = i / members;
        pending.spawn(async move {
            c.set_room(room);
            c.set_qos(sub_qos);
            let topic = c.protocol().room_topic(room, "t");
            tokio::time::timeout(crate::wire::STEP_TIMEOUT, c.subscribe_to(&topic))
                .await
                .ok()
                .and_then(Result::ok)
                .map(|()| (room, c))
        });
        // Bounded concurrency of subscribes, as for connects.
        if pending.len() >= plan.ramp_concurrency {
            match pending.join_next().await {
                Some(Ok(Some(rc))) => joined.push(rc),
                _ => subscribe_failed += 1,
            }
        }
    }
    while let Some(r) = pending.join_next().await {
        match r {
            Ok(Some(rc)) => joined.push(rc),
            _ => subscribe_failed += 1,
        }
    }
    let mut per_room = vec![0u64; shape.rooms];
    for (room, _) in &joined {
        if let Some(count) = per_room.get_mut(*room) {
            *count += 1;
        }
    }
    eprintln!(
        "  rooms: {} clients in {} rooms",
        joined.len(),
        per_room.iter().filter(|c| **c > 0).count()
    );
    tokio::time::sleep(plan.settle).await;
    let per_room = Arc::new(per_room);
    let mut clients: Vec<(usize, Client)> = joined;
    for qos in qos_levels(running, plan) {
        for &(mode, interval) in &shape.rates {
            for (_, c) in &mut clients {
                c.set_qos(qos);
            }
            let cpu = CpuMeter::start(running.server_pid);
            let (mut rec, back) =
                rooms_phase(clients, &per_room, shape, interval, plan.settle).await?;
            clients = back;
            let label = scenario::qos_mode(mode, qos);
            let base = base_record(running, "rooms", shape.clients(), shape.payload, &label);
            rec.target = base.target;
            rec.scenario = base.scenario;
            rec.n = base.n;
            rec.payload = base.payload;
            rec.mode = base.mode;
            rec.qos = qos;
            rec.server_cores = cpu.cores();
            rec.errors += failed + subscribe_failed;
            print_record(&rec);
            out.push(rec);
        }
    }
    for (_, c) in clients {
        c.close().await;
    }
    Ok(())
}

/// One rooms measurement: every client publishes every `interval` (ticks spread over one
/// interval) and reads its room's messages, for `shape.phase`; then the stragglers.
async fn rooms_phase(
    clients: Vec<(usize, Client)>,
    per_room: &Arc<Vec<u64>>,
    shape: &RoomsShape,
    interval: Duration,
    grace: Duration,
) -> Result<(Record, Vec<(usize, Client)>)> {
    let shared = Shared::new()?;
    let phase = shared.begin(0)?;
    let published = Arc::new(AtomicU64::new(0));
    let expected = Arc::new(AtomicU64::new(0));
    let disconnected = Arc::new(AtomicU64::new(0));
    let start = tokio::time::Instant::now();
    let publish_until = start + shape.phase;
    // Readers keep reading for the grace period after the last publish.
    let read_until = publish_until + grace.max(Duration::from_secs(1));
    let n = clients.len().max(1);
    let mut tasks = JoinSet::new();
    for (i, (room, mut client)) in clients.into_iter().enumerate() {
        let (phase, published, expected, disconnected, per_room) = (
            Arc::clone(&phase),
            Arc::clone(&published),
            Arc::clone(&expected),
            Arc::clone(&disconnected),
            Arc::clone(per_room),
        );
        let payload = shape.payload;
        tasks.spawn(async move {
            let offset = interval.mul_f64((i as f64 * 0.618_034) % 1.0);
            let mut ticker = tokio::time::interval_at(start + offset, interval);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            let mut buf = Vec::with_capacity(payload);
            let room_size = per_room.get(room).copied().unwrap_or(0);
            let mut alive = true;
            loop {
                let now = tokio::time::Instant::now();
                if now >= read_until {
                    break;
                }
                tokio::select! {
                    biased;
                    _ = ticker.tick(), if now < publish_until => {
                        Payload::stamp(&mut buf, payload, phase.id);
                        if client.publish_echo(&buf, true).await.is_err() {
                            alive = false;
                            break;
                        }
                        published.fetch_add(1, Ordering::Relaxed);
                        expected.fetch_add(room_size, Ordering::Relaxed);
                    }
                    got = client.next_payload() => match got {
                        Ok(Some(p)) => {
                            scenario::record_delivery(&phase, i % n, &p);
                            if client.flush_acks().await.is_err() {
                                alive = false;
                                break;
                            }
                        }
                        Ok(None) | Err(_) => {
                            alive = false;
                            break;
                        }
                    },
                    _ = tokio::time::sleep_until(read_until) => break,
                }
            }
            if !alive {
                disconnected.fetch_add(1, Ordering::Relaxed);
            }
            alive.then_some((room, client))
        });
    }
    let mut back = Vec::with_capacity(n);
    while let Some(joined) = tasks.join_next().await {
        if let Ok(Some(rc)) = joined {
            back.push(rc);
        }
    }
    let published = published.load(Ordering::Relaxed);
    let expected = expected.load(Ordering::Relaxed);
    let delivered = phase.delivered.load(Ordering::Relaxed);
    let elapsed = shape.phase.as_secs_f64().max(1e-3);
    let mut rec = Record {
        published_per_s: Some(published as f64 / elapsed),
        // Everything delivered counts: the readers stop a grace period after the publishers.
        delivered_per_s: Some(delivered as f64 / elapsed),
        lost: Some(expected.saturating_sub(delivered)),
        errors: disconnected.load(Ordering::Relaxed),
        ..Record::default()
    };
    percentiles(&mut rec, &phase.merged()?);
    Ok((rec, back))
}

/// The churn scenario against one target: the bystanders' fixed load alone, then with the
/// churners running.
pub async fn churn(running: &Running, plan: &Plan, out: &mut Vec<Record>) -> Result<()> {
    let shape = &plan.churn;
    let ep = &running.endpoint;
    let shared = Shared::new()?;
    let (publishers, failed_pub) = connect_many(ep, 0, 1, 1, |c| async move { Ok(c) }).await;
    if publishers.is_empty() {
        bail!("the bystanders' publisher could not connect");
    }
    let (subscribers, failed_sub) = connect_many(
        ep,
        1,
        shape.bystanders,
        plan.ramp_concurrency,
        |mut c| async move {
            c.subscribe(false).await?;
            Ok(c)
        },
    )
    .await;
    let bystanders = subscribers.len();
    let mut readers = JoinSet::new();
    for (i, c) in subscribers.into_iter().enumerate() {
        readers.spawn(scenario::subscriber_loop(i, c, Arc::clone(&shared)));
    }
    let (churners, failed_churn) = connect_many(
        ep,
        1 + shape.bystanders,
        shape.churners,
        plan.ramp_concurrency,
        |c| async move { Ok(c) },
    )
    .await;
    eprintln!(
        "  churn: {bystanders} bystanders, {} churners",
        churners.len()
    );
    tokio::time::sleep(plan.settle).await;
    let rate = plan.fixed_rate as f64 / bystanders.max(1) as f64;
    let setup_errors = failed_pub + failed_sub + failed_churn;

    let cpu = CpuMeter::start(running.server_pid);
    let run = scenario::fixed_rate_phase(
        publishers,
        &shared,
        bystanders,
        rate,
        shape.payload,
        tokio::time::sleep(shape.phase),
    )
    .await?;
    let publishers = run.publishers;
    let mut rec = run.record;
    label_churn(&mut rec, running, shape, "alone", cpu.cores(), setup_errors);
    out.push(rec);

    let cpu = CpuMeter::start(running.server_pid);
    let run = scenario::fixed_rate_phase(
        publishers,
        &shared,
        bystanders,
        rate,
        shape.payload,
        churn_for(churners, shape),
    )
    .await?;
    let mut rec = run.record;
    let churned = run.ended?;
    rec.churn_per_s = Some(churned.ops as f64 / shape.phase.as_secs_f64().max(1e-3));
    rec.churn_p99_us = (!churned.latency.is_empty())
        .then(|| churned.latency.value_at_quantile(0.99) as f64 / 1_000.0);
    label_churn(
        &mut rec,
        running,
        shape,
        "churn",
        cpu.cores(),
        setup_errors + churned.failed,
    );
    out.push(rec);
    readers.abort_all();
    for c in run.publishers {
        c.close().await;
    }
    for c in churned.clients {
        c.close().await;
    }
    Ok(())
}

fn label_churn(
    rec: &mut Record,
    running: &Running,
    shape: &ChurnShape,
    mode: &str,
    cores: Option<f64>,
    errors: u64,
) {
    let base = base_record(running, "churn", shape.bystanders, shape.payload, mode);
    rec.target = base.target;
    rec.scenario = base.scenario;
    rec.n = base.n;
    rec.payload = base.payload;
    rec.mode = base.mode;
    rec.server_cores = cores;
    rec.errors += errors;
    let f = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.0}"));
    print_record(rec);
    if rec.churn_per_s.is_some() {
        eprintln!(
            "      churn: {} ops/s, one operation's p99 {} µs",
            f(rec.churn_per_s),
            f(rec.churn_p99_us)
        );
    }
}

/// What the churners did.
struct Churned {
    ops: u64,
    failed: u64,
    /// One subscribe or unsubscribe round trip, ns.
    latency: Histogram<u64>,
    clients: Vec<Client>,
}

/// Every churner subscribes to a room topic nobody publishes on and unsubscribes again, at
/// its share of `ops_per_s` (a subscribe and an unsubscribe are two operations), each on a
/// topic no other churner holds at that moment, for `shape.phase`.
async fn churn_for(churners: Vec<Client>, shape: &ChurnShape) -> Result<Churned> {
    let count = churners.len().max(1);
    let pair_period = Duration::from_secs_f64(2.0 * count as f64 / shape.ops_per_s.max(0.1));
    let latency = Arc::new(Mutex::new(Histogram::<u64>::new_with_bounds(
        1_000,
        60_000_000_000,
        3,
    )?));
    let ops = Arc::new(AtomicU64::new(0));
    let start = tokio::time::Instant::now();
    let end = start + shape.phase;
    let topics = shape.topics.max(count);
    let mut tasks = JoinSet::new();
    for (i, mut c) in churners.into_iter().enumerate() {
        let (latency, ops) = (Arc::clone(&latency), Arc::clone(&ops));
        tasks.spawn(async move {
            let offset = pair_period.mul_f64(i as f64 / count as f64);
            let mut ticker = tokio::time::interval_at(start + offset, pair_period);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut round = 0usize;
            let mut failed = false;
            while tokio::time::timeout_at(end, ticker.tick()).await.is_ok() {
                let topic = c.protocol().room_topic((i + round * count) % topics, "u");
                round += 1;
                for subscribe in [true, false] {
                    let sent = std::time::Instant::now();
                    let step = if subscribe {
                        c.subscribe_to(&topic).await
                    } else {
                        c.unsubscribe_from(&topic).await
                    };
                    if step.is_err() {
                        failed = true;
                        break;
                    }
                    let ns = u64::try_from(sent.elapsed().as_nanos()).unwrap_or(u64::MAX);
                    let _ = latency.lock().record(ns.max(1_000));
                    ops.fetch_add(1, Ordering::Relaxed);
                }
                if failed {
                    break;
                }
            }
            (c, failed)
        });
    }
    let mut clients = Vec::with_capacity(count);
    let mut failed = 0;
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok((c, f)) => {
                failed += u64::from(f);
                if !f {
                    clients.push(c);
                }
            }
            Err(_) => failed += 1,
        }
    }
    let latency = latency.lock().clone();
    Ok(Churned {
        ops: ops.load(Ordering::Relaxed),
        failed,
        latency,
        clients,
    })
}
