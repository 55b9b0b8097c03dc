//! Where reconnect-restore records live (PROTOCOL §13): retained messages in the broker, one
//! per (project, scope, actor), so any replica can read them.
//!
//! Writes are the expensive part — a record is republished whole — so they are made cheap
//! and bounded here:
//! - sessions submit a record only when their set changed (the session compares);
//! - submissions for one actor coalesce replica-wide: whatever its sockets submit, the broker
//!   gets at most one write per actor per [`WRITE_INTERVAL`], carrying the latest record;
//! - a record is never larger than the broker accepts (checked against its Maximum Packet
//!   Size) — the session already capped it at `limits.restore_bytes`;
//! - the pending map holds at most one record per actor and forgets actors once written;
//! - a flush writes at most [`FLUSH_RECORDS`] records, the next backlog flush follows
//!   [`BACKLOG_PAUSE`] later: a burst of new actors (a presence join storm writes one record
//!   each) never fills the pool's request queues, which every tenant's publishes share.
//!
//! A reconnect on this replica reads a pending (not yet written) record first: it is newer
//! than what the broker holds.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use parking_lot::Mutex;
use tokio::sync::Notify;

use crate::upstream::{Pool, PublishError, publish_qos};

/// At most one write per actor per interval.
pub const WRITE_INTERVAL: Duration = Duration::from_secs(1);
/// Records written per flush at most (a pool connection queues 1,024 requests).
pub const FLUSH_RECORDS: usize = 128;
/// Pause between flushes while records are waiting (up to 1,280 records per second).
const BACKLOG_PAUSE: Duration = Duration::from_millis(100);
/// How long a written record is still served from memory without the broker's PUBACK.
const ACK_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Default)]
struct Pending {
    /// Records waiting for the next flush, by retained topic.
    records: HashMap<Arc<str>, Bytes>,
    /// Records sent and not yet acknowledged: a reconnect reading the broker now could still
    /// get the previous record (its SUBSCRIBE may travel on another pool connection).
    unacked: HashMap<Arc<str>, Bytes>,
    /// When each topic was last written, for [`WRITE_INTERVAL`] (entries older than it are
    /// forgotten at every flush).
    written: HashMap<Arc<str>, tokio::time::Instant>,
}

/// The replica-wide writer of restore records.
#[derive(Debug)]
pub struct RestoreWriter {
    pool: Arc<Pool>,
    pending: Mutex<Pending>,
    poke: Notify,
}

impl RestoreWriter {
    /// Starts the writer's flush task. Must be called inside a Tokio runtime.
    pub fn start(pool: Arc<Pool>) -> Arc<Self> {
        let w = Arc::new(Self {
            pool,
            pending: Mutex::new(Pending::default()),
            poke: Notify::new(),
        });
        tokio::spawn(flush_loop(w.clone()));
        w
    }

    /// Submits the latest record for `topic` (an empty record clears it). Replaces a record
    /// of the same topic that is still waiting.
    pub fn submit(&self, topic: &str, record: Bytes) {
        let mut p = self.pending.lock();
        match p.records.get_mut(topic) {
            Some(r) => *r = record,
            None => {
                p.records.insert(topic.into(), record);
            }
        }
        drop(p);
        self.poke.notify_one();
    }

    /// The record for `topic` submitted on this replica and not yet acknowledged by the
    /// broker, if any.
    pub fn pending(&self, topic: &str) -> Option<Bytes> {
        let p = self.pending.lock();
        p.records
            .get(topic)
            .or_else(|| p.unacked.get(topic))
            .cloned()
    }

    /// Records waiting to be written.
    pub fn pending_count(&self) -> usize {
        self.pending.lock().records.len()
    }

    /// Writes every waiting record now (at shutdown), as fast as the pool takes them.
    pub fn flush(self: &Arc<Self>) {
        while self.flush_some(usize::MAX, false) > 0 {}
    }

