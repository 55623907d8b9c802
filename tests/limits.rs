//! Request limits through a real router: the per-token rate limit answers
//! RESOURCE_EXHAUSTED to the noisy token while another token is served; the
//! concurrency limit sheds requests past `limits.max_concurrent_requests`
//! with UNAVAILABLE (health checks exempt); a request over
//! `limits.max_request_bytes` is refused as INVALID_ARGUMENT naming the key,
//! while a full request of maximal events under it is accepted.

use std::time::{Duration, Instant};

use crate::common::*;
use prost::Message;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;

fn big_event(id: &str, target_bytes: usize) -> Event {
    use prost_types::{value::Kind, Struct, Value};
    let mut e = event(id, "COURSE_ENROLLMENT", 1);
    let mut fill = |n: usize| {
        let mut fields = std::collections::BTreeMap::new();
        fields.insert(
            "blob".to_string(),
            Value {
                kind: Some(Kind::StringValue("x".repeat(n))),
            },
        );
        e.data = Some(Struct {
            fields: fields.into_iter().collect(),
        });
        e.encoded_len()
    };
    let base = fill(target_bytes - 100);
    let size = fill(target_bytes - 100 + (target_bytes - base));
    // Varint length prefixes may shift by a byte; come down to the target.
    let mut n = target_bytes - 100 + (target_bytes - base);
    let mut s = size;
    while s > target_bytes {
        n -= 1;
        s = fill(n);
    }
    e
}

