//! The router's per-message hot path: one upstream MQTT message fanned out to 1, 100 and
//! 10,000 local subscribers of one topic, with `data` of 64 B, 1 KiB and 16 KiB.
//!
//! Each iteration is one call of `Dispatch::dispatch` on the real `Router`, the call the
//! upstream pool makes for every incoming publish: strip the upstream topic, unwrap the echo
//! envelope, encode the `message` frame once, and queue the same `Bytes` into every
//! subscriber's `Outbox`. Subscribers are registered through `Router::replace` with the filters
//! and grant a session computes for `chat/general/messages` (an exact subscription, so there is
//! no per-delivery policy check), each with its own topic string and socket id as real
//! sessions have.
//!
//! What the figure includes and leaves out:
//! - Messages are dispatched in batches of [`BATCH`] (the queue capacity) and only the dispatch
//!   calls are timed; after each batch every queue is drained with `try_recv`, untimed. So the
//!   figure is the router's cost per message, not a session's cost of taking frames off its
//!   queue, and queues never fill (checked: no overflow flag is set).
//! - No task is waiting on the queues, so a push wakes nobody. In the proxy a push to an idle
//!   session also pays for waking its task.
//!
//! Throughput is in subscribers (`Throughput::Elements(N)`): criterion's "elem/s" is deliveries
//! per second, and time / N is the cost per subscriber. Encoding once shows as a per-subscriber
//! cost that does not grow with the frame size.
//!
//! A second group, **router churn**, measures the table at scale: 10,000 sessions holding
//! 100,000 distinct upstream filters (10 each). It times one subscription's unsubscribe plus
//! resubscribe (the cost follows the session's own entries, not the table), an unsubscribe of
//! a topic the session never subscribed, and one dispatch to 100 subscribers of a filter while
//! another thread churns subscriptions of other sessions as fast as it can.
//!
//! Run: `cargo bench --bench router` (`-- --test` runs each once as a smoke test).

#[path = "../tests/common/mod.rs"]
mod common;
mod support;

use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use cuttle::policy::SubscriptionGrant;
use cuttle::reload::PolicyStore;
use cuttle::router::{Membership, Outbox, OutboxReceiver, Overflow, Reply, Router, Subscriber};
use cuttle::topic::filters::{self, FilterItem};
use cuttle::topic::{ClientFilter, ClientTopic};
use cuttle::upstream::Dispatch;
use cuttle::wire::{encode as wire_encode, envelope};
use support::{data_of, size_label};

const TOPIC: &str = "chat/general/messages";
/// Messages dispatched between two drains; also each subscriber's queue capacity.
const BATCH: u64 = 64;

/// The test policy as a loaded `proxy.yaml` (default settings: embedded broker, no prefix).
fn store() -> (Arc<PolicyStore>, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("temp dir");
    copy_key_fixtures(dir.path());
    let indented: String = policy_yaml().lines().map(|l| format!("  {l}\n")).collect();
    let path = dir.path().join("proxy.yaml");
    std::fs::write(&path, format!("policy:\n{indented}")).expect("config written");
    let loaded = cuttle::config::load_with_env(&path, &test_env).unwrap_or_else(|d| panic!("{d}"));
    (PolicyStore::new(loaded), dir)
}

/// A router with `n` sessions subscribed to [`TOPIC`], and their queues.
struct Fanout {
    router: Arc<Router>,
    queues: Vec<OutboxReceiver>,
    overflows: Vec<Arc<Overflow>>,
    _members: Vec<Membership>,
    upstream_topic: String,
    ids: Vec<usize>,
}

impl Fanout {
    fn new(store: &Arc<PolicyStore>, n: usize) -> Self {
        let router = Router::new(store.clone());
        let snapshot = store.snapshot();
        let actor = snapshot
            .auth
            .authenticate(SENSOR1_TOKEN)
            .expect("device authenticates");
        let filter = ClientFilter::parse(TOPIC).expect("valid topic");
        let grant = snapshot
            .policy
            .authorize_subscription(&actor, &filter)
            .expect("device may read");
        let filters = router
            .layout()
            .subscription_filters(actor.scope(), &filter, &[], None)
            .expect("upstream filters");
        let topic = ClientTopic::parse(TOPIC).expect("valid topic");
        let upstream_topic = router.layout().publish_topic(actor.scope(), topic, None);

        let mut queues = Vec::with_capacity(n);
        let mut overflows = Vec::with_capacity(n);
        let mut members = Vec::with_capacity(n);
        for session in 0..n as u64 {
            let (outbox, rx, overflow) = Outbox::channel(BATCH as usize, usize::MAX);
            let sub = Subscriber {
                session,
                topic: TOPIC.into(),
                actor: actor.clone(),
                check_delivery: grant == SubscriptionGrant::CheckEachDelivery,
                socket_id: format!("{session:016x}").into(),
                outbox,
            };
            let mut m = router.membership(session, 1024);
            m.replace(&filters, &sub, Reply::None).expect("subscribed");
            members.push(m);
            queues.push(rx);
            overflows.push(overflow);
        }
        assert_eq!(
            router.filter_count(),
            1,
            "one upstream filter shared by all"
        );
        let ids = vec![router.subscription_id(&filters[0]).expect("entry")];
        Self {
            router,
            queues,
            overflows,
            _members: members,
            upstream_topic,
            ids,
        }
    }

