//! Payload filters and ExplainRouting against a real router and real
//! listeners: a filtered webhook receives exactly the matching events, on
//! sled and on PostgreSQL; bad filters are refused naming the part;
//! ExplainRouting gives every reason.
//!
//! Negative checks rely on order: a webhook's real-time events go out one
//! payload at a time in log order, so once the last event of a sequence
//! arrived, every earlier one was either delivered or skipped already.

use std::sync::Arc;
use std::time::Duration;

use prost_types::{value::Kind, ListValue, Struct, Value};
use tonic::Code;
use webhook_router::config::StorageBackend;

use crate::common::*;

const WAIT: Duration = Duration::from_secs(15);
const BACKLOG: &str = "webhook_router_lane_backlog_events";

// ------------------------------------------------------------ helpers

fn json_value(v: &serde_json::Value) -> Value {
    let kind = match v {
        serde_json::Value::Null => Kind::NullValue(0),
        serde_json::Value::Bool(b) => Kind::BoolValue(*b),
        serde_json::Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap()),
        serde_json::Value::String(s) => Kind::StringValue(s.clone()),
        serde_json::Value::Array(a) => Kind::ListValue(ListValue {
            values: a.iter().map(json_value).collect(),
        }),
        serde_json::Value::Object(m) => Kind::StructValue(Struct {
            fields: m.iter().map(|(k, v)| (k.clone(), json_value(v))).collect(),
        }),
    };
    Value { kind: Some(kind) }
}

/// A COURSE_ENROLLMENT event with this `data`.
fn ev(id: &str, data: serde_json::Value) -> Event {
    let Some(Kind::StructValue(s)) = json_value(&data).kind else {
        panic!("data must be an object");
    };
    Event {
        event_id: id.into(),
        event_name: "COURSE_ENROLLMENT".into(),
        timestamp: 1_727_414_643_000,
        event_info: String::new(),
        data: Some(s),
    }
}

fn cond(path: &str, test: field_condition::Test) -> EventFilter {
    EventFilter {
        kind: Some(event_filter::Kind::Condition(FieldCondition {
            path: path.into(),
            test: Some(test),
        })),
    }
}

fn equals(path: &str, v: serde_json::Value) -> EventFilter {
    cond(path, field_condition::Test::Equals(json_value(&v)))
}

fn one_of(path: &str, vs: &[serde_json::Value]) -> EventFilter {
    cond(
        path,
        field_condition::Test::In(ListValue {
            values: vs.iter().map(json_value).collect(),
        }),
    )
}

fn all(filters: Vec<EventFilter>) -> EventFilter {
    EventFilter {
        kind: Some(event_filter::Kind::All(EventFilterList { filters })),
    }
}

fn any(filters: Vec<EventFilter>) -> EventFilter {
    EventFilter {
        kind: Some(event_filter::Kind::Any(EventFilterList { filters })),
    }
}

fn filtered(name: &str, url: &str, filter: Option<EventFilter>) -> Webhook {
    Webhook {
        filter,
        ..webhook(name, url, &["COURSE_ENROLLMENT"], no_auth())
    }
}

async fn try_create(admin: &mut Admin, w: Webhook) -> Result<Webhook, tonic::Status> {
    admin
        .create_webhook(CreateWebhookRequest {
            account_id: 1010,
            webhook: Some(w),
        })
        .await
        .map(|r| r.into_inner().webhook.unwrap())
}

async fn set_filter(
    admin: &mut Admin,
    id: &str,
    filter: Option<EventFilter>,
) -> Result<Webhook, tonic::Status> {
    admin
        .update_webhook(UpdateWebhookRequest {
            account_id: 1010,
            webhook: Some(Webhook {
                id: id.into(),
                filter,
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["filter".into()],
            }),
        })
        .await
        .map(|r| r.into_inner().webhook.unwrap())
}

