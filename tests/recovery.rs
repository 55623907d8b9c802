//! RecoverDeliveries against the real server: a time window of dead
//! deliveries is requeued, a recovery closed half way stops, and running it
//! again requeues only the rest; nothing is requeued twice.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::common::*;
use tonic::Code;

/// A listener answering 410 Gone (a delivery dies at once and its webhook
/// is disabled) while `gone` is set, 200 after.
async fn gone_listener(gone: Arc<AtomicBool>) -> Listener {
    Listener::start(Arc::new(move |_, _| {
        let status = if gone.load(Ordering::SeqCst) {
            410
        } else {
            200
        };
        (status, vec![], Duration::ZERO)
    }))
    .await
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

async fn activate(admin: &mut Admin, id: &str) {
    admin
        .activate_webhook(ActivateWebhookRequest {
            account_id: 1010,
            webhook_id: id.into(),
        })
        .await
        .unwrap();
}

/// Publishes `ids` and lets each die: every dead delivery disables the
/// webhook, which is activated again once it is disabled, until all are
/// dead. Returns the dead deliveries' ids by event id.
async fn kill_each(
    admin: &mut Admin,
    ingest: &mut Ingest,
    webhook_id: &str,
    ids: &[String],
) -> HashMap<String, String> {
    let mut watch = admin
        .watch_deliveries(WatchDeliveriesRequest {
            account_id: 1010,
            webhook_id: webhook_id.into(),
        })
        .await
        .unwrap()
        .into_inner();
    let events = ids
        .iter()
        .map(|id| event(id, "COURSE_ENROLLMENT", 1))
        .collect();
    publish(ingest, 1010, events).await;
    let mut dead = HashMap::new();
    while dead.len() < ids.len() {
        let m = tokio::time::timeout(Duration::from_secs(10), watch.message())
            .await
            .expect("a delivery outcome within 10 s")
            .unwrap()
            .unwrap();
        let d = m.delivery.expect("no outcome missed");
        assert_eq!(d.state, DeliveryState::Dead as i32, "{d:?}");
        assert_eq!(d.event_ids.len(), 1, "one event per payload");
        dead.insert(d.event_ids[0].clone(), d.id);
        // The router disables the webhook right after the outcome; activate
        // it only then, or the disable would win.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while get(admin, webhook_id).await.active {
            assert!(std::time::Instant::now() < deadline, "never disabled");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        if dead.len() < ids.len() {
            activate(admin, webhook_id).await;
        }
    }
    dead
}

fn recover_request(webhook_id: &str, since_ms: i64, until_ms: i64) -> RecoverDeliveriesRequest {
    let ts = |ms: i64| prost_types::Timestamp {
        seconds: ms / 1000,
        nanos: (ms % 1000) as i32 * 1_000_000,
    };
    RecoverDeliveriesRequest {
        account_id: 1010,
        webhook_id: webhook_id.into(),
        since: Some(ts(since_ms)),
        until: Some(ts(until_ms)),
        states: vec![DeliveryState::Dead as i32],
        step_size: 0,
    }
}

/// Runs a recovery to its end; returns its messages.
async fn recover_all(
    admin: &mut Admin,
    req: RecoverDeliveriesRequest,
) -> Vec<RecoverDeliveriesResponse> {
    let mut stream = admin.recover_deliveries(req).await.unwrap().into_inner();
    let mut out = Vec::new();
    while let Some(m) = tokio::time::timeout(Duration::from_secs(30), stream.message())
        .await
        .expect("recovery progress within 30 s")
        .unwrap()
    {
        out.push(m);
    }
    out
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

fn names(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_window_is_recovered_once_even_when_cancelled_half_way() {
    let (_dir, server, mut admin, mut ingest) = setup_with(|c| {
        c.delivery.max_events_per_payload = 1;
    })
    .await;
    let gone = Arc::new(AtomicBool::new(true));
    let listener = gone_listener(gone.clone()).await;
    let w = create(
        &mut admin,
        1010,
        webhook("rec", &listener.url(), &["COURSE_ENROLLMENT"], no_auth()),
    )
    .await;

    // Dead deliveries before, inside and after the window.
    let before = names("before", 5);
    let inside = names("inside", 60);
    let after = names("after", 5);
    kill_each(&mut admin, &mut ingest, &w.id, &before).await;
    activate(&mut admin, &w.id).await;
    // Ids carry their creation millisecond: keep the groups apart.
    tokio::time::sleep(Duration::from_millis(5)).await;
    let since = now_ms();
    tokio::time::sleep(Duration::from_millis(5)).await;
    let dead_inside = kill_each(&mut admin, &mut ingest, &w.id, &inside).await;
    activate(&mut admin, &w.id).await;
    tokio::time::sleep(Duration::from_millis(5)).await;
    let until = now_ms();
    tokio::time::sleep(Duration::from_millis(5)).await;
    kill_each(&mut admin, &mut ingest, &w.id, &after).await;
    assert_eq!(dead_inside.len(), 60);

    // One delivery per step; the client closes the stream after the first
    // message, and the walk stops before the end of the window.
    let mut req = recover_request(&w.id, since, until);
    req.step_size = 1;
    let mut stream = admin
        .recover_deliveries(req.clone())
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().expect("a first message");
    assert_eq!(first.examined_count, 1);
    assert_eq!(first.requeued_count, 1);
    assert!(!first.done);
    drop(stream);

    // Run again to its end (steps of 500): it requeues what the first left.
    // Give the first run a moment to notice its closed stream, so it does
    // not race this one (racing would be safe too, but not measurable).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let second = recover_all(&mut admin, recover_request(&w.id, since, until)).await;
    let last = *second.last().unwrap();
    assert!(last.done, "{second:?}");
    assert_eq!(last.examined_count, 60, "only the window: {last:?}");
    assert_eq!(last.requeued_count + last.skipped_count, 60, "{last:?}");
    let by_first = last.skipped_count;
    eprintln!("the cancelled recovery requeued {by_first} of 60 before it stopped");
    assert!(
        (1..60).contains(&by_first),
        "the cancelled run requeued {by_first} of 60: it should have stopped half way"
    );
    let position = last.position.unwrap();
    assert!(
        position.seconds * 1000 + i64::from(position.nanos / 1_000_000) >= since,
        "{position:?}"
    );

    // A third run finds nothing left; neither does a bulk redelivery of the
    // window's deliveries (only the 10 outside it are requeued by that).
    let third = recover_all(&mut admin, recover_request(&w.id, since, until)).await;
    let last = third.last().unwrap();
    assert_eq!(
        (last.requeued_count, last.skipped_count),
        (0, 60),
        "{last:?}"
    );

    // The listener recovers: each event of the window arrives exactly once.
    let seen_before = listener.requests().len();
    gone.store(false, Ordering::SeqCst);
    activate(&mut admin, &w.id).await;
    let received = listener
        .wait_until(Duration::from_secs(20), |r| r.len() >= seen_before + 60)
        .await;
    // Nothing else was queued: wait 1 s (about 100 requests' worth on
    // loopback) for any extra request before counting.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let received = {
        let now = listener.requests();
        assert_eq!(now.len(), received.len(), "more requests than the window's");
        now
    };
    let mut got: Vec<String> = received[seen_before..]
        .iter()
        .flat_map(|r| r.event_ids())
        .collect();
    got.sort();
    let mut want = inside.clone();
    want.sort();
    assert_eq!(
        got, want,
        "each event of the window once, none from outside"
    );

    let bulk = admin
        .redeliver_events(RedeliverEventsRequest {
            account_id: 1010,
            webhook_id: w.id.clone(),
            delivery_ids: vec![],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        bulk.requeued_count, 10,
        "the 5 before and 5 after the window"
    );
    server.stop().await.unwrap();
}

#[tokio::test]
async fn recover_deliveries_checks_its_request() {
    let (_dir, server, mut admin, _ingest) = setup().await;
    let listener = Listener::ok().await;
    let w = create(
        &mut admin,
        1010,
        webhook("rec", &listener.url(), &["COURSE_ENROLLMENT"], no_auth()),
    )
    .await;
    let field = |e: tonic::Status| {
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        e.message().to_string()
    };
    let mut req = recover_request(&w.id, 2_000, 1_000);
    let e = admin.recover_deliveries(req.clone()).await.unwrap_err();
    assert!(field(e).starts_with("until: must be after since"));
    req.until = None;
    req.states = vec![DeliveryState::Delivered as i32];
    let e = admin.recover_deliveries(req.clone()).await.unwrap_err();
    let m = field(e);
    assert!(
        m.starts_with("states[0]: DELIVERY_STATE_DELIVERED cannot be recovered"),
        "{m}"
    );
    req.states.clear();
    req.step_size = 5001;
    let e = admin.recover_deliveries(req.clone()).await.unwrap_err();
    assert!(field(e).starts_with("step_size: must be at most 5000"));

    // An empty window of an existing webhook: one message, done.
    req.step_size = 0;
    let only = recover_all(&mut admin, req.clone()).await;
    assert_eq!(only.len(), 1);
    assert!(only[0].done);
    assert_eq!(only[0].examined_count, 0);

    let mut unknown = req.clone();
    unknown.webhook_id = "wh_0000000000000000000000000000".into();
    let e = admin.recover_deliveries(unknown).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");

    let mut other = server.admin(ADMIN_1011).await;
    let e = other.recover_deliveries(req.clone()).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    let mut ingest_only = server.admin(INGEST).await;
    let e = ingest_only.recover_deliveries(req).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    server.stop().await.unwrap();
}
