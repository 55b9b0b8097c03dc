//! The publishes one upstream connection holds until the broker has them: queued per
//! namespace and served fairly, so one tenant's backlog never delays another's traffic.
//!
//! ## Why lanes
//!
//! Until issue 12's bench found it, the outbox was one FIFO. A QoS 1 publish waits for a slot
//! of the broker's in-flight window (its Receive Maximum), and a FIFO keeps everything behind
//! it waiting too: on a broker slow to acknowledge QoS 1 (NATS's gateway writes QoS 1 to
//! JetStream; RabbitMQ), one tenant's QoS 1 backlog held every other tenant's QoS 0 traffic on
//! that pool connection — churn bystanders on cuttle-nats got nothing for 5 s. And one
//! byte budget per connection let one tenant's backlog refuse everybody's publishes.
//!
//! So publishes queue in **lanes**, one per namespace (the topic's first `namespace_depth`
//! levels: `[prefix/]app/scope`, or a reserved `_` namespace), and:
//!
//! - **Order** is kept within a lane, so per topic (a topic is in one lane, and one pool
//!   connection carries all of a topic's publishes). Lanes are independent: MQTT promises no
//!   order across topics either.
//! - **Service** is deficit round robin by bytes ([`QUANTUM`] a turn), so a lane of 1 MiB
//!   messages gets the socket's bytes in the same share as a lane of 64-byte ones.
//! - **The in-flight window**: a lane whose next publish is QoS 1 while the window is full
//!   steps aside (to `waiting`), so lanes with QoS 0 at their head go on. As slots free, the
//!   longest-waiting lanes get them first; a turn takes one slot at most.
//! - **Bytes** (queued and in flight until acknowledged) are bounded per connection and per
//!   lane (a quarter of the connection's budget by default): a lane at its bound refuses its
//!   own publishes ([`PublishError::Saturated`]) and leaves room for at least three others.
//!
//! The outbox is plain data under the connection's short lock; callers never await on it.

use std::collections::VecDeque;
use std::time::Instant;

use bytes::Bytes;
use rumqttc::v5::mqttbytes::QoS;
use tokio::sync::oneshot;

use super::codec;
use super::connection::PublishError;

pub(super) type AckSender = oneshot::Sender<Result<(), PublishError>>;

/// Bytes a lane may send per round-robin turn (deficit round robin's quantum).
const QUANTUM: usize = 16 << 10;

/// Bookkeeping bytes of one queued publish, counted against the bounds with its topic and
/// payload (many tiny publishes cost more than their payloads).
const PENDING_OVERHEAD: usize = 96;

/// A publish handed over and not yet acknowledged.
pub(super) struct Pending {
    pub topic: Bytes,
    pub qos: QoS,
    pub retain: bool,
    pub payload: Bytes,
    pub ack: Option<AckSender>,
    pub since: Instant,
    /// Hand-over order, to send unacknowledged publishes again in order after a reconnect.
    pub seq: u64,
    /// The lane it is queued in and whose bytes it holds (set by [`Outbox::push`]).
    lane: usize,
}

impl Pending {
    pub fn new(
        topic: Bytes,
        qos: QoS,
        retain: bool,
        payload: Bytes,
        ack: Option<AckSender>,
    ) -> Self {
        Self {
            topic,
            qos,
            retain,
            payload,
            ack,
            since: Instant::now(),
            seq: 0,
            lane: usize::MAX,
        }
    }

    pub fn cost(&self) -> usize {
        self.topic.len() + self.payload.len() + PENDING_OVERHEAD
    }

    /// The packet's size on the wire (near enough for the broker's Maximum Packet Size).
    pub fn packet_size(&self) -> usize {
        self.topic.len() + self.payload.len() + codec::PUBLISH_OVERHEAD
    }

    fn waits_for_window(&self) -> bool {
        self.qos != QoS::AtMostOnce
    }
}