async fn get(admin: &mut Admin, id: &str) -> Webhook {
    admin
        .get_webhook(GetWebhookRequest {
            account_id: 1010,
            webhook_id: id.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .webhook
        .unwrap()
}

/// Waits until `last` arrived at `l`; then (by order) every earlier event
/// was delivered or skipped. Returns the event ids received.
async fn received_through(l: &Listener, last: &str) -> Vec<String> {
    l.wait_until(WAIT, |r| {
        r.iter().any(|r| r.event_ids().iter().any(|e| e == last))
    })
    .await;
    let ids = l.event_ids();
    assert!(
        ids.iter().any(|e| e == last),
        "{last} never arrived: {ids:?}"
    );
    ids
}

/// Every event id in the webhook's delivery records, oldest first.
async fn delivered_ids(admin: &mut Admin, id: &str) -> Vec<String> {
    let mut all = Vec::new();
    let mut page_token = String::new();
    loop {
        let r = admin
            .list_deliveries(ListDeliveriesRequest {
                account_id: 1010,
                webhook_id: id.into(),
                state: 0,
                page_size: 100,
                page_token,
            })
            .await
            .unwrap()
            .into_inner();
        all.extend(r.deliveries);
        if r.next_page_token.is_empty() {
            break;
        }
        page_token = r.next_page_token;
    }
    all.reverse();
    all.into_iter().flat_map(|d| d.event_ids).collect()
}

/// The delivery records' event ids once they list `n` events (outcomes
/// are written a moment after the listener answered), or at the deadline.
async fn wait_for_records(admin: &mut Admin, id: &str, n: usize) -> Vec<String> {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let ids = delivered_ids(admin, id).await;
        if ids.len() >= n || std::time::Instant::now() > deadline {
            return ids;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A webhook's name, its filter, and the event ids it must receive.
type Case = (&'static str, EventFilter, Vec<&'static str>);

/// The events of the operator tests and the ones each filter takes.
fn operator_cases() -> (Vec<Event>, Vec<Case>) {
    use field_condition::Test;
    use serde_json::json;
    let events = vec![
        ev(
            "e1",
            json!({"course": {"id": "c-42"}, "kind": "quiz", "score": 95, "attempts": 1}),
        ),
        ev(
            "e2",
            json!({"course": {"id": "c-7"}, "kind": "survey", "score": 50, "attempts": 3, "draft": true}),
        ),
        ev(
            "e3",
            json!({"course": {"id": "c-42"}, "score": "100", "passed": false, "attempts": 2}),
        ),
        ev(
            "e4",
            json!({"course": {"id": "c-42"}, "kind": "exam", "passed": true, "score": 10, "attempts": 1.0, "draft": null}),
        ),
        ev("e5", json!({})),
        // Matches every filter below: the last event of the sequence.
        ev(
            "last",
            json!({"course": {"id": "c-42"}, "kind": "exam", "passed": true, "score": 100, "attempts": 0}),
        ),
    ];
    let cases = vec![
        (
            "equals",
            equals("course.id", json!("c-42")),
            vec!["e1", "e3", "e4", "last"],
        ),
        (
            "in",
            one_of("kind", &[json!("quiz"), json!("exam")]),
            vec!["e1", "e4", "last"],
        ),
        (
            "exists",
            cond("passed", Test::Exists(true)),
            vec!["e3", "e4", "last"],
        ),
        (
            "not-exists",
            cond("draft", Test::Exists(false)),
            vec!["e1", "e3", "e5", "last"],
        ),
        ("gt", cond("score", Test::Gt(90.0)), vec!["e1", "last"]),
        (
            "gte",
            cond("score", Test::Gte(50.0)),
            vec!["e1", "e2", "last"],
        ),
        (
            "lt",
            cond("attempts", Test::Lt(3.0)),
            vec!["e1", "e3", "e4", "last"],
        ),
        (
            "lte",
            cond("attempts", Test::Lte(1.0)),
            vec!["e1", "e4", "last"],
        ),
        (
            "nested",
            all(vec![
                equals("course.id", json!("c-42")),
                any(vec![
                    cond("score", Test::Gte(90.0)),
                    equals("passed", json!(true)),
                ]),
            ]),
            vec!["e1", "e4", "last"],
        ),
    ];
    (events, cases)
}

/// Creates one webhook per case plus an unfiltered one, publishes the
/// events (one request, then again one by one so payloads are cut
/// differently), and checks each listener got exactly its events, its
/// delivery records list only those, and its lane's backlog ends at 0.
async fn exactly_the_matching_events(mut config: webhook_router::config::Config) {
    config.limits.max_webhooks_per_account = 20;
    let (server, metrics_addr) = TestServer::start_with_metrics(config).await;
    let mut admin = server.admin(ADMIN).await;
    let mut ingest = server.ingest(INGEST).await;
    let (events, cases) = operator_cases();
    let mut hooks = Vec::new();
    for (name, filter, want) in cases {
        let l = Listener::ok().await;
        let w = create(
            &mut admin,
            1010,
            filtered(name, &l.url(), Some(filter.clone())),
        )
        .await;
        assert_eq!(
            w.filter.as_ref(),
            Some(&filter),
            "{name}: read back as sent"
        );
        hooks.push((name, l, w, want));
    }
    let every = Listener::ok().await;
    let plain = create(&mut admin, 1010, filtered("every", &every.url(), None)).await;
    assert_eq!(plain.filter, None);

    publish(&mut ingest, 1010, events.clone()).await;
    let all_ids: Vec<String> = events.iter().map(|e| e.event_id.clone()).collect();
    assert_eq!(received_through(&every, "last").await, all_ids);
    for (name, l, w, want) in &hooks {
        let got = received_through(l, "last").await;
        assert_eq!(&got, want, "{name}: received");
        let recorded = wait_for_records(&mut admin, &w.id, want.len()).await;
        assert_eq!(&recorded, want, "{name}: delivery records");
    }
    // The lanes skipped the rest: nothing is left counted as pending.
    let samples = scrape_until(metrics_addr, |s| {
        hooks.iter().all(|(_, _, w, _)| {
            value(
                s,
                BACKLOG,
                &[("webhook_id", w.id.as_str()), ("mode", "realtime")],
            ) == Some(0.0)
        })
    })
    .await;
    for (name, _, w, _) in &hooks {
        let lane = [("webhook_id", w.id.as_str()), ("mode", "realtime")];
        assert_eq!(
            value(&samples, BACKLOG, &lane),
            Some(0.0),
            "{name}: backlog"
        );
    }
    drop(server);
}

// ------------------------------------------------------------ tests

#[tokio::test]
async fn each_operator_delivers_exactly_the_matching_events_on_sled() {
    let dir = tempfile::tempdir().unwrap();
    exactly_the_matching_events(test_config(dir.path())).await;
}

#[tokio::test]
async fn each_operator_delivers_exactly_the_matching_events_on_postgres() {
    let dir = tempfile::tempdir().unwrap();
    let db = crate::common::pg::TestDb::create().await;
    let mut config = test_config(dir.path());
    config.storage.backend = StorageBackend::Postgres;
    config.storage.postgres_url = db.url.clone();
    exactly_the_matching_events(config).await;
}

/// A backlog built while the webhook is retired: one lane read covers many
/// events, most of them filtered out, and payloads carry several events.
#[tokio::test]
async fn a_backlog_is_filtered_in_order_and_the_skipped_leave_no_record() {
    use serde_json::json;
    let (_dir, server, mut admin, mut ingest) = setup().await;
    let l = Listener::ok().await;
    let w = create(
        &mut admin,
        1010,
        filtered("even", &l.url(), Some(equals("parity", json!("even")))),
    )
    .await;
    admin
        .retire_webhook(RetireWebhookRequest {
            account_id: 1010,
            webhook_id: w.id.clone(),
        })
        .await
        .unwrap();
    let events: Vec<Event> = (0..200)
        .map(|i| {
            let parity = if i % 2 == 0 { "even" } else { "odd" };
            ev(&format!("b-{i:03}"), json!({ "parity": parity, "i": i }))
        })
        .collect();
    for chunk in events.chunks(50) {
        publish(&mut ingest, 1010, chunk.to_vec()).await;
    }
    admin
        .activate_webhook(ActivateWebhookRequest {
            account_id: 1010,
            webhook_id: w.id.clone(),
        })
        .await
        .unwrap();
    let want: Vec<String> = (0..200).step_by(2).map(|i| format!("b-{i:03}")).collect();
    let got = received_through(&l, "b-198").await;
    assert_eq!(got, want);
    let recorded = wait_for_records(&mut admin, &w.id, want.len()).await;
    assert_eq!(recorded, want);
    drop(server);
}

#[tokio::test]
async fn updating_the_filter_applies_to_events_published_afterwards() {
    use serde_json::json;
    let (_dir, server, mut admin, mut ingest) = setup().await;
    let l = Listener::ok().await;
    let c = |id: &str, course: &str| ev(id, json!({"course": {"id": course}}));
    let w = create(
        &mut admin,
        1010,
        filtered("f", &l.url(), Some(equals("course.id", json!("c-42")))),
    )
    .await;
    // b (not matching) comes before a: once a arrived, b was skipped.
    publish(&mut ingest, 1010, vec![c("b", "c-7"), c("a", "c-42")]).await;
    assert_eq!(received_through(&l, "a").await, ["a"]);

    let changed = set_filter(
        &mut admin,
        &w.id,
        Some(one_of("course.id", &[json!("c-7"), json!("c-8")])),
    )
    .await
    .unwrap();
    assert_eq!(
        changed.filter,
        Some(one_of("course.id", &[json!("c-7"), json!("c-8")]))
    );
    assert_eq!(get(&mut admin, &w.id).await.filter, changed.filter);
    publish(&mut ingest, 1010, vec![c("c", "c-42"), c("d", "c-7")]).await;
    assert_eq!(received_through(&l, "d").await, ["a", "d"]);

    // An empty mask with only the filter set changes just the filter.
    let nested = any(vec![
        equals("course.id", json!("c-1")),
        all(vec![equals("course.id", json!("c-2"))]),
    ]);
    let r = admin
        .update_webhook(UpdateWebhookRequest {
            account_id: 1010,
            webhook: Some(Webhook {
                id: w.id.clone(),
                filter: Some(nested.clone()),
                ..Default::default()
            }),
            update_mask: None,
        })
        .await
        .unwrap()
        .into_inner()
        .webhook
        .unwrap();
    assert_eq!(r.filter, Some(nested));
    assert_eq!(r.name, "f");
    publish(&mut ingest, 1010, vec![c("e", "c-7"), c("f", "c-2")]).await;
    assert_eq!(received_through(&l, "f").await, ["a", "d", "f"]);

    // Naming `filter` with none set removes it: every event again.
    let cleared = set_filter(&mut admin, &w.id, None).await.unwrap();
    assert_eq!(cleared.filter, None);
    publish(&mut ingest, 1010, vec![c("g", "c-9"), c("h", "c-42")]).await;
    assert_eq!(received_through(&l, "h").await, ["a", "d", "f", "g", "h"]);
    // Other edits keep the filter.
    set_filter(&mut admin, &w.id, Some(equals("x", json!(1))))
        .await
        .unwrap();
    let renamed = admin
        .update_webhook(UpdateWebhookRequest {
            account_id: 1010,
            webhook: Some(Webhook {
                id: w.id.clone(),
                name: "renamed".into(),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["name".into()],
            }),
        })
        .await
        .unwrap()
        .into_inner()
        .webhook
        .unwrap();
    assert_eq!(renamed.filter, Some(equals("x", json!(1))));
    drop(server);
}

#[tokio::test]
async fn bad_filters_are_refused_at_create_and_update_naming_the_part() {
    use field_condition::Test;
    use serde_json::json;
    let (_dir, server, mut admin, _ingest) = setup().await;
    let ok = || cond("a", Test::Exists(true));
    let mut deep = ok();
    for _ in 0..5 {
        deep = all(vec![deep]);
    }
    let many = all((0..33).map(|_| ok()).collect());
    let values: Vec<serde_json::Value> = (0..101).map(|_| json!(1)).collect();
    let long_in = one_of("a", &values);
    let cases: Vec<(EventFilter, &str, &str)> = vec![
        (
            all(vec![ok(), ok(), cond("", Test::Exists(true))]),
            "webhook.filter.all.filters[2].condition.path",
            "is required",
        ),
        (
            any(vec![]),
            "webhook.filter.any.filters",
            "at least one filter",
        ),
        (
            deep,
            "webhook.filter.all.filters[0].all.filters[0].all.filters[0].all.filters[0].all",
            "at most 4 levels",
        ),
        (
            many,
            "webhook.filter.all.filters[32].condition",
            "at most 32 conditions",
        ),
        (
            cond("a", Test::Gt(f64::NAN)),
            "webhook.filter.condition.gt",
            "finite",
        ),
        (
            EventFilter {
                kind: Some(event_filter::Kind::Condition(FieldCondition {
                    path: "a".into(),
                    test: None,
                })),
            },
            "webhook.filter.condition",
            "needs one test",
        ),
        (
            EventFilter { kind: None },
            "webhook.filter",
            "needs one of all, any, condition",
        ),
        (
            cond("a..b", Test::Exists(true)),
            "webhook.filter.condition.path",
            "empty key",
        ),
        (
            cond(&"k".repeat(257), Test::Exists(true)),
            "webhook.filter.condition.path",
            "at most 256 bytes",
        ),
        (long_in, "webhook.filter.condition.in", "at most 100 values"),
        (
            one_of("a", &[]),
            "webhook.filter.condition.in",
            "at least one value",
        ),
    ];
    let l = Listener::ok().await;
    let existing = create(&mut admin, 1010, filtered("ok", &l.url(), Some(ok()))).await;
    for (filter, field, words) in cases {
        let e = try_create(&mut admin, filtered("bad", &l.url(), Some(filter.clone())))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{field}: {e:?}");
        assert!(
            e.message().starts_with(&format!("{field}: ")) && e.message().contains(words),
            "create, {field}: {}",
            e.message()
        );
        let e = set_filter(&mut admin, &existing.id, Some(filter))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{field}: {e:?}");
        assert!(
            e.message().starts_with(&format!("{field}: ")) && e.message().contains(words),
            "update, {field}: {}",
            e.message()
        );
    }
    // Nothing was created and the stored filter is unchanged.
    let list = admin
        .list_webhooks(ListWebhooksRequest {
            account_id: 1010,
            page_size: 100,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .webhooks;
    assert_eq!(list.len(), 1);
    assert_eq!(get(&mut admin, &existing.id).await.filter, Some(ok()));
    drop(server);
}

async fn explain(
    admin: &mut Admin,
    account_id: u64,
    e: Event,
) -> Result<Vec<RoutingDecision>, tonic::Status> {
    admin
        .explain_routing(ExplainRoutingRequest {
            account_id,
            event: Some(e),
        })
        .await
        .map(|r| r.into_inner().decisions)
}

#[tokio::test]
async fn explain_routing_gives_each_reason() {
    use serde_json::json;
    let (_dir, server, mut admin, mut ingest) = setup().await;
    let ok = Listener::ok().await;
    let mine = Listener::ok().await;
    let gone = Listener::start(Arc::new(|_, _| (410, vec![], Duration::ZERO))).await;
    let matched = create(&mut admin, 1010, filtered("matched", &mine.url(), None)).await;
    let by_filter = create(
        &mut admin,
        1010,
        filtered(
            "by-filter",
            &ok.url(),
            Some(equals("course.id", json!("c-42"))),
        ),
    )
    .await;
    let other_type = create(
        &mut admin,
        1010,
        webhook("other-type", &ok.url(), &["COURSE_COMPLETED"], no_auth()),
    )
    .await;
    let retired = create(&mut admin, 1010, filtered("retired", &ok.url(), None)).await;
    admin
        .retire_webhook(RetireWebhookRequest {
            account_id: 1010,
            webhook_id: retired.id.clone(),
        })
        .await
        .unwrap();
    // Disabled by the router: its listener answers 410 Gone.
    let disabled = create(
        &mut admin,
        1010,
        webhook(
            "disabled",
            &gone.url(),
            &["COURSE_COMPLETED", "COURSE_ENROLLMENT"],
            no_auth(),
        ),
    )
    .await;
    let mut completed = ev("x-1", json!({}));
    completed.event_name = "COURSE_COMPLETED".into();
    publish(&mut ingest, 1010, vec![completed]).await;
    let deadline = std::time::Instant::now() + WAIT;
    let reason = loop {
        let w = get(&mut admin, &disabled.id).await;
        if !w.disabled_reason.is_empty() || std::time::Instant::now() > deadline {
            break w.disabled_reason;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(reason.contains("410"), "disabled_reason: {reason:?}");

    let probe = ev("probe", json!({"course": {"id": "c-7"}}));
    let decisions = explain(&mut admin, 1010, probe.clone()).await.unwrap();
    let by_id = |id: &str| {
        decisions
            .iter()
            .find(|d| d.webhook_id == id)
            .unwrap_or_else(|| panic!("no decision for {id}: {decisions:?}"))
            .clone()
    };
    assert_eq!(decisions.len(), 5, "{decisions:?}");
    let d = by_id(&matched.id);
    assert_eq!(
        (d.delivers, d.reason(), d.webhook_name.as_str()),
        (true, RoutingReason::Matched, "matched")
    );
    let d = by_id(&by_filter.id);
    assert_eq!(
        (d.delivers, d.reason()),
        (false, RoutingReason::FilterNotMatched)
    );
    assert_eq!(d.detail, r#"course.id: "c-7" is not "c-42""#);
    let d = by_id(&other_type.id);
    assert_eq!(
        (d.delivers, d.reason()),
        (false, RoutingReason::TypeNotSubscribed)
    );
    assert!(d.detail.contains("COURSE_COMPLETED"), "{}", d.detail);
    let d = by_id(&retired.id);
    assert_eq!((d.delivers, d.reason()), (false, RoutingReason::Inactive));
    let d = by_id(&disabled.id);
    assert_eq!((d.delivers, d.reason()), (false, RoutingReason::Disabled));
    assert_eq!(d.detail, reason);
    // The order is the webhooks' (oldest first).
    let order: Vec<&str> = decisions.iter().map(|d| d.webhook_name.as_str()).collect();
    assert_eq!(
        order,
        ["matched", "by-filter", "other-type", "retired", "disabled"]
    );

    // A matching event: the filtered webhook would deliver it.
    let hit = explain(&mut admin, 1010, ev("", json!({"course": {"id": "c-42"}})))
        .await
        .unwrap();
    let d = hit.iter().find(|d| d.webhook_id == by_filter.id).unwrap();
    assert_eq!(
        (d.delivers, d.reason(), d.detail.as_str()),
        (true, RoutingReason::Matched, "")
    );

    // Validated like a publish: an unknown type is refused with a suggestion.
    let mut typo = probe.clone();
    typo.event_name = "COURSE_ENROLMENT".into();
    let e = explain(&mut admin, 1010, typo).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message().starts_with("event.event_name: ")
            && e.message().contains("did you mean COURSE_ENROLLMENT"),
        "{}",
        e.message()
    );
    let e = admin
        .explain_routing(ExplainRoutingRequest {
            account_id: 1010,
            event: None,
        })
        .await
        .unwrap_err();
    assert_eq!(
        (e.code(), e.message()),
        (Code::InvalidArgument, "event: is required")
    );

    // Another account's token is refused; its own account has no webhooks.
    let mut other = server.admin(ADMIN_1011).await;
    let e = explain(&mut other, 1010, probe.clone()).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(explain(&mut other, 1011, probe.clone())
        .await
        .unwrap()
        .is_empty());
    let mut ingest_token = server.admin(INGEST).await;
    let e = explain(&mut ingest_token, 1010, probe.clone())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");

    // Nothing was stored: the probe id can still be published, and it is
    // the first event the matched webhook receives.
    let r = publish(&mut ingest, 1010, vec![probe]).await;
    assert!(!r.results[0].duplicate);
    let got = received_through(&mine, "probe").await;
    assert_eq!(got, ["probe"]);
    drop(server);
}
