//! The outbox's scheduling: deterministic cases for each rule, and a seeded model-based test
//! driving random pushes, fills, acknowledgements and reconnects against per-lane FIFOs.

use super::*;
use std::collections::{HashMap, VecDeque};

const DEPTH: usize = 2;

fn publish(ns: &str, n: usize, qos: QoS, payload: usize) -> Pending {
    let topic = Bytes::from(format!("{ns}/t/{n}"));
    Pending::new(topic, qos, false, Bytes::from(vec![0u8; payload]), None)
}

fn lane_of(p: &Pending) -> String {
    String::from_utf8_lossy(&namespace(&p.topic, DEPTH)).into_owned()
}

const Q0: QoS = QoS::AtMostOnce;
const Q1: QoS = QoS::AtLeastOnce;

#[test]
fn the_namespace_is_the_first_levels_of_the_topic() {
    assert_eq!(
        &namespace(&Bytes::from_static(b"app/acme/room/x"), 2)[..],
        b"app/acme"
    );
    assert_eq!(
        &namespace(&Bytes::from_static(b"pre/app/acme/r"), 3)[..],
        b"pre/app/acme"
    );
    assert_eq!(
        &namespace(&Bytes::from_static(b"app/acme"), 2)[..],
        b"app/acme"
    );
    assert_eq!(&namespace(&Bytes::from_static(b"short"), 2)[..], b"short");
}

/// Regression (issue 12's bench): one FIFO held every lane's QoS 0 behind a QoS 1 publish
/// waiting for a window slot.
#[test]
fn qos_0_of_another_lane_passes_a_lane_waiting_for_the_window() {
    let mut o = Outbox::new(1 << 20, 1 << 20, DEPTH);
    for i in 0..10 {
        o.push(publish("app/slow", i, Q1, 100)).unwrap();
    }
    o.push(publish("app/fast", 0, Q0, 100)).unwrap();
    o.push(publish("app/fast", 1, Q1, 100)).unwrap();
    // Window full: only the QoS 0 publish may go; the lanes with QoS 1 heads step aside.
    let p = o.pop(false).expect("the QoS 0 publish");
    assert_eq!((lane_of(&p), p.qos), ("app/fast".to_string(), Q0));
    assert!(o.pop(false).is_none());
    // A slot frees: the lane that waited longest (app/slow) gets it, then app/fast.
    o.admit(2);
    let a = o.pop(true).unwrap();
    let b = o.pop(true).unwrap();
    assert_eq!(
        (lane_of(&a), lane_of(&b)),
        ("app/slow".into(), "app/fast".into())
    );
}

#[test]
fn order_is_kept_within_a_lane_and_across_a_requeue() {
    let mut o = Outbox::new(1 << 20, 1 << 20, DEPTH);
    for i in 0..6 {
        o.push(publish("app/a", i, Q1, 10)).unwrap();
    }
    let first: Vec<Pending> = (0..3).map(|_| o.pop(true).unwrap()).collect();
    assert_eq!(
        first.iter().map(|p| p.seq).collect::<Vec<_>>(),
        vec![0, 1, 2]
    );
    // The connection is lost with all three in flight, handed back out of order.
    let mut again = first;
    again.reverse();
    o.requeue(again);
    let order: Vec<u64> = std::iter::from_fn(|| o.pop(true)).map(|p| p.seq).collect();
    assert_eq!(order, vec![0, 1, 2, 3, 4, 5]);
}

/// Deficit round robin: a lane of big publishes and a lane of small ones share the socket's
/// bytes evenly, not its publish count.
#[test]
fn lanes_share_bytes_not_publishes() {
    let mut o = Outbox::new(64 << 20, 64 << 20, DEPTH);
    for i in 0..200 {
        o.push(publish("app/big", i, Q0, 8 << 10)).unwrap();
    }
    for i in 0..20_000 {
        o.push(publish("app/small", i, Q0, 64)).unwrap();
    }
    let mut bytes: HashMap<String, usize> = HashMap::new();
    let mut total = 0;
    while total < 1 << 20 {
        let p = o.pop(true).unwrap();
        total += p.cost();
        *bytes.entry(lane_of(&p)).or_default() += p.cost();
        o.release(&p);
    }
    let (big, small) = (bytes["app/big"], bytes["app/small"]);
    assert!(
        big.abs_diff(small) <= 2 * QUANTUM,
        "big {big} B, small {small} B"
    );
}