    fn dispatch(&self, payload: &Bytes) {
        self.router.dispatch(
            black_box(&self.upstream_topic),
            black_box(&self.ids),
            payload.clone(),
        );
    }

    /// Empties every queue; returns the number of frames taken.
    fn drain(&mut self) -> usize {
        let mut frames = 0;
        for q in &mut self.queues {
            while q.try_recv().is_some() {
                frames += 1;
            }
        }
        frames
    }

    /// One message reaches every subscriber as the expected frame, and nothing overflowed.
    fn check(&mut self, payload: &Bytes, expected: &Bytes) {
        self.dispatch(payload);
        for q in &mut self.queues {
            assert_eq!(q.try_recv().as_ref(), Some(expected), "frame delivered");
        }
        self.check_clean();
    }

    fn check_clean(&mut self) {
        assert_eq!(self.drain(), 0, "queues drained");
        assert!(self.overflows.iter().all(|o| !o.is_set()), "no overflow");
        assert_eq!(self.router.orphans.load(Ordering::Relaxed), 0, "no orphans");
    }
}

fn fanout(c: &mut Criterion) {
    let (store, _dir) = store();
    let mut g = c.benchmark_group("router dispatch");
    for n in [1usize, 100, 10_000] {
        let mut fx = Fanout::new(&store, n);
        g.throughput(Throughput::Elements(n as u64));
        for len in [64, 1024, 16 * 1024] {
            let data = data_of(len);
            // What the pool receives for a publish with the default `echo: true`.
            let payload = envelope::wrap(&data, "publisher-socket", true);
            fx.check(&payload, &wire_encode::message(TOPIC, &data, None));

            let id = BenchmarkId::new(format!("data {}", size_label(len)), format!("{n} subs"));
            g.bench_function(id, |b| {
                b.iter_custom(|iters| {
                    let mut timed = Duration::ZERO;
                    let mut left = iters;
                    while left > 0 {
                        let batch = left.min(BATCH);
                        let start = Instant::now();
                        for _ in 0..batch {
                            fx.dispatch(&payload);
                        }
                        timed += start.elapsed();
                        fx.drain();
                        left -= batch;
                    }
                    timed
                })
            });
            fx.check_clean();
        }
    }
    g.finish();
}

/// Sessions × subscriptions per session in the churn group.
const CHURN_SESSIONS: u64 = 10_000;
const CHURN_PER_SESSION: usize = 10;

/// The upstream filters of `chat/general/messages` with one sub-topic filter.
fn filtered(router: &Router, actor: &cuttle::auth::Actor, filter: &str) -> Vec<String> {
    let client = ClientFilter::parse(TOPIC).expect("valid topic");
    let items = [FilterItem::One(filter.to_string())];
    let sub = filters::subscription_filters(&items).expect("valid filter");
    router
        .layout()
        .subscription_filters(actor.scope(), &client, &sub, None)
        .expect("upstream filters")
}

