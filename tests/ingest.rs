//! EventIngest end to end through the real server: validation naming index
//! and field (all or none), generated ids, data pass-through, request limits,
//! nesting depth, StreamEvents, durability across a restart and concurrent
//! publishers sharing group commits.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::common::*;
use prost::Message;
use prost_types::{value::Kind, FieldMask, ListValue, Struct, Value};
use serde_json::json;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Status};
use tonic_types::StatusExt;

/// The types every test webhook subscribes to.
const TYPES: &[&str] = &["COURSE_ENROLLMENT", "COURSE_COMPLETED"];

/// A healthy listener with a webhook of account 1010 subscribed to [`TYPES`].
async fn subscribed(admin: &mut Admin) -> Listener {
    let listener = Listener::ok().await;
    create(
        admin,
        1010,
        webhook("ingest", &listener.url(), TYPES, no_auth()),
    )
    .await;
    listener
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

async fn publish_err(ingest: &mut Ingest, account_id: u64, events: Vec<Event>) -> Status {
    match ingest
        .publish_events(PublishEventsRequest { account_id, events })
        .await
    {
        Ok(r) => panic!("expected an error, got {:?}", r.into_inner()),
        Err(s) => s,
    }
}

/// A StreamEvents refusal of message `number` (counting from 1) as the
/// same status of a PublishEvents call: its message without the prefix that
/// names the stream message (which must be there).
fn strip_stream_message(status: &Status, number: u64) -> Status {
    let prefix = format!("stream message #{number} (counting from 1): ");
    let rest = status.message().strip_prefix(&prefix).unwrap_or_else(|| {
        panic!(
            "message {:?} should start with {prefix:?}",
            status.message()
        )
    });
    Status::with_details(
        status.code(),
        rest.to_string(),
        bytes::Bytes::copy_from_slice(status.details()),
    )
}

/// INVALID_ARGUMENT whose message and google.rpc.BadRequest name `field`.
fn assert_invalid(status: &Status, field: &str, case: &str) {
    assert_eq!(
        status.code(),
        Code::InvalidArgument,
        "{case}: {}",
        status.message()
    );
    assert!(
        status.message().starts_with(&format!("{field}: ")),
        "{case}: message {:?} should name {field}",
        status.message()
    );
    let br = status
        .get_details_bad_request()
        .unwrap_or_else(|| panic!("{case}: no BadRequest details"));
    assert_eq!(br.field_violations.len(), 1, "{case}: {br:?}");
    assert_eq!(br.field_violations[0].field, field, "{case}");
    assert!(
        !br.field_violations[0].description.is_empty(),
        "{case}: violation has a description"
    );
}

/// Waits until `n` events arrived, then a little longer so extra
/// (duplicate) deliveries would show, and returns every id received.
async fn settled_ids(listener: &Listener, n: usize, timeout: Duration) -> Vec<String> {
    listener.wait_events(n, timeout).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    listener.event_ids()
}

fn ids(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i:04}")).collect()
}

fn events_for(ids: &[String]) -> Vec<Event> {
    ids.iter()
        .enumerate()
        .map(|(i, id)| event(id, TYPES[i % 2], i as u64))
        .collect()
}

// ------------------------------------------------------------ Struct builders

fn num(n: f64) -> Value {
    Value {
        kind: Some(Kind::NumberValue(n)),
    }
}

fn text(s: &str) -> Value {
    Value {
        kind: Some(Kind::StringValue(s.into())),
    }
}

fn boolean(b: bool) -> Value {
    Value {
        kind: Some(Kind::BoolValue(b)),
    }
}

fn null() -> Value {
    Value {
        kind: Some(Kind::NullValue(0)),
    }
}

fn list(values: Vec<Value>) -> Value {
    Value {
        kind: Some(Kind::ListValue(ListValue { values })),
    }
}

fn strukt(fields: Vec<(&str, Value)>) -> Struct {
    Struct {
        fields: fields
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
    }
}

fn obj(fields: Vec<(&str, Value)>) -> Value {
    Value {
        kind: Some(Kind::StructValue(strukt(fields))),
    }
}

/// `depth` Structs nested through the key `n`; the innermost is `{"leaf":1}`.
fn nested(depth: usize) -> Struct {
    let mut s = strukt(vec![("leaf", num(1.0))]);
    for _ in 1..depth {
        s = strukt(vec![(
            "n",
            Value {
                kind: Some(Kind::StructValue(s)),
            },
        )]);
    }
    s
}