    /// Writes up to `max` waiting records; `paced`: only topics not written within
    /// [`WRITE_INTERVAL`]. Returns how many were handed to the pool.
    fn flush_some(self: &Arc<Self>, max: usize, paced: bool) -> usize {
        let records: Vec<(Arc<str>, Bytes)> = {
            let mut p = self.pending.lock();
            let now = tokio::time::Instant::now();
            p.written
                .retain(|_, at| now.duration_since(*at) < WRITE_INTERVAL);
            let due: Vec<Arc<str>> = p
                .records
                .keys()
                .filter(|t| !paced || !p.written.contains_key(*t))
                .take(max)
                .cloned()
                .collect();
            due.into_iter()
                .filter_map(|t| {
                    let r = p.records.remove(&t)?;
                    p.written.insert(t.clone(), now);
                    Some((t, r))
                })
                .collect()
        };
        let sent = records.len();
        let mut retry = Vec::new();
        let mut acks = Vec::new();
        for (topic, record) in records {
            let max = self.pool.max_payload(&topic);
            if record.len() > max {
                tracing::warn!(
                    topic = %topic,
                    bytes = record.len(),
                    max,
                    "subscription set larger than the broker accepts; not stored"
                );
                continue;
            }
            let (ack, acked) = tokio::sync::oneshot::channel();
            match self.pool.publish(
                topic.to_string(),
                publish_qos(1),
                true,
                record.clone(),
                Some(ack),
            ) {
                Ok(()) => {
                    self.pending
                        .lock()
                        .unacked
                        .insert(topic.clone(), record.clone());
                    acks.push(async move {
                        let _ = tokio::time::timeout(ACK_TIMEOUT, acked).await;
                        (topic, record)
                    });
                }
                Err(PublishError::Saturated) => retry.push((topic, record)),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot store a subscription set for reconnect restore");
                }
            }
        }
        if !acks.is_empty() {
            // One task per flush, not per record, forgets each record as its PUBACK comes.
            let w = self.clone();
            tokio::spawn(async move {
                let mut acks: FuturesUnordered<_> = acks.into_iter().collect();
                while let Some((topic, record)) = acks.next().await {
                    let mut p = w.pending.lock();
                    // Only this write's own record: a later one is still on its way.
                    if p.unacked.get(&topic) == Some(&record) {
                        p.unacked.remove(&topic);
                    }
                }
            });
        }
        let refused = retry.len();
        if !retry.is_empty() {
            let mut p = self.pending.lock();
            for (topic, record) in retry {
                // A newer submission wins over the one that could not be sent.
                p.records.entry(topic).or_insert(record);
            }
        }
        sent - refused
    }
}

async fn flush_loop(w: Arc<RestoreWriter>) {
    loop {
        w.poke.notified().await;
        // Gather everything submitted during the interval into one write per actor.
        tokio::time::sleep(WRITE_INTERVAL).await;
        // Then work through the backlog in small flushes, so the pool keeps room for
        // everyone else's publishes.
        while w.flush_some(FLUSH_RECORDS, true) > 0 && w.pending_count() > 0 {
            tokio::time::sleep(BACKLOG_PAUSE).await;
        }
        if w.pending_count() > 0 {
            w.poke.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::{Dispatch, Endpoint};

    struct Nobody;

    impl Dispatch for Nobody {
        fn dispatch(&self, _: &str, _: &[usize], _: Bytes) {}
        fn subscription_result(&self, _: &str, _: usize, _: bool) {}
    }

    /// A pool that never connects: publishes are queued (and never acknowledged).
    fn pool() -> Arc<Pool> {
        let loaded = crate::config::load_str(
            "upstream: { pool: 1 }\npolicy: { projects: [] }\n",
            std::path::Path::new("/nonexistent/proxy.yaml"),
            &|_| None,
        )
        .unwrap_or_else(|d| panic!("{d}"));
        let endpoint = Endpoint {
            host: "127.0.0.1".into(),
            port: 1,
            tls: false,
        };
        Pool::start(
            &loaded.settings.upstream,
            vec![endpoint],
            1 << 20,
            Arc::new(Nobody),
        )
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_of_actors_is_written_in_small_paced_flushes() {
        let w = RestoreWriter::start(pool());
        for i in 0..1000 {
            w.submit(
                &format!("_/restore/v2/p/_/actor-{i}"),
                Bytes::from_static(b"\x80"),
            );
        }
        // Nothing before the coalescing interval, then FLUSH_RECORDS per flush.
        tokio::time::sleep(WRITE_INTERVAL - Duration::from_millis(10)).await;
        assert_eq!(w.pending_count(), 1000);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(w.pending_count(), 1000 - FLUSH_RECORDS);
        tokio::time::sleep(BACKLOG_PAUSE).await;
        assert_eq!(w.pending_count(), 1000 - 2 * FLUSH_RECORDS);
        // All of it within a second more, and every record only once: pending reads serve
        // the written (unacknowledged) ones.
        tokio::time::sleep(WRITE_INTERVAL).await;
        assert_eq!(w.pending_count(), 0);
        assert!(w.pending("_/restore/v2/p/_/actor-999").is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn one_actor_is_written_at_most_once_per_interval_even_with_a_backlog() {
        let w = RestoreWriter::start(pool());
        for i in 0..(3 * FLUSH_RECORDS) {
            w.submit(
                &format!("_/restore/v2/p/_/actor-{i}"),
                Bytes::from_static(b"\x80"),
            );
        }
        tokio::time::sleep(WRITE_INTERVAL + Duration::from_millis(10)).await;
        // actor-0 was in the first flush (or not yet); a new submission of a written actor
        // waits out its interval while the backlog drains.
        let written: Vec<usize> = (0..3 * FLUSH_RECORDS)
            .filter(|i| {
                w.pending
                    .lock()
                    .written
                    .contains_key(format!("_/restore/v2/p/_/actor-{i}").as_str())
            })
            .collect();
        assert_eq!(written.len(), FLUSH_RECORDS);
        let again = format!("_/restore/v2/p/_/actor-{}", written[0]);
        w.submit(&again, Bytes::from_static(b"\x81"));
        tokio::time::sleep(BACKLOG_PAUSE * 3).await;
        assert!(
            w.pending.lock().records.contains_key(again.as_str()),
            "written again within the interval"
        );
        tokio::time::sleep(WRITE_INTERVAL * 2).await;
        assert_eq!(w.pending_count(), 0);
    }
}
