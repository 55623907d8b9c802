//! Retention that keeps its word, on a real server with short settings: a
//! dead letter outlives the event log's retention and is redelivered once;
//! a long-retired webhook's events leave its lane as EXPIRED records while
//! the account's log is trimmed for everyone and its size levels off; a
//! payload retried across the trim still goes out whole; delivered records
//! are kept `retention_ms` from when they were delivered, not created.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::*;

const STORED: &str = "webhook_router_log_events_stored";
const EXPIRED_TOTAL: &str = "webhook_router_events_expired_total";

/// A router on a fresh folder, with `/metrics`, after `f` set the retention.
async fn start(
    f: impl FnOnce(&mut webhook_router::config::Config),
) -> (tempfile::TempDir, TestServer, SocketAddr, Admin, Ingest) {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    f(&mut config);
    let (server, metrics) = TestServer::start_with_metrics(config).await;
    let admin = server.admin(ADMIN).await;
    let ingest = server.ingest(INGEST).await;
    (dir, server, metrics, admin, ingest)
}

async fn stored_events(metrics: SocketAddr) -> f64 {
    value(&scrape(metrics).await, STORED, &[]).expect("log_events_stored")
}

/// Waits until the log holds `n` events or fewer; returns how many it holds.
async fn wait_stored_at_most(metrics: SocketAddr, n: f64, timeout: Duration) -> f64 {
    let deadline = Instant::now() + timeout;
    loop {
        let v = stored_events(metrics).await;
        if v <= n || Instant::now() > deadline {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn list(admin: &mut Admin, webhook_id: &str, state: DeliveryState) -> Vec<Delivery> {
    let mut out = Vec::new();
    let mut token = String::new();
    loop {
        let page = admin
            .list_deliveries(ListDeliveriesRequest {
                account_id: 1010,
                webhook_id: webhook_id.into(),
                state: state as i32,
                page_size: 1000,
                page_token: token,
            })
            .await
            .unwrap()
            .into_inner();
        out.extend(page.deliveries);
        if page.next_page_token.is_empty() {
            return out;
        }
        token = page.next_page_token;
    }
}

async fn wait_for_state(
    admin: &mut Admin,
    webhook_id: &str,
    state: DeliveryState,
    timeout: Duration,
) -> Vec<Delivery> {
    let deadline = Instant::now() + timeout;
    loop {
        let found = list(admin, webhook_id, state).await;
        if !found.is_empty() || Instant::now() > deadline {
            return found;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_dead_letter_outlives_retention_and_is_redelivered_once() {
    let (_dir, _server, metrics, mut admin, mut ingest) = start(|c| {
        c.delivery.retention_ms = 1_500;
        c.delivery.dead_letter_retention_ms = 120_000;
        c.delivery.retry_initial_ms = 100;
        c.delivery.retry_max_interval_ms = 100;
        c.delivery.retry_max_age_ms = 300;
    })
    .await;
    let healthy = Arc::new(AtomicBool::new(false));
    let listener = Listener::toggled(healthy.clone()).await;
    let w = create(
        &mut admin,
        1010,
        webhook("dlq", &listener.url(), &["COURSE_ENROLLMENT"], no_auth()),
    )
    .await;
    let ids = ["dl-1", "dl-2", "dl-3"];
    publish(
        &mut ingest,
        1010,
        ids.iter()
            .map(|id| event(id, "COURSE_ENROLLMENT", 7))
            .collect(),
    )
    .await;
    let dead = wait_for_state(
        &mut admin,
        &w.id,
        DeliveryState::Dead,
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(dead.len(), 1, "one payload died: {dead:?}");
    assert_eq!(dead[0].event_ids, ids);
    assert!(
        dead[0].finish_time.is_some(),
        "a dead delivery has a finish time"
    );

    // The event log's retention passes: the events are trimmed from it.
    let left = wait_stored_at_most(metrics, 0.0, Duration::from_secs(10)).await;
    assert_eq!(left, 0.0, "the log still holds the dead letter's events");
    // The dead letter is still listed, with its events.
    let dead = list(&mut admin, &w.id, DeliveryState::Dead).await;
    assert_eq!(dead.len(), 1, "the dead letter was purged with the log");

    // Recovery: fix the listener, activate, redeliver without ids.
    healthy.store(true, Ordering::SeqCst);
    let before = listener.requests().len();
    admin
        .activate_webhook(ActivateWebhookRequest {
            account_id: 1010,
            webhook_id: w.id.clone(),
        })
        .await
        .unwrap();
    let redeliver = |admin: &mut Admin| {
        let mut admin = admin.clone();
        let id = w.id.clone();
        async move {
            admin
                .redeliver_events(RedeliverEventsRequest {
                    account_id: 1010,
                    webhook_id: id,
                    delivery_ids: vec![],
                })
                .await
                .unwrap()
                .into_inner()
                .requeued_count
        }
    };
    assert_eq!(redeliver(&mut admin).await, 1);
    assert_eq!(
        redeliver(&mut admin).await,
        0,
        "a second RedeliverEvents without ids requeued the same dead delivery again"
    );
    let got = listener
        .wait_until(Duration::from_secs(10), |r| {
            r[before..].iter().any(|r| r.event_ids() == ids)
        })
        .await;
    let resent: Vec<_> = got[before..]
        .iter()
        .filter(|r| r.event_ids() == ids)
        .collect();
    assert_eq!(
        resent.len(),
        1,
        "the dead letter went out once after recovery"
    );
    assert_eq!(
        resent[0].json()["events"][0]["data"]["loId"],
        "course:7",
        "the redelivered payload carries the events as published"
    );
    // Negative check: nothing more arrives within a second.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let again = listener.requests()[before..]
        .iter()
        .filter(|r| r.event_ids() == ids)
        .count();
    assert_eq!(
        again, 1,
        "the dead letter was sent more than once (waited 1 s)"
    );
    // And a third call after the redelivery requeues nothing either.
    assert_eq!(redeliver(&mut admin).await, 0);
}

#[tokio::test]
async fn a_retired_webhook_expires_while_the_log_is_trimmed_for_everyone() {
    const ROUNDS: usize = 10;
    const PER_ROUND: usize = 50;
    let retention_ms = 1_500u64;
    let (_dir, _server, metrics, mut admin, mut ingest) = start(|c| {
        c.delivery.retention_ms = retention_ms;
    })
    .await;
    let active = Listener::ok().await;
    let retired_listener = Listener::ok().await;
    let a = create(
        &mut admin,
        1010,
        webhook("active", &active.url(), &["COURSE_ENROLLMENT"], no_auth()),
    )
    .await;
    let b = create(
        &mut admin,
        1010,
        webhook(
            "retired",
            &retired_listener.url(),
            &["COURSE_ENROLLMENT"],
            no_auth(),
        ),
    )
    .await;
    admin
        .retire_webhook(RetireWebhookRequest {
            account_id: 1010,
            webhook_id: b.id.clone(),
        })
        .await
        .unwrap();
    let mut published = Vec::new();
    let mut stored_after_round = Vec::new();
    for round in 0..ROUNDS {
        let events: Vec<Event> = (0..PER_ROUND)
            .map(|i| event(&format!("r{round}-{i:02}"), "COURSE_ENROLLMENT", i as u64))
            .collect();
        published.extend(events.iter().map(|e| e.event_id.clone()));
        publish(&mut ingest, 1010, events).await;
        tokio::time::sleep(Duration::from_millis(400)).await;
        stored_after_round.push(stored_events(metrics).await);
    }
    println!("events stored after each round of {PER_ROUND}: {stored_after_round:?}");
    // Levels off: the log holds at most what the last retention period
    // (plus a janitor period) brought, not everything published.
    let window = ((retention_ms + 600) / 400 + 1) as f64 * PER_ROUND as f64;
    let late_max = stored_after_round[ROUNDS / 2..]
        .iter()
        .cloned()
        .fold(0.0, f64::max);
    assert!(
        late_max <= window,
        "the log kept growing past its retention: {stored_after_round:?} (bound {window})"
    );
    assert!(late_max < (ROUNDS * PER_ROUND) as f64);
    // The active webhook got everything.
    let ids = active
        .wait_events(published.len(), Duration::from_secs(10))
        .await;
    let got: HashSet<&String> = ids.iter().collect();
    assert!(
        published.iter().all(|id| got.contains(id)),
        "the active webhook missed events"
    );
    // Everything is trimmed once older than the retention.
    let left = wait_stored_at_most(metrics, 0.0, Duration::from_secs(10)).await;
    assert_eq!(left, 0.0);
    // The retired webhook's events left its lane as EXPIRED records, each once.
    let expired = list(&mut admin, &b.id, DeliveryState::Expired).await;
    let mut listed: Vec<String> = expired.iter().flat_map(|d| d.event_ids.clone()).collect();
    listed.sort();
    let mut want = published.clone();
    want.sort();
    assert_eq!(
        listed, want,
        "EXPIRED records list every event the webhook missed, once"
    );
    assert!(expired
        .iter()
        .all(|d| d.attempts.is_empty() && d.finish_time.is_some()));
    let samples = scrape(metrics).await;
    assert_eq!(
        value(&samples, EXPIRED_TOTAL, &[("webhook_id", &b.id)]),
        Some(published.len() as f64)
    );
    assert_eq!(
        value(&samples, EXPIRED_TOTAL, &[("webhook_id", &a.id)]),
        None,
        "the active webhook expired nothing"
    );
    // Activated again, it gets what comes next, not what expired.
    admin
        .activate_webhook(ActivateWebhookRequest {
            account_id: 1010,
            webhook_id: b.id.clone(),
        })
        .await
        .unwrap();
    publish(
        &mut ingest,
        1010,
        vec![event("after", "COURSE_ENROLLMENT", 1)],
    )
    .await;
    let ids = retired_listener
        .wait_events(1, Duration::from_secs(10))
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        retired_listener.event_ids(),
        vec!["after".to_string()],
        "expired events were sent after activation: {ids:?}"
    );
}

#[tokio::test]
async fn a_payload_retried_across_the_trim_is_delivered_whole_and_kept_from_its_finish() {
    let retention_ms = 2_000u64;
    let (_dir, _server, metrics, mut admin, mut ingest) = start(|c| {
        c.delivery.retention_ms = retention_ms;
        c.delivery.retry_initial_ms = 200;
        c.delivery.retry_max_interval_ms = 200;
        c.delivery.retry_max_age_ms = 60_000;
    })
    .await;
    let healthy = Arc::new(AtomicBool::new(false));
    let listener = Listener::toggled(healthy.clone()).await;
    let w = create(
        &mut admin,
        1010,
        webhook("slow", &listener.url(), &["COURSE_ENROLLMENT"], no_auth()),
    )
    .await;
    let created = Instant::now();
    publish(
        &mut ingest,
        1010,
        vec![
            event("k-1", "COURSE_ENROLLMENT", 1),
            event("k-2", "COURSE_ENROLLMENT", 2),
        ],
    )
    .await;
    // The log is trimmed while the payload is still being retried.
    let left = wait_stored_at_most(metrics, 0.0, Duration::from_secs(10)).await;
    assert_eq!(left, 0.0);
    assert!(
        !list(&mut admin, &w.id, DeliveryState::Retrying)
            .await
            .is_empty(),
        "the payload should still be retrying"
    );
    healthy.store(true, Ordering::SeqCst);
    let got = listener
        .wait_until(Duration::from_secs(10), |r| {
            r.last().is_some_and(|r| r.event_ids() == ["k-1", "k-2"]) && listener_ok(&healthy)
        })
        .await;
    let last = got.last().unwrap();
    assert_eq!(last.event_ids(), ["k-1", "k-2"]);
    assert_eq!(last.json()["events"][1]["data"]["loId"], "course:2");
    let delivered = wait_for_state(
        &mut admin,
        &w.id,
        DeliveryState::Delivered,
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(delivered.len(), 1);
    let finished = Instant::now();
    assert!(
        finished.duration_since(created) > Duration::from_millis(retention_ms),
        "the test needs the delivery to finish after its creation + retention"
    );
    // Kept retention_ms from its finish: still there half a retention later
    // (already past its creation + retention).
    tokio::time::sleep(Duration::from_millis(retention_ms / 2)).await;
    assert_eq!(
        list(&mut admin, &w.id, DeliveryState::Delivered)
            .await
            .len(),
        1,
        "a delivered record was purged before retention_ms after it finished"
    );
    // And purged once that has passed.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !list(&mut admin, &w.id, DeliveryState::Delivered)
        .await
        .is_empty()
    {
        assert!(
            Instant::now() < deadline,
            "the delivered record was never purged"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(finished.elapsed() >= Duration::from_millis(retention_ms));
}

fn listener_ok(healthy: &AtomicBool) -> bool {
    healthy.load(Ordering::SeqCst)
}
