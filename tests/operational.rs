//! Operational events, on a real server with real listeners: the operator
//! endpoint of `[operational]` receives webhook.created / updated / deleted,
//! delivery.dead, webhook.disabled and delivery.recovered, each in the
//! customer envelope with the concerned account, signed as Standard
//! Webhooks v1 with `operational.secret`, and never a secret or password;
//! WatchOperationalEvents streams the same events, an account-scoped token
//! only its account's; an endpoint that fails at first (across a restart,
//! even) gets every event later, in order; the internal types cannot be
//! published or subscribed to; config errors name their key.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::*;
use tonic::Code;
use webhook_router::config::Config;
use webhook_router::delivery::signing;

/// `whsec_` + base64 of 32 bytes.
const OPS_SECRET: &str = "whsec_AQIDBAUGBwgJCgsMDQ4PEBESExQVFhcYGRobHB0eHyA=";

const WAIT: Duration = Duration::from_secs(15);

fn with_operator(c: &mut Config, url: &str) {
    c.operational.target_url = url.to_string();
    c.operational.secret = OPS_SECRET.into();
}

/// Checks the v1 signature of an operator request with our signing code.
fn assert_signed(r: &Received) {
    let key = signing::decode_secret(OPS_SECRET).unwrap();
    let id = r.header("webhook-id");
    let ts: i64 = r
        .header("webhook-timestamp")
        .parse()
        .expect("webhook-timestamp");
    let expected = signing::sign(&key, &id, ts, &r.body);
    let got = r.header("webhook-signature");
    assert!(
        got.split(' ').any(|s| s == expected),
        "signature {got:?} is not {expected:?}"
    );
}

/// The operational events an operator listener took, in arrival order, one
/// per request (failed attempts included): (accountId, event object).
fn operator_events(reqs: &[Received]) -> Vec<(u64, serde_json::Value)> {
    reqs.iter()
        .map(|r| {
            let v = r.json();
            let events = v["events"].as_array().expect("events").clone();
            assert_eq!(events.len(), 1, "one event per operational payload: {v}");
            (
                v["accountId"].as_u64().expect("accountId"),
                events[0].clone(),
            )
        })
        .collect()
}

fn names(events: &[(u64, serde_json::Value)]) -> Vec<String> {
    events
        .iter()
        .map(|(_, e)| e["eventName"].as_str().unwrap().to_string())
        .collect()
}

async fn watch(
    admin: &mut Admin,
    account_id: u64,
) -> tonic::Streaming<WatchOperationalEventsResponse> {
    admin
        .watch_operational_events(WatchOperationalEventsRequest { account_id })
        .await
        .expect("watch operational events")
        .into_inner()
}

/// The next event on `stream` within `WAIT`.
async fn next_event(
    stream: &mut tonic::Streaming<WatchOperationalEventsResponse>,
) -> OperationalEvent {
    let msg = tokio::time::timeout(WAIT, stream.message())
        .await
        .expect("an operational event in time")
        .expect("stream open")
        .expect("stream not ended");
    assert_eq!(msg.missed_count, 0);
    msg.event.expect("an event")
}

/// Events on `stream` until one named `name` (within `WAIT`), that one last.
async fn events_until(
    stream: &mut tonic::Streaming<WatchOperationalEventsResponse>,
    name: &str,
) -> Vec<OperationalEvent> {
    let mut out = Vec::new();
    loop {
        let e = next_event(stream).await;
        let done = e.event_name == name;
        out.push(e);
        if done {
            return out;
        }
    }
}

