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
//! - the pending map holds at most one record per actor and forgets actors once written.
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
/// How long a written record is still served from memory without the broker's PUBACK.
const ACK_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Default)]
struct Pending {
    /// Records waiting for the next flush, by retained topic.
    records: HashMap<Arc<str>, Bytes>,
    /// Records sent and not yet acknowledged: a reconnect reading the broker now could still
    /// get the previous record (its SUBSCRIBE may travel on another pool connection).
    unacked: HashMap<Arc<str>, Bytes>,
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

    /// Writes every waiting record now (at shutdown, and from the flush task).
    pub fn flush(self: &Arc<Self>) {
        let records = std::mem::take(&mut self.pending.lock().records);
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
        if !retry.is_empty() {
            let mut p = self.pending.lock();
            for (topic, record) in retry {
                // A newer submission wins over the one that could not be sent.
                p.records.entry(topic).or_insert(record);
            }
        }
    }
}

async fn flush_loop(w: Arc<RestoreWriter>) {
    loop {
        w.poke.notified().await;
        // Gather everything submitted during the interval into one write per actor.
        tokio::time::sleep(WRITE_INTERVAL).await;
        w.flush();
        if w.pending_count() > 0 {
            w.poke.notify_one();
        }
    }
}
