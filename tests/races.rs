//! Admin calls racing the delivery engine, on a real server with real
//! listeners: a deletion is final whatever calls race it; an edit or a
//! secret rotation during an attempt in flight leaves that attempt alone
//! (one request, recorded), and a new target applies from the next attempt.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::*;

/// Update, Retire, Activate, Rotate and Redeliver on `webhook_id` in a loop
/// until `stop`; errors (NOT_FOUND once deleted) are expected and ignored.
async fn churn(mut admin: Admin, webhook_id: String, stop: Arc<AtomicBool>) -> usize {
    let mut calls = 0;
    let mut i = 0u32;
    while !stop.load(Ordering::SeqCst) {
        i += 1;
        let id = webhook_id.clone();
        match i % 5 {
            0 => {
                let _ = admin
                    .update_webhook(UpdateWebhookRequest {
                        account_id: 1010,
                        webhook: Some(Webhook {
                            id,
                            description: format!("edit {i}"),
                            ..Default::default()
                        }),
                        update_mask: None,
                    })
                    .await;
            }
            1 => {
                let _ = admin
                    .retire_webhook(RetireWebhookRequest {
                        account_id: 1010,
                        webhook_id: id,
                    })
                    .await;
            }
            2 => {
                let _ = admin
                    .activate_webhook(ActivateWebhookRequest {
                        account_id: 1010,
                        webhook_id: id,
                    })
                    .await;
            }
            3 => {
                let _ = admin
                    .rotate_webhook_secret(RotateWebhookSecretRequest {
                        account_id: 1010,
                        webhook_id: id,
                        grace_period_seconds: 60,
                    })
                    .await;
            }
            _ => {
                let _ = admin
                    .redeliver_events(RedeliverEventsRequest {
                        account_id: 1010,
                        webhook_id: id,
                        delivery_ids: vec![],
                    })
                    .await;
            }
        }
        calls += 1;
    }
    calls
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn deletion_is_final_whatever_races_it() {
    const ROUNDS: usize = 20;
    let (_dir, server, mut admin, ingest) = setup().await;
    // Events keep coming for the whole test.
    let stop_publishing = Arc::new(AtomicBool::new(false));
    let publisher = {
        let mut ingest = ingest.clone();
        let stop = stop_publishing.clone();
        tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(Ordering::SeqCst) {
                n += 1;
                let _ = ingest
                    .publish_events(PublishEventsRequest {
                        account_id: 1010,
                        events: vec![event(&format!("race-{n}"), "COURSE_ENROLLMENT", n)],
                    })
                    .await;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            n
        })
    };
    let mut rounds = Vec::new();
    let mut total_calls = 0;
    for round in 0..ROUNDS {
        let listener = Listener::ok().await;
        let w = create(
            &mut admin,
            1010,
            webhook(
                &format!("doomed-{round}"),
                &listener.url(),
                &["COURSE_ENROLLMENT"],
                signature_auth(),
            ),
        )
        .await;
        // Delivering before the race starts.
        let got = listener
            .wait_until(Duration::from_secs(10), |r| !r.is_empty())
            .await;
        assert!(
            !got.is_empty(),
            "round {round}: nothing delivered before the race"
        );
        let stop = Arc::new(AtomicBool::new(false));
        let mut churners = Vec::new();
        for _ in 0..4 {
            churners.push(tokio::spawn(churn(
                server.admin(ADMIN).await,
                w.id.clone(),
                stop.clone(),
            )));
        }
        tokio::time::sleep(Duration::from_millis(20 + (round as u64 % 5) * 10)).await;
        admin
            .delete_webhook(DeleteWebhookRequest {
                account_id: 1010,
                webhook_id: w.id.clone(),
            })
            .await
            .unwrap_or_else(|e| panic!("round {round}: delete failed: {e}"));
        let deleted_at = Instant::now();
        // The racing calls go on for a while after the deletion too.
        tokio::time::sleep(Duration::from_millis(50)).await;
        stop.store(true, Ordering::SeqCst);
        for c in churners {
            total_calls += c.await.unwrap();
        }
        rounds.push((round, listener, deleted_at));
    }
    // Long enough for any revived lane to have delivered something.
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop_publishing.store(true, Ordering::SeqCst);
    let published = publisher.await.unwrap();
    let mut after = Vec::new();
    for (round, listener, deleted_at) in &rounds {
        let late = listener
            .requests()
            .iter()
            .filter(|r| r.at > *deleted_at)
            .count();
        if late > 0 {
            after.push((*round, late));
        }
    }
    println!(
        "{ROUNDS} rounds, {total_calls} racing admin calls, {published} events published; \
         requests after deletion per round: {after:?}"
    );
    assert!(
        after.is_empty(),
        "requests reached deleted webhooks after DeleteWebhook returned: {after:?}"
    );
}

