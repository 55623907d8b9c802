//! `max_in_flight`: a webhook that does not need order receives several
//! payloads at once; a failing payload retries on its own while the others
//! go on; restarts resume what was retrying; the default stays one at a time.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::*;
use webhook_router::proto::v1::{
    CreateWebhookRequest, Delivery, DeliveryState, GetWebhookRequest, UpdateWebhookRequest,
};

/// Each request is held this long before the answer.
const HOLD: Duration = Duration::from_millis(300);

/// Most requests that were open at the same moment, from arrival times
/// (each request is held [`HOLD`] after it arrived).
fn most_at_once(reqs: &[Received]) -> usize {
    let held = HOLD - Duration::from_millis(20);
    reqs.iter()
        .map(|r| {
            reqs.iter()
                .filter(|o| o.at <= r.at && r.at.duration_since(o.at) < held)
                .count()
        })
        .max()
        .unwrap_or(0)
}

fn ids(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i:03}")).collect()
}

async fn publish_ids(ingest: &mut Ingest, ids: &[String]) {
    let events = ids
        .iter()
        .enumerate()
        .map(|(i, id)| event(id, "COURSE_ENROLLMENT", i as u64))
        .collect();
    publish(ingest, 1010, events).await;
}

/// A COURSE_ENROLLMENT webhook of account 1010 to `url`, `max_in_flight` n.
async fn create_wide(admin: &mut Admin, url: &str, n: u32) -> webhook_router::proto::v1::Webhook {
    let mut w = webhook("wide", url, &["COURSE_ENROLLMENT"], no_auth());
    w.max_in_flight = n;
    create(admin, 1010, w).await
}

#[tokio::test]
async fn max_in_flight_sends_side_by_side_and_the_default_one_at_a_time() {
    let (_dir, server, mut admin, mut ingest) =
        setup_with(|c| c.delivery.max_events_per_payload = 1).await;
    let hold = Arc::new(|_, _: &Received| (200, vec![], HOLD));
    let wide = Listener::start(hold.clone()).await;
    let strict = Listener::start(hold).await;
    let w = create_wide(&mut admin, &wide.url(), 4).await;
    assert_eq!(w.max_in_flight, 4, "returned as stored");
    create(
        &mut admin,
        1010,
        webhook("strict", &strict.url(), &["COURSE_ENROLLMENT"], no_auth()),
    )
    .await;
    let sent = ids("c", 12);
    publish_ids(&mut ingest, &sent).await;

    let started = Instant::now();
    let got = wide
        .wait_until(Duration::from_secs(20), |r| r.len() >= 12)
        .await;
    let wide_took = started.elapsed();
    let arrived: HashSet<String> = got.iter().flat_map(|r| r.event_ids()).collect();
    assert_eq!(got.len(), 12, "one request per event, none repeated");
    assert_eq!(arrived, sent.iter().cloned().collect::<HashSet<_>>());
    let at_once = most_at_once(&got);
    assert_eq!(at_once, 4, "max_in_flight 4: requests open at once");
    // 12 payloads held 300 ms each, 4 at a time: about 0.9 s, not 3.6 s.
    assert!(
        wide_took < Duration::from_millis(2_500),
        "12 payloads of 300 ms, 4 at a time, took {wide_took:?}"
    );
    let ids_sent: HashSet<String> = got.iter().map(|r| r.header("webhook-id")).collect();
    assert_eq!(ids_sent.len(), 12, "one webhook-id per payload");

    let got = strict
        .wait_until(Duration::from_secs(20), |r| r.len() >= 12)
        .await;
    assert_eq!(most_at_once(&got), 1, "the default: one request at a time");
    let order: Vec<String> = got.iter().flat_map(|r| r.event_ids()).collect();
    assert_eq!(order, sent, "the default keeps publish order");
    server.stop().await.unwrap();
}