/// An event whose protobuf encoding is exactly `size` bytes.
fn sized_event(id: &str, size: usize) -> Event {
    let mut e = event(id, "COURSE_ENROLLMENT", 1);
    e.event_info.clear();
    let mut pad = size - e.encoded_len();
    for _ in 0..8 {
        e.event_info = "x".repeat(pad);
        let n = e.encoded_len();
        if n == size {
            return e;
        }
        assert!(n > size, "padding only grows the event");
        pad -= n - size;
    }
    panic!("cannot size an event to {size} bytes");
}

// ------------------------------------------------------------------ validation

/// Three valid events of which `spoil` changes the one at index 2.
fn third_bad(spoil: impl FnOnce(&mut Event)) -> Vec<Event> {
    let mut events: Vec<Event> = (0..3)
        .map(|i| event(&format!("v-{i}"), "COURSE_ENROLLMENT", i))
        .collect();
    spoil(&mut events[2]);
    events
}

fn with_data(e: &mut Event, key: &str, v: Value) {
    e.data.as_mut().unwrap().fields.insert(key.into(), v);
}

#[tokio::test]
async fn bad_input_is_invalid_argument_naming_index_and_field() {
    let (_dir, server, _admin, mut ingest) = setup_with(|c| {
        c.limits.max_event_bytes = 1024;
        c.limits.max_events_per_request = 5;
    })
    .await;
    let cases: Vec<(&str, Vec<Event>, &str)> = vec![
        (
            "unknown event_name",
            third_bad(|e| e.event_name = "NOT_IN_CATALOG".into()),
            "events[2].event_name",
        ),
        (
            "event_name in the wrong case",
            third_bad(|e| e.event_name = "course_enrollment".into()),
            "events[2].event_name",
        ),
        (
            "empty event_name",
            third_bad(|e| e.event_name.clear()),
            "events[2].event_name",
        ),
        (
            "event over max_event_bytes",
            third_bad(|e| *e = sized_event("v-2", 1025)),
            "events[2]",
        ),
        (
            "event_id of 129 bytes",
            third_bad(|e| e.event_id = "i".repeat(129)),
            "events[2].event_id",
        ),
        (
            "event_id with a newline",
            third_bad(|e| e.event_id = "bad\nid".into()),
            "events[2].event_id",
        ),
        (
            "event_id with NUL",
            third_bad(|e| e.event_id = "bad\0id".into()),
            "events[2].event_id",
        ),
        (
            "event_id with DEL",
            third_bad(|e| e.event_id = "bad\u{7f}id".into()),
            "events[2].event_id",
        ),
        (
            "event_id with a C1 control",
            third_bad(|e| e.event_id = "bad\u{85}id".into()),
            "events[2].event_id",
        ),
        (
            "negative timestamp",
            third_bad(|e| e.timestamp = -1),
            "events[2].timestamp",
        ),
        (
            "most negative timestamp",
            third_bad(|e| e.timestamp = i64::MIN),
            "events[2].timestamp",
        ),
        (
            "timestamp after year 9999",
            third_bad(|e| e.timestamp = 253_402_300_800_000),
            "events[2].timestamp",
        ),
        (
            "NaN in data",
            third_bad(|e| with_data(e, "score", num(f64::NAN))),
            "events[2].data.score",
        ),
        (
            "infinity in data",
            third_bad(|e| with_data(e, "score", num(f64::INFINITY))),
            "events[2].data.score",
        ),
        (
            "negative infinity nested in a list in a struct",
            third_bad(|e| {
                with_data(
                    e,
                    "stats",
                    obj(vec![(
                        "scores",
                        list(vec![num(1.0), num(f64::NEG_INFINITY)]),
                    )]),
                )
            }),
            "events[2].data.stats.scores[1]",
        ),
        (
            "more events than max_events_per_request",
            (0..6)
                .map(|i| event(&format!("v-{i}"), "COURSE_ENROLLMENT", i))
                .collect(),
            "events",
        ),
        ("empty request", vec![], "events"),
    ];
    for (case, events, field) in cases {
        let status = publish_err(&mut ingest, 1010, events).await;
        assert_invalid(&status, field, case);
    }

    // The first bad event is the one reported, whatever comes after it.
    let mut events = third_bad(|e| e.event_name = "NOPE".into());
    events[0].timestamp = -5;
    let status = publish_err(&mut ingest, 1010, events).await;
    assert_invalid(&status, "events[0].timestamp", "first problem wins");

    // Messages say what is wrong, not only where.
    let status = publish_err(
        &mut ingest,
        1010,
        third_bad(|e| e.event_name = "NOT_IN_CATALOG".into()),
    )
    .await;
    assert!(status.message().contains("NOT_IN_CATALOG"), "{status:?}");
    let status = publish_err(
        &mut ingest,
        1010,
        third_bad(|e| *e = sized_event("v-2", 1025)),
    )
    .await;
    assert!(
        status.message().contains("1025") && status.message().contains("1024"),
        "{status:?}"
    );

    // account_id 0 is refused before any event is looked at.
    let status = publish_err(&mut ingest, 0, third_bad(|_| {})).await;
    assert_invalid(&status, "account_id", "account_id 0");

    // The boundaries themselves are accepted: exactly max_event_bytes, an id
    // of 128 bytes, max_events_per_request events, the last ms of year 9999.
    let mut events = vec![
        sized_event("edge-size", 1024),
        event(&"i".repeat(128), "COURSE_ENROLLMENT", 1),
        event("edge-ts", "COURSE_ENROLLMENT", 2),
        event("edge-unicode-é✓", "COURSE_ENROLLMENT", 3),
        event("edge-4", "COURSE_COMPLETED", 4),
    ];
    events[2].timestamp = 253_402_300_799_999;
    assert_eq!(events[0].encoded_len(), 1024);
    let r = publish(&mut ingest, 1010, events).await;
    assert_eq!(r.results.len(), 5);
    assert!(r.results.iter().all(|x| !x.duplicate), "{r:?}");
    assert_eq!(r.results[1].event_id, "i".repeat(128));
    assert_eq!(r.results[3].event_id, "edge-unicode-é✓");
    server.stop().await.unwrap();
}