fn data_str(e: &OperationalEvent, key: &str) -> String {
    use prost_types::value::Kind;
    match e
        .data
        .as_ref()
        .and_then(|d| d.fields.get(key))
        .and_then(|v| v.kind.as_ref())
    {
        Some(Kind::StringValue(s)) => s.clone(),
        Some(Kind::NumberValue(n)) => n.to_string(),
        other => panic!("data.{key} of {e:?}: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn webhook_changes_reach_the_operator_endpoint_signed_and_the_streams() {
    let operator = Listener::ok().await;
    let customer = Listener::ok().await;
    let url = operator.url();
    let (_dir, server, mut admin, _ingest) = setup_with(|c| with_operator(c, &url)).await;
    let mut all = watch(&mut admin, 0).await;
    let mut admin_1010 = server.admin(ADMIN_1010).await;
    let mut only_1010 = watch(&mut admin_1010, 1010).await;

    // A Basic webhook of account 1010 and a signature webhook of 1011.
    let mut basic = webhook(
        "crm",
        &format!("{}?token=query-secret-1234", customer.url()),
        &["COURSE_ENROLLMENT"],
        webhook_auth::Method::Basic(BasicAuth {
            username: "router".into(),
            password: "basic-password-5678".into(),
        }),
    );
    basic.description = "first".into();
    let w1 = create(&mut admin, 1010, basic).await;
    let w2 = create(
        &mut admin,
        1011,
        webhook(
            "erp",
            &customer.url(),
            &["COURSE_COMPLETED"],
            signature_auth(),
        ),
    )
    .await;
    let mut changed = w1.clone();
    changed.name = "crm renamed".into();
    changed.event_types = vec!["COURSE_ENROLLMENT".into(), "COURSE_COMPLETED".into()];
    admin
        .update_webhook(UpdateWebhookRequest {
            account_id: 1010,
            webhook: Some(changed),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["name".into(), "event_types".into()],
            }),
        })
        .await
        .unwrap();
    admin
        .retire_webhook(RetireWebhookRequest {
            account_id: 1010,
            webhook_id: w1.id.clone(),
        })
        .await
        .unwrap();
    admin
        .activate_webhook(ActivateWebhookRequest {
            account_id: 1010,
            webhook_id: w1.id.clone(),
        })
        .await
        .unwrap();
    let rotated = admin
        .rotate_webhook_secret(RotateWebhookSecretRequest {
            account_id: 1011,
            webhook_id: w2.id.clone(),
            grace_period_seconds: 60,
        })
        .await
        .unwrap()
        .into_inner()
        .secret
        .unwrap();
    let w2_secret = rotated.secret.clone();
    admin
        .delete_webhook(DeleteWebhookRequest {
            account_id: 1010,
            webhook_id: w1.id.clone(),
        })
        .await
        .unwrap();

    let expected = [
        (1010, "webhook.created", w1.id.as_str()),
        (1011, "webhook.created", w2.id.as_str()),
        (1010, "webhook.updated", w1.id.as_str()),
        (1010, "webhook.updated", w1.id.as_str()),
        (1010, "webhook.updated", w1.id.as_str()),
        (1011, "webhook.updated", w2.id.as_str()),
        (1010, "webhook.deleted", w1.id.as_str()),
    ];
    let reqs = operator
        .wait_until(WAIT, |r| r.len() >= expected.len())
        .await;
    let got = operator_events(&reqs);
    assert_eq!(got.len(), expected.len(), "{:?}", names(&got));
    for (i, ((account, event), (want_account, want_name, want_id))) in
        got.iter().zip(expected).enumerate()
    {
        assert_eq!(*account, want_account, "accountId of #{i}");
        assert_eq!(event["eventName"], want_name, "#{i}");
        assert_eq!(event["data"]["webhook_id"], want_id, "#{i}");
        assert_eq!(event["data"]["account_id"], want_account, "#{i}");
        assert!(event["timestamp"].as_i64().unwrap() > 0);
        assert_signed(&reqs[i]);
    }
    let changes: Vec<_> = got[2..6]
        .iter()
        .map(|(_, e)| e["data"]["change"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(changes, ["update", "retire", "activate", "rotate_secret"]);
    assert_eq!(
        got[2].1["data"]["changed_fields"],
        serde_json::json!(["name", "event_types"])
    );
    assert_eq!(got[0].1["data"]["auth"], "basic");
    // The URL without its query (where tokens live); no secret or password anywhere.
    assert!(!got[0].1["data"]["target_url"]
        .as_str()
        .unwrap()
        .contains("query-secret"));
    for r in &reqs {
        let body = String::from_utf8_lossy(&r.body);
        for secret in [
            "basic-password-5678",
            "query-secret-1234",
            &w2_secret,
            "whsec_",
        ] {
            assert!(!body.contains(secret), "{secret:?} leaked in {body}");
        }
    }

    // The all-accounts stream: the same events, same ids, same order.
    for (i, (_, event)) in got.iter().enumerate() {
        let e = next_event(&mut all).await;
        assert_eq!(e.event_id, event["eventId"].as_str().unwrap(), "#{i}");
        assert_eq!(e.event_name, event["eventName"].as_str().unwrap());
        assert_eq!(e.account_id, event["data"]["account_id"].as_u64().unwrap());
        assert_eq!(
            data_str(&e, "webhook_id"),
            event["data"]["webhook_id"].as_str().unwrap()
        );
        assert!(e.time.is_some());
    }
    // The 1010 stream: only 1010's five.
    let mut seen = Vec::new();
    for _ in 0..5 {
        let e = next_event(&mut only_1010).await;
        assert_eq!(e.account_id, 1010, "{e:?}");
        seen.push(e.event_name);
    }
    assert_eq!(seen.last().unwrap(), "webhook.deleted");
    // Nothing of 1011 follows: one more 1011 change, then a 1010 one; the
    // next 1010 stream message must be the 1010 one.
    admin
        .retire_webhook(RetireWebhookRequest {
            account_id: 1011,
            webhook_id: w2.id.clone(),
        })
        .await
        .unwrap();
    let w3 = create(
        &mut admin,
        1010,
        webhook("third", &customer.url(), &["COURSE_ENROLLMENT"], no_auth()),
    )
    .await;
    let e = next_event(&mut only_1010).await;
    assert_eq!(
        (e.event_name.as_str(), data_str(&e, "webhook_id")),
        ("webhook.created", w3.id.clone())
    );

    // Scope: an account token may not watch every account nor another one.
    for account_id in [0, 1011] {
        let err = admin_1010
            .watch_operational_events(WatchOperationalEventsRequest { account_id })
            .await
            .expect_err("refused");
        assert_eq!(err.code(), Code::PermissionDenied, "{account_id}: {err:?}");
    }
    drop(server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dead_delivery_and_the_disabling_are_reported() {
    let operator = Listener::ok().await;
    let failing = Listener::start(Arc::new(|_, _| (500, vec![], Duration::ZERO))).await;
    let url = operator.url();
    let (_dir, server, mut admin, mut ingest) = setup_with(|c| {
        with_operator(c, &url);
        c.delivery.retry_initial_ms = 50;
        c.delivery.retry_max_interval_ms = 100;
        c.delivery.retry_max_age_ms = 600;
    })
    .await;
    let mut stream = watch(&mut admin, 1010).await;
    let w = create(
        &mut admin,
        1010,
        webhook("down", &failing.url(), &["COURSE_ENROLLMENT"], no_auth()),
    )
    .await;
    publish(
        &mut ingest,
        1010,
        vec![event("e-dead-1", "COURSE_ENROLLMENT", 1)],
    )
    .await;

    let seen = events_until(&mut stream, "webhook.disabled").await;
    let names: Vec<_> = seen.iter().map(|e| e.event_name.as_str()).collect();
    assert_eq!(
        names,
        ["webhook.created", "delivery.dead", "webhook.disabled"]
    );
    let dead = &seen[1];
    assert_eq!(data_str(dead, "webhook_id"), w.id);
    assert_eq!(data_str(dead, "first_event_id"), "e-dead-1");
    assert_eq!(data_str(dead, "last_status_code"), "500");
    let attempts: f64 = data_str(dead, "attempts").parse().unwrap();
    assert!(attempts >= 2.0, "{attempts}");
    assert!(
        data_str(&seen[2], "reason").starts_with("retries exhausted"),
        "{:?}",
        seen[2]
    );

    // The operator endpoint: the same three, in order, the reason included.
    let reqs = operator.wait_until(WAIT, |r| r.len() >= 3).await;
    let got = operator_events(&reqs);
    assert_eq!(names, names_of(&got));
    assert_eq!(
        got[1].1["data"]["delivery_id"].as_str().unwrap(),
        data_str(dead, "delivery_id")
    );
    assert!(got[2].1["data"]["reason"]
        .as_str()
        .unwrap()
        .starts_with("retries exhausted"));
    assert!(got.iter().all(|(account, _)| *account == 1010));
    reqs.iter().for_each(assert_signed);
    // The webhook is disabled, with the same reason.
    let stored = admin
        .get_webhook(GetWebhookRequest {
            account_id: 1010,
            webhook_id: w.id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .webhook
        .unwrap();
    assert!(!stored.active);
    assert_eq!(
        stored.disabled_reason,
        got[2].1["data"]["reason"].as_str().unwrap()
    );
    drop(server);
}

fn names_of(events: &[(u64, serde_json::Value)]) -> Vec<&str> {
    events
        .iter()
        .map(|(_, e)| e["eventName"].as_str().unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_webhook_delivering_again_after_failures_is_reported_once() {
    let operator = Listener::ok().await;
    let healthy = Arc::new(AtomicBool::new(false));
    let customer = Listener::toggled(healthy.clone()).await;
    let url = operator.url();
    let (_dir, server, mut admin, mut ingest) = setup_with(|c| with_operator(c, &url)).await;
    let mut stream = watch(&mut admin, 1010).await;
    let w = create(
        &mut admin,
        1010,
        webhook("flaky", &customer.url(), &["COURSE_ENROLLMENT"], no_auth()),
    )
    .await;
    assert_eq!(next_event(&mut stream).await.event_name, "webhook.created");
    publish(
        &mut ingest,
        1010,
        vec![event("e-flaky-1", "COURSE_ENROLLMENT", 1)],
    )
    .await;
    // Failed attempts (503), then the listener recovers.
    customer.wait_until(WAIT, |r| r.len() >= 3).await;
    healthy.store(true, Ordering::SeqCst);
    let e = next_event(&mut stream).await;
    assert_eq!(e.event_name, "delivery.recovered", "{e:?}");
    assert_eq!(data_str(&e, "webhook_id"), w.id);
    let failed: f64 = data_str(&e, "failed_attempts").parse().unwrap();
    assert!(failed >= 2.0, "{failed}");
    assert_eq!(data_str(&e, "dead_deliveries"), "0");

    // Further successes are no recovery: one more event delivered, then
    // nothing on the stream for 1.5 s (the event is emitted before the
    // lane takes its next payload, so this is ample).
    publish(
        &mut ingest,
        1010,
        vec![event("e-flaky-2", "COURSE_ENROLLMENT", 2)],
    )
    .await;
    customer
        .wait_until(WAIT, |r| {
            r.iter()
                .any(|x| x.event_ids().contains(&"e-flaky-2".to_string()))
        })
        .await;
    let quiet = tokio::time::timeout(Duration::from_millis(1500), stream.message()).await;
    assert!(quiet.is_err(), "unexpected message: {quiet:?}");

    // The operator endpoint got created and recovered, nothing else.
    let reqs = operator.wait_until(WAIT, |r| r.len() >= 2).await;
    let got = operator_events(&reqs);
    assert_eq!(names_of(&got), ["webhook.created", "delivery.recovered"]);
    assert_eq!(got[1].1["eventId"].as_str().unwrap(), e.event_id);
    drop(server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_operator_endpoint_down_at_first_gets_every_event_later_in_order() {
    let healthy = Arc::new(AtomicBool::new(false));
    // Which requests (by arrival index) were answered 200.
    let answered_ok: Arc<std::sync::Mutex<Vec<usize>>> = Arc::default();
    let operator = {
        let (healthy, answered_ok) = (healthy.clone(), answered_ok.clone());
        Listener::start(Arc::new(move |n, _| {
            let ok = healthy.load(Ordering::SeqCst);
            if ok {
                answered_ok.lock().unwrap().push(n);
            }
            (if ok { 200 } else { 503 }, vec![], Duration::ZERO)
        }))
        .await
    };
    let customer = Listener::ok().await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    with_operator(&mut config, &operator.url());
    let server = TestServer::start(config.clone()).await;
    let mut admin = server.admin(ADMIN).await;
    let mut ids = Vec::new();
    for (i, account) in [1010, 1011, 1010].into_iter().enumerate() {
        let w = create(
            &mut admin,
            account,
            webhook(
                &format!("w{i}"),
                &customer.url(),
                &["COURSE_ENROLLMENT"],
                no_auth(),
            ),
        )
        .await;
        ids.push(w.id);
    }
    // The first event is being retried (503s): the others wait behind it.
    operator.wait_until(WAIT, |r| r.len() >= 2).await;
    // Stopped and started again while the endpoint is still down.
    server.stop().await.unwrap();
    let refused_before = operator.requests().len();
    let server = TestServer::start(config).await;
    let mut admin = server.admin(ADMIN).await;
    let w = create(
        &mut admin,
        1011,
        webhook(
            "after restart",
            &customer.url(),
            &["COURSE_ENROLLMENT"],
            no_auth(),
        ),
    )
    .await;
    ids.push(w.id);
    operator
        .wait_until(WAIT, |r| r.len() > refused_before)
        .await;
    healthy.store(true, Ordering::SeqCst);

    let deadline = Instant::now() + WAIT;
    while answered_ok.lock().unwrap().len() < 4 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let reqs = operator.requests();
    let ok = answered_ok.lock().unwrap().clone();
    let after: Vec<_> = ok.iter().map(|&n| reqs[n].clone()).collect();
    let got = operator_events(&after);
    let delivered: Vec<_> = got
        .iter()
        .map(|(_, e)| e["data"]["webhook_id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(delivered, ids, "in creation order, each once");
    assert_eq!(
        got.iter().map(|(a, _)| *a).collect::<Vec<_>>(),
        [1010, 1011, 1010, 1011]
    );
    after.iter().for_each(assert_signed);
    // The first event was retried under one webhook-id, before and after the restart.
    let first_id = reqs[0].header("webhook-id");
    assert_eq!(after[0].header("webhook-id"), first_id);
    assert!(reqs[..refused_before]
        .iter()
        .all(|r| r.header("webhook-id") == first_id));
    drop(server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_an_operator_endpoint_events_are_still_streamed() {
    let customer = Listener::ok().await;
    let (_dir, server, mut admin, _ingest) = setup().await;
    let mut stream = watch(&mut admin, 0).await;
    let w = create(
        &mut admin,
        1011,
        webhook("w", &customer.url(), &["COURSE_ENROLLMENT"], no_auth()),
    )
    .await;
    let e = next_event(&mut stream).await;
    assert_eq!(
        (e.event_name.as_str(), e.account_id),
        ("webhook.created", 1011)
    );
    assert_eq!(data_str(&e, "webhook_id"), w.id);
    drop(server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn operational_types_cannot_be_published_or_subscribed_to() {
    let customer = Listener::ok().await;
    let (_dir, _server, mut admin, mut ingest) = setup().await;
    let err = ingest
        .publish_events(PublishEventsRequest {
            account_id: 1010,
            events: vec![event("x", "delivery.dead", 1)],
        })
        .await
        .expect_err("refused");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("events[0].event_name"),
        "{}",
        err.message()
    );
    assert!(err.message().contains("operational"), "{}", err.message());
    let err = admin
        .create_webhook(CreateWebhookRequest {
            account_id: 1010,
            webhook: Some(webhook(
                "w",
                &customer.url(),
                &["COURSE_ENROLLMENT", "webhook.disabled"],
                no_auth(),
            )),
        })
        .await
        .expect_err("refused");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("webhook.event_types[1]"),
        "{}",
        err.message()
    );
    let types = admin
        .list_event_types(ListEventTypesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .event_types;
    assert!(!types.is_empty());
    assert!(
        types.iter().all(|t| !t.name.contains('.')),
        "internal types listed"
    );
}

#[test]
fn operational_config_errors_name_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let base = test_config(dir.path());
    let check = |f: &dyn Fn(&mut Config)| {
        let mut c = base.clone();
        f(&mut c);
        c.validate().map_err(|e| e.to_string())
    };
    let url = "http://127.0.0.1:9/ops";
    let err = check(&|c| c.operational.target_url = url.into()).unwrap_err();
    assert!(
        err.contains(": operational.secret: must be set when operational.target_url is set"),
        "{err}"
    );
    for bad in ["abc", "whsec_not base64!", "whsec_c2hvcnQ="] {
        let err = check(&|c| {
            c.operational.target_url = url.into();
            c.operational.secret = bad.into();
        })
        .unwrap_err();
        assert!(
            err.contains(": operational.secret: must be whsec_"),
            "{bad}: {err}"
        );
    }
    let err = check(&|c| {
        c.operational.target_url = "ftp://example.com/".into();
        c.operational.secret = OPS_SECRET.into();
    })
    .unwrap_err();
    assert!(err.contains(": operational.target_url: "), "{err}");
    // Loopback and plain http need delivery.allow_private_targets.
    let err = check(&|c| {
        c.delivery.allow_private_targets = false;
        c.operational.target_url = url.into();
        c.operational.secret = OPS_SECRET.into();
    })
    .unwrap_err();
    assert!(err.contains(": operational.target_url: "), "{err}");
    assert!(err.contains("allow_private_targets"), "{err}");
    check(&|c| with_operator(c, url)).expect("valid");
    check(&|_| {}).expect("off by default");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn on_postgres_the_operator_endpoint_gets_the_events_in_order() {
    let db = crate::common::pg::TestDb::create().await;
    let operator = Listener::ok().await;
    let customer = Listener::ok().await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    config.storage.backend = webhook_router::config::StorageBackend::Postgres;
    config.storage.postgres_url = db.url.clone();
    with_operator(&mut config, &operator.url());
    let server = TestServer::start(config).await;
    let mut admin = server.admin(ADMIN).await;
    let mut stream = watch(&mut admin, 0).await;
    let w = create(
        &mut admin,
        1010,
        webhook("pg", &customer.url(), &["COURSE_ENROLLMENT"], no_auth()),
    )
    .await;
    admin
        .delete_webhook(DeleteWebhookRequest {
            account_id: 1010,
            webhook_id: w.id.clone(),
        })
        .await
        .unwrap();
    let reqs = operator.wait_until(WAIT, |r| r.len() >= 2).await;
    let got = operator_events(&reqs);
    assert_eq!(names_of(&got), ["webhook.created", "webhook.deleted"]);
    assert!(got
        .iter()
        .all(|(a, e)| *a == 1010 && e["data"]["webhook_id"] == w.id.as_str()));
    reqs.iter().for_each(assert_signed);
    let streamed = [next_event(&mut stream).await, next_event(&mut stream).await];
    for (s, (_, e)) in streamed.iter().zip(&got) {
        assert_eq!(s.event_id, e["eventId"].as_str().unwrap());
    }
    drop(server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_operator_endpoint_reports_nothing_about_itself_and_stays_enabled() {
    let healthy = Arc::new(AtomicBool::new(false));
    let operator = Listener::toggled(healthy.clone()).await;
    let customer = Listener::ok().await;
    let url = operator.url();
    let (_dir, server, mut admin, _ingest) = setup_with(|c| {
        with_operator(c, &url);
        c.delivery.retry_initial_ms = 50;
        c.delivery.retry_max_interval_ms = 100;
        c.delivery.retry_max_age_ms = 400;
    })
    .await;
    let mut all = watch(&mut admin, 0).await;
    let first = create(
        &mut admin,
        1010,
        webhook("a", &customer.url(), &["COURSE_ENROLLMENT"], no_auth()),
    )
    .await;
    assert_eq!(next_event(&mut all).await.event_name, "webhook.created");
    // The operator endpoint answers 503 until the payload is dead (0.4 s of
    // retries): several attempts of the one event.
    let reqs = operator.wait_until(WAIT, |r| r.len() >= 3).await;
    assert!(reqs
        .iter()
        .all(|r| r.json()["events"][0]["data"]["webhook_id"] == first.id.as_str()));
    // Its death emits nothing (no delivery.dead, no webhook.disabled about
    // the internal webhook): the stream of every account stays quiet for
    // 2 s, five times the retry age.
    let quiet = tokio::time::timeout(Duration::from_secs(2), all.message()).await;
    assert!(quiet.is_err(), "unexpected message: {quiet:?}");
    // Not disabled: once it answers again, the next event reaches it.
    healthy.store(true, Ordering::SeqCst);
    let second = create(
        &mut admin,
        1011,
        webhook("b", &customer.url(), &["COURSE_ENROLLMENT"], no_auth()),
    )
    .await;
    let reqs = operator
        .wait_until(WAIT, |r| {
            r.iter()
                .any(|x| x.json()["events"][0]["data"]["webhook_id"] == second.id.as_str())
        })
        .await;
    let last = reqs.last().unwrap();
    assert_eq!(
        last.json()["events"][0]["data"]["webhook_id"],
        second.id.as_str()
    );
    assert_eq!(last.json()["accountId"], 1011);
    assert_signed(last);
    drop(server);
}
