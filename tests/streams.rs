//! Streams are bounded, on a real server: 300 WatchDeliveries streams of one
//! token against `limits.max_streams_per_token = 50` get 50 streams and 250
//! refusals while health stays SERVING and unary calls are served; an open
//! stream counts against `limits.max_concurrent_requests` for as long as it
//! is open (not only until its headers); StreamEvents counts too. A watcher
//! sees only its account and is told how many outcomes it missed when it
//! falls behind. A connection with no request open is closed after
//! `limits.connection_idle_timeout_ms`.

use std::time::{Duration, Instant};

use crate::common::*;
use tokio::io::AsyncReadExt;
use tonic::transport::Channel;
use tonic::Code;
use webhook_router::proto::v1::webhook_admin_client::WebhookAdminClient;

async fn open_watch(
    admin: &mut Admin,
) -> Result<tonic::Streaming<WatchDeliveriesResponse>, tonic::Status> {
    admin
        .watch_deliveries(WatchDeliveriesRequest {
            account_id: 1010,
            webhook_id: String::new(),
        })
        .await
        .map(|r| r.into_inner())
}

async fn health_status(server: &TestServer) -> i32 {
    let mut health = tonic_health::pb::health_client::HealthClient::new(server.channel().await);
    health
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("health answers")
        .into_inner()
        .status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn streams_past_the_per_token_limit_are_refused() {
    const STREAMS: usize = 300;
    let (_dir, server, mut admin, _ingest) = setup_with(|c| {
        c.limits.max_streams_per_token = 50;
        c.limits.max_concurrent_requests = 512;
    })
    .await;
    // Over several connections, as many clients would.
    let mut clients = Vec::new();
    for _ in 0..6 {
        clients.push(server.admin(ADMIN).await);
    }
    let tasks: Vec<_> = (0..STREAMS)
        .map(|i| {
            let mut admin = clients[i % clients.len()].clone();
            tokio::spawn(async move { open_watch(&mut admin).await })
        })
        .collect();
    let mut open = Vec::new();
    let mut refused = Vec::new();
    for t in tasks {
        match t.await.unwrap() {
            Ok(s) => open.push(s),
            Err(status) => refused.push(status),
        }
    }
    assert_eq!(open.len(), 50, "streams open");
    assert_eq!(refused.len(), STREAMS - 50);
    for s in &refused {
        assert!(
            matches!(s.code(), Code::ResourceExhausted | Code::Unavailable),
            "{s:?}"
        );
    }
    assert!(refused[0]
        .message()
        .contains("limits.max_streams_per_token"));
    assert_eq!(health_status(&server).await, 1, "SERVING");
    // Unary calls of the same token are served.
    admin
        .list_webhooks(ListWebhooksRequest {
            account_id: 1010,
            ..Default::default()
        })
        .await
        .expect("a unary call while the token holds 50 streams");
    // Another token is not affected by this token's streams.
    let mut other = server.admin(ADMIN_1010).await;
    open_watch(&mut other)
        .await
        .expect("another token opens a stream");
    // Closing streams frees their places.
    open.truncate(40);
    let deadline = Instant::now() + Duration::from_secs(5);
    let again = loop {
        match open_watch(&mut admin).await {
            Ok(s) => break s,
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            Err(e) => panic!("a closed stream did not free its place: {e}"),
        }
    };
    drop((open, again));
    server.stop().await.unwrap();
}

#[tokio::test]
async fn an_open_stream_counts_against_the_concurrency_limit_for_its_life() {
    let (_dir, server, mut admin, mut ingest) = setup_with(|c| {
        c.limits.max_concurrent_requests = 3;
        c.limits.max_streams_per_token = 100;
    })
    .await;
    let watch_a = open_watch(&mut admin).await.expect("first stream");
    let watch_b = open_watch(&mut admin).await.expect("second stream");
    // A StreamEvents stream of the ingest token, held open.
    let (tx, rx) = tokio::sync::mpsc::channel::<StreamEventsRequest>(1);
    let events = ingest
        .stream_events(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("a StreamEvents stream")
        .into_inner();
    // Three streams hold the three places long after their headers went out.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let shed = admin
        .list_event_types(ListEventTypesRequest::default())
        .await
        .expect_err("a fourth request while three streams are open");
    assert_eq!(shed.code(), Code::Unavailable, "{shed:?}");
    assert!(shed.message().contains("limits.max_concurrent_requests"));
    assert_eq!(health_status(&server).await, 1, "health is exempt");
    // Closing the streams frees the places.
    drop((watch_a, watch_b, tx, events));
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match admin
            .list_event_types(ListEventTypesRequest::default())
            .await
        {
            Ok(_) => break,
            Err(e) if Instant::now() < deadline && e.code() == Code::Unavailable => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            Err(e) => panic!("not served after the streams closed: {e}"),
        }
    }
    server.stop().await.unwrap();
}

#[tokio::test]
async fn a_watcher_sees_its_account_only_and_is_told_what_it_missed() {
    // Well over the server's per-account buffer (1,024) plus what HTTP/2 flow
    // control windows hold, so an unread watcher must fall behind.
    const EVENTS: usize = 3_000;
    let (_dir, server, mut admin, mut ingest) =
        setup_with(|c| c.delivery.max_events_per_payload = 1).await;
    let listener = Listener::ok().await;
    let mine = create(
        &mut admin,
        1010,
        webhook("mine", &listener.url(), &["COURSE_ENROLLMENT"], no_auth()),
    )
    .await;
    let theirs = create(
        &mut admin,
        1011,
        webhook("theirs", &listener.url(), &["COURSE_ENROLLMENT"], no_auth()),
    )
    .await;
    // Opened, then not read while 3,000 outcomes happen. On a stream with the
    // smallest HTTP/2 window (64 KiB; the client's default is 2 MiB, thousands
    // of outcomes), so what the transport holds stays small. The connection
    // window stays at its default: h2 clients size their budget for buffered
    // small DATA frames from it, and a 64 KiB one ends the connection
    // (ENHANCE_YOUR_CALM) after ~400 unread outcomes.
    let narrow = Channel::from_shared(format!("http://{}", server.addr))
        .unwrap()
        .initial_stream_window_size(65_535)
        .connect()
        .await
        .unwrap();
    let mut watcher = WebhookAdminClient::with_interceptor(narrow, bearer(ADMIN));
    let mut watch = open_watch(&mut watcher).await.unwrap();
    for chunk in 0..(EVENTS / 100) {
        for account in [1010, 1011] {
            let batch = (0..100)
                .map(|i| {
                    event(
                        &format!("w{account}-{chunk}-{i}"),
                        "COURSE_ENROLLMENT",
                        i as u64,
                    )
                })
                .collect();
            publish(&mut ingest, account, batch).await;
        }
    }
    listener
        .wait_events(2 * EVENTS, Duration::from_secs(60))
        .await;
    assert_eq!(listener.event_ids().len(), 2 * EVENTS);
    // Now read what the watcher got: deliveries of its account, and at least
    // one message saying how many it missed.
    let mut delivered = 0u64;
    let mut missed = 0u64;
    let mut markers = 0;
    while delivered + missed < EVENTS as u64 {
        let msg = tokio::time::timeout(Duration::from_secs(5), watch.message())
            .await
            .expect("the watcher has everything accounted for")
            .unwrap()
            .unwrap();
        match msg.delivery {
            Some(d) => {
                assert_eq!(d.account_id, 1010, "another account's outcome");
                assert_eq!(d.webhook_id, mine.id);
                assert_ne!(d.webhook_id, theirs.id);
                delivered += 1;
            }
            None => {
                assert!(msg.missed_count > 0, "an empty message: {msg:?}");
                missed += msg.missed_count;
                markers += 1;
            }
        }
    }
    println!(
        "watcher: {delivered} outcomes received, {missed} reported missed in {markers} markers"
    );
    assert!(markers >= 1, "a watcher that fell behind was not told");
    assert_eq!(delivered + missed, EVENTS as u64);
    drop(watch);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn idle_connections_are_closed_and_busy_ones_kept() {
    let (_dir, server, mut admin, _ingest) =
        setup_with(|c| c.limits.connection_idle_timeout_ms = 500).await;
    // A stream open longer than the idle timeout keeps its connection busy;
    // opened first, so the admin client's connection is never idle below.
    let mut watch = open_watch(&mut admin).await.unwrap();
    // A connection that never sends a request is closed by the server.
    let mut idle = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let started = Instant::now();
    let mut buf = [0u8; 64];
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match idle.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "an idle connection stayed open for 5 s");
    assert!(
        started.elapsed() >= Duration::from_millis(450),
        "closed before its idle timeout: {:?}",
        started.elapsed()
    );
    tokio::time::sleep(Duration::from_millis(700)).await;
    let next = tokio::time::timeout(Duration::from_millis(200), watch.message()).await;
    assert!(
        next.is_err(),
        "the stream ended while open (idle timeout applied to a busy connection): {next:?}"
    );
    drop(watch);
    // A client whose connection was closed while idle just carries on.
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    admin
        .list_event_types(ListEventTypesRequest::default())
        .await
        .expect("a call after the idle connection was closed");
    server.stop().await.unwrap();
}
