//! The presence core's hot paths (`cuttle::presence::core::Core`, no I/O, no lock), in rooms
//! of 10, 1,000 and 10,000 members:
//! - **join**: a new actor enters the room, then leaves (two changes; each yields its events
//!   and its op) — the cost must not grow with the room (it is O(the actor's connections));
//! - **update**: a member's data changes;
//! - **remote delta**: one delta from another replica (one op) is applied;
//! - **list**: `members` after a change (rebuilt) and again (shared until the next change).
//!
//! Run: `cargo bench --bench presence` (`-- --test` runs each once as a smoke test).

use std::hint::black_box;

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use cuttle::presence::core::{Config, Core, Effects, Member, RoomKey};
use cuttle::presence::message::{Body, Message, Op};

fn config(replica: &str) -> Config {
    Config {
        replica: replica.into(),
        incarnation: 1,
        heartbeat_ms: 1000,
        replica_timeout_ms: 5000,
        grace_ms: 5000,
        sync_retry_ms: 1000,
        snapshot_interval_ms: 250,
        max_room_members: 1_000_000,
        max_state_bytes: 1 << 30,
        max_message_bytes: 256 << 10,
        max_replicas: 16,
    }
}

fn room() -> RoomKey {
    RoomKey {
        project: "demo".into(),
        app: "chat".into(),
        scope: Some("acme".into()),
        room: "general".into(),
    }
}

fn data(n: u8) -> Bytes {
    Bytes::from(vec![
        0x81,
        0xa6,
        b's',
        b't',
        b'a',
        b't',
        b'u',
        b's',
        n & 0x7f,
    ])
}

/// A core with `n` members in the room: half its own, half another replica's.
fn populated(n: usize) -> Core {
    let mut core = Core::new(config("a"));
    let mut fx = Effects::default();
    let mut ops = Vec::new();
    for i in 0..n {
        if i % 2 == 0 {
            let _ = core.set(
                i as u64,
                room(),
                format!("local-{i}").into(),
                data(1),
                1000,
                &mut fx,
            );
        } else {
            ops.push(Op::Set {
                room: room(),
                actor: format!("remote-{i}").into(),
                member: Member {
                    data: data(1),
                    joined_at: 1,
                    updated: 1000,
                },
            });
        }
    }
    core.on_message(
        Message {
            replica: "b".into(),
            incarnation: 1,
            seq: 1,
            body: Body::Delta { ops },
        },
        1000,
        &mut fx,
    );
    assert_eq!(core.member_count(&room()), n);
    core
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("presence");
    for n in [10usize, 1000, 10_000] {
        let mut core = populated(n);
        let mut now = 2000;
        g.bench_with_input(BenchmarkId::new("join+leave", n), &n, |b, _| {
            b.iter(|| {
                now += 1;
                let mut fx = Effects::default();
                let _ = core.set(u64::MAX, room(), "newcomer".into(), data(2), now, &mut fx);
                core.close(u64::MAX, false, now, &mut fx);
                core.flush(&mut fx);
                black_box(fx.events.len() + fx.messages.len())
            })
        });
        let mut i = 0u8;
        g.bench_with_input(BenchmarkId::new("update", n), &n, |b, _| {
            b.iter(|| {
                now += 1;
                i = i.wrapping_add(1);
                let mut fx = Effects::default();
                let _ = core.set(0, room(), "local-0".into(), data(i), now, &mut fx);
                core.flush(&mut fx);
                black_box(fx.events.len())
            })
        });
        let mut seq = 1;
        g.bench_with_input(BenchmarkId::new("remote delta", n), &n, |b, _| {
            b.iter(|| {
                seq += 1;
                i = i.wrapping_add(1);
                let mut fx = Effects::default();
                let m = Message {
                    replica: "b".into(),
                    incarnation: 1,
                    seq,
                    body: Body::Delta {
                        ops: vec![Op::Set {
                            room: room(),
                            actor: "remote-1".into(),
                            member: Member {
                                data: data(i),
                                joined_at: 1,
                                updated: now + seq,
                            },
                        }],
                    },
                };
                core.on_message(m, now, &mut fx);
                black_box(fx.events.len())
            })
        });
        g.bench_with_input(BenchmarkId::new("list after a change", n), &n, |b, _| {
            b.iter(|| {
                now += 1;
                i = i.wrapping_add(1);
                let mut fx = Effects::default();
                let _ = core.set(0, room(), "local-0".into(), data(i), now, &mut fx);
                black_box(core.members(&room()).len())
            })
        });
        g.bench_with_input(BenchmarkId::new("list again", n), &n, |b, _| {
            b.iter(|| black_box(core.members(&room()).len()))
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
