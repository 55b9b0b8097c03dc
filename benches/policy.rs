//! Hot-path costs of the policy engine: authorize + map for a publish, subscription decisions,
//! and token resolution cached vs uncached for every credential kind.
//!
//! Run: `cargo bench --bench policy`. Figures are quoted in the README's "Performance" section.

#[path = "../tests/common/mod.rs"]
mod common;

use std::hint::black_box;

use common::*;
use criterion::{Criterion, criterion_group, criterion_main};
use cuttle::auth::session_token::{self, MintRequest};
use cuttle::policy::Access;
use cuttle::topic::upstream::TopicLayout;
use cuttle::topic::{ClientFilter, ClientTopic};
use jsonwebtoken::Algorithm;

fn authorize(c: &mut Criterion) {
    let auth = authenticator();
    let policy = auth.policy().clone();
    let layout = TopicLayout::new("").unwrap();
    let device = auth.authenticate(SENSOR1_TOKEN).unwrap();
    let alice = auth.authenticate(&hs256(&user_claims("alice"))).unwrap();

    let mut g = c.benchmark_group("authorize");
    g.bench_function("publish: parse + authorize + map (exact topic)", |b| {
        b.iter(|| {
            let t = ClientTopic::parse(black_box("chat/general/messages")).unwrap();
            policy.authorize(&device, t, Access::Write).unwrap();
            black_box(layout.publish_topic(device.scope(), t, None))
        })
    });
    g.bench_function("authorize only (exact topic)", |b| {
        let t = ClientTopic::parse("chat/general/messages").unwrap();
        b.iter(|| policy.authorize(black_box(&device), black_box(t), Access::Write))
    });
    g.bench_function("authorize private room member (exact topic)", |b| {
        let t = ClientTopic::parse("chat/vip/messages").unwrap();
        b.iter(|| policy.authorize(black_box(&alice), black_box(t), Access::Read))
    });
    g.bench_function("delivery check (wildcard subscription)", |b| {
        let t = ClientTopic::parse("chat/vip/messages").unwrap();
        b.iter(|| policy.authorize_delivery(black_box(&device), black_box(t)))
    });
    g.bench_function("subscribe: parse + authorize + filters (wildcard)", |b| {
        b.iter(|| {
            let f = ClientFilter::parse(black_box("chat/+/messages")).unwrap();
            policy.authorize_subscription(&device, &f).unwrap();
            black_box(
                layout
                    .subscription_filters(device.scope(), &f, &[], None)
                    .unwrap(),
            )
        })
    });
    g.bench_function("strip upstream topic", |b| {
        b.iter(|| black_box(layout.parse_upstream(black_box("chat/acme/general/messages/f"))))
    });
    g.finish();
}

fn tokens(c: &mut Criterion) {
    let auth = authenticator();
    let now = now();
    let hs = hs256(&user_claims("bob"));
    let mut rc = user_claims("bob");
    rc["iss"] = serde_json::json!("https://rsa.example.com");
    let rs = sign(Algorithm::RS256, Some("k1"), &rsa_key(), &rc);
    let session = session_token::mint(
        auth.policy(),
        &MintRequest {
            project: "demo".into(),
            ttl_s: 3600,
            scope: Some("acme".into()),
            rooms: vec!["chat/general".into()],
        },
        now,
    )
    .unwrap();

    let mut g = c.benchmark_group("token");
    g.bench_function("device token (sha256 lookup)", |b| {
        b.iter(|| auth.authenticate(black_box(SENSOR1_TOKEN)).unwrap())
    });
    for (name, token) in [
        ("jwt HS256", &hs),
        ("jwt RS256", &rs),
        ("session", &session),
    ] {
        g.bench_function(format!("{name} uncached"), |b| {
            b.iter(|| auth.verify_uncached(black_box(token), now).unwrap())
        });
        auth.authenticate(token).unwrap();
        g.bench_function(format!("{name} cached"), |b| {
            b.iter(|| auth.authenticate_at(black_box(token), now).unwrap())
        });
    }
    g.finish();
}

criterion_group!(benches, authorize, tokens);
criterion_main!(benches);