#[tokio::test]
async fn an_edit_and_a_rotation_during_an_attempt_leave_it_alone() {
    // Room for a 2 s attempt.
    let (_dir, _server, mut admin, mut ingest) =
        setup_with(|c| c.delivery.request_timeout_ms = 10_000).await;
    // The first request takes 2 s to answer.
    let listener = Listener::start(Arc::new(|n, _| {
        let delay = if n == 0 { 2_000 } else { 0 };
        (200, vec![], Duration::from_millis(delay))
    }))
    .await;
    let w = create(
        &mut admin,
        1010,
        webhook(
            "slow",
            &listener.url(),
            &["COURSE_ENROLLMENT"],
            signature_auth(),
        ),
    )
    .await;
    publish(
        &mut ingest,
        1010,
        vec![event("inflight-1", "COURSE_ENROLLMENT", 1)],
    )
    .await;
    let got = listener
        .wait_until(Duration::from_secs(5), |r| !r.is_empty())
        .await;
    assert_eq!(got.len(), 1, "the attempt did not start");
    let msg_id = got[0].header("webhook-id");
    // While the listener holds the request: an edit and a rotation.
    admin
        .update_webhook(UpdateWebhookRequest {
            account_id: 1010,
            webhook: Some(Webhook {
                id: w.id.clone(),
                description: "edited during the attempt".into(),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["description".into()],
            }),
        })
        .await
        .unwrap();
    admin
        .rotate_webhook_secret(RotateWebhookSecretRequest {
            account_id: 1010,
            webhook_id: w.id.clone(),
            grace_period_seconds: 0,
        })
        .await
        .unwrap();
    // Wait until the attempt is recorded, then well past it.
    let deadline = Instant::now() + Duration::from_secs(10);
    let delivered = loop {
        let ds = deliveries(&mut admin, &w.id).await;
        if ds
            .iter()
            .any(|d| d.state == DeliveryState::Delivered as i32)
            || Instant::now() > deadline
        {
            break ds;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    let same: Vec<_> = listener
        .requests()
        .into_iter()
        .filter(|r| r.header("webhook-id") == msg_id)
        .collect();
    assert_eq!(
        same.len(),
        1,
        "the payload was sent {} times; the change cut the attempt",
        same.len()
    );
    assert_eq!(delivered.len(), 1, "{delivered:?}");
    let d = &delivered[0];
    assert_eq!(d.id, msg_id);
    assert_eq!(d.state, DeliveryState::Delivered as i32);
    assert_eq!(
        d.attempts.len(),
        1,
        "the attempt is in ListDeliveries: {d:?}"
    );
    assert_eq!(d.attempts[0].status_code, 200);
    assert!(d.attempts[0].latency_ms >= 2_000, "{:?}", d.attempts[0]);
}

#[tokio::test]
async fn a_new_target_applies_from_the_next_attempt() {
    let (_dir, _server, mut admin, mut ingest) = setup().await;
    let failing = Listener::start(Arc::new(|_, _| (500, vec![], Duration::ZERO))).await;
    let fixed = Listener::ok().await;
    let w = create(
        &mut admin,
        1010,
        webhook("moving", &failing.url(), &["COURSE_ENROLLMENT"], no_auth()),
    )
    .await;
    publish(
        &mut ingest,
        1010,
        vec![event("moved-1", "COURSE_ENROLLMENT", 1)],
    )
    .await;
    failing
        .wait_until(Duration::from_secs(5), |r| !r.is_empty())
        .await;
    admin
        .update_webhook(UpdateWebhookRequest {
            account_id: 1010,
            webhook: Some(Webhook {
                id: w.id.clone(),
                target_url: fixed.url(),
                ..Default::default()
            }),
            update_mask: None,
        })
        .await
        .unwrap();
    let ids = fixed.wait_events(1, Duration::from_secs(5)).await;
    assert_eq!(ids, vec!["moved-1".to_string()]);
    // The same payload (same webhook-id), carried over to the new target.
    assert_eq!(
        fixed.requests()[0].header("webhook-id"),
        failing.requests()[0].header("webhook-id")
    );
    let d = deliveries(&mut admin, &w.id).await;
    assert_eq!(d.len(), 1);
    let codes: Vec<u32> = d[0].attempts.iter().map(|a| a.status_code).collect();
    assert_eq!(codes.last(), Some(&200), "{codes:?}");
    assert!(
        codes[..codes.len() - 1].iter().all(|c| *c == 500),
        "{codes:?}"
    );
}