struct Lane {
    key: Bytes,
    queue: VecDeque<Pending>,
    /// Bytes of this lane's publishes queued or in flight.
    held: usize,
    /// Deficit round robin's credit, in bytes.
    deficit: usize,
    /// In `active` or `waiting` (it has queued publishes).
    scheduled: bool,
    /// Its quantum for the current turn was granted.
    in_turn: bool,
}

/// The queue of one upstream connection (module docs).
pub(super) struct Outbox {
    lanes: slab::Slab<Lane>,
    /// Namespace → lane.
    index: std::collections::HashMap<Bytes, usize>,
    /// Lanes that may send, in service order; the front one is having its turn.
    active: VecDeque<usize>,
    /// Lanes whose next publish needs a window slot, longest waiting first.
    waiting: VecDeque<usize>,
    /// Publishes queued (not yet taken by [`Outbox::pop`]).
    queued: usize,
    held: usize,
    max_held: usize,
    max_lane_held: usize,
    namespace_depth: usize,
    next_seq: u64,
}

impl Outbox {
    /// `max_held` bytes in all, `max_lane_held` per namespace.
    pub fn new(max_held: usize, max_lane_held: usize, namespace_depth: usize) -> Self {
        Self {
            lanes: slab::Slab::new(),
            index: std::collections::HashMap::new(),
            active: VecDeque::new(),
            waiting: VecDeque::new(),
            queued: 0,
            held: 0,
            max_held,
            max_lane_held: max_lane_held.min(max_held),
            namespace_depth,
            next_seq: 0,
        }
    }

    /// Queues `p` at the back of its namespace's lane. `Ok(true)`: the lane had nothing queued
    /// (the connection's task should be woken).
    pub fn push(&mut self, mut p: Pending) -> Result<bool, PublishError> {
        let cost = p.cost();
        if self.held + cost > self.max_held {
            return Err(PublishError::Saturated);
        }
        let key = namespace(&p.topic, self.namespace_depth);
        let lane = match self.index.get(key.as_ref()) {
            Some(&lane) => lane,
            None => {
                // Refused before a lane is made: a refused publish leaves nothing behind.
                if cost > self.max_lane_held {
                    return Err(PublishError::Saturated);
                }
                let lane = self.lanes.insert(Lane {
                    key: key.clone(),
                    queue: VecDeque::new(),
                    held: 0,
                    deficit: 0,
                    scheduled: false,
                    in_turn: false,
                });
                self.index.insert(key, lane);
                lane
            }
        };
        let Some(l) = self.lanes.get_mut(lane) else {
            return Err(PublishError::Closed); // unreachable: the index names live lanes
        };
        if l.held + cost > self.max_lane_held {
            return Err(PublishError::Saturated);
        }
        l.held += cost;
        self.held += cost;
        p.lane = lane;
        p.seq = self.next_seq;
        self.next_seq += 1;
        l.queue.push_back(p);
        self.queued += 1;
        let wake = !l.scheduled;
        if wake {
            l.scheduled = true;
            self.active.push_back(lane);
        }
        Ok(wake)
    }

    /// Lets up to `free_slots` lanes waiting for a window slot go first again (call before
    /// [`Outbox::pop`] with the slots the window has free).
    pub fn admit(&mut self, free_slots: usize) {
        let n = free_slots.min(self.waiting.len());
        for lane in self.waiting.drain(..n).rev() {
            self.active.push_front(lane);
        }
    }

