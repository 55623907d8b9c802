//! The real binary, killed and restarted on the same data folder: pending and
//! retrying deliveries resume and every acknowledged event arrives.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::common::process::RouterProcess as Router;
use crate::common::*;
use webhook_router::proto::v1::event_ingest_client::EventIngestClient;
use webhook_router::proto::v1::webhook_admin_client::WebhookAdminClient;

fn write_config(dir: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("config.toml");
    let text = format!(
        r#"listen = "127.0.0.1:0"
data_dir = "{data}"
shutdown_grace_ms = 2000

[delivery]
allow_private_targets = true
retry_initial_ms = 200
retry_max_interval_ms = 500

[[tokens]]
token = "{ADMIN}"
role = "admin"

[[tokens]]
token = "{INGEST}"
role = "ingest"
"#,
        data = dir.join("data").display()
    );
    std::fs::write(&path, text).unwrap();
    path
}

#[tokio::test]
async fn sigkill_with_retrying_deliveries_then_restart_delivers_everything() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path());
    let healthy = Arc::new(AtomicBool::new(false));
    let listener = Listener::toggled(healthy.clone()).await;

    let mut router = Router::start(&config);
    let mut admin = WebhookAdminClient::with_interceptor(router.channel().await, bearer(ADMIN));
    let mut ingest = EventIngestClient::with_interceptor(router.channel().await, bearer(INGEST));
    let w = create(
        &mut admin,
        1010,
        webhook("r", &listener.url(), &["COURSE_ENROLLMENT"], no_auth()),
    )
    .await;
    let mut expected = Vec::new();
    for batch in 0..3 {
        let events: Vec<Event> = (0..10)
            .map(|i| {
                let id = format!("k-{batch}-{i}");
                expected.push(id.clone());
                event(&id, "COURSE_ENROLLMENT", i)
            })
            .collect();
        publish(&mut ingest, 1010, events).await;
    }
    // Wait until the head payload has failed a few times (state RETRYING).
    listener
        .wait_until(Duration::from_secs(10), |r| r.len() >= 3)
        .await;
    let first_id = listener.requests()[0].header("webhook-id");
    router.signal("-KILL");
    router.wait_exit(Duration::from_secs(5));
    drop(router);

    healthy.store(true, Ordering::SeqCst);
    let failed_before = listener.requests().len();
    let mut router = Router::start(&config);
    // Count only what arrived after the restart: the failed requests before
    // it carried event ids too.
    let got = listener
        .wait_until(Duration::from_secs(20), |r| {
            r.len() > failed_before
                && r[failed_before..]
                    .iter()
                    .map(|x| x.event_ids().len())
                    .sum::<usize>()
                    >= 30
        })
        .await;
    let delivered: Vec<String> = listener.requests()[failed_before..]
        .iter()
        .flat_map(|r| r.event_ids())
        .collect();
    let mut firsts = Vec::new();
    for id in &delivered {
        if !firsts.contains(id) {
            firsts.push(id.clone());
        }
    }
    assert_eq!(
        firsts,
        expected,
        "every acknowledged event, in order ({} requests seen)",
        got.len()
    );
    // The payload that was retrying before the crash kept its webhook-id.
    assert_eq!(
        listener.requests()[failed_before].header("webhook-id"),
        first_id
    );

    let mut admin = WebhookAdminClient::with_interceptor(router.channel().await, bearer(ADMIN));
    let ds = deliveries(&mut admin, &w.id).await;
    let head = ds
        .iter()
        .find(|d| d.id == first_id)
        .expect("head delivery logged");
    assert!(
        head.attempts.len() >= 3,
        "attempts before and after the crash: {}",
        head.attempts.len()
    );
    assert_eq!(head.state, DeliveryState::Delivered as i32);

    // SIGTERM: drains and exits 0.
    router.signal("-TERM");
    let status = router.wait_exit(Duration::from_secs(15));
    assert!(status.success(), "exit status {status:?}");
}
