//! Micro-benchmarks of the pure functions on the hot paths:
//! `cargo bench --bench hot_paths`.
//!
//! - ingest: `struct_to_json` + `render_event_json` (every published event);
//! - delivery: `render_payload` (every payload) and `signature_header`
//!   (every attempt), for 1 and 100 events of ~370 bytes.

#[path = "../examples/bench/sample.rs"]
mod sample;

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use sample::data;
use webhook_router::api::convert::struct_to_json;
use webhook_router::delivery::signing::{signature_header, Key};
use webhook_router::domain::event::{render_event_json, render_payload};

fn event_json(i: u64) -> String {
    let d = struct_to_json(Some(&data(i)), 0, || "data".into()).expect("valid");
    render_event_json(
        &format!("e{i}"),
        "COURSE_ENROLLMENT",
        1_727_414_643_000,
        "info",
        &d,
    )
}

fn ingest(c: &mut Criterion) {
    let d = data(7);
    let mut g = c.benchmark_group("ingest");
    g.throughput(Throughput::Elements(1));
    g.bench_function("struct_to_json+render_event_json", |b| {
        b.iter(|| {
            let json = struct_to_json(Some(black_box(&d)), 0, || "data".into()).expect("valid");
            render_event_json("e7", "COURSE_ENROLLMENT", 1_727_414_643_000, "info", &json)
        })
    });
    g.finish();
}

fn delivery(c: &mut Criterion) {
    let key = Key::Hmac(vec![7u8; 32]);
    let mut g = c.benchmark_group("delivery");
    for n in [1u64, 100] {
        let events: Vec<String> = (0..n).map(event_json).collect();
        let body = render_payload(1010, events.iter().map(String::as_str));
        g.throughput(Throughput::Elements(n));
        g.bench_with_input(BenchmarkId::new("render_payload", n), &events, |b, ev| {
            b.iter(|| render_payload(1010, ev.iter().map(String::as_str)))
        });
        g.bench_with_input(BenchmarkId::new("signature_header", n), &body, |b, body| {
            b.iter(|| {
                signature_header(
                    &[&key],
                    "dlv_0193a1b2c3d4e5f6a7b8",
                    1_727_414_643,
                    black_box(body),
                )
            })
        });
    }
    g.finish();
}

criterion_group!(benches, ingest, delivery);
criterion_main!(benches);
