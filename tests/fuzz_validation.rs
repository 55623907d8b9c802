//! Property tests (proptest) of request validation and conversion: for
//! arbitrary requests, webhooks, `data` Structs and raw bytes, nothing
//! panics, every rejection is INVALID_ARGUMENT with a field name, and what is
//! accepted renders to valid JSON. Runs `PROPTEST_CASES` cases per property
//! (default 256: a few seconds).

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};

use proptest::prelude::*;
use prost::Message;
use prost_types::{value::Kind, ListValue, Struct, Value};
use webhook_router::api::convert::{struct_to_json, webhook_from_proto};
use webhook_router::api::ingest::validate_request;
use webhook_router::api::layers::clarify_decode_error;
use webhook_router::api::AppState;
use webhook_router::config::Config;
use webhook_router::delivery::{guard, Dispatcher};
use webhook_router::domain::catalog::Catalog;
use webhook_router::domain::webhook::{validate, Rules};
use webhook_router::error::Error;
use webhook_router::proto::v1 as pb;
use webhook_router::store::Store;

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256)
}

/// A real AppState (store on a temp folder, running dispatcher) with small
/// limits so the limits are hit often.
fn state() -> &'static AppState {
    static STATE: OnceLock<(AppState, tokio::runtime::Runtime, tempfile::TempDir)> =
        OnceLock::new();
    &STATE
        .get_or_init(|| {
            let dir = tempfile::tempdir().unwrap();
            let rt = tokio::runtime::Runtime::new().unwrap();
            let mut config = Config {
                data_dir: dir.path().to_path_buf(),
                ..Config::default()
            };
            config.limits.max_events_per_request = 4;
            config.limits.max_event_bytes = 600;
            let config = Arc::new(config);
            let catalog = Arc::new(Catalog::new(&config.event_types));
            let state = rt.block_on(async {
                let store = Store::open_sled(dir.path()).unwrap();
                let dispatcher = Dispatcher::start(store.clone(), config.clone(), catalog.clone())
                    .await
                    .unwrap();
                AppState {
                    config,
                    catalog,
                    store,
                    dispatcher,
                    metrics: Arc::new(webhook_router::metrics::Metrics::new(None)),
                }
            });
            (state, rt, dir)
        })
        .0
}

/// Any characters, control characters and non-ASCII included.
fn text(max: usize) -> impl Strategy<Value = String> {
    prop_oneof![
        proptest::collection::vec(any::<char>(), 0..max).prop_map(|v| v.into_iter().collect()),
        proptest::collection::vec(
            prop_oneof![
                Just('a'),
                Just('_'),
                Just('\u{0}'),
                Just('\n'),
                Just(':'),
                Just('é')
            ],
            0..max
        )
        .prop_map(|v| v.into_iter().collect()),
    ]
}

fn value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value { kind: None }),
        any::<bool>().prop_map(|b| Value {
            kind: Some(Kind::BoolValue(b))
        }),
        any::<f64>().prop_map(|n| Value {
            kind: Some(Kind::NumberValue(n))
        }),
        text(12).prop_map(|s| Value {
            kind: Some(Kind::StringValue(s))
        }),
    ];
    leaf.prop_recursive(5, 48, 4, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(|values| Value {
                kind: Some(Kind::ListValue(ListValue { values }))
            }),
            proptest::collection::btree_map(text(6), inner, 0..4).prop_map(|m| Value {
                kind: Some(Kind::StructValue(Struct {
                    fields: m.into_iter().collect()
                }))
            }),
        ]
    })
}

fn data() -> impl Strategy<Value = Option<Struct>> {
    proptest::option::of(
        proptest::collection::btree_map(text(6), value(), 0..4).prop_map(|m: BTreeMap<_, _>| {
            Struct {
                fields: m.into_iter().collect(),
            }
        }),
    )
}

fn event() -> impl Strategy<Value = pb::Event> {
    (
        prop_oneof![Just(String::new()), text(20), "[a-z0-9-]{1,140}"],
        prop_oneof![
            Just("COURSE_ENROLLMENT".to_string()),
            Just("CI_STATS".to_string()),
            text(20)
        ],
        prop_oneof![any::<i64>(), 0..=253_402_300_799_999i64],
        text(30),
        data(),
    )
        .prop_map(
            |(event_id, event_name, timestamp, event_info, data)| pb::Event {
                event_id,
                event_name,
                timestamp,
                event_info,
                data,
            },
        )
}

/// Every rejection is INVALID_ARGUMENT naming a field under `prefix`.
fn assert_field_error<T: std::fmt::Debug>(r: &Result<T, Error>, prefix: &str) {
    if let Err(e) = r {
        match e {
            Error::InvalidArgument { field, reason } => {
                assert!(field.starts_with(prefix), "field {field:?} ({reason})");
                assert!(!reason.is_empty());
            }
            other => panic!("not INVALID_ARGUMENT: {other:?}"),
        }
    }
}

