//! Finding (issue 8): the outbox was bounded in frames only, so five paused subscribers of
//! ~900 KB frames held 1.2 GB (`send_queue: 256`). Now each connection's queue also holds at
//! most `limits.send_queue_bytes`, and a subscriber over it is closed (1013).
//!
//! The bound is measured as the process's resident memory while the frames fan out. This is
//! the only test in its binary so that no other test's allocations blur the figure, and the
//! broker is Mosquitto so that the broker's own buffering is not in this process either.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use common::server::*;
use common::*;
use rmpv::Value;

/// Resident set size of this process, in bytes (Linux).
fn rss_bytes() -> usize {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("/proc/self/statm (Linux)");
    let pages: usize = statm
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("statm resident field");
    pages * 4096
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paused_subscribers_of_large_frames_hold_at_most_send_queue_bytes() {
    const PAUSED: usize = 5;
    const FRAMES: usize = 200;
    const FRAME: usize = 900_000;
    const QUEUE_BYTES: usize = 4 << 20;
    let p = start_proxy(
        TestBroker::Mosquitto,
        &format!(
            "limits: {{ send_queue: 256, send_queue_bytes: {QUEUE_BYTES}, publish_per_second: 100000 }}"
        ),
    )
    .await;
    let mut publ = Client::login(&p.url, &hs256(&user_claims("alice"))).await;
    let blob = Value::Binary(vec![7; FRAME]);
    let publish = map(&[
        ("type", "publish".into()),
        ("topic", "chat/general/messages".into()),
        ("data", blob),
        ("qos", 0.into()),
    ]);
    let frame = encode(&publish);

    // Warm-up: the same large frames through the proxy with one reading subscriber, so the
    // allocator's arenas and every buffer on the path have grown before the baseline.
    let mut reader = Client::login(&p.url, SENSOR1_TOKEN).await;
    reader.subscribe("chat/general/messages").await;
    for _ in 0..10 {
        publ.send_raw(frame.clone()).await;
        reader.frame_of("message").await;
    }
    drop(reader);

    let mut paused = Vec::new();
    for _ in 0..PAUSED {
        let mut c = Client::login(&p.url, SENSOR1_TOKEN).await;
        c.subscribe("chat/general/messages").await;
        paused.push(c); // and never read again
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let baseline = rss_bytes();
    let peak = Arc::new(AtomicUsize::new(baseline));
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let (peak, sampling) = (peak.clone(), sampling.clone());
        tokio::spawn(async move {
            while sampling.load(Ordering::Relaxed) {
                peak.fetch_max(rss_bytes(), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };

    for i in 0..FRAMES {
        publ.send_raw(frame.clone()).await;
        if i % 10 == 9 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    // Every paused subscriber is closed for its queue, not kept.
    tokio::time::timeout(Duration::from_secs(20), async {
        while p.proxy.open_connections() > 1 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "{} paused subscribers still open",
            p.proxy.open_connections() - 1
        )
    });
    sampling.store(false, Ordering::Relaxed);
    sampler.await.unwrap();
    let growth = peak.load(Ordering::Relaxed).saturating_sub(baseline);
    let fanned_out = PAUSED * FRAMES * FRAME;
    println!(
        "{PAUSED} paused subscribers × {FRAMES} frames of {FRAME} B ({} MB fanned out): \
         peak RSS growth {:.1} MB (baseline {:.1} MB)",
        fanned_out >> 20,
        growth as f64 / 1048576.0,
        baseline as f64 / 1048576.0
    );
    // Each paused subscriber may hold its queue's bytes plus the frame being written; the rest
    // is the publisher's and the pool's transient buffers. A queue counted in frames (256) would have
    // held all 200 frames, 180 MB, shared by the five.
    let bound = PAUSED * (QUEUE_BYTES + 2 * FRAME) + 16 * FRAME;
    assert!(
        growth <= bound,
        "RSS grew {growth} bytes (bound {bound}) with {PAUSED} paused subscribers"
    );
    for mut c in paused {
        // The close frame may not get through a full socket; when it does, it says why.
        if let Some((code, reason)) = c.closed_within(10_000).await {
            assert_eq!(code, 1013, "{reason}");
        }
    }
}
