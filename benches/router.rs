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
use cuttle::router::{Outbox, Overflow, Router, Subscriber};
use cuttle::topic::{ClientFilter, ClientTopic};
use cuttle::upstream::Dispatch;
use cuttle::wire::{encode as wire_encode, envelope};
use support::{data_of, size_label};
use tokio::sync::mpsc;

const TOPIC: &str = "chat/general/messages";
/// Messages dispatched between two drains; also each subscriber's queue capacity.
const BATCH: u64 = 64;
/// A fresh router numbers its upstream filters from 1, and every subscriber here shares one
/// filter. Setup checks that a message with this id reaches everyone.
const SUBSCRIPTION_IDS: &[usize] = &[1];

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
    queues: Vec<mpsc::Receiver<Bytes>>,
    overflows: Vec<Arc<Overflow>>,
    upstream_topic: String,
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
        for session in 0..n as u64 {
            let (outbox, rx, overflow) = Outbox::channel(BATCH as usize);
            let sub = Subscriber {
                session,
                topic: TOPIC.into(),
                actor: actor.clone(),
                check_delivery: grant == SubscriptionGrant::CheckEachDelivery,
                socket_id: format!("{session:016x}").into(),
                outbox,
            };
            assert!(router.replace(&filters, 1, &sub), "subscribed");
            queues.push(rx);
            overflows.push(overflow);
        }
        assert_eq!(
            router.filter_count(),
            1,
            "one upstream filter shared by all"
        );
        Self {
            router,
            queues,
            overflows,
            upstream_topic,
        }
    }

    fn dispatch(&self, payload: &Bytes) {
        self.router.dispatch(
            black_box(&self.upstream_topic),
            black_box(SUBSCRIPTION_IDS),
            payload.clone(),
        );
    }

    /// Empties every queue; returns the number of frames taken.
    fn drain(&mut self) -> usize {
        let mut frames = 0;
        for q in &mut self.queues {
            while q.try_recv().is_ok() {
                frames += 1;
            }
        }
        frames
    }

    /// One message reaches every subscriber as the expected frame, and nothing overflowed.
    fn check(&mut self, payload: &Bytes, expected: &Bytes) {
        self.dispatch(payload);
        for q in &mut self.queues {
            assert_eq!(
                q.try_recv().ok().as_ref(),
                Some(expected),
                "frame delivered"
            );
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

criterion_group!(benches, fanout);
criterion_main!(benches);
