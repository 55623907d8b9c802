//! The delivery mode is fixed when an event is published: events queued for
//! a webhook are delivered exactly once even when a restart brings a catalog
//! in which their type moved from real time to batch, or is gone. A real
//! server, stopped and started again on the same sled folder.

use std::collections::HashMap;
use std::time::Duration;

use crate::common::*;
use webhook_router::config::{Config, EventTypeConfig, ModeConfig};

fn with_badge(dir: &std::path::Path, mode: Option<ModeConfig>) -> Config {
    let mut c = test_config(dir);
    c.delivery.batch_interval_ms = 200;
    if let Some(mode) = mode {
        c.event_types = vec![EventTypeConfig {
            name: "BADGE_AWARDED".into(),
            mode,
            description: "A learner earned a badge.".into(),
        }];
    }
    c
}

fn badges(prefix: &str, n: usize) -> Vec<Event> {
    (0..n)
        .map(|i| event(&format!("{prefix}-{i}"), "BADGE_AWARDED", i as u64))
        .collect()
}

async fn retire(admin: &mut Admin, id: &str, active: bool) {
    if active {
        admin
            .activate_webhook(ActivateWebhookRequest {
                account_id: 1010,
                webhook_id: id.into(),
            })
            .await
            .unwrap();
    } else {
        admin
            .retire_webhook(RetireWebhookRequest {
                account_id: 1010,
                webhook_id: id.into(),
            })
            .await
            .unwrap();
    }
}

/// Every event id received, with how often.
fn counts(listener: &Listener) -> HashMap<String, usize> {
    let mut out = HashMap::new();
    for id in listener.event_ids() {
        *out.entry(id).or_default() += 1;
    }
    out
}

#[tokio::test]
async fn queued_events_keep_their_mode_across_a_catalog_change() {
    let dir = tempfile::tempdir().unwrap();
    let listener = Listener::ok().await;

    // 1. BADGE_AWARDED is real time; 5 of them queue for a retired webhook.
    let server = TestServer::start(with_badge(dir.path(), Some(ModeConfig::Realtime))).await;
    let mut admin = server.admin(ADMIN).await;
    let mut ingest = server.ingest(INGEST).await;
    let w = create(
        &mut admin,
        1010,
        webhook("badges", &listener.url(), &["BADGE_AWARDED"], no_auth()),
    )
    .await;
    retire(&mut admin, &w.id, false).await;
    publish(&mut ingest, 1010, badges("rt", 5)).await;
    server.stop().await.unwrap();

    // 2. Restarted with BADGE_AWARDED in batch mode: the queued ones go out
    //    (on the real-time lane they were published for), new ones on batch.
    let server = TestServer::start(with_badge(dir.path(), Some(ModeConfig::Batch))).await;
    let mut admin = server.admin(ADMIN).await;
    let mut ingest = server.ingest(INGEST).await;
    retire(&mut admin, &w.id, true).await;
    publish(&mut ingest, 1010, badges("batch", 5)).await;
    listener.wait_events(10, Duration::from_secs(10)).await;

    // 3. Retired again, 3 more queue; restarted with the type gone from the
    //    catalog: what was queued is still delivered.
    retire(&mut admin, &w.id, false).await;
    publish(&mut ingest, 1010, badges("gone", 3)).await;
    server.stop().await.unwrap();
    let server = TestServer::start(with_badge(dir.path(), None)).await;
    let mut admin = server.admin(ADMIN).await;
    retire(&mut admin, &w.id, true).await;
    listener.wait_events(13, Duration::from_secs(10)).await;
    // Long enough for a repeat to show up.
    tokio::time::sleep(Duration::from_millis(800)).await;

    let got = counts(&listener);
    let mut want: Vec<String> = badges("rt", 5)
        .into_iter()
        .chain(badges("batch", 5))
        .chain(badges("gone", 3))
        .map(|e| e.event_id)
        .collect();
    want.sort();
    let mut ids: Vec<String> = got.keys().cloned().collect();
    ids.sort();
    assert_eq!(ids, want, "every queued event delivered");
    let repeated: Vec<_> = got.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        repeated.is_empty(),
        "delivered more than once: {repeated:?}"
    );
    // The real-time ones went out at once, the batch ones together.
    let requests = listener.requests();
    let batch_payload = requests
        .iter()
        .find(|r| r.event_ids().iter().any(|id| id.starts_with("batch-")))
        .unwrap();
    assert_eq!(batch_payload.event_ids().len(), 5, "batched together");
    server.stop().await.unwrap();
}