/// Makes a valid event invalid.
type Spoiler = Box<dyn Fn(&mut Event)>;

#[tokio::test]
async fn a_bad_request_stores_nothing() {
    let (_dir, server, mut admin, mut ingest) =
        setup_with(|c| c.limits.max_event_bytes = 1024).await;
    let listener = subscribed(&mut admin).await;
    let good: Vec<Event> = (0..4)
        .map(|i| event(&format!("a-{i}"), TYPES[i % 2], i as u64))
        .collect();
    let spoilers: Vec<(&str, Spoiler)> = vec![
        (
            "events[2].event_name",
            Box::new(|e| e.event_name = "UNKNOWN".into()),
        ),
        ("events[2]", Box::new(|e| e.event_info = "x".repeat(2000))),
        (
            "events[2].data.bad",
            Box::new(|e| with_data(e, "bad", num(f64::NAN))),
        ),
        ("events[2].timestamp", Box::new(|e| e.timestamp = -1)),
        (
            "events[2].event_id",
            Box::new(|e| e.event_id = "x".repeat(200)),
        ),
    ];
    for (field, spoil) in &spoilers {
        let mut events = good.clone();
        spoil(&mut events[2]);
        let status = publish_err(&mut ingest, 1010, events).await;
        assert_invalid(&status, field, field);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        listener.requests().is_empty(),
        "nothing of a refused request is delivered: {:?}",
        listener.event_ids()
    );

    // Nothing was stored: the same ids are new now, and arrive once each.
    let r = publish(&mut ingest, 1010, good).await;
    assert_eq!(
        r.results
            .iter()
            .map(|x| (x.event_id.as_str(), x.duplicate))
            .collect::<Vec<_>>(),
        vec![
            ("a-0", false),
            ("a-1", false),
            ("a-2", false),
            ("a-3", false)
        ]
    );
    let got = settled_ids(&listener, 4, Duration::from_secs(10)).await;
    assert_eq!(got, vec!["a-0", "a-1", "a-2", "a-3"]);
    server.stop().await.unwrap();
}

// ------------------------------------------------------------ generated values