/// QoS 1 lanes compete for window slots: as slots free one at a time, they go round the
/// lanes, whatever each lane's backlog.
#[test]
fn window_slots_go_round_the_lanes() {
    let mut o = Outbox::new(64 << 20, 64 << 20, DEPTH);
    for i in 0..1000 {
        o.push(publish("app/hog", i, Q1, 10)).unwrap();
    }
    for i in 0..10 {
        o.push(publish("app/b", i, Q1, 10)).unwrap();
        o.push(publish("app/c", i, Q1, 10)).unwrap();
    }
    let window = 4;
    let mut inflight: VecDeque<Pending> = VecDeque::new();
    let mut served: HashMap<String, usize> = HashMap::new();
    for _ in 0..30 {
        o.admit(window - inflight.len());
        while let Some(p) = o.pop(inflight.len() < window) {
            *served.entry(lane_of(&p)).or_default() += 1;
            inflight.push_back(p);
        }
        // The broker acknowledges the oldest one.
        let p = inflight.pop_front().unwrap();
        o.release(&p);
    }
    // 33 slots in all; the two small lanes had 10 each queued and got them all.
    assert_eq!((served["app/b"], served["app/c"]), (10, 10), "{served:?}");
}

#[test]
fn a_lane_at_its_bound_refuses_only_its_own_publishes() {
    let cost = publish("app/a", 0, Q1, 1000).cost();
    let mut o = Outbox::new(40 * cost, 10 * cost, DEPTH);
    for i in 0..10 {
        o.push(publish("app/a", i, Q1, 1000)).unwrap();
    }
    assert_eq!(
        o.push(publish("app/a", 10, Q1, 1000)),
        Err(PublishError::Saturated)
    );
    for ns in ["app/b", "app/c", "app/d"] {
        for i in 0..10 {
            o.push(publish(ns, i, Q0, 1000)).unwrap();
        }
    }
    // The connection's own bound is reached now.
    assert_eq!(o.held(), 40 * cost);
    assert_eq!(
        o.push(publish("app/e", 0, Q0, 1000)),
        Err(PublishError::Saturated)
    );
    // Bytes come back as publishes are written (QoS 0) or acknowledged (QoS 1), and lanes
    // that hold nothing are dropped.
    while let Some(p) = o.pop(true) {
        o.release(&p);
    }
    assert_eq!((o.held(), o.lane_count()), (0, 0));
    o.push(publish("app/e", 0, Q0, 1000)).unwrap();
}

/// A small deterministic generator (xorshift64*), so a failing seed replays exactly.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// The reference: per lane, the queued publishes (seq, qos, cost) in order.
#[derive(Default)]
struct Model {
    lanes: HashMap<String, VecDeque<(u64, QoS, usize)>>,
    inflight: Vec<(String, u64, usize)>,
    next_seq: u64,
}

impl Model {
    fn held(&self) -> usize {
        let queued: usize = self.lanes.values().flatten().map(|(_, _, c)| c).sum();
        queued + self.inflight.iter().map(|(_, _, c)| c).sum::<usize>()
    }
    fn lane_held(&self, lane: &str) -> usize {
        let queued: usize = self
            .lanes
            .get(lane)
            .into_iter()
            .flatten()
            .map(|(_, _, c)| c)
            .sum();
        queued
            + self
                .inflight
                .iter()
                .filter(|(l, _, _)| l == lane)
                .map(|(_, _, c)| c)
                .sum::<usize>()
    }
}

