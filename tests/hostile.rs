//! Hostile and malformed input against a real router: each case is answered
//! as the "Hostile input" table of docs/security.md says, the server keeps serving, and
//! nothing of a refused request is stored. Messages that a well-behaved
//! client cannot even build (strings that are not UTF-8, `data` nested
//! thousands of levels deep) are hand-encoded and sent as raw bytes.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::common::*;
use bytes::{Buf, BufMut};
use prost::Message;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::{Code, Status};
use webhook_router::api::layers::MAX_DATA_NESTING;

// ------------------------------------------------------------ raw messages

/// Sends and receives message bytes as they are.
#[derive(Clone, Copy, Default)]
struct RawCodec;

struct Raw;

impl Encoder for Raw {
    type Item = Vec<u8>;
    type Error = Status;
    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for Raw {
    type Item = Vec<u8>;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        let mut out = vec![0; src.remaining()];
        src.copy_to_slice(&mut out);
        Ok(Some(out))
    }
}

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = Raw;
    type Decoder = Raw;
    fn encoder(&mut self) -> Raw {
        Raw
    }
    fn decoder(&mut self) -> Raw {
        Raw
    }
}

fn varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// A length-delimited field.
fn field(number: u32, bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len() + 6);
    varint(u64::from(number << 3 | 2), &mut out);
    varint(bytes.len() as u64, &mut out);
    out.extend_from_slice(bytes);
    out
}

/// google.protobuf.Struct `{"a": {"a": … null}}`, `depth` objects deep.
fn nested_struct(depth: usize) -> Vec<u8> {
    // Value { null_value: NULL_VALUE } is field 1, varint 0.
    let mut value = vec![0x08, 0x00];
    let mut s = Vec::new();
    for level in 0..depth {
        // Struct { fields: { "a": value } }: a map entry with key 1, value 2.
        let mut entry = field(1, b"a");
        entry.extend(field(2, &value));
        s = field(1, &entry);
        if level + 1 < depth {
            // Value { struct_value: s } is field 5.
            value = field(5, &s);
        }
    }
    s
}

/// An Event with raw string bytes and raw `data` (a Struct's bytes).
fn raw_event(event_id: &[u8], event_name: &[u8], data: Option<&[u8]>) -> Vec<u8> {
    let mut e = field(1, event_id);
    e.extend(field(2, event_name));
    if let Some(d) = data {
        e.extend(field(5, d));
    }
    e
}

fn raw_publish(account_id: u64, events: &[Vec<u8>]) -> Vec<u8> {
    let mut out = vec![0x08];
    varint(account_id, &mut out);
    for e in events {
        out.extend(field(2, e));
    }
    out
}

async fn raw_unary(
    server: &TestServer,
    path: &'static str,
    token: &str,
    body: Vec<u8>,
) -> Result<Vec<u8>, Status> {
    let mut grpc = tonic::client::Grpc::new(server.channel().await);
    grpc.ready().await.unwrap();
    let mut req = tonic::Request::new(body);
    req.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    grpc.unary(req, http::uri::PathAndQuery::from_static(path), RawCodec)
        .await
        .map(|r| r.into_inner())
}

async fn raw_publish_call(server: &TestServer, body: Vec<u8>) -> Result<Vec<u8>, Status> {
    raw_unary(
        server,
        "/webhooks.v1.EventIngest/PublishEvents",
        INGEST,
        body,
    )
    .await
}

// ------------------------------------------------------------ checks

#[track_caller]
fn invalid(r: Result<impl std::fmt::Debug, Status>, field_prefix: &str) -> Status {
    match r {
        Ok(v) => panic!("expected INVALID_ARGUMENT on {field_prefix}, got OK: {v:?}"),
        Err(s) => {
            assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
            assert!(
                s.message().starts_with(field_prefix),
                "message should start with {field_prefix:?}: {}",
                s.message()
            );
            s
        }
    }
}

/// The server still answers, and `ids` were not stored (publishing them now
/// finds them new).
async fn still_serving_and_not_stored(ingest: &mut Ingest, ids: &[&str]) {
    let events: Vec<Event> = if ids.is_empty() {
        vec![event(
            &format!("probe-{}", uuid_like()),
            "COURSE_ENROLLMENT",
            1,
        )]
    } else {
        ids.iter()
            .map(|id| event(id, "COURSE_ENROLLMENT", 1))
            .collect()
    };
    let r = publish(ingest, 1010, events).await;
    assert!(
        r.results.iter().all(|x| !x.duplicate),
        "refused events were not stored: {r:?}"
    );
}

fn uuid_like() -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    format!(
        "{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    )
}