fn is_uuid(s: &str) -> bool {
    s.len() == 36
        && s.char_indices().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => c == '-',
            _ => c.is_ascii_hexdigit(),
        })
        && uuid::Uuid::parse_str(s).is_ok()
}

#[tokio::test]
async fn empty_event_id_gets_a_uuid_and_zero_timestamp_means_now() {
    let (_dir, server, mut admin, mut ingest) = setup().await;
    let listener = subscribed(&mut admin).await;
    let mut a = event("", "COURSE_ENROLLMENT", 1);
    a.timestamp = 0;
    let mut b = event("", "COURSE_COMPLETED", 2);
    b.timestamp = 0;
    let c = event("given-id", "COURSE_ENROLLMENT", 3);
    let before = now_ms();
    let r = publish(&mut ingest, 1010, vec![a, b, c]).await;
    let after = now_ms();
    let got: Vec<&str> = r.results.iter().map(|x| x.event_id.as_str()).collect();
    assert!(is_uuid(got[0]), "{got:?}");
    assert!(is_uuid(got[1]), "{got:?}");
    assert_ne!(got[0], got[1], "each empty id gets its own UUID");
    assert_eq!(got[2], "given-id");
    assert!(r.results.iter().all(|x| !x.duplicate), "{r:?}");

    listener.wait_events(3, Duration::from_secs(10)).await;
    let delivered: Vec<serde_json::Value> = listener
        .requests()
        .iter()
        .flat_map(|req| req.json()["events"].as_array().unwrap().clone())
        .collect();
    assert_eq!(delivered.len(), 3);
    for (ev, id) in delivered.iter().zip(&got) {
        assert_eq!(ev["eventId"], *id, "delivered id is the one returned");
    }
    for ev in &delivered[..2] {
        let ts = ev["timestamp"].as_i64().expect("timestamp is an integer");
        assert!(
            ts >= before - 5 && ts <= after + 5,
            "timestamp 0 became now: {ts} not in {before}..{after}"
        );
    }
    assert_eq!(delivered[2]["timestamp"], 1_727_414_643_000i64);

    // A generated id is a real id: publishing it again is a duplicate.
    let r = publish(
        &mut ingest,
        1010,
        vec![event(got[0], "COURSE_ENROLLMENT", 1)],
    )
    .await;
    assert!(r.results[0].duplicate);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(listener.event_ids().len(), 3, "not delivered again");
    server.stop().await.unwrap();
}

// ------------------------------------------------------------ data pass-through

