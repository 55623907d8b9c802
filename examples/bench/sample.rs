//! The benchmark's event data, shared by the scenarios and by the criterion
//! micro-benchmarks (`benches/hot_paths.rs` includes this file).

use prost_types::{value::Kind, Struct, Value};

/// Data of event number `i`: ~300 bytes of JSON once rendered.
pub fn data(i: u64) -> Struct {
    let mut fields = std::collections::BTreeMap::new();
    let mut put = |k: &str, kind| {
        fields.insert(k.to_string(), Value { kind: Some(kind) });
    };
    put(
        "userId",
        Kind::NumberValue((4_000_000 + i % 100_000) as f64),
    );
    put(
        "loId",
        Kind::StringValue(format!("course:{}", 7_000_000 + i % 5_000)),
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
