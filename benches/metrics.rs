//! What the metrics cost on the hot paths (`cuttle::metrics`), and what a scrape costs:
//! - **delivery**: one broker message fanned out (`RouterMetrics::fanned_out`: a counter add
//!   and a histogram observation, once per message whatever the number of recipients);
//! - **frame in**: one client frame counted by type (a family lookup and two adds);
//! - **frames out**: one written batch (two adds);
//! - **publish**: one accepted publish (one add);
//! - **scrape**: the whole exposition rendered, classic text and OpenMetrics.
//!
//! Run: `cargo bench --bench metrics` (`-- --test` runs each once as a smoke test).

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use cuttle::metrics::{Metrics, State};
use cuttle::policy::ActorType;

fn hot_paths(c: &mut Criterion) {
    let m = Metrics::new();
    let mut g = c.benchmark_group("metrics");
    g.bench_function("delivery (fanned_out)", |b| {
        b.iter(|| m.router.fanned_out(black_box(100)))
    });
    g.bench_function("frame in (by type)", |b| {
        b.iter(|| m.sessions.frame_in(black_box("publish"), black_box(120)))
    });
    g.bench_function("frames out (per batch)", |b| {
        b.iter(|| m.sessions.frames_out(black_box(64), black_box(64 * 1024)))
    });
    g.bench_function("publish", |b| {
        b.iter(|| m.sessions.published(black_box(ActorType::Device)))
    });
    let state = State::default();
    g.bench_function("scrape (text 0.0.4)", |b| {
        b.iter(|| black_box(m.render(&state, false)))
    });
    g.bench_function("scrape (OpenMetrics)", |b| {
        b.iter(|| black_box(m.render(&state, true)))
    });
    g.finish();
}

criterion_group!(benches, hot_paths);
criterion_main!(benches);