#[tokio::test]
async fn data_passes_through_exactly() {
    let (_dir, server, mut admin, mut ingest) = setup().await;
    let listener = subscribed(&mut admin).await;
    let tricky = "He said \"hi\" \\ back\\slash /slash\nnew line\ttab\r\u{1}ctl \u{7f} é ✓ 😀 \u{2028}\u{2029} </script>";
    let data = strukt(vec![
        ("userId", num(4_279_332.0)),
        ("negative", num(-17.0)),
        ("zero", num(0.0)),
        ("negZero", num(-0.0)),
        ("half", num(0.5)),
        ("tiny", num(1e-7)),
        ("pi", num(std::f64::consts::PI)),
        ("maxExact", num(9_007_199_254_740_992.0)),
        ("minExact", num(-9_007_199_254_740_992.0)),
        ("beyondExact", num(9_007_199_254_740_994.0)),
        ("snowflake", num(1_234_567_890_123_456_768.0)),
        ("huge", num(1e300)),
        ("yes", boolean(true)),
        ("no", boolean(false)),
        ("nothing", null()),
        ("unset", Value { kind: None }),
        ("text", text(tricky)),
        ("loId", text("course:7374992")),
        (
            "nested",
            obj(vec![(
                "level1",
                obj(vec![(
                    "level2",
                    obj(vec![
                        ("id", num(42.0)),
                        ("tags", list(vec![text("a"), text("b")])),
                    ]),
                )]),
            )]),
        ),
        (
            "list",
            list(vec![
                num(1.0),
                text("two"),
                obj(vec![("three", num(3.0))]),
                list(vec![num(4.5), list(vec![])]),
                null(),
                boolean(true),
                obj(vec![]),
            ]),
        ),
        ("key \"quoted\"\n", text("v")),
        ("ключ", text("значение")),
        ("", text("empty key")),
    ]);
    let mut e = event("data-1", "COURSE_ENROLLMENT", 0);
    e.data = Some(data);
    e.event_info = tricky.into();
    let mut empty = event("data-2", "COURSE_COMPLETED", 0);
    empty.data = None;
    empty.event_info.clear();
    publish(&mut ingest, 1010, vec![e, empty]).await;

    listener.wait_events(2, Duration::from_secs(10)).await;
    let reqs = listener.requests();
    let body = std::str::from_utf8(&reqs[0].body).unwrap();
    // Whole numbers are integers in the text itself.
    for needle in [
        r#""userId":4279332,"#,
        r#""negative":-17,"#,
        r#""zero":0,"#,
        r#""negZero":0,"#,
        r#""maxExact":9007199254740992,"#,
        r#""minExact":-9007199254740992,"#,
        r#""beyondExact":9007199254740994,"#,
        r#""snowflake":1234567890123456768,"#,
        r#""id":42,"#,
        r#""three":3}"#,
    ] {
        assert!(body.contains(needle), "{needle} in {body}");
    }
    for bad in [".0,", ".0}", ".0]"] {
        assert!(!body.contains(bad), "no {bad} in {body}");
    }

    let events: Vec<serde_json::Value> = reqs
        .iter()
        .flat_map(|r| r.json()["events"].as_array().unwrap().clone())
        .collect();
    assert_eq!(events[0]["eventInfo"], tricky);
    assert_eq!(
        events[0]["data"],
        json!({
            "userId": 4_279_332,
            "negative": -17,
            "zero": 0,
            "negZero": 0,
            "half": 0.5,
            "tiny": 1e-7,
            "pi": std::f64::consts::PI,
            "maxExact": 9_007_199_254_740_992u64,
            "minExact": -9_007_199_254_740_992i64,
            "beyondExact": 9_007_199_254_740_994u64,
            "snowflake": 1_234_567_890_123_456_768u64,
            "huge": 1e300,
            "yes": true,
            "no": false,
            "nothing": null,
            "unset": null,
            "text": tricky,
            "loId": "course:7374992",
            "nested": {"level1": {"level2": {"id": 42, "tags": ["a", "b"]}}},
            "list": [1, "two", {"three": 3}, [4.5, []], null, true, {}],
            "key \"quoted\"\n": "v",
            "ключ": "значение",
            "": "empty key",
        })
    );
    // An event without data carries an empty object.
    assert_eq!(events[1]["data"], json!({}));
    assert_eq!(events[1]["eventInfo"], "");
    server.stop().await.unwrap();
}

// ------------------------------------------------------------------ limits

#[tokio::test]
async fn thousand_events_in_one_request_are_accepted_and_delivered() {
    let (_dir, server, mut admin, mut ingest) = setup().await;
    let listener = subscribed(&mut admin).await;

    // 1001 is refused and stores nothing.
    let refused = ids("over", 1001);
    let status = publish_err(&mut ingest, 1010, events_for(&refused)).await;
    assert_invalid(&status, "events", "1001 events");
    assert!(
        status.message().contains("1001") && status.message().contains("1000"),
        "{status:?}"
    );

    let expected = ids("k", 1000);
    let r = publish(&mut ingest, 1010, events_for(&expected)).await;
    assert_eq!(r.results.len(), 1000);
    assert!(r.results.iter().all(|x| !x.duplicate));
    assert_eq!(
        r.results
            .iter()
            .map(|x| x.event_id.clone())
            .collect::<Vec<_>>(),
        expected
    );
    let got = settled_ids(&listener, 1000, Duration::from_secs(30)).await;
    assert_eq!(got, expected, "all 1000, once each, in order");

    // The refused ids were never stored.
    let r = publish(&mut ingest, 1010, events_for(&refused[..3])).await;
    assert!(r.results.iter().all(|x| !x.duplicate), "{r:?}");
    server.stop().await.unwrap();
}

/// Each Struct level costs prost three levels of recursion (Struct, map
/// entry, Value) under the request and the Event, so 33 levels of `data` is
/// the deepest that fits prost's limit of 100.
const DEEPEST_DATA: usize = 33;