fn churn(c: &mut Criterion) {
    let (store, _dir) = store();
    let snapshot = store.snapshot();
    let actor = snapshot
        .auth
        .authenticate(SENSOR1_TOKEN)
        .expect("device authenticates");
    let router = Router::new(store.clone());
    let mut members = Vec::new();
    let mut queues = Vec::new();
    let subscriber = |session: u64, outbox: &Outbox, topic: &str| Subscriber {
        session,
        topic: topic.into(),
        actor: actor.clone(),
        check_delivery: false,
        socket_id: format!("{session:016x}").into(),
        outbox: outbox.clone(),
    };
    let mut outboxes = Vec::new();
    for session in 0..CHURN_SESSIONS {
        let (outbox, rx, _) = Outbox::channel(BATCH as usize, usize::MAX);
        let mut m = router.membership(session, 1024);
        for k in 0..CHURN_PER_SESSION {
            // Each subscription string is the session's own; each filter is distinct.
            let topic = format!("{TOPIC}#{k}");
            let f = filtered(&router, &actor, &format!("s{session}-{k}"));
            m.replace(&f, &subscriber(session, &outbox, &topic), Reply::None)
                .expect("subscribed");
        }
        members.push(m);
        queues.push(rx);
        outboxes.push(outbox);
    }
    assert_eq!(
        router.filter_count(),
        (CHURN_SESSIONS as usize) * CHURN_PER_SESSION
    );
    let mut g = c.benchmark_group("router churn (100,000 filters, 10,000 sessions)");
    g.throughput(Throughput::Elements(1));
    let f0 = filtered(&router, &actor, "s0-0");
    let topic0 = format!("{TOPIC}#0");
    g.bench_function("unsubscribe + resubscribe one subscription", |b| {
        b.iter(|| {
            members[0].remove(&topic0);
            members[0]
                .replace(&f0, &subscriber(0, &outboxes[0], &topic0), Reply::None)
                .expect("subscribed");
        })
    });
    g.bench_function("unsubscribe a topic never subscribed", |b| {
        b.iter(|| black_box(members[1].remove(black_box("chat/general/never"))))
    });

    // 100 extra sessions share one filter; dispatch to it while another thread churns.
    let hot = filtered(&router, &actor, "hot");
    let mut hot_members = Vec::new();
    let mut hot_queues = Vec::new();
    for i in 0..100u64 {
        let session = CHURN_SESSIONS + i;
        let (outbox, rx, _) = Outbox::channel(BATCH as usize, usize::MAX);
        let mut m = router.membership(session, 1024);
        m.replace(&hot, &subscriber(session, &outbox, TOPIC), Reply::None)
            .expect("subscribed");
        hot_members.push(m);
        hot_queues.push(rx);
    }
    let ids = vec![router.subscription_id(&hot[0]).expect("entry")];
    let upstream = router.layout().publish_topic(
        actor.scope(),
        ClientTopic::parse(TOPIC).expect("valid topic"),
        Some("hot"),
    );
    let payload = envelope::wrap(&data_of(64), "publisher-socket", true);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let churned = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let churner = {
        let (stop, churned) = (stop.clone(), churned.clone());
        let mut members: Vec<Membership> = members.drain(2..).collect();
        let (router, actor) = (router.clone(), actor.clone());
        let outboxes: Vec<Outbox> = outboxes.drain(2..).collect();
        std::thread::spawn(move || {
            let mut i = 0usize;
            while !stop.load(Ordering::Relaxed) {
                let s = i % members.len();
                let k = (i / members.len()) % CHURN_PER_SESSION;
                let topic = format!("{TOPIC}#{k}");
                members[s].remove(&topic);
                let f = filtered(&router, &actor, &format!("s{}-{k}", s + 2));
                let sub = Subscriber {
                    session: s as u64 + 2,
                    topic: topic.as_str().into(),
                    actor: actor.clone(),
                    check_delivery: false,
                    socket_id: "churn".into(),
                    outbox: outboxes[s].clone(),
                };
                let _ = members[s].replace(&f, &sub, Reply::None);
                churned.fetch_add(1, Ordering::Relaxed);
                i += 1;
            }
        })
    };
    g.throughput(Throughput::Elements(100));
    g.bench_function(
        "dispatch to 100 subscribers while another thread churns",
        |b| {
            b.iter_custom(|iters| {
                let mut timed = Duration::ZERO;
                let mut left = iters;
                while left > 0 {
                    let batch = left.min(BATCH);
                    let start = Instant::now();
                    for _ in 0..batch {
                        router.dispatch(black_box(&upstream), black_box(&ids), payload.clone());
                    }
                    timed += start.elapsed();
                    for q in &mut hot_queues {
                        while q.try_recv().is_some() {}
                    }
                    left -= batch;
                }
                timed
            })
        },
    );
    stop.store(true, Ordering::Relaxed);
    let _ = churner.join();
    assert_eq!(router.orphans.load(Ordering::Relaxed), 0, "no orphans");
    g.finish();
    println!(
        "churn thread: {} unsubscribe+resubscribe pairs during the dispatch bench",
        churned.load(Ordering::Relaxed)
    );
}

criterion_group!(benches, fanout, churn);
criterion_main!(benches);
