//! GetWebhookHealth and the per-webhook circuit breaker, against a real
//! server and a real listener whose answer the test switches between 200
//! and 500: percentiles from known listener delays, the breaker opening
//! after `breaker_failure_threshold` failures, nothing sent while it is open,
//! exactly one probe while half-open, the doubled period after a failed
//! probe, recovery, and the breaker turned off.

use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::*;

const OPEN_MS: u64 = 1_500;

async fn health(admin: &mut Admin, webhook_id: &str) -> WebhookHealth {
    admin
        .get_webhook_health(GetWebhookHealthRequest {
            account_id: 1010,
            webhook_id: webhook_id.into(),
        })
        .await
        .expect("GetWebhookHealth")
        .into_inner()
        .health
        .expect("health set")
}

/// Polls GetWebhookHealth until `pred` holds; fails the test after 15 s.
async fn health_until(
    admin: &mut Admin,
    webhook_id: &str,
    what: &str,
    pred: impl Fn(&WebhookHealth) -> bool,
) -> WebhookHealth {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let h = health(admin, webhook_id).await;
        if pred(&h) {
            return h;
        }
        assert!(Instant::now() < deadline, "never {what}: {h:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn ms(t: &prost_types::Timestamp) -> i64 {
    t.seconds * 1000 + i64::from(t.nanos) / 1_000_000
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// A listener answering `status` after `delay_ms`, both switchable.
async fn switchable(status: Arc<AtomicU16>, delay_ms: Arc<AtomicU64>) -> Listener {
    Listener::start(Arc::new(move |_, _| {
        (
            status.load(Ordering::SeqCst),
            vec![],
            Duration::from_millis(delay_ms.load(Ordering::SeqCst)),
        )
    }))
    .await
}

fn events(prefix: &str, n: usize) -> Vec<Event> {
    (0..n)
        .map(|i| event(&format!("{prefix}-{i}"), "COURSE_ENROLLMENT", i as u64))
        .collect()
}

fn circuit(m: &WatchDeliveriesResponse) -> Option<CircuitState> {
    m.circuit
        .as_ref()
        .and_then(|c| CircuitState::try_from(c.state).ok())
}

#[tokio::test]
async fn breaker_opens_holds_probes_once_doubles_and_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    config.delivery.breaker_failure_threshold = 3;
    config.delivery.breaker_open_ms = OPEN_MS;
    config.delivery.breaker_max_open_ms = 3 * OPEN_MS;
    config.delivery.retry_initial_ms = 100;
    config.delivery.retry_max_interval_ms = 300;
    // One event per payload, so several payloads are in flight at once.
    config.delivery.max_events_per_payload = 1;
    let (server, metrics) = TestServer::start_with_metrics(config).await;
    let mut admin = server.admin(ADMIN).await;
    let mut ingest = server.ingest(INGEST).await;
    let status = Arc::new(AtomicU16::new(200));
    let delay = Arc::new(AtomicU64::new(20));
    let listener = switchable(status.clone(), delay.clone()).await;
    let mut w = webhook("h", &listener.url(), &["COURSE_ENROLLMENT"], no_auth());
    w.max_in_flight = 4;
    let w = create(&mut admin, 1010, w).await;

    // Healthy: ten deliveries, nine answered after 20 ms, one after 200 ms.
    for i in 0..10 {
        if i == 9 {
            delay.store(200, Ordering::SeqCst);
        }
        publish(&mut ingest, 1010, events(&format!("ok{i}"), 1)).await;
        let got = listener
            .wait_until(Duration::from_secs(10), |r| r.len() > i)
            .await;
        assert_eq!(got.len(), i + 1);
    }
    delay.store(0, Ordering::SeqCst);
    let h = health_until(&mut admin, &w.id, "ten attempts", |h| h.attempts == 10).await;
    assert_eq!(h.state, WebhookHealthState::Healthy as i32, "{h:?}");
    assert_eq!(h.success_rate, 1.0);
    assert_eq!(h.consecutive_failures, 0);
    assert_eq!(h.circuit_state, CircuitState::Closed as i32);
    assert!(h.next_attempt_time.is_none(), "{h:?}");
    assert!(h.last_error.is_empty() && h.last_error_time.is_none());
    assert!(!h.truncated);
    // Nearest rank over ten: p50 and p90 are 20 ms answers, p99 the 200 ms one.
    assert!((20..150).contains(&h.latency_p50_ms), "{h:?}");
    assert!((20..150).contains(&h.latency_p90_ms), "{h:?}");
    assert!((200..1000).contains(&h.latency_p99_ms), "{h:?}");

    let mut watch = admin
        .watch_deliveries(WatchDeliveriesRequest {
            account_id: 1010,
            webhook_id: w.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();

    // Failing: four payloads in flight at once, all answered 500. The third
    // failure opens the breaker (the fourth was admitted before, and does
    // not count).
    status.store(500, Ordering::SeqCst);
    let c0 = listener.requests().len();
    publish(&mut ingest, 1010, events("bad", 4)).await;
    listener
        .wait_until(Duration::from_secs(10), |r| r.len() >= c0 + 4)
        .await;
    // (The breaker opens as the third failure is counted; the log has it a
    // moment later.)
    let h = health_until(&mut admin, &w.id, "open", |h| {
        h.circuit_state == CircuitState::Open as i32 && h.consecutive_failures >= 3
    })
    .await;
    assert_eq!(h.state, WebhookHealthState::Failing as i32, "{h:?}");
    assert_eq!(h.last_error, "HTTP 500");
    let next = ms(h.next_attempt_time.as_ref().expect("next_attempt_time"));
    assert!(
        next > now_ms() && next <= now_ms() + OPEN_MS as i64,
        "{h:?}"
    );
    let s = scrape_until(metrics, |s| {
        value(s, "webhook_router_circuit_breakers_open", &[]) == Some(1.0)
    })
    .await;
    assert_eq!(
        value(
            &s,
            "webhook_router_circuit_breaker_openings_total",
            &[("webhook_id", &w.id)]
        ),
        Some(1.0)
    );

    // Nothing reaches the listener for the whole open period (1.5 s; the
    // retries alone would come every 100-360 ms), then one probe.
    let reqs = listener
        .wait_until(Duration::from_secs(10), |r| r.len() >= c0 + 5)
        .await;
    assert_eq!(reqs.len(), c0 + 5, "no probe");
    let probe1 = reqs[c0 + 4].at;
    // The breaker opened after three failures had arrived and been answered.
    let quiet = probe1 - reqs[c0 + 2].at;
    assert!(quiet >= Duration::from_millis(OPEN_MS), "{quiet:?}");
    // The probe fails: open again, for twice as long.
    let h = health_until(&mut admin, &w.id, "open again", |h| {
        h.circuit_state == CircuitState::Open as i32
            && h.next_attempt_time
                .as_ref()
                .is_some_and(|t| ms(t) > next + 2 * OPEN_MS as i64 - 100)
    })
    .await;
    assert_eq!(h.state, WebhookHealthState::Failing as i32);
    // The listener recovers; the next probe finds it healthy.
    status.store(200, Ordering::SeqCst);
    let reqs = listener
        .wait_until(Duration::from_secs(10), |r| r.len() >= c0 + 9)
        .await;
    assert_eq!(
        reqs.len(),
        c0 + 9,
        "the four payloads were not all delivered"
    );
    let probe2 = reqs[c0 + 5].at;
    // Exactly one request while half-open and re-opened: the first probe.
    let between = reqs
        .iter()
        .filter(|r| r.at > probe1 && r.at < probe2)
        .count();
    assert_eq!(between, 0);
    let reopened = probe2 - probe1;
    assert!(
        reopened >= Duration::from_millis(2 * OPEN_MS),
        "{reopened:?}"
    );
    // (Successes reach the log within `delivery.log_flush_ms`.)
    let h = health_until(&mut admin, &w.id, "closed, nothing waiting", |h| {
        h.circuit_state == CircuitState::Closed as i32
            && h.consecutive_failures == 0
            && h.next_attempt_time.is_none()
    })
    .await;
    // Five failures of 19 attempts in the hour: below 0.95.
    assert_eq!(h.state, WebhookHealthState::Degraded as i32, "{h:?}");
    assert!(h.success_rate < 0.95, "{h:?}");
    let s = scrape_until(metrics, |s| {
        value(s, "webhook_router_circuit_breakers_open", &[]) == Some(0.0)
    })
    .await;
    assert_eq!(
        value(
            &s,
            "webhook_router_circuit_breaker_openings_total",
            &[("webhook_id", &w.id)]
        ),
        Some(2.0)
    );

    // WatchDeliveries showed the breaker: delivery messages while it was
    // open, and a message of its own for each change.
    let mut changes = Vec::new();
    let mut open_delivery = false;
    while let Ok(Ok(Some(m))) =
        tokio::time::timeout(Duration::from_millis(500), watch.message()).await
    {
        match (&m.delivery, circuit(&m)) {
            (Some(_), Some(CircuitState::Open)) => open_delivery = true,
            (None, Some(c)) => changes.push(c),
            _ => {}
        }
    }
    assert!(open_delivery, "no delivery message showed the open breaker");
    use CircuitState::*;
    assert_eq!(changes, vec![Open, HalfOpen, Open, HalfOpen, Closed]);

    // Enough successes bring the rate back over 0.95: HEALTHY again.
    publish(&mut ingest, 1010, events("more", 150)).await;
    let h = health_until(&mut admin, &w.id, "healthy again", |h| {
        h.state == WebhookHealthState::Healthy as i32
    })
    .await;
    assert!(h.success_rate >= 0.95, "{h:?}");
    // Every attempt the listener saw is in the figures once all are logged.
    let all = listener
        .wait_until(Duration::from_secs(10), |r| r.len() >= c0 + 159)
        .await
        .len();
    let h = health_until(&mut admin, &w.id, "all attempts counted", |h| {
        h.attempts as usize == all
    })
    .await;
    assert_eq!(h.last_error, "HTTP 500");
    server.stop().await.unwrap();
}

#[tokio::test]
async fn threshold_zero_keeps_the_retry_schedule_and_health_checks_its_caller() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    config.delivery.breaker_failure_threshold = 0;
    config.delivery.breaker_open_ms = OPEN_MS;
    config.delivery.retry_initial_ms = 100;
    config.delivery.retry_max_interval_ms = 300;
    let (server, metrics) = TestServer::start_with_metrics(config).await;
    let mut admin = server.admin(ADMIN).await;
    let mut ingest = server.ingest(INGEST).await;
    let status = Arc::new(AtomicU16::new(500));
    let listener = switchable(status, Arc::new(AtomicU64::new(0))).await;
    let w = create(
        &mut admin,
        1010,
        webhook("off", &listener.url(), &["COURSE_ENROLLMENT"], no_auth()),
    )
    .await;
    let h = health(&mut admin, &w.id).await;
    assert_eq!(h.attempts, 0);
    assert_eq!(h.success_rate, 1.0);
    assert_eq!(h.state, WebhookHealthState::Healthy as i32);

    publish(&mut ingest, 1010, events("off", 1)).await;
    let reqs = listener
        .wait_until(Duration::from_secs(15), |r| r.len() >= 14)
        .await;
    assert!(reqs.len() >= 14, "{}", reqs.len());
    // Retries every 100-360 ms: never a breaker's pause.
    for pair in reqs.windows(2) {
        let gap = pair[1].at - pair[0].at;
        assert!(gap < Duration::from_millis(1_000), "{gap:?}");
    }
    let h = health_until(&mut admin, &w.id, "failing", |h| {
        h.consecutive_failures >= 10
    })
    .await;
    assert_eq!(h.state, WebhookHealthState::Failing as i32, "{h:?}");
    assert_eq!(h.circuit_state, CircuitState::Closed as i32);
    assert_eq!(h.success_rate, 0.0);
    assert_eq!(h.last_error, "HTTP 500");
    assert!(h.next_attempt_time.is_some(), "a retry is due: {h:?}");
    let s = scrape(metrics).await;
    assert_eq!(
        value(&s, "webhook_router_circuit_breakers_open", &[]),
        Some(0.0)
    );
    assert_eq!(
        value(
            &s,
            "webhook_router_circuit_breaker_openings_total",
            &[("webhook_id", &w.id)]
        ),
        None
    );

    // Retired: DISABLED, nothing waits.
    admin
        .retire_webhook(RetireWebhookRequest {
            account_id: 1010,
            webhook_id: w.id.clone(),
        })
        .await
        .unwrap();
    let h = health(&mut admin, &w.id).await;
    assert_eq!(h.state, WebhookHealthState::Disabled as i32, "{h:?}");
    assert!(h.next_attempt_time.is_none());

    // Unknown, another account's, a token for another account, a bad id.
    let ask = |account_id: u64, webhook_id: &str| GetWebhookHealthRequest {
        account_id,
        webhook_id: webhook_id.into(),
    };
    let unknown = "wh_0000000000000000000000000000";
    let e = admin
        .get_webhook_health(ask(1010, unknown))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound, "{e:?}");
    let e = admin
        .get_webhook_health(ask(1011, &w.id))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound, "{e:?}");
    let mut other = server.admin(ADMIN_1011).await;
    let e = other
        .get_webhook_health(ask(1010, &w.id))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    let e = admin
        .get_webhook_health(ask(1010, "nope"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("webhook_id"), "{e:?}");
    server.stop().await.unwrap();
}
