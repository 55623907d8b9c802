//! Delivery end to end: real router, real sled folder, real HTTP listeners.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::*;

#[tokio::test]
async fn delivers_the_documented_body_and_headers() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(test_config(dir.path())).await;
    let listener = Listener::ok().await;
    let mut admin = server.admin(ADMIN).await;
    let w = create(
        &mut admin,
        1010,
        webhook("crm", &listener.url(), &["COURSE_ENROLLMENT"], no_auth()),
    )
    .await;
    let mut ingest = server.ingest(INGEST).await;
    let r = publish(
        &mut ingest,
        1010,
        vec![event("ev-1", "COURSE_ENROLLMENT", 4279332)],
    )
    .await;
    assert_eq!(r.results[0].event_id, "ev-1");
    assert!(!r.results[0].duplicate);
    let reqs = listener
        .wait_until(Duration::from_secs(10), |r| !r.is_empty())
        .await;
    assert_eq!(reqs.len(), 1, "one request");
    let req = &reqs[0];
    assert_eq!(
        std::str::from_utf8(&req.body).unwrap(),
        r#"{"accountId":1010,"events":[{"eventId":"ev-1","eventName":"COURSE_ENROLLMENT","timestamp":1727414643000,"eventInfo":"info","data":{"loId":"course:4279332","userId":4279332}}]}"#
    );
    assert_eq!(req.header("content-type"), "application/json");
    assert!(req.header("webhook-id").starts_with("msg_"));
    let ts: i64 = req.header("webhook-timestamp").parse().unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!((now - ts).abs() < 30);
    assert_eq!(
        req.header("user-agent"),
        format!("webhook-router/{}", env!("CARGO_PKG_VERSION"))
    );
    assert!(req.header("webhook-signature").is_empty());
    let _ = w;
    server.stop().await.unwrap();
}

/// Verifies a Standard Webhooks signature with Python's own hmac/hashlib,
/// an implementation independent of ours.
fn python_verifies(secret: &str, msg_id: &str, ts: &str, body: &[u8], header: &str) -> bool {
    let script = r#"
import base64, hashlib, hmac, sys
secret, msg_id, ts, header = sys.argv[1:5]
body = sys.stdin.buffer.read()
key = base64.b64decode(secret.split("_", 1)[1])
mac = hmac.new(key, f"{msg_id}.{ts}.".encode() + body, hashlib.sha256).digest()
expected = "v1," + base64.b64encode(mac).decode()
sys.exit(0 if any(hmac.compare_digest(expected, s) for s in header.split(" ")) else 1)
"#;
    use std::io::Write;
    let mut child = std::process::Command::new("python3")
        .args(["-c", script, secret, msg_id, ts, header])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .expect("python3 is needed for the independent signature check");
    child.stdin.take().unwrap().write_all(body).unwrap();
    child.wait().unwrap().success()
}