#[tokio::test]
async fn a_failing_payload_retries_on_its_own_while_the_others_go_on() {
    let (_dir, server, mut admin, mut ingest) =
        setup_with(|c| c.delivery.max_events_per_payload = 1).await;
    // c-002 fails its first two attempts; everything else is answered at once.
    let failures = Arc::new(std::sync::Mutex::new(0));
    let f = failures.clone();
    let listener = Listener::start(Arc::new(move |_, r: &Received| {
        if r.event_ids() == ["c-002"] {
            let mut n = f.lock().unwrap();
            *n += 1;
            if *n <= 2 {
                return (503, vec![], Duration::ZERO);
            }
        }
        (200, vec![], Duration::ZERO)
    }))
    .await;
    let w = create_wide(&mut admin, &listener.url(), 8).await;
    let sent = ids("c", 20);
    publish_ids(&mut ingest, &sent).await;
    let got = listener
        .wait_until(Duration::from_secs(20), |r| {
            r.iter()
                .any(|r| r.event_ids() == ["c-002"] && *failures.lock().unwrap() >= 3)
        })
        .await;
    let attempts: Vec<&Received> = got.iter().filter(|r| r.event_ids() == ["c-002"]).collect();
    assert_eq!(attempts.len(), 3, "two failures, then the success");
    let msg_ids: HashSet<String> = attempts.iter().map(|r| r.header("webhook-id")).collect();
    assert_eq!(msg_ids.len(), 1, "retries keep the payload's webhook-id");
    // The others did not wait for its retries (the first retry waits 200 ms).
    let first_failure = attempts[0].at;
    let success = attempts[2].at;
    let others_before: usize = got
        .iter()
        .filter(|r| r.event_ids() != ["c-002"] && r.at < success)
        .count();
    assert_eq!(
        others_before, 19,
        "every other payload arrived before c-002's retries succeeded ({:?} after its first failure)",
        success - first_failure
    );
    let arrived: Vec<String> = got.iter().flat_map(|r| r.event_ids()).collect();
    let unique: HashSet<&String> = arrived.iter().collect();
    assert_eq!(unique.len(), 20, "every event arrived");
    assert_eq!(arrived.len(), 22, "only c-002 was sent again");

    // The delivery log: 20 delivered, c-002's with its three attempts.
    let deadline = Instant::now() + Duration::from_secs(10);
    let log: Vec<Delivery> = loop {
        let log = deliveries(&mut admin, &w.id).await;
        if log.len() >= 20 || Instant::now() > deadline {
            break log;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(log.len(), 20, "{log:#?}");
    assert!(log
        .iter()
        .all(|d| d.state == DeliveryState::Delivered as i32));
    let retried = log.iter().find(|d| d.event_ids == ["c-002"]).unwrap();
    assert_eq!(retried.attempts.len(), 3);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn retrying_payloads_resume_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    config.delivery.max_events_per_payload = 1;
    config.delivery.retry_initial_ms = 300;
    let healthy = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let listener = Listener::toggled(healthy.clone()).await;
    let server = TestServer::start(config.clone()).await;
    let mut admin = server.admin(ADMIN).await;
    let mut ingest = server.ingest(INGEST).await;
    let w = create_wide(&mut admin, &listener.url(), 4).await;
    let sent = ids("r", 10);
    publish_ids(&mut ingest, &sent).await;
    // Four payloads fail side by side and wait for their retries.
    let got = listener
        .wait_until(Duration::from_secs(10), |r| {
            r.iter()
                .flat_map(|r| r.event_ids())
                .collect::<HashSet<_>>()
                .len()
                >= 4
        })
        .await;
    let first: HashSet<String> = got.iter().flat_map(|r| r.event_ids()).collect();
    assert_eq!(first.len(), 4, "four payloads in flight: {first:?}");
    let ids_before: HashMap<String, String> = got
        .iter()
        .map(|r| (r.event_ids()[0].clone(), r.header("webhook-id")))
        .collect();
    server.stop().await.unwrap();

    healthy.store(true, std::sync::atomic::Ordering::SeqCst);
    let restarted = Instant::now();
    let server = TestServer::start(config).await;
    let after_restart = |r: &[Received]| -> Vec<Received> {
        r.iter().filter(|r| r.at >= restarted).cloned().collect()
    };
    let got = listener
        .wait_until(Duration::from_secs(20), |r| {
            let ids: HashSet<String> = after_restart(r)
                .iter()
                .flat_map(|r| r.event_ids())
                .collect();
            ids.len() >= 10
        })
        .await;
    let after = after_restart(&got);
    let delivered: HashSet<String> = after.iter().flat_map(|r| r.event_ids()).collect();
    assert_eq!(
        delivered,
        sent.iter().cloned().collect::<HashSet<_>>(),
        "every event after the restart"
    );
    for r in &after {
        let e = &r.event_ids()[0];
        if let Some(id) = ids_before.get(e) {
            assert_eq!(
                &r.header("webhook-id"),
                id,
                "{e} kept its webhook-id across the restart"
            );
        }
    }
    let mut admin = server.admin(ADMIN).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let log = deliveries(&mut admin, &w.id).await;
        let done = log
            .iter()
            .filter(|d| d.state == DeliveryState::Delivered as i32)
            .count();
        if done == 10 {
            break;
        }
        assert!(Instant::now() < deadline, "delivery log: {log:#?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    server.stop().await.unwrap();
}

#[tokio::test]
async fn max_in_flight_is_validated_and_updatable() {
    let (_dir, server, mut admin, _ingest) = setup().await;
    let listener = Listener::ok().await;
    let err = admin
        .create_webhook(CreateWebhookRequest {
            account_id: 1010,
            webhook: Some(webhook_router::proto::v1::Webhook {
                max_in_flight: 257,
                ..webhook("w", &listener.url(), &["COURSE_ENROLLMENT"], no_auth())
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message().contains("webhook.max_in_flight") && err.message().contains("256"),
        "{}",
        err.message()
    );
    let w = create(
        &mut admin,
        1010,
        webhook("w", &listener.url(), &["COURSE_ENROLLMENT"], no_auth()),
    )
    .await;
    assert_eq!(w.max_in_flight, 0, "unset by default");
    // An empty mask sets what is non-zero.
    let updated = admin
        .update_webhook(UpdateWebhookRequest {
            account_id: 1010,
            webhook: Some(webhook_router::proto::v1::Webhook {
                id: w.id.clone(),
                max_in_flight: 16,
                ..Default::default()
            }),
            update_mask: None,
        })
        .await
        .unwrap()
        .into_inner()
        .webhook
        .unwrap();
    assert_eq!(updated.max_in_flight, 16);
    assert_eq!(updated.name, "w", "other fields kept");
    // Back to one at a time with the mask naming it.
    admin
        .update_webhook(UpdateWebhookRequest {
            account_id: 1010,
            webhook: Some(webhook_router::proto::v1::Webhook {
                id: w.id.clone(),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["max_in_flight".into()],
            }),
        })
        .await
        .unwrap();
    let got = admin
        .get_webhook(GetWebhookRequest {
            account_id: 1010,
            webhook_id: w.id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .webhook
        .unwrap();
    assert_eq!(got.max_in_flight, 0);
    server.stop().await.unwrap();
}
