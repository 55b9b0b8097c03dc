//! Costs of the NoLag MessagePack codec on the per-frame path: decoding client frames (publish
//! with 64 B and 1 KiB of `data`, subscribe, auth), encoding the `message` frame a delivery
//! sends, and the echo-suppression envelope a publish is wrapped in upstream and unwrapped from
//! on delivery.
//!
//! `data` is a MessagePack map `{text: "…"}` padded to exactly the stated size, as a client's
//! payload would be. Decoding and unwrapping borrow `data` after reading its header, so their
//! time does not depend on its size and no throughput is given for them; encoding and wrapping
//! copy it, so those report `Throughput::Bytes` of the frame or payload they build.
//!
//! Run: `cargo bench --bench wire` (`-- --test` runs each once as a smoke test).

#[path = "../tests/common/mod.rs"]
mod common;
mod support;

use std::hint::black_box;

use common::server::{encode, map};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use cuttle::wire::{ClientFrame, decode, encode as wire_encode, envelope};
use rmpv::Value;
use support::{data_of, size_label};

const TOPIC: &str = "chat/general/messages";
const SOCKET_ID: &str = "3f9c2a7e51d04b86";

fn decode_frames(c: &mut Criterion) {
    let mut g = c.benchmark_group("decode");
    for len in [64, 1024] {
        let frame = encode(&map(&[
            ("type", Value::from("publish")),
            ("topic", Value::from(TOPIC)),
            (
                "data",
                rmpv::decode::read_value(&mut &data_of(len)[..]).unwrap(),
            ),
            ("qos", Value::from(1)),
            ("echo", Value::from(false)),
            ("msgRef", Value::from("m-000042")),
        ]));
        assert!(matches!(decode(&frame), Ok(ClientFrame::Publish(p)) if p.data.len() == len));
        g.bench_function(format!("publish, data {}", size_label(len)), |b| {
            b.iter(|| decode(black_box(&frame)))
        });
    }

    let subscribe = encode(&map(&[
        ("type", Value::from("subscribe")),
        ("topic", Value::from(TOPIC)),
        ("qos", Value::from(1)),
        (
            "filters",
            Value::Array(vec![Value::from("eu"), Value::from("us")]),
        ),
    ]));
    assert!(matches!(decode(&subscribe), Ok(ClientFrame::Subscribe(s)) if s.filters.len() == 2));
    g.bench_function("subscribe, 2 filters", |b| {
        b.iter(|| decode(black_box(&subscribe)))
    });

    // A token of a typical HS256 JWT's length; decoding borrows it, so its content is moot.
    let token = format!("eyJhbGciOiJIUzI1NiJ9.{}.sig", "e".repeat(200));
    let auth = encode(&map(&[
        ("type", Value::from("auth")),
        ("token", Value::from(token.as_str())),
        ("protocolVersion", Value::from(2)),
        ("reconnect", Value::from(false)),
    ]));
    assert!(
        matches!(decode(&auth), Ok(ClientFrame::Auth(a)) if a.token.as_ref().map(|t| *t.expose()) == Some(&token[..]))
    );
    g.bench_function(format!("auth, {} B token", token.len()), |b| {
        b.iter(|| decode(black_box(&auth)))
    });
    g.finish();
}

fn encode_message(c: &mut Criterion) {
    let mut g = c.benchmark_group("encode message");
    for len in [64, 1024, 16 * 1024] {
        let data = data_of(len);
        let frame_len = wire_encode::message(TOPIC, &data, None).len();
        g.throughput(Throughput::Bytes(frame_len as u64));
        g.bench_function(format!("data {}", size_label(len)), |b| {
            b.iter(|| wire_encode::message(black_box(TOPIC), black_box(&data), None))
        });
    }
    g.finish();
}

fn envelope_wrap_unwrap(c: &mut Criterion) {
    let sizes = [64, 1024, 16 * 1024];
    let mut g = c.benchmark_group("envelope wrap");
    for len in sizes {
        let data = data_of(len);
        let size = size_label(len);
        let wrapped = envelope::wrap(&data, SOCKET_ID, false);
        assert_eq!(envelope::unwrap(&wrapped), (&data[..], Some(SOCKET_ID)));
        assert_eq!(&envelope::wrap(&data, SOCKET_ID, true)[..], &data[..]);

        g.throughput(Throughput::Bytes(wrapped.len() as u64));
        g.bench_function(format!("echo:false (envelope), data {size}"), |b| {
            b.iter(|| envelope::wrap(black_box(&data), black_box(SOCKET_ID), false))
        });
        g.throughput(Throughput::Bytes(data.len() as u64));
        g.bench_function(format!("echo:true (bare copy), data {size}"), |b| {
            b.iter(|| envelope::wrap(black_box(&data), black_box(SOCKET_ID), true))
        });
    }
    g.finish();

    let mut g = c.benchmark_group("envelope unwrap");
    for len in sizes {
        let data = data_of(len);
        let size = size_label(len);
        let wrapped = envelope::wrap(&data, SOCKET_ID, false);
        g.bench_function(format!("envelope, data {size}"), |b| {
            b.iter(|| envelope::unwrap(black_box(&wrapped)))
        });
        g.bench_function(format!("bare, data {size}"), |b| {
            b.iter(|| envelope::unwrap(black_box(&data)))
        });
    }
    g.finish();
}

criterion_group!(benches, decode_frames, encode_message, envelope_wrap_unwrap);
criterion_main!(benches);