#[tokio::test]
async fn deeply_nested_data_is_accepted_up_to_the_decoder_limit() {
    let (_dir, server, mut admin, mut ingest) = setup().await;
    let listener = subscribed(&mut admin).await;

    // The boundary as prost itself sees it, independent of the server.
    let decodes = |depth: usize| {
        let mut e = event("probe", "COURSE_ENROLLMENT", 1);
        e.data = Some(nested(depth));
        let bytes = PublishEventsRequest {
            account_id: 1010,
            events: vec![e],
        }
        .encode_to_vec();
        PublishEventsRequest::decode(&bytes[..]).is_ok()
    };
    assert!(decodes(DEEPEST_DATA));
    assert!(!decodes(DEEPEST_DATA + 1));

    let mut deep = event("deep-ok", "COURSE_ENROLLMENT", 1);
    deep.data = Some(nested(DEEPEST_DATA));
    publish(&mut ingest, 1010, vec![deep]).await;
    listener.wait_events(1, Duration::from_secs(10)).await;
    let body = listener.requests()[0].json();
    let mut v = &body["events"][0]["data"];
    for _ in 1..DEEPEST_DATA {
        v = &v["n"];
    }
    assert_eq!(
        *v,
        json!({"leaf": 1}),
        "all {DEEPEST_DATA} levels delivered"
    );

    // Deeper is refused by the decoder (50 levels included); the server keeps
    // serving on the same connection and stored nothing.
    for depth in [DEEPEST_DATA + 1, 50, 200] {
        let mut e = event(&format!("deep-{depth}"), "COURSE_ENROLLMENT", 1);
        e.data = Some(nested(depth));
        let status = publish_err(&mut ingest, 1010, vec![e]).await;
        assert_ne!(status.code(), Code::Ok, "depth {depth}");
        let r = publish(
            &mut ingest,
            1010,
            vec![event(&format!("deep-{depth}"), "COURSE_ENROLLMENT", 2)],
        )
        .await;
        assert!(!r.results[0].duplicate, "depth {depth}: nothing stored");
    }
    let got = settled_ids(&listener, 4, Duration::from_secs(10)).await;
    assert_eq!(got, vec!["deep-ok", "deep-34", "deep-50", "deep-200"]);
    server.stop().await.unwrap();
}

// ------------------------------------------------------------ StreamEvents

fn request(account_id: u64, ids: &[&str]) -> StreamEventsRequest {
    StreamEventsRequest {
        account_id,
        events: ids
            .iter()
            .map(|id| event(id, "COURSE_ENROLLMENT", 1))
            .collect(),
    }
}

#[test]
fn stream_messages_are_wire_compatible_with_publish_messages() {
    // StreamEvents used PublishEventsRequest/Response before it had its own
    // messages: clients built then must keep working, in both directions.
    let publish = PublishEventsRequest {
        account_id: 1010,
        events: vec![event("w-1", "COURSE_ENROLLMENT", 7)],
    };
    let stream = StreamEventsRequest::decode(&publish.encode_to_vec()[..]).unwrap();
    assert_eq!(stream.account_id, 1010);
    assert_eq!(stream.events, publish.events);
    assert_eq!(stream.encode_to_vec(), publish.encode_to_vec());
    let answer = StreamEventsResponse {
        results: vec![PublishResult {
            event_id: "w-1".into(),
            duplicate: true,
        }],
    };
    let old = PublishEventsResponse::decode(&answer.encode_to_vec()[..]).unwrap();
    assert_eq!(old.results, answer.results);
}

