//! Delivery end to end: real router, real sled folder, real HTTP listeners.

mod common;

use std::time::Duration;

use common::*;

#[tokio::test]
async fn delivers_the_documented_body_and_headers() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(test_config(dir.path())).await;
    let listener = Listener::ok().await;
    let mut admin = server.admin(ADMIN).await;
    let w = create(&mut admin, 1010, webhook("crm", &listener.url(), &["COURSE_ENROLLMENT"], no_auth())).await;
    let mut ingest = server.ingest(INGEST).await;
    let r = publish(&mut ingest, 1010, vec![event("ev-1", "COURSE_ENROLLMENT", 4279332)]).await;
    assert_eq!(r.results[0].event_id, "ev-1");
    assert!(!r.results[0].duplicate);
    let reqs = listener.wait_until(Duration::from_secs(10), |r| !r.is_empty()).await;
    assert_eq!(reqs.len(), 1, "one request");
    let req = &reqs[0];
    assert_eq!(
        std::str::from_utf8(&req.body).unwrap(),
        r#"{"accountId":1010,"events":[{"eventId":"ev-1","eventName":"COURSE_ENROLLMENT","timestamp":1727414643000,"eventInfo":"info","data":{"loId":"course:4279332","userId":4279332}}]}"#
    );
    assert_eq!(req.header("content-type"), "application/json");
    assert!(req.header("webhook-id").starts_with("msg_"));
    let ts: i64 = req.header("webhook-timestamp").parse().unwrap();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    assert!((now - ts).abs() < 30);
    assert_eq!(req.header("user-agent"), format!("webhook-router/{}", env!("CARGO_PKG_VERSION")));
    assert!(req.header("webhook-signature").is_empty());
    let _ = w;
    server.stop().await.unwrap();
}