// ------------------------------------------------------------ ingest

#[tokio::test]
async fn deeply_nested_data_is_invalid_argument_at_a_documented_depth() {
    let (_dir, server, _admin, mut ingest) = setup().await;
    let ok_event = raw_event(
        b"nest-ok",
        b"COURSE_ENROLLMENT",
        Some(&nested_struct(MAX_DATA_NESTING)),
    );
    raw_publish_call(&server, raw_publish(1010, &[ok_event]))
        .await
        .unwrap_or_else(|s| panic!("{MAX_DATA_NESTING} levels are accepted: {s:?}"));

    // The boundary is exactly where docs/security.md says.
    let mut first_refused = None;
    for depth in MAX_DATA_NESTING..=MAX_DATA_NESTING + 40 {
        let e = raw_event(
            b"nest-probe",
            b"COURSE_ENROLLMENT",
            Some(&nested_struct(depth)),
        );
        if raw_publish_call(&server, raw_publish(1010, &[e]))
            .await
            .is_err()
        {
            first_refused = Some(depth);
            break;
        }
    }
    assert_eq!(
        first_refused,
        Some(MAX_DATA_NESTING + 1),
        "nesting limit moved"
    );
    for depth in [MAX_DATA_NESTING + 1, 100, 20_000] {
        let events = vec![
            raw_event(b"nest-first", b"COURSE_ENROLLMENT", None),
            raw_event(
                b"nest-deep",
                b"COURSE_ENROLLMENT",
                Some(&nested_struct(depth)),
            ),
        ];
        let s = invalid(
            raw_publish_call(&server, raw_publish(1010, &events)).await,
            "events.data: is nested too deeply",
        );
        assert!(s.message().contains(&MAX_DATA_NESTING.to_string()));
        assert_eq!(
            tonic_types::StatusExt::get_details_bad_request(&s)
                .expect("BadRequest details")
                .field_violations[0]
                .field,
            "events.data"
        );
    }
    still_serving_and_not_stored(&mut ingest, &["nest-first", "nest-deep"]).await;

    // In StreamEvents the error arrives mid-stream, with the same code.
    let mut grpc = tonic::client::Grpc::new(server.channel().await);
    grpc.ready().await.unwrap();
    let messages = vec![
        raw_publish(1010, &[raw_event(b"stream-ok", b"COURSE_ENROLLMENT", None)]),
        raw_publish(
            1010,
            &[raw_event(
                b"stream-deep",
                b"COURSE_ENROLLMENT",
                Some(&nested_struct(500)),
            )],
        ),
    ];
    let mut req = tonic::Request::new(tokio_stream::iter(messages));
    req.metadata_mut()
        .insert("authorization", format!("Bearer {INGEST}").parse().unwrap());
    let mut answers = grpc
        .streaming(
            req,
            http::uri::PathAndQuery::from_static("/webhooks.v1.EventIngest/StreamEvents"),
            RawCodec,
        )
        .await
        .unwrap()
        .into_inner();
    answers.message().await.expect("first answered").unwrap();
    let s = answers.message().await.expect_err("second refused");
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
    assert!(
        s.message()
            .starts_with("stream message #2 (counting from 1): events.data: is nested too deeply"),
        "{s:?}"
    );
    still_serving_and_not_stored(&mut ingest, &["stream-deep"]).await;
    server.stop().await.unwrap();
}

#[tokio::test]
async fn huge_data_and_too_many_events_are_refused_whole() {
    let (_dir, server, _admin, mut ingest) = setup().await;
    // One event over limits.max_event_bytes (256 KiB), after a valid one.
    let mut big = event("huge-1", "COURSE_ENROLLMENT", 1);
    big.data.as_mut().unwrap().fields.insert(
        "blob".into(),
        prost_types::Value {
            kind: Some(prost_types::value::Kind::StringValue("x".repeat(300_000))),
        },
    );
    let r = ingest
        .publish_events(PublishEventsRequest {
            account_id: 1010,
            events: vec![event("huge-0", "COURSE_ENROLLMENT", 1), big],
        })
        .await;
    let s = invalid(r, "events[1]: is ");
    assert!(s.message().contains("262144"), "{}", s.message());

    // 10,000 events in one request (limit 1000).
    let events: Vec<Event> = (0..10_000)
        .map(|i| event(&format!("many-{i}"), "COURSE_ENROLLMENT", i))
        .collect();
    let s = invalid(
        ingest
            .publish_events(PublishEventsRequest {
                account_id: 1010,
                events,
            })
            .await,
        "events: 10000 events; at most 1000",
    );
    drop(s);
    still_serving_and_not_stored(&mut ingest, &["huge-0", "huge-1", "many-0", "many-9999"]).await;
    server.stop().await.unwrap();
}