fn url() -> impl Strategy<Value = String> {
    let host = prop_oneof![
        any::<[u8; 4]>().prop_map(|o| format!("{}.{}.{}.{}", o[0], o[1], o[2], o[3])),
        any::<[u16; 8]>().prop_map(|s| format!(
            "[{}]",
            s.iter()
                .map(|x| format!("{x:x}"))
                .collect::<Vec<_>>()
                .join(":")
        )),
        any::<u32>().prop_map(|n| n.to_string()),
        any::<u32>().prop_map(|n| format!("0x{n:x}")),
        Just("localhost".to_string()),
        Just("[::ffff:127.0.0.1]".to_string()),
        "[a-z]{1,10}(\\.[a-z]{2,5}){0,2}",
        text(10),
    ];
    prop_oneof![
        (
            prop_oneof![Just("https"), Just("http"), Just("ftp")],
            proptest::option::of("[a-z]{1,5}(:[a-z]{0,5})?@"),
            host,
            proptest::option::of(any::<u16>()),
            text(8),
        )
            .prop_map(|(scheme, creds, host, port, path)| format!(
                "{scheme}://{}{host}{}/{path}",
                creds.unwrap_or_default(),
                port.map(|p| format!(":{p}")).unwrap_or_default()
            )),
        text(30),
    ]
}

fn webhook() -> impl Strategy<Value = pb::Webhook> {
    use pb::webhook_auth::Method;
    let auth = prop_oneof![
        Just(None),
        Just(Some(Method::None(pb::NoAuth {}))),
        Just(Some(Method::Signature(pb::SignatureAuth::default()))),
        (text(10), text(10)).prop_map(|(username, password)| Some(Method::Basic(pb::BasicAuth {
            username,
            password
        }))),
    ];
    (
        text(140),
        text(40),
        url(),
        proptest::collection::vec(
            prop_oneof![
                Just("COURSE_ENROLLMENT".to_string()),
                Just("CI_STATS".to_string()),
                text(10)
            ],
            0..4,
        ),
        auth,
    )
        .prop_map(
            |(name, description, target_url, event_types, auth)| pb::Webhook {
                name,
                description,
                target_url,
                event_types,
                auth: Some(pb::WebhookAuth { method: auth }),
                ..Default::default()
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases()))]

    #[test]
    fn publish_requests_are_accepted_whole_or_refused_with_a_field(
        account_id in any::<u64>(),
        events in proptest::collection::vec(event(), 0..6),
    ) {
        let r = pb::PublishEventsRequest { account_id, events };
        let out = validate_request(state(), &r);
        assert_field_error(&out, "events");
        if let Ok(events) = out {
            prop_assert_eq!(events.len(), r.events.len());
            for (e, sent) in events.iter().zip(&r.events) {
                let v: serde_json::Value = serde_json::from_str(&e.json)
                    .expect("rendered events are valid JSON");
                prop_assert_eq!(v["eventName"].as_str(), Some(sent.event_name.as_str()));
                prop_assert!(v["data"].is_object());
                prop_assert!(!e.event_id.is_empty());
            }
        }
    }

    #[test]
    fn arbitrary_bytes_decode_or_fail_cleanly(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        if let Ok(r) = pb::PublishEventsRequest::decode(bytes.as_slice()) {
            assert_field_error(&validate_request(state(), &r), "events");
        }
        if let Ok(w) = pb::CreateWebhookRequest::decode(bytes.as_slice()) {
            if let Some(w) = w.webhook {
                let mut domain = webhook_from_proto(1, &w, 0);
                let catalog = &state().catalog;
                let r = validate(&mut domain, Rules { catalog, allow_private_targets: false }, "webhook");
                assert_field_error(&r, "webhook.");
            }
        }
    }

    #[test]
    fn data_structs_render_to_json_or_name_the_bad_value(d in data()) {
        let r = struct_to_json(d.as_ref(), 0, || "data".into());
        assert_field_error(&r, "data");
        if let Ok(json) = r {
            let v: serde_json::Value = serde_json::from_str(&json).expect("valid JSON");
            prop_assert!(v.is_object());
        }
    }

    #[test]
    fn webhooks_validate_or_name_the_field(w in webhook(), allow_private in any::<bool>()) {
        let mut domain = webhook_from_proto(1010, &w, 0);
        let catalog = &state().catalog;
        let r = validate(&mut domain, Rules { catalog, allow_private_targets: allow_private }, "webhook");
        assert_field_error(&r, "webhook.");
        if r.is_ok() && !allow_private {
            // Accepted with the default guard: an https URL without
            // credentials whose literal address (if any) is global.
            let url = guard::check_target_url(&domain.target_url, false).expect("guard agrees");
            prop_assert_eq!(url.scheme(), "https");
            prop_assert!(url.username().is_empty() && url.password().is_none());
            match url.host() {
                Some(url::Host::Ipv4(ip)) => prop_assert!(guard::is_global(ip.into())),
                Some(url::Host::Ipv6(ip)) => prop_assert!(guard::is_global(ip.into())),
                _ => {}
            }
        }
    }

    #[test]
    fn decode_error_rewriting_never_panics(code in 0i32..17, msg in text(80)) {
        let prefixed = format!("failed to decode Protobuf message: {msg}");
        for m in [msg.as_str(), prefixed.as_str()] {
            let status = tonic::Status::new(tonic::Code::from(code), m);
            if let Some(clear) = clarify_decode_error(&status) {
                prop_assert_eq!(clear.code(), tonic::Code::InvalidArgument);
                prop_assert!(!clear.message().is_empty());
            }
        }
    }
}
