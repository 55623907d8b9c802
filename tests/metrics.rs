//! Prometheus metrics: a real router with its `/metrics` listener on port 0,
//! real HTTP listeners; scrape, publish and deliver, scrape again and check
//! that the values moved (parsing the text exposition).

use std::sync::Arc;
use std::time::Duration;

use crate::common::*;

const PUBLISHED: &str = "webhook_router_events_published_total";
const DELIVERIES: &str = "webhook_router_deliveries_total";
const RETRIES: &str = "webhook_router_retries_scheduled_total";
const ATTEMPTS: &str = "webhook_router_delivery_attempt_duration_seconds_count";
const DISABLED: &str = "webhook_router_webhooks_disabled_total";
const BACKLOG: &str = "webhook_router_lane_backlog_events";
const AGE: &str = "webhook_router_lane_oldest_pending_age_seconds";
const REQUEUED_WAITING: &str = "webhook_router_lane_requeued_deliveries";
const REQUEUED_TOTAL: &str = "webhook_router_redelivery_requeued_total";
const STORE_SIZE: &str = "webhook_router_store_size_bytes";

#[tokio::test]
async fn metrics_move_with_publishing_delivery_retries_and_disabling() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    config.delivery.batch_interval_ms = 300;
    let (server, metrics_addr) = TestServer::start_with_metrics(config).await;
    let mut admin = server.admin(ADMIN).await;
    let mut ingest = server.ingest(INGEST).await;

    let before = scrape(metrics_addr).await;
    assert!(value(&before, STORE_SIZE, &[]).unwrap() > 0.0);
    assert_eq!(value(&before, PUBLISHED, &[("account_id", "1010")]), None);
    let (status, _) = http_get(metrics_addr, "/other").await;
    assert_eq!(status, 404);

    // A listener that fails the first request, then accepts.
    let flaky = Listener::start(Arc::new(|n, _| {
        (if n == 0 { 503 } else { 200 }, vec![], Duration::ZERO)
    }))
    .await;
    let a = create(
        &mut admin,
        1010,
        webhook(
            "a",
            &flaky.url(),
            &["COURSE_ENROLLMENT", "COURSE_COMPLETED"],
            no_auth(),
        ),
    )
    .await;
    publish(
        &mut ingest,
        1010,
        vec![
            event("m-1", "COURSE_ENROLLMENT", 1),
            event("m-2", "COURSE_ENROLLMENT", 2),
            event("m-3", "COURSE_ENROLLMENT", 3),
            event("m-4", "COURSE_COMPLETED", 4),
        ],
    )
    .await;
    // Published again: duplicates are not counted.
    let again = publish(
        &mut ingest,
        1010,
        vec![event("m-1", "COURSE_ENROLLMENT", 1)],
    )
    .await;
    assert!(again.results[0].duplicate);
    assert_eq!(flaky.wait_events(8, Duration::from_secs(10)).await.len(), 8);

    let wa = a.id.as_str();
    let s = scrape_until(metrics_addr, |s| {
        value(
            s,
            DELIVERIES,
            &[("webhook_id", wa), ("outcome", "delivered")],
        ) == Some(1.0)
    })
    .await;
    let enrollment = [("account_id", "1010"), ("event_type", "COURSE_ENROLLMENT")];
    assert_eq!(value(&s, PUBLISHED, &enrollment), Some(3.0));
    let completed = [("account_id", "1010"), ("event_type", "COURSE_COMPLETED")];
    assert_eq!(value(&s, PUBLISHED, &completed), Some(1.0));
    assert_eq!(
        value(
            &s,
            DELIVERIES,
            &[("webhook_id", wa), ("outcome", "delivered")]
        ),
        Some(1.0)
    );
    assert_eq!(value(&s, RETRIES, &[("webhook_id", wa)]), Some(1.0));
    assert_eq!(value(&s, ATTEMPTS, &[("result", "success")]), Some(1.0));
    assert_eq!(value(&s, ATTEMPTS, &[("result", "failure")]), Some(1.0));
    let lane_a = [("webhook_id", wa), ("mode", "realtime")];
    assert_eq!(value(&s, BACKLOG, &lane_a), Some(0.0));
    assert_eq!(value(&s, AGE, &lane_a), Some(0.0));

    // A retired webhook: its events wait, and the backlog and age show it.
    let steady = Listener::ok().await;
    let b = create(
        &mut admin,
        1010,
        webhook("b", &steady.url(), &["LEARNER_PROGRESS"], no_auth()),
    )
    .await;
    let wb = b.id.as_str();
    admin
        .retire_webhook(RetireWebhookRequest {
            account_id: 1010,
            webhook_id: b.id.clone(),
        })
        .await
        .unwrap();
    let batch: Vec<Event> = (0..5)
        .map(|i| event(&format!("b-{i}"), "LEARNER_PROGRESS", i))
        .collect();
    publish(&mut ingest, 1010, batch).await;
    // Other event types do not count towards b's backlog.
    publish(
        &mut ingest,
        1010,
        vec![event("m-5", "COURSE_ENROLLMENT", 5)],
    )
    .await;
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let s = scrape(metrics_addr).await;
    let lane_b = [("webhook_id", wb), ("mode", "batch")];
    assert_eq!(value(&s, BACKLOG, &lane_b), Some(5.0));
    let age = value(&s, AGE, &lane_b).unwrap();
    assert!((1.0..60.0).contains(&age), "oldest pending age {age}");
    assert_eq!(
        value(&s, PUBLISHED, &[("event_type", "LEARNER_PROGRESS")]),
        Some(5.0)
    );
    assert_eq!(value(&s, PUBLISHED, &enrollment), Some(4.0));

    // Redelivery of a's delivered payload while a is retired: counted as
    // requeued, waiting in its lane until activation.
    admin
        .retire_webhook(RetireWebhookRequest {
            account_id: 1010,
            webhook_id: a.id.clone(),
        })
        .await
        .unwrap();
    // Successful outcomes reach the log within delivery.log_flush_ms.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let delivered: Vec<String> = loop {
        let ids: Vec<String> = deliveries(&mut admin, wa)
            .await
            .into_iter()
            .filter(|d| d.state == DeliveryState::Delivered as i32)
            .map(|d| d.id)
            .collect();
        if ids.len() >= 2 || std::time::Instant::now() > deadline {
            break ids;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(delivered.len(), 2, "m-1..m-4, then m-5");
    let requeued = admin
        .redeliver_events(RedeliverEventsRequest {
            account_id: 1010,
            webhook_id: a.id.clone(),
            delivery_ids: delivered,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(requeued.requeued_count, 2);
    let s = scrape(metrics_addr).await;
    assert_eq!(value(&s, REQUEUED_TOTAL, &[]), Some(2.0));
    assert_eq!(value(&s, REQUEUED_WAITING, &lane_a), Some(2.0));

    for id in [&a.id, &b.id] {
        admin
            .activate_webhook(ActivateWebhookRequest {
                account_id: 1010,
                webhook_id: id.clone(),
            })
            .await
            .unwrap();
    }
    let s = scrape_until(metrics_addr, |s| {
        value(s, BACKLOG, &lane_b) == Some(0.0) && value(s, REQUEUED_WAITING, &lane_a) == Some(0.0)
    })
    .await;
    assert_eq!(value(&s, BACKLOG, &lane_b), Some(0.0));
    assert_eq!(value(&s, AGE, &lane_b), Some(0.0));
    assert_eq!(value(&s, REQUEUED_WAITING, &lane_a), Some(0.0));
    assert_eq!(
        steady.wait_events(5, Duration::from_secs(10)).await.len(),
        5
    );

    // 410 Gone: a dead payload and a webhook disabled.
    let gone = Listener::start(Arc::new(|_, _| (410, vec![], Duration::ZERO))).await;
    let c = create(
        &mut admin,
        1010,
        webhook("c", &gone.url(), &["COURSE_COMPLETED"], no_auth()),
    )
    .await;
    assert_eq!(value(&s, DISABLED, &[("reason", "gone")]), Some(0.0));
    publish(&mut ingest, 1010, vec![event("c-1", "COURSE_COMPLETED", 9)]).await;
    let wc = c.id.as_str();
    let s = scrape_until(metrics_addr, |s| {
        value(s, DISABLED, &[("reason", "gone")]) == Some(1.0)
    })
    .await;
    assert_eq!(value(&s, DISABLED, &[("reason", "gone")]), Some(1.0));
    assert_eq!(
        value(&s, DELIVERIES, &[("webhook_id", wc), ("outcome", "dead")]),
        Some(1.0)
    );
    assert_eq!(value(&s, RETRIES, &[("webhook_id", wc)]), Some(0.0));
    assert!(value(&s, STORE_SIZE, &[]).unwrap() > 0.0);

    server.stop().await.unwrap();
}

#[tokio::test]
async fn metrics_listen_is_validated_and_off_by_default() {
    let c = webhook_router::config::Config::load_with_env(None, Vec::new()).unwrap();
    assert_eq!(c.metrics.listen, None);
    let e = webhook_router::config::Config::load_with_env(
        None,
        vec![(
            "WEBHOOK_ROUTER__METRICS__LISTEN".to_string(),
            "localhost:9090".to_string(),
        )],
    )
    .unwrap_err();
    assert!(
        e.0.starts_with("metrics.listen (from WEBHOOK_ROUTER__METRICS__LISTEN): must be"),
        "{e}"
    );
    let c = webhook_router::config::Config::load_with_env(
        None,
        vec![(
            "WEBHOOK_ROUTER__METRICS__LISTEN".to_string(),
            "127.0.0.1:9090".to_string(),
        )],
    )
    .unwrap();
    assert_eq!(c.metrics.listen.as_deref(), Some("127.0.0.1:9090"));
}
