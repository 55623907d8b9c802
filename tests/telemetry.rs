//! Traces over OTLP/HTTP: a collector of our own on 127.0.0.1:0 (a small
//! hyper server taking POST /v1/traces, decoded with the OTLP protobuf
//! types) receives the router's spans; one trace runs from the publish call
//! (continuing the caller's `traceparent`) to every HTTP attempt. An
//! unreachable collector holds up neither publishing nor delivery, and with
//! no endpoint no exporter is built.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as Any;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::trace::v1::{span::SpanKind, status::StatusCode, Span};
use prost::Message;
use tokio::net::TcpListener;

use crate::common::process::{write_router_config, RouterProcess};
use crate::common::*;

/// A span as received, with the resource's `service.name`.
#[derive(Debug, Clone)]
struct Got {
    service: String,
    span: Span,
}

/// An OTLP/HTTP endpoint on 127.0.0.1 keeping every span it is sent.
struct Collector {
    addr: SocketAddr,
    spans: Arc<Mutex<Vec<Got>>>,
    /// Paths and content types of the requests, for the assertion messages.
    requests: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Collector {
    async fn start() -> Collector {
        let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = tcp.local_addr().unwrap();
        let spans: Arc<Mutex<Vec<Got>>> = Arc::default();
        let requests: Arc<Mutex<Vec<String>>> = Arc::default();
        let (kept, seen) = (spans.clone(), requests.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = tcp.accept().await else {
                    return;
                };
                let (kept, seen) = (kept.clone(), seen.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |req: hyper::Request<Incoming>| {
                        let (kept, seen) = (kept.clone(), seen.clone());
                        async move {
                            let (parts, body) = req.into_parts();
                            let body = body
                                .collect()
                                .await
                                .map(|b| b.to_bytes())
                                .unwrap_or_default();
                            let kind = parts
                                .headers
                                .get("content-type")
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or_default()
                                .to_string();
                            seen.lock().unwrap().push(format!(
                                "{} {} {kind}",
                                parts.method,
                                parts.uri.path()
                            ));
                            let ok = parts.method == hyper::Method::POST
                                && parts.uri.path() == "/v1/traces"
                                && kind == "application/x-protobuf";
                            let status = match ExportTraceServiceRequest::decode(body) {
                                Ok(r) if ok => {
                                    let mut kept = kept.lock().unwrap();
                                    for rs in r.resource_spans {
                                        let service = rs
                                            .resource
                                            .as_ref()
                                            .and_then(|r| string(&r.attributes, "service.name"))
                                            .unwrap_or_default();
                                        for ss in rs.scope_spans {
                                            for span in ss.spans {
                                                kept.push(Got {
                                                    service: service.clone(),
                                                    span,
                                                });
                                            }
                                        }
                                    }
                                    200
                                }
                                _ => 400,
                            };
                            Ok::<_, std::convert::Infallible>(
                                hyper::Response::builder()
                                    .status(status)
                                    .header("content-type", "application/x-protobuf")
                                    .body(Full::new(Bytes::new()))
                                    .unwrap(),
                            )
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Collector {
            addr,
            spans,
            requests,
            task,
        }
    }

    fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Waits until `n` spans named `name` arrived (or 10 s passed); returns them.
    async fn wait_spans(&self, name: &str, n: usize) -> Vec<Got> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let got: Vec<Got> = self
                .spans
                .lock()
                .unwrap()
                .iter()
                .filter(|g| g.span.name == name)
                .cloned()
                .collect();
            if got.len() >= n || Instant::now() > deadline {
                return got;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn attr<'a>(attrs: &'a [KeyValue], key: &str) -> Option<&'a Any> {
    attrs
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref())
        .and_then(|v| v.value.as_ref())
}

fn string(attrs: &[KeyValue], key: &str) -> Option<String> {
    match attr(attrs, key) {
        Some(Any::StringValue(s)) => Some(s.clone()),
        _ => None,
    }
}

fn int(attrs: &[KeyValue], key: &str) -> Option<i64> {
    match attr(attrs, key) {
        Some(Any::IntValue(i)) => Some(*i),
        _ => None,
    }
}

fn strings(attrs: &[KeyValue], key: &str) -> Vec<String> {
    match attr(attrs, key) {
        Some(Any::ArrayValue(a)) => a
            .values
            .iter()
            .filter_map(|v| match &v.value {
                Some(Any::StringValue(s)) => Some(s.clone()),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    }
}

const PUBLISH: &str = "webhooks.v1.EventIngest/PublishEvents";
const ATTEMPT: &str = "webhook delivery attempt";
/// The caller's trace, sent as `traceparent` with the first publish call.
const CALLER_TRACE: &str = "0af7651916cd43dd8448eb211c80319c";
const CALLER_SPAN: &str = "b7ad6b7169203331";

async fn publish_traced(ingest: &mut Ingest, events: Vec<Event>, traceparent: Option<&str>) {
    let mut req = tonic::Request::new(PublishEventsRequest {
        account_id: 1010,
        events,
    });
    if let Some(tp) = traceparent {
        req.metadata_mut()
            .insert("traceparent", tp.parse().unwrap());
    }
    ingest.publish_events(req).await.expect("publish");
}

#[tokio::test]
async fn one_trace_runs_from_the_publish_call_to_every_attempt() {
    let collector = Collector::start().await;
    let endpoint = collector.endpoint();
    let (_d, server, mut admin, mut ingest) = setup_with(|c| {
        c.telemetry.otlp_endpoint = Some(endpoint);
        c.telemetry.service_name = "router-under-test".into();
        // Room to publish e2 and e3 before e1's retry, so they go out together.
        c.delivery.retry_initial_ms = 1_000;
        c.delivery.retry_max_interval_ms = 1_000;
    })
    .await;
    // The first request fails, every later one succeeds.
    let listener = Listener::start(Arc::new(|n, _| {
        (if n == 0 { 503 } else { 200 }, vec![], Duration::ZERO)
    }))
    .await;
    let w = create(
        &mut admin,
        1010,
        webhook("traced", &listener.url(), &["COURSE_ENROLLMENT"], no_auth()),
    )
    .await;
    let caller = format!("00-{CALLER_TRACE}-{CALLER_SPAN}-01");
    publish_traced(
        &mut ingest,
        vec![event("e1", "COURSE_ENROLLMENT", 1)],
        Some(&caller),
    )
    .await;
    listener
        .wait_until(Duration::from_secs(10), |r| !r.is_empty())
        .await;
    // While e1 waits for its retry: two more publish calls, one event each.
    publish_traced(&mut ingest, vec![event("e2", "COURSE_ENROLLMENT", 2)], None).await;
    publish_traced(&mut ingest, vec![event("e3", "COURSE_ENROLLMENT", 3)], None).await;
    let reqs = listener
        .wait_until(Duration::from_secs(10), |r| r.len() >= 3)
        .await;
    let payloads: Vec<Vec<String>> = reqs.iter().map(|r| r.event_ids()).collect();
    assert_eq!(
        payloads,
        vec![vec!["e1"], vec!["e1"], vec!["e2", "e3"]],
        "e1 failed once, then e2 and e3 went out in one payload"
    );
    // Stopping sends the spans still waiting.
    server.stop().await.unwrap();

    let publishes = collector.wait_spans(PUBLISH, 3).await;
    let attempts = collector.wait_spans(ATTEMPT, 3).await;
    let seen = collector.requests.lock().unwrap().clone();
    assert_eq!(publishes.len(), 3, "publish spans; requests: {seen:?}");
    assert_eq!(attempts.len(), 3, "attempt spans; requests: {seen:?}");
    assert!(
        seen.iter()
            .all(|r| r == "POST /v1/traces application/x-protobuf"),
        "{seen:?}"
    );
    for g in publishes.iter().chain(&attempts) {
        assert_eq!(g.service, "router-under-test", "{:?}", g.span.name);
    }

    let publish_of = |id: &str| {
        publishes
            .iter()
            .map(|g| &g.span)
            .find(|s| strings(&s.attributes, "webhook_router.event_ids") == [id])
            .unwrap_or_else(|| panic!("no publish span for {id}: {publishes:#?}"))
    };
    let (p1, p2, p3) = (publish_of("e1"), publish_of("e2"), publish_of("e3"));
    // The first publish continues the caller's trace.
    assert_eq!(hex::encode(&p1.trace_id), CALLER_TRACE);
    assert_eq!(hex::encode(&p1.parent_span_id), CALLER_SPAN);
    assert_eq!(p1.kind, SpanKind::Server as i32);
    // The others start traces of their own.
    assert!(p2.parent_span_id.is_empty() && p3.parent_span_id.is_empty());
    assert_ne!(p2.trace_id, p1.trace_id);
    for p in [p1, p2, p3] {
        assert_eq!(int(&p.attributes, "webhook_router.account_id"), Some(1010));
        assert_eq!(int(&p.attributes, "webhook_router.event_count"), Some(1));
        assert_eq!(
            string(&p.attributes, "rpc.method").as_deref(),
            Some("PublishEvents")
        );
    }

    let mut attempts: Vec<Span> = attempts.into_iter().map(|g| g.span).collect();
    attempts.sort_by_key(|s| s.start_time_unix_nano);
    for (i, (a, r)) in attempts.iter().zip(&reqs).enumerate() {
        assert_eq!(a.kind, SpanKind::Client as i32);
        assert_eq!(int(&a.attributes, "webhook_router.account_id"), Some(1010));
        assert_eq!(
            string(&a.attributes, "webhook_router.webhook_id").as_deref(),
            Some(w.id.as_str())
        );
        // The delivery id is the webhook-id header the listener received.
        assert_eq!(
            string(&a.attributes, "webhook_router.delivery_id"),
            Some(r.header("webhook-id")),
            "attempt {i}"
        );
        assert_eq!(
            strings(&a.attributes, "webhook_router.event_ids"),
            r.event_ids()
        );
        // The listener was sent this attempt's span as its parent.
        assert_eq!(
            r.header("traceparent"),
            format!(
                "00-{}-{}-01",
                hex::encode(&a.trace_id),
                hex::encode(&a.span_id)
            ),
            "attempt {i}"
        );
    }
    let (a1, a2, a3) = (&attempts[0], &attempts[1], &attempts[2]);
    // e1's two attempts: children of e1's publish span, in the caller's trace.
    for (a, n, status) in [(a1, 1, 503), (a2, 2, 200)] {
        assert_eq!(a.trace_id, p1.trace_id, "attempt {n}");
        assert_eq!(a.parent_span_id, p1.span_id, "attempt {n}");
        assert_eq!(int(&a.attributes, "webhook_router.attempt"), Some(n));
        assert_eq!(
            int(&a.attributes, "http.response.status_code"),
            Some(status)
        );
    }
    assert_eq!(
        a1.status.as_ref().map(|s| (s.code, s.message.as_str())),
        Some((StatusCode::Error as i32, "HTTP 503"))
    );
    assert_eq!(string(&a1.attributes, "error.type").as_deref(), Some("503"));
    assert_ne!(
        a2.status.as_ref().map(|s| s.code),
        Some(StatusCode::Error as i32)
    );
    assert_eq!(
        string(&a1.attributes, "webhook_router.delivery_id"),
        string(&a2.attributes, "webhook_router.delivery_id"),
        "one delivery, two attempts"
    );
    // e2 + e3: a child of e2's publish span, linked to e3's.
    assert_eq!(a3.trace_id, p2.trace_id);
    assert_eq!(a3.parent_span_id, p2.span_id);
    assert_eq!(int(&a3.attributes, "webhook_router.attempt"), Some(1));
    assert_eq!(int(&a3.attributes, "http.response.status_code"), Some(200));
    assert_eq!(int(&a3.attributes, "webhook_router.event_count"), Some(2));
    let links: Vec<(Vec<u8>, Vec<u8>)> = a3
        .links
        .iter()
        .map(|l| (l.trace_id.clone(), l.span_id.clone()))
        .collect();
    assert_eq!(links, vec![(p3.trace_id.clone(), p3.span_id.clone())]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_collector_holds_up_neither_publishing_nor_delivery() {
    // A port nothing listens on: bound, then closed.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let dir = tempfile::tempdir().unwrap();
    let config = write_router_config(dir.path(), 2_000, "");
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str(&format!(
        "\n[telemetry]\notlp_endpoint = \"http://{closed}\"\n"
    ));
    std::fs::write(&config, text).unwrap();
    let listener = Listener::ok().await;
    let mut router = RouterProcess::start(&config);
    let mut admin = router.admin().await;
    let mut ingest = router.ingest().await;
    create(
        &mut admin,
        1010,
        webhook("w", &listener.url(), &["COURSE_ENROLLMENT"], no_auth()),
    )
    .await;
    let log_has = |router: &RouterProcess, needle: &str| {
        router
            .log_lines()
            .iter()
            .filter(|l| l.contains(needle))
            .count()
    };
    assert_eq!(log_has(&router, "exporting traces over OTLP/HTTP"), 1);
    let started = Instant::now();
    for i in 0..20 {
        publish(
            &mut ingest,
            1010,
            vec![event(&format!("a-{i}"), "COURSE_ENROLLMENT", i)],
        )
        .await;
    }
    let ids = listener.wait_events(20, Duration::from_secs(10)).await;
    assert_eq!(ids.len(), 20, "delivered before the first export: {ids:?}");
    // The exporter tries every 2 s and fails; the failure is logged.
    let deadline = Instant::now() + Duration::from_secs(15);
    while log_has(&router, "traces: cannot export spans") == 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        log_has(&router, "traces: cannot export spans"),
        1,
        "log:\n{}",
        router.log_lines().join("\n")
    );
    // During the outage: 20 more calls, each published and delivered.
    let outage = Instant::now();
    for i in 20..40 {
        publish(
            &mut ingest,
            1010,
            vec![event(&format!("a-{i}"), "COURSE_ENROLLMENT", i)],
        )
        .await;
    }
    let ids = listener.wait_events(40, Duration::from_secs(10)).await;
    assert_eq!(ids.len(), 40);
    println!(
        "40 events published and delivered; the 20 during the outage in {:?} (all: {:?})",
        outage.elapsed(),
        started.elapsed()
    );
    assert!(
        outage.elapsed() < Duration::from_secs(5),
        "{:?}",
        outage.elapsed()
    );
    // SIGTERM: the last export fails too, within the bounded wait; the
    // outage is still logged once, and what was lost is counted.
    let term = Instant::now();
    router.signal("-TERM");
    let status = router.wait_exit(Duration::from_secs(20));
    assert!(status.success(), "{status:?}");
    assert!(
        term.elapsed() < Duration::from_secs(10),
        "{:?}",
        term.elapsed()
    );
    let log = router.log_lines().join("\n");
    assert_eq!(
        log_has(&router, "traces: cannot export spans"),
        1,
        "log:\n{log}"
    );
    assert!(log.contains("not exported"), "log:\n{log}");
    assert!(log.contains("store flushed"), "log:\n{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_endpoint_no_exporter_is_built() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_router_config(dir.path(), 2_000, "");
    let listener = Listener::ok().await;
    let router = RouterProcess::start(&config);
    let mut admin = router.admin().await;
    let mut ingest = router.ingest().await;
    create(
        &mut admin,
        1010,
        webhook("w", &listener.url(), &["COURSE_ENROLLMENT"], no_auth()),
    )
    .await;
    // A caller's traceparent is accepted and ignored.
    publish_traced(
        &mut ingest,
        vec![event("b-1", "COURSE_ENROLLMENT", 1)],
        Some(&format!("00-{CALLER_TRACE}-{CALLER_SPAN}-01")),
    )
    .await;
    let got = listener
        .wait_until(Duration::from_secs(10), |r| !r.is_empty())
        .await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].event_ids(), ["b-1"]);
    // No trace context is sent to listeners when traces are off.
    assert_eq!(got[0].header("traceparent"), "");
    let log = router.log_lines().join("\n");
    assert!(
        log.contains("traces off (telemetry.otlp_endpoint is not set)"),
        "log:\n{log}"
    );
    assert!(!log.contains("exporting traces"), "log:\n{log}");
}