#[tokio::test]
async fn names_ids_and_timestamps_that_are_not_valid() {
    let (_dir, server, _admin, mut ingest) = setup().await;
    let valid = || raw_event(b"bad-first", b"COURSE_ENROLLMENT", None);

    // Not UTF-8: protobuf strings must be; refused naming the field.
    for (events, field_name) in [
        (
            vec![valid(), raw_event(b"bad-utf8", b"COURSE_\xff\xfe", None)],
            "events.event_name: cannot be decoded",
        ),
        (
            vec![
                valid(),
                raw_event(b"bad-\xc3\x28", b"COURSE_ENROLLMENT", None),
            ],
            "events.event_id: cannot be decoded",
        ),
    ] {
        invalid(
            raw_publish_call(&server, raw_publish(1010, &events)).await,
            field_name,
        );
    }

    // Control characters, unknown names, timestamps out of range.
    let cases: Vec<(Event, &str)> = vec![
        (
            event("ctl-1", "COURSE_\u{0}ENROLLMENT", 1),
            "events[1].event_name: unknown event type",
        ),
        (
            event("ctl-2", "NO_SUCH_TYPE", 1),
            "events[1].event_name: unknown event type",
        ),
        (
            event("ctl-3", "course_enrollment", 1),
            "events[1].event_name: unknown event type \"course_enrollment\"; \
             did you mean COURSE_ENROLLMENT?",
        ),
        (event("", "", 1), "events[1].event_name: is required"),
        (
            event("ctl\n4", "COURSE_ENROLLMENT", 1),
            "events[1].event_id: must not contain control",
        ),
        (
            event(&"x".repeat(129), "COURSE_ENROLLMENT", 1),
            "events[1].event_id: must be at most 128 bytes",
        ),
        (
            Event {
                timestamp: -1,
                ..event("ts-1", "COURSE_ENROLLMENT", 1)
            },
            "events[1].timestamp",
        ),
        (
            Event {
                timestamp: i64::MAX,
                ..event("ts-2", "COURSE_ENROLLMENT", 1)
            },
            "events[1].timestamp",
        ),
        (
            Event {
                timestamp: 253_402_300_800_000,
                ..event("ts-3", "COURSE_ENROLLMENT", 1)
            },
            "events[1].timestamp",
        ),
    ];
    for (bad, expected) in cases {
        let r = ingest
            .publish_events(PublishEventsRequest {
                account_id: 1010,
                events: vec![event("bad-first", "COURSE_ENROLLMENT", 1), bad],
            })
            .await;
        invalid(r, expected);
    }
    // A non-finite number in data.
    let mut nan = event("nan-1", "COURSE_ENROLLMENT", 1);
    nan.data.as_mut().unwrap().fields.insert(
        "score".into(),
        prost_types::Value {
            kind: Some(prost_types::value::Kind::NumberValue(f64::INFINITY)),
        },
    );
    invalid(
        ingest
            .publish_events(PublishEventsRequest {
                account_id: 1010,
                events: vec![nan],
            })
            .await,
        "events[0].data.score: NaN and infinity",
    );
    // Extremes that are valid: the first ms after the epoch, and year 9999.
    let r = publish(
        &mut ingest,
        1010,
        vec![
            Event {
                timestamp: 1,
                ..event("ts-ok-1", "COURSE_ENROLLMENT", 1)
            },
            Event {
                timestamp: 253_402_300_799_999,
                ..event("ts-ok-2", "COURSE_ENROLLMENT", 1)
            },
        ],
    )
    .await;
    assert_eq!(r.results.len(), 2);
    still_serving_and_not_stored(&mut ingest, &["bad-first", "ctl-1", "ts-1", "nan-1"]).await;
    server.stop().await.unwrap();
}

