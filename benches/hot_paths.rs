//! Micro-benchmarks of the pure functions on the hot paths:
//! `cargo bench --bench hot_paths`.
//!
//! - ingest: `struct_to_json` + `render_event_json` (every published event);
//! - delivery: `render_payload` (every payload) and `signature_header`
//!   (every attempt), for 1 and 100 events of ~370 bytes.

use std::collections::BTreeMap;

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use prost_types::{value::Kind, Struct, Value};
use webhook_router::api::convert::struct_to_json;
use webhook_router::delivery::signing::signature_header;
use webhook_router::domain::event::{render_event_json, render_payload};

/// The benchmark's event data: ~300 bytes of JSON.
fn data(i: u64) -> Struct {
    let mut fields = BTreeMap::new();
    let mut put = |k: &str, kind| {
        fields.insert(k.to_string(), Value { kind: Some(kind) });
    };
    put("userId", Kind::NumberValue((4_000_000 + i) as f64));
    put(
        "loId",
        Kind::StringValue(format!("course:{}", 7_000_000 + i)),
    );
    put("enrollmentId", Kind::NumberValue(i as f64));
    put("status", Kind::StringValue("enrolled".into()));
    put(
        "source",
        Kind::StringValue("catalog-self-enrollment".into()),
    );
    put(
        "note",
        Kind::StringValue(
            "Learner enrolled through the course catalog; manager approval not required; \
             due date set from the enrollment rule of the course's training plan."
                .into(),
        ),
    );
    Struct {
        fields: fields.into_iter().collect(),
    }
}

fn event_json(i: u64) -> String {
    let d = struct_to_json(Some(&data(i)), "data").expect("valid");
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
            let json = struct_to_json(Some(black_box(&d)), "data").expect("valid");
            render_event_json("e7", "COURSE_ENROLLMENT", 1_727_414_643_000, "info", &json)
        })
    });
    g.finish();
}

fn delivery(c: &mut Criterion) {
    let key = vec![7u8; 32];
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
                    std::slice::from_ref(&key),
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