#[tokio::test]
async fn stream_answers_each_request_in_order() {
    let (_dir, server, mut admin, mut ingest) = setup().await;
    let listener = subscribed(&mut admin).await;
    let requests = [
        request(1010, &["s-0", "s-1"]),
        request(1010, &["s-2"]),
        request(1010, &["s-3", "s-1", "s-4"]),
        request(1010, &["", "s-5"]),
        request(1010, &["s-6", "s-6"]),
    ];
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    // Interactive: each request is sent only after the previous answer, so
    // answers must come per request, not at the end of the stream.
    tx.send(requests[0].clone()).await.unwrap();
    let mut answers = ingest
        .stream_events(ReceiverStream::new(rx))
        .await
        .expect("stream opens")
        .into_inner();
    let mut generated = String::new();
    for (i, req) in requests.iter().enumerate() {
        if i > 0 {
            tx.send(req.clone()).await.unwrap();
        }
        let answer = tokio::time::timeout(Duration::from_secs(10), answers.message())
            .await
            .expect("answer in time")
            .expect("answer ok")
            .expect("stream still open");
        assert_eq!(answer.results.len(), req.events.len(), "request {i}");
        for (res, ev) in answer.results.iter().zip(&req.events) {
            if ev.event_id.is_empty() {
                assert!(is_uuid(&res.event_id), "{res:?}");
                generated = res.event_id.clone();
            } else {
                assert_eq!(res.event_id, ev.event_id, "request {i}");
            }
        }
        let dups: Vec<bool> = answer.results.iter().map(|r| r.duplicate).collect();
        let expected_dups = match i {
            2 => vec![false, true, false],
            3 => vec![false, false],
            4 => vec![false, true],
            n => vec![false; requests[n].events.len()],
        };
        assert_eq!(dups, expected_dups, "request {i}");
    }
    drop(tx);
    let end = tokio::time::timeout(Duration::from_secs(10), answers.message())
        .await
        .expect("stream ends");
    assert!(matches!(end, Ok(None)), "clean end: {end:?}");

    let got = settled_ids(&listener, 8, Duration::from_secs(10)).await;
    assert_eq!(
        got,
        vec![
            "s-0",
            "s-1",
            "s-2",
            "s-3",
            "s-4",
            generated.as_str(),
            "s-5",
            "s-6"
        ]
    );
    server.stop().await.unwrap();
}

#[tokio::test]
async fn a_bad_stream_message_ends_the_stream_and_keeps_earlier_ones() {
    let (_dir, server, mut admin, mut ingest) = setup().await;
    let listener = subscribed(&mut admin).await;
    let mut bad = request(1010, &["b-4", "b-5", "b-6"]);
    bad.events[1].event_name = "NO_SUCH_EVENT".into();
    let requests = vec![
        request(1010, &["b-0", "b-1"]),
        request(1010, &["b-2", "b-3"]),
        bad,
        request(1010, &["b-7"]),
    ];
    let mut answers = ingest
        .stream_events(tokio_stream::iter(requests))
        .await
        .expect("stream opens")
        .into_inner();
    let mut ok = Vec::new();
    let status = loop {
        match tokio::time::timeout(Duration::from_secs(10), answers.message())
            .await
            .expect("answer in time")
        {
            Ok(Some(a)) => ok.push(a),
            Ok(None) => panic!("stream ended without the error; answers: {ok:?}"),
            Err(s) => break s,
        }
    };
    assert_eq!(
        ok.len(),
        2,
        "one answer per good request before the bad one"
    );
    assert_eq!(
        ok.iter()
            .flat_map(|a| a.results.iter().map(|r| r.event_id.clone()))
            .collect::<Vec<_>>(),
        vec!["b-0", "b-1", "b-2", "b-3"]
    );
    // The message says which stream message was refused: the third.
    let status = strip_stream_message(&status, 3);
    assert_invalid(&status, "events[1].event_name", "bad stream message");

    // Earlier requests are stored and delivered; the bad one and what
    // followed it are not.
    let got = settled_ids(&listener, 4, Duration::from_secs(10)).await;
    assert_eq!(got, vec!["b-0", "b-1", "b-2", "b-3"]);
    let r = publish(
        &mut ingest,
        1010,
        events_for(&["b-0", "b-4", "b-5", "b-6", "b-7"].map(String::from)),
    )
    .await;
    assert_eq!(
        r.results.iter().map(|x| x.duplicate).collect::<Vec<_>>(),
        vec![true, false, false, false, false]
    );

    // account_id 0 mid-stream is refused the same way.
    let mut answers = ingest
        .stream_events(tokio_stream::iter(vec![
            request(1010, &["z-0"]),
            request(0, &["z-1"]),
        ]))
        .await
        .unwrap()
        .into_inner();
    assert!(answers.message().await.unwrap().is_some());
    let status = answers.message().await.expect_err("account_id 0 refused");
    let status = strip_stream_message(&status, 2);
    assert_invalid(&status, "account_id", "account_id 0 in a stream");
    server.stop().await.unwrap();
}

// ------------------------------------------------------------ durability