#[tokio::test]
async fn empty_and_duplicate_event_ids_within_one_request() {
    let listener = Listener::ok().await;
    let (_dir, server, mut admin, mut ingest) = setup().await;
    create(
        &mut admin,
        1010,
        webhook("dups", &listener.url(), &["COURSE_ENROLLMENT"], no_auth()),
    )
    .await;
    let r = publish(
        &mut ingest,
        1010,
        vec![
            event("", "COURSE_ENROLLMENT", 1),
            event("dup-1", "COURSE_ENROLLMENT", 2),
            event("dup-1", "COURSE_ENROLLMENT", 3),
            event("", "COURSE_ENROLLMENT", 4),
        ],
    )
    .await;
    let ids: Vec<&str> = r.results.iter().map(|x| x.event_id.as_str()).collect();
    // Empty ids get distinct generated UUIDs.
    assert_eq!(ids[0].len(), 36, "{ids:?}");
    assert_eq!(ids[3].len(), 36);
    assert_ne!(ids[0], ids[3]);
    // The second dup-1 is reported as a duplicate and not delivered.
    assert_eq!(ids[1], "dup-1");
    assert_eq!(ids[2], "dup-1");
    assert!(!r.results[1].duplicate && r.results[2].duplicate);
    let got = listener.wait_events(3, Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let got_all = listener.event_ids();
    assert_eq!(got.len(), 3, "{got:?}");
    assert_eq!(got_all.iter().filter(|i| *i == "dup-1").count(), 1);
    server.stop().await.unwrap();
}

// ------------------------------------------------------------ targets

#[tokio::test]
async fn private_and_disguised_targets_are_refused_with_the_default_guard() {
    // The default guard: https only, no loopback/private/link-local targets.
    let (_dir, server, mut admin, mut ingest) =
        setup_with(|c| c.delivery.allow_private_targets = false).await;
    let refused = [
        (
            "https://user:pw@example.com/hook",
            "must not carry credentials",
        ),
        ("https://:pw@example.com/hook", "must not carry credentials"),
        ("http://example.com/hook", "must use https"),
        ("ftp://example.com/hook", "unsupported scheme"),
        ("https://127.0.0.1/hook", "non-global address (127.0.0.1)"),
        ("https://[::1]/hook", "non-global address (::1)"),
        ("https://[::ffff:127.0.0.1]/hook", "non-global address"),
        (
            "https://[::ffff:169.254.169.254]/hook",
            "non-global address",
        ),
        ("https://[::ffff:7f00:1]/hook", "non-global address"),
        ("https://[fe80::1]/hook", "non-global address"),
        ("https://[fd00::1]/hook", "non-global address"),
        ("https://[::]/hook", "non-global address"),
        ("https://[64:ff9b::a9fe:a9fe]/hook", "non-global address"),
        ("https://2130706433/hook", "non-global address (127.0.0.1)"),
        ("https://0177.0.0.1/hook", "non-global address (127.0.0.1)"),
        ("https://0x7f.1/hook", "non-global address (127.0.0.1)"),
        ("https://127.1/hook", "non-global address (127.0.0.1)"),
        ("https://0/hook", "non-global address (0.0.0.0)"),
        (
            "https://169.254.169.254/latest/meta-data/",
            "non-global address (169.254.169.254)",
        ),
        (
            "https://0xa9.0xfe.0xa9.0xfe/",
            "non-global address (169.254.169.254)",
        ),
        ("https://10.0.0.1/hook", "non-global address"),
        ("https://192.168.1.1/hook", "non-global address"),
        ("https://100.64.0.1/hook", "non-global address"),
        ("https://localhost/hook", "loopback host"),
        ("https://LOCALHOST./hook", "loopback host"),
        ("https://api.localhost/hook", "loopback host"),
        ("not a url", "not an absolute URL"),
    ];
    for (url, reason) in refused {
        let r = admin
            .create_webhook(CreateWebhookRequest {
                account_id: 1010,
                webhook: Some(webhook("t", url, &["COURSE_ENROLLMENT"], no_auth())),
            })
            .await;
        let s = invalid(r, "webhook.target_url: ");
        assert!(s.message().contains(reason), "{url}: {}", s.message());
        assert!(!s.message().contains("pw@"), "credentials not echoed");
        // TestWebhook with the same inline webhook: refused too, nothing sent.
        let r = admin
            .test_webhook(TestWebhookRequest {
                account_id: 1010,
                target: Some(test_webhook_request::Target::Webhook(webhook(
                    "t",
                    url,
                    &["COURSE_ENROLLMENT"],
                    no_auth(),
                ))),
                event_name: String::new(),
            })
            .await;
        invalid(r, "webhook.target_url: ");
    }
    // Nothing was stored, and the server keeps serving.
    let list = admin
        .list_webhooks(ListWebhooksRequest {
            account_id: 1010,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(list.webhooks.is_empty(), "{list:?}");
    still_serving_and_not_stored(&mut ingest, &[]).await;
    server.stop().await.unwrap();
}

/// Names from /etc/hosts that resolve to a loopback address (other than the
/// `localhost` family, which is refused by name).
fn loopback_names_from_hosts() -> Vec<String> {
    let hosts = std::fs::read_to_string("/etc/hosts").unwrap_or_default();
    let mut out = Vec::new();
    for line in hosts.lines() {
        let line = line.split('#').next().unwrap_or("");
        let mut parts = line.split_whitespace();
        let Some(ip) = parts
            .next()
            .and_then(|p| p.parse::<std::net::IpAddr>().ok())
        else {
            continue;
        };
        if !ip.is_loopback() {
            continue;
        }
        for name in parts {
            let n = name.to_ascii_lowercase();
            if n != "localhost" && !n.ends_with(".localhost") && !out.contains(&n) {
                out.push(n);
            }
        }
    }
    out
}

#[tokio::test]
async fn names_resolving_to_loopback_are_refused_at_connect_time() {
    let names = loopback_names_from_hosts();
    assert!(
        !names.is_empty(),
        "this test needs a name other than localhost for 127.0.0.1 or ::1 in /etc/hosts"
    );
    // A real TCP listener on loopback that must never see a connection.
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = tcp.local_addr().unwrap().port();
    let accepted = Arc::new(AtomicUsize::new(0));
    let counter = accepted.clone();
    let acceptor = tokio::spawn(async move {
        while tcp.accept().await.is_ok() {
            counter.fetch_add(1, Ordering::SeqCst);
        }
    });
    let (_dir, server, mut admin, mut ingest) =
        setup_with(|c| c.delivery.allow_private_targets = false).await;
    let mut hooks = Vec::new();
    for name in &names {
        // Names are not resolved when saved (DNS can change); they are
        // resolved and checked before every connection.
        let w = create(
            &mut admin,
            1010,
            webhook(
                name,
                &format!("https://{name}:{port}/hook"),
                &["COURSE_ENROLLMENT"],
                no_auth(),
            ),
        )
        .await;
        hooks.push(w);
    }
    publish(
        &mut ingest,
        1010,
        vec![event("to-private", "COURSE_ENROLLMENT", 1)],
    )
    .await;
    for w in &hooks {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let error = loop {
            let d = deliveries(&mut admin, &w.id).await;
            if let Some(a) = d.first().and_then(|d| d.attempts.first()) {
                break a.error.clone();
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no attempt for {}",
                w.name
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert!(
            error.contains("non-global"),
            "{}: attempt error {error:?}",
            w.name
        );
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 0, "no connection was made");
    eprintln!("names refused at connect time: {names:?}");
    acceptor.abort();
    server.stop().await.unwrap();
}

#[tokio::test]
async fn non_utf8_and_control_characters_in_webhook_fields() {
    let (_dir, server, mut admin, mut ingest) = setup().await;
    // CreateWebhookRequest { account_id: 1010, webhook: Webhook { name: <bytes> } }
    let mut req = vec![0x08];
    varint(1010, &mut req);
    let mut w = field(3, b"caf\xe9");
    w.extend(field(5, b"http://127.0.0.1:9/h"));
    req.extend(field(2, &w));
    invalid(
        raw_unary(
            &server,
            "/webhooks.v1.WebhookAdmin/CreateWebhook",
            ADMIN,
            req,
        )
        .await,
        "webhook.name: cannot be decoded",
    );
    for (name, username, expected) in [
        ("bell\u{7}", "erp", "webhook.name: must not contain control"),
        ("ok", "er\u{0}p", "webhook.auth.basic.username"),
        ("ok", "er:p", "webhook.auth.basic.username"),
    ] {
        let r = admin
            .create_webhook(CreateWebhookRequest {
                account_id: 1010,
                webhook: Some(webhook(
                    name,
                    "http://127.0.0.1:9/h",
                    &["COURSE_ENROLLMENT"],
                    webhook_auth::Method::Basic(BasicAuth {
                        username: username.into(),
                        password: "p".into(),
                    }),
                )),
            })
            .await;
        invalid(r, expected);
    }
    // An empty message where a request is expected decodes to defaults and
    // is refused by validation, not by the transport.
    invalid(
        raw_unary(
            &server,
            "/webhooks.v1.WebhookAdmin/CreateWebhook",
            ADMIN,
            vec![],
        )
        .await,
        "account_id: is required",
    );
    // Garbage bytes: INVALID_ARGUMENT too.
    invalid(
        raw_unary(
            &server,
            "/webhooks.v1.WebhookAdmin/CreateWebhook",
            ADMIN,
            vec![0xff, 0xff, 0xff],
        )
        .await,
        "request: cannot be decoded",
    );
    let list = admin
        .list_webhooks(ListWebhooksRequest {
            account_id: 1010,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(list.webhooks.is_empty());
    still_serving_and_not_stored(&mut ingest, &[]).await;
    // Keeps a deterministic encoded size for the probe; silence unused warnings.
    let _ = PublishEventsRequest::default().encoded_len();
    server.stop().await.unwrap();
}