/// Random pushes (5 lanes, QoS 0 and 1, 0..3 KiB), fills like the connection's (admit, then
/// pop while the window allows), acknowledgements in random order and reconnects, against
/// the model: every publish comes out at the head of its lane, refusals happen exactly at the
/// bounds, a fill stops only when nothing may go, and bytes and lanes are accounted exactly.
#[test]
fn model_based_outbox() {
    let seeds = 200;
    for seed in 1..=seeds {
        run_model(seed);
    }
}

fn run_model(seed: u64) {
    let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let max_held = 60_000;
    let max_lane = 20_000;
    let window = 1 + rng.below(8) as usize;
    let mut o = Outbox::new(max_held, max_lane, DEPTH);
    let mut m = Model::default();
    let mut inflight: Vec<Pending> = Vec::new();
    for step in 0..2_000 {
        let ctx = format!("seed {seed} step {step} window {window}");
        match rng.below(10) {
            0..=4 => {
                let lane = format!("app/s{}", rng.below(5));
                let qos = if rng.below(2) == 0 { Q0 } else { Q1 };
                let p = publish(&lane, step, qos, rng.below(3000) as usize);
                let cost = p.cost();
                let fits = m.held() + cost <= max_held && m.lane_held(&lane) + cost <= max_lane;
                match o.push(p) {
                    Ok(_) => {
                        assert!(fits, "{ctx}: accepted over a bound");
                        m.lanes
                            .entry(lane)
                            .or_default()
                            .push_back((m.next_seq, qos, cost));
                        m.next_seq += 1;
                    }
                    Err(e) => {
                        assert_eq!(e, PublishError::Saturated, "{ctx}");
                        assert!(!fits, "{ctx}: refused within the bounds");
                    }
                }
            }
            5..=7 => {
                // A fill, as `Session::fill` does it.
                o.admit(window.saturating_sub(inflight.len()));
                while let Some(p) = o.pop(inflight.len() < window) {
                    let lane = lane_of(&p);
                    let head = m.lanes.get_mut(&lane).and_then(|q| q.pop_front());
                    assert_eq!(head.map(|h| h.0), Some(p.seq), "{ctx}: out of lane order");
                    if p.qos == Q0 {
                        o.release(&p);
                    } else {
                        assert!(inflight.len() < window, "{ctx}: over the window");
                        m.inflight.push((lane, p.seq, p.cost()));
                        inflight.push(p);
                    }
                }
                // Stopped: nothing may go. No lane has a QoS 0 head, and QoS 1 heads wait
                // only for a full window.
                for (lane, q) in &m.lanes {
                    if let Some((seq, qos, _)) = q.front() {
                        assert_eq!(*qos, Q1, "{ctx}: {lane}'s QoS 0 head {seq} left behind");
                        assert_eq!(
                            inflight.len(),
                            window,
                            "{ctx}: {lane} waits, window not full"
                        );
                    }
                }
            }
            8 if !inflight.is_empty() => {
                let i = rng.below(inflight.len() as u64) as usize;
                let p = inflight.swap_remove(i);
                m.inflight.retain(|(_, s, _)| *s != p.seq);
                o.release(&p);
            }
            9 if rng.below(10) == 0 => {
                // The connection is lost: what is in flight goes back to the lane heads.
                let mut back: Vec<_> = std::mem::take(&mut m.inflight);
                back.sort_by_key(|(_, s, _)| *s);
                for (lane, seq, cost) in back.into_iter().rev() {
                    m.lanes.entry(lane).or_default().push_front((seq, Q1, cost));
                }
                o.requeue(std::mem::take(&mut inflight));
            }
            _ => {}
        }
        assert_eq!(o.held(), m.held(), "{ctx}: held bytes");
        let live = m
            .lanes
            .iter()
            .filter(|(l, q)| !q.is_empty() || m.lane_held(l) > 0);
        assert_eq!(o.lane_count(), live.count(), "{ctx}: lanes alive");
    }
}