#[tokio::test]
async fn acknowledged_events_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(test_config(dir.path())).await;
    let failing = Listener::start(Arc::new(|_, _| (503, vec![], Duration::ZERO))).await;
    let mut admin = server.admin(ADMIN).await;
    let w = create(
        &mut admin,
        1010,
        webhook("down", &failing.url(), TYPES, no_auth()),
    )
    .await;
    let mut ingest = server.ingest(INGEST).await;
    let expected = ids("dur", 20);
    for chunk in expected.chunks(5) {
        let r = publish(&mut ingest, 1010, events_for(chunk)).await;
        assert!(r.results.iter().all(|x| !x.duplicate));
    }
    let seen = failing
        .wait_until(Duration::from_secs(10), |r| !r.is_empty())
        .await;
    assert!(!seen.is_empty(), "the failing listener was tried");
    drop((admin, ingest));
    server.stop().await.unwrap();

    let healthy = Listener::ok().await;
    let server = TestServer::start(test_config(dir.path())).await;
    let mut admin = server.admin(ADMIN).await;
    let updated = admin
        .update_webhook(UpdateWebhookRequest {
            account_id: 1010,
            webhook: Some(Webhook {
                id: w.id.clone(),
                target_url: healthy.url(),
                ..Default::default()
            }),
            update_mask: Some(FieldMask {
                paths: vec!["target_url".into()],
            }),
        })
        .await
        .expect("update webhook")
        .into_inner()
        .webhook
        .unwrap();
    assert_eq!(updated.target_url, healthy.url());
    assert!(updated.active);

    let all: HashSet<&String> = expected.iter().collect();
    healthy
        .wait_until(Duration::from_secs(20), |reqs| {
            let got: HashSet<String> = reqs.iter().flat_map(|r| r.event_ids()).collect();
            all.iter().all(|id| got.contains(*id))
        })
        .await;
    let mut first_seen = Vec::new();
    for id in healthy.event_ids() {
        if !first_seen.contains(&id) {
            first_seen.push(id);
        }
    }
    assert_eq!(
        first_seen, expected,
        "every acknowledged event arrives after the restart, in order"
    );

    // The log itself survived: the ids are known, and not delivered again.
    let before = healthy.event_ids().len();
    let mut ingest = server.ingest(INGEST).await;
    let r = publish(&mut ingest, 1010, events_for(&expected)).await;
    assert!(r.results.iter().all(|x| x.duplicate), "{r:?}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(healthy.event_ids().len(), before);
    server.stop().await.unwrap();
}

// ------------------------------------------------------------ concurrency

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_publishers_all_succeed_and_each_event_arrives_once() {
    const TASKS: usize = 8;
    const REQUESTS: usize = 25;
    const EVENTS: usize = 10;
    let (_dir, server, mut admin, _ingest) = setup().await;
    let listener = subscribed(&mut admin).await;
    let mut handles = Vec::new();
    for t in 0..TASKS {
        let mut client = server.ingest(INGEST).await;
        handles.push(tokio::spawn(async move {
            for r in 0..REQUESTS {
                let ids: Vec<String> = (0..EVENTS).map(|i| format!("c{t}-{r:02}-{i}")).collect();
                let resp = publish(&mut client, 1010, events_for(&ids)).await;
                assert_eq!(
                    resp.results
                        .iter()
                        .map(|x| (x.event_id.clone(), x.duplicate))
                        .collect::<Vec<_>>(),
                    ids.into_iter().map(|id| (id, false)).collect::<Vec<_>>()
                );
            }
        }));
    }
    for h in handles {
        h.await.expect("publisher task");
    }
    let total = TASKS * REQUESTS * EVENTS;
    let got = settled_ids(&listener, total, Duration::from_secs(30)).await;
    assert_eq!(got.len(), total, "each event exactly once");
    let unique: HashSet<&String> = got.iter().collect();
    assert_eq!(unique.len(), total, "no duplicates");
    // Each publisher's events keep their order in the lane.
    let mut per_task: HashMap<&str, Vec<&String>> = HashMap::new();
    for id in &got {
        per_task
            .entry(id.split('-').next().unwrap())
            .or_default()
            .push(id);
    }
    assert_eq!(per_task.len(), TASKS);
    for (task, ids) in per_task {
        let mut sorted = ids.clone();
        sorted.sort();
        assert_eq!(ids, sorted, "order of publisher {task}");
    }
    server.stop().await.unwrap();
}