#[tokio::test]
async fn signature_verifies_independently_and_rotation_sends_both() {
    let (_dir, server, mut admin, mut ingest) = setup().await;
    let listener = Listener::ok().await;
    let w = create(
        &mut admin,
        1010,
        webhook(
            "signed",
            &listener.url(),
            &["COURSE_COMPLETED"],
            signature_auth(),
        ),
    )
    .await;
    let secret = admin
        .get_webhook_secret(GetWebhookSecretRequest {
            account_id: 1010,
            webhook_id: w.id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .secret
        .unwrap();
    publish(&mut ingest, 1010, vec![event("s-1", "COURSE_COMPLETED", 1)]).await;
    let reqs = listener
        .wait_until(Duration::from_secs(10), |r| !r.is_empty())
        .await;
    let r = &reqs[0];
    let sig = r.header("webhook-signature");
    assert!(sig.starts_with("v1,"), "{sig}");
    assert_eq!(sig.split(' ').count(), 1);
    assert!(python_verifies(
        &secret.secret,
        &r.header("webhook-id"),
        &r.header("webhook-timestamp"),
        &r.body,
        &sig
    ));
    assert!(!python_verifies(
        "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        &r.header("webhook-id"),
        &r.header("webhook-timestamp"),
        &r.body,
        &sig
    ));

    let rotated = admin
        .rotate_webhook_secret(RotateWebhookSecretRequest {
            account_id: 1010,
            webhook_id: w.id.clone(),
            grace_period_seconds: 3600,
        })
        .await
        .unwrap()
        .into_inner()
        .secret
        .unwrap();
    assert_ne!(rotated.secret, secret.secret);
    assert!(rotated.previous_secret_expire_time.is_some());
    publish(&mut ingest, 1010, vec![event("s-2", "COURSE_COMPLETED", 2)]).await;
    let reqs = listener
        .wait_until(Duration::from_secs(10), |r| r.len() >= 2)
        .await;
    let r = &reqs[1];
    let sig = r.header("webhook-signature");
    let parts: Vec<&str> = sig.split(' ').collect();
    assert_eq!(parts.len(), 2, "both signatures during grace: {sig}");
    for (secret, part) in [(&rotated.secret, parts[0]), (&secret.secret, parts[1])] {
        assert!(python_verifies(
            secret,
            &r.header("webhook-id"),
            &r.header("webhook-timestamp"),
            &r.body,
            part
        ));
    }
    // Without grace, only the new secret signs.
    let again = admin
        .rotate_webhook_secret(RotateWebhookSecretRequest {
            account_id: 1010,
            webhook_id: w.id.clone(),
            grace_period_seconds: 0,
        })
        .await
        .unwrap()
        .into_inner()
        .secret
        .unwrap();
    publish(&mut ingest, 1010, vec![event("s-3", "COURSE_COMPLETED", 3)]).await;
    let reqs = listener
        .wait_until(Duration::from_secs(10), |r| r.len() >= 3)
        .await;
    let r = &reqs[2];
    let sig = r.header("webhook-signature");
    assert_eq!(sig.split(' ').count(), 1);
    assert!(python_verifies(
        &again.secret,
        &r.header("webhook-id"),
        &r.header("webhook-timestamp"),
        &r.body,
        &sig
    ));
    server.stop().await.unwrap();
}

#[tokio::test]
async fn basic_auth_header_is_sent() {
    let (_dir, server, mut admin, mut ingest) = setup().await;
    let listener = Listener::ok().await;
    let auth = webhook_auth::Method::Basic(BasicAuth {
        username: "crm".into(),
        password: "s3cret pass".into(),
    });
    create(
        &mut admin,
        1010,
        webhook("basic", &listener.url(), &["COURSE_ENROLLMENT"], auth),
    )
    .await;
    publish(
        &mut ingest,
        1010,
        vec![event("b-1", "COURSE_ENROLLMENT", 1)],
    )
    .await;
    let reqs = listener
        .wait_until(Duration::from_secs(10), |r| !r.is_empty())
        .await;
    use base64::Engine;
    let expected = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode("crm:s3cret pass")
    );
    assert_eq!(reqs[0].header("authorization"), expected);
    assert!(reqs[0].header("webhook-signature").is_empty());
    server.stop().await.unwrap();
}

#[tokio::test]
async fn thousand_events_arrive_in_order_in_one_lane() {
    let (_dir, server, mut admin, mut ingest) = setup().await;
    let listener = Listener::ok().await;
    create(
        &mut admin,
        1010,
        webhook(
            "order",
            &listener.url(),
            &["COURSE_ENROLLMENT", "COURSE_COMPLETED"],
            no_auth(),
        ),
    )
    .await;
    let mut expected = Vec::new();
    for batch in 0..10 {
        let events: Vec<Event> = (0..100)
            .map(|i| {
                let n = batch * 100 + i;
                let id = format!("o-{n:04}");
                expected.push(id.clone());
                event(
                    &id,
                    if n % 2 == 0 {
                        "COURSE_ENROLLMENT"
                    } else {
                        "COURSE_COMPLETED"
                    },
                    n as u64,
                )
            })
            .collect();
        publish(&mut ingest, 1010, events).await;
    }
    let got = listener.wait_events(1000, Duration::from_secs(30)).await;
    assert_eq!(got, expected, "every event once, in publish order");
    server.stop().await.unwrap();
}

#[tokio::test]
async fn backlog_is_coalesced_into_payloads() {
    let (_dir, server, mut admin, mut ingest) =
        setup_with(|c| c.delivery.max_events_per_payload = 50).await;
    // The first request is held for a second, so a backlog forms behind it.
    let listener = Listener::start(Arc::new(|n, _| {
        (
            200,
            vec![],
            if n == 0 {
                Duration::from_secs(1)
            } else {
                Duration::ZERO
            },
        )
    }))
    .await;
    create(
        &mut admin,
        1010,
        webhook(
            "coalesce",
            &listener.url(),
            &["COURSE_ENROLLMENT"],
            no_auth(),
        ),
    )
    .await;
    publish(
        &mut ingest,
        1010,
        vec![event("c-first", "COURSE_ENROLLMENT", 0)],
    )
    .await;
    listener
        .wait_until(Duration::from_secs(5), |r| !r.is_empty())
        .await;
    for i in 0..120 {
        publish(
            &mut ingest,
            1010,
            vec![event(&format!("c-{i:03}"), "COURSE_ENROLLMENT", i)],
        )
        .await;
    }
    let ids = listener.wait_events(121, Duration::from_secs(15)).await;
    assert_eq!(ids.len(), 121);
    let sizes: Vec<usize> = listener
        .requests()
        .iter()
        .map(|r| r.event_ids().len())
        .collect();
    assert_eq!(sizes[0], 1);
    assert!(
        sizes.iter().all(|&s| s <= 50),
        "payload cap respected: {sizes:?}"
    );
    assert!(
        sizes.len() <= 6,
        "backlog of 120 went out in few payloads: {sizes:?}"
    );
    assert_eq!(sizes[1], 50, "first backlog payload is full: {sizes:?}");
    server.stop().await.unwrap();
}

#[tokio::test]
async fn batch_events_wait_for_the_interval_or_a_full_payload() {
    let (_dir, server, mut admin, mut ingest) = setup_with(|c| {
        c.delivery.batch_interval_ms = 1500;
        c.delivery.max_events_per_payload = 10;
    })
    .await;
    let listener = Listener::ok().await;
    create(
        &mut admin,
        1010,
        webhook(
            "batch",
            &listener.url(),
            &["LEARNER_PROGRESS", "COURSE_ENROLLMENT"],
            no_auth(),
        ),
    )
    .await;
    let start = std::time::Instant::now();
    publish(
        &mut ingest,
        1010,
        vec![
            event("p-1", "LEARNER_PROGRESS", 1),
            event("p-2", "LEARNER_PROGRESS", 2),
        ],
    )
    .await;
    // A real-time event is not held back by the batch lane.
    publish(
        &mut ingest,
        1010,
        vec![event("rt-1", "COURSE_ENROLLMENT", 3)],
    )
    .await;
    let first = listener
        .wait_until(Duration::from_secs(5), |r| !r.is_empty())
        .await;
    assert_eq!(first[0].event_ids(), vec!["rt-1"]);
    assert!(first[0].at.duration_since(start) < Duration::from_millis(1000));
    let reqs = listener
        .wait_until(Duration::from_secs(5), |r| r.len() >= 2)
        .await;
    assert_eq!(reqs[1].event_ids(), vec!["p-1", "p-2"]);
    let waited = reqs[1].at.duration_since(start);
    assert!(
        waited >= Duration::from_millis(1300),
        "batch held until the interval: {waited:?}"
    );
    // A full payload goes at once, without waiting for the next tick.
    let t = std::time::Instant::now();
    let events = (0..10)
        .map(|i| event(&format!("full-{i}"), "LEARNER_PROGRESS", i))
        .collect();
    publish(&mut ingest, 1010, events).await;
    let reqs = listener
        .wait_until(Duration::from_secs(5), |r| r.len() >= 3)
        .await;
    assert_eq!(reqs[2].event_ids().len(), 10);
    assert!(
        reqs[2].at.duration_since(t) < Duration::from_millis(1000),
        "full payload sent at once"
    );
    server.stop().await.unwrap();
}

#[tokio::test]
async fn duplicate_event_ids_are_not_redelivered() {
    let (_dir, server, mut admin, mut ingest) = setup().await;
    let listener = Listener::ok().await;
    create(
        &mut admin,
        1010,
        webhook("dup", &listener.url(), &["COURSE_ENROLLMENT"], no_auth()),
    )
    .await;
    let r = publish(
        &mut ingest,
        1010,
        vec![
            event("d-1", "COURSE_ENROLLMENT", 1),
            event("d-1", "COURSE_ENROLLMENT", 1),
        ],
    )
    .await;
    assert_eq!(
        r.results.iter().map(|x| x.duplicate).collect::<Vec<_>>(),
        vec![false, true]
    );
    listener.wait_events(1, Duration::from_secs(5)).await;
    let r = publish(
        &mut ingest,
        1010,
        vec![
            event("d-1", "COURSE_ENROLLMENT", 1),
            event("d-2", "COURSE_ENROLLMENT", 2),
        ],
    )
    .await;
    assert!(r.results[0].duplicate && !r.results[1].duplicate);
    // The same id in another account is a different event.
    let r = publish(
        &mut ingest,
        1011,
        vec![event("d-1", "COURSE_ENROLLMENT", 1)],
    )
    .await;
    assert!(!r.results[0].duplicate);
    listener.wait_events(2, Duration::from_secs(5)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(listener.event_ids(), vec!["d-1", "d-2"]);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn test_webhook_reaches_saved_and_unsaved_targets() {
    let (_dir, server, mut admin, _ingest) = setup().await;
    let listener = Listener::start(Arc::new(|n, _| {
        (if n == 0 { 200 } else { 503 }, vec![], Duration::ZERO)
    }))
    .await;
    let w = create(
        &mut admin,
        1010,
        webhook(
            "t",
            &listener.url(),
            &["COURSE_ENROLLMENT"],
            signature_auth(),
        ),
    )
    .await;
    let r = admin
        .test_webhook(TestWebhookRequest {
            account_id: 1010,
            target: Some(test_webhook_request::Target::WebhookId(w.id.clone())),
            event_name: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(r.success, "{r:?}");
    assert_eq!(r.status_code, 200);
    assert_eq!(r.response_body, "ok");
    let unsaved = webhook("draft", &listener.url(), &["COURSE_COMPLETED"], no_auth());
    let r = admin
        .test_webhook(TestWebhookRequest {
            account_id: 1010,
            target: Some(test_webhook_request::Target::Webhook(unsaved)),
            event_name: "COURSE_COMPLETED".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!r.success);
    assert_eq!(r.status_code, 503);
    assert_eq!(r.error, "HTTP 503");
    let reqs = listener.requests();
    assert_eq!(reqs.len(), 2);
    assert!(!reqs[0].header("webhook-signature").is_empty());
    assert_eq!(reqs[1].json()["events"][0]["eventName"], "COURSE_COMPLETED");
    // A refused connection is reported, not an RPC error.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/", closed.local_addr().unwrap());
    drop(closed);
    let r = admin
        .test_webhook(TestWebhookRequest {
            account_id: 1010,
            target: Some(test_webhook_request::Target::Webhook(webhook(
                "x",
                &url,
                &["COURSE_COMPLETED"],
                no_auth(),
            ))),
            event_name: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!r.success);
    assert_eq!(r.status_code, 0);
    assert!(r.error.contains("connect"), "{}", r.error);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn delivery_log_redelivery_and_watch() {
    let (_dir, server, mut admin, mut ingest) = setup().await;
    let listener = Listener::ok().await;
    let w = create(
        &mut admin,
        1010,
        webhook("log", &listener.url(), &["COURSE_ENROLLMENT"], no_auth()),
    )
    .await;
    let mut watch = admin
        .watch_deliveries(WatchDeliveriesRequest {
            account_id: 1010,
            webhook_id: w.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    publish(
        &mut ingest,
        1010,
        vec![event("l-1", "COURSE_ENROLLMENT", 1)],
    )
    .await;
    let seen = tokio::time::timeout(Duration::from_secs(10), watch.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let d = seen.delivery.unwrap();
    assert_eq!(d.event_ids, vec!["l-1"]);
    assert_eq!(d.state, DeliveryState::Delivered as i32);
    assert_eq!(d.attempts.len(), 1);
    assert_eq!(d.attempts[0].status_code, 200);

    // Successful outcomes reach the log within delivery.log_flush_ms.
    let deadline = Instant::now() + Duration::from_secs(5);
    let list = loop {
        let list = admin
            .list_deliveries(ListDeliveriesRequest {
                account_id: 1010,
                webhook_id: w.id.clone(),
                state: DeliveryState::Delivered as i32,
                page_size: 10,
                page_token: String::new(),
            })
            .await
            .unwrap()
            .into_inner();
        if !list.deliveries.is_empty() || Instant::now() > deadline {
            break list;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(list.deliveries.len(), 1, "not in the log after 5 s");
    assert_eq!(list.deliveries[0].id, d.id);
    let none = admin
        .list_deliveries(ListDeliveriesRequest {
            account_id: 1010,
            webhook_id: w.id.clone(),
            state: DeliveryState::Dead as i32,
            page_size: 10,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(none.deliveries.is_empty());

    let n = admin
        .redeliver_events(RedeliverEventsRequest {
            account_id: 1010,
            webhook_id: w.id.clone(),
            delivery_ids: vec![d.id.clone()],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(n.requeued_count, 1);
    let again = tokio::time::timeout(Duration::from_secs(10), watch.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap()
        .delivery
        .unwrap();
    assert_ne!(again.id, d.id, "a redelivery is a new delivery");
    assert_eq!(again.event_ids, vec!["l-1"]);
    assert_eq!(listener.event_ids(), vec!["l-1", "l-1"]);
    let reqs = listener.requests();
    assert_ne!(reqs[0].header("webhook-id"), reqs[1].header("webhook-id"));

    // Pagination of the log: newest first, two pages.
    let p1 = admin
        .list_deliveries(ListDeliveriesRequest {
            account_id: 1010,
            webhook_id: w.id.clone(),
            state: 0,
            page_size: 1,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(p1.deliveries[0].id, again.id);
    assert!(!p1.next_page_token.is_empty());
    let p2 = admin
        .list_deliveries(ListDeliveriesRequest {
            account_id: 1010,
            webhook_id: w.id.clone(),
            state: 0,
            page_size: 1,
            page_token: p1.next_page_token,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(p2.deliveries[0].id, d.id);
    assert!(p2.next_page_token.is_empty());
    server.stop().await.unwrap();
}

#[tokio::test]
async fn retired_webhooks_keep_their_queue_and_deleted_ones_drop_it() {
    let (_dir, server, mut admin, mut ingest) = setup().await;
    let listener = Listener::ok().await;
    let w = create(
        &mut admin,
        1010,
        webhook("r", &listener.url(), &["COURSE_ENROLLMENT"], no_auth()),
    )
    .await;
    admin
        .retire_webhook(RetireWebhookRequest {
            account_id: 1010,
            webhook_id: w.id.clone(),
        })
        .await
        .unwrap();
    publish(
        &mut ingest,
        1010,
        vec![event("q-1", "COURSE_ENROLLMENT", 1)],
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        listener.requests().is_empty(),
        "retired webhook receives nothing"
    );
    admin
        .activate_webhook(ActivateWebhookRequest {
            account_id: 1010,
            webhook_id: w.id.clone(),
        })
        .await
        .unwrap();
    assert_eq!(
        listener.wait_events(1, Duration::from_secs(5)).await,
        vec!["q-1"]
    );

    // A webhook failing with a queue behind it, then deleted: nothing more is sent.
    let failing = Listener::start(Arc::new(|_, _| (503, vec![], Duration::ZERO))).await;
    let f = create(
        &mut admin,
        1010,
        webhook("f", &failing.url(), &["COURSE_COMPLETED"], no_auth()),
    )
    .await;
    publish(
        &mut ingest,
        1010,
        vec![
            event("z-1", "COURSE_COMPLETED", 1),
            event("z-2", "COURSE_COMPLETED", 2),
        ],
    )
    .await;
    failing
        .wait_until(Duration::from_secs(5), |r| !r.is_empty())
        .await;
    admin
        .delete_webhook(DeleteWebhookRequest {
            account_id: 1010,
            webhook_id: f.id.clone(),
        })
        .await
        .unwrap();
    let after_delete = failing.requests().len();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        failing.requests().len(),
        after_delete,
        "no attempt after delete"
    );
    server.stop().await.unwrap();
}
