//! Retries, Retry-After, dead-lettering, 410, isolation between webhooks and
//! the per-webhook rate limit, against real HTTP listeners.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::*;

async fn get(admin: &mut Admin, webhook_id: &str) -> Webhook {
    admin
        .get_webhook(GetWebhookRequest {
            account_id: 1010,
            webhook_id: webhook_id.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .webhook
        .unwrap()
}

async fn wait_for<F: Fn(&Webhook) -> bool>(admin: &mut Admin, id: &str, pred: F) -> Webhook {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let w = get(admin, id).await;
        if pred(&w) || Instant::now() > deadline {
            return w;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn failed_attempts_are_retried_with_the_same_webhook_id() {
    let (_d, server, mut admin, mut ingest) = setup_with(|_| {}).await;
    let listener = Listener::start(Arc::new(|n, _| {
        (if n < 2 { 503 } else { 200 }, vec![], Duration::ZERO)
    }))
    .await;
    let w = create(
        &mut admin,
        1010,
        webhook("r", &listener.url(), &["COURSE_ENROLLMENT"], no_auth()),
    )
    .await;
    publish(
        &mut ingest,
        1010,
        vec![event("r-1", "COURSE_ENROLLMENT", 1)],
    )
    .await;
    let reqs = listener
        .wait_until(Duration::from_secs(10), |r| r.len() >= 3)
        .await;
    assert_eq!(reqs.len(), 3);
    let ids: Vec<String> = reqs.iter().map(|r| r.header("webhook-id")).collect();
    assert!(
        ids.iter().all(|i| *i == ids[0]),
        "stable webhook-id: {ids:?}"
    );
    // Backoff: 200 ms then 400 ms, each ±20%.
    let gap1 = reqs[1].at - reqs[0].at;
    let gap2 = reqs[2].at - reqs[1].at;
    assert!(gap1 >= Duration::from_millis(150), "{gap1:?}");
    assert!(gap2 >= Duration::from_millis(300), "{gap2:?}");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let d = &deliveries(&mut admin, &w.id).await[0];
    assert_eq!(d.state, DeliveryState::Delivered as i32);
    let codes: Vec<u32> = d.attempts.iter().map(|a| a.status_code).collect();
    assert_eq!(codes, vec![503, 503, 200]);
    assert_eq!(d.attempts[0].error, "HTTP 503");
    server.stop().await.unwrap();
}

#[tokio::test]
async fn timeouts_and_refused_connections_are_retried_and_logged() {
    let (_d, server, mut admin, mut ingest) =
        setup_with(|c| c.delivery.request_timeout_ms = 300).await;
    // First answer takes 2 s: past the 300 ms request timeout.
    let slow = Listener::start(Arc::new(|n, _| {
        (
            200,
            vec![],
            if n == 0 {
                Duration::from_secs(2)
            } else {
                Duration::ZERO
            },
        )
    }))
    .await;
    let w = create(
        &mut admin,
        1010,
        webhook("slow", &slow.url(), &["COURSE_ENROLLMENT"], no_auth()),
    )
    .await;
    publish(
        &mut ingest,
        1010,
        vec![event("t-1", "COURSE_ENROLLMENT", 1)],
    )
    .await;
    slow.wait_until(Duration::from_secs(10), |r| r.len() >= 2)
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let d = &deliveries(&mut admin, &w.id).await[0];
    assert_eq!(d.state, DeliveryState::Delivered as i32, "{d:?}");
    assert!(
        d.attempts[0].error.contains("timed out"),
        "{:?}",
        d.attempts[0]
    );
    assert_eq!(d.attempts[0].status_code, 0);

    // A port nobody listens on: connection refused, retried until the URL is fixed.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_url = format!("http://{}/", closed.local_addr().unwrap());
    drop(closed);
    let w2 = create(
        &mut admin,
        1010,
        webhook("refused", &dead_url, &["COURSE_COMPLETED"], no_auth()),
    )
    .await;
    publish(&mut ingest, 1010, vec![event("t-2", "COURSE_COMPLETED", 2)]).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let ds = deliveries(&mut admin, &w2.id).await;
        if ds.first().is_some_and(|d| d.attempts.len() >= 2) {
            let d = &ds[0];
            assert_eq!(d.state, DeliveryState::Retrying as i32);
            assert!(d.next_attempt_time.is_some());
            assert!(
                d.attempts.iter().all(|a| a.error.contains("connect")),
                "{d:?}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "no retries logged");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let good = Listener::ok().await;
    admin
        .update_webhook(UpdateWebhookRequest {
            account_id: 1010,
            webhook: Some(Webhook {
                id: w2.id.clone(),
                target_url: good.url(),
                ..Default::default()
            }),
            update_mask: None,
        })
        .await
        .unwrap();
    assert_eq!(
        good.wait_events(1, Duration::from_secs(10)).await,
        vec!["t-2"]
    );
    server.stop().await.unwrap();
}

#[tokio::test]
async fn retry_after_is_honoured() {
    // The backoff alone would wait 5 s; the listener asks for 1 s.
    let (_d, server, mut admin, mut ingest) = setup_with(|c| {
        c.delivery.retry_initial_ms = 5_000;
        c.delivery.retry_max_interval_ms = 10_000;
    })
    .await;
    let listener = Listener::start(Arc::new(|n, _| {
        if n == 0 {
            (
                429,
                vec![("retry-after".to_string(), "1".to_string())],
                Duration::ZERO,
            )
        } else {
            (200, vec![], Duration::ZERO)
        }
    }))
    .await;
    create(
        &mut admin,
        1010,
        webhook("ra", &listener.url(), &["COURSE_ENROLLMENT"], no_auth()),
    )
    .await;
    publish(
        &mut ingest,
        1010,
        vec![event("ra-1", "COURSE_ENROLLMENT", 1)],
    )
    .await;
    let reqs = listener
        .wait_until(Duration::from_secs(8), |r| r.len() >= 2)
        .await;
    assert_eq!(reqs.len(), 2);
    let gap = reqs[1].at - reqs[0].at;
    assert!(
        gap >= Duration::from_millis(950) && gap < Duration::from_millis(3000),
        "{gap:?}"
    );
    server.stop().await.unwrap();
}

#[tokio::test]
async fn exhausted_retries_dead_letter_and_disable_the_webhook() {
    let (_d, server, mut admin, mut ingest) = setup_with(|c| {
        c.delivery.retry_initial_ms = 100;
        c.delivery.retry_max_interval_ms = 200;
        c.delivery.retry_max_age_ms = 1_000;
    })
    .await;
    let healthy = Arc::new(AtomicBool::new(false));
    let listener = Listener::toggled(healthy.clone()).await;
    let w = create(
        &mut admin,
        1010,
        webhook("dead", &listener.url(), &["COURSE_ENROLLMENT"], no_auth()),
    )
    .await;
    publish(
        &mut ingest,
        1010,
        vec![event("x-1", "COURSE_ENROLLMENT", 1)],
    )
    .await;
    let w = wait_for(&mut admin, &w.id, |w| !w.active).await;
    assert!(!w.active);
    assert!(
        w.disabled_reason.contains("retries exhausted"),
        "{}",
        w.disabled_reason
    );
    let ds = deliveries(&mut admin, &w.id).await;
    assert_eq!(ds[0].state, DeliveryState::Dead as i32);
    assert!(ds[0].attempts.len() >= 3, "{:?}", ds[0].attempts.len());
    // While disabled, new events wait.
    let before = listener.requests().len();
    publish(
        &mut ingest,
        1010,
        vec![event("x-2", "COURSE_ENROLLMENT", 2)],
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        listener.requests().len(),
        before,
        "nothing sent to a disabled webhook"
    );
    // Fixed listener, activated webhook, dead delivery requeued: everything arrives.
    healthy.store(true, Ordering::SeqCst);
    let activated = admin
        .activate_webhook(ActivateWebhookRequest {
            account_id: 1010,
            webhook_id: w.id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .webhook
        .unwrap();
    assert!(activated.active && activated.disabled_reason.is_empty());
    let n = admin
        .redeliver_events(RedeliverEventsRequest {
            account_id: 1010,
            webhook_id: w.id.clone(),
            delivery_ids: vec![],
        })
        .await
        .unwrap()
        .into_inner()
        .requeued_count;
    assert_eq!(n, 1);
    let reqs = listener
        .wait_until(Duration::from_secs(10), |r| {
            let ok: Vec<String> = r[before..].iter().flat_map(|x| x.event_ids()).collect();
            ok.contains(&"x-1".to_string()) && ok.contains(&"x-2".to_string())
        })
        .await;
    let delivered: Vec<String> = reqs[before..].iter().flat_map(|x| x.event_ids()).collect();
    assert!(
        delivered.contains(&"x-1".to_string()) && delivered.contains(&"x-2".to_string()),
        "{delivered:?}"
    );
    server.stop().await.unwrap();
}

#[tokio::test]
async fn gone_disables_at_once() {
    let (_d, server, mut admin, mut ingest) = setup_with(|_| {}).await;
    let listener = Listener::start(Arc::new(|_, _| (410, vec![], Duration::ZERO))).await;
    let w = create(
        &mut admin,
        1010,
        webhook("gone", &listener.url(), &["COURSE_ENROLLMENT"], no_auth()),
    )
    .await;
    publish(
        &mut ingest,
        1010,
        vec![
            event("g-1", "COURSE_ENROLLMENT", 1),
            event("g-2", "COURSE_ENROLLMENT", 2),
        ],
    )
    .await;
    let w = wait_for(&mut admin, &w.id, |w| !w.active).await;
    assert!(w.disabled_reason.contains("410"), "{}", w.disabled_reason);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(listener.requests().len(), 1, "no retry after 410");
    let ds = deliveries(&mut admin, &w.id).await;
    assert_eq!(ds[0].state, DeliveryState::Dead as i32);
    assert_eq!(ds[0].attempts[0].status_code, 410);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn a_failing_or_hanging_webhook_does_not_delay_a_healthy_one() {
    let (_d, server, mut admin, mut ingest) =
        setup_with(|c| c.delivery.request_timeout_ms = 5_000).await;
    let failing = Listener::start(Arc::new(|_, _| (503, vec![], Duration::ZERO))).await;
    let hanging = Listener::start(Arc::new(|_, _| (200, vec![], Duration::from_secs(30)))).await;
    let healthy = Listener::ok().await;
    for (name, l) in [
        ("failing", &failing),
        ("hanging", &hanging),
        ("healthy", &healthy),
    ] {
        create(
            &mut admin,
            1010,
            webhook(name, &l.url(), &["COURSE_ENROLLMENT"], no_auth()),
        )
        .await;
    }
    let start = Instant::now();
    for i in 0..50 {
        publish(
            &mut ingest,
            1010,
            vec![event(&format!("iso-{i:02}"), "COURSE_ENROLLMENT", i)],
        )
        .await;
    }
    let got = healthy.wait_events(50, Duration::from_secs(10)).await;
    let took = start.elapsed();
    assert_eq!(got.len(), 50);
    assert!(
        took < Duration::from_secs(3),
        "healthy webhook delayed: {took:?}"
    );
    assert!(!failing.requests().is_empty() && !hanging.requests().is_empty());
    server.stop().await.unwrap();
}

#[tokio::test]
async fn rate_limit_is_enforced_per_webhook() {
    let (_d, server, mut admin, mut ingest) = setup_with(|c| {
        c.delivery.rate_limit_per_second = 20;
        c.delivery.max_events_per_payload = 1;
    })
    .await;
    let listener = Listener::ok().await;
    create(
        &mut admin,
        1010,
        webhook(
            "rl",
            &listener.url(),
            &["COURSE_ENROLLMENT", "LEARNER_PROGRESS"],
            no_auth(),
        ),
    )
    .await;
    let events = (0..40)
        .map(|i| event(&format!("rl-{i:02}"), "COURSE_ENROLLMENT", i))
        .collect();
    publish(&mut ingest, 1010, events).await;
    let reqs = listener
        .wait_until(Duration::from_secs(10), |r| r.len() >= 40)
        .await;
    assert_eq!(reqs.len(), 40);
    let span = reqs[39].at - reqs[0].at;
    // 40 requests at 20/s: 39 intervals of 50 ms.
    assert!(span >= Duration::from_millis(1850), "too fast: {span:?}");
    let max_in_one_second = reqs
        .iter()
        .map(|a| {
            reqs.iter()
                .filter(|b| b.at >= a.at && b.at - a.at < Duration::from_secs(1))
                .count()
        })
        .max()
        .unwrap();
    assert!(
        max_in_one_second <= 21,
        "{max_in_one_second} requests within one second"
    );
    server.stop().await.unwrap();
}