    /// The next publish to write, if any may go: `window_open` says whether a QoS 1 publish
    /// may take a window slot now. The caller writes it, then (QoS 0, or refused) calls
    /// [`Outbox::release`], or keeps it in flight until its acknowledgement.
    pub fn pop(&mut self, window_open: bool) -> Option<Pending> {
        loop {
            let &lane = self.active.front()?;
            let Some(l) = self.lanes.get_mut(lane) else {
                self.active.pop_front(); // unreachable: scheduled lanes are live
                continue;
            };
            let Some(front) = l.queue.front() else {
                self.active.pop_front();
                l.scheduled = false;
                l.in_turn = false;
                l.deficit = 0;
                self.reap(lane);
                continue;
            };
            if front.waits_for_window() && !window_open {
                self.active.pop_front();
                l.in_turn = false;
                self.waiting.push_back(lane);
                continue;
            }
            let cost = front.cost();
            if !l.in_turn {
                l.in_turn = true;
                // What a turn leaves unspent (less than the head's cost) carries over, so a
                // big publish goes after enough turns; a lane gains nothing while it waits
                // for the window (it is set aside before this).
                l.deficit = (l.deficit + QUANTUM).min(QUANTUM + cost);
            }
            if cost > l.deficit {
                l.in_turn = false;
                self.active.rotate_left(1);
                continue;
            }
            l.deficit -= cost;
            let p = l.queue.pop_front()?;
            self.queued -= 1;
            // One window slot a turn: slots, not bytes, are what QoS 1 lanes compete for.
            let end_turn = l.queue.is_empty() || p.waits_for_window();
            if end_turn {
                l.in_turn = false;
                if l.queue.is_empty() {
                    l.scheduled = false;
                    l.deficit = 0;
                    self.active.pop_front();
                } else {
                    self.active.rotate_left(1);
                }
            }
            return Some(p);
        }
    }

    /// `p`'s bytes are no longer held (acknowledged, written at QoS 0, refused or failed).
    pub fn release(&mut self, p: &Pending) {
        let cost = p.cost();
        self.held = self.held.saturating_sub(cost);
        if let Some(l) = self.lanes.get_mut(p.lane) {
            l.held = l.held.saturating_sub(cost);
        }
        self.reap(p.lane);
    }

    /// Puts unacknowledged publishes back at the front of their lanes, in hand-over order,
    /// to be sent again first (their bytes are still held).
    pub fn requeue(&mut self, mut again: Vec<Pending>) {
        again.sort_by_key(|p| p.seq);
        for p in again.into_iter().rev() {
            let lane = p.lane;
            let Some(l) = self.lanes.get_mut(lane) else {
                continue; // unreachable: a lane lives while it holds bytes
            };
            l.queue.push_front(p);
            self.queued += 1;
            if !l.scheduled {
                l.scheduled = true;
                self.active.push_back(lane);
            }
        }
    }

    /// Takes every queued publish out (the connection has ended); nothing is held after.
    pub fn drain(&mut self) -> Vec<Pending> {
        let mut all = Vec::with_capacity(self.queued);
        for (_, l) in self.lanes.iter_mut() {
            all.extend(l.queue.drain(..));
        }
        self.lanes.clear();
        self.index.clear();
        self.active.clear();
        self.waiting.clear();
        self.queued = 0;
        self.held = 0;
        all
    }

    /// No publish is queued (some may be in flight).
    pub fn is_empty(&self) -> bool {
        self.queued == 0
    }

    /// Bytes held, queued or in flight.
    #[cfg(test)]
    pub fn held(&self) -> usize {
        self.held
    }

    /// Lanes alive (holding bytes).
    #[cfg(test)]
    pub fn lane_count(&self) -> usize {
        self.lanes.len()
    }

    /// Drops a lane that holds nothing and has nothing queued.
    fn reap(&mut self, lane: usize) {
        let Some(l) = self.lanes.get(lane) else {
            return;
        };
        if l.held == 0 && l.queue.is_empty() && !l.scheduled {
            let l = self.lanes.remove(lane);
            self.index.remove(&l.key);
        }
    }
}

/// The topic's namespace: its first `depth` levels (all of it when shorter).
fn namespace(topic: &Bytes, depth: usize) -> Bytes {
    let mut seen = 0;
    for (i, b) in topic.iter().enumerate() {
        if *b == b'/' {
            seen += 1;
            if seen == depth {
                return topic.slice(..i);
            }
        }
    }
    topic.clone()
}

#[cfg(test)]
mod tests;