#[tokio::test]
async fn noisy_token_is_rate_limited_while_another_token_is_served() {
    let (_dir, server, _admin, mut noisy) = setup_with(|c| {
        c.limits.requests_per_second_per_token = 5;
        c.limits.request_burst_per_token = 5;
    })
    .await;
    let mut quiet = server.ingest(INGEST_1010).await;

    // The noisy producer sends 30 requests as fast as it can.
    let mut ok = 0;
    let mut limited = Vec::new();
    let started = Instant::now();
    for i in 0..30 {
        match noisy
            .publish_events(PublishEventsRequest {
                account_id: 1010,
                events: vec![event(&format!("noisy-{i}"), "COURSE_ENROLLMENT", i)],
            })
            .await
        {
            Ok(_) => ok += 1,
            Err(s) => {
                assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
                assert!(
                    s.message().contains("limits.requests_per_second_per_token"),
                    "{}",
                    s.message()
                );
                limited.push(i);
            }
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    eprintln!(
        "noisy token: {ok} accepted, {} refused in {elapsed:.2} s",
        limited.len()
    );
    // The burst of 5, plus at most what refilled meanwhile at 5/s.
    let most = 5 + (elapsed * 5.0).ceil() as usize;
    assert!((5..=most).contains(&ok), "accepted {ok}, at most {most}");
    assert!(!limited.is_empty());

    // The other token has its own budget: every one of its calls is served.
    for i in 0..5 {
        publish(
            &mut quiet,
            1010,
            vec![event(&format!("quiet-{i}"), "COURSE_ENROLLMENT", i)],
        )
        .await;
    }

    // A refused request stored nothing: its event id is still new.
    let first_refused = limited[0];
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let r = publish(
        &mut noisy,
        1010,
        vec![event(
            &format!("noisy-{first_refused}"),
            "COURSE_ENROLLMENT",
            1,
        )],
    )
    .await;
    assert!(!r.results[0].duplicate, "refused request left nothing");

    // StreamEvents messages count one by one: a long stream is cut with
    // RESOURCE_EXHAUSTED once the budget is spent.
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let (tx, rx) = tokio::sync::mpsc::channel(128);
    let sent = 60;
    let stream_started = Instant::now();
    for i in 0..sent {
        tx.send(StreamEventsRequest {
            account_id: 1010,
            events: vec![event(&format!("stream-{i}"), "COURSE_ENROLLMENT", i)],
        })
        .await
        .unwrap();
    }
    drop(tx);
    let mut answers = noisy
        .stream_events(ReceiverStream::new(rx))
        .await
        .expect("stream opens within budget")
        .into_inner();
    let mut answered = 0;
    let end = loop {
        match answers.message().await {
            Ok(Some(_)) => answered += 1,
            Ok(None) => break None,
            Err(s) => break Some(s),
        }
    };
    let status = end.expect("the stream is cut by the rate limit");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    // The stream's opening call and each message cost one: 5 in the bucket.
    let most = 4 + (stream_started.elapsed().as_secs_f64() * 5.0).ceil() as usize;
    assert!(
        (3..=most).contains(&answered) && answered < sent as usize,
        "answered {answered}, at most {most}"
    );
    server.stop().await.unwrap();
}

/// Starts a PublishEvents call whose request body stays open, so the server
/// holds the call (it waits for the end of the unary request) until `hold`
/// is dropped.
async fn held_call(
    server: &TestServer,
) -> (
    tokio::sync::mpsc::Sender<PublishEventsRequest>,
    tokio::task::JoinHandle<Result<(), tonic::Status>>,
) {
    let channel = server.channel().await;
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(PublishEventsRequest {
        account_id: 1010,
        events: vec![event("held", "COURSE_ENROLLMENT", 1)],
    })
    .await
    .unwrap();
    let task = tokio::spawn(async move {
        let mut grpc = tonic::client::Grpc::new(channel);
        grpc.ready()
            .await
            .map_err(|e| tonic::Status::unknown(e.to_string()))?;
        let mut req = tonic::Request::new(ReceiverStream::new(rx));
        req.metadata_mut()
            .insert("authorization", format!("Bearer {INGEST}").parse().unwrap());
        let codec =
            tonic_prost::ProstCodec::<PublishEventsRequest, PublishEventsResponse>::default();
        grpc.client_streaming(
            req,
            http::uri::PathAndQuery::from_static("/webhooks.v1.EventIngest/PublishEvents"),
            codec,
        )
        .await
        .map(drop)
    });
    (tx, task)
}

#[tokio::test]
async fn requests_past_the_concurrency_limit_are_shed_with_unavailable() {
    let (_dir, server, mut admin, _ingest) =
        setup_with(|c| c.limits.max_concurrent_requests = 2).await;
    let (hold_a, call_a) = held_call(&server).await;
    let (hold_b, call_b) = held_call(&server).await;

    // Once both are in progress, the next request is shed at once.
    let deadline = Instant::now() + Duration::from_secs(10);
    let shed = loop {
        let r = admin
            .list_event_types(ListEventTypesRequest::default())
            .await;
        match r {
            Err(s) if s.code() == Code::Unavailable => break s,
            _ if Instant::now() > deadline => panic!("never shed: {r:?}"),
            _ => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    };
    assert!(
        shed.message().contains("limits.max_concurrent_requests"),
        "{}",
        shed.message()
    );
    // Health checks are exempt.
    let mut health = tonic_health::pb::health_client::HealthClient::new(server.channel().await);
    let h = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("health answers while overloaded")
        .into_inner();
    assert_eq!(h.status, 1, "SERVING");

    // Ending the held calls frees their slots; the held events were stored.
    drop((hold_a, hold_b));
    call_a.await.unwrap().expect("held call completes");
    call_b.await.unwrap().expect("held call completes");
    admin
        .list_event_types(ListEventTypesRequest::default())
        .await
        .expect("served again once below the limit");
    server.stop().await.unwrap();
}

#[tokio::test]
async fn request_size_limit_accepts_full_requests_and_names_the_key_past_it() {
    // 100 events of 64 KiB: a full request of maximal events (6.4 MB) fits
    // the default 16 MiB limit and is accepted.
    let (_dir, server, _admin, mut ingest) = setup_with(|c| {
        c.limits.max_events_per_request = 100;
        c.limits.max_event_bytes = 65_536;
    })
    .await;
    let events: Vec<Event> = (0..100)
        .map(|i| big_event(&format!("max-{i}"), 65_536))
        .collect();
    assert!(events.iter().all(|e| e.encoded_len() == 65_536));
    let request = PublishEventsRequest {
        account_id: 1010,
        events,
    };
    eprintln!("full request: {} bytes", request.encoded_len());
    let r = ingest
        .publish_events(request.clone())
        .await
        .expect("a full request of maximal events is accepted")
        .into_inner();
    assert_eq!(r.results.len(), 100);
    server.stop().await.unwrap();

    // With limits.max_request_bytes = 1 MiB the same request is refused
    // before decoding, with INVALID_ARGUMENT naming the key, nothing stored.
    let (_dir, server, _admin, mut ingest) = setup_with(|c| {
        c.limits.max_events_per_request = 100;
        c.limits.max_event_bytes = 65_536;
        c.limits.max_request_bytes = 1024 * 1024;
    })
    .await;
    let s = ingest
        .publish_events(request.clone())
        .await
        .expect_err("over max_request_bytes");
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
    assert!(
        s.message().starts_with("request: is too large")
            && s.message().contains("limits.max_request_bytes"),
        "{}",
        s.message()
    );
    // The server keeps serving, and none of those events was stored.
    let r = publish(&mut ingest, 1010, request.events[..10].to_vec()).await;
    assert!(r.results.iter().all(|x| !x.duplicate));
    server.stop().await.unwrap();
}
